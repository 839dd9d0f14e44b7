"""Device-model cost: µs of daemon-side Python per 4 KiB request, in-memory disk.

The guest driver, the register file, the virtqueue walker and virtio-blk run
in one process with direct calls (no Xen, no trio, no file).  The time spent
inside the device model (process_queue + complete, which includes mapping
guest buffers and copying the 4 KiB to or from the memory disk) is measured
separately from the guest driver's own time, for both ring formats and queue
depths 1 and 32.  Printed next to the cost of a bare 4 KiB memoryview copy
measured in the same run, the floor for any Python implementation.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from virtio_diskd.backend import blk, mmio
from virtio_diskd.backend.blk import BlkOptions, BlockRequest, VirtioBlk
from virtio_diskd.backend.guestmem import FlatGuestMemory
from virtio_diskd.backend.memdisk import MemoryDisk
from virtio_diskd.ioreq.sim.linux_driver import GuestRam, Request, VirtioBlkDriver

BASE = 0x40000000


@dataclass
class ModelFigures:
    name: str
    requests: int
    device_us_per_request: float
    total_us_per_request: float
    traps_per_request: float
    interrupts_per_request: float


class _TimedBus:
    """MMIO bus that runs the device's work inline and times it."""

    def __init__(self, device: VirtioBlk, disk: MemoryDisk) -> None:
        self.device = device
        self.disk = disk
        self.device_time = 0.0
        self.traps = 0
        self.interrupts = 0
        self.irq = False

    def read(self, offset: int, size: int) -> int:
        self.traps += 1
        return self.device.mmio_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.traps += 1
        started = time.perf_counter()
        effects = self.device.mmio_write(offset, size, value)
        pending: list[BlockRequest] = []
        for effect in effects:
            if isinstance(effect, mmio.QueueNotified):
                batch = self.device.process_queue(effect.queue)
                pending += batch.requests
                self._note(batch.effects)
        while pending:
            for request in pending:
                self.disk.execute(request)
            batch = self.device.complete(pending)
            self._note(batch.effects)
            pending = batch.requests
        self.device_time += time.perf_counter() - started

    def _note(self, effects: list[mmio.MmioEffect]) -> None:
        for effect in effects:
            if isinstance(effect, mmio.RaiseInterrupt):
                self.interrupts += 1
                self.irq = True


def _run(packed: bool, depth: int, count: int, write: bool) -> ModelFigures:
    disk = MemoryDisk(64 << 20)
    ram = bytearray(64 << 20)
    device = VirtioBlk(disk.info(), FlatGuestMemory(ram, BASE),
                       BlkOptions(serial="bench", packed_ring=packed))
    bus = _TimedBus(device, disk)
    driver = VirtioBlkDriver(bus, GuestRam(ram, BASE), packed=packed)
    driver.probe()
    bus.traps = bus.interrupts = 0
    bus.device_time = 0.0
    buffers = [driver.ram.alloc(4096) for _ in range(depth)]
    sectors = disk_sectors = (64 << 20) // 512
    rng = random.Random(1)
    done = 0
    started = time.perf_counter()
    rtype = blk.T_OUT if write else blk.T_IN
    while done < count:
        batch = [Request(rtype, sector=rng.randrange(0, disk_sectors - 8) & ~7,
                         data_addr=buffers[i], data_len=4096) for i in range(depth)]
        driver.submit(0, batch)
        if bus.irq:
            bus.irq = False
            done += len(driver.interrupt())
    total = time.perf_counter() - started
    del sectors
    kind = "write" if write else "read"
    return ModelFigures(f"4k-rand-{kind}-qd{depth}-{'packed' if packed else 'split'}", done,
                        bus.device_time / done * 1e6, total / done * 1e6, bus.traps / done,
                        bus.interrupts / done)


def floor_copy_us() -> float:
    """A bare 4 KiB copy between memoryviews: the floor for moving the data."""
    src, dst = bytearray(1 << 20), bytearray(1 << 20)
    s, d = memoryview(src), memoryview(dst)
    n = 200_000
    started = time.perf_counter()
    for i in range(n):
        off = (i * 4096) & ((1 << 20) - 1)
        d[off : off + 4096] = s[off : off + 4096]
    return (time.perf_counter() - started) / n * 1e6


def run(count: int = 20_000) -> list[ModelFigures]:
    figures = []
    for packed in (False, True):
        for depth in (1, 32):
            figures.append(_run(packed, depth, count, write=False))
    figures.append(_run(False, 32, count, write=True))
    return figures


def main(count: int = 20_000) -> int:
    floor = floor_copy_us()
    print("device model, in-memory disk, one process (no Xen, no trio, no file)")
    print(f"{'workload':<30}{'device µs/req':>15}{'total µs/req':>14}{'traps/req':>11}"
          f"{'irqs/req':>10}")
    for fig in run(count):
        print(f"{fig.name:<30}{fig.device_us_per_request:>15.2f}{fig.total_us_per_request:>14.2f}"
              f"{fig.traps_per_request:>11.3f}{fig.interrupts_per_request:>10.3f}")
    print(f"{'floor: 4 KiB memoryview copy':<30}{floor:>15.2f}")
    return 0
