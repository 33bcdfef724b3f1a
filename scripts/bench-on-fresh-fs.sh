#!/usr/bin/env bash
# Runs mirrorfs-bench with its work directory on a fresh file system made for the run: an ext4
# image (mkfs defaults, so with a journal) loop-mounted under /var/tmp, removed afterwards.
#
#   scripts/bench-on-fresh-fs.sh [--no-journal] [--size GiB] -- MIRRORFS-BENCH-ARGS...
#
# Why: this machine's disk is ext4 *without* a journal, and there the kernel's inode allocator
# (fs/ext4/ialloc.c, find_inode_bit -> recently_deleted, used only when the file system has no
# journal) skips every inode deleted in the last 60 s (360 s while its inode table block is
# dirty), reading each one's dtime. After other work has deleted many files, every create scans
# past them: 3,000 files of 1 KiB took 0.38 ms each on a fresh journal-less image and 10.6 ms
# each after 20,000 deletions, against 0.18 and 0.45 ms on a journaled one (docs/benchmarks.md,
# "2026-12-07 — journal-less ext4's inode allocator"). Rows that create many files (small files,
# the burst lag, the initial copy, build-like, the tokens `names` row) then measure that scan,
# twice for mirrorfs (backing and mirror), not mirrorfs. A fresh journaled ext4 is what most
# deployments run on; --no-journal makes the image like this disk, to compare.
#
# Needs root (mount), mkfs.ext4 (e2fsprogs).
set -euo pipefail
cd "$(dirname "$0")/.."
journal=yes
size=8
while [ $# -gt 0 ]; do
  case "$1" in
    --no-journal) journal=no; shift ;;
    --size) size=${2:?--size needs GiB}; shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 [--no-journal] [--size GiB] -- MIRRORFS-BENCH-ARGS..." >&2; exit 2 ;;
  esac
done
img=$(mktemp /var/tmp/mirrorfs-bench-fs.XXXXXX.img)
mnt=$(mktemp -d /var/tmp/mirrorfs-bench-fs.XXXXXX)
cleanup() { umount "$mnt" 2>/dev/null || true; rmdir "$mnt" 2>/dev/null || true; rm -f "$img"; }
trap cleanup EXIT
truncate -s "${size}G" "$img"
if [ "$journal" = yes ]; then
  mkfs.ext4 -q -F "$img"
else
  mkfs.ext4 -q -F -O ^has_journal "$img"
fi
mount -o loop "$img" "$mnt"
echo "bench-on-fresh-fs: ext4 (journal: $journal, ${size} GiB image) at $mnt" >&2
target/release/mirrorfs-bench --workdir "$mnt/work" "$@"
