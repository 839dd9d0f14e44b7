"""A real NBD server for tests: ``qemu-nbd`` (Debian's qemu-utils) on a Unix socket,
which can be killed mid-I/O and started again on the same socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path


def missing_tools(*names: str) -> str | None:
    """The reason a test cannot run, or None."""
    for name in names:
        if shutil.which(name) is None:
            package = {"qemu-nbd": "qemu-utils", "qemu-img": "qemu-utils",
                       "qemu-storage-daemon": "qemu-system-common",
                       "modprobe": "kmod"}.get(name, name)
            return f"{name} is not installed (Debian package {package})"
    return None


class QemuNbd:
    """``qemu-nbd`` serving ``image`` (raw unless ``fmt`` says otherwise) as export
    ``disk`` on ``socket``; persistent, so a client may reconnect."""

    def __init__(self, image: Path, socket: Path, *, fmt: str = "raw",
                 read_only: bool = False, extra: list[str] | None = None) -> None:
        self.image, self.socket, self.fmt = image, socket, fmt
        self.read_only = read_only
        self.extra = extra or []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///disk?socket={self.socket}"

    def start(self) -> QemuNbd:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        argv = ["qemu-nbd", "--persistent", "--shared=8", f"--format={self.fmt}",
                "--export-name=disk", f"--socket={self.socket}", "--cache=writeback",
                "--discard=unmap", *self.extra]
        if self.read_only:
            argv.append("--read-only")
        self.process = subprocess.Popen([*argv, str(self.image)], stdin=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"qemu-nbd exited: {self.process.stderr!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("qemu-nbd did not start")
            time.sleep(0.01)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash: no flush, no goodbye."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
