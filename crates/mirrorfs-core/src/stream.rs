//! The primary's link stream decisions that do not need the socket: how records are batched,
//! and when the link may try again after a failure. Time is given, never read, so the seeded
//! network simulation drives the same code as `net::remote`.
//!
//! ```text
//!  journal reader ─▶ take_batch (≤ max_bytes, ≤ limit) ─▶ Records ─▶ link::Sender::sent
//!  session ended ─▶ Backoff::on_end(now, refused) ─▶ Retry { at, refused }
//! ```

use std::time::Duration;

use crate::op::Record;

/// Wire cost counted per record besides its data (header, path, checksum: an upper bound).
pub const RECORD_OVERHEAD: usize = 64;

/// Ordinary reconnection back-off bounds.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A session that lasted this long was healthy: the ordinary back-off starts over.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// A refusal that retrying cannot cure is retried only this rarely, doubling up to
/// [`REFUSED_RETRY_MAX`], so the link resumes by itself once the operator has fixed the mirror.
pub const REFUSED_RETRY: Duration = Duration::from_secs(30);
pub const REFUSED_RETRY_MAX: Duration = Duration::from_secs(600);

/// The cost of `rec` on the wire, as the batch bound counts it.
pub fn record_cost(rec: &Record) -> usize {
    rec.op.data_len() + RECORD_OVERHEAD
}

/// Takes the next batch: `pending` (a record read but left out of the previous batch) first,
/// then records from `next` while the batch stays within `max_bytes` (a single record larger
/// than the bound goes alone). A record that would overflow the batch is left in `pending`.
/// `next` returns `None` when nothing more may be sent now.
pub fn take_batch<E>(
    pending: &mut Option<Record>,
    max_bytes: usize,
    mut next: impl FnMut() -> Result<Option<Record>, E>,
) -> Result<Vec<Record>, E> {
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    while bytes < max_bytes {
        let rec = match pending.take() {
            Some(r) => r,
            None => match next()? {
                Some(r) => r,
                None => break,
            },
        };
        let len = record_cost(&rec);
        if !batch.is_empty() && bytes + len > max_bytes {
            *pending = Some(rec);
            break;
        }
        bytes += len;
        batch.push(rec);
    }
    Ok(batch)
}

/// When to try again after a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// The time (on the caller's clock) of the next attempt.
    pub at: Duration,
    /// How long that is from the end of the session.
    pub wait: Duration,
    /// Whether the mirror refused the link (the phase to report is `Refused`).
    pub refused: bool,
}

/// The reconnection schedule of one link: ordinary failures back off from [`BACKOFF_MIN`]
/// doubling to [`BACKOFF_MAX`] (starting over after a healthy session); refusals wait
/// [`REFUSED_RETRY`] doubling to [`REFUSED_RETRY_MAX`] (starting over after any other outcome).
#[derive(Debug, Clone)]
pub struct Backoff {
    ordinary: Duration,
    refused: Duration,
    started: Option<Duration>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    pub fn new() -> Self {
        Backoff {
            ordinary: BACKOFF_MIN,
            refused: REFUSED_RETRY,
            started: None,
        }
    }

    /// A session starts (a connection attempt) at `now`.
    pub fn on_start(&mut self, now: Duration) {
        self.started = Some(now);
    }

    /// The session that started at [`Backoff::on_start`] ended at `now`, `refused` if the mirror
    /// refused it permanently (`LinkError.retry == false`). Says when to try again.
    pub fn on_end(&mut self, now: Duration, refused: bool) -> Retry {
        let lasted = self
            .started
            .take()
            .map_or(Duration::ZERO, |s| now.saturating_sub(s));
        if lasted > HEALTHY_AFTER {
            self.ordinary = BACKOFF_MIN;
        }
        let wait = if refused {
            let w = self.refused;
            self.refused = (self.refused * 2).min(REFUSED_RETRY_MAX);
            w
        } else {
            self.refused = REFUSED_RETRY;
            self.ordinary
        };
        self.ordinary = (self.ordinary * 2).min(BACKOFF_MAX);
        Retry {
            at: now + wait,
            wait,
            refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Op;

    fn rec(seq: u64, data: usize) -> Record {
        Record {
            seq,
            op: Op::Write {
                path: crate::path::RelPath::root(),
                offset: 0,
                data: vec![7; data],
            },
        }
    }

    #[test]
    fn batches_stay_within_the_byte_bound_and_keep_the_overflow() {
        let mut src = (1..=10).map(|s| rec(s, 36));
        let mut pending = None;
        // Each record costs 100 bytes: three fit in 300.
        let b = take_batch::<()>(&mut pending, 300, || Ok(src.next())).expect("no error");
        assert_eq!(b.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        let b = take_batch::<()>(&mut pending, 250, || Ok(src.next())).expect("no error");
        assert_eq!(b.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(pending.as_ref().map(|r| r.seq), Some(6));
        let b = take_batch::<()>(&mut pending, 1 << 20, || Ok(src.next())).expect("no error");
        assert_eq!(
            b.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![6, 7, 8, 9, 10]
        );
        assert!(pending.is_none());
        let b = take_batch::<()>(&mut pending, 300, || Ok(src.next())).expect("no error");
        assert!(b.is_empty());
    }

    #[test]
    fn an_oversized_record_goes_alone() {
        let mut src = vec![rec(1, 1000), rec(2, 10)].into_iter();
        let mut pending = None;
        let b = take_batch::<()>(&mut pending, 300, || Ok(src.next())).expect("no error");
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].seq, 1);
        let b = take_batch::<()>(&mut pending, 300, || Ok(src.next())).expect("no error");
        assert_eq!(b[0].seq, 2);
    }

    #[test]
    fn a_read_error_stops_the_batch() {
        let mut pending = Some(rec(1, 0));
        let r = take_batch(&mut pending, 300, || Err("bad"));
        assert_eq!(r, Err("bad"));
    }

    #[test]
    fn ordinary_back_off_doubles_to_its_bound_and_restarts_after_a_healthy_session() {
        let mut b = Backoff::new();
        let mut now = Duration::ZERO;
        let mut waits = Vec::new();
        for _ in 0..8 {
            b.on_start(now);
            let r = b.on_end(now + Duration::from_millis(5), false);
            assert!(!r.refused);
            assert_eq!(r.at, now + Duration::from_millis(5) + r.wait);
            waits.push(r.wait.as_millis());
            now = r.at;
        }
        assert_eq!(waits, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.on_start(now);
        let r = b.on_end(now + Duration::from_secs(60), false);
        assert_eq!(r.wait, BACKOFF_MIN);
    }

    #[test]
    fn refusals_retry_after_30_s_doubling_to_10_min_and_reset_on_another_outcome() {
        let mut b = Backoff::new();
        let mut now = Duration::from_secs(1000);
        let mut waits = Vec::new();
        for _ in 0..7 {
            b.on_start(now);
            let r = b.on_end(now, true);
            assert!(r.refused);
            waits.push(r.wait.as_secs());
            now = r.at;
        }
        assert_eq!(waits, vec![30, 60, 120, 240, 480, 600, 600]);
        b.on_start(now);
        assert!(!b.on_end(now, false).refused);
        b.on_start(now);
        assert_eq!(b.on_end(now, true).wait, REFUSED_RETRY);
    }
}
