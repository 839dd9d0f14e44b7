"""Property-based hostile guests: random rings, tables, headers and register writes.

Invariants checked on every case:
* nothing raises out of the device model;
* guest memory changes only inside buffers the driver marked device-writable
  and the device-owned ring areas (used ring / device event area);
* the disk is never asked for I/O outside its capacity (CheckedDisk asserts);
* without DEVICE_NEEDS_RESET, every request made available is answered.
The number of cases run is printed at the end of the session.
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdtest import counters, draw
from vdtest.rawring import AVAIL, BASE, DATA, DESC, DEVICE_AREA, USED, RawDevice, header
from virtio_diskd.backend import blk, mmio
from virtio_diskd.backend.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

RAM = 1 << 18
TABLE = DATA + 0x8000
RING_CASES = int(os.environ.get("VD_RING_CASES", "16000"))
REGISTER_CASES = int(os.environ.get("VD_REGISTER_CASES", "6000"))

ADDRESSES = [DATA, DATA + 0x10, DATA + 0x1000, DATA + 0x1200, DATA + 0x3000, TABLE,
             TABLE + 0x10, DESC, AVAIL, USED, BASE - 16, BASE + RAM - 8, BASE + RAM,
             0, (1 << 64) - 16, (1 << 64) - 1]
LENGTHS = [0, 1, 15, 16, 17, 512, 513, 1024, 4096, 0xFFFFFFFF]
TYPES = [0, 1, 4, 8, 10, 11, 13, 14, 99]


class Draw(draw.Draw):
    """Ring contents for the in-memory device: addresses and lengths worth trying."""

    def addr(self) -> int:
        pick = self.byte()
        if pick < 160:
            return ADDRESSES[pick % len(ADDRESSES)]
        return BASE + self.uint(3) % RAM

    def length(self) -> int:
        pick = self.byte()
        if pick < 160:
            return LENGTHS[pick % len(LENGTHS)]
        return self.uint(2) % 0x4000

    def descriptor(self) -> tuple[int, int, int, int]:
        return self.addr(), self.length(), self.uint(2), self.byte() % 21


def _changed(before: bytes, after: bytearray) -> set[int]:
    changed: set[int] = set()
    for start in range(0, len(before), 4096):
        if before[start : start + 4096] != after[start : start + 4096]:
            changed.update(BASE + i for i in range(start, min(start + 4096, len(before)))
                           if before[i] != after[i])
    return changed


def _span(addr: int, length: int) -> list[tuple[int, int]]:
    start, end = max(addr, BASE), min(addr + length, BASE + RAM)
    return [(start, end)] if start < end else []


def _table_writable(ram: bytes, addr: int, length: int) -> list[tuple[int, int]]:
    """Device-writable spans listed by an indirect table at ``addr`` (as the guest wrote it)."""
    spans: list[tuple[int, int]] = []
    if addr < BASE or length % 16 or addr + length > BASE + RAM:
        return spans
    for offset in range(addr - BASE, addr - BASE + length, 16):
        e_addr, e_len, _x, e_flags = struct.unpack_from("<QIHH", ram, offset)
        packed_flags = struct.unpack_from("<H", ram, offset + 14)[0]
        split_flags = struct.unpack_from("<H", ram, offset + 12)[0]
        if (packed_flags | split_flags | e_flags) & DESC_F_WRITE:
            spans += _span(e_addr, e_len)
    return spans


@settings(max_examples=RING_CASES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(blob=st.binary(min_size=8, max_size=320))
def test_random_rings_keep_the_invariants(blob: bytes) -> None:
    draw = Draw(blob)
    mode = draw.byte()
    packed, event_idx = bool(mode & 1), bool(mode & 2)
    descs = [draw.descriptor() for _ in range(1 + draw.byte() % 10)]
    table = [draw.descriptor() for _ in range(draw.byte() % 7)]
    heads = [draw.byte() % 11 for _ in range(draw.byte() % 11)]
    idx_delta = draw.byte() % 13
    headers = [(TYPES[draw.byte() % len(TYPES)],
                (1 << 64) - 1 if draw.byte() > 240 else draw.byte() % 81)
               for _ in range(1 + draw.byte() % 3)]
    counters.hostile_cases += 1
    mask = ~0 if event_idx else ~(1 << mmio.F_EVENT_IDX)
    dev = RawDevice(packed=packed, features_mask=mask, ram=bytearray(RAM)).setup()
    for i, (rtype, sector) in enumerate(headers):
        dev.poke(DATA + 0x10 * i, header(rtype, sector))
    writable: list[tuple[int, int]] = []
    indirect: list[tuple[int, int]] = []
    for i, (addr, length, flags, nxt) in enumerate(table):
        dev.poke(TABLE + 16 * i, struct.pack("<QIHH", addr, length, flags & 0xFFFF, nxt))
        if flags & DESC_F_WRITE:
            writable += _span(addr, length)
    if packed:
        for addr, length, flags, buffer_id in descs:
            dev.packed_desc(addr, length, buffer_id, flags & (DESC_F_NEXT | DESC_F_WRITE
                                                              | DESC_F_INDIRECT))
            if flags & DESC_F_INDIRECT:
                indirect.append((addr, length))
            elif flags & DESC_F_WRITE:
                writable += _span(addr, length)
        before = bytes(dev.ram)
        for addr, length in indirect:
            writable += _table_writable(before, addr, length)
        dev.w(mmio.REG_QUEUE_NOTIFY, 0)
        writable += [(DESC, DESC + 16 * dev.size), (DEVICE_AREA, DEVICE_AREA + 4)]
    else:
        for i, (addr, length, flags, nxt) in enumerate(descs[: dev.size]):
            dev.desc(i, addr, length, flags & 0xFFFF, nxt)
            if flags & DESC_F_INDIRECT:
                indirect.append((addr, length))
            elif flags & DESC_F_WRITE:
                writable += _span(addr, length)
        dev.post(*heads, idx_delta=idx_delta, kick=False)
        before = bytes(dev.ram)
        for addr, length in indirect:
            writable += _table_writable(before, addr, length)
        dev.w(mmio.REG_QUEUE_NOTIFY, 0)
        writable.append((USED, USED + 6 + 8 * dev.size))
        if not dev.needs_reset:
            assert len(dev.used()) == idx_delta
    stray = {pos for pos in _changed(before, dev.ram)
             if not any(start <= pos < end for start, end in writable)}
    assert not stray, f"device wrote outside writable buffers at {sorted(stray)[:4]}"


REGISTERS = st.sampled_from([0x000, 0x004, 0x010, 0x014, 0x020, 0x024, 0x028, 0x030, 0x034,
                             0x038, 0x03C, 0x040, 0x044, 0x050, 0x060, 0x064, 0x070, 0x080,
                             0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x0AC, 0x0B0, 0x0C0, 0x0FC,
                             0x100, 0x108, 0x120, 0x13F, 0x15F, 0x1FF])
WRITES = st.tuples(REGISTERS, st.sampled_from([1, 2, 4, 8]),
                   st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from(
                       [0, 1, 0x0F, 0x8B, 0x4F, 8, 256, BASE, BASE + 0x1000, 0xFFFFFFFF])))


@settings(max_examples=REGISTER_CASES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(writes=st.lists(WRITES, max_size=40), setup_first=st.booleans())
def test_random_register_sequences_never_break_the_device(
        writes: list[tuple[int, int, int]], setup_first: bool) -> None:
    counters.hostile_cases += 1
    dev = RawDevice(ram=bytearray(RAM))
    if setup_first:
        dev.setup()
    for offset, size, value in writes:
        dev.w(offset, value, size)
        dev.r(offset, size)
    assert dev.r(mmio.REG_MAGIC) == mmio.MAGIC_VALUE
    assert dev.r(mmio.REG_DEVICE_ID) == blk.DEVICE_ID_BLOCK
    status = dev.r(mmio.REG_STATUS)
    if status & mmio.STATUS_NEEDS_RESET:
        assert dev.w(mmio.REG_QUEUE_NOTIFY, 0) == []
    transport = dev.device.transport
    assert transport.negotiated & ~transport.offered_features() == 0
