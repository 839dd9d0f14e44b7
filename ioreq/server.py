"""One IOREQ server per guest, serving every virtio-mmio window of that guest.

Set-up, in the order the C probe used on real Xen (xen-qemu-arm64/ioreq-stub.c):
``nr_vcpus`` → create the server (buffered ioreqs off) → map the ioreq page
(``map_resource``, frame 1) → enable (Xen fills ``vp_eport``) → bind one event
channel per vCPU → claim each device window (end inclusive).  Teardown runs in
exact reverse on every path, including a failure half-way through set-up.

Adaptive polling (``poll_us``, as QEMU's ``poll-max-ns``): waking a sleeping
process costs tens of µs of CPU and latency (measured by ``bench``: ≈60–80 µs
per cross-CPU eventfd round trip in a 2-vCPU VM), more than a trapped access
costs to serve.  So after serving, the server keeps polling the ioreq page
itself — a vCPU slot turning READY is the request, the event is only its
wake-up — for a window that doubles while polling finds work and halves when
it does not, up to ``poll_us``; 0 turns it off.  Each access (register address
and direction) has its own window (:class:`~virtio_diskd.ioreq.polling.PollWindows`):
what follows an InterruptStatus read comes at once, what follows the ACK of a
large batch does not.  Trio tasks (queue work, completions) run between polls.

Serving: without polling, the event-channel fd is served at trio's idle point
(:mod:`~virtio_diskd.ioreq.idle_serving`: no task wake-up per trap); with it, the
server's task waits on the fd through trio.  Either way, for each pending port:
unmask, then handle that vCPU's slot if it is READY (the first event after
binding is spurious: Xen leaves new ports pending).  COPY reads and writes of
1/2/4/8 bytes go to the window's register file; INVALIDATE drops cached guest
mappings; anything else is answered (reads as all-ones) and logged.  A
QueueNotify is answered at once — the device does the queue work afterwards —
so a vCPU never waits on disk I/O.

Memory ordering (the slot is shared with Xen on another CPU): after reading
``state == READY`` a barrier (acquire) comes before the other fields are read;
``data`` is stored, then a barrier (release), then ``state = IORESP_READY``,
then a barrier before ``notify``.  On Arm a plain store sequence could make
the new state visible before the data; Xen would then resume the vCPU with a
stale value.  ``vp_eport`` is never written.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog
import trio

from virtio_diskd.ioreq import idle_serving
from virtio_diskd.ioreq.polling import PollWindows, poll_for
from virtio_diskd.ioreq.xen import abi
from virtio_diskd.ioreq.xen.interface import (
    PROT_READ,
    PROT_WRITE,
    DeviceModel,
    EventChannels,
    ForeignMemory,
    Mapping,
    XenError,
    XenPlatform,
)

log = structlog.get_logger("virtio_diskd.ioreq")

ALL_ONES = 0xFFFFFFFFFFFFFFFF
#: a written value's bits for each access size
_SIZE_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}


@dataclass(frozen=True, slots=True)
class HoldAnswer:
    """A written register's answer waits: the vCPU is resumed only after ``until``
    returns.  Only a device reset asks for it (its in-flight I/O drains first, so no
    guest buffer is written after the guest saw the reset); every other access is
    answered at once."""

    until: Callable[[], Awaitable[None]]


class MmioWindow(Protocol):
    """A device's register window as the server dispatches to it."""

    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> HoldAnswer | None:
        """Apply a write; a :class:`HoldAnswer` delays the vCPU's answer."""
        ...

    def after_answer(self) -> None:
        """The work a write left for after the vCPU was answered (a QueueNotify's
        requests), done here in the same call chain: no task switch on the way from
        the guest's kick to the disk."""
        ...


@dataclass
class _Window:
    base: int
    size: int
    device: MmioWindow
    name: str


@dataclass
class ServerStats:
    traps: int = 0
    polled: int = 0  # traps found by polling the ioreq page, before their event
    poll_misses: int = 0  # polls that ran their whole window and found no trap
    reads: int = 0
    writes: int = 0
    invalidates: int = 0
    spurious: int = 0
    unhandled: int = 0


class IoreqServer:
    """The guest's IOREQ server; use as ``async with IoreqServer(...) as server``."""

    POLL_MIN_US = 4.0
    #: A sleep this much longer than the window still counts as short: a wake-up
    #: itself costs tens of µs in a VM, so measured sleeps include it.
    WAKE_SLACK_US = 150.0

    def __init__(self, platform: XenPlatform, domid: int, *,
                 on_invalidate: Callable[[], None] | None = None,
                 poll_us: float = 0.0) -> None:
        self.platform = platform
        self.poll_max = max(0.0, poll_us) / 1e6
        self.poll_windows = PollWindows(self.poll_max, self.POLL_MIN_US / 1e6,
                                        self.WAKE_SLACK_US / 1e6)
        #: the last trap served, as address * 2 + direction: the key of its poll window
        self._last_access = -1
        self.domid = domid
        self.on_invalidate = on_invalidate
        self.windows: list[_Window] = []
        #: devices written to in the current round (an ordered set), for after_answer
        self._written: dict[MmioWindow, None] = {}
        self.stats = ServerStats()
        self.log = log.bind(domid=domid)
        self._stack = contextlib.ExitStack()
        self.dm: DeviceModel
        self.fmem: ForeignMemory
        self.evtchn: EventChannels
        self.server_id = -1
        self.page_mapping: Mapping
        self.page: memoryview
        self.ports: list[int] = []
        self._vcpu_of_port: dict[int, int] = {}
        self._barrier = platform.barrier
        self._nursery: trio.Nursery | None = None
        self.adopted = False
        self.detached = False

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, adopt: int | None = None) -> None:
        """Create, map, enable and bind (synchronous: a handful of hypercalls).

        With ``adopt``, take over that server, which a killed predecessor left in Xen
        with its MMIO claims (issue #15): map its page again and bind new event
        channels to the guest-side ports it still has.  If Xen no longer has it, a new
        one is created (its claims are then made again by :meth:`adopt_window`).
        """
        stack = self._stack
        self.detached = False
        try:
            self.dm = self.platform.devicemodel()
            stack.callback(self.dm.close)
            self.fmem = self.platform.foreignmemory()
            stack.callback(self.fmem.close)
            self.evtchn = self.platform.evtchn()
            stack.callback(self.evtchn.close)
            nr_vcpus = self.dm.nr_vcpus(self.domid)
            if not 1 <= nr_vcpus <= abi.MAX_VCPUS_PER_PAGE:
                raise ValueError(f"dom{self.domid} reports {nr_vcpus} vCPUs")
            self.adopted = False
            if adopt is not None:
                try:
                    self.page_mapping = self._map_page(adopt)
                    self.server_id, self.adopted = adopt, True
                except XenError as exc:
                    self.log.warning("ioreq.server_not_adopted", server=adopt, error=str(exc))
            if not self.adopted:
                self.server_id = self.dm.create_ioreq_server(self.domid,
                                                             abi.HVM_IOREQSRV_BUFIOREQ_OFF)
            stack.callback(self._unless_detached, self.dm.destroy_ioreq_server, self.domid,
                           self.server_id)
            if not self.adopted:
                self.page_mapping = self._map_page(self.server_id)
            stack.callback(self.page_mapping.unmap)
            self.page = self.page_mapping.view
            stack.callback(self.page.release)
            self.dm.set_ioreq_server_state(self.domid, self.server_id, True)
            stack.callback(self._unless_detached, self.dm.set_ioreq_server_state, self.domid,
                           self.server_id, False)
            for vcpu in range(nr_vcpus):
                port = self.evtchn.bind_interdomain(self.domid, abi.vp_eport(self.page, vcpu))
                stack.callback(self.evtchn.unbind, port)
                self.ports.append(port)
                self._vcpu_of_port[port] = vcpu
        except BaseException:
            self.close()
            raise
        self.log.info("ioreq.server_adopted" if self.adopted else "ioreq.server_ready",
                      server=self.server_id, vcpus=nr_vcpus, ports=self.ports)

    def _map_page(self, server: int) -> Mapping:
        return self.fmem.map_resource(
            self.domid, abi.XENMEM_RESOURCE_IOREQ_SERVER, server,
            abi.XENMEM_RESOURCE_IOREQ_SERVER_FRAME_IOREQ0, 1, PROT_READ | PROT_WRITE)

    def _unless_detached(self, teardown: Callable[..., None], *args: object) -> None:
        if not self.detached:
            teardown(*args)

    def detach(self) -> None:
        """Close our handles and leave the server, its claims and its ports to a
        successor (a daemon restart keeps the guest's devices: issue #15)."""
        self.detached = True
        self.close()

    def close(self) -> None:
        """Tear down in reverse order; every step is attempted even if one fails (after
        :meth:`detach`, only what belongs to this process)."""
        stack, self._stack = self._stack, contextlib.ExitStack()
        try:
            stack.close()
        except XenError as exc:
            if exc.errno == errno.ESRCH:  # the guest is already gone, and its server with it
                self.log.info("ioreq.guest_gone_before_teardown")
            else:
                self.log.warning("ioreq.teardown_incomplete", error=str(exc))
        except Exception:
            self.log.exception("ioreq.teardown_error")
        self.windows.clear()
        self.ports.clear()
        self._vcpu_of_port.clear()

    def add_window(self, base: int, size: int, device: MmioWindow, name: str) -> None:
        end = base + size - 1
        self.dm.map_io_range_to_ioreq_server(self.domid, self.server_id, True, base, end)
        self.windows.append(_Window(base, size, device, name))
        self._stack.callback(self._unless_detached, self._remove_window_quietly, base, size)

    def adopt_window(self, base: int, size: int, device: MmioWindow, name: str) -> None:
        """A window the adopted server already claims (claimed again if the server is new)."""
        if not self.adopted:
            self.add_window(base, size, device, name)
            return
        self.windows.append(_Window(base, size, device, name))
        self._stack.callback(self._unless_detached, self._remove_window_quietly, base, size)

    def remove_window(self, base: int) -> None:
        for window in list(self.windows):
            if window.base == base:
                self.windows.remove(window)
                self.dm.unmap_io_range_from_ioreq_server(self.domid, self.server_id, True,
                                                         base, base + window.size - 1)

    def _remove_window_quietly(self, base: int, size: int) -> None:
        if any(w.base == base for w in self.windows):
            self.remove_window(base)

    # -- serving -------------------------------------------------------------------------

    async def serve(self) -> None:
        """Answer traps until cancelled."""
        fd = self.evtchn.fd()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.adopted:
                self._serve_left_over()
            if not self.poll_max and idle_serving.available():
                await idle_serving.IdleServing.of_this_run().serve(fd, self._drain_events)
                return
            windows = self.poll_windows
            while True:
                after = self._last_access
                if windows.window(after) and await self._poll(after):
                    continue
                slept_from = time.perf_counter()
                await trio.lowlevel.wait_readable(fd)
                windows.slept(after, time.perf_counter() - slept_from)
                self._drain_events()

    def _drain_events(self) -> None:
        for port in self.evtchn.pending_ports():
            self.evtchn.unmask(port)
            vcpu = self._vcpu_of_port.get(port)
            if vcpu is None:
                self.stats.spurious += 1
                continue
            self.handle(vcpu, port)
        self._after_answers()

    def _after_answers(self) -> None:
        """Every vCPU of this round is answered: now the work their writes left."""
        while self._written:
            devices, self._written = self._written, {}
            for device in devices:
                device.after_answer()

    async def _poll(self, after: int) -> bool:
        """Poll the vCPU slots for up to the window of the access ``after``; True if a
        trap was served."""
        if await poll_for(self._serve_ready_slot, self.poll_windows.window(after)):
            self.poll_windows.found(after)
            return True
        self.stats.poll_misses += 1
        self.poll_windows.missed(after)
        return False

    def _serve_ready_slot(self) -> bool:
        """Serve the first vCPU slot that holds a request, if any (before its event)."""
        page = self.page
        for vcpu, port in enumerate(self.ports):
            if abi.state_of(page, vcpu) == abi.STATE_IOREQ_READY:
                self.stats.polled += 1
                self.handle(vcpu, port)
                self._after_answers()
                return True
        return False

    def _serve_left_over(self) -> None:
        """Accesses a killed predecessor took and never answered (INPROCESS), those
        made while no one served (READY), and answers it stored but never signalled
        (IORESP_READY): the vCPUs are waiting for them.

        Xen wakes a vCPU blocked on an access only when its port is notified, whatever
        the slot says; a predecessor killed between storing IORESP_READY and its
        notify would leave that vCPU, and a one-vCPU guest, asleep for good.  A notify
        the vCPU does not need is harmless: it re-checks the slot and sleeps again.
        """
        page = self.page
        for vcpu, port in enumerate(self.ports):
            state = abi.state_of(page, vcpu)
            if state == abi.STATE_IORESP_READY:
                self.log.info("ioreq.signalling_left_over_answer", vcpu=vcpu)
                self.evtchn.notify(port)
                continue
            if state == abi.STATE_IOREQ_INPROCESS:
                abi.set_state(page, vcpu, abi.STATE_IOREQ_READY)
                self.log.info("ioreq.answering_left_over", vcpu=vcpu)
                state = abi.STATE_IOREQ_READY
            if state == abi.STATE_IOREQ_READY:
                self.handle(vcpu, port)
        self._after_answers()

    def handle(self, vcpu: int, port: int) -> None:
        """Serve vCPU ``vcpu``'s slot if it holds a request."""
        page = self.page
        if abi.state_of(page, vcpu) != abi.STATE_IOREQ_READY:
            self.stats.spurious += 1
            return
        self._barrier()  # acquire: the fields after the state
        addr, data, count, size, bits, kind = abi.fields(page, vcpu)
        abi.set_state(page, vcpu, abi.STATE_IOREQ_INPROCESS)
        stats = self.stats
        stats.traps += 1
        direction = bits >> abi.BIT_DIR_SHIFT & 1
        self._last_access = addr * 2 + direction
        hold: HoldAnswer | None = None
        if (kind == abi.IOREQ_TYPE_COPY and count == 1 and not bits & abi.BIT_DATA_IS_PTR
                and size in (1, 2, 4, 8)):
            hold = self._dispatch(page, vcpu, addr, size, data, direction == abi.IOREQ_READ)
        elif kind == abi.IOREQ_TYPE_INVALIDATE:
            stats.invalidates += 1
            if self.on_invalidate is not None:
                self.on_invalidate()
        else:
            stats.unhandled += 1
            req = abi.decode(page, vcpu)
            self.log.warning("ioreq.unhandled", type=req.type, addr=hex(req.addr),
                             size=req.size, count=req.count, data_is_ptr=req.data_is_ptr)
            if req.is_read:
                abi.set_data(page, vcpu, ALL_ONES)
        if hold is not None and self._nursery is not None:
            self._nursery.start_soon(self._answer_later, vcpu, port, hold)
            return
        self._answer(vcpu, port)

    def _dispatch(self, page: memoryview, vcpu: int, addr: int, size: int, data: int,
                  is_read: bool) -> HoldAnswer | None:
        for window in self.windows:
            offset = addr - window.base
            if offset >= 0 and offset + size <= window.size:
                if is_read:
                    self.stats.reads += 1
                    abi.set_data(page, vcpu, window.device.mmio_read(offset, size))
                    return None
                self.stats.writes += 1
                self._written[window.device] = None
                return window.device.mmio_write(offset, size, data & _SIZE_MASK[size])
        self.stats.unhandled += 1
        self.log.warning("ioreq.outside_windows", addr=hex(addr), size=size)
        if is_read:
            abi.set_data(page, vcpu, ALL_ONES)
        return None

    def _answer(self, vcpu: int, port: int) -> None:
        self._barrier()  # release: data before the state
        abi.set_state(self.page, vcpu, abi.STATE_IORESP_READY)
        self._barrier()
        self.evtchn.notify(port)

    async def _answer_later(self, vcpu: int, port: int, hold: HoldAnswer) -> None:
        try:
            await hold.until()
        finally:
            self._answer(vcpu, port)

    def __enter__(self) -> IoreqServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
