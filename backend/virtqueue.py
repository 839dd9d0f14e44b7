"""Virtqueues (virtio 1.2 §2.7 split, §2.8 packed) walked over guest memory.

A queue is built when the driver sets QueueReady; it maps its ring areas once
and then, per notification, :meth:`pop_all` returns every available chain
(batching), :meth:`push_used` publishes completions, and
:meth:`needs_interrupt` applies the driver's suppression rules (flags or
EVENT_IDX) so the guest is signalled at most once per batch.

Hostile-guest rules: a structural violation — a head or ``next`` index out of
range, a chain longer than the queue (a loop), an indirect table inside an
indirect table, an indirect table of bad length or with more entries than the
queue size (§2.7.5.3.1: no chain longer than the queue), INDIRECT without the
feature, an avail index that jumps by more than the queue size, a buffer id
posted twice, more ring slots in flight than the ring holds (packed: slots
re-marked available before they were used), a ring or table that cannot be
mapped — raises
:class:`RingError`.  The transport answers that with DEVICE_NEEDS_RESET; the
queue never reads or writes outside its own mapped areas.
"""

from __future__ import annotations

import platform
import struct
import sys
from dataclasses import dataclass

from virtio_diskd.backend.errors import VirtioDiskdError
from virtio_diskd.backend.guestmem import GuestMemory, GuestMemoryError, MappedRange
from virtio_diskd.backend.inflight import InflightLog, InflightLogError, LoggedChain

if sys.byteorder != "little":  # ring fields are little-endian and accessed as native arrays
    raise ImportError("virtio_diskd.backend.virtqueue needs a little-endian host")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
PACKED_DESC_F_AVAIL = 1 << 7
PACKED_DESC_F_USED = 1 << 15
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2

_SPLIT_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_PACKED_DESC = struct.Struct("<QIHH")  # addr, len, id, flags
_PACKED_TABLE3 = struct.Struct("<" + "QIHH" * 3)  # an indirect table of three
_USED_ELEMENT = struct.Struct("<IH")  # a packed used element's len and id (at +8)
MAX_QUEUE_SIZE = 32768
#: x86 keeps loads in order with loads and stores with stores (TSO).
STRONGLY_ORDERED = platform.machine() in ("x86_64", "AMD64", "i686", "i386")


def _no_barrier() -> None:
    """Ordering the CPU already guarantees (see ``Virtqueue.__init__``)."""


class RingError(VirtioDiskdError):
    """The driver broke the ring's structure; the device needs a reset."""


#: One buffer element of a chain: (guest address, length, device-writable).
#: A plain tuple: chains are built per request on the hot path.
Segment = tuple[int, int, bool]


@dataclass(slots=True, eq=False)
class Chain:
    """One available buffer: its id for the used ring and its elements in order."""

    head: int  # split: head descriptor index; packed: buffer id
    segments: list[Segment]
    desc_count: int  # ring slots it occupies (packed rings skip this many when used)


def vring_need_event(event: int, new: int, old: int) -> bool:
    """The EVENT_IDX rule: did the index move past ``event`` between old and new?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def _map_ring(memory: GuestMemory, addr: int, length: int, writable: bool,
              what: str) -> tuple[MappedRange, memoryview]:
    try:
        mapped = memory.map(addr, length, writable, contiguous=True)
    except GuestMemoryError as exc:
        raise RingError(f"{what} at {addr:#x} cannot be mapped: {exc}") from exc
    views = mapped.views
    if len(views) != 1 or len(views[0]) != length:
        mapped.release()
        raise RingError(f"{what} at {addr:#x} is not contiguous")
    return mapped, views[0]


def _read_table(memory: GuestMemory, addr: int, length: int) -> bytes:
    """An indirect table, copied once (it is read-only to the device and small)."""
    try:
        return memory.read(addr, length)
    except GuestMemoryError as exc:
        raise RingError(f"indirect table at {addr:#x} cannot be read: {exc}") from exc


class Virtqueue:
    """What the device needs of a queue, whatever its ring format.

    Subclasses map their ring areas into ``_mappings`` and track the buffers the
    driver made available and the device has not used yet in ``_in_flight``.
    """

    def __init__(self, memory: GuestMemory, size: int, *, event_idx: bool,
                 indirect: bool, log: InflightLog | None = None) -> None:
        self.memory = memory
        #: where taken and published chains are recorded for a successor (None: nowhere)
        self.log = log
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        # load→load and store→store orderings need an instruction only on weakly
        # ordered CPUs (Arm: dmb); on x86 (TSO) they hold already, as Linux's
        # virt_rmb()/virt_wmb() are compiler barriers there.  store→load (publish,
        # then re-read) always takes the full barrier.
        self._rmb = self._wmb = _no_barrier if STRONGLY_ORDERED else memory.barrier
        self._mappings: list[MappedRange] = []
        self._in_flight: set[int] = set()
        #: the ring was seen empty after notifications were re-enabled, and nothing was
        #: taken since: the driver will notify about anything it adds, so nobody needs
        #: to look at the ring until then (set by the device's drain loop)
        self.armed = False

    def pop_all(self) -> list[Chain]:
        raise NotImplementedError

    def recover(self) -> list[Chain]:
        """Carry on from the in-flight log a killed predecessor left (the queue was
        just built over the same rings): restore the ring positions and return the
        chains it had taken and not published, to be executed again."""
        raise NotImplementedError

    def push_used(self, completions: list[tuple[Chain, int]]) -> None:
        raise NotImplementedError

    def needs_interrupt(self) -> bool:
        raise NotImplementedError

    def disable_notifications(self) -> None:
        raise NotImplementedError

    def enable_notifications(self) -> bool:
        """Ask the driver to notify again; True if buffers arrived meanwhile."""
        raise NotImplementedError

    def release(self) -> None:
        """Unmap the ring areas (reset, QueueReady=0, device removal)."""
        for mapped in self._mappings:
            mapped.release()
        self._mappings = []

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)


class SplitQueue(Virtqueue):
    """A split virtqueue: descriptor table, avail ring, used ring."""

    def __init__(self, memory: GuestMemory, size: int, desc_addr: int, avail_addr: int,
                 used_addr: int, *, event_idx: bool, indirect: bool,
                 log: InflightLog | None = None) -> None:
        if size <= 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise RingError(f"split queue size {size} is not a power of two up to 32768")
        if desc_addr % 16 or avail_addr % 2 or used_addr % 4:
            raise RingError("split ring areas are misaligned")
        super().__init__(memory, size, event_idx=event_idx, indirect=indirect, log=log)
        try:
            for addr, length, writable, what in (
                    (desc_addr, 16 * size, False, "descriptor table"),
                    (avail_addr, 6 + 2 * size, False, "avail ring"),
                    (used_addr, 6 + 8 * size, True, "used ring")):
                mapped, view = _map_ring(memory, addr, length, writable, what)
                self._mappings.append(mapped)
                if what == "descriptor table":
                    self._desc = view
                elif what == "avail ring":
                    self._avail = view.cast("H")
                else:
                    self._used16 = view.cast("H")
                    self._used32 = view[4 : 4 + 8 * size].cast("I")
        except BaseException:
            self.release()
            raise
        self._used_event_index = 2 + size  # avail->used_event
        self._avail_event_index = 2 + 4 * size  # used->avail_event
        self.last_avail = 0
        self.used_idx = 0
        self.signalled_used = 0

    def pop_all(self) -> list[Chain]:
        avail = self._avail
        avail_idx = avail[1]
        pending = (avail_idx - self.last_avail) & 0xFFFF
        if pending == 0:
            return []
        if pending > self.size:
            raise RingError(f"avail index moved by {pending}, more than the queue size")
        self._rmb()  # read ring entries only after the index
        chains = []
        mask = self.size - 1
        log = self.log
        for _ in range(pending):
            head = avail[2 + (self.last_avail & mask)]
            if head in self._in_flight:
                raise RingError(f"descriptor {head} made available while in flight")
            chain = self._walk(head)
            if log is not None:
                log.taken_head(head)
            chains.append(chain)
            self._in_flight.add(head)
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chains

    def recover(self) -> list[Chain]:
        log = self.log
        if log is None:
            return []
        try:
            log.check(packed=False)
            published = self._used16[1]
            known = log.cursor & 0xFFFF
            gap = (published - known) & 0xFFFF
            if gap > self.size:
                raise RingError(f"used index {published} is {gap} past the log's {known}")
            mask = self.size - 1
            for position in range(known, known + gap):  # published by the predecessor
                log.release_head(self._used32[2 * (position & mask)])
            log.cursor = published
            heads = [logged.head for logged in log.entries()]
        except InflightLogError as exc:
            raise RingError(str(exc)) from exc
        chains = []
        for head in heads:  # the driver left their descriptors alone: walk them again
            if head >= self.size or head in self._in_flight:
                raise RingError(f"in-flight log names descriptor {head} badly")
            chains.append(self._walk(head))
            self._in_flight.add(head)
        self.used_idx = self.signalled_used = published
        self.last_avail = (published + len(chains)) & 0xFFFF
        return chains

    def _walk(self, head: int) -> Chain:
        size = self.size
        if head >= size:
            raise RingError(f"head index {head} out of range")
        addr, length, flags, nxt = _SPLIT_DESC.unpack_from(self._desc, 16 * head)
        if flags & DESC_F_INDIRECT:
            return Chain(head, self._walk_indirect(addr, length, flags), 1)
        segments: list[Segment] = []
        index = head
        while True:
            if len(segments) >= size:
                raise RingError("descriptor chain longer than the queue (a loop)")
            segments.append((addr, length, bool(flags & DESC_F_WRITE)))
            if not flags & DESC_F_NEXT:
                return Chain(head, segments, len(segments))
            index = nxt
            if index >= size:
                raise RingError(f"next index {index} out of range")
            addr, length, flags, nxt = _SPLIT_DESC.unpack_from(self._desc, 16 * index)
            if flags & DESC_F_INDIRECT:
                raise RingError("indirect descriptor inside a chain")

    def _walk_indirect(self, addr: int, length: int, flags: int) -> list[Segment]:
        if not self.indirect:
            raise RingError("INDIRECT used without VIRTIO_F_INDIRECT_DESC")
        if flags & DESC_F_NEXT:
            raise RingError("INDIRECT and NEXT set together")
        if length == 0 or length % 16 or length // 16 > self.size:
            raise RingError(f"indirect table of {length} bytes (queue size {self.size})")
        entries = list(_SPLIT_DESC.iter_unpack(_read_table(self.memory, addr, length)))
        count = len(entries)
        segments: list[Segment] = []
        index = 0
        while True:
            if len(segments) >= count:
                raise RingError("indirect chain longer than its table (a loop)")
            d_addr, d_len, d_flags, d_next = entries[index]
            if d_flags & DESC_F_INDIRECT:
                raise RingError("indirect table inside an indirect table")
            segments.append((d_addr, d_len, bool(d_flags & DESC_F_WRITE)))
            if not d_flags & DESC_F_NEXT:
                return segments
            index = d_next
            if index >= count:
                raise RingError(f"indirect next index {index} out of range")

    def push_used(self, completions: list[tuple[Chain, int]]) -> None:
        if not completions:
            return
        used32 = self._used32
        mask = self.size - 1
        idx = self.used_idx
        for chain, written in completions:
            self._in_flight.discard(chain.head)
            slot = idx & mask
            used32[2 * slot] = chain.head
            used32[2 * slot + 1] = written & 0xFFFFFFFF
            idx = (idx + 1) & 0xFFFF
        self._wmb()  # elements before the index that publishes them
        self.used_idx = idx
        self._used16[1] = idx
        log = self.log
        if log is not None:  # after the publish (see backend/inflight.py)
            for chain, _written in completions:
                log.released(chain.head)
            log.cursor = idx

    def needs_interrupt(self) -> bool:
        self.memory.barrier()  # publish used idx before reading the driver's suppression
        if self.event_idx:
            new, old = self.used_idx, self.signalled_used
            self.signalled_used = new
            return vring_need_event(self._avail[self._used_event_index], new, old)
        self.signalled_used = self.used_idx
        return not self._avail[0] & AVAIL_F_NO_INTERRUPT

    def disable_notifications(self) -> None:
        if not self.event_idx:
            self._used16[0] = self._used16[0] | USED_F_NO_NOTIFY
        # With EVENT_IDX, leaving avail_event behind last_avail suppresses kicks.

    def enable_notifications(self) -> bool:
        if self.event_idx:
            self._used16[self._avail_event_index] = self.last_avail
        else:
            self._used16[0] = self._used16[0] & ~USED_F_NO_NOTIFY
        self.memory.barrier()  # the flag/event before re-reading the avail index
        return self._avail[1] != self.last_avail


class PackedQueue(Virtqueue):
    """A packed virtqueue: one descriptor ring plus two event-suppression areas."""

    def __init__(self, memory: GuestMemory, size: int, desc_addr: int, driver_addr: int,
                 device_addr: int, *, event_idx: bool, indirect: bool,
                 log: InflightLog | None = None) -> None:
        if size <= 0 or size > MAX_QUEUE_SIZE:
            raise RingError(f"packed queue size {size} out of range")
        if desc_addr % 16 or driver_addr % 4 or device_addr % 4:
            raise RingError("packed ring areas are misaligned")
        super().__init__(memory, size, event_idx=event_idx, indirect=indirect, log=log)
        try:
            mapped, self._ring = _map_ring(memory, desc_addr, 16 * size, True, "descriptor ring")
            self._mappings.append(mapped)
            mapped, view = _map_ring(memory, driver_addr, 4, False, "driver event area")
            self._mappings.append(mapped)
            self._driver_event = view.cast("H")
            mapped, view = _map_ring(memory, device_addr, 4, True, "device event area")
            self._mappings.append(mapped)
            self._device_event = view.cast("H")
        except BaseException:
            self.release()
            raise
        self._ring16 = self._ring.cast("H")
        self._slots_in_flight = 0  # ring slots of buffers taken and not yet used
        self._used_since_signal = 0  # ring slots published since needs_interrupt
        self.next_avail = 0
        self.avail_wrap = 1
        self.next_used = 0
        self.used_wrap = 1
        # buffer ids are the driver's choice: each in-flight buffer gets a log entry
        self._entry_of: dict[int, int] = {}
        self._free_entries = list(range(size - 1, -1, -1))

    def _is_available(self, index: int, wrap: int) -> bool:
        flags = self._ring16[8 * index + 7]
        avail = 1 if flags & PACKED_DESC_F_AVAIL else 0
        used = 1 if flags & PACKED_DESC_F_USED else 0
        return avail == wrap and used != wrap

    def pop_all(self) -> list[Chain]:
        chains: list[Chain] = []
        ring, ring16, rmb = self._ring, self._ring16, self._rmb
        while True:
            # _is_available, inlined: one check per request
            flags = ring16[8 * self.next_avail + 7]
            wrap = self.avail_wrap
            if (flags >> 7) & 1 != wrap or (flags >> 15) & 1 == wrap:
                break
            rmb()  # the rest of the descriptor only after its flags
            addr, length, buffer_id, flags = _PACKED_DESC.unpack_from(ring, 16 * self.next_avail)
            if flags & (DESC_F_INDIRECT | DESC_F_NEXT) == DESC_F_INDIRECT:
                # Linux's form of a multi-buffer request: one indirect descriptor
                chain = Chain(buffer_id, self._indirect(addr, length), 1)
            else:
                chain = self._walk()
            if chain.head in self._in_flight:
                raise RingError(f"buffer id {chain.head} made available while in flight")
            # Slots of buffers not yet used cannot be available again: a driver that
            # re-marks them for the next lap would keep more than the ring in flight.
            self._slots_in_flight += chain.desc_count
            if self._slots_in_flight > self.size:
                raise RingError("more descriptors in flight than the ring holds")
            self._in_flight.add(chain.head)
            if self.log is not None:
                entry = self._free_entries.pop()
                self._entry_of[chain.head] = entry
                if not self.log.taken_descriptors(entry, chain.head, chain.desc_count,
                                                  self._ring, self.next_avail, self.size):
                    self.log.taken(entry, chain.head, chain.desc_count, chain.segments)
            chains.append(chain)
            self.next_avail += chain.desc_count
            if self.next_avail >= self.size:
                self.next_avail -= self.size
                self.avail_wrap ^= 1
        return chains

    def _walk(self) -> Chain:
        segments: list[Segment] = []
        index, wrap = self.next_avail, self.avail_wrap
        count = 0
        while True:
            if count >= self.size:
                raise RingError("descriptor list longer than the queue")
            if count and not self._is_available(index, wrap):
                raise RingError("descriptor list continues into an unavailable slot")
            addr, length, buffer_id, flags = _PACKED_DESC.unpack_from(self._ring, 16 * index)
            count += 1
            if flags & DESC_F_INDIRECT:
                if count != 1 or flags & DESC_F_NEXT:
                    raise RingError("an indirect descriptor must be a list of its own")
                return Chain(buffer_id, self._indirect(addr, length), 1)
            segments.append((addr, length, bool(flags & DESC_F_WRITE)))
            if not flags & DESC_F_NEXT:
                return Chain(buffer_id, segments, count)
            index += 1
            if index == self.size:
                index, wrap = 0, wrap ^ 1

    def _indirect(self, addr: int, length: int) -> list[Segment]:
        if not self.indirect:
            raise RingError("INDIRECT used without VIRTIO_F_INDIRECT_DESC")
        if length == 0 or length % 16 or length // 16 > self.size:
            raise RingError(f"indirect table of {length} bytes (queue size {self.size})")
        table = _read_table(self.memory, addr, length)
        # Only WRITE is valid inside an indirect table; other flags are ignored.
        if length == 48:  # Linux's table for one data buffer: header, data, status
            a0, n0, _i, f0, a1, n1, _i, f1, a2, n2, _i, f2 = _PACKED_TABLE3.unpack(table)
            return [(a0, n0, f0 & DESC_F_WRITE != 0), (a1, n1, f1 & DESC_F_WRITE != 0),
                    (a2, n2, f2 & DESC_F_WRITE != 0)]
        return [(d_addr, d_len, d_flags & DESC_F_WRITE != 0)
                for d_addr, d_len, _id, d_flags in _PACKED_DESC.iter_unpack(table)]

    def _chain_again(self, logged: LoggedChain) -> Chain:
        """A logged chain as it was taken: its descriptors parsed again (the driver left
        an indirect table alone: it is the device's until used), or its segments."""
        if logged.raw is None:
            segments = logged.segments
            if logged.count > len(segments):  # over the device's limits: keep the count
                segments = (segments[:-1] + [(0, 0, False)] * (logged.count - len(segments))
                            + segments[-1:])
            return Chain(logged.head, segments, logged.desc_count)
        descs = list(_PACKED_DESC.iter_unpack(logged.raw))
        addr, length, _id, flags = descs[0]
        if flags & DESC_F_INDIRECT:
            if len(descs) != 1:
                raise RingError("an indirect descriptor must be a list of its own")
            return Chain(logged.head, self._indirect(addr, length), 1)
        return Chain(logged.head, [(a, n, bool(f & DESC_F_WRITE)) for a, n, _i, f in descs],
                     logged.desc_count)

    def push_used(self, completions: list[tuple[Chain, int]]) -> None:
        ring, ring16, log, wmb = self._ring, self._ring16, self.log, self._wmb
        in_flight, size = self._in_flight, self.size
        index, wrap = self.next_used, self.used_wrap
        for chain, written in completions:
            head, slots = chain.head, chain.desc_count
            in_flight.discard(head)
            self._slots_in_flight -= slots
            self._used_since_signal += slots
            if log is not None:  # name the buffer before publishing it (backend/inflight.py)
                log.publishing_packed(index, wrap, head, slots)
            _USED_ELEMENT.pack_into(ring, 16 * index + 8, written & 0xFFFFFFFF, head)
            flags = (PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED) if wrap else 0
            if written:
                flags |= DESC_F_WRITE
            wmb()  # id and len before the flags that publish them
            ring16[8 * index + 7] = flags
            index += slots
            if index >= size:
                index -= size
                wrap ^= 1
            self.next_used, self.used_wrap = index, wrap
            if log is not None:
                entry = self._entry_of.pop(head)
                self._free_entries.append(entry)
                log.published_packed(entry, index, wrap)

    def recover(self) -> list[Chain]:
        log = self.log
        if log is None:
            return []
        try:
            log.check(packed=True)
            position, wrap, pending = InflightLog.unpack_cursor(log.cursor)
            if position >= self.size:
                raise RingError(f"in-flight log cursor {position} outside the ring")
            if pending is not None:
                buffer_id, slots = pending
                if (self._ring16[8 * position + 7] >> 15) & 1 == wrap:  # it was published
                    log.release_head(buffer_id)
                    position += slots
                    if position >= self.size:
                        position -= self.size
                        wrap ^= 1
                log.cursor = InflightLog.packed_cursor(position, wrap)
            logged = log.entries()
        except InflightLogError as exc:
            raise RingError(str(exc)) from exc
        self.next_used, self.used_wrap = position, wrap
        chains = []
        for item in logged:
            chain = self._chain_again(item)
            if chain.head in self._in_flight or not 1 <= chain.desc_count <= self.size:
                raise RingError(f"in-flight log names buffer {chain.head} badly")
            self._in_flight.add(chain.head)
            self._entry_of[chain.head] = item.entry
            self._slots_in_flight += chain.desc_count
            chains.append(chain)
        if self._slots_in_flight > self.size:
            raise RingError("in-flight log holds more descriptors than the ring")
        used_entries = set(self._entry_of.values())
        self._free_entries = [e for e in range(self.size - 1, -1, -1) if e not in used_entries]
        self.next_avail = self.next_used + self._slots_in_flight
        self.avail_wrap = self.used_wrap
        if self.next_avail >= self.size:
            self.next_avail -= self.size
            self.avail_wrap ^= 1
        return chains

    def needs_interrupt(self) -> bool:
        self.memory.barrier()
        off_wrap, flags = self._driver_event[0], self._driver_event[1] & 3
        # ``old`` counted back from ``new`` by what was published since the last signal:
        # a batch of a whole ring brings next_used back to where it was, and comparing
        # ring positions alone would see no progress (and never interrupt)
        new = self.next_used
        old = (new - self._used_since_signal) & 0xFFFF
        self._used_since_signal = 0
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags == RING_EVENT_FLAGS_DESC and self.event_idx:
            offset = off_wrap & 0x7FFF
            if (off_wrap >> 15) != self.used_wrap:
                offset -= self.size
            return vring_need_event(offset & 0xFFFF, new, old)
        return True

    def disable_notifications(self) -> None:
        self._device_event[1] = RING_EVENT_FLAGS_DISABLE

    def enable_notifications(self) -> bool:
        if self.event_idx:
            self._device_event[0] = self.next_avail | (self.avail_wrap << 15)
            self._device_event[1] = RING_EVENT_FLAGS_DESC
        else:
            self._device_event[1] = RING_EVENT_FLAGS_ENABLE
        self.memory.barrier()
        return self._is_available(self.next_avail, self.avail_wrap)
