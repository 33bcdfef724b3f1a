//! A mirror tree on a local directory (another disk, an NFS or CIFS mount): the real
//! implementation of the core's `Tree` trait. Every path is resolved with `openat2` and
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, so no path can leave the mirror's root.

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

pub struct DirTree {
    root: OwnedFd,
    /// The file last written, kept open so a stream of writes does not reopen it each time.
    open_file: Option<(RelPath, OwnedFd)>,
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

fn kind_of(mode: u32) -> EntryKind {
    match mode & libc::S_IFMT {
        libc::S_IFREG => EntryKind::File,
        libc::S_IFDIR => EntryKind::Dir,
        libc::S_IFLNK => EntryKind::Symlink,
        _ => EntryKind::Special,
    }
}

impl DirTree {
    pub fn open(root: &Path) -> io::Result<DirTree> {
        let f = File::open(root)?;
        if !f.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", root.display()),
            ));
        }
        Ok(DirTree {
            root: f.into(),
            open_file: None,
        })
    }

    /// The parent directory of `path`, opened beneath the root, and the final name.
    fn parent<'a>(&self, path: &'a RelPath) -> Result<(OwnedFd, &'a OsStr), TreeError> {
        let parent = path.parent().ok_or_else(|| TreeError::Other {
            path: ".".into(),
            errno: libc::EINVAL,
            msg: "operation on the mirror root".into(),
        })?;
        let name = path.file_name().unwrap_or_default();
        let fd = sys::open_beneath(
            self.root.as_fd(),
            parent.as_at_path(),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(|e| tree_err(&parent, e))?;
        Ok((fd, OsStr::from_bytes(name)))
    }

    fn open_path(&self, path: &RelPath) -> Result<OwnedFd, TreeError> {
        sys::open_beneath(
            self.root.as_fd(),
            path.as_at_path(),
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| tree_err(path, e))
    }

    fn file_for_write(&mut self, path: &RelPath) -> Result<BorrowedFd<'_>, TreeError> {
        let hit = matches!(&self.open_file, Some((p, _)) if p == path);
        if !hit {
            let fd = sys::open_beneath(
                self.root.as_fd(),
                path.as_at_path(),
                libc::O_WRONLY | libc::O_NOFOLLOW,
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

    fn forget_open(&mut self) {
        self.open_file = None;
    }
}

impl Tree for DirTree {
    fn kind(&mut self, path: &RelPath) -> Result<Option<EntryKind>, TreeError> {
        match self.parent_or_root_stat(path) {
            Ok(st) => Ok(Some(kind_of(st.st_mode))),
            Err(TreeError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn ino(&mut self, path: &RelPath) -> Result<Option<u64>, TreeError> {
        match self.parent_or_root_stat(path) {
            Ok(st) => Ok(Some(st.st_ino)),
            Err(TreeError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn create(&mut self, path: &RelPath, mode: u32, uid: u32, gid: u32) -> Result<(), TreeError> {
        let (dir, name) = self.parent(path)?;
        let fd = sys::openat(
            dir.as_fd(),
            name,
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
            mode & 0o7777,
        )
        .map_err(|e| tree_err(path, e))?;
        sys::fchown(fd.as_fd(), uid, gid).map_err(|e| tree_err(path, e))?;
        sys::fchmod(fd.as_fd(), mode & 0o7777).map_err(|e| tree_err(path, e))?;
        self.open_file = Some((path.clone(), fd));
        Ok(())
    }

    fn mkdir(&mut self, path: &RelPath, mode: u32, uid: u32, gid: u32) -> Result<(), TreeError> {
        let (dir, name) = self.parent(path)?;
        sys::mkdirat(dir.as_fd(), name, mode & 0o7777).map_err(|e| tree_err(path, e))?;
        sys::fchownat(dir.as_fd(), name, Some(uid), Some(gid)).map_err(|e| tree_err(path, e))?;
        sys::fchmodat(dir.as_fd(), name, mode & 0o7777).map_err(|e| tree_err(path, e))
    }

    fn mknod(
        &mut self,
        path: &RelPath,
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    ) -> Result<(), TreeError> {
        let (dir, name) = self.parent(path)?;
        sys::mknodat(dir.as_fd(), name, mode, rdev).map_err(|e| tree_err(path, e))?;
        sys::fchownat(dir.as_fd(), name, Some(uid), Some(gid)).map_err(|e| tree_err(path, e))?;
        sys::fchmodat(dir.as_fd(), name, mode & 0o7777).map_err(|e| tree_err(path, e))
    }

    fn symlink(
        &mut self,
        path: &RelPath,
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<(), TreeError> {
        let (dir, name) = self.parent(path)?;
        sys::symlinkat(target, dir.as_fd(), name).map_err(|e| tree_err(path, e))?;
        sys::fchownat(dir.as_fd(), name, Some(uid), Some(gid)).map_err(|e| tree_err(path, e))
    }

    fn link(&mut self, from: &RelPath, to: &RelPath) -> Result<(), TreeError> {
        let (fdir, fname) = self.parent(from)?;
        let (tdir, tname) = self.parent(to)?;
        let a = sys::cstr(fname).map_err(|e| tree_err(from, e))?;
        let b = sys::cstr(tname).map_err(|e| tree_err(to, e))?;
        use std::os::fd::AsRawFd;
        // SAFETY: valid descriptors and C strings; linkat does not follow the source symlink.
        let r = unsafe {
            libc::linkat(
                fdir.as_raw_fd(),
                a.as_ptr(),
                tdir.as_raw_fd(),
                b.as_ptr(),
                0,
            )
        };
        if r < 0 {
            return Err(tree_err(to, io::Error::last_os_error()));
        }
        Ok(())
    }

    fn unlink(&mut self, path: &RelPath) -> Result<(), TreeError> {
        self.forget_open();
        let (dir, name) = self.parent(path)?;
        sys::unlinkat(dir.as_fd(), name, 0).map_err(|e| tree_err(path, e))
    }

    fn rmdir(&mut self, path: &RelPath) -> Result<(), TreeError> {
        self.forget_open();
        let (dir, name) = self.parent(path)?;
        sys::unlinkat(dir.as_fd(), name, libc::AT_REMOVEDIR).map_err(|e| tree_err(path, e))
    }

    fn remove_all(&mut self, path: &RelPath) -> Result<(), TreeError> {
        self.forget_open();
        match self.kind(path)? {
            None => Ok(()),
            Some(EntryKind::Dir) => {
                let fd = sys::open_beneath(
                    self.root.as_fd(),
                    path.as_at_path(),
                    libc::O_RDONLY | libc::O_DIRECTORY,
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
        let (fdir, fname) = self.parent(from)?;
        let (tdir, tname) = self.parent(to)?;
        let a = sys::cstr(fname).map_err(|e| tree_err(from, e))?;
        let b = sys::cstr(tname).map_err(|e| tree_err(to, e))?;
        use std::os::fd::AsRawFd;
        // SAFETY: valid descriptors and C strings.
        let r = unsafe {
            libc::renameat2(
                fdir.as_raw_fd(),
                a.as_ptr(),
                tdir.as_raw_fd(),
                b.as_ptr(),
                flags,
            )
        };
        if r < 0 {
            return Err(tree_err(from, io::Error::last_os_error()));
        }
        Ok(())
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
        if path.is_root() {
            return sys::fchmod(self.root.as_fd(), mode & 0o7777).map_err(|e| tree_err(path, e));
        }
        let (dir, name) = self.parent(path)?;
        match sys::fchmodat(dir.as_fd(), name, mode & 0o7777) {
            Err(e)
                if e.raw_os_error() == Some(libc::ENOENT)
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
        let fd = self.open_path(path)?;
        sys::fchownat(fd.as_fd(), OsStr::new(""), uid, gid).map_err(|e| tree_err(path, e))
    }

    fn utimes(
        &mut self,
        path: &RelPath,
        atime: Option<Timespec>,
        mtime: Option<Timespec>,
    ) -> Result<(), TreeError> {
        if path.is_root() {
            return sys::utimensat(self.root.as_fd(), OsStr::new("."), atime, mtime)
                .map_err(|e| tree_err(path, e));
        }
        let (dir, name) = self.parent(path)?;
        sys::utimensat(dir.as_fd(), name, atime, mtime).map_err(|e| tree_err(path, e))
    }

    fn setxattr(
        &mut self,
        path: &RelPath,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<(), TreeError> {
        let fd = self.open_path(path)?;
        sys::lsetxattr_fd(fd.as_fd(), name, value, flags).map_err(|e| tree_err(path, e))
    }

    fn removexattr(&mut self, path: &RelPath, name: &[u8]) -> Result<(), TreeError> {
        let fd = self.open_path(path)?;
        sys::lremovexattr_fd(fd.as_fd(), name).map_err(|e| tree_err(path, e))
    }

    fn sync(&mut self) -> Result<(), TreeError> {
        sys::syncfs(self.root.as_fd()).map_err(|e| tree_err(&RelPath::root(), e))
    }
}

impl DirTree {
    /// The entry's mtime (`lstat`, beneath the root), or `None` if there is no such entry (or a
    /// component on the way is not a directory).
    pub fn mtime(&self, path: &RelPath) -> Result<Option<Timespec>, TreeError> {
        match self.parent_or_root_stat(path) {
            Ok(st) => Ok(Some(Timespec {
                sec: st.st_mtime,
                nsec: st.st_mtime_nsec as u32,
            })),
            Err(TreeError::NotFound(_) | TreeError::NotDir(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn parent_or_root_stat(&self, path: &RelPath) -> Result<libc::stat, TreeError> {
        if path.is_root() {
            return sys::fstat(self.root.as_fd()).map_err(|e| tree_err(path, e));
        }
        let (dir, name) = self.parent(path)?;
        sys::lstatat(dir.as_fd(), name).map_err(|e| tree_err(path, e))
    }
}
