//! The stream end to end: sender → a seeded lossy link → receiver, NAKs and positions back over
//! a reliable control path with a delay, every record checked on arrival.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::datagram::{Kind, KEY_LEN};

const KEY: [u8; KEY_LEN] = [0x42; KEY_LEN];
const SESSION: u32 = 77;
/// One-way delay of the link and of the control path.
const DELAY_US: u64 = 1_000;
const STEP_US: u64 = 50;
const PATTERN_PACKETS: usize = 2_000;

/// How the link loses packets.
#[derive(Debug, Clone)]
enum Loss {
    /// Each packet lost with `p`; a burst of 2..=`burst_max` losses starts with `burst_p`.
    Random {
        p: f64,
        burst_p: f64,
        burst_max: u32,
    },
    /// Packet i is lost if `i < PATTERN_PACKETS` and `pattern[i % len]`: a fixed pattern
    /// forever could lose every retransmission of one packet (same position in each round).
    Pattern(Vec<bool>),
}

/// A one-way datagram link: loss, delay with jitter (so reordering within `jitter_us`),
/// duplicates.
struct Link {
    rng: SmallRng,
    loss: Loss,
    jitter_us: u64,
    duplicate_p: f64,
    burst_left: u32,
    sent: usize,
    /// (arrival, order, datagram).
    in_flight: BinaryHeap<Reverse<(u64, u64, Vec<u8>)>>,
    order: u64,
    lost_data: u64,
    lost_repairs: u64,
    duplicated: u64,
}

impl Link {
    fn new(seed: u64, loss: Loss, jitter_us: u64, duplicate_p: f64) -> Link {
        Link {
            rng: SmallRng::seed_from_u64(seed),
            loss,
            jitter_us,
            duplicate_p,
            burst_left: 0,
            sent: 0,
            in_flight: BinaryHeap::new(),
            order: 0,
            lost_data: 0,
            lost_repairs: 0,
            duplicated: 0,
        }
    }

    fn loses(&mut self) -> bool {
        let i = self.sent;
        self.sent += 1;
        match &self.loss {
            Loss::Pattern(p) => i < PATTERN_PACKETS && !p.is_empty() && p[i % p.len()],
            Loss::Random {
                p,
                burst_p,
                burst_max,
            } => {
                let (p, burst_p, burst_max) = (*p, *burst_p, *burst_max);
                if self.burst_left > 0 {
                    self.burst_left -= 1;
                    return true;
                }
                if burst_max >= 2 && self.rng.gen_bool(burst_p) {
                    self.burst_left = self.rng.gen_range(1..burst_max);
                    return true;
                }
                self.rng.gen_bool(p)
            }
        }
    }

    fn send(&mut self, now: u64, datagram: Vec<u8>) {
        if self.loses() {
            // The kind byte is in the clear (authenticated, not encrypted).
            match datagram[1] {
                k if k == Kind::Data as u8 => self.lost_data += 1,
                _ => self.lost_repairs += 1,
            }
            return;
        }
        if self.rng.gen_bool(self.duplicate_p) {
            self.duplicated += 1;
            self.enqueue(now, datagram.clone());
        }
        self.enqueue(now, datagram);
    }

    fn enqueue(&mut self, now: u64, datagram: Vec<u8>) {
        let jitter = if self.jitter_us == 0 {
            0
        } else {
            self.rng.gen_range(0..self.jitter_us)
        };
        self.order += 1;
        self.in_flight
            .push(Reverse((now + DELAY_US + jitter, self.order, datagram)));
    }

    fn arrivals(&mut self, now: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while self.in_flight.peek().is_some_and(|Reverse(p)| p.0 <= now) {
            if let Some(Reverse((_, _, d))) = self.in_flight.pop() {
                out.push(d);
            }
        }
        out
    }
}

/// A message on the reliable control path.
enum Control {
    /// A NAK body (`encode_naks`).
    Naks(Vec<u8>),
    SentThrough(u64),
    Delivered(u64),
}

/// What a run found.
#[derive(Debug, Default)]
#[allow(dead_code)] // Some fields are only printed.
struct Figures {
    records: usize,
    bytes: usize,
    lost_data: u64,
    lost_repairs: u64,
    duplicated: u64,
    recovered: u64,
    naks: u64,
    gone: u64,
    retransmitted: u64,
    offers_full: u64,
    sim_ms: u64,
}

struct Run {
    sender: UdpSender,
    receiver: UdpReceiver,
    link: Link,
    control: VecDeque<(u64, Control)>,
    records: Vec<Vec<u8>>,
    /// Seqs the journal still has to resend (`Gone`).
    resend: VecDeque<u64>,
    naks_on: bool,
    delivered: usize,
    now: u64,
    gone: u64,
}

fn records(rng: &mut SmallRng, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|_| {
            // Half of them small, so that both many-record and many-fragment cases occur.
            let len = if rng.gen_bool(0.5) {
                rng.gen_range(1..=2_048)
            } else {
                rng.gen_range(1..=64 << 10)
            };
            (0..len).map(|_| rng.gen()).collect()
        })
        .collect()
}

fn sender_config(store_bytes_max: usize) -> SenderConfig {
    SenderConfig {
        rate_bytes_per_s: 100_000_000,
        burst_bytes: 128 << 10,
        queue_bytes_max: 1 << 20,
        again_bytes_max: 1 << 20,
        store_bytes_max,
        ..SenderConfig::default()
    }
}

fn receiver_config() -> ReceiverConfig {
    ReceiverConfig {
        window_records: 512,
        window_bytes: 16 << 20,
        nak_delay_us: 3_000,
        nak_interval_us: 10_000,
        ..ReceiverConfig::default()
    }
}

impl Run {
    fn new(seed: u64, n: usize, link: Link, naks_on: bool) -> Run {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
        // On odd seeds the store keeps only 64 KiB: NAKs find most records gone and the
        // journal resends them.
        let store = if seed % 2 == 1 { 64 << 10 } else { 8 << 20 };
        Run {
            sender: UdpSender::new(&KEY, SESSION, sender_config(store), 1).expect("config"),
            receiver: UdpReceiver::new(&KEY, SESSION, receiver_config(), 1),
            link,
            control: VecDeque::new(),
            records: records(&mut rng, n),
            resend: VecDeque::new(),
            naks_on,
            delivered: 0,
            now: 0,
            gone: 0,
        }
    }

    fn offer(&mut self) {
        while let Some(record) = self.records.get(self.sender.next_seq() as usize - 1) {
            if self.sender.offer(self.sender.next_seq(), record).is_err() {
                break;
            }
        }
        while let Some(seq) = self.resend.front().copied() {
            if self
                .sender
                .resend(seq, &self.records[seq as usize - 1])
                .is_err()
            {
                break;
            }
            self.resend.pop_front();
        }
    }

    fn transmit(&mut self) {
        while let Some(d) = self.sender.poll_transmit(self.now) {
            self.link.send(self.now, d);
        }
    }

    /// Delivers arrivals, checks every record handed on.
    fn receive(&mut self) {
        for d in self.link.arrivals(self.now) {
            self.receiver.on_datagram(&d);
        }
        while let Some((seq, record)) = self.receiver.pop_record() {
            assert_eq!(seq as usize, self.delivered + 1, "in order, exactly once");
            assert!(
                record == self.records[self.delivered],
                "record {seq} byte-identical"
            );
            self.delivered += 1;
        }
    }

    fn send_control(&mut self, c: Control) {
        self.control.push_back((self.now + DELAY_US, c));
    }

    fn control_tick(&mut self) {
        if self.naks_on {
            let naks = self.receiver.naks(self.now);
            if !naks.is_empty() {
                self.send_control(Control::Naks(encode_naks(&naks)));
            }
            let sent = self.sender.sent_through();
            self.send_control(Control::SentThrough(sent));
        }
        let delivered = self.receiver.next_seq() - 1;
        self.send_control(Control::Delivered(delivered));
        while self.control.front().is_some_and(|(at, _)| *at <= self.now) {
            let Some((_, c)) = self.control.pop_front() else {
                break;
            };
            match c {
                Control::Naks(bytes) => {
                    let naks = decode_naks(&bytes).expect("our own NAK bytes");
                    let out = self.sender.on_nak(&naks);
                    self.gone += out.gone.len() as u64;
                    self.resend.extend(out.gone);
                }
                Control::SentThrough(seq) => self.receiver.note_sent(seq),
                Control::Delivered(seq) => self.sender.on_delivered(seq),
            }
        }
    }

    /// Runs until every record is delivered (or `limit_ms` of simulated time).
    fn run(&mut self, limit_ms: u64) -> Figures {
        let mut sent_through = 0;
        while self.delivered < self.records.len() && self.now < limit_ms * 1_000 {
            self.now += STEP_US;
            self.offer();
            // The send queue stays within its bound (one record over: an empty queue takes
            // any record).
            assert!(self.sender.queued_bytes() <= (1 << 20) + (66 << 10));
            self.transmit();
            let now_through = self.sender.sent_through();
            assert!(now_through >= sent_through && now_through < self.sender.next_seq());
            sent_through = now_through;
            self.receive();
            if self.now.is_multiple_of(1_000) {
                self.control_tick();
            }
        }
        self.figures()
    }

    /// Lets everything still on the link arrive (the jitter is below the delay).
    fn drain_link(&mut self) {
        self.now += 2 * DELAY_US;
        self.receive();
    }

    fn figures(&self) -> Figures {
        let (s, r) = (self.sender.stats(), self.receiver.stats());
        Figures {
            records: self.delivered,
            bytes: self.records[..self.delivered].iter().map(Vec::len).sum(),
            lost_data: self.link.lost_data,
            lost_repairs: self.link.lost_repairs,
            duplicated: self.link.duplicated,
            recovered: r.recovered,
            naks: r.naks_sent,
            gone: self.gone,
            retransmitted: s.retransmitted_packets,
            offers_full: s.offers_full,
            sim_ms: self.now / 1_000,
        }
    }
}

#[test]
fn every_record_arrives_once_in_order_over_a_lossy_reordering_duplicating_link() {
    for seed in 0..6u64 {
        let mut rng = SmallRng::seed_from_u64(seed);
        // Random loss 0–5 %, bursts of up to 20, duplicates up to 2 %.
        let loss = Loss::Random {
            p: seed as f64 * 0.01,
            burst_p: rng.gen_range(0.0..0.003),
            burst_max: 20,
        };
        let link = Link::new(seed, loss, 500, rng.gen_range(0.0..0.02));
        let mut run = Run::new(seed, 2_000, link, true);
        let f = run.run(60_000);
        eprintln!("seed {seed}: {f:?}");
        assert_eq!(f.records, 2_000, "seed {seed}: every record delivered");
        assert!(f.offers_full > 0, "seed {seed}: back-pressure engaged");
        if seed > 0 {
            assert!(f.lost_data > 0 && f.recovered > 0, "seed {seed}: {f:?}");
        }
        if seed >= 3 {
            assert!(f.naks > 0 && f.retransmitted > 0, "seed {seed}: {f:?}");
        }
        if seed % 2 == 1 {
            assert!(f.gone > 0, "seed {seed}: resent from the journal: {f:?}");
        }
        run.drain_link();
        let dropped = run.receiver.dropped();
        assert_eq!(dropped.unauthentic + dropped.malformed, 0);
        // Each duplicated packet is opened once; its other copy is a replay.
        assert_eq!(dropped.replayed, f.duplicated, "seed {seed}");
    }
}

#[test]
fn fec_alone_rebuilds_every_loss_at_low_random_loss() {
    for seed in 0..3u64 {
        let loss = Loss::Random {
            p: 0.005,
            burst_p: 0.0,
            burst_max: 0,
        };
        // No reordering: a repair arriving before a late member would rebuild it early, and
        // count as recovered though it was not lost.
        let link = Link::new(seed + 100, loss, 0, 0.0);
        // No NAKs at all: what is delivered, FEC rebuilt.
        let mut run = Run::new(seed, 1_000, link, false);
        let f = run.run(10_000);
        eprintln!("seed {seed}: {f:?}");
        assert_eq!(f.records, 1_000, "seed {seed}: {f:?}");
        assert!(f.lost_data > 50, "seed {seed}: losses happened: {f:?}");
        assert_eq!(f.recovered, f.lost_data, "every lost data packet rebuilt");
        assert_eq!(run.receiver.stats().fec_lost, 0);
        assert_eq!(f.retransmitted, 0);
    }
}

#[test]
fn forged_and_replayed_packets_are_dropped_and_counted_never_delivered() {
    let link = Link::new(1, Loss::Pattern(vec![]), 0, 0.0);
    let mut run = Run::new(9, 50, link, true);
    let mut captured = Vec::new();
    let mut forged = 0;
    while run.delivered < 50 && run.now < 1_000_000 {
        run.now += STEP_US;
        run.offer();
        while let Some(d) = run.sender.poll_transmit(run.now) {
            // Every packet is also replayed later, and a forged copy (one body bit flipped)
            // goes first.
            let mut bad = d.clone();
            let i = 20 + (captured.len() % (bad.len() - 36));
            bad[i] ^= 0x10;
            run.link.send(run.now, bad);
            forged += 1;
            captured.push(d.clone());
            run.link.send(run.now, d);
        }
        run.receive();
        if run.now.is_multiple_of(1_000) {
            run.control_tick();
        }
    }
    assert_eq!(run.delivered, 50);
    // The last repairs still on the link arrive.
    run.drain_link();
    for d in &captured {
        run.receiver.on_datagram(d);
    }
    let mut other_session = captured[0].clone();
    other_session[4] ^= 1;
    run.receiver.on_datagram(&other_session);
    assert_eq!(run.receiver.pop_record(), None, "nothing more delivered");
    let dropped = run.receiver.dropped();
    assert_eq!(dropped.unauthentic, forged);
    assert_eq!(dropped.replayed, captured.len() as u64);
    assert_eq!(dropped.other_session, 1);
    assert_eq!(run.receiver.stats().records, 50);
}

#[test]
fn naks_round_trip_and_bad_bytes_are_refused() {
    let naks = vec![
        Nak {
            seq: 3,
            range: None,
        },
        Nak {
            seq: 4,
            range: Some((0, 1_200)),
        },
        Nak {
            seq: u64::MAX,
            range: Some((7, u32::MAX)),
        },
    ];
    let b = encode_naks(&naks);
    assert_eq!(b.len(), 2 + 3 * NAK_ENTRY_LEN);
    assert_eq!(decode_naks(&b), Ok(naks));
    for n in 0..b.len() {
        assert_eq!(decode_naks(&b[..n]), Err(NakError::Length), "cut to {n}");
    }
    let with = |at: usize, v: &[u8]| {
        let mut x = b.clone();
        x[at..at + v.len()].copy_from_slice(v);
        decode_naks(&x)
    };
    assert_eq!(with(2, &[0; 8]), Err(NakError::Entry), "seq 0");
    assert_eq!(
        with(2 + 16 + 8, &[0, 0, 4, 176]),
        Err(NakError::Entry),
        "empty range"
    );
    assert_eq!(
        with(2 + 32 + 12, &[0; 4]),
        Err(NakError::Entry),
        "to < from"
    );
    let many = vec![
        Nak {
            seq: 1,
            range: None
        };
        NAK_ENTRIES_MAX + 5
    ];
    assert_eq!(
        decode_naks(&encode_naks(&many)).map(|v| v.len()),
        Ok(NAK_ENTRIES_MAX)
    );
    let mut too_many = encode_naks(&many);
    too_many[..2].copy_from_slice(&((NAK_ENTRIES_MAX + 1) as u16).to_be_bytes());
    too_many.extend_from_slice(&[0; NAK_ENTRY_LEN]);
    assert_eq!(decode_naks(&too_many), Err(NakError::Length));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Any periodic loss pattern over the first 2,000 packets, all of them lost included: with
    /// NAKs every record arrives once, in order.
    #[test]
    fn any_loss_pattern_delivers_every_record(
        pattern in proptest::collection::vec(proptest::bool::weighted(0.3), 1..64),
        seed in any::<u64>(),
    ) {
        let link = Link::new(seed, Loss::Pattern(pattern.clone()), 300, 0.0);
        let mut run = Run::new(seed, 60, link, true);
        let f = run.run(120_000);
        prop_assert_eq!(f.records, 60, "pattern {:?}: {:?}", pattern, f);
    }
}
