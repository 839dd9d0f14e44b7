"""The ``virtio-diskd`` command line.

``virtio-diskd [options]`` runs the daemon; the sub-commands are tools around it
(``status``, ``demo``, ``bench``, ``xenstored``).  Every flag is checked here,
before anything starts: a bad flag is a clear message and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from virtio_diskd.daemon.status import DEFAULT_RUNDIR

SUBCOMMANDS = ("status", "demo", "bench", "xenstored")


def _version() -> str:
    try:
        return version("virtio-diskd")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def _domid(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 0x7FF0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a guest domain id (1-32751)")
    return int(text)


def _bounded(low: int, high: int, what: str = "a number") -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} from {low} to {high}")
        return int(text)
    return parse


def _positive(limit: int) -> Callable[[str], int]:
    return _bounded(1, limit)


_poll_window = _bounded(0, 1000, "a number of µs")


def daemon_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtio-diskd",
        description="virtio-blk device model for Xen guests: serves every "
                    "specification=virtio disk in xenstore over IOREQ + virtio-mmio.",
        epilog="Sub-commands: virtio-diskd status | demo | bench | xenstored (each has --help).")
    parser.add_argument("--version", action="version", version=f"virtio-diskd {_version()}")
    parser.add_argument("--foreground", action="store_true",
                        help="stay in the foreground (what systemd runs; the default unless "
                             "--daemonize)")
    parser.add_argument("--domid", type=_domid,
                        help="serve only this guest, in this process (virtio-diskd@.service)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zygote-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--xenstore", metavar="PATH|xenbus",
                        help="xenstored socket path, or 'xenbus' for /dev/xen/xenbus "
                             "(default: $XENSTORED_PATH, then /run/xenstored/socket)")
    parser.add_argument("--simulated", metavar="HOST",
                        help="use the simulated hypervisor whose sockets are in directory HOST")
    parser.add_argument("--log-format", choices=("console", "json", "journal"),
                        help="log format (default: journal under systemd, else console)")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error", "critical"))
    parser.add_argument("--config", metavar="FILE",
                        help="file with 'log_level = LEVEL', re-read on SIGHUP")
    parser.add_argument("--rundir", default=DEFAULT_RUNDIR,
                        help="directory for status sockets (default: /run/virtio-diskd)")
    parser.add_argument("--daemonize", action="store_true",
                        help="detach (python-daemon); not under systemd")
    parser.add_argument("--pidfile", help="with --daemonize: write the pid here (stale files "
                                          "from a dead daemon are recovered)")
    parser.add_argument("--log-file", help="with --daemonize: append the logs to this file")
    parser.add_argument("--direct-io", action="store_true",
                        help="open disk targets with O_DIRECT (bypass the Dom0 page cache)")
    parser.add_argument("--io-workers", type=_positive(64),
                        help="I/O threads per disk (default 4, or 32 with --direct-io)")
    parser.add_argument("--queues", type=_positive(16), default=1,
                        help="virtqueues per disk offered to the guest (default 1)")
    parser.add_argument("--queue-size", type=_positive(32768), default=256,
                        help="virtqueue size (QueueNumMax, default 256)")
    parser.add_argument("--poll-us", type=_poll_window, default=0,
                        help="adaptive polling of trapped accesses, at most this many µs "
                             "after each (0-1000, default 0 = sleep on the event channel)")
    parser.add_argument("--no-packed-ring", action="store_true",
                        help="do not offer VIRTIO_F_RING_PACKED")
    parser.add_argument("--legacy-mmio", action="store_true",
                        help="virtio-mmio version 1 (legacy) for old guests")
    return parser


def tools_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virtio-diskd")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser("status", help="guests, devices, states and counters of a "
                                                "running daemon")
    status.add_argument("--rundir", default=DEFAULT_RUNDIR)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    demo = commands.add_parser("demo", help="simulated host + daemon + guest, end to end")
    demo.add_argument("--requests", type=int, default=2000, help="requests per disk")
    demo.add_argument("--keep", action="store_true", help="keep the work directory")
    xenstored = commands.add_parser("xenstored", help="run the simulated xenstored")
    xenstored.add_argument("--socket", required=True, help="socket for dom0 (privileged) clients")
    xenstored.add_argument("--as", dest="domains", action="append", default=[],
                           metavar="DOMID:PATH", help="an extra socket whose clients act as DOMID")
    bench = commands.add_parser("bench", help="measure the data path against the raw disk")
    bench.add_argument("--suite", choices=["full", "model", "engine", "xenstore"],
                       action="append", help="what to measure (repeatable; default: all)")
    bench.add_argument("--quick", action="store_true", help="short runs (CI)")
    bench.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    bench.add_argument("--seconds", type=float, default=1.0, help="time per xenstore figure")
    bench.add_argument("--poll-us", type=_poll_window, default=50,
                       help="the daemon's --poll-us in the full-path runs (default 50)")
    bench.add_argument("--vcpu-spin-us", type=_poll_window, default=200,
                       help="how long a simulated vCPU polls for its ioreq answer before "
                            "sleeping, as Xen resumes a vCPU at once (default 200; 0 = sleep)")
    return parser


def _daemon_config(args: argparse.Namespace) -> object:
    from virtio_diskd.daemon import logsetup
    from virtio_diskd.daemon.app import DaemonConfig
    from virtio_diskd.daemon.guest import ServeOptions

    passthrough = []
    for flag, value in (("--xenstore", args.xenstore), ("--simulated", args.simulated),
                        ("--log-level", args.log_level), ("--config", args.config),
                        ("--rundir", args.rundir), ("--io-workers", args.io_workers),
                        ("--queues", args.queues), ("--queue-size", args.queue_size),
                        ("--poll-us", args.poll_us)):
        if value is not None:
            passthrough += [flag, str(value)]
    fmt = args.log_format or logsetup.default_format()
    passthrough += ["--log-format", fmt]
    for flag, on in (("--direct-io", args.direct_io), ("--no-packed-ring", args.no_packed_ring),
                     ("--legacy-mmio", args.legacy_mmio)):
        if on:
            passthrough.append(flag)
    return DaemonConfig(
        xenstore=args.xenstore, simulated=args.simulated, domid=args.domid, worker=args.worker,
        rundir=args.rundir, log_format=fmt, log_level=args.log_level, config_file=args.config,
        serve=ServeOptions(direct_io=args.direct_io, io_workers=args.io_workers,
                           num_queues=args.queues, queue_size=args.queue_size,
                           packed_ring=not args.no_packed_ring, legacy_mmio=args.legacy_mmio,
                           poll_us=args.poll_us),
        worker_args=passthrough)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return _tools(tools_parser().parse_args(argv))
    parser = daemon_parser()
    args = parser.parse_args(argv)
    if args.simulated and not os.path.isdir(args.simulated):
        parser.error(f"--simulated {args.simulated}: no such directory")
    if args.pidfile and not args.daemonize:
        parser.error("--pidfile goes with --daemonize")
    if args.log_file and not args.daemonize:
        parser.error("--log-file goes with --daemonize (under systemd, logs go to the journal)")
    if args.daemonize and args.foreground:
        parser.error("--daemonize and --foreground exclude each other")
    from virtio_diskd.daemon import app

    config = _daemon_config(args)
    if args.zygote_fd is not None:
        return app.run_zygote(config, args.zygote_fd)  # type: ignore[arg-type]
    if args.daemonize:
        from virtio_diskd.daemon.detach import daemonized

        with daemonized(args.pidfile, args.log_file):
            return app.run(config)  # type: ignore[arg-type]
    return app.run(config)  # type: ignore[arg-type]


def _tools(args: argparse.Namespace) -> int:
    if args.command == "status":
        from virtio_diskd.daemon import status

        return status.main(args.rundir, as_json=args.json)
    if args.command == "xenstored":
        from virtio_diskd.ioreq.sim import xenstored

        extra = [f"--as={item}" for item in args.domains]
        return xenstored.main(["--socket", args.socket, *extra])
    if args.command == "demo":
        from virtio_diskd.daemon import demo

        return demo.main(requests=args.requests, keep=args.keep)
    if args.command == "bench":
        from virtio_diskd.daemon import bench

        return bench.main(suites=args.suite, quick=args.quick, json_path=args.json,
                          seconds=args.seconds, poll_us=args.poll_us,
                          vcpu_spin_us=args.vcpu_spin_us)
    return 2
