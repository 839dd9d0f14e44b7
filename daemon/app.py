"""Entry points of the daemon process: which role it plays, under trio.

* ``virtio-diskd --foreground``: the :class:`~.supervisor.Supervisor`;
* ``virtio-diskd --domid N`` (and the supervisor's workers, with ``--worker``):
  a :class:`~.worker.Worker` for guest N;
* ``--zygote-fd FD``: the supervisor's zygote, which forks workers
  (:mod:`.zygote`).
"""

from __future__ import annotations

import dataclasses
import socket

import trio

from virtio_diskd.daemon import logsetup
from virtio_diskd.daemon.process import DaemonConfig, DaemonProcess
from virtio_diskd.daemon.supervisor import Supervisor
from virtio_diskd.daemon.worker import Worker


def run(config: DaemonConfig) -> int:
    logsetup.configure(config.log_format, config.log_level)
    process: DaemonProcess = Supervisor(config) if config.domid is None else Worker(config)
    try:
        return trio.run(process.main)
    except KeyboardInterrupt:
        return 130


def run_zygote(config: DaemonConfig, fd: int) -> int:
    """The zygote process: everything imported, no threads, forks workers on request."""
    from virtio_diskd.daemon import zygote

    control = socket.socket(fileno=fd)

    def run_worker(domid: int) -> int:
        return run(dataclasses.replace(config, domid=domid, worker=True))

    return zygote.serve(control, run_worker)
