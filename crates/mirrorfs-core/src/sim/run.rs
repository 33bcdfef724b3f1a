//! The seeded simulation loop ([`run_seed`]) and its invariants.
//!
//! One seed drives everything: a workload on the [`Primary`], journaled through a
//! `Journal<SimStore>`, group-commit syncs (the flusher), one mirror worker (the core's
//! [`Worker`] that `mirror::run_worker` drives too, over the feed, an [`Applier`], a
//! [`SimCursor`] and a crashable [`SimTree`], on a simulated clock: it decides when to
//! checkpoint — every second of that clock, when an application's `fsync` waits, at a stop),
//! segment release, and faults: a process kill that lands between any two mutating calls
//! ([`KillSwitch`]), and power losses (immediate, or landing between two mutating calls like a
//! kill, then crashing every store).
//!
//! Recovery is the shell's (`crates/mirrorfs/src/main.rs`, `volume.rs`, `mirror.rs`): reopen the
//! journal (torn tail cut), resolve the in-doubt last record on the primary (re-apply it
//! idempotently, or append its `Abort`), reopen the cursor (resume at `applied + 1` after a kill,
//! `checkpoint + 1` after a power loss), replay up to the journal's end at start-up, then strict.
//!
//! Invariants (a violation is an `Err` naming the seed and step):
//! 1. the journal always reopens; after a kill it cuts nothing, after a power loss only a torn
//!    tail;
//! 2. no record that was reported durable is lost, and the recovered records are exactly the
//!    primary's records (same seqs, same ops);
//! 3. the mirror only ever reads records that are durable and settled, and after a power loss its
//!    cursor is never beyond the recovered journal;
//! 4. records reach the mirror strictly in order, and none is applied twice in strict mode;
//! 5. whenever the mirror is out of its replay window (after every recovery, once caught up, and
//!    after every strict apply), it equals the primary's reference state at its applied seq;
//! 6. at the end, after draining, `mirror == primary`, and still so after one more power loss;
//! 7. the worker keeps its word: a checkpoint it reported (to `fsync` waiters, to segment
//!    release) survives any crash, and it is never idle while an `fsync` waits for a record it
//!    has applied.

use std::fmt;
use std::time::Duration;

use super::offload::{self, offloaded, PendingSync};
use super::{KillSwitch, Primary, SimCursor, SimFile, SimRng, SimStore, SimTree};
use crate::applier::Applier;
use crate::feed::{FeedReadError, Item, JournalFeed};
use crate::flush;
use crate::group::Gate;
use crate::journal::storage::MemStore;
use crate::journal::{Journal, JournalConfig, Reader, SyncPlan};
use crate::op::Op;
use crate::sequencer::{self, Begin, InDoubt, Refusal, Sequencer};
use crate::tree::{apply_op, TreeError};
use crate::worker::{Turn, Worker};

/// What one or more seeds did, for the summary line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SimStats {
    /// Seeds run (1 for [`run_seed`]; sums when added).
    pub seeds: u64,
    /// Simulation steps taken.
    pub steps: u64,
    /// Primary ops journaled (including those that failed and were aborted).
    pub ops: u64,
    /// Ops that failed on the primary and were followed by their `Abort`.
    pub aborted: u64,
    /// Ops the sequencer refused for lack of space (`ENOSPC`: a full disk, or a journal at its
    /// size limit after relief): nothing journaled, the backing unchanged.
    pub refused: u64,
    /// Group-commit syncs completed by the flusher.
    pub syncs: u64,
    /// Mirror checkpoints taken (B1 + B2).
    pub checkpoints: u64,
    /// Simulated process kills (`kill -9`).
    pub kills: u64,
    /// Simulated power losses.
    pub crashes: u64,
    /// Records applied to the mirror (replays included; skipped records not).
    pub applied: u64,
    /// Of those, applied in replay (idempotent) mode after a recovery.
    pub replayed: u64,
    /// Aborted records and `Abort`s skipped by the mirror.
    pub skipped: u64,
    /// Worker turns that failed on a transient cursor write error (the worker retries).
    pub retries: u64,
    /// In-doubt records resolved at restart by appending an `Abort`.
    pub in_doubt_aborted: u64,
    /// Bytes of torn journal tail cut by recovery.
    pub torn_bytes: u64,
    /// Journal segments released after the mirror checkpointed them.
    pub released_segments: u64,
    /// Full comparisons of the mirror with the primary's reference state.
    pub comparisons: u64,
    /// Groups begun (group-atomic mirroring), and of those ended by a restart.
    pub groups: u64,
    pub groups_ended_at_restart: u64,
}

impl SimStats {
    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &SimStats) {
        self.seeds += o.seeds;
        self.steps += o.steps;
        self.ops += o.ops;
        self.aborted += o.aborted;
        self.refused += o.refused;
        self.syncs += o.syncs;
        self.checkpoints += o.checkpoints;
        self.kills += o.kills;
        self.crashes += o.crashes;
        self.applied += o.applied;
        self.replayed += o.replayed;
        self.skipped += o.skipped;
        self.retries += o.retries;
        self.in_doubt_aborted += o.in_doubt_aborted;
        self.torn_bytes += o.torn_bytes;
        self.released_segments += o.released_segments;
        self.comparisons += o.comparisons;
        self.groups += o.groups;
        self.groups_ended_at_restart += o.groups_ended_at_restart;
    }
}

impl fmt::Display for SimStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} seeds, {} steps: {} ops ({} aborted, {} refused for space), {} syncs, {} checkpoints, {} kills, \
             {} power losses ({} torn bytes cut, {} in-doubt aborted), {} records applied \
             ({} replayed, {} skipped), {} transient cursor errors retried, {} segments released, \
             {} comparisons, {} groups ({} ended by a restart)",
            self.seeds,
            self.steps,
            self.ops,
            self.aborted,
            self.refused,
            self.syncs,
            self.checkpoints,
            self.kills,
            self.crashes,
            self.torn_bytes,
            self.in_doubt_aborted,
            self.applied,
            self.replayed,
            self.skipped,
            self.retries,
            self.released_segments,
            self.comparisons,
            self.groups,
            self.groups_ended_at_restart
        )
    }
}

/// Runs seed `seed` for `steps` steps. `Err` describes the first invariant violated, with the
/// seed and step, so the failure replays with the same seed.
pub fn run_seed(seed: u64, steps: usize) -> Result<SimStats, String> {
    run_with(seed, steps, Sabotage::None, None)
}

/// Like [`run_seed`], and also returns a log of every event (ops, syncs, applies, faults,
/// recoveries), for debugging a failing seed.
pub fn trace_seed(seed: u64, steps: usize) -> (Result<SimStats, String>, Vec<String>) {
    let mut log = Vec::new();
    let r = run_with(seed, steps, Sabotage::None, Some(&mut log));
    (r, log)
}

/// A deliberate bug, to show the checker catches it (tests only).
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sabotage {
    None,
    /// The mirror's feed ignores `durable_seq` (reads everything settled).
    IgnoreDurable,
    /// The mirror skips the first `Write` it should apply.
    DropWrite,
}

fn run_with(
    seed: u64,
    steps: usize,
    sabotage: Sabotage,
    log: Option<&mut Vec<String>>,
) -> Result<SimStats, String> {
    let mut gen = SplitMix64(seed);
    let mut next = move || gen.next();
    let mut rng = SimRng::new(&mut next);
    let mut sim = Sim::new(seed, &mut rng, sabotage)?;
    sim.trace = log.is_some().then(Vec::new);
    let res = (|| {
        for step in 0..steps {
            sim.step = step;
            sim.stats.steps += 1;
            sim.now += sim.tick;
            sim.one_step(&mut rng)?;
        }
        sim.step = steps;
        sim.finish(&mut rng)
    })();
    if let (Some(log), Some(t)) = (log, sim.trace.take()) {
        *log = t;
    }
    res.map(|()| sim.stats)
}

/// SplitMix64: small, fast, and fixed here, so a seed replays the same on every platform and
/// every version of the `rand` crate.
pub(super) struct SplitMix64(pub(super) u64);

impl SplitMix64 {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Why an action stopped.
enum Fault {
    /// The process was killed (or the power failed) in the middle: recover.
    Dead,
    /// An invariant or an unexpected error.
    Bug(String),
}

type Act = Result<(), Fault>;

/// The mirror's feed: the core [`JournalFeed`] the shell's `volume::RecordFeed` drives too.
struct Feed(JournalFeed<SimFile>);

impl Feed {
    fn new(next_seq: u64) -> Self {
        Feed(JournalFeed::new(next_seq))
    }

    fn next(
        &mut self,
        j: &Journal<SimStore>,
        durable: u64,
        settled: u64,
    ) -> Result<Item, FeedReadError> {
        self.0
            .next::<SimStore>(durable, settled, |seq| j.segment_for(seq))
    }
}

/// Per-seed rates, so different seeds stress different regimes.
struct Profile {
    /// Weights of: primary op, flusher, mirror work (worker turns), an application fsync that
    /// waits for the mirror, arm a kill, power loss now.
    weights: [u64; 6],
    /// Among armed kills, the chance (in 1/4) it is a power loss rather than a process kill.
    power_in_4: u64,
    /// Furthest (in mutating calls) an armed kill may land.
    kill_reach: u64,
}

struct Sim {
    seed: u64,
    step: usize,
    sabotage: Sabotage,
    dropped_write: bool,
    profile: Profile,
    cfg: JournalConfig,
    kill: KillSwitch,
    /// When the armed kill lands: a power loss (true) or a process kill.
    kill_is_power: bool,
    /// A power loss happened (rather than a kill) and recovery is due.
    power_now: bool,
    store: MemStore,
    journal: Journal<SimStore>,
    /// The flusher's plan, taken under the lock, fsynced later (other appends may come between).
    plan: Option<SyncPlan<SimFile>>,
    cursor: SimCursor,
    mirror: SimTree,
    /// The mirror worker's machine (the binary's `mirror::run_worker` drives the same one): it
    /// owns the [`Applier`] and decides when to checkpoint.
    worker: Worker,
    feed: Feed,
    /// The simulated clock, given to the worker as `now`: it moves `tick` every step.
    now: Duration,
    tick: Duration,
    /// On half of the seeds (their own stream): transient cursor write errors, armed for one
    /// worker turn at a time.
    glitches: Option<SplitMix64>,
    /// The highest record an application's `fsync` waits to see durable on the mirror (the
    /// shell's `MirrorShared::want_durable`, raised by `Volume::wait_mirrors`); 0 after a start.
    want_durable: u64,
    primary: Primary,
    /// Group-atomic mirroring (`core::group`), on half of the seeds (their own stream, so the
    /// other decisions of a seed stay as they were): the primary opens and ends groups, the
    /// mirror reads with the gate's limit as the shell's `RecordFeed` does.
    groups: Option<SplitMix64>,
    gate: Gate,
    sequencer: Sequencer,
    /// The primary is done with every record ≤ this (the shell's `settled_seq`).
    settled: u64,
    /// Highest seq the journal ever reported durable: never lost.
    durable_ever: u64,
    /// Highest seq the mirror ever consumed (applied or skipped).
    consumed_ever: u64,
    /// Highest checkpoint the worker ever reported (its `Turn`s, its stop): durable.
    reported_checkpoint: u64,
    /// The worker hands its checkpoints' syncs to the driver (the binary's checkpoint thread);
    /// on three seeds in four.
    offload: bool,
    /// A sync started off the worker's thread ([`Turn::SyncStart`]): the tree was synced when
    /// it began; its result, and the worker turns until it is reported.
    pending_sync: Option<PendingSync>,
    /// A power loss happened and no start has recovered the journal since.
    journal_unclean: bool,
    /// A power loss happened and no start has opened the cursor since.
    cursor_unclean: bool,
    stats: SimStats,
    /// The event log, when tracing.
    trace: Option<Vec<String>>,
}

impl Sim {
    fn ev(&mut self, what: impl FnOnce() -> String) {
        if let Some(t) = &mut self.trace {
            t.push(format!("[{}] {}", self.step, what()));
        }
    }

    fn new(seed: u64, rng: &mut SimRng<'_>, sabotage: Sabotage) -> Result<Self, String> {
        let kill = KillSwitch::new();
        let store = MemStore::new();
        // Space faults (a journal size limit of a few segments, on some seeds) draw from their
        // own stream, so the other decisions of a seed stay as they were without them. (A
        // free-space limit on the journal's file system is not modelled yet: with one, the
        // `Abort` of a failed change was refused for space in 3 of 1,000 seeds, which the
        // journal promises never happens; to be investigated.)
        let mut groups = SplitMix64(seed ^ 0x0006_9A0B_E6E2_u64);
        let mut space = SplitMix64(seed ^ 0x0005_BACE_F00D_u64);
        let space_faults = space.next().is_multiple_of(3);
        let mut cfg = JournalConfig {
            segment_bytes: *rng
                .pick(&[1024u64, 4096, 16 << 10, 64 << 10, 64 << 20])
                .unwrap_or(&4096),
            journal_bytes_max: 1 << 40,
        };
        if space_faults && cfg.segment_bytes <= 64 << 10 && space.next().is_multiple_of(2) {
            // A journal of a few segments: a mirror that lags fills it.
            cfg.journal_bytes_max = JournalConfig::min_journal_bytes(cfg.segment_bytes)
                + space.next() % 4 * cfg.segment_bytes;
        }
        // Groups hold the mirror back while open: with a journal size limit the shell detaches
        // the mirror (not modelled: the sim's one mirror stays), so groups only on seeds without.
        let groups =
            (cfg.journal_bytes_max == 1 << 40 && groups.next().is_multiple_of(2)).then_some(groups);
        // A third of the seeds are calm: faults are rarer, so histories grow longer between them.
        let calm = if rng.chance(1, 3) { 5 } else { 1 };
        let profile = Profile {
            weights: [
                calm * rng.range(6, 14),
                calm * rng.range(1, 6),
                calm * rng.range(3, 10),
                rng.range(0, 2),
                rng.range(1, 3),
                u64::from(rng.chance(1, 2)),
            ],
            power_in_4: rng.range(0, 3),
            kill_reach: rng.range(2, 40),
        };
        let sim_store = SimStore {
            mem: store.clone(),
            kill: kill.clone(),
        };
        let (journal, _) = Journal::open(sim_store, cfg.clone())
            .map_err(|e| format!("seed {seed}: cannot create the journal: {e}"))?;
        let mut cursor = SimCursor {
            kill: kill.clone(),
            ..SimCursor::default()
        };
        // A new, empty mirror of the new, empty primary: its initial sync is trivial.
        let applier = Applier::start_at(&mut cursor, 0)
            .map_err(|e| format!("seed {seed}: cannot create the cursor: {e}"))?;
        // The clock's pace draws from its own stream too: from a checkpoint every few steps
        // (250 ms a step) to one in a thousand steps (1 ms).
        let mut clock = SplitMix64(seed ^ 0x00C1_0C4D_7100_u64);
        let tick = Duration::from_millis([1, 5, 20, 100, 250][(clock.next() % 5) as usize]);
        let mut glitches = SplitMix64(seed ^ 0x0061_1C40_0000_u64);
        let glitches = glitches.next().is_multiple_of(2).then_some(glitches);
        Ok(Sim {
            seed,
            step: 0,
            sabotage,
            dropped_write: false,
            profile,
            cfg,
            kill: kill.clone(),
            kill_is_power: false,
            power_now: false,
            store,
            journal,
            plan: None,
            cursor,
            mirror: SimTree::new().with_kill(kill),
            worker: offloaded(Worker::new(applier, Duration::ZERO, false), seed),
            feed: Feed::new(1),
            now: Duration::ZERO,
            tick,
            glitches,
            want_durable: 0,
            primary: Primary::new(),
            groups,
            gate: Gate::default(),
            sequencer: Sequencer::new(0),
            settled: 0,
            durable_ever: 0,
            consumed_ever: 0,
            reported_checkpoint: 0,
            offload: !seed.is_multiple_of(4),
            pending_sync: None,
            journal_unclean: false,
            cursor_unclean: false,
            stats: SimStats {
                seeds: 1,
                ..SimStats::default()
            },
            trace: None,
        })
    }

    /// The error message for a violated invariant.
    fn fail(&self, what: impl fmt::Display) -> String {
        format!("seed {} step {}: {what}", self.seed, self.step)
    }

    /// Classifies an error of a mutating call: the process died, or something is wrong.
    fn fault(&self, what: impl fmt::Display) -> Fault {
        if self.kill.is_dead() {
            Fault::Dead
        } else {
            Fault::Bug(what.to_string())
        }
    }

    fn one_step(&mut self, rng: &mut SimRng<'_>) -> Result<(), String> {
        let res = match rng.weighted(&self.profile.weights) {
            0 => self.primary_op(rng),
            1 => self.flusher(rng),
            2 => {
                let n = rng.range(1, 8);
                self.mirror_work(n)
            }
            3 => {
                self.fsync_waits();
                Ok(())
            }
            4 => {
                if !self.kill.armed() {
                    self.arm(rng);
                }
                Ok(())
            }
            _ => {
                self.power_now = true;
                Err(Fault::Dead)
            }
        };
        match res {
            Ok(()) if !self.kill.is_dead() => Ok(()),
            Ok(()) | Err(Fault::Dead) => self.recover(rng),
            Err(Fault::Bug(m)) => Err(self.fail(m)),
        }
    }

    fn arm(&mut self, rng: &mut SimRng<'_>) {
        let n = rng.range(1, self.profile.kill_reach);
        self.kill.arm(n);
        self.kill_is_power = rng.below(4) < self.profile.power_in_4;
        let p = self.kill_is_power;
        self.ev(|| {
            format!(
                "armed: {} in {n} calls",
                if p { "power loss" } else { "kill" }
            )
        });
    }

    // ---- the primary (volume::mutate, driving core::sequencer) ------------------------------

    fn primary_op(&mut self, rng: &mut SimRng<'_>) -> Act {
        if let Some(g) = &mut self.groups {
            if g.next().is_multiple_of(6) {
                let begin = self.gate.open() == 0 || (self.gate.open() < 3 && g.next() % 3 == 0);
                return self.group_op(begin);
            }
        }
        let Some(p) = self.primary.plan(rng) else {
            return Ok(());
        };
        // At the size limit the sequencer relieves the journal: the shell detaches the mirror
        // furthest behind; the sim's one mirror stays, so relief frees only what it no longer
        // needs (after its checkpoint), and a change that still does not fit is refused.
        let keep = self.worker.applier().cursor().checkpoint;
        let relieve = |j: &mut Journal<SimStore>| {
            let _ = flush::release(j, keep);
        };
        let seq = match self.sequencer.begin(&mut self.journal, &p.op, relieve) {
            Begin::Apply { seq } => seq,
            Begin::Refuse(Refusal::NoSpace(why)) if !self.kill.is_dead() => {
                // ENOSPC for this change: nothing was journaled and the backing is not changed.
                self.primary.unplan();
                self.stats.refused += 1;
                self.ev(|| format!("refused: {why}"));
                return Ok(());
            }
            Begin::Refuse(r) => {
                // Nothing reached the journal, so the backing tree is not changed either.
                self.primary.unplan();
                return Err(self.fault(format!("journal append refused: {r}")));
            }
        };
        if seq != self.primary.last_seq() + 1 {
            return Err(Fault::Bug(format!(
                "journal gave seq {seq} where {} was expected",
                self.primary.last_seq() + 1
            )));
        }
        self.ev(|| format!("append {seq} {} ok={}", brief(&p.op), p.ok));
        self.primary.record(p.op, p.ok);
        self.stats.ops += 1;
        let done = match self.sequencer.applied(&mut self.journal, seq, p.ok) {
            Ok(d) => d,
            Err(r) => return Err(self.fault(format!("append of Abort failed: {r:?}"))),
        };
        if done.aborted {
            self.primary.record(Op::Abort { seq }, false);
            self.stats.aborted += 1;
        }
        self.settled = done.last;
        Ok(())
    }

    /// `Volume::group`: journals a `GroupBegin` (`begin`) or a `GroupEnd` and follows it in the
    /// gate before it settles.
    fn group_op(&mut self, begin: bool) -> Act {
        let op = if begin { Op::GroupBegin } else { Op::GroupEnd };
        let allowed = if begin {
            self.gate.may_begin()
        } else {
            self.gate.may_end()
        };
        if allowed.is_err() {
            return Ok(());
        }
        let keep = self.worker.applier().cursor().checkpoint;
        let relieve = |j: &mut Journal<SimStore>| {
            let _ = flush::release(j, keep);
        };
        // Write-ahead with nothing to apply: refused whole (ENOSPC) when it does not fit.
        let seq = match self.sequencer.begin(&mut self.journal, &op, relieve) {
            Begin::Apply { seq } => seq,
            Begin::Refuse(Refusal::NoSpace(_)) if !self.kill.is_dead() => return Ok(()),
            Begin::Refuse(r) => return Err(self.fault(format!("journal append refused: {r}"))),
        };
        self.ev(|| format!("append {seq} {}", op.name()));
        if begin {
            self.stats.groups += 1;
        }
        self.primary.record(op.clone(), true);
        self.gate.observe(seq, &op);
        let done = self
            .sequencer
            .applied(&mut self.journal, seq, true)
            .map_err(|r| self.fault(format!("settling a group record: {r:?}")))?;
        self.settled = done.last;
        Ok(())
    }

    /// After a restart: the shell's `Volume::open_groups` for a primary: the groups the crash
    /// left open are ended. `Ok(false)`: the process died in the middle.
    fn end_open_groups(&mut self) -> Result<bool, String> {
        while self.gate.open() > 0 {
            match self.group_op(false) {
                Ok(()) => self.stats.groups_ended_at_restart += 1,
                Err(Fault::Dead) => return Ok(false),
                Err(Fault::Bug(m)) => return Err(self.fail(m)),
            }
        }
        Ok(true)
    }

    /// The first `GroupBegin` of the first unit of groups that is open or whose `GroupEnd` is
    /// not durable through `durable`, from the primary's own record of what it journaled (a
    /// reference independent of the gate).
    fn first_incomplete_unit(&self, durable: u64) -> Option<u64> {
        let mut open = 0u32;
        let mut since = 0;
        for s in 1..=self.primary.last_seq() {
            match self.primary.op_at(s) {
                Some(Op::GroupBegin) => {
                    if open == 0 {
                        since = s;
                    }
                    open += 1;
                }
                Some(Op::GroupEnd) if open > 0 => {
                    open -= 1;
                    if open == 0 && s > durable {
                        return Some(since);
                    }
                }
                _ => {}
            }
        }
        (open > 0).then_some(since)
    }

    // ---- the flusher (volume::run_flusher) --------------------------------------------------

    fn flusher(&mut self, rng: &mut SimRng<'_>) -> Act {
        if self.plan.is_none() {
            // Take a plan now; fsync it now or at a later step (appends may ride along).
            self.plan = self.journal.sync_plan();
            if self.plan.is_none() {
                return self.release();
            }
            if rng.chance(1, 2) {
                return Ok(());
            }
        }
        match self.plan.take() {
            Some(plan) => self.run_plan(&plan),
            None => Ok(()),
        }
    }

    fn run_plan(&mut self, plan: &SyncPlan<SimFile>) -> Act {
        let outcome = flush::sync(plan);
        if let flush::Flushed::Poisoned { why, .. } =
            flush::complete(&mut self.journal, plan, outcome)
        {
            return Err(self.fault(why));
        }
        let d = self.journal.durable_seq();
        self.ev(|| format!("synced: durable {d}"));
        self.stats.syncs += 1;
        self.durable_ever = self.durable_ever.max(self.journal.durable_seq());
        self.release()
    }

    /// Frees segments the mirror no longer needs. The mirror needs every record after its durable
    /// checkpoint: after a power loss it resumes at `checkpoint + 1`.
    fn release(&mut self) -> Act {
        let keep = self.worker.applier().cursor().checkpoint;
        let freed = flush::release(&mut self.journal, keep)
            .map_err(|e| self.fault(format!("release of segments failed: {e}")))?;
        self.stats.released_segments += freed as u64;
        Ok(())
    }

    /// Makes everything appended so far durable (what the flusher does within about one fsync).
    fn flush_all(&mut self) -> Act {
        loop {
            if self.plan.is_none() {
                self.plan = self.journal.sync_plan();
            }
            match self.plan.take() {
                Some(plan) => self.run_plan(&plan)?,
                None => return Ok(()),
            }
        }
    }

    // ---- the mirror worker (mirror::run_worker, driving core::worker) -----------------------

    /// An application's `fsync` (`Volume::wait_mirrors` at `Level::Durable`): it waits for
    /// everything settled so far to be durable on the mirror. The worker checkpoints once it has
    /// applied that far (its rule, not the sim's).
    fn fsync_waits(&mut self) {
        // Inside an open group: what is before the group (`Volume::wait_mirrors_durable`).
        let want = match self.gate.open_since() {
            Some(since) => self.settled.min(since - 1),
            None => self.settled,
        };
        if want > self.want_durable {
            self.want_durable = want;
            let w = self.want_durable;
            self.ev(|| format!("an fsync waits for the mirror to make {w} durable"));
        }
    }

    /// The worker's last checkpoint before the volume stops (`mirror::stop_worker`).
    fn stop_worker(&mut self) -> Act {
        // The shell joins its checkpoint thread first; the last checkpoint covers its sync.
        self.pending_sync = None;
        let before = self.worker.applier().cursor().checkpoint;
        let c = self
            .worker
            .stop(&mut self.mirror, &mut self.cursor)
            .map_err(|e| self.fault(format!("the last checkpoint failed: {e}")))?;
        self.checkpointed(before, c);
        Ok(())
    }

    /// The worker's checkpoint thread (see `offload`).
    fn start_sync(&mut self, upto: u64) -> Result<bool, Fault> {
        self.ev(|| format!("sync started at {upto}"));
        let sync = PendingSync::start(&mut self.mirror, upto);
        let failed = sync.failed();
        self.pending_sync = Some(sync);
        if failed {
            return self.report_sync();
        }
        Ok(true)
    }

    /// [`Worker::synced`] with the pending sync's result; the cursor write may glitch.
    fn report_sync(&mut self) -> Result<bool, Fault> {
        let Some(sync) = self.pending_sync.take() else {
            return Ok(false);
        };
        let end = offload::report(sync, &mut self.worker, &mut self.cursor, &mut self.glitches)
            .map_err(Fault::Bug)?;
        let (before, glitched) = (end.before, end.glitched);
        match end.turn {
            Turn::Checkpointed { checkpoint } => {
                self.checkpointed(before, checkpoint);
                Ok(true)
            }
            Turn::Retry { after, error, .. } if glitched && !self.kill.is_dead() => {
                self.stats.retries += 1;
                self.now += after;
                self.ev(|| format!("mirror: {error}; retry in {after:?}"));
                Ok(true)
            }
            Turn::Retry { error, .. } => Err(self.fault(error)),
            other => Err(self.fault(format!("the end of a sync gave {other:?}"))),
        }
    }

    fn checkpointed(&mut self, before: u64, c: u64) {
        self.reported_checkpoint = self.reported_checkpoint.max(c);
        if c != before {
            self.ev(|| format!("checkpoint {c}"));
            self.stats.checkpoints += 1;
        }
    }

    /// Up to `n` worker turns. Returns early when the worker is idle.
    fn mirror_work(&mut self, n: u64) -> Act {
        for _ in 0..n {
            if !self.mirror_one()? {
                break;
            }
        }
        Ok(())
    }

    /// One [`Worker::turn`] at the simulated time, with the sim's invariants checked on the item
    /// the feed hands it (before it is applied) and on the mirror after it; false if the worker
    /// was idle (the feed had nothing ready).
    fn mirror_one(&mut self) -> Result<bool, Fault> {
        if self.pending_sync.as_mut().is_some_and(PendingSync::due) {
            return self.report_sync();
        }
        let durable = match self.sabotage {
            Sabotage::IgnoreDurable => u64::MAX,
            _ => self.journal.durable_seq(),
        };
        let before = self.worker.applier().cursor().checkpoint;
        // `next` is asked only when no checkpoint is due, so the applier is as it is now then.
        let expected = self.worker.applier().next_seq();
        let replay = self.worker.applier().in_replay();
        let tracing = self.trace.is_some();
        let mut handed = None;
        // The applier reads with the gate's limit (the shell's `RecordFeed::next`).
        let bound = match self.gate.limit(durable) {
            Some(limit) => self.settled.min(limit),
            None => self.settled,
        };
        // Invariant 8 (group-atomic mirroring): no record of a unit of groups that is open or
        // whose end is not durable reaches the mirror. Checked against the primary's own record.
        if self.groups.is_some() {
            let durable_now = self.journal.durable_seq();
            if let Some(since) = self.first_incomplete_unit(durable_now) {
                if bound >= since && self.worker.applier().next_seq() <= bound {
                    return Err(Fault::Bug(format!(
                        "the mirror may read through record {bound}, into the group begun at {since} whose end is not durable (durable {durable_now})"
                    )));
                }
            }
        }
        // A transient cursor write error, on some turns of some seeds: armed for this turn only.
        if let Some(g) = &mut self.glitches {
            if g.next().is_multiple_of(16) {
                self.cursor.glitch.arm(1 + g.next() % 2);
            }
        }
        let Sim {
            worker,
            mirror,
            cursor,
            feed,
            journal,
            settled,
            primary,
            consumed_ever,
            sabotage,
            dropped_write,
            now,
            want_durable,
            ..
        } = self;
        let turn = worker.turn(mirror, cursor, *now, *want_durable, || {
            let item = feed
                .next(journal, durable, bound)
                .map_err(|e| Fault::Bug(format!("the mirror cannot read the journal: {e}")))?;
            let seq = match &item {
                Item::Wait => return Ok(item),
                Item::Skip(s) => *s,
                Item::Apply(r) => r.seq,
            };
            // Invariant 3: only durable, settled records reach the mirror.
            if seq > journal.durable_seq() || seq > *settled {
                return Err(Fault::Bug(format!(
                    "the mirror was handed record {seq} but the journal is durable only through \
                     {} (settled {settled})",
                    journal.durable_seq(),
                )));
            }
            // Invariant 4: strictly in order ...
            if seq != expected {
                return Err(Fault::Bug(format!(
                    "the mirror was handed record {seq} where {expected} was next"
                )));
            }
            // ... and never twice in strict mode. Everything the mirror ever consumed was
            // durable, so it is within the journal at any restart, hence within the replay
            // window.
            if !replay && seq <= *consumed_ever {
                return Err(Fault::Bug(format!(
                    "record {seq} would be applied a second time in strict mode (the mirror \
                     already consumed records through {consumed_ever})"
                )));
            }
            if let Item::Apply(rec) = &item {
                // Invariant 2 (again, at the consumer): what is read is what the primary wrote.
                if primary.op_at(rec.seq) != Some(&rec.op) {
                    return Err(Fault::Bug(format!(
                        "record {} read from the journal is {:?}, the primary wrote {:?}",
                        rec.seq,
                        rec.op,
                        primary.op_at(rec.seq)
                    )));
                }
            }
            if tracing {
                handed = Some(match &item {
                    Item::Apply(r) => format!(
                        "mirror {} {} {}",
                        if replay { "replays" } else { "applies" },
                        r.seq,
                        brief(&r.op)
                    ),
                    _ => format!("mirror skips {seq}"),
                });
            }
            // The sabotage lives outside the machine: the worker is handed a skip instead.
            Ok(match item {
                Item::Apply(rec)
                    if *sabotage == Sabotage::DropWrite
                        && !*dropped_write
                        && !replay
                        && matches!(rec.op, Op::Write { .. }) =>
                {
                    *dropped_write = true;
                    Item::Skip(rec.seq)
                }
                other => other,
            })
        })?;
        let glitched = self.cursor.glitch.is_dead();
        self.cursor.glitch.revive();
        if let Some(h) = handed {
            self.ev(|| h);
        }
        let seq = match turn {
            // The worker goes on while the sync runs: it is reported on a later turn, or when
            // the worker has nothing else to do.
            Turn::Idle if self.pending_sync.is_some() => return self.report_sync(),
            Turn::SyncStart { upto } => return self.start_sync(upto),
            Turn::Idle => {
                // Invariant 7: an `fsync` waiting for an applied record would wait forever.
                let c = self.worker.applier().cursor();
                if self.want_durable > c.checkpoint && c.applied >= self.want_durable {
                    return Err(Fault::Bug(format!(
                        "the worker is idle while an fsync waits for record {} to be durable \
                         on the mirror: applied {}, checkpoint {}",
                        self.want_durable, c.applied, c.checkpoint
                    )));
                }
                return Ok(false);
            }
            Turn::Checkpointed { checkpoint } => {
                self.checkpointed(before, checkpoint);
                return Ok(true);
            }
            // The worker keeps what failed and backs off; the sim's clock honours the back-off.
            Turn::Retry { after, error, .. } if glitched && !self.kill.is_dead() => {
                self.stats.retries += 1;
                self.now += after;
                self.ev(|| format!("mirror: {error}; retry in {after:?}"));
                return Ok(true);
            }
            // A kill or power loss strikes the mirror's tree or cursor as an I/O error; anything
            // else is a bug.
            Turn::Retry { error, .. } => return Err(self.fault(error)),
            Turn::Diverged { reason } => {
                return Err(self.fault(format!(
                    "{reason} (in {} mode)",
                    if replay { "replay" } else { "strict" }
                )))
            }
            Turn::Applied {
                seq, checkpoint, ..
            } => {
                // A barrier (rename, unlink) moves the checkpoint too (not counted: it is the
                // applier's, not a checkpoint of the worker).
                self.reported_checkpoint = self.reported_checkpoint.max(checkpoint);
                self.stats.applied += 1;
                if replay {
                    self.stats.replayed += 1;
                }
                seq
            }
            Turn::Skipped { seq } => {
                self.stats.skipped += 1;
                seq
            }
        };
        if self.worker.applier().cursor().applied != seq {
            return Err(Fault::Bug(format!(
                "after record {seq} the cursor says {} was applied",
                self.worker.applier().cursor().applied
            )));
        }
        self.consumed_ever = self.consumed_ever.max(seq);
        // Invariant 5: out of the replay window, the mirror is exactly the primary at `seq`.
        if !self.worker.applier().in_replay() {
            self.compare(seq).map_err(Fault::Bug)?;
        }
        Ok(true)
    }

    /// The mirror's live tree against the primary's reference state after record `seq`.
    fn compare(&mut self, seq: u64) -> Result<(), String> {
        self.stats.comparisons += 1;
        let Some(want) = self.primary.state_at(seq) else {
            return Err(format!(
                "the mirror is at record {seq}, beyond the primary's last record {}",
                self.primary.last_seq()
            ));
        };
        let diff = self.mirror.snapshot().diff(&want.snapshot(), 8);
        if diff.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the mirror after record {seq} is not the primary's state after it:\n  {}",
                diff.join("\n  ")
            ))
        }
    }

    // ---- crash and restart (main.rs) --------------------------------------------------------

    /// The process died (or the power failed): restart as the shell does, check the recovery
    /// invariants, and let the mirror catch up through its replay window. Faults may strike again
    /// during recovery.
    fn recover(&mut self, rng: &mut SimRng<'_>) -> Result<(), String> {
        let mut round = 0;
        loop {
            round += 1;
            if round > 50 {
                return Err(self.fail("recovery makes no progress"));
            }
            // Faults strike recovery too: inside the journal's recovery, the in-doubt `Abort`,
            // the cursor reset, or the replay.
            let early = round <= 3 && rng.chance(1, 4);
            if !self.restart(rng, early)? {
                continue;
            }
            if round <= 3 && !self.kill.armed() && rng.chance(1, 3) {
                self.arm(rng);
            }
            match self.catch_up(rng) {
                Ok(()) => return Ok(()),
                Err(Fault::Dead) => continue,
                Err(Fault::Bug(m)) => return Err(self.fail(format!("after recovery: {m}"))),
            }
        }
    }

    /// Applies (flushing as needed) until the mirror is out of its replay window, then compares.
    fn catch_up(&mut self, rng: &mut SimRng<'_>) -> Act {
        let mut idle = 0;
        while self.worker.applier().in_replay() {
            self.now += self.tick;
            if rng.chance(1, 8) {
                self.fsync_waits();
            }
            if self.mirror_one()? {
                idle = 0;
            } else {
                idle += 1;
                if idle > 3 {
                    return Err(Fault::Bug(format!(
                        "the mirror is stuck at record {} in its replay window (journal durable \
                         through {}, settled {})",
                        self.worker.applier().cursor().applied,
                        self.journal.durable_seq(),
                        self.settled
                    )));
                }
                self.flush_all()?;
            }
        }
        if self.kill.is_dead() {
            return Err(Fault::Dead);
        }
        let at = self.worker.applier().cursor().applied;
        self.compare(at).map_err(Fault::Bug)
    }

    /// One start of the process; `Ok(false)` if it died again before it was up (`early` arms a
    /// fault that may land during the start).
    fn restart(&mut self, rng: &mut SimRng<'_>, early: bool) -> Result<bool, String> {
        let power = self.power_now || (self.kill.is_dead() && self.kill_is_power);
        self.power_now = false;
        self.kill.revive();
        self.plan = None;
        if power {
            self.stats.crashes += 1;
            self.store.crash(&mut || rng.u64());
            let keep_live = rng.chance(1, 2);
            self.cursor.mem.crash(keep_live);
            self.mirror
                .crash(rng)
                .map_err(|e| self.fail(format!("mirror tree crash: {e}")))?;
            self.journal_unclean = true;
            // The shell knows a power loss by the boot id. It must keep that knowledge until every
            // cursor has been reset (`Applier::open`): a start that dies before must not count.
            self.cursor_unclean = true;
        } else {
            self.stats.kills += 1;
        }
        if early {
            self.arm(rng);
        }
        let what = if power { "power loss" } else { "process kill" };
        let (c, a) = (
            self.worker.applier().cursor().checkpoint,
            self.worker.applier().cursor().applied,
        );
        self.ev(|| format!("=== {what} (mirror checkpoint {c} applied {a})"));

        // Invariant 1: the journal recovers.
        let sim_store = SimStore {
            mem: self.store.clone(),
            kill: self.kill.clone(),
        };
        let (journal, report) = match Journal::open(sim_store, self.cfg.clone()) {
            Ok(x) => x,
            Err(_) if self.kill.is_dead() => return Ok(false),
            Err(e) => {
                return Err(self.fail(format!("after a {what} the journal does not recover: {e}")))
            }
        };
        self.journal = journal;
        self.stats.torn_bytes += report.torn_bytes;
        let end = self.journal.next_seq() - 1;
        // Since the last power loss, has a start recovered the journal (cut its torn tail)?
        let unclean = std::mem::take(&mut self.journal_unclean);
        if !unclean && (report.torn_bytes > 0 || report.dropped_segments > 0) {
            return Err(self.fail(format!(
                "after a process kill (page cache intact) recovery cut {} bytes and {} segments",
                report.torn_bytes, report.dropped_segments
            )));
        }
        // Invariant 2: nothing durable is lost, nothing is invented.
        if end < self.durable_ever {
            return Err(self.fail(format!(
                "after a {what} the journal ends at record {end}, but records through {} had \
                 been reported durable",
                self.durable_ever
            )));
        }
        if end > self.primary.last_seq() || (!unclean && end != self.primary.last_seq()) {
            return Err(self.fail(format!(
                "after a {what} the journal ends at record {end}; the primary wrote {}",
                self.primary.last_seq()
            )));
        }
        if self.journal.durable_seq() != end {
            return Err(self.fail(format!(
                "after recovery the journal says durable {} but ends at {end}",
                self.journal.durable_seq()
            )));
        }
        self.primary.rollback(end);
        // The gate is rebuilt from the journal, as the shell's `Volume::open_groups` does.
        self.gate = self.check_journal_contents(end, report.records)?;
        // What the journal holds at open is durable from now on (recovery syncs it).
        self.durable_ever = self.durable_ever.max(end);

        // Invariant 3: the mirror's durable cursor is never beyond the recovered journal.
        let horizon = end;
        self.sequencer = Sequencer::new(end);
        if !self.resolve_in_doubt(rng)? {
            return Ok(false);
        }
        if !self.end_open_groups()? {
            return Ok(false);
        }
        self.settled = self.journal.next_seq() - 1;
        let applier = match Applier::open(&mut self.cursor, self.cursor_unclean, horizon) {
            Ok(a) => a,
            Err(_) if self.kill.is_dead() => return Ok(false),
            Err(e) => return Err(self.fail(format!("cannot read the cursor: {e}"))),
        };
        self.cursor_unclean = false;
        let Some(applier) = applier else {
            return Err(self.fail(format!("after a {what} the mirror's cursor is lost")));
        };
        let c = applier.cursor();
        // Invariant 7: what the worker reported checkpointed survived.
        if c.checkpoint < self.reported_checkpoint {
            return Err(self.fail(format!(
                "after a {what} the mirror's checkpoint is {}, but the worker had reported \
                 records through {} checkpointed",
                c.checkpoint, self.reported_checkpoint
            )));
        }
        if c.checkpoint > horizon || c.applied > horizon || self.consumed_ever > horizon {
            return Err(self.fail(format!(
                "after a {what} the mirror is beyond the journal: checkpoint {}, applied {}, \
                 consumed {}, journal ends at {horizon}",
                c.checkpoint, c.applied, self.consumed_ever
            )));
        }
        if c.applied + 1 < self.journal.first_seq() {
            return Err(self.fail(format!(
                "after a {what} the mirror resumes at record {}, but the journal starts at {}",
                c.applied + 1,
                self.journal.first_seq()
            )));
        }
        // A new process: a new worker, and no application waits for anything yet.
        let worker = Worker::new(applier, self.now, false);
        self.worker = if self.offload {
            worker.offload_checkpoints()
        } else {
            worker
        };
        // The process died: a sync it had started is gone with it.
        self.pending_sync = None;
        self.want_durable = 0;
        self.feed = Feed::new(self.worker.applier().next_seq());
        let (fs, settled) = (self.journal.first_seq(), self.settled);
        self.ev(|| {
            format!(
                "restarted: journal {fs}..={horizon} (torn {}), settled {settled}, mirror \
                 resumes at {} (checkpoint {}, intent {:?})",
                report.torn_bytes,
                c.applied + 1,
                c.checkpoint,
                c.intent
            )
        });
        Ok(true)
    }

    /// Every record the journal holds is the primary's record with that seq. Returns the gate
    /// of the groups these records hold.
    fn check_journal_contents(&self, end: u64, reported: u64) -> Result<Gate, String> {
        let mut gate = Gate::default();
        let first = self.journal.first_seq();
        let held = end + 1 - first;
        if reported != held {
            return Err(self.fail(format!(
                "recovery reported {reported} records, the journal holds {held} ({first}..={end})"
            )));
        }
        let mut reader: Reader<SimFile> = Reader::new(first);
        let mut seq = first;
        while seq <= end {
            let mut got = None;
            for _ in 0..2 {
                let view = self.journal.segment_for(reader.next_seq());
                got = reader
                    .next::<SimStore>(view, end)
                    .map_err(|e| self.fail(format!("reading the recovered journal: {e}")))?;
                if got.is_some() {
                    break;
                }
            }
            let Some(rec) = got else {
                return Err(self.fail(format!("the recovered journal has no record {seq}")));
            };
            if rec.seq != seq || self.primary.op_at(seq) != Some(&rec.op) {
                return Err(self.fail(format!(
                    "recovered record {} is {:?}; the primary wrote {:?} as record {seq}",
                    rec.seq,
                    rec.op,
                    self.primary.op_at(seq)
                )));
            }
            gate.observe(rec.seq, &rec.op);
            seq += 1;
        }
        Ok(gate)
    }

    /// The shell's `Volume::resolve_in_doubt`, the core's decision: the journal's last record may
    /// not have reached the backing tree; [`sequencer::resolve_in_doubt`] re-applies it strictly
    /// and decides whether it stands, and the sequencer settles it or appends its `Abort`. An op
    /// that failed on the primary (its `Abort` lost in the crash) fails again half of the time
    /// (a persistent error, `EIO` from the backing), and otherwise takes effect now.
    /// `Ok(false)`: the process died in the middle.
    fn resolve_in_doubt(&mut self, rng: &mut SimRng<'_>) -> Result<bool, String> {
        let end = self.primary.last_seq();
        let Some(op) = self.primary.op_at(end).cloned() else {
            return Ok(true);
        };
        if matches!(op, Op::Abort { .. }) {
            return Ok(true);
        }
        let mut backing = self.primary.tree.clone();
        // A failed op that really reached the backing was valid there (the kernel rejects a create
        // over an existing name, a rename over one with NOREPLACE, ... before it reaches the file
        // system) and failed for another reason (EIO, ENOSPC, EACCES): half of the time that
        // persists. The sim's workload also journals ops that are invalid on the primary; their
        // failure persists (re-applying them in replay mode would force them, destroying what is
        // in the way on the primary).
        let failed = self.primary.needs_abort(end);
        let valid = !failed || apply_op(&mut backing.clone(), &op, false).is_ok();
        let persistent = failed && (!valid || rng.chance(1, 2));
        let outcome = sequencer::resolve_in_doubt_with(&mut backing, &op, |t, op| {
            if persistent {
                Err(persists(op))
            } else {
                apply_op(t, op, false)
            }
        });
        match outcome {
            InDoubt::Stands => {
                self.ev(|| format!("in-doubt {end} stands"));
                // The backing has the op's effect (re-applied now, or already there): it is
                // record `end`.
                let after = backing.state().clone();
                self.primary.rollback(end - 1);
                self.primary.tree.set_state(after);
                self.primary.record(op, true);
                self.sequencer
                    .settle_in_doubt(&mut self.journal, end, true)
                    .map_err(|r| self.fail(format!("settling the in-doubt record: {r}")))?;
            }
            InDoubt::Abort(why) => {
                if !failed {
                    return Err(self.fail(format!(
                        "re-applying the in-doubt record {end} ({op:?}), which succeeded on the \
                         primary, failed: {why}"
                    )));
                }
                match self
                    .sequencer
                    .settle_in_doubt(&mut self.journal, end, false)
                {
                    Ok(_) => {}
                    Err(_) if self.kill.is_dead() => return Ok(false),
                    Err(e) => return Err(self.fail(format!("append of the in-doubt Abort: {e}"))),
                }
                self.primary.record(Op::Abort { seq: end }, false);
                self.ev(|| format!("in-doubt {end} aborted"));
                self.stats.in_doubt_aborted += 1;
            }
        }
        Ok(true)
    }

    // ---- the end ----------------------------------------------------------------------------

    /// Drains everything, checks `mirror == primary`, then loses power once more and checks the
    /// checkpointed mirror survived it unchanged.
    fn finish(&mut self, rng: &mut SimRng<'_>) -> Result<(), String> {
        for _ in 0..20 {
            match self.drain() {
                Ok(()) => break,
                Err(Fault::Dead) => self.recover(rng)?,
                Err(Fault::Bug(m)) => return Err(self.fail(format!("at the end: {m}"))),
            }
        }
        self.final_check()?;
        self.power_now = true;
        self.recover(rng)?;
        self.final_check()
    }

    fn drain(&mut self) -> Act {
        self.kill.revive();
        // The applications end their groups.
        while self.gate.open() > 0 {
            self.group_op(false)?;
        }
        self.flush_all()?;
        while self.mirror_one()? {}
        self.stop_worker()?;
        self.release()
    }

    fn final_check(&mut self) -> Result<(), String> {
        let last = self.primary.last_seq();
        let c = self.worker.applier().cursor();
        if c.applied != last || c.checkpoint != last {
            return Err(self.fail(format!(
                "at the end the mirror has applied {} (checkpoint {}) of {last} records",
                c.applied, c.checkpoint
            )));
        }
        self.compare(last)
            .map_err(|m| self.fail(format!("at the end: {m}")))?;
        let diff = self
            .mirror
            .snapshot()
            .diff(&self.primary.tree.snapshot(), 8);
        if !diff.is_empty() {
            return Err(self.fail(format!(
                "at the end the mirror differs from the primary:\n  {}",
                diff.join("\n  ")
            )));
        }
        Ok(())
    }
}

/// The error a backing gives when the failure of an op persists (the sims' model of `EIO`).
pub(super) fn persists(op: &Op) -> TreeError {
    TreeError::Other {
        path: op.path().map_or_else(String::new, |p| p.to_string()),
        errno: 5,
        msg: "the primary's error persists".into(),
    }
}

/// An op for the event log, cut short.
fn brief(op: &Op) -> String {
    let mut s = format!("{op:?}");
    if let Some((i, _)) = s.char_indices().nth(150) {
        s.truncate(i);
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::RelPath;
    use crate::tree::Tree;

    #[test]
    fn a_seed_replays_exactly() {
        for seed in 0..5 {
            let a = run_seed(seed, 150).expect("seed passes");
            let b = run_seed(seed, 150).expect("seed passes");
            assert_eq!(a, b, "seed {seed}");
        }
    }

    fn sim_at_end(seed: u64) -> (Sim, SplitMix64) {
        let mut gen = SplitMix64(seed);
        let mut next = || gen.next();
        let mut rng = SimRng::new(&mut next);
        let mut sim = Sim::new(seed, &mut rng, Sabotage::None).expect("sim");
        for step in 0..200 {
            sim.step = step;
            sim.one_step(&mut rng).expect("seed passes");
        }
        sim.finish(&mut rng).expect("seed passes");
        (sim, gen)
    }

    #[test]
    fn checker_reports_a_corrupted_mirror() {
        let (mut sim, _) = sim_at_end(7);
        sim.final_check().expect("consistent before the damage");
        sim.mirror
            .mkdir(&RelPath::new("intruder").expect("path"), 0o755, 0, 0)
            .expect("mkdir");
        let e = sim
            .final_check()
            .expect_err("an extra directory must be reported");
        assert!(e.contains("seed 7") && e.contains("intruder"), "{e}");

        let (mut sim, _) = sim_at_end(8);
        let files: Vec<_> = sim
            .primary
            .tree
            .state()
            .walk()
            .into_iter()
            .filter(|e| e.kind == crate::tree::EntryKind::File)
            .collect();
        let f = files.first().expect("seed 8 ends with a file");
        // A kill may still be armed at the end: the damage is not a mutating call of the run.
        sim.kill.revive();
        sim.mirror.write(&f.path, f.size, b"!").expect("write");
        let e = sim
            .final_check()
            .expect_err("a changed file must be reported");
        assert!(e.contains("seed 8") && e.contains("content"), "{e}");
    }

    #[test]
    fn checker_reports_a_lost_durable_record() {
        let (mut sim, mut gen) = sim_at_end(11);
        let mut next = || gen.next();
        let mut rng = SimRng::new(&mut next);
        // A few more synced records, then damage the first record of the newest segment.
        sim.kill.revive();
        for _ in 0..5 {
            sim.primary_op(&mut rng).ok();
        }
        sim.flush_all().ok().expect("flush");
        sim.kill.revive();
        let id = sim
            .journal
            .segment_for(sim.primary.last_seq())
            .expect("a segment")
            .first_seq;
        sim.store
            .flip_bit(id, crate::journal::frame::SEGMENT_HEADER_BYTES + 20, 1);
        sim.power_now = true;
        let e = sim
            .recover(&mut rng)
            .expect_err("a lost durable record must be reported");
        assert!(e.contains("seed 11") && e.contains("journal"), "{e}");
    }

    #[test]
    fn checker_reports_sabotaged_appliers() {
        let caught = (0..20)
            .filter_map(|s| run_with(s, 300, Sabotage::IgnoreDurable, None).err())
            .collect::<Vec<_>>();
        assert!(
            !caught.is_empty(),
            "reading non-durable records went unnoticed"
        );
        assert!(caught.iter().all(|e| e.contains("durable")), "{caught:?}");

        let caught = (0..20)
            .filter_map(|s| run_with(s, 300, Sabotage::DropWrite, None).err())
            .collect::<Vec<_>>();
        assert!(
            caught.len() >= 15,
            "a dropped write went unnoticed: {caught:?}"
        );
        assert!(caught.iter().all(|e| e.contains("content")), "{caught:?}");
    }
}
