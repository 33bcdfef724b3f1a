//! Write tokens of two writable sites (issue 7 item 5): the thin I/O shell of
//! `mirrorfs_core::token::TokenSite`. The machine decides; this module keeps its table durable in
//! `STATE/tokens`, carries out its actions in order, and blocks a writer until its write may go.
//!
//! ```text
//!  writer ── acquire(object) ─▶ TokenGate { Mutex<TokenSite + TokenLog> } ── Send ─▶ link
//!     ▲                              │ Persist: append + fdatasync (T1 Away, T2 Held)
//!     └── Permit (Proceed) ◀─────────┘ Refuse → GateError (EROFS across a split, …)
//!  link ── received / connected / disconnected / shipped / peer_applied ─▶ TokenGate
//!  ticker thread ── tick every 10 ms ─▶ TokenGate (idle give-backs, hold_max, park timeouts)
//! ```
//!
//! **Durability.** `STATE/tokens` is a log of the machine's 48-byte records (layout in
//! `docs/protocol.md`, "Write tokens"), the last record of an object winning. Every
//! `Action::Persist` is appended and `fdatasync`ed before the next action is carried out:
//! - **T1** — an `Away` record (this site grants the token) is durable before the `TokenGrant`
//!   leaves, so a crashed granter never believes it still holds a token it gave;
//! - **T2** — a `Held` record (this site takes the token) is durable before any write under it
//!   proceeds and before the `TokenAck` leaves, so a crashed taker still holds it after the
//!   restart and the other site never believes it holds it too.
//!
//! `Forget` records are synced the same way (they only drop an entry the home then holds). A
//! crash can tear only the last record (each is synced before the next is written): a torn or
//! damaged last record is cut at open; damage before it is refused with what to do. At open the
//! log is compacted (the live entries, after one record carrying the lend counter, replaced
//! durably), and again during a run once it holds twice the live entries plus 4,096 records.
//!
//! **Wiring** (`mount --write-tokens SITE:PEER`, README "Two writable sites"): the mount opens
//! one gate and puts it on the volume; `Volume::mutate` acquires the tokens of every change
//! through the mount before it is journaled ([`TokenGate::acquire_all`]): the names
//! `token::names_of` lists (a data or metadata change its file's name, a namespace change the
//! name it makes or removes, a rename or link both names), each object being [`object_of`] its
//! path, taken in `token::acquire_order`. The link to the peer (`net::remote`, through [`TokenWire`]) reports
//! `connected`/`disconnected`/`shipped` and sends the gate's messages after the records it sent;
//! the peer receiver (`net::peer`) hands it the peer's messages (`received`) and how far the
//! peer's records are applied (`peer_applied`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
#[cfg(test)]
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
#[cfg(test)]
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mirrorfs_core::quorum::{Decision, Gate as QuorumGate, Mode};
use mirrorfs_core::token::{
    Action, Event, ObjectId, PartitionPolicy, Refusal, TokenConfig, TokenMsg, TokenRecord,
    TokenSite, WriteId, RECORD_BYTES,
};

use crate::site::state_dir::StateDir;
use crate::site::statefile;
use crate::site::volume::lock;

/// `STATE/tokens` larger than this is refused at open (a table of 4,096 entries compacts to
/// 200 KiB; this is damage or a foreign file).
pub const LOG_BYTES_MAX: u64 = 64 << 20;
/// How often the ticker drives the machine's timings.
pub const TICK: Duration = Duration::from_millis(10);
/// A log is compacted during a run once it holds twice its live entries plus this many records
/// (fewer in the tests, whose disk fsyncs slowly).
const COMPACT_SLACK: u64 = if cfg!(test) { 64 } else { 4096 };

/// The token table's log, `STATE/tokens`.
pub struct TokenLog {
    path: PathBuf,
    file: File,
    /// The last non-`Forget` record of each object (what a compaction keeps).
    live: BTreeMap<ObjectId, TokenRecord>,
    lend_next: u64,
    /// Records in the file.
    records: u64,
}

impl TokenLog {
    /// Opens (or creates) the log at `path`: reads its records, cuts a torn last record,
    /// compacts it durably, and returns the records for `TokenSite::recover`.
    pub fn open(path: &Path) -> Result<(TokenLog, Vec<TokenRecord>)> {
        let mut bytes = Vec::new();
        match File::open(path) {
            Ok(f) => {
                let len = f
                    .metadata()
                    .with_context(|| format!("cannot stat {}", path.display()))?
                    .len();
                if len > LOG_BYTES_MAX {
                    bail!(
                        "{} holds {len} bytes, more than a write-token log ever does ({LOG_BYTES_MAX}): it is damaged or not ours; stop both sites and move it away at both sites together (every token then rests at the home site, the lower site id)",
                        path.display()
                    );
                }
                f.take(LOG_BYTES_MAX)
                    .read_to_end(&mut bytes)
                    .with_context(|| format!("cannot read {}", path.display()))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        }
        let records = decode_log(path, &bytes)?;
        let mut live = BTreeMap::new();
        let mut lend_next = 1;
        for r in &records {
            note(&mut live, &mut lend_next, r);
        }
        let mut log = TokenLog {
            path: path.to_path_buf(),
            // Replaced by `compact` at once.
            file: open_append(path)?,
            live,
            lend_next,
            records: 0,
        };
        log.compact()
            .with_context(|| format!("cannot compact {}", path.display()))?;
        let kept = log.image();
        Ok((log, kept))
    }

    /// The records a compaction writes: one carrying the lend counter (a `Forget` of an object
    /// no earlier record names, so it drops nothing), then each live entry.
    fn image(&self) -> Vec<TokenRecord> {
        let carrier = TokenRecord {
            object: 0,
            kind: mirrorfs_core::token::RecordKind::Forget,
            lend: 0,
            seq: 0,
            lend_next: self.lend_next,
        };
        std::iter::once(carrier)
            .chain(self.live.values().copied())
            .collect()
    }

    /// Replaces the file durably with [`TokenLog::image`] and reopens it for appending.
    fn compact(&mut self) -> io::Result<()> {
        let image = self.image();
        let mut bytes = Vec::with_capacity(image.len() * RECORD_BYTES);
        for r in &image {
            bytes.extend_from_slice(&r.encode());
        }
        statefile::replace_durable(&self.path, &bytes, 0o600)?;
        self.file = open_append(&self.path)?;
        self.records = image.len() as u64;
        Ok(())
    }

    /// Appends `r` and makes it durable (T1 for `Away`, T2 for `Held`; see the module docs).
    pub fn persist(&mut self, r: &TokenRecord) -> io::Result<()> {
        self.file.write_all(&r.encode())?;
        self.file.sync_data()?;
        self.records += 1;
        note(&mut self.live, &mut self.lend_next, r);
        if self.records >= 2 * self.live.len() as u64 + COMPACT_SLACK {
            self.compact()?;
        }
        Ok(())
    }

    /// (Tests and the shell's own checks.)
    #[cfg(test)]
    /// Records in the file now.
    pub fn records(&self) -> u64 {
        self.records
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

fn note(live: &mut BTreeMap<ObjectId, TokenRecord>, lend_next: &mut u64, r: &TokenRecord) {
    *lend_next = (*lend_next).max(r.lend_next).max(r.lend.saturating_add(1));
    match r.kind {
        mirrorfs_core::token::RecordKind::Forget => {
            live.remove(&r.object);
        }
        _ => {
            live.insert(r.object, *r);
        }
    }
}

/// The records of a log's bytes; a torn or damaged *last* record is cut (a crash while it was
/// written), damage before it refused.
fn decode_log(path: &Path, bytes: &[u8]) -> Result<Vec<TokenRecord>> {
    let whole = bytes.len() / RECORD_BYTES;
    let mut out = Vec::with_capacity(whole);
    for (i, chunk) in bytes.chunks(RECORD_BYTES).enumerate() {
        let last = i + 1 >= bytes.len().div_ceil(RECORD_BYTES);
        match TokenRecord::decode(chunk) {
            Ok(r) => out.push(r),
            Err(e) if last => {
                tracing::warn!(
                    "{}: cut a torn last write-token record at byte {} ({e}): a crash while it was written",
                    path.display(),
                    i * RECORD_BYTES
                );
            }
            Err(e) => bail!(
                "{} is damaged at byte {} ({e}), before its last record: the write-token table cannot be trusted. Stop both sites, then move STATE/tokens away at both sites together (every token then rests at the home site, the lower site id)",
                path.display(),
                i * RECORD_BYTES
            ),
        }
    }
    Ok(out)
}

/// Carries a token message to the peer (in order, after the records already sent). Called under
/// the gate's lock: it must not block (a bounded queue that is full answers false). Returns false
/// if the link cannot take it: the gate drops the sender, and the shell reports
/// [`TokenGate::disconnected`] (then `connected` again), which asks and grants anew.
pub type Sender = Box<dyn FnMut(TokenMsg) -> bool + Send>;

/// Why a write may not go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    #[error("{0}")]
    Refused(Refusal),
    #[error("the write-token table could not be made durable ({0}): writes are refused until the site restarts")]
    Failed(String),
}

impl GateError {
    /// The errno a file system call answers with.
    pub fn errno(&self) -> i32 {
        match self {
            GateError::Refused(Refusal::ReadOnly | Refusal::NoQuorum) => libc::EROFS,
            GateError::Refused(Refusal::Timeout) => libc::ETIMEDOUT,
            GateError::Refused(_) => libc::EAGAIN,
            GateError::Failed(_) => libc::EIO,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Answer {
    Go { guarded: bool },
    No(Refusal),
}

/// Counters for `status` and the tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateStats {
    /// Token messages handed to the link.
    pub sent: u64,
    /// Records made durable (T1, T2 and forgets).
    pub persisted: u64,
    /// Writes that had to wait for a token.
    pub parked: u64,
    /// Writes refused.
    pub refused: u64,
}

struct Inner {
    site: TokenSite,
    log: TokenLog,
    send: Option<Sender>,
    next_write: WriteId,
    answers: HashMap<WriteId, Answer>,
    failed: Option<String>,
    stats: GateStats,
    connected: bool,
    /// The last write refused, for `status`: what, why, when (unix seconds).
    last_refusal: Option<(String, String, i64)>,
    /// `--partition quorum`: the quorum's machine as the gate composes it with the token
    /// machine (`core::quorum::Gate`).
    quorum: Option<QuorumGate>,
}

/// One site's write tokens: the machine, its log and the writers waiting on it.
pub struct TokenGate {
    inner: Mutex<Inner>,
    answered: Condvar,
    epoch: Instant,
    /// `--partition quorum`: the witness's partition lease (kept by `net::witness::keep_lease`
    /// once the peer's volume is known). Unset: no lease.
    pub lease: std::sync::OnceLock<Arc<crate::site::fence::Fence>>,
}

/// A write that may go on. Tell the gate where it was journaled with [`Permit::written`];
/// dropped without it, the write counts as failed (nothing journaled).
pub struct Permit<'a> {
    gate: &'a TokenGate,
    object: ObjectId,
    guarded: bool,
    done: bool,
}

impl Permit<'_> {
    /// (Tests and the shell's own checks.)
    #[cfg(test)]
    /// True if the write holds the token; false if it goes on across a split (`reconcile`).
    pub fn guarded(&self) -> bool {
        self.guarded
    }

    /// The write is journaled at `seq`.
    pub fn written(mut self, seq: u64) {
        self.done = true;
        self.gate.event(Event::Written {
            object: self.object,
            seq,
            guarded: self.guarded,
        });
    }
}

/// The permits of one change (one per token it took, see [`TokenGate::acquire_all`]).
pub struct Permits<'a>(Vec<Permit<'a>>);

impl Permits<'_> {
    /// The change is journaled at `seq`: every token it took covers it.
    pub fn written(self, seq: u64) {
        for p in self.0 {
            p.written(seq);
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.gate.event(Event::Written {
                object: self.object,
                seq: 0,
                guarded: self.guarded,
            });
        }
    }
}

impl TokenGate {
    /// The gate of a site whose token log is `path`, whose journal ends at `journal_end` and
    /// whose applier has applied the peer's records through `peer_applied`. Starts disconnected.
    pub fn open(
        path: &Path,
        config: TokenConfig,
        journal_end: u64,
        peer_applied: u64,
    ) -> Result<TokenGate> {
        let (log, records) = TokenLog::open(path)?;
        let epoch = Instant::now();
        let mut site = TokenSite::recover(config, 0, &records, journal_end);
        // Recovery and the applied position make no actions that need carrying out: nothing is
        // connected and nothing is parked.
        let _ = site.handle(0, Event::PeerApplied { seq: peer_applied });
        Ok(TokenGate {
            inner: Mutex::new(Inner {
                site,
                log,
                send: None,
                next_write: 1,
                answers: HashMap::new(),
                failed: None,
                stats: GateStats::default(),
                connected: false,
                last_refusal: None,
                quorum: None,
            }),
            answered: Condvar::new(),
            epoch,
            lease: std::sync::OnceLock::new(),
        })
    }

    /// The gate of the site whose state directory is `state` (its log is `STATE/tokens`).
    pub fn open_in(
        state: &StateDir,
        config: TokenConfig,
        journal_end: u64,
        peer_applied: u64,
    ) -> Result<TokenGate> {
        TokenGate::open(&state.tokens_file(), config, journal_end, peer_applied)
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// `--partition quorum`: starts the quorum (`core::quorum`) with a link lease of `ttl_ms`,
    /// the journal ending at `journal_end` and the peer's records applied through `applied`.
    pub fn start_quorum(&self, ttl_ms: u64, journal_end: u64, applied: u64) {
        let mut inner = lock(&self.inner);
        inner.quorum = Some(QuorumGate::new(self.now(), ttl_ms, journal_end, applied));
    }

    /// Whether this site holds the witness's partition lease now.
    fn lease_held(&self) -> bool {
        self.lease.get().is_some_and(|f| f.check().is_ok())
    }

    /// The quorum's decision now (`None` without `--partition quorum`); tells the token machine
    /// when the majority begins or ends.
    fn quorum_decide(&self, inner: &mut Inner) -> Option<Decision> {
        let now = self.now();
        let lease = self.lease_held();
        let (d, change) = inner.quorum.as_mut()?.decide(now, lease);
        if let Some(change) = change {
            if d == Decision::Everything {
                tracing::warn!(
                    "the peer does not answer and this site holds the witness's partition lease: it writes every file, those whose token is at the peer too"
                );
            } else {
                tracing::info!("no longer the majority of a split: write tokens decide again");
            }
            self.run(inner, change);
        }
        Some(d)
    }

    /// `status`'s line for the quorum (`None` without `--partition quorum`).
    fn quorum_text(&self, inner: &Inner) -> Option<String> {
        let q = inner.quorum.as_ref()?;
        let fence = self.lease.get();
        let lease = fence.map(|f| f.check());
        let held = matches!(lease, Some(Ok(())));
        Some(match q.quorum().mode(self.now(), held) {
            Mode::Linked => "linked: the peer answers, write tokens decide".into(),
            Mode::Majority => "writable: the peer is unreachable and this site holds the witness's partition lease (it writes every file, those whose token is at the peer too)".into(),
            Mode::Waiting { left_ms } => format!(
                "the peer is unreachable and this site holds the witness's partition lease: files whose token is at the peer are read-only for {left_ms} ms more (the peer may write them until then)"
            ),
            Mode::Minority => match lease {
                Some(Err(f)) => match f
                    .reason
                    .strip_prefix("held by site ")
                    .and_then(|r| r.split(" (generation ").next())
                {
                    Some(holder) => format!(
                        "read-only: the peer is unreachable and the witness gave the partition lease to site {holder}"
                    ),
                    None => format!(
                        "read-only: the peer is unreachable and no lease from the witness ({})",
                        f.reason
                    ),
                },
                _ => "read-only: the peer is unreachable and no lease from the witness (the peer's volume is not known yet: never connected)".into(),
            },
        })
    }

    fn event(&self, event: Event) {
        let mut inner = lock(&self.inner);
        self.run(&mut inner, event);
    }

    /// Hands `event` to the machine and carries out its actions in order; a failed persist
    /// stops the rest (nothing after it may happen) and fails the gate.
    fn run(&self, inner: &mut Inner, event: Event) {
        if let Some(q) = inner.quorum.as_mut() {
            q.observe(&event);
        }
        let actions = inner.site.handle(self.now(), event);
        let mut woke = false;
        for action in actions {
            if inner.failed.is_some() {
                break;
            }
            match action {
                Action::Persist(r) => match inner.log.persist(&r) {
                    Ok(()) => inner.stats.persisted += 1,
                    Err(e) => {
                        tracing::error!(
                            "cannot make the write-token table durable in {}: {e}; writes are refused until the site restarts",
                            inner.log.path.display()
                        );
                        inner.failed = Some(e.to_string());
                        woke = true;
                    }
                },
                Action::Send(m) => {
                    if let Some(send) = inner.send.as_mut() {
                        inner.stats.sent += 1;
                        if !send(m) {
                            // The link went; the shell reports it. Grants are sent again on
                            // the next connection.
                            inner.send = None;
                        }
                    }
                }
                // The link sends every durable, settled record at once (`net::remote`): the
                // hint asks for nothing more.
                Action::Ship { .. } => {}
                Action::Proceed { write, guarded, .. } => {
                    inner.answers.insert(write, Answer::Go { guarded });
                    woke = true;
                }
                Action::Refuse { write, reason, .. } => {
                    inner.stats.refused += 1;
                    inner.answers.insert(write, Answer::No(reason));
                    woke = true;
                }
            }
        }
        if woke {
            self.answered.notify_all();
        }
    }

    /// Waits until a write to `object` may go on (at once if this site holds its token).
    pub fn acquire(&self, object: ObjectId) -> Result<Permit<'_>, GateError> {
        let mut inner = lock(&self.inner);
        if let Some(e) = &inner.failed {
            return Err(GateError::Failed(e.clone()));
        }
        if let Some(d) = self.quorum_decide(&mut inner) {
            if !d.admits(inner.site.holds(object)) {
                return Err(self.refuse(&mut inner, Refusal::NoQuorum));
            }
        }
        let write = inner.next_write;
        inner.next_write += 1;
        self.run(&mut inner, Event::Write { write, object });
        let mut parked = false;
        loop {
            if let Some(answer) = inner.answers.remove(&write) {
                // The quorum again, at the moment the write goes (it may have waited): a site
                // that is no longer linked or the majority does not write.
                let proceeded = match answer {
                    Answer::Go { guarded } => Some(guarded),
                    Answer::No(_) => None,
                };
                let allowed = self
                    .quorum_decide(&mut inner)
                    .is_none_or(|d| d.goes(proceeded));
                if !allowed {
                    if let Answer::Go { guarded } = answer {
                        self.run(
                            &mut inner,
                            Event::Written {
                                object,
                                seq: 0,
                                guarded,
                            },
                        );
                    }
                    return Err(self.refuse(&mut inner, Refusal::NoQuorum));
                }
                return match answer {
                    Answer::Go { guarded } => Ok(Permit {
                        gate: self,
                        object,
                        guarded,
                        done: false,
                    }),
                    Answer::No(r) => Err(GateError::Refused(r)),
                };
            }
            if let Some(e) = &inner.failed {
                return Err(GateError::Failed(e.clone()));
            }
            if !parked {
                parked = true;
                inner.stats.parked += 1;
            }
            // The waiter drives the timings too, so a parked write times out without a ticker.
            let (guard, _) = self
                .answered
                .wait_timeout(inner, TICK)
                .unwrap_or_else(|e| e.into_inner());
            inner = guard;
            self.run(&mut inner, Event::Tick);
        }
    }

    /// Counts a refusal the gate made itself (the quorum's).
    fn refuse(&self, inner: &mut Inner, r: Refusal) -> GateError {
        inner.stats.refused += 1;
        GateError::Refused(r)
    }

    /// Waits until a change of several objects may go on, taking their tokens one after the
    /// other in `token::acquire_order` (the same at both sites, so two such changes never wait
    /// for each other in a cycle). The first refusal gives back what was taken (the permits
    /// drop as failed) and names the object refused.
    pub fn acquire_all(
        &self,
        objects: Vec<ObjectId>,
    ) -> Result<Permits<'_>, (ObjectId, GateError)> {
        let mut permits: Vec<Permit<'_>> = Vec::new();
        for object in mirrorfs_core::token::acquire_order(objects) {
            match self.acquire(object) {
                Ok(p) => permits.push(p),
                Err(e) => return Err((object, e)),
            }
        }
        if permits.len() > 1 {
            // The quorum for the whole change once its last token is taken: a token taken
            // earlier without it, in majority, is stale if the majority ended meanwhile
            // (`core::quorum::Decision::goes_together`). The permits drop as failed.
            let mut inner = lock(&self.inner);
            let guarded: Vec<bool> = permits.iter().map(|p| p.guarded).collect();
            if let Some(d) = self.quorum_decide(&mut inner) {
                if !d.goes_together(&guarded) {
                    let e = self.refuse(&mut inner, Refusal::NoQuorum);
                    drop(inner);
                    let object = permits.first().map_or(0, |p| p.object);
                    return Err((object, e));
                }
            }
        }
        Ok(Permits(permits))
    }

    /// A file of `object` was opened for writing (the token stays while it is open, up to the
    /// machine's `hold_max_ms` once the peer asks).
    pub fn opened(&self, object: ObjectId) {
        self.event(Event::Opened { object });
    }

    /// A file of `object` opened for writing was closed.
    pub fn closed(&self, object: ObjectId) {
        self.event(Event::Closed { object });
    }

    /// The link is up: token messages go through `send`; the peer holds our records through
    /// `shipped`.
    pub fn connected(&self, shipped: u64, send: Sender) {
        let mut inner = lock(&self.inner);
        inner.send = Some(send);
        inner.connected = true;
        self.run(&mut inner, Event::Connected { shipped });
    }

    /// The link is down: writes to tokens across it are decided by the partition policy.
    pub fn disconnected(&self) {
        let mut inner = lock(&self.inner);
        inner.send = None;
        inner.connected = false;
        self.run(&mut inner, Event::Disconnected);
    }

    /// The stream has sent our records through `seq`.
    pub fn shipped(&self, seq: u64) {
        self.event(Event::Shipped { seq });
    }

    /// The peer's records through `seq` are applied here.
    pub fn peer_applied(&self, seq: u64) {
        let mut inner = lock(&self.inner);
        self.run(&mut inner, Event::PeerApplied { seq });
    }

    /// A token message from the peer (the quorum's probes and answers go to the quorum).
    pub fn received(&self, msg: TokenMsg) {
        let mut inner = lock(&self.inner);
        let now = self.now();
        match msg {
            TokenMsg::Probe { nonce } => {
                let in_flight = inner.site.unguarded() > 0;
                let answer = inner
                    .quorum
                    .as_mut()
                    .and_then(|q| q.on_probe(now, nonce, in_flight));
                if let Some(answer) = answer {
                    self.send(&mut inner, answer);
                }
                // The promise may end this site's majority at once.
                self.quorum_decide(&mut inner);
            }
            TokenMsg::Answer { nonce, seq } => {
                if let Some(q) = inner.quorum.as_mut() {
                    q.on_answer(now, nonce, seq);
                }
                self.quorum_decide(&mut inner);
            }
            _ => self.run(&mut inner, Event::Received(msg)),
        }
    }

    /// Sends `msg` on the link if it is up.
    fn send(&self, inner: &mut Inner, msg: TokenMsg) {
        if let Some(send) = inner.send.as_mut() {
            inner.stats.sent += 1;
            if !send(msg) {
                inner.send = None;
            }
        }
    }

    /// Drives the timings (idle give-backs, `hold_max_ms`, park timeouts; the quorum's probes
    /// and its majority).
    pub fn tick(&self) {
        let mut inner = lock(&self.inner);
        let now = self.now();
        if let Some(probe) = inner.quorum.as_mut().and_then(|q| q.tick(now)) {
            self.send(&mut inner, probe);
        }
        self.quorum_decide(&mut inner);
        self.run(&mut inner, Event::Tick);
    }

    /// (Tests and the shell's own checks.)
    #[cfg(test)]
    /// Starts a thread that ticks every [`TICK`] until `stop` is set.
    pub fn spawn_ticker(self: &Arc<Self>, stop: Arc<AtomicBool>) -> io::Result<JoinHandle<()>> {
        let gate = self.clone();
        std::thread::Builder::new()
            .name("tokens".into())
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(TICK);
                    gate.tick();
                }
            })
    }

    /// (Tests and the shell's own checks.)
    #[cfg(test)]
    /// Where the token of `object` is, as this site sees it.
    pub fn state(&self, object: ObjectId) -> mirrorfs_core::token::TokenState {
        lock(&self.inner).site.state(object)
    }

    /// (Tests and the shell's own checks.)
    #[cfg(test)]
    pub fn stats(&self) -> GateStats {
        lock(&self.inner).stats
    }

    /// The site runs `--partition quorum`.
    pub fn is_quorum(&self) -> bool {
        lock(&self.inner).quorum.is_some()
    }

    /// (this site's id, the peer's).
    pub fn ids(&self) -> (u64, u64) {
        let inner = lock(&self.inner);
        let c = inner.site.config();
        (c.site, c.peer)
    }

    /// A write to `what` was refused with `e`: kept for `status`.
    pub fn note_refusal(&self, what: &str, e: &GateError) {
        lock(&self.inner).last_refusal =
            Some((what.to_string(), e.to_string(), crate::sys::now().sec));
    }

    /// What `status` shows.
    pub fn status(&self) -> TokenStatus {
        let inner = lock(&self.inner);
        let c = inner.site.config();
        TokenStatus {
            site: c.site,
            peer: c.peer,
            home: c.site < c.peer,
            policy: match c.policy {
                PartitionPolicy::ReadOnly => "read-only",
                PartitionPolicy::Reconcile => "reconcile",
                PartitionPolicy::Quorum => "quorum",
            }
            .into(),
            quorum: self.quorum_text(&inner),
            connected: inner.connected,
            entries: inner.site.len() as u64,
            parked_now: inner.site.parked() as u64,
            messages_sent: inner.stats.sent,
            records_persisted: inner.stats.persisted,
            writes_parked: inner.stats.parked,
            writes_refused: inner.stats.refused,
            failed: inner.failed.clone(),
            last_refusal: inner
                .last_refusal
                .as_ref()
                .map(|(what, why, at)| format!("{what}: {why} (at unix time {at})")),
        }
    }
}

/// The gate in `mirrorfs status` (`write_tokens`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TokenStatus {
    pub site: u64,
    pub peer: u64,
    /// This site is the home of every token no table names (the lower id).
    pub home: bool,
    pub policy: String,
    /// The link to the peer is up (token messages travel).
    pub connected: bool,
    /// Tokens this site's table names (held from the home, or lent by it).
    pub entries: u64,
    pub parked_now: u64,
    pub messages_sent: u64,
    pub records_persisted: u64,
    pub writes_parked: u64,
    pub writes_refused: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// The last write refused: the file, why, when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refusal: Option<String>,
    /// `--partition quorum`: whether this site writes across a split, and why
    /// (`core::quorum`'s mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<String>,
}

/// How a site says in its `Hello`'s name that it sends token messages, and with which ids: the
/// name ends with ` tokens=SITE:PEER`, and `,quorum` after it with `--partition quorum`
/// (docs/protocol.md, "Write tokens").
pub fn hello_suffix(site: u64, peer: u64, quorum: bool) -> String {
    format!(
        " tokens={site}:{peer}{}",
        if quorum { QUORUM_SUFFIX } else { "" }
    )
}

/// What a `Hello` name ends with when the site runs `--partition quorum`.
const QUORUM_SUFFIX: &str = ",quorum";

/// The ids a `Hello` name announces (see [`hello_suffix`]), if any.
pub fn hello_ids(name: &str) -> Option<(u64, u64)> {
    let (_, ids) = name.rsplit_once(" tokens=")?;
    let ids = ids.strip_suffix(QUORUM_SUFFIX).unwrap_or(ids);
    let (a, b) = ids.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Whether a `Hello` name announces `--partition quorum` (see [`hello_suffix`]).
pub fn hello_quorum(name: &str) -> bool {
    hello_ids(name).is_some() && name.ends_with(QUORUM_SUFFIX)
}

/// The token object of a file: its path relative to the root, hashed (blake3, first 8 bytes,
/// little-endian; never 0, which the log uses for its lend counter, nor `token::HARD_LINKED`:
/// `token::name_object`). Stable across the two sites since both name the file the same; a file
/// renamed takes the token of its new name (the rename took both).
pub fn object_of(path: &[u8]) -> ObjectId {
    let h = blake3::hash(path);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    mirrorfs_core::token::name_object(u64::from_le_bytes(b))
}

/// Token messages waiting for the link to the peer: the gate's [`Sender`] puts them here
/// (under the gate's lock: it must not block) and the link's sending loop sends them after the
/// records it has sent (`net::remote`).
pub struct TokenWire {
    pub gate: Arc<TokenGate>,
    queue: Arc<Mutex<VecDeque<TokenMsg>>>,
}

/// Token messages queued for one connection at most; one more drops the connection's sender
/// (the gate asks and grants anew on the next connection).
pub const WIRE_QUEUE_MAX: usize = 4096;

impl TokenWire {
    pub fn new(gate: Arc<TokenGate>) -> TokenWire {
        TokenWire {
            gate,
            queue: Arc::new(Mutex::new(VecDeque::new())),
        }
    }

    /// The link is up and the peer holds our records through `shipped`; `wake` is called when a
    /// message is queued (it must not block).
    pub fn connect(&self, shipped: u64, wake: impl Fn() + Send + 'static) {
        lock(&self.queue).clear();
        let q = self.queue.clone();
        self.gate.connected(
            shipped,
            Box::new(move |m| {
                let mut q = lock(&q);
                if q.len() >= WIRE_QUEUE_MAX {
                    return false;
                }
                q.push_back(m);
                drop(q);
                wake();
                true
            }),
        );
    }

    pub fn disconnect(&self) {
        self.gate.disconnected();
        lock(&self.queue).clear();
    }

    /// The messages to send now, in order.
    pub fn take(&self) -> Vec<TokenMsg> {
        lock(&self.queue).drain(..).collect()
    }

    pub fn is_idle(&self) -> bool {
        lock(&self.queue).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrorfs_core::token::{RecordKind, TokenState};
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicU64, AtomicUsize};
    use std::sync::mpsc;

    fn rec(object: ObjectId, kind: RecordKind, lend: u64, seq: u64) -> TokenRecord {
        TokenRecord {
            object,
            kind,
            lend,
            seq,
            lend_next: lend + 1,
        }
    }

    #[test]
    fn hello_names_carry_the_token_ids_and_objects_are_stable() {
        let name = format!("host:/srv/a{}", hello_suffix(2, 1, false));
        assert_eq!(hello_ids(&name), Some((2, 1)));
        assert!(!hello_quorum(&name));
        let name = format!("host:/srv/a{}", hello_suffix(2, 1, true));
        assert_eq!(hello_ids(&name), Some((2, 1)));
        assert!(hello_quorum(&name));
        assert_eq!(hello_ids("host:/srv/a"), None);
        assert_eq!(hello_ids("host:/srv/a tokens=x:1"), None);
        assert_eq!(object_of(b"dir/f"), object_of(b"dir/f"));
        assert_ne!(object_of(b"dir/f"), object_of(b"dir/g"));
        assert_ne!(object_of(b""), 0, "0 carries the log's lend counter");
        assert_ne!(object_of(b""), mirrorfs_core::token::HARD_LINKED);
    }

    #[test]
    fn the_log_keeps_its_records_cuts_a_torn_tail_and_refuses_damage_before_it() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("tokens");
        {
            let (mut log, recs) = TokenLog::open(&p).expect("open");
            assert_eq!(recs.len(), 1, "a new log holds only the lend counter");
            log.persist(&rec(7, RecordKind::Held, 3, 10)).expect("T2");
            log.persist(&rec(8, RecordKind::Away, 4, 11)).expect("T1");
            log.persist(&rec(7, RecordKind::Forget, 0, 0))
                .expect("forget");
        }
        // A crash while the next record was written: a torn tail.
        let mut f = OpenOptions::new().append(true).open(&p).expect("append");
        f.write_all(&[0xAB; 20]).expect("torn tail");
        drop(f);
        let (_, recs) = TokenLog::open(&p).expect("reopen cuts the torn tail");
        assert_eq!(recs.len(), 2);
        assert!(recs[0].lend_next >= 5, "the lend counter survives forgets");
        let site = TokenSite::recover(
            TokenConfig::new(1, 2, PartitionPolicy::ReadOnly),
            0,
            &recs,
            0,
        );
        assert_eq!(site.state(8), TokenState::Away { lend: 4 });
        assert_eq!(
            site.state(7),
            TokenState::Held {
                lend: 0,
                writable: true
            },
            "a forgotten token rests at home"
        );
        assert_eq!(
            fs_len(&p),
            2 * RECORD_BYTES as u64,
            "compacted at open, durably replaced"
        );
        // Damage before the last record is not a crash: refused, with what to do.
        let mut bytes = std::fs::read(&p).expect("read");
        bytes[9] ^= 1;
        std::fs::write(&p, &bytes).expect("write");
        let err = TokenLog::open(&p).err().expect("damage refused");
        let msg = format!("{err:#}");
        assert!(msg.contains("damaged at byte 0"), "{msg}");
        assert!(msg.contains("at both sites together"), "{msg}");
    }

    fn fs_len(p: &Path) -> u64 {
        std::fs::metadata(p).expect("stat").len()
    }

    #[test]
    fn the_log_is_compacted_during_a_run_and_keeps_the_lend_counter() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("tokens");
        let (mut log, _) = TokenLog::open(&p).expect("open");
        for lend in 1..=200u64 {
            log.persist(&rec(lend % 3, RecordKind::Away, lend, lend))
                .expect("away");
            log.persist(&rec(lend % 3, RecordKind::Forget, 0, 0))
                .expect("forget");
            assert!(log.records() <= 2 * 3 + COMPACT_SLACK + 1, "bounded");
        }
        log.persist(&rec(5, RecordKind::Held, 201, 9))
            .expect("held");
        drop(log);
        let (_, recs) = TokenLog::open(&p).expect("reopen");
        assert_eq!(recs.len(), 2);
        assert!(recs[0].lend_next > 201, "a lend id is never reused");
        assert_eq!(recs[1], rec(5, RecordKind::Held, 201, 9));
    }

    enum Wire {
        Applied(u64),
        Token(TokenMsg),
    }

    /// One test site: its gate, its journal's end, its log, and its stream to the peer.
    struct Site {
        gate: Arc<TokenGate>,
        journal: AtomicU64,
        path: PathBuf,
        config: TokenConfig,
        stream: Mutex<Option<mpsc::Sender<Wire>>>,
    }

    impl Site {
        fn open(dir: &Path, config: TokenConfig, journal: u64, applied: u64) -> Arc<Site> {
            let state = StateDir::at(&dir.join(format!("site-{}", config.site)));
            statefile::private_dir(state.path()).expect("state dir");
            let path = state.tokens_file();
            let gate = TokenGate::open_in(&state, config.clone(), journal, applied).expect("gate");
            Arc::new(Site {
                gate: Arc::new(gate),
                journal: AtomicU64::new(journal),
                path,
                config,
                stream: Mutex::new(None),
            })
        }

        /// One write to `object` as the mount would make it: token, change, journal, stream.
        fn write(&self, object: ObjectId, change: impl FnOnce()) -> Result<(), GateError> {
            let permit = self.gate.acquire(object)?;
            change();
            let seq = self.journal.fetch_add(1, Ordering::SeqCst) + 1;
            permit.written(seq);
            let stream = lock(&self.stream);
            if let Some(tx) = stream.as_ref() {
                if tx.send(Wire::Applied(seq)).is_ok() {
                    self.gate.shipped(seq);
                }
            }
            Ok(())
        }
    }

    impl Site {
        /// One change of several objects (a rename, a link) as the mount makes it.
        fn change(
            &self,
            objects: Vec<ObjectId>,
            change: impl FnOnce(),
        ) -> Result<(), (ObjectId, GateError)> {
            let permits = self.gate.acquire_all(objects)?;
            change();
            let seq = self.journal.fetch_add(1, Ordering::SeqCst) + 1;
            permits.written(seq);
            let stream = lock(&self.stream);
            if let Some(tx) = stream.as_ref() {
                if tx.send(Wire::Applied(seq)).is_ok() {
                    self.gate.shipped(seq);
                }
            }
            Ok(())
        }
    }

    /// The ordered link of one direction: records and token messages, in order.
    fn stream(from: &Arc<Site>, to: &Arc<Site>) -> JoinHandle<()> {
        let (tx, rx) = mpsc::channel::<Wire>();
        let end = from.journal.load(Ordering::SeqCst);
        tx.send(Wire::Applied(end)).expect("resume");
        *lock(&from.stream) = Some(tx.clone());
        let tx = Mutex::new(tx);
        from.gate.connected(
            end,
            Box::new(move |m| lock(&tx).send(Wire::Token(m)).is_ok()),
        );
        let to = to.gate.clone();
        std::thread::spawn(move || {
            for w in rx {
                match w {
                    Wire::Applied(seq) => to.peer_applied(seq),
                    Wire::Token(m) => to.received(m),
                }
            }
        })
    }

    fn connect(a: &Arc<Site>, b: &Arc<Site>) -> Vec<JoinHandle<()>> {
        vec![stream(a, b), stream(b, a)]
    }

    fn cut(sites: &[&Arc<Site>], links: Vec<JoinHandle<()>>) {
        for s in sites {
            *lock(&s.stream) = None;
            s.gate.disconnected();
        }
        for l in links {
            l.join().expect("link thread");
        }
    }

    fn pair(dir: &Path, policy: PartitionPolicy, idle_ms: u64) -> (Arc<Site>, Arc<Site>) {
        let mut ca = TokenConfig::new(1, 2, policy);
        let mut cb = TokenConfig::new(2, 1, policy);
        ca.idle_ms = idle_ms;
        cb.idle_ms = idle_ms;
        (Site::open(dir, ca, 0, 0), Site::open(dir, cb, 0, 0))
    }

    fn held(s: &Site, object: ObjectId) -> bool {
        matches!(s.gate.state(object), TokenState::Held { .. })
    }

    fn eventually(what: &str, f: impl Fn() -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < until, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn disjoint_objects_are_written_at_both_sites_at_local_speed() {
        let d = tempfile::tempdir().expect("tempdir");
        let (a, b) = pair(d.path(), PartitionPolicy::ReadOnly, 60_000);
        let links = connect(&a, &b);
        a.write(1, || {}).expect("the home holds every token");
        assert_eq!(a.gate.stats().sent, 0, "no message for a token at home");
        b.write(2, || {}).expect("one round trip");
        // b asked once and took the token durably (T2); a lent it durably (T1).
        assert_eq!(b.gate.stats().sent, 1);
        assert_eq!(b.gate.stats().persisted, 1);
        assert_eq!(a.gate.stats().persisted, 1);
        let (sa, sb) = (a.gate.stats().sent, b.gate.stats().sent);
        let ta = {
            let a = a.clone();
            std::thread::spawn(move || {
                for _ in 0..500 {
                    a.write(1, || {}).expect("a writes 1");
                }
            })
        };
        for _ in 0..500 {
            b.write(2, || {}).expect("b writes 2");
        }
        ta.join().expect("a's writer");
        assert_eq!(
            (a.gate.stats().sent, b.gate.stats().sent),
            (sa, sb),
            "writes to tokens a site holds send nothing"
        );
        assert_eq!(a.gate.stats().parked + b.gate.stats().parked, 1);
        cut(&[&a, &b], links);
    }

    /// Renames between two names at both sites at once, each naming them in its own order:
    /// every change holds both tokens while it runs (never one site holding one and the other
    /// site the other), and all of them complete (no cycle: `acquire_all` takes them in one
    /// order at both sites).
    #[test]
    fn changes_of_two_objects_at_both_sites_hold_both_tokens_and_all_complete() {
        let d = tempfile::tempdir().expect("tempdir");
        let (a, b) = pair(d.path(), PartitionPolicy::ReadOnly, 60_000);
        let links = connect(&a, &b);
        let busy = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let run = |site: Arc<Site>, names: [ObjectId; 2]| {
            let busy = busy.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    site.change(names.to_vec(), || {
                        for o in [0, 1] {
                            assert_eq!(busy[o].fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        }
                        std::thread::sleep(Duration::from_micros(100));
                        for o in [0, 1] {
                            busy[o].fetch_sub(1, Ordering::SeqCst);
                        }
                    })
                    .unwrap_or_else(|(o, e)| panic!("token {o} refused: {e}"));
                }
            })
        };
        let started = Instant::now();
        let (ta, tb) = (run(a.clone(), [11, 12]), run(b.clone(), [12, 11]));
        ta.join().expect("a's renames");
        tb.join().expect("b's renames");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no change waited for a park timeout"
        );
        assert_eq!(a.gate.stats().refused + b.gate.stats().refused, 0);
        assert!(b.gate.stats().parked > 0, "the tokens travelled");
        cut(&[&a, &b], links);
    }

    #[test]
    fn one_object_written_from_both_sites_is_serialized_never_interleaved() {
        let d = tempfile::tempdir().expect("tempdir");
        let (a, b) = pair(d.path(), PartitionPolicy::ReadOnly, 60_000);
        let links = connect(&a, &b);
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(d.path().join("shared"))
                .expect("shared file"),
        );
        let writers = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(std::sync::Barrier::new(2));
        let run = |site: Arc<Site>, letter: u8| {
            let (file, writers, start) = (file.clone(), writers.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..100 {
                    site.write(9, || {
                        assert_eq!(writers.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        // One logical write in 16 pieces: a mix would show.
                        for i in 0..16u64 {
                            file.write_at(&[letter; 256], i * 256).expect("pwrite");
                        }
                        let mut back = [0u8; 4096];
                        file.read_exact_at(&mut back, 0).expect("pread");
                        assert!(back.iter().all(|&c| c == letter), "interleaved");
                        writers.fetch_sub(1, Ordering::SeqCst);
                    })
                    .expect("write under the token");
                    // Time for the peer's request to arrive between writes.
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        let (ta, tb) = (run(a.clone(), b'a'), run(b.clone(), b'b'));
        ta.join().expect("a's writer");
        tb.join().expect("b's writer");
        let handed = a.gate.stats().sent + b.gate.stats().sent;
        assert!(
            handed >= 4,
            "the token went back and forth ({handed} messages)"
        );
        eventually("one site holds the token", || held(&a, 9) != held(&b, 9));
        cut(&[&a, &b], links);
    }

    #[test]
    fn an_idle_token_goes_back_home() {
        let d = tempfile::tempdir().expect("tempdir");
        let (a, b) = pair(d.path(), PartitionPolicy::ReadOnly, 30);
        let links = connect(&a, &b);
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = b.gate.spawn_ticker(stop.clone()).expect("ticker");
        b.write(3, || {}).expect("b takes 3");
        eventually("the idle token is home", || {
            b.gate.state(3) == TokenState::Remote && held(&a, 3)
        });
        // Home again: the home writes without a message.
        let sent = a.gate.stats().sent;
        a.write(3, || {}).expect("home writes");
        assert_eq!(a.gate.stats().sent, sent);
        stop.store(true, Ordering::Release);
        ticker.join().expect("ticker");
        cut(&[&a, &b], links);
    }

    #[test]
    fn tokens_survive_a_crash_of_either_site_and_never_have_two_holders() {
        let d = tempfile::tempdir().expect("tempdir");
        let (a, b) = pair(d.path(), PartitionPolicy::ReadOnly, 60_000);
        let links = connect(&a, &b);
        b.write(4, || {}).expect("b takes 4");
        // b dies: the link goes with it, nothing is stopped cleanly.
        cut(&[&a, &b], links);
        let (bj, aj) = (
            b.journal.load(Ordering::SeqCst),
            a.journal.load(Ordering::SeqCst),
        );
        drop(b);
        let b = Site::open(
            d.path(),
            TokenConfig::new(2, 1, PartitionPolicy::ReadOnly),
            bj,
            aj,
        );
        assert!(
            held(&b, 4),
            "the token taken before the crash (T2) is still b's"
        );
        assert_eq!(a.gate.state(4), TokenState::Away { lend: 1 });
        let err = a.write(4, || {}).expect_err("a does not hold 4");
        assert_eq!(err.errno(), libc::EROFS, "read-only across the split");
        b.write(4, || {}).expect("b writes 4 alone");
        // The home dies too, and comes back with the token still lent (T1).
        let config = a.config.clone();
        drop(a);
        let a = Site::open(d.path(), config, aj, b.journal.load(Ordering::SeqCst));
        assert_eq!(a.gate.state(4), TokenState::Away { lend: 1 });
        // Reconnected: the re-sent Grant is a duplicate; a takes the token in one request.
        let links = connect(&a, &b);
        a.write(4, || {}).expect("a takes 4 back");
        assert!(held(&a, 4));
        eventually("b forgets 4", || b.gate.state(4) == TokenState::Remote);
        assert!(!b.path.as_os_str().is_empty());
        cut(&[&a, &b], links);
    }

    #[test]
    fn across_a_split_the_policy_decides() {
        for policy in [PartitionPolicy::ReadOnly, PartitionPolicy::Reconcile] {
            let d = tempfile::tempdir().expect("tempdir");
            let (a, b) = pair(d.path(), policy, 60_000);
            let links = connect(&a, &b);
            b.write(5, || {}).expect("b takes 5");
            cut(&[&a, &b], links);
            a.write(6, || {})
                .expect("the home keeps writing its tokens");
            b.write(5, || {}).expect("b keeps writing its token");
            let got = a.gate.acquire(5).map(|p| p.guarded());
            match policy {
                PartitionPolicy::ReadOnly => {
                    assert_eq!(got, Err(GateError::Refused(Refusal::ReadOnly)));
                    assert_eq!(GateError::Refused(Refusal::ReadOnly).errno(), libc::EROFS);
                }
                PartitionPolicy::Reconcile => assert_eq!(got, Ok(false), "unguarded"),
                PartitionPolicy::Quorum => unreachable!("tested below"),
            }
        }
    }

    #[test]
    fn a_quorum_site_without_the_witness_lease_refuses_every_change_unlinked() {
        let d = tempfile::tempdir().expect("tempdir");
        let (a, b) = pair(d.path(), PartitionPolicy::Quorum, 60_000);
        for s in [&a, &b] {
            s.gate.start_quorum(300, 0, 0);
            assert!(s.gate.is_quorum());
        }
        // Never linked (no probe answered) and no lease: the home's own tokens too.
        let got = a.gate.acquire(6).map(|p| p.guarded());
        assert_eq!(got, Err(GateError::Refused(Refusal::NoQuorum)));
        assert_eq!(GateError::Refused(Refusal::NoQuorum).errno(), libc::EROFS);
        let st = a.gate.status();
        assert_eq!(st.policy, "quorum");
        let line = st.quorum.unwrap_or_default();
        assert!(
            line.starts_with("read-only: the peer is unreachable and no lease from the witness"),
            "{line}"
        );
        // Connected, the probes are answered: linked, the tokens decide.
        let links = connect(&a, &b);
        eventually("a is linked", || {
            a.gate.tick();
            b.gate.tick();
            a.gate
                .status()
                .quorum
                .unwrap_or_default()
                .starts_with("linked")
        });
        a.write(6, || {})
            .expect("linked: the home writes its token");
        cut(&[&a, &b], links);
    }

    #[test]
    fn a_parked_writer_times_out_without_a_ticker() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut config = TokenConfig::new(2, 1, PartitionPolicy::ReadOnly);
        config.park_timeout_ms = 100;
        let b = Site::open(d.path(), config, 0, 0);
        // A link that takes the request and never answers.
        b.gate.connected(0, Box::new(|_| true));
        let t = Instant::now();
        let err = b.write(7, || {}).expect_err("no answer");
        assert_eq!(err, GateError::Refused(Refusal::Timeout));
        assert_eq!(err.errno(), libc::ETIMEDOUT);
        assert!(
            t.elapsed() >= Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(b.gate.stats().refused, 1);
    }

    const HELPER_ENV: &str = "MIRRORFS_TOKENS_CRASH_HELPER";

    /// Runs in a child process (started by `a_kill_9_after_t1_or_t2_keeps_the_token_where_it_went`):
    /// grants (home) or takes (other site) object 42, says so on stdout once the message left
    /// or the write proceeded, and waits to be killed.
    #[test]
    #[ignore]
    fn crash_helper() {
        let Ok(spec) = std::env::var(HELPER_ENV) else {
            return;
        };
        let (role, path) = spec.split_once(':').expect("ROLE:PATH");
        let path = PathBuf::from(path);
        let say = |m: TokenMsg| {
            println!("SENT {m:?}");
            true
        };
        match role {
            "grant" => {
                let config = TokenConfig::new(1, 2, PartitionPolicy::ReadOnly);
                let gate = TokenGate::open(&path, config, 0, 0).expect("gate");
                gate.connected(0, Box::new(say));
                gate.received(TokenMsg::Request { object: 42 });
            }
            _ => {
                let config = TokenConfig::new(2, 1, PartitionPolicy::ReadOnly);
                let gate = Arc::new(TokenGate::open(&path, config, 0, 0).expect("gate"));
                gate.connected(0, Box::new(say));
                let g = gate.clone();
                std::thread::spawn(move || {
                    let permit = g.acquire(42).expect("the token");
                    println!("PROCEEDED guarded={}", permit.guarded());
                    // Killed in the middle of the write.
                    std::thread::sleep(Duration::from_secs(3600));
                });
                std::thread::sleep(Duration::from_millis(50));
                gate.received(TokenMsg::Grant {
                    object: 42,
                    lend: 1,
                    seq: 0,
                });
            }
        }
        std::thread::sleep(Duration::from_secs(3600));
    }

    /// The helper in a child process, killed with SIGKILL once `line` shows on its stdout.
    fn kill_after(role: &str, path: &Path, line: &str) {
        use std::io::BufRead;
        let exe = std::env::current_exe().expect("test binary");
        let mut child = std::process::Command::new(exe)
            .args([
                "--ignored",
                "--exact",
                "site::tokens::tests::crash_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, format!("{role}:{}", path.display()))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("helper");
        let out = child.stdout.take().expect("stdout");
        let (found, seen) = mpsc::channel();
        let want = line.to_string();
        // The harness prints the test's name before its output, on the same line.
        std::thread::spawn(move || {
            for l in io::BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                let hit = l.contains(&want);
                if found.send((hit, l)).is_err() || hit {
                    break;
                }
            }
        });
        let until = Instant::now() + Duration::from_secs(30);
        let mut lines = Vec::new();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match seen.recv_timeout(left) {
                Ok((true, _)) => break,
                Ok((false, l)) => lines.push(l),
                Err(_) => {
                    let _ = child.kill();
                    panic!("the helper never said {line:?}; it said {lines:?}");
                }
            }
        }
        child.kill().expect("kill -9");
        let status = child.wait().expect("wait");
        assert!(!status.success(), "killed: {status:?}; output {lines:?}");
    }

    #[test]
    fn a_kill_9_after_t1_or_t2_keeps_the_token_where_it_went() {
        let d = tempfile::tempdir().expect("tempdir");
        // The home is killed once its Grant left: T1 made the lend durable before.
        let home = d.path().join("home-tokens");
        kill_after("grant", &home, "SENT Grant");
        let config = TokenConfig::new(1, 2, PartitionPolicy::ReadOnly);
        let gate = TokenGate::open(&home, config, 0, 0).expect("reopen");
        assert_eq!(gate.state(42), TokenState::Away { lend: 1 });
        assert_eq!(
            gate.acquire(42).err().map(|e| e.errno()),
            Some(libc::EROFS),
            "the home does not write a token it lent"
        );
        // The other site is killed in the middle of a write under the token it took: T2 made
        // it durable before the write proceeded.
        let other = d.path().join("other-tokens");
        kill_after("take", &other, "PROCEEDED guarded=true");
        let config = TokenConfig::new(2, 1, PartitionPolicy::ReadOnly);
        let gate = TokenGate::open(&other, config, 0, 0).expect("reopen");
        assert_eq!(
            gate.state(42),
            TokenState::Held {
                lend: 1,
                writable: true
            }
        );
        assert!(gate.acquire(42).expect("still ours").guarded());
    }

    /// Figures for docs/benchmarks.md: `cargo test --release -p mirrorfs --bin mirrorfs
    /// site::tokens::tests::figures -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn figures() {
        let d = tempfile::tempdir().expect("tempdir");
        let (a, b) = pair(d.path(), PartitionPolicy::ReadOnly, 60_000);
        let links = connect(&a, &b);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(d.path().join("data"))
            .expect("data");
        let block = [7u8; 4096];
        let n = 50_000u64;
        let plain = || {
            let t = Instant::now();
            for i in 0..n {
                file.write_at(&block, (i % 256) * 4096).expect("pwrite");
            }
            t.elapsed().as_nanos() as f64 / n as f64
        };
        // The gate alone: token check before, journal position after, as the mount would.
        let gated = || {
            let t = Instant::now();
            for i in 0..n {
                let permit = a.gate.acquire(1).expect("held");
                file.write_at(&block, (i % 256) * 4096).expect("pwrite");
                permit.written(a.journal.fetch_add(1, Ordering::SeqCst) + 1);
            }
            t.elapsed().as_nanos() as f64 / n as f64
        };
        // Rounds alternate (the first one warms the file up), medians reported.
        plain();
        let (mut p, mut g) = (Vec::new(), Vec::new());
        for _ in 0..7 {
            p.push(plain());
            g.push(gated());
        }
        p.sort_by(f64::total_cmp);
        g.sort_by(f64::total_cmp);
        println!(
            "4 KiB pwrites, median of 7 alternating rounds of {n}: plain {:.0} ns, under a held token {:.0} ns (+{:.0} ns per write)",
            p[3],
            g[3],
            g[3] - p[3]
        );
        let mut lat = Vec::new();
        for i in 0..400 {
            let s = if i % 2 == 0 { &b } else { &a };
            let t = Instant::now();
            s.write(2, || {}).expect("hand-over");
            lat.push(t.elapsed().as_micros() as u64);
        }
        lat.sort_unstable();
        let pct = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)];
        println!(
            "hand-over (write to a token the peer holds, in-process link, fsynced T1+T2): p50 {} us, p99 {} us, max {} us",
            pct(50),
            pct(99),
            lat[lat.len() - 1]
        );
        cut(&[&a, &b], links);
    }
}
