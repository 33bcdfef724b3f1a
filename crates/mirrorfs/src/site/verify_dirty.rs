//! The mount's record of what changed since each mirror was last verified: the I/O shell of
//! `core::verify::incremental::DirtySet`. A thread of the site reads the journal's settled
//! records in order (as a mirror's worker does, so every way a record is appended is seen: the
//! mount's changes, recovery records, copies and repairs) and puts the paths they change into
//! the set; the set is written to `STATE/verify/dirty` (temp file + rename) whenever it grew,
//! for `mirrorfs verify` to read, and made durable (`statefile::replace_durable`, named V1 in
//! docs/journal.md) at a clean stop, before the clean marker.
//!
//! At start the set is taken back only if the last run stopped cleanly, the file is whole and
//! saw the journal's end, and the backing was not changed while unmounted; otherwise the new
//! set knows nothing before the journal's end (its floor), and each mirror's next verify is a
//! full one: a crash never makes a verify skip a change.
//!
//! `mirrorfs verify` writes `STATE/verify/ID.state` per mirror (the seq it verified through);
//! the thread drops what every mirror of the mount has verified (`DirtySet::trim`). The journal
//! keeps the records the thread has not read yet (`Volume::retain_after`), except when it is
//! full: then the mirrors' needs decide alone, and a record released unread raises the set's
//! floor (`DirtySet::gap`).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use mirrorfs_core::journal::Reader;
use mirrorfs_core::verify::incremental::{DirtySet, FloorReason, VerifyState};

use crate::site::engine::Site;
use crate::site::statefile;
use crate::site::store::{FileSegment, FileStore};
use crate::site::volume::{lock, Volume};

/// How often the thread reads new records.
const TICK: Duration = Duration::from_millis(200);
/// A set whose file is larger than this is written at most every [`SLOW_WRITE`].
const BIG_FILE: usize = 4 << 20;
const SLOW_WRITE: Duration = Duration::from_secs(5);
/// How often the mirrors' verify states are read for a trim.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// The record as `status` shows it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Paths changed since the oldest verify on record.
    pub paths: usize,
    /// The last journal record read.
    pub through_seq: u64,
    /// Records at most this may be missing from the record.
    pub floor_seq: u64,
    /// The oldest record through which one of the mount's mirrors was verified, if any.
    pub oldest_verified_seq: Option<u64>,
    /// Why the next verify of some mirror will be a full one (`None`: the record goes back to
    /// every verified mirror's last verify).
    pub full_verify_because: Option<String>,
}

/// `states`: the verify states of the mount's mirrors that have one.
fn summary(set: &DirtySet, states: &[VerifyState]) -> Summary {
    let oldest_verified = states
        .iter()
        .filter(|s| s.epoch == set.epoch)
        .map(|s| s.verified)
        .min();
    let because = if states.is_empty() {
        Some("no verify on record".to_string())
    } else if states.iter().any(|s| s.epoch != set.epoch) {
        Some(set.epoch_reason.words().to_string())
    } else if oldest_verified.is_some_and(|v| set.floor > v) {
        Some(set.floor_reason.words().to_string())
    } else {
        None
    };
    Summary {
        paths: set.len(),
        through_seq: set.through,
        floor_seq: set.floor,
        oldest_verified_seq: oldest_verified,
        full_verify_because: because,
    }
}

/// `STATE/verify/dirty`.
pub fn dirty_path(state: &Path) -> PathBuf {
    state.join("verify").join("dirty")
}

/// `STATE/verify/ID.state` for the mirror the mount names `mirror` (`ID`: the first 16 hex
/// digits of the blake3 of that name, as for the hash cache).
pub fn state_path(state: &Path, mirror: &[u8]) -> PathBuf {
    let id = blake3::hash(mirror);
    state
        .join("verify")
        .join(format!("{}.state", &id.to_hex()[..16]))
}

/// The set as written; `Err` with the reason for a missing or damaged file.
pub fn load(state: &Path) -> Result<DirtySet, String> {
    let p = dirty_path(state);
    let b = std::fs::read(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    DirtySet::decode(&b).map_err(|e| format!("{}: {e}", p.display()))
}

/// A mirror's verify state; `None` when missing or damaged (the next verify is a full one).
pub fn load_state(state: &Path, mirror: &[u8]) -> Option<VerifyState> {
    let b = std::fs::read(state_path(state, mirror)).ok()?;
    VerifyState::decode(&b).ok().filter(|s| s.mirror == mirror)
}

fn save(state: &Path, set: &DirtySet, durable: bool) -> std::io::Result<usize> {
    let p = dirty_path(state);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    let b = set.encode();
    if durable {
        statefile::replace_durable(&p, &b, 0o600)?;
    } else {
        statefile::replace(&p, &b, 0o600)?;
    }
    Ok(b.len())
}

/// The set the mount starts with (see the module docs). `behind`: the backing stamp found
/// changes made while unmounted.
pub fn opening_set(state: &Path, clean: bool, horizon: u64, behind: bool) -> DirtySet {
    // A new epoch: a mirror verified before it needs a full verify (see `DirtySet::epoch`).
    let fresh = |reason| DirtySet::new(horizon, horizon, reason).in_epoch(new_epoch(), reason);
    if !clean {
        return fresh(FloorReason::Unclean);
    }
    if behind {
        return fresh(FloorReason::Behind);
    }
    match load(state) {
        Ok(s) if s.through == horizon => s,
        Ok(s) => {
            tracing::info!(
                "the record of changes for verify ended at seq {}, the journal at {horizon}: the next verify is a full one",
                s.through
            );
            fresh(FloorReason::Started)
        }
        Err(e) => {
            tracing::debug!("no record of changes for verify: {e}");
            fresh(FloorReason::Started)
        }
    }
}

/// An epoch no earlier run used (the time in nanoseconds).
fn new_epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        .max(1)
}

/// Starts the thread (primary only), with the set taken back as [`opening_set`] says.
pub fn start(site: &mut Site, behind: bool) -> Result<()> {
    let state = site.state.path().to_path_buf();
    let set = opening_set(&state, site.opening.clean, site.opening.horizon, behind);
    if let Err(e) = save(&state, &set, false) {
        tracing::warn!("cannot write the record of changes for verify: {e}");
    }
    let vol = site.vol.clone();
    vol.retain_after.store(set.through, Ordering::Release);
    let _ = vol
        .verify_changes
        .set(Arc::new(std::sync::Mutex::new(summary(&set, &[]))));
    site.spawn("verify-changes", move || run(vol, state, set))
}

fn run(vol: Arc<Volume>, state: PathBuf, mut set: DirtySet) {
    let mut reader: Reader<FileSegment> = Reader::new(set.through + 1);
    let mut written = (set.through, set.floor, set.len());
    let mut last_write = Instant::now();
    let mut last_trim = Instant::now() - TRIM_EVERY;
    let names: Vec<Vec<u8>> = vol
        .mirrors
        .iter()
        .map(|m| m.name.clone().into_bytes())
        .collect();
    let mut warned_limit = false;
    let mut states: Vec<VerifyState> = Vec::new();
    loop {
        let stopping = lock(&vol.progress).stopping;
        read_new(&vol, &mut reader, &mut set);
        // Records after what was read stay in the journal (unless it is full).
        vol.retain_after
            .store(reader.next_seq().saturating_sub(1), Ordering::Release);
        if last_trim.elapsed() >= TRIM_EVERY || stopping {
            last_trim = Instant::now();
            states = names.iter().filter_map(|n| load_state(&state, n)).collect();
            // Only a mirror verified in this epoch can be verified incrementally: the oldest
            // of those is kept; none: each mirror's next verify is a full one.
            let verified = states
                .iter()
                .filter(|s| s.epoch == set.epoch)
                .map(|s| s.verified)
                .min();
            set.trim(verified.unwrap_or(set.through));
        }
        if let Some(s) = vol.verify_changes.get() {
            *lock(s) = summary(&set, &states);
        }
        if set.floor_reason == FloorReason::Limit && !warned_limit {
            warned_limit = true;
            tracing::warn!(
                "more paths changed since the last verify than the record of changes holds: the next verify is a full one"
            );
        }
        let now = (set.through, set.floor, set.len());
        let slow = set.len() * 64 > BIG_FILE && last_write.elapsed() < SLOW_WRITE;
        if stopping || (now != written && !slow) {
            match save(&state, &set, stopping) {
                Ok(_) => written = now,
                Err(e) => tracing::warn!("cannot write the record of changes for verify: {e}"),
            }
            last_write = Instant::now();
        }
        if stopping {
            return;
        }
        std::thread::sleep(TICK);
    }
}

/// Reads the settled records the set has not seen.
fn read_new(vol: &Volume, reader: &mut Reader<FileSegment>, set: &mut DirtySet) {
    let limit = vol.settled.load(Ordering::Acquire);
    let mut stalled = false;
    while reader.next_seq() <= limit {
        let (view, first) = {
            let o = lock(&vol.order);
            (
                o.journal.segment_for(reader.next_seq()),
                o.journal.first_seq(),
            )
        };
        if reader.next_seq() < first {
            // Released unread (the journal was full): what they changed is not known.
            set.gap(first - 1);
            *reader = Reader::new(first);
            continue;
        }
        match reader.next::<FileStore>(view, limit) {
            Ok(Some(rec)) => {
                stalled = false;
                set.observe(rec.seq, &rec.op);
            }
            // The end of a segment: the next read opens the next one.
            Ok(None) if !stalled => stalled = true,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!("the record of changes for verify cannot read the journal ({e}): the next verify is a full one");
                set.gap(limit);
                *reader = Reader::new(limit + 1);
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrorfs_core::op::Op;
    use mirrorfs_core::path::RelPath;

    #[test]
    fn a_set_is_taken_back_only_after_a_clean_stop_that_saw_the_journal_end() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut s = DirtySet::new(0, 0, FloorReason::None);
        s.observe(
            1,
            &Op::Truncate {
                path: RelPath::new("f").expect("path"),
                size: 0,
            },
        );
        save(t.path(), &s, true).expect("save");
        assert_eq!(opening_set(t.path(), true, 1, false), s);
        let after_crash = opening_set(t.path(), false, 1, false);
        assert_ne!(after_crash.epoch, s.epoch, "a new epoch");
        assert_eq!(
            (
                after_crash.floor,
                after_crash.floor_reason,
                after_crash.len()
            ),
            (1, FloorReason::Unclean, 0)
        );
        assert_eq!(
            opening_set(t.path(), true, 1, true).floor_reason,
            FloorReason::Behind
        );
        // The journal went on without the file (an older mirrorfs ran): not taken back.
        assert_eq!(opening_set(t.path(), true, 5, false).floor, 5);
        std::fs::write(dirty_path(t.path()), b"MFSDS001garbage").expect("write");
        assert_eq!(
            opening_set(t.path(), true, 1, false).floor_reason,
            FloorReason::Started
        );
        // A mirror's state is read only under its own name.
        let st = VerifyState {
            mirror: b"/m".to_vec(),
            epoch: 0,
            verified: 3,
            since_full: 0,
            pending: vec![],
        };
        std::fs::write(state_path(t.path(), b"/m"), st.encode()).expect("write");
        assert_eq!(load_state(t.path(), b"/m"), Some(st));
        assert_eq!(load_state(t.path(), b"/other"), None);
    }
}
