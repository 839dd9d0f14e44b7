"""A xenstored for machines without Xen: the xs_wire protocol on Unix sockets.

No real xenstored runs without a hypervisor (the C one exits with "Failed to
open evtchn device", oxenstored dies opening libxc), so the simulated host
ships its own.  It is faithful enough that Xen's own libxenstore (the
``xenstore-*`` tools, through ``XENSTORED_PATH``) and pyxs accept it.

Each listening socket has a fixed identity: the main socket acts as dom0
(privileged, like ``/run/xenstored/socket``); :meth:`Xenstored.serve_as` opens
further sockets whose clients act as a given domain, so tests can check what a
guest or a driver domain may and may not touch.

Robustness rules (one client never harms another):

* a header announcing more than 4096 bytes, or a connection closed
  mid-message, drops that connection only;
* anything parseable but wrong gets an XS_ERROR with the errno name;
* a vanished client's transactions are discarded, never half-applied;
* a client that stops reading its watch events is dropped once its queue
  of unsent messages is full, instead of stalling the server.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from dataclasses import dataclass, field, replace

import structlog
import trio

from virtio_diskd.ioreq.sim.xsstore import (
    READ,
    Caller,
    Perm,
    Trigger,
    Xenstore,
    access_of,
    canonical_path,
    is_child,
)
from virtio_diskd.ioreq.xenstore.wire import (
    HEADER,
    PAYLOAD_MAX,
    Header,
    Op,
    XenstoreError,
    error_payload,
    join_strings,
    pack,
    split_strings,
)

log = structlog.get_logger("virtio_diskd.xenstored")

OK = b"OK\0"
#: Messages queued for one client before it is considered stuck and dropped.
OUTGOING_QUEUE = 4096
#: Watches one connection may hold (C xenstored's default quota is 128).
MAX_WATCHES = 256


@dataclass(eq=False)
class Watch:
    path: str  # canonical (absolute or special)
    token: bytes
    relative_prefix: str  # stripped from event paths for relative watches ("" if absolute)


@dataclass(eq=False)
class Connection:
    caller: Caller
    send_channel: trio.MemorySendChannel[bytes]
    watches: list[Watch] = field(default_factory=list)
    closed: bool = False

    def queue(self, message: bytes) -> None:
        if self.closed:
            return
        try:
            self.send_channel.send_nowait(message)
        except trio.WouldBlock:
            log.warning("xenstored.client_stuck", domid=self.caller.domid)
            self.closed = True
            self.send_channel.close()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = True


class ProtocolViolation(Exception):
    """The peer broke framing; its connection is dropped."""


class Xenstored:
    """The server: one :class:`Xenstore` shared by every connection."""

    def __init__(self, store: Xenstore | None = None) -> None:
        self.store = store if store is not None else Xenstore()
        self.connections: set[Connection] = set()
        #: reads of these paths by these domains fail with this errno: what a real
        #: xenstored answers a driver domain while its guest is torn down (EINVAL,
        #: seen on real Xen), for tests to plant
        self.refused_reads: dict[tuple[int, str], int] = {}

    # -- listening ------------------------------------------------------------

    async def serve(self, path: str, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve dom0 (privileged) clients on ``path`` until cancelled."""
        await self.serve_as(path, Caller.domain(0), task_status=task_status)

    async def serve_as(self, path: str, caller: Caller, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve clients on ``path`` that act as ``caller``'s domain."""
        if os.path.exists(path):
            os.unlink(path)
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(path)
        inode = os.stat(path).st_ino
        listener.listen(128)
        log.info("xenstored.listening", path=path, domid=caller.domid)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    sock, _ = await listener.accept()
                    nursery.start_soon(self._serve_connection, trio.SocketStream(sock), caller)
        finally:
            listener.close()
            # a successor may already listen on the same path: remove only our own socket
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == inode:
                    os.unlink(path)

    async def _serve_connection(self, stream: trio.SocketStream, caller: Caller) -> None:
        send_channel, receive_channel = trio.open_memory_channel[bytes](OUTGOING_QUEUE)
        conn = Connection(caller, send_channel)
        self.connections.add(conn)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, stream, receive_channel, nursery.cancel_scope)
                try:
                    await self._reader(stream, conn)
                except ProtocolViolation as exc:
                    log.warning("xenstored.client_dropped", domid=caller.domid, reason=str(exc))
                except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                    pass
                nursery.cancel_scope.cancel()
        finally:
            conn.closed = True
            self.connections.discard(conn)
            self.store.abort_all(conn)
            send_channel.close()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    @staticmethod
    async def _writer(stream: trio.SocketStream, messages: trio.MemoryReceiveChannel[bytes],
                      scope: trio.CancelScope) -> None:
        try:
            async for message in messages:
                await stream.send_all(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    async def _reader(self, stream: trio.SocketStream, conn: Connection) -> None:
        buffer = bytearray()
        while not conn.closed:
            data = await stream.receive_some(65536)
            if not data:
                if buffer:
                    raise ProtocolViolation("connection closed in the middle of a message")
                return
            buffer += data
            while len(buffer) >= HEADER.size:
                header = Header.unpack(bytes(buffer[: HEADER.size]))
                if header.length > PAYLOAD_MAX:
                    raise ProtocolViolation(f"payload of {header.length} bytes announced")
                end = HEADER.size + header.length
                if len(buffer) < end:
                    break
                payload = bytes(buffer[HEADER.size : end])
                del buffer[:end]
                self.handle(conn, header, payload)

    # -- requests ---------------------------------------------------------------

    def handle(self, conn: Connection, header: Header, payload: bytes) -> None:
        """Answer one request and deliver the watch events it caused."""
        triggers: list[Trigger] = []
        try:
            reply_op, reply, triggers = self._dispatch(conn, header, payload)
        except XenstoreError as exc:
            reply_op, reply = Op.ERROR, error_payload(exc.errno or errno.EINVAL)
        except UnicodeDecodeError:
            reply_op, reply = Op.ERROR, error_payload(errno.EINVAL)
        except Exception:  # a bug here must cost one request, not the whole store
            log.exception("xenstored.internal_error", op=header.op)
            reply_op, reply = Op.ERROR, error_payload(errno.EIO)
        conn.queue(pack(reply_op, header.req_id, header.tx_id, reply))
        if reply_op == Op.WATCH and triggers:
            # The registration event goes to the new watch only, after its OK.
            self._fire_watch(conn, conn.watches[-1], triggers[0].path)
        else:
            self.fire(triggers)

    def _dispatch(self, conn: Connection, header: Header, payload: bytes,
                  ) -> tuple[int, bytes, list[Trigger]]:
        op, tx_id, caller, store = header.op, header.tx_id, conn.caller, self.store
        target = store.targets.get(caller.domid)
        if target is not None:
            caller = replace(caller, target=target)
        if op in (Op.READ, Op.DIRECTORY, Op.GET_PERMS, Op.MKDIR, Op.RM):
            path = canonical_path(caller, _one_arg(payload))
            if op == Op.READ:
                refused = self.refused_reads.get((caller.domid, path))
                if refused is not None:
                    raise XenstoreError(refused, f"planted for {path}")
                return op, store.read(conn, tx_id, caller, path), []
            if op == Op.DIRECTORY:
                names = [n.encode() for n in store.directory(conn, tx_id, caller, path)]
                listing = join_strings(names)
                if len(listing) > PAYLOAD_MAX:
                    raise XenstoreError(errno.E2BIG, path)
                return op, listing, []
            if op == Op.GET_PERMS:
                perms = store.get_perms(conn, tx_id, caller, path)
                return op, join_strings([str(p).encode() for p in perms]), []
            if op == Op.MKDIR:
                return op, OK, store.mkdir(conn, tx_id, caller, path)
            return op, OK, store.rm(conn, tx_id, caller, path)
        if op == Op.WRITE:
            encoded_path, sep, value = payload.partition(b"\0")
            if not sep:
                raise XenstoreError(errno.EINVAL, "WRITE without value")
            path = canonical_path(caller, encoded_path.decode("ascii"))
            return op, OK, store.write(conn, tx_id, caller, path, value)
        if op == Op.SET_PERMS:
            args = _strings(payload)
            if len(args) < 2:
                raise XenstoreError(errno.EINVAL, "SET_PERMS needs a path and permissions")
            path = canonical_path(caller, args[0])
            perms = tuple(Perm.parse(text) for text in args[1:])
            return op, OK, store.set_perms(conn, tx_id, caller, path, perms)
        if op == Op.DIRECTORY_PART:
            return op, self._directory_part(conn, tx_id, caller, payload), []
        if op == Op.WATCH:
            return self._watch(conn, payload)
        if op == Op.UNWATCH:
            raw_path, token = _two_args(payload)
            path = canonical_path(caller, raw_path, allow_special=True)
            for watch in conn.watches:
                if watch.path == path and watch.token == token:
                    conn.watches.remove(watch)
                    return op, OK, []
            raise XenstoreError(errno.ENOENT, f"no watch on {path}")
        if op == Op.RESET_WATCHES:
            conn.watches.clear()
            store.abort_all(conn)
            return op, OK, []
        if op == Op.TRANSACTION_START:
            if tx_id != 0:
                raise XenstoreError(errno.EBUSY, "transactions do not nest")
            return op, f"{store.transaction_start(conn)}\0".encode(), []
        if op == Op.TRANSACTION_END:
            arg = _one_arg(payload)
            if arg not in ("T", "F"):
                raise XenstoreError(errno.EINVAL, "TRANSACTION_END takes T or F")
            return op, OK, store.transaction_end(conn, tx_id, commit=arg == "T")
        if op == Op.GET_DOMAIN_PATH:
            domid = _domid(_one_arg(payload))
            return op, f"/local/domain/{domid}\0".encode(), []
        if op == Op.IS_DOMAIN_INTRODUCED:
            domid = _domid(_one_arg(payload))
            return op, b"T\0" if domid in store.introduced else b"F\0", []
        if op == Op.INTRODUCE:
            args = _strings(payload)
            if len(args) != 3:
                raise XenstoreError(errno.EINVAL, "INTRODUCE takes domid, mfn and port")
            return op, OK, store.introduce(caller, _domid(args[0]))
        if op == Op.RELEASE:
            return op, OK, store.release(caller, _domid(_one_arg(payload)))
        if op in (Op.RESUME, Op.SET_TARGET):
            if not caller.privileged:
                raise XenstoreError(errno.EACCES, f"{Op(op).name} needs privilege")
            if op == Op.SET_TARGET:
                args = _strings(payload)
                if len(args) != 2:
                    raise XenstoreError(errno.EINVAL, "SET_TARGET takes domid and target")
                domid, target = _domid(args[0]), _domid(args[1])
                if target not in store.introduced:  # as xenstored: both must be known
                    raise XenstoreError(errno.ENOENT, f"domain {target} is not introduced")
                store.targets[domid] = target
            return op, OK, []
        raise XenstoreError(errno.EINVAL, f"unknown or unsupported operation {op}")

    def _directory_part(self, conn: Connection, tx_id: int, caller: Caller,
                        payload: bytes) -> bytes:
        args = _strings(payload)
        if len(args) != 2 or not args[1].isdigit():
            raise XenstoreError(errno.EINVAL, "DIRECTORY_PART takes a path and an offset")
        path = canonical_path(caller, args[0])
        names = self.store.directory(conn, tx_id, caller, path)
        children = join_strings([n.encode() for n in names])
        gen = f"{self.store.generation(conn, tx_id, path)}\0".encode()
        offset = int(args[1])
        if offset >= len(children):
            return gen + b"\0"
        limit = PAYLOAD_MAX - len(gen) - 1
        end = offset
        while end < len(children):
            nxt = children.index(b"\0", end) + 1
            if nxt - offset > limit:
                break
            end = nxt
        chunk = children[offset:end]
        return gen + chunk + (b"\0" if end == len(children) else b"")

    def _watch(self, conn: Connection, payload: bytes) -> tuple[int, bytes, list[Trigger]]:
        raw_path, token = _two_args(payload)
        path = canonical_path(conn.caller, raw_path, allow_special=True)
        if any(w.path == path and w.token == token for w in conn.watches):
            raise XenstoreError(errno.EEXIST, f"watch on {path} with that token exists")
        if len(conn.watches) >= MAX_WATCHES:
            raise XenstoreError(errno.E2BIG, "too many watches")
        prefix = "" if raw_path.startswith(("/", "@")) else f"/local/domain/{conn.caller.domid}/"
        conn.watches.append(Watch(path, token, prefix))
        return Op.WATCH, OK, [Trigger(path, True, (Perm("b", 0),))]

    # -- watches ------------------------------------------------------------------

    def fire(self, triggers: list[Trigger]) -> None:
        """Deliver WATCH_EVENTs for ``triggers`` to every interested connection."""
        if not triggers:
            return
        for conn in list(self.connections):
            for watch in conn.watches:
                seen: set[str] = set()
                for trig in triggers:
                    if trig.path in seen or not _matches(watch.path, trig):
                        continue
                    if trig.path.startswith("@"):
                        if not conn.caller.privileged:
                            continue
                    elif not access_of(trig.perms, conn.caller) & READ:
                        continue
                    seen.add(trig.path)
                    self._fire_watch(conn, watch, trig.path)

    @staticmethod
    def _fire_watch(conn: Connection, watch: Watch, path: str) -> None:
        if watch.relative_prefix and path.startswith(watch.relative_prefix):
            path = path[len(watch.relative_prefix):]
        conn.queue(pack(Op.WATCH_EVENT, 0, 0, path.encode() + b"\0" + watch.token + b"\0"))

    # -- what the simulated hypervisor tells xenstored ------------------------------

    def domain_released(self, domid: int) -> None:
        """A domain died: forget it and fire ``@releaseDomain`` (as xenstored does on VIRQ)."""
        if domid in self.store.introduced:
            self.fire(self.store.release(Caller.domain(0), domid))


def _matches(watch_path: str, trig: Trigger) -> bool:
    if trig.exact:
        return watch_path == trig.path
    if watch_path.startswith("@") or trig.path.startswith("@"):
        return watch_path == trig.path
    return is_child(trig.path, watch_path)


def _strings(payload: bytes) -> list[str]:
    return [s.decode("ascii") for s in split_strings(payload)]


def _one_arg(payload: bytes) -> str:
    args = _strings(payload)
    if len(args) != 1:
        raise XenstoreError(errno.EINVAL, "expected one argument")
    return args[0]


def _two_args(payload: bytes) -> tuple[str, bytes]:
    args = split_strings(payload)
    if len(args) != 2:
        raise XenstoreError(errno.EINVAL, "expected two arguments")
    return args[0].decode("ascii"), args[1]


def _domid(text: str) -> int:
    if not text.isdigit() or int(text) > 0x7FF0:
        raise XenstoreError(errno.EINVAL, f"bad domain id {text!r}")
    return int(text)


async def run_xenstored(socket_path: str, domain_sockets: dict[int, str]) -> None:
    """Serve the store on ``socket_path`` (dom0) and one socket per listed domain."""
    server = Xenstored()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, socket_path)
        for domid, path in domain_sockets.items():
            await nursery.start(server.serve_as, path, Caller.domain(domid))


def main(argv: list[str] | None = None) -> int:
    """``python -m virtio_diskd.ioreq.sim.xenstored --socket PATH [--as DOMID:PATH …]``."""
    parser = argparse.ArgumentParser(description="simulated xenstored (xs_wire on Unix sockets)")
    parser.add_argument("--socket", required=True, help="socket for privileged (dom0) clients")
    parser.add_argument("--as", dest="domains", action="append", default=[], metavar="DOMID:PATH",
                        help="an extra socket whose clients act as DOMID")
    args = parser.parse_args(argv)
    domain_sockets: dict[int, str] = {}
    for item in args.domains:
        domid, sep, path = item.partition(":")
        if not sep or not domid.isdigit():
            parser.error(f"--as takes DOMID:PATH, not {item!r}")
        domain_sockets[int(domid)] = path
    try:
        trio.run(run_xenstored, args.socket, domain_sockets)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
