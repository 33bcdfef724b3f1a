//! The primary side of the simulation: a reference tree that never crashes, a seeded workload of
//! ops that are each valid in the reference's current state, and the history of states by seq.

use super::fs::{EntryInfo, FsState, SimTree};
use super::SimRng;
use crate::op::{rename_flags, Op, Timespec};
use crate::path::RelPath;
use crate::tree::{apply_op, EntryKind};

const NAMES: [&[u8]; 6] = [b"a", b"b", b"c", b"d", b"e", b"f"];
const MAX_DEPTH: usize = 3;
/// Beyond this many entries the workload prefers removals.
const CROWDED: usize = 40;
const FILE_BYTES_MAX: u64 = 48 << 10;

/// The next op of the workload.
#[derive(Debug, Clone)]
pub struct Planned {
    pub op: Op,
    /// False: the op fails on the primary (no effect) and must be followed by its `Abort`.
    pub ok: bool,
}

/// The primary: a reference tree (never crashes) and, for every journal seq, the op and the
/// reference state after it.
pub struct Primary {
    pub tree: SimTree,
    /// `history[s]`: the state after record `s` (`history[0]`: the empty tree).
    history: Vec<FsState>,
    /// `ops[s]`: record `s` and whether it changed the reference (false for aborted ops and
    /// `Abort` records).
    ops: Vec<Option<(Op, bool)>>,
}

impl Default for Primary {
    fn default() -> Self {
        Self::new()
    }
}

impl Primary {
    pub fn new() -> Self {
        let tree = SimTree::reference();
        Primary {
            history: vec![tree.state().clone()],
            ops: vec![None],
            tree,
        }
    }

    /// Seq of the last record.
    pub fn last_seq(&self) -> u64 {
        self.history.len() as u64 - 1
    }

    /// The reference state after record `seq`.
    pub fn state_at(&self, seq: u64) -> Option<&FsState> {
        self.history.get(seq as usize)
    }

    pub fn op_at(&self, seq: u64) -> Option<&Op> {
        self.ops
            .get(seq as usize)
            .and_then(|o| o.as_ref())
            .map(|o| &o.0)
    }

    /// Records that `op` was journaled as the next seq; for `ok` ops the reference already holds
    /// its effect (see [`Primary::plan`]).
    pub fn record(&mut self, op: Op, ok: bool) {
        self.ops.push(Some((op, ok)));
        self.history.push(self.tree.state().clone());
    }

    /// Undoes a planned op that did not make it into the journal.
    pub fn unplan(&mut self) {
        if let Some(s) = self.history.last() {
            self.tree.set_state(s.clone());
        }
    }

    /// Forgets every record after `seq` (lost in a crash) and rolls the reference back.
    pub fn rollback(&mut self, seq: u64) {
        self.history.truncate(seq as usize + 1);
        self.ops.truncate(seq as usize + 1);
        self.unplan();
    }

    /// True if record `seq` is an op that failed on the primary and its `Abort` is not journaled.
    pub fn needs_abort(&self, seq: u64) -> bool {
        seq == self.last_seq()
            && matches!(self.ops.get(seq as usize), Some(Some((op, false))) if !matches!(op, Op::Abort { .. }))
    }

    /// Picks the next op. An `ok` op has been applied to the reference already (it is valid in
    /// the reference's state, so it can be applied there strictly); undo with [`Primary::unplan`]
    /// if it cannot be journaled.
    pub fn plan(&mut self, rng: &mut SimRng<'_>) -> Option<Planned> {
        let fail = rng.chance(1, 40);
        for _ in 0..40 {
            let Some(op) = self.candidate(rng) else {
                continue;
            };
            if fail {
                return Some(Planned { op, ok: false });
            }
            if apply_op(&mut self.tree, &op, false).is_ok() {
                return Some(Planned { op, ok: true });
            }
        }
        None
    }

    fn candidate(&mut self, rng: &mut SimRng<'_>) -> Option<Op> {
        let all = self.tree.state().walk();
        let crowded = all.len() > CROWDED;
        let nonroot: Vec<&EntryInfo> = all.iter().filter(|e| !e.path.is_root()).collect();
        let files: Vec<&EntryInfo> = all.iter().filter(|e| e.kind == EntryKind::File).collect();
        let nondirs: Vec<&EntryInfo> = nonroot
            .iter()
            .copied()
            .filter(|e| e.kind != EntryKind::Dir)
            .collect();
        let dirs: Vec<&EntryInfo> = all
            .iter()
            .filter(|e| e.kind == EntryKind::Dir && e.depth < MAX_DEPTH)
            .collect();
        let empty_dirs: Vec<&EntryInfo> = nonroot
            .iter()
            .copied()
            .filter(|e| e.kind == EntryKind::Dir && e.empty)
            .collect();
        let xattr_able: Vec<&EntryInfo> = all
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::File | EntryKind::Dir))
            .collect();
        let grow = if crowded { 1 } else { 4 };
        let shrink = if crowded { 6 } else { 1 };
        let weights = [
            3 * grow,   // 0 create
            grow,       // 1 mkdir
            1,          // 2 mknod
            grow,       // 3 symlink
            14,         // 4 write
            3,          // 5 truncate
            1,          // 6 fallocate
            3,          // 7 link
            4 * shrink, // 8 unlink
            2 * shrink, // 9 rmdir
            10,         // 10 rename
            2,          // 11 chmod
            1,          // 12 chown
            1,          // 13 utimes
            3,          // 14 setxattr
            1,          // 15 removexattr
        ];
        let owner = |rng: &mut SimRng<'_>| (rng.below(3) as u32 * 1000, rng.below(3) as u32 * 1000);
        let op = match rng.weighted(&weights) {
            0 => {
                let (uid, gid) = owner(rng);
                Op::Create {
                    path: new_path(rng, &dirs)?,
                    mode: *rng.pick(&[0o644, 0o600, 0o755, 0o4755, 0o2755, 0o640])?,
                    uid,
                    gid,
                }
            }
            1 => {
                let (uid, gid) = owner(rng);
                Op::Mkdir {
                    path: new_path(rng, &dirs)?,
                    mode: *rng.pick(&[0o755, 0o700, 0o2775, 0o1777])?,
                    uid,
                    gid,
                }
            }
            2 => {
                let (uid, gid) = owner(rng);
                let (mode, rdev) = *rng.pick(&[(0o010_644, 0), (0o020_600, 0x103)])?;
                Op::Mknod {
                    path: new_path(rng, &dirs)?,
                    mode,
                    rdev,
                    uid,
                    gid,
                }
            }
            3 => {
                let (uid, gid) = owner(rng);
                let target: &[u8] = rng.pick(&[&b"a"[..], b"../b", b"/etc/passwd", b"c/d/e"])?;
                Op::Symlink {
                    path: new_path(rng, &dirs)?,
                    target: target.to_vec(),
                    uid,
                    gid,
                }
            }
            4 => {
                let f = rng.pick(&files)?;
                let len = match rng.below(20) {
                    0 => rng.range(3000, 9000),
                    1..=5 => rng.range(200, 3000),
                    _ => rng.range(1, 200),
                };
                let offset = match rng.below(10) {
                    0..=4 => rng.range(0, f.size),
                    5..=7 => f.size + rng.range(0, 6000),
                    _ => rng.range(0, 20_000),
                }
                .min(FILE_BYTES_MAX - len);
                Op::Write {
                    path: f.path.clone(),
                    offset,
                    data: bytes(rng, len as usize),
                }
            }
            5 => {
                let f = rng.pick(&files)?;
                Op::Truncate {
                    path: f.path.clone(),
                    size: rng.range(0, f.size + 5000).min(FILE_BYTES_MAX),
                }
            }
            6 => {
                let f = rng.pick(&files)?;
                Op::Fallocate {
                    path: f.path.clone(),
                    mode: *rng.pick(&[0, 1, 3, 0x10, 0x11])?,
                    offset: rng.range(0, f.size + 4096),
                    len: rng.range(1, 8192),
                }
            }
            7 => Op::Link {
                from: rng.pick(&nondirs)?.path.clone(),
                to: new_path(rng, &dirs)?,
            },
            8 => {
                let e = rng.pick(&nondirs)?;
                Op::Unlink {
                    path: e.path.clone(),
                    nlink: e.nlink,
                }
            }
            9 => Op::Rmdir {
                path: match rng.pick(&empty_dirs) {
                    Some(d) if rng.chance(4, 5) => d.path.clone(),
                    _ => rng.pick(&nonroot)?.path.clone(),
                },
            },
            10 => {
                let from = rng.pick(&nonroot)?;
                let flags =
                    *rng.pick(&[0, 0, 0, rename_flags::NOREPLACE, rename_flags::EXCHANGE])?;
                let to = match rng.below(10) {
                    0..=3 => new_path(rng, &dirs)?,
                    4 => {
                        // Another name of the same inode: rename does nothing.
                        let same: Vec<&EntryInfo> = nonroot
                            .iter()
                            .copied()
                            .filter(|e| e.ino == from.ino && e.path != from.path)
                            .collect();
                        rng.pick(&same).or(rng.pick(&nonroot))?.path.clone()
                    }
                    _ => rng.pick(&nonroot)?.path.clone(),
                };
                Op::Rename {
                    from: from.path.clone(),
                    to,
                    flags,
                    from_ino: from.ino,
                }
            }
            11 => {
                let e = rng.pick(&all)?;
                if e.kind == EntryKind::Symlink {
                    return None;
                }
                Op::SetMode {
                    path: e.path.clone(),
                    mode: *rng.pick(&[0o644, 0o600, 0o755, 0o4755, 0o2711, 0o1777, 0o000])?,
                }
            }
            12 => {
                let e = rng.pick(&all)?;
                let (uid, gid) = owner(rng);
                let (uid, gid) = match rng.below(3) {
                    0 => (Some(uid), None),
                    1 => (None, Some(gid)),
                    _ => (Some(uid), Some(gid)),
                };
                Op::SetOwner {
                    path: e.path.clone(),
                    uid,
                    gid,
                }
            }
            13 => {
                let e = rng.pick(&all)?;
                let mut t = || Timespec {
                    sec: rng.range(0, 2_000_000_000) as i64,
                    nsec: rng.below(1_000_000_000) as u32,
                };
                let (atime, mtime) = (t(), t());
                let (atime, mtime) = match rng.below(3) {
                    0 => (Some(atime), None),
                    1 => (None, Some(mtime)),
                    _ => (Some(atime), Some(mtime)),
                };
                Op::SetTimes {
                    path: e.path.clone(),
                    atime,
                    mtime,
                }
            }
            14 => {
                let e = rng.pick(&xattr_able)?;
                let name: &[u8] = rng.pick(&[&b"user.a"[..], b"user.b", b"user.c"])?;
                let len = rng.below(24) as usize;
                Op::SetXattr {
                    path: e.path.clone(),
                    name: name.to_vec(),
                    value: bytes(rng, len),
                    flags: *rng.pick(&[0, 0, 1, 2])?,
                }
            }
            _ => {
                let e = rng.pick(&xattr_able)?;
                let name = match rng.pick(&e.xattr_names) {
                    Some(n) if rng.chance(4, 5) => n.clone(),
                    _ => b"user.c".to_vec(),
                };
                Op::RemoveXattr {
                    path: e.path.clone(),
                    name,
                }
            }
        };
        Some(op)
    }
}

/// A new name in one of `dirs` (it may exist: the op is then rejected by the reference).
fn new_path(rng: &mut SimRng<'_>, dirs: &[&EntryInfo]) -> Option<RelPath> {
    let d = rng.pick(dirs)?;
    let name = rng.pick(&NAMES)?;
    d.path.join(name).ok()
}

/// `len` pseudo-random bytes (a cheap generator seeded from `rng`).
fn bytes(rng: &mut SimRng<'_>, len: usize) -> Vec<u8> {
    let mut x = rng.u64() | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
