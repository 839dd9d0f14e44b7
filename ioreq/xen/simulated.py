"""The daemon's binding to the simulated hypervisor: a second :class:`XenPlatform`.

It sits beside the real libxen* bindings and is chosen with ``--simulated``;
it talks to the simulated hypervisor (``ioreq/sim/``) only over its socket
protocol (:mod:`.simproto`) and imports nothing of the simulator.

Same calls, same errors (``XenError`` with the errno Xen would give) as the
ctypes bindings in :mod:`virtio_diskd.ioreq.xen.libxen`; only the transport
differs.  Memory comes as file descriptors and is mapped with
:class:`~virtio_diskd.ioreq.xen.memmap.PageMapping`, so the device model
works on real shared memory, exactly as over foreign or grant mappings.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import threading
from typing import Any

from virtio_diskd.ioreq.xen import simproto
from virtio_diskd.ioreq.xen.barrier import full_barrier
from virtio_diskd.ioreq.xen.interface import PROT_WRITE, Mapping, XenError
from virtio_diskd.ioreq.xen.memmap import PageMapping

#: Open handles that can be restricted, oldest first: xentoolcore's registry.
_RESTRICTABLE: dict[int, _Connection] = {}


def restrict_all(domid: int) -> None:
    """``xentoolcore_restrict_all``: every open handle, in the order opened; the
    first failure stops it (as xentoolcore does)."""
    for conn in list(_RESTRICTABLE.values()):
        conn.call("restrict", domid=domid)


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
        _RESTRICTABLE[id(self)] = self

    def _call(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        try:
            simproto.send_message(self.sock, message)
            reply, fds = simproto.recv_message(self.sock)
        except (OSError, simproto.ChannelClosed) as exc:
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

    def close(self) -> None:
        _RESTRICTABLE.pop(id(self), None)
        with contextlib.suppress(OSError):
            self.sock.close()


class SimDeviceModel:
    def __init__(self, path: str, domid: int) -> None:
        self.conn = _Connection(path, "devicemodel", domid)
        self._doorbells: dict[int, tuple[memoryview, int, mmap.mmap]] = {}

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
        """Level 1 is one edge: bump the SPI's counter in the guest's shared page and
        wake its vCPU — no message, as on Xen where this is one quick hypercall."""
        bell = self._doorbells.get(domid)
        if bell is None or not bell[0][-1]:  # none yet, or that domain died
            bell = self._open_doorbell(domid)
        counters, wake_fd, _page = bell
        if not 32 <= irq < len(counters) - 1 or level not in (0, 1):
            raise XenError(22, f"set_irq_level: irq {irq} level {level}")
        if level == 0:
            return  # edge-triggered: the falling edge is ignored
        counters[irq] = (counters[irq] + 1) & 0xFFFFFFFF
        counters[0] = (counters[0] + 1) & 0xFFFFFFFF
        os.eventfd_write(wake_fd, 1)

    def _open_doorbell(self, domid: int) -> tuple[memoryview, int, mmap.mmap]:
        reply, fds = self.conn.call("irq_doorbell", domid=domid)
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise XenError(5, "bad reply to irq_doorbell")
        page_fd, wake_fd = fds
        try:
            page = mmap.mmap(page_fd, int(reply["words"]) * 4)
        finally:
            os.close(page_fd)
        self._drop_doorbell(domid)
        bell = self._doorbells[domid] = (memoryview(page).cast("I"), wake_fd, page)
        return bell

    def _drop_doorbell(self, domid: int) -> None:
        bell = self._doorbells.pop(domid, None)
        if bell is not None:
            view, wake_fd, page = bell
            view.release()
            page.close()
            os.close(wake_fd)

    def close(self) -> None:
        for domid in list(self._doorbells):
            self._drop_doorbell(domid)
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
    """libxenevtchn over the hypervisor's shared event counters and eventfds.

    Like the evtchn driver in the backend's kernel, this side keeps the masks:
    a port whose counter moved is pending; :meth:`pending` hands it out once
    and masks it; :meth:`unmask` re-arms the eventfd if it fired meanwhile, so
    no event is lost and none is delivered twice while masked.
    """

    def __init__(self, path: str, domid: int) -> None:
        self.conn = _Connection(path, "evtchn", domid)
        if len(self.conn.hello_fds) != 2:
            self.conn.close()
            raise XenError(5, "the hypervisor sent no event channel memory")
        self._event_fd, counters_fd = self.conn.hello_fds
        try:
            size = os.fstat(counters_fd).st_size
            self._page = mmap.mmap(counters_fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(counters_fd)
        self._counters = memoryview(self._page).cast("I")
        self._seen: dict[int, int] = {}
        self._masked: set[int] = set()
        self._notify_fds: dict[int, int] = {}

    def fd(self) -> int:
        return self._event_fd

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        reply, fds = self.conn.call("bind_interdomain", domid=domid, remote_port=remote_port)
        port = int(reply["port"])
        if len(fds) != 1 or not 0 < port < len(self._counters):
            for fd in fds:
                os.close(fd)
            raise XenError(5, "bad reply to bind_interdomain")
        self._notify_fds[port] = fds[0]
        self._seen[port] = 0
        self._masked.discard(port)
        return port

    def unbind(self, port: int) -> None:
        self.conn.call("unbind", port=port)
        self._forget(port)

    def _forget(self, port: int) -> None:
        fd = self._notify_fds.pop(port, None)
        if fd is not None:
            os.close(fd)
        self._seen.pop(port, None)
        self._masked.discard(port)

    def notify(self, port: int) -> None:
        fd = self._notify_fds.get(port)
        if fd is None:
            raise XenError(22, f"notify: port {port} is not bound")
        os.eventfd_write(fd, 1)

    def unmask(self, port: int) -> None:
        self._masked.discard(port)
        seen = self._seen.get(port)
        if seen is not None and self._counters[port] != seen:
            os.eventfd_write(self._event_fd, 1)  # fired while masked: deliver it again

    def pending_ports(self) -> list[int]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._event_fd)
        counters, masked = self._counters, self._masked
        ports = []
        for port, seen in self._seen.items():
            count = counters[port]
            if count != seen and port not in masked:
                self._seen[port] = count
                masked.add(port)
                ports.append(port)
        return ports

    def close(self) -> None:
        for port in list(self._notify_fds):
            self._forget(port)
        self._counters.release()
        self._page.close()
        with contextlib.suppress(OSError):
            os.close(self._event_fd)
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


class SimDomainControl:
    """:class:`DomainControl` on the simulated hypervisor (Dom0 only, as on Xen)."""

    def __init__(self, socket_path: str, domid: int = 0) -> None:
        self._conn = _Connection(socket_path, "domctl", domid)

    def set_target(self, domid: int, target: int) -> None:
        self._conn.call("set_target", domid=domid, target=target)

    def close(self) -> None:
        self._conn.close()


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

    def restrict(self, domid: int) -> None:
        restrict_all(domid)

    def barrier(self) -> None:
        full_barrier()
