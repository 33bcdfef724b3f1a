//! Directory handles: opendir, readdir, readdirplus, releasedir, fsyncdir.

// The argument lists are those of fuser's `Filesystem` methods, which these implement.
#![allow(clippy::too_many_arguments)]

use super::*;

impl MirrorFs {
    pub(super) fn do_opendir(
        &self,
        req: &Request,
        ino: INodeNo,
        _flags: OpenFlags,
        reply: ReplyOpen,
    ) {
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

    pub(super) fn do_readdir(
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

    pub(super) fn do_readdirplus(
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

    pub(super) fn do_releasedir(
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

    pub(super) fn do_fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        crate::fuse::affinity::follow(req.pid());
        // A directory with no name left (removed) has nothing of its own to make durable; one
        // that has a name is synced, and a failure to open it is the fsync's failure, never a
        // success that synced nothing.
        if let Ok(p) = self.path(ino) {
            let fd = match self.root.open_at(
                &p,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            ) {
                Ok(fd) => fd,
                Err(e) => return reply.error(io_errno(&e)),
            };
            if let Err(e) = sys::fsync(fd.as_fd()) {
                return reply.error(io_errno(&e));
            }
        }
        match self.vol.application_synced() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }
}
