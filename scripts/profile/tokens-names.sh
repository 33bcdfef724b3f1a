#!/usr/bin/env bash
# Where the time of mirrorfs-bench's `tokens` `names` row goes (500 × create, chmod, rename,
# unlink of empty files per round), or with MODE=4k-pwrite its `4k-pwrite` row's (8,192
# `pwrite`s of 4 KiB at random offsets in 8 files of 4 MiB per round): runs the workload against
# (single) a mount with a network mirror to a `mirrorfs serve` daemon on loopback and (pair) site
# A of two writable sites with write tokens (A `1:2`, the home of every token; B `2:1`), and
# reports per change (per write), for the writing mount and for its other end (the daemon, or
# site B): CPU time (utime + stime of every thread, /proc/PID/stat), context switches, with
# MODE=4k-pwrite the other end's CPU and switches per thread (by name), with ENTRIES=1 the pair's
# token table size during the rounds (`status`, `write_tokens.entries`, every 0.2 s), and with
# STRACE=1 the syscalls of the writing mount, or with STRACE_OF=other (the default with
# MODE=4k-pwrite) of the other end (`strace -c -f`, a separate run: read the counts, not the
# time). Wall time is reported too but on a shared machine the CPU and the counts are the
# figures to compare.
#
#   [MODE=names|4k-pwrite] scripts/profile/tokens-names.sh [MIRRORFS_BIN] [ROUNDS]
#
# Needs root, /dev/fuse, python3 (strace for STRACE=1).
set -euo pipefail
bin=${1:-$(dirname "$0")/../../target/release/mirrorfs}
rounds=${2:-3}
mode=${MODE:-names}
case "$mode" in
  names) per_round=2000; strace_of=${STRACE_OF:-writer} ;;
  4k-pwrite) per_round=8192; strace_of=${STRACE_OF:-other} ;;
  *) echo "MODE is names or 4k-pwrite" >&2; exit 2 ;;
esac
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
# Waits until PID's CPU time stops growing (the other end applied the last records; under
# strace that takes much longer than the workload): 2 s at least, 120 s at most.
quiet() {
  sleep 2
  local a b
  a=$(cpu "$1")
  for _ in $(seq 240); do
    sleep 0.5; b=$(cpu "$1")
    [ "$a" = "$b" ] && return
    a=$b
  done
}
# Per thread: "TID NAME TICKS SWITCHES", one line each.
threads() {
  for t in /proc/"$1"/task/*; do
    local st name
    st=$(cat "$t/stat" 2>/dev/null) || continue
    name=$(cat "$t/comm" 2>/dev/null | tr ' ' _)
    # comm may hold spaces or parentheses: the fields after the last ')'.
    st=${st##*) }
    echo "${t##*/} $name $(echo "$st" | awk '{print $12 + $13}') $(awk '/ctxt_switches/ {s += $2} END {print s}' "$t/status" 2>/dev/null)"
  done
}

workload() { # DIR ROUNDS -> seconds
  if [ "$mode" = 4k-pwrite ]; then pwrites "$1" "$2"; else names "$1" "$2"; fi
}
# The directory a run uses: with 4k-pwrite always the same one, so that the files are made and
# filled in the warm-up, not in a measured run.
dir_of() { if [ "$mode" = 4k-pwrite ]; then echo speed; else echo "$1"; fi; }
pwrites() { # DIR ROUNDS -> seconds (the files are made, full, before the clock starts)
  python3 - "$1" "$2" <<'PY'
import os, random, sys, time
d, rounds = sys.argv[1], int(sys.argv[2])
os.makedirs(d, exist_ok=True)
size, block = 4 << 20, 4096
fds = []
for i in range(8):
    fd = os.open(os.path.join(d, f"f{i}"), os.O_RDWR | os.O_CREAT, 0o644)
    if os.fstat(fd).st_size < size:
        for off in range(0, size, 1 << 20):
            os.pwrite(fd, b"\0" * (1 << 20), off)
    fds.append(fd)
rng, buf = random.Random(7), os.urandom(block)
t0 = time.monotonic()
for _ in range(rounds * 8192):
    os.pwrite(fds[rng.randrange(8)], buf, rng.randrange(size // block) * block)
t = time.monotonic() - t0
for fd in fds:
    os.close(fd)
print(t)
PY
}
names() { # DIR ROUNDS -> seconds
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
  workload "$mnt/$(dir_of warm)" 1 >/dev/null; sleep 1
  local c0 o0 x0 y0 s c1 o1 x1 y1 n hz
  c0=$(cpu "$me"); o0=$(cpu "$other"); x0=$(ctxt "$me"); y0=$(ctxt "$other")
  threads "$other" >"$work/threads0-$2"
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
  quiet "$other" # the other end's apply of the last records
  c1=$(cpu "$me"); o1=$(cpu "$other"); x1=$(ctxt "$me"); y1=$(ctxt "$other")
  threads "$other" >"$work/threads1-$2"
  n=$((rounds * per_round)); hz=$(getconf CLK_TCK)
  python3 -c "
n, hz = $n, $hz
print(f'$1 ($2, $mode): {n / $s:8.0f} changes/s wall; writer mount {($c1 - $c0) / hz / n * 1e6:6.1f} us CPU, {($x1 - $x0) / n:5.2f} ctx sw per change; other end {($o1 - $o0) / hz / n * 1e6:6.1f} us CPU, {($y1 - $y0) / n:5.2f} ctx sw per change')"
  if [ "$mode" = 4k-pwrite ]; then
    # The other end's threads that ran during the rounds, by name (threads of one name summed).
    echo "  other end per thread (us CPU, ctx sw per change):"
    awk -v n="$n" -v hz="$hz" 'FNR == NR { t0[$1] = $3; s0[$1] = $4; next }
      { c[$2] += $3 - t0[$1]; w[$2] += $4 - s0[$1] }
      END { for (k in c) if (c[k] > 0 || w[k] > 0) printf "    %-16s %7.2f %6.3f\n", k, c[k] / hz / n * 1e6, w[k] / n }' \
      "$work/threads0-$2" "$work/threads1-$2" | sort -k2 -nr
  fi
  if [ "${PERF:-0}" = 1 ]; then
    # The writing mount's hottest functions (all threads), one more round.
    perf record -q -F 999 -g -p "$me" -o "$work/perf-$2.data" 2>/dev/null &
    local pf=$!
    sleep 1
    workload "$mnt/$(dir_of perf)" 1 >/dev/null
    kill -INT "$pf"; wait "$pf" 2>/dev/null || true
    echo "  writer mount, hottest (perf, self time, $2):"
    perf report -q -i "$work/perf-$2.data" --no-children -g none --sort dso,symbol 2>/dev/null | grep -v '^$' | grep '%' | head -25 | sed 's/^/    /'
    perf report -q -i "$work/perf-$2.data" --no-children -g none --sort comm 2>/dev/null | grep '%' | head -12 | sed 's/^/    /'
  fi
  if [ "${STRACE:-0}" = 1 ]; then
    local traced=$me
    [ "$strace_of" = other ] && traced=$other
    strace -c -f -p "$traced" -o "$work/strace-$2" &
    local st=$!
    sleep 1
    workload "$mnt/$(dir_of strace)" 1 >/dev/null
    quiet "$traced"
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
    echo "  $strace_of syscalls per change (strace -c -f, $2):"
    awk -v n="$per_round" 'NR > 2 && $NF != "total" && $4 ~ /^[0-9]+$/ { printf "    %-20s %6.2f\n", $NF, $4 / n }' "$work/strace-$2" | sort -k2 -nr | head -15
  fi
  stop
}

uptime
for i in $(seq 1 "${ALTERNATIONS:-2}"); do
  [ "${ONLY:-single}" = pair ] || measure single "s$i"
  [ "${ONLY:-pair}" = single ] || measure pair "p$i"
done
uptime
