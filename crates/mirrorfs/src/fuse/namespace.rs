//! Names: lookup, forget, and the changes that make, remove or move names (mknod, mkdir, unlink, rmdir, symlink, rename, link, create), each journaled through the volume.

// The argument lists are those of fuser's `Filesystem` methods, which these implement.
#![allow(clippy::too_many_arguments)]

use super::*;

impl MirrorFs {
    pub(super) fn do_lookup(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        reply: ReplyEntry,
    ) {
        crate::fuse::affinity::follow(req.pid());
        if parent.0 == ROOT && self.hidden.as_deref() == Some(name.as_bytes()) {
            return reply.error(Errno::ENOENT);
        }
        match self.child(parent, name) {
            Ok(p) => self.entry(parent, name, &p, reply),
            Err(e) => reply.error(e),
        }
    }

    pub(super) fn do_forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        lock(&self.inodes).forget(ino.0, nlookup);
    }

    pub(super) fn do_mknod(
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

    pub(super) fn do_mkdir(
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

    pub(super) fn do_unlink(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        reply: ReplyEmpty,
    ) {
        crate::fuse::affinity::follow(req.pid());
        let p = match self.child(parent, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        // The token first, then what the record says (the file's link count): by then the
        // peer's changes to this name that came first are applied here. The count is read under
        // the order lock, through the parent's handle the removal and the parent's times (in
        // the same hold: `Volume::mutate_built_then`) use too.
        let tokens = match self.vol.take_tokens(&[&p]) {
            Ok(t) => t,
            Err(e) => return reply.error(err(e)),
        };
        match self.vol.mutate_built_then(
            tokens,
            || {
                let r = self.root.removal(&p)?;
                let st = *r.lstat.as_ref().map_err(clone_err)?;
                let op = Op::Unlink {
                    path: p.clone(),
                    nlink: st.st_nlink as u32,
                };
                Ok((op, (r, st)))
            },
            |(r, st)| {
                let dir = r.remove(false)?;
                self.mark_gone(&st);
                Ok((dir, st))
            },
            |(dir, _)| parent_times(&p, dir.as_ref()?),
        ) {
            Ok(((_, st), _)) => {
                let ino = lock(&self.inodes).fuse_ino(st.st_ino);
                lock(&self.inodes).unlink(parent.0, name.as_bytes(), ino);
                reply.ok()
            }
            Err(e) => reply.error(err(e)),
        }
    }

    pub(super) fn do_rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        crate::fuse::affinity::follow(req.pid());
        let p = match self.child(parent, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let tokens = match self.vol.take_tokens(&[&p]) {
            Ok(t) => t,
            Err(e) => return reply.error(err(e)),
        };
        match self.vol.mutate_built_then(
            tokens,
            || Ok((Op::Rmdir { path: p.clone() }, self.root.removal(&p)?)),
            |r| {
                let dir = r.remove(true)?;
                let st = r.lstat.ok();
                if let Some(st) = &st {
                    self.mark_gone(st);
                }
                Ok((dir, st))
            },
            |(dir, _)| parent_times(&p, dir.as_ref()?),
        ) {
            Ok(((_, st), _)) => {
                if let Some(st) = st {
                    let ino = lock(&self.inodes).fuse_ino(st.st_ino);
                    lock(&self.inodes).unlink(parent.0, name.as_bytes(), ino);
                }
                reply.ok()
            }
            Err(e) => reply.error(err(e)),
        }
    }

    pub(super) fn do_symlink(
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

    pub(super) fn do_rename(
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
        // Both names' tokens first (in the order both sites take them), then the inodes the
        // record and the inode table use: the peer's earlier changes to them are applied.
        let tokens = match self.vol.take_tokens(&[&from, &to]) {
            Ok(t) => t,
            Err(e) => return reply.error(err(e)),
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
        match self.vol.mutate_holding(tokens, op, || {
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

    pub(super) fn do_link(
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

    pub(super) fn do_create(
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
        let fl = (self.open_flags(flags) & !libc::O_ACCMODE) | libc::O_RDWR;
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
            Ok((fd, _)) => {
                // The new file's own times are recorded when it is closed (`wrote` below), with
                // what it was written: one `SetTimes` for the create and the writes instead of
                // two (issue 9).
                self.touch_parent(&p);
                fd
            }
            // Two writable sites: the other site made the name while this create waited for its
            // token (the kernel had looked it up absent here). Without O_EXCL, open(2) opens the
            // file that is there, as it would have had the name been here at the lookup.
            Err(libc::EEXIST) if flags & libc::O_EXCL == 0 => {
                match self.open_created_meanwhile(req, &p, fl, flags) {
                    Ok(fd) => fd,
                    Err(e) => return reply.error(err(e)),
                }
            }
            Err(e) => return reply.error(err(e)),
        };
        let st = match sys::fstat(fd.as_fd()) {
            Ok(st) => st,
            Err(e) => return reply.error(io_errno(&e)),
        };
        let id = lock(&self.inodes).register(parent.0, name.as_bytes(), st.st_ino);
        let a = self.attr_of(INodeNo(id), &st);
        let h = Handle::new(
            fd,
            a.ino.0,
            fl & libc::O_APPEND != 0,
            fl & libc::O_DIRECT != 0,
        );
        self.note_opened(&h, &p, flags);
        h.wrote.store(true, Ordering::Relaxed);
        let fh = self.add_handle(h);
        reply.created(
            &TTL,
            &a,
            Generation(0),
            FileHandle(fh),
            FopenFlags::FOPEN_KEEP_CACHE,
        );
    }
    /// `create` without O_EXCL of a name that appeared while it waited for its token: the
    /// regular file there, opened `fl` (never following a symlink: `ELOOP`; a directory:
    /// `EISDIR`), truncated through the journal when asked (`O_TRUNC`). The kernel checked
    /// only the right to create in the directory, so the file's own mode must let the caller
    /// read and write it; where that is not plainly so, the create fails as before (`EEXIST`).
    fn open_created_meanwhile(
        &self,
        req: &Request,
        p: &RelPath,
        fl: i32,
        flags: i32,
    ) -> Result<std::os::fd::OwnedFd, i32> {
        let fd = self.root.open_at(p, fl, 0).map_err(|e| sys::errno_of(&e))?;
        let st = sys::fstat(fd.as_fd()).map_err(|e| sys::errno_of(&e))?;
        let want = match flags & libc::O_ACCMODE {
            libc::O_RDONLY => 0o4,
            libc::O_WRONLY => 0o2,
            _ => 0o6,
        };
        let bits = if req.uid() == 0 {
            0o7
        } else if req.uid() == st.st_uid {
            (st.st_mode >> 6) & 0o7
        } else if req.gid() == st.st_gid {
            (st.st_mode >> 3) & 0o7
        } else {
            st.st_mode & 0o7
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || bits & want != want {
            return Err(libc::EEXIST);
        }
        if flags & libc::O_TRUNC != 0 {
            self.vol
                .mutate(
                    Op::Truncate {
                        path: p.clone(),
                        size: 0,
                    },
                    || sys::ftruncate(fd.as_fd(), 0),
                )
                .map(drop)?;
            self.touch(p.clone());
        }
        Ok(fd)
    }
}

/// An `io::Error` of the system's, again (the `lstat` a removal looked at is kept by reference).
fn clone_err(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(n) => std::io::Error::from_raw_os_error(n),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}
