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

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{pattern, sys, tail, Layout, Mount};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const WB: &str = "--writeback-cache";

/// A mount of `layout` with `--writeback-cache` and `extra`, its state kept outside BACKING
/// (so that the trees compare equal to the root's link count).
fn mount(layout: Layout, extra: &[&str]) -> Mount {
    let state = layout.base.join("state");
    let state = state.to_str().expect("UTF-8 temp path").to_string();
    let mut args: Vec<&str> = vec![WB, "--state", &state];
    args.extend_from_slice(extra);
    Mount::start(layout, &args)
}

fn stat(p: &Path) -> libc::stat {
    sys::lstat(p).unwrap_or_else(|e| panic!("lstat {}: {}", p.display(), sys::errname(e)))
}

/// `got == want`, told as lengths and the first difference (a file's bytes are too many to print).
fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: {} bytes, {} expected, first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

/// What the kernel may have sent of `want` before a close or sync: under FUSE's strict dirty
/// limit it writes pages back whenever it likes (a CI run saw 16 KiB of a 50 KB file sent at
/// once), so a file not yet closed holds some of `want`'s pages, each whole, and nothing else:
/// every 4 KiB page of `got` is `want`'s or zeros (a hole before a page sent later), and `got`
/// is no longer than `want`.
fn assert_pages_of(got: &[u8], want: &[u8], what: &str) {
    assert!(
        got.len() <= want.len(),
        "{what}: {} bytes, more than the {} written",
        got.len(),
        want.len()
    );
    for (i, page) in got.chunks(4096).enumerate() {
        let theirs = &want[i * 4096..i * 4096 + page.len()];
        assert!(
            page == theirs || page.iter().all(|&b| b == 0),
            "{what}: page {i} is neither the data written nor a hole"
        );
    }
}

fn mtime(st: &libc::stat) -> (i64, i64) {
    (st.st_mtime, st.st_mtime_nsec)
}

/// An append-only open under the writeback cache appends each byte once: the kernel appends
/// at its cached size and sends the pages back at their offsets (a page twice when it changed
/// after its first write-back), so the daemon's descriptor must not append again.
#[test]
fn append_opens_append_once() {
    let mut m = mount(Layout::new("wb-append", 1), &[]);
    let p = m.p("log");
    let mut want = Vec::new();
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .expect("open O_APPEND");
    for i in 0..6u64 {
        let rec = pattern(i, 100 + i as usize * 7);
        f.write_all(&rec).expect("append");
        want.extend_from_slice(&rec);
        if i % 2 == 1 {
            // The page goes back, then changes again and goes back again.
            f.sync_all().expect("fsync");
        }
    }
    drop(f);
    assert_bytes(&fs::read(&p).expect("read mount"), &want, "mount");
    assert_bytes(
        &fs::read(m.backing().join("log")).expect("read backing"),
        &want,
        "backing",
    );
    common::finish(&mut m);
}

/// A write-only open of a file whose pages the kernel does not hold: a partial page written
/// is read first (through the writing handle), then sent back whole.
#[test]
fn write_only_opens_can_write_part_of_a_page() {
    let layout = Layout::new("wb-wronly", 1);
    let old = pattern(1, 10_000);
    fs::write(layout.backing.join("f"), &old).expect("seed backing");
    let mut m = mount(layout, &[]);
    let p = m.p("f");
    let f = OpenOptions::new()
        .write(true)
        .open(&p)
        .expect("open O_WRONLY");
    f.write_all_at(b"hello", 5000)
        .expect("write part of a page through a write-only open");
    drop(f);
    let mut want = old;
    want[5000..5005].copy_from_slice(b"hello");
    assert_bytes(&fs::read(&p).expect("read"), &want, "mount");
    assert_bytes(
        &fs::read(m.backing().join("f")).expect("read"),
        &want,
        "backing",
    );
    common::finish(&mut m);
}

/// The model of one file the workload writes.
struct Model {
    data: Vec<u8>,
}

/// A seeded workload of writes at random offsets, appends, truncates, renames, chmod and
/// explicit times through write-only, read-write and append opens, some files kept open
/// across others' changes; at the end the mount, the backing directory and the mirror hold
/// what was written, with the same sizes and mtimes.
#[test]
fn a_workload_ends_with_mount_backing_and_mirror_equal() {
    let seed: u64 = std::env::var("MIRRORFS_WB_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("MIRRORFS_WB_SEED={seed}");
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut m = mount(Layout::new("wb-workload", 1), &[]);
    const FILES: usize = 6;
    let name = |i: usize| format!("f{i}");
    let mut models: Vec<Model> = (0..FILES).map(|_| Model { data: Vec::new() }).collect();
    for i in 0..FILES {
        File::create(m.p(name(i))).expect("create");
    }
    let mut open: Vec<Option<(File, bool)>> = (0..FILES).map(|_| None).collect();
    for step in 0..400u64 {
        let i = rng.gen_range(0..FILES);
        match rng.gen_range(0..10) {
            0..=4 => {
                if open[i].is_none() {
                    let append = rng.gen_bool(0.3);
                    let mut o = OpenOptions::new();
                    match (append, rng.gen_bool(0.5)) {
                        (true, _) => o.append(true),
                        (false, true) => o.write(true),
                        (false, false) => o.read(true).write(true),
                    };
                    open[i] = Some((o.open(m.p(name(i))).expect("open"), append));
                }
                let (f, append) = open[i].as_mut().expect("open file");
                let len = rng.gen_range(1..20_000);
                let buf = pattern(seed ^ step, len);
                let md = &mut models[i].data;
                if *append {
                    f.write_all(&buf).expect("append");
                    md.extend_from_slice(&buf);
                } else {
                    let off = rng.gen_range(0..md.len() as u64 + 8192) as usize;
                    f.write_all_at(&buf, off as u64).expect("pwrite");
                    if md.len() < off + len {
                        md.resize(off + len, 0);
                    }
                    md[off..off + len].copy_from_slice(&buf);
                }
            }
            5 => {
                if let Some((f, _)) = open[i].take() {
                    if rng.gen_bool(0.5) {
                        f.sync_data().expect("fdatasync");
                    }
                }
            }
            6 => {
                let size = rng.gen_range(0..models[i].data.len() as u64 + 4096);
                match &open[i] {
                    Some((f, false)) => f.set_len(size).expect("ftruncate"),
                    _ => sys::truncate(&m.p(name(i)), size).expect("truncate"),
                }
                models[i].data.resize(size as usize, 0);
            }
            7 => {
                // Rename over another file: the names swap places in the model.
                let j = (i + 1 + rng.gen_range(0..FILES - 1)) % FILES;
                fs::rename(m.p(name(i)), m.p(name(j))).expect("rename");
                open[j] = open[i].take();
                models.swap(i, j);
                models[i].data.clear();
                File::create(m.p(name(i))).expect("create again");
            }
            8 => {
                let mode = [0o600, 0o644, 0o640][rng.gen_range(0..3)];
                sys::chmod(&m.p(name(i)), mode).expect("chmod");
            }
            _ => {
                let t = 1_600_000_000 + rng.gen_range(0..10_000_000);
                sys::utimens(&m.p(name(i)), (t, 0), (t, 123), 0).expect("utimens");
            }
        }
    }
    drop(open);
    for (i, md) in models.iter().enumerate() {
        let (mnt, back) = (m.p(name(i)), m.backing().join(name(i)));
        assert_bytes(
            &fs::read(&mnt).expect("read mount"),
            &md.data,
            &format!("{} on the mount", name(i)),
        );
        assert_bytes(
            &fs::read(&back).expect("read backing"),
            &md.data,
            &format!("{} in backing", name(i)),
        );
        let (a, b) = (stat(&mnt), stat(&back));
        assert_eq!(a.st_size, b.st_size, "{}: size, mount vs backing", name(i));
        assert_eq!(mtime(&a), mtime(&b), "{}: mtime, mount vs backing", name(i));
    }
    common::finish(&mut m);
}

/// Data written before a close or fsync is on the mirror when the close or fsync returns under
/// `--ack sync` (so it was journaled before), and not when write(2) returns.
#[test]
fn close_and_fsync_return_after_the_data_reached_the_mirror() {
    let mut m = mount(Layout::new("wb-close", 1), &["--ack", "sync"]);
    for (k, by_fsync) in [(0u64, false), (1, true), (2, false), (3, true)] {
        let rel = format!("doc{k}");
        let data = pattern(k, 50_000 + k as usize);
        let f = File::create(m.p(&rel)).expect("create");
        f.write_all_at(&data, 0).expect("write");
        // Not asserted that nothing reached the backing yet: the kernel may write pages back
        // at any time (FUSE's strict dirty limit); only what it sent, page by page.
        assert_pages_of(
            &fs::read(m.backing().join(&rel)).expect("read backing"),
            &data,
            &format!("{rel} in backing before its close or fsync"),
        );
        if by_fsync {
            f.sync_all().expect("fsync");
        } else {
            drop(f);
        }
        assert_bytes(
            &fs::read(m.mirror().join(&rel)).expect("read mirror"),
            &data,
            &format!(
                "{rel}: not on the mirror when {} returned",
                if by_fsync { "fsync" } else { "close" }
            ),
        );
    }
    common::finish(&mut m);
}

/// Between a file's writes and its close, a later change of the same program may reach the
/// mirror first: a file renamed before it was closed is on the mirror under its new name without
/// the data, which follows at the close. And a `kill -9` of mirrorfs loses writes not yet closed
/// or synced: the kernel cannot send them to a dead daemon.
#[test]
fn data_not_closed_may_follow_later_changes_and_dies_with_the_daemon() {
    let mut m = mount(Layout::new("wb-between", 1), &["--ack", "sync"]);
    let data = pattern(7, 20_000);
    let f = File::create(m.p("a.tmp")).expect("create");
    f.write_all_at(&data, 0).expect("write");
    fs::rename(m.p("a.tmp"), m.p("a")).expect("rename before close");
    // The rename is on the mirror (--ack sync) with whatever pages the kernel had sent by then:
    // none, usually; some, when its strict dirty limit made it write back early.
    assert_pages_of(
        &fs::read(m.mirror().join("a")).expect("read mirror"),
        &data,
        "a on the mirror after the rename, before the close",
    );
    drop(f);
    assert_bytes(
        &fs::read(m.mirror().join("a")).expect("read mirror"),
        &data,
        "a on the mirror after the close",
    );
    // Written, not closed nor synced, when mirrorfs dies.
    let g = File::create(m.p("b")).expect("create b");
    g.write_all_at(&data, 0).expect("write b");
    m.kill9();
    drop(g);
    m.remount();
    m.wait_mirror_equal(Duration::from_secs(60));
    // Lost, or for the pages the kernel had already sent, kept: never anything else.
    assert_pages_of(
        &fs::read(m.p("b")).expect("read b"),
        &data,
        "b, written and never closed, after the daemon's kill -9",
    );
    assert_bytes(
        &fs::read(m.p("a")).expect("read a"),
        &data,
        "a after the remount",
    );
    common::finish(&mut m);
}

/// A version of the saved document: its number and length in a header, then its bytes.
fn version(n: u64) -> Vec<u8> {
    let len = 3000 + (n as usize * 5413) % 70_000;
    let mut v = format!("v{n:06} {len:06}\n").into_bytes();
    v.extend(pattern(n, len));
    v
}

/// Which version `data` is, if it is one whole.
fn whole_version(data: &[u8]) -> Option<u64> {
    let head = std::str::from_utf8(data.get(..15)?).ok()?;
    let n: u64 = head.get(1..7)?.parse().ok()?;
    (version(n) == data).then_some(n)
}

/// The safe-save pattern through the mount: write `doc.tmp`, close it (or fsync it), rename it
/// over `doc`. Returns the last version saved.
fn safe_saves(m: &Mount, from: u64, n: u64) -> u64 {
    for v in from..from + n {
        let tmp = m.p("doc.tmp");
        let mut f = File::create(&tmp).expect("create doc.tmp");
        f.write_all(&version(v)).expect("write doc.tmp");
        if v % 2 == 0 {
            f.sync_all().expect("fsync doc.tmp");
        }
        drop(f);
        fs::rename(&tmp, m.p("doc")).expect("rename over doc");
    }
    from + n - 1
}

/// The mirror's `doc`, read while it is being replaced: absent, or one whole version.
fn check_mirror_doc(mirror: &Path) -> Result<Option<u64>, String> {
    match fs::read(mirror.join("doc")) {
        Ok(d) => match whole_version(&d) {
            Some(v) => Ok(Some(v)),
            None => Err(format!(
                "the mirror's doc is no whole version: {} bytes, starting {:?}",
                d.len(),
                String::from_utf8_lossy(&d[..d.len().min(15)])
            )),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("read the mirror's doc: {e}")),
    }
}

#[test]
fn safe_saves_never_show_the_name_without_its_data_even_after_kill_9() {
    let mut m = mount(Layout::new("wb-save", 1), &[]);
    // A watcher reads the mirror's `doc` while the saves go on.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, mirror) = (stop.clone(), m.mirror().to_path_buf());
        std::thread::spawn(move || -> Result<u64, String> {
            let mut seen = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if check_mirror_doc(&mirror)?.is_some() {
                    seen += 1;
                }
            }
            Ok(seen)
        })
    };
    let mut last = safe_saves(&m, 0, 200);
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.join().expect("watcher");
    let seen = seen.unwrap_or_else(|e| panic!("{e}\nmirrorfs stderr:\n{}", tail(&m.log(), 40)));
    assert!(seen > 0, "the watcher never saw the mirror's doc");
    m.wait_mirror_equal(Duration::from_secs(60));
    // Crashes right after a rename returned: what the mirror shows then, and after the
    // remount has replayed the journal, is a whole version, the last one once caught up.
    for round in 0..3 {
        last = safe_saves(&m, last + 1, 5 + round);
        m.kill9();
        match check_mirror_doc(m.mirror()) {
            Ok(Some(v)) => assert!(v <= last, "the mirror shows version {v} > {last}"),
            Ok(None) => panic!("the mirror lost doc"),
            Err(e) => panic!("after kill -9: {e}"),
        }
        m.remount();
        m.wait_mirror_equal(Duration::from_secs(60));
        assert_eq!(
            check_mirror_doc(m.mirror()),
            Ok(Some(last)),
            "after the remount, the mirror's doc is not the last version renamed"
        );
        assert_eq!(
            whole_version(&fs::read(m.p("doc")).expect("read doc")),
            Some(last),
            "the mount's doc is not the last version renamed"
        );
    }
    common::finish(&mut m);
}

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
