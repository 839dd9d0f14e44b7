"""The socket protocol between the simulated hypervisor (``ioreq/sim/hypercalls.py``)
and the daemon's binding to it (:mod:`.simulated`): shared by both sides.

Control messages: a 4-byte little-endian length, then JSON; file descriptors
(guest RAM memfds, ioreq pages, event-channel counters and eventfds) ride
along as SCM_RIGHTS.  Events themselves never cross this socket: they are
counters in shared memory plus eventfd wake-ups (see ``hypervisor.py``).
"""

from __future__ import annotations

import array
import json
import socket
import struct
from typing import Any

from virtio_diskd.backend.errors import VirtioDiskdError

MAX_MESSAGE = 1 << 20
MAX_FDS = 8


class ChannelClosed(VirtioDiskdError, ConnectionError):
    """The other side went away."""


def send_message(sock: socket.socket, message: dict[str, Any], fds: list[int] = ()) -> None:  # type: ignore[assignment]
    payload = json.dumps(message, separators=(",", ":")).encode()
    data = struct.pack("<I", len(payload)) + payload
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, count: int, fds: list[int]) -> bytes:
    chunks = b""
    while len(chunks) < count:
        data, ancdata, _flags, _addr = sock.recvmsg(
            count - len(chunks), socket.CMSG_SPACE(MAX_FDS * 4))
        for level, kind, raw in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(raw[: len(raw) - len(raw) % 4])
                fds.extend(received)
        if not data:
            raise ChannelClosed("connection closed")
        chunks += data
    return chunks


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    fds: list[int] = []
    (length,) = struct.unpack("<I", _recv_exact(sock, 4, fds))
    if length > MAX_MESSAGE:
        raise ChannelClosed(f"oversized message ({length} bytes)")
    message = json.loads(_recv_exact(sock, length, fds))
    if not isinstance(message, dict):
        raise ChannelClosed("message is not an object")
    return message, fds
