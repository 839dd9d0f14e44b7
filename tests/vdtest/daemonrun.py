"""A running daemon (its own process) against an in-process simulated host."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from virtio_diskd.daemon.status import collect
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
    notify: socket.socket
    extra: list[str] | None = None
    wrapper: list[str] | None = None
    specs: dict[int, GuestSpec] = field(default_factory=dict)

    def daemon_processes(self) -> list[int]:
        """The supervisor and every process under it (zygote, workers)."""
        found, todo = [], [self.daemon.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += _children_of(pid)
        return found

    async def stop_daemon(self, *, kill: bool) -> None:
        """SIGKILL every daemon process at once (a crash, an OOM kill), or SIGTERM the
        supervisor and wait for it (``systemctl stop``)."""
        if kill:
            for pid in self.daemon_processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await trio.to_thread.run_sync(self.daemon.wait)
            return
        self.daemon.send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(lambda: self.daemon.wait(30))
        if code != 0:
            raise RuntimeError(f"daemon exited with {code} on SIGTERM:\n{self.log_text()}")

    async def start_daemon(self) -> None:
        """Start the daemon again, as systemd would, and wait for READY=1."""
        self.daemon = start_daemon(str(self.work), self.host.xenstore_path,
                                   str(self.work / "notify.sock"), str(self.log), self.extra,
                                   wrapper=self.wrapper)
        if not await wait_ready(self.notify, 60):
            raise RuntimeError(f"daemon not ready again:\n{self.log_text()}")

    def image(self, name: str, mib: int = 8) -> str:
        path = str(self.work / name)
        make_image(path, mib << 20)
        return path

    async def create(self, domid: int, disks: list[DiskSpec], vcpus: int = 1,
                     memory_mib: int = 64) -> list[DiskPaths]:
        spec = GuestSpec(domid, f"guest{domid}", list(disks), vcpus=vcpus)
        self.specs[domid] = spec
        return await self.host.create(spec, memory_mib=memory_mib)

    async def attach(self, domid: int, disk: DiskSpec) -> DiskPaths:
        """``xl block-attach``: one more disk for guest ``domid``."""
        return await self.host.attach(self.specs[domid], disk)

    async def driver(self, domid: int, plan: DiskPaths, *, grants: bool = False,
                     packed: bool = True) -> VirtioBlkDriver:
        guest = self.host.guests[domid]
        return await trio.to_thread.run_sync(
            lambda: attach_driver(guest, plan.base, plan.irq, grants=grants, packed=packed))

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

    def worker_pid(self, domid: int) -> int | None:
        """The pid of the worker serving guest ``domid``, as its status socket says;
        None while there is none."""
        for status in collect(str(self.work / "run")):
            if status.get("role") == "worker" and status.get("domid") == domid:
                return int(status["pid"])
        return None

    def serving_worker(self, domid: int) -> int:
        """:meth:`worker_pid`, which must be there."""
        pid = self.worker_pid(domid)
        if pid is None:
            raise AssertionError(f"no worker serves guest {domid}")
        return pid


@asynccontextmanager
async def running_daemon(work: Path, extra: list[str] | None = None,
                         wrapper: list[str] | None = None) -> AsyncIterator[Running]:
    host = SimHost(str(work))
    async with host.running():
        notify = notify_socket(str(work / "notify.sock"))
        log = work / "daemon.log"
        daemon = start_daemon(str(work), host.xenstore_path, str(work / "notify.sock"),
                              str(log), extra, wrapper=wrapper)
        running: Running | None = None
        try:
            if not await wait_ready(notify, 60):
                raise RuntimeError(f"daemon not ready:\n{log.read_text()}")
            running = Running(host, daemon, work, log, notify, extra, wrapper)
            yield running
        finally:
            if running is not None:
                daemon = running.daemon
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
            # image servers outlive a stopped daemon on purpose (a successor reuses them;
            # under systemd the unit's cgroup ends them): this test's go with it
            for pid in _storage_daemons_under(work):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _processes(wanted: Callable[[Path], bool]) -> list[int]:
    """The pids of the processes for which ``wanted(/proc/PID)`` holds."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if wanted(entry):
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
    return found


def _children_of(pid: int) -> list[int]:
    return _processes(lambda proc: int((proc / "stat").read_text()
                                       .rsplit(")", 1)[1].split()[1]) == pid)


def _storage_daemons_under(work: Path) -> list[int]:
    """qemu-storage-daemon processes whose socket is in ``work``."""
    def ours(proc: Path) -> bool:
        cmdline = (proc / "cmdline").read_bytes()
        return b"qemu-storage-daemon" in cmdline and str(work).encode() in cmdline

    return _processes(ours)
