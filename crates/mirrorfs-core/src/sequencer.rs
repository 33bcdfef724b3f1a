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
//!
//! After a crash the journal's last record is in doubt: it may or may not have reached the
//! backing, and it may have failed there (its `Abort` was not yet written). [`resolve_in_doubt`]
//! decides from the backing tree whether it stands ([`InDoubt`]), and
//! [`Sequencer::settle_in_doubt`] settles it or appends its `Abort`, as `applied` does.
//!
//! Driven by the binary (`site::volume::Volume::{mutate, record, record_backing_times,
//! resolve_in_doubt}`, under the order lock) and by both simulations (`sim/run.rs` and the
//! primary of `sim/net.rs`), so the simulations test the ordering code that runs.

use std::fmt;

use crate::journal::storage::SegmentStore;
use crate::journal::{Journal, JournalError, Origin};
use crate::op::{rename_flags, Op};
use crate::tree::{apply_op, Tree, TreeError, ENODATA};

/// `XATTR_CREATE` on Linux: `setxattr` fails with `EEXIST` if the attribute exists.
const XATTR_CREATE: i32 = 1;

/// Why a change was refused. The shell maps it to an errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No room (a full disk, or a journal still at its size limit after relief): `ENOSPC`.
    /// Nothing was journaled and nothing else is affected.
    NoSpace(String),
    /// The journal failed (or the sequencer is poisoned): `EIO`, and every later change too.
    Failed(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoSpace(why) | Refusal::Failed(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for Refusal {}

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
        self.begin_from(journal, op, Origin::Local, relieve)
    }

    /// [`Sequencer::begin`] of a change made at `origin` (the peer writable site's record a
    /// receiver applies: the origin is in the record's frame, durable with it).
    pub fn begin_from<S: SegmentStore>(
        &mut self,
        journal: &mut Journal<S>,
        op: &Op,
        origin: Origin,
        relieve: impl FnOnce(&mut Journal<S>),
    ) -> Begin {
        if let Some(why) = self.refusal() {
            return Begin::Refuse(why);
        }
        let appended = match journal.append_from(op, origin) {
            Err(JournalError::Full { .. }) => {
                relieve(journal);
                journal.append_from(op, origin)
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

    /// After a crash: settles the journal's last record `seq`, in doubt, as
    /// [`resolve_in_doubt`] decided (`stands`), or appends its `Abort` (as [`applied`] does; a
    /// failed `Abort` poisons).
    ///
    /// [`applied`]: Sequencer::applied
    pub fn settle_in_doubt<S: SegmentStore>(
        &mut self,
        journal: &mut Journal<S>,
        seq: u64,
        stands: bool,
    ) -> Result<Settled, Refusal> {
        self.in_doubt = Some(seq);
        self.applied(journal, seq, stands)
    }

    fn refusal(&self) -> Option<Refusal> {
        self.poisoned.as_ref().map(|w| Refusal::Failed(w.clone()))
    }

    fn poison(&mut self, why: String) -> Refusal {
        self.poisoned.get_or_insert(why.clone());
        Refusal::Failed(why)
    }
}

/// What became of the journal's last record, in doubt after a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InDoubt {
    /// The backing has the change (it took effect before the crash, or the strict re-apply made
    /// it now), or there is nothing to resolve (an `Abort`): the record stands.
    Stands,
    /// It did not take effect (the error of the strict re-apply): append its `Abort`, so no
    /// mirror ever applies it. Expected after a crash: the change was in flight and had not
    /// happened (or had failed) on the backing; no caller was told it succeeded.
    Abort(TreeError),
}

/// Resolves the in-doubt `op` against the backing `tree`: re-applies it **strictly**, never
/// forced (forcing, i.e. replay mode, would clear whatever is in the way: destroy user data when
/// the original call had failed), and classifies a failure with [`in_doubt_outcome`]. A rename
/// whose target already is the renamed inode stands without a re-apply (but not a `NOREPLACE`
/// one whose source still names that inode: see below).
pub fn resolve_in_doubt<T: Tree + ?Sized>(tree: &mut T, op: &Op) -> InDoubt {
    resolve_in_doubt_with(tree, op, |t, op| apply_op(t, op, false))
}

/// [`resolve_in_doubt`] with the re-apply given: the simulations model a backing whose error
/// persists with it. `reapply` is not called for an `Abort`, nor for a rename already done.
pub fn resolve_in_doubt_with<T: Tree + ?Sized>(
    tree: &mut T,
    op: &Op,
    reapply: impl FnOnce(&mut T, &Op) -> Result<(), TreeError>,
) -> InDoubt {
    if matches!(op, Op::Abort { .. }) {
        return InDoubt::Stands;
    }
    if let Op::Rename {
        from,
        to,
        flags,
        from_ino,
    } = op
    {
        let at = |tree: &mut T, p| tree.ino(p).ok().flatten() == Some(*from_ino);
        // The inode at its target: the rename took effect, unless it is a `NOREPLACE` rename
        // whose source still names the inode too (onto itself or another of its names): that
        // one fails with `EEXIST` (the kernel refuses it before any file system sees it) and
        // has no effect to find, so the strict re-apply decides.
        if at(tree, to) && (flags & rename_flags::NOREPLACE == 0 || !at(tree, from)) {
            return InDoubt::Stands;
        }
    }
    in_doubt_outcome(op, reapply(tree, op))
}

/// The pure decision: given how the strict re-apply of the in-doubt `op` went, does the record
/// stand? A success stands (the backing has the change now). A failure stands only if it shows
/// the change had already taken effect: the name a create (file, directory, node, symlink, link)
/// makes exists, the name an unlink or rmdir removes is gone, the attribute a `RemoveXattr`
/// removes is gone (`ENODATA`), the attribute a `SetXattr` with `XATTR_CREATE` makes exists.
/// Anything else aborts.
///
/// `SetXattr` with `XATTR_CREATE` is the one ambiguous case: unlike a create of a name (which
/// the kernel refuses before it reaches the file system when the name exists), an
/// `XATTR_CREATE` over an existing attribute reaches the backing and fails there. Standing is
/// the safe side: if the original call had failed, a mirror's strict apply fails loudly
/// (the mirror is marked for a resync), whereas an abort of a change the backing has would leave
/// the mirror silently without it.
pub fn in_doubt_outcome(op: &Op, reapplied: Result<(), TreeError>) -> InDoubt {
    let e = match reapplied {
        Ok(()) => return InDoubt::Stands,
        Err(e) => e,
    };
    let effect_present = match (op, &e) {
        (
            Op::Create { .. }
            | Op::Mkdir { .. }
            | Op::Mknod { .. }
            | Op::Symlink { .. }
            | Op::Link { .. },
            TreeError::Exists(_),
        ) => true,
        (Op::Unlink { .. } | Op::Rmdir { .. }, TreeError::NotFound(_)) => true,
        (Op::RemoveXattr { .. }, TreeError::Other { errno, .. }) => *errno == ENODATA,
        (Op::SetXattr { flags, .. }, TreeError::Exists(_)) => flags & XATTR_CREATE != 0,
        _ => false,
    };
    if effect_present {
        InDoubt::Stands
    } else {
        InDoubt::Abort(e)
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

    // ---- the in-doubt record after a crash ------------------------------------------------

    fn p(s: &str) -> crate::path::RelPath {
        crate::path::RelPath::new(s).expect("valid")
    }

    /// A backing tree with a file `f` (xattr `user.x`), a directory `d` and a second name `g`
    /// of `f`.
    fn backing() -> crate::sim::SimTree {
        let mut t = crate::sim::SimTree::reference();
        for op in [
            Op::Create {
                path: p("f"),
                mode: 0o644,
                uid: 0,
                gid: 0,
            },
            Op::Mkdir {
                path: p("d"),
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
            Op::Link {
                from: p("f"),
                to: p("g"),
            },
            Op::SetXattr {
                path: p("f"),
                name: b"user.x".to_vec(),
                value: b"1".to_vec(),
                flags: 0,
            },
        ] {
            apply_op(&mut t, &op, false).expect("set up");
        }
        t
    }

    fn ino(t: &mut crate::sim::SimTree, path: &str) -> u64 {
        t.ino(&p(path)).expect("ino").expect("exists")
    }

    /// Every kind of op, in doubt after it took effect on the backing: the record stands, and
    /// the backing is as the op left it.
    #[test]
    fn an_in_doubt_change_that_took_effect_stands() {
        use crate::op::{rename_flags, Timespec};
        let f_ino = ino(&mut backing(), "f");
        let d_ino = ino(&mut backing(), "d");
        let t = Timespec { sec: 7, nsec: 0 };
        let ops = [
            Op::Create {
                path: p("n"),
                mode: 0o600,
                uid: 0,
                gid: 0,
            },
            Op::Mkdir {
                path: p("n"),
                mode: 0o700,
                uid: 0,
                gid: 0,
            },
            Op::Mknod {
                path: p("n"),
                mode: 0o010_644,
                rdev: 0,
                uid: 0,
                gid: 0,
            },
            Op::Symlink {
                path: p("n"),
                target: b"f".to_vec(),
                uid: 0,
                gid: 0,
            },
            Op::Link {
                from: p("f"),
                to: p("n"),
            },
            Op::Unlink {
                path: p("g"),
                nlink: 2,
            },
            Op::Rmdir { path: p("d") },
            Op::Rename {
                from: p("f"),
                to: p("n"),
                flags: 0,
                from_ino: f_ino,
            },
            Op::Rename {
                from: p("f"),
                to: p("n"),
                flags: rename_flags::NOREPLACE,
                from_ino: f_ino,
            },
            Op::Rename {
                from: p("f"),
                to: p("d"),
                flags: rename_flags::EXCHANGE,
                from_ino: f_ino,
            },
            Op::Rename {
                from: p("d"),
                to: p("n"),
                flags: 0,
                from_ino: d_ino,
            },
            Op::Write {
                path: p("f"),
                offset: 3,
                data: b"abc".to_vec(),
            },
            Op::Truncate {
                path: p("f"),
                size: 9,
            },
            Op::Fallocate {
                path: p("f"),
                mode: 0,
                offset: 0,
                len: 4096,
            },
            Op::SetMode {
                path: p("f"),
                mode: 0o600,
            },
            Op::SetOwner {
                path: p("f"),
                uid: Some(1000),
                gid: None,
            },
            Op::SetTimes {
                path: p("f"),
                atime: None,
                mtime: Some(t),
            },
            Op::SetXattr {
                path: p("f"),
                name: b"user.y".to_vec(),
                value: b"2".to_vec(),
                flags: 0,
            },
            Op::SetXattr {
                path: p("f"),
                name: b"user.y".to_vec(),
                value: b"2".to_vec(),
                flags: XATTR_CREATE,
            },
            Op::SetXattr {
                path: p("f"),
                name: b"user.x".to_vec(),
                value: b"2".to_vec(),
                flags: 2,
            },
            Op::RemoveXattr {
                path: p("f"),
                name: b"user.x".to_vec(),
            },
        ];
        for op in ops {
            let mut t = backing();
            apply_op(&mut t, &op, false).unwrap_or_else(|e| panic!("{op:?}: {e}"));
            let after = t.snapshot();
            assert_eq!(resolve_in_doubt(&mut t, &op), InDoubt::Stands, "{op:?}");
            assert!(
                t.snapshot().diff(&after, 4).is_empty(),
                "{op:?} changed the backing again"
            );
        }
    }

    /// In doubt before it reached the backing: a valid change is made now and stands; one that
    /// fails for another reason than its own effect is aborted, the backing untouched.
    #[test]
    fn an_in_doubt_change_that_did_not_take_effect_is_made_now_or_aborted() {
        let f_ino = ino(&mut backing(), "f");
        let made_now = [
            Op::Create {
                path: p("n"),
                mode: 0o600,
                uid: 0,
                gid: 0,
            },
            Op::Unlink {
                path: p("g"),
                nlink: 2,
            },
            Op::Rename {
                from: p("f"),
                to: p("n"),
                flags: 0,
                from_ino: f_ino,
            },
            Op::RemoveXattr {
                path: p("f"),
                name: b"user.x".to_vec(),
            },
        ];
        for op in made_now {
            let mut t = backing();
            assert_eq!(resolve_in_doubt(&mut t, &op), InDoubt::Stands, "{op:?}");
            let mut done = backing();
            apply_op(&mut done, &op, false).expect("valid");
            assert!(
                t.snapshot().diff(&done.snapshot(), 4).is_empty(),
                "{op:?} not made"
            );
        }
        let aborted = [
            // The parent is missing: the create failed, its name exists nowhere.
            Op::Create {
                path: p("x/n"),
                mode: 0o600,
                uid: 0,
                gid: 0,
            },
            Op::Mkdir {
                path: p("x/n"),
                mode: 0o700,
                uid: 0,
                gid: 0,
            },
            Op::Link {
                from: p("x"),
                to: p("n"),
            },
            // Removing what is not removable: the name is still there.
            Op::Rmdir { path: p("f") },
            Op::Unlink {
                path: p("d"),
                nlink: 1,
            },
            // A rename whose source is gone and whose target is not the inode.
            Op::Rename {
                from: p("x"),
                to: p("n"),
                flags: 0,
                from_ino: 99,
            },
            Op::Rename {
                from: p("f"),
                to: p("d"),
                flags: crate::op::rename_flags::NOREPLACE,
                from_ino: 99,
            },
            Op::Write {
                path: p("x"),
                offset: 0,
                data: b"a".to_vec(),
            },
            Op::Truncate {
                path: p("d"),
                size: 0,
            },
            Op::SetMode {
                path: p("x"),
                mode: 0o600,
            },
            Op::SetXattr {
                path: p("f"),
                name: b"user.z".to_vec(),
                value: vec![],
                flags: 2,
            },
            Op::RemoveXattr {
                path: p("x"),
                name: b"user.x".to_vec(),
            },
        ];
        for op in aborted {
            let mut t = backing();
            let before = t.snapshot();
            assert!(
                matches!(resolve_in_doubt(&mut t, &op), InDoubt::Abort(_)),
                "{op:?}"
            );
            assert!(
                t.snapshot().diff(&before, 4).is_empty(),
                "{op:?} changed the backing"
            );
        }
    }

    /// A backing whose error persists (what the simulations model): aborted, except an `Abort`
    /// record (nothing in doubt) and a rename whose target already is the renamed inode.
    #[test]
    fn a_persistent_error_aborts_unless_the_effect_is_there() {
        let eio = |_: &mut crate::sim::SimTree, _: &Op| {
            Err(TreeError::Other {
                path: "f".into(),
                errno: 5,
                msg: "EIO".into(),
            })
        };
        let mut t = backing();
        let f_ino = ino(&mut t, "f");
        let w = Op::Write {
            path: p("f"),
            offset: 0,
            data: b"a".to_vec(),
        };
        assert!(matches!(
            resolve_in_doubt_with(&mut t, &w, eio),
            InDoubt::Abort(_)
        ));
        let same = Op::Rename {
            from: p("f"),
            to: p("g"),
            flags: 0,
            from_ino: f_ino,
        };
        assert_eq!(resolve_in_doubt_with(&mut t, &same, eio), InDoubt::Stands);
        // With NOREPLACE onto another of its names (or itself) it fails with EEXIST, no effect.
        for to in ["g", "f"] {
            let noreplace = Op::Rename {
                from: p("f"),
                to: p(to),
                flags: crate::op::rename_flags::NOREPLACE,
                from_ino: f_ino,
            };
            assert!(matches!(
                resolve_in_doubt(&mut t, &noreplace),
                InDoubt::Abort(_)
            ));
            assert!(matches!(
                resolve_in_doubt_with(&mut t, &noreplace, eio),
                InDoubt::Abort(_)
            ));
        }
        assert_eq!(
            resolve_in_doubt_with(&mut t, &Op::Abort { seq: 3 }, eio),
            InDoubt::Stands
        );
        // The classification alone: an error that is not the op's own effect aborts.
        let exists = || Err(TreeError::Exists("n".into()));
        assert!(matches!(in_doubt_outcome(&w, exists()), InDoubt::Abort(_)));
        let replace = Op::SetXattr {
            path: p("f"),
            name: b"user.x".to_vec(),
            value: vec![],
            flags: 2,
        };
        assert!(matches!(
            in_doubt_outcome(&replace, exists()),
            InDoubt::Abort(_)
        ));
        let rm = Op::RemoveXattr {
            path: p("f"),
            name: b"user.x".to_vec(),
        };
        let eperm = Err(TreeError::Other {
            path: "f".into(),
            errno: 1,
            msg: "EPERM".into(),
        });
        assert!(matches!(in_doubt_outcome(&rm, eperm), InDoubt::Abort(_)));
    }

    #[test]
    fn settling_the_in_doubt_record_appends_its_abort_only_if_it_does_not_stand() {
        let store = MemStore::new();
        let mut j = journal(&store, 64 << 20);
        let mut s = Sequencer::new(0);
        let a = seq_of(s.begin(&mut j, &op(1), |_| {}));
        s.applied(&mut j, a, true).expect("settle");
        let b = seq_of(s.begin(&mut j, &op(2), |_| {}));
        // A crash: a new sequencer over the recovered journal, record `b` in doubt.
        let mut s = Sequencer::new(b);
        let st = s.settle_in_doubt(&mut j, b, true).expect("stands");
        assert_eq!((st.last, st.aborted, j.next_seq()), (b, false, b + 1));
        let st = s.settle_in_doubt(&mut j, b, false).expect("aborted");
        assert_eq!((st.last, st.aborted, j.next_seq()), (b + 1, true, b + 2));
        store.fail_next(1);
        assert!(matches!(
            s.settle_in_doubt(&mut j, b + 1, false),
            Err(Refusal::Failed(_))
        ));
        assert!(s.poisoned().is_some());
    }
}
