"""The whole data path measured: guest driver → trapped MMIO → the daemon → disk.

The simulated host runs in this process (xenstored, hypervisor, the guest's
vCPU threads and Linux-like driver); the daemon runs as its own process
(``virtio-diskd --domid 1 --poll-us N``, the worker's code path), so its CPU
time and RSS are its own.  Each workload runs on a file in the page cache and
with ``--direct-io``; next to it, the same workload's raw ``os.preadv``/
``os.pwritev`` figures on the same file in the same run, at the same queue depth
(one thread per request in flight) and single-threaded (and fio's when it is
installed).

Every byte is verified: reads against the image file (mapped read-only in this
process), acknowledged writes by reading the file back after the run.

The physical floor of a trap here is a wake-up across processes; it is measured
in the same run (an eventfd ping-pong between two sleeping processes) and
printed next to the trap round trip.  The simulated vCPU may poll for its
answer for ``vcpu_spin_us`` before sleeping, as a real vCPU is resumed by Xen
within microseconds; the daemon's own polling is its ``--poll-us``.
"""

from __future__ import annotations

import mmap
import os
import resource
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass

import trio

from virtio_diskd.backend import mmio
from virtio_diskd.daemon.tools import bench_engine
from virtio_diskd.daemon.tools.simrun import make_image, notify_socket, start_daemon, wait_ready
from virtio_diskd.ioreq.sim.host import SimHost
from virtio_diskd.ioreq.sim.hypervisor import Guest
from virtio_diskd.ioreq.sim.linux_driver import VirtioBlkDriver
from virtio_diskd.ioreq.sim.machine import attach_driver
from virtio_diskd.ioreq.sim.toolstack import DiskSpec, GuestSpec
from virtio_diskd.ioreq.sim.workload import Workload, WorkloadSpec

MiB = 1 << 20
DOMID = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class FullFigures:
    name: str
    iops: float
    mb_per_s: float
    lat_p50_us: float
    lat_p99_us: float
    daemon_cpu_us_per_io: float
    raw_iops: float
    raw_mb_per_s: float
    traps_per_1000: float
    interrupts_per_1000: float
    requests: int
    verified: bool
    verified_bytes: int = 0
    raw_qd1_iops: float = 0.0
    raw_qd1_mb_per_s: float = 0.0
    queue_depth: int = 1
    poll_us: int = 0
    vcpu_spin_us: int = 0
    fio_iops: float | None = None
    #: queue depth 1: the median request's time the vCPU waited for the backend (its
    #: three trapped accesses and the completion's interrupt); ``lat_p50_us`` less this
    #: is the simulated guest driver's own Python, which a Linux guest does in C
    device_wait_p50_us: float = 0.0


@dataclass
class SyscallFigures:
    """System calls the daemon made per request (all its threads), counted by
    ``strace -c`` attached to it for a fixed number of requests.  On the simulated host
    the hypervisor is a socket peer, so its calls show as socket I/O; on real Xen they
    are privcmd/evtchn ioctls and reads, one for one."""

    workload: str
    requests: int
    per_request: float
    by_name: dict[str, float]


@dataclass
class TrapFigures:
    mode: str
    vcpu_spin_us: int
    mmio_reads_per_s: float
    us_per_read: float


@dataclass
class WakeFloor:
    """A wake-up across processes on this machine, measured in the same run."""

    round_trip_us: float
    cpu_us_per_wake: float


def wake_floor(count: int) -> WakeFloor:
    """Eventfd ping-pong between two processes that sleep in ``poll`` between events:
    what any trap costs here at least when neither side polls."""
    import select

    ping = os.eventfd(0, os.EFD_CLOEXEC)
    pong = os.eventfd(0, os.EFD_CLOEXEC)
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child side
        try:
            poller = select.poll()
            poller.register(ping, select.POLLIN)
            for _ in range(count):
                poller.poll()
                os.eventfd_read(ping)
                os.eventfd_write(pong, 1)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            os.write(report_w, f"{usage.ru_utime + usage.ru_stime}".encode())
        finally:
            os._exit(0)
    os.close(report_w)
    try:
        poller = select.poll()
        poller.register(pong, select.POLLIN)
        started = time.perf_counter()
        for _ in range(count):
            os.eventfd_write(ping, 1)
            poller.poll()
            os.eventfd_read(pong)
        elapsed = time.perf_counter() - started
        os.waitpid(pid, 0)
        child_cpu = float(os.read(report_r, 64) or b"0")
    finally:
        for fd in (ping, pong, report_r):
            os.close(fd)
    return WakeFloor(elapsed / count * 1e6, child_cpu / count * 1e6)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


WORKLOADS = [
    # name, mix, block size, queue depth, pattern
    ("4k-randread-qd1", "read", 4096, 1, "random"),
    ("4k-randread-qd32", "read", 4096, 32, "random"),
    ("4k-randwrite-qd32", "write", 4096, 32, "random"),
    ("1m-seqread-qd4", "read", MiB, 4, "sequential"),
    ("1m-seqwrite-qd4", "write", MiB, 4, "sequential"),
]


@dataclass
class BenchSettings:
    quick: bool = False
    poll_us: int = 50
    vcpu_spin_us: int = 200
    workloads: list[str] | None = None  # names of WORKLOADS to run (None: all)


async def _one_mode(work: str, direct: bool, settings: BenchSettings,
                    results: list[FullFigures], traps: list[TrapFigures],
                    rss: list[float], syscalls: list[SyscallFigures]) -> None:
    quick = settings.quick
    image = os.path.join(work, f"disk-{'direct' if direct else 'cached'}.img")
    size = (64 if quick else 512) * MiB
    await trio.to_thread.run_sync(lambda: make_image(image, size, random_fill=True))
    host = SimHost(work)
    async with host.running():
        notify_path = os.path.join(work, "notify.sock")
        notify = notify_socket(notify_path)
        extra = ["--domid", str(DOMID), "--log-level", "warning",
                 "--poll-us", str(settings.poll_us)]
        if direct:
            extra.append("--direct-io")
        daemon = start_daemon(work, host.xenstore_path, notify_path,
                              os.path.join(work, "daemon.log"), extra)
        try:
            if not await wait_ready(notify, 60):
                raise RuntimeError("the daemon did not become ready")
            spec = GuestSpec(DOMID, "bench", [DiskSpec(image, "xvda")], vcpus=1)
            (plan,) = await host.create(spec, memory_mib=256)
            guest = host.guests[DOMID]
            driver = await trio.to_thread.run_sync(
                lambda: attach_driver(guest, plan.base, plan.irq))
            mode = "direct" if direct else "cached"
            for spin in sorted({0, settings.vcpu_spin_us}):
                traps.append(await trio.to_thread.run_sync(
                    _trap_rate, guest, plan.base, quick, mode, spin))
            guest.hv.spin_us = settings.vcpu_spin_us
            reference = _map_read_only(image)
            view = memoryview(reference)
            chosen = [w for w in WORKLOADS
                      if settings.workloads is None or w[0] in settings.workloads]
            try:
                for workload in chosen:
                    results.append(await _workload_figures(
                        guest, driver, daemon.pid, workload, image, size, direct, settings,
                        view))
                # 4 KiB reads at QD1 (three traps a request: real Xen's shape under
                # dd) and QD32, 1 MiB reads
                for workload in SYSCALL_COUNTED:
                    if workload not in chosen:
                        continue
                    counted = await _syscall_profile(guest, driver, daemon.pid, workload,
                                                     size, settings, view, work)
                    if counted is not None:
                        counted.workload += f"-{mode}"
                        syscalls.append(counted)
            finally:
                view.release()
                reference.close()
            rss.append(_rss_mib(daemon.pid))
            await host.destroy(DOMID)
        finally:
            host.hypervisor.spin_us = 0.0
            daemon.terminate()
            await trio.to_thread.run_sync(lambda: daemon.wait(30))
            notify.close()
    os.unlink(image)


def _map_read_only(path: str) -> mmap.mmap:
    """The image as the reference every read is compared with (the page cache, so it
    stays current as the daemon writes, with or without O_DIRECT)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


async def _workload_figures(guest: Guest, driver: VirtioBlkDriver, pid: int,
                            workload: tuple[str, str, int, int, str], image: str, size: int,
                            direct: bool, settings: BenchSettings,
                            reference: memoryview) -> FullFigures:
    name, mix, block, depth, pattern = workload
    mode = "direct" if direct else "cached"
    seconds = 0.4 if settings.quick else 2.0
    reference_seconds = 0.2 if settings.quick else seconds  # raw loops and fio
    fig = await _measure(guest, driver, pid, name, mix, block, depth, pattern, size, seconds,
                         reference, image)
    fig.name = f"{name}-{mode}"
    fig.poll_us, fig.vcpu_spin_us = settings.poll_us, settings.vcpu_spin_us
    write, sequential = mix == "write", pattern == "sequential"

    def raw(at_depth: int) -> tuple[float, float]:
        return bench_engine._raw_run(image, write=write, size=block, sequential=sequential,
                                     direct=direct, seconds=reference_seconds, file_size=size,
                                     depth=at_depth)

    fig.raw_iops, fig.raw_mb_per_s = await trio.to_thread.run_sync(raw, depth)
    fig.raw_qd1_iops, fig.raw_qd1_mb_per_s = await trio.to_thread.run_sync(raw, 1)
    fig.fio_iops = bench_engine._fio(image, write=write, size=block, depth=depth,
                                     sequential=sequential, direct=direct,
                                     seconds=reference_seconds)
    return fig


#: the workloads whose system calls are counted (each one more run, under strace)
SYSCALL_COUNTED = [WORKLOADS[0], WORKLOADS[1], WORKLOADS[3]]


async def _syscall_profile(guest: Guest, driver: VirtioBlkDriver, pid: int,
                           workload: tuple[str, str, int, int, str], size: int,
                           settings: BenchSettings, reference: memoryview,
                           work: str) -> SyscallFigures | None:
    """``strace -c -f -p`` on the daemon while the guest makes a fixed number of requests
    (strace slows every call down: these runs give counts, never speed)."""
    if shutil.which("strace") is None:
        return None
    name, mix, block, depth, pattern = workload
    requests = 1000 if settings.quick else 10000
    out = os.path.join(work, "strace.txt")
    tracer = await trio.lowlevel.open_process(
        ["strace", "-c", "-f", "-qq", "-o", out, "-p", str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await trio.sleep(0.5)  # attached to every thread
        spec = WorkloadSpec(pattern=pattern, mix=mix, block_size=block, queue_depth=depth,
                            requests=requests, sectors=size // 512, seed=11,
                            write_first=False)
        vcpu = guest.vcpus[0]
        workload_run = Workload(driver, vcpu, spec, reference=reference)
        result = await trio.to_thread.run_sync(lambda: vcpu.call(workload_run.run, 600))
    finally:
        tracer.send_signal(signal.SIGINT)
        with trio.move_on_after(30):
            await tracer.wait()
    if not (result.ok and result.every_read_verified):
        raise RuntimeError(f"{name} under strace: the data did not verify")
    calls = _strace_counts(out)
    n = max(result.requests, 1)
    return SyscallFigures(name, result.requests, sum(calls.values()) / n,
                          {k: v / n for k, v in sorted(calls.items(), key=lambda kv: -kv[1])})


def _strace_counts(path: str) -> dict[str, int]:
    """``strace -c``'s table: syscall name → calls (the total line left out)."""
    counts: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 5 or not fields[3].isdigit() or fields[-1] == "total":
                continue
            counts[fields[-1]] = int(fields[3])
    return counts


def _trap_rate(guest: Guest, base: int, quick: bool, mode: str, spin: int) -> TrapFigures:
    count = 2000 if quick else 20000

    def loop() -> float:
        started = time.perf_counter()
        for _ in range(count):
            guest.mmio(base + mmio.REG_MAGIC, 4, False)
        return time.perf_counter() - started

    guest.hv.spin_us = spin
    try:
        guest.vcpus[0].call(loop, 300)  # warm-up: the daemon's polling window adapts
        elapsed = guest.vcpus[0].call(loop, 300)
    finally:
        guest.hv.spin_us = 0.0
    return TrapFigures(mode, spin, count / elapsed, elapsed / count * 1e6)


async def _measure(guest: Guest, driver: VirtioBlkDriver, pid: int, name: str, mix: str,
                   block: int, depth: int, pattern: str, size: int, seconds: float,
                   disk: memoryview, image: str) -> FullFigures:
    spec = WorkloadSpec(pattern=pattern, mix=mix, block_size=block, queue_depth=depth,
                        requests=10**9, seconds=seconds, sectors=size // 512, seed=5,
                        write_first=False)
    vcpu = guest.vcpus[0]
    traps0 = vcpu.traps
    irqs0 = guest.irqs_delivered
    cpu0 = _cpu_seconds(pid)
    workload = Workload(driver, vcpu, spec, reference=disk)
    result = await trio.to_thread.run_sync(lambda: vcpu.call(workload.run, 600))
    cpu = _cpu_seconds(pid) - cpu0
    writes_on_disk = True
    if result.writes:  # outside the timed part: the file must hold every acknowledged write
        def check_file() -> int:
            with open(image, "rb") as f:
                return workload.verify_disk(lambda offset, length: os.pread(f.fileno(), length,
                                                                            offset))
        checked = await trio.to_thread.run_sync(check_file)
        writes_on_disk = checked == len(workload.acked) == result.disk_blocks_checked
    n = max(result.requests, 1)
    lat = sorted(result.latencies_us) or [0.0]
    return FullFigures(
        name=name, iops=result.requests / result.elapsed,
        mb_per_s=result.bytes / result.elapsed / 1e6,
        lat_p50_us=statistics.median(lat), lat_p99_us=lat[min(len(lat) - 1, int(len(lat) * .99))],
        daemon_cpu_us_per_io=cpu / n * 1e6, raw_iops=0.0, raw_mb_per_s=0.0,
        traps_per_1000=(vcpu.traps - traps0) / n * 1000,
        interrupts_per_1000=(guest.irqs_delivered - irqs0) / n * 1000,
        requests=result.requests,
        verified=result.ok and result.every_read_verified and writes_on_disk,
        verified_bytes=result.verified_sectors * 512, queue_depth=depth,
        device_wait_p50_us=statistics.median(result.device_waits_us)
        if result.device_waits_us else 0.0)


@dataclass
class FullReport:
    workloads: list[FullFigures]
    traps: list[TrapFigures]
    rss_mib: list[float]
    syscalls: list[SyscallFigures]


def run(settings: BenchSettings) -> FullReport:
    report = FullReport([], [], [], [])
    with tempfile.TemporaryDirectory(prefix="vd-bench-full-", dir="/var/tmp") as work:
        for direct in (False, True):
            trio.run(_one_mode, work, direct, settings, report.workloads, report.traps,
                     report.rss_mib, report.syscalls)
    return report


def main(settings: BenchSettings) -> FullReport:
    floor = wake_floor(2000 if settings.quick else 20000)
    report = run(settings)
    results, traps, rss = report.workloads, report.traps, report.rss_mib
    print("full path: guest driver -> trapped MMIO -> virtio-diskd (own process) -> file")
    print(f"daemon --poll-us {settings.poll_us}; simulated vCPU polls {settings.vcpu_spin_us} µs "
          "for its answer before sleeping; raw = plain preadv/pwritev on the same file at the "
          "same queue depth (one thread per request), raw1 = one thread, each call with the "
          "guest request's iovecs")
    print(f"{'workload':<26}{'IOPS':>8}{'MB/s':>7}{'p50 µs':>8}{'p99 µs':>8}{'cpu µs/io':>10}"
          f"{'raw IOPS':>10}{'raw MB/s':>9}{'raw1 IOPS':>10}{'raw1 MB/s':>10}{'traps/1k':>9}"
          f"{'irqs/1k':>8}{'fio':>8}  verified")
    for f in results:
        fio = f"{f.fio_iops:>8.0f}" if f.fio_iops is not None else f"{'-':>8}"
        print(f"{f.name:<26}{f.iops:>8.0f}{f.mb_per_s:>7.0f}{f.lat_p50_us:>8.0f}"
              f"{f.lat_p99_us:>8.0f}{f.daemon_cpu_us_per_io:>10.1f}{f.raw_iops:>10.0f}"
              f"{f.raw_mb_per_s:>9.0f}{f.raw_qd1_iops:>10.0f}{f.raw_qd1_mb_per_s:>10.0f}"
              f"{f.traps_per_1000:>9.0f}{f.interrupts_per_1000:>8.0f}{fio}  "
              f"{'yes' if f.verified else 'NO'} ({f.verified_bytes / 1e6:.0f} MB)")
    for f in results:
        if f.device_wait_p50_us:
            print(f"{f.name}: of the median request, {f.device_wait_p50_us:.0f} µs waiting for "
                  f"the device (three trapped accesses, the interrupt); the simulated "
                  f"driver's own Python is the rest of its {f.lat_p50_us:.0f} µs")
    for t in traps:
        print(f"trapped MMIO read, {t.mode}, vCPU polls {t.vcpu_spin_us} µs: "
              f"{t.mmio_reads_per_s:.0f}/s ({t.us_per_read:.1f} µs per round trip)")
    print(f"floor: eventfd round trip between two sleeping processes {floor.round_trip_us:.1f} µs,"
          f" {floor.cpu_us_per_wake:.1f} µs CPU per wake-up")
    if rss:
        print(f"daemon RSS with one guest, one disk: {max(rss):.1f} MiB")
    for s in report.syscalls:
        top = ", ".join(f"{name} {count:.2f}" for name, count in list(s.by_name.items())[:6])
        print(f"syscalls per request, {s.workload} (strace -c, {s.requests} requests): "
              f"{s.per_request:.2f} — {top}")
    if not report.syscalls:
        print("syscalls per request: " + ("counted only for " + ", ".join(
            w[0] for w in SYSCALL_COUNTED) if shutil.which("strace") else
            "strace is not installed"))
    return report
