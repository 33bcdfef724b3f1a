//! The operation model: every change to a mirrored tree is one [`Op`].
//!
//! Ops name files by [`RelPath`] and carry absolute values (a resolved time, a final mode), so that
//! applying one to a tree is deterministic. Ops that a crash may leave half-applied on a mirror are
//! re-applied on recovery; see `applier` for which ops are idempotent and which need a barrier.

use crate::path::RelPath;

/// Largest payload of a single `Write` op. Larger writes are split by the producer.
pub const WRITE_BYTES_MAX: usize = 16 << 20;
/// Largest symlink target, xattr name or xattr value.
pub const XATTR_VALUE_BYTES_MAX: usize = 64 << 10;
pub const XATTR_NAME_BYTES_MAX: usize = 255;

/// A point in time, as in `struct timespec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

/// `renameat2` flags carried by [`Op::Rename`].
pub mod rename_flags {
    pub const NOREPLACE: u32 = 1;
    pub const EXCHANGE: u32 = 2;
}

/// One change to a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A new, empty regular file.
    Create {
        path: RelPath,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Mkdir {
        path: RelPath,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// A FIFO, socket, or character or block device (`mode` carries the type bits).
    Mknod {
        path: RelPath,
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    },
    Symlink {
        path: RelPath,
        target: Vec<u8>,
        uid: u32,
        gid: u32,
    },
    /// A new name `to` for the existing file `from`.
    Link {
        from: RelPath,
        to: RelPath,
    },
    /// `nlink` is the link count the file had before the unlink; a file with other names needs a
    /// barrier on the mirror (see `applier`).
    Unlink {
        path: RelPath,
        nlink: u32,
    },
    Rmdir {
        path: RelPath,
    },
    /// `from_ino` is the primary's inode number of `from`, used only to resolve an in-doubt rename
    /// on the primary after a crash.
    Rename {
        from: RelPath,
        to: RelPath,
        flags: u32,
        from_ino: u64,
    },
    Write {
        path: RelPath,
        offset: u64,
        data: Vec<u8>,
    },
    Truncate {
        path: RelPath,
        size: u64,
    },
    Fallocate {
        path: RelPath,
        mode: i32,
        offset: u64,
        len: u64,
    },
    SetMode {
        path: RelPath,
        mode: u32,
    },
    /// `lchown`: `None` leaves the id unchanged.
    SetOwner {
        path: RelPath,
        uid: Option<u32>,
        gid: Option<u32>,
    },
    /// `utimensat(AT_SYMLINK_NOFOLLOW)` with resolved times: `None` leaves a time unchanged.
    SetTimes {
        path: RelPath,
        atime: Option<Timespec>,
        mtime: Option<Timespec>,
    },
    SetXattr {
        path: RelPath,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: i32,
    },
    RemoveXattr {
        path: RelPath,
        name: Vec<u8>,
    },
    /// The op recorded as `seq` failed on the primary and must not be applied anywhere.
    Abort {
        seq: u64,
    },
    /// Part of the initial copy of one mirror (identified by `mirror`): only that mirror applies
    /// `op` (idempotently); every other consumer skips it. `op` is never itself a `Sync`.
    Sync {
        mirror: u32,
        op: Box<Op>,
    },
    /// The initial copy of `mirror` is complete: from the next record on it is a consistent mirror.
    SyncDone {
        mirror: u32,
    },
    /// An application opened a group of changes that mirrors show all together or not at all
    /// (`group`: group-atomic mirroring). No change to any tree.
    GroupBegin,
    /// The group opened by the matching `GroupBegin` is complete. No change to any tree.
    GroupEnd,
}

/// Numeric tags of ops in the journal and on the wire. Never renumber: they are on disk.
pub mod kind {
    pub const CREATE: u8 = 1;
    pub const MKDIR: u8 = 2;
    pub const MKNOD: u8 = 3;
    pub const SYMLINK: u8 = 4;
    pub const LINK: u8 = 5;
    pub const UNLINK: u8 = 6;
    pub const RMDIR: u8 = 7;
    pub const RENAME: u8 = 8;
    pub const WRITE: u8 = 9;
    pub const TRUNCATE: u8 = 10;
    pub const FALLOCATE: u8 = 11;
    pub const SET_MODE: u8 = 12;
    pub const SET_OWNER: u8 = 13;
    pub const SET_TIMES: u8 = 14;
    pub const SET_XATTR: u8 = 15;
    pub const REMOVE_XATTR: u8 = 16;
    pub const ABORT: u8 = 17;
    pub const SYNC: u8 = 18;
    pub const SYNC_DONE: u8 = 19;
    pub const GROUP_BEGIN: u8 = 20;
    pub const GROUP_END: u8 = 21;
}

/// The one list of the names each op carries, for [`Op::names`] and [`Op::names_mut`] (`$op`
/// is `&Op` or `&mut Op`; the bindings follow): `[first, second]`, each `Some((name, new))`.
macro_rules! names_of {
    ($op:expr) => {
        match $op {
            Op::Create { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Mknod { path, .. }
            | Op::Symlink { path, .. } => [Some((path, true)), None],
            Op::Unlink { path, .. }
            | Op::Rmdir { path }
            | Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::Fallocate { path, .. }
            | Op::SetMode { path, .. }
            | Op::SetOwner { path, .. }
            | Op::SetTimes { path, .. }
            | Op::SetXattr { path, .. }
            | Op::RemoveXattr { path, .. } => [Some((path, false)), None],
            Op::Link { from, to } | Op::Rename { from, to, .. } => {
                [Some((from, false)), Some((to, true))]
            }
            Op::Abort { .. }
            | Op::Sync { .. }
            | Op::SyncDone { .. }
            | Op::GroupBegin
            | Op::GroupEnd => [None, None],
        }
    };
}

impl Op {
    pub fn kind(&self) -> u8 {
        match self {
            Op::Create { .. } => kind::CREATE,
            Op::Mkdir { .. } => kind::MKDIR,
            Op::Mknod { .. } => kind::MKNOD,
            Op::Symlink { .. } => kind::SYMLINK,
            Op::Link { .. } => kind::LINK,
            Op::Unlink { .. } => kind::UNLINK,
            Op::Rmdir { .. } => kind::RMDIR,
            Op::Rename { .. } => kind::RENAME,
            Op::Write { .. } => kind::WRITE,
            Op::Truncate { .. } => kind::TRUNCATE,
            Op::Fallocate { .. } => kind::FALLOCATE,
            Op::SetMode { .. } => kind::SET_MODE,
            Op::SetOwner { .. } => kind::SET_OWNER,
            Op::SetTimes { .. } => kind::SET_TIMES,
            Op::SetXattr { .. } => kind::SET_XATTR,
            Op::RemoveXattr { .. } => kind::REMOVE_XATTR,
            Op::Abort { .. } => kind::ABORT,
            Op::Sync { .. } => kind::SYNC,
            Op::SyncDone { .. } => kind::SYNC_DONE,
            Op::GroupBegin => kind::GROUP_BEGIN,
            Op::GroupEnd => kind::GROUP_END,
        }
    }

    /// A short name for logs and status.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Mkdir { .. } => "mkdir",
            Op::Mknod { .. } => "mknod",
            Op::Symlink { .. } => "symlink",
            Op::Link { .. } => "link",
            Op::Unlink { .. } => "unlink",
            Op::Rmdir { .. } => "rmdir",
            Op::Rename { .. } => "rename",
            Op::Write { .. } => "write",
            Op::Truncate { .. } => "truncate",
            Op::Fallocate { .. } => "fallocate",
            Op::SetMode { .. } => "chmod",
            Op::SetOwner { .. } => "chown",
            Op::SetTimes { .. } => "utimens",
            Op::SetXattr { .. } => "setxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::Abort { .. } => "abort",
            Op::Sync { .. } => "sync",
            Op::SyncDone { .. } => "sync-done",
            Op::GroupBegin => "group-begin",
            Op::GroupEnd => "group-end",
        }
    }

    /// The path the op changes (for `Rename` and `Link`, the source); `None` for `Abort`.
    pub fn path(&self) -> Option<&RelPath> {
        match self {
            Op::Sync { op, .. } => op.path(),
            op => op.names().next().map(|(p, _)| p),
        }
    }

    /// Every name the op carries (for `Rename` and `Link`, the source and then the
    /// destination), each with `true` where it names a new entry (the op makes the name: a
    /// create's path, the destination of a link or rename). None for `Sync` (its `op` has
    /// them), `Abort`, `SyncDone` and the group markers.
    pub fn names(&self) -> impl Iterator<Item = (&RelPath, bool)> {
        let [first, second] = names_of!(self);
        first.into_iter().chain(second)
    }

    /// [`Op::names`], to change them in place (to translate an op's names, say).
    pub fn names_mut(&mut self) -> impl Iterator<Item = (&mut RelPath, bool)> {
        let [first, second] = names_of!(self);
        first.into_iter().chain(second)
    }

    /// A rename's source and its `from_ino`, to set to the inode number of `from` at the site
    /// that applies the rename (what resolves an in-doubt rename there after a crash); `None`
    /// for every other op.
    pub fn rename_from_ino_mut(&mut self) -> Option<(&RelPath, &mut u64)> {
        match self {
            Op::Rename { from, from_ino, .. } => Some((from, from_ino)),
            _ => None,
        }
    }

    /// True for ops that a mirror must bracket with durability barriers, because re-applying them
    /// after a crash could change a different file than the one the primary changed.
    pub fn needs_barrier(&self) -> bool {
        match self {
            Op::Rename { .. } => true,
            Op::Unlink { nlink, .. } => *nlink > 1,
            _ => false,
        }
    }

    /// The entries whose mtime applying the op may set to the applier's own clock: the entry a
    /// create, write, truncate or fallocate changes, the parent directories of a namespace
    /// change, both names of a rename (the whiteout `RENAME_WHITEOUT` leaves at the source, the
    /// moved directory). The primary follows such a change with a `SetTimes` of the backing's
    /// times; after a crash between the two, recovery journals one for each of these paths that
    /// any retained record names (see `docs/journal.md`, "Times after a crash").
    pub fn mtime_paths(&self) -> Vec<RelPath> {
        let with_parent = |p: &RelPath| -> Vec<RelPath> {
            let mut v = vec![p.clone()];
            v.extend(p.parent());
            v
        };
        match self {
            Op::Create { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Mknod { path, .. }
            | Op::Symlink { path, .. } => with_parent(path),
            Op::Link { to, .. } => to.parent().into_iter().collect(),
            Op::Unlink { path, .. } | Op::Rmdir { path } => path.parent().into_iter().collect(),
            Op::Rename { from, to, .. } => {
                let mut v = with_parent(from);
                v.extend(with_parent(to));
                v
            }
            Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::Fallocate { path, .. }
            | Op::SetTimes { path, .. } => vec![path.clone()],
            Op::SetMode { .. }
            | Op::SetOwner { .. }
            | Op::SetXattr { .. }
            | Op::RemoveXattr { .. }
            | Op::Abort { .. }
            | Op::SyncDone { .. }
            | Op::GroupBegin
            | Op::GroupEnd => Vec::new(),
            Op::Sync { op, .. } => op.mtime_paths(),
        }
    }

    /// Bytes of file data the op carries.
    pub fn data_len(&self) -> usize {
        match self {
            Op::Write { data, .. } => data.len(),
            Op::Sync { op, .. } => op.data_len(),
            _ => 0,
        }
    }
}

/// A journaled op with its position in the total order of changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub op: Op,
}

/// Ops the core's tests make often: a file (0644) and a directory (0755) of root's at a path.
#[cfg(test)]
pub(crate) mod test_ops {
    use super::Op;
    use crate::path::RelPath;

    fn path(s: &str) -> RelPath {
        RelPath::new(s).expect("a valid path")
    }

    pub(crate) fn create(s: &str) -> Op {
        Op::Create {
            path: path(s),
            mode: 0o644,
            uid: 0,
            gid: 0,
        }
    }

    pub(crate) fn mkdir(s: &str) -> Op {
        Op::Mkdir {
            path: path(s),
            mode: 0o755,
            uid: 0,
            gid: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("valid path")
    }

    #[test]
    fn names_list_each_path_field_once_and_say_which_names_a_new_entry() {
        let names = |op: &Op| -> Vec<(String, bool)> {
            op.names()
                .map(|(p, new)| (String::from_utf8_lossy(p.as_bytes()).into_owned(), new))
                .collect()
        };
        let mut rename = Op::Rename {
            from: p("a/x"),
            to: p("b/y"),
            flags: 0,
            from_ino: 0,
        };
        assert_eq!(
            names(&rename),
            [("a/x".to_string(), false), ("b/y".to_string(), true)]
        );
        assert_eq!(rename.path(), Some(&p("a/x")));
        let mkdir = Op::Mkdir {
            path: p("d"),
            mode: 0o755,
            uid: 0,
            gid: 0,
        };
        assert_eq!(names(&mkdir), [("d".to_string(), true)]);
        let chmod = Op::SetMode {
            path: p("f"),
            mode: 0o600,
        };
        assert_eq!(names(&chmod), [("f".to_string(), false)]);
        // A `Sync` carries no names of its own; its path is its op's.
        let sync = Op::Sync {
            mirror: 1,
            op: Box::new(chmod),
        };
        assert!(names(&sync).is_empty());
        assert_eq!(sync.path(), Some(&p("f")));
        assert!(names(&Op::Abort { seq: 3 }).is_empty());
        assert_eq!(Op::Abort { seq: 3 }.path(), None);
        for (n, _) in rename.names_mut() {
            *n = p(&format!("z/{}", String::from_utf8_lossy(n.as_bytes())));
        }
        assert_eq!(
            names(&rename),
            [("z/a/x".to_string(), false), ("z/b/y".to_string(), true)]
        );
        if let Some((from, ino)) = rename.rename_from_ino_mut() {
            assert_eq!(from, &p("z/a/x"));
            *ino = 7;
        }
        assert!(matches!(rename, Op::Rename { from_ino: 7, .. }));
        assert!(mkdir.clone().rename_from_ino_mut().is_none());
    }

    #[test]
    fn mtime_paths_name_every_entry_an_op_gives_the_appliers_clock() {
        let create = Op::Create {
            path: p("d/f"),
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        assert_eq!(create.mtime_paths(), vec![p("d/f"), p("d")]);
        let top = Op::Mkdir {
            path: p("d"),
            mode: 0o755,
            uid: 0,
            gid: 0,
        };
        assert_eq!(top.mtime_paths(), vec![p("d"), RelPath::root()]);
        let rename = Op::Rename {
            from: p("a/x"),
            to: p("b/y"),
            flags: 0,
            from_ino: 1,
        };
        assert_eq!(
            rename.mtime_paths(),
            vec![p("a/x"), p("a"), p("b/y"), p("b")]
        );
        let link = Op::Link {
            from: p("a/x"),
            to: p("b/y"),
        };
        assert_eq!(link.mtime_paths(), vec![p("b")]);
        let unlink = Op::Unlink {
            path: p("a/x"),
            nlink: 1,
        };
        assert_eq!(unlink.mtime_paths(), vec![p("a")]);
        let write = Op::Write {
            path: p("a/x"),
            offset: 0,
            data: vec![1],
        };
        assert_eq!(write.mtime_paths(), vec![p("a/x")]);
        let sync = Op::Sync {
            mirror: 1,
            op: Box::new(write),
        };
        assert_eq!(sync.mtime_paths(), vec![p("a/x")]);
        let chmod = Op::SetMode {
            path: p("a/x"),
            mode: 0o600,
        };
        assert!(chmod.mtime_paths().is_empty());
    }
}
