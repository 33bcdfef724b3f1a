//! The mount's view of changes made beneath it: the site applies a failback's reintegration to
//! the backing tree through its volume, not through FUSE (`Volume::mutate_beneath`). The inode
//! table must follow — a node keeps the name it was looked up by, and a change by path would
//! otherwise land on whatever file now has that name — and the kernel must drop the names and
//! pages it caches for the entries that changed.
//!
//! Under the order lock (`changed_beneath`) the table moves or removes names by path; the kernel
//! invalidations are collected and sent once the lock is released (`settle`): an invalidation
//! takes the parent directory's lock in the kernel, which a FUSE request waiting for the order
//! lock may hold. At most eight invalidations are pending at a time (one change's names, their
//! directories and the inodes whose link count or ctime it changed).
//!
//! The kernel keeps names and attributes for `fuse::TTL` (60 s), so these invalidations are what
//! makes a change beneath the mount visible at once: every change here tells the kernel about
//! each name, directory (mtime, size, link count) and inode (size, times, mode, link count) it
//! touched.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex, OnceLock};

use fuser::{INodeNo, Notifier};
use mirrorfs_core::op::Op;
use mirrorfs_core::path::RelPath;

use crate::fuse::inodes::Inodes;
use crate::site::volume::{lock, MountView};

/// What the kernel must forget.
#[derive(Debug, PartialEq, Eq)]
enum Stale {
    /// The name `name` in directory node `parent`.
    Entry(u64, Vec<u8>),
    /// The attributes and pages of node `ino`.
    Inode(u64),
}

/// The FUSE shell's `MountView`: shares the mount's inode table.
pub struct View {
    inodes: Arc<Mutex<Inodes>>,
    /// Set once the FUSE session exists; before that the kernel caches nothing.
    notifier: OnceLock<Notifier>,
    due: Mutex<Vec<Stale>>,
}

impl View {
    pub(super) fn new(inodes: Arc<Mutex<Inodes>>) -> View {
        View {
            inodes,
            notifier: OnceLock::new(),
            due: Mutex::new(Vec::new()),
        }
    }

    /// The session's notifier, through which the kernel is told (called once, after mounting).
    pub fn attach(&self, notifier: Notifier) {
        let _ = self.notifier.set(notifier);
    }
}

impl MountView for View {
    fn changed_beneath(&self, op: &Op) {
        let mut t = lock(&self.inodes);
        let mut due = lock(&self.due);
        follow(&mut t, op, &mut due);
    }

    fn settle(&self) {
        let due = std::mem::take(&mut *lock(&self.due));
        let Some(n) = self.notifier.get() else {
            return;
        };
        for s in due {
            // The kernel may have dropped the entry already (ENOENT): nothing left to forget.
            let r = match &s {
                Stale::Entry(parent, name) => {
                    n.inval_entry(INodeNo(*parent), OsStr::from_bytes(name))
                }
                Stale::Inode(ino) => n.inval_inode(INodeNo(*ino), 0, 0),
            };
            if let Err(e) = r {
                tracing::debug!("kernel cache invalidation {s:?}: {e}");
            }
        }
    }
}

/// The table follows `op`, applied beneath the mount; the kernel's stale entries go to `due`.
fn follow(t: &mut Inodes, op: &Op, due: &mut Vec<Stale>) {
    match op {
        Op::Rename {
            from, to, flags, ..
        } => {
            let (f, fdir) = t.entry_at(from);
            let (d, ddir) = t.entry_at(to);
            stale_entry(fdir, from, due);
            stale_entry(ddir, to, due);
            // The directories' times (and link counts, for a directory moved), the moved
            // inode's ctime, the replaced inode's link count.
            stale_inodes([fdir, ddir, f, d], due);
            let exchange = flags & libc::RENAME_EXCHANGE != 0;
            if let Some(d) = d.filter(|d| Some(*d) != f) {
                if exchange {
                    move_name(t, d, to, ddir, from, fdir);
                } else {
                    drop_name(t, d, to, ddir);
                }
            }
            if let Some(f) = f {
                // After an exchange `to` no longer names `d` (moved above): no clash.
                move_name(t, f, from, fdir, to, ddir);
            }
        }
        Op::Unlink { path, .. } | Op::Rmdir { path } => {
            let (node, dir) = t.entry_at(path);
            stale_entry(dir, path, due);
            // The directory's times and link count; the inode's link count (another name or
            // an open file may keep it).
            stale_inodes([dir, node], due);
            if let Some(n) = node {
                drop_name(t, n, path, dir);
            }
        }
        Op::Create { path, .. }
        | Op::Mkdir { path, .. }
        | Op::Mknod { path, .. }
        | Op::Symlink { path, .. }
        | Op::Link { to: path, .. } => {
            // The kernel may cache the name as absent, and the directory's times.
            let (node, dir) = t.entry_at(path);
            stale_entry(dir, path, due);
            stale_inodes([dir, node], due);
            if let Op::Link { from, .. } = op {
                // The linked inode's link count and ctime.
                stale_inodes([t.at(from)], due);
            }
            if let Some(n) = node {
                drop_name(t, n, path, dir);
            }
        }
        Op::Write { path, .. }
        | Op::Truncate { path, .. }
        | Op::Fallocate { path, .. }
        | Op::SetMode { path, .. }
        | Op::SetOwner { path, .. }
        | Op::SetTimes { path, .. }
        | Op::SetXattr { path, .. }
        | Op::RemoveXattr { path, .. } => {
            if let Some(n) = t.at(path) {
                due.push(Stale::Inode(n));
            }
        }
        Op::Sync { .. }
        | Op::Abort { .. }
        | Op::SyncDone { .. }
        | Op::GroupBegin
        | Op::GroupEnd => {}
    }
}

/// The attributes of each known node in `nodes` (once each).
fn stale_inodes<const N: usize>(nodes: [Option<u64>; N], due: &mut Vec<Stale>) {
    for n in nodes.into_iter().flatten() {
        if !due.contains(&Stale::Inode(n)) {
            due.push(Stale::Inode(n));
        }
    }
}

fn stale_entry(dir: Option<u64>, p: &RelPath, due: &mut Vec<Stale>) {
    if let (Some(dir), Some(name)) = (dir, p.file_name()) {
        due.push(Stale::Entry(dir, name.to_vec()));
    }
}

/// Node `n` is no longer named `p`; with no known name left, its backing inode may be freed and
/// its number reused, so it is marked gone (see `inodes`).
fn drop_name(t: &mut Inodes, n: u64, p: &RelPath, dir: Option<u64>) {
    if let (Some(dir), Some(name)) = (dir, p.file_name()) {
        t.unlink(dir, name, n);
    }
    if t.nameless(n) {
        t.gone_node(n);
    }
}

/// Node `n` moved from `from` to `to` (a name the table does not know the directory of is
/// dropped: the kernel looks the new one up when it needs it).
fn move_name(
    t: &mut Inodes,
    n: u64,
    from: &RelPath,
    fdir: Option<u64>,
    to: &RelPath,
    tdir: Option<u64>,
) {
    match (fdir, from.file_name(), tdir, to.file_name()) {
        (Some(fd), Some(fname), Some(td), Some(tname)) => t.rename(n, fd, fname, td, tname),
        (Some(fd), Some(fname), _, _) => t.unlink(fd, fname, n),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::inodes::ROOT;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("a valid path")
    }

    fn path_of(t: &Inodes, n: u64) -> Option<String> {
        t.path(n).map(|p| p.to_string())
    }

    /// The failback case: x moved to y beneath the mount, a new x created there.
    #[test]
    fn a_rename_beneath_the_mount_moves_the_name_and_tells_the_kernel() {
        let mut t = Inodes::new(2);
        t.register(ROOT, b"x", 11);
        let mut due = Vec::new();
        let rename = Op::Rename {
            from: p("x"),
            to: p("y"),
            flags: 0,
            from_ino: 11,
        };
        follow(&mut t, &rename, &mut due);
        assert_eq!(path_of(&t, 11).as_deref(), Some("y"));
        assert_eq!(
            due,
            vec![
                Stale::Entry(ROOT, b"x".to_vec()),
                Stale::Entry(ROOT, b"y".to_vec()),
                Stale::Inode(ROOT),
                Stale::Inode(11)
            ]
        );
        due.clear();
        let create = Op::Create {
            path: p("x"),
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        follow(&mut t, &create, &mut due);
        assert_eq!(
            due,
            vec![Stale::Entry(ROOT, b"x".to_vec()), Stale::Inode(ROOT)]
        );
        assert_eq!(path_of(&t, 11).as_deref(), Some("y"), "y keeps its node");
    }

    #[test]
    fn a_rename_over_a_known_name_drops_the_replaced_node() {
        let mut t = Inodes::new(2);
        t.register(ROOT, b"d", 10);
        t.register(10, b"a", 11);
        t.register(ROOT, b"b", 12);
        let mut due = Vec::new();
        let rename = Op::Rename {
            from: p("d/a"),
            to: p("b"),
            flags: 0,
            from_ino: 11,
        };
        follow(&mut t, &rename, &mut due);
        assert_eq!(path_of(&t, 11).as_deref(), Some("b"));
        assert_eq!(path_of(&t, 12), None, "the replaced file has no name");
        // Its number may be reused: a new file with it gets a node of its own.
        assert_ne!(t.register(ROOT, b"c", 12), 12);
    }

    #[test]
    fn an_exchange_swaps_the_names() {
        let mut t = Inodes::new(2);
        t.register(ROOT, b"a", 11);
        t.register(ROOT, b"b", 12);
        let mut due = Vec::new();
        let swap = Op::Rename {
            from: p("a"),
            to: p("b"),
            flags: libc::RENAME_EXCHANGE,
            from_ino: 11,
        };
        follow(&mut t, &swap, &mut due);
        assert_eq!(path_of(&t, 11).as_deref(), Some("b"));
        assert_eq!(path_of(&t, 12).as_deref(), Some("a"));
    }

    #[test]
    fn removals_and_writes_beneath_the_mount() {
        let mut t = Inodes::new(2);
        t.register(ROOT, b"f", 11);
        t.register(ROOT, b"g", 12);
        let mut due = Vec::new();
        let write = Op::Truncate {
            path: p("g"),
            size: 0,
        };
        follow(&mut t, &write, &mut due);
        assert_eq!(due, vec![Stale::Inode(12)]);
        due.clear();
        follow(
            &mut t,
            &Op::Unlink {
                path: p("f"),
                nlink: 1,
            },
            &mut due,
        );
        assert_eq!(path_of(&t, 11), None);
        assert_eq!(
            due,
            vec![
                Stale::Entry(ROOT, b"f".to_vec()),
                Stale::Inode(ROOT),
                Stale::Inode(11)
            ],
            "the name, the directory's times and the inode's link count"
        );
        // Not known to the table: nothing to do.
        due.clear();
        follow(
            &mut t,
            &Op::Rmdir {
                path: p("nowhere/d"),
            },
            &mut due,
        );
        assert!(due.is_empty());
    }
}
