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
//!
//! This file starts and stops the daemon (a [`Site`] in the mirror role, the listener, status);
//! `session` is one primary's connection (the shell of `core::session`), `slot` which primary
//! may stream (one at a time; its own new connection displaces a stale session), `copy` how a copy
//! starts (initial copy, resync, adopting a history), `divergence` what happens when the
//! primary's history diverged from the copy's, `reintegration` how a diverged copy's changes are
//! handed to the primary that takes them in (`--on-diverged reintegrate`), `verify` how the
//! daemon answers `mirrorfs verify` with its own scan (hashes only).

use std::fs;
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mirrorfs_core::applier::Applier;
use mirrorfs_core::history::History;
use mirrorfs_core::link::MirrorCopy;
use mirrorfs_core::session::OnDiverged;
use mirrorfs_core::wire::MirrorState;

use crate::net::conn::Duplex;
use crate::net::gate::Gate;
use crate::net::identity::{self, Identity};
use crate::site::dirlock::DirLock;
use crate::site::engine::{Role, Site};
use crate::site::meta::{read_meta, write_meta, CopyState, Meta};
use crate::site::state_dir::{StateDir, StateLock, StateLockError};
use crate::site::status::Registered;
use crate::site::volume::{self, lock, MirrorPhase, MirrorShared, Volume};

mod copy;
mod divergence;
mod reintegration;
mod session;
pub(crate) mod slot;
mod udp;
mod verify;

/// At a stop, how long the daemon waits for its connections' threads once their sockets are
/// shut down (a session ends at its next read or write; a verify scan at its next send).
pub const SHUTDOWN_SESSIONS: Duration = Duration::from_secs(5);
/// How long it then waits for the applier's last checkpoint (a tree sync).
pub const SHUTDOWN_APPLIER: Duration = Duration::from_secs(15);
/// How long it then waits for the flusher (the journal made durable, F2).
pub const SHUTDOWN_FLUSHER: Duration = Duration::from_secs(10);

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
    /// contents. `--no-force-resync` turns it off (over a config file's `force_resync = true`).
    #[arg(long, overrides_with = "no_force_resync")]
    pub force_resync: bool,
    /// Turn `--force-resync` off.
    #[arg(long, hide = true, overrides_with = "force_resync")]
    pub no_force_resync: bool,
    /// What to do when DIR holds changes the connecting primary lacks (the copies diverged, e.g.
    /// an old primary served as a mirror of its promoted copy).
    #[arg(long, value_enum, default_value_t = OnDivergedArg::Reintegrate)]
    pub on_diverged: OnDivergedArg,
    /// The former spelling of `--on-diverged discard`.
    #[arg(long, hide = true, conflicts_with = "on_diverged")]
    pub discard_diverged: bool,
    /// The journal's size limit in MiB (at least 128: two 64 MiB segments).
    #[arg(long, default_value_t = 4096, value_parser = crate::site::volume::parse_journal_max_mib)]
    pub journal_max_mib: u64,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9109); off by default.
    #[arg(long)]
    pub metrics: Option<String>,
    /// Bind no UDP socket: a primary's offer of the UDP data path (`mount --transport udp|auto`)
    /// is declined and records come on the TLS connection. By default the daemon also listens
    /// for UDP on the `--listen` address and port. `--udp` turns it back on (over a config
    /// file's `no_udp = true`).
    #[arg(long, overrides_with = "udp")]
    pub no_udp: bool,
    /// Turn `--no-udp` off: bind the UDP socket.
    #[arg(long, hide = true, overrides_with = "no_udp")]
    pub udp: bool,
    /// Take the settings of mirror daemon NAME from the config file ($MIRRORFS_CONFIG or
    /// /etc/mirrorfs: `[serve.NAME]` in mirrorfs.toml, or serve.d/NAME.toml); flags given here
    /// override them. `mirrorfs config show NAME` prints what it gets.
    #[arg(long, value_name = "NAME")]
    pub volume: Option<String>,
}

/// `--on-diverged`: what the daemon does with a primary whose history diverged from DIR's copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnDivergedArg {
    /// Hand DIR's changes since the common point to the primary, which takes them in (conflict
    /// copies where both sides changed a file); then DIR saves its changed files to
    /// STATE/diverged/TIME-genG-seqS/ and follows the primary (block-hash resync). If DIR's
    /// journal no longer holds all of those changes, the primary is refused as with `refuse`.
    Reintegrate,
    /// Refuse the primary and change nothing (its status and this daemon's say which files
    /// diverged).
    Refuse,
    /// Save DIR's changed files to STATE/diverged/TIME-genG-seqS/, then let DIR follow the
    /// primary without taking them in.
    Discard,
}

impl ServeArgs {
    /// The policy, `--discard-diverged` included.
    fn on_diverged(&self) -> OnDiverged {
        match (self.discard_diverged, self.on_diverged) {
            (true, _) | (_, OnDivergedArg::Discard) => OnDiverged::Discard,
            (_, OnDivergedArg::Refuse) => OnDiverged::Refuse,
            (_, OnDivergedArg::Reintegrate) => OnDiverged::Reintegrate,
        }
    }
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
    /// The one primary streaming (or in its handshake), and how a stale session of it is
    /// displaced by its new connection (`slot`).
    slot: slot::PrimarySlot,
    /// A verify connection is scanning DIR (one at a time, see `verify`).
    verifying: AtomicBool,
    force_resync: bool,
    on_diverged: OnDiverged,
    /// The connected primary, for status.
    peer: Mutex<Option<String>>,
    /// Why the last primary was refused (cleared when one is accepted), for status.
    refused: Mutex<Option<String>>,
    /// A reintegration of this copy's changes into a primary: running (true) or done, and what
    /// it is, for status (cleared when a primary is accepted to stream).
    reintegration: Mutex<Option<(bool, String)>>,
    /// The UDP data path's socket (none with `--no-udp`, or when it could not be bound).
    udp: Option<udp::UdpPort>,
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
    let udp = bind_udp(&a);
    let d = Arc::new(Daemon {
        dir: dir.clone(),
        state: state.clone(),
        reserved,
        vol: site.vol.clone(),
        m,
        meta: Mutex::new(meta.clone()),
        worker: Mutex::new(None),
        pending_sync_done: AtomicU64::new(0),
        slot: slot::PrimarySlot::default(),
        verifying: AtomicBool::new(false),
        force_resync: a.force_resync,
        on_diverged: a.on_diverged(),
        peer: Mutex::new(None),
        refused: Mutex::new(None),
        reintegration: Mutex::new(None),
        udp,
    });
    d.start_copy(&site, &meta)?;
    let _reg = d.start_reporting(a.metrics.as_deref())?;
    let (listener, term) = listen(&a.listen, &dir, &id)?;
    crate::readiness::ready(&format!("serving {} on {}", dir.display(), a.listen));
    let handler: Handler = {
        let d = d.clone();
        Arc::new(move |link| d.clone().session(link))
    };
    let gate = Gate::new();
    accept_loop(&handler, &listener, &server_cfg, &term, &gate);
    crate::readiness::stopping();
    d.shut_down(site, &gate)
}

/// The UDP data path's socket on the listen address, unless `--no-udp`; a socket that cannot
/// be bound only means no UDP (primaries then stream over TCP).
fn bind_udp(a: &ServeArgs) -> Option<udp::UdpPort> {
    if a.no_udp {
        return None;
    }
    match udp::UdpPort::bind(&a.listen) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(
                "cannot listen for UDP on {}: {e}; primaries stream over TCP",
                a.listen
            );
            None
        }
    }
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
    let sd = StateDir::at(state);
    // A daemon that served it before and died keeps the tree at the journal's end (nothing
    // changes a former primary's tree before it is reintegrated or discarded): it may start.
    if meta.former_primary() && !sd.is_clean() && !sd.is_served_primary() {
        bail!(
            "{} is a primary's backing directory that was not unmounted cleanly: mount it once with `mirrorfs mount` and unmount it (that settles its last change), then serve it",
            dir.display()
        );
    }
    if meta.former_primary() {
        sd.set_served_primary()
            .with_context(|| format!("cannot write {}/served", state.display()))?;
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

/// What an accepted, authenticated connection is handed to (the daemon's session, or a writable
/// site's peer receiver, `net::peer`).
pub(crate) type Handler = Arc<dyn Fn(Duplex) -> Result<()> + Send + Sync>;

/// Accepts connections until told to stop, each on its own thread (bounded: see `gate` for who
/// is let in, who is evicted, and the handshake deadline); the gate knows them all, for a stop
/// (`Gate::close_all`).
pub(crate) fn accept_loop(
    d: &Handler,
    listener: &TcpListener,
    server_cfg: &Arc<rustls::ServerConfig>,
    term: &AtomicBool,
    gate: &Arc<Gate>,
) {
    let mut watchdog = crate::readiness::Watchdog::new();
    while !term.load(Ordering::Relaxed) {
        watchdog.tick();
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
                    match start_connection(d, server_cfg, gate, s, from) {
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
    d: &Handler,
    cfg: &Arc<rustls::ServerConfig>,
    gate: &Arc<Gate>,
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
            if let Err(e) = d(link) {
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
            crate::site::metrics::serve(addr, Arc::new(move || d.metrics_text()))?;
        }
        Ok(reg)
    }

    /// After the accept loop, every step with a deadline (the whole stop is bounded by the sum
    /// of the `SHUTDOWN_*` times, 30 s, within the unit's `TimeoutStopSec`): the connections'
    /// sockets are shut down and their threads waited for (no more records are appended, no
    /// copy starts a worker); the applier is told (the site's stop flag) and makes its last
    /// checkpoint; the flusher makes the journal durable and ends; the state is marked clean
    /// (unless the journal was poisoned, or a thread did not end in time: the next start then
    /// recovers as after a crash); the last status is written and the last log line says how
    /// the daemon stopped. A thread that did not end is named there and left behind: the
    /// process exits anyway (with an error status).
    fn shut_down(&self, site: Site, gate: &Gate) -> Result<()> {
        let t0 = Instant::now();
        let n = gate.close_all();
        tracing::info!("stopping: closed {n} connection(s)");
        let mut left = Vec::new();
        if !gate.wait_idle(SHUTDOWN_SESSIONS) {
            left.push(format!("{} connection thread(s)", gate.threads()));
        }
        self.vol.set_stopping();
        let applier_ended = self.join_worker_within(SHUTDOWN_APPLIER);
        if !applier_ended {
            left.push("the applier".to_string());
        }
        let stopped = site.stop_within(SHUTDOWN_FLUSHER, left.is_empty());
        *lock(&self.m.phase) = MirrorPhase::Stopped;
        self.write_status();
        left.extend(stopped?);
        let took = t0.elapsed().as_secs_f64();
        if left.is_empty() {
            tracing::info!("stopped in {took:.1} s");
            return Ok(());
        }
        let msg = format!(
            "stopped in {took:.1} s without waiting any longer for {}: the next start recovers as after a crash",
            left.join(", ")
        );
        tracing::error!("{msg}");
        Err(anyhow!(msg))
    }

    /// Waits for the applier (told to stop by the site's stop flag: it makes its last
    /// checkpoint) at most `limit`; whether it ended (or there was none). One that did not is
    /// left running.
    fn join_worker_within(&self, limit: Duration) -> bool {
        self.vol.changed.notify_all();
        let Some(h) = lock(&self.worker).take() else {
            return true;
        };
        let t0 = Instant::now();
        while !h.is_finished() {
            if t0.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = h.join();
        true
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

    /// Ends the applier at once, without a checkpoint (a copy restarts the journal and starts
    /// another). It is told by `end_worker`, not by the phase: the worker itself sets the phase
    /// back to `live` after each record it applies, so a `stopped` set while it was applying
    /// was lost and the join waited for ever.
    fn stop_worker(&self) {
        self.m.end_worker.store(true, Ordering::Release);
        {
            let _p = lock(&self.vol.progress);
            self.vol.changed.notify_all();
        }
        if let Some(h) = lock(&self.worker).take() {
            let _ = h.join();
        }
        *lock(&self.m.phase) = MirrorPhase::Stopped;
        self.m.end_worker.store(false, Ordering::Release);
    }

    fn copy(&self) -> MirrorCopy {
        let meta = lock(&self.meta).clone();
        let state = meta.mirror_state();
        // One lock at a time (a guard in the literal below would live to its end).
        let durable = lock(&self.vol.progress).durable_seq;
        let first_held = lock(&self.vol.order).journal.first_seq();
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
            durable,
            applied: self.m.applied.load(Ordering::Acquire),
            sync_id: meta.sync_id,
            promoted: meta.promoted && !meta.former_primary(),
            foreign,
            first_held,
        }
    }

    /// Prometheus text exposition of the daemon's state: the same names as a mount's for the
    /// same things (docs/metrics.md), its own copy as the `mirror` label.
    fn metrics_text(&self) -> String {
        use crate::site::metrics::Exposition;
        let (next, bytes, segs) = {
            let o = lock(&self.vol.order);
            (
                o.journal.next_seq(),
                o.journal.bytes(),
                o.journal.segment_count(),
            )
        };
        let durable = lock(&self.vol.progress).durable_seq;
        let applied = self.m.applied.load(Ordering::Acquire);
        let name = self.dir.display().to_string();
        let mut x = Exposition::default();
        x.one(
            "journal_last_seq",
            "gauge",
            "Seq of the last journal record (on a mirror daemon: the last received from the primary).",
            (next - 1) as f64,
        );
        x.one(
            "journal_durable_seq",
            "gauge",
            "Every journal record up to this seq is durable in this process's journal.",
            durable as f64,
        );
        x.one(
            "journal_size_bytes",
            "gauge",
            "Bytes of journal on disk.",
            bytes as f64,
        );
        x.one(
            "journal_segments",
            "gauge",
            "Journal segment files on disk.",
            segs as f64,
        );
        crate::site::metrics::mirror_families(&mut x, &[(name.as_str(), &*self.m)]);
        let me = |v: f64| [(vec![("mirror", name.as_str())], v)];
        x.family(
            "mirror_durable_seq",
            "gauge",
            "Every journal record up to this seq is durable on the mirror.",
            &me(durable as f64),
        );
        x.family(
            "mirror_lag_records",
            "gauge",
            "Journal records not yet applied on the mirror (on a mirror daemon: of those it received).",
            &me((next - 1).saturating_sub(applied) as f64),
        );
        x.family(
            "mirror_lag_seconds",
            "gauge",
            "Age of the oldest journal record not yet applied on the mirror (on a mirror daemon: since it was received; 0 when it is caught up).",
            &me(self.vol.lag_seconds(applied)),
        );
        x.family(
            "mirror_lag_bytes",
            "gauge",
            "Data bytes not yet applied on the mirror (on a mirror daemon: of those it received).",
            &me(lock(&self.vol.progress).bytes_after(applied) as f64),
        );
        x.one(
            "primary_connected",
            "gauge",
            "1 while a primary is connected to this mirror daemon.",
            f64::from(u8::from(lock(&self.peer).is_some())),
        );
        if let Some(u) = &self.udp {
            let c = u.counts();
            x.one(
                "udp_packets_total",
                "counter",
                "UDP data-path packets received.",
                c.packets as f64,
            );
            x.one(
                "udp_records_total",
                "counter",
                "Journal records received over the UDP data path.",
                c.records as f64,
            );
            x.one(
                "udp_recovered_packets_total",
                "counter",
                "UDP data packets rebuilt by FEC.",
                c.recovered as f64,
            );
            x.family(
                "udp_datagrams_dropped_total",
                "counter",
                "UDP datagrams dropped, by reason: unauthentic (forged or corrupted), replayed, malformed, other_session, invalid, no_session.",
                &[
                    (vec![("reason", "unauthentic")], c.dropped_unauthentic as f64),
                    (vec![("reason", "replayed")], c.dropped_replayed as f64),
                    (vec![("reason", "malformed")], c.dropped_malformed as f64),
                    (vec![("reason", "other_session")], c.dropped_other_session as f64),
                    (vec![("reason", "invalid")], c.dropped_invalid as f64),
                    (vec![("reason", "no_session")], c.dropped_no_session as f64),
                ],
            );
        }
        x.finish()
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
            "reintegrating": lock(&self.reintegration).as_ref().is_some_and(|r| r.0),
            "reintegration": lock(&self.reintegration).as_ref().map(|r| r.1.clone()),
            "connected": lock(&self.peer).is_some(),
            "received_seq": next - 1,
            "durable_seq": lock(&self.vol.progress).durable_seq,
            "applied_seq": self.m.applied.load(Ordering::Acquire),
            "checkpoint_seq": self.m.checkpoint.load(Ordering::Acquire),
            "lag_ops": (next - 1).saturating_sub(self.m.applied.load(Ordering::Acquire)),
            "lag_seconds": self.vol.lag_seconds(self.m.applied.load(Ordering::Acquire)),
            "phase": serde_json::to_value(&*lock(&self.m.phase)).unwrap_or_default(),
            "journal_bytes": bytes,
            "journal_segments": segs,
            "udp_port": self.udp.as_ref().and_then(|u| u.socket.local_addr().ok()).map(|a| a.port()),
            "udp": self.udp.as_ref().map(|u| u.counts()),
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
