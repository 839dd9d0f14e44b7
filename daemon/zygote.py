"""Fast worker start: a pre-imported process that forks one worker per guest.

A cold Python worker costs ~0.25 s of CPU before it can serve (interpreter,
trio, structlog, the package); sixteen guests created at once on two cores
would wait seconds for their InitWait.  The supervisor therefore forks one
*zygote* as its first act, before trio runs: the zygote inherits the interpreter
and the libraries already loaded, imports the device model, starts no threads
and no event loop, and waits on a socket.  ``spawn N`` makes it ``fork()`` —
milliseconds — and the child runs the worker for guest N; the zygote reports the
pid at once and the exit status when the child ends (it is the parent, so it
reaps).

Forking is safe here because neither the supervisor (at that point) nor the
zygote ever ran trio or any thread.  If the zygote dies, the supervisor falls
back to spawning workers with exec.  A worker that dies of an exception leaves
its traceback on stderr (the journal) before the child exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable


def name_process(name: str) -> None:
    """The process name ``ps``/``top`` show (comm): zygote and workers share the
    supervisor's command line, since they are forks of it."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name[:15])


def main(control: socket.socket, run_worker: Callable[[int], int],
         preload: Callable[[], None] | None = None) -> int:
    """The zygote, just forked from the supervisor: load the worker's modules, do the
    worker's set-up that is the same for every guest (``preload``), serve."""
    name_process("vd-zygote")
    try:
        from virtio_diskd.daemon import worker  # noqa: F401  (the preload)

        return serve(control, run_worker, preload)
    except BaseException:
        print("virtio-diskd zygote: failed; workers will be started with exec",
              file=sys.stderr)
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _preload(preload: Callable[[], None]) -> None:
    try:
        preload()
    except Exception:  # each worker does the work again, and reports its failure
        print("virtio-diskd zygote: preloading failed; each worker does it itself",
              file=sys.stderr)
        traceback.print_exc()


def serve(control: socket.socket, run_worker: Callable[[int], int],
          preload: Callable[[], None] | None = None) -> int:
    """The zygote's loop: one JSON line per request and per event on ``control``.

    ``preload`` runs after the ready message: the supervisor's READY=1 does not wait
    for it, and a spawn request that comes meanwhile waits at most what its worker
    would have spent doing the same work itself."""
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    buffer = b""
    children: set[int] = set()
    control.sendall(b'{"ready": true}\n')  # everything is imported: forks are cheap now
    if preload is not None:
        _preload(preload)
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
                name_process(f"vd-dom{domid}")
                code = 1
                try:
                    code = run_worker(domid)
                except BaseException:  # os._exit below would swallow it silently
                    print(f"virtio-diskd worker for domain {domid}: uncaught exception",
                          file=sys.stderr)
                    traceback.print_exc()
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
