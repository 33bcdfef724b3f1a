//! Operating mirrorfs as an administrator would (issue 10 items 3, 6, 7, 8), on real mounts:
//! logs in a file (no colour codes, `RUST_LOG` and `MIRRORFS_LOG`, journald's priorities), a
//! volume mounted from the config file with a flag overriding it, `config check` naming the
//! line and the fix, the metrics' names and 404, and `status` with one line per mirror and its
//! errors in JSON.

mod common;

use std::ffi::OsString;
use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::net::free_port;
use common::{is_mounted, lazy_unmount, wait_until, Layout, BIN, MOUNT_TIMEOUT, UNMOUNT_TIMEOUT};

const CATCH_UP: Duration = Duration::from_secs(60);

/// One at a time: a process spawned by one test while another has files open on its mount can
/// make that mount's unmount fail with EBUSY.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A `mirrorfs mount` started with exactly the given arguments and environment, its stdout and
/// stderr in `log`. Stopped with SIGTERM by `stop`, or killed (and lazily unmounted) on drop.
struct Running {
    child: Option<Child>,
    mnt: PathBuf,
    log: PathBuf,
}

impl Running {
    fn start(args: &[OsString], env: &[(&str, &str)], mnt: &Path, log: &Path) -> Running {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the log");
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out);
        for v in ["MIRRORFS_LOG", "RUST_LOG", "NO_COLOR", "JOURNAL_STREAM"] {
            cmd.env_remove(v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut r = Running {
            child: Some(cmd.spawn().expect("spawn mirrorfs")),
            mnt: mnt.to_path_buf(),
            log: log.to_path_buf(),
        };
        let t0 = Instant::now();
        while !is_mounted(mnt) {
            if let Ok(Some(st)) = r.child.as_mut().expect("child").try_wait() {
                r.child = None;
                panic!(
                    "mirrorfs {args:?} exited ({st}) before mounting:\n{}",
                    r.log()
                );
            }
            assert!(t0.elapsed() < MOUNT_TIMEOUT, "no mount:\n{}", r.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        r
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, a clean exit, and the log.
    fn stop(mut self) -> String {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid, not reaped yet.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        let st = loop {
            if let Some(st) = c.try_wait().expect("wait") {
                break st;
            }
            assert!(t0.elapsed() < UNMOUNT_TIMEOUT, "no exit:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(st.success(), "mirrorfs exited with {st}:\n{}", self.log());
        assert!(!is_mounted(&self.mnt));
        self.log()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            lazy_unmount(&self.mnt);
        }
    }
}

fn mount_args(l: &Layout, extra: &[&str]) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "mount".into(),
        l.backing.clone().into(),
        l.mnt.clone().into(),
        "--mirror".into(),
        l.mirror().into(),
        "--state".into(),
        l.base.join("state").into(),
    ];
    a.extend(extra.iter().map(OsString::from));
    a
}

/// Runs `mirrorfs ARGS` (no log variables set): success, stdout, stderr.
fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut c = Command::new(BIN);
    c.args(args).stdin(Stdio::null());
    for v in ["MIRRORFS_LOG", "RUST_LOG", "NO_COLOR", "JOURNAL_STREAM"] {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run mirrorfs");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// `GET path` on the metrics endpoint: the status line and the body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut c = std::net::TcpStream::connect(addr).expect("connect to the metrics");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut r = String::new();
    c.read_to_string(&mut r).expect("response");
    let (head, body) = r.split_once("\r\n\r\n").expect("a head and a body");
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// A sample's value in a Prometheus text body (the line that starts with `series `).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Logs

/// Issue 10 item 6: logs into a file carry no ANSI escape codes (even with a "terminal" TERM),
/// RUST_LOG is honoured, MIRRORFS_LOG takes precedence over it, the settings are in words, and a
/// filter that does not parse says so.
#[test]
fn logs_in_a_file_are_plain_and_follow_rust_log_and_mirrorfs_log() {
    let _s = serial();
    let l = Layout::new("op-logs", 1);
    // RUST_LOG=warn: the info line "mounted ..." is not written.
    let log1 = l.base.join("warn.log");
    let r = Running::start(
        &mount_args(&l, &["--ack", "local"]),
        &[("RUST_LOG", "warn"), ("TERM", "xterm-256color")],
        &l.mnt,
        &log1,
    );
    fs::write(l.mnt.join("a.txt"), b"a").expect("write");
    let text = r.stop();
    assert!(
        !text.contains(" mounted /"),
        "RUST_LOG=warn ignored:\n{text}"
    );
    // MIRRORFS_LOG=info over RUST_LOG=warn: it is, in words, without colour codes.
    let log2 = l.base.join("info.log");
    let r = Running::start(
        &mount_args(&l, &["--ack", "local"]),
        &[
            ("RUST_LOG", "warn"),
            ("MIRRORFS_LOG", "info"),
            ("TERM", "xterm-256color"),
        ],
        &l.mnt,
        &log2,
    );
    fs::write(l.mnt.join("b.txt"), b"b").expect("write");
    let text = r.stop();
    assert!(
        text.contains(" mounted /"),
        "MIRRORFS_LOG=info ignored:\n{text}"
    );
    assert!(
        !text.contains('\x1b'),
        "escape codes in a log file:\n{text:?}"
    );
    assert!(text.contains("--ack local"), "ack not in words:\n{text}");
    assert!(
        !text.contains("Local") && !text.contains("Some("),
        "Debug dumps:\n{text}"
    );
    assert!(text.contains(" INFO "), "no level:\n{text}");
    // A filter that does not parse: said once, info used.
    let (_, _, err) = run(
        &["config", "check", "--config", s(&l.base.join("none"))],
        &[("MIRRORFS_LOG", "info,mirrorfs=loudest")],
    );
    assert!(
        err.contains("MIRRORFS_LOG") && err.contains("is not a log filter"),
        "{err}"
    );
}

/// Issue 10 item 6: under systemd (stderr is the stream JOURNAL_STREAM names), each line starts
/// with its syslog priority and carries no time of its own.
#[test]
fn logs_to_the_journal_have_priorities_and_no_time() {
    let _s = serial();
    let l = Layout::new("op-journal", 1);
    let log = l.base.join("journal.log");
    fs::write(&log, b"").expect("create the log");
    let md = fs::metadata(&log).expect("stat");
    let stream = format!("{}:{}", md.dev(), md.ino());
    let r = Running::start(
        &mount_args(&l, &[]),
        &[("JOURNAL_STREAM", &stream)],
        &l.mnt,
        &log,
    );
    let text = r.stop();
    // The log's lines; `mirrorfs: ...` are the messages the command prints for a person
    // (serving, unmounted), not log records.
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with("mirrorfs: "))
        .collect();
    assert!(!lines.is_empty());
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with('<') && l.as_bytes().get(2) == Some(&b'>')),
        "lines without a priority:\n{text}"
    );
    assert!(lines.iter().any(|l| l.starts_with("<6>mounted")), "{text}");
    // No time: after the priority, no `YYYY-MM-DDT` as the default format starts with.
    let timed = |l: &str| {
        let b = l.as_bytes();
        b.len() > 14 && b[3..7].iter().all(u8::is_ascii_digit) && b[7] == b'-' && b[13] == b'T'
    };
    assert!(
        !lines.iter().any(|l| timed(l)),
        "a time in journal lines:\n{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Config

/// Issue 10 item 3: a volume defined in the config file mounts with `--volume`, a flag on the
/// command line overrides the file, `config show` says where each value comes from; with it,
/// items 7 and 8 on the same mount: the metrics and the status.
#[test]
fn a_volume_from_the_config_mounts_and_flags_override_it() {
    let _s = serial();
    let l = Layout::new("op-config", 2);
    let cfg = l.base.join("etc");
    fs::create_dir_all(cfg.join("volumes.d")).expect("mkdir");
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    fs::write(
        cfg.join("volumes.d/data.toml"),
        format!(
            "# the data volume\nbacking = \"{}\"\nmountpoint = \"{}\"\nmirror = [\"{}\", \"{}\"]\nstate = \"{}\"\nack = \"durable\"\nmetrics = \"{metrics}\"\njournal-max-mib = 256\nfsync_groups = true\nfsync_group_max_ms = 600000\n",
            s(&l.backing),
            s(&l.mnt),
            s(&l.mirrors[0]),
            s(&l.mirrors[1]),
            s(&l.base.join("state"))
        ),
    )
    .expect("write the config");
    let (ok, out, err) = run(&["config", "check", "--config", s(&cfg)], &[]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("ok, 1 volume(s)"), "{out}");
    let (ok, out, err) = run(&["config", "show", "data", "--config", s(&cfg)], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("ack = \"durable\""), "{out}");
    assert!(out.contains("data.toml:7"), "the origin of ack:\n{out}");
    assert!(
        out.contains("quorum = ...") || out.contains("# not set"),
        "{out}"
    );
    assert!(
        out.contains("transport = \"tcp\""),
        "a default shown:\n{out}"
    );

    let log = l.base.join("mount.log");
    let args: Vec<OsString> = [
        "mount",
        "--volume",
        "data",
        "--config",
        s(&cfg),
        "--ack",
        "local",
        // The file's switch turned off (with the file's group age limit, which needs it).
        "--no-fsync-groups",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let r = Running::start(&args, &[], &l.mnt, &log);
    for i in 0..20 {
        fs::write(l.mnt.join(format!("f{i}")), vec![b'x'; 1000]).expect("write");
    }
    let status = || {
        let (ok, out, _) = run(&["status", s(&l.mnt), "--json"], &[]);
        ok.then(|| serde_json::from_str::<serde_json::Value>(&out).expect("JSON"))
    };
    assert!(wait_until(CATCH_UP, || status().is_some_and(|v| {
        v["mirrors"].as_array().is_some_and(|m| {
            m.len() == 2 && m.iter().all(|m| m["lag_ops"] == 0 && m["state"] == "live")
        })
    })));
    let v = status().expect("status");
    assert_eq!(v["ack"], "local", "the command line's --ack wins: {v}");
    assert!(
        v["fsync_groups"].is_null(),
        "--no-fsync-groups wins over the file's fsync_groups = true: {v}"
    );
    assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    for i in 0..20 {
        assert_eq!(
            fs::read(l.mirrors[1].join(format!("f{i}"))).expect("mirrored"),
            vec![b'x'; 1000]
        );
    }

    // Item 8: one line per mirror, with its state and lag in seconds; the figures' age.
    let (ok, text, err) = run(&["status", s(&l.mnt)], &[]);
    assert!(ok, "{err}");
    for m in &l.mirrors {
        let rows: Vec<&str> = text
            .lines()
            .filter(|line| line.trim_start().starts_with(&format!("{} ", s(m))))
            .collect();
        assert_eq!(rows.len(), 1, "one line for {}:\n{text}", m.display());
        assert!(
            rows[0].contains(" live ") && rows[0].contains("lag:0.000s"),
            "{}",
            rows[0]
        );
    }
    assert!(
        text.lines().next().is_some_and(|h| h.contains("s old")),
        "{text}"
    );

    // Item 7: the names, the counters' _total, the state as a label, 404 elsewhere.
    let (line, body) = http_get(&metrics, "/metrics");
    assert!(line.contains("200"), "{line}");
    for l in body.lines().filter(|l| l.starts_with("# TYPE")) {
        let mut w = l.split(' ').skip(2);
        let (name, kind) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
        assert!(name.starts_with("mirrorfs_"), "{l}");
        assert_eq!(kind == "counter", name.ends_with("_total"), "{l}");
    }
    let documented = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/metrics.md"
    ))
    .expect("docs/metrics.md");
    for l in body.lines().filter(|l| l.starts_with("# TYPE")) {
        let name = l.split(' ').nth(2).unwrap_or("");
        assert!(
            documented.contains(&format!("`{name}`")),
            "{name} is not in docs/metrics.md"
        );
    }
    let m1 = s(&l.mirrors[1]);
    let applied = sample(
        &body,
        &format!("mirrorfs_mirror_records_applied_total{{mirror=\"{m1}\"}}"),
    )
    .expect("records applied");
    assert!(
        applied >= 40.0,
        "create + write of 20 files: {applied}\n{body}"
    );
    let bytes = sample(
        &body,
        &format!("mirrorfs_mirror_applied_bytes_total{{mirror=\"{m1}\"}}"),
    )
    .expect("bytes applied");
    assert!(bytes >= 20_000.0, "{bytes}");
    assert_eq!(
        sample(
            &body,
            &format!("mirrorfs_mirror_state{{mirror=\"{m1}\",state=\"live\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &body,
            &format!("mirrorfs_mirror_state{{mirror=\"{m1}\",state=\"retrying\"}}")
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &body,
            &format!("mirrorfs_mirror_lag_seconds{{mirror=\"{m1}\"}}")
        ),
        Some(0.0)
    );
    assert!(
        body.contains("# TYPE mirrorfs_journal_size_bytes gauge"),
        "{body}"
    );
    assert!(body.contains(&format!(
        "mirrorfs_mirror_errors_total{{mirror=\"{m1}\",kind=\"apply\"}} 0"
    )));
    let (line, _) = http_get(&metrics, "/nope");
    assert!(line.contains("404"), "{line}");
    let text = r.stop();
    assert!(text.contains("volume data"), "{text}");
}

/// Issue 10 item 3: `config check` names the file, the line and the fix of each error, and
/// `mount --volume` refuses a volume whose config has one.
#[test]
fn config_check_names_the_line_and_the_fix() {
    let _s = serial();
    let l = Layout::new("op-check", 1);
    let cfg = l.base.join("etc");
    fs::create_dir_all(&cfg).expect("mkdir");
    fs::write(
        cfg.join("mirrorfs.toml"),
        format!(
            "[volume.data]\nbacking = \"{}\"\nmountpoint = \"{}\"\nack_mode = \"durable\"\nmirror = \"{}\"\ntransport = \"carrier-pigeon\"\n\n[serve.copy]\ndir = \"/x\"\n",
            s(&l.backing),
            s(&l.mnt),
            s(l.mirror())
        ),
    )
    .expect("write");
    let (ok, out, err) = run(&["config", "check", "--config", s(&cfg)], &[]);
    assert!(!ok, "{out}");
    let file = cfg.join("mirrorfs.toml");
    let at = |n: usize| format!("{}:{n}: ", file.display());
    let line_of = |needle: &str| out.lines().find(|l| l.contains(needle)).unwrap_or("");
    assert!(
        line_of("ack_mode").starts_with(&at(4))
            && line_of("ack_mode").contains("did you mean `ack`"),
        "{out}"
    );
    assert!(
        line_of("carrier-pigeon").starts_with(&at(6))
            && line_of("carrier-pigeon").contains("\"udp\""),
        "{out}"
    );
    assert!(
        line_of("has no `listen`").starts_with(&at(8))
            && line_of("has no `listen`").contains("add `listen = "),
        "{out}"
    );
    assert!(err.contains("3 error(s)"), "{err}");
    // The same file alone.
    let (ok, out2, _) = run(&["config", "check", s(&file)], &[]);
    assert!(!ok);
    assert_eq!(out, out2);
    // A mount of that volume is refused, with the errors.
    let (ok, _, err) = run(&["mount", "--volume", "data", "--config", s(&cfg)], &[]);
    assert!(!ok && err.contains(&at(4)), "{err}");
    assert!(!is_mounted(&l.mnt));
    // Not valid TOML: the line too.
    fs::write(&file, "[volume.data]\nbacking = /srv\n").expect("write");
    let (ok, out, _) = run(&["config", "check", s(&file)], &[]);
    assert!(
        !ok && out.starts_with(&at(2)) && out.contains("not valid TOML"),
        "{out}"
    );
    // An unknown volume: what is defined.
    fs::write(&file, "[volume.data]\n").expect("write");
    let (ok, _, err) = run(&["mount", "--volume", "date", "--config", s(&cfg)], &[]);
    assert!(
        !ok && err.contains("no volume `date`") && err.contains("defined: data"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Status and metrics of a mirror in trouble

/// Issue 10 items 7 and 8: a remote mirror nobody serves is `retrying`: status shows it on one
/// line with the reason, `--json` lists it under `errors`, and the metrics count the link's
/// errors and reconnects.
#[test]
fn a_failing_mirror_shows_its_reason_and_counts_its_errors() {
    let _s = serial();
    let l = Layout::new("op-failing", 1);
    let cfg = l.base.join("etc");
    let (ok, _, err) = run(&["init", "--config", s(&cfg), "--name", "op"], &[]);
    assert!(ok, "{err}");
    // A peer to trust (nobody serves it): another identity's fingerprint.
    let other = l.base.join("etc-other");
    let (ok, out, err) = run(&["init", "--config", s(&other), "--name", "other"], &[]);
    assert!(ok, "{err}");
    let fp = out
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint: "))
        .expect("a fingerprint")
        .to_string();
    let (ok, _, err) = run(&["trust", &fp, "other", "--config", s(&cfg)], &[]);
    assert!(ok, "{err}");
    let dead = format!("mirror://127.0.0.1:{}", free_port());
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let log = l.base.join("mount.log");
    let mut args = mount_args(
        &l,
        &["--config", s(&cfg), "--metrics", &metrics, "--quorum", "1"],
    );
    args.extend(["--mirror".into(), OsString::from(&dead)]);
    let r = Running::start(&args, &[], &l.mnt, &log);
    fs::write(l.mnt.join("x"), b"x").expect("write");
    let mut last = None;
    let found = wait_until(CATCH_UP, || {
        let (ok, out, _) = run(&["status", s(&l.mnt), "--json"], &[]);
        last = ok.then(|| serde_json::from_str::<serde_json::Value>(&out).expect("JSON"));
        last.as_ref().is_some_and(|v| {
            v["errors"].as_array().is_some_and(|e| {
                e.iter()
                    .any(|e| e.as_str().is_some_and(|e| e.contains(&dead)))
            })
        })
    });
    assert!(found, "no error listed for {dead}: {last:?}");
    let (_, text, _) = run(&["status", s(&l.mnt)], &[]);
    let row = text
        .lines()
        .find(|line| line.trim_start().starts_with(&format!("{dead} ")))
        .unwrap_or_else(|| panic!("no line for {dead}:\n{text}"));
    assert!(row.contains("retrying") && row.contains("reason"), "{row}");
    assert!(wait_until(CATCH_UP, || {
        let (_, body) = http_get(&metrics, "/metrics");
        sample(
            &body,
            &format!("mirrorfs_mirror_errors_total{{mirror=\"{dead}\",kind=\"link\"}}"),
        )
        .is_some_and(|n| n >= 1.0)
            && sample(
                &body,
                &format!("mirrorfs_mirror_reconnects_total{{mirror=\"{dead}\"}}"),
            )
            .is_some_and(|n| n >= 1.0)
            && sample(
                &body,
                &format!("mirrorfs_mirror_state{{mirror=\"{dead}\",state=\"retrying\"}}"),
            ) == Some(1.0)
    }));
    r.stop();
}
