//! The sender's token bucket: `rate` bytes per second, at most `burst` bytes at once.

/// Micro-bytes per byte: tokens are kept in bytes × 10⁻⁶ so that no fraction is lost between
/// two calls however close together.
const SCALE: u128 = 1_000_000;

#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate_bytes_per_s: u128,
    burst_bytes: u128,
    /// Micro-bytes available.
    tokens: u128,
    at_us: u64,
}

impl TokenBucket {
    /// A full bucket at time 0. A rate of 0 is taken as 1 byte/s (never unbounded).
    pub(crate) fn new(rate_bytes_per_s: u64, burst_bytes: u64) -> TokenBucket {
        let burst = u128::from(burst_bytes);
        TokenBucket {
            rate_bytes_per_s: u128::from(rate_bytes_per_s.max(1)),
            burst_bytes: burst,
            tokens: burst * SCALE,
            at_us: 0,
        }
    }

    /// Adds what `now` earned since the last call, up to the burst. A clock going back earns
    /// nothing.
    pub(crate) fn refill(&mut self, now_us: u64) {
        if now_us <= self.at_us {
            return;
        }
        let earned = u128::from(now_us - self.at_us) * self.rate_bytes_per_s;
        self.tokens = (self.tokens + earned).min(self.burst_bytes * SCALE);
        self.at_us = now_us;
    }

    /// Paces at `rate_bytes_per_s` from `now_us` on (what was earned before at the old rate
    /// is kept). A rate of 0 is taken as 1 byte/s.
    pub(crate) fn set_rate(&mut self, now_us: u64, rate_bytes_per_s: u64) {
        self.refill(now_us);
        self.rate_bytes_per_s = u128::from(rate_bytes_per_s.max(1));
    }

    /// Takes `len` bytes if the bucket holds them.
    pub(crate) fn take(&mut self, len: usize) -> bool {
        let need = len as u128 * SCALE;
        if self.tokens < need {
            return false;
        }
        self.tokens -= need;
        true
    }

    /// When (µs) `len` bytes will be available, as of the last refill.
    pub(crate) fn ready_at(&self, len: usize) -> u64 {
        let need = len as u128 * SCALE;
        let short = need.saturating_sub(self.tokens);
        let wait = short.div_ceil(self.rate_bytes_per_s);
        self.at_us
            .saturating_add(u64::try_from(wait).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_its_burst_then_its_rate() {
        // 1 MB/s, 10 kB burst.
        let mut b = TokenBucket::new(1_000_000, 10_000);
        b.refill(0);
        assert!(b.take(6_000));
        assert!(!b.take(6_000), "only 4,000 left");
        assert_eq!(b.ready_at(6_000), 2_000, "2,000 bytes more at 1 byte/µs");
        b.refill(1_999);
        assert!(!b.take(6_000));
        b.refill(2_000);
        assert!(b.take(6_000));
        // A long pause refills only to the burst.
        b.refill(1_000_000_000);
        assert!(b.take(10_000));
        assert!(!b.take(1));
    }

    #[test]
    fn a_new_rate_applies_from_its_time_on() {
        let mut b = TokenBucket::new(1_000_000, 10_000);
        b.refill(0);
        assert!(b.take(10_000));
        // 1,000 bytes earned at 1 byte/µs, then 2 bytes/µs.
        b.set_rate(1_000, 2_000_000);
        assert_eq!(b.ready_at(3_000), 2_000);
        b.refill(2_000);
        assert!(b.take(3_000));
        assert!(!b.take(1));
    }

    #[test]
    fn sub_byte_earnings_add_up() {
        // 1,000 bytes/s: a byte per ms, earned in 1 µs steps.
        let mut b = TokenBucket::new(1_000, 1_000);
        b.refill(0);
        assert!(b.take(1_000));
        for t in 1..=1_000 {
            b.refill(t);
        }
        assert!(b.take(1), "a thousand 1 µs steps earned one byte");
        assert!(!b.take(1));
    }
}
