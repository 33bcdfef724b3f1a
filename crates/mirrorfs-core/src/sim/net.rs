//! The seeded simulation of a network mirror: a primary journal streaming to a remote mirror
//! through the real [`Sender`] and [`Session`] state machines and the real wire encoding, over a
//! simulated network with faults, with both processes killed and powered off at random points.
//!
//! ```text
//!  primary process (crash/kill)                         mirror process (crash/kill)
//!  Primary workload ─▶ Journal<SimStore> ─ flusher       Session ─▶ Journal<SimStore> (append_at)
//!     records ≤ min(durable, settled), byte window          flusher ─▶ durable
//!     Sender ─ Msg::encode ─▶ [ bytes: split, delayed, ─▶ Decoder ─┘   Feed ≤ min(durable, settled)
//!                               cut, corrupted, reset ]   Worker(Applier) + SimCursor + SimTree
//!     Decoder ◀── [ bytes ] ◀── Msg::encode ◀── Ack{received, durable, applied, checkpoint}
//! ```
//!
//! Everything runs in one thread from one seeded generator, so a seed replays exactly. The two
//! sides are modelled on the shell: the primary's link on `mirrorfs::remote` (Hello, decide with
//! [`Sender::on_welcome`], stream records ≤ min(durable, settled) in batches within a byte window,
//! release journal segments only through the mirror's acknowledged durable position), the
//! mirror on `mirrorfs::serve`, driving the daemon's own [`Session`] (make the journal durable
//! through its end before `Welcome`, let the session check every batch, `append_at`, a flusher,
//! the acknowledgements the session says are due) and the local mirror's worker: the core's
//! [`Worker`] that `mirror::run_worker` drives too, on a simulated clock, checkpointing when idle
//! as `serve` sets it, its [`Applier`] fed records ≤ min(durable, settled), a record being final
//! when it is the primary's settled watermark or the next record is known. Only the sabotaged
//! variants (`AcceptStale`, `AckBeforeDurable`, `ServeStaleSettled`) step outside the session, in
//! the shell's part.
//!
//! The network has connections with ids, each a pair of byte pipes without reordering (TCP).
//! Bytes are delivered in random chunk splits at random times; a connection can be reset (a
//! partition: a prefix of what was in flight may still arrive, the rest is lost, and the ends see
//! it closed now or, the mirror, only at a timeout), a byte in flight can be corrupted (the
//! decoder must refuse the frame, the connection is dropped), and a delayed copy of an old
//! connection's frame can turn up later (it must be dropped: it belongs to no live connection).
//! Every message decoded must be exactly the next message sent on that connection, so the codec
//! is checked and a corrupted or stale frame can never be acted upon.
//!
//! Invariants (a violation is an `Err` naming the seed and step):
//! 1. the mirror's applied state always equals the primary's reference state at the mirror's
//!    applied seq (checked after every strict apply and at the end);
//! 2. every record the mirror acknowledged durable survives a mirror power loss; everything the
//!    mirror consumed survives too; both journals recover to exactly the primary's records;
//! 3. the mirror holds only records the primary reported durable (it never holds a change the
//!    primary's journal could lose), and applies none that is not final;
//! 4. nothing is applied twice in strict mode or out of order;
//! 5. acknowledgements are monotonic and never beyond what was sent: [`Sender::on_ack`] checks,
//!    and a refusal is a violation (a correct mirror never sends one);
//! 6. a decoded message is always the next one sent on its connection (no corrupted or stale
//!    frame is ever accepted);
//! 7. the start decision is always a resume (the primary never released what the mirror needs,
//!    the mirror is never ahead of the primary);
//! 8. at the end, after healing the network and draining, `mirror == primary`, and again after
//!    one more power loss of the mirror and a reconnect;
//! 9. the daemon's worker keeps its word: a checkpoint it reported survives any crash, and it is
//!    never idle with applied records not checkpointed (an `--ack sync` primary would wait);
//! 10. one primary at a time, and its newest connection wins (`core::slot`, the rule
//!     `serve::slot` drives): a connection of the primary that arrives while the mirror still
//!     holds an older one (the primary gave up on it after a partition the mirror notices only
//!     at a timeout) displaces that session, and nothing of a displaced connection is acted on
//!     afterwards: no message decoded, no record stored (only the slot's holder stores).
//!
//! On half of the seeds (the correct sides only) records travel over the UDP data path instead
//! of `Records` batches, through a datagram channel with loss, Gilbert–Elliott bursts,
//! reordering, duplication, corruption, forged and replayed packets; the connection stays the
//! control channel. Its own invariants (U1–U3: every tainted datagram dropped and counted,
//! `sent_through` never ahead of what was handed out, convergence after the heal) are in
//! [`udp`](self::udp).

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use super::offload::{self, offloaded, PendingSync};
use super::run::SplitMix64;
use super::{KillSwitch, Primary, SimCursor, SimFile, SimRng, SimStore, SimTree};
use crate::applier::Applier;
use crate::feed::{FeedReadError, Item, JournalFeed};
use crate::flush;
use crate::journal::storage::MemStore;
use crate::journal::{Journal, JournalConfig, JournalError, Reader, SyncPlan};
use crate::link::{Begin, JournalSpan, MirrorCopy, Positions, Sender, Start};
use crate::op::{Op, Record};
use crate::sequencer::{self, InDoubt, Sequencer};
use crate::session::{self, Incoming, Phase, Session};
use crate::slot::{Admission, Claimant, Slot};
use crate::tree::apply_op;
use crate::wire::{error_code, Decoder, MirrorState, Msg, VolumeId, BATCH_BYTES};
use crate::worker::{Turn, Worker, CHECKPOINT_EVERY};

mod udp;

const VOLUME: VolumeId = [0x5e; 16];
/// The one primary, as the mirror's slot knows it (its pinned key, its volume).
const SIM_PRIMARY: Claimant<u8> = Claimant {
    key: Some(1),
    volume: VOLUME,
};

/// The simulated volume's one generation.
fn sim_history() -> crate::history::History {
    crate::history::History::new(VOLUME, GENERATION)
}
const GENERATION: u64 = 1;
/// The mirror's state directory at its root (records naming it are refused).
const RESERVED: &[u8] = b".mirrorfs";

/// What one or more seeds of the network simulation did, for the summary line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Seeds run (1 for one run; sums when added).
    pub seeds: u64,
    /// Simulation steps taken.
    pub steps: u64,
    /// Records journaled by the primary (ops, their `Abort`s, in-doubt `Abort`s).
    pub records: u64,
    /// `Records` batches sent.
    pub batches: u64,
    /// Bytes put on the wire (both directions).
    pub bytes: u64,
    /// Handshakes that reached `Start`.
    pub connections: u64,
    /// Connections reset by a partition.
    pub partitions: u64,
    /// Bytes corrupted in flight.
    pub corruptions: u64,
    /// Frames the decoders refused (each closed its connection).
    pub refused_frames: u64,
    /// Delayed frames of dead connections that turned up and were dropped.
    pub stale_dropped: u64,
    /// Connections the mirror refused with `BUSY` (`core::slot`: another primary, or an older
    /// connection of this one; the simulation has one primary, so none is expected now).
    pub busy: u64,
    /// Sessions of the primary displaced by its own newer connection (`core::slot`): the
    /// mirror still held a connection the primary had given up on.
    pub displaced: u64,
    /// Sessions closed by a timeout (a silent peer, a reset seen late, a stalled frame).
    pub timeouts: u64,
    /// Mirror power losses.
    pub mirror_crashes: u64,
    /// Mirror process kills.
    pub mirror_kills: u64,
    /// Primary power losses.
    pub primary_crashes: u64,
    /// Primary process kills.
    pub primary_kills: u64,
    /// Records applied to the mirror (replays included).
    pub applied: u64,
    /// Aborted records and `Abort`s the mirror skipped.
    pub skipped: u64,
    /// Acknowledgements the primary refused (must stay 0).
    pub ack_refusals: u64,
    /// Comparisons of the mirror with the primary's state at the mirror's position.
    pub comparisons: u64,
    /// Checkpoints of the mirror's tree (the worker's: when idle, every second, at a stop).
    pub checkpoints: u64,
    /// Worker turns that failed on a transient cursor write error (the worker retries).
    pub retries: u64,
    /// Seeds whose records went over the UDP data path.
    pub udp_seeds: u64,
    /// Datagrams the UDP senders handed out.
    pub datagrams: u64,
    /// Datagrams the channel lost (random and Gilbert–Elliott bursts).
    pub datagrams_lost: u64,
    /// Datagrams the channel duplicated.
    pub datagrams_duplicated: u64,
    /// Datagrams with a bit flipped in flight.
    pub datagrams_corrupted: u64,
    /// Forged datagrams the adversary injected.
    pub forged: u64,
    /// Captured datagrams the adversary replayed.
    pub replays: u64,
    /// Datagrams the receivers' packet layer dropped (all tainted ones, invariant U1).
    pub datagrams_dropped: u64,
    /// Data packets FEC rebuilt.
    pub fec_recovered: u64,
    /// NAK entries the primaries took.
    pub nak_entries: u64,
    /// NAKed records re-read from the journal (the sender's store had dropped them).
    pub gone_resent: u64,
    /// Records that reached a mirror over UDP.
    pub udp_records: u64,
}

impl NetStats {
    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &NetStats) {
        self.seeds += o.seeds;
        self.steps += o.steps;
        self.records += o.records;
        self.batches += o.batches;
        self.bytes += o.bytes;
        self.connections += o.connections;
        self.partitions += o.partitions;
        self.corruptions += o.corruptions;
        self.refused_frames += o.refused_frames;
        self.stale_dropped += o.stale_dropped;
        self.busy += o.busy;
        self.displaced += o.displaced;
        self.timeouts += o.timeouts;
        self.mirror_crashes += o.mirror_crashes;
        self.mirror_kills += o.mirror_kills;
        self.primary_crashes += o.primary_crashes;
        self.primary_kills += o.primary_kills;
        self.applied += o.applied;
        self.skipped += o.skipped;
        self.ack_refusals += o.ack_refusals;
        self.comparisons += o.comparisons;
        self.checkpoints += o.checkpoints;
        self.retries += o.retries;
        self.udp_seeds += o.udp_seeds;
        self.datagrams += o.datagrams;
        self.datagrams_lost += o.datagrams_lost;
        self.datagrams_duplicated += o.datagrams_duplicated;
        self.datagrams_corrupted += o.datagrams_corrupted;
        self.forged += o.forged;
        self.replays += o.replays;
        self.datagrams_dropped += o.datagrams_dropped;
        self.fec_recovered += o.fec_recovered;
        self.nak_entries += o.nak_entries;
        self.gone_resent += o.gone_resent;
        self.udp_records += o.udp_records;
    }
}

impl fmt::Display for NetStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} seeds, {} steps: {} records in {} batches ({} bytes on the wire), {} connections, \
             {} partitions, {} corruptions ({} frames refused), {} stale frames dropped, {} busy, \
             {} displaced, {} timeouts; mirror: {} power losses, {} kills; primary: {} power losses, {} kills; \
             {} records applied ({} skipped, {} checkpoints, {} transient cursor errors retried), \
             {} comparisons, {} acks refused; UDP on {} seeds: {} datagrams ({} lost, {} \
             duplicated, {} corrupted), {} forged and {} replayed injected, {} dropped by the \
             receivers, {} rebuilt by FEC, {} NAK entries, {} resent from the journal, {} records \
             over UDP",
            self.seeds,
            self.steps,
            self.records,
            self.batches,
            self.bytes,
            self.connections,
            self.partitions,
            self.corruptions,
            self.refused_frames,
            self.stale_dropped,
            self.busy,
            self.displaced,
            self.timeouts,
            self.mirror_crashes,
            self.mirror_kills,
            self.primary_crashes,
            self.primary_kills,
            self.applied,
            self.skipped,
            self.checkpoints,
            self.retries,
            self.comparisons,
            self.ack_refusals,
            self.udp_seeds,
            self.datagrams,
            self.datagrams_lost,
            self.datagrams_duplicated,
            self.datagrams_corrupted,
            self.forged,
            self.replays,
            self.datagrams_dropped,
            self.fec_recovered,
            self.nak_entries,
            self.gone_resent,
            self.udp_records,
        )
    }
}

/// Which implementation of the two sides runs. [`NetVariant::Correct`] is the shell's design
/// with the three defects the simulation found fixed (`ServeRestartSettled`,
/// `ServeStaleSettled`, `RemoteNoSettledOnStart`); the others reproduce a shell as written, or
/// a deliberately broken mirror, to show the checker catches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetVariant {
    /// The protocol as designed (see the module docs).
    Correct,
    /// `mirrorfs serve` as written: at start-up the settled watermark is the journal's end − 1,
    /// even when the last record is the `Abort` of the one before (which is then applied).
    ServeRestartSettled,
    /// `mirrorfs serve` as written: the settled watermark only grows (`max`), also across
    /// primaries; a primary that lost unsynced records to a power loss says a lower one, and the
    /// mirror holds its last record back until the primary passes the stale watermark.
    ServeStaleSettled,
    /// `mirrorfs::remote` as written: the settled watermark travels only with records, so after a
    /// mirror restart its last record stays held back until the primary writes again.
    RemoteNoSettledOnStart,
    /// Broken mirror: applies every durable record at once, without waiting for it to be final.
    ApplyBeforeFinal,
    /// Broken mirror: acknowledges records as durable as soon as they are received.
    AckBeforeDurable,
    /// Broken mirror: takes bytes regardless of the connection they belong to and skips the
    /// sequence check (appends records wherever its journal ends).
    AcceptStale,
}

/// Runs seed `seed` for `steps` steps with the correct sides.
pub fn run_net_seed(seed: u64, steps: usize) -> Result<NetStats, String> {
    run_net_variant(seed, steps, NetVariant::Correct)
}

/// Runs seed `seed` with the given implementation of the sides.
pub fn run_net_variant(seed: u64, steps: usize, variant: NetVariant) -> Result<NetStats, String> {
    run(seed, steps, variant, None)
}

/// Like [`run_net_seed`], and also returns a log of every event, for debugging a failing seed.
pub fn trace_net_seed(seed: u64, steps: usize) -> (Result<NetStats, String>, Vec<String>) {
    trace_net_variant(seed, steps, NetVariant::Correct)
}

/// Like [`run_net_variant`], and also returns the event log.
pub fn trace_net_variant(
    seed: u64,
    steps: usize,
    variant: NetVariant,
) -> (Result<NetStats, String>, Vec<String>) {
    let mut log = Vec::new();
    let r = run(seed, steps, variant, Some(&mut log));
    (r, log)
}

fn run(
    seed: u64,
    steps: usize,
    variant: NetVariant,
    log: Option<&mut Vec<String>>,
) -> Result<NetStats, String> {
    let mut state = seed ^ 0x6E65_745F_7369_6D00;
    let mut next = move || {
        // SplitMix64: fixed here so a seed replays the same everywhere.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut rng = SimRng::new(&mut next);
    let mut sim = Sim::new(seed, &mut rng, variant)?;
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

/// Why an action stopped.
enum Fault {
    /// A process died (kill or power loss): restart it.
    Dead,
    /// An invariant or an unexpected error.
    Bug(String),
}

type Act = Result<(), Fault>;

/// One end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Not accepted yet (the mirror's end until the first bytes arrive).
    Pending,
    Open,
    Closed,
}

/// A connection: two byte pipes without reordering, and what was sent on each.
struct Conn {
    id: u64,
    to_m: VecDeque<u8>,
    to_p: VecDeque<u8>,
    /// Messages sent towards the mirror / the primary, not yet decoded there.
    m_expect: VecDeque<Msg>,
    p_expect: VecDeque<Msg>,
    /// The last whole frame sent each way (a delayed copy may turn up later as a stale frame).
    last_to_m: Vec<u8>,
    last_to_p: Vec<u8>,
    m_end: End,
    p_end: End,
    /// The end closed with a FIN (the peer sees end-of-stream once the bytes drain); a closed
    /// end without it went silent (power loss) and the peer notices only at a timeout.
    m_fin: bool,
    p_fin: bool,
    /// Reset by a partition: nothing more is delivered.
    reset: bool,
    /// The mirror notices the reset only at a timeout (until then it holds its slot, and a new
    /// connection of the primary displaces it).
    m_late: bool,
}

impl Conn {
    fn new(id: u64) -> Self {
        Conn {
            id,
            to_m: VecDeque::new(),
            to_p: VecDeque::new(),
            m_expect: VecDeque::new(),
            p_expect: VecDeque::new(),
            last_to_m: Vec::new(),
            last_to_p: Vec::new(),
            m_end: End::Pending,
            p_end: End::Open,
            m_fin: false,
            p_fin: false,
            reset: false,
            m_late: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PPhase {
    AwaitWelcome,
    Streaming,
}

/// The primary's session on one connection (`remote::session`).
struct PLink {
    conn: u64,
    sender: Sender,
    dec: Decoder,
    phase: PPhase,
    reader: Reader<SimFile>,
    pending: Option<Record>,
    nonce: u64,
    /// The UDP data path (seeds on UDP): offered, then open.
    udp: Option<udp::PUdpState>,
}

/// The mirror daemon's session on one connection (`serve::Daemon::stream`): the same
/// [`Session`] the daemon drives, once `Hello` arrived.
struct MLink {
    conn: u64,
    /// Its number in the mirror's [`Slot`] (the order the daemon admitted connections in).
    slot: u64,
    dec: Decoder,
    session: Option<Session>,
    /// The session's UDP receiver once the primary's offer was accepted.
    udp: Option<udp::MUdp>,
}

impl MLink {
    fn streaming(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| s.phase() == Phase::Streaming)
    }
}

/// The mirror daemon's feed: the core [`JournalFeed`] the shell's `volume::RecordFeed` drives
/// too; or, in the `ApplyBeforeFinal` variant, a broken one that takes every durable record as
/// final.
enum Feed {
    Core(JournalFeed<SimFile>),
    Eager(Reader<SimFile>),
}

impl Feed {
    fn new(next_seq: u64, eager: bool) -> Self {
        if eager {
            Feed::Eager(Reader::new(next_seq))
        } else {
            Feed::Core(JournalFeed::new(next_seq))
        }
    }

    fn next(
        &mut self,
        j: &Journal<SimStore>,
        durable: u64,
        settled: u64,
    ) -> Result<Item, FeedReadError> {
        match self {
            Feed::Core(f) => f.next::<SimStore>(durable, settled, |seq| j.segment_for(seq)),
            Feed::Eager(reader) => Ok(match read_next(reader, j, durable)? {
                Some(rec) => match rec.op {
                    Op::Abort { .. } => Item::Skip(rec.seq),
                    _ => Item::Apply(rec),
                },
                None => Item::Wait,
            }),
        }
    }
}

/// The next record of `reader` within `limit`, moving on to the next segment when one ends.
fn read_next(
    reader: &mut Reader<SimFile>,
    j: &Journal<SimStore>,
    limit: u64,
) -> Result<Option<Record>, JournalError> {
    for _ in 0..2 {
        let view = j.segment_for(reader.next_seq());
        if let Some(r) = reader.next::<SimStore>(view, limit)? {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

/// Per-seed rates, so different seeds stress different regimes.
struct Profile {
    /// Weights of: primary op, primary flusher, primary send, deliver to the mirror, deliver to
    /// the primary, mirror flusher, mirror worker, mirror ack, mirror worker pause, partition,
    /// corruption, timeout, kill or power loss, stale frame or ping.
    weights: [u64; 14],
    /// Furthest (in mutating calls) an armed kill may land.
    kill_reach: u64,
    /// Among armed kills, the chance (in 1/4) that it is a power loss.
    power_in_4: u64,
}

struct Sim {
    seed: u64,
    step: usize,
    variant: NetVariant,
    stats: NetStats,
    trace: Option<Vec<String>>,
    profile: Profile,
    compress: bool,
    window: u64,
    batch_bytes: usize,
    /// Steps left while the network is down (connections cannot be made).
    down: u64,

    // ---- the primary process
    pkill: KillSwitch,
    p_kill_is_power: bool,
    p_power_now: bool,
    p_unclean: bool,
    pcfg: JournalConfig,
    pstore: MemStore,
    pjournal: Journal<SimStore>,
    pplan: Option<SyncPlan<SimFile>>,
    primary: Primary,
    /// The primary's ordering decisions: the binary's `Volume` drives the same machine.
    psequencer: Sequencer,
    psettled: u64,
    /// Highest seq the primary's journal ever reported durable: never lost.
    p_durable_ever: u64,
    plink: Option<PLink>,
    /// The mirror's durable position as last acknowledged (`MirrorShared::durable`).
    p_mirror_durable: u64,

    // ---- the mirror process
    mkill: KillSwitch,
    m_kill_is_power: bool,
    m_power_now: bool,
    m_journal_unclean: bool,
    m_cursor_unclean: bool,
    mcfg: JournalConfig,
    mstore: MemStore,
    mjournal: Journal<SimStore>,
    mplan: Option<SyncPlan<SimFile>>,
    /// `progress.durable_seq` of the daemon.
    mdurable: u64,
    /// `progress.settled_seq` of the daemon.
    msettled: u64,
    cursor: SimCursor,
    tree: SimTree,
    /// The daemon's mirror worker (the binary's `mirror::run_worker` drives the same machine,
    /// checkpointing when idle as `serve` sets it): it owns the [`Applier`].
    worker: Worker,
    feed: Feed,
    /// The simulated clock, given to the worker as `now`: it moves `tick` every step.
    now: Duration,
    tick: Duration,
    /// On half of the seeds (their own stream): transient cursor write errors, armed for one
    /// worker turn at a time.
    glitches: Option<SplitMix64>,
    mlink: Option<MLink>,
    /// Which connection streams (`serve::slot`'s rule, the core's [`Slot`]): the daemon's
    /// process state, new at each start.
    mslot: Slot<u8>,
    /// Connections whose session a newer connection displaced: nothing they carry may be acted
    /// upon any more (invariant 10).
    m_displaced: std::collections::BTreeSet<u64>,
    /// Highest durable position the mirror ever put in an `Ack`.
    m_acked_durable: u64,
    /// Highest seq the mirror ever consumed (applied or skipped).
    m_consumed_ever: u64,
    /// Highest checkpoint the daemon's worker ever reported: durable.
    m_reported_checkpoint: u64,
    /// The daemon's worker hands its checkpoints' syncs to the driver (the binary's checkpoint
    /// thread), on three seeds in four.
    offload: bool,
    /// A sync started off the worker's thread: its result (the tree was synced when it
    /// began), the turns until it is reported, and the record it makes durable.
    pending_sync: Option<PendingSync>,

    // ---- the network
    conns: Vec<Conn>,
    next_conn: u64,
    /// Delayed copies of frames of connections that are gone: (connection, bytes).
    stale_to_m: VecDeque<(u64, Vec<u8>)>,
    stale_to_p: VecDeque<(u64, Vec<u8>)>,
    /// On the seeds whose records go over UDP: the datagram channel towards the mirror.
    udp: Option<Box<udp::Channel>>,
}

impl Sim {
    fn new(seed: u64, rng: &mut SimRng<'_>, variant: NetVariant) -> Result<Self, String> {
        let seg = |rng: &mut SimRng<'_>| JournalConfig {
            segment_bytes: *rng
                .pick(&[1024u64, 4096, 16 << 10, 64 << 20])
                .unwrap_or(&4096),
            journal_bytes_max: 1 << 40,
        };
        let pcfg = seg(rng);
        let mcfg = seg(rng);
        let calm = if rng.chance(1, 3) { 4 } else { 1 };
        let profile = Profile {
            weights: [
                calm * rng.range(6, 14), // primary op
                calm * rng.range(2, 6),  // primary flusher
                calm * rng.range(3, 8),  // primary send
                calm * rng.range(4, 10), // deliver to mirror
                calm * rng.range(2, 6),  // deliver to primary
                calm * rng.range(2, 6),  // mirror flusher
                calm * rng.range(3, 8),  // mirror worker
                calm * rng.range(2, 5),  // mirror ack
                rng.range(0, 2),         // mirror worker pause
                rng.range(0, 2),         // partition
                rng.range(0, 2),         // corruption
                rng.range(1, 2),         // timeout
                rng.range(1, 3),         // kill / power loss
                rng.range(1, 2),         // stale frame / ping
            ],
            kill_reach: rng.range(2, 40),
            power_in_4: rng.range(0, 3),
        };
        let compress = rng.chance(1, 2);
        let window = *rng
            .pick(&[2048u64, 16 << 10, 128 << 10, 32 << 20])
            .unwrap_or(&4096);
        let batch_bytes = *rng
            .pick(&[200usize, 2000, 16 << 10, BATCH_BYTES])
            .unwrap_or(&2000);
        let pkill = KillSwitch::new();
        let pstore = MemStore::new();
        let (pjournal, _) = Journal::open(
            SimStore {
                mem: pstore.clone(),
                kill: pkill.clone(),
            },
            pcfg.clone(),
        )
        .map_err(|e| format!("seed {seed}: cannot create the primary's journal: {e}"))?;
        let mkill = KillSwitch::new();
        let mstore = MemStore::new();
        let (mjournal, _) = Journal::open(
            SimStore {
                mem: mstore.clone(),
                kill: mkill.clone(),
            },
            mcfg.clone(),
        )
        .map_err(|e| format!("seed {seed}: cannot create the mirror's journal: {e}"))?;
        let mut cursor = SimCursor {
            kill: mkill.clone(),
            ..SimCursor::default()
        };
        // Both start empty: the mirror holds a consistent copy of the empty volume at record 0.
        let applier = Applier::start_at(&mut cursor, 0)
            .map_err(|e| format!("seed {seed}: cannot create the cursor: {e}"))?;
        // The clock's pace draws from its own stream, so the seed's other decisions stay.
        let mut clock = SplitMix64(seed ^ 0x00C1_0C4D_7100_u64);
        let tick = Duration::from_millis([1, 5, 20, 100, 250][(clock.next() % 5) as usize]);
        let mut glitches = SplitMix64(seed ^ 0x0061_1C40_0000_u64);
        let glitches = glitches.next().is_multiple_of(2).then_some(glitches);
        let udp = udp::Channel::for_seed(seed, variant);
        Ok(Sim {
            seed,
            step: 0,
            variant,
            stats: NetStats {
                seeds: 1,
                udp_seeds: u64::from(udp.is_some()),
                ..NetStats::default()
            },
            trace: None,
            profile,
            compress,
            window,
            batch_bytes,
            down: 0,
            pkill,
            p_kill_is_power: false,
            p_power_now: false,
            p_unclean: false,
            pcfg,
            pstore,
            pjournal,
            pplan: None,
            primary: Primary::new(),
            psequencer: Sequencer::new(0),
            psettled: 0,
            p_durable_ever: 0,
            plink: None,
            p_mirror_durable: 0,
            tree: SimTree::new().with_kill(mkill.clone()),
            mkill,
            m_kill_is_power: false,
            m_power_now: false,
            m_journal_unclean: false,
            m_cursor_unclean: false,
            mcfg,
            mstore,
            mjournal,
            mplan: None,
            mdurable: 0,
            msettled: 0,
            cursor,
            worker: offloaded(Worker::new(applier, Duration::ZERO, true), seed),
            feed: Feed::new(1, variant == NetVariant::ApplyBeforeFinal),
            now: Duration::ZERO,
            tick,
            glitches,
            mlink: None,
            mslot: Slot::default(),
            m_displaced: std::collections::BTreeSet::new(),
            m_acked_durable: 0,
            m_consumed_ever: 0,
            m_reported_checkpoint: 0,
            offload: !seed.is_multiple_of(4),
            pending_sync: None,
            conns: Vec::new(),
            next_conn: 1,
            stale_to_m: VecDeque::new(),
            stale_to_p: VecDeque::new(),
            udp,
        })
    }

    fn ev(&mut self, what: impl FnOnce() -> String) {
        if let Some(t) = &mut self.trace {
            t.push(format!("[{}] {}", self.step, what()));
        }
    }

    /// The error message for a violated invariant.
    fn fail(&self, what: impl fmt::Display) -> String {
        format!("seed {} step {}: {what}", self.seed, self.step)
    }

    fn pfault(&self, what: impl fmt::Display) -> Fault {
        if self.pkill.is_dead() {
            Fault::Dead
        } else {
            Fault::Bug(format!("primary: {what}"))
        }
    }

    fn mfault(&self, what: impl fmt::Display) -> Fault {
        if self.mkill.is_dead() {
            Fault::Dead
        } else {
            Fault::Bug(format!("mirror: {what}"))
        }
    }

    fn conn(&mut self, id: u64) -> Option<&mut Conn> {
        self.conns.iter_mut().find(|c| c.id == id)
    }

    fn one_step(&mut self, rng: &mut SimRng<'_>) -> Result<(), String> {
        self.down = self.down.saturating_sub(1);
        let res = match rng.weighted(&self.profile.weights) {
            0 => self.primary_op(rng),
            1 => self.p_flusher(rng),
            2 => self.p_send(),
            3 => self.deliver_to_m(rng, false),
            4 => self.deliver_to_p(rng, false),
            5 => self.m_flusher(rng),
            6 => {
                let n = rng.range(1, 8);
                self.m_work(n)
            }
            7 => self.m_ack(rng.chance(1, 4)),
            8 => self.m_pause(),
            9 => self.partition(rng),
            10 => self.corrupt(rng),
            11 => self.timeout(),
            12 => {
                self.fault_now(rng);
                Ok(())
            }
            _ => {
                if rng.chance(1, 2) {
                    self.stale(rng)
                } else {
                    self.p_ping()
                }
            }
        };
        if let Err(Fault::Bug(m)) = res {
            return Err(self.fail(m));
        }
        self.gc();
        self.restart_dead(rng)
    }

    /// Restarts whichever process died (faults may strike the restart too).
    fn restart_dead(&mut self, rng: &mut SimRng<'_>) -> Result<(), String> {
        if self.mkill.is_dead() || self.m_power_now {
            self.m_restart(rng)?;
        }
        if self.pkill.is_dead() || self.p_power_now {
            self.p_restart(rng)?;
        }
        if self.mkill.is_dead() || self.pkill.is_dead() {
            return self.restart_dead(rng);
        }
        Ok(())
    }

    /// Arms a kill (or power loss) of one process, or cuts the power now.
    fn fault_now(&mut self, rng: &mut SimRng<'_>) {
        let mirror = rng.chance(1, 2);
        match rng.below(4) {
            0 => {
                if mirror {
                    self.m_power_now = true;
                } else {
                    self.p_power_now = true;
                }
                self.ev(|| format!("power loss of the {} now", side(mirror)));
            }
            _ => self.arm(rng, mirror),
        }
    }

    fn arm(&mut self, rng: &mut SimRng<'_>, mirror: bool) {
        let n = rng.range(1, self.profile.kill_reach);
        let power = rng.below(4) < self.profile.power_in_4;
        if mirror {
            if self.mkill.armed() {
                return;
            }
            self.mkill.arm(n);
            self.m_kill_is_power = power;
        } else {
            if self.pkill.armed() {
                return;
            }
            self.pkill.arm(n);
            self.p_kill_is_power = power;
        }
        self.ev(|| {
            format!(
                "armed: {} of the {} in {n} calls",
                if power { "power loss" } else { "kill" },
                side(mirror)
            )
        });
    }

    /// Forgets connections nobody will use again.
    fn gc(&mut self) {
        self.conns.retain(|c| {
            !(c.p_end == End::Closed
                && c.m_end == End::Closed
                && c.to_m.is_empty()
                && c.to_p.is_empty())
        });
        while self.stale_to_m.len() > 8 {
            self.stale_to_m.pop_front();
        }
        while self.stale_to_p.len() > 8 {
            self.stale_to_p.pop_front();
        }
    }

    // ---- the network --------------------------------------------------------------------------

    /// Sends `msg` from the mirror on connection `id` (lost if the connection is gone).
    fn send_to_p(&mut self, id: u64, msg: Msg) {
        let bytes = msg.encode(self.compress);
        let Some(c) = self.conns.iter_mut().find(|c| c.id == id) else {
            return;
        };
        if c.reset || c.m_end == End::Closed {
            return;
        }
        self.stats.bytes += bytes.len() as u64;
        c.to_p.extend(bytes.iter().copied());
        c.last_to_p = bytes;
        c.p_expect.push_back(msg);
    }

    /// Sends `msg` from the primary on connection `id`; returns the frame's size.
    fn send_to_m(&mut self, id: u64, msg: Msg) -> u64 {
        let bytes = msg.encode(self.compress);
        let n = bytes.len() as u64;
        let Some(c) = self.conns.iter_mut().find(|c| c.id == id) else {
            return n;
        };
        if c.reset || c.p_end == End::Closed {
            return n;
        }
        self.stats.bytes += n;
        c.to_m.extend(bytes.iter().copied());
        c.last_to_m = bytes;
        c.m_expect.push_back(msg);
        n
    }

    fn chunk(rng: &mut SimRng<'_>, avail: usize) -> usize {
        let k = match rng.below(4) {
            0 => rng.range(1, 16),
            1 => rng.range(1, 300),
            2 => rng.range(1, 8192),
            _ => avail as u64,
        } as usize;
        k.clamp(1, avail.max(1))
    }

    /// Delivers a chunk of bytes in flight towards the mirror (`all`: everything).
    fn deliver_to_m(&mut self, rng: &mut SimRng<'_>, all: bool) -> Act {
        // On UDP seeds, half of the deliveries are datagrams (drawn from the channel's stream).
        if !all && self.udp.as_mut().is_some_and(|c| c.coin()) {
            return self.deliver_datagrams(false);
        }
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|c| !c.to_m.is_empty())
            .map(|c| c.id)
            .collect();
        let Some(&id) = rng.pick(&ids) else {
            return self.m_poll();
        };
        let Some(c) = self.conn(id) else {
            return Ok(());
        };
        let avail = c.to_m.len();
        let k = if all { avail } else { Self::chunk(rng, avail) };
        let bytes: Vec<u8> = c.to_m.drain(..k).collect();
        self.m_receive(id, &bytes, false)
    }

    /// Delivers a chunk of bytes in flight towards the primary (`all`: everything).
    fn deliver_to_p(&mut self, rng: &mut SimRng<'_>, all: bool) -> Act {
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|c| !c.to_p.is_empty())
            .map(|c| c.id)
            .collect();
        let Some(&id) = rng.pick(&ids) else {
            return self.p_poll();
        };
        let Some(c) = self.conn(id) else {
            return Ok(());
        };
        let avail = c.to_p.len();
        let k = if all { avail } else { Self::chunk(rng, avail) };
        let bytes: Vec<u8> = c.to_p.drain(..k).collect();
        self.p_receive(id, &bytes)
    }

    /// A partition: the connection is reset. A prefix of what was in flight may still arrive,
    /// the rest is lost (or a copy of its last frame turns up much later); the primary sees the
    /// connection closed now, the mirror now or only at a timeout.
    fn partition(&mut self, rng: &mut SimRng<'_>) -> Act {
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|c| !c.reset && (c.p_end == End::Open || c.m_end != End::Closed))
            .map(|c| c.id)
            .collect();
        let Some(&id) = rng.pick(&ids) else {
            return Ok(());
        };
        self.stats.partitions += 1;
        self.down = rng.range(0, 30);
        let m_late = rng.chance(1, 2);
        let (mode_m, mode_p) = (rng.below(3), rng.below(3));
        let Some(c) = self.conn(id) else {
            return Ok(());
        };
        let cut_m = if mode_m == 1 {
            rng.below(c.to_m.len() as u64 + 1) as usize
        } else {
            0
        };
        let cut_p = if mode_p == 1 {
            rng.below(c.to_p.len() as u64 + 1) as usize
        } else {
            0
        };
        let pre_m: Vec<u8> = c.to_m.drain(..cut_m).collect();
        let pre_p: Vec<u8> = c.to_p.drain(..cut_p).collect();
        let (lost_m, lost_p) = (c.to_m.len(), c.to_p.len());
        c.to_m.clear();
        c.to_p.clear();
        c.reset = true;
        c.m_late = m_late;
        let stale_m = (mode_m == 2 && !c.last_to_m.is_empty()).then(|| c.last_to_m.clone());
        let stale_p = (mode_p == 2 && !c.last_to_p.is_empty()).then(|| c.last_to_p.clone());
        if let Some(b) = stale_m {
            self.stale_to_m.push_back((id, b));
        }
        if let Some(b) = stale_p {
            self.stale_to_p.push_back((id, b));
        }
        self.ev(|| {
            format!(
                "partition of connection {id}: {} bytes to the mirror arrive, {lost_m} lost; {} to \
                 the primary arrive, {lost_p} lost; mirror notices {}",
                pre_m.len(),
                pre_p.len(),
                if m_late { "late" } else { "now" }
            )
        });
        // What was already on its way arrives (it was sent before the cut).
        if !pre_m.is_empty() {
            self.m_receive(id, &pre_m, true)?;
        }
        if !pre_p.is_empty() {
            self.p_receive(id, &pre_p)?;
        }
        self.p_poll()?;
        self.m_poll()
    }

    /// Flips one bit of a byte in flight.
    fn corrupt(&mut self, rng: &mut SimRng<'_>) -> Act {
        let ids: Vec<(u64, bool)> = self
            .conns
            .iter()
            .flat_map(|c| [(c.id, true, c.to_m.len()), (c.id, false, c.to_p.len())])
            .filter(|x| x.2 > 0)
            .map(|x| (x.0, x.1))
            .collect();
        let Some(&(id, to_m)) = rng.pick(&ids) else {
            return Ok(());
        };
        let bit = rng.below(8) as u32;
        let u = rng.u64();
        let Some(c) = self.conn(id) else {
            return Ok(());
        };
        let pipe = if to_m { &mut c.to_m } else { &mut c.to_p };
        let at = (u % pipe.len() as u64) as usize;
        if let Some(b) = pipe.get_mut(at) {
            *b ^= 1 << bit;
        }
        self.stats.corruptions += 1;
        self.ev(|| {
            format!(
                "corrupted byte {at} in flight to the {} on connection {id}",
                side(to_m)
            )
        });
        Ok(())
    }

    /// A delayed copy of a frame of a connection that is gone turns up at an end.
    fn stale(&mut self, rng: &mut SimRng<'_>) -> Act {
        if rng.chance(1, 2) {
            let Some((id, bytes)) = self.stale_to_m.pop_front() else {
                return Ok(());
            };
            match &mut self.mlink {
                Some(ml) if self.variant == NetVariant::AcceptStale => {
                    // Sabotage: the bytes go to whatever session is current.
                    ml.dec.push(&bytes);
                    let cur = ml.conn;
                    self.ev(|| format!("stale frame of connection {id} taken by connection {cur}"));
                    self.m_decode()
                }
                _ => {
                    self.stats.stale_dropped += 1;
                    self.ev(|| format!("stale frame of connection {id} dropped by the mirror"));
                    Ok(())
                }
            }
        } else {
            if let Some((id, _)) = self.stale_to_p.pop_front() {
                self.stats.stale_dropped += 1;
                self.ev(|| format!("stale frame of connection {id} dropped by the primary"));
            }
            Ok(())
        }
    }

    /// Sessions that hear nothing for `DEAD_AFTER` close: a peer that went silent (power loss),
    /// a reset noticed late, a frame that can never complete (a corrupted length).
    fn timeout(&mut self) -> Act {
        if let Some(pl) = &self.plink {
            let stalled = pl.dec.buffered() > 0;
            let id = pl.conn;
            if let Some(c) = self.conns.iter().find(|c| c.id == id) {
                if c.reset
                    || (c.m_end == End::Closed && c.to_p.is_empty())
                    || (stalled && c.to_p.is_empty())
                {
                    self.stats.timeouts += 1;
                    self.ev(|| format!("primary: connection {id} timed out"));
                    self.p_close(true);
                }
            }
        }
        if let Some(ml) = &self.mlink {
            let stalled = ml.dec.buffered() > 0;
            let id = ml.conn;
            if let Some(c) = self.conns.iter().find(|c| c.id == id) {
                if c.reset
                    || (c.p_end == End::Closed && c.to_m.is_empty())
                    || (stalled && c.to_m.is_empty())
                {
                    self.stats.timeouts += 1;
                    self.ev(|| format!("mirror: connection {id} timed out"));
                    self.m_close(true);
                }
            }
        }
        Ok(())
    }

    // ---- the primary: workload and flusher (volume.rs) ---------------------------------------

    fn primary_op(&mut self, rng: &mut SimRng<'_>) -> Act {
        let Some(p) = self.primary.plan(rng) else {
            return Ok(());
        };
        // The sims' journals have no size limit: nothing to relieve.
        let seq = match self.psequencer.begin(&mut self.pjournal, &p.op, |_| {}) {
            sequencer::Begin::Apply { seq } => seq,
            sequencer::Begin::Refuse(r) => {
                // Nothing reached the journal, so the backing tree is not changed either.
                self.primary.unplan();
                return Err(self.pfault(format!("journal append refused: {r:?}")));
            }
        };
        if seq != self.primary.last_seq() + 1 {
            return Err(Fault::Bug(format!(
                "the primary's journal gave seq {seq} where {} was expected",
                self.primary.last_seq() + 1
            )));
        }
        self.ev(|| format!("primary appends {seq} {} ok={}", brief(&p.op), p.ok));
        self.primary.record(p.op, p.ok);
        self.stats.records += 1;
        let done = match self.psequencer.applied(&mut self.pjournal, seq, p.ok) {
            Ok(d) => d,
            Err(r) => return Err(self.pfault(format!("append of Abort failed: {r:?}"))),
        };
        if done.aborted {
            self.primary.record(Op::Abort { seq }, false);
            self.stats.records += 1;
        }
        self.psettled = done.last;
        Ok(())
    }

    fn p_flusher(&mut self, rng: &mut SimRng<'_>) -> Act {
        if self.pplan.is_none() {
            self.pplan = self.pjournal.sync_plan();
            if self.pplan.is_none() {
                return self.p_release();
            }
            if rng.chance(1, 2) {
                return Ok(());
            }
        }
        match self.pplan.take() {
            Some(plan) => self.p_run_plan(&plan),
            None => Ok(()),
        }
    }

    fn p_run_plan(&mut self, plan: &SyncPlan<SimFile>) -> Act {
        let outcome = flush::sync(plan);
        if let flush::Flushed::Poisoned { why, .. } =
            flush::complete(&mut self.pjournal, plan, outcome)
        {
            return Err(self.pfault(why));
        }
        self.p_durable_ever = self.p_durable_ever.max(self.pjournal.durable_seq());
        self.p_release()
    }

    /// Frees segments: a remote mirror needs every record after its acknowledged durable
    /// position (`MirrorShared::needed_after`).
    fn p_release(&mut self) -> Act {
        flush::release(&mut self.pjournal, self.p_mirror_durable)
            .map(drop)
            .map_err(|e| self.pfault(format!("release of segments failed: {e}")))
    }

    fn p_flush_all(&mut self) -> Act {
        loop {
            if self.pplan.is_none() {
                self.pplan = self.pjournal.sync_plan();
            }
            match self.pplan.take() {
                Some(plan) => self.p_run_plan(&plan)?,
                None => return Ok(()),
            }
        }
    }

    // ---- the primary's link (remote.rs) ------------------------------------------------------

    /// Connects if there is no session; otherwise sends the next batch if the window allows.
    fn p_send(&mut self) -> Act {
        self.p_poll()?;
        let Some(pl) = &self.plink else {
            if self.down == 0 {
                self.p_connect();
            }
            return Ok(());
        };
        if pl.phase == PPhase::Streaming && self.p_on_udp() {
            self.p_durable_ever = self.p_durable_ever.max(self.pjournal.durable_seq());
            let limit = self.pjournal.durable_seq().min(self.psettled);
            return self.p_send_udp(limit);
        }
        if pl.phase != PPhase::Streaming || !pl.sender.may_send() {
            return Ok(());
        }
        // A rollover fsyncs the segment it closes, so the journal's durable position can move
        // at an append as well as at a planned sync: what it says is durable, is.
        self.p_durable_ever = self.p_durable_ever.max(self.pjournal.durable_seq());
        let Some(pl) = &self.plink else {
            return Ok(());
        };
        let limit = self.pjournal.durable_seq().min(self.psettled);
        if pl.sender.next_send() > limit {
            return Ok(());
        }
        if pl.reader.next_seq() < self.pjournal.first_seq() && pl.pending.is_none() {
            return Err(Fault::Bug(format!(
                "the primary released record {} that its link still has to send (journal starts \
                 at {})",
                pl.reader.next_seq(),
                self.pjournal.first_seq()
            )));
        }
        let Some(pl) = self.plink.as_mut() else {
            return Ok(());
        };
        // The same batching as the binary's link thread (`core::stream::take_batch`).
        let (reader, journal) = (&mut pl.reader, &self.pjournal);
        let batch = crate::stream::take_batch(&mut pl.pending, self.batch_bytes, || {
            if reader.next_seq() > limit {
                return Ok(None);
            }
            read_next(reader, journal, limit)
        })
        .map_err(|e| Fault::Bug(format!("the primary cannot read its journal: {e}")))?;
        let (Some(first), Some(last)) = (batch.first().map(|r| r.seq), batch.last().map(|r| r.seq))
        else {
            return Ok(());
        };
        if first != pl.sender.next_send() {
            return Err(Fault::Bug(format!(
                "the primary's reader is at record {first} but the sender's next is {}",
                pl.sender.next_send()
            )));
        }
        for r in &batch {
            if self.primary.op_at(r.seq) != Some(&r.op) {
                return Err(Fault::Bug(format!(
                    "the primary read record {} as {:?}; it wrote {:?}",
                    r.seq,
                    r.op,
                    self.primary.op_at(r.seq)
                )));
            }
        }
        let id = pl.conn;
        let settled = self.psettled;
        let msg = Msg::Records {
            settled,
            records: batch,
        };
        let n = self.send_to_m(id, msg);
        if let Some(pl) = self.plink.as_mut() {
            pl.sender.sent(last, n);
        }
        self.stats.batches += 1;
        self.ev(|| format!("primary sends {first}..={last} (settled {settled}, {n} bytes)"));
        Ok(())
    }

    fn p_ping(&mut self) -> Act {
        if let Some(pl) = self.plink.as_mut() {
            if pl.phase == PPhase::Streaming {
                pl.nonce += 1;
                let (id, nonce) = (pl.conn, pl.nonce);
                self.send_to_m(id, Msg::Ping { nonce });
            }
        }
        Ok(())
    }

    fn p_connect(&mut self) {
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.push(Conn::new(id));
        let sender = Sender::new(sim_history(), self.window);
        let span = self.span();
        let hello = sender.hello(span, self.compress, "sim-primary");
        self.plink = Some(PLink {
            conn: id,
            sender,
            dec: Decoder::new(),
            phase: PPhase::AwaitWelcome,
            reader: Reader::new(1),
            pending: None,
            nonce: 0,
            udp: None,
        });
        self.ev(|| {
            format!(
                "primary connects: connection {id} (journal {}..{})",
                span.first_held, span.next_seq
            )
        });
        self.send_to_m(id, hello);
    }

    fn span(&self) -> JournalSpan {
        JournalSpan {
            first_held: self.pjournal.first_seq(),
            next_seq: self.pjournal.next_seq(),
        }
    }

    /// The primary's session ends (`fin`: its socket is closed normally).
    fn p_close(&mut self, fin: bool) {
        if let Some(pl) = self.plink.take() {
            let id = pl.conn;
            if let Some(c) = self.conn(id) {
                c.p_end = End::Closed;
                c.p_fin = fin;
            }
            self.ev(|| format!("primary: connection {id} closed"));
        }
    }

    /// Notices a reset connection, or the end of the mirror's stream.
    fn p_poll(&mut self) -> Act {
        let Some(pl) = &self.plink else {
            return Ok(());
        };
        let id = pl.conn;
        let close = match self.conns.iter().find(|c| c.id == id) {
            None => true,
            Some(c) => c.reset || (c.m_end == End::Closed && c.m_fin && c.to_p.is_empty()),
        };
        if close {
            self.p_close(true);
        }
        Ok(())
    }

    fn p_receive(&mut self, id: u64, bytes: &[u8]) -> Act {
        match self.plink.as_mut() {
            Some(pl) if pl.conn == id => pl.dec.push(bytes),
            // Nobody listens on that connection any more: the bytes are dropped.
            _ => return self.p_poll(),
        }
        self.p_decode()?;
        self.p_poll()
    }

    fn p_decode(&mut self) -> Act {
        loop {
            let Some(pl) = self.plink.as_mut() else {
                return Ok(());
            };
            let id = pl.conn;
            match pl.dec.next_msg() {
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.stats.refused_frames += 1;
                    self.ev(|| format!("primary refuses a frame on connection {id}: {e}"));
                    self.p_close(true);
                    return Ok(());
                }
                Ok(Some(msg)) => {
                    let want = self.conn(id).and_then(|c| c.p_expect.pop_front());
                    if want.as_ref() != Some(&msg) {
                        return Err(Fault::Bug(format!(
                            "the primary decoded a message that was not the next one sent on \
                             connection {id} (a corrupted or stale frame was accepted): got {}, \
                             sent {:?}",
                            brief_msg(&msg),
                            want.as_ref().map(brief_msg)
                        )));
                    }
                    self.p_handle(id, msg)?;
                }
            }
        }
    }

    fn p_handle(&mut self, id: u64, msg: Msg) -> Act {
        match msg {
            Msg::Welcome { .. } => self.p_welcome(id, &msg),
            Msg::Ack { .. } => {
                let Some(pl) = self.plink.as_mut() else {
                    return Ok(());
                };
                match pl.sender.on_ack(&msg) {
                    Ok(p) => {
                        self.p_mirror_durable = p.durable;
                        self.p_udp_delivered(p.received);
                        Ok(())
                    }
                    Err(e) => {
                        self.stats.ack_refusals += 1;
                        Err(Fault::Bug(format!(
                            "the primary refused an acknowledgement of a correct mirror: {e}"
                        )))
                    }
                }
            }
            Msg::Ping { nonce } => {
                self.send_to_m(id, Msg::Pong { nonce });
                Ok(())
            }
            Msg::Pong { .. } => Ok(()),
            Msg::UdpAccept { port } => self.p_udp_accept(port),
            Msg::UdpNak { naks } => self.p_udp_nak(&naks),
            Msg::Error { code, message } => {
                if code == error_code::BUSY {
                    self.stats.busy += 1;
                    self.ev(|| "primary: the mirror is busy".to_string());
                    self.p_close(true);
                    Ok(())
                } else {
                    Err(Fault::Bug(format!(
                        "the mirror refused the stream (code {code}): {message}"
                    )))
                }
            }
            other => Err(Fault::Bug(format!(
                "the mirror sent message type {} to the primary",
                other.type_code()
            ))),
        }
    }

    fn p_welcome(&mut self, id: u64, msg: &Msg) -> Act {
        let span = self.span();
        let no_settled = self.variant == NetVariant::RemoteNoSettledOnStart;
        let settled = self.psettled;
        let Some(pl) = self.plink.as_mut() else {
            return Ok(());
        };
        if pl.phase != PPhase::AwaitWelcome {
            return Err(Fault::Bug("a second Welcome".into()));
        }
        let start = pl
            .sender
            .on_welcome(msg, span, 1, None, None)
            .map_err(|e| Fault::Bug(format!("the primary refused the mirror's Welcome: {e}")))?;
        let Start::Resume { from } = start else {
            return Err(Fault::Bug(format!(
                "the primary decided {start:?} for a consistent mirror (journal {}..{}): it \
                 released records the mirror needs, or the mirror is ahead of it",
                span.first_held, span.next_seq
            )));
        };
        pl.phase = PPhase::Streaming;
        pl.reader = Reader::new(from);
        pl.pending = None;
        let start_msg = Sender::start_msg(&start);
        self.p_mirror_durable = from - 1;
        self.stats.connections += 1;
        self.ev(|| format!("primary: connection {id} resumes at {from}"));
        if let Some(m) = start_msg {
            self.send_to_m(id, m);
        }
        if !no_settled {
            // The settled watermark, even with nothing to send: a mirror that restarted holds
            // its last record back until it hears it.
            self.send_to_m(
                id,
                Msg::Records {
                    settled,
                    records: Vec::new(),
                },
            );
        }
        self.p_offer_udp(id, from);
        Ok(())
    }

    // ---- the mirror daemon's sessions (net/serve/session.rs) ---------------------------------------------

    /// Bytes arrive at the mirror on connection `id` (`late`: sent before a reset).
    fn m_receive(&mut self, id: u64, bytes: &[u8], late: bool) -> Act {
        let Some(c) = self.conn(id) else {
            return Ok(());
        };
        if c.reset && !late {
            return Ok(());
        }
        match c.m_end {
            End::Closed => return self.m_poll(),
            End::Pending => {
                if !self.m_admit(id)? {
                    return Ok(());
                }
            }
            End::Open => {}
        }
        if let Some(ml) = self.mlink.as_mut() {
            ml.dec.push(bytes);
        }
        self.m_decode()?;
        self.m_poll()
    }

    /// `serve::session`'s admission of a new connection through the core's [`Slot`]: it takes
    /// the free slot, or displaces the primary's earlier session (the shell shuts that
    /// session's socket down and waits until its threads ended; here it ends at once), or is
    /// refused with `BUSY`. The shell decides after reading `Hello`; the simulation when the
    /// connection's first bytes arrive (all its connections are the one primary's, and the
    /// first message it sends on one is always `Hello`). `Ok(false)`: refused.
    fn m_admit(&mut self, id: u64) -> Result<bool, Fault> {
        let conn = self.mslot.number();
        for _ in 0..2 {
            match self.mslot.ask(&SIM_PRIMARY, conn) {
                Admission::Take => {
                    if self.mlink.is_some() {
                        return Err(Fault::Bug(
                            "the slot was free while a session still ran".into(),
                        ));
                    }
                    if let Some(c) = self.conn(id) {
                        c.m_end = End::Open;
                    }
                    self.mlink = Some(MLink {
                        conn: id,
                        slot: conn,
                        dec: Decoder::new(),
                        session: None,
                        udp: None,
                    });
                    self.ev(|| format!("mirror accepts connection {id}"));
                    return Ok(true);
                }
                Admission::Displace => {
                    let old = self.mlink.as_ref().map(|m| (m.conn, m.slot));
                    let holder = self.mslot.holder().map(|h| h.conn);
                    if !self.mslot.tell() || old.map(|o| o.1) != holder {
                        return Err(Fault::Bug(format!(
                            "connection {id} would displace a session that was told to end                              already, or that is not the one running ({old:?}, slot {holder:?})"
                        )));
                    }
                    if let Some((old, _)) = old {
                        self.stats.displaced += 1;
                        self.m_displaced.insert(old);
                        self.ev(|| {
                            format!(
                                "mirror: connection {id} displaces the session of connection {old}"
                            )
                        });
                    }
                    // Its socket shut down: the primary's end sees it closed.
                    self.m_close(true);
                }
                Admission::Busy | Admission::Superseded => {
                    self.stats.busy += 1;
                    self.m_busy(id);
                    return Ok(false);
                }
            }
        }
        Err(Fault::Bug(format!(
            "connection {id}: the displaced session did not release the slot"
        )))
    }

    /// `serve`: refuses connection `id` with `BUSY` and closes it.
    fn m_busy(&mut self, id: u64) {
        let m = Msg::Error {
            code: error_code::BUSY,
            message: "another primary is connected to this mirror".into(),
        };
        // Sent before the end is closed.
        let bytes = m.encode(self.compress);
        let Some(c) = self.conn(id) else {
            return;
        };
        c.m_end = End::Closed;
        c.m_fin = true;
        c.to_m.clear();
        if !c.reset {
            c.to_p.extend(bytes.iter().copied());
            c.p_expect.push_back(m);
        }
        self.ev(|| format!("mirror: connection {id} refused (busy)"));
    }

    fn m_decode(&mut self) -> Act {
        loop {
            let Some(ml) = self.mlink.as_mut() else {
                return Ok(());
            };
            let id = ml.conn;
            match ml.dec.next_msg() {
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.stats.refused_frames += 1;
                    self.ev(|| format!("mirror refuses a frame on connection {id}: {e}"));
                    self.m_close(true);
                    return Ok(());
                }
                Ok(Some(msg)) => {
                    if self.m_displaced.contains(&id) {
                        return Err(Fault::Bug(format!(
                            "the mirror acted on a message of connection {id}, whose session \
                             a newer connection displaced: {}",
                            brief_msg(&msg)
                        )));
                    }
                    let want = self.conn(id).and_then(|c| c.m_expect.pop_front());
                    if want.as_ref() != Some(&msg) {
                        return Err(Fault::Bug(format!(
                            "the mirror decoded a message that was not the next one sent on \
                             connection {id} (a corrupted or stale frame was accepted): got {}, \
                             sent {:?}",
                            brief_msg(&msg),
                            want.as_ref().map(brief_msg)
                        )));
                    }
                    self.m_handle(id, msg)?;
                }
            }
        }
    }

    /// The mirror's session ends (`fin`: its socket is closed normally).
    fn m_close(&mut self, fin: bool) {
        if let Some(ml) = self.mlink.take() {
            let id = ml.conn;
            // The session has ended (the shell: its `stream` returned, its threads joined).
            self.mslot.release(ml.slot);
            if let Some(c) = self.conn(id) {
                c.m_end = End::Closed;
                c.m_fin = fin;
            }
            self.ev(|| format!("mirror: connection {id} closed"));
        }
    }

    /// Notices a reset connection (unless only at a timeout), or the end of the primary's stream.
    fn m_poll(&mut self) -> Act {
        let Some(ml) = &self.mlink else {
            return Ok(());
        };
        let id = ml.conn;
        let close = match self.conns.iter().find(|c| c.id == id) {
            None => true,
            Some(c) => {
                (c.reset && !c.m_late) || (c.p_end == End::Closed && c.p_fin && c.to_m.is_empty())
            }
        };
        if close {
            self.m_close(true);
        }
        Ok(())
    }

    /// Refuses the stream with a link error: the peer is told why, the connection closes.
    fn m_refuse(&mut self, id: u64, e: &crate::link::LinkError) {
        self.send_to_p(id, e.to_msg());
        self.m_close(true);
    }

    fn m_handle(&mut self, id: u64, msg: Msg) -> Act {
        match msg {
            Msg::Hello { .. } => {
                if self.mlink.as_ref().is_some_and(|m| m.session.is_some()) {
                    return Err(Fault::Bug("a second Hello".into()));
                }
                // `settle_journal`: durable through its end, so `durable` is where it continues.
                self.m_flush_all()?;
                let copy = MirrorCopy {
                    state: MirrorState::Consistent,
                    history: sim_history(),
                    durable: self.mdurable,
                    applied: self.worker.applier().cursor().applied,
                    sync_id: 0,
                    promoted: false,
                    foreign: false,
                    first_held: self.mjournal.first_seq(),
                };
                let mut session = Session::new(copy, RESERVED, "sim-mirror", 0);
                let welcome = session.on_hello(&msg).map_err(|e| {
                    Fault::Bug(format!("the mirror refused a Hello of its primary: {e}"))
                })?;
                if let Some(ml) = self.mlink.as_mut() {
                    ml.session = Some(session);
                }
                let d = self.mdurable;
                self.ev(|| format!("mirror welcomes connection {id}: durable {d}"));
                self.send_to_p(id, welcome);
                Ok(())
            }
            Msg::Start { .. } => {
                let next = self.mjournal.next_seq();
                let Some(session) = self.mlink.as_mut().and_then(|m| m.session.as_mut()) else {
                    return Err(Fault::Bug("Start before Hello".into()));
                };
                match session.on_start(&msg) {
                    Ok(Begin::Resume { seq, .. }) if seq == next => Ok(()),
                    Ok(b) => Err(Fault::Bug(format!(
                        "the mirror was told {b:?} but its journal continues at {next}"
                    ))),
                    Err(e) => Err(Fault::Bug(format!("the mirror refused Start: {e}"))),
                }
            }
            Msg::Records { settled, records } if self.variant == NetVariant::AcceptStale => {
                // Sabotage, outside the session: no sequence check.
                if !self.mlink.as_ref().is_some_and(MLink::streaming) {
                    return Err(Fault::Bug("records before Start".into()));
                }
                self.m_store(&records, settled)
            }
            msg => {
                let Some(session) = self.mlink.as_mut().and_then(|m| m.session.as_mut()) else {
                    return Err(Fault::Bug(format!(
                        "message type {} before Hello",
                        msg.type_code()
                    )));
                };
                match session.on_message(&msg) {
                    Ok(Incoming::Append { records, settled }) => {
                        let settled = self.m_session_settled(settled);
                        self.m_store(records, settled)
                    }
                    Ok(Incoming::UdpOffer { first }) => self.m_udp_offer(id, first),
                    Ok(Incoming::UdpSent { through }) => self.m_udp_sent(through),
                    Ok(Incoming::Reply(reply)) => {
                        self.send_to_p(id, reply);
                        Ok(())
                    }
                    Ok(Incoming::Nothing) => Ok(()),
                    Ok(Incoming::PeerError { code, message }) => Err(Fault::Bug(format!(
                        "the primary reported an error to the mirror (code {code}): {message}"
                    ))),
                    // The simulated mirror never diverges, so it never reintegrates.
                    Ok(
                        i @ (Incoming::SendTail { .. }
                        | Incoming::Fetch { .. }
                        | Incoming::Reintegrated { .. }),
                    ) => Err(Fault::Bug(format!(
                        "the mirror's session asked for something this simulation never does: {i:?}"
                    ))),
                    Err(e) => {
                        // A correct primary never sends a gap or a message out of place.
                        self.m_refuse(id, &e);
                        Err(Fault::Bug(format!("the mirror refused a message: {e}")))
                    }
                }
            }
        }
    }

    /// `serve::append`: stores a batch the session took (or, sabotaged, any batch) under the
    /// primary's seqs; the applier may go up to the primary's `settled`.
    fn m_store(&mut self, records: &[Record], settled: u64) -> Act {
        let sabotage = self.variant == NetVariant::AcceptStale;
        // Invariant 10: records are stored only from the connection holding the slot, never
        // from one a newer connection displaced.
        match &self.mlink {
            Some(ml)
                if !self.m_displaced.contains(&ml.conn)
                    && self
                        .mslot
                        .holder()
                        .is_some_and(|h| h.conn == ml.slot && !h.told) => {}
            ml => {
                let (conn, slot) = (ml.as_ref().map(|m| m.conn), ml.as_ref().map(|m| m.slot));
                let holder = self.mslot.holder().cloned();
                return Err(Fault::Bug(format!(
                    "the mirror stores records from connection {conn:?} (slot {slot:?}), which \
                     does not hold the slot ({holder:?}) or was displaced"
                )));
            }
        }
        for r in records {
            let seq = if sabotage {
                self.mjournal.next_seq()
            } else {
                r.seq
            };
            // The mirror never holds a change the primary's journal could lose.
            if seq > self.p_durable_ever || self.primary.op_at(seq) != Some(&r.op) {
                return Err(Fault::Bug(format!(
                    "the mirror stores {:?} as record {seq}; the primary wrote {:?} there and \
                     reported records through {} durable",
                    r.op,
                    self.primary.op_at(seq),
                    self.p_durable_ever
                )));
            }
            let res = if sabotage {
                self.mjournal.append(&r.op)
            } else {
                self.mjournal.append_at(r.seq, &r.op)
            };
            if let Err(e) = res {
                return Err(self.mfault(format!("cannot store record {}: {e}", r.seq)));
            }
        }
        // The session passes the primary's latest word; the `ServeStaleSettled` variant keeps
        // the largest ever heard instead.
        self.msettled = if self.variant == NetVariant::ServeStaleSettled {
            self.msettled.max(settled)
        } else {
            settled
        };
        if let (Some(a), Some(b)) = (records.first(), records.last()) {
            let (a, b) = (a.seq, b.seq);
            self.ev(|| format!("mirror stores {a}..={b} (settled {settled})"));
        }
        Ok(())
    }

    /// `serve::send_acks`: the session decides whether an ack is due (the positions changed, or
    /// a heartbeat) and clamps what it carries.
    fn m_ack(&mut self, heartbeat: bool) -> Act {
        self.m_poll()?;
        self.m_udp_naks()?;
        let received = self.mjournal.next_seq() - 1;
        let c = self.worker.applier().cursor();
        let raw = Positions {
            received,
            // Sabotage: the broken mirror reports records durable as soon as they are received.
            durable: if self.variant == NetVariant::AckBeforeDurable {
                received
            } else {
                self.mdurable
            },
            applied: c.applied,
            checkpoint: c.checkpoint,
        };
        let durable = raw.durable.min(received);
        if self.mlink.as_ref().is_some_and(MLink::streaming)
            && durable > self.mjournal.durable_seq()
        {
            return Err(Fault::Bug(format!(
                "the mirror acknowledged records through {durable} as durable, but its journal \
                 is durable only through {}",
                self.mjournal.durable_seq()
            )));
        }
        let Some(ml) = self.mlink.as_mut() else {
            return Ok(());
        };
        let id = ml.conn;
        let Some(ack) = ml.session.as_mut().and_then(|s| s.ack(raw, heartbeat).ack) else {
            return Ok(());
        };
        if let Msg::Ack { durable, .. } = ack {
            self.m_acked_durable = self.m_acked_durable.max(durable);
        }
        self.send_to_p(id, ack);
        Ok(())
    }

    // ---- the mirror daemon's flusher and worker ----------------------------------------------

    fn m_flusher(&mut self, rng: &mut SimRng<'_>) -> Act {
        if self.mplan.is_none() {
            self.mplan = self.mjournal.sync_plan();
            if self.mplan.is_none() {
                return self.m_release();
            }
            if rng.chance(1, 2) {
                return Ok(());
            }
        }
        match self.mplan.take() {
            Some(plan) => self.m_run_plan(&plan),
            None => Ok(()),
        }
    }

    fn m_run_plan(&mut self, plan: &SyncPlan<SimFile>) -> Act {
        let outcome = flush::sync(plan);
        if let flush::Flushed::Poisoned { why, .. } =
            flush::complete(&mut self.mjournal, plan, outcome)
        {
            return Err(self.mfault(why));
        }
        self.mdurable = self.mjournal.durable_seq();
        self.m_release()
    }

    /// The daemon's tree is a local mirror: it needs every record after its checkpoint.
    fn m_release(&mut self) -> Act {
        let keep = self.worker.applier().cursor().checkpoint;
        flush::release(&mut self.mjournal, keep)
            .map(drop)
            .map_err(|e| self.mfault(format!("release of segments failed: {e}")))
    }

    fn m_flush_all(&mut self) -> Act {
        loop {
            if self.mplan.is_none() {
                self.mplan = self.mjournal.sync_plan();
            }
            match self.mplan.take() {
                Some(plan) => self.m_run_plan(&plan)?,
                None => return Ok(()),
            }
        }
    }

    /// The worker was held up (the daemon busy elsewhere, the machine loaded): a second passes
    /// before its next turn, so its periodic checkpoint falls due if it applied anything since.
    fn m_pause(&mut self) -> Act {
        self.now += CHECKPOINT_EVERY;
        self.m_work(1)
    }

    /// Up to `n` worker turns. Returns early when the worker is idle.
    fn m_work(&mut self, n: u64) -> Act {
        for _ in 0..n {
            if !self.m_one()? {
                break;
            }
        }
        Ok(())
    }

    /// One [`Worker::turn`] at the simulated time, with the invariants checked on the item the
    /// feed hands it (before it is applied) and on the tree after it; false if the worker was
    /// idle. Nobody waits on the daemon's checkpoint (`want_durable` 0): `--ack sync` primaries
    /// get it from the worker's checkpoint when idle.
    fn m_one(&mut self) -> Result<bool, Fault> {
        if self.pending_sync.as_mut().is_some_and(PendingSync::due) {
            return self.report_sync();
        }
        let before = self.worker.applier().cursor().checkpoint;
        // `next` is asked only when no checkpoint is due, so the applier is as it is now then.
        let expected = self.worker.applier().next_seq();
        let replay = self.worker.applier().in_replay();
        let tracing = self.trace.is_some();
        let mut handed = None;
        // A transient cursor write error, on some turns of some seeds: armed for this turn only.
        if let Some(g) = &mut self.glitches {
            if g.next().is_multiple_of(16) {
                self.cursor.glitch.arm(1 + g.next() % 2);
            }
        }
        let Sim {
            worker,
            tree,
            cursor,
            feed,
            mjournal,
            mdurable,
            msettled,
            primary,
            m_consumed_ever,
            now,
            ..
        } = self;
        let turn = worker.turn(tree, cursor, *now, 0, || {
            let item = feed
                .next(mjournal, *mdurable, *msettled)
                .map_err(|e| Fault::Bug(format!("the mirror cannot read its journal: {e}")))?;
            let seq = match &item {
                Item::Wait => return Ok(item),
                Item::Skip(s) => *s,
                Item::Apply(r) => r.seq,
            };
            if seq > *mdurable {
                return Err(Fault::Bug(format!(
                    "the mirror was handed record {seq} but its journal is durable only through \
                     {mdurable}"
                )));
            }
            if seq != expected {
                return Err(Fault::Bug(format!(
                    "the mirror was handed record {seq} where {expected} was next"
                )));
            }
            if !replay && seq <= *m_consumed_ever {
                return Err(Fault::Bug(format!(
                    "record {seq} would be applied a second time in strict mode (the mirror \
                     already consumed records through {m_consumed_ever})"
                )));
            }
            if let Item::Apply(rec) = &item {
                if primary.op_at(rec.seq) != Some(&rec.op) {
                    return Err(Fault::Bug(format!(
                        "the mirror applies {:?} as record {}; the primary wrote {:?}",
                        rec.op,
                        rec.seq,
                        primary.op_at(rec.seq)
                    )));
                }
                // Only final records: never one the primary aborted.
                if primary.op_at(rec.seq + 1) == Some(&Op::Abort { seq: rec.seq }) {
                    return Err(Fault::Bug(format!(
                        "the mirror applies record {} ({}), which the primary aborted (record {})",
                        rec.seq,
                        brief(&rec.op),
                        rec.seq + 1
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
            Ok(item)
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
                // Invariant 9: idle, everything applied is checkpointed.
                let c = self.worker.applier().cursor();
                if c.applied > c.checkpoint {
                    return Err(Fault::Bug(format!(
                        "the daemon's worker is idle with records through {} applied but only \
                         through {} checkpointed",
                        c.applied, c.checkpoint
                    )));
                }
                return Ok(false);
            }
            Turn::Checkpointed { checkpoint } => {
                self.m_reported_checkpoint = self.m_reported_checkpoint.max(checkpoint);
                if checkpoint != before {
                    self.ev(|| format!("mirror checkpoint {checkpoint}"));
                    self.stats.checkpoints += 1;
                }
                return Ok(true);
            }
            // The worker keeps what failed and backs off; the sim's clock honours the back-off.
            Turn::Retry { after, error, .. } if glitched && !self.mkill.is_dead() => {
                self.stats.retries += 1;
                self.now += after;
                self.ev(|| format!("mirror: {error}; retry in {after:?}"));
                return Ok(true);
            }
            // A kill or power loss strikes the tree or the cursor as an I/O error; anything
            // else is a bug.
            Turn::Retry { error, .. } => return Err(self.mfault(error)),
            Turn::Diverged { reason } => {
                return Err(self.mfault(format!(
                    "{reason} (in {} mode)",
                    if replay { "replay" } else { "strict" }
                )))
            }
            Turn::Applied {
                seq, checkpoint, ..
            } => {
                self.m_reported_checkpoint = self.m_reported_checkpoint.max(checkpoint);
                self.stats.applied += 1;
                seq
            }
            Turn::Skipped { seq } => {
                self.stats.skipped += 1;
                seq
            }
        };
        self.m_consumed_ever = self.m_consumed_ever.max(seq);
        if !self.worker.applier().in_replay() {
            self.compare(seq).map_err(Fault::Bug)?;
        }
        Ok(true)
    }

    /// The worker's checkpoint thread (see `offload`).
    fn start_sync(&mut self, upto: u64) -> Result<bool, Fault> {
        self.ev(|| format!("mirror sync started at {upto}"));
        let sync = PendingSync::start(&mut self.tree, upto);
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
                self.m_reported_checkpoint = self.m_reported_checkpoint.max(checkpoint);
                if checkpoint != before {
                    self.ev(|| format!("mirror checkpoint {checkpoint}"));
                    self.stats.checkpoints += 1;
                }
                Ok(true)
            }
            Turn::Retry { after, error, .. } if glitched && !self.mkill.is_dead() => {
                self.stats.retries += 1;
                self.now += after;
                self.ev(|| format!("mirror: {error}; retry in {after:?}"));
                Ok(true)
            }
            Turn::Retry { error, .. } => Err(self.mfault(error)),
            other => Err(self.mfault(format!("the end of a sync gave {other:?}"))),
        }
    }

    /// The mirror's tree against the primary's reference state after record `seq`.
    fn compare(&mut self, seq: u64) -> Result<(), String> {
        self.stats.comparisons += 1;
        let Some(want) = self.primary.state_at(seq) else {
            return Err(format!(
                "the mirror is at record {seq}, beyond the primary's last record {}",
                self.primary.last_seq()
            ));
        };
        let diff = self.tree.snapshot().diff(&want.snapshot(), 8);
        if diff.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the mirror after record {seq} is not the primary's state after it:\n  {}",
                diff.join("\n  ")
            ))
        }
    }

    // ---- restarts -----------------------------------------------------------------------------

    /// The mirror daemon died (kill, or power loss of its machine): restart it as `serve` does.
    fn m_restart(&mut self, rng: &mut SimRng<'_>) -> Result<(), String> {
        for round in 0..50 {
            let power = self.m_power_now || (self.mkill.is_dead() && self.m_kill_is_power);
            self.m_power_now = false;
            self.mkill.revive();
            self.mplan = None;
            // Its sockets: closed by the kernel after a kill, silent after a power loss.
            self.m_close(!power);
            self.mslot = Slot::default();
            for c in &mut self.conns {
                if c.m_end == End::Pending {
                    c.m_end = End::Closed;
                    c.m_fin = !power;
                }
            }
            if power {
                self.stats.mirror_crashes += 1;
                self.mstore.crash(&mut || rng.u64());
                let keep_live = rng.chance(1, 2);
                self.cursor.mem.crash(keep_live);
                self.tree
                    .crash(rng)
                    .map_err(|e| self.fail(format!("mirror tree crash: {e}")))?;
                self.m_journal_unclean = true;
                self.m_cursor_unclean = true;
            } else {
                self.stats.mirror_kills += 1;
            }
            let (c, a) = (
                self.worker.applier().cursor().checkpoint,
                self.worker.applier().cursor().applied,
            );
            self.ev(|| {
                format!(
                    "=== mirror {} (checkpoint {c}, applied {a})",
                    if power { "power loss" } else { "killed" }
                )
            });
            if round < 3 && rng.chance(1, 4) {
                self.arm(rng, true);
            }
            if self.m_start()? {
                return Ok(());
            }
        }
        Err(self.fail("the mirror's recovery makes no progress"))
    }

    /// One start of the mirror daemon; `Ok(false)` if it died again.
    fn m_start(&mut self) -> Result<bool, String> {
        let store = SimStore {
            mem: self.mstore.clone(),
            kill: self.mkill.clone(),
        };
        let (journal, report) = match Journal::open(store, self.mcfg.clone()) {
            Ok(x) => x,
            Err(_) if self.mkill.is_dead() => return Ok(false),
            Err(e) => return Err(self.fail(format!("the mirror's journal does not recover: {e}"))),
        };
        let end = journal.next_seq() - 1;
        if !self.m_journal_unclean && report.torn_bytes > 0 {
            return Err(self.fail(format!(
                "after a kill of the mirror its journal recovery cut {} bytes",
                report.torn_bytes
            )));
        }
        // Every record acknowledged durable survives.
        if end < self.m_acked_durable {
            return Err(self.fail(format!(
                "the mirror acknowledged records through {} as durable, but after a power loss \
                 its journal ends at {end}",
                self.m_acked_durable
            )));
        }
        if end < self.m_consumed_ever {
            return Err(self.fail(format!(
                "the mirror consumed records through {}, but after a restart its journal ends at \
                 {end}",
                self.m_consumed_ever
            )));
        }
        check_contents(&journal, &self.primary, self.p_durable_ever)
            .map_err(|e| self.fail(format!("the mirror's journal after a restart: {e}")))?;
        self.mjournal = journal;
        self.m_journal_unclean = false;
        // `sync_journal`: recovery synced what it found; it is all durable.
        self.mdurable = self.mjournal.durable_seq();
        if self.mdurable != end {
            return Err(self.fail(format!(
                "the mirror's journal ends at {end} but is durable through {}",
                self.mdurable
            )));
        }
        // The daemon's rule (`session::settled_at_start`, which `site::engine` uses): the last
        // record is held back until the primary says, unless it is a final `Abort`.
        self.msettled = match self.variant {
            NetVariant::ServeRestartSettled => end.saturating_sub(1),
            _ => session::settled_at_start(end, report.last.as_ref(), false),
        };
        let opened = match Applier::open(&mut self.cursor, self.m_cursor_unclean, end) {
            Ok(a) => a,
            Err(_) if self.mkill.is_dead() => return Ok(false),
            Err(e) => return Err(self.fail(format!("the mirror cannot read its cursor: {e}"))),
        };
        self.m_cursor_unclean = false;
        let Some(applier) = opened else {
            return Err(self.fail("the mirror's cursor is lost"));
        };
        let c = applier.cursor();
        // Invariant 9: what the worker reported checkpointed survived.
        if c.checkpoint < self.m_reported_checkpoint {
            return Err(self.fail(format!(
                "after a restart the mirror's checkpoint is {}, but its worker had reported \
                 records through {} checkpointed",
                c.checkpoint, self.m_reported_checkpoint
            )));
        }
        if c.checkpoint > end || c.applied > end {
            return Err(self.fail(format!(
                "the mirror's cursor (checkpoint {}, applied {}) is beyond its journal's end {end}",
                c.checkpoint, c.applied
            )));
        }
        if c.applied + 1 < self.mjournal.first_seq() {
            return Err(self.fail(format!(
                "the mirror resumes at record {}, but its journal starts at {}",
                c.applied + 1,
                self.mjournal.first_seq()
            )));
        }
        // A new process: a new worker.
        let worker = Worker::new(applier, self.now, true);
        self.worker = if self.offload {
            worker.offload_checkpoints()
        } else {
            worker
        };
        // The process died: a sync it had started is gone with it.
        self.pending_sync = None;
        self.feed = Feed::new(
            self.worker.applier().next_seq(),
            self.variant == NetVariant::ApplyBeforeFinal,
        );
        let (s, fs) = (self.msettled, self.mjournal.first_seq());
        self.ev(|| {
            format!(
                "mirror restarted: journal {fs}..={end}, settled {s}, resumes at {} (checkpoint \
                 {})",
                c.applied + 1,
                c.checkpoint
            )
        });
        Ok(true)
    }

    /// The primary died (kill, or power loss): restart it as `mount` does.
    fn p_restart(&mut self, rng: &mut SimRng<'_>) -> Result<(), String> {
        for round in 0..50 {
            let power = self.p_power_now || (self.pkill.is_dead() && self.p_kill_is_power);
            self.p_power_now = false;
            self.pkill.revive();
            self.pplan = None;
            self.p_close(!power);
            self.p_mirror_durable = 0;
            if power {
                self.stats.primary_crashes += 1;
                self.pstore.crash(&mut || rng.u64());
                self.p_unclean = true;
            } else {
                self.stats.primary_kills += 1;
            }
            self.ev(|| {
                format!(
                    "=== primary {}",
                    if power { "power loss" } else { "killed" }
                )
            });
            if round < 3 && rng.chance(1, 4) {
                self.arm(rng, false);
            }
            if self.p_start(rng)? {
                return Ok(());
            }
        }
        Err(self.fail("the primary's recovery makes no progress"))
    }

    fn p_start(&mut self, rng: &mut SimRng<'_>) -> Result<bool, String> {
        let store = SimStore {
            mem: self.pstore.clone(),
            kill: self.pkill.clone(),
        };
        let (journal, report) = match Journal::open(store, self.pcfg.clone()) {
            Ok(x) => x,
            Err(_) if self.pkill.is_dead() => return Ok(false),
            Err(e) => return Err(self.fail(format!("the primary's journal does not recover: {e}"))),
        };
        let end = journal.next_seq() - 1;
        if !self.p_unclean && (report.torn_bytes > 0 || end != self.primary.last_seq()) {
            return Err(self.fail(format!(
                "after a kill of the primary its journal ends at {end} (cut {} bytes); it wrote {}",
                report.torn_bytes,
                self.primary.last_seq()
            )));
        }
        if end < self.p_durable_ever || end > self.primary.last_seq() {
            return Err(self.fail(format!(
                "after a restart the primary's journal ends at {end}; records through {} were \
                 reported durable and {} were written",
                self.p_durable_ever,
                self.primary.last_seq()
            )));
        }
        self.primary.rollback(end);
        check_contents(&journal, &self.primary, end)
            .map_err(|e| self.fail(format!("the primary's journal after a restart: {e}")))?;
        let m_end = self.mjournal.next_seq() - 1;
        if m_end > end {
            return Err(self.fail(format!(
                "the mirror holds records through {m_end}, the primary's journal recovered only \
                 through {end}"
            )));
        }
        self.pjournal = journal;
        self.p_unclean = false;
        self.p_durable_ever = self.p_durable_ever.max(end);
        self.psequencer = Sequencer::new(end);
        if !self.resolve_in_doubt(rng)? {
            return Ok(false);
        }
        self.psettled = self.pjournal.next_seq() - 1;
        self.ev(|| format!("primary restarted: journal ends at {end}"));
        Ok(true)
    }

    /// The shell's `Volume::resolve_in_doubt` (the core's decision, with the crash simulation's
    /// model of a failed op: its error persists half of the time): settle the journal's last
    /// record or append its `Abort`. `Ok(false)`: the process died.
    fn resolve_in_doubt(&mut self, rng: &mut SimRng<'_>) -> Result<bool, String> {
        let end = self.primary.last_seq();
        let Some(op) = self.primary.op_at(end).cloned() else {
            return Ok(true);
        };
        if matches!(op, Op::Abort { .. }) {
            return Ok(true);
        }
        let mut backing = self.primary.tree.clone();
        let failed = self.primary.needs_abort(end);
        let valid = !failed || apply_op(&mut backing.clone(), &op, false).is_ok();
        let persistent = failed && (!valid || rng.chance(1, 2));
        let outcome = sequencer::resolve_in_doubt_with(&mut backing, &op, |t, op| {
            if persistent {
                Err(super::run::persists(op))
            } else {
                apply_op(t, op, false)
            }
        });
        match outcome {
            InDoubt::Stands => {
                let after = backing.state().clone();
                self.primary.rollback(end - 1);
                self.primary.tree.set_state(after);
                self.primary.record(op, true);
                self.psequencer
                    .settle_in_doubt(&mut self.pjournal, end, true)
                    .map_err(|r| self.fail(format!("settling the in-doubt record: {r}")))?;
            }
            InDoubt::Abort(why) => {
                if !failed {
                    return Err(self.fail(format!(
                        "re-applying the in-doubt record {end} ({op:?}), which succeeded on the \
                         primary, failed: {why}"
                    )));
                }
                if self.mjournal.next_seq() > end {
                    return Err(self.fail(format!(
                        "the primary aborts its in-doubt record {end}, which the mirror already \
                         holds"
                    )));
                }
                match self
                    .psequencer
                    .settle_in_doubt(&mut self.pjournal, end, false)
                {
                    Ok(_) => {}
                    Err(_) if self.pkill.is_dead() => return Ok(false),
                    Err(e) => return Err(self.fail(format!("append of the in-doubt Abort: {e}"))),
                }
                self.primary.record(Op::Abort { seq: end }, false);
                self.stats.records += 1;
                self.ev(|| format!("primary: in-doubt {end} aborted"));
            }
        }
        Ok(true)
    }

    // ---- the end ------------------------------------------------------------------------------

    /// Heals the network, stops the faults, drains, and checks `mirror == primary`; then once
    /// more after a power loss of the mirror and a reconnect.
    fn finish(&mut self, rng: &mut SimRng<'_>) -> Result<(), String> {
        self.drain(rng)?;
        self.final_check()?;
        // A last burst reaches the mirror's journal durably, and the mirror loses power before
        // it applies it: after the restart it must catch up although the primary stays idle.
        let burst = (|| -> Act {
            for _ in 0..3 {
                self.primary_op(rng)?;
            }
            self.p_flush_all()?;
            for _ in 0..4 {
                self.p_send()?;
                self.deliver_datagrams(true)?;
                while self.conns.iter().any(|c| !c.to_m.is_empty()) {
                    self.deliver_to_m(rng, true)?;
                }
                while self.conns.iter().any(|c| !c.to_p.is_empty()) {
                    self.deliver_to_p(rng, true)?;
                }
            }
            self.m_flush_all()
        })();
        match burst {
            Ok(()) | Err(Fault::Dead) => {}
            Err(Fault::Bug(m)) => return Err(self.fail(format!("at the end: {m}"))),
        }
        self.m_power_now = true;
        self.restart_dead(rng)?;
        self.drain(rng)?;
        self.final_check()
    }

    fn drain(&mut self, rng: &mut SimRng<'_>) -> Result<(), String> {
        self.down = 0;
        self.heal_datagrams();
        for _ in 0..400 {
            self.mkill.revive();
            self.pkill.revive();
            if self.drained() {
                return Ok(());
            }
            match self.drain_round(rng) {
                Ok(()) | Err(Fault::Dead) => {}
                Err(Fault::Bug(m)) => return Err(self.fail(format!("while draining: {m}"))),
            }
            self.gc();
            self.restart_dead(rng)?;
        }
        let c = self.worker.applier().cursor();
        Err(self.fail(
            format!(
                "after healing the network the mirror does not catch up: primary at {}, mirror \
             received {}, durable {}, settled {}, applied {}, checkpoint {}",
                self.primary.last_seq(),
                self.mjournal.next_seq() - 1,
                self.mdurable,
                self.msettled,
                c.applied,
                c.checkpoint
            ) + &self.udp_state(),
        ))
    }

    fn drained(&self) -> bool {
        let last = self.primary.last_seq();
        let c = self.worker.applier().cursor();
        c.applied == last && c.checkpoint == last && self.mdurable == last
    }

    fn drain_round(&mut self, rng: &mut SimRng<'_>) -> Act {
        self.timeout()?;
        self.p_flush_all()?;
        self.p_send()?;
        for _ in 0..4 {
            if self.udp.is_some() {
                // Time passes for the pacing and the NAK timers (at least 20 ms a round, so a
                // slow paced sender drains within the rounds); every datagram arrives.
                self.now += self.tick.max(Duration::from_millis(20));
                self.p_send()?;
                self.deliver_datagrams(true)?;
            }
            while self.conns.iter().any(|c| !c.to_m.is_empty()) {
                self.deliver_to_m(rng, true)?;
            }
            self.m_flush_all()?;
            // Until idle: the worker checkpoints when its feed has nothing ready.
            while self.m_one()? {}
            self.m_ack(false)?;
            while self.conns.iter().any(|c| !c.to_p.is_empty()) {
                self.deliver_to_p(rng, true)?;
            }
            self.p_send()?;
        }
        self.m_release()?;
        self.p_release()
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
        let diff = self.tree.snapshot().diff(&self.primary.tree.snapshot(), 8);
        if !diff.is_empty() {
            return Err(self.fail(format!(
                "at the end the mirror differs from the primary:\n  {}",
                diff.join("\n  ")
            )));
        }
        Ok(())
    }
}

/// Every record `journal` holds (through `limit`) is the primary's record with that seq.
fn check_contents(
    journal: &Journal<SimStore>,
    primary: &Primary,
    limit: u64,
) -> Result<(), String> {
    let first = journal.first_seq();
    let end = journal.next_seq() - 1;
    if end > limit {
        return Err(format!(
            "it holds records through {end}, beyond {limit} (what the primary reported durable)"
        ));
    }
    let mut reader: Reader<SimFile> = Reader::new(first);
    for seq in first..=end {
        let rec = read_next(&mut reader, journal, end)
            .map_err(|e| format!("reading it: {e}"))?
            .ok_or_else(|| format!("it has no record {seq}"))?;
        if rec.seq != seq || primary.op_at(seq) != Some(&rec.op) {
            return Err(format!(
                "its record {} is {:?}; the primary wrote {:?} as record {seq}",
                rec.seq,
                rec.op,
                primary.op_at(seq)
            ));
        }
    }
    Ok(())
}

fn side(mirror: bool) -> &'static str {
    if mirror {
        "mirror"
    } else {
        "primary"
    }
}

/// An op for the event log, cut short.
fn brief(op: &Op) -> String {
    let mut s = format!("{op:?}");
    if let Some((i, _)) = s.char_indices().nth(120) {
        s.truncate(i);
        s.push_str("...");
    }
    s
}

/// A message for an error, cut short.
fn brief_msg(m: &Msg) -> String {
    match m {
        Msg::Records { settled, records } => format!(
            "Records{{settled {settled}, {}..={}}}",
            records.first().map_or(0, |r| r.seq),
            records.last().map_or(0, |r| r.seq)
        ),
        other => {
            let mut s = format!("{other:?}");
            if let Some((i, _)) = s.char_indices().nth(160) {
                s.truncate(i);
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_exactly() {
        for seed in 0..4 {
            let a = run_net_seed(seed, 300).expect("seed passes");
            let b = run_net_seed(seed, 300).expect("seed passes");
            assert_eq!(a, b, "seed {seed}");
        }
    }
}
