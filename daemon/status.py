"""``virtio-diskd status``: each daemon process answers on a Unix socket in the run
directory with a JSON snapshot; the command collects and prints them."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio


@contextlib.asynccontextmanager
async def private_listener(path: str, backlog: int) -> AsyncIterator[trio.socket.SocketType]:
    """A listening Unix socket at ``path``, mode 0600 (root only in the 0700 run
    directory), removed when done unless a successor has replaced it meanwhile."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(path)
    os.chmod(path, 0o600)
    inode = os.stat(path).st_ino
    listener.listen(backlog)
    try:
        yield listener
    finally:
        listener.close()
        # OSError: gone, or a worker that changed user may no longer remove it (the
        # next one to bind the path does)
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:  # not a successor's socket
                os.unlink(path)


async def serve_status(path: str, snapshot: Callable[[], dict[str, Any]], *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer every connection with one JSON document, then close it."""
    async with private_listener(path, 16) as listener:
        task_status.started()
        while True:
            conn, _ = await listener.accept()
            with conn:
                data = json.dumps(snapshot(), default=str).encode()
                with trio.move_on_after(2):
                    await trio.SocketStream(conn).send_all(data)


def collect(rundir: str) -> list[dict[str, Any]]:
    """Every daemon answering under ``rundir``: the all-in-one service's sockets, and
    each per-guest template instance's (``virtio-diskd@N`` keeps them in ``rundir/N/``)."""
    snapshots = []
    root = Path(rundir)
    for sock_path in sorted([*root.glob("*.sock"), *root.glob("*/*.sock")]):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(3)
            try:
                sock.connect(str(sock_path))
                chunks = []
                while data := sock.recv(65536):
                    chunks.append(data)
            except OSError:
                continue
        with contextlib.suppress(ValueError):
            snapshots.append(json.loads(b"".join(chunks)))
    return snapshots


def main(rundir: str, as_json: bool = False) -> int:
    snapshots = collect(rundir)
    if as_json:
        print(json.dumps(snapshots, indent=2))
        return 0
    if not snapshots:
        print(f"no running virtio-diskd found in {rundir}")
        return 1
    for snap in snapshots:
        if snap.get("role") == "supervisor":
            print(f"supervisor pid {snap.get('pid')}: guests {snap.get('guests')}")
            continue
        print(f"guest {snap.get('domid')} (pid {snap.get('pid')}):")
        ioreq = snap.get("ioreq") or {}
        if ioreq:
            print("  ioreq: " + " ".join(f"{k}={v}" for k, v in ioreq.items()))
        for devid, dev in sorted(snap.get("devices", {}).items()):
            print(f"  {devid} {dev.get('vdev', '?'):<6} {dev.get('phase', '?'):<10} "
                  f"target={dev.get('target', '-')} format={dev.get('format', 'raw')} "
                  f"features={dev.get('features', '-')} "
                  f"requests={dev.get('requests', 0)} read={dev.get('read_bytes', 0)} "
                  f"written={dev.get('written_bytes', 0)} errors={dev.get('errors', 0)} "
                  f"in_flight={dev.get('in_flight', 0)}")
    return 0
