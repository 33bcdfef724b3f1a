//! The replication link's state machines, one per side, with no I/O: messages in, decisions and
//! messages out. The network shell (`mirrorfs::remote`, `mirrorfs::serve`) moves the bytes.
//!
//! ```text
//!  primary (Sender)                               mirror (Receiver)
//!    Hello{volume, generation, first_held, next} ─▶ on_hello: Welcome{state, durable, applied}
//!    on_welcome: decide ─ Start{Resume|InitialSync} ─▶ on_start: where its journal continues
//!    Records{settled, r[s..t]}  (byte window) ────▶ on_records: consecutive? ─ append
//!    on_ack: positions (monotonic, ≤ sent) ◀──────── Ack{received, durable, applied, checkpoint}
//! ```
//!
//! Initial sync, real-time streaming and catching up after an outage are one mechanism: the
//! primary streams its journal from the mirror's durable position (CAWRM); only the starting
//! point differs.

use std::collections::VecDeque;

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
    fn new(code: u16, retry: bool, message: impl Into<String>) -> Self {
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
    volume_id: VolumeId,
    generation: u64,
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
    /// A sender for `volume_id`/`generation` that keeps at most `window` bytes unacknowledged.
    pub fn new(volume_id: VolumeId, generation: u64, window: u64) -> Self {
        Sender {
            volume_id,
            generation,
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
            volume_id: self.volume_id,
            generation: self.generation,
            first_held: span.first_held,
            next_seq: span.next_seq,
            compress,
            name: name.to_string(),
        }
    }

    /// Decides where the stream starts from the mirror's `Welcome` and the journal's span now.
    /// `new_sync_id` is used if an initial copy is needed; `running_sync` is the id of an initial
    /// copy this primary is still streaming (after a reconnect it simply resumes).
    pub fn on_welcome(
        &mut self,
        msg: &Msg,
        span: JournalSpan,
        new_sync_id: u32,
        running_sync: Option<u32>,
    ) -> Result<Start, LinkError> {
        let Msg::Welcome {
            version,
            state,
            volume_id,
            generation,
            durable,
            applied,
            sync_id,
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
        let start = match state {
            MirrorState::Empty => Start::InitialSync {
                from: span.next_seq,
                sync_id: new_sync_id,
            },
            _ if *volume_id != self.volume_id => {
                return Err(LinkError::new(
                    error_code::VOLUME,
                    false,
                    format!(
                        "the mirror holds a copy of another volume ({}, this one is {}); give it an empty directory, or run `mirrorfs serve --force-resync` on the mirror to replace its contents",
                        hex(volume_id),
                        hex(&self.volume_id)
                    ),
                ))
            }
            _ if *generation != self.generation => {
                return Err(LinkError::new(
                    error_code::GENERATION,
                    false,
                    format!(
                        "the mirror's copy is of generation {generation}, this primary is at generation {}: one of them was promoted; see docs/protocol.md (re-attaching a primary) before forcing anything",
                        self.generation
                    ),
                ))
            }
            MirrorState::Syncing
                if running_sync == Some(*sync_id)
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
            MirrorState::Consistent if *durable >= span.next_seq => {
                return Err(LinkError::new(
                    error_code::GENERATION,
                    false,
                    format!(
                        "the mirror holds records up to {durable} but this primary's journal ends at {}: the primary lost part of its journal (restored from an older state?); refusing to overwrite the mirror",
                        span.next_seq.saturating_sub(1)
                    ),
                ))
            }
            MirrorState::Consistent if durable + 1 < span.first_held => Start::Resync {
                from: span.next_seq,
                sync_id: new_sync_id,
                reason: format!(
                    "the mirror needs records from {} but the journal holds only {} onward (it passed its size limit)",
                    durable + 1,
                    span.first_held
                ),
            },
            MirrorState::Consistent => Start::Resume { from: durable + 1 },
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

/// What the mirror knows of its own copy, for `Welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorCopy {
    pub state: MirrorState,
    pub volume_id: VolumeId,
    pub generation: u64,
    /// Every record ≤ this is durable in the mirror's journal.
    pub durable: u64,
    pub applied: u64,
    pub sync_id: u32,
    /// The mirror was promoted: it refuses every stream.
    pub promoted: bool,
}

/// What the mirror shell must do before records flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// Continue its journal at `seq` (its durable position + 1): records it holds past its durable
    /// position were never acknowledged and are replaced.
    Resume { seq: u64 },
    /// Keep the tree, restart the journal at `seq`, send the manifest, and apply the resync
    /// `sync_id` (idempotently) until its `SyncDone`.
    Resync { seq: u64, sync_id: u32 },
    /// Discard its copy and journal, empty the tree, and restart the journal at `seq` with the
    /// initial copy `sync_id`; remember `volume_id`/`generation`.
    InitialSync {
        seq: u64,
        sync_id: u32,
        volume_id: VolumeId,
        generation: u64,
    },
}

/// The mirror's side of one link.
#[derive(Debug)]
pub struct Receiver {
    copy: MirrorCopy,
    hello: Option<(VolumeId, u64)>,
    /// The next seq expected in `Records`.
    expected: Option<u64>,
    /// Name of the mirror's state directory in its root: no record may touch it.
    reserved: Vec<u8>,
}

impl Receiver {
    /// A receiver for a mirror whose copy is `copy`; `reserved` is the name of its state directory
    /// at the tree's root (records naming it are refused).
    pub fn new(copy: MirrorCopy, reserved: &[u8]) -> Self {
        Receiver {
            copy,
            hello: None,
            expected: None,
            reserved: reserved.to_vec(),
        }
    }

    /// Answers `Hello` with `Welcome`, or refuses.
    pub fn on_hello(&mut self, msg: &Msg) -> Result<Msg, LinkError> {
        let Msg::Hello {
            version,
            volume_id,
            generation,
            compress,
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
        self.hello = Some((*volume_id, *generation));
        let c = self.copy;
        Ok(Msg::Welcome {
            version: PROTOCOL_VERSION,
            state: c.state,
            volume_id: c.volume_id,
            generation: c.generation,
            durable: c.durable,
            applied: c.applied,
            sync_id: c.sync_id,
            compress: *compress,
        })
    }

    /// Takes `Start`: checks it against what was announced and returns what the shell must do.
    pub fn on_start(&mut self, msg: &Msg) -> Result<Begin, LinkError> {
        let Msg::Start { mode, seq, sync_id } = *msg else {
            return Err(unexpected(msg, "Start"));
        };
        let Some((volume_id, generation)) = self.hello else {
            return Err(unexpected(msg, "Hello"));
        };
        let begin = match mode {
            StartMode::Resume => {
                if !matches!(
                    self.copy.state,
                    MirrorState::Consistent | MirrorState::Syncing
                ) || volume_id != self.copy.volume_id
                    || generation != self.copy.generation
                {
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
                Begin::Resume { seq }
            }
            StartMode::Resync => {
                let ours = volume_id == self.copy.volume_id
                    && generation == self.copy.generation
                    && self.copy.state != MirrorState::Empty;
                if !ours {
                    return Err(LinkError::new(
                        error_code::REFUSED,
                        false,
                        "the primary asked for a resync, but this mirror holds no copy of its volume and generation",
                    ));
                }
                if seq == 0 || sync_id == 0 {
                    return Err(LinkError::new(
                        error_code::BAD_FRAME,
                        false,
                        "resync with seq or sync id 0",
                    ));
                }
                Begin::Resync { seq, sync_id }
            }
            StartMode::InitialSync => {
                let ours = self.copy.volume_id == volume_id && self.copy.generation == generation;
                let allowed = match self.copy.state {
                    MirrorState::Empty => true,
                    MirrorState::Syncing | MirrorState::NeedsResync => ours,
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
                    volume_id,
                    generation,
                }
            }
        };
        self.expected = Some(match begin {
            Begin::Resume { seq } | Begin::Resync { seq, .. } | Begin::InitialSync { seq, .. } => {
                seq
            }
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

fn touches_reserved(op: &Op, reserved: &[u8]) -> bool {
    if reserved.is_empty() {
        return false;
    }
    let hit =
        |p: &crate::path::RelPath| p.as_bytes().split(|b| *b == b'/').next() == Some(reserved);
    match op {
        Op::Link { from, to } => hit(from) || hit(to),
        Op::Rename { from, to, .. } => hit(from) || hit(to),
        Op::Sync { op, .. } => touches_reserved(op, reserved),
        other => other.path().is_some_and(hit),
    }
}

fn unexpected(msg: &Msg, want: &str) -> LinkError {
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
    use crate::path::RelPath;

    const VOL: VolumeId = [1; 16];

    fn welcome(state: MirrorState, vol: VolumeId, generation: u64, durable: u64) -> Msg {
        Msg::Welcome {
            version: PROTOCOL_VERSION,
            state,
            volume_id: vol,
            generation,
            durable,
            applied: durable,
            sync_id: 0,
            compress: false,
        }
    }

    const SPAN: JournalSpan = JournalSpan {
        first_held: 100,
        next_seq: 200,
    };

    #[test]
    fn start_decisions() {
        let mut s = Sender::new(VOL, 1, 1 << 20);
        assert_eq!(
            s.on_welcome(&welcome(MirrorState::Empty, [0; 16], 0, 0), SPAN, 9, None),
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
                None
            ),
            Ok(Start::Resume { from: 200 })
        );
        // The journal no longer holds what it needs.
        assert!(matches!(
            s.on_welcome(&welcome(MirrorState::Consistent, VOL, 1, 50), SPAN, 9, None),
            Ok(Start::Resync { .. })
        ));
        // Just held: 99 + 1 == first_held.
        assert_eq!(
            s.on_welcome(&welcome(MirrorState::Consistent, VOL, 1, 99), SPAN, 9, None),
            Ok(Start::Resume { from: 100 })
        );
        let e = s
            .on_welcome(
                &welcome(MirrorState::Consistent, [2; 16], 1, 150),
                SPAN,
                9,
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
            )
            .expect_err("other generation");
        assert_eq!(e.code, error_code::GENERATION);
        // The mirror is ahead of the journal: never overwrite it.
        let e = s
            .on_welcome(
                &welcome(MirrorState::Consistent, VOL, 1, 250),
                SPAN,
                9,
                None,
            )
            .expect_err("ahead");
        assert_eq!(e.code, error_code::GENERATION);
        assert!(matches!(
            s.on_welcome(&welcome(MirrorState::Syncing, VOL, 1, 120), SPAN, 9, None),
            Ok(Start::InitialSync { from: 200, .. })
        ));
        // The copy is still being streamed: a reconnect resumes it.
        assert_eq!(
            s.on_welcome(
                &welcome(MirrorState::Syncing, VOL, 1, 120),
                SPAN,
                9,
                Some(0)
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
            )
            .expect_err("error message");
        assert!(e.retry && e.message.contains("busy"));
    }

    #[test]
    fn window_and_acks() {
        let mut s = Sender::new(VOL, 1, 1000);
        assert!(!s.may_send(), "nothing before the handshake");
        s.on_welcome(
            &welcome(MirrorState::Consistent, VOL, 1, 150),
            SPAN,
            9,
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

    fn copy(state: MirrorState, durable: u64) -> MirrorCopy {
        MirrorCopy {
            state,
            volume_id: VOL,
            generation: 1,
            durable,
            applied: durable,
            sync_id: 0,
            promoted: false,
        }
    }

    fn hello(vol: VolumeId) -> Msg {
        Msg::Hello {
            version: PROTOCOL_VERSION,
            volume_id: vol,
            generation: 1,
            first_held: 1,
            next_seq: 300,
            compress: false,
            name: "p".into(),
        }
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
        let mut r = Receiver::new(copy(MirrorState::Consistent, 150), b".mirrorfs");
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
        assert_eq!(r.on_start(&ok), Ok(Begin::Resume { seq: 151 }));
        r.on_records(&[rec(151, b"a"), rec(152, b"b")])
            .expect("in order");
        assert!(r.on_records(&[rec(154, b"c")]).is_err(), "gap");
        let mut r2 = Receiver::new(copy(MirrorState::Consistent, 150), b".mirrorfs");
        r2.on_hello(&hello(VOL)).expect("welcome");
        r2.on_start(&ok).expect("start");
        assert!(r2.on_records(&[rec(151, b".mirrorfs/journal")]).is_err());
        assert!(r2.on_records(&[rec(151, b".mirrorfs")]).is_err());
    }

    #[test]
    fn promoted_mirror_refuses() {
        let mut c = copy(MirrorState::Consistent, 10);
        c.promoted = true;
        let mut r = Receiver::new(c, b".mirrorfs");
        assert_eq!(
            r.on_hello(&hello(VOL)).map_err(|e| e.code),
            Err(error_code::PROMOTED)
        );
    }

    #[test]
    fn empty_mirror_takes_an_initial_copy() {
        let mut r = Receiver::new(
            MirrorCopy {
                state: MirrorState::Empty,
                volume_id: [0; 16],
                generation: 0,
                durable: 0,
                applied: 0,
                sync_id: 0,
                promoted: false,
            },
            b".mirrorfs",
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
                volume_id: VOL,
                generation: 1
            })
        );
        r.on_records(&[rec(300, b"x")]).expect("first record");
    }
}
