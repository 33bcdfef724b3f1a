//! Block-hash resync of a remote mirror (issue: "if the journal no longer holds what a mirror
//! needs, the mirror is resynced by comparing per-file block hashes and sending only differing
//! blocks"). A real `mirrorfs serve` on loopback, a real mount with a small journal limit: while
//! the daemon is down, the journal passes its limit, the mirror is marked `needs_resync`, and on
//! reconnect only the changed blocks travel.

mod common;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::net::free_port;
use common::{sys, tree_diff, wait_until, Cmp, Layout, Mount, BIN};

fn run(args: &[&str]) -> String {
    let o = Command::new(BIN).args(args).output().expect("run mirrorfs");
    assert!(
        o.status.success(),
        "mirrorfs {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn fingerprint(init_out: &str) -> String {
    init_out
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint: "))
        .expect("init prints the fingerprint")
        .trim()
        .to_string()
}

struct Serve {
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
}

impl Serve {
    fn start(dir: &Path, port: u16, cfg: &Path, log: PathBuf) -> Serve {
        let mut s = Serve {
            child: None,
            args: vec![
                "serve".into(),
                dir.display().to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--config".into(),
                cfg.display().to_string(),
            ],
            log,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let logf = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("serve log");
        let child = Command::new(BIN)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup"))
            .stderr(logf)
            .spawn()
            .expect("spawn serve");
        self.child = Some(child);
        std::thread::sleep(Duration::from_millis(300));
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn bytes_sent(m: &Mount) -> u64 {
    m.status()
        .and_then(|s| s["mirrors"][0]["link"]["bytes_sent"].as_u64())
        .unwrap_or(0)
}

fn mirror_state(m: &Mount) -> String {
    m.status()
        .and_then(|s| s["mirrors"][0]["state"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Two identities under `base` (`pcfg` for the primary, `mcfg` for the mirror) that trust each
/// other, and the mirror's directory `remote`.
fn trusted_pair(base: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (pcfg, mcfg, remote) = (base.join("pcfg"), base.join("mcfg"), base.join("remote"));
    fs::create_dir_all(&remote).expect("mkdir remote");
    let pfp = fingerprint(&run(&["init", "--config", &pcfg.display().to_string()]));
    let mfp = fingerprint(&run(&["init", "--config", &mcfg.display().to_string()]));
    run(&[
        "trust",
        "--config",
        &pcfg.display().to_string(),
        &mfp,
        "mirror",
    ]);
    run(&[
        "trust",
        "--config",
        &mcfg.display().to_string(),
        &pfp,
        "primary",
    ]);
    (pcfg, mcfg, remote)
}

#[test]
fn a_mirror_past_the_journal_is_resynchronised_by_block_hashes() {
    let layout = Layout::new("resync", 0);
    let base = layout.base.clone();
    let (pcfg, mcfg, remote) = trusted_pair(&base);

    // Existing data: a 64 MiB file and a few small ones.
    let big: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(layout.backing.join("big"), &big).expect("write big");
    for i in 0..20 {
        fs::write(
            layout.backing.join(format!("small{i}")),
            format!("small file {i}\n"),
        )
        .expect("write small");
    }
    fs::create_dir_all(layout.backing.join("dir/sub")).expect("mkdir");
    fs::write(layout.backing.join("dir/sub/keep"), b"kept\n").expect("write");

    let port = free_port();
    let mut serve = Serve::start(&remote, port, &mcfg, base.join("serve.log"));
    let url = format!("mirror://127.0.0.1:{port}");
    let mut m = Mount::start(
        layout,
        &[
            "--mirror",
            &url,
            "--config",
            &pcfg.display().to_string(),
            "--journal-max-mib",
            "160",
        ],
    );
    let backing = m.backing().to_path_buf();
    let equal = |what: &str| {
        let mut last = Vec::new();
        let ok = wait_until(Duration::from_secs(120), || {
            last = tree_diff(&backing, &remote, &Cmp::NO_TIMES);
            last.is_empty()
        });
        assert!(
            ok,
            "{what}: mirror differs from backing:\n{}",
            last.join("\n")
        );
    };
    equal("initial copy");
    assert!(
        wait_until(Duration::from_secs(30), || mirror_state(&m) == "live"),
        "mirror never became live: {:?}",
        m.status()
    );
    // The daemon records its copy as consistent once the copy's end is durably applied; killed
    // before that, it would (rightly) take a fresh initial copy instead of a resync.
    let meta = remote.join(".mirrorfs/volume.json");
    assert!(
        wait_until(Duration::from_secs(30), || fs::read_to_string(&meta)
            .is_ok_and(|s| s.contains("\"consistent\""))),
        "the daemon never recorded its copy as consistent: {:?}",
        fs::read_to_string(&meta)
    );

    // Outage: the daemon dies; 1 MiB changes in the middle of the big file, a file goes, one
    // comes; then 250 MiB of churn pushes the journal past its 160 MiB limit.
    serve.kill9();
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(m.p("big"))
            .expect("open big through the mount");
        f.seek(SeekFrom::Start(20 << 20)).expect("seek");
        f.write_all(&vec![0x5a; 1 << 20]).expect("overwrite 1 MiB");
    }
    fs::remove_file(m.p("small3")).expect("unlink");
    fs::write(m.p("dir/new"), b"new file\n").expect("create");
    {
        let mut f = fs::File::create(m.p("churn")).expect("churn");
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..250 {
            f.write_all(&chunk).expect("churn write");
        }
    }
    fs::remove_file(m.p("churn")).expect("unlink churn");
    assert!(
        wait_until(Duration::from_secs(10), || mirror_state(&m)
            == "needs_resync"),
        "the journal limit should have marked the mirror for a resync: {:?}",
        m.status()
    );

    serve.spawn();
    equal("after the resync");
    assert!(
        wait_until(Duration::from_secs(30), || mirror_state(&m) == "live"),
        "mirror never became live after the resync: {:?}",
        m.status()
    );
    // The link counter restarts with each connection: this one sent everything since the outage.
    let sent = bytes_sent(&m);
    let log = m.log();
    assert!(
        log.contains("resynchronising by block hashes"),
        "the mount log should say why it resyncs:\n{log}"
    );
    assert!(
        log.contains("resync streamed"),
        "no resync in the log:\n{log}"
    );
    // 1 MiB of changed data (16 blocks of 64 KiB), a few namespace records, TLS framing: far
    // from the 64 MiB a copy would send.
    assert!(
        sent < (1 << 20) + (256 << 10),
        "the resync sent {sent} bytes for 1 MiB of changed data"
    );
    assert!(
        sent >= 1 << 20,
        "the resync must send at least the changed data, sent {sent}"
    );
    m.unmount();
    assert!(
        tree_diff(&backing, &remote, &Cmp::NO_TIMES).is_empty(),
        "mirror differs after unmount"
    );
}

/// Waits until `a` and `b` are equal by `cmp`; panics with the differences left.
fn wait_equal(a: &Path, b: &Path, cmp: &Cmp, what: &str) {
    let mut last = Vec::new();
    let ok = wait_until(Duration::from_secs(60), || {
        last = tree_diff(a, b, cmp);
        last.is_empty()
    });
    assert!(
        ok,
        "{what}: mirror differs from backing:\n{}",
        last.join("\n")
    );
}

/// Review finding: the resync left metadata that the initial copy carries behind: a symlink's
/// xattrs, the root's xattrs, the mtime of special files, and xattrs the primary removed from an
/// entry the mirror keeps. After a resync the mirror must equal the primary in everything the
/// tree comparison sees (contents, modes, owners, mtimes, xattrs).
#[test]
fn a_resync_carries_every_piece_of_metadata_the_initial_copy_does() {
    let layout = Layout::new("resync-meta", 0);
    let base = layout.base.clone();
    let (pcfg, mcfg, remote) = trusted_pair(&base);
    let b = layout.backing.clone();
    fs::write(b.join("keep"), b"kept\n").expect("write keep");
    sys::lsetxattr(&b.join("keep"), "user.stay", b"1", 0).expect("xattr keep");
    sys::lsetxattr(&b.join("keep"), "user.gone", b"x", 0).expect("xattr keep");
    fs::create_dir(b.join("d")).expect("mkdir d");
    fs::write(b.join("d/f"), b"f\n").expect("write d/f");
    sys::lsetxattr(&b.join("d"), "user.dstay", b"1", 0).expect("xattr d");
    sys::lsetxattr(&b.join("d"), "user.dgone", b"y", 0).expect("xattr d");
    // user.* xattrs do not exist on symlinks (xattr(7)); trusted.* ones do, for root.
    sys::symlink(b"keep", &b.join("ln")).expect("symlink");
    sys::lsetxattr(&b.join("ln"), "trusted.ln", b"one", 0).expect("xattr symlink");
    sys::mknod(&b.join("fifo"), libc::S_IFIFO | 0o640, 0).expect("mkfifo");
    sys::lsetxattr(&b, "user.root", b"r0", 0).expect("xattr root");
    sys::lsetxattr(&b, "user.rootgone", b"g", 0).expect("xattr root");

    let port = free_port();
    let mut serve = Serve::start(&remote, port, &mcfg, base.join("serve.log"));
    let url = format!("mirror://127.0.0.1:{port}");
    let m = Mount::start(
        layout,
        &["--mirror", &url, "--config", &pcfg.display().to_string()],
    );
    let backing = m.backing().to_path_buf();
    wait_equal(&backing, &remote, &Cmp::NO_TIMES, "initial copy");
    assert!(
        wait_until(Duration::from_secs(30), || mirror_state(&m) == "live"),
        "mirror never became live: {:?}",
        m.status()
    );
    let meta = remote.join(".mirrorfs/volume.json");
    assert!(
        wait_until(Duration::from_secs(30), || fs::read_to_string(&meta)
            .is_ok_and(|s| s.contains("\"consistent\""))),
        "the daemon never recorded its copy as consistent: {:?}",
        fs::read_to_string(&meta)
    );

    // Outage: only metadata changes, through the mount.
    serve.kill9();
    sys::lremovexattr(&m.p("keep"), "user.gone").expect("removexattr keep");
    sys::lremovexattr(&m.p("d"), "user.dgone").expect("removexattr d");
    sys::lsetxattr(&m.p("ln"), "trusted.ln", b"two", 0).expect("xattr symlink");
    sys::utimens(
        &m.p("fifo"),
        (0, sys::UTIME_OMIT),
        (1_000_000_000, 123_456_789),
        libc::AT_SYMLINK_NOFOLLOW,
    )
    .expect("fifo mtime");
    sys::lsetxattr(m.mnt(), "user.root", b"r1", 0).expect("xattr root");
    sys::lremovexattr(m.mnt(), "user.rootgone").expect("removexattr root");
    // The daemon's copy asks for a resync (as `serve --discard-diverged` makes it do): the
    // next connection is a block-hash resync, not a replay of the journal.
    let json = fs::read_to_string(&meta).expect("volume.json");
    assert!(json.contains("\"consistent\""), "{json}");
    fs::write(&meta, json.replace("\"consistent\"", "\"needs_resync\"")).expect("volume.json");

    serve.spawn();
    assert!(
        wait_until(Duration::from_secs(60), || m
            .log()
            .contains("resync streamed")),
        "no resync in the log:\n{}",
        m.log()
    );
    wait_equal(&backing, &remote, &Cmp::FULL, "after the resync");
}

/// Bug found from outside: the primary's own marker (`STATE/mirrors/ID/NEEDS_RESYNC`) turns a
/// network mirror's resume into a resync while the journal still holds the mirror's next record.
/// The link must then stream from where the resync starts; it streamed from the mirror's durable
/// position instead, the daemon refused the batch (`sequence gap`) or the primary refused the
/// daemon's acknowledgement, the link dropped, and the next connection took a full initial copy
/// instead of the block-hash resync.
#[test]
fn the_primarys_resync_marker_makes_a_block_hash_resync_even_when_the_journal_holds_the_gap() {
    let layout = Layout::new("resync-marker", 0);
    let base = layout.base.clone();
    let (pcfg, mcfg, remote) = trusted_pair(&base);
    let b = layout.backing.clone();
    fs::create_dir(b.join("d")).expect("mkdir d");
    for i in 0..10 {
        fs::write(b.join(format!("d/f{i}")), format!("file {i}\n")).expect("write");
    }
    fs::write(b.join("data"), vec![3u8; 1 << 20]).expect("write data");

    let port = free_port();
    let serve_log = base.join("serve.log");
    let mut serve = Serve::start(&remote, port, &mcfg, serve_log.clone());
    let url = format!("mirror://127.0.0.1:{port}");
    let m = Mount::start(
        layout,
        &["--mirror", &url, "--config", &pcfg.display().to_string()],
    );
    let backing = m.backing().to_path_buf();
    wait_equal(&backing, &remote, &Cmp::NO_TIMES, "initial copy");
    assert!(
        wait_until(Duration::from_secs(30), || mirror_state(&m) == "live"),
        "mirror never became live: {:?}",
        m.status()
    );
    // A few changes while live, so the mirror's durable position is well past the copy's start.
    for i in 0..5 {
        fs::write(m.p(format!("live{i}")), format!("live {i}\n")).expect("write live");
    }
    wait_equal(&backing, &remote, &Cmp::NO_TIMES, "live changes");
    let meta = remote.join(".mirrorfs/volume.json");
    assert!(
        wait_until(Duration::from_secs(30), || fs::read_to_string(&meta)
            .is_ok_and(|s| s.contains("\"consistent\""))),
        "the daemon never recorded its copy as consistent: {:?}",
        fs::read_to_string(&meta)
    );

    // Outage: the daemon stops; some changes (the journal keeps every one of them).
    serve.kill9();
    fs::write(m.p("d/f2"), b"changed during the outage\n").expect("overwrite");
    fs::remove_file(m.p("d/f5")).expect("unlink");
    fs::write(m.p("outage"), b"new during the outage\n").expect("create");
    fs::create_dir(m.p("newdir")).expect("mkdir");
    // The primary's own marker asks for a resync of this (its only) mirror.
    let mirrors_state = backing.join(".mirrorfs/mirrors");
    let dirs: Vec<PathBuf> = fs::read_dir(&mirrors_state)
        .expect("the primary's mirror state")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    assert_eq!(dirs.len(), 1, "one mirror's state: {dirs:?}");
    let marker = dirs[0].join("NEEDS_RESYNC");
    fs::write(&marker, "the operator asked for a resync\n").expect("write the marker");

    let mount_log_before = m.log().len();
    let serve_log_before = fs::read_to_string(&serve_log).unwrap_or_default().len();
    serve.spawn();
    let resynced = wait_until(Duration::from_secs(60), || {
        m.log()[mount_log_before..].contains("resync streamed")
    });
    wait_equal(&backing, &remote, &Cmp::NO_TIMES, "after the resync");
    let live = wait_until(Duration::from_secs(30), || mirror_state(&m) == "live");
    let mlog = m.log()[mount_log_before..].to_string();
    let slog = fs::read_to_string(&serve_log).unwrap_or_default()[serve_log_before..].to_string();
    // The same wrong send position shows as either end's refusal, whichever comes first: the
    // daemon's of a batch from the old position, or the primary's of an acknowledgement of the
    // resync's position (beyond what the sender thinks it sent).
    assert!(
        !slog.contains("sequence gap") && !mlog.contains("invalid acknowledgement"),
        "the link streamed from the wrong record after deciding a resync; daemon log:\n{slog}\nmount log:\n{mlog}"
    );
    assert!(
        resynced && mlog.contains("resynchronising by block hashes"),
        "no block-hash resync after the restart; mount log:\n{mlog}"
    );
    assert!(
        !mlog.contains("initial sync streamed") && !mlog.contains("namespace copied"),
        "the restart took a full initial copy instead of a resync; mount log:\n{mlog}"
    );
    assert!(
        live,
        "mirror never became live after the resync: {:?}",
        m.status()
    );
    assert!(
        wait_until(Duration::from_secs(10), || !marker.exists()),
        "the completed resync should clear the primary's marker"
    );
}
