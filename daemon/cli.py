"""The ``virtio-diskd`` command line.

``virtio-diskd [options]`` runs the daemon; the sub-commands are tools around it
(``status``, ``demo``, ``bench``, ``xenstored``).  Every flag is checked here,
before anything starts: a bad flag is a clear message and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from virtio_diskd.daemon import flags
from virtio_diskd.daemon.flags import DEFAULT_RUNDIR, bounded

if TYPE_CHECKING:
    from virtio_diskd.daemon.process import DaemonConfig

SUBCOMMANDS = ("status", "ctl", "demo", "bench", "xenstored", "grant-targets")


def _version() -> str:
    # importlib.metadata costs more than the rest of the command line: only on demand
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("virtio-diskd")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


class _VersionAction(argparse.Action):
    """``--version``, with the version looked up only when asked for."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"virtio-diskd {_version()}")
        parser.exit()


def daemon_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtio-diskd",
        description="virtio-blk device model for Xen guests: serves every "
                    "specification=virtio disk in xenstore over IOREQ + virtio-mmio.",
        epilog="Sub-commands: virtio-diskd status | ctl | grant-targets | demo | bench | xenstored "
               "(each has --help).")
    parser.add_argument("--version", action=_VersionAction, nargs=0,
                        help="show program's version number and exit")
    flags.add_to(parser)
    return parser


def _rundir_and_json(command: argparse.ArgumentParser, sockets: str) -> None:
    """The options of the commands that talk to running daemons."""
    command.add_argument("--rundir", default=DEFAULT_RUNDIR,
                         help=f"where the daemons' {sockets} are (default "
                              "/run/virtio-diskd, and its per-guest subdirectories)")
    command.add_argument("--json", action="store_true", help="machine-readable output")


def tools_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virtio-diskd")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser("status", help="guests, devices, states and counters of a "
                                                "running daemon")
    _rundir_and_json(status, "status sockets")
    ctl = commands.add_parser("ctl", help="run-time control of running disks (like tap-ctl): "
                                          "list, stats, pause, resume")
    _rundir_and_json(ctl, "sockets")
    actions = ctl.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="guests, devices, targets, formats, XenBus phase, paused")
    actions.add_parser("stats", help="request and byte counters of every device")
    for name, text in (("pause", "take no new request, finish and flush the in-flight ones "
                                 "(the guest's I/O waits, none fails)"),
                       ("resume", "take the requests queued while paused, carry on")):
        action = actions.add_parser(name, help=text)
        action.add_argument("domid", type=bounded(1, 0x7FEF, "a guest domid"),
                            help="the guest's domain id")
        action.add_argument("vdev", help="the device as the xl disk line names it (xvda)")
    grants = commands.add_parser(
        "grant-targets", help="Dom0 service for driver domains: make each driver domain "
                              "named as a virtio disk's backend the device model of that "
                              "guest (Xen's and xenstore's set_target), as the dummy XSM "
                              "policy requires")
    grants.add_argument("--xenstore", metavar="PATH", help="xenstored socket (default: "
                        "libxenstore's search, as the daemon)")
    grants.add_argument("--simulated", metavar="HOST", help="the simulated host's directory")
    grants.add_argument("--log-format", choices=["console", "json", "journal"])
    grants.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    grants.add_argument("--xenstore-timeout", type=bounded(0, 3600, "seconds"), default=0,
                        help="give up when xenstored cannot be reached for this long "
                             "(default 0: never)")
    demo = commands.add_parser("demo", help="simulated host + daemon + guest, end to end")
    demo.add_argument("--requests", type=int, default=2000, help="requests per disk")
    demo.add_argument("--keep", action="store_true", help="keep the work directory")
    xenstored = commands.add_parser("xenstored", help="run the simulated xenstored")
    xenstored.add_argument("--socket", required=True, help="socket for dom0 (privileged) clients")
    xenstored.add_argument("--as", dest="domains", action="append", default=[],
                           metavar="DOMID:PATH", help="an extra socket whose clients act as DOMID")
    bench = commands.add_parser("bench", help="measure the data path against the raw disk")
    bench.add_argument("--suite", choices=["start", "full", "model", "engine", "xenstore"],
                       action="append", help="what to measure (repeatable; default: all)")
    bench.add_argument("--quick", action="store_true", help="short runs (CI)")
    bench.add_argument("--workload", action="append", metavar="NAME",
                       help="full suite: only this workload, e.g. 4k-randread-qd32 "
                            "(repeatable; default: all)")
    bench.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    bench.add_argument("--seconds", type=float, default=1.0, help="time per xenstore figure")
    bench.add_argument("--poll-us", type=bounded(0, 1000, "a number of µs"), default=50,
                       help="the daemon's --poll-us in the full-path runs (default 50)")
    bench.add_argument("--vcpu-spin-us", type=bounded(0, 1000, "a number of µs"), default=200,
                       help="how long a simulated vCPU polls for its ioreq answer before "
                            "sleeping, as Xen resumes a vCPU at once (default 200; 0 = sleep)")
    return parser


def _daemon_config(args: argparse.Namespace) -> DaemonConfig:
    from virtio_diskd.daemon import logsetup
    from virtio_diskd.daemon.process import DaemonConfig, read_config
    from virtio_diskd.ioreq.serve_options import ServeOptions

    args.log_format = args.log_format or logsetup.default_format()  # workers inherit it
    config = read_config(args.config)
    return DaemonConfig(
        xenstore=args.xenstore, simulated=args.simulated, domid=args.domid, worker=args.worker,
        rundir=args.rundir, log_format=args.log_format, log_level=args.log_level,
        config_file=args.config, xenstore_timeout=float(args.xenstore_timeout),
        syscall_filter=not args.no_syscall_filter, worker_user=args.worker_user,
        serve=ServeOptions(direct_io=args.direct_io, io_workers=args.io_workers,
                           num_queues=args.queues, queue_size=args.queue_size,
                           packed_ring=not args.no_packed_ring, legacy_mmio=args.legacy_mmio,
                           confine=not args.no_confine,
                           target_wait=float(args.target_wait),
                           poll_us=args.poll_us, seg_max=args.seg_max,
                           size_max=args.size_max_kib << 10, target_policy=config.policy,
                           storage=config.storage,
                           state_dir=os.path.join(args.rundir, "state"),
                           storage_dir=os.path.join(args.rundir, "storage")),
        worker_args=flags.worker_argv(args))


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
    if args.seg_max is not None and args.seg_max > args.queue_size - 2:
        parser.error(f"--seg-max {args.seg_max}: a request must fit in the queue "
                     f"(at most --queue-size - 2 = {args.queue_size - 2})")
    from virtio_diskd.backend.disk.storage_rules import StorageRuleError
    from virtio_diskd.daemon import app

    try:
        config = _daemon_config(args)
    except StorageRuleError as exc:
        parser.error(f"--config {args.config}: {exc}")
    if args.daemonize:
        from virtio_diskd.daemon.detach import daemonized

        with daemonized(args.pidfile, args.log_file):
            return app.run(config)
    return app.run(config)


def _tools(args: argparse.Namespace) -> int:
    """Sub-commands; the tools and the simulator they drive are imported only here."""
    if args.command == "status":
        from virtio_diskd.daemon import status

        return status.main(args.rundir, as_json=args.json)
    if args.command == "ctl":
        from virtio_diskd.daemon import control

        return control.main(args.rundir, args.action, getattr(args, "domid", None),
                            getattr(args, "vdev", None), as_json=args.json)
    if args.command == "xenstored":
        from virtio_diskd.daemon.tools import xenstored

        return xenstored.main(args.socket, args.domains)
    if args.command == "grant-targets":
        if args.simulated and not os.path.isdir(args.simulated):
            print(f"virtio-diskd grant-targets: --simulated {args.simulated}: no such "
                  "directory", file=sys.stderr)
            return 2
        from virtio_diskd.daemon import target_service

        return target_service.main(xenstore=args.xenstore, simulated=args.simulated,
                                   log_format=args.log_format, log_level=args.log_level,
                                   xenstore_timeout=float(args.xenstore_timeout) or None)
    if args.command == "demo":
        from virtio_diskd.daemon.tools import demo

        return demo.main(requests=args.requests, keep=args.keep)
    if args.command == "bench":
        from virtio_diskd.daemon.tools import bench

        return bench.main(suites=args.suite, quick=args.quick, json_path=args.json,
                          seconds=args.seconds, poll_us=args.poll_us,
                          vcpu_spin_us=args.vcpu_spin_us, workloads=args.workload)
    return 2
