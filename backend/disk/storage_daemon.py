"""One ``qemu-storage-daemon`` per image: QEMU's block layer (qcow2 with its backing
chain, VHD through the ``vpc`` driver) exported over NBD on a private Unix socket.

Why QEMU's block layer: image formats are where the hard-won correctness lives
(refcounts, L2 caches, crash consistency, ``qemu-img check``), and Debian ships
it.  Why NBD on a Unix socket: it needs no kernel module (``/dev/nbd``) and no
FUSE mount, works in a driver domain, and the engine reads and writes guest
memory straight from and into the socket (:mod:`.nbd`).

The format is the operator's, never guessed from the image (a guest can write a
qcow2 header into a raw disk: QEMU's CVE-2008-2004): the ``driver`` is set
explicitly and QEMU probes nothing for the top image.

Lifetime: the daemon outlives the worker on purpose.  Its socket and pidfile
are named after the guest's device in a run directory, so a worker that was
killed or upgraded finds its predecessor's daemon and connects to it again (the
guest's disk survives the restart, as it does for raw files); the device's
teardown stops it.  It is started in a new session, so a signal meant for the
worker's process group does not reach it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from virtio_diskd.backend.errors import VirtioDiskdError

log = structlog.get_logger("virtio_diskd.storage")

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
EXPORT_NAME = "disk"


class StorageDaemonError(VirtioDiskdError, OSError):
    """qemu-storage-daemon could not serve the image; the reason is for operators."""


def find_binary() -> str | None:
    return shutil.which("qemu-storage-daemon")


@dataclass
class StorageDaemon:
    """A running (or adopted) qemu-storage-daemon serving one image."""

    image: str  # the real path, symlinks resolved (the target policy checked it)
    driver: str
    socket_path: str
    read_only: bool
    direct: bool = False
    pid: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def pidfile(self) -> str:
        return self.socket_path + ".pid"

    @property
    def logfile(self) -> str:
        return self.socket_path + ".log"

    def argv(self, binary: str) -> list[str]:
        """The command line: every option as JSON, so no path needs QEMU's comma escaping."""
        file_node = {"driver": "file", "node-name": "file", "filename": self.image,
                     "cache": {"direct": self.direct}, "discard": "unmap",
                     "read-only": self.read_only}
        format_node = {"driver": self.driver, "node-name": "fmt", "file": "file",
                       "discard": "unmap", "read-only": self.read_only}
        server = {"addr": {"type": "unix", "path": self.socket_path}}
        export = {"type": "nbd", "id": "exp", "node-name": "fmt", "name": EXPORT_NAME,
                  "writable": not self.read_only}
        return [binary, "--blockdev", json.dumps(file_node), "--blockdev",
                json.dumps(format_node), "--nbd-server", json.dumps(server),
                "--export", json.dumps(export), "--pidfile", self.pidfile]

    def _recorded(self) -> tuple[int, list[str]] | None:
        """The process our pidfile names and its command line, if it still runs."""
        try:
            pid = int(Path(self.pidfile).read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid, [part.decode(errors="replace") for part in cmdline if part]

    def adopt(self) -> bool:
        """A predecessor's daemon for this device, if one is alive and serves this
        image (a killed worker's successor reconnects to it)."""
        recorded = self._recorded()
        if recorded is None:
            return False
        pid, args = recorded
        # the same binary name and the very same options (image, format, access): a
        # daemon started under other rules is not reused
        if not args or not args[0].endswith("qemu-storage-daemon") \
                or args[1:] != self.argv("")[1:]:
            return False
        self.pid = pid
        log.info("storage.adopted", image=self.image, pid=pid, socket=self.socket_path)
        return True

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start it and wait until its socket accepts connections."""
        binary = find_binary()
        if binary is None:
            raise StorageDaemonError("qemu-storage-daemon is not installed (Debian: "
                                     "qemu-system-common); it serves qcow2 and VHD images")
        self.stop_stale()
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        with open(self.logfile, "wb") as errors:
            self.process = subprocess.Popen(
                self.argv(binary), stdin=subprocess.DEVNULL, stdout=errors, stderr=errors,
                start_new_session=True, close_fds=True)
        self.pid = self.process.pid
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket_path):
            if self.process.poll() is not None:
                raise StorageDaemonError(f"qemu-storage-daemon for {self.image} exited: "
                                         f"{self._last_words()}")
            if time.monotonic() > deadline:
                self.stop()
                raise StorageDaemonError(f"qemu-storage-daemon for {self.image} did not "
                                         f"start in {timeout:.0f} s")
            time.sleep(0.01)
        log.info("storage.started", image=self.image, format=self.driver, pid=self.pid,
                 socket=self.socket_path, read_only=self.read_only)

    def _last_words(self) -> str:
        try:
            text = Path(self.logfile).read_text(errors="replace").strip()
        except OSError:
            return "no output"
        return text[-500:] or "no output"

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return bool(self.pid) and _pid_alive(self.pid)

    def revive(self) -> None:
        """Health check before a reconnection: a daemon that died is started again
        (its image is consistent as far as QEMU's format guarantees; writes it had
        not flushed may be gone, which the engine reports at the next flush)."""
        if self.alive():
            return
        if self.process is not None:
            self.process.wait()
        log.error("storage.daemon_died", image=self.image, pid=self.pid,
                  last_words=self._last_words())
        self.process, self.pid = None, 0
        self.start()

    def stop_stale(self) -> None:
        """A leftover daemon for this socket (from a worker that died before its
        guest went away) is stopped before a new one takes the image."""
        recorded = self._recorded()
        if recorded is None:
            return
        pid, args = recorded
        if args and args[0].endswith("qemu-storage-daemon") \
                and any(self.socket_path in arg for arg in args):
            log.warning("storage.stale_daemon_stopped", pid=pid, socket=self.socket_path)
            _terminate(pid, None, STOP_TIMEOUT)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (QEMU flushes and closes the image), SIGKILL after ``timeout``."""
        if self.pid:
            _terminate(self.pid, self.process, timeout)
            log.info("storage.stopped", image=self.image, pid=self.pid)
            self.pid = 0
        for path in (self.socket_path, self.pidfile, self.logfile):
            with contextlib.suppress(OSError):
                os.unlink(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _terminate(pid: int, process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                return
        elif not _pid_alive(pid) or _zombie(pid):
            return
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if process is not None:
        process.wait()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False
