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
//! | `Rename{from, to}` | nothing if `from` is gone (done before a crash); else `rename(from, to)` |
//! | `Remove{our_path}` | nothing if absent; `rmdir` or `unlink` |
//! | `Mkdir{their, our}` | their directory's attributes on ours (made if absent) |
//! | `CopyFromTheirs{their, our}`, `ConflictCopy{their, copy}` | their entry is recreated under a temporary name beside the target (`.mirrorfs-reint-copy-I`), then renamed over it, so a crash never leaves a half copy at the target; a directory is made in place (attributes only) |
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
//! (`NAME.conflict-SITE-YYYYMMDD-HHMMSS-late-I`), a rename onto it goes to that name instead, and each is
//! listed as a [`Conflict`] with [`Reason::ChangedDuringReintegration`]. Nothing is overwritten
//! that the plan did not see.

use std::collections::VecDeque;

use super::{Conflict, Plan, Reason, Step};
use crate::op::Op;
use crate::path::RelPath;
use crate::tree::EntryKind;

/// What our tree has at a path.
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
    RenameFrom,
    RenameTo { ino: u64 },
    Remove,
    Target,
    Temp,
}

/// Which failures of an `Apply` are the step's own effect already done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tolerate {
    Nothing,
    /// A removal of something already gone; a rename whose source is gone.
    NotFound,
    /// An `rmdir` of a directory a change of ours filled since the plan: kept, listed.
    NotEmptyDir,
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
}

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
}

impl Run {
    /// Carries out `plan` from step `from` (the step cursor: how many are done). `label` is the
    /// plan's conflict label ([`super::conflict_label`]).
    pub fn new(plan: &Plan, from: usize, label: &str) -> Run {
        Run {
            steps: plan.steps.clone(),
            step: from,
            label: label.to_string(),
            queue: VecDeque::new(),
            wait: Wait::None,
            copy: None,
            finishing: false,
            started: false,
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

    fn start_step(&mut self) {
        match self.steps[self.step].clone() {
            Step::Rename { from, .. } => self.stat(from, Purpose::RenameFrom),
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
                    temp: temp_beside(&our_path, self.step),
                    target: our_path.clone(),
                    ours: None,
                    ours_changed: false,
                    dir: None,
                    phase: Phase::Looking,
                    pending: VecDeque::new(),
                    last: false,
                    any: false,
                });
                self.stat(our_path, Purpose::Target);
            }
        }
    }

    fn stat(&mut self, path: RelPath, why: Purpose) {
        self.queue.push_back(Action::Stat(path));
        self.wait = Wait::Stat(why);
    }

    fn apply(&mut self, op: Op, tolerate: Tolerate) {
        self.queue.push_back(Action::Apply(op));
        self.wait = Wait::Apply(tolerate);
    }

    fn finish(&mut self) {
        self.wait = Wait::None;
        self.finishing = true;
    }

    fn late_conflict(&mut self, path: &RelPath, copy: Option<RelPath>) {
        self.queue.push_back(Action::Conflict(Conflict {
            path: path.clone(),
            copy,
            reason: Reason::ChangedDuringReintegration,
        }));
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
        let step = self.steps[self.step].clone();
        match (why, step) {
            (Purpose::RenameFrom, Step::Rename { to, .. }) => match st {
                None => self.finish(),
                Some(s) => self.stat(to, Purpose::RenameTo { ino: s.ino }),
            },
            (Purpose::RenameTo { ino }, Step::Rename { from, to }) => {
                let to = match st {
                    Some(s) if s.changed_since_plan => {
                        let late =
                            late_name(&to, &self.label, self.step).map_err(|why| self.fail(why))?;
                        self.late_conflict(&to, Some(late.clone()));
                        late
                    }
                    _ => to,
                };
                let op = Op::Rename {
                    from,
                    to,
                    flags: 0,
                    from_ino: ino,
                };
                self.apply(op, Tolerate::NotFound);
            }
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
            (Purpose::Temp, _) => {
                let c = self.copy_mut()?;
                let temp = c.temp.clone();
                match st {
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
        let (step, label) = (self.step, self.label.clone());
        let c = self.copy_mut()?;
        c.ours = st.map(|s| s.kind);
        c.ours_changed = st.is_some_and(|s| s.changed_since_plan);
        let mut late = None;
        if c.ours_changed && c.ours != Some(EntryKind::Dir) {
            let to = late_name(&c.target, &label, step);
            let to = to.map_err(|why| self.fail(why))?;
            let c = self.copy_mut()?;
            late = Some((c.target.clone(), to.clone()));
            c.temp = temp_beside(&to, step);
            c.target = to;
            c.ours = None;
        }
        if let Some((path, copy)) = late {
            self.late_conflict(&path, Some(copy));
        }
        let temp = self.copy_mut()?.temp.clone();
        self.stat(temp, Purpose::Temp);
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
        let c = self.copy_mut()?;
        c.any |= !ops.is_empty();
        c.pending.extend(ops);
        c.last = last;
        self.wait = Wait::None;
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
        if c.ours == Some(EntryKind::Dir) {
            return Err(self.fail("their entry is not a directory, ours is: not replaced"));
        }
        c.phase = Phase::Placing;
        let op = Op::Rename {
            from: c.temp.clone(),
            to: c.target.clone(),
            flags: 0,
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
        match (r, tolerate) {
            (Applied::Ok, _) | (Applied::NotFound, Tolerate::NotFound) => {}
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

/// The temporary name a copy is made under: beside `target`, unique per step.
fn temp_beside(target: &RelPath, step: usize) -> RelPath {
    let name = format!(".mirrorfs-reint-copy-{step}");
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

/// A test driver: carries a plan out on a simulated tree, their site answering from a snapshot
/// of theirs, as the primary's link does against a daemon. The crate's planner tests use it.
#[cfg(test)]
pub(crate) mod drive {
    use super::*;
    use crate::sim::{SimTree, Snapshot};
    use crate::tree::{apply_op, Tree, TreeError};

    /// Where a driven run stopped.
    #[derive(Debug)]
    pub struct Stopped {
        pub conflicts: Vec<Conflict>,
        /// Steps done (the cursor a shell would have made durable).
        pub cursor: usize,
        /// It reached `Done`.
        pub done: bool,
    }

    /// The ops their daemon answers a `Fetch` with, from their snapshot.
    pub fn entry_ops(theirs: &Snapshot, their_path: &RelPath, as_path: &RelPath) -> Vec<Op> {
        let Some(e) = theirs.entries.get(their_path) else {
            return Vec::new();
        };
        let path = as_path.clone();
        let (uid, gid) = (e.uid, e.gid);
        let mut ops = match e.kind {
            EntryKind::Dir => vec![Op::Mkdir {
                path: path.clone(),
                mode: e.perm,
                uid,
                gid,
            }],
            EntryKind::File => {
                let mut v = vec![Op::Create {
                    path: path.clone(),
                    mode: e.perm,
                    uid,
                    gid,
                }];
                if !e.content.is_empty() {
                    v.push(Op::Write {
                        path: path.clone(),
                        offset: 0,
                        data: e.content.to_vec(),
                    });
                }
                v
            }
            EntryKind::Symlink => vec![Op::Symlink {
                path: path.clone(),
                target: e.content.to_vec(),
                uid,
                gid,
            }],
            EntryKind::Special => {
                let (fmt, rdev) = e.special.unwrap_or((0o010_000, 0));
                vec![Op::Mknod {
                    path: path.clone(),
                    mode: fmt | e.perm,
                    rdev,
                    uid,
                    gid,
                }]
            }
        };
        for (k, v) in &e.xattrs {
            ops.push(Op::SetXattr {
                path: path.clone(),
                name: k.clone(),
                value: v.clone(),
                flags: 0,
            });
        }
        if e.kind == EntryKind::Dir {
            ops.push(Op::SetMode {
                path: path.clone(),
                mode: e.perm,
            });
        }
        ops
    }

    fn applied(r: Result<(), TreeError>) -> Applied {
        match r {
            Ok(()) => Applied::Ok,
            Err(TreeError::NotFound(_)) => Applied::NotFound,
            Err(TreeError::Exists(_)) => Applied::Exists,
            Err(TreeError::NotEmpty(_)) => Applied::NotEmpty,
            Err(e) => Applied::Failed(e.to_string()),
        }
    }

    /// Runs `plan` on `ours` from step `from` until `Done`, or until `budget` ops were applied
    /// (a crash). `changed` says which of our paths changed after the plan. Each fetch is
    /// answered in two messages when it has more than one op.
    pub fn drive(
        ours: &mut SimTree,
        theirs: &Snapshot,
        plan: &Plan,
        from: usize,
        mut budget: usize,
        changed: &dyn Fn(&RelPath) -> bool,
    ) -> Result<Stopped, String> {
        let mut run = Run::new(plan, from, "conflict-b-19700101-000000");
        let mut out = Stopped {
            conflicts: Vec::new(),
            cursor: from,
            done: false,
        };
        let mut answers: VecDeque<(Vec<Op>, bool)> = VecDeque::new();
        loop {
            match run.next_action().map_err(|e| e.to_string())? {
                Action::Stat(p) => {
                    let kind = ours.kind(&p).map_err(|e| e.to_string())?;
                    let ino = ours.ino(&p).map_err(|e| e.to_string())?.unwrap_or(0);
                    let st = kind.map(|kind| Stat {
                        kind,
                        ino,
                        nlink: 1,
                        changed_since_plan: changed(&p),
                    });
                    run.on_stat(st).map_err(|e| e.to_string())?;
                }
                Action::Apply(op) => {
                    if budget == 0 {
                        return Ok(out);
                    }
                    budget -= 1;
                    let r = applied(apply_op(ours, &op, false));
                    run.on_applied(r).map_err(|e| e.to_string())?;
                }
                Action::Fetch {
                    their_path,
                    as_path,
                } => {
                    let mut ops = entry_ops(theirs, &their_path, &as_path);
                    if ops.len() > 1 {
                        let rest = ops.split_off(1);
                        answers.push_back((ops, false));
                        answers.push_back((rest, true));
                    } else {
                        answers.push_back((ops, true));
                    }
                    let (ops, last) = answers.pop_front().ok_or("no answer")?;
                    run.on_entry(ops, last).map_err(|e| e.to_string())?;
                }
                Action::AwaitEntry => {
                    let (ops, last) = answers.pop_front().ok_or("awaits an answer never asked")?;
                    run.on_entry(ops, last).map_err(|e| e.to_string())?;
                }
                Action::Conflict(c) => out.conflicts.push(c),
                Action::StepDone(i) => out.cursor = i + 1,
                Action::Done => {
                    out.done = true;
                    return Ok(out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::drive::drive;
    use super::*;
    use crate::sim::SimTree;
    use crate::tree::apply_op;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("valid path")
    }

    fn tree(files: &[(&str, &str)]) -> SimTree {
        let mut t = SimTree::reference();
        for (f, data) in files {
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
        let mut run = Run::new(&plan, 0, "conflict-b-19700101-000000");
        assert!(run.on_applied(Applied::Ok).is_err());
        assert!(run.on_entry(Vec::new(), true).is_err());
        assert_eq!(run.next_action(), Ok(Action::Stat(p("x"))));
        assert!(
            run.next_action().is_err(),
            "next_action() before the Stat is answered"
        );
    }
}
