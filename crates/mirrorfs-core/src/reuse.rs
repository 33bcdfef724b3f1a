//! Which peer record must wait for a durability point, so that a record received again after a
//! crash never meets a name a later record of its window reused (issue 7; `docs/protocol.md`,
//! "Peer records received again").
//!
//! A writable site applies its peer's records to its backing by name and makes them durable
//! (`STATE/peer-applied`) at the end of each batch. A crash in between makes the peer send the
//! batch again, applied again by name: harmless for most records (they apply the same values
//! again, or fail as existing or for want of their source), but not for a record whose name a
//! later record of the same window gave a new entry — a rename `a` → `b` then a new `a` (the
//! replayed rename moves the new `a` onto `b`), a write of `f` then a rename onto `f`, an unlink
//! of `f` then a new `f`, a link whose source name was given another file.
//!
//! [`ReuseWindow`] keeps the names touched by the records applied since the last durability
//! point and answers, for each record before it is applied, whether everything before it must
//! be made durable first ([`Admit::DurableFirst`]): when the record gives a name a new entry
//! (create, mkdir, mknod, symlink, a link's or rename's destination) or links from a name, and
//! an earlier record of the window touched that name or a name beneath it. So a resend never
//! holds both. Only the reuse cases pay; the set is bounded, and a full set is a durability
//! point too.
//!
//! ```text
//!  record ──▶ admit(op) ──▶ Apply          apply it (its names noted)
//!                      └──▶ DurableFirst   make the records before it durable, then apply it
//!                                          (the window restarts with its names)
//!  durability point made elsewhere (a batch's end, a barrier) ──▶ durable()
//! ```

use std::collections::BTreeSet;

use crate::op::Op;

/// At most this many names are kept for one window; one more is a durability point.
pub const NAMES_MAX: usize = 4096;

/// What to do before applying a record ([`ReuseWindow::admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Apply it: no earlier record of the window touched a name it reuses.
    Apply,
    /// Make the records before it durable (and acknowledged) first, then apply it.
    DurableFirst,
}

/// The names touched by the peer records applied since the last durability point.
#[derive(Debug)]
pub struct ReuseWindow {
    touched: BTreeSet<Vec<u8>>,
    names_max: usize,
}

impl Default for ReuseWindow {
    fn default() -> Self {
        ReuseWindow::new(NAMES_MAX)
    }
}

impl ReuseWindow {
    /// A window keeping at most `names_max` names (at least one).
    pub fn new(names_max: usize) -> Self {
        ReuseWindow {
            touched: BTreeSet::new(),
            names_max: names_max.max(1),
        }
    }

    /// Before `op` is applied: whether a durability point must come first. Notes `op`'s names
    /// as touched either way (after a `DurableFirst`, in a new window): the caller applies it.
    pub fn admit(&mut self, op: &Op) -> Admit {
        self.admit_as(op, None)
    }

    /// [`ReuseWindow::admit`] for a record the peer sent as `sent` and that is applied here as
    /// `applied` (its names translated through our renames it had not seen, under
    /// `--partition reconcile`; `None`: as sent). A record received again after a crash is
    /// translated again as it was (the reconciliation's state comes back to the last
    /// durability point) and applied to the names it was applied to, so those are the names
    /// that must not meet a later record's new entry: a rename `x` → `y` applied as `z` → `y`
    /// and then a new `z` is a reuse, though the peer's names differ (the rename received
    /// again would move the new `z` onto `y`). The names as sent are kept too: a durability
    /// point too many costs only time.
    pub fn admit_as(&mut self, sent: &Op, applied: Option<&Op>) -> Admit {
        let ops = [Some(sent), applied];
        let ops = ops.iter().flatten();
        let mut names: Vec<&[u8]> = ops
            .clone()
            .flat_map(|op| op.names().map(|(p, _)| p.as_bytes()))
            .collect();
        names.sort_unstable();
        names.dedup();
        let due = ops
            .flat_map(|op| reused(op))
            .any(|n| self.touched_at_or_beneath(n))
            || self.touched.len() + names.len() > self.names_max;
        if due {
            self.touched.clear();
        }
        for n in names {
            self.touched.insert(n.to_vec());
        }
        if due {
            Admit::DurableFirst
        } else {
            Admit::Apply
        }
    }

    /// Everything applied so far is durable: a new window begins.
    pub fn durable(&mut self) {
        self.touched.clear();
    }

    /// How many names the window holds.
    pub fn len(&self) -> usize {
        self.touched.len()
    }

    /// Whether the window holds no name.
    pub fn is_empty(&self) -> bool {
        self.touched.is_empty()
    }

    /// `name` or a name beneath it (`name/…`) was touched in this window: a record that gives
    /// `name` a new entry would, applied again, meet what the earlier one did not.
    fn touched_at_or_beneath(&self, name: &[u8]) -> bool {
        if self.touched.contains(name) {
            return true;
        }
        let mut lo = name.to_vec();
        lo.push(b'/');
        let mut hi = name.to_vec();
        hi.push(b'/' + 1);
        self.touched.range(lo..hi).next().is_some()
    }
}

/// The names `op` gives a new entry or links from: a create's, mkdir's, mknod's or symlink's
/// path, a rename's destination, a link's source and destination.
fn reused(op: &Op) -> impl Iterator<Item = &[u8]> {
    let link_from = match op {
        Op::Link { from, .. } => Some(from.as_bytes()),
        _ => None,
    };
    op.names()
        .filter(|(_, new)| *new)
        .map(|(p, _)| p.as_bytes())
        .chain(link_from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::test_ops::{create, mkdir};
    use crate::path::RelPath;

    fn p(s: &str) -> RelPath {
        RelPath::new(s.as_bytes().to_vec()).expect("a valid path")
    }
    fn rename(a: &str, b: &str) -> Op {
        Op::Rename {
            from: p(a),
            to: p(b),
            flags: 0,
            from_ino: 0,
        }
    }
    fn link(a: &str, b: &str) -> Op {
        Op::Link {
            from: p(a),
            to: p(b),
        }
    }
    fn unlink(s: &str) -> Op {
        Op::Unlink {
            path: p(s),
            nlink: 1,
        }
    }
    fn write(s: &str) -> Op {
        Op::Write {
            path: p(s),
            offset: 0,
            data: b"x".to_vec(),
        }
    }

    /// What the window answers for each op in turn.
    fn run(w: &mut ReuseWindow, ops: &[Op]) -> Vec<Admit> {
        ops.iter().map(|op| w.admit(op)).collect()
    }

    use Admit::{Apply, DurableFirst};

    #[test]
    fn a_name_renamed_away_then_made_again_waits_for_a_durability_point() {
        let mut w = ReuseWindow::default();
        assert_eq!(
            run(&mut w, &[rename("a", "b"), create("a")]),
            [Apply, DurableFirst]
        );
        // The new window holds only the new `a`.
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn each_reuse_of_the_issue_is_a_durability_point() {
        let cases: [(&[Op], Admit); 6] = [
            // A write of `f`, then a rename onto `f`.
            (&[write("f"), rename("g", "f")], DurableFirst),
            // An unlink of `f`, then a new `f`.
            (&[unlink("f"), create("f")], DurableFirst),
            // A link whose source name is then given another file.
            (&[link("s", "t"), unlink("s"), create("s")], DurableFirst),
            // A rename whose source is then a rename's destination.
            (&[rename("b", "c"), rename("a", "b")], DurableFirst),
            // A link from a name an earlier record touched.
            (&[create("s"), link("s", "t")], DurableFirst),
            // A directory renamed away and made again.
            (&[rename("d", "e"), mkdir("d")], DurableFirst),
        ];
        for (ops, last) in cases {
            let mut w = ReuseWindow::default();
            let got = run(&mut w, ops);
            assert_eq!(got.last(), Some(&last), "{ops:?}: {got:?}");
            assert!(
                got[..got.len() - 1].iter().all(|a| *a == Apply),
                "{ops:?}: {got:?}"
            );
        }
    }

    #[test]
    fn a_name_beneath_a_reused_name_counts() {
        // A write of `d/x`, its removal and `d`'s, then another directory renamed onto `d`:
        // the write received again would land in the new `d`.
        let mut w = ReuseWindow::default();
        let ops = [
            write("d/x"),
            unlink("d/x"),
            Op::Rmdir { path: p("d") },
            rename("e", "d"),
        ];
        assert_eq!(run(&mut w, &ops), [Apply, Apply, Apply, DurableFirst]);
        // A name only sharing a prefix is another name.
        let mut w = ReuseWindow::default();
        assert_eq!(
            run(&mut w, &[write("dx"), write("d.x"), create("d")]),
            [Apply, Apply, Apply]
        );
    }

    #[test]
    fn records_that_reuse_nothing_never_wait() {
        let mut w = ReuseWindow::default();
        let ops = [
            mkdir("d"),
            create("d/x"),
            write("d/x"),
            rename("d/x", "d/y"),
            create("z"),
            write("z"),
            unlink("z"),
            Op::SetMode {
                path: p("d/y"),
                mode: 0o600,
            },
        ];
        assert!(run(&mut w, &ops).iter().all(|a| *a == Apply));
        assert_eq!(w.len(), 4, "d, d/x, d/y, z");
    }

    #[test]
    fn a_durability_point_made_elsewhere_starts_a_new_window() {
        let mut w = ReuseWindow::default();
        assert_eq!(w.admit(&rename("a", "b")), Apply);
        w.durable();
        assert!(w.is_empty());
        assert_eq!(w.admit(&create("a")), Apply);
    }

    #[test]
    fn a_full_window_is_a_durability_point() {
        let mut w = ReuseWindow::new(3);
        let got = run(&mut w, &[write("a"), write("b"), write("c"), write("d")]);
        assert_eq!(got, [Apply, Apply, Apply, DurableFirst]);
        assert_eq!(w.len(), 1);
        // A rename's two names count.
        let mut w = ReuseWindow::new(3);
        let got = run(&mut w, &[write("a"), write("b"), rename("x", "y")]);
        assert_eq!(got, [Apply, Apply, DurableFirst]);
        assert_eq!(w.len(), 2);
        // Never more than the bound.
        let mut w = ReuseWindow::new(16);
        for k in 0..100 {
            w.admit(&write(&format!("f{k}")));
            assert!(w.len() <= 16);
        }
    }

    /// Issue 7 under reconcile: the peer's rename `x` → `y` applied here as `z` → `y` (we
    /// renamed `x` → `z` during the split), then its new `z`. By the names the peer sent the
    /// create reuses nothing; by the names the rename was applied to it does (received again
    /// after a crash, the rename would move the new `z` onto `y`: the real-mount test
    /// `a_netsplit_rename_onto_a_name_the_peer_then_makes_survives_a_kill_9_between`).
    #[test]
    fn a_name_reused_as_applied_waits_though_the_peers_names_differ() {
        let mut sent = ReuseWindow::default();
        assert_eq!(
            run(&mut sent, &[rename("x", "y"), create("z")]),
            [Apply, Apply]
        );
        let mut w = ReuseWindow::default();
        assert_eq!(
            w.admit_as(&rename("x", "y"), Some(&rename("z", "y"))),
            Apply
        );
        assert_eq!(w.admit_as(&create("z"), None), DurableFirst);
        // The reverse: a create applied under another name than the peer's meets the name an
        // earlier record was applied to.
        let mut w = ReuseWindow::default();
        assert_eq!(w.admit(&unlink("e/f")), Apply);
        assert_eq!(
            w.admit_as(&create("d/f"), Some(&create("e/f"))),
            DurableFirst
        );
        // The names as sent still count, and each name once.
        let mut w = ReuseWindow::default();
        assert_eq!(
            w.admit_as(&rename("a", "b"), Some(&rename("c", "b"))),
            Apply
        );
        assert_eq!(w.len(), 3, "a, b, c");
        assert_eq!(w.admit(&create("a")), DurableFirst);
    }

    #[test]
    fn records_without_names_change_nothing() {
        let mut w = ReuseWindow::default();
        w.admit(&rename("a", "b"));
        assert_eq!(w.admit(&Op::GroupBegin), Apply);
        assert_eq!(w.admit(&Op::Abort { seq: 1 }), Apply);
        assert_eq!(w.len(), 2);
    }
}
