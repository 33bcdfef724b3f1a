//! The live initial copy of a new mirror: a prefilled backing tree is copied exactly (holes,
//! hard links, symlinks, special files, xattrs, modes, owners, times), changes made through the
//! mount while it runs end up on the mirror too, and a restart resumes from the mirror's cursor
//! without copying again.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::sys;
use common::{data_extents, finish, mkdir755, pattern, wait_until, Layout, Mount};

const MIB: u64 = 1 << 20;
const CATCH_UP: Duration = Duration::from_secs(120);

/// One mount at a time in this test process (see `semantics.rs`).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Mounts `layout` with its state directory outside the backing directory.
fn mount(layout: Layout, extra: &[&str]) -> Mount {
    let state = layout.base.join("state");
    let state = state.to_str().expect("UTF-8 temp path").to_string();
    let mut args: Vec<&str> = vec!["--state", &state];
    args.extend_from_slice(extra);
    Mount::start(layout, &args)
}

fn state_of(m: &Mount) -> Option<String> {
    m.status()
        .and_then(|s| s["mirrors"][0]["state"].as_str().map(str::to_string))
}

fn wait_live(m: &Mount) {
    let ok = wait_until(CATCH_UP, || state_of(m).as_deref() == Some("live"));
    assert!(ok, "the mirror never became live; stderr:\n{}", m.log());
}

fn write_at(p: &Path, data: &[u8], off: u64) {
    let f = sys::open(p, libc::O_CREAT | libc::O_WRONLY, 0o644)
        .unwrap_or_else(|e| panic!("open {}: {}", p.display(), sys::errname(e)));
    let n = sys::pwrite(&f, data, off).expect("pwrite");
    assert_eq!(n, data.len());
}

/// A backing tree with a bit of everything.
fn prefill(b: &Path) {
    let p = |n: &str| b.join(n);
    for d in ["a/b/c/d", "empty", "sticky", "setgid", "links/x", "links/y"] {
        mkdir755(&p(d));
    }
    // Regular files, one of 64 MiB.
    fs::write(p("a/small"), b"small file").expect("write");
    fs::write(p("a/b/empty-file"), b"").expect("write");
    let big = File::create(p("a/b/c/big")).expect("create big");
    let chunk = pattern(64, MIB as usize);
    for i in 0..64u64 {
        sys::pwrite(&big, &chunk, i * MIB).expect("pwrite big");
    }
    drop(big);
    // A sparse file: 200 MiB with 3 small data extents.
    let sp = p("a/b/c/d/sparse");
    write_at(&sp, &pattern(1, 8192), 0);
    write_at(&sp, &pattern(2, 4096), 10 * MIB);
    write_at(&sp, &pattern(3, 65536), 100 * MIB);
    sys::truncate(&sp, 200 * MIB).expect("truncate sparse");
    // Hard links across directories.
    fs::write(p("links/x/one"), b"shared content").expect("write");
    sys::link(&p("links/x/one"), &p("links/y/two")).expect("link");
    sys::link(&p("links/x/one"), &p("three")).expect("link");
    // Symlinks: relative, absolute, dangling, to a directory.
    sys::symlink(b"../a/small", &p("links/rel")).expect("symlink");
    sys::symlink(b"/etc/hostname", &p("links/abs")).expect("symlink");
    sys::symlink(b"no/such/target", &p("links/dangling")).expect("symlink");
    sys::symlink(b"a/b", &p("dirlink")).expect("symlink");
    // Special files.
    sys::mknod(&p("fifo"), libc::S_IFIFO | 0o640, 0).expect("mkfifo");
    sys::mknod(&p("chr"), libc::S_IFCHR | 0o600, libc::makedev(1, 3)).expect("mknod");
    // Odd modes and owners.
    fs::write(p("setuid"), b"#!/bin/true\n").expect("write");
    sys::chmod(&p("setuid"), 0o4751).expect("chmod");
    fs::write(p("nomode"), b"unreadable").expect("write");
    sys::chmod(&p("nomode"), 0).expect("chmod");
    sys::chmod(&p("sticky"), 0o1777).expect("chmod");
    sys::lchown(&p("setgid"), 42, 4242).expect("chown");
    sys::chmod(&p("setgid"), 0o2770).expect("chmod");
    sys::lchown(&p("a/small"), 1234, 5678).expect("chown");
    sys::lchown(&p("links/dangling"), 7, 8).expect("lchown symlink");
    // xattrs.
    sys::lsetxattr(&p("a/small"), "user.color", b"blue", 0).expect("xattr");
    sys::lsetxattr(&p("a/small"), "user.empty", b"", 0).expect("xattr");
    sys::lsetxattr(&p("a/b"), "user.dir", b"on a dir", 0).expect("xattr");
    sys::lsetxattr(&p("links/rel"), "security.lnk", b"on a symlink", 0).expect("xattr");
    sys::lsetxattr(&p("a/b/c/big"), "user.big", &pattern(5, 2000), 0).expect("xattr");
    // Names: 255 bytes and not UTF-8.
    fs::write(b.join(std::ffi::OsStr::from_bytes(&[b'n'; 255])), b"long").expect("write");
    fs::write(
        b.join(std::ffi::OsStr::from_bytes(b"caf\xe9\xff")),
        b"latin-1",
    )
    .expect("write");
    // Old times, set last (directories included).
    for (n, t) in [
        ("a/small", 1_000_000_000),
        ("a/b/c/big", 1_100_000_000),
        ("links/x/one", 1_200_000_000),
        ("fifo", 1_300_000_000),
        ("a/b/c/d", 1_400_000_000),
        ("a", 1_500_000_000),
    ] {
        sys::utimens(&p(n), (t, 0), (t, 123_456_789), 0).expect("utimens");
    }
    sys::utimens(
        &p("links/abs"),
        (1, 0),
        (1_600_000_000, 5),
        libc::AT_SYMLINK_NOFOLLOW,
    )
    .expect("utimens symlink");
}

#[test]
fn prefilled_tree_is_copied_exactly() {
    let _serial = serial();
    let l = Layout::new("isync-full", 1);
    prefill(&l.backing);
    let mut m = mount(l, &[]);
    wait_live(&m);
    // Full comparison: types, content, modes, owners, mtimes, links, xattrs, rdev, holes.
    m.wait_mirror_equal(CATCH_UP);
    let sparse = |root: &Path| {
        let p = root.join("a/b/c/d/sparse");
        let f = File::open(&p).expect("open sparse");
        let md = f.metadata().expect("stat sparse");
        (md.len(), md.blocks(), data_extents(&f, md.len()))
    };
    let (bs, bb, be) = sparse(m.backing());
    let (ms, mb, me) = sparse(m.mirror());
    assert_eq!(ms, bs, "sparse file size");
    assert_eq!(me, be, "data extents of the sparse file");
    assert!(
        mb <= bb + 64 && mb * 512 < 2 * MIB,
        "holes not kept: mirror uses {mb} sectors, backing {bb}"
    );
    let big = fs::metadata(m.mirror().join("a/b/c/big")).expect("big");
    assert_eq!(big.len(), 64 * MIB);
    assert!(
        big.blocks() * 512 >= 64 * MIB,
        "the 64 MiB file is all data"
    );
    let one = fs::metadata(m.mirror().join("links/x/one")).expect("one");
    assert_eq!(one.nlink(), 3, "hard links on the mirror");
    assert_eq!(
        one.ino(),
        fs::metadata(m.mirror().join("three")).expect("three").ino()
    );
    finish(&mut m);
}

/// Everything the writer did, for the final check.
#[derive(Default)]
struct Done {
    ops: usize,
    while_syncing: usize,
}

#[test]
fn changes_during_the_initial_sync_reach_the_mirror() {
    let _serial = serial();
    let l = Layout::new("isync-live", 1);
    // Enough data that the copy takes a while: 12 x 12 MiB in 4 directories, plus small files.
    for d in 0..4 {
        let dir = l.backing.join(format!("d{d}"));
        mkdir755(&dir);
        for f in 0..3 {
            let p = dir.join(format!("big{f}"));
            let file = File::create(&p).expect("create");
            let chunk = pattern((d * 10 + f) as u64, MIB as usize);
            for i in 0..12u64 {
                sys::pwrite(&file, &chunk, i * MIB).expect("pwrite");
            }
        }
        for f in 0..100 {
            fs::write(dir.join(format!("small{f}")), format!("small {d}/{f}\n")).expect("write");
        }
    }
    let m = mount(l, &[]);
    let first = state_of(&m);
    let mut done = Done::default();
    let mut live = false;
    let mut step = 0usize;
    let mp = |n: String| -> PathBuf { m.p(n) };
    // Keep changing the tree until the mirror is live, and a few rounds more.
    let mut rounds_after_live = 0;
    while rounds_after_live < 3 {
        let d = step % 4;
        match step % 8 {
            0 => write_at(
                &mp(format!("d{d}/big{}", step % 3)),
                &pattern(1000 + step as u64, 100_000),
                (step as u64 * 777_777) % (12 * MIB),
            ),
            1 => {
                let p = mp(format!("d{d}/small{}", step % 100));
                if p.exists() {
                    let f = sys::open(&p, libc::O_WRONLY | libc::O_APPEND, 0).expect("append");
                    sys::write_all(&f, format!("appended {step}\n").as_bytes()).expect("write");
                }
            }
            2 => {
                let from = mp(format!("d{d}/small{}", (step * 7) % 100));
                if from.exists() {
                    sys::rename2(&from, &mp(format!("d{}/moved{step}", (d + 1) % 4)), 0)
                        .expect("rename");
                }
            }
            3 => {
                let p = mp(format!("d{d}/small{}", (step * 13) % 100));
                if p.exists() {
                    sys::unlink(&p).expect("unlink");
                }
            }
            4 => fs::write(mp(format!("d{d}/new{step}")), pattern(step as u64, 5000))
                .expect("create"),
            5 => {
                let p = mp(format!("d{d}/big{}", step % 3));
                sys::truncate(&p, 6 * MIB + step as u64).expect("truncate");
            }
            6 => {
                // Rename a whole directory, files not yet copied included.
                let from = mp(format!("d{d}"));
                let tmp = mp(format!("d{d}-renamed"));
                sys::rename2(&from, &tmp, 0).expect("rename dir");
                sys::rename2(&tmp, &from, 0).expect("rename dir back");
                sys::rename2(
                    &mp(format!("d{d}/big{}", step % 3)),
                    &mp(format!("d{d}/tmpbig")),
                    0,
                )
                .expect("rename big");
                sys::rename2(
                    &mp(format!("d{d}/tmpbig")),
                    &mp(format!("d{d}/big{}", step % 3)),
                    0,
                )
                .expect("rename big back");
            }
            _ => {
                sys::chmod(
                    &mp(format!("d{d}/big{}", step % 3)),
                    0o600 + (step as u32 % 8),
                )
                .expect("chmod");
            }
        }
        done.ops += 1;
        if !live {
            done.while_syncing += 1;
        }
        step += 1;
        if step.is_multiple_of(16) {
            if live {
                rounds_after_live += 1;
            } else {
                live = state_of(&m).as_deref() == Some("live");
            }
        }
        assert!(
            step < 200_000,
            "the initial sync never finished:\n{}",
            m.log()
        );
    }
    assert_eq!(
        first.as_deref(),
        Some("syncing"),
        "the mirror was not syncing when the changes started"
    );
    assert!(
        done.while_syncing > 0 && done.ops > done.while_syncing,
        "ops: {} total, {} during the sync",
        done.ops,
        done.while_syncing
    );
    eprintln!(
        "{} changes, {} of them before the mirror was seen live",
        done.ops, done.while_syncing
    );
    m.wait_mirror_equal(CATCH_UP);
    let mut m = m;
    finish(&mut m);
}

/// (inode, size, mtime) of every regular file below `root`, by relative path.
fn file_inodes(root: &Path) -> BTreeMap<PathBuf, (u64, u64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).expect("readdir") {
            let e = e.expect("entry");
            let md = fs::symlink_metadata(e.path()).expect("lstat");
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                let rel = e.path().strip_prefix(root).expect("prefix").to_path_buf();
                out.insert(rel, (md.ino(), md.size(), md.mtime()));
            }
        }
    }
    out
}

#[test]
fn restart_resumes_without_copying_again() {
    let _serial = serial();
    let l = Layout::new("isync-restart", 1);
    prefill(&l.backing);
    let mut m = mount(l, &[]);
    wait_live(&m);
    fs::write(m.p("a/changed"), b"before restart").expect("write");
    m.wait_mirror_equal(CATCH_UP);
    m.unmount();
    let before = file_inodes(m.mirror());
    assert!(before.len() > 10);
    let log_before = m.log();
    assert!(
        log_before.contains("namespace copied"),
        "first start did an initial sync"
    );

    m.remount();
    // Live at once: no initial sync on the second start.
    wait_live(&m);
    fs::write(m.p("a/changed"), b"after restart").expect("write");
    fs::write(m.p("new-after-restart"), b"new").expect("write");
    m.wait_mirror_equal(CATCH_UP);
    let second = m.log()[log_before.len()..].to_string();
    assert!(
        !second.contains("namespace copied") && !second.contains("initial sync"),
        "the restart copied the mirror again:\n{second}"
    );
    // Files not changed since keep their inode numbers (and mtimes) on the mirror: they were
    // not copied again.
    let after = file_inodes(m.mirror());
    let mut kept = 0;
    for (p, v) in &before {
        if p == Path::new("a/changed") {
            continue;
        }
        assert_eq!(
            after.get(p),
            Some(v),
            "{} was re-created on the mirror",
            p.display()
        );
        kept += 1;
    }
    assert!(kept >= 10, "only {kept} files compared");
    assert_eq!(
        fs::read(m.mirror().join("a/changed")).expect("changed"),
        b"after restart"
    );
    finish(&mut m);
}

/// Issue 6, finding 3: a local mirror directory moved away and replaced by an empty one (a
/// backup disk that did not mount) is not live after a remount: `refused`, with the reason, and
/// nothing is copied to it; the operator's `--force-resync` copies it again.
#[test]
fn a_swapped_mirror_disk_is_not_live_and_is_not_copied_unless_asked() {
    let _g = serial();
    let mut m = mount(Layout::new("swapped-disk", 1), &[]);
    fs::write(m.p("kept.txt"), b"on the real mirror disk\n").expect("write");
    m.wait_mirror_equal(CATCH_UP);
    m.unmount();
    let mirror = m.mirror().to_path_buf();
    let away = m.layout.base.join("mirror0-real-disk");
    fs::rename(&mirror, &away).expect("move the mirror away");
    mkdir755(&mirror);
    m.remount();
    let mut last = None;
    let refused = wait_until(Duration::from_secs(20), || {
        last = m.status().map(|s| s["mirrors"][0].clone());
        last.as_ref().is_some_and(|r| r["state"] == "refused")
    });
    assert!(
        refused,
        "the empty stand-in was taken as the mirror: {last:?}\n{}",
        m.log()
    );
    let reason = last
        .as_ref()
        .and_then(|r| r["reason"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("identity mark") && reason.contains("--force-resync"),
        "{reason}"
    );
    fs::write(m.p("later.txt"), b"written while the disk is missing\n").expect("write");
    std::thread::sleep(Duration::from_secs(3));
    let copied: Vec<_> = fs::read_dir(&mirror)
        .expect("read the stand-in")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(copied.is_empty(), "copied to the stand-in: {copied:?}");
    assert_eq!(
        m.status().map(|s| s["mirrors"][0]["state"].clone()),
        Some(serde_json::json!("refused"))
    );
    m.unmount();
    // Asked for: a fresh copy.
    m.extra.push("--force-resync".into());
    m.remount();
    m.wait_mirror_equal(CATCH_UP);
    assert!(wait_until(Duration::from_secs(20), || state_of(&m)
        .as_deref()
        == Some("live")));
    finish(&mut m);
}
