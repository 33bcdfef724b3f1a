//! The FUSE shell: translates kernel requests into volume mutations (journaled, ordered) and
//! serves reads straight from the backing directory. Reads come up to this process too: the
//! kernel's FUSE passthrough is not used, because on one inode it excludes opens that are not
//! passthrough (a writable open of a file that a reader holds open in passthrough fails with
//! `EIO`, Linux `fs/fuse/iomode.c`), and writes must come here to be journaled
//! (`docs/benchmarks.md`, "2026-12-06: local speed").

pub mod affinity;
pub mod inodes;
pub mod kernel_mount;
pub mod view;

mod attr;
mod data;
mod dir;
mod namespace;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
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

/// How long the kernel may keep a name or attributes without asking again. Every change this
/// process makes is seen by the kernel: through the mount it updates or drops its own cache, and
/// a change made beneath the mount (a failback's reintegration) is invalidated explicitly
/// (`view`). A change by another program in the backing directory itself (not supported: the
/// mirrors would miss it) may stay unseen through the mount for up to this long.
pub(crate) const TTL: Duration = Duration::from_secs(60);
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
    /// `(epoch, end)`: at `Volume::holes_epoch` `epoch` the file had no hole in `[0, end)`,
    /// so a write inside that range needs no space reserved (`sys::pwrite_allocated`). Read and
    /// set under the order lock.
    allocated: Mutex<Option<(u64, u64)>>,
    /// With write tokens: the object this handle opened for writing (`TokenGate::opened`),
    /// closed at release.
    token: std::sync::OnceLock<u64>,
}

impl Handle {
    fn new(fd: OwnedFd, ino: u64, append: bool, direct: bool) -> Handle {
        Handle {
            fd,
            ino,
            append,
            direct,
            wrote: AtomicBool::new(false),
            allocated: Mutex::new(None),
            token: std::sync::OnceLock::new(),
        }
    }
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
    /// `--writeback-cache`: asked of the kernel in `init`; files are then opened as
    /// [`MirrorFs::open_flags`] says.
    writeback: bool,
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
            writeback: false,
        })
    }

    /// With `on`, asks the kernel for its writeback cache at `init` (`--writeback-cache`).
    pub fn with_writeback_cache(mut self, on: bool) -> Self {
        self.writeback = on;
        self
    }

    /// The mount's view for the volume (`Volume::mutate_beneath`), sharing this inode table;
    /// `View::attach` gives it the session's notifier once mounted.
    pub fn view(&self) -> Arc<view::View> {
        Arc::new(view::View::new(self.inodes.clone()))
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
    /// Records the parent directory's mtime after a change of one of its names. It takes no
    /// write token: a change takes the tokens of the names it changes, not of their directory
    /// (docs/protocol.md, "Which tokens a change takes").
    fn touch_parent(&self, p: &RelPath) {
        if let Some(parent) = p.parent() {
            self.record_times(parent);
        }
    }

    /// Records an entry's mtime as the backing tree has it (after it was created or truncated:
    /// applying that change on a mirror gives the mirror's entry the mirror's own clock).
    /// The `lstat` is taken under the order lock (`Volume::record`), so the time recorded is the
    /// one the backing has at that point of the order.
    ///
    /// With write tokens, the times of `p` are a change of `p`: recorded under its token (at
    /// once while this site holds it, as it does right after changing `p`; not recorded if the
    /// token is refused across a split).
    fn touch(&self, p: RelPath) {
        let Ok(tokens) = self.vol.take_file_tokens(&[&p], Some(&p)) else {
            return;
        };
        let _ = self.vol.record_holding(tokens, || self.times_of(p));
    }

    /// [`MirrorFs::touch`] without a token (a parent directory's times).
    fn record_times(&self, p: RelPath) {
        let _ = self.vol.record(|| self.times_of(p));
    }

    /// The `SetTimes` of `p`'s mtime as the backing has it (called under the order lock).
    fn times_of(&self, p: RelPath) -> Option<Op> {
        let st = self.lstat(&p).ok()?;
        Some(mtime_record(p, &st))
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

    /// With write tokens, a file opened for writing keeps its token while open (up to the
    /// machine's `hold_max_ms` once the peer asks): `TokenGate::opened`, `closed` at release.
    fn note_opened(&self, h: &Handle, p: &RelPath, flags: i32) {
        if flags & libc::O_ACCMODE == libc::O_RDONLY {
            return;
        }
        if let Some(g) = self.vol.tokens.get() {
            // A file with more than one link: its writes take the token of hard-linked files
            // first (`Volume::take_file_tokens`), and the session holds that one in place of
            // its name's (`token::HARD_LINKED` says why). A link made to the file at the other
            // site while it is open here waits for the name's token (up to `hold_max_ms`); the
            // session's later writes then wait for the shared token in turn.
            let linked = sys::fstat(h.fd.as_fd()).is_ok_and(|st| {
                let directory = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                mirrorfs_core::token::takes_hard_linked(directory, st.st_nlink)
            });
            let object = match linked {
                true => mirrorfs_core::token::HARD_LINKED,
                false => crate::site::tokens::object_of(p.as_bytes()),
            };
            if h.token.set(object).is_ok() {
                g.opened(object);
            }
        }
    }

    /// The end of [`MirrorFs::note_opened`].
    fn note_released(&self, h: &Handle) {
        if let (Some(g), Some(object)) = (self.vol.tokens.get(), h.token.get()) {
            g.closed(*object);
        }
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
        // With write tokens, under the token of the name the file has now (the session's
        // token, at once unless it went at the bound); not recorded if refused across a split.
        let Some(named) = lock(&self.inodes).path(h.ino) else {
            return;
        };
        let Ok(tokens) = self.vol.take_file_tokens(&[&named], Some(&named)) else {
            return;
        };
        let _ = self.vol.record_holding(tokens, || {
            let path = lock(&self.inodes).path(h.ino).filter(|p| *p == named)?;
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

    /// The flags a file of the mount is opened with in BACKING, from the open's `flags`.
    fn open_flags(&self, flags: i32) -> i32 {
        // O_CREAT/O_EXCL are handled by `create`; O_TRUNC arrives as a setattr (atomic_o_trunc off).
        let mut fl = (flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_TRUNC))
            | libc::O_NOFOLLOW;
        if self.writeback {
            // Under the writeback cache the kernel reads the rest of a page before it caches a
            // partial write to it, through whichever handle wrote: a write-only open must read
            // too (libfuse's passthrough examples do the same). And the kernel appends itself
            // (at its cached size) and sends each page back at an offset, again later when the
            // page changes: an O_APPEND descriptor would append that page a second time.
            if fl & libc::O_ACCMODE == libc::O_WRONLY {
                fl = (fl & !libc::O_ACCMODE) | libc::O_RDWR;
            }
            fl &= !libc::O_APPEND;
        }
        fl
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
            // Not journaled (the file has no name): counted here (see `Volume::holes_epoch`).
            fs.vol.holes_epoch.fetch_add(1, Ordering::Relaxed);
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

/// The `SetTimes` of the mtime `st` gives `p`.
fn mtime_record(p: RelPath, st: &libc::stat) -> Op {
    Op::SetTimes {
        path: p,
        atime: None,
        mtime: Some(Timespec {
            sec: st.st_mtime,
            nsec: st.st_mtime_nsec as u32,
        }),
    }
}

/// The `SetTimes` of the parent directory of `p` just removed, from the parent's `stat` taken
/// right after the removal under the order lock (`Root::remove_stat_parent`).
fn parent_times(p: &RelPath, parent: &libc::stat) -> Option<Op> {
    Some(mtime_record(p.parent()?, parent))
}

impl Filesystem for MirrorFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(kernel_mount::READAHEAD_BYTES);
        // No FUSE_PASSTHROUGH: see the module docs.
        if self.writeback {
            // Refused by an old kernel: the mount fails rather than keep an order it did not ask
            // for, or give one the user did not ask for.
            config
                .add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE)
                .map_err(|_| {
                    std::io::Error::other(
                        "this kernel has no FUSE writeback cache (--writeback-cache)",
                    )
                })?;
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.do_lookup(req, parent, name, reply)
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.do_forget(_req, ino, nlookup)
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.do_getattr(req, ino, fh, reply)
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
        self.do_setattr(
            req, ino, mode, uid, gid, size, atime, mtime, _ctime, fh, _crtime, _chgtime, _bkuptime,
            _flags, reply,
        )
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        self.do_readlink(req, ino, reply)
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
        self.do_mknod(req, parent, name, mode, umask, rdev, reply)
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
        self.do_mkdir(req, parent, name, mode, umask, reply)
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.do_unlink(req, parent, name, reply)
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.do_rmdir(req, parent, name, reply)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.do_symlink(req, parent, link_name, target, reply)
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
        self.do_rename(req, parent, name, newparent, newname, flags, reply)
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.do_link(req, ino, newparent, newname, reply)
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.do_open(req, ino, flags, reply)
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
        self.do_read(req, _ino, fh, offset, size, _flags, _lock, reply)
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
        self.do_write(req, ino, fh, offset, data, _wf, _flags, _lock, reply)
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        self.do_flush(req, _ino, fh, _lock, reply)
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
        self.do_release(req, _ino, fh, _flags, _lock, _flush, reply)
    }

    fn fsync(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.do_fsync(req, _ino, fh, datasync, reply)
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.do_opendir(req, ino, _flags, reply)
    }

    fn readdir(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        self.do_readdir(req, _ino, fh, offset, reply)
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        self.do_readdirplus(req, ino, fh, offset, reply)
    }

    fn releasedir(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.do_releasedir(req, _ino, fh, _flags, reply)
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.do_fsyncdir(req, ino, _fh, _datasync, reply)
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.do_statfs(req, _ino, reply)
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
        self.do_setxattr(req, ino, name, value, flags, _position, reply)
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.do_getxattr(req, ino, name, size, reply)
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.do_listxattr(req, ino, size, reply)
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.do_removexattr(req, ino, name, reply)
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
        self.do_create(req, parent, name, mode, umask, flags, reply)
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
        self.do_fallocate(req, ino, fh, offset, length, mode, reply)
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
        self.do_lseek(req, _ino, fh, offset, whence, reply)
    }
}
