//! One site engine for both roles: a site is its state directory, its journal, the flusher that
//! makes the journal durable, the workers that apply it to trees, and its recovery after a crash.
//! The primary (`mirrorfs mount`) and a mirror daemon (`mirrorfs serve`) open the same [`Site`]
//! in two [`Role`]s; what differs between them is said here, once:
//!
//! | | primary | mirror daemon |
//! |---|---|---|
//! | who assigns seqs | its sequencer, for changes made through the mount | the primary; records are appended at their seqs |
//! | `--ack` / quorum | as given | `async`, 1 (the daemon's own acks are its session's) |
//! | settled at start | the journal's end, once the in-doubt last record is resolved against the backing | the journal's end if its last record is an `Abort` (or it is an old primary's journal), else one before it: the primary decides the last record's fate |
//! | crash recovery | resolve the in-doubt record against the backing tree, journal the backing's times, fsync the journal | fsync the journal (the position it reports must be durable) |
//! | workers | one per local mirror | one, applying to its own directory, checkpointing when idle |
//!
//! The shells around it (FUSE and the links for the primary, the listener and the session for the
//! daemon) only start and stop threads and move bytes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mirrorfs_core::group::Gate;
use mirrorfs_core::journal::storage::SegmentFile;
use mirrorfs_core::journal::{Journal, JournalConfig};
use mirrorfs_core::op::Record;
use mirrorfs_core::session;

use crate::site::state_dir::StateDir;
use crate::site::store::FileStore;
use crate::site::volume::{lock, AckMode, FsyncWaits, MirrorShared, Ordered, Progress, Volume};
use crate::site::{boot, store};
use crate::tree::dirtree::DirTree;

/// What a site is for (see the module's table).
#[derive(Clone, Debug)]
pub enum Role {
    /// Serves a mount over `backing`; its changes are ordered by its sequencer and streamed.
    Primary {
        backing: PathBuf,
        ack: AckMode,
        quorum: usize,
        fsync_waits: FsyncWaits,
    },
    /// Takes a primary's records at their seqs (`mirrorfs serve`). `former_primary`: the
    /// directory is an old primary's backing, whose tree holds everything its journal does.
    Mirror { former_primary: bool },
}

/// A site's state at start, before any thread runs.
pub struct Opening {
    /// The run before this one stopped cleanly (`STATE/clean`).
    pub clean: bool,
    /// The machine lost power since the last run (`boot::power_lost`): cursors trust only their
    /// checkpoints.
    pub power_loss: bool,
    /// The journal's last seq when it was opened (0 when empty).
    pub horizon: u64,
    /// The first seq the journal still holds.
    pub first_held: u64,
    /// The journal's last record as recovered.
    pub last: Option<Record>,
}

/// A running site: its volume (order lock, journal, progress) and the threads it started.
pub struct Site {
    pub vol: Arc<Volume>,
    pub state: StateDir,
    pub opening: Opening,
    threads: Vec<JoinHandle<()>>,
}

impl Volume {
    /// A volume over `journal` (whose recovered last record is `last`) for `role`, settled as the
    /// role says (see the module's table).
    pub fn new(
        journal: Journal<FileStore>,
        last: Option<&Record>,
        mirrors: Vec<Arc<MirrorShared>>,
        role: &Role,
    ) -> Self {
        let horizon = journal.next_seq() - 1;
        let (ack, quorum, fsync_waits, durable, settled) = match role {
            Role::Primary {
                ack,
                quorum,
                fsync_waits,
                ..
            } => (*ack, *quorum, *fsync_waits, horizon, horizon),
            // Nothing is reported durable before `Site::open` fsyncs what was recovered.
            Role::Mirror { former_primary } => (
                AckMode::Async,
                1,
                FsyncWaits::Mode,
                0,
                session::settled_at_start(horizon, last, *former_primary),
            ),
        };
        // A mirror daemon's copy may have diverged: its records are kept until a session
        // streams (see `retain_after`).
        let retain_after = match role {
            Role::Primary { .. } => u64::MAX,
            Role::Mirror { .. } => journal.first_seq().saturating_sub(1),
        };
        Volume {
            order: Mutex::new(Ordered::new(journal)),
            progress: Mutex::new(Progress {
                durable_seq: durable,
                settled_seq: settled,
                ..Progress::default()
            }),
            changed: Condvar::new(),
            flush_wake: Condvar::new(),
            mirrors,
            ack,
            quorum,
            fsync_waits,
            settled: AtomicU64::new(settled),
            holes_epoch: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            fence: std::sync::OnceLock::new(),
            retain_after: AtomicU64::new(retain_after),
            opened_end: horizon,
            view: std::sync::OnceLock::new(),
            tokens: std::sync::OnceLock::new(),
            links: std::sync::OnceLock::new(),
            reconcile: std::sync::OnceLock::new(),
            peer_receive: std::sync::OnceLock::new(),
            receiving_copy: AtomicBool::new(false),
            groups: Mutex::new(Gate::default()),
            sync_groups: std::sync::OnceLock::new(),
            resync: std::sync::OnceLock::new(),
            verify_changes: std::sync::OnceLock::new(),
        }
    }

    /// Fsyncs every journal segment not yet durable, outside the flusher (at start, and when a
    /// mirror daemon reopens its journal), and publishes the journal's end as durable. Returns
    /// that end.
    pub fn sync_journal(&self) -> Result<u64> {
        let mut o = lock(&self.order);
        if let Some(plan) = o.journal.sync_plan() {
            for (sid, f, _) in &plan.files {
                f.sync()
                    .with_context(|| format!("fsync of journal segment {sid} failed"))?;
            }
            o.journal.mark_synced(&plan);
        }
        let end = o.journal.next_seq() - 1;
        drop(o);
        lock(&self.progress).durable_seq = end;
        Ok(end)
    }
}

impl Site {
    /// Opens the site in `state` (already locked by the caller) for `role`: the journal with its
    /// recovery, the volume, crash recovery as the role needs it, then the flusher. Mirrors'
    /// workers are started by the caller ([`Site::spawn`]) once their cursors are open, and
    /// then [`Site::record_boot`].
    pub fn open(
        state: StateDir,
        role: &Role,
        journal_max_mib: u64,
        mirrors: Vec<Arc<MirrorShared>>,
    ) -> Result<Site> {
        let clean = state.is_clean();
        let power_loss = boot::power_lost(state.path());
        let store = store::FileStore::open(&state.journal_dir())?;
        let cfg = JournalConfig {
            journal_bytes_max: journal_max_mib << 20,
            ..JournalConfig::default()
        };
        let (journal, report) = Journal::open(store, cfg)
            .with_context(|| format!("cannot open the journal in {}", state.path().display()))?;
        if report.torn_bytes > 0 || report.dropped_segments > 0 {
            tracing::warn!(
                "journal recovery: cut a torn tail of {} bytes and {} unsynced segments",
                report.torn_bytes,
                report.dropped_segments
            );
        }
        tracing::info!(
            "journal: {} records in {} segments, next seq {}",
            report.records,
            report.segments,
            journal.next_seq()
        );
        let opening = Opening {
            clean,
            power_loss,
            horizon: journal.next_seq() - 1,
            first_held: journal.first_seq(),
            last: report.last,
        };
        let vol = Arc::new(Volume::new(journal, opening.last.as_ref(), mirrors, role));
        let mut site = Site {
            vol,
            state,
            opening,
            threads: Vec::new(),
        };
        if let Role::Primary { backing, .. } = role {
            site.recover_backing(backing)?;
        }
        site.vol.open_groups(matches!(role, Role::Primary { .. }))?;
        // Records that survived a crash may not have been fsynced: durable now, so what the site
        // reports (to the primary, to `status`) is honest. Named F2 in docs/journal.md.
        site.sync_journal()?;
        let v = site.vol.clone();
        site.spawn("flusher", move || v.run_flusher())?;
        Ok(site)
    }

    /// After a crash, the journal's last record may not have reached the backing tree: it is
    /// resolved (settled, or aborted with a durable `Abort`) before any mirror may look at it,
    /// and the backing's times of the entries the held records touched are journaled so that
    /// mirrors carry them.
    fn recover_backing(&mut self, backing: &Path) -> Result<()> {
        let Some(last) = self.opening.last.clone() else {
            return Ok(());
        };
        if self.opening.clean {
            return Ok(());
        }
        let mut bt = DirTree::open(backing)?;
        self.vol.resolve_in_doubt(&mut bt, &last)?;
        let first = self.opening.first_held;
        let timed = self.vol.record_backing_times(&bt, first)?;
        if timed > 0 {
            tracing::info!(
                "after the crash: journaled the backing's times of {timed} entries changed by the last {} records, so mirrors carry them",
                last.seq.saturating_sub(first) + 1
            );
        }
        Ok(())
    }

    /// Makes the recovered journal durable; if recovery appended (an `Abort`, the backing's
    /// times), its end is settled too.
    fn sync_journal(&self) -> Result<()> {
        let end = self.vol.sync_journal()?;
        if end > self.opening.horizon {
            lock(&self.vol.progress).settled_seq = end;
            self.vol.settled.fetch_max(end, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Every cursor has taken a power loss into account: from now on this boot is the one the
    /// site runs in, and the run is not clean until it stops (S5 in docs/journal.md).
    pub fn record_boot(&self) -> Result<()> {
        boot::record_boot(self.state.path())
    }

    /// Starts a named thread that belongs to the site: joined by [`Site::stop`].
    pub fn spawn(&mut self, name: &str, f: impl FnOnce() + Send + 'static) -> Result<()> {
        let t = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(f)
            .with_context(|| format!("cannot start the {name} thread"))?;
        self.threads.push(t);
        Ok(())
    }

    /// Stops the site: workers checkpoint, the flusher makes the journal durable and exits; every
    /// thread is joined. The run is clean (S1) unless the journal was poisoned.
    pub fn stop(self) -> Result<()> {
        self.vol.set_stopping();
        for t in self.threads {
            let _ = t.join();
        }
        if self.vol.poisoned.load(Ordering::Acquire) {
            tracing::error!(
                "the journal was poisoned during this run: the next start recovers as after a crash"
            );
            return Ok(());
        }
        self.state.set_clean()?;
        Ok(())
    }

    /// [`stop`](Self::stop) with a deadline: the site's threads (the flusher, workers it
    /// started) get `limit` to end. A thread still running then is left behind (the process is
    /// about to exit) and named in the answer, and the run is not marked clean, so the next start
    /// recovers as after a crash (S1 in docs/journal.md); nor is it when `others_ended` is false
    /// (a thread of the caller's that belongs to the site, e.g. a daemon's applier, did not end).
    /// `Ok(names)`: the threads left behind (empty: a clean stop, unless the journal was
    /// poisoned).
    pub fn stop_within(self, limit: Duration, others_ended: bool) -> Result<Vec<String>> {
        self.vol.set_stopping();
        let t0 = Instant::now();
        while self.threads.iter().any(|t| !t.is_finished()) && t0.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut left = Vec::new();
        for t in self.threads {
            if t.is_finished() {
                let _ = t.join();
            } else {
                left.push(t.thread().name().unwrap_or("unnamed").to_string());
            }
        }
        if !left.is_empty() || !others_ended {
            return Ok(left);
        }
        if self.vol.poisoned.load(Ordering::Acquire) {
            tracing::error!(
                "the journal was poisoned during this run: the next start recovers as after a crash"
            );
            return Ok(left);
        }
        self.state.set_clean()?;
        Ok(left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrorfs_core::op::Op;
    use mirrorfs_core::path::RelPath;

    fn mkdir(name: &str) -> Op {
        Op::Mkdir {
            path: RelPath::new(name).expect("path"),
            mode: 0o755,
            uid: 0,
            gid: 0,
        }
    }

    /// A journal in `dir` holding `ops`, reopened so that its last record is recovered.
    fn journal_with(dir: &Path, ops: &[Op]) -> (Journal<FileStore>, Option<Record>) {
        let store = FileStore::open(dir).expect("store");
        let (mut j, _) = Journal::open(store, JournalConfig::default()).expect("open");
        for op in ops {
            j.append(op).expect("append");
        }
        if let Some(plan) = j.sync_plan() {
            for (_, f, _) in &plan.files {
                f.sync().expect("sync");
            }
            j.mark_synced(&plan);
        }
        drop(j);
        let store = FileStore::open(dir).expect("store");
        let (j, report) = Journal::open(store, JournalConfig::default()).expect("reopen");
        (j, report.last)
    }

    fn settled(vol: &Volume) -> (u64, u64, u64) {
        let p = lock(&vol.progress);
        (
            vol.settled.load(Ordering::Acquire),
            p.settled_seq,
            p.durable_seq,
        )
    }

    #[test]
    fn a_primary_starts_settled_at_its_journal_end() {
        let d = tempfile::tempdir().expect("tempdir");
        let (j, last) = journal_with(d.path(), &[mkdir("a"), mkdir("b")]);
        let role = Role::Primary {
            backing: d.path().to_path_buf(),
            ack: AckMode::Sync,
            quorum: 2,
            fsync_waits: FsyncWaits::Quorum,
        };
        let vol = Volume::new(j, last.as_ref(), Vec::new(), &role);
        assert_eq!(settled(&vol), (2, 2, 2));
        assert_eq!((vol.ack, vol.quorum), (AckMode::Sync, 2));
    }

    #[test]
    fn a_mirror_leaves_its_last_record_to_the_primary_unless_it_is_an_abort() {
        let mirror = Role::Mirror {
            former_primary: false,
        };
        let d = tempfile::tempdir().expect("tempdir");
        let (j, last) = journal_with(d.path(), &[mkdir("a"), mkdir("b")]);
        let vol = Volume::new(j, last.as_ref(), Vec::new(), &mirror);
        // Record 2 may still be aborted by the primary; nothing is durable before the fsync.
        assert_eq!(settled(&vol), (1, 1, 0));
        assert_eq!((vol.ack, vol.quorum), (AckMode::Async, 1));

        let d = tempfile::tempdir().expect("tempdir");
        let (j, last) = journal_with(d.path(), &[mkdir("a"), Op::Abort { seq: 1 }]);
        let vol = Volume::new(j, last.as_ref(), Vec::new(), &mirror);
        assert_eq!(settled(&vol).0, 2);

        let d = tempfile::tempdir().expect("tempdir");
        let (j, last) = journal_with(d.path(), &[mkdir("a"), mkdir("b")]);
        let old_primary = Role::Mirror {
            former_primary: true,
        };
        let vol = Volume::new(j, last.as_ref(), Vec::new(), &old_primary);
        assert_eq!(settled(&vol).0, 2);
    }
}
