"""A worker confines its Xen handles to its guest once the guest's devices are set up
(xentoolcore_restrict_all, as QEMU's -xen-domid-restrict): it says so only after a
probe — mapping a page of another domain — failed with EPERM, and its guest's I/O,
grant-mapped or not, is unaffected.  It runs with no-new-privileges and
with no capability left in any thread."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from vdtest.daemonrun import running_daemon
from vdtest.disruption import destroy_within_deadline
from virtio_diskd.daemon.privileges import read_capabilities
from virtio_diskd.ioreq.sim.toolstack import DiskSpec
from virtio_diskd.ioreq.sim.workload import WorkloadSpec


async def test_a_confined_worker_serves_its_guest(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        # a foreign-mapped and a grant-mapped disk: whichever device is set up first,
        # the other is served with handles opened before or after the confinement
        plans = await run.create(1, [DiskSpec(run.image("a.img", 8), "xvda"),
                                     DiskSpec(run.image("b.img", 8), "xvdb",
                                              grant_usage=True)])
        with trio.fail_after(10):  # right after the devices are served
            while "worker.confined" not in run.log_text():
                await trio.sleep(0.02)
        assert "probe=EPERM" in run.log_text()
        worker = run.serving_worker(1)
        status = Path(f"/proc/{worker}/status").read_text()
        assert "NoNewPrivs:\t1" in status  # nothing it runs can gain privileges
        supervisor = Path(f"/proc/{run.daemon.pid}/status").read_text()
        assert "NoNewPrivs:\t0" in supervisor  # (only the workers: no unit here)
        for plan, grants, seed in ((plans[0], False, 1), (plans[1], True, 2)):
            driver = await run.driver(1, plan, grants=grants)
            result = await run.workload(1, driver, WorkloadSpec(requests=300, sectors=2048,
                                                                seed=seed))
            assert result.ok, result.mismatches
        assert "worker.confinement_failed" not in run.log_text()
        # every thread of the worker (its I/O threads included) holds no capability,
        # not even in its bounding set; the supervisor (root here) keeps its own
        for task in Path(f"/proc/{worker}/task").iterdir():
            caps = read_capabilities(f"{worker}/task/{task.name}").sets
            assert caps == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": 0,
                            "CapAmb": 0}, (task.name, caps)
        assert "capabilities=none" in run.log_text()
        if os.geteuid() == 0:
            assert read_capabilities(run.daemon.pid).sets["CapEff"] != 0
        await destroy_within_deadline(run)


async def test_no_confine_leaves_the_handles_alone(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["--no-confine"]) as run:
        plan = (await run.create(1, [DiskSpec(run.image("a.img", 8))]))[0]
        driver = await run.driver(1, plan)
        result = await run.workload(1, driver, WorkloadSpec(requests=100, sectors=2048))
        assert result.ok
        assert "worker.confined" not in run.log_text()
        await destroy_within_deadline(run)
