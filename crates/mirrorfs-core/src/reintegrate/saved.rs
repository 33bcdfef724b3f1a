//! A reintegration plan and its step cursor as they are kept on disk, so that a primary that
//! crashes part way through re-runs from the step in doubt instead of planning again (a second
//! plan would see its own first half as changes of ours). Sans-IO: bytes in, bytes out.
//!
//! # Plan file (`STATE/reintegration/plan`), written once, fsynced with its directory
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `MFRP` |
//! | 4 | 2 | version (1) |
//! | 6 | 8 | `id`: random, names this plan in the cursor |
//! | 14 | 8 | their generation id at the divergence (their history's current) |
//! | 22 | 8 | the common point's seq |
//! | 30 | 8 | their end (their last record) |
//! | 38 | 8 | our last record the plan saw |
//! | 46 | 2+n | the conflict label (u16 length, UTF-8) |
//! | … | 2+n | their site's name |
//! | … | 4 | step count, then each step: tag (1 Rename, 2 Remove, 3 Mkdir, 4 CopyFromTheirs, 5 ConflictCopy), its paths (u16 length + bytes each), a `ConflictCopy`'s reason (u8) |
//! | … | 4 | conflict count, then each: path, has-copy (u8), copy path if any, reason (u8) |
//! | end−4 | 4 | crc32c of everything before |
//!
//! # Moves file (`STATE/reintegration/moves`), appended and fsynced per move
//!
//! Each late move of the run (`run::Action::Moved`): `from` and `to` (u16 length + bytes each),
//! then a crc32c of them. Read up to the first torn or damaged entry. `from` equal to `to` is a
//! hold, not a move: a rename of the run carried a change of ours made after the plan there.
//!
//! # Cursor file (`STATE/reintegration/cursor`): two 32-byte slots, written alternately
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | write generation (the slot with the higher valid one counts) |
//! | 8 | 8 | plan id |
//! | 16 | 8 | steps done |
//! | 24 | 4 | crc32c of bytes 0..24 |
//! | 28 | 4 | zero |
//!
//! A slot is overwritten only after the other one holds the previous position, so a torn write
//! leaves the previous position readable: the step in doubt is re-run (every step is
//! idempotent against its own effect), never one before it.

use super::{Conflict, Plan, Reason, Step};
use crate::path::RelPath;

const PLAN_MAGIC: [u8; 4] = *b"MFRP";
const PLAN_VERSION: u16 = 1;
/// Size of one cursor slot.
pub const CURSOR_SLOT_BYTES: usize = 32;
/// Most steps (and conflicts) a saved plan may hold; a larger one is refused as corrupt.
pub const SAVED_STEPS_MAX: u32 = 10_000_000;

/// A plan being carried out, and what it was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedPlan {
    pub id: u64,
    pub their_generation: u64,
    pub common_seq: u64,
    pub their_end: u64,
    pub our_end: u64,
    pub label: String,
    pub their_site: String,
    pub plan: Plan,
}

impl SavedPlan {
    /// True if this plan was made for the same divergence: their copy is unchanged since, so
    /// the plan still holds.
    pub fn matches(&self, their_generation: u64, common_seq: u64, their_end: u64) -> bool {
        (self.their_generation, self.common_seq, self.their_end)
            == (their_generation, common_seq, their_end)
    }
}

/// Why saved bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SavedError {
    #[error("not a reintegration plan (bad magic or version)")]
    Magic,
    #[error("checksum mismatch")]
    Checksum,
    #[error("ends early")]
    Truncated,
    #[error("invalid: {0}")]
    Invalid(&'static str),
}

fn reason_code(r: Reason) -> u8 {
    match r {
        Reason::BothModified => 1,
        Reason::BothCreated => 2,
        Reason::TheyDeleted => 3,
        Reason::WeDeleted => 4,
        Reason::BothRenamed => 5,
        Reason::DirRemovedFilled => 6,
        Reason::DirAttributes => 7,
        Reason::NameTaken => 8,
        Reason::RenameCycle => 9,
        Reason::ChangedDuringReintegration => 10,
    }
}

fn reason_of(c: u8) -> Result<Reason, SavedError> {
    Ok(match c {
        1 => Reason::BothModified,
        2 => Reason::BothCreated,
        3 => Reason::TheyDeleted,
        4 => Reason::WeDeleted,
        5 => Reason::BothRenamed,
        6 => Reason::DirRemovedFilled,
        7 => Reason::DirAttributes,
        8 => Reason::NameTaken,
        9 => Reason::RenameCycle,
        10 => Reason::ChangedDuringReintegration,
        _ => return Err(SavedError::Invalid("unknown reason")),
    })
}

struct Out(Vec<u8>);

impl Out {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        // Paths are at most PATH_BYTES_MAX (< 64 KiB), names and labels short.
        let n = b.len().min(u16::MAX as usize);
        self.0.extend_from_slice(&(n as u16).to_le_bytes());
        self.0.extend_from_slice(&b[..n]);
    }
    fn path(&mut self, p: &RelPath) {
        self.bytes(p.as_bytes());
    }
}

struct In<'a>(&'a [u8]);

impl In<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], SavedError> {
        if self.0.len() < n {
            return Err(SavedError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, SavedError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, SavedError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, SavedError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, SavedError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, SavedError> {
        let n = self.u16()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn text(&mut self) -> Result<String, SavedError> {
        String::from_utf8(self.bytes()?).map_err(|_| SavedError::Invalid("text is not UTF-8"))
    }
    fn path(&mut self) -> Result<RelPath, SavedError> {
        RelPath::new(self.bytes()?).map_err(|_| SavedError::Invalid("bad path"))
    }
    fn count(&mut self) -> Result<u32, SavedError> {
        let n = self.u32()?;
        if n > SAVED_STEPS_MAX {
            return Err(SavedError::Invalid("too many steps"));
        }
        Ok(n)
    }
}

/// The plan file's bytes.
pub fn encode_plan(s: &SavedPlan) -> Vec<u8> {
    let mut o = Out(Vec::new());
    o.0.extend_from_slice(&PLAN_MAGIC);
    o.0.extend_from_slice(&PLAN_VERSION.to_le_bytes());
    for v in [
        s.id,
        s.their_generation,
        s.common_seq,
        s.their_end,
        s.our_end,
    ] {
        o.u64(v);
    }
    o.bytes(s.label.as_bytes());
    o.bytes(s.their_site.as_bytes());
    o.u32(s.plan.steps.len() as u32);
    for step in &s.plan.steps {
        match step {
            Step::Rename { from, to } => {
                o.0.push(1);
                o.path(from);
                o.path(to);
            }
            Step::Remove { our_path } => {
                o.0.push(2);
                o.path(our_path);
            }
            Step::Mkdir {
                their_path,
                our_path,
            } => {
                o.0.push(3);
                o.path(their_path);
                o.path(our_path);
            }
            Step::CopyFromTheirs {
                their_path,
                our_path,
            } => {
                o.0.push(4);
                o.path(their_path);
                o.path(our_path);
            }
            Step::ConflictCopy {
                their_path,
                path,
                copy,
                reason,
            } => {
                o.0.push(5);
                o.path(their_path);
                o.path(path);
                o.path(copy);
                o.0.push(reason_code(*reason));
            }
        }
    }
    o.u32(s.plan.conflicts.len() as u32);
    for c in &s.plan.conflicts {
        o.path(&c.path);
        match &c.copy {
            Some(copy) => {
                o.0.push(1);
                o.path(copy);
            }
            None => o.0.push(0),
        }
        o.0.push(reason_code(c.reason));
    }
    let crc = crc32c::crc32c(&o.0);
    o.u32(crc);
    o.0
}

/// Reads a plan file; anything but an intact one is an error.
pub fn decode_plan(b: &[u8]) -> Result<SavedPlan, SavedError> {
    if b.len() < 10 || b[..4] != PLAN_MAGIC || b[4..6] != PLAN_VERSION.to_le_bytes() {
        return Err(SavedError::Magic);
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err(SavedError::Checksum);
    }
    let mut i = In(&body[6..]);
    let (id, their_generation, common_seq, their_end, our_end) =
        (i.u64()?, i.u64()?, i.u64()?, i.u64()?, i.u64()?);
    let label = i.text()?;
    let their_site = i.text()?;
    let mut plan = Plan::default();
    for _ in 0..i.count()? {
        let step = match i.u8()? {
            1 => Step::Rename {
                from: i.path()?,
                to: i.path()?,
            },
            2 => Step::Remove {
                our_path: i.path()?,
            },
            3 => Step::Mkdir {
                their_path: i.path()?,
                our_path: i.path()?,
            },
            4 => Step::CopyFromTheirs {
                their_path: i.path()?,
                our_path: i.path()?,
            },
            5 => Step::ConflictCopy {
                their_path: i.path()?,
                path: i.path()?,
                copy: i.path()?,
                reason: reason_of(i.u8()?)?,
            },
            _ => return Err(SavedError::Invalid("unknown step")),
        };
        plan.steps.push(step);
    }
    for _ in 0..i.count()? {
        let path = i.path()?;
        let copy = match i.u8()? {
            0 => None,
            1 => Some(i.path()?),
            _ => return Err(SavedError::Invalid("bad copy flag")),
        };
        let reason = reason_of(i.u8()?)?;
        plan.conflicts.push(Conflict { path, copy, reason });
    }
    if !i.0.is_empty() {
        return Err(SavedError::Invalid("trailing bytes"));
    }
    Ok(SavedPlan {
        id,
        their_generation,
        common_seq,
        their_end,
        our_end,
        label,
        their_site,
        plan,
    })
}

/// One cursor slot: `done` steps of plan `plan_id`, written as generation `generation`.
pub fn encode_cursor(generation: u64, plan_id: u64, done: u64) -> [u8; CURSOR_SLOT_BYTES] {
    let mut b = [0u8; CURSOR_SLOT_BYTES];
    b[0..8].copy_from_slice(&generation.to_le_bytes());
    b[8..16].copy_from_slice(&plan_id.to_le_bytes());
    b[16..24].copy_from_slice(&done.to_le_bytes());
    let crc = crc32c::crc32c(&b[..24]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The position the cursor file holds for plan `plan_id`: (write generation, steps done) of
/// the newest intact slot naming it; `None` if no slot does (nothing done yet).
pub fn decode_cursor(file: &[u8], plan_id: u64) -> Option<(u64, u64)> {
    file.chunks_exact(CURSOR_SLOT_BYTES)
        .take(2)
        .filter_map(|s| {
            let crc = u32::from_le_bytes([s[24], s[25], s[26], s[27]]);
            if crc32c::crc32c(&s[..24]) != crc {
                return None;
            }
            let word = |i: usize| {
                let mut a = [0u8; 8];
                a.copy_from_slice(&s[i..i + 8]);
                u64::from_le_bytes(a)
            };
            (word(8) == plan_id).then(|| (word(0), word(16)))
        })
        .max_by_key(|(generation, _)| *generation)
}

/// One late move ([`super::run::Action::Moved`]) as appended to `reintegration/moves`: `from`
/// and `to` (each a u16 length and the bytes), then the crc32c of those bytes.
pub fn encode_move(from: &RelPath, to: &RelPath) -> Vec<u8> {
    let mut o = Out(Vec::new());
    o.path(from);
    o.path(to);
    let crc = crc32c::crc32c(&o.0);
    o.u32(crc);
    o.0
}

/// The moves of a `moves` file, up to the first torn or damaged entry (a move is appended and
/// fsynced before the run goes on, so only the last one can be torn).
pub fn decode_moves(b: &[u8]) -> Vec<(RelPath, RelPath)> {
    let mut out = Vec::new();
    let mut i = In(b);
    loop {
        let start = i.0;
        let (Ok(from), Ok(to)) = (i.path(), i.path()) else {
            return out;
        };
        let used = start.len() - i.0.len();
        match i.u32() {
            Ok(crc) if crc == crc32c::crc32c(&start[..used]) => out.push((from, to)),
            _ => return out,
        }
    }
}

/// The slot (0 or 1) write generation `generation` goes to.
pub fn cursor_slot(generation: u64) -> usize {
    (generation % 2) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("path")
    }

    fn sample() -> SavedPlan {
        SavedPlan {
            id: 7,
            their_generation: 11,
            common_seq: 100,
            their_end: 140,
            our_end: 133,
            label: "conflict-b-20261204-120000".into(),
            their_site: "b".into(),
            plan: Plan {
                steps: vec![
                    Step::Rename {
                        from: p("a"),
                        to: p(".mirrorfs-reint-1"),
                    },
                    Step::Remove {
                        our_path: p("d/\u{e9}"),
                    },
                    Step::Mkdir {
                        their_path: p("n"),
                        our_path: p("n"),
                    },
                    Step::CopyFromTheirs {
                        their_path: p("x"),
                        our_path: p("y"),
                    },
                    Step::ConflictCopy {
                        their_path: p("z"),
                        path: p("z"),
                        copy: p("z.conflict-b-20261204-120000"),
                        reason: Reason::BothModified,
                    },
                ],
                conflicts: vec![
                    Conflict {
                        path: p("z"),
                        copy: Some(p("z.conflict-b-20261204-120000")),
                        reason: Reason::BothModified,
                    },
                    Conflict {
                        path: p("q"),
                        copy: None,
                        reason: Reason::TheyDeleted,
                    },
                ],
            },
        }
    }

    #[test]
    fn a_plan_round_trips_and_any_damage_is_refused() {
        let s = sample();
        let b = encode_plan(&s);
        assert_eq!(decode_plan(&b), Ok(s));
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x40;
            assert!(decode_plan(&bad).is_err(), "a flip at byte {i} was taken");
        }
        for n in 0..b.len() {
            assert!(decode_plan(&b[..n]).is_err(), "a cut at {n} was taken");
        }
    }

    #[test]
    fn moves_are_read_up_to_a_torn_entry() {
        let mut f = encode_move(&p("a"), &p("a.conflict-b-1-late-0"));
        f.extend(encode_move(&p("d/e"), &p("e.conflict-b-1-late-3")));
        let whole = decode_moves(&f);
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[1], (p("d/e"), p("e.conflict-b-1-late-3")));
        let torn = &f[..f.len() - 3];
        assert_eq!(decode_moves(torn), whole[..1].to_vec());
        let mut bad = f.clone();
        let n = bad.len();
        bad[n - 6] ^= 1;
        assert_eq!(decode_moves(&bad), whole[..1].to_vec());
    }

    #[test]
    fn the_cursor_keeps_the_newest_intact_slot_of_its_plan() {
        let mut f = [0u8; 2 * CURSOR_SLOT_BYTES];
        assert_eq!(decode_cursor(&f, 7), None);
        for (generation, done) in [(1u64, 1u64), (2, 2), (3, 3)] {
            let at = cursor_slot(generation) * CURSOR_SLOT_BYTES;
            f[at..at + CURSOR_SLOT_BYTES].copy_from_slice(&encode_cursor(generation, 7, done));
        }
        assert_eq!(decode_cursor(&f, 7), Some((3, 3)));
        // A torn write of generation 4 (slot 0) leaves generation 3 readable.
        let at = cursor_slot(4) * CURSOR_SLOT_BYTES;
        f[at..at + 12].copy_from_slice(&encode_cursor(4, 7, 4)[..12]);
        assert_eq!(decode_cursor(&f, 7), Some((3, 3)));
        // Another plan's cursor says nothing about this one.
        assert_eq!(decode_cursor(&f, 8), None);
    }
}
