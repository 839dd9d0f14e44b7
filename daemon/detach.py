"""``--daemonize`` for init systems other than systemd: python-daemon plus a pidfile
that recovers from a dead daemon (python-daemon's own lockfile-based pidfile never
does: a pidfile left by SIGKILL blocks it forever)."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class FlockPidFile:
    """A pidfile guarded by ``flock``: a stale file (its holder is dead) is taken over."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> FlockPidFile:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise SystemExit(f"virtio-diskd is already running (pid {holder}, {self.path})"
                             ) from None
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
def daemonized(pidfile: str | None) -> Iterator[None]:
    """Detach (double fork, setsid), keep stderr for the logs, then take the pidfile."""
    # python-daemon's import name is `daemon`; our daemon/ folder is virtio_diskd.daemon and
    # never importable as `daemon` (tests/test_layout.py).  Imported late: only this mode needs it.
    python_daemon = importlib.import_module("daemon")
    context = python_daemon.DaemonContext(detach_process=True, working_directory="/", umask=0o022,
                                   stdout=sys.stdout, stderr=sys.stderr,
                                   pidfile=FlockPidFile(pidfile) if pidfile else None)
    with context:
        yield
