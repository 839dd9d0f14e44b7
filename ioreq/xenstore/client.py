"""The daemon's xenstore client: trio-native, on pyxs's wire codec and checks.

Why not pyxs's own ``Client``: its router thread dies when the socket drops
and every pending request and ``Monitor.wait()`` then blocks forever.  A
daemon must notice a lost xenstored and recover, so this client keeps pyxs for
what it does well (packet encoding with its size/op checks, path and
permission validation) and does the rest itself:

* one reader task routes replies by request id and watch events by token;
* when the connection drops, every pending request raises
  :class:`XenstoreConnectionLost` and every watch channel ends
  (``trio.EndOfChannel``), so the owner can reconnect;
* every call is cancellable: a late reply to a cancelled request is dropped;
* :meth:`XenstoreClient.transact` retries on EAGAIN with randomised back-off
  (without it, concurrent writers live-lock).

pyxs's private ``_internal`` module is touched here only, and pinned in
``pyproject.toml``.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import math
import os
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import trio
from pyxs import helpers as pyxs_helpers
from pyxs._internal import Op as PyxsOp
from pyxs._internal import Packet as PyxsPacket
from pyxs.exceptions import InvalidPath, InvalidPermission

from virtio_diskd.backend.errors import VirtioDiskdError
from virtio_diskd.ioreq.xenstore.wire import (
    ERROR_CODES,
    HEADER,
    PAYLOAD_MAX,
    Header,
    Op,
    XenstoreError,
    pack,
    split_strings,
)

T = TypeVar("T")

#: Where xenstored listens when $XENSTORED_PATH does not say: Debian's xenstored uses
#: /var/run/xenstored/socket, which is /run/... on systems where /var/run links there.
DEFAULT_SOCKETS = ("/run/xenstored/socket", "/var/run/xenstored/socket")
XENBUS_DEVICE = "/dev/xen/xenbus"


class XenstoreConnectionLost(VirtioDiskdError, ConnectionError):
    """xenstored went away; pending requests fail with this and watches end."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One WATCH_EVENT: the path that changed and the watch's token."""

    path: str
    token: str


def _encode(op: int, payload: bytes, req_id: int, tx_id: int) -> bytes:
    """Encode through pyxs's Packet where it knows the op (it checks size and op)."""
    if op in PyxsOp and op != PyxsOp.RESTRICT:
        packet = PyxsPacket(op, payload, req_id, tx_id)
        header: bytes = PyxsPacket._struct.pack(packet.op, packet.rq_id, packet.tx_id, packet.size)
        return header + payload
    return pack(op, req_id, tx_id, payload)


def _path(path: str, *, watch: bool = False) -> bytes:
    raw = path.encode("ascii", "strict") if path.isascii() else b"\xff"
    try:
        if watch and raw.startswith(b"@"):
            pyxs_helpers.check_watch_path(raw)
        else:
            pyxs_helpers.check_path(raw)
    except InvalidPath:
        raise XenstoreError(errno.EINVAL, f"invalid xenstore path {path!r}") from None
    # pyxs never applies the relative-path limit (its check is a no-op); we do.
    if not raw.startswith((b"/", b"@")) and len(raw) > 2048:
        raise XenstoreError(errno.EINVAL, f"relative path too long: {path!r}")
    return raw


def _value(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class _Pending:
    """A one-shot slot for the reply to one request."""

    __slots__ = ("error", "event", "reply")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: tuple[int, bytes] | None = None
        self.error: BaseException | None = None


def _text(value: bytes) -> str:
    """A node's value as text; bytes that are not UTF-8 survive as surrogates."""
    return value.decode("utf-8", "surrogateescape")


def _outcome(pending: _Pending) -> bytes | XenstoreError:
    """An answered request's payload, or its XS_ERROR as an exception to raise or keep;
    :class:`XenstoreConnectionLost` is raised when the connection went first."""
    if pending.error is not None:
        raise XenstoreConnectionLost(str(pending.error))
    assert pending.reply is not None
    reply_op, reply = pending.reply
    if reply_op == Op.ERROR:
        name = reply.rstrip(b"\0").decode("ascii", "replace")
        return XenstoreError(ERROR_CODES.get(name, errno.EIO), name)
    return reply


#: how long a connect may find xenstored's listen backlog full before it gives up.
#: C xenstored listens with a backlog of 1 and accepts one connection per turn of
#: its loop, so a daemon whose processes all connect at once (a restart) finds it
#: full; a blocking connect, as libxenstore's, would wait, and so does this.
BUSY_CONNECT_S = 5.0


async def _open_socket(path: str) -> trio.SocketStream:
    """Connect to a Unix socket, waiting out a full listen backlog.

    Not ``trio.open_unix_socket``: it takes the EAGAIN of a full backlog for a
    connect in progress and returns a stream that was never connected (its first
    send fails with ENOTCONN)."""
    deadline = trio.current_time() + BUSY_CONNECT_S
    delay = 0.005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(path)  # a Unix socket connects at once, or not at all
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EAGAIN or trio.current_time() + delay > deadline:
                raise
        else:
            return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        await trio.sleep(delay)
        delay = min(delay * 2, 0.1)


def drain(channel: trio.MemoryReceiveChannel[WatchEvent]) -> int:
    """Discard the events already queued on a watch channel; returns how many.

    Watch users that rescan on any change call this first, so one rescan covers a
    burst of writes (libxl writes some thirty nodes per device).
    """
    count = 0
    while True:
        try:
            channel.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return count
        count += 1


class XenstoreOps:
    """Node operations, inside a transaction (``tx_id`` ≠ 0) or outside it."""

    def __init__(self, client: XenstoreClient, tx_id: int) -> None:
        self._client = client
        self.tx_id = tx_id

    async def read_bytes(self, path: str) -> bytes:
        return await self._client.request(Op.READ, _path(path) + b"\0", self.tx_id)

    async def read(self, path: str) -> str:
        """Read a node as text; bytes that are not UTF-8 survive as surrogates."""
        return _text(await self.read_bytes(path))

    async def read_or_none(self, path: str) -> str | None:
        try:
            return await self.read(path)
        except XenstoreError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    async def read_many(self, paths: list[str]) -> list[str | None]:
        """Read several nodes in one round trip (pipelined: see
        :meth:`XenstoreClient.request_many`); None for a node that does not exist."""
        replies = await self._client.request_many(
            [(Op.READ, _path(path) + b"\0") for path in paths], self.tx_id)
        values: list[str | None] = []
        for reply in replies:
            if isinstance(reply, XenstoreError):
                if reply.errno != errno.ENOENT:
                    raise reply
                values.append(None)
            else:
                values.append(_text(reply))
        return values

    async def exists(self, path: str) -> bool:
        try:
            await self.read_bytes(path)
        except XenstoreError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    async def write(self, path: str, value: str | bytes) -> None:
        await self._client.request(Op.WRITE, _path(path) + b"\0" + _value(value), self.tx_id)

    async def mkdir(self, path: str) -> None:
        await self._client.request(Op.MKDIR, _path(path) + b"\0", self.tx_id)

    async def rm(self, path: str) -> None:
        await self._client.request(Op.RM, _path(path) + b"\0", self.tx_id)

    async def directory(self, path: str) -> list[str]:
        """List children; falls back to DIRECTORY_PART when the list exceeds 4 KiB."""
        raw = _path(path)
        try:
            reply = await self._client.request(Op.DIRECTORY, raw + b"\0", self.tx_id)
        except XenstoreError as exc:
            if exc.errno != errno.E2BIG:
                raise
            return await self._directory_in_parts(raw)
        return [name.decode("ascii", "replace") for name in split_strings(reply)]

    async def _directory_in_parts(self, raw: bytes) -> list[str]:
        for _attempt in range(16):
            names: list[bytes] = []
            offset, generation = 0, None
            while True:
                reply = await self._client.request(
                    Op.DIRECTORY_PART, raw + b"\0" + str(offset).encode() + b"\0", self.tx_id)
                gen, _, rest = reply.partition(b"\0")
                if generation is None:
                    generation = gen
                elif gen != generation:
                    break  # the directory changed between parts: start again
                complete = rest.endswith(b"\0\0") or rest == b"\0"
                body = rest[:-1] if complete else rest
                parts = split_strings(body)
                names.extend(parts)
                offset += len(body)
                if complete:
                    return [n.decode("ascii", "replace") for n in names]
                if not parts:
                    raise XenstoreError(errno.EIO, "DIRECTORY_PART made no progress")
        raise XenstoreError(errno.EAGAIN, "directory kept changing while listed in parts")

    async def get_perms(self, path: str) -> list[str]:
        reply = await self._client.request(Op.GET_PERMS, _path(path) + b"\0", self.tx_id)
        return [p.decode("ascii") for p in split_strings(reply)]

    async def set_perms(self, path: str, perms: list[str]) -> None:
        raw = [p.encode("ascii") for p in perms]
        try:
            pyxs_helpers.check_perms(raw)
        except InvalidPermission:
            raise XenstoreError(errno.EINVAL, f"invalid permissions {perms!r}") from None
        payload = _path(path) + b"\0" + b"".join(p + b"\0" for p in raw)
        await self._client.request(Op.SET_PERMS, payload, self.tx_id)


class XenstoreClient(XenstoreOps):
    """A connection to xenstored, used from trio tasks.

    Open it with :meth:`open` (an async context manager that owns the reader
    task).  Requests may be issued concurrently from many tasks.

    **Cancellation:** cancelling a request abandons it; its reply is dropped
    when it arrives.  Leaving :meth:`transaction` by an exception or a
    cancellation aborts the transaction (a shielded TRANSACTION_END F bounded
    to one second).  Leaving :meth:`watch` unregisters the watch.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__(self, 0)
        self._stream = stream
        self._send_lock = trio.Lock()
        self._req_ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._watches: dict[bytes, trio.MemorySendChannel[WatchEvent]] = {}
        self._tokens = itertools.count(1)
        self._lost: BaseException | None = None
        self.closed = trio.Event()
        #: the socket path or xenbus device this client is connected through
        self.where = ""
        #: on the xenbus device, the one request in flight (its id), and the event that
        #: says there is none; None on a socket, where requests are pipelined
        self._in_flight: int | None = None
        self._turn_free: trio.Event | None = None

    # -- lifecycle ------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(cls, where: str | None = None) -> AsyncIterator[XenstoreClient]:
        """Connect to xenstored.

        ``where`` is a Unix socket path, or ``"xenbus"`` for the kernel's
        ``/dev/xen/xenbus`` device (a driver domain without a local xenstored).
        By default ``$XENSTORED_PATH``, then ``/run/xenstored/socket``.
        """
        stream, reached = await cls._connect(where)
        client = cls(stream)
        client.where = reached
        if reached == XENBUS_DEVICE:
            client._turn_free = trio.Event()
            client._turn_free.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._reader)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
                client._fail(XenstoreConnectionLost("client closed"))
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    @staticmethod
    async def _connect(where: str | None) -> tuple[trio.abc.Stream, str]:
        """The stream, and where it leads (a socket path, or the xenbus device)."""
        if where in ("xenbus", XENBUS_DEVICE):
            try:
                fd = os.open(XENBUS_DEVICE, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise XenstoreConnectionLost(f"cannot open {XENBUS_DEVICE}: {exc}") from exc
            return trio.lowlevel.FdStream(fd), XENBUS_DEVICE
        explicit = where or os.environ.get("XENSTORED_PATH")
        candidates = [explicit] if explicit else list(DEFAULT_SOCKETS)
        errors = []
        socket_present = False
        for path in candidates:
            try:
                return await _open_socket(path), path
            except OSError as exc:
                errors.append(f"{path}: {exc.strerror}")
                socket_present = socket_present or exc.errno != errno.ENOENT
        if not explicit and not socket_present and os.path.exists(XENBUS_DEVICE):
            # no local xenstored (a driver domain): the kernel's xenbus.  Unlike
            # libxenstore, not when a socket is there but busy or refusing: that is
            # Dom0's xenstored, and Dom0's kernel would relay to the same one (a
            # process blocked in the kernel's xenbus cannot be cancelled or killed).
            return await XenstoreClient._connect("xenbus")
        raise XenstoreConnectionLost("cannot connect to xenstored (" + "; ".join(errors) + ")")

    @property
    def connected(self) -> bool:
        return self._lost is None

    def _fail(self, exc: BaseException) -> None:
        if self._lost is None:
            self._lost = exc
        for pending in self._pending.values():
            pending.error = self._lost
            pending.event.set()
        self._pending.clear()
        for channel in self._watches.values():
            channel.close()
        self._watches.clear()
        if self._turn_free is not None:
            self._turn_free.set()  # whoever waits for a turn finds the connection lost
        self.closed.set()

    async def _reader(self) -> None:
        buffer = bytearray()
        try:
            while True:
                data = await self._stream.receive_some(65536)
                if not data:
                    raise XenstoreConnectionLost("xenstored closed the connection")
                buffer += data
                while len(buffer) >= HEADER.size:
                    header = Header.unpack(bytes(buffer[: HEADER.size]))
                    if header.length > PAYLOAD_MAX:
                        raise XenstoreConnectionLost(
                            f"xenstored sent a {header.length}-byte payload")
                    end = HEADER.size + header.length
                    if len(buffer) < end:
                        break
                    payload = bytes(buffer[HEADER.size : end])
                    del buffer[:end]
                    self._route(header, payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            lost = exc if isinstance(exc, XenstoreConnectionLost) else XenstoreConnectionLost(
                f"xenstore connection lost: {exc}")
            self._fail(lost)

    def _route(self, header: Header, payload: bytes) -> None:
        if header.op == Op.WATCH_EVENT:
            parts = split_strings(payload)
            if len(parts) >= 2:
                channel = self._watches.get(parts[1])
                if channel is not None:
                    event = WatchEvent(parts[0].decode("ascii", "replace"),
                                       parts[1].decode("ascii", "replace"))
                    channel.send_nowait(event)  # unbounded buffer: never blocks the reader
            return
        if self._in_flight == header.req_id and self._turn_free is not None:
            self._in_flight = None  # the next request may go (even if this one was cancelled)
            self._turn_free.set()
        pending = self._pending.pop(header.req_id, None)
        if pending is None:
            return  # reply to a cancelled request
        pending.reply = (header.op, payload)
        pending.event.set()

    # -- requests ---------------------------------------------------------------

    async def request(self, op: int, payload: bytes, tx_id: int = 0) -> bytes:
        """Send one request and return its reply payload.

        Raises :class:`XenstoreError` for an XS_ERROR reply and
        :class:`XenstoreConnectionLost` when the connection is gone.
        """
        if self._lost is not None:
            raise XenstoreConnectionLost(str(self._lost))
        req_id = next(self._req_ids) & 0xFFFFFFFF
        message = _encode(op, payload, req_id, tx_id)
        pending = _Pending()
        if self._turn_free is not None:
            await self._wait_for_turn()
            self._in_flight = req_id  # claimed with no checkpoint since it was seen free
            self._turn_free = trio.Event()
        self._pending[req_id] = pending
        sent = False
        try:
            async with self._send_lock:
                await self._stream.send_all(message)
            sent = True
            await pending.event.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(XenstoreConnectionLost(f"xenstore connection lost: {exc}"))
            raise XenstoreConnectionLost(str(self._lost)) from exc
        finally:
            self._pending.pop(req_id, None)
            if not sent and self._in_flight == req_id and self._turn_free is not None:
                self._in_flight = None  # never went out: no reply will free the turn
                self._turn_free.set()
        outcome = _outcome(pending)
        if isinstance(outcome, XenstoreError):
            raise outcome
        return outcome

    async def request_many(self, requests: list[tuple[int, bytes]],
                           tx_id: int = 0) -> list[bytes | XenstoreError]:
        """Several requests pipelined: written in one ``send_all``, their replies
        collected as they come (xenstored answers a connection's requests in order).
        A device's dozen-odd nodes cost one round trip instead of one each — the
        backend's way to InitWait inside libxl's 10 s, where each round trip under TCG
        is milliseconds.  Each item is its reply payload or its :class:`XenstoreError`;
        a lost connection raises :class:`XenstoreConnectionLost` for all.  On the xenbus
        device requests go one at a time (:meth:`_wait_for_turn`)."""
        if self._turn_free is not None or len(requests) < 2:
            results: list[bytes | XenstoreError] = []
            for op, payload in requests:
                try:
                    results.append(await self.request(op, payload, tx_id))
                except XenstoreError as exc:
                    results.append(exc)
            return results
        if self._lost is not None:
            raise XenstoreConnectionLost(str(self._lost))
        pendings: list[tuple[int, _Pending]] = []
        message = bytearray()
        for op, payload in requests:
            req_id = next(self._req_ids) & 0xFFFFFFFF
            message += _encode(op, payload, req_id, tx_id)
            pending = _Pending()
            self._pending[req_id] = pending
            pendings.append((req_id, pending))
        try:
            async with self._send_lock:
                await self._stream.send_all(message)
            for _req_id, pending in pendings:
                await pending.event.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(XenstoreConnectionLost(f"xenstore connection lost: {exc}"))
            raise XenstoreConnectionLost(str(self._lost)) from exc
        finally:
            for req_id, _pending in pendings:
                self._pending.pop(req_id, None)
        return [_outcome(pending) for _req_id, pending in pendings]

    async def _wait_for_turn(self) -> None:
        """On the xenbus device, one request at a time, as libxenstore does.

        Linux's ``/dev/xen/xenbus`` handles XS_WATCH inside ``write()``, waiting for
        xenstored's answer there; with another request's reply due on the same file,
        a driver domain's kernel was seen to deadlock (its ``xenbus`` thread blocked
        in ``xenbus_dev_queue_reply``, the writer in ``register_xenbus_watch``), and
        its whole xenstore connection with it.  A request cancelled while in flight
        keeps the turn until its reply comes (or the connection is lost)."""
        while self._turn_free is not None and not self._turn_free.is_set():
            await self._turn_free.wait()
        if self._lost is not None:
            raise XenstoreConnectionLost(str(self._lost))

    # -- transactions -----------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[XenstoreOps]:
        """Run a block in one transaction; commits on success.

        Raises ``XenstoreError(EAGAIN)`` from the commit when another writer
        got in first; use :meth:`transact` to retry automatically.
        """
        reply = await self.request(Op.TRANSACTION_START, b"\0")
        tx_id = int(reply.rstrip(b"\0") or b"0")
        if tx_id == 0:
            raise XenstoreError(errno.EIO, "xenstored returned transaction id 0")
        try:
            yield XenstoreOps(self, tx_id)
        except BaseException:
            with trio.move_on_after(1.0, shield=True), contextlib.suppress(
                    XenstoreError, XenstoreConnectionLost):
                await self.request(Op.TRANSACTION_END, b"F\0", tx_id)
            raise
        await self.request(Op.TRANSACTION_END, b"T\0", tx_id)

    async def transact(self, body: Callable[[XenstoreOps], Awaitable[T]], *,
                       attempts: int = 64) -> T:
        """Run ``body`` in a transaction, retrying on EAGAIN with jittered back-off."""
        delay = 0.001
        for attempt in range(attempts):
            try:
                async with self.transaction() as tx:
                    result = await body(tx)
            except XenstoreError as exc:
                if exc.errno != errno.EAGAIN or attempt == attempts - 1:
                    raise
                await trio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 0.1)
                continue
            return result
        raise AssertionError("unreachable")

    # -- watches -------------------------------------------------------------------

    @asynccontextmanager
    async def watch(self, path: str, token: str | None = None,
                    ) -> AsyncIterator[trio.MemoryReceiveChannel[WatchEvent]]:
        """Watch ``path``; yields a channel of :class:`WatchEvent`.

        The first event arrives at once (xenstored fires on registration).  The
        channel ends (``EndOfChannel``) if the connection is lost.
        """
        token_text = token or f"virtio-diskd-{next(self._tokens)}"
        raw_token = token_text.encode("ascii")
        if raw_token in self._watches:
            raise XenstoreError(errno.EEXIST, f"token {token_text!r} is in use")
        send, receive = trio.open_memory_channel[WatchEvent](math.inf)
        self._watches[raw_token] = send
        try:
            await self.request(Op.WATCH, _path(path, watch=True) + b"\0" + raw_token + b"\0")
        except BaseException:
            self._watches.pop(raw_token, None)
            raise
        try:
            yield receive
        finally:
            self._watches.pop(raw_token, None)
            send.close()
            if self.connected:
                with trio.move_on_after(1.0, shield=True), contextlib.suppress(
                        XenstoreError, XenstoreConnectionLost):
                    await self.request(
                        Op.UNWATCH, _path(path, watch=True) + b"\0" + raw_token + b"\0")

    async def reset_watches(self) -> None:
        await self.request(Op.RESET_WATCHES, b"")

    # -- domains ---------------------------------------------------------------------

    async def get_domain_path(self, domid: int) -> str:
        reply = await self.request(Op.GET_DOMAIN_PATH, f"{domid}\0".encode())
        return reply.rstrip(b"\0").decode("ascii")

    async def introduce_domain(self, domid: int, mfn: int = 0, port: int = 0) -> None:
        await self.request(Op.INTRODUCE, f"{domid}\0{mfn}\0{port}\0".encode())

    async def release_domain(self, domid: int) -> None:
        await self.request(Op.RELEASE, f"{domid}\0".encode())

    async def set_target(self, domid: int, target: int) -> None:
        """``xs_set_target``: ``domid`` gets ``target``'s rights on its nodes (the
        device-model relation for a driver domain); needs a privileged connection, and
        fails until ``target`` is introduced."""
        await self.request(Op.SET_TARGET, f"{domid}\0{target}\0".encode())

    async def is_domain_introduced(self, domid: int) -> bool:
        reply = await self.request(Op.IS_DOMAIN_INTRODUCED, f"{domid}\0".encode())
        return reply.rstrip(b"\0") == b"T"
