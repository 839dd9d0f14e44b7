"""``virtio-diskd ctl``: run-time control of running disks, as blktap's ``tap-ctl``.

``list`` and ``stats`` read what every daemon process answers on its status socket
(:mod:`.status`).  ``pause DOMID VDEV`` and ``resume DOMID VDEV`` go to the worker
serving that guest, on its control socket beside the status socket
(``<rundir>/dom<D>.ctl``, mode 0600 in a 0700 directory: root only).  A pause takes no
new request from the guest's rings, lets the in-flight ones finish and flushes the
target, so a copy taken while paused is consistent; the guest's I/O waits meanwhile
and none fails.  ``resume`` takes what the guest queued and carries on.

The protocol is one JSON object per connection each way, a line each.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from virtio_diskd.daemon.status import collect, private_listener

#: A request is one short JSON line; anything longer is not one of ours.
MAX_REQUEST = 4096
#: How long a pause may wait for in-flight requests (each finishes within one transfer
#: piece; a dead disk is the only way past this).
PAUSE_TIMEOUT = 30.0

ControlHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def control_path(rundir: str, domid: int) -> str:
    return os.path.join(rundir, f"dom{domid}.ctl")


async def serve_control(path: str, handler: ControlHandler, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer each connection's one request with ``handler``'s reply."""
    async with private_listener(path, 8) as listener, trio.open_nursery() as nursery:
        task_status.started()
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(_answer, trio.SocketStream(conn), handler)


async def _answer(stream: trio.SocketStream, handler: ControlHandler) -> None:
    async with stream:
        data = b""
        with trio.move_on_after(5):
            while b"\n" not in data and len(data) <= MAX_REQUEST:
                chunk = await stream.receive_some(MAX_REQUEST)
                if not chunk:
                    break
                data += chunk
        request: object = None
        with contextlib.suppress(ValueError):
            request = json.loads(data.split(b"\n", 1)[0])
        if isinstance(request, dict):
            reply = await handler(request)
        else:
            reply = {"error": "bad request: one JSON object on one line is expected"}
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(json.dumps(reply).encode() + b"\n")


def ask(path: str, request: dict[str, Any], timeout: float = PAUSE_TIMEOUT + 10) -> dict[str, Any]:
    """One request to one control socket (the command's side, no event loop)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while b"\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
    reply = json.loads(data)
    return reply if isinstance(reply, dict) else {"error": "the reply is not a JSON object"}


def find_control(rundir: str, domid: int) -> str | None:
    """The control socket of the worker serving ``domid``: the all-in-one service's, or
    the ``virtio-diskd@N`` instance's (``rundir/N/``)."""
    name = f"dom{domid}.ctl"
    for candidate in (Path(rundir) / name, *sorted(Path(rundir).glob(f"*/{name}"))):
        if candidate.is_socket():
            return str(candidate)
    return None


def main(rundir: str, command: str, domid: int | None, vdev: str | None,
         as_json: bool = False) -> int:
    if command in ("list", "stats"):
        workers = [s for s in collect(rundir) if s.get("role") == "worker"]
        if as_json:
            print(json.dumps(workers, indent=2))
            return 0
        if not workers:
            print(f"no guest is served from {rundir}")
            return 1
        for snap in sorted(workers, key=lambda s: int(s.get("domid", 0))):
            for devid, dev in sorted(snap.get("devices", {}).items()):
                head = (f"dom{snap.get('domid')} {dev.get('vdev', '?'):<6} devid {devid:<6} "
                        f"pid {snap.get('pid')}")
                if command == "list":
                    print(f"{head} {dev.get('phase', '?'):<10} "
                          f"{'paused' if dev.get('paused') else 'running':<8} "
                          f"format={dev.get('format', 'raw')} target={dev.get('target', '-')}")
                else:
                    print(f"{head} requests={dev.get('requests', 0)} "
                          f"read_bytes={dev.get('read_bytes', 0)} "
                          f"written_bytes={dev.get('written_bytes', 0)} "
                          f"errors={dev.get('errors', 0)} in_flight={dev.get('in_flight', 0)} "
                          f"interrupts={dev.get('interrupts', 0)} kicks={dev.get('kicks', 0)}")
        return 0
    assert domid is not None and vdev is not None
    path = find_control(rundir, domid)
    if path is None:
        print(f"virtio-diskd ctl: no daemon in {rundir} serves guest {domid}")
        return 2
    try:
        reply = ask(path, {"op": command, "vdev": vdev})
    except (OSError, ValueError) as exc:
        print(f"virtio-diskd ctl: {path}: {exc}")
        return 2
    if as_json:
        print(json.dumps(reply))
    if "error" in reply:
        print(f"virtio-diskd ctl: {reply['error']}")
        return 2
    if not as_json:
        done = "paused (in-flight requests finished, target flushed)" if command == "pause" \
            else "resumed"
        print(f"dom{domid} {vdev}: {done}")
    return 0
