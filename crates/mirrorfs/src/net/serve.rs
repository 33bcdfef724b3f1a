//! `mirrorfs serve DIR --listen ADDR`: the mirror daemon. It receives a primary's journal over an
//! authenticated TLS link, makes each record durable in its own journal (same seqs as the
//! primary's), acknowledges, and applies the records in order to DIR with the same applier and
//! cursor as a local mirror, so DIR is always a state the primary had.
//!
//! ```text
//!  TLS ─▶ Session (core::session: handshake, sequence, reserved names) ─▶ journal.append_at
//!          flusher: fsync (F2) ─▶ durable ─┐
//!          worker: apply ≤ min(durable, settled) to DIR ─▶ applied / checkpoint ─┤
//!  TLS ◀── Ack{received, durable, applied, checkpoint} ◀──────────────────────────┘
//! ```
//!
//! State lives in `STATE` (default `DIR/.mirrorfs`): `journal/`, `tree/cursor`, `volume.json`
//! (which volume and generation DIR holds, and whether it is a consistent copy), `lock`.

use std::fs;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mirrorfs_core::applier::Applier;
use mirrorfs_core::history::{Comparison, History};
use mirrorfs_core::journal::{Journal, JournalConfig, Reader};
use mirrorfs_core::link::{hex, Begin, LinkError, MirrorCopy, Positions};
use mirrorfs_core::op::{Op, Record};
use mirrorfs_core::session::{Incoming, Session};
use mirrorfs_core::wire::{error_code, Decoder, MirrorState, Msg};

use crate::net::conn::Duplex;
use crate::net::identity::{self, Identity};
use crate::site::dirlock::DirLock;
use crate::site::engine::{Role, Site};
use crate::site::meta::{random_u64, read_meta, write_meta, CopyState, Meta};
use crate::site::state_dir::{StateDir, StateLock, StateLockError};
use crate::site::status::Registered;
use crate::site::store::FileStore;
use crate::site::volume::{self, lock, MirrorPhase, MirrorShared, Volume};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The mirror directory: a plain tree, readable at any time, always a state the primary had.
    pub dir: PathBuf,
    /// Address to listen on, e.g. 0.0.0.0:7070 or [::]:7070.
    #[arg(long)]
    pub listen: String,
    /// Where the daemon keeps its journal and cursor (default: DIR/.mirrorfs).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// The configuration directory with this machine's identity and trusted peers (default:
    /// $MIRRORFS_CONFIG or /etc/mirrorfs; create it with `mirrorfs init`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Accept an initial copy into a non-empty DIR that holds no mirrorfs copy, replacing its
    /// contents.
    #[arg(long)]
    pub force_resync: bool,
    /// If DIR holds changes the connecting primary lacks (the copies diverged, e.g. an old
    /// primary served as a mirror of a promoted copy), save those changes to
    /// STATE/diverged/TIME-genG-seqS/ and then let DIR follow the primary (block-hash resync).
    /// Without it such a primary is refused and nothing is changed.
    #[arg(long)]
    pub discard_diverged: bool,
    /// The journal's size limit in MiB (at least 128: two 64 MiB segments).
    #[arg(long, default_value_t = 4096, value_parser = crate::site::volume::parse_journal_max_mib)]
    pub journal_max_mib: u64,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9109); off by default.
    #[arg(long)]
    pub metrics: Option<String>,
}

/// The daemon's shared state.
struct Daemon {
    dir: PathBuf,
    state: PathBuf,
    /// Name of the state directory at DIR's root, if it is there (never touched by records).
    reserved: Vec<u8>,
    vol: Arc<Volume>,
    m: Arc<MirrorShared>,
    meta: Mutex<Meta>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// The seq of a `SyncDone` a session received whose checkpoint is still to come (0: none),
    /// for the next session (`Session::pending_sync_done`).
    pending_sync_done: AtomicU64,
    busy: AtomicBool,
    force_resync: bool,
    discard_diverged: bool,
    /// The connected primary, for status.
    peer: Mutex<Option<String>>,
    /// Why the last primary was refused (cleared when one is accepted), for status.
    refused: Mutex<Option<String>>,
}

/// `mirrorfs serve`. A start that fails leaves no state directory behind that it created (an
/// empty DIR stays empty, so it can still be used as a mirror of any kind).
pub fn serve(a: ServeArgs) -> Result<()> {
    let state = match (&a.state, a.dir.canonicalize()) {
        (Some(s), _) => s.clone(),
        (None, Ok(d)) => d.join(".mirrorfs"),
        (None, Err(_)) => return serve_in(a),
    };
    let existed = state.exists();
    let r = serve_in(a);
    if r.is_err() && !existed && !StateDir::at(&state).volume_json().exists() {
        let _ = fs::remove_dir_all(&state);
    }
    r
}

/// The daemon's life: find and lock DIR and its state, load the identity, open the journal and
/// bring the copy back, then accept primaries until SIGINT or SIGTERM, and stop cleanly.
fn serve_in(a: ServeArgs) -> Result<()> {
    let (dir, state, reserved) = locate(&a)?;
    let _locks = MirrorLocks::take(&dir, &state)?;
    let (id, server_cfg) = load_identity(a.config.as_deref())?;
    let meta = read_served_meta(&dir, &state)?;
    let (site, m) = open_site(&dir, &state, &meta, a.journal_max_mib)?;
    let d = Arc::new(Daemon {
        dir: dir.clone(),
        state: state.clone(),
        reserved,
        vol: site.vol.clone(),
        m,
        meta: Mutex::new(meta.clone()),
        worker: Mutex::new(None),
        pending_sync_done: AtomicU64::new(0),
        busy: AtomicBool::new(false),
        force_resync: a.force_resync,
        discard_diverged: a.discard_diverged,
        peer: Mutex::new(None),
        refused: Mutex::new(None),
    });
    d.start_copy(&site, &meta)?;
    let _reg = d.start_reporting(a.metrics.as_deref())?;
    let (listener, term) = listen(&a.listen, &dir, &id)?;
    accept_loop(&d, &listener, &server_cfg, &term);
    d.shut_down(site)
}

/// DIR (canonical), the state directory (created if needed) and the name it reserves at DIR's
/// root (empty when it lies outside DIR).
fn locate(a: &ServeArgs) -> Result<(PathBuf, PathBuf, Vec<u8>)> {
    let dir = a.dir.canonicalize().with_context(|| {
        format!(
            "mirror directory {} does not exist (create it first)",
            a.dir.display()
        )
    })?;
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let state = match &a.state {
        Some(s) => {
            crate::site::statefile::private_dir(s)
                .with_context(|| format!("cannot create state directory {}", s.display()))?;
            s.canonicalize()?
        }
        None => dir.join(".mirrorfs"),
    };
    StateDir::create(&state)
        .with_context(|| format!("cannot create state directory {}", state.display()))?;
    let reserved = if state.parent() == Some(dir.as_path()) {
        state
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default()
    } else if state.starts_with(&dir) {
        bail!("the state directory must be DIR/NAME or outside DIR");
    } else {
        Vec::new()
    };
    Ok((dir, state, reserved))
}

/// DIR's lock and its state directory's, held while the daemon runs (released in this order:
/// the state's first).
struct MirrorLocks {
    _state: StateLock,
    _dir: DirLock,
}

impl MirrorLocks {
    /// Locks DIR itself (whatever `--state` says: it cannot be a mount's backing or local
    /// mirror, or a second daemon's directory, at the same time), then the state directory.
    fn take(dir: &Path, state: &Path) -> Result<Self> {
        let dir_lock = crate::site::dirlock::lock(dir).map_err(|e| {
            anyhow!(
                "{} is in use by another mirrorfs ({e}): stop that one first",
                dir.display()
            )
        })?;
        let sd = StateDir::at(state);
        let state_lock = match sd.lock() {
            Ok(l) => l,
            Err(StateLockError::Io(e)) => return Err(e.into()),
            Err(StateLockError::Held(_)) => bail!(
                "another mirrorfs is already serving {} (its state {} is locked)",
                dir.display(),
                sd.path().display()
            ),
        };
        Ok(MirrorLocks {
            _state: state_lock,
            _dir: dir_lock,
        })
    }
}

/// This machine's identity and the TLS configuration that admits only trusted primaries
/// (their list is read again at each handshake).
fn load_identity(config: Option<&Path>) -> Result<(Identity, Arc<rustls::ServerConfig>)> {
    let cfg_dir = identity::config_dir(config);
    let id = identity::load(&cfg_dir)?;
    let pinned = identity::pinned(&cfg_dir)?;
    if pinned.is_empty() {
        tracing::warn!(
            "no trusted peers in {}: every primary will be refused; run `mirrorfs trust FINGERPRINT NAME` with the primary's fingerprint",
            cfg_dir.join("peers").display()
        );
    }
    let server_cfg = identity::server_config_reloading(&id, &cfg_dir, pinned)?;
    tracing::info!(
        "trusted primaries: {} (reloaded at each handshake: a `mirrorfs trust` takes effect at the next connection)",
        cfg_dir.join("peers").display()
    );
    Ok((id, server_cfg))
}

/// The copy's meta file; a promoted copy is no mirror any more.
fn read_served_meta(dir: &Path, state: &Path) -> Result<Meta> {
    let meta = read_meta(state)?;
    if meta.promoted && !meta.former_primary() {
        bail!(
            "{} was promoted to a primary ({}); it no longer accepts a stream. Mount it with `mirrorfs mount`, or see docs/protocol.md to re-attach it as a mirror",
            dir.display(),
            StateDir::at(state).volume_json().display()
        );
    }
    Ok(meta)
}

/// Opens the daemon's site ([`Site`] in the mirror role: the journal with its recovery, made
/// durable, and the flusher) with the one mirror it applies to: DIR itself.
fn open_site(
    dir: &Path,
    state: &Path,
    meta: &Meta,
    journal_max_mib: u64,
) -> Result<(Site, Arc<MirrorShared>)> {
    if meta.former_primary() && !StateDir::at(state).is_clean() {
        bail!(
            "{} is a primary's backing directory that was not unmounted cleanly: mount it once with `mirrorfs mount` and unmount it (that settles its last change), then serve it",
            dir.display()
        );
    }
    let m = Arc::new(MirrorShared::new(
        dir.display().to_string(),
        dir.to_path_buf(),
        StateDir::at(state).tree().path().to_path_buf(),
        None,
    ));
    m.checkpoint_when_idle.store(true, Ordering::Relaxed);
    let role = Role::Mirror {
        former_primary: meta.former_primary(),
    };
    let site = Site::open(StateDir::at(state), &role, journal_max_mib, vec![m.clone()])?;
    Ok((site, m))
}

/// Binds the listening socket and turns SIGINT and SIGTERM into a stop flag.
fn listen(addr: &str, dir: &Path, id: &Identity) -> Result<(TcpListener, Arc<AtomicBool>)> {
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, term.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone())?;
    listener.set_nonblocking(true)?;
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(
        "serving mirror {} on {} as {}",
        dir.display(),
        local,
        id.fingerprint
    );
    eprintln!(
        "mirrorfs: mirror {} listening on {} (identity {}; Ctrl-C stops)",
        dir.display(),
        local,
        id.fingerprint
    );
    Ok((listener, term))
}

/// Accepts connections until told to stop, each on its own thread (bounded: see `gate` for who
/// is let in, who is evicted, and the handshake deadline).
fn accept_loop(
    d: &Arc<Daemon>,
    listener: &TcpListener,
    server_cfg: &Arc<rustls::ServerConfig>,
    term: &AtomicBool,
) {
    let gate = crate::net::gate::Gate::new();
    while !term.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((sock, from)) => {
                if let Err(e) = sock.set_nonblocking(false) {
                    tracing::warn!("connection from {from}: {e}");
                    continue;
                }
                // A thread that cannot be started (a pids or memory limit) is never fatal: the
                // oldest unauthenticated connection is closed to give its thread back, and the
                // start is tried once more; if that fails too, this connection is closed.
                let mut sock = Some(sock);
                for attempt in 0..2 {
                    let Some(s) = sock.take() else { break };
                    let spare = s.try_clone().ok();
                    match start_connection(d, server_cfg, &gate, s, from) {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!(
                                "connection from {from}: cannot start a thread for it ({e}; {} connection threads running){}",
                                gate.threads(),
                                if attempt == 0 { "; closing the oldest unauthenticated connection and trying again" } else { "; closed it" }
                            );
                            if attempt == 0 && gate.evict_oldest() {
                                std::thread::sleep(Duration::from_millis(50));
                                sock = spare;
                            }
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS...: back off instead of spinning.
                tracing::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Lets one accepted connection in through the gate and starts its thread: TLS handshake
/// (bounded in time, see `Duplex::accept`), then the session. `Ok` also when the gate refused
/// it (the connection is closed); `Err` only when the thread could not be started.
fn start_connection(
    d: &Arc<Daemon>,
    cfg: &Arc<rustls::ServerConfig>,
    gate: &Arc<crate::net::gate::Gate>,
    sock: std::net::TcpStream,
    from: std::net::SocketAddr,
) -> std::io::Result<()> {
    let Some(slot) = gate.admit(&sock) else {
        return Ok(());
    };
    let (d, cfg) = (d.clone(), cfg.clone());
    std::thread::Builder::new()
        .name("session".into())
        .spawn(move || {
            let link = match Duplex::accept(sock, cfg) {
                Ok(l) => l,
                Err(e) => {
                    if slot.may_warn() {
                        tracing::warn!("connection from {from}: {e:#}");
                    }
                    return;
                }
            };
            slot.authenticated();
            if let Err(e) = d.clone().session(link) {
                tracing::warn!("connection from {from}: {e:#}");
            }
        })
        .map(drop)
}

impl Daemon {
    /// Brings the copy back as it was left: an old primary's tree is at its journal's end; a
    /// consistent or interrupted copy gets its applier back (or, without a cursor, is marked to
    /// be copied afresh).
    fn start_copy(&self, site: &Site, meta: &Meta) -> Result<()> {
        let horizon = site.opening.horizon;
        if meta.former_primary() {
            // An old primary's tree holds everything its journal does.
            self.m.applied.store(horizon, Ordering::Release);
            self.m.checkpoint.store(horizon, Ordering::Release);
            tracing::info!(
                "{} is the backing directory of a primary of volume {} (generation {}) through record {horizon}: it is served as a mirror only to a primary it is an ancestor of; a primary that lacks some of its changes is refused",
                self.dir.display(),
                meta.volume_id,
                meta.generation
            );
        }
        if meta.state == CopyState::Consistent || meta.state == CopyState::Syncing {
            let mut cur = volume::open_cursor(&self.m)?;
            let opened = Applier::open(&mut cur, site.opening.power_loss, horizon)?;
            site.record_boot()?;
            match opened {
                Some(mut ap) => {
                    if meta.state == CopyState::Syncing {
                        ap.set_syncing(Some(meta.sync_id));
                    }
                    self.start_worker(ap)?;
                }
                None => {
                    // No cursor: the copy cannot be resumed; report an interrupted copy that no
                    // primary is streaming (sync id 0), so it is copied afresh.
                    tracing::warn!(
                        "no cursor for the copy in {}: it will be copied afresh",
                        self.dir.display()
                    );
                    let mut mm = meta.clone();
                    mm.state = CopyState::Syncing;
                    mm.sync_id = 0;
                    write_meta(&self.state, &mm)?;
                    *lock(&self.meta) = mm;
                }
            }
        }
        site.record_boot()?;
        Ok(())
    }

    /// The status file (rewritten every 250 ms), the registration `mirrorfs status` finds, and
    /// the metrics endpoint if asked for; the registration lasts as long as what is returned.
    fn start_reporting(self: &Arc<Self>, metrics: Option<&str>) -> Result<Registered> {
        {
            let d = self.clone();
            std::thread::Builder::new()
                .name("status".into())
                .spawn(move || loop {
                    d.write_status();
                    std::thread::sleep(Duration::from_millis(250));
                })?;
        }
        let reg = crate::site::status::register(&self.dir, &self.dir, &self.state)?;
        if let Some(addr) = metrics {
            let d = self.clone();
            crate::site::status::serve_metrics(addr, Arc::new(move || d.metrics_text()))?;
        }
        Ok(reg)
    }

    /// After the accept loop: the applier stops, the flusher finishes, the last status is written
    /// and the state is marked clean.
    /// Stops the worker (its last checkpoint), then the site (clean unless the journal was
    /// poisoned), and writes the last status.
    fn shut_down(&self, site: Site) -> Result<()> {
        tracing::info!("stopping");
        self.stop_worker();
        site.stop()?;
        self.write_status();
        Ok(())
    }

    fn start_worker(&self, ap: Applier) -> Result<()> {
        self.m.applied.store(ap.cursor().applied, Ordering::Release);
        self.m
            .checkpoint
            .store(ap.cursor().checkpoint, Ordering::Release);
        *lock(&self.m.phase) = MirrorPhase::Live;
        let (v, m) = (self.vol.clone(), self.m.clone());
        let h = std::thread::Builder::new()
            .name("apply".into())
            .spawn(move || crate::mirror::run_worker(v, m, ap))?;
        *lock(&self.worker) = Some(h);
        Ok(())
    }

    fn stop_worker(&self) {
        *lock(&self.m.phase) = MirrorPhase::Stopped;
        self.vol.changed.notify_all();
        if let Some(h) = lock(&self.worker).take() {
            let _ = h.join();
        }
    }

    fn copy(&self) -> MirrorCopy {
        let meta = lock(&self.meta).clone();
        let state = meta.mirror_state();
        let foreign = state == MirrorState::Empty
            && !self.force_resync
            && fs::read_dir(&self.dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .any(|e| e.file_name().as_bytes() != self.reserved.as_slice())
                })
                .unwrap_or(true);
        MirrorCopy {
            state,
            history: if state == MirrorState::Empty {
                History::default()
            } else {
                meta.history()
            },
            durable: lock(&self.vol.progress).durable_seq,
            applied: self.m.applied.load(Ordering::Acquire),
            sync_id: meta.sync_id,
            promoted: meta.promoted && !meta.former_primary(),
            foreign,
        }
    }

    /// Waits until the journal is durable through its end, so `durable` is exactly where the
    /// primary must resume (records past it would otherwise be neither durable nor replaceable).
    fn settle_journal(&self) -> Result<()> {
        if lock(&self.vol.order).journal.poisoned().is_some() {
            // A failed write or fsync poisoned the journal: reopen it from what is on disk
            // (recovery keeps the durable prefix; never retry the failed I/O blindly).
            let store = FileStore::open(&self.state.join("journal"))?;
            let cfg = lock(&self.vol.order).journal.config().clone();
            let (j, _) = Journal::open(store, cfg).context("cannot reopen the journal")?;
            lock(&self.vol.order).journal = j;
            self.vol.poisoned.store(false, Ordering::Release);
            self.vol.sync_journal()?;
        }
        let t0 = Instant::now();
        loop {
            let end = lock(&self.vol.order).journal.next_seq() - 1;
            if lock(&self.vol.progress).durable_seq >= end {
                return Ok(());
            }
            self.vol.changed.notify_all();
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the journal did not become durable within 30 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// One authenticated connection (TLS done, see `gate`).
    fn session(self: Arc<Self>, link: Duplex) -> Result<()> {
        let peer = link.peer().map(|p| p.to_string()).unwrap_or_default();
        let mut dec = Decoder::new();
        let hello = recv_within(&link, &mut dec, crate::net::conn::CONNECT_TIMEOUT)?;
        if self.busy.swap(true, Ordering::AcqRel) {
            let _ = link.send(&Msg::Error {
                code: error_code::BUSY,
                message: "another primary is connected to this mirror".into(),
            });
            bail!("refused {peer}: another primary is connected");
        }
        let _busy = Busy(&self.busy);
        *lock(&self.peer) = Some(peer.clone());
        let r = self.stream(&link, &mut dec, &hello);
        *lock(&self.peer) = None;
        if let Err(e) = &r {
            if let Some(le) = e.downcast_ref::<LinkError>() {
                let _ = link.send(&le.to_msg());
            }
        }
        r.with_context(|| format!("primary {peer}"))
    }

    /// The session on an accepted connection: `Welcome`, `Start` and what it asks for, then
    /// records and acks until either side ends it. The decisions are `core::session`'s.
    fn stream(&self, link: &Duplex, dec: &mut Decoder, hello: &Msg) -> Result<()> {
        self.settle_journal()?;
        let mut session = self.welcome(link, hello)?;
        let start = recv_within(link, dec, crate::net::conn::CONNECT_TIMEOUT).inspect_err(|e| {
            *lock(&self.refused) = Some(format!("{e:#}"));
        })?;
        let begin = session.on_start(&start).map_err(|e| self.refuse(e))?;
        *lock(&self.refused) = None;
        // A new initial copy or resync forgets an older one's `SyncDone`.
        self.pending_sync_done
            .store(session.pending_sync_done(), Ordering::Release);
        match begin {
            Begin::Resume { seq, history } => {
                tracing::info!("resuming at record {seq}");
                self.adopt(&history, seq)?;
                if lock(&self.worker).is_none() {
                    bail!("internal: resume without a running applier");
                }
            }
            Begin::InitialSync {
                seq,
                sync_id,
                history,
            } => self.begin_initial_copy(&session, seq, sync_id, &history)?,
            Begin::Resync {
                seq,
                sync_id,
                history,
            } => self.begin_resync(link, seq, sync_id, &history)?,
        }
        let session = Mutex::new(session);
        let r = self.exchange(link, dec, &session);
        self.pending_sync_done
            .store(lock(&session).pending_sync_done(), Ordering::Release);
        r
    }

    /// A session for this copy (as it is now) that answered `hello`: `Welcome` is sent, or the
    /// primary is refused. With `--discard-diverged`, a diverged copy is saved and discarded
    /// first, and a fresh session answers.
    fn welcome(&self, link: &Duplex, hello: &Msg) -> Result<Session> {
        let label = self.dir.display().to_string();
        let fresh = || {
            let pending = self.pending_sync_done.load(Ordering::Acquire);
            Session::new(self.copy(), &self.reserved, &label, pending)
        };
        let mut session = fresh();
        let welcome = match session.on_hello(hello) {
            Ok(w) => w,
            Err(e) if e.code == error_code::DIVERGED && self.discard_diverged => {
                let c = session
                    .divergence()
                    .ok_or_else(|| anyhow!("internal: no divergence"))?;
                self.discard_divergence(&c)?;
                session = fresh();
                session.on_hello(hello).map_err(|e| self.refuse(e))?
            }
            Err(mut e) => {
                if let Some(c) = session.divergence() {
                    e.message = self.explain_divergence(&c, &e.message);
                }
                return Err(self.refuse(e).into());
            }
        };
        if let Msg::Hello { name, compress, .. } = hello {
            tracing::info!("primary {name} connected");
            link.set_compress(*compress);
        }
        link.send(&welcome)?;
        Ok(session)
    }

    /// Records flow in (this thread) and acks flow out (a second one) until either ends; the
    /// other is then stopped and the connection shut down.
    fn exchange(&self, link: &Duplex, dec: &mut Decoder, session: &Mutex<Session>) -> Result<()> {
        let done = AtomicBool::new(false);
        std::thread::scope(|s| -> Result<()> {
            let acker = s.spawn(|| {
                let r = self.send_acks(link, session, &done);
                done.store(true, Ordering::Release);
                link.shutdown();
                r
            });
            let r = self.receive(link, dec, session, &done);
            // Tell the primary why, before the connection is shut down.
            if let Some(le) = r.as_ref().err().and_then(|e| e.downcast_ref::<LinkError>()) {
                let _ = link.send(&le.to_msg());
            }
            done.store(true, Ordering::Release);
            self.vol.changed.notify_all();
            link.shutdown();
            let a = acker
                .join()
                .unwrap_or_else(|_| Err(anyhow!("ack thread panicked")));
            r.and(a)
        })
    }

    /// Records a refusal for `status` and the log; returns it to be sent to the primary.
    fn refuse(&self, e: LinkError) -> LinkError {
        tracing::warn!("refusing the primary: {}", e.message);
        *lock(&self.refused) = Some(e.message.clone());
        e
    }

    /// The names this copy changed after `after` (from its journal, at most `max`), and how many
    /// there were in all; `None` if the journal no longer holds them all.
    fn changed_paths(&self, after: u64, max: usize) -> Result<Option<(Vec<String>, usize)>> {
        let (first, end) = {
            let o = lock(&self.vol.order);
            (o.journal.first_seq(), o.journal.next_seq() - 1)
        };
        if after + 1 < first {
            return Ok(None);
        }
        let mut reader: Reader<crate::site::store::FileSegment> = Reader::new(after + 1);
        let mut names = std::collections::BTreeSet::new();
        while reader.next_seq() <= end {
            let view = lock(&self.vol.order).journal.segment_for(reader.next_seq());
            let Some(r) = reader.next::<FileStore>(view, end)? else {
                break;
            };
            let op = match &r.op {
                Op::Sync { op, .. } => op.as_ref(),
                op => op,
            };
            let paths: Vec<&mirrorfs_core::path::RelPath> = match op {
                Op::Rename { from, to, .. } | Op::Link { from, to } => vec![from, to],
                other => other.path().into_iter().collect(),
            };
            for p in paths {
                // The root's own attributes are no file to save; the state directory is never
                // a record's (the receiver refuses those).
                let first = p
                    .as_bytes()
                    .split(|b| *b == b'/')
                    .next()
                    .unwrap_or_default();
                if p.as_bytes().is_empty() || first == self.reserved.as_slice() {
                    continue;
                }
                names.insert(String::from_utf8_lossy(p.as_bytes()).into_owned());
            }
        }
        let n = names.len();
        Ok(Some((names.into_iter().take(max).collect(), n)))
    }

    /// The refusal message for a divergence: where the copies part, which files this copy
    /// changed since, and what to do.
    fn explain_divergence(&self, c: &Comparison, why: &str) -> String {
        let files = match c.common.map(|p| self.changed_paths(p.seq, 20)) {
            Some(Ok(Some((names, n)))) if n > 0 => {
                let more = if n > names.len() {
                    format!(" and {} more", n - names.len())
                } else {
                    String::new()
                };
                format!(
                    "; files this mirror changed since: {}{more}",
                    names.join(", ")
                )
            }
            Some(Ok(Some(_))) => String::new(),
            _ => "; which files: unknown (its journal no longer holds those changes)".into(),
        };
        format!(
            "{why}{files}. Keep what you need from {dir} (or mount it as a primary again); to let it follow this primary, restart `mirrorfs serve {dir} --discard-diverged`: it saves the changes to {saved}/ first",
            dir = self.dir.display(),
            saved = StateDir::at(&self.state).diverged_dir().display()
        )
    }

    /// `--discard-diverged`: saves what this copy changed after the common point (those files,
    /// or the whole tree if the journal no longer says which) to STATE/diverged/NAME, then marks
    /// the copy for a block-hash resync from the primary.
    fn discard_divergence(&self, c: &Comparison) -> Result<()> {
        let (gen, seq) = c.common.map_or((0, 0), |p| (p.generation, p.seq));
        let dest = self
            .state
            .join("diverged")
            .join(format!("{}-gen{gen}-seq{seq}", crate::sys::now().sec));
        fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
        let names = match c.common {
            Some(p) => self.changed_paths(p.seq, usize::MAX)?.map(|(n, _)| n),
            None => None,
        };
        let mut saved = 0usize;
        match &names {
            Some(names) => {
                for n in names {
                    let rel = Path::new(n);
                    let from = self.dir.join(rel);
                    if fs::symlink_metadata(&from).is_ok() {
                        saved += save_copy(&from, &dest.join(rel))?;
                    }
                }
            }
            None => {
                for e in fs::read_dir(&self.dir)?.filter_map(|e| e.ok()) {
                    if e.file_name().as_bytes() != self.reserved.as_slice() {
                        saved += save_copy(&e.path(), &dest.join(e.file_name()))?;
                    }
                }
            }
        }
        let what = c.describe("this mirror", "the primary");
        fs::write(
            dest.join("DIVERGED.txt"),
            format!(
                "{what}\nsaved from {} before it followed the primary ({}).\n",
                self.dir.display(),
                match &names {
                    Some(n) => format!("{} changed name(s): {}", n.len(), n.join(", ")),
                    None => "the whole tree: its journal no longer said which files".into(),
                }
            ),
        )?;
        fs::File::open(&dest)?.sync_all()?;
        let mut mm = lock(&self.meta).clone();
        mm.state = CopyState::NeedsResync;
        mm.promoted = false;
        write_meta(&self.state, &mm)?;
        *lock(&self.meta) = mm;
        tracing::warn!(
            "--discard-diverged: saved {saved} entr(y/ies) that {} changed after the common point to {}; it now follows the primary ({what})",
            self.dir.display(),
            dest.display()
        );
        Ok(())
    }

    /// After an accepted resume: an old primary's tree gets its cursor at its end and an
    /// applier, and the copy takes the primary's history (an ancestor adopts newer generations).
    fn adopt(&self, history: &History, seq: u64) -> Result<()> {
        let mut mm = lock(&self.meta).clone();
        let former = mm.former_primary();
        if !former && mm.history() == *history {
            return Ok(());
        }
        if former {
            let ap = volume::new_applier_at(&self.m, seq - 1)?;
            self.start_worker(ap)?;
        }
        mm.state = CopyState::Consistent;
        mm.promoted = false;
        mm.set_history(history);
        write_meta(&self.state, &mm)?;
        tracing::info!(
            "the copy in {} follows generation {} of volume {} from record {seq}",
            self.dir.display(),
            mm.generation,
            mm.volume_id
        );
        *lock(&self.meta) = mm;
        Ok(())
    }

    /// An initial copy: empty DIR (unless it holds files the session may not remove), restart
    /// the journal at `seq` and apply the copy `sync_id` until its `SyncDone`.
    fn begin_initial_copy(
        &self,
        session: &Session,
        seq: u64,
        sync_id: u32,
        history: &History,
    ) -> Result<()> {
        let volume_id = history.volume_id;
        let entries: Vec<_> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().as_bytes() != self.reserved.as_slice())
            .collect();
        session.check_initial_copy_target(!entries.is_empty(), self.force_resync)?;
        tracing::info!(
            "initial copy of volume {} begins at record {seq}",
            hex(&volume_id)
        );
        self.stop_worker();
        let mut mm = Meta {
            state: CopyState::Syncing,
            sync_id,
            ..Meta::empty()
        };
        mm.set_history(history);
        write_meta(&self.state, &mm)?;
        *lock(&self.meta) = mm;
        for e in entries {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
        }
        {
            let mut o = lock(&self.vol.order);
            o.journal.restart_at(seq)?;
        }
        {
            let mut p = lock(&self.vol.progress);
            p.durable_seq = seq - 1;
            p.settled_seq = seq - 1;
        }
        let mut ap = volume::new_applier_at(&self.m, seq - 1)?;
        ap.set_syncing(Some(sync_id));
        self.start_worker(ap)?;
        *lock(&self.m.phase) = MirrorPhase::Syncing {
            done_bytes: 0,
            total_bytes: 0,
        };
        Ok(())
    }

    /// A block-hash resync: keep the tree, restart the journal at `seq`, send the manifest;
    /// the primary then streams only what differs, applied idempotently until its `SyncDone`.
    fn begin_resync(&self, link: &Duplex, seq: u64, sync_id: u32, history: &History) -> Result<()> {
        tracing::info!(
            "resync begins at record {seq}: sending the manifest of {}",
            self.dir.display()
        );
        self.stop_worker();
        let mut mm = lock(&self.meta).clone();
        mm.state = CopyState::Syncing;
        mm.sync_id = sync_id;
        mm.promoted = false;
        mm.set_history(history);
        write_meta(&self.state, &mm)?;
        *lock(&self.meta) = mm;
        lock(&self.vol.order).journal.restart_at(seq)?;
        {
            let mut p = lock(&self.vol.progress);
            p.durable_seq = seq - 1;
            p.settled_seq = seq - 1;
        }
        let mut ap = volume::new_applier_at(&self.m, seq - 1)?;
        ap.set_syncing(Some(sync_id));
        self.start_worker(ap)?;
        let mut batch = Vec::new();
        let mut batch_bytes = 0usize;
        let mut last_ping = Instant::now();
        let count = crate::mirror::resync::manifest(&self.dir, &self.reserved, |e| {
            batch_bytes += e.path.as_bytes().len()
                + 32
                + 32 * e.hashes.len()
                + e.xattrs.iter().map(|n| n.len() + 1).sum::<usize>();
            batch.push(e);
            if batch.len() >= crate::mirror::resync::MANIFEST_BATCH || batch_bytes >= 1 << 20 {
                batch_bytes = 0;
                link.send(&Msg::Manifest {
                    entries: std::mem::take(&mut batch),
                })?;
                last_ping = Instant::now();
            } else if last_ping.elapsed() > Duration::from_secs(1) {
                link.send(&Msg::Ping { nonce: 0 })?;
                last_ping = Instant::now();
            }
            Ok(())
        })?;
        if !batch.is_empty() {
            link.send(&Msg::Manifest { entries: batch })?;
        }
        link.send(&Msg::ManifestEnd { count })?;
        Ok(())
    }

    /// Takes the primary's messages and does what the session says: append a batch, answer a
    /// ping, end on the primary's error; a silent primary is dropped after `DEAD_AFTER`.
    fn receive(
        &self,
        link: &Duplex,
        dec: &mut Decoder,
        session: &Mutex<Session>,
        done: &AtomicBool,
    ) -> Result<()> {
        let mut heard = Instant::now();
        loop {
            if done.load(Ordering::Acquire) {
                return Ok(());
            }
            let Some(msg) = link.recv(dec)? else {
                if heard.elapsed() > crate::net::remote::DEAD_AFTER {
                    bail!(
                        "the primary sent nothing for {:?}; closing",
                        crate::net::remote::DEAD_AFTER
                    );
                }
                continue;
            };
            heard = Instant::now();
            let incoming = lock(session).on_message(&msg)?;
            match incoming {
                Incoming::Append { records, settled } => self.append(session, records, settled)?,
                Incoming::Reply(reply) => {
                    link.send(&reply)?;
                }
                Incoming::PeerError { code, message } => {
                    bail!("the primary reported an error (code {code}): {message}")
                }
                Incoming::Nothing => {}
            }
        }
    }

    /// Stores a checked batch at its seqs and lets the applier go up to the primary's `settled`
    /// (a record ≤ it is final once the next record is known, or if it is the watermark itself).
    fn append(&self, session: &Mutex<Session>, records: &[Record], settled: u64) -> Result<()> {
        let mut o = lock(&self.vol.order);
        for r in records {
            if let Err(e) = o.journal.append_at(r.seq, &r.op) {
                drop(o);
                self.vol.changed.notify_all();
                return Err(lock(session).on_storage_failure(r.seq, &e).into());
            }
        }
        let end = o.journal.next_seq() - 1;
        drop(o);
        {
            let mut p = lock(&self.vol.progress);
            p.settled_seq = settled;
            p.appended_bytes += records.iter().map(|r| r.op.data_len() as u64).sum::<u64>();
        }
        self.vol.settled.store(end, Ordering::Release);
        self.vol.changed.notify_all();
        Ok(())
    }

    /// Each round (a change of positions, or every 50 ms) hands the positions to the session and
    /// sends the ack it says is due; records a completed copy.
    fn send_acks(&self, link: &Duplex, session: &Mutex<Session>, done: &AtomicBool) -> Result<()> {
        let t0 = Instant::now();
        while !done.load(Ordering::Acquire) {
            let raw = Positions {
                received: lock(&self.vol.order).journal.next_seq() - 1,
                durable: lock(&self.vol.progress).durable_seq,
                applied: self.m.applied.load(Ordering::Acquire),
                checkpoint: self.m.checkpoint.load(Ordering::Acquire),
            };
            let step = lock(session).ack_at(raw, t0.elapsed());
            if step.sync_complete {
                self.record_sync_complete()?;
                lock(session).sync_recorded();
            }
            if let Some(ack) = step.ack {
                link.send(&ack)?;
            }
            let p = lock(&self.vol.progress);
            let _ = self.vol.changed.wait_timeout(p, Duration::from_millis(50));
        }
        Ok(())
    }

    /// The initial copy (or resync) is complete, its `SyncDone` durably applied: from now on DIR
    /// is a consistent copy (M1 records it).
    fn record_sync_complete(&self) -> Result<()> {
        let mut meta = lock(&self.meta);
        if meta.state == CopyState::Syncing {
            meta.state = CopyState::Consistent;
            write_meta(&self.state, &meta)?;
            tracing::info!(
                "initial copy complete: {} is a consistent mirror",
                self.dir.display()
            );
        }
        Ok(())
    }

    fn metrics_text(&self) -> String {
        let (next, bytes) = {
            let o = lock(&self.vol.order);
            (o.journal.next_seq(), o.journal.bytes())
        };
        let rows = [
            (
                "received_seq",
                "Last record received from the primary.",
                (next - 1) as f64,
            ),
            (
                "durable_seq",
                "Every record up to this is durable in this mirror's journal.",
                lock(&self.vol.progress).durable_seq as f64,
            ),
            (
                "applied_seq",
                "Last record applied to the mirror's tree.",
                self.m.applied.load(Ordering::Acquire) as f64,
            ),
            (
                "checkpoint_seq",
                "Every record up to this is durably applied.",
                self.m.checkpoint.load(Ordering::Acquire) as f64,
            ),
            ("journal_bytes", "Bytes of journal on disk.", bytes as f64),
            (
                "primary_connected",
                "1 while a primary is connected.",
                f64::from(u8::from(lock(&self.peer).is_some())),
            ),
        ];
        let mut out = String::new();
        for (name, help, v) in rows {
            out.push_str(&format!(
                "# HELP mirrorfs_mirror_{name} {help}\n# TYPE mirrorfs_mirror_{name} gauge\nmirrorfs_mirror_{name} {v}\n"
            ));
        }
        out
    }

    fn write_status(&self) {
        let meta = lock(&self.meta).clone();
        let (next, bytes, segs) = {
            let o = lock(&self.vol.order);
            (
                o.journal.next_seq(),
                o.journal.bytes(),
                o.journal.segment_count(),
            )
        };
        let s = serde_json::json!({
            "role": "mirror",
            "dir": self.dir.display().to_string(),
            "pid": std::process::id(),
            "volume_id": meta.volume_id,
            "generation": meta.generation,
            "copy": meta.state,
            "primary": *lock(&self.peer),
            "refused": *lock(&self.refused),
            "connected": lock(&self.peer).is_some(),
            "received_seq": next - 1,
            "durable_seq": lock(&self.vol.progress).durable_seq,
            "applied_seq": self.m.applied.load(Ordering::Acquire),
            "checkpoint_seq": self.m.checkpoint.load(Ordering::Acquire),
            "lag_ops": (next - 1).saturating_sub(self.m.applied.load(Ordering::Acquire)),
            "phase": serde_json::to_value(&*lock(&self.m.phase)).unwrap_or_default(),
            "journal_bytes": bytes,
            "journal_segments": segs,
            "updated_unix": crate::sys::now().sec,
            "updated_unix_ms": crate::site::status::now_ms(),
        });
        if let Ok(b) = serde_json::to_vec_pretty(&s) {
            let _ = crate::site::statefile::replace(
                &StateDir::at(&self.state).status_json(),
                &b,
                0o600,
            );
        }
    }
}

struct Busy<'a>(&'a AtomicBool);
impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Copies `from` (a file, symlink or directory tree, never following symlinks) to `to`, for
/// the saved changes of `--discard-diverged`; returns the number of entries copied.
fn save_copy(from: &Path, to: &Path) -> Result<usize> {
    let md = fs::symlink_metadata(from)?;
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    let ft = md.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)
            .with_context(|| format!("cannot save {}", from.display()))?;
        Ok(1)
    } else if ft.is_dir() {
        fs::create_dir_all(to)?;
        let mut n = 1;
        for e in fs::read_dir(from)?.filter_map(|e| e.ok()) {
            n += save_copy(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(n)
    } else if ft.is_file() {
        fs::copy(from, to).with_context(|| format!("cannot save {}", from.display()))?;
        fs::File::open(to)?.sync_all()?;
        Ok(1)
    } else {
        Ok(0)
    }
}

fn recv_within(d: &Duplex, dec: &mut Decoder, limit: Duration) -> Result<Msg> {
    let t0 = Instant::now();
    loop {
        if let Some(m) = d.recv(dec)? {
            if let Msg::Error { code, message } = &m {
                if *code != 0 {
                    return Err(anyhow!("the peer refused (code {code}): {message}"));
                }
            }
            return Ok(m);
        }
        if t0.elapsed() > limit {
            bail!("the peer did not answer within {limit:?}");
        }
    }
}

/// `mirrorfs promote DIR`: makes a mirror's copy a primary's backing directory at its last
/// applied state. Refuses while a daemon serves DIR (unless `force`).
pub fn promote(dir: &Path, state: Option<&Path>, force: bool) -> Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("{} does not exist", dir.display()))?;
    let state = state
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.join(".mirrorfs"));
    let Some(mut meta) = copy_to_promote(&dir, &state)? else {
        return Ok(());
    };
    // Held until the promotion is written.
    let _lock = lock_for_promote(&dir, &state, &meta, force)?;
    let (applied, dropped) = restart_journal_at_applied(&dir, &state)?;
    // A new generation begins at the next seq: the old primary's changes after `applied`, if
    // any, are what the two sides will then not share (`core::history`).
    let mut history = meta.history();
    history.promote(random_u64()?, applied + 1);
    meta.set_history(&history);
    meta.promoted = true;
    write_meta(&state, &meta)?;
    if dropped > 0 {
        println!("{dropped} record(s) received but not applied were dropped");
    }
    println!(
        "promoted {}: generation {} of volume {}. Mount it with `mirrorfs mount {} MOUNTPOINT --state {} --mirror ...`; the old primary can only come back as a mirror of this one (see docs/protocol.md)",
        dir.display(),
        meta.generation,
        meta.volume_id,
        dir.display(),
        state.display()
    );
    Ok(())
}

/// The metadata of the daemon copy in `dir` to promote; `None` (said on stdout) when it is a
/// primary's directory or promoted already. Refuses a local mirror and an empty copy.
fn copy_to_promote(dir: &Path, state: &Path) -> Result<Option<Meta>> {
    if let Some(found) = crate::mirror::mark::read_file(state) {
        bail!(
            "{} is a local mirror of volume {} (its identity mark is {}): only a `mirrorfs serve` copy can be promoted; to fail over to a local mirror, mount it as the backing of a new primary (`mirrorfs mount {} MOUNTPOINT --mirror ...`)",
            dir.display(),
            found.volume_id,
            state.display(),
            dir.display()
        );
    }
    let meta = read_meta(state)?;
    if meta.state == CopyState::Empty {
        bail!("{} holds no copy to promote", dir.display());
    }
    if meta.former_primary() {
        println!(
            "{} is a primary's directory already (generation {})",
            dir.display(),
            meta.generation
        );
        return Ok(None);
    }
    if meta.promoted {
        println!(
            "{} is already promoted (generation {})",
            dir.display(),
            meta.generation
        );
        return Ok(None);
    }
    Ok(Some(meta))
}

/// Takes the daemon's lock on `state` (returned, to be held) and refuses, unless `force`, while
/// a daemon serves `dir`, when the copy is not consistent, or when its daemon did not stop
/// cleanly.
fn lock_for_promote(dir: &Path, state: &Path, meta: &Meta, force: bool) -> Result<fs::File> {
    let lockf = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state.join("lock"))?;
    // SAFETY: flock on a valid descriptor.
    let locked = unsafe { libc::flock(lockf.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !locked && !force {
        bail!(
            "a mirrorfs daemon is serving {} (and a primary may be connected): stop it first, or pass --force if the primary is gone for good",
            dir.display()
        );
    }
    match meta.state {
        CopyState::Consistent => {}
        CopyState::Empty => bail!("{} holds no copy to promote", dir.display()),
        other if !force => bail!(
            "the copy in {} is `{other}`, not consistent (an initial copy did not finish): it is a mix of states; pass --force to promote it anyway",
            dir.display()
        ),
        _ => {}
    }
    if !StateDir::at(state).is_clean() && !force {
        bail!(
            "the mirror daemon for {} did not stop cleanly: start `mirrorfs serve` on it once and stop it with Ctrl-C (it recovers and applies what it holds), then promote; or pass --force",
            dir.display()
        );
    }
    Ok(lockf)
}

/// Restarts the copy's journal after its last applied record; returns that record and how many
/// received records were dropped.
fn restart_journal_at_applied(dir: &Path, state: &Path) -> Result<(u64, u64)> {
    // The primary starts at the copy's last applied record: records the mirror received but had
    // not applied (their fate may be unknown) are dropped, so its journal never holds a change
    // its tree lacks.
    let mut cur = crate::site::store::FileCursor::open(&StateDir::at(state).tree().cursor())
        .context("cannot open the copy's cursor")?;
    let applied = Applier::open(&mut cur, false, 0)?
        .map(|a| a.cursor().applied)
        .ok_or_else(|| anyhow!("the copy in {} has no cursor", dir.display()))?;
    let store = FileStore::open(&state.join("journal"))?;
    let (mut journal, _) =
        Journal::open(store, JournalConfig::default()).context("cannot open the journal")?;
    let dropped = (journal.next_seq() - 1).saturating_sub(applied);
    journal.restart_at(applied + 1)?;
    Ok((applied, dropped))
}
