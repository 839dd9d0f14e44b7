"""Shared fixtures: simulated xenstored (in-process and as a process)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from vdtest.fixtures import XenstoredHandle, XenstoredProcess
from virtio_diskd.ioreq.sim.xenstored import Xenstored


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def xenstored(nursery: trio.Nursery, short_tmp: Path) -> XenstoredHandle:
    server = Xenstored()
    path = str(short_tmp / "xs.sock")
    await nursery.start(server.serve, path)
    return XenstoredHandle(server, path, short_tmp, nursery)


def _wait_for_socket(path: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"xenstored exited with {process.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(path)
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"xenstored did not listen on {path}")


@pytest.fixture
def xenstored_process(short_tmp: Path) -> Iterator[XenstoredProcess]:
    """The simulated xenstored as its own process, with a socket for domain 5."""
    path = str(short_tmp / "xs.sock")
    dom5 = str(short_tmp / "xs-5.sock")
    process = subprocess.Popen(
        [sys.executable, "-m", "virtio_diskd.ioreq.sim.xenstored", "--socket", path,
         "--as", f"5:{dom5}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_socket(path, process)
        _wait_for_socket(dom5, process)
        yield XenstoredProcess(process, path, {5: dom5})
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from vdtest import counters

    if counters.hostile_cases:
        terminalreporter.write_line(
            f"hostile-guest property cases run: {counters.hostile_cases}")
