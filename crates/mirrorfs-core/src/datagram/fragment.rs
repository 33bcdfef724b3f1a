//! Journal records as data packets: `cut` makes the fragments of one record, each at most
//! `body_max` bytes with its 16-byte fragment header; the `Reassembler` puts them back together
//! and hands records on strictly in journal order.
//!
//! Fragment body layout (inside the sealed packet, big-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | record seq |
//! | 8 | 4 | offset of these bytes in the record |
//! | 12 | 4 | the record's total length |
//! | 16 | n | the bytes |
//!
//! Bounds of the reassembler: it holds records from the next one it owes (`next`) up to
//! `window` seqs ahead, and at most `bytes_max` bytes of the later ones (the record owed next
//! is always taken, up to `RECORD_MAX`: later records must never keep it out); a fragment
//! beyond either is dropped and counted (`Refused::Ahead`: the sender outran the window; it is
//! sent again after a NAK), one of a record already handed on is a duplicate. A fragment that contradicts what is
//! known of its record (another total length, bytes out of range, an overlap with other bytes)
//! is refused: nothing unauthenticated reaches here, so that is a sender's bug, never applied.

use std::collections::BTreeMap;

/// Bytes of the fragment header.
pub const FRAGMENT_HEADER: usize = 16;
/// The largest record a fragment may announce (a journal record is far smaller).
pub const RECORD_MAX: u32 = 64 << 20;

/// One fragment of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    pub seq: u64,
    pub offset: u32,
    pub total: u32,
    pub bytes: Vec<u8>,
}

impl Fragment {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(FRAGMENT_HEADER + self.bytes.len());
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.offset.to_be_bytes());
        v.extend_from_slice(&self.total.to_be_bytes());
        v.extend_from_slice(&self.bytes);
        v
    }

    /// Parses a fragment body; `None` if it cannot be one (too short, past its record's end,
    /// an impossible length, an empty fragment of a non-empty record).
    pub fn decode(b: &[u8]) -> Option<Fragment> {
        if b.len() < FRAGMENT_HEADER {
            return None;
        }
        let seq = u64::from_be_bytes(b[0..8].try_into().ok()?);
        let offset = u32::from_be_bytes(b[8..12].try_into().ok()?);
        let total = u32::from_be_bytes(b[12..16].try_into().ok()?);
        let bytes = b[FRAGMENT_HEADER..].to_vec();
        let end = u64::from(offset) + bytes.len() as u64;
        if seq == 0 || total > RECORD_MAX || end > u64::from(total) {
            return None;
        }
        if bytes.is_empty() && total != 0 {
            return None;
        }
        Some(Fragment {
            seq,
            offset,
            total,
            bytes,
        })
    }
}

/// The fragments of record `seq`, each body (header included) at most `body_max` bytes. An
/// empty record is one empty fragment. `None` if `body_max` leaves no room for bytes or the
/// record is larger than `RECORD_MAX`.
pub fn cut(seq: u64, record: &[u8], body_max: usize) -> Option<Vec<Fragment>> {
    let room = body_max.checked_sub(FRAGMENT_HEADER).filter(|r| *r > 0)?;
    let total = u32::try_from(record.len())
        .ok()
        .filter(|t| *t <= RECORD_MAX)?;
    if record.is_empty() {
        return Some(vec![Fragment {
            seq,
            offset: 0,
            total: 0,
            bytes: Vec::new(),
        }]);
    }
    Some(
        record
            .chunks(room)
            .enumerate()
            .map(|(i, c)| Fragment {
                seq,
                offset: (i * room) as u32,
                total,
                bytes: c.to_vec(),
            })
            .collect(),
    )
}

/// Why a fragment was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Of a record already handed on, or bytes already held.
    Duplicate,
    /// Beyond the window of seqs or bytes held.
    Ahead,
    /// Contradicts what is known of its record.
    Inconsistent,
}

/// A record being put together.
struct Partial {
    total: u32,
    /// offset → bytes, non-overlapping.
    pieces: BTreeMap<u32, Vec<u8>>,
    have: u32,
}

/// Puts records back together, in journal order, within bounds.
pub struct Reassembler {
    next: u64,
    window: u64,
    bytes_max: u64,
    held_bytes: u64,
    partial: BTreeMap<u64, Partial>,
    /// The highest seq a fragment was taken for.
    highest: u64,
}

impl Reassembler {
    /// Owes record `next` first; holds at most `window` seqs and `bytes_max` bytes ahead.
    pub fn new(next: u64, window: u64, bytes_max: u64) -> Reassembler {
        Reassembler {
            next,
            window: window.max(1),
            bytes_max,
            held_bytes: 0,
            partial: BTreeMap::new(),
            highest: next.saturating_sub(1),
        }
    }

    /// The seq of the next record to be handed on.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// The highest seq a fragment was taken for (`next - 1` before any).
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Bytes held for records not yet handed on.
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// Takes one fragment.
    pub fn take(&mut self, f: Fragment) -> Result<(), Refused> {
        if f.seq < self.next {
            return Err(Refused::Duplicate);
        }
        if f.seq >= self.next + self.window {
            return Err(Refused::Ahead);
        }
        let len = f.bytes.len();
        let held = self.partial.get(&f.seq);
        if held.is_some_and(|p| p.pieces.get(&f.offset).is_some_and(|b| b.len() == len)) {
            return Err(Refused::Duplicate);
        }
        // The record owed next is always taken (else later records filling the bytes could
        // keep it out for good); the others only within the byte bound.
        if f.seq != self.next && self.held_bytes + len as u64 > self.bytes_max {
            return Err(Refused::Ahead);
        }
        let p = self.partial.entry(f.seq).or_insert_with(|| Partial {
            total: f.total,
            pieces: BTreeMap::new(),
            have: 0,
        });
        if p.total != f.total {
            return Err(Refused::Inconsistent);
        }
        let end = f.offset + len as u32;
        let before = p.pieces.range(..f.offset).next_back();
        let overlaps_before = before.is_some_and(|(o, b)| o + b.len() as u32 > f.offset);
        let overlaps_after = p
            .pieces
            .range(f.offset..)
            .next()
            .is_some_and(|(o, _)| *o < end);
        if overlaps_before || overlaps_after {
            return Err(Refused::Inconsistent);
        }
        p.have += f.bytes.len() as u32;
        self.held_bytes += f.bytes.len() as u64;
        self.highest = self.highest.max(f.seq);
        p.pieces.insert(f.offset, f.bytes);
        Ok(())
    }

    /// The next record in order, if it is complete.
    pub fn pop(&mut self) -> Option<(u64, Vec<u8>)> {
        let p = self.partial.get(&self.next)?;
        if p.have != p.total || p.pieces.is_empty() {
            return None;
        }
        let p = self.partial.remove(&self.next)?;
        let mut record = Vec::with_capacity(p.total as usize);
        for (_, b) in p.pieces {
            record.extend_from_slice(&b);
        }
        self.held_bytes -= record.len() as u64;
        let seq = self.next;
        self.next += 1;
        Some((seq, record))
    }

    /// The announced length of record `seq`, if it is partly held.
    pub fn partial_total(&self, seq: u64) -> Option<u32> {
        self.partial.get(&seq).map(|p| p.total)
    }

    /// What is missing below the highest seq a fragment arrived for: whole records (`None`)
    /// or byte ranges of partial ones, at most `max` entries, oldest first — the NAKs to send.
    pub fn missing(&self, max: usize) -> Vec<(u64, Option<(u32, u32)>)> {
        let mut out = Vec::new();
        for seq in self.next..=self.highest {
            if out.len() >= max {
                break;
            }
            match self.partial.get(&seq) {
                None => out.push((seq, None)),
                Some(p) => {
                    let mut at = 0u32;
                    for (o, b) in &p.pieces {
                        if *o > at && out.len() < max {
                            out.push((seq, Some((at, *o))));
                        }
                        at = o + b.len() as u32;
                    }
                    if at < p.total && out.len() < max {
                        out.push((seq, Some((at, p.total))));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fragments_round_trip_and_bad_ones_are_refused() {
        let f = Fragment {
            seq: 5,
            offset: 10,
            total: 20,
            bytes: vec![1; 10],
        };
        assert_eq!(Fragment::decode(&f.encode()), Some(f.clone()));
        let mut past_end = f.clone();
        past_end.total = 15;
        assert_eq!(Fragment::decode(&past_end.encode()), None);
        let mut huge = f.clone();
        huge.total = RECORD_MAX + 1;
        huge.offset = 0;
        assert_eq!(Fragment::decode(&huge.encode()), None);
        assert_eq!(Fragment::decode(&[0; FRAGMENT_HEADER - 1]), None);
        let mut zero = f;
        zero.seq = 0;
        assert_eq!(Fragment::decode(&zero.encode()), None);
        assert!(
            cut(1, b"abc", FRAGMENT_HEADER).is_none(),
            "no room for bytes"
        );
    }

    #[test]
    fn records_come_out_in_order_whatever_order_the_fragments_come_in() {
        let mut r = Reassembler::new(1, 16, 1 << 20);
        let recs: Vec<Vec<u8>> = (1..=3u8).map(|i| vec![i; 100 * i as usize]).collect();
        let mut frags: Vec<Fragment> = recs
            .iter()
            .enumerate()
            .flat_map(|(i, rec)| cut(i as u64 + 1, rec, FRAGMENT_HEADER + 64).expect("cut"))
            .collect();
        frags.reverse();
        for f in frags {
            assert_eq!(r.take(f), Ok(()));
        }
        for (i, rec) in recs.iter().enumerate() {
            assert_eq!(r.pop(), Some((i as u64 + 1, rec.clone())));
        }
        assert_eq!(r.pop(), None);
        assert_eq!(r.held_bytes(), 0);
    }

    #[test]
    fn the_window_bounds_what_is_held() {
        let mut r = Reassembler::new(1, 4, 1_000);
        let f = |seq, n| cut(seq, &vec![0; n], 10_000).expect("cut").remove(0);
        assert_eq!(r.take(f(5, 10)), Err(Refused::Ahead), "beyond 4 seqs");
        assert_eq!(r.take(f(2, 900)), Ok(()));
        assert_eq!(r.take(f(3, 200)), Err(Refused::Ahead), "beyond 1,000 bytes");
        assert_eq!(r.take(f(2, 900)), Err(Refused::Duplicate));
        assert_eq!(r.missing(10), vec![(1, None)]);
        assert_eq!(
            r.take(f(1, 500)),
            Ok(()),
            "the record owed next, beyond the bytes"
        );
        assert_eq!(r.pop().map(|(s, _)| s), Some(1));
        assert_eq!(
            r.take(f(1, 50)),
            Err(Refused::Duplicate),
            "already handed on"
        );
    }

    #[test]
    fn missing_names_whole_records_and_byte_ranges() {
        let mut r = Reassembler::new(1, 16, 1 << 20);
        let frags = cut(2, &[9; 40], FRAGMENT_HEADER + 10).expect("cut");
        assert_eq!(r.take(frags[1].clone()), Ok(()));
        assert_eq!(r.take(frags[3].clone()), Ok(()));
        assert_eq!(
            r.missing(10),
            vec![(1, None), (2, Some((0, 10))), (2, Some((20, 30)))]
        );
        assert_eq!(r.missing(2).len(), 2, "bounded");
        let mut bad = frags[1].clone();
        bad.offset = 15;
        assert_eq!(r.take(bad), Err(Refused::Inconsistent), "overlaps");
        let mut other_total = frags[0].clone();
        other_total.total = 50;
        assert_eq!(r.take(other_total), Err(Refused::Inconsistent));
    }

    #[test]
    fn an_empty_record_passes() {
        let mut r = Reassembler::new(7, 4, 100);
        for f in cut(7, &[], 100).expect("cut") {
            assert_eq!(r.take(f), Ok(()));
        }
        assert_eq!(r.pop(), Some((7, Vec::new())));
    }

    proptest! {
        /// Any order, with duplicates: every record comes out once, whole, in order.
        #[test]
        fn shuffled_duplicated_fragments_reassemble(
            sizes in proptest::collection::vec(0usize..3_000, 1..20),
            body in 17usize..600,
            order in any::<u64>(),
        ) {
            use rand::seq::SliceRandom;
            use rand::SeedableRng;
            let recs: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(i, n)| (0..*n).map(|j| (i * 31 + j) as u8).collect())
                .collect();
            let mut frags: Vec<Fragment> = recs
                .iter()
                .enumerate()
                .flat_map(|(i, rec)| cut(i as u64 + 1, rec, body).expect("cut"))
                .collect();
            let dup: Vec<Fragment> = frags.iter().step_by(3).cloned().collect();
            frags.extend(dup);
            frags.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(order));
            let mut r = Reassembler::new(1, 64, 1 << 30);
            let mut out = Vec::new();
            for f in frags {
                let _ = r.take(f);
                while let Some(x) = r.pop() {
                    out.push(x);
                }
            }
            prop_assert_eq!(out.len(), recs.len());
            for (i, (seq, rec)) in out.into_iter().enumerate() {
                prop_assert_eq!(seq, i as u64 + 1);
                prop_assert_eq!(&rec, &recs[i]);
            }
            prop_assert_eq!(r.held_bytes(), 0);
        }
    }
}
