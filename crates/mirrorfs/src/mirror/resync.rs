//! Block-hash resync of a remote mirror whose journal position is lost (the primary's journal
//! passed its size limit while the mirror was away, or the mirror asked for it). Never a silent
//! full copy, never a skipped change:
//!
//! 1. the mirror walks its tree and sends a manifest: every entry's kind, size and xattr names
//!    (the root's first), and for regular files the blake3 hash of each 64 KiB block
//!    ([`manifest`]);
//! 2. the primary copies live through the journal, as `Sync` records (like an initial copy, so
//!    ordered with concurrent writes), but only what differs ([`live_resync`]): entries the mirror
//!    has and the primary has not are removed; directories and files of the same kind are kept
//!    (their attributes are set, the xattrs the primary lacks removed), and the metadata sent is
//!    the initial copy's (`mirror::entry_meta`, `mirror::root_meta`); of each file only the
//!    blocks whose hash differs travel;
//! 3. `SyncDone`: the mirror is consistent again once it applies it.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use mirrorfs_core::journal::Journal;
use mirrorfs_core::op::Op;
use mirrorfs_core::path::RelPath;
use mirrorfs_core::track::NameTracker;
use mirrorfs_core::wire::{
    ManifestEntry, MANIFEST_HASHES_MAX, MANIFEST_XATTR_BYTES_MAX, RESYNC_BLOCK, XATTR_NAME_MAX,
};

use crate::mirror::{DataPass, TrackedCopy};
use crate::site::store::FileStore;
use crate::site::volume::{lock, MirrorShared, Ordered, Volume};
use crate::sys;
use crate::tree::walk::{walk, Visit};

/// Entries per `Manifest` message.
pub const MANIFEST_BATCH: usize = 256;
/// Largest manifest the primary keeps in memory (hashes included); beyond it the resync is
/// refused with a clear message rather than using unbounded memory.
pub const MANIFEST_BYTES_MAX: usize = 512 << 20;

fn kind_of(mode: u32) -> u8 {
    match mode & libc::S_IFMT {
        libc::S_IFREG => 1,
        libc::S_IFDIR => 2,
        libc::S_IFLNK => 3,
        _ => 4,
    }
}

/// The names of the xattrs of `fd`, as a manifest entry carries them.
fn manifest_xattrs(fd: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let names = crate::mirror::xattr_names(fd)?;
    let bytes: usize = names.iter().map(|n| n.len() + 1).sum();
    if bytes > MANIFEST_XATTR_BYTES_MAX || names.iter().any(|n| n.len() > XATTR_NAME_MAX) {
        return Err(io::Error::other(
            "an entry's xattr names exceed the kernel's limits",
        ));
    }
    Ok(names)
}

/// Walks the mirror tree under `root` (skipping `reserved` at its root) and hands each entry to
/// `emit`: the root first (as the empty path), then parents before children.
pub fn manifest(
    root: &Path,
    reserved: &[u8],
    mut emit: impl FnMut(ManifestEntry) -> io::Result<()>,
) -> io::Result<u64> {
    let rootfd: OwnedFd = std::fs::File::open(root)?.into();
    emit(ManifestEntry {
        path: RelPath::root(),
        kind: 2,
        size: sys::fstat(rootfd.as_fd())?.st_size as u64,
        first_block: 0,
        hashes: Vec::new(),
        xattrs: manifest_xattrs(rootfd.as_fd())?,
    })?;
    let mut count = 1u64;
    let mut buf = vec![0u8; RESYNC_BLOCK as usize];
    walk(rootfd.as_fd(), Some(reserved), |v| {
        let Visit::Entry {
            path,
            name,
            st,
            dir,
        } = v
        else {
            return Ok(());
        };
        let kind = kind_of(st.st_mode);
        if kind != 1 {
            let f = sys::openat(
                dir,
                OsStr::from_bytes(name),
                libc::O_PATH | libc::O_NOFOLLOW,
                0,
            )?;
            count += 1;
            return emit(ManifestEntry {
                path: path.clone(),
                kind,
                size: st.st_size as u64,
                first_block: 0,
                hashes: Vec::new(),
                xattrs: manifest_xattrs(f.as_fd())?,
            });
        }
        let f = sys::openat(
            dir,
            OsStr::from_bytes(name),
            libc::O_RDONLY | libc::O_NOFOLLOW,
            0,
        )?;
        let size = st.st_size as u64;
        let blocks = size.div_ceil(RESYNC_BLOCK);
        let mut first = 0u64;
        // Its xattr names come with the first piece.
        let mut xattrs = manifest_xattrs(f.as_fd())?;
        // A large file's hashes travel in several entries, each bounded.
        loop {
            let n = (blocks - first).min(MANIFEST_HASHES_MAX as u64);
            let hashes = block_hashes(f.as_fd(), size, first, n, &mut buf)?;
            emit(ManifestEntry {
                path: path.clone(),
                kind,
                size,
                first_block: first,
                hashes,
                xattrs: std::mem::take(&mut xattrs),
            })?;
            count += 1;
            first += n;
            if first >= blocks {
                return Ok(());
            }
        }
    })?;
    Ok(count)
}

fn block_hashes(
    fd: BorrowedFd<'_>,
    size: u64,
    first: u64,
    n: u64,
    buf: &mut [u8],
) -> io::Result<Vec<[u8; 32]>> {
    let mut out = Vec::with_capacity(n as usize);
    let mut off = first * RESYNC_BLOCK;
    let end = ((first + n) * RESYNC_BLOCK).min(size);
    while off < end {
        let want = RESYNC_BLOCK.min(size - off) as usize;
        let n = read_full(fd, &mut buf[..want], off)?;
        out.push(*blake3::hash(&buf[..n]).as_bytes());
        off += want as u64;
    }
    Ok(out)
}

/// Reads up to `buf.len()` bytes at `off`, short only at the end of the file (then the rest of
/// `buf` is zero, as the block of a file that shrank would read).
fn read_full(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = sys::pread(fd, &mut buf[got..], off + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf[got..].fill(0);
    Ok(buf.len())
}

/// The mirror's manifest as the primary keeps it.
#[derive(Default)]
pub struct Manifest {
    entries: HashMap<Vec<u8>, ManifestEntry>,
    bytes: usize,
    count: usize,
}

impl Manifest {
    /// Adds one entry; the pieces of a large file's hashes are joined (they must come in
    /// order).
    pub fn add(&mut self, e: ManifestEntry) -> io::Result<()> {
        self.bytes += e.path.as_bytes().len()
            + 48
            + e.hashes.len() * 32
            + e.xattrs.iter().map(|n| n.len() + 24).sum::<usize>();
        if self.bytes > MANIFEST_BYTES_MAX {
            return Err(io::Error::other(format!(
                "the mirror's manifest exceeds {MANIFEST_BYTES_MAX} bytes; resync it by emptying its directory (a fresh initial copy)"
            )));
        }
        if e.first_block > 0 {
            let prev = self.entries.get_mut(e.path.as_bytes()).filter(|p| {
                p.kind == 1 && p.size == e.size && p.hashes.len() as u64 == e.first_block
            });
            let Some(prev) = prev else {
                return Err(io::Error::other(
                    "the mirror's manifest has a piece of a file out of order",
                ));
            };
            prev.hashes.extend_from_slice(&e.hashes);
            self.count += 1;
            return Ok(());
        }
        self.entries.insert(e.path.as_bytes().to_vec(), e);
        self.count += 1;
        Ok(())
    }

    /// Entries received (pieces counted one by one, as `ManifestEnd` counts them).
    pub fn len(&self) -> usize {
        self.count
    }

    /// Keeps only the entries at the paths `keep` accepts; returns how many were left out.
    pub fn retain(&mut self, mut keep: impl FnMut(&RelPath) -> bool) -> u64 {
        let before = self.entries.len();
        self.entries.retain(|_, e| keep(&e.path));
        (before - self.entries.len()) as u64
    }

    fn get(&self, p: &RelPath) -> Option<&ManifestEntry> {
        self.entries.get(p.as_bytes())
    }
}

/// A file's blake3 block hashes, as the mirror reported them.
type BlockHashes = Vec<[u8; 32]>;

/// What the resync did, for the log and the benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct ResyncStats {
    pub removed: u64,
    pub kept: u64,
    pub blocks_same: u64,
    pub blocks_sent: u64,
    pub bytes_sent: u64,
    /// Holes punched in the mirror's files where the primary has none of their data.
    pub holes_punched: u64,
}

/// The primary's side of step 2 (see the module docs). Runs like `mirror::live_sync`, with the
/// same ordering argument: the namespace under one hold of the order lock, then each block under
/// its own hold, read from the file's current name.
pub fn live_resync(
    vol: Arc<Volume>,
    backing: &Path,
    m: Arc<MirrorShared>,
    hidden: Option<Vec<u8>>,
    manifest: Manifest,
) -> io::Result<ResyncStats> {
    let id = crate::mirror::sync_id(&m);
    let root: OwnedFd = std::fs::File::open(backing)?.into();
    let mut stats = ResyncStats::default();
    let copy = TrackedCopy::new(&vol, id);
    m.copy_journaled
        .store(0, std::sync::atomic::Ordering::Release);
    let (files, total) = {
        let mut guard = lock(&vol.order);
        let (files, total, last) = {
            let Ordered {
                journal, copies, ..
            } = &mut *guard;
            NamespaceResync {
                journal,
                tracker: copies.entry(id).or_default(),
                root: root.as_fd(),
                id,
                manifest: &manifest,
                removed: HashSet::new(),
                stats: &mut stats,
                links: HashMap::new(),
                files: Vec::new(),
                total: 0,
            }
            .run(hidden.as_deref())?
        };
        vol.settle(guard, last, 0);
        (files, total)
    };
    tracing::info!(
        "mirror {}: resync: {} entries removed, {} kept, {} bytes of file data to compare",
        m.name,
        stats.removed,
        stats.kept,
        total
    );
    let message = format!("resync of {}", m.name);
    let mut data = DataPass::new(
        &copy,
        &m,
        root.as_fd(),
        total,
        message,
        RESYNC_BLOCK as usize,
    );
    for (ino, have) in files {
        data.resync_file(ino, have, &mut stats)?;
        copy.done_with(ino);
    }
    let seq = copy.finish(&data.pb)?;
    m.copy_journaled
        .store(seq, std::sync::atomic::Ordering::Release);
    let _ = crate::site::state_dir::MirrorStateDir::at(&m.state_dir).clear_needs_resync();
    tracing::info!(
        "mirror {}: resync streamed: {} blocks differed ({} bytes sent), {} blocks were the same; consistent once it applies record {seq}",
        m.name,
        stats.blocks_sent,
        stats.bytes_sent,
        stats.blocks_same
    );
    Ok(stats)
}

/// The namespace step of a resync, under one hold of the order lock: removes what the mirror
/// has and the primary has not, journals every entry walked (only the attributes of one the
/// mirror has with the same kind), and notes the regular files whose blocks are compared next.
struct NamespaceResync<'a> {
    journal: &'a mut Journal<FileStore>,
    tracker: &'a mut NameTracker,
    root: BorrowedFd<'a>,
    id: u32,
    manifest: &'a Manifest,
    /// The paths of the mirror's entries removed.
    removed: HashSet<Vec<u8>>,
    stats: &'a mut ResyncStats,
    /// The first name walked of each file with several links.
    links: HashMap<u64, RelPath>,
    /// (inode, the mirror's block hashes if it has the file), and their bytes.
    files: Vec<(u64, Option<BlockHashes>)>,
    total: u64,
}

impl<'a> NamespaceResync<'a> {
    /// Journals `op` as one of the copy's `Sync` records.
    fn emit(&mut self, op: Op) -> io::Result<()> {
        crate::mirror::append_sync(self.journal, self.id, op).map(drop)
    }

    /// Removes the extra entries, walks the tree (but `hidden`), then the root's mode, owner and
    /// xattrs; returns the files to compare, their bytes and the last record journaled.
    #[allow(clippy::type_complexity)]
    fn run(
        mut self,
        hidden: Option<&[u8]>,
    ) -> io::Result<(Vec<(u64, Option<BlockHashes>)>, u64, u64)> {
        self.remove_extra(hidden)?;
        let root = self.root;
        walk(root, hidden, |v| self.visit(v))?;
        let mirror_has = self.manifest.get(&RelPath::root()).map(|e| &e.xattrs[..]);
        for op in crate::mirror::root_meta(root, mirror_has.unwrap_or_default())? {
            self.emit(op)?;
        }
        Ok((self.files, self.total, self.journal.next_seq() - 1))
    }

    /// Step 1: what the mirror has and the primary has not (or of another kind, or under
    /// `hidden`) is removed, deepest first.
    fn remove_extra(&mut self, hidden: Option<&[u8]>) -> io::Result<()> {
        let root = self.root;
        let mut extra: Vec<&ManifestEntry> = self
            .manifest
            .entries
            .values()
            .filter(|e| !e.path.is_root())
            .filter(|e| match crate::tree::dirtree::lstat_in(root, &e.path) {
                Ok(st) => {
                    kind_of(st.st_mode) != e.kind
                        || (hidden == e.path.as_bytes().split(|b| *b == b'/').next())
                }
                Err(_) => true,
            })
            .collect();
        extra.sort_by_key(|e| {
            std::cmp::Reverse(e.path.as_bytes().iter().filter(|b| **b == b'/').count())
        });
        self.removed = extra.iter().map(|e| e.path.as_bytes().to_vec()).collect();
        for e in &extra {
            let op = if e.kind == 2 {
                Op::Rmdir {
                    path: e.path.clone(),
                }
            } else {
                Op::Unlink {
                    path: e.path.clone(),
                    nlink: 1,
                }
            };
            self.emit(op)?;
            self.stats.removed += 1;
        }
        Ok(())
    }

    /// The mirror's entry at `p` if it is of `kind` and stays.
    fn kept(&self, p: &RelPath, kind: u8) -> Option<&'a ManifestEntry> {
        let manifest: &'a Manifest = self.manifest;
        manifest
            .get(p)
            .filter(|e| e.kind == kind && !self.removed.contains(p.as_bytes()))
    }

    /// Step 2, the namespace: one entry walked (a directory or file the mirror has is kept, only
    /// its attributes set; a symlink or special file is made again), then its metadata as the
    /// initial copy sends it (`mirror::entry_meta`: xattrs, those the kept entry has and the
    /// primary's lacks removed, and the mtime); a directory's mtime once everything below it is
    /// done.
    fn visit(&mut self, v: Visit<'_>) -> io::Result<()> {
        let (path, name, st, dfd) = match v {
            Visit::DirDone { path, st } => return self.emit(crate::mirror::mtime_of(path, st)),
            Visit::Entry {
                path,
                name,
                st,
                dir,
            } => (path, name, st, dir),
        };
        let mode = st.st_mode;
        // The xattr names of the mirror's entry, if it keeps it.
        let mut mirror_has: &[Vec<u8>] = &[];
        match kind_of(mode) {
            2 => {
                if let Some(e) = self.kept(path, 2) {
                    self.stats.kept += 1;
                    mirror_has = &e.xattrs;
                    for op in attrs(path, st) {
                        self.emit(op)?;
                    }
                } else {
                    self.emit(crate::mirror::creation_op(path, name, st, dfd)?)?;
                }
            }
            1 => match self.regular_file(path, st)? {
                Some(has) => mirror_has = has,
                None => return Ok(()),
            },
            _ => self.emit(crate::mirror::creation_op(path, name, st, dfd)?)?,
        }
        for op in crate::mirror::entry_meta(self.root, path, st, mirror_has) {
            self.emit(op)?;
        }
        Ok(())
    }

    /// A regular file: a further name of a file already walked is a link to its first (and
    /// `None` is returned: nothing else to send); one the mirror has is cut to size (and the
    /// names of its xattrs are returned), else created empty (and no names are); its blocks are
    /// compared next.
    fn regular_file(
        &mut self,
        path: &RelPath,
        st: &libc::stat,
    ) -> io::Result<Option<&'a [Vec<u8>]>> {
        self.tracker.add(st.st_ino, path.clone());
        if st.st_nlink > 1 {
            if let Some(first) = self.links.get(&st.st_ino) {
                let op = Op::Link {
                    from: first.clone(),
                    to: path.clone(),
                };
                self.emit(op)?;
                return Ok(None);
            }
            self.links.insert(st.st_ino, path.clone());
        }
        let kept = self.kept(path, 1);
        if kept.is_some() {
            self.stats.kept += 1;
            for op in attrs(path, st) {
                self.emit(op)?;
            }
            self.emit(Op::Truncate {
                path: path.clone(),
                size: st.st_size as u64,
            })?;
        } else {
            self.emit(Op::Create {
                path: path.clone(),
                mode: st.st_mode & 0o7777,
                uid: st.st_uid,
                gid: st.st_gid,
            })?;
        }
        self.total += st.st_size as u64;
        self.files.push((st.st_ino, kept.map(|e| e.hashes.clone())));
        Ok(Some(kept.map_or(&[], |e| &e.xattrs[..])))
    }
}

/// The mode and owner of an entry the mirror keeps.
fn attrs(path: &RelPath, st: &libc::stat) -> [Op; 2] {
    [
        Op::SetMode {
            path: path.clone(),
            mode: st.st_mode & 0o7777,
        },
        Op::SetOwner {
            path: path.clone(),
            uid: Some(st.st_uid),
            gid: Some(st.st_gid),
        },
    ]
}

impl DataPass<'_> {
    /// Step 2, the data: the blocks of the file walked as `ino` whose hash differs from the
    /// mirror's (`have`), only their data extents written, then its size and mtime; nothing
    /// more once it has no name left. The primary's holes are kept: a run of whole blocks in a
    /// hole is skipped in one step (and, in a file the mirror has, punched there with one
    /// `Fallocate`, since the mirror may hold data or dense zeros where the primary has none),
    /// and so are the holes inside a block. Each step reads and journals under one hold of the
    /// order lock, so no live write comes between what it saw of the holes and its records.
    fn resync_file(
        &mut self,
        ino: u64,
        have: Option<BlockHashes>,
        stats: &mut ResyncStats,
    ) -> io::Result<()> {
        let (vol, id) = (self.copy.vol, self.copy.id);
        let mut block = 0u64;
        loop {
            let Some((mut o, path, f, st)) = self.copy.next_chunk(self.m, self.root, ino)? else {
                return Ok(());
            };
            let size = st.st_size as u64;
            let off = block * RESYNC_BLOCK;
            if off >= size {
                // A file the resync created ends with a hole if its data does not reach its size.
                let ops = [
                    Op::Truncate {
                        path: path.clone(),
                        size,
                    },
                    crate::mirror::mtime_of(&path, &st),
                ];
                let mut last = 0;
                for op in ops {
                    last = crate::mirror::append_sync(&mut o.journal, id, op)?;
                }
                vol.settle(o, last, 0);
                return Ok(());
            }
            let end = (off + RESYNC_BLOCK).min(size);
            let data = next_data(f.as_fd(), off, size)?;
            let step = if data >= end {
                // Whole blocks in a hole, up to the block where data begins (or the end).
                let hole_end = if data >= size {
                    size
                } else {
                    off + (data - off) / RESYNC_BLOCK * RESYNC_BLOCK
                };
                let mut last = 0;
                if have.is_some() {
                    last = self.punch(&mut o.journal, &path, off, hole_end, stats)?;
                }
                settle_if(vol, o, last, 0);
                hole_end - off
            } else {
                let want = (end - off) as usize;
                read_full(f.as_fd(), &mut self.buf[..want], off)?;
                let same = have
                    .as_ref()
                    .and_then(|h| h.get(block as usize))
                    .is_some_and(|h| *h == *blake3::hash(&self.buf[..want]).as_bytes());
                let mut last = 0;
                let mut sent = 0u64;
                let mut at = off;
                for (d, h) in data_extents(f.as_fd(), off, end)? {
                    if d > at && have.is_some() {
                        last = self.punch(&mut o.journal, &path, at, d, stats)?;
                    }
                    if !same {
                        let op = Op::Write {
                            path: path.clone(),
                            offset: d,
                            data: self.buf[(d - off) as usize..(h - off) as usize].to_vec(),
                        };
                        last = crate::mirror::append_sync(&mut o.journal, id, op)?;
                        sent += h - d;
                    }
                    at = h;
                }
                if at < end && have.is_some() {
                    last = self.punch(&mut o.journal, &path, at, end, stats)?;
                }
                settle_if(vol, o, last, sent);
                if same {
                    stats.blocks_same += 1;
                } else {
                    stats.blocks_sent += 1;
                    stats.bytes_sent += sent;
                }
                end - off
            };
            block += step.div_ceil(RESYNC_BLOCK);
            self.done += step;
            self.copy.progress(self.m, &self.pb, self.done, self.total);
        }
    }

    /// Journals a hole punched in `[from, to)` of the mirror's file at `path`.
    fn punch(
        &self,
        journal: &mut Journal<FileStore>,
        path: &RelPath,
        from: u64,
        to: u64,
        stats: &mut ResyncStats,
    ) -> io::Result<u64> {
        let op = Op::Fallocate {
            path: path.clone(),
            mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset: from,
            len: to - from,
        };
        stats.holes_punched += 1;
        crate::mirror::append_sync(journal, self.copy.id, op)
    }
}

/// Settles the records a step journaled (`last`, 0 if none: then only the lock is let go).
fn settle_if(vol: &Volume, o: std::sync::MutexGuard<'_, Ordered>, last: u64, bytes: u64) {
    if last > 0 {
        vol.settle(o, last, bytes);
    }
}

/// Where the data at or after `off` begins in a file of `size` bytes (`SEEK_DATA`): `size` if
/// only a hole follows. A file system that does not report holes answers `off` (all data).
fn next_data(fd: BorrowedFd<'_>, off: u64, size: u64) -> io::Result<u64> {
    match sys::lseek(fd, off as i64, libc::SEEK_DATA) {
        Ok(d) => Ok((d as u64).min(size)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(size),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(off),
        Err(e) => Err(e),
    }
}

/// The data extents of `[from, to)`, as `(start, end)` pairs in order (`SEEK_DATA`,
/// `SEEK_HOLE`); what lies between them is a hole.
fn data_extents(fd: BorrowedFd<'_>, from: u64, to: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        let d = next_data(fd, at, to)?;
        if d >= to {
            break;
        }
        let h = sys::next_hole(fd, d).map_or(to, |h| h.min(to));
        // A hole reported at `d` itself would not move on: take the rest as data.
        let h = if h <= d { to } else { h };
        out.push((d, h));
        at = h;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_lists_every_entry_with_block_hashes_and_skips_the_state_dir() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path();
        std::fs::create_dir_all(root.join("d/e")).expect("mkdir");
        std::fs::create_dir_all(root.join(".mirrorfs/journal")).expect("mkdir state");
        let big: Vec<u8> = (0..(RESYNC_BLOCK as usize * 2 + 100))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(root.join("d/big"), &big).expect("write");
        std::fs::write(root.join("empty"), b"").expect("write");
        std::os::unix::fs::symlink("d/big", root.join("link")).expect("symlink");
        let mut got = Vec::new();
        let n = manifest(root, b".mirrorfs", |e| {
            got.push(e);
            Ok(())
        })
        .expect("manifest");
        assert_eq!(n as usize, got.len());
        let mut names: Vec<_> = got
            .iter()
            .map(|e| {
                (
                    String::from_utf8_lossy(e.path.as_bytes()).to_string(),
                    e.kind,
                )
            })
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                ("".into(), 2),
                ("d".into(), 2),
                ("d/big".into(), 1),
                ("d/e".into(), 2),
                ("empty".into(), 1),
                ("link".into(), 3)
            ]
        );
        let big_e = got
            .iter()
            .find(|e| e.path.as_bytes() == b"d/big")
            .expect("big");
        assert_eq!(big_e.hashes.len(), 3);
        let b = RESYNC_BLOCK as usize;
        assert_eq!(big_e.hashes[0], *blake3::hash(&big[..b]).as_bytes());
        assert_eq!(big_e.hashes[2], *blake3::hash(&big[2 * b..]).as_bytes());
        let empty = got
            .iter()
            .find(|e| e.path.as_bytes() == b"empty")
            .expect("empty");
        assert!(empty.hashes.is_empty());
    }

    #[test]
    fn data_extents_skip_the_holes_of_a_sparse_file() {
        use std::os::unix::fs::FileExt;
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("sparse");
        let f = std::fs::File::create(&p).expect("create");
        f.write_all_at(&[1u8; 8192], 0).expect("write");
        f.write_all_at(&[2u8; 4096], 1 << 20).expect("write");
        f.set_len(2 << 20).expect("size");
        let size = 2u64 << 20;
        let x = data_extents(f.as_fd(), 0, size).expect("extents");
        // A file system without holes reports one extent: all data.
        if x.len() > 1 {
            assert_eq!(x, vec![(0, 8192), (1 << 20, (1 << 20) + 4096)]);
            assert_eq!(next_data(f.as_fd(), 8192, size).expect("data"), 1 << 20);
            assert_eq!(
                next_data(f.as_fd(), (1 << 20) + 4096, size).expect("data"),
                size,
                "only a hole follows"
            );
        }
        let inner = data_extents(f.as_fd(), 4096, RESYNC_BLOCK).expect("extents");
        assert_eq!(inner.first(), Some(&(4096, 8192)), "{inner:?}");
        assert!(inner.iter().all(|(a, b)| a < b && *b <= RESYNC_BLOCK));
    }

    #[test]
    fn manifest_pieces_join_in_order_only() {
        let p = RelPath::new(b"f".to_vec()).expect("path");
        let piece = |first: u64, n: usize| ManifestEntry {
            path: p.clone(),
            kind: 1,
            size: RESYNC_BLOCK * 4,
            first_block: first,
            hashes: vec![[first as u8; 32]; n],
            xattrs: Vec::new(),
        };
        let mut m = Manifest::default();
        m.add(piece(0, 2)).expect("first piece");
        assert!(m.add(piece(3, 1)).is_err(), "a gap is refused");
        m.add(piece(2, 2)).expect("next piece");
        assert_eq!(m.get(&p).map(|e| e.hashes.len()), Some(4));
        assert_eq!(m.len(), 2, "pieces are counted as ManifestEnd counts them");
        let mut orphan = Manifest::default();
        assert!(
            orphan.add(piece(1, 1)).is_err(),
            "a piece without its start"
        );
    }
}
