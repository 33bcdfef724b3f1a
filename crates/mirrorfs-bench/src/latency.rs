//! `--targets wan --wan-parts latency`: the distribution of *mirroring latency* (issue 8 item
//! 5(b), SMFS's figure 8) per `--ack` mode and data path against random loss, at 50 ms one-way
//! delay on the WAN emulator, and issue 8's target "mirror lag p99 ≤ one-way delay + 5 ms at
//! 1 % random loss".
//!
//! Per cell, in one run: a fresh emulated WAN (side A: the primary's mount, side B: the mirror
//! daemon; [`DELAY`] one-way and the loss each way, a 1 Gbit/s cap), identities made for the
//! run, the mount waits until its mirror is live. Then [`WARMUP`] of the same messages to another
//! file, not measured (a fresh TCP connection's slow start), then up to `samples` 4 KiB messages (or
//! [`CELL_TIME`], whichever ends first), each one `write(2)` appended to one file through the
//! mount and an `fdatasync` (`--fsync-waits mode`, so the sync returns when the mode
//! acknowledges the change), [`GAP`] apart. The message's *acknowledgement* is the moment its
//! `fdatasync` returns. A watcher thread in the bench polls the mirror's copy of the file (the
//! daemon's tree, on this machine's file system, so one clock serves both namespaces) every
//! [`POLL`] and records when its size first covers each message: *applied*. Mirroring latency =
//! applied − acknowledged; negative when the mirror applied a change before the primary
//! acknowledged it (durable mode waits for the mirror). A message not applied within
//! [`DRAIN`] after the last acknowledgement counts with its lag at that moment (a lower bound)
//! and is reported.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mirrorfs_wan::{Impairment, Wan};

use crate::disaster::{start_site, Mode};
use crate::report::{render_markdown, render_plain};

/// One-way delay each way (SMFS's setup).
pub(crate) const DELAY: Duration = Duration::from_millis(50);
pub(crate) const LOSSES: [f64; 4] = [0.0, 0.001, 0.005, 0.01];
/// The loss at which the target applies.
const TARGET_LOSS: f64 = 0.01;
/// The target: p99 at most the one-way delay plus this.
const TARGET_ABOVE_DELAY: Duration = Duration::from_millis(5);
const MESSAGE: usize = 4096;
const SAMPLES: usize = 300;
const SAMPLES_QUICK: usize = 100;
/// The longest a cell writes (durable mode pays a round trip per message).
const CELL_TIME: Duration = Duration::from_secs(12);
const CELL_TIME_QUICK: Duration = Duration::from_secs(6);
/// Between two messages.
const GAP: Duration = Duration::from_millis(5);
/// Messages to another file before the measured ones, so that no data path is measured in its
/// start (TCP's slow start from a fresh connection's window: ten segments per round trip).
const WARMUP: Duration = Duration::from_secs(1);
/// The watcher's polling period.
const POLL: Duration = Duration::from_micros(200);
/// How long after the last acknowledgement the watcher waits for the rest.
const DRAIN: Duration = Duration::from_secs(20);
/// The UDP path's pace, well below the link's cap.
const UDP_RATE_MBIT: u64 = 400;

const ACKS: [&str; 3] = ["local", "network", "durable"];

/// A data path of one cell: `--transport`, `--tcp-congestion`, `--udp-fec-layers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    UdpFec,
    UdpNoFec,
    Tcp(&'static str),
}

const PATHS: [Route; 4] = [
    Route::UdpFec,
    Route::UdpNoFec,
    Route::Tcp("bbr"),
    Route::Tcp("cubic"),
];

impl Route {
    fn mode(self, ack: &'static str) -> Mode {
        match self {
            Route::UdpFec => Mode {
                ack,
                transport: "udp",
                layers: 3,
            },
            Route::UdpNoFec => Mode {
                ack,
                transport: "udp",
                layers: 0,
            },
            Route::Tcp(_) => Mode::tcp(ack),
        }
    }

    fn label(self, ack: &str) -> String {
        match self {
            Route::Tcp(cc) => format!("{ack} / TLS/TCP ({cc})"),
            _ => self.mode("local").label().replacen("local", ack, 1),
        }
    }

    fn congestion(self) -> &'static str {
        match self {
            Route::Tcp(cc) => cc,
            _ => "bbr",
        }
    }
}

/// One cell's result.
pub(crate) struct Cell {
    pub(crate) label: String,
    pub(crate) loss: f64,
    /// Lags in ms, sorted.
    pub(crate) lags: Vec<f64>,
    /// Messages not applied by the end of the drain.
    pub(crate) missing: usize,
    /// Acknowledgement latency p50 (ms), for scale.
    pub(crate) ack_p50: f64,
    /// Issued (the write's start) → applied at the mirror, p99 in ms: the same clock for every
    /// mode, where durable mode's acknowledgement comes after the mirror has the change.
    pub(crate) issued_p99: f64,
    /// The target applies to this cell (not to durable mode, which acknowledges after the mirror
    /// has the change).
    pub(crate) durable: bool,
}

impl Cell {
    pub(crate) fn p(&self, q: f64) -> f64 {
        percentile_f(&self.lags, q)
    }
}

/// The `q` quantile of sorted values by the nearest-rank rule; 0 for none.
pub(crate) fn percentile_f(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The cells the target is about: local and network mode over UDP + FEC at the target's loss
/// (`--wan-parts latency-target` runs only these; each keeps its seed of the full run).
fn is_target_cell(loss: f64, ack: &str, path: Route) -> bool {
    (loss - TARGET_LOSS).abs() < 1e-9 && ack != "durable" && path == Route::UdpFec
}

/// The target's verdict for a p99, in ms, at the target's loss.
pub(crate) fn target_met(p99_ms: f64) -> bool {
    p99_ms <= ms(DELAY + TARGET_ABOVE_DELAY)
}

pub fn run(
    bin: &Path,
    run_dir: &Path,
    markdown: bool,
    quick: bool,
    seed: u64,
    plots: Option<&Path>,
    only_target: bool,
) -> Result<()> {
    let (samples, cell_time) = if quick {
        (SAMPLES_QUICK, CELL_TIME_QUICK)
    } else {
        (SAMPLES, CELL_TIME)
    };
    let mut cells = Vec::new();
    let mut n = 0u64;
    for loss in LOSSES {
        for ack in ACKS {
            for path in PATHS {
                crate::check_interrupted()?;
                n += 1;
                if only_target && !is_target_cell(loss, ack, path) {
                    continue;
                }
                let label = path.label(ack);
                let base = run_dir.join(format!("latency-{n}"));
                fs::create_dir_all(&base)
                    .with_context(|| format!("cannot create {}", base.display()))?;
                let cell = one(
                    bin,
                    &base,
                    (ack, path),
                    loss,
                    (samples, cell_time),
                    seed + n,
                )
                .with_context(|| format!("mirroring latency, {label}, {} % loss", loss * 100.0))?;
                eprintln!(
                    "[latency] {label} at {:.1} % loss: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} messages, {} not applied)",
                    loss * 100.0,
                    cell.p(0.5),
                    cell.p(0.99),
                    cell.p(1.0),
                    cell.lags.len(),
                    cell.missing
                );
                cells.push(cell);
            }
        }
    }
    print_table(&cells, samples, markdown);
    print_target(&cells);
    // The plot is of the whole sweep; a run of the target's cells draws none.
    if let Some(dir) = plots.filter(|_| !only_target) {
        crate::plots::latency(dir, &cells, ms(DELAY))?;
        eprintln!("[latency] plots in {}", dir.display());
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_table(cells: &[Cell], samples: usize, markdown: bool) {
    println!(
        "mirroring latency (acknowledged at the primary → applied at the mirror): after {} s of warm-up messages, up to {samples} x 4 KiB (write + fdatasync) appended through the mount, {} ms apart, --fsync-waits mode; {} ms one-way delay and the loss each way, 1 Gbit/s cap (mirrorfs-wan); UDP paced at {UDP_RATE_MBIT} Mbit/s; the mirror polled every {} µs",
        WARMUP.as_secs(),
        GAP.as_millis(),
        DELAY.as_millis(),
        POLL.as_micros()
    );
    let mut table = vec![[
        "loss",
        "mode / data path",
        "messages",
        "lag p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "ack p50 ms",
        "issued → applied p99 ms",
        "target (1 % loss: p99 ≤ 55 ms)",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for c in cells {
        let target = if c.durable {
            "n/a (acknowledged after the mirror has it)".into()
        } else if (c.loss - TARGET_LOSS).abs() < 1e-9 {
            verdict(c)
        } else {
            "-".into()
        };
        table.push(vec![
            format!("{:.1} %", c.loss * 100.0),
            c.label.clone(),
            if c.missing == 0 {
                c.lags.len().to_string()
            } else {
                format!("{} ({} not applied)", c.lags.len(), c.missing)
            },
            format!("{:.1}", c.p(0.5)),
            format!("{:.1}", c.p(0.9)),
            format!("{:.1}", c.p(0.99)),
            format!("{:.1}", c.p(1.0)),
            format!("{:.2}", c.ack_p50),
            format!("{:.1}", c.issued_p99),
            target,
        ]);
    }
    if markdown {
        println!("{}", render_markdown(&table));
    } else {
        println!("{}", render_plain(&table));
    }
}

fn verdict(c: &Cell) -> String {
    let pass = c.missing == 0 && target_met(c.p(0.99));
    format!(
        "{} ({:.1} ms)",
        if pass { "PASS" } else { "FAIL" },
        c.p(0.99)
    )
}

/// One line per UDP + FEC cell at the target's loss (the path the target is about).
fn print_target(cells: &[Cell]) {
    for c in cells
        .iter()
        .filter(|c| !c.durable && (c.loss - TARGET_LOSS).abs() < 1e-9 && c.label.contains("FEC (8"))
    {
        println!(
            "target mirror lag p99 ≤ one-way delay + {} ms = {:.0} ms at {:.0} % loss, {}: {}",
            TARGET_ABOVE_DELAY.as_millis(),
            ms(DELAY + TARGET_ABOVE_DELAY),
            TARGET_LOSS * 100.0,
            c.label,
            verdict(c)
        );
    }
}

fn link(loss: f64) -> Impairment {
    Impairment {
        delay: DELAY,
        loss,
        rate_bps: Some(1_000_000_000),
        queue_bytes: 8 << 20,
        ..Impairment::default()
    }
}

/// One cell on a fresh WAN.
fn one(
    bin: &Path,
    base: &Path,
    (ack, path): (&'static str, Route),
    loss: f64,
    (samples, cell_time): (usize, Duration),
    seed: u64,
) -> Result<Cell> {
    let wan = Wan::start(link(loss), link(loss), seed).context("cannot start the WAN emulator")?;
    let mode = path.mode(ack);
    let args: Vec<String> = [
        "--ack",
        mode.ack,
        "--transport",
        mode.transport,
        "--tcp-congestion",
        path.congestion(),
        "--udp-rate-mbit",
        &UDP_RATE_MBIT.to_string(),
        "--udp-fec-layers",
        &mode.layers.to_string(),
        "--fsync-waits",
        "mode",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let site = start_site(&wan, bin, base, &args)?;
    let result = messages(&site.mnt, &site.mirror, samples, cell_time);
    let _ = crate::mounts::unmount(&site.mnt);
    drop(site);
    wan.stop().context("the WAN emulator's router failed")?;
    let (acked, applied, acks) = result?;
    let mut issued: Vec<f64> = acked
        .iter()
        .zip(&acks)
        .zip(&applied)
        .filter_map(|((a, took), t)| t.map(|t| signed_ms(t, *a) + took))
        .collect();
    issued.sort_by(f64::total_cmp);
    let mut lags = Vec::with_capacity(acked.len());
    let mut missing = 0;
    let end = Instant::now();
    for (i, a) in acked.iter().enumerate() {
        let lag = match applied.get(i).copied().flatten() {
            Some(t) => signed_ms(t, *a),
            None => {
                missing += 1;
                signed_ms(end, *a)
            }
        };
        lags.push(lag);
    }
    lags.sort_by(f64::total_cmp);
    let mut acks = acks;
    acks.sort_by(f64::total_cmp);
    Ok(Cell {
        label: path.label(ack),
        loss,
        lags,
        missing,
        ack_p50: percentile_f(&acks, 0.5),
        issued_p99: percentile_f(&issued, 0.99),
        durable: ack == "durable",
    })
}

/// `a - b` in ms, negative when `a` came first.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    match a.checked_duration_since(b) {
        Some(d) => ms(d),
        None => -ms(b - a),
    }
}

/// What the writer saw: each message's acknowledgement, when the watcher saw it applied, and
/// each acknowledgement's latency in ms.
type Seen = (Vec<Instant>, Vec<Option<Instant>>, Vec<f64>);

/// Writes the messages through `mnt` while a watcher follows the mirror's copy in `mirror`.
fn messages(mnt: &Path, mirror: &Path, samples: usize, cell_time: Duration) -> Result<Seen> {
    let warm = write_messages(&mnt.join("warm-up"), usize::MAX, WARMUP);
    warm.context("the warm-up messages")?;
    let name = "messages";
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = Watcher::start(mirror.join(name), samples, stop.clone());
    let written = write_messages(&mnt.join(name), samples, cell_time);
    let (acked, acks) = match written {
        Ok(w) => w,
        Err(e) => {
            stop.store(true, Ordering::Release);
            let _ = watcher.finish(0);
            return Err(e);
        }
    };
    let applied = watcher.finish(acked.len());
    Ok((acked, applied, acks))
}

fn write_messages(
    path: &Path,
    samples: usize,
    cell_time: Duration,
) -> Result<(Vec<Instant>, Vec<f64>)> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let block = vec![b'm'; MESSAGE];
    let mut acked = Vec::with_capacity(samples.min(SAMPLES));
    let mut acks = Vec::with_capacity(samples.min(SAMPLES));
    let t0 = Instant::now();
    while acked.len() < samples && t0.elapsed() < cell_time {
        crate::check_interrupted()?;
        let t = Instant::now();
        f.write_all(&block)
            .context("cannot write through the mount")?;
        f.sync_data()
            .context("fdatasync through the mount failed")?;
        let done = Instant::now();
        acked.push(done);
        acks.push(ms(done - t));
        sleep(GAP);
    }
    Ok((acked, acks))
}

/// Polls the mirror's copy of the file and records when each message first shows.
struct Watcher {
    stop: Arc<AtomicBool>,
    /// How many messages the writer finished with (set before `stop`).
    total: Arc<std::sync::atomic::AtomicUsize>,
    handle: JoinHandle<Vec<Option<Instant>>>,
}

impl Watcher {
    fn start(file: PathBuf, capacity: usize, stop: Arc<AtomicBool>) -> Watcher {
        let total = Arc::new(std::sync::atomic::AtomicUsize::new(capacity));
        let (s, t) = (stop.clone(), total.clone());
        let handle = std::thread::spawn(move || watch(&file, capacity, &s, &t));
        Watcher {
            stop,
            total,
            handle,
        }
    }

    /// Tells the watcher the writer wrote `total` messages, waits until it saw them all or
    /// [`DRAIN`] passed, and gives what it saw.
    fn finish(self, total: usize) -> Vec<Option<Instant>> {
        self.total.store(total, Ordering::Release);
        let t0 = Instant::now();
        while !self.handle.is_finished() && t0.elapsed() < DRAIN {
            sleep(Duration::from_millis(5));
        }
        self.stop.store(true, Ordering::Release);
        self.handle.join().unwrap_or_default()
    }
}

fn watch(
    file: &Path,
    capacity: usize,
    stop: &AtomicBool,
    total: &std::sync::atomic::AtomicUsize,
) -> Vec<Option<Instant>> {
    let mut applied = vec![None; capacity];
    let mut seen = 0usize;
    while !stop.load(Ordering::Acquire) {
        let size = fs::metadata(file).map_or(0, |m| m.len());
        let now = Instant::now();
        let covered = ((size / MESSAGE as u64) as usize).min(capacity);
        for slot in applied.iter_mut().take(covered).skip(seen) {
            *slot = Some(now);
        }
        seen = seen.max(covered);
        if seen >= total.load(Ordering::Acquire) {
            break;
        }
        sleep(POLL);
    }
    applied
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile_f(&v, 0.5), 100.0);
        assert_eq!(percentile_f(&v, 0.99), 198.0);
        assert_eq!(percentile_f(&v, 1.0), 200.0);
        assert_eq!(percentile_f(&[], 0.5), 0.0);
    }

    #[test]
    fn the_target_cells_are_local_and_network_over_udp_fec_at_one_percent() {
        let mut cells = Vec::new();
        for loss in LOSSES {
            for ack in ACKS {
                for path in PATHS {
                    if is_target_cell(loss, ack, path) {
                        cells.push((ack, path.label(ack)));
                    }
                }
            }
        }
        assert_eq!(cells.len(), 2);
        assert_eq!(cells[0].0, "local");
        assert_eq!(cells[1].0, "network");
        assert!(
            cells.iter().all(|(_, l)| l.contains("FEC (8, 3)")),
            "{cells:?}"
        );
    }

    #[test]
    fn the_target_is_the_delay_plus_five_ms() {
        assert!(target_met(55.0));
        assert!(!target_met(55.1));
    }

    #[test]
    fn signed_lag() {
        let a = Instant::now();
        let b = a + Duration::from_millis(3);
        assert!((signed_ms(b, a) - 3.0).abs() < 1e-6);
        assert!((signed_ms(a, b) + 3.0).abs() < 1e-6);
    }
}
