//! Shared helpers of the FUSE integration tests: a [`Mount`] guard that runs the real
//! `mirrorfs mount` binary over temporary directories and never leaves a mount behind, thin
//! system-call wrappers that report errno values ([`sys`]), and a tree comparison
//! ([`assert_trees_equal`]) used to check that a mirror equals its backing directory.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub mod net;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_mirrorfs");
/// How long a mount may take to appear in `/proc/self/mountinfo`.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a clean unmount (SIGTERM, drain, checkpoint) may take.
pub const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(90);

/// A fresh, uniquely named directory under /var/tmp (mode 0755), removed on drop.
pub fn temp_base(tag: &str) -> tempfile::TempDir {
    let t = tempfile::Builder::new()
        .prefix(&format!("mirrorfs-it-{tag}-"))
        .tempdir_in("/var/tmp")
        .expect("create a temporary directory under /var/tmp");
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).expect("chmod 0755 temp dir");
    t
}

/// Creates `dir` (and parents) with mode 0755.
pub fn mkdir755(dir: &Path) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
}

/// The binary under test, run in network namespace `netns` (as `ip netns` names it) when
/// given: `nsenter --net` changes only the network namespace (`ip netns exec` would also give
/// the process a copy of this mount namespace, and with it a reference to every FUSE mount made
/// so far, which then could not end when its own process unmounts it; and a FUSE mount made
/// in it would not be seen here).
pub fn mirrorfs_in(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(BIN);
            c
        }
        None => Command::new(BIN),
    }
}

/// Directories for one mirrorfs instance: `BASE/backing`, `BASE/mnt`, `BASE/mirror0..N`.
pub struct Layout {
    /// Dropped last (after any mount on it is gone).
    tmp: tempfile::TempDir,
    pub base: PathBuf,
    pub backing: PathBuf,
    pub mnt: PathBuf,
    pub mirrors: Vec<PathBuf>,
}

impl Layout {
    pub fn new(tag: &str, n_mirrors: usize) -> Layout {
        let tmp = temp_base(tag);
        let base = tmp.path().canonicalize().expect("canonicalize temp dir");
        let backing = base.join("backing");
        let mnt = base.join("mnt");
        mkdir755(&backing);
        mkdir755(&mnt);
        let mirrors: Vec<PathBuf> = (0..n_mirrors)
            .map(|i| {
                let m = base.join(format!("mirror{i}"));
                mkdir755(&m);
                m
            })
            .collect();
        Layout {
            tmp,
            base,
            backing,
            mnt,
            mirrors,
        }
    }

    pub fn mirror(&self) -> &Path {
        &self.mirrors[0]
    }
}

// ---------------------------------------------------------------------------------------------
// /proc/self/mountinfo

fn unescape_mountinfo(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Is `path` a mount point in this mount namespace?
pub fn is_mounted(path: &Path) -> bool {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    text.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|mp| unescape_mountinfo(mp) == path)
    })
}

/// `umount -l PATH` until it is no longer a mount point (best effort, never panics).
pub fn lazy_unmount(path: &Path) {
    for _ in 0..50 {
        if !is_mounted(path) {
            return;
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes; returns whether it did.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if f() {
            return true;
        }
        if t0.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let t0 = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(_) => return None,
        }
        if t0.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// The mount guard

/// A running `mirrorfs mount` over a [`Layout`]. Unmounts (SIGTERM, then SIGKILL and `umount -l`)
/// on drop, so a panicking test never leaves a mount behind.
pub struct Mount {
    child: Option<Child>,
    pub extra: Vec<OsString>,
    /// Environment variables set for `mirrorfs mount` from the next (re)mount on.
    pub env: Vec<(OsString, OsString)>,
    log: PathBuf,
    starts: u32,
    /// Run inside this network namespace (`nsenter --net`, which leaves the mount namespace
    /// alone: the FUSE mount is seen by the whole machine).
    netns: Option<String>,
    /// Declared last: its directories are removed after the mount is gone.
    pub layout: Layout,
}

impl Mount {
    /// A fresh layout with one mirror, mounted with no extra arguments.
    pub fn new(tag: &str) -> Mount {
        Mount::start(Layout::new(tag, 1), &[])
    }

    /// Mounts `layout` with `extra` arguments after the mirrors; panics (with mirrorfs's stderr)
    /// if the mount does not show up within [`MOUNT_TIMEOUT`].
    pub fn start(layout: Layout, extra: &[&str]) -> Mount {
        Mount::start_in(layout, extra, None)
    }

    /// [`Mount::start`] with `mirrorfs mount` in network namespace `netns` (as `ip netns`
    /// names it), when given.
    pub fn start_in(layout: Layout, extra: &[&str], netns: Option<&str>) -> Mount {
        let log = layout.base.join("mirrorfs.log");
        let mut m = Mount {
            child: None,
            extra: extra.iter().map(OsString::from).collect(),
            env: Vec::new(),
            log,
            starts: 0,
            netns: netns.map(str::to_string),
            layout,
        };
        m.spawn();
        m
    }

    pub fn backing(&self) -> &Path {
        &self.layout.backing
    }
    pub fn mnt(&self) -> &Path {
        &self.layout.mnt
    }
    pub fn mirror(&self) -> &Path {
        self.layout.mirror()
    }
    /// `MNT/rel`.
    pub fn p(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.layout.mnt.join(rel)
    }

    /// mirrorfs's stderr (all runs of this guard so far).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn command_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "mount".into(),
            self.layout.backing.clone().into(),
            self.layout.mnt.clone().into(),
        ];
        for m in &self.layout.mirrors {
            a.push("--mirror".into());
            a.push(m.clone().into());
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "mirrorfs is already running");
        self.starts += 1;
        let mut logf = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the mount log");
        use std::io::Write;
        let _ = writeln!(logf, "---- start #{} ----", self.starts);
        let child = mirrorfs_in(self.netns.as_deref())
            .args(self.command_args())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf)
            .spawn()
            .expect("spawn mirrorfs");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if is_mounted(&self.layout.mnt) {
                return;
            }
            let child = self.child.as_mut().expect("child");
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                panic!(
                    "mirrorfs {:?} exited ({st}) before mounting {}; its stderr:\n{}",
                    self.command_args(),
                    self.layout.mnt.display(),
                    self.log()
                );
            }
            if t0.elapsed() > MOUNT_TIMEOUT {
                let mut c = self.child.take().expect("child");
                signal(&c, libc::SIGKILL);
                let _ = c.wait();
                lazy_unmount(&self.layout.mnt);
                panic!(
                    "mirrorfs did not mount {} within {MOUNT_TIMEOUT:?}; its stderr:\n{}",
                    self.layout.mnt.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("mirrorfs is not running").id()
    }

    /// Clean unmount: SIGTERM, wait for exit, require exit status 0 and the mount gone.
    pub fn unmount(&mut self) {
        let mut c = self.child.take().expect("unmount: mirrorfs is not running");
        signal(&c, libc::SIGTERM);
        let st = wait_timeout(&mut c, UNMOUNT_TIMEOUT);
        let Some(st) = st else {
            signal(&c, libc::SIGKILL);
            let _ = c.wait();
            lazy_unmount(&self.layout.mnt);
            panic!(
                "mirrorfs did not exit within {UNMOUNT_TIMEOUT:?} of SIGTERM; its stderr:\n{}",
                self.log()
            );
        };
        if is_mounted(&self.layout.mnt) {
            lazy_unmount(&self.layout.mnt);
            panic!(
                "mirrorfs exited ({st}) after SIGTERM but {} was still mounted; its stderr:\n{}",
                self.layout.mnt.display(),
                self.log()
            );
        }
        assert!(
            st.success(),
            "mirrorfs exited with {st} after SIGTERM (expected 0); its stderr:\n{}",
            self.log()
        );
    }

    /// SIGKILL, then `umount -l` of the dead mount.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("kill9: mirrorfs is not running");
        signal(&c, libc::SIGKILL);
        let _ = c.wait();
        lazy_unmount(&self.layout.mnt);
        assert!(
            !is_mounted(&self.layout.mnt),
            "{} still mounted after kill -9 and umount -l",
            self.layout.mnt.display()
        );
    }

    /// SIGKILL and nothing else: the dead mount stays behind, as after a crash.
    pub fn kill9_leaving_the_mount(&mut self) {
        let mut c = self.child.take().expect("kill9: mirrorfs is not running");
        signal(&c, libc::SIGKILL);
        let _ = c.wait();
    }

    /// Mounts again with the same arguments (after [`unmount`](Self::unmount) or
    /// [`kill9`](Self::kill9)).
    pub fn remount(&mut self) {
        self.spawn();
    }

    /// `mirrorfs status MNT --json`, parsed; `None` while it fails (status not written yet).
    pub fn status(&self) -> Option<serde_json::Value> {
        let o = Command::new(BIN)
            .arg("status")
            .arg(&self.layout.mnt)
            .arg("--json")
            .output()
            .expect("run mirrorfs status");
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// Waits until the mirror tree equals the backing tree (full comparison) while mounted.
    /// A mirror still applying records is given more time: the wait fails once `timeout` passes
    /// without the mirrors' applied position (`status --json`) moving, or after five times
    /// `timeout` in all. A loaded CI machine can leave a mirror minutes behind a workload that
    /// syncs on every unlink (seen: 4 entries short after 60 s, still applying); a stuck mirror
    /// still fails after `timeout`.
    pub fn wait_mirror_equal(&self, timeout: Duration) {
        let mut last = Vec::new();
        let applied = || -> u64 {
            self.status()
                .and_then(|v| {
                    v["mirrors"].as_array().map(|ms| {
                        ms.iter()
                            .filter_map(|m| m["applied_seq"].as_u64())
                            .sum::<u64>()
                    })
                })
                .unwrap_or(0)
        };
        let mut ok = false;
        let mut progress = applied();
        for _ in 0..5 {
            ok = wait_until(timeout, || {
                last = tree_diff(self.backing(), self.mirror(), &Cmp::FULL);
                last.is_empty()
            });
            let now = applied();
            if ok || now <= progress {
                break;
            }
            progress = now;
        }
        assert!(
            ok,
            "mirror {} did not become equal to backing {} within {timeout:?} without progress \
             (applied through {progress}):\n{}\nmirrorfs stderr:\n{}",
            self.mirror().display(),
            self.backing().display(),
            summarize(&last),
            self.log()
        );
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, libc::SIGTERM);
            if wait_timeout(&mut c, Duration::from_secs(30)).is_none() {
                signal(&c, libc::SIGKILL);
                let _ = c.wait();
            }
        }
        lazy_unmount(&self.layout.mnt);
    }
}

/// Runs `mirrorfs ARGS` expecting it to fail: returns its output. If it mounts (or keeps running
/// for 20 s) instead, it is stopped, `mnt` is unmounted, and the test panics.
pub fn run_expecting_failure(args: &[&OsStr], mnt: Option<&Path>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mirrorfs");
    let t0 = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            let out = child.wait_with_output().expect("collect output");
            assert!(
                !out.status.success(),
                "mirrorfs {args:?} succeeded; expected a failure"
            );
            return out;
        }
        let mounted = mnt.is_some_and(is_mounted);
        if mounted || t0.elapsed() > Duration::from_secs(20) {
            signal(&child, libc::SIGTERM);
            if wait_timeout(&mut child, Duration::from_secs(20)).is_none() {
                signal(&child, libc::SIGKILL);
            }
            let out = child.wait_with_output().expect("collect output");
            if let Some(m) = mnt {
                lazy_unmount(m);
            }
            panic!(
                "mirrorfs {args:?} was expected to fail but {}; stderr:\n{}",
                if mounted {
                    "mounted"
                } else {
                    "kept running for 20 s"
                },
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// System calls with errno results

pub mod sys {
    use std::ffi::CString;
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    pub type Res<T> = Result<T, i32>;

    pub fn errno() -> i32 {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    }

    pub fn io_errno(e: &std::io::Error) -> i32 {
        e.raw_os_error().unwrap_or(libc::EIO)
    }

    pub fn c(p: &Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
    }

    fn cvt(r: libc::c_int) -> Res<()> {
        if r < 0 {
            Err(errno())
        } else {
            Ok(())
        }
    }

    pub fn errname(e: i32) -> String {
        let name = match e {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EIO => "EIO",
            libc::EBADF => "EBADF",
            libc::EACCES => "EACCES",
            libc::EEXIST => "EEXIST",
            libc::EXDEV => "EXDEV",
            libc::ENOTDIR => "ENOTDIR",
            libc::EISDIR => "EISDIR",
            libc::EINVAL => "EINVAL",
            libc::ENOSPC => "ENOSPC",
            libc::EROFS => "EROFS",
            libc::EMLINK => "EMLINK",
            libc::ENAMETOOLONG => "ENAMETOOLONG",
            libc::ENOTEMPTY => "ENOTEMPTY",
            libc::ELOOP => "ELOOP",
            libc::ENODATA => "ENODATA",
            libc::ENOTCONN => "ENOTCONN",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::ERANGE => "ERANGE",
            libc::ETXTBSY => "ETXTBSY",
            libc::EBUSY => "EBUSY",
            libc::ESTALE => "ESTALE",
            _ => "",
        };
        format!("{name}({e})")
    }

    /// open(2); the descriptor is returned as a `File` (closed on drop).
    pub fn open(p: &Path, flags: i32, mode: u32) -> Res<File> {
        // SAFETY: valid C string; the descriptor returned is owned by the File.
        let fd = unsafe { libc::open(c(p).as_ptr(), flags | libc::O_CLOEXEC, mode) };
        if fd < 0 {
            return Err(errno());
        }
        // SAFETY: a fresh descriptor we own.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    pub fn pwrite(f: &File, buf: &[u8], off: u64) -> Res<usize> {
        // SAFETY: buffer valid for its length.
        let n = unsafe {
            libc::pwrite(
                f.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                off as libc::off_t,
            )
        };
        if n < 0 {
            Err(errno())
        } else {
            Ok(n as usize)
        }
    }

    pub fn write(f: &File, buf: &[u8]) -> Res<usize> {
        // SAFETY: buffer valid for its length.
        let n = unsafe { libc::write(f.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(errno())
        } else {
            Ok(n as usize)
        }
    }

    pub fn write_all(f: &File, mut buf: &[u8]) -> Res<()> {
        while !buf.is_empty() {
            let n = write(f, buf)?;
            if n == 0 {
                return Err(libc::EIO);
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    pub fn pread(f: &File, buf: &mut [u8], off: u64) -> Res<usize> {
        // SAFETY: buffer valid for its length.
        let n = unsafe {
            libc::pread(
                f.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                off as libc::off_t,
            )
        };
        if n < 0 {
            Err(errno())
        } else {
            Ok(n as usize)
        }
    }

    pub fn fsync(f: &File) -> Res<()> {
        // SAFETY: plain syscall on an owned descriptor.
        cvt(unsafe { libc::fsync(f.as_raw_fd()) })
    }

    pub fn ftruncate(f: &File, size: u64) -> Res<()> {
        // SAFETY: plain syscall on an owned descriptor.
        cvt(unsafe { libc::ftruncate(f.as_raw_fd(), size as libc::off_t) })
    }

    pub fn truncate(p: &Path, size: u64) -> Res<()> {
        // SAFETY: valid C string.
        cvt(unsafe { libc::truncate(c(p).as_ptr(), size as libc::off_t) })
    }

    pub fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> Res<()> {
        // SAFETY: plain syscall on an owned descriptor.
        cvt(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) })
    }

    pub fn lseek(f: &File, off: i64, whence: i32) -> Res<i64> {
        // SAFETY: plain syscall on an owned descriptor.
        let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
        if r < 0 {
            Err(errno())
        } else {
            Ok(r as i64)
        }
    }

    pub fn rename2(from: &Path, to: &Path, flags: u32) -> Res<()> {
        // SAFETY: valid C strings; AT_FDCWD.
        cvt(unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                c(from).as_ptr(),
                libc::AT_FDCWD,
                c(to).as_ptr(),
                flags,
            )
        })
    }

    pub fn unlink(p: &Path) -> Res<()> {
        // SAFETY: valid C string.
        cvt(unsafe { libc::unlink(c(p).as_ptr()) })
    }

    pub fn rmdir(p: &Path) -> Res<()> {
        // SAFETY: valid C string.
        cvt(unsafe { libc::rmdir(c(p).as_ptr()) })
    }

    pub fn mkdir(p: &Path, mode: u32) -> Res<()> {
        // SAFETY: valid C string.
        cvt(unsafe { libc::mkdir(c(p).as_ptr(), mode) })
    }

    pub fn link(from: &Path, to: &Path) -> Res<()> {
        // SAFETY: valid C strings.
        cvt(unsafe { libc::link(c(from).as_ptr(), c(to).as_ptr()) })
    }

    pub fn symlink(target: &[u8], p: &Path) -> Res<()> {
        let t = CString::new(target).expect("target without NUL");
        // SAFETY: valid C strings.
        cvt(unsafe { libc::symlink(t.as_ptr(), c(p).as_ptr()) })
    }

    pub fn mknod(p: &Path, mode: u32, dev: u64) -> Res<()> {
        // SAFETY: valid C string.
        cvt(unsafe { libc::mknod(c(p).as_ptr(), mode, dev) })
    }

    pub fn chmod(p: &Path, mode: u32) -> Res<()> {
        // SAFETY: valid C string.
        cvt(unsafe { libc::chmod(c(p).as_ptr(), mode) })
    }

    pub fn lchown(p: &Path, uid: u32, gid: u32) -> Res<()> {
        // SAFETY: valid C string.
        cvt(unsafe { libc::lchown(c(p).as_ptr(), uid, gid) })
    }

    pub const UTIME_NOW: i64 = libc::UTIME_NOW;
    pub const UTIME_OMIT: i64 = libc::UTIME_OMIT;

    /// utimensat(AT_FDCWD, p, [atime, mtime], flags); times as (sec, nsec).
    pub fn utimens(p: &Path, atime: (i64, i64), mtime: (i64, i64), flags: i32) -> Res<()> {
        let ts = [
            libc::timespec {
                tv_sec: atime.0,
                tv_nsec: atime.1,
            },
            libc::timespec {
                tv_sec: mtime.0,
                tv_nsec: mtime.1,
            },
        ];
        // SAFETY: valid C string and a two-element timespec array.
        cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c(p).as_ptr(), ts.as_ptr(), flags) })
    }

    pub fn lstat(p: &Path) -> Res<libc::stat> {
        // SAFETY: zeroed stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and out-parameter.
        cvt(unsafe { libc::lstat(c(p).as_ptr(), &mut st) })?;
        Ok(st)
    }

    pub fn fstat(f: &File) -> Res<libc::stat> {
        // SAFETY: zeroed stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: owned descriptor and out-parameter.
        cvt(unsafe { libc::fstat(f.as_raw_fd(), &mut st) })?;
        Ok(st)
    }

    pub fn statfs(p: &Path) -> Res<libc::statfs> {
        // SAFETY: zeroed statfs is a valid out-parameter.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and out-parameter.
        cvt(unsafe { libc::statfs(c(p).as_ptr(), &mut st) })?;
        Ok(st)
    }

    pub fn readlink(p: &Path) -> Res<Vec<u8>> {
        std::fs::read_link(p)
            .map(|t| t.into_os_string().into_encoded_bytes())
            .map_err(|e| io_errno(&e))
    }

    pub fn read_file(p: &Path) -> Res<Vec<u8>> {
        std::fs::read(p).map_err(|e| io_errno(&e))
    }

    pub fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> Res<()> {
        let n = CString::new(name).expect("xattr name");
        // SAFETY: valid C strings and buffer.
        cvt(unsafe {
            libc::lsetxattr(
                c(p).as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        })
    }

    pub fn lgetxattr(p: &Path, name: &[u8]) -> Res<Vec<u8>> {
        let n = CString::new(name).expect("xattr name");
        let cp = c(p);
        loop {
            // SAFETY: size query with a null buffer.
            let len = unsafe { libc::lgetxattr(cp.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
            if len < 0 {
                return Err(errno());
            }
            let mut buf = vec![0u8; len as usize];
            // SAFETY: buffer valid for its length.
            let got = unsafe {
                libc::lgetxattr(cp.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            };
            if got < 0 {
                if errno() == libc::ERANGE {
                    continue;
                }
                return Err(errno());
            }
            buf.truncate(got as usize);
            return Ok(buf);
        }
    }

    pub fn llistxattr(p: &Path) -> Res<Vec<Vec<u8>>> {
        let cp = c(p);
        loop {
            // SAFETY: size query with a null buffer.
            let len = unsafe { libc::llistxattr(cp.as_ptr(), std::ptr::null_mut(), 0) };
            if len < 0 {
                return Err(errno());
            }
            let mut buf = vec![0u8; len as usize];
            // SAFETY: buffer valid for its length.
            let got = unsafe { libc::llistxattr(cp.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            if got < 0 {
                if errno() == libc::ERANGE {
                    continue;
                }
                return Err(errno());
            }
            buf.truncate(got as usize);
            let mut names: Vec<Vec<u8>> = buf
                .split(|b| *b == 0)
                .filter(|n| !n.is_empty())
                .map(<[u8]>::to_vec)
                .collect();
            names.sort();
            return Ok(names);
        }
    }

    pub fn lremovexattr(p: &Path, name: &str) -> Res<()> {
        let n = CString::new(name).expect("xattr name");
        // SAFETY: valid C strings.
        cvt(unsafe { libc::lremovexattr(c(p).as_ptr(), n.as_ptr()) })
    }
}

// ---------------------------------------------------------------------------------------------
// Tree comparison

/// What [`tree_diff`] compares besides type, content, size, mode, links, symlink targets, rdev
/// and xattrs (always compared).
#[derive(Debug, Clone, Copy)]
pub struct Cmp {
    /// mtime of every entry (files, symlinks, directories, the root).
    pub mtime: bool,
    /// uid and gid.
    pub owner: bool,
    /// The second tree's files must not use (much) more blocks than the first's: holes kept.
    pub holes: bool,
}

impl Cmp {
    pub const FULL: Cmp = Cmp {
        mtime: true,
        owner: true,
        holes: true,
    };
    /// For two independent runs of the same operations: mtimes differ since time passes.
    pub const NO_TIMES: Cmp = Cmp {
        mtime: false,
        owner: true,
        holes: false,
    };
}

/// Slack (in 512-byte sectors) allowed for the hole check: 8 file-system blocks.
const HOLE_SLACK_SECTORS: u64 = 64;

#[derive(Debug, Clone)]
struct Entry {
    kind: &'static str,
    perm: u32,
    uid: u32,
    gid: u32,
    size: u64,
    blocks: u64,
    mtime: (i64, i64),
    rdev: u64,
    nlink: u64,
    ino: u64,
    target: Option<Vec<u8>>,
    xattrs: Result<BTreeMap<Vec<u8>, Vec<u8>>, i32>,
}

fn kind_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFCHR => "chardev",
        libc::S_IFBLK => "blockdev",
        libc::S_IFSOCK => "socket",
        _ => "unknown",
    }
}

fn xattrs_of(p: &Path) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, i32> {
    let mut out = BTreeMap::new();
    for n in sys::llistxattr(p)? {
        let v = sys::lgetxattr(p, &n)?;
        out.insert(n, v);
    }
    Ok(out)
}

fn entry_of(p: &Path) -> Result<Entry, String> {
    let md = fs::symlink_metadata(p).map_err(|e| format!("lstat {}: {e}", p.display()))?;
    let kind = kind_name(md.mode());
    let target = if kind == "symlink" {
        Some(
            fs::read_link(p)
                .map_err(|e| format!("readlink {}: {e}", p.display()))?
                .into_os_string()
                .into_vec(),
        )
    } else {
        None
    };
    Ok(Entry {
        kind,
        perm: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: md.size(),
        blocks: md.blocks(),
        mtime: (md.mtime(), md.mtime_nsec()),
        rdev: md.rdev(),
        nlink: md.nlink(),
        ino: md.ino(),
        target,
        xattrs: xattrs_of(p),
    })
}

/// Every entry below `root` (not following symlinks), by path relative to `root` (the root
/// itself is the empty path). The top-level `.mirrorfs` is left out.
fn walk(root: &Path) -> Result<BTreeMap<PathBuf, Entry>, String> {
    let mut out = BTreeMap::new();
    out.insert(PathBuf::new(), entry_of(root)?);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = fs::read_dir(&dir).map_err(|e| format!("readdir {}: {e}", dir.display()))?;
        for de in rd {
            let de = de.map_err(|e| format!("readdir {}: {e}", dir.display()))?;
            let name = de.file_name();
            if rel.as_os_str().is_empty() && name == ".mirrorfs" {
                continue;
            }
            let r = rel.join(&name);
            let e = entry_of(&root.join(&r))?;
            if e.kind == "dir" {
                stack.push(r.clone());
            }
            out.insert(r, e);
        }
    }
    Ok(out)
}

/// Data extents of a file as [start, end) ranges (SEEK_DATA / SEEK_HOLE); `None` if the file
/// system does not support them.
pub fn data_extents(f: &File, size: u64) -> Option<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < size {
        let data = match sys::lseek(f, off as i64, libc::SEEK_DATA) {
            Ok(d) => d as u64,
            Err(libc::ENXIO) => break,
            Err(_) => return None,
        };
        if data >= size {
            break;
        }
        let hole = match sys::lseek(f, data as i64, libc::SEEK_HOLE) {
            Ok(h) => (h as u64).min(size),
            Err(_) => return None,
        };
        out.push((data, hole));
        off = hole;
    }
    Some(out)
}

fn union(mut a: Vec<(u64, u64)>, b: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    a.extend(b);
    a.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in a {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Compares the contents of two files of equal `size`, reading only where either has data.
/// Returns a description of the first difference.
fn content_diff(a: &Path, b: &Path, size: u64) -> Option<String> {
    let fa = match File::open(a) {
        Ok(f) => f,
        Err(e) => return Some(format!("open {}: {e}", a.display())),
    };
    let fb = match File::open(b) {
        Ok(f) => f,
        Err(e) => return Some(format!("open {}: {e}", b.display())),
    };
    let ranges = match (data_extents(&fa, size), data_extents(&fb, size)) {
        (Some(x), Some(y)) => union(x, y),
        _ => vec![(0, size)],
    };
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    for (s, e) in ranges {
        let mut off = s;
        while off < e {
            let n = ((e - off) as usize).min(ba.len());
            let na = fa.read_at(&mut ba[..n], off).unwrap_or(0);
            let nb = fb.read_at(&mut bb[..n], off).unwrap_or(0);
            if na != nb {
                return Some(format!("short read at offset {off}: {na} vs {nb} bytes"));
            }
            if na == 0 {
                return Some(format!("unexpected EOF at offset {off}"));
            }
            if ba[..na] != bb[..nb] {
                let i = ba[..na]
                    .iter()
                    .zip(&bb[..nb])
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                return Some(format!(
                    "content differs at offset {}: {:#04x} vs {:#04x}",
                    off + i as u64,
                    ba[i],
                    bb[i]
                ));
            }
            off += na as u64;
        }
    }
    None
}

fn show(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        "/ (root)".into()
    } else {
        format!("{:?}", p.as_os_str())
    }
}

fn show_xattrs(x: &Result<BTreeMap<Vec<u8>, Vec<u8>>, i32>) -> String {
    match x {
        Err(e) => format!("<error {}>", sys::errname(*e)),
        Ok(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}={:?}",
                        String::from_utf8_lossy(k),
                        String::from_utf8_lossy(&v[..v.len().min(64)])
                    )
                })
                .collect();
            format!("{{{}}}", items.join(", "))
        }
    }
}

/// Hard-link groups: sets of (non-directory) paths sharing an inode, for groups of 2 or more.
fn link_groups(t: &BTreeMap<PathBuf, Entry>) -> BTreeSet<Vec<PathBuf>> {
    let mut by_ino: HashMap<u64, Vec<PathBuf>> = HashMap::new();
    for (p, e) in t {
        if e.kind != "dir" {
            by_ino.entry(e.ino).or_default().push(p.clone());
        }
    }
    by_ino
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect()
}

/// Every difference between the trees at `a` and `b` (empty if equal), as readable lines.
pub fn tree_diff(a: &Path, b: &Path, cmp: &Cmp) -> Vec<String> {
    let ta = match walk(a) {
        Ok(t) => t,
        Err(e) => return vec![format!("cannot walk {}: {e}", a.display())],
    };
    let tb = match walk(b) {
        Ok(t) => t,
        Err(e) => return vec![format!("cannot walk {}: {e}", b.display())],
    };
    let mut out = Vec::new();
    for p in ta.keys() {
        if !tb.contains_key(p) {
            out.push(format!(
                "{}: only in {} ({})",
                show(p),
                a.display(),
                ta[p].kind
            ));
        }
    }
    for p in tb.keys() {
        if !ta.contains_key(p) {
            out.push(format!(
                "{}: only in {} ({})",
                show(p),
                b.display(),
                tb[p].kind
            ));
        }
    }
    for (p, x) in &ta {
        let Some(y) = tb.get(p) else { continue };
        let mut field = |name: &str, va: String, vb: String| {
            if va != vb {
                out.push(format!("{}: {name} differs: {va} vs {vb}", show(p)));
            }
        };
        field("type", x.kind.into(), y.kind.into());
        if x.kind != y.kind {
            continue;
        }
        field("mode", format!("{:#o}", x.perm), format!("{:#o}", y.perm));
        if cmp.owner {
            field("uid", x.uid.to_string(), y.uid.to_string());
            field("gid", x.gid.to_string(), y.gid.to_string());
        }
        if x.kind != "dir" {
            field("size", x.size.to_string(), y.size.to_string());
        }
        field("nlink", x.nlink.to_string(), y.nlink.to_string());
        if cmp.mtime {
            field(
                "mtime",
                format!("{}.{:09}", x.mtime.0, x.mtime.1),
                format!("{}.{:09}", y.mtime.0, y.mtime.1),
            );
        }
        if x.kind == "chardev" || x.kind == "blockdev" {
            field("rdev", format!("{:#x}", x.rdev), format!("{:#x}", y.rdev));
        }
        field(
            "symlink target",
            format!("{:?}", x.target.as_ref().map(|t| OsStr::from_bytes(t))),
            format!("{:?}", y.target.as_ref().map(|t| OsStr::from_bytes(t))),
        );
        field("xattrs", show_xattrs(&x.xattrs), show_xattrs(&y.xattrs));
        if x.kind == "file" && x.size == y.size {
            if let Some(d) = content_diff(&a.join(p), &b.join(p), x.size) {
                out.push(format!("{}: {d}", show(p)));
            }
            if cmp.holes && y.blocks > x.blocks + HOLE_SLACK_SECTORS {
                out.push(format!(
                    "{}: holes not kept: {} uses {} sectors, {} uses {} (size {})",
                    show(p),
                    b.display(),
                    y.blocks,
                    a.display(),
                    x.blocks,
                    x.size
                ));
            }
        }
    }
    let ga = link_groups(&ta);
    let gb = link_groups(&tb);
    for g in ga.difference(&gb) {
        out.push(format!("hard-link group {g:?} only in {}", a.display()));
    }
    for g in gb.difference(&ga) {
        out.push(format!("hard-link group {g:?} only in {}", b.display()));
    }
    out
}

pub fn summarize(diffs: &[String]) -> String {
    let mut s: Vec<String> = diffs.iter().take(60).cloned().collect();
    if diffs.len() > 60 {
        s.push(format!("... and {} more", diffs.len() - 60));
    }
    s.join("\n")
}

/// Panics, listing the differences, unless `b` equals `a` (full comparison).
pub fn assert_trees_equal(a: &Path, b: &Path) {
    assert_trees_equal_with(a, b, &Cmp::FULL);
}

pub fn assert_trees_equal_with(a: &Path, b: &Path, cmp: &Cmp) {
    let d = tree_diff(a, b, cmp);
    assert!(
        d.is_empty(),
        "trees differ ({} vs {}), {} difference(s):\n{}",
        a.display(),
        b.display(),
        d.len(),
        summarize(&d)
    );
}

/// Unmounts cleanly and asserts every mirror equals the backing directory.
pub fn finish(m: &mut Mount) {
    // A clean unmount stops a mirror's initial sync (the next mount copies again), so a test that
    // ran faster than the first copy began would compare a half-copied mirror: wait for it first.
    let copying = |s: &serde_json::Value| {
        s["mirrors"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["state"] == "syncing"))
    };
    let mut last = None;
    let copied = wait_until(Duration::from_secs(60), || {
        last = m.status();
        last.as_ref().is_some_and(|s| !copying(s))
    });
    assert!(
        copied || !last.as_ref().is_some_and(copying),
        "a mirror's initial sync never ended; stderr:\n{}",
        tail(&m.log(), 60)
    );
    m.unmount();
    for mirror in &m.layout.mirrors {
        let d = tree_diff(&m.layout.backing, mirror, &Cmp::FULL);
        assert!(
            d.is_empty(),
            "after unmount, mirror {} differs from backing {}, {} difference(s):\n{}\nmirrorfs stderr:\n{}",
            mirror.display(),
            m.layout.backing.display(),
            d.len(),
            summarize(&d),
            tail(&m.log(), 60)
        );
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Deterministic pseudo-random bytes (xorshift), for file contents.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Reads a whole file through a `File` (for files opened with special flags).
pub fn read_to_end(f: &mut File) -> Vec<u8> {
    let mut v = Vec::new();
    f.read_to_end(&mut v).expect("read");
    v
}

/// (kind, path) of each difference of the first mirror in `mirrorfs verify --json`'s output, sorted.
pub fn verify_differences(v: &serde_json::Value) -> Vec<(String, String)> {
    let mut d: Vec<(String, String)> = v["mirrors"][0]["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or("").to_string(),
                d["path"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    d.sort();
    d
}
