"""One virtio disk of a guest at run time: register file + queues + disk engine + SPI.

The sans-IO device model (:class:`~virtio_diskd.backend.blk.VirtioBlk`) is
driven from three places, all in the guest's trio thread:

* the IOREQ server calls :meth:`BlockDevice.mmio_read` / :meth:`mmio_write`
  while a vCPU waits: register state changes at once, but a QueueNotify only
  marks the queue — the vCPU is answered before any queue work or disk I/O;
* right after answering, in the same call chain, the server calls
  :meth:`after_answer`, which takes the marked queues' requests and hands them to
  the engine (cached reads complete inline, used ring and interrupt included): from
  the guest's kick to its interrupt there is no task switch and no await;
* :meth:`run`'s completion task waits on the engine's eventfd, completes batches
  (status byte, unmap, used ring) and picks up requests the guest queued meanwhile;
  without polling, the eventfd is served at trio's idle point instead
  (:mod:`~virtio_diskd.ioreq.idle_serving`), as the event channel is.

With ``poll_us`` the completion task, while requests are in the engine, polls
for their completions (between other trio tasks) for up to that long before
sleeping on the eventfd: a completion that is due soon costs no wake-up.

Interrupts: ``set_irq_level(irq, 1)`` once per batch that needs one (edge SPI);
InterruptStatus is kept by the device model.  A device reset first drains the
in-flight requests (so no guest buffer is written and no grant is held after
it), then the vCPU's Status write is answered.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import assert_never

import structlog
import trio

from virtio_diskd.backend import mmio
from virtio_diskd.backend.blk import BlkOptions, BlockRequest, VirtioBlk
from virtio_diskd.backend.disk.engine_api import BlockEngine
from virtio_diskd.backend.guestmem import GuestMemory
from virtio_diskd.ioreq import idle_serving
from virtio_diskd.ioreq.devstate import DeviceStateFile
from virtio_diskd.ioreq.polling import poll_for
from virtio_diskd.ioreq.server import HoldAnswer
from virtio_diskd.ioreq.xen.interface import DeviceModel

log = structlog.get_logger("virtio_diskd.device")

#: Registers a driver writes per request; they change nothing a successor needs
#: (InterruptStatus is re-raised on resume), so they are not recorded.
_PER_REQUEST_REGISTERS = frozenset({mmio.REG_QUEUE_NOTIFY, mmio.REG_INTERRUPT_ACK})

#: While a held answer waits for in-flight requests, say so this often.
STILL_WAITING_LOG_INTERVAL = 5.0
#: How often the target's size is checked for online resize (an fstat or one ioctl).
RESIZE_CHECK_INTERVAL = 1.0


@dataclass
class DeviceHooks:
    """What the daemon wants to hear from a device (XenBus transitions, logging)."""

    driver_ok: Callable[[], None] = lambda: None
    reset: Callable[[], None] = lambda: None
    needs_reset: Callable[[str], None] = lambda reason: None


@dataclass
class DeviceCounters:
    irqs: int = 0
    resets: int = 0
    kicks: int = 0
    failures: int = 0  # internal errors contained to this device


class BlockDevice:
    """A running virtio-blk device (see the module docstring)."""

    def __init__(self, *, domid: int, devid: int, name: str, irq: int, memory: GuestMemory,
                 engine: BlockEngine[BlockRequest], dm: DeviceModel, options: BlkOptions,
                 legacy: bool = False, discard_enable: bool = True,
                 hooks: DeviceHooks | None = None, poll_us: float = 0.0,
                 state: DeviceStateFile | None = None) -> None:
        self.domid = domid
        self.poll_s = max(0.0, poll_us) / 1e6
        self.devid = devid
        self.name = name
        self.irq = irq
        self.memory = memory
        self.engine = engine
        self.dm = dm
        self.hooks = hooks or DeviceHooks()
        self.blk = VirtioBlk(engine.target.info(discard_enable=discard_enable), memory, options,
                             legacy=legacy)
        self.counters = DeviceCounters()
        self.log = log.bind(domid=domid, devid=devid, vdev=name)
        self._notified: set[int] = set()
        # completion batches wake whoever waits for in-flight requests to go
        self._completed = trio.lowlevel.ParkingLot()
        self._serving = False
        self._finished: list[BlockRequest] = []
        self.closed = False
        #: where the register file and in-flight logs outlive this process (issue #15)
        self.state = state
        if state is not None:
            self.blk.transport.inflight_log = state.log

    # -- the register window (called by the IOREQ server) ---------------------------------

    def mmio_read(self, offset: int, size: int) -> int:
        return self.blk.mmio_read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> HoldAnswer | None:
        effects = self.blk.mmio_write(offset, size, value)
        hold = self._apply(effects) if effects else None
        if offset not in _PER_REQUEST_REGISTERS:
            self.save_state()  # before the vCPU is answered: a successor sees the write
        return hold

    def save_state(self) -> None:
        """Record the register file for a successor (cheap when nothing changed)."""
        if self.state is not None:
            try:
                self.state.save(self.blk.transport.snapshot())
            except (OSError, ValueError) as exc:
                self.log.error("device.state_not_saved", error=str(exc))  # noqa: TRY400

    def resume(self, record: dict[str, object]) -> None:
        """Carry on from a killed predecessor's record and in-flight logs: the requests
        it had taken are executed again, each queue is looked at for what arrived
        meanwhile, and one interrupt covers what it published without signalling."""
        batch = self.blk.resume(record)
        self.log.info("device.resumed", status=self.blk.transport.status,
                      features=hex(self.blk.transport.negotiated),
                      requests_again=len(batch.requests))
        self._apply(batch.effects)
        self._submit(batch.requests)
        self._complete_inline()
        self._look_at_every_queue()  # if not serving yet, run() looks at them first
        self.save_state()

    def _apply(self, effects: list[mmio.MmioEffect]) -> HoldAnswer | None:
        """Perform the register file's effects; every kind is handled here."""
        hold = None
        for effect in effects:
            match effect:
                case mmio.QueueNotified(queue):
                    self.counters.kicks += 1
                    self._notified.add(queue)
                case mmio.RaiseInterrupt():
                    self._raise_irq()
                case mmio.DriverOk():
                    self.log.info("device.driver_ok",
                                  features=hex(self.blk.transport.negotiated))
                    self.hooks.driver_ok()
                case mmio.DeviceReset():
                    self.counters.resets += 1
                    self._notified.clear()
                    self.log.info("device.reset", in_flight=self.blk.pending())
                    self.hooks.reset()
                    hold = HoldAnswer(self._drain_after_reset)
                case mmio.NeedsReset(reason):
                    self.log.error("device.needs_reset", reason=reason)
                    self.hooks.needs_reset(reason)
                case mmio.QueueDisabled(queue):
                    self._notified.discard(queue)
                    if hold is None and self.blk.pending(queue):
                        hold = HoldAnswer(functools.partial(self._drain_queue, queue))
                case mmio.ConfigWritten(offset):
                    # the device model applied it (writeback mode); nothing to do outside
                    self.log.debug("device.config_written", offset=offset)
                case _:
                    assert_never(effect)
        return hold

    def _raise_irq(self) -> None:
        self.counters.irqs += 1
        try:
            self.dm.set_irq_level(self.domid, self.irq, 1)
        except OSError as exc:
            self.log.error("device.irq_failed", irq=self.irq, error=str(exc))  # noqa: TRY400

    async def _drain_after_reset(self) -> None:
        """Hold the Status write's answer until no request of the old rings is in flight:
        once the guest sees the reset, none of its buffers is written again.  The
        requests were cancelled, so this takes at most one transfer piece per request
        (``TRANSFER_CHUNK``); there is no timeout that would answer early."""
        await self._wait_idle(None, "reset")

    async def _drain_queue(self, queue: int) -> None:
        """QueueReady ← 0: the same for one queue's requests."""
        await self._wait_idle(queue, "queue_disabled")

    async def _wait_idle(self, queue: int | None, why: str) -> None:
        started = trio.current_time()
        while self.blk.pending(queue) > 0:
            with trio.move_on_after(STILL_WAITING_LOG_INTERVAL):
                await self._completed.park()
                continue
            self.log.warning("device.drain_waiting", why=why, queue=queue,
                             in_flight=self.blk.pending(queue),
                             waited=round(trio.current_time() - started, 1))

    # -- work ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Process notifications and completions until cancelled."""
        self._serving = True
        try:
            self.after_answer()  # kicks that came before serving began (or a resume)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._completions)
                nursery.start_soon(self._watch_size)
        finally:
            self._serving = False

    async def _watch_size(self) -> None:
        """Online resize: a grown or shrunk target becomes a config-change interrupt."""
        while True:
            await trio.sleep(RESIZE_CHECK_INTERVAL)
            self.check_resize()

    def check_resize(self) -> bool:
        try:
            size = self.engine.check_resize()
        except OSError as exc:
            self.log.warning("device.resize_check_failed", error=str(exc))
            return False
        if size is None:
            return False
        self.log.info("device.resized", capacity_sectors=size // 512)
        self._apply(self.blk.set_capacity(size))
        self.save_state()
        return True

    def _look_at_every_queue(self) -> None:
        """As if the guest had kicked every queue: what arrived while nobody took
        requests (a predecessor's death, a pause) is taken now."""
        for index, queue in enumerate(self.blk.transport.queues):
            if queue is not None:
                self._notified.add(index)
        self.after_answer()

    def after_answer(self) -> None:
        """The kicked queues' requests, taken and submitted now that the vCPU runs
        again (called by the IOREQ server); kept for :meth:`run` while not serving."""
        if not self._notified or not self._serving or self.blk.paused:
            return
        queues, self._notified = sorted(self._notified), set()
        internal_errors = self.blk.stats.internal_errors
        try:
            for index in queues:
                batch = self.blk.process_queue(index)
                self._apply(batch.effects)
                self._submit(batch.requests)
            self._complete_inline()
        except Exception as exc:  # contained: see _contain
            self._contain("process_queue", exc)
        if self.blk.stats.internal_errors != internal_errors:
            self.log.error("device.request_failed_internally",
                           count=self.blk.stats.internal_errors - internal_errors,
                           error=self.blk.last_internal_error)

    def _submit(self, requests: list[BlockRequest]) -> None:
        if requests:
            self._finished += self.engine.submit(requests)

    def _complete_inline(self) -> None:
        while self._finished:
            done, self._finished = self._finished, []
            self._complete(done)

    def _complete(self, done: list[BlockRequest]) -> None:
        batch = self.blk.complete(done)
        self._apply(batch.effects)
        self._submit(batch.requests)
        if self._completed:  # waiters (a drain, a reset) re-check what they wait for
            self._completed.unpark_all()

    async def _completions(self) -> None:
        fd = self.engine.completion_fd
        if not self.poll_s and idle_serving.available():
            # served like the event channel, at trio's idle point: no task switch per batch
            await idle_serving.IdleServing.of_this_run().serve(fd, self._take_completions)
            return
        while True:
            if not (self.poll_s and self.engine.in_flight
                    and await poll_for(self._stop_polling, self.poll_s)):
                await trio.lowlevel.wait_readable(fd)
            self._take_completions()

    def _take_completions(self) -> None:
        done = self.engine.take_completions()
        if done:
            self._finished += done
            try:
                self._complete_inline()
            except Exception as exc:  # contained: see _contain
                self._contain("complete", exc)

    def _contain(self, where: str, exc: Exception) -> None:
        """Whatever goes wrong while handling this device's requests stays with this
        device: it is logged with the guest and device and puts the device into
        DEVICE_NEEDS_RESET; the worker, its other devices and other guests carry on.
        (Per-request failures — bad guest input, no memory for one request — are
        already answered with IOERR by the device model.)  Called from the handler's
        ``except``, not a context manager: that would cost a generator per batch."""
        self.counters.failures += 1
        self.log.exception("device.internal_error", where=where, error=repr(exc))
        self._notified.clear()
        with contextlib.suppress(Exception):
            self._apply(self.blk.transport.needs_reset(f"internal error in {where}"))
            self.save_state()

    def _stop_polling(self) -> bool:
        """Completions are waiting, or none will come (then the loop waits on the fd)."""
        return self.engine.has_completions or not self.engine.in_flight

    async def quiesce(self, graceful: float, cancelled: float) -> bool:
        """Teardown: in-flight requests finish normally for up to ``graceful`` seconds
        (the guest gets their completions); then the rest are cancelled — each stops
        within one transfer piece — and get ``cancelled`` seconds.  True once nothing
        is in flight: no guest buffer is touched after that."""
        if await self.drain(graceful):
            return True
        count = self.blk.cancel()
        self.log.warning("device.drain_cancelled", cancelled=count)
        return await self.drain(cancelled)

    async def drain(self, timeout: float) -> bool:
        """Wait for in-flight requests to finish (for removal and shutdown)."""
        with trio.move_on_after(timeout):
            while self.blk.pending() > 0:
                if self._serving:  # run() collects the completions: wait for it
                    await self._completed.park()
                    continue
                done = self.engine.take_completions()
                if done:
                    self._finished += done
                    self._complete_inline()
                    continue
                await trio.lowlevel.wait_readable(self.engine.completion_fd)
            return True
        return False

    @property
    def format_name(self) -> str:
        """The disk's format as the operator configured it (raw unless an image)."""
        return str(getattr(self.engine.target, "format_name", "raw"))

    def close(self, *, detach: bool = False) -> None:
        """Release rings and mappings, stop the engine (after :meth:`drain`);
        ``detach``: a successor carries on, so what serves the disk keeps running."""
        if self.closed:
            return
        self.closed = True
        if self.state is not None:
            self.state.close()
        for queue in self.blk.transport.queues:
            if queue is not None:
                queue.release()
        self.engine.close(detach=detach)
        with contextlib.suppress(Exception):
            self.engine.target.close()

    async def pause(self, timeout: float) -> bool:
        """Operator pause: take no new request, let the in-flight ones finish, then make
        what they wrote durable; the guest's further I/O waits in its rings (its kicks
        are kept), none fails.  True once nothing is in flight and the target is
        flushed: a copy of the target taken now is consistent."""
        self.blk.paused = True
        if not await self.drain(timeout):
            return False
        await trio.to_thread.run_sync(self.engine.sync)
        self.log.info("device.paused")
        return True

    def unpause(self) -> None:
        """Take the requests the guest queued while paused, and carry on."""
        self.blk.paused = False
        self._look_at_every_queue()
        self.log.info("device.unpaused")

    def snapshot(self) -> dict[str, object]:
        """Status for ``virtio-diskd status``."""
        stats = self.blk.stats
        return {
            "devid": self.devid, "vdev": self.name, "irq": self.irq,
            "features": hex(self.blk.transport.negotiated),
            "status": self.blk.transport.status,
            "requests": stats.requests, "read_bytes": stats.read_bytes,
            "written_bytes": stats.written_bytes, "errors": stats.errors,
            "in_flight": self.blk.pending(), "interrupts": self.counters.irqs,
            "kicks": self.counters.kicks, "resets": self.counters.resets,
            "paused": self.blk.paused, "format": self.format_name,
        }

