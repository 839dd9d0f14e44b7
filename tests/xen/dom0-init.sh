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
for m in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd loop nbd; do modprobe $m 2>/dev/null; done
mount -t xenfs xenfs /proc/xen
mkdir -p /run/xenstored /var/lib/xenstored /var/log/xen/console /run/xen /run/virtio-diskd /var/lock
uptime_s() { cut -d' ' -f1 /proc/uptime; }
t0=$(uptime_s)
# straight to the console: scenarios run with their output captured, progress must show
say() { echo "VD: $(uptime_s) $*" > /dev/console; }
since() { awk -v s=$1 '{printf "%.1f", $1-s}' /proc/uptime; }
# count_in FILE PATTERN: matching lines, 0 for a file not created yet (grep -c says nothing)
count_in() { cat "$1" 2>/dev/null | grep -c "$2"; }
xenstored --pid-file /run/xenstored.pid
xen-init-dom0 >/dev/null
xenconsoled --log=guest
say "toolstack ready"

# installed from the .deb: started with the exact command line of its unit's ExecStart
# (journal log format: with no journald here its records go to stderr, priority-prefixed)
EXEC_START=$(sed -n 's/^ExecStart=//p' /usr/lib/systemd/system/virtio-diskd.service)
# ...under the unit's SystemCallFilter= as systemd would apply it (resolved on the host by
# build_images.py; unit_filter.py loads it and execs the command: the pid stays the same)
under_filter() {  # unit: the prefix that runs a command under that unit's filter
  [ -f /root/$1.filter.json ] && echo "env PYTHONPATH=/usr/lib/virtio-diskd python3 -s" \
    "/root/unit_filter.py exec /root/$1.filter.json --"
}
EXEC_START="$(under_filter virtio-diskd.service) $EXEC_START"
start_daemon() {
  ready=$(count_in /var/log/virtio-diskd.log daemon.ready)
  started=$(uptime_s)
  rm -f /run/virtio-diskd.exec_at
  # shellcheck disable=SC2086
  VD_EXEC_STAMP=/run/virtio-diskd.exec_at $EXEC_START >> /var/log/virtio-diskd.log 2>&1 &
  DAEMON=$!
  echo $DAEMON > /run/virtio-diskd.main   # the unit's main process (MAINPID)
  n=0
  # (the log is created by the background job: not there yet counts as nothing logged)
  while [ "$(count_in /var/log/virtio-diskd.log daemon.ready)" = "$ready" ]; do
    n=$((n + 1)); [ $n -gt 600 ] && break; sleep 0.1
  done
  # the filter's Python wrapper stands in for systemd, which applies it natively: its
  # seconds are said apart from the daemon's own (to the 0.1 s this loop looks at)
  exec_at=$(cat /run/virtio-diskd.exec_at 2>/dev/null || echo "$started")
  say "daemon ready (pid $DAEMON): $(since "$exec_at") s after the daemon's exec;" \
    "$(since "$started") s with the filter wrapper before it"
}
# VD_PROFILE=1 tests/xen/run: every worker writes its cProfile (io_figures prints the
# perf guest's), a diagnostic of where a worker's time goes under TCG
for arg in $(cat /proc/cmdline); do
  # 1777: workers that changed user (--worker-user) write theirs too
  case $arg in vdprofile=1) export VIRTIO_DISKD_PROFILE=/tmp/vd-prof
    mkdir -p /tmp/vd-prof && chmod 1777 /tmp/vd-prof;; esac
done
# the operator's storage rule for the qcow2 scenario (a format is never guessed)
echo "image_format = /root/*.qcow2 qcow2" >> /etc/virtio-diskd.conf
say "starting the installed unit's ExecStart: $EXEC_START"
start_daemon
# Dom0's service for driver domains, as its unit's ExecStart says; started before the
# first driver-domain scenario's guest
TARGETS_START=$(sed -n 's/^ExecStart=//p' /usr/lib/systemd/system/virtio-diskd-targets.service)
TARGETS_START="$(under_filter virtio-diskd-targets.service) $TARGETS_START"
start_grant_targets() {  # once per boot: scenarios run in subshells, hence the pid file
  [ -s /run/vd-targets.pid ] && kill -0 "$(cat /run/vd-targets.pid)" 2>/dev/null && return 0
  ready=$(count_in /var/log/virtio-diskd-targets.log targets.ready)
  # shellcheck disable=SC2086
  $TARGETS_START >> /var/log/virtio-diskd-targets.log 2>&1 &
  echo $! > /run/vd-targets.pid
  wait_for 120 /var/log/virtio-diskd-targets.log targets.ready "${ready:-0}" \
    || say "grant-targets not ready"
}

result() { echo "VDRESULT $1 $2 ${3:-}"; }

run_guest() {  # name, timeout, vcpus, mode, disk lines...
  name=$1; limit=$2; vcpus=$3; mode=$4; shift 4
  disks=""
  for d in "$@"; do disks="$disks${disks:+,}\"$d\""; done
  start=$(uptime_s)
  if ! xl create /root/domU.cfg "name=\"$name\"" "vcpus=$vcpus" "disk=[$disks]" \
      "extra=\"console=hvc0 rdinit=/init vdmode=$mode\"" >/tmp/xl-$name.log 2>&1; then
    cat /tmp/xl-$name.log
    return 1
  fi
  grep -i "error\|unable" /tmp/xl-$name.log
  say "$name created in $(since "$start") s"
  case $mode in writeloop|ioloop) return 0;; esac
  n=0
  while xl list "$name" >/dev/null 2>&1; do
    n=$((n + 1)); [ $n -gt $((limit * 10)) ] && { say "$name timed out"; xl destroy "$name"; break; }
    sleep 0.1
  done
  grep -E "VDTEST|VDPERF" "/var/log/xen/console/guest-$name.log"
}

image() { dd if=/dev/zero of=/root/$1.img bs=1M count=0 seek=${2:-64} 2>/dev/null; }
disk() { echo "format=raw,vdev=$2,access=${3:-rw},specification=virtio,target=/root/$1.img"; }
timed() {  # name, command...: runs a scenario and prints its time and result
  name=$1; shift
  start=$(uptime_s)
  out=$("$@" 2>&1); status=$?
  echo "$out"
  took=$(since "$start")
  if [ $status = 0 ]; then result "$name" PASS "${took}s"; else result "$name" FAIL "${took}s"; fi
}

worker_pid() {  # domid: the pid of the worker serving it (its comm is vd-dom<domid>)
  for comm in /proc/[0-9]*/comm; do
    [ "$(cat "$comm" 2>/dev/null)" = "vd-dom$1" ] && { p=${comm#/proc/}; echo "${p%/comm}"; return; }
  done
}

one_disk() {
  image d1
  run_guest g1 180 1 verify "$(disk d1 xvda)" | tee /tmp/out
  grep -q "VDTEST vda PASS" /tmp/out
}

three_disks() {
  image d2a; image d2b; image d2c
  run_guest g2 180 1 verify "$(disk d2a xvda)" "$(disk d2b xvdb ro)" "$(disk d2c xvdc)" | tee /tmp/out
  grep -q "VDTEST vda PASS" /tmp/out && grep -q "VDTEST vdb PASS read-only" /tmp/out \
    && grep -q "VDTEST vdc PASS" /tmp/out
}

two_guests() {
  image d3; image d4
  run_guest g3 240 1 verify "$(disk d3 xvda)" > /tmp/out3 &
  run_guest g4 240 1 verify "$(disk d4 xvda)" > /tmp/out4 &
  wait
  cat /tmp/out3 /tmp/out4
  grep -q "VDTEST vda PASS" /tmp/out3 && grep -q "VDTEST vda PASS" /tmp/out4
}

destroy_while_writing() {
  image d5; image d6
  run_guest g5 60 1 writeloop "$(disk d5 xvda)" || return 1
  n=0
  while ! grep -q "VDTEST writing" /var/log/xen/console/guest-g5.log 2>/dev/null; do
    n=$((n + 1)); [ $n -gt 600 ] && return 1; sleep 0.1
  done
  # g5 runs: its worker serves it as the virtio-diskd user (the unit's --worker-user)
  wpid=$(worker_pid "$(xl domid g5)")
  uids=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$wpid/status")
  say "g5's worker (pid $wpid) while g5 writes: Uid $uids (real, effective, saved, fs)"
  [ "$uids" = "999 999 999 999" ] || return 1
  # the other guest: created now, doing its I/O while g5 is destroyed
  run_guest g6 180 1 verify "$(disk d6 xvda)" > /tmp/out6 &
  other=$!
  n=0
  while ! xl list g6 >/dev/null 2>&1; do n=$((n + 1)); [ $n -gt 300 ] && break; sleep 0.1; done
  be=/local/domain/0/backend/virtio_disk/$(xl domid g5)
  start=$(uptime_s)
  xl destroy g5 > /tmp/destroy.log 2>&1 || { cat /tmp/destroy.log; return 1; }
  say "xl destroy took $(since "$start") s"
  if grep -qi "unable\|timeout\|error" /tmp/destroy.log; then cat /tmp/destroy.log; return 1; fi
  xenstore-exists "$be" 2>/dev/null && { say "backend dir $be left behind"; return 1; }
  grep "domid=${be##*/} " /var/log/virtio-diskd.log | grep "name=CLOSED" | grep -q "state=6" \
    || { say "no state 6 for $be in the daemon log"; return 1; }
  wait $other
  cat /tmp/out6
  grep -q "VDTEST vda PASS" /tmp/out6
}

guest_reboot() {
  image d7
  run_guest g7 240 1 reboot "$(disk d7 xvda)" > /tmp/out
  # xl's monitor re-creates the domain (new domid, devices added again): wait for the
  # second boot's verdict in the same console log
  n=0
  while ! grep -q "data survived\|data lost\|FAIL" /var/log/xen/console/guest-g7.log; do
    n=$((n + 1)); [ $n -gt 1800 ] && break; sleep 0.1
  done
  while xl list g7 >/dev/null 2>&1 && [ $n -lt 2400 ]; do n=$((n + 1)); sleep 0.1; done
  grep VDTEST /var/log/xen/console/guest-g7.log | tee /tmp/out
  grep -q "VDTEST rebooting" /tmp/out && grep -q "VDTEST vda PASS data survived" /tmp/out
}

filesystem() {
  image d9
  run_guest g9 240 1 fs "$(disk d9 xvda)" | tee /tmp/out
  grep -q "VDTEST vda PASS filesystem" /tmp/out
}

# wait_for SECONDS FILE PATTERN [COUNT]: until FILE has more than COUNT lines matching
wait_for() {
  until_t=$(awk -v n=$1 '{print $1+n}' /proc/uptime)
  while [ "$(count_in "$2" "$3")" -le "${4:-0}" ]; do
    awk -v u=$until_t '{exit !($1 > u)}' /proc/uptime && return 1
    sleep 0.2
  done
}
daemon_pids() {  # supervisor, zygote and workers (busybox here has no pgrep); not
  # grant-targets, which is another unit's process that a daemon restart leaves alone
  for p in /proc/[0-9]*; do
    case "$(tr '\0' ' ' < $p/cmdline 2>/dev/null)" in
      *python*virtio[-_]diskd*grant-targets*) ;;
      *python*virtio[-_]diskd*) echo ${p#/proc/};;
    esac
  done
}
daemon_story() {  # what the daemon said about resuming, for a failed scenario
  grep -E "error|warn|resum|adopt|left_over|crash|ioreq\.|worker\." /var/log/virtio-diskd.log \
    | tail -n 25 > /dev/console
}

restart_during_io() {  # name, how (kill: SIGKILL every daemon process; term: SIGTERM),
  # the guest's I/O rounds to stop the daemon at (each a fresh sample of where it was)
  name=$1; how=$2; shift 2
  image $name 32
  run_guest $name 300 1 ioloop "$(disk $name xvda)" || return 1
  log=/var/log/xen/console/guest-$name.log
  for at in "$@"; do
    wait_for 180 $log "VDTEST io round $at" || { say "no I/O from $name by round $at"
                                                 xl vcpu-list $name; daemon_story; return 1; }
    resumed=$(grep -c device.resumed /var/log/virtio-diskd.log)
    start=$(uptime_s)
    if [ "$how" = kill ]; then
      pids=$(daemon_pids)
      kill -9 $pids
      sleep 0.5
      say "round $at: SIGKILLed every daemon process ($(echo $pids)): $(daemon_pids | wc -w) left"
    else
      # the supervisor, as systemd signals MAINPID (an earlier scenario may have started
      # it in a subshell of its own, so $DAEMON is not ours: start_daemon wrote it down;
      # the zygote and workers are forks of it, with the same command line)
      main=$(cat /run/virtio-diskd.main)
      kill -TERM $main
      wait_gone=$(awk '{print $1+30}' /proc/uptime)
      # gone, or a zombie: this /init (PID 1, busybox sh) reaps the orphans of subshells
      # only when it next waits, so an exited daemon stays in /proc for a while
      while [ -d /proc/$main ] && [ "$(awk '{print $3}' /proc/$main/stat 2>/dev/null)" != Z ] \
          && awk -v u=$wait_gone '{exit !($1 < u)}' /proc/uptime; do
        sleep 0.2
      done
      say "round $at: daemon (pid $main) stopped by SIGTERM in $(since $start) s:" \
        "$(daemon_pids | wc -w) processes left"
    fi
    start_daemon
    if wait_for 240 /var/log/virtio-diskd.log device.resumed "$resumed"; then
      say "$how -> device resumed in $(since $start) s"
    else
      say "$how: device not resumed"; daemon_story; return 1
    fi
  done
  # a vCPU left waiting in Xen on an access shows as state --- (neither running nor
  # blocked by the guest) with its time standing still
  wait_for 600 $log "VDTEST done" || { say "$name never finished"; tail -n 15 $log > /dev/console
                                       xl vcpu-list $name; daemon_story; return 1; }
  grep VDTEST $log | tail -n 4 | tee /tmp/out
  say "left over at the successors' start: $(grep -c ioreq.answering_left_over \
    /var/log/virtio-diskd.log) accesses taken and not answered," \
    "$(grep -c ioreq.signalling_left_over_answer /var/log/virtio-diskd.log) answers not signalled"
  start=$(uptime_s)
  xl destroy $name > /tmp/destroy.log 2>&1 || { cat /tmp/destroy.log; return 1; }
  took=$(since $start)
  say "xl destroy took $took s"
  if grep -qi "unable\|timeout\|error" /tmp/destroy.log; then cat /tmp/destroy.log; return 1; fi
  awk -v t=$took 'BEGIN{exit !(t < 10)}' || return 1
  grep -q "VDTEST vda PASS" /tmp/out
}

kill_daemon_during_io() { restart_during_io g10 kill 10 30 50; }
restart_daemon_during_io() { restart_during_io g11 term 10; }

io_figures() {  # the I/O figures of the README's real-Xen table, and xl create's cost
  start=$(uptime_s)
  xl create /root/domU.cfg 'name="g12n"' 'disk=[]' \
    'extra="console=hvc0 rdinit=/init vdmode=verify"' >/tmp/xl-g12n.log 2>&1 \
    || { cat /tmp/xl-g12n.log; return 1; }
  nodisk=$(since $start)
  xl destroy g12n
  image d12 64
  [ -n "$VIRTIO_DISKD_PROFILE" ] && rm -f $VIRTIO_DISKD_PROFILE/*.prof
  start=$(uptime_s)
  run_guest g12 600 1 perf "$(disk d12 xvda)" | tee /tmp/out
  say "xl create: no disk $nodisk s (the perf guest's own line above is with one disk)"
  grep VDPERF /tmp/out | while read -r _ label count bs seconds; do
    awk -v l=$label -v c=${count#count=} -v b=${bs#bs=} -v s=${seconds#seconds=} \
      'BEGIN{printf "VD: figure %s: %.0f IOPS, %.1f MiB/s (%d x %d bytes in %.2f s)\n",
             l, c/s, c*b/s/1048576, c, b, s}'
  done
  say "the perf guest's worker: $(grep -o 'worker.finished.*' /var/log/virtio-diskd.log \
    | tail -n 1) ($(grep -o 'barrier=[a-z]*' /var/log/virtio-diskd.log | tail -n 1))"
  # inside libxl's 10 s wait for InitWait: the worker's fork to its start, and its first
  # look at the device to InitWait written
  say "the perf guest's worker was started $(grep 'event=worker.started' \
    /var/log/virtio-diskd.log | tail -n 1 | grep -o 'since_fork_s=[0-9.]*') after its fork;" \
    "its disk: $(grep 'event=device.serving' /var/log/virtio-diskd.log | tail -n 1 \
    | grep -o 'setup_s=[0-9.]*') from the worker's first look to InitWait"
  if [ -n "$VIRTIO_DISKD_PROFILE" ]; then  # written as the worker exits, after its guest
    n=0; while [ -z "$(ls $VIRTIO_DISKD_PROFILE/ 2>/dev/null)" ] && [ $n -lt 600 ]; do
      n=$((n + 1)); sleep 0.1; done
    sleep 2
    for f in $VIRTIO_DISKD_PROFILE/*.prof; do
      say "the perf guest's worker under cProfile ($f), by own time:"
      PYTHONPATH=/usr/lib/virtio-diskd python3 -c "import pstats, sys
pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(30)" "$f" 2>&1 | head -n 50
    done
  fi
  grep -q "VDTEST vda PASS perf" /tmp/out
}

qcow2_disk() {  # a qcow2 overlay on a backing file, through qemu-storage-daemon
  rm -f /root/q-base.qcow2 /root/q1.qcow2
  qemu-img create -q -f qcow2 /root/q-base.qcow2 64M || return 1
  qemu-img create -q -f qcow2 -b /root/q-base.qcow2 -F qcow2 /root/q1.qcow2 || return 1
  run_guest g12 300 1 fs "format=raw,vdev=xvda,access=rw,specification=virtio,target=/root/q1.qcow2" \
    | tee /tmp/out
  grep -q "VDTEST vda PASS filesystem" /tmp/out || return 1
  grep "storage.opened" /var/log/virtio-diskd.log | grep -q "format=qcow2" \
    || { say "no qcow2 device in the daemon log"; return 1; }
  n=0  # the guest is gone: its image's qemu-storage-daemon stops with the device
  while ls /run/virtio-diskd/storage/*.sock >/dev/null 2>&1; do
    n=$((n + 1)); [ $n -gt 300 ] && { say "qemu-storage-daemon still running"; return 1; }
    sleep 0.1
  done
  qemu-img check -f qcow2 /root/q1.qcow2 || return 1
  qemu-img check -f qcow2 /root/q-base.qcow2 || return 1
  say "qcow2 overlay: $(qemu-img info /root/q1.qcow2 | grep 'disk size')"
  # the backing file is untouched: the guest's writes are all in the overlay
  [ "$(qemu-img map --output=json /root/q-base.qcow2 | grep -c '"data": true')" = 0 ]
}

nbd_block_device() {  # /dev/nbdX as a plain block target, as rbd-nbd and nbd-client give it
  rm -f /root/n1.qcow2
  qemu-img create -q -f qcow2 /root/n1.qcow2 64M || return 1
  qemu-nbd --format=qcow2 --cache=writeback -c /dev/nbd0 /root/n1.qcow2 || return 1
  run_guest g13 240 1 verify "format=raw,vdev=xvda,access=rw,specification=virtio,target=/dev/nbd0" \
    | tee /tmp/out
  ok=1
  grep -q "VDTEST vda PASS" /tmp/out || ok=0
  grep "storage.opened" /var/log/virtio-diskd.log | grep "target=/dev/nbd0" \
    | grep -v "block_device=false" | grep -q "block_device" \
    || { say "/dev/nbd0 was not served as a block device"; ok=0; }
  qemu-nbd -d /dev/nbd0 >/dev/null
  qemu-img check -f qcow2 /root/n1.qcow2 || ok=0
  [ $ok = 1 ]
}

confinement() {  # every worker of this boot confined itself to its guest, and proved it
  log=/var/log/virtio-diskd.log
  workers=$(grep -c "event=worker.started" $log)
  confined=$(grep "event=worker.confined" $log | grep -c "probe=EPERM")
  # none left, or (--worker-user) only CAP_CHOWN, CAP_SETGID and CAP_SETUID (mask c1)
  # until the guest runs and the worker becomes its user, which clears them
  capless=$(grep "event=worker.started" $log \
    | grep -cE 'capabilities=(none|"CapInh=0 CapPrm=c1 CapEff=c1 CapBnd=c1 CapAmb=0")')
  filtered=$(grep "event=worker.started" $log | grep -c 'syscall_filter="seccomp (')
  unprivileged=$(grep "event=worker.user_changed" $log | grep "CapPrm=0 CapEff=0" \
    | grep -c "uid=999")
  say "workers started: $workers; confined with the probe refused (EPERM): $confined;" \
    "with no capability left (or only those that change user): $capless;" \
    "under the seccomp filter: $filtered; became the virtio-diskd user (uid 999)" \
    "once their guest ran: $unprivileged"
  grep "event=worker.user_kept" $log | sed 's/^/  kept root: /' | head -5
  # the supervisor installs no filter of its own: Seccomp 2 there is the unit's
  unit_filter=$(awk '/^Seccomp:/ {print $2}' /proc/$(cat /run/virtio-diskd.main)/status)
  say "the daemon's main process under its unit's SystemCallFilter= (Seccomp: $unit_filter)"
  grep -o 'syscall_filter="[^"]*"' $log | sort | uniq -c
  grep -E "worker.(confinement_(failed|unverified|ineffective)|capabilities_kept|syscall_filter_failed|user_change_failed)" \
    $log && return 1
  [ "$confined" -ge 1 ] && [ "$capless" = "$workers" ] && [ "$filtered" = "$workers" ] \
    && [ "$unprivileged" -ge 1 ] \
    && { [ ! -f /root/virtio-diskd.service.filter.json ] || [ "$unit_filter" = 2 ]; }
}

# -- driver domains --------------------------------------------------------------------
# dd_boot NAME: a driver domain running virtio-diskd, up and ready
dd_boot() {
  start=$(uptime_s)
  xl create /root/dd.cfg "name=\"$1\"" > /tmp/xl-$1.log 2>&1 || { cat /tmp/xl-$1.log; return 1; }
  wait_for 300 /var/log/xen/console/guest-$1.log "VDDD ready" \
    || { say "driver domain $1 not ready"; tail -n 20 /var/log/xen/console/guest-$1.log; return 1; }
  say "driver domain $1 (dom$(xl domid $1)) ready in $(since $start) s"
}
dd_story() {  # the driver domain's daemon log (with its stacks) and grant-targets', on failure
  dump=/local/domain/$(xl domid $1)/data/vdtest-dump
  xenstore-write $dump 1 2>/dev/null && xenstore-chmod $dump n$(xl domid $1) 2>/dev/null
  sleep 8  # its console lags behind
  tail -n 200 /var/log/xen/console/guest-$1.log > /dev/console
  tail -n 10 /var/log/virtio-diskd-targets.log > /dev/console
  # xenstored's accounting of the driver domain (an unprivileged domain: at most 20
  # outstanding requests and a write rate limit), for a teardown it did not see
  say "xenstored's quota use by $1: $(xenstore-control quota $(xl domid $1) 2>&1 | tr '\n' ' ')"
}
# dd_guest DD GUEST KERNEL: a guest whose disk is served by driver domain DD
dd_guest() {
  start=$(uptime_s)
  xl create /root/domU.cfg "name=\"$2\"" "kernel=\"$3\"" \
    "disk=[\"format=raw,vdev=xvda,access=rw,specification=virtio,backend=$1,target=/root/dd.img\"]" \
    'extra="console=hvc0 rdinit=/init vdmode=hold"' > /tmp/xl-$2.log 2>&1 \
    || { cat /tmp/xl-$2.log; dd_story $1; return 1; }
  say "$2 (dom$(xl domid $2)) created in $(since $start) s, its disk served by $1"
}
# dd_destroy GUEST DD: xl destroy within libxl's deadline, no error, backend dir gone
dd_destroy() {
  domid=$(xl domid $1); dd_domid=$(xl domid $2)
  start=$(uptime_s)
  xl destroy $1 > /tmp/destroy.log 2>&1 || { cat /tmp/destroy.log; return 1; }
  took=$(since $start)
  say "xl destroy $1 took $took s"
  if grep -qi "unable\|timeout\|error\|removed" /tmp/destroy.log; then cat /tmp/destroy.log; return 1; fi
  awk -v t=$took 'BEGIN{exit !(t < 10)}' || return 1
  xenstore-exists /local/domain/$dd_domid/backend/virtio_disk/$domid/51712 2>/dev/null \
    && { say "backend dir of dom$domid left behind"; return 1; }
  return 0
}

dd_cleanup() {  # whatever a failed driver-domain scenario left running: guests first
  for name in $(xl list | awk '$1 ~ /^gd[0-9]/ {print $1}') $(xl list | awk '$1 ~ /^dd[0-9]/ {print $1}'); do
    xl destroy "$name" > /dev/null 2>&1
  done
}
driver_domain_grants() { dd_grants; status=$?; dd_cleanup; return $status; }
driver_domain_stock_kernel() { dd_stock_kernel; status=$?; dd_cleanup; return $status; }

dd_grants() {  # a grant-mapped disk served by a driver domain, three times
  [ -e /root/Image-grants ] || { say "no DomU kernel with CONFIG_XEN_VIRTIO"; return 1; }
  start_grant_targets
  for i in 1 2 3; do
    # under XSM's dummy policy a driver domain serves one guest: a new one each time
    dd_boot dd$i || return 1
    dd_guest dd$i gd$i /root/Image-grants || return 1
    log=/var/log/xen/console/guest-gd$i.log
    wait_for 240 $log "VDTEST done" || { say "gd$i never finished"; tail -n 15 $log; dd_story dd$i; return 1; }
    grep VDTEST $log
    grep -q "VDTEST vda PASS" $log || { dd_story dd$i; return 1; }
    ddlog=/var/log/xen/console/guest-dd$i.log
    # (the journal format writes a true field as its bare name)
    grep VDDDLOG $ddlog | grep "device.serving" | grep -qE " grants( |=True)" \
      || { say "dd$i did not serve gd$i with grants"; dd_story dd$i; return 1; }
    # its worker became the virtio-diskd user once gd$i ran (the unit's --worker-user)
    wait_for 30 $ddlog "VDDDLOG.*worker.user_changed.*uid=999" \
      || { say "dd$i's worker did not become the virtio-diskd user"; dd_story dd$i; return 1; }
    grep -q "targets.granted" /var/log/virtio-diskd-targets.log || return 1
    say "gd$i: $(grep VDDDLOG $ddlog | grep -o 'guest.device_model_right.*' | head -n 1)"
    dd_destroy gd$i dd$i || { dd_story dd$i; return 1; }
    sleep 1
    grep VDDDLOG $ddlog | grep -E "Traceback|worker.crashed|worker.restarted" \
      && { say "dd$i's daemon crashed during teardown"; dd_story dd$i; return 1; }
    xl destroy dd$i
  done
}

dd_stock_kernel() {  # a guest kernel without CONFIG_XEN_VIRTIO on a grant disk
  start_grant_targets
  dd_boot dd4 || return 1
  dd_guest dd4 gd4 /root/Image || return 1
  domid=$(xl domid gd4); dd_domid=$(xl domid dd4)
  be=/local/domain/$dd_domid/backend/virtio_disk/$domid/51712
  n=0  # Linux gives up waiting for the grant IOMMU after ~13 s, then uses plain addresses
  while ! xenstore-read $be/error > /tmp/error 2>/dev/null; do
    n=$((n + 1)); [ $n -gt 1200 ] && { say "no error node on $be; gd4's console:"
      tail -n 30 /var/log/xen/console/guest-gd4.log; dd_story dd4; return 1; }
    sleep 0.1
  done
  say "error node: $(cat /tmp/error)"
  grep -q "CONFIG_XEN_VIRTIO" /tmp/error || return 1
  # the driver domain's log reaches its console through a tail loop, seconds behind
  wait_for 30 /var/log/xen/console/guest-dd4.log "VDDDLOG.*device.guest_without_grant_support" \
    || { say "no log line naming the cause"; dd_story dd4; return 1; }
  dd_destroy gd4 dd4 || { dd_story dd4; return 1; }
  grep VDDDLOG /var/log/xen/console/guest-dd4.log | grep -E "Traceback|worker.crashed" \
    && { dd_story dd4; return 1; }
  xl destroy dd4
}

two_vcpus() {
  image d8
  run_guest g8 180 2 verify "$(disk d8 xvda)" | tee /tmp/out
  grep -q "VDTEST cpus 2" /tmp/out && grep -q "VDTEST vda PASS" /tmp/out
}

# confinement last: it reads what every Dom0 worker of the boot logged
scenarios="one_disk three_disks two_guests destroy_while_writing guest_reboot two_vcpus filesystem io_figures kill_daemon_during_io restart_daemon_during_io qcow2_disk nbd_block_device driver_domain_grants driver_domain_stock_kernel confinement"
for arg in $(cat /proc/cmdline); do
  case $arg in vdscenarios=*) scenarios=$(echo "${arg#vdscenarios=}" | tr ':,' '  ');; esac
done
for scenario in $scenarios; do
  timed "$scenario" "$scenario"
  # Dom0's root is a RAM filesystem (half its memory): a scenario's disk images go with
  # it, or the ones after it run out of space (their guests then see write errors)
  rm -f /root/*.img /root/*.qcow2
  say "after $scenario: $(awk '/^MemAvailable/ {print int($2 / 1024)}' /proc/meminfo)" \
    "MiB of Dom0's memory available"
done
say "grant-targets log:"
tail -n 15 /var/log/virtio-diskd-targets.log
say "daemon log:"
tail -n 40 /var/log/virtio-diskd.log
say "how the daemon's processes reached xenstored:"
grep -o "xenstore\.[a-z]*connected.*" /var/log/virtio-diskd.log | sort | uniq -c
dmesg | grep -iE "virtio|xen.*(error|warn)" | tail -n 20
say "done"
poweroff -f
