"""A simulated Xen hypervisor, as far as an IOREQ device model can tell.

It runs guests whose RAM is a memfd at 0x40000000 and whose vCPUs are
threads executing guest code (the Linux-like driver in :mod:`.guest`), and it
serves device-model backends over a Unix socket, with shared memory passed as
file descriptors.  What it enforces is what Xen enforces
(``shared/reference/xen-interface.md`` §2–§6):

* IOREQ servers: buffered ioreqs off only, at most 8 per guest; MMIO ranges
  with inclusive ends; the ioreq page (one 32-byte ``ioreq_t`` per vCPU, the
  exact ABI) mapped only by the server's creator; ``vp_eport`` filled in on
  enable; destroy drops the ranges;
* the ioreq protocol: a vCPU's MMIO access fills its slot, sets READY and
  notifies; the vCPU blocks until IORESP_READY; a state going backwards (or
  an unknown state) crashes the guest; INVALIDATE is broadcast synchronously
  to every enabled server and must be answered; an access no server claims
  entirely is a data abort in the guest;
* event channels with libxenevtchn's semantics: ``bind_interdomain`` returns a
  local port (and leaves it pending once, as Xen does); a fired port stays
  masked until unmasked; notify wakes the vCPU;
* privileges: device-model operations and foreign mapping of guest RAM only
  for the privileged domain (dom0); grant maps honour read-only grants, fail
  on revoked ones, and a grant revoked while mapped is reported as still in
  use (the guest then marks the device broken, as Linux does);
* interrupts: ``set_irq_level`` on SPIs only (32 ≤ irq < 32 + nr_spis); level 1
  injects one edge, level 0 is ignored (the old vGIC).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from virtio_diskd.ioreq.sim import wire
from virtio_diskd.ioreq.xen import abi

log = structlog.get_logger("virtio_diskd.sim.hypervisor")

GUEST_RAM_BASE = 0x40000000
PRIVILEGED_DOMID = 0
NR_SPIS = 32 + 64


class DataAbort(Exception):
    """A guest access that no IOREQ server claims (Xen injects a data abort)."""


class GuestGone(Exception):
    """The guest crashed or was destroyed while a vCPU was running."""


class HypercallError(OSError):
    pass


def _err(code: int, message: str) -> HypercallError:
    return HypercallError(code, message)


@dataclass(eq=False)
class PortBinding:
    """An interdomain event channel: a guest's Xen-side port bound to a handle's local port."""

    guest: Guest
    remote_port: int
    handle: EvtchnHandle | None = None
    local_port: int = 0
    on_notify: Callable[[], None] | None = None


@dataclass(eq=False)
class IoreqServer:
    id: int
    emulator: int
    page_fd: int
    page: mmap.mmap
    view: memoryview
    enabled: bool = False
    ranges: list[tuple[int, int]] = field(default_factory=list)
    ports: list[PortBinding] = field(default_factory=list)

    def claims(self, addr: int, size: int) -> bool:
        end = addr + size - 1
        return self.enabled and any(lo <= addr and end <= hi for lo, hi in self.ranges)


@dataclass
class GrantEntry:
    gfn: int
    grantee: int
    readonly: bool
    revoked: bool = False
    mapped: int = 0


class Vcpu:
    """A vCPU: a thread running guest work; it blocks in MMIO until the backend answers."""

    def __init__(self, guest: Guest, index: int) -> None:
        self.guest = guest
        self.index = index
        self.wake = threading.Event()
        self.work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"dom{guest.domid}-vcpu{index}",
                                       daemon=True)
        self.traps = 0
        self.thread.start()

    def _run(self) -> None:
        _current.vcpu = self
        while True:
            item = self.work.get()
            if item is None:
                return
            try:
                item()
            except GuestGone:
                return
            except Exception:  # a guest bug must not kill the simulated vCPU silently
                log.exception("sim.guest_code_failed", domid=self.guest.domid, vcpu=self.index)

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn`` on this vCPU and return its result (re-raising its exception)."""
        box: dict[str, Any] = {}
        done = threading.Event()

        def item() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:
                box["error"] = exc
            finally:
                done.set()

        self.work.put(item)
        if not done.wait(timeout):
            raise TimeoutError(f"vCPU {self.index} did not finish in {timeout} s")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Guest code waiting (like a sleeping task): interrupts keep being handled."""
        deadline = threading.Event()
        timer = threading.Timer(timeout, deadline.set)
        timer.start()
        try:
            while not predicate():
                if deadline.is_set():
                    return False
                if self.guest.dead:
                    raise GuestGone(f"dom{self.guest.domid} is gone")
                try:
                    item = self.work.get(timeout=0.005)
                except queue.Empty:
                    continue
                if item is None:
                    self.work.put(None)
                    raise GuestGone("vCPU stopping")
                item()
            return True
        finally:
            timer.cancel()


class _Current(threading.local):
    vcpu: Vcpu | None = None


_current = _Current()


def current_vcpu() -> Vcpu:
    if _current.vcpu is None:
        raise RuntimeError("guest code must run on a vCPU (Vcpu.call)")
    return _current.vcpu


class Guest:
    """A simulated domain."""

    def __init__(self, hv: Hypervisor, domid: int, memory_bytes: int, vcpus: int) -> None:
        self.hv = hv
        self.domid = domid
        self.ram_fd = os.memfd_create(f"dom{domid}-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, memory_bytes)
        self.ram = mmap.mmap(self.ram_fd, memory_bytes)
        self.ram_view = memoryview(self.ram)
        self.ram_base = GUEST_RAM_BASE
        self.ram_size = memory_bytes
        self.servers: dict[int, IoreqServer] = {}
        self.grants: dict[int, GrantEntry] = {}
        self.next_ref = 8  # refs 0-7 are reserved in Linux
        self.next_port = 1
        self.irq_handlers: dict[int, Callable[[], None]] = {}
        self.irqs_delivered = 0
        self.dead = False
        self.running = threading.Event()
        self.running.set()
        self.crash_reason: str | None = None
        self.invalidate_requested = threading.Event()
        self.vcpus = [Vcpu(self, i) for i in range(vcpus)]
        self.lock = threading.Lock()

    # -- guest-side operations (called from guest code) --------------------------------

    def mmio(self, addr: int, size: int, write: bool, value: int = 0) -> int:
        """The current vCPU accesses ``addr``: trap, forward, wait, resume."""
        return self.hv.trap(current_vcpu(), addr, size, write, value)

    def grant(self, gfns: list[int], grantee: int, readonly: bool) -> int:
        """Grant consecutive refs for ``gfns``; returns the first ref."""
        with self.lock:
            first = self.next_ref
            for i, gfn in enumerate(gfns):
                self.grants[first + i] = GrantEntry(gfn, grantee, readonly)
            self.next_ref += len(gfns)
            return first

    def end_access(self, ref: int) -> bool:
        """Revoke a grant; False if the backend still has it mapped (it stays revoked+leaked)."""
        with self.lock:
            entry = self.grants.get(ref)
            if entry is None:
                return True
            entry.revoked = True
            if entry.mapped:
                return False
            del self.grants[ref]
            return True

    def request_invalidate(self) -> None:
        """A p2m change: the next MMIO access of any vCPU first broadcasts INVALIDATE."""
        self.invalidate_requested.set()


class EvtchnHandle:
    """One libxenevtchn handle of a backend: ports, masks, and its event socket."""

    def __init__(self, hv: Hypervisor, domid: int, sock: socket.socket) -> None:
        self.hv = hv
        self.domid = domid
        self.sock = sock
        self.ports: dict[int, PortBinding] = {}
        self.masked: set[int] = set()
        self.pending: set[int] = set()
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.closed = False
        self.reader = threading.Thread(target=self._read, daemon=True,
                                       name=f"evtchn-dom{domid}")
        self.reader.start()

    def fire(self, port: int) -> None:
        with self.lock:
            if port not in self.ports or self.closed:
                return
            if port in self.masked:
                self.pending.add(port)
                return
            self.masked.add(port)
        self._send(port)

    def _send(self, port: int) -> None:
        with self.send_lock:
            try:
                self.sock.sendall(wire.PORT.pack(port))
            except OSError:
                self.closed = True

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                self.hv.drop_evtchn(self)
                return
            buffer += data
            while len(buffer) >= wire.EVENT.size:
                op, port = wire.EVENT.unpack_from(buffer)
                buffer = buffer[wire.EVENT.size :]
                if op == wire.EVENT_UNMASK:
                    self._unmask(port)
                elif op == wire.EVENT_NOTIFY:
                    binding = self.ports.get(port)
                    if binding is not None and binding.on_notify is not None:
                        binding.on_notify()

    def _unmask(self, port: int) -> None:
        with self.lock:
            self.masked.discard(port)
            refire = port in self.pending
            self.pending.discard(port)
            if refire:
                self.masked.add(port)
        if refire:
            self._send(port)


class Hypervisor:
    """Guests plus the backend-facing control socket."""

    def __init__(self) -> None:
        self.guests: dict[int, Guest] = {}
        self.lock = threading.RLock()
        self.handles: list[EvtchnHandle] = []
        self.listener: socket.socket | None = None
        self.on_domain_died: Callable[[int], None] | None = None
        self._next_local_port = 1

    # -- domains ---------------------------------------------------------------------

    def create_guest(self, domid: int, memory_bytes: int = 64 << 20, vcpus: int = 1) -> Guest:
        with self.lock:
            if domid in self.guests:
                raise ValueError(f"domain {domid} exists")
            guest = Guest(self, domid, memory_bytes, vcpus)
            self.guests[domid] = guest
            return guest

    def pause_guest(self, domid: int) -> None:
        """``xc_domain_pause``: vCPUs stop at their next access (libxl pauses before
        tearing a domain's devices down)."""
        guest = self.guests.get(domid)
        if guest is not None:
            guest.running.clear()

    def unpause_guest(self, domid: int) -> None:
        guest = self.guests.get(domid)
        if guest is not None:
            guest.running.set()

    def destroy_guest(self, domid: int, reason: str = "destroyed") -> None:
        with self.lock:
            guest = self.guests.pop(domid, None)
        if guest is None:
            return
        guest.dead = True
        guest.running.set()
        guest.crash_reason = guest.crash_reason or reason
        for vcpu in guest.vcpus:
            vcpu.wake.set()
            vcpu.work.put(None)
        for server in guest.servers.values():
            for binding in server.ports:
                if binding.handle is not None:
                    binding.handle.ports.pop(binding.local_port, None)
        log.info("sim.domain_destroyed", domid=domid, reason=guest.crash_reason)
        if self.on_domain_died is not None:
            self.on_domain_died(domid)

    def crash_guest(self, guest: Guest, reason: str) -> None:
        guest.crash_reason = reason
        log.error("sim.domain_crash", domid=guest.domid, reason=reason)
        self.destroy_guest(guest.domid, reason)

    def guest(self, domid: int) -> Guest:
        guest = self.guests.get(domid)
        if guest is None:
            raise _err(errno.ESRCH, f"no domain {domid}")
        return guest

    # -- the trap path (vCPU threads) -------------------------------------------------------

    def trap(self, vcpu: Vcpu, addr: int, size: int, write: bool, value: int) -> int:
        guest = vcpu.guest
        while not guest.running.wait(0.05):  # paused: the vCPU does not run
            if guest.dead:
                break
        if guest.dead:
            raise GuestGone(f"dom{guest.domid} is gone")
        if guest.invalidate_requested.is_set():
            guest.invalidate_requested.clear()
            self._broadcast_invalidate(vcpu)
        vcpu.traps += 1
        with self.lock:
            server = next((s for s in guest.servers.values() if s.claims(addr, size)), None)
        if server is None:
            raise DataAbort(f"dom{guest.domid}: unclaimed access to {addr:#x}")
        mask = (1 << (8 * size)) - 1
        req = abi.Ioreq(addr, value & mask if write else 0, 1, size, 0, 0, False,
                        abi.IOREQ_WRITE if write else abi.IOREQ_READ, False,
                        abi.IOREQ_TYPE_COPY)
        data = self._round_trip(vcpu, server, req)
        return data & mask if not write else 0

    def _round_trip(self, vcpu: Vcpu, server: IoreqServer, req: abi.Ioreq) -> int:
        page, index = server.view, vcpu.index
        abi.encode(page, index, req)
        vcpu.wake.clear()
        abi.set_state(page, index, abi.STATE_IOREQ_READY)
        self._fire_guest_port(server.ports[index])
        guest = vcpu.guest
        while True:
            vcpu.wake.wait()
            vcpu.wake.clear()
            if guest.dead:
                raise GuestGone(f"dom{guest.domid} is gone")
            state = abi.state_of(page, index)
            if state == abi.STATE_IORESP_READY:
                data = abi.decode(page, index).data
                abi.set_state(page, index, abi.STATE_IOREQ_NONE)
                return data
            if state in (abi.STATE_IOREQ_READY, abi.STATE_IOREQ_INPROCESS):
                continue  # a notification before the answer: keep waiting
            self.crash_guest(guest, f"ioreq state went from READY to {state} on vCPU {index}")
            raise GuestGone(guest.crash_reason)

    def _broadcast_invalidate(self, vcpu: Vcpu) -> None:
        with self.lock:
            servers = [s for s in vcpu.guest.servers.values() if s.enabled]
        req = abi.Ioreq(0, 0xFFFFFFFFFFFFFFFF, 1, 4, 0, 0, False, abi.IOREQ_WRITE, False,
                        abi.IOREQ_TYPE_INVALIDATE)
        for server in servers:
            self._round_trip(vcpu, server, req)

    def _fire_guest_port(self, binding: PortBinding) -> None:
        if binding.handle is not None:
            binding.handle.fire(binding.local_port)

    # -- hypercalls (backend side) ----------------------------------------------------------

    def _require_dm(self, caller: int, guest: Guest) -> None:
        if caller != PRIVILEGED_DOMID:
            raise _err(errno.EPERM, f"dom{caller} may not act as device model for dom{guest.domid}")

    def create_ioreq_server(self, caller: int, domid: int, bufioreq: int) -> IoreqServer:
        guest = self.guest(domid)
        self._require_dm(caller, guest)
        if bufioreq != abi.HVM_IOREQSRV_BUFIOREQ_OFF:
            raise _err(errno.EINVAL, "buffered ioreqs are not supported on Arm")
        with self.lock:
            if len(guest.servers) >= abi.MAX_IOREQ_SERVERS_PER_DOMAIN:
                raise _err(errno.ENOSPC, "8 ioreq servers already")
            server_id = next(i for i in range(abi.MAX_IOREQ_SERVERS_PER_DOMAIN)
                             if i not in guest.servers)
            fd = os.memfd_create(f"dom{domid}-ioreq{server_id}", os.MFD_CLOEXEC)
            os.ftruncate(fd, abi.PAGE_SIZE)
            page = mmap.mmap(fd, abi.PAGE_SIZE)
            server = IoreqServer(server_id, caller, fd, page, memoryview(page))
            server.ports = []
            for _vcpu in guest.vcpus:  # alloc_unbound_xen_event_channel per vCPU
                server.ports.append(PortBinding(guest, guest.next_port))
                guest.next_port += 1
            for i, binding in enumerate(server.ports):
                binding.on_notify = guest.vcpus[i].wake.set
            guest.servers[server_id] = server
            return server

    def server(self, caller: int, domid: int, server_id: int) -> tuple[Guest, IoreqServer]:
        guest = self.guest(domid)
        self._require_dm(caller, guest)
        server = guest.servers.get(server_id)
        if server is None:
            raise _err(errno.ENOENT, f"no ioreq server {server_id} for dom{domid}")
        return guest, server

    def set_server_state(self, caller: int, domid: int, server_id: int, enabled: bool) -> None:
        _guest, server = self.server(caller, domid, server_id)
        with self.lock:
            server.enabled = enabled
            for i, binding in enumerate(server.ports):
                offset = i * abi.IOREQ_SIZE + abi.OFF_VP_EPORT
                server.view[offset : offset + 4] = binding.remote_port.to_bytes(4, "little")

    def map_range(self, caller: int, domid: int, server_id: int, start: int, end: int,
                  add: bool) -> None:
        _guest, server = self.server(caller, domid, server_id)
        if end < start:
            raise _err(errno.EINVAL, "range end before start")
        with self.lock:
            if add:
                for other in _guest.servers.values():
                    if any(not (end < lo or start > hi) for lo, hi in other.ranges):
                        raise _err(errno.EEXIST, f"range {start:#x}-{end:#x} already claimed")
                server.ranges.append((start, end))
            elif (start, end) in server.ranges:
                server.ranges.remove((start, end))
            else:
                raise _err(errno.ENOENT, "no such range")

    def destroy_server(self, caller: int, domid: int, server_id: int) -> None:
        guest, server = self.server(caller, domid, server_id)
        with self.lock:
            del guest.servers[server_id]
            server.enabled = False
            server.ranges.clear()
            for binding in server.ports:
                if binding.handle is not None:
                    binding.handle.ports.pop(binding.local_port, None)
        server.view.release()
        server.page.close()
        os.close(server.page_fd)

    def set_irq_level(self, caller: int, domid: int, irq: int, level: int) -> None:
        guest = self.guest(domid)
        self._require_dm(caller, guest)
        if not 32 <= irq < NR_SPIS or level not in (0, 1):
            raise _err(errno.EINVAL, f"irq {irq} level {level}")
        if level == 0:
            return  # edge-triggered: the falling edge is ignored
        handler = guest.irq_handlers.get(irq)
        guest.irqs_delivered += 1
        if handler is not None:
            guest.vcpus[0].work.put(handler)

    def bind_interdomain(self, handle: EvtchnHandle, domid: int, remote_port: int) -> int:
        guest = self.guest(domid)
        with self.lock:
            binding = next((b for s in guest.servers.values() for b in s.ports
                            if b.remote_port == remote_port), None)
            if binding is None or binding.handle is not None:
                raise _err(errno.EINVAL, f"port {remote_port} of dom{domid} cannot be bound")
            if handle.domid != PRIVILEGED_DOMID:
                raise _err(errno.EPERM, "port is for the emulating domain only")
            local = self._next_local_port
            self._next_local_port += 1
            binding.handle, binding.local_port = handle, local
            handle.ports[local] = binding
        handle.fire(local)  # Xen leaves a newly bound port pending once
        return local

    def unbind(self, handle: EvtchnHandle, port: int) -> None:
        with self.lock:
            binding = handle.ports.pop(port, None)
            if binding is None:
                raise _err(errno.ENOENT, f"port {port} is not bound")
            binding.handle = None

    def drop_evtchn(self, handle: EvtchnHandle) -> None:
        with self.lock:
            handle.closed = True
            for port in list(handle.ports):
                handle.ports.pop(port).handle = None

    def foreign_ram(self, caller: int, domid: int) -> Guest:
        guest = self.guest(domid)
        if caller != PRIVILEGED_DOMID:
            raise _err(errno.EPERM, f"dom{caller} may not map dom{domid}'s memory")
        return guest

    def map_grants(self, caller: int, domid: int, refs: list[int], writable: bool) -> list[int]:
        guest = self.guest(domid)
        with guest.lock:
            entries = []
            for ref in refs:
                entry = guest.grants.get(ref)
                if entry is None or entry.revoked:
                    raise _err(errno.EINVAL, f"grant ref {ref} of dom{domid} is not valid")
                if entry.grantee != caller:
                    raise _err(errno.EPERM, f"grant ref {ref} is not granted to dom{caller}")
                if writable and entry.readonly:
                    raise _err(errno.EPERM, f"grant ref {ref} is read-only")
                entries.append(entry)
            for entry in entries:
                entry.mapped += 1
            return [entry.gfn for entry in entries]

    def unmap_grants(self, domid: int, refs: list[int]) -> None:
        guest = self.guests.get(domid)
        if guest is None:
            return
        with guest.lock:
            for ref in refs:
                entry = guest.grants.get(ref)
                if entry is not None and entry.mapped:
                    entry.mapped -= 1

    # -- the control socket ----------------------------------------------------------------

    def serve(self, path: str) -> None:
        """Listen on ``path`` in a background thread."""
        if os.path.exists(path):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        threading.Thread(target=self._accept, daemon=True, name="hypervisor-accept").start()

    def close(self) -> None:
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
        for domid in list(self.guests):
            self.destroy_guest(domid, "hypervisor stopped")

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True,
                             name="hypervisor-conn").start()

    def _serve_connection(self, conn: socket.socket) -> None:
        from virtio_diskd.ioreq.sim.hypercalls import Session

        session = Session(self, conn)
        try:
            session.run()
        finally:
            session.close()
