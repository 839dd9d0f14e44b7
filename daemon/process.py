"""What every daemon process shares, supervisor or worker: configuration, signals, watchdog.

Signals: the first SIGTERM (or SIGINT) starts an orderly stop — the role
decides what that means (:meth:`DaemonProcess.on_stop`) — and a grace period
after which the process gives up waiting; a second one exits at once.  SIGHUP
re-reads the log level from ``--config`` (and the role passes it on).  The
systemd watchdog is pinged from the event loop, so a wedged loop gets the
service restarted.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import signal
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from virtio_diskd.backend.disk.policy import TargetPolicy
from virtio_diskd.backend.disk.storage_rules import StorageRules
from virtio_diskd.daemon import logsetup, sdnotify
from virtio_diskd.daemon.flags import DEFAULT_RUNDIR
from virtio_diskd.daemon.privileges import WorkerUser
from virtio_diskd.ioreq.discovery import own_domid
from virtio_diskd.ioreq.serve_options import ServeOptions
from virtio_diskd.ioreq.xenstore.holder import XenstoreHolder, XenstoreUnreachable

log = structlog.get_logger("virtio_diskd")

GRACE = 8.0  # seconds to drain and close on SIGTERM (libxl allows 10 for state 6)


@dataclass
class DaemonConfig:
    """The operator's choices for one daemon process (built by the CLI from the flags)."""

    xenstore: str | None = None
    simulated: str | None = None
    domid: int | None = None
    worker: bool = False
    rundir: str = DEFAULT_RUNDIR
    log_format: str = "console"
    log_level: str = "info"
    config_file: str | None = None
    xenstore_timeout: float = 60.0  # give up without a first xenstored connection (0: never)
    serve: ServeOptions = field(default_factory=ServeOptions)
    syscall_filter: bool = True  # workers install :mod:`~virtio_diskd.daemon.syscall_filter`
    #: whom a worker becomes once its guest runs (None: it stays uid 0, no capabilities)
    worker_user: WorkerUser | None = None
    #: the flags handed on to workers (:func:`virtio_diskd.daemon.flags.worker_argv`)
    worker_args: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ConfigFile:
    """What ``--config FILE`` says: ``key = value`` lines, ``#`` comments.

    ``log_level = LEVEL`` (re-read on SIGHUP); ``allow_dir = DIR`` (repeatable: disk
    files must lie under one of them, symlinks resolved); ``allow_block_devices =
    yes|no``; ``image_format = GLOB FORMAT``, ``nbd_export = PATH URI`` and
    ``allow_nbd_uris = yes|no`` (:mod:`~virtio_diskd.backend.disk.storage_rules`).
    The target policy and storage rules are read at start (restart to change them);
    a storage line that cannot be used raises :class:`StorageRuleError`, since
    ignoring it could serve an image's metadata to its guest."""

    log_level: str | None = None
    policy: TargetPolicy = field(default_factory=TargetPolicy)
    storage: StorageRules = field(default_factory=StorageRules)


def read_config(path: str | None) -> ConfigFile:
    if not path:
        return ConfigFile()
    level: str | None = None
    dirs: list[str] = []
    block_devices = True
    formats: list[tuple[str, str]] = []
    exports: list[tuple[str, str]] = []
    nbd_uris = False
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.split("#", 1)[0].partition("=")
                key, value = key.strip(), value.strip()
                if not sep:
                    continue
                if key == "log_level":
                    level = value
                elif key == "allow_dir" and value.startswith("/"):
                    dirs.append(os.path.normpath(value))
                elif key == "allow_block_devices":
                    block_devices = value.lower() not in ("no", "false", "0")
                elif key == "image_format":
                    formats.append(StorageRules.format_rule(value))
                elif key == "nbd_export":
                    exports.append(StorageRules.export_rule(value))
                elif key == "allow_nbd_uris":
                    nbd_uris = value.lower() in ("yes", "true", "1")
                else:
                    log.warning("config.unknown_line", path=path, line=line.strip())
    except OSError as exc:
        log.warning("config.unreadable", path=path, error=str(exc))
    return ConfigFile(level, TargetPolicy(tuple(dirs), block_devices),
                      StorageRules(tuple(formats), tuple(exports), nbd_uris))


def read_config_level(path: str | None) -> str | None:
    """``log_level = debug`` from the config file, if there is one."""
    return read_config(path).log_level


class DaemonProcess:
    """The frame of a daemon process; :class:`Supervisor` and :class:`Worker` fill it in."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.holder = XenstoreHolder(config.xenstore)
        self.stopping = False
        self.self_domid = 0
        self._connected = False
        self.exit_code = 0
        #: the run directory's lock file (locked once main() has taken the lock)
        self.lock_fd: int | None = None

    async def main(self) -> int:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    # signals are heard from the first moment, also while xenstored is away
                    nursery.start_soon(self._signals, signals, nursery.cancel_scope)
                    nursery.start_soon(self._watchdog)
                    await nursery.start(functools.partial(
                        self.holder.run, give_up_after=self.config.xenstore_timeout or None))
                    self._connected = True
                    if self.stopping:
                        return 0
                    self.self_domid = await own_domid(self.holder)
                    os.makedirs(self.config.rundir, exist_ok=True)
                    if not self.config.worker and not self._lock_rundir():
                        self.exit_code = 1
                        nursery.cancel_scope.cancel()
                        return self.exit_code
                    await self.serve(nursery)
                    nursery.cancel_scope.cancel()
            except* XenstoreUnreachable as group:
                log.error("daemon.giving_up", reason=str(group.exceptions[0]))  # noqa: TRY400
                self.exit_code = 1
        return self.exit_code

    def open_lock_file(self) -> int:
        """The run directory's lock file, opened (not locked) once: a zygote forked
        before the lock is taken shares this open file, and with it the lock."""
        if self.lock_fd is None:
            os.makedirs(self.config.rundir, exist_ok=True)
            self.lock_fd = os.open(os.path.join(self.config.rundir, "daemon.lock"),
                                   os.O_RDWR | os.O_CREAT, 0o600)
        return self.lock_fd

    def _lock_rundir(self) -> bool:
        """One daemon per run directory.  A second one would claim the same guests: its
        worker cannot bind the ports the first one holds and fails the guest's devices
        (seen on real Xen).  The lock is inherited by the zygote and the workers, so it
        is held until the last process of this daemon is gone."""
        fd = self.open_lock_file()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        if not locked:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            self.lock_fd = None
            log.error("daemon.already_running", rundir=self.config.rundir, pid=holder,
                      hint="another virtio-diskd serves these guests; stop it first")
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return True

    # -- what a role provides -------------------------------------------------------------

    async def serve(self, nursery: trio.Nursery) -> None:
        """The role's work; returns when the process should end."""
        raise NotImplementedError

    def on_reload(self) -> None:
        """SIGHUP, after the log level was re-read."""

    def on_stop(self) -> None:
        """The first SIGTERM/SIGINT: begin an orderly stop."""

    def on_exit_now(self) -> None:
        """The second SIGTERM/SIGINT, just before the process exits."""

    # -- shared ---------------------------------------------------------------------------

    async def _signals(self, signals: Any, scope: trio.CancelScope) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                level = read_config_level(self.config.config_file)
                if level:
                    with contextlib.suppress(ValueError):
                        logsetup.configure(self.config.log_format, level)
                        self.config.log_level = level
                        log.info("daemon.reloaded", log_level=level)
                self.on_reload()
                continue
            if self.stopping:
                log.warning("daemon.exit_now", signal=signal.Signals(signum).name)
                self.on_exit_now()
                os._exit(1)
            self.stopping = True
            sdnotify.notify("STOPPING=1")
            if not self._connected:  # still waiting for xenstored: nothing to close
                log.info("daemon.stopping", signal=signal.Signals(signum).name,
                         before="xenstore connection")
                scope.cancel()
                continue
            log.info("daemon.stopping", signal=signal.Signals(signum).name, grace=GRACE)
            self.on_stop()
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
