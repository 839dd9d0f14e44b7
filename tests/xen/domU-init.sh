#!/bin/busybox sh
# DomU /init: Linux's own virtio_mmio + virtio_blk, then write, read back and verify
# patterns on every virtio disk; read-only disks must refuse writes.
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
modprobe virtio_mmio
modprobe virtio_blk
n=0
while [ ! -e /dev/vda ] && [ $n -lt 300 ]; do n=$((n + 1)); sleep 0.1; done
dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null
for dev in /dev/vd?; do
  [ -e "$dev" ] || continue
  name=${dev#/dev/}
  if [ "$(cat /sys/block/$name/ro)" = "1" ]; then
    if dd if=/tmp/pattern of=$dev bs=64k count=1 conv=fsync 2>/dev/null; then
      echo "VDTEST $name FAIL (read-only disk accepted a write)"
    else
      echo "VDTEST $name PASS read-only refused the write"
    fi
    continue
  fi
  ok=1
  for offset in 0 37 1000; do
    dd if=/tmp/pattern of=$dev bs=64k seek=$offset conv=fsync 2>/dev/null || ok=0
  done
  echo 3 > /proc/sys/vm/drop_caches
  for offset in 0 37 1000; do
    dd if=$dev of=/tmp/back bs=64k skip=$offset count=16 2>/dev/null || ok=0
    cmp -s /tmp/pattern /tmp/back || ok=0
  done
  if [ $ok = 1 ]; then echo "VDTEST $name PASS wrote, read back, verified"; else echo "VDTEST $name FAIL"; fi
done
[ -e /dev/vda ] || echo "VDTEST vda FAIL no /dev/vda"
echo "VDTEST done"
poweroff -f
