//! The witness and write leases with real processes on loopback: `mirrorfs witness`, a primary
//! mounted with `--witness`, a `mirrorfs serve` mirror promoted with `promote --witness`.
//! Partitions are made by stopping processes (SIGSTOP): a stopped witness is a primary cut off
//! from it; a stopped primary is the minority side of a split. The property checked: at most
//! one site writes, the other fails changes with EROFS and says why in `status`.

mod common;

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::net::free_port;
use common::{temp_base, wait_until, Layout, Mount, BIN};

/// The lease the primaries ask for (short, so that the tests wait little).
const LEASE_MS: &str = "1500";
/// The witness's longest lease, and its start-up window.
const TTL_MAX_MS: &str = "1500";

fn run(args: &[&OsStr]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run mirrorfs")
}

fn run_ok(args: &[&OsStr]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "mirrorfs {args:?} failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn signal_pid(pid: u32, sig: i32) {
    // SAFETY: kill(2) on the pid of a child process this test owns and has not reaped.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// `mirrorfs init --config DIR`: the fingerprint.
fn init_identity(dir: &Path, name: &str) -> String {
    let out = run_ok(&[
        os("init"),
        os("--config"),
        dir.as_os_str(),
        os("--name"),
        os(name),
    ]);
    out.lines()
        .find_map(|l| l.strip_prefix("fingerprint: "))
        .unwrap_or_else(|| panic!("`mirrorfs init` printed no fingerprint:\n{out}"))
        .trim()
        .to_string()
}

/// Three machines: primary P, mirror M, witness W, each trusting the other two.
struct Sites {
    base: PathBuf,
    p: PathBuf,
    m: PathBuf,
    w: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Sites {
    fn new(tag: &str) -> Sites {
        let tmp = temp_base(&format!("witness-{tag}"));
        let base = tmp.path().canonicalize().expect("canonicalize");
        let (p, m, w) = (base.join("cfg-p"), base.join("cfg-m"), base.join("cfg-w"));
        let fps = [
            init_identity(&p, "p"),
            init_identity(&m, "m"),
            init_identity(&w, "w"),
        ];
        let dirs = [&p, &m, &w];
        for (i, who) in dirs.iter().enumerate() {
            for (j, fp) in fps.iter().enumerate() {
                if i != j {
                    run_ok(&[
                        os("trust"),
                        os("--config"),
                        who.as_os_str(),
                        os(fp),
                        os(&format!("peer{j}")),
                    ]);
                }
            }
        }
        Sites {
            base,
            p,
            m,
            w,
            _tmp: tmp,
        }
    }
}

/// A running process of the binary (witness or daemon) with its log; SIGCONT + SIGTERM, then
/// SIGKILL, on drop.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn start(args: &[&OsStr], log: &Path, ready: &str) -> Daemon {
        let logf = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the log");
        let child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf)
            .spawn()
            .expect("spawn mirrorfs");
        let d = Daemon {
            child: Some(child),
            log: log.to_path_buf(),
        };
        assert!(
            wait_until(Duration::from_secs(30), || d.log().contains(ready)),
            "mirrorfs {args:?} did not say `{ready}`:\n{}",
            d.log()
        );
        d
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: i32) {
        signal_pid(self.child.as_ref().expect("running").id(), sig);
    }

    /// SIGTERM: must exit with status 0 within 30 s.
    fn stop(&mut self) {
        let mut c = self.child.take().expect("running");
        signal_pid(c.id(), libc::SIGCONT);
        signal_pid(c.id(), libc::SIGTERM);
        let t0 = Instant::now();
        let st = loop {
            if let Ok(Some(st)) = c.try_wait() {
                break st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no exit within 30 s of SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(st.success(), "exited with {st}:\n{}", self.log());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal_pid(c.id(), libc::SIGCONT);
            signal_pid(c.id(), libc::SIGTERM);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            signal_pid(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
    }
}

/// `mirrorfs witness --listen 127.0.0.1:PORT --config W --ttl-max-ms TTL_MAX_MS`: the guard and
/// its URL.
fn start_witness(s: &Sites) -> (Daemon, String) {
    start_witness_on(s, free_port())
}

fn start_witness_on(s: &Sites, port: u16) -> (Daemon, String) {
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::start(
        &[
            os("witness"),
            os("--listen"),
            os(&listen),
            os("--config"),
            s.w.as_os_str(),
            os("--ttl-max-ms"),
            os(TTL_MAX_MS),
        ],
        &s.base.join("witness.log"),
        "witness listening on",
    );
    (d, format!("mirror://{listen}"))
}

/// Creates a new file `name` under `dir` with `data`: the errno of the failure, if any.
fn create(dir: &Path, name: &str, data: &[u8]) -> Result<(), i32> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.join(name))
        .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    f.write_all(data)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// `mirrorfs status MNT` as text.
fn status_text(mnt: &Path) -> String {
    let o = run(&[os("status"), mnt.as_os_str()]);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The `read_only` line of a mount's `status --json`, if any.
fn read_only(m: &Mount) -> Option<String> {
    let st = m.status()?;
    let v = if st.is_array() { st[0].clone() } else { st };
    v["read_only"].as_str().map(str::to_string)
}

fn log_tail(text: &str) -> String {
    common::tail(text, 30)
}

/// Issue 7, item 6 (a): a primary cut off from the witness (the witness stopped) stops writing
/// within the lease and its margin — every change fails with EROFS, reads keep working, status
/// says why — and writes again by itself once the witness answers.
#[test]
fn a_primary_cut_off_from_the_witness_goes_read_only_then_writes_again() {
    let s = Sites::new("cut");
    let (w, url) = start_witness(&s);
    let cfg = s.p.display().to_string();
    let metrics = format!("127.0.0.1:{}", free_port());
    let m = Mount::start(
        Layout::new("witness-cut", 1),
        &[
            "--witness",
            &url,
            "--lease-ms",
            LEASE_MS,
            "--config",
            &cfg,
            "--metrics",
            &metrics,
        ],
    );
    assert!(
        wait_until(Duration::from_secs(10), || create(m.mnt(), "first", b"1")
            .is_ok()),
        "the primary never became writable:\n{}\n{}",
        log_tail(&m.log()),
        log_tail(&w.log())
    );
    assert!(w.log().contains("granted"), "{}", w.log());
    assert_eq!(read_only(&m), None);
    let mut open_before = OpenOptions::new()
        .write(true)
        .open(m.p("first"))
        .expect("open for writing");

    // The partition: the witness answers nothing.
    w.signal(libc::SIGSTOP);
    let t0 = Instant::now();
    let mut n = 0;
    let mut last = Ok(());
    let fenced = wait_until(Duration::from_secs(10), || {
        n += 1;
        // Only the create itself (no data): had the fence come between a create and its
        // write, the file would rightly exist with the write refused (CI saw that race).
        last = create(m.mnt(), &format!("during-{n}"), b"");
        last == Err(libc::EROFS)
    });
    assert!(
        fenced,
        "writes still {last:?} {:?} after the witness stopped:\n{}",
        t0.elapsed(),
        log_tail(&m.log())
    );
    // The lease (1.5 s) counted from the last renewal's send, minus its margin, ends within
    // 1.2 s; 4 s leaves room for a loaded machine.
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "read-only only after {:?}",
        t0.elapsed()
    );
    assert_eq!(
        fs::create_dir(m.p("dir-during"))
            .map_err(|e| e.raw_os_error())
            .expect_err("mkdir while fenced"),
        Some(libc::EROFS)
    );
    assert_eq!(
        fs::write(m.p("first"), b"overwrite")
            .map_err(|e| e.raw_os_error())
            .expect_err("truncate while fenced"),
        Some(libc::EROFS)
    );
    assert_eq!(
        open_before
            .write_all(b"through an fd opened before")
            .map_err(|e| e.raw_os_error()),
        Err(Some(libc::EROFS))
    );
    for (what, r) in [
        ("rename", fs::rename(m.p("first"), m.p("renamed"))),
        ("unlink", fs::remove_file(m.p("first"))),
        ("symlink", std::os::unix::fs::symlink("first", m.p("link"))),
    ] {
        assert_eq!(
            r.map_err(|e| e.raw_os_error()),
            Err(Some(libc::EROFS)),
            "{what}"
        );
    }
    assert_eq!(fs::read(m.p("first")).expect("reads keep working"), b"1");
    assert!(
        !m.backing().join(format!("during-{n}")).exists(),
        "a refused change reached the backing"
    );
    let mut reason = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            reason = read_only(&m);
            reason.is_some()
        }),
        "status --json never said read-only"
    );
    let reason = reason.unwrap_or_default();
    assert!(
        reason.starts_with("no lease from the witness") && reason.contains(" since "),
        "{reason}"
    );
    let text = status_text(m.mnt());
    assert!(
        text.contains("read-only: no lease from the witness"),
        "{text}"
    );
    let scraped = scrape(&metrics);
    assert!(scraped.contains("mirrorfs_read_only 1"), "{scraped}");

    // The partition heals: writable again by itself.
    w.signal(libc::SIGCONT);
    assert!(
        wait_until(Duration::from_secs(20), || create(
            m.mnt(),
            &format!("after-{}", Instant::now().elapsed().as_nanos()),
            b"y"
        )
        .is_ok()),
        "not writable again after the witness came back:\n{}",
        log_tail(&m.log())
    );
    assert!(wait_until(Duration::from_secs(5), || read_only(&m).is_none()));
    assert!(
        m.log().contains("read-only:") && m.log().contains("writable"),
        "the mount logs both changes:\n{}",
        log_tail(&m.log())
    );
    fs::write(m.p("first"), b"2").expect("write after the partition healed");
    let scraped = scrape(&metrics);
    assert!(scraped.contains("mirrorfs_read_only 0"), "{scraped}");
}

/// `GET /metrics` from the mount's metrics address.
fn scrape(addr: &str) -> String {
    use std::io::Read;
    let mut c = std::net::TcpStream::connect(addr).expect("connect to the metrics address");
    c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("send the request");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read the metrics");
    out
}

/// A witness restarted (SIGTERM: a clean stop, then a new process on the same port) forgot who
/// held the lease: it grants nothing for its start-up window, so the primary goes read-only for
/// a while, then keeps writing under the lease it renews (the witness learned it from the
/// renewals).
#[test]
fn a_restarted_witness_grants_nothing_for_its_window_then_the_holder_renews() {
    let s = Sites::new("restart");
    let port = free_port();
    let (mut w, url) = start_witness_on(&s, port);
    let cfg = s.p.display().to_string();
    let m = Mount::start(
        Layout::new("witness-restart", 1),
        &["--witness", &url, "--lease-ms", LEASE_MS, "--config", &cfg],
    );
    assert!(
        wait_until(Duration::from_secs(10), || create(m.mnt(), "first", b"1")
            .is_ok()),
        "the primary never became writable:\n{}",
        log_tail(&m.log())
    );
    w.stop();
    assert!(w.log().contains("witness stopped"), "{}", w.log());
    let (w2, _) = start_witness_on(&s, port);
    let mut n = 0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            n += 1;
            create(m.mnt(), &format!("r-{n}"), b"x") == Err(libc::EROFS)
        }),
        "the primary kept writing through the witness's restart:\n{}",
        log_tail(&m.log())
    );
    assert!(
        wait_until(Duration::from_secs(20), || {
            n += 1;
            create(m.mnt(), &format!("r-{n}"), b"x").is_ok()
        }),
        "the primary never wrote again after the witness's window:\n{}\n{}",
        log_tail(&m.log()),
        log_tail(&w2.log())
    );
    assert!(
        w2.log().contains("forgot who held the lease"),
        "the restarted witness refuses during its window:\n{}",
        w2.log()
    );
}

/// Issue 7, item 6 (b): failover with a witness. `promote --witness` on the mirror is refused
/// while the primary renews its lease; once the primary is cut off (stopped) and its lease ran
/// out, the promotion takes the lease for generation 2 and the promoted copy mounts and writes;
/// the old primary, resumed, cannot write any more (EROFS, superseded by generation 2).
#[test]
fn promote_with_a_witness_waits_for_the_old_lease_and_fences_the_old_primary() {
    let s = Sites::new("failover");
    let (w, url) = start_witness(&s);
    let mdir = s.base.join("m");
    fs::create_dir(&mdir).expect("mkdir m");
    let mport = free_port();
    let mut srv = Daemon::start(
        &[
            os("serve"),
            mdir.as_os_str(),
            os("--listen"),
            os(&format!("127.0.0.1:{mport}")),
            os("--config"),
            s.m.as_os_str(),
        ],
        &s.base.join("serve.log"),
        "listening on",
    );
    let cfg_p = s.p.display().to_string();
    let murl = format!("mirror://127.0.0.1:{mport}");
    let p = Mount::start(
        Layout::new("witness-old", 0),
        &[
            "--mirror",
            &murl,
            "--witness",
            &url,
            "--lease-ms",
            LEASE_MS,
            "--config",
            &cfg_p,
        ],
    );
    assert!(
        wait_until(Duration::from_secs(10), || create(p.mnt(), "a", b"from P")
            .is_ok()),
        "P never became writable:\n{}",
        log_tail(&p.log())
    );
    assert!(
        wait_until(Duration::from_secs(60), || fs::read(mdir.join("a"))
            .is_ok_and(|d| d == b"from P")),
        "the mirror never got a:\n{}",
        log_tail(&srv.log())
    );
    srv.stop();

    let promote = |extra: &[&OsStr]| {
        let mut args = vec![
            os("promote"),
            mdir.as_os_str(),
            os("--witness"),
            os(&url),
            os("--lease-ms"),
            os(LEASE_MS),
            os("--config"),
            s.m.as_os_str(),
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    // A witness that cannot be reached: refused, nothing changed.
    let dead = format!("mirror://127.0.0.1:{}", free_port());
    let out = run(&[
        os("promote"),
        mdir.as_os_str(),
        os("--witness"),
        os(&dead),
        os("--config"),
        s.m.as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "promoted without a witness's grant");
    assert!(err.contains("cannot reach the witness"), "{err}");

    // P is alive and renews: the promotion is refused and changes nothing.
    let out = promote(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "promoted while P holds the lease");
    assert!(
        err.contains("the primary still holds the lease (site ")
            && err.contains("ms left): it is alive on the other side of the split; promoting now would make two writers"),
        "{err}"
    );
    let meta = fs::read_to_string(mdir.join(".mirrorfs/volume.json")).expect("volume.json");
    assert!(meta.contains("\"promoted\": false"), "{meta}");
    assert!(
        create(p.mnt(), "b", b"P still writes").is_ok(),
        "a refused promotion must not disturb the holder"
    );

    // The split: P is cut off (stopped); its lease runs out at the witness.
    let ppid = p.pid();
    signal_pid(ppid, libc::SIGSTOP);
    let mut last = String::new();
    let promoted = wait_until(Duration::from_secs(15), || {
        let o = promote(&[]);
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        o.status.success()
    });
    if !promoted {
        signal_pid(ppid, libc::SIGCONT);
        panic!("promote --witness never succeeded: {last}\n{}", w.log());
    }
    assert!(last.contains("generation 2"), "{last}");

    // The majority side (M and the witness) writes.
    let mut layout = Layout::new("witness-new", 1);
    layout.backing = mdir.clone();
    let state = mdir.join(".mirrorfs").display().to_string();
    let cfg_m = s.m.display().to_string();
    let n = Mount::start(
        layout,
        &[
            "--state",
            &state,
            "--witness",
            &url,
            "--lease-ms",
            LEASE_MS,
            "--config",
            &cfg_m,
        ],
    );
    assert!(
        wait_until(Duration::from_secs(10), || create(n.mnt(), "c", b"from M")
            .is_ok()),
        "the promoted copy never became writable:\n{}",
        log_tail(&n.log())
    );

    // P comes back on the other side of the split: it can never write again.
    signal_pid(ppid, libc::SIGCONT);
    assert_eq!(create(p.mnt(), "d", b"from P after"), Err(libc::EROFS));
    let mut reason = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            reason = read_only(&p);
            reason
                .as_deref()
                .is_some_and(|r| r.contains("superseded by generation 2"))
        }),
        "P's status never said superseded: {reason:?}\n{}",
        log_tail(&p.log())
    );
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(create(p.mnt(), "e", b"still not"), Err(libc::EROFS));
    assert!(!p.backing().join("d").exists() && !p.backing().join("e").exists());
    let text = status_text(p.mnt());
    assert!(
        text.contains("read-only: no lease from the witness")
            && text.contains("superseded by generation 2"),
        "{text}"
    );
    create(n.mnt(), "f", b"M still writes").expect("the new primary writes");
    assert!(
        w.log().contains("superseded by generation 2"),
        "{}",
        w.log()
    );
}

#[test]
fn help_texts_explain_the_witness_options() {
    let out = run_ok(&[os("mount"), os("--help")]);
    for w in ["--witness", "--lease-ms", "EROFS", "mirror://HOST:PORT"] {
        assert!(out.contains(w), "mount --help lacks {w}:\n{out}");
    }
    let out = run_ok(&[os("witness"), os("--help")]);
    for w in ["--listen", "--ttl-max-ms", "--config", "stores no data"] {
        assert!(out.contains(w), "witness --help lacks {w}:\n{out}");
    }
    let out = run_ok(&[os("promote"), os("--help")]);
    for w in ["--witness", "--lease-ms", "split", "old primary's lease"] {
        assert!(out.contains(w), "promote --help lacks {w}:\n{out}");
    }
    // A lease without a witness is a usage error.
    let o = run(&[
        os("mount"),
        os("a"),
        os("b"),
        os("--mirror"),
        os("c"),
        os("--lease-ms"),
        os("100"),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--witness"));
}
