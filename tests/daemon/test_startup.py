"""A daemon that listens from its first second: signals while xenstored is away, a clear
message with a hint, a bounded give-up, and READY=1 only after the scan."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from virtio_diskd.ioreq.sim.toolstack import DiskSpec


def _daemon(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "virtio_diskd.daemon", "--foreground", "--log-format",
         "console", "--xenstore", str(tmp_path / "no-xenstored.sock"), "--rundir",
         str(tmp_path / "run"), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_line(process: subprocess.Popen[str], needle: str, timeout: float) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        seen += line
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} not logged within {timeout} s:\n{seen}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_xenstored_is_unreachable_stops_the_daemon(
        tmp_path: Path, signum: signal.Signals) -> None:
    process = _daemon(tmp_path, "--xenstore-timeout", "0")
    try:
        seen = _wait_for_line(process, "xenstore.unreachable", 30)
        assert "no-xenstored.sock" in seen and "No such file" in seen
        assert "is this a Xen Dom0 or driver domain" in seen
        process.send_signal(signum)
        code = process.wait(5)
    finally:
        process.kill()
    assert code == 0
    assert process.stdout is not None
    assert "daemon.stopping" in process.stdout.read()


def test_the_daemon_gives_up_after_the_configured_time(tmp_path: Path) -> None:
    started = time.monotonic()
    process = _daemon(tmp_path, "--xenstore-timeout", "2")
    try:
        out, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    took = time.monotonic() - started
    assert process.returncode == 1, out
    assert "daemon.giving_up" in out and "unreachable for 2 s" in out
    assert took < 20, took


def test_the_unreachable_message_repeats_while_waiting(tmp_path: Path) -> None:
    from virtio_diskd.ioreq.xenstore import holder

    assert holder.UNREACHABLE_REPEAT <= 30  # said now and then, not once
    process = _daemon(tmp_path, "--xenstore-timeout", "0", "--log-level", "debug")
    try:
        _wait_for_line(process, "xenstore.unreachable", 30)
        _wait_for_line(process, "xenstore.unreachable", holder.UNREACHABLE_REPEAT + 10)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)


async def test_domid_mode_says_ready_only_after_its_scan(tmp_path: Path) -> None:
    """``virtio-diskd --domid N`` (the template unit) sends READY=1 once it has listed
    the guest's devices, as the supervisor does after its scan."""
    from virtio_diskd.daemon.tools.simrun import make_image, notify_socket, start_daemon, wait_ready
    from virtio_diskd.ioreq.sim.host import SimHost
    from virtio_diskd.ioreq.sim.toolstack import GuestSpec

    host = SimHost(str(tmp_path))
    async with host.running():
        make_image(str(tmp_path / "d.img"), 8 << 20)
        sock = notify_socket(str(tmp_path / "notify.sock"))
        log = tmp_path / "worker.log"
        worker = start_daemon(str(tmp_path), host.xenstore_path, str(tmp_path / "notify.sock"),
                              str(log), ["--domid", "3"])
        try:
            assert await wait_ready(sock, 30), log.read_text()
            text = log.read_text()
            assert text.index("worker.started") < text.index("worker.ready")
            # and it serves the guest created afterwards (libxl's InitWait wait holds)
            await host.create(GuestSpec(3, "guest3", [DiskSpec(str(tmp_path / "d.img"))]),
                              memory_mib=64)
        finally:
            worker.send_signal(signal.SIGTERM)
            await trio.to_thread.run_sync(lambda: worker.wait(20))
            sock.close()


def test_the_supervisor_starts_without_the_device_model() -> None:
    """Start-up cost (bench --suite start): the supervisor never serves a device, so
    importing it must not import the device model; its zygote loads that instead."""
    code = ("import sys, virtio_diskd.daemon.cli, virtio_diskd.daemon.app, "
            "virtio_diskd.daemon.supervisor\n"
            "heavy = [m for m in ('virtio_diskd.backend.blk', 'virtio_diskd.backend.mmio', "
            "'virtio_diskd.ioreq.guest_service', 'virtio_diskd.ioreq.server', "
            "'importlib.metadata') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out


async def test_zygote_and_workers_are_forks_of_the_supervisor_with_names(
        tmp_path: Path) -> None:
    """No second interpreter: the zygote is forked (same command line as the supervisor)
    and named so ``ps -o comm`` tells the processes apart."""
    from vdtest.daemonrun import _children_of, running_daemon

    async with running_daemon(tmp_path) as run:
        plan = (await run.create(1, [DiskSpec(run.image("a.img", 8))]))[0]
        await run.driver(1, plan)

        def comm(pid: int) -> str:
            return Path(f"/proc/{pid}/comm").read_text().strip()

        def cmdline(pid: int) -> bytes:
            return Path(f"/proc/{pid}/cmdline").read_bytes()

        supervisor = run.daemon.pid
        (zygote,) = [p for p in _children_of(supervisor) if comm(p) == "vd-zygote"]
        assert cmdline(zygote) == cmdline(supervisor)
        assert [comm(p) for p in _children_of(zygote)] == ["vd-dom1"]


def test_a_worker_dying_of_an_exception_leaves_its_traceback(tmp_path: Path) -> None:
    """The zygote's child ends with os._exit, which would swallow an exception without
    a word (seen on real Xen): the traceback must reach stderr, the status the
    supervisor."""
    script = """
import json, os, socket, sys
from virtio_diskd.daemon import zygote

def run_worker(domid):
    raise RuntimeError(f"planted failure in the worker for {domid}")

ours, theirs = socket.socketpair()
pid = os.fork()
if pid == 0:
    ours.close()
    os._exit(zygote.serve(theirs, run_worker))
theirs.close()
lines = ours.makefile("rb")
assert json.loads(lines.readline()) == {"ready": True}
ours.sendall(b'{"spawn": 7}\\n')
events = [json.loads(lines.readline()) for _ in range(2)]
print(json.dumps(events))
lines.close()
ours.close()  # the zygote ends with its control socket
os.waitpid(pid, 0)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=True)
    events = json.loads(result.stdout)
    exits = [e for e in events if "exit" in e]
    assert exits and exits[0]["code"] == 1, events
    assert "RuntimeError: planted failure in the worker for 7" in result.stderr
    assert "Traceback" in result.stderr
