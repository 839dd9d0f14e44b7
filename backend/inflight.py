"""The in-flight log of one virtqueue: what a successor needs to finish its work.

vhost-user's "inflight" shared memory, for virtio-diskd's own restarts.  The log
lives in a buffer that outlives the process (a file on tmpfs, mapped shared) and
records, per queue:

* every chain taken from the ring and not yet put on the used ring: a split
  ring's head only (its descriptor table is the device's until the chain is
  used, so a successor walks it again); a packed ring's descriptors as taken
  (the driver reuses a packed ring's slots while a buffer is still in flight),
  or its segments when they do not fit an entry;
* a *cursor*: how far the used ring is known to be published.

After a SIGKILL, :meth:`~virtio_diskd.backend.virtqueue.Virtqueue.recover`
reads the log and the ring together and returns the chains to execute again.
Reads and writes may run twice; a completion must never be published twice,
so the stores are ordered for that:

* split ring: used elements, used index (publish), then the entries cleared,
  then the cursor.  A successor that finds the guest's used index ahead of the
  cursor reads the heads of the published elements from the used ring (the
  driver never writes it) and clears those entries.
* packed ring: the cursor first names the buffer about to be published
  (*pending*), then its used element and flags are stored, then its entry is
  cleared, then the cursor moves on.  A successor that finds a pending buffer
  looks at that slot's USED bit: it flips to the ring's wrap counter when the
  element is published and stays there after the driver reuses the slot.

Every store that decides something is one aligned 4- or 8-byte store (a marker,
the cursor), so a process killed between any two instructions leaves either the
old or the new value.  A SIGKILL is not a power cut: the log is for process
death, and lives on tmpfs.

This module only lays out bytes in a buffer; it knows no files.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from virtio_diskd.backend.errors import VirtioDiskdError

MAGIC = 0x46494456  # "VDIF"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<IHHII")  # magic, version, packed, queue size, max segments
_CURSOR_OFFSET = 16  # one u64, 8-aligned
_ENTRY_HEAD = struct.Struct("<HHHH")  # head/id, ring slots, segments, segments stored
_ENTRY_FIXED = 16  # marker u32, the four u16 above, u32 spare
_SEGMENT_SIZE = 16  # u64 addr, u32 len, u32 device-writable
_PENDING = 1 << 16
#: ``count`` of an entry holding raw ring descriptors (see taken_descriptors)
_RAW = 0xFFFF
_RING_DESC_SIZE = 16


class InflightLogError(VirtioDiskdError):
    """The log does not describe this queue (another layout, or damaged)."""


@dataclass(slots=True)
class LoggedChain:
    """A chain as the log holds it (``segments`` may be shortened: see ``count``)."""

    entry: int
    seq: int
    head: int
    desc_count: int
    count: int  # segments the chain really had
    segments: list[tuple[int, int, bool]]
    raw: bytes | None = None  # the ring descriptors as taken (taken_descriptors)


def region_size(queue_size: int, max_segments: int) -> int:
    """Bytes one queue's log takes."""
    return HEADER_SIZE + queue_size * _entry_stride(max_segments)


def _entry_stride(max_segments: int) -> int:
    return _ENTRY_FIXED + _SEGMENT_SIZE * max_segments


class InflightLog:
    """One queue's log over ``buffer`` (see the module docstring).

    ``max_segments`` segments are kept per chain; a longer chain (which the device
    fails as over its limits anyway) keeps its first ``max_segments - 1`` and its
    last, and its true count.
    """

    def __init__(self, buffer: memoryview, queue_size: int, max_segments: int) -> None:
        if max_segments < 2:
            raise ValueError("a chain needs room for a header and a status segment")
        if len(buffer) < region_size(queue_size, max_segments):
            raise ValueError("buffer too small for the log")
        self.buffer = buffer
        self.size = queue_size
        self.max_segments = max_segments
        self.stride = _entry_stride(max_segments)
        self._words = buffer[: region_size(queue_size, max_segments)].cast("I")
        self._cursor = buffer[_CURSOR_OFFSET : _CURSOR_OFFSET + 8].cast("Q")
        self._packers: dict[int, struct.Struct] = {}
        self._seq = 1

    # -- layout -------------------------------------------------------------------------

    def format(self, packed: bool) -> None:
        """Start empty (a queue was just enabled by the driver)."""
        end = region_size(self.size, self.max_segments)
        self.buffer[:end] = bytes(end)
        _HEADER.pack_into(self.buffer, 0, MAGIC, VERSION, int(packed), self.size,
                          self.max_segments)
        # a packed ring starts at slot 0 with wrap counter 1; a split one at used index 0
        self.cursor = self.packed_cursor(0, 1) if packed else 0
        self._seq = 1

    def check(self, packed: bool) -> None:
        """Raise unless the log was formatted for this very queue."""
        magic, version, is_packed, size, max_segments = _HEADER.unpack_from(self.buffer, 0)
        if (magic, version, bool(is_packed), size, max_segments) != (
                MAGIC, VERSION, packed, self.size, self.max_segments):
            raise InflightLogError("the in-flight log was written for another queue layout")

    # -- the cursor ---------------------------------------------------------------------

    @property
    def cursor(self) -> int:
        return int(self._cursor[0])

    @cursor.setter
    def cursor(self, value: int) -> None:
        self._cursor[0] = value  # one aligned 8-byte store

    @staticmethod
    def packed_cursor(position: int, wrap: int, pending: tuple[int, int] | None = None) -> int:
        """A packed ring's cursor: next used slot and wrap, and the buffer (id, ring
        slots) whose used element is being stored, if any."""
        value = position | (wrap << 15)
        if pending is not None:
            buffer_id, slots = pending
            value |= _PENDING | (buffer_id << 32) | (slots << 48)
        return value

    def publishing_packed(self, position: int, wrap: int, buffer_id: int, slots: int) -> None:
        """Name the buffer whose used element is about to be stored at ``position``:
        ``cursor = packed_cursor(position, wrap, (buffer_id, slots))`` in one call (the
        per-request path)."""
        self._cursor[0] = (position | (wrap << 15) | _PENDING | (buffer_id << 32)
                           | (slots << 48))

    def published_packed(self, entry: int, position: int, wrap: int) -> None:
        """The named buffer is on the ring: its entry is released and the cursor moves
        on to ``position`` with nothing pending (:meth:`released`, then the cursor)."""
        self._words[(HEADER_SIZE + entry * self.stride) >> 2] = 0
        self._cursor[0] = position | (wrap << 15)

    @staticmethod
    def unpack_cursor(value: int) -> tuple[int, int, tuple[int, int] | None]:
        pending = ((value >> 32) & 0xFFFF, (value >> 48) & 0xFFFF) if value & _PENDING else None
        return value & 0x7FFF, (value >> 15) & 1, pending

    # -- entries (hot path) -------------------------------------------------------------

    def taken(self, entry: int, head: int, desc_count: int,
              segments: list[tuple[int, int, bool]]) -> None:
        """Record a chain taken from the ring, in entry ``entry`` (< queue size)."""
        count = len(segments)
        if count > self.max_segments:
            segments = segments[: self.max_segments - 1] + segments[-1:]
        stored = len(segments)
        packer = self._packers.get(stored)
        if packer is None:
            packer = self._packers[stored] = struct.Struct("<HHHHI" + "QII" * stored)
        offset = HEADER_SIZE + entry * self.stride
        packer.pack_into(self.buffer, offset + 4, head, desc_count, count, stored, 0,
                         *[value for segment in segments for value in segment])
        seq = self._seq
        self._seq = seq + 1 if seq < 0xFFFFFFFF else 1
        self._words[offset >> 2] = seq  # the marker last: the entry is complete

    def taken_descriptors(self, entry: int, head: int, desc_count: int, ring: memoryview,
                          first: int, ring_size: int) -> bool:
        """Record a packed-ring chain by copying its ``desc_count`` descriptors from
        slot ``first`` of ``ring`` (one or two slice copies, the cheapest record); a
        successor parses them again (an indirect table stays the device's until used).
        False when they do not fit: the caller records the segments instead."""
        if desc_count > self.max_segments:  # (a chain never exceeds the ring)
            return False
        offset = HEADER_SIZE + entry * self.stride
        _ENTRY_HEAD.pack_into(self.buffer, offset + 4, head, desc_count, _RAW, desc_count)
        start = offset + _ENTRY_FIXED
        end = first + desc_count
        if end <= ring_size:
            self.buffer[start : start + _RING_DESC_SIZE * desc_count] = \
                ring[_RING_DESC_SIZE * first : _RING_DESC_SIZE * end]
        else:  # the chain wraps around the end of the ring
            split = _RING_DESC_SIZE * (ring_size - first)
            self.buffer[start : start + split] = ring[_RING_DESC_SIZE * first :]
            self.buffer[start + split : start + _RING_DESC_SIZE * desc_count] = \
                ring[: _RING_DESC_SIZE * (end - ring_size)]
        seq = self._seq
        self._seq = seq + 1 if seq < 0xFFFFFFFF else 1
        self._words[offset >> 2] = seq
        return True

    def taken_head(self, head: int) -> None:
        """Record split-ring head ``head`` taken, in entry ``head``: a split ring's
        descriptor table stays the device's until the chain is used, so a successor
        walks the chain again from its head (one store per request)."""
        seq = self._seq
        self._seq = seq + 1 if seq < 0xFFFFFFFF else 1
        self._words[(HEADER_SIZE + head * self.stride) >> 2] = seq

    def released(self, entry: int) -> None:
        """The chain in ``entry`` was published on the used ring."""
        self._words[(HEADER_SIZE + entry * self.stride) >> 2] = 0

    def release_head(self, head: int) -> None:
        """Clear whichever entry holds ``head`` (recovery of a published batch)."""
        for logged in self.entries():
            if logged.head == head:
                self.released(logged.entry)

    def entries(self) -> list[LoggedChain]:
        """The chains in flight, in the order they were taken."""
        found = []
        for entry in range(self.size):
            offset = HEADER_SIZE + entry * self.stride
            seq = self._words[offset >> 2]
            if not seq:
                continue
            head, desc_count, count, stored = _ENTRY_HEAD.unpack_from(self.buffer, offset + 4)
            if stored == 0 and count == 0:  # taken_head(): the chain is walked again
                found.append(LoggedChain(entry, seq, entry, 0, 0, []))
                continue
            if count == _RAW:  # taken_descriptors(): parsed again by the queue
                if not 1 <= stored <= self.max_segments or stored != desc_count:
                    raise InflightLogError(f"in-flight entry {entry} is damaged")
                start = offset + _ENTRY_FIXED
                found.append(LoggedChain(entry, seq, head, desc_count, 0, [], bytes(
                    self.buffer[start : start + _RING_DESC_SIZE * stored])))
                continue
            if stored > self.max_segments or stored > count or stored == 0:
                raise InflightLogError(f"in-flight entry {entry} is damaged")
            segments = [(addr, length, bool(writable)) for addr, length, writable in
                        struct.iter_unpack("<QII", self.buffer[offset + _ENTRY_FIXED:
                                                               offset + _ENTRY_FIXED
                                                               + _SEGMENT_SIZE * stored])]
            found.append(LoggedChain(entry, seq, head, desc_count, count, segments))
        found.sort(key=lambda logged: logged.seq)
        if found:
            self._seq = max(logged.seq for logged in found) % 0xFFFFFFFF + 1
        return found
