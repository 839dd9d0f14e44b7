#!/bin/busybox sh
# Dom0 /init for the real-Xen tier: bring up the toolstack, start virtio-diskd as the
# service would (before any `xl create`), run the scenarios, report on the console.
/bin/busybox --install -s
export PATH=/usr/local/bin:/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
for m in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd loop; do modprobe $m 2>/dev/null; done
mount -t xenfs xenfs /proc/xen
mkdir -p /run/xenstored /var/lib/xenstored /var/log/xen/console /run/xen /run/virtio-diskd
t0=$(cut -d' ' -f1 /proc/uptime)
say() { echo "VD: $(cut -d' ' -f1 /proc/uptime) $*"; }
xenstored --pid-file /run/xenstored.pid
xen-init-dom0 >/dev/null
xenconsoled --log=guest
say "toolstack ready"

virtio-diskd --foreground --log-format console --rundir /run/virtio-diskd \
  > /var/log/virtio-diskd.log 2>&1 &
DAEMON=$!
n=0
while ! grep -q daemon.ready /var/log/virtio-diskd.log 2>/dev/null; do
  n=$((n + 1)); [ $n -gt 600 ] && break; sleep 0.1
done
say "daemon ready (pid $DAEMON)"

result() { echo "VDRESULT $1 $2 ${3:-}"; }

run_guest() {  # name, timeout, disk lines...
  name=$1; limit=$2; shift 2
  disks=""
  for d in "$@"; do disks="$disks${disks:+,}\"$d\""; done
  start=$(cut -d' ' -f1 /proc/uptime)
  if ! xl create /root/domU.cfg "name=\"$name\"" "disk=[$disks]" >/tmp/xl-$name.log 2>&1; then
    cat /tmp/xl-$name.log
    return 1
  fi
  created=$(cut -d' ' -f1 /proc/uptime)
  say "$name created in $(echo "$created $start" | awk '{printf "%.1f", $1-$2}') s"
  n=0
  while xl list "$name" >/dev/null 2>&1; do
    n=$((n + 1)); [ $n -gt $((limit * 10)) ] && { xl destroy "$name"; break; }; sleep 0.1
  done
  grep VDTEST "/var/log/xen/console/guest-$name.log"
}

scenario_one_disk() {
  dd if=/dev/zero of=/root/disk1.img bs=1M count=0 seek=64 2>/dev/null
  out=$(run_guest g1 180 "format=raw,vdev=xvda,access=rw,specification=virtio,target=/root/disk1.img")
  echo "$out"
  if echo "$out" | grep -q "VDTEST vda PASS"; then result one-disk PASS; else result one-disk FAIL; fi
}

scenario_one_disk
say "daemon log:"
tail -n 40 /var/log/virtio-diskd.log
dmesg | grep -iE "virtio|xen.*(error|warn)" | tail -n 20
say "done"
poweroff -f
