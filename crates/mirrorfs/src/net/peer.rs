//! The receiving half of a pair of writable sites (`mount --peer mirror://HOST:PORT --receive
//! ADDR`, issue 7 item 5). Each site streams its own journal to the other's `--receive`
//! listener with the ordinary network-mirror link (`net::remote`, the `--peer` mirror); this
//! module takes the other site's stream. It runs the mirror daemon's session machine
//! (`core::session::Session`: handshake, sequence checks, reserved names, acks) but, instead of
//! appending at the peer's seqs to a mirror journal, applies each record to this site's backing
//! tree through the volume (`Volume::mutate_from_peer`): journaled here under the order lock
//! like a local change, its origin in its frame (`Origin::Peer`: the link to the peer never
//! sends it back), so the mount's view follows it and this site's own mirrors get it.
//!
//! ```text
//!  peer ─ Hello ─▶ Session::on_hello (the copy: "consistent, the peer's volume, applied through
//!                  STATE/peer-applied") ─▶ Welcome; Start must be Resume
//!       ─ Records{settled} ─▶ Session::on_message ─▶ hold each record until its fate is known
//!                  ─▶ apply ≤ settled, skipping Aborts and what they abort (and the peer's
//!                     placeholders for our own records: `Abort{seq}`, see net::remote)
//!                  ─▶ local journal durable, STATE/peer-applied
//!       ◀ Ack{received = durable = applied = checkpoint = the peer seq applied here}
//! ```
//!
//! A record that fails here (the file it writes is gone: a concurrent local unlink) is journaled
//! with its `Abort` like any failed change and the stream goes on; a refusal of the volume (the
//! journal full, a fence) ends the connection without acknowledging, and the peer sends it again.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mirrorfs_core::applier::Intent;
use mirrorfs_core::history::History;
use mirrorfs_core::link::{Begin, LinkError, MirrorCopy, Positions};
use mirrorfs_core::op::{Op, Record};
use mirrorfs_core::path::RelPath;
use mirrorfs_core::reconcile::{
    clash_moves_ours_aside, exchange_via, meta_key, renamed_path, Decision, DirClash, EntryClash,
    ExchangeDecision, RenameDecision,
};
use mirrorfs_core::reuse::{Admit, ReuseWindow};
use mirrorfs_core::session::{Incoming, OnDiverged, Session};
use mirrorfs_core::tree::apply_op;
use mirrorfs_core::wire::{error_code, Decoder, MirrorState, Msg};

use crate::net::conn::Duplex;
use crate::net::identity::Identity;
use crate::site::peer::{tree_is_empty, CopyFile, CopyStatus, PeerPosition, ReceiveStatus};
use crate::site::reconcile::{entries_clash, entry_of, SiteReconcile};
use crate::site::tokens::TokenGate;
use crate::site::volume::{lock, Volume};
use crate::tree::dirtree::{DirTree, Root};
use mirrorfs_core::pair::{self, PairStart, TreeNote};

/// What a pair runs with besides the stream: write tokens (`--write-tokens`) and the
/// reconciliation of a split (`--partition reconcile`).
#[derive(Default)]
pub struct Pairing {
    pub gate: Option<Arc<TokenGate>>,
    pub reconcile: Option<Arc<SiteReconcile>>,
}

/// One writable site's receiver of its peer's stream.
pub struct PeerReceiver {
    vol: Arc<Volume>,
    backing: PathBuf,
    /// The state directory's name at the backing's root: no record may touch it.
    hidden: Vec<u8>,
    position_file: PathBuf,
    position: Mutex<PeerPosition>,
    /// The one peer stream; the peer's new connection displaces its stale session
    /// (`serve::slot`, the core's `slot` rule; see `session`).
    slot: crate::net::serve::slot::PrimarySlot,
    applied: AtomicU64,
    status: Arc<Mutex<ReceiveStatus>>,
    /// With `--write-tokens`: the peer's token messages go here, and how far its records are
    /// applied.
    gate: Option<Arc<TokenGate>>,
    /// The kernel is told of applied changes on another thread (see `settler`).
    settle: Arc<(Mutex<bool>, Condvar)>,
    /// Records were applied since that thread was last woken: it is woken once per batch
    /// (`settle_view`), not once per record.
    unsettled: AtomicBool,
    /// With `--partition reconcile`: what the peer changed during a split is reconciled with
    /// what this site changed (`site::reconcile`, `core::reconcile`).
    reconcile: Option<Arc<SiteReconcile>>,
    /// The winner's rewrites asked by the batch being applied, done once it is considered.
    rewrites: Mutex<Vec<(RelPath, bool)>>,
    /// `STATE/peer-copy`: the peer's initial copy under way here (`core::pair`).
    copy_file: CopyFile,
    /// That copy's id (0: none): its `Sync` records are applied here, its `SyncDone` ends it.
    copy_id: std::sync::atomic::AtomicU32,
    /// The copy's `SyncDone` was applied in the batch being made durable.
    copy_done: AtomicBool,
    /// The position reached by batches that changed nothing here (see [`INERT_DEFER`]), not
    /// yet in `STATE/peer-applied` nor acknowledged, and when the first of them came.
    inert: Mutex<Option<(u64, Instant)>>,
    /// `MIRRORFS_FAILPOINT` (tests only: `tests/tokens.rs`): `peer-exchange-applied` — once a
    /// peer's exchange is applied here, before it is acknowledged, the receiver stops and waits
    /// to be killed; `peer-record-applied:OP` (`Op::name`, e.g. `create`) — the same once a
    /// peer record of that kind is applied here.
    failpoint: Option<String>,
    /// The backing tree `apply_one` applies the peer's records to, kept between records
    /// ([`PeerReceiver::tree`]).
    tree: Mutex<Option<DirTree>>,
}

/// The test hook's environment variable (see `PeerReceiver::failpoint`).
const FAILPOINT_ENV: &str = "MIRRORFS_FAILPOINT";

/// What the peer is told with `BUSY` when its connection does not get the stream.
fn peer_refusal(r: &crate::net::serve::slot::Refusal) -> String {
    match r {
        crate::net::serve::slot::Refusal::Busy => {
            "the peer site is already streaming to this site".into()
        }
        crate::net::serve::slot::Refusal::StillEnding { waited } => format!(
            "the peer site's previous connection to this site was told to end {:.1} s ago and has not ended yet; the peer tries again by itself. If this lasts, remount this site",
            waited.as_secs_f64()
        ),
        crate::net::serve::slot::Refusal::Superseded => {
            "a newer connection of the peer site is taking its place".into()
        }
    }
}

/// How long the position reached by batches that change nothing here may wait before
/// `STATE/peer-applied` is written and the peer acknowledged: batches of the peer's
/// placeholders for our own records (`Abort{seq}`, `net::remote`), its aborts and group marks,
/// without `--partition reconcile` or quorum and with no copy under way. A site writing alone
/// gets one such batch per change it makes, and a durable replace of the file for each (two
/// fsyncs) cost it about a third of its name-change speed (docs/benchmarks.md, "the `names`
/// row's lever"). Nothing is lost by the wait: after a crash those placeholders come again
/// and change nothing again. The acker writes the file at most this long after the first such
/// batch (a batch that changes something writes it at once, covering them).
pub const INERT_DEFER: Duration = Duration::from_millis(100);

impl PeerReceiver {
    pub fn new(
        vol: Arc<Volume>,
        backing: &Path,
        hidden: Vec<u8>,
        position_file: PathBuf,
        pairing: Pairing,
        listen: &str,
    ) -> Result<Arc<PeerReceiver>> {
        let Pairing { gate, reconcile } = pairing;
        let position = PeerPosition::load(&position_file)?;
        let copy_file = CopyFile::at(position_file.with_file_name("peer-copy"));
        let copying = copy_file.load()?;
        // Made by the mount before it served anything (`site::peer::born_empty`).
        let born_empty = position_file.with_file_name("pair-born-empty").exists();
        let status = Arc::new(Mutex::new(ReceiveStatus {
            listen: listen.to_string(),
            applied: position.applied,
            paired: position.volume.is_some(),
            born_empty,
            copy: copying.map(|sync_id| CopyStatus {
                from: peer_label(gate.as_deref()),
                sync_id,
                bytes: 0,
            }),
            ..ReceiveStatus::default()
        }));
        if copying.is_some() {
            vol.receiving_copy.store(true, Ordering::Release);
        }
        let _ = vol.peer_receive.set(status.clone());
        Ok(Arc::new(PeerReceiver {
            copy_file,
            copy_id: std::sync::atomic::AtomicU32::new(copying.unwrap_or(0)),
            copy_done: AtomicBool::new(false),
            inert: Mutex::new(None),
            failpoint: std::env::var(FAILPOINT_ENV).ok(),
            status,
            gate,
            reconcile,
            rewrites: Mutex::new(Vec::new()),
            settle: Arc::new((Mutex::new(false), Condvar::new())),
            unsettled: AtomicBool::new(false),
            vol,
            backing: backing.to_path_buf(),
            hidden,
            position_file,
            applied: AtomicU64::new(position.applied),
            position: Mutex::new(position),
            slot: Default::default(),
            tree: Mutex::new(None),
        }))
    }

    /// Listens on `addr` (pinned mutual TLS, the peers `mirrorfs trust`ed in `config`) until
    /// `stop` is set; one peer connection at a time.
    pub fn serve(
        self: &Arc<Self>,
        addr: &str,
        id: &Identity,
        config: &Path,
        pinned: Vec<crate::net::identity::Fingerprint>,
        stop: Arc<AtomicBool>,
    ) -> Result<std::thread::JoinHandle<()>> {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen on {addr} for the peer's stream"))?;
        listener.set_nonblocking(true)?;
        let server_cfg = crate::net::identity::server_config_reloading(id, config, pinned)?;
        tracing::info!(
            "receiving the peer writable site's stream on {}",
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        self.settler(stop.clone())?;
        let me = self.clone();
        let handler: crate::net::serve::Handler = Arc::new(move |link| me.session(link));
        Ok(std::thread::Builder::new()
            .name("peer-receive".into())
            .spawn(move || {
                let gate = crate::net::gate::Gate::new();
                crate::net::serve::accept_loop(&handler, &listener, &server_cfg, &stop, &gate)
            })?)
    }

    /// Wakes the settling thread (`settler`) if records were applied since it was last woken:
    /// once per batch, before the batch is acknowledged and the gate told (woken for each
    /// record, it woke about once per write: `docs/benchmarks.md`, "the second site's
    /// wake-ups"). The thread settles everything changed by then, asynchronously as before.
    fn settle_view(&self) {
        if self.unsettled.swap(false, Ordering::AcqRel) {
            let (due, cv) = &*self.settle;
            *lock(due) = true;
            cv.notify_one();
        }
    }

    /// Tells the kernel about the applied changes (`MountView::settle`) on its own thread: an
    /// invalidation of a file's pages waits for a FUSE write to that file in progress, and that
    /// write may be parked for the token that the change being applied comes before.
    fn settler(&self, stop: Arc<AtomicBool>) -> Result<()> {
        let (vol, settle) = (self.vol.clone(), self.settle.clone());
        std::thread::Builder::new()
            .name("peer-settle".into())
            .spawn(move || {
                let (due, cv) = &*settle;
                while !stop.load(Ordering::Acquire) {
                    let mut d = lock(due);
                    if !*d {
                        d = cv
                            .wait_timeout(d, Duration::from_millis(100))
                            .map(|r| r.0)
                            .unwrap_or_else(|e| e.into_inner().0);
                    }
                    let go = std::mem::take(&mut *d);
                    drop(d);
                    if go {
                        if let Some(v) = vol.view.get() {
                            v.settle();
                        }
                    }
                }
            })?;
        Ok(())
    }

    /// One authenticated connection from the peer. One stream at a time; the peer's new
    /// connection (same pinned key) displaces its stale session instead of being refused until
    /// this site noticed the silence: the old session's socket is shut down and its threads
    /// joined before the new one reads anything (`serve::slot`, the core's `slot` rule).
    fn session(&self, link: Duplex) -> Result<()> {
        let link = Arc::new(link);
        let claimed = match self.claim_peer_slot(&link) {
            Ok(c) => c,
            Err(refusal) => {
                let message = peer_refusal(&refusal);
                let _ = link.send(&Msg::Error {
                    code: error_code::BUSY,
                    message: message.clone(),
                });
                bail!("refused a connection from the peer: {message}");
            }
        };
        lock(&self.status).connected = true;
        let r = self.stream(&link);
        {
            let mut s = lock(&self.status);
            s.connected = false;
            if let (Err(e), false) = (&r, claimed.displaced()) {
                s.last_error = Some(format!("{e:#}"));
            }
        }
        if claimed.displaced() {
            // Its socket was shut down for the peer's new connection: that is why it ended.
            tracing::info!(
                "the peer's previous session ended: displaced by its new connection ({})",
                r.as_ref()
                    .err()
                    .map(|e| format!("{e:#}"))
                    .unwrap_or_else(|| "ended cleanly".into())
            );
            return Ok(());
        }
        drop(claimed);
        if let Err(e) = &r {
            if let Some(le) = e.downcast_ref::<LinkError>() {
                let _ = link.send(&le.to_msg());
            }
        }
        r.context("the peer's stream")
    }

    /// The peer stream's slot for this connection. The peer is its pinned key (the TLS
    /// handshake authenticated it); the volume its `Hello` names is checked after, in `copy`
    /// (a site has one peer volume), so the slot's volume is left blank: the same key displaces.
    fn claim_peer_slot(
        &self,
        link: &Arc<Duplex>,
    ) -> Result<crate::net::serve::slot::Claimed<'_>, crate::net::serve::slot::Refusal> {
        let who = crate::net::serve::slot::PrimaryId {
            key: link.peer(),
            volume: [0; 16],
        };
        let l = link.clone();
        self.slot.claim(
            who,
            Box::new(move || l.shutdown()),
            crate::net::serve::slot::DISPLACE_WITHIN,
        )
    }

    /// The peer's volume, once it connected (ever).
    pub fn peer_volume(&self) -> Option<mirrorfs_core::wire::VolumeId> {
        lock(&self.position).volume
    }

    /// The copy the session compares the peer's `hello` with (`core::pair::decide`): with
    /// history, the peer's volume, consistent, through the position applied here (or the copy
    /// under way); a new pair receives the peer's initial copy, starts from the peer's journal
    /// end, or is refused (both trees hold data).
    fn copy(&self, hello: &Msg) -> Result<MirrorCopy, LinkError> {
        let Msg::Hello {
            volume_id,
            history,
            name,
            next_seq,
            ..
        } = hello
        else {
            return Err(LinkError::new(
                error_code::BAD_FRAME,
                false,
                "the peer did not start with Hello",
            ));
        };
        self.check_token_ids(name)?;
        let pos = *lock(&self.position);
        if let Some(v) = pos.volume {
            if v != *volume_id {
                return Err(LinkError::new(
                    error_code::REFUSED,
                    false,
                    format!(
                        "this site pairs with volume {} and the connecting site is volume {}: a writable site has one peer (move {} away to pair anew)",
                        hex(&v),
                        hex(volume_id),
                        self.position_file.display()
                    ),
                ));
            }
        }
        let local = pair::Local {
            history: pos.volume.is_some(),
            copying: match self.copy_id.load(Ordering::Acquire) {
                0 => None,
                id => Some(id),
            },
            tree: crate::site::peer::own_tree(&self.vol, &self.backing, &self.hidden),
        };
        let (me, them) = match self.gate.as_ref().map(|g| g.ids()) {
            Some((me, peer)) => (format!("site {me}"), format!("site {peer}")),
            None => ("this site".to_string(), "the peer".to_string()),
        };
        let peers = History {
            volume_id: *volume_id,
            generations: history.clone(),
        };
        let copy = |state, history, at: u64, sync_id| MirrorCopy {
            state,
            history,
            durable: at,
            applied: at,
            sync_id,
            promoted: false,
            foreign: false,
            first_held: 0,
        };
        let note = TreeNote::from_hello_name(name);
        let decision = pair::decide(local, note, &me, &them);
        tracing::info!("the peer connects (it says {note:?}; this site: {local:?}): {decision:?}");
        Ok(match decision {
            PairStart::Resume => copy(MirrorState::Consistent, peers, pos.applied, 0),
            PairStart::GoOnCopying { sync_id } => {
                copy(MirrorState::Syncing, peers, pos.applied, sync_id)
            }
            PairStart::ReceiveCopy => copy(
                MirrorState::Empty,
                History {
                    volume_id: [0; 16],
                    generations: Vec::new(),
                },
                0,
                0,
            ),
            PairStart::FromPeerEnd => copy(
                MirrorState::Consistent,
                peers,
                next_seq.saturating_sub(1),
                0,
            ),
            PairStart::Refuse(m) => return Err(LinkError::new(error_code::REFUSED, false, m)),
        })
    }

    /// Both sites run with write tokens, or neither; with them, the peer's ids are ours
    /// swapped (two homes would each write the same file).
    fn check_token_ids(&self, name: &str) -> Result<(), LinkError> {
        let refuse = |m: String| Err(LinkError::new(error_code::REFUSED, false, m));
        match (
            self.gate.as_ref().map(|g| g.ids()),
            crate::site::tokens::hello_ids(name),
        ) {
            (None, None) => Ok(()),
            (Some((me, peer)), Some((their, their_peer))) if their == peer && their_peer == me => {
                // A quorum site that took the peer's silence for a split would write the
                // peer's tokens while a peer without the quorum writes them too.
                let ours = self.gate.as_ref().is_some_and(|g| g.is_quorum());
                match (ours, crate::site::tokens::hello_quorum(name)) {
                    (true, false) => refuse(
                        "this site runs --partition quorum and the peer does not: give both sites --partition quorum and the same --witness".into(),
                    ),
                    (false, true) => refuse(
                        "the peer runs --partition quorum and this site does not: give both sites --partition quorum and the same --witness".into(),
                    ),
                    _ => Ok(()),
                }
            }
            (Some((me, peer)), Some((their, their_peer))) => refuse(format!(
                "write-token ids do not match: this site is --write-tokens {me}:{peer}, the peer {their}:{their_peer}; the peer's must be {peer}:{me}"
            )),
            (Some(_), None) => refuse(
                "this site runs with --write-tokens and the peer without: give both sites --write-tokens".into(),
            ),
            (None, Some(_)) => refuse(
                "the peer runs with --write-tokens and this site without: give both sites --write-tokens".into(),
            ),
        }
    }

    fn stream(&self, link: &Duplex) -> Result<()> {
        // (The last session's acker wrote what it held; a new session resumes after the file.)
        *lock(&self.inert) = None;
        let mut dec = Decoder::new();
        let hello = recv_within(link, &mut dec, crate::net::conn::CONNECT_TIMEOUT)?;
        let copy = self.copy(&hello)?;
        let label = self.backing.display().to_string();
        let mut session =
            Session::new(copy, &self.hidden, &label, 0).with_on_diverged(OnDiverged::Refuse);
        let welcome = session.on_hello(&hello)?;
        if let Msg::Hello { name, compress, .. } = &hello {
            tracing::info!("peer {name} connected");
            link.set_compress(*compress);
        }
        link.send(&welcome)?;
        let start = recv_within(link, &mut dec, crate::net::conn::CONNECT_TIMEOUT)?;
        match session.on_start(&start)? {
            Begin::Resume { seq, history } => {
                let mut pos = lock(&self.position);
                if pos.volume.is_none() {
                    // A new pair: from the peer's first record, or (its tree empty, or a copy
                    // of ours) from its journal's end (`core::pair`).
                    pos.volume = Some(history.volume_id);
                    pos.applied = seq - 1;
                    self.store_position(&pos)?;
                    drop(pos);
                    self.started_at(seq - 1);
                }
                tracing::info!("the peer's stream resumes at its record {seq}");
            }
            Begin::InitialSync {
                seq,
                sync_id,
                history,
            } => self.begin_copy(seq, sync_id, history.volume_id)?,
            Begin::Resync { .. } => {
                return Err(LinkError::new(
                    error_code::REFUSED,
                    false,
                    "the peer's journal no longer holds the records this site lacks (it asked for a resync by block hashes, which a writable pair does not do): resynchronise this site from the peer as a mirror, then pair again",
                )
                .into())
            }
        }
        let session = Mutex::new(session);
        let done = AtomicBool::new(false);
        std::thread::scope(|s| -> Result<()> {
            let acker = s.spawn(|| {
                let r = self.send_acks(link, &session, &done);
                done.store(true, Ordering::Release);
                link.shutdown();
                r
            });
            let r = self.receive(link, &mut dec, &session, &done);
            // A batch that ended in an error before its commit.
            self.settle_view();
            done.store(true, Ordering::Release);
            self.vol.changed.notify_all();
            link.shutdown();
            let a = acker
                .join()
                .unwrap_or_else(|_| Err(anyhow!("the peer ack thread panicked")));
            r.and(a)
        })
    }

    /// The peer's stream starts after its record `at` (nothing before it is applied here).
    fn started_at(&self, at: u64) {
        self.applied.store(at, Ordering::Release);
        {
            let mut s = lock(&self.status);
            s.applied = at;
            s.paired = true;
        }
        if let Some(g) = &self.gate {
            g.peer_applied(at);
        }
    }

    /// The peer copies its tree here (`core::pair`), as copy `sync_id` from its record `seq`:
    /// changes through the mount are refused from now until its `SyncDone`. A new pair's tree
    /// must still be empty; a copy that starts again (the peer restarted and lost its running
    /// copy) first removes what the former one made (nothing else was made here since).
    fn begin_copy(
        &self,
        seq: u64,
        sync_id: u32,
        volume: mirrorfs_core::wire::VolumeId,
    ) -> Result<()> {
        let former = self.copy_id.load(Ordering::Acquire);
        self.vol.receiving_copy.store(true, Ordering::Release);
        if former == 0 && !tree_is_empty(&self.backing, &self.hidden).unwrap_or(false) {
            self.vol.receiving_copy.store(false, Ordering::Release);
            return Err(LinkError::new(
                error_code::REFUSED,
                true,
                "this site's tree is no longer empty (a change through the mount came first): it does not take the peer's copy",
            )
            .into());
        }
        self.copy_file
            .store(sync_id)
            .context("cannot write STATE/peer-copy")?;
        self.copy_id.store(sync_id, Ordering::Release);
        lock(&self.status).copy = Some(CopyStatus {
            from: peer_label(self.gate.as_deref()),
            sync_id,
            bytes: 0,
        });
        if former != 0 {
            tracing::warn!("the peer's initial copy starts again (copy {sync_id}; copy {former} was interrupted): removing what it made here first");
            self.empty_tree()?;
        }
        {
            let mut pos = lock(&self.position);
            pos.volume = Some(volume);
            pos.applied = seq - 1;
            self.store_position(&pos)?;
        }
        self.started_at(seq - 1);
        tracing::info!("receiving the peer's initial copy {sync_id} from its record {seq}");
        Ok(())
    }

    /// Removes everything in the tree but the state directory, through the volume (journaled
    /// and noted as the peer's: this site's own mirrors follow, nothing goes back).
    fn empty_tree(&self) -> Result<()> {
        fn walk(
            root: &Path,
            rel: &[u8],
            hidden: &[u8],
            out: &mut Vec<(Vec<u8>, bool)>,
        ) -> std::io::Result<()> {
            let dir = if rel.is_empty() {
                root.to_path_buf()
            } else {
                root.join(std::ffi::OsStr::from_bytes(rel))
            };
            for e in std::fs::read_dir(dir)? {
                let e = e?;
                let name = e.file_name();
                let name = name.as_bytes();
                if rel.is_empty() && name == hidden {
                    continue;
                }
                let mut p = rel.to_vec();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(name);
                let is_dir = e.file_type()?.is_dir();
                if is_dir {
                    walk(root, &p, hidden, out)?;
                }
                out.push((p, is_dir));
            }
            Ok(())
        }
        let mut entries = Vec::new();
        walk(&self.backing, b"", &self.hidden, &mut entries)
            .context("cannot list what the interrupted copy made")?;
        for (p, is_dir) in entries {
            let path = RelPath::new(p.clone()).map_err(|e| anyhow!("{e}"))?;
            let op = if is_dir {
                Op::Rmdir { path }
            } else {
                let nlink = nlink_beneath(&self.backing, &p);
                Op::Unlink { path, nlink }
            };
            self.apply_copied(&op, false)?;
        }
        // No batch's commit follows these: the flusher and the kernel are told here.
        self.vol.wake_flusher();
        self.settle_view();
        Ok(())
    }

    /// One change of the peer's initial copy (or of its removal), idempotently, through the
    /// volume; its local seq is noted as the peer's.
    fn apply_copied(&self, op: &Op, replay: bool) -> Result<()> {
        let mut tree = DirTree::open(&self.backing).context("cannot open the backing tree")?;
        let res = self.vol.mutate_from_peer(op, |_| {
            apply_op(&mut tree, op, replay)
                .map_err(|e| std::io::Error::from_raw_os_error(tree_errno(&e)))
        });
        self.unsettled.store(true, Ordering::Release);
        match res {
            Ok(_) => Ok(()),
            Err(e @ (libc::EROFS | libc::ENOSPC | libc::EIO | libc::ESHUTDOWN)) => bail!(
                "cannot apply the peer's copy ({}): {}",
                op.name(),
                std::io::Error::from_raw_os_error(e)
            ),
            Err(e) => {
                lock(&self.status).failed += 1;
                tracing::warn!(
                    "the peer's copy ({}) failed here: {}",
                    op.name(),
                    std::io::Error::from_raw_os_error(e)
                );
                Ok(())
            }
        }
    }

    /// The peer's messages until the connection ends or this site stops.
    fn receive(
        &self,
        link: &Duplex,
        dec: &mut Decoder,
        session: &Mutex<Session>,
        done: &AtomicBool,
    ) -> Result<()> {
        let dead = crate::net::remote::DEAD_AFTER;
        let mut heard = Instant::now();
        let mut pending = VecDeque::new();
        loop {
            if lock(&self.vol.progress).stopping {
                return Ok(());
            }
            let silent = || anyhow!("the peer sent nothing for {dead:?}; closing");
            let Some(msg) = link.next_or_dead(dec, done, &mut heard, dead, silent)? else {
                return Ok(());
            };
            if let Msg::Token(t) = msg {
                match &self.gate {
                    Some(g) => g.received(t),
                    None => {
                        return Err(LinkError::new(
                            error_code::BAD_FRAME,
                            false,
                            "the peer sends write-token messages, but this site runs without --write-tokens: give both sites --write-tokens",
                        )
                        .into())
                    }
                }
                continue;
            }
            if let Msg::PeerSeen { from, through } = msg {
                // A site without `--partition reconcile` has nothing to compare them with.
                if let Some(rc) = &self.reconcile {
                    rc.peer_seen(from, through);
                }
                continue;
            }
            let incoming = lock(session).on_message(&msg)?;
            match incoming {
                Incoming::Append { records, settled } => {
                    // The message's records, checked by the session: moved out of it, not
                    // copied (a 4 KiB write each, `docs/benchmarks.md`, "the second site's
                    // CPU per record").
                    let count = records.len();
                    match msg {
                        Msg::Records { records, .. } if records.len() == count => {
                            pending.extend(records)
                        }
                        _ => bail!("internal: records appended from another message"),
                    }
                    self.apply_ready(&mut pending, settled)?;
                }
                // Records come on the TLS connection only.
                Incoming::UdpOffer { .. } => {
                    link.send(&Msg::UdpAccept { port: 0 })?;
                }
                Incoming::Reply(reply) => {
                    link.send(&reply)?;
                }
                Incoming::PeerError { code, message } => {
                    bail!("the peer reported an error (code {code}): {message}")
                }
                Incoming::UdpSent { .. } | Incoming::Nothing => {}
                Incoming::SendTail { .. }
                | Incoming::Fetch { .. }
                | Incoming::Reintegrated { .. } => {
                    bail!("internal: a reintegration message on the peer's stream")
                }
            }
        }
    }

    /// Applies the held records whose fate is known (≤ `settled`, and either the watermark
    /// itself or followed by the next record, which would be its `Abort`), then makes the
    /// batch durable here and publishes the position for the ack.
    fn apply_ready(&self, pending: &mut VecDeque<Record>, settled: u64) -> Result<()> {
        let ready = take_ready(pending, settled);
        let Some(last) = ready.last().map(|(r, _)| r.seq) else {
            return Ok(());
        };
        if self.reconcile.is_none()
            && self.copy_id.load(Ordering::Acquire) == 0
            && ready
                .iter()
                .all(|(r, aborted)| *aborted || changes_nothing(&r.op))
        {
            // Nothing to apply, journal or make durable here: the file and the ack wait
            // (`INERT_DEFER`). The gate may count them applied now: after a crash they come
            // again and change nothing again, so a write that waited for them found the tree
            // it would have found.
            {
                let mut d = lock(&self.inert);
                let since = d.map_or_else(Instant::now, |(_, t)| t);
                *d = Some((last, since));
            }
            if let Some(g) = &self.gate {
                g.peer_applied(last);
            }
            return Ok(());
        }
        // The last record made durable and acknowledged by this batch so far.
        let mut committed = None;
        // The names the batch's records touched since its last durability point: each batch
        // ends with one (below), so the window is never longer than a batch.
        let mut window = ReuseWindow::default();
        for (r, aborted) in ready {
            if !aborted
                && !is_exchange(&r.op)
                && window.admit_as(&r.op, self.applied_as(&r).as_ref()) == Admit::DurableFirst
            {
                // It reuses a name an earlier record of the window touched (`core::reuse`):
                // those are made durable and acknowledged first, so that after a crash they
                // do not come again with it, to be applied again to its entry.
                if committed != Some(r.seq - 1) && self.applied_here() < r.seq - 1 {
                    self.commit(r.seq - 1)?;
                }
            }
            if !aborted && is_exchange(&r.op) {
                // A barrier, as for a mirror (`core::applier`): what came before it is
                // durable and acknowledged first, so that after a crash the record comes
                // again first, alone, and its intent (noted in `apply`) decides; and it is
                // made durable before the next record is applied.
                if committed != Some(r.seq - 1) && self.applied_here() < r.seq - 1 {
                    self.commit(r.seq - 1)?;
                }
                self.apply(&r)?;
                self.commit(r.seq)?;
                committed = Some(r.seq);
                window.durable();
                continue;
            }
            committed = None;
            if !aborted {
                self.apply(&r)?;
            } else if let Some(rc) = &self.reconcile {
                // Not applied, but it moves the watermark.
                let seen = rc.seen_of(r.seq);
                rc.decide(None, seen);
            }
        }
        if committed == Some(last) {
            return Ok(());
        }
        self.commit(last)
    }

    /// The peer's record `r` with its names as it will be applied here: translated through
    /// our renames the peer had not seen and to the holding name of a held directory
    /// (`SiteReconcile::translate`, as `apply` does next; `None`: as sent). For the reuse
    /// window (`core::reuse::ReuseWindow::admit_as`): a record received again after a crash
    /// is translated again as it was and applied to these names, so a later record's new
    /// entry must be checked against them, not only against the peer's. Asked before `apply`,
    /// not under the order lock: a rename of ours in between changes the names `apply` uses
    /// (it translates again under the lock), a gap as narrow as that instant. Translating
    /// again is as `apply`'s own retries do (`apply_one` translates once more).
    fn applied_as(&self, r: &Record) -> Option<Op> {
        let rc = self.reconcile.as_ref()?;
        rc.translate(&r.op, rc.seen_of(r.seq))
    }

    /// The peer's records through `last` are applied here: makes them durable (the local
    /// journal, with their origins, the reconciliation's notes, then `STATE/peer-applied`) and publishes
    /// the position for the ack.
    fn commit(&self, last: u64) -> Result<()> {
        if let Some(rc) = &self.reconcile {
            // Our records from here on were journaled having considered the peer's through
            // `last` (noted under the order lock: nothing journaled after it is sent first).
            {
                let o = lock(&self.vol.order);
                rc.note_point(o.journal.next_seq(), last);
            }
            // The winner's rewrites, after the records they answer were considered.
            let paths = std::mem::take(&mut *lock(&self.rewrites));
            for (k, (p, create)) in paths.iter().enumerate() {
                if let Err(e) = rc.rewrite(&self.vol, &self.backing, p, *create) {
                    // Not acknowledged: the peer's records come again, and ask again.
                    for (q, _) in &paths[k..] {
                        rc.retry(q.as_bytes());
                    }
                    return Err(e.context("the rewrite of a file in conflict"));
                }
            }
            if !paths.is_empty() {
                self.unsettled.store(true, Ordering::Release);
            }
        }
        self.settle_view();
        self.vol.wait_journal_durable();
        if self.vol.poisoned.load(Ordering::Acquire) {
            bail!("the journal failed: the peer's records are not acknowledged");
        }
        if let Some(rc) = &self.reconcile {
            // What the batch's decisions noted, before the records are acknowledged.
            rc.save_notes()?;
        }
        let mut pos = lock(&self.position);
        pos.applied = last;
        if let Some(rc) = &self.reconcile {
            pos.seen = rc.seen_by_peer();
            pos.point = rc.last_point();
        }
        forget_passed_intent(&mut pos);
        self.store_position(&pos)?;
        if let Some(rc) = &self.reconcile {
            // An exchange's progress is no longer needed: its record does not come again.
            rc.peer_acknowledged(last);
        }
        // It covers the batches before it that changed nothing.
        *lock(&self.inert) = None;
        let seen = pos.seen;
        drop(pos);
        if let Some(rc) = &self.reconcile {
            rc.persisted(seen);
        }
        if self.copy_done.swap(false, Ordering::AcqRel) {
            // The copy is durable here through its `SyncDone`.
            self.copy_file
                .remove()
                .context("cannot remove STATE/peer-copy")?;
            self.copy_id.store(0, Ordering::Release);
            lock(&self.status).copy = None;
            self.vol.receiving_copy.store(false, Ordering::Release);
            tracing::info!("the peer's initial copy is complete");
        }
        self.applied.store(last, Ordering::Release);
        lock(&self.status).applied = last;
        if let Some(g) = &self.gate {
            g.peer_applied(last);
        }
        self.vol.changed.notify_all();
        Ok(())
    }

    /// One peer record, through the volume; its local seq is noted as the peer's. The tree is
    /// kept between records, its descriptors below the root not ([`PeerReceiver::tree`]): one
    /// it kept could name a file a local rename moved.
    fn apply(&self, r: &Record) -> Result<()> {
        let seen = self.reconcile.as_ref().map(|rc| rc.seen_of(r.seq));
        let copy_id = self.copy_id.load(Ordering::Acquire);
        match &r.op {
            Op::Sync { mirror, op } if copy_id != 0 && *mirror == copy_id => {
                if let (Some(rc), Some(seen)) = (&self.reconcile, seen) {
                    rc.decide(None, seen);
                }
                self.apply_copied(op, true)?;
                if let Some(c) = lock(&self.status).copy.as_mut() {
                    c.bytes += op.data_len() as u64;
                }
                return Ok(());
            }
            Op::SyncDone { mirror } if copy_id != 0 && *mirror == copy_id => {
                self.copy_done.store(true, Ordering::Release);
            }
            _ => {}
        }
        let op = match &r.op {
            // Nothing to change here: aborts (and the peer's placeholders for our own
            // records), another mirror's copy, group marks.
            Op::Abort { .. }
            | Op::Sync { .. }
            | Op::SyncDone { .. }
            | Op::GroupBegin
            | Op::GroupEnd => {
                if let (Some(rc), Some(seen)) = (&self.reconcile, seen) {
                    rc.decide(None, seen);
                }
                return Ok(());
            }
            op => op,
        };
        // With reconciliation, the peer's names are translated through our renames it had not
        // seen (taken again under the order lock in `apply_one`: a local rename in between
        // makes it try again).
        let translated = |op: &Op| match (&self.reconcile, seen) {
            (Some(rc), Some(seen)) => rc.translate(op, seen),
            _ => None,
        };
        if is_exchange(op)
            && self.exchange_done_before(r.seq, &translated(op).unwrap_or_else(|| op.clone()))?
        {
            // Applied here before a crash that came before its acknowledgement (the intent
            // noted before it says so): applied again it would swap the entries back.
            tracing::info!(
                "the peer's exchange {} was applied here before a restart: not applied again",
                r.seq
            );
            if let (Some(rc), Some(seen)) = (&self.reconcile, seen) {
                rc.decide(None, seen);
            }
            return Ok(());
        }
        if let (Some(rc), Some(seen), true) = (&self.reconcile, seen, is_exchange(op)) {
            if rc.exchange_done(r.seq) == 3 {
                // Done here before a crash that came before its acknowledgement: an exchange
                // done again would swap the entries back.
                rc.decide(None, seen);
                return Ok(());
            }
        }
        let mut res = Err(Held::Retry);
        // As sent, unless translated or a rename (`used_as`): most records are applied and
        // journaled without a copy.
        let mut used = Cow::Borrowed(op);
        for _ in 0..8 {
            if let Some((steps, done)) = self.exchange_as_renames(op, r.seq, seen) {
                for (k, op) in steps.into_iter().enumerate().skip(done) {
                    self.apply(&Record { seq: r.seq, op })?;
                    self.exchange_step_done(r.seq, k + 1)?;
                }
                return Ok(());
            }
            used = self.used_as(op, translated(op));
            if is_exchange(&used) {
                self.note_intent(r.seq, &used)?;
            }
            res = self.apply_one(op, &used, seen);
            if res != Err(Held::Retry) {
                break;
            }
        }
        if res == Err(Held::Retry) {
            res = Err(Held::Errno(libc::EAGAIN));
        }
        if let Err(Held::Copy) = res {
            // The loser: its own version goes aside first, then the winner's record applies
            // (a rename: its file at the name the winner's takes).
            // A hard link: ours went aside under the name we changed the file through.
            let linked = self.reconcile.as_ref().and_then(|rc| rc.take_linked_copy());
            let at = match &*used {
                Op::Rename { to, .. } => Some(to),
                op => data_rel(op),
            };
            let at = linked.as_ref().or(at);
            if let (Some(rc), Some(path)) = (&self.reconcile, at) {
                if let Err(e) = rc.copy_aside(&self.vol, &self.backing, path) {
                    // Not acknowledged: the record comes again and asks for the copy again.
                    rc.retry(path.as_bytes());
                    return Err(e.context("the conflict copy"));
                }
            }
            res = self.apply_one(op, &used, seen);
        }
        if let (Err(Held::Aside), Some(rc), Op::Rename { to, .. }) = (res, &self.reconcile, &*used)
        {
            // Ours at the name is a symlink or special file (or the peer's is), and the peer's
            // stays: ours goes aside first, then the rename applies.
            res = if self.entry_aside(rc, to)? {
                self.apply_one(op, &used, seen)
            } else {
                Err(Held::Errno(libc::EEXIST))
            };
        }
        if let (Err(Held::Displaced), Op::Rename { from, .. }) = (res, &*used) {
            // The winner keeps its file at the name: the peer's source goes here too (its
            // content comes back as the peer's conflict copy), as the peer's record. Our
            // records from here on consider this one.
            if let Some(rc) = &self.reconcile {
                let o = lock(&self.vol.order);
                rc.note_point(o.journal.next_seq(), r.seq);
            }
            self.remove_source(from)?;
        }
        if let (Err(Held::Errno(libc::EEXIST)), Some(rc), Some(s)) = (res, &self.reconcile, seen) {
            if let Some(c) = self.made_dir_clash(rc, op, &used, s) {
                res = Err(Held::Clash(c));
            }
        }
        if let (Err(Held::Clash(c)), Some(rc), Some(s)) = (res, &self.reconcile, seen) {
            res = self.dir_clash(rc, (op, &used), c, s, r.seq)?;
        }
        if let (Err(Held::Errno(e)), Some(rc), Some(s)) = (res, &self.reconcile, seen) {
            if self.namespace_fix(rc, (op, &used), e, s, r.seq)? {
                res = self.apply_one(op, &used, seen);
            }
        }
        if let (
            Ok(()),
            Some(rc),
            Op::Rename {
                from, to, flags, ..
            },
        ) = (res, &self.reconcile, &*used)
        {
            let exchange = flags & RENAME_EXCHANGE != 0;
            if exchange {
                self.exchange_step_done(r.seq, 3)?;
            }
            match op {
                Op::Rename {
                    from: f0, to: t0, ..
                } => rc.peer_renamed(
                    (f0.as_bytes(), t0.as_bytes()),
                    from.as_bytes(),
                    to.as_bytes(),
                    exchange,
                ),
                _ => rc.moved(from.as_bytes(), to.as_bytes(), exchange),
            }
            // A rewrite this batch asked for follows the file (or its directory) too.
            for (p, _) in lock(&self.rewrites).iter_mut() {
                let q = renamed_path(p.as_bytes(), from.as_bytes(), to.as_bytes(), exchange);
                if let Some(q) = q.and_then(|q| RelPath::new(q).ok()) {
                    *p = q;
                }
            }
        }
        let op = used;
        let res = match res {
            Ok(()) => {
                if let Some(rc) = &self.reconcile {
                    match &*op {
                        // A conflict copy: of a file, or of a symlink or special file set
                        // aside for our directory of its name.
                        Op::Create { path, .. }
                        | Op::Symlink { path, .. }
                        | Op::Mknod { path, .. } => rc.peer_created(path.as_bytes()),
                        Op::Rename { from, .. } => rc.peer_settled(from.as_bytes()),
                        Op::Unlink { path, .. } => rc.peer_settled(path.as_bytes()),
                        _ => {}
                    }
                }
                Ok(())
            }
            Err(Held::Skip) | Err(Held::Copy) | Err(Held::Displaced) | Err(Held::Aside) => Ok(()),
            // Not carried out (`dir_clash` answers every clash): as existing.
            Err(Held::Clash(_)) => Err(libc::EEXIST),
            Err(Held::Errno(e)) => Err(e),
            Err(Held::Retry) => Err(libc::EAGAIN),
        };
        self.unsettled.store(true, Ordering::Release);
        if res.is_ok() {
            self.failpoint_after(r.seq, &op);
        }
        if let (Some(rc), Some(seen), Op::Rmdir { path }) = (&self.reconcile, seen, &r.op) {
            if !matches!(
                res,
                Err(libc::EROFS | libc::ENOSPC | libc::EIO | libc::ESHUTDOWN)
            ) {
                // Done here (applied, or journaled with its abort; not a refusal, after which
                // it comes again): a hold of its name ends only now, so that each translation
                // of it (`applied_as`, the retries, `apply_one`) named the holding name.
                rc.peer_rmdir_done(path.as_bytes(), seen);
            }
        }
        match res {
            Ok(_) => Ok(()),
            // The volume refused the change (read-only fence, full journal, failed journal):
            // not acknowledged, the peer sends it again on the next connection.
            Err(e @ (libc::EROFS | libc::ENOSPC | libc::EIO | libc::ESHUTDOWN)) => bail!(
                "cannot apply the peer's record {} ({}): {}",
                r.seq,
                r.op.name(),
                std::io::Error::from_raw_os_error(e)
            ),
            Err(e) => {
                lock(&self.status).failed += 1;
                tracing::warn!(
                    "the peer's record {} ({}) failed here: {}; journaled with its abort",
                    r.seq,
                    r.op.name(),
                    std::io::Error::from_raw_os_error(e)
                );
                Ok(())
            }
        }
    }

    /// The test hook (`PeerReceiver::failpoint`): after the peer's record `seq` (`op`) was
    /// applied here, stops this receiver for good if the hook names it.
    fn failpoint_after(&self, seq: u64, op: &Op) {
        let Some(fp) = self.failpoint.as_deref() else {
            return;
        };
        let hit = (fp == "peer-exchange-applied" && is_exchange(op))
            || fp.strip_prefix("peer-record-applied:") == Some(op.name());
        if !hit {
            return;
        }
        self.settle_view();
        tracing::warn!(
            "{FAILPOINT_ENV}={fp}: the peer's {} {seq} is applied here and not acknowledged; waiting to be killed",
            if is_exchange(op) { "exchange" } else { op.name() }
        );
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// The last peer record durable and acknowledged here (`STATE/peer-applied`).
    fn applied_here(&self) -> u64 {
        lock(&self.position).applied
    }

    /// Before the peer's exchange `seq` (`op`, our names) is applied as sent: what tells after
    /// a crash whether it was (`core::applier::Intent`: its source's inode, which its target
    /// holds once it is done), in `STATE/peer-applied` with the position before it. Durable
    /// once `replace_durable` returned (the file's fsync, then its directory's): only then is
    /// the exchange applied, so a crash after it always finds the intent.
    fn note_intent(&self, seq: u64, op: &Op) -> Result<()> {
        let mut tree = DirTree::open(&self.backing).context("cannot open the backing tree")?;
        let intent = Intent::before(&mut tree, seq, op)
            .map_err(|e| anyhow!("cannot read the exchange's entries: {e}"))?;
        let mut pos = lock(&self.position);
        if pos.intent == Some(intent) {
            return Ok(());
        }
        // The barrier made everything before it durable and acknowledged (`apply_ready`).
        if pos.applied + 1 != seq {
            bail!(
                "internal: the peer's exchange {seq} is applied after its record {} here",
                pos.applied
            );
        }
        pos.intent = Some(intent);
        self.store_position(&pos)
    }

    /// Whether the peer's exchange `seq` (`op`, our names) was applied here before a crash
    /// that came before its acknowledgement, as the intent noted before it says.
    fn exchange_done_before(&self, seq: u64, op: &Op) -> Result<bool> {
        let Some(intent) = lock(&self.position).intent.filter(|i| i.seq == seq) else {
            return Ok(false);
        };
        let mut tree = DirTree::open(&self.backing).context("cannot open the backing tree")?;
        intent
            .done(&mut tree, op)
            .map_err(|e| anyhow!("cannot read the exchange's entries: {e}"))
    }

    /// The inode number names the peer's file; ours is what a crash here resolves.
    /// What `apply` applies for the peer's `op`: `translated` (our names for its), or `op` as
    /// sent; a rename with its source's inode here ([`PeerReceiver::with_local_ino`]). Any other
    /// record as sent is borrowed, not copied.
    fn used_as<'a>(&self, op: &'a Op, translated: Option<Op>) -> Cow<'a, Op> {
        match translated {
            Some(t) => Cow::Owned(self.with_local_ino(t)),
            None if matches!(op, Op::Rename { .. }) => Cow::Owned(self.with_local_ino(op.clone())),
            None => Cow::Borrowed(op),
        }
    }

    fn with_local_ino(&self, mut op: Op) -> Op {
        if let Some((from, ino)) = op.rename_from_ino_mut() {
            *ino = local_ino(&self.backing, from.as_bytes());
        }
        op
    }

    /// A peer record (`op`, our names) failed here with `errno`: what a namespace change
    /// during the split explains is set right first (`true`: apply it again).
    /// - a directory on its way that we removed concurrently is made again (the change wins),
    ///   journaled having considered this record (`seq`): at the peer, which may have renamed
    ///   the directory since that change, the `Mkdir` names the renamed one
    ///   (`Reconciler::translate_new`); a file of ours made under its name after our removal
    ///   (`ENOTDIR`) goes aside first ([`PeerReceiver::refill`]);
    /// - a directory it removes holds what we made in it: we journal its mode and owner (the
    ///   peer makes it again for our changes and ends with the same);
    /// - a directory it makes is a file here (both made the name): ours goes aside.
    fn namespace_fix(
        &self,
        rc: &SiteReconcile,
        (orig, op): (&Op, &Op),
        errno: i32,
        seen: u64,
        seq: u64,
    ) -> Result<bool> {
        if let (
            Op::Create { path, .. }
            | Op::Mknod { path, .. }
            | Op::Symlink { path, .. }
            | Op::Link { to: path, .. },
            libc::EEXIST,
        ) = (op, errno)
        {
            if self.reuse_aside(rc, path, seen)? {
                return Ok(true);
            }
            if self.entry_clash(rc, op, path, seen)? {
                return Ok(true);
            }
        }
        match (op, errno) {
            (_, libc::ENOENT) => self.refill(rc, op, seen, seq),
            // A directory on the way that we removed is a file (or symlink, or special file)
            // of ours now, made under its name after the removal: ours goes aside, then the
            // directory is made again (the model's `Site::remake`).
            (_, libc::ENOTDIR) if self.beneath_other(op) => self.refill(rc, op, seen, seq),
            (Op::Rename { from, to, .. }, libc::EISDIR | libc::EEXIST | libc::ENOTEMPTY) => {
                // Both made `to` during the split, a directory here: it stays, and the peer
                // moves its file aside when our directory reaches it (or renames it away
                // before); the source is held here under a holding name till then, unless we
                // changed it (then it is given back).
                let onto_dir = is_beneath(&self.backing, to.as_bytes(), libc::S_IFDIR);
                let from_file = is_beneath(&self.backing, from.as_bytes(), libc::S_IFREG);
                if !(onto_dir && from_file) {
                    return Ok(false);
                }
                let decision = {
                    let _order = lock(&self.vol.order);
                    rc.decide_onto_dir(from.as_bytes(), seen)
                };
                match decision {
                    Decision::Restore { first } => {
                        if first {
                            rc.list_removed(from.as_bytes());
                        }
                        lock(&self.rewrites).push((from.clone(), true));
                    }
                    _ => {
                        // Our records from here on consider this one (as for `Displaced`);
                        // the move to the holding name is the peer's record, not streamed.
                        {
                            let o = lock(&self.vol.order);
                            rc.note_point(o.journal.next_seq(), seq);
                        }
                        self.hold_source(rc, (orig, from, to), seen)?
                    }
                }
                Ok(false)
            }
            (
                Op::Rename {
                    from, to, flags, ..
                },
                libc::ENOTDIR,
            ) if flags & RENAME_EXCHANGE == 0 => {
                // The peer renamed a directory onto a name we gave a file (or symlink, or
                // special file) during the split: the directory stays; ours goes aside (a
                // conflict copy, listed), then the rename applies again.
                let from_dir = is_beneath(&self.backing, from.as_bytes(), libc::S_IFDIR);
                let onto_other = stat_beneath(&self.backing, to.as_bytes())
                    .is_some_and(|st| st.st_mode & libc::S_IFMT != libc::S_IFDIR);
                if !(from_dir && clash_moves_ours_aside(!onto_other, true)) {
                    return Ok(false);
                }
                rc.move_aside(&self.vol, &self.backing, to)
                    .context("moving a file aside for the peer's directory renamed to its name")
            }
            (Op::Rmdir { path }, libc::ENOTEMPTY | libc::EEXIST) => {
                rc.give_back_dir(&self.vol, &self.backing, path)?;
                Ok(false)
            }
            (Op::Mkdir { path, .. }, libc::EEXIST) => {
                let ours_is_dir = stat_beneath(&self.backing, path.as_bytes())
                    .is_none_or(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR);
                if !clash_moves_ours_aside(ours_is_dir, true) {
                    return Ok(false);
                }
                rc.move_aside(&self.vol, &self.backing, path)
                    .context("moving a file aside for the peer's directory of the same name")
            }
            (
                Op::Create { path, .. } | Op::Mknod { path, .. } | Op::Symlink { path, .. },
                libc::EEXIST,
            ) => {
                // A directory here: the peer moves its entry aside when our directory arrives;
                // the conflict is listed once its copy does.
                if is_beneath(&self.backing, path.as_bytes(), libc::S_IFDIR) {
                    rc.skipped(path.as_bytes(), true);
                }
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    /// The directories on the way to the names of the peer's record `op` (our names) that we
    /// removed concurrently are made again (`Reconciler::refill`; `true`: some were), journaled
    /// having considered the peer's record `seq`: at the peer, which may have renamed the
    /// directory since that change, the `Mkdir` names the renamed one
    /// (`Reconciler::translate_new`). An entry of ours under such a directory's name that is not
    /// a directory (made there after our removal) goes to a conflict copy first, as for the
    /// peer's `mkdir` of its name (`clash_moves_ours_aside`).
    fn refill(&self, rc: &SiteReconcile, op: &Op, seen: u64, seq: u64) -> Result<bool> {
        let mut made = false;
        for (n, _) in op.names() {
            for d in rc.refill(n.as_bytes(), seen) {
                let Ok(d) = RelPath::new(d) else { continue };
                if !made {
                    let o = lock(&self.vol.order);
                    rc.note_point(o.journal.next_seq(), seq);
                }
                made = true;
                let ours_is_dir = stat_beneath(&self.backing, d.as_bytes())
                    .is_none_or(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR);
                if clash_moves_ours_aside(ours_is_dir, true) {
                    rc.move_aside(&self.vol, &self.backing, &d).context(
                        "moving a file aside for a directory made again for the peer's change",
                    )?;
                }
                rc.remake_dir(&self.vol, &self.backing, &d)
                    .context("making a directory again for the peer's change in it")?;
            }
        }
        Ok(made)
    }

    /// Whether a directory on the way to a name of `op` (our names) is an entry of another type
    /// here (its `ENOTDIR` is then not of a rename of a directory onto a file).
    fn beneath_other(&self, op: &Op) -> bool {
        op.names().any(|(n, _)| {
            let n = n.as_bytes();
            n.iter().enumerate().any(|(i, b)| {
                *b == b'/'
                    && stat_beneath(&self.backing, &n[..i])
                        .is_some_and(|st| st.st_mode & libc::S_IFMT != libc::S_IFDIR)
            })
        })
    }

    /// The peer made `path` again after removing it during the split, while we kept our
    /// changed file there against that removal (`Reconciler::peer_reused`): the new entry takes
    /// the name. Ours goes to a conflict copy (journaled, streamed, listed), the rewrite this
    /// batch queued for it is dropped (the copy brings its content), and it is removed as the
    /// peer's record (not streamed back: the peer has no such file) so that the peer's making
    /// applies again (`true`).
    fn reuse_aside(&self, rc: &SiteReconcile, path: &RelPath, seen: u64) -> Result<bool> {
        let file = is_beneath(&self.backing, path.as_bytes(), libc::S_IFREG);
        if !file {
            return Ok(false);
        }
        let reused = {
            let _order = lock(&self.vol.order);
            rc.decide_reused(path.as_bytes(), seen)
        };
        if !reused {
            return Ok(false);
        }
        if rc
            .copy_aside(&self.vol, &self.backing, path)
            .context("the conflict copy of a name the peer made again")?
            .is_none()
        {
            return Ok(false);
        }
        rc.reused_aside(path.as_bytes());
        lock(&self.rewrites).retain(|(p, _)| p != path);
        self.remove(path, true, "our file for the name the peer made again")?;
        Ok(true)
    }

    /// The peer's rename `orig` (its names; `op`: ours) of a directory onto a name that is a
    /// directory here: [`DirClash::Ours`] or [`DirClash::Theirs`] when we gave that name a
    /// directory of ours during the split, concurrently (`Reconciler::peer_dir_clash`; under
    /// the order lock). `None`: no clash, applied as sent (onto an empty directory it replaces
    /// it, onto a full one it fails).
    fn renamed_dir_clash(
        &self,
        rc: &SiteReconcile,
        orig: &Op,
        op: &Op,
        seen: u64,
    ) -> Option<DirClash> {
        let (
            Op::Rename { to: theirs, .. },
            Op::Rename {
                from, to, flags, ..
            },
        ) = (orig, op)
        else {
            return None;
        };
        let is_dir = |p: &RelPath| is_beneath(&self.backing, p.as_bytes(), libc::S_IFDIR);
        if flags & RENAME_EXCHANGE != 0 || from == to || !is_dir(from) || !is_dir(to) {
            return None;
        }
        match rc.decide_dir_clash(theirs.as_bytes(), to.as_bytes(), seen) {
            DirClash::Apart => None,
            c => Some(c),
        }
    }

    /// The peer's mkdir `orig` (its name; `op`: ours) failed as existing: a directory of ours
    /// given that name during the split, concurrently, is a clash (`None`: not one; a file of
    /// ours there is `namespace_fix`'s).
    fn made_dir_clash(
        &self,
        rc: &SiteReconcile,
        orig: &Op,
        op: &Op,
        seen: u64,
    ) -> Option<DirClash> {
        let (Op::Mkdir { path: theirs, .. }, Op::Mkdir { path, .. }) = (orig, op) else {
            return None;
        };
        let _order = lock(&self.vol.order);
        let is_dir = is_beneath(&self.backing, path.as_bytes(), libc::S_IFDIR);
        if !is_dir {
            return None;
        }
        match rc.decide_dir_clash(theirs.as_bytes(), path.as_bytes(), seen) {
            DirClash::Apart => None,
            c => Some(c),
        }
    }

    /// Both sites gave the name `n` a directory during the split (the peer's mkdir or rename of
    /// a directory, `orig` with its names and `used` with ours, against ours at `n`; its record
    /// `seq`), and `clash` says whose stays (docs/protocol.md, "a directory given one new name
    /// `n` at both sites"):
    /// - [`DirClash::Ours`] (we are the lower id): the peer's making is applied under a free
    ///   holding name `H` instead (its directory and what it puts in it land there), as the
    ///   peer's record (not streamed back: the peer has its directory at `n`), and held
    ///   (`Reconciler::hold`, written with the notes): its later records for `n` and beneath
    ///   are translated to `H` until its rename aside (or rmdir) of `n` ends the hold;
    /// - [`DirClash::Theirs`] (the higher id): our directory goes aside with its contents (a
    ///   local rename to `n.conflict-site<ME>-…`, journaled and streamed, listed:
    ///   `SiteReconcile::dir_aside`), `n` is the peer's from now on (`Reconciler::yielded`),
    ///   and the peer's making applies.
    ///
    /// The result is the record's (`Held::Skip`: carried out another way).
    fn dir_clash(
        &self,
        rc: &SiteReconcile,
        (orig, used): (&Op, &Op),
        clash: DirClash,
        seen: u64,
        seq: u64,
    ) -> Result<Result<(), Held>> {
        let (theirs, n) = match (orig, used) {
            (Op::Mkdir { path: t, .. }, Op::Mkdir { path: n, .. })
            | (Op::Rename { to: t, .. }, Op::Rename { to: n, .. }) => (t, n),
            _ => return Ok(Err(Held::Errno(libc::EEXIST))),
        };
        match clash {
            DirClash::Apart => Ok(Err(Held::Errno(libc::EEXIST))),
            DirClash::Ours { made } => {
                let hold = rc
                    .holding_name(&self.backing, n)
                    .context("a holding name for the peer's directory")?;
                let op = match used {
                    Op::Mkdir { mode, uid, gid, .. } => Op::Mkdir {
                        path: hold.clone(),
                        mode: *mode,
                        uid: *uid,
                        gid: *gid,
                    },
                    Op::Rename {
                        from,
                        flags,
                        from_ino,
                        ..
                    } => Op::Rename {
                        from: from.clone(),
                        to: hold.clone(),
                        flags: *flags,
                        from_ino: *from_ino,
                    },
                    _ => return Ok(Err(Held::Errno(libc::EEXIST))),
                };
                let mut tree =
                    DirTree::open(&self.backing).context("cannot open the backing tree")?;
                let res = self.vol.mutate_from_peer(&op, |_| {
                    apply_op(&mut tree, &op, false)
                        .map_err(|e| std::io::Error::from_raw_os_error(tree_errno(&e)))
                });
                if let Err(e) = res {
                    return Ok(Err(Held::Errno(e)));
                }
                if let (Op::Rename { from: f0, .. }, Op::Rename { from, .. }) = (orig, &op) {
                    rc.peer_renamed(
                        (f0.as_bytes(), theirs.as_bytes()),
                        from.as_bytes(),
                        hold.as_bytes(),
                        false,
                    );
                    for (p, _) in lock(&self.rewrites).iter_mut() {
                        let q = renamed_path(p.as_bytes(), from.as_bytes(), hold.as_bytes(), false);
                        if let Some(q) = q.and_then(|q| RelPath::new(q).ok()) {
                            *p = q;
                        }
                    }
                }
                rc.hold(theirs.as_bytes(), hold.as_bytes(), made);
                tracing::warn!(
                    "conflict: both sites gave {} a directory during the split; this site's stays, {}'s is held at {} until it moves it aside",
                    String::from_utf8_lossy(n.as_bytes()),
                    peer_label(self.gate.as_deref()),
                    String::from_utf8_lossy(hold.as_bytes())
                );
                Ok(Err(Held::Skip))
            }
            DirClash::Theirs => {
                // Journaled having considered the peer's making (as for `Displaced`).
                {
                    let o = lock(&self.vol.order);
                    rc.note_point(o.journal.next_seq(), seq);
                }
                rc.dir_aside(&self.vol, &self.backing, n)
                    .context("moving our directory aside for the peer's of the same name")?;
                rc.yielded(n.as_bytes());
                Ok(self.apply_one(orig, used, Some(seen)))
            }
        }
    }

    /// The peer made `path` (a create, mknod, symlink or link) where we have another entry,
    /// one of the two a symlink or special file ([`entries_clash`]), that we gave the name
    /// during the split (`core::reconcile::EntryClash`): the lower id's stays. Ours stays: the
    /// making is not applied (it failed as existing), listed when the peer's copy arrives.
    /// Ours goes: [`PeerReceiver::entry_aside`], then the making applies again (`true`).
    fn entry_clash(&self, rc: &SiteReconcile, op: &Op, path: &RelPath, seen: u64) -> Result<bool> {
        let Some(ours) = entry_of(&self.backing, path) else {
            return Ok(false);
        };
        let theirs = match op {
            Op::Create { .. } => (libc::S_IFREG, None),
            Op::Symlink { target, .. } => (libc::S_IFLNK, Some(target.clone())),
            Op::Mknod { mode, .. } => (mode & libc::S_IFMT, None),
            Op::Link { from, .. } => match entry_of(&self.backing, from) {
                Some(e) => e,
                None => return Ok(false),
            },
            _ => return Ok(false),
        };
        if !entries_clash(&ours, &theirs) {
            return Ok(false);
        }
        let decision = {
            let _order = lock(&self.vol.order);
            rc.decide_entry_clash(path.as_bytes(), seen)
        };
        match decision {
            EntryClash::Apart => Ok(false),
            EntryClash::Ours { first } => {
                rc.skipped(path.as_bytes(), first);
                Ok(false)
            }
            EntryClash::Theirs => self.entry_aside(rc, path),
        }
    }

    /// A peer rename (`op`, our names) onto a name where we have another entry, one of the
    /// two a symlink or special file, that we gave the name during the split (called under
    /// the order lock): `None`, no such clash; ours stays (`Displaced`: the rename is not
    /// applied and its source goes, the peer's copy brings it; or `Skip`, the source kept and
    /// given back, as we changed it); ours goes aside first (`Aside`).
    fn rename_entry_clash(&self, rc: &SiteReconcile, op: &Op, seen: u64) -> Option<Held> {
        let Op::Rename {
            from, to, flags, ..
        } = op
        else {
            return None;
        };
        if flags & RENAME_EXCHANGE != 0 || from == to {
            return None;
        }
        let ours = entry_of(&self.backing, to)?;
        let theirs = entry_of(&self.backing, from)?;
        if !entries_clash(&ours, &theirs) {
            return None;
        }
        match rc.decide_entry_clash(to.as_bytes(), seen) {
            EntryClash::Apart => None,
            EntryClash::Theirs => Some(Held::Aside),
            EntryClash::Ours { first } => {
                rc.skipped(to.as_bytes(), first);
                match rc.decide_onto_dir(from.as_bytes(), seen) {
                    Decision::Restore { first } => {
                        if first {
                            rc.list_removed(from.as_bytes());
                        }
                        lock(&self.rewrites).push((from.clone(), true));
                        Some(Held::Skip)
                    }
                    _ => Some(Held::Displaced),
                }
            }
        }
    }

    /// The peer's exchange `op` (its names `a` and `b`) while a rename or removal of ours is
    /// unseen by it ([`ExchangeDecision::Renames`]): the three peer renames it is carried out
    /// as, `a` → `via` (`RENAME_NOREPLACE`), `b` → `a`, `via` → `b`, each then translated,
    /// decided and applied as the peer's rename (journaled as the peer's, so not streamed
    /// back). `None`: applied as sent (also if the hidden name `via` is taken here: nothing is
    /// replaced for it).
    ///
    /// After a crash between the renames (the record comes again: `done` of them are done, as
    /// the notes say), the rest of them, whatever the decision now and with the hidden name
    /// ours: the steps done are not done again (a redone `a` → hidden name would move the
    /// other entry, the one now at `a`).
    fn exchange_as_renames(
        &self,
        op: &Op,
        seq: u64,
        seen: Option<u64>,
    ) -> Option<(Vec<Op>, usize)> {
        let (
            Some(rc),
            Some(seen),
            Op::Rename {
                from: a,
                to: b,
                flags,
                ..
            },
        ) = (&self.reconcile, seen, op)
        else {
            return None;
        };
        if flags & RENAME_EXCHANGE == 0 {
            return None;
        }
        let (via, done) = {
            let _order = lock(&self.vol.order);
            match rc.exchange_done(seq) {
                0 => match rc.decide_exchange(a.as_bytes(), b.as_bytes(), seen) {
                    ExchangeDecision::Apply => return None,
                    ExchangeDecision::Renames { via } => (via, 0),
                },
                done => (exchange_via(a.as_bytes(), b.as_bytes()), usize::from(done)),
            }
        };
        let via = RelPath::new(via).ok()?;
        if done == 0 && entry_of(&self.backing, &via).is_some() {
            tracing::warn!(
                "the hidden name {} for the peer's exchange is taken here: applied as sent",
                String::from_utf8_lossy(via.as_bytes())
            );
            return None;
        }
        let rename = |from: &RelPath, to: &RelPath, flags: u32| Op::Rename {
            from: from.clone(),
            to: to.clone(),
            flags,
            from_ino: 0,
        };
        Some((
            vec![
                rename(a, &via, NOREPLACE),
                rename(b, a, 0),
                rename(&via, b, 0),
            ],
            done,
        ))
    }

    /// `done` steps of the peer's exchange record `seq` are carried out here (3: all, or the
    /// exchange applied as sent), made durable with what they changed before the next step:
    /// the record comes again after a crash, and what is done is not done again
    /// (`Reconciler::exchange_done`).
    fn exchange_step_done(&self, seq: u64, done: usize) -> Result<()> {
        let Some(rc) = &self.reconcile else {
            return Ok(());
        };
        rc.exchange_step_done(seq, u8::try_from(done).unwrap_or(u8::MAX));
        self.vol.wait_journal_durable();
        if self.vol.poisoned.load(Ordering::Acquire) {
            bail!("the journal failed: the peer's exchange is not carried on");
        }
        rc.save_notes()
    }

    /// Our entry at `path` goes for the peer's of its name ([`EntryClash::Theirs`]): a
    /// conflict copy (a file with its content, a symlink with its target, a node with its
    /// type: journaled, streamed, listed), then its removal as the peer's record (not
    /// streamed back: the peer keeps its entry at the name). `true`: done, the peer's making
    /// can apply.
    fn entry_aside(&self, rc: &SiteReconcile, path: &RelPath) -> Result<bool> {
        if rc
            .entry_aside(&self.vol, &self.backing, path)
            .context("the conflict copy of an entry the peer gave the same name")?
            .is_none()
        {
            return Ok(false);
        }
        {
            let _order = lock(&self.vol.order);
            rc.entry_set_aside(path.as_bytes());
        }
        lock(&self.rewrites).retain(|(p, _)| p != path);
        self.remove(path, true, "our entry for the name the peer gave its own")?;
        Ok(true)
    }

    /// The source `from` (our name) of the peer's rename `orig` of a file onto our directory
    /// `to`, not applied: moved through the volume (journaled as the peer's record, not
    /// streamed back) to a holding name (`PATH.held-…`), held there until the peer moves the
    /// file aside (its unlink of the name, translated to the holding name) or renames it away
    /// (translated from the holding name): `Reconciler::hold_source`, the model's
    /// `Site::hold_source`. Removed at once, it was lost here when the peer renamed it away
    /// before our directory reached it (seed 252,772 of `core::reconcile`'s model).
    fn hold_source(
        &self,
        rc: &SiteReconcile,
        (orig, from, to): (&Op, &RelPath, &RelPath),
        seen: u64,
    ) -> Result<()> {
        let Op::Rename {
            from: theirs_from,
            to: theirs_to,
            ..
        } = orig
        else {
            return self.remove_source(from);
        };
        let hold = rc
            .holding_name(&self.backing, to)
            .context("a holding name for the peer's file")?;
        let op = Op::Rename {
            from: from.clone(),
            to: hold.clone(),
            flags: NOREPLACE,
            from_ino: local_ino(&self.backing, from.as_bytes()),
        };
        let mut tree = DirTree::open(&self.backing).context("cannot open the backing tree")?;
        self.vol
            .mutate_from_peer(&op, |_| {
                apply_op(&mut tree, &op, false)
                    .map_err(|e| std::io::Error::from_raw_os_error(tree_errno(&e)))
            })
            .map_err(|e| {
                anyhow!(
                    "cannot hold the source of the peer's rename: {}",
                    std::io::Error::from_raw_os_error(e)
                )
            })?;
        rc.hold_source(
            (theirs_from.as_bytes(), theirs_to.as_bytes()),
            (from.as_bytes(), to.as_bytes()),
            hold.as_bytes(),
            seen,
        );
        tracing::warn!(
            "conflict: the peer renamed {} onto {}, a directory here; its file is held at {} until it moves it aside",
            String::from_utf8_lossy(from.as_bytes()),
            String::from_utf8_lossy(to.as_bytes()),
            String::from_utf8_lossy(hold.as_bytes())
        );
        Ok(())
    }

    /// The source of a peer rename that is not applied here because the name it goes to stays
    /// ours (a directory, or our file in a conflict): removed through the volume (journaled)
    /// as the peer's record, not streamed back. The peer moved its file away from that name
    /// (and moves or copies it aside): there the name holds nothing now, or another entry (an
    /// exchange's other end, a later one) that our removal of it would take (the model's
    /// `Site::source_gone`; seed 4,958 of `core::reconcile`'s model).
    fn remove_source(&self, from: &RelPath) -> Result<()> {
        self.remove(from, true, "the source of the peer's rename")
    }

    /// Removes `path` through the volume (journaled at our seq, its link count read beneath
    /// the root); `as_peer`: noted as the peer's record (not streamed back), else our own
    /// change. `what` names it in the error.
    fn remove(&self, path: &RelPath, as_peer: bool, what: &str) -> Result<()> {
        let nlink = nlink_beneath(&self.backing, path.as_bytes());
        let mut tree = DirTree::open(&self.backing).context("cannot open the backing tree")?;
        let op = Op::Unlink {
            path: path.clone(),
            nlink,
        };
        let apply = |_| {
            apply_op(&mut tree, &op, false)
                .map_err(|e| std::io::Error::from_raw_os_error(tree_errno(&e)))
        };
        let res = if as_peer {
            self.vol.mutate_from_peer(&op, apply)
        } else {
            self.vol.mutate_beneath_unsettled(op.clone(), apply)
        };
        res.map_err(|e| {
            anyhow!(
                "cannot remove {what}: {}",
                std::io::Error::from_raw_os_error(e)
            )
        })?;
        Ok(())
    }

    /// One try at applying `op` (the peer's record `orig` with our names) through the volume.
    /// With reconciliation, the decision is taken under the order lock (a local write cannot
    /// come between it and the change); a record not applied now is journaled with its `Abort`
    /// (and still noted as the peer's).
    fn apply_one(&self, orig: &Op, op: &Op, seen: Option<u64>) -> Result<(), Held> {
        let mut tree = self.tree().map_err(|_| Held::Errno(libc::EIO))?;
        let held = std::cell::Cell::new(None);
        let res = self.vol.mutate_from_peer(op, |_| {
            if let (Some(rc), Some(seen)) = (&self.reconcile, seen) {
                let skip = |held: &std::cell::Cell<Option<Held>>, h| {
                    held.set(Some(h));
                    Err(std::io::Error::from_raw_os_error(libc::ECANCELED))
                };
                // Our names for the peer's, again under the order lock.
                let now = rc.translate(orig, seen);
                if !same_names(now.as_ref().unwrap_or(orig), op) {
                    return skip(&held, Held::Retry);
                }
                let decision = match orig {
                    Op::Unlink { path, .. } => rc.decide_unlink(path.as_bytes(), seen).1,
                    Op::Rename {
                        from, to, flags, ..
                    } if flags & RENAME_EXCHANGE != 0 => {
                        // Not a rename onto a name: each entry moves with its changes.
                        match rc.decide_exchange(from.as_bytes(), to.as_bytes(), seen) {
                            ExchangeDecision::Apply => Decision::Apply,
                            // A rename or removal of ours came since: as renames.
                            ExchangeDecision::Renames { .. } => return skip(&held, Held::Retry),
                        }
                    }
                    Op::Rename { from, to, .. } => {
                        if let Some(h) = self.rename_entry_clash(rc, op, seen) {
                            return skip(&held, h);
                        }
                        match rc.decide_rename(from.as_bytes(), to.as_bytes(), seen) {
                            RenameDecision::Apply {
                                from, clash, aside, ..
                            } => {
                                if let Some(c) = self.renamed_dir_clash(rc, orig, op, seen) {
                                    return skip(&held, Held::Clash(c));
                                }
                                if let (true, Op::Rename { to, .. }) = (clash, op) {
                                    rc.list_renamed(to.as_bytes(), &from);
                                }
                                let exchange = matches!(op, Op::Rename { flags, .. }
                                    if flags & RENAME_EXCHANGE != 0);
                                let from_dir = matches!(op, Op::Rename { from, .. }
                                    if is_beneath(&self.backing, from.as_bytes(), libc::S_IFDIR));
                                if aside && !exchange && !from_dir {
                                    // Another file of ours has the name: aside first (a
                                    // directory renamed onto it: `namespace_fix`, ENOTDIR).
                                    return skip(&held, Held::Copy);
                                }
                                Decision::Apply
                            }
                            RenameDecision::Displaced {
                                rewrite,
                                first,
                                source,
                                ..
                            } => {
                                if let Some(c) = self.renamed_dir_clash(rc, orig, op, seen) {
                                    return skip(&held, Held::Clash(c));
                                }
                                let Op::Rename {
                                    from, to, flags, ..
                                } = op
                                else {
                                    return skip(&held, Held::Skip);
                                };
                                let file = |p: &RelPath| {
                                    is_beneath(&self.backing, p.as_bytes(), libc::S_IFREG)
                                };
                                if !(file(from) && file(to)) || flags & RENAME_EXCHANGE != 0 {
                                    // Directories, symlinks, exchanges: not reconciled;
                                    // applied as sent.
                                    Decision::Apply
                                } else {
                                    // Ours stays at `to`; the loser's copy brings its file.
                                    rc.skipped(to.as_bytes(), first);
                                    if rewrite {
                                        lock(&self.rewrites).push((to.clone(), false));
                                    }
                                    match source {
                                        Decision::Restore { first } => {
                                            if first {
                                                rc.list_removed(from.as_bytes());
                                            }
                                            lock(&self.rewrites).push((from.clone(), true));
                                            return skip(&held, Held::Skip);
                                        }
                                        _ => return skip(&held, Held::Displaced),
                                    }
                                }
                            }
                            RenameDecision::Keep { ours, clash } => {
                                if let (true, Op::Rename { to, .. }) = (clash, op) {
                                    rc.list_renamed(&ours, to.as_bytes());
                                }
                                return skip(&held, Held::Skip);
                            }
                            RenameDecision::Removed => return skip(&held, Held::Skip),
                        }
                    }
                    _ => match meta_key(op) {
                        Some((path, key)) => {
                            if !rc.decide_meta(path.as_bytes(), key, seen) {
                                return skip(&held, Held::Skip);
                            }
                            Decision::Apply
                        }
                        None => match data_rel(op) {
                            // Translated: the peer names our file by its old name.
                            Some(p) => {
                                let theirs = data_rel(orig).unwrap_or(p);
                                rc.decide_data(theirs.as_bytes(), p.as_bytes(), seen)
                            }
                            None => rc.decide(None, seen),
                        },
                    },
                };
                match decision {
                    Decision::Apply => {}
                    Decision::Restore { first } => {
                        if let Op::Unlink { path, .. } = op {
                            if first {
                                rc.list_removed(path.as_bytes());
                            }
                            lock(&self.rewrites).push((path.clone(), true));
                        }
                        held.set(Some(Held::Skip));
                        return Err(std::io::Error::from_raw_os_error(libc::ECANCELED));
                    }
                    Decision::Skip { rewrite, first } => {
                        if let Some(p) = data_rel(op) {
                            rc.skipped(p.as_bytes(), first);
                            if rewrite {
                                lock(&self.rewrites).push((p.clone(), false));
                            }
                        }
                        held.set(Some(Held::Skip));
                        return Err(std::io::Error::from_raw_os_error(libc::ECANCELED));
                    }
                    Decision::CopyThenApply => {
                        held.set(Some(Held::Copy));
                        return Err(std::io::Error::from_raw_os_error(libc::ECANCELED));
                    }
                }
            }
            // While the peer's initial copy runs here, its other records apply idempotently
            // too, as a mirror daemon's do during a copy (`core::applier`).
            let replay = self.copy_id.load(Ordering::Acquire) != 0;
            apply_op(&mut tree, op, replay).map_err(|e| {
                tracing::debug!("the peer's {} failed here: {e}", op.name());
                std::io::Error::from_raw_os_error(tree_errno(&e))
            })
        });
        *lock(&self.tree) = Some(tree);
        match (res, held.take()) {
            (Ok(_), _) => Ok(()),
            (Err(_), Some(h)) => Err(h),
            (Err(e), None) => Err(Held::Errno(e)),
        }
    }

    /// The backing tree the peer's records are applied to (`apply_one`, which puts it back):
    /// its root opened once, not once per record (an `openat`, `statx` and `close` each:
    /// `docs/benchmarks.md`, "the second site's CPU per record"). It cannot go stale: the
    /// mount's FUSE shell serves the backing through a root it opened once at mount
    /// (`fuse::MirrorFs::new`), so this one names the directory the mount serves, which opening the
    /// path again could not promise. What it caches below the root (the file last written, the
    /// directory last resolved) is forgotten before each record: a local rename between two
    /// records could move what such a descriptor names. Taken out, not locked: a failure is a
    /// refusal (`EIO`, the connection ends unacknowledged), and a nested call opens its own.
    fn tree(&self) -> std::io::Result<DirTree> {
        let tree = lock(&self.tree).take();
        let mut tree = match tree {
            Some(t) => t,
            None => DirTree::open(&self.backing)?,
        };
        tree.forget_open();
        Ok(tree)
    }

    /// Acks as the session says (a change of position, or the heartbeat).
    fn send_acks(&self, link: &Duplex, session: &Mutex<Session>, done: &AtomicBool) -> Result<()> {
        let t0 = Instant::now();
        while !done.load(Ordering::Acquire) {
            self.store_inert(false)?;
            let a = self.applied.load(Ordering::Acquire);
            let raw = Positions {
                received: a,
                durable: a,
                applied: a,
                checkpoint: a,
            };
            let step = lock(session).ack_at(raw, t0.elapsed());
            if let Some(ack) = step.ack {
                link.send(&ack)?;
            }
            let p = lock(&self.vol.progress);
            if self.applied.load(Ordering::Acquire) == a && !p.stopping {
                let _ = self.vol.changed.wait_timeout(p, Duration::from_millis(50));
            }
        }
        // The session ends: what batches that changed nothing reached is written now (the
        // next session resumes after it).
        self.store_inert(true)
    }

    /// Writes `STATE/peer-applied` for the position batches that changed nothing reached,
    /// once the first of them is [`INERT_DEFER`] old (`now`: at once), so that it is
    /// acknowledged. A batch that changed something and wrote the file since covers them.
    fn store_inert(&self, now: bool) -> Result<()> {
        let seq = {
            let mut d = lock(&self.inert);
            match *d {
                Some((seq, since)) if now || since.elapsed() >= INERT_DEFER => {
                    *d = None;
                    seq
                }
                _ => return Ok(()),
            }
        };
        let mut pos = lock(&self.position);
        if seq <= pos.applied {
            return Ok(());
        }
        pos.applied = seq;
        forget_passed_intent(&mut pos);
        self.store_position(&pos)?;
        drop(pos);
        self.applied.fetch_max(seq, Ordering::AcqRel);
        let mut s = lock(&self.status);
        s.applied = s.applied.max(seq);
        Ok(())
    }

    /// Writes `STATE/peer-applied` durably (`PeerPosition::store`) and counts the write in
    /// `status` (`peer_receive.position_writes`).
    fn store_position(&self, pos: &PeerPosition) -> Result<()> {
        pos.store(&self.position_file)
            .with_context(|| format!("cannot write {}", self.position_file.display()))?;
        lock(&self.status).position_writes += 1;
        Ok(())
    }
}

/// A peer record that changes nothing here when applied (without a copy under way or
/// reconciliation): the peer's placeholders for our own records and its aborts, group marks.
fn is_exchange(op: &Op) -> bool {
    matches!(op, Op::Rename { flags, .. } if flags & RENAME_EXCHANGE != 0)
}

/// A position that covers its intent's record no longer needs it.
fn forget_passed_intent(pos: &mut PeerPosition) {
    if pos.intent.is_some_and(|i| i.seq <= pos.applied) {
        pos.intent = None;
    }
}

fn changes_nothing(op: &Op) -> bool {
    matches!(op, Op::Abort { .. } | Op::GroupBegin | Op::GroupEnd)
}

/// The held records whose fate is known, in order, each with whether the next record aborts it:
/// ≤ `settled`, and either the watermark itself or followed by the next record (which would be
/// its `Abort`). The rest stay held.
fn take_ready(pending: &mut VecDeque<Record>, settled: u64) -> Vec<(Record, bool)> {
    let mut out = Vec::new();
    while let Some(front) = pending.front() {
        if front.seq > settled || (front.seq < settled && pending.len() < 2) {
            break;
        }
        let Some(r) = pending.pop_front() else { break };
        let aborted =
            matches!(pending.front(), Some(Record { op: Op::Abort { seq }, .. }) if *seq == r.seq);
        out.push((r, aborted));
    }
    out
}

/// Why a peer record was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Concurrent with our own write, and this site keeps its version (it rewrites it).
    Skip,
    /// Concurrent, and this site's version goes to a conflict copy first.
    Copy,
    /// A peer rename onto a name whose file stays ours: not applied, its source removed.
    Displaced,
    /// A peer rename onto a name where our entry (or the peer's) is a symlink or special
    /// file, and the peer's stays: ours goes aside first (`PeerReceiver::entry_aside`).
    Aside,
    /// The change failed here (or the volume refused it).
    Errno(i32),
    /// A local rename changed our name for the record's since it was translated: again.
    Retry,
    /// A directory the peer gave a name we gave a directory of ours during the split
    /// (`PeerReceiver::dir_clash`).
    Clash(DirClash),
}

/// Linux's `RENAME_EXCHANGE`.
const RENAME_EXCHANGE: u32 = 2;

/// Linux's `RENAME_NOREPLACE`.
const NOREPLACE: u32 = 1;

/// `a` and `b` name the same entries (their data aside).
fn same_names(a: &Op, b: &Op) -> bool {
    let to = |op: &Op| match op {
        Op::Rename { to, .. } | Op::Link { to, .. } => Some(to.clone()),
        _ => None,
    };
    a.kind() == b.kind() && a.path() == b.path() && to(a) == to(b)
}

/// The errno of a change that failed on the tree: the ones a concurrent local change explains
/// (gone, taken, not empty...) fail the one record, journaled with its `Abort`; `EIO` and
/// `ENOSPC` end the connection unacknowledged (the record comes again).
fn tree_errno(e: &mirrorfs_core::tree::TreeError) -> i32 {
    use mirrorfs_core::tree::TreeError as T;
    match e {
        T::NotFound(_) => libc::ENOENT,
        T::Exists(_) => libc::EEXIST,
        T::NotEmpty(_) => libc::ENOTEMPTY,
        T::NotDir(_) => libc::ENOTDIR,
        T::IsDir(_) => libc::EISDIR,
        T::NoSpace(_) => libc::ENOSPC,
        T::Other { errno, .. } if *errno > 0 => *errno,
        _ => libc::EIO,
    }
}

/// The file a data change (write, truncate, fallocate) changes.
fn data_rel(op: &Op) -> Option<&RelPath> {
    match op {
        Op::Write { path, .. } | Op::Truncate { path, .. } | Op::Fallocate { path, .. } => {
            Some(path)
        }
        _ => None,
    }
}

fn local_ino(backing: &Path, rel: &[u8]) -> u64 {
    stat_beneath(backing, rel).map_or(0, |st| st.st_ino)
}

/// `rel`'s status in the backing tree, resolved beneath its root without following a symlink
/// on the way or at the end (`Root::lstat`): what the decisions here read of the tree, so that
/// a symlink a user of the mount made in it never has them read outside it (the changes go
/// through `DirTree`, confined the same way). `None`: nothing there, or not a path.
fn stat_beneath(backing: &Path, rel: &[u8]) -> Option<libc::stat> {
    let rel = RelPath::new(rel.to_vec()).ok()?;
    Root::open(backing).ok()?.lstat(&rel).ok()
}

/// Whether `rel` beneath the backing root is of the file type `kind` (`libc::S_IFDIR`, …).
fn is_beneath(backing: &Path, rel: &[u8], kind: libc::mode_t) -> bool {
    stat_beneath(backing, rel).is_some_and(|st| st.st_mode & libc::S_IFMT == kind)
}

/// `rel`'s link count beneath the backing root (1 when it cannot be read), for an `Unlink`.
fn nlink_beneath(backing: &Path, rel: &[u8]) -> u32 {
    stat_beneath(backing, rel).map_or(1, |st| st.st_nlink as u32)
}

/// The peer as `status` names it.
fn peer_label(gate: Option<&TokenGate>) -> String {
    match gate.map(|g| g.ids()) {
        Some((_, peer)) => format!("site {peer}"),
        None => "the peer".to_string(),
    }
}

fn hex(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

fn recv_within(d: &Duplex, dec: &mut Decoder, limit: Duration) -> Result<Msg> {
    let t0 = Instant::now();
    loop {
        if let Some(m) = d.recv(dec)? {
            return Ok(m);
        }
        if t0.elapsed() > limit {
            bail!("the peer did not answer within {limit:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(seq: u64) -> Record {
        Record {
            seq,
            op: Op::Truncate {
                path: RelPath::new(b"f").expect("path"),
                size: seq,
            },
        }
    }

    fn abort(seq: u64, of: u64) -> Record {
        Record {
            seq,
            op: Op::Abort { seq: of },
        }
    }

    fn seqs(v: &[(Record, bool)]) -> Vec<(u64, bool)> {
        v.iter().map(|(r, a)| (r.seq, *a)).collect()
    }

    /// A receiver over a primary's volume in `dir` (journal there, backing `dir/backing`),
    /// without tokens or reconciliation.
    fn receiver(dir: &Path) -> Arc<PeerReceiver> {
        use crate::site::store::FileStore;
        use crate::site::volume::{AckMode, FsyncWaits};
        use mirrorfs_core::journal::{Journal, JournalConfig};
        let backing = dir.join("backing");
        std::fs::create_dir_all(&backing).expect("backing");
        let store = FileStore::open(dir).expect("store");
        let (j, _) = Journal::open(store, JournalConfig::default()).expect("journal");
        let role = crate::site::engine::Role::Primary {
            backing: backing.clone(),
            ack: AckMode::Async,
            quorum: 0,
            fsync_waits: FsyncWaits::Mode,
        };
        let vol = Arc::new(Volume::new(j, None, Vec::new(), &role));
        let pairing = Pairing {
            gate: None,
            reconcile: None,
        };
        PeerReceiver::new(
            vol,
            &backing,
            b".mirrorfs".to_vec(),
            dir.join("peer-applied"),
            pairing,
            "test",
        )
        .expect("receiver")
    }

    fn data_write(seq: u64, path: &[u8], data: &[u8]) -> Record {
        Record {
            seq,
            op: Op::Write {
                path: RelPath::new(path).expect("path"),
                offset: 0,
                data: data.to_vec(),
            },
        }
    }

    /// The receiver keeps its tree between records (`PeerReceiver::tree`), but not what the
    /// tree caches below its root: a file renamed away here between two of the peer's writes
    /// to its name keeps the first, and the second goes to the file now at the name, not
    /// through a descriptor of the file moved.
    #[test]
    fn a_kept_tree_writes_to_the_file_at_the_name_after_a_local_rename() {
        let d = tempfile::tempdir().expect("tempdir");
        let rcv = receiver(d.path());
        let backing = d.path().join("backing");
        std::fs::write(backing.join("f"), b"....").expect("f");
        rcv.apply(&data_write(1, b"f", b"one.")).expect("apply 1");
        assert!(
            lock(&rcv.tree).is_some(),
            "the tree is kept for the next record"
        );
        // A local rename (as the mount's would be) and a new file at the name.
        std::fs::rename(backing.join("f"), backing.join("g")).expect("rename");
        std::fs::write(backing.join("f"), b"....").expect("f again");
        rcv.apply(&data_write(2, b"f", b"two.")).expect("apply 2");
        assert_eq!(std::fs::read(backing.join("g")).expect("g"), b"one.");
        assert_eq!(std::fs::read(backing.join("f")).expect("f"), b"two.");
        // Both journaled here, as the peer's.
        let o = lock(&rcv.vol.order);
        assert_eq!(o.journal.next_seq(), 3);
    }

    #[test]
    fn a_record_waits_until_its_fate_is_known() {
        let mut p: VecDeque<Record> = [write(1), write(2)].into_iter().collect();
        // Nothing settled: everything waits.
        assert!(take_ready(&mut p, 0).is_empty());
        // 1 is settled and followed by 2: final. 2 is below the watermark 3 but its successor
        // (maybe its Abort) is not here yet: it waits.
        assert_eq!(seqs(&take_ready(&mut p, 3)), vec![(1, false)]);
        p.push_back(abort(3, 2));
        // 2 is aborted by 3; 3 is the watermark itself.
        assert_eq!(seqs(&take_ready(&mut p, 3)), vec![(2, true), (3, false)]);
        assert!(p.is_empty());
        // The watermark itself is final with nothing after it.
        p.push_back(write(4));
        assert_eq!(seqs(&take_ready(&mut p, 4)), vec![(4, false)]);
        // Beyond the watermark: held.
        p.push_back(write(5));
        assert!(take_ready(&mut p, 4).is_empty());
        assert_eq!(p.len(), 1);
    }
}
