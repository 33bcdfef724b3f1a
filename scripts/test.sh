#!/usr/bin/env bash
# The project's one test command (README, and .ci/run): installs what the tests need, then runs
# formatting and lint gates, the unit tests, the seeded simulation, the FUSE integration tests,
# the POSIX conformance suite through a real mount, the .deb (scripts/deb-test.sh) and a quick
# benchmark smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== installing test dependencies"
scripts/install-test-deps.sh

echo "== cargo fmt --check, clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

echo "== building"
cargo build --release --workspace

echo "== unit, simulation and integration tests"
export MIRRORFS_SIM_SEEDS="${MIRRORFS_SIM_SEEDS:-300}"
cargo test --release --workspace -- --test-threads=2

echo "== POSIX conformance (pjdfstest) through a mirrorfs mount"
work=$(mktemp -d /var/tmp/mirrorfs-pjd.XXXXXX)
mkdir -p "$work/backing" "$work/mnt" "$work/mirror"
chmod 755 "$work" "$work/backing" "$work/mnt" "$work/mirror"
target/release/mirrorfs mount "$work/backing" "$work/mnt" --mirror "$work/mirror" 2>"$work/mount.log" &
pid=$!
cleanup() { kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; umount -l "$work/mnt" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
for _ in $(seq 100); do grep -q " $work/mnt " /proc/self/mountinfo && break; sleep 0.1; done
scripts/pjdfstest.sh "$work/mnt" "$work/pjdfstest.out"
scripts/pjdfstest-compare.sh tests/pjdfstest/baseline-ext4.txt "$work/pjdfstest.out.failed"
kill -TERM "$pid"; wait "$pid" || true
echo "== mirror equals backing after the conformance suite"
diff -r --no-dereference --exclude=.mirrorfs "$work/backing" "$work/mirror"
trap - EXIT
cleanup

echo "== the Debian package: built with cargo-deb, installed, mounted through an fstab line, removed"
scripts/deb-test.sh

echo "== benchmark smoke run (quick sizes; figures are not checked)"
target/release/mirrorfs-bench --quick --targets native,mirrorfs >/dev/null

echo "== all tests passed"
