"""Guest memory as the device model sees it: ranges in, buffers out.

The device model never dereferences a guest address itself.  It asks a
:class:`GuestMemory` to *map* a guest range with the access it needs and gets
back buffers (memoryviews) to read or fill — zero-copy for the disk engine —
plus a handle to release them.  Implementations:

* :class:`FlatGuestMemory` (here): a RAM region in one buffer; used by unit
  tests and by the simulated host's backend side (an mmap of the guest's memfd);
* ``virtio_diskd.ioreq`` provides foreign mapping (a chunk cache over
  ``xenforeignmemory_map``) and grant mapping (bit-63 addresses,
  ``xengnttab_map_domain_grant_refs``).

Every failure to map — outside guest RAM, wrapping past 2^64, a revoked grant,
a read-only grant asked for write access — raises :class:`GuestMemoryError`,
which the device model turns into an I/O error or DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

from typing import Protocol

from virtio_diskd.backend.errors import VirtioDiskdError

U64_MAX = (1 << 64) - 1


class GuestMemoryError(VirtioDiskdError):
    """A guest range could not be mapped with the access asked for."""


class MappedRange(Protocol):
    """A mapped guest range: its buffers, valid until :meth:`release`."""

    @property
    def views(self) -> list[memoryview]:
        """The range as one or more contiguous buffers, in guest-address order."""
        ...

    def release(self) -> None:
        """Give the mapping back (grant mode: unmap now, before completion)."""
        ...


class GuestMemory(Protocol):
    """Maps guest-physical (or grant-encoded) ranges for the device."""

    def map(self, addr: int, length: int, writable: bool, *,
            contiguous: bool = False) -> MappedRange:
        """Map ``[addr, addr+length)``; read-only unless ``writable``.

        With ``contiguous`` the result is a single buffer (rings and indirect
        tables are read as arrays); otherwise it may be several, in order.
        Raises :class:`GuestMemoryError` when the range cannot be mapped.
        """
        ...

    def read(self, addr: int, length: int) -> bytes:
        """Copy ``length`` bytes out of guest memory (small fields: headers, tables)."""
        ...

    def barrier(self) -> None:
        """Order this thread's stores to guest memory before later ones.

        Needed between writing a used element and publishing the used index
        (and before reading the avail index after re-enabling notifications)
        on weakly ordered CPUs; a no-op where the platform orders them.
        """
        ...


class _Views:
    __slots__ = ("views",)

    def __init__(self, views: list[memoryview]) -> None:
        self.views = views

    def release(self) -> None:
        self.views = []


def check_range(addr: int, length: int) -> None:
    """Reject negative, wrapping or absurd ranges before any lookup."""
    if addr < 0 or length < 0 or addr > U64_MAX or addr + length - 1 > U64_MAX:
        raise GuestMemoryError(f"range {addr:#x}+{length:#x} wraps around 2^64")


class FlatGuestMemory:
    """Guest RAM ``[base, base+len(buffer))`` held in one buffer.

    Read-only mappings are read-only memoryviews, so a device bug that writes
    a device-readable buffer raises instead of corrupting the guest.
    """

    def __init__(self, buffer: bytearray | memoryview, base: int = 0x40000000) -> None:
        self._buffer = memoryview(buffer).cast("B")
        self.base = base
        self.size = len(self._buffer)

    def map(self, addr: int, length: int, writable: bool, *,
            contiguous: bool = False) -> MappedRange:
        check_range(addr, length)
        start = addr - self.base
        if start < 0 or start + length > self.size:
            raise GuestMemoryError(f"range {addr:#x}+{length:#x} is outside guest RAM")
        view = self._buffer[start : start + length]
        return _Views([view if writable else view.toreadonly()])

    def read(self, addr: int, length: int) -> bytes:
        start = addr - self.base
        if start < 0 or length < 0 or start + length > self.size:
            raise GuestMemoryError(f"range {addr:#x}+{length:#x} is outside guest RAM")
        return bytes(self._buffer[start : start + length])

    def barrier(self) -> None:
        """Flat memory lives in this process: program order is enough."""
