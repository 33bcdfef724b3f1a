#!/usr/bin/env bash
# Where the threaded rand-write rows' time goes (issue 9, "the 16-thread write convoy"): THREADS
# writer threads, each with its own descriptor, do WRITES random 4 KiB pwrites in all into one
# 64 MiB file (what mirrorfs-bench's `rand-write-4k, N threads` rows do) or, with DISTINCT=1,
# each into a file of its own, through a fresh mount with one local mirror. Prints the IOPS, the
# writers' CPU per write (`perf stat` of the workload), and per daemon thread (summed by name)
# its futex *waits* and *wakes* per write (the `syscalls:sys_enter_futex` tracepoint, by op: a
# FUSE worker waiting on a futex in the write path is waiting on a lock) and its voluntary
# context switches per write.
#
#   scripts/profile/convoy.sh THREADS [WRITES] [DISTINCT] [MIRRORFS_BIN]
#
# Needs root, /dev/fuse, gcc, python3, perf (Debian's linux-perf).
set -euo pipefail
threads=${1:?usage: $0 THREADS [WRITES] [DISTINCT] [MIRRORFS_BIN]}
writes=${2:-8000}
distinct=${3:-0}
bin=${4:-$(dirname "$0")/../../target/release/mirrorfs}
work=$(mktemp -d /var/tmp/mirrorfs-convoy.XXXXXX)
trap 'umount "$work/mnt" 2>/dev/null || true; [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work"/{backing,mirror,mnt}

cat >"$work/w.c" <<'C'
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static const char *dir;
static int nthreads, total, distinct;
static const long slots = 16384; /* 64 MiB of 4 KiB pages */
static void *run(void *a) {
  long t = (long)a;
  char p[4096], buf[4096];
  snprintf(p, sizeof p, "%s/f%ld", dir, distinct ? t : 0L);
  int fd = open(p, O_WRONLY);
  if (fd < 0) { perror("open"); exit(1); }
  memset(buf, (int)t, sizeof buf);
  unsigned s = (unsigned)t * 7919u + 1u;
  for (int i = 0; i < total / nthreads; i++) {
    s = s * 1103515245u + 12345u;
    memcpy(buf, &i, sizeof i);
    if (pwrite(fd, buf, 4096, (long)((s >> 8) % slots) * 4096) != 4096) { perror("pwrite"); exit(1); }
  }
  close(fd);
  return 0;
}
int main(int c, char **v) {
  if (c < 5) return 2;
  dir = v[1]; nthreads = atoi(v[2]); total = atoi(v[3]); distinct = atoi(v[4]);
  if (nthreads < 1 || nthreads > 256) return 2;
  static char zeros[1 << 20];
  for (int f = 0; f < (distinct ? nthreads : 1); f++) {
    char p[4096];
    snprintf(p, sizeof p, "%s/f%d", dir, f);
    int fd = open(p, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    if (fd < 0) { perror("create"); return 1; }
    for (int k = 0; k < 64; k++)
      if (write(fd, zeros, sizeof zeros) != sizeof zeros) { perror("write"); return 1; }
    fsync(fd);
    close(fd);
  }
  pthread_t th[256];
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long t = 0; t < nthreads; t++) pthread_create(&th[t], 0, run, (void *)t);
  for (int t = 0; t < nthreads; t++) pthread_join(th[t], 0);
  clock_gettime(CLOCK_MONOTONIC, &b);
  double secs = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) / 1e9;
  printf("%d threads, %s: %d writes in %.3f s, %.0f IOPS\n", nthreads,
         distinct ? "a file each" : "one file", total, secs, total / secs);
  return 0;
}
C
gcc -O2 -pthread -o "$work/w" "$work/w.c"

"$bin" mount "$work/backing" "$work/mnt" --mirror "$work/mirror" >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 100); do mountpoint -q "$work/mnt" && break; sleep 0.1; done
mountpoint -q "$work/mnt" || { cat "$work/log"; exit 1; }

switches() { # voluntary context switches per thread name
  for t in /proc/"$pid"/task/*; do
    echo "$(cat "$t/comm") $(awk '/^voluntary_ctxt_switches/{print $2}' "$t/status")"
  done
}
switches >"$work/cs0"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
perf record -q -e syscalls:sys_enter_futex -p "$pid" -o "$work/futex.data" -- \
  perf stat -e task-clock -x, -o "$work/writers" \
  "$work/w" "$work/mnt" "$threads" "$writes" "$distinct"
switches >"$work/cs1"
perf script -i "$work/futex.data" -F comm,trace 2>/dev/null >"$work/futex.txt"

python3 - "$work" "$writes" <<'PY'
import collections, re, sys
work, n = sys.argv[1], int(sys.argv[2])
ms = float(open(f"{work}/writers").read().strip().splitlines()[-1].split(",")[0])
print(f"writers' CPU: {ms * 1000 / n:.1f} us per write")
name = lambda c: "fuser (FUSE workers)" if c.startswith("fuser") else c
waits, wakes = collections.Counter(), collections.Counter()
for line in open(f"{work}/futex.txt"):
    m = re.search(r"op: (0x[0-9a-f]+)", line)
    if m:
        op = int(m.group(1), 16) & 127  # without FUTEX_PRIVATE_FLAG
        (waits if op in (0, 9) else wakes)[name(line.split()[0])] += 1  # WAIT, WAIT_BITSET
def load(f):
    c = collections.Counter()
    for line in open(f):
        k, _, v = line.rpartition(" ")
        c[name(k)] += int(v)
    return c
cs = load(f"{work}/cs1")
cs.subtract(load(f"{work}/cs0"))
print(f"{'daemon thread':22} {'futex waits/w':>14} {'futex wakes/w':>14} {'vol. switches/w':>16}")
for t in sorted(set(waits) | set(wakes) | {k for k, v in cs.items() if v > 0}):
    print(f"{t:22} {waits[t] / n:14.3f} {wakes[t] / n:14.3f} {cs[t] / n:16.3f}")
PY
