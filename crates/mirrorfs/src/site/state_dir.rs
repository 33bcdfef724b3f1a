//! `StateDir`: the one place that knows the layout of a state directory (a mount's `--state`, a
//! daemon's `DIR/.mirrorfs`) and how each of its files is written. Every file and marker has a
//! typed accessor here instead of a string path in the module that happens to use it; which
//! writes are fsynced, and when, is listed in `docs/journal.md` ("State files").
//!
//! ```text
//! STATE/ lock, pid, boot_id, clean, served, volume.json, status.json, journal/, diverged/,
//!        conflicts.json, conflicts.lock
//!        tree/cursor                      (the daemon's own tree)
//!        mirrors/ID/{cursor, NEEDS_RESYNC, SYNCING, durable, ...}
//! ```

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::site::statefile;

/// A site's state directory, created owner-only (`0700`, see [`statefile::private_dir`]).
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

/// Held while this process owns a state directory (an exclusive `flock` on `STATE/lock`); the
/// kernel drops it when the process dies.
#[derive(Debug)]
pub struct StateLock {
    _file: fs::File,
}

/// Why [`StateDir::lock`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StateLockError {
    /// Another process holds the lock; the pid it wrote in `STATE/pid`, if any.
    #[error("the state directory is locked by {}", .0.as_deref().map_or("another process".to_string(), |p| format!("pid {p}")))]
    Held(Option<String>),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl StateDir {
    /// Creates (or corrects) `path` as an owner-only state directory.
    pub fn create(path: &Path) -> io::Result<StateDir> {
        statefile::private_dir(path)?;
        Ok(StateDir::at(path))
    }

    /// The state directory at `path`, as it is (no check, nothing created): for readers such as
    /// `promote` and `status`.
    pub fn at(path: &Path) -> StateDir {
        StateDir {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes `STATE/lock` without waiting. The refusal names the holder's pid (from `STATE/pid`,
    /// written by [`StateDir::write_pid`]).
    pub fn lock(&self) -> Result<StateLock, StateLockError> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(self.path.join("lock"))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(StateLock { _file: f });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(StateLockError::Io(e));
        }
        Err(StateLockError::Held(self.pid()))
    }

    /// The pid the last holder of the lock wrote (`STATE/pid`), trimmed; `None` if there is none.
    pub fn pid(&self) -> Option<String> {
        let s = fs::read_to_string(self.path.join("pid")).ok()?;
        let s = s.trim();
        (!s.is_empty()).then(|| s.to_string())
    }

    /// Writes this process's pid to `STATE/pid` (no fsync: it only names the lock's holder).
    pub fn write_pid(&self) -> io::Result<()> {
        fs::write(self.path.join("pid"), std::process::id().to_string())
    }

    /// `STATE/clean`: present iff the last run stopped cleanly (every cursor checkpointed, the
    /// in-doubt record settled).
    pub fn is_clean(&self) -> bool {
        self.clean_path().exists()
    }

    /// Leaves the `clean` marker, durably (file and directory fsynced): a power loss right after
    /// a clean stop must not look like a crash, nor a crash like a clean stop.
    pub fn set_clean(&self) -> io::Result<()> {
        statefile::replace_durable(&self.clean_path(), b"", 0o600)
    }

    /// Removes the `clean` marker (a run begins), durably (S5): see `boot::record_boot`.
    pub fn clear_clean(&self) -> io::Result<()> {
        statefile::remove_durable(&self.clean_path())
    }

    fn clean_path(&self) -> PathBuf {
        self.path.join("clean")
    }

    /// `STATE/served`: a mirror daemon opened this former primary's directory after its clean
    /// unmount, so its tree is its journal's end; a crash of the daemon since (no `clean`
    /// marker) is a mirror's crash, not a primary's, and the daemon may start again. A mount
    /// removes it before its run begins.
    pub fn is_served_primary(&self) -> bool {
        self.served_path().exists()
    }

    /// Leaves the `served` marker, durably.
    pub fn set_served_primary(&self) -> io::Result<()> {
        statefile::replace_durable(&self.served_path(), b"", 0o600)
    }

    /// Removes the `served` marker, durably (a mount's run begins).
    pub fn clear_served_primary(&self) -> io::Result<()> {
        match fs::symlink_metadata(self.served_path()) {
            Ok(_) => statefile::remove_durable(&self.served_path()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn served_path(&self) -> PathBuf {
        self.path.join("served")
    }

    /// `STATE/boot_id`: the kernel boot id the last run started in.
    pub fn boot_id_file(&self) -> PathBuf {
        self.path.join("boot_id")
    }

    /// `STATE/volume.json` (see `meta`).
    pub fn volume_json(&self) -> PathBuf {
        self.path.join("volume.json")
    }

    /// `STATE/status.json`, rewritten twice a second by a running site.
    pub fn status_json(&self) -> PathBuf {
        self.path.join("status.json")
    }

    /// `STATE/conflicts.json`: the conflicts reintegrations left, until users settle them (see
    /// `site::conflicts`).
    pub fn conflicts_file(&self) -> PathBuf {
        self.path.join("conflicts.json")
    }

    /// `STATE/conflicts.lock`: `flock`ed while the conflict registry is read and rewritten.
    pub fn conflicts_lock(&self) -> PathBuf {
        self.path.join("conflicts.lock")
    }

    /// `STATE/tokens`: the write-token table's log (two writable sites, `site::tokens`),
    /// fsynced at each grant (T1) and take-over (T2).
    pub fn tokens_file(&self) -> PathBuf {
        self.path.join("tokens")
    }

    /// `STATE/peer-origin`: the seqs of this site's records that came from its peer writable
    /// site (`site::peer::LegacyOrigins`), as an older version kept them: read, never written.
    pub fn peer_origin_file(&self) -> PathBuf {
        self.path.join("peer-origin")
    }

    /// `STATE/peer-applied`: the peer writable site's volume and how far its journal is applied
    /// here (`site::peer`).
    pub fn peer_applied_file(&self) -> PathBuf {
        self.path.join("peer-applied")
    }

    /// `STATE/pair-born-empty` (`site::peer::born_empty`).
    pub fn pair_born_empty_file(&self) -> PathBuf {
        self.path.join("pair-born-empty")
    }

    /// `STATE/journal/`: the journal's segments.
    pub fn journal_dir(&self) -> PathBuf {
        self.path.join("journal")
    }

    /// `STATE/diverged/`: where a daemon saves the changes it discards on request.
    pub fn diverged_dir(&self) -> PathBuf {
        self.path.join("diverged")
    }

    /// `STATE/tree/`: the state of a daemon's own tree (its cursor), laid out as a mirror's.
    pub fn tree(&self) -> MirrorStateDir {
        MirrorStateDir::at(&self.path.join("tree"))
    }

    /// `STATE/mirrors/ID/`: the state the primary keeps for one of its mirrors.
    pub fn mirror(&self, id: &str) -> MirrorStateDir {
        MirrorStateDir::at(&self.path.join("mirrors").join(id))
    }
}

/// The state kept for one mirror (`STATE/mirrors/ID/`, or a daemon's `STATE/tree/`).
#[derive(Debug, Clone)]
pub struct MirrorStateDir {
    path: PathBuf,
}

impl MirrorStateDir {
    pub fn at(path: &Path) -> MirrorStateDir {
        MirrorStateDir {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the directory (and its parents) if needed.
    pub fn create(&self) -> io::Result<()> {
        fs::create_dir_all(&self.path)
    }

    /// `cursor`: the applier's two checksummed slots (see `store::FileCursor`).
    pub fn cursor(&self) -> PathBuf {
        self.path.join("cursor")
    }

    /// `reintegration/`: a network mirror's diverged changes being taken into this primary:
    /// `plan` (R1) and its step `cursor` (R2), see `net::reintegrate`.
    pub fn reintegration_dir(&self) -> PathBuf {
        self.path.join("reintegration")
    }

    /// The reason this mirror must be copied again (`NEEDS_RESYNC`), if it must.
    pub fn needs_resync(&self) -> Option<String> {
        let p = self.path.join("NEEDS_RESYNC");
        match fs::read_to_string(&p) {
            Ok(s) => Some(s),
            // Present but unreadable still means "copy it again".
            Err(e) if e.kind() != io::ErrorKind::NotFound => Some(String::new()),
            Err(_) => None,
        }
    }

    /// Marks the mirror as needing a full copy, durably, and then removes its cursor (durably):
    /// a crash in between leaves the marker, which wins over any cursor.
    pub fn set_needs_resync(&self, reason: &str) -> io::Result<()> {
        self.create()?;
        statefile::replace_durable(&self.path.join("NEEDS_RESYNC"), reason.as_bytes(), 0o600)?;
        statefile::remove_durable(&self.cursor())
    }

    /// Drops the `NEEDS_RESYNC` marker (a resync completed).
    pub fn clear_needs_resync(&self) -> io::Result<()> {
        statefile::remove_durable(&self.path.join("NEEDS_RESYNC"))
    }

    /// Whether an initial copy was started and not yet checkpointed past its end (`SYNCING`).
    pub fn is_syncing(&self) -> bool {
        self.path.join("SYNCING").exists()
    }

    /// Leaves `SYNCING`, durably, before an initial copy writes to the mirror.
    pub fn set_syncing(&self) -> io::Result<()> {
        self.create()?;
        statefile::replace_durable(
            &self.path.join("SYNCING"),
            b"initial sync in progress\n",
            0o600,
        )
    }

    /// Drops `SYNCING` once the copy's end is checkpointed.
    pub fn clear_syncing(&self) -> io::Result<()> {
        statefile::remove_durable(&self.path.join("SYNCING"))
    }

    /// The position a network mirror last said was durable on its side (`durable`, decimal);
    /// `Ok(None)` if the file does not exist, an error that names the file if it is garbage.
    pub fn remote_durable(&self) -> io::Result<Option<u64>> {
        let p = self.path.join("durable");
        match fs::read_to_string(&p) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
            Ok(s) => s.trim().parse::<u64>().map(Some).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} does not hold a position (a decimal number): {:?}",
                        p.display(),
                        s.chars().take(40).collect::<String>()
                    ),
                )
            }),
        }
    }

    /// Records a network mirror's durable position, durably (the journal is held up to it at the
    /// next start).
    pub fn set_remote_durable(&self, seq: u64) -> io::Result<()> {
        self.create()?;
        statefile::replace_durable(
            &self.path.join("durable"),
            seq.to_string().as_bytes(),
            0o600,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> (tempfile::TempDir, StateDir) {
        let d = tempfile::tempdir().expect("tempdir");
        let s = StateDir::create(&d.path().join("state")).expect("create");
        (d, s)
    }

    #[test]
    fn markers_round_trip_and_survive_a_new_handle() {
        let (_d, s) = tmp();
        assert!(!s.is_clean());
        s.set_clean().expect("set clean");
        assert!(StateDir::at(s.path()).is_clean());
        s.clear_clean().expect("clear clean");
        assert!(!s.is_clean());

        let m = s.mirror("abc");
        assert_eq!(m.needs_resync(), None);
        fs::create_dir_all(m.path()).expect("mkdir");
        fs::write(m.cursor(), b"x").expect("cursor");
        m.set_needs_resync("the mark is foreign").expect("mark");
        let again = StateDir::at(s.path()).mirror("abc");
        assert_eq!(again.needs_resync().as_deref(), Some("the mark is foreign"));
        assert!(!again.cursor().exists(), "the cursor is removed with it");
        again.clear_needs_resync().expect("clear");
        assert_eq!(again.needs_resync(), None);

        assert!(!m.is_syncing());
        m.set_syncing().expect("syncing");
        assert!(s.mirror("abc").is_syncing());
        m.clear_syncing().expect("clear syncing");
        assert!(!m.is_syncing());
    }

    #[test]
    fn the_remote_durable_position_round_trips_and_reads_what_older_code_wrote() {
        let (_d, s) = tmp();
        let m = s.mirror("remote-x");
        assert_eq!(m.remote_durable().expect("absent"), None);
        m.set_remote_durable(4242).expect("write");
        assert_eq!(m.remote_durable().expect("read"), Some(4242));
        fs::write(m.path().join("durable"), b"17\n").expect("old format");
        assert_eq!(m.remote_durable().expect("read"), Some(17));
    }

    #[test]
    fn a_garbage_durable_file_is_a_clear_error() {
        let (_d, s) = tmp();
        let m = s.mirror("remote-x");
        m.create().expect("mkdir");
        fs::write(m.path().join("durable"), b"twelve").expect("garbage");
        let e = m.remote_durable().expect_err("garbage");
        let text = e.to_string();
        assert!(
            text.contains("durable") && text.contains("twelve"),
            "{text}"
        );
    }

    #[test]
    fn a_second_lock_is_refused_and_names_the_pid() {
        let (_d, s) = tmp();
        let held = s.lock().expect("first");
        s.write_pid().expect("pid");
        match s.lock() {
            Err(e @ StateLockError::Held(_)) => {
                let pid = std::process::id().to_string();
                assert!(e.to_string().contains(&pid), "{e}");
                assert!(matches!(e, StateLockError::Held(Some(p)) if p == pid));
            }
            other => panic!("second lock: {other:?}"),
        }
        drop(held);
        s.lock().expect("free again once dropped");
    }
}
