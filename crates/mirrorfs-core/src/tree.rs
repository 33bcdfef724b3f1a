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
        // Symlinks and special files carry security.* and trusted.* xattrs too, but never user.*
        // ones (Linux refuses them with EPERM). The primary's op succeeded, so its entry could
        // carry the attribute: a symlink or special file there now is a later incarnation, which
        // a later record of the window recreated (and which replay recreates again), so there is
        // nothing to do. Any other error, EPERM included, is still reported.
        Op::SetXattr {
            path, name, value, ..
        } => match replay_kind(tree, path)? {
            None => Ok(()),
            Some(k) if !carries_xattr(k, name) => Ok(()),
            Some(_) => tolerate(tree.setxattr(path, name, value, 0)),
        },
        Op::RemoveXattr { path, name } => match replay_kind(tree, path)? {
            None => Ok(()),
            Some(k) if !carries_xattr(k, name) => Ok(()),
            Some(_) => match tree.removexattr(path, name) {
                Err(TreeError::Other { errno, .. }) if errno == ENODATA => Ok(()),
                other => tolerate(other),
            },
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
        Op::Abort { .. } | Op::SyncDone { .. } | Op::GroupBegin | Op::GroupEnd => Ok(()),
        Op::Sync { op, .. } => apply_op(tree, op, true),
    }
}

/// Whether an entry of kind `kind` can carry the extended attribute `name` at all: `user.*`
/// attributes exist only on regular files and directories (xattr(7)).
pub fn carries_xattr(kind: EntryKind, name: &[u8]) -> bool {
    !name.starts_with(b"user.") || matches!(kind, EntryKind::File | EntryKind::Dir)
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
        Op::Abort { .. } | Op::SyncDone { .. } | Op::GroupBegin | Op::GroupEnd => Ok(()),
        Op::Sync { op, .. } => apply_op(tree, op, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimTree;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("valid path")
    }

    /// Every attribute op, each applicable to the regular file `d/f` it was journaled for.
    fn attribute_ops() -> Vec<Op> {
        let f = p("d/f");
        let t = Timespec { sec: 7, nsec: 8 };
        vec![
            Op::SetXattr {
                path: f.clone(),
                name: b"user.a".to_vec(),
                value: b"v".to_vec(),
                flags: 0,
            },
            Op::RemoveXattr {
                path: f.clone(),
                name: b"user.old".to_vec(),
            },
            Op::SetMode {
                path: f.clone(),
                mode: 0o600,
            },
            Op::SetOwner {
                path: f.clone(),
                uid: Some(5),
                gid: Some(6),
            },
            Op::SetTimes {
                path: f.clone(),
                atime: Some(t),
                mtime: Some(t),
            },
            Op::Write {
                path: f.clone(),
                offset: 3,
                data: b"xyz".to_vec(),
            },
            Op::Truncate {
                path: f.clone(),
                size: 1,
            },
            Op::Fallocate {
                path: f,
                mode: 0,
                offset: 0,
                len: 4096,
            },
        ]
    }

    /// What replaces `d/f` later in the window: another kind of entry (or a new file).
    fn replacements() -> Vec<Op> {
        let f = p("d/f");
        vec![
            Op::Symlink {
                path: f.clone(),
                target: b"../elsewhere".to_vec(),
                uid: 0,
                gid: 0,
            },
            Op::Mknod {
                path: f.clone(),
                mode: 0o010644, // a FIFO
                rdev: 0,
                uid: 0,
                gid: 0,
            },
            Op::Mkdir {
                path: f.clone(),
                mode: 0o755,
                uid: 0,
                gid: 0,
            },
            Op::Create {
                path: f,
                mode: 0o640,
                uid: 0,
                gid: 0,
            },
        ]
    }

    fn base() -> SimTree {
        let mut t = SimTree::reference();
        t.mkdir(&p("d"), 0o755, 0, 0).expect("mkdir");
        t.create(&p("d/f"), 0o644, 1, 1).expect("create");
        t.write(&p("d/f"), 0, b"hello").expect("write");
        t.setxattr(&p("d/f"), b"user.old", b"1", 0)
            .expect("setxattr");
        t
    }

    /// A replay window `[attribute op on d/f, unlink d/f, <another kind> at d/f, an attribute of
    /// the new entry]`, cut by the crash after any prefix: replaying the whole window in replay
    /// mode reaches exactly the state of applying it once, in every case.
    #[test]
    fn replay_of_attribute_ops_onto_a_later_incarnation_reaches_the_same_state() {
        for attr in attribute_ops() {
            for new in replacements() {
                let window = vec![
                    attr.clone(),
                    Op::Unlink {
                        path: p("d/f"),
                        nlink: 1,
                    },
                    new.clone(),
                    Op::SetOwner {
                        path: p("d/f"),
                        uid: Some(9),
                        gid: None,
                    },
                ];
                let mut want = base();
                for op in &window {
                    apply_op(&mut want, op, false)
                        .unwrap_or_else(|e| panic!("strict {op:?} after {attr:?}: {e}"));
                }
                let want = want.snapshot();
                for kept in 0..=window.len() {
                    let mut t = base();
                    for op in &window[..kept] {
                        apply_op(&mut t, op, false).expect("strict prefix");
                    }
                    for op in &window {
                        apply_op(&mut t, op, true).unwrap_or_else(|e| {
                            panic!(
                                "replay of {op:?} ({} records kept, window {window:?}): {e}",
                                kept
                            )
                        });
                    }
                    let diff = t.snapshot().diff(&want, 5);
                    assert!(
                        diff.is_empty(),
                        "{kept} records kept, window {window:?}: {diff:?}"
                    );
                }
            }
        }
    }

    /// Strict mode still reports the surprise: a user xattr or a mode change on a symlink is a
    /// divergence on a healthy mirror.
    #[test]
    fn strict_mode_reports_attribute_ops_on_the_wrong_kind() {
        let mut t = base();
        t.symlink(&p("s"), b"d/f", 0, 0).expect("symlink");
        let on_link = [
            Op::SetXattr {
                path: p("s"),
                name: b"user.a".to_vec(),
                value: b"v".to_vec(),
                flags: 0,
            },
            Op::RemoveXattr {
                path: p("s"),
                name: b"user.a".to_vec(),
            },
            Op::SetMode {
                path: p("s"),
                mode: 0o600,
            },
            Op::Write {
                path: p("s"),
                offset: 0,
                data: b"x".to_vec(),
            },
        ];
        for op in &on_link {
            assert!(
                apply_op(&mut t, op, false).is_err(),
                "strict {op:?} succeeded"
            );
        }
        // A missing xattr that is not the kind's fault is still an error in replay mode only
        // when the entry could carry it: removing an absent one is the replayed no-op.
        assert_eq!(
            apply_op(
                &mut t,
                &Op::RemoveXattr {
                    path: p("d/f"),
                    name: b"user.none".to_vec()
                },
                true
            ),
            Ok(())
        );
    }
}
