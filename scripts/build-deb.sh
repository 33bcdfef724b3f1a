#!/bin/bash
# Builds the Debian package with cargo-deb: target/debian/mirrorfs_VERSION_ARCH.deb.
# Not part of the main CI (installing cargo-deb compiles it, minutes on a small machine);
# scripts/deb-test.sh builds it and tests the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo deb --version >/dev/null 2>&1; then
	echo "== installing cargo-deb (cargo install cargo-deb --locked)"
	cargo install cargo-deb --locked
fi
make gen
cargo deb -p mirrorfs --no-build "$@"
ls -1 target/debian/*.deb
