//! Reintegration planner: what our site does to take in the changes another site made after the
//! common point of their generation histories (see `history::compare`), without losing any of
//! them. Sans-IO: it reads records and answers with a [`Plan`]; a shell carries the plan out.
//!
//! **Driven by:** the primary's link when a diverged mirror is reintegrated into it (`net::remote`),
//! through [`run::Run`], which carries a plan out; the tests here drive the same `Run`.
//!
//! # Input
//!
//! `ours` are the records our site (the one that stays writable) holds after the common point,
//! `theirs` the records of the site being reintegrated, each in seq order. An aborted record and
//! its `Abort` are ignored. `Sync`/`SyncDone` records are ignored: a `Sync` carries part of an
//! initial copy of one mirror, state the site whose journal holds it already had, so it changes
//! nothing on that site (treating it as content would mark every file of a resync as changed and
//! raise false conflicts). `SetTimes` alone does not make an object changed: every namespace change
//! is followed by a `SetTimes` of the entry and of its parent directory, so counting them would
//! make every directory both sides created a file in a conflict; times travel with the content
//! when an object is copied.
//!
//! # Objects
//!
//! Each side's records are folded into objects (`Side`): an object is either a **base object**,
//! named by the path it had at the common point, or a **new object** that side created. A path an
//! op names is resolved through that side's earlier renames with a path-rename map (the current
//! name of every object the side touched, rebased when a directory above it moves, as
//! `track::NameTracker` does for inodes): the nearest ancestor that has a current name gives the
//! base path by rebasing, so a file written under a renamed directory is the same object as the
//! one the other side modified at its old name. A map is enough, no inode numbers are needed,
//! because every record took effect on its site: an op can only name what existed then.
//!
//! Net effect per object and side: unchanged, modified (data or attributes: `Write`, `Truncate`,
//! `Fallocate`, `SetMode`, `SetOwner`, `SetXattr`, `RemoveXattr`), created, deleted (`Unlink`,
//! `Rmdir`, or replaced by a rename), renamed (its own rename, `from → to`; also the target of a
//! `RENAME_EXCHANGE`), directory removed. `RENAME_WHITEOUT` is a rename plus a new special file
//! (the whiteout) at the source. A hard link's new name (`Link`) is a new object whose content is
//! copied (link identity is not reintegrated: a copy replaces one name by a new file), but a
//! change through any name of a file marks every name the records linked to it as changed, and a
//! rename between two such names does nothing, as rename(2). Links made before the common point
//! are not known to the records: a change through one of those names marks only that name, and a
//! rename between two of them is read as a move until an op that needs the name it left (a
//! write, an unlink, a rename from it, not a create or a rename onto it) shows that the name is
//! still there: the rename did nothing, and from then on the two names are one file.
//!
//! # Rules
//!
//! Changes to different objects merge. The same object changed on both sides is a conflict with
//! both versions kept: ours at its path, theirs copied next to it as
//! `NAME.conflict-SITE-YYYYMMDD-HHMMSS` (a counter `-N` is added while the name is taken in either
//! side's view: any name either side's records mention, any name the plan places, or any name the
//! caller's `is_taken` reports). Nothing the other side changed is ever deleted: delete against
//! modify keeps (or restores) the modified version and records a conflict.
//!
//! | ours \ theirs (name `X`) | unchanged | modified | deleted | renamed `X→Y` |
//! |---|---|---|---|---|
//! | **unchanged** | nothing | copy theirs to `X` | remove `X` | rename `X→Y` |
//! | **modified** | nothing | conflict copy of theirs | keep ours; conflict (modify/delete) | rename `X→Y`, our content |
//! | **deleted** | nothing | restore theirs at `X`; conflict (delete/modify) | nothing | restore theirs at `Y`; conflict (delete/rename) |
//! | **renamed `X→Z`** | nothing | copy theirs to `Z` | keep `Z`; conflict (rename/delete) | keep `Z`; conflict (rename/rename), unless `Y = Z` |
//!
//! | name `X` absent at the common point | theirs unchanged | theirs created `X` |
//! |---|---|---|
//! | **ours unchanged** | nothing | copy theirs to `X` (a directory: mkdir) |
//! | **ours created `X`** | nothing | conflict copy of theirs (both directories: merged, no conflict) |
//!
//! | directory `D` (holding `D/e` at the common point) | theirs unchanged | theirs filled `D` (created `D/n`) | theirs removed `D` (and `D/e`) | theirs renamed `D→E` |
//! |---|---|---|---|---|
//! | **ours unchanged** | nothing | copy `D/n` | remove `D/e`, `D` | rename `D→E` |
//! | **ours filled `D`** (created `D/m`) | nothing | both kept | remove `D/e`; `D` kept; conflict (removed/filled) | rename `D→E` (holds `D/m`) |
//! | **ours removed `D`** | nothing | mkdir `D`, copy `D/n`; conflict (removed/filled) | nothing | mkdir `E`; conflict (delete/rename) |
//! | **ours renamed `D→F`** | nothing | copy `D/n` to `F/n` | remove `F/e`; keep `F`; conflict (rename/delete) | keep `F`; conflict (rename/rename) |
//!
//! Attribute changes to one directory on both sides are listed (reason `DirAttributes`) and ours
//! are kept; a directory is never copied as a conflict copy. Their rename onto a name our side
//! changed or created is not applied: the object stays where it was, the conflict is listed
//! (`NameTaken`; if its old directory is gone too, it gets a conflict name beside the new one);
//! so is a rename that our renames would turn into moving a directory into itself
//! (`RenameCycle`; if its old place is inside it too, or gone, it goes to the root under a
//! conflict name, listed as the conflict's path with no copy). Their changes under a directory our side renamed follow it (their `D/e`
//! lands in our `F/e`), and ours under a directory their side renamed follow theirs.
//!
//! # Output
//!
//! A [`Plan`]: [`Step`]s for our site, in order, and the [`Conflict`]s to list in
//! `mirrorfs conflicts`. The plan is state-based where data is needed: a `CopyFromTheirs` step
//! names their path, and the shell reads their *current* version from their tree, which does
//! not change while the plan runs. Renames of objects their side moved go through a temporary
//! name at the root (`.mirrorfs-reint-N`) so that cycles (`a→t, b→a, t→b`) never replace one
//! of their own sources. Steps come in three phases: moves to temporary names, removals (deepest
//! first), then placements in the order of their final paths (parents before children), the
//! moved objects first so that none of them finds its old name taken if it has to go back.
//!
//! Every step is idempotent against its own effect (a rename whose source is gone, a removal of
//! something absent, a copy or mkdir done again): a shell that records the index of the last
//! completed step durably and, after a crash, re-runs from the step in doubt reaches the same
//! tree. Running a whole plan a second time is not idempotent (a temporary rename would take
//! the object the plan placed at a vacated name) and is not needed with that cursor.
//!
//! # Bounds
//!
//! Memory is linear in the records given: each record adds at most two objects (a rename that
//! replaces its target and leaves a whiteout) and at most as many names; the plan has at most a
//! few steps per object, and the planner's maps hold at most one entry per object or step.
//! Time is O(n·(d + m)) for n objects, path depth d and m renames in the plan (each lookup
//! replays the plan's renames). Paths the planner emits are [`RelPath`]s built by `join` and
//! `rebase` of validated paths; a conflict or temporary name too long for a component is
//! shortened, and a plan with a rebased path longer than `PATH_BYTES_MAX` is refused
//! ([`PlanError::PathTooLong`]) rather than emitted.

pub mod run;
pub mod saved;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::op::{rename_flags, Op, Record};
use crate::path::{RelPath, NAME_BYTES_MAX};

/// `RENAME_WHITEOUT` of renameat2(2).
const RENAME_WHITEOUT: u32 = 4;
/// How many counters a conflict or temporary name tries before the planner gives up.
const NAME_TRIES: u32 = 10_000;

/// One step for our site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Move the entry at `from` (with everything below it) to `to`, replacing a file there;
    /// nothing to do when `from` is absent (done before a crash).
    Rename { from: RelPath, to: RelPath },
    /// Remove the entry at `our_path` (a directory only if it is empty); nothing to do if absent.
    Remove { our_path: RelPath },
    /// Make `our_path` a directory with the attributes of their directory `their_path` (not its
    /// entries); an existing directory only gets the attributes.
    Mkdir {
        their_path: RelPath,
        our_path: RelPath,
    },
    /// Replace what is at `our_path` by a copy of their current entry at `their_path`: data (or
    /// symlink target, device), mode, owner, times, xattrs. For a directory: attributes only.
    CopyFromTheirs {
        their_path: RelPath,
        our_path: RelPath,
    },
    /// Keep their version of `path` as the new name `copy` (a copy of their entry at
    /// `their_path`, as `CopyFromTheirs`; a directory gets their attributes, and their entries
    /// below it come as their own steps), beside our version at `path`.
    ConflictCopy {
        their_path: RelPath,
        path: RelPath,
        copy: RelPath,
        reason: Reason,
    },
}

/// Why both versions of something were kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Both sides changed the object.
    BothModified,
    /// Both sides created the name (not both directories).
    BothCreated,
    /// We changed (or renamed) it, they deleted it: ours kept.
    TheyDeleted,
    /// We deleted it, they changed (or renamed) it: theirs restored.
    WeDeleted,
    /// Both renamed it to different names: ours kept, their name not applied.
    BothRenamed,
    /// A directory one side removed was filled on the other: it is kept with the new entries.
    DirRemovedFilled,
    /// Both changed a directory's attributes: ours kept.
    DirAttributes,
    /// Their object's new name was taken on our side by something else: their rename is not
    /// applied (or their restored object is kept under a conflict name).
    NameTaken,
    /// Their rename would move a directory into itself (after our renames): not applied.
    RenameCycle,
    /// Our side changed the target after the plan was made (while it ran): ours kept, theirs
    /// placed beside it (see [`run`]).
    ChangedDuringReintegration,
}

/// A conflict for `mirrorfs conflicts`: our version at `path`; theirs at `copy` if it was copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub path: RelPath,
    pub copy: Option<RelPath>,
    pub reason: Reason,
}

/// What reintegration does on our site.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub conflicts: Vec<Conflict>,
}

/// The planner could not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    #[error("{0}: no free name for a conflict copy or a temporary name")]
    NoFreeName(String),
    #[error("{0}: a path in the plan would be longer than the limit")]
    PathTooLong(String),
}

/// What the planner is given.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Our records after the common point (we stay writable).
    pub ours: &'a [Record],
    /// Their records after the common point (they are reintegrated into us).
    pub theirs: &'a [Record],
    /// Their site's name, for conflict names (bytes other than `[A-Za-z0-9._-]` become `_`).
    pub their_site: &'a str,
    /// Seconds since the Unix epoch, for conflict names.
    pub time: i64,
}

/// The net effect of one side on one object since the common point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetChange {
    Modified {
        path: RelPath,
    },
    Created {
        path: RelPath,
    },
    Deleted {
        path: RelPath,
    },
    DirRemoved {
        path: RelPath,
    },
    Renamed {
        from: RelPath,
        to: RelPath,
        modified: bool,
    },
}

/// One object as one side left it.
#[derive(Debug, Clone, Default)]
struct Obj {
    /// The path at the common point; `None` for an object this side created.
    base: Option<RelPath>,
    /// The current path; `None` once deleted.
    now: Option<RelPath>,
    /// Data or attributes changed.
    changed: bool,
    /// Renamed by its own rename (not only by a directory above it).
    moved: bool,
    dir: bool,
    removed_dir: bool,
    /// Made up for a rename target nothing had touched: the base object there, if there was one.
    phantom: bool,
}

/// One side's records folded into objects.
#[derive(Debug, Default)]
struct Side {
    objs: Vec<Obj>,
    by_base: HashMap<RelPath, usize>,
    /// Current name → object, for every object touched that still exists.
    names: BTreeMap<RelPath, usize>,
    /// Hard-link groups: object → the objects that are names of the same file (each member
    /// maps to the shared list's key, the first member).
    link_group: HashMap<usize, usize>,
    links: HashMap<usize, Vec<usize>>,
    /// A name a file left by its own rename, while nothing else has been put there (or at a
    /// directory above it): the rename that left it, in case a later op names it again.
    vacated: BTreeMap<RelPath, Vacated>,
}

/// A file's rename `from → to` as the fold applied it. If a later op names `from` again, the
/// rename did nothing: `from` and `to` were two names of one file (linked before the common
/// point, so the records do not know it), as rename(2) leaves them.
#[derive(Debug, Clone)]
struct Vacated {
    /// The file the rename moved.
    obj: usize,
    to: RelPath,
    /// What the fold took `to` to be, replaced by the rename: the file's other name.
    replaced: usize,
    /// The file's `moved` and the other name's `phantom` before the rename.
    was_moved: bool,
    was_phantom: bool,
}

impl Side {
    fn fold(records: &[Record]) -> Side {
        let aborted: HashSet<u64> = records
            .iter()
            .filter_map(|r| match r.op {
                Op::Abort { seq } => Some(seq),
                _ => None,
            })
            .collect();
        let mut side = Side::default();
        for r in records.iter().filter(|r| !aborted.contains(&r.seq)) {
            side.observe(&r.op);
        }
        side
    }

    fn observe(&mut self, op: &Op) {
        match op {
            Op::Create { path, .. } | Op::Mknod { path, .. } | Op::Symlink { path, .. } => {
                self.create(path, false);
            }
            Op::Mkdir { path, .. } => self.create(path, true),
            Op::Link { from, to } => {
                let a = self.resolve(from);
                self.create(to, false);
                let b = self.objs.len() - 1;
                self.join(a, b);
            }
            Op::Unlink { path, .. } => self.delete(path, false),
            Op::Rmdir { path } => self.delete(path, true),
            Op::Rename {
                from, to, flags, ..
            } => self.rename(from, to, *flags),
            Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::Fallocate { path, .. }
            | Op::SetMode { path, .. }
            | Op::SetOwner { path, .. }
            | Op::SetXattr { path, .. }
            | Op::RemoveXattr { path, .. } => {
                let i = self.resolve(path);
                self.changed(i);
            }
            Op::SetTimes { .. }
            | Op::Abort { .. }
            | Op::Sync { .. }
            | Op::SyncDone { .. }
            | Op::GroupBegin
            | Op::GroupEnd => {}
        }
    }

    /// `i` changed, and so did every other name of the same file.
    fn changed(&mut self, i: usize) {
        self.objs[i].changed = true;
        let group = self.link_group.get(&i).and_then(|g| self.links.get(g));
        for &j in group.into_iter().flatten() {
            self.objs[j].changed = true;
        }
    }

    /// `a` and `b` are names of one file (their link groups become one).
    fn join(&mut self, a: usize, b: usize) {
        let g = *self.link_group.entry(a).or_insert(a);
        let joining = match self.link_group.get(&b) {
            Some(&h) if h == g => return,
            Some(&h) => self.links.remove(&h).unwrap_or_else(|| vec![b]),
            None => vec![b],
        };
        let list = self.links.entry(g).or_insert_with(|| vec![a]);
        list.extend(joining.iter().copied());
        for m in joining {
            self.link_group.insert(m, g);
        }
    }

    fn same_file(&self, a: usize, b: usize) -> bool {
        a == b
            || self
                .link_group
                .get(&a)
                .is_some_and(|g| self.link_group.get(&b) == Some(g))
    }

    fn push(&mut self, obj: Obj) -> usize {
        self.objs.push(obj);
        self.objs.len() - 1
    }

    /// The object `p` names now, made explicit (given a current name) if it was not.
    fn resolve(&mut self, p: &RelPath) -> usize {
        self.resolve_name(p, true)
    }

    /// [`Side::resolve`]; `existing`: the op needs `p` to exist (it failed otherwise, and
    /// aborted ops are not folded), so a name a rename left is evidence that the rename did
    /// nothing. Not so a rename's target, which may be absent.
    fn resolve_name(&mut self, p: &RelPath, existing: bool) -> usize {
        if let Some(&i) = self.names.get(p) {
            return i;
        }
        if let Some(i) = existing.then(|| self.undo_no_op_rename(p)).flatten() {
            return i;
        }
        let i = match self.base_of(p) {
            Some(b) => match self.by_base.get(&b) {
                // The base object of that name was moved or removed before: `p` names
                // something that did not exist at the common point (a rename's target).
                Some(_) => self.push(Obj::default()),
                None => {
                    let i = self.push(Obj {
                        base: Some(b.clone()),
                        dir: b.is_root(),
                        ..Obj::default()
                    });
                    self.by_base.insert(b, i);
                    i
                }
            },
            // Below a directory this side created: a rename's target, or an op it did not
            // journal.
            None => self.push(Obj::default()),
        };
        self.objs[i].now = Some(p.clone());
        self.names.insert(p.clone(), i);
        i
    }

    /// `p` is named again after a file's rename left it: that rename did nothing (two names of
    /// one file). The file is back at `p`, its other name back at the rename's target, and both
    /// are one file from now on (a change through either marks both). `None` if `p` was not
    /// left by a rename, or what the rename did was changed since (then nothing is undone).
    fn undo_no_op_rename(&mut self, p: &RelPath) -> Option<usize> {
        let v = self.vacated.remove(p)?;
        let intact = self.objs[v.obj].now.as_ref() == Some(&v.to)
            && self.names.get(&v.to) == Some(&v.obj)
            && self.objs[v.replaced].now.is_none();
        if !intact {
            return None;
        }
        let (file, other) = (v.obj, v.replaced);
        self.objs[file].now = Some(p.clone());
        self.objs[file].moved = v.was_moved;
        self.names.insert(p.clone(), file);
        self.objs[other].now = Some(v.to.clone());
        self.objs[other].phantom = v.was_phantom;
        self.names.insert(v.to, other);
        self.join(file, other);
        for i in [file, other] {
            if self.objs[i].changed {
                self.changed(i);
            }
        }
        Some(file)
    }

    /// The common-point path of what `p` names now, through the nearest named ancestor.
    fn base_of(&mut self, p: &RelPath) -> Option<RelPath> {
        let mut up = p.parent();
        while let Some(a) = up {
            if let Some(&i) = self.names.get(&a) {
                self.objs[i].dir = true;
                let b = self.objs[i].base.clone()?;
                return p.rebase(&a, &b);
            }
            up = a.parent();
        }
        Some(p.clone())
    }

    fn create(&mut self, p: &RelPath, dir: bool) {
        for (_, i) in self.take_tree(p) {
            self.objs[i].now = None;
        }
        let i = self.push(Obj {
            now: Some(p.clone()),
            changed: true,
            dir,
            ..Obj::default()
        });
        self.names.insert(p.clone(), i);
    }

    fn delete(&mut self, p: &RelPath, dir: bool) {
        let i = self.resolve(p);
        for (_, j) in self.take_tree(p) {
            self.objs[j].now = None;
        }
        let o = &mut self.objs[i];
        o.dir |= dir;
        o.removed_dir = dir;
    }

    fn rename(&mut self, from: &RelPath, to: &RelPath, flags: u32) {
        if from == to || to.starts_with(from) || from.is_root() || to.is_root() {
            return;
        }
        let a = self.resolve(from);
        // Whatever `to` names is replaced (it did not exist if the base object is made up).
        let fresh = !self.names.contains_key(to);
        let exchange = flags & rename_flags::EXCHANGE != 0;
        let r = self.resolve_name(to, exchange);
        if self.same_file(a, r) {
            return; // two names of one file (a hard link): rename(2) does nothing
        }
        if exchange {
            let ta = self.take_tree(from);
            let tb = self.take_tree(to);
            self.put_rebased(ta, from, to);
            self.put_rebased(tb, to, from);
            self.objs[r].moved = true;
        } else {
            let vacated = Vacated {
                obj: a,
                to: to.clone(),
                replaced: r,
                was_moved: self.objs[a].moved,
                was_phantom: self.objs[r].phantom,
            };
            self.objs[r].phantom = fresh && !self.objs[r].changed && !self.objs[r].moved;
            for (_, j) in self.take_tree(to) {
                self.objs[j].now = None;
            }
            let moved = self.take_tree(from);
            // Only a file can have two names (a directory known as one always moves).
            let file = moved.len() == 1 && !self.objs[a].dir;
            self.put_rebased(moved, from, to);
            if file && flags & RENAME_WHITEOUT == 0 {
                self.vacated.insert(from.clone(), vacated);
            }
        }
        self.objs[a].moved = true;
        if flags & RENAME_WHITEOUT != 0 {
            self.create(from, false);
        }
    }

    /// Takes `p` and every name below it out of `names` (something else goes there, or they
    /// go away: a name left by a rename below it is no longer that rename's to undo).
    fn take_tree(&mut self, p: &RelPath) -> Vec<(RelPath, usize)> {
        take_tree(&mut self.vacated, p);
        take_tree(&mut self.names, p)
    }

    fn put_rebased(&mut self, taken: Vec<(RelPath, usize)>, from: &RelPath, to: &RelPath) {
        for (old, i) in taken {
            let new = old.rebase(from, to);
            if let Some(n) = &new {
                if let Some(j) = self.names.insert(n.clone(), i) {
                    self.objs[j].now = None;
                }
            }
            self.objs[i].now = new;
        }
    }

    fn base_obj(&self, b: &RelPath) -> Option<&Obj> {
        self.by_base.get(b).map(|&i| &self.objs[i])
    }
}

/// Takes `p` and every name below it out of `map`.
fn take_tree<V>(map: &mut BTreeMap<RelPath, V>, p: &RelPath) -> Vec<(RelPath, V)> {
    let below: Vec<RelPath> = map
        .range(p.clone()..)
        .take_while(|(k, _)| k.as_bytes().starts_with(p.as_bytes()))
        .filter(|(k, _)| k.starts_with(p))
        .map(|(k, _)| k.clone())
        .collect();
    below
        .into_iter()
        .filter_map(|k| map.remove(&k).map(|v| (k, v)))
        .collect()
}

/// True when `map` has a name strictly below `p`.
fn has_below<V>(map: &BTreeMap<RelPath, V>, p: &RelPath) -> bool {
    map.range(p.clone()..)
        .take_while(|(k, _)| k.as_bytes().starts_with(p.as_bytes()))
        .any(|(k, _)| k != p && k.starts_with(p))
}

/// What our side has at a name, as far as the records and the plan so far tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// An object our records touched (index into our side's objects).
    Ours(usize),
    /// Something the plan put there.
    Placed { dir: bool },
}

/// The net effect of `records` per object (what `mirrorfs conflicts` and logs can show). A base
/// object a rename replaced is not listed unless the records named it before (they cannot tell
/// whether anything was there); the planner treats it as deleted.
pub fn net_changes(records: &[Record]) -> Vec<NetChange> {
    let side = Side::fold(records);
    let mut out: Vec<NetChange> = side.objs.iter().filter_map(net_change).collect();
    out.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    out
}

fn net_change(o: &Obj) -> Option<NetChange> {
    match (&o.base, &o.now) {
        (None, Some(p)) => Some(NetChange::Created { path: p.clone() }),
        (None, None) => None,
        (Some(_), None) if o.phantom => None,
        (Some(b), None) if o.removed_dir => Some(NetChange::DirRemoved { path: b.clone() }),
        (Some(b), None) => Some(NetChange::Deleted { path: b.clone() }),
        (Some(b), Some(p)) if b != p => Some(NetChange::Renamed {
            from: b.clone(),
            to: p.clone(),
            modified: o.changed,
        }),
        (Some(b), Some(_)) if o.changed => Some(NetChange::Modified { path: b.clone() }),
        (Some(_), Some(_)) => None,
    }
}

/// Plans the reintegration of their changes into our site. `is_taken` answers whether a name
/// exists in either site's tree (the shell looks; the planner also knows every name the records
/// mention); it is asked only for candidate conflict and temporary names.
pub fn plan(
    input: &Input<'_>,
    is_taken: &mut dyn FnMut(&RelPath) -> bool,
) -> Result<Plan, PlanError> {
    let ours = Side::fold(input.ours);
    let mut m = Merge {
        view: ours
            .names
            .iter()
            .map(|(k, &i)| (k.clone(), Slot::Ours(i)))
            .collect(),
        ours,
        theirs: Side::fold(input.theirs),
        stashed: BTreeMap::new(),
        recreated: BTreeMap::new(),
        moves: Vec::new(),
        conflict_moves: Vec::new(),
        removed: BTreeSet::new(),
        new_at: HashMap::new(),
        placed: BTreeSet::new(),
        label: conflict_label(input.their_site, input.time),
        is_taken,
        plan: Plan::default(),
    };
    m.stash_phase()?;
    m.remove_phase();
    m.place_phase()?;
    m.list_where_left();
    check_paths(&m.plan)?;
    Ok(m.plan)
}

/// Every path in the plan is a valid [`RelPath`] (`rebase` does not check the length).
fn check_paths(plan: &Plan) -> Result<(), PlanError> {
    let step_paths = plan.steps.iter().flat_map(|s| match s {
        Step::Rename { from, to } => vec![from, to],
        Step::Remove { our_path } => vec![our_path],
        Step::Mkdir {
            their_path,
            our_path,
        }
        | Step::CopyFromTheirs {
            their_path,
            our_path,
        } => vec![their_path, our_path],
        Step::ConflictCopy {
            their_path,
            path,
            copy,
            ..
        } => vec![their_path, path, copy],
    });
    let conflict_paths = plan
        .conflicts
        .iter()
        .flat_map(|c| std::iter::once(&c.path).chain(c.copy.as_ref()));
    match step_paths
        .chain(conflict_paths)
        .find(|p| RelPath::new(p.as_bytes()).is_err())
    {
        Some(p) => Err(PlanError::PathTooLong(p.to_string())),
        None => Ok(()),
    }
}

/// `conflict-SITE-YYYYMMDD-HHMMSS`.
/// `conflict-SITE-YYYYMMDD-HHMMSS`: the label of every conflict name a reintegration gives.
pub fn conflict_label(site: &str, time: i64) -> String {
    let site: String = site
        .bytes()
        .take(64)
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => b as char,
            _ => '_',
        })
        .collect();
    let site = if site.is_empty() {
        "remote".to_string()
    } else {
        site
    };
    let (y, mo, d, h, mi, s) = crate::civil::utc_parts(time);
    format!("conflict-{site}-{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
}

/// The merge of both sides into a plan for ours.
struct Merge<'a> {
    ours: Side,
    theirs: Side,
    /// Base path → the temporary name the plan moved that object to, where it was, and how
    /// many of `moves` were made by then.
    stashed: BTreeMap<RelPath, (RelPath, RelPath, usize)>,
    /// Base path → where the plan recreated an object our side deleted.
    recreated: BTreeMap<RelPath, RelPath>,
    /// Every name the plan removes.
    removed: BTreeSet<RelPath>,
    /// Every rename the plan makes on our side, in order.
    moves: Vec<(RelPath, RelPath)>,
    /// For each conflict of the plan, how many of `moves` were made when it was found (the
    /// later ones move it: it is listed where the plan leaves it).
    conflict_moves: Vec<usize>,
    /// Their new object → where the plan put it on our side.
    new_at: HashMap<usize, RelPath>,
    /// Names the plan has given something (kept even if later moved: never reused).
    placed: BTreeSet<RelPath>,
    /// Our namespace as far as known: the names our records touched, moved and filled by the
    /// steps planned so far.
    view: BTreeMap<RelPath, Slot>,
    label: String,
    is_taken: &'a mut dyn FnMut(&RelPath) -> bool,
    plan: Plan,
}

impl Merge<'_> {
    /// Their objects in the order of `key`, filtered.
    fn their_objs(&self, key: impl Fn(&Obj) -> Option<RelPath>) -> Vec<(RelPath, usize)> {
        let mut v: Vec<(RelPath, usize)> = (0..self.theirs.objs.len())
            .filter_map(|i| key(&self.theirs.objs[i]).map(|k| (k, i)))
            .collect();
        v.sort();
        v
    }

    /// Phase 1: objects their side renamed (and we did not) move to temporary names.
    fn stash_phase(&mut self) -> Result<(), PlanError> {
        let moved = self.their_objs(|o| o.now.as_ref().and(o.base.clone()).filter(|_| o.moved));
        for (b, i) in moved {
            let t = &self.theirs.objs[i];
            let dir = t.dir;
            let o = self.ours.base_obj(&b);
            let ours_keeps =
                o.is_some_and(|o| o.now.is_none() || o.moved || (o.changed && t.changed));
            if ours_keeps {
                continue;
            }
            let Some(from) = self.locate(&b) else {
                continue;
            };
            let tmp = self.free_name(&RelPath::root(), b".mirrorfs-reint")?;
            self.rename_step(from.clone(), tmp.clone(), dir);
            self.stashed.insert(b, (tmp, from, self.moves.len()));
        }
        Ok(())
    }

    /// Phase 2: what their side deleted and ours did not change is removed, deepest first.
    fn remove_phase(&mut self) {
        let gone = self.their_objs(|o| o.base.clone().filter(|_| o.now.is_none()));
        for (b, _) in gone.into_iter().rev() {
            let own = self.ours.by_base.get(&b).copied();
            if let Some(o) = own.map(|j| &self.ours.objs[j]) {
                match &o.now {
                    None => continue,
                    Some(here) if o.changed || o.moved => {
                        let here = here.clone();
                        self.conflict(here, None, Reason::TheyDeleted);
                        continue;
                    }
                    Some(_) => {}
                }
            }
            let Some(loc) = self.locate(&b) else { continue };
            if self
                .view
                .get(&loc)
                .is_some_and(|&j| Some(j) != own.map(Slot::Ours))
            {
                continue; // not the base object: it did not exist at the common point
            }
            if has_below(&self.view, &loc) {
                self.conflict(loc, None, Reason::DirRemovedFilled);
                continue;
            }
            self.view.remove(&loc);
            self.removed.insert(loc.clone());
            self.plan.steps.push(Step::Remove { our_path: loc });
        }
    }

    /// Phase 3: their changed, created and renamed objects, parents first.
    /// Stashed objects go first, so that nothing else takes the name one of them goes back to
    /// if its new name is taken; a new directory one of them goes into is placed on demand.
    fn place_phase(&mut self) -> Result<(), PlanError> {
        let live = self.their_objs(|o| o.now.clone().filter(|_| o.changed || o.moved));
        let (first, rest): (Vec<_>, Vec<_>) = live.into_iter().partition(|(_, i)| {
            let o = &self.theirs.objs[*i];
            o.moved
                && o.base
                    .as_ref()
                    .is_some_and(|b| self.stashed.contains_key(b))
        });
        for (q, i) in first.into_iter().chain(rest) {
            match self.theirs.objs[i].base.clone() {
                None if self.new_at.contains_key(&i) => {}
                None => self.place_new(&q, i)?,
                Some(b) => self.place_base(&q, &b, i)?,
            }
        }
        Ok(())
    }

    fn place_new(&mut self, q: &RelPath, i: usize) -> Result<(), PlanError> {
        let dir = self.theirs.objs[i].dir;
        let Some(target) = self.translate(q)? else {
            return Ok(());
        };
        let at = match self.occupant(&target, None) {
            Some(j) if dir && self.is_dir(j) => target, // both made this directory
            Some(_) => {
                let copy = self.conflict_copy(q, &target, Reason::BothCreated)?;
                self.new_at.insert(i, copy);
                return Ok(());
            }
            None if dir => self.mkdir(q, target),
            None => self.copy(q, target),
        };
        self.new_at.insert(i, at);
        Ok(())
    }

    fn place_base(&mut self, q: &RelPath, b: &RelPath, i: usize) -> Result<(), PlanError> {
        let t = self.theirs.objs[i].clone();
        let o = self.ours.base_obj(b).cloned().unwrap_or_default();
        let ours_touched = self.ours.by_base.contains_key(b);
        if ours_touched && o.now.is_none() {
            return self.restore(q, b, t.dir);
        }
        if let Some((tmp, was, n)) = self.stashed.get(b).cloned().filter(|_| t.moved) {
            // Where it was, moved by the plan's renames made since.
            let was = self
                .moves
                .iter()
                .skip(n)
                .fold(was, |p, (f, to)| p.rebase(f, to).unwrap_or(p));
            return self.unstash(q, b, (tmp, was), &t);
        }
        let Some(loc) = self.locate(b) else {
            return Ok(());
        };
        if t.moved && o.moved && q != &loc {
            self.conflict(loc.clone(), None, Reason::BothRenamed);
        }
        match (t.changed, o.changed, t.dir || o.dir) {
            (false, _, _) => {}
            (true, false, _) => {
                self.copy(q, loc);
            }
            (true, true, true) => self.conflict(loc, None, Reason::DirAttributes),
            (true, true, false) => {
                self.conflict_copy(q, &loc, Reason::BothModified)?;
            }
        }
        Ok(())
    }

    /// Their object that we deleted comes back at its name (translated), a conflict.
    fn restore(&mut self, q: &RelPath, b: &RelPath, dir: bool) -> Result<(), PlanError> {
        let Some(target) = self.translate(q)? else {
            return Ok(());
        };
        if self.occupant(&target, None).is_some() {
            self.conflict_copy(q, &target, Reason::NameTaken)?;
            return Ok(());
        }
        let at = if dir {
            self.mkdir(q, target)
        } else {
            self.copy(q, target)
        };
        self.recreated.insert(b.clone(), at.clone());
        self.conflict(at, None, Reason::WeDeleted);
        Ok(())
    }

    /// A stashed object goes to its new name (or a conflict name), with their data if changed.
    fn unstash(
        &mut self,
        q: &RelPath,
        b: &RelPath,
        (tmp, was): (RelPath, RelPath),
        t: &Obj,
    ) -> Result<(), PlanError> {
        let Some(mut target) = self.translate(q)? else {
            return Ok(());
        };
        let own = self.ours.by_base.get(b).copied().map(Slot::Ours);
        // Their rename is not applied (the object goes back) when our renames put its new
        // parent inside it, or our side has something else at its new name.
        let blocked = if target.starts_with(&tmp) {
            Some(Reason::RenameCycle)
        } else {
            self.occupant(&target, own).map(|_| Reason::NameTaken)
        };
        let parent_removed = was
            .parent()
            .is_some_and(|d| self.removed.iter().any(|r| d.starts_with(r)));
        // Its old place can take it back unless that directory is gone or lies inside it too.
        let no_way_back = parent_removed || was.starts_with(&tmp);
        match blocked {
            Some(reason) if !no_way_back => {
                self.conflict(was.clone(), None, reason);
                target = was;
            }
            // Beside its new name is inside it too: at the root under a conflict name, listed
            // as where it is (nothing was copied).
            Some(Reason::RenameCycle) => {
                let name = target.file_name().unwrap_or(b"entry").to_vec();
                let at_root = RelPath::root().join(&name).map_err(|_| {
                    PlanError::PathTooLong(String::from_utf8_lossy(&name).into_owned())
                })?;
                let copy = self.conflict_name(&at_root)?;
                self.conflict(copy.clone(), None, Reason::RenameCycle);
                target = copy;
            }
            // Its old directory is gone too: it gets a conflict name beside its new name.
            Some(_) | None => {}
        }
        if self.occupant(&target, own).is_some() {
            let copy = self.conflict_name(&target)?;
            self.conflict(target, Some(copy.clone()), Reason::NameTaken);
            target = copy;
        }
        self.rename_step(tmp, target.clone(), t.dir);
        if t.changed && !self.ours.base_obj(b).is_some_and(|o| o.changed) {
            self.copy(q, target);
        }
        Ok(())
    }

    /// Moves `from` to `to` (in our view too: the name is taken from now on).
    fn rename_step(&mut self, from: RelPath, to: RelPath, dir: bool) {
        let moved = take_tree(&mut self.view, &from);
        take_tree(&mut self.view, &to);
        for (k, v) in moved {
            if let Some(n) = k.rebase(&from, &to) {
                self.view.insert(n, v);
            }
        }
        self.view.entry(to.clone()).or_insert(Slot::Placed { dir });
        self.placed.insert(to.clone());
        self.moves.push((from.clone(), to.clone()));
        self.plan.steps.push(Step::Rename { from, to });
    }

    fn is_dir(&self, slot: Slot) -> bool {
        match slot {
            Slot::Ours(j) => self.ours.objs.get(j).is_some_and(|o| o.dir),
            Slot::Placed { dir } => dir,
        }
    }

    /// Whether their entries of a directory our side removed may go into the directory now at
    /// its name: one the plan placed or our side made, whose entries our view holds. Not a base
    /// directory our side moved there (replacing the removed one): the records do not list its
    /// entries, so one of theirs could land on one of them unseen.
    fn merges_into(&self, slot: Slot) -> bool {
        match slot {
            Slot::Ours(j) => self
                .ours
                .objs
                .get(j)
                .is_some_and(|o| o.dir && o.base.is_none()),
            Slot::Placed { dir } => dir,
        }
    }

    fn mkdir(&mut self, q: &RelPath, at: RelPath) -> RelPath {
        self.placed.insert(at.clone());
        self.view.insert(at.clone(), Slot::Placed { dir: true });
        self.plan.steps.push(Step::Mkdir {
            their_path: q.clone(),
            our_path: at.clone(),
        });
        at
    }

    fn copy(&mut self, q: &RelPath, at: RelPath) -> RelPath {
        self.placed.insert(at.clone());
        let dir = self.theirs_dir_at(q);
        self.view.insert(at.clone(), Slot::Placed { dir });
        self.plan.steps.push(Step::CopyFromTheirs {
            their_path: q.clone(),
            our_path: at.clone(),
        });
        at
    }

    fn conflict(&mut self, path: RelPath, copy: Option<RelPath>, reason: Reason) {
        self.plan.conflicts.push(Conflict { path, copy, reason });
        self.conflict_moves.push(self.moves.len());
    }

    /// Each conflict's names moved by the plan's renames made after it was found (one found
    /// inside a parked directory is listed where that directory ends).
    fn list_where_left(&mut self) {
        let moves = &self.moves;
        let after = |p: &RelPath, n: usize| {
            moves[n.min(moves.len())..]
                .iter()
                .fold(p.clone(), |p, (f, t)| p.rebase(f, t).unwrap_or(p))
        };
        for (c, &n) in self.plan.conflicts.iter_mut().zip(&self.conflict_moves) {
            c.path = after(&c.path, n);
            c.copy = c.copy.as_ref().map(|p| after(p, n));
        }
    }

    /// Their `q` kept beside our `path` under a fresh conflict name.
    fn conflict_copy(
        &mut self,
        q: &RelPath,
        path: &RelPath,
        reason: Reason,
    ) -> Result<RelPath, PlanError> {
        let copy = self.conflict_name(path)?;
        self.placed.insert(copy.clone());
        let dir = self.theirs_dir_at(q);
        self.view.insert(copy.clone(), Slot::Placed { dir });
        self.plan.steps.push(Step::ConflictCopy {
            their_path: q.clone(),
            path: path.clone(),
            copy: copy.clone(),
            reason,
        });
        self.conflict(path.clone(), Some(copy.clone()), reason);
        Ok(copy)
    }

    fn conflict_name(&mut self, path: &RelPath) -> Result<RelPath, PlanError> {
        let parent = path.parent().unwrap_or_default();
        let mut name = path.file_name().unwrap_or(b"root").to_vec();
        name.push(b'.');
        name.extend_from_slice(self.label.as_bytes());
        self.free_name(&parent, &name)
    }

    /// `dir/stem`, or `dir/stem-N`, not taken in either view nor by the plan.
    fn free_name(&mut self, dir: &RelPath, stem: &[u8]) -> Result<RelPath, PlanError> {
        for n in 0..NAME_TRIES {
            let suffix = if n == 0 {
                String::new()
            } else {
                format!("-{n}")
            };
            let keep = NAME_BYTES_MAX.saturating_sub(suffix.len()).min(stem.len());
            let mut name = stem[..keep].to_vec();
            name.extend_from_slice(suffix.as_bytes());
            let Ok(p) = dir.join(&name) else { continue };
            if !self.known(&p) && !(self.is_taken)(&p) {
                return Ok(p);
            }
        }
        Err(PlanError::NoFreeName(dir.to_string()))
    }

    fn known(&self, p: &RelPath) -> bool {
        self.placed.contains(p)
            || self.ours.names.contains_key(p)
            || self.theirs.names.contains_key(p)
            || self.ours.by_base.contains_key(p)
            || self.theirs.by_base.contains_key(p)
    }

    /// What our side has at `p` that our records or the plan put there, unless it is `except`;
    /// a directory our side filled counts too.
    fn occupant(&self, p: &RelPath, except: Option<Slot>) -> Option<Slot> {
        match self.view.get(p).copied().filter(|&j| Some(j) != except) {
            Some(j) => Some(j),
            None if has_below(&self.view, p) => Some(Slot::Placed { dir: true }),
            None => None,
        }
    }

    /// Whether their entry at `q` is a directory (as far as their records tell).
    fn theirs_dir_at(&self, q: &RelPath) -> bool {
        self.theirs
            .names
            .get(q)
            .is_some_and(|&i| self.theirs.objs[i].dir)
    }

    /// Where the base object `b` is on our side now (after the steps planned so far): where
    /// our records left it, moved by the plan's renames, or where the plan recreated it.
    fn locate(&self, b: &RelPath) -> Option<RelPath> {
        let mut up = Some(b.clone());
        while let Some(a) = up {
            if let Some(o) = self.ours.base_obj(&a) {
                return match &o.now {
                    Some(n) => b.rebase(&a, n).map(|p| self.through_moves(p)),
                    None => self.recreated_at(b),
                };
            }
            up = a.parent();
        }
        Some(self.through_moves(b.clone()))
    }

    fn through_moves(&self, mut p: RelPath) -> RelPath {
        for (from, to) in &self.moves {
            if let Some(n) = p.rebase(from, to) {
                p = n;
            }
        }
        p
    }

    fn recreated_at(&self, b: &RelPath) -> Option<RelPath> {
        let mut up = Some(b.clone());
        while let Some(a) = up {
            if let Some(to) = self.recreated.get(&a) {
                return b.rebase(&a, to);
            }
            up = a.parent();
        }
        None
    }

    /// Our path for their final path `q`: its parent directory as placed on our side, plus its
    /// name. A parent directory we removed is recreated (a conflict: removed against filled).
    fn translate(&mut self, q: &RelPath) -> Result<Option<RelPath>, PlanError> {
        let (Some(parent), Some(name)) = (q.parent(), q.file_name()) else {
            return Ok(Some(RelPath::root()));
        };
        let Some(dir) = self.their_dir_in_ours(&parent)? else {
            return Ok(None);
        };
        Ok(dir.join(name).ok())
    }

    fn their_dir_in_ours(&mut self, p: &RelPath) -> Result<Option<RelPath>, PlanError> {
        let mut up = Some(p.clone());
        while let Some(a) = up {
            if let Some(&i) = self.theirs.names.get(&a) {
                // What lies between `a` and `p` their side did not move: base objects.
                return match self.theirs.objs[i]
                    .base
                    .as_ref()
                    .and_then(|b| p.rebase(&a, b))
                {
                    Some(b) => self.locate_or_recreate(&b, p),
                    None => {
                        if let (false, Some(q)) = (
                            self.new_at.contains_key(&i),
                            self.theirs.objs[i].now.clone(),
                        ) {
                            self.place_new(&q, i)?;
                        }
                        Ok(self.new_at.get(&i).and_then(|at| p.rebase(&a, at)))
                    }
                };
            }
            up = a.parent();
        }
        self.locate_or_recreate(p, p)
    }

    /// Our path of the base directory `b` (their `q`), recreated if we removed it.
    fn locate_or_recreate(
        &mut self,
        b: &RelPath,
        q: &RelPath,
    ) -> Result<Option<RelPath>, PlanError> {
        if let Some(at) = self.locate(b) {
            return Ok(Some(at));
        }
        let Some(target) = self.translate(q)? else {
            return Ok(None);
        };
        let at = match self.occupant(&target, None) {
            Some(j) if self.merges_into(j) => target,
            Some(_) => {
                let c = self.conflict_name(&target)?;
                self.conflict(target, Some(c.clone()), Reason::DirRemovedFilled);
                self.mkdir(q, c)
            }
            None => {
                self.conflict(target.clone(), None, Reason::DirRemovedFilled);
                self.mkdir(q, target)
            }
        };
        self.recreated.insert(b.clone(), at.clone());
        Ok(Some(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::test_ops::{create, mkdir};
    use crate::op::Timespec;
    use crate::sim::{SimTree, Snapshot};
    use crate::tree::{apply_op, EntryKind};
    use proptest::prelude::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("valid path")
    }

    fn records(ops: Vec<Op>) -> Vec<Record> {
        ops.into_iter()
            .enumerate()
            .map(|(i, op)| Record {
                seq: 100 + i as u64,
                op,
            })
            .collect()
    }

    fn write(s: &str, data: &str) -> Op {
        Op::Write {
            path: p(s),
            offset: 0,
            data: data.as_bytes().to_vec(),
        }
    }
    fn unlink(s: &str) -> Op {
        Op::Unlink {
            path: p(s),
            nlink: 1,
        }
    }
    fn rmdir(s: &str) -> Op {
        Op::Rmdir { path: p(s) }
    }
    fn rename(a: &str, b: &str, flags: u32) -> Op {
        Op::Rename {
            from: p(a),
            to: p(b),
            flags,
            from_ino: 0,
        }
    }

    /// The tree at the common point: `x` ("base-x"), `d/` holding `d/e` ("base-e").
    fn base() -> SimTree {
        let mut t = SimTree::reference();
        for op in [
            create("x"),
            write("x", "base-x"),
            mkdir("d"),
            create("d/e"),
            write("d/e", "base-e"),
        ] {
            apply_op(&mut t, &op, false).expect("base");
        }
        t
    }

    fn side(ops: &[Op]) -> SimTree {
        side_from(base(), ops)
    }

    fn side_from(mut t: SimTree, ops: &[Op]) -> SimTree {
        for op in ops {
            apply_op(&mut t, op, false).unwrap_or_else(|e| panic!("{op:?}: {e}"));
        }
        t
    }

    /// Carries the steps out with the executor the primary runs ([`run::Run`]).
    fn apply_plan(ours: &mut SimTree, theirs: &Snapshot, steps: &[Step]) -> Result<(), String> {
        let plan = Plan {
            steps: steps.to_vec(),
            conflicts: Vec::new(),
        };
        let r = crate::sim::drive(ours, theirs, &plan, 0, usize::MAX, &|_| false)?;
        match r.done {
            true => Ok(()),
            false => Err("the run did not finish".into()),
        }
    }

    const SITE: &str = "b";
    const CONFLICT: &str = ".conflict-b-19700101-000000";

    struct Outcome {
        plan: Plan,
        tree: Snapshot,
    }

    /// Plans and applies with base(); every name either tree has counts as taken.
    fn run(ours_ops: &[Op], theirs_ops: &[Op]) -> Outcome {
        run_with_base(&[], ours_ops, theirs_ops)
    }

    /// [`run`] with `extra` applied to base() first (part of the common point: in no records).
    fn run_with_base(extra: &[Op], ours_ops: &[Op], theirs_ops: &[Op]) -> Outcome {
        let common = side(extra);
        let (mut ours, theirs) = (
            side_from(common.clone(), ours_ops),
            side_from(common, theirs_ops),
        );
        let (o, t) = (records(ours_ops.to_vec()), records(theirs_ops.to_vec()));
        let (so, st) = (ours.snapshot(), theirs.snapshot());
        let mut taken = |q: &RelPath| so.entries.contains_key(q) || st.entries.contains_key(q);
        let input = Input {
            ours: &o,
            theirs: &t,
            their_site: SITE,
            time: 0,
        };
        let plan = plan(&input, &mut taken).expect("plan");
        apply_plan(&mut ours, &st, &plan.steps).unwrap_or_else(|e| panic!("{plan:?}: {e}"));
        Outcome {
            plan,
            tree: ours.snapshot(),
        }
    }

    impl Outcome {
        fn content(&self, s: &str) -> Option<String> {
            let e = self.tree.entries.get(&p(s))?;
            Some(String::from_utf8_lossy(&e.content).into_owned())
        }
        fn has(&self, s: &str, want: &str) -> &Self {
            assert_eq!(
                self.content(s).as_deref(),
                Some(want),
                "{s} in {:?}",
                self.plan
            );
            self
        }
        fn dir(&self, s: &str) -> &Self {
            let k = self.tree.entries.get(&p(s)).map(|e| e.kind);
            assert_eq!(k, Some(EntryKind::Dir), "{s} in {:?}", self.plan);
            self
        }
        fn absent(&self, s: &str) -> &Self {
            assert_eq!(self.content(s), None, "{s} in {:?}", self.plan);
            self
        }
        fn reasons(&self, want: &[Reason]) -> &Self {
            let got: Vec<Reason> = self.plan.conflicts.iter().map(|c| c.reason).collect();
            assert_eq!(got, want, "{:?}", self.plan);
            self
        }
        fn paths(&self) -> usize {
            self.tree.entries.len()
        }
    }

    fn modify(data: &str) -> Vec<Op> {
        vec![
            Op::Truncate {
                path: p("x"),
                size: 0,
            },
            write("x", data),
        ]
    }
    fn delete_x() -> Vec<Op> {
        vec![unlink("x")]
    }
    fn rename_x(to: &str) -> Vec<Op> {
        vec![rename("x", to, 0)]
    }

    // The case table: one test per row (our net effect on `x`), every column (theirs).

    #[test]
    fn row_ours_unchanged() {
        run(&[], &[]).has("x", "base-x").reasons(&[]);
        run(&[], &modify("theirs")).has("x", "theirs").reasons(&[]);
        run(&[], &delete_x()).absent("x").reasons(&[]);
        run(&[], &rename_x("y"))
            .absent("x")
            .has("y", "base-x")
            .reasons(&[]);
    }

    #[test]
    fn row_ours_modified() {
        run(&modify("ours"), &[]).has("x", "ours").reasons(&[]);
        run(&modify("ours"), &modify("theirs"))
            .has("x", "ours")
            .has(&format!("x{CONFLICT}"), "theirs")
            .reasons(&[Reason::BothModified]);
        run(&modify("ours"), &delete_x())
            .has("x", "ours")
            .reasons(&[Reason::TheyDeleted]);
        // Rename on theirs, write on ours: the same object, merged.
        run(&modify("ours"), &rename_x("y"))
            .absent("x")
            .has("y", "ours")
            .reasons(&[]);
    }

    #[test]
    fn row_ours_deleted() {
        run(&delete_x(), &[]).absent("x").reasons(&[]);
        run(&delete_x(), &modify("theirs"))
            .has("x", "theirs")
            .reasons(&[Reason::WeDeleted]);
        run(&delete_x(), &delete_x()).absent("x").reasons(&[]);
        run(&delete_x(), &rename_x("y"))
            .absent("x")
            .has("y", "base-x")
            .reasons(&[Reason::WeDeleted]);
    }

    #[test]
    fn row_ours_renamed() {
        run(&rename_x("z"), &[]).has("z", "base-x").reasons(&[]);
        run(&rename_x("z"), &modify("theirs"))
            .absent("x")
            .has("z", "theirs")
            .reasons(&[]);
        run(&rename_x("z"), &delete_x())
            .has("z", "base-x")
            .reasons(&[Reason::TheyDeleted]);
        run(&rename_x("z"), &rename_x("y"))
            .has("z", "base-x")
            .absent("y")
            .reasons(&[Reason::BothRenamed]);
        run(&rename_x("y"), &rename_x("y"))
            .has("y", "base-x")
            .reasons(&[]);
    }

    fn create_n(data: &str) -> Vec<Op> {
        vec![create("n"), write("n", data)]
    }

    #[test]
    fn row_name_absent_ours_unchanged() {
        run(&[], &create_n("theirs"))
            .has("n", "theirs")
            .reasons(&[]);
        run(&[], &[mkdir("n")]).dir("n").reasons(&[]);
    }

    #[test]
    fn row_name_absent_ours_created() {
        run(&create_n("ours"), &[]).has("n", "ours").reasons(&[]);
        run(&create_n("ours"), &create_n("theirs"))
            .has("n", "ours")
            .has(&format!("n{CONFLICT}"), "theirs")
            .reasons(&[Reason::BothCreated]);
        let both_dirs = [mkdir("n"), create("n/a")];
        let theirs = [mkdir("n"), create("n/b")];
        run(&both_dirs, &theirs)
            .dir("n")
            .has("n/a", "")
            .has("n/b", "")
            .reasons(&[]);
    }

    fn fill(name: &str) -> Vec<Op> {
        vec![create(name), write(name, name)]
    }
    fn remove_d() -> Vec<Op> {
        vec![unlink("d/e"), rmdir("d")]
    }

    #[test]
    fn row_dir_ours_unchanged() {
        run(&[], &fill("d/n"))
            .has("d/n", "d/n")
            .has("d/e", "base-e");
        run(&[], &remove_d()).absent("d/e").absent("d").reasons(&[]);
        run(&[], &[rename("d", "g", 0)])
            .absent("d")
            .has("g/e", "base-e")
            .reasons(&[]);
    }

    #[test]
    fn row_dir_ours_filled() {
        let ours = fill("d/m");
        run(&ours, &fill("d/n"))
            .has("d/m", "d/m")
            .has("d/n", "d/n")
            .reasons(&[]);
        run(&ours, &remove_d())
            .absent("d/e")
            .has("d/m", "d/m")
            .reasons(&[Reason::DirRemovedFilled]);
        run(&ours, &[rename("d", "g", 0)])
            .absent("d")
            .has("g/m", "d/m")
            .has("g/e", "base-e")
            .reasons(&[]);
    }

    #[test]
    fn row_dir_ours_removed() {
        run(&remove_d(), &[]).absent("d").reasons(&[]);
        run(&remove_d(), &fill("d/n"))
            .dir("d")
            .has("d/n", "d/n")
            .absent("d/e")
            .reasons(&[Reason::DirRemovedFilled]);
        run(&remove_d(), &remove_d()).absent("d").reasons(&[]);
        run(&remove_d(), &[rename("d", "g", 0)])
            .dir("g")
            .absent("g/e")
            .absent("d")
            .reasons(&[Reason::WeDeleted]);
    }

    #[test]
    fn row_dir_ours_renamed() {
        let ours = [rename("d", "f", 0)];
        run(&ours, &fill("d/n"))
            .has("f/n", "d/n")
            .has("f/e", "base-e")
            .absent("d");
        run(&ours, &remove_d())
            .dir("f")
            .absent("f/e")
            .reasons(&[Reason::TheyDeleted]);
        run(&ours, &[rename("d", "g", 0)])
            .has("f/e", "base-e")
            .absent("g")
            .reasons(&[Reason::BothRenamed]);
        // A file modified under a directory the other side renamed is the same object.
        run(&ours, &[write("d/e", "theirs")])
            .has("f/e", "theirs")
            .reasons(&[]);
    }

    /// Seed 4446 (two sites): our rename of `d` onto the empty directory `a` removed `a`; their
    /// file made in `a` must not be merged into our `d` (now at `a`), whose own entries the
    /// records do not list: their new `a/e` and their edit of `d/e` (our `a/e`) both survive.
    #[test]
    fn their_entry_in_a_directory_our_rename_replaced_gets_it_back_under_a_conflict_name() {
        // (Our edit of `a/k` tells the planner that `a` is a directory now.)
        let ours = [rename("d", "a", 0), write("a/k", "ours-k")];
        let theirs = [
            create("a/e"),
            write("a/e", "theirs-new"),
            write("d/e", "theirs-e"),
        ];
        let o = run_with_base(&[mkdir("a"), create("d/k")], &ours, &theirs);
        let copy = format!("a{CONFLICT}");
        o.has("a/e", "theirs-e")
            .has(&format!("{copy}/e"), "theirs-new")
            .has("a/k", "ours-k")
            .absent("d")
            .reasons(&[Reason::DirRemovedFilled]);
        assert_eq!(o.plan.conflicts[0].copy, Some(p(&copy)), "{:?}", o.plan);
    }

    /// Seed 7442 (three sites): we moved `b` into `f/d`, they moved `f` into `b` and then `f/d`
    /// out of it to `b/b`: their `f/d` would go inside itself, and so would its old place (now
    /// inside their `f`). Neither name can take it: it goes to the root under a conflict name.
    #[test]
    fn a_rename_cycle_with_no_way_back_gets_a_conflict_name_at_the_root() {
        let common = [
            mkdir("b"),
            create("b/x"),
            write("b/x", "base-bx"),
            mkdir("f"),
            create("f/y"),
            write("f/y", "base-fy"),
            mkdir("f/d"),
            create("f/d/k"),
            write("f/d/k", "base-k"),
        ];
        let ours = [rename("b", "f/d/a", 0), write("f/d/a/x", "ours-bx")];
        let theirs = [
            rename("f", "b/a", 0),
            rename("b/a/d", "b/b", 0),
            write("b/b/k", "theirs-k"),
        ];
        let o = run_with_base(&common, &ours, &theirs);
        // Listed where it is, with nothing copied (`--keep local` must not remove it).
        let root_copy = format!("b{CONFLICT}");
        let cycle = o
            .plan
            .conflicts
            .iter()
            .find(|c| c.reason == Reason::RenameCycle);
        let listed = cycle.map(|c| (c.path.clone(), c.copy.clone()));
        assert_eq!(listed, Some((p(&root_copy), None)), "{:?}", o.plan);
        o.dir(&root_copy).has(&format!("{root_copy}/k"), "theirs-k");
        let versions: Vec<String> = o
            .tree
            .entries
            .values()
            .map(|e| String::from_utf8_lossy(&e.content).into_owned())
            .collect();
        for v in ["ours-bx", "base-fy", "theirs-k"] {
            assert!(
                versions.iter().any(|w| w == v),
                "{v} lost: {:?}",
                o.tree.entries.keys()
            );
        }
        let temp = o
            .tree
            .entries
            .keys()
            .find(|k| k.to_string().contains(".mirrorfs-reint"));
        assert_eq!(temp, None, "{:?}", o.plan);
    }

    /// Seed 7710 (three sites): their rename of `c/e/e` onto a name we made is not applied, so
    /// it goes back into `c`, which is still parked under a temporary name then and moves to
    /// `f` later in the plan: the conflict is listed where the object ends, not at the parked name.
    #[test]
    fn a_conflict_is_listed_where_later_steps_of_the_plan_leave_it() {
        let common = [
            mkdir("c"),
            mkdir("c/e"),
            create("c/e/e"),
            write("c/e/e", "base-e"),
        ];
        let ours = [create("b"), write("b", "ours-b")];
        let theirs = [rename("c/e/e", "b", 0), rename("c", "f", 0)];
        let o = run_with_base(&common, &ours, &theirs);
        o.has("b", "ours-b").has("f/e/e", "base-e");
        let listed: Vec<(RelPath, Reason)> = o
            .plan
            .conflicts
            .iter()
            .map(|c| (c.path.clone(), c.reason))
            .collect();
        assert_eq!(
            listed,
            vec![(p("f/e/e"), Reason::NameTaken)],
            "{:?}",
            o.plan
        );
    }

    #[test]
    fn their_rename_onto_a_name_we_changed_is_not_applied() {
        let ours = [create("y"), write("y", "ours-y")];
        run(&ours, &rename_x("y"))
            .has("x", "base-x")
            .has("y", "ours-y")
            .reasons(&[Reason::NameTaken]);
        // Onto a base file we modified: their rename replaced it there, ours is kept.
        let base_y = [create("y"), write("y", "base-y")];
        let mut ours = base_y.to_vec();
        ours.push(write("y", "ours"));
        let o = records(ours.clone());
        let t = records(rename_x("y"));
        let input = Input {
            ours: &o[2..],
            theirs: &t,
            their_site: SITE,
            time: 0,
        };
        let got = plan(&input, &mut |_| false).expect("plan");
        let reasons: Vec<Reason> = got.conflicts.iter().map(|c| c.reason).collect();
        assert_eq!(reasons, [Reason::TheyDeleted, Reason::NameTaken], "{got:?}");
        assert!(!got.steps.iter().any(|s| matches!(s, Step::Remove { .. })));
    }

    /// Seed 9895 (three sites): `x` and `y` were two names of one file at the common point (the
    /// records do not know it). Their side moved `x` to its new file's name `n`, then renamed
    /// `n` to `y`: two names of one file, so rename(2) did nothing and `n` stayed; the planner
    /// read it as a move, took their later write through `n` for a change of a base object
    /// `n`, and copied it over the `n` our side had created. A later op naming the name a
    /// rename left shows the rename did nothing: both names are of one file.
    #[test]
    fn a_rename_between_two_names_of_one_file_linked_before_the_common_point_is_no_move() {
        let linked = [Op::Link {
            from: p("x"),
            to: p("y"),
        }];
        let ours = [create("n"), write("n", "ours-n")];
        let theirs = [
            create("n"),
            rename("x", "n", 0),
            rename("n", "y", 0),
            write("n", "theirs"),
        ];
        let o = run_with_base(&linked, &ours, &theirs);
        // Ours kept at `n`; their file (changed through `n`, also their `y`) kept beside it
        // and at `y`.
        o.has("n", "ours-n").has("y", "theirs");
        let copies: Vec<_> = o
            .plan
            .conflicts
            .iter()
            .filter_map(|c| c.copy.clone())
            .collect();
        let kept = copies
            .iter()
            .any(|c| o.content(&c.to_string()).as_deref() == Some("theirs"))
            || o.content("x").as_deref() == Some("theirs");
        assert!(
            kept,
            "their version kept: {:?} {:?}",
            o.plan,
            o.tree.entries.keys()
        );
        // Their side's net effect: `x` renamed to `n` and changed, `y` changed (one file).
        let t = records(theirs.to_vec());
        assert_eq!(
            net_changes(&t),
            vec![
                NetChange::Modified { path: p("y") },
                NetChange::Renamed {
                    from: p("x"),
                    to: p("n"),
                    modified: true
                },
            ]
        );
    }

    #[test]
    fn renames_that_form_a_cycle_go_through_temporary_names() {
        let theirs = [
            create("y"),
            write("y", "base-y"),
            rename("x", "t", 0),
            rename("y", "x", 0),
            rename("t", "y", 0),
        ];
        // `y` did not exist at the common point: it is their new file, swapped with `x`.
        let o = run(&[], &theirs);
        o.has("x", "base-y").has("y", "base-x").reasons(&[]);
        assert_eq!(o.paths(), 5, "{:?}", o.tree.entries.keys());
        let swap = [rename("x", "d/e", rename_flags::EXCHANGE)];
        run(&[], &swap)
            .has("x", "base-e")
            .has("d/e", "base-x")
            .reasons(&[]);
    }

    #[test]
    fn aborted_records_and_sync_records_are_ignored() {
        let mut t = records(vec![write("x", "lost"), unlink("x")]);
        t.push(Record {
            seq: 102,
            op: Op::Abort { seq: 100 },
        });
        t.push(Record {
            seq: 103,
            op: Op::Sync {
                mirror: 1,
                op: Box::new(write("d/e", "copy")),
            },
        });
        t.push(Record {
            seq: 104,
            op: Op::SetTimes {
                path: p("d"),
                atime: None,
                mtime: Some(Timespec { sec: 1, nsec: 0 }),
            },
        });
        assert_eq!(net_changes(&t), vec![NetChange::Deleted { path: p("x") }]);
    }

    #[test]
    fn net_changes_follow_renames_exchange_and_whiteout() {
        let t = records(vec![
            rename("d", "g", 0),
            write("g/e", "w"),
            rename("x", "g/x", 4),
            mkdir("h"),
            rename("h", "g", rename_flags::EXCHANGE),
        ]);
        let got = net_changes(&t);
        let want = [
            NetChange::Created { path: p("g") },
            NetChange::Created { path: p("x") },
            NetChange::Renamed {
                from: p("d"),
                to: p("h"),
                modified: false,
            },
            NetChange::Renamed {
                from: p("d/e"),
                to: p("h/e"),
                modified: true,
            },
            NetChange::Renamed {
                from: p("x"),
                to: p("h/x"),
                modified: false,
            },
        ];
        for w in &want {
            assert!(got.contains(w), "{w:?} not in {got:?}");
        }
        // The rename targets `g` and `g/x` named nothing this side had touched: whatever was
        // there at the common point was replaced, which cannot be told from records alone.
        assert_eq!(got.len(), want.len(), "{got:?}");
    }

    #[test]
    fn conflict_names_get_a_counter_and_stay_valid() {
        let mut taken = |q: &RelPath| q.as_bytes().ends_with(b"150000");
        let (o, t) = (records(modify("o")), records(modify("t")));
        let input = Input {
            ours: &o,
            theirs: &t,
            their_site: "site/with\0bad bytes",
            time: 1_764_860_400,
        };
        let plan = plan(&input, &mut taken).expect("plan");
        assert_eq!(
            plan.conflicts[0].copy,
            Some(p("x.conflict-site_with_bad_bytes-20251204-150000-1"))
        );
        let long = "y".repeat(NAME_BYTES_MAX);
        let (o, t) = (records(vec![create(&long)]), records(vec![create(&long)]));
        let input = Input {
            ours: &o,
            theirs: &t,
            their_site: SITE,
            time: 0,
        };
        let plan = super::plan(&input, &mut |_| false).expect("plan");
        let copy = plan.conflicts[0].copy.clone().expect("copy");
        assert_eq!(copy.as_bytes().len(), NAME_BYTES_MAX);
    }

    // The property test: a small base tree, random changes on both sides, the plan applied.

    const POOL: &[&str] = &[
        "f", "g", "a", "b", "a/f", "a/g", "a/c", "a/c/h", "b/i", "b/j", "c", "c/k",
    ];
    const ID: &[u8] = b"user.id";

    #[derive(Clone, Debug)]
    enum Gen {
        Create(usize),
        Write(usize),
        Truncate(usize),
        Mkdir(usize),
        Unlink(usize),
        Rmdir(usize),
        Rename(usize, usize, usize),
        Chmod(usize, bool),
        Link(usize, usize),
        Symlink(usize),
    }

    fn gen_step() -> impl Strategy<Value = Gen> {
        let n = POOL.len();
        prop_oneof![
            (0..n).prop_map(Gen::Create),
            (0..n).prop_map(Gen::Write),
            (0..n).prop_map(Gen::Truncate),
            (0..n).prop_map(Gen::Mkdir),
            (0..n).prop_map(Gen::Unlink),
            (0..n).prop_map(Gen::Rmdir),
            (0..n, 0..n, 0..3usize).prop_map(|(a, b, f)| Gen::Rename(a, b, f)),
            (0..n, any::<bool>()).prop_map(|(a, x)| Gen::Chmod(a, x)),
            (0..n, 0..n).prop_map(|(a, b)| Gen::Link(a, b)),
            (0..n).prop_map(Gen::Symlink),
        ]
    }

    fn set_id(path: &str, id: &str) -> Op {
        Op::SetXattr {
            path: p(path),
            name: ID.to_vec(),
            value: id.as_bytes().to_vec(),
            flags: 0,
        }
    }

    /// Directories `a`, `b`, `a/c`; files `f`, `a/g`, `a/c/h`, `b/i`, each with a unique id.
    fn prop_base() -> SimTree {
        let mut t = SimTree::reference();
        let mut ops = vec![mkdir("a"), mkdir("b"), mkdir("a/c")];
        for f in ["f", "a/g", "a/c/h", "b/i"] {
            ops.extend([create(f), write(f, &format!("base:{f}")), set_id(f, f)]);
        }
        for op in ops {
            apply_op(&mut t, &op, false).expect("base");
        }
        t
    }

    fn gen_ops(tag: &str, n: usize, g: &Gen) -> Vec<Op> {
        let id = format!("{tag}{n}");
        match *g {
            Gen::Create(i) => vec![create(POOL[i]), write(POOL[i], &id), set_id(POOL[i], &id)],
            Gen::Write(i) => vec![write(POOL[i], &format!("{id}:"))],
            Gen::Truncate(i) => vec![Op::Truncate {
                path: p(POOL[i]),
                size: 3,
            }],
            Gen::Mkdir(i) => vec![mkdir(POOL[i])],
            Gen::Unlink(i) => vec![unlink(POOL[i])],
            Gen::Rmdir(i) => vec![rmdir(POOL[i])],
            Gen::Rename(a, b, f) => {
                let flags = [0, rename_flags::NOREPLACE, rename_flags::EXCHANGE][f];
                vec![rename(POOL[a], POOL[b], flags)]
            }
            Gen::Link(a, b) => vec![Op::Link {
                from: p(POOL[a]),
                to: p(POOL[b]),
            }],
            Gen::Symlink(i) => vec![Op::Symlink {
                path: p(POOL[i]),
                target: id.into_bytes(),
                uid: 0,
                gid: 0,
            }],
            Gen::Chmod(i, x) => vec![Op::SetMode {
                path: p(POOL[i]),
                mode: if x { 0o600 } else { 0o640 },
            }],
        }
    }

    /// Applies the generated changes to a copy of the base; a change the tree refuses is
    /// journaled and aborted, as the primary does.
    fn play(tag: &str, steps: &[Gen]) -> (SimTree, Vec<Record>) {
        let mut t = prop_base();
        let mut recs = Vec::new();
        for (n, g) in steps.iter().enumerate() {
            for op in gen_ops(tag, n, g) {
                let seq = 1000 + recs.len() as u64;
                let failed = apply_op(&mut t, &op, false).is_err();
                recs.push(Record { seq, op });
                if failed {
                    recs.push(Record {
                        seq: seq + 1,
                        op: Op::Abort { seq },
                    });
                    break;
                }
            }
        }
        (t, recs)
    }

    /// A file's identity and version: (id, content, mode).
    type Version = (Vec<u8>, Vec<u8>, u32);

    fn files(s: &Snapshot) -> BTreeMap<RelPath, Version> {
        s.entries
            .iter()
            .filter(|(_, e)| e.kind == EntryKind::File)
            .filter_map(|(k, e)| {
                let id = e.xattrs.get(ID)?.clone();
                Some((k.clone(), (id, e.content.to_vec(), e.perm)))
            })
            .collect()
    }

    /// Where their renames of directories above `path` (or of `path`) take it.
    fn moved_by(path: &RelPath, moves: &[(RelPath, RelPath)]) -> Option<RelPath> {
        moves
            .iter()
            .filter(|(from, _)| path.starts_with(from))
            .max_by_key(|(from, _)| from.as_bytes().len())
            .and_then(|(from, to)| path.rebase(from, to))
    }

    fn check(
        base: &Snapshot,
        ours: &Snapshot,
        theirs: &Snapshot,
        result: &Snapshot,
        plan: &Plan,
        moves: &[(RelPath, RelPath)],
    ) -> Result<(), String> {
        let (b, o, t, r) = (files(base), files(ours), files(theirs), files(result));
        let base_v: HashSet<&Version> = b.values().collect();
        let in_result: HashSet<&Version> = r.values().collect();
        let copies: Vec<&RelPath> = plan
            .conflicts
            .iter()
            .filter_map(|c| c.copy.as_ref())
            .collect();
        // A conflict that copied nothing names where the object went (a cycle's conflict name).
        let listed: Vec<&RelPath> = plan
            .conflicts
            .iter()
            .map(|c| c.copy.as_ref().unwrap_or(&c.path))
            .collect();
        // (1) and (5): every version either side made is in the result, at a name the plan
        // gave it or a listed conflict copy.
        for (path, v) in o.iter().chain(t.iter()) {
            if !base_v.contains(v) && !in_result.contains(v) {
                return Err(format!("lost {path}: {v:?}"));
            }
        }
        for (path, v) in &r {
            let conflict_named = path.as_bytes().windows(10).any(|w| w == b".conflict-");
            if conflict_named && !listed.iter().any(|c| path.starts_with(c)) {
                return Err(format!("{path} ({v:?}) is an unlisted conflict copy"));
            }
        }
        // (2): every version our side made stays at our name, unless their side renamed it.
        // (Their hard links: any of the file's names on their side counts as their rename.)
        for (path, v) in &o {
            let moved_by_them = t.iter().any(|(q, w)| w.0 == v.0 && q != path)
                && b.get(path).is_none_or(|bv| bv.0 == v.0)
                && r.values().any(|w| w == v);
            // Carried by their move of a directory above it (which our renames may have moved:
            // their move names the directory's path at the common point, found by the file's
            // id when it is a file of the common point).
            let base_path = b.iter().find(|(_, bv)| bv.0 == v.0).map(|(k, _)| k);
            let carried = (moved_by(path, moves).is_some()
                || base_path.is_some_and(|bp| moved_by(bp, moves).is_some()))
                && r.iter()
                    .any(|(q, w)| w == v && q.file_name() == path.file_name());
            if !base_v.contains(v) && r.get(path) != Some(v) && !moved_by_them && !carried {
                return Err(format!("our {path} is not kept: {:?}", r.get(path)));
            }
        }
        // (3): what neither side touched is unchanged.
        for (path, v) in &b {
            if o.get(path) == Some(v) && t.get(path) == Some(v) && r.get(path) != Some(v) {
                return Err(format!("untouched {path} changed: {:?}", r.get(path)));
            }
        }
        if let Some(c) = copies.iter().find(|c| !result.entries.contains_key(**c)) {
            return Err(format!("listed conflict copy {c} is missing"));
        }
        if let Some(k) = result.entries.keys().find(|k| {
            k.file_name()
                .is_some_and(|n| n.starts_with(b".mirrorfs-reint"))
        }) {
            return Err(format!("temporary name {k} left"));
        }
        Ok(())
    }

    fn prop_case(os: &[Gen], ts: &[Gen]) -> Result<(), TestCaseError> {
        let base = prop_base().snapshot();
        let (mut ours, o_recs) = play("o", os);
        let (theirs, t_recs) = play("t", ts);
        let (so, st) = (ours.snapshot(), theirs.snapshot());
        let mut taken = |q: &RelPath| so.entries.contains_key(q) || st.entries.contains_key(q);
        let input = Input {
            ours: &o_recs,
            theirs: &t_recs,
            their_site: SITE,
            time: 0,
        };
        let plan = plan(&input, &mut taken).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let before = ours.clone();
        apply_plan(&mut ours, &st, &plan.steps)
            .map_err(|e| TestCaseError::fail(format!("{e}\nplan {plan:?}")))?;
        let result = ours.snapshot();
        let moves: Vec<(RelPath, RelPath)> = net_changes(&t_recs)
            .into_iter()
            .filter_map(|c| match c {
                NetChange::Renamed { from, to, .. } => Some((from, to)),
                _ => None,
            })
            .collect();
        check(&base, &so, &st, &result, &plan, &moves)
            .map_err(|e| TestCaseError::fail(format!("{e}\nplan {plan:?}")))?;
        // (4): a crash after any op, then a re-run from the step cursor, ends the same.
        for budget in 0.. {
            let mut again = before.clone();
            let drive = |t: &mut SimTree, from, budget| {
                crate::sim::drive(t, &st, &plan, from, budget, &|_| false)
                    .map_err(|e| TestCaseError::fail(format!("crash after {budget} ops: {e}")))
            };
            let first = drive(&mut again, 0, budget)?;
            if first.done {
                break;
            }
            let rest = drive(&mut again, first.cursor, usize::MAX)?;
            prop_assert!(rest.done);
            let diff = again.snapshot().diff(&result, 5);
            prop_assert!(diff.is_empty(), "crash after {} ops: {:?}", budget, diff);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn reintegration_keeps_every_change(
            os in proptest::collection::vec(gen_step(), 0..16),
            ts in proptest::collection::vec(gen_step(), 0..16),
        ) {
            prop_case(&os, &ts)?;
        }
    }
}
