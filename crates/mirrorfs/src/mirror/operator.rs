//! An operator's resync of a running local mirror (`mirrorfs resync`, `verify --repair`): the
//! remote mirrors' block-hash resync (`mirror::resync`) applied to a local one, so a mirror
//! changed behind mirrorfs's back is brought back through the journal, ordered with live
//! writes, copying only what differs:
//!
//! 1. the request arrives as the mount root's attribute `user.mirrorfs.resync` (value
//!    `keep-extra PATH` or `delete-extra PATH`), handed to [`start`] through `Volume::resync`;
//! 2. the mirror's worker is asked to apply the resync's `Sync` records from its next turn
//!    ([`take_request`]); the resync waits until it did, so none is skipped;
//! 3. the mirror's manifest is made locally (`resync::manifest`: block hashes of its files);
//!    unless `delete-extra`, the entries the primary does not have are left out of it, so the
//!    resync never removes them (they stay, and `verify` keeps reporting them);
//! 4. `resync::live_resync` journals what differs; once the mirror applied its `SyncDone`,
//!    [`copy_done`] counts it done.
//!
//! Not made durable: if the mount stops before the `SyncDone` is applied, the mirror keeps what
//! it applied so far and resumes from its cursor (no re-copy at the next mount); `verify` shows
//! what is left and `--repair` can be run again.
//!
//! A network mirror (`mirror://HOST:PORT`) is resynced by its link (`net::remote`), the way a
//! mirror whose journal position is lost is: [`start`] only records the request; the link ends
//! its connection at its next round, and the next handshake asks the daemon for a block-hash
//! resync (its manifest, then `resync::live_resync`). Unless `delete-extra`, the entries of
//! the daemon's manifest the primary does not have are left out of it first
//! ([`leave_out_extras`]), so they are kept as on a local mirror. The request is taken
//! ([`remote_accepted`]) once the resync's copy started, and done ([`remote_applied`]) once
//! the daemon applied all of it; a failed copy says why ([`remote_failed`]). In memory only,
//! like a local one: a mount that stops first forgets it (`verify --repair` again).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirrorfs_core::applier::Applier;
use mirrorfs_core::path::RelPath;

use crate::mirror::resync::{live_resync, manifest, Manifest};
use crate::site::volume::{lock, MirrorPhase, MirrorShared, Volume};

/// How long the request waits for the mirror's worker to take it.
const ACCEPT_WAIT: Duration = Duration::from_secs(30);

/// Parses `keep-extra PATH` / `delete-extra PATH`.
pub fn parse_request(v: &[u8]) -> Option<(bool, PathBuf)> {
    let i = v.iter().position(|b| *b == b' ')?;
    let delete = match &v[..i] {
        b"keep-extra" => false,
        b"delete-extra" => true,
        _ => return None,
    };
    let p = &v[i + 1..];
    (!p.is_empty()).then(|| (delete, PathBuf::from(std::ffi::OsStr::from_bytes(p))))
}

/// Starts a resync of the mirror the request names (a local mirror's path, or a network
/// mirror's `mirror://HOST:PORT`). Refused with `ENOENT` (no such mirror), `EBUSY` (one is
/// running, or the mirror is being copied or is not live) or `EINVAL`.
pub fn start(
    vol: &Arc<Volume>,
    backing: PathBuf,
    hidden: Vec<u8>,
    request: &[u8],
) -> Result<(), i32> {
    let (delete_extra, path) = parse_request(request).ok_or(libc::EINVAL)?;
    let m = vol
        .mirrors
        .iter()
        .find(|m| m.path == path)
        .cloned()
        .ok_or(libc::ENOENT)?;
    if !matches!(*lock(&m.phase), MirrorPhase::Live) {
        return Err(libc::EBUSY);
    }
    {
        let mut r = lock(&m.operator_resync);
        if r.running {
            return Err(libc::EBUSY);
        }
        r.running = true;
        r.asked = true;
        r.accepted = false;
        r.error = None;
        r.delete_extra = delete_extra;
    }
    vol.changed.notify_all();
    if m.remote.is_some() {
        // The link takes it from here (see the module docs).
        return Ok(());
    }
    let v = vol.clone();
    let spawned = std::thread::Builder::new()
        .name("resync".into())
        .spawn(move || {
            if let Err(e) = run(&v, &backing, &hidden, &m, delete_extra) {
                tracing::error!("mirror {}: resync failed: {e}", m.name);
                let mut r = lock(&m.operator_resync);
                r.running = false;
                r.asked = false;
                r.error = Some(e.to_string());
                drop(r);
                v.changed.notify_all();
            }
        });
    spawned.map(drop).map_err(|_| libc::EAGAIN)
}

/// The worker's side, once per turn: takes a pending request (its applier applies the resync's
/// `Sync` records from now on).
pub fn take_request(m: &MirrorShared, applier: &mut Applier) {
    let mut r = lock(&m.operator_resync);
    if r.accepted && !r.running {
        // The resync failed before its `SyncDone`: what it journaled and this mirror has not
        // applied yet is skipped, and the mirror goes on as before (`verify` shows what is left).
        r.accepted = false;
        if applier.syncing() == Some(crate::mirror::sync_id(m)) {
            applier.set_syncing(None);
            *lock(&m.phase) = MirrorPhase::Live;
        }
        return;
    }
    if r.asked && !r.accepted {
        applier.set_syncing(Some(crate::mirror::sync_id(m)));
        r.accepted = true;
        *lock(&m.phase) = MirrorPhase::Syncing {
            done_bytes: 0,
            total_bytes: 0,
        };
    }
}

/// The worker applied a copy's `SyncDone` (`error`: its checkpoint failed).
pub fn copy_done(m: &MirrorShared, error: Option<&str>) {
    let mut r = lock(&m.operator_resync);
    r.done += 1;
    if r.running {
        r.running = false;
        r.asked = false;
        r.accepted = false;
        r.error = error.map(str::to_string);
    }
}

/// Whether the primary has an entry at `p` (of any kind: one of another kind is replaced by the
/// resync, not kept).
fn on_primary(primary: BorrowedFd<'_>, p: &RelPath) -> bool {
    p.is_root() || crate::tree::dirtree::lstat_in(primary, p).is_ok()
}

fn log_kept(m: &MirrorShared, kept: u64) {
    if kept > 0 {
        tracing::warn!(
            "mirror {}: resync keeps {kept} entries only the mirror has (delete-extra removes them)",
            m.name
        );
    }
}

/// A network mirror's pending request, if the link has not taken it yet: its `delete_extra`.
pub fn remote_pending(m: &MirrorShared) -> Option<bool> {
    let r = lock(&m.operator_resync);
    (r.running && r.asked && !r.accepted).then_some(r.delete_extra)
}

/// The link received the daemon's manifest for a resync: unless the request says
/// `delete-extra`, the entries the primary does not have are left out of it (so the resync
/// keeps them).
pub fn leave_out_extras(m: &MirrorShared, backing: &Path, mf: &mut Manifest) -> io::Result<()> {
    if lock(&m.operator_resync).delete_extra {
        return Ok(());
    }
    let primary: OwnedFd = std::fs::File::open(backing)?.into();
    let kept = mf.retain(|p| on_primary(primary.as_fd(), p));
    log_kept(m, kept);
    Ok(())
}

/// The link started the copy a pending request asked for.
pub fn remote_accepted(m: &MirrorShared) {
    let mut r = lock(&m.operator_resync);
    if r.running {
        r.accepted = true;
    }
}

/// The daemon applied the whole copy the request started (the link says `live` again).
pub fn remote_applied(m: &MirrorShared) {
    let accepted = {
        let r = lock(&m.operator_resync);
        r.running && r.accepted
    };
    if accepted {
        copy_done(m, None);
    }
}

/// The copy the request started failed: the request ends with `error`.
pub fn remote_failed(m: &MirrorShared, error: &str) {
    let mut r = lock(&m.operator_resync);
    if r.running && r.accepted {
        r.running = false;
        r.asked = false;
        r.accepted = false;
        r.error = Some(error.to_string());
    }
}

fn run(
    vol: &Arc<Volume>,
    backing: &std::path::Path,
    hidden: &[u8],
    m: &Arc<MirrorShared>,
    delete_extra: bool,
) -> std::io::Result<()> {
    let t0 = Instant::now();
    while !lock(&m.operator_resync).accepted {
        if t0.elapsed() > ACCEPT_WAIT || m.detached() {
            return Err(std::io::Error::other(
                "the mirror's worker did not take the request (is the mirror live?)",
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let primary: OwnedFd = std::fs::File::open(backing)?.into();
    let mut mf = Manifest::default();
    let mut kept = 0u64;
    manifest(&m.path, hidden, |e| {
        if delete_extra || on_primary(primary.as_fd(), &e.path) {
            mf.add(e)
        } else {
            if e.first_block == 0 {
                kept += 1;
            }
            Ok(())
        }
    })?;
    log_kept(m, kept);
    let stats = live_resync(vol.clone(), backing, m.clone(), Some(hidden.to_vec()), mf)?;
    tracing::info!(
        "mirror {}: resync journaled ({} removed, {} kept, {} blocks sent, {} the same)",
        m.name,
        stats.removed,
        stats.kept,
        stats.blocks_sent,
        stats.blocks_same
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(
            parse_request(b"keep-extra /m n"),
            Some((false, PathBuf::from("/m n")))
        );
        assert_eq!(
            parse_request(b"delete-extra /m"),
            Some((true, PathBuf::from("/m")))
        );
        assert_eq!(parse_request(b"delete-extra "), None);
        assert_eq!(parse_request(b"wipe /m"), None);
        assert_eq!(parse_request(b"/m"), None);
    }
}
