//! File contents: open, read, write, flush, release, fsync, fallocate, lseek.

// The argument lists are those of fuser's `Filesystem` methods, which these implement.
#![allow(clippy::too_many_arguments)]

use super::*;

/// The largest READ served from [`READ_BUF`]: the kernel's largest (`max_pages`, which follows
/// `max_readahead` and `max_write`, 1 MiB each). A larger one gets a buffer of its own.
const READ_BUF_BYTES: usize = 1 << 20;

thread_local! {
    /// A FUSE thread's buffer for READs, at most [`READ_BUF_BYTES`].
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl MirrorFs {
    pub(super) fn do_open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        crate::fuse::affinity::follow(req.pid());
        let mut fl = self.open_flags(flags.0);
        // The file opened must be the inode asked for: its writes are journaled under the
        // inode's name, so a file renamed over that name in the meantime is not it.
        let r = self.retry_renamed(|| {
            let p = self.path(ino).map_err(|e| e.code())?;
            let fd = match self.root.open_at(&p, fl, 0) {
                // A write-only file opened for reading too under the writeback cache, by a
                // daemon not running as root: write-only it is (a partial page written through
                // it then fails as the kernel's read of the page does).
                Err(e)
                    if sys::errno_of(&e) == libc::EACCES
                        && flags.0 & libc::O_ACCMODE == libc::O_WRONLY
                        && fl & libc::O_ACCMODE == libc::O_RDWR =>
                {
                    fl = (fl & !libc::O_ACCMODE) | libc::O_WRONLY;
                    self.root.open_at(&p, fl, 0)
                }
                other => other,
            }
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
        if fl & libc::O_ACCMODE == libc::O_RDONLY && fl & libc::O_DIRECT == 0 {
            // READs of a file come in order, up to 1 MiB each and two at a time: a larger
            // window on the backing file keeps its disk reads ahead of them. A failure only
            // leaves the default window.
            let _ = sys::fadvise_sequential(fd.as_fd());
        }
        let h = Handle::new(
            fd,
            ino.0,
            fl & libc::O_APPEND != 0,
            fl & libc::O_DIRECT != 0,
        );
        if let Ok(p) = self.path(ino) {
            self.note_opened(&h, &p, fl);
        }
        let fh = self.add_handle(h);
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    pub(super) fn do_read(
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
        let size = size as usize;
        if h.direct || size > READ_BUF_BYTES {
            let mut buf = sys::IoBuf::new(size, h.direct);
            return match sys::pread(h.fd.as_fd(), buf.as_mut(), offset) {
                Ok(n) => reply.data(&buf.as_mut()[..n]),
                Err(e) => reply.error(io_errno(&e)),
            };
        }
        // One buffer per FUSE thread, kept: no allocation and zeroing per READ.
        READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < size {
                buf.resize(size, 0);
            }
            match sys::pread(h.fd.as_fd(), &mut buf[..size], offset) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(io_errno(&e)),
            }
        })
    }

    pub(super) fn do_write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        crate::fuse::affinity::follow(req.pid());
        let cached = wf.contains(WriteFlags::FUSE_WRITE_CACHE);
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
                    .mutate_open(op, h.fd.as_fd(), || {
                        self.still_named(ino, &p)?;
                        // The kernel's write-back: the kernel owns the file's mtime (the time of
                        // the write(2), sent in a SETATTR that may come before this request), so
                        // the backing file keeps the mtime it had.
                        let kept = match cached {
                            true => Some(sys::fstat(h.fd.as_fd())?),
                            false => None,
                        };
                        // Whole or nothing: its record is aborted if it fails (see sys).
                        self.write_whole(&h, chunk, off)?;
                        if let Some(st) = kept {
                            let mtime = Timespec {
                                sec: st.st_mtime,
                                nsec: st.st_mtime_nsec as u32,
                            };
                            // After the write, which took effect: a failure must not abort its
                            // record, and the kernel's SETATTR sets the time again at close.
                            let _ = sys::futimens(h.fd.as_fd(), None, Some(mtime));
                        }
                        Ok(())
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

    /// `sys::pwrite_whole`, without its reservation (`fallocate`, `fstat`) when the range is
    /// known to lie over blocks the file has: learnt with one `SEEK_HOLE` per handle after its
    /// first overwrite, forgotten when a truncate or a hole-making `fallocate` is applied.
    /// Called under the order lock, as those are.
    fn write_whole(&self, h: &Handle, buf: &[u8], off: u64) -> std::io::Result<()> {
        let fd = h.fd.as_fd();
        let end = off + buf.len() as u64;
        let epoch = self.vol.holes_epoch.load(Ordering::Relaxed);
        let known = *lock(&h.allocated);
        if matches!(known, Some((e, allocated)) if e == epoch && end <= allocated) {
            return sys::pwrite_allocated(fd, buf, off);
        }
        let size_before = sys::pwrite_whole(fd, buf, off)?;
        // An overwrite (a database's pages, an editor's in-place save): learn, once per epoch,
        // how far from the start the file has no hole. Appends learn nothing (no extra call).
        if end <= size_before && !matches!(known, Some((e, _)) if e == epoch) {
            let allocated = sys::next_hole(fd, 0).unwrap_or(0);
            *lock(&h.allocated) = Some((epoch, allocated));
        }
        Ok(())
    }

    pub(super) fn do_flush(
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

    pub(super) fn do_release(
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
            self.note_released(&h);
        }
        reply.ok()
    }

    pub(super) fn do_fsync(
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
        match self.vol.application_synced() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    pub(super) fn do_fallocate(
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
            self.vol.mutate_open(
                Op::Fallocate {
                    path: p.clone(),
                    mode,
                    offset,
                    len: length,
                },
                h.fd.as_fd(),
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

    pub(super) fn do_lseek(
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
