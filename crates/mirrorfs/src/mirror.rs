//! Mirror workers (one thread per mirror) and the initial copy of a new mirror.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirrorfs_core::applier::Applier;
use mirrorfs_core::path::RelPath;
use mirrorfs_core::tree::Tree;

use crate::dirtree::DirTree;
use crate::sys;
use crate::volume::{
    apply_error_phase, lock, open_cursor, Feed, MirrorPhase, MirrorShared, RecordFeed, Volume,
};

/// Marks a mirror as needing a full resync (persisted, so the next mount re-copies it).
pub fn mark_needs_resync(m: &MirrorShared, reason: &str) {
    let _ = fs::create_dir_all(&m.state_dir);
    let _ = fs::write(m.state_dir.join("NEEDS_RESYNC"), reason);
    let _ = fs::remove_file(m.state_dir.join("cursor"));
    *lock(&m.phase) = MirrorPhase::NeedsResync {
        reason: reason.to_string(),
    };
}

/// Applies the journal to one mirror until the volume stops.
pub fn run_worker(vol: Arc<Volume>, m: Arc<MirrorShared>, mut applier: Applier) {
    let mut tree = match DirTree::open(&m.path) {
        Ok(t) => t,
        Err(e) => {
            *lock(&m.phase) = MirrorPhase::Retrying {
                error: format!("cannot open {}: {e}", m.path.display()),
                since_unix: sys::now().sec as u64,
            };
            return;
        }
    };
    let mut cursor = match open_cursor(&m) {
        Ok(c) => c,
        Err(e) => {
            *lock(&m.phase) = MirrorPhase::Retrying {
                error: format!("cannot open cursor: {e}"),
                since_unix: sys::now().sec as u64,
            };
            return;
        }
    };
    let mut feed = RecordFeed::new(applier.next_seq());
    let mut backoff = Duration::from_millis(50);
    let mut last_checkpoint = Instant::now();
    let mut retry: Option<mirrorfs_core::op::Record> = None;
    loop {
        if m.detached() {
            return;
        }
        let want = m.want_durable.load(Ordering::Acquire);
        let applied = applier.cursor().applied;
        let need_cp = (want > applier.cursor().checkpoint && applied >= want.min(applied))
            || (last_checkpoint.elapsed() >= Duration::from_secs(1)
                && applied > applier.cursor().checkpoint);
        if need_cp {
            match applier.checkpoint(&mut tree, &mut cursor) {
                Ok(()) => {
                    m.checkpoint
                        .store(applier.cursor().checkpoint, Ordering::Release);
                    vol.changed.notify_all();
                    last_checkpoint = Instant::now();
                }
                Err(e) => {
                    tracing::warn!("mirror {}: checkpoint failed: {e}", m.name);
                    *lock(&m.phase) = apply_error_phase(&e);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let step = match retry.take() {
            Some(r) => Ok(Feed::Apply(r)),
            None => feed.next(&vol),
        };
        match step {
            Ok(Feed::Apply(rec)) => match applier.apply(&mut tree, &mut cursor, &rec) {
                Ok(()) => {
                    m.applied.store(rec.seq, Ordering::Release);
                    m.applied_bytes
                        .fetch_add(rec.op.data_len() as u64, Ordering::Relaxed);
                    if rec.op.needs_barrier() {
                        m.checkpoint
                            .store(applier.cursor().checkpoint, Ordering::Release);
                    }
                    if !matches!(*lock(&m.phase), MirrorPhase::Live) {
                        *lock(&m.phase) = MirrorPhase::Live;
                    }
                    backoff = Duration::from_millis(50);
                }
                Err(e) => {
                    let phase = apply_error_phase(&e);
                    tracing::warn!(
                        "mirror {}: applying record {} ({} {:?}) failed: {e}",
                        m.name,
                        rec.seq,
                        rec.op.name(),
                        rec.op.path()
                    );
                    if let MirrorPhase::NeedsResync { reason } = &phase {
                        mark_needs_resync(&m, reason);
                        vol.changed.notify_all();
                        return;
                    }
                    *lock(&m.phase) = phase;
                    retry = Some(rec);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            },
            Ok(Feed::Skip(seq)) => {
                if let Err(e) = applier.skip(&mut cursor, seq) {
                    tracing::warn!("mirror {}: {e}", m.name);
                    std::thread::sleep(backoff);
                    continue;
                }
                m.applied.store(seq, Ordering::Release);
            }
            Ok(Feed::Wait) => {
                let p = lock(&vol.progress);
                if p.stopping {
                    drop(p);
                    if applier.checkpoint(&mut tree, &mut cursor).is_ok() {
                        m.checkpoint
                            .store(applier.cursor().checkpoint, Ordering::Release);
                    }
                    *lock(&m.phase) = MirrorPhase::Stopped;
                    vol.changed.notify_all();
                    return;
                }
                let _ = vol.changed.wait_timeout(p, Duration::from_millis(100));
            }
            Err(e) => {
                let reason = format!("cannot read the journal: {e}");
                tracing::error!("mirror {}: {reason}", m.name);
                mark_needs_resync(&m, &reason);
                return;
            }
        }
    }
}

/// Copies the backing tree into an empty mirror: directories, files (only their data extents,
/// so holes stay holes), symlinks, special files, hard links, modes, owners, times and xattrs.
/// `skip` names an entry of the root not to copy (mirrorfs's own state directory).
pub fn initial_copy(
    backing: &Path,
    mirror: &Path,
    skip: Option<&OsStr>,
    progress: &dyn Fn(u64, u64),
) -> io::Result<()> {
    let total = tree_bytes(backing, skip)?;
    let src = DirTree::open(backing)?;
    let mut dst = DirTree::open(mirror)?;
    let mut done = 0u64;
    let mut links: std::collections::HashMap<u64, RelPath> = std::collections::HashMap::new();
    copy_dir(
        &src,
        &mut dst,
        &RelPath::root(),
        skip,
        &mut done,
        total,
        progress,
        &mut links,
    )?;
    copy_meta(&src, &mut dst, &RelPath::root())?;
    dst.sync().map_err(io::Error::other)?;
    progress(total, total);
    Ok(())
}

fn tree_bytes(root: &Path, skip: Option<&OsStr>) -> io::Result<u64> {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            if d == root && Some(e.file_name().as_os_str()) == skip {
                continue;
            }
            let md = e.metadata()?;
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                total += md.len();
            }
        }
    }
    Ok(total)
}

fn to_io(e: mirrorfs_core::tree::TreeError) -> io::Error {
    io::Error::other(e.to_string())
}

#[allow(clippy::too_many_arguments)]
fn copy_dir(
    src: &DirTree,
    dst: &mut DirTree,
    dir: &RelPath,
    skip: Option<&OsStr>,
    done: &mut u64,
    total: u64,
    progress: &dyn Fn(u64, u64),
    links: &mut std::collections::HashMap<u64, RelPath>,
) -> io::Result<()> {
    let fd = sys::open_beneath(
        src.root_fd(),
        dir.as_at_path(),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )?;
    let mut entries = sys::read_dir_fd(fd.as_fd())?;
    entries.sort();
    for (name, _) in entries {
        if dir.is_root() && Some(OsStr::from_bytes(&name)) == skip {
            continue;
        }
        let path = dir.join(&name).map_err(io::Error::other)?;
        let st = sys::lstatat(fd.as_fd(), OsStr::from_bytes(&name))?;
        let mode = st.st_mode;
        match mode & libc::S_IFMT {
            libc::S_IFDIR => {
                dst.mkdir(&path, 0o700, st.st_uid, st.st_gid)
                    .map_err(to_io)?;
                copy_dir(src, dst, &path, skip, done, total, progress, links)?;
            }
            libc::S_IFREG => {
                if st.st_nlink > 1 {
                    if let Some(first) = links.get(&st.st_ino) {
                        dst.link(first, &path).map_err(to_io)?;
                        continue;
                    }
                    links.insert(st.st_ino, path.clone());
                }
                dst.create(&path, mode, st.st_uid, st.st_gid)
                    .map_err(to_io)?;
                let f = sys::openat(
                    fd.as_fd(),
                    OsStr::from_bytes(&name),
                    libc::O_RDONLY | libc::O_NOFOLLOW,
                    0,
                )?;
                copy_extents(
                    f.as_fd(),
                    dst,
                    &path,
                    st.st_size as u64,
                    done,
                    total,
                    progress,
                )?;
            }
            libc::S_IFLNK => {
                let target = sys::readlinkat(fd.as_fd(), OsStr::from_bytes(&name))?;
                dst.symlink(&path, &target, st.st_uid, st.st_gid)
                    .map_err(to_io)?;
            }
            _ => {
                dst.mknod(&path, mode, st.st_rdev, st.st_uid, st.st_gid)
                    .map_err(to_io)?;
            }
        }
        copy_meta(src, dst, &path)?;
    }
    Ok(())
}

/// Copies only the data extents of a file (SEEK_DATA / SEEK_HOLE), keeping holes.
fn copy_extents(
    f: std::os::fd::BorrowedFd<'_>,
    dst: &mut DirTree,
    path: &RelPath,
    size: u64,
    done: &mut u64,
    total: u64,
    progress: &dyn Fn(u64, u64),
) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let data = match sys::lseek(f, off as i64, libc::SEEK_DATA) {
            Ok(d) => d as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => return Err(e),
        };
        let hole = sys::lseek(f, data as i64, libc::SEEK_HOLE)
            .map(|h| h as u64)
            .unwrap_or(size);
        let mut pos = data;
        while pos < hole {
            let want = ((hole - pos) as usize).min(buf.len());
            let n = sys::pread(f, &mut buf[..want], pos)?;
            if n == 0 {
                break;
            }
            dst.write(path, pos, &buf[..n]).map_err(to_io)?;
            pos += n as u64;
            *done += n as u64;
            progress(*done, total);
        }
        off = hole.max(pos);
    }
    dst.truncate(path, size).map_err(to_io)
}

/// Mode, owner, xattrs and times of one entry (times last: the others change ctime only).
fn copy_meta(src: &DirTree, dst: &mut DirTree, path: &RelPath) -> io::Result<()> {
    let st = if path.is_root() {
        sys::fstat(src.root_fd())?
    } else {
        sys::lstatat(src.root_fd(), path.as_at_path())?
    };
    let is_link = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
    if !is_link {
        dst.chmod(path, st.st_mode & 0o7777).map_err(to_io)?;
    }
    dst.chown(path, Some(st.st_uid), Some(st.st_gid))
        .map_err(to_io)?;
    let pfd = sys::open_beneath(
        src.root_fd(),
        path.as_at_path(),
        libc::O_PATH | libc::O_NOFOLLOW,
        0,
    )?;
    if !is_link {
        let mut names = vec![0u8; 65536];
        if let Ok(n) = sys::llistxattr_fd(pfd.as_fd(), &mut names) {
            for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
                let mut val = vec![0u8; 65536];
                if let Ok(vn) = sys::lgetxattr_fd(pfd.as_fd(), name, &mut val) {
                    dst.setxattr(path, name, &val[..vn], 0).map_err(to_io)?;
                }
            }
        }
    }
    let t = |s: i64, ns: i64| mirrorfs_core::op::Timespec {
        sec: s,
        nsec: ns as u32,
    };
    dst.utimes(
        path,
        Some(t(st.st_atime, st.st_atime_nsec)),
        Some(t(st.st_mtime, st.st_mtime_nsec)),
    )
    .map_err(to_io)
}
