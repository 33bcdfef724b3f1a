//! Reconciling what two writable sites changed during a split (issue 7; `mount --peer
//! --write-tokens A:B --partition reconcile`), sans I/O: which of the peer's records is
//! concurrent with one of ours, and what the site does about it.
//!
//! ```text
//!  our data write (seq L, object P) ─▶ local(L, P)          unseen[P] = L
//!  peer record R for P, seen(R) = S  ─▶ peer_record(P, S) ─▶ Apply | Skip{rewrite} | CopyThenApply
//!     seen(R): the last of OUR seqs the peer had considered when it journaled R (the change
//!     points of its stream, `Msg::PeerSeen`); every entry ≤ S is dropped (the peer saw it).
//! ```
//!
//! **The rule.** A peer record R for object P is concurrent with our record L for P iff
//! `L > seen(R)`: the peer wrote R without having considered L. Only data changes (write,
//! truncate, fallocate: what takes a write token) count. While the link is up the token
//! hand-over makes every writer apply the other's records for P first, so `seen(R) ≥ L` and
//! nothing is concurrent; only writes made across a split (`Proceed{guarded: false}`) are.
//!
//! **The outcome is the same at both sites.** The lower site id (the *winner*, the token home)
//! keeps its version at `P`; the higher (the *loser*) keeps its version as a copy,
//! `P.conflict-site<loser>-<time>`, made at the loser and streamed to the winner like any new file.
//! Records are diffs and cannot be redirected, so:
//!
//! - the **loser**, on the first concurrent winner record for P since its own last write to P,
//!   copies its current P to the conflict name (`CopyThenApply`: a local create and writes,
//!   journaled before the winner's record is applied), then applies the winner's records;
//! - the **winner** skips each concurrent loser record for P (`Skip`) and, unless its own last
//!   write to P already is one, journals a full **rewrite** of P (its size and whole content, read
//!   under the order lock: `Skip{rewrite: true}`, then `local(seq, P, true)` for its records).
//!   The rewrite is journaled after the winner considered the skipped records, so at the loser it
//!   is not concurrent (unless the loser wrote P again meanwhile: then it copies again) and is
//!   applied over the mix of diffs: both sites end with the winner's version at P and the loser's
//!   in the copy.
//!
//! **Bounds and crashes.** At most `entries_max` objects are remembered; past it the oldest is
//! dropped and its seq becomes a *floor*: a peer record with `seen < floor` for an object with
//! no entry is taken as concurrent (a conflict listed that perhaps was none: both versions kept,
//! nothing lost). The entries are rebuilt after a restart from the journal: the shell keeps
//! every record after [`Reconciler::seen_by_peer`] (persisted with the peer's applied position)
//! and replays our data records after it through [`Reconciler::local`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// An object: the write token's (a hash of the file's path, `site::tokens::object_of`).
pub type Object = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// This site's id and the peer's (`--write-tokens ME:PEER`); the lower keeps its version.
    pub me: u64,
    pub peer: u64,
    /// The most objects remembered.
    pub entries_max: usize,
}

impl Config {
    pub fn new(me: u64, peer: u64) -> Config {
        Config {
            me,
            peer,
            entries_max: 65_536,
        }
    }

    /// This site's version stays at the path in a conflict.
    pub fn wins(&self) -> bool {
        self.me < self.peer
    }
}

/// What to do with a peer record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Not concurrent (or the loser after its copy): apply it.
    Apply,
    /// The winner: concurrent with our own write; do not apply it. With `rewrite`, journal a full
    /// rewrite of the object once the batch of peer records is considered (its records then go
    /// through [`Reconciler::local`] with `rewrite: true`); `first` when this starts a conflict
    /// (to be listed).
    Skip { rewrite: bool, first: bool },
    /// The loser: copy our current version to the conflict name first (listed as a conflict),
    /// then apply the record.
    CopyThenApply,
    /// Either site: the peer removed an object we changed concurrently. Do not apply the
    /// removal; journal the object whole, its creation first, so that the peer gets it back
    /// (`first`: a new conflict, to be listed).
    Restore { first: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// Our last data record for the object not known to be seen by the peer.
    seq: u64,
    /// That record belongs to a resolution rewrite (the winner).
    rewrite: bool,
    /// A conflict copy was made since that record (the loser).
    copied: bool,
}

/// One site's view of its unseen writes.
#[derive(Debug, Clone)]
pub struct Reconciler {
    cfg: Config,
    entries: HashMap<Object, Entry>,
    /// (entry seq, object) for each entry, to drop the seen ones in order.
    by_seq: BTreeSet<(u64, Object)>,
    /// The largest of our seqs the peer had considered as of its last record here.
    seen: u64,
    /// Entries up to this seq were dropped for room (see the module docs).
    floor: u64,
}

impl Reconciler {
    /// A fresh machine; `seen_by_peer` is the watermark persisted with the peer's applied
    /// position (0 for a new pair).
    pub fn new(cfg: Config, seen_by_peer: u64) -> Reconciler {
        Reconciler {
            cfg,
            entries: HashMap::new(),
            by_seq: BTreeSet::new(),
            seen: seen_by_peer,
            floor: 0,
        }
    }

    pub fn config(&self) -> Config {
        self.cfg
    }

    /// Our data record `seq` for `object` (a local write, truncate or fallocate; `rewrite` for
    /// the records of a resolution rewrite). Records at or below the watermark are ignored (the
    /// replay after a restart starts after it anyway).
    pub fn local(&mut self, seq: u64, object: Object, rewrite: bool) {
        if seq <= self.seen {
            return;
        }
        if let Some(old) = self.entries.get(&object) {
            self.by_seq.remove(&(old.seq, object));
        }
        self.entries.insert(
            object,
            Entry {
                seq,
                rewrite,
                copied: false,
            },
        );
        self.by_seq.insert((seq, object));
        while self.entries.len() > self.cfg.entries_max {
            let Some((s, o)) = self.by_seq.pop_first() else {
                break;
            };
            self.entries.remove(&o);
            self.floor = self.floor.max(s);
        }
    }

    /// The peer's record for `object` (`None`: not a data change, only moves the watermark),
    /// journaled there after it had considered our records through `seen`.
    pub fn peer_record(&mut self, object: Option<Object>, seen: u64) -> Decision {
        self.advance(seen);
        let Some(object) = object else {
            return Decision::Apply;
        };
        let wins = self.cfg.wins();
        let Some(entry) = self.concurrent(object, seen) else {
            return Decision::Apply;
        };
        if wins {
            let first = !entry.rewrite && !entry.copied;
            // `copied` marks "this conflict is already counted" on the winner, `rewrite` that
            // its rewrite is asked (its records follow through `local`): one per conflict.
            let rewrite = !entry.rewrite;
            entry.copied = true;
            entry.rewrite = true;
            Decision::Skip { rewrite, first }
        } else if entry.copied {
            Decision::Apply
        } else {
            entry.copied = true;
            Decision::CopyThenApply
        }
    }

    /// The peer's removal (unlink) of `object`, journaled after it had considered our records
    /// through `seen`. Concurrent with our change of it: the change wins at both sites, whichever
    /// site removed it (`Restore`).
    pub fn peer_remove(&mut self, object: Object, seen: u64) -> Decision {
        self.advance(seen);
        let Some(entry) = self.concurrent(object, seen) else {
            return Decision::Apply;
        };
        let first = !entry.copied && !entry.rewrite;
        entry.copied = true;
        entry.rewrite = true;
        Decision::Restore { first }
    }

    /// The copy aside or the rewrite the machine asked for `object` could not be made (the
    /// volume refused it: the peer's record is not acknowledged and comes again): ask again
    /// when it does.
    pub fn retry(&mut self, object: Object) {
        if let Some(e) = self.entries.get_mut(&object) {
            e.copied = false;
            e.rewrite = false;
        }
    }

    /// Our entry for `object` if a peer record that considered ours through `seen` is
    /// concurrent with it.
    fn concurrent(&mut self, object: Object, seen: u64) -> Option<&mut Entry> {
        let floor = self.floor;
        if !self.entries.contains_key(&object) {
            // Perhaps dropped for room: concurrent if the peer had not seen the floor.
            if seen >= floor {
                return None;
            }
            self.by_seq.insert((floor, object));
            self.entries.insert(
                object,
                Entry {
                    seq: floor,
                    rewrite: false,
                    copied: false,
                },
            );
        }
        self.entries.get_mut(&object)
    }

    /// The peer considered our records through `seen`: forget what it saw.
    fn advance(&mut self, seen: u64) {
        if seen <= self.seen {
            return;
        }
        self.seen = seen;
        let keep = self.by_seq.split_off(&(seen.saturating_add(1), 0));
        for (_, o) in std::mem::replace(&mut self.by_seq, keep) {
            self.entries.remove(&o);
        }
    }

    /// The largest of our seqs the peer has considered (the journal keeps every record after it
    /// for the replay after a restart).
    pub fn seen_by_peer(&self) -> u64 {
        self.seen
    }

    /// Objects remembered now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The change points of a site's stream to its peer: "our records from `from` on were journaled
/// after considering the peer's records through `through`" (sent as `Msg::PeerSeen` before the
/// records they cover). Bounded: points before the peer's acknowledged position are dropped
/// except the last of them.
#[derive(Debug, Clone, Default)]
pub struct ChangePoints {
    points: BTreeMap<u64, u64>,
}

/// At most this many points are kept; past it the oldest two merge into the older's (`through`
/// of the older: conservative, it can only make a record look concurrent, never hide one).
pub const POINTS_MAX: usize = 65_536;

impl ChangePoints {
    /// Records from `from` on considered the peer's through `through`.
    pub fn note(&mut self, from: u64, through: u64) {
        if self.seen_at(from) >= through {
            return;
        }
        self.points.insert(from, through);
        while self.points.len() > POINTS_MAX {
            let Some(&second) = self.points.keys().nth(1) else {
                break;
            };
            self.points.remove(&second);
        }
    }

    /// What our record `seq` had considered of the peer's records.
    pub fn seen_at(&self, seq: u64) -> u64 {
        self.points.range(..=seq).next_back().map_or(0, |(_, &t)| t)
    }

    /// The points a batch of records `first..=last` needs: the one in force at `first`, then
    /// each that starts within it.
    pub fn for_batch(&self, first: u64, last: u64) -> Vec<(u64, u64)> {
        let mut v = vec![(first, self.seen_at(first))];
        if last > first {
            v.extend(self.points.range(first + 1..=last).map(|(&f, &t)| (f, t)));
        }
        v
    }

    /// The peer has our records through `seq`: points before it are not needed (the one in
    /// force at `seq + 1` stays).
    pub fn forget_through(&mut self, seq: u64) {
        let at = seq.saturating_add(1);
        let keep_from = self.points.range(..=at).next_back().map(|(&f, _)| f);
        if let Some(k) = keep_from {
            self.points = self.points.split_off(&k);
        }
    }

    /// Where the last point starts (0: none).
    pub fn last_from(&self) -> u64 {
        self.points.keys().next_back().copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

/// The receiving side's copy of the peer's change points, from its `PeerSeen` messages, asked
/// in stream order.
#[derive(Debug, Clone, Default)]
pub struct PeerPoints {
    points: BTreeMap<u64, u64>,
}

impl PeerPoints {
    /// The peer's records from `from` on considered ours through `through`.
    pub fn note(&mut self, from: u64, through: u64) {
        self.points.insert(from, through);
        if self.points.len() > POINTS_MAX {
            self.points.pop_first();
        }
    }

    /// seen(R) for the peer's record `seq`; the points before it are forgotten (records are
    /// asked in order).
    pub fn seen_at(&mut self, seq: u64) -> u64 {
        let Some((&f, &t)) = self.points.range(..=seq).next_back() else {
            return 0;
        };
        self.points = self.points.split_off(&f);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(me: u64, peer: u64) -> Reconciler {
        Reconciler::new(Config::new(me, peer), 0)
    }

    #[test]
    fn a_peer_record_that_saw_our_write_is_applied() {
        let mut r = site(1, 2);
        r.local(10, 7, false);
        assert_eq!(r.peer_record(Some(7), 10), Decision::Apply);
        assert!(r.is_empty(), "seen: forgotten");
        assert_eq!(r.seen_by_peer(), 10);
        // Later writes of ours are unseen again only when they are newer than the watermark.
        r.local(9, 7, false);
        assert!(r.is_empty());
    }

    #[test]
    fn different_objects_merge() {
        for (me, peer) in [(1, 2), (2, 1)] {
            let mut r = site(me, peer);
            r.local(10, 7, false);
            assert_eq!(r.peer_record(Some(8), 3), Decision::Apply, "site {me}");
            assert_eq!(r.peer_record(None, 4), Decision::Apply);
            assert_eq!(r.len(), 1, "still unseen");
        }
    }

    #[test]
    fn the_winner_skips_concurrent_records_and_rewrites_once() {
        let mut w = site(1, 2);
        w.local(10, 7, false);
        assert_eq!(
            w.peer_record(Some(7), 3),
            Decision::Skip {
                rewrite: true,
                first: true
            }
        );
        // Another concurrent record before the rewrite is journaled: no second rewrite.
        assert_eq!(
            w.peer_record(Some(7), 3),
            Decision::Skip {
                rewrite: false,
                first: false
            }
        );
        // The shell rewrites: records 11, 12 of the rewrite.
        w.local(11, 7, true);
        w.local(12, 7, true);
        // More of the loser's split writes: skipped, no second rewrite, same conflict.
        assert_eq!(
            w.peer_record(Some(7), 3),
            Decision::Skip {
                rewrite: false,
                first: false
            }
        );
        // A loser write made after it applied the rewrite: applied.
        assert_eq!(w.peer_record(Some(7), 12), Decision::Apply);
        // A later local write, then a concurrent one again: a new conflict, a new rewrite.
        w.local(20, 7, false);
        assert_eq!(
            w.peer_record(Some(7), 13),
            Decision::Skip {
                rewrite: true,
                first: true
            }
        );
    }

    #[test]
    fn the_loser_copies_once_then_applies() {
        let mut l = site(2, 1);
        l.local(10, 7, false);
        assert_eq!(l.peer_record(Some(7), 3), Decision::CopyThenApply);
        assert_eq!(l.peer_record(Some(7), 3), Decision::Apply);
        // The winner's rewrite, journaled after it considered our 10: not concurrent.
        assert_eq!(l.peer_record(Some(7), 10), Decision::Apply);
        assert!(l.is_empty());
        // We wrote again before the rewrite came: the rewrite is concurrent, copy again.
        l.local(30, 7, false);
        assert_eq!(l.peer_record(Some(7), 29), Decision::CopyThenApply);
    }

    /// Both orders of arrival end the same way: the winner's version at the path, the loser's
    /// in its copy (simulated with contents as strings).
    #[test]
    fn both_orders_converge_to_the_winners_version_and_the_losers_copy() {
        for winner_first in [true, false] {
            // Site 1 wrote "A" (its seq 5), site 2 wrote "B" (its seq 8); neither saw the other.
            let (mut w, mut l) = (site(1, 2), site(2, 1));
            w.local(5, 7, false);
            l.local(8, 7, false);
            let (at_w, mut at_l) = ("A".to_string(), "B".to_string());
            let mut copy_at_l = None;
            let deliver_to_l = |l: &mut Reconciler,
                                at_l: &mut String,
                                copy: &mut Option<String>,
                                content: &str,
                                seen: u64| {
                match l.peer_record(Some(7), seen) {
                    Decision::CopyThenApply => {
                        *copy = Some(at_l.clone());
                        *at_l = content.to_string();
                    }
                    Decision::Apply => *at_l = content.to_string(),
                    d => panic!("the loser never skips: {d:?}"),
                }
            };
            if winner_first {
                // The winner's diff "A" reaches the loser first.
                deliver_to_l(&mut l, &mut at_l, &mut copy_at_l, "A", 0);
            }
            // The loser's "B" reaches the winner: skipped, rewrite (seq 6, seen 8).
            let rewrite = match w.peer_record(Some(7), 0) {
                Decision::Skip { rewrite: true, .. } => {
                    w.local(6, 7, true);
                    (at_w.clone(), 8)
                }
                d => panic!("{d:?}"),
            };
            // The copy the loser made travels to the winner as a new file.
            if !winner_first {
                deliver_to_l(&mut l, &mut at_l, &mut copy_at_l, "A", 0);
            }
            let (content, seen) = rewrite;
            deliver_to_l(&mut l, &mut at_l, &mut copy_at_l, &content, seen);
            assert_eq!(at_w, "A");
            assert_eq!(at_l, "A", "winner_first={winner_first}");
            assert_eq!(copy_at_l.as_deref(), Some("B"));
        }
    }

    #[test]
    fn a_concurrent_removal_is_undone_at_either_site_and_a_seen_one_applies() {
        for (me, peer) in [(1, 2), (2, 1)] {
            let mut r = site(me, peer);
            r.local(10, 7, false);
            assert_eq!(r.peer_remove(7, 4), Decision::Restore { first: true });
            // The rewrite's records, then a second concurrent removal: the same conflict.
            r.local(11, 7, true);
            assert_eq!(r.peer_remove(7, 4), Decision::Restore { first: false });
            // A removal that saw our writes wins as usual; one of another object too.
            assert_eq!(r.peer_remove(8, 4), Decision::Apply);
            assert_eq!(r.peer_remove(7, 11), Decision::Apply);
        }
    }

    #[test]
    fn a_copy_or_rewrite_that_failed_is_asked_again() {
        let mut l = site(2, 1);
        l.local(10, 7, false);
        assert_eq!(l.peer_record(Some(7), 3), Decision::CopyThenApply);
        l.retry(7);
        assert_eq!(l.peer_record(Some(7), 3), Decision::CopyThenApply);
        let mut w = site(1, 2);
        w.local(10, 7, false);
        assert_eq!(
            w.peer_record(Some(7), 3),
            Decision::Skip {
                rewrite: true,
                first: true
            }
        );
        w.retry(7);
        assert!(matches!(
            w.peer_record(Some(7), 3),
            Decision::Skip { rewrite: true, .. }
        ));
    }

    #[test]
    fn the_index_is_bounded_and_a_dropped_entry_still_counts_as_concurrent() {
        let mut r = Reconciler::new(
            Config {
                entries_max: 2,
                ..Config::new(2, 1)
            },
            0,
        );
        r.local(1, 100, false);
        r.local(2, 200, false);
        r.local(3, 300, false);
        assert_eq!(r.len(), 2);
        // 100 was dropped for room: a peer record that had not seen 1 is taken as concurrent.
        assert_eq!(r.peer_record(Some(100), 0), Decision::CopyThenApply);
        // One that had seen it is not.
        let mut r2 = r.clone();
        assert_eq!(r2.peer_record(Some(200), 1), Decision::CopyThenApply);
        let mut r3 = r.clone();
        assert_eq!(r3.peer_record(Some(400), 1), Decision::Apply);
        // Two objects taken as concurrent through the floor are both forgotten once seen.
        assert_eq!(r.peer_record(Some(500), 0), Decision::CopyThenApply);
        assert_eq!(r.peer_record(None, 3), Decision::Apply);
        assert!(r.is_empty(), "everything seen");
    }

    #[test]
    fn a_restart_rebuilds_the_same_decisions_from_the_journal() {
        // Before the crash: the peer saw through 4; our data records 3 (obj 7), 6 (obj 7), 8 (obj 9).
        let journal = [(3u64, 7u64), (6, 7), (8, 9)];
        let mut before = site(2, 1);
        for (s, o) in journal {
            before.local(s, o, false);
        }
        assert_eq!(before.peer_record(None, 4), Decision::Apply);
        let watermark = before.seen_by_peer();
        // After: the watermark from STATE/peer-applied, the journal's records replayed.
        let mut after = Reconciler::new(Config::new(2, 1), watermark);
        for (s, o) in journal {
            after.local(s, o, false);
        }
        for (obj, seen) in [(7, 5), (9, 5), (7, 6), (9, 9)] {
            assert_eq!(
                before.clone().peer_record(Some(obj), seen),
                after.clone().peer_record(Some(obj), seen),
                "object {obj} seen {seen}"
            );
        }
        assert_eq!(
            after.clone().peer_record(Some(7), 5),
            Decision::CopyThenApply
        );
        assert_eq!(after.peer_record(Some(7), 6), Decision::Apply);
    }

    #[test]
    fn change_points_cover_a_batch_and_stay_bounded() {
        let mut c = ChangePoints::default();
        assert_eq!(c.seen_at(5), 0);
        c.note(10, 3);
        c.note(20, 7);
        c.note(25, 7); // no news: not a point
        assert_eq!(c.len(), 2);
        assert_eq!(c.seen_at(9), 0);
        assert_eq!(c.seen_at(10), 3);
        assert_eq!(c.seen_at(30), 7);
        assert_eq!(c.for_batch(12, 22), vec![(12, 3), (20, 7)]);
        // A batch of one record, and a range given backwards, need no range of points.
        assert_eq!(c.for_batch(20, 20), vec![(20, 7)]);
        assert_eq!(c.for_batch(21, 3), vec![(21, 7)]);
        c.forget_through(21);
        assert_eq!(c.seen_at(22), 7);
        assert_eq!(c.len(), 1);
        let mut p = PeerPoints::default();
        for (f, t) in c.for_batch(22, 40) {
            p.note(f, t);
        }
        assert_eq!(p.seen_at(22), 7);
        assert_eq!(p.seen_at(40), 7);
    }
}
