"""A disk that forgets, on a "power cut", every write not yet made durable.

:class:`PowerCutIo` sits under the disk engine (its :class:`DiskIo` seam): the
target file plays the volatile page cache, and a copy in memory plays the stable
medium.  A write reaches the copy only through what really makes data durable —
``fdatasync`` (for every write completed before it) or ``RWF_DSYNC`` (that write
alone).  :meth:`power_cut` returns what the medium would hold after the power went:
acknowledged writes that were never made durable are gone, as they may be after a
real power cut (a killed process loses nothing: the page cache survives it).
"""

from __future__ import annotations

import os
import threading

from virtio_diskd.backend.disk.engine import DiskIo


class PowerCutIo(DiskIo):
    def __init__(self, path: str) -> None:
        with open(path, "rb") as file:
            self.stable = bytearray(file.read())
        self._dirty: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self.syncs = 0

    def _persist(self, fd: int, offset: int, length: int) -> None:
        data = os.pread(fd, length, offset)
        self.stable[offset : offset + len(data)] = data

    def pwritev(self, fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        written = os.pwritev(fd, buffers, offset, flags & ~os.RWF_DSYNC)
        with self._lock:
            if flags & os.RWF_DSYNC:
                self._persist(fd, offset, written)
            else:
                self._dirty.append((offset, written))
        return written

    def fdatasync(self, fd: int) -> None:
        with self._lock:
            for offset, length in self._dirty:
                self._persist(fd, offset, length)
            self._dirty.clear()
            self.syncs += 1

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        super().fallocate(fd, mode, offset, length)
        with self._lock:
            self._dirty.append((offset, length))

    def power_cut(self) -> bytes:
        """What the disk holds once power comes back."""
        with self._lock:
            return bytes(self.stable)
