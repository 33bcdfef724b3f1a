//! The mirror feed: which journal record a mirror's applier gets next.
//!
//! A record may be handed to an applier only once it is **durable** (≤ the journal's durable
//! position) and **settled** (≤ the primary's settled position: the change is done on the
//! backing tree) and **final**: a change that failed on the backing is followed by its
//! `Abort { seq }` as the very next record, so a record is held back until the record after it is
//! known (or it is the settled position itself, where the primary is done with it and wrote no
//! `Abort`). An aborted record and its `Abort` are both skipped, never applied.
//!
//! [`Feed`] is this decision as a sans-IO state machine. The driver polls it with the current
//! positions; it answers with a read to do ([`Step::Read`]), after which the driver offers the
//! record read (or `None` when there is none yet within the limit), or with what to do next:
//! [`Item::Apply`], [`Item::Skip`] or [`Item::Wait`]. [`Feed::next`] is that loop over a read
//! closure, and [`JournalFeed`] that loop over a journal [`Reader`]; the binary's mirror workers (`volume::RecordFeed`), the mirror daemon's worker and
//! both seeded simulations drive it.

use crate::journal::storage::{SegmentFile, SegmentStore};
use crate::journal::{JournalError, Reader, SegmentView};
use crate::op::{Op, Record};

/// What an applier does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// Apply this record: it is durable, settled and final.
    Apply(Record),
    /// Consume this seq without applying it: an aborted record, or an `Abort` record.
    Skip(u64),
    /// Nothing is ready: wait until the durable or the settled position moves.
    Wait,
}

/// What the feed wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Read the record [`Feed::next_read_seq`] if it is ≤ `limit`, and pass it (or `None`) to
    /// [`Feed::offer`] before polling again.
    Read { limit: u64 },
    /// The turn's answer.
    Ready(Item),
}

/// The driver broke the protocol: offered a record it was not asked for, or not the next one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    #[error("the mirror feed was offered record {got} where record {expected} was next")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("the mirror feed was offered a record it did not ask for")]
    Unasked,
}

/// The feed's state between polls: at most one record held back (plus, within one poll, the
/// record after it).
#[derive(Debug, Clone)]
pub struct Feed {
    /// Seq of the next record to read.
    next_read: u64,
    /// The first record not yet handed out.
    held: Option<Record>,
    /// The record after `held`, read to learn whether `held` is aborted.
    ahead: Option<Record>,
    /// A read was asked for and offered.
    answered: bool,
    /// The last read found nothing within the limit.
    empty: bool,
}

impl Feed {
    /// A feed that hands out records from `next_seq` on (the applier's next seq: after a
    /// restart, the first record the cursor has not consumed).
    pub fn new(next_seq: u64) -> Self {
        Feed {
            next_read: next_seq,
            held: None,
            ahead: None,
            answered: true,
            empty: false,
        }
    }

    /// Seq of the record a [`Step::Read`] asks for.
    pub fn next_read_seq(&self) -> u64 {
        self.next_read
    }

    /// What to do, given the journal's durable position and the primary's settled position
    /// (neither ever moves back). After a [`Step::Read`], call [`Feed::offer`] and poll again
    /// with the same positions; every other step ends the turn.
    pub fn poll(&mut self, durable: u64, settled: u64) -> Step {
        let limit = durable.min(settled);
        let read_done = std::mem::replace(&mut self.empty, false);
        let Some(rec) = self.held.take() else {
            if read_done {
                return Step::Ready(Item::Wait);
            }
            return self.ask(limit);
        };
        if let Op::Abort { .. } = rec.op {
            return Step::Ready(Item::Skip(rec.seq));
        }
        if let Some(next) = self.ahead.take() {
            // The record after `rec` is known: `rec` is final unless `next` aborts it.
            let aborted = next.op == (Op::Abort { seq: rec.seq });
            self.held = Some(next);
            return if aborted {
                // The aborted record is skipped now, its `Abort` (held) at the next poll.
                Step::Ready(Item::Skip(rec.seq))
            } else {
                Step::Ready(Item::Apply(rec))
            };
        }
        if rec.seq < limit {
            self.held = Some(rec);
            if read_done {
                // The next record is not readable yet: hold `rec` until it is.
                return Step::Ready(Item::Wait);
            }
            return self.ask(limit);
        }
        if rec.seq == settled {
            // The primary is done with `rec` and wrote no `Abort` for it.
            return Step::Ready(Item::Apply(rec));
        }
        self.held = Some(rec);
        Step::Ready(Item::Wait)
    }

    fn ask(&mut self, limit: u64) -> Step {
        self.answered = false;
        Step::Read { limit }
    }

    /// The answer to a [`Step::Read`]: the record read, or `None` if there is none yet within
    /// the limit.
    pub fn offer(&mut self, rec: Option<Record>) -> Result<(), FeedError> {
        if std::mem::replace(&mut self.answered, true) {
            return Err(FeedError::Unasked);
        }
        let Some(rec) = rec else {
            self.empty = true;
            return Ok(());
        };
        if rec.seq != self.next_read {
            return Err(FeedError::OutOfOrder {
                expected: self.next_read,
                got: rec.seq,
            });
        }
        self.next_read += 1;
        if self.held.is_none() {
            self.held = Some(rec);
        } else {
            self.ahead = Some(rec);
        }
        Ok(())
    }

    /// One turn: polls, doing the reads asked for with `read(next_seq, limit)` (at most two),
    /// until the feed says what to do.
    pub fn next<E: From<FeedError>>(
        &mut self,
        durable: u64,
        settled: u64,
        mut read: impl FnMut(u64, u64) -> Result<Option<Record>, E>,
    ) -> Result<Item, E> {
        loop {
            match self.poll(durable, settled) {
                Step::Read { limit } => {
                    let rec = read(self.next_read, limit)?;
                    self.offer(rec)?;
                }
                Step::Ready(item) => return Ok(item),
            }
        }
    }
}

/// Why a [`JournalFeed`] could not say what comes next.
#[derive(Debug, thiserror::Error)]
pub enum FeedReadError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Feed(#[from] FeedError),
}

/// A [`Feed`] reading a journal through its sequential [`Reader`]: what a mirror worker holds.
/// The driver supplies the positions and the journal's segment for a seq (taking whatever lock
/// guards the journal only for that call).
pub struct JournalFeed<F: SegmentFile> {
    reader: Reader<F>,
    feed: Feed,
}

impl<F: SegmentFile> JournalFeed<F> {
    pub fn new(next_seq: u64) -> Self {
        JournalFeed {
            reader: Reader::new(next_seq),
            feed: Feed::new(next_seq),
        }
    }

    /// What the applier does next, given the durable and settled positions; `segment_for(seq)`
    /// is the journal's segment that holds `seq` (`Journal::segment_for`).
    pub fn next<S: SegmentStore<File = F>>(
        &mut self,
        durable: u64,
        settled: u64,
        mut segment_for: impl FnMut(u64) -> Option<SegmentView<F>>,
    ) -> Result<Item, FeedReadError> {
        let reader = &mut self.reader;
        self.feed.next(durable, settled, |_, limit| {
            // Twice: when a segment ends, the record is at the start of the next one.
            for _ in 0..2 {
                let view = segment_for(reader.next_seq());
                if let Some(r) = reader.next::<S>(view, limit)? {
                    return Ok(Some(r));
                }
            }
            Ok(None)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::RelPath;

    fn op(i: u64) -> Op {
        Op::Rmdir {
            path: RelPath::new(format!("f{i}")).expect("valid path"),
        }
    }

    /// A journal of `ops` (index 0 is seq `first`) read through the feed.
    struct Journal {
        first: u64,
        ops: Vec<Op>,
        reads: usize,
    }

    impl Journal {
        fn new(first: u64, ops: Vec<Op>) -> Self {
            Journal {
                first,
                ops,
                reads: 0,
            }
        }

        fn next(&mut self, feed: &mut Feed, durable: u64, settled: u64) -> Item {
            let (first, ops, reads) = (self.first, &self.ops, &mut self.reads);
            feed.next(durable, settled, |seq, limit| {
                *reads += 1;
                assert!(*reads <= 1000, "the feed reads without end");
                let rec = (seq <= limit)
                    .then(|| seq.checked_sub(first))
                    .flatten()
                    .and_then(|i| ops.get(i as usize))
                    .map(|op| Record {
                        seq,
                        op: op.clone(),
                    });
                Ok::<_, FeedError>(rec)
            })
            .expect("the feed keeps the protocol")
        }
    }

    fn apply(seq: u64) -> Item {
        Item::Apply(Record { seq, op: op(seq) })
    }

    #[test]
    fn applies_in_order_holding_the_last_record_until_the_next_is_known() {
        let mut j = Journal::new(1, vec![op(1), op(2), op(3)]);
        let mut f = Feed::new(1);
        // Durable and settled through 3: 1 and 2 are final (their next is known, not an Abort);
        // 3 is the settled position itself.
        assert_eq!(j.next(&mut f, 3, 3), apply(1));
        assert_eq!(j.next(&mut f, 3, 3), apply(2));
        assert_eq!(j.next(&mut f, 3, 3), apply(3));
        assert_eq!(j.next(&mut f, 3, 3), Item::Wait);
        // At most two reads per record: the record and the one after it.
        assert!(j.reads <= 2 * 3 + 1, "{} reads", j.reads);
    }

    #[test]
    fn nothing_durable_or_nothing_settled_waits() {
        let mut j = Journal::new(1, vec![op(1), op(2)]);
        let mut f = Feed::new(1);
        assert_eq!(j.next(&mut f, 0, 2), Item::Wait);
        assert_eq!(j.next(&mut f, 2, 0), Item::Wait);
        assert_eq!(j.next(&mut f, 2, 2), apply(1));
    }

    #[test]
    fn abort_of_the_held_record_skips_both() {
        let mut j = Journal::new(1, vec![op(1), Op::Abort { seq: 1 }, op(3)]);
        let mut f = Feed::new(1);
        assert_eq!(j.next(&mut f, 3, 3), Item::Skip(1));
        assert_eq!(j.next(&mut f, 3, 3), Item::Skip(2));
        assert_eq!(j.next(&mut f, 3, 3), apply(3));
        assert_eq!(j.next(&mut f, 3, 3), Item::Wait);
    }

    #[test]
    fn abort_arriving_later_is_waited_for() {
        // Record 1 is durable and below the settled position, but record 2 (its Abort) is not
        // durable yet: 1 is held, never applied.
        let mut j = Journal::new(1, vec![op(1), Op::Abort { seq: 1 }]);
        let mut f = Feed::new(1);
        assert_eq!(j.next(&mut f, 1, 2), Item::Wait);
        assert_eq!(j.next(&mut f, 1, 2), Item::Wait);
        // The Abort becomes durable: both are skipped.
        assert_eq!(j.next(&mut f, 2, 2), Item::Skip(1));
        assert_eq!(j.next(&mut f, 2, 2), Item::Skip(2));
        assert_eq!(j.next(&mut f, 2, 2), Item::Wait);
    }

    #[test]
    fn a_record_at_the_durable_limit_but_below_settled_is_held() {
        // Settled through 5, durable only through 2: record 2 may still be followed by its Abort.
        let mut j = Journal::new(1, vec![op(1), op(2), op(3)]);
        let mut f = Feed::new(1);
        assert_eq!(j.next(&mut f, 2, 5), apply(1));
        assert_eq!(j.next(&mut f, 2, 5), Item::Wait);
        // Record 3 (not an Abort) becomes durable: 2 is final.
        assert_eq!(j.next(&mut f, 3, 5), apply(2));
        assert_eq!(j.next(&mut f, 3, 5), Item::Wait);
    }

    #[test]
    fn the_settled_record_is_applied_without_the_next() {
        // Durable through 3, settled through 2: 2 is the settled position, the primary wrote no
        // Abort for it, so it is applied; 3 is not settled, so it is held.
        let mut j = Journal::new(1, vec![op(1), op(2), op(3)]);
        let mut f = Feed::new(1);
        assert_eq!(j.next(&mut f, 3, 2), apply(1));
        assert_eq!(j.next(&mut f, 3, 2), apply(2));
        assert_eq!(j.next(&mut f, 3, 2), Item::Wait);
        assert_eq!(j.next(&mut f, 3, 3), apply(3));
    }

    #[test]
    fn restart_at_a_seq_reads_from_there() {
        let ops = vec![op(1), op(2), Op::Abort { seq: 2 }, op(4)];
        // Restarted after record 2 was skipped but before its Abort was: the Abort is skipped.
        let mut j = Journal::new(1, ops.clone());
        let mut f = Feed::new(3);
        assert_eq!(f.next_read_seq(), 3);
        assert_eq!(j.next(&mut f, 4, 4), Item::Skip(3));
        assert_eq!(j.next(&mut f, 4, 4), apply(4));
        // Restarted at the aborted record itself: it is skipped again, with its Abort.
        let mut j = Journal::new(1, ops);
        let mut f = Feed::new(2);
        assert_eq!(j.next(&mut f, 4, 4), Item::Skip(2));
        assert_eq!(j.next(&mut f, 4, 4), Item::Skip(3));
        assert_eq!(j.next(&mut f, 4, 4), apply(4));
    }

    #[test]
    fn the_protocol_is_checked() {
        let mut f = Feed::new(5);
        assert_eq!(f.offer(None), Err(FeedError::Unasked));
        assert_eq!(f.poll(9, 9), Step::Read { limit: 9 });
        assert_eq!(
            f.offer(Some(Record { seq: 6, op: op(6) })),
            Err(FeedError::OutOfOrder {
                expected: 5,
                got: 6
            })
        );
        assert_eq!(f.poll(9, 9), Step::Read { limit: 9 });
        assert_eq!(f.offer(Some(Record { seq: 5, op: op(5) })), Ok(()));
        assert_eq!(f.offer(None), Err(FeedError::Unasked));
    }
}
