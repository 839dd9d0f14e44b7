"""Disk fixtures helpers: block requests built by hand, waiting for an engine."""

from __future__ import annotations

import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from virtio_diskd.backend.disk.engine_api import BlockEngine
from virtio_diskd.backend.disk.request import DiskRequest, IoKind


def request(kind: IoKind, offset: int = 0, buffers: list[memoryview] | None = None,
            ranges: list[tuple[int, int, bool]] | None = None,
            durable: bool = False) -> DiskRequest:
    req = DiskRequest(kind)
    req.offset = offset
    req.buffers = buffers or []
    req.length = sum(len(b) for b in req.buffers)
    req.ranges = ranges or []
    req.durable = durable
    return req


def run(engine: BlockEngine[DiskRequest], requests: list[DiskRequest], timeout: float = 30.0,
        ) -> list[DiskRequest]:
    """Submit and wait until every request has completed (inline or from the workers)."""
    done = engine.submit(requests)
    while len(done) < len(requests):
        ready, _, _ = select.select([engine.completion_fd], [], [], timeout)
        if not ready:
            raise TimeoutError(f"{len(requests) - len(done)} requests did not complete")
        done += engine.take_completions()
    return done


def take_in_groups(engine: BlockEngine[DiskRequest], count: int, limit: int,
                   timeout: float = 10.0) -> list[DiskRequest]:
    """Take ``count`` completions ``limit`` at a time, as the engine benchmark's
    consumer does, waiting on the eventfd only when ``has_completions`` says none are
    left: each take gives at most ``limit``, and a wait that finds nothing after some
    were taken means completions were left over unseen."""
    taken: list[DiskRequest] = []
    deadline = time.monotonic() + timeout
    while len(taken) < count:
        assert time.monotonic() < deadline, f"{len(taken)} of {count} completed"
        if not engine.has_completions:
            ready, _, _ = select.select([engine.completion_fd], [], [], timeout / 2)
            assert ready or not taken, \
                "completions were left over and has_completions said none"
        got = engine.take_completions(limit)
        assert len(got) <= limit
        taken += got
    return taken


@contextmanager
def loop_device(image: Path) -> Iterator[str]:
    """Attach ``image`` to a loop device for the duration (root only)."""
    out = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                         capture_output=True, text=True)
    device = out.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def can_make_loop_devices() -> str | None:
    """None if loop devices can be made here, else the reason they cannot."""
    import os

    if os.geteuid() != 0:
        return "loop devices need root"
    if shutil.which("losetup") is None:
        return "losetup (util-linux) is not installed"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control in this environment"
    return None
