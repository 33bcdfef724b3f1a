//! The README's walkthroughs, run as written (issue 10 item 9), on real mounts: every code block
//! of README.md is preceded by `<!-- run: NAME -->` (run here, by the runner of that name) or
//! `<!-- not run: REASON -->` (it cannot run on one machine); a block with neither fails the test,
//! so a new block cannot be added unchecked. The commands are the README's own text, with its
//! paths (/srv, /mnt, /backup, /usr, /etc/mirrorfs) moved under a temporary directory and the
//! metrics port made free; `mirrorfs` is the binary under test. (Every `mirrorfs` line, run or
//! not, is also parsed by the real command-line definition: `src/readme_check.rs`.)

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{is_mounted, lazy_unmount, wait_until, BIN, MOUNT_TIMEOUT, UNMOUNT_TIMEOUT};

const README: &str = include_str!("../../../README.md");

/// A code block: the README line of its first line, its marker, its lines.
#[derive(Debug)]
struct Block {
    line: usize,
    marker: Option<String>,
    lang: String,
    text: Vec<String>,
}

/// The README's code blocks (indented after a blank line, or fenced) with the HTML comment that
/// precedes each (the last non-blank line before it, if it is one).
fn blocks(md: &str) -> Vec<Block> {
    let lines: Vec<&str> = md.lines().collect();
    let mut out: Vec<Block> = Vec::new();
    let mut i = 0;
    let marker_before = |start: usize| -> Option<String> {
        let prev = lines[..start].iter().rev().find(|l| !l.trim().is_empty())?;
        let t = prev.trim();
        let inner = t.strip_prefix("<!--")?.strip_suffix("-->")?;
        Some(inner.trim().to_string())
    };
    while i < lines.len() {
        let l = lines[i];
        if let Some(lang) = l.strip_prefix("```") {
            let start = i;
            let mut text = Vec::new();
            i += 1;
            while i < lines.len() && !lines[i].starts_with("```") {
                text.push(lines[i].to_string());
                i += 1;
            }
            out.push(Block {
                line: start + 1,
                marker: marker_before(start),
                lang: lang.trim().to_string(),
                text,
            });
        } else if l.starts_with("    ") && (i == 0 || lines[i - 1].trim().is_empty()) {
            let start = i;
            let mut text = Vec::new();
            while i < lines.len() && (lines[i].starts_with("    ") || lines[i].trim().is_empty()) {
                text.push(lines[i].get(4..).unwrap_or("").to_string());
                i += 1;
            }
            while text.last().is_some_and(|t| t.trim().is_empty()) {
                text.pop();
            }
            out.push(Block {
                line: start + 1,
                marker: marker_before(start),
                lang: String::new(),
                text,
            });
            continue;
        }
        i += 1;
    }
    out
}

/// The commands of a shell block: `\` continuations joined, blank lines dropped.
fn commands(b: &Block) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for l in &b.text {
        let l = l.trim_end();
        if let Some(head) = l.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
        } else {
            cur.push_str(l);
            if !cur.trim().is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            cur.clear();
        }
    }
    out
}

/// A temporary root standing in for `/`, a `mirrorfs` on PATH, and the mounts started.
struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    mounts: Vec<(Child, PathBuf)>,
    /// The configuration directory commands get (`/etc/mirrorfs` unless a runner plays a host).
    config: Option<PathBuf>,
    /// Daemons (`mirrorfs serve`) started, killed on drop.
    daemons: Vec<Child>,
}

/// The result of one README command.
#[derive(Debug)]
struct Ran {
    cmd: String,
    code: i32,
    out: String,
    err: String,
}

impl Env {
    fn new(tag: &str) -> Env {
        let tmp = common::temp_base(tag);
        let root = tmp.path().join("root");
        let bin_dir = tmp.path().join("bin");
        fs::create_dir_all(&root).expect("mkdir root");
        fs::create_dir_all(&bin_dir).expect("mkdir bin");
        std::os::unix::fs::symlink(BIN, bin_dir.join("mirrorfs")).expect("symlink mirrorfs");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Env {
            _tmp: tmp,
            root,
            bin_dir,
            port,
            mounts: Vec::new(),
            config: None,
            daemons: Vec::new(),
        }
    }

    /// `/x/...` → `ROOT/x/...` for the README's system paths; the metrics port made free.
    fn local(&self, s: &str) -> String {
        let r = self.root.display().to_string();
        let mut s = s.replace("127.0.0.1:9108", &format!("127.0.0.1:{}", self.port));
        for p in ["/srv/", "/mnt/", "/backup", "/usr/", "/etc/mirrorfs"] {
            s = s
                .replace(&format!(" {p}"), &format!(" {r}{p}"))
                .replace(&format!("\"{p}"), &format!("\"{r}{p}"))
                .replace(&format!("={p}"), &format!("={r}{p}"));
        }
        s
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    fn command(&self, line: &str) -> Command {
        let mut c = Command::new("sh");
        let path = format!(
            "{}:{}",
            self.bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        c.arg("-c")
            .arg(line)
            .current_dir(&self.root)
            .env("PATH", path)
            .env(
                "MIRRORFS_CONFIG",
                self.config
                    .clone()
                    .unwrap_or_else(|| self.p("/etc/mirrorfs")),
            )
            .env_remove("MIRRORFS_LOG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }

    /// Runs one README command: a foreground `mirrorfs mount` in the background until its
    /// mountpoint (/mnt/data) is mounted, anything else to its end.
    fn run(&mut self, readme_cmd: &str) -> Ran {
        let line = self.local(readme_cmd);
        if line.trim_start().starts_with("mirrorfs mount ") {
            let mnt = self.p("/mnt/data");
            let log = self.root.join(format!("mount-{}.log", self.mounts.len()));
            let f = fs::File::create(&log).expect("create the log");
            let mut child = self
                .command(&format!("exec {line}"))
                .stdout(f.try_clone().expect("dup"))
                .stderr(f)
                .spawn()
                .expect("spawn sh");
            let t0 = Instant::now();
            while !is_mounted(&mnt) {
                if let Ok(Some(st)) = child.try_wait() {
                    panic!(
                        "`{readme_cmd}` exited ({st}) before mounting:\n{}",
                        fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                assert!(t0.elapsed() < MOUNT_TIMEOUT, "`{readme_cmd}`: no mount");
                std::thread::sleep(Duration::from_millis(10));
            }
            self.mounts.push((child, mnt));
            return Ran {
                cmd: readme_cmd.to_string(),
                code: 0,
                out: String::new(),
                err: String::new(),
            };
        }
        let o = self.command(&line).output().expect("run sh");
        Ran {
            cmd: readme_cmd.to_string(),
            code: o.status.code().unwrap_or(-1),
            out: String::from_utf8_lossy(&o.stdout).into_owned(),
            err: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Runs every command of a block, each expected to exit with the status given (0 unless
    /// listed by index).
    fn run_block(&mut self, b: &Block, codes: &[(usize, i32)]) -> Vec<Ran> {
        let mut out = Vec::new();
        for (i, c) in commands(b).iter().enumerate() {
            let r = self.run(c);
            let want = codes.iter().find(|(j, _)| *j == i).map_or(0, |(_, c)| *c);
            assert_eq!(
                r.code, want,
                "README.md:{}: `{}` exited {} (want {want}):\n{}{}",
                b.line, r.cmd, r.code, r.out, r.err
            );
            out.push(r);
        }
        out
    }

    /// SIGTERM to every mount started, and a clean exit.
    fn unmount_all(&mut self) {
        for (mut child, mnt) in self.mounts.drain(..) {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            let st = loop {
                if let Ok(Some(st)) = child.try_wait() {
                    break st;
                }
                assert!(t0.elapsed() < UNMOUNT_TIMEOUT, "no clean exit");
                std::thread::sleep(Duration::from_millis(20));
            };
            assert!(st.success(), "the mount of {} exited {st}", mnt.display());
            assert!(!is_mounted(&mnt));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for mut d in self.daemons.drain(..) {
            let _ = d.kill();
            let _ = d.wait();
        }
        for (mut child, mnt) in self.mounts.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
            lazy_unmount(&mnt);
        }
    }
}

/// A running mount of /srv/data at /mnt/data mirrored to /backup/data, as the quick start
/// starts it.
fn quick_mount(env: &mut Env) {
    for d in ["/srv/data", "/mnt/data", "/backup/data"] {
        fs::create_dir_all(env.p(d)).expect("mkdir");
    }
    env.run("mirrorfs mount /srv/data /mnt/data --mirror /backup/data");
}

fn wait_file(p: &Path, content: &[u8]) {
    assert!(
        wait_until(Duration::from_secs(30), || fs::read(p)
            .is_ok_and(|c| c == content)),
        "{} never became {:?}",
        p.display(),
        String::from_utf8_lossy(content)
    );
}

fn quick_start(b: &Block, _: &BTreeMap<String, &Block>) {
    let mut env = Env::new("readme-quick");
    let ran = env.run_block(b, &[]);
    fs::write(env.p("/mnt/data/hello.txt"), b"hello\n").expect("write through the mount");
    wait_file(&env.p("/backup/data/hello.txt"), b"hello\n");
    let text = &ran[2].out;
    assert!(
        text.contains("role:primary")
            && text.contains(&env.p("/backup/data").display().to_string()),
        "status: {text}"
    );
    let j: serde_json::Value = serde_json::from_str(&ran[3].out).expect("status --json is JSON");
    assert_eq!(
        j["mirrors"][0]["path"],
        env.p("/backup/data").display().to_string()
    );
    // Once the file is there, the mirror is live.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let r = env.run("mirrorfs status /mnt/data --json");
            serde_json::from_str::<serde_json::Value>(&r.out)
                .is_ok_and(|j| j["mirrors"][0]["state"] == "live")
        }),
        "the mirror never became live"
    );
    env.unmount_all();
}

fn completion_and_man(b: &Block, _: &BTreeMap<String, &Block>) {
    let mut env = Env::new("readme-gen");
    fs::create_dir_all(env.p("/usr/share/bash-completion/completions")).expect("mkdir");
    env.run_block(b, &[]);
    let bash = fs::read_to_string(env.p("/usr/share/bash-completion/completions/mirrorfs"))
        .expect("the bash completion was written");
    assert!(
        bash.contains("_mirrorfs") && bash.contains("verify"),
        "{bash}"
    );
    for page in ["mirrorfs.1", "mirrorfs-mount.1", "mirrorfs-verify.1"] {
        let p = env.p("/usr/local/share/man/man1").join(page);
        let t = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(t.contains(".TH"), "{page} is not a man page");
    }
}

fn config_walkthrough(b: &Block, all: &BTreeMap<String, &Block>) {
    let mut env = Env::new("readme-config");
    let file = all
        .get("config-file")
        .expect("the README has a `run: config-file` block");
    let toml: Vec<String> = file.text.iter().map(|l| env.local(l)).collect();
    fs::create_dir_all(env.p("/etc/mirrorfs")).expect("mkdir");
    fs::write(env.p("/etc/mirrorfs/mirrorfs.toml"), toml.join("\n") + "\n").expect("write");
    for d in ["/srv/data", "/mnt/data", "/backup/data"] {
        fs::create_dir_all(env.p(d)).expect("mkdir");
    }
    let ran = env.run_block(b, &[]);
    assert!(
        ran[0].out.contains(": ok, 1 volume(s), 1 mirror daemon(s)"),
        "config check: {:?}",
        ran[0]
    );
    assert!(
        ran[1].out.contains("mirrorfs.toml:") && ran[1].out.contains("durable"),
        "config show: {}",
        ran[1].out
    );
    assert!(
        ran[3].out.contains("mirrorfs_mirror_lag_seconds{"),
        "metrics: {}",
        ran[3].out
    );
    // The mount took the file's ack mode and the command line's mirror.
    let st = env.run("mirrorfs status /mnt/data");
    assert!(
        st.out.contains("ack:durable") && !st.out.contains("backup1"),
        "status: {}",
        st.out
    );
    env.unmount_all();
}

fn verify_repair(b: &Block, _: &BTreeMap<String, &Block>) {
    let mut env = Env::new("readme-verify");
    quick_mount(&mut env);
    fs::write(env.p("/mnt/data/a.txt"), b"the primary's\n").expect("write");
    wait_file(&env.p("/backup/data/a.txt"), b"the primary's\n");
    // Differences planted directly in the mirror: changed content and a file only it has.
    fs::write(env.p("/backup/data/a.txt"), b"planted!!!!!!\n").expect("plant");
    fs::write(env.p("/backup/data/extra.txt"), b"only here\n").expect("plant");
    // verify: 3; --full: 3; --json: 3; --repair: 3 (the extra file is kept); --delete-extra: 0;
    // resync: 0.
    let ran = env.run_block(b, &[(0, 3), (1, 3), (2, 3), (3, 3)]);
    assert!(
        ran[0].out.contains("a.txt") && ran[0].out.contains("extra.txt"),
        "{}",
        ran[0].out
    );
    assert!(ran[1].out.contains("full (asked"), "{}", ran[1].out);
    let _: serde_json::Value = serde_json::from_str(&ran[2].out).expect("verify --json is JSON");
    assert_eq!(
        fs::read(env.p("/backup/data/a.txt")).expect("read"),
        b"the primary's\n"
    );
    assert!(!env.p("/backup/data/extra.txt").exists());
    assert_eq!(env.run("mirrorfs verify /mnt/data").code, 0);
    env.unmount_all();
}

fn group(b: &Block, _: &BTreeMap<String, &Block>) {
    let mut env = Env::new("readme-group");
    quick_mount(&mut env);
    fs::create_dir_all(env.p("new")).expect("mkdir");
    fs::create_dir_all(env.p("/mnt/data/etc")).expect("mkdir");
    fs::write(env.p("new/config.toml"), b"c\n").expect("write");
    fs::write(env.p("new/routes.toml"), b"r\n").expect("write");
    env.run_block(b, &[]);
    wait_file(&env.p("/backup/data/etc/config.toml"), b"c\n");
    wait_file(&env.p("/backup/data/etc/routes.toml"), b"r\n");
    env.unmount_all();
}

/// `mount -t fuse.mirrorfs` and `umount`: through /sbin/mount.fuse.mirrorfs when installed,
/// else through fuse3's mount.fuse, which runs `mirrorfs` from PATH (the README says both work).
fn mount_helper(b: &Block, _: &BTreeMap<String, &Block>) {
    let mut env = Env::new("readme-helper");
    for d in ["/srv/data", "/mnt/data", "/backup/data"] {
        fs::create_dir_all(env.p(d)).expect("mkdir");
    }
    // mount(8) runs `/sbin/mount.fuse.mirrorfs SOURCE MOUNTPOINT -o OPTIONS` for this line; the
    // test runs the binary under test by that name rather than replacing /sbin's (tests/system.rs
    // does that, through mount(8) itself).
    std::os::unix::fs::symlink(BIN, env.bin_dir.join("mount.fuse.mirrorfs")).expect("symlink");
    let cmds: Vec<String> = commands(b)
        .iter()
        .map(|c| c.replacen("mount -t fuse.mirrorfs ", "mount.fuse.mirrorfs ", 1))
        .collect();
    assert_eq!(cmds.len(), 2, "README.md:{}: mount, then umount", b.line);
    assert!(cmds[0].starts_with("mount.fuse.mirrorfs "), "{}", cmds[0]);
    let r = env.run(&cmds[0]);
    assert_eq!(
        r.code, 0,
        "README.md:{}: `{}`: {}{}",
        b.line, r.cmd, r.out, r.err
    );
    let mnt = env.p("/mnt/data");
    let mounts = fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(mnt.to_str().expect("utf-8")))
        .unwrap_or_else(|| panic!("`{}` mounted nothing", r.cmd));
    assert!(line.contains(" fuse.mirrorfs "), "{line}");
    fs::write(mnt.join("via-helper.txt"), b"x\n").expect("write through the mount");
    wait_file(&env.p("/backup/data/via-helper.txt"), b"x\n");
    let r = env.run(&cmds[1]);
    assert_eq!(
        r.code, 0,
        "README.md:{}: `{}`: {}{}",
        b.line, r.cmd, r.out, r.err
    );
    assert!(!is_mounted(&mnt));
    // The daemon ended cleanly: it let go of the backing directory's lock, so it mounts again.
    assert!(
        wait_until(Duration::from_secs(30), || Command::new("flock")
            .args(["-n", "-x"])
            .arg(env.p("/srv/data"))
            .arg("true")
            .status()
            .is_ok_and(|s| s.success())),
        "the daemon still holds /srv/data after umount"
    );
}

/// The two-machine walkthrough on one machine: each `host$` prompt is a configuration directory
/// of its own, `mirror.example` is 127.0.0.1 and port 7070 a free one; the fingerprints each
/// `init` prints are put where the README says `<...'s fingerprint>`.
fn remote(b: &Block, _: &BTreeMap<String, &Block>) {
    let mut env = Env::new("readme-remote");
    for d in ["/srv/data", "/mnt/data", "/backup/data"] {
        fs::create_dir_all(env.p(d)).expect("mkdir");
    }
    let mut fps: BTreeMap<String, String> = BTreeMap::new();
    let port = env.port.to_string();
    for c in commands(b) {
        let (host, cmd) = c.split_once('$').expect("a `host$` prompt");
        let host = host.trim().to_string();
        env.config = Some(env.root.join(format!("{host}-config")));
        let mut cmd = cmd
            .trim()
            .replace("mirror.example", "127.0.0.1")
            .replace("0.0.0.0:7070", "127.0.0.1:7070")
            .replace(":7070", &format!(":{port}"));
        for (h, fp) in &fps {
            cmd = cmd.replace(&format!("blake3:<{h}'s fingerprint>"), fp);
        }
        assert!(
            !cmd.contains('<'),
            "README.md:{}: unknown placeholder in `{cmd}`",
            b.line
        );
        if cmd.starts_with("mirrorfs serve ") {
            let line = env.local(&cmd);
            let child = env
                .command(&format!("exec {line}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn serve");
            env.daemons.push(child);
            assert!(
                wait_until(MOUNT_TIMEOUT, || std::net::TcpStream::connect((
                    "127.0.0.1",
                    env.port
                ))
                .is_ok()),
                "README.md:{}: `{cmd}` never listened",
                b.line
            );
            continue;
        }
        let r = env.run(&cmd);
        assert_eq!(r.code, 0, "README.md:{}: `{c}`: {}{}", b.line, r.out, r.err);
        if cmd.starts_with("mirrorfs init") {
            let fp = r
                .out
                .lines()
                .find_map(|l| l.strip_prefix("fingerprint: "))
                .unwrap_or_else(|| panic!("`{cmd}` printed no fingerprint: {}", r.out));
            fps.insert(host.clone(), fp.trim().to_string());
        }
    }
    fs::write(env.p("/mnt/data/remote.txt"), b"over TLS\n").expect("write through the mount");
    wait_file(&env.p("/backup/data/remote.txt"), b"over TLS\n");
    env.unmount_all();
}

type Runner = fn(&Block, &BTreeMap<String, &Block>);

/// The runners, by the name in `<!-- run: NAME -->`. `config-file` is a file the
/// `config-walkthrough` runner writes, not a script.
const RUNNERS: &[(&str, Option<Runner>)] = &[
    ("quick-start", Some(quick_start)),
    ("completion-man", Some(completion_and_man)),
    ("mount-helper", Some(mount_helper)),
    ("config-file", None),
    ("config-walkthrough", Some(config_walkthrough)),
    ("verify", Some(verify_repair)),
    ("group", Some(group)),
    ("remote", Some(remote)),
];

#[test]
fn every_readme_block_is_run_or_marked() {
    let all = blocks(README);
    assert!(
        all.len() >= 15,
        "only {} code blocks found in README.md",
        all.len()
    );
    let mut named: BTreeMap<String, &Block> = BTreeMap::new();
    let mut bad = Vec::new();
    for b in &all {
        match b.marker.as_deref() {
            Some(m) if m.starts_with("not run:") && m.len() > "not run:".len() + 3 => {}
            Some(m) if m.starts_with("run:") => {
                let name = m["run:".len()..].trim().to_string();
                if !RUNNERS.iter().any(|(n, _)| *n == name) {
                    bad.push(format!("README.md:{}: no runner named `{name}` in tests/readme.rs", b.line));
                }
                if named.insert(name.clone(), b).is_some() {
                    bad.push(format!("README.md:{}: a second block named `{name}`", b.line));
                }
            }
            _ => bad.push(format!(
                "README.md:{}: a {}code block with neither `<!-- run: NAME -->` nor `<!-- not run: REASON -->` before it:\n    {}",
                b.line,
                if b.lang.is_empty() { String::new() } else { format!("{} ", b.lang) },
                b.text.first().map_or("", String::as_str)
            )),
        }
    }
    for (n, _) in RUNNERS {
        if !named.contains_key(*n) {
            bad.push(format!(
                "tests/readme.rs runs `{n}`, but no README block is marked `<!-- run: {n} -->`"
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// One at a time (as in tests/operate.rs): a process spawned by one test while another has
/// files open on its mount can make that mount's unmount fail with EBUSY.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Each walkthrough in its own test, so that a failure names it.
fn run_named(name: &str) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let all = blocks(README);
    let named: BTreeMap<String, &Block> = all
        .iter()
        .filter_map(|b| {
            let n = b
                .marker
                .as_deref()?
                .strip_prefix("run:")?
                .trim()
                .to_string();
            Some((n, b))
        })
        .collect();
    let b = named
        .get(name)
        .unwrap_or_else(|| panic!("no README block marked `<!-- run: {name} -->`"));
    let runner = RUNNERS
        .iter()
        .find(|(n, _)| *n == name)
        .and_then(|(_, r)| *r)
        .expect("a runner");
    runner(b, &named);
}

#[test]
fn readme_quick_start() {
    run_named("quick-start");
}

#[test]
fn readme_completion_and_man() {
    run_named("completion-man");
}

#[test]
fn readme_mount_helper() {
    run_named("mount-helper");
}

#[test]
fn readme_config_file() {
    run_named("config-walkthrough");
}

#[test]
fn readme_verify_and_repair() {
    run_named("verify");
}

#[test]
fn readme_remote_mirror() {
    run_named("remote");
}

#[test]
fn readme_group() {
    run_named("group");
}
