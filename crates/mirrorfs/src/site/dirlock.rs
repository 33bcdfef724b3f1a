//! One mirrorfs per directory: an exclusive `flock` on the directory itself, held for the life of
//! the process that uses it (a mount's backing and local mirrors, a daemon's directory).
//!
//! The lock sits on the directory, not in the state directory: two mounts of one backing
//! directory with different `--state` directories would otherwise both run, and each would mirror
//! the other's state. The kernel drops the lock when the process dies, so a `kill -9` never
//! leaves a stale lock behind. `/proc/locks` tells which process holds it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// An exclusive lock on a directory; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    _dir: File,
}

/// Why a directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it; its pid when `/proc/locks` names it.
    #[error("locked by {}", holder_text(*.0))]
    Held(Option<u32>),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn holder_text(pid: Option<u32>) -> String {
    match pid {
        Some(p) => format!("pid {p}"),
        None => "another process".into(),
    }
}

/// Takes the exclusive lock on `dir` without waiting.
pub fn lock(dir: &Path) -> Result<DirLock, LockError> {
    let f = File::open(dir)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(DirLock { _dir: f });
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(LockError::Io(e));
    }
    let md = f.metadata()?;
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    Err(LockError::Held(holder(&locks, md.dev(), md.ino())))
}

/// The pid that holds an active `FLOCK` on the inode (`dev`, `ino`), from `/proc/locks` text
/// (`1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF`; device as hexadecimal major:minor).
/// Waiters (`->` lines) are skipped.
fn holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().filter(|l| !l.contains("->")).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 6 && f[1] == "FLOCK" && f[5] == want)
            .then(|| f[4].parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let dev = libc::makedev(0xfd, 1);
        let text = "1: POSIX  ADVISORY  WRITE 11 fd:01:99 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 77 fd:01:1234 0 EOF\n";
        assert_eq!(holder(text, dev, 1234), Some(4242));
        assert_eq!(holder(text, dev, 99), None, "a POSIX lock is not ours");
        assert_eq!(
            holder(text, libc::makedev(8, 1), 1234),
            None,
            "another device"
        );
    }

    #[test]
    fn a_second_lock_on_a_directory_is_refused_and_names_the_holder() {
        let d = tempfile::tempdir().expect("tempdir");
        let first = lock(d.path()).expect("first lock");
        match lock(d.path()) {
            Err(LockError::Held(pid)) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("second lock: {other:?}"),
        }
        drop(first);
        lock(d.path()).expect("the lock is free again once dropped");
    }
}
