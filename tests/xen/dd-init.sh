#!/bin/busybox sh
# Driver-domain /init for the real-Xen tier: a DomU that serves other guests' virtio
# disks.  What a driver domain needs (shared/reference/xen-grants-driver-domain.md §3):
# xenfs, evtchn, gntdev, gntalloc, and privcmd with unrestricted=1; no xenstored here —
# the daemon talks to Dom0's through /dev/xen/xenbus.  virtio-diskd is the one from the
# .deb, started with its unit's ExecStart; its log is copied to this domain's console,
# which Dom0's xenconsoled keeps in /var/log/xen/console/guest-<name>.log.
/bin/busybox --install -s
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
# privcmd first: xenfs depends on it and would load it restricted (a DomU's privcmd
# then refuses every hypercall not aimed at its target domain, read once at load)
modprobe xen-privcmd unrestricted=1
for m in xenfs xen-evtchn xen-gntdev xen-gntalloc loop; do modprobe $m 2>/dev/null; done
mount -t xenfs xenfs /proc/xen
mkdir -p /run/virtio-diskd /var/lock
say() { echo "VDDD $*" > /dev/console; }
say "domid $(xenstore-read domid 2>/dev/null || echo '?') up at $(cut -d' ' -f1 /proc/uptime) s"
# the disk this driver domain serves: a file in its own memory
dd if=/dev/zero of=/root/dd.img bs=1M count=0 seek=64 2>/dev/null
EXEC_START=$(sed -n 's/^ExecStart=//p' /usr/lib/systemd/system/virtio-diskd.service)
# under the unit's SystemCallFilter=, as in Dom0 (dom0-init.sh)
[ -f /root/virtio-diskd.service.filter.json ] && EXEC_START="env PYTHONPATH=/usr/lib/virtio-diskd \
python3 -s /root/unit_filter.py exec /root/virtio-diskd.service.filter.json -- $EXEC_START"
: > /var/log/virtio-diskd.log
# shellcheck disable=SC2086
$EXEC_START >> /var/log/virtio-diskd.log 2>&1 &
tail -f /var/log/virtio-diskd.log | while read -r line; do echo "VDDDLOG $line"; done > /dev/console &
n=0
while ! grep -q daemon.ready /var/log/virtio-diskd.log; do
  n=$((n + 1)); [ $n -gt 1200 ] && { say "daemon not ready"; break; }; sleep 0.1
done
say "ready at $(cut -d' ' -f1 /proc/uptime) s"
# Dom0 asks for the daemon's Python stacks (a failed scenario): kill -USR1 dumps them
# (faulthandler) into the log, which goes to the console
while true; do
  if [ -n "$(xenstore-read data/vdtest-dump 2>/dev/null)" ]; then
    xenstore-rm data/vdtest-dump
    for p in /proc/[0-9]*; do
      case "$(tr '\0' ' ' < $p/cmdline 2>/dev/null)" in
        *python*virtio[-_]diskd*) kill -USR1 ${p#/proc/};;
      esac
    done
  fi
  sleep 2
done
