//! Journal-driven incremental verify, without I/O: which paths changed since a mirror was last
//! verified (the [`DirtySet`] a mount keeps from its journal's records), what a verify must then
//! rescan on both sides ([`plan`]), whether it may be incremental at all ([`decide`]), and the
//! per-mirror record of the last verify ([`VerifyState`]).
//!
//! ```text
//!  journal records ─observe─▶ DirtySet (path → last seq, scope; floor; bounded) ─┐
//!  STATE/verify/ID.state: VerifyState (verified through seq V, pending paths) ───┤
//!                                                                                ▼
//!                 decide ─▶ Full(reason) | Incremental(plan: subtrees and entries to rescan)
//! ```
//!
//! The rule everything rests on: every change the mount makes is a journal record; a record
//! with seq `s` puts every path it can change into the set with seq `s` ([`touched`]). The set
//! is complete for seqs above its `floor`: whatever it dropped (at its bound, by a trim after a
//! verify, at a gap in what it read, at a start after a crash) raises the floor to the highest
//! seq dropped. A mirror verified through `V` may be verified incrementally only while
//! `floor <= V`: then every path changed since is in the set, and every other path is as it was
//! when it was last found equal. What the journal never sees (a change made directly in a
//! mirror or behind the mount in its backing) is not in the set: the periodic full verify
//! ([`decide`]'s `full_every`) is what finds it.

use std::collections::BTreeMap;

use crate::op::Op;
use crate::path::RelPath;
use crate::verify::path_order;

/// The most paths a dirty set holds; one more raises its floor and empties it (the next verify
/// is a full one).
pub const MAX_DIRTY_PATHS: usize = 200_000;
/// The most path bytes a dirty set holds (the same fall-back).
pub const MAX_DIRTY_BYTES: usize = 32 << 20;
/// The most paths a verify carries over as still differing (beyond it: the next verify is full).
pub const MAX_PENDING: usize = 100_000;

/// What a changed path needs rescanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// The entry itself (its metadata, a file's data, a directory's times), not what is below.
    Entry = 0,
    /// The entry and everything below it (a rename moves a whole subtree to new names).
    Subtree = 1,
}

impl Scope {
    fn from_u8(b: u8) -> Option<Scope> {
        match b {
            0 => Some(Scope::Entry),
            1 => Some(Scope::Subtree),
            _ => None,
        }
    }
}

/// The paths record `op` can change, with their scopes: the entry named, and the directory its
/// name is in when a name appears or goes (its mtime, its entries). A `Sync` record (a copy or
/// a repair writing to one mirror) counts as the change it carries.
pub fn touched(op: &Op, out: &mut Vec<(RelPath, Scope)>) {
    let named = |p: &RelPath, scope: Scope, out: &mut Vec<(RelPath, Scope)>| {
        out.push((p.clone(), scope));
    };
    let with_parent = |p: &RelPath, scope: Scope, out: &mut Vec<(RelPath, Scope)>| {
        out.push((p.clone(), scope));
        if let Some(parent) = p.parent() {
            out.push((parent, Scope::Entry));
        }
    };
    match op {
        Op::Create { path, .. }
        | Op::Mkdir { path, .. }
        | Op::Mknod { path, .. }
        | Op::Symlink { path, .. } => with_parent(path, Scope::Entry, out),
        // A name that goes may be a directory the mirror still has content below.
        Op::Unlink { path, .. } | Op::Rmdir { path } => with_parent(path, Scope::Subtree, out),
        Op::Link { from, to } => {
            named(from, Scope::Entry, out);
            with_parent(to, Scope::Entry, out);
        }
        Op::Rename { from, to, .. } => {
            with_parent(from, Scope::Subtree, out);
            with_parent(to, Scope::Subtree, out);
        }
        Op::Write { path, .. }
        | Op::Truncate { path, .. }
        | Op::Fallocate { path, .. }
        | Op::SetMode { path, .. }
        | Op::SetOwner { path, .. }
        | Op::SetTimes { path, .. }
        | Op::SetXattr { path, .. }
        | Op::RemoveXattr { path, .. } => named(path, Scope::Entry, out),
        Op::Sync { op, .. } => touched(op, out),
        Op::Abort { .. } | Op::SyncDone { .. } | Op::GroupBegin | Op::GroupEnd => {}
    }
}

/// Why a dirty set is not complete below its floor (kept with the set, shown by verify).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloorReason {
    /// Nothing dropped yet (the floor is 0).
    None = 0,
    /// The mount started without a record of the changes before (first mount with this
    /// version, or the record was missing or damaged).
    Started = 1,
    /// The set reached its bound ([`MAX_DIRTY_PATHS`], [`MAX_DIRTY_BYTES`]).
    Limit = 2,
    /// The journal released records before the set read them.
    Gap = 3,
    /// Changes verified by every mirror were dropped.
    Trimmed = 4,
    /// The mount restarted after a crash or a kill: changes made while it was down (behind its
    /// back) would not be in the journal.
    Unclean = 5,
    /// The backing directory was changed while it was not mounted (the backing stamp).
    Behind = 6,
}

impl FloorReason {
    fn from_u8(b: u8) -> Option<FloorReason> {
        Some(match b {
            0 => FloorReason::None,
            1 => FloorReason::Started,
            2 => FloorReason::Limit,
            3 => FloorReason::Gap,
            4 => FloorReason::Trimmed,
            5 => FloorReason::Unclean,
            6 => FloorReason::Behind,
            _ => return None,
        })
    }

    pub fn words(self) -> &'static str {
        match self {
            FloorReason::None => "none",
            FloorReason::Started => "the mount has no record of the changes made before it started",
            FloorReason::Limit => "more paths changed than the record of changes holds",
            FloorReason::Gap => "the journal released changes before they were recorded",
            FloorReason::Trimmed => "the changes since this mirror's last verify were dropped once other verifies were done",
            FloorReason::Unclean => "the mount restarted after a crash or a kill",
            FloorReason::Behind => "the backing directory was changed while it was not mounted",
        }
    }
}

/// The paths changed by the journal's records, each with the seq of the last record that
/// changed it and the widest scope asked; complete for every record in `floor + 1 ..= through`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySet {
    paths: BTreeMap<RelPath, (u64, Scope)>,
    bytes: usize,
    /// Every record with a seq at most this was observed.
    pub through: u64,
    /// Records at most this may be missing.
    pub floor: u64,
    pub floor_reason: FloorReason,
    /// Which run of records this is: a new epoch begins whenever the mount starts without a
    /// record it can trust (a crash, changes behind its back, a missing or damaged file), and a
    /// mirror verified in another epoch needs a full verify (what changed between the epochs
    /// has no seq: it was never journaled).
    pub epoch: u64,
    /// Why this epoch began.
    pub epoch_reason: FloorReason,
    max_paths: usize,
    max_bytes: usize,
}

impl DirtySet {
    /// An empty set that has seen every record through `through`, and knows nothing of those
    /// at most `floor`.
    pub fn new(through: u64, floor: u64, reason: FloorReason) -> DirtySet {
        DirtySet::with_bounds(through, floor, reason, MAX_DIRTY_PATHS, MAX_DIRTY_BYTES)
    }

    pub fn with_bounds(
        through: u64,
        floor: u64,
        reason: FloorReason,
        max_paths: usize,
        max_bytes: usize,
    ) -> DirtySet {
        DirtySet {
            paths: BTreeMap::new(),
            bytes: 0,
            through,
            floor,
            epoch: 0,
            epoch_reason: reason,
            floor_reason: if floor == 0 {
                FloorReason::None
            } else {
                reason
            },
            max_paths,
            max_bytes,
        }
    }

    /// This set, in epoch `epoch` begun for `reason`.
    pub fn in_epoch(mut self, epoch: u64, reason: FloorReason) -> DirtySet {
        self.epoch = epoch;
        self.epoch_reason = reason;
        self
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Record `seq` (`op`) was journaled. Records at most `through` are already in.
    pub fn observe(&mut self, seq: u64, op: &Op) {
        if seq <= self.through {
            return;
        }
        let mut t = Vec::new();
        touched(op, &mut t);
        for (p, scope) in t {
            self.add(p, seq, scope);
        }
        self.through = seq;
        if self.paths.len() > self.max_paths || self.bytes > self.max_bytes {
            self.drop_through(seq, FloorReason::Limit);
        }
    }

    fn add(&mut self, p: RelPath, seq: u64, scope: Scope) {
        let n = p.as_bytes().len();
        match self.paths.get_mut(&p) {
            Some(e) => *e = (seq.max(e.0), scope.max(e.1)),
            None => {
                self.bytes += n;
                self.paths.insert(p, (seq, scope));
            }
        }
    }

    /// Records up to `seq` cannot be read (released before this set saw them): the set starts
    /// over from there.
    pub fn gap(&mut self, seq: u64) {
        self.drop_through(seq, FloorReason::Gap);
        self.through = self.through.max(seq);
    }

    /// Raises the floor to `seq` for `reason` (the changes at most `seq` are no longer known)
    /// and forgets the paths they changed.
    pub fn drop_through(&mut self, seq: u64, reason: FloorReason) {
        if seq > self.floor {
            self.floor = seq;
            self.floor_reason = reason;
        }
        let before = std::mem::take(&mut self.paths);
        self.bytes = 0;
        for (p, (s, scope)) in before {
            if s > seq {
                self.add(p, s, scope);
            }
        }
    }

    /// Every mirror was verified through `upto`: the paths changed only by records at most it
    /// are dropped (a mirror verified through less then needs a full verify).
    pub fn trim(&mut self, upto: u64) {
        let upto = upto.min(self.through);
        if upto > self.floor {
            self.drop_through(upto, FloorReason::Trimmed);
        }
    }

    /// The paths changed by records after `verified` (a mirror's last verify), or why the set
    /// cannot tell (a full verify is needed).
    pub fn changed_since(
        &self,
        verified: u64,
        epoch: u64,
    ) -> Result<Vec<(RelPath, Scope)>, FloorReason> {
        if epoch != self.epoch {
            return Err(self.epoch_reason);
        }
        if self.floor > verified {
            return Err(self.floor_reason);
        }
        if verified > self.through {
            // Seqs went backwards: another journal (a new volume, a promotion).
            return Err(FloorReason::Started);
        }
        Ok(self
            .paths
            .iter()
            .filter(|(_, (s, _))| *s > verified)
            .map(|(p, (_, scope))| (p.clone(), *scope))
            .collect())
    }

    /// The set's bytes (layout in docs/journal.md, "Incremental verify").
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40 + self.bytes + self.paths.len() * 11);
        out.extend_from_slice(DIRTY_MAGIC);
        out.extend_from_slice(&self.through.to_le_bytes());
        out.extend_from_slice(&self.floor.to_le_bytes());
        out.push(self.floor_reason as u8);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.push(self.epoch_reason as u8);
        out.extend_from_slice(&(self.paths.len() as u32).to_le_bytes());
        for (p, (seq, scope)) in &self.paths {
            out.extend_from_slice(&seq.to_le_bytes());
            out.push(*scope as u8);
            put_path(&mut out, p.as_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// A set from [`DirtySet::encode`]'s bytes, every field checked.
    pub fn decode(b: &[u8]) -> Result<DirtySet, String> {
        let mut r = Bytes::checked(b, DIRTY_MAGIC)?;
        let through = r.u64()?;
        let floor = r.u64()?;
        let reason = FloorReason::from_u8(r.u8()?).ok_or("unknown floor reason")?;
        let epoch = r.u64()?;
        let epoch_reason = FloorReason::from_u8(r.u8()?).ok_or("unknown epoch reason")?;
        let n = r.u32()? as usize;
        if n > MAX_DIRTY_PATHS || floor > through {
            return Err(format!(
                "{n} paths, floor {floor}, through {through}: out of bounds"
            ));
        }
        let mut s = DirtySet::new(through, floor, reason).in_epoch(epoch, epoch_reason);
        for _ in 0..n {
            let seq = r.u64()?;
            let scope = Scope::from_u8(r.u8()?).ok_or("unknown scope")?;
            let p = r.path()?;
            if seq <= floor || seq > through {
                return Err(format!("a path of seq {seq} outside {floor}..={through}"));
            }
            s.add(p, seq, scope);
        }
        r.end()?;
        Ok(s)
    }
}

const DIRTY_MAGIC: &[u8; 8] = b"MFSDS001";
const STATE_MAGIC: &[u8; 8] = b"MFSVS001";

fn put_path(out: &mut Vec<u8>, p: &[u8]) {
    out.extend_from_slice(&(p.len() as u16).to_le_bytes());
    out.extend_from_slice(p);
}

/// A bounded reader of a checksummed record: magic first, crc32c of the rest last.
struct Bytes<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Bytes<'a> {
    fn checked(b: &'a [u8], magic: &[u8; 8]) -> Result<Bytes<'a>, String> {
        if b.len() < 12 || &b[..8] != magic {
            return Err("not a record of this version".into());
        }
        let (body, tail) = b.split_at(b.len() - 4);
        let mut crc = [0u8; 4];
        crc.copy_from_slice(tail);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc) {
            return Err("checksum mismatch".into());
        }
        Ok(Bytes { b: body, at: 8 })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.b.len());
        let end = end.ok_or("short")?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let mut a = [0u8; 2];
        a.copy_from_slice(self.take(2)?);
        self.take(u16::from_le_bytes(a) as usize)
    }

    fn path(&mut self) -> Result<RelPath, String> {
        RelPath::new(self.bytes()?.to_vec()).map_err(|e| format!("bad path: {e:?}"))
    }

    fn end(&self) -> Result<(), String> {
        if self.at != self.b.len() {
            return Err("trailing bytes".into());
        }
        Ok(())
    }
}

/// What `verify` remembers of its last run for one mirror (`STATE/verify/ID.state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyState {
    /// The mirror, as the mount names it (a directory, or `mirror://HOST:PORT`).
    pub mirror: Vec<u8>,
    /// The record of changes' epoch when it was read ([`DirtySet::epoch`]).
    pub epoch: u64,
    /// Every record with a seq at most this was compared (its paths equal, or in `pending`).
    pub verified: u64,
    /// Incremental verifies since the last full one.
    pub since_full: u32,
    /// Paths that still differed: compared again by the next verify.
    pub pending: Vec<RelPath>,
}

impl VerifyState {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(STATE_MAGIC);
        put_path(
            &mut out,
            &self.mirror[..self.mirror.len().min(u16::MAX as usize)],
        );
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.verified.to_le_bytes());
        out.extend_from_slice(&self.since_full.to_le_bytes());
        out.extend_from_slice(&(self.pending.len() as u32).to_le_bytes());
        for p in &self.pending {
            put_path(&mut out, p.as_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<VerifyState, String> {
        let mut r = Bytes::checked(b, STATE_MAGIC)?;
        let mirror = r.bytes()?.to_vec();
        let epoch = r.u64()?;
        let verified = r.u64()?;
        let since_full = r.u32()?;
        let n = r.u32()? as usize;
        if n > MAX_PENDING {
            return Err(format!("{n} pending paths: more than {MAX_PENDING}"));
        }
        let mut pending = Vec::with_capacity(n);
        for _ in 0..n {
            pending.push(r.path()?);
        }
        r.end()?;
        Ok(VerifyState {
            mirror,
            epoch,
            verified,
            since_full,
            pending,
        })
    }
}

/// Why a verify compares the whole trees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FullReason {
    /// `--full` (or `--no-cache`).
    Asked,
    /// No record of a previous verify of this mirror (or it was damaged).
    NoState,
    /// The mount keeps no record of changes (an older mount).
    NoRecord,
    /// The periodic full verify (`--full-every N`): the N-th verify in a row.
    Periodic(u32),
    /// The record of changes is not complete since this mirror's last verify.
    Floor(FloorReason),
    /// The last verify left more differing paths than it keeps.
    TooManyPending,
    /// A network mirror, and more changed paths than a `Verify` carries.
    Network,
}

impl FullReason {
    pub fn words(&self) -> String {
        match self {
            FullReason::Asked => "asked (--full or --no-cache)".into(),
            FullReason::NoState => "no previous verify of this mirror on record".into(),
            FullReason::NoRecord => "the mount keeps no record of changes".into(),
            FullReason::Periodic(n) => format!("every {n}th verify is a full one (--full-every)"),
            FullReason::Floor(r) => r.words().into(),
            FullReason::TooManyPending => "the last verify left too many differences".into(),
            FullReason::Network => {
                "more paths changed than a network mirror's verify request carries".into()
            }
        }
    }
}

/// A verify's choice for one mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Full(FullReason),
    /// Rescan these (paths changed since the mirror's last verify, and those that still
    /// differed), then compare only them.
    Incremental(Vec<(RelPath, Scope)>),
}

/// Full or incremental for a mirror last verified as `state` says, given the mount's record of
/// changes `dirty`. `full_every`: every that-many-th verify in a row is a full one (0: never by
/// count).
pub fn decide(
    state: Option<&VerifyState>,
    dirty: Option<&DirtySet>,
    asked_full: bool,
    full_every: u32,
) -> Mode {
    if asked_full {
        return Mode::Full(FullReason::Asked);
    }
    let Some(st) = state else {
        return Mode::Full(FullReason::NoState);
    };
    let Some(dirty) = dirty else {
        return Mode::Full(FullReason::NoRecord);
    };
    if full_every > 0 && st.since_full.saturating_add(1) >= full_every {
        return Mode::Full(FullReason::Periodic(full_every));
    }
    if st.pending.len() >= MAX_PENDING {
        return Mode::Full(FullReason::TooManyPending);
    }
    match dirty.changed_since(st.verified, st.epoch) {
        Err(r) => Mode::Full(FullReason::Floor(r)),
        Ok(mut changed) => {
            changed.extend(st.pending.iter().map(|p| (p.clone(), Scope::Subtree)));
            Mode::Incremental(plan(changed))
        }
    }
}

/// The least set of rescans that covers `items`: sorted in scan order (`path_order`), each path
/// once with its widest scope, nothing below a subtree already listed.
pub fn plan(items: impl IntoIterator<Item = (RelPath, Scope)>) -> Vec<(RelPath, Scope)> {
    let mut widest: BTreeMap<RelPath, Scope> = BTreeMap::new();
    for (p, s) in items {
        let e = widest.entry(p).or_insert(s);
        *e = (*e).max(s);
    }
    let mut v: Vec<(RelPath, Scope)> = widest.into_iter().collect();
    v.sort_by(|a, b| path_order(a.0.as_bytes(), b.0.as_bytes()));
    let mut out: Vec<(RelPath, Scope)> = Vec::with_capacity(v.len());
    let mut subtree: Option<RelPath> = None;
    for (p, s) in v {
        if subtree.as_ref().is_some_and(|t| p.starts_with(t)) {
            continue;
        }
        if s == Scope::Subtree {
            subtree = Some(p.clone());
        }
        out.push((p, s));
    }
    out
}

/// Whether the entry at `path` (bytes as a scan names them, the root being `.`) is covered by a
/// sorted `plan`: named in it, or below one of its subtrees.
pub fn covers(plan: &[(RelPath, Scope)], path: &[u8]) -> bool {
    let p = if path == b"." { &[][..] } else { path };
    plan.iter().any(|(q, s)| {
        let q = q.as_bytes();
        q == p
            || (*s == Scope::Subtree
                && (q.is_empty() || (p.len() > q.len() && p.starts_with(q) && p[q.len()] == b'/')))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rp(s: &str) -> RelPath {
        RelPath::new(s).expect("path")
    }

    fn write(p: &str) -> Op {
        Op::Write {
            path: rp(p),
            offset: 0,
            data: b"x".to_vec(),
        }
    }

    fn names(v: &[(RelPath, Scope)]) -> Vec<(String, Scope)> {
        v.iter()
            .map(|(p, s)| (String::from_utf8_lossy(p.as_bytes()).into_owned(), *s))
            .collect()
    }

    #[test]
    fn ops_name_what_they_change_and_the_directory_of_a_name_that_comes_or_goes() {
        let mut t = Vec::new();
        touched(&write("d/f"), &mut t);
        assert_eq!(names(&t), vec![("d/f".into(), Scope::Entry)]);
        t.clear();
        touched(
            &Op::Rename {
                from: rp("a/x"),
                to: rp("y"),
                flags: 0,
                from_ino: 1,
            },
            &mut t,
        );
        assert_eq!(
            names(&t),
            vec![
                ("a/x".into(), Scope::Subtree),
                ("a".into(), Scope::Entry),
                ("y".into(), Scope::Subtree),
                ("".into(), Scope::Entry),
            ]
        );
        t.clear();
        touched(
            &Op::Sync {
                mirror: 1,
                op: Box::new(Op::Unlink {
                    path: rp("z"),
                    nlink: 1,
                }),
            },
            &mut t,
        );
        assert_eq!(
            names(&t),
            vec![("z".into(), Scope::Subtree), ("".into(), Scope::Entry)]
        );
        t.clear();
        touched(&Op::GroupBegin, &mut t);
        touched(&Op::Abort { seq: 3 }, &mut t);
        assert!(t.is_empty());
    }

    #[test]
    fn a_mirror_verified_through_v_gets_exactly_the_paths_changed_after_v() {
        let mut d = DirtySet::new(0, 0, FloorReason::None);
        d.observe(1, &write("a"));
        d.observe(2, &write("b"));
        d.observe(3, &write("a"));
        d.observe(2, &write("stale")); // already seen: ignored
        d.observe(4, &Op::GroupEnd);
        assert_eq!(d.through, 4);
        assert_eq!(d.len(), 2);
        let since = |d: &DirtySet, v| d.changed_since(v, 0).map(|x| names(&x));
        assert_eq!(
            since(&d, 0),
            Ok(vec![("a".into(), Scope::Entry), ("b".into(), Scope::Entry)])
        );
        assert_eq!(since(&d, 2), Ok(vec![("a".into(), Scope::Entry)]));
        assert_eq!(since(&d, 4), Ok(vec![]));
        // Seqs that went backwards (another journal): no answer.
        assert_eq!(since(&d, 9), Err(FloorReason::Started));
        // Trimmed through 2: a mirror verified through 1 can no longer be told.
        d.trim(2);
        assert_eq!(d.floor, 2);
        assert_eq!(since(&d, 1), Err(FloorReason::Trimmed));
        assert_eq!(since(&d, 2), Ok(vec![("a".into(), Scope::Entry)]));
        // A trim never goes past what was observed.
        d.trim(100);
        assert_eq!((d.floor, d.len()), (4, 0));
    }

    #[test]
    fn the_bound_raises_the_floor_and_later_changes_are_kept_again() {
        let mut d = DirtySet::with_bounds(10, 0, FloorReason::None, 3, 1 << 20);
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            d.observe(11 + i as u64, &write(n));
        }
        assert_eq!((d.len(), d.floor), (3, 0));
        d.observe(14, &write("d"));
        assert_eq!(
            (d.len(), d.floor, d.floor_reason),
            (0, 14, FloorReason::Limit)
        );
        assert_eq!(d.changed_since(12, 0), Err(FloorReason::Limit));
        d.observe(15, &write("e"));
        assert_eq!(
            d.changed_since(14, 0).map(|x| names(&x)),
            Ok(vec![("e".into(), Scope::Entry)])
        );
        // Bytes bound too.
        let mut b = DirtySet::with_bounds(0, 0, FloorReason::None, 100, 4);
        b.observe(1, &write("abc"));
        b.observe(2, &write("defg"));
        assert_eq!((b.len(), b.floor), (0, 2));
        // A gap: what could not be read raises the floor.
        let mut g = DirtySet::new(5, 0, FloorReason::None);
        g.observe(6, &write("x"));
        g.gap(9);
        assert_eq!((g.floor, g.through, g.len()), (9, 9, 0));
        assert_eq!(g.changed_since(6, 0), Err(FloorReason::Gap));
    }

    #[test]
    fn the_set_and_the_state_round_trip_and_damage_is_refused() {
        let mut d = DirtySet::new(0, 0, FloorReason::None);
        d.observe(5, &write("d/é"));
        d.observe(
            6,
            &Op::Rename {
                from: rp("x"),
                to: rp("y/z"),
                flags: 0,
                from_ino: 0,
            },
        );
        d.drop_through(5, FloorReason::Unclean);
        let d = d.in_epoch(0xfeed, FloorReason::Behind);
        let b = d.encode();
        assert_eq!(DirtySet::decode(&b), Ok(d.clone()));
        for i in [0, 9, 20, b.len() - 1] {
            let mut bad = b.clone();
            bad[i] ^= 0x40;
            assert!(DirtySet::decode(&bad).is_err(), "byte {i} flipped");
        }
        assert!(DirtySet::decode(&b[..b.len() - 3]).is_err());
        let s = VerifyState {
            mirror: b"/backup/m".to_vec(),
            epoch: 77,
            verified: 6,
            since_full: 2,
            pending: vec![rp("a/b"), rp("c")],
        };
        let sb = s.encode();
        assert_eq!(VerifyState::decode(&sb), Ok(s));
        assert!(VerifyState::decode(&sb[..sb.len() - 1]).is_err());
        assert!(
            VerifyState::decode(&b).is_err(),
            "a dirty set is not a state"
        );
    }

    #[test]
    fn plans_keep_the_widest_scope_and_nothing_below_a_subtree() {
        let p = plan(vec![
            (rp("a/b/c"), Scope::Entry),
            (rp("a"), Scope::Entry),
            (rp("a/b"), Scope::Subtree),
            (rp("a/b"), Scope::Entry),
            (rp("a.txt"), Scope::Entry),
            (rp("a/bc"), Scope::Entry),
            (RelPath::root(), Scope::Entry),
        ]);
        assert_eq!(
            names(&p),
            vec![
                ("".into(), Scope::Entry),
                ("a".into(), Scope::Entry),
                ("a/b".into(), Scope::Subtree),
                ("a/bc".into(), Scope::Entry),
                ("a.txt".into(), Scope::Entry),
            ]
        );
        assert!(covers(&p, b"a/b/c/d"));
        assert!(covers(&p, b"."));
        assert!(!covers(&p, b"a/x"));
        let all = plan(vec![
            (RelPath::root(), Scope::Subtree),
            (rp("q"), Scope::Entry),
        ]);
        assert_eq!(names(&all), vec![("".into(), Scope::Subtree)]);
        assert!(covers(&all, b"q/r"));
    }

    #[test]
    fn decide_falls_back_to_full_whenever_the_record_cannot_answer() {
        let st = VerifyState {
            mirror: b"m".to_vec(),
            epoch: 0,
            verified: 10,
            since_full: 0,
            pending: vec![rp("p")],
        };
        let mut d = DirtySet::new(10, 3, FloorReason::Started);
        d.observe(11, &write("a/f"));
        assert_eq!(
            decide(Some(&st), Some(&d), true, 0),
            Mode::Full(FullReason::Asked)
        );
        assert_eq!(
            decide(None, Some(&d), false, 0),
            Mode::Full(FullReason::NoState)
        );
        assert_eq!(
            decide(Some(&st), None, false, 0),
            Mode::Full(FullReason::NoRecord)
        );
        match decide(Some(&st), Some(&d), false, 8) {
            Mode::Incremental(p) => assert_eq!(
                names(&p),
                vec![("a/f".into(), Scope::Entry), ("p".into(), Scope::Subtree)]
            ),
            m => panic!("{m:?}"),
        }
        let seventh = VerifyState {
            since_full: 7,
            ..st.clone()
        };
        assert_eq!(
            decide(Some(&seventh), Some(&d), false, 8),
            Mode::Full(FullReason::Periodic(8))
        );
        assert!(matches!(
            decide(Some(&seventh), Some(&d), false, 0),
            Mode::Incremental(_)
        ));
        // Verified in another epoch (before a crash): full, whatever the seqs say.
        let other = VerifyState {
            epoch: 5,
            ..st.clone()
        };
        let crashed = d.clone().in_epoch(6, FloorReason::Unclean);
        assert_eq!(
            decide(Some(&other), Some(&crashed), false, 0),
            Mode::Full(FullReason::Floor(FloorReason::Unclean))
        );
        d.observe(12, &write("b"));
        d.drop_through(12, FloorReason::Limit);
        assert_eq!(
            decide(Some(&st), Some(&d), false, 0),
            Mode::Full(FullReason::Floor(FloorReason::Limit))
        );
    }

    /// Seeded: random journals (every kind of op, gaps, the bound, trims as the mount does them,
    /// restarts after a crash (a new epoch),
    /// encode/decode on the way) and verifies of two mirrors at random points. Whenever `decide`
    /// says incremental, its plan covers every path every record since that mirror's last
    /// verify touched (a subtree scope by a subtree of the plan), and every path left pending.
    #[test]
    fn seeded_an_incremental_plan_never_misses_a_change() {
        const NAMES: [&str; 7] = ["a", "a/b", "a/b/c", "a/bc", "d", "d/e", "f"];
        let (mut incremental, mut full, mut restarts) = (0, 0, 0);
        for seed in 1..=300u64 {
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut rnd = |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            let max_paths = 2 + rnd(12) as usize;
            let mut d = DirtySet::with_bounds(0, 0, FloorReason::None, max_paths, 1 << 20);
            let mut log: Vec<(u64, Op)> = Vec::new();
            let mut states: [Option<VerifyState>; 2] = [None, None];
            let full_every = rnd(4) as u32;
            for seq in 1..=200u64 {
                let p = rp(NAMES[rnd(NAMES.len() as u64) as usize]);
                let q = rp(NAMES[rnd(NAMES.len() as u64) as usize]);
                let op = match rnd(9) {
                    0 => write(std::str::from_utf8(p.as_bytes()).expect("utf-8")),
                    1 => Op::Create {
                        path: p,
                        mode: 0o644,
                        uid: 0,
                        gid: 0,
                    },
                    2 => Op::Unlink { path: p, nlink: 1 },
                    3 => Op::Rename {
                        from: p,
                        to: q,
                        flags: 0,
                        from_ino: 0,
                    },
                    4 => Op::SetMode {
                        path: p,
                        mode: 0o600,
                    },
                    5 => Op::Link { from: p, to: q },
                    6 => Op::Sync {
                        mirror: 1,
                        op: Box::new(Op::Rmdir { path: p }),
                    },
                    7 => Op::GroupBegin,
                    _ => Op::Abort { seq: seq - 1 },
                };
                log.push((seq, op.clone()));
                if rnd(40) == 0 {
                    d.gap(seq); // released before it was read
                } else {
                    d.observe(seq, &op);
                }
                if rnd(25) == 0 {
                    d = DirtySet::decode(&d.encode()).expect("round trip");
                    // Decoding keeps the default bounds: restore this run's.
                    d.max_paths = max_paths;
                }
                if rnd(60) == 0 {
                    // A restart after a crash: a new epoch (what happened while down has no
                    // record), the bounds of this run kept.
                    let epoch = d.epoch + 1;
                    d = DirtySet::with_bounds(
                        d.through,
                        d.through,
                        FloorReason::Unclean,
                        max_paths,
                        1 << 20,
                    )
                    .in_epoch(epoch, FloorReason::Unclean);
                    restarts += 1;
                }
                if rnd(10) == 0 {
                    // The mount's trim: the oldest verify on record, or everything.
                    let oldest = states.iter().flatten().map(|s| s.verified).min();
                    d.trim(oldest.unwrap_or(d.through));
                }
                if rnd(6) != 0 {
                    continue;
                }
                let m = rnd(2) as usize;
                let mode = decide(states[m].as_ref(), Some(&d), rnd(15) == 0, full_every);
                let since_full = match (&mode, &states[m]) {
                    (Mode::Incremental(plan), Some(st)) => {
                        incremental += usize::from(!plan.is_empty());
                        assert_eq!(st.epoch, d.epoch, "seed {seed}: verified before a restart");
                        for (s, op) in log.iter().filter(|(s, _)| *s > st.verified) {
                            let mut t = Vec::new();
                            touched(op, &mut t);
                            for (path, scope) in t {
                                let sub = plan
                                    .iter()
                                    .any(|(q, qs)| *qs == Scope::Subtree && path.starts_with(q));
                                let ok = match scope {
                                    Scope::Subtree => sub,
                                    Scope::Entry => sub || plan.iter().any(|(q, _)| *q == path),
                                };
                                assert!(ok, "seed {seed}: record {s} ({op:?}) touched {path:?} ({scope:?}), not in the plan {plan:?} of a mirror verified through {}", st.verified);
                            }
                        }
                        for p in &st.pending {
                            assert!(
                                plan.iter()
                                    .any(|(q, qs)| *qs == Scope::Subtree && p.starts_with(q)),
                                "seed {seed}: pending {p:?}"
                            );
                        }
                        st.since_full + 1
                    }
                    (Mode::Incremental(_), None) => {
                        panic!("seed {seed}: incremental without a state")
                    }
                    (Mode::Full(_), _) => {
                        full += 1;
                        0
                    }
                };
                // Some paths still differ after this verify.
                let pending = (0..rnd(3))
                    .map(|_| rp(NAMES[rnd(NAMES.len() as u64) as usize]))
                    .collect();
                states[m] = Some(VerifyState {
                    mirror: vec![b'0' + m as u8],
                    epoch: d.epoch,
                    verified: d.through,
                    since_full,
                    pending,
                });
            }
        }
        // Both ways were taken, often.
        assert!(
            incremental > 1_000 && full > 500 && restarts > 100,
            "{incremental} incremental, {full} full, {restarts} restarts"
        );
    }
}
