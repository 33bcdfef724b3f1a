//! The conflict registry, `STATE/conflicts.json`: the conflicts a reintegration left (both
//! versions kept: ours at `PATH`, theirs beside it as `PATH.conflict-SITE-YYYYMMDD-HHMMSS`), until
//! a user settles them with `mirrorfs conflicts resolve`.
//!
//! The mount process (which records) and the CLI (which lists and removes) change the file under
//! an exclusive `flock` on `STATE/conflicts.lock`, read-modify-write, and replace it durably
//! (temporary file, fsync, rename, fsync of the directory: `statefile::replace_durable`), so
//! neither loses the other's update and a power loss leaves the old file or the new one.
//!
//! Format (version 1), paths relative to the volume's root:
//!
//! ```json
//! { "version": 1,
//!   "conflicts": [
//!     { "path": "notes.txt", "copy": "notes.txt.conflict-siteb-20261204-120000",
//!       "reason": "both-modified", "peer": "siteb", "time": 1796400000 } ] }
//! ```
//!
//! A path that is not valid UTF-8 is stored as `path_hex` (lower-case hex of its bytes) instead
//! of `path`, and likewise `copy_hex` for `copy`; an entry without a copy has neither. Every
//! path is checked as a `RelPath` (relative, no `..`, not the root) when written and when read: a
//! planted `../` must never make `resolve` act outside the mount.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use mirrorfs_core::path::RelPath;
use mirrorfs_core::reintegrate::{Conflict, Reason};
use serde::{Deserialize, Serialize};

use crate::site::state_dir::StateDir;
use crate::site::statefile;

/// The most entries the registry holds: beyond it `record` fails (the conflict copies stay on
/// disk; the caller logs the refusal). Keeps the file, and each read-modify-write, bounded.
pub const ENTRIES_MAX: usize = 100_000;

/// A file larger than this cannot be a registry of [`ENTRIES_MAX`] entries (two paths of at
/// most 2 × 4 KiB of hex each, plus a few short fields): refused before it is read.
const FILE_BYTES_MAX: u64 = ENTRIES_MAX as u64 * 20_000;

const VERSION: u32 = 1;

/// One conflict left by a reintegration with `peer`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "StoredEntry", into = "StoredEntry")]
pub struct ConflictEntry {
    /// Our version, relative to the volume's root.
    pub path: Vec<u8>,
    /// Their version, beside ours (`PATH.conflict-SITE-YYYYMMDD-HHMMSS`), if it was copied.
    pub copy: Option<Vec<u8>>,
    /// A stable kebab-case word: [`reason_word`].
    pub reason: String,
    /// The other site's name.
    pub peer: String,
    /// Unix seconds when the conflict was recorded.
    pub time: i64,
}

impl ConflictEntry {
    /// The entry for a conflict the planner listed, recorded now-ish (`time`).
    #[allow(
        dead_code,
        reason = "the reintegration records conflicts; it is not wired in yet"
    )]
    pub fn from_conflict(c: &Conflict, peer: &str, time: i64) -> ConflictEntry {
        ConflictEntry {
            path: c.path.as_bytes().to_vec(),
            copy: c.copy.as_ref().map(|p| p.as_bytes().to_vec()),
            reason: reason_word(c.reason).to_string(),
            peer: peer.to_string(),
            time,
        }
    }

    /// The human sentence for its reason.
    pub fn description(&self) -> &'static str {
        reason_sentence(&self.reason)
    }
}

/// The word stored for a reason (stable: the file and `--json` carry it).
#[allow(
    dead_code,
    reason = "the reintegration records conflicts; it is not wired in yet"
)]
pub fn reason_word(r: Reason) -> &'static str {
    match r {
        Reason::BothModified => "both-modified",
        Reason::BothCreated => "both-created",
        Reason::TheyDeleted => "they-deleted",
        Reason::WeDeleted => "we-deleted",
        Reason::BothRenamed => "both-renamed",
        Reason::DirRemovedFilled => "dir-removed-filled",
        Reason::DirAttributes => "dir-attributes",
        Reason::NameTaken => "name-taken",
        Reason::RenameCycle => "rename-cycle",
        Reason::ChangedDuringReintegration => "changed-during-reintegration",
    }
}

/// What a reason word means, for the text listing.
pub fn reason_sentence(word: &str) -> &'static str {
    match word {
        "both-modified" => "both sites changed it: ours is at the path, theirs in the conflict copy",
        "both-created" => {
            "both sites created this name: ours is at the path, theirs in the conflict copy"
        }
        "they-deleted" => "we changed it and the other site deleted it: ours was kept",
        "we-deleted" => "we deleted it and the other site changed it: theirs was restored",
        "both-renamed" => {
            "both sites renamed it, to different names: ours was kept, their new name was not applied"
        }
        "dir-removed-filled" => {
            "one site removed this directory while the other added entries to it: it was kept, with the new entries"
        }
        "dir-attributes" => {
            "both sites changed this directory's attributes (mode, owner, times): ours were kept"
        }
        "name-taken" => {
            "the other site's new name for an object was taken here by something else: their rename was not applied, or their object was kept under the conflict name"
        }
        "rename-cycle" => {
            "the other site's rename would have moved a directory into itself: it was not applied"
        }
        "split-both-modified" => {
            "both sites changed it while their link was down: the lower site id's version is at the path, the higher's in the conflict copy (the same at both sites)"
        }
        "changed-during-reintegration" => {
            "we changed it while the reintegration ran: ours was kept, theirs is in the conflict copy"
        }
        _ => "a reason this version of mirrorfs does not know (recorded by a newer one)",
    }
}

/// The file's form of an entry: each path as UTF-8 text when it is, as hex when not.
#[derive(Serialize, Deserialize)]
struct StoredEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    copy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    copy_hex: Option<String>,
    reason: String,
    peer: String,
    time: i64,
}

#[derive(Serialize, Deserialize)]
struct StoredFile {
    version: u32,
    conflicts: Vec<ConflictEntry>,
}

/// `(text, None)` for UTF-8 bytes, `(None, hex)` otherwise.
fn encode(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (Some(s.to_string()), None),
        Err(_) => (
            None,
            Some(bytes.iter().map(|b| format!("{b:02x}")).collect()),
        ),
    }
}

fn decode(
    field: &str,
    text: Option<String>,
    hex: Option<String>,
) -> Result<Option<Vec<u8>>, String> {
    match (text, hex) {
        (None, None) => Ok(None),
        (Some(t), None) => Ok(Some(t.into_bytes())),
        (None, Some(h)) => {
            if h.len() % 2 != 0 {
                return Err(format!("{field}_hex has an odd number of digits"));
            }
            (0..h.len())
                .step_by(2)
                .map(|i| {
                    h.get(i..i + 2)
                        .and_then(|d| u8::from_str_radix(d, 16).ok())
                        .ok_or_else(|| format!("{field}_hex is not hex: {h:?}"))
                })
                .collect::<Result<Vec<u8>, String>>()
                .map(Some)
        }
        (Some(_), Some(_)) => Err(format!("both {field} and {field}_hex")),
    }
}

/// A path of an entry must name something beneath the volume's root, never the root itself.
fn check_path(field: &str, p: &[u8]) -> Result<(), String> {
    match RelPath::new(p.to_vec()) {
        Ok(r) if !r.is_root() => Ok(()),
        Ok(_) => Err(format!("{field} is empty (the volume's root)")),
        Err(e) => Err(format!(
            "{field} {:?} is not a path inside a volume: {e}",
            String::from_utf8_lossy(p)
        )),
    }
}

fn check(e: &ConflictEntry) -> Result<(), String> {
    check_path("path", &e.path)?;
    if let Some(c) = &e.copy {
        check_path("copy", c)?;
    }
    if e.reason.is_empty() {
        return Err("reason is empty".into());
    }
    Ok(())
}

impl TryFrom<StoredEntry> for ConflictEntry {
    type Error = String;
    fn try_from(s: StoredEntry) -> Result<Self, String> {
        let e = ConflictEntry {
            path: decode("path", s.path, s.path_hex)?.ok_or("an entry without a path")?,
            copy: decode("copy", s.copy, s.copy_hex)?,
            reason: s.reason,
            peer: s.peer,
            time: s.time,
        };
        check(&e)?;
        Ok(e)
    }
}

impl From<ConflictEntry> for StoredEntry {
    fn from(e: ConflictEntry) -> Self {
        let (path, path_hex) = encode(&e.path);
        let (copy, copy_hex) = e.copy.as_deref().map(encode).unwrap_or((None, None));
        StoredEntry {
            path,
            path_hex,
            copy,
            copy_hex,
            reason: e.reason,
            peer: e.peer,
            time: e.time,
        }
    }
}

/// Held while this process changes the registry: an exclusive `flock` on `STATE/conflicts.lock`
/// (blocking; the kernel drops it if the process dies).
struct RegistryLock {
    _file: fs::File,
}

fn lock(dir: &StateDir) -> Result<RegistryLock> {
    let p = dir.conflicts_lock();
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&p)
        .with_context(|| format!("cannot open {}", p.display()))?;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(RegistryLock { _file: f });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e).with_context(|| format!("cannot lock {}", p.display()));
        }
    }
}

fn read(dir: &StateDir) -> Result<Vec<ConflictEntry>> {
    let p = dir.conflicts_file();
    let mut f = match fs::File::open(&p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r.with_context(|| format!("cannot read {}", p.display()))?,
    };
    let len = f
        .metadata()
        .with_context(|| format!("cannot read {}", p.display()))?
        .len();
    if len > FILE_BYTES_MAX {
        bail!(
            "{} is {len} bytes, more than a registry of {ENTRIES_MAX} conflicts can be: is it the right file?",
            p.display()
        );
    }
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut f, &mut bytes)
        .with_context(|| format!("cannot read {}", p.display()))?;
    let file: StoredFile = serde_json::from_slice(&bytes).map_err(|e| {
        anyhow!(
            "{} is corrupt ({e}); its conflict copies are still in the volume (named *.conflict-*): move the file aside to start an empty registry",
            p.display()
        )
    })?;
    if file.version != VERSION {
        bail!(
            "{} has version {} (this mirrorfs reads version {VERSION}): use the mirrorfs that wrote it",
            p.display(),
            file.version
        );
    }
    if file.conflicts.len() > ENTRIES_MAX {
        bail!(
            "{} holds {} conflicts, more than the {ENTRIES_MAX} allowed",
            p.display(),
            file.conflicts.len()
        );
    }
    Ok(file.conflicts)
}

fn write(dir: &StateDir, entries: Vec<ConflictEntry>) -> Result<()> {
    let p = dir.conflicts_file();
    if entries.is_empty() {
        return statefile::remove_durable(&p)
            .with_context(|| format!("cannot remove {}", p.display()));
    }
    let file = StoredFile {
        version: VERSION,
        conflicts: entries,
    };
    let bytes = serde_json::to_vec_pretty(&file)?;
    statefile::replace_durable(&p, &bytes, 0o600)
        .with_context(|| format!("cannot write {}", p.display()))
}

/// Adds `entries` to the registry in `state`, durably, under its lock. An entry identical to one
/// already there is not added twice; two different conflicts on one path are both kept (two
/// reintegrations may both conflict on it). Fails, adding nothing, if an entry is invalid or the
/// registry would pass [`ENTRIES_MAX`].
pub fn record(state: &Path, entries: &[ConflictEntry]) -> Result<()> {
    for e in entries {
        check(e).map_err(|why| anyhow!("not recording a conflict: {why}"))?;
    }
    let dir = StateDir::at(state);
    let _lock = lock(&dir)?;
    let mut all = read(&dir)?;
    let before = all.len();
    let mut seen: std::collections::HashSet<ConflictEntry> = all.iter().cloned().collect();
    for e in entries {
        if seen.insert(e.clone()) {
            all.push(e.clone());
        }
    }
    if all.len() == before {
        return Ok(());
    }
    if all.len() > ENTRIES_MAX {
        bail!(
            "the conflict registry {} already holds {before} conflicts; {} more would pass its limit of {ENTRIES_MAX}: settle some with `mirrorfs conflicts resolve` (the conflict copies are in the volume, named *.conflict-*)",
            dir.conflicts_file().display(),
            all.len() - before
        );
    }
    write(&dir, all)
}

/// Every conflict recorded in `state` (none if there is no registry). A corrupt registry is an
/// error that names the file. Needs no lock: the file is only ever replaced by a rename, so a
/// reader sees the list before or after a change, never half of one.
pub fn list(state: &Path) -> Result<Vec<ConflictEntry>> {
    read(&StateDir::at(state))
}

/// Removes the entries for `path` (our version's path), durably, under the lock; returns them.
#[allow(
    dead_code,
    reason = "resolve removes exactly the entries it settled (remove_entries); this is for callers that settle a whole path"
)]
pub fn remove(state: &Path, path: &[u8]) -> Result<Vec<ConflictEntry>> {
    remove_where(state, |e| e.path == path)
}

/// Removes exactly `entries` (those a user settled; a conflict recorded meanwhile on the same
/// path stays), durably, under the lock; how many were there.
pub fn remove_entries(state: &Path, entries: &[ConflictEntry]) -> Result<usize> {
    Ok(remove_where(state, |e| entries.contains(e))?.len())
}

fn remove_where(state: &Path, f: impl Fn(&ConflictEntry) -> bool) -> Result<Vec<ConflictEntry>> {
    let dir = StateDir::at(state);
    let _lock = lock(&dir)?;
    let (gone, kept): (Vec<_>, Vec<_>) = read(&dir)?.into_iter().partition(|e| f(e));
    if !gone.is_empty() {
        write(&dir, kept)?;
    }
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &[u8], copy: Option<&[u8]>, time: i64) -> ConflictEntry {
        ConflictEntry {
            path: path.to_vec(),
            copy: copy.map(<[u8]>::to_vec),
            reason: reason_word(Reason::BothModified).to_string(),
            peer: "siteb".into(),
            time,
        }
    }

    fn state() -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().expect("tempdir");
        let s = d.path().join("state");
        StateDir::create(&s).expect("state dir");
        (d, s)
    }

    #[test]
    fn conflicts_round_trip_and_dedupe_identical_entries() {
        let (_d, s) = state();
        assert!(list(&s).expect("empty").is_empty(), "no file: no conflicts");
        let a = entry(
            b"a/notes.txt",
            Some(b"a/notes.txt.conflict-siteb-20261204-120000"),
            7,
        );
        let b = entry(
            b"a/notes.txt",
            Some(b"a/notes.txt.conflict-sitec-20261205-120000"),
            8,
        );
        let c = ConflictEntry {
            reason: reason_word(Reason::TheyDeleted).into(),
            ..entry(b"gone", None, 9)
        };
        record(&s, &[a.clone(), c.clone()]).expect("record");
        record(&s, &[a.clone(), b.clone()]).expect("record again");
        assert_eq!(
            list(&s).expect("list"),
            vec![a.clone(), c.clone(), b.clone()]
        );
        assert_eq!(
            remove_entries(&s, std::slice::from_ref(&a)).expect("one of two"),
            1
        );
        assert_eq!(
            list(&s).expect("list"),
            vec![c.clone(), b.clone()],
            "the other stays"
        );
        record(&s, std::slice::from_ref(&a)).expect("recorded again");
        assert_eq!(
            remove(&s, b"a/notes.txt").expect("remove"),
            vec![b, a],
            "both conflicts on one path go"
        );
        assert_eq!(list(&s).expect("list"), vec![c.clone()]);
        assert_eq!(
            remove_entries(&s, std::slice::from_ref(&c)).expect("remove entry"),
            1
        );
        assert_eq!(remove_entries(&s, &[c]).expect("again"), 0);
        assert!(list(&s).expect("list").is_empty());
        assert!(
            !StateDir::at(&s).conflicts_file().exists(),
            "an empty registry is no file"
        );
    }

    #[test]
    fn a_non_utf8_path_is_kept_exactly() {
        let (_d, s) = state();
        let e = entry(
            b"dir/caf\xe9",
            Some(b"dir/caf\xe9.conflict-siteb-20261204-120000"),
            1,
        );
        record(&s, std::slice::from_ref(&e)).expect("record");
        let text = fs::read_to_string(StateDir::at(&s).conflicts_file()).expect("UTF-8 JSON");
        assert!(
            text.contains("\"path_hex\": \"6469722f636166e9\""),
            "{text}"
        );
        assert_eq!(list(&s).expect("list"), vec![e]);
        assert_eq!(remove(&s, b"dir/caf\xe9").expect("remove").len(), 1);
    }

    #[test]
    fn concurrent_records_lose_nothing() {
        let (_d, s) = state();
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..40 {
                        let p = format!("t{t}/f{i}");
                        record(&s, &[entry(p.as_bytes(), None, i)]).expect("record");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(list(&s).expect("list").len(), 80);
    }

    #[test]
    fn a_corrupt_registry_is_an_error_naming_the_file() {
        let (_d, s) = state();
        let f = StateDir::at(&s).conflicts_file();
        fs::write(&f, b"{\"version\": 1, \"conflicts\": [").expect("torn");
        let e = format!("{:#}", list(&s).expect_err("corrupt"));
        assert!(e.contains("conflicts.json") && e.contains("corrupt"), "{e}");
        assert!(
            record(&s, &[entry(b"x", None, 1)]).is_err(),
            "never overwritten"
        );
        fs::write(
            &f,
            br#"{"version": 1, "conflicts": [{"path": "../../etc/passwd", "reason": "both-modified", "peer": "b", "time": 1}]}"#,
        )
        .expect("planted");
        let e = format!("{:#}", list(&s).expect_err("escape"));
        assert!(e.contains("conflicts.json"), "{e}");
        assert!(record(&s, &[entry(b"../x", None, 1)]).is_err());
    }

    #[test]
    fn the_registry_is_bounded() {
        let (_d, s) = state();
        let many: Vec<_> = (0..ENTRIES_MAX as i64)
            .map(|i| entry(b"f", None, i))
            .collect();
        record(&s, &many).expect("up to the limit");
        let e = format!(
            "{:#}",
            record(&s, &[entry(b"g", None, 0)]).expect_err("past it")
        );
        assert!(e.contains("limit") && e.contains("100000"), "{e}");
        record(&s, &many[..3]).expect("nothing new: no change");
        assert_eq!(list(&s).expect("list").len(), ENTRIES_MAX);
    }

    #[test]
    fn every_reason_has_a_distinct_word_and_a_sentence() {
        let all = [
            Reason::BothModified,
            Reason::BothCreated,
            Reason::TheyDeleted,
            Reason::WeDeleted,
            Reason::BothRenamed,
            Reason::DirRemovedFilled,
            Reason::DirAttributes,
            Reason::NameTaken,
            Reason::RenameCycle,
            Reason::ChangedDuringReintegration,
        ];
        let words: std::collections::BTreeSet<_> = all.iter().map(|r| reason_word(*r)).collect();
        assert_eq!(words.len(), all.len());
        let unknown = reason_sentence("no-such-reason");
        for w in words {
            assert_ne!(reason_sentence(w), unknown, "{w}");
        }
    }
}
