"""The benchmark's verification can fail: a read that differs from the disk, or an
acknowledged write the disk does not hold, is reported."""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio

from vdtest.simstack import BASE, start_stack, stop_stack_in
from virtio_diskd.ioreq.sim.machine import attach_driver
from virtio_diskd.ioreq.sim.workload import Workload, WorkloadSpec


async def test_reads_are_checked_against_the_disk_and_writes_on_the_disk(
        tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        stack = await start_stack(nursery, tmp_path, disk_mib=4)
        try:
            image = stack.images[0]
            content = bytearray(os.urandom(4 << 20))
            image.write_bytes(content)
            driver = await trio.to_thread.run_sync(lambda: attach_driver(stack.guest, BASE, 33))
            vcpu = stack.guest.vcpus[0]

            async def run(spec: WorkloadSpec, reference: memoryview | None) -> Workload:
                workload = Workload(driver, vcpu, spec, reference=reference)
                await trio.to_thread.run_sync(lambda: vcpu.call(workload.run, 60))
                return workload

            reads = WorkloadSpec(mix="read", requests=200, queue_depth=8, sectors=8192,
                                 write_first=False, seed=2)
            good = await run(reads, memoryview(content))
            assert good.result.ok and good.result.every_read_verified
            assert good.result.verified_read_bytes == good.result.read_bytes > 0

            wrong = bytearray(content)
            for offset in range(0, len(wrong), 4096):
                wrong[offset] ^= 0xFF  # one byte in every block differs from the disk
            bad = await run(reads, memoryview(wrong))
            assert bad.result.mismatches and not bad.result.every_read_verified

            unchecked = await run(reads, None)  # nothing to compare with: not verified
            assert not unchecked.result.every_read_verified

            writes = await run(WorkloadSpec(mix="write", requests=100, queue_depth=8,
                                            sectors=8192, write_first=False, seed=4), None)
            assert writes.result.ok

            def read_at(offset: int, length: int) -> bytes:
                with open(image, "rb") as f:
                    return os.pread(f.fileno(), length, offset)

            blocks = len(writes.acked)
            assert writes.verify_disk(read_at) == blocks > 0
            assert writes.result.disk_blocks_checked == blocks and not writes.result.mismatches
            block = sorted(writes.acked)[0]
            with open(image, "r+b") as f:  # the disk loses one acknowledged write
                os.pwrite(f.fileno(), bytes(512), block * 4096)
            writes.verify_disk(read_at)
            assert any("does not hold the acknowledged write" in m
                       for m in writes.result.mismatches)
        finally:
            await stop_stack_in(nursery, stack)


def test_wake_floor_and_raw_loops_measure_something(tmp_path: Path) -> None:
    from virtio_diskd.daemon.tools.bench_engine import _raw_run
    from virtio_diskd.daemon.tools.bench_full import wake_floor

    floor = wake_floor(200)
    assert floor.round_trip_us > 0 and floor.cpu_us_per_wake >= 0
    image = tmp_path / "raw.img"
    image.write_bytes(os.urandom(1 << 20))
    for depth in (1, 4):
        iops, mbs = _raw_run(str(image), write=False, size=4096, sequential=False,
                             direct=False, seconds=0.05, file_size=1 << 20, depth=depth)
        assert iops > 0 and abs(mbs - iops * 4096 / 1e6) < 1e-6 * mbs


def test_engine_benchmark_gives_no_figure_for_failed_or_unanswered_requests(
        tmp_path: Path) -> None:
    """The engine benchmark reuses its request objects; a request the engine fails, or
    completes without saying OK, stops it with an error instead of counting."""
    import errno
    from typing import ClassVar

    import pytest

    from virtio_diskd.backend.disk.engine import DiskEngine, DiskIo
    from virtio_diskd.backend.disk.request import DiskRequest, IoStatus
    from virtio_diskd.backend.disk.target import DiskTarget
    from virtio_diskd.daemon.tools.bench_engine import _engine_run

    image = tmp_path / "engine.img"
    image.write_bytes(os.urandom(1 << 20))

    class FailsSometimes(DiskIo):
        calls = 0

        def preadv(self, fd: int, buffers: list[memoryview], offset: int,
                   flags: int = 0) -> int:
            FailsSometimes.calls += 1
            if FailsSometimes.calls % 50 == 0:
                raise OSError(errno.EIO, "injected media error")
            return super().preadv(fd, buffers, offset, flags)

    class SaysNothing(DiskEngine[DiskRequest]):
        """Completes every request, and once in a while leaves its status as it was
        when it was submitted (as an engine that forgot to set it would)."""

        submitted_with: ClassVar[dict[int, IoStatus]] = {}

        def submit(self, requests: list[DiskRequest]) -> list[DiskRequest]:
            self.submitted_with.update((id(r), r.status) for r in requests)
            return super().submit(requests)

        def take_completions(self, limit: int = 0) -> list[DiskRequest]:
            done = super().take_completions(limit)
            for request in done[::7]:
                request.status = self.submitted_with[id(request)]
            return done

    def run(engine: DiskEngine[DiskRequest]) -> tuple[float, float, float]:
        return _engine_run(str(image), write=False, size=4096, depth=8, sequential=False,
                           direct=False, seconds=0.2, file_size=1 << 20,
                           open_engine=lambda: engine)

    iops, _mbs, _cpu = run(DiskEngine(DiskTarget(str(image)), workers=2))
    assert iops > 0
    with pytest.raises(RuntimeError, match="requests failed"):
        run(DiskEngine(DiskTarget(str(image)), workers=2, io=FailsSometimes()))
    with pytest.raises(RuntimeError, match="requests failed"):
        run(SaysNothing(DiskTarget(str(image)), workers=2, inline_reads=False))


class _MisdirectedReads:
    """Planted fault under the engine: every read lands ``shift`` bytes further on."""

    def __init__(self, shift: int) -> None:
        self.shift = shift

    def preadv(self, fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        if flags & os.RWF_NOWAIT:
            raise BlockingIOError  # to the workers, where the fault is
        return os.preadv(fd, buffers, (offset + self.shift) % (4 << 20), flags)


async def _reads_with_shift(tmp: Path, shift: int) -> Workload:
    from virtio_diskd.backend.disk.engine import DiskIo
    from virtio_diskd.daemon.tools.simrun import make_image

    class Shifted(_MisdirectedReads, DiskIo):
        pass

    tmp.mkdir()
    async with trio.open_nursery() as nursery:
        stack = await start_stack(nursery, tmp, disk_mib=4, disk_io=Shifted(shift))
        try:
            image = stack.images[0]
            make_image(str(image), 4 << 20, random_fill=True)
            content = memoryview(image.read_bytes())
            driver = await trio.to_thread.run_sync(lambda: attach_driver(stack.guest, BASE, 33))
            vcpu = stack.guest.vcpus[0]
            workload = Workload(driver, vcpu, WorkloadSpec(
                mix="read", requests=64, queue_depth=4, sectors=8192, write_first=False,
                seed=5, block_size=1 << 20), reference=content)
            await trio.to_thread.run_sync(lambda: vcpu.call(workload.run, 60))
            return workload
        finally:
            await stop_stack_in(nursery, stack)


async def test_a_read_a_whole_mib_off_fails_verification_against_a_filled_image(
        tmp_path: Path) -> None:
    """The benchmark's image has no two sectors alike (each carries its address), so a
    misdirected read is caught even when it lands a multiple of 1 MiB off — which a
    repeated 1 MiB chunk would have let pass."""
    for shift, caught in ((0, False), (1 << 20, True), (2 << 20, True)):
        workload = await _reads_with_shift(tmp_path / f"s{shift}", shift)
        assert bool(workload.result.mismatches) is caught, (shift, workload.result.mismatches)
        assert workload.result.every_read_verified is not caught


async def test_queue_depth_one_splits_latency_into_device_wait_and_guest_time(
        tmp_path: Path) -> None:
    """The bench's QD1 figure: the part of each request's latency the vCPU spent waiting
    for the backend (trapped accesses, the interrupt) is told apart from the simulated
    driver's own time."""
    async with trio.open_nursery() as nursery:
        stack = await start_stack(nursery, tmp_path, disk_mib=4)
        try:
            driver = await trio.to_thread.run_sync(lambda: attach_driver(stack.guest, BASE, 33))
            vcpu = stack.guest.vcpus[0]

            async def run(depth: int) -> Workload:
                spec = WorkloadSpec(mix="read", requests=50, queue_depth=depth, sectors=8192,
                                    write_first=False, seed=3)
                workload = Workload(driver, vcpu, spec)
                await trio.to_thread.run_sync(lambda: vcpu.call(workload.run, 60))
                assert workload.result.ok
                return workload

            qd1 = (await run(1)).result
            assert len(qd1.device_waits_us) == len(qd1.latencies_us) == 50
            assert all(0 < wait <= latency
                       for wait, latency in zip(qd1.device_waits_us, qd1.latencies_us, strict=True))
            assert (await run(4)).result.device_waits_us == []  # overlapping: not split

            # a wait for an interrupt that does not come counts in full
            before = vcpu.waited_s
            await trio.to_thread.run_sync(lambda: vcpu.call(lambda: vcpu.sleep(0.02), 5))
            assert vcpu.waited_s - before >= 0.015

            # the guest's own code gets 2 ms slower per request: the latency shows it,
            # the device wait does not
            elements = driver._elements

            def slow_elements(*args: object, **kwargs: object) -> object:
                time.sleep(0.002)
                return elements(*args, **kwargs)

            driver._elements = slow_elements  # type: ignore[method-assign]
            slow = (await run(1)).result
            assert min(slow.latencies_us) >= 2000
            assert sorted(slow.device_waits_us)[25] < 1000
        finally:
            await stop_stack_in(nursery, stack)
