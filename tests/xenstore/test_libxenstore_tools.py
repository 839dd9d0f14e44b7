"""Xen's own C client library (Debian's xenstore-utils) against our xenstored.

CI installs ``xenstore-utils``; elsewhere the tests are skipped with the reason.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from vdtest.fixtures import XenstoredProcess, xenstore_tool_env

pytestmark = pytest.mark.skipif(
    shutil.which("xenstore-write") is None,
    reason="Debian package xenstore-utils is not installed (apt-get install xenstore-utils)")


def tool(xs: XenstoredProcess, *args: str, socket: str | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), env=xenstore_tool_env(socket or xs.path), text=True,
                          capture_output=True, timeout=30, check=check)


def test_write_read_exists_list_rm(xenstored_process: XenstoredProcess) -> None:
    xs = xenstored_process
    tool(xs, "xenstore-write", "/vm/1/name", "guest", "/vm/1/uuid", "abc")
    assert tool(xs, "xenstore-read", "/vm/1/name").stdout == "guest\n"
    assert tool(xs, "xenstore-exists", "/vm/1/uuid").returncode == 0
    assert tool(xs, "xenstore-exists", "/vm/2", check=False).returncode != 0
    assert tool(xs, "xenstore-list", "/vm/1").stdout.split() == ["name", "uuid"]
    tool(xs, "xenstore-rm", "/vm/1/name")
    assert tool(xs, "xenstore-list", "/vm/1").stdout.split() == ["uuid"]
    failed = tool(xs, "xenstore-read", "/vm/1/name", check=False)
    assert failed.returncode != 0
    assert "couldn't read path /vm/1/name" in failed.stderr


def test_ls_shows_tree_and_permissions(xenstored_process: XenstoredProcess) -> None:
    xs = xenstored_process
    tool(xs, "xenstore-write", "/be/vd/state", "2")
    tool(xs, "xenstore-chmod", "/be/vd", "n0", "r5")
    listing = tool(xs, "xenstore-ls", "-p", "/be").stdout
    assert "vd = \"\"" in listing and "(n0,r5)" in listing
    assert "state = \"2\"" in listing


def test_chmod_is_enforced_for_a_guest(xenstored_process: XenstoredProcess) -> None:
    xs = xenstored_process
    guest = xs.domain_paths[5]
    tool(xs, "xenstore-write", "/secret", "s", "/public", "p")
    tool(xs, "xenstore-chmod", "/secret", "n0")
    tool(xs, "xenstore-chmod", "/public", "n0", "r5")
    assert tool(xs, "xenstore-read", "/public", socket=guest).stdout == "p\n"
    assert tool(xs, "xenstore-read", "/secret", socket=guest, check=False).returncode != 0
    assert tool(xs, "xenstore-write", "/public", "x", socket=guest, check=False).returncode != 0
    assert tool(xs, "xenstore-read", "/public").stdout == "p\n"


def test_large_directory_is_listed_through_directory_part(
        xenstored_process: XenstoredProcess) -> None:
    xs = xenstored_process
    names = [f"entry-with-a-rather-long-name-{i:04d}" for i in range(300)]  # > 4096 bytes
    args: list[str] = []
    for name in names:
        args += [f"/big/{name}", "1"]
    tool(xs, "xenstore-write", *args)
    assert tool(xs, "xenstore-list", "/big").stdout.split() == names


def test_watch_reports_changes(xenstored_process: XenstoredProcess) -> None:
    xs = xenstored_process
    tool(xs, "xenstore-write", "/watched/x", "0")
    watcher = subprocess.Popen(["xenstore-watch", "-n", "3", "/watched"],
                               env=xenstore_tool_env(xs.path), text=True,
                               stdout=subprocess.PIPE)
    assert watcher.stdout is not None
    try:
        assert watcher.stdout.readline().strip() == "/watched"  # fires on registration
        tool(xs, "xenstore-write", "/watched/x", "1")
        assert watcher.stdout.readline().strip() == "/watched/x"
        tool(xs, "xenstore-rm", "/watched")
        assert watcher.stdout.readline().strip() == "/watched"
        assert watcher.wait(timeout=30) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        watcher.stdout.close()
