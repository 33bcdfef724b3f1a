#!/usr/bin/env bash
# Compare a pjdfstest failure list with a baseline.
#
#   scripts/pjdfstest-compare.sh BASELINE_LIST RESULT_LIST
#
# Both files hold failing test names, one per line (blank lines and text
# after '#' are ignored), e.g. tests/pjdfstest/baseline-ext4.txt and the
# OUTFILE.failed written by scripts/pjdfstest.sh.
#
# Exits 1 and lists them if RESULT has failures that BASELINE does not;
# lists, for information only, baseline failures that now pass. Exits 2 on
# bad arguments.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 BASELINE_LIST RESULT_LIST" >&2
    exit 2
fi
for f in "$1" "$2"; do
    [ -f "$f" ] || { echo "pjdfstest-compare: $f: no such file" >&2; exit 2; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
names() {
    { sed -e 's/#.*//' -e 's/[[:space:]]//g' "$1" | grep -v '^$' || true; } | LC_ALL=C sort -u
}
names "$1" >"$tmp/b"
names "$2" >"$tmp/r"
new=$(LC_ALL=C comm -13 "$tmp/b" "$tmp/r")
fixed=$(LC_ALL=C comm -23 "$tmp/b" "$tmp/r")

if [ -n "$fixed" ]; then
    echo "pjdfstest-compare: $(printf '%s\n' "$fixed" | wc -l) test(s) failing in $1 now pass:"
    printf '%s\n' "$fixed" | sed 's/^/  /'
fi
if [ -n "$new" ]; then
    echo "pjdfstest-compare: $(printf '%s\n' "$new" | wc -l) new failure(s), not in $1:"
    printf '%s\n' "$new"
    exit 1
fi
echo "pjdfstest-compare: no new failures ($(wc -l <"$tmp/r") failing, all also in $1)"
