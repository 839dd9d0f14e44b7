"""A guest virtio-blk driver that behaves like Linux's virtio_mmio + virtio_blk.

It drives a device only through MMIO register accesses (an :class:`MmioBus`:
in-process for unit tests, trapped vCPU accesses on the simulated host) and
guest RAM, exactly as Linux does:

* probe: magic, version 2 (or 1, legacy), device id 2; reset; ACKNOWLEDGE,
  DRIVER; feature negotiation (VERSION_1, ACCESS_PLATFORM when grants are on,
  EVENT_IDX, INDIRECT_DESC, RING_PACKED when offered, the virtio-blk
  features); FEATURES_OK written and read back; per-queue set-up (QueueSel,
  QueueReady must read 0, QueueNumMax, QueueNum, ring addresses, QueueReady);
  DRIVER_OK;
* requests: header (device-readable), data (readable for OUT, writable for
  IN), status (writable); an indirect table when more than one element and the
  feature is on; the avail ring (split) or descriptor flags with wrap
  counters (packed); a kick only when the device asks for one (EVENT_IDX /
  NO_NOTIFY / event suppression);
* completions from the used ring after an interrupt (InterruptStatus, then
  InterruptACK), re-enabling callbacks with used_event and re-checking;
* grant mode: every buffer is granted (consecutive refs, read-only when the
  device only reads it) and addressed as ``1<<63 | ref<<12 | offset``; the
  grants are revoked after completion, and a grant still mapped by the backend
  marks the device broken, as Linux's grant-DMA layer does.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from virtio_diskd.ioreq.sim import virtio_spec as spec
from virtio_diskd.ioreq.sim.virtio_spec import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    USED_F_NO_NOTIFY,
    vring_need_event,
)

PAGE = 4096
GUEST_RAM_BASE = 0x40000000


class MmioBus(Protocol):
    """Register accesses to one device's MMIO window."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class DmaMapper(Protocol):
    """How buffers are addressed to the device: physical, or grant references."""

    def map(self, phys: int, length: int, device_writable: bool) -> int: ...

    def unmap(self, dma: int, length: int) -> None:
        """Stop sharing; raises :class:`DeviceBroken` if the backend still holds it."""
        ...


class DriverError(Exception):
    """The device failed a step of the probe, as Linux would report it."""


class DeviceBroken(DriverError):
    """The device is unusable (NEEDS_RESET seen, or a grant still in use)."""


class IdentityDma:
    """Foreign-mapping mode: the device sees guest-physical addresses."""

    def map(self, phys: int, length: int, device_writable: bool) -> int:
        return phys

    def unmap(self, dma: int, length: int) -> None:
        return None


class GuestRam:
    """Guest RAM (a buffer at ``base``) with a page allocator for the driver."""

    def __init__(self, buffer: bytearray | memoryview, base: int = GUEST_RAM_BASE) -> None:
        self.mem = memoryview(buffer).cast("B")
        self.base = base
        self.size = len(self.mem)
        self._next = 0
        self._free: dict[int, list[int]] = {}
        self._lock = threading.Lock()

    def alloc(self, length: int, align: int = PAGE) -> int:
        """Allocate ``length`` bytes; returns the guest-physical address."""
        pages = max((length + PAGE - 1) // PAGE, 1)
        with self._lock:
            free = self._free.get(pages)
            if free:
                return free.pop()
            start = (self._next + align - 1) // align * align
            if start + pages * PAGE > self.size:
                raise MemoryError("guest RAM exhausted")
            self._next = start + pages * PAGE
        return self.base + start

    def free(self, addr: int, length: int) -> None:
        pages = max((length + PAGE - 1) // PAGE, 1)
        with self._lock:
            self._free.setdefault(pages, []).append(addr)

    def view(self, addr: int, length: int) -> memoryview:
        start = addr - self.base
        return self.mem[start : start + length]


def element_size(data_len: int, seg_max: int, size_max: int, start: int = PAGE) -> int:
    """The element size a request of ``data_len`` bytes is built from: grown (in pages,
    as Linux merges contiguous pages) from ``start`` until the data fits in seg_max
    elements of at most size_max bytes; :class:`DriverError` if it cannot."""
    segment = start
    while -(-data_len // segment) + 1 > seg_max and segment < size_max:
        segment = min(segment * 2, size_max)
    if -(-data_len // segment) + 1 > seg_max:
        raise DriverError(f"{data_len} bytes exceed the device's limits "
                          f"(seg_max {seg_max}, size_max {size_max})")
    return segment


@dataclass(slots=True, eq=False)
class Request:
    """One block request as the guest submits it."""

    type: int
    sector: int = 0
    data_addr: int = 0  # guest-physical address of the data buffer
    data_len: int = 0
    segment_size: int = PAGE  # scatter-gather element size (split at page boundaries)
    # filled in by the driver
    status: int | None = None
    used_len: int = 0
    on_complete: Callable[[Request], None] | None = None
    _buffer_id: int = -1
    _allocs: list[tuple[int, int]] = field(default_factory=list)
    _dma: list[tuple[int, int]] = field(default_factory=list)
    _ndesc: int = 0
    _status_phys: int = 0


class _Queue:
    """Driver-side state of one virtqueue (split or packed)."""

    def __init__(self, index: int, size: int, packed: bool) -> None:
        self.index = index
        self.size = size
        self.packed = packed
        self.in_flight: dict[int, Request] = {}
        self.free_ids = list(range(size))
        self.num_free = size
        # split
        self.desc = self.avail = self.used = 0
        self.avail_idx = 0
        self.last_used = 0
        self.free_head = 0
        # packed
        self.next_avail = 0
        self.avail_wrap = 1
        self.last_used_pos = 0
        self.used_wrap = 1
        self.driver_area = self.device_area = 0


class VirtioBlkDriver:
    """The guest side of one virtio-blk device (see the module docstring)."""

    WANTED = (1 << spec.BLK_F_SEG_MAX | 1 << spec.BLK_F_SIZE_MAX | 1 << spec.BLK_F_BLK_SIZE
              | 1 << spec.BLK_F_FLUSH | 1 << spec.BLK_F_TOPOLOGY | 1 << spec.BLK_F_CONFIG_WCE
              | 1 << spec.BLK_F_MQ | 1 << spec.BLK_F_RO | 1 << spec.BLK_F_DISCARD
              | 1 << spec.BLK_F_WRITE_ZEROES | 1 << spec.BLK_F_SECURE_ERASE
              | 1 << spec.F_VERSION_1)

    def __init__(self, bus: MmioBus, ram: GuestRam, dma: DmaMapper | None = None, *,
                 grants: bool = False, packed: bool = True, event_idx: bool = True,
                 indirect: bool = True, max_queues: int = 8, queue_size: int = 256,
                 accept_platform: bool = False) -> None:
        self.bus = bus
        self.ram = ram
        self.dma = dma or IdentityDma()
        self.grants = grants
        #: a kernel without CONFIG_XEN_VIRTIO on a grant disk: Linux's transport keeps
        #: VIRTIO_F_ACCESS_PLATFORM when offered, but with no grant DMA ops its
        #: addresses are guest-physical (seen on real Xen with Debian's kernels)
        self.accept_platform = accept_platform
        self.want_packed = packed
        self.want_event_idx = event_idx
        self.want_indirect = indirect
        self.max_queues = max_queues
        self.queue_size = queue_size
        self.legacy = False
        self.features = 0
        self.queues: list[_Queue] = []
        self.capacity_sectors = 0
        self.size_max = 1 << 32
        self.seg_max = 1 << 16
        self.read_only = False
        self.broken: str | None = None
        self.bad_ring: list[str] = []  # completions of buffers not in flight
        self.config_changes = 0
        self.interrupts = 0
        self.kicks = 0
        self._lock = threading.RLock()
        self._ring_phys: dict[int, int] = {}  # ring dma address -> guest-physical

    # -- probe ----------------------------------------------------------------------

    def r32(self, offset: int) -> int:
        return self.bus.read(offset, 4)

    def w32(self, offset: int, value: int) -> None:
        self.bus.write(offset, 4, value)

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def probe(self) -> None:
        """virtio_mmio_probe + virtio_dev_probe + virtblk_probe."""
        if self.r32(spec.REG_MAGIC) != spec.MAGIC_VALUE:
            raise DriverError("wrong magic value")
        version = self.r32(spec.REG_VERSION)
        if version not in (1, 2):
            raise DriverError(f"version {version} not supported")
        self.legacy = version == 1
        if self.r32(spec.REG_DEVICE_ID) != spec.DEVICE_ID_BLOCK:
            raise DriverError("not a block device")
        self.w32(spec.REG_STATUS, 0)  # reset
        self._add_status(spec.STATUS_ACKNOWLEDGE)
        self._add_status(spec.STATUS_DRIVER)
        offered = 0
        for sel in (0, 1):
            self.w32(spec.REG_DEVICE_FEATURES_SEL, sel)
            offered |= self.r32(spec.REG_DEVICE_FEATURES) << (32 * sel)
        wanted = self.WANTED
        if self.want_event_idx:
            wanted |= 1 << spec.F_EVENT_IDX
        if self.want_indirect:
            wanted |= 1 << spec.F_INDIRECT_DESC
        if self.want_packed:
            wanted |= 1 << spec.F_RING_PACKED
        if self.grants:
            if not offered >> spec.F_ACCESS_PLATFORM & 1 or not offered >> spec.F_VERSION_1 & 1:
                raise DriverError("device must provide VIRTIO_F_ACCESS_PLATFORM")
            wanted |= 1 << spec.F_ACCESS_PLATFORM
        elif self.accept_platform:
            wanted |= 1 << spec.F_ACCESS_PLATFORM
        self.features = offered & wanted
        if self.legacy:
            self.features &= 0xFFFFFFFF
        for sel in (0, 1):
            self.w32(spec.REG_DRIVER_FEATURES_SEL, sel)
            self.w32(spec.REG_DRIVER_FEATURES, (self.features >> (32 * sel)) & 0xFFFFFFFF)
        if not self.legacy:
            if not self.has(spec.F_VERSION_1):
                raise DriverError("device does not offer VIRTIO_F_VERSION_1")
            self._add_status(spec.STATUS_FEATURES_OK)
            if not self.r32(spec.REG_STATUS) & spec.STATUS_FEATURES_OK:
                self._add_status(spec.STATUS_FAILED)
                raise DriverError("device did not accept the features (FEATURES_OK clear)")
        num_queues = 1
        if self.has(spec.BLK_F_MQ):
            num_queues = max(1, min(self.config(34, 2), self.max_queues))
        self.read_config()
        self.queues = [self._setup_queue(i) for i in range(num_queues)]
        self._add_status(spec.STATUS_DRIVER_OK)

    def _add_status(self, bit: int) -> None:
        self.w32(spec.REG_STATUS, self.r32(spec.REG_STATUS) | bit)

    def config(self, offset: int, size: int) -> int:
        if self.legacy or size <= 4:
            if size == 8:
                low = self.bus.read(spec.CONFIG_OFFSET + offset, 4)
                high = self.bus.read(spec.CONFIG_OFFSET + offset + 4, 4)
                return low | high << 32
            return self.bus.read(spec.CONFIG_OFFSET + offset, size)
        # 64-bit fields: two 32-bit reads, retried until ConfigGeneration is stable
        while True:
            gen = self.r32(spec.REG_CONFIG_GENERATION)
            low = self.bus.read(spec.CONFIG_OFFSET + offset, 4)
            high = self.bus.read(spec.CONFIG_OFFSET + offset + 4, 4)
            if self.r32(spec.REG_CONFIG_GENERATION) == gen:
                return low | high << 32

    def read_config(self) -> None:
        self.capacity_sectors = self.config(0, 8)
        self.read_only = self.has(spec.BLK_F_RO)
        # Linux's block layer never builds a request beyond these (max_segments,
        # max_segment_size); without the features it assumes no limit
        self.size_max = self.config(8, 4) if self.has(spec.BLK_F_SIZE_MAX) else 1 << 32
        self.seg_max = self.config(12, 4) if self.has(spec.BLK_F_SEG_MAX) else 1 << 16

    def set_writeback(self, enabled: bool) -> None:
        """Write the writeback byte (CONFIG_WCE), as `echo ... > cache_type` does."""
        self.bus.write(spec.CONFIG_OFFSET + spec.BLK_CONFIG_WRITEBACK_OFFSET, 1,
                       1 if enabled else 0)

    def _setup_queue(self, index: int) -> _Queue:
        self.w32(spec.REG_QUEUE_SEL, index)
        ready_reg = spec.REG_QUEUE_PFN if self.legacy else spec.REG_QUEUE_READY
        if self.r32(ready_reg):
            raise DriverError(f"queue {index} already set up")
        num_max = self.r32(spec.REG_QUEUE_NUM_MAX)
        if num_max == 0:
            raise DriverError(f"queue {index} not available")
        size = min(num_max, self.queue_size)
        packed = self.has(spec.F_RING_PACKED)
        queue = _Queue(index, size, packed)
        self.w32(spec.REG_QUEUE_NUM, size)
        if packed:
            queue.desc = self._alloc_ring(16 * size)
            queue.driver_area = self._alloc_ring(4)
            queue.device_area = self._alloc_ring(4)
            self._write_queue_addrs(queue.desc, queue.driver_area, queue.device_area)
        elif self.legacy:
            avail_end = 16 * size + 6 + 2 * size
            total = (avail_end + PAGE - 1) // PAGE * PAGE + 6 + 8 * size
            queue.desc = self.ram.alloc(total)
            self.ram.view(queue.desc, total)[:] = bytes(total)
            queue.avail = queue.desc + 16 * size
            queue.used = queue.desc + (avail_end + PAGE - 1) // PAGE * PAGE
            self.w32(spec.REG_GUEST_PAGE_SIZE, PAGE)
            self.w32(spec.REG_QUEUE_ALIGN, PAGE)
            self.w32(spec.REG_QUEUE_PFN, queue.desc // PAGE)
        else:
            queue.desc = self._alloc_ring(16 * size)
            queue.avail = self._alloc_ring(6 + 2 * size)
            queue.used = self._alloc_ring(6 + 8 * size)
            self._write_queue_addrs(queue.desc, queue.avail, queue.used)
        if not packed:
            for i in range(size - 1):  # free list through `next`
                struct.pack_into("<H", self._desc_view(queue, i), 14, i + 1)
        if not self.legacy:
            self.w32(spec.REG_QUEUE_READY, 1)
        return queue

    def _alloc_ring(self, length: int) -> int:
        phys = self.ram.alloc(length)
        self.ram.view(phys, length)[:] = bytes(length)
        return self._ring_dma(phys, length)

    def _ring_dma(self, phys: int, length: int) -> int:
        dma = self.dma.map(phys, length, True)
        self._ring_phys[dma] = phys
        return dma

    def _phys(self, dma: int) -> int:
        return self._ring_phys.get(dma, dma)

    def _write_queue_addrs(self, desc: int, driver: int, device: int) -> None:
        for reg, addr in ((spec.REG_QUEUE_DESC_LOW, desc), (spec.REG_QUEUE_DRIVER_LOW, driver),
                          (spec.REG_QUEUE_DEVICE_LOW, device)):
            self.w32(reg, addr & 0xFFFFFFFF)
            self.w32(reg + 4, addr >> 32)

    def _desc_view(self, queue: _Queue, index: int) -> memoryview:
        return self.ram.view(self._phys(queue.desc) + 16 * index, 16)

    # -- submission ---------------------------------------------------------------------

    def _segment_size(self, request: Request) -> int:
        return element_size(request.data_len, self.seg_max, self.size_max,
                            request.segment_size)

    def _elements(self, request: Request) -> list[tuple[int, int, bool]]:
        """(dma address, length, device-writable) for header, data and status."""
        header_phys = self.ram.alloc(16 + 1)
        request._allocs.append((header_phys, 17))
        struct.pack_into("<IIQ", self.ram.view(header_phys, 16), 0, request.type, 0,
                         request.sector)
        self.ram.view(header_phys + 16, 1)[0] = 0xFF  # status, overwritten by the device
        request._status_phys = header_phys + 16
        elements = [(header_phys, 16, False)]
        data_writable = request.type in (spec.BLK_T_IN, spec.BLK_T_GET_ID)
        pos, end = request.data_addr, request.data_addr + request.data_len
        segment = self._segment_size(request)
        while pos < end:
            step = min(segment - (pos % segment), end - pos)
            elements.append((pos, step, data_writable))
            pos += step
        elements.append((header_phys + 16, 1, True))
        out = []
        for phys, length, writable in elements:
            dma = self.dma.map(phys, length, writable)
            request._dma.append((dma, length))
            out.append((dma, length, writable))
        return out

    def submit(self, queue_index: int, requests: list[Request]) -> int:
        """Add requests to a queue and kick once if the device wants it; returns how many."""
        with self._lock:
            if self.broken:
                raise DeviceBroken(self.broken)
            queue = self.queues[queue_index]
            added = 0
            old_avail = queue.avail_idx if not queue.packed else queue.next_avail
            old_wrap = queue.avail_wrap
            for request in requests:
                elements = self._elements(request)
                use_indirect = self.has(spec.F_INDIRECT_DESC) and len(elements) > 1
                needed = 1 if use_indirect else len(elements)
                if needed > queue.num_free or (queue.packed and not queue.free_ids):
                    self._unmap(request)
                    break
                if queue.packed:
                    self._add_packed(queue, request, elements, use_indirect)
                else:
                    self._add_split(queue, request, elements, use_indirect)
                added += 1
            if added and self._kick_needed(queue, old_avail, old_wrap, added):
                self.kicks += 1
                self.w32(spec.REG_QUEUE_NOTIFY, queue.index)
            return added

    def _indirect_table(self, request: Request, elements: list[tuple[int, int, bool]],
                        packed: bool) -> tuple[int, int]:
        length = 16 * len(elements)
        phys = self.ram.alloc(length)
        request._allocs.append((phys, length))
        table = self.ram.view(phys, length)
        for i, (addr, size, writable) in enumerate(elements):
            flags = DESC_F_WRITE if writable else 0
            if packed:
                struct.pack_into("<QIHH", table, 16 * i, addr, size, 0, flags)
            else:
                if i + 1 < len(elements):
                    flags |= DESC_F_NEXT
                struct.pack_into("<QIHH", table, 16 * i, addr, size, flags, i + 1)
        dma = self.dma.map(phys, length, False)
        request._dma.append((dma, length))
        return dma, length

    def _add_split(self, queue: _Queue, request: Request, elements: list[tuple[int, int, bool]],
                   indirect: bool) -> None:
        if indirect:
            addr, length = self._indirect_table(request, elements, packed=False)
            elements = [(addr, length, False)]
        head = queue.free_head
        index = head
        for i, (addr, length, writable) in enumerate(elements):
            desc = self._desc_view(queue, index)
            nxt = struct.unpack_from("<H", desc, 14)[0]
            flags = (DESC_F_WRITE if writable else 0) | (DESC_F_INDIRECT if indirect else 0)
            if i + 1 < len(elements):
                flags |= DESC_F_NEXT
                struct.pack_into("<QIH", desc, 0, addr, length, flags)
                index = nxt
            else:
                struct.pack_into("<QIH", desc, 0, addr, length, flags)
                queue.free_head = nxt
        queue.num_free -= len(elements)
        request._ndesc = len(elements)
        request._buffer_id = head
        queue.in_flight[head] = request
        avail = self.ram.view(self._phys(queue.avail), 6 + 2 * queue.size)
        struct.pack_into("<H", avail, 4 + 2 * (queue.avail_idx % queue.size), head)
        queue.avail_idx = (queue.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", avail, 2, queue.avail_idx)  # after the entry (x86/TSO order)

    def _add_packed(self, queue: _Queue, request: Request, elements: list[tuple[int, int, bool]],
                    indirect: bool) -> None:
        buffer_id = queue.free_ids.pop()
        if indirect:
            addr, length = self._indirect_table(request, elements, packed=True)
            elements = [(addr, length, False)]
        ring = self.ram.view(self._phys(queue.desc), 16 * queue.size)
        first = queue.next_avail
        first_flags = 0
        for i, (addr, length, writable) in enumerate(elements):
            flags = (DESC_F_WRITE if writable else 0) | (DESC_F_INDIRECT if indirect else 0)
            if i + 1 < len(elements):
                flags |= DESC_F_NEXT
            if queue.avail_wrap:
                flags |= PACKED_DESC_F_AVAIL
            else:
                flags |= PACKED_DESC_F_USED
            pos = queue.next_avail
            struct.pack_into("<QIH", ring, 16 * pos, addr, length, buffer_id)
            if pos == first:
                first_flags = flags  # published last, so the list is never seen half-written
            else:
                struct.pack_into("<H", ring, 16 * pos + 14, flags)
            queue.next_avail += 1
            if queue.next_avail == queue.size:
                queue.next_avail = 0
                queue.avail_wrap ^= 1
        struct.pack_into("<H", ring, 16 * first + 14, first_flags)
        queue.num_free -= len(elements)
        request._ndesc = len(elements)
        request._buffer_id = buffer_id
        queue.in_flight[buffer_id] = request

    def _kick_needed(self, queue: _Queue, old: int, old_wrap: int, added: int) -> bool:
        if queue.packed:
            event = self.ram.view(self._phys(queue.device_area), 4)
            off_wrap, flags = (int(x) for x in struct.unpack("<HH", event))
            if flags == RING_EVENT_FLAGS_DESC and self.has(spec.F_EVENT_IDX):
                new = queue.next_avail
                # as Linux: old = new - descriptors added (not the old ring position,
                # which a whole ring's worth of additions brings back to the same slot)
                added_descs = (new - old) % queue.size
                if added_descs == 0 and (added and (queue.avail_wrap != old_wrap)):
                    added_descs = queue.size
                off = off_wrap & 0x7FFF
                if (off_wrap >> 15) != queue.avail_wrap:
                    off -= queue.size
                return vring_need_event(off & 0xFFFF, new, (new - added_descs) & 0xFFFF)
            return flags != RING_EVENT_FLAGS_DISABLE
        used = self.ram.view(self._phys(queue.used), 6 + 8 * queue.size)
        if self.has(spec.F_EVENT_IDX):
            avail_event = struct.unpack_from("<H", used, 4 + 8 * queue.size)[0]
            return vring_need_event(avail_event, queue.avail_idx, old)
        return not struct.unpack_from("<H", used, 0)[0] & USED_F_NO_NOTIFY

    # -- completion ----------------------------------------------------------------------

    def interrupt(self) -> list[Request]:
        """vm_interrupt: read and ack InterruptStatus, then harvest every queue."""
        with self._lock:
            self.interrupts += 1
            status = self.r32(spec.REG_INTERRUPT_STATUS)
            if status:
                self.w32(spec.REG_INTERRUPT_ACK, status)
            if status & spec.INTERRUPT_CONFIG:
                self.config_changes += 1
                self.read_config()
                if self.r32(spec.REG_STATUS) & spec.STATUS_NEEDS_RESET:
                    self.broken = "device needs reset"
            done: list[Request] = []
            for queue in self.queues:
                done += self.harvest(queue)
            return done

    def harvest(self, queue: _Queue) -> list[Request]:
        """virtblk_done: take used buffers, re-enable callbacks, re-check."""
        done: list[Request] = []
        while True:
            batch = self._get_used(queue)
            done += batch
            if not self._enable_callbacks(queue):
                break
        for request in done:
            self._unmap(request)
            if request.on_complete is not None:
                request.on_complete(request)
        return done

    def _get_used(self, queue: _Queue) -> list[Request]:
        done = []
        if queue.packed:
            ring = self.ram.view(self._phys(queue.desc), 16 * queue.size)
            while True:
                pos = queue.last_used_pos
                length, buffer_id, flags = struct.unpack_from("<IHH", ring, 16 * pos + 8)
                avail_bit = 1 if flags & PACKED_DESC_F_AVAIL else 0
                used_bit = 1 if flags & PACKED_DESC_F_USED else 0
                if not (avail_bit == used_bit == queue.used_wrap):
                    break
                if buffer_id not in queue.in_flight:  # Linux: "id %u is not a head!"
                    self._bad_ring(f"used buffer id {buffer_id} is not in flight")
                    break
                request = queue.in_flight.pop(buffer_id)
                request.used_len = length
                queue.last_used_pos += request._ndesc
                if queue.last_used_pos >= queue.size:
                    queue.last_used_pos -= queue.size
                    queue.used_wrap ^= 1
                queue.num_free += request._ndesc
                queue.free_ids.append(buffer_id)
                done.append(request)
            return done
        used = self.ram.view(self._phys(queue.used), 6 + 8 * queue.size)
        used_idx = struct.unpack_from("<H", used, 2)[0]
        while queue.last_used != used_idx:
            slot = queue.last_used % queue.size
            head, length = struct.unpack_from("<II", used, 4 + 8 * slot)
            if head not in queue.in_flight:  # Linux: "id %u is not a head!"
                self._bad_ring(f"used head {head} is not in flight")
                break
            request = queue.in_flight.pop(head)
            request.used_len = length
            # return the descriptors to the free list
            index = head
            for _ in range(request._ndesc - 1):
                index = struct.unpack_from("<H", self._desc_view(queue, index), 14)[0]
            struct.pack_into("<H", self._desc_view(queue, index), 14, queue.free_head)
            queue.free_head = head
            queue.num_free += request._ndesc
            queue.last_used = (queue.last_used + 1) & 0xFFFF
            done.append(request)
        return done

    def _bad_ring(self, why: str) -> None:
        """A completion for a buffer the driver does not have in flight — one completed
        twice, say: Linux marks the queue broken (BAD_RING) and so does this driver."""
        self.bad_ring.append(why)
        self.broken = why

    def device_intact(self) -> str | None:
        """What a driver would notice of a device that lost its state (None: nothing):
        Status still as the driver left it, every queue still enabled."""
        with self._lock:
            expected = (spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER | spec.STATUS_FEATURES_OK
                        | spec.STATUS_DRIVER_OK)
            status = self.r32(spec.REG_STATUS)
            if status != expected:
                return f"Status reads {status:#x}, the driver left {expected:#x}"
            for queue in self.queues:
                self.w32(spec.REG_QUEUE_SEL, queue.index)
                if not self.legacy and self.r32(spec.REG_QUEUE_READY) != 1:
                    return f"queue {queue.index} is no longer ready"
            return self.broken

    def _enable_callbacks(self, queue: _Queue) -> bool:
        """virtqueue_enable_cb: ask for interrupts again; True if more arrived meanwhile."""
        if queue.packed:
            event = self.ram.view(self._phys(queue.driver_area), 4)
            if self.has(spec.F_EVENT_IDX):
                struct.pack_into("<HH", event, 0,
                                 queue.last_used_pos | (queue.used_wrap << 15),
                                 RING_EVENT_FLAGS_DESC)
            else:
                struct.pack_into("<HH", event, 0, 0, RING_EVENT_FLAGS_ENABLE)
            ring = self.ram.view(self._phys(queue.desc), 16 * queue.size)
            flags = struct.unpack_from("<H", ring, 16 * queue.last_used_pos + 14)[0]
            avail_bit = 1 if flags & PACKED_DESC_F_AVAIL else 0
            used_bit = 1 if flags & PACKED_DESC_F_USED else 0
            return avail_bit == used_bit == queue.used_wrap
        avail = self.ram.view(self._phys(queue.avail), 6 + 2 * queue.size)
        if self.has(spec.F_EVENT_IDX):
            struct.pack_into("<H", avail, 4 + 2 * queue.size, queue.last_used)
        else:
            struct.pack_into("<H", avail, 0, 0)  # clear VRING_AVAIL_F_NO_INTERRUPT
        used = self.ram.view(self._phys(queue.used), 6 + 8 * queue.size)
        return int(struct.unpack_from("<H", used, 2)[0]) != queue.last_used

    def disable_callbacks(self, queue: _Queue) -> None:
        if queue.packed:
            struct.pack_into("<HH", self.ram.view(self._phys(queue.driver_area), 4), 0, 0,
                             RING_EVENT_FLAGS_DISABLE)
        elif not self.has(spec.F_EVENT_IDX):
            struct.pack_into("<H", self.ram.view(self._phys(queue.avail), 2), 0, 1)

    def _unmap(self, request: Request) -> None:
        try:
            for dma, length in request._dma:
                self.dma.unmap(dma, length)
        except DeviceBroken as exc:
            self.broken = str(exc)
            raise
        finally:
            request._dma = []
            if request._status_phys:
                request.status = self.ram.view(request._status_phys, 1)[0]
            for phys, length in request._allocs:
                self.ram.free(phys, length)
            request._allocs = []

    # -- shutdown -------------------------------------------------------------------------

    def reset(self) -> None:
        """Device reset (module unload / reboot): Status ← 0, queues forgotten."""
        with self._lock:
            self.w32(spec.REG_STATUS, 0)
            self.queues = []
