//! Changes to a running link, made by another thread (a benchmark staging a disaster) and seen
//! by the router at the next packet it handles, within microseconds while traffic flows:
//!
//! - **loss**: a direction's random loss is set to a new rate from now on;
//! - **cut**: a side's connection dies at once, as a cut fibre at that site: every packet the
//!   side sends from now on is dropped (it never left the site), and so is every packet due to
//!   reach it from now on, while what it sent before the cut (in the router's delay line) is
//!   still delivered to the other side. A cut is for good.
//!
//! The router reads the cut flags with every packet, and re-reads the loss rates when the
//! control's epoch moved (one atomic load per packet).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crate::netns::Side;

/// A direction of the link, by the side that sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    AtoB,
    BtoA,
}

impl Direction {
    pub(crate) fn index(self) -> usize {
        match self {
            Direction::AtoB => 0,
            Direction::BtoA => 1,
        }
    }
}

/// Shared between the router and whoever changes the link (see the module). Its clock (`now`,
/// nanoseconds since it was made) is the router's.
#[derive(Debug)]
pub struct Control {
    origin: Instant,
    /// Moves after every loss change.
    epoch: AtomicU64,
    /// Per direction: the random loss rate's bits (`f64::to_bits`), once set.
    loss: [AtomicU64; 2],
    loss_set: [AtomicBool; 2],
    /// Per side: when its connection was cut (`now` + 1; 0: not cut).
    cut: [AtomicU64; 2],
}

impl Default for Control {
    fn default() -> Control {
        Control {
            origin: Instant::now(),
            epoch: AtomicU64::new(0),
            loss: Default::default(),
            loss_set: Default::default(),
            cut: Default::default(),
        }
    }
}

impl Control {
    /// From now on, `dir` loses packets at random with probability `loss` (0–1).
    pub fn set_loss(&self, dir: Direction, loss: f64) -> Result<(), String> {
        if !(0.0..=1.0).contains(&loss) {
            return Err(format!("loss must be between 0 and 1, not {loss}"));
        }
        let i = dir.index();
        self.loss[i].store(loss.to_bits(), Ordering::SeqCst);
        self.loss_set[i].store(true, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// The control's (and the router's) clock: nanoseconds since it was made.
    pub fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// `side`'s connection dies now (see the module).
    pub fn cut(&self, side: Side) {
        self.cut_at(side, self.now());
    }

    /// `side`'s connection dies from now on, recorded as cut at `at` (ns on this control's
    /// clock; for tests with a clock of their own). The first cut of a side stays.
    pub fn cut_at(&self, side: Side, at: u64) {
        let _ = self.cut[side as usize].compare_exchange(
            0,
            at.saturating_add(1),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// When a side (by index) was cut, if it was.
    pub fn cut_time(&self, side_index: usize) -> Option<u64> {
        match self.cut[side_index].load(Ordering::SeqCst) {
            0 => None,
            t => Some(t - 1),
        }
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The loss rate set for a direction (by index), if one was.
    pub(crate) fn loss(&self, dir_index: usize) -> Option<f64> {
        self.loss_set[dir_index]
            .load(Ordering::SeqCst)
            .then(|| f64::from_bits(self.loss[dir_index].load(Ordering::SeqCst)))
    }
}
