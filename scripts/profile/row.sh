#!/usr/bin/env bash
# Where the time of one mirrorfs-bench row goes: runs the row's workload (the same operations
# and sizes as mirrorfs-bench --quick; stat does 3 passes over the 1,000 files, 1.2 s apart, the pauses untimed) against a native directory and a fresh mirrorfs mount with
# one local mirror, and reports for the mount: time of the timed operations (measured inside the workload) vs native, the daemon's context
# switches (all threads, /proc/PID/task/*/status), its syscalls (`strace -c -f`, a second run:
# strace slows it down, read the counts, not the time) and, with PERF=1, its hottest functions
# (`perf record -g`, a third run).
#
#   [STRACE_TOP=N] scripts/profile/row.sh ROW [MIRRORFS_BIN]   (N: syscalls listed, 12)
#   ROW: seq-write | seq-read-warm | seq-read-cold | rand-write | small-files | stat
#
# Needs root, /dev/fuse, python3, strace (and perf from Debian's linux-perf for PERF=1).
set -euo pipefail
row=${1:?usage: $0 ROW [MIRRORFS_BIN]}
bin=${2:-$(dirname "$0")/../../target/release/mirrorfs}
work=$(mktemp -d /var/tmp/mirrorfs-profile.XXXXXX)
trap 'umount "$work/mnt" 2>/dev/null || true; [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work"/{native,backing,mirror,mnt}

# The workload: python3, so that the process doing it costs the same on both sides.
workload() { # DIR PHASE (setup|run)
  python3 - "$1" "$row" "$2" <<'PY'
import os, random, sys, time
d, row, phase = sys.argv[1], sys.argv[2], sys.argv[3]
MiB = 1 << 20
big = os.path.join(d, "big")
def seq_write(n=64):
    buf = os.urandom(MiB)
    fd = os.open(big, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(n): os.write(fd, buf)
    os.close(fd)
def seq_read():
    fd = os.open(big, os.O_RDONLY)
    while os.read(fd, MiB): pass
    os.close(fd)
def small(n=1000):
    os.makedirs(os.path.join(d, "small"), exist_ok=True)
    buf = os.urandom(4096)
    for i in range(n):
        fd = os.open(os.path.join(d, "small", f"f{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, buf); os.close(fd)
if phase == "setup":
    if row.startswith("seq-read"): seq_write()
    if row == "rand-write":
        fd = os.open(big, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644); os.ftruncate(fd, 64 * MiB); os.close(fd)
    if row == "stat": small()
    sys.exit(0)
t0 = time.monotonic()
if row == "seq-write": seq_write()
elif row.startswith("seq-read"): seq_read()
elif row == "rand-write":
    r = random.Random(42); buf = os.urandom(4096)
    fd = os.open(big, os.O_WRONLY)
    for _ in range(5000): os.pwrite(fd, buf, r.randrange(64 * MiB // 4096) * 4096)
    os.close(fd)
elif row == "small-files": small()
elif row == "stat":
    names = [os.path.join(d, "small", f"f{i}") for i in range(1000)]
    spent = 0.0
    for k in range(3):
        if k: time.sleep(1.2)  # untimed: past a kernel cache time of 1 s
        t = time.monotonic()
        for n in names: os.lstat(n)
        spent += time.monotonic() - t
    t0 = time.monotonic() - spent
else: sys.exit(f"unknown row {row}")
print(time.monotonic() - t0)
PY
}
timed() { # DIR -> seconds
  workload "$1" setup; sync
  [ "$row" = seq-read-cold ] && echo 3 > /proc/sys/vm/drop_caches
  workload "$1" run
}
ctxt() { cat /proc/"$pid"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s}'; }
mount_fs() {
  rm -rf "$work"/backing "$work"/mirror "$work"/state; mkdir -p "$work"/backing "$work"/mirror
  "$bin" mount "$work/backing" "$work/mnt" --mirror "$work/mirror" >"$work/log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do mountpoint -q "$work/mnt" && return; sleep 0.1; done
  echo "mount failed: $(tail -5 "$work/log")" >&2; exit 1
}
unmount_fs() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; }

echo "row $row, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $("$bin" --version 2>/dev/null || echo "$bin")"
tn=$(timed "$work/native")
mount_fs; c0=$(ctxt); tm=$(timed "$work/mnt"); c1=$(ctxt); unmount_fs
printf 'native %.3f s, mirrorfs %.3f s (%.2fx native), daemon context switches %d\n' \
  "$tn" "$tm" "$(echo "$tn / $tm" | bc -l)" "$((c1 - c0))"
mount_fs
workload "$work/mnt" setup; sync; sleep 1
[ "$row" = seq-read-cold ] && echo 3 > /proc/sys/vm/drop_caches
strace -c -f -q -p "$pid" -o "$work/strace" & st=$!; sleep 0.5
workload "$work/mnt" run >/dev/null
kill -INT "$st"; wait "$st" 2>/dev/null || true
unmount_fs
echo "daemon syscalls during the run (strace -c -f, top ${STRACE_TOP:-12}):"
head -n $((3 + ${STRACE_TOP:-12})) "$work/strace"
if [ "${PERF:-0}" = 1 ]; then
  mount_fs
  workload "$work/mnt" setup; sync; sleep 1
  [ "$row" = seq-read-cold ] && echo 3 > /proc/sys/vm/drop_caches
  perf record -q -g -o "$work/perf.data" -p "$pid" 2>/dev/null & pr=$!; sleep 0.5
  workload "$work/mnt" run >/dev/null
  kill -INT "$pr"; wait "$pr" 2>/dev/null || true
  unmount_fs
  echo "daemon hottest (perf report --no-children, top 15):"
  perf report -q -i "$work/perf.data" --no-children --sort sym 2>/dev/null | grep -v '^$' | grep '%' | head -15
fi
