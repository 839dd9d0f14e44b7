"""The xenstore wire protocol (``xen/include/public/io/xs_wire.h``), as data.

Both ends of the protocol live in this project: the daemon's trio client
(:mod:`.client`) and the simulated xenstored (:mod:`virtio_diskd.ioreq.sim.xenstored`).
This module holds what they must agree on and nothing else: the message
header, the operation numbers, the error names and the size limits.  It does
no I/O.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass

from virtio_diskd.backend.errors import VirtioDiskdError

#: ``struct xsd_sockmsg { uint32_t type, req_id, tx_id, len; }`` in host order.
HEADER = struct.Struct("=IIII")
#: ``XENSTORE_PAYLOAD_MAX``: the largest payload either side may send.
PAYLOAD_MAX = 4096
#: ``XENSTORE_ABS_PATH_MAX`` / ``XENSTORE_REL_PATH_MAX``.
ABS_PATH_MAX = 3072
REL_PATH_MAX = 2048


class Op(enum.IntEnum):
    """``enum xsd_sockmsg_type`` (Xen 4.17..4.22)."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT, removed from Xen; the number is not reused.
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


#: ``xsd_errors[]``: the error names a xenstored may put in an XS_ERROR reply.
ERROR_NAMES: dict[int, str] = {
    code: errno.errorcode[code]
    for code in (
        errno.EINVAL,
        errno.EACCES,
        errno.EEXIST,
        errno.EISDIR,
        errno.ENOENT,
        errno.ENOMEM,
        errno.ENOSPC,
        errno.EIO,
        errno.ENOTEMPTY,
        errno.ENOSYS,
        errno.EROFS,
        errno.EBUSY,
        errno.EAGAIN,
        errno.EISCONN,
        errno.E2BIG,
        errno.EPERM,
    )
}
ERROR_CODES: dict[str, int] = {name: code for code, name in ERROR_NAMES.items()}

#: Special watch paths that xenstored fires itself.
INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"


class XenstoreError(VirtioDiskdError, OSError):
    """A request answered with XS_ERROR, or refused locally for the same reason.

    ``errno`` holds the POSIX code (``errno.ENOENT`` …) so callers can match on
    it as they would on any :class:`OSError`.
    """

    def __init__(self, code: int, detail: str = "") -> None:
        name = errno.errorcode.get(code, str(code))
        super().__init__(code, f"{name}{': ' + detail if detail else ''}")


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded ``xsd_sockmsg`` header."""

    op: int
    req_id: int
    tx_id: int
    length: int

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        op, req_id, tx_id, length = HEADER.unpack(raw)
        return cls(op, req_id, tx_id, length)


def pack(op: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """Encode one message; refuses payloads the protocol does not allow."""
    if len(payload) > PAYLOAD_MAX:
        raise XenstoreError(errno.E2BIG, f"payload of {len(payload)} bytes")
    return HEADER.pack(op, req_id & 0xFFFFFFFF, tx_id & 0xFFFFFFFF, len(payload)) + payload


def error_payload(code: int) -> bytes:
    """The XS_ERROR payload for ``code``: its name, NUL-terminated."""
    return ERROR_NAMES.get(code, "EINVAL").encode() + b"\0"


def split_strings(payload: bytes) -> list[bytes]:
    """Split a payload of NUL-terminated strings (a trailing NUL is optional)."""
    if not payload:
        return []
    if payload.endswith(b"\0"):
        payload = payload[:-1]
    return payload.split(b"\0")


def join_strings(items: list[bytes]) -> bytes:
    """Join strings the way xenstored lists them: each one NUL-terminated."""
    return b"".join(item + b"\0" for item in items)
