"""A worker process: one guest's devices, in a process of their own.

``virtio-diskd --domid N`` runs this in the foreground (the
``virtio-diskd@.service`` template); the supervisor's workers run the same
code with ``--worker`` (forked from its zygote).  The guest's devices are
served by :class:`~virtio_diskd.ioreq.guest_service.GuestService`; this
module adds the process around it: the platform choice, the status socket,
READY=1 for a standalone worker, and SIGTERM closing every device.
"""

from __future__ import annotations

import contextlib
import os
import resource
from typing import Any

import structlog
import trio

from virtio_diskd.daemon import sdnotify, syscall_filter
from virtio_diskd.daemon.control import PAUSE_TIMEOUT, control_path, serve_control
from virtio_diskd.daemon.privileges import drop_capabilities, forbid_new_privileges
from virtio_diskd.daemon.process import DaemonConfig, DaemonProcess
from virtio_diskd.daemon.status import serve_status
from virtio_diskd.ioreq.guest_service import GuestService
from virtio_diskd.ioreq.xen.barrier import BARRIER_KIND
from virtio_diskd.ioreq.xen.interface import XenError, XenPlatform

log = structlog.get_logger("virtio_diskd")


def make_platform(config: DaemonConfig, self_domid: int) -> XenPlatform:
    """Xen's libraries, or the simulated hypervisor's binding with ``--simulated``."""
    if config.simulated:
        from virtio_diskd.ioreq.xen.simulated import SimPlatform

        return SimPlatform(os.path.join(config.simulated, "hypervisor.sock"), self_domid)
    from virtio_diskd.ioreq.xen.libxen import LibxenPlatform

    return LibxenPlatform()


def preload(config: DaemonConfig) -> None:
    """What is the same for every worker, done once in the zygote that forks them: the
    platform's modules imported, Xen's libraries loaded with their signatures declared,
    the seccomp filter compiled.  A worker then goes from its fork to its guest's
    InitWait without any of it (milliseconds natively, seconds under TCG)."""
    if config.simulated:
        from virtio_diskd.ioreq.xen import simulated  # noqa: F401
    else:
        from virtio_diskd.ioreq.xen import libxen

        for kind in ("devicemodel", "foreignmemory", "evtchn", "gnttab", "toolcore"):
            with contextlib.suppress(XenError):  # missing: the worker says so itself
                libxen.load(kind)
    if config.syscall_filter:
        syscall_filter.preload()


def _since_process_start() -> float | None:
    """Seconds since this process was forked (``/proc``, clock-tick resolution): how
    long a worker took to be ready to serve, inside libxl's 10 s for InitWait."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as uptime:
            now = float(uptime.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return round(max(0.0, now - started_ticks / os.sysconf("SC_CLK_TCK")), 2)


class Worker(DaemonProcess):
    """Serves guest ``config.domid``."""

    def __init__(self, config: DaemonConfig) -> None:
        super().__init__(config)
        if config.domid is None:
            raise ValueError("a worker serves one guest: --domid is required")
        self.domid: int = config.domid
        self.service: GuestService | None = None
        self.capabilities = "kept"  # what drop_capabilities left, for worker.started
        self.syscall_filter = "none (--no-syscall-filter)"

    def drop_capabilities(self) -> None:
        """Give up every capability (:mod:`~virtio_diskd.daemon.privileges`); a failure
        is logged by :meth:`serve` and the worker runs on."""
        try:
            self.capabilities = drop_capabilities().describe()
        except OSError as exc:
            self.capabilities = f"not dropped: {exc}"

    def install_syscall_filter(self) -> None:
        """Install the worker's seccomp filter (:mod:`~virtio_diskd.daemon.syscall_filter`);
        a failure is logged by :meth:`serve` and the worker runs unfiltered."""
        try:
            self.syscall_filter = syscall_filter.install().describe()
        except OSError as exc:
            self.syscall_filter = f"failed: {exc}"

    def _new_service(self, platform: XenPlatform) -> GuestService:
        self.service = GuestService(self.holder, platform, domid=self.domid,
                                    self_domid=self.self_domid, options=self.config.serve)
        return self.service

    def _snapshot(self) -> dict[str, Any]:
        if self.service is None:
            return {"role": "worker", "pid": os.getpid(), "domid": self.domid, "devices": {}}
        status = self.service.status()
        return {"role": "worker", "pid": os.getpid(), "domid": self.domid,
                "devices": {str(k): v for k, v in status.devices.items()},
                "ioreq": status.ioreq}

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        """``virtio-diskd ctl pause|resume DOMID VDEV`` for this guest."""
        op, vdev = request.get("op"), request.get("vdev")
        if op not in ("pause", "resume"):
            return {"error": f"unknown operation {op!r} (pause or resume)"}
        if not isinstance(vdev, str) or not vdev or len(vdev) > 32:
            return {"error": "a device name (vdev, as in the xl disk line) is needed"}
        service = self.service
        device = service.device_named(vdev) if service is not None else None
        if service is None or device is None:
            names = ", ".join(service.device_names()) if service is not None else ""
            return {"error": f"guest {self.domid} has no running device {vdev!r} "
                             f"(it has: {names or 'none'})"}
        if op == "resume":
            device.unpause()
            return {"domid": self.domid, "vdev": vdev, "paused": False}
        if not await device.pause(PAUSE_TIMEOUT):
            return {"error": f"dom{self.domid} {vdev}: {device.blk.pending()} requests still "
                             f"in flight after {PAUSE_TIMEOUT:.0f} s; new ones are held "
                             "(resume to undo)"}
        return {"domid": self.domid, "vdev": vdev, "paused": True, "flushed": True}

    async def serve(self, nursery: trio.Nursery) -> None:
        platform = make_platform(self.config, self.self_domid)
        service = self._new_service(platform)
        await nursery.start(serve_status,
                            os.path.join(self.config.rundir, f"dom{self.domid}.sock"),
                            self._snapshot)
        await nursery.start(serve_control, control_path(self.config.rundir, self.domid),
                            self._control)
        try:
            no_new_privs = forbid_new_privileges()
        except OSError as exc:
            log.warning("worker.no_new_privs_failed", error=str(exc))
            no_new_privs = False
        if self.capabilities != "none":
            log.warning("worker.capabilities_kept", domid=self.domid,
                        capabilities=self.capabilities)
        if self.syscall_filter.startswith("failed"):
            log.error("worker.syscall_filter_failed", domid=self.domid,
                      error=self.syscall_filter)
        log.info("worker.started", domid=self.domid, self_domid=self.self_domid,
                 since_fork_s=_since_process_start(),
                 no_new_privs=no_new_privs, capabilities=self.capabilities,
                 syscall_filter=self.syscall_filter,
                 simulated=bool(self.config.simulated), barrier=BARRIER_KIND,
                 target_policy=self.config.serve.target_policy.describe(),
                 storage=self.config.serve.storage.describe())
        if not self.config.worker:  # standalone (the template unit): READY=1 after the scan
            nursery.start_soon(self._ready_after_scan, service)
        while True:
            await service.run()
            if self.config.worker or self.stopping or service.detaching:
                break
            # --domid N in the foreground keeps waiting for the guest's next devices
            service = self._new_service(platform)
        usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this worker
        log.info("worker.finished", domid=self.domid, cpu_user_s=round(usage.ru_utime, 2),
                 cpu_system_s=round(usage.ru_stime, 2), minor_faults=usage.ru_minflt,
                 major_faults=usage.ru_majflt, voluntary_switches=usage.ru_nvcsw,
                 involuntary_switches=usage.ru_nivcsw)

    async def _ready_after_scan(self, service: GuestService) -> None:
        await service.scanned.wait()
        log.info("worker.ready", domid=self.domid)
        sdnotify.notify("READY=1")
        sdnotify.notify(f"STATUS=serving guest {self.domid}")

    def on_stop(self) -> None:
        """SIGTERM: leave the guest's devices to the next start (see README "Restarts")."""
        if self.service is not None:
            self.service.detach_all()
