"""The Debian package, installed the way an operator installs it: into fresh Debian 12
(bookworm) and Debian 13 (trixie) root filesystems made by ``debootstrap``, with
``apt-get install ./virtio-diskd_*.deb`` resolving its dependencies from Debian's
archive.  Then, inside each: ``--version``, the end-to-end ``demo``, ``systemd-analyze
verify`` of the installed units against the Xen units Debian itself ships, the service
enabled the Debian way, the byte-code compiled, and a purge that leaves nothing behind.

The minimal root filesystems (minbase plus systemd) are cached by suite and
architecture in ``/var/cache/virtio-diskd-deb`` (``VD_DEB_CACHE``); the package and its
dependencies are installed fresh every run.  Needs root and ``debootstrap``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MIRROR = os.environ.get("VD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CACHE = Path(os.environ.get("VD_DEB_CACHE", "/var/cache/virtio-diskd-deb"))
UNITS = ["virtio-diskd.service", "virtio-diskd@5.service", "virtio-diskd.target"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap and chroot need root"),
    pytest.mark.skipif(shutil.which("debootstrap") is None,
                       reason="debootstrap is not installed (.ci/run installs it)"),
]


def say(text: str) -> None:
    print(f"[deb-install] {text}", file=sys.stderr, flush=True)


def host_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built from this checkout by the same builder CI runs."""
    out = tmp_path_factory.mktemp("deb")
    subprocess.run([sys.executable, str(ROOT / "packaging" / "build_deb.py"), str(out)],
                   check=True)
    (package,) = out.glob("virtio-diskd_*_all.deb")
    return package


def base_rootfs(suite: str) -> Path:
    """A cached tarball of a minbase+systemd Debian ``suite``; made once."""
    tarball = CACHE / f"{suite}-{host_arch()}-minbase-systemd.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    work = CACHE / f"{suite}.building"
    shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()
    say(f"debootstrap {suite} from {MIRROR} (once; cached in {CACHE})")
    subprocess.run(["debootstrap", "--variant=minbase", "--include=systemd", suite,
                    str(work), MIRROR], check=True, stdout=subprocess.DEVNULL)
    partial = tarball.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(work), "--numeric-owner", "-cf", str(partial), "."],
                   check=True)
    partial.rename(tarball)
    shutil.rmtree(work, ignore_errors=True)
    say(f"debootstrap {suite}: {time.monotonic() - started:.0f} s")
    return tarball


@contextlib.contextmanager
def fresh_root(suite: str, where: Path) -> Iterator[Path]:
    """A fresh copy of the suite's root filesystem with /proc and /dev/shm mounted and
    services kept from starting (policy-rc.d), as in any chroot install."""
    root = where / suite
    root.mkdir()
    with tarfile.open(base_rootfs(suite)) as tar:
        tar.extractall(root, numeric_owner=True, filter="fully_trusted")
    shutil.copy2("/etc/resolv.conf", root / "etc" / "resolv.conf")
    policy = root / "usr" / "sbin" / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    mounts = [(["-t", "proc", "proc"], root / "proc"), (["-t", "tmpfs", "tmpfs"],
                                                        root / "dev" / "shm")]
    mounted = []
    try:
        for args, point in mounts:
            point.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", *args, str(point)], check=True)
            mounted.append(point)
        yield root
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def chroot(root: Path, command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
    return subprocess.run(["chroot", str(root), "sh", "-c", command], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def ok(root: Path, command: str) -> str:
    result = chroot(root, command)
    assert result.returncode == 0, (f"`{command}` exited {result.returncode}:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_apt_install_on_fresh_debian(suite: str, deb: Path, tmp_path: Path) -> None:
    with fresh_root(suite, tmp_path) as root:
        shutil.copy2(deb, root / "tmp" / deb.name)
        say(f"{suite}: apt-get install ./{deb.name}")
        ok(root, "apt-get update -q")
        ok(root, f"apt-get install -y -q /tmp/{deb.name}")
        python = ok(root, "python3 --version").strip()
        say(f"{suite}: installed with {python}")

        version = ok(root, "virtio-diskd --version").strip()
        assert version.startswith("virtio-diskd ") and version.split()[1][0].isdigit()

        demo = ok(root, "virtio-diskd demo </dev/null")
        assert "demo: PASS" in demo
        assert "\r" not in demo  # piped: step lines, no progress bar redraws

        verify = ok(root, "systemd-analyze verify --man=no " + " ".join(UNITS) + " 2>&1")
        complaints = [line for line in verify.splitlines() if "virtio-diskd" in line]
        assert complaints == [], verify
        enabled = root / "etc/systemd/system/multi-user.target.wants/virtio-diskd.service"
        assert enabled.is_symlink(), "the service was not enabled on installation"
        unit = (root / "usr/lib/systemd/system/virtio-diskd.service").read_text()
        exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
        assert exec_start.split("=", 1)[1].split()[0] == "/usr/sbin/virtio-diskd"
        assert (root / "usr/share/man/man8/virtio-diskd.8.gz").is_file()
        # the units' --worker-user names a user the package made, and the daemon takes it
        assert "--worker-user virtio-diskd" in exec_start
        account = ok(root, "getent passwd virtio-diskd").strip().split(":")
        assert int(account[2]) > 0 and account[6] == "/usr/sbin/nologin", account
        ok(root, "virtio-diskd --worker-user virtio-diskd --help >/dev/null")
        compiled = list((root / "usr/lib/virtio-diskd/virtio_diskd/ioreq").glob(
            "__pycache__/*.pyc"))
        assert compiled, "postinst did not byte-compile the private library"
        # the bundled modules are what the daemon imports, not anything of Debian's
        origin = ok(root, "PYTHONPATH=/usr/lib/virtio-diskd python3 -s -c "
                          "'import trio, daemon; print(trio.__file__, daemon.__file__)'")
        assert origin.count("/usr/lib/virtio-diskd/") == 2, origin

        ok(root, "apt-get purge -y -q virtio-diskd")
        left = [p for p in ("usr/lib/virtio-diskd", "usr/sbin/virtio-diskd",
                            "etc/virtio-diskd.conf",
                            "usr/lib/systemd/system/virtio-diskd.service")
                if os.path.lexists(root / p)]
        assert left == [] and not os.path.lexists(enabled), left
