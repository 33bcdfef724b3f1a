//! The command line: refusals (clear message, non-zero exit, nothing mounted), help texts,
//! `status --json` on a live mount, clean unmount on SIGINT and SIGTERM, read-only mounts, the
//! demo, and `conflicts` (listing and resolving through the mount).

mod common;

use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::sys;
use common::{
    assert_trees_equal, is_mounted, mkdir755, run_expecting_failure, wait_until, Layout, Mount, BIN,
};

const CATCH_UP: Duration = Duration::from_secs(60);

/// The tests of this file run one at a time (see `semantics.rs`): a process spawned by one test
/// while another has files open on its mount can make that mount's unmount fail with EBUSY.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A layout with one mirror, mounted with its state directory outside the backing directory
/// (so that the backing and mirror trees compare equal, root link count included).
fn mount(tag: &str, extra: &[&str]) -> Mount {
    let layout = Layout::new(tag, 1);
    let state = layout.base.join("state");
    let state = state.to_str().expect("UTF-8 temp path").to_string();
    let mut args: Vec<&str> = vec!["--state", &state];
    args.extend_from_slice(extra);
    Mount::start(layout, &args)
}

fn os(p: &Path) -> OsString {
    p.as_os_str().to_owned()
}

/// `mirrorfs mount BACKING MNT --mirror M... EXTRA` must fail; returns its stderr, after
/// checking the mountpoint was left alone.
fn refused(backing: &Path, mnt: &Path, mirrors: &[&Path], extra: &[&str]) -> String {
    let mut args: Vec<OsString> = vec!["mount".into(), os(backing), os(mnt)];
    for m in mirrors {
        args.push("--mirror".into());
        args.push(os(m));
    }
    args.extend(extra.iter().map(OsString::from));
    let refs: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    let out = run_expecting_failure(&refs, mnt.exists().then_some(mnt));
    assert_eq!(out.status.code(), Some(1), "exit status of a refusal");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("mirrorfs: error:"),
        "refusal without the error prefix:\n{err}"
    );
    if mnt.exists() {
        assert!(
            !is_mounted(mnt),
            "{} mounted after a refusal",
            mnt.display()
        );
    }
    err
}

fn assert_mentions(err: &str, words: &[&str]) {
    for w in words {
        assert!(
            err.contains(w),
            "the message does not mention {w:?}:\n{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// refusals

#[test]
fn refuses_missing_mountpoint_and_backing() {
    let _serial = serial();
    let l = Layout::new("cli-missing", 1);
    let nowhere = l.base.join("no-such-mountpoint");
    let err = refused(&l.backing, &nowhere, &[l.mirror()], &[]);
    assert_mentions(
        &err,
        &["mountpoint", "does not exist", "no-such-mountpoint"],
    );

    let nob = l.base.join("no-such-backing");
    let err = refused(&nob, &l.mnt, &[l.mirror()], &[]);
    assert_mentions(
        &err,
        &["backing directory", "does not exist", "no-such-backing"],
    );

    let nom = l.base.join("no-such-mirror");
    let err = refused(&l.backing, &l.mnt, &[&nom], &[]);
    assert_mentions(&err, &["mirror", "does not exist", "no-such-mirror"]);

    // A file is not a directory.
    let file = l.base.join("a-file");
    fs::write(&file, b"x").expect("write");
    let err = refused(&l.backing, &file, &[l.mirror()], &[]);
    assert_mentions(&err, &["not a directory"]);
    // Nothing was created by the refusals.
    assert!(!nowhere.exists() && !nob.exists() && !nom.exists());
}

#[test]
fn refuses_overlapping_directories() {
    let _serial = serial();
    let l = Layout::new("cli-overlap", 1);
    // Mirror equal to the backing directory.
    let err = refused(&l.backing, &l.mnt, &[&l.backing], &[]);
    assert_mentions(&err, &["overlaps the backing directory"]);
    // Mirror inside the backing directory.
    let inside = l.backing.join("sub");
    mkdir755(&inside);
    let err = refused(&l.backing, &l.mnt, &[&inside], &[]);
    assert_mentions(&err, &["overlaps the backing directory", "sub"]);
    // Backing directory inside the mirror.
    let outer = l.base.join("outer");
    let inner_backing = outer.join("data");
    mkdir755(&inner_backing);
    let err = refused(&inner_backing, &l.mnt, &[&outer], &[]);
    assert_mentions(&err, &["overlaps the backing directory"]);
    // Mountpoint equal to the backing directory.
    let err = refused(&l.backing, &l.backing, &[l.mirror()], &[]);
    assert_mentions(&err, &["same"]);
    // Mirror inside the mountpoint.
    let under_mnt = l.mnt.join("m");
    mkdir755(&under_mnt);
    let err = refused(&l.backing, &l.mnt, &[&under_mnt], &[]);
    assert_mentions(&err, &["inside the mountpoint"]);
    fs::remove_dir(&under_mnt).expect("rmdir");
    // The same mirror twice.
    let err = refused(&l.backing, &l.mnt, &[l.mirror(), l.mirror()], &[]);
    assert_mentions(&err, &["given twice"]);
    // Nothing was written into the backing directory's tree by the mirror checks.
    assert!(!inside.join(".mirrorfs-probe").exists());
}

/// Undoes `chattr +i` (and removes a bind mount) even if the test fails.
struct Restore(Vec<Vec<String>>);

impl Drop for Restore {
    fn drop(&mut self) {
        for cmd in &self.0 {
            let _ = Command::new(&cmd[0])
                .args(&cmd[1..])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn run(cmd: &[&str]) -> bool {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn refuses_a_mirror_that_is_not_writable() {
    let _serial = serial();
    let l = Layout::new("cli-rofs", 2);
    // 1. An immutable directory (chattr +i): even root cannot create entries in it.
    let imm = l.mirrors[0].to_str().expect("utf-8").to_string();
    let _undo_imm = Restore(vec![vec!["chattr".into(), "-i".into(), imm.clone()]]);
    assert!(run(&["chattr", "+i", &imm]), "chattr +i {imm}");
    assert_eq!(
        sys::mkdir(&l.mirrors[0].join("probe"), 0o755),
        Err(libc::EPERM),
        "an immutable directory must refuse root"
    );
    let err = refused(&l.backing, &l.mnt, &[&l.mirrors[0]], &[]);
    assert_mentions(&err, &["is not writable", &imm]);

    // 2. A read-only bind mount.
    let ro = l.mirrors[1].to_str().expect("utf-8").to_string();
    let _undo_ro = Restore(vec![
        vec!["umount".into(), ro.clone()],
        vec!["umount".into(), "-l".into(), ro.clone()],
    ]);
    assert!(run(&["mount", "--bind", &ro, &ro]), "bind mount");
    assert!(
        run(&["mount", "-o", "remount,bind,ro", &ro]),
        "remount read-only"
    );
    assert_eq!(
        sys::mkdir(&l.mirrors[1].join("probe"), 0o755),
        Err(libc::EROFS),
        "read-only bind mount must refuse root"
    );
    let err = refused(&l.backing, &l.mnt, &[&l.mirrors[1]], &[]);
    assert_mentions(&err, &["is not writable", &ro]);
}

#[test]
fn refuses_a_second_instance_on_the_same_backing_directory() {
    let _serial = serial();
    // Default state directory (BACKING/.mirrorfs), where the instance lock lives.
    let mut m = Mount::start(Layout::new("cli-twice", 1), &[]);
    let mnt2 = m.layout.base.join("mnt2");
    mkdir755(&mnt2);
    let other_mirror = m.layout.base.join("other-mirror");
    mkdir755(&other_mirror);
    let args: Vec<OsString> = vec![
        "mount".into(),
        os(m.backing()),
        os(&mnt2),
        "--mirror".into(),
        os(&other_mirror),
    ];
    let refs: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    let out = run_expecting_failure(&refs, Some(&mnt2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_mentions(
        &err,
        &[
            "another mirrorfs",
            &format!("pid {}", m.pid()),
            "already serving",
        ],
    );
    assert!(!is_mounted(&mnt2));
    assert_eq!(
        fs::read_dir(&other_mirror).expect("readdir").count(),
        0,
        "the refused instance touched its mirror"
    );
    // The first instance is unaffected.
    fs::write(m.p("still-works"), b"yes").expect("write through the first mount");
    assert_eq!(fs::read(m.p("still-works")).expect("read"), b"yes");
    assert!(wait_until(CATCH_UP, || m
        .mirror()
        .join("still-works")
        .exists()));
    m.unmount();
}

/// Issue 6, finding 5: the lock is on the backing directory itself, so a second mount with
/// another `--state` is refused too (it used to run, and mirror the first mount's state).
#[test]
fn refuses_a_second_instance_with_another_state_directory() {
    let _serial = serial();
    let mut m = mount("cli-twice-state", &[]);
    let mnt2 = m.layout.base.join("mnt2");
    let other_mirror = m.layout.base.join("other-mirror");
    let state2 = m.layout.base.join("state2");
    for d in [&mnt2, &other_mirror] {
        mkdir755(d);
    }
    let st2 = state2.to_str().expect("utf-8").to_string();
    let err = refused(m.backing(), &mnt2, &[&other_mirror], &["--state", &st2]);
    assert_mentions(
        &err,
        &[
            "another mirrorfs",
            &format!("pid {}", m.pid()),
            "already serving",
        ],
    );
    assert_eq!(
        fs::read_dir(&other_mirror).expect("readdir").count(),
        0,
        "the refused instance touched its mirror"
    );
    // A local mirror in use by one mount cannot be another mount's mirror or backing.
    let backing2 = m.layout.base.join("backing2");
    mkdir755(&backing2);
    let err = refused(&backing2, &mnt2, &[m.mirror()], &["--state", &st2]);
    assert_mentions(
        &err,
        &["in use by another mirrorfs", &format!("pid {}", m.pid())],
    );
    let err = refused(m.mirror(), &mnt2, &[&other_mirror], &["--state", &st2]);
    assert_mentions(&err, &["another mirrorfs", &format!("pid {}", m.pid())]);
    fs::write(m.p("still-works"), b"yes").expect("write through the first mount");
    m.wait_mirror_equal(CATCH_UP);
    m.unmount();
}

#[test]
fn non_empty_new_mirror_needs_force_resync() {
    let _serial = serial();
    let l = Layout::new("cli-nonempty", 1);
    fs::write(l.backing.join("kept"), b"from backing").expect("write");
    fs::write(l.mirror().join("stale"), b"someone else's").expect("write");
    fs::create_dir(l.mirror().join("stale-dir")).expect("mkdir");
    let state = l.base.join("state");
    let st = state.to_str().expect("utf-8");
    let err = refused(&l.backing, &l.mnt, &[l.mirror()], &["--state", st]);
    assert_mentions(&err, &["not empty", "--force-resync"]);
    assert_eq!(
        fs::read(l.mirror().join("stale")).expect("stale file"),
        b"someone else's",
        "a refused mount must not touch the mirror"
    );
    // With --force-resync the mirror's contents are replaced by a copy of the backing tree.
    let mut m = Mount::start(l, &["--state", st, "--force-resync"]);
    let ok = wait_until(CATCH_UP, || {
        m.status()
            .is_some_and(|s| s["mirrors"][0]["state"] == "live")
    });
    assert!(ok, "mirror never became live:\n{}", m.log());
    assert!(!m.mirror().join("stale").exists(), "stale file survived");
    assert!(!m.mirror().join("stale-dir").exists(), "stale dir survived");
    m.wait_mirror_equal(CATCH_UP);
    m.unmount();
    assert_trees_equal(m.backing(), m.mirror());
}

// ---------------------------------------------------------------------------------------------
// help, status

fn output(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run mirrorfs");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[test]
fn help_texts_mention_the_options() {
    let _serial = serial();
    let (ok, out, _) = output(&["--help"]);
    assert!(ok, "mirrorfs --help failed");
    assert_mentions(&out, &["mount", "status", "demo", "mirror"]);
    let (ok, out, _) = output(&["mount", "--help"]);
    assert!(ok, "mirrorfs mount --help failed");
    assert_mentions(
        &out,
        &[
            "BACKING",
            "MOUNTPOINT",
            "--mirror",
            "--ack",
            "async",
            "sync",
            "--state",
            "-o",
            "allow_other",
            "--journal-max-mib",
            "--force-resync",
            "--threads",
            "--transport",
            "udp",
            "auto",
            "--udp-rate-mbit",
        ],
    );
    let (ok, out, _) = output(&["status", "--help"]);
    assert!(ok, "mirrorfs status --help failed");
    assert_mentions(&out, &["--json", "MOUNTPOINT"]);
    // A usage error is reported, with a non-zero exit.
    let (ok, _, err) = output(&["mount"]);
    assert!(!ok, "mount without arguments succeeded");
    assert_mentions(&err, &["required"]);
    let (ok, _, err) = output(&["no-such-command"]);
    assert!(!ok);
    assert_mentions(&err, &["no-such-command"]);
}

#[test]
fn status_json_on_a_live_mount() {
    let _serial = serial();
    let mut m = mount("cli-status", &[]);
    for i in 0..20 {
        fs::write(m.p(format!("f{i}")), vec![b'x'; 10_000]).expect("write");
    }
    // Eventually live with no lag.
    let mut last = None;
    let ok = wait_until(CATCH_UP, || {
        last = m.status();
        last.as_ref()
            .is_some_and(|s| s["mirrors"][0]["state"] == "live" && s["mirrors"][0]["lag_ops"] == 0)
    });
    assert!(
        ok,
        "status never showed a live mirror without lag: {last:?}"
    );
    let s = last.expect("status");
    assert_eq!(s["mountpoint"], m.mnt().to_str().expect("utf-8"));
    assert_eq!(s["pid"].as_u64(), Some(m.pid() as u64));
    assert_eq!(s["ack"], "async");
    let journal_bytes = s["journal_bytes"].as_u64().expect("journal_bytes");
    assert!(
        journal_bytes >= 200_000,
        "20 writes of 10 KB are in the journal: {journal_bytes}"
    );
    assert!(s["journal_segments"].as_u64().expect("journal_segments") >= 1);
    let next = s["journal_next_seq"].as_u64().expect("journal_next_seq");
    let mirrors = s["mirrors"].as_array().expect("mirrors array");
    assert_eq!(mirrors.len(), 1);
    let mi = &mirrors[0];
    assert_eq!(mi["path"], m.mirror().to_str().expect("utf-8"));
    let applied = mi["applied_seq"].as_u64().expect("applied_seq");
    assert_eq!(applied, next - 1, "applied position after catching up");
    assert!(applied >= 40, "at least create+write per file: {applied}");
    assert_eq!(mi["lag_ops"].as_u64(), Some(0));
    assert_eq!(mi["lag_bytes"].as_u64(), Some(0));
    let lag_s = mi["lag_seconds"].as_f64().expect("lag_seconds");
    assert!((0.0..1.0).contains(&lag_s), "lag_seconds {lag_s}");
    assert!(mi["durable_seq"].as_u64().is_some(), "durable_seq");
    // The text form shows the same things.
    let (ok, out, err) = output(&["status", m.mnt().to_str().expect("utf-8")]);
    assert!(ok, "status failed: {err}");
    assert_mentions(&out, &["journal", "mirror", "live", "lag"]);
    // Without a mountpoint: every mount (this one among them).
    let (ok, out, _) = output(&["status", "--json"]);
    assert!(ok);
    assert!(out.contains(m.mnt().to_str().expect("utf-8")));
    m.unmount();
    // After the unmount: a clear refusal.
    let (ok, _, err) = output(&["status", m.mnt().to_str().expect("utf-8"), "--json"]);
    assert!(!ok, "status of an unmounted directory succeeded");
    assert_mentions(&err, &["no running mirrorfs mount"]);
}

// ---------------------------------------------------------------------------------------------
// signals, read-only, demo

/// Sends `sig` to the mount's process and waits until it has exited (a zombie: the guard reaps
/// it and checks its exit status).
/// Issue 6, finding 11: `status.json` was world-writable and its age never checked (a SIGSTOPped
/// mount still showed `live`). State is owner-only; status flags a mount that stopped answering.
#[test]
fn status_is_owner_only_and_flags_a_stopped_mount() {
    use std::os::unix::fs::PermissionsExt;
    let _serial = serial();
    let mut m = mount("cli-status-stale", &[]);
    fs::write(m.p("f"), b"x").expect("write");
    let state = m.layout.base.join("state");
    assert!(wait_until(CATCH_UP, || m
        .status()
        .is_some_and(|s| s["answering"] == true)));
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700, "state directory");
    assert_eq!(mode(&state.join("status.json")), 0o600, "status.json");
    for e in fs::read_dir("/run/mirrorfs").expect("/run/mirrorfs") {
        let p = e.expect("entry").path();
        assert_eq!(mode(&p) & 0o022, 0, "{} is writable by others", p.display());
    }
    // SAFETY: signals to the pid of a child the guard owns.
    unsafe { libc::kill(m.pid() as i32, libc::SIGSTOP) };
    let mut last = None;
    let flagged = wait_until(Duration::from_secs(10), || {
        last = m.status();
        last.as_ref().is_some_and(|s| s["answering"] == false)
    });
    let (_, text, _) = output(&["status", m.mnt().to_str().expect("utf-8")]);
    // SAFETY: as above.
    unsafe { libc::kill(m.pid() as i32, libc::SIGCONT) };
    assert!(flagged, "a stopped mount still looks healthy: {last:?}");
    let s = last.expect("status");
    assert!(
        s["not_answering"]
            .as_str()
            .is_some_and(|w| w.contains("stopped")),
        "{s}"
    );
    assert!(s["status_age_seconds"].as_f64().is_some(), "{s}");
    assert_mentions(&text, &["NOT ANSWERING", "stopped", "kill -CONT"]);
    assert!(
        wait_until(CATCH_UP, || m
            .status()
            .is_some_and(|s| s["answering"] == true)),
        "the mount answers again after SIGCONT"
    );
    m.unmount();
}

/// Issue 6, finding 15: the dead mount a `kill -9` leaves behind made the next mount fail with
/// "mountpoint … is not a directory". A dead mount of ours is detached, with a warning.
#[test]
fn a_dead_mount_left_by_kill9_is_cleared_at_the_next_mount() {
    let _serial = serial();
    let mut m = mount("cli-dead-mount", &[]);
    fs::write(m.p("before"), b"1").expect("write");
    m.kill9_leaving_the_mount();
    let e = fs::metadata(m.mnt()).expect_err("a dead mount cannot be stat'ed");
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    m.remount();
    // The dead mount still counts as mounted for the guard: wait for the new process's status.
    let pid = m.pid() as u64;
    assert!(
        wait_until(CATCH_UP, || m
            .status()
            .is_some_and(|s| s["pid"].as_u64() == Some(pid))
            && fs::metadata(m.mnt()).is_ok_and(|md| {
                use std::os::unix::fs::MetadataExt;
                // A mount of its own, not the bare directory under the detached one.
                md.dev() != fs::metadata(&m.layout.base).expect("base").dev()
            })),
        "the new mount never came up:\n{}",
        m.log()
    );
    fs::write(m.p("after"), b"2").expect("write through the new mount");
    assert_eq!(fs::read(m.p("before")).expect("read"), b"1");
    assert_mentions(
        &m.log(),
        &["left mounted by a mirrorfs that died", "detaching"],
    );
    m.wait_mirror_equal(CATCH_UP);
    m.unmount();
}

/// Issue 6, finding 15: `mirrorfs status | head -1` panicked on the broken pipe.
#[test]
fn status_into_a_closed_pipe_does_not_panic() {
    use std::os::fd::FromRawFd;
    let _serial = serial();
    let mut m = mount("cli-status-pipe", &[]);
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) into a two-element array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: both descriptors were just created and are owned here alone.
    let (reader, writer) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    drop(reader);
    let o = Command::new(BIN)
        .args(["status", m.mnt().to_str().expect("utf-8")])
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run mirrorfs status");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "status panicked:\n{err}");
    use std::os::unix::process::ExitStatusExt;
    assert!(
        o.status.success() || o.status.signal() == Some(libc::SIGPIPE),
        "status into a closed pipe: {:?}\n{err}",
        o.status
    );
    m.unmount();
}

fn signal_and_wait_exit(m: &Mount, sig: i32) {
    let pid = m.pid();
    // SAFETY: kill(2) on our own child's pid (not reaped yet, so the pid is still ours).
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0);
    let stat = PathBuf::from(format!("/proc/{pid}/stat"));
    let exited = wait_until(Duration::from_secs(90), || {
        fs::read_to_string(&stat)
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    });
    assert!(exited, "mirrorfs did not exit after signal {sig}");
}

fn signal_unmounts_cleanly(tag: &str, sig: i32) {
    let _serial = serial();
    let mut m = mount(tag, &[]);
    fs::create_dir(m.p("d")).expect("mkdir");
    let f = sys::open(&m.p("d/f"), libc::O_CREAT | libc::O_RDWR, 0o644).expect("create");
    sys::write_all(&f, &common::pattern(1, 300_000)).expect("write");
    drop(f);
    signal_and_wait_exit(&m, sig);
    assert!(!is_mounted(m.mnt()), "still mounted after signal {sig}");
    // The guard reaps the process: exit status 0, nothing mounted.
    m.unmount();
    assert!(
        m.log().contains("unmounted"),
        "no unmount message:\n{}",
        m.log()
    );
    // Drained on the way out: the mirror equals the backing tree.
    assert_trees_equal(m.backing(), m.mirror());
    // And the next mount resumes without a new initial sync.
    m.remount();
    fs::write(m.p("after"), b"after restart").expect("write");
    m.wait_mirror_equal(CATCH_UP);
    m.unmount();
}

#[test]
fn sigint_unmounts_cleanly() {
    signal_unmounts_cleanly("cli-sigint", libc::SIGINT);
}

#[test]
fn sigterm_unmounts_cleanly() {
    signal_unmounts_cleanly("cli-sigterm", libc::SIGTERM);
}

#[test]
fn read_only_mount_refuses_writes() {
    let _serial = serial();
    let l = Layout::new("cli-ro", 1);
    fs::write(l.backing.join("existing"), b"content").expect("write");
    fs::create_dir(l.backing.join("dir")).expect("mkdir");
    let state = l.base.join("state");
    let st = state.to_str().expect("utf-8").to_string();
    let mut m = Mount::start(l, &["--state", &st, "-o", "ro"]);
    let p = |n: &str| m.p(n);
    assert_eq!(fs::read(p("existing")).expect("read"), b"content");
    assert_eq!(
        sys::open(&p("new"), libc::O_CREAT | libc::O_WRONLY, 0o644).map(|_| ()),
        Err(libc::EROFS),
        "create"
    );
    assert_eq!(
        sys::open(&p("existing"), libc::O_WRONLY, 0).map(|_| ()),
        Err(libc::EROFS),
        "open for writing"
    );
    assert_eq!(
        sys::truncate(&p("existing"), 0),
        Err(libc::EROFS),
        "truncate"
    );
    assert_eq!(sys::mkdir(&p("d2"), 0o755), Err(libc::EROFS), "mkdir");
    assert_eq!(sys::unlink(&p("existing")), Err(libc::EROFS), "unlink");
    assert_eq!(sys::rmdir(&p("dir")), Err(libc::EROFS), "rmdir");
    assert_eq!(
        sys::rename2(&p("existing"), &p("moved"), 0),
        Err(libc::EROFS),
        "rename"
    );
    assert_eq!(sys::chmod(&p("existing"), 0o600), Err(libc::EROFS), "chmod");
    assert_eq!(
        sys::lsetxattr(&p("existing"), "user.x", b"v", 0),
        Err(libc::EROFS),
        "setxattr"
    );
    assert_eq!(sys::symlink(b"x", &p("l")), Err(libc::EROFS), "symlink");
    // The backing tree is unchanged; the mirror got its copy all the same.
    assert_eq!(
        fs::read(m.backing().join("existing")).expect("read"),
        b"content"
    );
    m.wait_mirror_equal(CATCH_UP);
    m.unmount();
}

#[test]
fn demo_runs_and_exits_zero() {
    let _serial = serial();
    let mut child = Command::new(BIN)
        .arg("demo")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mirrorfs demo");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait demo") {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(180) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let out = child.wait_with_output().expect("demo output");
            panic!(
                "demo did not finish within 180 s:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("demo output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.success(),
        "demo failed ({status}):\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_mentions(&stdout, &["mirrorfs mount", "identical", "demo done"]);
}

/// Issue 6, finding 15: a refused `mirrorfs serve` leaves nothing in the directory it refused
/// (it stays usable as an empty mirror).
#[test]
fn a_refused_serve_leaves_the_directory_empty() {
    let base = common::temp_base("refused-serve");
    let dir = base.path().join("m");
    common::mkdir755(&dir);
    let out = std::process::Command::new(common::BIN)
        .args([
            "serve",
            dir.to_str().expect("utf-8"),
            "--listen",
            "127.0.0.1:1",
        ])
        .arg("--config")
        .arg(base.path().join("no-identity-here"))
        .output()
        .expect("run mirrorfs serve");
    assert!(!out.status.success(), "serve without an identity started");
    let left: Vec<_> = fs::read_dir(&dir)
        .expect("read dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "the refused command left {left:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// conflicts (issue 7)

const COPY_SUFFIX: &str = ".conflict-siteb-20261204-120000";

/// Writes the mount's conflict registry (`STATE/conflicts.json`, the format documented in
/// `site::conflicts`) as a reintegration would have recorded it: `(path, copy, reason)`.
fn write_registry(state: &Path, entries: &[(&str, Option<&str>, &str)]) {
    let conflicts: Vec<serde_json::Value> = entries
        .iter()
        .map(|(path, copy, reason)| {
            let mut e = serde_json::json!({
                "path": path, "reason": reason, "peer": "siteb", "time": 1_796_385_600i64
            });
            if let Some(c) = copy {
                e["copy"] = serde_json::json!(c);
            }
            e
        })
        .collect();
    let file = serde_json::json!({ "version": 1, "conflicts": conflicts });
    fs::write(
        state.join("conflicts.json"),
        serde_json::to_vec_pretty(&file).expect("json"),
    )
    .expect("write the registry");
}

/// `mirrorfs conflicts MNT --json`, parsed.
fn conflicts_json(mnt: &Path) -> Vec<serde_json::Value> {
    let (ok, out, err) = output(&["conflicts", mnt.to_str().expect("utf-8"), "--json"]);
    assert!(ok, "conflicts --json failed: {err}");
    serde_json::from_str::<Vec<serde_json::Value>>(&out)
        .unwrap_or_else(|e| panic!("conflicts --json is not a JSON array ({e}): {out}"))
}

/// `mirrorfs conflicts resolve PATH --keep KEEP`, run in `cwd`.
fn resolve_in(cwd: &Path, path: &str, keep: &str) -> (bool, String, String) {
    let o = Command::new(BIN)
        .args(["conflicts", "resolve", path, "--keep", keep])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("run mirrorfs conflicts resolve");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[test]
fn conflicts_lists_and_resolve_keep_remote_goes_through_the_mount() {
    let _serial = serial();
    let mut m = mount("cli-conflicts-remote", &[]);
    let state = m.layout.base.join("state");
    let copy = format!("notes.txt{COPY_SUFFIX}");
    fs::write(m.p("notes.txt"), b"ours\n").expect("write ours");
    fs::write(m.p(&copy), b"theirs\n").expect("write theirs");
    write_registry(&state, &[("notes.txt", Some(&copy), "both-modified")]);

    let listed = conflicts_json(m.mnt());
    assert_eq!(listed.len(), 1, "{listed:?}");
    let e = &listed[0];
    assert_eq!(e["path"], "notes.txt");
    assert_eq!(e["copy"], copy.as_str());
    assert_eq!(e["reason"], "both-modified");
    assert_eq!(e["peer"], "siteb");
    assert_eq!(e["time"], 1_796_385_600i64);
    assert_eq!(e["mountpoint"], m.mnt().to_str().expect("utf-8"));
    assert_eq!(e["path_exists"], true);
    assert_eq!(e["copy_exists"], true);
    let (ok, out, err) = output(&["conflicts", m.mnt().to_str().expect("utf-8")]);
    assert!(ok, "conflicts failed: {err}");
    assert_mentions(&out, &["notes.txt", &copy, "both sites changed", "siteb"]);

    let target = m.p("notes.txt");
    let (ok, out, err) = resolve_in(Path::new("/"), target.to_str().expect("utf-8"), "remote");
    assert!(ok, "resolve --keep remote failed: {err}");
    assert_mentions(&out, &["their version"]);
    assert_eq!(fs::read(m.p("notes.txt")).expect("read"), b"theirs\n");
    assert!(!m.p(&copy).exists(), "the conflict copy is gone");
    assert!(conflicts_json(m.mnt()).is_empty(), "the registry is empty");
    assert!(!state.join("conflicts.json").exists());
    m.wait_mirror_equal(CATCH_UP);
    assert_eq!(
        fs::read(m.mirror().join("notes.txt")).expect("mirror"),
        b"theirs\n"
    );

    let (ok, _, err) = resolve_in(Path::new("/"), target.to_str().expect("utf-8"), "remote");
    assert!(!ok, "a settled conflict resolved again");
    assert_mentions(&err, &["no conflict is recorded", "mirrorfs conflicts"]);
    let (ok, out, _) = output(&["conflicts", m.mnt().to_str().expect("utf-8")]);
    assert!(ok);
    assert_mentions(&out, &["no conflicts"]);
    m.unmount();
    let (ok, _, err) = resolve_in(Path::new("/"), target.to_str().expect("utf-8"), "both");
    assert!(!ok, "resolve on an unmounted volume succeeded");
    assert_mentions(&err, &["not inside a running mirrorfs mount"]);
}

#[test]
fn conflicts_resolve_keep_local_and_both_and_the_refusals() {
    let _serial = serial();
    let m = mount("cli-conflicts-local", &[]);
    let state = m.layout.base.join("state");
    let (a_copy, b_copy, d_copy) = (
        format!("a.txt{COPY_SUFFIX}"),
        format!("b.txt{COPY_SUFFIX}"),
        format!("d{COPY_SUFFIX}"),
    );
    fs::write(m.p("a.txt"), b"ours a\n").expect("write");
    fs::write(m.p(&a_copy), b"theirs a\n").expect("write");
    fs::write(m.p("b.txt"), b"ours b\n").expect("write");
    fs::write(m.p(&b_copy), b"theirs b\n").expect("write");
    fs::create_dir(m.p("d")).expect("mkdir");
    fs::create_dir(m.p(&d_copy)).expect("mkdir");
    fs::write(m.p(&d_copy).join("inside"), b"theirs\n").expect("write");
    fs::write(m.p("kept.txt"), b"ours\n").expect("write");
    write_registry(
        &state,
        &[
            ("a.txt", Some(&a_copy), "both-modified"),
            ("b.txt", Some(&b_copy), "both-created"),
            ("d", Some(&d_copy), "both-created"),
            ("kept.txt", None, "they-deleted"),
        ],
    );
    assert_eq!(conflicts_json(m.mnt()).len(), 4);

    // local: the copy goes, ours stays.
    let (ok, _, err) = resolve_in(m.mnt(), "a.txt", "local");
    assert!(ok, "resolve a.txt --keep local (relative) failed: {err}");
    assert_eq!(fs::read(m.p("a.txt")).expect("read"), b"ours a\n");
    assert!(!m.p(&a_copy).exists());
    // both: named by its conflict copy; both files stay.
    let (ok, _, err) = resolve_in(m.mnt(), &b_copy, "both");
    assert!(ok, "resolve COPY --keep both failed: {err}");
    assert_eq!(fs::read(m.p("b.txt")).expect("read"), b"ours b\n");
    assert_eq!(fs::read(m.p(&b_copy)).expect("read"), b"theirs b\n");
    // A non-empty directory copy is never deleted.
    let (ok, _, err) = resolve_in(Path::new("/"), m.p("d").to_str().expect("utf-8"), "local");
    assert!(!ok, "a non-empty directory copy was removed");
    assert_mentions(&err, &["not empty", "--keep both"]);
    assert!(m.p(&d_copy).join("inside").exists());
    // Nothing was copied: only local or both make sense.
    let kept = m.p("kept.txt");
    let (ok, _, err) = resolve_in(Path::new("/"), kept.to_str().expect("utf-8"), "remote");
    assert!(!ok, "remote without a copy succeeded");
    assert_mentions(&err, &["nothing was copied", "--keep local"]);
    let (ok, _, err) = resolve_in(Path::new("/"), kept.to_str().expect("utf-8"), "local");
    assert!(ok, "local without a copy failed: {err}");
    assert_eq!(fs::read(&kept).expect("read"), b"ours\n");

    let left: Vec<_> = conflicts_json(m.mnt())
        .iter()
        .map(|e| e["path"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(left, vec!["d".to_string()], "only the refused one is left");
    m.wait_mirror_equal(CATCH_UP);
    assert!(!m.mirror().join(&a_copy).exists());
    assert!(m.mirror().join(&b_copy).exists());

    // A corrupt registry is an error naming it, never an empty list.
    fs::write(state.join("conflicts.json"), b"{\"version\": 1, \"confl").expect("corrupt");
    let (ok, _, err) = output(&["conflicts", m.mnt().to_str().expect("utf-8"), "--json"]);
    assert!(!ok, "a corrupt registry was listed");
    assert_mentions(&err, &["conflicts.json", "corrupt"]);
}

#[test]
fn conflicts_help_explains_the_naming_and_each_keep_choice() {
    let (ok, out, _) = output(&["conflicts", "--help"]);
    assert!(ok, "conflicts --help failed");
    assert_mentions(
        &out,
        &[
            "PATH.conflict-SITE-YYYYMMDD-HHMMSS",
            "--json",
            "MOUNT",
            "resolve",
        ],
    );
    let (ok, out, _) = output(&["conflicts", "resolve", "--help"]);
    assert!(ok, "conflicts resolve --help failed");
    assert_mentions(
        &out,
        &[
            "--keep",
            "local",
            "remote",
            "both",
            "conflict copy",
            "PATH.conflict-",
        ],
    );
    let (ok, _, err) = output(&["conflicts", "resolve", "/x", "--keep", "mine"]);
    assert!(!ok, "an unknown --keep was accepted");
    assert_mentions(&err, &["local", "remote", "both"]);
}

/// A name that is not UTF-8 is listed (as `path_hex`) and resolved exactly.
#[test]
fn conflicts_resolve_a_name_that_is_not_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let _serial = serial();
    let m = mount("cli-conflicts-bytes", &[]);
    let name = OsStr::from_bytes(b"caf\xe9");
    let mut copy = name.to_owned();
    copy.push(COPY_SUFFIX);
    fs::write(m.p(name), b"ours\n").expect("write ours");
    fs::write(m.p(&copy), b"theirs\n").expect("write theirs");
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let file = serde_json::json!({ "version": 1, "conflicts": [{
        "path_hex": hex(name.as_bytes()), "copy_hex": hex(copy.as_bytes()),
        "reason": "both-modified", "peer": "siteb", "time": 0 }] });
    fs::write(
        m.layout.base.join("state").join("conflicts.json"),
        serde_json::to_vec(&file).expect("json"),
    )
    .expect("write the registry");
    let listed = conflicts_json(m.mnt());
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["path_hex"], "636166e9");
    assert_eq!(listed[0]["copy_exists"], true);
    let o = Command::new(BIN)
        .args(["conflicts", "resolve"])
        .arg(m.p(name))
        .args(["--keep", "remote"])
        .output()
        .expect("run resolve");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(fs::read(m.p(name)).expect("read"), b"theirs\n");
    assert!(!m.p(&copy).exists());
    assert!(conflicts_json(m.mnt()).is_empty());
    m.wait_mirror_equal(CATCH_UP);
}
