//! The one hardened way of changing a directory tree: [`Root`] resolves every path beneath a
//! directory handle with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`,
//! one chunk of at most `PATH_MAX - 1` bytes at a time (so a path from the root may be longer than
//! `PATH_MAX`), and acts on the final name through its parent's handle without following it. The
//! FUSE shell applies every change to the backing tree through it, and [`DirTree`] (the core's
//! `Tree` trait on a real directory) applies the journal to mirrors and resolves the in-doubt
//! record after a crash through it: no path can leave its root, whatever symlinks the tree holds
//! or a local user plants while a change is on its way.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use mirrorfs_core::op::Timespec;
use mirrorfs_core::path::RelPath;
use mirrorfs_core::tree::{EntryKind, Tree, TreeError};

use crate::sys;

/// Longest path given to one `openat2` call (`PATH_MAX` less the NUL).
const CHUNK_BYTES: usize = libc::PATH_MAX as usize - 1;

/// A directory tree's root: every path is resolved beneath it, never through a symlink.
/// Errors are the system's own (`errno` exact), for the FUSE shell to return to applications.
pub struct Root {
    fd: OwnedFd,
}

/// The directory an entry is in: the root itself, or a directory opened beneath it (`O_PATH`).
pub enum Dir<'a> {
    Root(BorrowedFd<'a>),
    Sub(OwnedFd),
}

impl AsFd for Dir<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Dir::Root(fd) => *fd,
            Dir::Sub(fd) => fd.as_fd(),
        }
    }
}

/// An entry to remove and its parent's handle ([`Root::removal`]).
pub struct Removal<'r, 'p> {
    parent: Dir<'r>,
    name: &'p OsStr,
    /// The entry as its parent's handle showed it before the removal.
    pub lstat: io::Result<libc::stat>,
}

impl Removal<'_, '_> {
    /// `unlinkat` of the entry (`AT_REMOVEDIR` with `dir`); then the parent's `stat` (an `fstat`
    /// of the handle the removal used, so of the directory it changed), `None` if that fails:
    /// the removal stands either way.
    pub fn remove(&self, dir: bool) -> io::Result<Option<libc::stat>> {
        let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
        sys::unlinkat(self.parent.as_fd(), self.name, flags)?;
        Ok(sys::fstat(self.parent.as_fd()).ok())
    }
}

fn einval(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what}: not on the root"),
    )
}

/// `(parent, name)` of a non-empty path, without allocating.
fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// Exclusive create of the regular file `name` in `dir` with exactly `mode` and owner, opened
/// with `flags`. The new file is looked at first (`fstat`): the owner is set only if it is not
/// already the wanted one (a process creates files as its own user and group, or the group of a
/// set-group-ID directory), the mode only if the owner was set (a `chown` may clear the set-ID
/// bits) or the mode differs (the umask, a default ACL or the set-group-ID rule took bits off).
/// One `fstat` instead of an `fchown` and an `fchmod` that each change the inode (its ctime) for
/// nothing: a mirror creating files as their owner, the common case, skips both.
fn create_in(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: i32,
    mode: u32,
    uid: u32,
    gid: u32,
) -> io::Result<OwnedFd> {
    let perm = mode & 0o7777;
    let fd = sys::openat(
        dir,
        name,
        flags | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        perm,
    )?;
    let st = sys::fstat(fd.as_fd())?;
    let owned = st.st_uid == uid && st.st_gid == gid;
    if !owned {
        sys::fchown(fd.as_fd(), uid, gid)?;
    }
    if !owned || st.st_mode & 0o7777 != perm {
        sys::fchmod(fd.as_fd(), perm)?;
    }
    Ok(fd)
}

/// Gives the directory or special file `name` just made in `dir` exactly `mode` and owner, as
/// [`create_in`] does for a regular file: looked at first (`fstatat`, not following a final
/// symlink), the owner set only if it is not already the wanted one, the mode only if the owner
/// was set (a `chown` may clear set-ID bits) or the mode differs (the umask, a default ACL, a
/// set-group-ID parent). A mirror making directories as their owner with a mode its umask keeps,
/// the common case, makes one call instead of two inode changes.
fn own_made(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, uid: u32, gid: u32) -> io::Result<()> {
    let perm = mode & 0o7777;
    let st = sys::fstatat(dir, name, libc::AT_SYMLINK_NOFOLLOW)?;
    let owned = st.st_uid == uid && st.st_gid == gid;
    if !owned {
        sys::fchownat(dir, name, Some(uid), Some(gid))?;
    }
    if !owned || st.st_mode & 0o7777 != perm {
        sys::fchmodat_nofollow(dir, name, perm)?;
    }
    Ok(())
}

/// Opens `path` (bytes of a valid `RelPath`; empty is `root` itself) beneath `root`.
fn open_bytes_in(root: BorrowedFd<'_>, path: &[u8], flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let mut dir: Option<OwnedFd> = None;
    let mut rest = if path.is_empty() { &b"."[..] } else { path };
    while rest.len() > CHUNK_BYTES {
        // Components are at most NAME_MAX bytes, so a chunk always ends at a slash.
        let cut = rest[..=CHUNK_BYTES]
            .iter()
            .rposition(|b| *b == b'/')
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
        let at = dir.as_ref().map_or(root, |d| d.as_fd());
        let next = sys::open_beneath(
            at,
            OsStr::from_bytes(&rest[..cut]),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        dir = Some(next);
        rest = &rest[cut + 1..];
    }
    let at = dir.as_ref().map_or(root, |d| d.as_fd());
    sys::open_beneath(at, OsStr::from_bytes(rest), flags, mode)
}

/// [`Root::open_at`] for a root held as a plain descriptor (the walks of the live copies).
pub fn open_in(root: BorrowedFd<'_>, path: &RelPath, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    open_bytes_in(root, path.as_bytes(), flags, mode)
}

/// [`Root::lstat`] for a root held as a plain descriptor.
pub fn lstat_in(root: BorrowedFd<'_>, path: &RelPath) -> io::Result<libc::stat> {
    if path.is_root() {
        return sys::fstat(root);
    }
    let (dir, name) = split(path.as_bytes());
    if dir.is_empty() {
        return sys::lstatat(root, OsStr::from_bytes(name));
    }
    let d = open_bytes_in(root, dir, libc::O_PATH | libc::O_DIRECTORY, 0)?;
    sys::lstatat(d.as_fd(), OsStr::from_bytes(name))
}

impl Root {
    /// Opens the directory at `root` (which is trusted: it comes from the command line).
    pub fn open(root: &Path) -> io::Result<Root> {
        let f = File::open(root)?;
        if !f.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", root.display()),
            ));
        }
        Ok(Root { fd: f.into() })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn open_bytes(&self, path: &[u8], flags: i32, mode: u32) -> io::Result<OwnedFd> {
        open_bytes_in(self.fd(), path, flags, mode)
    }

    /// Opens `path` beneath the root with `flags` (add `O_NOFOLLOW` not to follow a final
    /// symlink; with `O_PATH | O_NOFOLLOW` a final symlink itself is opened).
    pub fn open_at(&self, path: &RelPath, flags: i32, mode: u32) -> io::Result<OwnedFd> {
        self.open_bytes(path.as_bytes(), flags, mode)
    }

    /// The entry at `path` itself (`O_PATH`, a final symlink not followed).
    pub fn entry(&self, path: &RelPath) -> io::Result<OwnedFd> {
        self.open_at(path, libc::O_PATH | libc::O_NOFOLLOW, 0)
    }

    /// The directory holding `path` and its final name; `EINVAL` for the root.
    pub fn parent<'a>(&self, path: &'a RelPath) -> io::Result<(Dir<'_>, &'a OsStr)> {
        if path.is_root() {
            return Err(einval("an operation on the root itself"));
        }
        let (dir, name) = split(path.as_bytes());
        let dir = if dir.is_empty() {
            Dir::Root(self.fd())
        } else {
            Dir::Sub(self.open_bytes(dir, libc::O_PATH | libc::O_DIRECTORY, 0)?)
        };
        Ok((dir, OsStr::from_bytes(name)))
    }

    /// `lstat` of `path`: one `fstatat` for an entry of the root, else `openat2` of the parent
    /// and `fstatat` in it.
    pub fn lstat(&self, path: &RelPath) -> io::Result<libc::stat> {
        if path.is_root() {
            return sys::fstat(self.fd());
        }
        let (dir, name) = self.parent(path)?;
        sys::lstatat(dir.as_fd(), name)
    }

    pub fn readlink(&self, path: &RelPath) -> io::Result<Vec<u8>> {
        let (dir, name) = self.parent(path)?;
        sys::readlinkat(dir.as_fd(), name)
    }

    /// Exclusive create of a regular file with exactly `mode` and owner; returns it opened with
    /// `flags` (an access mode and status flags such as `O_APPEND`, `O_DIRECT`).
    pub fn create(
        &self,
        path: &RelPath,
        flags: i32,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> io::Result<OwnedFd> {
        let (dir, name) = self.parent(path)?;
        create_in(dir.as_fd(), name, flags, mode, uid, gid)
    }

    pub fn mkdir(&self, path: &RelPath, mode: u32, uid: u32, gid: u32) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        sys::mkdirat(dir.as_fd(), name, mode & 0o7777)?;
        own_made(dir.as_fd(), name, mode, uid, gid)
    }

    /// A special file (or a regular one, created exclusively) with exactly this mode and owner.
    pub fn mknod(
        &self,
        path: &RelPath,
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    ) -> io::Result<()> {
        if mode & libc::S_IFMT == libc::S_IFREG {
            return self
                .create(path, libc::O_WRONLY | libc::O_NONBLOCK, mode, uid, gid)
                .map(drop);
        }
        let (dir, name) = self.parent(path)?;
        sys::mknodat(dir.as_fd(), name, mode, rdev)?;
        own_made(dir.as_fd(), name, mode, uid, gid)
    }

    pub fn symlink(&self, path: &RelPath, target: &[u8], uid: u32, gid: u32) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        sys::symlinkat(target, dir.as_fd(), name)?;
        sys::fchownat(dir.as_fd(), name, Some(uid), Some(gid))
    }

    /// A hard link `to` of `from` (a final symlink is linked, not followed).
    pub fn link(&self, from: &RelPath, to: &RelPath) -> io::Result<()> {
        let (fdir, fname) = self.parent(from)?;
        let (tdir, tname) = self.parent(to)?;
        sys::linkat(fdir.as_fd(), fname, tdir.as_fd(), tname)
    }

    pub fn unlink(&self, path: &RelPath) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        sys::unlinkat(dir.as_fd(), name, 0)
    }

    pub fn rmdir(&self, path: &RelPath) -> io::Result<()> {
        let (dir, name) = self.parent(path)?;
        sys::unlinkat(dir.as_fd(), name, libc::AT_REMOVEDIR)
    }

    /// The entry at `path` about to be removed, looked at through its parent's handle: one
    /// `openat2` of the parent beneath the root for the entry's `lstat` (the link count an
    /// unlink records), the removal ([`Removal::remove`]) and the parent's times after it,
    /// instead of one for each (`docs/benchmarks.md`, "rm -r"). `lstat` is `None` when the entry
    /// cannot be looked at (the removal then fails as it would).
    pub fn removal<'p>(&self, path: &'p RelPath) -> io::Result<Removal<'_, 'p>> {
        let (parent, name) = self.parent(path)?;
        let lstat = sys::lstatat(parent.as_fd(), name);
        Ok(Removal {
            parent,
            name,
            lstat,
        })
    }

    /// `renameat2` with `flags` (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`, `RENAME_WHITEOUT`).
    pub fn rename(&self, from: &RelPath, to: &RelPath, flags: u32) -> io::Result<()> {
        let (fdir, fname) = self.parent(from)?;
        let (tdir, tname) = self.parent(to)?;
        sys::renameat2(fdir.as_fd(), fname, tdir.as_fd(), tname, flags)
    }

    /// chmod without following a final symlink (`EOPNOTSUPP` for a symlink, as `fchmodat2`).
    pub fn chmod(&self, path: &RelPath, mode: u32) -> io::Result<()> {
        if path.is_root() {
            return sys::fchmod(self.fd(), mode & 0o7777);
        }
        let (dir, name) = self.parent(path)?;
        sys::fchmodat_nofollow(dir.as_fd(), name, mode & 0o7777)
    }

    /// chown without following a final symlink; `None` leaves an id unchanged.
    pub fn chown(&self, path: &RelPath, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        if path.is_root() {
            return sys::fchownat(self.fd(), OsStr::new(""), uid, gid);
        }
        let (dir, name) = self.parent(path)?;
        sys::fchownat(dir.as_fd(), name, uid, gid)
    }

    pub fn utimes(
        &self,
        path: &RelPath,
        atime: Option<Timespec>,
        mtime: Option<Timespec>,
    ) -> io::Result<()> {
        if path.is_root() {
            return sys::utimensat(self.fd(), OsStr::new("."), atime, mtime);
        }
        let (dir, name) = self.parent(path)?;
        sys::utimensat(dir.as_fd(), name, atime, mtime)
    }

    /// Truncates the regular file at `path` (a final symlink is refused, a FIFO never blocks).
    pub fn truncate(&self, path: &RelPath, size: u64) -> io::Result<()> {
        let fd = self.open_at(
            path,
            libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            0,
        )?;
        sys::ftruncate(fd.as_fd(), size)
    }

    pub fn setxattr(
        &self,
        path: &RelPath,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> io::Result<()> {
        let fd = self.entry(path)?;
        sys::lsetxattr_fd(fd.as_fd(), name, value, flags)
    }

    pub fn removexattr(&self, path: &RelPath, name: &[u8]) -> io::Result<()> {
        let fd = self.entry(path)?;
        sys::lremovexattr_fd(fd.as_fd(), name)
    }
}

/// A mirror tree (or the backing tree during crash recovery) as the core's [`Tree`]: the
/// primitives of [`Root`], errors classified for the apply logic.
pub struct DirTree {
    root: Root,
    /// The file last written, kept open so a stream of writes does not reopen it each time.
    open_file: Option<(RelPath, OwnedFd)>,
    /// The directory last resolved for an op on one of its entries (path bytes, `O_PATH`
    /// handle), so a run of ops in one directory (an initial copy's creates, writes and times)
    /// does not resolve it again each time. Forgotten with `open_file` (every unlink, rmdir,
    /// rename: the only ops that can move or replace a directory) and at each `sync`.
    parent_dir: Option<(Vec<u8>, OwnedFd)>,
}

pub fn tree_err(path: &RelPath, e: io::Error) -> TreeError {
    let p = path.to_string();
    match e.raw_os_error() {
        Some(libc::ENOENT) => TreeError::NotFound(p),
        Some(libc::EEXIST) => TreeError::Exists(p),
        Some(libc::ENOTEMPTY) => TreeError::NotEmpty(p),
        Some(libc::ENOTDIR) => TreeError::NotDir(p),
        Some(libc::EISDIR) => TreeError::IsDir(p),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => TreeError::NoSpace(p),
        // A symlink where a directory was expected: the tree is not what the journal says.
        Some(libc::ELOOP) | Some(libc::EXDEV) => TreeError::NotDir(p),
        errno => TreeError::Other {
            path: p,
            errno: errno.unwrap_or(libc::EIO),
            msg: e.to_string(),
        },
    }
}

/// The kind of entry an `st_mode` describes.
pub fn kind_of(mode: u32) -> EntryKind {
    match mode & libc::S_IFMT {
        libc::S_IFREG => EntryKind::File,
        libc::S_IFDIR => EntryKind::Dir,
        libc::S_IFLNK => EntryKind::Symlink,
        _ => EntryKind::Special,
    }
}

impl DirTree {
    pub fn open(root: &Path) -> io::Result<DirTree> {
        Ok(DirTree {
            root: Root::open(root)?,
            open_file: None,
            parent_dir: None,
        })
    }

    fn file_for_write(&mut self, path: &RelPath) -> Result<BorrowedFd<'_>, TreeError> {
        let hit = matches!(&self.open_file, Some((p, _)) if p == path);
        if !hit {
            let fd = self
                .root
                .open_at(
                    path,
                    libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                    0,
                )
                .map_err(|e| tree_err(path, e))?;
            self.open_file = Some((path.clone(), fd));
        }
        match &self.open_file {
            Some((_, fd)) => Ok(fd.as_fd()),
            None => Err(TreeError::Other {
                path: path.to_string(),
                errno: libc::EIO,
                msg: "file cache".into(),
            }),
        }
    }

    /// Forgets the descriptors kept below the root (the file last written, the directory
    /// last resolved): for a tree kept between changes that another writer may have made
    /// meanwhile (`net::peer`), before it is used again.
    pub fn forget_open(&mut self) {
        self.open_file = None;
        self.parent_dir = None;
    }

    /// The handle of the directory holding `path` (cached, see `parent_dir`) and its final name.
    fn parent_of<'p>(&mut self, path: &'p RelPath) -> io::Result<(BorrowedFd<'_>, &'p OsStr)> {
        if path.is_root() {
            return Err(einval("an operation on the root itself"));
        }
        let (dir, name) = split(path.as_bytes());
        let name = OsStr::from_bytes(name);
        if dir.is_empty() {
            return Ok((self.root.fd(), name));
        }
        let hit = matches!(&self.parent_dir, Some((d, _)) if d.as_slice() == dir);
        if !hit {
            let fd = self
                .root
                .open_bytes(dir, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            self.parent_dir = Some((dir.to_vec(), fd));
        }
        match &self.parent_dir {
            Some((_, fd)) => Ok((fd.as_fd(), name)),
            None => Err(io::Error::other("directory cache")),
        }
    }

    /// `lstat` of `path` through the cached parent.
    fn lstat_cached(&mut self, path: &RelPath) -> io::Result<libc::stat> {
        if path.is_root() {
            return sys::fstat(self.root.fd());
        }
        let (dir, name) = self.parent_of(path)?;
        sys::lstatat(dir, name)
    }
}

impl Tree for DirTree {
    fn kind(&mut self, path: &RelPath) -> Result<Option<EntryKind>, TreeError> {
        match self.lstat_cached(path) {
            Ok(st) => Ok(Some(kind_of(st.st_mode))),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(tree_err(path, e)),
        }
    }

    fn ino(&mut self, path: &RelPath) -> Result<Option<u64>, TreeError> {
        match self.lstat_cached(path) {
            Ok(st) => Ok(Some(st.st_ino)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(tree_err(path, e)),
        }
    }

    fn create(&mut self, path: &RelPath, mode: u32, uid: u32, gid: u32) -> Result<(), TreeError> {
        let fd = self
            .parent_of(path)
            .and_then(|(dir, name)| create_in(dir, name, libc::O_WRONLY, mode, uid, gid))
            .map_err(|e| tree_err(path, e))?;
        self.open_file = Some((path.clone(), fd));
        Ok(())
    }

    fn mkdir(&mut self, path: &RelPath, mode: u32, uid: u32, gid: u32) -> Result<(), TreeError> {
        self.root
            .mkdir(path, mode, uid, gid)
            .map_err(|e| tree_err(path, e))
    }

    fn mknod(
        &mut self,
        path: &RelPath,
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    ) -> Result<(), TreeError> {
        self.root
            .mknod(path, mode, rdev, uid, gid)
            .map_err(|e| tree_err(path, e))
    }

    fn symlink(
        &mut self,
        path: &RelPath,
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<(), TreeError> {
        self.root
            .symlink(path, target, uid, gid)
            .map_err(|e| tree_err(path, e))
    }

    fn link(&mut self, from: &RelPath, to: &RelPath) -> Result<(), TreeError> {
        self.root.link(from, to).map_err(|e| tree_err(to, e))
    }

    fn unlink(&mut self, path: &RelPath) -> Result<(), TreeError> {
        self.forget_open();
        self.root.unlink(path).map_err(|e| tree_err(path, e))
    }

    fn rmdir(&mut self, path: &RelPath) -> Result<(), TreeError> {
        self.forget_open();
        self.root.rmdir(path).map_err(|e| tree_err(path, e))
    }

    fn remove_all(&mut self, path: &RelPath) -> Result<(), TreeError> {
        self.forget_open();
        match self.kind(path)? {
            None => Ok(()),
            Some(EntryKind::Dir) => {
                let fd = self
                    .root
                    .open_at(
                        path,
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                        0,
                    )
                    .map_err(|e| tree_err(path, e))?;
                for (name, _) in sys::read_dir_fd(fd.as_fd()).map_err(|e| tree_err(path, e))? {
                    let child = path.join(&name).map_err(|e| TreeError::Other {
                        path: path.to_string(),
                        errno: libc::EINVAL,
                        msg: e.to_string(),
                    })?;
                    self.remove_all(&child)?;
                }
                self.rmdir(path)
            }
            Some(_) => self.unlink(path),
        }
    }

    fn rename(&mut self, from: &RelPath, to: &RelPath, flags: u32) -> Result<(), TreeError> {
        self.forget_open();
        self.root
            .rename(from, to, flags)
            .map_err(|e| tree_err(from, e))
    }

    fn write(&mut self, path: &RelPath, offset: u64, data: &[u8]) -> Result<(), TreeError> {
        let fd = self.file_for_write(path)?;
        sys::pwrite_all(fd, data, offset).map_err(|e| tree_err(path, e))
    }

    fn truncate(&mut self, path: &RelPath, size: u64) -> Result<(), TreeError> {
        let fd = self.file_for_write(path)?;
        sys::ftruncate(fd, size).map_err(|e| tree_err(path, e))
    }

    fn fallocate(
        &mut self,
        path: &RelPath,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> Result<(), TreeError> {
        let fd = self.file_for_write(path)?;
        sys::fallocate(fd, mode, offset, len).map_err(|e| tree_err(path, e))
    }

    fn chmod(&mut self, path: &RelPath, mode: u32) -> Result<(), TreeError> {
        match self.root.chmod(path, mode) {
            // Symlink modes mean nothing on Linux (and cannot be changed): nothing to do.
            Err(e)
                if e.raw_os_error() == Some(libc::EOPNOTSUPP)
                    && self.kind(path)? == Some(EntryKind::Symlink) =>
            {
                Ok(())
            }
            other => other.map_err(|e| tree_err(path, e)),
        }
    }

    fn chown(
        &mut self,
        path: &RelPath,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(), TreeError> {
        self.root
            .chown(path, uid, gid)
            .map_err(|e| tree_err(path, e))
    }

    fn utimes(
        &mut self,
        path: &RelPath,
        atime: Option<Timespec>,
        mtime: Option<Timespec>,
    ) -> Result<(), TreeError> {
        if path.is_root() {
            return self
                .root
                .utimes(path, atime, mtime)
                .map_err(|e| tree_err(path, e));
        }
        self.parent_of(path)
            .and_then(|(dir, name)| sys::utimensat(dir, name, atime, mtime))
            .map_err(|e| tree_err(path, e))
    }

    fn setxattr(
        &mut self,
        path: &RelPath,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<(), TreeError> {
        self.root
            .setxattr(path, name, value, flags)
            .map_err(|e| tree_err(path, e))
    }

    fn removexattr(&mut self, path: &RelPath, name: &[u8]) -> Result<(), TreeError> {
        self.root
            .removexattr(path, name)
            .map_err(|e| tree_err(path, e))
    }

    fn sync(&mut self) -> Result<(), TreeError> {
        self.parent_dir = None;
        crate::trace::event("barrier_sync_start", format_args!(""));
        let r = sys::syncfs(self.root.fd()).map_err(|e| tree_err(&RelPath::root(), e));
        crate::trace::event("barrier_sync_end", format_args!(""));
        r
    }
}

impl DirTree {
    /// A descriptor of the tree's root of its own, for a `syncfs` on another thread (the
    /// mirror's checkpoint thread). A checkpoint forgets the cached parent directory as `sync`
    /// does, so a directory changed behind mirrorfs's back is resolved again within a
    /// checkpoint interval whichever thread syncs.
    pub fn sync_handle(&mut self) -> io::Result<OwnedFd> {
        self.parent_dir = None;
        self.root.fd().try_clone_to_owned()
    }

    /// The entry's mtime (`lstat`, beneath the root), or `None` if there is no such entry (or a
    /// component on the way is not a directory).
    pub fn mtime(&self, path: &RelPath) -> Result<Option<Timespec>, TreeError> {
        match self.root.lstat(path).map_err(|e| tree_err(path, e)) {
            Ok(st) => Ok(Some(Timespec {
                sec: st.st_mtime,
                nsec: st.st_mtime_nsec as u32,
            })),
            Err(TreeError::NotFound(_) | TreeError::NotDir(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn rel(s: &str) -> RelPath {
        RelPath::new(s).expect("valid path")
    }

    fn errno<T>(r: io::Result<T>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    #[test]
    fn a_symlink_in_an_ancestor_or_at_the_final_name_is_never_followed() {
        let t = tempfile::tempdir().expect("tempdir");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(outside.join("t")).expect("mkdir");
        std::fs::write(outside.join("t/f"), b"x").expect("write");
        std::fs::set_permissions(outside.join("t/f"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let root_dir = t.path().join("root");
        std::fs::create_dir(&root_dir).expect("mkdir root");
        std::os::unix::fs::symlink(&outside, root_dir.join("p")).expect("symlink p");
        std::os::unix::fs::symlink(outside.join("t/f"), root_dir.join("f")).expect("symlink f");
        let root = Root::open(&root_dir).expect("open root");
        let through = rel("p/t/f");
        assert_eq!(errno(root.chmod(&through, 0o600)), Some(libc::ELOOP));
        assert_eq!(
            errno(root.chown(&through, Some(1), Some(1))),
            Some(libc::ELOOP)
        );
        assert_eq!(errno(root.truncate(&through, 0)), Some(libc::ELOOP));
        assert_eq!(errno(root.utimes(&through, None, None)), Some(libc::ELOOP));
        assert_eq!(
            errno(root.setxattr(&through, b"user.x", b"1", 0)),
            Some(libc::ELOOP)
        );
        assert_eq!(errno(root.unlink(&through)), Some(libc::ELOOP));
        assert_eq!(
            errno(root.mkdir(&rel("p/t/new"), 0o755, 0, 0)),
            Some(libc::ELOOP)
        );
        assert_eq!(
            errno(root.create(&rel("p/t/new"), libc::O_WRONLY, 0o644, 0, 0)),
            Some(libc::ELOOP)
        );
        assert_eq!(errno(root.lstat(&through)), Some(libc::ELOOP));
        // The final name: the symlink itself, never its target.
        let f = rel("f");
        assert_eq!(errno(root.chmod(&f, 0o600)), Some(libc::EOPNOTSUPP));
        assert_eq!(errno(root.truncate(&f, 0)), Some(libc::ELOOP));
        root.chown(&f, Some(1), Some(1))
            .expect("lchown of the symlink");
        let st = root.lstat(&f).expect("lstat");
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(st.st_uid, 1);
        let target = std::fs::metadata(outside.join("t/f")).expect("stat outside");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (target.mode() & 0o7777, target.uid(), target.size()),
            (0o644, 0, 1),
            "the outside file is untouched"
        );
    }

    /// A removal opens the parent beneath the root once: never through a symlink, the entry's
    /// own `lstat` (a final symlink itself, its link count), and after the removal the parent's
    /// `stat`, the one the directory has (its mtime moved by the removal).
    #[test]
    fn a_removal_is_confined_and_gives_the_entry_and_then_its_parent_as_they_are() {
        let t = tempfile::tempdir().expect("tempdir");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(outside.join("t")).expect("mkdir");
        std::fs::write(outside.join("t/f"), b"x").expect("write");
        let root_dir = t.path().join("root");
        std::fs::create_dir_all(root_dir.join("d")).expect("mkdir root/d");
        std::fs::write(root_dir.join("d/f"), b"x").expect("write");
        std::fs::hard_link(root_dir.join("d/f"), root_dir.join("d/g")).expect("link");
        std::os::unix::fs::symlink(&outside, root_dir.join("p")).expect("symlink p");
        std::os::unix::fs::symlink(outside.join("t"), root_dir.join("d/s")).expect("symlink s");
        let root = Root::open(&root_dir).expect("open root");

        assert_eq!(errno(root.removal(&rel("p/t/f"))), Some(libc::ELOOP));
        assert!(outside.join("t/f").exists(), "nothing outside is touched");
        let (ds, df) = (rel("d/s"), rel("d/f"));
        let s = root.removal(&ds).expect("removal of d/s");
        let st = s.lstat.as_ref().expect("lstat of d/s");
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFLNK, "not followed");
        assert_eq!(errno(s.remove(true)), Some(libc::ENOTDIR));
        s.remove(false).expect("unlink of the symlink");
        assert!(
            outside.join("t/f").exists(),
            "the symlink's target is untouched"
        );

        let old = Timespec { sec: 1, nsec: 0 };
        root.utimes(&rel("d"), Some(old), Some(old))
            .expect("utimes");
        let f = root.removal(&df).expect("removal of d/f");
        assert_eq!(f.lstat.as_ref().expect("lstat").st_nlink, 2);
        let parent = f.remove(false).expect("unlink").expect("parent's stat");
        let now = root.lstat(&rel("d")).expect("lstat d");
        assert_eq!(
            (parent.st_ino, parent.st_mtime, parent.st_mtime_nsec),
            (now.st_ino, now.st_mtime, now.st_mtime_nsec),
            "the parent as it is after the removal"
        );
        assert!(parent.st_mtime > 1, "the removal moved the parent's mtime");
        assert!(!root_dir.join("d/f").exists() && root_dir.join("d/g").exists());
        let gone = root.removal(&df).expect("the parent is there");
        assert_eq!(errno(gone.lstat), Some(libc::ENOENT));
    }

    #[test]
    fn paths_longer_than_path_max_are_resolved_a_chunk_at_a_time() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = Root::open(t.path()).expect("open root");
        let mut p = RelPath::root();
        for i in 0..40u8 {
            p = p.join(&[b'a' + i; 250]).expect("join");
            root.mkdir(&p, 0o755, 0, 0).expect("mkdir deep");
        }
        assert!(p.as_bytes().len() > 2 * 4096);
        let f = p.join(b"file").expect("join");
        let fd = root
            .create(&f, libc::O_WRONLY, 0o640, 12, 34)
            .expect("create deep");
        sys::pwrite_all(fd.as_fd(), b"hello", 0).expect("write");
        root.chmod(&f, 0o600).expect("chmod deep");
        root.truncate(&f, 3).expect("truncate deep");
        let g = p.join(b"link").expect("join");
        root.link(&f, &g).expect("link deep");
        let st = root.lstat(&g).expect("lstat deep");
        assert_eq!(
            (
                st.st_mode & 0o7777,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_nlink
            ),
            (0o600, 12, 34, 3, 2)
        );
        root.rename(&g, &p.join(b"moved").expect("join"), 0)
            .expect("rename deep");
        assert_eq!(errno(root.lstat(&g)), Some(libc::ENOENT));
    }

    /// A create leaves exactly the wanted mode and owner whichever of its `fchown`/`fchmod` it
    /// needs: none (its own owner, a mode the umask keeps), the mode only (bits the umask or the
    /// set-group-ID rule took), or both (another owner; set-ID bits after the chown).
    #[test]
    fn a_create_gives_exactly_the_mode_and_owner_asked_for() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut tree = DirTree::open(t.path()).expect("open tree");
        // SAFETY: getters without arguments.
        let (me, my_group) = unsafe { (libc::geteuid(), libc::getegid()) };
        tree.mkdir(&rel("g"), 0o2777, me, 4242).expect("mkdir");
        let cases: &[(&str, u32, u32, u32)] = &[
            ("plain", 0o644, me, my_group),
            ("open", 0o666, me, my_group),
            ("setid", 0o6755, me, my_group),
            ("sticky", 0o1700, me, my_group),
            ("other", 0o4750, 12, 34),
            ("none", 0o000, me, my_group),
            // In a set-group-ID directory the new file takes the directory's group.
            ("g/inherits", 0o640, me, 4242),
            ("g/mine", 0o2640, me, my_group),
        ];
        for &(name, mode, uid, gid) in cases {
            if me != 0 && (uid != me || gid != my_group) {
                continue; // only root may give files away
            }
            tree.create(&rel(name), mode, uid, gid).expect("create");
            let st = Root::open(t.path())
                .expect("root")
                .lstat(&rel(name))
                .expect("lstat");
            assert_eq!(
                (st.st_mode & 0o7777, st.st_uid, st.st_gid),
                (mode, uid, gid),
                "{name}"
            );
        }
    }

    /// A mkdir and a mknod leave exactly the wanted mode and owner, as a create does, whichever
    /// of the `fchown`/`fchmod` they need (`own_made`).
    #[test]
    fn a_mkdir_and_a_mknod_give_exactly_the_mode_and_owner_asked_for() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut tree = DirTree::open(t.path()).expect("open tree");
        // SAFETY: getters without arguments.
        let (me, my_group) = unsafe { (libc::geteuid(), libc::getegid()) };
        tree.mkdir(&rel("g"), 0o2777, me, 4242).expect("mkdir");
        let cases: &[(&str, u32, u32, u32)] = &[
            ("plain", 0o755, me, my_group),
            ("open", 0o777, me, my_group),
            ("sticky", 0o1777, me, my_group),
            ("other", 0o750, 12, 34),
            ("none", 0o000, me, my_group),
            // In a set-group-ID directory a new directory takes its group and the bit.
            ("g/inherits", 0o2750, me, 4242),
            ("g/plain", 0o750, me, 4242),
            ("g/mine", 0o755, me, my_group),
        ];
        for &(name, mode, uid, gid) in cases {
            if me != 0 && (uid != me || gid != my_group) {
                continue; // only root may give files away
            }
            for (kind, suffix) in [(libc::S_IFDIR, "d"), (libc::S_IFIFO, "p")] {
                let path = rel(&format!("{name}-{suffix}"));
                if kind == libc::S_IFDIR {
                    tree.mkdir(&path, mode, uid, gid).expect("mkdir");
                } else {
                    Root::open(t.path())
                        .expect("root")
                        .mknod(&path, kind | mode, 0, uid, gid)
                        .expect("mknod");
                }
                let st = Root::open(t.path())
                    .expect("root")
                    .lstat(&path)
                    .expect("lstat");
                assert_eq!(
                    (
                        st.st_mode & libc::S_IFMT,
                        st.st_mode & 0o7777,
                        st.st_uid,
                        st.st_gid
                    ),
                    (kind, mode, uid, gid),
                    "{name}-{suffix}"
                );
            }
        }
    }

    /// The cached parent directory never outlives a rename or removal of it: creates, kinds and
    /// times after one land in the directory the path names now.
    #[test]
    fn the_cached_parent_follows_renames_and_removals() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut tree = DirTree::open(t.path()).expect("open tree");
        let ts = Timespec {
            sec: 1_000,
            nsec: 0,
        };
        tree.mkdir(&rel("d"), 0o755, 0, 0).expect("mkdir d");
        tree.create(&rel("d/a"), 0o644, 0, 0).expect("create d/a");
        tree.rename(&rel("d"), &rel("e"), 0).expect("rename d e");
        tree.mkdir(&rel("d"), 0o755, 0, 0).expect("mkdir d again");
        tree.create(&rel("d/b"), 0o644, 0, 0).expect("create d/b");
        tree.utimes(&rel("d/b"), None, Some(ts))
            .expect("utimes d/b");
        assert!(t.path().join("d/b").is_file() && !t.path().join("e/b").exists());
        assert_eq!(tree.kind(&rel("d/a")).expect("kind"), None);
        assert_eq!(tree.kind(&rel("e/a")).expect("kind"), Some(EntryKind::File));
        assert_eq!(tree.mtime(&rel("d/b")).expect("mtime"), Some(ts));
        tree.remove_all(&rel("d")).expect("remove d");
        tree.mkdir(&rel("d"), 0o700, 0, 0)
            .expect("mkdir d a third time");
        assert_eq!(tree.kind(&rel("d/b")).expect("kind"), None);
        tree.create(&rel("d/c"), 0o600, 0, 0).expect("create d/c");
        assert!(t.path().join("d/c").is_file());
        // Changed behind the tree's back: seen again after a checkpoint.
        std::fs::rename(t.path().join("d"), t.path().join("f")).expect("external rename");
        std::fs::create_dir(t.path().join("d")).expect("external mkdir");
        tree.sync().expect("sync");
        tree.create(&rel("d/x"), 0o600, 0, 0).expect("create d/x");
        assert!(t.path().join("d/x").is_file() && !t.path().join("f/x").exists());
    }
}
