"""Running the daemon as its own process against a simulated host (demo, bench, tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import trio


def make_image(path: str, size: int, *, random_fill: bool = False) -> None:
    """A raw image of ``size`` bytes (sparse, or filled so reads hit real data)."""
    with open(path, "wb") as f:
        if random_fill:
            chunk = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
        f.truncate(size)


def notify_socket(path: str) -> socket.socket:
    """The datagram socket systemd would give us as $NOTIFY_SOCKET."""
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind(path)
    sock.setblocking(False)
    return sock


def start_daemon(work: str, xenstore_path: str, notify_path: str, log_path: str,
                 extra: list[str] | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "virtio_diskd.daemon", "--foreground", "--simulated", work,
             "--xenstore", xenstore_path, "--rundir", os.path.join(work, "run"),
             "--log-format", "console", *(extra or [])],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


async def wait_ready(notify: socket.socket, timeout: float) -> bool:
    """Wait for READY=1, as systemd's Type=notify does."""
    with trio.move_on_after(timeout):
        while True:
            await trio.lowlevel.wait_readable(notify)
            message = notify.recv(4096).decode(errors="replace")
            if "READY=1" in message.split("\n"):
                return True
    return False
