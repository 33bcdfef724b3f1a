//! Changes made directly in the backing directory while it was not mounted (an editor or a
//! restore run on the backing, not on the mount): they never reach the journal, so the mirrors
//! miss them. At a clean unmount the mount saves a stamp of the backing tree's metadata
//! (`STATE/backing-stamp.json`: entry count, bytes, and a blake3 digest of every entry's path,
//! type and mode, owner, size, mtime and ctime, inode); the next mount walks the tree again
//! (metadata only, no data read), compares, and warns with the command to run
//! (`mirrorfs verify`). The stamp is removed as the mount starts, so a crash never leaves one
//! that a later mount would trust. ctime is in it: every change to an entry (data, mode,
//! owner, xattrs, links, renames) moves it, and no tool can set it back.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tree::walk::{walk, Visit};

/// Trees larger than this are not stamped (the walk would slow every mount and unmount); the
/// mount says so.
pub const MAX_ENTRIES: u64 = 2_000_000;

const FILE: &str = "backing-stamp.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub version: u32,
    pub entries: u64,
    pub bytes: u64,
    /// blake3 of every entry's metadata, in walk order (hex).
    pub digest: String,
}

/// The stamp of the tree at `backing` (skipping `hidden` at its root); `None` beyond
/// [`MAX_ENTRIES`].
pub fn take(backing: &Path, hidden: &[u8]) -> std::io::Result<Option<Stamp>> {
    let root: OwnedFd = std::fs::File::open(backing)?.into();
    let mut h = blake3::Hasher::new();
    let (mut entries, mut bytes) = (0u64, 0u64);
    walk(root.as_fd(), Some(hidden), |v| {
        let (path, st) = match v {
            Visit::Entry { path, st, .. } => (path, st),
            Visit::DirDone { path, st } if path.is_root() => (path, st),
            Visit::DirDone { .. } => return Ok(()),
        };
        entries += 1;
        if entries > MAX_ENTRIES {
            return Err(std::io::Error::other("too many entries"));
        }
        bytes += st.st_size as u64;
        h.update(path.as_bytes());
        h.update(&[0]);
        for v in [
            st.st_mode as u64,
            st.st_uid as u64,
            st.st_gid as u64,
            st.st_size as u64,
            st.st_mtime as u64,
            st.st_mtime_nsec as u64,
            st.st_ctime as u64,
            st.st_ctime_nsec as u64,
            st.st_ino,
        ] {
            h.update(&v.to_le_bytes());
        }
        Ok(())
    })
    .map(|()| {
        Some(Stamp {
            version: 1,
            entries,
            bytes,
            digest: h.finalize().to_hex().to_string(),
        })
    })
    .or_else(|e| {
        if entries > MAX_ENTRIES {
            Ok(None)
        } else {
            Err(e)
        }
    })
}

fn path(state: &Path) -> PathBuf {
    state.join(FILE)
}

/// At a clean unmount: saves the backing's stamp (a failure is only logged: the next mount
/// then cannot check).
pub fn save(backing: &Path, hidden: &[u8], state: &Path) {
    let r = take(backing, hidden).and_then(|s| match s {
        Some(s) => crate::site::statefile::replace_durable(
            &path(state),
            &serde_json::to_vec(&s).unwrap_or_default(),
            0o600,
        ),
        None => Ok(()),
    });
    if let Err(e) = r {
        tracing::warn!(
            "cannot save the backing directory's stamp: {e}; the next mount cannot tell whether {} was changed behind its back",
            backing.display()
        );
    }
}

/// As the mount starts: compares the backing with the stamp the last clean unmount saved (and
/// removes it). Returns the warning to show, if the tree changed.
pub fn check(backing: &Path, hidden: &[u8], state: &Path, mountpoint: &Path) -> Option<String> {
    let p = path(state);
    let saved: Stamp = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
    if let Err(e) = crate::site::statefile::remove_durable(&p) {
        tracing::warn!("cannot remove {}: {e}", p.display());
    }
    let now = match take(backing, hidden) {
        Ok(Some(s)) => s,
        Ok(None) => return None,
        Err(e) => {
            return Some(format!(
                "cannot check {} for changes made while it was not mounted ({e}); run `mirrorfs verify {}` to compare the mirrors",
                backing.display(),
                mountpoint.display()
            ))
        }
    };
    (now != saved).then(|| {
        format!(
            "{} was changed while it was not mounted ({} entries and {} bytes now, {} and {} at the last unmount): the mirrors do not have those changes; run `mirrorfs verify {} --repair` to compare and mend them",
            backing.display(),
            now.entries,
            now.bytes,
            saved.entries,
            saved.bytes,
            mountpoint.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_behind_the_mounts_back_is_seen_once() {
        let t = tempfile::tempdir().expect("tempdir");
        let (b, st) = (t.path().join("b"), t.path().join("s"));
        std::fs::create_dir_all(b.join(".mirrorfs")).expect("mkdir");
        std::fs::create_dir_all(&st).expect("mkdir");
        std::fs::write(b.join("f"), b"1").expect("write");
        let mp = Path::new("/mnt");
        assert_eq!(
            check(&b, b".mirrorfs", &st, mp),
            None,
            "no stamp: nothing said"
        );
        save(&b, b".mirrorfs", &st);
        // The state directory's own changes are not changes of the tree.
        std::fs::write(b.join(".mirrorfs/x"), b"").expect("write");
        assert_eq!(check(&b, b".mirrorfs", &st, mp), None);
        save(&b, b".mirrorfs", &st);
        std::fs::write(b.join("f"), b"2").expect("write");
        let w = check(&b, b".mirrorfs", &st, mp).expect("a warning");
        assert!(w.contains("mirrorfs verify /mnt"), "{w}");
        assert_eq!(
            check(&b, b".mirrorfs", &st, mp),
            None,
            "the stamp is used once"
        );
    }
}
