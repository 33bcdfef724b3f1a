//! `--targets tokens` (not in the default set): two writable sites with write tokens (issue 7
//! item 5), on loopback, side by side in one run with single-primary mode.
//!
//! - **Write speed on a site that holds the tokens** against single-primary mode with the same
//!   kind of mirror: site A mounted with `--mirror mirror://…` to a `mirrorfs serve` daemon
//!   (baseline), then A mounted with `--peer mirror://…` to site B (a writable mount with
//!   `--write-tokens 2:1`) and `--write-tokens 1:2` (A is the home: it holds every token). Two
//!   workloads, each in rounds alternating nothing else, median reported: `4k-pwrite`, 8,192
//!   `pwrite`s of 4 KiB at random offsets in 8 files of 4 MiB (ops/s); `seq-write`, a file of
//!   128 MiB (16 with `--quick`) in 1 MiB writes (MiB/s); `names`, 500 × (create, chmod, rename,
//!   unlink) of empty files (changes/s: each takes the tokens of the names it changes). Target:
//!   the pair ≥ 0.9 × single-primary.
//! - **Token hand-over latency through the mounts**: one file written alternately at B and at A
//!   (open, 4 KiB `pwrite`, close, timed), so each write takes the token from the other site
//!   (request, grant after its records, T1 and T2 fsyncs), against the same write at A to a
//!   file whose token it holds. p50/p99/max. The same for a name change: one file's `chmod`
//!   alternately at B and at A, against a `chmod` at A of a file whose token it holds.
//!
//! `--tokens-rows` runs only some rows ([`Row`]); the others print `-`. Without a write-speed
//! row the single primary is not mounted at all.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};

use crate::mounts::{Mount, Proc};
use crate::net::{free_port, make_identities, spawn_daemon, Identities};
use crate::report::{render_markdown, render_plain};
use crate::workloads::percentile;

const ROUNDS: usize = 5;
const FILES: u64 = 8;
const FILE_BYTES: u64 = 4 << 20;
const PWRITES: usize = 8192;
const HANDOVERS: usize = 200;
/// Files of the `names` workload per round (four changes each).
const NAMES: usize = 500;
/// How long the pair may take to connect both ways.
const CONNECT: Duration = Duration::from_secs(60);

/// A row (or two) of the target's tables, for `--tokens-rows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Row {
    /// Write speed: 4 KiB pwrites at random offsets.
    #[value(name = "4k-pwrite")]
    Pwrite,
    /// Write speed: one sequential file.
    SeqWrite,
    /// Write speed: create, chmod, rename, unlink.
    Names,
    /// Hand-over latency of a write, and a write whose token is held.
    Handover,
    /// Hand-over latency of a chmod, and a chmod whose token is held.
    Chmod,
}

/// The rows to run: all of them where `rows` is empty.
#[derive(Clone, Copy)]
struct Rows<'a>(&'a [Row]);

impl Rows<'_> {
    fn has(self, r: Row) -> bool {
        self.0.is_empty() || self.0.contains(&r)
    }

    fn any_speed(self) -> bool {
        [Row::Pwrite, Row::SeqWrite, Row::Names]
            .into_iter()
            .any(|r| self.has(r))
    }
}

/// A writable mount of the pair, or the single primary.
struct Site {
    mount: Option<Mount>,
    backing: PathBuf,
    mnt: PathBuf,
}

impl Site {
    fn start(bin: &Path, base: &Path, name: &str, args: &[OsString]) -> Result<Site> {
        let backing = base.join(format!("{name}-backing"));
        let mnt = base.join(format!("{name}-mnt"));
        for d in [&backing, &mnt] {
            fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let log = base.join(format!("{name}.log"));
        let mount = Mount::mirrorfs_with(bin, &backing, &mnt, args, &log)?;
        Ok(Site {
            mount: Some(mount),
            backing,
            mnt,
        })
    }

    fn stop(&mut self) -> Result<()> {
        match self.mount.take() {
            Some(m) => m.unmount(),
            None => Ok(()),
        }
    }
}

fn os(v: &[String]) -> Vec<OsString> {
    v.iter().map(OsString::from).collect()
}

/// Both sites' write-token links are up (their `status` says so).
fn wait_connected(bin: &Path, mnts: &[&Path]) -> Result<()> {
    let t0 = Instant::now();
    for m in mnts {
        loop {
            crate::check_interrupted()?;
            let out = std::process::Command::new(bin)
                .arg("status")
                .arg(m)
                .arg("--json")
                .output()
                .context("mirrorfs status")?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if v["write_tokens"]["connected"] == true {
                break;
            }
            if t0.elapsed() > CONNECT {
                bail!("the pair did not connect within {CONNECT:?}");
            }
            sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// The peer has applied everything `mnt`'s journal holds (its `status`).
fn wait_caught_up(bin: &Path, mnt: &Path) -> Result<()> {
    let t0 = Instant::now();
    loop {
        crate::check_interrupted()?;
        let out = std::process::Command::new(bin)
            .arg("status")
            .arg(mnt)
            .arg("--json")
            .output()
            .context("mirrorfs status")?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let end = v["journal_next_seq"]
            .as_u64()
            .unwrap_or(u64::MAX)
            .saturating_sub(1);
        if v["mirrors"][0]["applied_seq"]
            .as_u64()
            .is_some_and(|a| a >= end)
        {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("the peer did not catch up within 600 s: {v}");
        }
        sleep(Duration::from_millis(200));
    }
}

/// Write speed through `mnt`: (4 KiB pwrites/s, sequential MiB/s, name changes/s), medians of
/// [`ROUNDS`]; NaN for a row not in `rows`.
fn write_speed(mnt: &Path, seq_mib: u64, seed: u64, rows: Rows) -> Result<Speed> {
    let dir = mnt.join("speed");
    fs::create_dir_all(&dir)?;
    let files: Vec<fs::File> = (0..FILES)
        .map(|i| {
            let f = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(dir.join(format!("f{i}")))?;
            f.set_len(FILE_BYTES)?;
            Ok(f)
        })
        .collect::<Result<_>>()?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let block = vec![7u8; 4096];
    let mb = vec![9u8; 1 << 20];
    let (mut ops, mut seq, mut names) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        crate::check_interrupted()?;
        if rows.has(Row::Pwrite) {
            let t = Instant::now();
            for _ in 0..PWRITES {
                let f = &files[rng.gen_range(0..FILES) as usize];
                let off = rng.gen_range(0..FILE_BYTES / 4096) * 4096;
                f.write_all_at(&block, off)?;
            }
            ops.push(PWRITES as f64 / t.elapsed().as_secs_f64());
        }
        if rows.has(Row::SeqWrite) {
            let p = dir.join(format!("seq{round}"));
            let t = Instant::now();
            let f = fs::File::create(&p)?;
            for i in 0..seq_mib {
                f.write_all_at(&mb, i << 20)?;
            }
            drop(f);
            seq.push(seq_mib as f64 / t.elapsed().as_secs_f64());
            fs::remove_file(&p)?;
        }
        if rows.has(Row::Names) {
            let t = Instant::now();
            for i in 0..NAMES {
                let (p, q) = (
                    dir.join(format!("n{round}-{i}")),
                    dir.join(format!("m{round}-{i}")),
                );
                drop(fs::File::create(&p)?);
                fs::set_permissions(&p, fs::Permissions::from_mode(0o600))?;
                fs::rename(&p, &q)?;
                fs::remove_file(&q)?;
            }
            names.push((4 * NAMES) as f64 / t.elapsed().as_secs_f64());
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    Ok((median(ops), median(seq), median(names)))
}

/// (4 KiB pwrites/s, sequential MiB/s, name changes/s); NaN: not measured.
type Speed = (f64, f64, f64);

const NOT_RUN: Speed = (f64::NAN, f64::NAN, f64::NAN);

/// One `chmod` of `p`: timed.
fn one_chmod(p: &Path, mode: u32) -> Result<Duration> {
    let t = Instant::now();
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", p.display()))?;
    Ok(t.elapsed())
}

/// Open, one 4 KiB pwrite at 0, close: timed.
fn one_write(p: &Path, byte: u8) -> Result<Duration> {
    let t = Instant::now();
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .with_context(|| format!("open {}", p.display()))?;
    f.write_all_at(&[byte; 4096], 0)
        .with_context(|| format!("write {}", p.display()))?;
    drop(f);
    Ok(t.elapsed())
}

struct Figures {
    /// Before and after the pair.
    single: [Speed; 2],
    pair: Speed,
    /// Sorted latencies: writes that took the token from the other site, at A and at B; a
    /// write to a token held; the same for `chmod`.
    handover: Vec<Duration>,
    held: Vec<Duration>,
    chmod_handover: Vec<Duration>,
    chmod_held: Vec<Duration>,
}

/// `rows`: the rows to run (`--tokens-rows`; empty: all).
pub fn run(
    bin: &Path,
    run_dir: &Path,
    markdown: bool,
    quick: bool,
    seed: u64,
    rows: &[Row],
) -> Result<()> {
    let base = run_dir.join("tokens");
    fs::create_dir_all(&base)?;
    let ids = make_identities(bin, &base)?;
    let seq_mib = if quick { 16 } else { 128 };
    let f = measure(bin, &base, &ids, seq_mib, seed, Rows(rows))?;
    print_table(&f, seq_mib, markdown);
    Ok(())
}

/// Single primary, its mirror a daemon on loopback: write speed (`round` names its directories).
fn single_speed(
    bin: &Path,
    base: &Path,
    ids: &Identities,
    seq_mib: u64,
    seed: u64,
    round: &str,
    rows: Rows,
) -> Result<Speed> {
    let port = free_port()?;
    let mirror = base.join(format!("single-{round}-mirror"));
    fs::create_dir_all(&mirror)?;
    let mut daemon: Proc = spawn_daemon(
        bin,
        &mirror,
        port,
        &ids.mirror,
        &base.join(format!("serve-{round}.log")),
    )?;
    let mut single = Site::start(
        bin,
        base,
        &format!("single-{round}"),
        &os(&[
            "--mirror".into(),
            format!("mirror://127.0.0.1:{port}"),
            "--config".into(),
            ids.primary.display().to_string(),
        ]),
    )?;
    eprintln!("[tokens] single primary ({round}): write speed");
    let speed = write_speed(&single.mnt, seq_mib, seed, rows)?;
    eprintln!("[tokens] single primary ({round}): {speed:?}");
    single.stop()?;
    // Its applier may still be catching up on a loaded machine: its figures are taken.
    if let Err(e) = daemon.stop() {
        eprintln!("[tokens] the mirror daemon did not stop cleanly: {e:#}");
    }
    Ok(speed)
}

fn measure(
    bin: &Path,
    base: &Path,
    ids: &Identities,
    seq_mib: u64,
    seed: u64,
    rows: Rows,
) -> Result<Figures> {
    // Single primary before and after the pair: the machine's drift shows between the two.
    let single = |round: &str| match rows.any_speed() {
        true => single_speed(bin, base, ids, seq_mib, seed, round, rows),
        false => Ok(NOT_RUN),
    };
    let before = single("before")?;
    let pair = pair_figures(bin, base, ids, seq_mib, seed, rows)?;
    let after = single("after")?;
    Ok(Figures {
        single: [before, after],
        pair: pair.speed,
        handover: pair.handover,
        held: pair.held,
        chmod_handover: pair.chmod_handover,
        chmod_held: pair.chmod_held,
    })
}

struct PairFigures {
    speed: Speed,
    handover: Vec<Duration>,
    held: Vec<Duration>,
    chmod_handover: Vec<Duration>,
    chmod_held: Vec<Duration>,
}

fn pair_figures(
    bin: &Path,
    base: &Path,
    ids: &Identities,
    seq_mib: u64,
    seed: u64,
    rows: Rows,
) -> Result<PairFigures> {
    let cfg_a = ids.primary.display().to_string();
    let cfg_b = ids.mirror.display().to_string();
    // The pair: A (site 1, home of every token) and B (site 2).
    let (pa, pb) = (free_port()?, free_port()?);
    let pair_args = |me: &str, cfg: &str, listen: u16, peer: u16| {
        os(&[
            "--peer".into(),
            format!("mirror://127.0.0.1:{peer}"),
            "--receive".into(),
            format!("127.0.0.1:{listen}"),
            "--write-tokens".into(),
            me.into(),
            "--config".into(),
            cfg.into(),
        ])
    };
    let mut a = Site::start(bin, base, "a", &pair_args("1:2", &cfg_a, pa, pb))?;
    let mut b = Site::start(bin, base, "b", &pair_args("2:1", &cfg_b, pb, pa))?;
    wait_connected(bin, &[&a.mnt, &b.mnt])?;
    let pair_speed = if rows.any_speed() {
        eprintln!("[tokens] pair, site A holding the tokens: write speed");
        let speed = write_speed(&a.mnt, seq_mib, seed, rows)?;
        eprintln!("[tokens] pair: {speed:?}");
        speed
    } else {
        NOT_RUN
    };
    // A Grant waits until the new holder applied the granter's records it names (for a token
    // at home with no entry: the home's journal end), so B first catches up with A's writes.
    wait_caught_up(bin, &a.mnt)?;
    let (mut handover, mut held) = (Vec::new(), Vec::new());
    one_write(&a.mnt.join("mine"), b'0')?;
    // `shared` exists at both sites before the alternation: a create takes the name's token,
    // and one that waited for it finds the other site's file and fails with EEXIST (README).
    one_write(&a.mnt.join("shared"), b'a')?;
    let t0 = Instant::now();
    while !b.backing.join("shared").exists() {
        if t0.elapsed() > CONNECT {
            bail!("site B never received A's `shared`");
        }
        sleep(Duration::from_millis(20));
    }
    if rows.has(Row::Handover) {
        eprintln!("[tokens] pair: token hand-over latency");
    }
    for i in (0..HANDOVERS).filter(|_| rows.has(Row::Handover)) {
        crate::check_interrupted()?;
        handover.push(one_write(&b.mnt.join("shared"), b'b')?);
        handover.push(one_write(&a.mnt.join("shared"), b'a')?);
        held.push(one_write(&a.mnt.join("mine"), i as u8)?);
    }
    handover.sort();
    held.sort();
    let (mut chmod_handover, mut chmod_held) = (Vec::new(), Vec::new());
    if rows.has(Row::Chmod) {
        eprintln!("[tokens] pair: name-change (chmod) hand-over latency");
    }
    for i in (0..HANDOVERS).filter(|_| rows.has(Row::Chmod)) {
        crate::check_interrupted()?;
        let mode = 0o600 | (i as u32 & 0o7) << 3;
        chmod_handover.push(one_chmod(&b.mnt.join("shared"), mode)?);
        chmod_handover.push(one_chmod(&a.mnt.join("shared"), mode | 0o4)?);
        chmod_held.push(one_chmod(&a.mnt.join("mine"), mode)?);
    }
    chmod_handover.sort();
    chmod_held.sort();
    // The last write is a's: both backing trees hold it once b applied it.
    let t0 = Instant::now();
    while fs::read(b.backing.join("shared")).ok() != Some(vec![b'a'; 4096]) {
        if t0.elapsed() > CONNECT {
            bail!("site B never received A's last write");
        }
        sleep(Duration::from_millis(20));
    }
    let _ = &a.backing;
    b.stop()?;
    a.stop()?;
    Ok(PairFigures {
        speed: pair_speed,
        handover,
        held,
        chmod_handover,
        chmod_held,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn print_table(f: &Figures, seq_mib: u64, markdown: bool) {
    println!(
        "two writable sites on loopback (--peer, --write-tokens): write speed at the site holding the tokens vs single primary with a network mirror (median of {ROUNDS} rounds; target ≥ 0.9x), and token hand-over latency (a write: open + 4 KiB pwrite + close; a chmod; {HANDOVERS} alternations each)"
    );
    let ratio = |p: f64, s: f64| {
        let r = p / s;
        match r.is_nan() {
            true => "-".to_string(),
            false => format!("{r:.2}x {}", if r >= 0.9 { "(met)" } else { "(NOT met)" }),
        }
    };
    // A figure, or `-` for a row not run.
    let fig = |v: f64, places: usize| match v.is_nan() {
        true => "-".to_string(),
        false => format!("{v:.places$}"),
    };
    let mut t = vec![vec![
        "workload".to_string(),
        "single primary, before".into(),
        "pair, tokens held".into(),
        "single primary, after".into(),
        "ratio to the mean of the two".into(),
    ]];
    let [b, a] = f.single;
    t.push(vec![
        format!("4k-pwrite ({PWRITES} in {FILES} files), ops/s"),
        fig(b.0, 0),
        fig(f.pair.0, 0),
        fig(a.0, 0),
        ratio(f.pair.0, (b.0 + a.0) / 2.0),
    ]);
    t.push(vec![
        format!("seq-write {seq_mib} MiB, MiB/s"),
        fig(b.1, 1),
        fig(f.pair.1, 1),
        fig(a.1, 1),
        ratio(f.pair.1, (b.1 + a.1) / 2.0),
    ]);
    t.push(vec![
        format!("names ({NAMES} × create, chmod, rename, unlink), changes/s"),
        fig(b.2, 0),
        fig(f.pair.2, 0),
        fig(a.2, 0),
        ratio(f.pair.2, (b.2 + a.2) / 2.0),
    ]);
    let mut l = vec![vec![
        "change (a write: open + 4 KiB pwrite + close; a chmod)".to_string(),
        "p50 ms".into(),
        "p99 ms".into(),
        "max ms".into(),
    ]];
    for (name, v) in [
        ("token held here", &f.held),
        ("token taken from the other site", &f.handover),
        ("chmod, token held here", &f.chmod_held),
        ("chmod, token taken from the other site", &f.chmod_handover),
    ] {
        if v.is_empty() {
            l.push(vec![name.to_string(), "-".into(), "-".into(), "-".into()]);
            continue;
        }
        l.push(vec![
            name.to_string(),
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99)),
            ms(percentile(v, 1.0)),
        ]);
    }
    let render = |t: &Vec<Vec<String>>| {
        if markdown {
            render_markdown(t)
        } else {
            render_plain(t)
        }
    };
    println!("{}", render(&t));
    println!("{}", render(&l));
}
