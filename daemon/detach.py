"""``--daemonize`` for init systems other than systemd: python-daemon plus a pidfile
that recovers from a dead daemon (python-daemon's own lockfile-based pidfile never
does: a pidfile left by SIGKILL blocks it forever)."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager


class FlockPidFile:
    """A pidfile guarded by ``flock``: a stale file (its holder is dead) is taken over."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def check(self) -> None:
        """Refuse early, on the operator's terminal, if a live daemon holds the file.

        Only the lock is tested: writing our pid here would name, for a moment, this
        process, which exits once the daemon has detached."""
        os.close(self._lock())  # closing drops the lock; the detached child takes it

    def _lock(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise SystemExit(f"virtio-diskd is already running (pid {holder}, {self.path})"
                             ) from None
        return fd

    def __enter__(self) -> FlockPidFile:
        fd = self._lock()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = -1


@contextmanager
def daemonized(pidfile: str | None, log_file: str | None = None) -> Iterator[None]:
    """Detach (double fork, setsid, stdio away from the terminal), then take the pidfile.

    The logs (written to stderr) go to ``log_file`` if given, else to /dev/null.
    """
    # python-daemon's import name is `daemon`; our daemon/ folder is virtio_diskd.daemon and
    # never importable as `daemon` (tests/test_layout.py).  Imported late: only this mode needs it.
    python_daemon = importlib.import_module("daemon")
    lock = FlockPidFile(os.path.abspath(pidfile)) if pidfile else None
    if lock is not None:
        lock.check()
    log = open(log_file, "a", buffering=1, encoding="utf-8") if log_file else None  # noqa: SIM115
    context = python_daemon.DaemonContext(detach_process=True, working_directory="/", umask=0o022,
                                   stdout=None, stderr=log, pidfile=lock)
    try:
        with context:
            yield
    finally:
        if log is not None:
            log.close()
