//! `mirrorfs witness --listen ADDR`: a small daemon that stores no data and grants each volume's
//! write lease to one site at a time (the shell of `core::lease::LeaseTable`), and the sites'
//! side: asking for a lease (`ask`, used by `promote --witness`) and keeping one while a primary
//! is mounted (`keep_lease`, the network half of `site::fence::Fence`).
//!
//! ```text
//!  primary: keep_lease thread ── LeaseRequest ──TLS──▶ witness: one thread per connection
//!           site::fence::Fence ◀─ LeaseResponse ──────         LeaseTable (in memory only)
//!           (Volume::mutate: EROFS while fenced)
//!           at its stop ─────── LeaseRelease ──────▶ the lease is free at once
//! ```
//!
//! Connections use the same pinned mutual TLS and the same bounds (`gate`) as the mirror daemon.
//! The witness keeps nothing on disk: after a restart it grants nothing for one maximum ttl
//! (`core::lease`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mirrorfs_core::lease::{LeaseTable, Request, Response, TTL_MAX_MS};
use mirrorfs_core::wire::{error_code, Decoder, Msg};

use crate::net::conn::Duplex;
use crate::net::gate::Gate;
use crate::net::identity;
use crate::site::fence::Fence;
use crate::site::volume::lock;

#[derive(clap::Args)]
pub struct WitnessArgs {
    /// Address to listen on, e.g. 0.0.0.0:7071.
    #[arg(long)]
    pub listen: String,
    /// The configuration directory with this machine's identity and the trusted sites (default:
    /// $MIRRORFS_CONFIG or /etc/mirrorfs; create it with `mirrorfs init`, then `mirrorfs trust`
    /// each site, and on each site `mirrorfs trust` this witness).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The longest lease granted (longer requests are shortened); also how long the witness
    /// grants nothing after it starts, since it cannot know who held a lease before.
    #[arg(long, default_value_t = TTL_MAX_MS)]
    pub ttl_max_ms: u64,
}

/// A connection silent for this long is closed (a primary renews every third of its ttl).
const IDLE_MAX: Duration = Duration::from_secs(60);

/// `mirrorfs witness`: answers lease requests from trusted sites until SIGINT or SIGTERM.
pub fn witness(a: WitnessArgs) -> Result<()> {
    let cfg_dir = identity::config_dir(a.config.as_deref());
    let id = identity::load(&cfg_dir)?;
    let pinned = identity::pinned(&cfg_dir)?;
    if pinned.is_empty() {
        tracing::warn!(
            "no trusted peers in {}: every site will be refused; run `mirrorfs trust FINGERPRINT NAME` with each site's fingerprint",
            cfg_dir.join("peers").display()
        );
    }
    let server_cfg = identity::server_config_reloading(&id, &cfg_dir, pinned)?;
    let listener =
        TcpListener::bind(&a.listen).with_context(|| format!("cannot listen on {}", a.listen))?;
    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, term.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone())?;
    listener.set_nonblocking(true)?;
    let epoch = Instant::now();
    let table = Arc::new(Mutex::new(LeaseTable::new(0, a.ttl_max_ms)));
    let local = listener
        .local_addr()
        .map(|l| l.to_string())
        .unwrap_or_default();
    tracing::info!(
        "witness on {local} as {}: grants nothing for the first {} ms (it cannot know who held a lease before it started)",
        id.fingerprint,
        a.ttl_max_ms.max(mirrorfs_core::lease::TTL_MIN_MS)
    );
    eprintln!(
        "mirrorfs: witness listening on {local} (identity {}; Ctrl-C stops)",
        id.fingerprint
    );
    let gate = Gate::new();
    while !term.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((sock, from)) => {
                if sock.set_nonblocking(false).is_err() {
                    continue;
                }
                let Some(slot) = gate.admit(&sock) else {
                    continue;
                };
                let (cfg, table, term) = (server_cfg.clone(), table.clone(), term.clone());
                let started = std::thread::Builder::new()
                    .name("witness".into())
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
                        if let Err(e) = answer(&link, &table, epoch, &term) {
                            tracing::debug!("connection from {from}: {e:#}");
                        }
                    });
                if let Err(e) = started {
                    tracing::warn!("connection from {from}: cannot start a thread for it: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    tracing::info!("witness stopped");
    Ok(())
}

/// One site's connection: each `LeaseRequest` and `LeaseRelease` answered in order; anything
/// else ends it.
fn answer(
    link: &Duplex,
    table: &Mutex<LeaseTable>,
    epoch: Instant,
    term: &AtomicBool,
) -> Result<()> {
    let mut dec = Decoder::new();
    let mut heard = Instant::now();
    let mut last_kind: Option<std::mem::Discriminant<Response>> = None;
    while let Some(msg) = link.next_or_dead(&mut dec, term, &mut heard, IDLE_MAX, || {
        anyhow!("the site sent nothing for {IDLE_MAX:?}")
    })? {
        let now = epoch.elapsed().as_millis() as u64;
        let (r, resp) = match msg {
            Msg::LeaseRequest(r) => {
                let resp = lock(table).request(now, &r);
                (r, resp)
            }
            Msg::LeaseRelease(r) => {
                let resp = lock(table).release(now, &r);
                tracing::info!(
                    "lease of volume {} for site {} (generation {}): release asked: {resp}",
                    mirrorfs_core::link::hex(&r.volume_id),
                    r.site,
                    r.generation_number
                );
                link.send(&Msg::LeaseResponse(resp))?;
                last_kind = None;
                continue;
            }
            other => {
                let _ = link.send(&Msg::Error {
                    code: error_code::BAD_FRAME,
                    message: "a witness answers lease requests only".into(),
                });
                bail!("unexpected message type {}", other.type_code());
            }
        };
        // Renewals are the steady state: logged when the answer changes, not each time.
        let kind = std::mem::discriminant(&resp);
        let line = format!(
            "lease of volume {} for site {} (generation {}): {resp}",
            mirrorfs_core::link::hex(&r.volume_id),
            r.site,
            r.generation_number
        );
        if last_kind != Some(kind) {
            tracing::info!("{line}");
        } else {
            tracing::debug!("{line}");
        }
        last_kind = Some(kind);
        link.send(&Msg::LeaseResponse(resp))?;
    }
    Ok(())
}

/// `mirror://HOST:PORT` (or `HOST:PORT`) → `HOST:PORT`.
pub fn address(url: &str) -> String {
    url.strip_prefix("mirror://").unwrap_or(url).to_string()
}

/// A connection to the witness, opened when needed and dropped after any failure.
pub struct Client {
    addr: String,
    id: identity::Identity,
    pinned: Vec<identity::Fingerprint>,
    link: Option<(Duplex, Decoder)>,
}

impl Client {
    /// Loads this machine's identity and trusted peers from `config` (connects later).
    pub fn new(witness: &str, config: Option<&Path>) -> Result<Client> {
        let cfg_dir = identity::config_dir(config);
        let id = identity::load(&cfg_dir)?;
        let pinned = identity::pinned(&cfg_dir)?;
        if pinned.is_empty() {
            bail!(
                "no trusted peers in {}: trust the witness's fingerprint with `mirrorfs trust`",
                cfg_dir.join("peers").display()
            );
        }
        Ok(Client {
            addr: address(witness),
            id,
            pinned,
            link: None,
        })
    }

    /// Sends `r` and waits at most `wait` for the answer.
    pub fn ask(&mut self, r: &Request, wait: Duration) -> Result<Response> {
        self.send(Msg::LeaseRequest(r.clone()), wait)
    }

    /// Gives the lease `r` names back (a clean stop) and waits at most `wait` for the answer.
    /// A witness that predates the release closes the connection: that is an error here, and
    /// the lease then runs out at its expiry as before.
    pub fn release(&mut self, r: &Request, wait: Duration) -> Result<Response> {
        self.send(Msg::LeaseRelease(r.clone()), wait)
    }

    fn send(&mut self, msg: Msg, wait: Duration) -> Result<Response> {
        let res = self.send_once(&msg, wait);
        if res.is_err() {
            self.link = None;
        }
        res
    }

    fn send_once(&mut self, msg: &Msg, wait: Duration) -> Result<Response> {
        if self.link.is_none() {
            let d = Duplex::connect(&self.addr, &self.id, self.pinned.clone())
                .with_context(|| format!("cannot reach the witness {}", self.addr))?;
            self.link = Some((d, Decoder::new()));
        }
        let Some((link, dec)) = self.link.as_mut() else {
            bail!("no connection");
        };
        link.send(msg)
            .with_context(|| format!("cannot send to the witness {}", self.addr))?;
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match link.recv(dec)? {
                Some(Msg::LeaseResponse(resp)) => return Ok(resp),
                Some(Msg::Error { message, .. }) => bail!("the witness refused: {message}"),
                Some(other) => bail!(
                    "the witness sent an unexpected message (type {})",
                    other.type_code()
                ),
                None => {}
            }
        }
        bail!("the witness {} did not answer within {wait:?}", self.addr)
    }
}

/// `promote --witness`: takes the lease `r` asks for, or says why not.
pub fn acquire(witness: &str, config: Option<&Path>, r: &Request) -> Result<()> {
    let mut client = Client::new(witness, config)?;
    let wait = Duration::from_millis(r.ttl_ms.max(2000));
    match client.ask(r, wait)? {
        Response::Granted { ttl_ms } => {
            tracing::info!(
                "the witness {witness} granted the write lease to generation {} for {ttl_ms} ms",
                r.generation_number
            );
            Ok(())
        }
        Response::Held {
            site,
            generation_number,
            left_ms,
        } => bail!(
            "the primary still holds the lease (site {site}, generation {generation_number}, {left_ms} ms left): it is alive on the other side of the split; promoting now would make two writers. Nothing was changed; try again once it is stopped or cut off from the witness {witness}"
        ),
        Response::Superseded { generation_number } => bail!(
            "the witness {witness} already granted the lease to generation {generation_number} of this volume: another copy was promoted since; nothing was changed"
        ),
        other => bail!("the witness {witness} refused the lease: {other}; nothing was changed"),
    }
}

/// How long a stopping site waits for the witness to answer its release.
pub const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// The primary's lease thread: asks when the keeper says a request is due and hands it the
/// answers, until `stop()` says so (the fence logs each change between writable and
/// read-only). Then, if the keeper held a grant, the lease is given back (`LeaseRelease`,
/// waiting at most [`RELEASE_WAIT`]) so that another site may take it without waiting for its
/// expiry; the keeper is no longer writable from then on. Every wait here is bounded (a request
/// by the ttl, a connection by `conn::CONNECT_TIMEOUT`), so the thread can be joined.
pub fn keep_lease(fence: Arc<Fence>, mut client: Client, stop: impl Fn() -> bool) {
    while !stop() {
        let due = fence.with_keeper(|k, now| k.tick(now).map(|r| (r, now, k.ttl_ms())));
        if let Some((r, sent, ttl)) = due {
            match client.ask(&r, Duration::from_millis(ttl)) {
                Ok(resp) => fence.with_keeper(|k, now| k.on_response(now, sent, &resp)),
                Err(e) => fence.with_keeper(|k, _| k.on_error(Some(sent), format!("{e:#}"))),
            }
        }
        let _ = fence.check();
        let poll = fence.with_keeper(|k, _| k.poll_ms());
        let t0 = Instant::now();
        while !stop() && t0.elapsed() < Duration::from_millis(poll) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let Some(r) = fence.with_keeper(|k, now| k.release(now)) else {
        return;
    };
    let _ = fence.check();
    let volume = mirrorfs_core::link::hex(&r.volume_id);
    match client.release(&r, RELEASE_WAIT) {
        Ok(Response::Released) => {
            tracing::info!("gave the lease of volume {volume} back to the witness")
        }
        Ok(other) => tracing::warn!(
            "the witness did not take back the lease of volume {volume}: {other}"
        ),
        Err(e) => tracing::warn!(
            "could not give the lease of volume {volume} back to the witness ({e:#}; a witness older than the release closes the connection): the other site takes it when it expires"
        ),
    }
}
