//! `--targets wan`: mirroring throughput of the TLS/TCP data path and of the UDP data path with
//! forward error correction (`mount --transport udp`) over the WAN emulator (`mirrorfs-wan`)
//! (issue 8), in parts (`--wan-parts`): `throughput` at SMFS's 50 ms one-way delay and 0, 0.1,
//! 0.5 and 1 % random loss each way; `delay` at 25, 50 and 100 ms one-way and 0.1 % loss;
//! `fairness` beside a competing bulk TCP flow. With `--plots DIR` the first two draw
//! `throughput-loss.svg` and `throughput-delay.svg` (`plots::throughput`).
//!
//! Per row, in one run: a fresh emulated WAN (side A: the primary's mount, side B: the mirror
//! daemon; the same impairment both ways, a rate cap of [`RATE_MBIT`] Mbit/s), identities made
//! for the run, the mount waits until its mirror is live. Then one file of `SIZE` is written
//! through the mount in 1 MiB writes (local speed: `--ack async`), and the mirror's copy of the
//! file is watched until it has every byte. *Throughput* = bytes on the mirror / time from the
//! first write; a row that does not finish within `LIMIT` reports what reached the mirror by
//! then. TCP runs with the link's congestion control set to BBR (this machine's default) and to
//! CUBIC (SMFS's comparison; `mount --tcp-congestion`); UDP runs paced at [`UDP_RATE_MBIT`] Mbit/s (data and repair
//! packets together), below the cap (`--udp-rate-control fixed`), and with adaptive rate
//! control whose ceiling is the cap (`--udp-rate-control adaptive`).
//!
//! `fairness`, at 50 ms one-way and no loss: the competing flow (a bulk TCP connection from side
//! A to side B in the emulator's namespaces, this machine's default congestion control) alone,
//! then TLS/TCP (BBR), UDP fixed and UDP adaptive, each with a writer through the mount that
//! keeps the mirror at most [`FAIR_AHEAD`] behind for the whole window and the competing flow
//! started with it; both flows' bytes are counted over the same seconds once both have ramped
//! (5–20 s, 3–8 s with `--quick`), and each flow's share of the cap is reported.

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mirrorfs_wan::{Impairment, Side, Wan};

use crate::disaster::{mirror_live, start_daemon, status_json, wait_for, Procs};
use crate::mounts;
use crate::report::{render_markdown, render_plain};

/// One-way delay, each way, of the loss sweep.
const DELAY: Duration = Duration::from_millis(50);
const LOSSES: [f64; 4] = [0.0, 0.001, 0.005, 0.01];
/// One-way delays of the delay sweep, at [`DELAY_SWEEP_LOSS`].
const DELAYS_MS: [u64; 3] = [25, 50, 100];
const DELAY_SWEEP_LOSS: f64 = 0.001;

/// A part of the target (`--wan-parts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Part {
    /// Throughput vs loss at 50 ms one-way.
    Throughput,
    /// Throughput vs one-way delay at 0.1 % loss.
    Delay,
    /// TLS/TCP (BBR) and UDP fixed and adaptive at 50 ms and 0 % loss, each fed continuously
    /// beside a competing bulk TCP flow (the system's congestion control) over the same link,
    /// and that flow alone; both counted over the same window after the ramp.
    Fairness,
    /// Mirroring latency per `--ack` mode and data path vs loss at 50 ms one-way
    /// (`latency.rs`).
    Latency,
    /// Only the cells the lag target is about (local and network over UDP + FEC at 1 % loss),
    /// for side-by-side runs of two binaries.
    LatencyTarget,
}

/// The competing flow's port on side B.
const COMPETE_PORT: u16 = 7171;

/// A bulk TCP flow from side A to side B over the emulated link, started in its namespaces;
/// `received` is the bytes side B has received so far, `stop` ends it.
struct Competitor {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    sender: std::thread::JoinHandle<()>,
    receiver: std::thread::JoinHandle<()>,
}

impl Competitor {
    fn start(wan: &Wan) -> Result<Competitor> {
        use std::io::Read as _;
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = wan
            .within(Side::B, || {
                TcpListener::bind(format!("{}:{COMPETE_PORT}", Wan::addr(Side::B)))
            })
            .context("the competing flow's listener")?;
        let stream = wan
            .within(Side::A, || {
                TcpStream::connect(format!("{}:{COMPETE_PORT}", Wan::addr(Side::B)))
            })
            .context("the competing flow's connection")?;
        let (mut inbound, _) = listener.accept().context("the competing flow's accept")?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let sender = std::thread::spawn(move || {
            let buf = vec![0x5a_u8; 64 << 10];
            let mut stream = stream;
            while !s.load(Ordering::Acquire) {
                if stream.write_all(&buf).is_err() {
                    break;
                }
            }
            let _ = stream.shutdown(std::net::Shutdown::Both);
        });
        let received = Arc::new(AtomicU64::new(0));
        let r = received.clone();
        let receiver = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = inbound.read(&mut buf) {
                if n == 0 {
                    break;
                }
                r.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
        Ok(Competitor {
            stop,
            received,
            sender,
            receiver,
        })
    }

    /// Bytes side B has received so far.
    fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.sender.join();
        let _ = self.receiver.join();
    }
}

/// The fairness part's timing: each flow runs for `run` from its start and is counted over
/// `[from, run]`, once both have ramped.
#[derive(Clone, Copy)]
struct Window {
    from: Duration,
    run: Duration,
}

impl Window {
    fn new(quick: bool) -> Window {
        if quick {
            Window {
                from: Duration::from_secs(3),
                run: Duration::from_secs(8),
            }
        } else {
            Window {
                from: Duration::from_secs(5),
                run: Duration::from_secs(20),
            }
        }
    }
}

/// The competing flow alone on the link, MiB/s over the window.
fn competitor_alone(delay: Duration, window: Window, seed: u64) -> Result<f64> {
    let wan = Wan::start(link(delay, 0.0), link(delay, 0.0), seed)
        .context("cannot start the WAN emulator")?;
    let c = Competitor::start(&wan)?;
    let t0 = Instant::now();
    sleep(window.from);
    let (b0, s0) = (c.received(), Instant::now());
    sleep(window.run.saturating_sub(t0.elapsed()));
    let (b1, s1) = (c.received(), Instant::now());
    c.stop();
    wan.stop().context("the WAN emulator's router failed")?;
    Ok(rate(b1.saturating_sub(b0), s1 - s0))
}

/// MiB/s of `bytes` over `d`.
fn rate(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1u64 << 20) as f64 / d.as_secs_f64().max(1e-9)
}
/// The emulated link's rate cap.
const RATE_MBIT: u64 = 200;
/// The UDP path's pace (`--udp-rate-mbit`): 90 % of the cap.
const UDP_RATE_MBIT: u64 = 180;
const PORT: u16 = 7070;

/// How records travel in one row.
#[derive(Clone, Copy)]
enum DataPath {
    Tcp { congestion: &'static str },
    Udp,
    UdpAdaptive,
}

impl DataPath {
    fn label(self) -> String {
        match self {
            DataPath::Tcp { congestion } => format!("TLS/TCP ({congestion})"),
            DataPath::Udp => format!("UDP + FEC (8, 3), fixed {UDP_RATE_MBIT} Mbit/s"),
            DataPath::UdpAdaptive => {
                format!("UDP + FEC (8, 3), adaptive ≤ {RATE_MBIT} Mbit/s")
            }
        }
    }
}

const PATHS: [DataPath; 4] = [
    DataPath::Tcp { congestion: "bbr" },
    DataPath::Tcp {
        congestion: "cubic",
    },
    DataPath::Udp,
    DataPath::UdpAdaptive,
];

/// What one row gave.
struct Row {
    path: DataPath,
    delay: Duration,
    loss: f64,
    bytes: u64,
    seconds: f64,
    finished: bool,
    recovered: u64,
    nak_entries: u64,
    /// The UDP sender's pace at the end (Mbit/s), its base RTT (ms) and back-offs on delay and
    /// on loss (the primary's status, `link.udp_*`).
    pace: String,
}

/// What one fairness row gave: both flows' MiB/s over the same window.
struct FairRow {
    path: DataPath,
    mirror: f64,
    competing: f64,
    recovered: u64,
    nak_entries: u64,
    pace: String,
}

fn link(delay: Duration, loss: f64) -> Impairment {
    Impairment {
        delay,
        loss,
        rate_bps: Some(RATE_MBIT * 1_000_000),
        queue_bytes: 4 << 20,
        ..Impairment::default()
    }
}

pub fn run(
    bin: &Path,
    run_dir: &Path,
    markdown: bool,
    quick: bool,
    seed: u64,
    parts: &[Part],
    plots: Option<&Path>,
) -> Result<()> {
    let size_mib: u64 = if quick { 16 } else { 64 };
    let limit = Duration::from_secs(if quick { 30 } else { 90 });
    let mut parts = parts.to_vec();
    parts.sort();
    parts.dedup();
    let mut n = 0u64;
    for part in parts {
        if matches!(part, Part::Latency | Part::LatencyTarget) {
            let only_target = part == Part::LatencyTarget;
            crate::latency::run(bin, run_dir, markdown, quick, seed, plots, only_target)?;
            continue;
        }
        if part == Part::Fairness {
            fairness(bin, run_dir, markdown, Window::new(quick), seed, &mut n)?;
            continue;
        }
        let settings: Vec<(Duration, f64)> = match part {
            Part::Throughput => LOSSES.iter().map(|&l| (DELAY, l)).collect(),
            Part::Delay => DELAYS_MS
                .iter()
                .map(|&d| (Duration::from_millis(d), DELAY_SWEEP_LOSS))
                .collect(),
            Part::Fairness | Part::Latency | Part::LatencyTarget => Vec::new(),
        };
        let mut rows = Vec::new();
        for (delay, loss) in settings {
            for path in PATHS {
                n += 1;
                let base = run_dir.join(format!("wan-{n}"));
                fs::create_dir_all(&base)
                    .with_context(|| format!("cannot create {}", base.display()))?;
                let row = one(bin, &base, path, (delay, loss), (size_mib, limit), seed + n)
                    .with_context(|| {
                        format!(
                            "{} at {} ms, {} % loss",
                            path.label(),
                            delay.as_millis(),
                            loss * 100.0
                        )
                    })?;
                eprintln!(
                    "[wan] {} at {} ms, {:.1} % loss: {:.2} MiB/s{}; pace {}",
                    path.label(),
                    delay.as_millis(),
                    loss * 100.0,
                    mib_per_s(&row),
                    if row.finished { "" } else { " (unfinished)" },
                    row.pace
                );
                rows.push(row);
            }
        }
        print_table(part, &rows, size_mib, limit, markdown);
        if let Some(dir) = plots {
            plot(dir, part, &rows, size_mib, limit)?;
        }
    }
    Ok(())
}

/// The rows of the throughput or delay part as plot points: x is the loss in % or the one-way
/// delay in ms, one line per data path.
fn plot_points(part: Part, rows: &[Row]) -> Vec<crate::plots::Point> {
    rows.iter()
        .map(|r| crate::plots::Point {
            line: r.path.label(),
            x: match part {
                Part::Delay => r.delay.as_secs_f64() * 1e3,
                _ => r.loss * 100.0,
            },
            mib_s: mib_per_s(r),
            finished: r.finished,
        })
        .collect()
}

/// `throughput-loss.svg` (the throughput part) or `throughput-delay.svg` (the delay part).
fn plot(dir: &Path, part: Part, rows: &[Row], size_mib: u64, limit: Duration) -> Result<()> {
    let points = plot_points(part, rows);
    let cap = format!("{RATE_MBIT} Mbit/s cap, {size_mib} MiB");
    match part {
        Part::Throughput => crate::plots::throughput(
            &dir.join("throughput-loss.svg"),
            &format!(
                "Mirroring throughput against loss ({} ms one-way, {cap})",
                DELAY.as_millis()
            ),
            "random loss each way (%)",
            (-0.05, 1.1),
            limit.as_secs(),
            &points,
        ),
        Part::Delay => crate::plots::throughput(
            &dir.join("throughput-delay.svg"),
            &format!(
                "Mirroring throughput against one-way delay ({:.1} % loss each way, {cap})",
                DELAY_SWEEP_LOSS * 100.0
            ),
            "one-way delay (ms)",
            (15.0, 110.0),
            limit.as_secs(),
            &points,
        ),
        Part::Fairness | Part::Latency | Part::LatencyTarget => Ok(()),
    }
}

/// The data paths of the fairness part.
const FAIR_PATHS: [DataPath; 3] = [
    DataPath::Tcp { congestion: "bbr" },
    DataPath::Udp,
    DataPath::UdpAdaptive,
];

/// The mirror's backlog the fairness writer keeps at most: it writes while the mirror is less
/// than this behind, so the link always has data and the journal stays small.
const FAIR_AHEAD: u64 = 32 << 20;

/// The fairness part: the competing bulk TCP flow alone, then each data path with a writer
/// through the mount for the whole window beside the competing flow started with it; both flows'
/// bytes counted over the same seconds once both have ramped.
fn fairness(
    bin: &Path,
    run_dir: &Path,
    markdown: bool,
    window: Window,
    seed: u64,
    n: &mut u64,
) -> Result<()> {
    let alone = competitor_alone(DELAY, window, seed + 1_000)?;
    eprintln!("[wan] the competing TCP flow alone: {alone:.2} MiB/s");
    let mut rows = Vec::new();
    for path in FAIR_PATHS {
        *n += 1;
        let base = run_dir.join(format!("wan-{n}"));
        fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
        let row = fair(bin, &base, path, window, seed + *n)
            .with_context(|| format!("{} beside a competing flow", path.label()))?;
        eprintln!(
            "[wan] {} beside a competing TCP flow: mirror {:.2} MiB/s, competing {:.2} MiB/s; pace {}",
            path.label(),
            row.mirror,
            row.competing,
            row.pace
        );
        rows.push(row);
    }
    print_fair_table(&rows, alone, window, markdown);
    Ok(())
}

/// The link's cap in MiB/s.
fn cap_mib_s() -> f64 {
    RATE_MBIT as f64 * 1e6 / 8.0 / (1u64 << 20) as f64
}

fn print_fair_table(rows: &[FairRow], alone: f64, window: Window, markdown: bool) {
    let (from, to) = (window.from.as_secs(), window.run.as_secs());
    println!(
        "fairness: {} ms one-way delay, no loss, {RATE_MBIT} Mbit/s cap ({:.2} MiB/s) with a 4 MiB queue (mirrorfs-wan); a writer through the mount (1 MiB writes, --ack async, at most {} MiB ahead of the mirror) and a bulk TCP flow from side A to side B (this machine's default congestion control) started together, each counted over seconds {from}–{to}; the competing flow alone over the same seconds: {alone:.2} MiB/s ({:.0} % of the cap)",
        DELAY.as_millis(),
        cap_mib_s(),
        FAIR_AHEAD >> 20,
        alone / cap_mib_s() * 100.0,
    );
    let mut table = vec![[
        "data path",
        "mirror, MiB/s",
        "competing TCP flow, MiB/s",
        "mirror's share of the cap",
        "competitor's share of the cap",
        "competitor's share of the two",
        "competitor against alone",
        "rebuilt by FEC (packets)",
        "NAK entries",
        "UDP pace at the end, Mbit/s (base RTT; back-offs delay/loss)",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    let pct = |x: f64| format!("{:.0} %", x * 100.0);
    for r in rows {
        let udp = !matches!(r.path, DataPath::Tcp { .. });
        table.push(vec![
            r.path.label(),
            format!("{:.2}", r.mirror),
            format!("{:.2}", r.competing),
            pct(r.mirror / cap_mib_s()),
            pct(r.competing / cap_mib_s()),
            pct(r.competing / (r.mirror + r.competing).max(1e-9)),
            pct(r.competing / alone.max(1e-9)),
            if udp {
                r.recovered.to_string()
            } else {
                "-".into()
            },
            if udp {
                r.nak_entries.to_string()
            } else {
                "-".into()
            },
            if udp { r.pace.clone() } else { "-".into() },
        ]);
    }
    if markdown {
        println!("{}", render_markdown(&table));
    } else {
        println!("{}", render_plain(&table));
    }
}

fn mib_per_s(r: &Row) -> f64 {
    r.bytes as f64 / (1u64 << 20) as f64 / r.seconds.max(1e-9)
}

fn print_table(part: Part, rows: &[Row], size_mib: u64, limit: Duration, markdown: bool) {
    let sweep = match part {
        Part::Throughput => format!("{} ms one-way delay, the loss each way", DELAY.as_millis()),
        Part::Delay => format!(
            "the one-way delay, {:.1} % loss each way",
            DELAY_SWEEP_LOSS * 100.0
        ),
        Part::Fairness | Part::Latency | Part::LatencyTarget => String::new(),
    };
    println!(
        "mirroring throughput: {size_mib} MiB written through the mount (1 MiB writes, --ack async) until the mirror has every byte (or {} s); {sweep}, {RATE_MBIT} Mbit/s cap with a 4 MiB queue (mirrorfs-wan)",
        limit.as_secs(),
    );
    let mut table = vec![[
        "one-way delay",
        "loss",
        "data path",
        "MiB/s",
        "MiB on the mirror",
        "seconds",
        "rebuilt by FEC (packets)",
        "NAK entries",
        "UDP pace at the end, Mbit/s (base RTT; back-offs delay/loss)",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for r in rows {
        table.push(vec![
            format!("{} ms", r.delay.as_millis()),
            format!("{:.1} %", r.loss * 100.0),
            r.path.label(),
            format!("{:.2}", mib_per_s(r)),
            format!(
                "{:.1}{}",
                r.bytes as f64 / (1u64 << 20) as f64,
                if r.finished { "" } else { " (unfinished)" }
            ),
            format!("{:.1}", r.seconds),
            match r.path {
                DataPath::Tcp { .. } => "-".into(),
                _ => r.recovered.to_string(),
            },
            match r.path {
                DataPath::Tcp { .. } => "-".into(),
                _ => r.nak_entries.to_string(),
            },
            match r.path {
                DataPath::Tcp { .. } => "-".into(),
                _ => r.pace.clone(),
            },
        ]);
    }
    if markdown {
        println!("{}", render_markdown(&table));
    } else {
        println!("{}", render_plain(&table));
    }
}

/// One row's setup: a fresh emulated WAN, the mirror daemon in side B, the mount in side A with
/// its mirror live.
struct Pair {
    wan: Wan,
    procs: Procs,
    backing: std::path::PathBuf,
    mnt: std::path::PathBuf,
    mirror: std::path::PathBuf,
}

impl Pair {
    fn start(
        bin: &Path,
        base: &Path,
        path: DataPath,
        (delay, loss): (Duration, f64),
        seed: u64,
    ) -> Result<Pair> {
        let (backing, mnt, mirror) = (base.join("backing"), base.join("mnt"), base.join("mirror"));
        for d in [&backing, &mnt, &mirror] {
            fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let ids = crate::net::make_identities(bin, base)?;
        let wan = Wan::start(link(delay, loss), link(delay, loss), seed)
            .context("cannot start the WAN emulator")?;
        let cc = match path {
            DataPath::Tcp { congestion } => congestion,
            DataPath::Udp | DataPath::UdpAdaptive => "bbr",
        };
        let listen = format!("{}:{PORT}", Wan::addr(Side::B));
        let log = |name: &str| -> Result<fs::File> {
            fs::File::create(base.join(name)).context("cannot create a log file")
        };
        let mut procs = Procs(Vec::new());
        procs.0.push(start_daemon(
            &wan,
            bin,
            &mirror,
            &listen,
            &ids.mirror,
            base,
        )?);
        let (transport, rate_control, rate_mbit) = match path {
            DataPath::Tcp { .. } => ("tcp", "fixed", UDP_RATE_MBIT),
            DataPath::Udp => ("udp", "fixed", UDP_RATE_MBIT),
            DataPath::UdpAdaptive => ("udp", "adaptive", RATE_MBIT),
        };
        let mount = wan
            .command(Side::A, &bin.to_string_lossy())
            .args(["mount".as_ref(), backing.as_os_str(), mnt.as_os_str()])
            .arg("--mirror")
            .arg(format!("mirror://{listen}"))
            .args([
                "--transport",
                transport,
                "--tcp-congestion",
                cc,
                "--udp-rate-control",
                rate_control,
                "--udp-rate-mbit",
            ])
            .arg(rate_mbit.to_string())
            .arg("--config")
            .arg(&ids.primary)
            .stdin(Stdio::null())
            .stderr(log("mount.log")?)
            .spawn()
            .context("cannot start mirrorfs mount")?;
        procs.0.push(mount);
        wait_for(|| mounts::is_mounted(&mnt), "the mount", base)?;
        wait_for(|| Ok(mirror_live(&backing)), "the mirror to be live", base)?;
        Ok(Pair {
            wan,
            procs,
            backing,
            mnt,
            mirror,
        })
    }

    /// Bytes of the payload on the mirror so far.
    fn on_mirror(&self) -> u64 {
        fs::metadata(self.mirror.join("payload")).map_or(0, |m| m.len())
    }

    /// Unmounts and stops everything; the UDP receiver's packets rebuilt by FEC and NAK
    /// entries, and the sender's pace (see [`Row::pace`]).
    fn finish(self) -> Result<(u64, u64, String)> {
        let udp = status_json(&self.mirror.join(".mirrorfs/status.json"))
            .map(|s| s["udp"].clone())
            .unwrap_or_default();
        let n = |k: &str| udp.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let l = status_json(&self.backing.join(".mirrorfs/status.json"))
            .map(|s| s["mirrors"][0]["link"].clone())
            .unwrap_or_default();
        let ln = |k: &str| l.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let pace = format!(
            "{:.0} ({:.1} ms; {}/{})",
            ln("udp_rate_bytes_per_s") as f64 * 8.0 / 1e6,
            ln("udp_base_rtt_us") as f64 / 1e3,
            ln("udp_backoffs_delay"),
            ln("udp_backoffs_loss")
        );
        let _ = mounts::unmount(&self.mnt);
        drop(self.procs);
        self.wan
            .stop()
            .context("the WAN emulator's router failed")?;
        Ok((n("recovered"), n("nak_entries"), pace))
    }
}

/// 1 MiB of the payload.
fn chunk() -> Vec<u8> {
    (0..1u32 << 20).map(|i| (i * 2_654_435_761) as u8).collect()
}

fn one(
    bin: &Path,
    base: &Path,
    path: DataPath,
    (delay, loss): (Duration, f64),
    (size_mib, limit): (u64, Duration),
    seed: u64,
) -> Result<Row> {
    let pair = Pair::start(bin, base, path, (delay, loss), seed)?;
    let size = size_mib << 20;
    let t0 = Instant::now();
    let mut f = fs::File::create(pair.mnt.join("payload")).context("cannot create the payload")?;
    let chunk = chunk();
    for _ in 0..size_mib {
        f.write_all(&chunk)
            .context("cannot write through the mount")?;
    }
    drop(f);
    let mut bytes = 0;
    while t0.elapsed() < limit {
        crate::check_interrupted()?;
        bytes = pair.on_mirror();
        if bytes >= size {
            break;
        }
        sleep(Duration::from_millis(20));
    }
    let seconds = t0.elapsed().as_secs_f64();
    let (recovered, nak_entries, pace) = pair.finish()?;
    Ok(Row {
        path,
        delay,
        loss,
        bytes,
        seconds,
        finished: bytes >= size,
        recovered,
        nak_entries,
        pace,
    })
}

/// One fairness row: the competing flow and a writer through the mount start together; the
/// writer keeps the mirror at most [`FAIR_AHEAD`] behind for the whole window; both flows are
/// counted from `window.from` to `window.run`.
fn fair(bin: &Path, base: &Path, path: DataPath, window: Window, seed: u64) -> Result<FairRow> {
    let pair = Pair::start(bin, base, path, (DELAY, 0.0), seed)?;
    let competitor = Competitor::start(&pair.wan)?;
    let written = feed(&pair, &competitor, window);
    competitor.stop();
    let (recovered, nak_entries, pace) = pair.finish()?;
    let (mirror, competing) = written?;
    Ok(FairRow {
        path,
        mirror,
        competing,
        recovered,
        nak_entries,
        pace,
    })
}

/// The fairness writer: 1 MiB writes through the mount while the mirror is less than
/// [`FAIR_AHEAD`] behind, until `window.run`; the mirror's and the competitor's MiB/s over
/// `[window.from, window.run]`.
fn feed(pair: &Pair, competitor: &Competitor, window: Window) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let mut f = fs::File::create(pair.mnt.join("payload")).context("cannot create the payload")?;
    let chunk = chunk();
    let mut written = 0u64;
    let mut start: Option<(u64, u64, Instant)> = None;
    while t0.elapsed() < window.run {
        crate::check_interrupted()?;
        let on_mirror = pair.on_mirror();
        if start.is_none() && t0.elapsed() >= window.from {
            start = Some((on_mirror, competitor.received(), Instant::now()));
        }
        if written.saturating_sub(on_mirror) < FAIR_AHEAD {
            f.write_all(&chunk)
                .context("cannot write through the mount")?;
            written += chunk.len() as u64;
        } else {
            sleep(Duration::from_millis(5));
        }
    }
    let (m1, c1, s1) = (pair.on_mirror(), competitor.received(), Instant::now());
    let (m0, c0, s0) = start.context("the window ended before it began")?;
    Ok((
        rate(m1.saturating_sub(m0), s1 - s0),
        rate(c1.saturating_sub(c0), s1 - s0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(path: DataPath, delay_ms: u64, loss: f64, bytes: u64, finished: bool) -> Row {
        Row {
            path,
            delay: Duration::from_millis(delay_ms),
            loss,
            bytes,
            seconds: 2.0,
            finished,
            recovered: 0,
            nak_entries: 0,
            pace: String::new(),
        }
    }

    #[test]
    fn throughput_rows_plot_against_loss_and_delay_rows_against_delay() {
        let cubic = DataPath::Tcp {
            congestion: "cubic",
        };
        let rows = [
            row(DataPath::Udp, 50, 0.005, 28 << 20, true),
            row(cubic, 100, 0.01, 1 << 20, false),
        ];
        let loss = plot_points(Part::Throughput, &rows);
        assert_eq!(loss.len(), 2);
        assert_eq!(loss[0].line, DataPath::Udp.label());
        assert!((loss[0].x - 0.5).abs() < 1e-12);
        assert!((loss[0].mib_s - 14.0).abs() < 1e-12);
        assert!(loss[0].finished);
        assert_eq!(loss[1].line, "TLS/TCP (cubic)");
        assert!((loss[1].x - 1.0).abs() < 1e-12);
        assert!((loss[1].mib_s - 0.5).abs() < 1e-12);
        assert!(!loss[1].finished);
        let delay = plot_points(Part::Delay, &rows);
        assert!((delay[0].x - 50.0).abs() < 1e-12);
        assert!((delay[1].x - 100.0).abs() < 1e-12);
    }

    #[test]
    fn a_rate_is_mib_over_the_window() {
        assert!((rate(30 << 20, Duration::from_secs(15)) - 2.0).abs() < 1e-12);
        assert!((cap_mib_s() - 23.841_857_9).abs() < 1e-6);
    }
}
