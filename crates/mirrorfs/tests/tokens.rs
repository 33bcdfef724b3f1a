//! Two writable sites with real mounts on this machine (issue 7 item 5): two backing
//! directories, two `mirrorfs mount ... --peer mirror://127.0.0.1:PORT --receive 127.0.0.1:PORT`
//! processes streaming to each other over loopback TLS, each trusting the other's identity.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{pattern, temp_base, tree_diff, wait_until, Cmp, Layout, Mount, BIN};

/// How long a change may take to reach the other site (2 shared cores, debug build).
const ARRIVE: Duration = Duration::from_secs(60);

fn run_ok(args: &[&OsStr]) -> String {
    let o: Output = Command::new(BIN).args(args).output().expect("run mirrorfs");
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// `mirrorfs init --config DIR`; returns the fingerprint.
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

fn trust(dir: &Path, fp: &str, name: &str) {
    let out = run_ok(&[os("trust"), os("--config"), dir.as_os_str(), os(fp), os(name)]);
    assert!(out.contains("now trusting"), "{out}");
}

/// Two writable sites, `a` and `b`, each the other's peer.
struct Pair {
    a: Mount,
    b: Mount,
    _tmp: tempfile::TempDir,
}

impl Pair {
    fn new(tag: &str, extra: &[&str]) -> Pair {
        let tmp = temp_base(&format!("tokens-{tag}"));
        let base = tmp.path().canonicalize().expect("canonicalize");
        let (ca, cb) = (base.join("cfg-a"), base.join("cfg-b"));
        let (fa, fb) = (init_identity(&ca, "site-a"), init_identity(&cb, "site-b"));
        trust(&ca, &fb, "site-b");
        trust(&cb, &fa, "site-a");
        let (pa, pb) = (free_port(), free_port());
        let site = |me: &Path, listen: u16, peer: u16, tag: &str| -> Mount {
            let peer = format!("mirror://127.0.0.1:{peer}");
            let listen = format!("127.0.0.1:{listen}");
            let cfg = me.display().to_string();
            let mut args = vec![
                "--peer",
                peer.as_str(),
                "--receive",
                listen.as_str(),
                "--config",
                cfg.as_str(),
            ];
            args.extend_from_slice(extra);
            Mount::start(Layout::new(tag, 0), &args)
        };
        let a = site(&ca, pa, pb, &format!("{tag}-a"));
        let b = site(&cb, pb, pa, &format!("{tag}-b"));
        Pair { a, b, _tmp: tmp }
    }

    /// Waits until both backing trees hold the same files (contents, modes, owners).
    fn wait_equal(&self) {
        let mut last = Vec::new();
        let ok = wait_until(ARRIVE, || {
            last = tree_diff(self.a.backing(), self.b.backing(), &Cmp::NO_TIMES);
            last.is_empty()
        });
        assert!(
            ok,
            "the sites differ after {ARRIVE:?}: {last:#?}\nsite a:\n{}\nsite b:\n{}",
            self.a.log(),
            self.b.log()
        );
    }
}

fn write_file(p: PathBuf, data: &[u8]) {
    fs::write(&p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

#[test]
fn disjoint_files_written_at_both_sites_at_once_arrive_at_the_other_site() {
    let pair = Pair::new("disjoint", &[]);
    let n = 20u64;
    std::thread::scope(|s| {
        for (site, name) in [(&pair.a, "a"), (&pair.b, "b")] {
            s.spawn(move || {
                fs::create_dir(site.p(format!("dir-{name}"))).expect("mkdir");
                for i in 0..n {
                    let data = pattern(i + 1000 * u64::from(name == "b"), 5000 + i as usize);
                    write_file(site.p(format!("dir-{name}/f{i}")), &data);
                }
            });
        }
    });
    pair.wait_equal();
    for i in 0..n {
        let want = pattern(i + 1000, 5000 + i as usize);
        let got = fs::read(pair.a.p(format!("dir-b/f{i}"))).expect("b's file read at a");
        assert_eq!(got, want, "b's file {i} as a's mount shows it");
        let want = pattern(i, 5000 + i as usize);
        let got = fs::read(pair.b.p(format!("dir-a/f{i}"))).expect("a's file read at b");
        assert_eq!(got, want, "a's file {i} as b's mount shows it");
    }
    // No echo: each change travelled once; the sites are still equal a moment later, and a
    // change made after all that still arrives (the streams did not stop on an echo).
    std::thread::sleep(Duration::from_secs(2));
    write_file(pair.b.p("late"), b"after the echo window");
    pair.wait_equal();
    assert_eq!(
        fs::read(pair.a.p("late")).expect("late at a"),
        b"after the echo window"
    );
    let log = pair.a.log() + &pair.b.log();
    assert!(!log.contains("failed here"), "no peer record failed:\n{log}");
}
