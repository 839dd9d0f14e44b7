#!/bin/busybox sh
# DomU /init: Linux's own virtio_mmio + virtio_blk, then, by the vdmode= kernel argument:
#   verify     write, read back and verify patterns on every virtio disk (read-only disks
#              must refuse writes), then power off
#   hold       the same, then wait to be destroyed (Dom0 times `xl destroy`)
#   writeloop  keep writing to /dev/vda until destroyed
#   reboot     first boot: write a pattern and reboot; second boot: verify it survived
#   fs         mkfs, write files, sync, unmount, drop caches, remount, checksum
#   ioloop     verified write/read rounds for a while (the daemon is killed or restarted
#              meanwhile): reports the longest wait between two rounds, any kernel I/O
#              error, then waits to be destroyed
#   perf       busybox dd with O_DIRECT: 4 KiB and 1 MiB writes and reads of random data,
#              timed (VDPERF lines), then the data read back is compared with what was
#              written
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mode=verify
for arg in $(cat /proc/cmdline); do case $arg in vdmode=*) mode=${arg#vdmode=};; esac; done
modprobe virtio_mmio
modprobe virtio_blk
n=0
while [ ! -e /dev/vda ] && [ $n -lt 300 ]; do n=$((n + 1)); sleep 0.1; done
hold() { echo "VDTEST done"; while true; do sleep 10; done; }  # until xl destroy
[ -e /dev/vda ] || { echo "VDTEST vda FAIL no /dev/vda"; [ $mode = hold ] && hold; poweroff -f; }
echo "VDTEST cpus $(grep -c ^processor /proc/cpuinfo)"

verify_disk() {  # dev
  dev=$1; name=${dev#/dev/}
  if [ "$(cat /sys/block/$name/ro)" = "1" ]; then
    if dd if=/tmp/pattern of=$dev bs=64k count=1 conv=fsync 2>/dev/null; then
      echo "VDTEST $name FAIL read-only disk accepted a write"
    else
      echo "VDTEST $name PASS read-only refused the write"
    fi
    return
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
}

dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null
case $mode in
  verify)
    for dev in /dev/vd?; do verify_disk $dev; done ;;
  hold)
    for dev in /dev/vd?; do verify_disk $dev; done
    hold ;;
  fs)
    ok=1
    mke2fs -q /dev/vda >/dev/null 2>&1 || ok=0
    modprobe ext4
    mkdir -p /mnt/d
    mount -t ext4 /dev/vda /mnt/d || ok=0
    i=1
    while [ $i -le 24 ]; do
      dd if=/dev/urandom of=/mnt/d/file$i bs=16k count=$i 2>/dev/null || ok=0
      i=$((i + 1))
    done
    (cd /mnt/d && md5sum file*) > /tmp/sums
    sync
    umount /mnt/d || ok=0
    echo 3 > /proc/sys/vm/drop_caches
    mount -t ext4 /dev/vda /mnt/d || ok=0
    (cd /mnt/d && md5sum -c /tmp/sums >/dev/null 2>&1) || ok=0
    umount /mnt/d
    if [ $ok = 1 ]; then echo "VDTEST vda PASS filesystem: 24 files written, remounted, checksums match"
    else echo "VDTEST vda FAIL filesystem"; fi ;;
  ioloop)
    ok=1; round=0; longest=0
    last=$(cut -d' ' -f1 /proc/uptime)
    echo "VDTEST io started"
    while [ $round -lt 80 ]; do
      offset=$(( (round * 7) % 300 ))
      dd if=/tmp/pattern of=/dev/vda bs=64k seek=$offset conv=fsync 2>/dev/null || ok=0
      echo 3 > /proc/sys/vm/drop_caches
      dd if=/dev/vda of=/tmp/back bs=64k skip=$offset count=16 2>/dev/null || ok=0
      cmp -s /tmp/pattern /tmp/back || { ok=0; echo "VDTEST vda mismatch in round $round"; }
      now=$(cut -d' ' -f1 /proc/uptime)
      longest=$(awk -v a=$last -v b=$now -v m=$longest 'BEGIN{d=b-a; print (d>m)?d:m}')
      last=$now; round=$((round + 1))
      [ $((round % 10)) = 0 ] && echo "VDTEST io round $round"
    done
    errors=$(dmesg | grep -ciE "I/O error|blk_update_request|virtio.*(broken|reset)")
    echo "VDTEST longest round gap ${longest}s"
    if [ $ok = 1 ] && [ "$errors" = 0 ]; then echo "VDTEST vda PASS $round rounds verified, no I/O error"
    else echo "VDTEST vda FAIL ok=$ok kernel-errors=$errors"; dmesg | tail -n 20; fi
    echo "VDTEST done"
    while true; do sleep 10; done ;;
  perf)
    # the conditions of the figures quoted for the C peer: busybox dd, O_DIRECT, smp 1
    dd if=/dev/urandom of=/tmp/data bs=1M count=8 2>/dev/null
    ok=1
    timed_dd() {  # label count bs dd-arguments...
      label=$1; count=$2; bs=$3; shift 3
      s=$(cut -d' ' -f1 /proc/uptime)
      dd bs=$bs count=$count "$@" 2>/dev/null || { ok=0; echo "VDTEST perf $label: dd failed"; }
      echo "VDPERF $label count=$count bs=$bs seconds=$(awk -v s=$s '{printf "%.2f", $1-s}' /proc/uptime)"
    }
    timed_dd 4k-write 1000 4096 if=/tmp/data of=/dev/vda oflag=direct
    timed_dd 4k-read 1000 4096 if=/dev/vda of=/tmp/back4k iflag=direct
    head -c 4096000 /tmp/data | cmp -s - /tmp/back4k || { ok=0; echo "VDTEST perf 4k data differs"; }
    timed_dd 1m-write 8 1048576 if=/tmp/data of=/dev/vda seek=8 oflag=direct
    timed_dd 1m-read 8 1048576 if=/dev/vda of=/tmp/back1m skip=8 iflag=direct
    cmp -s /tmp/data /tmp/back1m || { ok=0; echo "VDTEST perf 1m data differs"; }
    if [ $ok = 1 ]; then echo "VDTEST vda PASS perf: every byte read back as written"
    else echo "VDTEST vda FAIL perf"; fi ;;
  writeloop)
    echo "VDTEST writing"
    while true; do dd if=/tmp/pattern of=/dev/vda bs=64k seek=$((RANDOM % 200)) conv=fsync 2>/dev/null; done ;;
  reboot)
    marker=$(dd if=/dev/vda bs=512 skip=4000 count=1 2>/dev/null | head -c 8)
    if [ "$marker" = "VDREBOOT" ]; then
      dd if=/dev/vda of=/tmp/back bs=64k count=16 2>/dev/null
      dd if=/dev/vda bs=512 skip=4001 count=2048 of=/tmp/saved 2>/dev/null
      if cmp -s /tmp/back /tmp/saved; then echo "VDTEST vda PASS data survived the reboot"
      else echo "VDTEST vda FAIL data lost across the reboot"; fi
    else
      dd if=/tmp/pattern of=/dev/vda bs=64k conv=fsync 2>/dev/null
      dd if=/tmp/pattern of=/dev/vda bs=512 seek=4001 conv=fsync 2>/dev/null
      printf 'VDREBOOT' | dd of=/dev/vda bs=512 seek=4000 conv=fsync 2>/dev/null
      echo "VDTEST rebooting"
      reboot -f
    fi ;;
esac
echo "VDTEST done"
poweroff -f
