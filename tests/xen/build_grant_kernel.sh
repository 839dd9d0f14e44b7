#!/usr/bin/env bash
# Real-Xen tier: a small arm64 DomU kernel with CONFIG_XEN_VIRTIO (grant DMA for virtio).
# No Debian arm64 kernel enables it (shared/reference/xen-grants-driver-domain.md §2), so
# it is built from Debian's linux-source package: tinyconfig plus what a virtio-mmio
# guest with an initramfs needs.  Cached by the source package's version: a second run
# builds nothing.  Cold: about 8 minutes on 2 cores.
set -euo pipefail
CACHE=${VD_XEN_CACHE:-/var/cache/virtio-diskd-xen}
SERIES=${VD_GRANT_KERNEL_SERIES:-6.12}
say() { printf '[grant-kernel %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

version=$(apt-cache policy "linux-source-$SERIES" | sed -n 's/^ *Candidate: //p')
[ -n "$version" ] && [ "$version" != "(none)" ] \
  || { echo "linux-source-$SERIES is not in the package index" >&2; exit 1; }
OUT="$CACHE/grant-kernel-$version"
if [ -e "$OUT/Image" ]; then
  say "cached: $OUT/Image"; exit 0
fi
work=$(mktemp -d "$CACHE/grant-kernel-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
say "downloading linux-source-$SERIES $version"
apt-get download -q "linux-source-$SERIES=$version" >/dev/null 2>&1 \
  || apt-get download -q "linux-source-$SERIES=$version"
dpkg-deb --fsys-tarfile linux-source-"$SERIES"_*_all.deb \
  | tar -x --wildcards '*/linux-source-*.tar.xz'
say "unpacking"
tar -xf usr/src/linux-source-"$SERIES".tar.xz
cd linux-source-"$SERIES"
make_() { make -s ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- "$@"; }
make_ tinyconfig
# shellcheck disable=SC2046
scripts/config $(printf -- '-e %s ' PRINTK TTY BLK_DEV_INITRD RD_GZIP DEVTMPFS \
  DEVTMPFS_MOUNT PROC_FS SYSFS TMPFS BINFMT_ELF BINFMT_SCRIPT BLOCK BLK_DEV VIRTIO_MENU \
  VIRTIO VIRTIO_MMIO VIRTIO_BLK XEN XEN_VIRTIO HVC_XEN IOMMU_SUPPORT OF_IOMMU FUTEX EPOLL \
  SHMEM POSIX_TIMERS MULTIUSER SIGNALFD TIMERFD EVENTFD AIO FILE_LOCKING PROC_SYSCTL SMP \
  ARM_PSCI_FW XEN_DEV_EVTCHN XEN_GNTDEV XENFS EXT2_FS)
make_ olddefconfig
for option in XEN_VIRTIO XEN_GRANT_DMA_OPS VIRTIO_MMIO VIRTIO_BLK HVC_XEN; do
  grep -q "^CONFIG_$option=y" .config || { echo "CONFIG_$option did not stay set" >&2; exit 1; }
done
say "building Image (make -j$(nproc); about 8 minutes on 2 cores)"
started=$(date +%s)
make_ -j"$(nproc)" Image
mkdir -p "$OUT"
cp arch/arm64/boot/Image .config "$OUT/"
say "built $OUT/Image in $(( $(date +%s) - started )) s"
