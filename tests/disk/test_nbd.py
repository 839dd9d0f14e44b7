"""The NBD client: the protocol on bytes, URIs, and the engine against a real server
(qemu-nbd) — bytes read back, flush and FUA, discard, and a server that dies mid-I/O:
every acknowledged write is on the server, the rest fail with IOERR or are sent
again once it is back."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdtest.disks import request, run, take_in_groups
from vdtest.nbdserver import QemuNbd, missing_tools
from virtio_diskd.backend.disk import nbd_protocol as proto
from virtio_diskd.backend.disk.nbd import NbdEngine, NbdTarget, NbdUnavailable, connect
from virtio_diskd.backend.disk.nbd_uri import BadNbdUri, NbdAddress, parse_nbd_uri
from virtio_diskd.backend.disk.request import DiskRequest, IoKind, IoStatus

MiB = 1 << 20


# -- the protocol, sans-IO ---------------------------------------------------------------

def _drive(replies: list[bytes], export: str = "disk") -> tuple[proto.ExportInfo, bytes]:
    """Run the handshake against canned server bytes; returns the info and what the
    client sent."""
    stream = b"".join(replies)
    sent = b""
    steps = proto.handshake(export)
    out, want = next(steps)
    try:
        while True:
            sent += out
            data, stream = stream[:want], stream[want:]
            assert len(data) == want, "the client asked for more than the server sent"
            out, want = steps.send(data)
    except StopIteration as done:
        return done.value, sent


def _hello(flags: int = proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES) -> bytes:
    return struct.pack(">QQH", proto.INIT_MAGIC, proto.OPTION_MAGIC, flags)


def _rep(reply: int, data: bytes = b"", option: int = proto.OPT_GO) -> bytes:
    return struct.pack(">QIII", proto.OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def _info_export(size: int, flags: int) -> bytes:
    return _rep(proto.REP_INFO, struct.pack(">HQH", proto.INFO_EXPORT, size, flags))


def test_handshake_go_learns_size_flags_and_block_sizes() -> None:
    flags = proto.TFLAG_HAS_FLAGS | proto.TFLAG_SEND_FLUSH | proto.TFLAG_SEND_TRIM
    info, sent = _drive([_hello(), _info_export(10 * MiB, flags),
                         _rep(proto.REP_INFO, struct.pack(">HIII", proto.INFO_BLOCK_SIZE,
                                                          512, 4096, 1 * MiB)),
                         _rep(proto.REP_ACK)])
    assert (info.size, info.flags) == (10 * MiB, flags)
    assert (info.min_block, info.preferred_block, info.max_payload) == (512, 4096, MiB)
    assert info.can_flush and info.can_trim and not info.can_fua and not info.read_only
    # client flags: fixed newstyle + no zeroes; then GO naming the export, asking for
    # the block-size info
    assert sent[:4] == struct.pack(">I", 3)
    assert sent[4:20] == struct.pack(">QII", proto.OPTION_MAGIC, proto.OPT_GO, 4 + 4 + 4)
    assert sent[20:] == struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 1, 3)


def test_handshake_falls_back_to_export_name_on_an_old_server() -> None:
    flags = proto.TFLAG_HAS_FLAGS | proto.TFLAG_READ_ONLY
    info, sent = _drive([_hello(proto.FLAG_FIXED_NEWSTYLE), _rep(proto.REP_ERR_UNSUP),
                         struct.pack(">QH", 5 * MiB, flags) + bytes(124)])
    assert info.size == 5 * MiB and info.read_only
    assert sent.endswith(struct.pack(">QII", proto.OPTION_MAGIC, proto.OPT_EXPORT_NAME, 4)
                         + b"disk")


@pytest.mark.parametrize(("replies", "message"), [
    ([b"NOTNBD!!" + bytes(10)], "not an NBD server"),
    ([struct.pack(">QQH", proto.INIT_MAGIC, 0x00420281861253, 0)], "oldstyle"),
    ([_hello(0)], "fixed newstyle"),
    ([_hello(), _rep(proto.REP_ERR_BIT + 6, b"no such thing")], "no such export.*no such"),
    ([_hello(), _rep(proto.REP_ERR_BIT + 5)], "TLS required"),
    ([_hello(), _rep(proto.REP_ACK)], "did not say the export's size"),
    ([_hello(), _info_export(MiB, 0), _rep(proto.REP_ACK)], "HAS_FLAGS"),
    ([_hello(), _info_export(1 << 63, 1), _rep(proto.REP_ACK)], "not plausible"),
    ([_hello(), _info_export(MiB, 1),
      _rep(proto.REP_INFO, struct.pack(">HIII", 3, 3, 4096, MiB)), _rep(proto.REP_ACK)],
     "block size constraints"),
    ([_hello(), _rep(proto.REP_ACK, option=proto.OPT_ABORT)], "malformed option reply"),
    ([_hello(), struct.pack(">QIII", proto.OPTION_REPLY_MAGIC, proto.OPT_GO, 1,
                            1 << 30)], "option reply of"),
])
def test_handshake_refuses_what_breaks_the_protocol(replies: list[bytes],
                                                    message: str) -> None:
    with pytest.raises(proto.NbdProtocolError, match=message):
        _drive(replies)


def test_requests_and_replies_on_the_wire() -> None:
    header = proto.request(proto.CMD_WRITE, 7, 4096, 512, proto.CMD_FLAG_FUA)
    assert header == struct.pack(">IHHQQI", 0x25609513, 1, 1, 7, 4096, 512)
    assert proto.parse_reply(struct.pack(">IIQ", 0x67446698, 5, 9)) == (9, 5)
    with pytest.raises(proto.NbdProtocolError, match="structured"):
        proto.parse_reply(struct.pack(">IIQ", 0x668E33EF, 0, 9))


@pytest.mark.parametrize(("uri", "expected"), [
    ("nbd://example.org/vol1", NbdAddress(export="vol1", host="example.org")),
    ("nbd://10.0.0.1:10810/", NbdAddress(export="", host="10.0.0.1", port=10810)),
    ("nbd://[::1]/a%20b", NbdAddress(export="a b", host="::1")),
    ("nbd+unix:///disk?socket=/run/x.sock", NbdAddress(export="disk",
                                                      socket_path="/run/x.sock")),
])
def test_nbd_uris(uri: str, expected: NbdAddress) -> None:
    assert parse_nbd_uri(uri) == expected


@pytest.mark.parametrize(("uri", "message"), [
    ("nbds://host/x", "TLS"), ("nbds+unix:///x?socket=/s", "TLS"),
    ("nbd+unix:///x", "socket="), ("nbd+unix:///x?socket=rel", "socket="),
    ("nbd+unix://host/x?socket=/s", "no host"), ("nbd://host/x?tls=1", "unknown"),
    ("nbd:///x", "no host"), ("nbd://host:99999/x", "bad port"),
    ("nbd://u@host/x", "user"), ("http://host/x", "not an NBD URI"),
    ("nbd://host/x\n", "control"), ("nbd+unix:///x?socket=/s&socket=/t", "socket="),
])
def test_bad_nbd_uris(uri: str, message: str) -> None:
    with pytest.raises(BadNbdUri, match=message):
        parse_nbd_uri(uri)


# -- the engine against qemu-nbd ------------------------------------------------------------

needs_qemu_nbd = pytest.mark.skipif(missing_tools("qemu-nbd") is not None,
                                    reason=str(missing_tools("qemu-nbd")))


def _stamp(offset: int, length: int, generation: int) -> bytes:
    """Bytes no other block or generation has: a misdirected or stale read shows."""
    out = bytearray()
    for at in range(offset, offset + length, 16):
        out += struct.pack("<QQ", at, generation)
    return bytes(out[:length])


def _engine(server: QemuNbd, *, reconnect_wait: float = 5.0) -> NbdEngine[DiskRequest]:
    address = parse_nbd_uri(server.uri)
    sock, export = connect(address)
    target = NbdTarget(address, export, read_only=False, display=server.uri)
    return NbdEngine(target, sock, name="test", reconnect_wait=reconnect_wait)


def _spread(data: bytes) -> list[memoryview]:
    """``data`` in page-sized pieces of separate buffers, as a guest's scatter list."""
    return [memoryview(bytearray(data[at : at + 4096])) for at in range(0, len(data), 4096)]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[QemuNbd]:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    server = QemuNbd(image, tmp_path / "nbd.sock").start()
    yield server
    server.stop()


@needs_qemu_nbd
def test_reads_and_writes_land_where_asked(served: QemuNbd) -> None:
    engine = _engine(served)
    try:
        assert engine.target.size == 64 * MiB and engine.target.export.can_flush
        writes = [request(IoKind.WRITE, offset, _spread(_stamp(offset, length, 1)))
                  for offset, length in ((0, 4096), (12288, 65536), (5 * MiB, MiB),
                                         (64 * MiB - 512, 512))]
        assert all(r.status == IoStatus.OK for r in run(engine, writes))
        raw = served.image.read_bytes()
        for w in writes:
            assert raw[w.offset : w.offset + w.length] == b"".join(w.buffers)
        reads = [request(IoKind.READ, w.offset, _spread(bytes(w.length))) for w in writes]
        assert all(r.status == IoStatus.OK for r in run(engine, reads))
        for w, r in zip(writes, reads, strict=True):
            assert b"".join(r.buffers) == b"".join(w.buffers)
        assert raw[4096:12288] == bytes(8192)  # nothing else changed
    finally:
        engine.close()


@needs_qemu_nbd
def test_completions_taken_a_few_at_a_time_are_each_taken_once(served: QemuNbd) -> None:
    """As with the file engine: at most ``limit`` per take, each request once, and what
    is left over shows in ``has_completions`` after the eventfd was cleared."""
    engine = _engine(served)
    try:
        reads = [request(IoKind.READ, i * 4096, _spread(bytes(4096))) for i in range(10)]
        assert engine.submit(reads) == []
        taken = take_in_groups(engine, 10, 3)
        assert sorted(map(id, taken)) == sorted(map(id, reads))
        assert all(r.status == IoStatus.OK for r in reads)
        assert not engine.has_completions and engine.take_completions(3) == []
    finally:
        engine.close()


@needs_qemu_nbd
def test_large_requests_go_in_pieces_within_the_exports_limit(served: QemuNbd) -> None:
    engine = _engine(served)
    try:
        engine.target.export = dataclasses.replace(engine.target.export, max_payload=64 << 10)
        data = _stamp(MiB, 3 * MiB + 4096, 2)
        done = run(engine, [request(IoKind.WRITE, MiB, _spread(data))])
        assert done[0].status == IoStatus.OK
        read = request(IoKind.READ, MiB, [memoryview(bytearray(len(data)))])
        assert run(engine, [read])[0].status == IoStatus.OK
        assert bytes(read.buffers[0]) == data == served.image.read_bytes()[MiB : MiB + len(data)]
    finally:
        engine.close()


@needs_qemu_nbd
def test_flush_fua_discard_and_write_zeroes(served: QemuNbd) -> None:
    engine = _engine(served)
    try:
        data = _stamp(0, 2 * MiB, 3)
        writes = [request(IoKind.WRITE, 0, _spread(data[:MiB])),
                  request(IoKind.WRITE, MiB, _spread(data[MiB:]), durable=True)]
        flush = request(IoKind.FLUSH)
        done = run(engine, [*writes, flush])
        assert [r.status for r in done].count(IoStatus.OK) == 3
        assert served.image.read_bytes()[: 2 * MiB] == data
        zero = request(IoKind.WRITE_ZEROES, ranges=[(4096, 8192, False)])
        discard = request(IoKind.DISCARD, ranges=[(MiB, 65536, True)])
        assert all(r.status == IoStatus.OK for r in run(engine, [zero, discard]))
        raw = served.image.read_bytes()
        assert raw[4096:12288] == bytes(8192) and raw[:4096] == data[:4096]
        assert raw[12288 : MiB] == data[12288 : MiB]
        assert raw[MiB : MiB + 65536] == bytes(65536)  # a punched hole reads as zeroes
        engine.sync()  # the operator's pause: a private flush, not a completion
        assert engine.take_completions() == []
    finally:
        engine.close()


@needs_qemu_nbd
def test_a_flush_waits_for_the_writes_before_it(served: QemuNbd) -> None:
    """The protocol's flush covers only writes the server has answered: ours is sent
    once every write submitted before it has its reply."""
    engine = _engine(served)
    try:
        answered: list[DiskRequest] = []
        at_flush: list[int] = []
        send, finish = engine._send, engine._finish  # watch the engine

        def watching_send(conn: object, pieces: list[object]) -> None:
            if any(p.command == proto.CMD_FLUSH for p in pieces):  # type: ignore[attr-defined]
                at_flush.append(len(answered))
            send(conn, pieces)  # type: ignore[arg-type]

        def watching_finish(job: object, *rest: bool) -> None:
            finish(job, *rest)  # type: ignore[arg-type]
            answered.append(job.request)  # type: ignore[attr-defined]

        engine._send = watching_send  # type: ignore[method-assign]
        engine._finish = watching_finish  # type: ignore[method-assign]
        writes = [request(IoKind.WRITE, at * MiB, _spread(_stamp(at * MiB, MiB, 4)))
                  for at in range(8)]
        flush = request(IoKind.FLUSH)
        done = engine.submit(writes)
        done += engine.submit([flush])  # at once, while the writes are on their way
        deadline = time.monotonic() + 30
        while len(done) < 9 and time.monotonic() < deadline:
            select.select([engine.completion_fd], [], [], 1)
            done += engine.take_completions()
        assert all(r.status == IoStatus.OK for r in done)
        assert at_flush == [8]  # sent only when all eight writes were answered
    finally:
        engine.close()


@needs_qemu_nbd
def test_a_server_that_dies_mid_io(served: QemuNbd) -> None:
    """Acknowledged writes are on the server; the flush after the loss fails (those
    writes were never flushed); once the server is back, requests succeed again."""
    engine = _engine(served, reconnect_wait=0.5)
    try:
        first = [request(IoKind.WRITE, at * 65536, _spread(_stamp(at * 65536, 65536, 5)))
                 for at in range(8)]
        assert all(r.status == IoStatus.OK for r in run(engine, first))  # not flushed
        writes = [request(IoKind.WRITE, at * 65536, _spread(_stamp(at * 65536, 65536, 5)))
                  for at in range(8, 1024)]
        done: list[DiskRequest] = list(engine.submit(writes))
        deadline = time.monotonic() + 30
        while not done and time.monotonic() < deadline:
            done += engine.take_completions()
        served.kill()  # right after the first acknowledgement of the batch
        while len(done) < len(writes) and time.monotonic() < deadline:
            time.sleep(0.01)
            done += engine.take_completions()
        writes = first + writes
        assert len(done) == len(writes) - len(first), "every request completed, somehow"
        ok = [w for w in writes if w.status == IoStatus.OK]
        failed = [w for w in writes if w.status == IoStatus.IO_ERROR]
        assert len(ok) + len(failed) == len(writes)
        raw = served.image.read_bytes()
        for w in ok:  # acknowledged means on the server
            assert raw[w.offset : w.offset + w.length] == b"".join(w.buffers), w
        assert failed, "the kill came mid-I/O: some requests could not be done"
        assert engine.disconnects >= 1
        # no server, and the outage's grace (reconnect_wait) is over: requests fail
        late = run(engine, [request(IoKind.READ, 0, _spread(bytes(4096)))])
        assert late[0].status == IoStatus.IO_ERROR
        served.start()
        deadline = time.monotonic() + 10
        while not engine.connected and time.monotonic() < deadline:
            time.sleep(0.01)  # the engine keeps trying in the background
        assert engine.connected
        flush = run(engine, [request(IoKind.FLUSH)])
        assert flush[0].status == IoStatus.IO_ERROR  # writes acked before the loss: unsure
        again = run(engine, [request(IoKind.WRITE, 0, _spread(_stamp(0, 8192, 6))),
                             request(IoKind.FLUSH)])
        assert [r.status for r in again] == [IoStatus.OK, IoStatus.OK]
        assert served.image.read_bytes()[:8192] == _stamp(0, 8192, 6)
        assert engine.connects >= 2
    finally:
        engine.close()


@needs_qemu_nbd
def test_requests_in_flight_are_sent_again_over_a_new_connection(served: QemuNbd) -> None:
    engine = _engine(served, reconnect_wait=10.0)
    try:
        assert run(engine, [request(IoKind.WRITE, 0, _spread(_stamp(0, MiB, 7)))])[0].status \
            == IoStatus.OK
        served.kill()
        reads = [request(IoKind.READ, 0, _spread(bytes(MiB)))]
        finished = engine.submit(reads)
        time.sleep(0.3)  # the engine finds the server gone and retries
        served.start()
        finished += run(engine, [])
        while not finished:
            finished += engine.take_completions()
            time.sleep(0.01)
        assert reads[0].status == IoStatus.OK
        assert b"".join(reads[0].buffers) == _stamp(0, MiB, 7)
    finally:
        engine.close()


def test_unreachable_export_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NbdUnavailable, match=r"unix:.*nothing\.sock"):
        connect(NbdAddress(export="x", socket_path=str(tmp_path / "nothing.sock")))


# -- a hostile server ------------------------------------------------------------------------

class _FakeServer:
    """Answers the handshake, then does what ``behave`` says with each request."""

    def __init__(self, path: Path, behave: str) -> None:
        self.path, self.behave = path, behave
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen()
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.sendall(_hello())
            conn.recv(4)
            head = conn.recv(16)
            conn.recv(struct.unpack(">QII", head)[2])
            flags = proto.TFLAG_HAS_FLAGS | proto.TFLAG_SEND_FLUSH
            conn.sendall(_info_export(MiB, flags) + _rep(proto.REP_ACK))
            while True:
                header = conn.recv(28, socket.MSG_WAITALL)
                if len(header) < 28:
                    return
                _, _, command, handle, _, length = struct.unpack(">IHHQQI", header)
                if command == proto.CMD_WRITE:
                    conn.recv(length, socket.MSG_WAITALL)
                if self.behave == "stranger":  # a reply to a request never made
                    conn.sendall(struct.pack(">IIQ", proto.SIMPLE_REPLY_MAGIC, 0, handle + 99))
                elif self.behave == "read_error" and command == proto.CMD_READ:
                    conn.sendall(struct.pack(">IIQ", proto.SIMPLE_REPLY_MAGIC, 5, handle))
                elif self.behave == "write_error" and command == proto.CMD_WRITE:
                    conn.sendall(struct.pack(">IIQ", proto.SIMPLE_REPLY_MAGIC, 28, handle))
                else:
                    conn.sendall(struct.pack(">IIQ", proto.SIMPLE_REPLY_MAGIC, 0, handle)
                                 + (b"\xab" * length if command == proto.CMD_READ else b""))

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("behave", ["stranger", "read_error", "write_error"])
def test_a_hostile_or_failing_server_fails_requests_not_the_engine(tmp_path: Path,
                                                                   behave: str) -> None:
    server = _FakeServer(tmp_path / "fake.sock", behave)
    address = NbdAddress(export="disk", socket_path=str(server.path))
    sock, export = connect(address)
    engine: NbdEngine[DiskRequest] = NbdEngine(
        NbdTarget(address, export, read_only=False, display="fake"), sock,
        reconnect_wait=0.3)
    try:
        read = request(IoKind.READ, 0, [memoryview(bytearray(4096))])
        write = request(IoKind.WRITE, 4096, [memoryview(bytearray(b"x" * 4096))])
        run(engine, [read, write])
        if behave == "stranger":  # dropped, retried, dropped again … until the deadline
            assert read.status == write.status == IoStatus.IO_ERROR
            assert server.connections >= 2
        elif behave == "read_error":  # that read fails; the connection is replaced
            assert read.status == IoStatus.IO_ERROR and write.status == IoStatus.OK
        else:
            assert write.status == IoStatus.IO_ERROR and read.status == IoStatus.OK
            assert bytes(read.buffers[0]) == b"\xab" * 4096
        # the engine still serves
        later = request(IoKind.FLUSH)
        run(engine, [later])
        assert later.status == (IoStatus.IO_ERROR if behave == "stranger" else IoStatus.OK)
    finally:
        engine.close()
        server.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("vd-nbd-fake")]
    os.unlink(server.path)


# -- any bytes a server may send --------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.data())
def test_any_server_bytes_end_the_handshake_cleanly(data: st.DataObject) -> None:
    """Whatever a server sends, the handshake ends with an ExportInfo or
    NbdProtocolError, and never asks for more than an option reply's bound."""
    steps = proto.handshake("disk")
    _, want = next(steps)
    # a plausible start half the time, so the later stages are reached too
    plausible = data.draw(st.booleans())
    try:
        for _ in range(50):
            assert 0 < want <= proto.MAX_OPTION_REPLY + 134
            if plausible and want == 18:
                chunk = _hello()
            elif plausible and want == 20:
                reply = data.draw(st.sampled_from(
                    [proto.REP_ACK, proto.REP_INFO, proto.REP_ERR_UNSUP, proto.REP_ERR_BIT + 6,
                     data.draw(st.integers(0, 2**32 - 1))]))
                length = data.draw(st.one_of(st.sampled_from([0, 2, 12, 14, 100]),
                                             st.integers(0, 2**32 - 1)))
                chunk = struct.pack(">QIII", proto.OPTION_REPLY_MAGIC, proto.OPT_GO, reply,
                                    length)
            else:
                chunk = data.draw(st.binary(min_size=want, max_size=want))
            _, want = steps.send(chunk)
    except StopIteration as done:
        assert isinstance(done.value, proto.ExportInfo)
        assert done.value.size < proto.MAX_EXPORT_SIZE and done.value.max_payload >= 1
    except proto.NbdProtocolError:
        pass


@given(st.binary(min_size=16, max_size=16))
def test_any_reply_header_parses_or_is_refused(header: bytes) -> None:
    try:
        handle, error = proto.parse_reply(header)
    except proto.NbdProtocolError:
        return
    assert header[:4] == b"\x67\x44\x66\x98" and 0 <= error < 2**32 and 0 <= handle < 2**64
