"""The whole data path on the simulated host: guest driver → trapped MMIO → IOREQ
server → device model → disk engine → file, and back, with data verified."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from vdtest.simstack import BASE, start_stack, stop_stack_in
from virtio_diskd.backend import blk
from virtio_diskd.ioreq import idle_serving
from virtio_diskd.ioreq.sim.linux_driver import Request
from virtio_diskd.ioreq.sim.machine import attach_driver
from virtio_diskd.ioreq.sim.workload import Workload, WorkloadSpec


async def _run_workload(stack, driver, spec: WorkloadSpec, vcpu: int = 0):  # type: ignore[no-untyped-def]
    workload = Workload(driver, stack.guest.vcpus[vcpu], spec)
    return await trio.to_thread.run_sync(
        lambda: stack.guest.vcpus[vcpu].call(workload.run, 120))


@pytest.mark.parametrize("grants", [False, True], ids=["foreign", "grants"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_verified_workload_through_the_whole_stack(tmp_path: Path, grants: bool,
                                                         packed: bool) -> None:
    async with trio.open_nursery() as nursery:
        stack = await start_stack(nursery, tmp_path, grants=grants)
        try:
            driver = await trio.to_thread.run_sync(
                lambda: attach_driver(stack.guest, BASE, 33, grants=grants, packed=packed))
            assert driver.has(33) is grants  # ACCESS_PLATFORM only in grant mode
            result = await _run_workload(stack, driver, WorkloadSpec(
                requests=400, queue_depth=8, sectors=4096, seed=3))
            assert result.ok, (result.errors, result.mismatches)
            assert result.reads > 0 and result.writes > 0 and result.verified_sectors > 0
            assert stack.server.stats.traps > 0 and stack.devices[0].counters.irqs > 0
            if grants:
                # every buffer grant was revoked cleanly; only the queue's three ring
                # areas (granted read-write at set-up) are still granted and mapped
                assert driver.broken is None
                assert len(stack.guest.grants) == 3
                assert all(e.mapped == 1 and not e.readonly
                           for e in stack.guest.grants.values())
        finally:
            await stop_stack_in(nursery, stack)


@pytest.mark.parametrize("grants", [False, True], ids=["foreign", "grants"])
@pytest.mark.parametrize("vcpus", [1, 2, 4])
async def test_several_disks_several_vcpus_with_invalidate_storm(tmp_path: Path, vcpus: int,
                                                                 grants: bool) -> None:
    async with trio.open_nursery() as nursery:
        stack = await start_stack(nursery, tmp_path, disks=2, vcpus=vcpus, grants=grants)
        try:
            drivers = [await trio.to_thread.run_sync(
                lambda i=i: attach_driver(stack.guest, BASE + 0x200 * i, 33 + i, grants=grants))
                for i in range(2)]
            stop = trio.Event()

            async def storm() -> None:
                while not stop.is_set():
                    stack.guest.request_invalidate()
                    await trio.sleep(0.002)

            nursery.start_soon(storm)
            results = []
            jobs_count = max(vcpus, 2)  # every vCPU works, and every disk gets work
            async with trio.open_nursery() as jobs:
                for job in range(jobs_count):
                    driver = drivers[job % 2]
                    spec = WorkloadSpec(requests=150, queue_depth=4, sectors=2048, seed=10 + job,
                                        first_sector=4096 * (job // 2))
                    jobs.start_soon(lambda d=driver, s=spec, v=job % vcpus: _collect(
                        results, _run_workload(stack, d, s, vcpu=v)))
            stop.set()
            assert len(results) == jobs_count
            for result in results:
                assert result.ok, (result.errors, result.mismatches)
            assert stack.server.stats.invalidates > 0
            if not grants:  # grant mappings are per request: nothing cached to drop
                assert sum(m.invalidations for m in stack.memories) > 0  # type: ignore[attr-defined]
            # each disk's data went to its own image
            assert all(d.blk.stats.written_bytes > 0 for d in stack.devices)
        finally:
            await stop_stack_in(nursery, stack)


async def _collect(results: list, awaitable) -> None:  # type: ignore[no-untyped-def, type-arg]
    results.append(await awaitable)


async def test_guest_revoking_grants_early_costs_only_its_device(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        stack = await start_stack(nursery, tmp_path, disks=2, grants=True)
        try:
            bad = await trio.to_thread.run_sync(
                lambda: attach_driver(stack.guest, BASE, 33, grants=True, packed=False))
            good = await trio.to_thread.run_sync(
                lambda: attach_driver(stack.guest, BASE + 0x200, 34, grants=True))
            grant_dma = bad.dma
            real_map = grant_dma.map

            def map_and_revoke(phys: int, length: int, writable: bool) -> int:
                dma = real_map(phys, length, writable)
                ref = (dma & ~(1 << 63)) >> 12
                for i in range((phys % 4096 + length + 4095) // 4096):
                    stack.guest.end_access(ref + i)  # revoked before the device sees it
                return dma

            grant_dma.map = map_and_revoke  # type: ignore[method-assign]
            req = Request(blk.T_IN, sector=0, data_addr=bad.ram.alloc(4096), data_len=4096)

            def submit_bad() -> bool:
                bad.submit(0, [req])
                return stack.guest.vcpus[0].wait_until(
                    lambda: bad.broken is not None or req.status is not None, 5)

            assert await trio.to_thread.run_sync(
                lambda: stack.guest.vcpus[0].call(submit_bad, 10))
            assert bad.broken == "device needs reset" or req.status == blk.S_IOERR
            status = stack.devices[0].blk.transport.status
            assert status & 0x40  # DEVICE_NEEDS_RESET on the bad device only
            assert not stack.devices[1].blk.transport.status & 0x40
            # the other device on the same guest, same IOREQ server, keeps working
            result = await _run_workload(stack, good, WorkloadSpec(requests=100, sectors=1024))
            assert result.ok
        finally:
            await stop_stack_in(nursery, stack)


async def test_rings_in_unmapped_memory_need_reset_and_the_daemon_goes_on(
        tmp_path: Path) -> None:
    from virtio_diskd.backend import mmio

    async with trio.open_nursery() as nursery:
        stack = await start_stack(nursery, tmp_path, disks=1)
        try:
            guest = stack.guest

            def hostile_setup() -> int:
                def w(off: int, val: int) -> None:
                    guest.mmio(BASE + off, 4, True, val)

                w(mmio.REG_STATUS, 0)
                w(mmio.REG_STATUS, 3)
                w(mmio.REG_DRIVER_FEATURES_SEL, 1)
                w(mmio.REG_DRIVER_FEATURES, 1)
                w(mmio.REG_STATUS, 11)
                w(mmio.REG_QUEUE_NUM, 8)
                w(mmio.REG_QUEUE_DESC_LOW, 0x1000)  # far below guest RAM
                w(mmio.REG_QUEUE_READY, 1)
                return guest.mmio(BASE + mmio.REG_STATUS, 4, False)

            status = await trio.to_thread.run_sync(lambda: guest.vcpus[0].call(hostile_setup, 10))
            assert status & mmio.STATUS_NEEDS_RESET
            # a reset and a proper probe bring the device back
            driver = await trio.to_thread.run_sync(lambda: attach_driver(guest, BASE, 33))
            result = await _run_workload(stack, driver, WorkloadSpec(requests=50, sectors=512))
            assert result.ok
        finally:
            await stop_stack_in(nursery, stack)


async def test_online_resize_reaches_the_guest(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        stack = await start_stack(nursery, tmp_path, disks=1, disk_mib=8)
        try:
            driver = await trio.to_thread.run_sync(lambda: attach_driver(stack.guest, BASE, 33))
            assert driver.capacity_sectors == (8 << 20) // 512
            with open(stack.images[0], "r+b") as f:
                f.truncate(12 << 20)
            assert stack.devices[0].check_resize()
            await trio.to_thread.run_sync(
                lambda: stack.guest.vcpus[0].call(lambda: stack.guest.vcpus[0].wait_until(
                    lambda: driver.config_changes > 0, 10), 20))
            assert driver.capacity_sectors == (12 << 20) // 512
            # the new space is usable
            result = await _run_workload(stack, driver, WorkloadSpec(
                requests=50, first_sector=(8 << 20) // 512, sectors=2048))
            assert result.ok
        finally:
            await stop_stack_in(nursery, stack)


@pytest.mark.parametrize("vcpus", [1, 2])
async def test_adaptive_polling_serves_each_trap_exactly_once(tmp_path: Path,
                                                              vcpus: int) -> None:
    """With ``poll_us`` the server finds traps in the ioreq page before their event;
    the event that follows must not serve the trap again (its slot is no longer READY)."""
    async with trio.open_nursery() as nursery:
        stack = await start_stack(nursery, tmp_path, vcpus=vcpus, poll_us=500)
        stack.hv.spin_us = 200  # vCPUs resumed at once, so traps come back to back
        # every sleep counts as short, so the window always reopens: whether sleeps are
        # short enough is up to the machine's scheduling, and this test is about serving
        # each trap once while polling, not about when polling pays
        stack.server.poll_windows.slack = 1e3
        stack.server.poll_windows.minimum = 500e-6  # and opens all the way
        try:
            driver = await trio.to_thread.run_sync(
                lambda: attach_driver(stack.guest, BASE, 33))
            traps_before = sum(v.traps for v in stack.guest.vcpus)
            served_before = stack.server.stats.traps
            results = []
            async with trio.open_nursery() as inner:
                async def one(v: int) -> None:
                    results.append(await _run_workload(stack, driver, WorkloadSpec(
                        requests=300, queue_depth=1 + v, sectors=2048, seed=11 + v,
                        queue=0, first_sector=v * 2048), vcpu=v))
                for v in range(vcpus):
                    inner.start_soon(one, v)
            for result in results:
                assert result.ok, (result.errors, result.mismatches)
            traps = sum(v.traps for v in stack.guest.vcpus) - traps_before
            assert stack.server.stats.traps - served_before == traps
            assert stack.server.stats.polled > 0
        finally:
            await stop_stack_in(nursery, stack)


@pytest.mark.parametrize("direct", [False, True], ids=["cached", "direct"])
@pytest.mark.parametrize("vcpus", [1, 2])
async def test_idle_point_serving_serves_each_trap_and_completion_once(
        tmp_path: Path, vcpus: int, direct: bool) -> None:
    """Without polling (the daemon's default) the event channel and the engine's
    completions are served at trio's idle point, not by woken tasks: every trap is
    served exactly once and every byte verifies, with I/O inline (page cache) and in
    the engine (O_DIRECT, completions through its eventfd)."""
    async with trio.open_nursery() as nursery:
        stack = await start_stack(nursery, tmp_path, vcpus=vcpus, poll_us=0, direct=direct)
        try:
            idle = idle_serving.IdleServing.of_this_run()
            served_before = idle.stats.served
            driver = await trio.to_thread.run_sync(
                lambda: attach_driver(stack.guest, BASE, 33))
            traps_before = sum(v.traps for v in stack.guest.vcpus)
            handled_before = stack.server.stats.traps
            spurious_before = stack.server.stats.spurious
            results = []
            async with trio.open_nursery() as inner:
                async def one(v: int) -> None:
                    results.append(await _run_workload(stack, driver, WorkloadSpec(
                        requests=300, queue_depth=1 + 3 * v, sectors=2048, seed=21 + v,
                        queue=0, first_sector=v * 2048), vcpu=v))
                for v in range(vcpus):
                    inner.start_soon(one, v)
            for result in results:
                assert result.ok, (result.errors, result.mismatches)
                assert result.every_read_verified
            traps = sum(v.traps for v in stack.guest.vcpus) - traps_before
            assert stack.server.stats.traps - handled_before == traps
            assert stack.server.stats.spurious == spurious_before
            assert idle.stats.served - served_before >= traps // 2  # not by woken tasks
        finally:
            await stop_stack_in(nursery, stack)
