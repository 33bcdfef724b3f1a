//! The FUSE shell: translates kernel requests into volume mutations (journaled, ordered) and
//! serves reads straight from the backing directory. Files opened read-only use the kernel's FUSE
//! passthrough when available, so their reads never come up to this process at all.

pub mod affinity;
pub mod inodes;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use mirrorfs_core::op::{Op, Timespec, WRITE_BYTES_MAX};
use mirrorfs_core::path::RelPath;

use crate::fuse::inodes::{Inodes, ROOT};
use crate::site::volume::{lock, Volume};
use crate::sys;
use crate::tree::dirtree::Root;

const TTL: Duration = Duration::from_secs(1);
/// How many times a change is retried when the name it was given for an inode changed before the
/// order lock was taken (a rename or unlink came in between).
const STALE_RETRIES: u32 = 16;

struct Handle {
    fd: OwnedFd,
    ino: u64,
    append: bool,
    /// Opened with `O_DIRECT`: reads and writes go through page-aligned buffers.
    direct: bool,
    wrote: AtomicBool,
    _backing: Option<BackingId>,
}

/// A directory's entries as read at `opendir`: (inode, type, name).
type DirListing = Vec<(u64, FileType, Vec<u8>)>;

pub struct MirrorFs {
    vol: Arc<Volume>,
    /// The backing directory: every path is resolved beneath it, never through a symlink.
    root: Root,
    inodes: Arc<Mutex<Inodes>>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    dirs: Mutex<HashMap<u64, Arc<DirListing>>>,
    next_fh: AtomicU64,
    /// Name of mirrorfs's own state directory in the backing root, hidden from the mount.
    hidden: Option<Vec<u8>>,
    passthrough: AtomicBool,
}

fn err(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn io_errno(e: &std::io::Error) -> Errno {
    err(sys::errno_of(e))
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new((-sec) as u64, 0) + Duration::from_nanos(nsec as u64)
    }
}

fn to_ts(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            if d.subsec_nanos() == 0 {
                Timespec {
                    sec: -(d.as_secs() as i64),
                    nsec: 0,
                }
            } else {
                Timespec {
                    sec: -(d.as_secs() as i64) - 1,
                    nsec: 1_000_000_000 - d.subsec_nanos(),
                }
            }
        }
    }
}

/// A setattr's times as timestamps, `Now` read once for both.
fn resolve_times(
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
) -> (Option<Timespec>, Option<Timespec>) {
    let now = sys::now();
    let conv = |t: Option<TimeOrNow>| {
        t.map(|t| match t {
            TimeOrNow::Now => now,
            TimeOrNow::SpecificTime(s) => to_ts(s),
        })
    };
    (conv(atime), conv(mtime))
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

impl MirrorFs {
    pub fn new(vol: Arc<Volume>, backing: &Path, hidden: Option<Vec<u8>>) -> std::io::Result<Self> {
        let root = Root::open(backing)?;
        let st = sys::fstat(root.fd())?;
        Ok(MirrorFs {
            vol,
            root,
            inodes: Arc::new(Mutex::new(Inodes::new(st.st_ino))),
            handles: RwLock::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            hidden,
            passthrough: AtomicBool::new(false),
        })
    }

    fn rootfd(&self) -> BorrowedFd<'_> {
        self.root.fd()
    }

    /// Under the order lock (inside a `mutate` closure): fails with `ESTALE` unless `p` is still
    /// the name of `ino`, so that a change journaled under `p` is the change made to `ino`.
    fn still_named(&self, ino: INodeNo, p: &RelPath) -> std::io::Result<()> {
        if lock(&self.inodes).path(ino.0).as_ref() == Some(p) {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(libc::ESTALE))
        }
    }

    /// Runs `f` (a change to the inode named `p` when it starts) again while it fails because
    /// the name changed before the order lock was taken; bounded.
    fn retry_renamed<T>(&self, mut f: impl FnMut() -> Result<T, i32>) -> Result<T, i32> {
        for _ in 1..STALE_RETRIES {
            match f() {
                Err(libc::ESTALE) => std::thread::yield_now(),
                other => return other,
            }
        }
        f()
    }

    /// Attributes of `st` for a reply about node `ino` (its id may differ from the backing
    /// number: see `inodes`).
    fn attr_of(&self, ino: INodeNo, st: &libc::stat) -> FileAttr {
        FileAttr {
            ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime, st.st_atime_nsec),
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            ctime: time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: file_type(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    fn path(&self, ino: INodeNo) -> Result<RelPath, Errno> {
        lock(&self.inodes).path(ino.0).ok_or(Errno::ESTALE)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<RelPath, Errno> {
        if parent.0 == ROOT && self.hidden.as_deref() == Some(name.as_bytes()) {
            return Err(Errno::EACCES);
        }
        self.path(parent)?
            .join(name.as_bytes())
            .map_err(|e| match e {
                mirrorfs_core::path::PathError::NameTooLong => Errno::ENAMETOOLONG,
                mirrorfs_core::path::PathError::TooLong => Errno::ENAMETOOLONG,
                _ => Errno::EINVAL,
            })
    }

    fn lstat(&self, p: &RelPath) -> std::io::Result<libc::stat> {
        self.root.lstat(p)
    }

    /// Stats a new entry, registers it in the inode table, replies with it.
    fn entry(&self, parent: INodeNo, name: &OsStr, p: &RelPath, reply: ReplyEntry) {
        match self.lstat(p) {
            Ok(st) => {
                let id = lock(&self.inodes).register(parent.0, name.as_bytes(), st.st_ino);
                let a = self.attr_of(INodeNo(id), &st);
                reply.entry(&TTL, &a, Generation(0));
            }
            Err(e) => reply.error(io_errno(&e)),
        }
    }

    /// The backing inode `st` describes is freed by the removal being applied (its last link):
    /// see `inodes`. Called inside the removal's closure, under the order lock: lock order is
    /// always the order lock first, then the inode table (never call `mutate` holding the table).
    fn mark_gone(&self, st: &libc::stat) {
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR || st.st_nlink <= 1 {
            lock(&self.inodes).gone(st.st_ino);
        }
    }

    /// Records the parent directory's times after a namespace change, so mirrors keep them.
    fn touch_parent(&self, p: &RelPath) {
        if let Some(parent) = p.parent() {
            self.touch(parent);
        }
    }

    /// Records an entry's mtime as the backing tree has it (after it was created or truncated:
    /// applying that change on a mirror gives the mirror's entry the mirror's own clock).
    /// The `lstat` is taken under the order lock (`Volume::record`), so the time recorded is the
    /// one the backing has at that point of the order.
    fn touch(&self, p: RelPath) {
        let _ = self.vol.record(|| {
            let st = self.lstat(&p).ok()?;
            Some(Op::SetTimes {
                path: p,
                atime: None,
                mtime: Some(Timespec {
                    sec: st.st_mtime,
                    nsec: st.st_mtime_nsec as u32,
                }),
            })
        });
    }

    /// Owner and group of a new entry, as the kernel would choose them (set-group-ID directories).
    fn owner(&self, req: &Request, parent: &RelPath) -> (u32, u32, bool) {
        match self.lstat(parent) {
            Ok(st) if st.st_mode & libc::S_ISGID != 0 => (req.uid(), st.st_gid, true),
            _ => (req.uid(), req.gid(), false),
        }
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        self.handles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    /// An open handle on `ino`, for requests about a file that has no name any more.
    fn handle_of_ino(&self, ino: u64) -> Option<Arc<Handle>> {
        self.handles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|h| h.ino == ino)
            .cloned()
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Arc::new(h));
        fh
    }

    fn set_times_of_handle(&self, h: &Handle) {
        // Under the order lock (`Volume::record`; the inode table is locked after it, the lock
        // order of `mark_gone`). The inode table is updated after a rename's record, so the name
        // is checked against the handle's inode: a stale name is never given these times.
        let _ = self.vol.record(|| {
            let path = lock(&self.inodes).path(h.ino)?;
            let st = sys::fstat(h.fd.as_fd()).ok()?;
            let named = self.lstat(&path).ok()?;
            (named.st_ino == st.st_ino).then_some(Op::SetTimes {
                path,
                atime: None,
                mtime: Some(Timespec {
                    sec: st.st_mtime,
                    nsec: st.st_mtime_nsec as u32,
                }),
            })
        });
    }

    /// `chmod` of the inode `ino`, named `p` under the order lock (see `still_named`).
    fn set_mode_named(&self, ino: INodeNo, p: &RelPath, mode: u32) -> Result<(), i32> {
        self.vol
            .mutate(
                Op::SetMode {
                    path: p.clone(),
                    mode,
                },
                || {
                    self.still_named(ino, p)?;
                    self.root.chmod(p, mode)
                },
            )
            .map(drop)
    }

    /// The changes of one `setattr` to the inode `ino`, named `p` (see `still_named`).
    #[allow(clippy::too_many_arguments)]
    fn setattr_named(
        &self,
        ino: INodeNo,
        p: &RelPath,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Result<(), i32> {
        let root = &self.root;
        if let Some(size) = size {
            let handle = fh.and_then(|f| self.handle(f).ok());
            self.vol
                .mutate(
                    Op::Truncate {
                        path: p.clone(),
                        size,
                    },
                    || {
                        self.still_named(ino, p)?;
                        match &handle {
                            Some(h) => sys::ftruncate(h.fd.as_fd(), size),
                            None => root.truncate(p, size),
                        }
                    },
                )
                .map(drop)?;
            self.touch(p.clone());
        }
        if uid.is_some() || gid.is_some() {
            self.vol
                .mutate(
                    Op::SetOwner {
                        path: p.clone(),
                        uid,
                        gid,
                    },
                    || {
                        self.still_named(ino, p)?;
                        root.chown(p, uid, gid)
                    },
                )
                .map(drop)?;
            // chown may clear set-user/group-ID bits: record the resulting mode too.
            if let Ok(st) = self.lstat(p) {
                if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
                    let m = st.st_mode & 0o7777;
                    self.set_mode_named(ino, p, m)?;
                }
            }
        }
        if let Some(mode) = mode {
            let m = mode & 0o7777;
            self.set_mode_named(ino, p, m)?;
        }
        if atime.is_some() || mtime.is_some() {
            let (a, m) = resolve_times(atime, mtime);
            self.vol
                .mutate(
                    Op::SetTimes {
                        path: p.clone(),
                        atime: a,
                        mtime: m,
                    },
                    || {
                        self.still_named(ino, p)?;
                        root.utimes(p, a, m)
                    },
                )
                .map(drop)?;
        }
        Ok(())
    }

    fn open_flags(flags: i32) -> i32 {
        // O_CREAT/O_EXCL are handled by `create`; O_TRUNC arrives as a setattr (atomic_o_trunc off).
        (flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_TRUNC))
            | libc::O_NOFOLLOW
    }
}

#[allow(clippy::too_many_arguments)]
fn reply_unlinked_setattr(
    fs: &MirrorFs,
    h: &Handle,
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
    reply: ReplyAttr,
) {
    let fd = h.fd.as_fd();
    let r = (|| -> std::io::Result<()> {
        if let Some(size) = size {
            sys::ftruncate(fd, size)?;
        }
        if uid.is_some() || gid.is_some() {
            sys::fchown(fd, uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
        }
        if let Some(mode) = mode {
            sys::fchmod(fd, mode & 0o7777)?;
        }
        if atime.is_some() || mtime.is_some() {
            let (a, m) = resolve_times(atime, mtime);
            sys::futimens(fd, a, m)?;
        }
        Ok(())
    })();
    match r.and_then(|_| sys::fstat(fd)) {
        Ok(st) => reply.attr(&TTL, &fs.attr_of(INodeNo(h.ino), &st)),
        Err(e) => reply.error(io_errno(&e)),
    }
}

impl Filesystem for MirrorFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        if config.set_max_stack_depth(1).is_ok() {
            self.passthrough.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        crate::fuse::affinity::follow(req.pid());
        if parent.0 == ROOT && self.hidden.as_deref() == Some(name.as_bytes()) {
            return reply.error(Errno::ENOENT);
        }
        match self.child(parent, name) {
            Ok(p) => self.entry(parent, name, &p, reply),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        lock(&self.inodes).forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        crate::fuse::affinity::follow(req.pid());
        let st = match fh.and_then(|f| self.handle(f).ok()).or_else(|| {
            self.handle_of_ino(ino.0)
                .filter(|_| self.path(ino).is_err())
        }) {
            Some(h) => sys::fstat(h.fd.as_fd()),
            None => match self.path(ino) {
                Ok(p) => self.lstat(&p),
                Err(e) => return reply.error(e),
            },
        };
        match st {
            Ok(st) => reply.attr(&TTL, &self.attr_of(ino, &st)),
            Err(e) => reply.error(io_errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        crate::fuse::affinity::follow(req.pid());
        // Each change checks under the order lock that `p` still names the inode (a rename may
        // have come in between), and is made again under the new name if not.
        let r = self.retry_renamed(|| {
            let p = match self.path(ino) {
                Ok(p) => p,
                Err(e) => return Ok(Err(e)),
            };
            self.setattr_named(ino, &p, mode, uid, gid, size, atime, mtime, fh)
                .map(|()| Ok(p))
        });
        let p = match r {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                // Unlinked but open: change it through the descriptor; nothing visible to mirror.
                // The caller's own descriptor first: another one may be read-only.
                let Some(h) = fh
                    .and_then(|f| self.handle(f).ok())
                    .or_else(|| self.handle_of_ino(ino.0))
                else {
                    return reply.error(e);
                };
                return reply_unlinked_setattr(self, &h, mode, uid, gid, size, atime, mtime, reply);
            }
            Err(e) => return reply.error(err(e)),
        };
        match self.lstat(&p) {
            Ok(st) => reply.attr(&TTL, &self.attr_of(ino, &st)),
            Err(e) => reply.error(io_errno(&e)),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        crate::fuse::affinity::follow(req.pid());
        match self
            .path(ino)
            .and_then(|p| self.root.readlink(&p).map_err(|e| io_errno(&e)))
        {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        crate::fuse::affinity::follow(req.pid());
        let p = match self.child(parent, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let (uid, gid, _) = self.owner(req, &p.parent().unwrap_or_default());
        let perm = mode & 0o7777 & !umask;
        let full = (mode & libc::S_IFMT) | perm;
        let op = Op::Mknod {
            path: p.clone(),
            mode: full,
            rdev: rdev as u64,
            uid,
            gid,
        };
        let r = self
            .vol
            .mutate(op, || self.root.mknod(&p, full, rdev as u64, uid, gid));
        match r {
            Ok(_) => {
                self.touch(p.clone());
                self.touch_parent(&p);
                self.entry(parent, name, &p, reply)
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        crate::fuse::affinity::follow(req.pid());
        let p = match self.child(parent, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let (uid, gid, sgid) = self.owner(req, &p.parent().unwrap_or_default());
        let perm = (mode & 0o7777 & !umask) | if sgid { libc::S_ISGID } else { 0 };
        let r = self.vol.mutate(
            Op::Mkdir {
                path: p.clone(),
                mode: perm,
                uid,
                gid,
            },
            || self.root.mkdir(&p, perm, uid, gid),
        );
        match r {
            Ok(_) => {
                self.touch(p.clone());
                self.touch_parent(&p);
                self.entry(parent, name, &p, reply)
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        crate::fuse::affinity::follow(req.pid());
        let p = match self.child(parent, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let st = match self.lstat(&p) {
            Ok(st) => st,
            Err(e) => return reply.error(io_errno(&e)),
        };
        match self.vol.mutate(
            Op::Unlink {
                path: p.clone(),
                nlink: st.st_nlink as u32,
            },
            || {
                self.root.unlink(&p)?;
                self.mark_gone(&st);
                Ok(())
            },
        ) {
            Ok(_) => {
                let ino = lock(&self.inodes).fuse_ino(st.st_ino);
                lock(&self.inodes).unlink(parent.0, name.as_bytes(), ino);
                self.touch_parent(&p);
                reply.ok()
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        crate::fuse::affinity::follow(req.pid());
        let p = match self.child(parent, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let st = self.lstat(&p).ok();
        match self.vol.mutate(Op::Rmdir { path: p.clone() }, || {
            self.root.rmdir(&p)?;
            if let Some(st) = &st {
                self.mark_gone(st);
            }
            Ok(())
        }) {
            Ok(_) => {
                if let Some(st) = st {
                    let ino = lock(&self.inodes).fuse_ino(st.st_ino);
                    lock(&self.inodes).unlink(parent.0, name.as_bytes(), ino);
                }
                self.touch_parent(&p);
                reply.ok()
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        crate::fuse::affinity::follow(req.pid());
        let p = match self.child(parent, link_name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let (uid, gid, _) = self.owner(req, &p.parent().unwrap_or_default());
        let t = target.as_os_str().as_bytes().to_vec();
        let r = self.vol.mutate(
            Op::Symlink {
                path: p.clone(),
                target: t.clone(),
                uid,
                gid,
            },
            || self.root.symlink(&p, &t, uid, gid),
        );
        match r {
            Ok(_) => {
                self.touch(p.clone());
                self.touch_parent(&p);
                self.entry(parent, link_name, &p, reply)
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        crate::fuse::affinity::follow(req.pid());
        let (from, to) = match (self.child(parent, name), self.child(newparent, newname)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let src = match self.lstat(&from) {
            Ok(st) => st,
            Err(e) => return reply.error(io_errno(&e)),
        };
        let dst = self.lstat(&to).ok();
        let f = flags.bits();
        let op = Op::Rename {
            from: from.clone(),
            to: to.clone(),
            flags: f,
            from_ino: src.st_ino,
        };
        match self.vol.mutate(op, || {
            self.root.rename(&from, &to, f)?;
            match &dst {
                Some(d) if f & libc::RENAME_EXCHANGE == 0 && d.st_ino != src.st_ino => {
                    self.mark_gone(d)
                }
                _ => {}
            }
            Ok(())
        }) {
            Ok(_) => {
                let mut t = lock(&self.inodes);
                let sino = t.fuse_ino(src.st_ino);
                if let Some(d) = dst {
                    let dino = t.fuse_ino(d.st_ino);
                    t.unlink(newparent.0, newname.as_bytes(), dino);
                    if f & libc::RENAME_EXCHANGE != 0 {
                        t.rename(
                            dino,
                            newparent.0,
                            newname.as_bytes(),
                            parent.0,
                            name.as_bytes(),
                        );
                    }
                }
                t.rename(
                    sino,
                    parent.0,
                    name.as_bytes(),
                    newparent.0,
                    newname.as_bytes(),
                );
                drop(t);
                if f & libc::RENAME_WHITEOUT != 0 {
                    // The whiteout left at `from` would get the mirror's own clock.
                    self.touch(from.clone());
                }
                self.touch_parent(&from);
                if from.parent() != to.parent() {
                    self.touch_parent(&to);
                }
                reply.ok()
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        crate::fuse::affinity::follow(req.pid());
        let (from, to) = match (self.path(ino), self.child(newparent, newname)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        match self.vol.mutate(
            Op::Link {
                from: from.clone(),
                to: to.clone(),
            },
            || self.root.link(&from, &to),
        ) {
            Ok(_) => {
                self.touch_parent(&to);
                self.entry(newparent, newname, &to, reply)
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        crate::fuse::affinity::follow(req.pid());
        let fl = Self::open_flags(flags.0);
        // The file opened must be the inode asked for: its writes are journaled under the
        // inode's name, so a file renamed over that name in the meantime is not it.
        let r = self.retry_renamed(|| {
            let p = self.path(ino).map_err(|e| e.code())?;
            let fd = self
                .root
                .open_at(&p, fl, 0)
                .map_err(|e| sys::errno_of(&e))?;
            let st = sys::fstat(fd.as_fd()).map_err(|e| sys::errno_of(&e))?;
            if lock(&self.inodes).backing(ino.0) == Some(st.st_ino) {
                Ok(fd)
            } else {
                Err(libc::ESTALE)
            }
        });
        let fd = match r {
            Ok(fd) => fd,
            Err(e) => return reply.error(err(e)),
        };
        let read_only = fl & libc::O_ACCMODE == libc::O_RDONLY;
        if read_only && self.passthrough.load(Ordering::Relaxed) {
            if let Ok(bid) = reply.open_backing(fd.as_fd()) {
                let fh = self.add_handle(Handle {
                    fd,
                    ino: ino.0,
                    append: false,
                    direct: false,
                    wrote: AtomicBool::new(false),
                    _backing: None,
                });
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &bid);
                if let Ok(h) = self.handle(FileHandle(fh)) {
                    // Keep the backing id registered for as long as the handle lives.
                    let h2 = Handle {
                        fd: match h.fd.try_clone() {
                            Ok(f) => f,
                            Err(_) => return,
                        },
                        ino: h.ino,
                        append: false,
                        direct: false,
                        wrote: AtomicBool::new(false),
                        _backing: Some(bid),
                    };
                    self.handles
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(fh, Arc::new(h2));
                }
                return;
            }
        }
        let fh = self.add_handle(Handle {
            fd,
            ino: ino.0,
            append: fl & libc::O_APPEND != 0,
            direct: fl & libc::O_DIRECT != 0,
            wrote: AtomicBool::new(false),
            _backing: None,
        });
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        crate::fuse::affinity::follow(req.pid());
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let mut buf = sys::IoBuf::new(size as usize, h.direct);
        match sys::pread(h.fd.as_fd(), buf.as_mut(), offset) {
            Ok(n) => reply.data(&buf.as_mut()[..n]),
            Err(e) => reply.error(io_errno(&e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        crate::fuse::affinity::follow(req.pid());
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        // O_DIRECT needs a memory-aligned buffer; the request's bytes are not aligned.
        let aligned = h.direct.then(|| sys::IoBuf::copy_of(data));
        let data = aligned.as_ref().map_or(data, |b| b.as_ref());
        if lock(&self.inodes).path(ino.0).is_none() {
            // Unlinked but still open: the change is invisible, so it is not mirrored.
            return match sys::pwrite(h.fd.as_fd(), data, offset) {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(io_errno(&e)),
            };
        }
        let mut written = 0usize;
        for chunk in data.chunks(WRITE_BYTES_MAX) {
            let mut off = offset + written as u64;
            if h.append {
                match sys::fstat(h.fd.as_fd()) {
                    Ok(st) => off = st.st_size as u64,
                    Err(e) => return reply.error(io_errno(&e)),
                }
            }
            // Journaled under the file's name as it is under the order lock (see `still_named`).
            let r = self.retry_renamed(|| {
                let Some(p) = lock(&self.inodes).path(ino.0) else {
                    // Unlinked in the meantime: invisible from now on.
                    return sys::pwrite_all(h.fd.as_fd(), chunk, off)
                        .map_err(|e| sys::errno_of(&e));
                };
                let op = Op::Write {
                    path: p.clone(),
                    offset: off,
                    data: chunk.to_vec(),
                };
                self.vol
                    .mutate(op, || {
                        self.still_named(ino, &p)?;
                        // Whole or nothing: its record is aborted if it fails (see sys).
                        sys::pwrite_whole(h.fd.as_fd(), chunk, off)
                    })
                    .map(drop)
            });
            match r {
                Ok(()) => written += chunk.len(),
                Err(e) => {
                    // A failed write may still have moved the mtime (ext4 updates it before it
                    // rejects a misaligned O_DIRECT write): the times are recorded at close.
                    h.wrote.store(true, Ordering::Relaxed);
                    return reply.error(err(e));
                }
            }
        }
        h.wrote.store(true, Ordering::Relaxed);
        reply.written(written as u32)
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        crate::fuse::affinity::follow(req.pid());
        if let Ok(h) = self.handle(fh) {
            if h.wrote.swap(false, Ordering::Relaxed) {
                self.set_times_of_handle(&h);
            }
        }
        reply.ok()
    }

    fn release(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        crate::fuse::affinity::follow(req.pid());
        let h = self
            .handles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        if let Some(h) = h {
            if h.wrote.load(Ordering::Relaxed) {
                self.set_times_of_handle(&h);
            }
        }
        reply.ok()
    }

    fn fsync(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        crate::fuse::affinity::follow(req.pid());
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let r = if datasync {
            sys::fdatasync(h.fd.as_fd())
        } else {
            sys::fsync(h.fd.as_fd())
        };
        if let Err(e) = r {
            return reply.error(io_errno(&e));
        }
        let seq = self.vol.wait_journal_durable();
        self.vol.wait_mirrors_durable(seq);
        reply.ok()
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        crate::fuse::affinity::follow(req.pid());
        let p = match self.path(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let fd =
            match self
                .root
                .open_at(&p, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)
            {
                Ok(fd) => fd,
                Err(e) => return reply.error(io_errno(&e)),
            };
        let ents = match sys::read_dir_fd(fd.as_fd()) {
            Ok(v) => v,
            Err(e) => return reply.error(io_errno(&e)),
        };
        let mut list = Vec::with_capacity(ents.len() + 2);
        list.push((ino.0, FileType::Directory, b".".to_vec()));
        list.push((ino.0, FileType::Directory, b"..".to_vec()));
        for (name, ty) in ents {
            if ino.0 == ROOT && self.hidden.as_deref() == Some(&name[..]) {
                continue;
            }
            let kind = match ty {
                libc::DT_DIR => FileType::Directory,
                libc::DT_LNK => FileType::Symlink,
                libc::DT_FIFO => FileType::NamedPipe,
                libc::DT_CHR => FileType::CharDevice,
                libc::DT_BLK => FileType::BlockDevice,
                libc::DT_SOCK => FileType::Socket,
                _ => FileType::RegularFile,
            };
            list.push((u64::MAX, kind, name));
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.dirs).insert(fh, Arc::new(list));
        let _ = fd;
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        crate::fuse::affinity::follow(req.pid());
        let Some(list) = lock(&self.dirs).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, kind, name)) in list.iter().enumerate().skip(offset as usize) {
            let ino = if *ino == u64::MAX {
                0xffff_fff0 + i as u64
            } else {
                *ino
            };
            if reply.add(INodeNo(ino), (i + 1) as u64, *kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        crate::fuse::affinity::follow(req.pid());
        let Some(list) = lock(&self.dirs).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let dir = match self.path(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        for (i, (_, _, name)) in list.iter().enumerate().skip(offset as usize) {
            let p = if name == b"." {
                dir.clone()
            } else if name == b".." {
                dir.parent().unwrap_or_default()
            } else {
                match dir.join(name) {
                    Ok(p) => p,
                    Err(_) => continue,
                }
            };
            let dot = name == b"." || name == b"..";
            let Ok(st) = self.lstat(&p) else { continue };
            let id = {
                let mut t = lock(&self.inodes);
                if dot {
                    t.fuse_ino(st.st_ino)
                } else {
                    t.register(ino.0, name, st.st_ino)
                }
            };
            let a = self.attr_of(INodeNo(id), &st);
            if reply.add(
                a.ino,
                (i + 1) as u64,
                OsStr::from_bytes(name),
                &TTL,
                &a,
                Generation(0),
            ) {
                // Not sent: the kernel will not count this lookup.
                if !dot {
                    lock(&self.inodes).forget(a.ino.0, 1);
                }
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        crate::fuse::affinity::follow(req.pid());
        lock(&self.dirs).remove(&fh.0);
        reply.ok()
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        crate::fuse::affinity::follow(req.pid());
        if let Ok(p) = self.path(ino) {
            if let Ok(fd) =
                self.root
                    .open_at(&p, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)
            {
                if let Err(e) = sys::fsync(fd.as_fd()) {
                    return reply.error(io_errno(&e));
                }
            }
        }
        let seq = self.vol.wait_journal_durable();
        self.vol.wait_mirrors_durable(seq);
        reply.ok()
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        crate::fuse::affinity::follow(req.pid());
        match sys::fstatvfs(self.rootfd()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(io_errno(&e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        crate::fuse::affinity::follow(req.pid());
        let n = name.as_bytes().to_vec();
        // Resolved under the order lock (see `still_named`), never through a symlink.
        let r = self.retry_renamed(|| {
            let p = self.path(ino).map_err(|e| e.code())?;
            let op = Op::SetXattr {
                path: p.clone(),
                name: n.clone(),
                value: value.to_vec(),
                flags,
            };
            self.vol.mutate(op, || {
                self.still_named(ino, &p)?;
                self.root.setxattr(&p, &n, value, flags)
            })
        });
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        crate::fuse::affinity::follow(req.pid());
        let r = self
            .path(ino)
            .and_then(|p| self.root.entry(&p).map_err(|e| io_errno(&e)));
        let fd = match r {
            Ok(fd) => fd,
            Err(e) => return reply.error(e),
        };
        let mut buf = vec![0u8; size as usize];
        match sys::lgetxattr_fd(fd.as_fd(), name.as_bytes(), &mut buf) {
            Ok(n) if size == 0 => reply.size(n as u32),
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(io_errno(&e)),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        crate::fuse::affinity::follow(req.pid());
        let r = self
            .path(ino)
            .and_then(|p| self.root.entry(&p).map_err(|e| io_errno(&e)));
        let fd = match r {
            Ok(fd) => fd,
            Err(e) => return reply.error(e),
        };
        let mut buf = vec![0u8; size as usize];
        match sys::llistxattr_fd(fd.as_fd(), &mut buf) {
            Ok(n) if size == 0 => reply.size(n as u32),
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(io_errno(&e)),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        crate::fuse::affinity::follow(req.pid());
        let n = name.as_bytes().to_vec();
        let r = self.retry_renamed(|| {
            let p = self.path(ino).map_err(|e| e.code())?;
            self.vol.mutate(
                Op::RemoveXattr {
                    path: p.clone(),
                    name: n.clone(),
                },
                || {
                    self.still_named(ino, &p)?;
                    self.root.removexattr(&p, &n)
                },
            )
        });
        match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        crate::fuse::affinity::follow(req.pid());
        let p = match self.child(parent, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let (uid, gid, _) = self.owner(req, &p.parent().unwrap_or_default());
        let perm = mode & 0o7777 & !umask;
        let fl = (Self::open_flags(flags) & !libc::O_ACCMODE) | libc::O_RDWR;
        let r = self.vol.mutate(
            Op::Create {
                path: p.clone(),
                mode: perm,
                uid,
                gid,
            },
            || self.root.create(&p, fl, perm, uid, gid),
        );
        let fd = match r {
            Ok((fd, _)) => fd,
            Err(e) => return reply.error(err(e)),
        };
        self.touch(p.clone());
        self.touch_parent(&p);
        let st = match sys::fstat(fd.as_fd()) {
            Ok(st) => st,
            Err(e) => return reply.error(io_errno(&e)),
        };
        let id = lock(&self.inodes).register(parent.0, name.as_bytes(), st.st_ino);
        let a = self.attr_of(INodeNo(id), &st);
        let fh = self.add_handle(Handle {
            fd,
            ino: a.ino.0,
            append: flags & libc::O_APPEND != 0,
            direct: fl & libc::O_DIRECT != 0,
            wrote: AtomicBool::new(false),
            _backing: None,
        });
        reply.created(
            &TTL,
            &a,
            Generation(0),
            FileHandle(fh),
            FopenFlags::FOPEN_KEEP_CACHE,
        );
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        crate::fuse::affinity::follow(req.pid());
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let r = self.retry_renamed(|| {
            let p = self.path(ino).map_err(|e| e.code())?;
            self.vol.mutate(
                Op::Fallocate {
                    path: p.clone(),
                    mode,
                    offset,
                    len: length,
                },
                || {
                    self.still_named(ino, &p)?;
                    sys::fallocate(h.fd.as_fd(), mode, offset, length)
                },
            )
        });
        match r {
            Ok(_) => {
                h.wrote.store(true, Ordering::Relaxed);
                reply.ok()
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn lseek(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        crate::fuse::affinity::follow(req.pid());
        match self
            .handle(fh)
            .and_then(|h| sys::lseek(h.fd.as_fd(), offset, whence).map_err(|e| io_errno(&e)))
        {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(e),
        }
    }
}
