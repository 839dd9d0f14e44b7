"""The supervisor process: one worker per guest that has virtio disks.

``virtio-diskd --foreground`` (``virtio-diskd.service``): watches the daemon's
backend directory in xenstore (:mod:`virtio_diskd.ioreq.discovery`), keeps one
worker process per guest listed there (one IOREQ server per guest, and a crash
stays inside one guest), restarts a crashed worker at once — it resumes the
guest's devices from their saved state (:mod:`virtio_diskd.ioreq.devstate`),
so the guest does not notice — then with back-off if it crashes again, and
after CRASH_LIMIT crashes within CRASH_WINDOW seconds gives up: the guest's
devices get an ``error`` node and state 6.  A worker ends when its guest's
devices are gone.  Workers are forked from a pre-imported
zygote (:mod:`.zygote`), or exec'd when it is unavailable.  READY=1 goes to
systemd only after the initial scan; STATUS carries the counts.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from virtio_diskd.daemon import sdnotify, zygote
from virtio_diskd.daemon.privileges import REPLACE_ME
from virtio_diskd.daemon.process import GRACE, DaemonConfig, DaemonProcess
from virtio_diskd.daemon.status import serve_status
from virtio_diskd.ioreq.devstate import GuestState, saved_guests
from virtio_diskd.ioreq.discovery import fail_guest_devices, has_devices, watch_guests

log = structlog.get_logger("virtio_diskd")

#: The first restart is immediate (the guest's vCPUs wait on their next access); a
#: worker that crashes again waits BACKOFF_FIRST, doubling up to BACKOFF_MAX.
BACKOFF_FIRST, BACKOFF_MAX = 0.25, 30.0
#: This many crashes within CRASH_WINDOW seconds: the guest's devices are failed.
CRASH_LIMIT, CRASH_WINDOW = 5, 60.0
#: hand-overs to a privileged successor (--worker-user) within CRASH_WINDOW beyond which
#: they are treated as crashes (back-off, then given up): a guest that keeps asking for
#: one, or a bug, must not spin the host
REPLACE_LIMIT = 20
#: READY=1 waits this long at most for the zygote (then workers are exec'd if it died)
ZYGOTE_READY_TIMEOUT = 30.0


class Supervisor(DaemonProcess):
    """Keeps one worker per guest (see the module docstring)."""

    def __init__(self, config: DaemonConfig) -> None:
        super().__init__(config)
        self.workers: dict[int, WorkerHandle] = {}
        self.zygote: ZygoteClient | None = None
        self._watch_scope = trio.CancelScope()
        self._workers_gone = trio.Event()
        self._ready = False
        self._last_status = ""
        #: guests whose worker crashed in a loop: not restarted while they stay listed
        self.given_up: set[int] = set()
        self._zygote_parts: tuple[socket.socket, int] | None = None

    async def serve(self, nursery: trio.Nursery) -> None:
        if self._zygote_parts is not None:
            sock, pid = self._zygote_parts
            self.zygote = ZygoteClient(trio.socket.from_stdlib_socket(sock), pid)
            nursery.start_soon(self.zygote.reader)
            nursery.start_soon(self.zygote.reap)
        await nursery.start(serve_status,
                            os.path.join(self.config.rundir, "supervisor.sock"), self._snapshot)

        async def on_guests(guests: list[int]) -> None:
            self.given_up &= set(guests)
            self._reconcile(nursery, guests)
            if not self._ready:
                self._forget_departed(guests)
                if self.zygote is not None:
                    # READY promises InitWait within libxl's 10 s: at boot xendomains
                    # starts guests right after it, and a guest whose worker must wait
                    # for the zygote's imports (seconds under TCG) could miss that
                    with trio.move_on_after(ZYGOTE_READY_TIMEOUT):
                        await self.zygote.ready.wait()
                self._ready = True
                sdnotify.notify("READY=1")
                log.info("daemon.ready", self_domid=self.self_domid, guests=sorted(self.workers))
            status = f"STATUS=serving {len(self.workers)} guest(s)"
            if status != self._last_status:
                sdnotify.notify(status)
                self._last_status = status

        with self._watch_scope:
            if not self.stopping:
                await watch_guests(self.holder, self.self_domid, on_guests)
        with trio.move_on_after(GRACE):
            if self.workers:
                await self._workers_gone.wait()
        if self.zygote is not None:
            await self.zygote.close()
        log.info("daemon.stopped")

    def on_reload(self) -> None:
        for worker in self.workers.values():
            worker.signal(signal.SIGHUP)

    def on_stop(self) -> None:
        self._watch_scope.cancel()
        for worker in self.workers.values():
            worker.signal(signal.SIGTERM)

    def on_exit_now(self) -> None:
        for worker in self.workers.values():
            worker.signal(signal.SIGKILL)

    def _snapshot(self) -> dict[str, Any]:
        return {"role": "supervisor", "pid": os.getpid(), "guests": sorted(self.workers),
                "restarts": {d: w.restarts for d, w in self.workers.items()}}

    def fork_zygote(self, run_worker: Callable[[DaemonConfig, int], int],
                    preload: Callable[[DaemonConfig], None] | None = None) -> None:
        """Forks the zygote (:mod:`.zygote`) from this process, before trio runs.

        The child already has the interpreter, trio and structlog loaded: it only adds
        the device model, in parallel with this process connecting to xenstore; READY=1
        waits for it (see :meth:`serve`).  The run directory's lock file is opened
        first, so the zygote and every worker it forks share the lock this process
        takes."""
        self.open_lock_file()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = os.fork()
        except OSError as exc:
            log.warning("zygote.unavailable", error=str(exc), fallback="exec per worker")
            ours.close()
            theirs.close()
            return
        if pid == 0:  # pragma: no cover - the zygote (tested through its workers)
            ours.close()
            os._exit(zygote.main(theirs, functools.partial(run_worker, self.config),
                                 None if preload is None
                                 else functools.partial(preload, self.config)))
        theirs.close()
        self._zygote_parts = (ours, pid)

    def _forget_departed(self, guests: list[int]) -> None:
        """Saved state of guests that went while no daemon ran (libxl removed their
        devices after its 10 s wait for state 6): nothing is left to resume."""
        state_dir = self.config.serve.state_dir
        if state_dir is None:
            return
        for domid in saved_guests(state_dir):
            if domid not in guests:
                GuestState(state_dir, domid).remove()
                log.info("guest.saved_state_dropped", domid=domid, why="no devices listed")

    def _remove_empty_state(self, domid: int) -> None:
        """A worker that changed user empties its guest's state directory when the
        guest goes, but cannot remove it (``state/`` is root's): done here."""
        state_dir = self.config.serve.state_dir
        if state_dir is not None:
            with contextlib.suppress(OSError):  # not empty (to be resumed), or gone
                os.rmdir(GuestState(state_dir, domid).dir)

    def _lock_fds(self) -> tuple[int, ...]:
        """The run directory's lock, for every process of this daemon to hold (workers
        exist only once it is taken)."""
        return () if self.lock_fd is None else (self.lock_fd,)

    def _reconcile(self, nursery: trio.Nursery, guests: list[int]) -> None:
        """A worker for every listed guest that has none (workers end on their own)."""
        for domid in guests:
            if self.stopping or domid in self.workers or domid in self.given_up:
                continue
            handle = WorkerHandle(domid, self._worker_command(domid), self.zygote,
                                  keep_fds=self._lock_fds())
            self.workers[domid] = handle
            if self._workers_gone.is_set():
                self._workers_gone = trio.Event()
            nursery.start_soon(self._supervise, handle)

    def _worker_command(self, domid: int) -> list[str]:
        return [sys.executable, "-m", "virtio_diskd.daemon", *self.config.worker_args,
                "--domid", str(domid), "--worker"]

    async def _supervise(self, handle: WorkerHandle) -> None:
        delay = 0.0
        crashes: list[float] = []
        replaced: list[float] = []
        try:
            while not self.stopping:
                code = await handle.run()
                if code == 0 or self.stopping:
                    break
                now = trio.current_time()
                replaced = [t for t in replaced if now - t < CRASH_WINDOW]
                if code == REPLACE_ME and len(replaced) < REPLACE_LIMIT:
                    # it gave up what its next job needs: a successor at once, no crash
                    replaced.append(now)
                    log.info("worker.replaced", domid=handle.domid, pid=handle.pid)
                    continue
                if not await has_devices(self.holder, self.self_domid, handle.domid):
                    break
                handle.restarts += 1
                crashes = [t for t in crashes if now - t < CRASH_WINDOW] + [now]
                if len(crashes) >= CRASH_LIMIT:
                    await self._give_up(handle, code, len(crashes))
                    break
                log.error("worker.crashed", domid=handle.domid, returncode=code,
                          restart_in=delay, restarts=handle.restarts)
                await trio.sleep(delay)
                delay = min(max(delay * 2, BACKOFF_FIRST), BACKOFF_MAX)
        finally:
            self.workers.pop(handle.domid, None)
            self._remove_empty_state(handle.domid)
            log.info("worker.gone", domid=handle.domid)
            if not self.workers:
                self._workers_gone.set()

    async def _give_up(self, handle: WorkerHandle, code: int, crashes: int) -> None:
        reason = (f"virtio-diskd: the worker serving this guest crashed {crashes} times "
                  f"within {CRASH_WINDOW:.0f} s (last exit status {code}); device given up")
        self.given_up.add(handle.domid)
        failed = await fail_guest_devices(self.holder, self.self_domid, handle.domid, reason)
        log.error("worker.given_up", domid=handle.domid, crashes=crashes, returncode=code,
                  devices_failed=failed,
                  hint="see this guest's earlier worker.crashed and device.* log lines")


class _Reply:
    """One answer the zygote owes us (a pid, or an exit status)."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: int | None = None

    def give(self, value: int | None) -> None:
        if not self.event.is_set():
            self.value = value
            self.event.set()

    async def wait(self) -> int | None:
        await self.event.wait()
        return self.value


class ZygoteClient:
    """The supervisor's side of :mod:`virtio_diskd.daemon.zygote`."""

    def __init__(self, sock: trio.socket.SocketType, pid: int) -> None:
        self.stream = trio.SocketStream(sock)
        self.pid = pid
        self._gone = trio.Event()
        self._spawned: list[_Reply] = []  # pids, in the order the spawns were sent
        self._exits: dict[int, _Reply] = {}  # exit status by pid
        self._lock = trio.Lock()
        self.alive = True
        self.closing = False
        #: the zygote has its imports done (or is gone: workers are exec'd then)
        self.ready = trio.Event()

    def _exit_of(self, pid: int) -> _Reply:
        return self._exits.setdefault(pid, _Reply())

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
                        log.debug("zygote.ready", pid=self.pid)
                    elif "pid" in message and self._spawned:
                        self._spawned.pop(0).give(int(message["pid"]))
                    elif "exit" in message:
                        self._exit_of(int(message["exit"])).give(int(message["code"]))
        finally:
            self.alive = False
            self.ready.set()
            if not self.closing:
                log.warning("zygote.gone")
            for reply in self._spawned:
                reply.give(None)
            for reply in self._exits.values():
                reply.give(1)

    async def spawn(self, domid: int) -> int:
        reply = _Reply()
        async with self._lock:
            self._spawned.append(reply)
            await self.stream.send_all(json.dumps({"spawn": domid}).encode() + b"\n")
        pid = await reply.wait()
        if pid is None:
            raise OSError("the zygote died")
        self._exit_of(pid)
        return pid

    async def wait(self, pid: int) -> int:
        code = await self._exit_of(pid).wait()
        self._exits.pop(pid, None)
        return 1 if code is None else code

    async def reap(self) -> None:
        """Collects the zygote's exit status when it ends (it is our child)."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:  # already reaped, or no pidfd: nothing to wait on
            self._gone.set()
            return
        try:
            await trio.lowlevel.wait_readable(pidfd)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, os.WNOHANG)  # noqa: ASYNC222 (readable: it exited)
        finally:
            os.close(pidfd)
            self._gone.set()

    async def close(self) -> None:
        self.closing = True
        await self.stream.aclose()
        with trio.move_on_after(2):
            await self._gone.wait()


@dataclass
class WorkerHandle:
    """One guest's worker process, as the supervisor sees it."""

    domid: int
    command: list[str]
    zygote: ZygoteClient | None = None
    process: trio.Process | None = None
    pid: int | None = None
    restarts: int = 0
    exited: bool = True
    keep_fds: tuple[int, ...] = ()

    async def run(self) -> int:
        if self.zygote is not None and self.zygote.alive:
            with contextlib.suppress(OSError):
                return await self._run_forked(self.zygote)
        self.process = await trio.lowlevel.open_process(self.command, stdin=subprocess.DEVNULL,
                                                        pass_fds=self.keep_fds)
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
