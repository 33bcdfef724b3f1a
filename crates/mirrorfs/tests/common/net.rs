//! The network helpers of the integration tests that run `mirrorfs serve` daemons: identities
//! made with `mirrorfs init` and pinned with `mirrorfs trust` ([`Net`]), the daemon guard
//! ([`Serve`], on loopback or inside a network namespace), and small command helpers.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{
    mirrorfs_in, mkdir755, pattern, summarize, sys, tail, temp_base, tree_diff, Cmp, Layout, Mount,
    BIN,
};

/// Removes ANSI colour sequences (tracing colours its output even into files).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            it.next();
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The first port [`free_port`] hands out: below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`, 32768-60999 by default), from which every outgoing
/// connection takes its source port. A port taken from that range (bind port 0, close, pass the
/// number on) could be given to another connection's source before the site binds it: a
/// test's link then spent its timeout connecting to a server it did not trust.
const PORTS_FROM: u16 = 20_000;
/// How many ports [`free_port`] cycles through.
const PORTS: u16 = 12_000;

/// A port nobody listens on right now, outside the ephemeral range ([`PORTS_FROM`]): each
/// call in a process takes the next one from a start that depends on the process id (test
/// binaries of other runs), and skips ports it cannot bind for TCP and UDP on loopback.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..PORTS {
        let k = start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % u32::from(PORTS);
        let port = PORTS_FROM + k as u16;
        let tcp = TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free port in {PORTS_FROM}..{}", PORTS_FROM + PORTS)
}

pub fn run(args: &[&OsStr]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run mirrorfs")
}

pub fn run_ok(args: &[&OsStr]) -> String {
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

pub fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

pub fn signal_pid(pid: u32, sig: i32) {
    // SAFETY: kill(2) on the pid of a child process this test owns and has not reaped.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// Each thread of `pid`: its name and kernel stack (`/proc/PID/task/*/stack`), for a hang.
pub fn thread_stacks(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.filter_map(|t| t.ok()) {
        let p = t.path();
        let name = fs::read_to_string(p.join("comm")).unwrap_or_default();
        let stack = fs::read_to_string(p.join("stack")).unwrap_or_default();
        let wchan = fs::read_to_string(p.join("wchan")).unwrap_or_default();
        out.push_str(&format!(
            "-- {} {} (wchan {wchan})\n{stack}",
            t.file_name().to_string_lossy(),
            name.trim()
        ));
    }
    out
}
// ---------------------------------------------------------------------------------------------
// Identities

/// One machine's configuration directory (`mirrorfs init --config DIR`) and fingerprint.
pub struct Ident {
    pub dir: PathBuf,
    pub fp: String,
}

pub fn init_identity(dir: &Path, name: &str) -> Ident {
    let out = run_ok(&[
        os("init"),
        os("--config"),
        dir.as_os_str(),
        os("--name"),
        os(name),
    ]);
    let fp = out
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint: "))
        .unwrap_or_else(|| panic!("`mirrorfs init` printed no fingerprint:\n{out}"))
        .trim()
        .to_string();
    assert!(fp.starts_with("blake3:") && fp.len() == 71, "{fp}");
    Ident {
        dir: dir.to_path_buf(),
        fp,
    }
}

pub fn trust(who: &Ident, peer: &Ident, name: &str) {
    let out = run_ok(&[
        os("trust"),
        os("--config"),
        who.dir.as_os_str(),
        os(&peer.fp),
        os(name),
    ]);
    assert!(out.contains("now trusting"), "{out}");
}

/// A test's directories: a temporary base with the primary's and the mirror's configuration
/// (trusting each other) and the mirror daemons' directories.
pub struct Net {
    pub base: PathBuf,
    pub primary: Ident,
    pub mirror: Ident,
    /// Dropped last.
    _tmp: tempfile::TempDir,
}

impl Net {
    pub fn new(tag: &str) -> Net {
        Net::with_trust(tag, true, true)
    }

    /// `mirror_trusts`: the daemon trusts the primary; `primary_trusts`: the primary trusts the
    /// daemon. Untrusting sides trust a stranger instead (so they have a non-empty peers list).
    pub fn with_trust(tag: &str, mirror_trusts: bool, primary_trusts: bool) -> Net {
        let tmp = temp_base(&format!("net-{tag}"));
        let base = tmp.path().canonicalize().expect("canonicalize");
        let primary = init_identity(&base.join("cfg-primary"), "primary");
        let mirror = init_identity(&base.join("cfg-mirror"), "mirror");
        let stranger = init_identity(&base.join("cfg-stranger"), "stranger");
        if primary_trusts {
            trust(&primary, &mirror, "mirror");
        } else {
            trust(&primary, &stranger, "stranger");
        }
        if mirror_trusts {
            trust(&mirror, &primary, "primary");
        } else {
            trust(&mirror, &stranger, "stranger");
        }
        Net {
            base,
            primary,
            mirror,
            _tmp: tmp,
        }
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        let d = self.base.join(name);
        mkdir755(&d);
        d
    }

    /// Starts a daemon serving `BASE/name` on a free port.
    pub fn serve(&self, name: &str, extra: &[&str]) -> Serve {
        let dir = self.dir(name);
        Serve::start(
            &dir,
            &self.mirror.dir,
            free_port(),
            &self.base.join(format!("serve-{name}.log")),
            extra,
        )
    }

    /// Mounts a fresh layout (with `n_local` local mirrors) with `--mirror URL --config PRIMARY`
    /// and `extra` arguments.
    pub fn mount(&self, tag: &str, n_local: usize, url: &str, extra: &[&str]) -> Mount {
        self.mount_in(tag, n_local, url, extra, None)
    }

    /// [`Net::mount`] with `mirrorfs mount` in network namespace `netns`, when given.
    pub fn mount_in(
        &self,
        tag: &str,
        n_local: usize,
        url: &str,
        extra: &[&str],
        netns: Option<&str>,
    ) -> Mount {
        let layout = Layout::new(tag, n_local);
        let cfg = self.primary.dir.display().to_string();
        let mut args = vec!["--mirror", url, "--config", cfg.as_str()];
        args.extend_from_slice(extra);
        Mount::start_in(layout, &args, netns)
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon guard

/// A running `mirrorfs serve DIR --listen 127.0.0.1:PORT --config CFG`. Stopped (SIGCONT,
/// SIGTERM, then SIGKILL) on drop.
pub struct Serve {
    child: Option<Child>,
    pub dir: PathBuf,
    pub port: u16,
    config: PathBuf,
    extra: Vec<OsString>,
    log: PathBuf,
    starts: usize,
    /// The address it listens on (127.0.0.1, or its network namespace's).
    host: String,
    /// Run inside this network namespace (`nsenter --net`).
    netns: Option<String>,
}

impl Serve {
    pub fn start(dir: &Path, config: &Path, port: u16, log: &Path, extra: &[&str]) -> Serve {
        Serve::start_at(dir, config, port, log, extra, None)
    }

    /// [`Serve::start`] inside a network namespace: `at` is (the address to listen on there, the
    /// namespace's name as `ip netns` lists it).
    pub fn start_at(
        dir: &Path,
        config: &Path,
        port: u16,
        log: &Path,
        extra: &[&str],
        at: Option<(&str, &str)>,
    ) -> Serve {
        let mut s = Serve {
            child: None,
            dir: dir.to_path_buf(),
            port,
            config: config.to_path_buf(),
            extra: extra.iter().map(OsString::from).collect(),
            log: log.to_path_buf(),
            starts: 0,
            host: at.map_or("127.0.0.1".into(), |(host, _)| host.to_string()),
            netns: at.map(|(_, ns)| ns.to_string()),
        };
        s.spawn();
        s
    }

    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "serve".into(),
            self.dir.clone().into(),
            "--listen".into(),
            format!("{}:{}", self.host, self.port).into(),
            "--config".into(),
            self.config.clone().into(),
        ];
        a.extend(self.extra.iter().cloned());
        a
    }

    pub fn url(&self) -> String {
        format!("mirror://{}:{}", self.host, self.port)
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "the daemon is already running");
        self.starts += 1;
        let mut logf = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the daemon log");
        let _ = writeln!(logf, "---- serve start #{} ----", self.starts);
        let child = mirrorfs_in(self.netns.as_deref())
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf)
            .spawn()
            .expect("spawn mirrorfs serve");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if self.log().matches("listening on").count() >= self.starts {
                return;
            }
            let c = self.child.as_mut().expect("child");
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                panic!(
                    "mirrorfs {:?} exited ({st}) before listening; its log:\n{}",
                    self.args(),
                    self.log()
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the daemon did not listen within 30 s; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon is not running").id()
    }

    pub fn signal(&self, sig: i32) {
        signal_pid(self.pid(), sig);
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("kill9: the daemon is not running");
        signal_pid(c.id(), libc::SIGKILL);
        let _ = c.wait();
    }

    /// SIGTERM; the daemon must exit with status 0 within 30 s.
    pub fn stop(&mut self) {
        self.stop_within(Duration::from_secs(30));
    }

    /// SIGTERM; the daemon must exit with status 0 within `limit`, its last log line saying it
    /// stopped. Returns how long it took. On a hang, the threads' kernel stacks and names are
    /// in the failure message.
    pub fn stop_within(&mut self, limit: Duration) -> Duration {
        let mut c = self.child.take().expect("stop: the daemon is not running");
        signal_pid(c.id(), libc::SIGCONT);
        signal_pid(c.id(), libc::SIGTERM);
        let t0 = Instant::now();
        let st = loop {
            if let Ok(Some(st)) = c.try_wait() {
                break st;
            }
            if t0.elapsed() > limit {
                let threads = thread_stacks(c.id());
                signal_pid(c.id(), libc::SIGKILL);
                let _ = c.wait();
                panic!(
                    "the daemon did not stop within {limit:?} of SIGTERM; its threads:\n{threads}\nits log:\n{}",
                    tail(&self.log(), 60)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = t0.elapsed();
        assert!(st.success(), "the daemon exited with {st}:\n{}", self.log());
        let log = self.log();
        let last = log
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        assert!(
            last.contains("stopped"),
            "the daemon's last log line does not say it stopped: {last:?}\n{}",
            tail(&log, 40)
        );
        took
    }

    pub fn restart(&mut self) {
        self.spawn();
    }

    /// `mirrorfs status DIR --json`, parsed; `None` while it fails.
    pub fn status(&self) -> Option<Value> {
        let o = run(&[os("status"), self.dir.as_os_str(), os("--json")]);
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    pub fn log(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.log).unwrap_or_default())
    }
}

impl Drop for Serve {
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

// ---------------------------------------------------------------------------------------------
// Capturing UDP datagrams

/// An `AF_PACKET` socket (root) that sees the IPv4 packets of network device `ifname` in the
/// calling thread's network namespace (`lo`, or a WAN emulator side's device when made inside
/// `Wan::within`), with a 100 ms receive timeout.
pub fn packet_socket(ifname: &str) -> OwnedFd {
    let proto = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: plain socket calls on a descriptor this function owns; the buffers passed are as
    // long as said.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto)) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = CString::new(ifname).expect("a device name without NUL");
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index > 0, "no network device {ifname}");
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        r,
        0,
        "bind to {ifname}: {}",
        std::io::Error::last_os_error()
    );
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    fd
}

/// The payloads of UDP datagrams to `dst`:`port` seen by a [`packet_socket`], each once, at
/// most `max`.
pub struct Capture {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    /// On the loopback, to 127.0.0.1:`port`.
    pub fn start(port: u16, max: usize) -> Capture {
        Capture::on(packet_socket("lo"), [127, 0, 0, 1], port, max)
    }

    pub fn on(fd: OwnedFd, dst: [u8; 4], port: u16, max: usize) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut seen = std::collections::HashSet::new();
            let mut out = Vec::new();
            let mut buf = vec![0u8; 65_536];
            while !s.load(Ordering::Acquire) && out.len() < max {
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                let Ok(n) = usize::try_from(n) else { continue };
                let ip = &buf[..n];
                let ihl = usize::from(ip.first().copied().unwrap_or(0) & 0xf) * 4;
                if n < ihl + 8 || ip[9] != 17 || ip[16..20] != dst {
                    continue;
                }
                let udp = &ip[ihl..];
                if u16::from_be_bytes([udp[2], udp[3]]) != port {
                    continue;
                }
                let payload = udp[8..].to_vec();
                if seen.insert(payload.clone()) {
                    out.push(payload);
                }
            }
            out
        });
        Capture {
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Release);
        self.handle
            .take()
            .map(|h| h.join().expect("capture thread"))
            .unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// How long a mirror may take to converge after a fault (generous: 2 shared cores, debug build).
pub const CONVERGE: Duration = Duration::from_secs(120);
/// How long a link may take to (re)connect, back-off included.
pub const CONNECT: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------------------------------------
// Status and convergence

/// Both logs' last lines, for failure messages.
pub fn ctx(m: &Mount, s: &Serve) -> String {
    format!(
        "---- primary log (tail) ----\n{}\n---- daemon log (tail) ----\n{}",
        tail(&strip_ansi(&m.log()), 40),
        tail(&s.log(), 40)
    )
}

pub fn num(v: &Value, k: &str) -> u64 {
    v.get(k)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no number `{k}` in {v}"))
}

/// The remote mirror's entry in a mount's status.
pub fn remote_of(st: &Value) -> Value {
    st["mirrors"]
        .as_array()
        .and_then(|ms| {
            ms.iter().find(|m| {
                m["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("mirror://"))
            })
        })
        .cloned()
        .unwrap_or_else(|| panic!("no remote mirror in status {st}"))
}

/// Waits until the mount's status satisfies `pred` (given the whole status and the remote
/// mirror's entry); returns that status.
pub fn wait_status(
    m: &Mount,
    s: &Serve,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Value, &Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    let t0 = Instant::now();
    loop {
        if let Some(st) = m.status() {
            let r = remote_of(&st);
            if pred(&st, &r) {
                return st;
            }
            last = st;
        }
        assert!(
            t0.elapsed() < timeout,
            "timed out ({timeout:?}) waiting for {what}; last status:\n{}\n{}",
            serde_json::to_string_pretty(&last).unwrap_or_default(),
            ctx(m, s)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn connected_live(r: &Value) -> bool {
    r["state"] == "live" && r["link"]["connected"] == true
}

pub fn wait_live(m: &Mount, s: &Serve) -> Value {
    wait_status(
        m,
        s,
        CONNECT,
        "the remote mirror to be connected and live",
        |_, r| connected_live(r),
    )
}

/// Everything but mtimes: after a kill -9 of the primary, a change and the mtime record that
/// follows it can be split (a known limit, see tests/crash.rs).
pub const NO_MTIME: Cmp = Cmp {
    mtime: false,
    owner: true,
    holes: true,
};

pub fn nlink(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(p).map(|m| m.nlink()).unwrap_or(0)
}

/// [`tree_diff`], except for the root's link count when only one side has a `.mirrorfs`
/// directory (a primary's or a daemon's state, which the comparison leaves out).
pub fn diff(a: &Path, b: &Path, cmp: &Cmp) -> Vec<String> {
    let mut d = tree_diff(a, b, cmp);
    let (sa, sb) = (a.join(".mirrorfs").is_dir(), b.join(".mirrorfs").is_dir());
    if sa != sb && nlink(a) + u64::from(sb) == nlink(b) + u64::from(sa) {
        d.retain(|l| !l.starts_with("/ (root): nlink differs"));
    }
    d
}

pub fn assert_same(a: &Path, b: &Path, cmp: &Cmp) {
    let d = diff(a, b, cmp);
    assert!(
        d.is_empty(),
        "{} and {} differ, {} difference(s):\n{}",
        a.display(),
        b.display(),
        d.len(),
        summarize(&d)
    );
}

/// Waits until `mirror` equals `backing`, polling every 200 ms.
pub fn wait_converged(
    backing: &Path,
    mirror: &Path,
    what: &str,
    cmp: &Cmp,
    context: &dyn Fn() -> String,
) {
    let t0 = Instant::now();
    let mut last;
    loop {
        last = diff(backing, mirror, cmp);
        if last.is_empty() {
            return;
        }
        if t0.elapsed() > CONVERGE {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "{what}: mirror {} did not converge to {} within {CONVERGE:?}; {} difference(s):\n{}\n{}",
        mirror.display(),
        backing.display(),
        last.len(),
        summarize(&last),
        context()
    );
}

pub fn converge(m: &Mount, s: &Serve, what: &str) {
    wait_converged(m.backing(), &s.dir, what, &Cmp::FULL, &|| ctx(m, s));
}

pub fn converge_no_mtime(m: &Mount, s: &Serve, what: &str) {
    wait_converged(m.backing(), &s.dir, what, &NO_MTIME, &|| ctx(m, s));
}

/// Entries of `dir` other than `.mirrorfs`.
pub fn visible_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".mirrorfs")
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// Workloads

/// Files, directories, rename, unlink, symlinks, a hard link, chmod, an xattr, truncate, rmdir.
pub fn small_workload(mnt: &Path, tag: u64) {
    fs::create_dir_all(mnt.join("d1/sub")).expect("mkdir d1/sub");
    fs::create_dir(mnt.join("d2")).expect("mkdir d2");
    for i in 0..6u64 {
        fs::write(
            mnt.join(format!("f{i}")),
            pattern(tag * 100 + i, 500 + 3000 * i as usize),
        )
        .expect("write f*");
    }
    fs::write(mnt.join("d1/sub/deep"), b"deep file\n").expect("write deep");
    fs::rename(mnt.join("f0"), mnt.join("d1/f0-renamed")).expect("rename f0");
    fs::remove_file(mnt.join("f1")).expect("unlink f1");
    std::os::unix::fs::symlink("f2", mnt.join("link-to-f2")).expect("symlink");
    std::os::unix::fs::symlink("../nowhere", mnt.join("d1/dangling")).expect("symlink");
    fs::hard_link(mnt.join("f2"), mnt.join("d1/sub/f2-hard")).expect("link");
    fs::set_permissions(mnt.join("f3"), fs::Permissions::from_mode(0o600)).expect("chmod f3");
    fs::set_permissions(mnt.join("d1/sub"), fs::Permissions::from_mode(0o750)).expect("chmod");
    sys::lsetxattr(&mnt.join("f4"), "user.mirrorfs.test", b"xattr value", 0)
        .unwrap_or_else(|e| panic!("setxattr: {}", sys::errname(e)));
    sys::truncate(&mnt.join("f5"), 100).unwrap_or_else(|e| panic!("truncate: {}", sys::errname(e)));
    fs::rename(mnt.join("d2"), mnt.join("d1/d2-moved")).expect("rename dir");
    fs::create_dir(mnt.join("gone")).expect("mkdir gone");
    fs::remove_dir(mnt.join("gone")).expect("rmdir gone");
}

/// Writes `mib` MiB of patterned data to `path` in 1 MiB writes.
pub fn write_big(path: &Path, mib: usize, seed: u64) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    for i in 0..mib {
        f.write_all(&pattern(seed + i as u64, 1 << 20))
            .unwrap_or_else(|e| panic!("write {} MiB {i}: {e}", path.display()));
    }
}
