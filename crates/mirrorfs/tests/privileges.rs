//! Set-user-ID, set-group-ID and file capabilities after a change by an unprivileged user, at
//! the mount and at the mirror.
//!
//! A file's set-user-ID bit that survives a write by another user is a privilege escalation.
//! Today the kernel clears the bits itself (a `SETATTR` of the mode, a `REMOVEXATTR` of
//! `security.capability`), and mirrorfs journals them like any change. Taking
//! `FUSE_HANDLE_KILLPRIV_V2` would move that duty to mirrorfs (`docs/benchmarks.md`, "FUSE_HANDLE_
//! KILLPRIV_V2 with fuser 0.18: the cases, and why it stays off"): these tests are the guard for
//! either way. pjdfstest does not check it (its suites pass with the flag taken and the bits
//! left in place).

mod common;

use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::sys;
use common::{finish, Layout, Mount};

const CATCH_UP: Duration = Duration::from_secs(60);
/// The unprivileged user the changes are made as (`nobody`, present everywhere).
const NOBODY: u32 = 65534;
const HELPER_DIR: &str = "MIRRORFS_PRIV_DIR";
const HELPER_CASES: &str = "MIRRORFS_PRIV_CASES";

/// The changes that must clear the bits when made without `CAP_FSETID`.
const CHANGES: &[&str] = &["write", "truncate", "ftruncate", "open-trunc", "fallocate"];

fn mount(tag: &str) -> Mount {
    let layout = Layout::new(tag, 1);
    let state = layout.base.join("state");
    let state = state.to_str().expect("UTF-8 temp path").to_string();
    Mount::start(layout, &["--state", &state])
}

/// Makes `CHANGE.MODE` beneath `dir` for each change and mode, 8 KiB, owned by `uid`.
fn make_files(dir: &Path, modes: &[u32], uid: u32) -> Vec<String> {
    let mut names = Vec::new();
    for change in CHANGES {
        for mode in modes {
            let name = format!("{change}.{mode:o}");
            let p = dir.join(&name);
            fs::write(&p, vec![7u8; 8192]).expect("write the file");
            sys::lchown(&p, uid, uid).expect("chown the file");
            sys::chmod(&p, *mode).expect("chmod the file");
            let got = fs::metadata(&p).expect("stat").mode() & 0o7777;
            assert_eq!(got, *mode, "{name}: mode after chmod through the mount");
            names.push(name);
        }
    }
    names
}

/// The change a file's name asks for, made by whoever runs this.
fn change(p: &Path) {
    let name = p.file_name().and_then(|n| n.to_str()).expect("name");
    let (what, _) = name.split_once('.').expect("CHANGE.MODE");
    let wr = || sys::open(p, libc::O_WRONLY, 0).expect("open for writing");
    match what {
        "write" => {
            sys::pwrite(&wr(), &[1u8; 4096], 0).expect("pwrite");
        }
        "truncate" => sys::truncate(p, 100).expect("truncate"),
        "ftruncate" => sys::ftruncate(&wr(), 50).expect("ftruncate"),
        "open-trunc" => drop(sys::open(p, libc::O_WRONLY | libc::O_TRUNC, 0).expect("O_TRUNC")),
        "fallocate" => sys::fallocate(&wr(), 0, 0, 65536).expect("fallocate"),
        other => panic!("unknown change {other}"),
    }
}

/// Runs [`privileges_helper`] as `nobody` on `names` beneath `dir`.
fn change_as_nobody(dir: &Path, names: &[String]) {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--ignored",
            "--exact",
            "privileges_helper",
            "--test-threads=1",
        ])
        .env(HELPER_DIR, dir)
        .env(HELPER_CASES, names.join("/"))
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .output()
        .expect("run the helper as nobody");
    assert!(
        out.status.success(),
        "the changes as nobody failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The changes of an unprivileged user (run as `nobody` by the tests below).
#[test]
#[ignore = "helper: run as user nobody by the tests of this file"]
fn privileges_helper() {
    let (Ok(dir), Ok(cases)) = (std::env::var(HELPER_DIR), std::env::var(HELPER_CASES)) else {
        return;
    };
    let dir = PathBuf::from(dir);
    assert_ne!(
        unsafe { libc::geteuid() },
        0,
        "the helper must not run as root"
    );
    for name in cases.split('/') {
        change(&dir.join(name));
    }
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .mode()
        & 0o7777
}

/// A world-writable directory on the mount for the unprivileged user's files.
fn open_dir(m: &Mount) -> PathBuf {
    let w = m.p("w");
    fs::create_dir(&w).expect("mkdir w");
    fs::set_permissions(&w, fs::Permissions::from_mode(0o777)).expect("chmod 0777 w");
    w
}

/// Asserts every file's mode is `expect(its mode before)` at the mount, the backing directory
/// and, once it caught up, the mirror.
fn assert_modes(m: &Mount, names: &[String], expect: impl Fn(u32) -> u32) {
    m.wait_mirror_equal(CATCH_UP);
    let mut wrong = Vec::new();
    for name in names {
        let before = u32::from_str_radix(name.split_once('.').expect("CHANGE.MODE").1, 8)
            .expect("octal mode in the name");
        let want = expect(before);
        for (place, root) in [
            ("mount", m.mnt()),
            ("backing", m.backing()),
            ("mirror", m.mirror()),
        ] {
            let got = mode_of(&root.join("w").join(name));
            if got != want {
                wrong.push(format!("{name} at the {place}: {got:o}, want {want:o}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "modes:\n{}\nmirrorfs stderr:\n{}",
        wrong.join("\n"),
        m.log()
    );
}

/// The kernel's rule for FUSE (`fuse_setattr`, and what a server taking
/// `FUSE_HANDLE_KILLPRIV_V2` must do): set-user-ID always goes, set-group-ID only with group
/// execute (without it, it is a mandatory-locking mark).
fn killed(mode: u32) -> u32 {
    let mut m = mode & !0o4000;
    if m & 0o2010 == 0o2010 {
        m &= !0o2000;
    }
    m
}

#[test]
fn an_unprivileged_change_clears_set_id_bits_at_the_mount_and_the_mirror() {
    let mut m = mount("priv-kill");
    let w = open_dir(&m);
    let names = make_files(&w, &[0o4755, 0o2775, 0o6775], NOBODY);
    change_as_nobody(&w, &names);
    assert_modes(&m, &names, killed);
    finish(&mut m);
}

#[test]
fn root_changes_keep_set_id_bits_at_the_mount_and_the_mirror() {
    let mut m = mount("priv-root");
    let w = open_dir(&m);
    let names = make_files(&w, &[0o4755, 0o2775], NOBODY);
    for name in &names {
        change(&w.join(name));
    }
    assert_modes(&m, &names, |mode| mode);
    finish(&mut m);
}

/// A `security.capability` of version 2 granting `CAP_NET_RAW` permitted and effective.
fn capability() -> Vec<u8> {
    const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
    const VFS_CAP_FLAGS_EFFECTIVE: u32 = 1;
    const CAP_NET_RAW: u32 = 13;
    let words = [
        VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE,
        1 << CAP_NET_RAW,
        0,
        0,
        0,
    ];
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[test]
fn an_unprivileged_write_removes_file_capabilities_at_the_mount_and_the_mirror() {
    let mut m = mount("priv-cap");
    let w = open_dir(&m);
    let names = make_files(&w, &[0o755], NOBODY);
    let cap = capability();
    for name in &names {
        let p = w.join(name);
        sys::lsetxattr(&p, "security.capability", &cap, 0).expect("set security.capability");
    }
    m.wait_mirror_equal(CATCH_UP);
    for name in &names {
        let on_mirror = sys::lgetxattr(&m.mirror().join("w").join(name), b"security.capability");
        assert_eq!(
            on_mirror,
            Ok(cap.clone()),
            "{name}: capability on the mirror before"
        );
    }
    change_as_nobody(&w, &names);
    m.wait_mirror_equal(CATCH_UP);
    let mut left = Vec::new();
    for name in &names {
        for (place, root) in [
            ("mount", m.mnt()),
            ("backing", m.backing()),
            ("mirror", m.mirror()),
        ] {
            let got = sys::lgetxattr(&root.join("w").join(name), b"security.capability");
            if got != Err(libc::ENODATA) {
                left.push(format!("{name} at the {place}: {got:?}"));
            }
        }
    }
    assert!(
        left.is_empty(),
        "security.capability left after a change by nobody:\n{}",
        left.join("\n")
    );
    // The content changed as asked (the helper's changes did happen).
    let f = File::open(w.join("write.755")).expect("open");
    let mut b = [0u8; 1];
    sys::pread(&f, &mut b, 0).expect("pread");
    assert_eq!(b[0], 1, "the write by nobody landed");
    drop(f);
    finish(&mut m);
}
