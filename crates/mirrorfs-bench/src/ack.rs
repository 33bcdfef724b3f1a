//! `--targets ack`: how long an application waits for an acknowledgement, per `--ack` mode and
//! data path, over the WAN emulator at 25 ms one-way delay and 1 % random loss each way: issue
//! 8's target "network-sync acknowledgement latency ≤ local-sync + 1 ms".
//!
//! Per mode, in one run: a fresh emulated WAN (side A: the primary's mount, side B: the mirror
//! daemon; [`DELAY`] one-way and [`LOSS`] each way, a 1 Gbit/s cap), identities made for the
//! run, the mount waits until its mirror is live. Then [`SAMPLES`] times: one 4 KiB `write(2)`
//! at the end of a file through the mount and an `fdatasync`, timed together (the application's
//! wait for its commit), with a pause of [`GAP`] between samples so the link is never the
//! bottleneck. The mount runs with `--fsync-waits mode` (the default): the sync waits as far
//! as the mode takes a change — `local`: the local journal and file; `network`: also its data
//! (and over UDP its repair packets) handed to the socket; `durable`: also durable at the
//! mirror (a round trip, shown for scale).

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mirrorfs_wan::{Impairment, Wan};

use crate::disaster::{start_site, Mode};
use crate::report::{render_markdown, render_plain};
use crate::workloads::percentile;

/// The one-way delay of the target, each way.
const DELAY: Duration = Duration::from_millis(25);
/// Random loss each way.
const LOSS: f64 = 0.01;
const SAMPLES: usize = 400;
const SAMPLES_QUICK: usize = 100;
/// Between two samples.
const GAP: Duration = Duration::from_millis(5);
/// The UDP path's pace, well below the link's cap.
const UDP_RATE_MBIT: u64 = 400;
/// The target: network-sync at most this much above local-sync (p50 and p99).
const TARGET_ABOVE_LOCAL: Duration = Duration::from_millis(1);

const MODES: [Mode; 4] = [
    Mode::tcp("local"),
    Mode::tcp("network"),
    Mode::udp(3),
    Mode::tcp("durable"),
];

fn link() -> Impairment {
    Impairment {
        delay: DELAY,
        loss: LOSS,
        rate_bps: Some(1_000_000_000),
        queue_bytes: 8 << 20,
        ..Impairment::default()
    }
}

/// One mode's sorted latencies.
struct Row {
    mode: Mode,
    sorted: Vec<Duration>,
}

impl Row {
    fn p(&self, q: f64) -> Duration {
        percentile(&self.sorted, q)
    }
}

pub fn run(bin: &Path, run_dir: &Path, markdown: bool, quick: bool, seed: u64) -> Result<()> {
    let samples = if quick { SAMPLES_QUICK } else { SAMPLES };
    let mut rows = Vec::new();
    for (i, mode) in MODES.into_iter().enumerate() {
        crate::check_interrupted()?;
        let base = run_dir.join(format!("ack-{i}"));
        fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
        let mut sorted = one(bin, &base, mode, samples, seed + i as u64)
            .with_context(|| format!("acknowledgement latency, {}", mode.label()))?;
        sorted.sort();
        let row = Row { mode, sorted };
        eprintln!(
            "[ack] {}: p50 {:.2} ms, p99 {:.2} ms",
            mode.label(),
            ms(row.p(0.5)),
            ms(row.p(0.99))
        );
        rows.push(row);
    }
    print_table(&rows, samples, markdown);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_table(rows: &[Row], samples: usize, markdown: bool) {
    println!(
        "acknowledgement latency: {samples} x (4 KiB write + fdatasync) through the mount, {} ms apart, --fsync-waits mode; {} ms one-way delay and {:.0} % loss each way, 1 Gbit/s cap (mirrorfs-wan); target: network ≤ local + {} ms",
        GAP.as_millis(),
        DELAY.as_millis(),
        LOSS * 100.0,
        TARGET_ABOVE_LOCAL.as_millis()
    );
    let local = rows.iter().find(|r| r.mode == Mode::tcp("local"));
    let mut table = vec![[
        "mode / data path",
        "p50 ms",
        "p99 ms",
        "max ms",
        "p50 − local",
        "p99 − local",
        "target",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for r in rows {
        let above = |q: f64| local.map(|l| ms(r.p(q)) - ms(l.p(q)));
        let target = if r.mode.ack != "network" {
            "-".to_string()
        } else {
            let limit = ms(TARGET_ABOVE_LOCAL);
            let met =
                above(0.5).is_some_and(|d| d <= limit) && above(0.99).is_some_and(|d| d <= limit);
            if met { "met" } else { "NOT met" }.to_string()
        };
        let diff = |q: f64| above(q).map_or("-".into(), |d| format!("{d:+.2} ms"));
        table.push(vec![
            r.mode.label(),
            format!("{:.2}", ms(r.p(0.5))),
            format!("{:.2}", ms(r.p(0.99))),
            format!("{:.2}", ms(r.p(1.0))),
            diff(0.5),
            diff(0.99),
            target,
        ]);
    }
    if markdown {
        println!("{}", render_markdown(&table));
    } else {
        println!("{}", render_plain(&table));
    }
}

/// One mode on a fresh WAN: the latencies of `samples` commits, unsorted.
fn one(bin: &Path, base: &Path, mode: Mode, samples: usize, seed: u64) -> Result<Vec<Duration>> {
    let wan = Wan::start(link(), link(), seed).context("cannot start the WAN emulator")?;
    let args: Vec<String> = [
        "--ack",
        mode.ack,
        "--transport",
        mode.transport,
        "--udp-rate-mbit",
        &UDP_RATE_MBIT.to_string(),
        "--fsync-waits",
        "mode",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let site = start_site(&wan, bin, base, &args)?;
    let path = site.mnt.join("commits");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let block = vec![b'a'; 4096];
    let mut lat = Vec::with_capacity(samples);
    for _ in 0..samples {
        crate::check_interrupted()?;
        let t = Instant::now();
        f.write_all(&block)
            .context("cannot write through the mount")?;
        f.sync_data()
            .context("fdatasync through the mount failed")?;
        lat.push(t.elapsed());
        sleep(GAP);
    }
    drop(f);
    let _ = crate::mounts::unmount(&site.mnt);
    drop(site);
    wan.stop().context("the WAN emulator's router failed")?;
    Ok(lat)
}
