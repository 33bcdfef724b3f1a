//! `mirrorfs-wan`: runs an emulated WAN between two new network namespaces until interrupted.
//! See the library's docs (`mirrorfs_wan`) for the model.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use mirrorfs_wan::{Burst, Impairment, Side, Wan};

/// Emulates a long-distance link between two new network namespaces, A (10.201.0.1) and B
/// (10.201.0.2), joined by TUN devices through a userspace router that adds, in each direction:
/// a one-way delay with jitter, random loss, bursty (Gilbert–Elliott) loss, and a rate cap with a
/// bounded queue. Run programs on a side with `nsenter --net=/run/netns/NAME` (the names are
/// printed). Stops on SIGINT or SIGTERM, removes the namespaces and prints what each direction
/// did.
#[derive(Parser, Debug)]
#[command(name = "mirrorfs-wan", version)]
struct Args {
    /// One-way delay in milliseconds (each direction).
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Jitter in milliseconds: the delay varies uniformly by up to this much either way
    /// (packets keep their order). At most the delay.
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Random loss in percent, independent per packet.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Bursty loss, Gilbert–Elliott: P,R,GOOD,BAD — the probabilities (0–1) of turning bad and
    /// of turning good again per packet, and of a loss in each state (e.g. 0.001,0.2,0,1: bursts
    /// of 5 packets on average, 0.5 % lost in all).
    #[arg(long, value_parser = parse_burst)]
    burst: Option<Burst>,
    /// Rate cap in Mbit/s (none by default).
    #[arg(long)]
    rate_mbit: Option<f64>,
    /// The queue in front of the rate cap, in KiB.
    #[arg(long, default_value_t = 1024)]
    queue_kib: u64,
    /// The seed of every random decision (each direction draws its own stream from it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn parse_burst(s: &str) -> Result<Burst, String> {
    let v: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>().map_err(|e| format!("{x:?}: {e}")))
        .collect::<Result<_, _>>()?;
    match v[..] {
        [p, r, loss_good, loss_bad] => Ok(Burst {
            p,
            r,
            loss_good,
            loss_bad,
        }),
        _ => Err("give four numbers: P,R,GOOD,BAD".into()),
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    let imp = Impairment {
        delay: Duration::from_secs_f64(a.delay_ms.max(0.0) / 1e3),
        jitter: Duration::from_secs_f64(a.jitter_ms.max(0.0) / 1e3),
        loss: a.loss / 100.0,
        burst: a.burst,
        rate_bps: a.rate_mbit.map(|m| (m * 1e6) as u64),
        queue_bytes: a.queue_kib * 1024,
    };
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())
        .context("SIGINT handler")?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())
        .context("SIGTERM handler")?;
    let wan = Wan::start(imp.clone(), imp, a.seed)?;
    println!(
        "A: netns {} ({})\nB: netns {} ({})\nrun a program on a side: nsenter --net=/run/netns/NAME PROGRAM\nstop with Ctrl-C",
        wan.ns(Side::A),
        Wan::addr(Side::A),
        wan.ns(Side::B),
        Wan::addr(Side::B)
    );
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let rep = wan.stop()?;
    for (name, c) in [("A→B", rep.a_to_b), ("B→A", rep.b_to_a)] {
        println!(
            "{name}: {} offered, {} delivered ({} bytes), {} lost at random, {} lost in bursts, {} dropped by the queue",
            c.offered, c.delivered, c.bytes_delivered, c.lost_random, c.lost_burst, c.queue_drops
        );
    }
    if rep.overflow + rep.write_errors > 0 {
        println!(
            "{} dropped with the delay line full, {} not taken by the receiving device",
            rep.overflow, rep.write_errors
        );
    }
    Ok(())
}
