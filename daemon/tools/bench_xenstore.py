"""xenstore client benchmark: reads/s, writes/s and watch events/s, trio client vs pyxs.

xenstore is control plane only, so nothing is asserted on these numbers; they
show what the device handshake costs and how the two clients compare in the
same run against the same simulated xenstored (run as its own process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyxs
import trio

from virtio_diskd.ioreq.xenstore.client import XenstoreClient


@dataclass
class XenstoreFigures:
    client: str
    reads_per_s: float
    writes_per_s: float
    watch_events_per_s: float


def _rate(count: int, started: float) -> float:
    return count / max(time.perf_counter() - started, 1e-9)


async def _trio_figures(path: str, seconds: float) -> XenstoreFigures:
    async with XenstoreClient.open(path) as xs, XenstoreClient.open(path) as writer:
        await xs.write("/bench/trio/value", "x" * 32)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            await xs.read("/bench/trio/value")
            count += 1
        reads = _rate(count, started)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            await xs.write("/bench/trio/value", str(count))
            count += 1
        writes = _rate(count, started)
        async with xs.watch("/bench/trio/w") as events:
            await events.receive()
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                await writer.write("/bench/trio/w/x", str(count))
                await events.receive()
                count += 1
            watch = _rate(count, started)
    return XenstoreFigures("trio (virtio-diskd)", reads, writes, watch)


def _pyxs_figures(path: str, seconds: float) -> XenstoreFigures:
    def timed(op: Callable[[int], object]) -> float:
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            op(count)
            count += 1
        return _rate(count, started)

    with pyxs.Client(unix_socket_path=path) as xs, pyxs.Client(unix_socket_path=path) as writer:
        xs.write(b"/bench/pyxs/value", b"x" * 32)
        reads = timed(lambda _i: xs.read(b"/bench/pyxs/value"))
        writes = timed(lambda i: xs.write(b"/bench/pyxs/value", str(i + 1).encode()))
        monitor = xs.monitor()
        monitor.watch(b"/bench/pyxs/w", b"tok")
        events = monitor.wait()
        next(events)
        def one(i: int) -> None:
            writer.write(b"/bench/pyxs/w/x", str(i + 1).encode())
            next(events)

        watch = timed(one)
    return XenstoreFigures("pyxs 0.4.1", reads, writes, watch)


def run(seconds: float = 1.0) -> list[XenstoreFigures]:
    """Start a simulated xenstored process and measure both clients against it."""
    with tempfile.TemporaryDirectory(prefix="vd-bench-") as tmp:
        path = os.path.join(tmp, "xs.sock")
        server = subprocess.Popen([sys.executable, "-m", "virtio_diskd.ioreq.sim.xenstored",
                                   "--socket", path], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(path):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("simulated xenstored did not start")
                time.sleep(0.02)
            figures = [trio.run(_trio_figures, path, seconds), _pyxs_figures(path, seconds)]
        finally:
            server.kill()
            server.wait()
    return figures


def main(seconds: float = 1.0) -> int:
    print("xenstore clients against the simulated xenstored (one process, Unix socket)")
    print(f"{'client':<22}{'reads/s':>12}{'writes/s':>12}{'watch events/s':>16}")
    for fig in run(seconds):
        print(f"{fig.client:<22}{fig.reads_per_s:>12.0f}{fig.writes_per_s:>12.0f}"
              f"{fig.watch_events_per_s:>16.0f}")
    return 0
