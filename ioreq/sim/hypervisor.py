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
  notifies; the vCPU blocks until the server notifies that port (IORESP_READY
  stored without a notify leaves it blocked, as on Xen); a state going backwards (or
  an unknown state) crashes the guest; INVALIDATE is broadcast synchronously
  to every enabled server and must be answered; an access no server claims
  entirely is a data abort in the guest;
* event channels with libxenevtchn's semantics: ``bind_interdomain`` returns a
  local port (and leaves it pending once, as Xen does); a fired port stays
  masked until unmasked; notify wakes the vCPU.  As on Xen, an event is a bit
  in shared memory plus a wake-up, not a message: each handle shares a page of
  per-port event counters (written here only) and an eventfd (its ``fd()``),
  and each bound port comes with the eventfd that wakes its vCPU directly, so
  a trap round trip costs two eventfd writes and no thread in between;
* privileges: device-model operations and foreign mapping of guest RAM only
  for the privileged domain (dom0); grant maps honour read-only grants, fail
  on revoked ones, and a grant revoked while mapped is reported as still in
  use (the guest then marks the device broken, as Linux does);
* interrupts: ``set_irq_level`` on SPIs only (32 ≤ irq < 32 + nr_spis); level 1
  injects one edge, level 0 is ignored (the old vGIC).  Edges are counters in a
  page shared with the backend, taken by vCPU 0 whenever it runs or idles.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import queue
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

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
    notify_fd: int = -1  # what the backend's notify writes to: the vCPU's ioreq eventfd


@dataclass(eq=False)
class ServerRegistration:
    """Xen's record of one IOREQ server: its emulator, page, claimed ranges, ports."""

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


def _sleep_on(poller: select.poll, eventfd: int, timeout_ms: int | None) -> None:
    """Sleep (without the GIL) until ``eventfd`` is set or the timeout, and consume
    the wake-up."""
    poller.poll(timeout_ms)
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(eventfd)


class Vcpu:
    """A vCPU: a thread running guest work; it blocks in MMIO until the backend answers.

    It sleeps on one eventfd (``wake_fd``) whatever it waits for — an ioreq
    answer, an interrupt, queued work — and re-checks every source after each
    wake-up, so one kind of wake-up never hides another.  ``Hypervisor.spin_us``
    makes it poll shared memory for that long before sleeping: a real vCPU is
    resumed by Xen in microseconds, a sleeping thread woken across CPUs in a
    virtual machine costs tens (measured by ``bench``).
    """

    def __init__(self, guest: Guest, index: int) -> None:
        self.guest = guest
        self.index = index
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        weakref.finalize(self, os.close, self.wake_fd)
        self._poller = select.poll()
        self._poller.register(self.wake_fd, select.POLLIN)
        #: what wakes the vCPU while it is blocked in Xen on an access (Xen's
        #: ``wait_on_xen_event_channel``): only its servers' notify, or the domain's
        #: death; an interrupt or guest work does not, and an answer stored without a
        #: notify is never seen
        self.ioreq_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        weakref.finalize(self, os.close, self.ioreq_fd)
        self._ioreq_poller = select.poll()
        self._ioreq_poller.register(self.ioreq_fd, select.POLLIN)
        self.work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"dom{guest.domid}-vcpu{index}",
                                       daemon=True)
        self.traps = 0
        #: seconds this vCPU spent waiting for a backend: each trapped access from its
        #: notification to the answer, and each wait for an interrupt or work (what is
        #: left of a request's latency is the guest's own code)
        self.waited_s = 0.0
        self.thread.start()

    def post(self, item: Callable[[], None] | None) -> None:
        """Queue guest work (``None`` stops the vCPU) and wake the vCPU."""
        self.work.put(item)
        os.eventfd_write(self.wake_fd, 1)

    def sleep(self, timeout: float | None) -> None:
        """Sleep until woken (or ``timeout`` seconds), first spinning if configured."""
        spin = self.guest.hv.spin_us
        clock = time.perf_counter
        started = clock()
        if spin:
            until = started + spin / 1e6
            while (now := clock()) < until:
                if not self.work.empty() or self.guest.irq_pending():
                    self.waited_s += now - started
                    return
        self.block(None if timeout is None else max(0, int(timeout * 1000)) or 1)
        self.waited_s += clock() - started

    def block_in_xen(self) -> None:
        """Sleep until a server notifies this vCPU's port or the domain dies; the
        caller re-checks the slot."""
        _sleep_on(self._ioreq_poller, self.ioreq_fd, None)

    def block(self, timeout_ms: int | None) -> None:
        """Sleep on ``wake_fd`` until a wake-up or the timeout; callers re-check
        whatever they wait for."""
        _sleep_on(self._poller, self.wake_fd, timeout_ms)

    def _next(self, timeout: float | None) -> tuple[bool, Callable[[], None] | None]:
        """Deliver interrupts (vCPU 0), then return ``(True, work)`` or ``(False, None)``
        — the latter at once if a handler ran, so that a waiter re-checks what it waits
        for before it sleeps."""
        if self.index == 0:
            delivered = self.guest.irqs_delivered
            self.guest.deliver_irqs()
            if self.guest.irqs_delivered != delivered and self.work.empty():
                return False, None
        try:
            return True, self.work.get_nowait()
        except queue.Empty:
            pass
        self.sleep(timeout)
        if self.index == 0:
            self.guest.deliver_irqs()
        try:
            return True, self.work.get_nowait()
        except queue.Empty:
            return False, None

    def _run(self) -> None:
        _current.vcpu = self
        while True:
            try:
                got, item = self._next(None)
            except GuestGone:  # destroyed while an interrupt handler touched a device
                return
            except Exception:  # an interrupt handler's fault (a device gone under it)
                log.exception("sim.guest_irq_handler_failed", domid=self.guest.domid,
                              vcpu=self.index)
                continue
            if not got:
                continue
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

        self.post(item)
        if not done.wait(timeout):
            raise TimeoutError(f"vCPU {self.index} did not finish in {timeout} s")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Guest code waiting (like a sleeping task): interrupts keep being handled."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.guest.dead:
                raise GuestGone(f"dom{self.guest.domid} is gone")
            got, item = self._next(min(left, 0.05))
            if not got:
                continue
            if item is None:
                self.post(None)
                raise GuestGone("vCPU stopping")
            item()
        return True


class _Current(threading.local):
    vcpu: Vcpu | None = None


_current = _Current()


def current_vcpu_or_none() -> Vcpu | None:
    """The vCPU running the calling thread, if it is one."""
    return _current.vcpu


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
        self.servers: dict[int, ServerRegistration] = {}
        self.grants: dict[int, GrantEntry] = {}
        self.next_ref = 8  # refs 0-7 are reserved in Linux
        self.next_port = 1
        self.irq_handlers: dict[int, Callable[[], None]] = {}
        self.irqs_delivered = 0
        self._doorbells: list[IrqDoorbell] = []
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

    # -- interrupts ---------------------------------------------------------------------

    def irq_doorbell(self) -> IrqDoorbell:
        """A backend's interrupt lines into this guest (one page per device-model handle)."""
        with self.lock:
            bell = IrqDoorbell(self.domid)
            self._doorbells = [*self._doorbells, bell]
            return bell

    def close_doorbells(self) -> None:
        """The guest is gone: tell each backend, which then re-opens by domid."""
        for bell in self._doorbells:
            bell.counters[NR_SPIS] = 0

    def irq_pending(self) -> bool:
        return any(bell.counters[0] != bell.seen[0] for bell in self._doorbells)

    def deliver_irqs(self) -> None:
        """Run the handler of every SPI that got an edge (vCPU 0; edges not yet taken
        coalesce, as a pending edge-triggered SPI does in the GIC)."""
        for bell in self._doorbells:
            counters, seen = bell.counters, bell.seen
            total = counters[0]
            if total == seen[0]:
                continue
            self.irqs_delivered += (total - seen[0]) & 0xFFFFFFFF
            # one copy of the lines (edges on lines without a handler are taken too, and
            # dropped), then the handlers of the lines that moved, in line order
            now = counters[:NR_SPIS].tolist()
            now[0] = total  # edges after ``total`` was read are counted next time
            bell.seen = now
            for irq, handler in sorted(self.irq_handlers.items()):
                if 32 <= irq < NR_SPIS and now[irq] != seen[irq]:
                    handler()


class IrqDoorbell:
    """Interrupt lines shared with one backend: a u32 edge counter per SPI (index 0
    counts all edges) that the backend bumps, plus vCPU 0's wake eventfd.  The last
    word is 1 while the guest lives, so a backend notices a domid that was reused."""

    WORDS = NR_SPIS + 1

    def __init__(self, domid: int) -> None:
        self.fd = os.memfd_create(f"dom{domid}-irqs", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.WORDS * 4)
        self._page = mmap.mmap(self.fd, self.WORDS * 4)
        self.counters = memoryview(self._page).cast("I")
        self.counters[NR_SPIS] = 1
        self.seen = [0] * NR_SPIS
        weakref.finalize(self, os.close, self.fd)


class EvtchnHandle:
    """One libxenevtchn handle of a backend: its ports, event counters and eventfd.

    The backend's side (``SimEventChannels``) keeps the masks, as the evtchn
    driver of the backend's kernel does; this side only counts events per port
    in the shared page and kicks the eventfd, so firing never waits for the
    backend and never loses an event (a counter that moved is pending).
    """

    PORTS = 4096

    def __init__(self, hv: Hypervisor, domid: int) -> None:
        self.hv = hv
        self.domid = domid
        self.ports: dict[int, PortBinding] = {}
        self.allocated: set[int] = set()  # local ports until unbound, even if the guest died
        self.lock = threading.Lock()
        self.closed = False
        self.event_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.counters_fd = os.memfd_create(f"evtchn-dom{domid}", os.MFD_CLOEXEC)
        os.ftruncate(self.counters_fd, self.PORTS * 4)
        self._page = mmap.mmap(self.counters_fd, self.PORTS * 4)
        self.counters = memoryview(self._page).cast("I")

    def fire(self, port: int) -> None:
        with self.lock:
            if port not in self.ports or self.closed:
                return
            self.counters[port] = (self.counters[port] + 1) & 0xFFFFFFFF
        os.eventfd_write(self.event_fd, 1)

    def reset_counter(self, port: int) -> None:
        with self.lock:
            self.counters[port] = 0

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self.counters.release()
        self._page.close()
        os.close(self.counters_fd)
        os.close(self.event_fd)


class Hypervisor:
    """Guests plus the backend-facing control socket."""

    def __init__(self) -> None:
        self.spin_us = 0.0  # how long a vCPU polls before sleeping (see Vcpu)
        self.guests: dict[int, Guest] = {}
        self.lock = threading.RLock()
        self.listener: socket.socket | None = None
        self.on_domain_died: Callable[[int], None] | None = None
        self._local_ports: set[int] = set()  # the backend domain's port space
        #: driver domain -> the guest it may act on (set_target; kept, as Xen keeps the
        #: reference, until the driver domain itself goes)
        self.targets: dict[int, int] = {}

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
        guest.close_doorbells()
        for vcpu in guest.vcpus:
            vcpu.post(None)
            os.eventfd_write(vcpu.ioreq_fd, 1)  # out of a wait in Xen, into GuestGone
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

    def _round_trip(self, vcpu: Vcpu, server: ServerRegistration, req: abi.Ioreq) -> int:
        page, index = server.view, vcpu.index
        abi.encode(page, index, req)
        abi.set_state(page, index, abi.STATE_IOREQ_READY)
        self._fire_guest_port(server.ports[index])
        started = time.perf_counter()  # the vCPU waits for the backend from here
        guest = vcpu.guest
        spin = self.spin_us
        if spin:  # Xen resumes a vCPU within microseconds of the notify
            until = started + spin / 1e6
            while (abi.state_of(page, index) != abi.STATE_IORESP_READY
                   and time.perf_counter() < until):
                pass
        while True:
            if abi.state_of(page, index) in (abi.STATE_IOREQ_READY,
                                             abi.STATE_IOREQ_INPROCESS):
                vcpu.block_in_xen()
            if guest.dead:
                raise GuestGone(f"dom{guest.domid} is gone")
            state = abi.state_of(page, index)
            if state == abi.STATE_IORESP_READY:
                vcpu.waited_s += time.perf_counter() - started
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
        """XSM's dummy policy (``XSM_DM_PRIV``): the control domain, or a domain whose
        target is the guest (``XEN_DOMCTL_set_target``)."""
        if caller != PRIVILEGED_DOMID and self.targets.get(caller) != guest.domid:
            raise _err(errno.EPERM, f"dom{caller} may not act as device model for dom{guest.domid}")

    def set_target(self, caller: int, domid: int, target: int) -> None:
        """``XEN_DOMCTL_set_target``: from the control domain, once per domain."""
        if caller != PRIVILEGED_DOMID:
            raise _err(errno.EPERM, "set_target is a control-domain operation")
        self.guest(target)
        with self.lock:
            if domid in (target, PRIVILEGED_DOMID) or domid in self.targets:
                raise _err(errno.EINVAL, f"dom{domid} cannot take dom{target} as its target")
            self.targets[domid] = target

    def create_ioreq_server(self, caller: int, domid: int, bufioreq: int) -> ServerRegistration:
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
            server = ServerRegistration(server_id, caller, fd, page, memoryview(page))
            server.ports = []
            for _vcpu in guest.vcpus:  # alloc_unbound_xen_event_channel per vCPU
                server.ports.append(PortBinding(guest, guest.next_port))
                guest.next_port += 1
            for i, binding in enumerate(server.ports):
                binding.notify_fd = guest.vcpus[i].ioreq_fd
            guest.servers[server_id] = server
            return server

    def server(self, caller: int, domid: int, server_id: int) -> tuple[Guest, ServerRegistration]:
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

    def irq_doorbell(self, caller: int, domid: int) -> tuple[IrqDoorbell, int]:
        """The page a device model raises ``domid``'s SPIs through, and the eventfd
        that wakes the vCPU taking them (``set_irq_level`` in the backend)."""
        guest = self.guest(domid)
        self._require_dm(caller, guest)
        return guest.irq_doorbell(), guest.vcpus[0].wake_fd

    def bind_interdomain(self, handle: EvtchnHandle, domid: int,
                         remote_port: int) -> tuple[int, int]:
        """Bind; returns the local port and the eventfd its notify writes to."""
        guest = self.guest(domid)
        with self.lock:
            binding = next((b for s in guest.servers.values() for b in s.ports
                            if b.remote_port == remote_port), None)
            if binding is None or binding.handle is not None:
                raise _err(errno.EINVAL, f"port {remote_port} of dom{domid} cannot be bound")
            if handle.domid != PRIVILEGED_DOMID and self.targets.get(handle.domid) != domid:
                raise _err(errno.EPERM, "port is for the emulating domain only")
            local = next((p for p in range(1, EvtchnHandle.PORTS)
                          if p not in self._local_ports), None)
            if local is None:
                raise _err(errno.ENOSPC, "no free event channel port")
            self._local_ports.add(local)
            handle.allocated.add(local)
            handle.reset_counter(local)
            binding.handle, binding.local_port = handle, local
            handle.ports[local] = binding
        handle.fire(local)  # Xen leaves a newly bound port pending once
        return local, binding.notify_fd

    def unbind(self, handle: EvtchnHandle, port: int) -> None:
        """Close a local port; one whose guest is gone is still the backend's to close."""
        with self.lock:
            if port not in handle.allocated:
                raise _err(errno.ENOENT, f"port {port} is not bound")
            handle.allocated.discard(port)
            self._local_ports.discard(port)
            binding = handle.ports.pop(port, None)
            if binding is not None:
                binding.handle = None

    def drop_evtchn(self, handle: EvtchnHandle) -> None:
        with self.lock:
            for port in list(handle.ports):
                handle.ports.pop(port).handle = None
            self._local_ports.difference_update(handle.allocated)
            handle.allocated.clear()
        handle.close()

    def foreign_ram(self, caller: int, domid: int) -> Guest:
        guest = self.guest(domid)
        if caller != PRIVILEGED_DOMID and self.targets.get(caller) != domid:
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
