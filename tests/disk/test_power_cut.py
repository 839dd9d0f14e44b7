"""Durable means durable across a power cut, not only a process kill (issue #15 item 5a).

A guest driver writes through virtio-blk, the real disk engine executes, and a
crash-simulating layer under the engine (:mod:`vdtest.powercut`) loses every write
not made durable when the power is cut.  Acknowledged writes followed by a
completed FLUSH must survive, and so must every acknowledged write in
write-through mode (CONFIG_WCE = 0) without a FLUSH.  Each check is shown to fail
against an engine with the durability step planted out.
"""

from __future__ import annotations

import select
import struct
from pathlib import Path

import pytest

from vdtest.harness import make_harness
from vdtest.powercut import PowerCutIo
from virtio_diskd.backend.blk import BlkOptions, BlockRequest
from virtio_diskd.backend.disk.engine import DiskEngine
from virtio_diskd.backend.disk.request import IoKind
from virtio_diskd.backend.disk.target import DiskTarget
from virtio_diskd.ioreq.sim import virtio_spec as spec
from virtio_diskd.ioreq.sim.linux_driver import Request

SECTOR = 512
DISK = 1 << 20


class EngineDisk:
    """The harness's disk, executed by the real engine over a :class:`PowerCutIo`."""

    def __init__(self, path: str, io: PowerCutIo) -> None:
        self.target = DiskTarget(path)
        self.engine = DiskEngine[BlockRequest](self.target, io=io, workers=4)

    def info(self):  # type: ignore[no-untyped-def]
        return self.target.info()

    def execute(self, request: BlockRequest) -> None:
        waiting = {id(request)}
        for done in self.engine.submit([request]):
            waiting.discard(id(done))
        while waiting:
            select.select([self.engine.completion_fd], [], [], 5)
            for done in self.engine.take_completions():
                waiting.discard(id(done))

    def close(self) -> None:
        self.engine.close()
        self.target.close()


def _stamp(block: int, generation: int) -> bytes:
    return struct.pack("<QQ", block, generation) * (SECTOR // 16)


def _setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(DISK))
    io = PowerCutIo(str(path))
    disk = EngineDisk(str(path), io)
    harness = make_harness(DISK, options=BlkOptions(serial="power-cut"))
    harness.disk = disk  # type: ignore[assignment]
    harness.device.disk = disk.info()
    return harness, disk, io


def _write(harness, block: int, generation: int) -> None:  # type: ignore[no-untyped-def]
    addr = harness.ram.alloc(SECTOR)
    harness.ram.view(addr, SECTOR)[:] = _stamp(block, generation)
    done = harness.do([Request(spec.BLK_T_OUT, sector=block, data_addr=addr, data_len=SECTOR)])
    assert [r.status for r in done] == [0]  # acknowledged


def _flush(harness) -> None:  # type: ignore[no-untyped-def]
    done = harness.do([Request(spec.BLK_T_FLUSH)])
    assert [r.status for r in done] == [0]


def _survivors(io: PowerCutIo, blocks: range, generation: int) -> list[int]:
    after = io.power_cut()
    return [b for b in blocks if after[b * SECTOR : (b + 1) * SECTOR] == _stamp(b, generation)]


def _flushed_writes_survive(tmp_path: Path) -> None:
    harness, disk, io = _setup(tmp_path)
    try:
        for block in range(0, 32):
            _write(harness, block, 1)
        _flush(harness)
        for block in range(32, 64):  # acknowledged, never flushed: may be lost
            _write(harness, block, 1)
        assert _survivors(io, range(0, 32), 1) == list(range(0, 32))
        # the layer is not a no-op: unflushed writes are really lost in a power cut
        assert _survivors(io, range(32, 64), 1) == []
    finally:
        disk.close()


def _write_through_survives(tmp_path: Path) -> None:
    harness, disk, io = _setup(tmp_path)
    try:
        harness.driver.set_writeback(False)
        assert harness.device.writeback is False
        for block in range(0, 48):
            _write(harness, block, 2)
        assert _survivors(io, range(0, 48), 2) == list(range(0, 48))
    finally:
        disk.close()


def test_writes_acknowledged_before_a_completed_flush_survive_a_power_cut(
        tmp_path: Path) -> None:
    _flushed_writes_survive(tmp_path)


def test_write_through_writes_survive_a_power_cut_without_a_flush(tmp_path: Path) -> None:
    _write_through_survives(tmp_path)


def test_planted_fault_a_flush_without_fdatasync_is_caught(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           ) -> None:
    original = DiskEngine._execute

    def flush_skips_fdatasync(self, request):  # type: ignore[no-untyped-def]
        if request.kind == IoKind.FLUSH:
            return  # acknowledged, never synced
        original(self, request)

    monkeypatch.setattr(DiskEngine, "_execute", flush_skips_fdatasync)
    with pytest.raises(AssertionError):
        _flushed_writes_survive(tmp_path)


def test_planted_fault_write_through_without_dsync_is_caught(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             ) -> None:
    original = DiskEngine._execute

    def ignores_durable(self, request):  # type: ignore[no-untyped-def]
        request.durable = False
        original(self, request)

    monkeypatch.setattr(DiskEngine, "_execute", ignores_durable)
    with pytest.raises(AssertionError):
        _write_through_survives(tmp_path)
