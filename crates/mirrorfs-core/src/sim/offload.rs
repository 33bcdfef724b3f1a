//! The mirror worker's off-thread checkpoint (`Worker::offload_checkpoints`, the shell's
//! `mirror::checkpoint` thread) as both simulations (`run.rs`, `net.rs`) drive it: the tree is
//! synced at once when the sync starts (so it holds exactly what was applied through `upto`,
//! the adversarial case for a cursor that would claim more), and the end is reported a few
//! worker turns later, after records applied in the meantime.

use super::run::SplitMix64;
use super::{SimCursor, SimTree};
use crate::tree::{Tree, TreeError};
use crate::worker::{Turn, Worker};

/// The worker of a run, with its checkpoints off its thread on three seeds in four.
pub(super) fn offloaded(w: Worker, seed: u64) -> Worker {
    if !seed.is_multiple_of(4) {
        w.offload_checkpoints()
    } else {
        w
    }
}

/// A sync started off the worker's thread: its result, the turns until it is reported, and
/// the record it makes durable.
pub(super) struct PendingSync {
    result: Result<(), TreeError>,
    left: u32,
    upto: u64,
}

impl PendingSync {
    /// Syncs `tree` now; the end is due 0–7 turns later (a function of `upto`).
    pub(super) fn start(tree: &mut SimTree, upto: u64) -> PendingSync {
        PendingSync {
            result: tree.sync(),
            left: (upto.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61) as u32,
            upto,
        }
    }

    /// The sync itself failed: report it at once.
    pub(super) fn failed(&self) -> bool {
        self.result.is_err()
    }

    /// One worker turn passed: true once the end is due.
    pub(super) fn due(&mut self) -> bool {
        if self.left == 0 {
            return true;
        }
        self.left -= 1;
        false
    }
}

/// What reporting a sync's end gave.
pub(super) struct SyncEnd {
    pub turn: Turn,
    /// The checkpoint before the report.
    pub before: u64,
    /// The cursor write was made to fail.
    pub glitched: bool,
}

/// [`Worker::synced`] with the sync's result; the cursor write may glitch (1 in 16 when
/// `glitches` is on). Err: the sync moved the checkpoint past the record it began after.
pub(super) fn report(
    sync: PendingSync,
    worker: &mut Worker,
    cursor: &mut SimCursor,
    glitches: &mut Option<SplitMix64>,
) -> Result<SyncEnd, String> {
    let before = worker.applier().cursor().checkpoint;
    if let Some(g) = glitches {
        if g.next().is_multiple_of(16) {
            cursor.glitch.arm(1);
        }
    }
    let turn = worker.synced(cursor, sync.result);
    let glitched = cursor.glitch.is_dead();
    cursor.glitch.revive();
    if let Turn::Checkpointed { checkpoint } = turn {
        if checkpoint != before && checkpoint > sync.upto {
            return Err(format!(
                "a sync begun after record {} moved the checkpoint to {checkpoint}",
                sync.upto
            ));
        }
    }
    Ok(SyncEnd {
        turn,
        before,
        glitched,
    })
}
