//! The one depth-first walk of a directory tree that the live copies (initial sync, resync) and
//! the mirror's resync manifest share: every path resolved beneath the root, symlinks never
//! followed, names in byte order, parents before children.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use mirrorfs_core::path::RelPath;

use crate::sys;

/// One step of `walk`.
pub enum Visit<'a> {
    /// An entry of a directory: its path, its name, its `lstat`, and the directory it is in.
    Entry {
        path: &'a RelPath,
        name: &'a [u8],
        st: &'a libc::stat,
        dir: BorrowedFd<'a>,
    },
    /// Everything below the directory `path` was visited (the place for its times); the root
    /// comes last.
    DirDone {
        path: &'a RelPath,
        st: &'a libc::stat,
    },
}

/// Walks the tree under `root`, skipping `skip` among the root's entries (mirrorfs's own state
/// directory). Memory: the names of one directory at a time, plus the stack of directories to go.
pub fn walk(
    root: BorrowedFd<'_>,
    skip: Option<&[u8]>,
    mut visit: impl FnMut(Visit<'_>) -> io::Result<()>,
) -> io::Result<()> {
    let mut stack = vec![(RelPath::root(), false)];
    while let Some((dir, done)) = stack.pop() {
        if done {
            let st = crate::tree::dirtree::lstat_in(root, &dir)?;
            visit(Visit::DirDone {
                path: &dir,
                st: &st,
            })?;
            continue;
        }
        stack.push((dir.clone(), true));
        let dfd = crate::tree::dirtree::open_in(
            root,
            &dir,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
        let mut entries = sys::read_dir_fd(dfd.as_fd())?;
        entries.sort();
        for (name, _) in entries {
            if dir.is_root() && skip == Some(&name[..]) {
                continue;
            }
            let path = dir.join(&name).map_err(io::Error::other)?;
            let st = sys::lstatat(dfd.as_fd(), OsStr::from_bytes(&name))?;
            visit(Visit::Entry {
                path: &path,
                name: &name,
                st: &st,
                dir: dfd.as_fd(),
            })?;
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                stack.push((path, false));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    #[test]
    fn visits_parents_first_skips_the_state_dir_and_ends_with_the_root() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path();
        std::fs::create_dir_all(r.join("a/b")).expect("mkdir");
        std::fs::create_dir_all(r.join(".state/x")).expect("mkdir");
        std::fs::write(r.join("a/b/f"), b"x").expect("write");
        std::os::unix::fs::symlink("a", r.join("s")).expect("symlink");
        let root: OwnedFd = std::fs::File::open(r).expect("open").into();
        let mut seen = Vec::new();
        walk(root.as_fd(), Some(b".state"), |v| {
            seen.push(match v {
                Visit::Entry { path, .. } => format!("entry {path}"),
                Visit::DirDone { path, .. } => format!("done {path}"),
            });
            Ok(())
        })
        .expect("walk");
        let pos = |s: &str| seen.iter().position(|x| x == s).expect(s);
        assert!(pos("entry a") < pos("entry a/b") && pos("entry a/b") < pos("entry a/b/f"));
        assert!(pos("entry a/b/f") < pos("done a/b") && pos("done a/b") < pos("done a"));
        assert_eq!(
            seen.last().map(String::as_str),
            Some("done ."),
            "the root comes last"
        );
        assert!(
            seen.contains(&"entry s".to_string()),
            "symlinks are entries, not followed"
        );
        assert!(!seen.iter().any(|x| x.contains(".state")));
        assert_eq!(seen.len(), 7);
    }
}
