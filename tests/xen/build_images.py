"""Real-Xen tier, step 2: the Dom0 and DomU initramfs images.

Dom0: busybox, Debian's arm64 Xen tools and libraries, python3.11 with its standard
library, virtio-diskd installed from its Debian package (``VD_DEB``, or built from this
checkout by ``packaging/build_deb.py``), the Xen kernel modules, and /init
(``dom0-init.sh``) which starts xenstored, then the daemon with the installed unit's
``ExecStart`` command line, then runs the scenarios.
DomU: busybox, virtio_mmio + virtio_blk, and /init (``domU-init.sh``), a workload that
writes, reads back and verifies patterns on each virtio disk and reports on the console.
Driver domain (inside Dom0's image, for ``xl create``): Dom0's packages without the
toolstack and QEMU, virtio-diskd, and /init (``dd-init.sh``).  The DomU kernel with
grant DMA (``build_grant_kernel.sh``) goes into Dom0's image as ``/root/Image-grants``.

Usage: python build_images.py CACHE OUT_DIR
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DOM0_MODULES = ["kernel/drivers/xen", "kernel/drivers/block/loop.ko",
                "kernel/drivers/block/nbd.ko"]
#: what a driver domain leaves out of Dom0's packages: the toolstack's binaries and QEMU
DD_SKIPPED = ("/linux-image-", "/qemu-", "/xen-utils-4.17_", "/libglib2.0", "/libgnutls")
DOMU_MODULES = ["kernel/drivers/virtio/virtio_mmio.ko", "kernel/drivers/block/virtio_blk.ko",
                "kernel/fs/ext4", "kernel/fs/jbd2", "kernel/fs/mbcache.ko", "kernel/lib/crc16.ko",
                "kernel/crypto/crc32c_generic.ko"]


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def unpack(deb: str, dest: Path) -> None:
    run("dpkg-deb", "-x", deb, str(dest))


def kernel_deb(cache: Path) -> str:
    pattern = str(cache / "debs" / "linux-image-6.1.0-*-arm64-unsigned_*.deb")
    debs = sorted(d for d in glob.glob(pattern) if "-rt-" not in d and "-cloud-" not in d)
    if not debs:
        raise SystemExit("no arm64 kernel .deb in the cache: run setup.sh")
    return debs[-1]


def kernel(cache: Path, out: Path) -> tuple[Path, str]:
    """Unpack the kernel once; returns its tree and release string."""
    tree = out / "kernel"
    if not tree.exists():
        unpack(kernel_deb(cache), tree)
    release = os.listdir(tree / "lib" / "modules")[0]
    return tree, release


def copy_modules(tree: Path, release: str, rootfs: Path, wanted: list[str]) -> None:
    src = tree / "lib" / "modules" / release
    dst = rootfs / "lib" / "modules" / release
    for item in wanted:
        path = src / item
        target = dst / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, target, dirs_exist_ok=True)
        elif path.exists():
            shutil.copy2(path, target)
    for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (src / meta).exists():
            shutil.copy2(src / meta, dst / meta)
    run("depmod", "-b", str(rootfs), release)


def cpio(rootfs: Path, image: Path) -> None:
    files = subprocess.run(["find", ".", "-print0"], cwd=rootfs, check=True,
                           capture_output=True).stdout
    archive = subprocess.run(["cpio", "--null", "-o", "-H", "newc", "--quiet"], cwd=rootfs,
                             input=files, check=True, capture_output=True).stdout
    with gzip.open(image, "wb", compresslevel=3) as f:
        f.write(archive)


def busybox(rootfs: Path) -> None:
    for sub in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run",
                "var/log/xen", "var/run/xen", "var/lib/xen", "root", "mnt"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    busybox_bin = rootfs / "bin" / "busybox"
    if not busybox_bin.exists():
        raise SystemExit("busybox-static was not unpacked")


def compile_stdlib(rootfs: Path) -> None:
    """What Debian's python3.11 postinst does (py3compile), which unpacking the .debs
    skips: without it Dom0's first Python start compiles the standard library, under
    TCG for half a minute.  Same 3.11 byte-code as this host's; unchecked-hash because
    the initramfs does not keep the sources' mtimes.  Files that do not compile (test
    data with deliberate syntax errors) are left to compile, and fail, at run time."""
    if sys.version_info[:2] != (3, 11):
        return
    stdlib = rootfs / "usr" / "lib" / "python3.11"
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-x", "/test/",
                    "-s", str(rootfs), "-p", "/",  # tracebacks name Dom0's paths
                    "--invalidation-mode", "unchecked-hash", str(stdlib)],
                   check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def the_package(out: Path) -> Path:
    """The Debian package of this checkout: ``VD_DEB`` (what .ci/run built), else built
    now by the same builder."""
    given = os.environ.get("VD_DEB")
    if given:
        return Path(given)
    subprocess.run([sys.executable, str(ROOT / "packaging" / "build_deb.py"), str(out)],
                   check=True)
    return sorted(out.glob("virtio-diskd_*_all.deb"))[-1]


def install_package(rootfs: Path, deb: Path) -> None:
    """virtio-diskd installed into Dom0 from its .deb, as dpkg would lay it out; then
    the postinst's byte-compilation, done here by this host's python3.11 (the same
    version as Dom0's, so the same byte-code) because under TCG it takes minutes."""
    unpack(str(deb), rootfs)
    lib = rootfs / "usr" / "lib" / "virtio-diskd"
    if not (lib / "virtio_diskd" / "daemon" / "cli.py").exists():
        raise SystemExit(f"{deb}: no virtio_diskd in /usr/lib/virtio-diskd")
    if sys.version_info[:2] == (3, 11):
        # unchecked-hash: the initramfs need not keep the sources' mtimes for the
        # byte-code to be used
        run(sys.executable, "-m", "compileall", "-q", "-s", str(rootfs), "-p", "/",
            "--invalidation-mode", "unchecked-hash", str(lib))
    add_worker_user(rootfs)
    unit = rootfs / "usr" / "lib" / "systemd" / "system" / "virtio-diskd.service"
    exec_start = [line for line in unit.read_text().splitlines()
                  if line.startswith("ExecStart=")]
    print(f"[xen-images] Dom0 gets {deb.name}; the daemon runs as its unit says: "
          f"{exec_start[0]}", flush=True)


#: the id ``useradd --system`` gives the first system user on Debian (SYS_UID_MAX)
WORKER_ID = 999


def add_worker_user(rootfs: Path) -> None:
    """The postinst's ``useradd --system --user-group virtio-diskd``, which unpacking
    the .deb does not run: the units' ``--worker-user virtio-diskd`` names it."""
    etc = rootfs / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    for name, root_line, line in (
            ("passwd", "root:x:0:0:root:/root:/bin/sh",
             f"virtio-diskd:x:{WORKER_ID}:{WORKER_ID}:virtio-diskd workers:/nonexistent:"
             "/usr/sbin/nologin"),
            ("group", "root:x:0:", f"virtio-diskd:x:{WORKER_ID}:")):
        path = etc / name
        lines = path.read_text().splitlines() if path.exists() else []
        if not any(entry.startswith("root:") for entry in lines):
            lines.insert(0, root_line)
        if not any(entry.startswith("virtio-diskd:") for entry in lines):
            lines.append(line)
        path.write_text("\n".join(lines) + "\n")


def build_domu(cache: Path, out: Path, tree: Path, release: str) -> Path:
    rootfs = out / "domU-root"
    shutil.rmtree(rootfs, ignore_errors=True)
    for deb in glob.glob(str(cache / "debs" / "busybox-static_*_arm64.deb")):
        unpack(deb, rootfs)
    busybox(rootfs)
    copy_modules(tree, release, rootfs, DOMU_MODULES)
    shutil.copy2(HERE / "domU-init.sh", rootfs / "init")
    (rootfs / "init").chmod(0o755)
    image = out / "domU-rootfs.cpio.gz"
    cpio(rootfs, image)
    return image


def xen_rootfs(cache: Path, rootfs: Path, tree: Path, release: str, init: str,
               skipped: tuple[str, ...], package: Path) -> None:
    """A Dom0-like root: the cached .debs (less ``skipped``), busybox, the Xen kernel
    modules, the byte-compiled stdlib, virtio-diskd from its .deb, and ``init``."""
    shutil.rmtree(rootfs, ignore_errors=True)
    for deb in sorted(glob.glob(str(cache / "debs" / "*.deb"))):
        if not any(skip in deb for skip in skipped):
            unpack(deb, rootfs)
    busybox(rootfs)
    copy_modules(tree, release, rootfs, DOM0_MODULES)
    compile_stdlib(rootfs)
    install_package(rootfs, package)
    unit_filters(rootfs)
    shutil.copy2(HERE / init, rootfs / "init")
    (rootfs / "init").chmod(0o755)


def unit_filters(rootfs: Path) -> None:
    """The units' SystemCallFilter= resolved here (no systemd in the tier's domains), with
    the script that applies one before a command: /root/<unit>.filter.json and
    /root/unit_filter.py (tests/vdtest/unit_filter.py).  The inits start the daemon
    under its unit's filter when they find them."""
    if shutil.which("systemd-analyze") is None:
        print("[xen-images] systemd-analyze missing: the daemon runs without its units' "
              "system-call filter", flush=True)
        return
    sys.path.insert(0, str(HERE.parent))
    from vdtest import unit_filter

    groups = unit_filter.systemd_groups()
    for unit in ("virtio-diskd.service", "virtio-diskd-targets.service"):
        spec = unit_filter.resolve((HERE.parent.parent / "systemd" / unit).read_text(), groups)
        (rootfs / "root" / f"{unit}.filter.json").write_text(json.dumps(spec))
    shutil.copy2(Path(unit_filter.__file__), rootfs / "root" / "unit_filter.py")


def build_driver_domain(cache: Path, out: Path, tree: Path, release: str,
                        package: Path) -> Path:
    """The driver domain: Python, the Xen libraries and virtio-diskd, the Xen kernel
    modules, and /init (``dd-init.sh``); no toolstack, no xenstored, no QEMU."""
    rootfs = out / "dd-root"
    xen_rootfs(cache, rootfs, tree, release, "dd-init.sh", DD_SKIPPED, package)
    image = out / "dd-rootfs.cpio.gz"
    cpio(rootfs, image)
    shutil.rmtree(rootfs, ignore_errors=True)
    return image


def grant_kernel(cache: Path) -> Path | None:
    """The DomU kernel with CONFIG_XEN_VIRTIO that ``build_grant_kernel.sh`` cached."""
    built = sorted(glob.glob(str(cache / "grant-kernel-*" / "Image")))
    return Path(built[-1]) if built else None


def build_dom0(cache: Path, out: Path, tree: Path, release: str, domu: Path,
               extra: dict[str, Path], package: Path) -> Path:
    rootfs = out / "dom0-root"
    xen_rootfs(cache, rootfs, tree, release, "dom0-init.sh", ("/linux-image-",), package)
    shutil.copy2(domu, rootfs / "root" / "domU-rootfs.cpio.gz")
    shutil.copy2(tree / "boot" / f"vmlinuz-{release}", rootfs / "root" / "Image")
    for cfg in HERE.glob("*.cfg"):
        shutil.copy2(cfg, rootfs / "root" / cfg.name)
    for name, path in extra.items():
        shutil.copy2(path, rootfs / "root" / name)
    image = out / "dom0-rootfs.cpio.gz"
    cpio(rootfs, image)
    return image


def main() -> int:
    cache, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    tree, release = kernel(cache, out)
    print(f"[xen-images] kernel {release}", flush=True)
    domu = build_domu(cache, out, tree, release)
    print(f"[xen-images] DomU initramfs {domu.stat().st_size >> 20} MiB", flush=True)
    package = the_package(out)
    extra = {"dd-rootfs.cpio.gz": build_driver_domain(cache, out, tree, release, package)}
    print(f"[xen-images] driver domain initramfs "
          f"{extra['dd-rootfs.cpio.gz'].stat().st_size >> 20} MiB", flush=True)
    kernel_with_grants = grant_kernel(cache)
    if kernel_with_grants is not None:
        extra["Image-grants"] = kernel_with_grants
        print(f"[xen-images] DomU kernel with CONFIG_XEN_VIRTIO: {kernel_with_grants}",
              flush=True)
    dom0 = build_dom0(cache, out, tree, release, domu, extra, package)
    print(f"[xen-images] Dom0 initramfs {dom0.stat().st_size >> 20} MiB", flush=True)
    shutil.copy2(tree / "boot" / f"vmlinuz-{release}", out / "Image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
