"""A guest kernel without CONFIG_XEN_VIRTIO on a disk that expects grants (issue #19's
negative case, seen on real Xen with Debian's kernels): its driver accepts
VIRTIO_F_ACCESS_PLATFORM but gives guest-physical addresses.  The device stops
(DEVICE_NEEDS_RESET), its ``error`` node and the log name the likely cause, the
guest's other disk carries on, and ``xl destroy`` meets libxl's deadline."""

from __future__ import annotations

from pathlib import Path

import trio

from vdtest.daemonrun import running_daemon
from vdtest.disruption import destroy_within_deadline
from virtio_diskd.ioreq.sim import virtio_spec as spec
from virtio_diskd.ioreq.sim.linux_driver import DriverError
from virtio_diskd.ioreq.sim.machine import attach_driver
from virtio_diskd.ioreq.sim.toolstack import DiskSpec
from virtio_diskd.ioreq.sim.workload import WorkloadSpec


async def test_a_stock_kernel_on_a_grant_disk_fails_that_disk_clearly(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        plans = await run.create(1, [DiskSpec(run.image("g.img", 8), "xvda", grant_usage=True),
                                     DiskSpec(run.image("p.img", 8), "xvdb")])
        guest = run.host.guests[1]
        stock = plans[0]

        def probe_like_a_stock_kernel() -> str:
            try:
                driver = attach_driver(guest, stock.base, stock.irq, accept_platform=True)
            except DriverError as exc:
                return f"probe failed: {exc}"
            status = guest.vcpus[0].call(lambda: driver.r32(spec.REG_STATUS), 10)
            return f"status {status:#x}"

        outcome = await trio.to_thread.run_sync(probe_like_a_stock_kernel)
        error_node = f"/local/domain/0/backend/virtio_disk/1/{stock.devid}/error"
        with trio.fail_after(10):
            while (error := await run.host.xs.read_or_none(error_node)) is None:
                await trio.sleep(0.05)
        assert "CONFIG_XEN_VIRTIO" in error and "guest-physical address" in error, error
        assert "device.guest_without_grant_support" in run.log_text()
        print(f"\nstock kernel on a grant disk: {outcome}; error node: {error}")
        # the guest's other disk is unaffected
        plain = await run.driver(1, plans[1])
        result = await run.workload(1, plain, WorkloadSpec(requests=300, sectors=2048))
        assert result.ok, result.mismatches
        await destroy_within_deadline(run)
