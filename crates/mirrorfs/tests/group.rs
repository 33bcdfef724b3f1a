//! Group-atomic mirroring with a local mirror (issue 8 item 3): `mirrorfs group begin|end`
//! and the mount root's `user.mirrorfs.group` attribute. A group's changes, and every change
//! made while it is open, reach the mirror together once it ends; a primary restarted after a
//! crash ends the groups the crash left open. (A network mirror's crash and promotion at a
//! group boundary: `remote.rs`.)

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{wait_until, Layout, Mount, BIN};

/// A mount whose state directory is outside the backing directory, so that the backing and
/// mirror roots compare equal.
fn mount(tag: &str) -> Mount {
    let layout = Layout::new(tag, 1);
    let state = layout.base.join("state").display().to_string();
    Mount::start(layout, &["--state", &state])
}

/// How long a change outside any group takes at most to reach a local mirror here, many times
/// over: a held change must still be missing after it.
const HELD: Duration = Duration::from_millis(1500);

fn group(mnt: &Path, action: &str) -> Output {
    Command::new(BIN)
        .args(["group", action])
        .arg(mnt)
        .output()
        .expect("run mirrorfs group")
}

fn group_ok(mnt: &Path, action: &str) -> String {
    let o = group(mnt, action);
    assert!(
        o.status.success(),
        "mirrorfs group {action}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Waits until `rel` on the mirror holds `data`.
fn reaches(m: &Mount, rel: &str, data: &[u8]) -> bool {
    wait_until(Duration::from_secs(30), || {
        fs::read(m.mirror().join(rel)).is_ok_and(|d| d == data)
    })
}

#[test]
fn a_group_reaches_the_mirror_all_at_once_when_it_ends() {
    let mut m = mount("group-local");
    fs::write(m.p("before"), b"outside any group").expect("write");
    assert!(reaches(&m, "before", b"outside any group"));

    group_ok(m.mnt(), "begin");
    assert_eq!(group_ok(m.mnt(), "status").trim(), "1 group(s) open");
    fs::write(m.p("a.txt"), b"first half").expect("write a");
    fs::create_dir(m.p("d")).expect("mkdir d");
    fs::write(m.p("d/b.txt"), b"second half").expect("write b");
    // Another program's change while the group is open waits with it.
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("echo other > {}", m.p("c.txt").display()))
        .status()
        .expect("sh");
    assert!(st.success());
    std::thread::sleep(HELD);
    // `status` says why the mirror waits.
    let st = m.status().expect("status");
    assert_eq!(st["groups_open"], 1, "{st}");
    assert!(st["group_open_since_seq"].as_u64().is_some(), "{st}");
    let text = Command::new(BIN)
        .arg("status")
        .arg(m.mnt())
        .output()
        .expect("mirrorfs status");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("groups: 1 open since record"), "{text}");
    for rel in ["a.txt", "d", "d/b.txt", "c.txt"] {
        assert!(
            fs::symlink_metadata(m.mirror().join(rel)).is_err(),
            "{rel} reached the mirror while its group was open"
        );
    }

    group_ok(m.mnt(), "end");
    assert_eq!(group_ok(m.mnt(), "status").trim(), "0 group(s) open");
    assert!(reaches(&m, "d/b.txt", b"second half"));
    m.wait_mirror_equal(Duration::from_secs(30));
    // The control attribute is never stored.
    let o = Command::new("getfattr")
        .args(["-d", "-m", "-"])
        .arg(m.backing())
        .output();
    if let Ok(o) = o {
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("mirrorfs.group"),
            "the group attribute was stored on the backing root"
        );
    }
    m.unmount();
}

/// A new file's mtime reaches the mirror with its close (issue 9): the primary records a created
/// file's times when it is closed — with whatever it was written — not right after the create.
/// The open group holds every change back from the mirror for `HELD`, so a mirror left with the
/// times its own clock gave when it applied the creates would be off by that much.
#[test]
fn a_new_files_mtime_reaches_the_mirror_with_its_close() {
    let mut m = mount("group-times");
    group_ok(m.mnt(), "begin");
    // Created and closed, never written.
    drop(fs::File::create(m.p("empty")).expect("create empty"));
    // Created, written and closed.
    fs::write(m.p("written"), b"data").expect("write");
    // Created, kept open while time passes and another file is made, then closed unwritten.
    let held = fs::File::create(m.p("held")).expect("create held");
    std::thread::sleep(Duration::from_millis(100));
    fs::write(m.p("other"), b"x").expect("write other");
    drop(held);
    std::thread::sleep(HELD);
    group_ok(m.mnt(), "end");
    m.wait_mirror_equal(Duration::from_secs(30));
    m.unmount();
}

#[test]
fn ending_a_group_that_is_not_open_says_so() {
    let mut m = mount("group-none");
    let o = group(m.mnt(), "end");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "group end without a group succeeded");
    assert!(err.contains("no group is open"), "{err}");
    let o = group(&m.p("."), "begin");
    assert!(o.status.success(), "the mountpoint given as MOUNT/. works");
    group_ok(m.mnt(), "end");
    // Not the root of a mount: refused with words.
    fs::create_dir(m.p("sub")).expect("mkdir");
    let o = group(&m.p("sub"), "begin");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("not the root of a mirrorfs mount"), "{err}");
    m.unmount();
}

#[test]
fn a_primary_restarted_after_kill9_ends_the_group_the_crash_left_open() {
    let mut m = mount("group-kill9");
    group_ok(m.mnt(), "begin");
    fs::write(m.p("in-group"), b"written inside the group").expect("write");
    std::thread::sleep(HELD);
    assert!(fs::symlink_metadata(m.mirror().join("in-group")).is_err());
    m.kill9();
    m.remount();
    assert!(reaches(&m, "in-group", b"written inside the group"));
    m.wait_mirror_equal(Duration::from_secs(30));
    assert!(
        m.log().contains("ended now"),
        "the restart did not say it ended the open group:\n{}",
        m.log()
    );
    assert_eq!(group_ok(m.mnt(), "status").trim(), "0 group(s) open");
    m.unmount();
}

/// A mount with `--fsync-groups` (and a group age limit of `max_ms`).
fn mount_fsync_groups(tag: &str, max_ms: &str) -> Mount {
    let layout = Layout::new(tag, 1);
    let state = layout.base.join("state").display().to_string();
    Mount::start(
        layout,
        &[
            "--state",
            &state,
            "--fsync-groups",
            "--fsync-group-max-ms",
            max_ms,
        ],
    )
}

/// `sync FILE` (coreutils): an application's fsync of one file.
fn fsync(path: &Path) {
    let st = Command::new("sync").arg(path).status().expect("run sync");
    assert!(st.success(), "sync {}", path.display());
}

/// The status's `fsync_groups` once `ok` holds of it (the status file is rewritten every few
/// ms), or as it is after 10 s.
fn fsync_groups(m: &Mount, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_until(Duration::from_secs(10), || {
        last = m
            .status()
            .map(|s| s["fsync_groups"].clone())
            .unwrap_or_default();
        ok(&last)
    });
    last
}

#[test]
fn with_fsync_groups_the_changes_between_two_syncs_reach_the_mirror_together() {
    let mut m = mount_fsync_groups("fsync-groups", "600000");
    fs::write(m.p("first"), b"first").expect("write");
    fsync(&m.p("first"));
    assert!(reaches(&m, "first", b"first"));

    // Changes to several files and a directory, no sync yet: held back together.
    fs::write(m.p("a.txt"), b"one half").expect("write a");
    fs::create_dir(m.p("d")).expect("mkdir d");
    fs::write(m.p("d/b.txt"), b"other half").expect("write b");
    std::thread::sleep(HELD);
    for rel in ["a.txt", "d", "d/b.txt"] {
        assert!(
            fs::symlink_metadata(m.mirror().join(rel)).is_err(),
            "{rel} reached the mirror before the sync that ends its group"
        );
    }
    let f = fsync_groups(&m, |f| f["open"] == true);
    assert_eq!(f["open"], true, "{f}");
    // The implicit group is not the application's to end with `mirrorfs group end`.
    let o = group(m.mnt(), "end");
    assert!(!o.status.success(), "group end ended the implicit group");

    // A sync of any one file ends the group: everything since the last sync shows.
    fsync(&m.p("d/b.txt"));
    assert!(reaches(&m, "a.txt", b"one half"));
    m.wait_mirror_equal(Duration::from_secs(30));
    let f = fsync_groups(&m, |f| f["ended_by_sync"].as_u64() >= Some(2));
    assert_eq!(f["open"], false, "{f}");
    assert!(f["ended_by_sync"].as_u64() >= Some(2), "{f}");
    assert_eq!(f["ended_by_age"], 0, "{f}");
    m.unmount();
}

#[test]
fn with_fsync_groups_a_group_nobody_syncs_ends_at_its_age_limit() {
    let mut m = mount_fsync_groups("fsync-groups-age", "300");
    fs::write(m.p("never-synced"), b"written, never synced").expect("write");
    assert!(reaches(&m, "never-synced", b"written, never synced"));
    let f = fsync_groups(&m, |f| f["ended_by_age"].as_u64() >= Some(1));
    assert!(f["ended_by_age"].as_u64() >= Some(1), "{f}");
    assert_eq!(f["ended_by_sync"], 0, "{f}");
    m.unmount();
}

#[test]
fn with_fsync_groups_a_restart_after_kill9_ends_the_open_group() {
    let mut m = mount_fsync_groups("fsync-groups-kill9", "600000");
    fs::write(m.p("unsynced"), b"in the implicit group").expect("write");
    std::thread::sleep(HELD);
    assert!(fs::symlink_metadata(m.mirror().join("unsynced")).is_err());
    m.kill9();
    m.remount();
    assert!(reaches(&m, "unsynced", b"in the implicit group"));
    m.wait_mirror_equal(Duration::from_secs(30));
    m.unmount();
}
