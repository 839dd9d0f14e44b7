"""Start-up measured: process start to READY=1, and libxl's nodes to InitWait.

libxl gives a backend 10 s to reach InitWait, and a daemon started together with the
first guest at boot has to be up inside that window; under TCG or on a small Arm board
every millisecond here is tens.  So, on the simulated host, with the daemon as its own
process exactly as systemd starts it (``Type=notify``):

* **READY**: ``exec`` of the daemon to its ``READY=1`` (xenstore connected, guests
  scanned, watch armed);
* **InitWait**: the first byte of a guest's device nodes written (the toolstack's
  transaction) to the backend's ``state`` 2, for the first guest after READY (its
  worker forked from the zygote) and for a second one;
* next to them, measured in the same run: the interpreter alone (``python -c pass``)
  and the interpreter importing the two libraries the daemon is built on (trio and
  structlog), the floor any daemon written with them pays before its first line runs.

The daemon runs with compiled byte-code, as the Debian package installs it (its postinst
compiles); the first start of the run only warms that cache and is not counted.
The heaviest imports of the supervisor are printed from ``-X importtime``.
"""

from __future__ import annotations

import functools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import trio

from virtio_diskd.daemon import logsetup
from virtio_diskd.daemon.tools.simrun import make_image, notify_socket, start_daemon, wait_ready
from virtio_diskd.ioreq.sim.host import SimHost
from virtio_diskd.ioreq.sim.toolstack import DiskSpec, GuestSpec


@dataclass
class StartFigures:
    ready_s: float
    ready_min_s: float
    first_init_wait_s: float
    second_init_wait_s: float
    interpreter_floor_s: float
    libraries_floor_s: float
    runs: int
    heaviest_imports_ms: list[tuple[str, float]] = field(default_factory=list)


def _bytecode_env(cache: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = cache
    return env


def _floor(code: str, env: dict[str, str], runs: int) -> float:
    times = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def heaviest_imports(env: dict[str, str], count: int = 8) -> list[tuple[str, float]]:
    """The supervisor's import profile (cumulative ms), heaviest top-level first."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c",
                          "import virtio_diskd.daemon.cli, virtio_diskd.daemon.app, "
                          "virtio_diskd.daemon.supervisor"], env=env, check=True,
                         capture_output=True, text=True).stderr
    rows: list[tuple[str, float]] = []
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip())) // 2
        if depth <= 1:
            rows.append((name.strip(), int(parts[1]) / 1000))
    return sorted(rows, key=lambda r: -r[1])[:count]


def _stamp_now(into: list[float]) -> None:
    into.append(time.perf_counter())


async def _one_start(work: str, host: SimHost, env: dict[str, str], run: int,
                     images: list[str]) -> tuple[float, float, float]:
    notify_path = os.path.join(work, f"notify{run}.sock")
    notify = notify_socket(notify_path)
    started = time.perf_counter()
    daemon = start_daemon(work, host.xenstore_path, notify_path,
                          os.path.join(work, f"daemon{run}.log"), env=env)
    try:
        if not await wait_ready(notify, 60):
            raise RuntimeError(f"no READY=1 within 60 s (see {work}/daemon{run}.log)")
        ready = time.perf_counter() - started
        waits = []
        for domid, image in zip((1, 2), images, strict=True):  # one writer per image
            nodes_at: list[float] = []
            await host.create(GuestSpec(domid, f"start{domid}", vcpus=1,
                                        disks=[DiskSpec(image, "xvda")]),
                              before_devices=functools.partial(_stamp_now, nodes_at))
            waits.append(time.perf_counter() - nodes_at[0])
        for domid in (1, 2):
            await host.destroy(domid)
        return ready, waits[0], waits[1]
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(lambda: daemon.wait(30))
        notify.close()


async def measure(runs: int) -> StartFigures:
    with tempfile.TemporaryDirectory(prefix="vd-bench-start-") as work:
        env = _bytecode_env(os.path.join(work, "pycache"))
        images = [os.path.join(work, f"disk{i}.img") for i in (1, 2)]
        for image in images:
            make_image(image, 16 << 20)
        host = SimHost(work)
        results = []
        async with host.running():
            for run in range(runs + 1):  # the first one compiles the byte-code
                results.append(await _one_start(work, host, env, run, images))
        counted = results[1:]
        interpreter = await trio.to_thread.run_sync(_floor, "pass", env, runs)
        libraries = await trio.to_thread.run_sync(_floor, "import trio, structlog", env, runs)
        imports = await trio.to_thread.run_sync(heaviest_imports, env)
    return StartFigures(
        ready_s=statistics.median(r[0] for r in counted),
        ready_min_s=min(r[0] for r in counted),
        first_init_wait_s=statistics.median(r[1] for r in counted),
        second_init_wait_s=statistics.median(r[2] for r in counted),
        interpreter_floor_s=interpreter, libraries_floor_s=libraries, runs=runs,
        heaviest_imports_ms=imports)


def main(*, quick: bool) -> StartFigures:
    runs = 3 if quick else 10
    print(f"\nstart-up ({runs} starts after a warm-up; byte-code compiled, as installed)")
    logsetup.configure("console", "warning")  # the simulated host's own lines
    figures = trio.run(measure, runs)
    print(f"  {'start → READY=1 (median, min)':<44}{figures.ready_s * 1e3:>8.0f} ms"
          f"{figures.ready_min_s * 1e3:>8.0f} ms")
    print(f"  {'nodes → InitWait, first guest after READY':<44}"
          f"{figures.first_init_wait_s * 1e3:>8.0f} ms")
    print(f"  {'nodes → InitWait, second guest':<44}{figures.second_init_wait_s * 1e3:>8.0f} ms")
    print(f"  {'floor: python -c pass':<44}{figures.interpreter_floor_s * 1e3:>8.0f} ms")
    label = 'floor: python -c "import trio, structlog"'
    print(f"  {label:<44}{figures.libraries_floor_s * 1e3:>8.0f} ms")
    print("  heaviest imports of the supervisor (cumulative ms): " + ", ".join(
        f"{name} {ms:.0f}" for name, ms in figures.heaviest_imports_ms))
    return figures
