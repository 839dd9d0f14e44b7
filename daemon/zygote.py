"""Fast worker start: a pre-imported process that forks one worker per guest.

A cold Python worker costs ~0.25 s of CPU before it can serve (interpreter,
trio, structlog, the package); sixteen guests created at once on two cores
would wait seconds for their InitWait.  The supervisor therefore starts one
*zygote* at boot: it imports everything, starts no threads and no event loop,
and waits on a socket.  ``spawn N`` makes it ``fork()`` — milliseconds — and
the child runs the worker for guest N; the zygote reports the pid at once and
the exit status when the child ends (it is the parent, so it reaps).

Forking is safe here because the zygote never ran trio or any thread.  If the
zygote dies, the supervisor falls back to spawning workers with exec.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
from collections.abc import Callable


def serve(control: socket.socket, run_worker: Callable[[int], int]) -> int:
    """The zygote's loop: one JSON line per request and per event on ``control``."""
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    buffer = b""
    children: set[int] = set()
    control.sendall(b'{"ready": true}\n')  # everything is imported: forks are cheap now
    while True:
        ready, _, _ = select.select([control.fileno(), rfd], [], [])
        if rfd in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(rfd, 512)
        _reap(control, children)
        if control.fileno() not in ready:
            continue
        data = control.recv(4096)
        if not data:
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            return 0
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            domid = int(request["spawn"])
            pid = os.fork()
            if pid == 0:  # the worker
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.close(rfd)
                os.close(wfd)
                control.close()
                code = 1
                try:
                    code = run_worker(domid)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            children.add(pid)
            control.sendall(json.dumps({"pid": pid, "domid": domid}).encode() + b"\n")


def _reap(control: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(OSError):
            control.sendall(json.dumps({"exit": pid, "code": code}).encode() + b"\n")
