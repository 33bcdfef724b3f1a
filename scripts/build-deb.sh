#!/bin/bash
# Builds the Debian package with cargo-deb: target/debian/mirrorfs_VERSION_ARCH.deb.
# scripts/deb-test.sh (run by scripts/test.sh, so by CI) builds it and tests the installed
# package; installing cargo-deb compiles it (about a minute on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo deb --version >/dev/null 2>&1; then
	echo "== installing cargo-deb (cargo install cargo-deb --locked)"
	cargo install cargo-deb --locked
fi
make gen
cargo deb -p mirrorfs --no-build "$@"
ls -1 target/debian/*.deb
