"""Journal-native logs: records reach journald's socket as structured fields, so that
``journalctl GUEST_DOMID=5 VDEV=xvda`` shows one device's story."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from virtio_diskd.daemon.logsetup import (
    journal_datagram,
    journal_field,
    parse_journal_datagram,
)


class FakeJournal:
    """A datagram socket where journald's would be; keeps what arrives, parsed."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.path = path

    def records(self) -> list[dict[str, str]]:
        out = []
        while True:
            try:
                out.append(parse_journal_datagram(self.sock.recv(1 << 20)))
            except TimeoutError:
                return out


def test_the_native_protocol_round_trips_values_with_newlines() -> None:
    fields = [("MESSAGE", "one line"), ("EXCEPTION", "Traceback\n  line 2\n"),
              ("EMPTY", ""), ("UNICODE", "µs → ok")]
    assert parse_journal_datagram(journal_datagram(fields)) == dict(fields)
    assert b"EXCEPTION\n" in journal_datagram(fields)  # length-prefixed, not KEY=
    assert journal_field("domid") == "GUEST_DOMID" and journal_field("vdev") == "VDEV"
    assert journal_field("in-flight") == "IN_FLIGHT" and journal_field("_x") == "X"
    assert journal_field("message") == "VD_MESSAGE" and journal_field("1st") == "VD_1ST"


def test_daemon_records_carry_guest_and_device_fields(tmp_path: Path) -> None:
    journal = FakeJournal(tmp_path / "journal.sock")
    env = dict(os.environ, VIRTIO_DISKD_JOURNAL_SOCKET=str(journal.path))
    # a daemon that cannot reach xenstored logs why, then gives up: two records
    subprocess.run([sys.executable, "-m", "virtio_diskd.daemon", "--foreground",
                    "--log-format", "journal", "--xenstore", str(tmp_path / "none.sock"),
                    "--xenstore-timeout", "1", "--rundir", str(tmp_path / "run")],
                   env=env, check=False, timeout=60, capture_output=True)
    records = journal.records()
    events = [r.get("VD_EVENT") for r in records]
    assert "xenstore.unreachable" in events and "daemon.giving_up" in events
    giving_up = records[events.index("daemon.giving_up")]
    assert giving_up["PRIORITY"] == "3" and giving_up["SYSLOG_IDENTIFIER"] == "virtio-diskd"
    assert giving_up["MESSAGE"].startswith("event=daemon.giving_up")
    assert "\x1b[" not in "".join(r["MESSAGE"] for r in records)  # no colours


def test_device_fields_in_a_record(tmp_path: Path) -> None:
    journal = FakeJournal(tmp_path / "journal.sock")
    code = (
        "import os, structlog\n"
        "from virtio_diskd.daemon import logsetup\n"
        "logsetup.configure('journal', 'info')\n"
        "structlog.get_logger('t').bind(domid=5, devid=51712, vdev='xvda')"
        ".warning('device.drain_waiting', in_flight=3)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   env=dict(os.environ, VIRTIO_DISKD_JOURNAL_SOCKET=str(journal.path)))
    [record] = journal.records()
    assert record["GUEST_DOMID"] == "5" and record["DEVID"] == "51712"
    assert record["VDEV"] == "xvda" and record["IN_FLIGHT"] == "3"
    assert record["PRIORITY"] == "4" and record["VD_EVENT"] == "device.drain_waiting"


def test_without_journald_the_prefixed_lines_go_to_stderr(tmp_path: Path) -> None:
    code = ("import structlog\nfrom virtio_diskd.daemon import logsetup\n"
            "logsetup.configure('journal', 'info')\n"
            "structlog.get_logger('t').error('x.failed', domid=2)\n")
    env = dict(os.environ, VIRTIO_DISKD_JOURNAL_SOCKET=str(tmp_path / "absent.sock"))
    result = subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60,
                            capture_output=True, text=True)
    assert result.stderr.startswith("<3>event=x.failed domid=2")
    assert re.search(r" ts=20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", result.stderr)  # no journald


class _Writes:
    """A stderr that keeps each write() call apart."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_each_record_is_one_write_with_its_newline(monkeypatch, tmp_path: Path) -> None:
    """The supervisor and its workers share stderr: a record written as two pieces (its
    text, then the newline) runs into another process's record written in between."""
    import structlog

    from virtio_diskd.daemon import logsetup

    monkeypatch.setenv("VIRTIO_DISKD_JOURNAL_SOCKET", str(tmp_path / "no-journald"))
    try:
        for fmt in ("console", "journal", "json"):
            stderr = _Writes()
            monkeypatch.setattr(sys, "stderr", stderr)
            logsetup.configure(fmt, "info")
            structlog.get_logger("t").info("device.serving", domid=3, vdev="xvda")
            assert len(stderr.calls) == 1, (fmt, stderr.calls)
            assert stderr.calls[0].endswith("\n") and stderr.calls[0].count("\n") == 1
            assert "device.serving" in stderr.calls[0]
    finally:
        monkeypatch.undo()
        logsetup.configure("console", "warning")
