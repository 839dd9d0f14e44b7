"""The whole data path on the simulated host: guest driver → trapped MMIO → IOREQ
server → device model → disk engine → file, and back, with data verified."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from vdtest.simstack import BASE, start_stack, stop_stack
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
            nursery.cancel_scope.cancel()
            stop_stack(stack)
