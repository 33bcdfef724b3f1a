//! `--targets fec`: encode and decode throughput of the FEC schemes of `mirrorfs_core::fec`,
//! on one core, beside a plain memcpy of the same bytes in the same run.
//!
//! For each packet size (1,400 B: a datagram under a 1,500 B MTU; 4 KiB: the SMFS messages)
//! and random loss (0 %, 1 % of the packets on the wire, data and repairs alike, seeded):
//! - encode: every data packet through `FecEncoder::push` and every repair through
//!   `codec::encode`, as a sender does before sealing;
//! - decode: the surviving packets, in sending order, through `FecDecoder::on_data` and
//!   `codec::parse` + `on_repair`, as a receiver does after opening; every rebuilt packet is
//!   compared with the one sent (inside the timed loop, but only rebuilt packets are);
//! - memcpy: each data packet copied into a buffer (the least any packet handling costs).
//!
//! MB/s count data bytes (10⁶ B/s) per second of the thread's CPU time (so a busy machine
//! slows the run but moves the figures less); each figure is the best of
//! `REPEATS` runs over `--fec-mib` MiB of data, drawn from a pool of 16 MiB of random packets
//! (larger than the caches, so the bytes come from memory as a sender's would).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};

use mirrorfs_core::fec::{codec, decoder, encoder, Recovery, Scheme, Window};

use crate::report::{fmt_num, render_markdown, render_plain};

/// Runs per figure; the best is kept (the least disturbed by other work on the machine).
const REPEATS: usize = 3;
const POOL_BYTES: usize = 16 << 20;
const SIZES: [usize; 2] = [1_400, 4_096];
const LOSSES: [f64; 2] = [0.0, 0.01];
const SCHEMES: [Scheme; 3] = [Scheme::Xor, Scheme::RsErasure, Scheme::RsSimd];
/// The target: FEC never the bottleneck.
const GOAL_MB_S: f64 = 1_000.0;

fn params(s: Scheme) -> &'static str {
    match s {
        Scheme::Xor => "(r, c) = (8, 3), distances 1, 10, 100 (the default scheme)",
        Scheme::RsErasure | Scheme::RsSimd => "(k, m) = (8, 3)",
    }
}

/// A packet on the wire: data (its seq and pool index) or a repair's bytes.
enum Wire {
    Data { seq: u64, idx: usize },
    Repair(Vec<u8>),
}

struct Stream {
    wire: Vec<Wire>,
    /// Seq → pool index of every data packet sent.
    sent: HashMap<u64, usize>,
    data_bytes: u64,
    repair_bytes: u64,
}

fn pool(size: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    (0..POOL_BYTES / size)
        .map(|_| {
            let mut p = vec![0u8; size];
            rng.fill(&mut p[..]);
            p
        })
        .collect()
}

fn packets_for(mib: u64, size: usize) -> usize {
    (mib as usize * (1 << 20)).div_ceil(size)
}

/// The sender's side, timed: seqs numbered like sealed packets (repairs take numbers too).
fn encode_pass(scheme: Scheme, pool: &[Vec<u8>], n: usize) -> Result<(Duration, Stream)> {
    let mut enc = encoder(scheme);
    let mut out = Vec::new();
    let mut wire = Vec::with_capacity(n + n / 2);
    let (mut data_bytes, mut repair_bytes) = (0u64, 0u64);
    let mut pn = 1u64;
    let t0 = CpuClock::now();
    for i in 0..n {
        let idx = i % pool.len();
        enc.push(pn, &pool[idx], &mut out)?;
        wire.push(Wire::Data { seq: pn, idx });
        data_bytes += pool[idx].len() as u64;
        pn += 1;
        for r in out.drain(..) {
            let b = codec::encode(&r);
            repair_bytes += b.len() as u64;
            wire.push(Wire::Repair(b));
            pn += 1;
        }
    }
    enc.flush(&mut out);
    for r in out.drain(..) {
        let b = codec::encode(&r);
        repair_bytes += b.len() as u64;
        wire.push(Wire::Repair(b));
    }
    let t = t0.elapsed();
    let sent = wire
        .iter()
        .filter_map(|w| match w {
            Wire::Data { seq, idx } => Some((*seq, *idx)),
            Wire::Repair(_) => None,
        })
        .collect();
    Ok((
        t,
        Stream {
            wire,
            sent,
            data_bytes,
            repair_bytes,
        },
    ))
}

struct Decoded {
    time: Duration,
    lost_on_wire: u64,
    rebuilt: u64,
    reported_lost: u64,
}

/// The receiver's side, timed, over the packets `keep` lets through.
fn decode_pass(scheme: Scheme, pool: &[Vec<u8>], s: &Stream, keep: &[bool]) -> Result<Decoded> {
    let mut dec = decoder(scheme, Window::default());
    let mut out = Vec::new();
    let (mut rebuilt, mut reported_lost) = (0u64, 0u64);
    let mut top = 0;
    let t0 = CpuClock::now();
    for (w, keep) in s.wire.iter().zip(keep) {
        if !keep {
            continue;
        }
        match w {
            Wire::Data { seq, idx } => {
                top = *seq;
                dec.on_data(*seq, &pool[*idx], &mut out);
            }
            Wire::Repair(b) => {
                let r = codec::parse(b)?;
                dec.on_repair(r, &mut out)?;
            }
        }
        for r in out.drain(..) {
            match r {
                Recovery::Rebuilt { seq, data } => {
                    let sent = s.sent.get(&seq).map(|i| &pool[*i]);
                    if sent != Some(&data) {
                        bail!(
                            "{}: rebuilt packet {seq} differs from the one sent",
                            scheme.name()
                        );
                    }
                    rebuilt += 1;
                }
                Recovery::Lost { .. } => reported_lost += 1,
            }
        }
    }
    let time = t0.elapsed();
    // Past the end: what is still wanted is reported (untimed).
    dec.on_data(top + 1_000_000, b"end", &mut out);
    reported_lost += out
        .iter()
        .filter(|r| matches!(r, Recovery::Lost { .. }))
        .count() as u64;
    let lost_on_wire = s
        .wire
        .iter()
        .zip(keep)
        .filter(|(w, k)| !**k && matches!(w, Wire::Data { .. }))
        .count() as u64;
    Ok(Decoded {
        time,
        lost_on_wire,
        rebuilt,
        reported_lost,
    })
}

fn memcpy_pass(pool: &[Vec<u8>], n: usize) -> Duration {
    let mut buf = vec![0u8; pool.iter().map(Vec::len).max().unwrap_or(0)];
    let t0 = CpuClock::now();
    for i in 0..n {
        let p = &pool[i % pool.len()];
        buf[..p.len()].copy_from_slice(p);
        black_box(&mut buf);
    }
    t0.elapsed()
}

/// This thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`): what one core spends, without the time
/// the thread waits for a core while other work shares the machine.
struct CpuClock(Duration);

impl CpuClock {
    fn read() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux has.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        if rc != 0 {
            return Duration::ZERO;
        }
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    fn now() -> CpuClock {
        CpuClock(CpuClock::read())
    }

    fn elapsed(&self) -> Duration {
        CpuClock::read().saturating_sub(self.0)
    }
}

fn mb_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64().max(1e-9)
}

fn best(times: impl Iterator<Item = Duration>) -> Duration {
    times.min().unwrap_or(Duration::MAX)
}

struct Row {
    scheme: Scheme,
    size: usize,
    loss: f64,
    encode: f64,
    decode: f64,
    memcpy: f64,
    overhead: f64,
    d: Decoded,
}

fn measure(scheme: Scheme, size: usize, loss: f64, mib: u64, seed: u64) -> Result<Row> {
    crate::check_interrupted()?;
    let pool = pool(size, seed);
    let n = packets_for(mib, size);
    let mut enc_times = Vec::new();
    let mut stream = None;
    for _ in 0..REPEATS {
        let (t, s) = encode_pass(scheme, &pool, n)?;
        enc_times.push(t);
        stream = Some(s);
    }
    let Some(s) = stream else {
        bail!("no encode pass ran");
    };
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ 0x105e);
    let keep: Vec<bool> = s.wire.iter().map(|_| !rng.gen_bool(loss)).collect();
    let mut decodes = Vec::new();
    for _ in 0..REPEATS {
        decodes.push(decode_pass(scheme, &pool, &s, &keep)?);
    }
    let memcpy = best((0..REPEATS).map(|_| memcpy_pass(&pool, n)));
    decodes.sort_by_key(|d| d.time);
    let d = decodes.swap_remove(0);
    Ok(Row {
        scheme,
        size,
        loss,
        encode: mb_s(s.data_bytes, best(enc_times.into_iter())),
        decode: mb_s(s.data_bytes, d.time),
        memcpy: mb_s(s.data_bytes, memcpy),
        overhead: 100.0 * s.repair_bytes as f64 / s.data_bytes as f64,
        d,
    })
}

fn table(rows: &[Row]) -> Vec<Vec<String>> {
    let mut t = vec![[
        "scheme",
        "packet",
        "loss",
        "encode MB/s",
        "decode MB/s",
        "memcpy MB/s",
        "encode ÷ memcpy",
        "decode ÷ memcpy",
        "repair bytes",
        "data lost → rebuilt / reported lost",
        "≥ 1 GB/s",
    ]
    .map(String::from)
    .to_vec()];
    for r in rows {
        let ok = r.encode >= GOAL_MB_S && r.decode >= GOAL_MB_S;
        t.push(vec![
            r.scheme.name().to_string(),
            format!("{} B", fmt_num(r.size as f64)),
            format!("{} %", r.loss * 100.0),
            fmt_num(r.encode),
            fmt_num(r.decode),
            fmt_num(r.memcpy),
            format!("{:.3}", r.encode / r.memcpy),
            format!("{:.3}", r.decode / r.memcpy),
            format!("{:.1} %", r.overhead),
            format!(
                "{} → {} / {}",
                r.d.lost_on_wire, r.d.rebuilt, r.d.reported_lost
            ),
            if ok { "yes" } else { "no" }.to_string(),
        ]);
    }
    t
}

/// Runs the FEC target and prints its table.
pub fn run(markdown: bool, quick: bool, mib: Option<u64>, seed: u64) -> Result<()> {
    let mib = mib.unwrap_or(if quick { 8 } else { 128 });
    let mut rows = Vec::new();
    for size in SIZES {
        for loss in LOSSES {
            for scheme in SCHEMES {
                eprintln!("[fec] {} {size} B, loss {} %", scheme.name(), loss * 100.0);
                rows.push(measure(scheme, size, loss, mib, seed)?);
            }
        }
    }
    let t = table(&rows);
    let mut out = String::new();
    let cmd = crate::command_line();
    let now = crate::unix_now();
    if markdown {
        writeln!(out, "`{cmd}` — {}", crate::utc_date(now))?;
        writeln!(out)?;
        out.push_str(&render_markdown(&t));
        writeln!(out)?;
    } else {
        writeln!(out, "{cmd}")?;
        writeln!(out, "{}", crate::utc_date(now))?;
        out.push_str(&render_plain(&t));
    }
    let bullet = if markdown { "- " } else { "  " };
    for s in SCHEMES {
        writeln!(out, "{bullet}{}: {}", s.name(), params(s))?;
    }
    writeln!(
        out,
        "{bullet}{mib} MiB of data per figure, best of {REPEATS}, MB/s per second of one thread's CPU time; {} CPUs, load average {}",
        crate::cpus(),
        crate::loadavg()
    )?;
    print!("{out}");
    Ok(())
}
