"""The NBD client protocol, sans-IO: bytes in, bytes and facts out.

What virtio-diskd speaks to an NBD server (``qemu-storage-daemon``'s export of a
qcow2 or VHD image, ``qemu-nbd``, ``nbdkit``, a Ceph or SAN gateway):

* the *fixed newstyle* handshake with ``NBD_OPT_GO`` asking for the export's size,
  transmission flags and block-size constraints (falling back to
  ``NBD_OPT_EXPORT_NAME`` for a server that does not know GO);
* the transmission phase with *simple* replies only.  Structured replies are not
  negotiated, so a read's reply is a 16-byte header followed by exactly the bytes
  asked for, which the caller receives straight into guest memory.  The price is
  the protocol's one ambiguity: after a *failed* read a server may or may not send
  the payload, so the engine treats a read error as a broken stream (it fails
  that read with IOERR and reconnects for the rest).

Every server value is checked (magics, lengths, sizes, handles the client never
sent): a server that breaks the protocol gets :class:`NbdProtocolError`, never a
read outside the request's buffers.  The module does no I/O: the handshake is a
generator driven by :func:`run_handshake`'s caller with the bytes it receives.
"""

from __future__ import annotations

import struct
from collections.abc import Generator
from dataclasses import dataclass

from virtio_diskd.backend.errors import VirtioDiskdError

INIT_MAGIC = 0x4E42444D41474943  # "NBDMAGIC"
OPTION_MAGIC = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

# options and their replies
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_ERR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERR_BIT + 1
REP_ERRORS = {REP_ERR_BIT + 1: "unsupported option", REP_ERR_BIT + 2: "refused by policy",
              REP_ERR_BIT + 3: "invalid option", REP_ERR_BIT + 4: "unsupported on the platform",
              REP_ERR_BIT + 5: "TLS required", REP_ERR_BIT + 6: "no such export",
              REP_ERR_BIT + 7: "server shutting down",
              REP_ERR_BIT + 8: "block size constraints required",
              REP_ERR_BIT + 9: "request too big"}
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# transmission flags
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_RESIZE = 1 << 9

# commands and command flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1

#: What the server's error field means, as an errno (the protocol uses Linux's values
#: for the ones it defines).
ERRNO_NAMES = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC",
               75: "EOVERFLOW", 95: "ENOTSUP", 108: "ESHUTDOWN"}
ESHUTDOWN = 108

#: Without block-size information the protocol's defaults: any alignment, 32 MiB most.
DEFAULT_MAX_PAYLOAD = 32 << 20
#: No export is larger than this (2^63: offsets are signed in the kernel's interfaces).
MAX_EXPORT_SIZE = 1 << 63
#: Option replies longer than this are refused (they are a few bytes, or a message).
MAX_OPTION_REPLY = 64 << 10

_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
REQUEST_SIZE = _REQUEST.size  # 28
REPLY_SIZE = _REPLY.size  # 16


class NbdProtocolError(VirtioDiskdError):
    """The server broke the protocol or refused the export; the reason is for operators."""


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake learnt about the export."""

    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = DEFAULT_MAX_PAYLOAD

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TFLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return bool(self.flags & TFLAG_SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return bool(self.flags & TFLAG_SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return bool(self.flags & TFLAG_SEND_TRIM)

    @property
    def can_write_zeroes(self) -> bool:
        return bool(self.flags & TFLAG_SEND_WRITE_ZEROES)


#: A handshake step: the bytes to send now (may be empty) and how many to receive next.
Step = tuple[bytes, int]


def _option(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", OPTION_MAGIC, option, len(data)) + data


def handshake(export: str) -> Generator[Step, bytes, ExportInfo]:
    """The client's side of the fixed newstyle handshake for ``export``.

    Drive it with ``send``: each yield is ``(bytes to send, bytes to receive)``; send
    back exactly that many received bytes.  Returns the :class:`ExportInfo`.
    """
    name = export.encode()
    if len(name) > 4096:
        raise NbdProtocolError("export name longer than 4096 bytes")
    hello = yield b"", 18
    magic, opt_magic, server_flags = struct.unpack(">QQH", hello)
    if magic != INIT_MAGIC:
        raise NbdProtocolError("not an NBD server (no NBDMAGIC)")
    if opt_magic != OPTION_MAGIC:
        raise NbdProtocolError("the server speaks only the oldstyle handshake")
    if not server_flags & FLAG_FIXED_NEWSTYLE:
        raise NbdProtocolError("the server does not offer fixed newstyle negotiation")
    no_zeroes = bool(server_flags & FLAG_NO_ZEROES)
    client_flags = FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0)
    go = (struct.pack(">I", len(name)) + name
          + struct.pack(">HH", 1, INFO_BLOCK_SIZE))  # INFO_EXPORT always comes
    header = yield struct.pack(">I", client_flags) + _option(OPT_GO, go), 20
    size = flags = None
    blocks = (1, 4096, DEFAULT_MAX_PAYLOAD)
    while True:
        magic, option, reply, length = struct.unpack(">QIII", header)
        if magic != OPTION_REPLY_MAGIC or option != OPT_GO:
            raise NbdProtocolError("malformed option reply")
        if length > MAX_OPTION_REPLY:
            raise NbdProtocolError(f"option reply of {length} bytes")
        data = (yield b"", length) if length else b""
        if reply == REP_ACK:
            break
        if reply == REP_ERR_UNSUP:  # an old server: the option that cannot fail softly
            data = yield _option(OPT_EXPORT_NAME, name), 10 if no_zeroes else 134
            size, flags = struct.unpack_from(">QH", data)
            break
        if reply & REP_ERR_BIT:
            message = data.decode("utf-8", "replace")[:200]
            what = REP_ERRORS.get(reply, f"error {reply - REP_ERR_BIT}")
            raise NbdProtocolError(f"export {export!r}: {what}"
                                   + (f" ({message})" if message else ""))
        if reply == REP_INFO and len(data) >= 2:
            (info,) = struct.unpack_from(">H", data)
            if info == INFO_EXPORT and len(data) == 12:
                size, flags = struct.unpack_from(">QH", data, 2)
            elif info == INFO_BLOCK_SIZE and len(data) == 14:
                blocks = struct.unpack_from(">III", data, 2)
        header = yield b"", 20
    if size is None or flags is None:
        raise NbdProtocolError("the server did not say the export's size")
    return _checked_info(size, flags, *blocks)


def _checked_info(size: int, flags: int, minimum: int, preferred: int,
                  maximum: int) -> ExportInfo:
    if not flags & TFLAG_HAS_FLAGS:
        raise NbdProtocolError("transmission flags without NBD_FLAG_HAS_FLAGS")
    if size >= MAX_EXPORT_SIZE:
        raise NbdProtocolError(f"export size {size} is not plausible")

    def power_of_two(value: int) -> bool:
        return value > 0 and value & (value - 1) == 0

    if not (power_of_two(minimum) and minimum <= 65536 and power_of_two(preferred)
            and preferred >= minimum and maximum >= minimum):
        raise NbdProtocolError(f"block size constraints {minimum}/{preferred}/{maximum} "
                               "are not valid")
    return ExportInfo(size=size, flags=flags, min_block=minimum, preferred_block=preferred,
                      max_payload=min(maximum, DEFAULT_MAX_PAYLOAD))


def request(command: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    """A request header (a write's payload follows it on the wire)."""
    return _REQUEST.pack(REQUEST_MAGIC, flags, command, handle, offset, length)


def disconnect() -> bytes:
    """The soft disconnect (``NBD_CMD_DISC``): the server closes after it."""
    return request(CMD_DISC, 0, 0, 0)


def parse_reply(header: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(handle, error)`` of a simple reply header; a read's payload follows it when
    ``error`` is 0."""
    magic, error, handle = _REPLY.unpack(header)
    if magic != SIMPLE_REPLY_MAGIC:
        raise NbdProtocolError(f"reply magic {magic:#x} (structured replies were not "
                               "negotiated)")
    return handle, error


def parse_reply_from(buffer: bytes | bytearray | memoryview, offset: int) -> tuple[int, int]:
    """:func:`parse_reply` on the header at ``offset`` of a receive buffer."""
    magic, error, handle = _REPLY.unpack_from(buffer, offset)
    if magic != SIMPLE_REPLY_MAGIC:
        raise NbdProtocolError(f"reply magic {magic:#x} (structured replies were not "
                               "negotiated)")
    return handle, error


def error_name(error: int) -> str:
    return ERRNO_NAMES.get(error, f"errno {error}")
