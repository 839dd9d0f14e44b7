"""Guest memory for the device model, by foreign mapping or by grant mapping.

Both implement :class:`virtio_diskd.backend.guestmem.GuestMemory`.  Which one a
device uses comes from xenstore's ``grant_usage`` node, or, when absent
(Xen < 4.19), from whether the backend is dom0 — as libxl decides; it is never
guessed from the first address the guest sends.

* :class:`ForeignGuestMemory`: guest-physical addresses, mapped with
  ``xenforeignmemory_map`` in aligned 2 MiB chunks kept in a bounded cache
  (LRU over chunks no request is using); INVALIDATE drops the cache (chunks
  still in use are unmapped when their last request lets go).
* :class:`GrantGuestMemory`: bit-63 addresses, ``ref = (addr & ~bit63) >> 12``,
  consecutive refs for multi-page buffers, PROT_READ for device-readable
  buffers; each mapping is unmapped on release, which the device model does
  before it publishes the used entry.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from virtio_diskd.backend.guestmem import GuestMemoryError, MappedRange, check_range
from virtio_diskd.ioreq.xen import abi
from virtio_diskd.ioreq.xen.interface import (
    PROT_READ,
    PROT_WRITE,
    ForeignMemory,
    GrantTables,
    Mapping,
    XenError,
)

PAGE = 4096
CHUNK_PAGES = 512  # 2 MiB
CHUNK = CHUNK_PAGES * PAGE
CHUNK_SHIFT = 21
CHUNK_MASK = CHUNK - 1
_GRANT_BIT = abi.XEN_GRANT_DMA_ADDR_OFF


class _Chunk:
    __slots__ = ("index", "mapping", "stale", "users", "view")

    def __init__(self, index: int, mapping: Mapping) -> None:
        self.index = index
        self.mapping = mapping
        self.view = mapping.view  # looked up once: the fast paths slice it per request
        self.users = 0
        self.stale = False

    def unuse(self) -> None:
        """A range over this chunk was released: unmap it if it was invalidated and
        this was its last user."""
        self.users -= 1
        if self.users == 0 and self.stale:
            self.mapping.unmap()


class _ChunkRange:
    __slots__ = ("_chunks", "views")

    def __init__(self, chunks: list[_Chunk], views: list[memoryview]) -> None:
        self._chunks, self.views = chunks, views

    def release(self) -> None:
        for view in self.views:
            view.release()
        self.views = []
        for chunk in self._chunks:
            chunk.unuse()
        self._chunks = []


class _OwnedRange:
    """A range that owns its mappings: exact pages (uncached foreign) or grants; unmapped
    on release."""

    __slots__ = ("_mappings", "views")

    def __init__(self, mapping: Mapping, offset: int, length: int) -> None:
        self._mappings = [mapping]
        self.views = [mapping.view[offset : offset + length]]

    def extend(self, other: _OwnedRange) -> None:
        """Take over ``other``'s mappings and views (a range mapped in pieces)."""
        self._mappings += other._mappings
        self.views += other.views
        other._mappings, other.views = [], []

    def release(self) -> None:
        for view in self.views:
            view.release()
        self.views = []
        for mapping in self._mappings:
            mapping.unmap()
        self._mappings = []


class ForeignGuestMemory:
    """Guest RAM through foreign mappings with a chunk cache."""

    def __init__(self, fmem: ForeignMemory, domid: int, barrier: Callable[[], None], *,
                 max_chunks: int = 256, max_uncacheable: int = 64) -> None:
        self.fmem = fmem
        self.domid = domid
        self._barrier = barrier
        self.max_chunks = max_chunks
        self._cache: collections.OrderedDict[int, _Chunk] = collections.OrderedDict()
        # chunks that failed to map whole (partly outside RAM): a bounded LRU, so that
        # wild guest addresses cannot grow it; forgetting one costs one more map attempt
        self.max_uncacheable = max_uncacheable
        self._uncacheable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.maps = 0
        self.invalidations = 0

    def barrier(self) -> None:
        self._barrier()

    def _chunk(self, index: int) -> _Chunk | None:
        chunk = self._cache.get(index)
        if chunk is not None:
            self._cache.move_to_end(index)
            return chunk
        if index in self._uncacheable:
            self._uncacheable.move_to_end(index)
            return None
        gfn = index * CHUNK_PAGES
        try:
            mapping = self.fmem.map(self.domid, PROT_READ | PROT_WRITE,
                                    list(range(gfn, gfn + CHUNK_PAGES)))
        except XenError:
            self._uncacheable[index] = None  # partly outside RAM: map exact pages instead
            if len(self._uncacheable) > self.max_uncacheable:
                self._uncacheable.popitem(last=False)
            return None
        self.maps += 1
        chunk = _Chunk(index, mapping)
        self._cache[index] = chunk
        self._evict()
        return chunk

    def _evict(self) -> None:
        while len(self._cache) > self.max_chunks:
            victim = next((c for c in self._cache.values() if c.users == 0), None)
            if victim is None:
                return  # everything is in use: stay over the bound until released
            del self._cache[victim.index]
            victim.mapping.unmap()

    def _direct(self, addr: int, length: int, writable: bool) -> MappedRange:
        first = addr // PAGE
        pages = (addr + length + PAGE - 1) // PAGE - first
        try:
            mapping = self.fmem.map(self.domid, PROT_READ | (PROT_WRITE if writable else 0),
                                    list(range(first, first + pages)))
        except XenError as exc:
            raise GuestMemoryError(f"dom{self.domid} {addr:#x}+{length:#x}: {exc}") from exc
        self.maps += 1
        return _OwnedRange(mapping, addr - first * PAGE, length)

    def map(self, addr: int, length: int, writable: bool, *,
            contiguous: bool = False) -> MappedRange:
        # Fast path: the whole range inside one cached chunk (nearly every request).
        if length > 0 and addr >= 0 and not addr & _GRANT_BIT:
            index = addr >> CHUNK_SHIFT
            if (addr + length - 1) >> CHUNK_SHIFT == index:
                chunk = self._cache.get(index)
                if chunk is not None:
                    chunk.users += 1
                    offset = addr & CHUNK_MASK
                    view = chunk.view[offset : offset + length]
                    return _ChunkRange([chunk], [view if writable else view.toreadonly()])
        return self._map_slow(addr, length, writable, contiguous)

    def _map_slow(self, addr: int, length: int, writable: bool,
                  contiguous: bool) -> MappedRange:
        check_range(addr, length)
        if abi.is_grant_address(addr):
            raise GuestMemoryError(f"grant address {addr:#x} on a foreign-mapping device")
        if length == 0:
            return _ChunkRange([], [])
        first, last = addr // CHUNK, (addr + length - 1) // CHUNK
        if contiguous and first != last:
            return self._direct(addr, length, writable)
        chunks: list[_Chunk] = []
        views: list[memoryview] = []
        pos, end = addr, addr + length
        try:
            while pos < end:
                index = pos // CHUNK
                piece_end = min(end, (index + 1) * CHUNK)
                chunk = self._chunk(index)
                if chunk is None:
                    if len(chunks) == 0 and piece_end == end:
                        return self._direct(addr, length, writable)
                    raise GuestMemoryError(f"dom{self.domid} {pos:#x} is not mappable")
                chunk.users += 1
                chunks.append(chunk)
                offset = pos - index * CHUNK
                view = chunk.view[offset : offset + (piece_end - pos)]
                views.append(view if writable else view.toreadonly())
                pos = piece_end
        except BaseException:
            for chunk in chunks:
                chunk.unuse()
            raise
        return _ChunkRange(chunks, views)

    def read(self, addr: int, length: int) -> bytes:
        if length > 0 and addr >= 0 and not addr & _GRANT_BIT:
            index = addr >> CHUNK_SHIFT
            if (addr + length - 1) >> CHUNK_SHIFT == index:
                chunk = self._cache.get(index)
                if chunk is not None:  # a copy: no reference outlives this call
                    offset = addr & CHUNK_MASK
                    return bytes(chunk.view[offset : offset + length])
        mapped = self.map(addr, length, False)
        try:
            return b"".join(bytes(v) for v in mapped.views)
        finally:
            mapped.release()

    def invalidate(self) -> None:
        """INVALIDATE: forget every cached mapping (in-use chunks go when released)."""
        self.invalidations += 1
        for chunk in self._cache.values():
            if chunk.users:
                chunk.stale = True
            else:
                chunk.mapping.unmap()
        self._cache.clear()
        self._uncacheable.clear()

    def close(self) -> None:
        self.invalidate()


#: Grant refs mapped by one hypercall at most: a longer range is mapped in pieces, so
#: that the ref list built for one call never grows with what the guest asks for.
GRANT_MAP_PAGES = 256


#: What a grant-mapping device says of an address without bit 63 (the daemon adds the
#: likely cause: a guest kernel without CONFIG_XEN_VIRTIO).
NOT_A_GRANT = "a guest-physical address on a grant-mapping device"


class GrantGuestMemory:
    """Guest buffers through grant references (``grant_usage=1``)."""

    def __init__(self, gnttab: GrantTables, domid: int, barrier: Callable[[], None], *,
                 pages_per_map: int = GRANT_MAP_PAGES) -> None:
        self.gnttab = gnttab
        self.domid = domid
        self._barrier = barrier
        self.pages_per_map = pages_per_map
        self.maps = 0

    def barrier(self) -> None:
        self._barrier()

    def map(self, addr: int, length: int, writable: bool, *,
            contiguous: bool = False) -> MappedRange:
        check_range(addr, length)
        if not abi.is_grant_address(addr):
            raise GuestMemoryError(f"{NOT_A_GRANT}: {addr:#x}")
        raw = addr & ~abi.XEN_GRANT_DMA_ADDR_OFF
        first_ref, offset = raw >> abi.XEN_PAGE_SHIFT, raw & (PAGE - 1)
        pages = max((offset + length + PAGE - 1) // PAGE, 1)
        if first_ref + pages > 0xFFFFFFFF:
            raise GuestMemoryError(f"grant refs {first_ref}+{pages} out of range")
        prot = PROT_READ | (PROT_WRITE if writable else 0)
        if contiguous and pages > self.pages_per_map:
            raise GuestMemoryError(f"dom{self.domid} grant {first_ref}+{pages}: a ring of "
                                   f"more than {self.pages_per_map} pages")
        owned: _OwnedRange | None = None
        try:
            for start in range(0, pages, self.pages_per_map):
                count = min(self.pages_per_map, pages - start)
                head = offset if start == 0 else 0
                piece = self._map_refs(first_ref + start, count, prot, head,
                                       min(count * PAGE - head, length))
                length -= len(piece.views[0])
                if owned is None:
                    owned = piece
                else:
                    owned.extend(piece)
        except BaseException:
            if owned is not None:
                owned.release()
            raise
        assert owned is not None
        return owned

    def _map_refs(self, first_ref: int, count: int, prot: int, offset: int,
                  length: int) -> _OwnedRange:
        try:
            mapping = self.gnttab.map_domain_grant_refs(
                self.domid, list(range(first_ref, first_ref + count)), prot)
        except XenError as exc:
            raise GuestMemoryError(f"dom{self.domid} grant {first_ref}+{count}: {exc}") from exc
        self.maps += 1
        return _OwnedRange(mapping, offset, length)

    def read(self, addr: int, length: int) -> bytes:
        mapped = self.map(addr, length, False)
        try:
            return b"".join(bytes(view) for view in mapped.views)
        finally:
            mapped.release()

    def invalidate(self) -> None:
        """Grant mappings are per request: nothing is cached."""

    def close(self) -> None:
        return None
