"""``--worker-user``: once its guest runs, a worker becomes an unprivileged user, so
that it can never again open Xen's devices (which would undo the restriction of its
handles), a disk, or xenstored's socket; a hot-plugged disk is then set up by a
fresh worker that resumes the guest's devices; nothing the guest wrote is lost."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from vdtest.daemonrun import Running, running_daemon
from vdtest.disruption import destroy_within_deadline
from vdtest.fixtures import passable_to_others
from virtio_diskd.daemon import supervisor as supervisor_module
from virtio_diskd.daemon.flags import MAX_DOMID
from virtio_diskd.daemon.privileges import REPLACE_ME, WorkerUser, read_capabilities
from virtio_diskd.daemon.process import DaemonConfig
from virtio_diskd.daemon.supervisor import Supervisor
from virtio_diskd.ioreq.sim.toolstack import DiskSpec
from virtio_diskd.ioreq.sim.workload import WorkloadSpec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changing user takes root")

BASE = 60000  # --worker-user 60000:60000+: guest N's worker becomes uid 60000 + N


@pytest.fixture(autouse=True)
def _traversable(tmp_path: Path) -> Iterator[None]:
    with passable_to_others(tmp_path):
        yield


def _ids(pid: int) -> dict[str, list[int]]:
    ids: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("Uid", "Gid", "Groups"):
            ids[name] = [int(part) for part in value.split()]
    return ids


async def _wait_for(run: Running, text: str, count: int = 1, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while run.log_text().count(text) < count:
            await trio.sleep(0.02)


async def test_a_worker_becomes_its_user_once_the_guest_runs(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["--worker-user", f"{BASE}:{BASE}+"]) as run:
        plan = (await run.create(1, [DiskSpec(run.image("a.img", 8), "xvda")]))[0]
        worker = run.serving_worker(1)
        # set up, but the guest's driver has not started: still root (no capability
        # but the three that change user)
        assert _ids(worker)["Uid"] == [0, 0, 0, 0]
        driver = await run.driver(1, plan)
        await _wait_for(run, "worker.user_changed")
        ids = _ids(worker)
        assert ids["Uid"] == [BASE + 1] * 4, ids  # real, effective, saved, filesystem
        assert ids["Gid"] == [BASE] * 4, ids
        assert ids["Groups"] == []
        for task in Path(f"/proc/{worker}/task").iterdir():  # the I/O threads too
            caps = read_capabilities(f"{worker}/task/{task.name}").sets
            assert caps["CapEff"] == caps["CapPrm"] == caps["CapAmb"] == 0, caps
        state = tmp_path / "run" / "state" / "dom1"
        assert state.stat().st_uid == BASE + 1  # it keeps its device's state there
        result = await run.workload(1, driver, WorkloadSpec(requests=300, sectors=2048))
        assert result.ok, result.mismatches
        assert run.serving_worker(1) == worker  # served by the same, unprivileged worker
        assert "worker.user_change_failed" not in run.log_text()
        # it started with exactly the three capabilities that change user, and said so
        assert "worker.capabilities_kept" not in run.log_text()
        assert "CapPrm=c1 CapEff=c1 CapBnd=c1" in run.log_text()
        await destroy_within_deadline(run)
        with trio.fail_after(10):  # emptied by the worker, removed by the supervisor
            while state.exists():
                await trio.sleep(0.02)


async def test_a_hot_plugged_disk_is_set_up_by_a_fresh_worker(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["--worker-user", f"{BASE}:{BASE}+"]) as run:
        first = (await run.create(1, [DiskSpec(run.image("a.img", 8), "xvda")]))[0]
        driver_a = await run.driver(1, first)
        before = await run.workload(1, driver_a, WorkloadSpec(requests=200, sectors=2048,
                                                              seed=1))
        assert before.ok
        await _wait_for(run, "worker.user_changed")
        unprivileged = run.serving_worker(1)

        second = await run.attach(1, DiskSpec(run.image("b.img", 8), "xvdb"))
        assert await run.state(1, second.devid) == "2"  # InitWait, within libxl's wait
        assert "worker.replaced" in run.log_text()
        successor = run.serving_worker(1)
        assert successor != unprivileged
        driver_b = await run.driver(1, second)
        await _wait_for(run, "worker.user_changed", count=2)  # the successor gave up root
        assert _ids(successor)["Uid"] == [BASE + 1] * 4
        # the first disk carried on through the hand-over: what was written reads back
        for driver, seed in ((driver_a, 3), (driver_b, 4)):
            result = await run.workload(1, driver, WorkloadSpec(requests=200, sectors=2048,
                                                                seed=seed))
            assert result.ok, result.mismatches
        assert "worker.crashed" not in run.log_text()
        await destroy_within_deadline(run)


def test_the_worker_user_is_checked_at_start(tmp_path: Path) -> None:
    for spec, says in (("no-such-user-here", "no such user"),
                       ("0:0", "must not be root"),
                       ("root", "must not be root"),
                       ("12:x", "two decimal numbers"),
                       (f"{0xFFFFFFFE - 10}:5+", "past the largest id")):
        done = subprocess.run(
            [sys.executable, "-m", "virtio_diskd.daemon", "--foreground", "--rundir",
             str(tmp_path), "--worker-user", spec],
            capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2, (spec, done.stderr)
        assert says in done.stderr, (spec, done.stderr)


def test_worker_user_ids() -> None:
    shared = WorkerUser.parse("65534:65533", MAX_DOMID)
    assert shared.ids_for(7) == (65534, 65533)
    ranged = WorkerUser.parse(f"{BASE}:{BASE}+", MAX_DOMID)
    assert ranged.ids_for(7) == (BASE + 7, BASE)
    assert str(ranged) == f"{BASE}:{BASE}+"  # handed on to exec'd workers as given
    named = WorkerUser.parse("nobody", MAX_DOMID)
    assert named.uid == 65534


async def test_a_lost_xenstored_connection_hands_the_guest_to_a_fresh_worker(
        tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ["--worker-user", f"{BASE}:{BASE}+"]) as run:
        plan = (await run.create(1, [DiskSpec(run.image("a.img", 8), "xvda")]))[0]
        driver = await run.driver(1, plan)
        await _wait_for(run, "worker.user_changed")
        unprivileged = run.serving_worker(1)
        await run.host.restart_xenstored()  # oxenstored's live update, a crash
        await _wait_for(run, "worker.replaced")
        await _wait_for(run, "worker.user_changed", count=2)
        assert run.serving_worker(1) != unprivileged
        result = await run.workload(1, driver, WorkloadSpec(requests=200, sectors=2048))
        assert result.ok, result.mismatches
        assert "worker.crashed" not in run.log_text()
        await destroy_within_deadline(run)


class _AlwaysHandsOver:
    """A worker that asks for a privileged successor every time it runs."""

    def __init__(self) -> None:
        self.domid, self.pid, self.restarts, self.runs = 4, 1234, 0, 0

    async def run(self) -> int:
        self.runs += 1
        await trio.lowlevel.checkpoint()  # as waiting for a real worker would
        return REPLACE_ME


async def test_hand_overs_in_a_loop_count_as_crashes(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    supervisor = Supervisor(DaemonConfig(rundir=str(tmp_path)))
    given_up: list[int] = []

    async def listed(*_args: object) -> bool:
        return True

    async def give_up(handle: _AlwaysHandsOver, code: int, crashes: int) -> None:
        given_up.append(crashes)

    monkeypatch.setattr(supervisor_module, "has_devices", listed)
    monkeypatch.setattr(supervisor_module, "BACKOFF_FIRST", 0.0)
    monkeypatch.setattr(supervisor, "_give_up", give_up)
    handle = _AlwaysHandsOver()
    with trio.fail_after(10):
        await supervisor._supervise(handle)  # type: ignore[arg-type]
    # REPLACE_LIMIT successors at once, then the crash path: back-off, then given up
    assert handle.runs == supervisor_module.REPLACE_LIMIT + supervisor_module.CRASH_LIMIT
    assert given_up == [supervisor_module.CRASH_LIMIT]
