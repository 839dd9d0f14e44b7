"""Disk engine against the raw syscalls on the same file, in the same run.

For each workload the engine (inline RWF_NOWAIT reads, worker threads,
native AIO for O_DIRECT, eventfd completions) and plain ``os.preadv``/
``os.pwritev`` loops at the same queue depth run on the same file; IOPS, MB/s
and CPU µs per request (user+system of the whole process, workers included)
are printed side by side, and ``fio``'s
figures too when it is installed.

Storage rows (issue #17): the same workloads through the NBD engine, against
``qemu-nbd`` serving the raw file (``-nbd``) and against ``qemu-storage-daemon``
serving a qcow2 copy of it (``-qcow2``); their raw columns are the raw file's
syscall loop, and their fio column is fio's libnbd engine on the same export (a
C client of the same server).  CPU µs per request counts this process only: the
server's CPU is on top.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import resource
import select
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from virtio_diskd.backend.disk.engine import DiskEngine
from virtio_diskd.backend.disk.engine_api import BlockEngine
from virtio_diskd.backend.disk.request import DiskRequest, IoKind, IoStatus
from virtio_diskd.backend.disk.storage import StorageRequest, open_storage
from virtio_diskd.backend.disk.storage_daemon import EXPORT_NAME, StorageDaemon
from virtio_diskd.backend.disk.storage_rules import StorageRules
from virtio_diskd.backend.disk.target import DiskTarget
from virtio_diskd.daemon.tools.simrun import make_image
from virtio_diskd.ioreq.sim.linux_driver import PAGE, element_size

MiB = 1 << 20


@dataclass
class EngineFigures:
    name: str
    iops: float
    mb_per_s: float
    cpu_us_per_io: float
    raw_iops: float
    raw_mb_per_s: float
    fio_iops: float | None = None
    #: fio's own CPU (user + system) per request in the same run: the kernel's share of
    #: a request is in both columns, so the difference is what our Python costs
    fio_cpu_us_per_io: float | None = None
    #: where the refill group matters (queue depth over REFILL_GROUP): the IOPS of the
    #: same engine with a consumer that takes every finished request before refilling
    iops_take_all: float | None = None


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


#: The daemon's default limits (seg_max = queue size 256 - 2, size_max 1 MiB), which
#: the guest's driver builds its requests within.
DEFAULT_SEG_MAX, DEFAULT_SIZE_MAX = 254, MiB


def guest_element_size(size: int) -> int:
    """The scatter-gather element size of a ``size``-byte request from the guest, as
    the simulated Linux driver builds it: a page, or more when seg_max would not do."""
    return min(element_size(size, DEFAULT_SEG_MAX, DEFAULT_SIZE_MAX), size)


def _spread_buffers(count: int, size: int) -> tuple[mmap.mmap, list[list[memoryview]]]:
    """``count`` requests' buffers laid out as the guest's are: ``size`` bytes in
    elements of :func:`guest_element_size`, each element page-aligned and a page apart
    from the next (guest pages are not one buffer), so a raw loop submits the same
    number and size of iovecs the daemon does."""
    element = guest_element_size(size)
    per_request = -(-size // element)
    stride = -(-element // PAGE) * PAGE + PAGE
    area = mmap.mmap(-1, count * per_request * stride)
    view = memoryview(area)
    buffers = []
    for i in range(count):
        base = i * per_request * stride
        buffers.append([view[base + j * stride : base + j * stride + element]
                        for j in range(per_request)])
    return area, buffers


def _offsets(file_size: int, size: int, sequential: bool, n: int) -> list[int]:
    blocks = file_size // size
    if sequential:
        return [(i % blocks) * size for i in range(n)]
    rng = random.Random(7)
    return [rng.randrange(blocks) * size for _ in range(n)]


#: How many finished requests the benchmark's consumer takes before it refills them.
#: fio reaps and resubmits 1–4 at a time on this VM's disk (its ``submit`` and
#: ``complete`` histograms), so the disk always has work queued.  Taking all 32 of a
#: batch first idles the disk for the whole batch's handling, and this VM's disk
#: answers a batch submitted at once all at once, so that pattern never breaks up by
#: itself.  Four, fio's upper bucket.  On 2026-12-01 eight gave reads, where the disk
#: is the limit, 5–8 % less, and writes, where our CPU is, more (1 µs less CPU per
#: request).  The take-all figure is printed too.
REFILL_GROUP = 4


def _file_engine(path: str, direct: bool) -> BlockEngine[DiskRequest]:
    target = DiskTarget(path, direct=direct)
    return DiskEngine[DiskRequest](target, workers=32 if direct else 4)


def _engine_run(path: str, *, write: bool, size: int, depth: int, sequential: bool,
                direct: bool, seconds: float, file_size: int,
                open_engine: Callable[[], BlockEngine[DiskRequest]] | None = None,
                refill: int = REFILL_GROUP) -> tuple[float, float, float]:
    area, buffers = _spread_buffers(depth, size)
    offsets = _offsets(file_size, size, sequential, 1 << 16)
    kind = IoKind.WRITE if write else IoKind.READ
    engine = open_engine() if open_engine is not None else _file_engine(path, direct)
    try:
        done = 0
        cursor = 0
        # one request object per slot of the queue, reused as fio reuses its io_u's
        requests = [DiskRequest(kind, 0, size) for _ in range(depth)]
        for req, slot_buffers in zip(requests, buffers, strict=True):
            req.buffers = slot_buffers
        in_flight: set[int] = set()

        def start(batch: list[DiskRequest]) -> list[DiskRequest]:
            nonlocal cursor
            for req in batch:
                req.offset = offsets[cursor % len(offsets)]
                cursor += 1
                req.status = IoStatus.IO_ERROR  # the engine must say OK, not inherit it
                in_flight.add(id(req))
            return engine.submit(batch)

        cpu0, t0 = _cpu(), time.perf_counter()
        # ``depth`` requests in flight all along, as fio keeps them: completions are
        # taken ``refill`` at a time (0: all there are) and replaced at once
        completed = start(requests)
        while True:
            while not completed:
                if not engine.has_completions:  # the last take may have left some
                    select.select([engine.completion_fd], [], [])
                completed = engine.take_completions(refill)
            failed = [r for r in completed if r.status != IoStatus.OK]
            if failed:  # a figure for failed requests would not be a figure
                raise RuntimeError(f"engine benchmark: {len(failed)} requests failed: "
                                   f"{failed[0]}")
            done += len(completed)
            for req in completed:
                in_flight.remove(id(req))  # KeyError: completed twice, or never started
            if time.perf_counter() - t0 >= seconds:
                break
            completed = start(completed)
        elapsed, cpu = time.perf_counter() - t0, _cpu() - cpu0
        give_up = time.monotonic() + 60
        while in_flight:  # the rest, outside the figures: none is left in flight
            if time.monotonic() > give_up:
                raise RuntimeError(f"engine benchmark: {len(in_flight)} requests never "
                                   "completed")
            select.select([engine.completion_fd], [], [], 1.0)
            for request in engine.take_completions():
                in_flight.remove(id(request))
    finally:
        engine.close()
        engine.target.close()
    _release(buffers)
    area.close()
    return done / elapsed, done * size / elapsed / 1e6, cpu / done * 1e6


def _release(buffers: list[list[memoryview]]) -> None:
    for request in buffers:
        for element in request:
            element.release()


def _raw_run(path: str, *, write: bool, size: int, sequential: bool, direct: bool,
             seconds: float, file_size: int, depth: int = 1) -> tuple[float, float]:
    """Plain ``os.preadv``/``os.pwritev`` on the file: one thread per request in flight,
    so ``depth`` threads keep the same queue depth as the workload (the syscalls release
    the GIL); ``depth=1`` is the single-thread loop.  Each call carries the iovecs a
    guest request brings (:func:`_spread_buffers`), not one contiguous buffer."""
    area, buffers = _spread_buffers(depth, size)
    offsets = _offsets(file_size, size, sequential, 1 << 16)
    fd = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
    counts = [0] * depth
    op = os.pwritev if write else os.preadv
    start = threading.Barrier(depth + 1)
    deadline = [0.0]

    def loop(i: int) -> None:
        buf, done, n = buffers[i], 0, len(offsets)
        start.wait()
        while time.perf_counter() < deadline[0]:
            for _ in range(16):
                op(fd, buf, offsets[(done * depth + i) % n])
                done += 1
        counts[i] = done

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(depth)]
    try:
        for thread in threads:
            thread.start()
        t0 = time.perf_counter()
        deadline[0] = t0 + seconds
        start.wait()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
        _release(buffers)
        area.close()
    done = sum(counts)
    return done / elapsed, done * size / elapsed / 1e6


def _fio(path: str, *, write: bool, size: int, depth: int, sequential: bool, direct: bool,
         seconds: float, nbd_uri: str | None = None) -> float | None:
    """fio's IOPS for the same workload at the same queue depth (see :func:`_fio_run`)."""
    figures = _fio_run(path, write=write, size=size, depth=depth, sequential=sequential,
                       direct=direct, seconds=seconds, nbd_uri=nbd_uri)
    return None if figures is None else figures[0]


def _fio_run(path: str, *, write: bool, size: int, depth: int, sequential: bool,
             direct: bool, seconds: float, nbd_uri: str | None = None,
             ) -> tuple[float, float | None] | None:
    """fio's IOPS and CPU µs per request (user + system, all its jobs) for the same
    workload at the same queue depth: libaio with ``iodepth`` for O_DIRECT, ``numjobs``
    synchronous jobs on the page cache, its libnbd engine with ``iodepth`` for an NBD
    export; None without fio or if its output cannot be read (a benchmark figure, never
    a failure)."""
    if shutil.which("fio") is None:
        return None
    rw = ("write" if write else "read") if sequential else ("randwrite" if write else "randread")
    depth_args = ([f"--iodepth={depth}", "--ioengine=libaio"] if direct else
                  [f"--numjobs={depth}", "--ioengine=psync", "--group_reporting"])
    # fio drops the file's page cache before it starts (``invalidate=1``): on the page
    # cache that would time the disk, not the cache our rows read from
    target = [f"--filename={path}", f"--direct={int(direct)}",
              *([] if direct else ["--invalidate=0"])]
    if nbd_uri is not None:
        depth_args = [f"--iodepth={depth}", "--ioengine=nbd"]  # its options follow it
        target = [f"--uri={nbd_uri}", f"--size={os.path.getsize(path)}"]
    try:
        out = subprocess.run(
            ["fio", "--name=vd", *depth_args, *target, f"--rw={rw}", f"--bs={size}",
             f"--runtime={max(1, int(seconds * 1000))}ms", "--time_based", "--eta=never",
             "--output-format=json"], capture_output=True, text=True, check=False,
            timeout=seconds + 60)
        if out.returncode:
            return None
        job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
        side = job["write" if write else "read"]
        iops = float(side["iops"])
    except (OSError, ValueError, KeyError, IndexError, subprocess.TimeoutExpired):
        return None
    try:  # usr_cpu/sys_cpu are percentages of job_runtime (ms, summed over the jobs)
        cpu_s = (float(job["usr_cpu"]) + float(job["sys_cpu"])) / 100 * job["job_runtime"] / 1e3
        cpu_us: float | None = cpu_s / int(side["total_ios"]) * 1e6
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        cpu_us = None
    return iops, cpu_us


WORKLOADS = [
    ("4k-randread-qd1", False, 4096, 1, False),
    ("4k-randread-qd32", False, 4096, 32, False),
    ("4k-randwrite-qd32", True, 4096, 32, False),
    ("1m-seqread-qd4", False, MiB, 4, True),
    ("1m-seqwrite-qd4", True, MiB, 4, True),
]


def run(*, quick: bool = False, directory: str | None = None) -> list[EngineFigures]:
    seconds = 0.3 if quick else 1.5
    file_size = (32 if quick else 256) * MiB
    figures = []
    with tempfile.TemporaryDirectory(prefix="vd-bench-", dir=directory or "/var/tmp") as tmp:
        path = os.path.join(tmp, "bench.img")
        make_image(path, file_size, random_fill=True)
        for direct in (False, True):
            for name, write, size, depth, sequential in WORKLOADS:
                label = f"{name}-{'direct' if direct else 'cached'}"
                iops, mbs, cpu = _engine_run(path, write=write, size=size, depth=depth,
                                             sequential=sequential, direct=direct,
                                             seconds=seconds, file_size=file_size)
                take_all = None
                if direct and depth > REFILL_GROUP:
                    take_all, _mbs, _cpu_all = _engine_run(
                        path, write=write, size=size, depth=depth, sequential=sequential,
                        direct=direct, seconds=seconds, file_size=file_size, refill=0)
                raw_iops, raw_mbs = _raw_run(path, write=write, size=size,
                                             sequential=sequential, direct=direct,
                                             seconds=seconds, file_size=file_size,
                                             depth=depth)
                fio = _fio_run(path, write=write, size=size, depth=depth,
                               sequential=sequential, direct=direct, seconds=seconds)
                figures.append(EngineFigures(
                    label, iops, mbs, cpu, raw_iops, raw_mbs,
                    fio[0] if fio is not None else None,
                    fio[1] if fio is not None else None, take_all))
        raw_of = {fig.name.rsplit("-", 1)[0]: fig for fig in figures
                  if fig.name.endswith("-cached")}
        figures += _storage_rows(tmp, path, file_size, seconds, raw_of)
    return figures


#: The workloads the storage rows repeat (cached: the servers use the page cache).
STORAGE_WORKLOADS = [w for w in WORKLOADS if w[0] != "4k-randread-qd1"]
STORAGE_TOOLS = ("qemu-nbd", "qemu-img", "qemu-storage-daemon")


@contextmanager
def _served(tmp: str, path: str, kind: str) -> Iterator[str]:
    """An NBD URI for the bench file: qemu-nbd on the raw file (``nbd``), or
    qemu-storage-daemon on a qcow2 copy (``qcow2``)."""
    sock = os.path.join(tmp, f"{kind}.sock")
    if kind == "nbd":
        server = subprocess.Popen(["qemu-nbd", "--persistent", "--shared=16", "--format=raw",
                                   "--cache=writeback", "--export-name=disk",
                                   f"--socket={sock}", path], stdin=subprocess.DEVNULL)
        try:
            while not os.path.exists(sock):
                if server.poll() is not None:
                    raise RuntimeError("qemu-nbd did not start")
                time.sleep(0.01)
            yield f"nbd+unix:///disk?socket={sock}"
        finally:
            server.terminate()
            server.wait()
        return
    image = os.path.join(tmp, "bench.qcow2")
    if not os.path.exists(image):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", path, image],
                       check=True)
    daemon = StorageDaemon(image=image, driver="qcow2", socket_path=sock, read_only=False)
    daemon.start()
    try:
        yield f"nbd+unix:///{EXPORT_NAME}?socket={sock}"
    finally:
        daemon.stop()


def _storage_rows(tmp: str, path: str, file_size: int, seconds: float,
                  raw_of: dict[str, EngineFigures]) -> list[EngineFigures]:
    missing = [tool for tool in STORAGE_TOOLS if shutil.which(tool) is None]
    if missing:
        print(f"(no qcow2/NBD rows: {', '.join(missing)} not installed — Debian "
              "qemu-utils, qemu-system-common)")
        return []
    figures = []
    for kind in ("nbd", "qcow2"):
        for name, write, size, depth, sequential in STORAGE_WORKLOADS:
            with _served(tmp, path, kind) as uri:
                def opened(uri: str = uri) -> BlockEngine[DiskRequest]:
                    return open_storage(StorageRequest(
                        params=uri, name="bench", rules=StorageRules(nbd_uris=True)))

                iops, mbs, cpu = _engine_run(path, write=write, size=size, depth=depth,
                                             sequential=sequential, direct=False,
                                             seconds=seconds, file_size=file_size,
                                             open_engine=opened)
                fio = _fio_run(path, write=write, size=size, depth=depth,
                               sequential=sequential, direct=False, seconds=seconds,
                               nbd_uri=uri)
            raw = raw_of[name]
            figures.append(EngineFigures(
                f"{name}-{kind}", iops, mbs, cpu, raw.raw_iops, raw.raw_mb_per_s,
                fio[0] if fio is not None else None, fio[1] if fio is not None else None))
    return figures


def main(*, quick: bool = False) -> list[EngineFigures]:
    print("disk engine vs raw preadv/pwritev at the same queue depth (one thread per request "
          "in flight), same file, same run; both with a guest request's iovecs (4 KiB "
          f"pages apart; 1 MiB = {MiB // guest_element_size(MiB)} x "
          f"{guest_element_size(MiB) >> 10} KiB)")
    print("-nbd rows: qemu-nbd serving the raw file; -qcow2: qemu-storage-daemon serving a "
          "qcow2 copy; their fio column is fio's libnbd engine on the same export")
    print(f"completions are taken {REFILL_GROUP} at a time and refilled at once (fio "
          "refills as it reaps); 'take-all' rows below: the same engine taking every "
          "finished request first")
    print(f"{'workload':<28}{'IOPS':>10}{'MB/s':>9}{'CPU µs/io':>11}{'raw IOPS':>11}"
          f"{'raw MB/s':>10}{'fio IOPS':>10}{'fio µs/io':>10}{'/ fio':>7}")
    figures = run(quick=quick)
    for fig in figures:
        fio = f"{fig.fio_iops:>10.0f}" if fig.fio_iops is not None else f"{'-':>10}"
        fio_cpu = (f"{fig.fio_cpu_us_per_io:>10.1f}" if fig.fio_cpu_us_per_io is not None
                   else f"{'-':>10}")
        ratio = (f"{fig.iops / fig.fio_iops:>6.2f}x" if fig.fio_iops else f"{'-':>7}")
        print(f"{fig.name:<28}{fig.iops:>10.0f}{fig.mb_per_s:>9.0f}{fig.cpu_us_per_io:>11.1f}"
              f"{fig.raw_iops:>11.0f}{fig.raw_mb_per_s:>10.0f}{fio}{fio_cpu}{ratio}")
    for fig in figures:
        if fig.iops_take_all is not None:
            ratio = (f" = {fig.iops_take_all / fig.fio_iops:.2f} x fio" if fig.fio_iops
                     else "")
            print(f"  take-all {fig.name}: {fig.iops_take_all:.0f} IOPS{ratio}")
    return figures
