#!/usr/bin/env bash
# Where the time of one mirrorfs-bench row goes: runs the row's workload (the same operations
# and sizes as mirrorfs-bench --quick; stat does 3 passes over the 1,000 files, 1.2 s apart, the pauses untimed) against a native directory and a fresh mirrorfs mount with
# one local mirror, and reports for the mount: time of the timed operations (measured inside the workload) vs native, the daemon's context
# switches (all threads, /proc/PID/task/*/status), its syscalls (`strace -c -f`, a second run:
# strace slows it down, read the counts, not the time) and, with PERF=1, its hottest functions
# (`perf record -g`, a third run).
#
# For rm-r (the main table's `build-like: rm -r it again`: a tree of RM_FILES files, 10,000 by
# default, of 1-16 KiB, 20 to a directory, 10 directories to a parent, made untimed, then
# `rm -r` of it timed) it also counts, per removed file, in the first mirrorfs run: the FUSE
# requests by opcode (the kernel's fuse:fuse_request_send events, in a tracing instance of our
# own, filtered on the mount's connection), the journal records the run appended by kind (the
# segments read after the unmount), and the CPU time of each daemon thread (by name, from
# /proc/PID/task/*/stat, sampled once the mirror has applied the removal); and with BINDFS=1 the
# same time and FUSE requests for bindfs over a plain directory.
#
#   [STRACE_TOP=N] [RM_FILES=N] [BINDFS=1] scripts/profile/row.sh ROW [MIRRORFS_BIN]
#   ROW: seq-write | seq-read-warm | seq-read-cold | rand-write | small-files | stat | rm-r
#
# Needs root, /dev/fuse, python3, strace (and perf from Debian's linux-perf for PERF=1; tracefs
# and bindfs for rm-r's counts).
set -euo pipefail
row=${1:?usage: $0 ROW [MIRRORFS_BIN]}
bin=${2:-$(dirname "$0")/../../target/release/mirrorfs}
work=$(mktemp -d /var/tmp/mirrorfs-profile.XXXXXX)
tracing=/sys/kernel/tracing/instances/mirrorfs-row-$$
trap 'umount "$work/mnt" 2>/dev/null || true; [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; [ -d "$tracing" ] && rmdir "$tracing"; rm -rf "$work"' EXIT
mkdir -p "$work"/{native,backing,mirror,mnt}

# The workload: python3, so that the process doing it costs the same on both sides.
workload() { # DIR PHASE (setup|run)
  python3 - "$1" "$row" "$2" <<'PY'
import os, random, sys, time
d, row, phase = sys.argv[1], sys.argv[2], sys.argv[3]
MiB = 1 << 20
RM_FILES = int(os.environ.get("RM_FILES", "10000"))
def source_tree():  # mirrorfs-bench's make_source_tarball layout, written directly
    text = bytes(b"abcdefghij klmnopqrst;\n(){}"[(i * 7 + i // 13) % 27] for i in range(16384))
    r = random.Random(42)
    for i in range(RM_FILES):
        sub = os.path.join(d, "tree", "m%03d" % (i // 200), "p%04d" % (i // 20))
        if i % 20 == 0: os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, "f%05d.c" % i), "wb") as f: f.write(text[:r.randint(1024, 16384)])
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
    if row == "rm-r": source_tree()
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
elif row == "rm-r":
    import subprocess
    subprocess.run(["rm", "-r", os.path.join(d, "tree")], check=True)
else: sys.exit(f"unknown row {row}")
print(time.monotonic() - t0)
PY
}
timed() { # DIR -> seconds
  workload "$1" setup; sync
  [ "$row" = seq-read-cold ] && echo 3 > /proc/sys/vm/drop_caches
  ${before_run:-true} "$1"
  workload "$1" run
}
# rm-r's counts: FUSE requests of the mount at DIR by opcode (a tracing instance of our own).
fuse_count_start() { # DIR
  local dev; dev=$(python3 -c 'import os,sys; d=os.stat(sys.argv[1]).st_dev; print(os.major(d) << 20 | os.minor(d))' "$1")
  mkdir -p "$tracing"; echo 0 > "$tracing/tracing_on"; echo > "$tracing/trace"
  echo 16384 > "$tracing/buffer_size_kb"
  echo "connection == $dev" > "$tracing/events/fuse/fuse_request_send/filter"
  echo 1 > "$tracing/events/fuse/fuse_request_send/enable"; echo 1 > "$tracing/tracing_on"
}
fuse_count_end() { # FILES -> opcode counts per file
  echo 0 > "$tracing/tracing_on"
  grep -o 'opcode [0-9]* ([A-Z_0-9]*)' "$tracing/trace" | awk -v n="$1" '{c[$3]++; t++}
    END {printf "  all: %d (%.2f per file)\n", t, t / n; for (k in c) printf "  %s: %d (%.2f per file)\n", k, c[k], c[k] / n}' | sort -t'(' -k2 -rn
  grep -q 'LOST EVENTS' "$tracing/trace" && echo "  (the trace lost events: the counts are low)"
  echo 0 > "$tracing/events/fuse/fuse_request_send/enable"; rmdir "$tracing"
}
thread_cpu() { # -> "NAME TICKS" per thread name (utime + stime, clock ticks; spaces in names as _)
  python3 - "$pid" <<'PY'
import glob, sys
t = {}
for f in glob.glob(f"/proc/{sys.argv[1]}/task/*/stat"):
    try: s = open(f).read()
    except OSError: continue
    name, rest = s[s.index("(") + 1:s.rindex(")")], s[s.rindex(")") + 2:].split()
    name = name.replace(" ", "_"); t[name] = t.get(name, 0) + int(rest[11]) + int(rest[12])
for k in sorted(t): print(k, t[k])
PY
}
rm_counts_start() { # DIR (the mount)
  fuse_count_start "$1"
  "$(dirname "$0")"/journal-kinds.py "$work/backing/.mirrorfs/journal" | awk '{print $2}' > "$work/seq0"
  thread_cpu > "$work/cpu0"
}
rm_counts_end() { # after the timed run: waits for the mirror, then prints the counts
  local n=${RM_FILES:-10000}
  for _ in $(seq 600); do [ -e "$work/mirror/tree" ] || break; sleep 0.1; done
  thread_cpu > "$work/cpu1"
  echo "FUSE requests during rm -r (fuse_request_send), per removed file:"; fuse_count_end "$n"
  echo "daemon CPU by thread until the mirror applied it (ms per 1,000 files):"
  join "$work/cpu0" "$work/cpu1" | awk -v n="$n" -v hz="$(getconf CLK_TCK)" \
    '{d = $3 - $2; if (d > 0) printf "  %s: %.0f\n", $1, d * 1000 / hz * 1000 / n}'
  unmount_fs
  echo "journal records the run appended, per removed file:"
  "$(dirname "$0")"/journal-kinds.py "$work/backing/.mirrorfs/journal" "$(cat "$work/seq0")" "$n" | tail -n +2
  mount_fs
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
[ "$row" = rm-r ] && before_run=rm_counts_start
mount_fs; c0=$(ctxt); tm=$(timed "$work/mnt"); c1=$(ctxt)
printf 'native %.3f s, mirrorfs %.3f s (%.2fx native), daemon context switches %d\n' \
  "$tn" "$tm" "$(echo "$tn / $tm" | bc -l)" "$((c1 - c0))"
[ "$row" = rm-r ] && { printf 'rm -r: native %.0f files/s, mirrorfs %.0f files/s\n' \
  "$(echo "${RM_FILES:-10000} / $tn" | bc -l)" "$(echo "${RM_FILES:-10000} / $tm" | bc -l)"; rm_counts_end; }
unmount_fs
if [ "$row" = rm-r ] && [ "${BINDFS:-0}" = 1 ]; then
  mkdir -p "$work/plain"; bindfs "$work/plain" "$work/mnt"
  before_run=fuse_count_start; tb=$(timed "$work/mnt"); umount "$work/mnt"
  printf 'bindfs %.3f s (%.0f files/s); its FUSE requests per removed file:\n' "$tb" "$(echo "${RM_FILES:-10000} / $tb" | bc -l)"
  fuse_count_end "${RM_FILES:-10000}"
  before_run=
fi
mount_fs
workload "$work/mnt" setup; sync; sleep 1
[ "$row" = seq-read-cold ] && echo 3 > /proc/sys/vm/drop_caches
strace -c -f -q -p "$pid" -o "$work/strace" & st=$!; sleep 0.5
workload "$work/mnt" run >/dev/null
# rm-r: until the mirror applied the removal, so that the counts are whole ones per file.
[ "$row" = rm-r ] && for _ in $(seq 600); do [ -e "$work/mirror/tree" ] || break; sleep 0.1; done
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
