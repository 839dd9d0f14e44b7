"""Flags are declared once: the parser, the workers' command line and the README follow."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from virtio_diskd.daemon import flags
from virtio_diskd.daemon.cli import _daemon_config, daemon_parser

ROOT = Path(__file__).resolve().parent.parent.parent


def _every_flag_argv() -> list[str]:
    """Every flag a worker must see, each with its non-default example value."""
    argv: list[str] = []
    for flag in flags.FLAGS:
        if not flag.worker:
            continue
        if flag.switch:
            argv.append(flag.name)
        else:
            assert flag.example is not None, f"{flag.name} needs an example value"
            assert flag.parse is None or flag.parse(flag.example) != flag.default, flag.name
            assert flag.example != flag.default, flag.name
            argv += [flag.name, flag.example]
    return argv


def test_a_worker_sees_every_flag(tmp_path: Path) -> None:
    argv = _every_flag_argv()
    supervisor = daemon_parser().parse_args(argv)
    supervisor_config = _daemon_config(supervisor)
    # what the supervisor (or its zygote) starts a worker with
    worker = daemon_parser().parse_args([*supervisor_config.worker_args, "--domid", "7",
                                         "--worker"])
    worker_config = _daemon_config(worker)
    for flag in flags.FLAGS:
        if flag.worker:
            assert getattr(worker, flag.dest) == getattr(supervisor, flag.dest), flag.name
            assert getattr(worker, flag.dest) != flag.default or flag.switch, flag.name
    assert worker_config.domid == 7 and worker_config.worker
    assert dataclasses.replace(worker_config, domid=None, worker=False) == supervisor_config


def test_the_hand_off_misses_a_flag_it_drops() -> None:
    """The check above fails when one flag is not handed on (planted fault)."""
    argv = _every_flag_argv()
    supervisor = daemon_parser().parse_args(argv)
    dropped = next(f for f in flags.FLAGS if f.worker and not f.switch)
    handed = flags.worker_argv(supervisor)
    at = handed.index(dropped.name)
    worker = daemon_parser().parse_args(handed[:at] + handed[at + 2:])
    assert getattr(worker, dropped.dest) != getattr(supervisor, dropped.dest)


def test_process_only_flags_stay_with_the_supervisor() -> None:
    argv = ["--foreground", "--domid", "5"]
    handed = flags.worker_argv(daemon_parser().parse_args(argv))
    assert not {"--foreground", "--domid", "--daemonize", "--pidfile", "--worker"} & set(handed)


def test_the_readme_table_is_generated_from_the_declarations() -> None:
    readme = (ROOT / "README.md").read_text()
    assert flags.readme_block(readme) == flags.markdown_table(), (
        "README options table is stale: run python -m virtio_diskd.daemon.flags README.md")
    for flag in flags.FLAGS:  # the name whole: --worker is not --worker-user
        named = re.search(f"`{re.escape(flag.name)}[` ]", readme) is not None
        assert named != flag.hidden, flag.name


def test_the_readme_check_notices_a_new_flag() -> None:
    extra = flags.Flag("--new-knob", "a knob nobody documented", example="1", metavar="N")
    assert flags.markdown_table((*flags.FLAGS, extra)) != flags.markdown_table()
    with pytest.raises(ValueError, match="two"):
        flags.readme_block("no markers here")
