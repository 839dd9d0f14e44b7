"""The backend side of the simulated hypervisor: :class:`XenPlatform` over its socket.

Same calls, same errors (``XenError`` with the errno Xen would give) as the
ctypes bindings in :mod:`virtio_diskd.ioreq.xen.libxen`; only the transport
differs.  Memory comes as file descriptors and is mapped with
:class:`~virtio_diskd.ioreq.xen.memmap.PageMapping`, so the device model
works on real shared memory, exactly as over foreign or grant mappings.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from typing import Any

from virtio_diskd.ioreq.sim import wire
from virtio_diskd.ioreq.xen.barrier import full_barrier
from virtio_diskd.ioreq.xen.interface import PROT_WRITE, Mapping, XenError
from virtio_diskd.ioreq.xen.memmap import PageMapping


class _Connection:
    """One hypervisor connection: request/response, one at a time."""

    def __init__(self, path: str, kind: str, domid: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise XenError(exc.errno, f"cannot reach the simulated hypervisor at {path}: "
                           f"{exc.strerror}") from exc
        self.lock = threading.Lock()
        _reply, self.hello_fds = self._call({"op": "hello", "kind": kind, "domid": domid})

    def _call(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        try:
            wire.send_message(self.sock, message)
            reply, fds = wire.recv_message(self.sock)
        except (OSError, wire.ChannelClosed) as exc:
            raise XenError(getattr(exc, "errno", None) or 5,
                           f"hypervisor connection lost: {exc}") from exc
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            code = int(reply["error"])
            raise XenError(code, f"{message.get('op')}: {os.strerror(code)}")
        return reply, fds

    def call(self, op: str, **args: Any) -> tuple[dict[str, Any], list[int]]:
        with self.lock:
            return self._call({"op": op, **args})

    def post(self, op: str, **args: Any) -> None:
        """Fire and forget (the hypervisor logs a failure): for the one hypercall on the
        data path, which on Xen is a quick ioctl and must not stall the event loop."""
        with self.lock:
            try:
                wire.send_message(self.sock, {"op": op, "noreply": True, **args})
            except OSError as exc:
                raise XenError(exc.errno or 5, f"hypervisor connection lost: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class SimDeviceModel:
    def __init__(self, path: str, domid: int) -> None:
        self.conn = _Connection(path, "devicemodel", domid)

    def nr_vcpus(self, domid: int) -> int:
        return int(self.conn.call("nr_vcpus", domid=domid)[0]["vcpus"])

    def create_ioreq_server(self, domid: int, handle_bufioreq: int = 0) -> int:
        return int(self.conn.call("create_ioreq_server", domid=domid,
                                  bufioreq=handle_bufioreq)[0]["id"])

    def set_ioreq_server_state(self, domid: int, server: int, enabled: bool) -> None:
        self.conn.call("set_ioreq_server_state", domid=domid, id=server, enabled=enabled)

    def map_io_range_to_ioreq_server(self, domid: int, server: int, is_mmio: bool, start: int,
                                     end: int) -> None:
        self.conn.call("map_io_range", domid=domid, id=server, is_mmio=is_mmio, start=start,
                       end=end)

    def unmap_io_range_from_ioreq_server(self, domid: int, server: int, is_mmio: bool,
                                         start: int, end: int) -> None:
        self.conn.call("unmap_io_range", domid=domid, id=server, is_mmio=is_mmio, start=start,
                       end=end)

    def destroy_ioreq_server(self, domid: int, server: int) -> None:
        self.conn.call("destroy_ioreq_server", domid=domid, id=server)

    def set_irq_level(self, domid: int, irq: int, level: int) -> None:
        if not 32 <= irq < 1020 or level not in (0, 1):
            raise XenError(22, f"set_irq_level: irq {irq} level {level}")
        self.conn.post("set_irq_level", domid=domid, irq=irq, level=level)

    def close(self) -> None:
        self.conn.close()


class _FdPages:
    """A PageMapping over an fd received from the hypervisor (the fd is closed at once)."""

    def __init__(self, fd: int, offsets: list[int], writable: bool) -> None:
        try:
            self._pages = PageMapping(fd, offsets, writable)
        finally:
            os.close(fd)

    @property
    def view(self) -> memoryview:
        return self._pages.view

    def unmap(self) -> None:
        self._pages.unmap()


class SimForeignMemory:
    def __init__(self, path: str, domid: int) -> None:
        self.conn = _Connection(path, "foreignmemory", domid)

    def map(self, domid: int, prot: int, gfns: list[int]) -> Mapping:
        reply, fds = self.conn.call("map", domid=domid, gfns=gfns)
        return _FdPages(fds[0], [int(o) for o in reply["offsets"]], bool(prot & PROT_WRITE))

    def map_resource(self, domid: int, resource_type: int, resource_id: int, frame: int,
                     nr_frames: int, prot: int) -> Mapping:
        _reply, fds = self.conn.call("map_resource", domid=domid, type=resource_type,
                                     id=resource_id, frame=frame, nr_frames=nr_frames)
        return _FdPages(fds[0], [0], True)

    def close(self) -> None:
        self.conn.close()


class SimEventChannels:
    """libxenevtchn over the hypervisor's event socket (read = pending, write = unmask)."""

    def __init__(self, path: str, domid: int) -> None:
        self.conn = _Connection(path, "evtchn", domid)
        self.events = socket.socket(fileno=self.conn.hello_fds[0])
        self.events.setblocking(False)
        self._buffer = b""

    def fd(self) -> int:
        return self.events.fileno()

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        return int(self.conn.call("bind_interdomain", domid=domid,
                                  remote_port=remote_port)[0]["port"])

    def unbind(self, port: int) -> None:
        self.conn.call("unbind", port=port)

    def notify(self, port: int) -> None:
        self.events.sendall(wire.EVENT.pack(wire.EVENT_NOTIFY, port))

    def unmask(self, port: int) -> None:
        self.events.sendall(wire.EVENT.pack(wire.EVENT_UNMASK, port))

    def pending(self) -> int | None:
        while len(self._buffer) < 4:
            try:
                data = self.events.recv(4096)
            except BlockingIOError:
                return None
            if not data:
                raise XenError(104, "event channel connection closed")
            self._buffer += data
        (port,) = struct.unpack_from("<I", self._buffer)
        self._buffer = self._buffer[4:]
        return int(port)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.events.close()
        self.conn.close()


class _GrantPages(_FdPages):
    def __init__(self, conn: _Connection, map_id: int, fd: int, offsets: list[int],
                 writable: bool) -> None:
        super().__init__(fd, offsets, writable)
        self._conn, self._id = conn, map_id

    def unmap(self) -> None:
        super().unmap()
        self._conn.call("unmap", id=self._id)


class SimGrantTables:
    def __init__(self, path: str, domid: int) -> None:
        self.conn = _Connection(path, "gnttab", domid)

    def set_max_grants(self, count: int) -> None:
        self.conn.call("set_max_grants", count=count)

    def map_domain_grant_refs(self, domid: int, refs: list[int], prot: int) -> Mapping:
        writable = bool(prot & PROT_WRITE)
        reply, fds = self.conn.call("map", domid=domid, refs=refs, writable=writable)
        return _GrantPages(self.conn, int(reply["id"]), fds[0],
                           [int(o) for o in reply["offsets"]], writable)

    def close(self) -> None:
        self.conn.close()


class SimPlatform:
    """:class:`XenPlatform` for a backend running in ``domid`` on the simulated host."""

    def __init__(self, socket_path: str, domid: int = 0) -> None:
        self.socket_path = socket_path
        self.domid = domid

    def devicemodel(self) -> SimDeviceModel:
        return SimDeviceModel(self.socket_path, self.domid)

    def foreignmemory(self) -> SimForeignMemory:
        return SimForeignMemory(self.socket_path, self.domid)

    def evtchn(self) -> SimEventChannels:
        return SimEventChannels(self.socket_path, self.domid)

    def gnttab(self) -> SimGrantTables:
        return SimGrantTables(self.socket_path, self.domid)

    def barrier(self) -> None:
        full_barrier()
