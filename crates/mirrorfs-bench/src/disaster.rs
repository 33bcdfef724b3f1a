//! `--targets disaster`: the rolling disaster of Smoke-and-Mirrors (issue 8), with the paper's
//! setup, over our WAN emulator (`mirrorfs-wan`): the primary site and its link to the mirror
//! are lost within moments of each other. How many changes that the application saw
//! acknowledged does the mirror lack afterwards, per `--ack` mode and data path?
//!
//! Per row, in one run: a fresh emulated WAN (side A: the primary's mount, side B: the mirror
//! daemon; [`DELAY`] one-way each way, no loss at first, a 1 Gbit/s cap), identities made for
//! the run, the mount waits until its mirror is live. A writer appends numbered 4 KiB messages
//! (the paper's size) to one file through the mount, one `write(2)` each; a write that returned
//! is *acknowledged*. After a steady phase, the disaster, as in the paper:
//! 1. the link's loss is raised to L both ways for [`LOSSY`] (0.5 s);
//! 2. the link is cut at the primary's site, instantaneously (`Wan::cut`: the router drops
//!    whatever A sends from then on and whatever is due to reach A, and still delivers what A
//!    sent before, which is on the wire);
//! 3. at once the primary is killed (`kill -9`): what it had not handed on is gone.
//!
//! The router runs two one-way delays (+ a margin) more, so what had left the site arrives;
//! nothing can be sent again (NAKs and TCP retransmissions die at the cut). The daemon applies
//! what its journal holds and the messages in its copy are counted (a prefix: records are
//! applied in journal order). *Lost* = acknowledged − on the mirror.
//!
//! Modes: `local`, `network` over TLS/TCP, `network` over UDP with FEC layers c = 3 (SMFS's
//! (r, c) = (8, 3)) down to 0 (no repairs, NAKs only: `mount --udp-fec-layers`), `durable`.
//! With `--plots DIR` the bench draws `disaster.svg` (lost against L per mode) and
//! `disaster-layers.svg` (lost against c per L) there.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mirrorfs_wan::{Direction, Impairment, Side, Wan};

use crate::mounts;
use crate::report::{render_markdown, render_plain};

/// One mode of the comparison: `--ack`, `--transport`, and the UDP path's FEC layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mode {
    pub(crate) ack: &'static str,
    pub(crate) transport: &'static str,
    pub(crate) layers: u64,
}

impl Mode {
    pub(crate) const fn tcp(ack: &'static str) -> Mode {
        Mode {
            ack,
            transport: "tcp",
            layers: 0,
        }
    }

    pub(crate) const fn udp(layers: u64) -> Mode {
        Mode {
            ack: "network",
            transport: "udp",
            layers,
        }
    }

    /// The FEC layers of a mode over UDP.
    pub(crate) fn udp_layers(self) -> Option<u64> {
        (self.transport == "udp").then_some(self.layers)
    }

    pub(crate) fn label(self) -> String {
        match self.transport {
            "udp" if self.layers == 0 => format!("{} / UDP, no FEC", self.ack),
            "udp" => format!("{} / UDP + FEC (8, {})", self.ack, self.layers),
            _ => format!("{} / TCP", self.ack),
        }
    }
}

const MODES: [Mode; 7] = [
    Mode::tcp("local"),
    Mode::tcp("network"),
    Mode::udp(3),
    Mode::udp(2),
    Mode::udp(1),
    Mode::udp(0),
    Mode::tcp("durable"),
];
const MODES_QUICK: [Mode; 5] = [
    Mode::tcp("local"),
    Mode::tcp("network"),
    Mode::udp(3),
    Mode::udp(0),
    Mode::tcp("durable"),
];
/// The loss rates L raised for [`LOSSY`] before the cut.
const LOSSES: [f64; 3] = [0.001, 0.01, 0.05];
const LOSSES_QUICK: [f64; 1] = [0.01];
/// Runs per (mode, loss); the table gives the sums.
const REPEATS: u64 = 2;
/// One message: a 16-digit number, padding, a newline: 4 KiB, the paper's message size.
const MESSAGE: usize = 4096;
/// The paper's one-way delay.
const DELAY: Duration = Duration::from_millis(50);
/// The paper's lossy phase before the cut.
const LOSSY: Duration = Duration::from_millis(500);
/// The daemon's port inside its namespace (each run has namespaces of its own).
const PORT: u16 = 7070;
const SETUP: Duration = Duration::from_secs(60);
/// The UDP path's pace (`--udp-rate-mbit`), well below the link's cap.
const UDP_RATE_MBIT: u64 = 400;
/// After the kill, the router runs this much longer than two one-way delays before it stops.
const ON_THE_WIRE_MARGIN: Duration = Duration::from_millis(200);

/// What one run gave.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Outcome {
    acknowledged: u64,
    /// Acknowledged before the cut, and of those not on the mirror.
    before_cut: u64,
    lost_before_cut: u64,
    on_mirror: u64,
    lost: u64,
    /// From the cut to the kill's return.
    window_us: f64,
    /// The first message lost was acknowledged this long before the cut (negative: after it).
    first_lost_ms: Option<f64>,
    /// The daemon's UDP counters: data packets FEC rebuilt, NAK entries sent.
    recovered: u64,
    nak_entries: u64,
    /// Packets A sent after the cut (dropped), and A's packets delivered after the cut.
    cut_sent: u64,
    /// Of those, UDP datagrams, and how long after the cut the router read the last (µs).
    cut_sent_udp: u64,
    cut_sent_udp_last_us: f64,
    delivered_after_cut: u64,
    writes_per_s: f64,
}

/// The sums over the repeats of one (mode, loss).
pub(crate) struct Row {
    pub(crate) mode: Mode,
    pub(crate) loss: f64,
    runs: u64,
    sum: Outcome,
    /// Per run: (lost, first lost acknowledged ms before the cut).
    firsts: Vec<(u64, Option<f64>)>,
}

impl Row {
    pub(crate) fn mean_lost(&self) -> f64 {
        self.sum.lost as f64 / self.runs.max(1) as f64
    }
}

fn link() -> Impairment {
    Impairment {
        delay: DELAY,
        loss: 0.0,
        rate_bps: Some(1_000_000_000),
        queue_bytes: 8 << 20,
        ..Impairment::default()
    }
}

pub fn run(
    bin: &Path,
    run_dir: &Path,
    markdown: bool,
    quick: bool,
    seed: u64,
    plots: Option<&Path>,
) -> Result<()> {
    let steady = Duration::from_millis(if quick { 1_500 } else { 3_000 });
    let (modes, losses, repeats): (&[Mode], &[f64], u64) = if quick {
        (&MODES_QUICK, &LOSSES_QUICK, 1)
    } else {
        (&MODES, &LOSSES, REPEATS)
    };
    let mut rows = Vec::new();
    let mut n = 0u64;
    for &loss in losses {
        for &mode in modes {
            let mut row = Row {
                mode,
                loss,
                runs: 0,
                sum: Outcome::default(),
                firsts: Vec::new(),
            };
            for rep in 0..repeats {
                crate::check_interrupted()?;
                let base = run_dir.join(format!("disaster-{n}"));
                n += 1;
                fs::create_dir_all(&base)
                    .with_context(|| format!("cannot create {}", base.display()))?;
                let o = one(bin, &base, mode, loss, steady, seed + n)
                    .with_context(|| format!("the rolling disaster, {}", mode.label()))?;
                eprintln!(
                    "[disaster] {} at {:.1} % (run {}): {} acknowledged, {} on the mirror, {} lost (first lost acknowledged {} ms before the cut), cut to kill {:.0} µs, {} rebuilt by FEC, {} NAK entries, {} of A's packets dropped at the cut, {} UDP (the last read {:.0} µs after it)",
                    mode.label(),
                    loss * 100.0,
                    rep + 1,
                    o.acknowledged,
                    o.on_mirror,
                    o.lost,
                    o.first_lost_ms.map_or("-".into(), |m| format!("{m:.2}")),
                    o.window_us,
                    o.recovered,
                    o.nak_entries,
                    o.cut_sent,
                    o.cut_sent_udp,
                    o.cut_sent_udp_last_us
                );
                row.add(&o);
            }
            rows.push(row);
        }
    }
    print_table(&rows, steady, markdown);
    if let Some(dir) = plots {
        crate::plots::disaster(dir, &rows)?;
        eprintln!("[disaster] plots in {}", dir.display());
    }
    Ok(())
}

impl Row {
    fn add(&mut self, o: &Outcome) {
        self.runs += 1;
        let s = &mut self.sum;
        s.acknowledged += o.acknowledged;
        s.before_cut += o.before_cut;
        s.lost_before_cut += o.lost_before_cut;
        s.on_mirror += o.on_mirror;
        s.lost += o.lost;
        s.window_us = s.window_us.max(o.window_us);
        s.recovered += o.recovered;
        s.nak_entries += o.nak_entries;
        s.cut_sent += o.cut_sent;
        s.cut_sent_udp += o.cut_sent_udp;
        s.cut_sent_udp_last_us = s.cut_sent_udp_last_us.max(o.cut_sent_udp_last_us);
        s.delivered_after_cut += o.delivered_after_cut;
        s.writes_per_s += o.writes_per_s;
        self.firsts.push((o.lost, o.first_lost_ms));
    }
}

fn print_table(rows: &[Row], steady: Duration, markdown: bool) {
    let runs = rows.first().map_or(1, |r| r.runs);
    println!(
        "rolling disaster (SMFS): {} s of {MESSAGE}-byte appends over a clean link, then loss L both ways for {} ms, then the link cut at the primary's site (instantaneous, in the router) and the primary killed at once; {} ms one-way delay; sums over {runs} run(s) per row",
        steady.as_secs_f64(),
        LOSSY.as_millis(),
        DELAY.as_millis(),
    );
    let header = [
        "L",
        "--ack / data path",
        "acknowledged",
        "acknowledged but lost",
        "of those acknowledged before the cut",
        "first lost acknowledged before the cut (ms)",
        "cut to kill (µs, max)",
        "rebuilt by FEC",
        "NAK entries",
        "A's packets delivered after the cut",
        "A's packets dropped at the cut",
        "of those UDP (last read µs after the cut, max)",
        "writes/s",
    ];
    let mut table = vec![header.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    for r in rows {
        let firsts: Vec<String> = r
            .firsts
            .iter()
            .filter_map(|(_, f)| f.map(|m| format!("{m:.2}")))
            .collect();
        let udp = r.mode.transport == "udp";
        table.push(vec![
            format!("{:.1} %", r.loss * 100.0),
            r.mode.label(),
            r.sum.acknowledged.to_string(),
            r.sum.lost.to_string(),
            r.sum.lost_before_cut.to_string(),
            if firsts.is_empty() {
                "-".into()
            } else {
                firsts.join(", ")
            },
            format!("{:.0}", r.sum.window_us),
            if udp {
                r.sum.recovered.to_string()
            } else {
                "-".into()
            },
            if udp {
                r.sum.nak_entries.to_string()
            } else {
                "-".into()
            },
            r.sum.delivered_after_cut.to_string(),
            r.sum.cut_sent.to_string(),
            if udp {
                format!("{} ({:.0})", r.sum.cut_sent_udp, r.sum.cut_sent_udp_last_us)
            } else {
                "-".into()
            },
            format!("{:.0}", r.sum.writes_per_s / r.runs.max(1) as f64),
        ]);
    }
    if markdown {
        println!("{}", render_markdown(&table));
    } else {
        println!("{}", render_plain(&table));
    }
}

/// The two processes of one mode, killed and reaped however the run ends.
pub(crate) struct Procs(pub(crate) Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn one(
    bin: &Path,
    base: &Path,
    mode: Mode,
    loss: f64,
    steady: Duration,
    seed: u64,
) -> Result<Outcome> {
    let wan = Wan::start(link(), link(), seed).context("cannot start the WAN emulator")?;
    let args: Vec<String> = [
        "--ack",
        mode.ack,
        "--transport",
        mode.transport,
        "--udp-rate-mbit",
        &UDP_RATE_MBIT.to_string(),
        "--udp-fec-layers",
        &mode.layers.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let Site {
        mut procs,
        mnt,
        mirror,
        mount_pid,
    } = start_site(&wan, bin, base, &args)?;

    let writer = Writer::start(mnt.join("log"));
    sleep(steady);
    // The disaster: loss raised, then the link cut at the site, then the site itself.
    for dir in [Direction::AtoB, Direction::BtoA] {
        wan.set_loss(dir, loss)?;
    }
    sleep(LOSSY);
    let t_cut = Instant::now();
    wan.cut(Side::A);
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(mount_pid as i32, libc::SIGKILL) };
    let window = t_cut.elapsed();
    let (acks, elapsed) = writer.finish();
    if let Some(mut m) = procs.0.pop() {
        let _ = m.wait();
    }
    let _ = mounts::unmount(&mnt);
    // What had left the site before the cut is on the wire: it arrives.
    sleep(DELAY * 2 + ON_THE_WIRE_MARGIN);
    let rep = wan.stop().context("the WAN emulator's router failed")?;

    // The mirror site applies what its journal holds, then stops.
    wait_for(
        || Ok(daemon_caught_up(&mirror)),
        "the daemon to apply its journal",
        base,
    )?;
    let udp = status_json(&mirror.join(".mirrorfs/status.json"))
        .map(|s| s["udp"].clone())
        .unwrap_or_default();
    let n = |k: &str| udp.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    if let Some(d) = procs.0.first() {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    }
    drop(procs);
    let on_mirror = complete_messages(&mirror.join("log"))?;
    let acknowledged = acks.len() as u64;
    let before_cut = acks.iter().filter(|t| **t < t_cut).count() as u64;
    // Message `on_mirror` is the first missing one; if it was acknowledged, when.
    let first_lost_ms = acks.get(on_mirror as usize).map(|t| {
        if *t <= t_cut {
            (t_cut - *t).as_secs_f64() * 1e3
        } else {
            -(*t - t_cut).as_secs_f64() * 1e3
        }
    });
    Ok(Outcome {
        acknowledged,
        before_cut,
        lost_before_cut: before_cut.saturating_sub(on_mirror),
        on_mirror,
        lost: acknowledged.saturating_sub(on_mirror),
        window_us: window.as_secs_f64() * 1e6,
        first_lost_ms,
        recovered: n("recovered"),
        nak_entries: n("nak_entries"),
        cut_sent: rep.cut_sent[0],
        cut_sent_udp: rep.cut_sent_udp[0],
        cut_sent_udp_last_us: rep.cut_sent_udp_last_ns[0] as f64 / 1e3,
        delivered_after_cut: rep.delivered_after_cut[0],
        writes_per_s: acknowledged as f64 / elapsed.as_secs_f64().max(1e-9),
    })
}

/// Appends numbered messages through the mount until it fails (the primary was killed) or is
/// told to stop; keeps the time each `write(2)` returned.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(Vec<Instant>, Duration)>,
}

/// At most this many messages per run (bounds the writer's memory: one instant each).
const MESSAGES_MAX: usize = 1_000_000;

impl Writer {
    fn start(path: PathBuf) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut acks = Vec::new();
            let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(&path) else {
                return (acks, t0.elapsed());
            };
            while !s.load(Ordering::Relaxed) && acks.len() < MESSAGES_MAX {
                if f.write_all(&message(acks.len() as u64)).is_err() {
                    break;
                }
                acks.push(Instant::now());
            }
            (acks, t0.elapsed())
        });
        Writer { stop, handle }
    }

    /// Waits for the writer (its write fails once the primary is gone): when each message was
    /// acknowledged, and how long it wrote.
    fn finish(self) -> (Vec<Instant>, Duration) {
        // The kill ends the writer's next write; the flag only matters if it never fails.
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// Message `n`: its number in 16 digits, spaces, a newline: `MESSAGE` bytes.
fn message(n: u64) -> Vec<u8> {
    let mut m = format!("{n:016}").into_bytes();
    m.resize(MESSAGE - 1, b' ');
    m.push(b'\n');
    m
}

/// Messages 0, 1, 2, ... complete and in order at the start of the mirror's file.
fn complete_messages(path: &Path) -> Result<u64> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut n = 0u64;
    for chunk in data.chunks_exact(MESSAGE) {
        if chunk != message(n).as_slice() {
            break;
        }
        n += 1;
    }
    Ok(n)
}

/// A primary site on side A of a WAN emulator, mirrored by a daemon on side B.
pub(crate) struct Site {
    /// The daemon first, then the mount.
    pub(crate) procs: Procs,
    pub(crate) mnt: PathBuf,
    pub(crate) mirror: PathBuf,
    pub(crate) mount_pid: u32,
}

/// Starts a site in `base` (`backing`, `mnt`, `mirror`, identities made for the run, logs):
/// the daemon on side B of `wan` on [`PORT`], then `mirrorfs mount` on side A with
/// `--mirror mirror://B:PORT` and `mount_args`; returns once the mirror is live.
pub(crate) fn start_site(
    wan: &Wan,
    bin: &Path,
    base: &Path,
    mount_args: &[String],
) -> Result<Site> {
    let (backing, mnt, mirror) = (base.join("backing"), base.join("mnt"), base.join("mirror"));
    for d in [&backing, &mnt, &mirror] {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let ids = crate::net::make_identities(bin, base)?;
    let listen = format!("{}:{PORT}", Wan::addr(Side::B));
    let mut procs = Procs(Vec::new());
    procs
        .0
        .push(start_daemon(wan, bin, &mirror, &listen, &ids.mirror, base)?);
    let log = fs::File::create(base.join("mount.log")).context("cannot create a log file")?;
    let mount = wan
        .command(Side::A, &bin.to_string_lossy())
        .args(["mount".as_ref(), backing.as_os_str(), mnt.as_os_str()])
        .arg("--mirror")
        .arg(format!("mirror://{listen}"))
        .args(mount_args)
        .arg("--config")
        .arg(&ids.primary)
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start mirrorfs mount")?;
    let mount_pid = mount.id();
    procs.0.push(mount);
    wait_for(|| mounts::is_mounted(&mnt), "the mount", base)?;
    wait_for(|| Ok(mirror_live(&backing)), "the mirror to be live", base)?;
    Ok(Site {
        procs,
        mnt,
        mirror,
        mount_pid,
    })
}

/// Starts `mirrorfs serve MIRROR` on side B of `wan`, listening on `listen` with the identity in
/// `config`, its log in `base/daemon.log`; returns once it listens.
pub(crate) fn start_daemon(
    wan: &Wan,
    bin: &Path,
    mirror: &Path,
    listen: &str,
    config: &Path,
    base: &Path,
) -> Result<Child> {
    let log = fs::File::create(base.join("daemon.log")).context("cannot create a log file")?;
    let mut daemon = wan
        .command(Side::B, &bin.to_string_lossy())
        .args(["serve".as_ref(), mirror.as_os_str(), "--listen".as_ref()])
        .arg(listen)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start mirrorfs serve")?;
    if let Err(e) = wait_for(|| Ok(listening(wan, listen)), "the daemon to listen", base) {
        let _ = daemon.kill();
        let _ = daemon.wait();
        return Err(e);
    }
    Ok(daemon)
}

pub(crate) fn listening(wan: &Wan, addr: &str) -> bool {
    let addr = addr.to_string();
    wan.within(Side::A, move || {
        let a = addr
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).map(|_| ())
    })
    .is_ok()
}

pub(crate) fn status_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

pub(crate) fn mirror_live(backing: &Path) -> bool {
    status_json(&backing.join(".mirrorfs/status.json"))
        .is_some_and(|s| s["mirrors"][0]["state"] == "live")
}

/// The daemon has applied everything its journal holds.
fn daemon_caught_up(dir: &Path) -> bool {
    status_json(&dir.join(".mirrorfs/status.json"))
        .is_some_and(|s| s["applied_seq"].as_u64() == s["received_seq"].as_u64())
}

pub(crate) fn wait_for(
    mut ok: impl FnMut() -> Result<bool>,
    what: &str,
    base: &Path,
) -> Result<()> {
    let t0 = Instant::now();
    while !ok()? {
        crate::check_interrupted()?;
        if t0.elapsed() > SETUP {
            bail!(
                "timed out after {} s waiting for {what}; logs in {}",
                SETUP.as_secs(),
                base.display()
            );
        }
        sleep(Duration::from_millis(20));
    }
    Ok(())
}
