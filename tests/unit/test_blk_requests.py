"""virtio-blk through the register file with a Linux-like driver: every request type,
both ring formats, indirect tables on and off, legacy and modern transports."""

from __future__ import annotations

import os
import struct

import pytest

from vdtest.harness import data_buffer, make_harness
from virtio_diskd.backend import blk, mmio
from virtio_diskd.backend.blk import BlkOptions
from virtio_diskd.ioreq.sim.linux_driver import Request

RING_VARIANTS = [
    pytest.param({"packed": False, "indirect": False, "event_idx": False}, id="split-plain"),
    pytest.param({"packed": False, "indirect": True, "event_idx": True}, id="split-indirect-evidx"),
    pytest.param({"packed": True, "indirect": False, "event_idx": False}, id="packed-plain"),
    pytest.param({"packed": True, "indirect": True, "event_idx": True}, id="packed-indirect-evidx"),
]


@pytest.mark.parametrize("driver_kwargs", RING_VARIANTS)
def test_write_then_read_back_bytes(driver_kwargs: dict[str, bool]) -> None:
    h = make_harness(driver_kwargs=driver_kwargs)
    payload = os.urandom(3 * 4096 + 512)
    out = Request(blk.T_OUT, sector=8, data_addr=data_buffer(h, payload), data_len=len(payload))
    done = h.do([out])
    assert done == [out] and out.status == blk.S_OK and out.used_len == 1
    assert bytes(h.disk.data[8 * 512 : 8 * 512 + len(payload)]) == payload
    assert bytes(h.disk.data[: 8 * 512]) == bytes(8 * 512)  # nothing else changed
    back = h.ram.alloc(len(payload))
    read = Request(blk.T_IN, sector=8, data_addr=back, data_len=len(payload))
    assert h.do([read]) == [read]
    assert read.status == blk.S_OK and read.used_len == len(payload) + 1
    assert bytes(h.ram.view(back, len(payload))) == payload


@pytest.mark.parametrize("legacy", [False, True])
def test_modern_and_legacy_transports(legacy: bool) -> None:
    h = make_harness(legacy=legacy, driver_kwargs={"packed": False})
    assert h.driver.legacy is legacy
    assert h.driver.has(mmio.F_VERSION_1) is not legacy
    payload = b"\x5a" * 1024
    out = Request(blk.T_OUT, sector=0, data_addr=data_buffer(h, payload), data_len=1024)
    assert h.do([out])[0].status == blk.S_OK
    assert bytes(h.disk.data[:1024]) == payload


def test_negotiated_features_are_what_linux_takes() -> None:
    h = make_harness()
    d = h.driver
    for bit in (mmio.F_VERSION_1, mmio.F_EVENT_IDX, mmio.F_INDIRECT_DESC, mmio.F_RING_PACKED,
                blk.F_FLUSH, blk.F_SEG_MAX, blk.F_BLK_SIZE, blk.F_CONFIG_WCE, blk.F_DISCARD,
                blk.F_WRITE_ZEROES):
        assert d.has(bit), bit
    assert not d.has(blk.F_RO) and not d.has(mmio.F_ACCESS_PLATFORM)
    assert not d.has(blk.F_SECURE_ERASE)  # the memory disk does not offer it
    assert d.capacity_sectors == (1 << 20) // 512


def test_flush_get_id_and_unsupported_types() -> None:
    h = make_harness(options=BlkOptions(serial="serial-0123456789abcdefXYZ"))
    flush = Request(blk.T_FLUSH)
    get_id = Request(blk.T_GET_ID, data_addr=h.ram.alloc(20), data_len=20)
    lifetime = Request(blk.T_GET_LIFETIME, data_addr=h.ram.alloc(16), data_len=16)
    unknown = Request(99)
    done = h.do([flush, get_id, lifetime, unknown])
    assert set(map(id, done)) == {id(flush), id(get_id), id(lifetime), id(unknown)}
    assert flush.status == blk.S_OK and h.disk.flushes == 1
    assert get_id.status == blk.S_OK and get_id.used_len == 21
    assert bytes(h.ram.view(get_id.data_addr, 20)) == b"serial-0123456789abc"
    assert lifetime.status == blk.S_UNSUPP and unknown.status == blk.S_UNSUPP


def test_get_id_pads_short_serials_and_works_read_only() -> None:
    h = make_harness(read_only=True, options=BlkOptions(serial="disk7"))
    get_id = Request(blk.T_GET_ID, data_addr=h.ram.alloc(20), data_len=20)
    assert h.do([get_id])[0].status == blk.S_OK
    assert bytes(h.ram.view(get_id.data_addr, 20)) == b"disk7" + bytes(15)


def test_read_only_disk_refuses_writes_and_offers_ro() -> None:
    h = make_harness(read_only=True)
    assert h.driver.has(blk.F_RO)
    assert not h.driver.has(blk.F_DISCARD) and not h.driver.has(blk.F_WRITE_ZEROES)
    out = Request(blk.T_OUT, data_addr=data_buffer(h, b"x" * 512), data_len=512)
    assert h.do([out])[0].status == blk.S_IOERR
    assert bytes(h.disk.data[:512]) == bytes(512)
    assert blk.IoKind.WRITE not in h.disk.executed


def _ranges(h, entries: list[tuple[int, int, int]]) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    raw = b"".join(struct.pack("<QII", *e) for e in entries)
    return data_buffer(h, raw), len(raw)


def test_discard_and_write_zeroes_with_unmap() -> None:
    h = make_harness()
    h.disk.data[:] = b"\xff" * len(h.disk.data)
    addr, length = _ranges(h, [(0, 2, 0), (10, 1, 0)])
    discard = Request(blk.T_DISCARD, data_addr=addr, data_len=length)
    addr2, length2 = _ranges(h, [(20, 4, blk.WRITE_ZEROES_FLAG_UNMAP)])
    zeroes = Request(blk.T_WRITE_ZEROES, data_addr=addr2, data_len=length2)
    done = h.do([discard, zeroes])
    assert len(done) == 2 and discard.status == zeroes.status == blk.S_OK
    data = h.disk.data
    assert data[:1024] == bytes(1024) and data[1024:5120] == b"\xff" * 4096
    assert data[5120:5632] == bytes(512) and data[5632:10240] == b"\xff" * 4608
    assert data[10240:12288] == bytes(2048) and data[12288:12800] == b"\xff" * 512


def test_discard_with_unmap_flag_or_unknown_flags_is_unsupported() -> None:
    h = make_harness()
    addr, length = _ranges(h, [(0, 1, blk.WRITE_ZEROES_FLAG_UNMAP)])
    bad_discard = Request(blk.T_DISCARD, data_addr=addr, data_len=length)
    addr2, length2 = _ranges(h, [(0, 1, 0x4)])
    bad_flags = Request(blk.T_WRITE_ZEROES, data_addr=addr2, data_len=length2)
    h.do([bad_discard, bad_flags])
    assert bad_discard.status == blk.S_UNSUPP and bad_flags.status == blk.S_UNSUPP
    assert h.disk.executed == []


def test_requests_beyond_capacity_are_ioerr_and_touch_nothing() -> None:
    h = make_harness(disk_size=64 * 512)
    payload = b"z" * 1024
    cross = Request(blk.T_OUT, sector=63, data_addr=data_buffer(h, payload), data_len=1024)
    beyond = Request(blk.T_IN, sector=64, data_addr=h.ram.alloc(512), data_len=512)
    huge = Request(blk.T_IN, sector=(1 << 64) - 1, data_addr=h.ram.alloc(512), data_len=512)
    last = Request(blk.T_OUT, sector=63, data_addr=data_buffer(h, b"L" * 512), data_len=512)
    h.do([cross, beyond, huge, last])
    assert (cross.status, beyond.status, huge.status, last.status) == (
        blk.S_IOERR, blk.S_IOERR, blk.S_IOERR, blk.S_OK)
    assert bytes(h.disk.data[-512:]) == b"L" * 512
    assert bytes(h.disk.data[:-512]) == bytes(63 * 512)


def test_partial_sector_io_is_ioerr() -> None:
    h = make_harness()
    odd = Request(blk.T_OUT, data_addr=data_buffer(h, b"q" * 700), data_len=700)
    assert h.do([odd])[0].status == blk.S_IOERR
    assert h.disk.executed == []


def test_config_space_byte_by_byte() -> None:
    opts = BlkOptions(serial="s", num_queues=2, queue_size=128, size_max=65536,
                      max_discard_seg=16, max_discard_sectors=8192)
    h = make_harness(disk_size=10 << 20, options=opts, probe=False)
    read = h.device.mmio_read
    cfg = bytes(read(0x100 + i, 1) for i in range(blk.CONFIG_SIZE))
    expected = bytearray(blk.CONFIG_SIZE)
    struct.pack_into("<QII", expected, 0, (10 << 20) // 512, 65536, 126)
    struct.pack_into("<I", expected, 20, 512)  # blk_size
    struct.pack_into("<BBHI", expected, 24, 0, 0, 1, 0)  # topology
    expected[32] = 1  # writeback
    struct.pack_into("<H", expected, 34, 2)  # num_queues
    struct.pack_into("<III", expected, 36, 8192, 16, 1)  # discard
    struct.pack_into("<IIB", expected, 48, 8192, 16, 1)  # write zeroes (+ may_unmap)
    struct.pack_into("<III", expected, 60, 8192, 16, 1)  # secure erase limits
    assert cfg == bytes(expected)
    # wider accesses see the same bytes; unaligned and out-of-range read as 0
    assert read(0x100, 4) == int.from_bytes(cfg[0:4], "little")
    assert read(0x100 + 34, 2) == 2
    assert read(0x101, 2) == 0 and read(0x100 + blk.CONFIG_SIZE, 4) == 0
    assert read(0x100 + 8, 8) == int.from_bytes(cfg[8:16], "little")


def test_writeback_toggle_through_config_wce() -> None:
    h = make_harness()
    h.driver.set_writeback(False)
    assert h.device.writeback is False and h.device.mmio_read(0x100 + 32, 1) == 0
    out = Request(blk.T_OUT, data_addr=data_buffer(h, b"w" * 512), data_len=512)
    h.driver.submit(0, [out])
    held = [r for r in h.disk.executed]
    assert held == [blk.IoKind.WRITE]
    h.driver.set_writeback(True)
    assert h.device.writeback is True


def test_multi_queue_requests_complete_on_their_own_queue() -> None:
    h = make_harness(options=BlkOptions(serial="mq", num_queues=4))
    assert len(h.driver.queues) == 4
    reqs = []
    for q in range(4):
        payload = bytes([q + 1]) * 512
        r = Request(blk.T_OUT, sector=q, data_addr=data_buffer(h, payload), data_len=512)
        h.driver.submit(q, [r])
        reqs.append(r)
    h.deliver_irq()
    assert all(r.status == blk.S_OK for r in reqs)
    assert bytes(h.disk.data[:2048]) == b"".join(bytes([q + 1]) * 512 for q in range(4))


def test_capacity_change_raises_config_interrupt() -> None:
    h = make_harness()
    gen = h.device.mmio_read(mmio.REG_CONFIG_GENERATION, 4)
    h.perform(h.device.set_capacity(2 << 20))
    assert h.irq_pending
    h.deliver_irq()
    assert h.driver.config_changes == 1
    assert h.driver.capacity_sectors == (2 << 20) // 512
    assert h.device.mmio_read(mmio.REG_CONFIG_GENERATION, 4) == gen + 1
    beyond_old = Request(blk.T_OUT, sector=3000, data_addr=data_buffer(h, b"n" * 512),
                         data_len=512)
    assert h.do([beyond_old])[0].status == blk.S_OK


def test_a_cdrom_is_refused_with_a_clear_reason() -> None:
    import pytest

    from virtio_diskd.ioreq.devconfig import BadDeviceNode, parse_device

    nodes = {"params": "/tmp/x.img", "mode": "r", "base": str(0x2000000), "irq": "33",
             "device-type": "cdrom"}
    with pytest.raises(BadDeviceNode, match="not a CD-ROM"):
        parse_device(nodes, domid=1, devid=51712, backend_domid=0, backend_path="/x")
    nodes["device-type"] = "disk"
    assert parse_device(nodes, domid=1, devid=51712, backend_domid=0,
                        backend_path="/x").read_only


def test_discard_and_write_zeroes_beyond_the_advertised_segment_count_fail() -> None:
    """max_discard_seg / max_write_zeroes_seg (32) are limits, not hints: one more range
    fails the request before anything of it reaches the disk."""
    h = make_harness()
    limit = BlkOptions().max_discard_seg
    for rtype in (blk.T_DISCARD, blk.T_WRITE_ZEROES):
        addr, length = _ranges(h, [(i, 1, 0) for i in range(limit + 1)])
        over = Request(rtype, data_addr=addr, data_len=length)
        addr, length = _ranges(h, [(i, 1, 0) for i in range(limit)])
        at = Request(rtype, data_addr=addr, data_len=length)
        h.do([over, at])
        assert over.status == blk.S_IOERR and at.status == blk.S_OK
    assert len(h.disk.executed) == 2  # only the two within the limit
