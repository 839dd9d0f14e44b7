"""Handles the shared fixtures return (importable from tests as ``vdtest.fixtures``)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from virtio_diskd.ioreq.sim.xenstored import Xenstored


@dataclass
class XenstoredHandle:
    server: Xenstored
    path: str
    directory: Path
    nursery: trio.Nursery


@dataclass
class XenstoredProcess:
    process: subprocess.Popen[bytes]
    path: str
    domain_paths: dict[int, str]


def xenstore_tool_env(path: str) -> dict[str, str]:
    env = dict(os.environ)
    env["XENSTORED_PATH"] = path
    return env


@contextmanager
def passable_to_others(path: Path) -> Iterator[None]:
    """``path`` and every directory above it traversable by any user while the block
    runs: pytest's directories are root's, 0700, and a worker that changed user
    (``--worker-user``) must pass through them to its run directory, as it passes
    through /run."""
    changed = []
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode & 0o7777
        if not mode & 0o001:
            directory.chmod(mode | 0o001)
            changed.append((directory, mode))
    try:
        yield
    finally:
        for directory, mode in changed:
            directory.chmod(mode)
