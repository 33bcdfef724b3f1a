//! One direction of an emulated long-distance link, sans I/O: packets are offered with the time
//! (nanoseconds since the router started) and the link says what becomes of each one.
//!
//! The model, in the order a packet meets it:
//! 1. **The queue** in front of the rate cap: a packet that would make the bytes waiting for the
//!    wire exceed `queue_bytes` is dropped (tail drop), as a router's full buffer does.
//! 2. **The wire** at `rate_bps`: the packet leaves once those before it have (serialization
//!    time `len × 8 / rate`). Without a cap it leaves at once.
//! 3. **Loss** on the way: random (`loss`, independent per packet) and bursty: a two-state
//!    Gilbert–Elliott chain (good and bad states, each with its own loss probability) that moves
//!    once per packet. A lost packet still took its time on the wire.
//! 4. **Delay**: it arrives `delay` after it left, plus a jitter drawn uniformly in
//!    `[-jitter, +jitter]`. Arrivals keep the order of departures (a packet never arrives before
//!    the one sent ahead of it), so jitter varies the delay without reordering, as on a path
//!    through one queue.
//!
//! Every decision comes from the link's own seeded generator: the same seed and the same offers
//! give the same fates.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The bursty-loss chain (Gilbert–Elliott): per packet, the good state turns bad with
/// probability `p` and the bad turns good with probability `r`; a packet is lost with
/// probability `loss_good` in the good state and `loss_bad` in the bad one. The mean burst
/// length (in packets spent in the bad state) is `1 / r`; the share of time in the bad state is
/// `p / (p + r)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Burst {
    pub p: f64,
    pub r: f64,
    pub loss_good: f64,
    pub loss_bad: f64,
}

impl Burst {
    /// The long-run loss rate of the chain.
    pub fn mean_loss(&self) -> f64 {
        let bad = if self.p + self.r > 0.0 {
            self.p / (self.p + self.r)
        } else {
            0.0
        };
        bad * self.loss_bad + (1.0 - bad) * self.loss_good
    }
}

/// What one direction of the link does to packets.
#[derive(Debug, Clone, PartialEq)]
pub struct Impairment {
    pub delay: Duration,
    pub jitter: Duration,
    /// Independent random loss, 0.0–1.0.
    pub loss: f64,
    pub burst: Option<Burst>,
    /// The rate cap in bits per second (`None`: no cap).
    pub rate_bps: Option<u64>,
    /// The queue in front of the rate cap, in bytes.
    pub queue_bytes: u64,
}

impl Default for Impairment {
    fn default() -> Self {
        Impairment {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            burst: None,
            rate_bps: None,
            queue_bytes: 1 << 20,
        }
    }
}

impl Impairment {
    /// Refuses settings that cannot describe a link (a probability outside 0–1, a zero rate).
    pub fn check(&self) -> Result<(), String> {
        let prob = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be between 0 and 1, not {v}"))
            }
        };
        prob("loss", self.loss)?;
        if let Some(b) = &self.burst {
            prob("burst p", b.p)?;
            prob("burst r", b.r)?;
            prob("burst loss in the good state", b.loss_good)?;
            prob("burst loss in the bad state", b.loss_bad)?;
        }
        if self.rate_bps == Some(0) {
            return Err("a rate cap of 0 passes nothing: leave it out for no cap".into());
        }
        if self.jitter > self.delay {
            return Err("jitter larger than the delay would send packets back in time".into());
        }
        Ok(())
    }
}

/// The fate of one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Dropped at the queue in front of the rate cap.
    QueueFull,
    /// Lost on the way (random or in a burst).
    Lost,
    /// Delivered at this time (nanoseconds, the clock of `offer`).
    Deliver(u64),
}

/// What a link did, for reports and cross-checks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub offered: u64,
    pub delivered: u64,
    pub lost_random: u64,
    pub lost_burst: u64,
    pub queue_drops: u64,
    pub bytes_delivered: u64,
}

/// One direction of the link.
pub struct Link {
    imp: Impairment,
    rng: SmallRng,
    /// The Gilbert–Elliott chain is in its bad state.
    bad: bool,
    /// When the wire is free again (ns).
    wire_free: u64,
    /// Departure times and sizes of the packets still waiting for the wire, oldest first.
    waiting: std::collections::VecDeque<(u64, u64)>,
    waiting_bytes: u64,
    /// The latest arrival handed out (arrivals never go backwards).
    last_arrival: u64,
    pub counts: Counts,
}

impl Link {
    pub fn new(imp: Impairment, seed: u64) -> Link {
        Link {
            imp,
            rng: SmallRng::seed_from_u64(seed),
            bad: false,
            wire_free: 0,
            waiting: std::collections::VecDeque::new(),
            waiting_bytes: 0,
            last_arrival: 0,
            counts: Counts::default(),
        }
    }

    pub fn impairment(&self) -> &Impairment {
        &self.imp
    }

    /// The random loss rate from now on (0–1; the caller checked it).
    pub fn set_loss(&mut self, loss: f64) {
        self.imp.loss = loss;
    }

    /// A packet of `len` bytes arrives at the link at `now` (ns).
    pub fn offer(&mut self, now: u64, len: usize) -> Verdict {
        self.counts.offered += 1;
        let len = len as u64;
        self.drain_waiting(now);
        let start = self.wire_free.max(now);
        if self.imp.rate_bps.is_some() && start > now {
            // It must wait for the wire: it takes room in the queue.
            if self.waiting_bytes + len > self.imp.queue_bytes {
                self.counts.queue_drops += 1;
                return Verdict::QueueFull;
            }
            self.waiting.push_back((start, len));
            self.waiting_bytes += len;
        }
        let departs = start + self.serialization(len);
        self.wire_free = departs;
        if let Some(v) = self.lose() {
            return v;
        }
        let arrives = (departs + self.delay_sample()).max(self.last_arrival);
        self.last_arrival = arrives;
        self.counts.delivered += 1;
        self.counts.bytes_delivered += len;
        Verdict::Deliver(arrives)
    }

    /// Packets whose turn on the wire has come leave the queue.
    fn drain_waiting(&mut self, now: u64) {
        while let Some(&(start, len)) = self.waiting.front() {
            if start > now {
                break;
            }
            self.waiting.pop_front();
            self.waiting_bytes -= len;
        }
    }

    fn serialization(&self, len: u64) -> u64 {
        match self.imp.rate_bps {
            Some(rate) => len.saturating_mul(8).saturating_mul(1_000_000_000) / rate,
            None => 0,
        }
    }

    /// The loss decision of one packet: the burst chain moves once per packet.
    fn lose(&mut self) -> Option<Verdict> {
        if let Some(b) = self.imp.burst {
            let flip = if self.bad { b.r } else { b.p };
            if self.rng.gen_bool(flip) {
                self.bad = !self.bad;
            }
            let p = if self.bad { b.loss_bad } else { b.loss_good };
            if self.rng.gen_bool(p) {
                self.counts.lost_burst += 1;
                return Some(Verdict::Lost);
            }
        }
        if self.imp.loss > 0.0 && self.rng.gen_bool(self.imp.loss) {
            self.counts.lost_random += 1;
            return Some(Verdict::Lost);
        }
        None
    }

    fn delay_sample(&mut self) -> u64 {
        let d = self.imp.delay.as_nanos() as u64;
        let j = self.imp.jitter.as_nanos() as u64;
        if j == 0 {
            return d;
        }
        let offset = self.rng.gen_range(0..=2 * j);
        (d + offset).saturating_sub(j)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn fates(l: &mut Link, n: u64, gap: u64, len: usize) -> Vec<Verdict> {
        (0..n).map(|i| l.offer(i * gap, len)).collect()
    }

    #[test]
    fn a_clean_link_delivers_everything_after_the_delay() {
        let mut l = Link::new(
            Impairment {
                delay: Duration::from_millis(50),
                ..Impairment::default()
            },
            1,
        );
        for (i, v) in fates(&mut l, 100, MS, 1_000).into_iter().enumerate() {
            assert_eq!(v, Verdict::Deliver(i as u64 * MS + 50 * MS));
        }
        assert_eq!(l.counts.delivered, 100);
    }

    #[test]
    fn random_loss_is_near_its_rate_and_the_seed_decides() {
        let imp = Impairment {
            loss: 0.01,
            ..Impairment::default()
        };
        let mut a = Link::new(imp.clone(), 7);
        let mut b = Link::new(imp, 7);
        let fa = fates(&mut a, 100_000, 1_000, 100);
        assert_eq!(
            fa,
            fates(&mut b, 100_000, 1_000, 100),
            "same seed, same fates"
        );
        let lost = a.counts.lost_random;
        // 1,000 expected; five standard deviations (~31.5) either side.
        assert!(
            (840..=1_160).contains(&lost),
            "{lost} lost of 100,000 at 1 %"
        );
    }

    #[test]
    fn bursty_loss_comes_in_runs_at_the_chains_mean_rate() {
        let burst = Burst {
            p: 0.002,
            r: 0.2,
            loss_good: 0.0,
            loss_bad: 1.0,
        };
        let mut l = Link::new(
            Impairment {
                burst: Some(burst),
                ..Impairment::default()
            },
            3,
        );
        let f = fates(&mut l, 200_000, 1_000, 100);
        let lost = f.iter().filter(|v| **v == Verdict::Lost).count() as f64;
        let mean = burst.mean_loss() * 200_000.0;
        assert!(
            (lost - mean).abs() < 0.3 * mean,
            "{lost} lost, the chain's mean is {mean}"
        );
        // Runs: the mean run of consecutive losses is 1/r = 5 packets, not 1.
        let mut runs = Vec::new();
        let mut cur = 0;
        for v in &f {
            if *v == Verdict::Lost {
                cur += 1;
            } else if cur > 0 {
                runs.push(cur);
                cur = 0;
            }
        }
        let mean_run = runs.iter().sum::<usize>() as f64 / runs.len() as f64;
        assert!(mean_run > 3.0, "mean run {mean_run}");
    }

    #[test]
    fn the_rate_cap_spaces_departures_and_the_queue_drops_beyond_its_size() {
        // 8 Mbit/s: a 1,000-byte packet takes 1 ms on the wire. 10 KB of queue.
        let mut l = Link::new(
            Impairment {
                rate_bps: Some(8_000_000),
                queue_bytes: 10_000,
                ..Impairment::default()
            },
            1,
        );
        // 100 packets at once: the first leaves at once, 10 wait, the rest are dropped.
        let f = fates(&mut l, 100, 0, 1_000);
        let delivered: Vec<u64> = f
            .iter()
            .filter_map(|v| match v {
                Verdict::Deliver(t) => Some(*t),
                _ => None,
            })
            .collect();
        assert_eq!(delivered.len(), 11);
        for (i, t) in delivered.iter().enumerate() {
            assert_eq!(
                *t,
                (i as u64 + 1) * MS,
                "packet {i} leaves after the ones ahead"
            );
        }
        assert_eq!(l.counts.queue_drops, 89);
        // Once the queue drained, packets pass again.
        assert!(matches!(l.offer(20 * MS, 1_000), Verdict::Deliver(_)));
    }

    #[test]
    fn a_long_run_at_the_cap_delivers_the_rate() {
        // Offered at twice the cap for one simulated second: delivered bytes match the cap.
        let rate = 10_000_000;
        let mut l = Link::new(
            Impairment {
                rate_bps: Some(rate),
                queue_bytes: 64_000,
                ..Impairment::default()
            },
            1,
        );
        let gap = 1_000 * 8 * 1_000_000_000 / (2 * rate);
        let f = fates(&mut l, 2 * rate / 8_000, gap, 1_000);
        let in_second = f
            .iter()
            .filter(|v| matches!(v, Verdict::Deliver(t) if *t <= 1_000 * MS))
            .count() as u64;
        let expected = rate / 8 / 1_000;
        assert!(
            in_second.abs_diff(expected) <= 2,
            "{in_second} packets in the first second, the cap allows {expected}"
        );
    }

    #[test]
    fn jitter_varies_the_delay_but_never_reorders() {
        let mut l = Link::new(
            Impairment {
                delay: Duration::from_millis(50),
                jitter: Duration::from_millis(10),
                ..Impairment::default()
            },
            9,
        );
        let mut last = 0;
        let mut distinct = std::collections::BTreeSet::new();
        for i in 0..1_000u64 {
            let Verdict::Deliver(t) = l.offer(i * 100_000, 100) else {
                panic!("nothing is lost on this link");
            };
            assert!(t >= last, "reordered");
            assert!(t >= i * 100_000 + 40 * MS && t <= i * 100_000 + 60 * MS + 100 * MS);
            distinct.insert(t - i * 100_000);
            last = t;
        }
        assert!(distinct.len() > 100, "the delay varies");
    }

    #[test]
    fn impossible_settings_are_refused() {
        let bad = [
            Impairment {
                loss: 1.5,
                ..Impairment::default()
            },
            Impairment {
                rate_bps: Some(0),
                ..Impairment::default()
            },
            Impairment {
                jitter: Duration::from_millis(5),
                ..Impairment::default()
            },
        ];
        for imp in bad {
            assert!(imp.check().is_err(), "{imp:?}");
        }
        assert!(Impairment::default().check().is_ok());
    }
}
