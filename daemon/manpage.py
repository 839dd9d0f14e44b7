"""``virtio-diskd(8)``, generated from the same flag declarations as ``--help`` and the
README's options table (:mod:`.flags`), and from the sub-commands' parsers.

    python -m virtio_diskd.daemon.manpage > virtio-diskd.8
"""

from __future__ import annotations

import argparse
import sys

from virtio_diskd.daemon import flags

SUBCOMMAND_TEXT = {
    "status": "Guests, devices, XenBus phase, negotiated features and counters of every "
              "running daemon: the all-in-one service and each virtio-diskd@N instance.",
    "ctl": "Run-time control of running disks, as blktap's tap-ctl: list (guests, devices, "
           "targets, formats, XenBus phase, paused or running), stats (request and byte "
           "counters), pause DOMID VDEV (no new request is taken, the in-flight ones finish "
           "and the target is flushed, so a copy taken now is consistent; the guest's I/O "
           "waits and none fails), resume DOMID VDEV.  Talks to the worker serving the guest "
           "over its root-only control socket in the run directory.",
    "grant-targets": "Dom0 service for driver domains (unit virtio-diskd-targets.service): "
                     "for every guest whose virtio disk names a driver domain as backend, "
                     "makes that domain the guest's device model (xc_domain_set_target and "
                     "xs_set_target, as XSM's dummy policy requires) and writes "
                     "the target node in the driver domain's xenstore home, which its daemon waits "
                     "for before it creates the guest's IOREQ server.  Xen sets a domain's "
                     "target once: one driver domain serves one guest; FLASK is the "
                     "alternative.",
    "demo": "Starts the simulated Xen host and the daemon as its own process, creates a "
            "guest with two virtio disks, runs a verifying workload, destroys the guest "
            "and stops the daemon; exits 0 only when every step held.",
    "bench": "Measures the data path (full path, device model, disk engine, xenstore "
             "clients) next to the raw limits measured in the same run; every byte "
             "verified.",
    "xenstored": "Runs the simulated xenstored (Xen's xenstore-* tools work against it "
                 "through XENSTORED_PATH).",
}


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, leading dots and quotes, hyphens in flags."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def render(version: str, tools: argparse.ArgumentParser) -> str:
    lines = [f'.TH VIRTIO\\-DISKD 8 "" "virtio-diskd {version}" "System Administration"',
             ".SH NAME",
             "virtio\\-diskd \\- virtio\\-blk device model for Xen guests",
             ".SH SYNOPSIS",
             ".B virtio\\-diskd",
             "[\\fIOPTIONS\\fR]",
             ".br",
             ".B virtio\\-diskd",
             "\\fBstatus\\fR|\\fBctl\\fR|\\fBgrant\\-targets\\fR|\\fBdemo\\fR|"
             "\\fBbench\\fR|\\fBxenstored\\fR [\\fIARGS\\fR]",
             ".SH DESCRIPTION",
             _roff("Serves every specification=virtio disk that libxl lists in the "
                   "daemon's virtio_disk backend directory in xenstore: one IOREQ server "
                   "and one "
                   "supervised worker process per guest, a virtio-mmio register file, "
                   "split and packed virtqueues and virtio-blk with block I/O straight "
                   "into the guest's memory (foreign mapping, or grant mapping)."),
             ".SH OPTIONS"]
    for flag in flags.FLAGS:
        if flag.hidden:
            continue
        lines += [".TP", f"\\fB{_roff(flag.name)}\\fR" +
                  (f" \\fI{_roff(flag.usage.split(' ', 1)[1])}\\fR" if not flag.switch
                   else ""), _roff(flag.help)]
    lines += [".TP", "\\fB\\-\\-version\\fR", "print the version", ".SH COMMANDS"]
    commands = next(a for a in tools._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        lines += [".SS " + name, _roff(SUBCOMMAND_TEXT[name])]
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                lines += [".TP", "\\fB" + _roff(", ".join(action.option_strings)) + "\\fR",
                          _roff(action.help or "")]
    lines += [".SH SIGNALS",
              _roff("SIGTERM drains in-flight I/O, closes every device (XenBus state 6) and "
                    "exits 0 within 8 s; a second SIGTERM exits at once; SIGHUP re-reads "
                    "the log level from --config. SIGTERM and SIGINT work from the first "
                    "moment, also while xenstored is unreachable."),
              ".SH FILES",
              ".TP", "\\fI/run/virtio\\-diskd/\\fR",
              "status sockets (one per process; virtio\\-diskd@N uses a subdirectory N)",
              ".TP", "\\fI/etc/virtio\\-diskd.conf\\fR", _roff("log_level = LEVEL"),
              ".SH SEE ALSO", "\\fBxl\\fR(1), \\fBxl\\-disk\\-configuration\\fR(5), "
              "\\fBsystemd.service\\fR(5), \\fBjournalctl\\fR(1)"]
    return "\n".join(lines) + "\n"


def main() -> int:
    from virtio_diskd.daemon.cli import _version, tools_parser

    sys.stdout.write(render(_version(), tools_parser()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
