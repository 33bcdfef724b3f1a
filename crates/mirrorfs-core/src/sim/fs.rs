//! [`SimTree`]: an in-memory [`Tree`] with the error semantics of Linux (as seen through the real
//! mirror tree, which resolves paths with `RESOLVE_NO_SYMLINKS` and maps `ELOOP` to `NotDir`) and
//! the crash behaviour of an ext4-like file system:
//!
//! - metadata changes (create, mkdir, link, unlink, rmdir, rename, truncate, fallocate, chmod,
//!   chown, utimes, xattrs) are journaled in order: a crash keeps a random *prefix* of the changes
//!   made since the last `sync`;
//! - file data (each `write`, including the size it extends the file to, as with delayed
//!   allocation) reaches the disk independently: a crash keeps a random *subset* of the unsynced
//!   writes, each whole or not, or (torn mode) each 4 KiB page of each write independently;
//! - `sync` (`syncfs`) makes everything durable.
//!
//! Multi-step primitives are not atomic, like their real counterparts: `create` is
//! `open(O_CREAT|O_EXCL)` + `fchown` + `fchmod`, so a crash or kill can leave a file with the
//! process's owner and a umasked mode; `remove_all` is a series of `unlink`s and `rmdir`s.
//!
//! Inode numbers are reused (the lowest free number is taken, as ext4 tends to), while an internal
//! id that is never reused ties unsynced data to the right file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use super::{KillSwitch, SimRng};
use crate::op::{rename_flags, Timespec};
use crate::path::RelPath;
use crate::tree::{EntryKind, Tree, TreeError, ENODATA};

const EPERM: i32 = 1;
const EIO: i32 = 5;
const ENXIO: i32 = 6;
const EINVAL: i32 = 22;
const EOPNOTSUPP: i32 = 95;

const S_IFMT: u32 = 0o170_000;
const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_IXGRP: u32 = 0o010;
/// The umask of the mirrorfs process, applied by `open`, `mkdir` and `mknod` before `fchmod`.
const UMASK: u32 = 0o022;

const ROOT: u64 = 1;
const ROOT_INO: u64 = 2;
const FIRST_INO: u64 = 11;
const PAGE: u64 = 4096;

const XATTR_CREATE: i32 = 1;
const XATTR_REPLACE: i32 = 2;

const FALLOC_FL_KEEP_SIZE: i32 = 1;
const FALLOC_FL_PUNCH_HOLE: i32 = 2;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Body {
    File(Arc<Vec<u8>>),
    Dir(BTreeMap<Vec<u8>, u64>),
    Symlink(Vec<u8>),
    Special { fmt: u32, rdev: u64 },
}

impl Body {
    fn kind(&self) -> EntryKind {
        match self {
            Body::File(_) => EntryKind::File,
            Body::Dir(_) => EntryKind::Dir,
            Body::Symlink(_) => EntryKind::Symlink,
            Body::Special { .. } => EntryKind::Special,
        }
    }
}

#[derive(Clone, Debug)]
struct Inode {
    /// The inode number `stat` reports (reused after the inode is freed).
    ino: u64,
    body: Body,
    /// Permission bits (`mode & 0o7777`).
    perm: u32,
    uid: u32,
    gid: u32,
    atime: Timespec,
    mtime: Timespec,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Directory entries naming this inode.
    nlink: u32,
}

/// The state of a simulated file system: inodes by internal id (never reused).
#[derive(Clone, Debug)]
pub struct FsState {
    inodes: BTreeMap<u64, Inode>,
    next_id: u64,
}

/// One metadata change, replayable on the durable state in a crash.
#[derive(Clone, Debug)]
enum Call {
    /// A new inode with the owner of the process (root) and a umasked mode.
    New {
        path: RelPath,
        body: Body,
        perm: u32,
        id: u64,
        ino: u64,
    },
    Link {
        from: RelPath,
        to: RelPath,
    },
    Unlink {
        path: RelPath,
    },
    Rmdir {
        path: RelPath,
    },
    Rename {
        from: RelPath,
        to: RelPath,
        flags: u32,
    },
    Truncate {
        path: RelPath,
        size: u64,
    },
    Fallocate {
        path: RelPath,
        mode: i32,
        offset: u64,
        len: u64,
    },
    Chmod {
        path: RelPath,
        perm: u32,
    },
    Chown {
        path: RelPath,
        uid: Option<u32>,
        gid: Option<u32>,
    },
    Utimes {
        path: RelPath,
        atime: Option<Timespec>,
        mtime: Option<Timespec>,
    },
    SetXattr {
        path: RelPath,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: i32,
    },
    RemoveXattr {
        path: RelPath,
        name: Vec<u8>,
    },
}

#[derive(Clone, Debug)]
enum Unsynced {
    Meta(Call),
    /// A `pwrite` to the inode with internal id `id` (extends the file as needed).
    Data {
        id: u64,
        offset: u64,
        data: Arc<Vec<u8>>,
    },
}

fn not_found(p: &RelPath) -> TreeError {
    TreeError::NotFound(p.to_string())
}
fn exists(p: &RelPath) -> TreeError {
    TreeError::Exists(p.to_string())
}
fn not_dir(p: &RelPath) -> TreeError {
    TreeError::NotDir(p.to_string())
}
fn is_dir(p: &RelPath) -> TreeError {
    TreeError::IsDir(p.to_string())
}
fn not_empty(p: &RelPath) -> TreeError {
    TreeError::NotEmpty(p.to_string())
}
fn other(p: &RelPath, errno: i32, msg: &str) -> TreeError {
    TreeError::Other {
        path: p.to_string(),
        errno,
        msg: msg.to_string(),
    }
}

fn components(p: &RelPath) -> impl Iterator<Item = &[u8]> {
    p.as_bytes().split(|b| *b == b'/').filter(|c| !c.is_empty())
}

/// What the workload generator needs to know about one entry.
#[derive(Clone, Debug)]
pub struct EntryInfo {
    pub path: RelPath,
    pub kind: EntryKind,
    pub ino: u64,
    pub nlink: u32,
    pub size: u64,
    /// For directories: has no entries.
    pub empty: bool,
    pub depth: usize,
    pub xattr_names: Vec<Vec<u8>>,
}

impl Default for FsState {
    fn default() -> Self {
        Self::new()
    }
}

impl FsState {
    /// An empty root directory (mode 0755, owned by root).
    pub fn new() -> Self {
        let root = Inode {
            ino: ROOT_INO,
            body: Body::Dir(BTreeMap::new()),
            perm: 0o755,
            uid: 0,
            gid: 0,
            atime: Timespec::default(),
            mtime: Timespec::default(),
            xattrs: BTreeMap::new(),
            nlink: 1,
        };
        FsState {
            inodes: BTreeMap::from([(ROOT, root)]),
            next_id: ROOT + 1,
        }
    }

    fn node(&self, id: u64) -> Result<&Inode, TreeError> {
        self.inodes
            .get(&id)
            .ok_or_else(|| other(&RelPath::root(), EIO, "dangling directory entry (sim bug)"))
    }

    fn node_mut(&mut self, id: u64) -> Result<&mut Inode, TreeError> {
        self.inodes
            .get_mut(&id)
            .ok_or_else(|| other(&RelPath::root(), EIO, "dangling directory entry (sim bug)"))
    }

    fn entries(&self, dir: u64) -> Result<&BTreeMap<Vec<u8>, u64>, TreeError> {
        match &self.node(dir)?.body {
            Body::Dir(e) => Ok(e),
            _ => Err(other(&RelPath::root(), EIO, "not a directory (sim bug)")),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Result<&mut BTreeMap<Vec<u8>, u64>, TreeError> {
        match &mut self.node_mut(dir)?.body {
            Body::Dir(e) => Ok(e),
            _ => Err(other(&RelPath::root(), EIO, "not a directory (sim bug)")),
        }
    }

    /// The directory `dir`, resolved without following symlinks: a symlink or a non-directory
    /// component gives `NotDir` (`ELOOP` is mapped to `NotDir` by the real tree), a missing one
    /// `NotFound`.
    fn dir_id(&self, dir: &RelPath) -> Result<u64, TreeError> {
        let mut cur = ROOT;
        for comp in components(dir) {
            let Body::Dir(e) = &self.node(cur)?.body else {
                return Err(not_dir(dir));
            };
            cur = *e.get(comp).ok_or_else(|| not_found(dir))?;
        }
        match self.node(cur)?.body {
            Body::Dir(_) => Ok(cur),
            _ => Err(not_dir(dir)),
        }
    }

    /// The directory holding `path` and the last component.
    fn parent_of<'p>(&self, path: &'p RelPath) -> Result<(u64, &'p [u8]), TreeError> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(other(path, EINVAL, "operation on the mirror root"));
        };
        Ok((self.dir_id(&parent)?, name))
    }

    /// The inode `path` names, if any (the root for the empty path).
    fn lookup(&self, path: &RelPath) -> Result<Option<u64>, TreeError> {
        if path.is_root() {
            return Ok(Some(ROOT));
        }
        let (d, name) = self.parent_of(path)?;
        Ok(self.entries(d)?.get(name).copied())
    }

    fn must(&self, path: &RelPath) -> Result<u64, TreeError> {
        self.lookup(path)?.ok_or_else(|| not_found(path))
    }

    /// The regular file `path`, as `open(O_WRONLY | O_NOFOLLOW)` would find it.
    fn file_for_write(&self, path: &RelPath) -> Result<u64, TreeError> {
        let id = self.must(path)?;
        match self.node(id)?.body {
            Body::File(_) => Ok(id),
            Body::Dir(_) => Err(is_dir(path)),
            // O_NOFOLLOW on a symlink: ELOOP, which the real tree reports as NotDir.
            Body::Symlink(_) => Err(not_dir(path)),
            Body::Special { .. } => Err(other(path, ENXIO, "not a regular file")),
        }
    }

    /// Lowest free inode number, and a fresh internal id.
    fn alloc(&self) -> (u64, u64) {
        let used: BTreeSet<u64> = self.inodes.values().map(|i| i.ino).collect();
        let mut ino = FIRST_INO;
        while used.contains(&ino) {
            ino += 1;
        }
        (self.next_id, ino)
    }

    fn drop_link(&mut self, id: u64) -> Result<(), TreeError> {
        let n = self.node_mut(id)?;
        n.nlink = n.nlink.saturating_sub(1);
        if n.nlink == 0 {
            self.inodes.remove(&id);
        }
        Ok(())
    }

    fn is_dir_id(&self, id: u64) -> Result<bool, TreeError> {
        Ok(matches!(self.node(id)?.body, Body::Dir(_)))
    }

    fn write_data(&mut self, id: u64, offset: u64, data: &[u8]) {
        let Some(Inode {
            body: Body::File(content),
            ..
        }) = self.inodes.get_mut(&id)
        else {
            return;
        };
        let c = Arc::make_mut(content);
        let end = offset as usize + data.len();
        if c.len() < end {
            c.resize(end, 0);
        }
        c[offset as usize..end].copy_from_slice(data);
    }

    fn apply(&mut self, call: &Call) -> Result<(), TreeError> {
        match call {
            Call::New {
                path,
                body,
                perm,
                id,
                ino,
            } => {
                let (d, name) = self.parent_of(path)?;
                if self.entries(d)?.contains_key(name) {
                    return Err(exists(path));
                }
                let name = name.to_vec();
                self.inodes.insert(
                    *id,
                    Inode {
                        ino: *ino,
                        body: body.clone(),
                        perm: *perm,
                        uid: 0,
                        gid: 0,
                        atime: Timespec::default(),
                        mtime: Timespec::default(),
                        xattrs: BTreeMap::new(),
                        nlink: 1,
                    },
                );
                self.entries_mut(d)?.insert(name, *id);
                self.next_id = self.next_id.max(id + 1);
                Ok(())
            }
            Call::Link { from, to } => {
                let src = self.must(from)?;
                let (td, tname) = self.parent_of(to)?;
                if self.entries(td)?.contains_key(tname) {
                    return Err(exists(to));
                }
                if self.is_dir_id(src)? {
                    return Err(other(to, EPERM, "hard link to a directory"));
                }
                let tname = tname.to_vec();
                self.entries_mut(td)?.insert(tname, src);
                self.node_mut(src)?.nlink += 1;
                Ok(())
            }
            Call::Unlink { path } => {
                let (d, name) = self.parent_of(path)?;
                let id = *self.entries(d)?.get(name).ok_or_else(|| not_found(path))?;
                if self.is_dir_id(id)? {
                    return Err(is_dir(path));
                }
                self.entries_mut(d)?.remove(name);
                self.drop_link(id)
            }
            Call::Rmdir { path } => {
                let (d, name) = self.parent_of(path)?;
                let id = *self.entries(d)?.get(name).ok_or_else(|| not_found(path))?;
                match &self.node(id)?.body {
                    Body::Dir(e) if !e.is_empty() => return Err(not_empty(path)),
                    Body::Dir(_) => {}
                    _ => return Err(not_dir(path)),
                }
                self.entries_mut(d)?.remove(name);
                self.drop_link(id)
            }
            Call::Rename { from, to, flags } => self.rename(from, to, *flags),
            Call::Truncate { path, size } => {
                let id = self.file_for_write(path)?;
                if let Body::File(c) = &mut self.node_mut(id)?.body {
                    Arc::make_mut(c).resize(*size as usize, 0);
                }
                Ok(())
            }
            Call::Fallocate {
                path,
                mode,
                offset,
                len,
            } => {
                let id = self.file_for_write(path)?;
                if *len == 0 {
                    return Err(other(path, EINVAL, "fallocate of length 0"));
                }
                let keep = mode & FALLOC_FL_KEEP_SIZE != 0;
                let end = (offset + len) as usize;
                let Body::File(c) = &mut self.node_mut(id)?.body else {
                    return Ok(());
                };
                match mode & !FALLOC_FL_KEEP_SIZE {
                    0 => {}
                    FALLOC_FL_PUNCH_HOLE if keep => {
                        let c = Arc::make_mut(c);
                        let (a, b) = ((*offset as usize).min(c.len()), end.min(c.len()));
                        c[a..b].fill(0);
                        return Ok(());
                    }
                    FALLOC_FL_ZERO_RANGE => {
                        let c = Arc::make_mut(c);
                        let (a, b) = ((*offset as usize).min(c.len()), end.min(c.len()));
                        c[a..b].fill(0);
                    }
                    _ => return Err(other(path, EOPNOTSUPP, "fallocate mode")),
                }
                if !keep && c.len() < end {
                    Arc::make_mut(c).resize(end, 0);
                }
                Ok(())
            }
            Call::Chmod { path, perm } => {
                let id = self.must(path)?;
                let n = self.node_mut(id)?;
                if matches!(n.body, Body::Symlink(_)) {
                    // fchmodat(AT_SYMLINK_NOFOLLOW) on a symlink: Linux cannot change its mode.
                    return Err(other(path, EOPNOTSUPP, "chmod of a symlink"));
                }
                n.perm = perm & 0o7777;
                Ok(())
            }
            Call::Chown { path, uid, gid } => {
                let id = self.must(path)?;
                let n = self.node_mut(id)?;
                if let Some(u) = uid {
                    n.uid = *u;
                }
                if let Some(g) = gid {
                    n.gid = *g;
                }
                // chown(2) clears set-user-ID, and set-group-ID when group-executable, on
                // anything but a directory (even for root).
                if !matches!(n.body, Body::Dir(_)) && (uid.is_some() || gid.is_some()) {
                    n.perm &= !S_ISUID;
                    if n.perm & S_IXGRP != 0 {
                        n.perm &= !S_ISGID;
                    }
                }
                Ok(())
            }
            Call::Utimes { path, atime, mtime } => {
                let id = self.must(path)?;
                let n = self.node_mut(id)?;
                if let Some(a) = atime {
                    n.atime = *a;
                }
                if let Some(m) = mtime {
                    n.mtime = *m;
                }
                Ok(())
            }
            Call::SetXattr {
                path,
                name,
                value,
                flags,
            } => {
                let id = self.must(path)?;
                let n = self.node_mut(id)?;
                if !matches!(n.body, Body::File(_) | Body::Dir(_)) {
                    // user.* attributes exist only on regular files and directories.
                    return Err(other(
                        path,
                        EPERM,
                        "user xattr on a symlink or special file",
                    ));
                }
                if flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 {
                    return Err(other(path, EINVAL, "xattr flags"));
                }
                let present = n.xattrs.contains_key(name);
                if flags & XATTR_CREATE != 0 && present {
                    return Err(exists(path));
                }
                if flags & XATTR_REPLACE != 0 && !present {
                    return Err(other(path, ENODATA, "no such attribute"));
                }
                n.xattrs.insert(name.clone(), value.clone());
                Ok(())
            }
            Call::RemoveXattr { path, name } => {
                let id = self.must(path)?;
                let n = self.node_mut(id)?;
                if !matches!(n.body, Body::File(_) | Body::Dir(_)) {
                    return Err(other(
                        path,
                        EPERM,
                        "user xattr on a symlink or special file",
                    ));
                }
                if n.xattrs.remove(name).is_none() {
                    return Err(other(path, ENODATA, "no such attribute"));
                }
                Ok(())
            }
        }
    }

    /// `renameat2`, with the checks in the order Linux makes them.
    fn rename(&mut self, from: &RelPath, to: &RelPath, flags: u32) -> Result<(), TreeError> {
        use rename_flags::{EXCHANGE, NOREPLACE};
        if flags & !(NOREPLACE | EXCHANGE) != 0 || flags == NOREPLACE | EXCHANGE {
            return Err(other(from, EINVAL, "rename flags"));
        }
        let (fd, fname) = self.parent_of(from)?;
        let (td, tname) = self.parent_of(to)?;
        let src = *self
            .entries(fd)?
            .get(fname)
            .ok_or_else(|| not_found(from))?;
        let dst = self.entries(td)?.get(tname).copied();
        if flags & NOREPLACE != 0 && dst.is_some() {
            return Err(exists(to));
        }
        if flags & EXCHANGE != 0 && dst.is_none() {
            return Err(not_found(to));
        }
        // The source must not be an ancestor of the target ...
        if to.starts_with(from) && to != from {
            return Err(other(from, EINVAL, "rename into its own subdirectory"));
        }
        // ... nor the target an ancestor of the source.
        if from.starts_with(to) && to != from {
            return Err(if flags & EXCHANGE != 0 {
                other(from, EINVAL, "exchange with an ancestor")
            } else {
                not_empty(to)
            });
        }
        if dst == Some(src) {
            // Two names of one inode (or the same name): rename does nothing.
            return Ok(());
        }
        let tname = tname.to_vec();
        let fname = fname.to_vec();
        if flags & EXCHANGE != 0 {
            if let Some(d) = dst {
                self.entries_mut(fd)?.insert(fname, d);
                self.entries_mut(td)?.insert(tname, src);
            }
            return Ok(());
        }
        let src_dir = self.is_dir_id(src)?;
        if let Some(d) = dst {
            match &self.node(d)?.body {
                Body::Dir(e) => {
                    if !src_dir {
                        return Err(is_dir(to));
                    }
                    if !e.is_empty() {
                        return Err(not_empty(to));
                    }
                }
                _ if src_dir => return Err(not_dir(to)),
                _ => {}
            }
            self.entries_mut(td)?.remove(&tname);
            self.drop_link(d)?;
        }
        self.entries_mut(fd)?.remove(&fname);
        self.entries_mut(td)?.insert(tname, src);
        Ok(())
    }

    /// Every entry, depth first in name order, the root first.
    pub fn walk(&self) -> Vec<EntryInfo> {
        let mut out = Vec::new();
        let mut stack = vec![(RelPath::root(), ROOT, 0usize)];
        while let Some((path, id, depth)) = stack.pop() {
            let Some(n) = self.inodes.get(&id) else {
                continue;
            };
            let (size, empty) = match &n.body {
                Body::File(c) => (c.len() as u64, false),
                Body::Dir(e) => {
                    for (name, child) in e.iter().rev() {
                        if let Ok(p) = path.join(name) {
                            stack.push((p, *child, depth + 1));
                        }
                    }
                    (0, e.is_empty())
                }
                Body::Symlink(t) => (t.len() as u64, false),
                Body::Special { .. } => (0, false),
            };
            out.push(EntryInfo {
                path,
                kind: n.body.kind(),
                ino: n.ino,
                nlink: n.nlink,
                size,
                empty,
                depth,
                xattr_names: n.xattrs.keys().cloned().collect(),
            });
        }
        out
    }

    /// The canonical, comparable content of the tree.
    pub fn snapshot(&self) -> Snapshot {
        let mut paths: Vec<(RelPath, u64)> = Vec::new();
        let mut stack = vec![(RelPath::root(), ROOT)];
        while let Some((path, id)) = stack.pop() {
            if let Some(Inode {
                body: Body::Dir(e), ..
            }) = self.inodes.get(&id)
            {
                for (name, child) in e {
                    if let Ok(p) = path.join(name) {
                        stack.push((p, *child));
                    }
                }
            }
            paths.push((path, id));
        }
        let mut first_name: BTreeMap<u64, RelPath> = BTreeMap::new();
        for (p, id) in &paths {
            let e = first_name.entry(*id).or_insert_with(|| p.clone());
            if p < e {
                *e = p.clone();
            }
        }
        let mut entries = BTreeMap::new();
        for (path, id) in paths {
            let Some(n) = self.inodes.get(&id) else {
                continue;
            };
            let (content, special) = match &n.body {
                Body::File(c) => (c.clone(), None),
                Body::Dir(_) => (Arc::default(), None),
                Body::Symlink(t) => (Arc::new(t.clone()), None),
                Body::Special { fmt, rdev } => (Arc::default(), Some((*fmt, *rdev))),
            };
            let link_group = (n.nlink > 1)
                .then(|| first_name.get(&id).cloned())
                .flatten();
            entries.insert(
                path,
                SnapEntry {
                    kind: n.body.kind(),
                    content,
                    special,
                    perm: n.perm,
                    uid: n.uid,
                    gid: n.gid,
                    atime: n.atime,
                    mtime: n.mtime,
                    xattrs: n.xattrs.clone(),
                    nlink: n.nlink,
                    link_group,
                },
            );
        }
        Snapshot { entries }
    }
}

/// One entry of a [`Snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapEntry {
    pub kind: EntryKind,
    /// File content, or symlink target.
    pub content: Arc<Vec<u8>>,
    /// File type bits and device number of a special file.
    pub special: Option<(u32, u64)>,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub nlink: u32,
    /// For a file with several names: the smallest of its paths (the hard-link group).
    pub link_group: Option<RelPath>,
}

/// A canonical view of a tree: path → everything observable but the inode number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub entries: BTreeMap<RelPath, SnapEntry>,
}

impl Snapshot {
    /// Human-readable differences (at most `max`), empty when equal.
    pub fn diff(&self, want: &Snapshot, max: usize) -> Vec<String> {
        let mut out = Vec::new();
        let paths: BTreeSet<&RelPath> = self.entries.keys().chain(want.entries.keys()).collect();
        for p in paths {
            if out.len() >= max {
                out.push("...".into());
                break;
            }
            match (self.entries.get(p), want.entries.get(p)) {
                (Some(g), None) => out.push(format!("{p}: unexpected {:?}", g.kind)),
                (None, Some(w)) => out.push(format!("{p}: missing {:?}", w.kind)),
                (Some(g), Some(w)) if g != w => out.push(format!("{p}: {}", entry_diff(g, w))),
                _ => {}
            }
        }
        out
    }
}

fn entry_diff(g: &SnapEntry, w: &SnapEntry) -> String {
    let mut s = String::new();
    if g.kind != w.kind {
        let _ = write!(s, "kind {:?} want {:?}; ", g.kind, w.kind);
    }
    if g.content != w.content {
        let first = g
            .content
            .iter()
            .zip(w.content.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(g.content.len().min(w.content.len()));
        let _ = write!(
            s,
            "content len {} want {}, first difference at byte {first}; ",
            g.content.len(),
            w.content.len()
        );
    }
    if g.special != w.special {
        let _ = write!(s, "special {:?} want {:?}; ", g.special, w.special);
    }
    if g.perm != w.perm {
        let _ = write!(s, "mode {:o} want {:o}; ", g.perm, w.perm);
    }
    if (g.uid, g.gid) != (w.uid, w.gid) {
        let _ = write!(s, "owner {}:{} want {}:{}; ", g.uid, g.gid, w.uid, w.gid);
    }
    if (g.atime, g.mtime) != (w.atime, w.mtime) {
        let _ = write!(
            s,
            "times {:?}/{:?} want {:?}/{:?}; ",
            g.atime, g.mtime, w.atime, w.mtime
        );
    }
    if g.xattrs != w.xattrs {
        let _ = write!(s, "xattrs {:?} want {:?}; ", g.xattrs, w.xattrs);
    }
    if (g.nlink, &g.link_group) != (w.nlink, &w.link_group) {
        let _ = write!(
            s,
            "links {} {:?} want {} {:?}; ",
            g.nlink, g.link_group, w.nlink, w.link_group
        );
    }
    s
}

/// What a [`SimTree::crash`] kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CrashReport {
    pub meta_unsynced: usize,
    pub meta_kept: usize,
    pub data_unsynced: usize,
    pub data_kept: usize,
    pub torn: bool,
}

/// An in-memory mirror tree with an ext4-like crash model (see the module documentation).
#[derive(Clone, Debug)]
pub struct SimTree {
    live: FsState,
    durable: FsState,
    unsynced: Vec<Unsynced>,
    /// False for a reference tree that never crashes (nothing is recorded for a crash).
    crashable: bool,
    kill: Option<KillSwitch>,
}

impl Default for SimTree {
    fn default() -> Self {
        Self::new()
    }
}

impl SimTree {
    /// An empty tree (a root directory) that can crash.
    pub fn new() -> Self {
        SimTree {
            live: FsState::new(),
            durable: FsState::new(),
            unsynced: Vec::new(),
            crashable: true,
            kill: None,
        }
    }

    /// An empty tree that never crashes (the primary's reference).
    pub fn reference() -> Self {
        SimTree {
            crashable: false,
            ..Self::new()
        }
    }

    /// Makes every mutating call obey `kill` (a simulated `kill -9` of the process).
    pub fn with_kill(mut self, kill: KillSwitch) -> Self {
        self.kill = Some(kill);
        self
    }

    /// The live (page cache) state.
    pub fn state(&self) -> &FsState {
        &self.live
    }

    /// Replaces the whole tree, durably.
    pub fn set_state(&mut self, s: FsState) {
        self.durable = s.clone();
        self.live = s;
        self.unsynced.clear();
    }

    pub fn snapshot(&self) -> Snapshot {
        self.live.snapshot()
    }

    /// The link count of the entry at `path` (`None`: nothing there), as lstat(2) gives it.
    pub fn nlink(&self, path: &RelPath) -> Option<u32> {
        let id = self.live.lookup(path).ok().flatten()?;
        self.live.node(id).ok().map(|n| n.nlink)
    }

    /// (metadata changes, data writes) not yet durable.
    pub fn unsynced(&self) -> (usize, usize) {
        let m = self
            .unsynced
            .iter()
            .filter(|u| matches!(u, Unsynced::Meta(_)))
            .count();
        (m, self.unsynced.len() - m)
    }

    /// Power loss: the tree becomes its durable state plus a prefix of the unsynced metadata
    /// changes and a subset of the unsynced writes, applied in their original order. An `Err` is a
    /// bug in the simulator itself.
    pub fn crash(&mut self, rng: &mut SimRng<'_>) -> Result<CrashReport, String> {
        let (metas, datas) = self.unsynced();
        let keep_meta = rng.range(0, metas as u64) as usize;
        // 0: no data survives, 1: all, 2: each write whole or not, 3: each page of each write.
        let data_mode = rng.below(4);
        let mut report = CrashReport {
            meta_unsynced: metas,
            meta_kept: keep_meta,
            data_unsynced: datas,
            torn: data_mode == 3,
            ..CrashReport::default()
        };
        let mut state = self.durable.clone();
        let mut seen_meta = 0;
        for u in &self.unsynced {
            match u {
                Unsynced::Meta(call) => {
                    if seen_meta < keep_meta {
                        state.apply(call).map_err(|e| {
                            format!("sim bug: replaying {call:?} on the durable state: {e}")
                        })?;
                    }
                    seen_meta += 1;
                }
                Unsynced::Data { id, offset, data } => match data_mode {
                    0 => {}
                    1 => {
                        state.write_data(*id, *offset, data);
                        report.data_kept += 1;
                    }
                    2 => {
                        if rng.chance(1, 2) {
                            state.write_data(*id, *offset, data);
                            report.data_kept += 1;
                        }
                    }
                    _ => {
                        let end = offset + data.len() as u64;
                        let mut at = *offset;
                        let mut any = false;
                        while at < end {
                            let stop = ((at / PAGE + 1) * PAGE).min(end);
                            if rng.chance(1, 2) {
                                let s = (at - offset) as usize;
                                let t = (stop - offset) as usize;
                                state.write_data(*id, at, &data[s..t]);
                                any = true;
                            }
                            at = stop;
                        }
                        report.data_kept += usize::from(any);
                    }
                },
            }
        }
        state.next_id = state.next_id.max(self.live.next_id);
        self.live = state.clone();
        self.durable = state;
        self.unsynced.clear();
        Ok(report)
    }

    fn alive(&self, path: &RelPath) -> Result<(), TreeError> {
        match &self.kill {
            Some(k) if k.is_dead() => Err(other(path, EIO, "process killed (simulated)")),
            _ => Ok(()),
        }
    }

    /// Every mutating system call goes through here first.
    fn step(&self, path: &RelPath) -> Result<(), TreeError> {
        match &self.kill {
            Some(k) if !k.tick() => Err(other(path, EIO, "process killed (simulated)")),
            _ => Ok(()),
        }
    }

    fn exec(&mut self, call: Call) -> Result<(), TreeError> {
        self.step(call_path(&call))?;
        self.live.apply(&call)?;
        if self.crashable {
            self.unsynced.push(Unsynced::Meta(call));
        }
        Ok(())
    }

    /// Creation in three system calls: the new inode (owned by root, umasked mode), `fchown`,
    /// `fchmod`.
    fn create_entry(
        &mut self,
        path: &RelPath,
        body: Body,
        mode: u32,
        owner: (u32, u32),
        chmod: bool,
    ) -> Result<(), TreeError> {
        let (id, ino) = self.live.alloc();
        let perm = match body {
            Body::Symlink(_) => 0o777,
            Body::Dir(_) => mode & 0o1777 & !UMASK,
            _ => mode & 0o7777 & !UMASK,
        };
        self.exec(Call::New {
            path: path.clone(),
            body,
            perm,
            id,
            ino,
        })?;
        self.exec(Call::Chown {
            path: path.clone(),
            uid: Some(owner.0),
            gid: Some(owner.1),
        })?;
        if chmod {
            self.exec(Call::Chmod {
                path: path.clone(),
                perm: mode & 0o7777,
            })?;
        }
        Ok(())
    }
}

fn call_path(c: &Call) -> &RelPath {
    match c {
        Call::New { path, .. }
        | Call::Unlink { path }
        | Call::Rmdir { path }
        | Call::Truncate { path, .. }
        | Call::Fallocate { path, .. }
        | Call::Chmod { path, .. }
        | Call::Chown { path, .. }
        | Call::Utimes { path, .. }
        | Call::SetXattr { path, .. }
        | Call::RemoveXattr { path, .. } => path,
        Call::Link { to, .. } => to,
        Call::Rename { from, .. } => from,
    }
}

impl Tree for SimTree {
    fn kind(&mut self, path: &RelPath) -> Result<Option<EntryKind>, TreeError> {
        self.alive(path)?;
        match self.live.lookup(path) {
            Ok(Some(id)) => Ok(Some(self.live.node(id)?.body.kind())),
            Ok(None) | Err(TreeError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn ino(&mut self, path: &RelPath) -> Result<Option<u64>, TreeError> {
        self.alive(path)?;
        match self.live.lookup(path) {
            Ok(Some(id)) => Ok(Some(self.live.node(id)?.ino)),
            Ok(None) | Err(TreeError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn create(&mut self, path: &RelPath, mode: u32, uid: u32, gid: u32) -> Result<(), TreeError> {
        self.create_entry(path, Body::File(Arc::default()), mode, (uid, gid), true)
    }

    fn mkdir(&mut self, path: &RelPath, mode: u32, uid: u32, gid: u32) -> Result<(), TreeError> {
        self.create_entry(path, Body::Dir(BTreeMap::new()), mode, (uid, gid), true)
    }

    fn mknod(
        &mut self,
        path: &RelPath,
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    ) -> Result<(), TreeError> {
        let fmt = mode & S_IFMT;
        let body = match fmt {
            0 | 0o100_000 => Body::File(Arc::default()),
            0o010_000 | 0o020_000 | 0o060_000 | 0o140_000 => Body::Special { fmt, rdev },
            _ => return Err(other(path, EINVAL, "mknod file type")),
        };
        self.create_entry(path, body, mode, (uid, gid), true)
    }

    fn symlink(
        &mut self,
        path: &RelPath,
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<(), TreeError> {
        if target.is_empty() {
            return Err(not_found(path));
        }
        self.create_entry(
            path,
            Body::Symlink(target.to_vec()),
            0o777,
            (uid, gid),
            false,
        )
    }

    fn link(&mut self, from: &RelPath, to: &RelPath) -> Result<(), TreeError> {
        self.exec(Call::Link {
            from: from.clone(),
            to: to.clone(),
        })
    }

    fn unlink(&mut self, path: &RelPath) -> Result<(), TreeError> {
        self.exec(Call::Unlink { path: path.clone() })
    }

    fn rmdir(&mut self, path: &RelPath) -> Result<(), TreeError> {
        self.exec(Call::Rmdir { path: path.clone() })
    }

    fn remove_all(&mut self, path: &RelPath) -> Result<(), TreeError> {
        match self.kind(path)? {
            None => Ok(()),
            Some(EntryKind::Dir) => {
                let id = self.live.must(path)?;
                let names: Vec<Vec<u8>> = self.live.entries(id)?.keys().cloned().collect();
                for name in names {
                    let child = path
                        .join(&name)
                        .map_err(|e| other(path, EINVAL, &e.to_string()))?;
                    self.remove_all(&child)?;
                }
                self.rmdir(path)
            }
            Some(_) => self.unlink(path),
        }
    }

    fn rename(&mut self, from: &RelPath, to: &RelPath, flags: u32) -> Result<(), TreeError> {
        self.exec(Call::Rename {
            from: from.clone(),
            to: to.clone(),
            flags,
        })
    }

    fn write(&mut self, path: &RelPath, offset: u64, data: &[u8]) -> Result<(), TreeError> {
        self.step(path)?;
        let id = self.live.file_for_write(path)?;
        if data.is_empty() {
            return Ok(());
        }
        self.live.write_data(id, offset, data);
        if self.crashable {
            self.unsynced.push(Unsynced::Data {
                id,
                offset,
                data: Arc::new(data.to_vec()),
            });
        }
        Ok(())
    }

    fn truncate(&mut self, path: &RelPath, size: u64) -> Result<(), TreeError> {
        self.exec(Call::Truncate {
            path: path.clone(),
            size,
        })
    }

    fn fallocate(
        &mut self,
        path: &RelPath,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> Result<(), TreeError> {
        self.exec(Call::Fallocate {
            path: path.clone(),
            mode,
            offset,
            len,
        })
    }

    fn chmod(&mut self, path: &RelPath, mode: u32) -> Result<(), TreeError> {
        self.exec(Call::Chmod {
            path: path.clone(),
            perm: mode & 0o7777,
        })
    }

    fn chown(
        &mut self,
        path: &RelPath,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(), TreeError> {
        self.exec(Call::Chown {
            path: path.clone(),
            uid,
            gid,
        })
    }

    fn utimes(
        &mut self,
        path: &RelPath,
        atime: Option<Timespec>,
        mtime: Option<Timespec>,
    ) -> Result<(), TreeError> {
        self.exec(Call::Utimes {
            path: path.clone(),
            atime,
            mtime,
        })
    }

    fn setxattr(
        &mut self,
        path: &RelPath,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<(), TreeError> {
        self.exec(Call::SetXattr {
            path: path.clone(),
            name: name.to_vec(),
            value: value.to_vec(),
            flags,
        })
    }

    fn removexattr(&mut self, path: &RelPath, name: &[u8]) -> Result<(), TreeError> {
        self.exec(Call::RemoveXattr {
            path: path.clone(),
            name: name.to_vec(),
        })
    }

    fn sync(&mut self) -> Result<(), TreeError> {
        self.step(&RelPath::root())?;
        if self.crashable {
            self.durable = self.live.clone();
            self.unsynced.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::rename_flags::{EXCHANGE, NOREPLACE};

    fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("valid")
    }

    #[test]
    fn linux_errors() {
        let mut t = SimTree::new();
        t.mkdir(&p("d"), 0o755, 1, 1).expect("mkdir");
        t.mkdir(&p("e"), 0o755, 1, 1).expect("mkdir");
        t.create(&p("d/f"), 0o644, 1, 1).expect("create");
        t.create(&p("g"), 0o644, 1, 1).expect("create");
        assert!(matches!(
            t.create(&p("g"), 0o644, 1, 1),
            Err(TreeError::Exists(_))
        ));
        assert!(matches!(
            t.create(&p("x/y"), 0o644, 1, 1),
            Err(TreeError::NotFound(_))
        ));
        assert!(matches!(
            t.create(&p("g/y"), 0o644, 1, 1),
            Err(TreeError::NotDir(_))
        ));
        assert!(matches!(t.kind(&p("g/y")), Err(TreeError::NotDir(_))));
        assert_eq!(t.kind(&p("x/y")), Ok(None));
        assert!(matches!(
            t.rename(&p("e"), &p("d"), 0),
            Err(TreeError::NotEmpty(_))
        ));
        assert!(matches!(
            t.rename(&p("g"), &p("d"), 0),
            Err(TreeError::IsDir(_))
        ));
        assert!(matches!(
            t.rename(&p("e"), &p("g"), 0),
            Err(TreeError::NotDir(_))
        ));
        assert!(matches!(
            t.rename(&p("g"), &p("d/f"), NOREPLACE),
            Err(TreeError::Exists(_))
        ));
        assert!(matches!(
            t.rename(&p("g"), &p("h"), EXCHANGE),
            Err(TreeError::NotFound(_))
        ));
        assert!(matches!(
            t.rename(&p("d"), &p("d/z"), 0),
            Err(TreeError::Other { errno: 22, .. })
        ));
        assert!(matches!(t.rmdir(&p("d")), Err(TreeError::NotEmpty(_))));
        assert!(matches!(t.rmdir(&p("g")), Err(TreeError::NotDir(_))));
        assert!(matches!(t.unlink(&p("d")), Err(TreeError::IsDir(_))));
        assert!(matches!(
            t.write(&p("d"), 0, b"x"),
            Err(TreeError::IsDir(_))
        ));
        t.symlink(&p("s"), b"d", 0, 0).expect("symlink");
        assert!(matches!(
            t.create(&p("s/f"), 0o644, 1, 1),
            Err(TreeError::NotDir(_))
        ));
        assert!(matches!(
            t.write(&p("s"), 0, b"x"),
            Err(TreeError::NotDir(_))
        ));
        t.rename(&p("e"), &p("d"), EXCHANGE).expect("exchange dirs");
        assert_eq!(t.kind(&p("e/f")), Ok(Some(EntryKind::File)));
        t.link(&p("g"), &p("e/g2")).expect("link");
        t.rename(&p("g"), &p("e/g2"), 0).expect("same inode: no-op");
        assert_eq!(t.kind(&p("g")), Ok(Some(EntryKind::File)));
        t.remove_all(&p("e")).expect("remove_all");
        assert_eq!(t.kind(&p("e")), Ok(None));
        assert_eq!(t.snapshot().entries[&p("g")].nlink, 1);
    }

    #[test]
    fn crash_keeps_prefix_and_sync_is_durable() {
        let mut seq = 0u64;
        let mut next = move || {
            seq = seq.wrapping_add(0x9E37_79B9_7F4A_7C15);
            seq ^ (seq >> 29)
        };
        let mut rng = SimRng::new(&mut next);
        for _ in 0..50 {
            let mut t = SimTree::new();
            t.create(&p("a"), 0o644, 0, 0).expect("create");
            t.write(&p("a"), 0, b"hello").expect("write");
            t.sync().expect("sync");
            let synced = t.snapshot();
            t.mkdir(&p("b"), 0o755, 0, 0).expect("mkdir");
            t.rename(&p("a"), &p("b/a"), 0).expect("rename");
            t.write(&p("b/a"), 8000, b"x").expect("write");
            let r = t.crash(&mut rng).expect("crash");
            let s = t.snapshot();
            // A prefix: the rename never survives without the mkdir.
            if s.entries.contains_key(&p("b/a")) {
                assert!(s.entries.contains_key(&p("b")));
                assert!(!s.entries.contains_key(&p("a")));
            }
            if r.meta_kept == 0 && r.data_kept == 0 {
                assert_eq!(s, synced);
            }
        }
    }
}
