"""A running daemon (its own process) against an in-process simulated host."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from virtio_diskd.daemon.tools.simrun import make_image, notify_socket, start_daemon, wait_ready
from virtio_diskd.ioreq.sim.host import SimHost
from virtio_diskd.ioreq.sim.linux_driver import VirtioBlkDriver
from virtio_diskd.ioreq.sim.machine import attach_driver
from virtio_diskd.ioreq.sim.toolstack import DiskPaths, DiskSpec, GuestSpec
from virtio_diskd.ioreq.sim.workload import Workload, WorkloadResult, WorkloadSpec


@dataclass
class Running:
    host: SimHost
    daemon: subprocess.Popen[bytes]
    work: Path
    log: Path

    def image(self, name: str, mib: int = 8) -> str:
        path = str(self.work / name)
        make_image(path, mib << 20)
        return path

    async def create(self, domid: int, disks: list[DiskSpec], vcpus: int = 1,
                     memory_mib: int = 64) -> list[DiskPaths]:
        return await self.host.create(GuestSpec(domid, f"guest{domid}", disks, vcpus=vcpus),
                                      memory_mib=memory_mib)

    async def driver(self, domid: int, plan: DiskPaths) -> VirtioBlkDriver:
        guest = self.host.guests[domid]
        return await trio.to_thread.run_sync(lambda: attach_driver(guest, plan.base, plan.irq))

    async def workload(self, domid: int, driver: VirtioBlkDriver, spec: WorkloadSpec,
                       vcpu: int = 0) -> WorkloadResult:
        guest = self.host.guests[domid]
        workload = Workload(driver, guest.vcpus[vcpu], spec)
        return await trio.to_thread.run_sync(lambda: guest.vcpus[vcpu].call(workload.run, 300))

    async def state(self, domid: int, devid: int) -> str | None:
        return await self.host.xs.read_or_none(
            f"/local/domain/0/backend/virtio_disk/{domid}/{devid}/state")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@asynccontextmanager
async def running_daemon(work: Path, extra: list[str] | None = None) -> AsyncIterator[Running]:
    host = SimHost(str(work))
    async with host.running():
        notify = notify_socket(str(work / "notify.sock"))
        log = work / "daemon.log"
        daemon = start_daemon(str(work), host.xenstore_path, str(work / "notify.sock"),
                              str(log), extra)
        try:
            if not await wait_ready(notify, 60):
                raise RuntimeError(f"daemon not ready:\n{log.read_text()}")
            yield Running(host, daemon, work, log)
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    await trio.to_thread.run_sync(lambda: daemon.wait(20))
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
            notify.close()
            for child in _children_of(daemon.pid):
                os.kill(child, signal.SIGKILL)


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found
