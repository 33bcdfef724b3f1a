//! The flusher's round (group commit), shared by the binary's flusher thread
//! (`volume::Volume::run_flusher`) and both simulations.
//!
//! One round: under the order lock take the journal's [`SyncPlan`] (every segment with unsynced
//! bytes, up to the last record appended); release the lock and [`sync`] the plan's files, so
//! appends go on meanwhile (and ride along in the next round); under the lock again [`complete`]
//! the round: the durable position moves to the plan's end, or a failed fsync **poisons** the
//! journal (never retried: after a failed fsync the kernel may have dropped the dirty pages, so
//! a later fsync that succeeds proves nothing). Then [`release`] frees the segments no consumer
//! needs. The durable position the round reports is the journal's, which only moves forward.

use std::fmt;
use std::io;

use crate::journal::storage::{SegmentFile, SegmentStore};
use crate::journal::{Journal, JournalError, SyncPlan};

/// A planned fsync failed.
#[derive(Debug)]
pub struct SyncFailed {
    /// The segment (its first seq) whose fsync failed.
    pub segment: u64,
    pub error: io::Error,
}

impl fmt::Display for SyncFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fsync of journal segment {} failed: {}",
            self.segment, self.error
        )
    }
}

impl std::error::Error for SyncFailed {}

/// How a round ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flushed {
    /// Everything in the plan is durable; the journal's durable position is `durable`.
    Synced { durable: u64 },
    /// An fsync failed: the journal is poisoned for `why`; its durable position stays `durable`.
    Poisoned { why: String, durable: u64 },
}

impl Flushed {
    /// The journal's durable position after the round, to publish.
    pub fn durable(&self) -> u64 {
        match self {
            Flushed::Synced { durable } | Flushed::Poisoned { durable, .. } => *durable,
        }
    }
}

/// The fsyncs of `plan`, in order, stopping at the first failure (done outside the order lock).
pub fn sync<F: SegmentFile>(plan: &SyncPlan<F>) -> Result<(), SyncFailed> {
    for (segment, f, _) in &plan.files {
        f.sync().map_err(|error| SyncFailed {
            segment: *segment,
            error,
        })?;
    }
    Ok(())
}

/// Records the outcome of [`sync`] of `plan` in the journal (under the order lock): the plan's
/// records are durable, or the journal is poisoned.
pub fn complete<S: SegmentStore>(
    j: &mut Journal<S>,
    plan: &SyncPlan<S::File>,
    outcome: Result<(), SyncFailed>,
) -> Flushed {
    match outcome {
        Ok(()) => {
            j.mark_synced(plan);
            Flushed::Synced {
                durable: j.durable_seq(),
            }
        }
        Err(e) => {
            let why = e.to_string();
            j.poison(why.clone());
            Flushed::Poisoned {
                why,
                durable: j.durable_seq(),
            }
        }
    }
}

/// Frees the closed segments whose records are all ≤ `needed_through` and durable: the
/// consumers need nothing at or before it (a local mirror's checkpoint, a remote mirror's
/// acknowledged durable position). Returns how many segments were freed.
pub fn release<S: SegmentStore>(
    j: &mut Journal<S>,
    needed_through: u64,
) -> Result<usize, JournalError> {
    let before = j.segment_count();
    j.release_through(needed_through.min(j.durable_seq()))?;
    Ok(before.saturating_sub(j.segment_count()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::storage::MemStore;
    use crate::journal::JournalConfig;
    use crate::op::Op;
    use crate::path::RelPath;

    fn op(i: u64) -> Op {
        Op::Rmdir {
            path: RelPath::new(format!("d{i}")).expect("valid path"),
        }
    }

    fn journal(store: &MemStore, segment_bytes: u64) -> Journal<MemStore> {
        let cfg = JournalConfig {
            segment_bytes,
            ..JournalConfig::default()
        };
        Journal::open(store.clone(), cfg).expect("open").0
    }

    #[test]
    fn a_round_makes_the_plan_durable_and_appends_after_the_plan_ride_the_next() {
        let store = MemStore::new();
        let mut j = journal(&store, 64 << 20);
        for i in 1..=3 {
            j.append(&op(i)).expect("append");
        }
        assert_eq!(j.durable_seq(), 0);
        let plan = j.sync_plan().expect("a plan");
        // Appended between taking the plan and completing it: not durable by this round.
        j.append(&op(4)).expect("append");
        let done = complete(&mut j, &plan, sync(&plan));
        assert_eq!(done, Flushed::Synced { durable: 3 });
        let plan = j.sync_plan().expect("the next round");
        assert_eq!(complete(&mut j, &plan, sync(&plan)).durable(), 4);
        assert!(j.sync_plan().is_none(), "nothing left to sync");
    }

    #[test]
    fn a_failed_fsync_poisons_and_the_durable_position_stays() {
        let store = MemStore::new();
        let mut j = journal(&store, 64 << 20);
        j.append(&op(1)).expect("append");
        let plan = j.sync_plan().expect("a plan");
        assert_eq!(complete(&mut j, &plan, sync(&plan)).durable(), 1);
        j.append(&op(2)).expect("append");
        let plan = j.sync_plan().expect("a plan");
        let id = plan.files.first().map(|f| f.0).expect("a file");
        store.fail_next(id);
        let outcome = sync(&plan);
        assert!(outcome.is_err(), "the injected fsync failure is reported");
        match complete(&mut j, &plan, outcome) {
            Flushed::Poisoned { why, durable } => {
                assert!(why.contains("fsync of journal segment"), "{why}");
                assert_eq!(durable, 1, "the failed round moved nothing");
            }
            other => panic!("expected a poisoned journal, got {other:?}"),
        }
        assert!(j.poisoned().is_some());
        assert!(
            j.sync_plan().is_none(),
            "a poisoned journal is never synced again"
        );
        assert!(
            j.append(&op(3)).is_err(),
            "a poisoned journal refuses appends"
        );
    }

    #[test]
    fn an_older_plan_completed_late_never_moves_the_durable_position_back() {
        let store = MemStore::new();
        let mut j = journal(&store, 64 << 20);
        j.append(&op(1)).expect("append");
        let old = j.sync_plan().expect("a plan");
        j.append(&op(2)).expect("append");
        let new = j.sync_plan().expect("a plan");
        assert_eq!(complete(&mut j, &new, sync(&new)).durable(), 2);
        assert_eq!(complete(&mut j, &old, sync(&old)).durable(), 2);
    }

    #[test]
    fn release_frees_only_segments_needed_by_nobody_and_durable() {
        let store = MemStore::new();
        // Small segments: a few records each.
        let mut j = journal(&store, 1024);
        for i in 1..=200 {
            j.append(&op(i)).expect("append");
        }
        let segs = j.segment_count();
        assert!(segs > 3, "{segs} segments");
        // Nothing is durable in the active segment yet, and nobody consumed anything.
        assert_eq!(release(&mut j, 0).expect("release"), 0);
        let plan = j.sync_plan().expect("a plan");
        complete(&mut j, &plan, sync(&plan));
        let freed = release(&mut j, 100).expect("release");
        assert!(freed > 0, "segments wholly ≤ 100 are freed");
        assert!(
            j.first_seq() <= 101,
            "record 101 is still there: {}",
            j.first_seq()
        );
        let freed_all = release(&mut j, u64::MAX).expect("release");
        assert_eq!(j.segment_count(), 1, "the active segment stays");
        assert_eq!(segs - freed - freed_all, 1);
    }
}
