"""Which disk targets the daemon may open: the operator's policy, checked on what was
really opened.

A device's ``params`` node is written by the toolstack, but in a driver domain libxl
does not check it, and a path can lead elsewhere through symlinks.  So the policy is
checked after the open, on the file the descriptor really refers to
(``/proc/self/fd/N``): block devices (when allowed) and regular files under one of
the allowed directories — a symlink that escapes them is refused, and there is no
window between check and open.  An empty directory list allows any regular file (the
behaviour before the policy existed; the daemon says so when it starts).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from virtio_diskd.backend.errors import VirtioDiskdError


class TargetRefused(VirtioDiskdError):
    """The target is not one the policy allows."""


@dataclass(frozen=True)
class TargetPolicy:
    allowed_dirs: tuple[str, ...] = ()  # empty: any regular file
    block_devices: bool = True

    def describe(self) -> str:
        files = ("files anywhere" if not self.allowed_dirs
                 else "files under " + ", ".join(self.allowed_dirs))
        return f"{files}; block devices {'allowed' if self.block_devices else 'refused'}"

    def check_open(self, fd: int, asked: str) -> str:
        """The real path of the open target ``fd`` if the policy allows it."""
        real = os.readlink(f"/proc/self/fd/{fd}")
        mode = os.fstat(fd).st_mode
        if stat.S_ISBLK(mode):
            if not self.block_devices:
                raise TargetRefused(f"{asked}: block devices are not allowed by the "
                                    "target policy (allow_block_devices)")
            return real
        if not self.allowed_dirs:
            return real
        for directory in self.allowed_dirs:
            root = os.path.realpath(directory)
            if os.path.commonpath([root, real]) == root:
                return real
        where = f" (it is {real})" if real != asked else ""
        raise TargetRefused(f"{asked}{where}: not under a directory the target policy "
                            f"allows ({', '.join(self.allowed_dirs)})")
