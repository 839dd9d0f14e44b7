"""``virtio-diskd demo``: the product end to end on the simulated host.

1. start the simulated host (xenstored, hypervisor, libxl-contract toolstack);
2. start ``virtio-diskd --foreground`` against it as its own process, and wait
   for its READY=1 on a notify socket, as systemd would;
3. ``xl create`` a guest with two virtio disks on temporary images (one
   read-only) — libxl's 10 s InitWait contract must hold;
4. the guest's Linux-like driver probes both devices through trapped MMIO and
   runs a verifying workload on them, with a progress bar;
5. ``xl destroy`` the guest (state 6 within libxl's 10 s), then SIGTERM the
   daemon (exit 0);
6. print what happened; exit status 0 only if every step held.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import trio

from virtio_diskd.backend import blk
from virtio_diskd.daemon.tools.simrun import make_image, notify_socket, start_daemon, wait_ready
from virtio_diskd.ioreq.sim.host import SimHost
from virtio_diskd.ioreq.sim.hypervisor import Guest
from virtio_diskd.ioreq.sim.linux_driver import Request, VirtioBlkDriver
from virtio_diskd.ioreq.sim.machine import attach_driver
from virtio_diskd.ioreq.sim.toolstack import DiskSpec, GuestSpec
from virtio_diskd.ioreq.sim.workload import Workload, WorkloadSpec

DOMID = 1
DISK_MIB = 32


@dataclass
class Step:
    name: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0


@dataclass
class DemoReport:
    steps: list[Step] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str = "", seconds: float = 0.0) -> None:
        self.steps.append(Step(name, ok, detail, seconds))
        mark = "ok  " if ok else "FAIL"
        print(f"[{mark}] {name}{f' ({seconds:.2f} s)' if seconds else ''}"
              f"{': ' + detail if detail else ''}", flush=True)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps)


_QUARTERS_SHOWN: dict[str, int] = {}


def _progress(label: str, done: int, total: int) -> None:
    """A progress bar redrawn in place on a terminal; elsewhere (a pipe, a log, CI) a
    plain line at each quarter, instead of forty redraws run together."""
    if not sys.stdout.isatty():
        quarter = 4 * done // max(total, 1)
        if quarter > _QUARTERS_SHOWN.get(label, 0):
            _QUARTERS_SHOWN[label] = quarter
            print(f"  {label}: {done}/{total} requests", flush=True)
        return
    width = 30
    filled = width * done // max(total, 1)
    sys.stdout.write(f"\r  {label:<10} [{'#' * filled}{'.' * (width - filled)}] "
                     f"{done}/{total}")
    sys.stdout.flush()
    if done >= total:
        sys.stdout.write("\n")


async def run_demo(work: str, requests: int, report: DemoReport) -> None:
    images = [os.path.join(work, name) for name in ("data.img", "ro.img")]
    for path in images:
        make_image(path, DISK_MIB << 20)
    host = SimHost(work)
    async with host.running():
        notify_path = os.path.join(work, "notify.sock")
        notify = notify_socket(notify_path)
        started = time.monotonic()
        daemon = start_daemon(work, host.xenstore_path, notify_path,
                              os.path.join(work, "daemon.log"))
        try:
            ready = await wait_ready(notify, 60)
            report.add("daemon started, READY=1 received", ready,
                       f"pid {daemon.pid}", time.monotonic() - started)
            if not ready:
                return
            spec = GuestSpec(DOMID, "demo-guest", vcpus=2, disks=[
                DiskSpec(images[0], "xvda"), DiskSpec(images[1], "xvdb", access="ro")])
            started = time.monotonic()
            try:
                plans = await host.create(spec)
            except Exception as exc:
                report.add("xl create: both disks reached InitWait", False, str(exc))
                return
            report.add("xl create: both disks reached InitWait", True,
                       ", ".join(f"{p.backend.rsplit('/', 1)[1]}@{p.base:#x} irq {p.irq}"
                                 for p in plans), time.monotonic() - started)
            guest = host.guests[DOMID]
            drivers: list[VirtioBlkDriver] = []
            for plan in plans:
                base, irq = plan.base, plan.irq
                drivers.append(await trio.to_thread.run_sync(
                    functools.partial(attach_driver, guest, base, irq)))
            report.add("guest driver probed both devices", True,
                       f"capacity {drivers[0].capacity_sectors} sectors, xvdb read-only="
                       f"{drivers[1].read_only}")
            await _workloads(guest, drivers, requests, report)
            state = await host.xs.read(f"/local/domain/0/backend/virtio_disk/{DOMID}/"
                                       f"{plans[0].devid}/state")
            report.add("backend state Connected (4) while the guest drives the disk",
                       state == "4", f"state={state}")
            started = time.monotonic()
            stuck = await host.destroy(DOMID)
            report.add("xl destroy: devices Closed (6), nodes removed", not stuck,
                       f"stuck={stuck}", time.monotonic() - started)
        finally:
            started = time.monotonic()
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
            try:
                code = await trio.to_thread.run_sync(lambda: daemon.wait(30))
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = -9
            report.add("daemon stopped on SIGTERM with exit status 0", code == 0,
                       f"exit {code}", time.monotonic() - started)
            notify.close()


async def _workloads(guest: Guest, drivers: list[VirtioBlkDriver], requests: int,
                     report: DemoReport) -> None:
    rw, ro = drivers
    spec = WorkloadSpec(requests=requests, queue_depth=16, mix="mixed",
                        sectors=(DISK_MIB << 20) // 512 // 4, seed=7)
    last = {"shown": -1}

    def progress(done: int, total: int) -> None:
        if done * 40 // total != last["shown"] or done >= total:
            last["shown"] = done * 40 // total
            _progress("xvda", done, total)

    workload = Workload(rw, guest.vcpus[1], spec, progress=progress)
    started = time.monotonic()
    result = await trio.to_thread.run_sync(lambda: guest.vcpus[1].call(workload.run, 600))
    elapsed = time.monotonic() - started
    detail = (f"{result.requests} requests ({result.reads} reads, {result.writes} writes), "
              f"{result.bytes >> 20} MiB, {result.verified_sectors} sectors verified, "
              f"{result.requests / elapsed:.0f} req/s")
    if not result.ok:
        detail += f"; errors={result.errors} mismatches={result.mismatches[:3]}"
    report.add("verifying read/write workload on xvda", result.ok, detail, elapsed)

    def write_ro() -> tuple[int | None, int | None]:
        buf = ro.ram.alloc(4096)
        write = Request(blk.T_OUT, sector=0, data_addr=buf, data_len=4096,
                        on_complete=lambda r: guest.vcpus[1].post(lambda: None))
        read = Request(blk.T_IN, sector=0, data_addr=buf, data_len=4096,
                       on_complete=lambda r: guest.vcpus[1].post(lambda: None))
        ro.submit(0, [write, read])
        guest.vcpus[1].wait_until(lambda: write.status is not None and read.status is not None,
                                  30)
        return write.status, read.status

    write_status, read_status = await trio.to_thread.run_sync(
        lambda: guest.vcpus[1].call(write_ro, 60))
    report.add("read-only xvdb: writes refused, reads served",
               write_status == blk.S_IOERR and read_status == blk.S_OK,
               f"write status {write_status}, read status {read_status}")


def main(*, requests: int = 2000, keep: bool = False) -> int:
    work = tempfile.mkdtemp(prefix="vd-demo-")
    report = DemoReport()
    print(f"virtio-diskd demo in {work}")
    try:
        trio.run(run_demo, work, requests, report)
    except Exception as exc:
        report.add("demo", False, f"{type(exc).__name__}: {exc}")
    finally:
        log_path = os.path.join(work, "daemon.log")
        if not report.ok and os.path.exists(log_path):
            print("--- daemon log (last 40 lines) ---")
            with open(log_path, encoding="utf-8", errors="replace") as f:
                print("".join(f.readlines()[-40:]))
        if keep or not report.ok:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("demo: PASS" if report.ok else "demo: FAIL")
    return 0 if report.ok else 1
