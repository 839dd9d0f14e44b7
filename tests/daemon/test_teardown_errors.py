"""A guest's teardown seen through errors: xenstore refusing to read the device's own
nodes must close that device, not end the worker serving the guest (on real Xen a
driver domain got EINVAL reading its backend ``state`` while the guest was destroyed;
the worker died, was restarted and served the device again, and libxl timed out)."""

from __future__ import annotations

import errno
from pathlib import Path

import trio

from vdtest.daemonrun import running_daemon
from virtio_diskd.ioreq.sim.toolstack import DiskSpec
from virtio_diskd.ioreq.sim.workload import WorkloadSpec


def _comm_pids(name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def test_an_unreadable_backend_state_closes_the_device_and_the_worker_lives(
        tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        plan = (await run.create(1, [DiskSpec(run.image("a.img", 8), "xvda"),
                                     DiskSpec(run.image("b.img", 8), "xvdb")]))
        drivers = [await run.driver(1, p) for p in plan]
        workers_before = set(_comm_pids("vd-dom1"))
        assert len(workers_before) == 1
        doomed, other = plan[0], plan[1]
        run.host.xenstored.refused_reads[(0, f"{doomed.backend}/state")] = errno.EINVAL
        # any change under the backend dir makes the worker look at its state
        await run.host.xs.write(f"{doomed.backend}/hotplug-status", "connected")
        # (the test's own reads are dom0's too: watch the daemon's log instead)
        with trio.fail_after(10):
            while not any("xenbus.state" in line and f"devid={doomed.devid}" in line
                          and "state=6" in line for line in run.log_text().splitlines()):
                await trio.sleep(0.05)
        run.host.xenstored.refused_reads.clear()
        assert await run.state(1, doomed.devid) == "6"
        # the same worker still serves the guest's other disk
        result = await run.workload(1, drivers[1], WorkloadSpec(requests=200, sectors=1024))
        assert result.ok and result.every_read_verified
        assert await run.state(1, other.devid) == "4"
        assert set(_comm_pids("vd-dom1")) == workers_before
        log = run.log_text()
        assert "xenbus.backend_unreadable" in log and "worker.crashed" not in log
