//! The mirror daemon's side of one connection (`mirrorfs serve`), as a sans-IO state machine.
//!
//! ```text
//!  primary ─ Hello ─▶ on_hello ─▶ Welcome (or a refusal)
//!          ─ Start ─▶ on_start ─▶ Begin::{Resume, InitialSync, Resync} (the shell adopts,
//!                                 empties and restarts, or sends its manifest)
//!          ─ Records/Ping/Pong/Error ─▶ on_message ─▶ Append{records, settled} / Reply(Pong) /
//!                                                     PeerError / a refusal
//!          ─ Hello, the copy diverged and the policy is to reintegrate ─▶ Diverged; then
//!            Reintegrate/Fetch/Reintegrated/Ping ─▶ on_message ─▶ SendTail / Fetch /
//!            Reintegrated / Reply(Pong) (the shell reads its journal and tree, changes nothing
//!            until Reintegrated)
//!  journal and applier positions ─▶ ack ─▶ Ack (when they changed, or as a heartbeat) and
//!                                          whether the initial copy or resync completed (until
//!                                          the shell recorded it: sync_recorded)
//! ```
//!
//! The shell (`net/serve/session.rs`) owns the TLS connection, the journal, the applier thread and the meta
//! file; the network simulation (`sim/net.rs`) drives this same machine over its simulated
//! network and journal. Every decision about the stream — which records may be appended, what
//! settled position the applier may use, when an ack is due and what it carries, when the copy
//! is complete, how a refusal is classified — is made here.

use std::time::Duration;

use crate::history::{CommonPoint, Comparison, History};
use crate::link::{under_reserved, Begin, LinkError, MirrorCopy, Positions, Receiver};
use crate::op::{Op, Record};
use crate::path::RelPath;
use crate::wire::{error_code, MirrorState, Msg, VolumeId};

/// An unchanged ack is sent again after this long (the primary's liveness check).
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the primary's `Hello`.
    Hello,
    /// `Welcome` sent; waiting for `Start`.
    Start,
    /// Records flow; acks are due.
    Streaming,
    /// `Diverged` sent: the primary takes this copy's changes after the common point
    /// (`Reintegrate`, `Fetch`) until its `Reintegrated`.
    Reintegrating,
    /// The primary's `Reintegrated` was taken: the shell saves and marks the copy, answers, and
    /// closes.
    Reintegrated,
}

/// What the daemon does when the connecting primary's history diverged from its copy's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnDiverged {
    /// Offer the copy's changes after the common point (`Diverged`) so the primary takes them
    /// in; if the journal no longer holds them all, refuse as with `Refuse`.
    #[default]
    Reintegrate,
    /// Refuse (error 9) and change nothing.
    Refuse,
    /// Save the changes to `STATE/diverged/` and follow the primary (the shell does that after
    /// the refusal; a fresh session answers).
    Discard,
}

/// What the shell does with one message of the streaming phase.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// Append `records` at their seqs (already checked: in sequence, no reserved name), then let
    /// the applier go up to `settled` (see [`Session::on_message`]).
    Append { records: &'a [Record], settled: u64 },
    /// Send this reply.
    Reply(Msg),
    /// The primary reported an error: close without a reply.
    PeerError { code: u16, message: String },
    /// Nothing to do.
    Nothing,
    /// Reintegration: send the journal's records `from..=to` (`Write`s without data) as `Tail`
    /// batches, the last one marked (`from > to`: one empty last batch).
    SendTail { from: u64, to: u64 },
    /// Reintegration: send the ops that recreate the copy's entry at `path` under `as_path`
    /// (`Entry` messages answering `id`).
    Fetch {
        id: u32,
        path: &'a RelPath,
        as_path: &'a RelPath,
    },
    /// Reintegration is complete on the primary: save the diverged changes, mark the copy for
    /// a resync, answer `Reintegrated{conflicts}`, and end the session.
    Reintegrated { conflicts: u64 },
    /// The primary offers the UDP data path from record `first` (the next record this session
    /// expects): the shell answers `UdpAccept` with its UDP port, or 0 to decline. Records that
    /// arrive over UDP come back here as `Records` messages, so they are checked the same way.
    UdpOffer { first: u64 },
    /// The primary's UDP sender has handed out every record through `through`
    /// (`UdpReceiver::note_sent`).
    UdpSent { through: u64 },
}

/// Where a reintegration is.
#[derive(Debug, Clone, Copy)]
struct Reintegration {
    common: CommonPoint,
    /// The copy's last record.
    end: u64,
    /// `Reintegrate` was taken (once).
    tail_asked: bool,
}

/// What an ack round yields.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AckStep {
    /// The ack to send, if one is due.
    pub ack: Option<Msg>,
    /// The initial copy (or resync) completed: its `SyncDone` is durably applied, so the copy is
    /// consistent from now on. The shell records it in its meta file and then calls
    /// [`Session::sync_recorded`]; until then every round says so again (a failed write is
    /// retried, by this session or, with [`Session::pending_sync_done`], the next).
    pub sync_complete: bool,
}

/// The mirror daemon's session on one connection.
#[derive(Debug)]
pub struct Session {
    rx: Receiver,
    phase: Phase,
    /// The mirror in messages.
    label: String,
    /// The copy as the session found it: its state and volume (for the initial copy's check).
    copy_state: MirrorState,
    copy_volume: VolumeId,
    /// The primary's volume, once `Start` was taken.
    primary_volume: Option<VolumeId>,
    /// The copy's sync id (the one a `SyncDone` must name to complete it).
    sync_id: u32,
    /// The seq of the `SyncDone` that completes the copy once checkpointed (0: none pending).
    sync_done_at: u64,
    /// The positions last acknowledged, and since when (the caller's clock, see `ack_at`).
    last_ack: Option<Positions>,
    last_sent_at: Option<Duration>,
    on_diverged: OnDiverged,
    /// The copy's history, end and the oldest seq its journal holds (for `Diverged`).
    copy_history: History,
    copy_end: u64,
    first_held: u64,
    reserved: Vec<u8>,
    reint: Option<Reintegration>,
}

impl Session {
    /// A session for a mirror whose copy is `copy` (`reserved`: its state directory's name at
    /// the root; `label`: the mirror in messages). `pending_sync_done` carries a `SyncDone` a
    /// previous session received but that was not yet checkpointed (0 if none).
    ///
    /// A diverged primary is offered reintegration unless [`Session::with_on_diverged`] says
    /// otherwise.
    pub fn new(copy: MirrorCopy, reserved: &[u8], label: &str, pending_sync_done: u64) -> Self {
        Session {
            on_diverged: OnDiverged::default(),
            copy_history: copy.history.clone(),
            copy_end: copy.durable,
            first_held: copy.first_held,
            reserved: reserved.to_vec(),
            reint: None,
            label: label.to_string(),
            copy_state: copy.state,
            copy_volume: copy.history.volume_id,
            primary_volume: None,
            sync_id: copy.sync_id,
            rx: Receiver::new(copy, reserved, label),
            phase: Phase::Hello,
            sync_done_at: pending_sync_done,
            last_ack: None,
            last_sent_at: None,
        }
    }

    /// The daemon's policy for a diverged primary.
    pub fn with_on_diverged(mut self, policy: OnDiverged) -> Self {
        self.on_diverged = policy;
        self
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The `SyncDone` still waiting for its checkpoint (0 if none), for the next session.
    pub fn pending_sync_done(&self) -> u64 {
        self.sync_done_at
    }

    /// Answers `Hello` with `Welcome`, or refuses (see [`Session::divergence`] for a diverged
    /// copy, which the shell explains or, if told to, saves and discards). A diverged copy whose
    /// policy is to reintegrate, whose common point with the primary is known and whose journal
    /// still holds every record after it answers `Diverged` instead and enters
    /// [`Phase::Reintegrating`].
    pub fn on_hello(&mut self, msg: &Msg) -> Result<Msg, LinkError> {
        if self.phase != Phase::Hello {
            return Err(unexpected(msg));
        }
        let w = match self.rx.on_hello(msg) {
            Ok(w) => w,
            Err(e) => {
                return match self.offer_reintegration(&e) {
                    Some(d) => {
                        self.phase = Phase::Reintegrating;
                        Ok(d)
                    }
                    None => Err(e),
                }
            }
        };
        self.phase = Phase::Start;
        Ok(w)
    }

    /// `Diverged` for a refusal `e`, if this copy may offer its changes.
    fn offer_reintegration(&mut self, e: &LinkError) -> Option<Msg> {
        if e.code != error_code::DIVERGED || self.on_diverged != OnDiverged::Reintegrate {
            return None;
        }
        let common = self.rx.divergence()?.common?;
        let end = self.copy_end;
        if common.seq > end || common.seq + 1 < self.first_held {
            return None;
        }
        self.reint = Some(Reintegration {
            common,
            end,
            tail_asked: false,
        });
        Some(Msg::Diverged {
            common_generation: common.generation,
            common_seq: common.seq,
            end,
            history: self.copy_history.generations.clone(),
        })
    }

    /// How the copies diverged, after a refused `Hello`.
    pub fn divergence(&self) -> Option<Comparison> {
        self.rx.divergence()
    }

    /// Takes `Start`: what the shell must do before records flow. A new initial copy or resync
    /// forgets any `SyncDone` of an older one.
    pub fn on_start(&mut self, msg: &Msg) -> Result<Begin, LinkError> {
        if self.phase != Phase::Start {
            return Err(unexpected(msg));
        }
        let b = self.rx.on_start(msg)?;
        match &b {
            Begin::Resume { history, .. } => self.primary_volume = Some(history.volume_id),
            Begin::InitialSync {
                sync_id, history, ..
            }
            | Begin::Resync {
                sync_id, history, ..
            } => {
                self.primary_volume = Some(history.volume_id);
                self.sync_id = *sync_id;
                self.sync_done_at = 0;
            }
        }
        self.phase = Phase::Streaming;
        Ok(b)
    }

    /// Before an initial copy empties the directory (`has_files`: it holds entries other than the
    /// state directory, as the shell sees it now; `force`: `--force-resync`): files that are no
    /// copy of the primary's volume are never removed unless forced. `Hello` refused a foreign
    /// directory already; this catches files that turned up since.
    pub fn check_initial_copy_target(&self, has_files: bool, force: bool) -> Result<(), LinkError> {
        let ours =
            self.copy_state != MirrorState::Empty && self.primary_volume == Some(self.copy_volume);
        if has_files && !ours && !force {
            return Err(not_empty_refusal(&self.label));
        }
        Ok(())
    }

    /// The shell could not store record `seq` of the last batch (its disk is full, its journal
    /// failed): the session ends with this refusal. A `SyncDone` at or after `seq` was not
    /// stored, so it is forgotten.
    pub fn on_storage_failure(&mut self, seq: u64, e: &dyn std::fmt::Display) -> LinkError {
        if self.sync_done_at >= seq {
            self.sync_done_at = 0;
        }
        storage_refusal(seq, e)
    }

    /// One message while streaming. Records are checked (in sequence from where the journal
    /// continues, no reserved name); the `settled` to publish is the primary's latest word, not
    /// the largest ever heard: within one primary's life it only grows, and a primary restarted
    /// after a power loss may have lost records it announced (a larger stale value would let the
    /// applier take a record whose `Abort` is still to come). The feed still holds each record
    /// back until the next one is known.
    pub fn on_message<'a>(&mut self, msg: &'a Msg) -> Result<Incoming<'a>, LinkError> {
        if self.phase == Phase::Reintegrating {
            return self.on_reintegration_message(msg);
        }
        if self.phase != Phase::Streaming {
            return Err(unexpected(msg));
        }
        match msg {
            Msg::Records { settled, records } => {
                self.rx.on_records(records)?;
                for r in records {
                    if matches!(r.op, Op::SyncDone { mirror } if mirror == self.sync_id) {
                        self.sync_done_at = r.seq;
                    }
                }
                Ok(Incoming::Append {
                    records,
                    settled: *settled,
                })
            }
            Msg::UdpOffer { first } => {
                if self.rx.expected() != Some(*first) {
                    return Err(LinkError::new(
                        error_code::BAD_FRAME,
                        true,
                        format!(
                            "UDP offered from record {first}, but record {:?} is next",
                            self.rx.expected()
                        ),
                    ));
                }
                Ok(Incoming::UdpOffer { first: *first })
            }
            Msg::UdpSent { through } => Ok(Incoming::UdpSent { through: *through }),
            Msg::Ping { nonce } => Ok(Incoming::Reply(Msg::Pong { nonce: *nonce })),
            Msg::Pong { .. } => Ok(Incoming::Nothing),
            Msg::Error { code, message } => Ok(Incoming::PeerError {
                code: *code,
                message: message.clone(),
            }),
            other => Err(unexpected(other)),
        }
    }

    /// One message of the reintegration phase: `Reintegrate` once (from the common point on),
    /// then `Fetch`es, then `Reintegrated`; pings are answered. Nothing here changes the copy
    /// until `Reintegrated`.
    fn on_reintegration_message<'a>(&mut self, msg: &'a Msg) -> Result<Incoming<'a>, LinkError> {
        let Some(r) = self.reint.as_mut() else {
            return Err(unexpected(msg));
        };
        match msg {
            Msg::Reintegrate { from } if !r.tail_asked => {
                if *from != r.common.seq + 1 {
                    return Err(LinkError {
                        code: error_code::BAD_FRAME,
                        message: format!(
                            "the primary asked for this mirror's changes from record {from}, but the common point is record {}",
                            r.common.seq
                        ),
                        retry: false,
                    });
                }
                r.tail_asked = true;
                Ok(Incoming::SendTail {
                    from: *from,
                    to: r.end,
                })
            }
            Msg::Fetch { id, path, as_path } if r.tail_asked => {
                for p in [path, as_path] {
                    if p.is_root() || under_reserved(p, &self.reserved) {
                        return Err(LinkError {
                            code: error_code::BAD_FRAME,
                            message: format!(
                                "the primary asked for {:?}, the root or in the mirror's own state directory; refused",
                                String::from_utf8_lossy(p.as_bytes())
                            ),
                            retry: false,
                        });
                    }
                }
                Ok(Incoming::Fetch {
                    id: *id,
                    path,
                    as_path,
                })
            }
            Msg::Reintegrated { conflicts } if r.tail_asked => {
                self.phase = Phase::Reintegrated;
                Ok(Incoming::Reintegrated {
                    conflicts: *conflicts,
                })
            }
            Msg::Ping { nonce } => Ok(Incoming::Reply(Msg::Pong { nonce: *nonce })),
            Msg::Pong { .. } => Ok(Incoming::Nothing),
            Msg::Error { code, message } => Ok(Incoming::PeerError {
                code: *code,
                message: message.clone(),
            }),
            other => Err(unexpected(other)),
        }
    }

    /// An ack round with the mirror's raw positions (`received`: the journal's end; `durable`,
    /// `applied`, `checkpoint`: as its flusher and applier report them). The ack carries them
    /// clamped to `checkpoint ≤ applied ≤ durable ≤ received` and is due when they changed or
    /// `heartbeat` says so; nothing is acknowledged before `Start`.
    pub fn ack(&mut self, raw: Positions, heartbeat: bool) -> AckStep {
        if self.phase != Phase::Streaming {
            return AckStep::default();
        }
        let received = raw.received;
        let durable = raw.durable.min(received);
        let applied = raw.applied.min(durable);
        let checkpoint = raw.checkpoint.min(applied);
        let sync_complete = self.sync_done_at != 0 && checkpoint >= self.sync_done_at;
        let now = Positions {
            received,
            durable,
            applied,
            checkpoint,
        };
        let ack = if self.last_ack != Some(now) || heartbeat {
            self.last_ack = Some(now);
            Some(Msg::Ack {
                received,
                durable,
                applied,
                checkpoint,
            })
        } else {
            None
        };
        AckStep { ack, sync_complete }
    }

    /// The shell recorded the completed copy ([`AckStep::sync_complete`]): its `SyncDone` is no
    /// longer pending.
    pub fn sync_recorded(&mut self) {
        self.sync_done_at = 0;
    }

    /// [`Session::ack`] on a clock (`now`, any monotonic origin): the heartbeat is due
    /// [`HEARTBEAT`] after the last ack sent.
    pub fn ack_at(&mut self, raw: Positions, now: Duration) -> AckStep {
        let heartbeat = self
            .last_sent_at
            .is_some_and(|t| now.saturating_sub(t) >= HEARTBEAT);
        let step = self.ack(raw, heartbeat);
        if step.ack.is_some() {
            self.last_sent_at = Some(now);
        }
        step
    }
}

/// Where a mirror daemon's journal is settled when it starts, given its end and its last record
/// as recovered: the last record's fate (an `Abort` may follow it) is unknown until the primary
/// says, so it is held back — unless it is itself an `Abort` (then it and the record it aborts
/// are both final), or the journal is an old primary's (`former_primary`: its tree is exactly its
/// journal's end). `site::engine` (`Volume::new` in the mirror role) and `sim/net.rs` use this.
pub fn settled_at_start(end: u64, last: Option<&Record>, former_primary: bool) -> u64 {
    let last_is_abort = matches!(last, Some(Record { seq, op: Op::Abort { .. } }) if *seq == end);
    if last_is_abort || former_primary {
        end
    } else {
        end.saturating_sub(1)
    }
}

/// The refusal when the mirror cannot store a record (its disk is full, its journal failed):
/// worth retrying once the operator made room.
pub fn storage_refusal(seq: u64, e: &dyn std::fmt::Display) -> LinkError {
    LinkError {
        code: error_code::STORAGE,
        message: format!("the mirror cannot store record {seq}: {e}"),
        retry: true,
    }
}

/// The refusal of an initial copy into a directory that holds files but no mirrorfs copy:
/// retrying cannot help until the operator empties it or forces the copy.
pub fn not_empty_refusal(dir: &str) -> LinkError {
    LinkError {
        code: error_code::REFUSED,
        message: format!(
            "mirror directory {dir} is not empty and holds no mirrorfs copy; empty it, or restart `mirrorfs serve` with --force-resync to replace its contents"
        ),
        retry: false,
    }
}

fn unexpected(msg: &Msg) -> LinkError {
    LinkError {
        code: error_code::BAD_FRAME,
        message: format!(
            "unexpected message type {} from the primary",
            msg.type_code()
        ),
        retry: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Generation, History};
    use crate::path::RelPath;
    use crate::wire::{MirrorState, StartMode, VolumeId, PROTOCOL_VERSION};

    const VOL: VolumeId = [1; 16];

    fn hist(generation: u64) -> History {
        History {
            volume_id: VOL,
            generations: (1..=generation)
                .map(|n| Generation {
                    number: n,
                    id: 100 + n,
                    start: 10 * (n - 1) + 1,
                })
                .collect(),
        }
    }

    fn copy(state: MirrorState, history: History, durable: u64) -> MirrorCopy {
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

    fn hello(h: &History, next_seq: u64) -> Msg {
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

    fn start(mode: StartMode, seq: u64, sync_id: u32) -> Msg {
        Msg::Start { mode, seq, sync_id }
    }

    fn rec(seq: u64, path: &[u8]) -> Record {
        Record {
            seq,
            op: Op::Rmdir {
                path: RelPath::new(path).expect("path"),
            },
        }
    }

    fn records(settled: u64, records: Vec<Record>) -> Msg {
        Msg::Records { settled, records }
    }

    fn pos(received: u64, durable: u64, applied: u64, checkpoint: u64) -> Positions {
        Positions {
            received,
            durable,
            applied,
            checkpoint,
        }
    }

    /// A consistent copy durable through 150, streaming from 151.
    fn streaming() -> Session {
        let mut s = Session::new(
            copy(MirrorState::Consistent, hist(1), 150),
            b".mirrorfs",
            "m",
            0,
        );
        assert!(matches!(
            s.on_hello(&hello(&hist(1), 300)),
            Ok(Msg::Welcome { durable: 150, .. })
        ));
        assert!(matches!(
            s.on_start(&start(StartMode::Resume, 151, 0)),
            Ok(Begin::Resume { seq: 151, .. })
        ));
        s
    }

    #[test]
    fn resume_continues_after_the_durable_position() {
        let mut s = streaming();
        assert_eq!(s.phase(), Phase::Streaming);
        let m = records(152, vec![rec(151, b"a"), rec(152, b"b")]);
        match s.on_message(&m) {
            Ok(Incoming::Append { records, settled }) => {
                assert_eq!(records.len(), 2);
                assert_eq!(settled, 152);
            }
            other => panic!("{other:?}"),
        }
        // Resuming anywhere but right after the durable position is refused, worth a retry.
        let mut s = Session::new(
            copy(MirrorState::Consistent, hist(1), 150),
            b".mirrorfs",
            "m",
            0,
        );
        s.on_hello(&hello(&hist(1), 300)).expect("welcome");
        let e = s
            .on_start(&start(StartMode::Resume, 140, 0))
            .expect_err("wrong seq");
        assert_eq!((e.code, e.retry), (error_code::REFUSED, true));
    }

    #[test]
    fn udp_is_offered_only_from_the_next_record_and_its_records_are_checked_alike() {
        let mut s = streaming();
        let e = s
            .on_message(&Msg::UdpOffer { first: 160 })
            .expect_err("not the next record");
        assert_eq!((e.code, e.retry), (error_code::BAD_FRAME, true));
        assert_eq!(
            s.on_message(&Msg::UdpOffer { first: 151 }),
            Ok(Incoming::UdpOffer { first: 151 })
        );
        assert_eq!(
            s.on_message(&Msg::UdpSent { through: 170 }),
            Ok(Incoming::UdpSent { through: 170 })
        );
        // What came over UDP goes through the same sequence check as a TCP batch.
        assert!(s.on_message(&records(151, vec![rec(151, b"a")])).is_ok());
        let e = s
            .on_message(&records(153, vec![rec(153, b"c")]))
            .expect_err("a gap");
        assert_eq!(e.code, error_code::BAD_FRAME);
        // Before streaming, an offer is out of place.
        let mut fresh = Session::new(
            copy(MirrorState::Consistent, hist(1), 150),
            b".mirrorfs",
            "m",
            0,
        );
        assert!(fresh.on_message(&Msg::UdpOffer { first: 151 }).is_err());
    }

    #[test]
    fn an_ancestor_catches_up_and_adopts_the_newer_history() {
        // The mirror knows generation 1 only; the primary was promoted since (generation 2).
        let mut s = Session::new(
            copy(MirrorState::Consistent, hist(1), 8),
            b".mirrorfs",
            "m",
            0,
        );
        s.on_hello(&hello(&hist(2), 30))
            .expect("an ancestor is welcome");
        match s.on_start(&start(StartMode::Resume, 9, 0)) {
            Ok(Begin::Resume { seq: 9, history }) => assert_eq!(history, hist(2)),
            other => panic!("{other:?}"),
        }
        let m = records(12, (9..=12).map(|n| rec(n, b"x")).collect());
        assert!(matches!(
            s.on_message(&m),
            Ok(Incoming::Append { settled: 12, .. })
        ));
    }

    #[test]
    fn initial_copy_completes_when_its_sync_done_is_checkpointed() {
        let mut s = Session::new(
            copy(MirrorState::Empty, History::default(), 0),
            b".m",
            "m",
            0,
        );
        s.on_hello(&hello(&hist(1), 300)).expect("welcome");
        assert!(matches!(
            s.on_start(&start(StartMode::InitialSync, 300, 7)),
            Ok(Begin::InitialSync {
                seq: 300,
                sync_id: 7,
                ..
            })
        ));
        // Another copy's SyncDone does not count; this one's does.
        let done = |seq, mirror| Record {
            seq,
            op: Op::SyncDone { mirror },
        };
        let m = records(302, vec![rec(300, b"a"), done(301, 6), done(302, 7)]);
        s.on_message(&m).expect("append");
        assert_eq!(s.pending_sync_done(), 302);
        let step = s.ack(pos(302, 302, 302, 301), false);
        assert!(!step.sync_complete, "not yet checkpointed");
        let step = s.ack(pos(302, 302, 302, 302), false);
        assert!(step.sync_complete);
        assert!(
            s.ack(pos(302, 302, 302, 302), false).sync_complete,
            "again until the shell recorded it"
        );
        assert_eq!(s.pending_sync_done(), 302);
        s.sync_recorded();
        assert_eq!(s.pending_sync_done(), 0);
        assert!(!s.ack(pos(303, 303, 303, 303), false).sync_complete, "once");
        // A SyncDone received by an earlier session completes in the next one.
        let mut s = Session::new(
            MirrorCopy {
                sync_id: 7,
                ..copy(MirrorState::Syncing, hist(1), 302)
            },
            b".m",
            "m",
            302,
        );
        s.on_hello(&hello(&hist(1), 400)).expect("welcome");
        s.on_start(&start(StartMode::Resume, 303, 0))
            .expect("resume");
        assert!(s.ack(pos(302, 302, 302, 302), false).sync_complete);
    }

    #[test]
    fn a_sync_done_that_was_not_stored_is_forgotten() {
        let done = |seq| Record {
            seq,
            op: Op::SyncDone { mirror: 7 },
        };
        let initial = || {
            let mut s = Session::new(
                copy(MirrorState::Empty, History::default(), 0),
                b".m",
                "m",
                0,
            );
            s.on_hello(&hello(&hist(1), 300)).expect("welcome");
            s.on_start(&start(StartMode::InitialSync, 300, 7))
                .expect("initial copy");
            s
        };
        // Record 301 (the SyncDone) could not be stored: it does not complete the copy.
        let mut s = initial();
        s.on_message(&records(301, vec![rec(300, b"a"), done(301)]))
            .expect("append");
        let e = s.on_storage_failure(301, &"no space");
        assert_eq!((e.code, e.retry), (error_code::STORAGE, true));
        assert_eq!(e, storage_refusal(301, &"no space"));
        assert_eq!(s.pending_sync_done(), 0);
        // Record 300 failed, 302 was the SyncDone: forgotten too.
        let mut s = initial();
        s.on_message(&records(
            302,
            vec![rec(300, b"a"), rec(301, b"b"), done(302)],
        ))
        .expect("append");
        s.on_storage_failure(300, &"no space");
        assert_eq!(s.pending_sync_done(), 0);
        // A record after the SyncDone failed: the SyncDone itself was stored.
        let mut s = initial();
        s.on_message(&records(
            302,
            vec![rec(300, b"a"), done(301), rec(302, b"b")],
        ))
        .expect("append");
        s.on_storage_failure(302, &"no space");
        assert_eq!(s.pending_sync_done(), 301);
    }

    #[test]
    fn an_initial_copy_removes_only_files_of_its_volume_unless_forced() {
        let begin = |c: MirrorCopy, h: &History| {
            let mut s = Session::new(c, b".m", "dir", 0);
            s.on_hello(&hello(h, 300)).expect("welcome");
            s.on_start(&start(StartMode::InitialSync, 300, 7))
                .expect("initial copy");
            s
        };
        // An empty copy: files that turned up after Hello are refused, unless forced.
        let s = begin(copy(MirrorState::Empty, History::default(), 0), &hist(1));
        assert_eq!(s.check_initial_copy_target(false, false), Ok(()));
        assert_eq!(
            s.check_initial_copy_target(true, false),
            Err(not_empty_refusal("dir"))
        );
        assert_eq!(s.check_initial_copy_target(true, true), Ok(()));
        // An interrupted copy of the same volume is ours to replace.
        let c = MirrorCopy {
            sync_id: 3,
            ..copy(MirrorState::Syncing, hist(1), 50)
        };
        let s = begin(c, &hist(1));
        assert_eq!(s.check_initial_copy_target(true, false), Ok(()));
        // Before Start nothing is known of the primary's volume: not ours.
        let s = Session::new(copy(MirrorState::Syncing, hist(1), 50), b".m", "dir", 0);
        assert!(s.check_initial_copy_target(true, false).is_err());
    }

    #[test]
    fn refusal_kinds() {
        // Promoted: never retried.
        let mut s = Session::new(
            MirrorCopy {
                promoted: true,
                ..copy(MirrorState::Consistent, hist(1), 5)
            },
            b".m",
            "m",
            0,
        );
        let e = s.on_hello(&hello(&hist(1), 10)).expect_err("promoted");
        assert_eq!((e.code, e.retry), (error_code::PROMOTED, false));
        // A non-empty directory without a copy: not retried.
        let mut s = Session::new(
            MirrorCopy {
                foreign: true,
                ..copy(MirrorState::Empty, History::default(), 0)
            },
            b".m",
            "m",
            0,
        );
        let e = s.on_hello(&hello(&hist(1), 10)).expect_err("foreign");
        assert_eq!((e.code, e.retry), (error_code::REFUSED, false));
        assert_eq!(not_empty_refusal("m"), e);
        // Diverged: the copy has a generation 2 the primary does not; the comparison is kept
        // for the shell to explain (or to save and discard).
        let mut mine = hist(1);
        mine.generations.push(Generation {
            number: 2,
            id: 999,
            start: 11,
        });
        let mut s = Session::new(copy(MirrorState::Consistent, mine, 20), b".m", "m", 0)
            .with_on_diverged(OnDiverged::Refuse);
        let e = s.on_hello(&hello(&hist(2), 30)).expect_err("diverged");
        assert_eq!((e.code, e.retry), (error_code::DIVERGED, false));
        assert!(s.divergence().is_some());
        assert_eq!(s.phase(), Phase::Hello);
        // A full disk: worth a retry.
        let e = storage_refusal(7, &"no space");
        assert_eq!((e.code, e.retry), (error_code::STORAGE, true));
        // A message out of its phase.
        let mut s = streaming();
        let e = s
            .on_message(&Msg::Pong { nonce: 1 })
            .map(|_| ())
            .and_then(|()| s.on_start(&start(StartMode::Resume, 151, 0)).map(|_| ()))
            .expect_err("second Start");
        assert_eq!((e.code, e.retry), (error_code::BAD_FRAME, true));
        // The primary's own error closes without a reply.
        let m = Msg::Error {
            code: 3,
            message: "x".into(),
        };
        assert!(matches!(
            s.on_message(&m),
            Ok(Incoming::PeerError { code: 3, .. })
        ));
    }

    /// A copy that went through a generation 2 of its own (id 999, from seq 11) and holds
    /// records through 20, whose journal starts at `first_held`; the primary is at generation 2
    /// (id 102) through 29. Their common point is generation 1 at seq 10.
    fn diverged_copy(first_held: u64) -> (MirrorCopy, History) {
        let mut mine = hist(1);
        mine.generations.push(Generation {
            number: 2,
            id: 999,
            start: 11,
        });
        let c = MirrorCopy {
            first_held,
            ..copy(MirrorState::Consistent, mine, 20)
        };
        (c, hist(2))
    }

    /// A session that offered reintegration.
    fn reintegrating() -> Session {
        let (c, primary) = diverged_copy(5);
        let mut s = Session::new(c.clone(), b".mirrorfs", "m", 0);
        assert_eq!(
            s.on_hello(&hello(&primary, 30)),
            Ok(Msg::Diverged {
                common_generation: 1,
                common_seq: 10,
                end: 20,
                history: c.history.generations.clone(),
            })
        );
        assert_eq!(s.phase(), Phase::Reintegrating);
        s
    }

    fn fetch(path: &[u8], as_path: &[u8]) -> Msg {
        Msg::Fetch {
            id: 4,
            path: RelPath::new(path).expect("path"),
            as_path: RelPath::new(as_path).expect("path"),
        }
    }

    #[test]
    fn a_diverged_copy_offers_its_changes_and_serves_them() {
        let mut s = reintegrating();
        assert!(s.divergence().is_some(), "the comparison is kept");
        assert_eq!(
            s.on_message(&Msg::Ping { nonce: 3 }),
            Ok(Incoming::Reply(Msg::Pong { nonce: 3 }))
        );
        assert_eq!(
            s.on_message(&Msg::Reintegrate { from: 11 }),
            Ok(Incoming::SendTail { from: 11, to: 20 })
        );
        let f = fetch(b"d/f", b"d/f.conflict");
        assert_eq!(
            s.on_message(&f),
            Ok(Incoming::Fetch {
                id: 4,
                path: &RelPath::new(b"d/f").expect("path"),
                as_path: &RelPath::new(b"d/f.conflict").expect("path"),
            })
        );
        // No acks while the copy is only read.
        assert_eq!(s.ack(pos(20, 20, 20, 20), true), AckStep::default());
        assert_eq!(
            s.on_message(&Msg::Reintegrated { conflicts: 2 }),
            Ok(Incoming::Reintegrated { conflicts: 2 })
        );
        assert_eq!(s.phase(), Phase::Reintegrated);
        // Nothing more after it.
        assert!(s.on_message(&f).is_err());
        assert!(s.on_message(&Msg::Ping { nonce: 1 }).is_err());
    }

    #[test]
    fn a_copy_with_nothing_after_the_common_point_sends_an_empty_tail() {
        // The copy was promoted at its end: nothing after the common point, yet diverged.
        let mut mine = hist(1);
        mine.generations.push(Generation {
            number: 2,
            id: 999,
            start: 11,
        });
        let mut s = Session::new(copy(MirrorState::Consistent, mine, 10), b".m", "m", 0);
        assert!(matches!(
            s.on_hello(&hello(&hist(2), 30)),
            Ok(Msg::Diverged {
                common_seq: 10,
                end: 10,
                ..
            })
        ));
        assert_eq!(
            s.on_message(&Msg::Reintegrate { from: 11 }),
            Ok(Incoming::SendTail { from: 11, to: 10 })
        );
    }

    #[test]
    fn a_divergence_is_refused_unless_it_can_be_reintegrated() {
        let refused = |s: &mut Session, primary: &History| {
            let e = s.on_hello(&hello(primary, 30)).expect_err("refused");
            assert_eq!(e.code, error_code::DIVERGED);
            assert_eq!(s.phase(), Phase::Hello);
            assert!(s.divergence().is_some());
        };
        for policy in [OnDiverged::Refuse, OnDiverged::Discard] {
            let (c, primary) = diverged_copy(1);
            let mut s = Session::new(c, b".m", "m", 0).with_on_diverged(policy);
            refused(&mut s, &primary);
        }
        // The journal no longer holds record 11 (the first after the common point); 11 itself
        // is enough.
        let (c, primary) = diverged_copy(12);
        refused(&mut Session::new(c, b".m", "m", 0), &primary);
        let (c, primary) = diverged_copy(11);
        let mut s = Session::new(c, b".m", "m", 0);
        assert!(matches!(
            s.on_hello(&hello(&primary, 30)),
            Ok(Msg::Diverged { .. })
        ));
        // No generation both remember: no common point.
        let (c, _) = diverged_copy(1);
        let stranger = History {
            volume_id: VOL,
            generations: vec![Generation {
                number: 1,
                id: 555,
                start: 1,
            }],
        };
        refused(&mut Session::new(c, b".m", "m", 0), &stranger);
        // An ancestor is welcomed whatever the policy.
        let mut s = Session::new(copy(MirrorState::Consistent, hist(1), 10), b".m", "m", 0);
        assert!(matches!(
            s.on_hello(&hello(&hist(2), 30)),
            Ok(Msg::Welcome { .. })
        ));
    }

    #[test]
    fn reintegration_messages_out_of_place_are_refused() {
        // The tail must start right after the common point.
        for from in [10, 12] {
            let mut s = reintegrating();
            let e = s
                .on_message(&Msg::Reintegrate { from })
                .expect_err("wrong start");
            assert_eq!((e.code, e.retry), (error_code::BAD_FRAME, false));
        }
        // Fetch and Reintegrated only after Reintegrate, which comes once.
        let mut s = reintegrating();
        assert!(s.on_message(&fetch(b"a", b"a")).is_err());
        let mut s = reintegrating();
        assert!(s.on_message(&Msg::Reintegrated { conflicts: 0 }).is_err());
        let mut s = reintegrating();
        s.on_message(&Msg::Reintegrate { from: 11 }).expect("tail");
        assert!(s.on_message(&Msg::Reintegrate { from: 11 }).is_err());
        // The state directory, or the root, is no entry to fetch, under either name.
        for (p, q) in [
            (&b".mirrorfs/x"[..], &b"x"[..]),
            (b"x", b".mirrorfs"),
            (b"", b"x"),
        ] {
            let mut s = reintegrating();
            s.on_message(&Msg::Reintegrate { from: 11 }).expect("tail");
            let e = s.on_message(&fetch(p, q)).expect_err("reserved");
            assert_eq!((e.code, e.retry), (error_code::BAD_FRAME, false));
        }
        // Nothing of the streaming phase: no Start, no records.
        let mut s = reintegrating();
        assert!(s.on_start(&start(StartMode::Resume, 21, 0)).is_err());
        s.on_message(&Msg::Reintegrate { from: 11 }).expect("tail");
        assert!(s.on_message(&records(21, vec![rec(21, b"a")])).is_err());
        assert!(s.on_start(&start(StartMode::Resync, 30, 1)).is_err());
        // The primary's error ends it.
        assert!(matches!(
            s.on_message(&Msg::Error {
                code: 4,
                message: "x".into()
            }),
            Ok(Incoming::PeerError { code: 4, .. })
        ));
        // A streaming session takes none of the reintegration messages.
        let mut s = streaming();
        assert!(s.on_message(&Msg::Reintegrate { from: 151 }).is_err());
        assert!(s.on_message(&fetch(b"a", b"a")).is_err());
    }

    #[test]
    fn out_of_sequence_and_reserved_records_are_refused() {
        let mut s = streaming();
        assert!(
            s.on_message(&records(152, vec![rec(152, b"a")])).is_err(),
            "gap"
        );
        let mut s = streaming();
        assert!(
            s.on_message(&records(151, vec![rec(151, b".mirrorfs/x")]))
                .is_err(),
            "reserved name"
        );
        let mut s = streaming();
        s.on_message(&records(151, vec![rec(151, b"a")]))
            .expect("first");
        assert!(
            s.on_message(&records(151, vec![rec(151, b"a")])).is_err(),
            "repeated"
        );
        // Nothing before Start.
        let mut s = Session::new(
            copy(MirrorState::Consistent, hist(1), 150),
            b".mirrorfs",
            "m",
            0,
        );
        assert!(s.on_message(&records(151, vec![rec(151, b"a")])).is_err());
    }

    #[test]
    fn settled_is_the_primarys_latest_word() {
        let mut s = streaming();
        // Records 151..=153 arrive but the primary settled only 152: 153 may still be aborted.
        let m = records(152, (151..=153).map(|n| rec(n, b"a")).collect());
        assert!(matches!(
            s.on_message(&m),
            Ok(Incoming::Append { settled: 152, .. })
        ));
        // A primary restarted after a power loss says less than it said before: it is believed
        // (a record it announced may be gone and replaced by one that is aborted).
        let m = records(151, vec![rec(154, b"a")]);
        assert!(matches!(
            s.on_message(&m),
            Ok(Incoming::Append { settled: 151, .. })
        ));
    }

    #[test]
    fn ack_cadence() {
        let mut s = Session::new(
            copy(MirrorState::Consistent, hist(1), 150),
            b".mirrorfs",
            "m",
            0,
        );
        assert_eq!(
            s.ack(pos(150, 150, 150, 150), true),
            AckStep::default(),
            "no ack before Start"
        );
        let mut s = streaming();
        let t = Duration::from_millis;
        // Clamped: checkpoint ≤ applied ≤ durable ≤ received.
        assert_eq!(
            s.ack_at(pos(160, 170, 180, 190), t(0)).ack,
            Some(Msg::Ack {
                received: 160,
                durable: 160,
                applied: 160,
                checkpoint: 160
            })
        );
        assert_eq!(
            s.ack_at(pos(160, 170, 180, 190), t(500)).ack,
            None,
            "unchanged"
        );
        assert!(
            s.ack_at(pos(161, 160, 160, 160), t(600)).ack.is_some(),
            "changed"
        );
        assert_eq!(s.ack_at(pos(161, 160, 160, 160), t(1500)).ack, None);
        assert!(
            s.ack_at(pos(161, 160, 160, 160), t(1600)).ack.is_some(),
            "heartbeat"
        );
        assert!(s.ack(pos(161, 160, 160, 160), true).ack.is_some());
        assert!(s.ack(pos(161, 160, 160, 160), false).ack.is_none());
    }

    #[test]
    fn the_last_record_is_held_back_at_start_unless_it_is_final() {
        let mkdir = Record {
            seq: 7,
            op: Op::Mkdir {
                path: crate::path::RelPath::new("d").expect("path"),
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
        };
        let abort = Record {
            seq: 7,
            op: Op::Abort { seq: 6 },
        };
        assert_eq!(settled_at_start(7, Some(&mkdir), false), 6);
        assert_eq!(settled_at_start(7, Some(&abort), false), 7);
        assert_eq!(settled_at_start(7, Some(&mkdir), true), 7);
        assert_eq!(settled_at_start(0, None, false), 0);
    }
}
