//! The replication link's state machines, one per side, with no I/O: messages in, decisions and
//! messages out. The network shell (`mirrorfs::remote`, `mirrorfs::serve`) moves the bytes.
//!
//! ```text
//!  primary (Sender)                               mirror (Receiver)
//!    Hello{volume, generation, first_held, next} ─▶ on_hello: Welcome{state, durable, applied}
//!    on_welcome: decide ─ Start{mode, seq, sync_id} ─▶ on_start: where its journal continues
//!    Records{settled, r[s..t]}  (byte window) ────▶ on_records: consecutive? ─ append
//!    on_ack: positions (monotonic, ≤ sent) ◀──────── Ack{received, durable, applied, checkpoint}
//! ```
//!
//! Initial sync, real-time streaming and catching up after an outage are one mechanism: the
//! primary streams its journal from the mirror's durable position (CAWRM); only the starting
//! point differs.

use std::collections::VecDeque;

use crate::history::{compare, Comparison, History, Relation, Site};
use crate::op::{Op, Record};
use crate::wire::{error_code, MirrorState, Msg, StartMode, VolumeId, PROTOCOL_VERSION};

/// A fatal condition of one connection (the connection is closed; the shell decides whether to
/// retry). `code` is the `Error` message code to send the peer, if any.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct LinkError {
    pub code: u16,
    pub message: String,
    /// False if retrying cannot help (a wrong volume, a promoted mirror, a version mismatch).
    pub retry: bool,
}

impl LinkError {
    pub fn new(code: u16, retry: bool, message: impl Into<String>) -> Self {
        LinkError {
            code,
            message: message.into(),
            retry,
        }
    }

    /// The `Error` message telling the peer why.
    pub fn to_msg(&self) -> Msg {
        Msg::Error {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

/// A mirror's four positions; each only grows, and `checkpoint ≤ applied ≤ durable ≤ received`
/// (applied may pass durable only on the primary's local mirrors, never here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Positions {
    /// Every record ≤ this is in the mirror's memory.
    pub received: u64,
    /// Every record ≤ this is durable in the mirror's journal.
    pub durable: u64,
    /// Every record ≤ this is applied to the mirror's tree.
    pub applied: u64,
    /// Every record ≤ this is durably applied to the tree.
    pub checkpoint: u64,
}

/// What the primary's journal holds, for the start decision.
#[derive(Debug, Clone, Copy)]
pub struct JournalSpan {
    /// Oldest seq still held.
    pub first_held: u64,
    /// Seq the next append gets.
    pub next_seq: u64,
}

/// The primary's decision after `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Stream from `from` (the mirror's durable position + 1).
    Resume { from: u64 },
    /// The mirror is empty (or holds an interrupted copy): copy the tree live through the journal
    /// with `sync_id`, streaming from `from` (the journal's next seq when the copy begins).
    InitialSync { from: u64, sync_id: u32 },
    /// The journal no longer holds what the mirror needs (or the mirror asks for it): the
    /// mirror sends its manifest (block hashes), the primary copies live through the journal
    /// only what differs, with `sync_id`, streaming from `from`. Never a silent full copy.
    Resync {
        from: u64,
        sync_id: u32,
        reason: String,
    },
}

/// The primary's side of one link.
#[derive(Debug)]
pub struct Sender {
    history: History,
    /// The next seq to send.
    next_send: u64,
    /// Records sent and not yet acknowledged as received: (last seq of a batch, bytes).
    in_flight: VecDeque<(u64, u64)>,
    in_flight_bytes: u64,
    window: u64,
    pos: Positions,
    started: bool,
}

impl Sender {
    /// A sender for the volume and generations of `history` that keeps at most `window` bytes
    /// unacknowledged.
    pub fn new(history: History, window: u64) -> Self {
        Sender {
            history,
            next_send: 0,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            window: window.max(1),
            pos: Positions::default(),
            started: false,
        }
    }

    /// The first message.
    pub fn hello(&self, span: JournalSpan, compress: bool, name: &str) -> Msg {
        Msg::Hello {
            version: PROTOCOL_VERSION,
            volume_id: self.history.volume_id,
            generation: self.history.current().map_or(0, |g| g.number),
            first_held: span.first_held,
            next_seq: span.next_seq,
            compress,
            name: name.to_string(),
            history: self.history.generations.clone(),
        }
    }

    /// Decides where the stream starts from the mirror's `Welcome` and the journal's span now.
    /// `new_sync_id` is used if an initial copy is needed; `running_sync` is the id of an initial
    /// copy this primary is still streaming (after a reconnect it simply resumes).
    /// `must_resync` is the primary's own record that this mirror must be resynchronised (its
    /// reason: `STATE/mirrors/ID/NEEDS_RESYNC`), whatever the mirror's copy says.
    pub fn on_welcome(
        &mut self,
        msg: &Msg,
        span: JournalSpan,
        new_sync_id: u32,
        running_sync: Option<u32>,
        must_resync: Option<&str>,
    ) -> Result<Start, LinkError> {
        let Msg::Welcome {
            version,
            state,
            volume_id,
            durable,
            applied,
            sync_id,
            history,
            ..
        } = msg
        else {
            return Err(unexpected(msg, "Welcome"));
        };
        if *version != PROTOCOL_VERSION {
            return Err(LinkError::new(
                error_code::VERSION,
                false,
                format!("the mirror speaks protocol version {version}, this primary {PROTOCOL_VERSION}: upgrade the older side"),
            ));
        }
        let theirs = History {
            volume_id: *volume_id,
            generations: history.clone(),
        };
        let same_generation = theirs.current() == self.history.current();
        let start = match state {
            MirrorState::Empty => Start::InitialSync {
                from: span.next_seq,
                sync_id: new_sync_id,
            },
            _ if *volume_id != self.history.volume_id => {
                return Err(LinkError::new(
                    error_code::VOLUME,
                    false,
                    format!(
                        "the mirror holds a copy of another volume ({}, this one is {}); give it an empty directory, or run `mirrorfs serve --force-resync` on the mirror to replace its contents",
                        hex(volume_id),
                        hex(&self.history.volume_id)
                    ),
                ))
            }
            MirrorState::Syncing
                if same_generation
                    && running_sync == Some(*sync_id)
                    && durable + 1 >= span.first_held
                    && *durable < span.next_seq =>
            {
                Start::Resume { from: durable + 1 }
            }
            MirrorState::Syncing => Start::InitialSync {
                from: span.next_seq,
                sync_id: new_sync_id,
            },
            MirrorState::NeedsResync => Start::Resync {
                from: span.next_seq,
                sync_id: new_sync_id,
                reason: "the mirror reported that its copy must be resynchronised".into(),
            },
            MirrorState::Consistent => {
                let c = compare(
                    Site {
                        history: &self.history,
                        end: span.next_seq.saturating_sub(1),
                    },
                    Site {
                        history: &theirs,
                        end: *durable,
                    },
                );
                match c.relation {
                    Relation::Equal | Relation::BBehind => {}
                    _ => return Err(diverged(&c, "this primary", "the mirror")),
                }
                if durable + 1 < span.first_held {
                    Start::Resync {
                        from: span.next_seq,
                        sync_id: new_sync_id,
                        reason: format!(
                            "the mirror needs records from {} but the journal holds only {} onward (it passed its size limit)",
                            durable + 1,
                            span.first_held
                        ),
                    }
                } else {
                    Start::Resume { from: durable + 1 }
                }
            }
        };
        // The primary's own marker outranks a resume (never an initial copy, never a refusal):
        // the resync starts at the journal's end, and so does the stream.
        let start = match (start, must_resync) {
            (Start::Resume { .. }, Some(reason)) => Start::Resync {
                from: span.next_seq,
                sync_id: new_sync_id,
                reason: reason.to_string(),
            },
            (start, _) => start,
        };
        let from = match &start {
            Start::Resume { from }
            | Start::InitialSync { from, .. }
            | Start::Resync { from, .. } => *from,
        };
        self.next_send = from;
        let base = from.saturating_sub(1);
        // `Welcome` does not say how far the mirror has checkpointed: 0 until its first `Ack`.
        self.pos = Positions {
            received: base,
            durable: base,
            applied: (*applied).min(base),
            checkpoint: 0,
        };
        self.started = true;
        Ok(start)
    }

    /// Takes the mirror's `Diverged` (its answer to `Hello` instead of `Welcome`; the message
    /// exists only in protocol version 4, so decoding it proves the version) with the journal's
    /// span now: the two histories, compared as in [`Sender::on_welcome`], must really have
    /// diverged with the common point the mirror names, else the link is refused.
    pub fn on_diverged(&mut self, msg: &Msg, span: JournalSpan) -> Result<Divergence, LinkError> {
        let Msg::Diverged {
            common_generation,
            common_seq,
            end,
            history,
        } = msg
        else {
            return Err(unexpected(msg, "Diverged"));
        };
        let theirs = History {
            volume_id: self.history.volume_id,
            generations: history.clone(),
        };
        let c = compare(
            Site {
                history: &self.history,
                end: span.next_seq.saturating_sub(1),
            },
            Site {
                history: &theirs,
                end: *end,
            },
        );
        let named = crate::history::CommonPoint {
            generation: *common_generation,
            seq: *common_seq,
        };
        if c.relation != Relation::Diverged || c.common != Some(named) {
            return Err(LinkError::new(
                error_code::BAD_FRAME,
                false,
                format!(
                    "the mirror reports a divergence at generation {common_generation} seq {common_seq} (its end {end}), but the histories say otherwise ({})",
                    c.describe("this primary", "the mirror")
                ),
            ));
        }
        Ok(Divergence {
            common_generation: *common_generation,
            common_seq: *common_seq,
            their_end: *end,
            their_history: theirs,
        })
    }

    /// The `Start` message for a decision.
    pub fn start_msg(start: &Start) -> Option<Msg> {
        match start {
            Start::Resume { from } => Some(Msg::Start {
                mode: StartMode::Resume,
                seq: *from,
                sync_id: 0,
            }),
            Start::InitialSync { from, sync_id } => Some(Msg::Start {
                mode: StartMode::InitialSync,
                seq: *from,
                sync_id: *sync_id,
            }),
            Start::Resync { from, sync_id, .. } => Some(Msg::Start {
                mode: StartMode::Resync,
                seq: *from,
                sync_id: *sync_id,
            }),
        }
    }

    /// The next seq to send.
    pub fn next_send(&self) -> u64 {
        self.next_send
    }

    /// Whether another batch may be sent now (the byte window is not full).
    pub fn may_send(&self) -> bool {
        self.started && self.in_flight_bytes < self.window
    }

    /// Bytes sent and not yet acknowledged as received.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes
    }

    /// Records that the batch of records `next_send..=last` (`bytes` on the wire) was handed to
    /// the socket.
    pub fn sent(&mut self, last: u64, bytes: u64) {
        if last < self.next_send {
            return;
        }
        self.next_send = last + 1;
        self.in_flight.push_back((last, bytes));
        self.in_flight_bytes += bytes;
    }

    /// The mirror's positions as last acknowledged.
    pub fn positions(&self) -> Positions {
        self.pos
    }

    /// Takes an `Ack`: validates it (monotonic, consistent, never beyond what was sent) and opens
    /// the window.
    pub fn on_ack(&mut self, msg: &Msg) -> Result<Positions, LinkError> {
        let Msg::Ack {
            received,
            durable,
            applied,
            checkpoint,
        } = *msg
        else {
            return Err(unexpected(msg, "Ack"));
        };
        let sent = self.next_send.saturating_sub(1);
        let bad = |why: &str| {
            LinkError::new(
                error_code::BAD_FRAME,
                true,
                format!("invalid acknowledgement ({why}): received {received}, durable {durable}, applied {applied}, checkpoint {checkpoint}, sent {sent}"),
            )
        };
        if received > sent {
            return Err(bad("acknowledges records never sent"));
        }
        if durable > received || checkpoint > applied || applied > durable {
            return Err(bad("positions out of order"));
        }
        let p = self.pos;
        if received < p.received
            || durable < p.durable
            || applied < p.applied
            || checkpoint < p.checkpoint
        {
            return Err(bad("a position went backwards"));
        }
        self.pos = Positions {
            received,
            durable,
            applied,
            checkpoint,
        };
        while let Some(&(last, bytes)) = self.in_flight.front() {
            if last > received {
                break;
            }
            self.in_flight.pop_front();
            self.in_flight_bytes -= bytes;
        }
        Ok(self.pos)
    }
}

/// A mirror's offer to reintegrate (its `Diverged`, checked by [`Sender::on_diverged`]): the
/// common point, the mirror's last record and its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    pub common_generation: u64,
    pub common_seq: u64,
    pub their_end: u64,
    /// The mirror's history, under this primary's volume id (it is the same volume).
    pub their_history: History,
}

/// Checks a `Tail` batch: its records continue at `expected_next` without a gap; returns the
/// seq the next batch must start at.
pub fn check_tail(expected_next: u64, records: &[Record]) -> Result<u64, LinkError> {
    let mut want = expected_next;
    for r in records {
        if r.seq != want {
            return Err(LinkError::new(
                error_code::BAD_FRAME,
                true,
                format!(
                    "reintegration tail gap: expected record {want}, got {}",
                    r.seq
                ),
            ));
        }
        want += 1;
    }
    Ok(want)
}

/// Checks the ops of an `Entry` answering a `Fetch` for `as_path`: each one names exactly
/// `as_path` and only creates that one entry or sets its content and attributes (no rename,
/// link, removal, nor anything wrapped).
pub fn check_entry_ops(as_path: &crate::path::RelPath, ops: &[Op]) -> Result<(), LinkError> {
    for (i, op) in ops.iter().enumerate() {
        let allowed = matches!(
            op,
            Op::Create { .. }
                | Op::Mkdir { .. }
                | Op::Symlink { .. }
                | Op::Mknod { .. }
                | Op::Write { .. }
                | Op::Truncate { .. }
                | Op::SetMode { .. }
                | Op::SetOwner { .. }
                | Op::SetTimes { .. }
                | Op::SetXattr { .. }
        );
        if !allowed || op.path() != Some(as_path) {
            return Err(LinkError::new(
                error_code::BAD_FRAME,
                false,
                format!(
                    "op {} of a fetched entry ({}) is not one that recreates {}",
                    i + 1,
                    op.name(),
                    String::from_utf8_lossy(as_path.as_bytes())
                ),
            ));
        }
    }
    Ok(())
}

/// What the mirror knows of its own copy, for `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorCopy {
    pub state: MirrorState,
    /// The copy's volume and generations (empty when `Empty`).
    pub history: History,
    /// Every record ≤ this is durable in the mirror's journal (the copy's end).
    pub durable: u64,
    pub applied: u64,
    pub sync_id: u32,
    /// The mirror was promoted and not yet mounted: it refuses every stream.
    pub promoted: bool,
    /// `Empty`, but the directory holds files that are no mirrorfs copy (and the daemon was not
    /// told to replace them): every stream is refused before anything starts.
    pub foreign: bool,
    /// The oldest seq the mirror's journal still holds (a reintegration needs every record after
    /// the common point).
    pub first_held: u64,
}

/// What the mirror shell must do before records flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// Continue its journal at `seq` (its durable position + 1): records it holds past its durable
    /// position were never acknowledged and are replaced. From now on the copy follows the
    /// primary's `history` (an ancestor caught up from an older generation adopts the newer ones).
    Resume { seq: u64, history: History },
    /// Keep the tree, restart the journal at `seq`, send the manifest, and apply the resync
    /// `sync_id` (idempotently) until its `SyncDone`; the copy takes the primary's `history`.
    Resync {
        seq: u64,
        sync_id: u32,
        history: History,
    },
    /// Discard its copy and journal, empty the tree, and restart the journal at `seq` with the
    /// initial copy `sync_id`; remember the primary's `history`.
    InitialSync {
        seq: u64,
        sync_id: u32,
        history: History,
    },
}

/// The mirror's side of one link.
#[derive(Debug)]
pub struct Receiver {
    copy: MirrorCopy,
    /// The mirror's directory, for messages.
    label: String,
    /// The primary's history, once `Hello` was accepted.
    hello: Option<History>,
    /// Why `Hello` was refused as a divergence, for the shell to add what it knows (which files).
    divergence: Option<Comparison>,
    /// The next seq expected in `Records`.
    expected: Option<u64>,
    /// Name of the mirror's state directory in its root: no record may touch it.
    reserved: Vec<u8>,
}

impl Receiver {
    /// A receiver for a mirror whose copy is `copy`; `reserved` is the name of its state directory
    /// at the tree's root (records naming it are refused); `label` names the mirror in messages.
    pub fn new(copy: MirrorCopy, reserved: &[u8], label: &str) -> Self {
        Receiver {
            copy,
            label: label.to_string(),
            hello: None,
            divergence: None,
            expected: None,
            reserved: reserved.to_vec(),
        }
    }

    /// Answers `Hello` with `Welcome`, or refuses.
    pub fn on_hello(&mut self, msg: &Msg) -> Result<Msg, LinkError> {
        let Msg::Hello {
            version,
            volume_id,
            next_seq,
            compress,
            history,
            ..
        } = msg
        else {
            return Err(unexpected(msg, "Hello"));
        };
        if *version != PROTOCOL_VERSION {
            return Err(LinkError::new(
                error_code::VERSION,
                false,
                format!("the primary speaks protocol version {version}, this mirror {PROTOCOL_VERSION}: upgrade the older side"),
            ));
        }
        if self.copy.promoted {
            return Err(LinkError::new(
                error_code::PROMOTED,
                false,
                "this mirror was promoted to a primary and accepts no stream; see docs/protocol.md (re-attaching a primary)",
            ));
        }
        let primary = History {
            volume_id: *volume_id,
            generations: history.clone(),
        };
        if self.copy.state == MirrorState::Empty && self.copy.foreign {
            return Err(LinkError::new(
                error_code::REFUSED,
                false,
                format!(
                    "mirror directory {} is not empty and holds no mirrorfs copy; empty it, or restart `mirrorfs serve` with --force-resync to replace its contents",
                    self.label
                ),
            ));
        }
        if self.copy.state == MirrorState::Consistent && self.copy.history.volume_id == *volume_id {
            // Never overwrite what the primary lacks: the mirror may take the primary's records
            // only if it is an ancestor of the primary (or the same).
            let c = compare(
                Site {
                    history: &self.copy.history,
                    end: self.copy.durable,
                },
                Site {
                    history: &primary,
                    end: next_seq.saturating_sub(1),
                },
            );
            if !matches!(c.relation, Relation::Equal | Relation::ABehind) {
                self.divergence = Some(c);
                return Err(diverged(&c, "this mirror", "the primary"));
            }
        }
        self.hello = Some(primary);
        let c = &self.copy;
        Ok(Msg::Welcome {
            version: PROTOCOL_VERSION,
            state: c.state,
            volume_id: c.history.volume_id,
            generation: c.history.current().map_or(0, |g| g.number),
            durable: c.durable,
            applied: c.applied,
            sync_id: c.sync_id,
            compress: *compress,
            history: c.history.generations.clone(),
        })
    }

    /// Takes `Start`: checks it against what was announced and returns what the shell must do.
    pub fn on_start(&mut self, msg: &Msg) -> Result<Begin, LinkError> {
        let Msg::Start { mode, seq, sync_id } = *msg else {
            return Err(unexpected(msg, "Start"));
        };
        let Some(history) = self.hello.clone() else {
            return Err(unexpected(msg, "Hello"));
        };
        let same_volume = history.volume_id == self.copy.history.volume_id;
        let begin = match mode {
            StartMode::Resume => {
                // A consistent copy was compared with the primary's history in `on_hello`; an
                // interrupted copy resumes only within the same generation.
                let ok = match self.copy.state {
                    MirrorState::Consistent => same_volume,
                    MirrorState::Syncing => {
                        same_volume && self.copy.history.current() == history.current()
                    }
                    _ => false,
                };
                if !ok {
                    return Err(LinkError::new(
                        error_code::REFUSED,
                        false,
                        "the primary asked to resume, but this mirror holds no consistent copy of its volume",
                    ));
                }
                if seq != self.copy.durable + 1 {
                    return Err(LinkError::new(
                        error_code::REFUSED,
                        true,
                        format!(
                            "the primary asked to resume at {seq}, but this mirror's journal is durable through {}",
                            self.copy.durable
                        ),
                    ));
                }
                Begin::Resume { seq, history }
            }
            StartMode::Resync => {
                // A consistent copy that has diverged was refused in `on_hello`; one that asks
                // for a resync (`NeedsResync`) or is an ancestor may take one.
                let ours = same_volume && self.copy.state != MirrorState::Empty;
                if !ours {
                    return Err(LinkError::new(
                        error_code::REFUSED,
                        false,
                        "the primary asked for a resync, but this mirror holds no copy of its volume",
                    ));
                }
                if seq == 0 || sync_id == 0 {
                    return Err(LinkError::new(
                        error_code::BAD_FRAME,
                        false,
                        "resync with seq or sync id 0",
                    ));
                }
                Begin::Resync {
                    seq,
                    sync_id,
                    history,
                }
            }
            StartMode::InitialSync => {
                let allowed = match self.copy.state {
                    MirrorState::Empty => !self.copy.foreign,
                    MirrorState::Syncing | MirrorState::NeedsResync => same_volume,
                    MirrorState::Consistent => false,
                };
                if !allowed {
                    return Err(LinkError::new(
                        error_code::REFUSED,
                        false,
                        "the primary asked for an initial copy, but this mirror holds a copy it would overwrite; refusing (empty the directory, or pass --force-resync to `mirrorfs serve`)",
                    ));
                }
                if seq == 0 || sync_id == 0 {
                    return Err(LinkError::new(
                        error_code::BAD_FRAME,
                        false,
                        "initial copy with seq or sync id 0",
                    ));
                }
                Begin::InitialSync {
                    seq,
                    sync_id,
                    history,
                }
            }
        };
        self.expected = Some(match begin {
            Begin::Resume { seq, .. }
            | Begin::Resync { seq, .. }
            | Begin::InitialSync { seq, .. } => seq,
        });
        Ok(begin)
    }

    /// Takes a batch: it must continue exactly where the last one ended and touch nothing of the
    /// mirror's own state. Nothing of a refused batch may be used.
    pub fn on_records(&mut self, records: &[Record]) -> Result<(), LinkError> {
        let Some(mut want) = self.expected else {
            return Err(LinkError::new(
                error_code::BAD_FRAME,
                true,
                "records before Start",
            ));
        };
        for r in records {
            if r.seq != want {
                return Err(LinkError::new(
                    error_code::BAD_FRAME,
                    true,
                    format!("sequence gap: expected record {want}, got {}", r.seq),
                ));
            }
            if touches_reserved(&r.op, &self.reserved) {
                return Err(LinkError::new(
                    error_code::BAD_FRAME,
                    false,
                    format!(
                        "record {} names the mirror's own state directory; refused",
                        r.seq
                    ),
                ));
            }
            want += 1;
        }
        self.expected = Some(want);
        Ok(())
    }
}

impl Receiver {
    /// The seq the next `Records` must start with (`None` before `Start`).
    pub fn expected(&self) -> Option<u64> {
        self.expected
    }

    /// Where and how the mirror's copy and the primary parted, if `Hello` was refused for that.
    pub fn divergence(&self) -> Option<Comparison> {
        self.divergence
    }
}

/// The refusal of a link between two sites that each hold something the other lacks (or where
/// the receiving side holds more): never overwritten, never retried.
fn diverged(c: &Comparison, me: &str, peer: &str) -> LinkError {
    LinkError::new(
        error_code::DIVERGED,
        false,
        format!(
            "refused: the copies have diverged ({}); nothing was changed on either side",
            c.describe(me, peer)
        ),
    )
}

/// Whether `p` is the state directory named `reserved` at the root, or beneath it.
pub(crate) fn under_reserved(p: &crate::path::RelPath, reserved: &[u8]) -> bool {
    !reserved.is_empty() && p.as_bytes().split(|b| *b == b'/').next() == Some(reserved)
}

fn touches_reserved(op: &Op, reserved: &[u8]) -> bool {
    if reserved.is_empty() {
        return false;
    }
    let hit = |p: &crate::path::RelPath| under_reserved(p, reserved);
    match op {
        Op::Link { from, to } => hit(from) || hit(to),
        Op::Rename { from, to, .. } => hit(from) || hit(to),
        Op::Sync { op, .. } => touches_reserved(op, reserved),
        other => other.path().is_some_and(hit),
    }
}

/// The error for a message that is not the one the conversation expects (`want`); a peer's
/// `Error` is passed on as its refusal.
pub fn unexpected(msg: &Msg, want: &str) -> LinkError {
    if let Msg::Error { code, message } = msg {
        return LinkError::new(
            *code,
            *code == error_code::BUSY || *code == error_code::STORAGE,
            format!("the peer refused: {message}"),
        );
    }
    LinkError::new(
        error_code::BAD_FRAME,
        true,
        format!("expected {want}, got message type {}", msg.type_code()),
    )
}

/// Lower-case hex of a volume id.
pub fn hex(id: &VolumeId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Generation;
    use crate::path::RelPath;

    const VOL: VolumeId = [1; 16];

    /// A history of generations `1..=generation`, generation n starting at seq 10·(n−1)+1.
    fn hist(vol: VolumeId, generation: u64) -> History {
        History {
            volume_id: vol,
            generations: (1..=generation)
                .map(|n| Generation {
                    number: n,
                    id: 100 + n,
                    start: 10 * (n - 1) + 1,
                })
                .collect(),
        }
    }

    fn welcome_h(state: MirrorState, h: &History, durable: u64) -> Msg {
        Msg::Welcome {
            version: PROTOCOL_VERSION,
            state,
            volume_id: h.volume_id,
            generation: h.current().map_or(0, |g| g.number),
            durable,
            applied: durable,
            sync_id: 0,
            compress: false,
            history: h.generations.clone(),
        }
    }

    fn welcome(state: MirrorState, vol: VolumeId, generation: u64, durable: u64) -> Msg {
        welcome_h(state, &hist(vol, generation), durable)
    }

    const SPAN: JournalSpan = JournalSpan {
        first_held: 100,
        next_seq: 200,
    };

    #[test]
    fn start_decisions() {
        let mut s = Sender::new(hist(VOL, 1), 1 << 20);
        assert_eq!(
            s.on_welcome(
                &welcome(MirrorState::Empty, [0; 16], 0, 0),
                SPAN,
                9,
                None,
                None
            ),
            Ok(Start::InitialSync {
                from: 200,
                sync_id: 9
            })
        );
        assert_eq!(
            s.on_welcome(
                &welcome(MirrorState::Consistent, VOL, 1, 150),
                SPAN,
                9,
                None,
                None
            ),
            Ok(Start::Resume { from: 151 })
        );
        assert_eq!(s.next_send(), 151);
        // Caught up exactly: resume at the journal's end.
        assert_eq!(
            s.on_welcome(
                &welcome(MirrorState::Consistent, VOL, 1, 199),
                SPAN,
                9,
                None,
                None
            ),
            Ok(Start::Resume { from: 200 })
        );
        // The journal no longer holds what it needs.
        assert!(matches!(
            s.on_welcome(
                &welcome(MirrorState::Consistent, VOL, 1, 50),
                SPAN,
                9,
                None,
                None
            ),
            Ok(Start::Resync { .. })
        ));
        // Just held: 99 + 1 == first_held.
        assert_eq!(
            s.on_welcome(
                &welcome(MirrorState::Consistent, VOL, 1, 99),
                SPAN,
                9,
                None,
                None
            ),
            Ok(Start::Resume { from: 100 })
        );
        let e = s
            .on_welcome(
                &welcome(MirrorState::Consistent, [2; 16], 1, 150),
                SPAN,
                9,
                None,
                None,
            )
            .expect_err("other volume");
        assert_eq!((e.code, e.retry), (error_code::VOLUME, false));
        let e = s
            .on_welcome(
                &welcome(MirrorState::Consistent, VOL, 2, 150),
                SPAN,
                9,
                None,
                None,
            )
            .expect_err("a promoted mirror is not an ancestor");
        assert_eq!((e.code, e.retry), (error_code::DIVERGED, false));
        assert!(e.message.contains("promoted"), "{}", e.message);
        // The mirror is ahead of the journal: never overwrite it.
        let e = s
            .on_welcome(
                &welcome(MirrorState::Consistent, VOL, 1, 250),
                SPAN,
                9,
                None,
                None,
            )
            .expect_err("ahead");
        assert_eq!((e.code, e.retry), (error_code::DIVERGED, false));
        assert!(
            e.message.contains("the mirror holds 51 change(s)"),
            "{}",
            e.message
        );
        assert!(matches!(
            s.on_welcome(
                &welcome(MirrorState::Syncing, VOL, 1, 120),
                SPAN,
                9,
                None,
                None
            ),
            Ok(Start::InitialSync { from: 200, .. })
        ));
        // The copy is still being streamed: a reconnect resumes it.
        assert_eq!(
            s.on_welcome(
                &welcome(MirrorState::Syncing, VOL, 1, 120),
                SPAN,
                9,
                Some(0),
                None
            ),
            Ok(Start::Resume { from: 121 })
        );
        let e = s
            .on_welcome(
                &Msg::Error {
                    code: error_code::BUSY,
                    message: "busy".into(),
                },
                SPAN,
                9,
                None,
                None,
            )
            .expect_err("error message");
        assert!(e.retry && e.message.contains("busy"));
    }

    /// Bug found from outside: the primary's own `NEEDS_RESYNC` marker turned a resume into a
    /// resync in the shell, after the decision, while the journal still held the mirror's next
    /// record; the sender kept the resume's send position and streamed from there (the mirror:
    /// `sequence gap`; the primary: its acknowledgement "acknowledges records never sent"). The
    /// marker is an input of the decision, and a resync streams from its own start.
    #[test]
    fn the_primarys_resync_marker_turns_a_resume_into_a_resync_streaming_from_its_start() {
        let mut s = Sender::new(hist(VOL, 1), 1 << 20);
        let w = welcome(MirrorState::Consistent, VOL, 1, 150);
        let start = s
            .on_welcome(&w, SPAN, 9, None, Some("asked"))
            .expect("a resync");
        assert_eq!(
            start,
            Start::Resync {
                from: 200,
                sync_id: 9,
                reason: "asked".into()
            }
        );
        assert_eq!(
            s.next_send(),
            200,
            "the stream starts where the resync does"
        );
        assert_eq!(s.positions().durable, 199);
        // The mirror restarts its journal at the resync's start and says so.
        let mut r = Receiver::new(copy(MirrorState::Consistent, 150), b".mirrorfs", "m");
        r.on_hello(&hello_h(&hist(VOL, 1), 200)).expect("welcome");
        let msg = Sender::start_msg(&start).expect("start message");
        assert!(matches!(
            r.on_start(&msg),
            Ok(Begin::Resync {
                seq: 200,
                sync_id: 9,
                ..
            })
        ));
        s.on_ack(&Msg::Ack {
            received: 199,
            durable: 199,
            applied: 199,
            checkpoint: 199,
        })
        .expect("the mirror's first acknowledgement is in range");
        s.sent(201, 100);
        r.on_records(&[rec(200, b"a"), rec(201, b"b")])
            .expect("the first batch is where the mirror expects it");
        // An interrupted copy this primary is still streaming is resynchronised too.
        assert!(matches!(
            s.on_welcome(
                &welcome(MirrorState::Syncing, VOL, 1, 120),
                SPAN,
                9,
                Some(0),
                Some("asked")
            ),
            Ok(Start::Resync { from: 200, .. })
        ));
        assert_eq!(s.next_send(), 200);
        // The marker changes nothing else: an empty mirror takes an initial copy, a mirror ahead
        // of the journal is still refused.
        assert!(matches!(
            s.on_welcome(
                &welcome(MirrorState::Empty, [0; 16], 0, 0),
                SPAN,
                9,
                None,
                Some("asked")
            ),
            Ok(Start::InitialSync { from: 200, .. })
        ));
        let e = s
            .on_welcome(
                &welcome(MirrorState::Consistent, VOL, 1, 250),
                SPAN,
                9,
                None,
                Some("asked"),
            )
            .expect_err("ahead");
        assert_eq!(e.code, error_code::DIVERGED);
    }

    #[test]
    fn window_and_acks() {
        let mut s = Sender::new(hist(VOL, 1), 1000);
        assert!(!s.may_send(), "nothing before the handshake");
        s.on_welcome(
            &welcome(MirrorState::Consistent, VOL, 1, 150),
            SPAN,
            9,
            None,
            None,
        )
        .expect("resume");
        assert!(s.may_send());
        s.sent(160, 600);
        assert!(s.may_send());
        s.sent(170, 600);
        assert!(!s.may_send(), "window full");
        let ack = |r, d, a, c| Msg::Ack {
            received: r,
            durable: d,
            applied: a,
            checkpoint: c,
        };
        assert!(s.on_ack(&ack(171, 160, 150, 150)).is_err(), "beyond sent");
        assert!(
            s.on_ack(&ack(160, 161, 150, 150)).is_err(),
            "durable > received"
        );
        let p = s.on_ack(&ack(160, 155, 152, 151)).expect("valid ack");
        assert_eq!(p.durable, 155);
        assert!(s.may_send(), "first batch acknowledged");
        assert_eq!(s.in_flight_bytes(), 600);
        assert!(
            s.on_ack(&ack(160, 154, 152, 151)).is_err(),
            "went backwards"
        );
        s.on_ack(&ack(170, 170, 170, 170)).expect("all");
        assert_eq!(s.in_flight_bytes(), 0);
    }

    /// The old primary's history (generation 1, then a generation 2 of its own, id 999, from
    /// seq 11) against this primary's `hist(VOL, 2)`: common point generation 1 at seq 10.
    fn old_primary() -> History {
        let mut h = hist(VOL, 1);
        h.generations.push(Generation {
            number: 2,
            id: 999,
            start: 11,
        });
        h
    }

    fn diverged_msg(common_generation: u64, common_seq: u64, end: u64, h: &History) -> Msg {
        Msg::Diverged {
            common_generation,
            common_seq,
            end,
            history: h.generations.clone(),
        }
    }

    #[test]
    fn a_divergence_is_taken_only_as_the_histories_show_it() {
        let span = JournalSpan {
            first_held: 1,
            next_seq: 30,
        };
        let mut s = Sender::new(hist(VOL, 2), 1 << 20);
        assert_eq!(
            s.on_diverged(&diverged_msg(1, 10, 20, &old_primary()), span),
            Ok(Divergence {
                common_generation: 1,
                common_seq: 10,
                their_end: 20,
                their_history: old_primary(),
            })
        );
        // Another common point than the histories give.
        for (g, seq) in [(1, 9), (1, 11), (2, 10)] {
            let e = s
                .on_diverged(&diverged_msg(g, seq, 20, &old_primary()), span)
                .expect_err("wrong common point");
            assert_eq!((e.code, e.retry), (error_code::BAD_FRAME, false));
        }
        // An ancestor (no generation of its own, nothing after the common point) did not
        // diverge; nor did a copy of the same history.
        assert!(s
            .on_diverged(&diverged_msg(1, 10, 10, &hist(VOL, 1)), span)
            .is_err());
        assert!(s
            .on_diverged(&diverged_msg(2, 29, 29, &hist(VOL, 2)), span)
            .is_err());
        // No shared generation: no common point to reintegrate from.
        let stranger = History {
            volume_id: VOL,
            generations: vec![Generation {
                number: 1,
                id: 5,
                start: 1,
            }],
        };
        assert!(s
            .on_diverged(&diverged_msg(1, 0, 20, &stranger), span)
            .is_err());
        // A refusal instead is the peer's refusal; a Welcome is unexpected.
        let e = s
            .on_diverged(
                &Msg::Error {
                    code: error_code::DIVERGED,
                    message: "no".into(),
                },
                span,
            )
            .expect_err("refused");
        assert_eq!(e.code, error_code::DIVERGED);
        let e = s
            .on_diverged(&welcome(MirrorState::Consistent, VOL, 2, 20), span)
            .expect_err("welcome");
        assert_eq!(e.code, error_code::BAD_FRAME);
    }

    #[test]
    fn a_tail_must_be_consecutive() {
        let rec = |seq| Record {
            seq,
            op: Op::Abort { seq: 1 },
        };
        assert_eq!(check_tail(11, &[]), Ok(11));
        assert_eq!(check_tail(11, &[rec(11), rec(12)]), Ok(13));
        assert!(check_tail(11, &[rec(12)]).is_err());
        assert!(check_tail(11, &[rec(11), rec(11)]).is_err());
        assert!(check_tail(11, &[rec(10)]).is_err());
    }

    #[test]
    fn entry_ops_recreate_exactly_the_fetched_name() {
        let p = |b: &[u8]| RelPath::new(b).expect("path");
        let at = p(b"d/f.conflict");
        let good = vec![
            Op::Create {
                path: at.clone(),
                mode: 0o644,
                uid: 0,
                gid: 0,
            },
            Op::Write {
                path: at.clone(),
                offset: 0,
                data: b"x".to_vec(),
            },
            Op::Truncate {
                path: at.clone(),
                size: 1,
            },
            Op::SetXattr {
                path: at.clone(),
                name: b"user.a".to_vec(),
                value: vec![],
                flags: 0,
            },
            Op::SetOwner {
                path: at.clone(),
                uid: Some(1),
                gid: None,
            },
            Op::SetMode {
                path: at.clone(),
                mode: 0o600,
            },
            Op::SetTimes {
                path: at.clone(),
                atime: None,
                mtime: None,
            },
        ];
        assert_eq!(check_entry_ops(&at, &good), Ok(()));
        assert_eq!(check_entry_ops(&at, &[]), Ok(()));
        for op in [
            Op::Mkdir {
                path: at.clone(),
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
            Op::Symlink {
                path: at.clone(),
                target: b"t".to_vec(),
                uid: 0,
                gid: 0,
            },
            Op::Mknod {
                path: at.clone(),
                mode: libc_fifo(),
                rdev: 0,
                uid: 0,
                gid: 0,
            },
        ] {
            assert_eq!(check_entry_ops(&at, &[op]), Ok(()));
        }
        // Another name, or an op that would touch another entry, is refused.
        let other = Op::Truncate {
            path: p(b"d/f"),
            size: 0,
        };
        assert!(check_entry_ops(&at, &[good[0].clone(), other]).is_err());
        for op in [
            Op::Rename {
                from: at.clone(),
                to: p(b"x"),
                flags: 0,
                from_ino: 1,
            },
            Op::Link {
                from: at.clone(),
                to: p(b"x"),
            },
            Op::Unlink {
                path: at.clone(),
                nlink: 1,
            },
            Op::Rmdir { path: at.clone() },
            Op::RemoveXattr {
                path: at.clone(),
                name: b"user.a".to_vec(),
            },
            Op::Sync {
                mirror: 1,
                op: Box::new(good[0].clone()),
            },
            Op::Abort { seq: 1 },
        ] {
            let e = check_entry_ops(&at, &[op]).expect_err("refused");
            assert_eq!((e.code, e.retry), (error_code::BAD_FRAME, false));
        }
    }

    /// A FIFO's mode bits (S_IFIFO | 0644), without depending on libc in core.
    fn libc_fifo() -> u32 {
        0o010_644
    }

    fn copy_h(state: MirrorState, history: History, durable: u64) -> MirrorCopy {
        MirrorCopy {
            state,
            history,
            durable,
            applied: durable,
            sync_id: 0,
            promoted: false,
            foreign: false,
            first_held: 1,
        }
    }

    fn copy(state: MirrorState, durable: u64) -> MirrorCopy {
        copy_h(state, hist(VOL, 1), durable)
    }

    fn hello_h(h: &History, next_seq: u64) -> Msg {
        Msg::Hello {
            version: PROTOCOL_VERSION,
            volume_id: h.volume_id,
            generation: h.current().map_or(0, |g| g.number),
            first_held: 1,
            next_seq,
            compress: false,
            name: "p".into(),
            history: h.generations.clone(),
        }
    }

    fn hello(vol: VolumeId) -> Msg {
        hello_h(&hist(vol, 1), 300)
    }

    fn rec(seq: u64, path: &[u8]) -> Record {
        Record {
            seq,
            op: Op::Rmdir {
                path: RelPath::new(path).expect("path"),
            },
        }
    }

    #[test]
    fn receiver_checks_start_and_sequence() {
        let mut r = Receiver::new(copy(MirrorState::Consistent, 150), b".mirrorfs", "m");
        assert!(
            r.on_records(&[rec(151, b"a")]).is_err(),
            "records before Start"
        );
        assert!(matches!(
            r.on_hello(&hello(VOL)),
            Ok(Msg::Welcome { durable: 150, .. })
        ));
        let bad_resume = Msg::Start {
            mode: StartMode::Resume,
            seq: 140,
            sync_id: 0,
        };
        assert!(r.on_start(&bad_resume).is_err());
        let overwrite = Msg::Start {
            mode: StartMode::InitialSync,
            seq: 300,
            sync_id: 3,
        };
        assert!(
            r.on_start(&overwrite).is_err(),
            "a consistent copy is never overwritten"
        );
        let ok = Msg::Start {
            mode: StartMode::Resume,
            seq: 151,
            sync_id: 0,
        };
        assert_eq!(
            r.on_start(&ok),
            Ok(Begin::Resume {
                seq: 151,
                history: hist(VOL, 1)
            })
        );
        r.on_records(&[rec(151, b"a"), rec(152, b"b")])
            .expect("in order");
        assert!(r.on_records(&[rec(154, b"c")]).is_err(), "gap");
        let mut r2 = Receiver::new(copy(MirrorState::Consistent, 150), b".mirrorfs", "m");
        r2.on_hello(&hello(VOL)).expect("welcome");
        r2.on_start(&ok).expect("start");
        assert!(r2.on_records(&[rec(151, b".mirrorfs/journal")]).is_err());
        assert!(r2.on_records(&[rec(151, b".mirrorfs")]).is_err());
    }

    #[test]
    fn promoted_mirror_refuses() {
        let mut c = copy(MirrorState::Consistent, 10);
        c.promoted = true;
        let mut r = Receiver::new(c, b".mirrorfs", "m");
        assert_eq!(
            r.on_hello(&hello(VOL)).map_err(|e| e.code),
            Err(error_code::PROMOTED)
        );
    }

    #[test]
    fn empty_mirror_takes_an_initial_copy() {
        let mut r = Receiver::new(
            copy_h(MirrorState::Empty, History::default(), 0),
            b".mirrorfs",
            "m",
        );
        r.on_hello(&hello(VOL)).expect("welcome");
        let m = Msg::Start {
            mode: StartMode::InitialSync,
            seq: 300,
            sync_id: 3,
        };
        assert_eq!(
            r.on_start(&m),
            Ok(Begin::InitialSync {
                seq: 300,
                sync_id: 3,
                history: hist(VOL, 1),
            })
        );
        r.on_records(&[rec(300, b"x")]).expect("first record");
    }

    #[test]
    fn a_non_empty_directory_without_a_copy_is_refused_before_anything_starts() {
        let mut c = copy_h(MirrorState::Empty, History::default(), 0);
        c.foreign = true;
        let mut r = Receiver::new(c, b".mirrorfs", "/srv/m");
        let e = r.on_hello(&hello(VOL)).expect_err("foreign tree");
        assert_eq!((e.code, e.retry), (error_code::REFUSED, false));
        assert!(e.message.contains("/srv/m") && e.message.contains("--force-resync"));
        let m = Msg::Start {
            mode: StartMode::InitialSync,
            seq: 300,
            sync_id: 3,
        };
        assert!(
            r.on_start(&m).is_err(),
            "no Start without an accepted Hello"
        );
    }

    /// Issue 6, finding 2 at the link: the old primary P (generation 1 through seq 10) is served
    /// as a mirror of M, promoted at seq 6 (generation 2).
    #[test]
    fn failback_the_old_primary_is_refused_unless_it_is_an_ancestor() {
        let p = hist(VOL, 1);
        let mut m = p.clone();
        m.promote(202, 6);
        // P wrote seqs 6..10 after M stopped at 5: both sides refuse.
        let mut r = Receiver::new(copy_h(MirrorState::Consistent, p.clone(), 10), b".m", "P");
        let e = r.on_hello(&hello_h(&m, 6)).expect_err("diverged");
        assert_eq!((e.code, e.retry), (error_code::DIVERGED, false));
        let d = r.divergence().expect("the comparison");
        assert_eq!(d.common.map(|c| (c.generation, c.seq)), Some((1, 5)));
        assert_eq!((d.a_after, d.b_after), (5, 0));
        assert!(
            e.message.contains("this mirror holds 5 change(s)"),
            "{}",
            e.message
        );
        let mut s = Sender::new(m.clone(), 1 << 20);
        let span = JournalSpan {
            first_held: 6,
            next_seq: 6,
        };
        let e = s
            .on_welcome(
                &welcome_h(MirrorState::Consistent, &p, 10),
                span,
                9,
                None,
                None,
            )
            .expect_err("the primary refuses too");
        assert_eq!(e.code, error_code::DIVERGED);
        // P stopped exactly at 5: it is an ancestor, caught up from 6, and adopts M's history.
        let mut r = Receiver::new(copy_h(MirrorState::Consistent, p.clone(), 5), b".m", "P");
        let w = r.on_hello(&hello_h(&m, 8)).expect("an ancestor is welcome");
        let span = JournalSpan {
            first_held: 6,
            next_seq: 8,
        };
        let start = s.on_welcome(&w, span, 9, None, None).expect("resume");
        assert_eq!(start, Start::Resume { from: 6 });
        let msg = Sender::start_msg(&start).expect("start message");
        assert_eq!(
            r.on_start(&msg),
            Ok(Begin::Resume {
                seq: 6,
                history: m.clone()
            })
        );
        // A copy of another volume is refused by the primary (never overwritten).
        let e = s
            .on_welcome(
                &welcome_h(MirrorState::Consistent, &hist([3; 16], 1), 5),
                span,
                9,
                None,
                None,
            )
            .expect_err("another volume");
        assert_eq!(e.code, error_code::VOLUME);
    }
}
