//! The identity mark of a local mirror's tree: a small file at the mirror's root (named like the
//! primary's hidden state directory, so no record can ever touch it) saying which volume and
//! which attachment of a mirror the tree holds. The primary keeps the same mark in the mirror's
//! state directory. A tree whose mark is missing or foreign (a backup disk that did not mount, a
//! disk swapped for another) is not live: `status` says `refused` with the reason, nothing is
//! applied, and nothing is copied unless the operator asks (`--force-resync`). Checked when the
//! mirror is attached and every few seconds while it runs.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::site::volume::MirrorShared;

/// The mark's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The file name of the mark in the mirror's root.
    pub name: String,
    pub volume_id: String,
    pub generation: u64,
    /// Random: one attachment of one mirror directory (a fresh copy gets a new one).
    pub mirror: String,
    /// The seq at which this copy began.
    pub since_seq: u64,
}

fn expected_path(m: &MirrorShared) -> std::path::PathBuf {
    m.state_dir.join("mark")
}

/// The mark the primary expects for `m`, if it gave it one.
pub fn expected(m: &MirrorShared) -> Option<Mark> {
    let b = fs::read(expected_path(m)).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Gives `m` a new mark: in its tree (the root's times kept) and in the primary's state.
pub fn write_new(
    m: &MirrorShared,
    name: &str,
    meta: &crate::site::meta::Meta,
    seq: u64,
) -> std::io::Result<Mark> {
    let id = crate::site::meta::random_u64().map_err(std::io::Error::other)?;
    let mark = Mark {
        name: name.to_string(),
        volume_id: meta.volume_id.clone(),
        generation: meta.generation,
        mirror: format!("{id:016x}"),
        since_seq: seq,
    };
    write(m, &mark)?;
    Ok(mark)
}

/// Writes `mark` to `m`'s tree and to the primary's state (both fsynced).
pub fn write(m: &MirrorShared, mark: &Mark) -> std::io::Result<()> {
    let body = serde_json::to_vec_pretty(mark).map_err(std::io::Error::other)?;
    let root_times = fs::metadata(&m.path)?;
    put(&m.path.join(&mark.name), &body)?;
    restore_times(&m.path, &root_times);
    fs::create_dir_all(&m.state_dir)?;
    put(&expected_path(m), &body)
}

fn put(p: &Path, body: &[u8]) -> std::io::Result<()> {
    let tmp = p.with_extension("tmp-mark");
    {
        let mut f = fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, body)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, p)?;
    if let Some(d) = p.parent() {
        fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

/// The mark at `path`, if that is a regular file holding one.
pub fn read_file(path: &Path) -> Option<Mark> {
    if !fs::symlink_metadata(path).ok()?.is_file() {
        return None;
    }
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Why `m`'s tree is not the copy the primary expects, if it is not (`None`: it is, or the
/// primary gave it no mark).
pub fn problem(m: &MirrorShared) -> Option<String> {
    let want = expected(m)?;
    let at = m.path.join(&want.name);
    let what_to_do = format!(
        "is the right disk mounted at {}? Mount it and the mirror resumes by itself; or remount with --force-resync to copy the whole tree to this directory again",
        m.path.display()
    );
    match fs::read(&at) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(format!(
            "{} carries no identity mark ({} is missing): it is not the copy this mirror holds; {what_to_do}",
            m.path.display(),
            at.display()
        )),
        Err(e) => Some(format!("cannot read the identity mark {}: {e}", at.display())),
        Ok(b) => match serde_json::from_slice::<Mark>(&b) {
            Ok(found) if found.volume_id == want.volume_id && found.mirror == want.mirror => None,
            Ok(found) => Some(format!(
                "{} holds another copy (volume {}, mirror {}, since record {}; expected volume {}, mirror {}); {what_to_do}",
                m.path.display(),
                found.volume_id,
                found.mirror,
                found.since_seq,
                want.volume_id,
                want.mirror
            )),
            Err(e) => Some(format!(
                "the identity mark {} is damaged ({e}); {what_to_do}",
                at.display()
            )),
        },
    }
}

/// Puts a directory's atime and mtime back (a mirror's root times are part of the copy).
pub fn restore_times(dir: &Path, before: &fs::Metadata) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let times = [
        libc::timespec {
            tv_sec: before.atime(),
            tv_nsec: before.atime_nsec(),
        },
        libc::timespec {
            tv_sec: before.mtime(),
            tv_nsec: before.mtime_nsec(),
        },
    ];
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: a valid NUL-terminated path and two timespecs.
    if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) } != 0 {
        tracing::warn!(
            "could not restore the times of {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
}
