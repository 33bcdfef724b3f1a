//! The primary's side of a failback: a mirror daemon answered `Hello` with `Diverged` (it is an
//! old primary, or a promoted copy's old peer, holding changes this primary never received).
//! Its changes are taken into this primary — replayed where nothing conflicts, kept as conflict
//! copies where something does — and then the daemon is resynchronised to this primary. Nothing
//! either side changed is lost: the daemon also saves its diverged files before it follows.
//!
//! ```text
//!  primary                                   daemon (diverged)
//!    Hello ─────────────────────────────────▶
//!          ◀──────────────── Diverged{common, end}
//!    Reintegrate{from} ─────────────────────▶
//!          ◀──────────────── Tail… (its records after the common point, without data)
//!    plan (core::reintegrate::plan), saved with its step cursor
//!    per step: Fetch{their, as} ────────────▶
//!          ◀──────────────── Entry… (the ops that recreate its entry)
//!    ops applied through the volume (journaled: this primary's mirrors follow)
//!    Reintegrated ──────────────────────────▶ saves its diverged files, marks itself for resync
//!          ◀──────────────── Reintegrated
//!    reconnect: Welcome{NeedsResync} → block-hash resync (only what differs travels)
//! ```
//!
//! The decisions are the core's (`reintegrate::plan`, `reintegrate::run::Run`,
//! `reintegrate::saved`); this module reads journals, moves messages, applies ops and keeps the
//! plan and its cursor durable in `MIRROR_STATE/reintegration/` (fsync points R1, R2 in
//! `docs/journal.md`).

use std::collections::HashSet;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mirrorfs_core::journal::Reader;
use mirrorfs_core::link::{check_entry_ops, check_tail, unexpected, Divergence, LinkError};
use mirrorfs_core::op::{Op, Record};
use mirrorfs_core::path::RelPath;
use mirrorfs_core::reintegrate::run::{Action, Applied, Run, Stat};
use mirrorfs_core::reintegrate::saved::{
    cursor_slot, decode_cursor, decode_moves, decode_plan, encode_cursor, encode_move, encode_plan,
    SavedPlan, CURSOR_SLOT_BYTES,
};
use mirrorfs_core::reintegrate::{self, conflict_label, Conflict, Input};
use mirrorfs_core::tree::apply_op;
use mirrorfs_core::wire::{error_code, Decoder, Msg};

use crate::net::conn::Duplex;
use crate::site::conflicts::{self, ConflictEntry};
use crate::site::state_dir::MirrorStateDir;
use crate::site::statefile;
use crate::site::store::FileStore;
use crate::site::volume::{lock, MirrorPhase, MirrorShared, Volume};
use crate::tree::dirtree::{kind_of, DirTree, Root};

/// Most records of theirs a plan takes (each is kept in memory without its data while planning).
pub const TAIL_RECORDS_MAX: usize = 4_000_000;
/// Most records of ours after the common point a plan takes.
pub const OUR_RECORDS_MAX: usize = 4_000_000;
/// How long one answer of the daemon may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);
/// A ping this often keeps the daemon from taking a busy primary for a silent one.
const KEEPALIVE: Duration = Duration::from_secs(1);

/// What a reintegration works with.
pub struct Reintegration<'a> {
    pub vol: &'a Volume,
    pub m: &'a MirrorShared,
    /// The backing directory (ops are applied beneath it, never through a symlink).
    pub backing: &'a Path,
    /// The volume's state directory (the conflict registry).
    pub state: &'a Path,
    pub d: &'a Duplex,
    pub dec: &'a mut Decoder,
}

fn dir_of(m: &MirrorShared) -> PathBuf {
    MirrorStateDir::at(&m.state_dir).reintegration_dir()
}

fn set_phase(m: &MirrorShared, p: MirrorPhase) {
    *lock(&m.phase) = p;
}

/// A link error that ends this connection for good (until the operator acts).
fn refuse(d: &Duplex, code: u16, why: String) -> anyhow::Error {
    let e = LinkError::new(code, false, why);
    let _ = d.send(&e.to_msg());
    anyhow::Error::new(e)
}

impl Reintegration<'_> {
    /// Takes the daemon's diverged changes into this primary; returns how many conflicts were
    /// listed. The connection then ends; the next one resynchronises the daemon.
    pub fn run(mut self, div: &Divergence) -> Result<u64> {
        let from = div.common_seq + 1;
        let held = lock(&self.vol.order).journal.first_seq();
        if held > from {
            return Err(refuse(
                self.d,
                error_code::DIVERGED,
                format!(
                    "split brain with {}: its changes after the common point (record {}) cannot be reintegrated because this primary's journal no longer holds its own changes from there (it starts at {held}); nothing was changed on either side. Keep what you need from the mirror's directory, then restart its daemon with `--on-diverged discard`",
                    self.m.name, div.common_seq
                ),
            ));
        }
        let their_generation = div.their_history.current().map_or(0, |g| g.id);
        let saved = load_plan(self.m)?
            .filter(|s| s.matches(their_generation, div.common_seq, div.their_end));
        let saved = match saved {
            Some(s) => {
                tracing::info!(
                    "mirror {}: resuming the reintegration of its changes (plan {:x})",
                    self.m.name,
                    s.id
                );
                self.d.send(&Msg::Reintegrate { from })?;
                self.skip_tail(from)?;
                s
            }
            None => self.make_plan(div, their_generation)?,
        };
        let done = read_cursor(self.m, saved.id)?;
        tracing::warn!(
            "mirror {}: split brain at generation {} record {}: reintegrating its changes into this primary ({} step(s), {} conflict(s) planned, {} done)",
            self.m.name,
            div.common_generation,
            div.common_seq,
            saved.plan.steps.len(),
            saved.plan.conflicts.len(),
            done.1
        );
        let conflicts = self.carry_out(&saved, done)?;
        self.d.send(&Msg::Reintegrated { conflicts })?;
        match self.answer()? {
            Msg::Reintegrated { .. } => {}
            other => return Err(unexpected(&other, "Reintegrated").into()),
        }
        failpoint_before_plan_removed(self.m);
        remove_plan(self.m)?;
        let (received, sent) = self.publish_bytes();
        {
            let mut l = lock(&self.m.link);
            l.reintegration_bytes_received = received;
            l.reintegration_bytes_sent = sent;
        }
        tracing::warn!(
            "mirror {}: reintegrated ({} step(s), {conflicts} conflict(s) listed: `mirrorfs conflicts`; {received} bytes received, {sent} sent); it now follows this primary",
            self.m.name,
            saved.plan.steps.len()
        );
        Ok(conflicts)
    }

    /// The next message of the daemon that is not a `Pong`; its `Error` ends the run.
    fn answer(&mut self) -> Result<Msg> {
        let t0 = Instant::now();
        loop {
            if let Some(msg) = self.d.recv(self.dec)? {
                match msg {
                    Msg::Pong { .. } => continue,
                    Msg::Error { code, message } => {
                        return Err(anyhow::Error::new(LinkError::new(code, true, message)))
                    }
                    m => return Ok(m),
                }
            }
            if t0.elapsed() > ANSWER_WITHIN {
                bail!("the mirror did not answer within {ANSWER_WITHIN:?}");
            }
        }
    }

    /// Their records after the common point, without data, checked consecutive.
    fn receive_tail(&mut self, from: u64) -> Result<Vec<Record>> {
        let mut next = from;
        let mut out = Vec::new();
        loop {
            match self.answer()? {
                Msg::Tail { last, records } => {
                    next = check_tail(next, &records).map_err(anyhow::Error::new)?;
                    if out.len() + records.len() > TAIL_RECORDS_MAX {
                        return Err(refuse(self.d, error_code::REFUSED, format!(
                            "the mirror holds more than {TAIL_RECORDS_MAX} records this primary lacks: too many to reintegrate; restart its daemon with `--on-diverged discard` (its changes are saved first)"
                        )));
                    }
                    out.extend(records);
                    if last {
                        return Ok(out);
                    }
                }
                other => return Err(unexpected(&other, "Tail").into()),
            }
        }
    }

    /// A resumed plan needs no records: they are read and dropped.
    fn skip_tail(&mut self, from: u64) -> Result<()> {
        let mut next = from;
        loop {
            match self.answer()? {
                Msg::Tail { last, records } => {
                    next = check_tail(next, &records).map_err(anyhow::Error::new)?;
                    if last {
                        return Ok(());
                    }
                }
                other => return Err(unexpected(&other, "Tail").into()),
            }
        }
    }

    /// Plans from both sides' records, saves the plan (R1) and lists its conflicts.
    fn make_plan(&mut self, div: &Divergence, their_generation: u64) -> Result<SavedPlan> {
        let from = div.common_seq + 1;
        self.d.send(&Msg::Reintegrate { from })?;
        let theirs = self.receive_tail(from)?;
        // Reading our records, planning and saving the plan send nothing: pings keep the
        // daemon from dropping this primary as silent while they take long (a large tree).
        let d = self.d;
        let ping = || d.send(&Msg::Ping { nonce: 0 }).map(|_| ());
        with_keepalive(ping, KEEPALIVE, || {
            let (ours, our_end) = our_records(self.vol, from)?;
            let root = Root::open(self.backing)
                .with_context(|| format!("cannot open {}", self.backing.display()))?;
            let mut taken = |p: &RelPath| root.lstat(p).is_ok();
            let time = crate::sys::now().sec;
            let site = site_name(self.m);
            let plan = reintegrate::plan(
                &Input {
                    ours: &ours,
                    theirs: &theirs,
                    their_site: &site,
                    time,
                },
                &mut taken,
            )
            .map_err(|e| anyhow!("cannot plan the reintegration: {e}"))?;
            let saved = SavedPlan {
                id: crate::site::meta::random_u64()?,
                their_generation,
                common_seq: div.common_seq,
                their_end: div.their_end,
                our_end,
                label: conflict_label(&site, time),
                their_site: site,
                plan,
            };
            save_plan(self.m, &saved)?;
            self.list(&saved, &saved.plan.conflicts, time)?;
            Ok(saved)
        })
    }

    /// Adds conflicts to the volume's registry (`mirrorfs conflicts`).
    fn list(&self, saved: &SavedPlan, cs: &[Conflict], time: i64) -> Result<()> {
        if cs.is_empty() {
            return Ok(());
        }
        let entries: Vec<ConflictEntry> = cs
            .iter()
            .map(|c| ConflictEntry::from_conflict(c, &saved.their_site, time))
            .collect();
        for c in cs {
            tracing::warn!(
                "conflict with {}: {} ({}){}",
                saved.their_site,
                c.path,
                conflicts::reason_word(c.reason),
                c.copy
                    .as_ref()
                    .map(|p| format!(", theirs kept as {p}"))
                    .unwrap_or_default()
            );
        }
        conflicts::record(self.state, &entries)
    }

    /// Runs the plan from the cursor; returns the number of conflicts listed in all.
    fn carry_out(&mut self, saved: &SavedPlan, (generation, done): (u64, u64)) -> Result<u64> {
        let mut tree = DirTree::open(self.backing)
            .with_context(|| format!("cannot open {}", self.backing.display()))?;
        let root = Root::open(self.backing)?;
        let mut moves = MovesFile::open(self.m)?;
        let moved = moves.read()?;
        let mut run = Run::new(&saved.plan, done as usize, &saved.label, moved);
        let mut cursor = CursorFile::open(self.m, saved.id, generation)?;
        let mut late = Touched::open(self.m, self.vol, saved.our_end + 1)?;
        let mut listed = saved.plan.conflicts.len() as u64;
        let total = run.len() as u64;
        let mut fetch_id = 0u32;
        let mut fetching: Option<(u32, RelPath)> = None;
        let mut pinged = Instant::now();
        self.phase(done, total, listed);
        loop {
            if pinged.elapsed() > KEEPALIVE {
                self.d.send(&Msg::Ping { nonce: 0 })?;
                pinged = Instant::now();
            }
            match run
                .next_action()
                .map_err(|e| anyhow!("reintegration: {e}"))?
            {
                Action::Stat(p) => {
                    let st = match root.lstat(&p) {
                        Ok(st) => Some(Stat {
                            kind: kind_of(st.st_mode),
                            ino: st.st_ino,
                            nlink: st.st_nlink as u32,
                            changed_since_plan: late.named(self.vol, &p)?,
                        }),
                        Err(e)
                            if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) =>
                        {
                            None
                        }
                        Err(e) => bail!("cannot look at {p}: {e}"),
                    };
                    run.on_stat(st).map_err(|e| anyhow!("reintegration: {e}"))?;
                }
                Action::Apply(op) => {
                    let r = self.apply(&mut tree, &root, op, &mut late);
                    if let Some(e) = late.failed.take() {
                        return Err(anyhow::Error::new(e).context(
                            "cannot record the reintegration's own changes (reintegration/ours)",
                        ));
                    }
                    run.on_applied(r)
                        .map_err(|e| anyhow!("reintegration: {e}"))?;
                }
                Action::Fetch {
                    their_path,
                    as_path,
                } => {
                    fetch_id = fetch_id.wrapping_add(1);
                    self.d.send(&Msg::Fetch {
                        id: fetch_id,
                        path: their_path,
                        as_path: as_path.clone(),
                    })?;
                    fetching = Some((fetch_id, as_path));
                }
                Action::AwaitEntry => {
                    let Some((id, as_path)) = fetching.clone() else {
                        bail!("reintegration: an answer awaited with no fetch");
                    };
                    let (ops, last) = match self.answer()? {
                        Msg::Entry { id: got, last, ops } if got == id => (ops, last),
                        other => return Err(unexpected(&other, "Entry").into()),
                    };
                    check_entry_ops(&as_path, &ops).map_err(anyhow::Error::new)?;
                    if last {
                        fetching = None;
                    }
                    run.on_entry(ops, last)
                        .map_err(|e| anyhow!("reintegration: {e}"))?;
                }
                Action::Conflict(c) => {
                    self.list(saved, std::slice::from_ref(&c), crate::sys::now().sec)?;
                    listed += 1;
                }
                Action::Moved(from, to) => moves.append(&from, &to)?,
                Action::StepDone(i) => {
                    cursor.write(i as u64 + 1)?;
                    self.phase(i as u64 + 1, total, listed);
                }
                Action::Done => return Ok(listed),
            }
        }
    }

    /// The connection's byte counts, published for `status` (no acks flow while reintegrating);
    /// returns (received, sent).
    fn publish_bytes(&self) -> (u64, u64) {
        let received = self.d.bytes_in.load(std::sync::atomic::Ordering::Relaxed);
        let sent = self.d.bytes_out.load(std::sync::atomic::Ordering::Relaxed);
        let mut l = lock(&self.m.link);
        l.bytes_received = received;
        l.bytes_sent = sent;
        (received, sent)
    }

    fn phase(&self, done: u64, total: u64, conflicts: u64) {
        self.publish_bytes();
        set_phase(
            self.m,
            MirrorPhase::Reintegrating {
                done_steps: done,
                total_steps: total,
                conflicts,
            },
        );
        self.vol.changed.notify_all();
    }

    /// Applies one op of the plan through the volume (journaled, so this primary's mirrors
    /// follow); its seq is kept out of the late-change watch.
    fn apply(&self, tree: &mut DirTree, root: &Root, mut op: Op, late: &mut Touched) -> Applied {
        if let Some((from, ino @ &mut 0)) = op.rename_from_ino_mut() {
            *ino = root.lstat(from).map_or(0, |st| st.st_ino);
        }
        late.intend(self.vol, &op);
        let applied = self.vol.mutate_beneath(op.clone(), || {
            apply_op(tree, &op, false).map_err(|e| std::io::Error::other(e.to_string()))
        });
        match applied {
            Ok(((), seq)) => {
                late.own(seq);
                Applied::Ok
            }
            // The volume journaled the op and its `Abort`: `Touched` skips both.
            Err(errno) => match errno {
                libc::ENOENT => Applied::NotFound,
                libc::EEXIST => Applied::Exists,
                libc::ENOTEMPTY => Applied::NotEmpty,
                e => Applied::Failed(format!(
                    "{}: {}",
                    op.name(),
                    std::io::Error::from_raw_os_error(e)
                )),
            },
        }
    }
}

/// Runs `work` while another thread calls `ping` every `every` (until `work` ends or a ping
/// fails: the work then finds the connection gone itself).
fn with_keepalive<T>(
    ping: impl Fn() -> std::io::Result<()> + Sync,
    every: Duration,
    work: impl FnOnce() -> T,
) -> T {
    let done = std::sync::atomic::AtomicBool::new(false);
    let step = every.min(Duration::from_millis(50));
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut last = Instant::now();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(step);
                if last.elapsed() >= every {
                    if ping().is_err() {
                        return;
                    }
                    last = Instant::now();
                }
            }
        });
        let r = work();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    })
}

/// The other site's name in conflict names and the registry: the mirror's host
/// (`mirror://HOST:PORT`), else its name.
fn site_name(m: &MirrorShared) -> String {
    let remote = m.remote.as_deref().unwrap_or(&m.name);
    let host = remote.rsplit_once(':').map_or(remote, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// Our records from `from` to the journal's end (data left out: the planner needs names), and
/// that end.
fn our_records(vol: &Volume, from: u64) -> Result<(Vec<Record>, u64)> {
    let end = lock(&vol.order).journal.next_seq() - 1;
    let mut out = Vec::new();
    let mut reader: Reader<crate::site::store::FileSegment> = Reader::new(from);
    while reader.next_seq() <= end {
        let view = lock(&vol.order).journal.segment_for(reader.next_seq());
        let Some(r) = reader.next::<FileStore>(view, end)? else {
            break;
        };
        if out.len() >= OUR_RECORDS_MAX {
            bail!("more than {OUR_RECORDS_MAX} changes of this primary since the common point: too many to plan a reintegration");
        }
        out.push(without_data(r));
    }
    Ok((out, end))
}

fn without_data(mut r: Record) -> Record {
    if let Op::Write { data, .. } = &mut r.op {
        *data = Vec::new();
    }
    r
}

/// Most names [`Touched`] remembers; past it every name counts as changed (theirs then go to
/// late conflict names: nothing of ours is overwritten, only more conflicts are listed).
const TOUCHED_MAX: usize = 1_000_000;

/// The names our changes after the plan touched (not the plan's own ops), read from the journal
/// as it grows, for [`Stat::changed_since_plan`]. Holds names only, never a record's data.
struct Touched {
    next: u64,
    names: HashSet<RelPath>,
    /// The seqs of the plan's own ops, of this run and of the runs before a crash (R4).
    ours: HashSet<u64>,
    /// The last record read, until the next one shows it was not aborted (names only).
    last: Option<(u64, Vec<RelPath>)>,
    /// Too many names, or the journal no longer holds what was not read yet.
    everything: bool,
    /// `reintegration/ours`: those seqs, appended as the ops are applied.
    file: fs::File,
    /// `reintegration/ours.pending`: the op being applied (the journal's next seq before it, and
    /// its first path), rewritten before each op.
    pending_file: fs::File,
    /// An op of a run before a crash that may have been journaled without its seq reaching
    /// `ours`: the first record from that seq on, up to the journal's end when this process
    /// opened it, that names its path is that op.
    pending: Option<(u64, Vec<u8>)>,
    /// The journal's last seq when this process opened it (records after it are this process's).
    opened_end: u64,
    /// An append that failed (the run ends).
    failed: Option<std::io::Error>,
}

/// `ours.pending`: (the journal's next seq before the op, its path); `None` if empty or torn.
fn decode_pending(b: &[u8]) -> Option<(u64, Vec<u8>)> {
    let bound = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
    let len = u32::from_le_bytes(b.get(8..12)?.try_into().ok()?) as usize;
    Some((bound, b.get(12..12 + len)?.to_vec()))
}

/// The path an op of the plan is known by in `ours.pending`.
fn op_key(op: &Op) -> Option<Vec<u8>> {
    match op {
        Op::Rename { from, .. } | Op::Link { from, .. } => Some(from.as_bytes().to_vec()),
        op => op.path().map(|p| p.as_bytes().to_vec()),
    }
}

impl Touched {
    /// Watches from `next` on, knowing the plan's own ops that `reintegration/ours` lists.
    fn open(m: &MirrorShared, vol: &Volume, next: u64) -> Result<Touched> {
        let path = dir_of(m).join("ours");
        let mut file = fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut b)
            .with_context(|| format!("cannot read {}", path.display()))?;
        // A torn last entry (a crash mid-append) is dropped.
        let ours: HashSet<u64> = b
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        if b.len() % 8 != 0 {
            file.set_len((b.len() - b.len() % 8) as u64)?;
        }
        let ppath = dir_of(m).join("ours.pending");
        let mut pending_file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&ppath)
            .with_context(|| format!("cannot open {}", ppath.display()))?;
        let mut p = Vec::new();
        std::io::Read::read_to_end(&mut pending_file, &mut p)
            .with_context(|| format!("cannot read {}", ppath.display()))?;
        let pending = decode_pending(&p).filter(|(bound, _)| !ours.iter().any(|s| s >= bound));
        Ok(Touched {
            next,
            names: HashSet::new(),
            ours,
            last: None,
            everything: false,
            file,
            pending_file,
            pending,
            opened_end: vol.opened_end,
            failed: None,
        })
    }

    /// Before an op of the plan is applied: what `ours.pending` says of it (not fsynced, like
    /// `ours`).
    fn intend(&mut self, vol: &Volume, op: &Op) {
        let Some(key) = op_key(op) else { return };
        let bound = lock(&vol.order).journal.next_seq();
        let mut b = Vec::with_capacity(12 + key.len());
        b.extend_from_slice(&bound.to_le_bytes());
        b.extend_from_slice(&(key.len() as u32).to_le_bytes());
        b.extend_from_slice(&key);
        if let Err(e) = std::os::unix::fs::FileExt::write_all_at(&self.pending_file, &b, 0) {
            self.failed.get_or_insert(e);
        }
    }

    /// **R4**: `seq` is one of the plan's own ops. Appended, not fsynced: it survives a crash of
    /// the process; after a power loss a lost entry only makes a re-run step take its own earlier
    /// effect for a late change of ours (an extra conflict copy or a kept entry, listed; nothing
    /// is lost).
    fn own(&mut self, seq: u64) {
        self.ours.insert(seq);
        if let Err(e) = self.file.write_all(&seq.to_le_bytes()) {
            self.failed.get_or_insert(e);
        }
    }

    /// Reads the journal up to its end, then: did a change after the plan name `p` or a path
    /// below it?
    fn named(&mut self, vol: &Volume, p: &RelPath) -> Result<bool> {
        if !self.everything {
            if let Err(e) = self.read(vol) {
                tracing::warn!("reintegration: cannot read this primary's newest changes ({e:#}); from now on every name counts as changed since the plan");
                self.everything = true;
            }
        }
        if self.everything {
            return Ok(true);
        }
        let last = self.last.iter().flat_map(|(_, n)| n.iter());
        Ok(self.names.iter().chain(last).any(|q| q.starts_with(p)))
    }

    fn read(&mut self, vol: &Volume) -> Result<()> {
        let end = lock(&vol.order).journal.next_seq() - 1;
        let mut reader: Reader<crate::site::store::FileSegment> = Reader::new(self.next);
        while reader.next_seq() <= end {
            let view = lock(&vol.order).journal.segment_for(reader.next_seq());
            let Some(r) = reader.next::<FileStore>(view, end)? else {
                break;
            };
            self.next = r.seq + 1;
            // An op and its `Abort` are appended under one hold of the order lock.
            if let Op::Abort { seq } = r.op {
                if self.last.as_ref().is_some_and(|(s, _)| *s == seq) {
                    self.last = None;
                }
                continue;
            }
            if let Some((_, names)) = self.last.take() {
                self.names.extend(names);
            }
            if self.ours.contains(&r.seq) {
                continue;
            }
            if let Some((bound, key)) = &self.pending {
                if r.seq >= *bound
                    && r.seq <= self.opened_end
                    && op_key(&r.op).as_deref() == Some(key.as_slice())
                {
                    self.pending = None;
                    self.own(r.seq);
                    continue;
                }
            }
            let paths: Vec<RelPath> = match &r.op {
                Op::Rename { from, to, .. } | Op::Link { from, to } => {
                    vec![from.clone(), to.clone()]
                }
                Op::Sync { .. } | Op::SyncDone { .. } | Op::GroupBegin | Op::GroupEnd => vec![],
                // Times follow every change; alone they change nothing a user made.
                Op::SetTimes { .. } => vec![],
                op => op.path().into_iter().cloned().collect(),
            };
            self.last = Some((r.seq, paths));
        }
        if self.names.len() > TOUCHED_MAX {
            self.everything = true;
        }
        Ok(())
    }
}

/// `MIRROR_STATE/reintegration/plan`, if there is an intact one.
fn load_plan(m: &MirrorShared) -> Result<Option<SavedPlan>> {
    let path = dir_of(m).join("plan");
    match fs::read(&path) {
        Ok(b) => match decode_plan(&b) {
            Ok(s) => Ok(Some(s)),
            Err(e) => {
                tracing::warn!("{}: {e}; planning again", path.display());
                Ok(None)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot read {}", path.display()))),
    }
}

/// **R1**: the plan is durable (file and directory fsynced) before its first step runs, and a
/// fresh plan starts with no cursor.
fn save_plan(m: &MirrorShared, s: &SavedPlan) -> Result<()> {
    let dir = dir_of(m);
    statefile::private_dir(&dir)?;
    for f in ["cursor", "moves", "ours", "ours.pending"] {
        let _ = fs::remove_file(dir.join(f));
    }
    statefile::replace_durable(&dir.join("plan"), &encode_plan(s), 0o600)
        .with_context(|| format!("cannot save the reintegration plan in {}", dir.display()))
}

/// The test hook (`MIRRORFS_FAILPOINT=reintegrated-plan-kept`): the daemon has confirmed the
/// reintegration and the plan is not yet removed; the process waits to be killed there.
fn failpoint_before_plan_removed(m: &MirrorShared) {
    if std::env::var("MIRRORFS_FAILPOINT").as_deref() != Ok("reintegrated-plan-kept") {
        return;
    }
    tracing::warn!(
        "mirror {}: MIRRORFS_FAILPOINT=reintegrated-plan-kept: reintegrated, the plan not yet removed; waiting to be killed",
        m.name
    );
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A plan left by a crash after the daemon confirmed its reintegration (it now follows this
/// primary, so no reintegration with it is pending): removed at the next handshake that the
/// daemon answers with `Welcome`. Until then it would stay for good: only a reintegration reads
/// it, and a later one makes its own.
pub fn forget_finished_plan(m: &MirrorShared) {
    if !dir_of(m).join("plan").exists() {
        return;
    }
    match remove_plan(m) {
        Ok(()) => tracing::info!(
            "mirror {}: removed the plan of a reintegration it confirmed before a crash here",
            m.name
        ),
        Err(e) => tracing::warn!(
            "mirror {}: cannot remove the plan of a finished reintegration: {e:#}",
            m.name
        ),
    }
}

fn remove_plan(m: &MirrorShared) -> Result<()> {
    let dir = dir_of(m);
    for f in ["cursor", "moves", "ours", "ours.pending", "plan"] {
        match fs::remove_file(dir.join(f)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    statefile::sync_parent(&dir.join("plan"))?;
    Ok(())
}

/// (write generation, steps done) of plan `id`.
fn read_cursor(m: &MirrorShared, id: u64) -> Result<(u64, u64)> {
    match fs::read(dir_of(m).join("cursor")) {
        Ok(b) => Ok(decode_cursor(&b, id).unwrap_or((0, 0))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((0, 0)),
        Err(e) => Err(e.into()),
    }
}

/// The step cursor: two slots written alternately.
struct CursorFile {
    f: fs::File,
    id: u64,
    generation: u64,
}

impl CursorFile {
    fn open(m: &MirrorShared, id: u64, generation: u64) -> Result<CursorFile> {
        let path = dir_of(m).join("cursor");
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        f.set_len(2 * CURSOR_SLOT_BYTES as u64)?;
        f.sync_all()?;
        statefile::sync_parent(&path)?;
        Ok(CursorFile { f, id, generation })
    }

    /// **R2**: `done` steps are complete, durable before the next step starts. A failed fsync
    /// ends the run (the next connection re-reads the cursor, never trusting this write).
    fn write(&mut self, done: u64) -> Result<()> {
        self.generation += 1;
        let at = (cursor_slot(self.generation) * CURSOR_SLOT_BYTES) as u64;
        self.f.seek(SeekFrom::Start(at))?;
        self.f
            .write_all(&encode_cursor(self.generation, self.id, done))?;
        self.f
            .sync_data()
            .context("cannot make the reintegration cursor durable")
    }
}

/// The run's late moves (`reintegration/moves`), appended and fsynced each (**R3**).
struct MovesFile {
    f: fs::File,
    path: PathBuf,
}

impl MovesFile {
    fn open(m: &MirrorShared) -> Result<MovesFile> {
        let path = dir_of(m).join("moves");
        let f = fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        statefile::sync_parent(&path)?;
        Ok(MovesFile { f, path })
    }

    fn read(&mut self) -> Result<Vec<(RelPath, RelPath)>> {
        let b = fs::read(&self.path)?;
        Ok(decode_moves(&b))
    }

    /// **R3**: a late move is durable before the run goes on (later steps follow it).
    fn append(&mut self, from: &RelPath, to: &RelPath) -> Result<()> {
        self.f.write_all(&encode_move(from, to))?;
        self.f
            .sync_data()
            .context("cannot make the reintegration's late moves durable")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A long quiet step (planning a large tree) is accompanied by pings, and they stop with it.
    #[test]
    fn a_long_quiet_step_keeps_pinging() {
        let pings = AtomicU32::new(0);
        let ping = || {
            pings.fetch_add(1, Ordering::Relaxed);
            Ok(())
        };
        let r = with_keepalive(ping, Duration::from_millis(20), || {
            std::thread::sleep(Duration::from_millis(300));
            7
        });
        assert_eq!(r, 7);
        let n = pings.load(Ordering::Relaxed);
        assert!(n >= 3, "{n} pings during 300 ms at one per 20 ms");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(pings.load(Ordering::Relaxed), n, "no ping after the step");
    }

    #[test]
    fn a_failed_ping_stops_the_pinging_not_the_work() {
        let pings = AtomicU32::new(0);
        let ping = || {
            pings.fetch_add(1, Ordering::Relaxed);
            Err(std::io::Error::other("the connection is gone"))
        };
        let r = with_keepalive(ping, Duration::from_millis(10), || {
            std::thread::sleep(Duration::from_millis(100));
            "done"
        });
        assert_eq!(r, "done");
        assert_eq!(pings.load(Ordering::Relaxed), 1);
    }
}
