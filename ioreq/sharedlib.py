"""Finding a C library (Xen's, libseccomp) the way the dynamic linker would, but fast.

``ctypes.util.find_library`` runs ``ldconfig -p`` (or a compiler) in a subprocess, and a
minimal system — an initramfs, a container, the tier's Dom0 — may have no linker cache
at all; globbing ``/usr/lib/*/`` instead opens every directory under ``/usr/lib``, a
hundred and more on a Debian host.  Both cost a worker milliseconds natively and tenths
of a second under TCG, on the way to a guest's InitWait.  So the library directories are
listed in the dynamic linker's order (this interpreter's multiarch triplet first, as
Debian installs libraries there) and only ``lib<stem>.so.*`` is matched in each; the
linker cache is asked only when none of them has the library.
"""

from __future__ import annotations

import glob
import os
import sysconfig


def library_directories() -> list[str]:
    """Where the dynamic linker looks on a Debian-like system, in its order, those
    that exist."""
    triplet = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [f"/usr/lib/{triplet}", f"/lib/{triplet}"] if triplet else []
    dirs += ["/usr/lib64", "/lib64", "/usr/lib", "/lib"]
    seen: list[str] = []
    for path in dirs:
        if os.path.isdir(path) and os.path.realpath(path) not in map(os.path.realpath, seen):
            seen.append(path)
    return seen


def _version(path: str) -> tuple[int, ...]:
    tail = path.rsplit(".so.", 1)[-1]
    return tuple(int(part) for part in tail.split(".") if part.isdigit())


def find(stem: str, major: str = "", directories: list[str] | None = None) -> str:
    """The path of ``lib<stem>.so.<major>…`` to load: in the first library directory
    that has one, the newest version there (a soname that carries a release, as
    ``libxenctrl.so.4.17``, is found without knowing it); else the linker cache's name;
    else ``lib<stem>.so`` for the loader's own search and its error message."""
    pattern = f"lib{stem}.so.{major}*" if major else f"lib{stem}.so.*"
    for directory in library_directories() if directories is None else directories:
        found = glob.glob(os.path.join(glob.escape(directory), pattern))
        if found:
            return max(found, key=_version)
    import ctypes.util  # the slow path: a subprocess

    return ctypes.util.find_library(stem) or f"lib{stem}.so"
