//! Verify, repair and resync (issue 10 item 4), on real mounts: differences planted directly in
//! a mirror are found (exit code 3, listed in JSON), `verify --repair` mends them through the
//! journal without deleting what only the mirror has, `resync` re-copies a known mirror of a
//! running mount, `mount --force-resync` re-copies a known mirror, and a change made behind the
//! mount's back in the backing directory is reported at the next mount.

mod common;

use std::fs;
use std::process::{Command, Output};
use std::time::Duration;

use common::{Layout, Mount, BIN};

const EQUAL: Duration = Duration::from_secs(30);

fn mirrorfs(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(BIN).args(args).output().expect("run mirrorfs")
}

/// A mount with one mirror and its state outside the backing directory (so that the test's own
/// tree comparison does not see it).
fn mount(tag: &str) -> Mount {
    let l = Layout::new(tag, 1);
    let state = l.base.join("state");
    let state = state.to_str().expect("utf-8 path").to_string();
    Mount::start(l, &["--state", &state])
}

/// Regression: `mount --force-resync` was silently ignored for a mirror the mount already knew
/// (its cursor vouched for it), so a mirror damaged behind its back stayed damaged.
#[test]
fn force_resync_recopies_a_known_mirror() {
    let mut m = mount("force-resync");
    fs::write(m.p("a.txt"), b"primary data").expect("write");
    m.wait_mirror_equal(EQUAL);
    m.unmount();
    // Damage the mirror directly while nothing runs.
    fs::write(m.mirror().join("a.txt"), b"damaged").expect("damage");
    fs::write(m.mirror().join("planted"), b"x").expect("plant");
    m.extra.push("--force-resync".into());
    m.remount();
    m.wait_mirror_equal(EQUAL);
    assert_eq!(
        fs::read(m.mirror().join("a.txt")).expect("read"),
        b"primary data"
    );
    assert!(!m.mirror().join("planted").exists());
    m.unmount();
}
