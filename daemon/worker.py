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
import errno
import functools
import os
import resource
from typing import Any

import structlog
import trio

from virtio_diskd.daemon import sdnotify, syscall_filter
from virtio_diskd.daemon.control import PAUSE_TIMEOUT, control_path, serve_control
from virtio_diskd.daemon.privileges import (
    IDENTITY_CAPABILITIES,
    REPLACE_ME,
    become,
    drop_capabilities,
    forbid_new_privileges,
    read_capabilities,
)
from virtio_diskd.daemon.process import DaemonConfig, DaemonProcess
from virtio_diskd.daemon.status import serve_status
from virtio_diskd.ioreq.guest_service import GuestService, PrivilegeHooks
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
        syscall_filter.preload(syscall_filter.worker_calls(config.worker_user is not None))


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
        self._capabilities_as_meant = False  # exactly the ones meant to be kept are left
        self.syscall_filter = "none (--no-syscall-filter)"
        self.user = "root"  # uid:gid once it changed user (--worker-user)
        self.replaced_because: str | None = None

    def drop_capabilities(self) -> None:
        """Give up every capability (:mod:`~virtio_diskd.daemon.privileges`) but, with
        ``--worker-user``, those that change user, until the guest runs; a failure is
        logged by :meth:`serve` and the worker runs on."""
        keep = IDENTITY_CAPABILITIES if self.config.worker_user is not None else ()
        try:
            left = drop_capabilities(keep)
            self.capabilities = left.describe()
            self._capabilities_as_meant = left.holds_only(keep)
        except OSError as exc:
            self.capabilities = f"not dropped: {exc}"

    def install_syscall_filter(self) -> None:
        """Install the worker's seccomp filter (:mod:`~virtio_diskd.daemon.syscall_filter`);
        a failure is logged by :meth:`serve` and the worker runs unfiltered."""
        allowed = syscall_filter.worker_calls(self.config.worker_user is not None)
        try:
            self.syscall_filter = syscall_filter.install(allowed).describe()
        except OSError as exc:
            self.syscall_filter = f"failed: {exc}"

    def _give_up_privileges(self, hand_over: tuple[str, ...]) -> bool:
        """The guest runs: become ``--worker-user`` (:func:`~.privileges.become`)."""
        user = self.config.worker_user
        if user is None:
            return False
        uid, gid = user.ids_for(self.domid)
        try:
            self._let_group_through(gid)
            become(uid, gid, hand_over)
        except OSError as exc:
            log.error("worker.user_change_failed", domid=self.domid, user=str(user),  # noqa: TRY400
                      uid=uid, gid=gid, error=str(exc))
            return False
        self.user = f"{uid}:{gid}"
        self.holder.on_lost = functools.partial(
            self._replace_me, "the xenstored connection was lost: reconnecting needs root")
        log.info("worker.user_changed", domid=self.domid, uid=uid, gid=gid,
                 handed_over=len(hand_over),
                 capabilities=read_capabilities().describe())
        return True

    def _let_group_through(self, gid: int) -> None:
        """The run directory and its ``state/`` (root's, 0700) become traversable, not
        listable, by the workers' group, so that the worker can reach its guest's
        state directory once it is no longer root.  OSError (nothing changed) when a
        directory above the run directory would stop it: the worker stays root then,
        rather than fail its guest's teardown later."""
        rundir = os.path.abspath(self.config.rundir)
        above = os.path.dirname(rundir)
        while True:
            info = os.stat(above)
            if not (info.st_mode & 0o001 or (info.st_gid == gid and info.st_mode & 0o010)):
                raise OSError(errno.EACCES, f"{above} (mode {info.st_mode & 0o7777:o}) "
                              f"is not traversable by group {gid} or others: the worker "
                              f"could not reach {rundir}")
            if above == os.path.dirname(above):
                break
            above = os.path.dirname(above)
        for path in (rundir, self.config.serve.state_dir):
            if path is None or not os.path.isdir(path):
                continue
            os.chown(path, -1, gid, follow_symlinks=False)
            os.chmod(path, 0o710)

    def _replace_me(self, reason: str) -> None:
        """Work needs what this worker gave up: leave the guest's devices to a
        successor (as on SIGTERM) and exit with :data:`REPLACE_ME`."""
        if self.replaced_because is not None:
            return
        self.replaced_because = reason
        log.info("worker.handing_over", domid=self.domid, reason=reason)
        if self.service is not None:
            self.service.detach_all()

    def _new_service(self, platform: XenPlatform) -> GuestService:
        self.service = GuestService(self.holder, platform, domid=self.domid,
                                    self_domid=self.self_domid, options=self.config.serve)
        if self.config.worker_user is not None:
            self.service.privileges = PrivilegeHooks(give_up=self._give_up_privileges,
                                                     need=self._replace_me)
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
        if not self._capabilities_as_meant:
            log.warning("worker.capabilities_kept", domid=self.domid,
                        capabilities=self.capabilities)
        if self.syscall_filter.startswith("failed"):
            log.error("worker.syscall_filter_failed", domid=self.domid,
                      error=self.syscall_filter)
        log.info("worker.started", domid=self.domid, self_domid=self.self_domid,
                 since_fork_s=_since_process_start(),
                 no_new_privs=no_new_privs, capabilities=self.capabilities,
                 syscall_filter=self.syscall_filter,
                 worker_user=str(self.config.worker_user or "root"),
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
        if self.replaced_because is not None:
            self.exit_code = REPLACE_ME
        usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this worker
        log.info("worker.finished", domid=self.domid, cpu_user_s=round(usage.ru_utime, 2),
                 cpu_system_s=round(usage.ru_stime, 2), minor_faults=usage.ru_minflt,
                 major_faults=usage.ru_majflt, voluntary_switches=usage.ru_nvcsw,
                 involuntary_switches=usage.ru_nivcsw, user=self.user,
                 replaced_because=self.replaced_because)

    async def _ready_after_scan(self, service: GuestService) -> None:
        await service.scanned.wait()
        log.info("worker.ready", domid=self.domid)
        sdnotify.notify("READY=1")
        sdnotify.notify(f"STATUS=serving guest {self.domid}")

    def on_stop(self) -> None:
        """SIGTERM: leave the guest's devices to the next start (see README "Restarts")."""
        if self.service is not None:
            self.service.detach_all()
