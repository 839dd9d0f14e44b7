"""The NBD engine: block requests executed by an NBD server, straight from and into
guest memory.

It offers what :class:`~virtio_diskd.backend.disk.engine.DiskEngine` offers (submit,
an eventfd, batches of completions), so a device does not know whether its disk is
a local file or an export: a qcow2 or VHD image served by ``qemu-storage-daemon``,
or network storage (``nbd://``, a Ceph or SAN gateway).

Zero-copy both ways: a write's header and the guest's buffers leave in one
``sendmsg``; a read's payload is received with ``recvmsg_into`` into the guest's
buffers.  A sender thread takes every queued request at once (one ``sendmsg`` per
batch); a receiver thread per connection matches replies to requests by handle
and posts completions in batches through the eventfd.  Many requests are in
flight at once, as the guest's queue depth asks.

Durability and ordering, as the protocol and virtio-blk require:

* a FLUSH is sent only once every write submitted before it has its reply (the
  protocol's flush covers only writes the server has completed);
* a writethrough write (``durable``) carries ``NBD_CMD_FLAG_FUA``, or, where the
  export has no FUA, is followed by a FLUSH before it completes;
* a write completes only when its reply says so.

A dropped connection (the server died or restarted, the network failed) is not
the end: its requests are sent again over a new connection, tried with back-off.
Requests wait up to ``reconnect_wait`` seconds from the loss; after that they
fail with IOERR at once until a connection is back (QEMU's reconnect-delay).
Writes the old connection acknowledged but no FLUSH covered may be lost with
the server's cache, so the next FLUSH fails with IOERR — a
guest's ``fsync`` then reports the loss instead of a success that is not one (as
Linux reports writeback errors).  An error reply fails that request alone,
except a failed *read*, after which the stream is ambiguous without structured
replies: that read fails and the connection is replaced.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import structlog

from virtio_diskd.backend.disk import nbd_protocol as proto
from virtio_diskd.backend.disk.engine_api import clear_signal, take_from
from virtio_diskd.backend.disk.flush_order import FlushOrder
from virtio_diskd.backend.disk.iovec import advance, copy, first
from virtio_diskd.backend.disk.nbd_uri import NbdAddress
from virtio_diskd.backend.disk.request import DiskRequest, IoKind, IoStatus
from virtio_diskd.backend.disk.target import SECTOR, DiskInfo
from virtio_diskd.backend.errors import VirtioDiskdError

log = structlog.get_logger("virtio_diskd.nbd")

RequestT = TypeVar("RequestT", bound=DiskRequest)

#: How long a request waits for a lost connection to come back before it fails.
RECONNECT_WAIT = 5.0
#: Back-off between connection attempts (doubling up to the second figure).
RECONNECT_BACKOFF = (0.05, 1.0)
CONNECT_TIMEOUT = 5.0
#: While an outage fails requests, one log line says how many per this many seconds.
FAILURE_LOG_INTERVAL = 5.0
#: Connections a request may lose before it fails: a server that drops every
#: connection it is given (or breaks the protocol at once) must not loop forever.
MAX_SENDS = 4
#: What the receiver reads replies into (payloads beyond it go straight to the guest).
RECEIVE_BUFFER = 128 << 10
#: Pieces sent in one ``sendmsg`` at most (the kernel takes up to IOV_MAX buffers).
IOV_MAX = 1024
_STOP = object()
_WAKE = object()


class NbdUnavailable(VirtioDiskdError, ConnectionError):
    """The export cannot be reached or refused us; the reason is for operators."""


def connect(address: NbdAddress, timeout: float = CONNECT_TIMEOUT
            ) -> tuple[socket.socket, proto.ExportInfo]:
    """A connection in the transmission phase, and what the handshake learnt."""
    try:
        if address.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(timeout)
            sock.connect(address.socket_path)
        else:
            assert address.host is not None
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        raise NbdUnavailable(f"{address.describe()}: {exc.strerror or exc}") from exc
    try:
        steps = proto.handshake(address.export)
        send, want = next(steps)
        while True:
            if send:
                sock.sendall(send)
            data = _recv_bytes(sock, want)
            send, want = steps.send(data)
    except StopIteration as done:
        info: proto.ExportInfo = done.value
        sock.settimeout(None)
        return sock, info
    except (OSError, proto.NbdProtocolError) as exc:
        sock.close()
        raise NbdUnavailable(f"{address.describe()}: handshake failed: {exc}") from exc


def _recv_bytes(sock: socket.socket, count: int) -> bytes:
    data = bytearray(count)
    _recv_into(sock, [memoryview(data)], count)
    return bytes(data)


def _recv_into(sock: socket.socket, buffers: list[memoryview], count: int) -> None:
    """Fill ``buffers`` (``count`` bytes in all) from the socket; EOF is an error."""
    while count:
        got = sock.recvmsg_into(buffers)[0]
        if got == 0:
            raise ConnectionResetError(errno.ECONNRESET, "the server closed the connection")
        count -= got
        if count:
            buffers = advance(buffers, got)


def _split(buffers: list[memoryview], sizes: list[int]) -> list[list[memoryview]]:
    """``buffers`` cut into consecutive pieces of ``sizes`` bytes."""
    pieces = []
    for size in sizes:
        pieces.append(first(buffers, size))
        buffers = advance(buffers, size)
    return pieces


class NbdTarget:
    """An export as the device model sees it (what :class:`DiskTarget` is for a file).

    ``format_name`` and ``discard_honoured`` are the storage layer's: an export
    advertises TRIM even where the format underneath frees nothing (QEMU's VHD),
    and the guest is offered discard only where it really frees space.
    """

    is_block = False
    direct = False
    fd = -1

    def __init__(self, address: NbdAddress, export: proto.ExportInfo, *, read_only: bool,
                 display: str, format_name: str = "raw", discard_honoured: bool = True) -> None:
        self.address = address
        self.export = export
        self.path = self.real_path = display
        self.read_only = read_only or export.read_only
        self.format_name = format_name
        self.discard_honoured = discard_honoured
        self.size = export.size // SECTOR * SECTOR
        self.logical_block_size = max(SECTOR, export.min_block)
        self.physical_block_size = max(self.logical_block_size, export.preferred_block)

    def info(self, *, discard_enable: bool = True) -> DiskInfo:
        export = self.export
        return DiskInfo(
            capacity_bytes=self.size,
            logical_block_size=self.logical_block_size,
            physical_block_size=self.physical_block_size,
            read_only=self.read_only,
            can_discard=(export.can_trim and self.discard_honoured and discard_enable),
            can_write_zeroes=export.can_write_zeroes,
            write_zeroes_may_unmap=export.can_write_zeroes and self.discard_honoured,
        )

    def close(self) -> None:
        """Nothing to release: the engine owns the connection."""


class _Job:
    """One request on its way: its pieces still out, its first error, its deadline."""

    __slots__ = ("deadline", "epoch", "error", "flush_after", "remaining", "request",
                 "sends", "stable")

    def __init__(self, request: DiskRequest) -> None:
        self.request = request
        self.remaining = 0
        self.error = 0
        self.deadline = 0.0  # set once the job waits for a connection
        self.flush_after = False  # writethrough without FUA: a FLUSH completes it
        self.epoch = 0  # a FLUSH: the writes acknowledged when it was sent
        self.stable = False  # a FUA write: acknowledged means on stable storage
        self.sends = 0  # connections its commands went out on


class _Piece:
    """One NBD command (a large request is sent as several)."""

    __slots__ = ("buffers", "command", "flags", "job", "length", "offset", "reply", "sent")

    def __init__(self, job: _Job, command: int, offset: int, length: int,
                 buffers: list[memoryview], flags: int = 0) -> None:
        self.job, self.command, self.offset, self.length = job, command, offset, length
        self.buffers, self.flags = buffers, flags
        #: a write completes once both are in: its reply, and sendmsg letting go of
        #: its buffers (a reply can come first, and the device unmaps at completion)
        self.sent = False
        self.reply: int | None = None


class _NbdConnection:
    def __init__(self, sock: socket.socket, export: proto.ExportInfo) -> None:
        self.sock = sock
        self.export = export
        self.pending: dict[int, _Piece] = {}
        self.dead = False
        self.receiver: threading.Thread | None = None


class NbdEngine(Generic[RequestT]):
    """Executes :class:`DiskRequest` objects on an NBD export (see the module docstring)."""

    def __init__(self, target: NbdTarget, sock: socket.socket, *, name: str = "",
                 reconnect_wait: float = RECONNECT_WAIT,
                 on_close: Callable[[], None] | None = None,
                 revive: Callable[[], None] | None = None,
                 writes_at_risk: bool = False) -> None:
        self.target = target
        self.name = name or target.path
        self.reconnect_wait = reconnect_wait
        self._on_close = on_close
        #: called before each attempt to reconnect: the storage layer restarts the
        #: image's qemu-storage-daemon there if it died
        self._revive = revive
        self.completion_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._done: collections.deque[RequestT] = collections.deque()
        self._in_flight = 0
        self._flushes: FlushOrder[_Job] = FlushOrder()
        self._next_handle = 1
        self._write_epoch = 0  # writes acknowledged so far
        self._flushed_epoch = 0  # of those, covered by a completed FLUSH
        #: acknowledged, unflushed, on a connection now lost (or, ``writes_at_risk``,
        #: by a server that died with a predecessor process): the next FLUSH fails
        self._writes_at_risk = writes_at_risk
        self._closed = False
        self._delay = RECONNECT_BACKOFF[0]  # before the next connection attempt
        self._last_attempt = 0.0
        self._outage_since: float | None = None  # when the connection was lost
        self._unlogged_failures = 0
        self._failures_logged_at = -FAILURE_LOG_INTERVAL
        self._private: dict[int, threading.Event] = {}  # sync()'s own flushes
        self._unsignalled = False  # the receiver finished requests not yet signalled
        self.connects = 1
        self.disconnects = 0
        self._conn: _NbdConnection | None = None
        self._adopt(_NbdConnection(sock, target.export))
        self._sender_thread = threading.Thread(target=self._sender, daemon=True,
                                               name=f"vd-nbd-{self.name}-tx")
        self._sender_thread.start()

    # -- submission (caller's thread) --------------------------------------------------

    def submit(self, requests: list[RequestT]) -> list[RequestT]:
        """Start ``requests``; returns those already finished (nothing to send)."""
        finished: list[RequestT] = []
        export = self.target.export
        with self._lock:
            for request in requests:
                job = _Job(request)
                kind = request.kind
                if kind == IoKind.FLUSH and not export.can_flush:
                    request.status = IoStatus.OK  # no volatile cache: acknowledged is stable
                    finished.append(request)
                    continue
                # the protocol forbids a command the export did not offer (the device
                # offers none of them then, but the guest's request is not trusted)
                if not (kind in (IoKind.READ, IoKind.WRITE, IoKind.FLUSH)
                        or (kind == IoKind.DISCARD and export.can_trim)
                        or (kind == IoKind.WRITE_ZEROES and export.can_write_zeroes)):
                    request.status = IoStatus.UNSUPPORTED
                    finished.append(request)
                    continue
                if kind not in (IoKind.READ, IoKind.FLUSH) and export.read_only:
                    request.status = IoStatus.IO_ERROR
                    finished.append(request)
                    continue
                self._in_flight += 1
                if kind == IoKind.FLUSH:
                    if not self._flushes.may_go(job):
                        continue
                elif kind != IoKind.READ:
                    self._flushes.write_started(request)
                self._queue.put(job)
        return finished

    def take_completions(self, limit: int = 0) -> list[RequestT]:
        clear_signal(self.completion_fd)
        return take_from(self._done, limit)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def has_completions(self) -> bool:
        return bool(self._done)

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.dead

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def check_resize(self) -> int | None:
        """The export's size if a new connection found it changed, else None."""
        size = self.target.export.size // SECTOR * SECTOR
        if size == self.target.size:
            return None
        self.target.size = size
        return size

    #: Acknowledged writes may live in the server's memory (QEMU's qcow2 metadata
    #: cache): a device handing over to a successor flushes first (a restart may
    #: take the server with it).
    sync_before_detach = True

    def sync(self) -> None:
        """Make every acknowledged write stable (an operator's pause, a hand-over): a
        FLUSH of our own, waited for; its completion is not handed to the device."""
        if not self.target.export.can_flush:
            return
        request = DiskRequest(IoKind.FLUSH)
        done = threading.Event()
        job = _Job(request)
        with self._lock:
            self._private[id(request)] = done
            self._in_flight += 1
            if self._flushes.may_go(job):
                self._queue.put(job)
        done.wait()
        with self._lock:
            self._private.pop(id(request), None)
        if request.status != IoStatus.OK:
            raise OSError(errno.EIO, "the NBD server failed the flush")

    def close(self, *, detach: bool = False) -> None:
        """Stop: requests still queued fail, the server is told goodbye; it is stopped
        too (``on_close``) unless a successor process carries on with it (``detach``)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._sender_thread.join()
        conn = self._conn
        if conn is not None and not conn.dead:
            with contextlib.suppress(OSError):
                conn.sock.sendall(proto.disconnect())
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        if conn is not None and conn.receiver is not None:
            conn.receiver.join(5.0)
        if conn is not None:
            conn.sock.close()
            with self._lock:
                left = list(conn.pending.values())
                conn.pending.clear()
            for piece in left:
                self._piece_done(piece, errno.EIO, quiet=True)
        os.close(self.completion_fd)
        if self._on_close is not None and not detach:
            self._on_close()

    # -- connection ---------------------------------------------------------------------

    def _adopt(self, conn: _NbdConnection) -> None:
        self._conn = conn
        self.target.export = conn.export
        receiver = threading.Thread(target=self._receiver, args=(conn,), daemon=True,
                                    name=f"vd-nbd-{self.name}-rx")
        conn.receiver = receiver
        receiver.start()

    def _lost(self, conn: _NbdConnection, reason: str) -> None:
        """The connection broke: its unanswered pieces go back to the sender.  Called
        by both threads, maybe both for one loss; pieces the sender registered after
        the first call are collected by its own."""
        with self._lock:
            first = not conn.dead
            conn.dead = True
            again = list(conn.pending.values())
            conn.pending.clear()
            if first and self._write_epoch > self._flushed_epoch:
                self._writes_at_risk = True
        if first:
            self.disconnects += 1
            self._outage_since = time.monotonic()
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        if self._closed:
            for piece in again:
                self._piece_done(piece, errno.EIO, quiet=True)
            return
        if first:
            log.warning("nbd.disconnected", device=self.name, reason=reason,
                        requests_again=len(again), export=self.target.address.describe())
        given_up = 0
        for piece in again:
            if piece.job.sends >= MAX_SENDS:
                given_up += 1
                self._piece_done(piece, errno.EIO, quiet=True)
            else:
                self._queue.put(piece)
        if given_up:
            log.error("nbd.requests_failed", device=self.name, count=given_up,
                      reason=f"lost with {MAX_SENDS} connections in a row")
        self._queue.put(_WAKE)

    def _reconnect(self) -> bool:
        """One attempt; True once a new connection is in use."""
        if self._revive is not None:
            try:
                self._revive()
            except Exception as exc:  # a failed restart is one failed attempt
                log.error("nbd.revive_failed", device=self.name,  # noqa: TRY400
                          error=str(exc))
                return False
        try:
            sock, export = connect(self.target.address)
        except NbdUnavailable as exc:
            log.debug("nbd.reconnect_failed", device=self.name, error=str(exc))
            return False
        if export.read_only and not self.target.read_only:
            log.error("nbd.export_now_read_only", device=self.name)
        old = self._conn
        if old is not None:
            with contextlib.suppress(OSError):
                old.sock.close()
        self.connects += 1
        self._outage_since = None
        self._adopt(_NbdConnection(sock, export))
        log.info("nbd.reconnected", device=self.name, size=export.size,
                 export=self.target.address.describe())
        return True

    # -- the sender thread --------------------------------------------------------------

    def _sender(self) -> None:
        waiting: list[_Job | _Piece] = []
        while True:
            if waiting or not self.connected:  # keep trying, requests or not: the
                try:  # device is ready again as soon as the server is
                    item = self._queue.get(timeout=self._delay)
                except queue.Empty:
                    item = _WAKE
            else:
                item = self._queue.get()
            batch = [item]
            with contextlib.suppress(queue.Empty):
                while len(batch) < IOV_MAX // 2:
                    batch.append(self._queue.get_nowait())
            stopping = any(entry is _STOP for entry in batch)
            waiting += [entry for entry in batch  # type: ignore[misc]
                        if entry is not _STOP and entry is not _WAKE]
            if stopping:
                for entry in waiting:
                    self._fail_unsent(entry)
                return
            conn = self._conn
            if conn is None or conn.dead:
                # back off between attempts, successful ones too: the delay shrinks
                # back only once a reply arrives (a server that takes connections
                # and drops them is not hammered)
                pause = self._last_attempt + self._delay - time.monotonic()
                connected = pause <= 0 and self._reconnect()
                if pause <= 0:
                    self._last_attempt = time.monotonic()
                    self._delay = min(self._delay * 2, RECONNECT_BACKOFF[1])
                if not connected:
                    waiting = self._expire(waiting)
                    continue
                conn = self._conn
            assert conn is not None
            pieces: list[_Piece] = []
            for entry in waiting:
                pieces += self._pieces(entry) if isinstance(entry, _Job) else [entry]
            waiting = []
            pieces = [piece for piece in pieces if self._still_wanted(piece)]
            if pieces:
                for job in {id(piece.job): piece.job for piece in pieces}.values():
                    job.sends += 1
                self._send(conn, pieces)
            del pieces, batch, item  # no view of guest memory waits here for the next batch

    def _expire(self, waiting: list[_Job | _Piece]) -> list[_Job | _Piece]:
        """Fail what waited longer than ``reconnect_wait`` (or was cancelled)."""
        now = time.monotonic()
        keep: list[_Job | _Piece] = []
        failed = 0
        for entry in waiting:
            job = entry if isinstance(entry, _Job) else entry.job
            if not job.deadline:  # the outage's grace, not each request's: once it is
                # over, requests fail at once until the server is back (as QEMU's
                # reconnect-delay), so a guest is not stalled for minutes
                job.deadline = (self._outage_since or now) + self.reconnect_wait
            if job.request.cancelled or now >= job.deadline:
                failed += 1
                self._fail_unsent(entry)
            else:
                keep.append(entry)
        self._unlogged_failures += failed
        if self._unlogged_failures and now - self._failures_logged_at >= FAILURE_LOG_INTERVAL:
            # a line per interval, not per request, while the outage lasts
            log.error("nbd.requests_failed", device=self.name, count=self._unlogged_failures,
                      reason="no connection to the NBD server",
                      waited=self.reconnect_wait, export=self.target.address.describe())
            self._unlogged_failures, self._failures_logged_at = 0, now
        return keep

    def _still_wanted(self, piece: _Piece) -> bool:
        job = piece.job
        if job.request.cancelled:
            self._piece_done(piece, errno.ECANCELED)
            return False
        if piece.command == proto.CMD_FLUSH and self._writes_at_risk:
            with self._lock:
                self._writes_at_risk = False
            log.error("nbd.flush_failed_writes_lost", device=self.name,
                      reason="writes acknowledged by a lost connection were never flushed")
            self._piece_done(piece, errno.EIO)
            return False
        return True

    def _fail_unsent(self, entry: _Job | _Piece) -> None:
        if isinstance(entry, _Job):
            entry.remaining = 1
            piece = _Piece(entry, proto.CMD_FLUSH, 0, 0, [])
        else:
            piece = entry
        self._piece_done(piece, errno.ECANCELED if piece.job.request.cancelled else errno.EIO,
                         quiet=True)

    def _pieces(self, job: _Job) -> list[_Piece]:
        """The NBD commands for a request, none longer than the export allows."""
        request = job.request
        export = self.target.export
        limit = max(export.max_payload // SECTOR * SECTOR, SECTOR)
        kind = request.kind
        pieces: list[_Piece] = []
        if kind == IoKind.FLUSH:
            job.epoch = self._write_epoch
            pieces.append(_Piece(job, proto.CMD_FLUSH, 0, 0, []))
        elif kind in (IoKind.READ, IoKind.WRITE):
            command = proto.CMD_READ if kind == IoKind.READ else proto.CMD_WRITE
            flags = 0
            if kind == IoKind.WRITE and request.durable:
                if export.can_fua:
                    flags = proto.CMD_FLAG_FUA
                    job.stable = True
                elif export.can_flush:
                    job.flush_after = True
            sizes = [min(limit, request.length - start)
                     for start in range(0, request.length, limit)] or [0]
            offset = request.offset
            for size, buffers in zip(sizes, _split(request.buffers, sizes), strict=True):
                pieces.append(_Piece(job, command, offset, size, buffers, flags))
                offset += size
        else:
            wz = kind == IoKind.WRITE_ZEROES
            for start, length, unmap in request.ranges:
                for at in range(start, start + length, limit):
                    size = min(limit, start + length - at)
                    if wz:
                        flags = 0 if unmap and self.target.discard_honoured \
                            else proto.CMD_FLAG_NO_HOLE
                        pieces.append(_Piece(job, proto.CMD_WRITE_ZEROES, at, size, [], flags))
                    else:
                        pieces.append(_Piece(job, proto.CMD_TRIM, at, size, []))
        job.remaining += len(pieces)
        if not pieces:  # a discard of nothing: done, nothing to ask the server
            job.remaining = 1
            self._piece_done(_Piece(job, proto.CMD_TRIM, 0, 0, []), 0)
        return pieces

    def _send(self, conn: _NbdConnection, pieces: list[_Piece]) -> None:
        """Register the pieces, then send them: headers and payloads, one sendmsg for
        as many as fit.  A write whose reply came while sendmsg still held its
        buffers is completed here, once they are let go."""
        iov: list[bytes | memoryview] = []
        with self._lock:
            for piece in pieces:
                handle = self._next_handle
                self._next_handle += 1
                piece.sent, piece.reply = False, None
                conn.pending[handle] = piece
                iov.append(proto.request(piece.command, handle, piece.offset,
                                         piece.length, piece.flags))
                if piece.command == proto.CMD_WRITE:
                    iov += piece.buffers
        try:
            while iov:
                chunk = iov[:IOV_MAX]
                sent = conn.sock.sendmsg(chunk)
                total = sum(len(part) for part in chunk)
                if sent < total:
                    rest: list[bytes | memoryview] = []
                    rest += advance([memoryview(part) for part in chunk], sent)
                    iov = rest + iov[IOV_MAX:]
                    del rest
                else:
                    iov = iov[IOV_MAX:]
                del chunk
        except OSError as exc:
            iov = []
            self._lost(conn, f"send failed: {exc.strerror or exc}")
        answered: list[_Piece] = []
        with self._lock:
            for piece in pieces:
                piece.sent = True
                if piece.reply is not None:
                    answered.append(piece)
        for piece in answered:
            self._piece_done(piece, piece.reply or 0)

    # -- the receiver thread (one per connection) -----------------------------------------

    def _receiver(self, conn: _NbdConnection) -> None:
        """Replies, read in bulk: one ``recv_into`` takes as many as have arrived (a
        4 KiB read's reply is 4 KiB and 16 bytes), their payloads are copied to the
        guest's buffers from there, and the rest of a large payload is received
        straight into them.  Completions are signalled once per bulk, before the
        thread waits for more."""
        sock = conn.sock
        buffer = bytearray(RECEIVE_BUFFER)
        view = memoryview(buffer)
        start = end = 0
        try:
            while True:
                if end - start < proto.REPLY_SIZE:
                    if start:  # a partial header is all that can be left over
                        buffer[: end - start] = buffer[start:end]
                        end, start = end - start, 0
                    self._signal_completions()  # about to wait: say what is done
                    got = sock.recv_into(view[end:])
                    if got == 0:
                        raise ConnectionResetError(errno.ECONNRESET,
                                                   "the server closed the connection")
                    end += got
                    continue
                handle, error = proto.parse_reply_from(buffer, start)
                start += proto.REPLY_SIZE
                piece: _Piece | None = conn.pending.get(handle)
                if piece is None:
                    raise proto.NbdProtocolError(f"a reply to handle {handle}, never sent")
                if piece.command == proto.CMD_READ:
                    if error:
                        with self._lock:
                            conn.pending.pop(handle, None)
                        self._piece_done(piece, error)
                        raise proto.NbdProtocolError(
                            f"read failed ({proto.error_name(error)}); without structured "
                            "replies the stream cannot be trusted after it")
                    have = min(end - start, piece.length)
                    if have:
                        copy(piece.buffers, 0, view[start : start + have], to_buffers=True)
                        start += have
                    if have < piece.length:
                        _recv_into(sock, advance(piece.buffers, have), piece.length - have)
                with self._lock:
                    conn.pending.pop(handle, None)
                if error == proto.ESHUTDOWN:  # the server is going away: again, later
                    self._queue.put(piece)
                    raise ConnectionAbortedError(errno.ESHUTDOWN, "the server is shutting down")
                if piece.command == proto.CMD_WRITE:
                    with self._lock:
                        if not piece.sent:  # sendmsg still holds its buffers: the
                            piece.reply = error  # sender completes it
                            piece = None
                            continue
                self._piece_done(piece, error, signal=False)
                piece = None  # no reference to guest memory outlives the request
        except (OSError, proto.NbdProtocolError) as exc:
            self._signal_completions()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._lost(conn, reason)
        finally:
            view.release()

    def _signal_completions(self) -> None:
        if self._unsignalled:
            self._unsignalled = False
            if not self._closed:
                with contextlib.suppress(OSError):
                    os.eventfd_write(self.completion_fd, 1)

    # -- completion ---------------------------------------------------------------------

    def _piece_done(self, piece: _Piece, error: int, *, quiet: bool = False,
                    signal: bool = True) -> None:
        """One command answered (or given up: ``quiet``, its caller logged the reason);
        ``signal=False``: the receiver signals the completion with its bulk."""
        piece.buffers = []  # views of guest memory: none outlives the request
        job = piece.job
        if error and not job.error:
            job.error = error
            request = job.request
            if error != errno.ECANCELED and not quiet:
                log.error("nbd.io_error", device=self.name, op=request.kind.name,
                          sector=piece.offset // SECTOR, length=piece.length,
                          errno=proto.error_name(error))
        with self._lock:
            job.remaining -= 1
            if job.remaining:
                return
            if job.flush_after and not job.error:
                job.flush_after = False
                job.remaining = 1
                job.epoch = self._write_epoch + 1  # this write's, once acknowledged
                self._write_epoch += 1
                self._queue.put(_Piece(job, proto.CMD_FLUSH, 0, 0, []))
                return
        self._finish(job, signal)

    def _finish(self, job: _Job, signal: bool = True) -> None:
        request = job.request
        request.status = IoStatus.IO_ERROR if job.error else IoStatus.OK
        if not job.error:
            self._delay = RECONNECT_BACKOFF[0]  # the server answers: reconnect at once
        kind = request.kind
        with self._lock:
            if not job.error:
                if kind == IoKind.FLUSH or job.epoch:  # a flush (or writethrough's) done
                    self._flushed_epoch = max(self._flushed_epoch, job.epoch)
                elif kind != IoKind.READ and not job.stable:
                    self._write_epoch += 1  # acknowledged, in the server's cache
            self._in_flight -= 1
            if kind not in (IoKind.READ, IoKind.FLUSH):
                self._flushes.write_done(request)
            released = self._flushes.released()
            private = self._private.get(id(request))
            if private is None:
                self._done.append(request)  # type: ignore[arg-type]
            if self._in_flight == 0:
                self._idle.notify_all()
        for flush in released:
            self._queue.put(flush)
        if private is not None:
            private.set()
        elif not signal:
            self._unsignalled = True
        elif not self._closed:
            with contextlib.suppress(OSError):
                os.eventfd_write(self.completion_fd, 1)

