"""The disk engine on real files and a real block device: bytes read back,
flush ordering and durability, faults confined to their request."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vdtest.disks import can_make_loop_devices, loop_device, request, run, take_in_groups
from virtio_diskd.backend.disk.engine import DiskEngine, DiskIo
from virtio_diskd.backend.disk.request import IoKind, IoStatus
from virtio_diskd.backend.disk.target import DiskTarget, TargetError

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    return path


def test_file_target_reports_size_blocks_and_capabilities(image: Path) -> None:
    with DiskTarget(str(image)) as target:
        assert target.size == 8 * MiB and not target.is_block
        assert target.logical_block_size == 512
        info = target.info()
        assert info.capacity_bytes == 8 * MiB and not info.read_only
        # ext4/xfs/tmpfs all punch holes and zero ranges; the probe changed nothing
        assert target.capabilities.punch_hole and target.capabilities.zero_range
        assert info.can_discard and info.can_write_zeroes and info.write_zeroes_may_unmap
    assert image.stat().st_size == 8 * MiB
    with DiskTarget(str(image), read_only=True) as target:
        info = target.info()
        assert info.read_only and not info.can_discard and not info.can_write_zeroes
        with pytest.raises(OSError):
            os.write(target.fd, b"x")  # the kernel refuses too


def test_bad_targets_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="No such file"):
        DiskTarget(str(tmp_path / "missing.img"))
    with pytest.raises(TargetError, match="neither a regular file nor a block device"):
        DiskTarget(str(tmp_path))
    ro = tmp_path / "ro.img"
    ro.write_bytes(b"\0" * 4096)
    ro.chmod(0o444)
    if os.geteuid() != 0:
        with pytest.raises(TargetError, match="cannot open read-write"):
            DiskTarget(str(ro))


def _roundtrip(path: str, *, direct: bool = False, workers: int = 2) -> None:
    with DiskTarget(path, direct=direct) as target:
        engine = DiskEngine(target, workers=workers)
        try:
            payloads = [os.urandom(4096 * (i + 1)) for i in range(8)]
            writes = [request(IoKind.WRITE, 64 * 1024 * i, [memoryview(p)])
                      for i, p in enumerate(payloads)]
            assert all(r.status == IoStatus.OK for r in run(engine, writes))
            assert run(engine, [request(IoKind.FLUSH)])[0].status == IoStatus.OK
            # read back through scatter-gather buffers that split each payload in two
            reads = []
            for i, p in enumerate(payloads):
                a, b = bytearray(len(p) // 2), bytearray(len(p) - len(p) // 2)
                reads.append((request(IoKind.READ, 64 * 1024 * i, [memoryview(a),
                                                                   memoryview(b)]), a, b, p))
            done = run(engine, [r for r, *_ in reads])
            assert all(r.status == IoStatus.OK for r in done)
            for _r, a, b, p in reads:
                assert bytes(a) + bytes(b) == p
        finally:
            engine.close()


def test_write_flush_read_back_on_a_file(image: Path) -> None:
    _roundtrip(str(image))
    data = image.read_bytes()
    assert data[4096 : 64 * 1024] == bytes(64 * 1024 - 4096)  # nothing between the writes


def test_o_direct_with_unaligned_buffers_uses_the_bounce_path(image: Path) -> None:
    with DiskTarget(str(image), direct=True) as target:
        engine = DiskEngine(target)
        try:
            backing = bytearray(4096 + 1)
            payload = os.urandom(4096)
            backing[1:] = payload
            unaligned = memoryview(backing)[1:]  # not 512-aligned in memory
            assert run(engine, [request(IoKind.WRITE, 8192, [unaligned])])[0].status == IoStatus.OK
            out = bytearray(4096 + 3)
            view = memoryview(out)[3:]
            assert run(engine, [request(IoKind.READ, 8192, [view])])[0].status == IoStatus.OK
            assert bytes(view) == payload
            # a sector-aligned but block-unaligned write goes through read-modify-write
            small = os.urandom(512)
            assert run(engine, [request(IoKind.WRITE, 8192 + 512,
                                        [memoryview(small)])])[0].status == IoStatus.OK
        finally:
            engine.close()
    data = image.read_bytes()
    assert data[8192:8704] == payload[:512] and data[8704:9216] == small
    assert data[9216:12288] == payload[1024:]


def test_reads_of_a_file_in_memory_are_done_inline_from_the_first(image: Path) -> None:
    """tmpfs refuses RWF_NOWAIT, which used to send every read of a RAM-backed image to
    the worker threads (a thread hand-off per request); a file there waits for no
    device, so it is read inline.  A file on a disk is not taken for one."""
    from virtio_diskd.backend.disk.target import TMPFS_MAGIC, file_system_type

    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    fd = os.open(shm, os.O_RDONLY)
    try:
        if file_system_type(fd) != TMPFS_MAGIC:
            pytest.skip("/dev/shm is not tmpfs here")
    finally:
        os.close(fd)
    path = shm / f"vd-engine-test-{os.getpid()}.img"
    payload = os.urandom(MiB)
    path.write_bytes(payload)
    try:
        with DiskTarget(str(path)) as target:
            assert target.memory_backed
            engine = DiskEngine(target)
            try:
                buf = bytearray(4096)
                finished = engine.submit([request(IoKind.READ, 8192, [memoryview(buf)])])
                assert len(finished) == 1 and finished[0].status == IoStatus.OK
                assert (engine.inline_hits, engine.offloaded) == (1, 0)
                assert bytes(buf) == payload[8192:12288]
                data = os.urandom(8192)
                write = request(IoKind.WRITE, 4096, [memoryview(data)])
                assert engine.submit([write]) == [write] and write.status == IoStatus.OK
                assert (engine.inline_hits, engine.offloaded) == (2, 0)
                assert all(r.status == IoStatus.OK for r in run(engine, [request(IoKind.FLUSH)]))
            finally:
                engine.close()
        assert path.read_bytes() == payload[:4096] + data + payload[12288:]
    finally:
        path.unlink()
    with DiskTarget(str(image)) as on_disk:
        assert not on_disk.memory_backed


def test_a_full_file_system_in_memory_fails_the_write_alone(tmp_path: Path) -> None:
    """A write that finds its tmpfs full fails that request with IOERR (logged), the
    next one still works."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        path = mount / "disk.img"
        with open(path, "wb") as f:
            f.truncate(MiB)  # sparse: larger than the file system
        with DiskTarget(str(path)) as target:
            engine = DiskEngine(target)
            try:
                small = request(IoKind.WRITE, 512 * 1024, [memoryview(b"\x5a" * 4096)])
                big = request(IoKind.WRITE, 0, [memoryview(os.urandom(256 * 1024))])
                run(engine, [small, big])  # a short write goes on in a worker: ENOSPC
                assert (small.status, big.status) == (IoStatus.OK, IoStatus.IO_ERROR)
            finally:
                engine.close()
        assert path.read_bytes()[512 * 1024 : 516 * 1024] == b"\x5a" * 4096
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_inline_reads_hit_the_page_cache(image: Path) -> None:
    image.write_bytes(os.urandom(MiB))
    with DiskTarget(str(image)) as target:
        engine = DiskEngine(target)
        try:
            buf = bytearray(4096)
            run(engine, [request(IoKind.READ, 0, [memoryview(buf)])])  # warm
            finished = engine.submit([request(IoKind.READ, 0, [memoryview(buf)])])
            assert len(finished) == 1 and finished[0].status == IoStatus.OK
            assert engine.inline_hits >= 1
            assert bytes(buf) == image.read_bytes()[:4096]
        finally:
            engine.close()


def test_discard_punches_and_write_zeroes_zero(image: Path) -> None:
    image.write_bytes(b"\xaa" * (8 * MiB))
    with DiskTarget(str(image)) as target:
        blocks_before = os.fstat(target.fd).st_blocks
        engine = DiskEngine(target)
        try:
            done = run(engine, [
                request(IoKind.DISCARD, ranges=[(0, MiB, False)]),
                request(IoKind.WRITE_ZEROES, ranges=[(2 * MiB, 4096, False)]),
                request(IoKind.WRITE_ZEROES, ranges=[(3 * MiB, 8192, True)]),
            ])
            assert all(r.status == IoStatus.OK for r in done)
            assert os.fstat(target.fd).st_blocks < blocks_before  # really deallocated
        finally:
            engine.close()
    data = image.read_bytes()
    assert data[:MiB] == bytes(MiB) and data[MiB : MiB + 16] == b"\xaa" * 16
    assert data[2 * MiB : 2 * MiB + 4096] == bytes(4096)
    assert data[2 * MiB + 4096 : 2 * MiB + 4100] == b"\xaa" * 4
    assert data[3 * MiB : 3 * MiB + 8192] == bytes(8192)
    assert len(data) == 8 * MiB


def test_read_beyond_the_end_of_a_shrunk_file_is_ioerr(image: Path) -> None:
    with DiskTarget(str(image)) as target:
        engine = DiskEngine(target)
        try:
            os.truncate(image, 4096)
            buf = bytearray(8192)
            done = run(engine, [request(IoKind.READ, 0, [memoryview(buf)])])
            assert done[0].status == IoStatus.IO_ERROR
            assert engine.check_resize() == 4096
            assert engine.check_resize() is None
        finally:
            engine.close()


class _OrderedIo(DiskIo):
    """Holds writes until released and records the order of syscalls."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.release = threading.Event()

    def pwritev(self, fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        self.release.wait(10)
        count = super().pwritev(fd, buffers, offset, flags)
        self.events.append(f"write@{offset}")
        return count

    def fdatasync(self, fd: int) -> None:
        self.events.append("fdatasync")
        super().fdatasync(fd)


def test_flush_waits_for_every_earlier_write(image: Path) -> None:
    io = _OrderedIo()
    with DiskTarget(str(image)) as target:
        engine = DiskEngine(target, workers=4, io=io)
        try:
            writes = [request(IoKind.WRITE, 4096 * i, [memoryview(b"w" * 4096)])
                      for i in range(6)]
            flush = request(IoKind.FLUSH)
            assert engine.submit(writes) == []
            time.sleep(0.05)  # a worker holds the writes (one batch), the others are idle
            assert engine.submit([flush]) == []
            time.sleep(0.1)  # give the idle workers every chance to run the flush early
            assert "fdatasync" not in io.events
            io.release.set()
            assert engine.wait_idle(10)
            assert io.events[-1] == "fdatasync" and len(io.events) == 7
            done = engine.take_completions()
            assert {id(r) for r in done} == {id(r) for r in [*writes, flush]}
        finally:
            engine.close()


def test_writethrough_writes_use_dsync(image: Path) -> None:
    seen: list[int] = []

    class Spy(DiskIo):
        def pwritev(self, fd: int, buffers: list[memoryview], offset: int,
                    flags: int = 0) -> int:
            seen.append(flags)
            return super().pwritev(fd, buffers, offset, flags)

    with DiskTarget(str(image)) as target:
        engine = DiskEngine(target, io=Spy())
        try:
            run(engine, [request(IoKind.WRITE, 0, [memoryview(b"d" * 512)], durable=True),
                         request(IoKind.WRITE, 512, [memoryview(b"e" * 512)])])
        finally:
            engine.close()
    assert sorted(seen) == [0, os.RWF_DSYNC]


class _FaultyIo(DiskIo):
    """EIO for anything touching the first MiB: an injected bad region."""

    def preadv(self, fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        if offset < MiB:
            raise OSError(errno.EIO, "injected media error")
        return super().preadv(fd, buffers, offset, flags)

    def pwritev(self, fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        if offset < MiB:
            raise OSError(errno.EIO, "injected media error")
        return super().pwritev(fd, buffers, offset, flags)


def test_injected_faults_fail_only_their_requests(image: Path) -> None:
    with DiskTarget(str(image)) as target:
        errors: list[int] = []
        engine = DiskEngine(target, io=_FaultyIo(),
                            on_error=lambda req, exc: errors.append(req.offset))
        try:
            bad_w = request(IoKind.WRITE, 0, [memoryview(b"x" * 4096)])
            good_w = request(IoKind.WRITE, 2 * MiB, [memoryview(b"y" * 4096)])
            bad_r = request(IoKind.READ, 4096, [memoryview(bytearray(512))])
            good_r = request(IoKind.READ, 3 * MiB, [memoryview(bytearray(512))])
            run(engine, [bad_w, good_w, bad_r, good_r])
            assert (bad_w.status, good_w.status, bad_r.status, good_r.status) == (
                IoStatus.IO_ERROR, IoStatus.OK, IoStatus.IO_ERROR, IoStatus.OK)
            assert sorted(errors) == [0, 4096]
            # the engine keeps serving
            later = request(IoKind.WRITE, 4 * MiB, [memoryview(b"z" * 512)])
            assert run(engine, [later])[0].status == IoStatus.OK
        finally:
            engine.close()
    assert image.read_bytes()[2 * MiB : 2 * MiB + 4] == b"yyyy"


def test_enospc_from_a_full_filesystem_is_ioerr(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      check=False).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        img = mnt / "sparse.img"
        with open(img, "wb") as f:
            f.truncate(8 * MiB)  # larger than the filesystem
        with DiskTarget(str(img)) as target:
            engine = DiskEngine(target)
            try:
                big = [request(IoKind.WRITE, MiB * i, [memoryview(b"f" * MiB)])
                       for i in range(4)]
                done = run(engine, big)
                assert any(r.status == IoStatus.IO_ERROR for r in done)  # the filesystem filled up
                read = request(IoKind.READ, 7 * MiB, [memoryview(bytearray(512))])
                assert run(engine, [read])[0].status == IoStatus.OK  # and reads still work
            finally:
                engine.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


DURABILITY_WRITER = r"""
import os, sys
from virtio_diskd.backend.blk import IoKind
from virtio_diskd.backend.disk.engine import DiskEngine
from virtio_diskd.backend.disk.target import DiskTarget
sys.path.insert(0, sys.argv[2])
from vdtest.disks import request, run
target = DiskTarget(sys.argv[1])
engine = DiskEngine(target, workers=4)
for i in range(64):
    payload = bytes([i]) * 4096
    assert run(engine, [request(IoKind.WRITE, i * 4096, [memoryview(payload)])])[0].status == 0
assert run(engine, [request(IoKind.FLUSH)])[0].status == 0
print("flushed", flush=True)
import time
while True:  # keep writing unflushed data until killed
    run(engine, [request(IoKind.WRITE, 1 << 20, [memoryview(os.urandom(4096))])])
    time.sleep(0.001)
"""


def test_flushed_writes_survive_sigkill_of_the_writer(image: Path) -> None:
    tests_dir = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen([sys.executable, "-c", DURABILITY_WRITER, str(image), tests_dir],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "flushed"
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
    fd = os.open(image, os.O_RDONLY)
    try:
        for i in range(64):
            assert os.pread(fd, 4096, i * 4096) == bytes([i]) * 4096
    finally:
        os.close(fd)


@pytest.mark.skipif(can_make_loop_devices() is not None,
                    reason=str(can_make_loop_devices()))
def test_block_device_every_operation(image: Path) -> None:
    image.write_bytes(b"\x11" * (8 * MiB))
    with loop_device(image) as device, DiskTarget(device) as target:
        assert target.is_block and target.size == 8 * MiB
        assert target.logical_block_size == 512
        assert target.capabilities.zero_range
        engine = DiskEngine(target)
        try:
            payload = os.urandom(64 * 1024)
            buf = bytearray(len(payload))
            ops = [request(IoKind.WRITE, MiB, [memoryview(payload)]),
                   request(IoKind.WRITE_ZEROES, ranges=[(2 * MiB, 4096, False)])]
            if target.capabilities.punch_hole:
                ops.append(request(IoKind.DISCARD, ranges=[(4 * MiB, MiB, False)]))
            assert all(r.status == IoStatus.OK for r in run(engine, ops))
            assert run(engine, [request(IoKind.FLUSH)])[0].status == IoStatus.OK
            assert run(engine, [request(IoKind.READ, MiB, [memoryview(buf)])])[0].status \
                    == IoStatus.OK
            assert bytes(buf) == payload
            end = bytearray(512)
            assert run(engine, [request(IoKind.READ, 8 * MiB - 512,
                                        [memoryview(end)])])[0].status == IoStatus.OK
            assert bytes(end) == b"\x11" * 512
            past = request(IoKind.READ, 8 * MiB - 512, [memoryview(bytearray(1024))])
            assert run(engine, [past])[0].status == IoStatus.IO_ERROR  # crosses the end
        finally:
            engine.close()
    data = image.read_bytes()
    assert data[MiB : MiB + len(payload)] == payload
    assert data[2 * MiB : 2 * MiB + 4096] == bytes(4096)
    assert data[:MiB] == b"\x11" * MiB


def _aligned(count: int, size: int = 4096) -> tuple[object, list[memoryview]]:
    import mmap

    area = mmap.mmap(-1, count * size)
    view = memoryview(area)
    return area, [view[i * size : (i + 1) * size] for i in range(count)]


def test_o_direct_queue_goes_to_native_aio_with_flush_after_the_writes(image: Path) -> None:
    """Aligned O_DIRECT reads and writes go to the kernel in one io_submit per batch;
    a FLUSH in the same batch still waits for every earlier write; data reads back."""
    area, bufs = _aligned(64)
    payloads = [os.urandom(4096) for _ in range(32)]
    for buf, payload in zip(bufs[:32], payloads, strict=True):
        buf[:] = payload
    with DiskTarget(str(image), direct=True) as target:
        engine = DiskEngine(target, workers=2)
        try:
            writes = [request(IoKind.WRITE, i * 8192, [bufs[i]], durable=i == 0)
                      for i in range(32)]
            flush = request(IoKind.FLUSH)
            done = run(engine, [*writes, flush])
            assert all(r.status == IoStatus.OK for r in done)
            assert engine.aio_submitted == 32 and engine.offloaded <= 1  # the flush: threads
            reads = [request(IoKind.READ, i * 8192, [bufs[32 + i]]) for i in range(32)]
            assert all(r.status == IoStatus.OK for r in run(engine, reads))
            assert engine.aio_submitted == 64 and engine.in_flight == 0
            assert [bytes(b) for b in bufs[32:]] == payloads
        finally:
            engine.close()
    data = image.read_bytes()
    assert all(data[i * 8192 : i * 8192 + 4096] == payloads[i] for i in range(32))
    assert data[4096:8192] == bytes(4096)  # nothing written between the blocks
    for buf in bufs:
        buf.release()
    area.close()  # type: ignore[attr-defined]


def test_completions_taken_a_few_at_a_time_are_each_taken_once(image: Path) -> None:
    """A consumer that takes completions ``limit`` at a time (the engine benchmark's
    refill groups) gets at most that many per call, every request exactly once, and
    ``has_completions`` says so when the eventfd was cleared with some left in the
    kernel's AIO ring or the done list."""
    import select

    payload = os.urandom(12 * 4096)
    image.write_bytes(payload + bytes(8 * MiB - len(payload)))
    area, bufs = _aligned(12)
    with DiskTarget(str(image), direct=True) as target:
        engine = DiskEngine(target, workers=1)
        try:
            reads = [request(IoKind.READ, i * 4096, [bufs[i]]) for i in range(12)]
            assert engine.submit(reads) == []
            assert engine.aio_submitted == 12
            # a completion in the kernel's ring whose signal a take already read (as the
            # end of a take that found fewer does) still shows in has_completions
            assert select.select([engine.completion_fd], [], [], 10)[0]
            os.eventfd_read(engine.completion_fd)
            assert engine.has_completions
            taken = take_in_groups(engine, 12, 5)
            assert sorted(map(id, taken)) == sorted(map(id, reads))  # each once, none lost
            assert all(r.status == IoStatus.OK for r in reads)
            assert not engine.has_completions and engine.in_flight == 0
            assert engine.take_completions(5) == []
            # once all is taken no wake-up is left behind (a consumer would spin on it)
            assert select.select([engine.completion_fd], [], [], 0)[0] == []
        finally:
            engine.close()
    assert [bytes(b) for b in bufs] == [payload[i * 4096 : (i + 1) * 4096]
                                        for i in range(12)]
    for buf in bufs:
        buf.release()
    area.close()  # type: ignore[attr-defined]


def test_a_take_that_empties_the_engine_leaves_no_wake_up_behind(image: Path) -> None:
    """Takes of ``limit`` skip clearing the eventfd while there may be more; the take
    that finds fewer clears it, so a consumer that then waits is not woken for nothing
    (over and over: it would spin)."""
    import select

    with DiskTarget(str(image)) as target:
        engine = DiskEngine(target, workers=1, inline_reads=False)
        try:
            def finish(count: int) -> None:
                reads = [request(IoKind.READ, i * 4096, [memoryview(bytearray(4096))])
                         for i in range(count)]
                assert engine.submit(reads) == []
                deadline = time.monotonic() + 10
                while engine.in_flight:
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                time.sleep(0.05)  # the worker signals the eventfd just after its count
                assert select.select([engine.completion_fd], [], [], 0)[0]

            finish(5)
            assert len(engine.take_completions(5)) == 5  # took its limit: may be more
            finish(7)  # these signal the eventfd after the last clear
            assert len(engine.take_completions(5)) == 5
            assert len(engine.take_completions(5)) == 2  # fewer than its limit: cleared
            assert not engine.has_completions
            assert select.select([engine.completion_fd], [], [], 0)[0] == []
            finish(3)  # the device's way: take all there is
            assert len(engine.take_completions()) == 3
            assert select.select([engine.completion_fd], [], [], 0)[0] == []
            finish(4)  # a take of its limit, then one of all: the latter clears
            assert len(engine.take_completions(2)) == 2
            finish(1)
            assert len(engine.take_completions()) == 3
            assert select.select([engine.completion_fd], [], [], 0)[0] == []
        finally:
            engine.close()


def test_native_aio_refuses_what_it_cannot_do_and_the_threads_do_it(image: Path) -> None:
    """A read into read-only memory is never done by AIO; a read past the end of a
    target that shrank fails that request alone; wait_idle collects AIO completions."""
    from virtio_diskd.backend.disk.aio import KernelAio, NotEligible

    area, bufs = _aligned(2)
    with DiskTarget(str(image), direct=True) as target:
        aio = KernelAio.open(target.fd, os.eventfd(0), 4, 512)
        assert aio is not None
        with pytest.raises(NotEligible):
            aio.prepare(1, False, [bufs[0].toreadonly()], 0, 4096, 0)  # read into RO memory
        with pytest.raises(NotEligible):
            aio.prepare(2, False, [bufs[0]], 100, 4096, 0)  # unaligned offset
        aio.close()
        engine = DiskEngine(target, workers=1)
        try:
            os.truncate(image, MiB)  # the target shrank under the guest
            past_end = request(IoKind.READ, 4 * MiB, [bufs[0]])
            ok = request(IoKind.READ, 0, [bufs[1]])
            assert engine.submit([past_end, ok]) == []
            assert engine.wait_idle(10)
            done = engine.take_completions()
            assert {id(r): r.status for r in done} == {id(past_end): IoStatus.IO_ERROR,
                                                       id(ok): IoStatus.OK}
        finally:
            engine.close()
    for buf in bufs:
        buf.release()
    area.close()  # type: ignore[attr-defined]


def test_native_aio_pins_the_guest_buffers_until_the_kernel_is_done(image: Path) -> None:
    """A buffer handed to the kernel cannot be released (the guest mapping under it
    cannot go) until its transfer is reaped; each buffer of a transfer lands where its
    iovec says, for a transfer of more buffers than the context reserves per slot too."""
    from virtio_diskd.backend.disk.aio import KernelAio

    payload = os.urandom(8 * 4096)
    image.write_bytes(payload + bytes(8 * MiB - len(payload)))
    area, bufs = _aligned(8)
    with DiskTarget(str(image), direct=True) as target:
        done_fd = os.eventfd(0)
        aio = KernelAio.open(target.fd, done_fd, 4, 512)
        assert aio is not None
        try:
            slots = [aio.prepare(1, False, bufs[:2], 0, 8192, 0),
                     aio.prepare(2, False, list(reversed(bufs[2:8])), 8192, 6 * 4096, 0)]
            assert aio.submit(slots) == 2
            with pytest.raises(BufferError):
                bufs[0].release()  # pinned: the kernel may still be writing into it
            with pytest.raises(BufferError):
                bufs[7].release()
            results: dict[int, int] = {}
            deadline = time.monotonic() + 10
            while len(results) < 2 and time.monotonic() < deadline:
                results.update(aio.reap(wait=0.1))
            assert results == {1: 8192, 2: 6 * 4096}
            assert aio.in_flight == 0
        finally:
            aio.close()
            os.close(done_fd)
    assert [bytes(b) for b in bufs[:2]] == [payload[:4096], payload[4096:8192]]
    assert [bytes(b) for b in reversed(bufs[2:8])] == [
        payload[i * 4096 : (i + 1) * 4096] for i in range(2, 8)]
    for buf in bufs:
        buf.release()  # reaped: let go
    area.close()  # type: ignore[attr-defined]


def test_native_aio_pool_entries_come_back_whatever_io_submit_says() -> None:
    """Transfers beyond the context's pool go to the threads (NotEligible), and a batch
    io_submit refuses gives every entry back: no refusal shrinks the pool for good."""
    from virtio_diskd.backend.disk.aio import KernelAio, NotEligible

    area, bufs = _aligned(3)
    done_fd = os.eventfd(0)
    closed = os.dup(done_fd)
    os.close(closed)  # a descriptor number nothing is open on: io_submit says EBADF
    aio = KernelAio.open(closed, done_fd, 2, 512)
    assert aio is not None
    try:
        for _round in range(3):
            slots = [aio.prepare(i, False, [bufs[i]], 0, 4096, 0) for i in range(2)]
            with pytest.raises(NotEligible):
                aio.prepare(2, False, [bufs[2]], 0, 4096, 0)  # both entries are taken
            with pytest.raises(OSError) as refused:
                aio.submit(slots)
            assert refused.value.errno == errno.EBADF
            assert aio.in_flight == 0
        for buf in bufs:
            buf.release()  # nothing left pinned
    finally:
        aio.close()
        os.close(done_fd)
    area.close()  # type: ignore[attr-defined]


def test_o_direct_bounce_memory_is_a_fixed_budget_whatever_the_request(image: Path) -> None:
    """The review's case: an unaligned O_DIRECT request was bounced through a buffer as
    large as the request.  Now an 6 MiB one goes through the fixed per-device budget."""
    from virtio_diskd.backend.disk import engine as engine_module

    made: list[int] = []
    real_mmap = engine_module.mmap.mmap

    def counting_mmap(fd: int, length: int, *args: object, **kwargs: object) -> object:
        made.append(length)
        return real_mmap(fd, length, *args, **kwargs)  # type: ignore[arg-type]

    payload = os.urandom(6 * MiB)
    backing = bytearray(len(payload) + 1)
    backing[1:] = payload
    with DiskTarget(str(image), direct=True) as target:
        engine = DiskEngine(target, workers=4)
        engine_module.mmap.mmap = counting_mmap  # type: ignore[misc, assignment]
        try:
            writes = [request(IoKind.WRITE, 0, [memoryview(backing)[1:]])]
            assert run(engine, writes)[0].status == IoStatus.OK
            out = bytearray(len(payload) + 3)
            reads = [request(IoKind.READ, 0, [memoryview(out)[3:]])]
            assert run(engine, reads)[0].status == IoStatus.OK
        finally:
            engine_module.mmap.mmap = real_mmap  # type: ignore[misc]
            engine.close()
    assert bytes(memoryview(out)[3:]) == payload
    assert image.read_bytes()[: len(payload)] == payload
    assert made and sum(made) <= 2 * MiB, made  # BOUNCE_BUFFERS × BOUNCE_SIZE


def test_a_cancelled_request_stops_within_one_piece(image: Path) -> None:
    """A large request on a slow target: after it is cancelled, no more transfers start
    for it, so its owner's wait is one piece, not the whole request."""
    pieces: list[int] = []

    class Slow(DiskIo):
        def pwritev(self, fd: int, buffers: list[memoryview], offset: int,
                    flags: int = 0) -> int:
            pieces.append(sum(len(b) for b in buffers))
            time.sleep(0.05)
            return super().pwritev(fd, buffers, offset, flags)

    from virtio_diskd.backend.disk.engine import TRANSFER_CHUNK

    with DiskTarget(str(image)) as target:
        engine = DiskEngine(target, io=Slow())
        try:
            big = request(IoKind.WRITE, 0, [memoryview(bytes(8 * MiB))])
            queued = request(IoKind.WRITE, 0, [memoryview(bytes(4096))])
            engine.submit([big])
            while not pieces:
                time.sleep(0.001)
            big.cancelled = queued.cancelled = True
            engine.submit([queued])
            assert engine.wait_idle(10)
            done = engine.take_completions()
        finally:
            engine.close()
    assert {r.status for r in done} == {IoStatus.IO_ERROR}
    assert len(pieces) <= 2 and max(pieces) <= TRANSFER_CHUNK, pieces  # not 8 pieces


def test_an_unexpected_error_fails_one_request_and_the_worker_lives_on(image: Path) -> None:
    class Buggy(DiskIo):
        def pwritev(self, fd: int, buffers: list[memoryview], offset: int,
                    flags: int = 0) -> int:
            if offset == 0:
                raise ValueError("a bug, not an OSError")
            return super().pwritev(fd, buffers, offset, flags)

    with DiskTarget(str(image)) as target:
        engine = DiskEngine(target, workers=1, io=Buggy())
        try:
            bad = request(IoKind.WRITE, 0, [memoryview(b"x" * 512)])
            assert run(engine, [bad])[0].status == IoStatus.IO_ERROR
            good = request(IoKind.WRITE, 4096, [memoryview(b"y" * 512)])
            assert run(engine, [good], timeout=10)[0].status == IoStatus.OK  # same thread
        finally:
            engine.close()


def test_a_target_is_writable_by_one_device_at_a_time(image: Path) -> None:
    """As QEMU's image locking: a second writer, or a reader next to a writer, is refused
    with a clear error; readers share."""
    with DiskTarget(str(image)) as writer:
        assert writer.fd >= 0
        with pytest.raises(TargetError, match="locked, another device holds it"):
            DiskTarget(str(image))
        with pytest.raises(TargetError, match="locked, a device writes it"):
            DiskTarget(str(image), read_only=True)
    with (DiskTarget(str(image), read_only=True), DiskTarget(str(image), read_only=True),
          pytest.raises(TargetError, match="locked")):
        DiskTarget(str(image))
    with DiskTarget(str(image)):  # released with the last fd
        pass
