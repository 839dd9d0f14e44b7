"""virtio-blk (virtio 1.2 §5.2): features, configuration space and requests.

Sans-IO: :meth:`VirtioBlk.process_queue` turns available chains into
:class:`BlockRequest` objects — the I/O to perform, with buffers that are views
of guest memory — and completes at once what needs no disk (errors, GET_ID);
the disk engine executes the requests and hands them back to
:meth:`VirtioBlk.complete`, which writes each status byte, releases the guest
mappings *before* publishing the used entry (grant mappings must be gone by
then) and raises at most one interrupt per batch.

Features are offered only when the disk really supports them (peers broke
guests by advertising WRITE_ZEROES or DISCARD they could not honour).

Request layout is read as byte streams, not descriptor-per-field: the first
16 device-readable bytes are the header, the last device-writable byte is
the status, wherever the descriptors happen to split them (VERSION_1 implies
ANY_LAYOUT).
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Any

from virtio_diskd.backend.disk.request import DiskRequest, IoKind, IoStatus
from virtio_diskd.backend.disk.target import SECTOR, DiskInfo
from virtio_diskd.backend.guestmem import GuestMemory, GuestMemoryError, MappedRange
from virtio_diskd.backend.mmio import (
    F_ACCESS_PLATFORM,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_RING_PACKED,
    F_VERSION_1,
    STATUS_DRIVER_OK,
    DeviceReset,
    MmioEffect,
    MmioTransport,
    QueueDisabled,
    RaiseInterrupt,
)
from virtio_diskd.backend.virtqueue import Chain, RingError, Segment, Virtqueue

DEVICE_ID_BLOCK = 2

# Feature bits (§5.2.3).
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_GEOMETRY = 4
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_CONFIG_WCE = 11
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14
F_LIFETIME = 15
F_SECURE_ERASE = 16

# Request types (§5.2.6).
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_GET_LIFETIME = 10
T_DISCARD = 11
T_WRITE_ZEROES = 13
T_SECURE_ERASE = 14

S_OK = 0
S_IOERR = 1
S_UNSUPP = 2
#: The status byte the guest reads for each way a disk request can end (§5.2.6).
STATUS_BYTE = {IoStatus.OK: S_OK, IoStatus.IO_ERROR: S_IOERR, IoStatus.UNSUPPORTED: S_UNSUPP}

ID_BYTES = 20
WRITE_ZEROES_FLAG_UNMAP = 1
CONFIG_SIZE = 96
CONFIG_WRITEBACK_OFFSET = 32

_HEADER = struct.Struct("<IIQ")
_RANGE = struct.Struct("<QII")


@dataclass(frozen=True)
class BlkOptions:
    """Device choices that do not come from the disk."""

    serial: str = ""
    num_queues: int = 1
    queue_size: int = 256
    writeback: bool = True  # initial cache mode (CONFIG_WCE lets the driver change it)
    discard_enable: bool = True  # libxl's discard-enable node
    access_platform: bool = False  # grant mode: addresses are grant references
    packed_ring: bool = True
    event_idx: bool = True
    indirect: bool = True
    size_max: int = 1 << 20  # bytes in one buffer (descriptor) at most
    seg_max: int | None = None  # data buffers per request at most; None: queue_size - 2
    max_discard_seg: int = 32
    max_discard_sectors: int = (1 << 31) // SECTOR - 8
    # While a queue has at least this many requests in flight, guest kicks stay
    # suppressed and the avail ring is polled on every completion batch instead
    # (completions are certain to come); 0 turns polling off.
    poll_in_flight: int = 4


class BlockRequest(DiskRequest):
    """A virtio-blk request: the disk operation plus where it came from in the guest
    (queue, descriptor chain, mapped buffers, the status byte to write back)."""

    __slots__ = ("chain", "mappings", "queue", "queue_index", "status_view")

    def __init__(self, kind: IoKind, queue_index: int = 0, queue: Virtqueue | None = None,
                 chain: Chain | None = None) -> None:
        # DiskRequest's fields set here rather than through super().__init__: one is
        # built per guest request, and the second call was a tenth of the parse
        self.kind = kind
        self.offset = 0
        self.length = 0
        self.buffers: list[memoryview] = []
        self.ranges: list[tuple[int, int, bool]] = []
        self.durable = False
        self.status = IoStatus.OK
        self.written = 0
        self.cancelled = False
        self.queue_index = queue_index
        self.queue = queue
        self.chain = chain
        self.mappings: list[MappedRange] = []
        self.status_view: memoryview | None = None

    @property
    def sector(self) -> int:
        return self.offset // SECTOR


@dataclass
class BlkStats:
    requests: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    errors: int = 0
    unsupported: int = 0
    interrupts: int = 0
    notifications: int = 0
    over_limit: int = 0  # requests beyond size_max / seg_max, failed with IOERR
    internal_errors: int = 0  # requests failed by an error of the backend's (no memory …)


@dataclass(slots=True)
class QueueBatch:
    """What one queue notification produced."""

    requests: list[BlockRequest]
    effects: list[MmioEffect]


class _ChainError(Exception):
    """The chain has no usable status byte; the device needs a reset."""


class VirtioBlk:
    """A virtio-blk device on a virtio-mmio transport."""

    device_id = DEVICE_ID_BLOCK

    def __init__(self, disk: DiskInfo, memory: GuestMemory, options: BlkOptions | None = None,
                 *, legacy: bool = False) -> None:
        self.options = options or BlkOptions()
        if not 1 <= self.options.num_queues <= 64:
            raise ValueError("num_queues must be 1..64")
        self.disk = disk
        self.memory = memory
        self.num_queues = self.options.num_queues
        self.queue_size_max = self.options.queue_size
        #: seg_max as advertised: data buffers per request (header and status excluded)
        self.seg_max = self.options.seg_max or max(self.options.queue_size - 2, 1)
        self.writeback = self.options.writeback
        self.stats = BlkStats()
        #: Requests handed to the engine and not yet completed: what a reset or a
        #: disabled queue cancels, and what its held answer waits for.
        self._active: set[BlockRequest] = set()
        #: operator pause (``virtio-diskd ctl pause``): no request is taken from the
        #: rings — the guest's I/O waits in them, none fails — until it is cleared
        self.paused = False
        self.last_internal_error = ""
        self._config = b""
        self.transport = MmioTransport(self, memory, legacy=legacy)
        self._rebuild_config()

    # -- VirtioDevice ----------------------------------------------------------------

    def device_features(self) -> int:
        opts, disk = self.options, self.disk
        bits = [F_SEG_MAX, F_BLK_SIZE, F_FLUSH, F_TOPOLOGY, F_CONFIG_WCE, F_SIZE_MAX]
        if disk.read_only:
            bits.append(F_RO)
        if opts.num_queues > 1:
            bits.append(F_MQ)
        if not disk.read_only:
            if disk.can_discard and opts.discard_enable:
                bits.append(F_DISCARD)
            if disk.can_write_zeroes:
                bits.append(F_WRITE_ZEROES)
            if disk.can_secure_erase:
                bits.append(F_SECURE_ERASE)
        if opts.indirect:
            bits.append(F_INDIRECT_DESC)
        if opts.event_idx:
            bits.append(F_EVENT_IDX)
        bits.append(F_VERSION_1)
        if opts.access_platform:
            bits.append(F_ACCESS_PLATFORM)
        if opts.packed_ring:
            bits.append(F_RING_PACKED)
        features = 0
        for bit in bits:
            features |= 1 << bit
        return features

    def accept_features(self, features: int) -> bool:
        # Grant-mode addresses only make sense to a driver that accepted ACCESS_PLATFORM.
        return not (self.options.access_platform and not features >> F_ACCESS_PLATFORM & 1)

    def config_space(self) -> bytes:
        return self._config

    def config_write(self, offset: int, data: bytes) -> bool:
        if offset != CONFIG_WRITEBACK_OFFSET or len(data) != 1:
            return False
        if not self.transport.has_feature(F_CONFIG_WCE):
            return False
        self.writeback = data[0] != 0
        self._rebuild_config()
        return True

    def reset(self) -> None:
        self.writeback = self.options.writeback
        self._rebuild_config()

    def device_state(self) -> dict[str, Any]:
        return {"writeback": self.writeback}

    def restore_device_state(self, state: dict[str, Any]) -> None:
        self.writeback = bool(state.get("writeback", self.options.writeback))
        self._rebuild_config()

    def _rebuild_config(self) -> None:
        disk, opts = self.disk, self.options
        lbs = disk.logical_block_size
        exp = max(disk.physical_block_size // lbs, 1).bit_length() - 1
        discard_align = max(disk.physical_block_size // SECTOR, 1)
        config = bytearray(CONFIG_SIZE)
        struct.pack_into("<QII", config, 0, disk.capacity_bytes // SECTOR, opts.size_max,
                         self.seg_max)
        struct.pack_into("<I", config, 20, lbs)
        struct.pack_into("<BBHI", config, 24, exp, 0, 1, disk.opt_io_bytes // lbs)
        config[CONFIG_WRITEBACK_OFFSET] = 1 if self.writeback else 0
        struct.pack_into("<H", config, 34, opts.num_queues)
        struct.pack_into("<III", config, 36, opts.max_discard_sectors, opts.max_discard_seg,
                         discard_align)
        struct.pack_into("<IIB", config, 48, opts.max_discard_sectors, opts.max_discard_seg,
                         1 if disk.write_zeroes_may_unmap else 0)
        struct.pack_into("<III", config, 60, opts.max_discard_sectors, opts.max_discard_seg,
                         discard_align)
        self._config = bytes(config)

    # -- driver-facing ------------------------------------------------------------------

    def mmio_read(self, offset: int, size: int) -> int:
        return self.transport.read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> list[MmioEffect]:
        effects = self.transport.write(offset, size, value)
        for effect in effects:
            if isinstance(effect, DeviceReset):
                self.cancel()
            elif isinstance(effect, QueueDisabled):
                self.cancel(effect.queue)
        return effects

    def cancel(self, queue_index: int | None = None) -> int:
        """Cancel the in-flight requests (of one queue): their results are void, so the
        engine starts no more transfers for them.  Returns how many were cancelled."""
        count = 0
        for request in self._active:
            if queue_index is None or request.queue_index == queue_index:
                request.cancelled = True
                count += 1
        return count

    def pending(self, queue_index: int | None = None) -> int:
        """Requests the engine still holds (of one queue): guest memory in use."""
        if queue_index is None:
            return len(self._active)
        return sum(1 for request in self._active if request.queue_index == queue_index)

    def set_capacity(self, capacity_bytes: int) -> list[MmioEffect]:
        """The target grew or shrank: new config, config-change interrupt."""
        if capacity_bytes == self.disk.capacity_bytes:
            return []
        self.disk = dataclasses.replace(self.disk, capacity_bytes=capacity_bytes)
        self._rebuild_config()
        return self.transport.config_changed()

    def resume(self, record: dict[str, Any]) -> QueueBatch:
        """Take over from a killed predecessor: its register file (``record``, from
        ``transport.snapshot()``) and the requests its in-flight logs hold, which are
        parsed again and returned for execution (reads and writes may run twice; each
        is completed once).  One interrupt follows if the driver is live: whatever the
        predecessor published without signalling is seen.  Raises
        :class:`~virtio_diskd.backend.mmio.StateRecordError` for a record that is not
        this device's."""
        recovered = self.transport.restore(record)
        requests: list[BlockRequest] = []
        effects: list[MmioEffect] = []
        for index, chains in recovered.items():
            queue = self.transport.queues[index]
            if queue is None:
                continue
            taken: list[BlockRequest] = []
            done: list[BlockRequest] = []
            try:
                for chain in chains:
                    request = self._parse(index, queue, chain)
                    (done if request.queue is None else taken).append(request)
            except _ChainError as exc:
                for request in taken + done:
                    _release(request)
                effects += self.transport.needs_reset(f"queue {index}: {exc}")
                continue
            self._active.update(taken)
            requests += taken
            if done:
                effects += self._publish(index, queue, done)
        if self.transport.status & STATUS_DRIVER_OK:
            effects = [e for e in effects if not isinstance(e, RaiseInterrupt)]
            effects += self.transport.signal_used()
        return QueueBatch(requests, effects)

    def process_queue(self, index: int) -> QueueBatch:
        """Take every available request of queue ``index`` (one notification)."""
        transport = self.transport
        if index >= len(transport.queues):
            return QueueBatch([], [])
        queue = transport.queues[index]
        if queue is None or not transport.live or self.paused:
            return QueueBatch([], [])
        self.stats.notifications += 1
        return self._drain(index, queue)

    def _drain(self, index: int, queue: Virtqueue) -> QueueBatch:
        """Pop until the ring is empty with notifications re-armed, or keep polling."""
        requests: list[BlockRequest] = []
        done: list[BlockRequest] = []
        threshold = self.options.poll_in_flight
        queue.armed = False
        try:
            while True:
                queue.disable_notifications()
                for chain in queue.pop_all():
                    request = self._parse(index, queue, chain)
                    (done if request.queue is None else requests).append(request)
                if threshold and queue.in_flight - len(done) >= threshold:
                    break  # busy: completions will poll the ring, no kicks needed
                if not queue.enable_notifications():
                    queue.armed = True
                    break
        except (RingError, _ChainError) as exc:
            for request in requests + done:
                _release(request)
            return QueueBatch([], self.transport.needs_reset(f"queue {index}: {exc}"))
        self._active.update(requests)
        effects = self._publish(index, queue, done) if done else []
        return QueueBatch(requests, effects)

    def complete(self, requests: list[BlockRequest]) -> QueueBatch:
        """The engine finished ``requests``: status, unmap, used ring, one interrupt.

        Also polls each queue that had notifications suppressed, so the batch
        may carry new requests for the engine.
        """
        by_queue: dict[int, list[BlockRequest]] = {}
        self._active.difference_update(requests)
        for request in requests:
            queue = request.queue
            if queue is None or self.transport.queues[request.queue_index] is not queue:
                _release(request)  # the queue was reset or disabled meanwhile: void
                continue
            if request.status != IoStatus.OK:
                self.stats.errors += 1
            elif request.kind == IoKind.READ:
                self.stats.read_bytes += request.length
            elif request.kind == IoKind.WRITE:
                self.stats.written_bytes += request.length
            by_queue.setdefault(request.queue_index, []).append(request)
        effects: list[MmioEffect] = []
        new_requests: list[BlockRequest] = []
        for index, batch in by_queue.items():
            queue = self.transport.queues[index]
            assert queue is not None
            effects += self._publish(index, queue, batch)
            # a queue whose notifications are on needs no look: the driver kicks for
            # what it adds; one left with them off (busy) is polled here
            if not queue.armed and self.transport.live and not self.paused:
                polled = self._drain(index, queue)
                new_requests += polled.requests
                effects += polled.effects
        interrupt = [e for e in effects if isinstance(e, RaiseInterrupt)][:1]
        others = [e for e in effects if not isinstance(e, RaiseInterrupt)]
        # the SPI is shared by all queues: one edge covers the whole batch
        return QueueBatch(new_requests, others + interrupt)

    def _publish(self, index: int, queue: Virtqueue, batch: list[BlockRequest]) -> list[MmioEffect]:
        used: list[tuple[Chain, int]] = []
        for request in batch:
            has_status = request.status_view is not None
            if request.status_view is not None:
                request.status_view[0] = STATUS_BYTE[request.status]
            _release(request)  # before the used entry: grant mappings must be gone by then
            assert request.chain is not None
            used.append((request.chain, request.written + has_status))
        queue.push_used(used)
        if self.transport.live and queue.needs_interrupt():
            self.stats.interrupts += 1
            return self.transport.signal_used()
        return []

    # -- parsing ----------------------------------------------------------------------

    def _parse(self, index: int, queue: Virtqueue, chain: Chain) -> BlockRequest:
        """Build the request for ``chain``; finished ones come back with ``queue=None``."""
        self.stats.requests += 1
        request = BlockRequest(IoKind.FLUSH, index, queue, chain)
        segments = chain.segments
        # Status: the last byte of the chain, which must be device-writable.
        end = len(segments)
        while end and segments[end - 1][1] == 0:
            end -= 1
        if not end or not segments[end - 1][2]:
            raise _ChainError("request without a device-writable status byte")
        s_addr, s_len, _ = segments[end - 1]
        try:
            mapped = self.memory.map(s_addr + s_len - 1, 1, True)
        except GuestMemoryError as exc:
            raise _ChainError(f"status byte cannot be mapped: {exc}") from exc
        request.mappings.append(mapped)
        request.status_view = mapped.views[0]
        # The limits the device advertises (§5.2.4 size_max, seg_max), counted after
        # indirect expansion; a request beyond them fails alone, before anything of it
        # is mapped (§5.2.6.1: the device MAY fail it).
        if end > self.seg_max + 2:
            self.stats.over_limit += 1
            return self._finish(request, IoStatus.IO_ERROR)
        size_max = self.options.size_max
        for _addr, seg_len, _writable in segments:
            if seg_len > size_max:
                self.stats.over_limit += 1
                return self._finish(request, IoStatus.IO_ERROR)
        try:
            if end == 3 and s_len == 1:
                h_addr, h_len, h_writable = segments[0]
                if h_len == 16 and not h_writable:
                    # Linux's layout for one data buffer (every 4 KiB request): the
                    # same checks as _parse_body and _read_write, without their calls
                    rtype, _ioprio, sector = _HEADER.unpack(self.memory.read(h_addr, 16))
                    d_addr, d_len, d_writable = segments[1]
                    if d_len and ((rtype == T_IN and d_writable) or (
                            rtype == T_OUT and not d_writable and not self.disk.read_only)):
                        offset = sector * SECTOR
                        if d_len % SECTOR or offset + d_len > self.disk.capacity_bytes:
                            return self._finish(request, IoStatus.IO_ERROR)
                        request.offset = offset
                        request.length = d_len
                        request.kind = IoKind.READ if d_writable else IoKind.WRITE
                        mapped = self.memory.map(d_addr, d_len, d_writable)
                        request.mappings.append(mapped)
                        request.buffers = mapped.views
                        if d_writable:
                            request.written = d_len
                        else:
                            request.durable = not self.writeback
                        return request
            return self._parse_body(request, segments, end)
        except GuestMemoryError:
            return self._finish(request, IoStatus.IO_ERROR)
        except Exception as exc:
            # whatever the guest asked for — running out of memory included — and
            # whatever went wrong here, it fails this request only; the owner logs it
            self.stats.internal_errors += 1
            self.last_internal_error = f"{type(exc).__name__}: {exc}"
            return self._finish(request, IoStatus.IO_ERROR)

    def _parse_body(self, request: BlockRequest, segments: list[Segment],
                    end: int) -> BlockRequest:
        s_addr, s_len, _ = segments[end - 1]
        h_addr, h_len, h_writable = segments[0]
        if h_len == 16 and not h_writable and end >= 2:
            # Linux's layout: a 16-byte header element, data elements, a status element.
            data = list(segments[1 : end - 1])
            if s_len > 1:
                data.append((s_addr, s_len - 1, True))
            header = self.memory.read(h_addr, 16)
        else:
            # Any other split of the same byte streams (VERSION_1 implies ANY_LAYOUT).
            first_writable = next((i for i, seg in enumerate(segments) if seg[2]), end)
            readable = list(segments[:first_writable])
            data = list(segments[first_writable : end - 1])
            if s_len > 1:
                data.append((s_addr, s_len - 1, True))
            header = self._gather(readable, 0, 16)
            if len(header) < 16:
                return self._finish(request, IoStatus.IO_ERROR)
            # the data stream: readable bytes after the header, then writable bytes before
            # the status; a direction that does not fit the request type is refused below
            data = _skip(readable, 16) + data
        rtype, _ioprio, sector = _HEADER.unpack(header)
        if rtype == T_IN:
            return self._read_write(request, IoKind.READ, sector, data, device_writes=True)
        if rtype == T_OUT:
            if self.disk.read_only:
                return self._finish(request, IoStatus.IO_ERROR)
            return self._read_write(request, IoKind.WRITE, sector, data, device_writes=False)
        if rtype == T_FLUSH:
            request.kind = IoKind.FLUSH
            return request
        if rtype == T_GET_ID:
            return self._get_id(request, data)
        if rtype in (T_DISCARD, T_WRITE_ZEROES, T_SECURE_ERASE):
            return self._ranges(request, rtype, data)
        self.stats.unsupported += 1
        return self._finish(request, IoStatus.UNSUPPORTED)

    def _finish(self, request: BlockRequest, status: IoStatus) -> BlockRequest:
        if status != IoStatus.OK:
            self.stats.errors += status == IoStatus.IO_ERROR
        request.status = status
        request.queue = None
        for mapped in request.mappings[1:]:
            mapped.release()
        del request.mappings[1:]
        request.buffers = []
        return request

    def _gather(self, segments: list[Segment], skip: int, count: int) -> bytes:
        """Copy ``count`` bytes of the stream ``segments`` starting at ``skip``."""
        out = bytearray()
        for addr, length, _writable in _skip(segments, skip):
            take = min(length, count - len(out))
            if take <= 0:
                break
            out += self.memory.read(addr, take)
        return bytes(out)

    def _map_stream(self, request: BlockRequest, segments: list[Segment], writable: bool,
                    ) -> list[memoryview]:
        """Map the elements, merging runs that are contiguous in the guest's address space
        (a 1 MiB request is often 256 page-sized elements back to back): fewer mappings,
        fewer iovecs.  For grant addresses contiguous means consecutive refs, which is how
        Linux grants a multi-page buffer."""
        views: list[memoryview] = []
        run_addr, run_length = 0, 0
        for addr, length, _direction in segments:
            if length == 0:
                continue
            if run_length and run_addr + run_length == addr:
                run_length += length
                continue
            if run_length:
                views += self._map_run(request, run_addr, run_length, writable)
            run_addr, run_length = addr, length
        if run_length:
            views += self._map_run(request, run_addr, run_length, writable)
        return views

    def _map_run(self, request: BlockRequest, addr: int, length: int,
                 writable: bool) -> list[memoryview]:
        mapped = self.memory.map(addr, length, writable)
        request.mappings.append(mapped)
        return mapped.views

    def _read_write(self, request: BlockRequest, kind: IoKind, sector: int,
                    data: list[Segment], *, device_writes: bool) -> BlockRequest:
        length = 0
        for _addr, seg_len, writable in data:
            if seg_len and writable is not device_writes:
                # a data element in the wrong direction (an empty one carries no bytes:
                # the byte streams are what count, whatever the layout)
                return self._finish(request, IoStatus.IO_ERROR)
            length += seg_len
        if length % SECTOR:
            return self._finish(request, IoStatus.IO_ERROR)  # partial sector
        offset = sector * SECTOR
        if offset + length > self.disk.capacity_bytes:
            return self._finish(request, IoStatus.IO_ERROR)
        if length == 0:
            return self._finish(request, IoStatus.OK)
        request.kind = kind
        request.offset = offset
        request.length = length
        request.buffers = self._map_stream(request, data, writable=device_writes)
        if device_writes:
            request.written = length
        else:
            request.durable = not self.writeback
        return request

    def _get_id(self, request: BlockRequest, data: list[Segment]) -> BlockRequest:
        if any(length and not writable for _a, length, writable in data):
            return self._finish(request, IoStatus.IO_ERROR)
        serial = self.options.serial.encode("ascii", "replace")[:ID_BYTES].ljust(ID_BYTES, b"\0")
        # only the first ID_BYTES of the buffer are ever written: map no more than that
        views = self._map_stream(request, _head(data, ID_BYTES), writable=True)
        written = 0
        for view in views:
            take = min(len(view), ID_BYTES - written)
            view[:take] = serial[written : written + take]
            written += take
        request.written = written
        return self._finish(request, IoStatus.OK)

    def _ranges(self, request: BlockRequest, rtype: int, data: list[Segment]) -> BlockRequest:
        feature, kind = {
            T_DISCARD: (F_DISCARD, IoKind.DISCARD),
            T_WRITE_ZEROES: (F_WRITE_ZEROES, IoKind.WRITE_ZEROES),
            T_SECURE_ERASE: (F_SECURE_ERASE, IoKind.SECURE_ERASE),
        }[rtype]
        if not self.transport.has_feature(feature):
            self.stats.unsupported += 1
            return self._finish(request, IoStatus.UNSUPPORTED)
        if self.disk.read_only:
            return self._finish(request, IoStatus.IO_ERROR)
        if any(length and writable for _a, length, writable in data):
            return self._finish(request, IoStatus.IO_ERROR)
        length = _stream_length(data)
        opts = self.options
        if length == 0 or length % 16 or length // 16 > opts.max_discard_seg:
            return self._finish(request, IoStatus.IO_ERROR)
        raw = self._gather(data, 0, length)
        ranges: list[tuple[int, int, bool]] = []
        for sector, num_sectors, flags in _RANGE.iter_unpack(raw):
            unmap = bool(flags & WRITE_ZEROES_FLAG_UNMAP)
            if flags & ~WRITE_ZEROES_FLAG_UNMAP or (unmap and rtype != T_WRITE_ZEROES):
                self.stats.unsupported += 1
                return self._finish(request, IoStatus.UNSUPPORTED)
            if num_sectors > opts.max_discard_sectors:
                return self._finish(request, IoStatus.IO_ERROR)
            offset, size = sector * SECTOR, num_sectors * SECTOR
            if offset + size > self.disk.capacity_bytes:
                return self._finish(request, IoStatus.IO_ERROR)
            ranges.append((offset, size, unmap))
        request.kind = kind
        request.ranges = ranges
        return request


def _stream_length(segments: list[Segment]) -> int:
    return sum(length for _addr, length, _writable in segments)


def _skip(segments: list[Segment], count: int) -> list[Segment]:
    """The stream ``segments`` without its first ``count`` bytes."""
    out: list[Segment] = []
    for addr, length, writable in segments:
        if count >= length:
            count -= length
            continue
        out.append((addr + count, length - count, writable))
        count = 0
    return out


def _head(segments: list[Segment], count: int) -> list[Segment]:
    """The first ``count`` bytes of the stream ``segments``."""
    out: list[Segment] = []
    for addr, length, writable in segments:
        if count <= 0:
            break
        out.append((addr, min(length, count), writable))
        count -= length
    return out


def _release(request: BlockRequest) -> None:
    for mapped in request.mappings:
        mapped.release()
    request.mappings = []
    request.buffers = []
    request.status_view = None
