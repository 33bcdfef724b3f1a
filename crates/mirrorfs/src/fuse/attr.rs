//! Attributes: getattr, setattr, readlink, statfs and extended attributes.

// The argument lists are those of fuser's `Filesystem` methods, which these implement.
#![allow(clippy::too_many_arguments)]

use super::*;

/// The mount root's attribute that begins and ends groups of changes that mirrors show all
/// together or not at all (`core::group`): `setfattr -n user.mirrorfs.group -v begin MOUNT`,
/// then `-v end`; reading it gives the number of groups open. Never stored: the root of the
/// backing directory and of mirrors has no such attribute.
pub const GROUP_XATTR: &[u8] = b"user.mirrorfs.group";
/// The mount root's attribute of an operator's resync of a mirror (`mirrorfs resync`,
/// `verify --repair`): set to `keep-extra PATH` or `delete-extra PATH` (PATH a local mirror's
/// directory or a network mirror's `mirror://HOST:PORT`), the request goes to the volume's
/// resync hook (`mirror::operator`); read, it tells where each mirror's stands (JSON).
pub const RESYNC_XATTR: &[u8] = b"user.mirrorfs.resync";

/// Where each mirror's operator resync stands: the value of [`RESYNC_XATTR`].
fn resync_status_json(vol: &crate::site::volume::Volume) -> Vec<u8> {
    let v: Vec<serde_json::Value> = vol
        .mirrors
        .iter()
        .map(|m| {
            let r = lock(&m.operator_resync).clone();
            serde_json::json!({
                "mirror": m.name,
                "running": r.running,
                "done": r.done,
                "error": r.error,
            })
        })
        .collect();
    serde_json::to_vec(&v).unwrap_or_default()
}

/// `begin` → true, `end` → false (a trailing newline allowed, as `echo` writes it).
fn group_command(value: &[u8]) -> Option<bool> {
    match value.strip_suffix(b"\n").unwrap_or(value) {
        b"begin" => Some(true),
        b"end" => Some(false),
        _ => None,
    }
}

impl MirrorFs {
    pub(super) fn do_getattr(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
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

    pub(super) fn do_setattr(
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

    pub(super) fn do_readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        crate::fuse::affinity::follow(req.pid());
        match self
            .path(ino)
            .and_then(|p| self.root.readlink(&p).map_err(|e| io_errno(&e)))
        {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    pub(super) fn do_statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
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

    pub(super) fn do_setxattr(
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
        if name.as_bytes() == GROUP_XATTR {
            if ino.0 != crate::fuse::inodes::ROOT {
                // Reserved: only the mount's root has it.
                return reply.error(err(libc::EOPNOTSUPP));
            }
            return match group_command(value) {
                Some(begin) => match self.vol.group(begin) {
                    Ok(_) => reply.ok(),
                    Err(e) => reply.error(err(e)),
                },
                None => reply.error(err(libc::EINVAL)),
            };
        }
        if name.as_bytes() == RESYNC_XATTR {
            if ino.0 != crate::fuse::inodes::ROOT {
                return reply.error(err(libc::EOPNOTSUPP));
            }
            return match self.vol.resync.get().map(|start| start(value)) {
                Some(Ok(())) => reply.ok(),
                Some(Err(e)) => reply.error(err(e)),
                None => reply.error(err(libc::EOPNOTSUPP)),
            };
        }
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

    pub(super) fn do_getxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        crate::fuse::affinity::follow(req.pid());
        if ino.0 == crate::fuse::inodes::ROOT && name.as_bytes() == GROUP_XATTR {
            let open = lock(&self.vol.groups).open().to_string();
            return match size {
                0 => reply.size(open.len() as u32),
                n if (n as usize) < open.len() => reply.error(err(libc::ERANGE)),
                _ => reply.data(open.as_bytes()),
            };
        }
        if ino.0 == crate::fuse::inodes::ROOT && name.as_bytes() == RESYNC_XATTR {
            let v = resync_status_json(&self.vol);
            return match size {
                0 => reply.size(v.len() as u32),
                n if (n as usize) < v.len() => reply.error(err(libc::ERANGE)),
                _ => reply.data(&v),
            };
        }
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

    pub(super) fn do_listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
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

    pub(super) fn do_removexattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        reply: ReplyEmpty,
    ) {
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
}
