//! `mirrorfs-bench`: runs the same file system workloads, in one run, against
//! several targets and prints one table with a column per target and, for the
//! FUSE targets, the ratio to the native directory measured in the same run.
//!
//! Targets (`--targets`, default all four, always run in this order):
//! - `native`: a plain directory in a fresh temp dir under `--workdir`
//!   (default `/var/tmp/mirrorfs-bench`) on the local disk: the baseline.
//! - `bindfs`: `bindfs SRC MNT`, a plain FUSE passthrough, i.e. the cost of
//!   FUSE itself (`--bindfs-args` adds options, e.g. `"-o big_writes"`).
//! - `mirrorfs`: `MIRRORFS_BIN mount BACKING MNT --mirror MIRROR
//!   [--mirrorfs-args ...]` run in the foreground; ready once MNT shows up in
//!   `/proc/self/mountinfo` (10 s timeout), stopped with SIGTERM. A target
//!   that cannot be set up is reported as skipped; the others still run.
//! - `mirrorfs-wb` (not in the default set; `--targets native,mirrorfs,mirrorfs-wb`): the
//!   `mirrorfs` target with `--writeback-cache`, a column beside it in the main table.
//! - `mirrorfs-net`: `mirrorfs serve MIRROR --listen 127.0.0.1:PORT` and a
//!   mount with `--mirror mirror://127.0.0.1:PORT`, with identities made for
//!   the run (`mirrorfs init/trust --config DIR`, in the temp dir). It has its
//!   own table (see `net.rs`): replication rate of a `--size-mib` write vs the
//!   local write+fsync (plain, `--compress` with zeros and random data, `--ack
//!   durable`), network mirror lag, bytes on the wire for a 4 KiB overwrite
//!   in a `--overwrite-file-mib` file vs `rsync`, and bytes sent to resume
//!   after `--outage-mib` MiB written while the daemon was stopped. Nothing of
//!   it (identities, rsync) is needed unless it is selected.
//! - `reintegration` (not in the default set; `--targets reintegration`):
//!   failback after an outage (issue 7): P mounted with M as its network
//!   mirror writes `--reint-large-files` x 256 KiB + `--reint-small-files` x
//!   4 KiB while M is stopped; M is promoted and mounted as the new primary
//!   with `--mirror` to `serve P_DIR`. Rows in the network table: files/s and
//!   MiB/s from the new mount's start until its mirror is live and the files
//!   are equal (vs live replication of the same set in the same run), and the
//!   bytes the new primary received during the reintegration vs the bytes
//!   changed (target <= 1.05x). See `net::run_reintegration`.
//!
//! - `sqlite` (not in the default set; `--targets sqlite`): SQLite's transaction
//!   rate (synchronous=FULL, rollback journal and WAL) on native and through
//!   mirrorfs with a local mirror per `--ack`/`--fsync-waits`, each mirror's
//!   copy checked with `integrity_check` (see `sqlite.rs`).
//!
//! - `fio` (not in the default set; `--targets fio`): standard fio jobs (4 KiB random
//!   writes with 1 and 4 jobs, 4 KiB random reads, 1 MiB sequential writes with
//!   `end_fsync=1`) on native, bindfs and mirrorfs with a local mirror, ratios to native
//!   (see `fio.rs`); skipped, with the apt command, where fio is not installed.
//!
//! - `ack` (not in the default set; `--targets ack`): acknowledgement latency
//!   (4 KiB write + fdatasync) per `--ack` mode and data path over the WAN
//!   emulator at 25 ms one-way and 1 % loss; target network <= local + 1 ms
//!   (see `ack.rs`).
//!
//! - `tokens` (not in the default set; `--targets tokens`): two writable sites on
//!   loopback (`mount --peer … --write-tokens`): write speed at the site holding the
//!   tokens vs single primary with a network mirror, side by side (target ≥ 0.9x),
//!   and token hand-over latency through the mounts (see `tokens.rs`); `--tokens-rows`
//!   runs only some of its rows.
//! - `initsync` (not in the default set; `--targets initsync`): the initial copy of
//!   `--initsync-files` files of 1–8 KiB (100 to a directory) to an empty local mirror, from
//!   the mount's start until its status says `live`, against `rsync -a` of the same tree in
//!   the same run (see `initsync.rs`).
//!
//! - `fuse-transport` (not in the default set; `--targets fuse-transport`, root): what FUSE
//!   over io_uring buys per request against the classic `/dev/fuse` transport, both served
//!   side by side by a minimal in-memory FUSE server of our own written from the kernel's ABI
//!   (stat, 4 KiB pwrite, create+write+close; see `fuse_transport/mod.rs`). It needs no
//!   mirrorfs binary and has its own table.
//!
//! - `fec` (not in the default set; `--targets fec`): throughput of the FEC
//!   schemes of `mirrorfs_core::fec` (layered XOR, Reed–Solomon over two crates)
//!   beside a memcpy of the same bytes, at 1,400 B and 4 KiB packets, 0 and 1 %
//!   loss; `--fec-mib` MiB per figure. It needs no mount and runs first, with
//!   its own table (see `fec.rs`).
//!
//! Workloads, run on each target one after the other, each in a fresh
//! subdirectory. Only the operations named are timed (wall clock, open to
//! close inclusive); `sync(2)` is called, untimed, before each timed write
//! phase so that no workload pays for the previous one's writeback. Caches
//! are only dropped for the cold read.
//! - seq-write: one file of `--size-mib` MiB (default 1024) in 1 MiB
//!   writes, then close: MiB/s. seq-write+fsync: same, fsync before close.
//! - seq-read (warm): the seq-write file read back in 1 MiB reads right
//!   after writing it; (cold): the same after
//!   `sync; echo 3 > /proc/sys/vm/drop_caches`: MiB/s.
//! - rand-write-4k: a 256 MiB file (at most `--size-mib`) is written with
//!   zeros (untimed), then 65,536 `pwrite`s of 4 KiB at random 4 KiB-aligned
//!   offsets from a seeded RNG, then close: IOPS.
//! - small-files: 10,000 files of 4 KiB in one directory
//!   (`open(O_CREAT|O_WRONLY)`, write, close): files/s.
//! - rand-write-4k, 4 and 16 threads: the same number of random 4 KiB pwrites split between
//!   4 (16) threads, each with its own descriptor, into one fresh file of the same size: IOPS.
//! - stat: `lstat` of each of those files: stats/s.
//! - build-like: a source-like tree of `--build-files` files of 1–16 KiB (20 to a directory),
//!   made and tarred once per run on the local disk, untarred with `tar xf` and deleted with
//!   `rm -r` (each timed, files/s). The deletion frees inodes mid-run (see below).
//! - mirrorfs only: *catch-up*, the time after the bulk workloads until the
//!   mirror holds the same entries and sizes as the backing dir (contents
//!   then verified byte for byte); *lag*: 200 times, create a file with 100
//!   random bytes, close, then poll the mirror copy (50 µs sleeps) until it
//!   is identical: p50/p99/max of close→identical; *burst lag*: write 1,000
//!   files of 1 KiB as fast as possible while a second thread polls the
//!   mirror: p50/p99 of each file's close→identical, and the time from the
//!   last close until all are identical. Every wait times out after 30 s.
//! - mirrorfs only: the mirrorfs process's VmRSS and the mirror backlog
//!   (`lag_bytes` in its status.json) sampled every 20 ms during all the
//!   workloads (peaks), and its VmHWM and VmRSS at the end.
//!
//! `--quick` shrinks everything for CI smoke tests (64 MiB file, 5,000
//! random writes, 1,000 small files, 50 lag samples, burst of 200; network:
//! 32 MiB overwrite file, 16 MiB outage).
//! `--markdown` prints the table as Markdown for docs/benchmarks.md.
//!
//! Fairness measures (each found to matter on a 2-core Firecracker VM):
//! before the first target, RAM is faulted in once (`--warmup-mib`), since a
//! VM's first touch of guest pages is slow and would otherwise only hit the
//! first target; nothing is deleted before the end of the run, and on ext4
//! without a journal the run waits until the previous run's deleted inodes
//! are 65 s old, since ext4 then skips (and rescans) recently freed inodes
//! on every file creation. Mounts and temp dirs are removed at the end, on
//! error and on Ctrl-C (a second Ctrl-C exits at once).

mod ack;
mod disaster;
mod fec;
mod fio;
mod fuse_transport;
mod initsync;
mod latency;
mod mounts;
mod net;
mod plots;
mod report;
mod sqlite;
mod tokens;
mod wan;
mod workloads;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use serde::Serialize;

use mounts::{DirGuard, Mount};
use report::{Metric, TargetReport};
use workloads::MIB;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Native,
    Bindfs,
    Mirrorfs,
    /// `mirrorfs` with `--writeback-cache` (the kernel caches writes), beside it in the main
    /// table. Not in the default set.
    #[value(name = "mirrorfs-wb")]
    #[serde(rename = "mirrorfs-wb")]
    MirrorfsWb,
    /// mirrorfs with a `mirrorfs serve` daemon on loopback as its mirror.
    #[value(name = "mirrorfs-net")]
    #[serde(rename = "mirrorfs-net")]
    Net,
    /// Failback after an outage: a promoted mirror takes the old primary's changes in
    /// (`net.rs`, `run_reintegration`). Not in the default set.
    Reintegration,
    /// FEC encode/decode throughput (`fec.rs`), no file system involved. Not in the default set.
    Fec,
    /// The SMFS rolling disaster per `--ack` mode over the WAN emulator (`disaster.rs`). Not
    /// in the default set.
    Disaster,
    /// SQLite's transaction rate with `synchronous=FULL` through mirrorfs against native, per
    /// `--ack` and `--fsync-waits` (`sqlite.rs`). Not in the default set.
    Sqlite,
    /// Standard fio jobs on native, bindfs and mirrorfs with a local mirror (`fio.rs`). Not in
    /// the default set.
    Fio,
    /// Mirroring throughput of the TCP (BBR, CUBIC) and the UDP + FEC (fixed and adaptive
    /// rate) data paths over the WAN emulator vs loss and vs delay (`wan.rs`, `--wan-parts`).
    /// Not in the default set.
    Wan,
    /// Acknowledgement latency (write + fdatasync) per `--ack` mode and data path over the WAN
    /// emulator at 25 ms one-way and 1 % loss (`ack.rs`). Not in the default set.
    Ack,
    /// Two writable sites with write tokens on loopback: write speed at the site holding the
    /// tokens vs single primary, and token hand-over latency (`tokens.rs`). Not in the default
    /// set.
    Tokens,
    /// The initial copy of a tree of small files to an empty local mirror against `rsync -a`
    /// of the same tree (`initsync.rs`, `--initsync-files`). Not in the default set.
    Initsync,
    /// FUSE over io_uring against the classic `/dev/fuse` transport, per request, with a
    /// minimal in-memory FUSE server of our own (`fuse_transport/`). Needs root. Not in the
    /// default set.
    #[value(name = "fuse-transport")]
    #[serde(rename = "fuse-transport")]
    FuseTransport,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Native => "native",
            TargetKind::Bindfs => "bindfs",
            TargetKind::Mirrorfs => "mirrorfs",
            TargetKind::MirrorfsWb => "mirrorfs-wb",
            TargetKind::Net => "mirrorfs-net",
            TargetKind::Reintegration => "reintegration",
            TargetKind::Fec => "fec",
            TargetKind::Disaster => "disaster",
            TargetKind::Sqlite => "sqlite",
            TargetKind::Fio => "fio",
            TargetKind::Wan => "wan",
            TargetKind::Ack => "ack",
            TargetKind::Tokens => "tokens",
            TargetKind::Initsync => "initsync",
            TargetKind::FuseTransport => "fuse-transport",
        }
    }

    /// A local mount of mirrorfs (the main table's mirrorfs columns).
    pub fn is_mirrorfs(self) -> bool {
        matches!(self, TargetKind::Mirrorfs | TargetKind::MirrorfsWb)
    }

    /// The network targets have their own table.
    pub fn in_main_table(self) -> bool {
        !matches!(
            self,
            TargetKind::Net
                | TargetKind::Reintegration
                | TargetKind::Fec
                | TargetKind::Disaster
                | TargetKind::Sqlite
                | TargetKind::Fio
                | TargetKind::Wan
                | TargetKind::Ack
                | TargetKind::Tokens
                | TargetKind::Initsync
                | TargetKind::FuseTransport
        )
    }
}

/// Benchmark mirrorfs against a native directory and a FUSE passthrough (bindfs).
#[derive(Parser, Debug)]
#[command(name = "mirrorfs-bench", version, about, long_about = None)]
struct Args {
    /// Targets to run, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "native,bindfs,mirrorfs,mirrorfs-net"
    )]
    targets: Vec<TargetKind>,
    /// Directory on the local disk under which a fresh temp dir is made.
    #[arg(long, default_value = "/var/tmp/mirrorfs-bench")]
    workdir: PathBuf,
    /// mirrorfs binary [default: `mirrorfs` next to this executable].
    #[arg(long)]
    mirrorfs_bin: Option<PathBuf>,
    /// Extra arguments for `mirrorfs mount`, split on whitespace (e.g. "--ack sync").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    mirrorfs_args: String,
    /// Extra arguments for bindfs, split on whitespace (e.g. "-o big_writes").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    bindfs_args: String,
    /// Size of the sequential file in MiB [default: 1024, 64 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    size_mib: Option<u64>,
    /// Small sizes for a quick smoke test.
    #[arg(long)]
    quick: bool,
    /// Number of random 4 KiB writes [default: 65536, 5000 with --quick].
    #[arg(long)]
    rand_writes: Option<u64>,
    /// Number of small files [default: 10000, 1000 with --quick].
    #[arg(long)]
    small_files: Option<u64>,
    /// Files in the build-like workload's source tarball (untarred, then deleted) [default:
    /// 10000, 500 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    build_files: Option<u64>,
    /// Files of 1-8 KiB in the initsync target's tree, 100 to a directory [default: 100000,
    /// 2000 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    initsync_files: Option<u64>,
    /// Number of single-write mirror lag samples [default: 200, 50 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    lag_samples: Option<u64>,
    /// Number of files in the mirror lag burst [default: 1000, 200 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    burst_files: Option<u64>,
    /// Size of the file with the 4 KiB overwrite (network target) [default: 256, 32 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    overwrite_file_mib: Option<u64>,
    /// MiB written while the mirror daemon is stopped (network target) [default: 512, 16 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    outage_mib: Option<u64>,
    /// Files of 256 KiB P writes during the outage (reintegration target) [default: 200, 20 with --quick].
    #[arg(long)]
    reint_large_files: Option<u64>,
    /// Files of 4 KiB P writes during the outage (reintegration target) [default: 2000, 200 with --quick].
    #[arg(long)]
    reint_small_files: Option<u64>,
    /// MiB of RAM to fault in (and free) before the first target, so that a
    /// VM's slow first touch of guest memory does not skew the first target
    /// [default: 2 x (2 x size + rand file) + 1024, at most half of MemAvailable; 0: off].
    #[arg(long)]
    warmup_mib: Option<u64>,
    /// Seconds to wait for the mirror to catch up after the bulk workloads.
    #[arg(long, default_value_t = 120)]
    settle_timeout: u64,
    /// Seed for all random data and offsets (same on every target).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print the table as Markdown (for docs/benchmarks.md).
    #[arg(long)]
    markdown: bool,
    /// Parts of the wan target, comma separated: `throughput` (vs loss 0 / 0.1 / 0.5 / 1 % at
    /// 50 ms one-way), `delay` (vs one-way delay 25 / 50 / 100 ms at 0.1 % loss) and
    /// `fairness` (TLS/TCP with BBR and UDP + FEC fixed and adaptive, each fed by a writer
    /// through the mount beside a competing bulk TCP flow, both counted over seconds 5–20, 3–8
    /// with `--quick`; and that flow alone) and `latency` (mirroring latency, acknowledged at
    /// the primary → applied at the mirror, per `--ack` mode and data path vs loss 0 / 0.1 /
    /// 0.5 / 1 % at 50 ms one-way); `throughput`, `delay` and `latency` draw their plots to
    /// `--plots`; `latency-target` runs only the latency cells the lag target is about
    /// (local and network over UDP + FEC at 1 % loss), for side-by-side runs.
    #[arg(long, value_delimiter = ',', default_value = "throughput,delay")]
    wan_parts: Vec<wan::Part>,
    /// Rows of the tokens target to run, comma separated [default: all]: `4k-pwrite`,
    /// `seq-write`, `names` (write speed, single primary and the pair; with none of them the
    /// single primary is not mounted), `handover` (a write taking the token from the other
    /// site, and one whose token is held), `chmod` (the same for a chmod). The others print `-`.
    #[arg(long, value_delimiter = ',')]
    tokens_rows: Vec<tokens::Row>,
    /// MiB of data per FEC figure (fec target) [default: 128, 8 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    fec_mib: Option<u64>,
    /// fuse-transport target: also measure io_uring with unpinned queue threads and with
    /// `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN`, in the same run.
    #[arg(long)]
    fuse_transport_variants: bool,
    /// Draw the plots of the targets that have some (disaster; wan: `throughput-loss.svg`,
    /// `throughput-delay.svg`, `latency.svg`) as SVG files in this directory (e.g. docs/plots).
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Also write the raw results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sizes {
    pub file_mib: u64,
    pub rand_file_mib: u64,
    pub rand_writes: u64,
    pub small_files: u64,
    pub build_files: u64,
    pub initsync_files: u64,
    pub lag_samples: u64,
    pub burst_files: u64,
    pub overwrite_file_mib: u64,
    pub outage_mib: u64,
    pub reint_large_files: u64,
    pub reint_small_files: u64,
}

impl Sizes {
    fn from_args(a: &Args) -> Sizes {
        let q = a.quick;
        let file_mib = a.size_mib.unwrap_or(if q { 64 } else { 1024 });
        Sizes {
            file_mib,
            rand_file_mib: file_mib.min(256),
            rand_writes: a.rand_writes.unwrap_or(if q { 5_000 } else { 65_536 }),
            small_files: a.small_files.unwrap_or(if q { 1_000 } else { 10_000 }),
            build_files: a.build_files.unwrap_or(if q { 500 } else { 10_000 }),
            initsync_files: a.initsync_files.unwrap_or(if q { 2_000 } else { 100_000 }),
            lag_samples: a.lag_samples.unwrap_or(if q { 50 } else { 200 }),
            burst_files: a.burst_files.unwrap_or(if q { 200 } else { 1_000 }),
            overwrite_file_mib: a.overwrite_file_mib.unwrap_or(if q { 32 } else { 256 }),
            outage_mib: a.outage_mib.unwrap_or(if q { 16 } else { 512 }),
            reint_large_files: a.reint_large_files.unwrap_or(if q { 20 } else { 200 }),
            reint_small_files: a.reint_small_files.unwrap_or(if q { 200 } else { 2_000 }),
        }
    }

    fn describe(&self) -> String {
        format!(
            "sequential file {} MiB (1 MiB I/O); {} random 4 KiB writes into a {} MiB file; \
             {} small files of 4 KiB; build-like: {} files untarred and deleted; {} lag samples of 100 B; lag burst of {} files of 1 KiB; \
             network: 4 KiB overwrite in a {} MiB file, {} MiB written during the outage; \
             reintegration: {} x 256 KiB + {} x 4 KiB",
            self.file_mib,
            self.rand_writes,
            self.rand_file_mib,
            self.small_files,
            self.build_files,
            self.lag_samples,
            self.burst_files,
            self.overwrite_file_mib,
            self.outage_mib,
            self.reint_large_files,
            self.reint_small_files
        )
    }
}

// ---------------------------------------------------------------------------
// Ctrl-C handling: the first SIGINT/SIGTERM/SIGHUP sets a flag that the
// workloads check, so that guards unmount and clean up; a second one exits.

static INTERRUPTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

fn install_signal_handlers() -> Result<()> {
    let flag = INTERRUPTED.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(flag))
            .context("cannot install signal handler")?;
        signal_hook::flag::register(sig, Arc::clone(flag))
            .context("cannot install signal handler")?;
    }
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPTED.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted by a signal; cleaning up");
    }
    Ok(())
}

// ---------------------------------------------------------------------------

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mirrorfs-bench: error: {e:#}");
            if interrupted() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Everything a target's workloads need.
struct Ctx<'a> {
    args: &'a Args,
    sizes: &'a Sizes,
    /// The build-like workload's tarball, made once per run (`workloads::make_source_tarball`).
    build_tar: PathBuf,
}

fn run(args: &Args) -> Result<()> {
    install_signal_handlers()?;
    let sizes = Sizes::from_args(args);
    let mut targets = args.targets.clone();
    targets.sort();
    targets.dedup();
    // The FEC target measures code, not a file system: it needs none of the set-up below.
    if targets.contains(&TargetKind::Fec) {
        targets.retain(|t| *t != TargetKind::Fec);
        fec::run(args.markdown, args.quick, args.fec_mib, args.seed)?;
        if targets.is_empty() {
            return Ok(());
        }
    }
    // The FUSE transport target mounts its own server: none of the set-up below either.
    if targets.contains(&TargetKind::FuseTransport) {
        targets.retain(|t| *t != TargetKind::FuseTransport);
        fuse_transport::run(
            args.markdown,
            args.quick,
            args.fuse_transport_variants,
            &args.workdir,
        )?;
        if targets.is_empty() {
            return Ok(());
        }
    }
    if targets.is_empty() {
        bail!("no targets selected");
    }

    fs::create_dir_all(&args.workdir)
        .with_context(|| format!("cannot create {}", args.workdir.display()))?;
    let workdir = fs::canonicalize(&args.workdir)
        .with_context(|| format!("cannot resolve {}", args.workdir.display()))?;
    let stale = mounts::mounts_under(&workdir)?;
    if !stale.is_empty() {
        eprintln!(
            "mirrorfs-bench: warning: mounts below {} (another run, or left over?): {stale:?}",
            workdir.display()
        );
    }
    let no_journal = ext4_without_journal(&workdir);
    if no_journal {
        inode_reuse_wait(&workdir)?;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?;
    let run_dir = workdir.join(format!("run-{}-{}", std::process::id(), now.as_secs()));
    fs::create_dir(&run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    let run_dir = DirGuard::new(run_dir);

    let fs_desc = match mounts::mount_of(&workdir)? {
        Some(m) => format!("{} on {}", m.fstype, m.source),
        None => "unknown fs".to_string(),
    };
    let date = utc_date(now.as_secs());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string());
    let command = command_line();
    eprintln!("mirrorfs-bench: {command}");
    eprintln!("mirrorfs-bench: {}", sizes.describe());
    eprintln!(
        "mirrorfs-bench: temp dir {} ({fs_desc})",
        run_dir.path().display()
    );

    let warmup = match args.warmup_mib {
        Some(n) => n,
        None => (2 * (2 * sizes.file_mib + sizes.rand_file_mib) + 1024)
            .min(workloads::mem_available_mib()? / 2),
    };
    if warmup > 0 {
        let t0 = std::time::Instant::now();
        workloads::warm_up_ram(warmup)?;
        eprintln!(
            "mirrorfs-bench: RAM warm-up: faulted in {warmup} MiB in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }

    let load_start = loadavg();
    if load_start
        .split(' ')
        .next()
        .and_then(|l| l.parse::<f64>().ok())
        > Some(0.5)
    {
        eprintln!(
            "mirrorfs-bench: warning: load average is {load_start}: other processes are busy, \
             figures (FUSE ones most) will be noisy"
        );
    }

    let ctx = Ctx {
        args,
        sizes: &sizes,
        build_tar: run_dir.path().join("build-like.tar"),
    };
    // The rolling disaster has its own processes, network and table.
    if targets.contains(&TargetKind::Disaster) {
        targets.retain(|t| *t != TargetKind::Disaster);
        let bin = mirrorfs_bin(&ctx)?;
        disaster::run(
            &bin,
            run_dir.path(),
            args.markdown,
            args.quick,
            args.seed,
            args.plots.as_deref(),
        )?;
        if targets.is_empty() {
            return Ok(());
        }
    }
    // SQLite's transactions have their own mounts and table.
    if targets.contains(&TargetKind::Sqlite) {
        targets.retain(|t| *t != TargetKind::Sqlite);
        let bin = mirrorfs_bin(&ctx)?;
        sqlite::run(&bin, run_dir.path(), args.markdown, args.quick)?;
        if targets.is_empty() {
            return Ok(());
        }
    }
    // fio's jobs have their own mounts and table.
    if targets.contains(&TargetKind::Fio) {
        targets.retain(|t| *t != TargetKind::Fio);
        let bin = mirrorfs_bin(&ctx)?;
        fio::run(
            &bin,
            run_dir.path(),
            args.markdown,
            args.quick,
            &split_args(&args.bindfs_args),
        )?;
        if targets.is_empty() {
            return Ok(());
        }
    }
    // The throughput over the WAN emulator.
    if targets.contains(&TargetKind::Wan) {
        targets.retain(|t| *t != TargetKind::Wan);
        let bin = mirrorfs_bin(&ctx)?;
        wan::run(
            &bin,
            run_dir.path(),
            args.markdown,
            args.quick,
            args.seed,
            &args.wan_parts,
            args.plots.as_deref(),
        )?;
        if targets.is_empty() {
            return Ok(());
        }
    }
    // The acknowledgement latency over the WAN emulator.
    if targets.contains(&TargetKind::Ack) {
        targets.retain(|t| *t != TargetKind::Ack);
        let bin = mirrorfs_bin(&ctx)?;
        ack::run(&bin, run_dir.path(), args.markdown, args.quick, args.seed)?;
        if targets.is_empty() {
            return Ok(());
        }
    }
    // Two writable sites with write tokens.
    if targets.contains(&TargetKind::Tokens) {
        targets.retain(|t| *t != TargetKind::Tokens);
        let bin = mirrorfs_bin(&ctx)?;
        tokens::run(
            &bin,
            run_dir.path(),
            args.markdown,
            args.quick,
            args.seed,
            &args.tokens_rows,
        )?;
        if targets.is_empty() {
            return Ok(());
        }
    }
    // The initial copy against rsync.
    if targets.contains(&TargetKind::Initsync) {
        targets.retain(|t| *t != TargetKind::Initsync);
        let bin = mirrorfs_bin(&ctx)?;
        initsync::run(
            &bin,
            run_dir.path(),
            args.markdown,
            sizes.initsync_files,
            args.seed,
        )?;
        if targets.is_empty() {
            return Ok(());
        }
    }
    let mut reports = Vec::new();
    for kind in targets {
        check_interrupted()?;
        eprintln!("== {} ==", kind.name());
        let mut rep = TargetReport::new(kind);
        if let Err(e) = run_target(&ctx, run_dir.path(), &reports, &mut rep) {
            if interrupted() {
                return Err(e);
            }
            eprintln!("[{}] SKIPPED: {e:#}", kind.name());
            rep.skipped = Some(format!("{e:#}"));
        }
        reports.push(rep);
    }
    let load_end = loadavg();
    eprintln!("mirrorfs-bench: removing {}", run_dir.path().display());
    drop(run_dir);
    // Write the freed inodes back now: dirty ones stay unreusable for 300 s.
    workloads::sync_all();
    record_cleanup(&workdir);

    let rows = report::table(&reports);
    let main_table = reports.iter().any(|r| r.target.in_main_table());
    let net: Vec<report::NetRow> = reports
        .iter()
        .filter(|r| !r.target.in_main_table() && r.skipped.is_none())
        .flat_map(|r| r.net.iter().cloned())
        .collect();
    let net_rows = (!net.is_empty()).then(|| report::net_table(&net));
    let notes = report::notes(&reports);
    let context = format!(
        "workdir {} ({fs_desc}{}), RAM warm-up {warmup} MiB",
        workdir.display(),
        if no_journal { ", no journal" } else { "" }
    );
    let mut out = String::new();
    if args.markdown {
        writeln!(out, "`{command}` — {date} — `uname -r`: {kernel}")?;
        writeln!(out)?;
        if main_table {
            out.push_str(&report::render_markdown(&rows));
            writeln!(out)?;
        }
        if let Some(n) = &net_rows {
            out.push_str(&report::render_markdown(n));
        }
        writeln!(out)?;
        writeln!(out, "- sizes: {}", sizes.describe())?;
        writeln!(
            out,
            "- {context}, {} CPUs, load average {load_start} at start, {load_end} at end",
            cpus()
        )?;
        for n in &notes {
            writeln!(out, "- {n}")?;
        }
    } else {
        writeln!(out, "{command}")?;
        writeln!(out, "{date}, kernel {kernel}, {context}, {} CPUs", cpus())?;
        writeln!(out, "load average {load_start} at start, {load_end} at end")?;
        writeln!(out, "sizes: {}", sizes.describe())?;
        writeln!(out)?;
        if main_table {
            out.push_str(&report::render_plain(&rows));
            writeln!(out)?;
        }
        if let Some(n) = &net_rows {
            out.push_str(&report::render_plain(n));
        }
        if !notes.is_empty() {
            writeln!(out)?;
            for n in &notes {
                writeln!(out, "  {n}")?;
            }
        }
    }
    print!("{out}");

    if let Some(path) = &args.json {
        #[derive(Serialize)]
        struct Row {
            metric: Metric,
            label: &'static str,
            unit: &'static str,
            value: Option<f64>,
            error: Option<String>,
        }
        #[derive(Serialize)]
        struct Target<'a> {
            target: TargetKind,
            skipped: &'a Option<String>,
            description: &'a str,
            results: Vec<Row>,
            network: &'a [report::NetRow],
            notes: &'a [String],
        }
        let targets: Vec<Target> = reports
            .iter()
            .map(|r| Target {
                target: r.target,
                skipped: &r.skipped,
                description: &r.description,
                results: r
                    .values
                    .iter()
                    .map(|(m, v)| Row {
                        metric: *m,
                        label: m.label(),
                        unit: m.unit(),
                        value: v.as_ref().ok().copied(),
                        error: v.as_ref().err().cloned(),
                    })
                    .collect(),
                network: &r.net,
                notes: &r.notes,
            })
            .collect();
        let json = serde_json::json!({
            "command": command,
            "date": date,
            "kernel": kernel,
            "workdir": context,
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "sizes": sizes,
            "targets": targets,
        });
        fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Where the workloads of one target run.
struct Env {
    /// Directory the workloads write into (a mount point for FUSE targets).
    root: PathBuf,
    /// mirrorfs: the backing dir and the mirror dir.
    backing: Option<PathBuf>,
    mirror: Option<PathBuf>,
    mount: Option<Mount>,
}

fn split_args(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

fn mkdirs(dirs: &[&Path]) -> Result<()> {
    for d in dirs {
        fs::create_dir(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    Ok(())
}

/// The mirrorfs binary: `--mirrorfs-bin`, else `mirrorfs` next to this executable.
fn mirrorfs_bin(ctx: &Ctx) -> Result<PathBuf> {
    let bin = match &ctx.args.mirrorfs_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .context("cannot find own executable")?
            .with_file_name("mirrorfs"),
    };
    if !bin.is_file() {
        bail!(
            "mirrorfs binary not found at {} (build it with `cargo build --release -p mirrorfs` or pass --mirrorfs-bin)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Set up one target, run all workloads, tear it down. An error means the
/// target could not be set up (it is then reported as skipped). `prior`:
/// the reports of the targets that ran before (baselines).
fn run_target(
    ctx: &Ctx,
    run_dir: &Path,
    prior: &[TargetReport],
    rep: &mut TargetReport,
) -> Result<()> {
    let kind = rep.target;
    // Not removed here: all deletions wait for the end of the run (see
    // `inode_reuse_wait`), the run dir's guard removes everything.
    let tdir = run_dir.join(kind.name());
    fs::create_dir(&tdir).with_context(|| format!("cannot create {}", tdir.display()))?;
    let mut env = match kind {
        TargetKind::Fec => bail!("the fec target runs on its own (fec.rs)"),
        TargetKind::Disaster => bail!("the disaster target runs on its own (disaster.rs)"),
        TargetKind::Sqlite => bail!("the sqlite target runs on its own (sqlite.rs)"),
        TargetKind::Fio => bail!("the fio target runs on its own (fio.rs)"),
        TargetKind::Wan => bail!("the wan target runs on its own (wan.rs)"),
        TargetKind::Ack => bail!("the ack target runs on its own (ack.rs)"),
        TargetKind::Tokens => bail!("the tokens target runs on its own (tokens.rs)"),
        TargetKind::Initsync => bail!("the initsync target runs on its own (initsync.rs)"),
        TargetKind::FuseTransport => {
            bail!("the fuse-transport target runs on its own (fuse_transport/)")
        }
        TargetKind::Native => {
            let root = tdir.join("data");
            mkdirs(&[&root])?;
            rep.description = "plain directory in the workdir".to_string();
            Env {
                root,
                backing: None,
                mirror: None,
                mount: None,
            }
        }
        TargetKind::Bindfs => {
            let version = match std::process::Command::new("bindfs")
                .arg("--version")
                .output()
            {
                Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_string(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    bail!("bindfs is not installed (apt-get install -y bindfs)")
                }
                Err(e) => bail!("cannot run bindfs: {e}"),
            };
            let src = tdir.join("src");
            let mnt = tdir.join("mnt");
            mkdirs(&[&src, &mnt])?;
            let extra = split_args(&ctx.args.bindfs_args);
            let mount = Mount::bindfs(&src, &mnt, &extra)?;
            rep.description = format!(
                "`bindfs {}SRC MNT` ({version})",
                extra.iter().map(|a| format!("{a} ")).collect::<String>()
            );
            Env {
                root: mnt,
                backing: Some(src),
                mirror: None,
                mount: Some(mount),
            }
        }
        TargetKind::Net | TargetKind::Reintegration => {
            let bin = mirrorfs_bin(ctx)?;
            let nctx = net::NetCtx {
                bin: &bin,
                dir: &tdir,
                sizes: ctx.sizes,
                seed: ctx.args.seed,
                settle_timeout: Duration::from_secs(ctx.args.settle_timeout),
                local: prior
                    .iter()
                    .find(|r| r.target == TargetKind::Mirrorfs && r.skipped.is_none()),
            };
            return if kind == TargetKind::Net {
                net::run(&nctx, rep)
            } else {
                net::run_reintegration(&nctx, rep)
            };
        }
        TargetKind::Mirrorfs | TargetKind::MirrorfsWb => {
            let bin = mirrorfs_bin(ctx)?;
            let backing = tdir.join("backing");
            let mnt = tdir.join("mnt");
            let mirror = tdir.join("mirror");
            mkdirs(&[&backing, &mnt, &mirror])?;
            let mut extra = split_args(&ctx.args.mirrorfs_args);
            if kind == TargetKind::MirrorfsWb {
                extra.push("--writeback-cache".to_string());
            }
            let log = tdir.join("mirrorfs.log");
            let mount = Mount::mirrorfs(&bin, &backing, &mnt, mirror.as_os_str(), &extra, &log)
                .context("mirrorfs did not mount")?;
            rep.description = format!(
                "`{} mount BACKING MNT --mirror MIRROR{}`",
                bin.display(),
                extra.iter().map(|a| format!(" {a}")).collect::<String>()
            );
            Env {
                root: mnt,
                backing: Some(backing),
                mirror: Some(mirror),
                mount: Some(mount),
            }
        }
    };
    let res = run_workloads(ctx, &mut env, rep);
    // Unmount now (the run dir's guard refuses to delete below a mount).
    if let Some(m) = env.mount.take() {
        eprintln!("[{}] unmounting", kind.name());
        if let Err(e) = m.unmount() {
            eprintln!("[{}] unclean shutdown: {e:#}", kind.name());
            rep.notes.push(format!("unclean shutdown: {e:#}"));
        }
    }
    res
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn per_s(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Run one workload and record its metrics, or its error in all of them.
/// Only an interruption is returned as an error.
fn step(
    env: &mut Env,
    rep: &mut TargetReport,
    what: &str,
    metrics: &[Metric],
    f: impl FnOnce(&Env) -> Result<(Vec<(Metric, f64)>, String)>,
) -> Result<()> {
    let tag = rep.target.name();
    check_interrupted()?;
    let alive = match env.mount.as_mut() {
        Some(m) => m.check_alive(),
        None => Ok(()),
    };
    eprintln!("[{tag}] {what} ...");
    match alive.and_then(|()| f(env)) {
        Ok((values, detail)) => {
            let shown: Vec<String> = values
                .iter()
                .map(|(m, v)| format!("{} {} {}", m.label(), report::fmt_num(*v), m.unit()))
                .collect();
            eprintln!("[{tag}] {what}: {detail} => {}", shown.join(", "));
            for (m, v) in values {
                rep.values.insert(m, Ok(v));
            }
        }
        Err(e) => {
            check_interrupted()?;
            eprintln!("[{tag}] {what} FAILED: {e:#}");
            for m in metrics {
                rep.values.insert(*m, Err(format!("{e:#}")));
            }
        }
    }
    Ok(())
}

fn run_workloads(ctx: &Ctx, env: &mut Env, rep: &mut TargetReport) -> Result<()> {
    let s = ctx.sizes;
    let seed = ctx.args.seed;
    let bytes = s.file_mib * MIB;
    let seq_dir = env.root.join("w-seq");
    let file_a = seq_dir.join("seq-a");
    let file_b = seq_dir.join("seq-b");
    let secs = |d: Duration| format!("{:.3} s", d.as_secs_f64());
    // mirrorfs: sample its RSS and the mirror backlog during all workloads.
    let sampler = match (
        &env.backing,
        &env.mirror,
        env.mount.as_ref().and_then(Mount::pid),
    ) {
        (Some(b), Some(_), Some(pid)) => Some(workloads::Sampler::start(
            pid,
            Some(b.join(".mirrorfs").join("status.json")),
        )?),
        _ => None,
    };

    step(env, rep, "seq-write", &[Metric::SeqWrite], |_| {
        fs::create_dir(&seq_dir).with_context(|| format!("cannot create {}", seq_dir.display()))?;
        let d = workloads::seq_write(&file_a, bytes, false, seed)?;
        Ok((vec![(Metric::SeqWrite, mib_per_s(bytes, d))], secs(d)))
    })?;
    step(env, rep, "seq-read (warm)", &[Metric::SeqReadWarm], |_| {
        let d = workloads::seq_read(&file_a, bytes)?;
        Ok((vec![(Metric::SeqReadWarm, mib_per_s(bytes, d))], secs(d)))
    })?;
    step(
        env,
        rep,
        "seq-write+fsync",
        &[Metric::SeqWriteFsync],
        |_| {
            let d = workloads::seq_write(&file_b, bytes, true, seed + 1)?;
            Ok((vec![(Metric::SeqWriteFsync, mib_per_s(bytes, d))], secs(d)))
        },
    )?;
    step(env, rep, "seq-read (cold)", &[Metric::SeqReadCold], |_| {
        workloads::drop_caches()?;
        let d = workloads::seq_read(&file_a, bytes)?;
        Ok((vec![(Metric::SeqReadCold, mib_per_s(bytes, d))], secs(d)))
    })?;
    step(env, rep, "rand-write-4k", &[Metric::RandWrite4k], |e| {
        let dir = e.root.join("w-rand");
        fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let d = workloads::rand_write(&dir.join("rand"), s.rand_file_mib, s.rand_writes, seed + 2)?;
        Ok((
            vec![(Metric::RandWrite4k, per_s(s.rand_writes, d))],
            secs(d),
        ))
    })?;
    for (threads, metric) in [(4, Metric::RandWrite4kT4), (16, Metric::RandWrite4kT16)] {
        let what = format!("rand-write-4k, {threads} threads");
        step(env, rep, &what, &[metric], |e| {
            let dir = e.root.join(format!("w-rand{threads}"));
            fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let n = s.rand_writes / threads * threads;
            let d = workloads::rand_write_threads(
                &dir.join("rand"),
                s.rand_file_mib,
                n,
                threads,
                seed + 10 + threads,
            )?;
            Ok((vec![(metric, per_s(n, d))], secs(d)))
        })?;
    }
    let small_dir = env.root.join("w-small");
    let names = workloads::small_file_names(&small_dir, s.small_files);
    step(env, rep, "small-files", &[Metric::SmallFiles], |_| {
        fs::create_dir(&small_dir)
            .with_context(|| format!("cannot create {}", small_dir.display()))?;
        let d = workloads::small_files(&names, seed + 3)?;
        Ok((vec![(Metric::SmallFiles, per_s(s.small_files, d))], secs(d)))
    })?;
    step(env, rep, "stat", &[Metric::Stat], |_| {
        let d = workloads::stat_files(&names)?;
        Ok((vec![(Metric::Stat, per_s(s.small_files, d))], secs(d)))
    })?;
    // The same again once a kernel cache of 1 s would have run out: what a build or `git
    // status` that stats a tree over and over sees (FUSE attribute and entry timeouts).
    step(env, rep, "stat (again)", &[Metric::StatAgain], |_| {
        std::thread::sleep(Duration::from_secs(2));
        let d = workloads::stat_files(&names)?;
        Ok((vec![(Metric::StatAgain, per_s(s.small_files, d))], secs(d)))
    })?;

    step(
        env,
        rep,
        "build-like (untar, rm -r)",
        &[Metric::BuildUntar, Metric::BuildDelete],
        |e| {
            if !ctx.build_tar.exists() {
                let src = ctx.build_tar.with_extension("src");
                workloads::make_source_tarball(&src, &ctx.build_tar, s.build_files, seed + 6)?;
            }
            let (untar, rm) = workloads::untar_and_delete(&ctx.build_tar, &e.root.join("w-build"))?;
            Ok((
                vec![
                    (Metric::BuildUntar, per_s(s.build_files, untar)),
                    (Metric::BuildDelete, per_s(s.build_files, rm)),
                ],
                format!("untar {}, rm -r {}", secs(untar), secs(rm)),
            ))
        },
    )?;
    let (Some(backing), Some(mirror)) = (env.backing.clone(), env.mirror.clone()) else {
        return Ok(());
    };
    step(
        env,
        rep,
        "mirror catch-up",
        &[Metric::MirrorCatchUp],
        |_| {
            let d = workloads::mirror_catch_up(
                &backing,
                &mirror,
                &["w-seq", "w-rand", "w-small"],
                Duration::from_secs(ctx.args.settle_timeout),
            )?;
            Ok((
                vec![(Metric::MirrorCatchUp, ms(d))],
                "mirror identical to backing dir".to_string(),
            ))
        },
    )?;
    let lag_metrics = [Metric::LagP50, Metric::LagP99, Metric::LagMax];
    step(env, rep, "mirror lag", &lag_metrics, |e| {
        let mut v = workloads::lag_single(
            &e.root.join("w-lag"),
            &mirror.join("w-lag"),
            s.lag_samples,
            seed + 4,
        )?;
        v.sort();
        let mean = v.iter().sum::<Duration>() / u32::try_from(v.len()).context("too many")?;
        Ok((
            vec![
                (Metric::LagP50, ms(workloads::percentile(&v, 0.50))),
                (Metric::LagP99, ms(workloads::percentile(&v, 0.99))),
                (Metric::LagMax, ms(workloads::percentile(&v, 1.0))),
            ],
            format!("{} samples, mean {:.3} ms", v.len(), ms(mean)),
        ))
    })?;
    let burst_metrics = [Metric::BurstLagP50, Metric::BurstLagP99, Metric::BurstLag];
    step(env, rep, "mirror burst lag", &burst_metrics, |e| {
        let b = workloads::lag_burst(
            &e.root.join("w-burst"),
            &mirror.join("w-burst"),
            s.burst_files,
            seed + 5,
        )?;
        Ok((
            vec![
                (
                    Metric::BurstLagP50,
                    ms(workloads::percentile(&b.per_file, 0.50)),
                ),
                (
                    Metric::BurstLagP99,
                    ms(workloads::percentile(&b.per_file, 0.99)),
                ),
                (Metric::BurstLag, ms(b.all)),
            ],
            format!("{} files written in {:.1} ms", s.burst_files, ms(b.write)),
        ))
    })?;
    let samples = sampler.map(workloads::Sampler::finish);
    let mem_metrics = [
        Metric::BacklogPeak,
        Metric::RssPeak,
        Metric::VmHwm,
        Metric::VmRss,
    ];
    step(env, rep, "memory", &mem_metrics, |e| {
        let pid = e
            .mount
            .as_ref()
            .and_then(Mount::pid)
            .context("no mirrorfs process")?;
        let (hwm, rss) = workloads::vm_hwm_rss(pid)?;
        let samples = samples.context("no samples")?;
        Ok((
            vec![
                (
                    Metric::BacklogPeak,
                    samples.peak_backlog_bytes as f64 / MIB as f64,
                ),
                (Metric::RssPeak, samples.peak_rss_kib as f64 / 1024.0),
                (Metric::VmHwm, hwm as f64 / 1024.0),
                (Metric::VmRss, rss as f64 / 1024.0),
            ],
            format!(
                "pid {pid}; {} samples of VmRSS and status.json lag_bytes every 20 ms during all workloads",
                samples.count
            ),
        ))
    })?;
    Ok(())
}

/// Is `dir` on an ext4 file system without a journal? There, ext4 does not
/// reuse inodes freed in the last 60 s (300 s if their inode table block is
/// still dirty) and rescans them on every inode allocation, so file creation
/// is much slower for a while after a bulk delete.
fn ext4_without_journal(dir: &Path) -> bool {
    let Ok(Some(m)) = mounts::mount_of(dir) else {
        return false;
    };
    if m.fstype != "ext4" {
        return false;
    }
    let Some(dev) = Path::new(&m.source).file_name() else {
        return false;
    };
    let attr = Path::new("/sys/fs/ext4").join(dev).join("journal_task");
    fs::read_to_string(attr).is_ok_and(|s| s.trim() == "<none>")
}

const CLEANUP_STAMP: &str = ".last-cleanup";
/// ext4's RECENTCY_MIN (60 s) plus a margin.
const INODE_REUSE_SECS: u64 = 65;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Remember when this run deleted its files.
fn record_cleanup(workdir: &Path) {
    // Best effort: without the stamp the next run merely does not wait.
    let _ = fs::write(workdir.join(CLEANUP_STAMP), unix_now().to_string());
}

/// If a previous run deleted its files less than 65 s ago on a journal-less
/// ext4, wait until those inodes are reusable so that file creation is not
/// slowed down for the first target only.
fn inode_reuse_wait(workdir: &Path) -> Result<()> {
    let Ok(text) = fs::read_to_string(workdir.join(CLEANUP_STAMP)) else {
        return Ok(());
    };
    let Ok(then) = text.trim().parse::<u64>() else {
        return Ok(());
    };
    let ready = then + INODE_REUSE_SECS;
    let now = unix_now();
    if now >= ready {
        return Ok(());
    }
    eprintln!(
        "mirrorfs-bench: waiting {} s: the previous run deleted its files {} s ago and the \
         workdir is on ext4 without a journal, which slows file creation until deleted inodes \
         are 60 s old",
        ready - now,
        now.saturating_sub(then)
    );
    while unix_now() < ready {
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// 1, 5 and 15 minute load averages, as in /proc/loadavg.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The command line as typed, shell-quoted where needed.
fn command_line() -> String {
    std::env::args()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c));
            if plain {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `YYYY-MM-DD HH:MM UTC` from Unix seconds (civil-from-days, H. Hinnant).
fn utc_date(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13 UTC");
    }

    #[test]
    fn quick_sizes() {
        let a = Args::parse_from(["b", "--quick", "--mirrorfs-args", "--ack sync"]);
        let s = Sizes::from_args(&a);
        assert_eq!(
            (
                s.file_mib,
                s.rand_file_mib,
                s.rand_writes,
                s.small_files,
                s.lag_samples,
                s.burst_files
            ),
            (64, 64, 5_000, 1_000, 50, 200)
        );
        assert_eq!((s.overwrite_file_mib, s.outage_mib), (32, 16));
        assert_eq!(split_args(&a.mirrorfs_args), ["--ack", "sync"]);
        let a = Args::parse_from(["b"]);
        let s = Sizes::from_args(&a);
        assert_eq!(
            (s.file_mib, s.rand_file_mib, s.rand_writes),
            (1024, 256, 65_536)
        );
        assert_eq!(
            a.targets,
            [
                TargetKind::Native,
                TargetKind::Bindfs,
                TargetKind::Mirrorfs,
                TargetKind::Net
            ]
        );
        let a = Args::parse_from(["b", "--quick", "--targets", "native,mirrorfs"]);
        assert_eq!(a.targets, [TargetKind::Native, TargetKind::Mirrorfs]);
        let a = Args::parse_from(["b", "--targets", "mirrorfs-net"]);
        assert_eq!(a.targets, [TargetKind::Net]);
        let a = Args::parse_from(["b", "--targets", "fec", "--fec-mib", "4"]);
        assert_eq!(
            (a.targets.as_slice(), a.fec_mib),
            ([TargetKind::Fec].as_slice(), Some(4))
        );
        assert!(a.tokens_rows.is_empty(), "every row by default");
        let a = Args::parse_from([
            "b",
            "--targets",
            "tokens",
            "--tokens-rows",
            "names,4k-pwrite",
        ]);
        assert_eq!(a.tokens_rows, [tokens::Row::Names, tokens::Row::Pwrite]);
        assert!(Args::try_parse_from(["b", "--tokens-rows", "nope"]).is_err());
    }

    #[test]
    fn verify_cli() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
