#!/usr/bin/env bash
# Where the CPU of a small-file burst goes, local mirror against network mirror (issue 8's
# loopback burst lag): writes FILES files of 1 KiB through a mount with (local) a local mirror
# and (net) a network mirror to a `mirrorfs serve` daemon on loopback, waits until the mirror
# holds them all, and prints per thread (summed by thread name, mount and daemon) the time on the
# CPU and the time runnable but waiting for one (/proc/PID/task/TID/schedstat), with the wall
# times and the load average. On a shared machine read the CPU per file and the wait, not the wall.
#
#   scripts/profile/burst-cpu.sh [MIRRORFS_BIN] [FILES]
#
# Needs root, /dev/fuse, python3.
set -euo pipefail
bin=${1:-$(dirname "$0")/../../target/release/mirrorfs}
files=${2:-1000}
work=$(mktemp -d /var/tmp/mirrorfs-burstcpu.XXXXXX)
pids=()
cleanup() {
  for m in "$work"/*-mnt; do umount "$m" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" init --config "$work/cfg-p" --name burst-p >"$work/init-p" 2>&1
"$bin" init --config "$work/cfg-m" --name burst-m >"$work/init-m" 2>&1
fp() { sed -n 's/^fingerprint: //p' "$1"; }
"$bin" trust --config "$work/cfg-p" "$(fp "$work/init-m")" burst-m >/dev/null
"$bin" trust --config "$work/cfg-m" "$(fp "$work/init-p")" burst-p >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mounted() { for _ in $(seq 200); do mountpoint -q "$1" && return; sleep 0.1; done; echo "no mount at $1" >&2; exit 1; }
# name run_ns wait_ns per thread of the given processes
sched() { for p in "$@"; do for t in /proc/"$p"/task/*; do echo "$(tr ' ' _ <"$t/comm") $(cut -d' ' -f1,2 "$t/schedstat")"; done; done; }
burst() {
  python3 - "$1" "$files" <<'PY'
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
os.makedirs(d, exist_ok=True)
data = b"x" * 1024
t0 = time.monotonic()
for i in range(n):
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(data)
print(f"{time.monotonic() - t0:.3f}")
PY
}
all_there() { for _ in $(seq 1200); do [ "$(ls "$1" 2>/dev/null | wc -l)" -ge "$files" ] && return; sleep 0.02; done; echo "mirror incomplete" >&2; }

for mode in local net; do
  mkdir -p "$work/$mode-b" "$work/$mode-mnt" "$work/$mode-m"
  dpid=
  if [ "$mode" = local ]; then
    "$bin" mount "$work/$mode-b" "$work/$mode-mnt" --mirror "$work/$mode-m" 2>"$work/$mode.log" &
    mpid=$!; pids+=("$mpid")
  else
    "$bin" serve "$work/$mode-m" --listen "127.0.0.1:$port" --config "$work/cfg-m" 2>"$work/serve.log" &
    dpid=$!; pids+=("$dpid")
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    "$bin" mount "$work/$mode-b" "$work/$mode-mnt" --mirror "mirror://127.0.0.1:$port" --config "$work/cfg-p" 2>"$work/$mode.log" &
    mpid=$!; pids+=("$mpid")
  fi
  mounted "$work/$mode-mnt"
  sleep 2
  load0=$(cut -d' ' -f1 /proc/loadavg)
  sched "$mpid" $dpid >"$work/s0"
  t0=$(date +%s.%N)
  w=$(burst "$work/$mode-mnt/d")
  all_there "$work/$mode-m/d"
  t1=$(date +%s.%N)
  sched "$mpid" $dpid >"$work/s1"
  echo "== $mode mirror: $files files written in ${w} s; all on the mirror $(python3 -c "print(f'{$t1 - $t0 - $w:.3f}')") s after the last close; load $load0 -> $(cut -d' ' -f1 /proc/loadavg)"
  python3 - "$work/s0" "$work/s1" "$files" <<'PY'
import sys, collections
def read(p):
    rows = [l.split() for l in open(p)]
    return rows
a, b, n = read(sys.argv[1]), read(sys.argv[2]), int(sys.argv[3])
# Threads keep their order between the two reads (same /proc listing, threads seldom change).
before = collections.Counter(); after = collections.Counter()
bw = collections.Counter(); aw = collections.Counter()
for name, run, wait in a: before[name] += int(run); bw[name] += int(wait)
for name, run, wait in b: after[name] += int(run); aw[name] += int(wait)
tot = 0.0
print(f"  {'thread':<18} {'CPU ms':>8} {'waiting for a CPU ms':>22} {'CPU us per file':>16}")
for name in sorted(after, key=lambda k: -(after[k] - before[k])):
    run = (after[name] - before[name]) / 1e6
    wait = (aw[name] - bw[name]) / 1e6
    if run < 1:
        continue
    tot += run
    print(f"  {name:<18} {run:8.1f} {wait:22.1f} {run * 1000 / n:16.1f}")
print(f"  {'all':<18} {tot:8.1f} {'':>22} {tot * 1000 / n:16.1f}")
PY
done
