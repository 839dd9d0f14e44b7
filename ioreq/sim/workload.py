"""A verifying block workload for the simulated guest.

Sequential or random, read, write or mixed, any block size and queue depth,
on one queue per run (run several on several vCPUs for multi-queue).  Every
512-byte sector written carries its own sector number, a generation and the
run's seed, so a read that returns stale, misplaced or torn data is caught;
blocks are never read and written concurrently, so the expected content is
always known.  Blocks this run has not written are checked against
``reference`` when given (the disk's content, e.g. a map of the image file),
so a read-only run verifies every byte too.
"""

from __future__ import annotations

import random
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from virtio_diskd.ioreq.sim import virtio_spec
from virtio_diskd.ioreq.sim.hypervisor import Vcpu, current_vcpu_or_none
from virtio_diskd.ioreq.sim.linux_driver import Request, VirtioBlkDriver

SECTOR = 512
_STAMP = struct.Struct("<4sQII")  # magic, sector, generation, seed
MAGIC = b"VDWL"


@dataclass
class WorkloadSpec:
    pattern: str = "random"  # or "sequential"
    mix: str = "mixed"  # "read", "write" or "mixed"
    block_size: int = 4096
    queue_depth: int = 8
    requests: int = 1000
    seconds: float | None = None  # stop after this long instead (whichever comes first)
    queue: int = 0
    first_sector: int = 0
    sectors: int = 16384
    seed: int = 1
    write_first: bool = True  # fill the region before reading so every read can be checked


@dataclass
class WorkloadResult:
    requests: int = 0
    reads: int = 0
    writes: int = 0
    bytes: int = 0
    errors: int = 0
    verified_sectors: int = 0
    read_bytes: int = 0
    verified_read_bytes: int = 0  # reads compared with stamps or the reference
    disk_blocks_checked: int = 0  # acknowledged writes found on the disk (verify_disk)
    mismatches: list[str] = field(default_factory=list)
    latencies_us: list[float] = field(default_factory=list)
    #: at queue depth 1, each request's share of ``latencies_us`` that the vCPU spent
    #: waiting for the backend (its trapped accesses, the completion's interrupt); the
    #: rest is the simulated guest's own code
    device_waits_us: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.errors == 0 and not self.mismatches and self.requests > 0

    @property
    def every_read_verified(self) -> bool:
        return self.verified_read_bytes == self.read_bytes


def sector_stamp(sector: int, generation: int, seed: int) -> bytes:
    head = _STAMP.pack(MAGIC, sector, generation, seed)
    filler = (sector * 2654435761 + generation * 40503 + seed) & 0xFFFFFFFF
    return head + struct.pack("<I", filler) * ((SECTOR - len(head)) // 4)


class Workload:
    """Runs a :class:`WorkloadSpec` on ``driver`` from ``vcpu`` (call :meth:`run` there)."""

    def __init__(self, driver: VirtioBlkDriver, vcpu: Vcpu, spec: WorkloadSpec, *,
                 progress: Callable[[int, int], None] | None = None,
                 reference: memoryview | None = None) -> None:
        self.reference = reference
        self.progress = progress
        self.driver = driver
        self.vcpu = vcpu
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.blocks = spec.sectors * SECTOR // spec.block_size
        self.generation: dict[int, int] = {}
        self.acked: dict[int, int] = {}  # block -> generation whose write completed OK
        self.busy: set[int] = set()
        self.done: list[Request] = []
        self.lock = threading.Lock()
        self.result = WorkloadResult()
        self._cursor = 0
        self._started: dict[int, float] = {}
        self._waited_at: dict[int, float] = {}  # vcpu.waited_s at each start (QD1 only)
        self._blocks_of: dict[int, int] = {}

    def _sector(self, block: int) -> int:
        return self.spec.first_sector + block * self.spec.block_size // SECTOR

    def _pick_block(self) -> int | None:
        for _ in range(64):
            if self.spec.pattern == "sequential":
                block = self._cursor % self.blocks
                self._cursor += 1
            else:
                block = self.rng.randrange(self.blocks)
            if block not in self.busy:
                return block
        return None

    def _on_complete(self, request: Request) -> None:
        with self.lock:
            self.done.append(request)
        if current_vcpu_or_none() is not self.vcpu:
            self.vcpu.post(lambda: None)  # wake the workload if it is waiting
        # (on the workload's own vCPU, in its interrupt handler: its wait re-checks)

    def _make(self, block: int, write: bool) -> Request:
        size = self.spec.block_size
        addr = self.driver.ram.alloc(size)
        sector = self._sector(block)
        if write:
            generation = self.generation.get(block, 0) + 1
            self.driver.ram.view(addr, size)[:] = self._block_content(block, generation)
            self.generation[block] = generation
        kind = virtio_spec.BLK_T_OUT if write else virtio_spec.BLK_T_IN
        request = Request(kind, sector=sector, data_addr=addr, data_len=size,
                          on_complete=self._on_complete)
        self.busy.add(block)
        self._started[id(request)] = time.perf_counter()
        if self.spec.queue_depth == 1:
            self._waited_at[id(request)] = self.vcpu.waited_s
        self._blocks_of[id(request)] = block
        return request

    def _check(self, request: Request, block: int) -> None:
        res = self.result
        if request.status != virtio_spec.BLK_S_OK:
            res.errors += 1
            return
        if request.type == virtio_spec.BLK_T_OUT:
            self.acked[block] = self.generation[block]
            return
        generation = self.generation.get(block)
        view = self.driver.ram.view(request.data_addr, request.data_len)
        if generation is None:
            if self.reference is not None:
                self._check_reference(request, view)
            return
        all_good = True
        for i in range(request.data_len // SECTOR):
            sector = request.sector + i
            expected = sector_stamp(sector, generation, self.spec.seed)
            got = bytes(view[i * SECTOR : (i + 1) * SECTOR])
            if got != expected:
                all_good = False
                if len(res.mismatches) < 8:
                    magic, s, g, _seed = _STAMP.unpack_from(got)
                    res.mismatches.append(f"sector {sector}: expected generation {generation},"
                                          f" found magic={magic!r} sector={s} generation={g}")
            else:
                res.verified_sectors += 1
        if all_good:
            res.verified_read_bytes += request.data_len

    def _check_reference(self, request: Request, view: memoryview) -> None:
        """Compare with the disk's content, 64 KiB at a time (bytes compare at memcmp
        speed; smaller than malloc's mmap threshold, so no page faults per compare)."""
        res, start = self.result, request.sector * SECTOR
        expected = self.reference
        assert expected is not None
        for pos in range(0, request.data_len, 1 << 16):
            end = min(pos + (1 << 16), request.data_len)
            if bytes(view[pos:end]) != bytes(expected[start + pos : start + end]):
                if len(res.mismatches) < 8:
                    res.mismatches.append(f"sector {request.sector + pos // SECTOR}+: read "
                                          "differs from the disk's content")
                return
        res.verified_sectors += request.data_len // SECTOR
        res.verified_read_bytes += request.data_len

    def _block_content(self, block: int, generation: int) -> bytes:
        """What a write of ``generation`` puts in ``block``: each sector's stamp."""
        sector = self._sector(block)
        return b"".join(sector_stamp(sector + i, generation, self.spec.seed)
                        for i in range(self.spec.block_size // SECTOR))

    def verify_disk(self, read_at: Callable[[int, int], bytes]) -> int:
        """Check every acknowledged write on the disk itself (``read_at(offset, size)``);
        returns the blocks checked and records mismatches in the result.

        A block holds its last acknowledged generation, or — sector by sector — a later
        one: a write after it that failed (IOERR: the device does not say how much of
        it was done; an NBD server killed after writing and before replying leaves it
        done) or that was still in flight.  An older generation, or anything else, is
        an acknowledged write lost."""
        checked = 0
        for block in sorted(self.acked):
            acked, last = self.acked[block], self.generation[block]
            sector = self._sector(block)
            offset = sector * SECTOR
            size = self.spec.block_size
            held = read_at(offset, size)
            good = held == self._block_content(block, acked) or (len(held) == size and all(
                held[i * SECTOR : (i + 1) * SECTOR] in {
                    sector_stamp(sector + i, g, self.spec.seed) for g in range(acked, last + 1)}
                for i in range(size // SECTOR)))
            if not good:
                if len(self.result.mismatches) < 8:
                    found = sorted({_STAMP.unpack_from(held, i)[2]
                                    for i in range(0, len(held) - _STAMP.size + 1, SECTOR)})
                    self.result.mismatches.append(
                        f"block {block} (offset {offset}): the disk does not hold the "
                        f"acknowledged write (generation {acked}, or a later one up to "
                        f"{last}; it holds generation(s) {found})")
            else:
                self.result.verified_sectors += size // SECTOR
                self.result.disk_blocks_checked += 1
            checked += 1
        return checked

    def run(self) -> WorkloadResult:
        spec, res = self.spec, self.result
        started = time.perf_counter()
        deadline = started + spec.seconds if spec.seconds else None
        if spec.write_first and spec.mix != "write":
            fill = Workload(self.driver, self.vcpu, WorkloadSpec(
                pattern="sequential", mix="write", block_size=spec.block_size,
                queue_depth=spec.queue_depth, requests=self.blocks, queue=spec.queue,
                first_sector=spec.first_sector, sectors=spec.sectors, seed=spec.seed,
                write_first=False))
            fill_result = fill.run()
            self.generation = dict(fill.generation)
            res.errors += fill_result.errors
        issued = 0
        in_flight = 0
        while True:
            out_of_time = deadline is not None and time.perf_counter() >= deadline
            batch: list[Request] = []
            while (in_flight + len(batch) < spec.queue_depth and issued < spec.requests
                   and not out_of_time):
                block = self._pick_block()
                if block is None:
                    break
                write = spec.mix == "write" or (spec.mix == "mixed" and self.rng.random() < 0.5)
                batch.append(self._make(block, write))
                issued += 1
            if batch:
                submitted = self.driver.submit(spec.queue, batch)
                in_flight += submitted
                for request in batch[submitted:]:  # no room in the ring: retry later
                    self.busy.discard(self._blocks_of.pop(id(request)))
                    issued -= 1
            if in_flight == 0:
                break
            self.vcpu.wait_until(lambda: bool(self.done), 30.0)
            with self.lock:
                done, self.done = self.done, []
            now = time.perf_counter()
            for request in done:
                in_flight -= 1
                block = self._blocks_of.pop(id(request))
                self.busy.discard(block)
                res.latencies_us.append((now - self._started.pop(id(request))) * 1e6)
                waited_at = self._waited_at.pop(id(request), None)
                if waited_at is not None:
                    res.device_waits_us.append((self.vcpu.waited_s - waited_at) * 1e6)
                self._check(request, block)
                res.requests += 1
                res.bytes += request.data_len
                if request.type == virtio_spec.BLK_T_OUT:
                    res.writes += 1
                else:
                    res.reads += 1
                    res.read_bytes += request.data_len
                self.driver.ram.free(request.data_addr, request.data_len)
            if self.progress is not None and done:
                self.progress(res.requests, spec.requests)
        res.elapsed = time.perf_counter() - started
        return res
