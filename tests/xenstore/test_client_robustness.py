"""The trio client against a dying xenstored, and the server against bad clients."""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from vdtest.fixtures import XenstoredHandle, XenstoredProcess
from virtio_diskd.ioreq.xenstore import client as client_module
from virtio_diskd.ioreq.xenstore.client import XenstoreClient, XenstoreConnectionLost
from virtio_diskd.ioreq.xenstore.wire import HEADER, Op, XenstoreError, pack


async def test_killing_xenstored_fails_a_pending_request_and_ends_watches(
        xenstored_process: XenstoredProcess) -> None:
    proc = xenstored_process.process
    async with XenstoreClient.open(xenstored_process.path) as xs:
        await xs.write("/a", "1")
        async with xs.watch("/a") as events:
            await events.receive()  # registration event
            os.kill(proc.pid, signal.SIGSTOP)  # the request below now stays pending
            outcome: list[BaseException] = []

            async def pending_read() -> None:
                try:
                    await xs.read("/a")
                except XenstoreConnectionLost as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pending_read)
                await trio.testing.wait_all_tasks_blocked()  # sent, and waiting for a reply
                assert outcome == [] and len(xs._pending) == 1
                started = trio.current_time()
                os.kill(proc.pid, signal.SIGKILL)
                with trio.fail_after(1.0):
                    with pytest.raises(trio.EndOfChannel):
                        await events.receive()
                assert trio.current_time() - started < 1.0
        assert not xs.connected
    assert len(outcome) == 1 and isinstance(outcome[0], XenstoreConnectionLost)


async def test_requests_after_loss_fail_fast_and_a_new_client_reconnects(
        xenstored: XenstoredHandle) -> None:
    async with XenstoreClient.open(xenstored.path) as xs:
        await xs.write("/persist", "yes")
        await xs._stream.aclose()  # simulate the transport going away under the client
        await xs.closed.wait()
        with pytest.raises(XenstoreConnectionLost):
            await xs.read("/persist")
    async with XenstoreClient.open(xenstored.path) as again:
        assert await again.read("/persist") == "yes"


async def test_cancelled_request_does_not_confuse_later_replies(xenstored: XenstoredHandle) -> None:
    async with XenstoreClient.open(xenstored.path) as xs:
        await xs.write("/one", "1")
        await xs.write("/two", "2")
        with trio.move_on_after(0):
            await xs.read("/one")
        assert await xs.read("/two") == "2"
        assert await xs.read("/one") == "1"


async def test_transact_retries_until_every_increment_lands(xenstored: XenstoredHandle) -> None:
    async with XenstoreClient.open(xenstored.path) as xs:
        await xs.write("/count", "0")

        async def worker() -> None:
            for _ in range(10):
                async def body(tx) -> None:  # type: ignore[no-untyped-def]
                    value = int(await tx.read("/count"))
                    await trio.lowlevel.checkpoint()
                    await tx.write("/count", str(value + 1))
                await xs.transact(body)

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(worker)
        assert await xs.read("/count") == "40"


async def _raw(path: str) -> trio.SocketStream:
    return await trio.open_unix_socket(path)


async def _reply(stream: trio.SocketStream) -> tuple[int, int, int, bytes]:
    data = b""
    while len(data) < HEADER.size:
        data += await stream.receive_some(HEADER.size - len(data))
    op, req_id, tx_id, length = HEADER.unpack(data)
    payload = b""
    while len(payload) < length:
        payload += await stream.receive_some(length - len(payload))
    return op, req_id, tx_id, payload


async def test_server_answers_bad_requests_with_errors_and_keeps_others_working(
        xenstored: XenstoredHandle) -> None:
    async with XenstoreClient.open(xenstored.path) as good:
        await good.write("/ok", "1")
        bad = await _raw(xenstored.path)
        cases = [
            (pack(99, 7, 0, b"x\0"), "EINVAL"),  # unknown operation
            (pack(Op.READ, 8, 0, b"bad path!\0"), "EINVAL"),  # invalid characters
            (pack(Op.READ, 9, 0, b"/a\0/b\0"), "EINVAL"),  # too many arguments
            (pack(Op.WRITE, 10, 0, b"/novalue"), "EINVAL"),  # no value separator
            (pack(Op.READ, 11, 12345, b"/ok\0"), "ENOENT"),  # unknown transaction
            (pack(Op.SET_PERMS, 12, 0, b"/ok\0x9\0"), "EINVAL"),  # bad permission
            (pack(Op.READ, 13, 0, b"/\xff\0"), "EINVAL"),  # not ASCII
        ]
        for message, name in cases:
            await bad.send_all(message)
            op, req_id, _tx, payload = await _reply(bad)
            assert op == Op.ERROR and payload == name.encode() + b"\0"
            assert req_id == HEADER.unpack(message[:16])[1]  # request id echoed
        # An oversized header drops that connection only.
        await bad.send_all(struct.pack("=IIII", Op.READ, 14, 0, 5000))
        assert await bad.receive_some(100) == b""
        await bad.aclose()
        assert await good.read("/ok") == "1"


async def test_client_vanishing_mid_transaction_leaves_nothing(xenstored: XenstoredHandle) -> None:
    raw = await _raw(xenstored.path)
    await raw.send_all(pack(Op.TRANSACTION_START, 1, 0, b"\0"))
    _, _, _, payload = await _reply(raw)
    tx_id = int(payload.rstrip(b"\0"))
    await raw.send_all(pack(Op.WRITE, 2, tx_id, b"/half\0done"))
    await _reply(raw)
    await raw.send_all(pack(Op.WRITE, 3, 0, b"/trunc")[:10])  # truncated message, then gone
    await raw.aclose()
    async with XenstoreClient.open(xenstored.path) as xs:
        for _ in range(50):
            if not xenstored.server.store.transactions:
                break
            await trio.sleep(0.01)
        assert xenstored.server.store.transactions == {}
        with pytest.raises(XenstoreError) as info:
            await xs.read("/half")
        assert info.value.errno == errno.ENOENT


def _fill_backlog(path: str) -> tuple[socket.socket, list[socket.socket]]:
    """A listener on ``path`` with backlog 1, as C xenstored's, whose queue is full."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    queued = []
    while True:
        waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        waiting.setblocking(False)
        try:
            waiting.connect(path)
        except BlockingIOError:
            waiting.close()
            return listener, queued
        queued.append(waiting)


async def test_a_full_listen_backlog_is_waited_out_not_taken_for_a_connection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted daemon's processes connect at once; xenstored's backlog is 1.  The
    client must wait for the socket — neither hand back a stream that was never
    connected (trio's connect does) nor go to the kernel's xenbus, which in Dom0
    relays to the same xenstored and blocks uncancellably."""
    path = str(tmp_path / "xs.sock")
    decoy = tmp_path / "xenbus"
    decoy.write_bytes(b"")
    monkeypatch.setattr(client_module, "XENBUS_DEVICE", str(decoy))
    monkeypatch.setattr(client_module, "DEFAULT_SOCKETS", (path,))
    monkeypatch.delenv("XENSTORED_PATH", raising=False)
    listener, queued = _fill_backlog(path)
    accepted: list[socket.socket] = []

    async def xenstored_catches_up() -> None:
        await trio.sleep(0.3)
        for waiting in queued:
            accepted.append(listener.accept()[0])
            waiting.close()
        listener.setblocking(False)
        while True:  # the client's, once it got in
            try:
                accepted.append(listener.accept()[0])
                break
            except BlockingIOError:
                await trio.sleep(0.01)
        accepted[-1].sendall(pack(Op.READ, 1, 0, b"v\0"))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(xenstored_catches_up)
            with trio.fail_after(3):
                stream, where = await XenstoreClient._connect(None)
            assert where == path
            await stream.send_all(b"x")  # connected for real: no ENOTCONN
            assert len(await stream.receive_some(64)) > 0
            await stream.aclose()
    finally:
        for sock in (listener, *queued, *accepted):
            sock.close()


async def test_a_socket_that_stays_busy_is_an_error_not_a_fallback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "xs.sock")
    decoy = tmp_path / "xenbus"
    decoy.write_bytes(b"")
    monkeypatch.setattr(client_module, "XENBUS_DEVICE", str(decoy))
    monkeypatch.setattr(client_module, "DEFAULT_SOCKETS", (path,))
    monkeypatch.setattr(client_module, "BUSY_CONNECT_S", 0.2)
    monkeypatch.delenv("XENSTORED_PATH", raising=False)
    listener, queued = _fill_backlog(path)
    try:
        with pytest.raises(XenstoreConnectionLost, match="Resource temporarily unavailable"):
            await XenstoreClient._connect(None)
    finally:
        for sock in (listener, *queued):
            sock.close()


async def test_with_no_local_xenstored_the_kernel_xenbus_is_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver domain: no socket at all, so the xenbus device."""
    decoy = tmp_path / "xenbus"
    decoy.write_bytes(b"")
    monkeypatch.setattr(client_module, "XENBUS_DEVICE", str(decoy))
    monkeypatch.setattr(client_module, "DEFAULT_SOCKETS", (str(tmp_path / "none.sock"),))
    monkeypatch.delenv("XENSTORED_PATH", raising=False)
    stream, where = await XenstoreClient._connect(None)
    await stream.aclose()
    assert where == str(decoy)


class _OneAtATimeXenstored:
    """The far end of a xenbus-device connection: answers each request after a pause,
    and records how many requests were ever in flight at once."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.most_in_flight = 0
        self.order: list[int] = []

    async def serve(self) -> None:
        buffer = b""
        queued: list[tuple[int, int]] = []
        while True:
            with trio.move_on_after(0.03):  # let pipelined requests pile up, if any come
                while True:
                    data = await self.stream.receive_some(4096)
                    if not data:
                        return
                    buffer += data
                    while len(buffer) >= HEADER.size:
                        op, req_id, _tx, length = HEADER.unpack(buffer[:HEADER.size])
                        if len(buffer) < HEADER.size + length:
                            break
                        buffer = buffer[HEADER.size + length:]
                        queued.append((op, req_id))
                        self.most_in_flight = max(self.most_in_flight, len(queued))
            for op, req_id in queued:
                self.order.append(req_id)
                await self.stream.send_all(pack(op, req_id, 0, b"OK\0"))
            queued.clear()


async def test_on_the_xenbus_device_one_request_is_in_flight_at_a_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux's /dev/xen/xenbus deadlocked a driver domain's xenstore connection with an
    XS_WATCH written while another reply was due (tier, 2026-11-30); libxenstore never
    has two requests in flight on one handle, and neither does this client there —
    not even when a request in flight is cancelled."""
    ours, theirs = socket.socketpair()
    far = _OneAtATimeXenstored(trio.SocketStream(trio.socket.from_stdlib_socket(theirs)))

    async def connect(where: str | None) -> tuple[trio.abc.Stream, str]:
        return trio.SocketStream(trio.socket.from_stdlib_socket(ours)), client_module.XENBUS_DEVICE

    monkeypatch.setattr(XenstoreClient, "_connect", staticmethod(connect))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(far.serve)
        async with XenstoreClient.open("xenbus") as xs:
            assert xs.where == client_module.XENBUS_DEVICE
            with trio.move_on_after(0.01):  # cancelled in flight: its reply still holds the turn
                await xs.read("/cancelled")
            async with trio.open_nursery() as requests:
                for n in range(6):
                    requests.start_soon(xs.read, f"/node{n}")
                requests.start_soon(xs.request, Op.WATCH, b"/w\0tok\0")
        nursery.cancel_scope.cancel()
    assert far.most_in_flight == 1
    assert len(far.order) == 8  # the cancelled read, six reads and the watch


async def test_read_many_is_one_round_trip_on_a_socket_and_one_at_a_time_on_xenbus(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A device's nodes are read pipelined (under TCG each round trip costs
    milliseconds of libxl's 10 s), except on the xenbus device, where requests go one by
    one (the deadlock above)."""
    for where, expected in (("/run/xenstored/socket", 5), ("xenbus", 1)):
        ours, theirs = socket.socketpair()
        far = _OneAtATimeXenstored(trio.SocketStream(trio.socket.from_stdlib_socket(theirs)))
        device = client_module.XENBUS_DEVICE if where == "xenbus" else where

        async def connect(_where: str | None, sock: socket.socket = ours,
                          device: str = device) -> tuple[trio.abc.Stream, str]:
            return trio.SocketStream(trio.socket.from_stdlib_socket(sock)), device

        monkeypatch.setattr(XenstoreClient, "_connect", staticmethod(connect))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(far.serve)
            async with XenstoreClient.open(where) as xs:
                values = await xs.read_many([f"/dev/n{i}" for i in range(5)])
            nursery.cancel_scope.cancel()
        assert values == ["OK\0"] * 5  # what the fake far end answers to anything
        assert far.most_in_flight == expected, where
        assert len(far.order) == 5


async def test_read_many_gives_none_for_missing_nodes_and_raises_other_errors(
        xenstored: XenstoredHandle) -> None:
    async with XenstoreClient.open(xenstored.path) as xs:
        await xs.write("/dev/a", "1")
        await xs.write("/dev/c", "3")

        async def snapshot(tx: client_module.XenstoreOps) -> list[str | None]:
            return await tx.read_many(["/dev/a", "/dev/b", "/dev/c"])

        assert await xs.transact(snapshot) == ["1", None, "3"]
        with pytest.raises(XenstoreError) as raised:
            await xs.read_many(["/dev/a", "relative/but/bad path\0"])
        assert raised.value.errno != errno.ENOENT
        assert await xs.read("/dev/a") == "1"  # the connection carries on
