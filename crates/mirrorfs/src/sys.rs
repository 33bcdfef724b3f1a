//! Thin, safe wrappers over the Linux system calls mirrorfs needs. Every path argument is relative
//! to a directory descriptor; nothing here follows a symlink unless a caller asks for it.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use mirrorfs_core::op::Timespec;

pub fn cstr(p: &OsStr) -> io::Result<CString> {
    CString::new(p.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_isize(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

pub fn openat(dir: BorrowedFd<'_>, path: &OsStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = cstr(path)?;
    // SAFETY: `c` is a valid NUL-terminated string; the returned descriptor is owned by us.
    let fd =
        cvt(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: `fd` was just returned by openat and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`: the path can
/// never leave `dir`, whatever symlinks the tree holds.
pub fn open_beneath(
    dir: BorrowedFd<'_>,
    path: &OsStr,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
    const RESOLVE_NO_SYMLINKS: u64 = 0x04;
    const RESOLVE_BENEATH: u64 = 0x08;
    // openat2 refuses flags it does not know (plain openat ignores them): keep only the open(2)
    // flags, so that e.g. the kernel's internal `__FMODE_EXEC` in a FUSE open request passes.
    const OPEN_FLAGS: i32 = libc::O_ACCMODE
        | libc::O_CREAT
        | libc::O_EXCL
        | libc::O_NOCTTY
        | libc::O_TRUNC
        | libc::O_APPEND
        | libc::O_NONBLOCK
        | libc::O_DSYNC
        | libc::O_SYNC
        | libc::O_ASYNC
        | libc::O_DIRECT
        | libc::O_LARGEFILE
        | libc::O_DIRECTORY
        | libc::O_NOFOLLOW
        | libc::O_NOATIME
        | libc::O_CLOEXEC
        | libc::O_PATH
        | libc::O_TMPFILE;
    let flags = flags & OPEN_FLAGS;
    let c = cstr(path)?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
            mode as u64
        } else {
            0
        },
        resolve: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: arguments match the openat2(2) ABI; `how` lives across the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from openat2.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

pub fn fstatat(dir: BorrowedFd<'_>, path: &OsStr, flags: i32) -> io::Result<libc::stat> {
    let c = cstr(path)?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is written by the kernel on success.
    cvt(unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: initialised by a successful fstatat.
    Ok(unsafe { st.assume_init() })
}

pub fn lstatat(dir: BorrowedFd<'_>, path: &OsStr) -> io::Result<libc::stat> {
    fstatat(dir, path, libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH)
}

pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: as above.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: initialised by a successful fstat.
    Ok(unsafe { st.assume_init() })
}

pub fn mkdirat(dir: BorrowedFd<'_>, path: &OsStr, mode: u32) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: valid C string.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: BorrowedFd<'_>, path: &OsStr, mode: u32, rdev: u64) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: valid C string.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), c.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlinkat(target: &[u8], dir: BorrowedFd<'_>, path: &OsStr) -> io::Result<()> {
    let t = cstr(OsStr::from_bytes(target))?;
    let c = cstr(path)?;
    // SAFETY: valid C strings.
    cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) }).map(drop)
}

/// `linkat` between two directories; a final symlink is linked itself, not followed.
pub fn linkat(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &OsStr,
) -> io::Result<()> {
    let a = cstr(from)?;
    let b = cstr(to)?;
    // SAFETY: valid descriptors and C strings.
    cvt(unsafe {
        libc::linkat(
            from_dir.as_raw_fd(),
            a.as_ptr(),
            to_dir.as_raw_fd(),
            b.as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// `renameat2` between two directories.
pub fn renameat2(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &OsStr,
    flags: u32,
) -> io::Result<()> {
    let a = cstr(from)?;
    let b = cstr(to)?;
    // SAFETY: valid descriptors and C strings.
    cvt(unsafe {
        libc::renameat2(
            from_dir.as_raw_fd(),
            a.as_ptr(),
            to_dir.as_raw_fd(),
            b.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

pub fn unlinkat(dir: BorrowedFd<'_>, path: &OsStr, flags: i32) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: valid C string.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) }).map(drop)
}

pub fn fchownat(
    dir: BorrowedFd<'_>,
    path: &OsStr,
    uid: Option<u32>,
    gid: Option<u32>,
) -> io::Result<()> {
    let c = cstr(path)?;
    let u = uid.unwrap_or(u32::MAX);
    let g = gid.unwrap_or(u32::MAX);
    // SAFETY: valid C string; -1 leaves an id unchanged.
    cvt(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            c.as_ptr(),
            u,
            g,
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// chmod of `name` in `dir` that never follows a final symlink: `fchmodat2(AT_SYMLINK_NOFOLLOW)`
/// (Linux 6.6), else the entry opened with `O_PATH | O_NOFOLLOW` and changed through
/// `/proc/self/fd`. A symlink gives `EOPNOTSUPP`, as on ext4.
pub fn fchmodat_nofollow(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    const SYS_FCHMODAT2: libc::c_long = 452;
    let c = cstr(name)?;
    // SAFETY: valid descriptor and C string; fchmodat2(2) takes (dirfd, path, mode, flags).
    let r = unsafe {
        libc::syscall(
            SYS_FCHMODAT2,
            dir.as_raw_fd(),
            c.as_ptr(),
            mode,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOSYS) {
        return Err(e);
    }
    let fd = openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
    if fstat(fd.as_fd())?.st_mode & libc::S_IFMT == libc::S_IFLNK {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    let p = fd_path(fd.as_fd());
    // SAFETY: valid C string; the magic link names the inode `fd` holds, nothing else.
    cvt(unsafe { libc::chmod(p.as_ptr(), mode) }).map(drop)
}

pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

fn ts(t: Option<Timespec>) -> libc::timespec {
    match t {
        Some(t) => libc::timespec {
            tv_sec: t.sec,
            tv_nsec: t.nsec as _,
        },
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    }
}

pub fn utimensat(
    dir: BorrowedFd<'_>,
    path: &OsStr,
    atime: Option<Timespec>,
    mtime: Option<Timespec>,
) -> io::Result<()> {
    let c = cstr(path)?;
    let times = [ts(atime), ts(mtime)];
    // SAFETY: valid C string and a two-element array as utimensat(2) requires.
    cvt(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn futimens(
    fd: BorrowedFd<'_>,
    atime: Option<Timespec>,
    mtime: Option<Timespec>,
) -> io::Result<()> {
    let times = [ts(atime), ts(mtime)];
    // SAFETY: a two-element array as futimens(3) requires.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}

pub fn pwrite_all(fd: BorrowedFd<'_>, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for its length.
        let n = cvt_isize(unsafe {
            libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off as i64)
        })?;
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        buf = &buf[n..];
        off += n as u64;
    }
    Ok(())
}

/// Writes all of `buf` at `off` in a backing file, or nothing: a change that does not fit must
/// fail whole, since its record is aborted and no mirror applies any of it.
///
/// The range is reserved first (`fallocate(FALLOC_FL_KEEP_SIZE)`: the file's size and contents
/// do not change), so a lack of space fails the write before any byte is written (`ENOSPC`). If
/// a write still stops part way (a file system that cannot reserve, an I/O error), what it wrote
/// past the file's old end is cut off again, so the file is as it was. Only bytes written over
/// existing data that a failing device then refuses to complete cannot be taken back; that is
/// logged as an error naming the file (see `docs/journal.md`).
///
/// Returns the file's size before the write.
pub fn pwrite_whole(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<u64> {
    if buf.is_empty() {
        return Ok(fstat(fd)?.st_size as u64);
    }
    match fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, off, buf.len() as u64) {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => return Err(e),
        // Cannot reserve here (EOPNOTSUPP, ...): write without a reservation.
        Err(_) => {}
    }
    let size_before = fstat(fd)?.st_size as u64;
    write_or_take_back(fd, buf, off, size_before)?;
    Ok(size_before)
}

/// `pwrite_whole` for a range the caller knows lies within the file's size with no hole in it
/// (`next_hole`, nothing since that could have made one): the blocks are on disk already, so
/// there is nothing to reserve (a `fallocate(FALLOC_FL_KEEP_SIZE)` over allocated blocks
/// allocates nothing) and the size cannot change; one `pwrite` instead of `fallocate`, `fstat`
/// and `pwrite`. A write that still stops part way is handled as in `pwrite_whole`.
pub fn pwrite_allocated(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<()> {
    // `size_before` only decides whether a partial write can be cut off again; over existing
    // data it cannot, whatever the size.
    write_or_take_back(fd, buf, off, u64::MAX)
}

/// Where the first hole at or after `off` begins (`lseek(SEEK_HOLE)`): the file's size if it
/// has none there. ext4, XFS, btrfs and tmpfs report holes; a file system that does not answers
/// the size (no holes), so on one that can still reserve space a write into a sparse file's
/// hole would go unreserved (README, "A full backing disk").
pub fn next_hole(fd: BorrowedFd<'_>, off: u64) -> io::Result<u64> {
    lseek(fd, off as i64, libc::SEEK_HOLE).map(|h| h as u64)
}

/// The `pwrite` loop of `pwrite_whole`: what a failing write wrote past `size_before` is cut off.
fn write_or_take_back(
    fd: BorrowedFd<'_>,
    buf: &[u8],
    off: u64,
    size_before: u64,
) -> io::Result<()> {
    let mut done = 0usize;
    let mut retried = false;
    while done < buf.len() {
        match pwrite(fd, &buf[done..], off + done as u64) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if done == 0 => return Err(e),
            Err(e) if !retried => {
                // Part of it is written: one more try at the rest before taking it back.
                retried = true;
                let _ = e;
            }
            Err(e) => {
                if off >= size_before {
                    ftruncate(fd, size_before)?;
                } else {
                    tracing::error!(
                        "a write of {} bytes at offset {off} stopped after {done} bytes ({e}) over existing data; those bytes cannot be taken back and the mirrors do not have them: re-copy the file",
                        buf.len()
                    );
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

/// One `pwrite`; may be short.
pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<usize> {
    // SAFETY: `buf` is valid for its length.
    cvt_isize(unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off as i64) })
}

/// A read or write buffer, aligned to the page size when `direct` (`O_DIRECT` needs the memory
/// aligned, as the offset and length).
pub struct IoBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl IoBuf {
    const ALIGN: usize = 4096;

    pub fn new(len: usize, direct: bool) -> IoBuf {
        if !direct {
            return IoBuf {
                raw: vec![0; len],
                start: 0,
                len,
            };
        }
        let raw = vec![0u8; len + Self::ALIGN];
        let start = raw.as_ptr().align_offset(Self::ALIGN).min(Self::ALIGN);
        IoBuf { raw, start, len }
    }

    /// An aligned copy of `data`.
    pub fn copy_of(data: &[u8]) -> IoBuf {
        let mut b = IoBuf::new(data.len(), true);
        b.as_mut().copy_from_slice(data);
        b
    }

    pub fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

/// `posix_fadvise(POSIX_FADV_SEQUENTIAL)` on the whole file: the kernel's readahead window for
/// this open file doubles (the device's `read_ahead_kb` × 2).
pub fn fadvise_sequential(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: no pointers; an invalid fd is reported as an error.
    let r = unsafe { libc::posix_fadvise(fd.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    match r {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    cvt_isize(unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            off as i64,
        )
    })
}

pub fn pwritev_all(fd: BorrowedFd<'_>, bufs: &[&[u8]], mut off: u64) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut _,
            iov_len: b.len(),
        })
        .collect();
    let mut start = 0;
    while start < iov.len() {
        // SAFETY: every iovec points into a live slice of `bufs`.
        let mut n = cvt_isize(unsafe {
            libc::pwritev(
                fd.as_raw_fd(),
                iov[start..].as_ptr(),
                (iov.len() - start) as i32,
                off as i64,
            )
        })?;
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        off += n as u64;
        while start < iov.len() && n >= iov[start].iov_len {
            n -= iov[start].iov_len;
            start += 1;
        }
        if start < iov.len() && n > 0 {
            // SAFETY: advancing within the same slice.
            iov[start].iov_base = unsafe { (iov[start].iov_base as *mut u8).add(n) }.cast();
            iov[start].iov_len -= n;
        }
    }
    Ok(())
}

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }).map(drop)
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off as i64, len as i64) }).map(drop)
}

pub fn fsync(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::fsync(fd.as_raw_fd()) }).map(drop)
}

pub fn fdatasync(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::fdatasync(fd.as_raw_fd()) }).map(drop)
}

pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

pub fn readlinkat(dir: BorrowedFd<'_>, path: &OsStr) -> io::Result<Vec<u8>> {
    let c = cstr(path)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is valid for writes of its length.
    let n = cvt_isize(unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            c.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// The `/proc/self/fd/N` path of a descriptor, for the xattr calls that take a path: it lets them
/// act on an `O_PATH` descriptor (including a symlink) without following anything.
fn fd_path(fd: BorrowedFd<'_>) -> CString {
    // A decimal integer never contains NUL.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// `setxattr(2)` on a C path: the one unsafe call behind the path and descriptor forms.
fn setxattr_c(p: &CStr, name: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
    let n = cstr(OsStr::from_bytes(name))?;
    // SAFETY: valid C strings and value slice.
    cvt(unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// `getxattr(2)` on a C path into `buf` (a zero length asks for the size): the value's length.
fn getxattr_c(p: &CStr, name: &[u8], buf: &mut [u8]) -> io::Result<usize> {
    let n = cstr(OsStr::from_bytes(name))?;
    // SAFETY: valid C strings; `buf` valid for writes of its length.
    cvt_isize(unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

/// `setxattr(2)` on a path (following it): for the control attributes of a mount's root
/// (`user.mirrorfs.group`, `user.mirrorfs.resync`), which only a mirrorfs mount answers.
pub fn setxattr_path(path: &std::path::Path, name: &str, value: &[u8]) -> io::Result<()> {
    setxattr_c(&cstr(path.as_os_str())?, name.as_bytes(), value, 0)
}

/// `getxattr(2)` on a path (following it) into `buf`: the value's length.
pub fn getxattr_path(path: &std::path::Path, name: &str, buf: &mut [u8]) -> io::Result<usize> {
    getxattr_c(&cstr(path.as_os_str())?, name.as_bytes(), buf)
}

pub fn lsetxattr_fd(fd: BorrowedFd<'_>, name: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
    setxattr_c(&fd_path(fd), name, value, flags)
}

pub fn lgetxattr_fd(fd: BorrowedFd<'_>, name: &[u8], buf: &mut [u8]) -> io::Result<usize> {
    getxattr_c(&fd_path(fd), name, buf)
}

pub fn llistxattr_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let p = fd_path(fd);
    // SAFETY: as above.
    cvt_isize(unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub fn lremovexattr_fd(fd: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let p = fd_path(fd);
    let n = cstr(OsStr::from_bytes(name))?;
    // SAFETY: valid C strings.
    cvt(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }).map(drop)
}

pub fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: written by the kernel on success.
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: initialised on success.
    Ok(unsafe { st.assume_init() })
}

pub fn lseek(fd: BorrowedFd<'_>, off: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn now() -> Timespec {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut t) };
    Timespec {
        sec: t.tv_sec,
        nsec: t.tv_nsec as u32,
    }
}

/// Unix seconds as local time, `YYYY-MM-DD HH:MM:SS +HHMM` (the time zone from `TZ` or the
/// system's), for listings a person reads.
pub fn local_time_text(sec: i64) -> String {
    // SAFETY: an all-zero `tm` is a valid value (its `tm_zone` pointer is only written).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let t: libc::time_t = sec;
    // SAFETY: valid in and out pointers; localtime_r is thread-safe.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return format!("@{sec}");
    }
    let off_min = tm.tm_gmtoff / 60;
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} {}{:02}{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        if off_min < 0 { '-' } else { '+' },
        off_min.abs() / 60,
        off_min.abs() % 60
    )
}

pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

pub fn is_mountpoint(path: &std::path::Path) -> bool {
    let Ok(canon) = path.canonicalize() else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|l| {
        l.split(' ').nth(4).map(unescape_mount) == Some(canon.as_os_str().as_bytes().to_vec())
    })
}

/// The file system type and source of the mount whose mount point is the absolute path `path`
/// (the last such line of `/proc/self/mountinfo`: the one on top). Does not look at `path`
/// itself, so it works on a dead FUSE mount, where every stat fails with ENOTCONN.
pub fn mount_entry(path: &std::path::Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        if f.nth(4).map(unescape_mount)? != path.as_os_str().as_bytes() {
            return None;
        }
        let mut rest = f.skip_while(|x| *x != "-").skip(1);
        let fstype = rest.next()?.to_string();
        let source = String::from_utf8_lossy(&unescape_mount(rest.next()?)).into_owned();
        Some((fstype, source))
    })
}

fn unescape_mount(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Reads directory entries (name, d_type) of an open directory, skipping `.` and `..`.
pub fn read_dir_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, u8)>> {
    let dup = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: fdopendir takes ownership of `dup` (closed by closedir).
    let dirp = unsafe { libc::fdopendir(dup) };
    if dirp.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `dup` is still ours to close.
        unsafe { libc::close(dup) };
        return Err(e);
    }
    // SAFETY: valid DIR*.
    unsafe { libc::rewinddir(dirp) };
    let mut out = Vec::new();
    loop {
        // SAFETY: valid DIR*; errno is reset to tell end-of-directory from an error.
        unsafe { *libc::__errno_location() = 0 };
        let ent = unsafe { libc::readdir64(dirp) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: closing the DIR* we opened.
            unsafe { libc::closedir(dirp) };
            if e.raw_os_error().unwrap_or(0) != 0 {
                return Err(e);
            }
            return Ok(out);
        }
        // SAFETY: d_name is NUL-terminated within the entry.
        let (name, ty) = unsafe {
            (
                CStr::from_ptr((*ent).d_name.as_ptr()).to_bytes().to_vec(),
                (*ent).d_type,
            )
        };
        if name != b"." && name != b".." {
            out.push((name, ty));
        }
    }
}

/// This machine's name, for certificates, the default names of volumes and lease holders.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "primary".into())
}
