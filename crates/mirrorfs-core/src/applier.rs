//! The mirror applier: applies journal records to one mirror tree strictly in order, keeping a
//! durable cursor so that after any crash the tree can be brought back to a state the primary had.
//!
//! State kept per mirror (the *cursor*, two checksummed 64-byte slots, see `docs/journal.md`):
//! - `checkpoint`: every record ≤ it is durable in the tree (written with fsync, **B2**, right after
//!   a tree `sync`, **B1**);
//! - `applied`: the last record applied, written without fsync once per batch of records
//!   ([`Applier::write_applied`]: the worker writes it after at most [`APPLIED_BATCH`] records
//!   and whenever the feed runs dry) and with every other cursor write; a lower bound of what
//!   the tree holds after a process crash (exact after a clean stop), a lower bound or lost
//!   after a power loss;
//! - `intent`: set durably just before a barrier op is applied, with the inode numbers needed to
//!   tell afterwards whether it was.
//!
//! Recovery: after a process crash, resume at `applied + 1`; after a power loss, at
//! `checkpoint + 1`. Records up to the journal's last record at start-up (the *horizon*) are
//! replayed idempotently (`tree::apply_op` replay mode). The stored `applied` may trail what the
//! tree holds (it is written per batch): the records between are re-applied in replay mode like
//! a power loss's window, of which they are a suffix (`checkpoint ≤ stored applied`: every write
//! carries both), so the same argument makes that replay idempotent. Barrier ops ([`Op::needs_barrier`]) are
//! bracketed by checkpoints, so a replay window never holds one except first, in doubt, where the
//! intent decides. A [`Op::Link`] is preceded by a checkpoint, so a replay window never holds it
//! after records that used its new name for another file.

use crate::op::{Op, Record};
use crate::tree::{apply_op, Tree, TreeError};

/// The durable position of a mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub checkpoint: u64,
    pub applied: u64,
    pub intent: Option<Intent>,
}

/// Inode numbers saved before a barrier op is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intent {
    pub seq: u64,
    /// Inode of the op's source (`from` of a rename, the unlinked path) before the op.
    pub src_ino: Option<u64>,
}

impl Intent {
    /// What to note (durably, before the op is applied) about record `seq`'s barrier `op` on
    /// `tree` so that [`Intent::done`] tells afterwards whether it was applied. Used by the
    /// mirror applier and by a writable site for its peer's records (`net::peer`, where a
    /// record comes again after a crash before its acknowledgement).
    pub fn before<T: Tree + ?Sized>(tree: &mut T, seq: u64, op: &Op) -> Result<Intent, TreeError> {
        let src_ino = match barrier_source(op) {
            Some(p) => tree.ino(p)?,
            None => None,
        };
        Ok(Intent { seq, src_ino })
    }

    /// Was `op`, noted as this intent before it was applied, applied to `tree`? A rename (an
    /// exchange too) is done once its target holds the inode its source held; an unlink once
    /// its name no longer holds that inode. Anything else: not known to be done (`false`).
    pub fn done<T: Tree + ?Sized>(&self, tree: &mut T, op: &Op) -> Result<bool, TreeError> {
        match op {
            Op::Rename { to, from, .. } => {
                let Some(src) = self.src_ino else {
                    return Ok(tree.kind(from)?.is_none());
                };
                // After the rename (or exchange), `to` holds the inode that was at `from`;
                // before an exchange it holds the other entry.
                Ok(tree.ino(to)? == Some(src))
            }
            Op::Unlink { path, .. } => {
                Ok(tree.ino(path)? != self.src_ino || self.src_ino.is_none())
            }
            _ => Ok(false),
        }
    }
}

pub const CURSOR_SLOT_BYTES: usize = 64;
/// The most records applied before the cursor's `applied` is written (the worker writes it
/// sooner when the feed runs dry): what a process crash may re-apply in replay mode on top of
/// the power loss's window, which it is part of.
pub const APPLIED_BATCH: u64 = 64;
const CURSOR_MAGIC: u32 = 0x5243_464D; // "MFCR"
const NONE: u64 = u64::MAX;

/// Encodes a cursor slot. Layout (little-endian):
/// `magic u32 | version u16 | flags u16 | generation u64 | checkpoint u64 | applied u64 |
///  intent_seq u64 | intent_src_ino u64 | reserved [u8; 12] | crc32c u32` (of bytes 0..60).
pub fn encode_cursor(c: &Cursor, generation: u64) -> [u8; CURSOR_SLOT_BYTES] {
    let mut b = [0u8; CURSOR_SLOT_BYTES];
    b[0..4].copy_from_slice(&CURSOR_MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&1u16.to_le_bytes());
    b[8..16].copy_from_slice(&generation.to_le_bytes());
    b[16..24].copy_from_slice(&c.checkpoint.to_le_bytes());
    b[24..32].copy_from_slice(&c.applied.to_le_bytes());
    let (iseq, iino) = match c.intent {
        Some(i) => (i.seq, i.src_ino.unwrap_or(NONE)),
        None => (NONE, NONE),
    };
    b[32..40].copy_from_slice(&iseq.to_le_bytes());
    b[40..48].copy_from_slice(&iino.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a cursor slot; `None` if it is blank, torn or corrupt.
pub fn decode_cursor(b: &[u8]) -> Option<(u64, Cursor)> {
    if b.len() < CURSOR_SLOT_BYTES {
        return None;
    }
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    let mut m = [0u8; 4];
    m.copy_from_slice(&b[0..4]);
    if u32::from_le_bytes(m) != CURSOR_MAGIC || b[4..6] != 1u16.to_le_bytes() {
        return None;
    }
    let mut c = [0u8; 4];
    c.copy_from_slice(&b[60..64]);
    if crc32c::crc32c(&b[0..60]) != u32::from_le_bytes(c) {
        return None;
    }
    let iseq = u64_at(32);
    let iino = u64_at(40);
    let intent = (iseq != NONE).then_some(Intent {
        seq: iseq,
        src_ino: (iino != NONE).then_some(iino),
    });
    let cur = Cursor {
        checkpoint: u64_at(16),
        applied: u64_at(24).max(u64_at(16)),
        intent,
    };
    Some((u64_at(8), cur))
}

/// Where a cursor is kept. Two slots, written alternately, so a torn write loses one update at most.
pub trait CursorStore {
    /// Reads both slots (each [`CURSOR_SLOT_BYTES`]); missing bytes read as zero.
    fn read_slots(&mut self) -> std::io::Result<[u8; 2 * CURSOR_SLOT_BYTES]>;
    /// Writes one slot; with `durable`, returns only once it is on stable storage (**B2**).
    fn write_slot(
        &mut self,
        slot: usize,
        bytes: &[u8; CURSOR_SLOT_BYTES],
        durable: bool,
    ) -> std::io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    #[error("mirror tree: {0}")]
    Tree(#[from] TreeError),
    #[error("mirror cursor I/O: {0}")]
    Cursor(#[from] std::io::Error),
    #[error("record {got} arrived where {want} was expected")]
    Gap { want: u64, got: u64 },
}

impl ApplyError {
    /// The mirror tree's file system has no space for the change.
    pub fn is_no_space(&self) -> bool {
        matches!(self, ApplyError::Tree(TreeError::NoSpace(_)))
    }

    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Tree(e) => e.is_transient(),
            ApplyError::Cursor(_) => true,
            ApplyError::Gap { .. } => false,
        }
    }
}

/// The applier of one mirror.
#[derive(Debug)]
pub struct Applier {
    cur: Cursor,
    generation: u64,
    horizon: u64,
    records_since_checkpoint: u64,
    /// While this mirror's initial copy runs: its id. Records are then applied idempotently, and
    /// `Sync` records for this id are applied, until its `SyncDone`.
    syncing: Option<u32>,
    /// Barrier `seq` reached the tree but writing the cursor after it failed: a retry of that
    /// record only writes the cursor (re-applying could fail in strict mode).
    unwritten: Option<u64>,
    /// The `applied` of the newest slot written (records after it are applied but not yet in
    /// the cursor file: [`Applier::write_applied`]).
    written_applied: u64,
}

impl Applier {
    /// Loads the cursor. `None` means the mirror has never been synced. `power_loss` says the
    /// machine restarted since the cursor was written (unsynced hints cannot be trusted);
    /// `horizon` is the journal's last seq now.
    pub fn open<C: CursorStore>(
        store: &mut C,
        power_loss: bool,
        horizon: u64,
    ) -> std::io::Result<Option<Applier>> {
        let slots = store.read_slots()?;
        let a = decode_cursor(&slots[..CURSOR_SLOT_BYTES]);
        let b = decode_cursor(&slots[CURSOR_SLOT_BYTES..]);
        let best = match (a, b) {
            (Some(x), Some(y)) => Some(if x.0 >= y.0 { x } else { y }),
            (x, y) => x.or(y),
        };
        let Some((generation, mut cur)) = best else {
            return Ok(None);
        };
        let stale_hint = power_loss && cur.applied != cur.checkpoint;
        if power_loss {
            cur.applied = cur.checkpoint;
        }
        if cur.intent.is_some_and(|i| i.seq != cur.applied + 1) {
            cur.intent = None;
        }
        let mut a = Applier {
            cur,
            generation,
            horizon,
            records_since_checkpoint: 0,
            syncing: None,
            unwritten: None,
            written_applied: cur.applied,
        };
        if stale_hint {
            // The stored `applied` names records the power loss may have taken from the tree.
            // Forget it durably now: after a process crash before the next cursor write, the
            // next start sees no power loss and would resume after records the tree lost.
            a.persist(store, true)?;
        }
        Ok(Some(a))
    }

    /// A new cursor for a mirror that holds exactly the state after record `seq` (initial sync).
    pub fn start_at<C: CursorStore>(store: &mut C, seq: u64) -> std::io::Result<Applier> {
        let mut a = Applier {
            cur: Cursor {
                checkpoint: seq,
                applied: seq,
                intent: None,
            },
            generation: 0,
            horizon: 0,
            records_since_checkpoint: 0,
            syncing: None,
            unwritten: None,
            written_applied: seq,
        };
        a.persist(store, true)?;
        a.persist(store, true)?;
        Ok(a)
    }

    /// Marks this mirror as being copied (see `Op::Sync`).
    pub fn set_syncing(&mut self, id: Option<u32>) {
        self.syncing = id;
    }

    pub fn syncing(&self) -> Option<u32> {
        self.syncing
    }

    pub fn cursor(&self) -> Cursor {
        self.cur
    }
    /// The next record this applier needs.
    pub fn next_seq(&self) -> u64 {
        self.cur.applied + 1
    }
    pub fn in_replay(&self) -> bool {
        self.cur.applied < self.horizon
    }
    pub fn records_since_checkpoint(&self) -> u64 {
        self.records_since_checkpoint
    }

    /// Writes the cursor to the slot after the newest one. A failed write keeps the generation,
    /// so the next write goes to that slot again and never over the newest good copy.
    fn persist<C: CursorStore>(&mut self, store: &mut C, durable: bool) -> std::io::Result<()> {
        let generation = self.generation + 1;
        let bytes = encode_cursor(&self.cur, generation);
        store.write_slot((generation % 2) as usize, &bytes, durable)?;
        self.generation = generation;
        self.written_applied = self.cur.applied;
        Ok(())
    }

    /// Records applied (or skipped) since the cursor file last said what was applied.
    pub fn unwritten_records(&self) -> u64 {
        self.cur.applied - self.written_applied
    }

    /// Writes the cursor (without fsync) if records were applied since it last was: the end of a
    /// batch. A failure changes nothing but the file (the next write goes to the same slot).
    pub fn write_applied<C: CursorStore>(&mut self, store: &mut C) -> Result<(), ApplyError> {
        if self.unwritten_records() == 0 {
            return Ok(());
        }
        Ok(self.persist(store, false)?)
    }

    /// This mirror's initial copy is complete if `op` is its `SyncDone`.
    fn sync_done(&mut self, op: &Op) {
        if matches!(op, Op::SyncDone { mirror } if Some(*mirror) == self.syncing) {
            self.syncing = None;
        }
    }

    /// The retry of barrier `seq` after its cursor write failed ([`Applier::unwritten`]): writes
    /// the cursor only, durably (the tree has the op; its `B2` was not written).
    fn retry_unwritten<T: Tree + ?Sized, C: CursorStore>(
        &mut self,
        tree: &mut T,
        store: &mut C,
    ) -> Result<(), ApplyError> {
        self.checkpoint(tree, store)?;
        self.unwritten = None;
        Ok(())
    }

    /// Applies `rec`, which must be the next record.
    pub fn apply<T: Tree + ?Sized, C: CursorStore>(
        &mut self,
        tree: &mut T,
        store: &mut C,
        rec: &Record,
    ) -> Result<(), ApplyError> {
        if self.unwritten.is_some_and(|s| s == rec.seq) {
            self.retry_unwritten(tree, store)?;
            return Ok(());
        }
        if rec.seq != self.next_seq() {
            return Err(ApplyError::Gap {
                want: self.next_seq(),
                got: rec.seq,
            });
        }
        let replay = rec.seq <= self.horizon || self.syncing.is_some();
        match &rec.op {
            Op::Sync { mirror, .. } if Some(*mirror) != self.syncing => return self.skip(rec.seq),
            Op::SyncDone { .. } => {
                // The copy ends once its `SyncDone` is consumed.
                self.skip(rec.seq)?;
                self.sync_done(&rec.op);
                return Ok(());
            }
            _ => {}
        }
        if rec.op.needs_barrier() {
            return self.apply_barrier(tree, store, rec);
        }
        if matches!(rec.op, Op::Link { .. }) && self.syncing.is_none() {
            // A link makes an inode reachable under a name that earlier records may have used for
            // another file. A replay re-applies by name, so it must never hold those records
            // together with the link, or it would apply them to the linked inode: checkpoint
            // first (B1 + B2). Re-applying the link itself is idempotent, so no intent is needed.
            self.checkpoint(tree, store)?;
        }
        apply_op(tree, &rec.op, replay)?;
        // The cursor file learns it with its batch (`write_applied`), not per record.
        self.cur.applied = rec.seq;
        self.records_since_checkpoint += 1;
        Ok(())
    }

    /// Skips `seq` (an aborted record, or an `Abort` itself); written with the batch too.
    pub fn skip(&mut self, seq: u64) -> Result<(), ApplyError> {
        if seq != self.next_seq() {
            return Err(ApplyError::Gap {
                want: self.next_seq(),
                got: seq,
            });
        }
        self.cur.applied = seq;
        Ok(())
    }

    fn apply_barrier<T: Tree + ?Sized, C: CursorStore>(
        &mut self,
        tree: &mut T,
        store: &mut C,
        rec: &Record,
    ) -> Result<(), ApplyError> {
        let already = match self.cur.intent {
            Some(i) if i.seq == rec.seq => i.done(tree, &rec.op)?,
            _ => false,
        };
        if !already {
            // B1 + B2 before: everything earlier is durable, so a replay never starts before this op.
            tree.sync()?;
            let intent = Intent::before(tree, rec.seq, &rec.op)?;
            let before = self.cur;
            self.cur.checkpoint = rec.seq - 1;
            self.cur.intent = Some(intent);
            if let Err(e) = self.persist(store, true) {
                // Nothing is durable and the tree is unchanged: a retry starts over.
                self.cur = before;
                return Err(e.into());
            }
            apply_op(tree, &rec.op, self.syncing.is_some())?;
        }
        // B1 + B2 after: the op is durable, so a replay never includes it.
        tree.sync()?;
        let durable = self.cur.checkpoint;
        self.cur.checkpoint = rec.seq;
        self.cur.applied = rec.seq;
        self.cur.intent = None;
        if let Err(e) = self.persist(store, true) {
            // The tree has the op; the cursor still says what the intent write made durable.
            self.cur.checkpoint = durable;
            self.unwritten = Some(rec.seq);
            return Err(e.into());
        }
        self.records_since_checkpoint = 0;
        Ok(())
    }

    /// Makes everything applied durable: tree sync (B1) then cursor (B2).
    pub fn checkpoint<T: Tree + ?Sized, C: CursorStore>(
        &mut self,
        tree: &mut T,
        store: &mut C,
    ) -> Result<(), ApplyError> {
        if self.cur.checkpoint == self.cur.applied {
            return Ok(());
        }
        tree.sync()?;
        let durable = self.cur.checkpoint;
        self.cur.checkpoint = self.cur.applied;
        if let Err(e) = self.persist(store, true) {
            // Not durable: the checkpoint stays where it was (and stays due).
            self.cur.checkpoint = durable;
            return Err(e.into());
        }
        self.records_since_checkpoint = 0;
        Ok(())
    }

    /// The end of a tree sync that began when record `upto` was the last applied (a checkpoint
    /// off the applying thread): writes the cursor durably with `checkpoint = upto` (**B2**;
    /// the sync was its **B1**). Never past what was applied, never backwards: a barrier or
    /// another checkpoint that got further in the meantime leaves the cursor as it is.
    pub fn checkpoint_to<C: CursorStore>(
        &mut self,
        store: &mut C,
        upto: u64,
    ) -> Result<(), ApplyError> {
        let upto = upto.min(self.cur.applied);
        if upto <= self.cur.checkpoint {
            return Ok(());
        }
        let durable = self.cur.checkpoint;
        self.cur.checkpoint = upto;
        if let Err(e) = self.persist(store, true) {
            self.cur.checkpoint = durable;
            return Err(e.into());
        }
        self.records_since_checkpoint = 0;
        Ok(())
    }
}

fn barrier_source(op: &Op) -> Option<&crate::path::RelPath> {
    match op {
        Op::Rename { from, .. } => Some(from),
        Op::Unlink { path, .. } => Some(path),
        _ => None,
    }
}

/// An in-memory cursor store for tests and the simulation: `durable` and `live` images.
#[derive(Debug, Clone, Default)]
pub struct MemCursorStore {
    pub live: Vec<u8>,
    pub durable: Vec<u8>,
}

impl CursorStore for MemCursorStore {
    fn read_slots(&mut self) -> std::io::Result<[u8; 2 * CURSOR_SLOT_BYTES]> {
        let mut out = [0u8; 2 * CURSOR_SLOT_BYTES];
        let n = self.live.len().min(out.len());
        out[..n].copy_from_slice(&self.live[..n]);
        Ok(out)
    }
    fn write_slot(
        &mut self,
        slot: usize,
        bytes: &[u8; CURSOR_SLOT_BYTES],
        durable: bool,
    ) -> std::io::Result<()> {
        if self.live.len() < 2 * CURSOR_SLOT_BYTES {
            self.live.resize(2 * CURSOR_SLOT_BYTES, 0);
        }
        self.live[slot * CURSOR_SLOT_BYTES..(slot + 1) * CURSOR_SLOT_BYTES].copy_from_slice(bytes);
        if durable {
            self.durable = self.live.clone();
        }
        Ok(())
    }
}

impl MemCursorStore {
    /// Power loss: keep the durable image, or (at random) the live one.
    pub fn crash(&mut self, keep_live: bool) {
        if keep_live {
            self.durable = self.live.clone();
        } else {
            self.live = self.durable.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::rename_flags;
    use crate::path::RelPath;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("path")
    }

    /// A tree with files `a` and `b` holding `A` and `B`.
    fn two_files() -> crate::sim::SimTree {
        let mut t = crate::sim::SimTree::reference();
        for (name, byte) in [("a", b'A'), ("b", b'B')] {
            for op in [
                Op::Create {
                    path: p(name),
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                },
                Op::Write {
                    path: p(name),
                    offset: 0,
                    data: vec![byte],
                },
            ] {
                apply_op(&mut t, &op, false).expect("set up");
            }
        }
        t
    }

    /// A record received again after a crash that came after it was applied (a writable
    /// site's peer record before its acknowledgement, `net::peer`): an exchange applied again
    /// by name swaps the entries back; the intent noted before it says it was done, and says
    /// not done when the crash came before it.
    #[test]
    fn an_exchange_noted_before_it_is_applied_is_known_done_after_a_crash() {
        let exchange = Op::Rename {
            from: p("a"),
            to: p("b"),
            flags: rename_flags::EXCHANGE,
            from_ino: 0,
        };
        let mut t = two_files();
        let (a, b) = (t.ino(&p("a")).expect("a"), t.ino(&p("b")).expect("b"));
        let intent = Intent::before(&mut t, 7, &exchange).expect("intent");
        assert_eq!(intent, Intent { seq: 7, src_ino: a });
        assert!(!intent.done(&mut t, &exchange).expect("before"), "not yet");
        apply_op(&mut t, &exchange, false).expect("exchange");
        let swapped = t.snapshot();
        assert_eq!(
            (t.ino(&p("a")).expect("a"), t.ino(&p("b")).expect("b")),
            (b, a)
        );
        assert!(intent.done(&mut t, &exchange).expect("after"), "done");
        // What a replay without the intent does: the entries go back.
        let mut again = t.clone();
        apply_op(&mut again, &exchange, false).expect("exchange again");
        assert_eq!(
            (
                again.ino(&p("a")).expect("a"),
                again.ino(&p("b")).expect("b")
            ),
            (a, b),
            "an exchange applied twice swaps back"
        );
        assert!(!again.snapshot().diff(&swapped, 4).is_empty());
    }

    /// A rename received again after its target's name was reused (`a` → `b`, then a new `a`
    /// made): applied again by name it would move the new `a` onto `b`; the intent says done.
    #[test]
    fn a_rename_whose_source_name_was_reused_is_known_done() {
        let rename = Op::Rename {
            from: p("a"),
            to: p("b"),
            flags: 0,
            from_ino: 0,
        };
        let mut t = two_files();
        let intent = Intent::before(&mut t, 3, &rename).expect("intent");
        apply_op(&mut t, &rename, false).expect("rename");
        let create = Op::Create {
            path: p("a"),
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        apply_op(&mut t, &create, false).expect("a made again");
        assert!(intent.done(&mut t, &rename).expect("done"));
        let unlink = Op::Unlink {
            path: p("b"),
            nlink: 1,
        };
        let gone = Intent::before(&mut t, 4, &unlink).expect("intent");
        assert!(!gone.done(&mut t, &unlink).expect("before"));
        apply_op(&mut t, &unlink, false).expect("unlink");
        assert!(gone.done(&mut t, &unlink).expect("after"));
    }

    #[test]
    fn cursor_roundtrip_and_torn_slot() {
        let c = Cursor {
            checkpoint: 5,
            applied: 9,
            intent: Some(Intent {
                seq: 10,
                src_ino: Some(77),
            }),
        };
        let b = encode_cursor(&c, 3);
        assert_eq!(decode_cursor(&b), Some((3, c)));
        let mut t = b;
        t[20] ^= 0xff;
        assert_eq!(decode_cursor(&t), None);
        assert_eq!(decode_cursor(&[0u8; 64]), None);
        let mut s = MemCursorStore::default();
        let mut a = Applier::start_at(&mut s, 42).expect("store");
        assert_eq!(a.next_seq(), 43);
        a.skip(43).expect("skip");
        a.write_applied(&mut s).expect("write");
        // Not durable: a power loss goes back to the checkpoint.
        s.crash(false);
        let back = Applier::open(&mut s, true, 50)
            .expect("read")
            .expect("cursor");
        assert_eq!(back.next_seq(), 43);
        assert!(back.in_replay());
    }
}
