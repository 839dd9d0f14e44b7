"""Raw memory mappings as memoryviews (ctypes ``mmap``/``munmap``).

Python's :mod:`mmap` cannot place mappings (MAP_FIXED) or wrap an address a
C library returned, and both are needed: grant and foreign mappings of
scattered guest pages must look contiguous, and libxenforeignmemory hands
back a pointer.  A view must not outlive its mapping: the device model drops
every buffer before the mapping is released.
"""

from __future__ import annotations

import ctypes
import mmap
import os

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]
_mmap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int
MAP_FAILED = ctypes.c_void_p(-1).value
MAP_FIXED = 0x10
PROT_NONE = 0
PAGE = 4096


def _check(addr: int | None) -> int:
    if addr is None or addr == MAP_FAILED:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return addr


def view_at(address: int, length: int, writable: bool) -> memoryview:
    """A memoryview of ``length`` bytes at ``address`` (read-only unless ``writable``)."""
    view = memoryview((ctypes.c_char * length).from_address(address)).cast("B")
    return view if writable else view.toreadonly()


class PageMapping:
    """Pages of a file (a guest's memfd) placed contiguously in our address space."""

    def __init__(self, fd: int, offsets: list[int], writable: bool) -> None:
        length = len(offsets) * PAGE
        self.length = length
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        base = _check(_mmap(None, length, PROT_NONE,
                            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0))
        self.address = base
        try:
            i = 0
            while i < len(offsets):
                run = 1
                while i + run < len(offsets) and offsets[i + run] == offsets[i] + run * PAGE:
                    run += 1
                _check(_mmap(base + i * PAGE, run * PAGE, prot, mmap.MAP_SHARED | MAP_FIXED,
                             fd, offsets[i]))
                i += run
        except BaseException:
            _munmap(base, length)
            raise
        self.view = view_at(base, length, writable)

    def unmap(self) -> None:
        if self.length:
            self.view.release()
            _munmap(self.address, self.length)
            self.length = 0
