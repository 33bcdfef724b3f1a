//! How a copy starts or changes hands: adopting a primary's history, settling the journal, and
//! beginning an initial copy or a block-hash resync (the journal restarted at the primary's
//! position, the copy marked as syncing before anything is written).

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mirrorfs_core::history::History;
use mirrorfs_core::journal::Journal;
use mirrorfs_core::link::hex;
use mirrorfs_core::session::Session;
use mirrorfs_core::wire::Msg;

use crate::net::conn::Duplex;
use crate::site::meta::{write_meta, CopyState, Meta};
use crate::site::store::FileStore;
use crate::site::volume::{self, lock, MirrorPhase};

use super::Daemon;

impl Daemon {
    /// Waits until the journal is durable through its end, so `durable` is exactly where the
    /// primary must resume (records past it would otherwise be neither durable nor replaceable).
    /// Ends early when the session is told to (`ending`: displaced by the primary's new
    /// connection, which waits for it).
    pub(super) fn settle_journal(&self, ending: &AtomicBool) -> Result<()> {
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
            self.vol.wake_flusher();
            if ending.load(Ordering::Acquire) {
                bail!("told to end while waiting for the journal to become durable");
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the journal did not become durable within 30 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// After an accepted resume: an old primary's tree gets its cursor at its end and an
    /// applier, and the copy takes the primary's history (an ancestor adopts newer generations).
    pub(super) fn adopt(&self, history: &History, seq: u64) -> Result<()> {
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
    pub(super) fn begin_initial_copy(
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
        self.restart_for_copy(seq, sync_id)?;
        *lock(&self.m.phase) = MirrorPhase::Syncing {
            done_bytes: 0,
            total_bytes: 0,
        };
        Ok(())
    }

    /// The journal restarts at `seq` (the copy's first record; F1 durable before this returns),
    /// nothing before it is durable or settled any more, and a worker applies copy `sync_id`
    /// from there (idempotently, until its `SyncDone`).
    fn restart_for_copy(&self, seq: u64, sync_id: u32) -> Result<()> {
        lock(&self.vol.order).journal.restart_at(seq)?;
        {
            let mut p = lock(&self.vol.progress);
            p.durable_seq = seq - 1;
            p.settled_seq = seq - 1;
        }
        let mut ap = volume::new_applier_at(&self.m, seq - 1)?;
        ap.set_syncing(Some(sync_id));
        self.start_worker(ap)
    }

    /// A block-hash resync: keep the tree, restart the journal at `seq`, send the manifest;
    /// the primary then streams only what differs, applied idempotently until its `SyncDone`.
    pub(super) fn begin_resync(
        &self,
        link: &Duplex,
        seq: u64,
        sync_id: u32,
        history: &History,
    ) -> Result<()> {
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
        self.restart_for_copy(seq, sync_id)?;
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
}
