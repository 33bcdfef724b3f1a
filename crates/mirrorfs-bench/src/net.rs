//! The network target (`mirrorfs-net`): a `mirrorfs serve` daemon on
//! loopback and a mount with `--mirror mirror://127.0.0.1:PORT`, both with
//! identities made for the run (`mirrorfs init --config DIR`, `mirrorfs
//! trust --config DIR FP NAME`) in the run's temp dir. Nothing here runs
//! unless the target is selected.
//!
//! Each setting (plain, `--compress`, `--ack durable`) gets a fresh backing
//! dir, mirror dir and daemon. Positions come from the mount's live
//! Prometheus gauges (`--metrics`, computed on each request by the same
//! snapshot as `mirrorfs status --json`, whose file is only refreshed every
//! 250 ms) and are confirmed with `mirrorfs status MNT --json`; byte counts
//! are `mirrors[0].link.bytes_sent` from `mirrorfs status MNT --json`.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::mounts::{log_tail, Mount, Proc};
use crate::report::{Goal, Metric, NetRow, TargetReport};
use crate::workloads::{self, MIB};
use crate::{check_interrupted, Sizes};

const CHUNK: usize = 1024 * 1024;
/// Poll interval of the live gauges while timing replication.
const METRICS_POLL: Duration = Duration::from_millis(5);
/// How long to wait for a daemon to listen or a link to become live.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Waiting this long after a change guarantees a fresh `status.json` (250 ms cycle).
const STATUS_FRESH: Duration = Duration::from_millis(600);
/// 4 KiB overwrite target: 8 KiB of payload plus this much framing (frame
/// and record headers, TLS records, heartbeats).
const FRAMING_ALLOWANCE: f64 = 1024.0;

/// What the network target needs from the run.
pub struct NetCtx<'a> {
    pub bin: &'a Path,
    pub dir: &'a Path,
    pub sizes: &'a Sizes,
    pub seed: u64,
    pub settle_timeout: Duration,
    /// The local mirrorfs target's report (lag baselines), if it ran.
    pub local: Option<&'a TargetReport>,
}

/// Run `BIN ARGS...`, return stdout; a failure carries stderr.
fn run_cmd(bin: &Path, args: &[&std::ffi::OsStr]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "`{} {}` failed ({}): {}",
            bin.display(),
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `mirrorfs init --config DIR --name NAME`; returns the fingerprint.
fn init_identity(bin: &Path, cfg: &Path, name: &str) -> Result<String> {
    let out = run_cmd(
        bin,
        &[
            "init".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
            "--name".as_ref(),
            name.as_ref(),
        ],
    )?;
    out.lines()
        .find_map(|l| l.strip_prefix("fingerprint: "))
        .map(|f| f.trim().to_string())
        .with_context(|| format!("no `fingerprint:` line in the output of mirrorfs init: {out}"))
}

fn trust(bin: &Path, cfg: &Path, fp: &str, name: &str) -> Result<()> {
    run_cmd(
        bin,
        &[
            "trust".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
            fp.as_ref(),
            name.as_ref(),
        ],
    )?;
    Ok(())
}

/// Configuration dirs of the two machines, each trusting the other.
pub struct Identities {
    pub primary: PathBuf,
    pub mirror: PathBuf,
}

pub fn make_identities(bin: &Path, dir: &Path) -> Result<Identities> {
    let primary = dir.join("config-primary");
    let mirror = dir.join("config-mirror");
    let fp_p = init_identity(bin, &primary, "bench-primary")?;
    let fp_m = init_identity(bin, &mirror, "bench-mirror")?;
    trust(bin, &primary, &fp_m, "bench-mirror")?;
    trust(bin, &mirror, &fp_p, "bench-primary")?;
    Ok(Identities { primary, mirror })
}

/// A port on 127.0.0.1 that was free a moment ago.
pub(crate) fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind a loopback port")?;
    Ok(l.local_addr().context("no local address")?.port())
}

/// Is something listening on 127.0.0.1:PORT (per /proc/net/tcp)?
pub(crate) fn listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A")
        })
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The fields of `mirrorfs status MNT --json` used here (first mirror).
#[derive(Debug, Clone)]
struct Status {
    last_seq: u64,
    durable: u64,
    applied: u64,
    state: String,
    connected: bool,
    bytes_sent: u64,
    bytes_received: u64,
    /// Bytes received on the connection of the last completed reintegration.
    reintegration_received: u64,
    reintegration_sent: u64,
    reconnects: u64,
    since_unix: u64,
}

fn parse_status(v: &serde_json::Value) -> Result<Status> {
    let u = |v: &serde_json::Value, k: &str| -> Result<u64> {
        v.get(k)
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("no numeric `{k}` in the status JSON"))
    };
    let m = v
        .get("mirrors")
        .and_then(|m| m.get(0))
        .context("no mirrors[0] in the status JSON")?;
    let link = m
        .get("link")
        .context("no mirrors[0].link in the status JSON")?;
    Ok(Status {
        last_seq: u(v, "journal_next_seq")?.saturating_sub(1),
        durable: u(m, "durable_seq")?,
        applied: u(m, "applied_seq")?,
        state: m
            .get("state")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?")
            .to_string(),
        connected: link
            .get("connected")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false),
        bytes_sent: u(link, "bytes_sent")?,
        bytes_received: u(link, "bytes_received")?,
        reintegration_received: u(link, "reintegration_bytes_received").unwrap_or(0),
        reintegration_sent: u(link, "reintegration_bytes_sent").unwrap_or(0),
        reconnects: u(link, "reconnects")?,
        since_unix: u(link, "since_unix")?,
    })
}

/// `mirrorfs status PATH --json`, parsed (a mount point's first mirror).
fn status_of(bin: &Path, path: &Path) -> Result<Status> {
    let out = run_cmd(
        bin,
        &["status".as_ref(), path.as_os_str(), "--json".as_ref()],
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&out).context("cannot parse `mirrorfs status --json`")?;
    parse_status(&v)
}

/// The live gauges used here.
#[derive(Debug, Clone, Copy, Default)]
struct Gauges {
    last_seq: u64,
    journal_durable: u64,
    durable: u64,
    applied: u64,
    lag_bytes: u64,
}

fn parse_metrics(text: &str) -> Result<Gauges> {
    let mut g = Gauges::default();
    let mut seen = 0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let mut it = line.split_whitespace();
        let (Some(key), Some(val)) = (it.next(), it.next()) else {
            continue;
        };
        let name = key.split('{').next().unwrap_or(key);
        let Ok(v) = val.parse::<f64>() else { continue };
        // Gauges are printed as f64; seqs and byte counts stay far below 2^53.
        let v = v as u64;
        let slot = match name {
            "mirrorfs_journal_last_seq" => &mut g.last_seq,
            "mirrorfs_journal_durable_seq" => &mut g.journal_durable,
            "mirrorfs_mirror_durable_seq" => &mut g.durable,
            "mirrorfs_mirror_applied_seq" => &mut g.applied,
            "mirrorfs_mirror_lag_bytes" => &mut g.lag_bytes,
            _ => continue,
        };
        *slot = v;
        seen += 1;
    }
    if seen < 5 {
        bail!("incomplete metrics: {text:?}");
    }
    Ok(g)
}

/// `BIN serve DIR --listen 127.0.0.1:PORT --config CFG`, once it listens.
pub(crate) fn spawn_daemon(
    bin: &Path,
    dir: &Path,
    port: u16,
    cfg: &Path,
    log: &Path,
) -> Result<Proc> {
    let args: Vec<OsString> = vec![
        "serve".into(),
        dir.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}").into(),
        "--config".into(),
        cfg.into(),
    ];
    let mut p = Proc::spawn("mirrorfs serve", bin, &args, log)?;
    let t0 = Instant::now();
    while !listening(port) {
        check_interrupted()?;
        if let Some(st) = p.try_exit_status()? {
            bail!(
                "mirrorfs serve exited with {st} before listening{}",
                log_tail(log, 15)
            );
        }
        if t0.elapsed() > SETUP_TIMEOUT {
            bail!(
                "mirrorfs serve did not listen on port {port} within {} s{}",
                SETUP_TIMEOUT.as_secs(),
                log_tail(log, 15)
            );
        }
        sleep(Duration::from_millis(10));
    }
    Ok(p)
}

/// One primary (a mirrorfs mount) and its mirror daemon on loopback (also the `sqlite`
/// target's network rows). Fields drop in order: the mount first (it drains to the mirror),
/// then the daemon.
pub(crate) struct Site {
    mount: Option<Mount>,
    daemon: Option<Proc>,
    bin: PathBuf,
    base: PathBuf,
    backing: PathBuf,
    mnt: PathBuf,
    mirror: PathBuf,
    mirror_cfg: PathBuf,
    port: u16,
    metrics_port: u16,
}

impl Site {
    /// Makes `base` (which must not exist) with the backing, mount and mirror directories under
    /// it, starts the daemon and the mount (`extra`: more `mirrorfs mount` arguments) and
    /// waits until the mirror is live.
    pub(crate) fn start(bin: &Path, base: &Path, ids: &Identities, extra: &[&str]) -> Result<Site> {
        let backing = base.join("backing");
        let mnt = base.join("mnt");
        let mirror = base.join("mirror");
        for d in [base, &backing, &mnt, &mirror] {
            fs::create_dir(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let mut site = Site {
            mount: None,
            daemon: None,
            bin: bin.to_path_buf(),
            base: base.to_path_buf(),
            backing,
            mnt,
            mirror,
            mirror_cfg: ids.mirror.clone(),
            port: free_port()?,
            metrics_port: free_port()?,
        };
        site.start_daemon()?;
        let mut args: Vec<String> = vec![
            "--config".into(),
            ids.primary.display().to_string(),
            "--metrics".into(),
            format!("127.0.0.1:{}", site.metrics_port),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let spec = OsString::from(format!("mirror://127.0.0.1:{}", site.port));
        site.mount = Some(
            Mount::mirrorfs(
                bin,
                &site.backing,
                &site.mnt,
                &spec,
                &args,
                &base.join("mirrorfs.log"),
            )
            .context("mirrorfs did not mount")?,
        );
        site.wait_live()?;
        Ok(site)
    }

    fn start_daemon(&mut self) -> Result<()> {
        let log = self.base.join("serve.log");
        self.daemon = Some(spawn_daemon(
            &self.bin,
            &self.mirror,
            self.port,
            &self.mirror_cfg,
            &log,
        )?);
        Ok(())
    }

    /// The mount point.
    pub(crate) fn mnt(&self) -> &Path {
        &self.mnt
    }

    /// The daemon's directory (the mirror).
    pub(crate) fn mirror(&self) -> &Path {
        &self.mirror
    }

    fn stop_daemon(&mut self) -> Result<()> {
        match self.daemon.take() {
            Some(mut p) => p.stop(),
            None => Ok(()),
        }
    }

    fn primary_pid(&self) -> Option<u32> {
        self.mount.as_ref().and_then(Mount::pid)
    }

    fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().and_then(Proc::pid)
    }

    fn status_json_path(&self) -> PathBuf {
        self.backing.join(".mirrorfs").join("status.json")
    }

    /// `mirrorfs status MNT --json`.
    fn status(&self) -> Result<Status> {
        status_of(&self.bin, &self.mnt)
    }

    /// The live gauges (`GET /metrics`).
    fn gauges(&self) -> Result<Gauges> {
        let addr = (Ipv4Addr::LOCALHOST, self.metrics_port);
        let mut s = TcpStream::connect(addr).context("cannot connect to the metrics port")?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .context("cannot send the metrics request")?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)
            .context("cannot read the metrics response")?;
        let body = buf
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .context("malformed metrics response")?;
        parse_metrics(body)
    }

    /// Until the mirror is live, connected and durable through the journal's end.
    fn wait_live(&mut self) -> Result<()> {
        let t0 = Instant::now();
        loop {
            check_interrupted()?;
            self.check_alive()?;
            let s = self.status();
            if let Ok(s) = &s {
                if s.state == "live" && s.connected && s.durable >= s.last_seq {
                    return Ok(());
                }
            }
            if t0.elapsed() > SETUP_TIMEOUT {
                bail!(
                    "the network mirror did not become live within {} s (last status: {s:?}){}",
                    SETUP_TIMEOUT.as_secs(),
                    log_tail(&self.base.join("mirrorfs.log"), 10)
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Until the mirror has applied everything the journal holds (live
    /// gauges); returns how long that took.
    pub(crate) fn wait_converged(&self, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            check_interrupted()?;
            let g = self.gauges()?;
            if g.durable >= g.last_seq && g.applied >= g.last_seq {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > timeout {
                bail!(
                    "the network mirror did not converge within {} s: {g:?}",
                    timeout.as_secs()
                );
            }
            sleep(METRICS_POLL);
        }
    }

    /// A status snapshot written after everything so far was applied and acknowledged.
    fn settled_status(&self, timeout: Duration) -> Result<Status> {
        self.wait_converged(timeout)?;
        sleep(STATUS_FRESH);
        let s = self.status()?;
        if s.applied < s.last_seq {
            bail!("status lags behind the gauges: {s:?}");
        }
        Ok(s)
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(m) = self.mount.as_mut() {
            m.check_alive()?;
        }
        if let Some(d) = self.daemon.as_mut() {
            if let Some(st) = d.try_exit_status()? {
                bail!(
                    "mirrorfs serve exited unexpectedly with {st}{}",
                    log_tail(d.log(), 15)
                );
            }
        }
        Ok(())
    }

    /// Unmount (mirrorfs drains to the mirror first), then stop the daemon.
    pub(crate) fn close(mut self) -> Result<()> {
        let a = match self.mount.take() {
            Some(m) => m.unmount(),
            None => Ok(()),
        };
        let b = self.stop_daemon();
        a.and(b)
    }
}

/// Data written by the replication workload.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Data {
    Random,
    Zeros,
}

/// What one replication run measured.
struct Replication {
    size: u64,
    /// Last write returned (before fsync).
    write: Duration,
    /// fsync + close returned.
    local: Duration,
    /// Mirror durable_seq reached the journal's last seq (live gauges).
    mirror: Duration,
    /// The same seen in `mirrorfs status --json` (250 ms refresh + polling).
    status_seen: Duration,
    last_seq: u64,
    /// Applied-lag of the mirror when the last write returned.
    lag_at_write_end: u64,
    wire: u64,
}

impl Replication {
    fn mirror_rate(&self) -> f64 {
        self.size as f64 / MIB as f64 / self.mirror.as_secs_f64()
    }
    fn local_rate(&self) -> f64 {
        self.size as f64 / MIB as f64 / self.local.as_secs_f64()
    }
    fn write_rate(&self) -> f64 {
        self.size as f64 / MIB as f64 / self.write.as_secs_f64()
    }
    fn describe(&self) -> String {
        format!(
            "writes returned at {:.3} s, fsync+close at {:.3} s; mirror durable_seq reached the \
             journal's last seq {} at {:.3} s (live gauge, 5 ms polls; `mirrorfs status --json` \
             showed it at {:.3} s); mirror {:.1} MiB behind (applied) when the writes returned; \
             {} bytes on the wire ({:.4}x the data)",
            self.write.as_secs_f64(),
            self.local.as_secs_f64(),
            self.last_seq,
            self.mirror.as_secs_f64(),
            self.status_seen.as_secs_f64(),
            self.lag_at_write_end as f64 / MIB as f64,
            self.wire,
            self.wire as f64 / self.size as f64
        )
    }
}

/// Write `size` bytes through the mount in 1 MiB writes, fsync, close, and
/// time the mirror's durable position reaching the journal's last seq.
fn replicate(
    site: &mut Site,
    rel: &str,
    size: u64,
    data: Data,
    seed: u64,
    timeout: Duration,
) -> Result<Replication> {
    site.check_alive()?;
    let path = &site.mnt.join(rel);
    let before = site.settled_status(timeout)?;
    // Random data from a 4 MiB pool: no two 1 MiB batches on the wire repeat
    // within zstd's view, and no RNG cost inside the timed loop.
    let pool = match data {
        Data::Random => workloads::random_buf(4 * CHUNK, seed),
        Data::Zeros => vec![0u8; 4 * CHUNK],
    };
    workloads::sync_all();
    let target = AtomicU64::new(u64::MAX);
    let done = AtomicBool::new(false);
    let samples: Mutex<Vec<(Duration, Gauges)>> = Mutex::new(Vec::new());
    let t0 = Instant::now();
    let (write, local, last_seq) = std::thread::scope(|s| -> Result<_> {
        let poller = s.spawn(|| -> Result<()> {
            loop {
                let g = site.gauges()?;
                let at = t0.elapsed();
                if let Ok(mut v) = samples.lock() {
                    v.push((at, g));
                }
                if g.durable >= target.load(Ordering::Acquire) || done.load(Ordering::Relaxed) {
                    return Ok(());
                }
                if at > timeout {
                    bail!(
                        "the mirror's durable position did not reach the journal's end within {} s: {g:?}",
                        timeout.as_secs()
                    );
                }
                sleep(METRICS_POLL);
            }
        });
        let written = (|| -> Result<(Duration, Duration)> {
            let mut f =
                File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
            let mut left = size;
            let mut i = 0usize;
            while left > 0 {
                check_interrupted()?;
                let n = usize::try_from(left.min(CHUNK as u64)).context("chunk size")?;
                let off = (i % 4) * CHUNK;
                f.write_all(&pool[off..off + n])
                    .with_context(|| format!("write to {} failed", path.display()))?;
                left -= n as u64;
                i += 1;
            }
            let write = t0.elapsed();
            f.sync_all()
                .with_context(|| format!("fsync of {} failed", path.display()))?;
            drop(f);
            Ok((write, t0.elapsed()))
        })();
        let last = match &written {
            Ok(_) => site.gauges().map(|g| g.last_seq),
            Err(_) => Err(anyhow!("write failed")),
        };
        match &last {
            Ok(l) => target.store(*l, Ordering::Release),
            Err(_) => done.store(true, Ordering::Relaxed),
        }
        let polled = poller
            .join()
            .map_err(|_| anyhow!("the gauge poller panicked"))?;
        let (write, local) = written?;
        polled?;
        Ok((write, local, last?))
    })?;
    let samples = samples
        .into_inner()
        .map_err(|_| anyhow!("sample lock poisoned"))?;
    let mirror = samples
        .iter()
        .find(|(_, g)| g.durable >= last_seq)
        .map(|(t, _)| *t)
        .context("no gauge sample shows the mirror durable through the journal's end")?;
    let lag_at_write_end = samples
        .iter()
        .find(|(t, _)| *t >= write)
        .map_or(0, |(_, g)| g.lag_bytes);
    // Confirm with `mirrorfs status --json`, the documented field.
    let status_seen = loop {
        check_interrupted()?;
        let s = site.status()?;
        if s.durable >= last_seq {
            break t0.elapsed();
        }
        if t0.elapsed() > timeout {
            bail!("`mirrorfs status --json` never showed durable_seq >= {last_seq}: {s:?}");
        }
        sleep(Duration::from_millis(20));
    };
    let after = site.settled_status(timeout)?;
    if after.reconnects != before.reconnects {
        bail!(
            "the link reconnected during the measurement ({} -> {} reconnects); byte counts are per connection",
            before.reconnects,
            after.reconnects
        );
    }
    Ok(Replication {
        size,
        write,
        local,
        mirror,
        status_seen,
        last_seq,
        lag_at_write_end,
        wire: after.bytes_sent.saturating_sub(before.bytes_sent),
    })
}

/// `rsync -a --no-whole-file --ignore-times --stats` of the same 4 KiB change between two
/// plain directories: (Total bytes sent, Total bytes received).
fn rsync_overwrite(
    dir: &Path,
    file_mib: u64,
    seed: u64,
    off: u64,
    patch: &[u8],
) -> Result<(u64, u64)> {
    let src = dir.join("src");
    let dst = dir.join("dst");
    for d in [dir, &src, &dst] {
        fs::create_dir(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    write_random_file(&src.join("big"), file_mib * MIB, seed)?;
    let run = |extra: &[&str]| -> Result<String> {
        let out = Command::new("rsync")
            .arg("-a")
            .args(extra)
            .arg(format!("{}/", src.display()))
            .arg(format!("{}/", dst.display()))
            .stdin(Stdio::null())
            .output()
            .context("cannot run rsync (apt-get install -y rsync)")?;
        if !out.status.success() {
            bail!(
                "rsync failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    run(&[])?;
    {
        let f = OpenOptions::new()
            .write(true)
            .open(src.join("big"))
            .context("cannot open the rsync source file")?;
        f.write_all_at(patch, off)
            .context("cannot patch the rsync source file")?;
    }
    // --ignore-times: the patch may land in the same second as the first
    // copy, and rsync's quick check compares whole seconds.
    let stats = run(&["--no-whole-file", "--ignore-times", "--stats"])?;
    let field = |name: &str| -> Result<u64> {
        let line = stats
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("no `{name}` in rsync --stats output: {stats}"))?;
        line.split_whitespace()
            .next()
            .unwrap_or("")
            .replace(',', "")
            .parse()
            .with_context(|| format!("cannot parse rsync's `{name}{line}`"))
    };
    Ok((field("Total bytes sent:")?, field("Total bytes received:")?))
}

/// A file of `size` pseudo-random bytes, written in 1 MiB writes.
fn write_random_file(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut left = size;
    while left > 0 {
        check_interrupted()?;
        let n = usize::try_from(left.min(CHUNK as u64)).context("chunk size")?;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n])
            .with_context(|| format!("write to {} failed", path.display()))?;
        left -= n as u64;
    }
    Ok(())
}

/// What the overwrite workload measured.
struct Overwrite {
    wire: u64,
    window: Duration,
    records: u64,
}

/// A `file_mib` file through the mount, wait until it is on the mirror,
/// then one 4 KiB pwrite in the middle: bytes_sent before/after.
fn overwrite(
    site: &mut Site,
    rel: &str,
    file_mib: u64,
    seed: u64,
    off: u64,
    patch: &[u8],
    timeout: Duration,
) -> Result<Overwrite> {
    let path = site.mnt.join(rel);
    write_random_file(&path, file_mib * MIB, seed)?;
    let before = site.settled_status(timeout)?;
    let t0 = Instant::now();
    {
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        f.write_all_at(patch, off)
            .with_context(|| format!("pwrite to {} failed", path.display()))?;
    }
    let mirror_file = site.mirror.join(rel);
    workloads::wait_until(
        || format!("the 4 KiB overwrite to reach {}", mirror_file.display()),
        || {
            let mut got = vec![0u8; patch.len()];
            File::open(&mirror_file)
                .and_then(|f| f.read_exact_at(&mut got, off))
                .is_ok_and(|()| got == patch)
        },
    )?;
    let after = site.settled_status(timeout)?;
    let window = t0.elapsed();
    if after.reconnects != before.reconnects {
        bail!("the link reconnected during the measurement");
    }
    if !workloads::files_identical(&site.backing.join(rel), &mirror_file)? {
        bail!("{} differs from the backing file", mirror_file.display());
    }
    Ok(Overwrite {
        wire: after.bytes_sent.saturating_sub(before.bytes_sent),
        window,
        records: after.last_seq - before.last_seq,
    })
}

/// What the outage workload measured.
struct Outage {
    written: u64,
    files: usize,
    sent: u64,
    reconnect_after: Duration,
    converged_after: Duration,
    peak_rss_kib: u64,
    peak_backlog: u64,
    daemon_hwm_kib: u64,
}

/// Stop the daemon, write `mib` MiB of new files of random sizes (4 KiB to
/// 1 MiB) through the mount, restart the daemon, measure the bytes the new
/// connection sends until the mirror has applied everything.
fn outage(site: &mut Site, rel: &str, mib: u64, seed: u64, timeout: Duration) -> Result<Outage> {
    let dir = site.mnt.join(rel);
    let mdir = site.mirror.join(rel);
    workloads::make_dir_mirrored(&dir, &mdir)?;
    site.settled_status(timeout)?;
    let pid = site.primary_pid().context("no mirrorfs process")?;
    site.stop_daemon().context("stopping the daemon")?;
    let sampler = workloads::Sampler::start(pid, Some(site.status_json_path()))?;
    let mut rng = SmallRng::seed_from_u64(seed);
    let total = mib * MIB;
    let mut written = 0u64;
    let mut files = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    while written < total {
        check_interrupted()?;
        let size = (rng.gen_range(1..=256u64) * 4096).min(total - written);
        let n = usize::try_from(size).context("size")?;
        rng.fill_bytes(&mut buf[..n]);
        let name = format!("o{:05}", files.len());
        let p = dir.join(&name);
        let mut f = File::create(&p).with_context(|| format!("cannot create {}", p.display()))?;
        f.write_all(&buf[..n])
            .with_context(|| format!("write to {} failed", p.display()))?;
        drop(f);
        written += size;
        files.push(name);
    }
    // Everything is in the journal (and durable) before the daemon returns.
    let t_dur = Instant::now();
    loop {
        let g = site.gauges()?;
        if g.journal_durable >= g.last_seq {
            break;
        }
        if t_dur.elapsed() > timeout {
            bail!("the journal did not become durable: {g:?}");
        }
        sleep(METRICS_POLL);
    }
    let restart_unix = unix_now();
    let t0 = Instant::now();
    site.start_daemon().context("restarting the daemon")?;
    let reconnect_after = loop {
        check_interrupted()?;
        let s = site.status()?;
        if s.connected && s.since_unix + 1 >= restart_unix {
            break t0.elapsed();
        }
        if t0.elapsed() > timeout {
            bail!(
                "the primary did not reconnect within {} s: {s:?}",
                timeout.as_secs()
            );
        }
        sleep(Duration::from_millis(20));
    };
    site.wait_converged(timeout)?;
    let converged_after = t0.elapsed();
    let samples = sampler.finish();
    for name in &files {
        if !workloads::files_identical(&site.backing.join(rel).join(name), &mdir.join(name))? {
            bail!(
                "{} differs on the mirror after the resume",
                mdir.join(name).display()
            );
        }
    }
    let s = site.settled_status(timeout)?;
    if !(s.connected && s.since_unix + 1 >= restart_unix) {
        bail!("the connection changed after the resume: {s:?}");
    }
    let daemon_hwm_kib = site
        .daemon_pid()
        .and_then(|p| workloads::vm_hwm_rss(p).ok())
        .map_or(0, |(h, _)| h);
    Ok(Outage {
        written,
        files: files.len(),
        // The connection made after the restart counts from zero (its TLS
        // handshake is not included).
        sent: s.bytes_sent,
        reconnect_after,
        converged_after,
        peak_rss_kib: samples.peak_rss_kib,
        peak_backlog: samples.peak_backlog_bytes,
        daemon_hwm_kib,
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn push_err(rep: &mut TargetReport, rows: &[&str], unit: &'static str, e: &anyhow::Error) {
    eprintln!("[mirrorfs-net] {} FAILED: {e:#}", rows.join(", "));
    for r in rows {
        let mut row = NetRow::new(*r, unit);
        row.value = Err(format!("{e:#}"));
        rep.net.push(row);
    }
}

fn show(row: &NetRow) {
    if let (Ok(v), Some(g)) = (&row.value, row.goal) {
        eprintln!(
            "[mirrorfs-net] target {} {}: {} ({} {})",
            row.label,
            g.describe(row.unit),
            if row.met() == Some(true) {
                "PASS"
            } else {
                "FAIL"
            },
            crate::report::fmt_num(*v),
            row.unit
        );
    }
    match (&row.value, row.ratio()) {
        (Ok(v), Some(r)) => eprintln!(
            "[mirrorfs-net] {}: {} {} vs {} {} => {r:.3}x; {}",
            row.label,
            crate::report::fmt_num(*v),
            row.unit,
            row.baseline.map_or("-".into(), crate::report::fmt_num),
            row.unit,
            row.detail
        ),
        (Ok(v), None) => eprintln!(
            "[mirrorfs-net] {}: {} {}; {}",
            row.label,
            crate::report::fmt_num(*v),
            row.unit,
            row.detail
        ),
        (Err(e), _) => eprintln!("[mirrorfs-net] {} FAILED: {e}", row.label),
    }
}

fn replication_rows(
    rep: &mut TargetReport,
    what: &str,
    r: &Replication,
    goal: bool,
    with_write_phase: bool,
) {
    let mut row = NetRow::new(format!("replication rate, {what}"), "MiB/s");
    row.value = Ok(r.mirror_rate());
    row.baseline_label = "local write+fsync".into();
    row.baseline = Some(r.local_rate());
    row.goal = goal.then_some(Goal::RatioAtLeast(0.9));
    row.detail = r.describe();
    show(&row);
    rep.net.push(row);
    if with_write_phase {
        let mut row = NetRow::new(
            format!("replication rate vs write phase only, {what}"),
            "MiB/s",
        );
        row.value = Ok(r.mirror_rate());
        row.baseline_label = "local write, before fsync".into();
        row.baseline = Some(r.write_rate());
        row.detail = "fsync waits for healthy mirrors to be durable, so the row above cannot fall far below 1; this one shows how far the mirror trails the writes themselves".into();
        show(&row);
        rep.net.push(row);
    }
    let mut row = NetRow::new(format!("bytes on the wire, {what}"), "MiB");
    row.value = Ok(mib(r.wire));
    row.baseline_label = "data written".into();
    row.baseline = Some(mib(r.size));
    row.detail = format!("{} bytes sent for {} bytes written", r.wire, r.size);
    show(&row);
    rep.net.push(row);
}

/// The local mirrorfs target's figure for `m`, if it ran.
fn local(ctx: &NetCtx, m: Metric) -> Option<f64> {
    ctx.local.and_then(|r| r.value(m))
}

fn lag_rows(ctx: &NetCtx, site: &mut Site, rep: &mut TargetReport) -> Result<()> {
    let s = ctx.sizes;
    site.check_alive()?;
    let single = [
        "network lag p50 (single)",
        "network lag p99 (single)",
        "network lag max (single)",
    ];
    match workloads::lag_single(
        &site.mnt.join("w-lag"),
        &site.mirror.join("w-lag"),
        s.lag_samples,
        ctx.seed + 4,
    ) {
        Ok(mut v) => {
            v.sort();
            for (label, p, m, goal) in [
                (single[0], 0.5, Metric::LagP50, None),
                (
                    single[1],
                    0.99,
                    Metric::LagP99,
                    Some(Goal::ValueAtMost(10.0)),
                ),
                (single[2], 1.0, Metric::LagMax, None),
            ] {
                let mut row = NetRow::new(label, "ms");
                row.value = Ok(ms(workloads::percentile(&v, p)));
                row.baseline_label = "local mirror".into();
                row.baseline = local(ctx, m);
                row.goal = goal;
                row.detail = format!(
                    "{} samples of 100 B: create, write, close, then poll the mirror dir every 50 us until identical",
                    v.len()
                );
                show(&row);
                rep.net.push(row);
            }
        }
        Err(e) => push_err(rep, &single, "ms", &e),
    }
    check_interrupted()?;
    site.check_alive()?;
    let burst = [
        "network lag p50 (burst)",
        "network lag p99 (burst)",
        "network burst: last close -> all identical",
    ];
    match workloads::lag_burst(
        &site.mnt.join("w-burst"),
        &site.mirror.join("w-burst"),
        s.burst_files,
        ctx.seed + 5,
    ) {
        Ok(b) => {
            let detail = format!(
                "{} files of 1 KiB written in {:.1} ms while a second thread polls the mirror",
                s.burst_files,
                ms(b.write)
            );
            for (label, v, m, goal) in [
                (
                    burst[0],
                    workloads::percentile(&b.per_file, 0.5),
                    Metric::BurstLagP50,
                    None,
                ),
                (
                    burst[1],
                    workloads::percentile(&b.per_file, 0.99),
                    Metric::BurstLagP99,
                    Some(Goal::ValueAtMost(10.0)),
                ),
                (burst[2], b.all, Metric::BurstLag, None),
            ] {
                let mut row = NetRow::new(label, "ms");
                row.value = Ok(ms(v));
                row.baseline_label = "local mirror".into();
                row.baseline = local(ctx, m);
                row.goal = goal;
                row.detail = detail.clone();
                show(&row);
                rep.net.push(row);
            }
        }
        Err(e) => push_err(rep, &burst, "ms", &e),
    }
    Ok(())
}

/// Runs the network target. An error means it could not be set up.
pub fn run(ctx: &NetCtx, rep: &mut TargetReport) -> Result<()> {
    let s = ctx.sizes;
    let bytes = s.file_mib * MIB;
    let size_label = if s.file_mib & 1023 == 0 {
        format!("{} GiB", s.file_mib / 1024)
    } else {
        format!("{} MiB", s.file_mib)
    };
    let timeout = ctx.settle_timeout;
    let ids = make_identities(ctx.bin, ctx.dir).context("cannot make identities")?;
    rep.description = format!(
        "`{bin} serve MIRROR --listen 127.0.0.1:PORT --config CFG_M` and `{bin} mount BACKING MNT \
         --mirror mirror://127.0.0.1:PORT --config CFG_P --metrics 127.0.0.1:PORT2 [--compress | \
         --ack durable]`, identities from `mirrorfs init --config` / `mirrorfs trust --config`",
        bin = ctx.bin.display()
    );

    // 1. Plain (async, no compression).
    eprintln!("[mirrorfs-net] async: starting daemon and mount");
    let mut site = Site::start(ctx.bin, &ctx.dir.join("async"), &ids, &[])?;
    eprintln!("[mirrorfs-net] replication of {size_label} (async) ...");
    let async_local = match replicate(&mut site, "repl", bytes, Data::Random, ctx.seed, timeout) {
        Ok(r) => {
            replication_rows(rep, &format!("{size_label}, async"), &r, true, true);
            Some(r.local_rate())
        }
        Err(e) => {
            push_err(
                rep,
                &[&format!("replication rate, {size_label}, async")],
                "MiB/s",
                &e,
            );
            None
        }
    };
    check_interrupted()?;
    lag_rows(ctx, &mut site, rep)?;
    check_interrupted()?;

    let ow_label = format!(
        "bytes on the wire, 4 KiB overwrite in a {} MiB file",
        s.overwrite_file_mib
    );
    eprintln!("[mirrorfs-net] {ow_label} ...");
    let off = (s.overwrite_file_mib * MIB / 2) & !4095;
    let patch = workloads::random_buf(4096, ctx.seed + 7);
    let ow = overwrite(
        &mut site,
        "overwrite",
        s.overwrite_file_mib,
        ctx.seed + 6,
        off,
        &patch,
        timeout,
    );
    let rs = rsync_overwrite(
        &ctx.dir.join("rsync"),
        s.overwrite_file_mib,
        ctx.seed + 6,
        off,
        &patch,
    );
    match ow {
        Ok(o) => {
            let mut row = NetRow::new(ow_label, "B");
            row.value = Ok(o.wire as f64);
            row.baseline_label = "rsync delta transfer, Total bytes sent".into();
            row.goal = Some(Goal::ValueAtMost(8192.0 + FRAMING_ALLOWANCE));
            match &rs {
                Ok((sent, recv)) => {
                    row.baseline = Some(*sent as f64);
                    row.detail = format!(
                        "delta of mirrors[0].link.bytes_sent over {:.0} ms ({} journal records; \
                         includes heartbeats, 46 B per Ping/Pong frame); rsync also received {recv} B \
                         of block checksums; target 8 KiB + {} B framing allowance",
                        ms(o.window),
                        o.records,
                        FRAMING_ALLOWANCE
                    );
                }
                Err(e) => {
                    row.detail = format!("rsync baseline failed: {e:#}");
                }
            }
            show(&row);
            rep.net.push(row);
        }
        Err(e) => push_err(rep, &[&ow_label], "B", &e),
    }
    check_interrupted()?;

    let out_label = format!("resume after an outage ({} MiB written)", s.outage_mib);
    eprintln!("[mirrorfs-net] {out_label} ...");
    match outage(&mut site, "outage", s.outage_mib, ctx.seed + 8, timeout) {
        Ok(o) => {
            let mut row = NetRow::new(format!("bytes sent to {out_label}"), "MiB");
            row.value = Ok(mib(o.sent));
            row.baseline_label = "bytes written during the outage".into();
            row.baseline = Some(mib(o.written));
            row.goal = Some(Goal::RatioAtMost(1.05));
            row.detail = format!(
                "{} files, {} B written, {} B sent on the new connection (TLS handshake not \
                 counted); reconnected {:.2} s and converged {:.2} s after the daemon restarted",
                o.files,
                o.written,
                o.sent,
                o.reconnect_after.as_secs_f64(),
                o.converged_after.as_secs_f64()
            );
            show(&row);
            rep.net.push(row);
            let mut row = NetRow::new("primary peak VmRSS during the outage backlog", "MiB");
            row.value = Ok(o.peak_rss_kib as f64 / 1024.0);
            row.baseline_label = "backlog (written while the daemon was down)".into();
            row.baseline = Some(mib(o.written));
            row.detail = format!(
                "VmRSS of the mounting mirrorfs sampled every 20 ms from the daemon's stop until \
                 the mirror converged (peak lag_bytes seen in status.json: {:.1} MiB); the \
                 restarted daemon's VmHWM: {:.1} MiB",
                mib(o.peak_backlog),
                o.daemon_hwm_kib as f64 / 1024.0
            );
            show(&row);
            rep.net.push(row);
        }
        Err(e) => push_err(rep, &[&format!("bytes sent to {out_label}")], "MiB", &e),
    }
    eprintln!("[mirrorfs-net] async: unmounting");
    if let Err(e) = site.close() {
        rep.notes
            .push(format!("async site: unclean shutdown: {e:#}"));
    }
    check_interrupted()?;

    // 2. --compress: zeros, then random data.
    eprintln!("[mirrorfs-net] --compress: starting daemon and mount");
    match Site::start(ctx.bin, &ctx.dir.join("compress"), &ids, &["--compress"]) {
        Ok(mut site) => {
            for (data, name, seed) in [
                (Data::Zeros, "zeros", ctx.seed + 9),
                (Data::Random, "random", ctx.seed + 10),
            ] {
                check_interrupted()?;
                let what = format!("{size_label}, --compress, {name}");
                eprintln!("[mirrorfs-net] replication of {what} ...");
                match replicate(&mut site, name, bytes, data, seed, timeout) {
                    Ok(r) => replication_rows(rep, &what, &r, true, false),
                    Err(e) => push_err(rep, &[&format!("replication rate, {what}")], "MiB/s", &e),
                }
            }
            if let Err(e) = site.close() {
                rep.notes
                    .push(format!("compress site: unclean shutdown: {e:#}"));
            }
        }
        Err(e) => push_err(rep, &["replication rate, --compress"], "MiB/s", &e),
    }
    check_interrupted()?;

    // 3. --ack durable.
    eprintln!("[mirrorfs-net] --ack durable: starting daemon and mount");
    let what = format!("{size_label}, --ack durable");
    match Site::start(
        ctx.bin,
        &ctx.dir.join("durable"),
        &ids,
        &["--ack", "durable"],
    ) {
        Ok(mut site) => {
            eprintln!("[mirrorfs-net] replication of {what} ...");
            match replicate(&mut site, "repl", bytes, Data::Random, ctx.seed, timeout) {
                Ok(r) => {
                    let mut row = NetRow::new(format!("write+fsync throughput, {what}"), "MiB/s");
                    row.value = Ok(r.local_rate());
                    row.baseline_label = "same with --ack async".into();
                    row.baseline = async_local;
                    row.detail = format!(
                        "every write waits until the mirror's journal holds it durably; {}",
                        r.describe()
                    );
                    show(&row);
                    rep.net.push(row);
                    replication_rows(rep, &what, &r, true, false);
                }
                Err(e) => push_err(
                    rep,
                    &[&format!("write+fsync throughput, {what}")],
                    "MiB/s",
                    &e,
                ),
            }
            if let Err(e) = site.close() {
                rep.notes
                    .push(format!("durable site: unclean shutdown: {e:#}"));
            }
        }
        Err(e) => push_err(
            rep,
            &[&format!("write+fsync throughput, {what}")],
            "MiB/s",
            &e,
        ),
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The reintegration target: failback after an outage (issue 7 item 8).

/// Size of the large and of the small files of the reintegration workload.
const REINT_LARGE: usize = 256 << 10;
const REINT_SMALL: usize = 4 << 10;

/// Writes `large` files of 256 KiB and `small` files of 4 KiB of random data into `dir`
/// (created); returns the bytes written and the names.
fn write_reint_set(dir: &Path, large: u64, small: u64, seed: u64) -> Result<(u64, Vec<String>)> {
    fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let pool = workloads::random_buf(4 * MIB as usize, seed);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut bytes = 0u64;
    let mut names = Vec::new();
    for (count, size, prefix) in [(large, REINT_LARGE, "l"), (small, REINT_SMALL, "s")] {
        for i in 0..count {
            check_interrupted()?;
            let at = rng.gen_range(0..pool.len() - size);
            let name = format!("{prefix}{i:05}");
            let p = dir.join(&name);
            fs::write(&p, &pool[at..at + size])
                .with_context(|| format!("cannot write {}", p.display()))?;
            bytes += size as u64;
            names.push(name);
        }
    }
    Ok((bytes, names))
}

/// Every one of `names` in `a/rel` is identical in `b/rel`.
fn same_files(a: &Path, b: &Path, rel: &str, names: &[String]) -> Result<bool> {
    for n in names {
        if !workloads::files_identical(&a.join(rel).join(n), &b.join(rel).join(n))? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What the reintegration scenario measured.
struct Reint {
    files: usize,
    changed: u64,
    /// From the new primary's start until its mirror was live, applied and the files equal.
    attach: Duration,
    /// Seen in `status` (250 ms refresh): first and last poll showing `reintegrating`.
    phase_seen: Option<(Duration, Duration)>,
    reint_received: u64,
    reint_sent: u64,
    /// The connection after the reintegration (the resync), at the end.
    resync_received: u64,
    resync_sent: u64,
    /// The same set written by P while M was live.
    live_sent: u64,
    live_time: Duration,
}

/// P mounted with M as its network mirror; the same file set is first written live (the
/// baseline), then M is stopped, P writes the set again, M is promoted and mounted as the new
/// primary with `--mirror` to `serve P_DIR`: the reintegration takes P's set in, then P is
/// resynced.
fn reintegration(ctx: &NetCtx, ids: &Identities) -> Result<Reint> {
    let s = ctx.sizes;
    let timeout = ctx.settle_timeout;
    let base = ctx.dir.join("failback");
    let mut site = Site::start(ctx.bin, &base, ids, &[])?;
    // Baseline: the same amount written while the mirror is live.
    let before = site.settled_status(timeout)?;
    let t = Instant::now();
    write_reint_set(
        &site.mnt.join("live"),
        s.reint_large_files,
        s.reint_small_files,
        ctx.seed + 20,
    )?;
    site.wait_converged(timeout)?;
    let live_time = t.elapsed();
    let after = site.settled_status(timeout)?;
    if after.since_unix != before.since_unix {
        bail!("the link reconnected during the live baseline: {before:?} -> {after:?}");
    }
    let live_sent = after.bytes_sent - before.bytes_sent;
    // M must hold a consistent copy before the split (it is promoted then).
    workloads::wait_until(
        || "the mirror daemon to record a consistent copy".into(),
        || {
            run_cmd(
                ctx.bin,
                &[
                    "status".as_ref(),
                    site.mirror.as_os_str(),
                    "--json".as_ref(),
                ],
            )
            .ok()
            .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
            .is_some_and(|v| v["copy"] == "consistent")
        },
    )?;
    // The split: M stops, P writes.
    site.stop_daemon().context("stopping the daemon")?;
    let (changed, names) = write_reint_set(
        &site.mnt.join("reint"),
        s.reint_large_files,
        s.reint_small_files,
        ctx.seed + 21,
    )?;
    eprintln!(
        "[reintegration] P wrote {} files, {:.1} MiB while M was down; promoting M",
        names.len(),
        mib(changed)
    );
    run_cmd(ctx.bin, &["promote".as_ref(), site.mirror.as_os_str()]).context("promote")?;
    site.mount
        .take()
        .context("no mount")?
        .unmount()
        .context("unmounting P")?;
    // Failback: P's directory served, M mounted as the primary with it as its mirror.
    let port = free_port()?;
    let mut p_daemon = spawn_daemon(
        ctx.bin,
        &site.backing,
        port,
        &ids.mirror,
        &base.join("serve-p.log"),
    )?;
    let m_mnt = base.join("mnt-m");
    fs::create_dir(&m_mnt).with_context(|| format!("cannot create {}", m_mnt.display()))?;
    let spec = OsString::from(format!("mirror://127.0.0.1:{port}"));
    let args = vec!["--config".to_string(), ids.primary.display().to_string()];
    let t0 = Instant::now();
    let mut m = Mount::mirrorfs(
        ctx.bin,
        &site.mirror,
        &m_mnt,
        &spec,
        &args,
        &base.join("mirrorfs-m.log"),
    )
    .context("the promoted copy did not mount")?;
    let mut phase_seen: Option<(Duration, Duration)> = None;
    let end = loop {
        check_interrupted()?;
        m.check_alive()?;
        if let Some(st) = p_daemon.try_exit_status()? {
            bail!(
                "the old primary's daemon exited with {st}{}",
                log_tail(p_daemon.log(), 15)
            );
        }
        if let Ok(st) = status_of(ctx.bin, &m_mnt) {
            let now = t0.elapsed();
            if st.state == "reintegrating" {
                phase_seen = Some(phase_seen.map_or((now, now), |(a, _)| (a, now)));
            }
            if st.state == "live"
                && st.connected
                && st.reintegration_received > 0
                && st.applied >= st.last_seq
                && st.durable >= st.last_seq
                && same_files(&site.mirror, &site.backing, "reint", &names)?
            {
                break (now, st);
            }
        }
        if t0.elapsed() > timeout {
            bail!(
                "the failback did not complete within {} s{}{}",
                timeout.as_secs(),
                log_tail(&base.join("mirrorfs-m.log"), 15),
                log_tail(p_daemon.log(), 15)
            );
        }
        sleep(Duration::from_millis(20));
    };
    let (attach, st) = end;
    m.unmount().context("unmounting the new primary")?;
    p_daemon
        .stop()
        .context("stopping the old primary's daemon")?;
    Ok(Reint {
        files: names.len(),
        changed,
        attach,
        phase_seen,
        reint_received: st.reintegration_received,
        reint_sent: st.reintegration_sent,
        resync_received: st.bytes_received,
        resync_sent: st.bytes_sent,
        live_sent,
        live_time,
    })
}

/// Runs the reintegration target. An error means it could not be set up.
pub fn run_reintegration(ctx: &NetCtx, rep: &mut TargetReport) -> Result<()> {
    let s = ctx.sizes;
    let ids = make_identities(ctx.bin, ctx.dir).context("cannot make identities")?;
    rep.description = format!(
        "P: `{bin} mount BACKING MNT --mirror mirror://127.0.0.1:PORT` with M: `{bin} serve \
         MIRROR`; M stopped, P writes {} x 256 KiB + {} x 4 KiB; `{bin} promote MIRROR`, P \
         unmounted, `{bin} serve BACKING --listen 127.0.0.1:PORT2` (default --on-diverged \
         reintegrate) and `{bin} mount MIRROR MNT2 --mirror mirror://127.0.0.1:PORT2`",
        s.reint_large_files,
        s.reint_small_files,
        bin = ctx.bin.display()
    );
    let rows = [
        "reintegration after an outage: changes per second",
        "reintegration after an outage: data rate",
        "bytes received by the new primary during the reintegration",
    ];
    eprintln!("[reintegration] live baseline, outage, failback ...");
    let r = match reintegration(ctx, &ids) {
        Ok(r) => r,
        Err(e) => {
            push_err(rep, &rows, "", &e);
            return Ok(());
        }
    };
    let secs = r.attach.as_secs_f64();
    let live = r.live_time.as_secs_f64();
    let phase = r.phase_seen.map_or(
        "never seen (shorter than a status refresh)".into(),
        |(a, b)| {
            format!(
                "seen from {:.2} s to {:.2} s (250 ms status refresh)",
                a.as_secs_f64(),
                b.as_secs_f64()
            )
        },
    );
    let timing = format!(
        "{} files, {} B changed on P; wall time from the new primary's start until its mirror \
         was live, applied through its journal's end and every file equal: {secs:.2} s \
         (reintegration phase {phase}); baseline: P writing the same set while M was live, \
         until M applied it: {live:.2} s",
        r.files, r.changed
    );
    let mut row = NetRow::new(rows[0], "files/s");
    row.value = Ok(r.files as f64 / secs);
    row.baseline_label = "live replication of the same set".into();
    row.baseline = Some(r.files as f64 / live);
    row.detail = timing.clone();
    show(&row);
    rep.net.push(row);
    let mut row = NetRow::new(rows[1], "MiB/s");
    row.value = Ok(mib(r.changed) / secs);
    row.baseline_label = "live replication of the same set".into();
    row.baseline = Some(mib(r.changed) / live);
    row.detail = timing;
    show(&row);
    rep.net.push(row);
    let mut row = NetRow::new(rows[2], "MiB");
    row.value = Ok(mib(r.reint_received));
    row.baseline_label = "bytes changed on P".into();
    row.baseline = Some(mib(r.changed));
    row.goal = Some(Goal::RatioAtMost(1.05));
    row.detail = format!(
        "link.reintegration_bytes_received: the reintegration's own connection (TLS handshake \
         not counted), {} B received and {} B sent for {} B changed; live replication of the \
         same set sent {} B ({:.4}x)",
        r.reint_received,
        r.reint_sent,
        r.changed,
        r.live_sent,
        r.live_sent as f64 / r.changed as f64
    );
    show(&row);
    rep.net.push(row);
    let mut row = NetRow::new("bytes on the link for the whole failback", "MiB");
    row.value = Ok(mib(r.reint_received
        + r.reint_sent
        + r.resync_received
        + r.resync_sent));
    row.baseline_label = "bytes changed on P".into();
    row.baseline = Some(mib(r.changed));
    row.detail = format!(
        "both directions: the reintegration's connection ({} B in, {} B out) and the resync's \
         that follows ({} B in, {} B out: block hashes of the tree, which holds the live set too)",
        r.reint_received, r.reint_sent, r.resync_received, r.resync_sent
    );
    show(&row);
    rep.net.push(row);
    let mut row = NetRow::new("bytes on the wire, live replication of the same set", "MiB");
    row.value = Ok(mib(r.live_sent));
    row.baseline_label = "bytes written".into();
    row.baseline = Some(mib(r.changed));
    row.detail = "mirrors[0].link.bytes_sent delta while P wrote the set with M live".into();
    show(&row);
    rep.net.push(row);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse() -> Result<()> {
        let text = "# HELP x\n# TYPE x gauge\nmirrorfs_journal_last_seq 264\n\
                    mirrorfs_journal_durable_seq 260\nmirrorfs_journal_size_bytes 1\n\
                    mirrorfs_mirror_applied_seq{mirror=\"mirror://127.0.0.1:1\"} 250\n\
                    mirrorfs_mirror_durable_seq{mirror=\"mirror://127.0.0.1:1\"} 255\n\
                    mirrorfs_mirror_lag_bytes{mirror=\"m\"} 1048576\n";
        let g = parse_metrics(text)?;
        assert_eq!(
            (
                g.last_seq,
                g.journal_durable,
                g.durable,
                g.applied,
                g.lag_bytes
            ),
            (264, 260, 255, 250, 1_048_576)
        );
        assert!(parse_metrics("mirrorfs_journal_last_seq 1\n").is_err());
        Ok(())
    }

    #[test]
    fn status_parse() -> Result<()> {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"journal_next_seq": 5, "mirrors": [{"applied_seq": 4, "durable_seq": 4,
                "state": "live", "link": {"bytes_sent": 456, "bytes_received": 78, "connected": true,
                "reconnects": 0, "since_unix": 17}}]}"#,
        )?;
        let s = parse_status(&v)?;
        assert_eq!(
            (
                s.last_seq,
                s.durable,
                s.applied,
                s.bytes_sent,
                s.bytes_received
            ),
            (4, 4, 4, 456, 78)
        );
        assert_eq!((s.reintegration_received, s.reintegration_sent), (0, 0));
        assert!(s.connected && s.state == "live");
        Ok(())
    }

    #[test]
    fn loopback_listen_detection() -> Result<()> {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = l.local_addr()?.port();
        assert!(listening(port));
        drop(l);
        // A child another test forks at this moment (`tar` in the workload
        // tests) holds a copy of the socket until its exec closes it, so the
        // listener may outlive the drop by a moment: wait up to 5 s.
        let deadline = Instant::now() + Duration::from_secs(5);
        while listening(port) && Instant::now() < deadline {
            sleep(Duration::from_millis(20));
        }
        assert!(
            !listening(port),
            "port {port} still listening 5 s after the drop"
        );
        Ok(())
    }
}
