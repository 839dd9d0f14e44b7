"""The units' ``SystemCallFilter=`` lets the daemon do its whole job, and is applied.

No systemd runs as PID 1 here: :mod:`vdtest.unit_filter` builds the filter from the unit
as systemd would (groups expanded by ``systemd-analyze``) and loads it before the
daemon's command, which then serves a guest: a raw disk and a qcow2 image through
``qemu-storage-daemon`` (which the unit's filter confines too), ``ctl``, a clean stop.
A filter without the event-polling calls stops the daemon from starting: the harness
applies what the unit says.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import trio

from vdtest import unit_filter
from vdtest.daemonrun import running_daemon
from vdtest.fixtures import passable_to_others
from vdtest.nbdserver import missing_tools
from virtio_diskd.daemon import syscall_filter
from virtio_diskd.daemon.tools.simrun import notify_socket, start_daemon, wait_ready
from virtio_diskd.ioreq.sim.host import SimHost
from virtio_diskd.ioreq.sim.toolstack import DiskSpec
from virtio_diskd.ioreq.sim.workload import WorkloadSpec

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed")


def _wrapper(tmp_path: Path, unit: str, without: str = "") -> list[str]:
    text = (ROOT / "systemd" / unit).read_text()
    if without:
        text += f"\nSystemCallFilter=~{without}\n"
    spec = unit_filter.resolve(text, unit_filter.systemd_groups())
    path = tmp_path / "unit-filter.json"
    path.write_text(json.dumps(spec))
    return [sys.executable, unit_filter.__file__, "exec", str(path), "--"]


def test_the_service_units_filter_as_systemd_builds_it() -> None:
    groups = unit_filter.systemd_groups()
    for unit in ("virtio-diskd.service", "virtio-diskd@.service",
                 "virtio-diskd-targets.service"):
        spec = unit_filter.resolve((ROOT / "systemd" / unit).read_text(), groups)
        allowed = set(spec["allowed"])  # type: ignore[call-overload]
        assert {"ioctl", "mmap", "epoll_wait", "preadv2", "execve", "prctl"} <= allowed
        assert not {"setuid", "setreuid", "chown", "fchown", "add_key", "mount", "ptrace",
                    "init_module", "kexec_load", "reboot"} & allowed, unit
        # what a worker's change of user takes: only where workers run
        changes_user = {"setgroups", "setresgid", "setresuid", "fchownat"}
        if unit == "virtio-diskd-targets.service":
            assert not changes_user & allowed
        else:
            assert changes_user <= allowed, unit
        assert spec["unix_only"] == ["socket", "socketpair"]
        assert spec["errno_name"] == "EPERM"
        if unit != "virtio-diskd-targets.service":  # a worker's filter is narrower
            assert set(syscall_filter.ALLOWED) - allowed == set(), unit


@pytest.mark.skipif(missing_tools("qemu-img", "qemu-storage-daemon") is not None,
                    reason=str(missing_tools("qemu-img", "qemu-storage-daemon")))
async def test_the_daemon_serves_guests_under_its_units_filter(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    raw = images / "raw.img"
    raw.write_bytes(b"\0" * (8 << 20))
    qcow2 = images / "disk.qcow2"
    await trio.run_process(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "8M"])
    config = tmp_path / "virtio-diskd.conf"
    config.write_text(f"allow_dir = {images}\nimage_format = {images}/*.qcow2 qcow2\n")
    async with running_daemon(tmp_path, ["--config", str(config)],
                              wrapper=_wrapper(tmp_path, "virtio-diskd.service")) as run:
        plans = await run.create(1, [DiskSpec(str(raw), "xvda"), DiskSpec(str(qcow2), "xvdb")])
        for plan in plans:
            driver = await run.driver(1, plan)
            spec = WorkloadSpec(pattern="random", mix="mixed", block_size=4096,
                                queue_depth=8, requests=200, sectors=(8 << 20) // 512,
                                seed=plan.devid)
            result = await run.workload(1, driver, spec)
            assert result.ok and result.every_read_verified, result
        status = await trio.run_process([sys.executable, "-m", "virtio_diskd.daemon", "ctl",
                                         "--rundir", str(run.work / "run"), "list"],
                                        capture_stdout=True, capture_stderr=True, check=False)
        assert status.returncode == 0 and b"xvdb" in status.stdout, status.stderr
        await run.host.destroy(1)
        await run.stop_daemon(kill=False)  # raises unless the exit code is 0
        log = run.log_text()
    assert "format=qcow2" in log
    assert "syscall_filter='seccomp (" in log  # the worker's own, stacked on the unit's
    for failure in ("Traceback", "worker.syscall_filter_failed", "Operation not permitted"):
        assert failure not in log


async def test_a_worker_changes_user_under_its_units_filter(tmp_path: Path) -> None:
    image = tmp_path / "raw.img"
    image.write_bytes(b"\0" * (8 << 20))
    with passable_to_others(tmp_path):
        async with running_daemon(tmp_path, ["--worker-user", "60000:60000+"],
                                  wrapper=_wrapper(tmp_path, "virtio-diskd.service")) as run:
            plan = (await run.create(1, [DiskSpec(str(image), "xvda")]))[0]
            driver = await run.driver(1, plan)
            with trio.fail_after(10):
                while "worker.user_changed" not in run.log_text():
                    await trio.sleep(0.02)
            result = await run.workload(1, driver, WorkloadSpec(requests=200,
                                                                sectors=(8 << 20) // 512))
            assert result.ok, result.mismatches
            await run.host.destroy(1)
            await run.stop_daemon(kill=False)
            log = run.log_text()
    assert "uid=60001" in log
    for failure in ("Traceback", "worker.user_change_failed", "Operation not permitted"):
        assert failure not in log


async def test_a_filter_without_event_polling_keeps_the_daemon_from_starting(
        tmp_path: Path) -> None:
    host = SimHost(str(tmp_path))
    async with host.running():
        notify = notify_socket(str(tmp_path / "notify.sock"))
        log = tmp_path / "daemon.log"
        daemon = start_daemon(str(tmp_path), host.xenstore_path, str(tmp_path / "notify.sock"),
                              str(log), wrapper=_wrapper(tmp_path, "virtio-diskd.service",
                                                         without="@io-event"))
        try:
            code = await trio.to_thread.run_sync(lambda: daemon.wait(60))
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
        ready = await wait_ready(notify, 0.1)
        notify.close()
    assert code != 0 and not ready
    assert "select.epoll()" in log.read_text() and "Operation not permitted" in log.read_text()
