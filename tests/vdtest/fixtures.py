"""Handles the shared fixtures return (importable from tests as ``vdtest.fixtures``)."""

from __future__ import annotations

import os
import subprocess
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
