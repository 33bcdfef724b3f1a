#!/usr/bin/env bash
# What one SQLite WAL transaction costs through a mount with a network mirror (docs/benchmarks.md,
# "SQLite over a network mirror, and fio"): the mirrorfs-bench sqlite target's transactions (one
# insert + one update, synchronous=FULL) through `mount --mirror mirror://127.0.0.1:PORT`, with
# `strace` attached to the mount (its /dev/fuse reads dumped and decoded by fuse-requests.py, and
# its fsync-family syscalls with their files) and to the `mirrorfs serve` daemon (fsync-family
# counts), then the daemon's copy checked with integrity_check. Run as root; strace slows
# everything down: read the counts, not the time.
#
#   [N=200] [ACK=async] scripts/profile/sqlite-wal.sh [MIRRORFS_BIN]
set -euo pipefail
BIN=${1:-target/release/mirrorfs}
BIN=$(realpath "$BIN")
HERE=$(dirname "$(realpath "$0")")
N=${N:-200}
D=$(mktemp -d /var/tmp/sqlite-wal.XXXXXX)
mkdir -p "$D/backing" "$D/mnt" "$D/mirror"
fp() { "$BIN" init --config "$1" --name "$2" | sed -n 's/^fingerprint: //p'; }
FP=$(fp "$D/cp" prof-primary)
FM=$(fp "$D/cm" prof-mirror)
"$BIN" trust --config "$D/cp" "$FM" prof-mirror >/dev/null
"$BIN" trust --config "$D/cm" "$FP" prof-primary >/dev/null
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
setsid "$BIN" serve "$D/mirror" --listen "127.0.0.1:$PORT" --config "$D/cm" >"$D/serve.log" 2>&1 &
SERVE=$!
MOUNT=
cleanup() {
    [ -n "$MOUNT" ] && kill -TERM "$MOUNT" 2>/dev/null && wait "$MOUNT" || true
    kill -TERM "$SERVE" 2>/dev/null && wait "$SERVE" || true
}
trap cleanup EXIT
for _ in $(seq 100); do ss -ltn | grep -q ":$PORT " && break; sleep 0.1; done
setsid "$BIN" mount "$D/backing" "$D/mnt" --mirror "mirror://127.0.0.1:$PORT" --config "$D/cp" \
    --ack "${ACK:-async}" >"$D/mount.log" 2>&1 &
MOUNT=$!
for _ in $(seq 100); do grep -q " $D/mnt " /proc/self/mountinfo && break; sleep 0.1; done
sleep 2
printf 'PRAGMA journal_mode=wal;\nCREATE TABLE t(id INTEGER PRIMARY KEY, n INTEGER, v TEXT);\n' |
    sqlite3 -bail -batch "$D/mnt/db" >/dev/null
{
    echo "PRAGMA synchronous=FULL;"
    for i in $(seq "$N"); do
        printf "BEGIN;\nINSERT INTO t(id, n, v) VALUES(%d, 0, printf('%%.200c', 'x'));\n" "$i"
        printf "UPDATE t SET n = n + 1 WHERE id = %d;\nCOMMIT;\n" $(((i + 1) / 2))
    done
} >"$D/script.sql"
FDS=$(find /proc/$MOUNT/fd -lname /dev/fuse -printf '%f\n' | paste -sd,)
strace -f -y -p "$MOUNT" -e trace=read,readv,fsync,fdatasync,syncfs,sync_file_range \
    -e read="$FDS" -o "$D/mount.strace" 2>/dev/null &
ST1=$!
strace -f -c -p "$SERVE" -e trace=fsync,fdatasync,syncfs,sync_file_range -o "$D/serve.count" \
    2>/dev/null &
ST2=$!
sleep 2
sqlite3 -bail -batch "$D/mnt/db" <"$D/script.sql"
sleep 2
kill -INT "$ST1" "$ST2"
wait "$ST1" "$ST2" || true
# Stopping the mount drains the journal to the daemon; the daemon's stop applies what it holds.
kill -TERM "$MOUNT" && wait "$MOUNT" || true
MOUNT=
kill -TERM "$SERVE" && wait "$SERVE" || true
echo "== FUSE requests for $N transactions (with sqlite3's open and close)"
python3 "$HERE/fuse-requests.py" --count "$D/mount.strace"
echo "== the mount's fsync-family syscalls, by file"
grep -oE '(fsync|fdatasync|syncfs|sync_file_range)\([0-9]+<[^>]*>' "$D/mount.strace" |
    sed -E 's/\([0-9]+</(</; s/[0-9]{6,}\.seg/N.seg/' | sort | uniq -c | sort -rn
echo "== the daemon's fsync-family syscalls"
cat "$D/serve.count"
echo "== the daemon's copy: integrity_check, rows (want ok, $N)"
sqlite3 "$D/mirror/db" 'PRAGMA integrity_check; SELECT count(*) FROM t;'
echo "(files kept in $D)"
