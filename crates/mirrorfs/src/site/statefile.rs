//! State directories and the small state files in them, owner-only.
//!
//! A state directory holds the journal (file contents!), cursors, identity marks and
//! `status.json`; nobody but its owner may read or change any of it. mirrorfs runs with umask 0
//! (it applies modes exactly as the caller asked), so every file it creates here gets an explicit
//! mode and the directory itself is made `0700`.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and its parents) if needed, owner-only (`0700`); an existing directory's mode
/// is corrected. Refuses a directory that belongs to another user: they could plant files in it.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let md = fs::symlink_metadata(dir)?;
    if !md.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if md.uid() != me {
        return Err(io::Error::other(format!(
            "state directory {} belongs to uid {}, not to this user (uid {me}): refusing to keep state there; choose another --state or fix its owner",
            dir.display(),
            md.uid()
        )));
    }
    if md.mode() & 0o777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Replaces `path` atomically (temporary file + rename) with `bytes`, created with `mode`. No
/// fsync: for files that are rewritten continuously and need no durability (`status.json`,
/// registrations); durable state goes through the journal's and cursor's own protocols.
///
/// On a full disk (the state directory shares it with a mirror that filled it) a new temporary
/// file cannot be written; the file is then overwritten in place, in the pages it already has,
/// so `status` keeps showing why the mirror is stuck (a reader may see a torn file for a moment
/// and skips it).
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    match replace_by_rename(path, bytes, mode) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => {
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(".tmp");
            let _ = fs::remove_file(Path::new(&tmp));
            let mut f = fs::OpenOptions::new().write(true).open(path)?;
            f.write_all(bytes)?;
            f.set_len(bytes.len() as u64)
        }
        r => r,
    }
}

fn replace_by_rename(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_and_rename(path, bytes, mode, false)
}

/// Replaces `path` atomically with `bytes`, created with `mode`, and makes the change durable:
/// temporary file, fsync of the file, rename, fsync of the parent directory. Once this returns,
/// a power loss leaves the new contents; before it, the old file (or none) — never a torn one.
pub fn replace_durable(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_and_rename(path, bytes, mode, true)?;
    sync_parent(path)
}

/// Writes `bytes` to `PATH.tmp` (mode `mode`, fsynced if `durable`) and renames it over `path`.
fn write_and_rename(path: &Path, bytes: &[u8], mode: u32, durable: bool) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(tmp)?;
    // An older file of ours may have been created with a wider mode.
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    if durable {
        f.sync_all()?;
    }
    drop(f);
    fs::rename(tmp, path)
}

/// Overwrites `path` in place with `bytes` and makes it durable (fsync of the file, and of the
/// parent directory when the file is new). For a small file whose size does not change between
/// writes (a boot id): rewriting its block needs no free space, so it works on a full disk, where
/// a temporary file cannot be made. A power loss during the write can leave it torn: use it only
/// for a file whose torn contents read as "unknown" and are safe so (see `boot::power_lost`).
pub fn overwrite_durable(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let existed = path.exists();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.set_len(bytes.len() as u64)?;
    f.sync_all()?;
    if existed {
        Ok(())
    } else {
        sync_parent(path)
    }
}

/// Removes `path` durably (a missing file is not an error): unlink, then fsync of the parent
/// directory, so a power loss cannot bring the file back.
pub fn remove_durable(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(()) => sync_parent(path),
    }
}

/// Fsyncs the directory that holds `path` (a new, renamed or removed name is durable only then).
pub fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::File::open(parent)?.sync_all()
}

/// Whether a file read by `mirrorfs status` can be believed: owned by root or by the user who
/// asks, and writable by nobody else.
pub fn trustworthy(md: &fs::Metadata) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    (md.uid() == 0 || md.uid() == me) && md.mode() & 0o022 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_are_owner_only_even_under_umask_zero() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().join("state");
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
        private_dir(&dir).expect("private_dir");
        let mode = |p: &Path| fs::metadata(p).expect("stat").mode() & 0o777;
        assert_eq!(
            mode(&dir),
            0o700,
            "an existing state directory is corrected"
        );
        let f = dir.join("status.json");
        fs::write(&f, b"old").expect("write");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(!trustworthy(&fs::metadata(&f).expect("stat")));
        replace(&f, b"new", 0o600).expect("replace");
        assert_eq!(fs::read(&f).expect("read"), b"new");
        assert_eq!(mode(&f), 0o600);
        assert!(trustworthy(&fs::metadata(&f).expect("stat")));
    }
}
