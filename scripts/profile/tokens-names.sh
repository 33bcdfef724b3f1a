#!/usr/bin/env bash
# Where the time of mirrorfs-bench's `tokens` `names` row goes (500 × create, chmod, rename,
# unlink of empty files per round): runs the workload against (single) a mount with a network
# mirror to a `mirrorfs serve` daemon on loopback and (pair) site A of two writable sites with
# write tokens (A `1:2`, the home of every token; B `2:1`), and reports per change, for the
# writing mount and for its other end (the daemon, or site B): CPU time (utime + stime of every
# thread, /proc/PID/stat), context switches, with ENTRIES=1 the pair's token table size during
# the rounds (`status`, `write_tokens.entries`, every 0.2 s), and with STRACE=1 the writing
# mount's syscalls (`strace -c -f`, a separate run: read the counts, not the time). Wall time is reported too but
# on a shared machine the CPU and the counts are the figures to compare.
#
#   scripts/profile/tokens-names.sh [MIRRORFS_BIN] [ROUNDS]
#
# Needs root, /dev/fuse, python3 (strace for STRACE=1).
set -euo pipefail
bin=${1:-$(dirname "$0")/../../target/release/mirrorfs}
rounds=${2:-3}
work=$(mktemp -d /var/tmp/mirrorfs-tokprof.XXXXXX)
pids=()
cleanup() {
  for m in "$work"/*-mnt; do umount "$m" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" init --config "$work/cfg-a" --name prof-a >"$work/init-a" 2>&1
"$bin" init --config "$work/cfg-b" --name prof-b >"$work/init-b" 2>&1
fp() { sed -n 's/^fingerprint: //p' "$1"; }
"$bin" trust --config "$work/cfg-a" "$(fp "$work/init-b")" prof-b >/dev/null
"$bin" trust --config "$work/cfg-b" "$(fp "$work/init-a")" prof-a >/dev/null

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mounted() { for _ in $(seq 200); do mountpoint -q "$1" && return; sleep 0.1; done; echo "no mount at $1" >&2; exit 1; }
listening() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "nothing on $1" >&2; exit 1; }
connected() { # MNT: the write-token link is up
  for _ in $(seq 300); do
    "$bin" status "$1" --json 2>/dev/null | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["write_tokens"]["connected"] else 1)' && return
    sleep 0.1
  done
  echo "$1 never connected" >&2; exit 1
}
# CPU ticks (utime + stime of the whole process) and context switches of every thread.
cpu() { awk '{print $14 + $15}' /proc/"$1"/stat; }
ctxt() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s}'; }

workload() { # DIR ROUNDS -> seconds
  python3 - "$1" "$2" <<'PY'
import os, sys, time
d, rounds = sys.argv[1], int(sys.argv[2])
os.makedirs(d, exist_ok=True)
t0 = time.monotonic()
for r in range(rounds):
    for i in range(500):
        p, q = os.path.join(d, f"n{r}-{i}"), os.path.join(d, f"m{r}-{i}")
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        os.chmod(p, 0o600)
        os.rename(p, q)
        os.unlink(q)
print(time.monotonic() - t0)
PY
}

start_single() { # NAME
  local p; p=$(port)
  mkdir -p "$work/$1-mirror" "$work/$1-backing" "$work/$1-mnt"
  "$bin" serve "$work/$1-mirror" --listen "127.0.0.1:$p" --config "$work/cfg-b" >"$work/$1-serve.log" 2>&1 &
  other=$!; pids+=("$other")
  listening "$p"
  "$bin" mount "$work/$1-backing" "$work/$1-mnt" --mirror "mirror://127.0.0.1:$p" --config "$work/cfg-a" >"$work/$1.log" 2>&1 &
  me=$!; pids+=("$me")
  mounted "$work/$1-mnt"
  mnt="$work/$1-mnt"
}
start_pair() { # NAME
  local pa pb; pa=$(port); pb=$(port)
  mkdir -p "$work/$1a-backing" "$work/$1a-mnt" "$work/$1b-backing" "$work/$1b-mnt"
  "$bin" mount "$work/$1a-backing" "$work/$1a-mnt" --peer "mirror://127.0.0.1:$pb" --receive "127.0.0.1:$pa" \
    --write-tokens 1:2 --config "$work/cfg-a" >"$work/$1a.log" 2>&1 &
  me=$!; pids+=("$me")
  "$bin" mount "$work/$1b-backing" "$work/$1b-mnt" --peer "mirror://127.0.0.1:$pa" --receive "127.0.0.1:$pb" \
    --write-tokens 2:1 --config "$work/cfg-b" >"$work/$1b.log" 2>&1 &
  other=$!; pids+=("$other")
  mounted "$work/$1a-mnt"; mounted "$work/$1b-mnt"
  connected "$work/$1a-mnt"; connected "$work/$1b-mnt"
  mnt="$work/$1a-mnt"
}
stop() {
  umount "$mnt" 2>/dev/null || true
  [ -d "${mnt%a-mnt}b-mnt" ] && umount "${mnt%a-mnt}b-mnt" 2>/dev/null || true
  kill "$me" "$other" 2>/dev/null || true
  # A `serve` daemon has been seen to log "stopping" and never exit: 10 s, then SIGKILL.
  for _ in $(seq 100); do kill -0 "$me" 2>/dev/null || kill -0 "$other" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$me" "$other" 2>/dev/null || true
  wait "$me" "$other" 2>/dev/null || true
}

measure() { # KIND NAME
  "start_$1" "$2"
  workload "$mnt/warm" 1 >/dev/null; sleep 1
  local c0 o0 x0 y0 s c1 o1 x1 y1 n hz
  c0=$(cpu "$me"); o0=$(cpu "$other"); x0=$(ctxt "$me"); y0=$(ctxt "$other")
  local poller=""
  if [ "${ENTRIES:-0}" = 1 ] && [ "$1" = pair ]; then
    # The writing site's token table during the rounds: `write_tokens.entries`, every 0.2 s.
    (while :; do "$bin" status "$mnt" --json 2>/dev/null |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["write_tokens"]["entries"])' 2>/dev/null
      sleep 0.2; done >"$work/entries-$2") &
    poller=$!
  fi
  s=$(workload "$mnt/speed" "$rounds")
  if [ -n "$poller" ]; then
    kill "$poller" 2>/dev/null || true; wait "$poller" 2>/dev/null || true
    sort -n "$work/entries-$2" | awk '{ v[NR] = $1 } END { if (NR) printf "  writer token table (%d polls): max %d entries, median %d\n", NR, v[NR], v[int((NR + 1) / 2)] }'
  fi
  sleep 2 # the other end's apply of the last records
  c1=$(cpu "$me"); o1=$(cpu "$other"); x1=$(ctxt "$me"); y1=$(ctxt "$other")
  n=$((rounds * 2000)); hz=$(getconf CLK_TCK)
  python3 -c "
n, hz = $n, $hz
print(f'$1 ($2): {n / $s:8.0f} changes/s wall; writer mount {($c1 - $c0) / hz / n * 1e6:6.1f} us CPU, {($x1 - $x0) / n:5.2f} ctx sw per change; other end {($o1 - $o0) / hz / n * 1e6:6.1f} us CPU, {($y1 - $y0) / n:5.2f} ctx sw per change')"
  if [ "${PERF:-0}" = 1 ]; then
    # The writing mount's hottest functions (all threads), one more round.
    perf record -q -F 999 -g -p "$me" -o "$work/perf-$2.data" 2>/dev/null &
    local pf=$!
    sleep 1
    workload "$mnt/perf" 1 >/dev/null
    kill -INT "$pf"; wait "$pf" 2>/dev/null || true
    echo "  writer mount, hottest (perf, self time, $2):"
    perf report -q -i "$work/perf-$2.data" --no-children -g none --sort dso,symbol 2>/dev/null | grep -v '^$' | grep '%' | head -25 | sed 's/^/    /'
    perf report -q -i "$work/perf-$2.data" --no-children -g none --sort comm 2>/dev/null | grep '%' | head -12 | sed 's/^/    /'
  fi
  if [ "${STRACE:-0}" = 1 ]; then
    strace -c -f -p "$me" -o "$work/strace-$2" &
    local st=$!
    sleep 1
    workload "$mnt/strace" 1 >/dev/null
    kill -INT "$st"; wait "$st" 2>/dev/null || true
    if [ "${TRACE_FILES:-0}" = 1 ]; then
      # Which files the fsyncs and opens are of (one round of 100 names, file calls only).
      strace -f -p "$me" -y -e trace=openat,fsync,fdatasync,renameat,renameat2,fchmod -o "$work/files-$2" &
      st=$!; sleep 1
      python3 -c "
import os
d = '$mnt/files'; os.makedirs(d, exist_ok=True)
for i in range(100):
    p, q = f'{d}/n{i}', f'{d}/m{i}'
    os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)); os.chmod(p, 0o600); os.rename(p, q); os.unlink(q)"
      kill -INT "$st"; wait "$st" 2>/dev/null || true
      cp "$work/files-$2" "/tmp/tokprof-files-$2" 2>/dev/null || true
      echo "  writer mount file calls per change by call and file (100 names, $2):"
      sed -E 's/^[0-9]+ +//; s/[0-9a-f]{8,}/H/g; s/\(([a-z0-9_]+)\(([0-9]+<)?([^,>)]*).*/\1 \3/; s/[0-9]+/N/g' "$work/files-$2" | sort | uniq -c | sort -nr | head -20 |
        awk '{ c = $1; $1 = ""; printf "    %6.2f %s\n", c / 400, $0 }'
    fi
    echo "  writer mount syscalls per change (strace -c -f, $2):"
    awk -v n=2000 'NR > 2 && $NF != "total" && $4 ~ /^[0-9]+$/ { printf "    %-20s %6.2f\n", $NF, $4 / n }' "$work/strace-$2" | sort -k2 -nr | head -15
  fi
  stop
}

uptime
for i in $(seq 1 "${ALTERNATIONS:-2}"); do
  [ "${ONLY:-single}" = pair ] || measure single "s$i"
  [ "${ONLY:-pair}" = single ] || measure pair "p$i"
done
uptime
