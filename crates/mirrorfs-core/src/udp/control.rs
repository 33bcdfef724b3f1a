//! Rate control for the UDP sender (issue 8), sans I/O: what was sent, what the mirror reported
//! received, NAKs and the clock in; the rate the token bucket is to pace at (and the send
//! queue's bound) out.
//!
//! `--udp-rate-control fixed` keeps the configured rate (the ceiling) whatever happens: for a
//! dedicated link of known capacity. `adaptive` fills a long fat link without starving the
//! traffic it shares it with, and tells random loss from congestion:
//!
//! - **Round-trip samples** come from the stream itself: when the last data packet of a record
//!   goes out (`on_sent` with the sender's `data_sent_through`), the time is noted; when the mirror reports it received that seq
//!   (`on_delivered`), the difference is a sample. The smallest sample of the last
//!   `base_window_us` is the *base* RTT (the path's propagation); what a round's smallest sample
//!   has above it is *queueing delay*.
//! - **Random loss** is what FEC rebuilds: the sender never hears of it, and a NAK rate up to
//!   `nak_tolerance_ppm` of the packets sent (what FEC leaves to NAKs on a randomly lossy link) is
//!   ignored as well. Such loss does not slow the sender down: that is why a loss-based TCP
//!   collapses on a lossy long link and this path does not.
//! - **Congestion** is queueing delay above `delay_target_us` plus the FEC horizon's time at
//!   the current rate (a queue is building somewhere on the path: a record FEC rebuilt waited
//!   for its repair, up to the horizon) or NAKs beyond the tolerance (loss beyond what FEC masks: a queue overflowing),
//!   weighed at the end of the first round with at least [`LOSS_PACKETS_MIN`] packets sent since
//!   the last weighing (one NAK among the few dozen packets of a slow round is no evidence).
//!   The rate is cut (×0.85 for delay, ×0.7 for loss), at most once per round.
//! - **Rounds**: a decision is taken once per round, one base RTT long (at least
//!   `round_min_us`; `initial_rtt_us` before the first sample), on a clock tick (`on_tick`).
//!   While a record sent is not reported received within an RTT and the delay target (feedback
//!   is late), or while the sender sent less than half the rate allowed (application-limited),
//!   the rate does not grow. A round without a sample is no reason to wait: a sample is per
//!   record, and a large record takes several rounds to go out.
//! - **Slow start**: from `initial_bytes_per_s` the rate doubles each round until the first
//!   congestion signal or the ceiling; then it grows by 1/16 per round (a long fat link is
//!   refilled in tens of rounds, not thousands as with one datagram per RTT).
//! - **Floor and ceiling**: the rate always stays in `[floor, ceiling]`; the ceiling is
//!   `--udp-rate-mbit`.
//! - **The send queue's bound** (`queue_bytes`): two rounds' worth at the current rate, within
//!   `[queue_bytes_min, queue_bytes_max]`: what waits beyond it waits in the journal (the sender
//!   refuses offers, `OfferError::Full`), so a slowed link does not build a long queue of
//!   records that would only add latency.
//!
//! Every memory this machine keeps is bounded: the `(seq, time)` marks of records sent and not
//! yet reported received hold at most [`MARKS_MAX`] entries (beyond it new marks are skipped:
//! fewer samples, never more memory).

use std::collections::VecDeque;

/// The most `(seq, sent at)` marks kept while waiting for the mirror's report.
pub const MARKS_MAX: usize = 4_096;
/// NAKs are weighed against at least this many packets sent: at a low rate a round holds a
/// few dozen packets, and one NAK among them is no evidence of congestion.
pub const LOSS_PACKETS_MIN: u64 = 1_000;

/// How the UDP sender's rate is chosen (`mount --udp-rate-control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RateMode {
    /// The configured rate, always.
    #[default]
    Fixed,
    /// Delay- and loss-based control between the floor and the ceiling.
    Adaptive,
}

/// Rate control's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    pub mode: RateMode,
    pub floor_bytes_per_s: u64,
    /// The configured rate: `fixed` paces at it, `adaptive` never above it.
    pub ceiling_bytes_per_s: u64,
    /// Where slow start begins.
    pub initial_bytes_per_s: u64,
    /// Queueing delay (a round's smallest RTT sample above the base RTT) taken as congestion,
    /// beyond the FEC horizon's.
    pub delay_target_us: u64,
    /// Packets over which FEC rebuilds a loss (the deepest layer's group: 8 × its interleave
    /// distance, 800 for 3 layers, 0 without FEC). A record with a loss is received only once
    /// its group's repair arrived, up to this many packets later: the time they take at the
    /// current rate is added to the delay target, so that random loss FEC masks does not look
    /// like a queue (a round-trip sample is per record, and with large records under loss
    /// most records wait for a repair).
    pub fec_horizon_packets: u64,
    /// A packet's size on the wire, for the horizon's time.
    pub packet_bytes: u64,
    /// NAK entries per million packets sent that are still taken as random loss.
    pub nak_tolerance_ppm: u64,
    /// A round is one base RTT, at least this long.
    pub round_min_us: u64,
    /// The round, and what counts as a late report, before the first round-trip sample.
    pub initial_rtt_us: u64,
    /// The base RTT is the smallest sample of this long.
    pub base_window_us: u64,
    pub queue_bytes_min: usize,
    pub queue_bytes_max: usize,
}

impl Default for ControlConfig {
    fn default() -> ControlConfig {
        ControlConfig {
            mode: RateMode::Fixed,
            // 1 Mbit/s.
            floor_bytes_per_s: 125_000,
            // 200 Mbit/s: `--udp-rate-mbit`'s default.
            ceiling_bytes_per_s: 25_000_000,
            // 10 Mbit/s.
            initial_bytes_per_s: 1_250_000,
            delay_target_us: 10_000,
            fec_horizon_packets: 800,
            packet_bytes: 1_232,
            // 0.5 %.
            nak_tolerance_ppm: 5_000,
            round_min_us: 20_000,
            initial_rtt_us: 100_000,
            base_window_us: 10_000_000,
            queue_bytes_min: 256 << 10,
            queue_bytes_max: 4 << 20,
        }
    }
}

/// Why a round ended the way it did (the last decision, for status and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Decision {
    #[default]
    None,
    /// Slow start: doubled.
    Doubled,
    /// Congestion avoidance: grew by 1/16.
    Grew,
    /// Queueing delay above the target: cut.
    BackedOffDelay,
    /// NAKs beyond FEC's tolerance: cut.
    BackedOffLoss,
    /// No feedback or application-limited: kept.
    Held,
}

/// Rate control's counters and view.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ControlStats {
    pub rate_bytes_per_s: u64,
    pub slow_start: bool,
    /// 0 until the first sample.
    pub base_rtt_us: u64,
    pub srtt_us: u64,
    pub rtt_samples: u64,
    pub backoffs_delay: u64,
    pub backoffs_loss: u64,
    /// Rounds ended (decisions taken).
    pub rounds: u64,
    pub last: Decision,
}

/// The rate control machine (see the module).
#[derive(Debug)]
pub struct RateControl {
    config: ControlConfig,
    rate: u64,
    slow_start: bool,
    marks: VecDeque<(u64, u64)>,
    /// The highest seq the mirror reported received (or the last before the first sent):
    /// a mark at or below it would time nothing.
    delivered: u64,
    srtt_us: Option<u64>,
    /// The base RTT as the min of two half-window buckets: the current one and the last.
    base_cur: Option<u64>,
    base_prev: Option<u64>,
    base_bucket_start_us: u64,
    round_start_us: u64,
    round_bytes: u64,
    /// Packets sent and NAK entries since the loss rate was last weighed (at least
    /// [`LOSS_PACKETS_MIN`] packets).
    loss_packets: u64,
    loss_naks: u64,
    round_min_rtt: Option<u64>,
    stats: ControlStats,
}

impl RateControl {
    /// A machine at time `now_us`. The floor is raised to at least 1 byte/s, the ceiling to
    /// at least the floor, and the initial rate put between them.
    pub fn new(mut config: ControlConfig, now_us: u64) -> RateControl {
        config.floor_bytes_per_s = config.floor_bytes_per_s.max(1);
        config.ceiling_bytes_per_s = config.ceiling_bytes_per_s.max(config.floor_bytes_per_s);
        config.queue_bytes_max = config.queue_bytes_max.max(config.queue_bytes_min);
        let rate = match config.mode {
            RateMode::Fixed => config.ceiling_bytes_per_s,
            RateMode::Adaptive => config
                .initial_bytes_per_s
                .clamp(config.floor_bytes_per_s, config.ceiling_bytes_per_s),
        };
        RateControl {
            rate,
            slow_start: config.mode == RateMode::Adaptive,
            marks: VecDeque::new(),
            delivered: 0,
            srtt_us: None,
            base_cur: None,
            base_prev: None,
            base_bucket_start_us: now_us,
            round_start_us: now_us,
            round_bytes: 0,
            loss_packets: 0,
            loss_naks: 0,
            round_min_rtt: None,
            stats: ControlStats::default(),
            config,
        }
    }

    /// The first record this sender sends is `first`: what comes before it is no round trip
    /// (the sender's `data_sent_through` starts at `first - 1`, which the mirror may already
    /// have reported received).
    pub fn starts_at(&mut self, first: u64) {
        self.delivered = self.delivered.max(first.saturating_sub(1));
    }

    /// The rate to pace at, bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The send queue's bound at the current rate (see the module).
    pub fn queue_bytes(&self) -> usize {
        match self.config.mode {
            RateMode::Fixed => self.config.queue_bytes_max,
            RateMode::Adaptive => {
                let round = self.round_us();
                let two_rounds = u128::from(self.rate) * u128::from(round) * 2 / 1_000_000;
                usize::try_from(two_rounds)
                    .unwrap_or(usize::MAX)
                    .clamp(self.config.queue_bytes_min, self.config.queue_bytes_max)
            }
        }
    }

    pub fn stats(&self) -> ControlStats {
        ControlStats {
            rate_bytes_per_s: self.rate,
            slow_start: self.slow_start,
            base_rtt_us: self.base_rtt().unwrap_or(0),
            srtt_us: self.srtt_us.unwrap_or(0),
            ..self.stats
        }
    }

    /// A datagram of `bytes` went out; every data packet of the records through `sent_through`
    /// has gone out (`UdpSender::data_sent_through`).
    pub fn on_sent(&mut self, now_us: u64, bytes: usize, sent_through: u64) {
        self.round_bytes = self.round_bytes.saturating_add(bytes as u64);
        self.loss_packets += 1;
        let newer = self.marks.back().is_none_or(|&(s, _)| sent_through > s);
        if sent_through > self.delivered && newer && self.marks.len() < MARKS_MAX {
            self.marks.push_back((sent_through, now_us));
        }
    }

    /// The mirror reported it received every record through `seq`: a round-trip sample from
    /// the newest mark it covers.
    pub fn on_delivered(&mut self, now_us: u64, seq: u64) {
        self.delivered = self.delivered.max(seq);
        let mut newest = None;
        while let Some(&(s, at)) = self.marks.front() {
            if s > seq {
                break;
            }
            newest = Some(at);
            self.marks.pop_front();
        }
        if let Some(at) = newest {
            self.on_rtt(now_us, now_us.saturating_sub(at));
        }
    }

    /// A round-trip sample (µs).
    pub fn on_rtt(&mut self, now_us: u64, rtt_us: u64) {
        self.stats.rtt_samples += 1;
        self.srtt_us = Some(match self.srtt_us {
            None => rtt_us,
            Some(s) => (s * 7 + rtt_us) / 8,
        });
        self.round_min_rtt = Some(self.round_min_rtt.map_or(rtt_us, |m| m.min(rtt_us)));
        if now_us.saturating_sub(self.base_bucket_start_us) >= self.config.base_window_us / 2 {
            self.base_prev = self.base_cur.take();
            self.base_bucket_start_us = now_us;
        }
        self.base_cur = Some(self.base_cur.map_or(rtt_us, |m| m.min(rtt_us)));
    }

    /// A NAK asked for `entries` records or ranges again: loss FEC did not mask.
    pub fn on_nak(&mut self, entries: usize) {
        self.loss_naks = self.loss_naks.saturating_add(entries as u64);
    }

    /// The clock: ends the round if it is due and decides the rate. Returns the rate.
    pub fn on_tick(&mut self, now_us: u64) -> u64 {
        if self.config.mode == RateMode::Fixed {
            return self.rate;
        }
        let elapsed = now_us.saturating_sub(self.round_start_us);
        if elapsed < self.round_us() {
            return self.rate;
        }
        let decision = self.decide(now_us, elapsed);
        self.stats.last = decision;
        self.stats.rounds += 1;
        let (floor, ceiling) = (
            self.config.floor_bytes_per_s,
            self.config.ceiling_bytes_per_s,
        );
        self.rate = match decision {
            Decision::Doubled => self.rate.saturating_mul(2),
            Decision::Grew => self.rate.saturating_add((self.rate / 16).max(1)),
            Decision::BackedOffDelay => self.rate / 20 * 17,
            Decision::BackedOffLoss => self.rate / 10 * 7,
            Decision::Held | Decision::None => self.rate,
        }
        .clamp(floor, ceiling);
        self.round_start_us = now_us;
        self.round_bytes = 0;
        self.round_min_rtt = None;
        self.rate
    }

    fn decide(&mut self, now_us: u64, elapsed_us: u64) -> Decision {
        let congested_delay = match (self.round_min_rtt, self.base_rtt()) {
            (Some(r), Some(base)) => r.saturating_sub(base) > self.delay_target_us(),
            _ => false,
        };
        if congested_delay {
            self.slow_start = false;
            self.stats.backoffs_delay += 1;
            return Decision::BackedOffDelay;
        }
        let loss_beyond_fec = self.loss_packets >= LOSS_PACKETS_MIN && {
            let ppm = self.loss_naks.saturating_mul(1_000_000) / self.loss_packets;
            self.loss_packets = 0;
            self.loss_naks = 0;
            ppm > self.config.nak_tolerance_ppm
        };
        if loss_beyond_fec {
            self.slow_start = false;
            self.stats.backoffs_loss += 1;
            return Decision::BackedOffLoss;
        }
        let allowed = u128::from(self.rate) * u128::from(elapsed_us) / 1_000_000;
        let app_limited = u128::from(self.round_bytes) * 2 < allowed;
        // No sample in a round is normal while a large record is still going out (a sample is
        // per record); a record sent and not reported within an RTT and the delay target is not.
        let late_after = self
            .base_rtt()
            .unwrap_or(self.config.initial_rtt_us)
            .saturating_add(self.delay_target_us());
        let report_late = self
            .marks
            .front()
            .is_some_and(|&(_, at)| now_us.saturating_sub(at) > late_after);
        if report_late || app_limited {
            return Decision::Held;
        }
        if self.slow_start {
            Decision::Doubled
        } else {
            Decision::Grew
        }
    }

    /// The queueing delay taken as congestion now: the target plus the FEC horizon's time at
    /// the current rate.
    pub fn delay_target_us(&self) -> u64 {
        let horizon_bytes =
            u128::from(self.config.fec_horizon_packets) * u128::from(self.config.packet_bytes);
        let horizon_us = horizon_bytes * 1_000_000 / u128::from(self.rate.max(1));
        self.config
            .delay_target_us
            .saturating_add(u64::try_from(horizon_us).unwrap_or(u64::MAX))
    }

    fn base_rtt(&self) -> Option<u64> {
        match (self.base_cur, self.base_prev) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A round is the base RTT, not the smoothed one: a growing queue must not slow down the
    /// decision that would drain it.
    fn round_us(&self) -> u64 {
        self.base_rtt()
            .unwrap_or(self.config.initial_rtt_us)
            .max(self.config.round_min_us)
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000;

    fn adaptive() -> ControlConfig {
        ControlConfig {
            mode: RateMode::Adaptive,
            fec_horizon_packets: 0,
            floor_bytes_per_s: 100_000,
            ceiling_bytes_per_s: 100_000_000,
            initial_bytes_per_s: 1_000_000,
            ..ControlConfig::default()
        }
    }

    /// A path: a fixed propagation RTT plus the delay of a queue that builds while the rate
    /// is above `capacity` (bytes/s); `random_naks_ppm` of the packets NAKed whatever the rate.
    struct Path {
        rtt_us: u64,
        capacity: u64,
        queue_bytes: f64,
        queue_max: f64,
        random_naks_ppm: u64,
    }

    impl Path {
        /// Runs `rounds` rounds of 1 ms steps of a sender always with data, at the machine's
        /// rate, with 1,232-byte packets; returns the rates at the end of each round.
        fn run(&mut self, rc: &mut RateControl, t: &mut u64, ms: u64) -> Vec<u64> {
            let mut rates = Vec::new();
            let mut sent_carry = 0.0;
            let mut nak_carry = 0u64;
            for _ in 0..ms {
                *t += MS;
                let rate = rc.rate();
                sent_carry += rate as f64 / 1_000.0;
                while sent_carry >= 1_232.0 {
                    sent_carry -= 1_232.0;
                    // Samples come from `on_rtt` below: no marks.
                    rc.on_sent(*t, 1_232, 0);
                    nak_carry += self.random_naks_ppm;
                    if nak_carry >= 1_000_000 {
                        nak_carry -= 1_000_000;
                        rc.on_nak(1);
                    }
                }
                self.queue_bytes += (rate as f64 - self.capacity as f64) / 1_000.0;
                self.queue_bytes = self.queue_bytes.max(0.0);
                if self.queue_bytes > self.queue_max {
                    // Tail drop: beyond what FEC masks.
                    rc.on_nak(((self.queue_bytes - self.queue_max) / 1_232.0) as usize + 1);
                    self.queue_bytes = self.queue_max;
                }
                let queueing = (self.queue_bytes / self.capacity as f64 * 1e6) as u64;
                // The report of what was sent one RTT (plus queueing) ago.
                let delay = self.rtt_us + queueing;
                rc.on_rtt(*t, delay);
                let rounds = rc.stats().rounds;
                let after = rc.on_tick(*t);
                if rc.stats().rounds != rounds {
                    rates.push(after);
                }
            }
            rates
        }
    }

    #[test]
    fn fixed_keeps_the_configured_rate_whatever_happens() {
        let config = ControlConfig {
            mode: RateMode::Fixed,
            ceiling_bytes_per_s: 5_000_000,
            ..ControlConfig::default()
        };
        let mut rc = RateControl::new(config, 0);
        assert_eq!(rc.rate(), 5_000_000);
        for t in 1..1_000 {
            rc.on_sent(t * MS, 1_232, t);
            rc.on_nak(100);
            rc.on_rtt(t * MS, 50 * MS + t * MS);
            assert_eq!(rc.on_tick(t * MS), 5_000_000);
        }
        assert_eq!(rc.queue_bytes(), ControlConfig::default().queue_bytes_max);
    }

    #[test]
    fn slow_start_doubles_each_round_until_the_first_congestion_signal() {
        let mut rc = RateControl::new(adaptive(), 0);
        assert_eq!(rc.rate(), 1_000_000);
        assert!(rc.stats().slow_start);
        // An uncongested 40 ms path of 1 Gbit/s: the rate doubles every round.
        let mut path = Path {
            rtt_us: 40 * MS,
            capacity: 125_000_000,
            queue_bytes: 0.0,
            queue_max: 1e9,
            random_naks_ppm: 0,
        };
        let mut t = 0;
        let rates = path.run(&mut rc, &mut t, 41);
        // The first sample (1 ms) gives the base RTT: a round is 40 ms.
        assert_eq!(rates, vec![2_000_000], "one round: {rates:?}");
        let rates = path.run(&mut rc, &mut t, 400);
        assert_eq!(
            rates[..5],
            [4_000_000, 8_000_000, 16_000_000, 32_000_000, 64_000_000]
        );
        assert_eq!(*rates.last().expect("rounds"), 100_000_000, "the ceiling");
        assert!(rc.stats().slow_start);
        assert_eq!(rc.stats().base_rtt_us, 40 * MS);
    }

    #[test]
    fn delay_growth_backs_off_and_ends_slow_start() {
        let mut rc = RateControl::new(adaptive(), 0);
        // 80 Mbit/s = 10 MB/s bottleneck with a deep buffer: no loss, only delay.
        let mut path = Path {
            rtt_us: 50 * MS,
            capacity: 10_000_000,
            queue_bytes: 0.0,
            queue_max: 1e9,
            random_naks_ppm: 0,
        };
        let mut t = 0;
        let r = path.run(&mut rc, &mut t, 3_000);
        let s = rc.stats();
        assert!(!s.slow_start, "{s:?} {r:?}");
        assert!(s.backoffs_delay > 0, "{s:?}");
        assert_eq!(s.backoffs_loss, 0, "{s:?}");
        // Over the next 10 s the rate hovers around the capacity: the queue stays short.
        let rates = path.run(&mut rc, &mut t, 10_000);
        let mean = rates.iter().sum::<u64>() / rates.len() as u64;
        assert!(
            (7_000_000..=12_000_000).contains(&mean),
            "mean {mean} around 10 MB/s: {rates:?}"
        );
        assert!(
            path.queue_bytes < 10_000_000.0 * 0.05,
            "the queue stays below 50 ms: {}",
            path.queue_bytes
        );
    }

    #[test]
    fn random_loss_under_fec_does_not_slow_the_sender() {
        let mut rc = RateControl::new(adaptive(), 0);
        // 0.2 % of packets NAKed at random (what FEC left), no queue: the rate still reaches
        // the ceiling.
        let mut path = Path {
            rtt_us: 100 * MS,
            capacity: 1_000_000_000,
            queue_bytes: 0.0,
            queue_max: 1e12,
            random_naks_ppm: 2_000,
        };
        let mut t = 0;
        path.run(&mut rc, &mut t, 5_000);
        let s = rc.stats();
        assert_eq!(s.rate_bytes_per_s, 100_000_000, "{s:?}");
        assert_eq!(s.backoffs_loss, 0, "{s:?}");
        assert_eq!(s.backoffs_delay, 0, "{s:?}");
    }

    #[test]
    fn loss_beyond_fec_backs_off() {
        let mut rc = RateControl::new(adaptive(), 0);
        // A shallow buffer (10 kB, 1 ms at 10 MB/s): the queue overflows before its delay shows.
        let mut path = Path {
            rtt_us: 50 * MS,
            capacity: 10_000_000,
            queue_bytes: 0.0,
            queue_max: 10_000.0,
            random_naks_ppm: 0,
        };
        let mut t = 0;
        path.run(&mut rc, &mut t, 3_000);
        let s = rc.stats();
        assert!(s.backoffs_loss > 0, "{s:?}");
        assert!(!s.slow_start);
        let rates = path.run(&mut rc, &mut t, 10_000);
        let max = *rates.iter().max().expect("rounds");
        assert!(max < 20_000_000, "never far above capacity: {rates:?}");
    }

    #[test]
    fn a_stray_nak_at_a_low_rate_is_no_congestion() {
        // 1 MB/s on a 20 ms path: about 16 packets a round. One NAK a round would be 6 %,
        // but one every 300 packets is 0.33 %, within the tolerance: the rate grows.
        let mut rc = RateControl::new(adaptive(), 0);
        let mut path = Path {
            rtt_us: 20 * MS,
            capacity: 1_000_000_000,
            queue_bytes: 0.0,
            queue_max: 1e12,
            random_naks_ppm: 3_333,
        };
        let mut t = 0;
        path.run(&mut rc, &mut t, 2_000);
        let s = rc.stats();
        assert_eq!(s.backoffs_loss, 0, "{s:?}");
        assert_eq!(s.rate_bytes_per_s, 100_000_000, "{s:?}");
    }

    #[test]
    fn the_rate_stays_within_floor_and_ceiling() {
        let mut rc = RateControl::new(adaptive(), 0);
        // Always congested (within the base RTT's window, after which a standing delay is
        // the path's new base): the rate falls to the floor and stays there.
        let mut t = 0;
        rc.on_rtt(t, 10 * MS);
        for _ in 0..9_000 {
            t += MS;
            rc.on_sent(t, 1_232, t);
            rc.on_rtt(t, 500 * MS);
            let r = rc.on_tick(t);
            assert!((100_000..=100_000_000).contains(&r), "{r}");
        }
        assert_eq!(rc.rate(), 100_000);
        // An initial rate outside the bounds is put inside them.
        let high = RateControl::new(
            ControlConfig {
                initial_bytes_per_s: u64::MAX,
                ..adaptive()
            },
            0,
        );
        assert_eq!(high.rate(), 100_000_000);
        let low = RateControl::new(
            ControlConfig {
                initial_bytes_per_s: 0,
                ..adaptive()
            },
            0,
        );
        assert_eq!(low.rate(), 100_000);
    }

    #[test]
    fn late_feedback_or_an_idle_sender_holds_the_rate() {
        let mut rc = RateControl::new(adaptive(), 0);
        // Sending at the rate, records complete, never reported: the first rounds grow, then
        // the oldest record is late (100 ms + the delay target) and the rate is held.
        let mut t = 0;
        while t < 2_000 * MS {
            t += MS;
            for _ in 0..(rc.rate() / 1_000 / 1_232) {
                rc.on_sent(t, 1_232, t);
            }
            rc.on_tick(t);
        }
        assert_eq!(rc.stats().last, Decision::Held);
        let held = rc.rate();
        assert!(held <= 2_000_000, "grew one round at most: {held}");
        // Reported, with samples, but almost nothing sent (application-limited): held too.
        rc.on_delivered(t, u64::MAX);
        for _ in 0..200 {
            t += MS;
            rc.on_rtt(t, 30 * MS);
            rc.on_tick(t);
        }
        assert_eq!(rc.rate(), held);
        assert_eq!(rc.stats().last, Decision::Held);
    }

    #[test]
    fn a_large_record_still_going_out_does_not_stall_slow_start() {
        // No mark yet (the record's last packet has not left), no sample: slow start goes on.
        let mut rc = RateControl::new(adaptive(), 0);
        let mut t = 0;
        while t < 350 * MS {
            t += MS;
            rc.on_sent(t, 1_232, 0);
            for _ in 0..(rc.rate() / 1_000 / 1_232) {
                rc.on_sent(t, 1_232, 0);
            }
            rc.on_tick(t);
        }
        assert_eq!(rc.rate(), 8_000_000, "{:?}", rc.stats());
    }

    #[test]
    fn round_trip_samples_come_from_sent_through_and_delivered() {
        let mut rc = RateControl::new(adaptive(), 0);
        rc.on_sent(1_000, 1_232, 1);
        rc.on_sent(2_000, 1_232, 1);
        rc.on_sent(3_000, 1_232, 2);
        rc.on_sent(4_000, 1_232, 3);
        // Seq 2 received at 53 ms: the sample is from seq 2's mark (3 ms), not seq 1's.
        rc.on_delivered(53_000, 2);
        assert_eq!(rc.stats().rtt_samples, 1);
        assert_eq!(rc.stats().srtt_us, 50_000);
        // A report that covers nothing new gives no sample.
        rc.on_delivered(60_000, 2);
        assert_eq!(rc.stats().rtt_samples, 1);
        rc.on_delivered(64_000, 3);
        assert_eq!(rc.stats().rtt_samples, 2);
        assert_eq!(rc.stats().base_rtt_us, 50_000);
        assert_eq!(rc.stats().srtt_us, (50_000 * 7 + 60_000) / 8);
    }

    #[test]
    fn what_the_mirror_had_before_is_no_round_trip() {
        let mut rc = RateControl::new(adaptive(), 0);
        rc.starts_at(11);
        // Before record 11's last data packet, data_sent_through is 10: no mark.
        rc.on_sent(1_000, 1_232, 10);
        rc.on_delivered(1_100, 10);
        assert_eq!(rc.stats().rtt_samples, 0);
        rc.on_sent(2_000, 1_232, 11);
        rc.on_delivered(2_100, 10);
        rc.on_sent(3_000, 1_232, 11);
        assert_eq!(rc.stats().rtt_samples, 0);
        rc.on_delivered(52_000, 11);
        assert_eq!(rc.stats().srtt_us, 50_000);
    }

    #[test]
    fn the_delay_target_allows_for_fec_recovery_at_the_current_rate() {
        let config = ControlConfig {
            fec_horizon_packets: 800,
            ..adaptive()
        };
        let mut rc = RateControl::new(config, 0);
        // 1 MB/s: 800 × 1,232 bytes take 985.6 ms.
        assert_eq!(rc.delay_target_us(), 10_000 + 985_600);
        rc.rate = 98_560_000;
        assert_eq!(rc.delay_target_us(), 20_000);
        // Records that waited 15 ms for a repair at that rate are no congestion: it grows.
        let mut t = 0;
        let mut seq = 0;
        rc.slow_start = false;
        rc.rate = 50_000_000;
        rc.on_rtt(t, 50 * MS);
        for _ in 0..200 {
            t += MS;
            for _ in 0..40 {
                seq += 1;
                rc.on_sent(t, 1_232, seq);
            }
            rc.on_rtt(t, 65 * MS);
            rc.on_tick(t);
        }
        assert_eq!(rc.stats().backoffs_delay, 0, "{:?}", rc.stats());
        assert!(rc.rate() > 50_000_000);
    }

    #[test]
    fn marks_are_bounded() {
        let mut rc = RateControl::new(adaptive(), 0);
        for s in 1..=(MARKS_MAX as u64 * 2) {
            rc.on_sent(s, 1_232, s);
        }
        assert_eq!(rc.marks.len(), MARKS_MAX);
        rc.on_delivered(1_000_000, u64::MAX);
        assert!(rc.marks.is_empty());
    }

    #[test]
    fn the_queue_bound_follows_the_rate() {
        let mut rc = RateControl::new(adaptive(), 0);
        assert_eq!(
            rc.queue_bytes(),
            256 << 10,
            "1 MB/s × 2 × 20 ms is below the minimum"
        );
        rc.rate = 50_000_000;
        rc.on_rtt(0, 10 * MS);
        assert_eq!(rc.queue_bytes(), 2_000_000, "two rounds of at least 20 ms");
        let mut rc = RateControl::new(adaptive(), 0);
        rc.rate = 50_000_000;
        rc.on_rtt(0, 30 * MS);
        assert_eq!(rc.queue_bytes(), 3_000_000);
        rc.rate = 100_000_000;
        rc.on_rtt(0, 1_000 * MS);
        rc.on_rtt(0, 1_000 * MS);
        assert_eq!(rc.queue_bytes(), 4 << 20, "capped");
    }
}
