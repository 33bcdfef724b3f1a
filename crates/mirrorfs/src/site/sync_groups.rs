//! `mount --fsync-groups`: the changes made between two syncs form one group (the decisions are
//! `core::group::SyncGroups`'s; the records and their gate are `core::group`'s). This module
//! journals the implicit `GroupBegin` before the first change after a sync, the `GroupEnd` at
//! the next `fsync`, and runs the timer that ends a group nobody syncs.
//!
//! ```text
//!  change ─▶ order lock { [GroupBegin if none open] ; the change's record } ─▶ reply
//!  fsync  ─▶ order lock { GroupEnd if one is open } ─▶ wait for the mode's level ─▶ reply
//!  timer  ─▶ order lock { GroupEnd if the open group is max_age old }
//! ```
//!
//! Lock order: the order lock, then `SyncGroupClock::groups`, then `Volume::groups` (leaves).

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mirrorfs_core::group::{SyncEnd, SyncGroupStats, SyncGroups};
use mirrorfs_core::journal::Journal;
use mirrorfs_core::op::Op;
use mirrorfs_core::sequencer::{Begin, Sequencer};

use crate::site::store::FileStore;
use crate::site::volume::{lock, Ordered, Volume};

/// The timer never sleeps longer than this, so that a stopping site is not kept waiting.
const TIMER_TICK_MAX: Duration = Duration::from_millis(50);

/// A volume's implicit groups and the clock they are timed by.
pub struct SyncGroupClock {
    base: Instant,
    groups: Mutex<SyncGroups>,
}

impl SyncGroupClock {
    pub fn new(max_age: Duration) -> Self {
        SyncGroupClock {
            base: Instant::now(),
            groups: Mutex::new(SyncGroups::new(max_age.as_micros() as u64)),
        }
    }

    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    pub fn stats(&self) -> SyncGroupStats {
        lock(&self.groups).stats
    }

    /// Whether an implicit group is open (it counts among the gate's open groups).
    pub fn is_open(&self) -> bool {
        lock(&self.groups).is_open()
    }
}

impl Volume {
    fn sync_groups(&self) -> Option<&SyncGroupClock> {
        self.sync_groups.get()
    }

    /// Called under the order lock right before a change is journaled: with `--fsync-groups`
    /// and no implicit group open, journals its `GroupBegin` first. Inside `MAX_OPEN` explicit
    /// groups none is begun (the change is inside a group anyway). The begin is settled with
    /// the change that follows it.
    pub(crate) fn begin_sync_group(&self, o: &mut Ordered) -> Result<(), i32> {
        let Some(clock) = self.sync_groups() else {
            return Ok(());
        };
        let mut s = lock(&clock.groups);
        if !s.needs_begin() || lock(&self.groups).may_begin().is_err() {
            return Ok(());
        }
        self.journal_group_record(&mut o.journal, &mut o.sequencer, Op::GroupBegin)?;
        s.began(clock.now_us());
        Ok(())
    }

    /// Ends the implicit group, if one is open and `why` says so (a sync: always; the timer:
    /// once it is `max_age` old). Journals its `GroupEnd` and settles it.
    pub fn end_sync_group(&self, why: SyncEnd) -> Result<(), i32> {
        let Some(clock) = self.sync_groups() else {
            return Ok(());
        };
        let mut o = lock(&self.order);
        let mut s: MutexGuard<'_, SyncGroups> = lock(&clock.groups);
        if !s.should_end(why, clock.now_us()) {
            return Ok(());
        }
        if lock(&self.groups).may_end().is_err() {
            // Ended by something else (a restart's recovery): forget it.
            s.ended(why);
            return Ok(());
        }
        let Ordered {
            journal, sequencer, ..
        } = &mut *o;
        let (_, last) = self.journal_group_record(journal, sequencer, Op::GroupEnd)?;
        s.ended(why);
        drop(s);
        self.settle(o, last, 0);
        Ok(())
    }

    /// An application's `fsync`, `fdatasync` or `fsyncdir` made its file durable on the backing:
    /// ends the implicit group (`--fsync-groups`), then waits until the local journal and the
    /// mirrors are as far as the mode says (`wait_mirrors_durable`).
    pub fn application_synced(&self) -> Result<(), i32> {
        self.end_sync_group(SyncEnd::Sync)?;
        let seq = self.wait_journal_durable();
        self.wait_mirrors_durable(seq);
        Ok(())
    }

    /// Journals a group record (nothing to apply to the backing; write-ahead, refused whole
    /// with ENOSPC when it does not fit) and follows it in the gate; returns its seq and the
    /// last settled seq. Under the order lock (`Volume::group` and the implicit groups).
    pub(crate) fn journal_group_record(
        &self,
        journal: &mut Journal<FileStore>,
        sequencer: &mut Sequencer,
        op: Op,
    ) -> Result<(u64, u64), i32> {
        let seq = match sequencer.begin(journal, &op, |j| self.relieve_full(j)) {
            Begin::Apply { seq } => seq,
            Begin::Refuse(r) => return Err(self.refused(r)),
        };
        // Observed before the order lock is released, so no later record settles first.
        lock(&self.groups).observe(seq, &op);
        let done = sequencer
            .applied(journal, seq, true)
            .map_err(|r| self.refused(r))?;
        Ok((seq, done.last))
    }

    /// The timer thread of `--fsync-groups`: ends the implicit group once it is `max_age` old,
    /// until the site stops.
    pub fn run_sync_group_timer(&self) {
        let Some(clock) = self.sync_groups() else {
            return;
        };
        loop {
            if lock(&self.progress).stopping {
                return;
            }
            let wait = lock(&clock.groups)
                .deadline_us()
                .map(|d| Duration::from_micros(d.saturating_sub(clock.now_us())))
                .unwrap_or(TIMER_TICK_MAX)
                .min(TIMER_TICK_MAX);
            std::thread::sleep(wait);
            if let Err(e) = self.end_sync_group(SyncEnd::Age) {
                tracing::warn!(
                    "cannot end the group of changes since the last sync (errno {e}); trying again"
                );
                std::thread::sleep(TIMER_TICK_MAX);
            }
        }
    }
}
