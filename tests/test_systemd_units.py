"""The unit files pass `systemd-analyze verify` (with stub Xen units beside them)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUBS = {
    "xenstored.service": "[Unit]\nDescription=stub\n[Service]\nExecStart=/bin/true\n",
    "xendomains.service": "[Unit]\nDescription=stub\n[Service]\nExecStart=/bin/true\n",
    "proc-xen.mount": "[Unit]\nDescription=stub\n[Mount]\nWhat=xenfs\nWhere=/proc/xen\n"
                      "Type=xenfs\n",
}

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed")


def test_units_verify(tmp_path: Path) -> None:
    for name, text in STUBS.items():
        (tmp_path / name).write_text(text)
    units = []
    for unit in ("virtio-diskd.service", "virtio-diskd@.service", "virtio-diskd.target",
                 "virtio-diskd-targets.service"):
        text = (ROOT / "systemd" / unit).read_text()
        # verify resolves ExecStart: point it at this environment's entry point
        text = text.replace("/usr/sbin/virtio-diskd", shutil.which("virtio-diskd") or
                            "/bin/true")
        target = tmp_path / unit
        target.write_text(text)
        units.append(str(target if "@" not in unit else tmp_path / "virtio-diskd@5.service"))
        if "@" in unit:
            (tmp_path / "virtio-diskd@5.service").write_text(text)
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{tmp_path}:")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], env=env,
                            capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    complaints = [line for line in output.splitlines() if "virtio-diskd" in line
                  and any(w in line for w in ("Unknown", "Invalid", "Failed", "error"))]
    assert complaints == [], complaints


def test_units_use_notify_and_the_documented_flags() -> None:
    service = (ROOT / "systemd" / "virtio-diskd.service").read_text()
    assert "Type=notify" in service and "WatchdogSec=" in service
    assert not any(line.startswith("PrivateDevices=")  # it would hide /dev/xen
                   for line in service.splitlines())
    targets = (ROOT / "systemd" / "virtio-diskd-targets.service").read_text()
    assert "ExecStart=/usr/sbin/virtio-diskd grant-targets " in targets
    assert "Type=notify" in targets and "Before=xendomains.service" in targets
    template = (ROOT / "systemd" / "virtio-diskd@.service").read_text()
    assert "--domid %i" in template and "PartOf=virtio-diskd.target" in template


def test_units_carry_memory_and_task_limits() -> None:
    for unit in ("virtio-diskd.service", "virtio-diskd@.service"):
        lines = (ROOT / "systemd" / unit).read_text().splitlines()
        for key in ("MemoryMax=", "MemoryHigh=", "TasksMax="):
            assert any(line.startswith(key) for line in lines), f"{unit} has no {key}"
