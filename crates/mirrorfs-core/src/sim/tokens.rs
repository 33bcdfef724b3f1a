//! Two writable sites with per-object write tokens: the seeded simulation of `core::token`,
//! and of `core::quorum` with a witness (`core::lease`) under `--partition quorum`.
//!
//! ```text
//!  site 0 (home or not)             ordered link, delay, cuts                    site 1
//!   TokenSite ── Persist ─▶ log       records ─▶ / ◀─ records          log ◀─ Persist ── TokenSite
//!   journal ──(shipped)──────────────▶ token messages (wire codec) ──────────▶ received → applied
//!   quorum::Gate ◀──────────────────── Probe / Answer (same stream) ─────────▶ quorum::Gate
//!   LeaseKeeper ── Request ─▶ witness (LeaseTable, no data) ◀─ Request ── LeaseKeeper
//!                ◀─ Response ─         cuts, restarts          ─ Response ─▶
//! ```
//!
//! Each site journals its own writes and streams its journal to the other on an ordered link
//! (a reconnection resumes the stream from what the peer received, as the real link does); the
//! token messages travel on the same stream, through the wire codec. Users at both sites write
//! a handful of objects at the same time and open and close them, and change two objects at
//! once (a rename or a link: both names' tokens, taken one after the other in
//! `token::acquire_order` and held together until the change is journaled); the link goes down
//! and comes back; either site crashes (possibly between two actions of one batch: after a `Persist`,
//! before the `Send` that follows it) and restarts from its durable token records. In seeds with
//! three objects or more, the first two objects are two names of one hard-linked file (made before
//! the run; their link count does not change during it): a write through either takes
//! [`token::HARD_LINKED`](crate::token::HARD_LINKED) too, before the name's token
//! (`token::acquire_order`), as the shell's `Volume::take_file_tokens` does, and opening either
//! holds the shared token for the session in place of the name's (`fuse::note_opened`).
//!
//! Invariants:
//! 1. one holder: no object's token is held by both sites (checked after every step, connected
//!    or not: the protocol never makes two holders; only `Reconcile` writes without a token);
//! 2. at most one writer, never a mix: a write proceeds with the token only while no other
//!    site's guarded write to the object is in progress, and only once the site has every
//!    guarded write made to the object so far, in the order they were made; and per *file*: a
//!    guarded write through one name of the hard-linked file runs only while no guarded write
//!    of the other site through either name runs (each of them also writes the shared object,
//!    so the writes to hard-linked files are held in one order as those of one object are);
//! 3. records before the Grant: a Grant's `seq` covers every record of the granter for the
//!    object, no write of the granter to it is in progress, and the receiver has received
//!    those records when the Grant arrives;
//! 4. bounded wait: a parked write proceeds or is refused within the park timeout; a write
//!    that waited while the link was up and both sites alive is never refused for a timeout
//!    (no deadlock, no starvation — also with two-object changes at both sites holding one
//!    token while they wait for the next); nothing is parked after the final heal;
//! 5. no lost write: after the final heal both sites hold every journaled write, and the
//!    guarded writes of each object in the order they were made;
//! 6. split writes reconciled (`core::reconcile`, fed as `site::reconcile` feeds it: each
//!    record carries the count of peer records its site had applied, the `PeerSeen` points):
//!    every peer record that is concurrent with an own write of the object (by brute force over
//!    the journal: an own write newer than what the peer had applied) is detected where it is
//!    applied — the winner skips it, the loser has copied its version aside since its last
//!    write of the object — and nothing else is; a guarded write is never concurrent with a
//!    guarded write (the token hand-over orders them), so only split writes conflict; the
//!    detection survives a crash (the machine is rebuilt from the journal after the persisted
//!    watermark).
//!
//! A third of the seeds run `PartitionPolicy::Quorum`: a witness (`core::lease::LeaseTable`, a
//! third voter that stores no data) grants one partition lease at a time to the sites'
//! `core::lease::LeaseKeeper`s over links of their own, and each site's write gate is
//! `core::quorum::Gate` composed with the token machine exactly as the binary's
//! (`site::tokens::TokenGate`): the gate's check before a write, its check again when the token
//! machine answers, the probes and answers on the stream, `Event::Majority`. The links to the
//! witness are cut and come back, a partition isolates any one of the three (a site from the
//! other site and the witness, or the witness from both), the witness crashes and restarts with
//! an empty table. Splits last about a second, several ttls. Invariants, on top of 1–6:
//!
//! 7. one lease: the witness never grants the lease while another site's grant runs (by its
//!    own clock);
//! 8. one writer, also across a split: when a change of an object is made at a site, no write
//!    of the other site to it is in progress, connected or not (a change of two objects: when
//!    its second token is taken); a write without the token is made only at the witness's
//!    lease holder (the ground truth: the grants as the witness made them), and from one ttl
//!    after a cut (the longest a site stays linked on the peer's last answer) only the holder
//!    writes at all: the other side's writes are refused `EROFS` (`Refusal::NoQuorum`, counted);
//! 9. invariant 5 (no acknowledged write lost) after the final heal, and invariant 6 (the
//!    records that crossed a cut are reconciled) hold under the quorum too.

use std::collections::{BTreeMap, HashSet, VecDeque};

use super::run::SplitMix64;
use super::SimRng;
use crate::lease::{LeaseKeeper, LeaseTable, Request as LeaseRequest, Response as LeaseResponse};
use crate::quorum::{Decision as QuorumDecision, Gate as QuorumGate};
use crate::reconcile::{Config as ReconcileConfig, Decision, Reconciler};
use crate::token::{
    acquire_order, Action, Event, ObjectId, PartitionPolicy, Refusal, TokenConfig, TokenMsg,
    TokenRecord, TokenSite, HARD_LINKED,
};
use crate::wire::{Decoder, Msg};

/// What one or more seeds did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TokensStats {
    pub seeds: u64,
    pub writes: u64,
    /// Changes of two objects (a rename, a link): two of the writes each.
    pub pairs: u64,
    /// Writes through a name of the hard-linked file (each also takes the shared token: two of
    /// the writes each).
    pub linked: u64,
    pub guarded: u64,
    /// Writes that went on without the token across a split (`Reconcile`).
    pub unguarded: u64,
    pub refused_read_only: u64,
    pub refused_timeout: u64,
    pub refused_full: u64,
    /// Parked writes lost with a crashed site (never acknowledged).
    pub lost_with_crash: u64,
    pub grants: u64,
    pub crashes: u64,
    /// Crashes that landed between two actions of one batch.
    pub crashes_mid_batch: u64,
    pub disconnects: u64,
    /// Longest wait of a parked write that proceeded, ms.
    pub wait_max_ms: u64,
    /// Peer records found concurrent with an own write (invariant 6), and what was done.
    pub concurrent: u64,
    pub skipped: u64,
    pub copies: u64,
    /// `PartitionPolicy::Quorum` seeds, and in them: writes refused because the site was not
    /// the majority of a split (`Refusal::NoQuorum`, `EROFS`), writes that went on during a
    /// split (every one at the witness's lease holder), leases the witness granted, partitions
    /// that isolated one of the three (site 0, site 1, the witness) and witness restarts.
    pub quorum_seeds: u64,
    pub refused_no_quorum: u64,
    pub split_writes: u64,
    pub lease_grants: u64,
    pub isolations: u64,
    pub witness_crashes: u64,
    /// Of `concurrent`, those in quorum seeds (records that crossed a cut, or writes of two
    /// successive lease holders of one split: never at once, reconciled as under `Reconcile`).
    pub quorum_concurrent: u64,
}

impl std::ops::AddAssign for TokensStats {
    fn add_assign(&mut self, o: TokensStats) {
        self.seeds += o.seeds;
        self.writes += o.writes;
        self.pairs += o.pairs;
        self.linked += o.linked;
        self.guarded += o.guarded;
        self.unguarded += o.unguarded;
        self.refused_read_only += o.refused_read_only;
        self.refused_timeout += o.refused_timeout;
        self.refused_full += o.refused_full;
        self.lost_with_crash += o.lost_with_crash;
        self.grants += o.grants;
        self.crashes += o.crashes;
        self.crashes_mid_batch += o.crashes_mid_batch;
        self.disconnects += o.disconnects;
        self.wait_max_ms = self.wait_max_ms.max(o.wait_max_ms);
        self.concurrent += o.concurrent;
        self.skipped += o.skipped;
        self.copies += o.copies;
        self.quorum_seeds += o.quorum_seeds;
        self.refused_no_quorum += o.refused_no_quorum;
        self.split_writes += o.split_writes;
        self.lease_grants += o.lease_grants;
        self.isolations += o.isolations;
        self.witness_crashes += o.witness_crashes;
        self.quorum_concurrent += o.quorum_concurrent;
    }
}

/// A write's identity across the whole run.
type Uid = u64;

/// The simulated objects are `FIRST_OBJECT..FIRST_OBJECT + objects`: ids a name can have
/// (`token::name_object`: never 0 nor `token::HARD_LINKED`).
const FIRST_OBJECT: ObjectId = HARD_LINKED + 1;

/// Something on the stream from one site to the other.
#[derive(Debug, Clone)]
enum Item {
    Record {
        seq: u64,
        object: ObjectId,
        uid: Uid,
        /// The peer records its site had applied when it journaled it (`PeerSeen`).
        seen: u64,
        guarded: bool,
    },
    /// A token message as wire bytes.
    Token(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Pending {
    object: ObjectId,
    since: u64,
    /// The link was up and both sites alive for the whole wait so far.
    healthy: bool,
}

#[derive(Debug, Clone)]
struct InProgress {
    uid: Uid,
    object: ObjectId,
    guarded: bool,
    done_at: u64,
}

struct SimSite {
    machine: Option<TokenSite>,
    config: TokenConfig,
    /// Durable token records, in the order they were made.
    log: Vec<TokenRecord>,
    /// Own writes, durable: seq = index + 1.
    journal: Vec<(ObjectId, Uid)>,
    /// Per own record (same index): the peer records applied when it was journaled, guarded.
    journal_meta: Vec<(u64, bool)>,
    /// The peer's records received, durable, in order.
    received: Vec<(ObjectId, Uid)>,
    received_meta: Vec<(u64, bool)>,
    /// Invariant 6: the reconciliation machine (`None` while crashed), the watermark made
    /// durable with `applied`, and per object the own record the last copy aside was made after.
    reconcile: Option<Reconciler>,
    persisted_seen: u64,
    copied_after: BTreeMap<ObjectId, u64>,
    applied: usize,
    /// Per object, the writes applied here (own and the peer's) in the order applied.
    replica: BTreeMap<ObjectId, Vec<Uid>>,
    /// Own records sent on this connection.
    shipped: u64,
    writing: Vec<InProgress>,
    parked: BTreeMap<Uid, Pending>,
    open: BTreeMap<ObjectId, u32>,
    down_until: u64,
    /// `PartitionPolicy::Quorum` (`None` otherwise and while crashed): the quorum as the gate
    /// composes it with the token machine, and the keeper of the witness's partition lease.
    gate: Option<QuorumGate>,
    keeper: Option<LeaseKeeper>,
    /// Restarts so far: a witness answer to an earlier incarnation's request is dropped.
    incarnation: u64,
}

impl SimSite {
    fn new(config: TokenConfig) -> SimSite {
        let reconcile = Reconciler::new(ReconcileConfig::new(config.site, config.peer), 0);
        SimSite {
            machine: Some(TokenSite::new(config.clone())),
            config,
            log: Vec::new(),
            journal: Vec::new(),
            journal_meta: Vec::new(),
            received: Vec::new(),
            received_meta: Vec::new(),
            reconcile: Some(reconcile),
            persisted_seen: 0,
            copied_after: BTreeMap::new(),
            applied: 0,
            replica: BTreeMap::new(),
            shipped: 0,
            writing: Vec::new(),
            parked: BTreeMap::new(),
            open: BTreeMap::new(),
            down_until: 0,
            gate: None,
            keeper: None,
            incarnation: 0,
        }
    }

    fn alive(&self) -> bool {
        self.machine.is_some()
    }

    fn holds(&self, object: ObjectId) -> bool {
        self.machine.as_ref().is_some_and(|m| m.holds(object))
    }
}

struct World {
    now: u64,
    sites: [SimSite; 2],
    objects: u64,
    /// The names of the one hard-linked file (objects 0 and 1 when there are three or more).
    linked: Vec<ObjectId>,
    /// The first write (the name's token) of each write through one of those names.
    linked_writes: HashSet<Uid>,
    link_up: bool,
    /// Per direction (index = sender), items with their delivery time (non-decreasing).
    links: [VecDeque<(u64, Item)>; 2],
    /// Per object, the guarded writes in the order they were made (journaled).
    history: BTreeMap<ObjectId, Vec<Uid>>,
    /// Every guarded write in `history`.
    guarded: HashSet<Uid>,
    /// Guarded writes of each object that proceeded and are not yet journaled: (site, uid).
    guarded_now: BTreeMap<ObjectId, Vec<(usize, Uid)>>,
    next_uid: Uid,
    /// Two-object changes whose first write waits to proceed: first uid → (second uid, object).
    pair_next: BTreeMap<Uid, (Uid, ObjectId)>,
    /// Two-object changes whose second write waits: second uid → first uid (in progress, held
    /// until the second proceeds; journaled together with it).
    pair_first: BTreeMap<Uid, Uid>,
    /// A kill pending for this site: it dies after this many more actions.
    kill: Option<(usize, usize)>,
    stats: TokensStats,
    policy: PartitionPolicy,
    /// `PartitionPolicy::Quorum`: the witness and the links to it.
    quorum: Option<Witness>,
    /// Since when the link between the sites is down.
    split_since: Option<u64>,
    /// Steps after which a cut link between the sites comes back, on average.
    heal_every: u64,
    /// Every event and action, when tracing one seed.
    trace: Option<Vec<String>>,
}

/// The witness (a third voter that stores no data: `core::lease::LeaseTable`, as
/// `mirrorfs witness` runs it), the sites' links to it and the leases it granted.
struct Witness {
    /// `None` while crashed (it keeps nothing on disk).
    table: Option<LeaseTable>,
    down_until: u64,
    ttl_max_ms: u64,
    /// The lease (and link lease) every site asks for (`mount --lease-ms`).
    ttl_ms: u64,
    /// Site i reaches the witness.
    up: [bool; 2],
    /// Requests and answers in flight: (delivery time, message).
    flight: Vec<(u64, WitnessMsg)>,
    /// Every lease granted, by the witness's clock: (site, from, until). The ground truth of
    /// who may write during a split.
    granted: Vec<(usize, u64, u64)>,
}

#[derive(Debug, Clone)]
enum WitnessMsg {
    Request {
        site: usize,
        incarnation: u64,
        sent_at: u64,
        request: LeaseRequest,
    },
    Response {
        site: usize,
        incarnation: u64,
        sent_at: u64,
        response: LeaseResponse,
    },
}

impl Witness {
    /// Whether the witness's lease is site `i`'s at `now` (the ground truth).
    fn holder(&self, i: usize, now: u64) -> bool {
        self.granted
            .iter()
            .any(|&(s, from, until)| s == i && from <= now && now < until)
    }
}

type Step = Result<(), String>;

/// Runs one seed of `steps` steps; the invariants are in the module's documentation.
pub fn run_tokens_seed(seed: u64, steps: usize) -> Result<TokensStats, String> {
    run(seed, steps, None).0
}

/// [`run_tokens_seed`] with every event and action of the seed, for replaying a failure.
pub fn trace_tokens_seed(seed: u64, steps: usize) -> (Result<TokensStats, String>, Vec<String>) {
    let (r, log) = run(seed, steps, Some(Vec::new()));
    (r, log.unwrap_or_default())
}

fn run(
    seed: u64,
    steps: usize,
    trace: Option<Vec<String>>,
) -> (Result<TokensStats, String>, Option<Vec<String>>) {
    let mut gen = SplitMix64(seed ^ 0x070C_3E45_u64);
    let mut next = || gen.next();
    let mut rng = SimRng::new(&mut next);
    let policy = match rng.below(3) {
        0 => PartitionPolicy::Reconcile,
        1 => PartitionPolicy::ReadOnly,
        _ => PartitionPolicy::Quorum,
    };
    let config = |rng: &mut SimRng<'_>, site, peer| TokenConfig {
        site,
        peer,
        entries_max: rng.range(2, 8) as usize,
        parked_max: rng.range(2, 16) as usize,
        idle_ms: rng.range(20, 400),
        hold_max_ms: rng.range(10, 200),
        park_timeout_ms: 3_000,
        policy,
    };
    // Either simulated site may be the home (the lower id).
    let (id_a, id_b) = if rng.chance(1, 2) { (1, 2) } else { (9, 4) };
    let (a, b) = (config(&mut rng, id_a, id_b), config(&mut rng, id_b, id_a));
    let quorum = (policy == PartitionPolicy::Quorum).then(|| {
        let ttl_ms = rng.range(300, 800);
        Witness {
            table: None,
            down_until: 0,
            ttl_max_ms: rng.range(ttl_ms, 2 * ttl_ms),
            ttl_ms,
            up: [true, true],
            flight: Vec::new(),
            granted: Vec::new(),
        }
    });
    let objects = rng.range(2, 8);
    let mut w = World {
        now: 0,
        sites: [SimSite::new(a), SimSite::new(b)],
        objects,
        linked: if objects >= 3 {
            vec![FIRST_OBJECT, FIRST_OBJECT + 1]
        } else {
            Vec::new()
        },
        linked_writes: HashSet::new(),
        link_up: false,
        links: [VecDeque::new(), VecDeque::new()],
        history: BTreeMap::new(),
        guarded: HashSet::new(),
        guarded_now: BTreeMap::new(),
        next_uid: 1,
        pair_next: BTreeMap::new(),
        pair_first: BTreeMap::new(),
        kill: None,
        stats: TokensStats {
            seeds: 1,
            ..TokensStats::default()
        },
        policy,
        // Splits under the quorum last long enough (about a second) for the majority to form.
        heal_every: if quorum.is_some() { 250 } else { 30 },
        quorum,
        split_since: None,
        trace,
    };
    if w.quorum.is_some() {
        w.stats.quorum_seeds = 1;
    }
    let r = (|| {
        w.restart_witness();
        for i in 0..2 {
            w.start_quorum(i);
        }
        w.connect()?;
        for step in 0..steps {
            w.step(&mut rng)
                .map_err(|e| format!("seed {seed} step {step} t={}ms: {e}", w.now))?;
        }
        w.finish(&mut rng)
            .map_err(|e| format!("seed {seed} final heal t={}ms: {e}", w.now))
    })();
    (r.map(|()| w.stats.clone()), w.trace.take())
}

impl World {
    fn step(&mut self, rng: &mut SimRng<'_>) -> Step {
        self.now += rng.range(1, 8);
        self.deliver(rng)?;
        self.complete_writes()?;
        match rng.weighted(&[30, 6, 6, 8, 20]) {
            0 => self.user_write(rng)?,
            1 => self.open_close(rng, true)?,
            2 => self.open_close(rng, false)?,
            3 => self.user_pair(rng)?,
            _ => {}
        }
        // The streams and the appliers move at their own random pace.
        for i in 0..2 {
            if rng.chance(1, 3) {
                self.advance_ship(rng, i)?;
            }
            if rng.chance(1, 3) {
                self.advance_apply(rng, i)?;
            }
        }
        // Faults are rarer than work, so that most hand-overs run on a healthy link.
        if self.link_up && rng.chance(1, 250) {
            self.disconnect()?;
        }
        if rng.chance(1, 600) {
            self.crash(rng)?;
        }
        if rng.chance(1, 400) {
            // The next batch of this site's actions is cut after 1..3 of them.
            self.kill = Some((rng.below(2) as usize, rng.range(1, 3) as usize));
        }
        self.restart_due()?;
        if !self.link_up && self.sites.iter().all(SimSite::alive) && rng.chance(1, self.heal_every)
        {
            self.connect()?;
        }
        self.witness_faults(rng)?;
        self.witness_step(rng)?;
        for i in 0..2 {
            self.tick_site(i)?;
        }
        self.check()
    }

    /// `PartitionPolicy::Quorum`: the links to the witness are cut and come back, a partition
    /// isolates one of the three, the witness crashes and restarts (it forgets every lease).
    fn witness_faults(&mut self, rng: &mut SimRng<'_>) -> Step {
        let Some(q) = self.quorum.as_mut() else {
            return Ok(());
        };
        for k in 0..2 {
            if q.up[k] && rng.chance(1, 400) {
                q.up[k] = false;
            } else if !q.up[k] && rng.chance(1, 150) {
                q.up[k] = true;
            }
        }
        if q.table.is_some() && rng.chance(1, 3000) {
            self.stats.witness_crashes += 1;
            q.table = None;
            q.down_until = self.now + rng.range(50, 2000);
            if let Some(t) = self.trace.as_mut() {
                t.push(format!("{} witness: CRASH", self.now));
            }
        }
        if rng.chance(1, 500) {
            // Isolate one of the three: a site loses the other site and the witness, or the
            // witness loses both sites.
            self.stats.isolations += 1;
            let who = rng.below(3) as usize;
            if let Some(t) = self.trace.as_mut() {
                t.push(format!("{} isolate {who} (2: the witness)", self.now));
            }
            match who {
                2 => q.up = [false, false],
                k => {
                    q.up[k] = false;
                    self.disconnect()?;
                }
            }
        }
        self.restart_witness();
        Ok(())
    }

    /// A crashed witness whose time came starts again, with an empty table.
    fn restart_witness(&mut self) {
        let now = self.now;
        if let Some(q) = self.quorum.as_mut() {
            if q.table.is_none() && now >= q.down_until {
                q.table = Some(LeaseTable::new(now, q.ttl_max_ms));
            }
        }
    }

    /// The keepers ask the witness when due; requests and answers whose time came arrive
    /// (lost if the link is down or the other end crashed on the way).
    fn witness_step(&mut self, rng: &mut SimRng<'_>) -> Step {
        let Some(q) = self.quorum.as_mut() else {
            return Ok(());
        };
        let now = self.now;
        for (i, s) in self.sites.iter_mut().enumerate() {
            let Some(k) = s.keeper.as_mut() else {
                continue;
            };
            if let Some(request) = k.tick(now) {
                if q.up[i] {
                    let at = now + rng.range(1, 20);
                    q.flight.push((
                        at,
                        WitnessMsg::Request {
                            site: i,
                            incarnation: s.incarnation,
                            sent_at: now,
                            request,
                        },
                    ));
                }
            }
        }
        let (due, later): (Vec<_>, Vec<_>) = q.flight.drain(..).partition(|(at, _)| *at <= now);
        q.flight = later;
        for (_, m) in due {
            match m {
                WitnessMsg::Request {
                    site,
                    incarnation,
                    sent_at,
                    request,
                } => {
                    let Some(table) = q.table.as_mut() else {
                        continue;
                    };
                    if !q.up[site] {
                        continue;
                    }
                    let response = table.request(now, &request);
                    if let LeaseResponse::Granted { ttl_ms } = response {
                        self.stats.lease_grants += 1;
                        // The witness's own rule, checked from outside: one holder at a time.
                        if let Some(&(other, _, until)) = q
                            .granted
                            .iter()
                            .find(|&&(o, _, until)| o != site && now < until)
                        {
                            return Err(format!(
                                "the witness granted the lease to site {site} while site {other} holds it until {until}"
                            ));
                        }
                        q.granted.push((site, now, now + ttl_ms));
                    }
                    if let Some(t) = self.trace.as_mut() {
                        t.push(format!(
                            "{now} witness: site {site} {request:?} -> {response:?}"
                        ));
                    }
                    let at = now + rng.range(1, 20);
                    q.flight.push((
                        at,
                        WitnessMsg::Response {
                            site,
                            incarnation,
                            sent_at,
                            response,
                        },
                    ));
                }
                WitnessMsg::Response {
                    site,
                    incarnation,
                    sent_at,
                    response,
                } => {
                    let s = &mut self.sites[site];
                    if !q.up[site] || s.incarnation != incarnation {
                        continue;
                    }
                    if let Some(k) = s.keeper.as_mut() {
                        k.on_response(now, sent_at, &response);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether site `i` holds the witness's partition lease now, as its keeper says.
    fn lease_held(&self, i: usize) -> bool {
        self.sites[i]
            .keeper
            .as_ref()
            .is_some_and(|k| k.writable(self.now).is_ok())
    }

    /// The quorum's decision at site `i` now (`None` without the quorum or while crashed); a
    /// change of the majority goes to the token machine, at once (`queue` is `None`) or after
    /// the actions being carried out.
    fn decide(
        &mut self,
        i: usize,
        queue: Option<&mut VecDeque<Event>>,
    ) -> Result<Option<QuorumDecision>, String> {
        let lease = self.lease_held(i);
        let now = self.now;
        let Some(g) = self.sites[i].gate.as_mut() else {
            return Ok(None);
        };
        let (d, change) = g.decide(now, lease);
        if let Some(ev) = change {
            match queue {
                Some(q) => q.push_back(ev),
                None => self.event(i, ev)?,
            }
        }
        Ok(Some(d))
    }

    /// What the gate's tick does: the quorum's probe, its majority, then the token machine's
    /// timings.
    fn tick_site(&mut self, i: usize) -> Step {
        let now = self.now;
        if let Some(probe) = self.sites[i].gate.as_mut().and_then(|g| g.tick(now)) {
            self.send(i, probe)?;
        }
        self.decide(i, None)?;
        self.event(i, Event::Tick)
    }

    /// A quorum message from the peer (the gate's, not the token machine's).
    fn quorum_msg(&mut self, i: usize, msg: TokenMsg) -> Step {
        let now = self.now;
        let in_flight = self.sites[i]
            .machine
            .as_ref()
            .is_some_and(|m| m.unguarded() > 0);
        let Some(g) = self.sites[i].gate.as_mut() else {
            return Ok(());
        };
        if let Some(t) = self.trace.as_mut() {
            t.push(format!("{now} site {i}: quorum {msg:?}"));
        }
        match msg {
            TokenMsg::Probe { nonce } => {
                if let Some(answer) = g.on_probe(now, nonce, in_flight) {
                    self.send(i, answer)?;
                }
            }
            TokenMsg::Answer { nonce, seq } => g.on_answer(now, nonce, seq),
            _ => return Err(format!("site {i}: {msg:?} is not the quorum's")),
        }
        self.decide(i, None)?;
        Ok(())
    }

    /// Site `i` (re)starts its quorum: the gate from its journal's end and the peer's records
    /// applied, and a lease keeper that holds no lease yet.
    fn start_quorum(&mut self, i: usize) {
        let Some(q) = self.quorum.as_ref() else {
            return;
        };
        let s = &mut self.sites[i];
        s.gate = Some(QuorumGate::new(
            self.now,
            q.ttl_ms,
            s.journal.len() as u64,
            s.applied as u64,
        ));
        let request = LeaseRequest {
            volume_id: [7; 16],
            site: s.config.site.to_string(),
            generation_number: 1,
            generation_id: 1,
            ttl_ms: q.ttl_ms,
            renewal: false,
        };
        s.keeper = Some(LeaseKeeper::new(self.now, request));
    }

    /// Invariants 1 and 4 (bounded wait), after every step.
    fn check(&self) -> Step {
        for object in (FIRST_OBJECT..FIRST_OBJECT + self.objects).chain([HARD_LINKED]) {
            if self.sites[0].holds(object) && self.sites[1].holds(object) {
                return Err(format!("both sites hold the token of object {object}"));
            }
        }
        for (i, s) in self.sites.iter().enumerate() {
            for (uid, p) in &s.parked {
                if self.now > p.since + s.config.park_timeout_ms + 8 {
                    return Err(format!(
                        "site {i}: write {uid} to object {} parked for {} ms",
                        p.object,
                        self.now - p.since
                    ));
                }
            }
        }
        Ok(())
    }

    /// Hands `event` to site `i` and carries out what it says (and what follows from that).
    fn event(&mut self, i: usize, event: Event) -> Step {
        let mut queue = VecDeque::from([event]);
        while let Some(ev) = queue.pop_front() {
            let s = &mut self.sites[i];
            let Some(m) = s.machine.as_mut() else {
                return Ok(());
            };
            if let Some(g) = s.gate.as_mut() {
                g.observe(&ev);
            }
            let actions = m.handle(self.now, ev);
            if let Some(t) = self.trace.as_mut() {
                t.push(format!("{} site {i}: {ev:?} -> {actions:?}", self.now));
            }
            for a in actions {
                if let Some((k, left)) = self.kill {
                    if k == i {
                        if left <= 1 {
                            self.kill = None;
                            self.stats.crashes_mid_batch += 1;
                            return self.crash_site(i);
                        }
                        self.kill = Some((k, left - 1));
                    }
                }
                self.act(i, a, &mut queue)?;
            }
        }
        Ok(())
    }

    fn act(&mut self, i: usize, a: Action, queue: &mut VecDeque<Event>) -> Step {
        match a {
            Action::Persist(r) => self.sites[i].log.push(r),
            Action::Send(msg) => self.send(i, msg)?,
            Action::Ship { through } => {
                if self.ship(i, through) {
                    queue.push_back(Event::Shipped {
                        seq: self.sites[i].shipped,
                    });
                }
            }
            Action::Proceed {
                write,
                object,
                guarded,
            } => {
                // The quorum again, at the moment the write goes (it may have waited); for the
                // second token of a pair, the whole change (`goes_together`).
                let first = self.pair_first.get(&write).and_then(|f| {
                    self.sites[i]
                        .writing
                        .iter()
                        .find(|w| w.uid == *f)
                        .map(|w| w.guarded)
                });
                let together: Vec<bool> = first.into_iter().chain([guarded]).collect();
                if self
                    .decide(i, Some(&mut *queue))?
                    .is_some_and(|d| !d.goes_together(&together))
                {
                    queue.push_back(Event::Written {
                        object,
                        seq: 0,
                        guarded,
                    });
                    return self.refused(i, write, object, Refusal::NoQuorum, queue);
                }
                self.proceed(i, write, object, guarded, queue)?
            }
            Action::Refuse {
                write,
                object,
                reason,
            } => {
                let reason = match self.decide(i, Some(&mut *queue))? {
                    Some(d) if !d.goes(None) => Refusal::NoQuorum,
                    _ => reason,
                };
                self.refused(i, write, object, reason, queue)?
            }
        }
        Ok(())
    }

    /// `PartitionPolicy::Quorum`, when a change of `object` at site `i` is made: no write of
    /// the other site to it is in progress (connected or not), and during a split, from one
    /// ttl after the cut (the longest a site stays linked without an answer), only the
    /// witness's lease holder writes; a write without the token only at the holder, ever.
    fn check_quorum_write(&self, i: usize, object: ObjectId, guarded: bool) -> Step {
        let Some(q) = self.quorum.as_ref() else {
            return Ok(());
        };
        if let Some(w) = self.sites[1 - i]
            .writing
            .iter()
            .find(|w| w.object == object && w.done_at != u64::MAX)
        {
            return Err(format!(
                "site {i} writes object {object} (guarded {guarded}) while site {}'s write {} (guarded {}) is in progress",
                1 - i,
                w.uid,
                w.guarded
            ));
        }
        let holder = q.holder(i, self.now);
        if !guarded && !holder {
            return Err(format!(
                "site {i} writes object {object} without its token and without the witness's lease"
            ));
        }
        if let Some(t) = self.split_since {
            if self.now >= t + q.ttl_ms && !holder {
                return Err(format!(
                    "site {i} writes object {object} {} ms into a split without the witness's lease",
                    self.now - t
                ));
            }
        }
        Ok(())
    }

    fn send(&mut self, i: usize, msg: TokenMsg) -> Step {
        if let TokenMsg::Grant { object, seq, .. } = msg {
            // Invariant 3 at the sender.
            let s = &self.sites[i];
            let last = s
                .journal
                .iter()
                .enumerate()
                .filter(|(_, (o, _))| *o == object)
                .map(|(at, _)| at as u64 + 1)
                .max()
                .unwrap_or(0);
            if seq < last {
                return Err(format!(
                    "site {i} grants object {object} at seq {seq} before its record {last}"
                ));
            }
            if seq > s.shipped {
                return Err(format!(
                    "site {i} grants object {object} at seq {seq}, shipped only {}",
                    s.shipped
                ));
            }
            if s.writing.iter().any(|w| w.object == object) {
                return Err(format!(
                    "site {i} grants object {object} with a write in progress"
                ));
            }
        }
        if !self.link_up {
            return Ok(());
        }
        let bytes = Msg::Token(msg).encode(false);
        self.push(i, Item::Token(bytes));
        Ok(())
    }

    fn push(&mut self, from: usize, item: Item) {
        let at = self.links[from]
            .back()
            .map_or(0, |(t, _)| *t)
            .max(self.now + 1 + self.now % 23);
        self.links[from].push_back((at, item));
    }

    /// Sends site `i`'s records through `through` (if the link is up). True if it sent any.
    fn ship(&mut self, i: usize, through: u64) -> bool {
        if !self.link_up {
            return false;
        }
        let s = &self.sites[i];
        let end = through.min(s.journal.len() as u64);
        if end <= s.shipped {
            return false;
        }
        let items: Vec<Item> = (s.shipped + 1..=end)
            .map(|seq| {
                let (object, uid) = s.journal[seq as usize - 1];
                let (seen, guarded) = s.journal_meta[seq as usize - 1];
                Item::Record {
                    seq,
                    object,
                    uid,
                    seen,
                    guarded,
                }
            })
            .collect();
        self.sites[i].shipped = end;
        for it in items {
            self.push(i, it);
        }
        true
    }

    fn proceed(
        &mut self,
        i: usize,
        uid: Uid,
        object: ObjectId,
        guarded: bool,
        queue: &mut VecDeque<Event>,
    ) -> Step {
        let s = &mut self.sites[i];
        let since = s.parked.remove(&uid).map(|p| p.since);
        if let Some(since) = since {
            self.stats.wait_max_ms = self.stats.wait_max_ms.max(self.now - since);
        }
        if guarded {
            self.stats.guarded += 1;
            // Invariant 2.
            let others = self.guarded_now.entry(object).or_default();
            if let Some((o, u)) = others.iter().find(|(site, _)| *site != i) {
                return Err(format!(
                    "site {i} writes object {object} while site {o}'s write {u} is in progress"
                ));
            }
            others.push((i, uid));
            let history = self.history.get(&object).cloned().unwrap_or_default();
            let mine = self.guarded_order(i, object);
            if mine != history {
                return Err(format!(
                    "site {i} writes object {object} holding guarded writes {mine:?}, made: {history:?}"
                ));
            }
        } else {
            self.stats.unguarded += 1;
            if self.policy == PartitionPolicy::ReadOnly {
                return Err(format!(
                    "site {i} writes object {object} unguarded in read-only mode"
                ));
            }
            // Under the quorum a majority writes unguarded until the healed link answers its
            // probe (`check_quorum_write` checks it holds the lease).
            if self.link_up && self.policy != PartitionPolicy::Quorum {
                return Err(format!(
                    "site {i} writes object {object} unguarded while connected"
                ));
            }
        }
        let mut done_at = self.now + self.now % 7;
        let pair_first = self.pair_next.contains_key(&uid);
        if !pair_first && guarded {
            // Invariant 2 per file: the change runs now (its last token taken).
            let change = self.pair_first.get(&uid).copied().unwrap_or(uid);
            if self.linked_writes.contains(&change) && self.guarded_change(i, change) {
                self.check_file_writer(i, change)?;
            }
        }
        if !pair_first {
            self.check_quorum_write(i, object, guarded)?;
            if self.split_since.is_some() && self.quorum.is_some() {
                self.stats.split_writes += 1;
            }
        }
        if let Some((second, next)) = self.pair_next.remove(&uid) {
            // The first object of a pair: its token stays taken (the write in progress) while
            // the change waits for the second.
            done_at = u64::MAX;
            self.pair_first.insert(second, uid);
            let healthy = self.link_up && self.sites.iter().all(SimSite::alive);
            self.sites[i].parked.insert(
                second,
                Pending {
                    object: next,
                    since: self.now,
                    healthy,
                },
            );
            self.sites[i].writing.push(InProgress {
                uid,
                object,
                guarded,
                done_at,
            });
            // The gate's check before the second write, as before any write.
            let held = self.sites[i].holds(next);
            if self
                .decide(i, Some(&mut *queue))?
                .is_some_and(|d| !d.admits(held))
            {
                return self.refused(i, second, next, Refusal::NoQuorum, queue);
            }
            queue.push_back(Event::Write {
                write: second,
                object: next,
            });
            return Ok(());
        }
        if let Some(first) = self.pair_first.remove(&uid) {
            // Both tokens taken: the change runs and is journaled as one.
            let first_write = self.sites[i]
                .writing
                .iter()
                .find(|w| w.uid == first)
                .map(|w| (w.object, w.guarded));
            if let Some((o, g)) = first_write {
                self.check_quorum_write(i, o, g)?;
            }
            if let Some(w) = self.sites[i].writing.iter_mut().find(|w| w.uid == first) {
                w.done_at = done_at;
            }
        }
        self.sites[i].writing.push(InProgress {
            uid,
            object,
            guarded,
            done_at,
        });
        Ok(())
    }

    /// Invariant 2 per file: when site `i`'s guarded write `change` through a name of the
    /// hard-linked file runs, no guarded write of the other site through either name runs.
    fn check_file_writer(&self, i: usize, change: Uid) -> Step {
        let other = 1 - i;
        if let Some(w) = self.sites[other].writing.iter().find(|w| {
            w.done_at != u64::MAX
                && self.linked_writes.contains(&w.uid)
                && self.guarded_change(other, w.uid)
        }) {
            return Err(format!(
                "site {i}'s write {change} to the hard-linked file runs while site {}'s write {} through object {} does",
                1 - i,
                w.uid,
                w.object
            ));
        }
        Ok(())
    }

    /// Whether every write of the change whose first write is `first` that site `i` has in
    /// progress holds its token (a change begun across a split may take one token unguarded
    /// and the next guarded: not a guarded change).
    fn guarded_change(&self, i: usize, first: Uid) -> bool {
        self.sites[i]
            .writing
            .iter()
            .filter(|w| w.uid == first || w.uid == first + 1)
            .all(|w| w.guarded)
    }

    /// The guarded writes of `object` site `i` holds, in the order applied there.
    fn guarded_order(&self, i: usize, object: ObjectId) -> Vec<Uid> {
        self.sites[i]
            .replica
            .get(&object)
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|u| self.guarded.contains(u))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn refused(
        &mut self,
        i: usize,
        uid: Uid,
        object: ObjectId,
        reason: Refusal,
        queue: &mut VecDeque<Event>,
    ) -> Step {
        let p = self.sites[i].parked.remove(&uid);
        self.pair_next.remove(&uid);
        if let Some(first) = self.pair_first.remove(&uid) {
            // The second token of a pair refused: the change fails, the first goes back unused.
            let s = &mut self.sites[i];
            if let Some(at) = s.writing.iter().position(|w| w.uid == first) {
                let w = s.writing.remove(at);
                if let Some(v) = self.guarded_now.get_mut(&w.object) {
                    v.retain(|(_, u)| *u != w.uid);
                }
                queue.push_back(Event::Written {
                    object: w.object,
                    seq: 0,
                    guarded: w.guarded,
                });
            }
        }
        match reason {
            Refusal::ReadOnly => {
                self.stats.refused_read_only += 1;
                if self.policy == PartitionPolicy::Reconcile || self.link_up {
                    return Err(format!(
                        "site {i}: write {uid} to object {object} refused read-only (policy {:?}, link up {})",
                        self.policy, self.link_up
                    ));
                }
            }
            Refusal::Timeout => {
                self.stats.refused_timeout += 1;
                if p.as_ref().is_some_and(|p| p.healthy) {
                    return Err(format!(
                        "site {i}: write {uid} to object {object} timed out with the link up all along"
                    ));
                }
            }
            Refusal::NoQuorum => {
                self.stats.refused_no_quorum += 1;
                if self.policy != PartitionPolicy::Quorum {
                    return Err(format!(
                        "site {i}: write {uid} to object {object} refused for the quorum under {:?}",
                        self.policy
                    ));
                }
            }
            _ => self.stats.refused_full += 1,
        }
        Ok(())
    }

    fn user_write(&mut self, rng: &mut SimRng<'_>) -> Step {
        let i = rng.below(2) as usize;
        if !self.sites[i].alive() {
            return Ok(());
        }
        let object = FIRST_OBJECT + rng.below(self.objects);
        if self.linked.contains(&object) {
            // A write through a name of the hard-linked file: the shared token, then its
            // name's (`token::acquire_order`: the smallest id, first).
            self.stats.linked += 1;
            self.linked_writes.insert(self.next_uid);
            return self.start_pair(i, acquire_order(vec![HARD_LINKED, object]));
        }
        let uid = self.next_uid;
        self.next_uid += 1;
        self.stats.writes += 1;
        if !self.admits(i, object)? {
            return Ok(());
        }
        let healthy = self.link_up;
        self.sites[i].parked.insert(
            uid,
            Pending {
                object,
                since: self.now,
                healthy,
            },
        );
        self.event(i, Event::Write { write: uid, object })
    }

    /// The gate's check before a write to `object` at site `i` (always true without the
    /// quorum): false if refused (`Refusal::NoQuorum`, counted), the token machine not told.
    fn admits(&mut self, i: usize, object: ObjectId) -> Result<bool, String> {
        let held = self.sites[i].holds(object);
        match self.decide(i, None)? {
            Some(d) if !d.admits(held) => {
                self.stats.refused_no_quorum += 1;
                Ok(false)
            }
            _ => Ok(self.sites[i].alive()),
        }
    }

    /// A change of two objects at one site (a rename or a link): the first token in
    /// `acquire_order`, then, holding it, the second.
    fn user_pair(&mut self, rng: &mut SimRng<'_>) -> Step {
        let i = rng.below(2) as usize;
        if !self.sites[i].alive() || self.objects < 2 {
            return Ok(());
        }
        let a = rng.below(self.objects);
        let b = (a + rng.range(1, self.objects - 1)) % self.objects;
        self.stats.pairs += 1;
        self.start_pair(i, acquire_order(vec![FIRST_OBJECT + a, FIRST_OBJECT + b]))
    }

    /// A change of the two objects `order` (in `acquire_order`) at site `i`: the first
    /// token, then, holding it, the second; journaled together.
    fn start_pair(&mut self, i: usize, order: Vec<ObjectId>) -> Step {
        let (first, second) = (self.next_uid, self.next_uid + 1);
        self.next_uid += 2;
        self.stats.writes += 2;
        if !self.admits(i, order[0])? {
            return Ok(());
        }
        self.pair_next.insert(first, (second, order[1]));
        let healthy = self.link_up;
        self.sites[i].parked.insert(
            first,
            Pending {
                object: order[0],
                since: self.now,
                healthy,
            },
        );
        self.event(
            i,
            Event::Write {
                write: first,
                object: order[0],
            },
        )
    }

    /// Journals the writes whose time came.
    fn complete_writes(&mut self) -> Step {
        for i in 0..2 {
            let now = self.now;
            let (done, rest): (Vec<InProgress>, Vec<InProgress>) = self.sites[i]
                .writing
                .drain(..)
                .partition(|w| w.done_at <= now);
            self.sites[i].writing = rest;
            for w in done {
                let s = &mut self.sites[i];
                s.journal.push((w.object, w.uid));
                s.journal_meta.push((s.applied as u64, w.guarded));
                s.replica.entry(w.object).or_default().push(w.uid);
                let seq = s.journal.len() as u64;
                if let Some(r) = s.reconcile.as_mut() {
                    r.local(seq, w.object, false);
                }
                if w.guarded {
                    self.history.entry(w.object).or_default().push(w.uid);
                    self.guarded.insert(w.uid);
                    if let Some(v) = self.guarded_now.get_mut(&w.object) {
                        v.retain(|(_, u)| *u != w.uid);
                    }
                }
                self.event(
                    i,
                    Event::Written {
                        object: w.object,
                        seq,
                        guarded: w.guarded,
                    },
                )?;
            }
        }
        Ok(())
    }

    fn advance_apply(&mut self, rng: &mut SimRng<'_>, i: usize) -> Step {
        let s = &mut self.sites[i];
        if !s.alive() || s.applied >= s.received.len() {
            return Ok(());
        }
        let to = (s.applied + rng.range(1, 8) as usize).min(s.received.len());
        self.apply_through(i, to)?;
        self.event(i, Event::PeerApplied { seq: to as u64 })
    }

    /// Site `i` applies the peer's records up to `to` (a count), each first through the
    /// reconciliation machine (invariant 6); the watermark is durable with `applied`.
    fn apply_through(&mut self, i: usize, to: usize) -> Step {
        let wins = self.sites[i].config.site < self.sites[i].config.peer;
        for at in self.sites[i].applied..to {
            let s = &mut self.sites[i];
            let (object, uid) = s.received[at];
            let (seen, guarded) = s.received_meta[at];
            // By brute force: our writes of the object the peer had not applied.
            let newer: Vec<(u64, bool)> = s
                .journal
                .iter()
                .zip(&s.journal_meta)
                .enumerate()
                .filter(|(k, ((o, _), _))| *o == object && *k as u64 + 1 > seen)
                .map(|(k, (_, (_, g)))| (k as u64 + 1, *g))
                .collect();
            let concurrent = !newer.is_empty();
            if guarded && newer.iter().any(|(_, g)| *g) {
                return Err(format!(
                    "site {i}: the peer's guarded write {uid} to object {object} is concurrent with our guarded write(s) {newer:?}"
                ));
            }
            let Some(r) = s.reconcile.as_mut() else {
                return Err(format!("site {i} applies while crashed"));
            };
            let d = r.peer_record(Some(object), seen);
            let last_own = newer.last().map_or(0, |(k, _)| *k);
            match (concurrent, wins, d) {
                (false, _, Decision::Apply) => {}
                (true, true, Decision::Skip { .. }) => self.stats.skipped += 1,
                (true, false, Decision::CopyThenApply) => {
                    s.copied_after.insert(object, last_own);
                    self.stats.copies += 1;
                }
                (true, false, Decision::Apply)
                    if s.copied_after.get(&object).is_some_and(|c| *c >= last_own) => {}
                (c, _, d) => {
                    return Err(format!(
                        "site {i} (winner {wins}): the peer's write {uid} to object {object} (seen {seen}) is {} with our writes {newer:?}, and the machine said {d:?}",
                        if c { "concurrent" } else { "not concurrent" }
                    ))
                }
            }
            if concurrent {
                self.stats.concurrent += 1;
                if self.quorum.is_some() {
                    self.stats.quorum_concurrent += 1;
                }
            }
            s.replica.entry(object).or_default().push(uid);
            s.applied = at + 1;
        }
        let s = &mut self.sites[i];
        if let Some(r) = &s.reconcile {
            s.persisted_seen = r.seen_by_peer();
        }
        Ok(())
    }

    fn advance_ship(&mut self, rng: &mut SimRng<'_>, i: usize) -> Step {
        if !self.sites[i].alive() {
            return Ok(());
        }
        let through = self.sites[i].shipped + rng.range(1, 8);
        if self.ship(i, through) {
            let seq = self.sites[i].shipped;
            self.event(i, Event::Shipped { seq })?;
        }
        Ok(())
    }

    fn open_close(&mut self, rng: &mut SimRng<'_>, open: bool) -> Step {
        let i = rng.below(2) as usize;
        let object = FIRST_OBJECT + rng.below(self.objects);
        let s = &mut self.sites[i];
        if !s.alive() {
            return Ok(());
        }
        // A name of the hard-linked file opened for writing holds the shared token in place of
        // its name's (the shell's `note_opened`).
        let object = if self.linked.contains(&object) {
            HARD_LINKED
        } else {
            object
        };
        let n = s.open.entry(object).or_default();
        if open && *n < 2 {
            *n += 1;
            self.event(i, Event::Opened { object })
        } else if !open && *n > 0 {
            *n -= 1;
            self.event(i, Event::Closed { object })
        } else {
            Ok(())
        }
    }

    /// Delivers the items whose time came, in order, per direction.
    fn deliver(&mut self, rng: &mut SimRng<'_>) -> Step {
        for from in 0..2 {
            let to = 1 - from;
            while self.link_up
                && self.links[from]
                    .front()
                    .is_some_and(|(t, _)| *t <= self.now)
            {
                let Some((_, item)) = self.links[from].pop_front() else {
                    break;
                };
                match item {
                    Item::Record {
                        seq,
                        object,
                        uid,
                        seen,
                        guarded,
                    } => {
                        let s = &mut self.sites[to];
                        let r = &mut s.received;
                        if seq == r.len() as u64 + 1 {
                            r.push((object, uid));
                            s.received_meta.push((seen, guarded));
                        } else if seq > r.len() as u64 + 1 {
                            return Err(format!("site {to} received seq {seq} after {}", r.len()));
                        }
                    }
                    Item::Token(bytes) => {
                        let mut d = Decoder::new();
                        d.push(&bytes);
                        let msg = match d.next_msg() {
                            Ok(Some(Msg::Token(m))) => m,
                            other => return Err(format!("token message decoded as {other:?}")),
                        };
                        if let TokenMsg::Grant { object, seq, .. } = msg {
                            self.stats.grants += 1;
                            let got = self.sites[to].received.len() as u64;
                            if got < seq {
                                return Err(format!(
                                    "site {to} got the Grant of object {object} at seq {seq} with records through {got} only"
                                ));
                            }
                        }
                        match msg {
                            TokenMsg::Probe { .. } | TokenMsg::Answer { .. } => {
                                self.quorum_msg(to, msg)?
                            }
                            _ => self.event(to, Event::Received(msg))?,
                        }
                    }
                }
                if rng.chance(1, 1000) {
                    // A cut in the middle of the stream.
                    return self.disconnect();
                }
            }
        }
        Ok(())
    }

    fn connect(&mut self) -> Step {
        if self.link_up || !self.sites.iter().all(SimSite::alive) {
            return Ok(());
        }
        self.link_up = true;
        self.split_since = None;
        if let Some(t) = self.trace.as_mut() {
            t.push(format!("{} link up", self.now));
        }
        for i in 0..2 {
            self.sites[i].shipped = self.sites[1 - i].received.len() as u64;
        }
        for i in 0..2 {
            let shipped = self.sites[i].shipped;
            self.event(i, Event::Connected { shipped })?;
        }
        Ok(())
    }

    fn disconnect(&mut self) -> Step {
        if !self.link_up {
            return Ok(());
        }
        self.stats.disconnects += 1;
        if let Some(t) = self.trace.as_mut() {
            t.push(format!("{} link down", self.now));
        }
        self.link_up = false;
        self.split_since = Some(self.now);
        self.links = [VecDeque::new(), VecDeque::new()];
        for s in &mut self.sites {
            for p in s.parked.values_mut() {
                p.healthy = false;
            }
        }
        for i in 0..2 {
            self.event(i, Event::Disconnected)?;
        }
        Ok(())
    }

    fn crash(&mut self, rng: &mut SimRng<'_>) -> Step {
        let i = rng.below(2) as usize;
        if self.sites[i].alive() {
            self.crash_site(i)?;
        }
        Ok(())
    }

    /// Site `i` dies: what was not durable is gone, its parked and unjournaled writes were
    /// never acknowledged.
    fn crash_site(&mut self, i: usize) -> Step {
        self.stats.crashes += 1;
        if let Some(t) = self.trace.as_mut() {
            t.push(format!("{} site {i}: CRASH", self.now));
        }
        self.sites[i].machine = None;
        self.sites[i].reconcile = None;
        self.sites[i].gate = None;
        self.sites[i].keeper = None;
        self.sites[i].incarnation += 1;
        self.disconnect()?;
        let now = self.now;
        let s = &mut self.sites[i];
        self.stats.lost_with_crash += s.parked.len() as u64;
        s.parked.clear();
        for w in s.writing.drain(..) {
            if let Some(v) = self.guarded_now.get_mut(&w.object) {
                v.retain(|(_, u)| *u != w.uid);
            }
        }
        s.open.clear();
        s.shipped = 0;
        s.down_until = now + 50 + now % 300;
        for p in self.sites[1 - i].parked.values_mut() {
            p.healthy = false;
        }
        Ok(())
    }

    fn restart_due(&mut self) -> Step {
        for i in 0..2 {
            let s = &mut self.sites[i];
            if s.alive() || self.now < s.down_until {
                continue;
            }
            let end = s.journal.len() as u64;
            s.machine = Some(TokenSite::recover(s.config.clone(), self.now, &s.log, end));
            // The reconciliation machine from the journal after the persisted watermark (what
            // `SiteReconcile::rebuild` does; all own records here, the peer's are elsewhere).
            let mut r = Reconciler::new(
                ReconcileConfig::new(s.config.site, s.config.peer),
                s.persisted_seen,
            );
            for (k, (object, _)) in s.journal.iter().enumerate() {
                let seq = k as u64 + 1;
                if seq > s.persisted_seen {
                    r.local(seq, *object, false);
                }
            }
            s.reconcile = Some(r);
            // A copy aside made before the crash is still on disk, but the machine forgot it:
            // it may copy again (an extra copy, nothing lost).
            s.copied_after.clear();
            let applied = s.applied as u64;
            self.start_quorum(i);
            self.event(i, Event::PeerApplied { seq: applied })?;
        }
        Ok(())
    }

    /// The final heal: no new writes, files closed, the link up until the streams are drained;
    /// then invariants 4 and 5.
    fn finish(&mut self, rng: &mut SimRng<'_>) -> Step {
        self.kill = None;
        for i in 0..2 {
            if !self.sites[i].alive() {
                self.sites[i].down_until = 0;
            }
        }
        self.restart_due()?;
        if let Some(q) = self.quorum.as_mut() {
            q.up = [true, true];
            q.down_until = 0;
        }
        self.restart_witness();
        for i in 0..2 {
            let open: Vec<(ObjectId, u32)> =
                self.sites[i].open.iter().map(|(o, n)| (*o, *n)).collect();
            self.sites[i].open.clear();
            for (object, n) in open {
                for _ in 0..n {
                    self.event(i, Event::Closed { object })?;
                }
            }
        }
        self.connect()?;
        let end = self.now + 20_000;
        while self.now < end {
            self.now += rng.range(1, 8);
            self.deliver_all()?;
            self.complete_writes()?;
            for i in 0..2 {
                let to = self.sites[i].journal.len() as u64;
                if self.ship(i, to) {
                    let seq = self.sites[i].shipped;
                    self.event(i, Event::Shipped { seq })?;
                }
                let s = &self.sites[i];
                if s.applied < s.received.len() {
                    self.apply_through(i, s.received.len())?;
                    let seq = self.sites[i].applied as u64;
                    self.event(i, Event::PeerApplied { seq })?;
                }
                self.tick_site(i)?;
            }
            self.witness_step(rng)?;
            self.check()?;
        }
        for (i, s) in self.sites.iter().enumerate() {
            if !s.parked.is_empty() || !s.writing.is_empty() {
                return Err(format!(
                    "site {i}: {} writes still parked, {} in progress after the heal",
                    s.parked.len(),
                    s.writing.len()
                ));
            }
        }
        self.check_no_loss()
    }

    /// Delivers everything due on the link, with no cut (the end of a run).
    fn deliver_all(&mut self) -> Step {
        let mut never = || 1u64;
        let mut no_cut = SimRng::new(&mut never);
        self.deliver(&mut no_cut)
    }

    /// Invariant 5.
    fn check_no_loss(&self) -> Step {
        let mut all: BTreeMap<ObjectId, Vec<Uid>> = BTreeMap::new();
        for s in &self.sites {
            for (object, uid) in &s.journal {
                all.entry(*object).or_default().push(*uid);
            }
        }
        for (i, s) in self.sites.iter().enumerate() {
            for (object, uids) in &all {
                let mut want = uids.clone();
                want.sort_unstable();
                let mut have = s.replica.get(object).cloned().unwrap_or_default();
                have.sort_unstable();
                if have != want {
                    return Err(format!(
                        "site {i} holds writes {have:?} of object {object}, journaled: {want:?}"
                    ));
                }
                let history = self.history.get(object).cloned().unwrap_or_default();
                if self.guarded_order(i, *object) != history {
                    return Err(format!(
                        "site {i} applied the guarded writes of object {object} out of order"
                    ));
                }
            }
        }
        Ok(())
    }
}
