//! Two sites that split, both write, and heal by reintegration: the seeded simulation of
//! failover and failback. Each site runs the seeded workload ([`Primary`]) on its own tree; at
//! the heal, the site that stays writable plans with the core planner (`reintegrate::plan`) and
//! carries the plan out with the core executor (`reintegrate::run::Run`) — the machines the
//! primary's link runs — while its users keep writing (late changes), with crashes of the
//! executor at random points and restarts from its step cursor; the other site then follows it
//! (a resync) and the roles may swap for the next round.
//!
//! Invariants, checked at every heal:
//! 1. no edit lost: every regular file's content either site held at the heal (other than a
//!    content of the common point) is in the healed tree, unless a late change of ours named
//!    that path;
//! 2. every conflict copy this heal made is listed (as a copy, or as the path of a conflict that
//!    copied nothing: an object that went to a conflict name itself);
//! 3. no temporary name is left;
//! 4. a run restarted from its cursor after a crash ends as it would have without the crash.

use std::collections::{BTreeSet, HashSet, VecDeque};

use super::fs::{SimTree, Snapshot};
use super::primary::Primary;
use super::run::SplitMix64;
use super::SimRng;
use crate::op::{Op, Record};
use crate::path::RelPath;
use crate::reintegrate::run::{Action, Applied, Run, Stat};
use crate::reintegrate::{conflict_label, plan, Conflict, Input, Plan};
use crate::tree::{apply_op, EntryKind, Tree, TreeError};

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
        Err(TreeError::NotDir(_)) => Applied::NotDir,
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
    budget: usize,
    changed: &dyn Fn(&RelPath) -> bool,
) -> Result<Stopped, String> {
    let label = "conflict-b-19700101-000000";
    let mut no_users = |_: &mut SimTree| None;
    let mut late = Late {
        users: &mut no_users,
        touched: changed,
        names: BTreeSet::new(),
        moved: Vec::new(),
        log: Vec::new(),
    };
    drive_with(ours, theirs, plan, from, budget, label, &mut late)
}

/// Our users while a plan runs: `users` may change our tree before each look and returns the
/// names it changed; `touched` names changes made before the run started.
pub struct Late<'a> {
    /// A user's change, applied to the tree (`None`: nothing this time).
    pub users: &'a mut dyn FnMut(&mut SimTree) -> Option<Op>,
    pub touched: &'a dyn Fn(&RelPath) -> bool,
    /// Every name the users changed so far.
    pub names: BTreeSet<RelPath>,
    /// The run's late moves so far (kept across crashes, as the shell keeps them durably).
    pub moved: Vec<(RelPath, RelPath)>,
    /// Every change made to our tree, in order: the users' and the plan's applied ops (what
    /// the primary's journal would hold).
    pub log: Vec<Op>,
}

impl Late<'_> {
    fn changed(&self, p: &RelPath) -> bool {
        (self.touched)(p) || self.names.iter().any(|q| q.starts_with(p))
    }
}

/// [`drive`] with users writing while the plan runs (the primary stays writable).
pub fn drive_with(
    ours: &mut SimTree,
    theirs: &Snapshot,
    plan: &Plan,
    from: usize,
    mut budget: usize,
    label: &str,
    late: &mut Late<'_>,
) -> Result<Stopped, String> {
    let mut run = Run::new(plan, from, label, late.moved.clone());
    let mut out = Stopped {
        conflicts: Vec::new(),
        cursor: from,
        done: false,
    };
    let mut answers: VecDeque<(Vec<Op>, bool)> = VecDeque::new();
    let trace = std::env::var_os("MIRRORFS_SIM_SITES_TRACE").is_some();
    loop {
        let action = run.next_action().map_err(|e| e.to_string())?;
        if trace {
            match &action {
                // A write's data would drown the trace: its size says enough.
                Action::Apply(Op::Write { path, offset, data }) => {
                    eprintln!(
                        "  run: Apply(Write {path} at {offset}, {} bytes)",
                        data.len()
                    )
                }
                a => eprintln!("  run: {a:?}"),
            }
        }
        match action {
            Action::Stat(p) => {
                if let Some(op) = (late.users)(ours) {
                    if trace {
                        eprintln!("  user: {} {:?}", op.name(), names_of(&op));
                    }
                    late.names.extend(names_of(&op));
                    late.log.push(op);
                }
                let kind = match ours.kind(&p) {
                    Err(TreeError::NotDir(_)) => None,
                    k => k.map_err(|e| e.to_string())?,
                };
                let ino = ours.ino(&p).ok().flatten().unwrap_or(0);
                let nlink = ours.nlink(&p).unwrap_or(1);
                let st = kind.map(|kind| Stat {
                    kind,
                    ino,
                    nlink,
                    changed_since_plan: late.changed(&p),
                });
                if trace {
                    eprintln!("    -> {st:?}");
                }
                run.on_stat(st).map_err(|e| e.to_string())?;
            }
            Action::Apply(op) => {
                if budget == 0 {
                    return Ok(out);
                }
                budget -= 1;
                let r = applied(apply_op(ours, &op, false));
                if trace {
                    eprintln!("    -> {r:?}");
                }
                if r == Applied::Ok {
                    late.log.push(op);
                }
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
            Action::Moved(from, to) => late.moved.push((from, to)),
            Action::StepDone(i) => out.cursor = i + 1,
            Action::Done => {
                out.done = true;
                return Ok(out);
            }
        }
    }
}

/// What a seed did.
#[derive(Debug, Default, Clone, Copy)]
pub struct SitesStats {
    pub rounds: u64,
    pub ops: u64,
    pub steps: u64,
    pub conflicts: u64,
    pub crashes: u64,
    pub late_changes: u64,
    /// Versions not carried over because they were changed through another name of a file
    /// hard-linked before the common point (a documented limit).
    pub linked_losses: u64,
}

impl std::ops::AddAssign for SitesStats {
    fn add_assign(&mut self, o: SitesStats) {
        self.rounds += o.rounds;
        self.ops += o.ops;
        self.steps += o.steps;
        self.conflicts += o.conflicts;
        self.crashes += o.crashes;
        self.late_changes += o.late_changes;
        self.linked_losses += o.linked_losses;
    }
}

/// One site: the workload's reference tree (its own copy of the volume) and its records since
/// the common point.
struct Site {
    w: Primary,
    records: Vec<Record>,
    next_seq: u64,
}

impl Site {
    /// Runs one op of the workload; returns the names it changed.
    fn write(&mut self, rng: &mut SimRng<'_>) -> Vec<RelPath> {
        let Some(p) = self.w.plan(rng) else {
            return Vec::new();
        };
        let seq = self.next_seq;
        let names = names_of(&p.op);
        self.records.push(Record { seq, op: p.op });
        self.next_seq += 1;
        if !p.ok {
            self.records.push(Record {
                seq: seq + 1,
                op: Op::Abort { seq },
            });
            self.next_seq += 1;
            return Vec::new();
        }
        names
    }
}

fn names_of(op: &Op) -> Vec<RelPath> {
    match op {
        Op::Rename { from, to, .. } | Op::Link { from, to } => vec![from.clone(), to.clone()],
        op => op.path().into_iter().cloned().collect(),
    }
}

/// The regular files' contents of a tree.
fn contents(s: &Snapshot) -> Vec<(RelPath, Vec<u8>)> {
    s.entries
        .iter()
        .filter(|(_, e)| e.kind == EntryKind::File && !e.content.is_empty())
        .map(|(p, e)| (p.clone(), e.content.to_vec()))
        .collect()
}

/// Runs seed `seed` with two sites: `rounds` of split (both write), heal (reintegration into the
/// site that stays writable, with users writing and the executor crashing) and resync.
pub fn run_sites_seed(seed: u64, rounds: u64) -> Result<SitesStats, String> {
    run_sites_seed_n(seed, rounds, 2)
}

/// [`run_sites_seed`] with `n` sites (2 or more): every site writes while split; the heal
/// reintegrates each other site in turn into the one that stays writable (its records then
/// include what the earlier heals applied and what its users wrote meanwhile).
pub fn run_sites_seed_n(seed: u64, rounds: u64, n: usize) -> Result<SitesStats, String> {
    let mut gen = SplitMix64(seed ^ 0x0051_7E5A_u64 ^ ((n as u64) << 40));
    let mut next = || gen.next();
    let mut rng = SimRng::new(&mut next);
    let mut stats = SitesStats::default();
    // The volume before the first split: a workload on one site, copied to the others.
    let mut healed = Site {
        w: Primary::new(),
        records: Vec::new(),
        next_seq: 1,
    };
    for _ in 0..rng.range(5, 60) {
        healed.write(&mut rng);
    }
    for round in 0..rounds {
        let base = healed.w.tree.state().clone();
        let mut sites: Vec<Site> = (0..n.max(2))
            .map(|_| {
                let mut w = Primary::new();
                w.tree.set_state(base.clone());
                Site {
                    w,
                    records: Vec::new(),
                    next_seq: healed.next_seq,
                }
            })
            .collect();
        // The split: every site writes (disconnected operation).
        for _ in 0..rng.range(0, 40) {
            let who = rng.below(sites.len() as u64) as usize;
            sites[who].write(&mut rng);
            stats.ops += 1;
        }
        // The heal: one site stays writable ("ours"); the others are reintegrated into it.
        let mut ours = sites.swap_remove(rng.below(sites.len() as u64) as usize);
        let mut base_tree = SimTree::reference();
        base_tree.set_state(base);
        for (k, theirs) in sites.iter().enumerate() {
            let at = Round {
                round,
                heal: k as u64,
                seed,
            };
            heal(&mut rng, &at, &mut ours, theirs, &mut base_tree, &mut stats)?;
        }
        // The others follow (a resync): they now hold the healed tree.
        ours.records.clear();
        healed = ours;
        stats.rounds += 1;
    }
    Ok(stats)
}

/// Which heal of which round (for conflict labels, the users' random source and messages).
struct Round {
    round: u64,
    heal: u64,
    seed: u64,
}

/// One heal: their records planned into ours and carried out, while our users write and the
/// executor crashes; then the invariants. Ours' records grow by what the heal applied and what
/// the users wrote, as a primary's journal does.
fn heal(
    rng: &mut SimRng<'_>,
    at: &Round,
    ours: &mut Site,
    theirs: &Site,
    base_tree: &mut SimTree,
    stats: &mut SitesStats,
) -> Result<(), String> {
    let round = at.round;
    let their_snap = theirs.w.tree.snapshot();
    let our_snap = ours.w.tree.snapshot();
    let base_snap = base_tree.snapshot();
    let linked = linked_before_split(base_tree, &mut ours.w.tree, &mut theirs.w.tree.clone());
    let mut taken =
        |q: &RelPath| our_snap.entries.contains_key(q) || their_snap.entries.contains_key(q);
    let time = (round * 10 + at.heal) as i64 * 3600;
    let input = Input {
        ours: &ours.records,
        theirs: &theirs.records,
        their_site: "b",
        time,
    };
    let plan = plan(&input, &mut taken).map_err(|e| format!("round {round}: plan: {e}"))?;
    let label = conflict_label("b", time);
    stats.steps += plan.steps.len() as u64;
    // Users keep writing on our site while the plan runs; the executor crashes and restarts
    // from its cursor.
    let mut user_rng_state = SplitMix64(at.seed ^ (round * 10 + at.heal).wrapping_mul(0x9E37_79B9));
    let mut late_ops = 0u64;
    let mut user_removed: HashSet<Vec<u8>> = HashSet::new();
    let mut users = |t: &mut SimTree| {
        let mut g = || user_rng_state.next();
        let mut r = SimRng::new(&mut g);
        if !r.chance(1, 25) {
            return None;
        }
        let mut w = Primary::new();
        w.tree.set_state(t.state().clone());
        match w.plan(&mut r) {
            Some(p) if p.ok => {
                // What the user's change overwrote or removed was theirs to lose.
                let after: HashSet<Vec<u8>> = contents(&w.tree.snapshot())
                    .into_iter()
                    .map(|(_, c)| c)
                    .collect();
                user_removed.extend(
                    contents(&t.snapshot())
                        .into_iter()
                        .map(|(_, c)| c)
                        .filter(|c| !after.contains(c)),
                );
                t.set_state(w.tree.state().clone());
                late_ops += 1;
                Some(p.op)
            }
            _ => None,
        }
    };
    let nobody = |_: &RelPath| false;
    let mut late = Late {
        users: &mut users,
        touched: &nobody,
        names: BTreeSet::new(),
        moved: Vec::new(),
        log: Vec::new(),
    };
    let mut listed: Vec<Conflict> = plan.conflicts.clone();
    let mut cursor = 0;
    let mut crashes = 0;
    loop {
        let budget = if crashes < 3 && rng.chance(1, 3) {
            crashes += 1;
            rng.below(12) as usize
        } else {
            usize::MAX
        };
        let s = drive_with(
            &mut ours.w.tree,
            &their_snap,
            &plan,
            cursor,
            budget,
            &label,
            &mut late,
        )
        .map_err(|e| {
            format!(
                "round {round}, heal {}: the run failed: {e}\n  ours: {}\n  theirs: {}\n  plan: {plan:?}\n  base: {}",
                at.heal,
                describe(&ours.records),
                describe(&theirs.records),
                entries(&base_snap),
            )
        })?;
        listed.extend(s.conflicts);
        cursor = s.cursor;
        if s.done {
            break;
        }
    }
    let late_names = std::mem::take(&mut late.names);
    let log = std::mem::take(&mut late.log);
    drop(late);
    stats.crashes += crashes;
    stats.late_changes += late_ops;
    stats.conflicts += listed.len() as u64;
    let healed = ours.w.tree.snapshot();
    let h = Heal {
        base: &base_snap,
        ours: &our_snap,
        theirs: &their_snap,
        healed: &healed,
        listed: &listed,
        late: &late_names,
        user_removed: &user_removed,
        linked: &linked,
        label: &label,
    };
    stats.linked_losses += check(&h).map_err(|e| {
        format!(
            "round {round}, heal {}: {e}\n  ours: {}\n  theirs: {}\n  plan: {plan:?}\n  late: {late_names:?}\n  listed: {listed:?}\n  base: {}\n  their tree: {}\n  healed: {}",
            at.heal,
            describe(&ours.records),
            describe(&theirs.records),
            files(&base_snap),
            files(&their_snap),
            files(&healed)
        )
    })?;
    // What the heal applied and what the users wrote are changes of ours since the common
    // point, as the primary's journal holds them (a later heal plans with them).
    for op in log {
        ours.records.push(Record {
            seq: ours.next_seq,
            op,
        });
        ours.next_seq += 1;
    }
    Ok(())
}

/// The names, on either side, of files hard-linked before the split (by inode: the sides'
/// trees come from the base's state, so inode numbers carry over).
fn linked_before_split(
    base: &mut SimTree,
    ours: &mut SimTree,
    theirs: &mut SimTree,
) -> BTreeSet<RelPath> {
    let base_snap = base.snapshot();
    let linked_inos: HashSet<u64> = base_snap
        .entries
        .iter()
        .filter(|(_, e)| e.kind == EntryKind::File && e.nlink > 1)
        .filter_map(|(p, _)| base.ino(p).ok().flatten())
        .collect();
    let mut out = BTreeSet::new();
    for t in [ours, theirs] {
        let snap = t.snapshot();
        for p in snap.entries.keys() {
            if t.ino(p)
                .ok()
                .flatten()
                .is_some_and(|i| linked_inos.contains(&i))
            {
                out.insert(p.clone());
            }
        }
    }
    out
}

/// One heal, as the invariants see it: the trees at the common point, of both sides when the
/// heal began, and after it; the conflicts listed; what the users did meanwhile.
struct Heal<'a> {
    base: &'a Snapshot,
    ours: &'a Snapshot,
    theirs: &'a Snapshot,
    healed: &'a Snapshot,
    listed: &'a [Conflict],
    /// Names the users changed during the heal.
    late: &'a BTreeSet<RelPath>,
    /// Contents the users' changes overwrote or removed.
    user_removed: &'a HashSet<Vec<u8>>,
    /// Names of files hard-linked before the split.
    linked: &'a BTreeSet<RelPath>,
    label: &'a str,
}

/// Checks the invariants of a heal; returns the versions lost to links older than the split.
fn check(h: &Heal<'_>) -> Result<u64, String> {
    let Heal {
        base,
        ours,
        theirs,
        healed,
        listed,
        late,
        user_removed,
        linked,
        label,
    } = *h;
    let base_v: HashSet<Vec<u8>> = contents(base).into_iter().map(|(_, c)| c).collect();
    let healed_v: HashSet<Vec<u8>> = contents(healed).into_iter().map(|(_, c)| c).collect();
    let late_touched = |p: &RelPath| late.iter().any(|q| p.starts_with(q) || q.starts_with(p));
    // A content a user overwrote after the plan placed it is theirs to lose (also under another
    // name of the same file: links made before the common point are unknown to the records).
    let late_v: HashSet<Vec<u8>> = [ours, theirs]
        .into_iter()
        .flat_map(contents)
        .filter(|(p, _)| late_touched(p))
        .map(|(_, c)| c)
        .collect();
    // Hard links made before the common point are unknown to the records (the documented
    // limit of `reintegrate`): a change through one name of such a file is not seen at its
    // other names. Those losses (`linked`: names of such files on either side) are counted,
    // not failed.
    let mut linked_losses = 0;
    for (side, snap) in [("ours", ours), ("theirs", theirs)] {
        for (p, c) in contents(snap) {
            let users_choice = late_v.contains(&c) || user_removed.contains(&c);
            if base_v.contains(&c) || healed_v.contains(&c) || users_choice {
                continue;
            }
            if linked.contains(&p) {
                linked_losses += 1;
                continue;
            }
            return Err(format!(
                "invariant 1 (no edit lost): {side} {p} ({} bytes, {:08x}) is nowhere in the healed tree",
                c.len(),
                crc32c::crc32c(&c)
            ));
        }
    }
    // Where each listed conflict put their version: its copy, or, when nothing was copied (an
    // object their rename could not place, moved to a conflict name), its path.
    let copies: BTreeSet<&RelPath> = listed
        .iter()
        .map(|c| c.copy.as_ref().unwrap_or(&c.path))
        .collect();
    for p in healed.entries.keys() {
        let name = p.file_name().unwrap_or_default();
        // Users moving a directory that held a half-made copy (before a crash) carry it along.
        // (So do later rounds, which may move it again.)
        let older = ours.entries.contains_key(p) || theirs.entries.contains_key(p);
        if late_touched(p) || older {
            continue;
        }
        let listed_copy = copies.iter().any(|c| p.starts_with(c));
        // (A listed conflict copy of a user's file that took a temporary name earlier is not
        // a temporary name: it starts like one.)
        // A copy's temporary name carries its plan's tag: one of an earlier heal's plan is a
        // user's entry kept there then (and maybe moved by this heal's renames since).
        let this_plan = format!(
            ".mirrorfs-reint-copy-{:08x}-",
            crc32c::crc32c(label.as_bytes())
        );
        let earlier_plan =
            name.starts_with(b".mirrorfs-reint-copy-") && !name.starts_with(this_plan.as_bytes());
        if name.starts_with(b".mirrorfs-reint") && !listed_copy && !earlier_plan {
            return Err(format!("invariant 3: temporary name {p} left"));
        }
        // Copies of earlier heals were listed then (and may have moved since).
        let conflict_named = name.windows(label.len()).any(|w| w == label.as_bytes());
        if conflict_named && !listed_copy {
            return Err(format!("invariant 2: {p} is an unlisted conflict copy"));
        }
    }
    Ok(linked_losses)
}

/// Records as `seq:op path[→path]`, for failure messages.
fn describe(records: &[Record]) -> String {
    records
        .iter()
        .map(|r| {
            let names: Vec<String> = names_of(&r.op).iter().map(|p| p.to_string()).collect();
            format!("{}:{} {}", r.seq, r.op.name(), names.join("→"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A tree's entries as `path/` (directory), `path@` (symlink), `path*` (special) or
/// `path(nlink)` (file), for failure messages about the namespace.
fn entries(s: &Snapshot) -> String {
    s.entries
        .iter()
        .map(|(p, e)| match e.kind {
            EntryKind::Dir => format!("{p}/"),
            EntryKind::Symlink => format!("{p}@"),
            EntryKind::Special => format!("{p}*"),
            EntryKind::File => format!("{p}(n{})", e.nlink),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A tree's files as `path(size, nlink, content hash)`, for failure messages.
fn files(s: &Snapshot) -> String {
    s.entries
        .iter()
        .filter(|(_, e)| e.kind == EntryKind::File)
        .map(|(p, e)| {
            let h = crc32c::crc32c(&e.content);
            format!("{p}({}b,n{},{h:08x})", e.content.len(), e.nlink)
        })
        .collect::<Vec<_>>()
        .join(" ")
}
