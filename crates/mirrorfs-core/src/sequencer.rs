//! The primary's sequencer: the ordering decisions of the write-ahead protocol, without I/O,
//! locks or clocks. The shell holds the order lock, hands the sequencer the journal and tells it
//! what happened to the backing tree; the sequencer appends, decides and tracks `settled`.
//!
//! ```text
//!  begin(op) ──▶ Begin::Apply{seq} ──▶ shell applies to the backing ──▶ applied(seq, ok)
//!     │                                                                  ├─ ok:  settle seq
//!     │                                                                  └─ err: append Abort, settle it
//!     └──▶ Begin::Refuse(NoSpace | Failed): nothing was journaled, the backing must not change
//!  recorded(op): the backing already changed (times it set itself): the journal must get it
//! ```
//!
//! The rule: **the journal never lacks a change the backing has** (and never keeps, un-aborted,
//! one the backing lacks). So a refused write-ahead append refuses the change (`ENOSPC` for a
//! lack of space, the journal is untouched); but a failed `Abort`, or a failed record of a change
//! the backing already made, leaves journal and backing disagreeing: the sequencer poisons itself
//! and refuses everything after (`EIO`), until a restart recovers.

use crate::journal::storage::SegmentStore;
use crate::journal::{Journal, JournalError};
use crate::op::Op;

/// Why a change was refused. The shell maps it to an errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No room (a full disk, or a journal still at its size limit after relief): `ENOSPC`.
    /// Nothing was journaled and nothing else is affected.
    NoSpace(String),
    /// The journal failed (or the sequencer is poisoned): `EIO`, and every later change too.
    Failed(String),
}

/// What `begin` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The record is journaled as `seq`: apply the change to the backing, then call `applied`.
    Apply { seq: u64 },
    /// Do not touch the backing; answer the application with this.
    Refuse(Refusal),
}

/// What follows an apply: the record (or its `Abort`) is the last one; publish `settled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// The record of the change.
    pub seq: u64,
    /// The last record written for it (`seq`, or its `Abort`): publish this as settled.
    pub last: u64,
    /// Whether an `Abort` was appended (the apply failed).
    pub aborted: bool,
}

#[derive(Debug, Default)]
pub struct Sequencer {
    settled: u64,
    /// The record appended but not yet told its outcome (at most one: the order lock).
    in_doubt: Option<u64>,
    poisoned: Option<String>,
}

impl Sequencer {
    /// A sequencer over a journal whose records through `settled` are settled (recovered).
    pub fn new(settled: u64) -> Self {
        Sequencer {
            settled,
            in_doubt: None,
            poisoned: None,
        }
    }

    pub fn settled(&self) -> u64 {
        self.settled
    }
    pub fn in_doubt(&self) -> Option<u64> {
        self.in_doubt
    }
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// Write-ahead: journals `op` before the backing changes. At the journal's size limit,
    /// `relieve` may free space (the shell detaches the mirror furthest behind) and the append is
    /// tried once more; still full, or no space on disk, refuses the change with `NoSpace`.
    pub fn begin<S: SegmentStore>(
        &mut self,
        journal: &mut Journal<S>,
        op: &Op,
        relieve: impl FnOnce(&mut Journal<S>),
    ) -> Begin {
        if let Some(why) = self.refusal() {
            return Begin::Refuse(why);
        }
        let appended = match journal.append(op) {
            Err(JournalError::Full { .. }) => {
                relieve(journal);
                journal.append(op)
            }
            r => r,
        };
        match appended {
            Ok(seq) => {
                self.in_doubt = Some(seq);
                Begin::Apply { seq }
            }
            Err(e @ (JournalError::NoSpace { .. } | JournalError::Full { .. })) => {
                Begin::Refuse(Refusal::NoSpace(e.to_string()))
            }
            Err(e) => Begin::Refuse(self.poison(e.to_string())),
        }
    }

    /// The outcome of applying record `seq` to the backing. A failed apply is followed by an
    /// `Abort`; if that cannot be journaled, the journal claims a change the backing lacks and
    /// the sequencer is poisoned.
    pub fn applied<S: SegmentStore>(
        &mut self,
        journal: &mut Journal<S>,
        seq: u64,
        ok: bool,
    ) -> Result<Settled, Refusal> {
        debug_assert_eq!(self.in_doubt, Some(seq), "applied() of a record not begun");
        self.in_doubt = None;
        let last = if ok {
            seq
        } else {
            match journal.append(&Op::Abort { seq }) {
                Ok(a) => a,
                Err(e) => return Err(self.poison(format!("cannot abort record {seq}: {e}"))),
            }
        };
        self.settled = self.settled.max(last);
        Ok(Settled {
            seq,
            last,
            aborted: !ok,
        })
    }

    /// Journals a change the backing already has (nothing to apply). Any failure, a lack of
    /// space included, poisons: the journal would lack a change the backing has.
    pub fn recorded<S: SegmentStore>(
        &mut self,
        journal: &mut Journal<S>,
        op: &Op,
        relieve: impl FnOnce(&mut Journal<S>),
    ) -> Result<u64, Refusal> {
        if let Some(why) = self.refusal() {
            return Err(why);
        }
        let appended = match journal.append(op) {
            Err(JournalError::Full { .. }) => {
                relieve(journal);
                journal.append(op)
            }
            r => r,
        };
        match appended {
            Ok(seq) => {
                self.settled = self.settled.max(seq);
                Ok(seq)
            }
            Err(e) => Err(self.poison(format!("cannot record a change the backing has: {e}"))),
        }
    }

    fn refusal(&self) -> Option<Refusal> {
        self.poisoned.as_ref().map(|w| Refusal::Failed(w.clone()))
    }

    fn poison(&mut self, why: String) -> Refusal {
        self.poisoned.get_or_insert(why.clone());
        Refusal::Failed(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::storage::MemStore;
    use crate::journal::JournalConfig;

    fn journal(store: &MemStore, max: u64) -> Journal<MemStore> {
        let cfg = JournalConfig {
            segment_bytes: 1 << 20,
            journal_bytes_max: max,
        };
        Journal::open(store.clone(), cfg).expect("open").0
    }

    fn op(n: u8) -> Op {
        Op::Write {
            path: crate::path::RelPath::new("f").expect("valid"),
            offset: 0,
            data: vec![n; 1000],
        }
    }

    fn seq_of(b: Begin) -> u64 {
        match b {
            Begin::Apply { seq } => seq,
            other => panic!("expected Apply, got {other:?}"),
        }
    }

    #[test]
    fn orders_settles_and_aborts_a_failed_apply() {
        let store = MemStore::new();
        let mut j = journal(&store, 64 << 20);
        let mut s = Sequencer::new(0);
        let a = seq_of(s.begin(&mut j, &op(1), |_| {}));
        assert_eq!(s.in_doubt(), Some(a));
        let st = s.applied(&mut j, a, true).expect("settle");
        assert_eq!((st.last, st.aborted, s.settled()), (a, false, a));
        let b = seq_of(s.begin(&mut j, &op(2), |_| {}));
        assert!(b > a);
        let st = s.applied(&mut j, b, false).expect("abort");
        assert!(st.aborted && st.last > b);
        assert_eq!((s.settled(), s.in_doubt()), (st.last, None));
        assert_eq!(j.next_seq(), st.last + 1);
    }

    #[test]
    fn no_space_refuses_without_journaling_or_poisoning() {
        let store = MemStore::new();
        let mut j = journal(&store, 64 << 20);
        let mut s = Sequencer::new(0);
        store.set_free_space(Some(0));
        let before = j.next_seq();
        assert!(matches!(
            s.begin(&mut j, &op(1), |_| {}),
            Begin::Refuse(Refusal::NoSpace(_))
        ));
        assert_eq!(
            (j.next_seq(), s.poisoned(), s.in_doubt()),
            (before, None, None)
        );
        store.set_free_space(None);
        seq_of(s.begin(&mut j, &op(1), |_| {}));
    }

    #[test]
    fn full_journal_relieves_once_then_refuses_with_no_space() {
        let store = MemStore::new();
        let mut j = journal(&store, 2 << 20);
        let mut s = Sequencer::new(0);
        let mut relieved = 0;
        let mut refused = false;
        for i in 0..5000u32 {
            match s.begin(&mut j, &op(i as u8), |_| relieved += 1) {
                Begin::Apply { seq } => {
                    s.applied(&mut j, seq, true).expect("settle");
                }
                Begin::Refuse(Refusal::NoSpace(_)) => {
                    refused = true;
                    break;
                }
                Begin::Refuse(r) => panic!("{r:?}"),
            }
        }
        assert!(refused && relieved == 1 && s.poisoned().is_none());
    }

    #[test]
    fn a_failed_abort_or_record_poisons_and_refuses_everything_after() {
        let store = MemStore::new();
        let mut j = journal(&store, 64 << 20);
        let mut s = Sequencer::new(0);
        let a = seq_of(s.begin(&mut j, &op(1), |_| {}));
        store.fail_next(1);
        assert!(matches!(
            s.applied(&mut j, a, false),
            Err(Refusal::Failed(_))
        ));
        assert!(s.poisoned().is_some());
        assert!(matches!(
            s.begin(&mut j, &op(2), |_| {}),
            Begin::Refuse(Refusal::Failed(_))
        ));
        assert!(s.recorded(&mut j, &op(3), |_| {}).is_err());
    }

    #[test]
    fn a_record_the_backing_has_poisons_when_there_is_no_space() {
        let store = MemStore::new();
        let mut j = journal(&store, 64 << 20);
        let mut s = Sequencer::new(0);
        store.set_free_space(Some(0));
        assert!(matches!(
            s.recorded(&mut j, &op(2), |_| {}),
            Err(Refusal::Failed(_))
        ));
        assert!(s.poisoned().is_some());
    }
}
