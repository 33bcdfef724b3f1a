//! Generation histories: which states of a volume two sites share, so that neither overwrites
//! changes the other lacks (DRBD's UUID history, kept per volume).
//!
//! A volume's changes carry one sequence of seqs from its first mount on. Each promotion starts a
//! **generation**: a random id and the seq at which it began (the first seq it may use). A site
//! keeps the generations it went through, oldest first, and its **end**: the last seq it holds.
//! Seqs continue across a promotion (the promoted copy's journal continues from its last applied
//! record), so a site's history plus its end names exactly the changes it holds:
//!
//! ```text
//!   old primary P:  g1 [1 ..................... 10]           end 10
//!   promoted M:     g1 [1 ..... 5] g2 [6 ... 8]                end 8
//!   common point: generation g1 at seq 5; P has 5 changes after it, M has 3 (and a promotion)
//! ```
//!
//! [`compare`] works that out. A site is an **ancestor** of another (it can be caught up from
//! the common point without losing anything) only if its current generation is in the other's
//! history and it holds nothing past the other's extent of that generation. Anything else is a
//! divergence (both sides hold something the other lacks: records, or a promotion) or another
//! volume, and is never resolved silently.

use crate::wire::VolumeId;

/// At most this many generations are kept (the oldest are dropped; two sites that share none
/// of the kept ones are treated as diverged since an unknown point).
pub const HISTORY_MAX: usize = 32;

/// One generation: started by the first mount (number 1) or by a promotion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    /// 1 for the first mount, +1 per promotion (for people; `id` is what is compared).
    pub number: u64,
    /// Random, unique per promotion. 0 only for a generation recorded by an older version
    /// (matched by number alone).
    pub id: u64,
    /// The first seq of this generation.
    pub start: u64,
}

impl Generation {
    fn same(&self, o: &Generation) -> bool {
        self.number == o.number && self.id == o.id
    }
}

/// A site's generations, oldest first, and the volume they belong to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct History {
    pub volume_id: VolumeId,
    pub generations: Vec<Generation>,
}

impl History {
    /// The history of a new volume: generation 1 from seq 1.
    pub fn new(volume_id: VolumeId, id: u64) -> History {
        History {
            volume_id,
            generations: vec![Generation {
                number: 1,
                id,
                start: 1,
            }],
        }
    }

    /// The current generation.
    pub fn current(&self) -> Option<&Generation> {
        self.generations.last()
    }

    /// Starts a new generation at `start` (a promotion of a copy whose end is `start - 1`).
    pub fn promote(&mut self, id: u64, start: u64) {
        let number = self.current().map_or(1, |g| g.number + 1);
        self.generations.push(Generation { number, id, start });
        let n = self.generations.len();
        if n > HISTORY_MAX {
            self.generations.drain(..n - HISTORY_MAX);
        }
    }

    /// Whether the history is well formed: bounded, numbers and starts strictly increasing.
    pub fn valid(&self) -> bool {
        self.generations.len() <= HISTORY_MAX
            && self
                .generations
                .windows(2)
                .all(|w| w[0].number < w[1].number && w[0].start < w[1].start)
    }

    /// The last seq of generation `i` on a site whose end is `end`.
    fn extent(&self, i: usize, end: u64) -> u64 {
        match self.generations.get(i + 1) {
            Some(next) => next.start.saturating_sub(1).min(end),
            None => end,
        }
    }
}

/// A site as the comparison sees it: its history and the last seq it holds.
#[derive(Debug, Clone, Copy)]
pub struct Site<'a> {
    pub history: &'a History,
    pub end: u64,
}

/// The last state two sites share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonPoint {
    /// The generation number the shared state belongs to.
    pub generation: u64,
    /// The last seq both hold.
    pub seq: u64,
}

/// How two sites relate (`a` and `b` as given to [`compare`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// The same history and the same end.
    Equal,
    /// `a` is an ancestor of `b`: it holds nothing `b` lacks and can be caught up from
    /// `common.seq + 1` (`b_after` changes).
    ABehind,
    /// `b` is an ancestor of `a`.
    BBehind,
    /// Both hold something the other lacks: changes after the common point (`a_after`,
    /// `b_after`) or a generation of their own (a promotion), or both. `common` is `None` when
    /// they share no generation that both still remember.
    Diverged,
    /// Copies of different volumes.
    Unrelated,
}

/// What [`compare`] found: the relation, the common point, and how many changes (seqs) each
/// side holds after it. This is what reintegration starts from: "the common point is generation
/// G at seq S; side A has N changes after it".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Comparison {
    pub relation: Relation,
    pub common: Option<CommonPoint>,
    pub a_after: u64,
    pub b_after: u64,
    /// `a` went through a generation that `b` does not know (it was promoted since the common
    /// point), and the other way round.
    pub a_promoted: bool,
    pub b_promoted: bool,
}

/// Compares two sites' histories and ends (a pure function; see the module's documentation).
pub fn compare(a: Site<'_>, b: Site<'_>) -> Comparison {
    let unrelated = Comparison {
        relation: Relation::Unrelated,
        common: None,
        a_after: a.end,
        b_after: b.end,
        a_promoted: false,
        b_promoted: false,
    };
    if a.history.volume_id != b.history.volume_id {
        return unrelated;
    }
    let (ga, gb) = (&a.history.generations, &b.history.generations);
    // The last generation both know, matched by id (histories may be cut at different points).
    let shared = ga
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, g)| gb.iter().position(|h| h.same(g)).map(|j| (i, j)));
    let Some((i, j)) = shared else {
        return Comparison {
            relation: Relation::Diverged,
            ..unrelated
        };
    };
    let seq = a.history.extent(i, a.end).min(b.history.extent(j, b.end));
    let common = CommonPoint {
        generation: ga[i].number,
        seq,
    };
    let a_after = a.end.saturating_sub(seq);
    let b_after = b.end.saturating_sub(seq);
    let a_promoted = i + 1 < ga.len();
    let b_promoted = j + 1 < gb.len();
    // An ancestor holds nothing after the common point and no generation of its own.
    let a_ancestor = a_after == 0 && !a_promoted;
    let b_ancestor = b_after == 0 && !b_promoted;
    let relation = match (a_ancestor, b_ancestor) {
        (true, true) => Relation::Equal,
        (true, false) => Relation::ABehind,
        (false, true) => Relation::BBehind,
        (false, false) => Relation::Diverged,
    };
    Comparison {
        relation,
        common: Some(common),
        a_after,
        b_after,
        a_promoted,
        b_promoted,
    }
}

impl Comparison {
    /// A sentence for people: where the two sides part and what each holds after it.
    pub fn describe(&self, a: &str, b: &str) -> String {
        let side = |name: &str, n: u64, promoted: bool| {
            let mut s = format!("{name} holds {n} change(s) after it");
            if promoted {
                s.push_str(" and was promoted since");
            }
            s
        };
        match (self.relation, self.common) {
            (Relation::Unrelated, _) => format!("{a} and {b} are copies of different volumes"),
            (_, None) => format!(
                "{a} and {b} share no generation they both remember: {a} holds {} change(s), {b} {}",
                self.a_after, self.b_after
            ),
            (_, Some(c)) => format!(
                "the common point is generation {} at seq {}; {}; {}",
                c.generation,
                c.seq,
                side(a, self.a_after, self.a_promoted),
                side(b, self.b_after, self.b_promoted)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOL: VolumeId = [7; 16];

    fn g(number: u64, id: u64, start: u64) -> Generation {
        Generation { number, id, start }
    }

    fn h(gens: &[Generation]) -> History {
        History {
            volume_id: VOL,
            generations: gens.to_vec(),
        }
    }

    fn cmp(a: &History, ea: u64, b: &History, eb: u64) -> Comparison {
        compare(
            Site {
                history: a,
                end: ea,
            },
            Site {
                history: b,
                end: eb,
            },
        )
    }

    #[test]
    fn same_history_same_end_is_equal() {
        let a = h(&[g(1, 11, 1)]);
        let c = cmp(&a, 40, &a, 40);
        assert_eq!(c.relation, Relation::Equal);
        assert_eq!(
            c.common,
            Some(CommonPoint {
                generation: 1,
                seq: 40
            })
        );
        assert_eq!((c.a_after, c.b_after), (0, 0));
    }

    #[test]
    fn same_generation_behind_is_caught_up_from_its_end() {
        let a = h(&[g(1, 11, 1)]);
        let c = cmp(&a, 30, &a, 40);
        assert_eq!(c.relation, Relation::ABehind);
        assert_eq!(c.common.map(|p| p.seq), Some(30));
        assert_eq!((c.a_after, c.b_after), (0, 10));
        let c = cmp(&a, 40, &a, 30);
        assert_eq!(c.relation, Relation::BBehind);
        assert_eq!((c.a_after, c.b_after), (10, 0));
    }

    #[test]
    fn ancestor_of_a_promoted_copy_is_caught_up_from_the_promotion() {
        // The old primary stopped at 5, exactly where the copy was promoted.
        let old = h(&[g(1, 11, 1)]);
        let new = h(&[g(1, 11, 1), g(2, 22, 6)]);
        let c = cmp(&old, 5, &new, 9);
        assert_eq!(c.relation, Relation::ABehind);
        assert_eq!(
            c.common,
            Some(CommonPoint {
                generation: 1,
                seq: 5
            })
        );
        assert_eq!((c.a_after, c.b_after), (0, 4));
        assert!(c.b_promoted && !c.a_promoted);
        // An ancestor that is further behind still is one.
        let c = cmp(&old, 3, &new, 9);
        assert_eq!(c.relation, Relation::ABehind);
        assert_eq!(c.common.map(|p| p.seq), Some(3));
    }

    #[test]
    fn ancestor_ahead_of_the_promotion_point_has_diverged() {
        // Finding 2: P wrote b.txt (seqs 6..10) after M stopped at 5; M was promoted at 6.
        let p = h(&[g(1, 11, 1)]);
        let m = h(&[g(1, 11, 1), g(2, 22, 6)]);
        let c = cmp(&m, 5, &p, 10);
        assert_eq!(c.relation, Relation::Diverged);
        assert_eq!(
            c.common,
            Some(CommonPoint {
                generation: 1,
                seq: 5
            })
        );
        assert_eq!((c.a_after, c.b_after), (0, 5));
        assert!(c.a_promoted, "M's promotion is a change P lacks");
        let text = c.describe("M", "P");
        assert!(text.contains("generation 1 at seq 5"), "{text}");
        assert!(text.contains("P holds 5 change(s)"), "{text}");
    }

    #[test]
    fn a_promoted_copy_is_never_an_ancestor_of_its_old_primary() {
        // Promoted with no change since: the promotion itself is what the old primary lacks.
        let p = h(&[g(1, 11, 1)]);
        let m = h(&[g(1, 11, 1), g(2, 22, 6)]);
        let c = cmp(&m, 5, &p, 5);
        assert_eq!(c.relation, Relation::BBehind, "P can follow M");
        let c = cmp(&p, 5, &m, 5);
        assert_eq!(c.relation, Relation::ABehind);
        // But a P that went on past 5 and an M that wrote on are diverged both ways.
        let c = cmp(&p, 8, &m, 7);
        assert_eq!(c.relation, Relation::Diverged);
        assert_eq!((c.a_after, c.b_after), (3, 2));
    }

    #[test]
    fn two_promotions_of_the_same_generation_diverge() {
        // Two mirrors of the same primary were both promoted.
        let x = h(&[g(1, 11, 1), g(2, 22, 6)]);
        let y = h(&[g(1, 11, 1), g(2, 33, 8)]);
        let c = cmp(&x, 6, &y, 9);
        assert_eq!(c.relation, Relation::Diverged);
        assert_eq!(c.common.map(|p| p.seq), Some(5));
        assert!(c.a_promoted && c.b_promoted);
        assert_eq!((c.a_after, c.b_after), (1, 4));
    }

    #[test]
    fn unrelated_volumes_and_no_shared_generation() {
        let a = h(&[g(1, 11, 1)]);
        let mut b = h(&[g(1, 11, 1)]);
        b.volume_id = [8; 16];
        let c = cmp(&a, 3, &b, 3);
        assert_eq!(c.relation, Relation::Unrelated);
        assert!(c.describe("a", "b").contains("different volumes"));
        let b = h(&[g(5, 55, 100)]);
        let c = cmp(&a, 3, &b, 120);
        assert_eq!((c.relation, c.common), (Relation::Diverged, None));
    }

    #[test]
    fn histories_cut_at_different_points_still_meet() {
        let mut long = h(&[g(1, 11, 1)]);
        for n in 0..(HISTORY_MAX as u64 + 3) {
            long.promote(100 + n, 10 * (n + 1));
        }
        assert_eq!(long.generations.len(), HISTORY_MAX);
        assert!(long.valid());
        let mut short = long.clone();
        short.generations.drain(..HISTORY_MAX - 2);
        let end = long.current().map_or(0, |g| g.start) + 4;
        let c = cmp(&short, end, &long, end + 3);
        assert_eq!(c.relation, Relation::ABehind);
        assert_eq!(c.b_after, 3);
    }

    #[test]
    fn validity() {
        assert!(h(&[g(1, 1, 1), g(2, 2, 5)]).valid());
        assert!(!h(&[g(2, 1, 1), g(1, 2, 5)]).valid());
        assert!(!h(&[g(1, 1, 5), g(2, 2, 5)]).valid());
    }
}
