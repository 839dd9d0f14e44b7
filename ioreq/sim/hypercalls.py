"""One backend connection to the simulated hypervisor: the hypercall surface.

A connection starts with ``{"op": "hello", "kind": ..., "domid": caller}`` —
the handle type (devicemodel, foreignmemory, evtchn, gnttab) and the domain
the backend runs in — and then carries request/response pairs.  Errors come
back as ``{"error": errno}`` so the client raises the same OSError the C
library would.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from typing import Any

import structlog

from virtio_diskd.ioreq.sim.hypervisor import NR_SPIS, EvtchnHandle, HypercallError, Hypervisor
from virtio_diskd.ioreq.xen import abi, simproto

log = structlog.get_logger("virtio_diskd.sim.hypercalls")

KINDS = ("devicemodel", "foreignmemory", "evtchn", "gnttab", "domctl")


class Session:
    def __init__(self, hv: Hypervisor, conn: socket.socket) -> None:
        self.hv = hv
        self.conn = conn
        self.caller = -1
        self.kind = ""
        self.evtchn: EvtchnHandle | None = None
        self.grant_maps: dict[int, tuple[int, list[int]]] = {}
        self.next_map = 1
        #: the one domain this handle may act on, once restricted (Linux's privcmd
        #: IOCTL_PRIVCMD_RESTRICT, evtchn's IOCTL_EVTCHN_RESTRICT_DOMID)
        self.restricted: int | None = None
        #: a grant handle after xentoolcore_restrict_all: its fd is /dev/null now
        self.useless = False

    def run(self) -> None:
        try:
            hello, fds = simproto.recv_message(self.conn)
            _close_all(fds)
            kind, caller = hello.get("kind"), hello.get("domid")
            if hello.get("op") != "hello" or kind not in KINDS or not isinstance(caller, int):
                simproto.send_message(self.conn, {"error": errno.EINVAL})
                return
            self.kind, self.caller = kind, caller
            if kind == "evtchn":
                self.evtchn = EvtchnHandle(self.hv, caller)
                simproto.send_message(self.conn, {"ok": True},
                                  [self.evtchn.event_fd, self.evtchn.counters_fd])
            else:
                simproto.send_message(self.conn, {"ok": True})
            while True:
                request, fds = simproto.recv_message(self.conn)
                _close_all(fds)
                try:
                    reply, reply_fds = self.handle(request)
                except HypercallError as exc:
                    reply, reply_fds = {"error": exc.errno}, []
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("sim.bad_hypercall", request=request, error=str(exc))
                    reply, reply_fds = {"error": errno.EINVAL}, []
                simproto.send_message(self.conn, reply, reply_fds)
        except (simproto.ChannelClosed, OSError):
            return

    def close(self) -> None:
        if self.evtchn is not None:
            self.hv.drop_evtchn(self.evtchn)
        for domid, refs in self.grant_maps.values():
            self.hv.unmap_grants(domid, refs)
        self.grant_maps.clear()
        with contextlib.suppress(OSError):
            self.conn.close()

    def handle(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        op, hv, caller = req["op"], self.hv, self.caller
        if self.useless:
            raise HypercallError(errno.ENOTTY, "the handle's fd is /dev/null (restricted)")
        if op == "restrict":
            return self._restrict(int(req["domid"])), []
        if self.restricted is not None and "domid" in req \
                and int(req["domid"]) != self.restricted:
            raise HypercallError(errno.EPERM, f"handle restricted to domain {self.restricted}")
        if self.kind == "devicemodel":
            domid = int(req["domid"])
            if op == "nr_vcpus":
                guest = hv.guest(domid)
                hv._require_dm(caller, guest)
                return {"vcpus": len(guest.vcpus)}, []
            if op == "create_ioreq_server":
                server = hv.create_ioreq_server(caller, domid, int(req["bufioreq"]))
                return {"id": server.id}, []
            if op == "set_ioreq_server_state":
                hv.set_server_state(caller, domid, int(req["id"]), bool(req["enabled"]))
                return {}, []
            if op in ("map_io_range", "unmap_io_range"):
                if not req["is_mmio"]:
                    raise HypercallError(errno.EOPNOTSUPP, "only MMIO ranges on Arm")
                hv.map_range(caller, domid, int(req["id"]), int(req["start"]), int(req["end"]),
                             add=op == "map_io_range")
                return {}, []
            if op == "destroy_ioreq_server":
                hv.destroy_server(caller, domid, int(req["id"]))
                return {}, []
            if op == "irq_doorbell":
                bell, wake_fd = hv.irq_doorbell(caller, domid)
                return {"nr_spis": NR_SPIS, "words": bell.WORDS}, [bell.fd, wake_fd]
        elif self.kind == "foreignmemory":
            domid = int(req["domid"])
            if op == "map":
                guest = hv.foreign_ram(caller, domid)
                base = guest.ram_base >> abi.XEN_PAGE_SHIFT
                pages = guest.ram_size >> abi.XEN_PAGE_SHIFT
                offsets = []
                for gfn in req["gfns"]:
                    if not base <= int(gfn) < base + pages:
                        raise HypercallError(errno.EFAULT, f"gfn {gfn:#x} is not guest RAM")
                    offsets.append((int(gfn) - base) << abi.XEN_PAGE_SHIFT)
                return {"offsets": offsets}, [guest.ram_fd]
            if op == "map_resource":
                guest, server = hv.server(caller, domid, int(req["id"]))
                if int(req["type"]) != abi.XENMEM_RESOURCE_IOREQ_SERVER:
                    raise HypercallError(errno.EOPNOTSUPP, "only ioreq server resources")
                if server.emulator != caller:
                    raise HypercallError(errno.EPERM, "only the creator maps the ioreq page")
                if int(req["frame"]) != abi.XENMEM_RESOURCE_IOREQ_SERVER_FRAME_IOREQ0 \
                        or int(req["nr_frames"]) != 1:
                    raise HypercallError(errno.ENOENT, "no such frame (bufioreq is off)")
                return {}, [server.page_fd]
        elif self.kind == "evtchn":
            assert self.evtchn is not None
            if op == "bind_interdomain":
                port, notify_fd = hv.bind_interdomain(self.evtchn, int(req["domid"]),
                                                      int(req["remote_port"]))
                return {"port": port}, [notify_fd]
            if op == "unbind":
                hv.unbind(self.evtchn, int(req["port"]))
                return {}, []
        elif self.kind == "domctl":
            if op == "set_target":
                hv.set_target(caller, int(req["domid"]), int(req["target"]))
                return {}, []
        elif self.kind == "gnttab":
            if op == "set_max_grants":
                return {}, []
            if op == "map":
                domid = int(req["domid"])
                refs = [int(r) for r in req["refs"]]
                gfns = hv.map_grants(caller, domid, refs, bool(req["writable"]))
                guest = hv.guest(domid)
                base = guest.ram_base >> abi.XEN_PAGE_SHIFT
                map_id = self.next_map
                self.next_map += 1
                self.grant_maps[map_id] = (domid, refs)
                return {"id": map_id, "offsets": [(g - base) << abi.XEN_PAGE_SHIFT
                                                  for g in gfns]}, [guest.ram_fd]
            if op == "unmap":
                domid, refs = self.grant_maps.pop(int(req["id"]))
                hv.unmap_grants(domid, refs)
                return {}, []
        raise HypercallError(errno.ENOSYS, f"unknown {self.kind} operation {op!r}")


    def _restrict(self, domid: int) -> dict[str, Any]:
        """As the kernel drivers do: privcmd handles accept the same domain again
        (EINVAL for another), an event-channel handle only once (EACCES); a grant
        handle cannot be restricted to a domain, so libxengnttab's callback makes it
        useless (every later call fails with ENOTTY, as ioctls on /dev/null do)."""
        if self.kind == "gnttab":
            # libxengnttab's xentoolcore callback: dup2 /dev/null over the gntdev fd
            self.useless = True
            return {}
        if self.restricted is not None:
            if self.kind == "evtchn":
                raise HypercallError(errno.EACCES, "already restricted")
            if self.restricted != domid:
                raise HypercallError(errno.EINVAL, "restricted to another domain")
        self.restricted = domid
        return {}


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
