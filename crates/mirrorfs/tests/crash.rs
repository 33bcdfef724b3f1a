//! kill -9 under load: a real mount is killed repeatedly while writer threads change files, then
//! remounted on the same state directory; after every crash the backing tree, the mirrors and
//! every fsynced file are checked.
//!
//! Each writer thread owns a subtree `tN` and replays every acknowledged change on a plain
//! "shadow" directory, so after a crash the backing subtree must equal the shadow, or the shadow
//! plus the one change that was in flight when mirrorfs died (it may or may not have happened, and
//! recovery may re-apply it). Mirrors must then become equal to the backing directory without a
//! re-copy, and every file whose last change was followed by an acknowledged `fsync` must hold
//! exactly the fsynced content on the backing directory and on every mirror (on the mirrors
//! already at the moment of the kill).
//!
//! `MIRRORFS_CRASH_CYCLES` (default 8) sets the number of kill/remount cycles per test and
//! `MIRRORFS_CRASH_SEED` replays a run (every test prints its seed).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{sys, tail, tree_diff, wait_until, Cmp, Layout, Mount};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Names a writer works with, relative to its subtree (depth ≤ 2).
const NAMES: &[&str] = &["a", "b", "c", "d", "c/a", "c/b", "d/a", "d/b"];
/// Symlink targets: always dangling, so no operation ever follows a symlink somewhere else.
const TARGETS: &[&str] = &["nowhere", "../missing/x", "zz/top"];
const WRITERS: usize = 3;
/// How long to wait for a mirror to catch up (generous: CI machines can be slow).
const CATCH_UP: Duration = Duration::from_secs(120);

fn cycles() -> usize {
    std::env::var("MIRRORFS_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

fn seed(test: &str) -> u64 {
    let s = std::env::var("MIRRORFS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: seed {s} (replay with MIRRORFS_CRASH_SEED={s})");
    s
}

// ---------------------------------------------------------------------------------------------
// Operations

#[derive(Debug, Clone)]
enum Op {
    /// open(O_CREAT|O_EXCL|O_WRONLY, mode)
    Create(usize, u32),
    /// open(O_WRONLY) + pwrite
    Write {
        p: usize,
        off: u64,
        len: usize,
        seed: u64,
    },
    /// open(O_WRONLY|O_APPEND) + write
    Append {
        p: usize,
        len: usize,
        seed: u64,
    },
    /// open(O_WRONLY) + ftruncate
    Truncate(usize, u64),
    Rename(usize, usize, u32),
    Unlink(usize),
    Mkdir(usize),
    Rmdir(usize),
    Link(usize, usize),
    Chmod(usize, u32),
    Symlink(usize, usize),
    /// open(O_WRONLY) + optional pwrite + fsync
    Fsync {
        p: usize,
        write: Option<(u64, usize, u64)>,
    },
}

impl Op {
    fn gen(rng: &mut SmallRng) -> Op {
        let p = |rng: &mut SmallRng| rng.gen_range(0..NAMES.len());
        let w = rng.gen_range(0..34);
        match w {
            0..=3 => Op::Create(p(rng), [0o644, 0o600, 0o755][rng.gen_range(0..3)]),
            4..=10 => Op::Write {
                p: p(rng),
                off: rng.gen_range(0..256 << 10),
                len: rng.gen_range(1..64 << 10),
                seed: rng.gen(),
            },
            11..=13 => Op::Append {
                p: p(rng),
                len: rng.gen_range(1..16 << 10),
                seed: rng.gen(),
            },
            14..=15 => Op::Truncate(p(rng), rng.gen_range(0..300 << 10)),
            16..=18 => {
                let flags = match rng.gen_range(0..6) {
                    0 => libc::RENAME_NOREPLACE,
                    1 => libc::RENAME_EXCHANGE,
                    _ => 0,
                };
                Op::Rename(p(rng), p(rng), flags)
            }
            19..=20 => Op::Unlink(p(rng)),
            21..=23 => Op::Mkdir(rng.gen_range(2..4)),
            24 => Op::Rmdir(p(rng)),
            25..=26 => Op::Link(p(rng), p(rng)),
            27 => Op::Chmod(p(rng), [0o644, 0o600, 0o755, 0o700][rng.gen_range(0..4)]),
            28 => Op::Symlink(p(rng), rng.gen_range(0..TARGETS.len())),
            _ => Op::Fsync {
                p: p(rng),
                write: rng.gen_bool(0.7).then(|| {
                    (
                        rng.gen_range(0..128 << 10),
                        rng.gen_range(1..32 << 10),
                        rng.gen(),
                    )
                }),
            },
        }
    }

    /// The data part of a write: (name, offset or `None` for an append, bytes).
    fn write_part(&self) -> Option<(usize, Option<u64>, Vec<u8>)> {
        match *self {
            Op::Write { p, off, len, seed } => Some((p, Some(off), common::pattern(seed, len))),
            Op::Append { p, len, seed } => Some((p, None, common::pattern(seed, len))),
            Op::Fsync {
                p,
                write: Some((off, len, seed)),
            } => Some((p, Some(off), common::pattern(seed, len))),
            _ => None,
        }
    }

    fn is_short(&self, got: &Result<u64, i32>) -> bool {
        match (self.write_part(), got) {
            (Some((_, _, data)), Ok(n)) => (*n as usize) < data.len(),
            _ => false,
        }
    }

    /// Replays this operation, which was in flight at a crash, on the shadow subtree `shadow` so
    /// that it matches what recovery made of it in `backing`: a write may have reached the
    /// backing file in part (a prefix of its bytes, one FUSE request after another), other
    /// operations entirely. Returns what was replayed.
    fn replay_inflight(&self, shadow: &Path, backing: &Path) -> String {
        let Some((p, off, data)) = self.write_part() else {
            return format!("{:?}", self.run(shadow));
        };
        let sp = shadow.join(NAMES[p]);
        let regular = sys::lstat(&sp).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
        if !regular {
            return "nothing (not a regular file)".into();
        }
        let old = std::fs::read(&sp).expect("read shadow file");
        let off = off.unwrap_or(old.len() as u64) as usize;
        let b = std::fs::read(backing.join(NAMES[p])).unwrap_or_default();
        let k = if b.len() > old.len() {
            (b.len().saturating_sub(off)).min(data.len())
        } else {
            let avail = b.len().saturating_sub(off).min(data.len());
            (0..avail)
                .position(|i| b[off + i] != data[i])
                .unwrap_or(avail)
        };
        if k > 0 {
            let f = sys::open(&sp, libc::O_WRONLY, 0).expect("open shadow file");
            sys::pwrite(&f, &data[..k], off as u64).expect("write shadow file");
        }
        format!("{k} of {} bytes at offset {off}", data.len())
    }

    /// The names this operation may change (for invalidating fsync records).
    fn touches(&self) -> Vec<usize> {
        match *self {
            Op::Create(p, _)
            | Op::Write { p, .. }
            | Op::Append { p, .. }
            | Op::Truncate(p, _)
            | Op::Unlink(p)
            | Op::Mkdir(p)
            | Op::Rmdir(p)
            | Op::Chmod(p, _)
            | Op::Symlink(p, _)
            | Op::Fsync { p, .. } => vec![p],
            Op::Rename(a, b, _) | Op::Link(a, b) => vec![a, b],
        }
    }

    /// Runs the operation in the subtree `r`; the result is what the caller saw.
    fn run(&self, r: &Path) -> Result<u64, i32> {
        let at = |i: usize| r.join(NAMES[i]);
        let wr = libc::O_WRONLY | libc::O_NOFOLLOW;
        match *self {
            Op::Create(p, mode) => {
                sys::open(&at(p), libc::O_CREAT | libc::O_EXCL | wr, mode).map(|_| 0)
            }
            Op::Write { p, off, len, seed } => {
                let f = sys::open(&at(p), wr, 0)?;
                sys::pwrite(&f, &common::pattern(seed, len), off).map(|n| n as u64)
            }
            Op::Append { p, len, seed } => {
                let f = sys::open(&at(p), wr | libc::O_APPEND, 0)?;
                sys::write(&f, &common::pattern(seed, len)).map(|n| n as u64)
            }
            Op::Truncate(p, size) => {
                let f = sys::open(&at(p), wr, 0)?;
                sys::ftruncate(&f, size).map(|_| 0)
            }
            Op::Rename(a, b, flags) => sys::rename2(&at(a), &at(b), flags).map(|_| 0),
            Op::Unlink(p) => sys::unlink(&at(p)).map(|_| 0),
            Op::Mkdir(p) => sys::mkdir(&at(p), 0o755).map(|_| 0),
            Op::Rmdir(p) => sys::rmdir(&at(p)).map(|_| 0),
            Op::Link(a, b) => sys::link(&at(a), &at(b)).map(|_| 0),
            Op::Chmod(p, mode) => sys::chmod(&at(p), mode).map(|_| 0),
            Op::Symlink(p, t) => sys::symlink(TARGETS[t].as_bytes(), &at(p)).map(|_| 0),
            Op::Fsync { p, write } => {
                let f = sys::open(&at(p), wr, 0)?;
                let mut n = 0;
                if let Some((off, len, seed)) = write {
                    n = sys::pwrite(&f, &common::pattern(seed, len), off)? as u64;
                }
                sys::fsync(&f).map(|_| n)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writers

/// A file whose content was made durable by an acknowledged fsync and not changed since.
#[derive(Debug, Clone)]
struct Synced {
    name: usize,
    ino: u64,
    content: Vec<u8>,
    cycle: usize,
}

struct Writer {
    id: usize,
    rng: SmallRng,
    /// `MNT/tN`
    mnt: PathBuf,
    /// `SHADOW/tN`: every acknowledged change, replayed on a plain directory.
    shadow: PathBuf,
    /// `MIRROR/tN` for every mirror.
    mirrors: Vec<PathBuf>,
    sync_ack: bool,
    cycle: usize,
    /// The change that was in flight when mirrorfs was killed.
    inflight: Option<Op>,
    /// The last change acknowledged before the kill.
    last_acked: Option<Op>,
    synced: Vec<Synced>,
    errors: Vec<String>,
    ops: u64,
    acked: u64,
    fsyncs: u64,
    /// Recent operations, for failure messages.
    history: Vec<String>,
}

struct Ctl {
    killed: AtomicBool,
    stop: AtomicBool,
    /// Acknowledged changes of the current cycle, over all writers.
    acked: AtomicU64,
}

fn ino_of(p: &Path) -> Option<u64> {
    sys::lstat(p).ok().map(|st| st.st_ino)
}

impl Writer {
    fn note(&mut self, s: String) {
        if self.history.len() >= 40 {
            self.history.remove(0);
        }
        self.history.push(s);
    }

    /// Forgets fsync records of anything `op` may change (names, names below them, other links
    /// of the same inodes).
    fn invalidate(&mut self, op: &Op) {
        for t in op.touches() {
            let tn = NAMES[t];
            let ino = ino_of(&self.shadow.join(tn));
            self.synced.retain(|s| {
                let n = NAMES[s.name];
                !(n == tn || n.starts_with(&format!("{tn}/")) || Some(s.ino) == ino)
            });
        }
    }

    fn fail(&mut self, msg: String) {
        self.errors.push(format!(
            "writer {} (cycle {}): {msg}\nlast operations:\n  {}",
            self.id,
            self.cycle,
            self.history.join("\n  ")
        ));
    }

    fn run(&mut self, ctl: &Ctl) {
        while !ctl.stop.load(Ordering::Acquire) {
            let op = Op::gen(&mut self.rng);
            self.invalidate(&op);
            self.ops += 1;
            let got = op.run(&self.mnt);
            let killed = ctl.killed.load(Ordering::Acquire);
            // At the kill a change may fail, or a write may come back short (the kernel can
            // split one write(2) into several FUSE requests): either way it is in flight.
            if killed && (got.is_err() || op.is_short(&got)) {
                self.note(format!("{op:?} -> {got:?} (in flight at the kill)"));
                self.inflight = Some(op);
                return;
            }
            let want = op.run(&self.shadow);
            self.note(format!("{op:?} -> {got:?}"));
            if got != want {
                self.fail(format!(
                    "{op:?} returned {got:?} through the mount but {want:?} on a plain directory"
                ));
                return;
            }
            if got.is_err() {
                continue;
            }
            self.acked += 1;
            self.last_acked = Some(op.clone());
            ctl.acked.fetch_add(1, Ordering::Relaxed);
            if let Op::Fsync { p, .. } = op {
                self.fsyncs += 1;
                let sp = self.shadow.join(NAMES[p]);
                let content = std::fs::read(&sp).expect("read shadow file");
                // fsync returns once every healthy mirror applied and checkpointed the file.
                if !killed {
                    for m in self.mirrors.clone() {
                        let mc = std::fs::read(m.join(NAMES[p]));
                        if mc.as_ref().ok() != Some(&content) {
                            self.fail(format!(
                                "fsync of {} returned but mirror {} has {} (want {} bytes)",
                                NAMES[p],
                                m.display(),
                                describe(&mc),
                                content.len()
                            ));
                            return;
                        }
                    }
                }
                self.synced.push(Synced {
                    name: p,
                    ino: ino_of(&sp).expect("shadow inode"),
                    content,
                    cycle: self.cycle,
                });
            }
            // --ack sync: an acknowledged change is on every healthy mirror.
            if self.sync_ack && !killed {
                for m in self.mirrors.clone() {
                    let d = tree_diff(&self.shadow, &m, &Cmp::NO_TIMES);
                    if !d.is_empty() {
                        self.fail(format!(
                            "--ack sync: {op:?} was acknowledged but mirror {} differs:\n{}",
                            m.display(),
                            common::summarize(&d)
                        ));
                        return;
                    }
                }
            }
        }
    }
}

fn describe(r: &std::io::Result<Vec<u8>>) -> String {
    match r {
        Ok(v) => format!("{} bytes", v.len()),
        Err(e) => format!("error {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The log

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            if it.peek() == Some(&'[') {
                it.next();
                for d in it.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The log of start number `n` (1-based) of the mount guard.
fn log_section(log: &str, n: usize) -> String {
    let marker = format!("---- start #{n} ----");
    let Some(i) = log.find(&marker) else {
        return String::new();
    };
    let rest = &log[i + marker.len()..];
    let end = rest.find("---- start #").unwrap_or(rest.len());
    strip_ansi(&rest[..end])
}

/// Checks one run's log: nothing but expected warnings; returns the journal's next seq reported
/// at start-up.
fn check_log_section(section: &str, n: usize, first: bool) -> u64 {
    const ALLOWED_WARNINGS: &[&str] = &["journal recovery: cut a torn tail"];
    for line in section.lines() {
        let bad_level = line.contains(" ERROR ")
            || (line.contains(" WARN ") && !ALLOWED_WARNINGS.iter().any(|a| line.contains(a)));
        assert!(
            !bad_level,
            "run #{n} of mirrorfs logged an unexpected problem: {line}\nthat run's log:\n{section}"
        );
        for word in [
            "corrupt",
            "needs_resync",
            "NEEDS_RESYNC",
            "diverge",
            "poisoned",
        ] {
            assert!(
                !line.contains(word),
                "run #{n} of mirrorfs logged {word:?}: {line}\nthat run's log:\n{section}"
            );
        }
        if !first {
            for word in ["initial sync", "namespace copied", "replacing its contents"] {
                assert!(
                    !line.contains(word),
                    "run #{n} re-copied a mirror after a crash (a crash must cost a resume, never a rescan): {line}\nthat run's log:\n{section}"
                );
            }
        }
    }
    let line = section
        .lines()
        .find(|l| l.contains("journal: ") && l.contains(" records in "))
        .unwrap_or_else(|| panic!("run #{n}: no journal recovery line in its log:\n{section}"));
    let next: u64 = line
        .rsplit("next seq ")
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("run #{n}: cannot parse the journal line {line:?}"));
    next
}

// ---------------------------------------------------------------------------------------------
// The test driver

/// Everything but mtimes: those are compared by [`mtime_diffs`].
const ALL_BUT_TIMES: Cmp = Cmp {
    mtime: false,
    owner: true,
    holes: true,
};

/// Entries of `backing` (not its root) whose mtime differs in `mirror`. Since issue 6 (finding
/// 6) nothing is excused: recovery journals the backing's times of every entry the retained
/// journal names, so a kill between a change and the record of its times no longer leaves the
/// mirror with the time of its own application.
fn mtime_diffs(backing: &Path, mirror: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(backing.join(&rel)) else {
            out.push(format!("cannot read {}", backing.join(&rel).display()));
            continue;
        };
        for de in rd.flatten() {
            let r = rel.join(de.file_name());
            let (Ok(b), Ok(m)) = (sys::lstat(&backing.join(&r)), sys::lstat(&mirror.join(&r)))
            else {
                out.push(format!("{}: missing", r.display()));
                continue;
            };
            if b.st_mode & libc::S_IFMT == libc::S_IFDIR {
                stack.push(r.clone());
            }
            if (b.st_mtime, b.st_mtime_nsec) != (m.st_mtime, m.st_mtime_nsec) {
                out.push(format!(
                    "{}: mtime differs: {}.{:09} vs {}.{:09}",
                    r.display(),
                    b.st_mtime,
                    b.st_mtime_nsec,
                    m.st_mtime,
                    m.st_mtime_nsec
                ));
            }
        }
    }
    out
}

/// Waits until every mirror equals the backing directory: everything, mtimes too, except the
/// mtime of the root.
fn wait_all_mirrors_equal(m: &Mount, what: &str, writers: &[Writer]) {
    for mirror in &m.layout.mirrors {
        let mut last = Vec::new();
        let ok = wait_until(CATCH_UP, || {
            last = tree_diff(m.backing(), mirror, &ALL_BUT_TIMES);
            last.extend(mtime_diffs(m.backing(), mirror));
            last.is_empty()
        });
        assert!(
            ok,
            "{what}: mirror {} did not become equal to the backing directory within {CATCH_UP:?}:\n{}\n{}\nmirrorfs log (tail):\n{}",
            mirror.display(),
            common::summarize(&last),
            histories(writers),
            tail(&m.log(), 80)
        );
    }
}

/// Waits until mirrorfs handles SIGTERM: it installs its handler only after mounting, and a
/// SIGTERM before that kills it without unmounting.
fn wait_sigterm_handled(m: &Mount) {
    let status = format!("/proc/{}/status", m.pid());
    let ok = wait_until(CATCH_UP, || {
        std::fs::read_to_string(&status)
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("SigCgt:"))
                    .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            })
            .is_some_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0)
    });
    assert!(ok, "mirrorfs never installed its SIGTERM handler");
}

fn histories(writers: &[Writer]) -> String {
    writers
        .iter()
        .map(|w| {
            format!(
                "writer {}'s last operations (in t{}):\n  {}",
                w.id,
                w.id,
                w.history.join("\n  ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Checks every fsync record of `w` under `root`; returns how many were checked.
fn check_synced(w: &Writer, root: &Path, what: &str) -> usize {
    for s in &w.synced {
        let p = root.join(NAMES[s.name]);
        let got = std::fs::read(&p);
        assert!(
            got.as_ref().ok() == Some(&s.content),
            "{what}: {} was fsynced in cycle {} with {} bytes (and not changed since) but holds {}",
            p.display(),
            s.cycle,
            s.content.len(),
            describe(&got)
        );
    }
    w.synced.len()
}

fn crash_loop(tag: &str, n_mirrors: usize, extra: &[&str]) {
    let t0 = Instant::now();
    let seed = seed(tag);
    let mut rng = SmallRng::seed_from_u64(seed);
    let cycles = cycles();
    let sync_ack = extra.windows(2).any(|w| w == ["--ack", "sync"]);
    // The state directory is outside the backing directory, so the backing root's link count
    // (which counts `.mirrorfs`) equals the mirrors'.
    let layout = Layout::new(tag, n_mirrors);
    let state = layout.base.join("state").display().to_string();
    let mut args = extra.to_vec();
    args.extend(["--state", &state]);
    let mut m = Mount::start(layout, &args);
    let shadow_root = m.layout.base.join("shadow");
    common::mkdir755(&shadow_root);
    let mut writers: Vec<Writer> = (0..WRITERS)
        .map(|id| {
            let t = format!("t{id}");
            sys::mkdir(&m.p(&t), 0o755).expect("mkdir writer subtree");
            common::mkdir755(&shadow_root.join(&t));
            Writer {
                id,
                rng: SmallRng::seed_from_u64(rng.gen()),
                mnt: m.p(&t),
                shadow: shadow_root.join(&t),
                mirrors: m.layout.mirrors.iter().map(|x| x.join(&t)).collect(),
                sync_ack,
                cycle: 0,
                inflight: None,
                last_acked: None,
                synced: Vec::new(),
                errors: Vec::new(),
                ops: 0,
                acked: 0,
                fsyncs: 0,
                history: Vec::new(),
            }
        })
        .collect();
    // The initial sync of the (empty) mirrors is done before the first kill.
    wait_all_mirrors_equal(&m, "after the first mount", &writers);
    // Equal trees are not enough: an empty tree is equal at once, before a mirror has applied
    // `SyncDone`. Killed before that, a mirror rightly starts its initial copy again, and during a
    // copy an fsync does not mean the mirror holds the whole file (README: "during an initial sync").
    let live = wait_until(CATCH_UP, || {
        m.status().is_some_and(|s| {
            s["mirrors"]
                .as_array()
                .is_some_and(|a| !a.is_empty() && a.iter().all(|x| x["state"] == "live"))
        })
    });
    assert!(
        live,
        "the mirrors never became live:\n{}",
        tail(&m.log(), 60)
    );
    let mut next_seq = check_log_section(&log_section(&m.log(), 1), 1, true);
    let mut inflight_applied = 0;
    let mut synced_checked = 0;
    for cycle in 0..cycles {
        let ctl = Arc::new(Ctl {
            killed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            acked: AtomicU64::new(0),
        });
        let handles: Vec<_> = writers
            .drain(..)
            .map(|mut w| {
                w.cycle = cycle;
                w.inflight = None;
                let ctl = ctl.clone();
                std::thread::spawn(move || {
                    w.run(&ctl);
                    w
                })
            })
            .collect();
        // Let the writers work for a random while (and at least until something was acknowledged,
        // so every cycle kills a mount with changes in flight).
        let delay = Duration::from_millis(rng.gen_range(30..400));
        std::thread::sleep(delay);
        wait_until(Duration::from_secs(30), || {
            ctl.acked.load(Ordering::Relaxed) > 0 || handles.iter().all(|h| h.is_finished())
        });
        ctl.killed.store(true, Ordering::Release);
        // SAFETY: kill(2) on the pid of our running child.
        unsafe { libc::kill(m.pid() as libc::pid_t, libc::SIGKILL) };
        ctl.stop.store(true, Ordering::Release);
        writers = handles
            .into_iter()
            .map(|h| h.join().expect("writer thread panicked"))
            .collect();
        // Reap and lazily unmount the dead mount.
        m.kill9();
        let errors: Vec<String> = writers.iter().flat_map(|w| w.errors.clone()).collect();
        assert!(
            errors.is_empty(),
            "seed {seed}, cycle {cycle}:\n{}\nmirrorfs log (tail):\n{}",
            errors.join("\n\n"),
            tail(&m.log(), 60)
        );
        let acked = ctl.acked.load(Ordering::Relaxed);
        // Mirrors already hold every fsynced file at the moment of the kill.
        for w in &writers {
            for mp in &w.mirrors {
                synced_checked += check_synced(
                    w,
                    mp,
                    &format!("seed {seed}, cycle {cycle}, right after kill -9 (mirror)"),
                );
            }
        }

        m.remount();
        let n = cycle + 2;
        let log = m.log();
        check_log_section(&log_section(&log, n - 1), n - 1, n - 1 == 1);
        let ns = check_log_section(&log_section(&log, n), n, false);
        assert!(
            ns >= next_seq && (acked == 0 || ns > next_seq),
            "seed {seed}, cycle {cycle}: the journal's next seq went from {next_seq} to {ns} after {acked} acknowledged changes"
        );
        next_seq = ns;

        // The backing subtree of each writer is its shadow, or the shadow plus the change in
        // flight at the kill.
        for w in &mut writers {
            let b = m.backing().join(format!("t{}", w.id));
            let d0 = tree_diff(&w.shadow, &b, &Cmp::NO_TIMES);
            if d0.is_empty() {
                continue;
            }
            let Some(op) = w.inflight.clone() else {
                panic!(
                    "seed {seed}, cycle {cycle}: writer {} had nothing in flight but its backing subtree differs from every acknowledged change:\n{}\nlast operations:\n  {}\nmirrorfs log (tail):\n{}",
                    w.id,
                    common::summarize(&d0),
                    w.history.join("\n  "),
                    tail(&log, 60)
                );
            };
            let r = op.replay_inflight(&w.shadow, &b);
            let d1 = tree_diff(&w.shadow, &b, &Cmp::NO_TIMES);
            assert!(
                d1.is_empty(),
                "seed {seed}, cycle {cycle}: writer {}'s backing subtree after recovery is neither the acknowledged state nor that plus the change in flight ({op:?}; replayed: {r}).\nwithout it:\n{}\nwith it:\n{}\nlast operations:\n  {}\nmirrorfs log (tail):\n{}",
                w.id,
                common::summarize(&d0),
                common::summarize(&d1),
                w.history.join("\n  "),
                tail(&log, 60)
            );
            inflight_applied += 1;
        }
        for w in &writers {
            check_synced(
                w,
                &m.backing().join(format!("t{}", w.id)),
                &format!("seed {seed}, cycle {cycle}, after recovery (backing)"),
            );
        }
        wait_all_mirrors_equal(
            &m,
            &format!("seed {seed}, cycle {cycle}, after recovery"),
            &writers,
        );
        for w in &writers {
            for mp in &w.mirrors {
                check_synced(
                    w,
                    mp,
                    &format!("seed {seed}, cycle {cycle}, after recovery (mirror)"),
                );
            }
        }
    }
    // A clean unmount at the end: every mirror equals the backing directory, which equals the
    // shadow.
    wait_sigterm_handled(&m);
    m.unmount();
    wait_all_mirrors_equal(
        &m,
        &format!("seed {seed}, after the clean unmount"),
        &writers,
    );
    for w in &writers {
        let b = m.backing().join(format!("t{}", w.id));
        let d = tree_diff(&w.shadow, &b, &Cmp::NO_TIMES);
        assert!(
            d.is_empty(),
            "seed {seed}: after the clean unmount writer {}'s subtree differs:\n{}",
            w.id,
            common::summarize(&d)
        );
        check_synced(w, &b, &format!("seed {seed}, at the end (backing)"));
    }
    let (ops, acked, fsyncs): (u64, u64, u64) = writers.iter().fold((0, 0, 0), |a, w| {
        (a.0 + w.ops, a.1 + w.acked, a.2 + w.fsyncs)
    });
    eprintln!(
        "{tag}: seed {seed}: {cycles} kill -9 cycles, {ops} operations ({acked} acknowledged, {fsyncs} fsyncs, {synced_checked} fsynced files checked on mirrors at kills), {inflight_applied} in-flight changes found applied after recovery, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn kill9_under_load_one_mirror() {
    // Each fsync is checked on the mirrors at once: it waits for them in `async` only with
    // `--fsync-waits quorum`.
    crash_loop("crash1", 1, &["--fsync-waits", "quorum"]);
}

#[test]
fn kill9_under_load_two_mirrors() {
    crash_loop("crash2", 2, &["--fsync-waits", "quorum"]);
}

#[test]
fn kill9_under_load_ack_sync() {
    crash_loop("crashsync", 1, &["--ack", "sync"]);
}

// ---------------------------------------------------------------------------------------------
// Convergence after kill -9 (issue 6, finding 6)

/// One writer's loop of the reproduction: create `fN`, write 400 bytes, fsync, close;
/// now and then also a hole, an xattr, a hard link, a symlink, a chmod or an unlink, so that
/// every attribute the comparison looks at is in play at the kill. Stops at the first error
/// once `stop` is set (the mount is being killed); an error before that is returned.
fn converge_writer(dir: &Path, stop: &AtomicBool, start: usize) -> Result<usize, String> {
    let mut i = start;
    while !stop.load(Ordering::Acquire) {
        let f = dir.join(format!("f{i}"));
        let step = || -> Result<(), i32> {
            let h = sys::open(&f, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0o644)?;
            sys::write_all(&h, &common::pattern(i as u64, 400))?;
            if i.is_multiple_of(3) {
                sys::pwrite(&h, b"after a hole", 1 << 20)?;
            }
            sys::fsync(&h)?;
            drop(h);
            if i.is_multiple_of(5) {
                sys::lsetxattr(&f, "user.k", format!("v{i}").as_bytes(), 0)?;
            }
            if i.is_multiple_of(7) {
                sys::link(&f, &dir.join(format!("l{i}")))?;
            }
            if i.is_multiple_of(11) {
                sys::symlink(format!("f{i}").as_bytes(), &dir.join(format!("s{i}")))?;
            }
            if i.is_multiple_of(13) {
                sys::chmod(&f, 0o600)?;
            }
            if i.is_multiple_of(4) && i >= 8 {
                match sys::unlink(&dir.join(format!("f{}", i - 8))) {
                    Ok(()) | Err(libc::ENOENT) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        };
        match step() {
            Ok(()) => i += 1,
            Err(_) if stop.load(Ordering::Acquire) => break,
            Err(e) => return Err(format!("{}: {}", f.display(), sys::errname(e))),
        }
    }
    Ok(i)
}

/// Issue 6, finding 6: kill -9 a mount while files are being created, written, fsynced and
/// closed; after the restart the mirror must become equal to the backing directory in
/// everything, mtimes included (recovery re-applies the in-flight write to the backing, which
/// moves its mtime, and a kill between a change and the record of its times used to leave the
/// mirror with the mtime of its own application for good).
#[test]
fn kill9_while_writing_files_mirror_converges_in_everything() {
    let t0 = Instant::now();
    let seed = seed("converge");
    let mut rng = SmallRng::seed_from_u64(seed);
    let layout = Layout::new("converge", 1);
    let state = layout.base.join("state").display().to_string();
    let mut m = Mount::start(layout, &["--state", &state]);
    let dirs: Vec<String> = (0..2).map(|w| format!("w{w}")).collect();
    for d in &dirs {
        sys::mkdir(&m.p(d), 0o755).expect("mkdir writer directory");
    }
    let live = wait_until(CATCH_UP, || {
        m.status().is_some_and(|s| {
            s["mirrors"]
                .as_array()
                .is_some_and(|a| a.iter().all(|x| x["state"] == "live"))
        })
    });
    assert!(
        live,
        "the mirror never became live:\n{}",
        tail(&m.log(), 60)
    );
    let mut next = vec![0usize; dirs.len()];
    let cycles = 4;
    for cycle in 0..cycles {
        let stop = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = dirs
            .iter()
            .zip(&next)
            .map(|(d, &start)| {
                let dir = m.p(d);
                let stop = stop.clone();
                std::thread::spawn(move || converge_writer(&dir, &stop, start))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.gen_range(150..600)));
        stop.store(true, Ordering::Release);
        // SAFETY: kill(2) on the pid of our running child.
        unsafe { libc::kill(m.pid() as libc::pid_t, libc::SIGKILL) };
        for (n, h) in next.iter_mut().zip(handles) {
            match h.join().expect("writer thread panicked") {
                Ok(i) => *n = i + 1,
                Err(e) => panic!("seed {seed}, cycle {cycle}: {e}\n{}", tail(&m.log(), 40)),
            }
        }
        m.kill9();
        m.remount();
        let mut last = Vec::new();
        let ok = wait_until(Duration::from_secs(20), || {
            last = tree_diff(m.backing(), m.mirror(), &Cmp::FULL);
            last.is_empty()
        });
        assert!(
            ok,
            "seed {seed}, cycle {cycle}: after kill -9 and restart the mirror never became equal to the backing directory ({} differences):\n{}\nmirrorfs log (tail):\n{}",
            last.len(),
            common::summarize(&last),
            tail(&m.log(), 40)
        );
    }
    wait_sigterm_handled(&m);
    m.unmount();
    common::assert_trees_equal(m.backing(), m.mirror());
    eprintln!(
        "converge: seed {seed}: {cycles} kill -9 cycles, {} files written, {:.1} s",
        next.iter().sum::<usize>(),
        t0.elapsed().as_secs_f64()
    );
}
