//! `--targets wan`: mirroring throughput of the TLS/TCP data path and of the UDP data path with
//! forward error correction (`mount --transport udp`) over the WAN emulator (`mirrorfs-wan`)
//! (issue 8), in parts (`--wan-parts`): `throughput` at SMFS's 50 ms one-way delay and 0, 0.1,
//! 0.5 and 1 % random loss each way; `delay` at 25, 50 and 100 ms one-way and 0.1 % loss.
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
    /// Each data path at 50 ms and 0 % loss beside a competing bulk TCP flow (the system's
    /// congestion control) over the same link, and that flow alone.
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
/// `stop` ends it and gives the bytes side B received and over how long.
struct Competitor {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sender: std::thread::JoinHandle<()>,
    receiver: std::thread::JoinHandle<(u64, f64)>,
}

impl Competitor {
    fn start(wan: &Wan) -> Result<Competitor> {
        use std::io::Read as _;
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, Ordering};
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
        let receiver = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut buf = vec![0u8; 64 << 10];
            let mut total = 0u64;
            while let Ok(n) = inbound.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            (total, t0.elapsed().as_secs_f64())
        });
        Ok(Competitor {
            stop,
            sender,
            receiver,
        })
    }

    /// MiB/s side B received.
    fn stop(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.sender.join();
        let (bytes, secs) = self.receiver.join().unwrap_or((0, 1.0));
        bytes as f64 / (1u64 << 20) as f64 / secs.max(1e-9)
    }
}

/// The competing flow alone for `secs` seconds, MiB/s.
fn competitor_alone(delay: Duration, secs: u64, seed: u64) -> Result<f64> {
    let wan = Wan::start(link(delay, 0.0), link(delay, 0.0), seed)
        .context("cannot start the WAN emulator")?;
    let c = Competitor::start(&wan)?;
    sleep(Duration::from_secs(secs));
    let mib_s = c.stop();
    wan.stop().context("the WAN emulator's router failed")?;
    Ok(mib_s)
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
    /// The competing TCP flow's MiB/s meanwhile (the fairness part).
    competing: Option<f64>,
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
        let settings: Vec<(Duration, f64)> = match part {
            Part::Throughput => LOSSES.iter().map(|&l| (DELAY, l)).collect(),
            Part::Delay => DELAYS_MS
                .iter()
                .map(|&d| (Duration::from_millis(d), DELAY_SWEEP_LOSS))
                .collect(),
            Part::Fairness => vec![(DELAY, 0.0)],
            Part::Latency | Part::LatencyTarget => Vec::new(),
        };
        let compete = part == Part::Fairness;
        if compete {
            let secs = limit.as_secs() / 3;
            let alone = competitor_alone(DELAY, secs, seed + 1_000)?;
            eprintln!("[wan] the competing TCP flow alone for {secs} s: {alone:.2} MiB/s");
            println!(
                "the competing bulk TCP flow (congestion control: this machine's default) alone on the link for {secs} s: {alone:.2} MiB/s"
            );
        }
        let mut rows = Vec::new();
        for (delay, loss) in settings {
            for path in PATHS {
                n += 1;
                let base = run_dir.join(format!("wan-{n}"));
                fs::create_dir_all(&base)
                    .with_context(|| format!("cannot create {}", base.display()))?;
                let row = one(
                    bin,
                    &base,
                    path,
                    (delay, loss),
                    (size_mib, limit),
                    compete,
                    seed + n,
                )
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
    }
    Ok(())
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
        Part::Fairness => format!(
            "{} ms one-way delay, no loss, beside a competing bulk TCP flow",
            DELAY.as_millis()
        ),
        Part::Latency | Part::LatencyTarget => String::new(),
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
        "competing TCP flow, MiB/s",
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
            r.competing.map_or("-".into(), |c| format!("{c:.2}")),
        ]);
    }
    if markdown {
        println!("{}", render_markdown(&table));
    } else {
        println!("{}", render_plain(&table));
    }
}

fn one(
    bin: &Path,
    base: &Path,
    path: DataPath,
    (delay, loss): (Duration, f64),
    (size_mib, limit): (u64, Duration),
    compete: bool,
    seed: u64,
) -> Result<Row> {
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

    let competitor = if compete {
        Some(Competitor::start(&wan)?)
    } else {
        None
    };
    let size = size_mib << 20;
    let t0 = Instant::now();
    let mut f = fs::File::create(mnt.join("payload")).context("cannot create the payload")?;
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i * 2_654_435_761) as u8).collect();
    for _ in 0..size_mib {
        f.write_all(&chunk)
            .context("cannot write through the mount")?;
    }
    drop(f);
    let on_mirror = mirror.join("payload");
    let mut bytes = 0;
    while t0.elapsed() < limit {
        crate::check_interrupted()?;
        bytes = fs::metadata(&on_mirror).map_or(0, |m| m.len());
        if bytes >= size {
            break;
        }
        sleep(Duration::from_millis(20));
    }
    let seconds = t0.elapsed().as_secs_f64();
    let competing = competitor.map(Competitor::stop);
    let udp = status_json(&mirror.join(".mirrorfs/status.json"))
        .map(|s| s["udp"].clone())
        .unwrap_or_default();
    let n = |k: &str| udp.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let l = status_json(&backing.join(".mirrorfs/status.json"))
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
    let _ = mounts::unmount(&mnt);
    drop(procs);
    wan.stop().context("the WAN emulator's router failed")?;
    Ok(Row {
        path,
        delay,
        loss,
        bytes,
        seconds,
        finished: bytes >= size,
        recovered: n("recovered"),
        nak_entries: n("nak_entries"),
        pace,
        competing,
    })
}
