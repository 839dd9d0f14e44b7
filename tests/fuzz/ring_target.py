"""The fuzz target: ring parsing and register writes, on the real device model.

``one_input(data)`` turns bytes into a guest: the first bytes choose the ring format,
queue size and features, the next ones a sequence of register accesses (writes,
reads, queue notifications, completing or holding what is in flight, resets), and
the rest is the guest RAM where the rings, tables and buffers live.  The device is
probed properly first, so the fuzzer starts where a driver would.

What must hold whatever the bytes: the device model never raises, never asks the
disk for I/O outside the disk (``CheckedDisk``), never hands the disk a buffer
that is not the request's, keeps in flight no more than the queue holds, and
writes guest memory only inside RAM (a flat buffer: anything else raises).

Run by ``tests/fuzz/run_fuzz.py`` (atheris, coverage-guided) and replayed from
``tests/fuzz/corpus/`` by ``tests/fuzz/test_fuzz_corpus.py`` on every test run.
"""

from __future__ import annotations

import struct

from vdtest.rawring import AVAIL, BASE, DESC, USED, CheckedDisk
from virtio_diskd.backend import mmio
from virtio_diskd.backend.blk import BlkOptions, BlockRequest, VirtioBlk
from virtio_diskd.backend.guestmem import FlatGuestMemory

RAM = 256 << 10
_OP = struct.Struct("<BBI")  # kind, register / argument, value
_WRITABLE_REGISTERS = (
    mmio.REG_DEVICE_FEATURES_SEL, mmio.REG_DRIVER_FEATURES, mmio.REG_DRIVER_FEATURES_SEL,
    mmio.REG_QUEUE_SEL, mmio.REG_QUEUE_NUM, mmio.REG_QUEUE_READY, mmio.REG_QUEUE_NOTIFY,
    mmio.REG_INTERRUPT_ACK, mmio.REG_STATUS, mmio.REG_QUEUE_DESC_LOW, mmio.REG_QUEUE_DESC_HIGH,
    mmio.REG_QUEUE_DRIVER_LOW, mmio.REG_QUEUE_DRIVER_HIGH, mmio.REG_QUEUE_DEVICE_LOW,
    mmio.REG_QUEUE_DEVICE_HIGH, mmio.REG_QUEUE_RESET, mmio.CONFIG_OFFSET + 32,
)


class _Guest:
    def __init__(self, data: bytes) -> None:
        opts = data[0] if data else 0
        self.packed = bool(opts & 1)
        size = 1 << (1 + (data[1] % 8 if len(data) > 1 else 2))  # 2 .. 256
        self.size = size
        ops_count = data[2] % 64 if len(data) > 2 else 0
        body = data[3:]
        self.ops = [_OP.unpack_from(body, 6 * i) for i in range(min(ops_count, len(body) // 6))]
        ram_image = body[6 * len(self.ops):]
        self.ram = bytearray(RAM)
        self.ram[: len(ram_image)] = ram_image[:RAM]
        self.disk = CheckedDisk(64 * 512)
        self.memory = FlatGuestMemory(self.ram, BASE)
        options = BlkOptions(serial="fuzz", queue_size=max(size, 8), packed_ring=self.packed,
                             num_queues=1 + (opts >> 1 & 1))
        self.device = VirtioBlk(self.disk.info(), self.memory, options)
        self.features_mask = ~0 if not opts & 4 else ~(1 << mmio.F_EVENT_IDX)
        if opts & 8:
            self.features_mask &= ~(1 << mmio.F_INDIRECT_DESC)
        self.held: list[BlockRequest] = []

    def write(self, offset: int, value: int, size: int = 4) -> None:
        self.perform(self.device.mmio_write(offset, size, value))

    def perform(self, effects: list[mmio.MmioEffect]) -> None:
        for effect in effects:
            if isinstance(effect, mmio.QueueNotified):
                batch = self.device.process_queue(effect.queue)
                self.check(batch.requests)
                self.held += batch.requests
                self.perform(batch.effects)

    def check(self, requests: list[BlockRequest]) -> None:
        for request in requests:
            total = sum(len(view) for view in request.buffers)
            assert total == request.length or not request.buffers, request
        for queue in self.device.transport.queues:
            if queue is not None:
                assert queue.in_flight <= queue.size, "more in flight than the queue holds"

    def complete(self, count: int) -> None:
        done, self.held = self.held[:count], self.held[count:]
        for request in done:
            self.disk.execute(request)
        batch = self.device.complete(done)
        self.check(batch.requests)
        self.held += batch.requests
        self.perform(batch.effects)

    def probe(self) -> None:
        self.write(mmio.REG_STATUS, 0)
        self.write(mmio.REG_STATUS, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)
        offered = 0
        for sel in (0, 1):
            self.write(mmio.REG_DEVICE_FEATURES_SEL, sel)
            offered |= self.device.mmio_read(mmio.REG_DEVICE_FEATURES, 4) << (32 * sel)
        features = offered & self.features_mask
        if not self.packed:
            features &= ~(1 << mmio.F_RING_PACKED)
        for sel in (0, 1):
            self.write(mmio.REG_DRIVER_FEATURES_SEL, sel)
            self.write(mmio.REG_DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.write(mmio.REG_STATUS, 11)
        self.write(mmio.REG_QUEUE_SEL, 0)
        self.write(mmio.REG_QUEUE_NUM, self.size)
        for reg, addr in ((mmio.REG_QUEUE_DESC_LOW, DESC), (mmio.REG_QUEUE_DRIVER_LOW, AVAIL),
                          (mmio.REG_QUEUE_DEVICE_LOW, USED)):
            self.write(reg, addr & 0xFFFFFFFF)
            self.write(reg + 4, addr >> 32)
        self.write(mmio.REG_QUEUE_READY, 1)
        self.write(mmio.REG_STATUS, 15)

    def run(self) -> None:
        self.probe()
        for kind, arg, value in self.ops:
            match kind % 6:
                case 0:
                    self.write(mmio.REG_QUEUE_NOTIFY, value % 2)
                case 1:
                    register = _WRITABLE_REGISTERS[arg % len(_WRITABLE_REGISTERS)]
                    self.write(register, value, 1 if register >= mmio.CONFIG_OFFSET else 4)
                case 2:
                    self.device.mmio_read((arg * 4) % mmio.WINDOW_SIZE, 4)
                case 3:
                    self.complete(1 + arg % 32)
                case 4:
                    self.write(arg % mmio.WINDOW_SIZE, value, 1 << (value % 4))
                case _:
                    struct.pack_into("<I", self.ram, (value % (RAM // 4)) * 4, arg * 0x01010101)
                    self.write(mmio.REG_QUEUE_NOTIFY, 0)
        self.complete(len(self.held))


def one_input(data: bytes) -> None:
    """One fuzz case (see the module docstring): any exception is a finding."""
    _Guest(data).run()
