//! A verify connection: `mirrorfs verify MOUNT --mirror mirror://HOST:PORT` asks the daemon for
//! its own scan of DIR (`Msg::Verify` instead of `Hello`, same pinned mutual-TLS identity), so
//! only hashes cross the link, never file data. The daemon scans DIR with `tree::scan` (beneath
//! DIR, never following symlinks, its state directory skipped) using its own hash cache
//! (`STATE/verify/dir.cache`), and streams the entries back in `Scan` batches of at most
//! [`SCAN_ENTRIES_MAX`] entries and [`BATCH_BYTES`] bytes, then `ScanEnd` with how much file
//! data it read. The primary compares (`core::verify::compare`). An incremental verify sends a
//! plan with its `Verify` (the paths the primary's journal changed since that mirror's last
//! verify, and those that still differed): the daemon then scans only those
//! (`tree::scan::scan_plan`), so only their hashes cross the link.
//!
//! Bounds: one verify at a time (a second is refused `BUSY`), only for the volume DIR holds
//! (else `VOLUME`); the scan itself is bounded by `tree::scan::MAX_ENTRIES`. It does not take
//! the primary's place: a connected primary keeps streaming while a verify runs.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};
use mirrorfs_core::path::RelPath;
use mirrorfs_core::verify::incremental::Scope;
use mirrorfs_core::wire::{error_code, scan_entry_bytes, Msg, BATCH_BYTES, SCAN_ENTRIES_MAX};

use crate::net::conn::Duplex;
use crate::site::volume::lock;
use crate::tree::hashcache::HashCache;
use crate::tree::scan;

use super::Daemon;

impl Daemon {
    /// Answers a `Verify` request on an authenticated connection (see the module's comment).
    pub(super) fn answer_verify(
        &self,
        link: &Duplex,
        volume_id: [u8; 16],
        no_cache: bool,
        plan: Option<&[(RelPath, Scope)]>,
    ) -> Result<()> {
        let held = lock(&self.meta).volume_id();
        if held != volume_id {
            let message = "this mirror daemon holds another volume than the mount asking to verify it (check the --mirror address)".to_string();
            let _ = link.send(&Msg::Error {
                code: error_code::VOLUME,
                message: message.clone(),
            });
            bail!("refused a verify: {message}");
        }
        if self.verifying.swap(true, Ordering::AcqRel) {
            let _ = link.send(&Msg::Error {
                code: error_code::BUSY,
                message: "another verify of this mirror is running; try again once it is done"
                    .into(),
            });
            bail!("refused a verify: another one is running");
        }
        let _one = Verifying(&self.verifying);
        let applied = self.m.applied.load(Ordering::Acquire);
        let cache_path = self.state.join("verify").join("dir.cache");
        let mut cache = if no_cache {
            HashCache::default()
        } else {
            let (c, problem) = HashCache::load(&cache_path);
            if let Some(p) = problem {
                tracing::warn!("verify: hash cache: {p}");
            }
            c
        };
        let skip = (!self.reserved.is_empty()).then_some(self.reserved.as_slice());
        let scanned = match plan {
            None => scan::scan(&self.dir, skip, &mut cache, &mut ()),
            Some(plan) => scan::scan_plan(&self.dir, skip, plan, &mut cache, &mut ()),
        };
        let entries = match scanned {
            Ok(e) => e,
            Err(e) => {
                let message = format!("cannot scan {}: {e}", self.dir.display());
                let _ = link.send(&Msg::Error {
                    code: error_code::STORAGE,
                    message: message.clone(),
                });
                bail!("verify: {message}");
            }
        };
        if !no_cache {
            // A scan of part of the tree keeps the other hashes too.
            if plan.is_some() {
                cache.keep_unseen();
            }
            if let Err(e) = cache.save(&cache_path) {
                tracing::warn!(
                    "verify: cannot save the hash cache {}: {e}",
                    cache_path.display()
                );
            }
        }
        let count = entries.len() as u64;
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        for e in entries {
            let n = scan_entry_bytes(&e);
            if !batch.is_empty() && (batch.len() >= SCAN_ENTRIES_MAX || bytes + n > BATCH_BYTES) {
                link.send(&Msg::Scan {
                    entries: std::mem::take(&mut batch),
                })?;
                bytes = 0;
            }
            bytes += n;
            batch.push(e);
        }
        if !batch.is_empty() {
            link.send(&Msg::Scan { entries: batch })?;
        }
        link.send(&Msg::ScanEnd {
            count,
            bytes_read: cache.bytes_read,
            cache_hits: cache.hits,
            applied,
        })?;
        tracing::info!(
            "verify: sent the scan of {} ({count} entries; {} bytes of file data read, {} hashes from the cache)",
            self.dir.display(),
            cache.bytes_read,
            cache.hits
        );
        Ok(())
    }
}

/// Marks a verify running for as long as it lives (one at a time).
struct Verifying<'a>(&'a AtomicBool);

impl Drop for Verifying<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}
