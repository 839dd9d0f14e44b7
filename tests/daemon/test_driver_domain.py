"""Driver domains on the simulated host: Dom0's ``grant-targets`` makes a driver domain
the device model of the guest whose disk names it, and only then can it serve it.

The simulated hypervisor enforces XSM's dummy policy as Xen does (device-model calls,
foreign mapping and event-channel binding need the control domain or a target set
once), and the simulated xenstored gives a targeted domain the guest's rights.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from virtio_diskd.daemon.tools.simrun import make_image, notify_socket, start_daemon, wait_ready
from virtio_diskd.ioreq.driver_domain import RefuseTarget, SetTarget, TargetPlanner, target_path
from virtio_diskd.ioreq.sim.host import SimHost
from virtio_diskd.ioreq.sim.machine import attach_driver
from virtio_diskd.ioreq.sim.toolstack import DiskSpec, GuestSpec, ToolstackError
from virtio_diskd.ioreq.sim.workload import Workload, WorkloadSpec
from virtio_diskd.ioreq.sim.xsstore import Caller

DD = 7  # the driver domain's id


# -- the planner (sans-IO) ---------------------------------------------------------------

def test_the_planner_sets_each_driver_domains_target_once() -> None:
    planner = TargetPlanner()
    assert planner.backend_named(1, 0) == []  # Dom0 serves it: no target needed
    assert planner.backend_named(1, DD) == [SetTarget(DD, 1)]
    assert planner.backend_named(1, DD) == []  # the guest's second disk: done already
    refused = planner.backend_named(2, DD)
    assert len(refused) == 1 and isinstance(refused[0], RefuseTarget)
    assert "already the device model of dom1" in refused[0].reason
    assert planner.backend_named(2, DD) == []  # said once
    assert isinstance(planner.backend_named(3, 3)[0], RefuseTarget)  # its own backend
    assert planner.backend_named(99999, DD) == []  # not a domid


def test_a_failed_target_is_tried_again_and_a_gone_driver_domain_forgotten() -> None:
    planner = TargetPlanner()
    assert planner.backend_named(1, DD) == [SetTarget(DD, 1)]
    planner.failed(DD, 1)
    assert planner.backend_named(1, DD) == [SetTarget(DD, 1)]
    planner.domain_gone(DD)  # destroyed: a new domain with this id may serve anyone
    assert planner.backend_named(2, DD) == [SetTarget(DD, 2)]
    planner = TargetPlanner()
    planner.known(DD, 5)  # an earlier run's node
    assert isinstance(planner.backend_named(6, DD)[0], RefuseTarget)


# -- end to end on the simulated host ----------------------------------------------------

@asynccontextmanager
async def _driver_domain_host(tmp_path: Path, *, grant_targets: bool,
                              target_wait: int = 6) -> AsyncIterator[tuple[SimHost, Path, Path]]:
    """The host, a driver domain running the daemon, and (if asked) Dom0's service."""
    host = SimHost(str(tmp_path))
    procs: list[subprocess.Popen[bytes]] = []
    async with host.running():
        xs = host.xs
        home = f"/local/domain/{DD}"
        await xs.write(f"{home}/domid", str(DD))
        await xs.write(f"{home}/name", "storage-dd")
        await xs.set_perms(home, [f"n{DD}"])
        await xs.set_perms(f"{home}/domid", [f"n{DD}"])
        await xs.introduce_domain(DD)
        dd_socket = str(tmp_path / "xenstored-dom7.sock")
        await host.nursery.start(host.xenstored.serve_as, dd_socket, Caller.domain(DD))
        grants_log, dd_log = tmp_path / "grant-targets.log", tmp_path / "dd-daemon.log"
        try:
            if grant_targets:
                notify = notify_socket(str(tmp_path / "grants-notify.sock"))
                with open(grants_log, "ab") as out:
                    procs.append(subprocess.Popen(  # noqa: ASYNC220 (returns at once)
                        [sys.executable, "-m", "virtio_diskd.daemon", "grant-targets",
                         "--simulated", str(tmp_path), "--xenstore", host.xenstore_path,
                         "--log-format", "console"],
                        env={"NOTIFY_SOCKET": str(tmp_path / "grants-notify.sock"),
                             "PATH": "/usr/bin:/bin"},
                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
                assert await wait_ready(notify, 60), grants_log.read_text()
                notify.close()
            notify = notify_socket(str(tmp_path / "notify.sock"))
            procs.append(start_daemon(str(tmp_path), dd_socket, str(tmp_path / "notify.sock"),
                                      str(dd_log), ["--target-wait", str(target_wait)]))
            assert await wait_ready(notify, 60), dd_log.read_text()
            notify.close()
            yield host, grants_log, dd_log
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    await trio.to_thread.run_sync(lambda p=proc: p.wait(20))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def _create_fails(host: SimHost, spec: GuestSpec) -> None:
    """``xl create`` fails: the backend never reached InitWait."""
    failed = False
    try:
        await host.create(spec, memory_mib=64)
    except* ToolstackError:
        failed = True
    assert failed, f"dom{spec.domid} was created"


async def test_a_driver_domain_serves_the_guest_dom0_made_it_the_device_model_of(
        tmp_path: Path) -> None:
    image = str(tmp_path / "g1.img")
    make_image(image, 8 << 20)
    async with _driver_domain_host(tmp_path, grant_targets=True) as (host, grants_log, dd_log):
        plan = (await host.create(GuestSpec(1, "guest1",
                                            [DiskSpec(image, "xvda", backend_domid=DD)]),
                                  memory_mib=64))[0]
        assert host.hypervisor.targets == {DD: 1}
        assert host.xenstored.store.targets == {DD: 1}
        assert await host.xs.read(target_path(DD)) == "1"
        guest = host.guests[1]
        driver = await trio.to_thread.run_sync(
            lambda: attach_driver(guest, plan.base, plan.irq, grants=True, backend=DD))
        workload = Workload(driver, guest.vcpus[0],
                            WorkloadSpec(requests=200, seed=3, sectors=8 << 11))
        result = await trio.to_thread.run_sync(lambda: guest.vcpus[0].call(workload.run, 120))
        assert result.errors == 0 and result.mismatches == []
        assert result.verified_read_bytes > 0
        assert "targets.granted" in grants_log.read_text()
        assert "guest.device_model_right" in dd_log.read_text()

        # a second guest naming the same driver domain: Xen would refuse a second
        # target, so Dom0's service refuses it and the driver domain fails the disk
        # with the reason — the first guest carries on
        second = str(tmp_path / "g2.img")
        make_image(second, 8 << 20)
        await _create_fails(host, GuestSpec(2, "guest2", [DiskSpec(second, "xvda",
                                                                   backend_domid=DD)]))
        assert "targets.refused" in grants_log.read_text()
        assert "is the device model of dom1, not of dom2" in dd_log.read_text()
        assert host.hypervisor.targets == {DD: 1}
        again = await trio.to_thread.run_sync(lambda: guest.vcpus[0].call(workload.run, 120))
        assert again.errors == 0 and again.mismatches == []

        # xl destroy: libxl sees Closed, removes the frontend, and the driver domain
        # then removes its own backend dir (libxl cannot), within libxl's 10 s
        started = trio.current_time()
        assert await host.destroy(1) == []
        assert trio.current_time() - started < 10
        assert not await host.xs.exists(plan.backend)
        text = dd_log.read_text()
        assert text.index("xenbus.removal_released") < text.index("xenbus.backend_dir_removed")


async def test_without_dom0s_service_the_driver_domain_is_refused_by_xen(
        tmp_path: Path) -> None:
    """The planted fault for the test above: no ``grant-targets`` in Dom0.  The worker
    waits, says so, goes on, and Xen (here: the simulated one) refuses the server."""
    image = str(tmp_path / "g1.img")
    make_image(image, 8 << 20)
    async with _driver_domain_host(tmp_path, grant_targets=False, target_wait=1) as (
            host, _grants_log, dd_log):
        await _create_fails(host, GuestSpec(1, "guest1",
                                            [DiskSpec(image, "xvda", backend_domid=DD)]))
        text = dd_log.read_text()
        assert "guest.no_device_model_right" in text
        assert "is not dom1's device model" in text
        assert host.hypervisor.targets == {}
