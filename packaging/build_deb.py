"""Builds ``virtio-diskd_<version>-1_all.deb`` from this checkout.

    .venv/bin/python packaging/build_deb.py [OUT_DIR]        # default: dist/

Why this layout (Debian 12 and 13 Dom0s, ``apt install ./virtio-diskd_*.deb``):

- Debian's system Python refuses ``pip install`` (PEP 668), and bookworm's python3-trio
  (0.22), python3-structlog (22.3) and python3-daemon (2.3) are older than the versions
  this daemon is tested with; pyxs is not packaged at all.  So the Python dependencies
  are bundled in the package's own directory, ``/usr/lib/virtio-diskd``, the way
  dh-virtualenv does it, and only the interpreter and the Xen libraries come from
  Debian.  Every bundled dependency is pure Python, so one ``Architecture: all``
  package serves bookworm (python3.11) and trixie (python3.13) on arm64 and amd64.
- The bundled versions are exactly the ones installed in the environment that runs this
  script (the one the tests ran in), copied file by file from their RECORDs together
  with their ``.dist-info`` (licences, metadata); nothing is downloaded for them.
- ``/usr/sbin/virtio-diskd`` puts that directory first on the path and exports it for
  the worker processes the supervisor starts with ``python3 -m virtio_diskd.daemon``.
  The directory holds no top-level ``daemon`` of ours, only python-daemon's.
- The postinst byte-compiles the directory (the units' ``ProtectSystem=full`` keeps
  /usr read-only for the daemon, which would otherwise compile on every start), and
  enables the service with ``deb-systemd-helper`` as dh_installsystemd would; on an
  upgrade it restarts it, which running guests survive (README "Restarts and upgrades").

Only the standard library, pip (to build our own wheel) and ``dpkg-deb`` are needed.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
LIB = "usr/lib/virtio-diskd"
DEBIAN_REVISION = "1"
#: Debian packages whose libraries the daemon loads (ioreq/xen/libxen.py), and the
#: interpreter.  The names carry the sonames, which are the same in bookworm and trixie.
DEPENDS = ["python3 (>= 3.11)", "libxendevicemodel1", "libxenforeignmemory1",
           "libxenevtchn1", "libxengnttab1", "libxentoolcore1", "libseccomp2"]
RECOMMENDS = ["xen-utils-common"]
UNITS = ["virtio-diskd.service", "virtio-diskd@.service", "virtio-diskd.target",
         "virtio-diskd-targets.service"]


def say(text: str) -> None:
    print(f"[build-deb] {text}", flush=True)


def project_version() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if not match:
        raise SystemExit("pyproject.toml has no version")
    return match.group(1)


def requirement_name(spec: str) -> str | None:
    """The distribution a ``Requires-Dist`` line names, or None when its marker
    excludes it here (extras, older Pythons) — evaluated with pip's own packaging."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - pip always vendors it
        from pip._vendor.packaging.requirements import Requirement  # type: ignore
    req = Requirement(spec)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return None
    return req.name


def dependency_closure(top: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``top`` needs at run time, transitively."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    pending = list(top)
    while pending:
        name = pending.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        dist = importlib.metadata.distribution(name)
        seen[key] = dist
        for spec in dist.requires or []:
            wanted = requirement_name(spec)
            if wanted:
                pending.append(wanted)
    return sorted(seen.values(), key=lambda d: d.metadata["Name"].lower())


def copy_distribution(dist: importlib.metadata.Distribution, lib: Path) -> int:
    """Copies an installed distribution's files (per its RECORD) under ``lib``; entry
    point scripts outside site-packages and byte-code are left out."""
    copied = 0
    for item in dist.files or []:
        rel = Path(str(item))
        if rel.parts[0] == ".." or "__pycache__" in rel.parts or rel.suffix == ".pyc":
            continue
        source = Path(str(dist.locate_file(item)))
        if not source.is_file():
            continue
        target = lib / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        copied += 1
    if not copied:
        raise SystemExit(f"{dist.metadata['Name']}: no files found to bundle")
    return copied


def our_wheel(work: Path) -> Path:
    """This checkout as a wheel (not the editable install): the mapped namespace
    ``virtio_diskd.{daemon,backend,ioreq}`` exactly as pip installs it."""
    leftover = ROOT / "build"  # setuptools' scratch directory, not ours to leave behind
    existed = leftover.exists()
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                        "--wheel-dir", str(work), str(ROOT)], check=True)
    finally:
        if not existed:
            shutil.rmtree(leftover, ignore_errors=True)
    wheels = sorted(work.glob("virtio_diskd-*.whl"))
    if not wheels:
        raise SystemExit("pip built no wheel")
    return wheels[-1]


def launcher() -> str:
    return f"""#!/usr/bin/python3 -s
# virtio-diskd, installed by its Debian package: the code and its bundled Python
# dependencies live in /{LIB} (see /usr/share/doc/virtio-diskd/README.Debian).
import os
import sys

LIB = "/{LIB}"
sys.path.insert(0, LIB)
# the supervisor starts its zygote and workers as `python3 -m virtio_diskd.daemon`
os.environ["PYTHONPATH"] = os.pathsep.join(
    [LIB] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
from virtio_diskd.daemon.cli import main  # noqa: E402

sys.exit(main())
"""


def manpage(lib: Path, version: str) -> bytes:
    env = dict(os.environ, PYTHONPATH=str(lib))
    page = subprocess.run([sys.executable, "-s", "-m", "virtio_diskd.daemon.manpage"],
                          env=env, cwd=lib, check=True, capture_output=True).stdout
    if b".TH VIRTIO" not in page or version.encode() not in page:
        raise SystemExit("the man page generator printed no page for this version")
    return page


def gz(data: bytes) -> bytes:
    """gzip -9n: no name, no timestamp, so the package is reproducible."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0, filename="") as f:
        f.write(data)
    return out.getvalue()


def control(version: str, installed_kib: int, bundled: list[str]) -> str:
    return (f"Package: virtio-diskd\n"
            f"Version: {version}-{DEBIAN_REVISION}\n"
            f"Architecture: all\n"
            f"Maintainer: virtio-diskd developers <virtio-diskd@localhost>\n"
            f"Installed-Size: {installed_kib}\n"
            f"Depends: {', '.join(DEPENDS)}\n"
            f"Recommends: {', '.join(RECOMMENDS)}\n"
            f"Section: admin\n"
            f"Priority: optional\n"
            f"Homepage: https://pypi.org/project/virtio-diskd/\n"
            f"Description: virtio-blk device model for Xen guests\n"
            f" One daemon serves every specification=virtio disk of every Xen guest\n"
            f" (xl disk lines with specification=virtio): it registers an IOREQ server\n"
            f" per guest, emulates the virtio-mmio registers and serves the guest's\n"
            f" virtio-blk requests from raw images or block devices.\n"
            f" .\n"
            f" Bundled Python modules (in /{LIB}): {', '.join(bundled)}.\n")


def build(out_dir: Path) -> Path:
    version = project_version()
    with tempfile.TemporaryDirectory(prefix="vd-deb-") as tmp:
        work = Path(tmp)
        stage = work / "root"
        lib = stage / LIB
        lib.mkdir(parents=True)

        say(f"virtio-diskd {version}: building the wheel of this checkout")
        with zipfile.ZipFile(our_wheel(work)) as wheel:
            wheel.extractall(lib)
        if (lib / "daemon").exists() or (lib / "virtio_diskd" / "__init__.py").exists():
            raise SystemExit("the wheel's layout would shadow python-daemon's `daemon`")

        ours = importlib.metadata.distribution("virtio-diskd")
        top = [n for s in ours.requires or [] if (n := requirement_name(s))]
        bundled = []
        for dist in dependency_closure(top):
            files = copy_distribution(dist, lib)
            bundled.append(f"{dist.metadata['Name']} {dist.version}")
            say(f"bundled {dist.metadata['Name']} {dist.version} ({files} files)")
        for junk in lib.rglob("__pycache__"):
            shutil.rmtree(junk, ignore_errors=True)

        sbin = stage / "usr" / "sbin" / "virtio-diskd"
        sbin.parent.mkdir(parents=True)
        sbin.write_text(launcher(), encoding="utf-8")
        sbin.chmod(0o755)

        units = stage / "usr" / "lib" / "systemd" / "system"
        units.mkdir(parents=True)
        for unit in UNITS:
            text = (ROOT / "systemd" / unit).read_text(encoding="utf-8")
            if "ExecStart=" in text and "ExecStart=/usr/sbin/virtio-diskd " not in text:
                raise SystemExit(f"{unit}: ExecStart does not run /usr/sbin/virtio-diskd")
            (units / unit).write_text(text, encoding="utf-8")

        man = stage / "usr" / "share" / "man" / "man8"
        man.mkdir(parents=True)
        (man / "virtio-diskd.8.gz").write_bytes(gz(manpage(lib, version)))

        doc = stage / "usr" / "share" / "doc" / "virtio-diskd"
        doc.mkdir(parents=True)
        shutil.copy2(HERE / "debian" / "copyright", doc / "copyright")
        (doc / "README.Debian").write_text((HERE / "debian" / "README.Debian").read_text())
        (doc / "README.md.gz").write_bytes(gz((ROOT / "README.md").read_bytes()))
        (doc / "changelog.Debian.gz").write_bytes(gz(
            (HERE / "debian" / "changelog").read_text().replace(
                "@VERSION@", f"{version}-{DEBIAN_REVISION}").encode()))

        etc = stage / "etc"
        etc.mkdir()
        shutil.copy2(HERE / "debian" / "virtio-diskd.conf", etc / "virtio-diskd.conf")

        meta = stage / "DEBIAN"
        meta.mkdir()
        for script in ("postinst", "prerm", "postrm"):
            shutil.copy2(HERE / "debian" / script, meta / script)
            (meta / script).chmod(0o755)
        (meta / "conffiles").write_text("/etc/virtio-diskd.conf\n")

        sums = []
        size = 0
        for path in sorted(p for p in stage.rglob("*") if p.is_file()):
            rel = path.relative_to(stage)
            if rel.parts[0] == "DEBIAN":
                continue
            path.chmod(0o755 if os.access(path, os.X_OK) else 0o644)
            size += path.stat().st_size
            if rel.parts[0] != "etc":  # conffiles are not in md5sums
                sums.append(f"{hashlib.md5(path.read_bytes()).hexdigest()}  {rel}\n")
        for directory in (p for p in stage.rglob("*") if p.is_dir()):
            directory.chmod(0o755)
        (meta / "md5sums").write_text("".join(sums))
        (meta / "control").write_text(control(version, (size + 1023) // 1024, bundled))

        out_dir.mkdir(parents=True, exist_ok=True)
        deb = out_dir / f"virtio-diskd_{version}-{DEBIAN_REVISION}_all.deb"
        env = dict(os.environ, SOURCE_DATE_EPOCH="0")
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(stage),
                        str(deb)], check=True, env=env, stdout=subprocess.DEVNULL)
        say(f"{deb} ({deb.stat().st_size >> 10} KiB, {len(sums)} files)")
        return deb


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "dist"
    build(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
