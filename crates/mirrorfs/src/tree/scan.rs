//! A tree scanned for `mirrorfs verify`: every entry beneath the root (through the one `walk`:
//! symlinks never followed, every path resolved beneath the root) with what `core::verify`
//! compares, files' data hashed with blake3 (or taken from the [`HashCache`]).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use mirrorfs_core::path::RelPath;
use mirrorfs_core::verify::incremental::Scope;
use mirrorfs_core::verify::{path_order, Entry, Kind};

use crate::sys;
use crate::tree::hashcache::{HashCache, Key};
use crate::tree::walk::{walk, Visit};

/// The most entries a scan holds (about 200 bytes each): beyond it the scan stops with an error
/// rather than use unbounded memory.
pub const MAX_ENTRIES: usize = 20_000_000;
/// Read size for hashing.
const READ_BYTES: usize = 1 << 20;

/// What a scan reports as it goes (for the progress bar).
pub trait Progress {
    fn entry(&mut self);
    fn bytes(&mut self, n: u64);
}

impl Progress for () {
    fn entry(&mut self) {}
    fn bytes(&mut self, _: u64) {}
}

/// Scans the tree at `root`, skipping `skip` among the root's entries (the state directory and
/// a mirror's identity mark), sorted by `core::verify::path_order`.
pub fn scan(
    root: &Path,
    skip: Option<&[u8]>,
    cache: &mut HashCache,
    progress: &mut dyn Progress,
) -> io::Result<Vec<Entry>> {
    let rootfd: OwnedFd = std::fs::File::open(root)?.into();
    let mut s = Scanner::new(cache, progress);
    s.subtree(rootfd.as_fd(), &RelPath::root(), skip)?;
    Ok(s.finish())
}

/// Scans only what `plan` names (`core::verify::incremental::plan`: entries, and subtrees with
/// everything below them) beneath `root`, as [`scan`] would list them; what does not exist is
/// left out, and so is `skip` at the root. Hard-link groups are named within what was scanned.
pub fn scan_plan(
    root: &Path,
    skip: Option<&[u8]>,
    plan: &[(RelPath, Scope)],
    cache: &mut HashCache,
    progress: &mut dyn Progress,
) -> io::Result<Vec<Entry>> {
    let rootfd: OwnedFd = std::fs::File::open(root)?.into();
    let mut s = Scanner::new(cache, progress);
    for (p, scope) in plan {
        let first = p
            .as_bytes()
            .split(|b| *b == b'/')
            .next()
            .unwrap_or_default();
        if !p.is_root() && skip == Some(first) {
            continue;
        }
        if p.is_root() {
            match scope {
                Scope::Subtree => s.subtree(rootfd.as_fd(), p, skip)?,
                Scope::Entry => {
                    let st = sys::fstat(rootfd.as_fd())?;
                    s.root_entry(rootfd.as_fd(), p, &st)?;
                }
            }
            continue;
        }
        let st = match crate::tree::dirtree::lstat_in(rootfd.as_fd(), p) {
            Ok(st) => st,
            // Not there, or a parent is not a directory (a file, or a symlink: never followed):
            // nothing to list (the parent itself is compared where it is listed).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if *scope == Scope::Subtree && is_dir {
            let fd = crate::tree::dirtree::open_in(
                rootfd.as_fd(),
                p,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )?;
            s.subtree(fd.as_fd(), p, None)?;
            continue;
        }
        let parent = p.parent().unwrap_or_default();
        let dir = crate::tree::dirtree::open_in(
            rootfd.as_fd(),
            &parent,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        let name = p.file_name().unwrap_or_default();
        s.one(p, name, &st, dir.as_fd())?;
    }
    Ok(s.finish())
}

/// Entries as a scan collects them.
struct Scanner<'a> {
    cache: &'a mut HashCache,
    progress: &'a mut dyn Progress,
    now: i64,
    buf: Vec<u8>,
    // With each entry, the inode of a non-directory with several links.
    out: Vec<(Entry, Option<u64>)>,
}

impl<'a> Scanner<'a> {
    fn new(cache: &'a mut HashCache, progress: &'a mut dyn Progress) -> Scanner<'a> {
        Scanner {
            cache,
            progress,
            now: sys::now().sec,
            buf: vec![0u8; READ_BYTES],
            out: Vec::new(),
        }
    }

    /// Everything below the directory open as `top`, which is at `base` in the tree, and
    /// `top` itself.
    fn subtree(
        &mut self,
        top: BorrowedFd<'_>,
        base: &RelPath,
        skip: Option<&[u8]>,
    ) -> io::Result<()> {
        walk(top, skip, |v| match v {
            Visit::Entry {
                path,
                name,
                st,
                dir,
            } => {
                let path = path
                    .rebase(&RelPath::root(), base)
                    .ok_or_else(|| io::Error::other("path"))?;
                self.one(&path, name, st, dir)
            }
            Visit::DirDone { path, st } if path.is_root() => self.root_entry(top, base, st),
            Visit::DirDone { .. } => Ok(()),
        })
    }

    /// The directory open as `top` (at `path`), itself.
    fn root_entry(
        &mut self,
        top: BorrowedFd<'_>,
        path: &RelPath,
        st: &libc::stat,
    ) -> io::Result<()> {
        let fd = sys::openat(top, OsStr::new("."), libc::O_PATH | libc::O_DIRECTORY, 0)?;
        self.push(path, st, fd.as_fd())
    }

    /// The entry `name` of `dir`, at `path`.
    fn one(
        &mut self,
        path: &RelPath,
        name: &[u8],
        st: &libc::stat,
        dir: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let flags = if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NOATIME
        } else {
            libc::O_PATH | libc::O_NOFOLLOW
        };
        let fd = open_entry(dir, name, flags)?;
        self.push(path, st, fd.as_fd())
    }

    fn push(&mut self, path: &RelPath, st: &libc::stat, fd: BorrowedFd<'_>) -> io::Result<()> {
        if self.out.len() >= MAX_ENTRIES {
            return Err(io::Error::other(format!(
                "more than {MAX_ENTRIES} entries: verify each part of the tree separately"
            )));
        }
        let e = entry(
            path,
            st,
            fd,
            self.cache,
            &mut self.buf,
            self.now,
            self.progress,
        )?;
        self.progress.entry();
        let linked = (e.kind != Kind::Dir && st.st_nlink > 1).then_some(st.st_ino);
        self.out.push((e, linked));
        Ok(())
    }

    /// Sorted, each path once; each hard-link group named by its first path in this order, the
    /// same in both trees.
    fn finish(self) -> Vec<Entry> {
        let mut out = self.out;
        out.sort_by(|a, b| path_order(&a.0.path, &b.0.path));
        out.dedup_by(|a, b| a.0.path == b.0.path);
        let mut leaders: HashMap<u64, Vec<u8>> = HashMap::new();
        out.into_iter()
            .map(|(mut e, linked)| {
                if let Some(ino) = linked {
                    let l = leaders.entry(ino).or_insert_with(|| e.path.clone());
                    e.link_leader = Some(l.clone());
                }
                e
            })
            .collect()
    }
}

/// Opens an entry for reading (`O_NOATIME` where allowed: only the owner or root may).
fn open_entry(dir: BorrowedFd<'_>, name: &[u8], flags: i32) -> io::Result<OwnedFd> {
    match sys::openat(dir, OsStr::from_bytes(name), flags, 0) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) && flags & libc::O_NOATIME != 0 => {
            sys::openat(dir, OsStr::from_bytes(name), flags & !libc::O_NOATIME, 0)
        }
        r => r,
    }
}

fn entry(
    path: &RelPath,
    st: &libc::stat,
    fd: BorrowedFd<'_>,
    cache: &mut HashCache,
    buf: &mut [u8],
    now: i64,
    progress: &mut dyn Progress,
) -> io::Result<Entry> {
    let kind = Kind::from_mode(st.st_mode)
        .ok_or_else(|| io::Error::other(format!("{path}: unknown file type {:#o}", st.st_mode)))?;
    let pathb = if path.is_root() {
        b".".to_vec()
    } else {
        path.as_bytes().to_vec()
    };
    let target = match kind {
        Kind::Symlink => Some(sys::readlinkat(fd, OsStr::new(""))?),
        _ => None,
    };
    let hash = match kind {
        Kind::File => {
            let key = Key::of(st);
            match cache.get(&key) {
                Some(h) => Some(h),
                None => {
                    let (h, n) = hash_file(fd, buf, progress)?;
                    cache.put(key, h, n, now);
                    Some(h)
                }
            }
        }
        _ => None,
    };
    Ok(Entry {
        path: pathb,
        kind,
        perm: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        mtime: (st.st_mtime, st.st_mtime_nsec),
        nlink: st.st_nlink,
        blocks: st.st_blocks as u64,
        rdev: st.st_rdev,
        target,
        hash,
        xattrs: xattrs(fd)?,
        link_leader: None,
    })
}

/// The blake3 hash of a file's data, and the bytes read.
fn hash_file(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    progress: &mut dyn Progress,
) -> io::Result<([u8; 32], u64)> {
    let mut h = blake3::Hasher::new();
    let mut off = 0u64;
    loop {
        let n = sys::pread(fd, buf, off)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
        progress.bytes(n as u64);
    }
    Ok((*h.finalize().as_bytes(), off))
}

/// Extended attributes (name, blake3 of the value), sorted by name.
fn xattrs(fd: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, [u8; 32])>> {
    let mut out = Vec::new();
    let mut val = vec![0u8; 65536];
    for name in crate::mirror::xattr_names(fd)? {
        match sys::lgetxattr_fd(fd, &name, &mut val) {
            Ok(n) => out.push((name, *blake3::hash(&val[..n]).as_bytes())),
            // Removed between the listing and the read.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn scans_every_entry_never_follows_symlinks_and_uses_the_cache() {
        let t = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("secret"), b"outside").expect("write");
        let r = t.path().join("root");
        std::fs::create_dir_all(r.join("d")).expect("mkdir");
        std::fs::create_dir_all(r.join(".mirrorfs")).expect("mkdir");
        std::fs::write(r.join("d/f"), b"hello").expect("write");
        std::fs::write(r.join("d.txt"), b"").expect("write");
        std::fs::hard_link(r.join("d/f"), r.join("h")).expect("link");
        std::fs::set_permissions(r.join("d.txt"), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
        std::os::unix::fs::symlink(outside.path(), r.join("s")).expect("symlink");
        let mut cache = HashCache::default();
        let s = scan(&r, Some(b".mirrorfs"), &mut cache, &mut ()).expect("scan");
        let paths: Vec<String> = s
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path).into_owned())
            .collect();
        assert_eq!(paths, vec![".", "d", "d/f", "d.txt", "h", "s"]);
        assert_eq!(s[2].hash, Some(*blake3::hash(b"hello").as_bytes()));
        assert_eq!(s[3].perm, 0o600);
        assert_eq!(s[2].link_leader.as_deref(), Some(&b"d/f"[..]));
        assert_eq!(s[4].link_leader.as_deref(), Some(&b"d/f"[..]));
        assert_eq!(s[5].kind, Kind::Symlink);
        assert_eq!(
            s[5].target.as_deref(),
            Some(outside.path().as_os_str().as_bytes())
        );
        assert_eq!(
            cache.bytes_read, 10,
            "d/f and h read once each (d.txt is empty)"
        );
        // Unchanged but fresh: nothing kept yet (the settle rule), so a second scan reads again.
        let mut c2 = HashCache::default();
        let k = Key::of(
            &sys::lstatat(
                std::fs::File::open(&r)
                    .map(OwnedFd::from)
                    .expect("open")
                    .as_fd(),
                OsStr::new("d/f"),
            )
            .expect("stat"),
        );
        c2.put(k, [7; 32], 0, i64::MAX - 10);
        let cp = t.path().join("c");
        c2.save(&cp).expect("save");
        let mut c2 = HashCache::load(&cp).0;
        let s2 = scan(&r, Some(b".mirrorfs"), &mut c2, &mut ()).expect("scan");
        assert_eq!(
            s2[2].hash,
            Some([7; 32]),
            "a cached hash is used, not the data"
        );
        assert_eq!(c2.hits, 2, "d/f and h are one inode");
        assert_eq!(c2.bytes_read, 0);
    }

    #[test]
    fn a_plan_scans_what_it_names_as_the_full_scan_lists_it() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path().join("root");
        std::fs::create_dir_all(r.join("a/b/c")).expect("mkdir");
        std::fs::create_dir_all(r.join(".mirrorfs")).expect("mkdir");
        std::fs::write(r.join("a/b/c/f"), b"deep").expect("write");
        std::fs::write(r.join("a/g"), b"g").expect("write");
        std::fs::write(r.join("top"), b"t").expect("write");
        std::os::unix::fs::symlink("a", r.join("link")).expect("symlink");
        let full = scan(&r, Some(b".mirrorfs"), &mut HashCache::default(), &mut ()).expect("scan");
        let rp = |s: &str| RelPath::new(s).expect("path");
        let plan = mirrorfs_core::verify::incremental::plan(vec![
            (RelPath::root(), Scope::Entry),
            (rp("a/b"), Scope::Subtree),
            (rp("a/g"), Scope::Entry),
            (rp("gone"), Scope::Subtree),
            (rp(".mirrorfs"), Scope::Subtree),
            (rp("top/x"), Scope::Entry),
            (rp("link/g"), Scope::Entry),
            (rp("link"), Scope::Entry),
        ]);
        let mut cache = HashCache::default();
        let part = scan_plan(&r, Some(b".mirrorfs"), &plan, &mut cache, &mut ()).expect("scan");
        let paths: Vec<String> = part
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path).into_owned())
            .collect();
        assert_eq!(paths, vec![".", "a/b", "a/b/c", "a/b/c/f", "a/g", "link"]);
        for e in &part {
            let same = full
                .iter()
                .find(|f| f.path == e.path)
                .expect("in the full scan");
            assert_eq!(e, same);
        }
        assert_eq!(cache.misses, 2, "only a/b/c/f and a/g were read");
    }
}
