#!/usr/bin/env bash
# Incremental verify against full verify, side by side in one run (docs/benchmarks.md,
# "incremental verify"): 10,000 files (100 directories x 100 files of 4,096-7,759 random bytes)
# written through a mount with one local mirror, then
#   the first verify (full: none on record), --no-cache (baseline: full, every file read), a
#   verify of the unchanged tree, then PAIRS pairs of (change 10 files through the mount,
#   verify) with --full and incremental (the default) in alternating order.
# Usage: scripts/bench-verify.sh [BIN] [PAIRS]   (BIN: target/release/mirrorfs)
set -euo pipefail
BIN=$(realpath "${1:-target/release/mirrorfs}")
PAIRS=${2:-3}
T=$(mktemp -d /var/tmp/vbench.XXXX)
mkdir -p "$T/backing" "$T/mnt" "$T/mirror" "$T/state"
"$BIN" mount "$T/backing" "$T/mnt" --mirror "$T/mirror" --state "$T/state" 2>"$T/mount.log" &
MPID=$!
cleanup() {
    kill -TERM "$MPID" 2>/dev/null || true
    wait "$MPID" 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT
for _ in $(seq 100); do mountpoint -q "$T/mnt" && break; sleep 0.1; done
uptime
python3 - "$BIN" "$T" "$PAIRS" <<'PY'
import json, os, subprocess, sys, time
binp, t, pairs = sys.argv[1], sys.argv[2], int(sys.argv[3])
mnt = t + "/mnt"
for d in range(100):
    os.makedirs(f"{mnt}/d{d:03}")
    for f in range(100):
        with open(f"{mnt}/d{d:03}/f{f:03}", "wb") as fh:
            fh.write(os.urandom(4096 + f * 37))
time.sleep(3)  # older than the hash cache's settle rule (2 s)

def verify(*extra):
    t0 = time.monotonic()
    o = subprocess.run([binp, "verify", mnt, "--json", *extra], capture_output=True)
    wall = time.monotonic() - t0
    if o.returncode != 0:
        sys.exit(f"verify {extra} exited {o.returncode}: {o.stderr.decode()}")
    return json.loads(o.stdout), wall

rows = []
def row(name, v, wall):
    m = v["mirrors"][0]
    rows.append((name, v["incremental"], v["primary_entries_scanned"], v["primary_files_read"],
                 v["primary_bytes_read"], m["files_read"], m["bytes_read"], wall))

row("first (full: no verify on record)", *verify())
row("`--no-cache` (baseline: full, every file read)", *verify("--no-cache"))
row("unchanged since the last verify", *verify())
k = 0
def change10():
    global k
    for i in range(10):
        with open(f"{mnt}/d{(k * 7) % 100:03}/f{k % 100:03}", "r+b") as fh:
            fh.write(os.urandom(7))
        k += 1
for p in range(pairs):
    # Each run sees 10 files changed since the verify before it; the order alternates.
    order = [("--full",), ()] if p % 2 == 0 else [(), ("--full",)]
    for extra in order:
        change10()
        name = f"pair {p + 1}, 10 files changed: " + ("`--full`" if extra else "incremental")
        row(name, *verify(*extra))
def syscalls(*extra):
    out = f"{t}/strace.out"
    o = subprocess.run(["strace", "-f", "-c", "-o", out, binp, "verify", mnt, "--json", *extra],
                       capture_output=True)
    if o.returncode != 0:
        sys.exit(f"strace verify {extra} exited {o.returncode}: {o.stderr.decode()}")
    calls = {}
    for line in open(out):
        w = line.split()
        if len(w) >= 5 and w[-1] in ("total", "openat", "newfstatat", "getdents64", "listxattr",
                                     "flistxattr", "llistxattr", "pread64"):
            calls[w[-1].replace("flistxattr", "listxattr").replace("llistxattr", "listxattr")] = int(w[3])
    return calls

strace_rows = []
if subprocess.run(["which", "strace"], capture_output=True).returncode == 0:
    for extra in [(), ("--full",)]:
        change10()
        strace_rows.append(("incremental" if not extra else "`--full`", syscalls(*extra)))
print("| run | incremental | primary entries scanned | primary files read | primary bytes | mirror files read | mirror bytes | wall |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r[0]} | {str(r[1]).lower()} | {r[2]:,} | {r[3]:,} | {r[4]:,} | {r[5]:,} | {r[6]:,} | {r[7]:.2f} s |")
if strace_rows:
    print()
    print("Syscalls of one verify after 10 more files changed (`strace -f -c`; the openat include")
    print("reading every mount registration in /run/mirrorfs to find this mount):")
    print()
    names = ["total", "openat", "newfstatat", "getdents64", "listxattr", "pread64"]
    print("| run | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for name, c in strace_rows:
        print(f"| {name} | " + " | ".join(f"{c.get(n, 0):,}" for n in names) + " |")
PY
uptime
