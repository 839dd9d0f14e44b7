"""A hostile guest cannot make the backend allocate or hold without bound.

Each test is one finding of the review in issue #14: a limit the device
advertises or that Xen implies, enforced.  Each fails against the code before
the fix (the commit that introduced the house, b34d730) and passes after it.
"""

from __future__ import annotations

import struct

import pytest

from vdtest.rawring import DATA, RawDevice, header
from virtio_diskd.backend import blk
from virtio_diskd.backend.blk import BlkOptions
from virtio_diskd.backend.guestmem import FlatGuestMemory, GuestMemoryError, MappedRange
from virtio_diskd.backend.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from virtio_diskd.ioreq.guest_mapping import (
    GRANT_MAP_PAGES,
    ForeignGuestMemory,
    GrantGuestMemory,
)
from virtio_diskd.ioreq.xen import abi
from virtio_diskd.ioreq.xen.interface import Mapping, XenError

NEXT, WRITE, INDIRECT = DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT
HDR, ST = DATA, DATA + 0x3000
TABLE = DATA + 0x8000
BUFS = DATA + 0x10000


def _indirect_request(dev: RawDevice, data_segments: list[tuple[int, int]], rtype: int,
                      table: int = TABLE) -> int:
    """Write an indirect table: header, the data segments, status; returns its bytes."""
    dev.poke(HDR, header(rtype))
    entries = [(HDR, 16, 0)]
    writable = WRITE if rtype in (blk.T_IN, blk.T_GET_ID) else 0
    entries += [(addr, length, writable) for addr, length in data_segments]
    entries.append((ST, 1, WRITE))
    for i, (addr, length, flags) in enumerate(entries):
        last = i == len(entries) - 1
        dev.desc(i, addr, length, flags | (0 if last else NEXT), i + 1, table=table)
    return 16 * len(entries)


# -- size_max, seg_max, indirect tables ------------------------------------------------------


def test_a_buffer_larger_than_size_max_fails_that_request() -> None:
    dev = RawDevice(disk_size=64 << 20, ram=bytearray(8 << 20)).setup()
    size_max = dev.device.options.size_max
    length = _indirect_request(dev, [(BUFS, 2 * size_max)], blk.T_IN)
    dev.desc(0, TABLE, length, INDIRECT)
    dev.poke(ST, b"\xff")
    dev.post(0)
    assert dev.peek(ST, 1) == bytes([blk.S_IOERR])
    assert dev.used() == [(0, 1)] and not dev.needs_reset
    assert dev.device.stats.over_limit == 1


def test_more_buffers_than_seg_max_fail_that_request() -> None:
    dev = RawDevice(size=16, options=BlkOptions(serial="raw", queue_size=16, seg_max=4,
                                                packed_ring=False)).setup()
    config_seg_max = struct.unpack_from("<I", dev.device.config_space(), 12)[0]
    assert config_seg_max == 4
    length = _indirect_request(dev, [(BUFS + 512 * i, 512) for i in range(5)], blk.T_IN)
    dev.desc(0, TABLE, length, INDIRECT)
    dev.post(0)
    assert dev.peek(ST, 1) == bytes([blk.S_IOERR]) and not dev.needs_reset
    # four buffers are within the limit
    length = _indirect_request(dev, [(BUFS + 512 * i, 512) for i in range(4)], blk.T_IN)
    dev.desc(1, TABLE, length, INDIRECT)
    dev.post(1)
    assert dev.peek(ST, 1) == bytes([blk.S_OK])


def test_an_indirect_table_longer_than_the_queue_needs_reset() -> None:
    """The review's case: one 8 MiB request in 2,048 buffers on a size-8 queue."""
    dev = RawDevice(size=8, ram=bytearray(12 << 20), disk_size=16 << 20).setup()
    table = DATA + 0x40000
    length = _indirect_request(dev, [(BUFS + 0x100000 + 4096 * i, 4096) for i in range(2048)],
                               blk.T_IN, table=table)
    dev.desc(0, table, length, INDIRECT)
    dev.post(0)
    assert dev.needs_reset
    assert dev.used() == [] and dev.device.stats.read_bytes == 0


def test_get_id_maps_no_more_than_the_id() -> None:
    mapped: list[int] = []

    class CountingMemory(FlatGuestMemory):
        def map(self, addr: int, length: int, writable: bool, *,
                contiguous: bool = False) -> MappedRange:
            mapped.append(length)
            return super().map(addr, length, writable, contiguous=contiguous)

    dev = RawDevice(ram=bytearray(8 << 20)).setup()
    dev.memory.__class__ = CountingMemory  # the device holds this very object
    length = _indirect_request(dev, [(BUFS + 0x100000 * i, 0x100000) for i in range(6)],
                               blk.T_GET_ID)
    dev.desc(0, TABLE, length, INDIRECT)
    dev.post(0)
    assert dev.peek(ST, 1) == bytes([blk.S_OK])
    assert dev.peek(BUFS, 3) == b"raw"
    assert sum(mapped) <= 20 + 1 + 16, mapped  # the id, the status byte, at most


# -- packed rings: in flight bounded by the ring --------------------------------------------


def _packed_indirect(dev: RawDevice, buffer_id: int, table: int) -> None:
    dev.poke(HDR, header(blk.T_IN))
    for i, (addr, length, flags) in enumerate(((HDR, 16, 0), (BUFS, 512, WRITE),
                                               (ST + buffer_id, 1, WRITE))):
        dev.poke(table + 16 * i, struct.pack("<QIHH", addr, length, 0, flags))
    dev.packed_desc(table, 48, buffer_id, INDIRECT)


def test_packed_slots_re_marked_before_use_cannot_grow_in_flight() -> None:
    """The review's case: a driver marks a lap's slots available again, with fresh ids,
    before the device used them; 32 requests were in flight on a size-8 ring."""
    dev = RawDevice(packed=True, size=8, hold=True).setup()
    for buffer_id in range(8):
        _packed_indirect(dev, buffer_id, TABLE + 0x100 * buffer_id)
    dev.w(0x050, 0)  # QueueNotify
    assert len(dev.held) == 8 and not dev.needs_reset
    for buffer_id in range(8, 16):  # the next lap, over slots still in flight
        _packed_indirect(dev, buffer_id, TABLE + 0x100 * buffer_id)
    dev.w(0x050, 0)
    assert len(dev.held) == 8, "more requests in flight than the ring holds"
    assert dev.needs_reset


def test_a_well_behaved_packed_driver_keeps_working_lap_after_lap() -> None:
    dev = RawDevice(packed=True, size=8).setup()
    for buffer_id in range(40):  # five laps, each request used before its slot is reused
        _packed_indirect(dev, buffer_id % 8, TABLE + 0x100 * (buffer_id % 8))
        dev.w(0x050, 0)
    assert not dev.needs_reset and dev.device.stats.requests == 40


# -- foreign and grant mapping ---------------------------------------------------------------


class _Refusing:
    """A foreign-memory / grant handle that refuses every map, recording what it was asked."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def map(self, domid: int, prot: int, gfns: list[int]) -> Mapping:
        self.calls.append(len(gfns))
        raise XenError(14, "Bad address")

    def map_domain_grant_refs(self, domid: int, refs: list[int], prot: int) -> Mapping:
        self.calls.append(len(refs))
        raise XenError(22, "Invalid argument")


def test_wild_foreign_addresses_do_not_grow_the_negative_cache() -> None:
    fmem = _Refusing()
    memory = ForeignGuestMemory(fmem, 5, lambda: None)  # type: ignore[arg-type]
    for i in range(10_000):
        with pytest.raises(GuestMemoryError):
            memory.map((1 << 40) + i * (2 << 20), 512, False)
    assert len(memory._uncacheable) <= 64  # the default bound


def test_grant_ref_lists_are_bounded_before_anything_is_allocated() -> None:
    gnttab = _Refusing()
    memory = GrantGuestMemory(gnttab, 5, lambda: None)  # type: ignore[arg-type]
    with pytest.raises(GuestMemoryError):
        memory.map(abi.XEN_GRANT_DMA_ADDR_OFF | 0x1000, 1 << 30, True)  # 1 GiB
    assert gnttab.calls == [GRANT_MAP_PAGES]  # one piece asked for, then it stopped


class _FailingMaps(FlatGuestMemory):
    """Guest memory whose data mappings raise ``failure`` while it is set (the 1-byte
    status mapping still works, so the request can be answered)."""

    failure: BaseException | None = None

    def map(self, addr: int, length: int, writable: bool, *,
            contiguous: bool = False) -> MappedRange:
        if self.failure is not None and length > 1:
            raise self.failure
        return super().map(addr, length, writable, contiguous=contiguous)


def _read_with_failing_maps(failure: BaseException) -> RawDevice:
    """One read while data mappings fail, then one after; returns the device."""
    dev = RawDevice().setup()
    memory = dev.memory
    memory.__class__ = _FailingMaps  # the device holds this very object
    assert isinstance(memory, _FailingMaps)
    memory.failure = failure
    length = _indirect_request(dev, [(BUFS, 512)], blk.T_IN)
    dev.desc(0, TABLE, length, INDIRECT)
    dev.post(0)
    assert dev.peek(ST, 1) == bytes([blk.S_IOERR]) and not dev.needs_reset
    memory.failure = None
    dev.desc(1, TABLE, length, INDIRECT)
    dev.post(1)
    assert dev.peek(ST, 1) == bytes([blk.S_OK])
    return dev


def test_memory_error_fails_one_request_not_the_device() -> None:
    _read_with_failing_maps(MemoryError())


def test_a_whole_ring_completed_in_one_batch_still_interrupts() -> None:
    """Found by the hostile load test: with EVENT_IDX on a packed ring, a batch that
    uses every slot brings next_used back to where it was, and a comparison of ring
    positions saw no progress: no interrupt, and the driver waited forever."""
    from vdtest.rawring import DRIVER_AREA
    from virtio_diskd.backend import mmio

    dev = RawDevice(packed=True, size=8, hold=True).setup()
    dev.poke(DRIVER_AREA, struct.pack("<HH", 0 | 1 << 15, 2))  # RING_EVENT_FLAGS_DESC at 0
    for buffer_id in range(8):
        _packed_indirect(dev, buffer_id, TABLE + 0x100 * buffer_id)
    dev.w(0x050, 0)
    assert len(dev.held) == 8
    for request in dev.held:
        dev.disk.execute(request)
    batch = dev.device.complete(dev.held)
    assert any(isinstance(e, mmio.RaiseInterrupt) for e in batch.effects)


def test_any_error_while_parsing_fails_one_request_and_is_recorded() -> None:
    dev = _read_with_failing_maps(ValueError("a bug of the backend's"))
    assert dev.device.stats.internal_errors == 1
    assert "ValueError" in dev.device.last_internal_error
