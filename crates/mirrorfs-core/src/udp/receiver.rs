//! The mirror's side of the stream: datagrams in, records out in journal order, NAKs for what
//! neither arrived nor was rebuilt.
//!
//! Limits and what happens at them:
//! - The reassembler holds `window_records` seqs from the next record owed and at most
//!   `window_bytes` of the later ones: a fragment beyond is dropped and counted (`ahead`); its
//!   record is asked for again once it is within the window.
//! - The FEC decoder holds `fec_window` (seqs and bytes): older packets are dropped as late
//!   (its own counters); a packet it cannot rebuild is found by the reassembler's gap.
//! - `nak_max` entries per `naks` call, oldest first; a record is asked for at most once per
//!   `nak_interval_us`, and not before it has been missing for `nak_delay_us`.
//! - The datagram layer drops what is malformed, of another session, unauthentic or replayed
//!   (`Opener`'s counts); a data body larger than FEC's `DATA_MAX` is dropped as oversize.

use std::collections::BTreeMap;

use super::Nak;
use crate::datagram::fragment::{Fragment, Reassembler, Refused};
use crate::datagram::{DropCounts, Kind, Opener, KEY_LEN};
use crate::fec::{self, codec, FecDecoder, Recovery, Scheme, Window};

/// The receiver's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverConfig {
    pub window_records: u64,
    pub window_bytes: u64,
    pub fec_window: Window,
    pub scheme: Scheme,
    pub nak_delay_us: u64,
    pub nak_interval_us: u64,
    pub nak_max: usize,
}

impl Default for ReceiverConfig {
    fn default() -> ReceiverConfig {
        ReceiverConfig {
            window_records: 4_096,
            window_bytes: 64 << 20,
            fec_window: Window::default(),
            scheme: fec::DEFAULT_SCHEME,
            nak_delay_us: 5_000,
            nak_interval_us: 100_000,
            nak_max: 256,
        }
    }
}

/// The receiver's counters (drops of the datagram layer: `dropped`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverStats {
    pub packets: u64,
    pub data_packets: u64,
    pub repair_packets: u64,
    /// Data packets rebuilt by FEC.
    pub recovered: u64,
    /// Data packets FEC gave up on (they are NAKed through the reassembler's gaps).
    pub fec_lost: u64,
    pub records: u64,
    pub oversize: u64,
    pub bad_fragments: u64,
    pub bad_repairs: u64,
    pub refused_repairs: u64,
    pub duplicate_fragments: u64,
    pub ahead_fragments: u64,
    pub inconsistent_fragments: u64,
    /// NAK entries handed out by `naks`.
    pub naks_sent: u64,
}

/// When a missing record was first seen missing and last asked for.
#[derive(Debug, Clone, Copy)]
struct Gap {
    since_us: u64,
    asked_us: Option<u64>,
}

/// The mirror's side of the stream (see the module's limits).
pub struct UdpReceiver {
    config: ReceiverConfig,
    opener: Opener,
    fec: Box<dyn FecDecoder + Send>,
    reassembler: Reassembler,
    /// The highest seq known to exist: from fragments (even refused ones) and `note_sent`.
    highest_known: u64,
    /// The sender's `sent_through`, from `note_sent`.
    sent_through: u64,
    gaps: BTreeMap<u64, Gap>,
    recoveries: Vec<Recovery>,
    stats: ReceiverStats,
}

impl UdpReceiver {
    /// A receiver that owes record `next_seq` first, opening under `key` for `session`.
    pub fn new(
        key: &[u8; KEY_LEN],
        session: u32,
        config: ReceiverConfig,
        next_seq: u64,
    ) -> UdpReceiver {
        let next_seq = next_seq.max(1);
        UdpReceiver {
            opener: Opener::new(key, session),
            fec: fec::decoder(config.scheme, config.fec_window),
            reassembler: Reassembler::new(next_seq, config.window_records, config.window_bytes),
            highest_known: next_seq - 1,
            sent_through: 0,
            gaps: BTreeMap::new(),
            recoveries: Vec::new(),
            stats: ReceiverStats::default(),
            config,
        }
    }

    pub fn stats(&self) -> ReceiverStats {
        self.stats
    }

    /// Datagrams the packet layer dropped, by reason.
    pub fn dropped(&self) -> DropCounts {
        self.opener.dropped
    }

    /// The seq of the next record `pop_record` will hand on.
    pub fn next_seq(&self) -> u64 {
        self.reassembler.next_seq()
    }

    /// Takes one received datagram; whatever fails a check is dropped and counted.
    pub fn on_datagram(&mut self, datagram: &[u8]) {
        self.stats.packets += 1;
        let Ok(packet) = self.opener.open(datagram) else {
            return;
        };
        match packet.kind {
            Kind::Data => self.on_data(packet.pn, &packet.body),
            Kind::Repair => self.on_repair(&packet.body),
        }
        self.take_recoveries();
    }

    fn on_data(&mut self, pn: u64, body: &[u8]) {
        self.stats.data_packets += 1;
        if body.len() > fec::DATA_MAX {
            self.stats.oversize += 1;
            return;
        }
        let Some(fragment) = Fragment::decode(body) else {
            self.stats.bad_fragments += 1;
            return;
        };
        self.fec.on_data(pn, body, &mut self.recoveries);
        self.take_fragment(fragment);
    }

    fn on_repair(&mut self, body: &[u8]) {
        self.stats.repair_packets += 1;
        let Ok(repair) = codec::parse(body) else {
            self.stats.bad_repairs += 1;
            return;
        };
        if self.fec.on_repair(repair, &mut self.recoveries).is_err() {
            self.stats.refused_repairs += 1;
        }
    }

    /// Hands what FEC rebuilt to the reassembler.
    fn take_recoveries(&mut self) {
        for r in std::mem::take(&mut self.recoveries) {
            match r {
                Recovery::Rebuilt { data, .. } => {
                    self.stats.recovered += 1;
                    match Fragment::decode(&data) {
                        Some(f) => self.take_fragment(f),
                        None => self.stats.bad_fragments += 1,
                    }
                }
                Recovery::Lost { .. } => self.stats.fec_lost += 1,
            }
        }
    }

    fn take_fragment(&mut self, f: Fragment) {
        self.highest_known = self.highest_known.max(f.seq);
        match self.reassembler.take(f) {
            Ok(()) => {}
            Err(Refused::Duplicate) => self.stats.duplicate_fragments += 1,
            Err(Refused::Ahead) => self.stats.ahead_fragments += 1,
            Err(Refused::Inconsistent) => self.stats.inconsistent_fragments += 1,
        }
    }

    /// The sender's `sent_through`, from the control connection: records through `seq` exist,
    /// so a lost tail is asked for too.
    pub fn note_sent(&mut self, seq: u64) {
        self.highest_known = self.highest_known.max(seq);
        self.sent_through = self.sent_through.max(seq);
    }

    /// The next record in journal order, once it is whole.
    pub fn pop_record(&mut self) -> Option<(u64, Vec<u8>)> {
        let record = self.reassembler.pop()?;
        self.stats.records += 1;
        Some(record)
    }

    /// What to ask for again now (see the module's rules), oldest first.
    pub fn naks(&mut self, now_us: u64) -> Vec<Nak> {
        let missing = self.missing();
        let mut gaps = BTreeMap::new();
        let mut out = Vec::new();
        let mut due = false;
        for (i, nak) in missing.iter().enumerate() {
            // Entries of one record are adjacent: the record's gap decides for all of them.
            if i == 0 || missing[i - 1].seq != nak.seq {
                let gap = self.gaps.get(&nak.seq).copied().unwrap_or(Gap {
                    since_us: now_us,
                    asked_us: None,
                });
                due = self.is_due(gap, now_us);
                let asked_us = if due { Some(now_us) } else { gap.asked_us };
                gaps.insert(nak.seq, Gap { asked_us, ..gap });
            }
            if due {
                out.push(*nak);
            }
        }
        // Only the gaps still missing are remembered: at most `nak_max`.
        self.gaps = gaps;
        self.stats.naks_sent += out.len() as u64;
        out
    }

    /// Whether a gap is to be asked for now.
    fn is_due(&self, gap: Gap, now_us: u64) -> bool {
        let waited = now_us.saturating_sub(gap.since_us) >= self.config.nak_delay_us;
        let not_recent = gap
            .asked_us
            .is_none_or(|t| now_us.saturating_sub(t) >= self.config.nak_interval_us);
        waited && not_recent
    }

    /// When a gap known now becomes due to be asked for (`None`: no gap known).
    pub fn next_nak_due(&self) -> Option<u64> {
        let due = |g: &Gap| match g.asked_us {
            None => g.since_us.saturating_add(self.config.nak_delay_us),
            Some(t) => t.saturating_add(self.config.nak_interval_us),
        };
        self.gaps.values().map(due).min()
    }

    /// The reassembler's gaps, then whole records known to exist past the highest fragment
    /// it took, within its window; at most `nak_max`.
    fn missing(&self) -> Vec<Nak> {
        let max = self.config.nak_max;
        let highest = self.reassembler.highest();
        // The end of the highest record held in part may simply not be sent yet (a large record
        // takes a while at the paced rate): it is missing only once something later is known.
        let tail_pending = |seq: u64, range: Option<(u32, u32)>| {
            seq == highest
                && self.highest_known <= highest
                && self.sent_through < highest
                && range.is_some_and(|(_, to)| Some(to) == self.reassembler.partial_total(seq))
        };
        let mut out: Vec<Nak> = self
            .reassembler
            .missing(max)
            .into_iter()
            .filter(|&(seq, range)| !tail_pending(seq, range))
            .map(|(seq, range)| Nak { seq, range })
            .collect();
        let window_end = self.reassembler.next_seq() + self.config.window_records.max(1) - 1;
        let from = self
            .reassembler
            .highest()
            .max(self.reassembler.next_seq() - 1)
            + 1;
        let to = self.highest_known.min(window_end);
        for seq in from..=to {
            if out.len() >= max {
                break;
            }
            out.push(Nak { seq, range: None });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datagram::fragment::cut;
    use crate::datagram::Sealer;

    const KEY: [u8; KEY_LEN] = [9; KEY_LEN];

    fn config() -> ReceiverConfig {
        ReceiverConfig {
            nak_delay_us: 10,
            nak_interval_us: 100,
            ..ReceiverConfig::default()
        }
    }

    /// The data packets of records `seqs` (each 250 bytes of its seq), sealed in order.
    fn packets(sealer: &mut Sealer, seqs: std::ops::RangeInclusive<u64>) -> Vec<Vec<u8>> {
        seqs.flat_map(|seq| cut(seq, &[seq as u8; 250], 116).expect("cut"))
            .map(|f| sealer.seal(Kind::Data, &f.encode()).expect("seal").1)
            .collect()
    }

    #[test]
    fn records_come_out_in_order_and_gaps_are_asked_for_once_per_interval() {
        let mut s = Sealer::new(&KEY, 1);
        let mut r = UdpReceiver::new(&KEY, 1, config(), 1);
        let p = packets(&mut s, 1..=3);
        // Record 2 is three packets (100 + 100 + 50 bytes): lose its middle one.
        for (i, d) in p.iter().enumerate() {
            if i != 4 {
                r.on_datagram(d);
            }
        }
        assert_eq!(r.pop_record(), Some((1, vec![1; 250])));
        assert_eq!(r.pop_record(), None, "record 2 is incomplete");
        assert!(r.naks(0).is_empty(), "not missing for 10 µs yet");
        assert_eq!(r.next_nak_due(), Some(10));
        let want = vec![Nak {
            seq: 2,
            range: Some((100, 200)),
        }];
        assert_eq!(r.naks(10), want);
        assert!(r.naks(50).is_empty(), "asked 40 µs ago");
        assert_eq!(r.naks(110), want);
        assert_eq!(r.stats().naks_sent, 2);
        r.on_datagram(&p[4]);
        assert!(r.naks(1_000).is_empty());
        assert_eq!(r.pop_record(), Some((2, vec![2; 250])));
        assert_eq!(r.pop_record(), Some((3, vec![3; 250])));
        assert_eq!(r.stats().records, 3);
    }

    #[test]
    fn a_lost_tail_is_asked_for_once_the_sender_says_it_was_sent() {
        let mut s = Sealer::new(&KEY, 1);
        let mut r = UdpReceiver::new(&KEY, 1, config(), 1);
        for d in packets(&mut s, 1..=1) {
            r.on_datagram(&d);
        }
        assert!(r.naks(100).is_empty(), "nothing known missing");
        r.note_sent(3);
        r.naks(100);
        let seqs: Vec<u64> = r.naks(200).iter().map(|n| n.seq).collect();
        assert_eq!(seqs, vec![2, 3]);
    }

    #[test]
    fn the_unsent_end_of_a_record_is_not_asked_for_until_the_sender_passed_it() {
        let mut s = Sealer::new(&KEY, 1);
        let mut r = UdpReceiver::new(&KEY, 1, config(), 1);
        // Record 1 is three packets; the first two arrived, the third is not sent yet.
        let p = packets(&mut s, 1..=1);
        for d in &p[..2] {
            r.on_datagram(d);
        }
        r.naks(0);
        assert!(r.naks(1_000).is_empty(), "the end may still be coming");
        let tail = vec![Nak {
            seq: 1,
            range: Some((200, 250)),
        }];
        r.note_sent(1);
        r.naks(1_000);
        assert_eq!(r.naks(2_000), tail, "sent whole: the end is missing");
        // A fragment of a later record says the same.
        let mut r = UdpReceiver::new(&KEY, 1, config(), 1);
        let p = packets(&mut s, 1..=2);
        for (i, d) in p.iter().enumerate() {
            if i != 2 {
                r.on_datagram(d);
            }
        }
        r.naks(0);
        assert_eq!(r.naks(1_000), tail);
    }

    #[test]
    fn forged_replayed_and_bad_packets_are_dropped_and_counted() {
        let mut s = Sealer::new(&KEY, 1);
        let mut r = UdpReceiver::new(&KEY, 1, config(), 1);
        let p = packets(&mut s, 1..=1);
        let mut forged = p[0].clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        r.on_datagram(&forged);
        let mut other = Sealer::new(&[1; KEY_LEN], 1);
        r.on_datagram(&other.seal(Kind::Data, &p[0][16..40]).expect("seal").1);
        for d in &p {
            r.on_datagram(d);
        }
        r.on_datagram(&p[0]);
        r.on_datagram(&s.seal(Kind::Data, b"not a fragment").expect("seal").1);
        r.on_datagram(&s.seal(Kind::Repair, b"not a repair").expect("seal").1);
        let d = r.dropped();
        assert_eq!((d.unauthentic, d.replayed), (2, 1));
        let st = r.stats();
        assert_eq!((st.bad_fragments, st.bad_repairs), (1, 1));
        assert_eq!(st.packets, 2 + p.len() as u64 + 3);
        assert_eq!(
            r.pop_record(),
            Some((1, vec![1; 250])),
            "only the genuine ones"
        );
        assert_eq!(r.pop_record(), None);
    }
}
