//! The primary's side of the stream: records in, datagrams out at the configured rate.
//!
//! Limits and what happens at them:
//! - `queue_bytes_max`: fragment bytes waiting for their first transmission. An `offer` that
//!   would pass it is refused with `OfferError::Full` (back-pressure: the shell offers the record
//!   again later, from the journal); a record larger than the limit is taken only into an empty
//!   queue, so the queue holds at most `max(limit, one record)`.
//! - `again_bytes_max`: fragment bytes waiting for a retransmission. NAKed fragments past it are
//!   skipped and counted (`NakOutcome::skipped`); the receiver asks again after its interval.
//! - `store_bytes_max`: recently offered records kept for NAKs, oldest dropped first (and every
//!   record the receiver reported delivered). A NAK for a record no longer kept is answered
//!   `Gone(seq)`: the shell resends it from the journal with `resend`.
//! - The token bucket: at most `burst_bytes` at once, `rate_bytes_per_s` on average; the burst is
//!   raised to one datagram so that every datagram can pass.
//! - Repairs waiting to go out are not bounded by a setting: at most c per data packet, or the
//!   encoder's open groups at a flush (111 for the default layers), each one datagram.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// The most records whose NAKed byte ranges are kept while the journal's copy is read
/// (`UdpSender::resend`); beyond it a record is resent whole.
const GONE_ASKS_MAX: usize = 4_096;
/// The most ranges kept per record; beyond it the whole record is resent.
const GONE_RANGES_MAX: usize = 16;

use super::rate::TokenBucket;
use super::Nak;
use crate::datagram::fragment::{cut, Fragment, FRAGMENT_HEADER};
use crate::datagram::{Kind, Sealer, DATAGRAM_MAX, HEADER_LEN, KEY_LEN, TAG_LEN};
use crate::fec::{self, codec, FecEncoder, Repair, Scheme};

/// The sender's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderConfig {
    /// A data packet's body: the fragment header and bytes, at most `fec::DATA_MAX`.
    pub body_max: usize,
    pub rate_bytes_per_s: u64,
    pub burst_bytes: u64,
    pub queue_bytes_max: usize,
    pub again_bytes_max: usize,
    pub store_bytes_max: usize,
    /// Nothing to send for this long: flush the FEC encoder (0: at once).
    pub flush_idle_us: u64,
    pub scheme: Scheme,
    /// With the layered scheme: how many of its layers (c, 0–3; 0: no repairs at all).
    pub fec_layers: usize,
}

impl Default for SenderConfig {
    fn default() -> SenderConfig {
        SenderConfig {
            // 1,232-byte datagrams: with UDP and IPv6 headers, IPv6's minimum MTU of 1,280.
            body_max: 1_200,
            rate_bytes_per_s: 12_500_000,
            burst_bytes: 256 << 10,
            queue_bytes_max: 4 << 20,
            again_bytes_max: 1 << 20,
            store_bytes_max: 64 << 20,
            flush_idle_us: 0,
            scheme: fec::DEFAULT_SCHEME,
            fec_layers: 3,
        }
    }
}

/// Why an offered record was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OfferError {
    #[error("the send queue is full: offer again once datagrams went out")]
    Full,
    #[error("record seq {got} offered, {expected} expected")]
    OutOfOrder { got: u64, expected: u64 },
    #[error("record larger than a fragment can announce")]
    TooLarge,
}

/// Why a configuration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("body_max {0} must be in {min}..={max}", min = FRAGMENT_HEADER + 1, max = fec::DATA_MAX)]
    BodyMax(usize),
    #[error("FEC layers must be 0..=3, got {0}")]
    FecLayers(usize),
}

/// What a NAK did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NakOutcome {
    /// Records no longer kept: resend them from the journal (`resend`).
    pub gone: Vec<u64>,
    /// Fragments queued again.
    pub queued: usize,
    /// Fragments not queued: the retransmit queue was full.
    pub skipped: usize,
}

/// The sender's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SenderStats {
    pub data_packets: u64,
    pub repair_packets: u64,
    /// Data packets sent again after a NAK or a `resend`.
    pub retransmitted_packets: u64,
    pub bytes_out: u64,
    pub offers_full: u64,
    pub flushes: u64,
    pub naks_gone: u64,
    pub naks_skipped: u64,
    /// NAK entries for records already delivered or not sent yet.
    pub naks_stale: u64,
}

/// A record offered whose data or repairs have not all been handed out.
#[derive(Debug)]
struct Unprotected {
    seq: u64,
    /// The packet number of its last data packet, once handed out.
    last_pn: Option<u64>,
}

/// What goes out next.
enum Next {
    Repair,
    Again,
    Fresh,
}

/// The primary's side of the stream (see the module's limits).
pub struct UdpSender {
    config: SenderConfig,
    sealer: Sealer,
    fec: Box<dyn FecEncoder + Send>,
    bucket: TokenBucket,
    /// Repair bodies, sent before any other data.
    repairs: VecDeque<Vec<u8>>,
    again: VecDeque<Fragment>,
    again_bytes: usize,
    again_keys: HashSet<(u64, u32)>,
    /// What NAKs asked of records the store no longer had (`NakOutcome::gone`), until the
    /// journal's copy comes back through `resend`: only those bytes go out again. Bounded by
    /// [`GONE_ASKS_MAX`]; a record beyond it is resent whole.
    gone_asks: HashMap<u64, Vec<Nak>>,
    fresh: VecDeque<Fragment>,
    fresh_bytes: usize,
    store: BTreeMap<u64, Vec<u8>>,
    store_bytes: usize,
    unprotected: VecDeque<Unprotected>,
    next_seq: u64,
    sent_through: u64,
    /// The highest seq whose data packets were all handed out once.
    data_sent_through: u64,
    delivered: u64,
    /// Since when nothing has been left to send.
    idle_since_us: Option<u64>,
    stats: SenderStats,
}

fn sealed_len(body: usize) -> usize {
    HEADER_LEN + body + TAG_LEN
}

fn fragment_len(f: &Fragment) -> usize {
    FRAGMENT_HEADER + f.bytes.len()
}

impl UdpSender {
    /// A sender whose first record is `first_seq`, sealing under `key` for `session`.
    pub fn new(
        key: &[u8; KEY_LEN],
        session: u32,
        config: SenderConfig,
        first_seq: u64,
    ) -> Result<UdpSender, ConfigError> {
        if !(FRAGMENT_HEADER + 1..=fec::DATA_MAX).contains(&config.body_max) {
            return Err(ConfigError::BodyMax(config.body_max));
        }
        let burst = config.burst_bytes.max(DATAGRAM_MAX as u64);
        let first_seq = first_seq.max(1);
        let encoder = match config.scheme {
            Scheme::Xor => fec::layered_encoder(config.fec_layers)
                .map_err(|_| ConfigError::FecLayers(config.fec_layers))?,
            other => fec::encoder(other),
        };
        Ok(UdpSender {
            sealer: Sealer::new(key, session),
            fec: encoder,
            bucket: TokenBucket::new(config.rate_bytes_per_s, burst),
            repairs: VecDeque::new(),
            again: VecDeque::new(),
            again_bytes: 0,
            again_keys: HashSet::new(),
            gone_asks: HashMap::new(),
            fresh: VecDeque::new(),
            fresh_bytes: 0,
            store: BTreeMap::new(),
            store_bytes: 0,
            unprotected: VecDeque::new(),
            next_seq: first_seq,
            sent_through: first_seq - 1,
            data_sent_through: first_seq - 1,
            delivered: first_seq - 1,
            idle_since_us: None,
            stats: SenderStats::default(),
            config,
        })
    }

    /// The highest seq whose data and repair packets were all handed out.
    pub fn sent_through(&self) -> u64 {
        self.sent_through
    }

    /// The highest seq whose data packets were all handed out once (repairs covering them may
    /// still wait: `sent_through`). Rate control's round-trip marks: the mirror may hold a
    /// record one trip after its data left, long before the last layer's repairs did.
    pub fn data_sent_through(&self) -> u64 {
        self.data_sent_through
    }

    /// The highest seq the receiver is known to hold (`on_delivered`): a record NAKed before
    /// it arrived after all needs no resend (the journal may have released it since).
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The seq the next `offer` must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn stats(&self) -> SenderStats {
        self.stats
    }

    /// Paces at `rate_bytes_per_s` from `now_us` on (rate control: `super::control`).
    pub fn set_rate(&mut self, now_us: u64, rate_bytes_per_s: u64) {
        self.bucket.set_rate(now_us, rate_bytes_per_s);
        self.config.rate_bytes_per_s = rate_bytes_per_s;
    }

    /// The pace, bytes per second.
    pub fn rate(&self) -> u64 {
        self.config.rate_bytes_per_s
    }

    /// Bounds the send queue at `bytes` from the next `offer` on (what is queued already
    /// stays: the queue drains below the new bound before it takes more).
    pub fn set_queue_bytes_max(&mut self, bytes: usize) {
        self.config.queue_bytes_max = bytes;
    }

    /// Fragment bytes waiting for their first transmission.
    pub fn queued_bytes(&self) -> usize {
        self.fresh_bytes
    }

    /// Takes record `seq` (the next in order) for sending, or refuses it (`Full`: offer it
    /// again later).
    pub fn offer(&mut self, seq: u64, record: &[u8]) -> Result<(), OfferError> {
        if seq != self.next_seq {
            return Err(OfferError::OutOfOrder {
                got: seq,
                expected: self.next_seq,
            });
        }
        let fragments = cut(seq, record, self.config.body_max).ok_or(OfferError::TooLarge)?;
        let cost: usize = fragments.iter().map(fragment_len).sum();
        if self.fresh_bytes > 0 && self.fresh_bytes + cost > self.config.queue_bytes_max {
            self.stats.offers_full += 1;
            return Err(OfferError::Full);
        }
        self.keep(seq, record);
        self.fresh.extend(fragments);
        self.fresh_bytes += cost;
        self.unprotected
            .push_back(Unprotected { seq, last_pn: None });
        self.next_seq += 1;
        self.idle_since_us = None;
        Ok(())
    }

    /// Keeps a record for NAKs, dropping the oldest beyond the store's bound.
    fn keep(&mut self, seq: u64, record: &[u8]) {
        if record.len() > self.config.store_bytes_max {
            return;
        }
        self.store.insert(seq, record.to_vec());
        self.store_bytes += record.len();
        while self.store_bytes > self.config.store_bytes_max {
            let Some((_, old)) = self.store.pop_first() else {
                break;
            };
            self.store_bytes -= old.len();
        }
    }

    /// The receiver has every record through `seq`: they need not be kept.
    pub fn on_delivered(&mut self, seq: u64) {
        self.delivered = self.delivered.max(seq);
        while let Some(entry) = self.store.first_entry() {
            if *entry.key() > self.delivered {
                break;
            }
            self.store_bytes -= entry.remove().len();
        }
        let delivered = self.delivered;
        self.gone_asks.retain(|seq, _| *seq > delivered);
    }

    /// Queues again what the receiver asked for.
    pub fn on_nak(&mut self, naks: &[Nak]) -> NakOutcome {
        let mut outcome = NakOutcome::default();
        for nak in naks {
            if nak.seq <= self.delivered || nak.seq > self.data_sent_through {
                self.stats.naks_stale += 1;
                continue;
            }
            let Some(fragments) = self
                .store
                .get(&nak.seq)
                .and_then(|r| cut(nak.seq, r, self.config.body_max))
            else {
                if !outcome.gone.contains(&nak.seq) {
                    outcome.gone.push(nak.seq);
                    self.stats.naks_gone += 1;
                }
                self.remember_gone_ask(nak);
                continue;
            };
            let asked = fragments
                .into_iter()
                .filter(|f| nak.covers(f.seq, f.offset, f.bytes.len() as u32));
            for f in asked {
                if self.queue_again(f) {
                    outcome.queued += 1;
                } else {
                    outcome.skipped += 1;
                    self.stats.naks_skipped += 1;
                }
            }
        }
        outcome
    }

    /// Sends record `seq` again (one the store no longer had: `NakOutcome::gone`): the byte
    /// ranges its NAKs asked for, or all of it when they asked for the whole record or were
    /// not kept; fragments already queued again are not queued twice. `Full` if the retransmit
    /// queue cannot take them now (the asks are kept for the next try).
    pub fn resend(&mut self, seq: u64, record: &[u8]) -> Result<(), OfferError> {
        let fragments = cut(seq, record, self.config.body_max).ok_or(OfferError::TooLarge)?;
        let asks = self.gone_asks.get(&seq);
        let chosen: Vec<Fragment> = fragments
            .into_iter()
            .filter(|f| {
                asks.is_none_or(|a| {
                    a.iter()
                        .any(|n| n.covers(f.seq, f.offset, f.bytes.len() as u32))
                })
            })
            .filter(|f| !self.again_keys.contains(&(f.seq, f.offset)))
            .collect();
        let cost: usize = chosen.iter().map(fragment_len).sum();
        if self.again_bytes > 0 && self.again_bytes + cost > self.config.again_bytes_max {
            return Err(OfferError::Full);
        }
        self.gone_asks.remove(&seq);
        for f in chosen {
            self.push_again(f);
        }
        Ok(())
    }

    /// Keeps what a NAK asked of a record the store no longer had. A NAK of the whole record
    /// replaces any ranges (everything goes again).
    fn remember_gone_ask(&mut self, nak: &Nak) {
        if !self.gone_asks.contains_key(&nak.seq) && self.gone_asks.len() >= GONE_ASKS_MAX {
            return;
        }
        let asks = self.gone_asks.entry(nak.seq).or_default();
        match nak.range {
            None => {
                asks.clear();
                asks.push(*nak);
            }
            Some(_) if asks.iter().any(|n| n.range.is_none()) => {}
            Some(_) if asks.len() < GONE_RANGES_MAX && !asks.contains(nak) => asks.push(*nak),
            Some(_) if asks.len() >= GONE_RANGES_MAX => {
                // Too many pieces: the whole record.
                asks.clear();
                asks.push(Nak {
                    seq: nak.seq,
                    range: None,
                });
            }
            Some(_) => {}
        }
    }

    /// Queues a fragment for retransmission; false if the queue is full. One already queued
    /// is not queued twice.
    fn queue_again(&mut self, f: Fragment) -> bool {
        if self.again_keys.contains(&(f.seq, f.offset)) {
            return true;
        }
        if self.again_bytes + fragment_len(&f) > self.config.again_bytes_max {
            return false;
        }
        self.push_again(f);
        true
    }

    fn push_again(&mut self, f: Fragment) {
        self.again_keys.insert((f.seq, f.offset));
        self.again_bytes += fragment_len(&f);
        self.again.push_back(f);
        self.idle_since_us = None;
    }

    /// The next datagram, if there is one and the rate allows it now.
    pub fn poll_transmit(&mut self, now_us: u64) -> Option<Vec<u8>> {
        self.bucket.refill(now_us);
        let next = self.choose(now_us)?;
        if !self.bucket.take(self.next_len(&next)) {
            return None;
        }
        let datagram = match next {
            Next::Repair => self.hand_out_repair(),
            Next::Again => self.hand_out_again(),
            Next::Fresh => self.hand_out_fresh(),
        }?;
        self.stats.bytes_out += datagram.len() as u64;
        if self.nothing_queued() {
            self.idle_since_us = Some(now_us);
        }
        self.advance_sent_through();
        Some(datagram)
    }

    /// When `poll_transmit` may have something: the rate allows the next datagram, or the
    /// encoder is due to be flushed. `None`: nothing to send until an offer or a NAK.
    pub fn next_wakeup(&self) -> Option<u64> {
        if let Some(next) = self.peek() {
            return Some(self.bucket.ready_at(self.next_len(&next)));
        }
        let idle = self.idle_since_us?;
        self.fec
            .oldest_open()
            .map(|_| idle.saturating_add(self.config.flush_idle_us))
    }

    fn nothing_queued(&self) -> bool {
        self.repairs.is_empty() && self.again.is_empty() && self.fresh.is_empty()
    }

    fn peek(&self) -> Option<Next> {
        if !self.repairs.is_empty() {
            Some(Next::Repair)
        } else if !self.again.is_empty() {
            Some(Next::Again)
        } else if !self.fresh.is_empty() {
            Some(Next::Fresh)
        } else {
            None
        }
    }

    /// What goes out next; with nothing queued, flushes the encoder once idle long enough.
    fn choose(&mut self, now_us: u64) -> Option<Next> {
        if let Some(next) = self.peek() {
            return Some(next);
        }
        let idle = *self.idle_since_us.get_or_insert(now_us);
        if now_us.saturating_sub(idle) >= self.config.flush_idle_us {
            self.flush();
        }
        self.peek()
    }

    fn flush(&mut self) {
        if self.fec.oldest_open().is_none() {
            return;
        }
        let mut made = Vec::new();
        self.fec.flush(&mut made);
        self.stats.flushes += 1;
        self.queue_repairs(made);
        self.advance_sent_through();
    }

    fn next_len(&self, next: &Next) -> usize {
        let body = match next {
            Next::Repair => self.repairs.front().map_or(0, Vec::len),
            Next::Again => self.again.front().map_or(0, fragment_len),
            Next::Fresh => self.fresh.front().map_or(0, fragment_len),
        };
        sealed_len(body)
    }

    fn queue_repairs(&mut self, made: Vec<Repair>) {
        self.repairs.extend(made.iter().map(codec::encode));
    }

    fn hand_out_repair(&mut self) -> Option<Vec<u8>> {
        let body = self.repairs.pop_front()?;
        let (_, datagram) = self.sealer.seal(Kind::Repair, &body)?;
        self.stats.repair_packets += 1;
        Some(datagram)
    }

    fn hand_out_again(&mut self) -> Option<Vec<u8>> {
        let f = self.again.pop_front()?;
        self.again_keys.remove(&(f.seq, f.offset));
        self.again_bytes -= fragment_len(&f);
        self.stats.retransmitted_packets += 1;
        self.seal_data(&f).map(|(_, d)| d)
    }

    fn hand_out_fresh(&mut self) -> Option<Vec<u8>> {
        let f = self.fresh.pop_front()?;
        self.fresh_bytes -= fragment_len(&f);
        let (pn, datagram) = self.seal_data(&f)?;
        let last = f.offset as usize + f.bytes.len() == f.total as usize;
        if last {
            self.data_sent_through = f.seq;
            if let Some(u) = self.unprotected.iter_mut().find(|u| u.seq == f.seq) {
                u.last_pn = Some(pn);
            }
        }
        Some(datagram)
    }

    /// Seals a data packet and passes it through the FEC encoder, queuing the repairs it
    /// completes. `None` once the packet numbers ran out (never in practice).
    fn seal_data(&mut self, f: &Fragment) -> Option<(u64, Vec<u8>)> {
        let body = f.encode();
        let (pn, datagram) = self.sealer.seal(Kind::Data, &body)?;
        let mut made = Vec::new();
        // The body is within DATA_MAX (checked in `new`) and packet numbers increase, so the
        // encoder takes every packet; were it to refuse one, that packet goes unprotected and
        // a loss of it is NAKed.
        let _ = self.fec.push(pn, &body, &mut made);
        self.queue_repairs(made);
        self.stats.data_packets += 1;
        Some((pn, datagram))
    }

    /// Moves `sent_through` past every record whose data went out and whose repairs all did.
    fn advance_sent_through(&mut self) {
        if !self.repairs.is_empty() {
            return;
        }
        let open = self.fec.oldest_open();
        while let Some(u) = self.unprotected.front() {
            let Some(last_pn) = u.last_pn else { break };
            if open.is_some_and(|o| o <= last_pn) {
                break;
            }
            self.sent_through = u.seq;
            self.unprotected.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datagram::Opener;

    const KEY: [u8; KEY_LEN] = [5; KEY_LEN];

    fn config() -> SenderConfig {
        SenderConfig {
            body_max: 116,
            rate_bytes_per_s: 1_000_000,
            burst_bytes: 0,
            queue_bytes_max: 1_000,
            again_bytes_max: 500,
            store_bytes_max: 2_000,
            flush_idle_us: 0,
            scheme: Scheme::Xor,
            fec_layers: 3,
        }
    }

    fn drain(s: &mut UdpSender, now: u64) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| s.poll_transmit(now)).collect()
    }

    fn kinds(datagrams: &[Vec<u8>]) -> (usize, usize) {
        let mut o = Opener::new(&KEY, 1);
        let opened: Vec<_> = datagrams.iter().filter_map(|d| o.open(d).ok()).collect();
        let data = opened.iter().filter(|p| p.kind == Kind::Data).count();
        (data, opened.len() - data)
    }

    #[test]
    fn a_record_goes_out_as_fragments_then_its_repairs_and_is_sent_through() {
        let mut s = UdpSender::new(&KEY, 1, config(), 1).expect("config");
        s.offer(1, &[7; 250]).expect("offer");
        assert_eq!(s.sent_through(), 0);
        let out = drain(&mut s, 0);
        // 250 bytes in 100-byte pieces: 3 data packets; the idle flush closes the three
        // layers' groups they are in.
        let (data, repairs) = kinds(&out);
        assert_eq!(data, 3);
        assert!(repairs >= 3, "every layer's repair, got {repairs}");
        assert_eq!(s.sent_through(), 1);
        assert_eq!(s.stats().flushes, 1);
        assert_eq!(s.next_wakeup(), None, "nothing left");
    }

    #[test]
    fn fewer_layers_send_fewer_repairs_and_none_send_data_only() {
        let mut repairs_by_c = Vec::new();
        for c in 0..=3 {
            let mut cfg = config();
            cfg.fec_layers = c;
            let mut s = UdpSender::new(&KEY, 1, cfg, 1).expect("config");
            for seq in 1..=20 {
                s.offer(seq, &[seq as u8; 90]).expect("offer");
                let out = drain(&mut s, 0);
                let (data, repairs) = kinds(&out);
                assert_eq!(data, 1);
                assert_eq!(
                    s.sent_through(),
                    seq,
                    "sent through once handed out (c = {c})"
                );
                repairs_by_c.push((c, repairs));
            }
        }
        let total = |c| -> usize { repairs_by_c.iter().filter(|r| r.0 == c).map(|r| r.1).sum() };
        assert_eq!(total(0), 0, "no FEC: data packets only");
        assert!(
            total(1) < total(2) && total(2) < total(3),
            "{repairs_by_c:?}"
        );
        let mut cfg = config();
        cfg.fec_layers = 4;
        assert!(matches!(
            UdpSender::new(&KEY, 1, cfg, 1),
            Err(ConfigError::FecLayers(4))
        ));
    }

    #[test]
    fn sent_through_waits_for_the_repairs_when_flushing_is_delayed() {
        let mut c = config();
        c.flush_idle_us = 1_000;
        let mut s = UdpSender::new(&KEY, 1, c, 1).expect("config");
        s.offer(1, &[1; 50]).expect("offer");
        let out = drain(&mut s, 0);
        assert_eq!(kinds(&out), (1, 0), "the groups are still open");
        assert_eq!(s.sent_through(), 0);
        assert_eq!(s.next_wakeup(), Some(1_000), "the flush is due then");
        assert!(drain(&mut s, 999).is_empty());
        let out = drain(&mut s, 1_000);
        assert_eq!(kinds(&out).0, 0);
        assert!(kinds(&out).1 >= 3);
        assert_eq!(s.sent_through(), 1);
    }

    #[test]
    fn a_full_queue_refuses() {
        let mut s = UdpSender::new(&KEY, 1, config(), 1).expect("config");
        s.offer(1, &[0; 900])
            .expect("an empty queue takes any record");
        assert_eq!(s.offer(2, &[0; 10]), Err(OfferError::Full));
        assert_eq!(s.stats().offers_full, 1);
        assert_eq!(
            s.offer(3, &[0; 10]),
            Err(OfferError::OutOfOrder {
                got: 3,
                expected: 2
            })
        );
        drain(&mut s, 0);
        s.offer(2, &[0; 10]).expect("the queue drained");
    }

    #[test]
    fn the_rate_paces_the_datagrams_after_the_burst() {
        let mut c = config();
        // 1 byte/µs; the burst is raised to one datagram (65,507 bytes).
        c.queue_bytes_max = 1 << 20;
        let mut s = UdpSender::new(&KEY, 1, c, 1).expect("config");
        s.offer(1, &[0; 200_000]).expect("offer");
        let (mut now, mut sent, mut largest) = (0u64, 0u64, 0u64);
        loop {
            for d in drain(&mut s, now) {
                sent += d.len() as u64;
                largest = largest.max(d.len() as u64);
            }
            let Some(wake) = s.next_wakeup() else { break };
            assert!(
                wake > now,
                "a wakeup in the future when the rate holds back"
            );
            now = wake;
        }
        let burst = DATAGRAM_MAX as u64;
        assert!(sent > 200_000 * 5 / 4, "data and repairs: {sent}");
        assert!(sent <= burst + now, "{sent} bytes by {now} µs");
        assert!(sent + largest >= burst + now, "{sent} bytes by {now} µs");
        assert_eq!(s.sent_through(), 1);
    }

    #[test]
    fn rate_control_sets_the_pace_and_the_queue_bound() {
        let mut c = config();
        c.queue_bytes_max = 1 << 20;
        let mut s = UdpSender::new(&KEY, 1, c, 1).expect("config");
        s.offer(1, &[0; 200_000]).expect("offer");
        // The burst goes at once; then 1 byte/µs, until the rate is halved at 100 ms.
        let sent_by = |s: &mut UdpSender, from: u64, to: u64| -> u64 {
            (from..to)
                .step_by(100)
                .flat_map(|t| drain(s, t))
                .map(|d| d.len() as u64)
                .sum()
        };
        sent_by(&mut s, 0, 1);
        let fast = sent_by(&mut s, 1, 100_000);
        s.set_rate(100_000, 500_000);
        let slow = sent_by(&mut s, 100_000, 200_000);
        assert!((95_000..=101_000).contains(&fast), "{fast}");
        assert!((45_000..=51_000).contains(&slow), "{slow}");
        // A lower bound refuses offers until the queue drains below it.
        s.set_queue_bytes_max(1_000);
        assert_eq!(s.offer(2, &[0; 10]), Err(OfferError::Full));
        s.set_rate(200_000, 100_000_000);
        sent_by(&mut s, 200_000, 210_000);
        s.offer(2, &[0; 10]).expect("drained");
    }

    /// Seed 3037 of the network simulation: a record gone from the store and NAKed for a few
    /// bytes was resent whole for every NAK, so a slow paced sender spent its rate on
    /// duplicates and the mirror never caught up. Only what was asked goes out again.
    #[test]
    fn a_gone_record_naked_by_range_is_resent_only_for_that_range() {
        let mut s = UdpSender::new(&KEY, 1, config(), 1).expect("config");
        for seq in 1..=5 {
            s.offer(seq, &[seq as u8; 600]).expect("offer");
            drain(&mut s, 0);
        }
        // Record 1 is gone from the store (it keeps 2,000 bytes).
        let out = s.on_nak(&[Nak {
            seq: 1,
            range: Some((300, 350)),
        }]);
        assert_eq!(out.gone, vec![1]);
        s.resend(1, &[1; 600]).expect("resend");
        let mut o = Opener::new(&KEY, 1);
        let offsets: Vec<u32> = drain(&mut s, 0)
            .iter()
            .filter_map(|d| o.open(d).ok())
            .filter(|p| p.kind == Kind::Data)
            .filter_map(|p| Fragment::decode(&p.body))
            .map(|f| f.offset)
            .collect();
        assert_eq!(offsets, vec![300], "only the fragment asked for");
        // Asked whole, or with nothing kept, the record goes whole.
        s.on_nak(&[Nak {
            seq: 1,
            range: None,
        }]);
        s.resend(1, &[1; 600]).expect("resend");
        assert_eq!(kinds(&drain(&mut s, 0)).0, 6);
    }

    #[test]
    fn naks_queue_the_asked_fragments_once_and_gone_records_are_named() {
        let mut s = UdpSender::new(&KEY, 1, config(), 1).expect("config");
        for seq in 1..=5 {
            s.offer(seq, &[seq as u8; 600]).expect("offer");
            drain(&mut s, 0);
        }
        // The store keeps 2,000 bytes: records 1 and 2 are gone.
        let before = s.stats().retransmitted_packets;
        let nak = |seq, range| Nak { seq, range };
        let out = s.on_nak(&[
            nak(1, None),
            nak(4, Some((100, 250))),
            nak(4, Some((100, 150))),
            nak(9, None),
        ]);
        assert_eq!(out.gone, vec![1]);
        assert_eq!(out.queued, 3, "offsets 100 and 200 twice (queued once)");
        assert_eq!(s.stats().naks_stale, 1, "record 9 was never sent");
        let again = drain(&mut s, 0);
        assert_eq!(s.stats().retransmitted_packets - before, 2);
        let mut o = Opener::new(&KEY, 1);
        let offsets: Vec<u32> = again
            .iter()
            .filter_map(|d| o.open(d).ok())
            .filter(|p| p.kind == Kind::Data)
            .filter_map(|p| Fragment::decode(&p.body))
            .map(|f| f.offset)
            .collect();
        assert_eq!(offsets, vec![100, 200]);
        // A full retransmit queue skips; a resend of a gone record queues it whole.
        let out = s.on_nak(&[nak(5, None), nak(3, None), nak(4, None)]);
        assert!(out.skipped > 0, "500 bytes of retransmit queue");
        drain(&mut s, 0);
        s.resend(1, &[1; 600]).expect("resend");
        assert_eq!(kinds(&drain(&mut s, 0)).0, 6);
        s.on_delivered(5);
        assert_eq!(
            s.on_nak(&[nak(4, None)]),
            NakOutcome::default(),
            "delivered"
        );
    }

    #[test]
    fn body_max_is_checked() {
        let mut c = config();
        c.body_max = FRAGMENT_HEADER;
        assert!(UdpSender::new(&KEY, 1, c.clone(), 1).is_err());
        c.body_max = fec::DATA_MAX + 1;
        assert!(UdpSender::new(&KEY, 1, c, 1).is_err());
    }
}
