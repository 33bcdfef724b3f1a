//! Mount handling: `/proc/self/mountinfo` parsing and guards that never leave a
//! mount behind (bindfs daemon, mirrorfs foreground process), and a guard for
//! other child processes (the `mirrorfs serve` daemon).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long to wait for a mount to show up in `/proc/self/mountinfo`.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for mirrorfs to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// One line of `/proc/self/mountinfo`, reduced to what we need.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undo the octal escapes (`\040` for space, ...) used in mountinfo.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// All current mounts of this process's mount namespace.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(mp) = fields.get(4) else { continue };
        // Optional fields end with a lone "-", then fstype and source follow.
        let sep = fields.iter().position(|f| *f == "-");
        let (fstype, source) = match sep {
            Some(s) => (
                fields.get(s + 1).copied().unwrap_or(""),
                fields.get(s + 2).copied().unwrap_or(""),
            ),
            None => ("", ""),
        };
        out.push(MountEntry {
            mount_point: unescape(mp),
            fstype: fstype.to_string(),
            source: unescape(source).to_string_lossy().into_owned(),
        });
    }
    Ok(out)
}

/// Is `path` (absolute, canonical) currently a mount point?
pub fn is_mounted(path: &Path) -> Result<bool> {
    Ok(mounts()?.iter().any(|m| m.mount_point == path))
}

/// Mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(mounts()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|mp| mp.starts_with(dir))
        .collect())
}

/// The mount that holds `path` (longest mount point prefix).
pub fn mount_of(path: &Path) -> Result<Option<MountEntry>> {
    Ok(mounts()?
        .into_iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len()))
}

/// Run a helper command quietly; Ok(()) on exit status 0, else its stderr.
fn run_quiet(prog: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    match Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{prog}: {} ({})",
            String::from_utf8_lossy(&o.stderr).trim(),
            o.status
        )),
        Err(e) => Err(format!("{prog}: {e}")),
    }
}

/// Unmount `mnt`, retrying while busy, falling back to fusermount and finally
/// to a lazy unmount. Succeeds once `mnt` is no longer in mountinfo.
pub fn unmount(mnt: &Path) -> Result<()> {
    let m = mnt.as_os_str();
    let mut last_err = String::new();
    for _ in 0..25 {
        if !is_mounted(mnt)? {
            return Ok(());
        }
        if let Err(e) = run_quiet("umount", &[m]) {
            last_err = e;
        }
        if !is_mounted(mnt)? {
            return Ok(());
        }
        sleep(Duration::from_millis(200));
    }
    for prog in ["fusermount3", "fusermount"] {
        if let Err(e) = run_quiet(prog, &["-u".as_ref(), m]) {
            last_err = e;
        }
        if !is_mounted(mnt)? {
            return Ok(());
        }
    }
    eprintln!(
        "mirrorfs-bench: warning: {} is busy ({last_err}); lazy-unmounting it",
        mnt.display()
    );
    if let Err(e) = run_quiet("umount", &["-l".as_ref(), m]) {
        last_err = e;
    }
    if is_mounted(mnt)? {
        bail!("could not unmount {}: {last_err}", mnt.display());
    }
    Ok(())
}

/// Last `n` lines of a log file, formatted for an error message.
pub fn log_tail(log: &Path, n: usize) -> String {
    match fs::read_to_string(log) {
        Ok(text) if !text.trim().is_empty() => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            format!(
                "; last lines of {}:\n    {}",
                log.display(),
                lines[start..].join("\n    ")
            )
        }
        Ok(_) => format!("; {} is empty", log.display()),
        Err(e) => format!("; cannot read {}: {e}", log.display()),
    }
}

/// A child process run in its own process group (so that Ctrl-C reaches only
/// us), with its output in a log file. Dropping it stops it (SIGTERM, then
/// SIGKILL after 30 s); call [`Proc::stop`] to do that with error reporting.
pub struct Proc {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Spawn `BIN ARGS...` with stdout and stderr appended to `log`.
    pub fn spawn(name: &'static str, bin: &Path, args: &[OsString], log: &Path) -> Result<Proc> {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone().context("cannot dup log file")?;
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Keep Ctrl-C away from it: we stop it ourselves, after the workload.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Proc {
            name,
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// `Some(status)` once the process has exited.
    pub fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().context("waitpid failed"),
            None => Ok(None),
        }
    }

    /// SIGTERM, wait (SIGKILL after 30 s); a non-zero exit is an error.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait().context("waitpid failed")?.is_none() {
            let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
            // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let t0 = Instant::now();
            while child.try_wait().context("waitpid failed")?.is_none() {
                if t0.elapsed() > STOP_TIMEOUT {
                    eprintln!(
                        "mirrorfs-bench: warning: {} did not exit within {} s of SIGTERM; killing it",
                        self.name,
                        STOP_TIMEOUT.as_secs()
                    );
                    // Killing fails only if it has exited meanwhile.
                    let _ = child.kill();
                    break;
                }
                sleep(Duration::from_millis(20));
            }
        }
        let status = child.wait().context("waitpid failed")?;
        if !status.success() {
            bail!(
                "{} exited with {status} after SIGTERM{}",
                self.name,
                log_tail(&self.log, 15)
            );
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("mirrorfs-bench: error while stopping {}: {e:#}", self.name);
        }
    }
}

/// A mounted FUSE file system. Dropping it unmounts it (and stops the
/// mirrorfs process); call [`Mount::unmount`] to do that with error reporting.
pub struct Mount {
    name: &'static str,
    mnt: PathBuf,
    proc: Option<Proc>,
    done: bool,
}

impl Mount {
    /// `bindfs [EXTRA...] SRC MNT`; bindfs daemonizes once the mount is set up.
    pub fn bindfs(src: &Path, mnt: &Path, extra: &[String]) -> Result<Mount> {
        let out = Command::new("bindfs")
            .args(extra)
            .arg(src)
            .arg(mnt)
            .stdin(Stdio::null())
            .output()
            .context("cannot run bindfs (install it with `apt-get install -y bindfs`)")?;
        // From here on, whatever happens, the guard unmounts.
        let guard = Mount {
            name: "bindfs",
            mnt: mnt.to_path_buf(),
            proc: None,
            done: false,
        };
        if !out.status.success() {
            bail!(
                "bindfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let t0 = Instant::now();
        while !is_mounted(mnt)? {
            if t0.elapsed() > MOUNT_TIMEOUT {
                bail!(
                    "{} did not show up in /proc/self/mountinfo within {} s after bindfs returned",
                    mnt.display(),
                    MOUNT_TIMEOUT.as_secs()
                );
            }
            sleep(Duration::from_millis(10));
        }
        Ok(guard)
    }

    /// Spawn `BIN mount BACKING MNT --mirror MIRROR [EXTRA...]` in the
    /// foreground (own process group, output to `log`) and wait for the mount.
    /// `mirror` is a directory or `mirror://HOST:PORT`.
    pub fn mirrorfs(
        bin: &Path,
        backing: &Path,
        mnt: &Path,
        mirror: &OsStr,
        extra: &[String],
        log: &Path,
    ) -> Result<Mount> {
        let mut args: Vec<OsString> = vec!["--mirror".into(), mirror.into()];
        args.extend(extra.iter().map(OsString::from));
        Mount::mirrorfs_with(bin, backing, mnt, &args, log)
    }

    /// `BIN mount BACKING MNT ARGS...` (the mirrors among `args`), as [`Mount::mirrorfs`].
    pub fn mirrorfs_with(
        bin: &Path,
        backing: &Path,
        mnt: &Path,
        more: &[OsString],
        log: &Path,
    ) -> Result<Mount> {
        let mut args: Vec<OsString> = vec!["mount".into(), backing.into(), mnt.into()];
        args.extend(more.iter().cloned());
        let proc = Proc::spawn("mirrorfs", bin, &args, log)?;
        let mut guard = Mount {
            name: "mirrorfs",
            mnt: mnt.to_path_buf(),
            proc: Some(proc),
            done: false,
        };
        let t0 = Instant::now();
        loop {
            crate::check_interrupted()?;
            if is_mounted(mnt)? {
                return Ok(guard);
            }
            if let Some(status) = guard.try_exit_status()? {
                bail!(
                    "{} exited with {status} before {} was mounted{}",
                    bin.display(),
                    mnt.display(),
                    log_tail(log, 15)
                );
            }
            if t0.elapsed() > MOUNT_TIMEOUT {
                bail!(
                    "{} did not show up in /proc/self/mountinfo within {} s of starting {}{}",
                    mnt.display(),
                    MOUNT_TIMEOUT.as_secs(),
                    bin.display(),
                    log_tail(log, 15)
                );
            }
            sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        match self.proc.as_mut() {
            Some(p) => p.try_exit_status(),
            None => Ok(None),
        }
    }

    /// Error out if the file system is gone (process exited or unmounted).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.try_exit_status()? {
            let tail = self
                .proc
                .as_ref()
                .map(|p| log_tail(p.log(), 15))
                .unwrap_or_default();
            bail!("{} exited unexpectedly with {status}{tail}", self.name);
        }
        if !is_mounted(&self.mnt)? {
            bail!("{} is no longer mounted", self.mnt.display());
        }
        Ok(())
    }

    /// Unmount and report problems (a non-zero exit of mirrorfs is an error).
    pub fn unmount(mut self) -> Result<()> {
        self.done = true;
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let status_err = match self.proc.take() {
            Some(mut p) => p.stop().err(),
            None => None,
        };
        // mirrorfs unmounts itself on SIGTERM; bindfs needs an explicit umount.
        // Either way, make sure nothing is left mounted.
        if is_mounted(&self.mnt)? {
            if self.name == "mirrorfs" {
                eprintln!(
                    "mirrorfs-bench: warning: {} still mounted after mirrorfs exited; unmounting",
                    self.mnt.display()
                );
            }
            unmount(&self.mnt)?;
        }
        match status_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            if let Err(e) = self.teardown() {
                eprintln!(
                    "mirrorfs-bench: error while cleaning up {}: {e:#}",
                    self.name
                );
            }
        }
    }
}

/// Removes a directory tree on drop, but never descends into a mount.
pub struct DirGuard {
    path: PathBuf,
}

impl DirGuard {
    pub fn new(path: PathBuf) -> DirGuard {
        DirGuard { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        match mounts_under(&self.path) {
            Ok(m) if m.is_empty() => {
                if let Err(e) = fs::remove_dir_all(&self.path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        eprintln!(
                            "mirrorfs-bench: warning: cannot remove {}: {e}",
                            self.path.display()
                        );
                    }
                }
            }
            Ok(m) => eprintln!(
                "mirrorfs-bench: NOT removing {} because something is still mounted below it: {:?}",
                self.path.display(),
                m
            ),
            Err(e) => eprintln!(
                "mirrorfs-bench: NOT removing {}: {e:#}",
                self.path.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_octal() {
        assert_eq!(unescape(r"/a\040b\134c"), PathBuf::from("/a b\\c"));
        assert_eq!(unescape(r"/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape(r"/trail\04"), PathBuf::from(r"/trail\04"));
    }

    #[test]
    fn root_is_mounted() -> Result<()> {
        assert!(is_mounted(Path::new("/"))?);
        Ok(())
    }
}
