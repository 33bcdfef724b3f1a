//! The unmount's last wait: every healthy mirror applies (a local mirror) or makes durable (a
//! daemon) what the journal holds, so that an unmounted mirror is a copy of the backing tree.
//!
//! The wait ends when the mirror has caught up, when it is no longer healthy, or when it has
//! made **no progress** for `STALL` — not after a fixed time: a mirror that is behind by a large
//! backlog (a burst of renames, each a checkpoint, on a busy disk) but still applying is waited
//! for, and the wait says every `REPORT` how far it has to go (under systemd it also extends the
//! unit's stop timeout by as much). A mirror given up on keeps its
//! records in the journal and catches up at the next mount; the unmount says so.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::site::volume::{lock, MirrorPhase, MirrorShared, Volume};

/// How long a mirror may make no progress before the unmount stops waiting for it.
pub const STALL: Duration = Duration::from_secs(30);
/// How often a long wait says how far the mirror has to go.
const REPORT: Duration = Duration::from_secs(5);

/// What the wait does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The mirror has what the journal held at the unmount.
    Done,
    /// Still behind, and moving (or not for long): wait; `report` when it is time to say so.
    Wait { report: bool },
    /// No progress for `STALL`: stop waiting.
    GiveUp,
}

/// The drain policy of one mirror (no I/O, no clock of its own): fed the mirror's position
/// (`needed_after`: every record up to it is applied or durable there) at each poll.
pub struct Drain {
    target: u64,
    stall: Duration,
    last_pos: u64,
    moved_at: Instant,
    reported_at: Instant,
}

impl Drain {
    pub fn new(now: Instant, target: u64, pos: u64, stall: Duration) -> Drain {
        Drain {
            target,
            stall,
            last_pos: pos,
            moved_at: now,
            reported_at: now,
        }
    }

    pub fn step(&mut self, now: Instant, pos: u64) -> Step {
        if pos >= self.target {
            return Step::Done;
        }
        if pos > self.last_pos {
            self.last_pos = pos;
            self.moved_at = now;
        } else if now.duration_since(self.moved_at) >= self.stall {
            return Step::GiveUp;
        }
        let report = now.duration_since(self.reported_at) >= REPORT;
        if report {
            self.reported_at = now;
        }
        Step::Wait { report }
    }

    /// Records still to go at the last poll.
    pub fn behind(&self) -> u64 {
        self.target.saturating_sub(self.last_pos)
    }
}

/// Makes the journal durable and waits for every healthy mirror to hold its end (see the module
/// comment). A mirror whose initial copy is still being journaled is not waited for: the next
/// mount copies it again; one whose copy is all in the journal is.
pub fn drain_mirrors(vol: &Volume, shared: &[std::sync::Arc<MirrorShared>]) {
    let target = vol.wait_journal_durable();
    for m in shared {
        let syncing = || {
            matches!(*lock(&m.phase), MirrorPhase::Syncing { .. })
                && m.copy_journaled.load(Ordering::Acquire) == 0
        };
        let mut drain = Drain::new(Instant::now(), target, m.needed_after(), STALL);
        while m.healthy() && !syncing() {
            match drain.step(Instant::now(), m.needed_after()) {
                Step::Done => break,
                Step::Wait { report } => {
                    if report {
                        // Under systemd: the stop timeout grows while the mirror moves.
                        crate::readiness::extend_stop(STALL + REPORT);
                        eprintln!(
                            "mirrorfs: waiting for mirror {} to apply {} more record(s) before the unmount ends",
                            m.name,
                            drain.behind()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Step::GiveUp => {
                    tracing::warn!(
                        "mirror {}: no progress for {} s with {} record(s) still to apply; the unmount stops waiting, the journal keeps them and the mirror catches up at the next mount",
                        m.name,
                        STALL.as_secs(),
                        drain.behind()
                    );
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(30);

    #[test]
    fn a_mirror_that_keeps_moving_is_waited_for_past_the_stall_time() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0, 1_000, 0, S);
        // One record every 10 s: 100 s in all, over three times the stall time.
        for i in 1..10u64 {
            let step = d.step(t0 + Duration::from_secs(10 * i), i);
            assert!(matches!(step, Step::Wait { .. }), "at {i}: {step:?}");
        }
        assert_eq!(d.behind(), 991);
        assert_eq!(d.step(t0 + Duration::from_secs(100), 1_000), Step::Done);
    }

    #[test]
    fn a_mirror_that_stops_moving_is_given_up_after_the_stall_time() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0, 10, 3, S);
        assert!(matches!(
            d.step(t0 + Duration::from_secs(5), 4),
            Step::Wait { .. }
        ));
        assert!(matches!(
            d.step(t0 + Duration::from_secs(34), 4),
            Step::Wait { .. }
        ));
        assert_eq!(d.step(t0 + Duration::from_secs(35), 4), Step::GiveUp);
        assert_eq!(d.behind(), 6);
    }

    #[test]
    fn a_mirror_already_there_is_done_at_once_and_reports_come_every_few_seconds() {
        let t0 = Instant::now();
        assert_eq!(Drain::new(t0, 5, 5, S).step(t0, 5), Step::Done);
        let mut d = Drain::new(t0, 100, 0, S);
        let reports: Vec<bool> = (1..=12u64)
            .map(|s| match d.step(t0 + Duration::from_secs(s), s) {
                Step::Wait { report } => report,
                other => panic!("at {s} s: {other:?}"),
            })
            .collect();
        let at: Vec<usize> = (0..12).filter(|&i| reports[i]).map(|i| i + 1).collect();
        assert_eq!(at, vec![5, 10]);
    }
}
