//! Deterministic crash simulation of the journal and the mirror applier.
//!
//! ```text
//!   Primary (reference SimTree, never crashes) ──ops──▶ Journal<SimStore> (MemStore crash model)
//!                                                          │ records ≤ durable_seq
//!                                                          ▼
//!              mirror SimTree (ext4-like crash model) ◀── core::worker::Worker (Applier) + SimCursor
//! ```
//!
//! Everything runs in one thread from one seeded random source ([`SimRng`]), so a seed replays
//! exactly. Faults: power loss of everything ([`MemStore::crash`], [`MemCursorStore::crash`],
//! [`SimTree::crash`]), and a process kill (`kill -9`) that can land between any two mutating
//! calls of the journal, the cursor or the mirror tree ([`KillSwitch`]).
//!
//! - [`SimTree`] (in `fs.rs`): an in-memory [`Tree`](crate::tree::Tree) with Linux error semantics
//!   and a crash model: metadata changes become durable in order (a crash keeps a prefix), file
//!   data independently (a crash keeps any subset, optionally torn at page boundaries).
//! - [`Primary`] (in `primary.rs`): the seeded workload, applied to a reference tree and journaled.
//! - [`run_seed`] (in `run.rs`): the simulation loop and its invariants.
//! - [`run_net_seed`] (in `net.rs`): a primary journal streaming to a remote mirror through the
//!   real `link::Sender`/`link::Receiver` and `wire` codec over a faulty network (chunking,
//!   delay, partitions, cut tails, corrupted and stale frames), with kills and power losses of
//!   both sides, and its invariants.
//! - [`run_sites_seed`] (in `sites.rs`): two sites that split, both write, and heal by
//!   reintegration (the core planner and executor), with users writing during the heal and
//!   crashes of the executor; its invariants.
//! - [`run_tokens_seed`] (in `tokens.rs`): two writable sites with per-object write tokens
//!   (`core::token`) over an ordered link that is cut, with crashes of either site; its
//!   invariants (one holder, one writer, records before the Grant, bounded wait, no lost write).

mod fs;
mod net;
mod offload;
mod primary;
mod run;
mod sites;
mod tokens;

pub use net::{
    run_net_seed, run_net_variant, trace_net_seed, trace_net_variant, NetStats, NetVariant,
};

pub use fs::{CrashReport, EntryInfo, FsState, SimTree, SnapEntry, Snapshot};
pub use primary::{Planned, Primary};
pub use run::{run_seed, trace_seed, SimStats};
pub use sites::{
    drive, drive_with, entry_ops, run_sites_seed, run_sites_seed_n, Late, SitesStats, Stopped,
};
pub use tokens::{run_tokens_seed, trace_tokens_seed, TokensStats};

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::applier::{CursorStore, MemCursorStore, CURSOR_SLOT_BYTES};
use crate::journal::storage::{MemFile, MemStore, SegmentFile, SegmentStore};

/// The simulation's only source of randomness: a caller-supplied generator of uniform `u64`s
/// ([`run_seed`] uses a SplitMix64 seeded with the seed, so a seed replays the same everywhere),
/// with the few helpers the simulation needs.
pub struct SimRng<'a> {
    next: &'a mut dyn FnMut() -> u64,
}

impl<'a> SimRng<'a> {
    /// Wraps a generator of uniform `u64`s.
    pub fn new(next: &'a mut dyn FnMut() -> u64) -> Self {
        SimRng { next }
    }
    /// A uniform `u64`.
    pub fn u64(&mut self) -> u64 {
        (self.next)()
    }
    /// Uniform in `0..n` (`0` when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.u64() % n
        }
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }
    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    /// A uniformly chosen item (`None` if `items` is empty).
    pub fn pick<'s, T>(&mut self, items: &'s [T]) -> Option<&'s T> {
        if items.is_empty() {
            None
        } else {
            items.get(self.below(items.len() as u64) as usize)
        }
    }
    /// An index chosen with the given weights.
    pub fn weighted(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        let mut x = self.below(total);
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        0
    }
}

/// A simulated `kill -9` of the mirrorfs process. Once armed with `n`, the `n`-th mutating call
/// (journal write, fsync, segment create or remove, cursor write, mirror tree change or sync)
/// fails without effect, and so does every call after it until [`KillSwitch::revive`]: the process
/// is dead and the simulation must crash and recover. Clones share the switch.
#[derive(Clone, Debug, Default)]
pub struct KillSwitch(Arc<KillState>);

#[derive(Debug, Default)]
struct KillState {
    /// Calls left before the kill; 0 when disarmed.
    fuel: AtomicU64,
    dead: AtomicBool,
}

impl KillSwitch {
    /// A disarmed switch, process alive.
    pub fn new() -> Self {
        Self::default()
    }
    /// The `calls`-th mutating call from now on dies (`calls >= 1`).
    pub fn arm(&self, calls: u64) {
        self.0.fuel.store(calls.max(1), Ordering::Relaxed);
    }
    /// True while a kill is pending.
    pub fn armed(&self) -> bool {
        self.0.fuel.load(Ordering::Relaxed) > 0
    }
    /// True once the kill has landed (until [`KillSwitch::revive`]).
    pub fn is_dead(&self) -> bool {
        self.0.dead.load(Ordering::Relaxed)
    }
    /// The process restarted: disarmed and alive.
    pub fn revive(&self) {
        self.0.fuel.store(0, Ordering::Relaxed);
        self.0.dead.store(false, Ordering::Relaxed);
    }
    /// Called before every mutating call: false means the process is dead and the call must fail.
    pub fn tick(&self) -> bool {
        if self.is_dead() {
            return false;
        }
        match self.0.fuel.load(Ordering::Relaxed) {
            0 => true,
            1 => {
                self.0.fuel.store(0, Ordering::Relaxed);
                self.0.dead.store(true, Ordering::Relaxed);
                false
            }
            n => {
                self.0.fuel.store(n - 1, Ordering::Relaxed);
                true
            }
        }
    }
}

fn killed() -> io::Error {
    io::Error::other("process killed (simulated kill -9)")
}

/// A [`MemStore`] whose mutating calls obey a [`KillSwitch`]. Crashes go to [`SimStore::mem`].
#[derive(Clone, Debug)]
pub struct SimStore {
    /// The segments, with their crash model.
    pub mem: MemStore,
    /// The process's kill switch.
    pub kill: KillSwitch,
}

/// A [`MemFile`] whose mutating calls obey a [`KillSwitch`].
#[derive(Clone, Debug)]
pub struct SimFile {
    file: MemFile,
    kill: KillSwitch,
}

impl SegmentFile for SimFile {
    fn write_all_at(&self, offset: u64, bufs: &[&[u8]]) -> io::Result<()> {
        if !self.kill.tick() {
            return Err(killed());
        }
        self.file.write_all_at(offset, bufs)
    }
    fn sync(&self) -> io::Result<()> {
        if !self.kill.tick() {
            return Err(killed());
        }
        self.file.sync()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read_at(offset, buf)
    }
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        if !self.kill.tick() {
            return Err(killed());
        }
        self.file.truncate(len)
    }
}

impl SegmentStore for SimStore {
    type File = SimFile;
    fn list(&self) -> io::Result<Vec<u64>> {
        self.mem.list()
    }
    fn create(&self, id: u64) -> io::Result<SimFile> {
        if !self.kill.tick() {
            return Err(killed());
        }
        Ok(SimFile {
            file: self.mem.create(id)?,
            kill: self.kill.clone(),
        })
    }
    fn open(&self, id: u64) -> io::Result<SimFile> {
        Ok(SimFile {
            file: self.mem.open(id)?,
            kill: self.kill.clone(),
        })
    }
    fn remove(&self, id: u64) -> io::Result<()> {
        if !self.kill.tick() {
            return Err(killed());
        }
        self.mem.remove(id)
    }
}

/// A [`MemCursorStore`] whose writes obey a [`KillSwitch`]. Crashes go to [`SimCursor::mem`].
#[derive(Debug, Default)]
pub struct SimCursor {
    /// The two slots, with their crash model.
    pub mem: MemCursorStore,
    /// The process's kill switch.
    pub kill: KillSwitch,
    /// A transient failure of the cursor's file (`EIO`, a full disk) that the process survives:
    /// once it lands, writes fail without effect until [`KillSwitch::revive`].
    pub glitch: KillSwitch,
}

impl CursorStore for SimCursor {
    fn read_slots(&mut self) -> io::Result<[u8; 2 * CURSOR_SLOT_BYTES]> {
        self.mem.read_slots()
    }
    fn write_slot(
        &mut self,
        slot: usize,
        bytes: &[u8; CURSOR_SLOT_BYTES],
        durable: bool,
    ) -> io::Result<()> {
        if !self.kill.tick() {
            return Err(killed());
        }
        if !self.glitch.tick() {
            return Err(io::Error::other(
                "cursor write failed (simulated transient error)",
            ));
        }
        self.mem.write_slot(slot, bytes, durable)
    }
}
