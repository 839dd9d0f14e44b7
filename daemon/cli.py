"""The ``virtio-diskd`` command line."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version


def _version() -> str:
    try:
        return version("virtio-diskd")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtio-diskd",
        description="virtio-blk device model for Xen guests (virtio-mmio over IOREQ).")
    parser.add_argument("--version", action="version", version=f"virtio-diskd {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the simulated host end to end and report")
    demo.add_argument("--seconds", type=float, default=2.0, help="workload duration")

    xenstored = commands.add_parser("xenstored", help="run the simulated xenstored")
    xenstored.add_argument("--socket", required=True, help="socket for dom0 (privileged) clients")
    xenstored.add_argument("--as", dest="domains", action="append", default=[],
                           metavar="DOMID:PATH", help="an extra socket whose clients act as DOMID")

    bench = commands.add_parser("bench", help="measure the data path against the raw disk")
    bench.add_argument("--suite", choices=["model", "engine", "xenstore"], action="append",
                       help="what to measure (repeatable; default: all)")
    bench.add_argument("--quick", action="store_true", help="short runs (CI)")
    bench.add_argument("--seconds", type=float, default=1.0, help="time per xenstore figure")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "xenstored":
        from virtio_diskd.ioreq.sim import xenstored

        extra = [f"--as={item}" for item in args.domains]
        return xenstored.main(["--socket", args.socket, *extra])
    if args.command == "bench":
        from virtio_diskd.daemon import bench_engine, bench_model, bench_xenstore

        suites = args.suite or ["model", "engine", "xenstore"]
        if "model" in suites:
            bench_model.main(2_000 if args.quick else 20_000)
        if "engine" in suites:
            bench_engine.main(quick=args.quick)
        if "xenstore" in suites:
            bench_xenstore.main(0.3 if args.quick else args.seconds)
        return 0
    if args.command == "demo":
        from virtio_diskd.daemon import demo

        return demo.main(seconds=args.seconds)
    parser.print_help(sys.stderr)
    return 2
