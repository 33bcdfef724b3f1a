//! The UDP data path in the network simulation (issue 8): on half of the seeds the primary's
//! link offers UDP after `Start` (`UdpOffer`), the mirror's session accepts it (`UdpAccept`), and
//! records travel as sealed datagrams of the core's [`UdpSender`] / [`UdpReceiver`] over a
//! datagram channel with faults, while the connection stays the control channel (`UdpSent`,
//! `UdpNak`, `Ack`s): reliable, but cut and reset as in the rest of the simulation. The shells
//! this models are `mirrorfs::net::udp` (primary) and `mirrorfs::net::serve::udp` (daemon); what
//! a record travels as and how whole records become a `Records` batch for the session is the
//! core's [`crate::udp::record`], which both shells use too.
//!
//! The channel, per seed (its own random stream, so the seed's other decisions stay):
//! Gilbert–Elliott loss (a good and a bad state with their own loss rates), duplication,
//! reordering within a window, bit corruption, and an adversary that injects forged packets
//! (a captured header with a fresh packet number and a made-up body) and replays captured ones.
//! Datagrams of a connection that is gone keep arriving (they belong to another session).
//!
//! Invariants, beside the simulation's own (its records reach the mirror's journal exactly once,
//! in order, identical, through the session's checks and the journal's `append_at`):
//! U1. every forged, corrupted or replayed datagram, and every one of another session, is
//!     dropped and counted by the receiver's packet layer; a genuine fresh one never is;
//! U2. the sender's `sent_through` (what `--ack network` acknowledges) never claims a record
//!     whose data packets were not all handed out: an observer opens every datagram handed out
//!     with the session's key and tracks which records' fragments all left;
//! U3. after the heal (no more faults on the channel) the mirror converges (the simulation's
//!     drain and final comparison).

use std::collections::{BTreeMap, HashSet, VecDeque};

use super::{read_next, Act, Fault, MLink, NetVariant, PLink, Sim, SimFile};
use crate::datagram::fragment::Fragment;
use crate::datagram::{Kind, Opener, HEADER_LEN, KEY_LEN};
use crate::journal::Reader;
use crate::session::Incoming;
use crate::sim::run::SplitMix64;
use crate::udp::{record_body, take_batch, OfferError, ReceiverConfig, SenderConfig};
use crate::udp::{UdpReceiver, UdpSender};
use crate::wire::Msg;

/// NAKed records the sender's store no longer had, waiting to be re-read (the shell's bound).
const GONE_MAX: usize = 4_096;
/// Captured datagrams kept for the adversary's replays.
const CAPTURED_MAX: usize = 64;
/// Datagrams in flight beyond this are lost (a full socket buffer).
const FLIGHT_MAX: usize = 4_096;

/// Why a datagram in flight must be dropped, if it must.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taint {
    Genuine,
    Corrupted,
    Forged,
    Replayed,
}

struct Dgram {
    bytes: Vec<u8>,
    taint: Taint,
}

/// The datagram channel towards the mirror and its fault rates (per mille).
pub(super) struct Channel {
    rng: SplitMix64,
    flight: VecDeque<Dgram>,
    captured: VecDeque<Vec<u8>>,
    /// Gilbert–Elliott: in the bad state now; the chances to enter and leave it; loss in each.
    bad: bool,
    enter_bad: u64,
    leave_bad: u64,
    loss_good: u64,
    loss_bad: u64,
    duplicate: u64,
    corrupt: u64,
    /// Chance per delivery round of a forged packet and of a replay.
    forge: u64,
    replay: u64,
    /// A datagram is delivered from among the first `reorder` in flight.
    reorder: u64,
    /// The network healed: no more faults.
    healed: bool,
    sender: SenderConfig,
    receiver: ReceiverConfig,
}

impl Channel {
    /// The channel of seed `seed`, or `None` if its records go over TCP.
    pub(super) fn for_seed(seed: u64, variant: NetVariant) -> Option<Box<Channel>> {
        let mut rng = SplitMix64(seed ^ 0x0075_6470_5041_5448);
        // The sabotaged variants reproduce TCP shells and mirrors: they stay on TCP.
        if variant != NetVariant::Correct || rng.next() % 2 == 1 {
            return None;
        }
        let mut pick = |xs: &[u64]| xs[(rng.next() % xs.len() as u64) as usize];
        let sender = SenderConfig {
            body_max: pick(&[40, 300, 1_200]) as usize,
            rate_bytes_per_s: pick(&[200_000, 12_500_000]),
            burst_bytes: pick(&[0, 256 << 10]),
            queue_bytes_max: pick(&[2_000, 64 << 10, 4 << 20]) as usize,
            again_bytes_max: pick(&[2_000, 1 << 20]) as usize,
            store_bytes_max: pick(&[0, 4_000, 64 << 20]) as usize,
            flush_idle_us: pick(&[0, 0, 5_000]),
            ..SenderConfig::default()
        };
        let receiver = ReceiverConfig {
            // A window far below the link's lets the sender run ahead of it: fragments beyond
            // it are refused and come back only one NAK interval at a time, so a drain of
            // hundreds of records takes longer than the simulation waits.
            window_records: pick(&[256, 4_096]),
            window_bytes: pick(&[1 << 20, 64 << 20]),
            nak_delay_us: pick(&[0, 2_000, 20_000]),
            nak_interval_us: pick(&[1_000, 20_000, 100_000]),
            nak_max: pick(&[4, 256]) as usize,
            ..ReceiverConfig::default()
        };
        let (enter_bad, leave_bad) = (pick(&[0, 10, 50]), pick(&[200, 500]));
        let (loss_good, loss_bad) = (pick(&[0, 10, 50, 200]), pick(&[500, 1_000]));
        let (duplicate, corrupt) = (pick(&[0, 20, 50]), pick(&[0, 10, 30]));
        let (forge, replay, reorder) =
            (pick(&[0, 50, 200]), pick(&[0, 50, 200]), pick(&[1, 4, 16]));
        Some(Box::new(Channel {
            rng,
            flight: VecDeque::new(),
            captured: VecDeque::new(),
            bad: false,
            enter_bad,
            leave_bad,
            loss_good,
            loss_bad,
            duplicate,
            corrupt,
            forge,
            replay,
            reorder,
            healed: false,
            sender,
            receiver,
        }))
    }

    fn chance(&mut self, per_mille: u64) -> bool {
        !self.healed && self.rng.next() % 1_000 < per_mille
    }

    /// A datagram handed to the socket: lost, or in flight (perhaps twice, perhaps corrupted).
    fn send(&mut self, bytes: Vec<u8>, stats: &mut super::NetStats) {
        stats.datagrams += 1;
        let flip = if self.bad {
            self.leave_bad
        } else {
            self.enter_bad
        };
        if self.chance(flip) {
            self.bad = !self.bad;
        }
        let loss = if self.bad {
            self.loss_bad
        } else {
            self.loss_good
        };
        if self.chance(loss) || self.flight.len() >= FLIGHT_MAX {
            stats.datagrams_lost += 1;
            return;
        }
        if self.chance(self.duplicate) {
            stats.datagrams_duplicated += 1;
            self.flight.push_back(Dgram {
                bytes: bytes.clone(),
                taint: Taint::Genuine,
            });
        }
        let mut d = Dgram {
            bytes,
            taint: Taint::Genuine,
        };
        if self.chance(self.corrupt) {
            let at = (self.rng.next() % d.bytes.len() as u64) as usize;
            d.bytes[at] ^= 1 << (self.rng.next() % 8);
            d.taint = Taint::Corrupted;
            stats.datagrams_corrupted += 1;
        }
        self.flight.push_back(d);
    }

    /// The adversary's packets for this round: a forged one, a replay of a captured one.
    fn inject(&mut self, stats: &mut super::NetStats) {
        if self.captured.is_empty() {
            return;
        }
        if self.chance(self.forge) {
            let i = (self.rng.next() % self.captured.len() as u64) as usize;
            let mut bytes = self.captured[i][..HEADER_LEN].to_vec();
            // A fresh, high packet number: it must not burn the number for the real packet.
            let pn = (self.rng.next() % 1_000_000) + 1;
            bytes[8..16].copy_from_slice(&pn.to_be_bytes());
            let len = 16 + self.rng.next() % 1_300;
            bytes.extend((0..len).map(|_| self.rng.next() as u8));
            stats.forged += 1;
            self.flight.push_back(Dgram {
                bytes,
                taint: Taint::Forged,
            });
        }
        if self.chance(self.replay) {
            let i = (self.rng.next() % self.captured.len() as u64) as usize;
            let bytes = self.captured[i].clone();
            stats.replays += 1;
            self.flight.push_back(Dgram {
                bytes,
                taint: Taint::Replayed,
            });
        }
    }

    /// The next datagram to arrive, from among the first `reorder` in flight.
    fn take(&mut self) -> Option<Dgram> {
        let window = if self.healed { 1 } else { self.reorder };
        let n = (self.flight.len() as u64).min(window);
        if n == 0 {
            return None;
        }
        let i = (self.rng.next() % n) as usize;
        self.flight.remove(i)
    }

    fn capture(&mut self, bytes: &[u8]) {
        self.captured.push_back(bytes.to_vec());
        while self.captured.len() > CAPTURED_MAX {
            self.captured.pop_front();
        }
    }
}

/// The key and session number the TLS exporter gives connection `conn` (both ends derive the
/// same; a forger does not know the key).
fn keys(conn: u64) -> ([u8; KEY_LEN], u32) {
    let mut key = [0u8; KEY_LEN];
    for (i, b) in key.iter_mut().enumerate() {
        *b = (conn.rotate_left(i as u32 * 7) as u8) ^ (i as u8).wrapping_mul(0x9d);
    }
    (key, 0x5100_0000 ^ conn as u32)
}

/// The packet number and session of a datagram's header.
fn pn_of(bytes: &[u8]) -> Option<(u32, u64)> {
    let s = u32::from_be_bytes(bytes.get(4..8)?.try_into().ok()?);
    let pn = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
    Some((s, pn))
}

/// The primary's side once the mirror accepted (`net::udp::UdpPath` and `UdpStream`).
pub(super) struct PUdp {
    sender: UdpSender,
    gone: VecDeque<u64>,
    /// A record the sender refused (queue full), encoded, to offer again.
    pending: Option<(u64, Vec<u8>)>,
    /// The last `UdpSent` told.
    told: u64,
    /// The observer (invariant U2): opens every datagram handed out.
    tap: Opener,
    /// Per record not yet known to be all out: its size and the offsets of fragments out.
    out: BTreeMap<u64, (u32, HashSet<u32>, u64)>,
    /// Every record through this had all its data packets handed out.
    all_out_through: u64,
}

/// The primary's link on UDP: offered, or open.
pub(super) enum PUdpState {
    Offered,
    Open(Box<PUdp>),
}

/// The daemon's side of one session (`serve::udp::Inbound`).
pub(super) struct MUdp {
    rx: UdpReceiver,
    session: u32,
    /// The primary's last `UdpSent`, for the receiver once no datagram is in flight.
    hint: u64,
    /// The highest settled watermark of this session.
    settled: u64,
    /// Packet numbers of this session's datagrams the receiver already took.
    seen: HashSet<u64>,
}

impl PUdp {
    /// Notes a datagram handed out (U2's observer).
    fn observe(&mut self, datagram: &[u8]) -> Result<(), String> {
        let opened = self
            .tap
            .open(datagram)
            .map_err(|d| format!("the sender handed out a datagram its own key refuses: {d:?}"))?;
        if opened.kind != Kind::Data {
            return Ok(());
        }
        let f = Fragment::decode(&opened.body)
            .ok_or("the sender handed out a data packet that is no fragment")?;
        if f.seq > self.all_out_through {
            let e = self
                .out
                .entry(f.seq)
                .or_insert((f.total, HashSet::new(), 0));
            if e.1.insert(f.offset) {
                e.2 += f.bytes.len() as u64;
            }
        }
        while let Some(e) = self.out.get(&(self.all_out_through + 1)) {
            if e.2 < u64::from(e.0) || e.1.is_empty() {
                break;
            }
            self.out.remove(&(self.all_out_through + 1));
            self.all_out_through += 1;
        }
        Ok(())
    }
}

impl Sim {
    /// The offer after `Start` (`remote::offer_udp`), on the seeds whose records go over UDP.
    pub(super) fn p_offer_udp(&mut self, id: u64, first: u64) {
        if self.udp.is_none() {
            return;
        }
        if let Some(pl) = self.plink.as_mut() {
            pl.udp = Some(PUdpState::Offered);
        }
        self.send_to_m(id, Msg::UdpOffer { first });
    }

    /// Whether the primary's link sends over UDP (or waits for the mirror's answer to its offer).
    pub(super) fn p_on_udp(&self) -> bool {
        self.plink.as_ref().is_some_and(|pl| pl.udp.is_some())
    }

    /// `UdpAccept`: the path opens (`UdpPath::open`), its first record the link's next.
    pub(super) fn p_udp_accept(&mut self, port: u16) -> Act {
        let Some(chan) = self.udp.as_ref() else {
            return Err(Fault::Bug("UdpAccept without an offer".into()));
        };
        let config = chan.sender.clone();
        let Some(pl) = self.plink.as_mut() else {
            return Ok(());
        };
        if port == 0 || !matches!(pl.udp, Some(PUdpState::Offered)) {
            return Err(Fault::Bug(format!("UdpAccept{{port {port}}} out of place")));
        }
        let (key, session) = keys(pl.conn);
        let first = pl.sender.next_send();
        let sender = UdpSender::new(&key, session, config, first)
            .map_err(|e| Fault::Bug(format!("the UDP sender's configuration: {e}")))?;
        pl.udp = Some(PUdpState::Open(Box::new(PUdp {
            sender,
            gone: VecDeque::new(),
            pending: None,
            told: 0,
            tap: Opener::new(&key, session),
            out: BTreeMap::new(),
            all_out_through: first - 1,
        })));
        self.ev(|| format!("primary: records from {first} go over UDP"));
        Ok(())
    }

    fn p_udp(&mut self) -> Option<&mut PUdp> {
        match self.plink.as_mut()?.udp.as_mut()? {
            PUdpState::Open(u) => Some(u),
            PUdpState::Offered => None,
        }
    }

    /// `UdpNak`: what the store still has is queued again, the rest is re-read later.
    pub(super) fn p_udp_nak(&mut self, naks: &[crate::udp::Nak]) -> Act {
        let Some(u) = self.p_udp() else {
            return Err(Fault::Bug("a UdpNak on a link not on UDP".into()));
        };
        let out = u.sender.on_nak(naks);
        for seq in out.gone {
            if u.gone.len() < GONE_MAX && !u.gone.contains(&seq) {
                u.gone.push_back(seq);
            }
        }
        self.stats.nak_entries += naks.len() as u64;
        Ok(())
    }

    /// An `Ack`'s `received`: the sender need not keep those records.
    pub(super) fn p_udp_delivered(&mut self, received: u64) {
        if let Some(u) = self.p_udp() {
            u.sender.on_delivered(received);
        }
    }

    /// One round of `UdpStream::run`: resend what NAKs found gone, offer records ≤ `limit`
    /// within the window, hand datagrams to the channel, tell `sent_through`.
    pub(super) fn p_send_udp(&mut self, limit: u64) -> Act {
        if self.p_udp().is_none() {
            return Ok(());
        }
        self.p_resend_gone()?;
        self.p_offer_records(limit)?;
        self.p_transmit()?;
        self.p_publish_sent()
    }

    fn p_resend_gone(&mut self) -> Act {
        let settled = self.psettled;
        loop {
            let journal = &self.pjournal;
            let Some(u) = self.plink.as_mut().and_then(|pl| match pl.udp.as_mut() {
                Some(PUdpState::Open(u)) => Some(u),
                _ => None,
            }) else {
                return Ok(());
            };
            let Some(&seq) = u.gone.front() else {
                return Ok(());
            };
            // A NAK that crossed the acknowledgement of its record (`UdpPath::resend_gone`).
            if seq <= u.sender.delivered() {
                u.gone.pop_front();
                continue;
            }
            let mut reader: Reader<SimFile> = Reader::new(seq);
            let record = read_next(&mut reader, journal, seq)
                .map_err(|e| Fault::Bug(format!("the primary cannot re-read {seq}: {e}")))?
                .ok_or_else(|| {
                    Fault::Bug(format!(
                        "record {seq}, NAKed by the mirror, is no longer in the primary's journal"
                    ))
                })?;
            match u.sender.resend(seq, &record_body(settled, record)) {
                Ok(()) => {}
                Err(OfferError::Full) => return Ok(()),
                Err(e) => return Err(Fault::Bug(format!("cannot resend record {seq}: {e}"))),
            }
            u.gone.pop_front();
            self.stats.gone_resent += 1;
        }
    }

    fn p_offer_records(&mut self, limit: u64) -> Act {
        let settled = self.psettled;
        loop {
            let (journal, primary) = (&self.pjournal, &self.primary);
            let Some(pl) = self.plink.as_mut() else {
                return Ok(());
            };
            let PLink {
                sender: link,
                reader,
                udp: Some(PUdpState::Open(u)),
                ..
            } = pl
            else {
                return Ok(());
            };
            if !link.may_send() {
                return Ok(());
            }
            let (seq, body) = match u.pending.take() {
                Some(p) => p,
                None if reader.next_seq() > limit => return Ok(()),
                None => {
                    if reader.next_seq() < journal.first_seq() {
                        return Err(Fault::Bug(format!(
                            "the primary released record {} that its link still has to send",
                            reader.next_seq()
                        )));
                    }
                    let Some(r) = read_next(reader, journal, limit).map_err(|e| {
                        Fault::Bug(format!("the primary cannot read its journal: {e}"))
                    })?
                    else {
                        return Ok(());
                    };
                    if primary.op_at(r.seq) != Some(&r.op) {
                        return Err(Fault::Bug(format!(
                            "the primary read record {} as {:?}; it wrote {:?}",
                            r.seq,
                            r.op,
                            primary.op_at(r.seq)
                        )));
                    }
                    (r.seq, record_body(settled, r))
                }
            };
            match u.sender.offer(seq, &body) {
                Ok(()) => link.sent(seq, body.len() as u64),
                Err(OfferError::Full) => {
                    u.pending = Some((seq, body));
                    return Ok(());
                }
                Err(e) => {
                    return Err(Fault::Bug(format!(
                        "cannot send record {seq} over UDP: {e}"
                    )))
                }
            }
        }
    }

    /// Hands every datagram the rate allows now to the channel (`UdpPath::transmit`).
    fn p_transmit(&mut self) -> Act {
        let now = self.now.as_micros() as u64;
        loop {
            let Some(u) = self.p_udp() else {
                return Ok(());
            };
            let Some(datagram) = u.sender.poll_transmit(now) else {
                return Ok(());
            };
            u.observe(&datagram).map_err(Fault::Bug)?;
            if let Some(chan) = self.udp.as_mut() {
                chan.send(datagram, &mut self.stats);
            }
        }
    }

    /// `sent_through` is the link's `sent` position (`--ack network`) and goes to the daemon as
    /// `UdpSent` when it moved; invariant U2.
    fn p_publish_sent(&mut self) -> Act {
        let Some(pl) = self.plink.as_mut() else {
            return Ok(());
        };
        let id = pl.conn;
        let Some(PUdpState::Open(u)) = pl.udp.as_mut() else {
            return Ok(());
        };
        let through = u.sender.sent_through();
        if through > u.all_out_through {
            return Err(Fault::Bug(format!(
                "the UDP sender says records through {through} are sent (what --ack network \
                 acknowledges), but record {}'s data packets were not all handed out",
                u.all_out_through + 1
            )));
        }
        if through <= u.told {
            return Ok(());
        }
        u.told = through;
        self.send_to_m(id, Msg::UdpSent { through });
        Ok(())
    }

    // ---- the daemon ---------------------------------------------------------------------------

    /// `Incoming::UdpOffer`: the session's receiver, keyed from its connection
    /// (`Daemon::accept_udp`).
    pub(super) fn m_udp_offer(&mut self, id: u64, first: u64) -> Act {
        let Some(chan) = self.udp.as_ref() else {
            return Err(Fault::Bug("the primary offered UDP on a TCP seed".into()));
        };
        let config = chan.receiver.clone();
        let (key, session) = keys(id);
        if let Some(ml) = self.mlink.as_mut() {
            ml.udp = Some(MUdp {
                rx: UdpReceiver::new(&key, session, config, first),
                session,
                hint: 0,
                settled: 0,
                seen: HashSet::new(),
            });
        }
        self.send_to_p(id, Msg::UdpAccept { port: 1 });
        Ok(())
    }

    /// `Incoming::UdpSent`.
    pub(super) fn m_udp_sent(&mut self, through: u64) -> Act {
        match self.mlink.as_mut().and_then(|m| m.udp.as_mut()) {
            Some(u) => {
                u.hint = u.hint.max(through);
                Ok(())
            }
            None => Err(Fault::Bug(
                "UdpSent before the UDP path was accepted".into(),
            )),
        }
    }

    /// The settled watermark the daemon publishes: on UDP, never lower than one this session
    /// published before (`Inbound::settled`: records over UDP and TCP interleave).
    pub(super) fn m_session_settled(&mut self, settled: u64) -> u64 {
        match self.mlink.as_mut().and_then(|m| m.udp.as_mut()) {
            Some(u) => {
                u.settled = u.settled.max(settled);
                u.settled
            }
            None => settled,
        }
    }

    /// Datagrams arrive at the daemon's socket (`all`: every one in flight, the heal), and the
    /// records the receiver has whole go through the session and the append.
    pub(super) fn deliver_datagrams(&mut self, all: bool) -> Act {
        let Some(chan) = self.udp.as_mut() else {
            return Ok(());
        };
        chan.inject(&mut self.stats);
        let n = if all {
            chan.flight.len() as u64
        } else {
            1 + chan.rng.next() % 12
        };
        for _ in 0..n {
            let Some(d) = self.udp.as_mut().and_then(|c| c.take()) else {
                break;
            };
            self.m_datagram(d)?;
        }
        self.m_udp_take()
    }

    /// One datagram at the daemon: invariant U1.
    fn m_datagram(&mut self, d: Dgram) -> Act {
        let Some(u) = self.mlink.as_mut().and_then(|m| m.udp.as_mut()) else {
            // No session has UDP on: dropped (`dropped_no_session`).
            return Ok(());
        };
        let header = pn_of(&d.bytes);
        let fresh = d.taint == Taint::Genuine
            && header.is_some_and(|(s, pn)| s == u.session && !u.seen.contains(&pn));
        let (before, fec_before) = (u.rx.dropped().total(), u.rx.stats().recovered);
        u.rx.on_datagram(&d.bytes);
        let dropped = u.rx.dropped().total() > before;
        self.stats.fec_recovered += u.rx.stats().recovered - fec_before;
        if fresh {
            if let Some((_, pn)) = header {
                u.seen.insert(pn);
            }
        }
        if dropped == fresh {
            return Err(Fault::Bug(format!(
                "the mirror's receiver {} a {:?} datagram{} ({} bytes)",
                if dropped { "dropped" } else { "took" },
                d.taint,
                if d.taint == Taint::Genuine && !fresh {
                    " of another session or seen before"
                } else {
                    ""
                },
                d.bytes.len()
            )));
        }
        if dropped {
            self.stats.datagrams_dropped += 1;
        } else if let Some(chan) = self.udp.as_mut() {
            chan.capture(&d.bytes);
        }
        Ok(())
    }

    /// The records the receiver has whole, as one batch through the session's checks and the
    /// daemon's append (`Daemon::deliver`).
    fn m_udp_take(&mut self) -> Act {
        let Some(ml) = self.mlink.as_mut() else {
            return Ok(());
        };
        let id = ml.conn;
        let MLink {
            udp: Some(u),
            session: Some(session),
            ..
        } = ml
        else {
            return Ok(());
        };
        let msg = take_batch(&mut u.rx).map_err(|e| {
            Fault::Bug(format!(
                "a record over UDP from a correct primary was refused: {e}"
            ))
        })?;
        let Some(msg) = msg else {
            return Ok(());
        };
        let next = self.mjournal.next_seq();
        if let Msg::Records { records, .. } = &msg {
            // Every record exactly once, in order: the session's check, and the sim's own.
            if records.first().map(|r| r.seq) != Some(next) {
                return Err(Fault::Bug(format!(
                    "records over UDP start at {:?}; the mirror's journal continues at {next}",
                    records.first().map(|r| r.seq)
                )));
            }
            self.stats.udp_records += records.len() as u64;
        }
        match session.on_message(&msg) {
            Ok(Incoming::Append { records, settled }) => {
                let settled = self.m_session_settled(settled);
                self.m_store(records, settled)
            }
            Ok(other) => Err(Fault::Bug(format!("records over UDP gave {other:?}"))),
            Err(e) => {
                self.m_refuse(id, &e);
                Err(Fault::Bug(format!(
                    "the mirror refused records over UDP: {e}"
                )))
            }
        }
    }

    /// The daemon's NAKs (`Daemon::send_naks`), after the `UdpSent` hint once no datagram is in
    /// flight (`Inbound::apply_sent_hint`: the socket is drained).
    pub(super) fn m_udp_naks(&mut self) -> Act {
        let now = self.now.as_micros() as u64;
        let drained = self.udp.as_ref().is_some_and(|c| c.flight.is_empty());
        let Some(ml) = self.mlink.as_mut() else {
            return Ok(());
        };
        let id = ml.conn;
        let Some(u) = ml.udp.as_mut() else {
            return Ok(());
        };
        if drained {
            u.rx.note_sent(u.hint);
        }
        let naks = u.rx.naks(now);
        if !naks.is_empty() {
            self.send_to_p(id, Msg::UdpNak { naks });
        }
        Ok(())
    }

    /// The heal: the channel stops its faults.
    pub(super) fn heal_datagrams(&mut self) {
        if let Some(c) = self.udp.as_mut() {
            c.healed = true;
            c.bad = false;
        }
    }
}

impl Channel {
    /// A fair coin from the channel's stream.
    pub(super) fn coin(&mut self) -> bool {
        self.rng.next().is_multiple_of(2)
    }
}

impl Sim {
    /// The UDP path's state, for a failure message.
    pub(super) fn udp_state(&self) -> String {
        let mut out = String::new();
        if let Some(c) = &self.udp {
            out += &format!(
                "; UDP channel: {} in flight, sender {:?}, receiver {:?}",
                c.flight.len(),
                c.sender,
                c.receiver
            );
        }
        if let Some(pl) = &self.plink {
            out += &format!("; link next_send {}", pl.sender.next_send());
            if let Some(PUdpState::Open(u)) = &pl.udp {
                out += &format!(
                    "; UDP sender: next {}, sent through {}, delivered {}, all out through {}, \
                     gone {:?}, pending {:?}, queued {} bytes, {:?}",
                    u.sender.next_seq(),
                    u.sender.sent_through(),
                    u.sender.delivered(),
                    u.all_out_through,
                    u.gone,
                    u.pending.as_ref().map(|p| p.0),
                    u.sender.queued_bytes(),
                    u.sender.stats()
                );
            }
        }
        if let Some(u) = self.mlink.as_ref().and_then(|m| m.udp.as_ref()) {
            out += &format!(
                "; UDP receiver: next {}, hint {}, {:?}, {:?}",
                u.rx.next_seq(),
                u.hint,
                u.rx.stats(),
                u.rx.dropped()
            );
        }
        out
    }
}
