"""The daemon process: supervisor of per-guest workers, or one guest's worker.

Supervisor (``virtio-diskd --foreground``): watches
``/local/domain/<self>/backend/virtio_disk``, keeps one worker process per
guest that has devices (one IOREQ server per guest, and a crash stays inside
one guest), restarts a crashed worker with back-off (0.5 s doubling to 30 s),
and stops it when the guest's devices are gone.  READY=1 goes to systemd only
after the initial scan; STATUS carries the counts; the watchdog is pinged from
the event loop, so a wedged loop gets the service restarted.

Worker (``virtio-diskd --domid N``, also what the supervisor spawns):
:class:`~virtio_diskd.daemon.guest.GuestService` for guest N.

Signals: the first SIGTERM (or SIGINT) drains in-flight I/O, tears every
device down (state 6) and exits 0 within the grace period; a second one exits
at once.  SIGHUP re-reads the log level from ``--config`` and passes it on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from virtio_diskd.daemon import logsetup, sdnotify
from virtio_diskd.daemon.guest import GuestService, ServeOptions
from virtio_diskd.daemon.status import DEFAULT_RUNDIR, serve_status
from virtio_diskd.ioreq.xen.interface import XenPlatform
from virtio_diskd.ioreq.xenstore.client import XenstoreConnectionLost, drain
from virtio_diskd.ioreq.xenstore.holder import XenstoreHolder
from virtio_diskd.ioreq.xenstore.wire import XenstoreError

log = structlog.get_logger("virtio_diskd")

GRACE = 8.0  # seconds to drain and close on SIGTERM (libxl allows 10 for state 6)
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0


@dataclass
class DaemonConfig:
    xenstore: str | None = None
    simulated: str | None = None
    domid: int | None = None
    worker: bool = False
    rundir: str = DEFAULT_RUNDIR
    log_format: str = "console"
    log_level: str = "info"
    config_file: str | None = None
    serve: ServeOptions = field(default_factory=ServeOptions)
    worker_args: list[str] = field(default_factory=list)


def make_platform(config: DaemonConfig, self_domid: int) -> XenPlatform:
    if config.simulated:
        from virtio_diskd.ioreq.sim.xenbackend import SimPlatform

        return SimPlatform(os.path.join(config.simulated, "hypervisor.sock"), self_domid)
    from virtio_diskd.ioreq.xen.libxen import LibxenPlatform

    return LibxenPlatform()


def read_config_level(path: str | None) -> str | None:
    """``log_level = debug`` from the config file, if there is one."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.partition("=")
                if sep and key.strip() == "log_level":
                    return value.strip()
    except OSError as exc:
        log.warning("config.unreadable", path=path, error=str(exc))
    return None


async def own_domid(holder: XenstoreHolder) -> int:
    """Our domain id: the ``domid`` node of our home, 0 when absent (dom0)."""
    xs = await holder.client()
    value = await xs.read_or_none("domid")
    if value is None or not value.strip().isdigit():
        return 0
    return int(value.strip())


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.holder = XenstoreHolder(config.xenstore)
        self.stopping = False
        self.self_domid = 0
        self.workers: dict[int, WorkerHandle] = {}
        self.service: GuestService | None = None
        self._watch_scope: trio.CancelScope | None = None
        self._workers_gone = trio.Event()
        self.zygote: ZygoteClient | None = None

    # -- entry --------------------------------------------------------------------------

    async def main(self) -> int:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.holder.run)
                self.self_domid = await own_domid(self.holder)
                os.makedirs(self.config.rundir, exist_ok=True)
                nursery.start_soon(self._signals, signals, nursery.cancel_scope)
                nursery.start_soon(self._watchdog)
                if self.config.domid is not None:
                    await self._run_worker(nursery)
                else:
                    await self._run_supervisor(nursery)
                nursery.cancel_scope.cancel()
        return 0

    async def _signals(self, signals: Any, scope: trio.CancelScope) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                level = read_config_level(self.config.config_file)
                if level:
                    with contextlib.suppress(ValueError):
                        logsetup.configure(self.config.log_format, level)
                        self.config.log_level = level
                        log.info("daemon.reloaded", log_level=level)
                for worker in self.workers.values():
                    worker.signal(signal.SIGHUP)
                continue
            if self.stopping:
                log.warning("daemon.exit_now", signal=signal.Signals(signum).name)
                for worker in self.workers.values():
                    worker.signal(signal.SIGKILL)
                os._exit(1)
            self.stopping = True
            if self._watch_scope is not None:
                self._watch_scope.cancel()
            sdnotify.notify("STOPPING=1")
            log.info("daemon.stopping", signal=signal.Signals(signum).name, grace=GRACE)
            if self.service is not None:
                self.service.stop_all()
            for worker in self.workers.values():
                worker.signal(signal.SIGTERM)
            trio.lowlevel.spawn_system_task(self._grace_deadline, scope)

    async def _grace_deadline(self, scope: trio.CancelScope) -> None:
        await trio.sleep(GRACE)
        log.error("daemon.grace_expired")
        scope.cancel()

    async def _watchdog(self) -> None:
        interval = sdnotify.watchdog_interval()
        if interval is None:
            return
        while True:
            sdnotify.notify("WATCHDOG=1")
            await trio.sleep(interval)

    # -- worker mode ----------------------------------------------------------------------

    async def _run_worker(self, nursery: trio.Nursery) -> None:
        assert self.config.domid is not None
        domid = self.config.domid
        platform = make_platform(self.config, self.self_domid)
        service = GuestService(self.holder, platform, domid=domid, self_domid=self.self_domid,
                               options=self.config.serve)
        self.service = service

        def snapshot() -> dict[str, Any]:
            status = service.status()
            return {"role": "worker", "pid": os.getpid(), "domid": domid,
                    "devices": {str(k): v for k, v in status.devices.items()},
                    "ioreq": status.ioreq}

        await nursery.start(serve_status, os.path.join(self.config.rundir, f"dom{domid}.sock"),
                            snapshot)
        if not self.config.worker:
            sdnotify.notify("READY=1")
            sdnotify.notify(f"STATUS=serving guest {domid}")
        log.info("worker.started", domid=domid, self_domid=self.self_domid,
                 simulated=bool(self.config.simulated))
        while True:
            await service.run()
            if self.config.worker or self.stopping:
                break
            # --domid N in the foreground keeps waiting for the guest's next devices
            service = GuestService(self.holder, platform, domid=domid,
                                   self_domid=self.self_domid, options=self.config.serve)
            self.service = service
        log.info("worker.finished", domid=domid)

    # -- supervisor mode ------------------------------------------------------------------

    async def _start_zygote(self, nursery: trio.Nursery) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "virtio_diskd.daemon", *self.config.worker_args,
                 "--zygote-fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as exc:
            log.warning("zygote.unavailable", error=str(exc))
            ours.close()
            return
        finally:
            theirs.close()
        self.zygote = ZygoteClient(trio.socket.from_stdlib_socket(ours), process)
        nursery.start_soon(self.zygote.reader)
        with trio.move_on_after(30):
            await self.zygote.ready.wait()

    async def _run_supervisor(self, nursery: trio.Nursery) -> None:
        root = f"/local/domain/{self.self_domid}/backend/virtio_disk"
        await self._start_zygote(nursery)
        await nursery.start(serve_status, os.path.join(self.config.rundir, "supervisor.sock"),
                            self._snapshot)
        ready = False
        last_status = ""
        while not self.stopping:
            xs = await self.holder.client()
            try:
                with trio.CancelScope() as self._watch_scope:
                    async with xs.watch(root) as events:
                        async for _event in events:
                            drain(events)  # one rescan covers a burst of node writes
                            await self._reconcile(nursery, root)
                            if not ready:
                                ready = True
                                sdnotify.notify("READY=1")
                                log.info("daemon.ready", root=root, guests=sorted(self.workers))
                            status = f"STATUS=serving {len(self.workers)} guest(s)"
                            if status != last_status:
                                sdnotify.notify(status)
                                last_status = status
            except XenstoreConnectionLost:
                continue
        with trio.move_on_after(GRACE):
            if self.workers:
                await self._workers_gone.wait()
        if self.zygote is not None:
            self.zygote.closing = True
            await self.zygote.stream.aclose()
            with trio.move_on_after(2):
                await self.zygote.process.wait()
        log.info("daemon.stopped")

    def _snapshot(self) -> dict[str, Any]:
        return {"role": "supervisor", "pid": os.getpid(), "guests": sorted(self.workers),
                "restarts": {d: w.restarts for d, w in self.workers.items()}}

    async def _reconcile(self, nursery: trio.Nursery, root: str) -> None:
        xs = await self.holder.client()
        try:
            guests = await xs.directory(root)
        except XenstoreError:
            guests = []
        for name in guests:
            if not name.isdigit() or self.stopping:
                continue
            domid = int(name)
            if domid not in self.workers:
                handle = WorkerHandle(domid, self._worker_command(domid), self.zygote)
                self.workers[domid] = handle
                if self._workers_gone.is_set():
                    self._workers_gone = trio.Event()
                nursery.start_soon(self._supervise, handle, root)

    def _worker_command(self, domid: int) -> list[str]:
        return [sys.executable, "-m", "virtio_diskd.daemon", *self.config.worker_args,
                "--domid", str(domid), "--worker"]

    async def _supervise(self, handle: WorkerHandle, root: str) -> None:
        delay = BACKOFF_FIRST
        try:
            while not self.stopping:
                code = await handle.run()
                if code == 0 or self.stopping:
                    break
                xs = await self.holder.client()
                if not await xs.exists(f"{root}/{handle.domid}"):
                    break
                handle.restarts += 1
                log.error("worker.crashed", domid=handle.domid, returncode=code,
                          restart_in=delay, restarts=handle.restarts)
                await trio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        finally:
            self.workers.pop(handle.domid, None)
            log.info("worker.gone", domid=handle.domid)
            if not self.workers:
                self._workers_gone.set()


class ZygoteClient:
    """The supervisor's side of :mod:`virtio_diskd.daemon.zygote`."""

    def __init__(self, sock: trio.socket.SocketType, process: trio.Process) -> None:
        self.stream = trio.SocketStream(sock)
        self.process = process
        self._spawned: list[tuple[trio.Event, list[int]]] = []
        self._exits: dict[int, tuple[trio.Event, list[int]]] = {}
        self._lock = trio.Lock()
        self.alive = True
        self.closing = False
        self.ready = trio.Event()

    async def reader(self) -> None:
        buffer = b""
        try:
            while True:
                try:
                    data = await self.stream.receive_some(4096)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break  # we closed it on shutdown, or the zygote died
                if not data:
                    break
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    message = json.loads(line)
                    if message.get("ready"):
                        self.ready.set()
                    elif "pid" in message and self._spawned:
                        event, box = self._spawned.pop(0)
                        box.append(int(message["pid"]))
                        event.set()
                    elif "exit" in message:
                        waiter = self._exits.setdefault(int(message["exit"]), (trio.Event(), []))
                        waiter[1].append(int(message["code"]))
                        waiter[0].set()
        finally:
            self.alive = False
            self.ready.set()
            if not self.closing:
                log.warning("zygote.gone")
            for event, _box in self._spawned:
                event.set()
            for event, box in self._exits.values():
                box.append(1)
                event.set()

    async def spawn(self, domid: int) -> int:
        event, box = trio.Event(), list[int]()
        async with self._lock:
            self._spawned.append((event, box))
            await self.stream.send_all(json.dumps({"spawn": domid}).encode() + b"\n")
        await event.wait()
        if not box:
            raise OSError("the zygote died")
        self._exits.setdefault(box[0], (trio.Event(), []))
        return box[0]

    async def wait(self, pid: int) -> int:
        event, box = self._exits.setdefault(pid, (trio.Event(), []))
        await event.wait()
        self._exits.pop(pid, None)
        return int(box[0])


@dataclass
class WorkerHandle:
    domid: int
    command: list[str]
    zygote: ZygoteClient | None = None
    process: trio.Process | None = None
    pid: int | None = None
    restarts: int = 0
    exited: bool = True

    async def run(self) -> int:
        if self.zygote is not None and self.zygote.alive:
            with contextlib.suppress(OSError):
                return await self._run_forked(self.zygote)
        self.process = await trio.lowlevel.open_process(self.command, stdin=subprocess.DEVNULL)
        self.pid, self.exited = self.process.pid, False
        log.info("worker.spawned", domid=self.domid, pid=self.pid, how="exec")
        try:
            return await self.process.wait()
        finally:
            self.exited = True
            if self.process.returncode is None:
                with trio.CancelScope(shield=True):
                    self.process.terminate()
                    with trio.move_on_after(GRACE):
                        await self.process.wait()
                    if self.process.returncode is None:
                        self.process.kill()

    async def _run_forked(self, zygote: ZygoteClient) -> int:
        self.pid = await zygote.spawn(self.domid)
        self.exited = False
        log.info("worker.spawned", domid=self.domid, pid=self.pid, how="zygote")
        try:
            return await zygote.wait(self.pid)
        finally:
            self.exited = True

    def signal(self, signum: int) -> None:
        if self.pid is not None and not self.exited:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


def run_zygote(config: DaemonConfig, fd: int) -> int:
    """The zygote process: everything imported, no threads, forks workers on request."""
    from virtio_diskd.daemon import zygote

    control = socket.socket(fileno=fd)

    def run_worker(domid: int) -> int:
        worker = dataclasses.replace(config, domid=domid, worker=True)
        return run(worker)

    return zygote.serve(control, run_worker)


def run(config: DaemonConfig) -> int:
    logsetup.configure(config.log_format, config.log_level)
    try:
        return trio.run(Daemon(config).main)
    except KeyboardInterrupt:
        return 130
