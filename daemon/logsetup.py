"""structlog for the daemon: console in the foreground, the journal's native protocol
under systemd, JSON on request.  Every line about a device carries domid, devid and vdev
(bound by the code that handles the device).

Journal (``--log-format journal``, the default under systemd): each record is one
datagram to journald's socket in its native protocol (systemd's "Native Journal
Protocol": ``KEY=value`` lines, length-prefixed values where a value holds a newline),
with MESSAGE (the record as logfmt), PRIORITY, SYSLOG_IDENTIFIER, and every field of
the record as a journal field — ``domid`` as GUEST_DOMID, ``devid`` as DEVID, ``vdev``
as VDEV, the event name as VD_EVENT — so ``journalctl -u virtio-diskd GUEST_DOMID=5
VDEV=xvda`` shows one device's story.  No colours there.  Without the socket (no
journald), the same logfmt goes to stderr with the sd-daemon priority prefix.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
LEVELS = ("debug", "info", "warning", "error", "critical")


class _PrefixedRenderer:
    """logfmt with the sd-daemon(3) priority prefix, so journald stores PRIORITY=."""

    def __init__(self) -> None:
        self._logfmt = structlog.processors.LogfmtRenderer(
            key_order=["event", "domid", "devid", "vdev"], drop_missing=True)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        level = str(event.get("level", method))
        return f"<{_PRIORITY.get(level, 6)}>{self._logfmt(logger, method, event)}"


JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: The record fields that have a journal name of their own.
_JOURNAL_NAMES = {"domid": "GUEST_DOMID", "devid": "DEVID", "vdev": "VDEV",
                  "event": "VD_EVENT", "level": "VD_LEVEL"}
_NOT_A_FIELD_CHAR = re.compile(r"[^A-Z0-9_]")
#: journald takes datagrams up to its socket's buffer; longer values are cut here.
_MAX_VALUE = 64 << 10


def journal_field(key: str) -> str:
    """A record key as a journal field name: upper case, [A-Z0-9_], no leading _ or
    digit (journald drops those), VD_-prefixed when it would clash with its own."""
    name = _JOURNAL_NAMES.get(key) or _NOT_A_FIELD_CHAR.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit() or name in ("MESSAGE", "PRIORITY",
                                                  "SYSLOG_IDENTIFIER"):
        name = f"VD_{name}"
    return name[:64]


def journal_datagram(fields: list[tuple[str, str]]) -> bytes:
    """The native protocol: ``KEY=value\n``, or ``KEY\n`` + 64-bit LE length + value
    + ``\n`` for a value with a newline in it."""
    out = bytearray()
    for key, value in fields:
        data = value.encode("utf-8", "replace")[:_MAX_VALUE]
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def parse_journal_datagram(data: bytes) -> dict[str, str]:
    """The fields of one native-protocol datagram (what journald reads from it)."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            pos = end + 1
        else:  # KEY\n, 64-bit little-endian length, value, \n
            key = line
            (length,) = struct.unpack_from("<Q", data, end + 1)
            value = data[end + 9 : end + 9 + length]
            pos = end + 9 + length + 1
        fields[key.decode()] = value.decode("utf-8", "replace")
    return fields


class _JournalRenderer:
    """The record as journal fields (MESSAGE is the logfmt line a person reads)."""

    def __init__(self, identifier: str) -> None:
        self.identifier = identifier
        self._logfmt = structlog.processors.LogfmtRenderer(
            key_order=["event", "domid", "devid", "vdev"], drop_missing=True)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> bytes:
        level = str(event.get("level", method))
        fields = [("MESSAGE", self._logfmt(logger, method, dict(event))),
                  ("PRIORITY", str(_PRIORITY.get(level, 6))),
                  ("SYSLOG_IDENTIFIER", self.identifier)]
        fields += [(journal_field(key), str(value)) for key, value in event.items()]
        return journal_datagram(fields)


class JournalLogger:
    """Sends each rendered record to journald; falls back to stderr if it is away."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def msg(self, datagram: bytes) -> None:
        try:
            self.sock.sendto(datagram, self.path)
        except OSError:  # journald away: the same line, priority-prefixed, on stderr
            fields = parse_journal_datagram(datagram)
            _write_line(f"<{fields.get('PRIORITY', '6')}>{fields.get('MESSAGE', '')}")

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def _write_line(line: str) -> None:
    """One record on stderr in one write (see :func:`configure`)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def default_format() -> str:
    if os.environ.get("JOURNAL_STREAM"):
        return "journal"
    return "console"


def configure(fmt: str = "console", level: str = "info") -> None:
    """(Re)configure logging; called at start-up and on SIGHUP with a new level."""
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    shared: list[Any] = [structlog.contextvars.merge_contextvars,
                         structlog.processors.add_log_level,
                         structlog.processors.StackInfoRenderer()]
    if fmt == "json":
        processors = [*shared, structlog.processors.TimeStamper("iso", utc=True),
                      structlog.processors.ExceptionRenderer(
                          structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
                      structlog.processors.JSONRenderer()]
    elif fmt == "journal":
        journal = os.environ.get("VIRTIO_DISKD_JOURNAL_SOCKET", JOURNAL_SOCKET)
        if os.path.exists(journal):
            structlog.configure(
                processors=[*shared, structlog.processors.format_exc_info,
                            _JournalRenderer("virtio-diskd")],
                wrapper_class=structlog.make_filtering_bound_logger(
                    getattr(logging, level.upper())),
                logger_factory=lambda *_args: JournalLogger(journal),
                cache_logger_on_first_use=False)
            return
        # no journald to time the records: they carry their own time (UTC, ISO 8601)
        processors = [*shared, structlog.processors.format_exc_info,
                      structlog.processors.TimeStamper("iso", utc=True, key="ts"),
                      _PrefixedRenderer()]
    elif fmt == "console":
        processors = [*shared, structlog.processors.TimeStamper("%H:%M:%S.%f"),
                      structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    else:
        raise ValueError(f"log format {fmt!r} is not console, json or journal")
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        # one write() per record, its newline included (print() makes two on an unbuffered
        # stderr): the supervisor and its workers share stderr, and two processes logging
        # at once must not run their lines together
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
