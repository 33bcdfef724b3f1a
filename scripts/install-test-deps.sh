#!/usr/bin/env bash
# Install what the integration tests need: Debian packages for FUSE and
# pjdfstest's build, and the pjdfstest POSIX conformance suite itself.
#
# Idempotent and quick when everything is already there: apt-get update only
# runs when a package is missing, and cargo install only when pjdfstest is not
# already on PATH at the pinned version. Run as root on Debian (CI machines).
set -euo pipefail

PJDFSTEST_VERSION=0.2.2
APT_PACKAGES=(libacl1-dev bindfs fuse3 rsync nftables iproute2 util-linux prometheus)
# Only for benchmarks (`mirrorfs-bench --targets fio`, which reports itself skipped without
# fio, and `--targets sqlite`, which needs the sqlite3 shell): a failed install is a warning,
# never a failed CI run.
OPTIONAL_APT_PACKAGES=(fio sqlite3)
PJDFSTEST_USERS=(pjdfstest1 pjdfstest2)

log() { echo "install-test-deps: $*"; }

# Run privileged commands directly as root, through sudo otherwise.
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

# --- Debian packages --------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    # Wait for, rather than fail on, a concurrent apt/dpkg run.
    apt_opts=(-qq -o DPkg::Lock::Timeout=600)
    apt_log=$(mktemp)
    if ! { "${SUDO[@]}" apt-get "${apt_opts[@]}" update &&
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" \
            install -y --no-install-recommends "${missing[@]}"; } >"$apt_log" 2>&1; then
        cat "$apt_log" >&2
        rm -f "$apt_log"
        exit 1
    fi
    rm -f "$apt_log"
fi
optional_missing=()
for pkg in "${OPTIONAL_APT_PACKAGES[@]}"; do
    if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]; then
        optional_missing+=("$pkg")
    fi
done
if [ "${#optional_missing[@]}" -gt 0 ]; then
    log "installing optional Debian packages: ${optional_missing[*]}"
    apt_opts=(-qq -o DPkg::Lock::Timeout=600)
    apt_log=$(mktemp)
    if ! "${SUDO[@]}" apt-get "${apt_opts[@]}" update >"$apt_log" 2>&1; then
        log "warning: apt-get update failed; going on without ${optional_missing[*]}:"
        tail -n 5 "$apt_log" >&2
        optional_missing=()
    fi
    # One at a time, so that a package this Debian lacks does not keep the others out.
    for pkg in "${optional_missing[@]}"; do
        if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" \
            install -y --no-install-recommends "$pkg" >"$apt_log" 2>&1; then
            log "warning: cannot install optional package $pkg (going on without it):"
            tail -n 5 "$apt_log" >&2
        fi
    done
    rm -f "$apt_log"
fi

# --- dummy users for pjdfstest ----------------------------------------------
# The chown/chmod/permission tests switch to two unprivileged users, each the
# sole member of a primary group of the same name (named in
# tests/pjdfstest/pjdfstest.toml, [dummy_auth]).
for name in "${PJDFSTEST_USERS[@]}"; do
    if ! getent group "$name" >/dev/null; then
        "${SUDO[@]}" groupadd --system "$name"
    fi
    if ! getent passwd "$name" >/dev/null; then
        log "creating user $name"
        "${SUDO[@]}" useradd --system --gid "$name" --no-create-home \
            --home-dir / --shell /usr/sbin/nologin \
            --comment "dummy user for pjdfstest" "$name"
    fi
done

# --- pjdfstest ----------------------------------------------------------------
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
have_version=""
if command -v pjdfstest >/dev/null 2>&1; then
    # "pjdfstest 0.2.2"
    have_version=$(pjdfstest --version 2>/dev/null | awk '{print $2}') || true
fi
if [ "$have_version" != "$PJDFSTEST_VERSION" ]; then
    if ! command -v cargo >/dev/null 2>&1; then
        echo "install-test-deps: cargo not found; install a Rust toolchain first" >&2
        exit 1
    fi
    log "cargo install pjdfstest $PJDFSTEST_VERSION (takes a few minutes)"
    cargo install pjdfstest --version "$PJDFSTEST_VERSION" --locked --quiet
fi

log "ok (pjdfstest $PJDFSTEST_VERSION, ${APT_PACKAGES[*]}; optional: ${OPTIONAL_APT_PACKAGES[*]})"
