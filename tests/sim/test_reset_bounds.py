"""A reset means no more guest memory access, and teardown is bounded on a slow target.

On the whole simulated stack (trapped MMIO, IOREQ server, device, real engine on a
file) with a slow disk under the engine: a device reset or QueueReady ← 0 is
answered only once no request of the old rings is in flight — and cancelled
requests stop within one transfer piece, so that wait is short — and no guest
buffer changes after the answer.  Teardown with every queue full of large
requests reaches "nothing in flight" well inside libxl's 10 s.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import trio

from vdtest.simstack import BASE, start_stack, stop_stack
from virtio_diskd.backend import mmio
from virtio_diskd.backend.disk.engine import TRANSFER_CHUNK, DiskIo
from virtio_diskd.ioreq.sim.linux_driver import Request
from virtio_diskd.ioreq.sim.machine import attach_driver
from virtio_diskd.ioreq.sim.virtio_spec import BLK_T_IN

MiB = 1 << 20


class SlowDisk(DiskIo):
    """One slow device: transfers take their turn and ``seconds_per_mib`` each MiB;
    the time each transfer's data landed is recorded.  Non-blocking reads refuse, as
    for data not in the page cache."""

    def __init__(self, seconds_per_mib: float) -> None:
        self.seconds_per_mib = seconds_per_mib
        self.lock = threading.Lock()
        self.started = threading.Event()
        self.landed: list[float] = []

    def _slow(self, op, fd, buffers, offset, flags):  # type: ignore[no-untyped-def]
        if flags & os.RWF_NOWAIT:
            raise BlockingIOError(errno.EAGAIN, "not cached")
        with self.lock:
            self.started.set()
            time.sleep(sum(len(b) for b in buffers) / MiB * self.seconds_per_mib)
            count = op(fd, buffers, offset, flags)
            self.landed.append(time.monotonic())
        return count

    def preadv(self, fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        return self._slow(os.preadv, fd, buffers, offset, flags)  # type: ignore[no-any-return]

    def pwritev(self, fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        return self._slow(os.pwritev, fd, buffers, offset, flags)  # type: ignore[no-any-return]


def _guest_writes_during_a_slow_read(stack, driver, disk: SlowDisk, what: str,  # type: ignore[no-untyped-def]
                                     length: int) -> tuple[float, int, bytes]:
    """In the vCPU: a large read, then (while it runs) a reset or QueueReady ← 0; then
    the buffer is overwritten with a pattern.  Returns when the write was answered."""
    vcpu = stack.guest.vcpus[0]
    buffer = driver.ram.alloc(length)

    def scenario() -> tuple[float, int]:
        driver.submit(0, [Request(BLK_T_IN, sector=0, data_addr=buffer, data_len=length)])
        assert disk.started.wait(10)
        if what == "reset":
            driver.w32(mmio.REG_STATUS, 0)
        else:
            driver.w32(mmio.REG_QUEUE_SEL, 0)
            driver.w32(mmio.REG_QUEUE_READY, 0)
        answered = time.monotonic()
        driver.ram.view(buffer, length)[:] = b"\xaa" * length
        return answered, buffer

    answered, addr = vcpu.call(scenario, 60)
    return answered, addr, b""


@pytest.mark.parametrize("what", ["reset", "queue_ready_0"])
@pytest.mark.parametrize("grants", [False, True], ids=["foreign", "grants"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_no_guest_buffer_is_written_after_the_answer(tmp_path: Path, what: str,
                                                           grants: bool, packed: bool) -> None:
    disk = SlowDisk(seconds_per_mib=0.25)  # an 8 MiB read takes 2 s, one piece 0.25 s
    length = 8 * MiB
    stack = None
    try:
        async with trio.open_nursery() as nursery:
            stack = await start_stack(nursery, tmp_path, grants=grants, disk_io=disk,
                                      memory_mib=64)
            driver = await trio.to_thread.run_sync(
                lambda: attach_driver(stack.guest, BASE, 33, grants=grants, packed=packed))
            image = stack.images[0]
            with open(image, "r+b") as f:
                f.write(b"\x55" * length)  # what a late read would put into the buffer
            started = time.monotonic()
            answered, addr, _ = await trio.to_thread.run_sync(
                lambda: _guest_writes_during_a_slow_read(stack, driver, disk, what, length))
            device = stack.devices[0]
            with trio.fail_after(10):
                while device.engine.in_flight:
                    await trio.sleep(0.01)
            await trio.sleep(0.1)
            assert bytes(driver.ram.view(addr, length)) == b"\xaa" * length, \
                "a guest buffer was written after the answer"
            assert disk.landed and max(disk.landed) <= answered
            # cancelled: the answer came after at most a piece or two, not the whole read
            assert answered - started < 2 * TRANSFER_CHUNK / MiB * 0.25 + 1.0
            assert device.blk.pending() == 0
            nursery.cancel_scope.cancel()
    finally:  # after the nursery: no task still uses the stack's handles
        if stack is not None:
            stop_stack(stack)


@pytest.mark.parametrize("direct", [False, True], ids=["cached", "direct"])
async def test_teardown_with_full_queues_of_large_requests_is_bounded(tmp_path: Path,
                                                                       direct: bool) -> None:
    """Every slot of the queue holds a maximum-size request (seg_max buffers of size_max,
    all over one guest buffer) on a target that moves 50 MB/s; teardown's quiesce (as
    the daemon runs it) ends with nothing in flight, well inside libxl's 10 s."""
    disk = SlowDisk(seconds_per_mib=0.02)
    stack = None
    try:
        async with trio.open_nursery() as nursery:
            stack = await start_stack(nursery, tmp_path, disk_io=disk, disk_mib=256,
                                      memory_mib=300, direct=direct)
            driver = await trio.to_thread.run_sync(lambda: attach_driver(stack.guest, BASE, 33))
            device = stack.devices[0]
            seg_max, size_max = device.blk.seg_max, device.blk.options.size_max
            biggest = (seg_max - 1) * size_max
            buffer = driver.ram.alloc(biggest)
            requests = [Request(BLK_T_IN, sector=0, data_addr=buffer, data_len=biggest)
                        for _ in range(256)]

            def fill() -> int:
                added = driver.submit(0, requests)
                return added

            added = await trio.to_thread.run_sync(lambda: stack.guest.vcpus[0].call(fill, 60))
            with trio.fail_after(10):
                while device.blk.pending() < added:
                    await trio.sleep(0.01)
            started = time.monotonic()
            with trio.fail_after(10):
                drained = await device.quiesce(1.0, 4.0)
            took = time.monotonic() - started
            print(f"teardown quiesce with {added} requests of {biggest >> 20} MiB in flight "
                  f"({'O_DIRECT' if direct else 'page cache'}, 50 MB/s target): {took:.2f} s")
            assert drained and device.blk.pending() == 0 and device.engine.in_flight == 0
            assert took < 10.0
            nursery.cancel_scope.cancel()
    finally:
        if stack is not None:
            stop_stack(stack)
