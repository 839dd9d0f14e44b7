"""The whole data path measured: guest driver → trapped MMIO → the daemon → disk.

The simulated host runs in this process (xenstored, hypervisor, the guest's
vCPU threads and Linux-like driver); the daemon runs as its own process
(``virtio-diskd --domid 1``, the worker's code path), so its CPU time and RSS
are its own.  Each workload runs on a file in the page cache and with
``--direct-io``; next to it, the same workload's raw ``os.preadv``/``os.pwritev``
figures on the same file in the same run (and fio's when it is installed).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import trio

from virtio_diskd.backend import mmio
from virtio_diskd.daemon import bench_engine
from virtio_diskd.daemon.simrun import make_image, notify_socket, start_daemon, wait_ready
from virtio_diskd.ioreq.sim.guest import VirtioBlkDriver
from virtio_diskd.ioreq.sim.host import SimHost
from virtio_diskd.ioreq.sim.hypervisor import Guest
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
    fio_iops: float | None = None


@dataclass
class TrapFigures:
    mmio_reads_per_s: float
    us_per_read: float


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


async def _one_mode(work: str, direct: bool, quick: bool, results: list[FullFigures],
                    traps: list[TrapFigures], rss: list[float]) -> None:
    image = os.path.join(work, f"disk-{'direct' if direct else 'cached'}.img")
    size = (64 if quick else 512) * MiB
    await trio.to_thread.run_sync(lambda: make_image(image, size, random_fill=True))
    host = SimHost(work)
    async with host.running():
        notify_path = os.path.join(work, "notify.sock")
        notify = notify_socket(notify_path)
        extra = ["--domid", str(DOMID), "--log-level", "warning"]
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
            traps.append(await trio.to_thread.run_sync(lambda: _trap_rate(guest, plan.base,
                                                                            quick)))
            seconds = 0.5 if quick else 2.0
            for name, mix, block, depth, pattern in WORKLOADS:
                fig = await _measure(guest, driver, daemon.pid, name, mix, block, depth, pattern,
                                     size, seconds)
                raw_iops, raw_mbs = bench_engine._raw_run(
                    image, write=mix == "write", size=block, sequential=pattern == "sequential",
                    direct=direct, seconds=seconds, file_size=size)
                fig.name = f"{name}-{'direct' if direct else 'cached'}"
                fig.raw_iops, fig.raw_mb_per_s = raw_iops, raw_mbs
                fig.fio_iops = bench_engine._fio(image, write=mix == "write", size=block,
                                                 depth=depth, sequential=pattern == "sequential",
                                                 direct=direct, seconds=seconds)
                results.append(fig)
            rss.append(_rss_mib(daemon.pid))
            await host.destroy(DOMID)
        finally:
            daemon.terminate()
            await trio.to_thread.run_sync(lambda: daemon.wait(30))
            notify.close()
    os.unlink(image)


def _trap_rate(guest: Guest, base: int, quick: bool) -> TrapFigures:
    count = 2000 if quick else 20000

    def loop() -> float:
        started = time.perf_counter()
        for _ in range(count):
            guest.mmio(base + mmio.REG_MAGIC, 4, False)
        return time.perf_counter() - started

    elapsed = guest.vcpus[0].call(loop, 300)
    return TrapFigures(count / elapsed, elapsed / count * 1e6)


async def _measure(guest: Guest, driver: VirtioBlkDriver, pid: int, name: str, mix: str,
                   block: int, depth: int, pattern: str, size: int,
                   seconds: float) -> FullFigures:
    spec = WorkloadSpec(pattern=pattern, mix=mix, block_size=block, queue_depth=depth,
                        requests=10**9, seconds=seconds, sectors=size // 512, seed=5,
                        write_first=False)
    vcpu = guest.vcpus[0]
    traps0 = vcpu.traps
    irqs0 = guest.irqs_delivered
    cpu0 = _cpu_seconds(pid)
    workload = Workload(driver, vcpu, spec)
    result = await trio.to_thread.run_sync(lambda: vcpu.call(workload.run, 600))
    cpu = _cpu_seconds(pid) - cpu0
    n = max(result.requests, 1)
    lat = sorted(result.latencies_us) or [0.0]
    return FullFigures(
        name=name, iops=result.requests / result.elapsed,
        mb_per_s=result.bytes / result.elapsed / 1e6,
        lat_p50_us=statistics.median(lat), lat_p99_us=lat[min(len(lat) - 1, int(len(lat) * .99))],
        daemon_cpu_us_per_io=cpu / n * 1e6, raw_iops=0.0, raw_mb_per_s=0.0,
        traps_per_1000=(vcpu.traps - traps0) / n * 1000,
        interrupts_per_1000=(guest.irqs_delivered - irqs0) / n * 1000,
        requests=result.requests, verified=result.errors == 0 and not result.mismatches)


def run(*, quick: bool = False) -> tuple[list[FullFigures], list[TrapFigures], list[float]]:
    results: list[FullFigures] = []
    traps: list[TrapFigures] = []
    rss: list[float] = []
    with tempfile.TemporaryDirectory(prefix="vd-bench-full-", dir="/var/tmp") as work:
        for direct in (False, True):
            trio.run(_one_mode, work, direct, quick, results, traps, rss)
    return results, traps, rss


def main(*, quick: bool = False) -> list[FullFigures]:
    results, traps, rss = run(quick=quick)
    print("full path: guest driver -> trapped MMIO -> virtio-diskd (own process) -> file")
    print(f"{'workload':<26}{'IOPS':>9}{'MB/s':>8}{'p50 µs':>9}{'p99 µs':>9}{'cpu µs/io':>10}"
          f"{'raw IOPS':>10}{'raw MB/s':>9}{'traps/1k':>9}{'irqs/1k':>8}{'fio':>8}  ok")
    for f in results:
        fio = f"{f.fio_iops:>8.0f}" if f.fio_iops is not None else f"{'-':>8}"
        print(f"{f.name:<26}{f.iops:>9.0f}{f.mb_per_s:>8.0f}{f.lat_p50_us:>9.0f}"
              f"{f.lat_p99_us:>9.0f}{f.daemon_cpu_us_per_io:>10.1f}{f.raw_iops:>10.0f}"
              f"{f.raw_mb_per_s:>9.0f}{f.traps_per_1000:>9.0f}{f.interrupts_per_1000:>8.0f}"
              f"{fio}  {'yes' if f.verified else 'NO'}")
    for t in traps:
        print(f"MMIO register round trips: {t.mmio_reads_per_s:.0f}/s ({t.us_per_read:.1f} µs "
              f"per trapped read)")
    if rss:
        print(f"daemon RSS with one guest, one disk: {max(rss):.1f} MiB")
    return results
