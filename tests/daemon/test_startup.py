"""A daemon that listens from its first second: signals while xenstored is away, a clear
message with a hint, a bounded give-up, and READY=1 only after the scan."""

from __future__ import annotations

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
