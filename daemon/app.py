"""Entry points of the daemon process: which role it plays, under trio.

* ``virtio-diskd --foreground``: the :class:`~.supervisor.Supervisor`, which forks its
  zygote (:mod:`.zygote`) before anything else runs;
* ``virtio-diskd --domid N`` (and, if the zygote is gone, the supervisor's workers,
  with ``--worker``): a :class:`~.worker.Worker` for guest N.

Each role imports only what it runs: the supervisor never serves a device, so it
starts without the device model (about half the imports), which the zygote loads
in parallel for the workers it will fork.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import signal
import sys

import trio

from virtio_diskd.daemon import logsetup
from virtio_diskd.daemon.process import DaemonConfig, DaemonProcess


def run(config: DaemonConfig) -> int:
    logsetup.configure(config.log_format, config.log_level)
    # `kill -USR1 <pid>`: every thread's Python stack to stderr (the journal), for a
    # process that seems stuck; it runs in the signal handler, so even a blocked
    # event loop answers
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    process: DaemonProcess
    if config.domid is None:
        from virtio_diskd.daemon.supervisor import Supervisor

        supervisor = Supervisor(config)
        # before trio runs and before any thread exists: the only safe time to fork
        supervisor.fork_zygote(run_worker=_run_forked_worker, preload=_preload_worker)
        process = supervisor
    else:
        from virtio_diskd.daemon.worker import Worker

        worker = Worker(config)
        worker.drop_capabilities()  # before trio.run: the process's only thread
        if config.syscall_filter:
            worker.install_syscall_filter()  # likewise: threads and children inherit it
        process = worker
    try:
        profile_dir = os.environ.get(PROFILE_ENV) if config.domid is not None else None
        if profile_dir:
            return _profiled(process, profile_dir, config.domid)
        return trio.run(process.main)
    except KeyboardInterrupt:
        return 130


#: A directory: each worker writes its cProfile there as it exits (a diagnostic for
#: where a worker's time goes on a slow machine; the worker runs slower under it).
PROFILE_ENV = "VIRTIO_DISKD_PROFILE"


def _profiled(process: DaemonProcess, directory: str, domid: int | None) -> int:
    import cProfile

    profile = cProfile.Profile()
    try:
        return profile.runcall(trio.run, process.main)
    finally:
        path = os.path.join(directory, f"worker-dom{domid}-{os.getpid()}.prof")
        try:
            profile.dump_stats(path)
        except OSError as exc:
            print(f"virtio-diskd: profile not written to {path}: {exc}", file=sys.stderr)


def _preload_worker(config: DaemonConfig) -> None:
    """In the zygote: what every worker would otherwise do for itself at start."""
    from virtio_diskd.daemon.worker import preload

    preload(config)


def _run_forked_worker(config: DaemonConfig, domid: int) -> int:
    """What the zygote's child runs: the worker for ``domid``, as ``--worker`` would."""
    return run(dataclasses.replace(config, domid=domid, worker=True))

