"""virtio-diskd(8) comes from the same declarations as --help and the README table."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from virtio_diskd.daemon import flags
from virtio_diskd.daemon.cli import tools_parser
from virtio_diskd.daemon.manpage import SUBCOMMAND_TEXT, render


def test_every_flag_and_sub_command_is_in_the_man_page() -> None:
    page = render("test", tools_parser())
    for flag in flags.FLAGS:
        assert (f"\\fB{flag.name.replace('-', chr(92) + '-')}\\fR" in page) != flag.hidden
    for command in ("status", "demo", "bench", "xenstored"):
        assert f".SS {command}" in page and command in SUBCOMMAND_TEXT


def test_a_new_flag_reaches_the_man_page(monkeypatch: pytest.MonkeyPatch) -> None:
    knob = flags.Flag("--new-knob", "a knob", example="1", metavar="N")
    monkeypatch.setattr(flags, "FLAGS", (*flags.FLAGS, knob))
    assert "new\\-knob" in render("test", tools_parser())


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_the_man_page_renders_without_complaints(tmp_path: Path) -> None:
    page = tmp_path / "virtio-diskd.8"
    page.write_text(subprocess.run([sys.executable, "-m", "virtio_diskd.daemon.manpage"],
                                   check=True, capture_output=True, text=True).stdout)
    result = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                            check=False, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin",
                                              "MAN_KEEP_FORMATTING": "0"})
    assert result.returncode == 0 and "troff" not in result.stderr, result.stderr
    plain = re.sub(".\x08", "", result.stdout).replace("‐", "-")  # no overstrike
    assert "--xenstore-timeout" in plain
