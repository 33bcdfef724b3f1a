//! `mirrorfs promote DIR`: makes a mirror's copy (a daemon's directory or a local mirror) the
//! backing directory of a primary at its last applied state, starting a new generation.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use mirrorfs_core::applier::Applier;
use mirrorfs_core::journal::{Journal, JournalConfig};
use mirrorfs_core::lease::Request;

use crate::site::meta::{random_u64, read_meta, write_meta, CopyState, Meta};
use crate::site::state_dir::StateDir;
use crate::site::store::FileStore;

/// Takes a witness's write lease (`promote --witness`), or says why not.
pub type TakeLease<'a> = &'a dyn Fn(&Request) -> Result<()>;

/// `mirrorfs promote DIR`: makes a mirror's copy a primary's backing directory at its last
/// applied state. Refuses while a daemon serves DIR (unless `force`). With `lease` (its ttl in
/// ms and how to take it), the witness's write lease for the new generation is taken before
/// anything changes, and its refusal leaves everything as it was.
pub fn promote(
    dir: &Path,
    state: Option<&Path>,
    force: bool,
    lease: Option<(u64, TakeLease)>,
) -> Result<()> {
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
    let mut history = meta.history();
    let id = random_u64()?;
    if let Some((ttl_ms, take)) = lease {
        let number = history.current().map_or(1, |g| g.number + 1);
        take(&Request {
            volume_id: history.volume_id,
            site: crate::site::fence::site_name(&dir),
            generation_number: number,
            generation_id: id,
            ttl_ms,
            renewal: false,
        })?;
    }
    let (applied, dropped) = restart_journal_at_applied(&dir, &state)?;
    // A new generation begins at the next seq: the old primary's changes after `applied`, if
    // any, are what the two sides will then not share (`core::history`).
    history.promote(id, applied + 1);
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
