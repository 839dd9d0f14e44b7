#!/usr/bin/env bash
# Real-Xen tier, step 1: host packages, arm64 .debs and an IOREQ-enabled Xen hypervisor,
# all cached by version in $CACHE so a second run downloads and builds nothing.
# Facts (package names, versions, build switches): shared/reference/xen-qemu-arm64.md.
set -euo pipefail
CACHE=${VD_XEN_CACHE:-/var/cache/virtio-diskd-xen}
XEN_SRC_VERSION=${XEN_SRC_VERSION:-4.17.5+72-g01140da4e8-1}   # bookworm main (buildable here)
mkdir -p "$CACHE/debs" "$CACHE/src"
say() { printf '[xen-setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

if [ ! -e "$CACHE/.host-ready" ]; then
  say "host packages (qemu-system-arm, aarch64 cross compiler, build tools)"
  if ! grep -rqs "deb-src" /etc/apt/sources.list.d/; then
    cat > /etc/apt/sources.list.d/virtio-diskd-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends qemu-system-arm gcc-aarch64-linux-gnu \
    binutils-aarch64-linux-gnu libc6-dev-arm64-cross make bison flex bc dpkg-dev cpio kmod \
    python3 >/dev/null
  touch "$CACHE/.host-ready"
fi

# arm64 packages for Dom0 and DomU, pinned to the hypervisor's version where they are Xen's
XEN_VER=${XEN_TOOLS_VERSION:-$XEN_SRC_VERSION}
PKGS="busybox-static linux-image-6.1.0-*-arm64-unsigned
xen-utils-4.17=$XEN_VER xen-utils-common=$XEN_VER xenstore-utils=$XEN_VER
libxenstore4=$XEN_VER
libxenhypfs1=$XEN_VER libxencall1=$XEN_VER libxenforeignmemory1=$XEN_VER
libxendevicemodel1=$XEN_VER libxenevtchn1=$XEN_VER libxengnttab1=$XEN_VER
libxentoolcore1=$XEN_VER libxentoollog1=$XEN_VER libxenmisc4.17=$XEN_VER
libc6 libgcc-s1 libncursesw6 libncurses6 libtinfo6 libyajl2 libuuid1 zlib1g liblzma5 libbz2-1.0
libzstd1 libfdt1 libext2fs2 libexpat1 libssl3 libselinux1 libpcre2-8-0 libacl1 libmd0
libffi8 libsqlite3-0 libreadline8 libnsl2 libtirpc3 libcrypt1 libgssapi-krb5-2 libkrb5-3
libk5crypto3 libcom-err2 libkrb5support0 libkeyutils1 libdb5.3 libgnutls30 libcap2
python3-minimal python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
python3.11 python3 media-types libpython3-stdlib
qemu-system-common qemu-utils libaio1 libfuse3-3 libglib2.0-0 libgmp10 libhogweed6 libidn2-0
libnettle8 libnuma1 libp11-kit0 libtasn1-6 libunistring2 liburing2
libseccomp2"
# qemu-system-common: qemu-storage-daemon, which serves the qcow2 scenario's image;
# qemu-utils: qemu-img, which makes and checks it; libseccomp2: the workers' system-call
# filter.  The stamp names the list's version.
stamp="$CACHE/debs/.done-$XEN_VER-qsd-seccomp"
if [ ! -e "$stamp" ]; then
  say "downloading arm64 .debs into $CACHE/debs"
  (cd "$CACHE/debs" && for p in $PKGS; do
     case "$p" in *\**) p=$(apt-cache pkgnames 'linux-image-6.1.0-' | grep -- '-arm64-unsigned$' | grep -v -e '-rt-' -e '-cloud-' | sort -V | tail -1);; esac
     name=${p%%=*}; ver=${p#*=}; [ "$ver" = "$p" ] && ver=""
     if ! ls "${name}_"*_arm64.deb "${name}_"*_all.deb >/dev/null 2>&1; then
       apt-get download -q "${name}:arm64${ver:+=$ver}" >/dev/null 2>&1 \
         || apt-get download -q "${name}${ver:+=$ver}" >/dev/null \
         || { echo "cannot download $p" >&2; exit 1; }
     fi
   done)
  touch "$stamp"
fi

HYP="$CACHE/xen-$XEN_SRC_VERSION-ioreq"
if [ ! -e "$HYP" ]; then
  say "building the hypervisor $XEN_SRC_VERSION with CONFIG_IOREQ_SERVER (about a minute)"
  (cd "$CACHE/src" && { ls xen_"$XEN_SRC_VERSION".dsc >/dev/null 2>&1 \
      || apt-get source -q --download-only "xen=$XEN_SRC_VERSION" >/dev/null; }
   rm -rf build && mkdir build && dpkg-source -q -x xen_"$XEN_SRC_VERSION".dsc build/xen >/dev/null
   cd build/xen && cp debian/xen-kconfig xen/.config
   printf 'CONFIG_EXPERT=y\nCONFIG_IOREQ_SERVER=y\n' >> xen/.config
   make -s -C xen olddefconfig XEN_TARGET_ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- >/dev/null
   make -s -C xen XEN_TARGET_ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- -j"$(nproc)" >/dev/null
   grep -q '^CONFIG_IOREQ_SERVER=y' xen/.config
   cp xen/xen "$HYP")
  rm -rf "$CACHE/src/build"
fi
# a DomU kernel with CONFIG_XEN_VIRTIO for the grant scenarios (cached by version)
bash "$(dirname "$0")/build_grant_kernel.sh"
say "ready: hypervisor $HYP, $(ls "$CACHE/debs" | wc -l) packages in $CACHE/debs"
