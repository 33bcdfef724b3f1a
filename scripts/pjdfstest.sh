#!/usr/bin/env bash
# Run the pjdfstest POSIX conformance suite in a directory and summarise it.
#
#   scripts/pjdfstest.sh DIR [OUTFILE [TEST_PATTERN...]]
#
# DIR      directory to test in, typically a FUSE mountpoint (run as root; a
#          FUSE file system must be mounted with allow_other, because tests
#          switch to the dummy users of tests/pjdfstest/pjdfstest.toml).
# OUTFILE  raw pjdfstest output (default /tmp/pjdfstest.out). The sorted
#          names of the failed tests are written to OUTFILE.failed, for
#          scripts/pjdfstest-compare.sh.
# TEST_PATTERN  optional pjdfstest name filters (substring match), e.g. chmod.
#
# Environment:
#   PJDFSTEST_CONFIG        config file (default tests/pjdfstest/pjdfstest.toml)
#   PJDFSTEST_SECONDARY_FS  directory on another file system for the EXDEV
#                           tests; default: a temporary directory on the first
#                           of /dev/shm /tmp /var/tmp that is on a file system
#                           other than DIR's; "none" skips those tests
#   PJDFSTEST_TIMEOUT       seconds before the run is killed (default 900)
#
# Exits 0 whatever the number of failed tests; exits 2 if the suite could not
# run to its end (bad arguments, missing pjdfstest, timeout, crash), so that
# an empty failure list always means a complete run.
set -euo pipefail

usage() { echo "usage: $0 DIR [OUTFILE [TEST_PATTERN...]]" >&2; exit 2; }
log() { echo "pjdfstest: $*"; }
die() { echo "pjdfstest: error: $*" >&2; exit 2; }

[ $# -ge 1 ] || usage
case "$1" in -h | --help) usage ;; esac
dir=$1
out=${2:-/tmp/pjdfstest.out}
shift $(($# >= 2 ? 2 : 1))
patterns=("$@")

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config=${PJDFSTEST_CONFIG:-$repo/tests/pjdfstest/pjdfstest.toml}
timeout_s=${PJDFSTEST_TIMEOUT:-900}
failed_list="$out.failed"

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
command -v pjdfstest >/dev/null ||
    die "pjdfstest not found; run scripts/install-test-deps.sh"
[ -d "$dir" ] || die "$dir is not a directory"
[ -f "$config" ] || die "config $config not found"
dir=$(cd "$dir" && pwd -P)
[ "$(id -u)" -eq 0 ] ||
    log "warning: not root; tests that need root or the dummy users will be skipped"

# The tests switch to the dummy users, who must be able to reach DIR.
dummy_user=$(sed -n 's/^[[:space:]]*\[[[:space:]]*"\([^"]*\)".*/\1/p;T;q' "$config")
if [ "$(id -u)" -eq 0 ] && [ -n "$dummy_user" ]; then
    getent passwd "$dummy_user" >/dev/null ||
        die "dummy user $dummy_user missing; run scripts/install-test-deps.sh"
    can_reach() { setpriv --reuid="$dummy_user" --regid="$dummy_user" --clear-groups \
        test -x "$dir" -a -r "$dir" 2>/dev/null; }
    if ! can_reach && [ "$(stat -c %u "$dir")" -eq 0 ]; then
        chmod a+rx "$dir" # e.g. a fresh mktemp -d, mode 0700
    fi
    can_reach || log "warning: user $dummy_user cannot reach $dir" \
        "(mode of a parent? FUSE mounted without allow_other?); expect EACCES failures"
fi

# A directory on another file system for the EXDEV tests.
xdev_args=()
xdev_tmp=""
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() { if [ -n "$xdev_tmp" ]; then rm -rf "$xdev_tmp"; fi; }
trap cleanup EXIT
if [ -n "${PJDFSTEST_SECONDARY_FS:-}" ]; then
    if [ "$PJDFSTEST_SECONDARY_FS" != none ]; then
        xdev_args=(-s "$PJDFSTEST_SECONDARY_FS")
    fi
else
    dev=$(stat -c %d "$dir")
    for cand in /dev/shm /tmp /var/tmp; do
        if [ -d "$cand" ] && [ -w "$cand" ] && [ "$(stat -c %d "$cand")" != "$dev" ]; then
            xdev_tmp=$(mktemp -d "$cand/pjdfstest-xdev.XXXXXX")
            xdev_args=(-s "$xdev_tmp")
            break
        fi
    done
fi

fstype=$(findmnt -n -o FSTYPE -T "$dir" 2>/dev/null || stat -f -c %T "$dir")
log "running in $dir ($fstype), config ${config#"$repo"/}${xdev_args[1]:+, secondary fs ${xdev_args[1]}}"
mkdir -p "$(dirname "$out")"
start=$(date +%s)
rc=0
# NO_COLOR: plain text output; no backtraces: the assertion message is enough.
NO_COLOR=1 RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0 \
    timeout -k 10 "$timeout_s" \
    pjdfstest -c "$config" -p "$dir" "${xdev_args[@]}" "${patterns[@]}" \
    >"$out" 2>&1 </dev/null || rc=$?
elapsed=$(($(date +%s) - start))

# Per-test lines: "<name> <padding> ok|FAILED|skipped|PASSED UNEXPECTEDLY|failed as expected".
results=$(sed 's/\x1b\[[0-9;]*m//g' "$out" |
    sed -n -E 's/^([^[:space:]]+)[[:space:]]+(ok|FAILED|skipped|PASSED UNEXPECTEDLY|failed as expected)$/\2\t\1/p')
count() { printf '%s\n' "$results" | grep -c "^$1"$'\t' || true; }
passed=$(count ok)
skipped=$(count skipped)
xfail=$(count 'failed as expected')
printf '%s\n' "$results" | sed -n -E 's/^(FAILED|PASSED UNEXPECTEDLY)\t//p' |
    LC_ALL=C sort -u >"$failed_list"
failed=$(grep -c . "$failed_list" || true)

summary=$(sed 's/\x1b\[[0-9;]*m//g' "$out" | grep '^Summary:' || true)
if [ -z "$summary" ]; then
    tail -n 20 "$out" >&2
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        die "pjdfstest timed out after ${timeout_s}s (raw output: $out)"
    fi
    die "pjdfstest did not complete (exit $rc; raw output: $out)"
fi

if [ "$failed" -gt 0 ]; then
    log "failed tests ($failed):"
    cat "$failed_list"
fi
log "raw output: $out, failed list: $failed_list, ${elapsed}s"
[ "$xfail" -eq 0 ] || log "$xfail failed as expected (settings.expected_failures)"
# Last line, in the plain "N passed, N failed, N skipped" form.
echo "pjdfstest: $passed passed, $failed failed, $skipped skipped"
exit 0
