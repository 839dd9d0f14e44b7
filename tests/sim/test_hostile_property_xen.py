"""Property-based hostile guests on the real layers: the simulated hypervisor's guest
RAM reached through the foreign and grant mapping layers, and the real disk engine on
a file — not in-memory doubles.  Queue sizes up to 256, chains and indirect tables up
to the queue size, descriptors pointing anywhere.

Invariants on every case:
* nothing raises out of the device model or the engine;
* guest RAM changes only inside buffers the driver marked device-writable and the
  device-owned ring areas;
* without DEVICE_NEEDS_RESET, every request made available is answered;
* once everything completed, no grant stays mapped but the ring areas', and no
  foreign chunk is still in use.
"""

from __future__ import annotations

import collections
import os
import select
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdtest import counters
from vdtest.draw import Draw
from vdtest.rawring import header
from virtio_diskd.backend import mmio
from virtio_diskd.backend.blk import BlkOptions, BlockRequest, VirtioBlk
from virtio_diskd.backend.disk.engine import DiskEngine
from virtio_diskd.backend.disk.target import DiskTarget
from virtio_diskd.backend.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC_F_AVAIL,
)
from virtio_diskd.ioreq.guest_mapping import ForeignGuestMemory, GrantGuestMemory
from virtio_diskd.ioreq.sim.hypervisor import GUEST_RAM_BASE, Hypervisor
from virtio_diskd.ioreq.xen import abi
from virtio_diskd.ioreq.xen.simulated import SimPlatform

OUTCOMES: collections.Counter[str] = collections.Counter()
CASES = int(os.environ.get("VD_XEN_RING_CASES", "1500"))
DOMID = 7
RAM = 1 << 20
PAGE = 4096
DESC, DRIVER, DEVICE = 0x0, 0x10000, 0x18000  # offsets into RAM
TABLES, HEADERS, BUFFERS = 0x20000, 0x40000, 0x50000
DISK = 256 << 10


@dataclass
class World:
    hv: Hypervisor
    platform: SimPlatform
    foreign: ForeignGuestMemory
    grants: GrantGuestMemory
    first_ref: int
    engine: DiskEngine[BlockRequest]

    def ram(self) -> memoryview:
        return self.hv.guests[DOMID].ram_view[:RAM]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("xenprop")
    hv = Hypervisor()
    sock = str(tmp / "hv.sock")
    hv.serve(sock)
    guest = hv.create_guest(DOMID, RAM)
    first_ref = guest.grant([GUEST_RAM_BASE // PAGE + i for i in range(RAM // PAGE)], 0,
                            readonly=False)
    platform = SimPlatform(sock, 0)
    image = tmp / "disk.img"
    image.write_bytes(os.urandom(DISK))
    engine = DiskEngine[BlockRequest](DiskTarget(str(image)), workers=2)
    yield World(hv, platform, ForeignGuestMemory(platform.foreignmemory(), DOMID,
                                                 platform.barrier),
                GrantGuestMemory(platform.gnttab(), DOMID, platform.barrier), first_ref,
                engine)
    engine.close()
    engine.target.close()
    hv.close()


class Case:
    """One hostile guest on one device, set up over the given mapping layer."""

    def __init__(self, world: World, draw: Draw, grants: bool) -> None:
        self.world, self.draw, self.grants = world, draw, grants
        self.packed = bool(draw.byte() & 1)
        self.size = 1 << (1 + draw.byte() % 8)  # 2 .. 256
        self.ram = world.ram()
        self.ram[:] = bytes(RAM)
        memory = world.grants if grants else world.foreign
        self.device = VirtioBlk(world.engine.target.info(), memory,
                                BlkOptions(serial="prop", queue_size=max(self.size, 8),
                                           packed_ring=self.packed, access_platform=grants))
        self.writable: list[tuple[int, int]] = []

    def addr(self, offset: int) -> int:
        """What the device is given for RAM offset ``offset`` (any value beyond RAM too)."""
        if not self.grants:
            return GUEST_RAM_BASE + offset
        if not 0 <= offset < RAM:  # a ref the guest never granted
            ref = self.world.first_ref + RAM // PAGE + 1 + (offset // PAGE) % 4096
            return abi.XEN_GRANT_DMA_ADDR_OFF | ref << 12 | offset % PAGE
        return (abi.XEN_GRANT_DMA_ADDR_OFF | (self.world.first_ref + offset // PAGE) << 12
                | offset % PAGE)

    def w(self, offset: int, value: int) -> list[mmio.MmioEffect]:
        return self.device.mmio_write(offset, 4, value)

    def setup(self) -> None:
        self.w(mmio.REG_STATUS, 0)
        self.w(mmio.REG_STATUS, 3)
        offered = 0
        for sel in (0, 1):
            self.w(mmio.REG_DEVICE_FEATURES_SEL, sel)
            offered |= self.device.mmio_read(mmio.REG_DEVICE_FEATURES, 4) << (32 * sel)
        if not self.packed:
            offered &= ~(1 << mmio.F_RING_PACKED)
        for sel in (0, 1):
            self.w(mmio.REG_DRIVER_FEATURES_SEL, sel)
            self.w(mmio.REG_DRIVER_FEATURES, (offered >> (32 * sel)) & 0xFFFFFFFF)
        self.w(mmio.REG_STATUS, 11)
        self.w(mmio.REG_QUEUE_NUM, self.size)
        for reg, offset in ((mmio.REG_QUEUE_DESC_LOW, DESC), (mmio.REG_QUEUE_DRIVER_LOW, DRIVER),
                            (mmio.REG_QUEUE_DEVICE_LOW, DEVICE)):
            self.w(reg, self.addr(offset) & 0xFFFFFFFF)
            self.w(reg + 4, self.addr(offset) >> 32)
        self.w(mmio.REG_QUEUE_READY, 1)
        self.w(mmio.REG_STATUS, 15)

    def buffer(self) -> tuple[int, int]:
        """A random (RAM offset, length): buffers, headers, tables, rings, beyond RAM."""
        pick, draw = self.draw.byte(), self.draw
        offset = [BUFFERS + PAGE * (draw.byte() % 32) + draw.byte() % 3 * 512,
                  HEADERS + 16 * (draw.byte() % 8), TABLES + 0x1000 * (draw.byte() % 8),
                  DESC, DEVICE, RAM - 8, RAM, -PAGE][pick % 8]
        length = [512, 4096, 1, 16, 0, 8192 * (1 + draw.byte() % 8), 0xFFFFFFFF,
                  draw.uint(2)][draw.byte() % 8]
        return offset, length

    def descriptor(self) -> tuple[int, int, int, int]:
        offset, length = self.buffer()
        flags = self.draw.byte() & (DESC_F_NEXT | DESC_F_WRITE | DESC_F_INDIRECT)
        if flags & DESC_F_WRITE and not flags & DESC_F_INDIRECT:
            self.writable.append((max(offset, 0), min(offset + length, RAM)))
        return offset, length, flags, self.draw.byte() % max(self.size, 2)

    def request(self, room: int) -> list[tuple[int, int, int]]:
        """One request's elements (RAM offset, length, flags): mostly well formed —
        header, data, status — with a chance of each hostile twist."""
        draw = self.draw
        twist = draw.byte()
        long_chain = draw.byte() % 8 == 0
        count = 1 + (draw.byte() % max(room - 2, 1) if long_chain else draw.byte() % 4)
        count = max(min(count, room - 2), 0)
        data_write = draw.byte() & 1
        elements = [(HEADERS + 16 * (draw.byte() % 8), 16, 0)]
        for _ in range(count):
            offset, length = self.buffer() if twist % 5 == 0 else \
                (BUFFERS + PAGE * (draw.byte() % 32), 512 * (1 + draw.byte() % 8))
            elements.append((offset, length, DESC_F_WRITE if data_write else 0))
        elements.append((HEADERS + 0x200 + draw.byte() % 64, 1, DESC_F_WRITE))
        if twist % 7 == 1:  # a random element anywhere in the chain
            offset, length, flags, _ = self.descriptor()
            elements[draw.byte() % len(elements)] = (offset, length, flags & ~DESC_F_INDIRECT)
        if twist % 11 == 2:
            elements = elements[:-1]  # no status byte
        for offset, length, flags in elements:
            if flags & DESC_F_WRITE:
                self.writable.append((max(offset, 0), min(offset + length, RAM)))
        return elements

    def write_table(self, index: int, elements: list[tuple[int, int, int]]) -> tuple[int, int]:
        table = TABLES + 0x1000 * index
        for i, (offset, length, flags) in enumerate(elements):
            if self.packed:
                struct.pack_into("<QIHH", self.ram, table + 16 * i, self.addr(offset), length,
                                 0, flags)
            else:
                more = DESC_F_NEXT if i + 1 < len(elements) else 0
                struct.pack_into("<QIHH", self.ram, table + 16 * i, self.addr(offset), length,
                                 flags | more, i + 1)
        return table, 16 * len(elements)

    def fill(self) -> int:
        """Headers, requests (direct chains or indirect tables), made available.
        Returns how many heads the driver made available (split) or 0 (packed)."""
        draw = self.draw
        for i in range(8):
            struct.pack_into("<16s", self.ram, HEADERS + 16 * i,
                             header([0, 1, 4, 8, 11, 13, 99][draw.byte() % 7],
                                    draw.byte() % 600))
        slot, heads = 0, list[int]()
        for buffer_id in range(1 + draw.byte() % 16):
            if slot >= self.size:
                break
            indirect = draw.byte() % 3 == 0 and slot < 8 * 0x1000
            elements = self.request(self.size if indirect else self.size - slot)
            if indirect:
                table, length = self.write_table(len(heads) % 8, elements)
                elements_in_ring = [(table, length, DESC_F_INDIRECT)]
            else:
                elements_in_ring = elements
            if not elements_in_ring or slot + len(elements_in_ring) > self.size:
                break
            heads.append(slot)
            for i, (offset, length, flags) in enumerate(elements_in_ring):
                more = DESC_F_NEXT if i + 1 < len(elements_in_ring) else 0
                if self.packed:
                    struct.pack_into("<QIHH", self.ram, DESC + 16 * slot, self.addr(offset),
                                     length, buffer_id, flags | more | PACKED_DESC_F_AVAIL)
                else:
                    struct.pack_into("<QIHH", self.ram, DESC + 16 * slot, self.addr(offset),
                                     length, flags | more, slot + 1)
                slot += 1
        self.writable += [(DEVICE, DEVICE + 4 + 8 * self.size + 8), (DESC, DESC + 16 * self.size)]
        if self.packed:
            return 0
        if draw.byte() % 9 == 0 and heads:
            heads.append(heads[0])  # the same head twice in flight
        for i, head in enumerate(heads):
            struct.pack_into("<H", self.ram, DRIVER + 4 + 2 * i, head)
        struct.pack_into("<H", self.ram, DRIVER + 2, len(heads))
        return len(heads)

    def run(self) -> None:
        engine, pending = self.world.engine, self.device.mmio_write(mmio.REG_QUEUE_NOTIFY, 4, 0)
        requests: list[BlockRequest] = []
        for effect in pending:
            if isinstance(effect, mmio.QueueNotified):
                requests += self.device.process_queue(effect.queue).requests
        while requests:
            done = engine.submit(requests)
            while len(done) < len(requests):
                select.select([engine.completion_fd], [], [], 10)
                done += engine.take_completions()
            requests = self.device.complete(done).requests


def _changed(before: bytes, after: memoryview) -> list[int]:
    return [i for i in range(0, RAM, 64) if before[i:i + 64] != after[i:i + 64]]


@settings(max_examples=CASES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(blob=st.binary(min_size=16, max_size=600), grants=st.booleans())
def test_random_rings_over_real_mappings_keep_the_invariants(world: World, blob: bytes,
                                                            grants: bool) -> None:
    counters.hostile_cases += 1
    case = Case(world, Draw(blob), grants)
    try:
        _check(world, case, grants)
    finally:
        case.device.mmio_write(mmio.REG_STATUS, 4, 0)  # reset: rings unmapped, world clean


def _check(world: World, case: Case, grants: bool) -> None:
    case.setup()
    made_available = case.fill()
    before = bytes(case.ram)
    case.run()
    needs_reset = bool(case.device.transport.status & mmio.STATUS_NEEDS_RESET)
    OUTCOMES["needs_reset" if needs_reset else "served"] += 1
    OUTCOMES["requests"] += case.device.stats.requests
    OUTCOMES["bytes"] += case.device.stats.read_bytes + case.device.stats.written_bytes
    for block in _changed(before, case.ram):
        changed = [block + i for i in range(64) if before[block + i] != case.ram[block + i]]
        for pos in changed:
            assert any(lo <= pos < hi for lo, hi in case.writable), \
                f"guest RAM written outside writable buffers at +{pos:#x}"
    if not needs_reset and not case.packed:
        used_idx = struct.unpack_from("<H", case.ram, DEVICE + 2)[0]
        assert used_idx == made_available
    assert case.device.pending() == 0
    case.device.mmio_write(mmio.REG_STATUS, 4, 0)  # reset: rings unmapped
    if grants:
        guest = world.hv.guests[DOMID]
        assert all(entry.mapped == 0 for entry in guest.grants.values()), "grant leaked"
    else:
        assert all(chunk.users == 0 for chunk in world.foreign._cache.values()), \
            "foreign chunk still in use"


def test_the_cases_reach_the_disk() -> None:
    """Runs after the property test: its cases were not all stopped at the ring."""
    print(f"xen-layer hostile cases: {dict(OUTCOMES)}")
    assert OUTCOMES["served"] > 0 and OUTCOMES["bytes"] > 0


def test_the_checks_catch_a_stray_write(world: World) -> None:
    """Planted fault: a device that writes a byte outside any writable buffer."""
    case = Case(world, Draw(bytes(64)), grants=False)
    case.setup()
    case.fill()
    before = bytes(case.ram)
    case.ram[BUFFERS + 0x7FFF] ^= 0xFF  # not in case.writable
    stray = [pos for block in _changed(before, case.ram) for pos in range(block, block + 64)
             if before[pos] != case.ram[pos]
             and not any(lo <= pos < hi for lo, hi in case.writable)]
    assert stray == [BUFFERS + 0x7FFF]
