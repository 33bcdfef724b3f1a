//! `--targets disaster`: the rolling disaster of Smoke-and-Mirrors (issue 8), over our WAN
//! emulator (`mirrorfs-wan`): the primary site and its link to the mirror are lost within
//! moments of each other. How many changes that the application saw acknowledged does the
//! mirror lack afterwards, per `--ack` mode?
//!
//! For each mode, in one run: a fresh emulated WAN (side A: the primary's mount, side B: the
//! mirror daemon; one-way delay and loss per direction as below), identities made for the run,
//! the mount waits until its mirror is live. A writer appends numbered 32-byte messages to one
//! file through the mount, one `write(2)` each, for `RUN`; a write that returned is
//! *acknowledged*. Then the disaster: the link dies at the primary's site (nftables drops
//! everything in and out of side A), and `CUT_TO_KILL` later the primary is killed (`kill -9`):
//! what it had not handed on is gone with the site. What was already on the wire arrives (the
//! router runs for a round trip more), but nothing lost on the way can be sent again. The daemon is left to apply everything its journal holds, then stopped; the
//! messages in the mirror's copy of the file are counted. *Lost* = acknowledged − on the mirror
//! (never negative: a message can reach the mirror without its acknowledgement reaching the
//! writer).
//!
//! Each mode runs over the TCP data path; `network` also over the UDP data path with forward
//! error correction (`--transport udp`). A TCP segment the dying link lost is never resent, so
//! `network` over TCP loses what was on the wire; over UDP, `network` acknowledges once the data
//! and repair packets were handed to the socket, and what the dying link lost of them FEC may
//! rebuild from the packets that made it.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mirrorfs_wan::{Impairment, Side, Wan};

use crate::mounts;
use crate::report::{render_markdown, render_plain};

/// The modes compared, weakest first, and the data path (`--transport`) of each.
const MODES: [(&str, &str); 4] = [
    ("local", "tcp"),
    ("network", "tcp"),
    ("network", "udp"),
    ("durable", "tcp"),
];
/// One message: a 16-digit number, padding, a newline.
const MESSAGE: usize = 32;
/// The daemon's port inside its namespace (each run has namespaces of its own).
const PORT: u16 = 7070;
/// From the link's death to the primary's.
const CUT_TO_KILL: Duration = Duration::from_millis(2);
const SETUP: Duration = Duration::from_secs(60);
/// After the kill, the router runs this much longer than the round trip before it stops.
const ON_THE_WIRE_MARGIN: Duration = Duration::from_millis(200);

/// What one mode gave.
struct Outcome {
    mode: &'static str,
    transport: &'static str,
    /// Acknowledged before the link died, and of those not on the mirror.
    before_cut: u64,
    lost_before_cut: u64,
    /// From the cut to the kill (the router's stop takes `cut_ms` of it).
    window_ms: f64,
    cut_ms: f64,
    acknowledged: u64,
    on_mirror: u64,
    lost: u64,
    p50_ms: f64,
    per_s: f64,
}

/// The emulated link, the same both ways: SMFS's wide-area setting, shortened with `--quick`.
fn link(quick: bool) -> Impairment {
    Impairment {
        delay: Duration::from_millis(if quick { 10 } else { 25 }),
        loss: 0.001,
        rate_bps: Some(1_000_000_000),
        queue_bytes: 8 << 20,
        ..Impairment::default()
    }
}

pub fn run(bin: &Path, run_dir: &Path, markdown: bool, quick: bool, seed: u64) -> Result<()> {
    let run_for = Duration::from_secs(if quick { 2 } else { 5 });
    let imp = link(quick);
    let mut rows = Vec::new();
    for (i, (mode, transport)) in MODES.into_iter().enumerate() {
        let base = run_dir.join(format!("disaster-{mode}-{transport}"));
        fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
        let o = one(
            bin,
            &base,
            (mode, transport),
            &imp,
            run_for,
            seed + i as u64,
        )
        .with_context(|| format!("the rolling disaster with --ack {mode} over {transport}"))?;
        eprintln!(
            "[disaster] --ack {mode} over {transport}: {} acknowledged, {} on the mirror, {} lost",
            o.acknowledged, o.on_mirror, o.lost
        );
        rows.push(o);
    }
    print_table(&rows, &imp, run_for, markdown);
    Ok(())
}

fn print_table(rows: &[Outcome], imp: &Impairment, run_for: Duration, markdown: bool) {
    let header = [
        "--ack",
        "data path",
        "acknowledged before the cut",
        "of those lost",
        "acknowledged in all",
        "on the mirror",
        "acknowledged but lost",
        "cut to kill (ms)",
        "write p50 (ms)",
        "writes/s",
    ];
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|o| {
            vec![
                o.mode.to_string(),
                o.transport.to_string(),
                o.before_cut.to_string(),
                o.lost_before_cut.to_string(),
                o.acknowledged.to_string(),
                o.on_mirror.to_string(),
                o.lost.to_string(),
                format!("{:.1} ({:.1} to cut)", o.window_ms, o.cut_ms),
                format!("{:.2}", o.p50_ms),
                format!("{:.0}", o.per_s),
            ]
        })
        .collect();
    let mut title = String::new();
    let _ = write!(
        title,
        "rolling disaster: link dies (nftables drops everything at the primary), primary killed {} ms after that; {} ms one-way delay, {:.1} % loss each way, {} s of {MESSAGE}-byte appends",
        CUT_TO_KILL.as_millis(),
        imp.delay.as_millis(),
        imp.loss * 100.0,
        run_for.as_secs()
    );
    println!("{title}");
    let mut table = vec![header.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    table.extend(body);
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
    (mode, transport): (&'static str, &'static str),
    imp: &Impairment,
    run_for: Duration,
    seed: u64,
) -> Result<Outcome> {
    let (backing, mnt, mirror) = (base.join("backing"), base.join("mnt"), base.join("mirror"));
    for d in [&backing, &mnt, &mirror] {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let ids = crate::net::make_identities(bin, base)?;
    let wan =
        Wan::start(imp.clone(), imp.clone(), seed).context("cannot start the WAN emulator")?;
    let listen = format!("{}:{PORT}", Wan::addr(Side::B));
    let log = |name: &str| -> Result<fs::File> {
        fs::File::create(base.join(name)).context("cannot create a log file")
    };
    let mut procs = Procs(Vec::new());
    let daemon = wan
        .command(Side::B, &bin.to_string_lossy())
        .args(["serve".as_ref(), mirror.as_os_str(), "--listen".as_ref()])
        .arg(&listen)
        .arg("--config")
        .arg(&ids.mirror)
        .stdin(Stdio::null())
        .stderr(log("daemon.log")?)
        .spawn()
        .context("cannot start mirrorfs serve")?;
    procs.0.push(daemon);
    wait_for(
        || Ok(listening(&wan, &listen)),
        "the daemon to listen",
        base,
    )?;
    let mount = wan
        .command(Side::A, &bin.to_string_lossy())
        .args(["mount".as_ref(), backing.as_os_str(), mnt.as_os_str()])
        .arg("--mirror")
        .arg(format!("mirror://{listen}"))
        .args(["--ack", mode, "--transport", transport, "--config"])
        .arg(&ids.primary)
        .stdin(Stdio::null())
        .stderr(log("mount.log")?)
        .spawn()
        .context("cannot start mirrorfs mount")?;
    let mount_pid = mount.id();
    procs.0.push(mount);
    wait_for(|| mounts::is_mounted(&mnt), "the mount", base)?;
    wait_for(|| Ok(mirror_live(&backing)), "the mirror to be live", base)?;

    let writer = Writer::start(mnt.join("log"));
    sleep(run_for);
    // The disaster: the link, then the primary site.
    let before_cut = writer.acknowledged.load(Ordering::SeqCst);
    let t_cut = Instant::now();
    cut(&wan)?;
    let cut_took = t_cut.elapsed();
    sleep(CUT_TO_KILL);
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(mount_pid as i32, libc::SIGKILL) };
    let window = t_cut.elapsed();
    let acknowledged = writer.acknowledged.load(Ordering::SeqCst);
    let (lat, elapsed) = writer.finish();
    if let Some(mut m) = procs.0.pop() {
        let _ = m.wait();
    }
    let _ = mounts::unmount(&mnt);
    // What had left the site before the cut is on the wire: it arrives (nothing new can leave
    // A, and nothing A would resend gets out). Stopping the router at once would drop it.
    sleep(imp.delay * 2 + ON_THE_WIRE_MARGIN);
    wan.stop().context("the WAN emulator's router failed")?;

    // The mirror site applies what its journal holds, then stops.
    wait_for(
        || Ok(daemon_caught_up(&mirror)),
        "the daemon to apply its journal",
        base,
    )?;
    if let Some(d) = procs.0.first() {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    }
    drop(procs);
    let on_mirror = complete_messages(&mirror.join("log"))?;
    let mut lat = lat;
    lat.sort();
    let p50_ms = lat
        .get(lat.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3);
    Ok(Outcome {
        mode,
        transport,
        before_cut,
        lost_before_cut: before_cut.saturating_sub(on_mirror),
        window_ms: window.as_secs_f64() * 1e3,
        cut_ms: cut_took.as_secs_f64() * 1e3,
        acknowledged,
        on_mirror,
        lost: acknowledged.saturating_sub(on_mirror),
        p50_ms,
        per_s: acknowledged as f64 / elapsed.as_secs_f64().max(1e-9),
    })
}

/// Appends numbered messages through the mount until it fails (the primary was killed) or is
/// told to stop; counts those whose `write(2)` returned.
struct Writer {
    acknowledged: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(Vec<Duration>, Duration)>,
}

impl Writer {
    fn start(path: PathBuf) -> Writer {
        let acknowledged = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acknowledged.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let t0 = Instant::now();
            // Bounded: one sample per message, at most a few hundred thousand in a run.
            let lat = Mutex::new(Vec::new());
            let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(&path) else {
                return (Vec::new(), t0.elapsed());
            };
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) && i < 1_000_000 {
                let msg = format!("{i:016}{:>15}\n", "");
                let w0 = Instant::now();
                if f.write_all(msg.as_bytes()).is_err() {
                    break;
                }
                if let Ok(mut l) = lat.lock() {
                    l.push(w0.elapsed());
                }
                i += 1;
                a.store(i, Ordering::SeqCst);
            }
            (lat.into_inner().unwrap_or_default(), t0.elapsed())
        });
        Writer {
            acknowledged,
            stop,
            handle,
        }
    }

    fn finish(self) -> (Vec<Duration>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
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
        let want = format!("{n:016}{:>15}\n", "");
        if chunk != want.as_bytes() {
            break;
        }
        n += 1;
    }
    Ok(n)
}

/// The link dies at once: nftables in side A's namespace drops every packet in and out (one
/// atomic rule set), as a cut fibre would; the router and devices stay until the end.
fn cut(wan: &Wan) -> Result<()> {
    let rules = "table inet mirrorfs_cut {\n\
        chain in { type filter hook input priority -300; policy drop; }\n\
        chain out { type filter hook output priority -300; policy drop; }\n\
        }\n";
    let mut nft = wan
        .command(Side::A, "nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .context("cannot run nft (install nftables)")?;
    if let Some(mut stdin) = nft.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .context("cannot give nft its rules")?;
    }
    let st = nft.wait().context("nft")?;
    if !st.success() {
        bail!("nft could not cut the link ({st})");
    }
    Ok(())
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
