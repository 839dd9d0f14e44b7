"""Notification suppression, batching, reset in the middle of I/O, and the exact
ring layouts the driver writes and the device answers (virtio 1.2 §2.7, §2.8)."""

from __future__ import annotations

import struct

import pytest

from vdtest.harness import data_buffer, make_harness
from virtio_diskd.backend import blk, mmio
from virtio_diskd.backend.blk import BlkOptions
from virtio_diskd.backend.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
)
from virtio_diskd.ioreq.sim.linux_driver import DriverError, Request


def reads(h, count: int, size: int = 4096) -> list[Request]:  # type: ignore[no-untyped-def]
    return [Request(blk.T_IN, sector=8 * i, data_addr=h.ram.alloc(size), data_len=size)
            for i in range(count)]


@pytest.mark.parametrize("packed", [False, True])
def test_event_idx_batches_kicks_and_interrupts(packed: bool) -> None:
    h = make_harness(driver_kwargs={"packed": packed, "event_idx": True})
    h.hold_io = True
    h.driver.submit(0, reads(h, 8))  # one kick for the whole submission
    assert h.driver.kicks == 1 and len(h.held) == 8
    # 8 requests in flight: the device keeps kicks suppressed and will poll instead
    h.driver.submit(0, reads(h, 16))
    assert h.driver.kicks == 1 and len(h.held) == 8
    irqs_before = h.irqs
    h.release_held()  # completing the 8 polls the ring and picks up the 16
    assert h.irqs - irqs_before == 1  # one interrupt for the batch
    assert len(h.held) == 16
    h.release_held()
    done = h.deliver_irq()
    assert len(done) == 24 and all(r.status == blk.S_OK for r in done)
    assert h.driver.kicks == 1  # 24 requests, one trap


@pytest.mark.parametrize("packed", [False, True])
def test_driver_suppressing_interrupts_gets_none(packed: bool) -> None:
    h = make_harness(driver_kwargs={"packed": packed, "event_idx": False})
    h.driver.disable_callbacks(h.driver.queues[0])
    h.irqs = 0
    h.driver.submit(0, reads(h, 4))
    assert h.irqs == 0
    done = h.driver.harvest(h.driver.queues[0])
    assert len(done) == 4


def test_split_event_idx_used_event_decides_interrupts() -> None:
    h = make_harness(driver_kwargs={"packed": False, "event_idx": True})
    queue = h.driver.queues[0]
    avail_phys = h.driver._phys(queue.avail)
    # ask for an interrupt only once used idx passes 3 (i.e. after the 4th completion)
    struct.pack_into("<H", h.ram.view(avail_phys, 6 + 2 * queue.size), 4 + 2 * queue.size, 3)
    h.irqs = 0
    for i in range(6):
        h.driver.submit(0, [Request(blk.T_IN, sector=i, data_addr=h.ram.alloc(512),
                                    data_len=512)])
        assert h.irqs == (1 if i >= 3 else 0), i


@pytest.mark.parametrize("packed", [False, True])
def test_reset_in_the_middle_of_io_drops_completions_and_writes_nothing(packed: bool) -> None:
    h = make_harness(driver_kwargs={"packed": packed})
    h.hold_io = True
    payload = b"\x77" * 4096
    h.driver.submit(0, [Request(blk.T_OUT, data_addr=data_buffer(h, payload), data_len=4096),
                        *reads(h, 3)])
    assert len(h.held) == 4
    old = h.driver.queues[0]
    ring_addr, ring_len = (old.desc, 16 * old.size) if packed else (old.used, 6 + 8 * old.size)
    h.driver.reset()  # Status <- 0 while 4 requests are in flight
    assert any(isinstance(e, mmio.DeviceReset) for e in h.effects)
    ring_before = bytes(h.ram.view(ring_addr, ring_len))
    h.irqs = 0
    h.release_held()  # the engine finishes them after the reset
    assert h.irqs == 0
    assert bytes(h.ram.view(ring_addr, ring_len)) == ring_before  # old ring untouched
    # re-probe works and the old completions never show up in the new rings
    h.hold_io = False
    h.driver.probe()
    done = h.do(reads(h, 2))
    assert len(done) == 2 and all(r.status == blk.S_OK for r in done)
    assert h.device.pending() == 0


def test_split_layout_as_written_by_the_driver() -> None:
    h = make_harness(driver_kwargs={"packed": False, "indirect": True, "event_idx": True})
    h.hold_io = True
    payload = b"p" * 6000
    data = data_buffer(h, payload)
    h.driver.submit(0, [Request(blk.T_OUT, sector=5, data_addr=data, data_len=6000)])
    q = h.driver.queues[0]
    avail = h.ram.view(q.avail, 6 + 2 * q.size)
    flags, idx, head = struct.unpack_from("<HHH", avail, 0)
    assert (flags, idx) == (0, 1)
    addr, length, dflags, _next = struct.unpack("<QIHH", h.ram.view(q.desc + 16 * head, 16))
    assert dflags == DESC_F_INDIRECT and length % 16 == 0
    table = h.ram.view(addr, length)
    entries = [struct.unpack_from("<QIHH", table, off) for off in range(0, length, 16)]
    assert [e[1] for e in entries] == [16, 4096 - (data % 4096), 6000 - (4096 - data % 4096),
                                       1][: len(entries)] or entries[1][1] + entries[2][1] == 6000
    hdr_addr = entries[0][0]
    assert struct.unpack("<IIQ", h.ram.view(hdr_addr, 16)) == (blk.T_OUT, 0, 5)
    assert [e[2] for e in entries] == [DESC_F_NEXT] * (len(entries) - 1) + [DESC_F_WRITE]
    assert [e[3] for e in entries[:-1]] == list(range(1, len(entries)))
    h.release_held()
    used = h.ram.view(q.used, 6 + 8 * q.size)
    _uflags, uidx, uid, ulen = struct.unpack_from("<HHII", used, 0)
    assert (uidx, uid, ulen) == (1, head, 1)
    # EVENT_IDX: the device published avail_event = next avail index it expects
    assert struct.unpack_from("<H", used, 4 + 8 * q.size)[0] == 1


def test_packed_layout_and_wrap_counters() -> None:
    h = make_harness(driver_kwargs={"packed": True, "indirect": False, "event_idx": False},
                     options=BlkOptions(serial="w", queue_size=8))
    q = h.driver.queues[0]
    ring = h.ram.view(q.desc, 16 * q.size)
    h.hold_io = True
    h.driver.submit(0, reads(h, 2, size=512))  # 3 descriptors each: slots 0-5
    flags = [struct.unpack_from("<H", ring, 16 * i + 14)[0] for i in range(6)]
    assert all(f & PACKED_DESC_F_AVAIL and not f & PACKED_DESC_F_USED for f in flags)
    assert [f & (DESC_F_NEXT | DESC_F_WRITE) for f in flags] == [
        DESC_F_NEXT, DESC_F_NEXT | DESC_F_WRITE, DESC_F_WRITE] * 2
    ids = [struct.unpack_from("<H", ring, 16 * i + 12)[0] for i in range(6)]
    assert ids[0:3] == [ids[2]] * 3 and ids[3:6] == [ids[5]] * 3 and ids[2] != ids[5]
    h.release_held()
    # used descriptors: written over the first slot of each list, AVAIL=USED=1 (wrap 1)
    for slot, buffer_id in ((0, ids[2]), (3, ids[5])):
        length, used_id, uflags = struct.unpack_from("<IHH", ring, 16 * slot + 8)
        assert used_id == buffer_id and length == 513
        assert uflags & PACKED_DESC_F_AVAIL and uflags & PACKED_DESC_F_USED
    h.deliver_irq()
    # the third list wraps: slots 6,7 then 0 with the wrap counter flipped
    h.driver.submit(0, reads(h, 1, size=512))
    f6, f7 = (struct.unpack_from("<H", ring, 16 * i + 14)[0] for i in (6, 7))
    f0 = struct.unpack_from("<H", ring, 14)[0]
    assert f6 & PACKED_DESC_F_AVAIL and f7 & PACKED_DESC_F_AVAIL
    assert not f0 & PACKED_DESC_F_AVAIL and f0 & PACKED_DESC_F_USED  # wrap counter 0
    h.release_held()
    done = h.deliver_irq()
    assert len(done) == 1 and done[0].status == blk.S_OK
    assert h.device.transport.queues[0].used_wrap == 0  # type: ignore[union-attr]


def test_grant_mode_requires_access_platform() -> None:
    # A driver that does not accept ACCESS_PLATFORM cannot get FEATURES_OK in grant mode.
    with pytest.raises(DriverError, match="FEATURES_OK clear"):
        make_harness(options=BlkOptions(serial="g", access_platform=True),
                     driver_kwargs={"grants": False})
    h = make_harness(options=BlkOptions(serial="g", access_platform=True),
                     driver_kwargs={"grants": True})
    assert h.driver.has(mmio.F_ACCESS_PLATFORM)
    assert h.device.transport.status & mmio.STATUS_FEATURES_OK
    # without grants the device does not offer it, and a grant-mode guest refuses the device
    with pytest.raises(DriverError, match="ACCESS_PLATFORM"):
        make_harness(driver_kwargs={"grants": True})


@pytest.mark.parametrize("packed", [False, True])
def test_idle_queue_that_turns_busy_is_polled_on_completion(packed: bool) -> None:
    """An idle queue's notifications are on and its completions do not look at the ring;
    once a kick brings enough requests to turn kicks off, completions must poll again
    (or the requests the driver adds without kicking would wait for ever)."""
    h = make_harness(driver_kwargs={"packed": packed, "event_idx": True})
    h.driver.submit(0, reads(h, 1))
    assert [r.status for r in h.deliver_irq()] == [blk.S_OK]  # idle again, kicks on
    kicks = h.driver.kicks
    h.hold_io = True
    h.driver.submit(0, reads(h, 8))  # one kick; 8 in flight: kicks turned off
    assert h.driver.kicks == kicks + 1 and len(h.held) == 8
    h.driver.submit(0, reads(h, 4))  # no kick: the device said it polls
    assert h.driver.kicks == kicks + 1 and len(h.held) == 8
    h.release_held()  # this completion must take the 4
    assert len(h.held) == 4
    h.release_held()
    done = h.deliver_irq()
    assert len(done) == 12 and all(r.status == blk.S_OK for r in done)
