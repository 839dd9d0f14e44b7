"""Every flag of the daemon, declared once.

One :class:`Flag` feeds the argument parser (``--help``), the hand-off of the
operator's choices to per-guest workers (:func:`worker_argv`), and the options
table in the README (:func:`markdown_table`, checked by the tests).  Adding a
flag is one entry here; a flag that workers must see says so (``worker``) and
the test ``test_a_worker_sees_every_flag`` proves they do, using each flag's
``example``.

Run ``python -m virtio_diskd.daemon.flags README.md`` to rewrite the README's
table after changing a declaration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from virtio_diskd.daemon.privileges import WorkerUser

DEFAULT_RUNDIR = "/run/virtio-diskd"
#: Largest guest domain id a flag accepts (DOMID_FIRST_RESERVED - 1).
MAX_DOMID = 0x7FEF
README_MARKER = "<!-- flags -->"


def bounded(low: int, high: int, what: str = "a number") -> Callable[[str], int]:
    """An argparse type: a decimal integer in ``[low, high]``, or a clear refusal."""
    def parse(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} from {low} to {high}")
        return int(text)
    return parse


def domid(text: str) -> int:
    """An argparse type for a guest domain id."""
    if not text.isdigit() or not 0 < int(text) <= MAX_DOMID:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a guest domain id (1-{MAX_DOMID})")
    return int(text)


def worker_user(text: str) -> WorkerUser:
    """An argparse type for ``--worker-user``: a user that exists, or UID:GID."""
    from virtio_diskd.daemon.privileges import WorkerUser

    try:
        return WorkerUser.parse(text, MAX_DOMID)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass(frozen=True)
class Flag:
    """One command-line flag of the daemon."""

    name: str  # "--poll-us"
    help: str  # for --help, the README table and the man page
    example: str | None = None  # a valid, non-default value (tests; None for switches)
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None
    default: Any = None
    choices: tuple[str, ...] | None = None
    switch: bool = False  # present or absent (store_true)
    worker: bool = True  # handed on to the per-guest workers
    hidden: bool = False  # internal: between supervisor, zygote and workers

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")

    @property
    def usage(self) -> str:
        """``--poll-us N`` as the README and the man page show it."""
        if self.switch:
            return self.name
        shown = self.metavar or ("|".join(self.choices) if self.choices else "VALUE")
        return f"{self.name} {shown}"


_poll_window = bounded(0, 1000, "a number of µs")

FLAGS: tuple[Flag, ...] = (
    Flag("--foreground", "stay in the foreground (what systemd runs; the default unless "
         "--daemonize)", switch=True, worker=False),
    Flag("--domid", "serve only guest N in this process (the virtio-diskd@.service template; "
         "the code path workers run)", example="7", metavar="N", parse=domid, worker=False),
    Flag("--xenstore", "xenstored socket path, or 'xenbus' for /dev/xen/xenbus (default: "
         "$XENSTORED_PATH, then /run/xenstored/socket)", example="/run/xs.sock",
         metavar="PATH|xenbus"),
    Flag("--xenstore-timeout", "give up, with exit status 1, when xenstored cannot be "
         "reached within this many seconds of start (0: keep trying; default 60); the "
         "daemon says where it tried and why every 10 s meanwhile", example="5",
         metavar="SECONDS", parse=bounded(0, 86400), default=60),
    Flag("--simulated", "use the simulated hypervisor whose sockets are in directory HOST",
         example="/tmp", metavar="HOST"),
    Flag("--log-format", "log format (default: journal under systemd — native journal "
         "records with GUEST_DOMID, DEVID, VDEV fields — else console)", example="json",
         choices=("console", "json", "journal")),
    Flag("--log-level", "least severe level logged: debug, info (default), warning, error, "
         "critical", example="debug", default="info", metavar="LEVEL",
         choices=("debug", "info", "warning", "error", "critical")),
    Flag("--config", "configuration file: 'log_level = LEVEL' (re-read on SIGHUP), "
         "'allow_dir = DIR' (repeatable: disk files must lie under one of them, symlinks "
         "resolved), 'allow_block_devices = yes|no', 'image_format = GLOB qcow2|vhd|raw', "
         "'nbd_export = PATH URI', 'allow_nbd_uris = yes|no'",
         example="/etc/virtio-diskd.conf", metavar="FILE"),
    Flag("--rundir", "directory for the status sockets (default /run/virtio-diskd)",
         example="/tmp/vd-run", metavar="DIR", default=DEFAULT_RUNDIR),
    Flag("--daemonize", "detach with python-daemon (init systems other than systemd)",
         switch=True, worker=False),
    Flag("--pidfile", "with --daemonize: write the pid here; a pidfile left by a dead daemon "
         "is taken over, a live one refuses a second daemon", example="/tmp/vd.pid",
         metavar="FILE", worker=False),
    Flag("--log-file", "with --daemonize: append the logs to this file (otherwise they are "
         "discarded)", example="/tmp/vd.log", metavar="FILE", worker=False),
    Flag("--direct-io", "open disk targets with O_DIRECT (bypass the page cache of the "
         "daemon's domain)", switch=True),
    Flag("--io-workers", "I/O threads per disk (default 4; 32 with --direct-io, where the "
         "thread count is the queue depth the device sees)", example="9", metavar="N",
         parse=bounded(1, 64)),
    Flag("--queues", "virtqueues per disk offered to the guest (default 1)", example="3",
         metavar="N", parse=bounded(1, 16), default=1),
    Flag("--queue-size", "virtqueue size, QueueNumMax (default 256)", example="64",
         metavar="N", parse=bounded(1, 32768), default=256),
    Flag("--seg-max", "data buffers one request may have (virtio-blk seg_max; default: queue "
         "size - 2); with --size-max-kib it bounds what one request can hold in the worker",
         example="64", metavar="N", parse=bounded(1, 32766)),
    Flag("--size-max-kib", "largest data buffer of a request, in KiB (virtio-blk size_max; "
         "default 1024)", example="256", metavar="N", parse=bounded(4, 65536), default=1024),
    Flag("--poll-us", "adaptive polling: after a trapped access keep polling the ioreq page "
         "for up to N µs (0-1000) before sleeping on the event channel, for as long as "
         "polling after that register access has been finding the next trap (learned per "
         "access); trades CPU for latency (default 0)", example="25", metavar="N",
         parse=_poll_window, default=0),
    Flag("--no-packed-ring", "do not offer VIRTIO_F_RING_PACKED", switch=True),
    Flag("--legacy-mmio", "virtio-mmio version 1 (legacy) for old guests", switch=True),
    Flag("--no-confine", "leave each worker's Xen handles unrestricted (by default, once a "
         "guest's devices are set up, its worker restricts them to that guest: "
         "xentoolcore_restrict_all)", switch=True),
    Flag("--no-syscall-filter", "install no seccomp filter in the workers (by default each "
         "worker, before it serves, allows only the system calls serving a disk takes; any "
         "other fails with ENOSYS)", switch=True),
    Flag("--worker-user", "once its guest runs, each worker becomes this user: NAME or "
         "UID:GID, with a trailing + for one uid per guest (the base plus the domid); it can "
         "then open no Xen device, disk or xenstored socket again, and a hot-plugged disk is "
         "set up by a fresh worker (default: workers stay uid 0, without capabilities)",
         example="65534:65534", metavar="USER", parse=worker_user),
    Flag("--target-wait", "in a driver domain: seconds a worker waits for Dom0's "
         "`virtio-diskd grant-targets` to make it the guest's device model before creating "
         "the guest's IOREQ server (0-9, default 6; 0 under FLASK, where no target is set)",
         example="2", metavar="SECONDS", parse=bounded(0, 9), default=6),
    # internal: how the supervisor starts a worker when its zygote is gone
    Flag("--worker", "this process is a supervised worker", switch=True, worker=False,
         hidden=True),
)


def add_to(parser: argparse.ArgumentParser) -> None:
    """Declare every flag on ``parser``."""
    for flag in FLAGS:
        help_text = argparse.SUPPRESS if flag.hidden else flag.help
        if flag.switch:
            parser.add_argument(flag.name, action="store_true", help=help_text)
        else:
            parser.add_argument(flag.name, metavar=flag.metavar, type=flag.parse or str,
                                default=flag.default, choices=flag.choices, help=help_text)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The operator's choices as a worker's command line (flags marked ``worker``)."""
    argv: list[str] = []
    for flag in FLAGS:
        if not flag.worker:
            continue
        value = getattr(args, flag.dest)
        if flag.switch:
            if value:
                argv.append(flag.name)
        elif value is not None:
            argv += [flag.name, str(value)]
    return argv


def markdown_table(flags: Sequence[Flag] = FLAGS) -> str:
    """The README's options table."""
    rows = ["| flag | meaning |", "|---|---|"]
    def cell(text: str) -> str:
        return text.replace("|", "\\|")  # a bare | would end the cell, even in code

    rows += [f"| `{cell(flag.usage)}` | {cell(flag.help)} |" for flag in flags if not flag.hidden]
    rows.append("| `--version` | print the version |")
    return "\n".join(rows)


def readme_block(text: str) -> str:
    """The part of a README between the two flag markers."""
    parts = text.split(README_MARKER)
    if len(parts) != 3:
        raise ValueError(f"the README needs exactly two {README_MARKER} markers")
    return parts[1].strip("\n")


def rewrite_readme(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    readme_block(text)  # exactly two markers
    before, _old, after = text.split(README_MARKER)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{before}{README_MARKER}\n{markdown_table()}\n{README_MARKER}{after}")


if __name__ == "__main__":  # python -m virtio_diskd.daemon.flags README.md
    rewrite_readme(sys.argv[1])
    print(f"rewrote the options table in {sys.argv[1]}")
