"""Hostile guests: every malformed ring or request gets the spec's answer
(IOERR/UNSUPP, or DEVICE_NEEDS_RESET) — never an exception, never an access
outside the request's own buffers, never an effect on another device."""

from __future__ import annotations

import pytest

from vdtest.rawring import BASE, DATA, RAM, RawDevice, header
from virtio_diskd.backend import blk, mmio
from virtio_diskd.backend.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

NEXT, WRITE, INDIRECT = DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT
HDR, BUF, ST = DATA, DATA + 0x1000, DATA + 0x3000


def good_read(dev: RawDevice, head: int = 0, sector: int = 0) -> None:
    dev.poke(HDR, header(blk.T_IN, sector))
    dev.desc(head, HDR, 16, NEXT, head + 1)
    dev.desc(head + 1, BUF, 512, NEXT | WRITE, head + 2)
    dev.desc(head + 2, ST, 1, WRITE)


def test_well_formed_request_works_on_the_raw_ring() -> None:
    dev = RawDevice().setup()
    dev.disk.data[:512] = b"d" * 512
    good_read(dev)
    dev.post(0)
    assert dev.used() == [(0, 513)]
    assert dev.peek(BUF, 512) == b"d" * 512 and dev.peek(ST, 1) == b"\0"
    assert not dev.needs_reset


@pytest.mark.parametrize("case", ["loop", "self-loop", "head-out-of-range",
                                  "next-out-of-range", "avail-jump", "no-status",
                                  "indirect-without-feature", "nested-indirect",
                                  "indirect-bad-length", "indirect-and-next",
                                  "indirect-loop", "indirect-table-outside-ram"])
def test_structural_violations_need_reset(case: str) -> None:
    features = ~0 if case != "indirect-without-feature" else ~(1 << mmio.F_INDIRECT_DESC)
    dev = RawDevice(features_mask=features).setup()
    dev.poke(HDR, header(blk.T_IN))
    table = DATA + 0x8000
    heads = [0]
    idx_delta = None
    if case == "loop":
        dev.desc(0, HDR, 16, NEXT, 1)
        dev.desc(1, BUF, 512, NEXT | WRITE, 0)
    elif case == "self-loop":
        dev.desc(0, HDR, 16, NEXT, 0)
    elif case == "head-out-of-range":
        heads = [8]
    elif case == "next-out-of-range":
        dev.desc(0, HDR, 16, NEXT, 200)
    elif case == "avail-jump":
        good_read(dev)
        idx_delta = 9  # more than the queue size
    elif case == "no-status":
        dev.desc(0, HDR, 16, NEXT, 1)
        dev.desc(1, BUF, 512, 0)
    elif case in ("indirect-without-feature", "indirect-and-next"):
        dev.desc(0, table, 48, INDIRECT | (NEXT if case == "indirect-and-next" else 0), 1)
        dev.desc(0, HDR, 16, NEXT, 1, table=table)
        dev.desc(1, BUF, 512, NEXT | WRITE, 2, table=table)
        dev.desc(2, ST, 1, WRITE, table=table)
    elif case == "nested-indirect":
        dev.desc(0, table, 32, INDIRECT)
        dev.desc(0, HDR, 16, NEXT, 1, table=table)
        dev.desc(1, table, 32, INDIRECT, table=table)
    elif case == "indirect-bad-length":
        dev.desc(0, table, 20, INDIRECT)
    elif case == "indirect-loop":
        dev.desc(0, table, 32, INDIRECT)
        dev.desc(0, HDR, 16, NEXT, 1, table=table)
        dev.desc(1, BUF, 16, NEXT | WRITE, 0, table=table)
    elif case == "indirect-table-outside-ram":
        dev.desc(0, BASE + RAM - 16, 64, INDIRECT)
    dev.post(*heads, idx_delta=idx_delta, kick=False)
    before = bytes(dev.ram)
    dev.w(mmio.REG_QUEUE_NOTIFY, 0)
    assert dev.needs_reset
    assert any(isinstance(e, mmio.NeedsReset) for e in dev.effects)
    assert dev.used() == []
    # config-change interrupt tells the driver (DRIVER_OK was set)
    assert dev.r(mmio.REG_INTERRUPT_STATUS) & mmio.INTERRUPT_CONFIG
    changed = [i for i in range(len(before)) if before[i] != dev.ram[i]]
    assert changed == []  # nothing in guest memory was written
    assert dev.disk.executed == []
    # further kicks are ignored until the driver resets the device
    assert dev.w(mmio.REG_QUEUE_NOTIFY, 0) == []
    dev.w(mmio.REG_STATUS, 0)
    assert not dev.needs_reset and dev.r(mmio.REG_STATUS) == 0


@pytest.mark.parametrize("case", ["short-header", "data-outside-ram", "data-wraps-2^64",
                                  "huge-buffer", "writable-data-for-out",
                                  "readable-data-for-in", "readable-after-writable",
                                  "write-to-read-only", "header-outside-ram"])
def test_bad_requests_get_ioerr_and_only_their_status_byte_changes(case: str) -> None:
    dev = RawDevice(read_only=case == "write-to-read-only").setup()
    dev.poke(HDR, header(blk.T_OUT if case in ("writable-data-for-out", "write-to-read-only")
                         else blk.T_IN))
    dev.poke(ST, b"\xee")
    if case == "short-header":
        dev.desc(0, HDR, 12, NEXT, 1)
        dev.desc(1, ST, 1, WRITE)
    else:
        addr, length, flags = BUF, 512, NEXT | WRITE
        if case == "data-outside-ram":
            addr = BASE + RAM - 256
        elif case == "data-wraps-2^64":
            addr = (1 << 64) - 256
        elif case == "huge-buffer":
            length = 0xFFFFFFFF & ~511
        elif case == "readable-data-for-in" or case == "write-to-read-only":
            flags = NEXT
        hdr_addr = BASE + RAM + 0x1000 if case == "header-outside-ram" else HDR
        if case == "readable-after-writable":
            dev.desc(0, hdr_addr, 16, NEXT, 1)
            dev.desc(1, BUF, 512, NEXT | WRITE, 2)
            dev.desc(2, BUF + 512, 512, NEXT, 3)
            dev.desc(3, ST, 1, WRITE)
        else:
            dev.desc(0, hdr_addr, 16, NEXT, 1)
            dev.desc(1, addr, length, flags, 2)
            dev.desc(2, ST, 1, WRITE)
    dev.post(0, kick=False)
    before = bytes(dev.ram)
    dev.w(mmio.REG_QUEUE_NOTIFY, 0)
    assert not dev.needs_reset
    assert dev.peek(ST, 1) == bytes([blk.S_IOERR])
    assert len(dev.used()) == 1
    changed = {BASE + i for i in range(len(before)) if before[i] != dev.ram[i]}
    used_ring = set(range(BASE + 0x2000, BASE + 0x2000 + 6 + 8 * 8))
    assert changed - used_ring == {ST}
    assert blk.IoKind.WRITE not in dev.disk.executed and blk.IoKind.READ not in dev.disk.executed


def test_queue_size_not_power_of_two_needs_reset() -> None:
    dev = RawDevice().setup(queue_num=6)
    assert dev.needs_reset and dev.r(mmio.REG_QUEUE_READY) == 0


def test_queue_larger_than_max_needs_reset() -> None:
    dev = RawDevice(size=8).setup(queue_num=1024)
    assert dev.needs_reset


def test_ring_outside_guest_ram_needs_reset() -> None:
    dev = RawDevice()
    dev.w(mmio.REG_STATUS, 0)
    dev.w(mmio.REG_STATUS, 3)
    for sel in (0, 1):
        dev.w(mmio.REG_DRIVER_FEATURES_SEL, sel)
        dev.w(mmio.REG_DRIVER_FEATURES, 1 if sel else 0)  # VERSION_1 only
    dev.w(mmio.REG_STATUS, 11)
    dev.w(mmio.REG_QUEUE_NUM, 8)
    dev.w(mmio.REG_QUEUE_DESC_LOW, 0x1000)  # below guest RAM
    dev.w(mmio.REG_QUEUE_READY, 1)
    assert dev.needs_reset and dev.r(mmio.REG_QUEUE_READY) == 0


def test_queue_addresses_cannot_move_while_ready() -> None:
    dev = RawDevice().setup()
    dev.w(mmio.REG_QUEUE_DESC_LOW, (DATA + 0x20000) & 0xFFFFFFFF)  # ignored: queue is ready
    dev.w(mmio.REG_QUEUE_NUM, 4)  # ignored too
    good_read(dev)
    dev.post(0)
    assert dev.used() == [(0, 513)]


def test_features_written_after_features_ok_are_ignored() -> None:
    dev = RawDevice(features_mask=~(1 << mmio.F_EVENT_IDX)).setup()
    dev.w(mmio.REG_DRIVER_FEATURES_SEL, 0)
    dev.w(mmio.REG_DRIVER_FEATURES, 0xFFFFFFFF)
    assert not dev.features >> mmio.F_EVENT_IDX & 1
    assert dev.device.transport.driver_features >> 32 == 1


def test_features_never_offered_leave_features_ok_clear() -> None:
    dev = RawDevice()
    dev.w(mmio.REG_STATUS, 3)
    dev.w(mmio.REG_DRIVER_FEATURES_SEL, 1)
    dev.w(mmio.REG_DRIVER_FEATURES, 1 | 1 << (40 - 32))  # VERSION_1 + RING_RESET (not offered)
    dev.w(mmio.REG_STATUS, 11)
    assert not dev.r(mmio.REG_STATUS) & mmio.STATUS_FEATURES_OK


def test_zero_length_elements_and_odd_register_accesses_are_harmless() -> None:
    dev = RawDevice().setup()
    dev.poke(HDR, header(blk.T_IN))
    dev.desc(0, HDR, 16, NEXT, 1)
    dev.desc(1, BUF, 0, NEXT | WRITE, 2)
    dev.desc(2, ST, 1, WRITE)
    dev.post(0)
    assert dev.peek(ST, 1) == b"\0" and dev.used() == [(0, 1)]
    for offset in (0x1, 0x2, 0x3, 0x70):
        for size in (1, 2, 8):
            assert dev.r(offset, size) == 0
            dev.w(offset, 0xFFFFFFFF, size)
    assert not dev.needs_reset and dev.r(mmio.REG_STATUS) & mmio.STATUS_DRIVER_OK


def test_duplicate_head_in_flight_needs_reset() -> None:
    dev = RawDevice().setup()
    good_read(dev)
    dev.post(0, 0)  # the same head twice in one batch
    assert dev.needs_reset


def test_one_hostile_device_does_not_disturb_another() -> None:
    good, bad = RawDevice().setup(), RawDevice().setup()
    bad.desc(0, HDR, 16, NEXT, 0)  # loop
    bad.post(0)
    assert bad.needs_reset
    good.disk.data[:512] = b"g" * 512
    good_read(good)
    good.post(0)
    assert good.used() == [(0, 513)] and good.peek(BUF, 512) == b"g" * 512
    assert not good.needs_reset
