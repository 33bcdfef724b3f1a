//! Group-atomic mirroring (SMFS): a mirror shows all of a group's changes or none of them.
//!
//! ```text
//!  journal:  … 41 ─ 42 GroupBegin ─ 43 write a ─ 44 write b ─ 45 GroupEnd ─ 46 …
//!  Gate:        limit u64::MAX   │ limit 41 (while 45 is not known)     │ limit u64::MAX
//!  applier:  applies ≤ min(durable, settled, limit): 43 and 44 wait until 45 is in the journal
//! ```
//!
//! An application marks a group with a `GroupBegin` and a `GroupEnd` record (the mount's
//! `user.mirrorfs.group` attribute, `mirrorfs group`). Groups that overlap — two processes, or a
//! begin inside a begin — merge: everything from the first open `GroupBegin` to the `GroupEnd`
//! that closes the last open group is one unit. [`Gate`] follows the group records in journal
//! order and answers the highest seq an applier may apply through: the record before the
//! outermost open group's `GroupBegin`. Every applier reads its journal with that bound
//! (as part of the settled bound of [`crate::feed`]), so it never starts a group whose end is
//! not durable in the journal it reads. Hence:
//! - whenever an applier waits, its tree is at a group boundary;
//! - after any crash, once recovery replays the journal to its durable end, the tree is at a
//!   group boundary too: a group the applier started has its end durable;
//! - a promotion restarts the journal at the applied position, so a group that never ended is
//!   dropped whole by the promoted site, and comes back with the old primary's unshipped tail at
//!   failback (reintegration).
//!
//! Bounds: at most [`MAX_OPEN`] groups are open at once ([`Gate::may_begin`] refuses more); a
//! group holds its mirrors back for as long as it stays open, so the journal's size bound is also
//! the bound on a group: a mirror held back past it is detached and resynced, as any mirror that
//! falls too far behind. A primary that restarts ends the groups its crash left open.

use std::collections::VecDeque;

use crate::op::Op;

/// The most groups open at once on one volume.
pub const MAX_OPEN: u32 = 1024;
/// The most ended units whose end is not durable yet that the gate tells apart; beyond it the
/// newest two merge (an applier then waits for the later end: safe, never wrong).
pub const MAX_UNITS: usize = 4096;

/// Why a group record was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("{MAX_OPEN} groups are already open; end one first")]
    TooMany,
    #[error("no group is open")]
    NoneOpen,
}

/// The groups of one journal, followed record by record in journal order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gate {
    /// Groups open now.
    open: u32,
    /// Units an applier must not start yet, oldest first: (seq of the unit's first
    /// `GroupBegin`, seq of the `GroupEnd` that closed it, `None` while open). Ended units
    /// leave once their end is durable ([`Gate::limit`]).
    units: VecDeque<(u64, Option<u64>)>,
}

impl Gate {
    /// The gate after the records `ops` (in journal order, with their seqs). A `GroupEnd` with
    /// no open group (its `GroupBegin` was before the first record given) is ignored.
    pub fn scan<'a>(ops: impl IntoIterator<Item = (u64, &'a Op)>) -> Gate {
        let mut g = Gate::default();
        for (seq, op) in ops {
            g.observe(seq, op);
        }
        g
    }

    /// Follows record `seq`; only group records change the gate.
    pub fn observe(&mut self, seq: u64, op: &Op) {
        match op {
            Op::GroupBegin => {
                if self.open == 0 {
                    self.units.push_back((seq, None));
                }
                self.open = self.open.saturating_add(1);
            }
            Op::GroupEnd if self.open > 0 => {
                self.open -= 1;
                if self.open == 0 {
                    if let Some(u) = self.units.back_mut() {
                        u.1 = Some(seq);
                    }
                    if self.units.len() > MAX_UNITS {
                        if let Some((_, end)) = self.units.pop_back() {
                            if let Some(u) = self.units.back_mut() {
                                u.1 = end;
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Whether another group may open (at most [`MAX_OPEN`]).
    pub fn may_begin(&self) -> Result<(), GroupError> {
        if self.open >= MAX_OPEN {
            return Err(GroupError::TooMany);
        }
        Ok(())
    }

    /// Whether a group is open to end.
    pub fn may_end(&self) -> Result<(), GroupError> {
        if self.open == 0 {
            return Err(GroupError::NoneOpen);
        }
        Ok(())
    }

    /// Groups open now.
    pub fn open(&self) -> u32 {
        self.open
    }

    /// The seq of the open group's first `GroupBegin`, if a group is open: changes after it
    /// reach no mirror's tree before the group ends.
    pub fn open_since(&self) -> Option<u64> {
        match self.units.back() {
            Some((since, None)) => Some(*since),
            _ => None,
        }
    }

    /// The highest seq an applier reading a journal durable through `durable` may apply
    /// through: the record before the first unit that is open or whose `GroupEnd` is not
    /// durable yet; `None` when there is none. Forgets the units that `durable` completes.
    pub fn limit(&mut self, durable: u64) -> Option<u64> {
        while let Some((_, Some(end))) = self.units.front() {
            if *end > durable {
                break;
            }
            self.units.pop_front();
        }
        self.units.front().map(|(since, _)| since.saturating_sub(1))
    }
}

/// Crash-atomic groups without an explicit API (`mount --fsync-groups`): the changes made on a
/// volume between two syncs form one group, so a mirror shows all of them or none — the
/// journal's counterpart of SMFS, where one sync is one log append. The first change after a
/// sync begins the group (its `GroupBegin` is journaled right before the change); the next
/// `fsync`/`fdatasync`/`fsyncdir` on the mount ends it, before that sync waits for the mode's
/// level. A group nobody syncs ends once it is `max_age` old, so a program that never syncs
/// holds its mirrors back by at most that much: its changes then reach mirrors in groups of at
/// most `max_age`. At most one such group is open at a time (it merges with explicit groups
/// that overlap it, as any groups do). Time is passed in (microseconds of a monotonic clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncGroups {
    max_age_us: u64,
    /// When the open group began.
    open_since_us: Option<u64>,
    pub stats: SyncGroupStats,
}

/// What [`SyncGroups`] did, for `status` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncGroupStats {
    pub begun: u64,
    pub ended_by_sync: u64,
    pub ended_by_age: u64,
}

/// Why a sync group ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncEnd {
    /// An application synced: the group is everything that sync covers.
    Sync,
    /// Nobody synced within `max_age`.
    Age,
}

impl SyncGroups {
    pub fn new(max_age_us: u64) -> Self {
        SyncGroups {
            max_age_us: max_age_us.max(1),
            open_since_us: None,
            stats: SyncGroupStats::default(),
        }
    }

    /// Whether a change about to be journaled needs a `GroupBegin` first.
    pub fn needs_begin(&self) -> bool {
        self.open_since_us.is_none()
    }

    /// The `GroupBegin` was journaled at `now_us`.
    pub fn began(&mut self, now_us: u64) {
        self.open_since_us = Some(now_us);
        self.stats.begun += 1;
    }

    /// Whether the group should end now for `why` (open, and for `Age`: `max_age` old).
    pub fn should_end(&self, why: SyncEnd, now_us: u64) -> bool {
        match (self.open_since_us, why) {
            (None, _) => false,
            (Some(_), SyncEnd::Sync) => true,
            (Some(since), SyncEnd::Age) => now_us.saturating_sub(since) >= self.max_age_us,
        }
    }

    /// The `GroupEnd` was journaled.
    pub fn ended(&mut self, why: SyncEnd) {
        if self.open_since_us.take().is_some() {
            match why {
                SyncEnd::Sync => self.stats.ended_by_sync += 1,
                SyncEnd::Age => self.stats.ended_by_age += 1,
            }
        }
    }

    /// Whether a group is open (it counts among the gate's open groups).
    pub fn is_open(&self) -> bool {
        self.open_since_us.is_some()
    }

    /// When the open group reaches its age limit, if one is open.
    pub fn deadline_us(&self) -> Option<u64> {
        self.open_since_us
            .map(|s| s.saturating_add(self.max_age_us))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_group_begins_at_the_first_change_and_ends_at_the_sync() {
        let mut s = SyncGroups::new(1_000);
        assert!(
            !s.should_end(SyncEnd::Sync, 0),
            "nothing to end before a change"
        );
        assert!(s.needs_begin());
        s.began(10);
        assert!(!s.needs_begin(), "later changes join the open group");
        assert!(s.is_open());
        assert!(s.should_end(SyncEnd::Sync, 11));
        s.ended(SyncEnd::Sync);
        assert!(s.needs_begin(), "the next change begins the next group");
        assert_eq!(
            s.stats,
            SyncGroupStats {
                begun: 1,
                ended_by_sync: 1,
                ended_by_age: 0
            }
        );
    }

    #[test]
    fn a_sync_group_nobody_syncs_ends_at_its_age_limit() {
        let mut s = SyncGroups::new(1_000);
        s.began(5_000);
        assert_eq!(s.deadline_us(), Some(6_000));
        assert!(!s.should_end(SyncEnd::Age, 5_999));
        assert!(s.should_end(SyncEnd::Age, 6_000));
        s.ended(SyncEnd::Age);
        assert_eq!((s.deadline_us(), s.stats.ended_by_age), (None, 1));
        // A second end (a sync racing the timer) counts nothing.
        s.ended(SyncEnd::Sync);
        assert_eq!(s.stats.ended_by_sync, 0);
    }

    fn write() -> Op {
        Op::Truncate {
            path: crate::path::RelPath::new("f").expect("path"),
            size: 1,
        }
    }

    #[test]
    fn no_group_sets_no_limit() {
        let w = write();
        let mut g = Gate::scan([(1, &w), (2, &w)]);
        assert_eq!((g.open(), g.limit(2)), (0, None));
        assert_eq!(g.may_end(), Err(GroupError::NoneOpen));
    }

    #[test]
    fn an_open_group_holds_appliers_before_its_begin_until_its_end() {
        let (w, b, e) = (write(), Op::GroupBegin, Op::GroupEnd);
        let mut g = Gate::scan([(1, &w), (2, &b), (3, &w)]);
        assert_eq!((g.limit(3), g.open_since()), (Some(1), Some(2)));
        g.observe(4, &w);
        assert_eq!(
            g.limit(4),
            Some(1),
            "later changes stay behind the group too"
        );
        g.observe(5, &e);
        assert_eq!(g.open_since(), None);
        assert_eq!(g.limit(4), Some(1), "until the end is durable");
        assert_eq!(g.limit(5), None);
        assert_eq!(g.limit(4), None, "a completed unit is forgotten");
    }

    #[test]
    fn overlapping_groups_merge_into_one_unit() {
        let (w, b, e) = (write(), Op::GroupBegin, Op::GroupEnd);
        let mut g = Gate::scan([(1, &b), (2, &w), (3, &b), (4, &w), (5, &e)]);
        // The first group ended but the second, begun inside it, is still open: the limit stays
        // before the first begin, so neither group shows on its own.
        assert_eq!((g.open(), g.limit(5)), (1, Some(0)));
        g.observe(6, &e);
        assert_eq!(g.limit(6), None);
        // A new group after the merged one is gated at its own begin.
        g.observe(7, &b);
        assert_eq!(g.limit(7), Some(6));
    }

    #[test]
    fn an_end_whose_begin_was_not_seen_is_ignored() {
        let (w, e, b) = (write(), Op::GroupEnd, Op::GroupBegin);
        let mut g = Gate::scan([(10, &e), (11, &w)]);
        assert_eq!((g.open(), g.limit(11)), (0, None));
        g.observe(12, &b);
        assert_eq!(g.limit(12), Some(11));
    }

    #[test]
    fn at_most_max_open_groups() {
        let b = Op::GroupBegin;
        let mut g = Gate::default();
        for seq in 1..=u64::from(MAX_OPEN) {
            assert_eq!(g.may_begin(), Ok(()));
            g.observe(seq, &b);
        }
        assert_eq!(g.may_begin(), Err(GroupError::TooMany));
        assert_eq!(g.limit(u64::MAX), Some(0));
    }

    /// Two groups ended one after the other before either end is durable: the applier may go
    /// through the first only once the first end is durable, and not into the second before
    /// its end is.
    #[test]
    fn each_ended_unit_waits_for_its_own_end_to_be_durable() {
        let (w, b, e) = (write(), Op::GroupBegin, Op::GroupEnd);
        let mut g = Gate::scan([(1, &b), (2, &w), (3, &e), (4, &b), (5, &w), (6, &e)]);
        assert_eq!(g.limit(2), Some(0));
        assert_eq!(g.limit(3), Some(3));
        assert_eq!(g.limit(5), Some(3));
        assert_eq!(g.limit(6), None);
    }

    #[test]
    fn ended_units_are_bounded_by_merging_the_newest() {
        let (b, e) = (Op::GroupBegin, Op::GroupEnd);
        let mut g = Gate::default();
        let n = MAX_UNITS as u64 + 10;
        for i in 0..n {
            g.observe(2 * i + 1, &b);
            g.observe(2 * i + 2, &e);
        }
        assert!(g.units.len() <= MAX_UNITS + 1);
        // Nothing durable: the first unit holds everything.
        assert_eq!(g.limit(0), Some(0));
        // Every end durable: nothing held.
        assert_eq!(g.limit(2 * n), None);
        assert!(g.units.is_empty());
    }

    proptest::proptest! {
        /// Whatever the group records and the durable position, the limit never lets an
        /// applier into a unit whose end is not durable: every seq through the limit is before
        /// every open unit's begin and before every unit whose end is past `durable`.
        #[test]
        fn the_limit_never_enters_an_incomplete_unit(
            kinds in proptest::collection::vec(0u8..3, 1..200),
            durable_at in 0usize..200,
        ) {
            let ops: Vec<Op> = kinds.iter().map(|k| match k {
                0 => Op::GroupBegin,
                1 => Op::GroupEnd,
                _ => write(),
            }).collect();
            let durable = (durable_at.min(ops.len())) as u64;
            let mut g = Gate::scan(ops.iter().enumerate().map(|(i, op)| (i as u64 + 1, op)));
            let limit = g.limit(durable).unwrap_or(u64::MAX).min(durable);
            // Replay: the units as a plain reference model.
            let mut open = 0u32;
            let mut since = 0u64;
            for (i, op) in ops.iter().enumerate() {
                let seq = i as u64 + 1;
                match op {
                    Op::GroupBegin => { if open == 0 { since = seq; } open += 1; }
                    Op::GroupEnd if open > 0 => {
                        open -= 1;
                        if open == 0 && seq > durable {
                            proptest::prop_assert!(limit < since, "limit {limit} enters unit {since}..{seq}, durable {durable}");
                        }
                    }
                    _ => {}
                }
            }
            if open > 0 {
                proptest::prop_assert!(limit < since);
            }
        }
    }
}
