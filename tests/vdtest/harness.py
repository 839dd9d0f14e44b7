"""In-process wiring of guest driver ↔ register file ↔ device model ↔ memory disk.

No Xen, no trio: an MMIO access is a method call, effects are performed at
once, and block requests either run immediately on a :class:`MemoryDisk` or
are held back (``hold_io``) so a test can reset the device mid-I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from virtio_diskd.backend import mmio
from virtio_diskd.backend.blk import BlkOptions, BlockRequest, VirtioBlk
from virtio_diskd.backend.guestmem import FlatGuestMemory
from virtio_diskd.backend.memdisk import MemoryDisk
from virtio_diskd.ioreq.sim.linux_driver import GuestRam, Request, VirtioBlkDriver

RAM_BASE = 0x40000000


@dataclass
class Harness:
    device: VirtioBlk
    disk: MemoryDisk
    ram: GuestRam
    driver: VirtioBlkDriver = field(init=False)
    hold_io: bool = False
    held: list[BlockRequest] = field(default_factory=list)
    effects: list[mmio.MmioEffect] = field(default_factory=list)
    irq_pending: bool = False
    irqs: int = 0
    traps: int = 0

    # MmioBus
    def read(self, offset: int, size: int) -> int:
        self.traps += 1
        return self.device.mmio_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.traps += 1
        self.perform(self.device.mmio_write(offset, size, value))

    def perform(self, effects: list[mmio.MmioEffect]) -> None:
        for effect in effects:
            self.effects.append(effect)
            if isinstance(effect, mmio.QueueNotified):
                batch = self.device.process_queue(effect.queue)
                self.perform(batch.effects)
                if self.hold_io:
                    self.held += batch.requests
                else:
                    self.run_io(batch.requests)
            elif isinstance(effect, mmio.RaiseInterrupt):
                self.irq_pending = True
                self.irqs += 1

    def run_io(self, requests: list[BlockRequest]) -> None:
        while requests:
            for request in requests:
                self.disk.execute(request)
            batch = self.device.complete(requests)
            self.perform(batch.effects)
            if self.hold_io:
                self.held += batch.requests
                return
            requests = batch.requests

    def release_held(self) -> None:
        held, self.held = self.held, []
        self.run_io(held)

    def deliver_irq(self) -> list[Request]:
        if not self.irq_pending:
            return []
        self.irq_pending = False
        return self.driver.interrupt()

    def do(self, requests: list[Request], queue: int = 0) -> list[Request]:
        """Submit, run, deliver the interrupt; returns the completed requests."""
        self.driver.submit(queue, requests)
        return self.deliver_irq()


def make_harness(disk_size: int = 1 << 20, *, ram_size: int = 4 << 20,
                 options: BlkOptions | None = None, legacy: bool = False,
                 read_only: bool = False, driver_kwargs: dict[str, object] | None = None,
                 probe: bool = True) -> Harness:
    disk = MemoryDisk(disk_size, read_only=read_only)
    ram_buffer = bytearray(ram_size)
    memory = FlatGuestMemory(ram_buffer, RAM_BASE)
    device = VirtioBlk(disk.info(), memory, options or BlkOptions(serial="vd-test-serial"),
                       legacy=legacy)
    harness = Harness(device, disk, GuestRam(ram_buffer, RAM_BASE))
    harness.driver = VirtioBlkDriver(harness, harness.ram, **(driver_kwargs or {}))  # type: ignore[arg-type]
    if probe:
        harness.driver.probe()
    return harness


def data_buffer(harness: Harness, payload: bytes) -> int:
    addr = harness.ram.alloc(len(payload))
    harness.ram.view(addr, len(payload))[:] = payload
    return addr
