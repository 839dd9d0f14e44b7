"""Exactly-once completion across SIGKILLs: a device process is killed at random
moments while a driver (this process) keeps posting and harvesting buffers; each
successor recovers from the in-flight log.  Every posted buffer must come back on
the used ring exactly once — for split and packed rings, with real kills, so the
ordering of the log's stores against the ring's is what is tested.
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import struct
import time
from collections import Counter
from collections.abc import Callable

import pytest

from virtio_diskd.backend.guestmem import FlatGuestMemory
from virtio_diskd.backend.inflight import InflightLog, region_size
from virtio_diskd.backend.virtqueue import (
    DESC_F_NEXT,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
    PackedQueue,
    SplitQueue,
    Virtqueue,
)

BASE = 0x40000000
SIZE = 32
DESC, AVAIL, USED = BASE, BASE + 0x1000, BASE + 0x2000
DRIVER_AREA, DEVICE_AREA = BASE + 0x1000, BASE + 0x2000
TOKENS = BASE + 0x4000  # 16 bytes per buffer id: the token of its current posting
MAX_SEGMENTS = 4


class Driver:
    """A driver for one ring, in the test process: posts chains of 1-3 descriptors,
    each naming a fresh token, and counts the tokens the used ring returns."""

    def __init__(self, ram: memoryview, packed: bool, rng: random.Random) -> None:
        self.ram, self.packed, self.rng = ram, packed, rng
        # indexes and flags are published with single 16-bit stores, as a real driver
        # does (struct.pack_into stores byte by byte: the device could see half of one)
        self.ram16 = ram.cast("H")
        self.free = list(range(SIZE))
        self.ndesc: dict[int, int] = {}
        self.posted: set[int] = set()
        self.completed: Counter[int] = Counter()
        self.unexpected: list[int] = []  # used ids that were not in flight
        self.next_token = 1
        self.avail_idx = self.last_used = 0  # split
        self.next_avail, self.avail_wrap = 0, 1  # packed
        self.used_pos, self.used_wrap = 0, 1
        self.free_slots = SIZE
        self.split_free_desc = list(range(SIZE))  # split: a chain's head is its id
        self.split_chain: dict[int, list[int]] = {}

    def _at(self, addr: int) -> int:
        return addr - BASE

    def post(self) -> bool:
        count = self.rng.randint(1, 3)
        if self.packed:
            if not self.free or self.free_slots < count:
                return False
            buffer_id = self.free.pop(self.rng.randrange(len(self.free)))
        else:
            if len(self.split_free_desc) < count:
                return False
            free = self.split_free_desc
            buffer_id = free.pop(self.rng.randrange(len(free)))
        token = self.next_token
        self.next_token += 1
        struct.pack_into("<I", self.ram, self._at(TOKENS) + 16 * buffer_id, token)
        self.ndesc[buffer_id] = count
        self.posted.add(token)
        if self.packed:
            self._post_packed(buffer_id, count)
        else:
            self._post_split(buffer_id, count)
        return True

    def _post_split(self, head: int, count: int) -> None:
        descs = [head] + [self.split_free_desc.pop() for _ in range(count - 1)]
        for i, index in enumerate(descs):
            addr = TOKENS + 16 * head if i == 0 else TOKENS + 16 * SIZE + 16 * index
            flags = DESC_F_NEXT if i < count - 1 else 0
            nxt = descs[i + 1] if i < count - 1 else 0
            struct.pack_into("<QIHH", self.ram, self._at(DESC) + 16 * index, addr, 4, flags, nxt)
        self.split_chain[head] = descs
        struct.pack_into("<H", self.ram, self._at(AVAIL) + 4 + 2 * (self.avail_idx % SIZE), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram16[(self._at(AVAIL) + 2) // 2] = self.avail_idx

    def _post_packed(self, buffer_id: int, count: int) -> None:
        first_flags = 0
        first = self.next_avail
        for i in range(count):
            avail = PACKED_DESC_F_AVAIL if self.avail_wrap else PACKED_DESC_F_USED
            flags = avail | (DESC_F_NEXT if i < count - 1 else 0)
            addr = TOKENS + 16 * buffer_id if i == 0 else TOKENS + 16 * SIZE
            struct.pack_into("<QIH", self.ram, self._at(DESC) + 16 * self.next_avail, addr, 4,
                             buffer_id)
            if i == 0:
                first_flags = flags
            else:
                self.ram16[(self._at(DESC) + 16 * self.next_avail + 14) // 2] = flags
            self.next_avail += 1
            if self.next_avail == SIZE:
                self.next_avail, self.avail_wrap = 0, self.avail_wrap ^ 1
        self.free_slots -= count
        # the head's flags last: they make the whole list available
        self.ram16[(self._at(DESC) + 16 * first + 14) // 2] = first_flags

    def harvest(self) -> None:
        if self.packed:
            while True:
                offset = self._at(DESC) + 16 * self.used_pos
                flags = self.ram16[(offset + 14) // 2]  # the flags first, then id and len
                avail = 1 if flags & PACKED_DESC_F_AVAIL else 0
                used = 1 if flags & PACKED_DESC_F_USED else 0
                if not avail == used == self.used_wrap:
                    return
                length, buffer_id = struct.unpack_from("<IH", self.ram, offset + 8)
                if buffer_id not in self.ndesc:  # not in flight: a second completion
                    self.unexpected.append(buffer_id)
                    return
                self._complete(buffer_id, length)
                self.used_pos += self.ndesc.pop(buffer_id)
                if self.used_pos >= SIZE:
                    self.used_pos, self.used_wrap = self.used_pos - SIZE, self.used_wrap ^ 1
        used_idx = self.ram16[(self._at(USED) + 2) // 2]
        while self.last_used != used_idx:
            slot = self.last_used % SIZE
            head, length = struct.unpack_from("<II", self.ram, self._at(USED) + 4 + 8 * slot)
            self.last_used = (self.last_used + 1) & 0xFFFF
            if head not in self.split_chain:  # not in flight: a second completion
                self.unexpected.append(head)
                continue
            self._complete(head, length)
            self.split_free_desc += self.split_chain.pop(head)
            self.ndesc.pop(head)

    def _complete(self, buffer_id: int, token: int) -> None:
        self.completed[token] += 1
        if self.packed:
            self.free_slots += self.ndesc[buffer_id]
            self.free.append(buffer_id)


def _device(ram: memoryview, log_buffer: memoryview, packed: bool, *, recover: bool,
            finish: bool, seed: int, max_segments: int = MAX_SEGMENTS) -> None:
    """The device process: take, complete some at random, repeat (until killed, or
    with ``finish`` until everything posted is completed)."""
    rng = random.Random(seed)
    memory = FlatGuestMemory(ram, BASE)
    log = InflightLog(log_buffer, SIZE, max_segments)
    queue: Virtqueue
    if packed:
        queue = PackedQueue(memory, SIZE, DESC, DRIVER_AREA, DEVICE_AREA, event_idx=False,
                            indirect=False, log=log)
    else:
        queue = SplitQueue(memory, SIZE, DESC, AVAIL, USED, event_idx=False, indirect=False,
                           log=log)
    work = queue.recover() if recover else []
    idle = 0
    while True:
        work += queue.pop_all()
        # keep several buffers in flight (and complete them out of order), so that
        # most kills find work taken and not yet published
        if work and (finish or len(work) >= 12 or rng.random() < 0.02):
            rng.shuffle(work)
            count = len(work) if finish else rng.randint(1, len(work))
            done, work = work[:count], work[count:]
            queue.push_used([(chain, struct.unpack_from("<I", ram, chain.segments[0][0] - BASE)[0])
                             for chain in done])
            idle = 0
        elif finish:
            idle += 1
            if idle > 2000:
                return


def _die_with_parent() -> None:
    """A device process outlives a test killed by a timeout no longer (it would spin)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _run(packed: bool, kills: int, seed: int,
         plant: Callable[[], None] | None = None, max_segments: int = MAX_SEGMENTS) -> Driver:
    rng = random.Random(seed)
    shared = mmap.mmap(-1, 1 << 16)
    ram = memoryview(shared)
    log_shared = mmap.mmap(-1, region_size(SIZE, max_segments))
    InflightLog(memoryview(log_shared), SIZE, max_segments).format(packed)
    driver = Driver(ram, packed, rng)

    def spawn(recover: bool, finish: bool) -> int:
        child_seed = rng.randrange(1 << 30)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _die_with_parent()
                if plant is not None:
                    plant()
                _device(ram, memoryview(log_shared), packed, recover=recover, finish=finish,
                        seed=child_seed, max_segments=max_segments)
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        return pid

    for round_ in range(kills):
        pid = spawn(recover=round_ > 0, finish=False)
        deadline = time.monotonic() + rng.uniform(0.002, 0.03)
        while time.monotonic() < deadline:
            while rng.random() < 0.7 and driver.post():
                pass
            driver.harvest()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        driver.harvest()
    pid = spawn(recover=True, finish=True)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the last device process never finished")
        time.sleep(0.01)
    driver.harvest()
    assert os.waitstatus_to_exitcode(status) == 0
    return driver


def _check(driver: Driver) -> None:
    assert not driver.unexpected, f"used entries for buffers not in flight: {driver.unexpected[:5]}"
    twice = {token: n for token, n in driver.completed.items() if n > 1}
    assert not twice, f"completed more than once: {sorted(twice.items())[:5]}"
    unknown = set(driver.completed) - driver.posted
    assert not unknown, f"completions of tokens never posted: {sorted(unknown)[:5]}"
    missing = driver.posted - set(driver.completed)
    assert not missing, f"{len(missing)} buffers never completed, e.g. {sorted(missing)[:5]}"


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_buffer_completes_exactly_once_across_kills(packed: bool, seed: int) -> None:
    driver = _run(packed, kills=25, seed=seed)
    assert len(driver.posted) > 100  # the run did real work across the kills
    _check(driver)


def test_packed_chains_longer_than_the_log_keeps_are_recorded_by_their_segments() -> None:
    """A log entry holds 2 descriptors here; 3-descriptor chains are recorded as their
    (shortened) segments instead of raw descriptors, and still complete exactly once."""
    driver = _run(True, kills=25, seed=4, max_segments=2)
    assert len(driver.posted) > 100
    _check(driver)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_planted_fault_an_unreleased_entry_is_completed_twice(packed: bool,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               ) -> None:
    """The check above can fail: a device that never clears published chains from
    its log re-executes and re-publishes them after a kill."""

    def published_without_release(self: InflightLog, entry: int, position: int,
                                  wrap: int) -> None:
        self.cursor = InflightLog.packed_cursor(position, wrap)  # the entry stays

    def plant() -> None:
        monkeypatch.setattr(InflightLog, "released", lambda self, entry: None)
        # the packed ring's used path releases inline, in one call with the cursor
        monkeypatch.setattr(InflightLog, "published_packed", published_without_release)

    with pytest.raises(AssertionError):
        _check(_run(packed, kills=25, seed=7, plant=plant))


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_planted_fault_without_a_log_taken_buffers_are_lost(packed: bool,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             ) -> None:
    def plant() -> None:
        monkeypatch.setattr(InflightLog, "taken", lambda self, *args: None)
        monkeypatch.setattr(InflightLog, "taken_head", lambda self, *args: None)
        monkeypatch.setattr(InflightLog, "taken_descriptors", lambda self, *args: True)

    with pytest.raises(AssertionError):
        _check(_run(packed, kills=25, seed=8, plant=plant))
