"""A device driven by hand: rings written byte by byte, registers poked directly.

For the hostile-guest tests: nothing here is Linux-like or well-behaved.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from virtio_diskd.backend import blk, mmio
from virtio_diskd.backend.blk import BlkOptions, BlockRequest, VirtioBlk
from virtio_diskd.backend.guestmem import FlatGuestMemory
from virtio_diskd.backend.memdisk import MemoryDisk

BASE = 0x40000000
RAM = 1 << 20
DESC = BASE
AVAIL = BASE + 0x1000
USED = BASE + 0x2000
DRIVER_AREA = BASE + 0x1000
DEVICE_AREA = BASE + 0x2000
DATA = BASE + 0x10000  # where tests put buffers


class CheckedDisk(MemoryDisk):
    """A memory disk that fails the test if the device ever asks for I/O out of bounds."""

    def execute(self, request: BlockRequest) -> None:
        if request.kind in (blk.IoKind.READ, blk.IoKind.WRITE):
            assert request.offset >= 0 and request.offset + request.length <= len(self.data)
            assert sum(len(v) for v in request.buffers) == request.length
        for offset, length, _ in request.ranges:
            assert offset >= 0 and offset + length <= len(self.data)
        super().execute(request)


@dataclass
class RawDevice:
    packed: bool = False
    size: int = 8
    features_mask: int = ~0
    read_only: bool = False
    disk_size: int = 64 * 512
    ram: bytearray = field(default_factory=lambda: bytearray(RAM))
    effects: list[mmio.MmioEffect] = field(default_factory=list)
    hold: bool = False  # keep requests in flight (self.held) instead of completing them
    options: BlkOptions | None = None

    def __post_init__(self) -> None:
        self.disk = CheckedDisk(self.disk_size, read_only=self.read_only)
        self.memory = FlatGuestMemory(self.ram, BASE)
        self.held: list[BlockRequest] = []
        options = self.options or BlkOptions(serial="raw", queue_size=max(self.size, 8),
                                             packed_ring=self.packed)
        self.device = VirtioBlk(self.disk.info(), self.memory, options)
        self.next_avail = 0
        self.wrap = 1

    # registers
    def w(self, offset: int, value: int, size: int = 4) -> list[mmio.MmioEffect]:
        effects = self.device.mmio_write(offset, size, value)
        self.effects += effects
        self.run(effects)
        return effects

    def r(self, offset: int, size: int = 4) -> int:
        return self.device.mmio_read(offset, size)

    def run(self, effects: list[mmio.MmioEffect]) -> None:
        for effect in effects:
            if isinstance(effect, mmio.QueueNotified):
                batch = self.device.process_queue(effect.queue)
                self.effects += batch.effects
                if self.hold:
                    self.held += batch.requests
                    continue
                for request in batch.requests:
                    self.disk.execute(request)
                done = self.device.complete(batch.requests)
                self.effects += done.effects
                for request in done.requests:
                    self.disk.execute(request)
                if done.requests:
                    self.effects += self.device.complete(done.requests).effects

    def setup(self, *, queue_num: int | None = None) -> RawDevice:
        self.w(mmio.REG_STATUS, 0)
        self.w(mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)
        offered = 0
        for sel in (0, 1):
            self.w(mmio.REG_DEVICE_FEATURES_SEL, sel)
            offered |= self.r(mmio.REG_DEVICE_FEATURES) << (32 * sel)
        features = offered & self.features_mask
        if not self.packed:
            features &= ~(1 << mmio.F_RING_PACKED)
        for sel in (0, 1):
            self.w(mmio.REG_DRIVER_FEATURES_SEL, sel)
            self.w(mmio.REG_DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.w(mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER
               | mmio.STATUS_FEATURES_OK)
        self.w(mmio.REG_QUEUE_SEL, 0)
        self.w(mmio.REG_QUEUE_NUM, self.size if queue_num is None else queue_num)
        for reg, addr in ((mmio.REG_QUEUE_DESC_LOW, DESC), (mmio.REG_QUEUE_DRIVER_LOW, AVAIL),
                          (mmio.REG_QUEUE_DEVICE_LOW, USED)):
            self.w(reg, addr & 0xFFFFFFFF)
            self.w(reg + 4, addr >> 32)
        self.w(mmio.REG_QUEUE_READY, 1)
        self.w(mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER
               | mmio.STATUS_FEATURES_OK | mmio.STATUS_DRIVER_OK)
        return self

    @property
    def features(self) -> int:
        return self.device.transport.negotiated

    @property
    def needs_reset(self) -> bool:
        return bool(self.r(mmio.REG_STATUS) & mmio.STATUS_NEEDS_RESET)

    # memory
    def poke(self, addr: int, data: bytes) -> None:
        self.ram[addr - BASE : addr - BASE + len(data)] = data

    def peek(self, addr: int, length: int) -> bytes:
        return bytes(self.ram[addr - BASE : addr - BASE + length])

    def desc(self, index: int, addr: int, length: int, flags: int, nxt: int = 0,
             table: int = DESC) -> None:
        """A split descriptor (or an entry of a split indirect table at ``table``)."""
        self.poke(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def post(self, *heads: int, idx_delta: int | None = None,
             kick: bool = True) -> list[mmio.MmioEffect]:
        """Split ring: put heads in the avail ring, bump the index, kick."""
        avail_idx = struct.unpack("<H", self.peek(AVAIL + 2, 2))[0]
        for i, head in enumerate(heads):
            self.poke(AVAIL + 4 + 2 * ((avail_idx + i) % self.size), struct.pack("<H", head))
        delta = len(heads) if idx_delta is None else idx_delta
        self.poke(AVAIL + 2, struct.pack("<H", (avail_idx + delta) & 0xFFFF))
        return self.w(mmio.REG_QUEUE_NOTIFY, 0) if kick else []

    def used(self) -> list[tuple[int, int]]:
        idx = struct.unpack("<H", self.peek(USED + 2, 2))[0]
        return [struct.unpack("<II", self.peek(USED + 4 + 8 * (i % self.size), 8))
                for i in range(idx)]

    def packed_desc(self, addr: int, length: int, buffer_id: int, flags: int) -> None:
        """Write the next packed descriptor with the driver's wrap bits."""
        flags |= mmio_avail_bits(self.wrap)
        self.poke(DESC + 16 * self.next_avail, struct.pack("<QIHH", addr, length, buffer_id,
                                                           flags))
        self.next_avail += 1
        if self.next_avail == self.size:
            self.next_avail, self.wrap = 0, self.wrap ^ 1

    def interrupts(self) -> int:
        return sum(isinstance(e, mmio.RaiseInterrupt) for e in self.effects)


def mmio_avail_bits(wrap: int) -> int:
    from virtio_diskd.backend.virtqueue import PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED

    return PACKED_DESC_F_AVAIL if wrap else PACKED_DESC_F_USED


def header(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)
