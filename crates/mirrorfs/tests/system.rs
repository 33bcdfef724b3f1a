//! mirrorfs as a Linux system sees it: mounted by mount(8) through the mount helper
//! (`mount -t fuse.mirrorfs`, an fstab line), shown in /proc/mounts as `fuse.mirrorfs` with the
//! backing directory as its source, ended by `umount`; readiness, watchdog and stop reported
//! to systemd (sd_notify); the systemd units pass `systemd-analyze verify`; completions and
//! man pages made from the command line.
//!
//! mount(8) finds helpers in /sbin only: the tests that go through it link
//! /sbin/mount.fuse.mirrorfs to the binary under test for their duration (one at a time) and
//! put back what was there.

mod common;

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{assert_trees_equal, is_mounted, lazy_unmount, wait_until, Layout, BIN};

const HELPER: &str = "/sbin/mount.fuse.mirrorfs";

/// Serialises the tests that own /sbin/mount.fuse.mirrorfs.
static SBIN: Mutex<()> = Mutex::new(());

/// Links /sbin/mount.fuse.mirrorfs to the binary under test; puts back what was there on drop.
struct HelperLink {
    previous: Option<PathBuf>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl HelperLink {
    fn install() -> HelperLink {
        let lock = SBIN.lock().unwrap_or_else(|p| p.into_inner());
        let previous = fs::read_link(HELPER).ok();
        let _ = fs::remove_file(HELPER);
        std::os::unix::fs::symlink(BIN, HELPER).expect("link /sbin/mount.fuse.mirrorfs");
        HelperLink {
            previous,
            _lock: lock,
        }
    }
}

impl Drop for HelperLink {
    fn drop(&mut self) {
        let _ = fs::remove_file(HELPER);
        if let Some(p) = &self.previous {
            let _ = std::os::unix::fs::symlink(p, HELPER);
        }
    }
}

/// The (type, source) of the mount at `mnt` in /proc/mounts.
fn proc_mounts_entry(mnt: &Path) -> Option<(String, String)> {
    let text = fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    text.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(1).copied() == mnt.to_str()).then(|| (f[2].to_string(), f[0].to_string()))
    })
}

/// The pids of the `mirrorfs mount BACKING ...` daemons running for `backing`.
fn daemons_of(backing: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.len() > 2
            && args[1] == b"mount"
            && args[2] == backing.as_os_str().as_encoded_bytes()
        {
            out.push(pid);
        }
    }
    out
}

/// Unmounts at the end of a test that failed half way.
struct Cleanup<'a>(&'a Layout);
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if is_mounted(&self.0.mnt) {
            let _ = Command::new("umount").arg(&self.0.mnt).status();
            lazy_unmount(&self.0.mnt);
        }
        for pid in daemons_of(&self.0.backing) {
            // SAFETY: signalling a daemon this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

fn write_some(mnt: &Path) {
    fs::write(mnt.join("a.txt"), b"hello\n").expect("write a.txt");
    fs::create_dir(mnt.join("d")).expect("mkdir d");
    fs::write(mnt.join("d/b.bin"), vec![7u8; 300_000]).expect("write d/b.bin");
    fs::rename(mnt.join("a.txt"), mnt.join("d/a.txt")).expect("rename");
}

/// `umount MNT` ends the daemon (the helper's child), which leaves the mirror equal to the
/// backing directory.
fn umount_and_check(l: &Layout) {
    let pids = daemons_of(&l.backing);
    assert_eq!(pids.len(), 1, "one daemon serves the mount: {pids:?}");
    let st = Command::new("umount")
        .arg(&l.mnt)
        .status()
        .expect("run umount");
    assert!(st.success(), "umount failed");
    assert!(
        wait_until(Duration::from_secs(60), || daemons_of(&l.backing)
            .is_empty()),
        "the daemon did not exit after umount"
    );
    assert!(!is_mounted(&l.mnt));
    assert_trees_equal(&l.backing, l.mirror());
}

#[test]
fn mount_t_fuse_mirrorfs_mounts_shows_type_and_source_and_umount_ends_it() {
    let _h = HelperLink::install();
    let l = Layout::new("sys-mount-t", 1);
    let _c = Cleanup(&l);
    let t0 = Instant::now();
    let out = Command::new("mount")
        .args(["-t", "fuse.mirrorfs"])
        .arg(&l.backing)
        .arg(&l.mnt)
        .arg("-o")
        .arg(format!(
            "mirror={},ack=sync,noatime,state={}/state",
            l.mirror().display(),
            l.base.display()
        ))
        .stdin(Stdio::null())
        .output()
        .expect("run mount");
    assert!(
        out.status.success(),
        "mount -t fuse.mirrorfs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The helper returns once the file system is mounted, leaving the daemon behind.
    assert!(is_mounted(&l.mnt), "mounted when mount(8) returns");
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert_eq!(
        proc_mounts_entry(&l.mnt),
        Some(("fuse.mirrorfs".to_string(), l.backing.display().to_string())),
        "/proc/mounts shows type fuse.mirrorfs and the backing directory as the source"
    );
    let opts = fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    let line = opts
        .lines()
        .find(|x| x.contains(&format!(" {} ", l.mnt.display())))
        .unwrap_or_default();
    assert!(
        line.contains("noatime"),
        "noatime reached the kernel: {line}"
    );
    write_some(&l.mnt);
    umount_and_check(&l);
}

#[test]
fn fstab_line_with_nofail_netdev_and_systemd_options_mounts() {
    let _h = HelperLink::install();
    let l = Layout::new("sys-fstab", 1);
    let _c = Cleanup(&l);
    let fstab = l.base.join("fstab");
    fs::write(
        &fstab,
        format!(
            "# a test fstab\n{} {} fuse.mirrorfs mirror={},ack=durable,nofail,_netdev,x-systemd.automount,x-systemd.requires=network-online.target,noauto,defaults,journal_max_mib=256,state={}/state 0 0\n",
            l.backing.display(),
            l.mnt.display(),
            l.mirror().display(),
            l.base.display()
        ),
    )
    .expect("write fstab");
    let out = Command::new("mount")
        .arg("-T")
        .arg(&fstab)
        .arg(&l.mnt)
        .stdin(Stdio::null())
        .output()
        .expect("run mount");
    assert!(
        out.status.success(),
        "mount via fstab failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        proc_mounts_entry(&l.mnt).map(|e| e.0),
        Some("fuse.mirrorfs".to_string())
    );
    write_some(&l.mnt);
    umount_and_check(&l);
}

/// The helper under its own name (a symlink anywhere): an unknown option and a missing mirror
/// are refused with errors that name them; a mount that cannot start fails with mount(8)'s
/// code 32 and leaves nothing mounted.
#[test]
fn helper_refuses_unknown_options_and_reports_failures() {
    let l = Layout::new("sys-helper-err", 1);
    let _c = Cleanup(&l);
    let helper = l.base.join("mount.fuse.mirrorfs");
    std::os::unix::fs::symlink(BIN, &helper).expect("symlink the helper");
    let run = |opts: &str| {
        Command::new(&helper)
            .arg(&l.backing)
            .arg(&l.mnt)
            .args(["-o", opts])
            .stdin(Stdio::null())
            .output()
            .expect("run the helper")
    };
    let m = l.mirror().display().to_string();
    let out = run(&format!("mirror={m},frobnicate=3"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("`frobnicate=3`"),
        "the error names the option: {err}"
    );
    let out = run("ack=sync,nofail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("mirror="),
        "the error says to add mirror=: {err}"
    );
    // -f (fake): everything checked, nothing mounted.
    let st = Command::new(&helper)
        .arg(&l.backing)
        .arg(&l.mnt)
        .args(["-f", "-o", &format!("mirror={m}")])
        .status()
        .expect("run the helper");
    assert!(st.success());
    assert!(!is_mounted(&l.mnt));
    // A site of a writable pair names its peer instead of a mirror.
    let st = Command::new(&helper)
        .arg(&l.backing)
        .arg(&l.mnt)
        .args([
            "-f",
            "-o",
            "peer=mirror://127.0.0.1:7071,receive=127.0.0.1:7072",
        ])
        .status()
        .expect("run the helper");
    assert!(st.success(), "peer= stands in for mirror=");
    assert!(!is_mounted(&l.mnt));
    // A mirror that does not exist: the daemon fails before mounting.
    let out = run(&format!("mirror={}/missing", l.base.display()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(32), "{err}");
    assert!(
        err.contains("missing"),
        "the daemon's error is shown: {err}"
    );
    assert!(!is_mounted(&l.mnt));
    assert!(daemons_of(&l.backing).is_empty());
}

/// `mirrorfs mount` under systemd (`Type=notify`): READY=1 once mounted, WATCHDOG=1 pings
/// when WATCHDOG_USEC is set, STOPPING=1 at SIGTERM.
#[test]
fn mount_notifies_systemd_ready_watchdog_stopping() {
    let l = Layout::new("sys-notify", 1);
    let _c = Cleanup(&l);
    let sock_path = l.base.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set a timeout");
    let mut child = Command::new(BIN)
        .arg("mount")
        .arg(&l.backing)
        .arg(&l.mnt)
        .arg("--mirror")
        .arg(l.mirror())
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mirrorfs mount");
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(first.lines().any(|x| x == "READY=1"), "{first}");
    assert!(is_mounted(&l.mnt), "READY=1 comes once mounted");
    let second = recv();
    assert_eq!(second.trim(), "WATCHDOG=1");
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut saw_stopping = false;
    for _ in 0..20 {
        if recv().lines().any(|x| x == "STOPPING=1") {
            saw_stopping = true;
            break;
        }
    }
    assert!(saw_stopping, "STOPPING=1 at SIGTERM");
    assert!(child.wait().expect("wait").success());
    assert!(!is_mounted(&l.mnt));
}

#[test]
fn completions_list_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN)
            .args(["completion", shell])
            .output()
            .expect("run mirrorfs completion");
        assert!(out.status.success(), "completion {shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        for sub in ["mount", "serve", "status", "promote", "completion", "man"] {
            assert!(text.contains(sub), "{shell} completion lacks {sub}");
        }
        assert!(
            text.contains("--mirror"),
            "{shell} completion lacks --mirror"
        );
    }
}

#[test]
fn man_pages_one_per_subcommand() {
    let t = common::temp_base("sys-man");
    let dir = t.path().join("man");
    let out = Command::new(BIN)
        .arg("man")
        .arg(&dir)
        .output()
        .expect("run mirrorfs man");
    assert!(out.status.success());
    for page in [
        "mirrorfs",
        "mirrorfs-mount",
        "mirrorfs-serve",
        "mirrorfs-status",
        "mirrorfs-promote",
        "mirrorfs-conflicts",
        "mirrorfs-completion",
        "mirrorfs-man",
    ] {
        let p = dir.join(format!("{page}.1"));
        let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page} is roff"
        );
        assert!(text.contains(&format!(".TH {page}")), "{page}: title");
    }
    let mount = fs::read_to_string(dir.join("mirrorfs-mount.1")).expect("read mount page");
    assert!(
        mount.contains("mirror"),
        "the mount page documents --mirror"
    );
    assert!(!dir.join("mirrorfs-help.1").exists());
}

/// The units pass `systemd-analyze verify` (with ExecStart pointing at the binary under test;
/// Documentation=man: pages are checked when man(1) is there, with the generated pages).
#[test]
fn systemd_units_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed: skipping");
        return;
    }
    let t = common::temp_base("sys-units");
    let dir = t.path();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/systemd");
    let man = dir.join("man/man1");
    let st = Command::new(BIN)
        .arg("man")
        .arg(&man)
        .stdout(Stdio::null())
        .status()
        .expect("run mirrorfs man");
    assert!(st.success());
    let mut paths = Vec::new();
    // (template, instance, a daemon: notify and restart); the scrub's timer with its service.
    for (unit, instance, daemon) in [
        ("mirrorfs@.service", "mirrorfs@data.service", true),
        (
            "mirrorfs-serve@.service",
            "mirrorfs-serve@srv-mirror.service",
            true,
        ),
        (
            "mirrorfs-verify@.service",
            "mirrorfs-verify@mnt-data.service",
            false,
        ),
        (
            "mirrorfs-verify@.timer",
            "mirrorfs-verify@mnt-data.timer",
            false,
        ),
    ] {
        let text = fs::read_to_string(units.join(unit)).expect("read the unit");
        if daemon {
            assert!(text.contains("Type=notify") && text.contains("Restart=on-failure"));
        }
        let p = dir.join(instance);
        fs::write(&p, text.replace("/usr/bin/mirrorfs", BIN)).expect("write the unit");
        paths.push(p);
    }
    let have_man = Command::new("man").arg("--version").output().is_ok();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(if have_man { "--man=yes" } else { "--man=no" })
        .args(&paths)
        .env("MANPATH", dir.join("man"))
        .output()
        .expect("run systemd-analyze verify");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    assert!(
        !err.lines().any(|x| x.contains("mirrorfs")),
        "warnings about the units: {err}"
    );
}
