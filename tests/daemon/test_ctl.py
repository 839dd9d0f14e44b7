"""``virtio-diskd ctl``: pause a running guest's disk, copy it, resume — the copy holds
every write acknowledged before the pause, nothing changes while paused, and the
guest's workload carries on afterwards with every byte verified."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import trio

from vdtest.daemonrun import running_daemon
from virtio_diskd.daemon import control
from virtio_diskd.daemon.status import collect
from virtio_diskd.ioreq.sim.toolstack import DiskSpec
from virtio_diskd.ioreq.sim.workload import Workload, WorkloadSpec


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _paused_flags(rundir: str, domid: int) -> dict[str, bool]:
    for snap in collect(rundir):
        if snap.get("role") == "worker" and snap.get("domid") == domid:
            return {d["vdev"]: d.get("paused", False) for d in snap["devices"].values()
                    if "vdev" in d}
    return {}


async def test_pause_copy_resume_under_a_running_workload(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        image = run.image("a.img", 8)
        (plan,) = await run.create(1, [DiskSpec(image, "xvda")])
        driver = await run.driver(1, plan)
        rundir = str(run.work / "run")
        vcpu = run.host.guests[1].vcpus[0]
        workload = Workload(driver, vcpu, WorkloadSpec(
            mix="mixed", requests=4000, queue_depth=8, sectors=2048, seed=3))
        copy = str(tmp_path / "copy.img")
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def guest() -> None:
                await trio.to_thread.run_sync(lambda: vcpu.call(workload.run, 300))
                done.set()

            nursery.start_soon(guest)
            with trio.fail_after(30):
                while len(workload.acked) < 50:
                    await trio.sleep(0.01)
            path = control.find_control(rundir, 1)
            assert path is not None
            reply = await trio.to_thread.run_sync(
                lambda: control.ask(path, {"op": "pause", "vdev": "xvda"}))
            assert reply == {"domid": 1, "vdev": "xvda", "paused": True, "flushed": True}
            assert not done.is_set(), "the workload ended before the pause: make it longer"
            await trio.sleep(0.3)  # completions of the drained requests reach the guest
            acked_before = dict(workload.acked)
            before = _digest(image)
            shutil.copyfile(image, copy)
            await trio.sleep(0.3)
            # held, not failed: nothing written, nothing acknowledged while paused
            assert _digest(image) == before == _digest(copy)
            assert workload.acked == acked_before and not workload.result.errors
            assert _paused_flags(rundir, 1) == {"xvda": True}
            fd = os.open(copy, os.O_RDONLY)
            try:
                checked = workload.verify_disk(lambda off, n: os.pread(fd, n, off))
            finally:
                os.close(fd)
            assert checked == len(acked_before) and not workload.result.mismatches
            reply = await trio.to_thread.run_sync(
                lambda: control.ask(path, {"op": "resume", "vdev": "xvda"}))
            assert reply == {"domid": 1, "vdev": "xvda", "paused": False}
            with trio.fail_after(120):
                await done.wait()
        result = workload.result
        assert result.ok and result.every_read_verified and not result.errors, result
        assert len(workload.acked) > len(acked_before)
        assert _paused_flags(rundir, 1) == {"xvda": False}
        fd = os.open(image, os.O_RDONLY)
        try:
            assert workload.verify_disk(lambda off, n: os.pread(fd, n, off)) == len(
                workload.acked)
        finally:
            os.close(fd)
        assert not workload.result.mismatches


async def test_ctl_refuses_unknown_guests_and_devices_clearly(tmp_path: Path,
                                                            capsys) -> None:  # type: ignore[no-untyped-def]
    async with running_daemon(tmp_path) as run:
        (plan,) = await run.create(1, [DiskSpec(run.image("a.img", 8), "xvda")])
        await run.driver(1, plan)
        rundir = str(run.work / "run")
        code = await trio.to_thread.run_sync(control.main, rundir, "pause", 7, "xvda")
        assert code == 2 and "no daemon" in capsys.readouterr().out
        code = await trio.to_thread.run_sync(control.main, rundir, "pause", 1, "xvdz")
        out = capsys.readouterr().out
        assert code == 2 and "no running device 'xvdz'" in out and "xvda" in out
        path = control.find_control(rundir, 1)
        assert path is not None
        reply = await trio.to_thread.run_sync(lambda: control.ask(path, {"op": "format"}))
        assert "unknown operation" in reply["error"]
        code = await trio.to_thread.run_sync(control.main, rundir, "list", None, None)
        out = capsys.readouterr().out
        assert code == 0 and "dom1 xvda" in out and "running" in out and "a.img" in out
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
