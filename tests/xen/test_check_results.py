"""The real-Xen tier's verdict: a scenario that reports nothing fails the run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECK = Path(__file__).resolve().parent / "check_results.py"
RUN = Path(__file__).resolve().parent / "run"


def _check(log: str, tmp_path: Path, *expected: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "serial.log"
    path.write_text(log)
    return subprocess.run([sys.executable, str(CHECK), str(path), *expected],
                          capture_output=True, text=True, check=False)


def test_every_scenario_reported_and_passed(tmp_path: Path) -> None:
    log = " 12.0 VDRESULT one_disk PASS 9.0s\n 30.1 VDRESULT two_guests PASS 18.2s\n"
    assert _check(log, tmp_path, "one_disk", "two_guests").returncode == 0


def test_a_missing_scenario_fails_the_run(tmp_path: Path) -> None:
    """Planted: the second scenario never reported (a hang, a dead boot)."""
    log = " 12.0 VDRESULT one_disk PASS 9.0s\n(XEN) d2v0 ... then nothing\n"
    result = _check(log, tmp_path, "one_disk", "two_guests")
    assert result.returncode == 1
    assert "MISSING two_guests" in result.stdout.replace("  ", " ")


def test_a_failed_scenario_fails_the_run(tmp_path: Path) -> None:
    log = " 12.0 VDRESULT one_disk FAIL 9.0s\n"
    assert _check(log, tmp_path, "one_disk").returncode == 1


def test_the_runner_judges_with_the_expected_list() -> None:
    text = RUN.read_text()
    assert "check_results.py" in text and "scenarios=" in (RUN.parent / "dom0-init.sh").read_text()
