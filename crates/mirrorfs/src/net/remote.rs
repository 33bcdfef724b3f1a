//! The primary's side of a network mirror (`--mirror mirror://HOST:PORT`): one thread per mirror
//! connects (TLS 1.3, pinned keys), shakes hands, and streams the journal from the mirror's
//! durable position; a second thread per connection takes acknowledgements. The decisions are
//! `mirrorfs_core::link::Sender`'s; this module only moves bytes and waits.
//!
//! ```text
//!  journal (records ≤ min(durable, settled)) ─▶ Records batches ─▶ TLS ─▶ mirror daemon
//!  MirrorShared.{received,durable,applied,checkpoint} ◀── Ack ◀──────────┘
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mirrorfs_core::journal::{Origin, Reader};
use mirrorfs_core::link::{JournalSpan, LinkError, Sender, Start};
use mirrorfs_core::op::Record;
use mirrorfs_core::stream::{take_batch, Backoff};
use mirrorfs_core::wire::{Decoder, MirrorState, Msg, BATCH_BYTES};

use crate::mirror::resync::Manifest;
use crate::net::conn::Duplex;
use crate::net::identity::{Fingerprint, Identity};
use crate::net::udp::{Transport, UdpBlocked, UdpPath, UdpStream};
use crate::site::store::FileStore;
use crate::site::volume::{lock, MirrorPhase, MirrorShared, Volume};

/// Unacknowledged bytes in flight per link: enough to fill a long fat pipe, bounded.
pub const WINDOW_BYTES: u64 = 32 << 20;
/// A link with nothing to send sends a `Ping` this often.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A link that hears nothing for this long is declared dead and reconnected.
pub const DEAD_AFTER: Duration = Duration::from_secs(10);
// The reconnection schedule (ordinary back-off, and the rare retries of a refused link) is
// `mirrorfs_core::stream::Backoff`; the batching of records is `stream::take_batch`.

/// Everything a link needs besides the volume.
pub struct LinkConfig {
    pub identity: Arc<Identity>,
    pub pinned: Vec<Fingerprint>,
    pub compress: bool,
    /// The volume's generation history (`core::history`).
    pub history: mirrorfs_core::history::History,
    /// This primary's name, for the mirror's logs.
    pub name: String,
    /// For a live initial copy: the inode table, the backing root and the hidden state name.
    pub backing: PathBuf,
    pub hidden: Option<Vec<u8>>,
    /// The volume's state directory (the conflict registry of a reintegration).
    pub state: PathBuf,
    /// How records travel (`--transport`).
    pub transport: Transport,
    /// The UDP data path's pace (`--udp-rate-mbit`).
    pub udp_rate_bytes_per_s: u64,
    /// `--udp-rate-control`.
    pub udp_rate_control: crate::net::udp::RateControlMode,
    /// The UDP path's FEC layers (c, 0–3).
    pub udp_fec_layers: usize,
    /// The TLS connection's TCP congestion control (`--tcp-congestion`; `None`: the system's).
    pub tcp_congestion: Option<String>,
    /// Mounted with `--writeback-cache`: a diverged mirror's changes are not taken in (see
    /// `reintegrate`).
    pub writeback_cache: bool,
}

fn set_phase(m: &MirrorShared, p: MirrorPhase) {
    *lock(&m.phase) = p;
}

/// Runs one remote mirror's link until the volume stops: connect, stream, and on any failure
/// reconnect with back-off. Local writes never wait for this thread (except in the ack modes
/// that say so, and only while the mirror is healthy).
pub fn run_link(vol: Arc<Volume>, m: Arc<MirrorShared>, cfg: Arc<LinkConfig>) {
    let mut backoff = Backoff::new();
    let epoch = Instant::now();
    let syncing = Arc::new(SyncSlot::default());
    // `--transport auto` after a fallback: TCP for the rest of this link's life.
    let udp_off = AtomicBool::new(false);
    loop {
        if lock(&vol.progress).stopping {
            break;
        }
        backoff.on_start(epoch.elapsed());
        let r = Session {
            vol: &vol,
            m: &m,
            cfg: &cfg,
            slot: &syncing,
            udp_off: &udp_off,
        }
        .run();
        {
            let mut l = lock(&m.link);
            l.connected = false;
            l.reconnects += 1;
            l.bytes_sent_before += std::mem::take(&mut l.bytes_sent);
            l.bytes_received_before += std::mem::take(&mut l.bytes_received);
            if let Err(e) = &r {
                l.last_error = Some(format!("{e:#}"));
            }
        }
        if r.as_ref().is_err_and(|e| {
            e.downcast_ref::<Reintegrated>().is_none() && e.downcast_ref::<ResyncAsked>().is_none()
        }) {
            m.count_error("link");
        }
        let e = match r {
            Ok(()) => break,
            // A reintegration ends its connection on purpose: the next one resyncs the mirror.
            Err(e) if e.downcast_ref::<Reintegrated>().is_some() => {
                tracing::info!("mirror {}: {e}", m.name);
                backoff = Backoff::new();
                continue;
            }
            // An operator asked for a resync: the next connection asks the daemon for it.
            Err(e) if e.downcast_ref::<ResyncAsked>().is_some() => {
                tracing::info!("mirror {}: {e}", m.name);
                backoff = Backoff::new();
                continue;
            }
            // The fallback to TCP reconnects at once.
            Err(e) if e.downcast_ref::<UdpBlocked>().is_some() => {
                tracing::warn!("mirror {}: {e:#}", m.name);
                udp_off.store(true, Ordering::Release);
                lock(&m.link).udp_fallback = true;
                backoff = Backoff::new();
                continue;
            }
            Err(e) => e,
        };
        let refused = e.downcast_ref::<LinkError>().is_some_and(|l| !l.retry);
        let retry = backoff.on_end(epoch.elapsed(), refused);
        if refused {
            let msg = format!("{e:#}");
            tracing::error!(
                "mirror {}: {msg}; the link is refused: next attempt in {} s",
                m.name,
                retry.wait.as_secs()
            );
            if !m.detached() {
                set_phase(
                    &m,
                    MirrorPhase::Refused {
                        reason: msg,
                        since_unix: crate::sys::now().sec as u64,
                    },
                );
            }
            vol.changed.notify_all();
        } else {
            let msg = format!("{e:#}");
            tracing::warn!("mirror {}: {msg}; reconnecting", m.name);
            if !m.detached() {
                set_phase(
                    &m,
                    MirrorPhase::Retrying {
                        error: msg,
                        since_unix: crate::sys::now().sec as u64,
                    },
                );
            }
            vol.changed.notify_all();
        }
        // Sleep in small steps so a stop is noticed.
        while epoch.elapsed() < retry.at && !lock(&vol.progress).stopping {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    set_phase(&m, MirrorPhase::Stopped);
    vol.changed.notify_all();
}

/// A connection that ended because the mirror's diverged changes were reintegrated: the link
/// reconnects at once, and the mirror, now marked for a resync, follows this primary.
#[derive(Debug)]
struct Reintegrated {
    conflicts: u64,
}

impl std::fmt::Display for Reintegrated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "its diverged changes were reintegrated ({} conflict(s) listed: `mirrorfs conflicts`); reconnecting to resynchronise it",
            self.conflicts
        )
    }
}

impl std::error::Error for Reintegrated {}

/// A connection ended because an operator asked for a resync of the mirror (`mirrorfs resync`,
/// `verify --repair`; `mirror::operator`): the link reconnects at once and the handshake asks
/// the daemon for a block-hash resync.
#[derive(Debug)]
pub(crate) struct ResyncAsked;

impl std::fmt::Display for ResyncAsked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a resync was asked (mirrorfs resync, verify --repair); reconnecting to resynchronise it"
        )
    }
}

impl std::error::Error for ResyncAsked {}

/// The reason an operator's pending request gives the handshake.
const OPERATOR_REASON: &str = "asked by the operator (mirrorfs resync, verify --repair)";

/// The live initial copy running for this mirror, if any (it outlives a connection: after a
/// reconnect the stream resumes and the copy goes on).
#[derive(Default)]
struct SyncSlot {
    running: AtomicBool,
    /// Copy `id` ended well: every one of its records, `SyncDone` included, is in the journal,
    /// so a mirror that lost the link before receiving them resumes from its durable position
    /// (while the journal still holds it) instead of being copied again.
    journaled: AtomicBool,
    id: std::sync::atomic::AtomicU32,
}

impl SyncSlot {
    /// The copy a mirror in the middle of copy `id` may resume: one still running, or one whose
    /// records are all journaled.
    fn resumable(&self) -> Option<u32> {
        (self.running.load(Ordering::Acquire) || self.journaled.load(Ordering::Acquire))
            .then(|| self.id.load(Ordering::Acquire))
    }
}

/// Clears the slot's `running` when a copy's thread ends, however it ends.
struct CopyEnded(Arc<SyncSlot>, Arc<Volume>);

impl Drop for CopyEnded {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
        self.1.changed.notify_all();
    }
}

/// Stops the copy running for `m` (if any) and waits until its thread has ended, so that at most
/// one copy at a time appends `Sync` records for the mirror.
fn stop_copy(m: &MirrorShared, slot: &SyncSlot) {
    m.cancel_copy.store(true, Ordering::Release);
    while slot.running.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(5));
    }
    m.cancel_copy.store(false, Ordering::Release);
}

fn span(vol: &Volume) -> JournalSpan {
    let o = lock(&vol.order);
    JournalSpan {
        first_held: o.journal.first_seq(),
        next_seq: o.journal.next_seq(),
    }
}

fn recv_within(d: &Duplex, dec: &mut Decoder, limit: Duration) -> Result<Msg> {
    let t0 = Instant::now();
    loop {
        if let Some(m) = d.recv(dec)? {
            return Ok(m);
        }
        if t0.elapsed() > limit {
            return Err(anyhow!("the mirror did not answer within {limit:?}"));
        }
    }
}

/// Keeps the `LinkError` (its `retry` decides how `run_link` goes on).
fn link_err(e: LinkError) -> anyhow::Error {
    anyhow::Error::new(e)
}

/// One connection to the mirror daemon, from connecting to the end of its streams: the
/// volume, the mirror's shared state, the link's configuration, the mirror's copy slot, and
/// whether `--transport auto` fell back to TCP.
struct Session<'a> {
    vol: &'a Arc<Volume>,
    m: &'a Arc<MirrorShared>,
    cfg: &'a Arc<LinkConfig>,
    slot: &'a Arc<SyncSlot>,
    udp_off: &'a AtomicBool,
}

/// What the handshake settled: the connection, its decoder, the sender and how to start.
struct Handshake {
    addr: String,
    d: Arc<Duplex>,
    dec: Decoder,
    sender: Sender,
    start: Start,
    /// The mirror said it is in the middle of a copy (a resume then continues that copy).
    mirror_copying: bool,
}

/// The first record the mirror is sent.
fn start_from(start: &Start) -> u64 {
    match start {
        Start::Resume { from } | Start::InitialSync { from, .. } | Start::Resync { from, .. } => {
            *from
        }
    }
}

/// `syncing`, with no progress yet.
fn set_syncing(m: &MirrorShared) {
    set_phase(
        m,
        MirrorPhase::Syncing {
            done_bytes: 0,
            total_bytes: 0,
        },
    );
}

impl Session<'_> {
    /// Handshake, start decision, the manifest and the copy if any, then the streams.
    fn run(&self) -> Result<()> {
        let Handshake {
            addr,
            d,
            mut dec,
            sender,
            start,
            mirror_copying,
        } = self.handshake()?;
        let from = start_from(&start);
        self.announce(&d, &sender, &start, from)?;
        let operator = crate::mirror::operator::remote_pending(self.m).is_some();
        let manifest = if let Start::Resync { .. } = &start {
            set_syncing(self.m);
            let mut mf = receive_manifest(&d, &mut dec, &self.m.name)?;
            if operator {
                crate::mirror::operator::leave_out_extras(self.m, &self.cfg.backing, &mut mf)?;
            }
            Some(mf)
        } else {
            None
        };
        self.start_copy(start, manifest, mirror_copying)?;
        if operator {
            crate::mirror::operator::remote_accepted(self.m);
        }
        self.vol.changed.notify_all();
        tracing::info!(
            "mirror {}: connected to {} ({}), streaming from record {from}",
            self.m.name,
            addr,
            d.peer().map(|p| p.to_string()).unwrap_or_default()
        );
        // With write tokens, the gate's messages travel on this connection from now on.
        let wire = self.m.tokens.get();
        if let Some(w) = wire {
            let vol = Arc::downgrade(self.vol);
            w.connect(from - 1, move || {
                if let Some(v) = vol.upgrade() {
                    // Under the lock the sending loop checks the queue under: no lost wake-up.
                    let _p = lock(&v.progress);
                    v.changed.notify_all();
                }
            });
        }
        let r = self.run_streams(&d, dec, sender);
        if let Some(w) = wire {
            w.disconnect();
        }
        r
    }

    /// Connects, says hello, and has the sender decide how to start from the mirror's welcome and
    /// this primary's own resync marker for the mirror (a resume becomes a resync, and the
    /// sender streams from the resync's start).
    fn handshake(&self) -> Result<Handshake> {
        let (vol, m, cfg, slot) = (self.vol, self.m, self.cfg, self.slot);
        let addr = m.remote.clone().unwrap_or_default();
        let d = Arc::new(Duplex::connect(&addr, &cfg.identity, cfg.pinned.clone())?);
        if let Some(algo) = &cfg.tcp_congestion {
            d.set_congestion(algo)
                .with_context(|| format!("cannot set the TCP congestion control to {algo}"))?;
        }
        let mut dec = Decoder::new();
        let mut sender = Sender::new(cfg.history.clone(), WINDOW_BYTES);
        // On the link to the other writable site of a pair, the name says what this site's
        // tree is to the peer (`core::pair`: how a new pair starts).
        let name = match m.peer.get() {
            Some(_) => crate::site::peer::tree_note(
                vol,
                &cfg.backing,
                cfg.hidden.as_deref().unwrap_or_default(),
            )
            .add_to_name(&cfg.name),
            None => cfg.name.clone(),
        };
        d.send(&sender.hello(span(vol), cfg.compress, &name))?;
        let welcome = recv_within(&d, &mut dec, crate::net::conn::CONNECT_TIMEOUT)?;
        if let Msg::Diverged { .. } = &welcome {
            if cfg.writeback_cache {
                // A failback writes the mirror's changes to BACKING beneath the mount; under the
                // writeback cache the kernel keeps a cached file's size and would write its dirty
                // pages over them. The link retries with back-off until a mount without it.
                bail!(
                    "mirror {} holds changes this primary lacks (a failback): they are not taken \
                     in while mounted with --writeback-cache; unmount and mount without it",
                    self.m.name
                );
            }
            return Err(self.reintegrate(&d, &mut dec, &mut sender, &welcome));
        }
        if let Msg::Welcome { compress, .. } = &welcome {
            d.set_compress(*compress && cfg.compress);
        }
        let mirror_copying = matches!(
            welcome,
            Msg::Welcome {
                state: MirrorState::Syncing,
                ..
            }
        );
        let new_id = crate::mirror::sync_id(m);
        let resumable = slot.resumable();
        let needs_resync = crate::site::state_dir::MirrorStateDir::at(&m.state_dir)
            .needs_resync()
            .or_else(|| {
                crate::mirror::operator::remote_pending(m).map(|_| OPERATOR_REASON.to_string())
            });
        // The decision and the start of an initial copy see the journal at the same instant.
        let start = sender
            .on_welcome(
                &welcome,
                span(vol),
                new_id,
                resumable,
                needs_resync.as_deref(),
            )
            .map_err(|e| {
                let _ = d.send(&e.to_msg());
                link_err(e)
            })?;
        // The daemon follows this primary: a reintegration plan still here is a finished one.
        crate::net::reintegrate::forget_finished_plan(m);
        Ok(Handshake {
            addr,
            d,
            dec,
            sender,
            start,
            mirror_copying,
        })
    }

    /// The mirror holds changes this primary lacks (split brain): they are taken in
    /// (`net::reintegrate`), and the connection ends with [`Reintegrated`] (or the error).
    fn reintegrate(
        &self,
        d: &Duplex,
        dec: &mut Decoder,
        sender: &mut Sender,
        diverged: &Msg,
    ) -> anyhow::Error {
        let div = match sender.on_diverged(diverged, span(self.vol)) {
            Ok(div) => div,
            Err(e) => {
                let _ = d.send(&e.to_msg());
                return link_err(e);
            }
        };
        let r = crate::net::reintegrate::Reintegration {
            vol: self.vol,
            m: self.m,
            backing: &self.cfg.backing,
            state: &self.cfg.state,
            d,
            dec,
        }
        .run(&div);
        match r {
            Ok(conflicts) => anyhow::Error::new(Reintegrated { conflicts }),
            Err(e) => e,
        }
    }

    /// Tells the mirror how the stream starts and the settled watermark, and publishes the
    /// link's positions and `connected` for `status`.
    fn announce(&self, d: &Duplex, sender: &Sender, start: &Start, from: u64) -> Result<()> {
        let (vol, m, cfg) = (self.vol, self.m, self.cfg);
        if let Start::Resync { reason, .. } = start {
            tracing::warn!(
                "mirror {}: resynchronising by block hashes: {}",
                m.name,
                reason.trim()
            );
        }
        if let Some(msg) = Sender::start_msg(start) {
            d.send(&msg)?;
        }
        // The settled watermark at once: a restarted mirror holds its last record back until it
        // knows the record's fate, and an idle primary would otherwise never say it.
        let settled_now = lock(&vol.progress).settled_seq;
        d.send(&Msg::Records {
            settled: settled_now,
            records: Vec::new(),
        })?;
        let base = from - 1;
        for a in [&m.sent, &m.received, &m.durable] {
            a.store(base, Ordering::Release);
        }
        let pos = sender.positions();
        m.applied.store(pos.applied, Ordering::Release);
        m.checkpoint.store(pos.checkpoint, Ordering::Release);
        let mut l = lock(&m.link);
        l.connected = true;
        l.peer = d.peer().map(|p| p.to_string());
        l.since_unix = crate::sys::now().sec as u64;
        l.compress = cfg.compress;
        l.last_error = None;
        Ok(())
    }

    /// Starts the copy the start decision asks for (a resync from `manifest`, or an initial
    /// copy); on a plain resume the mirror is `live` unless a copy is still running, or the
    /// mirror said it is still `copying` one.
    fn start_copy(&self, start: Start, manifest: Option<Manifest>, copying: bool) -> Result<()> {
        let m = self.m;
        match start {
            Start::Resync { sync_id, .. } => {
                let mf = manifest.unwrap_or_default();
                self.spawn_copy(sync_id, "resync", "resync", move |v, c, mm| {
                    let r = crate::mirror::resync::live_resync(
                        v,
                        &c.backing,
                        mm.clone(),
                        c.hidden.clone(),
                        mf,
                    );
                    if let Err(e) = &r {
                        crate::mirror::operator::remote_failed(&mm, &e.to_string());
                    }
                    r
                })?;
            }
            Start::InitialSync { sync_id, .. } => {
                set_syncing(m);
                self.spawn_copy(sync_id, "initial-sync", "initial copy", |v, c, mm| {
                    crate::mirror::live_sync(v, &c.backing, mm, c.hidden.clone())
                })?;
            }
            // A resume in the middle of a copy stays `syncing` until the mirror has applied
            // the whole copy (the stream loop then says `live`).
            _ if copying => set_syncing(m),
            _ => {
                if !self.slot.running.load(Ordering::Acquire) {
                    set_phase(m, MirrorPhase::Live);
                }
            }
        }
        Ok(())
    }

    /// Stops the copy running for the mirror, then runs `copy` as copy `sync_id` on its own
    /// thread `thread` (it outlives the connection); a failure is logged as `what` failed.
    fn spawn_copy<T>(
        &self,
        sync_id: u32,
        thread: &str,
        what: &'static str,
        copy: impl FnOnce(Arc<Volume>, &LinkConfig, Arc<MirrorShared>) -> std::io::Result<T>
            + Send
            + 'static,
    ) -> Result<()> {
        let (m, slot) = (self.m, self.slot);
        stop_copy(m, slot);
        slot.journaled.store(false, Ordering::Release);
        slot.id.store(sync_id, Ordering::Release);
        slot.running.store(true, Ordering::Release);
        let (v, mm, c, sl) = (self.vol.clone(), m.clone(), self.cfg.clone(), slot.clone());
        let started = std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || {
                // `running` goes back to false however the copy ends (a panic too): the next
                // `stop_copy` waits for it.
                let _done = CopyEnded(sl.clone(), v.clone());
                match copy(v, &c, mm.clone()) {
                    Ok(_) => sl.journaled.store(true, Ordering::Release),
                    Err(e) => tracing::error!("mirror {}: {what} failed: {e}", mm.name),
                }
            });
        if let Err(e) = started {
            // No thread ran: nothing will clear the slot, and a copy that never started must not
            // be offered as resumable or waited for.
            slot.running.store(false, Ordering::Release);
            return Err(anyhow::Error::new(e).context(format!("cannot start the {thread} thread")));
        }
        Ok(())
    }

    /// The transport is settled (`offer_udp`), then the sending loop runs here and the
    /// acknowledgements on their own thread, until either ends; the acknowledgement thread's
    /// error, if any, carries the sending loop's as context.
    fn run_streams(&self, d: &Arc<Duplex>, mut dec: Decoder, sender: Sender) -> Result<()> {
        let (vol, m) = (self.vol, self.m);
        let sender = Arc::new(Mutex::new(sender));
        let udp = self.offer_udp(d, &mut dec, &sender)?.map(Arc::new);
        let done = Arc::new(AtomicBool::new(false));
        let ack_thread = {
            let (d, vol, m, sender, done, udp) = (
                d.clone(),
                vol.clone(),
                m.clone(),
                sender.clone(),
                done.clone(),
                udp.clone(),
            );
            std::thread::Builder::new()
                .name("link-acks".into())
                .spawn(move || {
                    let r = take_acks(&d, dec, &vol, &m, &sender, &done, udp.as_deref());
                    done.store(true, Ordering::Release);
                    d.shutdown();
                    vol.changed.notify_all();
                    r
                })?
        };
        let r = match &udp {
            Some(path) => UdpStream {
                d,
                vol,
                m,
                sender: &sender,
                done: &done,
                copy_running: &self.slot.running,
                path,
                auto: self.cfg.transport == Transport::Auto,
            }
            .run(),
            None => stream(d, vol, m, &sender, &done, self.slot),
        };
        done.store(true, Ordering::Release);
        d.shutdown();
        let acks = ack_thread
            .join()
            .unwrap_or_else(|_| Err(anyhow!("the acknowledgement thread panicked")));
        match (r, acks) {
            (Ok(()), _) => Ok(()),
            // The fallback and an operator's resync are what the link acts on, whatever the other
            // thread saw.
            (Err(e), _) if e.downcast_ref::<UdpBlocked>().is_some() => Err(e),
            (Err(e), _) if e.downcast_ref::<ResyncAsked>().is_some() => Err(e),
            (Err(e), Err(a)) => Err(a.context(format!("{e:#}"))),
            (Err(e), Ok(())) => Err(e),
        }
    }

    /// Offers the UDP data path (`--transport udp|auto`) and opens it if the mirror accepts.
    /// `None`: records go on the TLS connection. With `auto`, a mirror that declines means TCP,
    /// and one that fails the offer (an older daemon closes the connection on an unknown
    /// message) means TCP from the next connection on.
    fn offer_udp(
        &self,
        d: &Duplex,
        dec: &mut Decoder,
        sender: &Mutex<Sender>,
    ) -> Result<Option<UdpPath>> {
        let (m, cfg) = (self.m, self.cfg);
        let auto = cfg.transport == Transport::Auto;
        lock(&m.link).transport = "tcp".into();
        // The peer of a writable pair takes records on the TLS connection only (`net::peer`).
        if cfg.transport == Transport::Tcp
            || m.peer.get().is_some()
            || (auto && self.udp_off.load(Ordering::Acquire))
        {
            return Ok(None);
        }
        let first = lock(sender).next_send();
        let port = match self.udp_answer(d, dec, sender, first) {
            Ok(port) => port,
            Err(e) if auto => {
                self.udp_off.store(true, Ordering::Release);
                lock(&m.link).udp_fallback = true;
                return Err(e.context("offering the UDP data path; the link goes on over TCP"));
            }
            Err(e) => return Err(e.context("offering the UDP data path")),
        };
        if port == 0 {
            if auto {
                tracing::info!(
                    "mirror {}: the mirror declined UDP; records go over TCP",
                    m.name
                );
                lock(&m.link).udp_fallback = true;
                return Ok(None);
            }
            return Err(anyhow!(
                "the mirror declined the UDP data path (a daemon started with --no-udp?); mount with --transport auto or tcp"
            ));
        }
        let path = UdpPath::open(
            d,
            port,
            first,
            cfg.udp_rate_bytes_per_s,
            cfg.udp_rate_control,
            cfg.udp_fec_layers,
        )?;
        lock(&m.link).transport = "udp".into();
        tracing::info!(
            "mirror {}: records from {first} go as UDP datagrams to port {port}",
            m.name
        );
        Ok(Some(path))
    }

    /// Sends `UdpOffer` and waits for the answer (`UdpAccept`'s port), taking acks and pings
    /// that come first.
    fn udp_answer(
        &self,
        d: &Duplex,
        dec: &mut Decoder,
        sender: &Mutex<Sender>,
        first: u64,
    ) -> Result<u16> {
        d.send(&Msg::UdpOffer { first })?;
        let t0 = Instant::now();
        loop {
            match d.recv(dec)? {
                Some(Msg::UdpAccept { port }) => return Ok(port),
                Some(msg @ Msg::Ack { .. }) => on_ack(d, &msg, self.vol, self.m, sender, None)?,
                Some(Msg::Ping { nonce }) => {
                    d.send(&Msg::Pong { nonce })?;
                }
                Some(Msg::Pong { .. }) => {}
                Some(Msg::Error { code, message }) => {
                    return Err(anyhow!(
                        "the mirror reported an error (code {code}): {message}"
                    ))
                }
                Some(other) => {
                    return Err(anyhow!(
                        "unexpected message type {} instead of UdpAccept",
                        other.type_code()
                    ))
                }
                None if t0.elapsed() > crate::net::conn::CONNECT_TIMEOUT => {
                    return Err(anyhow!("the mirror did not answer the UDP offer"))
                }
                None => {}
            }
        }
    }
}

/// Receives a resync's manifest from the mirror, answering its pings.
fn receive_manifest(d: &Duplex, dec: &mut Decoder, name: &str) -> Result<Manifest> {
    let mut mf = Manifest::default();
    let mut heard = Instant::now();
    loop {
        match d.recv(dec)? {
            Some(Msg::Manifest { entries }) => {
                heard = Instant::now();
                for e in entries {
                    mf.add(e)?;
                }
            }
            Some(Msg::ManifestEnd { count }) => {
                if count != mf.len() as u64 {
                    return Err(anyhow!(
                        "the mirror's manifest announced {count} entries but sent {}",
                        mf.len()
                    ));
                }
                break;
            }
            Some(Msg::Ping { nonce }) => {
                heard = Instant::now();
                d.send(&Msg::Pong { nonce })?;
            }
            Some(Msg::Error { code, message }) => {
                return Err(anyhow!(
                    "the mirror refused the resync (code {code}): {message}"
                ))
            }
            Some(other) => {
                return Err(anyhow!(
                    "unexpected message type {} during the manifest",
                    other.type_code()
                ))
            }
            None if heard.elapsed() > DEAD_AFTER * 6 => {
                return Err(anyhow!("the mirror stopped sending its manifest"))
            }
            None => {}
        }
    }
    tracing::info!("mirror {}: manifest of {} entries received", name, mf.len());
    Ok(mf)
}

/// What one round of a sending loop sees: records up to `limit` = min(durable, settled) may
/// go; `sent_all`: every one of them went.
pub(crate) struct Round {
    pub limit: u64,
    pub settled: u64,
    pub sent_all: bool,
}

/// A sending loop's heartbeat (a `Ping` when nothing was sent on the connection for
/// [`HEARTBEAT`]) and the deadline of its drain at a stop.
pub(crate) struct Beat {
    last_send: Instant,
    nonce: u64,
    stop_deadline: Option<Instant>,
}

impl Beat {
    pub(crate) fn new() -> Beat {
        Beat {
            last_send: Instant::now(),
            nonce: 0,
            stop_deadline: None,
        }
    }

    /// Something went on the connection: no ping needed for a while.
    pub(crate) fn sent(&mut self) {
        self.last_send = Instant::now();
    }

    pub(crate) fn maybe_ping(&mut self, d: &Duplex) -> Result<()> {
        if self.last_send.elapsed() >= HEARTBEAT {
            self.nonce += 1;
            d.send(&Msg::Ping { nonce: self.nonce })?;
            self.sent();
        }
        Ok(())
    }
}

/// The start of each round of a sending loop (TCP or UDP): ends on a lost connection or a
/// detached mirror; `None` once a stop has drained (the mirror acknowledged everything durable,
/// or 10 s passed); says `live` when a copy's last record is applied.
pub(crate) fn round(
    vol: &Volume,
    m: &MirrorShared,
    sender: &Mutex<Sender>,
    done: &AtomicBool,
    copy_running: &AtomicBool,
    beat: &mut Beat,
) -> Result<Option<Round>> {
    if done.load(Ordering::Acquire) {
        return Err(anyhow!("connection lost"));
    }
    if m.detached() {
        return Err(anyhow!("mirror detached"));
    }
    let (durable, settled, stopping) = {
        let p = lock(&vol.progress);
        (p.durable_seq, p.settled_seq, p.stopping)
    };
    // Not while the mount stops: its drain comes first, and the request ends with the mount.
    if !stopping && crate::mirror::operator::remote_pending(m).is_some() {
        return Err(anyhow::Error::new(ResyncAsked));
    }
    let limit = durable.min(settled);
    let sent_all = lock(sender).next_send() > limit;
    if stopping {
        // Drain: give the mirror a moment to acknowledge what it has.
        let dl = *beat
            .stop_deadline
            .get_or_insert_with(|| Instant::now() + Duration::from_secs(10));
        if (sent_all && m.durable.load(Ordering::Acquire) >= limit) || Instant::now() > dl {
            return Ok(None);
        }
    }
    if !copy_running.load(Ordering::Acquire)
        && matches!(*lock(&m.phase), MirrorPhase::Syncing { .. })
        && m.applied.load(Ordering::Acquire) >= lock(sender).next_send().saturating_sub(1)
        && sent_all
    {
        set_phase(m, MirrorPhase::Live);
        crate::mirror::operator::remote_applied(m);
    }
    Ok(Some(Round {
        limit,
        settled,
        sent_all,
    }))
}

/// The sending loop: records ≤ min(durable, settled) in batches within the byte window, and
/// heartbeats. Returns Ok when the volume stops and the mirror has everything durable.
fn stream(
    d: &Duplex,
    vol: &Volume,
    m: &MirrorShared,
    sender: &Mutex<Sender>,
    done: &AtomicBool,
    slot: &SyncSlot,
) -> Result<()> {
    let mut reader: Reader<crate::site::store::FileSegment> = Reader::new(lock(sender).next_send());
    let mut pending: Option<Record> = None;
    let mut beat = Beat::new();
    loop {
        let Some(Round {
            limit,
            settled,
            sent_all,
        }) = round(vol, m, sender, done, &slot.running, &mut beat)?
        else {
            return Ok(());
        };
        let may = lock(sender).may_send();
        if may && !sent_all {
            let batch = take_batch(&mut pending, BATCH_BYTES, || {
                if reader.next_seq() > limit {
                    return Ok(None);
                }
                next_for_link(vol, m, &mut reader, limit)
            })?;
            if let Some(last) = batch.last().map(|r| r.seq) {
                // The change points of these records go first (`site::reconcile`).
                if let (Some(rc), Some(first)) = (m.reconcile.get(), batch.first()) {
                    for (from, through) in rc.points_for(first.seq, last) {
                        d.send(&Msg::PeerSeen { from, through })?;
                    }
                }
                let frame = d.encode(&Msg::Records {
                    settled,
                    records: batch,
                });
                // Counted as sent before it is: the mirror may acknowledge it before
                // `send_raw` returns.
                lock(sender).sent(last, frame.len() as u64);
                d.send_raw(&frame)?;
                m.sent.store(last, Ordering::Release);
                beat.sent();
                if let Some(w) = m.tokens.get() {
                    w.gate.shipped(last);
                }
                vol.changed.notify_all();
                send_tokens(d, m, &mut beat)?;
                continue;
            }
        }
        send_tokens(d, m, &mut beat)?;
        beat.maybe_ping(d)?;
        let p = lock(&vol.progress);
        let idle = m.tokens.get().is_none_or(|w| w.is_idle());
        if p.durable_seq.min(p.settled_seq) == limit && !p.stopping && idle {
            let _ = vol.changed.wait_timeout(p, Duration::from_millis(100));
        }
    }
}

/// The write-token messages the gate queued, after every record sent so far (the order the
/// token machine relies on: a Grant after the records it names).
fn send_tokens(d: &Duplex, m: &MirrorShared, beat: &mut Beat) -> Result<()> {
    if let Some(w) = m.tokens.get() {
        for t in w.take() {
            d.send(&Msg::Token(t))?;
            beat.sent();
        }
    }
    Ok(())
}

/// The journal's next record through `limit` as this link sends it. On the link to the other
/// writable site of a pair (`mount --peer`), each of our records that came from that site goes
/// as `Abort{seq: its own seq}`: a placeholder that keeps the stream's seqs consecutive (the
/// peer's session checks them) and that nobody applies, so no change is sent back where it
/// came from (`site::peer`).
pub(crate) fn next_for_link(
    vol: &Volume,
    m: &MirrorShared,
    reader: &mut Reader<crate::site::store::FileSegment>,
    limit: u64,
) -> Result<Option<Record>, mirrorfs_core::journal::JournalError> {
    let view = lock(&vol.order).journal.segment_for(reader.next_seq());
    let Some((mut r, origin)) = reader.next_from::<FileStore>(view, limit)? else {
        return Ok(None);
    };
    if let Some(legacy) = m.peer.get() {
        // The origin is in the record's frame (durable with it); a record journaled by an
        // older version is known as the peer's from its `STATE/peer-origin`.
        if origin == Origin::Peer || legacy.contains(r.seq) {
            r.op = mirrorfs_core::op::Op::Abort { seq: r.seq };
        }
    }
    Ok(Some(r))
}

/// The receiving loop: acknowledgements update the mirror's positions and wake waiters; over
/// UDP, NAKs go to the UDP sender.
fn take_acks(
    d: &Duplex,
    mut dec: Decoder,
    vol: &Volume,
    m: &MirrorShared,
    sender: &Mutex<Sender>,
    done: &AtomicBool,
    udp: Option<&UdpPath>,
) -> Result<()> {
    let mut heard = Instant::now();
    loop {
        let silent =
            || anyhow!("the mirror sent nothing for {DEAD_AFTER:?}; the link is considered dead");
        let Some(msg) = d.next_or_dead(&mut dec, done, &mut heard, DEAD_AFTER, silent)? else {
            return Ok(());
        };
        match msg {
            Msg::Ack { .. } => on_ack(d, &msg, vol, m, sender, udp)?,
            Msg::UdpNak { naks } if udp.is_some() => {
                if let Some(u) = udp {
                    u.on_nak(&naks, vol);
                }
            }
            Msg::Pong { .. } => {}
            Msg::Ping { nonce } => {
                d.send(&Msg::Pong { nonce })?;
            }
            Msg::Error { code, message } => {
                return Err(anyhow!(
                    "the mirror reported an error (code {code}): {message}"
                ));
            }
            other => {
                let e = LinkError {
                    code: mirrorfs_core::wire::error_code::BAD_FRAME,
                    message: format!(
                        "unexpected message type {} from the mirror",
                        other.type_code()
                    ),
                    retry: true,
                };
                let _ = d.send(&e.to_msg());
                return Err(link_err(e));
            }
        }
    }
}

/// An `Ack`: checked by the sender, published as the mirror's positions (and, over UDP, what
/// the UDP sender need not keep any more).
fn on_ack(
    d: &Duplex,
    msg: &Msg,
    vol: &Volume,
    m: &MirrorShared,
    sender: &Mutex<Sender>,
    udp: Option<&UdpPath>,
) -> Result<()> {
    let p = lock(sender).on_ack(msg).map_err(|e| {
        let _ = d.send(&e.to_msg());
        link_err(e)
    })?;
    m.received.store(p.received, Ordering::Release);
    m.durable.store(p.durable, Ordering::Release);
    m.applied.store(p.applied, Ordering::Release);
    m.checkpoint.store(p.checkpoint, Ordering::Release);
    if let Some(legacy) = m.peer.get() {
        legacy.forget_through(p.durable);
    }
    if let Some(rc) = m.reconcile.get() {
        rc.acknowledged(p.durable);
    }
    if let Some(u) = udp {
        u.on_delivered(p.received);
    }
    {
        let mut l = lock(&m.link);
        l.bytes_sent = d.bytes_out.load(Ordering::Relaxed);
        l.bytes_received = d.bytes_in.load(Ordering::Relaxed);
    }
    vol.changed.notify_all();
    Ok(())
}
