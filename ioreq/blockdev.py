"""One virtio disk of a guest at run time: register file + queues + disk engine + SPI.

The sans-IO device model (:class:`~virtio_diskd.backend.blk.VirtioBlk`) is
driven from three places, all in the guest's trio thread:

* the IOREQ server calls :meth:`BlockDevice.mmio_read` / :meth:`mmio_write`
  while a vCPU waits: register state changes at once, but a QueueNotify only
  marks the queue and wakes :meth:`run` — the vCPU is answered before any
  queue work or disk I/O happens;
* :meth:`run`'s notification task takes the marked queues' requests and hands
  them to the engine (cached reads complete inline);
* its completion task waits on the engine's eventfd, completes batches (status
  byte, unmap, used ring) and picks up requests the guest queued meanwhile.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import assert_never

import structlog
import trio

from virtio_diskd.backend import mmio
from virtio_diskd.backend.blk import BlkOptions, BlockRequest, VirtioBlk
from virtio_diskd.backend.disk.engine import DiskEngine
from virtio_diskd.backend.guestmem import GuestMemory
from virtio_diskd.ioreq.polling import poll_for
from virtio_diskd.ioreq.server import HoldAnswer
from virtio_diskd.ioreq.xen.interface import DeviceModel

log = structlog.get_logger("virtio_diskd.device")

RESET_DRAIN_TIMEOUT = 5.0
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


class BlockDevice:
    """A running virtio-blk device (see the module docstring)."""

    def __init__(self, *, domid: int, devid: int, name: str, irq: int, memory: GuestMemory,
                 engine: DiskEngine[BlockRequest], dm: DeviceModel, options: BlkOptions,
                 legacy: bool = False, discard_enable: bool = True,
                 hooks: DeviceHooks | None = None, poll_us: float = 0.0) -> None:
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
        self._work = trio.Event()
        self._drained = trio.Event()
        self._finished: list[BlockRequest] = []
        self.closed = False

    # -- the register window (called by the IOREQ server) ---------------------------------

    def mmio_read(self, offset: int, size: int) -> int:
        return self.blk.mmio_read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> HoldAnswer | None:
        effects = self.blk.mmio_write(offset, size, value)
        return self._apply(effects) if effects else None

    def _apply(self, effects: list[mmio.MmioEffect]) -> HoldAnswer | None:
        """Perform the register file's effects; every kind is handled here."""
        hold = None
        for effect in effects:
            match effect:
                case mmio.QueueNotified(queue):
                    self.counters.kicks += 1
                    self._notified.add(queue)
                    self._work.set()
                case mmio.RaiseInterrupt():
                    self._raise_irq()
                case mmio.DriverOk():
                    self.log.info("device.driver_ok",
                                  features=hex(self.blk.transport.negotiated))
                    self.hooks.driver_ok()
                case mmio.DeviceReset():
                    self.counters.resets += 1
                    self._notified.clear()
                    self.log.info("device.reset", in_flight=self.blk.stats.in_flight)
                    self.hooks.reset()
                    hold = HoldAnswer(self._drain_after_reset)
                case mmio.NeedsReset(reason):
                    self.log.error("device.needs_reset", reason=reason)
                    self.hooks.needs_reset(reason)
                case mmio.QueueDisabled(queue):
                    self._notified.discard(queue)
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
        """Hold the Status write's answer until no request of the old rings is in flight."""
        with trio.move_on_after(RESET_DRAIN_TIMEOUT) as scope:
            while self.blk.stats.in_flight > 0:
                self._drained = trio.Event()
                await self._drained.wait()
        if scope.cancelled_caught:
            self.log.error("device.reset_drain_timeout", in_flight=self.blk.stats.in_flight)

    # -- work ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Process notifications and completions until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._notifications)
            nursery.start_soon(self._completions)
            nursery.start_soon(self._watch_size)

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
        return True

    async def _notifications(self) -> None:
        while True:
            await self._work.wait()
            self._work = trio.Event()
            queues, self._notified = sorted(self._notified), set()
            for index in queues:
                batch = self.blk.process_queue(index)
                self._apply(batch.effects)
                self._submit(batch.requests)
            self._complete_inline()

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
        if self.blk.stats.in_flight <= 0:
            self._drained.set()

    async def _completions(self) -> None:
        fd = self.engine.completion_fd
        while True:
            if not (self.poll_s and self.engine.in_flight
                    and await poll_for(self._stop_polling, self.poll_s)):
                await trio.lowlevel.wait_readable(fd)
            done = self.engine.take_completions()
            if done:
                self._finished += done
                self._complete_inline()

    def _stop_polling(self) -> bool:
        """Completions are waiting, or none will come (then the loop waits on the fd)."""
        return self.engine.has_completions or not self.engine.in_flight

    async def drain(self, timeout: float) -> bool:
        """Wait for in-flight requests to finish (for removal and shutdown)."""
        with trio.move_on_after(timeout):
            while self.blk.stats.in_flight > 0:
                done = self.engine.take_completions()
                if done:
                    self._finished += done
                    self._complete_inline()
                    continue
                await trio.lowlevel.wait_readable(self.engine.completion_fd)
            return True
        return False

    def close(self) -> None:
        """Release rings and mappings, stop the engine (after :meth:`drain`)."""
        if self.closed:
            return
        self.closed = True
        for queue in self.blk.transport.queues:
            if queue is not None:
                queue.release()
        self.engine.close()
        with contextlib.suppress(Exception):
            self.engine.target.close()

    def snapshot(self) -> dict[str, object]:
        """Status for ``virtio-diskd status``."""
        stats = self.blk.stats
        return {
            "devid": self.devid, "vdev": self.name, "irq": self.irq,
            "features": hex(self.blk.transport.negotiated),
            "status": self.blk.transport.status,
            "requests": stats.requests, "read_bytes": stats.read_bytes,
            "written_bytes": stats.written_bytes, "errors": stats.errors,
            "in_flight": stats.in_flight, "interrupts": self.counters.irqs,
            "kicks": self.counters.kicks, "resets": self.counters.resets,
        }

