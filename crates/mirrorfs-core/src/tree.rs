//! The narrow trait a mirror tree is driven through, and the semantics of applying an [`Op`] to it.
//!
//! [`apply_op`] has two modes. *Strict* mode is used on a healthy mirror: the tree must be exactly
//! the state before the op, so any surprise (a file that should not exist, a missing file) is a
//! divergence and is reported. *Replay* mode is used after a crash for the records between the last
//! durable checkpoint and the last record that may have been applied: some of their effects may
//! already be on disk, so each op is applied in an idempotent way that reaches the same final state
//! either way. Replay is sound because the ops that are not idempotent ([`Op::needs_barrier`]) are
//! bracketed by checkpoints (see `applier`), so a replay window never contains one except as its
//! first, in-doubt record, which the applier resolves with the inode numbers saved in its intent.

use crate::op::{rename_flags, Op, Timespec};
use crate::path::RelPath;

/// The kind of a tree entry, from `lstat` (symlinks are never followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Special,
}

/// An error from a tree primitive, classified for the apply logic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TreeError {
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("{0}: already exists")]
    Exists(String),
    #[error("{0}: directory not empty")]
    NotEmpty(String),
    #[error("{0}: not a directory")]
    NotDir(String),
    #[error("{0}: is a directory")]
    IsDir(String),
    #[error("{0}: no space left on the mirror's device")]
    NoSpace(String),
    #[error("{path}: {msg}")]
    Other {
        path: String,
        errno: i32,
        msg: String,
    },
}

impl TreeError {
    /// True for errors that retrying later may cure (space freed, device back); false for
    /// divergence, which needs a resync.
    pub fn is_transient(&self) -> bool {
        matches!(self, TreeError::NoSpace(_) | TreeError::Other { .. })
    }
}

/// Primitive operations on a tree, all relative to its root, never following a symlink in any
/// component (an implementation must refuse to leave the root, e.g. with `openat2` and
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`).
pub trait Tree {
    fn kind(&mut self, path: &RelPath) -> Result<Option<EntryKind>, TreeError>;
    /// Inode number of the entry, or `None` if it does not exist.
    fn ino(&mut self, path: &RelPath) -> Result<Option<u64>, TreeError>;
    /// Exclusive create of an empty regular file with exactly this mode and owner.
    fn create(&mut self, path: &RelPath, mode: u32, uid: u32, gid: u32) -> Result<(), TreeError>;
    fn mkdir(&mut self, path: &RelPath, mode: u32, uid: u32, gid: u32) -> Result<(), TreeError>;
    fn mknod(
        &mut self,
        path: &RelPath,
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    ) -> Result<(), TreeError>;
    fn symlink(
        &mut self,
        path: &RelPath,
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<(), TreeError>;
    fn link(&mut self, from: &RelPath, to: &RelPath) -> Result<(), TreeError>;
    fn unlink(&mut self, path: &RelPath) -> Result<(), TreeError>;
    fn rmdir(&mut self, path: &RelPath) -> Result<(), TreeError>;
    /// Removes `path` and everything below it (replay only).
    fn remove_all(&mut self, path: &RelPath) -> Result<(), TreeError>;
    fn rename(&mut self, from: &RelPath, to: &RelPath, flags: u32) -> Result<(), TreeError>;
    fn write(&mut self, path: &RelPath, offset: u64, data: &[u8]) -> Result<(), TreeError>;
    fn truncate(&mut self, path: &RelPath, size: u64) -> Result<(), TreeError>;
    fn fallocate(
        &mut self,
        path: &RelPath,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> Result<(), TreeError>;
    fn chmod(&mut self, path: &RelPath, mode: u32) -> Result<(), TreeError>;
    fn chown(
        &mut self,
        path: &RelPath,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(), TreeError>;
    fn utimes(
        &mut self,
        path: &RelPath,
        atime: Option<Timespec>,
        mtime: Option<Timespec>,
    ) -> Result<(), TreeError>;
    fn setxattr(
        &mut self,
        path: &RelPath,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<(), TreeError>;
    fn removexattr(&mut self, path: &RelPath, name: &[u8]) -> Result<(), TreeError>;
    /// **B1**: makes every change applied so far durable (`syncfs`).
    fn sync(&mut self) -> Result<(), TreeError>;
}

/// Applies `op` to `tree`; see the module documentation for `replay`.
pub fn apply_op<T: Tree + ?Sized>(tree: &mut T, op: &Op, replay: bool) -> Result<(), TreeError> {
    if !replay {
        return apply_strict(tree, op);
    }
    // What is at an op's path during a replay may be a *later* incarnation of it (created by a
    // record further on in the window that the crash kept). Creates therefore replace whatever is
    // there, a directory included: everything below a directory created in the window is created
    // in the window too, so the records that follow rebuild it. Ops on an entry of a kind they
    // cannot apply to are about an entry a later record replaced, and have nothing to do. A
    // missing parent (or one that is no longer a directory) was removed or replaced by a later
    // record too, with everything the window put below it.
    match op {
        Op::Create { path, .. }
        | Op::Mknod { path, .. }
        | Op::Symlink { path, .. }
        | Op::Mkdir { path, .. } => {
            clear(tree, path)?;
            parent_gone_ok(apply_strict(tree, op))
        }
        Op::Link { from, to } => {
            if replay_kind(tree, from)?.is_none() {
                // The source was removed later in the window; `to` persisted or will be recreated.
                return Ok(());
            }
            clear(tree, to)?;
            parent_gone_ok(tree.link(from, to))
        }
        Op::Unlink { path, .. } => tolerate(tree.unlink(path)),
        Op::Rmdir { path } => match tree.rmdir(path) {
            Err(TreeError::NotEmpty(_)) => tree.remove_all(path),
            other => tolerate(other),
        },
        Op::Rename {
            from, to, flags, ..
        } => {
            if replay_kind(tree, from)?.is_none() {
                return Ok(());
            }
            if flags & rename_flags::NOREPLACE != 0 {
                clear(tree, to)?;
            }
            apply_strict(tree, op).or_else(|e| match e {
                TreeError::NotEmpty(_) => {
                    tree.remove_all(to)?;
                    tree.rename(from, to, *flags)
                }
                e => Err(e),
            })
        }
        Op::SetXattr {
            path, name, value, ..
        } => match replay_kind(tree, path)? {
            // Symlinks and special files carry security.* and trusted.* xattrs too.
            Some(_) => tolerate(tree.setxattr(path, name, value, 0)),
            None => Ok(()),
        },
        Op::RemoveXattr { path, name } => match replay_kind(tree, path)? {
            Some(_) => match tree.removexattr(path, name) {
                Err(TreeError::Other { errno, .. }) if errno == ENODATA => Ok(()),
                other => tolerate(other),
            },
            None => Ok(()),
        },
        Op::Write { path, .. } | Op::Truncate { path, .. } | Op::Fallocate { path, .. } => {
            match replay_kind(tree, path)? {
                Some(EntryKind::File) => tolerate(apply_strict(tree, op)),
                _ => Ok(()),
            }
        }
        Op::SetMode { path, .. } => match replay_kind(tree, path)? {
            // A symlink's mode cannot be changed (EOPNOTSUPP): it is a later incarnation.
            None | Some(EntryKind::Symlink) => Ok(()),
            Some(_) => tolerate(apply_strict(tree, op)),
        },
        Op::SetOwner { .. } | Op::SetTimes { .. } => tolerate(apply_strict(tree, op)),
        Op::Abort { .. } | Op::SyncDone { .. } => Ok(()),
        Op::Sync { op, .. } => apply_op(tree, op, true),
    }
}

/// `ENODATA` on Linux: the attribute does not exist.
pub const ENODATA: i32 = 61;

fn tolerate(r: Result<(), TreeError>) -> Result<(), TreeError> {
    match r {
        Err(
            TreeError::NotFound(_)
            | TreeError::NotDir(_)
            | TreeError::IsDir(_)
            | TreeError::Exists(_),
        ) => Ok(()),
        other => other,
    }
}

/// The kind of the entry at `path` during a replay; `None` also when a component on the way is
/// missing or not a directory (a later record changed the tree there).
fn replay_kind<T: Tree + ?Sized>(
    tree: &mut T,
    path: &RelPath,
) -> Result<Option<EntryKind>, TreeError> {
    match tree.kind(path) {
        Err(TreeError::NotFound(_) | TreeError::NotDir(_)) => Ok(None),
        other => other,
    }
}

/// A create in a replay whose parent a later record removed: nothing to do.
fn parent_gone_ok(r: Result<(), TreeError>) -> Result<(), TreeError> {
    match r {
        Err(TreeError::NotFound(_) | TreeError::NotDir(_)) => Ok(()),
        other => other,
    }
}

fn clear<T: Tree + ?Sized>(tree: &mut T, path: &RelPath) -> Result<(), TreeError> {
    match replay_kind(tree, path)? {
        None => Ok(()),
        Some(EntryKind::Dir) => tree.remove_all(path),
        Some(_) => tree.unlink(path),
    }
}

fn apply_strict<T: Tree + ?Sized>(tree: &mut T, op: &Op) -> Result<(), TreeError> {
    match op {
        Op::Create {
            path,
            mode,
            uid,
            gid,
        } => tree.create(path, *mode, *uid, *gid),
        Op::Mkdir {
            path,
            mode,
            uid,
            gid,
        } => tree.mkdir(path, *mode, *uid, *gid),
        Op::Mknod {
            path,
            mode,
            rdev,
            uid,
            gid,
        } => tree.mknod(path, *mode, *rdev, *uid, *gid),
        Op::Symlink {
            path,
            target,
            uid,
            gid,
        } => tree.symlink(path, target, *uid, *gid),
        Op::Link { from, to } => tree.link(from, to),
        Op::Unlink { path, .. } => tree.unlink(path),
        Op::Rmdir { path } => tree.rmdir(path),
        Op::Rename {
            from, to, flags, ..
        } => tree.rename(from, to, *flags),
        Op::Write { path, offset, data } => tree.write(path, *offset, data),
        Op::Truncate { path, size } => tree.truncate(path, *size),
        Op::Fallocate {
            path,
            mode,
            offset,
            len,
        } => tree.fallocate(path, *mode, *offset, *len),
        Op::SetMode { path, mode } => tree.chmod(path, *mode),
        Op::SetOwner { path, uid, gid } => tree.chown(path, *uid, *gid),
        Op::SetTimes { path, atime, mtime } => tree.utimes(path, *atime, *mtime),
        Op::SetXattr {
            path,
            name,
            value,
            flags,
        } => tree.setxattr(path, name, value, *flags),
        Op::RemoveXattr { path, name } => tree.removexattr(path, name),
        Op::Abort { .. } | Op::SyncDone { .. } => Ok(()),
        Op::Sync { op, .. } => apply_op(tree, op, true),
    }
}
