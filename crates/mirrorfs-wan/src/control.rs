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

/// Shared between the router and whoever changes the link (see the module).
#[derive(Debug, Default)]
pub struct Control {
    /// Moves after every loss change.
    epoch: AtomicU64,
    /// Per direction: the random loss rate's bits (`f64::to_bits`), once set.
    loss: [AtomicU64; 2],
    loss_set: [AtomicBool; 2],
    /// Per side: its connection is cut.
    cut: [AtomicBool; 2],
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

    /// `side`'s connection dies now (see the module).
    pub fn cut(&self, side: Side) {
        self.cut[side as usize].store(true, Ordering::SeqCst);
    }

    pub fn is_cut(&self, side_index: usize) -> bool {
        self.cut[side_index].load(Ordering::SeqCst)
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
