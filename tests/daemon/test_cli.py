"""The command line an operator meets: flags, errors, status, --daemonize, SIGHUP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from vdtest.daemonrun import running_daemon
from vdtest.fixtures import XenstoredProcess
from virtio_diskd.daemon.cli import daemon_parser
from virtio_diskd.ioreq.sim.toolstack import DiskSpec

ROOT = Path(__file__).resolve().parent.parent.parent


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virtio_diskd.daemon", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_every_flag_is_in_help_and_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    help_text = cli("--help").stdout
    flags = {opt for action in daemon_parser()._actions for opt in action.option_strings
             if opt.startswith("--") and action.help != "==SUPPRESS=="}
    assert flags >= {"--foreground", "--domid", "--xenstore", "--simulated", "--log-format",
                     "--log-level", "--daemonize", "--pidfile", "--version"}
    for flag in flags - {"--help"}:
        assert flag in help_text, flag
        assert f"`{flag}" in readme, f"{flag} is not documented in the README"


def test_bad_flags_are_refused_clearly() -> None:
    for args, message in ((["--domid", "0"], "not a guest domain id"),
                          (["--queues", "0"], "not a number from 1 to 16"),
                          (["--simulated", "/nonexistent"], "no such directory"),
                          (["--pidfile", "/tmp/x.pid"], "--pidfile goes with --daemonize"),
                          (["--log-level", "loud"], "invalid choice"),
                          (["--target-wait", "10"], "not a number from 0 to 9"),
                          (["grant-targets", "--simulated", "/nonexistent"],
                           "no such directory"),
                          (["grant-targets", "--xenstore-timeout", "-1"], "seconds")):
        result = cli(*args)
        assert result.returncode == 2, args
        assert message in result.stderr, (args, result.stderr)
    assert re.fullmatch(r"virtio-diskd \S+\n", cli("--version").stdout)


async def test_status_lists_guests_devices_and_counters(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        plan = (await run.create(3, [DiskSpec(run.image("s.img"), "xvdb")]))[0]
        driver = await run.driver(3, plan)
        from virtio_diskd.ioreq.sim.workload import WorkloadSpec

        assert (await run.workload(3, driver, WorkloadSpec(requests=20, sectors=256))).ok
        result = await trio.to_thread.run_sync(
            lambda: cli("status", "--rundir", str(tmp_path / "run")))
        assert result.returncode == 0, result.stderr
        assert "guest 3" in result.stdout and "xvdb" in result.stdout
        assert "connected" in result.stdout and "errors=0" in result.stdout
        assert re.search(r"requests=\d+", result.stdout)
        traps = re.search(r"ioreq: traps=(\d+) polled=(\d+)", result.stdout)
        assert traps and int(traps.group(1)) > 0  # the guest's register accesses


def test_daemonize_with_pidfile_and_stale_pidfile_recovery(
        tmp_path: Path, xenstored_process: XenstoredProcess) -> None:
    pidfile = tmp_path / "vd.pid"
    pidfile.write_text("999999\n")  # left by a daemon that died: no lock held
    args = ["--daemonize", "--pidfile", str(pidfile), "--xenstore", xenstored_process.path,
            "--simulated", str(tmp_path), "--rundir", str(tmp_path / "run"),
            "--log-format", "json", "--log-file", str(tmp_path / "daemon.log")]
    first = cli(*args)
    assert first.returncode == 0, first.stderr  # the parent returns once detached
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        if text and text != "999999":
            break
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    log_text = (tmp_path / "daemon.log").read_text() if (tmp_path / "daemon.log").exists() else ""
    assert pid != 999999, f"the daemon never wrote its pid; its log:\n{log_text}"
    os.kill(pid, 0)  # alive
    second = cli(*args)
    assert second.returncode != 0 and "already running" in second.stderr
    os.kill(pid, signal.SIGTERM)
    while time.monotonic() < deadline and pidfile.exists():
        time.sleep(0.05)
    assert not pidfile.exists()
    assert '"event": "daemon.stopping"' in (tmp_path / "daemon.log").read_text()


async def test_sighup_rereads_the_log_level(tmp_path: Path) -> None:
    config = tmp_path / "virtio-diskd.conf"
    config.write_text("log_level = info\n")
    async with running_daemon(tmp_path, ["--config", str(config)]) as run:
        config.write_text("log_level = debug\n")
        run.daemon.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            while "daemon.reloaded" not in run.log_text():
                await trio.sleep(0.05)
        assert "log_level=debug" in run.log_text()


def test_demo_output_into_a_pipe_has_plain_progress_lines() -> None:
    """Piped (CI, a log file), the demo prints a line per quarter, no redraws."""
    result = cli("demo", "--requests", "400", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "\r" not in result.stdout
    progress = [line for line in result.stdout.splitlines() if "requests" in line
                and line.strip().startswith("xvda:")]
    assert progress[-1].strip() == "xvda: 400/400 requests" and len(progress) <= 4


async def test_status_finds_the_service_and_every_template_instance(tmp_path: Path) -> None:
    """The all-in-one service answers in the run directory, ``virtio-diskd@N`` in
    ``rundir/N/``; ``status`` merges both into one view."""
    from virtio_diskd.daemon.status import collect, serve_status

    (tmp_path / "7").mkdir()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, str(tmp_path / "supervisor.sock"),
                            lambda: {"role": "supervisor", "pid": 1, "guests": [3]})
        await nursery.start(serve_status, str(tmp_path / "7" / "dom7.sock"),
                            lambda: {"role": "worker", "pid": 2, "domid": 7, "devices": {}})
        found = await trio.to_thread.run_sync(lambda: collect(str(tmp_path)))
        shown = await trio.to_thread.run_sync(
            lambda: cli("status", "--rundir", str(tmp_path)))
        nursery.cancel_scope.cancel()
    assert sorted(s["role"] for s in found) == ["supervisor", "worker"]
    assert "supervisor pid 1" in shown.stdout and "guest 7 (pid 2)" in shown.stdout
    empty = cli("status", "--rundir", str(tmp_path / "nothing-here"))
    assert empty.returncode == 1 and "no running virtio-diskd" in empty.stdout


def test_bench_refuses_an_unknown_workload_before_measuring_anything() -> None:
    result = cli("bench", "--suite", "full", "--workload", "4k-randread-qd32",
                 "--workload", "8k-nonsense")
    assert result.returncode == 2
    assert "no workload 8k-nonsense" in result.stdout
    assert "4k-randread-qd32" in result.stdout  # the names it has
    assert "full path" not in result.stdout  # no table: nothing was run
