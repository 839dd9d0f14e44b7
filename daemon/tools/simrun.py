"""Running the daemon as its own process against a simulated host (demo, bench, tests)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys

import trio

#: Stamped at the start of every sector of a filled image: magic, sector, generation 0.
IMAGE_STAMP = struct.Struct("<4sQI")
IMAGE_MAGIC = b"VDIM"


def make_image(path: str, size: int, *, random_fill: bool = False) -> None:
    """A raw image of ``size`` bytes: sparse, or filled so reads hit real data.

    A filled image has no two sectors alike: random bytes with each sector's own
    address stamped at its start, so a read that lands anywhere but where it was
    asked to — a whole MiB off included — fails verification against the image."""
    with open(path, "wb") as f:
        if random_fill:
            noise = os.urandom(1 << 20)
            for mib in range(size >> 20):
                chunk = bytearray(noise)
                first = mib << 11  # 2048 sectors a MiB
                for i in range(2048):
                    IMAGE_STAMP.pack_into(chunk, i << 9, IMAGE_MAGIC, first + i, 0)
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
                 extra: list[str] | None = None,
                 env: dict[str, str] | None = None,
                 wrapper: list[str] | None = None) -> subprocess.Popen[bytes]:
    """The daemon as systemd starts it (``Type=notify``); ``wrapper`` goes before its
    command line (one that execs the rest, as a unit's system-call filter is applied)."""
    env = dict(os.environ if env is None else env, NOTIFY_SOCKET=notify_path)
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            [*(wrapper or []),
             sys.executable, "-m", "virtio_diskd.daemon", "--foreground", "--simulated", work,
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
