//! The mirror worker: the loop around one mirror's [`Applier`], as decisions without threads,
//! locks or clocks. The binary's `mirror::run_worker` (local mirrors and the mirror daemon's
//! tree) and both seeded simulations drive this one machine.
//!
//! ```text
//!  turn(now, want_durable, next) ─┬─ checkpoint due? ──▶ Applier::checkpoint ──▶ Checkpointed
//!                                 ├─ a kept record/skip (after a transient failure), else next()
//!                                 ├─ Apply  ──▶ Applier::apply ──▶ Applied   (SyncDone: checkpoint)
//!                                 ├─ Skip   ──▶ Applier::skip  ──▶ Skipped
//!                                 └─ Wait   ──▶ (idle checkpoint) ──▶ Checkpointed | Idle
//!  a failure: transient ──▶ Retry { after } (the item is kept, back-off doubles to 5 s)
//!             otherwise ──▶ Diverged { reason } (the shell marks the mirror for a resync)
//! ```
//!
//! Checkpoints off the applying thread ([`Worker::offload_checkpoints`], the binary's shell):
//! a due checkpoint is then `SyncStart { upto }` — the shell syncs the tree on its checkpoint
//! thread while the worker goes on applying — and [`Worker::synced`] reports the sync's end,
//! after which the cursor's checkpoint moves to `upto`, the last record applied *before* the
//! sync began (what it made durable), never further. At most one sync is in flight; none is
//! due while one is. Barriers (renames, unlinks, links, the end of a copy) and [`Worker::stop`]
//! still sync on the applying thread: they need a durable point before going on.
//!
//! The cursor's `applied` is written (no fsync) at the end of a batch, not after every record:
//! before the next item once [`APPLIED_BATCH`] records are unwritten, and whenever the feed has
//! nothing ready (see `applier` for why a process crash then still replays idempotently).
//!
//! When a checkpoint is due (the rule, in one place):
//! - someone waits for record `want_durable` to be durable on this mirror (an application's
//!   `fsync`, an ack mode) and every record up to it is applied;
//! - at least [`CHECKPOINT_EVERY`] passed since the last one and something was applied since;
//! - the record applied is this mirror's `SyncDone`: the initial copy is complete once that is
//!   durable (the shell then drops its `SYNCING` marker);
//! - the feed has nothing ready and the worker checkpoints when idle (a mirror daemon: its primary
//!   may wait for the checkpoint, `--ack sync`, and cannot ask for it);
//! - the worker stops ([`Worker::stop`]).
//!
//! Time is given by the driver (`now`, from any fixed origin), so the simulation runs the same
//! rule on its own clock.

use std::time::Duration;

use crate::applier::{Applier, ApplyError, CursorStore, APPLIED_BATCH};
use crate::feed::Item;
use crate::op::{Op, Record};
use crate::tree::{Tree, TreeError};

/// A checkpoint at least this often while records are being applied.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// The first wait after a transient failure; it doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What one [`Worker::turn`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turn {
    /// Everything applied is durable on the mirror through `checkpoint`.
    Checkpointed { checkpoint: u64 },
    /// Record `seq` was applied.
    Applied {
        seq: u64,
        /// The data bytes it carried.
        data_bytes: u64,
        /// Where the cursor's checkpoint is now (a barrier or a completed copy moves it).
        checkpoint: u64,
        /// An initial copy is still being applied (the mirror is a mix, not yet `live`).
        copying: bool,
        /// It was this mirror's `SyncDone` and the checkpoint after it: `Ok` — the copy is
        /// complete and durable (drop the copy's marker); `Err` — the checkpoint failed, so the
        /// marker stays and the next start copies again (safe).
        copy_done: Option<Result<(), String>>,
    },
    /// Record `seq` was consumed without being applied (an aborted record or an `Abort`).
    Skipped { seq: u64 },
    /// Nothing is ready: wait until the journal's positions move.
    Idle,
    /// A transient failure (an I/O error, a full disk, NFS gone): wait `after`, then call again;
    /// the record is kept and tried first.
    Retry {
        after: Duration,
        /// What failed, for `status` and the log.
        error: String,
        /// The mirror tree is out of space (`ENOSPC`/`EDQUOT`): the shell may give back space
        /// it holds on the same file system (`Journal::release_spare`).
        no_space: bool,
    },
    /// The mirror no longer matches the journal: stop applying; it needs a resync.
    Diverged { reason: String },
    /// A checkpoint is due and is the shell's to start off this thread: sync the tree, then
    /// report the result with [`Worker::synced`]. Once that succeeds, record `upto` is durable.
    SyncStart { upto: u64 },
}

/// The loop state of one mirror's worker.
#[derive(Debug)]
pub struct Worker {
    applier: Applier,
    last_checkpoint: Duration,
    backoff: Duration,
    /// An item a transient failure left to try again, first.
    kept: Option<Item>,
    checkpoint_when_idle: bool,
    /// Checkpoints are synced by the shell off this thread ([`Turn::SyncStart`]).
    offload: bool,
    /// The sync in flight: the last record applied when it began.
    in_flight: Option<u64>,
}

impl Worker {
    /// A worker over `applier`, started at time `now`. `checkpoint_when_idle`: checkpoint as soon
    /// as the feed has nothing ready (a mirror daemon).
    pub fn new(applier: Applier, now: Duration, checkpoint_when_idle: bool) -> Self {
        Worker {
            applier,
            last_checkpoint: now,
            backoff: BACKOFF_MIN,
            kept: None,
            checkpoint_when_idle,
            offload: false,
            in_flight: None,
        }
    }

    /// Due checkpoints become [`Turn::SyncStart`]: the driver syncs the tree elsewhere and
    /// reports the end with [`Worker::synced`].
    pub fn offload_checkpoints(mut self) -> Self {
        self.offload = true;
        self
    }

    /// The sync in flight, if any: the record it makes durable.
    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight
    }

    /// The sync started by [`Turn::SyncStart`] ended with `result`: on success the cursor's
    /// checkpoint moves (durably) to the `upto` of that turn, never past it. Returns
    /// `Checkpointed` (the checkpoint now), or `Retry` / `Diverged` as a checkpoint on this
    /// thread would (nothing is kept: the next turn finds the checkpoint still due). Without a
    /// sync in flight (a stale report) it is `Idle` and changes nothing.
    pub fn synced<C: CursorStore>(
        &mut self,
        cursor: &mut C,
        result: Result<(), TreeError>,
    ) -> Turn {
        let Some(upto) = self.in_flight.take() else {
            return Turn::Idle;
        };
        let done = result
            .map_err(ApplyError::from)
            .and_then(|()| self.applier.checkpoint_to(cursor, upto));
        match done {
            Ok(()) => {
                self.backoff = BACKOFF_MIN;
                Turn::Checkpointed {
                    checkpoint: self.applier.cursor().checkpoint,
                }
            }
            Err(e) => self.failed(Item::Wait, &e, "checkpoint".into()),
        }
    }

    pub fn applier(&self) -> &Applier {
        &self.applier
    }

    /// The applier, for the driver's own checks and tests; the worker's decisions assume the
    /// driver does not apply records through it.
    pub fn applier_mut(&mut self) -> &mut Applier {
        &mut self.applier
    }

    /// One step of the loop. `want_durable`: the highest seq someone waits to see durable on this
    /// mirror; `next` asks the feed for the next item (called at most once, and not when a kept
    /// item is retried or a checkpoint was due). An error of `next` is returned as is.
    pub fn turn<T, C, E>(
        &mut self,
        tree: &mut T,
        cursor: &mut C,
        now: Duration,
        want_durable: u64,
        next: impl FnOnce() -> Result<Item, E>,
    ) -> Result<Turn, E>
    where
        T: Tree + ?Sized,
        C: CursorStore,
    {
        if self.checkpoint_due(now, want_durable) {
            return Ok(self.start_checkpoint(tree, cursor, now));
        }
        if self.applier.unwritten_records() >= APPLIED_BATCH {
            if let Some(t) = self.write_applied(cursor) {
                return Ok(t);
            }
        }
        let item = match self.kept.take() {
            Some(item) => item,
            None => next()?,
        };
        Ok(match item {
            Item::Apply(rec) => self.apply(tree, cursor, now, rec),
            Item::Skip(seq) => match self.applier.skip(seq) {
                Ok(()) => {
                    self.backoff = BACKOFF_MIN;
                    Turn::Skipped { seq }
                }
                Err(e) => self.failed(Item::Skip(seq), &e, format!("skip of record {seq}")),
            },
            Item::Wait => {
                // The feed ran dry: the batch ends, the cursor file learns what was applied.
                if let Some(t) = self.write_applied(cursor) {
                    return Ok(t);
                }
                // Only if something was applied since the last checkpoint and none is in flight.
                let c = self.applier.cursor();
                if self.checkpoint_when_idle && self.in_flight.is_none() && c.applied > c.checkpoint
                {
                    self.start_checkpoint(tree, cursor, now)
                } else {
                    Turn::Idle
                }
            }
        })
    }

    /// The last checkpoint before the worker stops (the volume shuts down): everything applied
    /// becomes durable, so a restart resumes after it.
    pub fn stop<T: Tree + ?Sized, C: CursorStore>(
        &mut self,
        tree: &mut T,
        cursor: &mut C,
    ) -> Result<u64, ApplyError> {
        // A sync still in flight is forgotten: this one covers everything it would have.
        self.in_flight = None;
        self.applier.checkpoint(tree, cursor)?;
        Ok(self.applier.cursor().checkpoint)
    }

    /// The end of a batch: the cursor's `applied` written (no fsync). `None` when done, else the
    /// `Retry` of a failed write (nothing is kept: the next batch end writes it again).
    fn write_applied<C: CursorStore>(&mut self, cursor: &mut C) -> Option<Turn> {
        match self.applier.write_applied(cursor) {
            Ok(()) => None,
            Err(e) => Some(self.failed(Item::Wait, &e, "writing the cursor".into())),
        }
    }

    fn checkpoint_due(&self, now: Duration, want_durable: u64) -> bool {
        if self.in_flight.is_some() {
            return false;
        }
        let c = self.applier.cursor();
        let waited_for = want_durable > c.checkpoint && c.applied >= want_durable;
        let periodic = now.saturating_sub(self.last_checkpoint) >= CHECKPOINT_EVERY
            && c.applied > c.checkpoint;
        waited_for || periodic
    }

    /// A due checkpoint: handed to the shell ([`Turn::SyncStart`]) or taken here.
    fn start_checkpoint<T: Tree + ?Sized, C: CursorStore>(
        &mut self,
        tree: &mut T,
        cursor: &mut C,
        now: Duration,
    ) -> Turn {
        if !self.offload {
            return self.checkpoint(tree, cursor, now);
        }
        let upto = self.applier.cursor().applied;
        self.in_flight = Some(upto);
        self.last_checkpoint = now;
        Turn::SyncStart { upto }
    }

    fn checkpoint<T: Tree + ?Sized, C: CursorStore>(
        &mut self,
        tree: &mut T,
        cursor: &mut C,
        now: Duration,
    ) -> Turn {
        match self.applier.checkpoint(tree, cursor) {
            Ok(()) => {
                self.last_checkpoint = now;
                self.backoff = BACKOFF_MIN;
                Turn::Checkpointed {
                    checkpoint: self.applier.cursor().checkpoint,
                }
            }
            // Nothing is kept: the next turn finds the checkpoint still due.
            Err(e) => self.failed(Item::Wait, &e, "checkpoint".into()),
        }
    }

    fn apply<T: Tree + ?Sized, C: CursorStore>(
        &mut self,
        tree: &mut T,
        cursor: &mut C,
        now: Duration,
        rec: Record,
    ) -> Turn {
        let completes_copy = matches!(rec.op, Op::SyncDone { mirror }
            if Some(mirror) == self.applier.syncing());
        if let Err(e) = self.applier.apply(tree, cursor, &rec) {
            let what = format!(
                "applying record {} ({} {})",
                rec.seq,
                rec.op.name(),
                rec.op.path().map(|p| p.to_string()).unwrap_or_default()
            );
            return self.failed(Item::Apply(rec), &e, what);
        }
        self.backoff = BACKOFF_MIN;
        let copy_done = completes_copy.then(|| match self.applier.checkpoint(tree, cursor) {
            Ok(()) => {
                self.last_checkpoint = now;
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        });
        Turn::Applied {
            seq: rec.seq,
            data_bytes: rec.op.data_len() as u64,
            checkpoint: self.applier.cursor().checkpoint,
            copying: self.applier.syncing().is_some(),
            copy_done,
        }
    }

    /// A failure of the applier: transient ones keep `item` and back off, others end the
    /// mirror's run (it diverged from the journal).
    fn failed(&mut self, item: Item, e: &ApplyError, what: String) -> Turn {
        if !e.is_transient() {
            return Turn::Diverged {
                reason: format!("the mirror diverged from the journal: {what} failed: {e}"),
            };
        }
        if !matches!(item, Item::Wait) {
            self.kept = Some(item);
        }
        let after = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        Turn::Retry {
            after,
            error: format!("{what} failed: {e}"),
            no_space: e.is_no_space(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::applier::{CursorStore, MemCursorStore};
    use crate::path::RelPath;
    use crate::sim::{KillSwitch, SimCursor, SimTree};
    use std::convert::Infallible;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("valid")
    }
    fn rec(seq: u64, op: Op) -> Record {
        Record { seq, op }
    }
    fn create(seq: u64, name: &str) -> Record {
        rec(
            seq,
            Op::Create {
                path: p(name),
                mode: 0o644,
                uid: 0,
                gid: 0,
            },
        )
    }
    fn write(seq: u64, name: &str) -> Record {
        rec(
            seq,
            Op::Write {
                path: p(name),
                offset: 0,
                data: vec![7; 100],
            },
        )
    }
    fn worker(idle: bool) -> (Worker, SimTree, MemCursorStore) {
        let mut cur = MemCursorStore::default();
        let ap = Applier::start_at(&mut cur, 0).expect("cursor");
        let tree = SimTree::new().with_kill(KillSwitch::new());
        (Worker::new(ap, Duration::ZERO, idle), tree, cur)
    }
    /// The tree's next mutating call fails with EIO (transient), the ones after it succeed.
    fn fail_next(t: &mut SimTree) -> KillSwitch {
        let k = KillSwitch::new();
        k.arm(1);
        *t = std::mem::take(t).with_kill(k.clone());
        k
    }
    fn give(item: Item) -> impl FnOnce() -> Result<Item, Infallible> {
        move || Ok(item)
    }
    fn turn(
        w: &mut Worker,
        t: &mut SimTree,
        c: &mut MemCursorStore,
        ms: u64,
        want: u64,
        item: Item,
    ) -> Turn {
        match w.turn(t, c, Duration::from_millis(ms), want, give(item)) {
            Ok(turn) => turn,
            Err(never) => match never {},
        }
    }

    #[test]
    fn applies_skips_and_waits_in_order() {
        let (mut w, mut t, mut c) = worker(false);
        let a = turn(&mut w, &mut t, &mut c, 0, 0, Item::Apply(create(1, "f")));
        assert!(matches!(
            a,
            Turn::Applied {
                seq: 1,
                copying: false,
                copy_done: None,
                ..
            }
        ));
        assert_eq!(
            turn(&mut w, &mut t, &mut c, 0, 0, Item::Skip(2)),
            Turn::Skipped { seq: 2 }
        );
        assert_eq!(turn(&mut w, &mut t, &mut c, 0, 0, Item::Wait), Turn::Idle);
        assert_eq!(w.applier().cursor().applied, 2);
        assert_eq!(w.applier().cursor().checkpoint, 0);
    }

    #[test]
    fn checkpoints_every_second_while_applying_and_not_when_nothing_changed() {
        let (mut w, mut t, mut c) = worker(false);
        turn(&mut w, &mut t, &mut c, 10, 0, Item::Apply(create(1, "f")));
        // Not yet a second: the next item is taken.
        let a = turn(&mut w, &mut t, &mut c, 900, 0, Item::Apply(write(2, "f")));
        assert!(matches!(a, Turn::Applied { seq: 2, .. }));
        // A second since the start: the checkpoint comes before the next item.
        let mut asked = false;
        let r = w.turn(&mut t, &mut c, Duration::from_millis(1000), 0, || {
            asked = true;
            Ok::<_, Infallible>(Item::Wait)
        });
        assert_eq!(r, Ok(Turn::Checkpointed { checkpoint: 2 }));
        assert!(!asked, "a due checkpoint is taken before the feed is asked");
        // Two seconds later with nothing applied since: no checkpoint.
        assert_eq!(
            turn(&mut w, &mut t, &mut c, 3000, 0, Item::Wait),
            Turn::Idle
        );
    }

    #[test]
    fn a_waiter_gets_its_checkpoint_once_its_record_is_applied() {
        let (mut w, mut t, mut c) = worker(false);
        turn(&mut w, &mut t, &mut c, 0, 2, Item::Apply(create(1, "f")));
        // Record 2 is wanted but not applied yet: no checkpoint of 1 alone.
        let a = turn(&mut w, &mut t, &mut c, 1, 2, Item::Apply(write(2, "f")));
        assert!(matches!(a, Turn::Applied { seq: 2, .. }));
        assert_eq!(
            turn(&mut w, &mut t, &mut c, 2, 2, Item::Wait),
            Turn::Checkpointed { checkpoint: 2 }
        );
        assert_eq!(c.durable, c.live, "the checkpoint is durable");
    }

    #[test]
    fn a_daemon_checkpoints_as_soon_as_it_is_idle() {
        let (mut w, mut t, mut c) = worker(true);
        turn(&mut w, &mut t, &mut c, 0, 0, Item::Apply(create(1, "f")));
        assert_eq!(
            turn(&mut w, &mut t, &mut c, 0, 0, Item::Wait),
            Turn::Checkpointed { checkpoint: 1 }
        );
        assert_eq!(turn(&mut w, &mut t, &mut c, 0, 0, Item::Wait), Turn::Idle);
    }

    #[test]
    fn the_end_of_an_initial_copy_is_made_durable_at_once() {
        let (mut w, mut t, mut c) = worker(false);
        w.applier_mut().set_syncing(Some(9));
        let a = turn(&mut w, &mut t, &mut c, 0, 0, Item::Apply(create(1, "f")));
        assert!(matches!(a, Turn::Applied { copying: true, .. }));
        // Another mirror's SyncDone does not end this copy.
        let a = turn(
            &mut w,
            &mut t,
            &mut c,
            0,
            0,
            Item::Apply(rec(2, Op::SyncDone { mirror: 3 })),
        );
        assert!(matches!(
            a,
            Turn::Applied {
                copying: true,
                copy_done: None,
                ..
            }
        ));
        let a = turn(
            &mut w,
            &mut t,
            &mut c,
            0,
            0,
            Item::Apply(rec(3, Op::SyncDone { mirror: 9 })),
        );
        assert_eq!(
            a,
            Turn::Applied {
                seq: 3,
                data_bytes: 0,
                checkpoint: 3,
                copying: false,
                copy_done: Some(Ok(())),
            }
        );
    }

    #[test]
    fn a_transient_failure_keeps_the_record_and_backs_off_doubling_to_its_bound() {
        let (mut w, mut t, mut c) = worker(false);
        turn(&mut w, &mut t, &mut c, 0, 0, Item::Apply(create(1, "f")));
        let k = fail_next(&mut t);
        let r = turn(&mut w, &mut t, &mut c, 0, 0, Item::Apply(write(2, "f")));
        assert!(
            matches!(r, Turn::Retry { after, .. } if after == BACKOFF_MIN),
            "{r:?}"
        );
        k.revive();
        // The kept record is tried first; the feed is not asked.
        let a = w.turn(
            &mut t,
            &mut c,
            Duration::ZERO,
            0,
            || -> Result<Item, Infallible> { panic!("the feed was asked while a record was kept") },
        );
        assert!(matches!(a, Ok(Turn::Applied { seq: 2, .. })));
        // Back-off doubles and stops at its bound, and resets after a success.
        let mut afters = Vec::new();
        for _ in 0..10 {
            let k = fail_next(&mut t);
            if let Turn::Retry { after, .. } =
                turn(&mut w, &mut t, &mut c, 0, 0, Item::Apply(write(3, "f")))
            {
                afters.push(after);
            }
            k.revive();
        }
        assert_eq!(afters.len(), 10);
        assert!(afters
            .windows(2)
            .all(|x| x[1] == (x[0] * 2).min(BACKOFF_MAX)));
        assert_eq!(afters.last(), Some(&BACKOFF_MAX));
    }

    #[test]
    fn a_record_that_no_longer_fits_the_tree_is_a_divergence() {
        let (mut w, mut t, mut c) = worker(false);
        // A write to a file the mirror does not have: the mirror is not the primary's prefix.
        let r = turn(
            &mut w,
            &mut t,
            &mut c,
            0,
            0,
            Item::Apply(write(1, "missing")),
        );
        assert!(matches!(r, Turn::Diverged { .. }), "{r:?}");
        // A gap in the sequence is one too.
        let (mut w, mut t, mut c) = worker(false);
        let r = turn(&mut w, &mut t, &mut c, 0, 0, Item::Skip(5));
        assert!(matches!(r, Turn::Diverged { .. }), "{r:?}");
    }

    fn worker_with_cursor() -> (Worker, SimTree, SimCursor) {
        let mut cur = SimCursor::default();
        let ap = Applier::start_at(&mut cur, 0).expect("cursor");
        let tree = SimTree::new().with_kill(KillSwitch::new());
        (Worker::new(ap, Duration::ZERO, false), tree, cur)
    }
    fn sturn(w: &mut Worker, t: &mut SimTree, c: &mut SimCursor, want: u64, item: Item) -> Turn {
        match w.turn(t, c, Duration::ZERO, want, give(item)) {
            Ok(turn) => turn,
            Err(never) => match never {},
        }
    }
    /// The generations in the two cursor slots, oldest first.
    fn generations(c: &mut SimCursor) -> Vec<u64> {
        let slots = c.read_slots().expect("slots");
        let mut g: Vec<u64> = slots
            .chunks(crate::applier::CURSOR_SLOT_BYTES)
            .filter_map(|s| crate::applier::decode_cursor(s).map(|(g, _)| g))
            .collect();
        g.sort_unstable();
        g
    }

    #[test]
    fn a_failed_cursor_write_is_retried_without_applying_again() {
        let rename = || {
            rec(
                2,
                Op::Rename {
                    from: p("f"),
                    to: p("h"),
                    flags: 0,
                    from_ino: 0,
                },
            )
        };
        // (which cursor write fails, the item): a barrier's intent, its end. (A record or a skip
        // writes no cursor: `the_cursor_says_what_was_applied_once_per_batch`.)
        let cases = [(1, Item::Apply(rename())), (2, Item::Apply(rename()))];
        for (nth, item) in cases {
            let what = format!("{item:?}, cursor write {nth}");
            let (mut w, mut t, mut c) = worker_with_cursor();
            sturn(&mut w, &mut t, &mut c, 0, Item::Apply(create(1, "f")));
            let good = generations(&mut c);
            c.kill.arm(nth);
            let r = sturn(&mut w, &mut t, &mut c, 0, item);
            assert!(matches!(r, Turn::Retry { .. }), "{what}: {r:?}");
            assert!(
                w.applier().cursor().checkpoint <= 1,
                "{what}: a checkpoint that was not written"
            );
            c.kill.revive();
            let r = w.turn(
                &mut t,
                &mut c,
                Duration::ZERO,
                0,
                || -> Result<Item, Infallible> {
                    panic!("the feed was asked while a record was kept")
                },
            );
            assert!(
                matches!(r, Ok(Turn::Applied { seq: 2, .. })),
                "{what}: {r:?}"
            );
            // The cursor as stored says so, and the newest good slot was never overwritten.
            let stored = Applier::open(&mut c, false, 0)
                .expect("read")
                .expect("cursor");
            assert_eq!(stored.cursor().applied, 2, "{what}");
            let g = generations(&mut c);
            assert!(
                g[1] == g[0] + 1 && g[0] >= good[1],
                "{what}: {good:?} then {g:?}"
            );
            // And the mirror goes on.
            let a = sturn(&mut w, &mut t, &mut c, 0, Item::Apply(create(3, "g")));
            assert!(matches!(a, Turn::Applied { seq: 3, .. }), "{what}: {a:?}");
        }
    }

    /// The `applied` the cursor file holds (what a process crash resumes after).
    fn stored_applied(c: &mut SimCursor) -> u64 {
        Applier::open(c, false, 0)
            .expect("read")
            .expect("cursor")
            .cursor()
            .applied
    }

    #[test]
    fn the_cursor_says_what_was_applied_once_per_batch() {
        let (mut w, mut t, mut c) = worker_with_cursor();
        let start = generations(&mut c);
        sturn(&mut w, &mut t, &mut c, 0, Item::Apply(create(1, "f")));
        sturn(&mut w, &mut t, &mut c, 0, Item::Skip(2));
        // Applied records and skips alone write nothing.
        assert_eq!(generations(&mut c), start);
        assert_eq!(stored_applied(&mut c), 0);
        // The feed runs dry: the batch ends with one write (no fsync).
        assert_eq!(sturn(&mut w, &mut t, &mut c, 0, Item::Wait), Turn::Idle);
        assert_eq!(stored_applied(&mut c), 2);
        assert_eq!(generations(&mut c)[1], start[1] + 1);
        assert_ne!(c.mem.durable, c.mem.live, "not a checkpoint");
        // Nothing new: no write.
        assert_eq!(sturn(&mut w, &mut t, &mut c, 0, Item::Wait), Turn::Idle);
        assert_eq!(generations(&mut c)[1], start[1] + 1);
        // A long run is written every APPLIED_BATCH records, before the next one is asked for.
        let mut seq = 3;
        for _ in 0..APPLIED_BATCH {
            let a = sturn(&mut w, &mut t, &mut c, 0, Item::Apply(write(seq, "f")));
            assert!(matches!(a, Turn::Applied { .. }), "{a:?}");
            seq += 1;
        }
        assert_eq!(stored_applied(&mut c), 2);
        // The write fails: a retry, nothing kept, the feed not asked.
        c.kill.arm(1);
        let r = w.turn(
            &mut t,
            &mut c,
            Duration::ZERO,
            0,
            || -> Result<Item, Infallible> {
                panic!("the feed was asked before the batch's write")
            },
        );
        assert!(matches!(r, Ok(Turn::Retry { .. })), "{r:?}");
        c.kill.revive();
        let a = sturn(&mut w, &mut t, &mut c, 0, Item::Apply(write(seq, "f")));
        assert!(matches!(a, Turn::Applied { .. }), "{a:?}");
        assert_eq!(stored_applied(&mut c), 2 + APPLIED_BATCH);
        // The newest good slot was never overwritten by the failed write.
        let g = generations(&mut c);
        assert_eq!(g[1], g[0] + 1);
    }

    /// A process killed mid-batch: the cursor file says less than the tree holds, and the
    /// restart re-applies the records between in replay mode to the same tree.
    #[test]
    fn a_kill_before_the_batch_is_written_replays_it_to_the_same_tree() {
        let (mut w, mut t, mut c) = worker_with_cursor();
        let records = vec![
            create(1, "f"),
            write(2, "f"),
            rec(
                3,
                Op::SetMode {
                    path: p("f"),
                    mode: 0o600,
                },
            ),
            create(4, "g"),
            write(5, "g"),
            rec(
                6,
                Op::Truncate {
                    path: p("f"),
                    size: 10,
                },
            ),
        ];
        for r in &records {
            let a = sturn(&mut w, &mut t, &mut c, 0, Item::Apply(r.clone()));
            assert!(matches!(a, Turn::Applied { .. }), "{a:?}");
        }
        let want = t.snapshot();
        assert_eq!(stored_applied(&mut c), 0, "killed before the batch's write");
        // The restart (no power loss): from the stored `applied`, the journal's end as horizon.
        let ap = Applier::open(&mut c, false, 6)
            .expect("read")
            .expect("cursor");
        assert_eq!(ap.next_seq(), 1);
        assert!(ap.in_replay());
        let mut w = Worker::new(ap, Duration::ZERO, false);
        for r in &records {
            let a = sturn(&mut w, &mut t, &mut c, 0, Item::Apply(r.clone()));
            assert!(
                matches!(a, Turn::Applied { .. }),
                "replay of {}: {a:?}",
                r.seq
            );
        }
        assert_eq!(t.snapshot().diff(&want, 10), Vec::<String>::new());
        assert!(!w.applier().in_replay());
    }

    #[test]
    fn a_checkpoint_whose_cursor_write_failed_is_not_reported_and_stays_due() {
        let (mut w, mut t, mut c) = worker_with_cursor();
        sturn(&mut w, &mut t, &mut c, 1, Item::Apply(create(1, "f")));
        c.kill.arm(1);
        let r = sturn(&mut w, &mut t, &mut c, 1, Item::Wait);
        assert!(matches!(r, Turn::Retry { .. }), "{r:?}");
        assert_eq!(w.applier().cursor().checkpoint, 0, "not durable, not moved");
        c.kill.revive();
        assert_eq!(
            sturn(&mut w, &mut t, &mut c, 1, Item::Wait),
            Turn::Checkpointed { checkpoint: 1 }
        );
        assert_eq!(c.mem.durable, c.mem.live);
    }

    #[test]
    fn a_sync_done_whose_checkpoint_failed_is_reported_so_the_copy_is_made_again() {
        let (mut w, mut t, mut c) = worker_with_cursor();
        w.applier_mut().set_syncing(Some(9));
        // The `SyncDone` itself writes no cursor; the checkpoint after it is the first write.
        c.kill.arm(1);
        let r = sturn(
            &mut w,
            &mut t,
            &mut c,
            0,
            Item::Apply(rec(1, Op::SyncDone { mirror: 9 })),
        );
        assert!(
            matches!(
                r,
                Turn::Applied {
                    seq: 1,
                    checkpoint: 0,
                    copying: false,
                    copy_done: Some(Err(_)),
                    ..
                }
            ),
            "{r:?}"
        );
        assert_eq!(
            durable_checkpoint(&c.mem),
            0,
            "not durable: the marker stays"
        );
        c.kill.revive();
        // The checkpoint stays due and is taken at the next turn.
        assert_eq!(
            sturn(&mut w, &mut t, &mut c, 1, Item::Wait),
            Turn::Checkpointed { checkpoint: 1 }
        );
    }

    /// The checkpoint in the durable image of the cursor store (what a power loss leaves).
    fn durable_checkpoint(c: &MemCursorStore) -> u64 {
        let mut after = c.clone();
        after.crash(false);
        Applier::open(&mut after, true, 0)
            .expect("read")
            .map_or(0, |a| a.cursor().checkpoint)
    }

    #[test]
    fn an_offloaded_checkpoint_makes_durable_only_what_was_applied_before_its_sync() {
        let (w, mut t, mut c) = worker(true);
        let mut w = w.offload_checkpoints();
        turn(&mut w, &mut t, &mut c, 0, 0, Item::Apply(create(1, "f")));
        turn(&mut w, &mut t, &mut c, 0, 0, Item::Apply(write(2, "f")));
        // Idle: the sync is the shell's to start; nothing is durable yet.
        assert_eq!(
            turn(&mut w, &mut t, &mut c, 0, 0, Item::Wait),
            Turn::SyncStart { upto: 2 }
        );
        assert_eq!(w.in_flight(), Some(2));
        t.sync().expect("sync");
        // The worker goes on applying while the sync runs; no second sync is started.
        let a = turn(&mut w, &mut t, &mut c, 5, 0, Item::Apply(create(3, "g")));
        assert!(matches!(a, Turn::Applied { seq: 3, .. }), "{a:?}");
        assert_eq!(turn(&mut w, &mut t, &mut c, 5, 3, Item::Wait), Turn::Idle);
        let a = turn(&mut w, &mut t, &mut c, 2000, 3, Item::Apply(write(4, "g")));
        assert!(matches!(a, Turn::Applied { seq: 4, .. }), "{a:?}");
        // A crash before the sync ends: the cursor is where it was.
        assert_eq!(durable_checkpoint(&c), 0);
        // The sync ends: the checkpoint is what was applied when it began, not 4.
        assert_eq!(
            w.synced(&mut c, Ok(())),
            Turn::Checkpointed { checkpoint: 2 }
        );
        assert_eq!(durable_checkpoint(&c), 2);
        assert_eq!(w.applier().cursor().applied, 4);
        // The rest is the next sync's.
        assert_eq!(
            turn(&mut w, &mut t, &mut c, 2000, 4, Item::Wait),
            Turn::SyncStart { upto: 4 }
        );
        // A failed sync moves nothing and the checkpoint stays due.
        let r = w.synced(
            &mut c,
            Err(TreeError::Other {
                path: String::new(),
                errno: 5,
                msg: "syncfs: EIO".into(),
            }),
        );
        assert!(matches!(r, Turn::Retry { .. }), "{r:?}");
        assert_eq!(durable_checkpoint(&c), 2);
        assert_eq!(
            turn(&mut w, &mut t, &mut c, 2000, 4, Item::Wait),
            Turn::SyncStart { upto: 4 }
        );
        // A stale report changes nothing.
        assert_eq!(
            w.synced(&mut c, Ok(())),
            Turn::Checkpointed { checkpoint: 4 }
        );
        assert_eq!(w.synced(&mut c, Ok(())), Turn::Idle);
        assert_eq!(durable_checkpoint(&c), 4);
    }

    #[test]
    fn a_sync_that_ends_after_a_barrier_never_moves_the_checkpoint_back() {
        let (w, mut t, mut c) = worker(false);
        let mut w = w.offload_checkpoints();
        turn(&mut w, &mut t, &mut c, 0, 0, Item::Apply(create(1, "f")));
        assert_eq!(
            turn(&mut w, &mut t, &mut c, 0, 1, Item::Wait),
            Turn::SyncStart { upto: 1 }
        );
        // A rename is a barrier: it syncs on the applying thread and checkpoints itself.
        let rename = rec(
            2,
            Op::Rename {
                from: p("f"),
                to: p("h"),
                flags: 0,
                from_ino: 0,
            },
        );
        let a = turn(&mut w, &mut t, &mut c, 0, 1, Item::Apply(rename));
        assert!(matches!(a, Turn::Applied { checkpoint: 2, .. }), "{a:?}");
        assert_eq!(
            w.synced(&mut c, Ok(())),
            Turn::Checkpointed { checkpoint: 2 }
        );
        assert_eq!(durable_checkpoint(&c), 2);
    }

    #[test]
    fn stop_makes_everything_applied_durable() {
        let (mut w, mut t, mut c) = worker(false);
        turn(&mut w, &mut t, &mut c, 0, 0, Item::Apply(create(1, "f")));
        turn(&mut w, &mut t, &mut c, 0, 0, Item::Apply(write(2, "f")));
        assert_eq!(w.stop(&mut t, &mut c).ok(), Some(2));
        assert_eq!(c.durable, c.live);
    }
}
