//! Carrying out a reintegration [`Plan`] on our site: each [`Step`] becomes looks at our tree,
//! fetches of their entries, and ops for our volume. Sans-IO: [`Run::next_action`] says what to do, the
//! shell answers with [`Run::on_stat`], [`Run::on_applied`] or [`Run::on_entry`].
//!
//! **Driven by:** the primary's link (`net::remote`, a diverged mirror reintegrated into the
//! primary) and the unit tests here, which run plans against the simulated tree.
//!
//! ```text
//!   next_action() ─▶ Stat(path)         ─▶ on_stat(Some(Stat{kind, ino, nlink, changed_since_plan}))
//!          ─▶ Apply(op)          ─▶ on_applied(Ok | NotFound | Exists | NotEmpty | Failed)
//!          ─▶ Fetch{their, as}   ─▶ on_entry(ops, last)  (then AwaitEntry until last)
//!          ─▶ Conflict(c)           (list it: found while running)
//!          ─▶ StepDone(i)           (make the step cursor durable: i + 1 steps are done)
//!          ─▶ Done
//! ```
//!
//! # Each step
//!
//! | step | what it does |
//! |---|---|
//! | `Rename{from, to}` | looks at `to`, then at `from` (last, so a late change there is seen as late as possible); nothing if `from` is gone (done before a crash); `unlink(from)` if `to` is another name of the same file (rename(2) would do nothing); else `rename(from, to)`, with `RENAME_NOREPLACE` if `to` was absent |
//! | `Remove{our_path}` | nothing if absent; `rmdir` or `unlink` |
//! | `Mkdir{their, our}` | their directory's attributes on ours (made if absent) |
//! | `CopyFromTheirs{their, our}`, `ConflictCopy{their, copy}` | their entry is recreated under a temporary name beside the target (`.mirrorfs-reint-copy-T-I`, T from the plan's label, I the step; `-T-I-N` when a change of ours since the plan took the name, which is left alone), then the target is looked at again (last, so a late change there is seen as late as possible) and the copy renamed over it, so a crash never leaves a half copy at the target (with `RENAME_NOREPLACE` if the target was absent; if a user moved the finished copy away meanwhile, the step begins again, at most `COPY_TRIES` times); a directory is made in place (attributes only) |
//!
//! Every op goes through the shell's volume: journaled and applied like any change, so every
//! mirror of our site follows. Every step is idempotent against its own effect, so after a crash
//! the shell re-runs from the step its cursor names (the one in doubt).
//!
//! # Changes made while the plan runs
//!
//! The plan was made from our records up to one point; users keep working. Before a step
//! replaces or removes something, [`Stat::changed_since_plan`] says whether a later change of
//! ours named it; if so ours is kept: a removal is skipped, a copy goes to a conflict name
//! (`NAME.conflict-SITE-YYYYMMDD-HHMMSS-late-I`; also when the change came while the copy was
//! made), a rename onto it goes to that name instead, and each is listed as a [`Conflict`] with
//! [`Reason::ChangedDuringReintegration`]. Nothing is overwritten that the plan did not see
//! (but for what a user does between the last look at a name and the op that replaces it). A rename whose source was changed since the plan carries that
//! change along: its destination is *held* (a self-move `Moved(p, p)`, recorded before the
//! rename is applied) and counts as changed since the plan for the rest of the run.

use std::collections::{HashSet, VecDeque};

use super::{Conflict, Plan, Reason, Step};
use crate::op::{rename_flags, Op};
use crate::path::RelPath;
use crate::tree::EntryKind;

/// What our tree has at a path (`None` also when a component of it is not a directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub kind: EntryKind,
    pub ino: u64,
    pub nlink: u32,
    /// A change of ours after the plan's last record named this path (or one below it).
    pub changed_since_plan: bool,
}

/// How an [`Action::Apply`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Ok,
    NotFound,
    Exists,
    NotEmpty,
    /// A component of the path is not a directory.
    NotDir,
    /// Any other error, with its text.
    Failed(String),
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Look (lstat, never through a symlink) at our `path`; answer with [`Run::on_stat`].
    Stat(RelPath),
    /// Apply `op` to our volume; answer with [`Run::on_applied`].
    Apply(Op),
    /// Ask their site for the ops that recreate their `their_path` as `as_path`; give each answer
    /// to [`Run::on_entry`].
    Fetch {
        their_path: RelPath,
        as_path: RelPath,
    },
    /// Wait for the next answer of the fetch in progress ([`Run::on_entry`]).
    AwaitEntry,
    /// A conflict found while running: list it.
    Conflict(Conflict),
    /// The run sent our `.0` to the late name `.1`; later steps follow it there. Record it
    /// durably with the cursor (give the recorded moves back to [`Run::new`] after a crash).
    Moved(RelPath, RelPath),
    /// Step `.0` is complete: record durably that `.0 + 1` steps are done before going on.
    StepDone(usize),
    /// Every step is done.
    Done,
}

/// Why a run stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("step {step} ({what}): {why}")]
    Step {
        step: usize,
        what: String,
        why: String,
    },
    #[error("internal: {0}")]
    Misuse(&'static str),
}

/// What the current step waits for.
#[derive(Debug)]
enum Wait {
    /// Nothing: the queue or the next step.
    None,
    Stat(Purpose),
    Apply(Tolerate),
    Entry,
}

/// Which look a `Stat` answers.
#[derive(Debug, Clone, Copy)]
enum Purpose {
    /// A rename's destination, looked at first.
    RenameTo,
    /// A rename's source, looked at last (the freshest look before the rename): `dest` is what
    /// the destination held.
    RenameFrom {
        dest: Option<Stat>,
    },
    Remove,
    Target,
    Temp,
    /// A copy's target, looked at again once the copy is made, just before it is placed.
    Place,
}

/// Which failures of an `Apply` are the step's own effect already done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tolerate {
    Nothing,
    /// A removal of something already gone; a rename whose source is gone.
    NotFound,
    /// An `rmdir` of a directory a change of ours filled since the plan: kept, listed.
    NotEmptyDir,
    /// A rename that a change of ours since the plan stands in the way of: it goes to a late
    /// conflict name instead (beside its destination, or at the root if that directory is gone).
    RenameHomeless,
}

/// Where a copy step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Looking at the target, then at the temporary name.
    Looking,
    /// Removing a leftover temporary name (from before a crash).
    ClearingTemp,
    /// Applying their entry's ops as they arrive.
    Receiving,
    /// Renaming the finished copy over the target.
    Placing,
}

/// A copy step, as learned so far.
#[derive(Debug, Clone)]
struct Copy {
    their_path: RelPath,
    /// Where their entry goes (a late conflict name if ours changed since the plan).
    target: RelPath,
    temp: RelPath,
    /// What our tree has at `target`.
    ours: Option<EntryKind>,
    /// Ours was changed after the plan (a directory then keeps its own attributes).
    ours_changed: bool,
    /// Their entry is a directory (known from the first op of the answer).
    dir: Option<bool>,
    phase: Phase,
    /// Ops received and not yet applied.
    pending: VecDeque<Op>,
    /// The last answer arrived.
    last: bool,
    /// Any op arrived (an answer with none is an entry their side no longer has).
    any: bool,
    /// Ops applied of this fetch.
    applied: usize,
    /// The target's directory is gone (a change of ours since the plan): the copy was sent to
    /// the root; the rest of the first answer is dropped.
    redirected: bool,
    discarding: bool,
    /// The copy could not replace the target and went beside it.
    placed_late: bool,
    /// Temporary names found taken by a change of ours (each is left alone).
    temp_tries: u32,
}

/// How many temporary names a copy tries when users take them (each try is one look).
const TEMP_TRIES: u32 = 64;
/// How many times a copy step begins again when users move its finished copy away before it is
/// placed (each time costs a fetch).
const COPY_TRIES: u32 = 8;

/// One plan being carried out.
#[derive(Debug)]
pub struct Run {
    steps: Vec<Step>,
    /// The step being carried out.
    step: usize,
    /// For late conflict names.
    label: String,
    queue: VecDeque<Action>,
    wait: Wait,
    copy: Option<Copy>,
    /// The step is complete; `StepDone` follows once the queue drains.
    finishing: bool,
    started: bool,
    /// Our names the run moved to late conflict names (a directory's entries follow it); an
    /// entry `(p, p)` is a hold: a rename of the run put a change of ours made after the plan at
    /// `p`, so `p` (and what is above or below it) counts as changed since the plan.
    moved: Vec<(RelPath, RelPath)>,
    /// The path of the `Stat` asked.
    looking: Option<RelPath>,
    /// The plan's own names that look like copies' temporary names (a user's file of that
    /// name, brought over by the plan): never taken for a leftover.
    plan_names: HashSet<RelPath>,
    /// Names this plan's temporary copies (the crc32c of its conflict label).
    temp_tag: String,
    /// The rename being applied: (from, its inode, it carries a change of ours since the plan).
    renaming: Option<(RelPath, u64, bool)>,
    /// How many times the current copy step was begun again because users moved its finished
    /// copy (or the directory it was in) away before it was placed.
    copy_tries: u32,
}

impl Run {
    /// Carries out `plan` from step `from` (the step cursor: how many are done). `label` is the
    /// plan's conflict label ([`super::conflict_label`]); `moved`, the moves an earlier run of
    /// this plan reported ([`Action::Moved`]).
    pub fn new(plan: &Plan, from: usize, label: &str, moved: Vec<(RelPath, RelPath)>) -> Run {
        Run {
            steps: plan.steps.clone(),
            step: from,
            label: label.to_string(),
            queue: VecDeque::new(),
            wait: Wait::None,
            copy: None,
            finishing: false,
            started: false,
            moved,
            looking: None,
            plan_names: plan.steps.iter().flat_map(temp_like_names).collect(),
            temp_tag: format!("{:08x}", crc32c::crc32c(label.as_bytes())),
            renaming: None,
            copy_tries: 0,
        }
    }

    /// How many steps the plan has.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// True when the plan has no steps.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The step being carried out (= how many are done).
    pub fn position(&self) -> usize {
        self.step
    }

    /// What to do next. Call again after answering what it asked.
    pub fn next_action(&mut self) -> Result<Action, RunError> {
        loop {
            if let Some(a) = self.queue.pop_front() {
                return Ok(a);
            }
            match self.wait {
                Wait::None => {}
                Wait::Entry => return Ok(Action::AwaitEntry),
                _ => return Err(RunError::Misuse("next_action() while an answer is awaited")),
            }
            if self.finishing {
                self.finishing = false;
                self.copy = None;
                let done = self.step;
                self.step += 1;
                self.started = false;
                self.copy_tries = 0;
                return Ok(Action::StepDone(done));
            }
            if self.step >= self.steps.len() {
                return Ok(Action::Done);
            }
            if self.started {
                return Err(RunError::Misuse("a step stalled"));
            }
            self.started = true;
            self.start_step();
        }
    }

    /// Where our `p` is now, after the run's own late moves of directories above it.
    fn ours_now(&self, p: RelPath) -> RelPath {
        self.moved
            .iter()
            .rev()
            .filter(|(from, to)| from != to)
            .find_map(|(from, to)| p.rebase(from, to))
            .unwrap_or(p)
    }

    /// Whether a hold ([`Run::hold`]) covers `p`: the held name is `p`, below it (as a change
    /// below a name counts for it) or above it (the late change may be anywhere inside).
    fn held(&self, p: &RelPath) -> bool {
        self.moved
            .iter()
            .filter(|(from, to)| from == to)
            .any(|(h, _)| h.starts_with(p) || p.starts_with(h))
    }

    /// The rename about to be applied carries a change of ours made after the plan to `p`:
    /// later steps must find `p` changed since the plan, also after a crash (a self-move in
    /// the recorded moves, before the rename is applied; the shell does not count the run's
    /// own rename as a change of ours).
    fn hold(&mut self, p: &RelPath) {
        if !self.moved.iter().any(|(f, t)| f == p && t == p) {
            self.moved.push((p.clone(), p.clone()));
            self.queue.push_back(Action::Moved(p.clone(), p.clone()));
        }
    }

    /// The current step with our names rebased through the run's late moves.
    fn rebased_step(&self) -> Step {
        let r = |p: RelPath| self.ours_now(p);
        match self.steps[self.step].clone() {
            Step::Rename { from, to } => Step::Rename {
                from: r(from),
                to: r(to),
            },
            Step::Remove { our_path } => Step::Remove {
                our_path: r(our_path),
            },
            Step::Mkdir {
                their_path,
                our_path,
            } => Step::Mkdir {
                their_path,
                our_path: r(our_path),
            },
            Step::CopyFromTheirs {
                their_path,
                our_path,
            } => Step::CopyFromTheirs {
                their_path,
                our_path: r(our_path),
            },
            Step::ConflictCopy {
                their_path,
                path,
                copy,
                reason,
            } => Step::ConflictCopy {
                their_path,
                path: r(path),
                copy: r(copy),
                reason,
            },
        }
    }

    /// Sends the current copy (or rename) to `to` instead of `from`, and lists it.
    fn move_late(&mut self, from: &RelPath, to: &RelPath) {
        self.moved.push((from.clone(), to.clone()));
        self.queue
            .push_back(Action::Moved(from.clone(), to.clone()));
        self.late_conflict(from, Some(to.clone()));
    }

    /// A late conflict name for `p` at the root (its own directory is gone).
    fn homeless(&self, p: &RelPath) -> Result<RelPath, RunError> {
        let name = p.file_name().unwrap_or(b"entry").to_vec();
        let at_root = RelPath::new(name).map_err(|e| self.fail(e.to_string()))?;
        late_name(&at_root, &self.label, self.step).map_err(|why| self.fail(why))
    }

    fn start_step(&mut self) {
        if !self.moved.is_empty() {
            self.steps[self.step] = self.rebased_step();
        }
        match self.steps[self.step].clone() {
            Step::Rename { to, .. } => self.stat(to, Purpose::RenameTo),
            Step::Remove { our_path } => self.stat(our_path, Purpose::Remove),
            Step::Mkdir {
                their_path,
                our_path,
            }
            | Step::CopyFromTheirs {
                their_path,
                our_path,
            }
            | Step::ConflictCopy {
                their_path,
                copy: our_path,
                ..
            } => {
                self.copy = Some(Copy {
                    their_path,
                    temp: temp_beside(&our_path, &self.temp_tag, self.step, 0),
                    target: our_path.clone(),
                    ours: None,
                    ours_changed: false,
                    dir: None,
                    phase: Phase::Looking,
                    pending: VecDeque::new(),
                    last: false,
                    any: false,
                    applied: 0,
                    redirected: false,
                    discarding: false,
                    placed_late: false,
                    temp_tries: 0,
                });
                self.stat(our_path, Purpose::Target);
            }
        }
    }

    fn stat(&mut self, path: RelPath, why: Purpose) {
        self.looking = Some(path.clone());
        self.queue.push_back(Action::Stat(path));
        self.wait = Wait::Stat(why);
    }

    fn apply(&mut self, op: Op, tolerate: Tolerate) {
        self.queue.push_back(Action::Apply(op));
        self.wait = Wait::Apply(tolerate);
    }

    fn finish(&mut self) {
        self.wait = Wait::None;
        self.renaming = None;
        self.finishing = true;
    }

    fn late_conflict(&mut self, path: &RelPath, copy: Option<RelPath>) {
        self.queue.push_back(Action::Conflict(Conflict {
            path: self.where_left(path),
            copy: copy.map(|c| self.where_left(&c)),
            reason: Reason::ChangedDuringReintegration,
        }));
    }

    /// Where the plan's later renames take our `p` (a name inside a parked directory ends
    /// where that directory goes), as far as the run's late moves so far tell.
    fn where_left(&self, p: &RelPath) -> RelPath {
        let later = self.steps.iter().skip(self.step + 1);
        later.fold(p.clone(), |p, step| match step {
            Step::Rename { from, to } => {
                let (from, to) = (self.ours_now(from.clone()), self.ours_now(to.clone()));
                p.rebase(&from, &to).unwrap_or(p)
            }
            _ => p,
        })
    }

    fn fail(&self, why: impl Into<String>) -> RunError {
        RunError::Step {
            step: self.step,
            what: format!("{:?}", self.steps.get(self.step)),
            why: why.into(),
        }
    }

    fn copy_mut(&mut self) -> Result<&mut Copy, RunError> {
        self.copy.as_mut().ok_or(RunError::Misuse("no copy step"))
    }

    /// The answer to [`Action::Stat`]: what our tree has there (`None`: nothing).
    pub fn on_stat(&mut self, st: Option<Stat>) -> Result<(), RunError> {
        let Wait::Stat(why) = self.wait else {
            return Err(RunError::Misuse("on_stat without a Stat"));
        };
        self.wait = Wait::None;
        let looked = self.looking.take();
        // A hold covers a whole directory (where inside it the late change went is unknown),
        // but not the run's own temporary names in it: a leftover there is the run's.
        let temp = matches!(why, Purpose::Temp);
        let st = st.map(|mut s| {
            s.changed_since_plan |= !temp && looked.as_ref().is_some_and(|p| self.held(p));
            s
        });
        let step = self.steps[self.step].clone();
        match (why, step) {
            (Purpose::RenameTo, Step::Rename { from, .. }) => {
                self.stat(from, Purpose::RenameFrom { dest: st })
            }
            (Purpose::RenameFrom { dest }, Step::Rename { from, to }) => match st {
                None => self.finish(),
                Some(src) => self.rename(from, to, src, dest)?,
            },
            (Purpose::Remove, Step::Remove { our_path }) => match st {
                None => self.finish(),
                Some(s) if s.changed_since_plan => {
                    self.late_conflict(&our_path, None);
                    self.finish();
                }
                Some(s) if s.kind == EntryKind::Dir => {
                    self.apply(Op::Rmdir { path: our_path }, Tolerate::NotEmptyDir)
                }
                Some(s) => {
                    let op = Op::Unlink {
                        path: our_path,
                        nlink: s.nlink,
                    };
                    self.apply(op, Tolerate::NotFound)
                }
            },
            (Purpose::Target, _) => self.on_target(st)?,
            (Purpose::Place, _) => self.place(st)?,
            (Purpose::Temp, _) => {
                let (step, tag) = (self.step, self.temp_tag.clone());
                let temp = self.copy_mut()?.temp.clone();
                let planned = self.plan_names.contains(&temp);
                let c = self.copy_mut()?;
                match st {
                    // A change of ours put it there (a user took the name), or the plan places
                    // an entry of that name: not the run's leftover to remove; the copy is made
                    // under the next temporary name.
                    Some(s) if s.changed_since_plan || planned => {
                        let c = self.copy_mut()?;
                        c.temp_tries += 1;
                        if c.temp_tries >= TEMP_TRIES {
                            return Err(self.fail("every temporary name was taken by a user"));
                        }
                        let next = temp_beside(&c.target, &tag, step, c.temp_tries);
                        c.temp = next.clone();
                        self.stat(next, Purpose::Temp);
                    }
                    Some(s) => {
                        c.phase = Phase::ClearingTemp;
                        let op = if s.kind == EntryKind::Dir {
                            Op::Rmdir { path: temp }
                        } else {
                            Op::Unlink {
                                path: temp,
                                nlink: s.nlink,
                            }
                        };
                        self.apply(op, Tolerate::NotFound);
                    }
                    None => self.fetch()?,
                }
            }
            _ => return Err(RunError::Misuse("a Stat answer for another step")),
        }
        Ok(())
    }

    /// What our tree has at a copy's target: a late change of a file there sends their entry to
    /// a conflict name; then the temporary name is looked at.
    fn on_target(&mut self, st: Option<Stat>) -> Result<(), RunError> {
        let (step, label, tag) = (self.step, self.label.clone(), self.temp_tag.clone());
        let c = self.copy_mut()?;
        c.ours = st.map(|s| s.kind);
        c.ours_changed = st.is_some_and(|s| s.changed_since_plan);
        let mut late = None;
        if c.ours_changed && c.ours != Some(EntryKind::Dir) {
            let to = late_name(&c.target, &label, step);
            let to = to.map_err(|why| self.fail(why))?;
            let c = self.copy_mut()?;
            late = Some((c.target.clone(), to.clone()));
            c.temp = temp_beside(&to, &tag, step, 0);
            c.temp_tries = 0;
            c.target = to;
            c.ours = None;
        }
        if let Some((path, copy)) = late {
            self.move_late(&path, &copy);
        }
        let temp = self.copy_mut()?.temp.clone();
        self.stat(temp, Purpose::Temp);
        Ok(())
    }

    /// A rename step once both names were looked at: `src` at `from`, `dest` at `to`.
    fn rename(
        &mut self,
        from: RelPath,
        to: RelPath,
        src: Stat,
        dest: Option<Stat>,
    ) -> Result<(), RunError> {
        let (ino, carries_late) = (src.ino, src.changed_since_plan);
        let mut flags = 0;
        let to = match dest {
            Some(s) if s.changed_since_plan => {
                let late = late_name(&to, &self.label, self.step).map_err(|why| self.fail(why))?;
                self.move_late(&to, &late);
                late
            }
            // Two names of one file (linked before the plan's records began): rename(2) would
            // leave both; the file is at `to` already, so only `from` goes.
            Some(s) if s.ino == ino && ino != 0 && s.kind != EntryKind::Dir && s.nlink > 1 => {
                if carries_late {
                    self.hold(&to);
                }
                let op = Op::Unlink {
                    path: from,
                    nlink: s.nlink,
                };
                self.apply(op, Tolerate::NotFound);
                return Ok(());
            }
            Some(_) => to,
            // Nothing there when looked: whatever a user puts there meanwhile stays (the
            // rename then goes beside it, as when it is in the way).
            None => {
                flags = rename_flags::NOREPLACE;
                to
            }
        };
        if carries_late {
            self.hold(&to);
        }
        self.renaming = Some((from.clone(), ino, carries_late));
        let op = Op::Rename {
            from,
            to,
            flags,
            from_ino: ino,
        };
        self.apply(op, Tolerate::RenameHomeless);
        Ok(())
    }

    fn fetch(&mut self) -> Result<(), RunError> {
        let c = self.copy_mut()?;
        c.phase = Phase::Receiving;
        let a = Action::Fetch {
            their_path: c.their_path.clone(),
            as_path: c.temp.clone(),
        };
        self.queue.push_back(a);
        self.wait = Wait::Entry;
        Ok(())
    }

    /// An answer to [`Action::Fetch`]: the next ops that recreate their entry under the
    /// temporary name (the shell has checked that each names exactly it), `last` on the final
    /// answer. No ops at all: their side no longer has the entry, and the step does nothing.
    pub fn on_entry(&mut self, ops: Vec<Op>, last: bool) -> Result<(), RunError> {
        if !matches!(self.wait, Wait::Entry) {
            return Err(RunError::Misuse("on_entry without a Fetch"));
        }
        self.wait = Wait::None;
        let c = self.copy_mut()?;
        if c.discarding {
            if !last {
                self.wait = Wait::Entry;
                return Ok(());
            }
            c.discarding = false;
            let temp = c.temp.clone();
            self.stat(temp, Purpose::Temp);
            return Ok(());
        }
        c.any |= !ops.is_empty();
        c.pending.extend(ops);
        c.last = last;
        self.feed()
    }

    /// Applies the next received op, or places the copy once all arrived.
    fn feed(&mut self) -> Result<(), RunError> {
        let c = self.copy_mut()?;
        if c.dir.is_none() {
            if let Some(first) = c.pending.front() {
                c.dir = Some(matches!(first, Op::Mkdir { .. }));
            }
        }
        if c.dir == Some(true) {
            // A directory is made in place: attributes only, never its entries.
            if c.ours.is_some_and(|k| k != EntryKind::Dir) {
                let (path, ours) = (c.target.clone(), c.ours);
                c.ours = None;
                let _ = ours;
                self.apply(Op::Unlink { path, nlink: 1 }, Tolerate::NotFound);
                return Ok(());
            }
            while let Some(op) = c.pending.pop_front() {
                let exists = c.ours == Some(EntryKind::Dir);
                if exists && (matches!(op, Op::Mkdir { .. }) || c.ours_changed) {
                    continue;
                }
                let op = retarget(op, &c.target).map_err(|why| self.fail(why))?;
                self.apply(op, Tolerate::Nothing);
                return Ok(());
            }
        } else if let Some(op) = c.pending.pop_front() {
            self.apply(op, Tolerate::Nothing);
            return Ok(());
        }
        let c = self.copy_mut()?;
        if !c.last {
            self.wait = Wait::Entry;
            return Ok(());
        }
        if !c.any || c.dir == Some(true) {
            self.finish();
            return Ok(());
        }
        // Users kept working while the copy was made (a fetch may take long): the target is
        // looked at again, as late as possible, before the copy replaces it.
        let target = c.target.clone();
        self.stat(target, Purpose::Place);
        Ok(())
    }

    /// The finished copy goes to its target: over what the plan saw there, beside a directory
    /// of ours or a change of ours made since the plan, and never over what a user put at an
    /// absent target meanwhile (RENAME_NOREPLACE; it then goes beside it too).
    fn place(&mut self, st: Option<Stat>) -> Result<(), RunError> {
        let mut flags = 0;
        match st {
            Some(s) if s.kind == EntryKind::Dir || s.changed_since_plan => {
                let target = self.copy_mut()?.target.clone();
                let late =
                    late_name(&target, &self.label, self.step).map_err(|why| self.fail(why))?;
                self.move_late(&target, &late);
                self.copy_mut()?.target = late;
            }
            Some(_) => {}
            None => flags = rename_flags::NOREPLACE,
        }
        let c = self.copy_mut()?;
        c.phase = Phase::Placing;
        let op = Op::Rename {
            from: c.temp.clone(),
            to: c.target.clone(),
            flags,
            from_ino: 0,
        };
        self.apply(op, Tolerate::Nothing);
        Ok(())
    }

    /// The answer to [`Action::Apply`].
    pub fn on_applied(&mut self, r: Applied) -> Result<(), RunError> {
        let Wait::Apply(tolerate) = self.wait else {
            return Err(RunError::Misuse("on_applied without an Apply"));
        };
        self.wait = Wait::None;
        let homeless = matches!(r, Applied::NotFound | Applied::NotDir);
        if r != Applied::Ok && tolerate == Tolerate::RenameHomeless && self.renaming.is_some() {
            return self.rename_elsewhere(homeless);
        }
        let phase = self.copy.as_ref().map(|c| (c.phase, c.dir, c.placed_late));
        if let (false, Some((Phase::Placing, Some(false), placed_late))) = (r == Applied::Ok, phase)
        {
            return match r {
                // The copy, or the directory it was made in, is gone: a user moved it away
                // while it waited to be placed (the target's look came between).
                Applied::NotFound | Applied::NotDir => self.copy_again(),
                _ if !placed_late => self.place_beside(),
                r => Err(self.fail(format!("{r:?}"))),
            };
        }
        if r == Applied::Exists && matches!(phase, Some((Phase::Receiving, Some(true), _))) {
            // A directory of ours appeared there after the plan: kept with its attributes.
            let c = self.copy_mut()?;
            c.ours = Some(EntryKind::Dir);
            c.ours_changed = true;
            c.applied += 1;
            return self.feed();
        }
        let first_of_copy = self
            .copy
            .as_ref()
            .is_some_and(|c| c.phase == Phase::Receiving && c.applied == 0 && !c.redirected);
        if homeless && first_of_copy {
            return self.copy_homeless();
        }
        if r == Applied::Ok {
            if let Some(c) = self.copy.as_mut() {
                c.applied += 1;
            }
        }
        match (r, tolerate) {
            // Gone, or a directory above it is gone: the step's effect is there already.
            (Applied::Ok, _)
            | (
                Applied::NotFound | Applied::NotDir,
                Tolerate::NotFound | Tolerate::RenameHomeless,
            ) => {}
            (Applied::NotEmpty, Tolerate::NotEmptyDir) => {
                if let Step::Remove { our_path } = &self.steps[self.step] {
                    let p = our_path.clone();
                    self.late_conflict(&p, None);
                }
            }
            (r, _) => return Err(self.fail(format!("{r:?}"))),
        }
        let phase = self.copy.as_ref().map(|c| c.phase);
        match phase {
            None | Some(Phase::Placing) => self.finish(),
            Some(Phase::ClearingTemp) => self.fetch()?,
            Some(Phase::Receiving) => self.feed()?,
            Some(Phase::Looking) => return Err(RunError::Misuse("an Apply while looking")),
        }
        Ok(())
    }
}

impl Run {
    /// A rename failed: its destination's directory is gone (the object goes to the root under
    /// a late conflict name) or something of ours is in the way (it goes beside it); a second
    /// failure is tolerated only if its source is gone (done before a crash).
    fn rename_elsewhere(&mut self, homeless: bool) -> Result<(), RunError> {
        let Step::Rename { to, .. } = self.steps[self.step].clone() else {
            return Err(RunError::Misuse("a rename answer for another step"));
        };
        let (from, ino, carries_late) = self
            .renaming
            .take()
            .ok_or(RunError::Misuse("no rename in progress"))?;
        // Its directory is gone: to the root; something of ours is in the way: beside it.
        let late = match homeless {
            true => self.homeless(&to)?,
            false => late_name(&to, &self.label, self.step).map_err(|why| self.fail(why))?,
        };
        self.move_late(&to, &late);
        if carries_late {
            self.hold(&late);
        }
        let op = Op::Rename {
            from,
            to: late,
            flags: 0,
            from_ino: ino,
        };
        self.apply(op, Tolerate::NotFound);
        Ok(())
    }

    /// The finished copy cannot replace the target (something of ours appeared there after the
    /// plan): it goes beside it under a late conflict name.
    fn place_beside(&mut self) -> Result<(), RunError> {
        let c = self.copy_mut()?;
        c.placed_late = true;
        let (target, temp) = (c.target.clone(), c.temp.clone());
        let late = late_name(&target, &self.label, self.step).map_err(|why| self.fail(why))?;
        self.move_late(&target, &late);
        let op = Op::Rename {
            from: temp,
            to: late,
            flags: 0,
            from_ino: 0,
        };
        self.apply(op, Tolerate::Nothing);
        Ok(())
    }

    /// Begins the copy step again (a user moved its finished copy away): the target is looked at
    /// anew (after the run's late moves: a late name this step chose stays its target) and
    /// their entry fetched again.
    fn copy_again(&mut self) -> Result<(), RunError> {
        self.copy_tries += 1;
        if self.copy_tries >= COPY_TRIES {
            return Err(self.fail("users moved every copy away before it was placed"));
        }
        self.wait = Wait::None;
        self.copy = None;
        self.start_step();
        Ok(())
    }

    /// The first op of a copy found its directory gone: the copy goes to the root under a late
    /// conflict name; the rest of this answer is dropped and the entry fetched again.
    fn copy_homeless(&mut self) -> Result<(), RunError> {
        let (step, tag) = (self.step, self.temp_tag.clone());
        let target = self.copy_mut()?.target.clone();
        let late = self.homeless(&target)?;
        self.move_late(&target, &late);
        let c = self.copy_mut()?;
        c.target = late.clone();
        c.temp = temp_beside(&late, &tag, step, 0);
        c.temp_tries = 0;
        c.ours = None;
        c.ours_changed = false;
        c.dir = None;
        c.pending.clear();
        c.any = false;
        c.redirected = true;
        if c.last {
            let temp = c.temp.clone();
            self.stat(temp, Purpose::Temp);
        } else {
            c.discarding = true;
            self.wait = Wait::Entry;
        }
        Ok(())
    }
}

/// `op` (one that makes or describes an entry) naming `path` instead.
fn retarget(op: Op, path: &RelPath) -> Result<Op, String> {
    let p = path.clone();
    Ok(match op {
        Op::Create { mode, uid, gid, .. } => Op::Create {
            path: p,
            mode,
            uid,
            gid,
        },
        Op::Mkdir { mode, uid, gid, .. } => Op::Mkdir {
            path: p,
            mode,
            uid,
            gid,
        },
        Op::SetMode { mode, .. } => Op::SetMode { path: p, mode },
        Op::SetOwner { uid, gid, .. } => Op::SetOwner { path: p, uid, gid },
        Op::SetTimes { atime, mtime, .. } => Op::SetTimes {
            path: p,
            atime,
            mtime,
        },
        Op::SetXattr {
            name, value, flags, ..
        } => Op::SetXattr {
            path: p,
            name,
            value,
            flags,
        },
        Op::RemoveXattr { name, .. } => Op::RemoveXattr { path: p, name },
        other => {
            return Err(format!(
                "{} is not part of a directory's copy",
                other.name()
            ))
        }
    })
}

/// The names of `step` on our side that look like a copy's temporary name.
fn temp_like_names(step: &Step) -> Vec<RelPath> {
    let names = match step {
        Step::Rename { from, to } => vec![from, to],
        Step::Remove { our_path }
        | Step::Mkdir { our_path, .. }
        | Step::CopyFromTheirs { our_path, .. } => vec![our_path],
        Step::ConflictCopy { path, copy, .. } => vec![path, copy],
    };
    names
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.starts_with(b".mirrorfs-reint-copy"))
        })
        .cloned()
        .collect()
}

/// The temporary name a copy is made under: beside `target`, unique per plan (`tag`) and step
/// (a name a user took from an earlier plan is never taken for this plan's leftover); `try_n` > 0 when
/// users took the ones before.
fn temp_beside(target: &RelPath, tag: &str, step: usize, try_n: u32) -> RelPath {
    let name = match try_n {
        0 => format!(".mirrorfs-reint-copy-{tag}-{step}"),
        n => format!(".mirrorfs-reint-copy-{tag}-{step}-{n}"),
    };
    match target.parent() {
        Some(p) if !p.is_root() => p.join(name.as_bytes()),
        _ => RelPath::new(name),
    }
    .unwrap_or_else(|_| RelPath::root())
}

/// `NAME.LABEL-late-STEP` beside `path` (the label is `conflict-SITE-TIME`), shortened to fit a name.
fn late_name(path: &RelPath, label: &str, step: usize) -> Result<RelPath, String> {
    let name = path.file_name().unwrap_or_default();
    let suffix = format!(".{label}-late-{step}");
    let keep = crate::path::NAME_BYTES_MAX.saturating_sub(suffix.len());
    let mut n = name[..name.len().min(keep)].to_vec();
    n.extend_from_slice(suffix.as_bytes());
    match path.parent() {
        Some(p) if !p.is_root() => p.join(&n),
        _ => RelPath::new(n),
    }
    .map_err(|e| format!("late conflict name: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::drive;
    use crate::sim::SimTree;
    use crate::tree::{apply_op, Tree};

    fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("valid path")
    }

    /// Files with their data (and the directories above them).
    fn tree(files: &[(&str, &str)]) -> SimTree {
        let mut t = SimTree::reference();
        for (f, data) in files {
            let mut up = p(f).parent();
            let mut dirs = Vec::new();
            while let Some(d) = up.filter(|d| !d.is_root()) {
                up = d.parent();
                dirs.push(d);
            }
            for d in dirs.into_iter().rev() {
                if t.kind(&d).expect("look").is_none() {
                    let op = Op::Mkdir {
                        path: d,
                        mode: 0o755,
                        uid: 0,
                        gid: 0,
                    };
                    apply_op(&mut t, &op, false).expect("set up");
                }
            }
            let ops = [
                Op::Create {
                    path: p(f),
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                },
                Op::Write {
                    path: p(f),
                    offset: 0,
                    data: data.as_bytes().to_vec(),
                },
            ];
            for op in ops {
                apply_op(&mut t, &op, false).expect("set up");
            }
        }
        t
    }

    fn content(t: &SimTree, f: &str) -> Option<String> {
        let s = t.snapshot();
        let e = s.entries.get(&p(f))?;
        Some(String::from_utf8_lossy(&e.content).into_owned())
    }

    fn copy(f: &str) -> Step {
        Step::CopyFromTheirs {
            their_path: p(f),
            our_path: p(f),
        }
    }

    #[test]
    fn a_copy_replaces_ours_through_a_temporary_name() {
        let mut ours = tree(&[("x", "ours")]);
        let theirs = tree(&[("x", "theirs")]).snapshot();
        let plan = Plan {
            steps: vec![copy("x")],
            conflicts: vec![],
        };
        let r = drive(&mut ours, &theirs, &plan, 0, usize::MAX, &|_| false).expect("run");
        assert!(r.done && r.conflicts.is_empty() && r.cursor == 1, "{r:?}");
        assert_eq!(content(&ours, "x").as_deref(), Some("theirs"));
        let names: Vec<_> = ours.snapshot().entries.into_keys().collect();
        assert_eq!(
            names,
            vec![RelPath::root(), p("x")],
            "no temporary name left"
        );
    }

    #[test]
    fn a_crash_after_any_op_then_a_rerun_from_the_cursor_ends_the_same() {
        let theirs = tree(&[("x", "theirs x"), ("y", "theirs y")]).snapshot();
        let plan = Plan {
            steps: vec![
                copy("x"),
                Step::Remove { our_path: p("z") },
                Step::Rename {
                    from: p("w"),
                    to: p("v"),
                },
                copy("y"),
            ],
            conflicts: vec![],
        };
        let start = || tree(&[("x", "ours x"), ("z", "z"), ("w", "w")]);
        let mut whole = start();
        drive(&mut whole, &theirs, &plan, 0, usize::MAX, &|_| false).expect("run");
        let want = whole.snapshot();
        for budget in 0..20 {
            let mut t = start();
            let first = drive(&mut t, &theirs, &plan, 0, budget, &|_| false).expect("run");
            let again = drive(&mut t, &theirs, &plan, first.cursor, usize::MAX, &|_| false)
                .expect("re-run");
            assert!(again.done);
            let diff = t.snapshot().diff(&want, 5);
            assert!(diff.is_empty(), "crash after {budget} ops: {diff:?}");
        }
    }

    #[test]
    fn a_target_changed_after_the_plan_keeps_ours_and_lists_a_late_conflict() {
        let mut ours = tree(&[("x", "ours, edited while the plan ran"), ("z", "ours z")]);
        let theirs = tree(&[("x", "theirs")]).snapshot();
        let plan = Plan {
            steps: vec![copy("x"), Step::Remove { our_path: p("z") }],
            conflicts: vec![],
        };
        let changed = |q: &RelPath| q == &p("x") || q == &p("z");
        let r = drive(&mut ours, &theirs, &plan, 0, usize::MAX, &changed).expect("run");
        let late = "x.conflict-b-19700101-000000-late-0";
        assert_eq!(
            content(&ours, "x").as_deref(),
            Some("ours, edited while the plan ran")
        );
        assert_eq!(content(&ours, late).as_deref(), Some("theirs"));
        assert_eq!(
            content(&ours, "z").as_deref(),
            Some("ours z"),
            "not removed"
        );
        let reasons: Vec<_> = r
            .conflicts
            .iter()
            .map(|c| (c.path.clone(), c.copy.clone()))
            .collect();
        assert_eq!(reasons, vec![(p("x"), Some(p(late))), (p("z"), None)]);
        assert!(r
            .conflicts
            .iter()
            .all(|c| c.reason == Reason::ChangedDuringReintegration));
    }

    #[test]
    fn a_rename_onto_a_name_taken_after_the_plan_goes_beside_it() {
        let mut ours = tree(&[("t", "theirs, parked"), ("y", "ours, new since the plan")]);
        let theirs = tree(&[]).snapshot();
        let plan = Plan {
            steps: vec![Step::Rename {
                from: p("t"),
                to: p("y"),
            }],
            conflicts: vec![],
        };
        let r = drive(&mut ours, &theirs, &plan, 0, usize::MAX, &|q| q == &p("y")).expect("run");
        assert_eq!(
            content(&ours, "y").as_deref(),
            Some("ours, new since the plan")
        );
        assert_eq!(
            content(&ours, "y.conflict-b-19700101-000000-late-0").as_deref(),
            Some("theirs, parked")
        );
        assert_eq!(r.conflicts.len(), 1);
    }

    /// Seed 6420: a user renamed another of our files onto a name the plan had parked an object
    /// under (`t`) after the plan was made; the plan's rename then carried that late change to
    /// `y`, and the plan's copy of their `y` replaced it there. The late change must hold `y`
    /// for the rest of the run, also across a crash (through the recorded moves).
    #[test]
    fn a_late_change_a_rename_carries_keeps_its_new_name_from_later_steps() {
        let late = "y.conflict-b-19700101-000000-late-1";
        let theirs = tree(&[("y", "theirs")]).snapshot();
        let plan = Plan {
            steps: vec![
                Step::Rename {
                    from: p("t"),
                    to: p("y"),
                },
                copy("y"),
            ],
            conflicts: vec![],
        };
        let label = "conflict-b-19700101-000000";
        for budget in [usize::MAX, 0, 1, 2, 3, 4] {
            let mut ours = tree(&[("t", "ours, renamed onto t since the plan")]);
            let (mut users, touched) = (|_: &mut SimTree| None, |q: &RelPath| q == &p("t"));
            let mut late_changes = crate::sim::Late {
                users: &mut users,
                touched: &touched,
                names: Default::default(),
                moved: Vec::new(),
                log: Vec::new(),
            };
            let mut listed = Vec::new();
            let mut cursor = 0;
            for b in [budget, usize::MAX] {
                let r = crate::sim::drive_with(
                    &mut ours,
                    &theirs,
                    &plan,
                    cursor,
                    b,
                    label,
                    &mut late_changes,
                )
                .expect("run");
                cursor = r.cursor;
                listed.extend(r.conflicts);
                if r.done {
                    break;
                }
            }
            let want = Some("ours, renamed onto t since the plan");
            assert_eq!(content(&ours, "y").as_deref(), want, "crash after {budget}");
            assert_eq!(content(&ours, late).as_deref(), Some("theirs"), "{budget}");
            assert_eq!(content(&ours, "t"), None);
            let copies: Vec<_> = listed.iter().map(|c| c.copy.clone()).collect();
            assert_eq!(copies, vec![Some(p(late))], "crash after {budget}");
        }
    }

    /// Seeds 433 and 2707 (three sites): a rename between two names of one file (hard-linked
    /// before the common point, so the planner cannot know) does nothing in rename(2); the
    /// parked name was left behind. The file is at its destination already: the parked name
    /// goes, the file stays.
    #[test]
    fn a_rename_onto_another_name_of_the_same_file_drops_the_source_name_only() {
        let mut ours = tree(&[("t", "one file, two names")]);
        let link = Op::Link {
            from: p("t"),
            to: p("y"),
        };
        apply_op(&mut ours, &link, false).expect("link");
        let plan = Plan {
            steps: vec![Step::Rename {
                from: p("t"),
                to: p("y"),
            }],
            conflicts: vec![],
        };
        let theirs = tree(&[]).snapshot();
        let r = drive(&mut ours, &theirs, &plan, 0, usize::MAX, &|_| false).expect("run");
        assert!(r.done && r.conflicts.is_empty(), "{r:?}");
        assert_eq!(content(&ours, "y").as_deref(), Some("one file, two names"));
        let names: Vec<_> = ours.snapshot().entries.into_keys().collect();
        assert_eq!(names, vec![RelPath::root(), p("y")]);
    }

    /// Drives `plan` once with a user who applies `op` just before the run's `nth` look (0-based).
    fn drive_with_user_at(
        ours: &mut SimTree,
        theirs: &crate::sim::Snapshot,
        plan: &Plan,
        nth: usize,
        op: Op,
    ) -> crate::sim::Stopped {
        let mut looks = 0;
        let mut users = |t: &mut SimTree| {
            looks += 1;
            if looks != nth + 1 {
                return None;
            }
            apply_op(t, &op, false).expect("user's change");
            Some(op.clone())
        };
        let mut late = crate::sim::Late {
            users: &mut users,
            touched: &|_| false,
            names: Default::default(),
            moved: Vec::new(),
            log: Vec::new(),
        };
        let label = "conflict-b-19700101-000000";
        crate::sim::drive_with(ours, theirs, plan, 0, usize::MAX, label, &mut late).expect("run")
    }

    /// Seed 4646 (three sites): a user renamed a file inside a parked directory after the run
    /// had looked at that directory and before its rename: the rename carried the late change
    /// unseen and the next copy replaced it. The rename looks at its source last.
    #[test]
    fn a_rename_looks_at_its_source_last() {
        let theirs = tree(&[("b/e", "theirs")]).snapshot();
        let plan = Plan {
            steps: vec![
                Step::Rename {
                    from: p("t"),
                    to: p("b"),
                },
                copy("b/e"),
            ],
            conflicts: vec![],
        };
        let user = Op::Rename {
            from: p("t/a"),
            to: p("t/e"),
            flags: 0,
            from_ino: 0,
        };
        let mut ours = tree(&[("t/a", "ours, renamed by a user")]);
        let r = drive_with_user_at(&mut ours, &theirs, &plan, 1, user);
        assert!(r.done, "{r:?}");
        assert_eq!(
            content(&ours, "b/e").as_deref(),
            Some("ours, renamed by a user")
        );
        let late = "b/e.conflict-b-19700101-000000-late-1";
        assert_eq!(content(&ours, late).as_deref(), Some("theirs"));
    }

    /// The other order's risk: a user puts something at the destination after the run looked
    /// there; the rename (RENAME_NOREPLACE when the destination was absent) refuses to replace
    /// it and goes beside it.
    #[test]
    fn a_rename_never_replaces_what_a_user_put_at_an_empty_destination_meanwhile() {
        let plan = Plan {
            steps: vec![Step::Rename {
                from: p("t"),
                to: p("y"),
            }],
            conflicts: vec![],
        };
        let user = Op::Rename {
            from: p("u"),
            to: p("y"),
            flags: 0,
            from_ino: 0,
        };
        let mut ours = tree(&[("t", "parked"), ("u", "ours, moved to y by a user")]);
        let r = drive_with_user_at(&mut ours, &tree(&[]).snapshot(), &plan, 1, user);
        assert!(r.done, "{r:?}");
        let want = Some("ours, moved to y by a user");
        assert_eq!(content(&ours, "y").as_deref(), want);
        let late = "y.conflict-b-19700101-000000-late-0";
        assert_eq!(content(&ours, late).as_deref(), Some("parked"));
        assert_eq!(r.conflicts.len(), 1, "{r:?}");
    }

    /// Seed 7434 (three sites): a user renamed one of our files onto a copy's target after the
    /// run had looked at the target and while the copy was made; the finished copy replaced the
    /// user's file. The copy looks at its target again just before it places itself.
    #[test]
    fn a_copy_never_replaces_what_a_user_put_at_its_target_while_it_was_made() {
        let theirs = tree(&[("x", "theirs")]).snapshot();
        let plan = Plan {
            steps: vec![copy("x")],
            conflicts: vec![],
        };
        let user = Op::Rename {
            from: p("u"),
            to: p("x"),
            flags: 0,
            from_ino: 0,
        };
        // Look 0 is the target, look 1 the temporary name: the user moves `u` onto `x` between.
        let mut ours = tree(&[("x", "ours"), ("u", "ours, moved onto x by a user")]);
        let r = drive_with_user_at(&mut ours, &theirs, &plan, 1, user);
        assert!(r.done, "{r:?}");
        let want = Some("ours, moved onto x by a user");
        assert_eq!(content(&ours, "x").as_deref(), want);
        let late = "x.conflict-b-19700101-000000-late-0";
        assert_eq!(content(&ours, late).as_deref(), Some("theirs"));
        let listed: Vec<_> = r
            .conflicts
            .iter()
            .map(|c| (c.path.clone(), c.copy.clone(), c.reason))
            .collect();
        let reason = Reason::ChangedDuringReintegration;
        assert_eq!(listed, vec![(p("x"), Some(p(late)), reason)]);
        let names: Vec<_> = ours.snapshot().entries.into_keys().collect();
        assert_eq!(
            names,
            vec![RelPath::root(), p("x"), p(late)],
            "no temporary name left"
        );
    }

    /// The same user's rename onto a target that was absent when looked at: the copy does not
    /// replace it (RENAME_NOREPLACE) and goes beside it.
    #[test]
    fn a_copy_to_an_absent_target_never_replaces_what_a_user_put_there_meanwhile() {
        let theirs = tree(&[("x", "theirs")]).snapshot();
        let plan = Plan {
            steps: vec![copy("x")],
            conflicts: vec![],
        };
        let user = Op::Rename {
            from: p("u"),
            to: p("x"),
            flags: 0,
            from_ino: 0,
        };
        let mut ours = tree(&[("u", "ours, moved onto x by a user")]);
        let r = drive_with_user_at(&mut ours, &theirs, &plan, 1, user);
        assert!(r.done, "{r:?}");
        let want = Some("ours, moved onto x by a user");
        assert_eq!(content(&ours, "x").as_deref(), want);
        let late = "x.conflict-b-19700101-000000-late-0";
        assert_eq!(content(&ours, late).as_deref(), Some("theirs"));
        assert_eq!(r.conflicts.len(), 1, "{r:?}");
    }

    /// The look before placing gives users a moment with the finished copy: one who moves it
    /// away keeps it, and the step fetches their entry again.
    #[test]
    fn a_copy_a_user_moved_away_before_it_was_placed_is_made_again() {
        let tag = crc32c::crc32c(b"conflict-b-19700101-000000");
        let theirs = tree(&[("d/x", "theirs")]).snapshot();
        let plan = Plan {
            steps: vec![copy("d/x")],
            conflicts: vec![],
        };
        let user = Op::Rename {
            from: p(&format!("d/.mirrorfs-reint-copy-{tag:08x}-0")),
            to: p("d/kept"),
            flags: 0,
            from_ino: 0,
        };
        // Looks 0 and 1 are the target and the temporary name; look 2, the target again.
        let mut ours = tree(&[("d/x", "ours")]);
        let r = drive_with_user_at(&mut ours, &theirs, &plan, 2, user);
        assert!(r.done && r.conflicts.is_empty() && r.cursor == 1, "{r:?}");
        assert_eq!(content(&ours, "d/x").as_deref(), Some("theirs"));
        assert_eq!(content(&ours, "d/kept").as_deref(), Some("theirs"));
        let names: Vec<_> = ours.snapshot().entries.into_keys().collect();
        let want = vec![RelPath::root(), p("d"), p("d/kept"), p("d/x")];
        assert_eq!(names, want, "no temporary name left");
    }

    /// Seed 9378 (two sites): after a crash left a half copy at a step's temporary name, a user
    /// exchanged one of our directories with it; the run took the directory for its leftover
    /// and failed to remove it (not empty). What a change of ours put at a temporary name is
    /// not the run's to remove: the copy is made under another temporary name.
    #[test]
    fn a_temporary_name_a_user_took_is_left_alone_and_another_one_is_used() {
        let tag = crc32c::crc32c(b"conflict-b-19700101-000000");
        let taken = format!(".mirrorfs-reint-copy-{tag:08x}-0");
        let users_file = format!("{taken}/f");
        let mut ours = tree(&[(&users_file, "ours, a user's file")]);
        let theirs = tree(&[("x", "theirs")]).snapshot();
        let plan = Plan {
            steps: vec![copy("x")],
            conflicts: vec![],
        };
        let changed = |q: &RelPath| q.starts_with(&p(&taken));
        let r = drive(&mut ours, &theirs, &plan, 0, usize::MAX, &changed).expect("run");
        assert!(r.done && r.conflicts.is_empty(), "{r:?}");
        assert_eq!(content(&ours, "x").as_deref(), Some("theirs"));
        let users = content(&ours, &users_file);
        assert_eq!(users.as_deref(), Some("ours, a user's file"));
        let names: Vec<_> = ours.snapshot().entries.into_keys().collect();
        assert_eq!(names.len(), 4, "no other temporary name left: {names:?}");
    }

    /// Seed 7710 (three sites): a late conflict copy made inside a parked directory was listed
    /// under the parked name; a later step moved the directory, and the copy with it. It is
    /// listed where the plan's later renames take it.
    #[test]
    fn a_late_conflict_is_listed_where_later_renames_of_the_plan_take_it() {
        let mut ours = tree(&[(".mirrorfs-reint/x", "ours, edited since the plan")]);
        let theirs = tree(&[("f/x", "theirs")]).snapshot();
        let plan = Plan {
            steps: vec![
                Step::CopyFromTheirs {
                    their_path: p("f/x"),
                    our_path: p(".mirrorfs-reint/x"),
                },
                Step::Rename {
                    from: p(".mirrorfs-reint"),
                    to: p("f"),
                },
            ],
            conflicts: vec![],
        };
        let changed = |q: &RelPath| q == &p(".mirrorfs-reint/x");
        let r = drive(&mut ours, &theirs, &plan, 0, usize::MAX, &changed).expect("run");
        let late = "f/x.conflict-b-19700101-000000-late-0";
        assert_eq!(content(&ours, late).as_deref(), Some("theirs"));
        let listed: Vec<_> = r
            .conflicts
            .iter()
            .map(|c| (c.path.clone(), c.copy.clone()))
            .collect();
        assert_eq!(listed, vec![(p("f/x"), Some(p(late)))]);
    }

    #[test]
    fn a_directory_is_made_in_place_and_an_existing_one_gets_only_attributes() {
        let mut ours = SimTree::reference();
        apply_op(
            &mut ours,
            &Op::Mkdir {
                path: p("d"),
                mode: 0o700,
                uid: 0,
                gid: 0,
            },
            false,
        )
        .expect("mkdir");
        let mut theirs = SimTree::reference();
        for d in ["d", "e"] {
            let op = Op::Mkdir {
                path: p(d),
                mode: 0o750,
                uid: 0,
                gid: 0,
            };
            apply_op(&mut theirs, &op, false).expect("mkdir");
        }
        let plan = Plan {
            steps: vec![
                Step::Mkdir {
                    their_path: p("d"),
                    our_path: p("d"),
                },
                Step::Mkdir {
                    their_path: p("e"),
                    our_path: p("e"),
                },
            ],
            conflicts: vec![],
        };
        let r = drive(&mut ours, &theirs.snapshot(), &plan, 0, usize::MAX, &|_| {
            false
        })
        .expect("run");
        assert!(r.done);
        let s = ours.snapshot();
        for d in ["d", "e"] {
            let e = s.entries.get(&p(d)).expect("directory");
            assert_eq!((e.kind, e.perm), (EntryKind::Dir, 0o750), "{d}");
        }
        let names: Vec<_> = s.entries.into_keys().collect();
        assert_eq!(names, vec![RelPath::root(), p("d"), p("e")]);
    }

    #[test]
    fn an_entry_their_side_no_longer_has_is_skipped() {
        let mut ours = tree(&[("x", "ours")]);
        let theirs = tree(&[]).snapshot();
        let plan = Plan {
            steps: vec![copy("x")],
            conflicts: vec![],
        };
        let r = drive(&mut ours, &theirs, &plan, 0, usize::MAX, &|_| false).expect("run");
        assert!(r.done);
        assert_eq!(content(&ours, "x").as_deref(), Some("ours"));
    }

    #[test]
    fn answers_out_of_turn_are_refused() {
        let plan = Plan {
            steps: vec![copy("x")],
            conflicts: vec![],
        };
        let mut run = Run::new(&plan, 0, "conflict-b-19700101-000000", Vec::new());
        assert!(run.on_applied(Applied::Ok).is_err());
        assert!(run.on_entry(Vec::new(), true).is_err());
        assert_eq!(run.next_action(), Ok(Action::Stat(p("x"))));
        assert!(
            run.next_action().is_err(),
            "next_action() before the Stat is answered"
        );
    }
}
