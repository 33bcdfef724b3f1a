//! The journal: a segmented, append-only, checksummed log of [`Record`]s.
//!
//! ```text
//!   producers ──append()──▶ active segment (page cache) ──sync plan──▶ flusher thread: fsync (F2)
//!                                  │                                         │
//!                                  ▼                                         ▼
//!                           readers (appliers) ◀──────── durable_seq ── mark_synced()
//! ```
//!
//! Appends go to the newest ("active") segment. A separate flusher takes a [`SyncPlan`], fsyncs
//! outside any lock and reports back with [`Journal::mark_synced`]; every append that arrived in the
//! meantime rides on the next fsync (group commit). When the active segment is full it is fsynced
//! and a new one is created (F1), so a torn tail can only be found in the newest segment.
//! Segments are removed once every consumer has applied them ([`Journal::release_through`]).
//!
//! A failed fsync, and any I/O error other than a lack of space, poisons the journal: the kernel
//! may have dropped the dirty pages, so retrying could silently lose records. Every later call
//! fails with [`JournalError::Poisoned`]. A lack of space is not a failure of the journal: an
//! append that does not fit fails with [`JournalError::NoSpace`] and leaves the journal exactly
//! as it was, so the caller refuses that one change with `ENOSPC`. Space is reserved
//! (`SegmentFile::reserve`) before a record is written, together with room for its `Abort`, so a
//! record never half-fits and the `Abort` of a record that failed on the backing always fits.

pub mod frame;
pub mod storage;

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use crate::op::{Op, Record};
pub use frame::Origin;
use frame::{FrameParse, SEGMENT_HEADER_BYTES};
use storage::{read_full_at, SegmentFile, SegmentStore};

#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// A segment is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    /// Appends that would take the journal past this size fail with [`JournalError::Full`].
    pub journal_bytes_max: u64,
}

/// The size of a segment in the binary (the journal rolls over to a new segment at this size).
pub const SEGMENT_BYTES: u64 = 64 << 20;

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            segment_bytes: SEGMENT_BYTES,
            journal_bytes_max: 4 << 30,
        }
    }
}

impl JournalConfig {
    /// The smallest size limit under which the journal-full policy can hold: the segment being
    /// written (up to `segment_bytes` plus one record) is never removed, so the limit must leave
    /// room for it and for a closed segment that mirrors are still reading: two segments.
    pub fn min_journal_bytes(segment_bytes: u64) -> u64 {
        2 * segment_bytes
    }
}

/// Bytes of an `Abort` record: kept free (under the size limit and on disk) behind every record,
/// so the `Abort` of a change that failed on the backing always fits.
pub const ABORT_FRAME_BYTES: u64 = frame::padded(frame::FRAME_HEADER_BYTES + 8) as u64;

/// Space a data-carrying record leaves reserved behind it on disk, so that once a file system is
/// full, the small records of the changes that free space (unlink, rmdir, truncate) still fit.
pub const NAMESPACE_RESERVE_BYTES: u64 = 256 << 10;

/// How far ahead of the end of the active segment space is reserved at a time.
const RESERVE_STEP_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    #[error("journal I/O error on segment {segment}: {source}")]
    Io { segment: u64, source: io::Error },
    #[error("journal is poisoned by an earlier I/O error ({0}); restart mirrorfs to recover from the durable part")]
    Poisoned(String),
    #[error("journal is full ({bytes} bytes of {max} allowed)")]
    Full { bytes: u64, max: u64 },
    /// The file system holding the journal has no space for this record; nothing was appended.
    #[error("no space left for the journal (segment {segment}): {source}; free space on the file system that holds the state directory")]
    NoSpace { segment: u64, source: io::Error },
    #[error("journal segment {segment} is corrupt at offset {offset}: {reason}")]
    Corrupt {
        segment: u64,
        offset: u64,
        reason: String,
    },
}

fn io_err(segment: u64) -> impl FnOnce(io::Error) -> JournalError {
    move |source| JournalError::Io { segment, source }
}

struct Segment<F> {
    first_seq: u64,
    /// Seq of the last record, `first_seq - 1` when empty.
    last_seq: u64,
    len: u64,
    synced_len: u64,
    /// Bytes of the file known to have space allocated (`SegmentFile::reserve`); `u64::MAX` if
    /// the file system cannot reserve.
    reserved: u64,
    /// Reserve only what each record needs, never [`RESERVE_STEP_BYTES`] ahead: set once the
    /// file system ran short (a step did not fit, or [`Journal::release_spare`] gave space back
    /// to a mirror tree on the same file system), until the next segment.
    frugal: bool,
    /// Its format (`frame::SEGMENT_VERSIONS_READ`); records are appended only to a segment of
    /// `frame::SEGMENT_VERSION`.
    version: u32,
    file: Arc<F>,
}

/// What recovery found, for the log and for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    /// Bytes cut from the end of the newest segment (a torn, unsynced tail).
    pub torn_bytes: u64,
    /// Segments removed because they followed a torn tail (never synced).
    pub dropped_segments: usize,
    /// The last record, which may be in doubt on the primary (see `volume`).
    pub last: Option<Record>,
}

/// Fsyncs the flusher must do, outside the journal lock, then report with `mark_synced`.
pub struct SyncPlan<F> {
    pub files: Vec<(u64, Arc<F>, u64)>,
    pub seq: u64,
}

pub struct Journal<S: SegmentStore> {
    store: S,
    cfg: JournalConfig,
    segs: VecDeque<Segment<S::File>>,
    next_seq: u64,
    durable_seq: u64,
    bytes: u64,
    poisoned: Option<String>,
}

impl<S: SegmentStore> Journal<S> {
    /// Opens the journal in `store`, recovering its durable prefix. Only a torn tail of the newest
    /// segment is tolerated (and cut off); anything else is reported as [`JournalError::Corrupt`].
    pub fn open(store: S, cfg: JournalConfig) -> Result<(Self, RecoveryReport), JournalError> {
        let mut ids = store.list().map_err(io_err(0))?;
        ids.sort_unstable();
        let mut report = RecoveryReport::default();
        let mut segs: VecDeque<Segment<S::File>> = VecDeque::new();
        let mut expect_seq: Option<u64> = None;
        let mut torn = false;
        for (i, id) in ids.iter().copied().enumerate() {
            if torn {
                // Segments after a torn tail were never synced (rollover syncs first).
                store.remove(id).map_err(io_err(id))?;
                report.dropped_segments += 1;
                continue;
            }
            let file = store.open(id).map_err(io_err(id))?;
            let is_last = i + 1 == ids.len();
            let mut scan = scan_segment(&file, id)?;
            if let Some(e) = expect_seq {
                if scan.first_seq != e {
                    return Err(JournalError::Corrupt {
                        segment: id,
                        offset: 0,
                        reason: format!(
                            "segment starts at seq {} but seq {e} was expected",
                            scan.first_seq
                        ),
                    });
                }
            }
            match scan.tail {
                Tail::Clean => {}
                Tail::Torn { at } => {
                    if !is_last && !scan_only_garbage_follows(&ids[i + 1..], &store)? {
                        return Err(JournalError::Corrupt {
                            segment: id,
                            offset: at,
                            reason: "invalid record in a closed segment".into(),
                        });
                    }
                    report.torn_bytes += scan.file_len - at;
                    file.truncate(at).map_err(io_err(id))?;
                    if at < SEGMENT_HEADER_BYTES as u64 {
                        // The header never became durable: write it again (F1), so that the
                        // records appended next follow a valid header.
                        let header = frame::encode_segment_header(id);
                        file.write_all_at(0, &[&header]).map_err(io_err(id))?;
                        file.sync().map_err(io_err(id))?;
                        scan.valid_len = SEGMENT_HEADER_BYTES as u64;
                        scan.version = frame::SEGMENT_VERSION;
                    }
                    torn = true;
                }
            }
            report.records += scan.count;
            if scan.last.is_some() {
                report.last = scan.last.clone();
            }
            expect_seq = Some(scan.last_seq + 1);
            segs.push_back(Segment {
                first_seq: scan.first_seq,
                last_seq: scan.last_seq,
                len: scan.valid_len,
                synced_len: scan.valid_len,
                reserved: 0,
                frugal: false,
                version: scan.version,
                file: Arc::new(file),
            });
        }
        // After a process crash (kill -9) the page cache still holds records that may never have
        // reached the disk. Recovery just accepted them: mirrors may apply them and the in-doubt
        // record is resolved against them, so they must be durable before `durable_seq` says so
        // (F2), or a later power loss would take back records a mirror already holds.
        for s in &segs {
            s.file.sync().map_err(io_err(s.first_seq))?;
        }
        let next_seq = expect_seq.unwrap_or(1);
        report.segments = segs.len();
        let bytes = segs.iter().map(|s| s.len).sum();
        let mut j = Journal {
            store,
            cfg,
            segs,
            next_seq,
            durable_seq: next_seq - 1,
            bytes,
            poisoned: None,
        };
        if j.segs.is_empty() {
            j.new_segment()?;
        }
        j.continue_in_current_format()?;
        Ok((j, report))
    }

    /// Makes the active segment one of the format this build writes, before anything is
    /// appended: a frame may carry flags, which a build that knows only version 1 would take
    /// for a torn tail and cut; it refuses a version-2 segment instead. A version-1 segment with
    /// records is closed (it is synced: recovery just synced it) and a new one started; an empty
    /// one gets the new header in place (its id is the next seq, so a new segment could not be
    /// made beside it; a torn rewrite of a header-only file is a torn header to recovery).
    fn continue_in_current_format(&mut self) -> Result<(), JournalError> {
        let Some(seg) = self.segs.back_mut() else {
            return Ok(());
        };
        if seg.version == frame::SEGMENT_VERSION {
            return Ok(());
        }
        if seg.last_seq >= seg.first_seq {
            return self.roll();
        }
        let id = seg.first_seq;
        let header = frame::encode_segment_header(id);
        let written = seg
            .file
            .write_all_at(0, &[&header])
            .and_then(|()| seg.file.sync());
        if let Err(e) = written {
            self.poison(format!(
                "rewriting the header of empty segment {id} failed: {e}"
            ));
            return Err(JournalError::Io {
                segment: id,
                source: e,
            });
        }
        seg.version = frame::SEGMENT_VERSION;
        Ok(())
    }

    fn new_segment(&mut self) -> Result<(), JournalError> {
        let id = self.next_seq;
        let file = match self.store.create(id) {
            Ok(f) => f,
            Err(e) if is_no_space(&e) => {
                return Err(JournalError::NoSpace {
                    segment: id,
                    source: e,
                })
            }
            Err(e) => {
                return Err(JournalError::Io {
                    segment: id,
                    source: e,
                })
            }
        };
        let header = frame::encode_segment_header(id);
        let written = file.write_all_at(0, &[&header]).and_then(|()| {
            // F1 (continued): the header is durable before any record follows it.
            file.sync()
        });
        if let Err(e) = written {
            // Not a segment yet: remove it, so that a later attempt can create it again.
            drop(file);
            let removed = self.store.remove(id);
            return Err(if is_no_space(&e) && removed.is_ok() {
                JournalError::NoSpace {
                    segment: id,
                    source: e,
                }
            } else {
                JournalError::Io {
                    segment: id,
                    source: e,
                }
            });
        }
        self.segs.push_back(Segment {
            first_seq: id,
            last_seq: id - 1,
            len: SEGMENT_HEADER_BYTES as u64,
            synced_len: SEGMENT_HEADER_BYTES as u64,
            reserved: 0,
            frugal: false,
            version: frame::SEGMENT_VERSION,
            file: Arc::new(file),
        });
        self.bytes += SEGMENT_HEADER_BYTES as u64;
        Ok(())
    }

    fn check(&self) -> Result<(), JournalError> {
        match &self.poisoned {
            Some(why) => Err(JournalError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Poisons the journal after a failed I/O (also called by the flusher when a sync fails).
    pub fn poison(&mut self, why: String) {
        if self.poisoned.is_none() {
            self.poisoned = Some(why);
        }
    }

    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// Bytes an append of `op` would add.
    pub fn frame_bytes(op: &Op) -> u64 {
        frame::padded(frame::FRAME_HEADER_BYTES + codec_len(op)) as u64
    }

    /// True if appending `extra` bytes would pass the size limit.
    pub fn would_overflow(&self, extra: u64) -> bool {
        self.bytes + extra > self.cfg.journal_bytes_max
    }

    /// Appends `op` as the next record and returns its seq. Not durable until a sync covers it.
    ///
    /// Fails with [`JournalError::Full`] past the size limit and with [`JournalError::NoSpace`]
    /// when the file system has no room for the record; in both cases nothing was appended and
    /// the journal is not poisoned. The size limit and the disk always keep room for one
    /// `Abort` behind the record, and an `Abort` is never refused for either reason (nor does it
    /// start a segment), so the `Abort` of a change that failed on the backing always fits.
    pub fn append(&mut self, op: &Op) -> Result<u64, JournalError> {
        self.append_from(op, Origin::Local)
    }

    /// [`Journal::append`] of a change made at `origin` (kept in the record's frame).
    pub fn append_from(&mut self, op: &Op, origin: Origin) -> Result<u64, JournalError> {
        self.check()?;
        let is_abort = matches!(op, Op::Abort { .. });
        let seq = self.next_seq;
        let synced_to = self.segs.back().map_or(0, |s| s.synced_len);
        let f = frame::encode_frame_from(seq, op, synced_to, origin);
        let flen = f.len() as u64;
        // Room kept behind the record: its Abort, and for a record that carries data, space for
        // the small records of the changes that free space once the disk is full.
        let behind = match op {
            Op::Abort { .. } => 0,
            Op::Write { .. } | Op::SetXattr { .. } | Op::Sync { .. } | Op::Fallocate { .. } => {
                ABORT_FRAME_BYTES + NAMESPACE_RESERVE_BYTES
            }
            _ => ABORT_FRAME_BYTES,
        };
        if !is_abort && self.bytes + flen + ABORT_FRAME_BYTES > self.cfg.journal_bytes_max {
            return Err(JournalError::Full {
                bytes: self.bytes,
                max: self.cfg.journal_bytes_max,
            });
        }
        let need_roll = !is_abort
            && self.segs.back().is_some_and(|s| {
                s.len + flen + ABORT_FRAME_BYTES > self.cfg.segment_bytes
                    && s.last_seq >= s.first_seq
            });
        if need_roll {
            self.roll()?;
        }
        let Some(seg) = self.segs.back_mut() else {
            return Err(JournalError::Poisoned(
                "journal has no active segment".into(),
            ));
        };
        let id = seg.first_seq;
        let end = seg.len + flen;
        if end + behind > seg.reserved {
            // Reserve ahead in steps (one fallocate per few MiB); when that much is not free,
            // exactly what this record needs.
            let ahead = (end + behind + RESERVE_STEP_BYTES)
                .min(
                    self.cfg.segment_bytes
                        + frame::padded(frame::FRAME_HEADER_BYTES + frame::BODY_BYTES_MAX) as u64,
                )
                .max(end + behind);
            let from = seg.len.max(seg.reserved);
            let want = if seg.frugal { end + behind } else { ahead };
            let r = match seg.file.reserve(from, want) {
                Ok(()) => Ok(want),
                Err(e) if is_no_space(&e) && !seg.frugal => {
                    seg.frugal = true;
                    seg.file.reserve(from, end + behind).map(|()| end + behind)
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(n) => seg.reserved = n,
                // The Abort is already covered by the reservation its record made.
                Err(_) if is_abort => {}
                Err(e) if is_no_space(&e) => {
                    return Err(JournalError::NoSpace {
                        segment: id,
                        source: e,
                    })
                }
                Err(e) if is_unsupported(&e) => seg.reserved = u64::MAX,
                Err(e) => {
                    self.poison(format!("reserving space in segment {id} failed: {e}"));
                    return Err(JournalError::Io {
                        segment: id,
                        source: e,
                    });
                }
            }
        }
        let res = seg
            .file
            .write_all_at(seg.len, &[&f.head, f.tail, &frame::ZERO_PAD[..f.padding]]);
        if let Err(e) = res {
            // A write that found no space changed nothing that was appended before it (unlike a
            // failed fsync, no dirty page was dropped): cut what it may have left past the end,
            // so the segment ends with its last record, and refuse this one record. Any other
            // failure poisons.
            if is_no_space(&e) && seg.file.truncate(seg.len).is_ok() {
                return Err(JournalError::NoSpace {
                    segment: id,
                    source: e,
                });
            }
            self.poison(format!("write to segment {id} failed: {e}"));
            return Err(JournalError::Io {
                segment: id,
                source: e,
            });
        }
        seg.len += flen;
        seg.last_seq = seq;
        self.bytes += flen;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Appends a record received from a primary: it must carry exactly the next seq, so a
    /// mirror's journal holds the primary's records under the primary's seqs.
    pub fn append_at(&mut self, seq: u64, op: &Op) -> Result<u64, JournalError> {
        if seq != self.next_seq {
            return Err(JournalError::Corrupt {
                segment: self.segs.back().map_or(0, |s| s.first_seq),
                offset: 0,
                reason: format!("record {seq} does not follow {}", self.next_seq - 1),
            });
        }
        self.append(op)
    }

    /// Discards every record and continues at `seq` (a mirror's journal when an initial copy
    /// starts, or when it resumes at its durable position after a crash left unacknowledged
    /// records past it). Segments are removed oldest first, so a crash in between leaves a valid
    /// chain; the new segment's header is durable (F1) before this returns.
    pub fn restart_at(&mut self, seq: u64) -> Result<(), JournalError> {
        self.check()?;
        if seq == 0 {
            return Err(JournalError::Corrupt {
                segment: 0,
                offset: 0,
                reason: "a journal cannot start at seq 0".into(),
            });
        }
        while let Some(s) = self.segs.pop_front() {
            self.store
                .remove(s.first_seq)
                .map_err(io_err(s.first_seq))?;
            self.bytes -= s.len;
        }
        self.next_seq = seq;
        self.durable_seq = seq - 1;
        self.new_segment()
    }

    /// Closes the active segment (fsync, F2) and starts a new one (F1).
    fn roll(&mut self) -> Result<(), JournalError> {
        if let Some(seg) = self.segs.back_mut() {
            if let Err(e) = seg.file.sync() {
                let id = seg.first_seq;
                self.poison(format!("fsync of segment {id} failed: {e}"));
                return Err(JournalError::Io {
                    segment: id,
                    source: e,
                });
            }
            seg.synced_len = seg.len;
            // Every closed segment is synced (this is how they are closed), so everything up to
            // the end of this one is durable now; a closed segment can be released at once.
            self.durable_seq = self.durable_seq.max(seg.last_seq);
        }
        self.new_segment()
    }

    /// The fsyncs needed to make everything appended so far durable, or `None` if it already is.
    pub fn sync_plan(&self) -> Option<SyncPlan<S::File>> {
        if self.poisoned.is_some() || self.durable_seq + 1 >= self.next_seq {
            return None;
        }
        let files = self
            .segs
            .iter()
            .filter(|s| s.synced_len < s.len)
            .map(|s| (s.first_seq, s.file.clone(), s.len))
            .collect();
        Some(SyncPlan {
            files,
            seq: self.next_seq - 1,
        })
    }

    /// Records that the fsyncs of `plan` succeeded.
    pub fn mark_synced(&mut self, plan: &SyncPlan<S::File>) {
        for (id, _, len) in &plan.files {
            if let Some(s) = self.segs.iter_mut().find(|s| s.first_seq == *id) {
                s.synced_len = s.synced_len.max(*len);
            }
        }
        self.durable_seq = self.durable_seq.max(plan.seq);
    }

    /// Removes every closed segment whose records all have seq ≤ `seq`.
    pub fn release_through(&mut self, seq: u64) -> Result<(), JournalError> {
        while self.segs.len() > 1 {
            let Some(front) = self.segs.front() else {
                break;
            };
            if front.last_seq > seq || front.synced_len < front.len {
                break;
            }
            let id = front.first_seq;
            let len = front.len;
            self.store.remove(id).map_err(io_err(id))?;
            self.segs.pop_front();
            self.bytes -= len;
        }
        Ok(())
    }

    /// Seq the next append gets.
    /// Bytes reserved on disk ahead of the active segment's end beyond what its last record
    /// keeps behind it (its `Abort` and the namespace reserve).
    pub fn spare_reserved(&self) -> u64 {
        self.segs.back().map_or(0, |s| {
            if s.reserved == u64::MAX {
                0
            } else {
                s.reserved
                    .saturating_sub(s.len + ABORT_FRAME_BYTES + NAMESPACE_RESERVE_BYTES)
            }
        })
    }

    /// Gives the space reserved ahead of the active segment's end back to the file system and
    /// reserves only what each record needs until the next segment. Called when a mirror tree on
    /// the same file system is out of space: else the journal, which keeps the records that
    /// mirror still has to apply, could hold the space the mirror needs to apply them, and the
    /// mirror would never catch up after space was freed. What the last record keeps behind it
    /// (its `Abort`, the namespace reserve) is reserved again at once, as far as it fits.
    /// Returns the bytes given back.
    pub fn release_spare(&mut self) -> Result<u64, JournalError> {
        self.check()?;
        let spare = self.spare_reserved();
        let Some(seg) = self.segs.back_mut() else {
            return Ok(0);
        };
        seg.frugal = true;
        if spare == 0 {
            return Ok(0);
        }
        let id = seg.first_seq;
        if let Err(e) = seg.file.release_reserve(seg.len) {
            // Nothing was written or cut: the bytes stay reserved and the journal stays sound.
            return Err(JournalError::Io {
                segment: id,
                source: e,
            });
        }
        seg.reserved = seg.len;
        let keep = seg.len + ABORT_FRAME_BYTES + NAMESPACE_RESERVE_BYTES;
        if seg.file.reserve(seg.len, keep).is_ok() {
            seg.reserved = keep;
        }
        Ok(spare)
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
    /// Every record with seq ≤ this is durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }
    /// The oldest seq still held.
    pub fn first_seq(&self) -> u64 {
        self.segs.front().map_or(self.next_seq, |s| s.first_seq)
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn segment_count(&self) -> usize {
        self.segs.len()
    }
    pub fn config(&self) -> &JournalConfig {
        &self.cfg
    }

    /// The segment holding `seq` (or, at a boundary, starting with it), with the length up to which
    /// it may be read and whether it is closed.
    pub fn segment_for(&self, seq: u64) -> Option<SegmentView<S::File>> {
        let idx = self.segs.iter().rposition(|s| s.first_seq <= seq)?;
        let s = &self.segs[idx];
        Some(SegmentView {
            first_seq: s.first_seq,
            last_seq: s.last_seq,
            readable_len: s.len,
            closed: idx + 1 < self.segs.len(),
            file: s.file.clone(),
        })
    }
}

/// ENOSPC or EDQUOT: the file system has no room, nothing is broken.
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28 | 122))
}

/// The file system cannot reserve space (EOPNOTSUPP, ENOSYS, EINVAL).
fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(95 | 38 | 22))
}

fn codec_len(op: &Op) -> usize {
    let mut v = Vec::new();
    crate::codec::encode_body_head(op, &mut v);
    v.len() + crate::codec::body_tail(op).len()
}

/// A snapshot of one segment for a reader.
pub struct SegmentView<F> {
    pub first_seq: u64,
    pub last_seq: u64,
    pub readable_len: u64,
    pub closed: bool,
    pub file: Arc<F>,
}

enum Tail {
    Clean,
    Torn { at: u64 },
}

struct Scan {
    first_seq: u64,
    version: u32,
    last_seq: u64,
    count: u64,
    valid_len: u64,
    file_len: u64,
    last: Option<Record>,
    tail: Tail,
}

/// Segments are bounded by `segment_bytes` plus one frame, so reading one whole is bounded too.
fn scan_segment<F: SegmentFile>(file: &F, id: u64) -> Result<Scan, JournalError> {
    let file_len = file.len().map_err(io_err(id))?;
    let mut buf = vec![0u8; file_len as usize];
    let n = read_full_at(file, 0, &mut buf).map_err(io_err(id))?;
    buf.truncate(n);
    let header = match frame::decode_segment_header(&buf) {
        Ok(h) => h,
        Err(_) if buf.len() <= SEGMENT_HEADER_BYTES => {
            // Created (F1) but the header never became durable. `new_segment` syncs the header
            // before any record is appended, so a file no longer than a header whose header is
            // bad (missing, a prefix, zeros) is a torn header, not corruption.
            return Ok(Scan {
                first_seq: id,
                version: frame::SEGMENT_VERSION,
                last_seq: id - 1,
                count: 0,
                valid_len: 0,
                file_len,
                last: None,
                tail: Tail::Torn { at: 0 },
            });
        }
        Err(e) => {
            return Err(JournalError::Corrupt {
                segment: id,
                offset: 0,
                reason: e.to_string(),
            })
        }
    };
    let first_seq = header.first_seq;
    if first_seq != id {
        return Err(JournalError::Corrupt {
            segment: id,
            offset: 0,
            reason: format!("header says first seq {first_seq}, file name says {id}"),
        });
    }
    let mut off = SEGMENT_HEADER_BYTES;
    let mut next = first_seq;
    let mut last = None;
    let mut count = 0;
    loop {
        if off == buf.len() {
            return Ok(Scan {
                first_seq,
                version: header.version,
                last_seq: next - 1,
                count,
                valid_len: off as u64,
                file_len,
                last,
                tail: Tail::Clean,
            });
        }
        let bad_reason = match frame::parse_frame(&buf[off..]) {
            FrameParse::Record { record, len, .. } if record.seq == next => {
                off += len;
                next += 1;
                count += 1;
                last = Some(record);
                continue;
            }
            FrameParse::Record { record, .. } => {
                format!("seq {} where {next} was expected", record.seq)
            }
            FrameParse::Incomplete { .. } => "record cut short".to_string(),
            FrameParse::Invalid(e) => e.to_string(),
        };
        // A torn tail is unsynced data. Any later valid frame that says bytes past `off` had been
        // synced when it was written proves the damage is in synced data: corruption.
        let mut probe = off + 8;
        while probe + frame::FRAME_HEADER_BYTES <= buf.len() {
            if let FrameParse::Record { synced_to, .. } = frame::parse_frame(&buf[probe..]) {
                if synced_to > off as u64 {
                    return Err(JournalError::Corrupt {
                        segment: id,
                        offset: off as u64,
                        reason: format!("{bad_reason}, followed by records written after offset {synced_to} was synced"),
                    });
                }
            }
            probe += 8;
        }
        let tail = Tail::Torn { at: off as u64 };
        return Ok(Scan {
            first_seq,
            version: header.version,
            last_seq: next - 1,
            count,
            valid_len: off as u64,
            file_len,
            last,
            tail,
        });
    }
}

/// A closed segment with a bad record is corruption unless everything after it is unsynced garbage
/// too, which can happen only if the rollover fsync itself was interrupted by the crash.
fn scan_only_garbage_follows<S: SegmentStore>(
    later: &[u64],
    store: &S,
) -> Result<bool, JournalError> {
    for id in later {
        let f = store.open(*id).map_err(io_err(*id))?;
        let mut h = [0u8; SEGMENT_HEADER_BYTES + frame::FRAME_HEADER_BYTES];
        let n = read_full_at(&f, 0, &mut h).map_err(io_err(*id))?;
        if n == h.len()
            && matches!(
                frame::parse_frame(&h[SEGMENT_HEADER_BYTES..]),
                FrameParse::Record { .. } | FrameParse::Incomplete { .. }
            )
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Sequential reader over the journal, for appliers. Holds a position (segment, offset, next seq)
/// and a bounded read buffer.
pub struct Reader<F: SegmentFile> {
    seg_first: u64,
    file: Option<Arc<F>>,
    offset: u64,
    next_seq: u64,
    buf: Vec<u8>,
    buf_off: u64,
}

/// Read-ahead buffer size; a single frame larger than this is read on its own.
const READ_CHUNK_BYTES: usize = 1 << 20;

impl<F: SegmentFile> Reader<F> {
    /// A reader that will return records from `next_seq` on.
    pub fn new(next_seq: u64) -> Self {
        Reader {
            seg_first: 0,
            file: None,
            offset: 0,
            next_seq,
            buf: Vec::new(),
            buf_off: 0,
        }
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Returns the record `next_seq` if it is within `view` (the segment for `next_seq`) and below
    /// `limit_seq` (inclusive), else `None`. Records before `next_seq` are skipped.
    pub fn next<S: SegmentStore<File = F>>(
        &mut self,
        journal_view: Option<SegmentView<F>>,
        limit_seq: u64,
    ) -> Result<Option<Record>, JournalError> {
        Ok(self
            .next_from::<S>(journal_view, limit_seq)?
            .map(|(r, _)| r))
    }

    /// [`Reader::next`] with where the record's change was made (its frame's flags).
    pub fn next_from<S: SegmentStore<File = F>>(
        &mut self,
        journal_view: Option<SegmentView<F>>,
        limit_seq: u64,
    ) -> Result<Option<(Record, Origin)>, JournalError> {
        loop {
            if self.next_seq > limit_seq {
                return Ok(None);
            }
            let Some(view) = journal_view.as_ref() else {
                return Ok(None);
            };
            if self.file.is_none() || self.seg_first != view.first_seq {
                self.seg_first = view.first_seq;
                self.file = Some(view.file.clone());
                self.offset = SEGMENT_HEADER_BYTES as u64;
                self.buf.clear();
                self.buf_off = self.offset;
            }
            if self.offset >= view.readable_len {
                return Ok(None);
            }
            let Some((rec, origin)) = self.read_frame(view.readable_len)? else {
                return Ok(None);
            };
            if rec.seq < self.next_seq {
                continue;
            }
            if rec.seq != self.next_seq {
                return Err(JournalError::Corrupt {
                    segment: self.seg_first,
                    offset: self.offset,
                    reason: format!(
                        "reader expected seq {} and found {}",
                        self.next_seq, rec.seq
                    ),
                });
            }
            self.next_seq += 1;
            return Ok(Some((rec, origin)));
        }
    }

    fn read_frame(&mut self, end: u64) -> Result<Option<(Record, Origin)>, JournalError> {
        let id = self.seg_first;
        let Some(file) = self.file.clone() else {
            return Ok(None);
        };
        loop {
            let start = (self.offset - self.buf_off) as usize;
            let avail = &self.buf[start.min(self.buf.len())..];
            match frame::parse_frame(avail) {
                FrameParse::Record {
                    record, len, flags, ..
                } => {
                    self.offset += len as u64;
                    return Ok(Some((record, Origin::of_flags(flags))));
                }
                FrameParse::Incomplete { needed } => {
                    let want = needed
                        .max(READ_CHUNK_BYTES)
                        .min((end - self.offset) as usize);
                    if want < needed {
                        return Ok(None);
                    }
                    self.buf.resize(want, 0);
                    let n = read_full_at(file.as_ref(), self.offset, &mut self.buf)
                        .map_err(io_err(id))?;
                    self.buf.truncate(n);
                    self.buf_off = self.offset;
                    if n < needed {
                        return Ok(None);
                    }
                }
                FrameParse::Invalid(e) => {
                    return Err(JournalError::Corrupt {
                        segment: id,
                        offset: self.offset,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::storage::MemStore;
    use super::*;
    use crate::path::RelPath;
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    fn write_op(i: u64) -> Op {
        Op::Write {
            path: RelPath::new(format!("f{}", i % 7)).expect("valid"),
            offset: i * 10,
            data: vec![i as u8; (i % 50) as usize],
        }
    }

    fn read_all(j: &Journal<MemStore>, from: u64) -> Vec<Record> {
        let mut r = Reader::new(from);
        let mut out = Vec::new();
        loop {
            let view = j.segment_for(r.next_seq());
            match r.next::<MemStore>(view, u64::MAX).expect("read") {
                Some(rec) => out.push(rec),
                None => {
                    // Move to the next segment if this one is exhausted.
                    let Some(v) = j.segment_for(r.next_seq()) else {
                        break;
                    };
                    if v.first_seq == r.seg_first && !(v.closed) {
                        break;
                    }
                    if v.first_seq == r.seg_first {
                        break;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn append_sync_reopen_roll_release() {
        let store = MemStore::new();
        let cfg = JournalConfig {
            segment_bytes: 4096,
            journal_bytes_max: 1 << 30,
        };
        let (mut j, rep) = Journal::open(store.clone(), cfg.clone()).expect("open");
        assert_eq!(rep.records, 0);
        for i in 1..=200 {
            assert_eq!(j.append(&write_op(i)).expect("append"), i);
        }
        assert!(j.segment_count() > 3, "rolled over");
        let plan = j.sync_plan().expect("work to do");
        for (_, f, _) in &plan.files {
            f.sync().expect("sync");
        }
        j.mark_synced(&plan);
        assert_eq!(j.durable_seq(), 200);
        let recs = read_all(&j, 1);
        assert_eq!(recs.len(), 200);
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1);
            assert_eq!(r.op, write_op(i as u64 + 1));
        }
        drop(j);
        let (mut j, rep) = Journal::open(store.clone(), cfg).expect("reopen");
        assert_eq!(rep.records, 200);
        assert_eq!(rep.torn_bytes, 0);
        assert_eq!(j.next_seq(), 201);
        let before = j.segment_count();
        j.release_through(150).expect("release");
        assert!(j.segment_count() < before);
        assert!(j.first_seq() <= 151);
        let recs = read_all(&j, 151);
        assert_eq!(recs.first().map(|r| r.seq), Some(151));
        assert_eq!(recs.len(), 50);
    }

    /// A record's origin is in its frame: a power loss that keeps the record keeps its origin
    /// (issue 7, "No echo"), and a journal of the former layout reads as local.
    #[test]
    fn the_origin_is_durable_with_the_record() {
        let store = MemStore::new();
        let cfg = JournalConfig {
            segment_bytes: 4096,
            journal_bytes_max: 1 << 30,
        };
        let (mut j, _) = Journal::open(store.clone(), cfg.clone()).expect("open");
        let origins = [Origin::Local, Origin::Peer, Origin::Peer, Origin::Local];
        for (i, o) in origins.iter().enumerate() {
            let seq = j.append_from(&write_op(i as u64 + 1), *o).expect("append");
            assert_eq!(seq, i as u64 + 1);
        }
        let plan = j.sync_plan().expect("work to do");
        for (_, f, _) in &plan.files {
            f.sync().expect("sync");
        }
        j.mark_synced(&plan);
        drop(j);
        // Everything not synced is lost; the records are durable, so are their origins.
        store.crash(&mut || 0);
        let (j, rep) = Journal::open(store, cfg).expect("reopen");
        assert_eq!(rep.records, 4);
        let mut reader = Reader::new(1);
        let mut got = Vec::new();
        while let Some((r, o)) = reader
            .next_from::<MemStore>(j.segment_for(reader.next_seq()), 4)
            .expect("read")
        {
            assert_eq!(r.op, write_op(r.seq));
            got.push(o);
        }
        assert_eq!(got, origins);
    }

    /// Power loss at random points: the durable prefix always survives, nothing after a gap is
    /// returned, and recovery never reports corruption for unsynced damage.
    #[test]
    fn crash_keeps_durable_prefix() {
        for seed in 0..300u64 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let store = MemStore::new();
            let cfg = JournalConfig {
                segment_bytes: rng.gen_range(2048..20000),
                journal_bytes_max: 1 << 30,
            };
            let (mut j, _) = Journal::open(store.clone(), cfg.clone()).expect("open");
            let mut durable = 0;
            let n = rng.gen_range(1..300);
            for i in 1..=n {
                j.append(&write_op(i)).expect("append");
                if rng.gen_ratio(1, 10) {
                    if let Some(plan) = j.sync_plan() {
                        for (_, f, _) in &plan.files {
                            f.sync().expect("sync");
                        }
                        j.mark_synced(&plan);
                        durable = j.durable_seq();
                    }
                }
            }
            drop(j);
            store.crash(&mut || rng.gen());
            let (j, rep) =
                Journal::open(store.clone(), cfg).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert!(j.next_seq() > durable, "seed {seed}: lost durable records");
            let recs = read_all(&j, 1);
            assert_eq!(recs.len() as u64, j.next_seq() - 1, "seed {seed}");
            for r in &recs {
                assert_eq!(r.op, write_op(r.seq), "seed {seed}");
            }
            assert_eq!(rep.records, recs.len() as u64);
        }
    }

    #[test]
    fn synced_corruption_is_reported() {
        let store = MemStore::new();
        let cfg = JournalConfig::default();
        let (mut j, _) = Journal::open(store.clone(), cfg.clone()).expect("open");
        for i in 1..=10 {
            j.append(&write_op(i)).expect("append");
        }
        let plan = j.sync_plan().expect("plan");
        for (_, f, _) in &plan.files {
            f.sync().expect("sync");
        }
        j.mark_synced(&plan);
        for i in 11..=12 {
            j.append(&write_op(i)).expect("append");
        }
        drop(j);
        // Damage the second record: records 11 and 12 say everything up to their start was synced.
        store.flip_bit(1, SEGMENT_HEADER_BYTES + 60, 3);
        match Journal::open(store, cfg) {
            Err(JournalError::Corrupt { segment: 1, .. }) => {}
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("corruption in synced data was not reported"),
        }
    }

    #[test]
    fn restart_at_continues_at_any_seq_and_survives_reopen() {
        let store = MemStore::new();
        let (mut j, _) = Journal::open(store.clone(), JournalConfig::default()).expect("open");
        j.append(&write_op(1)).expect("append");
        j.restart_at(500).expect("restart");
        assert_eq!((j.next_seq(), j.durable_seq()), (500, 499));
        assert!(j.append_at(501, &write_op(2)).is_err(), "gap refused");
        assert_eq!(j.append_at(500, &write_op(2)).expect("append_at"), 500);
        let plan = j.sync_plan().expect("plan");
        for (_, f, _) in &plan.files {
            f.sync().expect("sync");
        }
        j.mark_synced(&plan);
        drop(j);
        let (j, report) = Journal::open(store, JournalConfig::default()).expect("reopen");
        assert_eq!(j.next_seq(), 501);
        assert_eq!(report.records, 1);
        assert_eq!(j.first_seq(), 500);
    }

    #[test]
    fn failed_sync_poisons() {
        let store = MemStore::new();
        let (mut j, _) = Journal::open(store.clone(), JournalConfig::default()).expect("open");
        store.fail_next(1);
        assert!(j.append(&write_op(1)).is_err());
        assert!(matches!(
            j.append(&write_op(1)),
            Err(JournalError::Poisoned(_))
        ));
    }

    /// A mirror tree on the journal's file system is out of space (the CI failure of
    /// `remote::mirror_disk_full_local_writes_continue_and_the_mirror_recovers`: the journal's
    /// reservation ahead took the space freed for the mirror, which then never caught up). The
    /// journal gives back what it reserved ahead of its end and from then on, until the next
    /// segment, reserves only what each record needs; the records stay readable.
    #[test]
    fn release_spare_gives_the_reservation_ahead_back_and_stays_frugal() {
        let store = MemStore::new();
        let (mut j, _) = Journal::open(store.clone(), JournalConfig::default()).expect("open");
        store.set_free_space(Some(64 << 20));
        for i in 0..10 {
            j.append(&write_op(i)).expect("append");
        }
        let spare = j.spare_reserved();
        assert!(
            spare >= RESERVE_STEP_BYTES - (64 << 10),
            "the journal reserves a step ahead ({spare} bytes spare)"
        );
        let free = store.free_space().expect("limited");
        assert_eq!(j.release_spare().expect("release"), spare);
        let freed = store.free_space().expect("limited") - free;
        assert_eq!(
            freed, spare,
            "every spare byte goes back to the file system"
        );
        assert_eq!(j.spare_reserved(), 0);
        // Frugal from now on: each record reserves what it needs, nothing ahead.
        for i in 10..200 {
            j.append(&write_op(i)).expect("append");
            assert_eq!(j.spare_reserved(), 0, "record {i} reserved ahead again");
        }
        // The freed space is usable by others, and a record that does not fit is refused
        // cleanly, as on any full disk.
        store.set_free_space(Some(0));
        assert!(matches!(
            j.append(&write_op(200)),
            Err(JournalError::NoSpace { .. })
        ));
        j.append(&Op::Abort { seq: 200 })
            .expect("the Abort of the last record still fits");
        let plan = j.sync_plan().expect("something to sync");
        for (_, f, _) in &plan.files {
            f.sync().expect("sync");
        }
        j.mark_synced(&plan);
        drop(j);
        let (j, report) = Journal::open(store.clone(), JournalConfig::default()).expect("reopen");
        assert_eq!(report.records, 201);
        assert_eq!(j.next_seq(), 202);
    }

    /// A full disk is an ordinary event: the record that does not fit is refused with
    /// `NoSpace` and nothing else changes; the journal is not poisoned, the `Abort` of a record
    /// already appended always fits, the small records that free space still fit, and appends
    /// work again once space is freed. A failed fsync still poisons (`failed_sync_poisons`).
    #[test]
    fn full_disk_refuses_one_record_and_never_poisons() {
        let store = MemStore::new();
        let cfg = JournalConfig::default();
        let (mut j, _) = Journal::open(store.clone(), cfg.clone()).expect("open");
        let big = |i: u64| Op::Write {
            path: RelPath::new("big").expect("valid"),
            offset: i << 20,
            data: vec![i as u8; 1 << 20],
        };
        let unlink = Op::Unlink {
            path: RelPath::new("victim").expect("valid"),
            nlink: 1,
        };
        // Room for a few MiB of journal, then the disk is full.
        store.set_free_space(Some(3 << 20));
        let mut appended = Vec::new();
        let mut refused = 0;
        for i in 0..8 {
            match j.append(&big(i)) {
                Ok(seq) => appended.push((seq, big(i))),
                Err(JournalError::NoSpace { .. }) => refused += 1,
                Err(e) => panic!("a full disk must refuse with NoSpace, not {e}"),
            }
        }
        assert!(
            !appended.is_empty() && refused > 0,
            "{} appended, {refused} refused",
            appended.len()
        );
        assert!(j.poisoned().is_none(), "a full disk poisoned the journal");
        // The last record failed on the backing: its Abort fits although the disk is full.
        let last = appended.last().map(|(s, _)| *s).expect("one record");
        let abort = Op::Abort { seq: last };
        let aseq = j
            .append(&abort)
            .expect("the Abort of an appended record always fits");
        appended.push((aseq, abort));
        // Changes that free space still get their records.
        for _ in 0..100 {
            let seq = j
                .append(&unlink)
                .expect("an unlink fits in the namespace reserve");
            appended.push((seq, unlink.clone()));
        }
        let free = store.free_space().expect("limited");
        assert!(
            free < (1 << 20) + NAMESPACE_RESERVE_BYTES,
            "{free} bytes still free: the disk never filled"
        );
        // Space is freed: appends work again, without a restart.
        store.set_free_space(Some(8 << 20));
        let seq = j
            .append(&big(9))
            .expect("appends resume once space is freed");
        appended.push((seq, big(9)));
        let plan = j.sync_plan().expect("plan");
        for (_, f, _) in &plan.files {
            f.sync().expect("sync");
        }
        j.mark_synced(&plan);
        drop(j);
        // The segment holds exactly the appended records, consecutive, with no torn tail.
        let (j, rep) = Journal::open(store, cfg).expect("reopen");
        assert_eq!(rep.torn_bytes, 0);
        let recs = read_all(&j, 1);
        let got: Vec<(u64, Op)> = recs.into_iter().map(|r| (r.seq, r.op)).collect();
        assert_eq!(got.len(), appended.len());
        for ((gs, go), (es, eo)) in got.iter().zip(&appended) {
            assert_eq!((gs, go), (es, eo));
        }
    }

    /// An `Abort` never fails for the size limit: the limit keeps room for it behind every record.
    #[test]
    fn abort_fits_under_the_size_limit() {
        let (mut j, _) = Journal::open(
            MemStore::new(),
            JournalConfig {
                segment_bytes: 4096,
                journal_bytes_max: 3000,
            },
        )
        .expect("open");
        let mut last = 0;
        loop {
            match j.append(&write_op(1)) {
                Ok(s) => last = s,
                Err(JournalError::Full { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        j.append(&Op::Abort { seq: last }).expect("the Abort fits");
        assert!(j.bytes() <= 3000);
    }

    #[test]
    fn full_journal_refuses() {
        let store = MemStore::new();
        let (mut j, _) = Journal::open(
            store,
            JournalConfig {
                segment_bytes: 4096,
                journal_bytes_max: 2000,
            },
        )
        .expect("open");
        let mut n = 0;
        loop {
            match j.append(&write_op(1)) {
                Ok(_) => n += 1,
                Err(JournalError::Full { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(n > 5);
        assert!(j.bytes() <= 2000);
    }

    /// What a build from before the frame's flags (before `10bf3dc`) makes of one segment file,
    /// its rules reconstructed: its header check (version 1 only), its `parse_frame` (byte 13
    /// was reserved: a non-zero byte there made the frame invalid, checked after the crc) and its
    /// recovery scan (an invalid frame not followed by a frame proving later syncs is a torn
    /// tail, cut off).
    #[derive(Debug, PartialEq, Eq)]
    enum PreOrigin {
        Refused(String),
        Kept { records: u64, cut_bytes: u64 },
    }

    fn pre_origin_parse(buf: &[u8]) -> FrameParse {
        match frame::parse_frame(buf) {
            // Same checks in the same order, but for byte 13, then reserved.
            FrameParse::Record { flags, .. } if flags != 0 => {
                FrameParse::Invalid(frame::FrameError::Reserved)
            }
            other => other,
        }
    }

    fn pre_origin_open(seg: &[u8]) -> PreOrigin {
        if seg.len() < SEGMENT_HEADER_BYTES || seg[0..8] != frame::SEGMENT_MAGIC {
            return PreOrigin::Refused("header".into());
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&seg[0..12]), &seg[16..32]);
        if frame::u32_at(seg, 12) != crc {
            return PreOrigin::Refused("header checksum".into());
        }
        let version = frame::u32_at(seg, 8);
        if version != 1 {
            return PreOrigin::Refused(format!(
                "segment format version {version} is not supported by this build (supports 1)"
            ));
        }
        let mut off = SEGMENT_HEADER_BYTES;
        let mut records = 0;
        while off < seg.len() {
            if let FrameParse::Record { len, .. } = pre_origin_parse(&seg[off..]) {
                off += len;
                records += 1;
                continue;
            }
            let mut probe = off + 8;
            while probe + frame::FRAME_HEADER_BYTES <= seg.len() {
                if let FrameParse::Record { synced_to, .. } = pre_origin_parse(&seg[probe..]) {
                    if synced_to > off as u64 {
                        return PreOrigin::Refused(format!("corrupt at {off}"));
                    }
                }
                probe += 8;
            }
            return PreOrigin::Kept {
                records,
                cut_bytes: (seg.len() - off) as u64,
            };
        }
        PreOrigin::Kept {
            records,
            cut_bytes: 0,
        }
    }

    fn segment_bytes_of(store: &MemStore, id: u64) -> Vec<u8> {
        let f = store.open(id).expect("open segment");
        let mut buf = vec![0u8; f.len().expect("len") as usize];
        let n = read_full_at(&f, 0, &mut buf).expect("read");
        buf.truncate(n);
        buf
    }

    /// A downgrade to a build from before the frame's flags must refuse a segment whose last
    /// record came from the peer (acknowledged to it once durable), never take that frame for a
    /// torn tail and cut it.
    #[test]
    fn an_older_build_refuses_a_segment_with_a_peer_record_instead_of_cutting_it() {
        let store = MemStore::new();
        let cfg = JournalConfig {
            segment_bytes: 1 << 20,
            journal_bytes_max: 1 << 30,
        };
        let (mut j, _) = Journal::open(store.clone(), cfg).expect("open");
        j.append(&write_op(1)).expect("append");
        j.append_from(&write_op(2), Origin::Peer).expect("append");
        let plan = j.sync_plan().expect("work to do");
        for (_, f, _) in &plan.files {
            f.sync().expect("sync");
        }
        j.mark_synced(&plan);
        assert_eq!(j.durable_seq(), 2);
        drop(j);
        let ids = store.list().expect("list");
        let outcomes: Vec<PreOrigin> = ids
            .iter()
            .map(|id| pre_origin_open(&segment_bytes_of(&store, *id)))
            .collect();
        // The older build opens segments oldest first and stops at the first refusal.
        let first_refusal = outcomes
            .iter()
            .position(|o| matches!(o, PreOrigin::Refused(_)));
        for (id, o) in ids
            .iter()
            .zip(&outcomes)
            .take(first_refusal.unwrap_or(ids.len()))
        {
            assert!(
                matches!(o, PreOrigin::Kept { cut_bytes: 0, .. }),
                "an older build would cut segment {id}: {o:?}"
            );
        }
        let Some(at) = first_refusal else {
            panic!("an older build accepts this journal: {outcomes:?}");
        };
        assert_eq!(
            outcomes[at],
            PreOrigin::Refused(
                "segment format version 2 is not supported by this build (supports 1)".into()
            )
        );
    }

    /// A segment file of format 1 as a former build wrote it: header, then each record's frame
    /// with its origin's flags (builds before the flags wrote 0; the `origin` build, before
    /// version 2, wrote the peer flag into version-1 segments too).
    fn version_1_segment(store: &MemStore, id: u64, records: &[(Op, Origin)]) -> Vec<u8> {
        let mut bytes = frame::encode_segment_header_version(id, 1).to_vec();
        for (i, (op, origin)) in records.iter().enumerate() {
            let f = frame::encode_frame_from(id + i as u64, op, bytes.len() as u64, *origin);
            bytes.extend_from_slice(&frame::frame_to_vec(&f));
        }
        let f = store.create(id).expect("create");
        f.write_all_at(0, &[&bytes]).expect("write");
        f.sync().expect("sync");
        bytes
    }

    fn sync_all(j: &mut Journal<MemStore>) {
        if let Some(plan) = j.sync_plan() {
            for (_, f, _) in &plan.files {
                f.sync().expect("sync");
            }
            j.mark_synced(&plan);
        }
    }

    fn read_with_origins(j: &Journal<MemStore>, through: u64) -> Vec<(Record, Origin)> {
        let mut reader = Reader::new(j.first_seq());
        let mut got = Vec::new();
        while reader.next_seq() <= through {
            match reader
                .next_from::<MemStore>(j.segment_for(reader.next_seq()), through)
                .expect("read")
            {
                Some(r) => got.push(r),
                None => break,
            }
        }
        got
    }

    /// A journal a former build wrote (version-1 segments) is read as it is; the first append
    /// goes to a new version-2 segment, so the version-1 file stays what an older build reads,
    /// and what follows is refused by it, not cut.
    #[test]
    fn a_version_1_journal_is_read_and_continued_in_a_version_2_segment() {
        let store = MemStore::new();
        let cfg = JournalConfig {
            segment_bytes: 1 << 20,
            journal_bytes_max: 1 << 30,
        };
        let old = version_1_segment(
            &store,
            1,
            &[(write_op(1), Origin::Local), (write_op(2), Origin::Local)],
        );
        let (mut j, rep) = Journal::open(store.clone(), cfg.clone()).expect("open");
        assert_eq!((rep.records, rep.torn_bytes, rep.segments), (2, 0, 1));
        assert_eq!(j.next_seq(), 3);
        assert_eq!(j.durable_seq(), 2);
        assert_eq!(store.list().expect("list"), vec![1, 3], "rolled at open");
        assert_eq!(
            j.append_from(&write_op(3), Origin::Peer).expect("append"),
            3
        );
        assert_eq!(j.append(&write_op(4)).expect("append"), 4);
        sync_all(&mut j);
        assert_eq!(
            segment_bytes_of(&store, 1),
            old,
            "the version-1 file is untouched"
        );
        let new = segment_bytes_of(&store, 3);
        assert_eq!(
            frame::decode_segment_header(&new),
            Ok(frame::SegmentHeader {
                first_seq: 3,
                version: 2
            })
        );
        let got = read_with_origins(&j, 4);
        let seqs: Vec<u64> = got.iter().map(|(r, _)| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        for (r, _) in &got {
            assert_eq!(r.op, write_op(r.seq));
        }
        let origins: Vec<Origin> = got.iter().map(|(_, o)| *o).collect();
        assert_eq!(
            origins,
            vec![Origin::Local, Origin::Local, Origin::Peer, Origin::Local]
        );
        // An older build keeps the version-1 segment whole and refuses the next one.
        assert_eq!(
            pre_origin_open(&old),
            PreOrigin::Kept {
                records: 2,
                cut_bytes: 0
            }
        );
        assert!(matches!(pre_origin_open(&new), PreOrigin::Refused(m) if m.contains("version 2")));
        // Reopened: already in the current format, nothing rolls.
        drop(j);
        let (j, rep) = Journal::open(store.clone(), cfg).expect("reopen");
        assert_eq!((rep.records, j.next_seq()), (4, 5));
        assert_eq!(store.list().expect("list"), vec![1, 3]);
    }

    /// An empty version-1 segment (its id is the next seq) gets the version-2 header in place;
    /// a version-1 segment the `origin` build wrote flagged frames into reads with its origins.
    #[test]
    fn an_empty_version_1_segment_is_continued_under_a_version_2_header() {
        let store = MemStore::new();
        let cfg = JournalConfig {
            segment_bytes: 1 << 20,
            journal_bytes_max: 1 << 30,
        };
        version_1_segment(
            &store,
            1,
            &[(write_op(1), Origin::Local), (write_op(2), Origin::Peer)],
        );
        version_1_segment(&store, 3, &[]);
        let (mut j, rep) = Journal::open(store.clone(), cfg.clone()).expect("open");
        assert_eq!((rep.records, rep.segments, j.next_seq()), (2, 2, 3));
        assert_eq!(store.list().expect("list"), vec![1, 3]);
        let h = segment_bytes_of(&store, 3);
        assert_eq!(h.len(), SEGMENT_HEADER_BYTES);
        assert_eq!(
            frame::decode_segment_header(&h),
            Ok(frame::SegmentHeader {
                first_seq: 3,
                version: 2
            })
        );
        assert_eq!(
            j.append_from(&write_op(3), Origin::Peer).expect("append"),
            3
        );
        sync_all(&mut j);
        assert_eq!(store.list().expect("list"), vec![1, 3]);
        drop(j);
        let (j, rep) = Journal::open(store, cfg).expect("reopen");
        assert_eq!(rep.records, 3);
        let origins: Vec<Origin> = read_with_origins(&j, 3).iter().map(|(_, o)| *o).collect();
        assert_eq!(origins, vec![Origin::Local, Origin::Peer, Origin::Peer]);
    }

    /// Recovery of a version-2 segment still cuts a torn last frame (here a peer record's, cut
    /// short by a power loss before its sync) and keeps appending in that segment.
    #[test]
    fn a_torn_last_frame_of_a_version_2_segment_is_cut() {
        let store = MemStore::new();
        let cfg = JournalConfig {
            segment_bytes: 1 << 20,
            journal_bytes_max: 1 << 30,
        };
        let (mut j, _) = Journal::open(store.clone(), cfg.clone()).expect("open");
        for i in 1..=3 {
            j.append_from(&write_op(i), Origin::Peer).expect("append");
        }
        sync_all(&mut j);
        let durable = segment_bytes_of(&store, 1).len() as u64;
        j.append_from(&write_op(4), Origin::Peer).expect("append");
        let live = segment_bytes_of(&store, 1).len() as u64;
        drop(j);
        // Keep 20 bytes of the unsynced frame (the page's live bytes copied: 20 is even).
        store.crash(&mut || 20);
        assert_eq!(segment_bytes_of(&store, 1).len() as u64, durable + 20);
        assert!(live > durable + 20, "the frame was cut short");
        let (mut j, rep) = Journal::open(store.clone(), cfg).expect("reopen");
        assert_eq!((rep.records, rep.torn_bytes, rep.segments), (3, 20, 1));
        assert_eq!(segment_bytes_of(&store, 1).len() as u64, durable);
        assert_eq!(j.append(&write_op(4)).expect("append"), 4);
        sync_all(&mut j);
        assert_eq!(
            store.list().expect("list"),
            vec![1],
            "no roll for a version-2 segment"
        );
        let got = read_with_origins(&j, 4);
        let origins: Vec<Origin> = got.iter().map(|(_, o)| *o).collect();
        assert_eq!(
            origins,
            vec![Origin::Peer, Origin::Peer, Origin::Peer, Origin::Local]
        );
        for (r, _) in &got {
            assert_eq!(r.op, write_op(r.seq));
        }
    }
}
