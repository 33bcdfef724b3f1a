//! mirrorfs: a FUSE file system that mirrors every change of a directory, in order, to mirrors.
//!
//! Data flow (see docs/ARCHITECTURE.md): FUSE shell (`fuse`) → volume order lock (`volume`) →
//! journal (`mirrorfs_core::journal`, files in `store`) → mirror workers (`mirror`) → mirror trees
//! (`dirtree`).

mod affinity;
mod dirtree;
mod fuse;
mod identity;
mod inodes;
mod mirror;
mod status;
mod store;
mod sys;
mod volume;

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use mirrorfs_core::applier::Applier;
use mirrorfs_core::journal::{Journal, JournalConfig};

use crate::volume::{lock, AckMode, MirrorPhase, MirrorShared, Ordered, Progress, Volume};

#[derive(Parser)]
#[command(
    name = "mirrorfs",
    version,
    about = "A real-time mirroring file system: mount it over a directory and every change is journaled and applied, in order, to one or more mirror directories."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount BACKING at MOUNTPOINT and mirror every change to each --mirror (runs in the foreground;
    /// Ctrl-C or SIGTERM unmounts cleanly).
    Mount(MountArgs),
    /// Show each mirror's state, applied position and lag, and the journal's size.
    Status {
        /// The mountpoint (default: every mirrorfs mount on this machine).
        mountpoint: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A self-contained demonstration on temporary directories: mount, write, watch the mirror
    /// catch up, show status, unmount.
    Demo,
}

#[derive(clap::Args)]
struct MountArgs {
    /// The directory whose contents are served and mirrored.
    backing: PathBuf,
    /// Where to mount.
    mountpoint: PathBuf,
    /// A mirror directory (repeat for several). It must exist and be empty the first time;
    /// its existing contents are then replaced by a copy of BACKING.
    #[arg(long = "mirror", required = true)]
    mirrors: Vec<PathBuf>,
    /// When a change is acknowledged: `async` (after the local change and its journal record) or
    /// `sync` (after every mirror applied it durably).
    #[arg(long, value_enum, default_value = "async")]
    ack: AckMode,
    /// Where mirrorfs keeps its journal and cursors (default: BACKING/.mirrorfs, hidden from the mount).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Mount options, comma separated, as for other FUSE file systems (allow_other,
    /// default_permissions, ro, ...). allow_other and default_permissions are on by default as root.
    #[arg(short = 'o', value_delimiter = ',')]
    options: Vec<String>,
    /// The journal's size limit in MiB. When it is reached, the mirror furthest behind is detached
    /// and marked for a resync (re-copied at the next mount); local writes never block on a mirror.
    #[arg(long, default_value_t = 4096)]
    journal_max_mib: u64,
    /// Replace the contents of a never-synced, non-empty mirror directory with a copy of BACKING.
    #[arg(long)]
    force_resync: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MIRRORFS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Mount(a) => mount(a),
        Cmd::Status { mountpoint, json } => status::show(mountpoint.as_deref(), json),
        Cmd::Demo => status::demo(),
    };
    if let Err(e) = r {
        eprintln!("mirrorfs: error: {e:#}");
        std::process::exit(1);
    }
}

fn canon(p: &Path, what: &str) -> Result<PathBuf> {
    let c = p
        .canonicalize()
        .with_context(|| format!("{what} {} does not exist (create it first)", p.display()))?;
    if !c.is_dir() {
        bail!("{what} {} is not a directory", p.display());
    }
    Ok(c)
}

fn check_writable(dir: &Path) -> Result<()> {
    let probe = dir.join(format!(".mirrorfs-probe-{}", std::process::id()));
    fs::write(&probe, b"probe")
        .with_context(|| format!("mirror {} is not writable", dir.display()))?;
    fs::remove_file(&probe).with_context(|| format!("mirror {} is not writable", dir.display()))?;
    Ok(())
}

fn mirror_id(p: &Path) -> String {
    let name: String = p
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .take(32)
                .collect()
        })
        .unwrap_or_default();
    format!("{name}-{:08x}", crc32c::crc32c(p.as_os_str().as_bytes()))
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn mount(a: MountArgs) -> Result<()> {
    let backing = canon(&a.backing, "backing directory")?;
    let mountpoint = canon(&a.mountpoint, "mountpoint")?;
    if mountpoint == backing {
        bail!(
            "the mountpoint and the backing directory are the same ({}); mount somewhere else",
            backing.display()
        );
    }
    if sys::is_mountpoint(&mountpoint) && fs::read_dir(&mountpoint).is_err() {
        bail!(
            "{} is a stale mount: unmount it first (umount -l {})",
            mountpoint.display(),
            mountpoint.display()
        );
    }
    let mut mirrors = Vec::new();
    for m in &a.mirrors {
        let c = canon(m, "mirror")?;
        if c == backing || c.starts_with(&backing) || backing.starts_with(&c) {
            bail!("mirror {} overlaps the backing directory {}: a mirror must be outside it (and must not contain it)", c.display(), backing.display());
        }
        if c == mountpoint || c.starts_with(&mountpoint) {
            bail!(
                "mirror {} is inside the mountpoint {}",
                c.display(),
                mountpoint.display()
            );
        }
        if mirrors.contains(&c) {
            bail!("mirror {} is given twice", c.display());
        }
        check_writable(&c)?;
        mirrors.push(c);
    }
    let state = match &a.state {
        Some(s) => {
            fs::create_dir_all(s)
                .with_context(|| format!("cannot create state directory {}", s.display()))?;
            s.canonicalize()?
        }
        None => backing.join(".mirrorfs"),
    };
    for m in &mirrors {
        if state.starts_with(m) {
            bail!(
                "the state directory {} is inside mirror {}",
                state.display(),
                m.display()
            );
        }
    }
    fs::create_dir_all(&state)
        .with_context(|| format!("cannot create state directory {}", state.display()))?;
    let hidden: Option<Vec<u8>> = (state.parent() == Some(backing.as_path()))
        .then(|| state.file_name().map(|n| n.as_bytes().to_vec()))
        .flatten();

    // One instance per backing directory: an exclusive lock held for the life of the mount.
    let lockf = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .open(state.join("lock"))?;
    // SAFETY: flock on a valid descriptor.
    if unsafe { libc::flock(lockf.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let pid = fs::read_to_string(state.join("pid")).unwrap_or_default();
        bail!(
            "another mirrorfs (pid {}) is already serving {}; unmount it first",
            pid.trim(),
            backing.display()
        );
    }
    fs::write(state.join("pid"), std::process::id().to_string())?;

    let last_boot = fs::read_to_string(state.join("boot_id")).unwrap_or_default();
    let clean = state.join("clean").exists();
    let power_loss = !clean && !last_boot.is_empty() && last_boot.trim() != boot_id();
    let _ = fs::remove_file(state.join("clean"));
    fs::write(state.join("boot_id"), boot_id())?;

    let store = store::FileStore::open(&state.join("journal"))?;
    let cfg = JournalConfig {
        journal_bytes_max: a.journal_max_mib << 20,
        ..JournalConfig::default()
    };
    let (journal, report) = Journal::open(store, cfg).context("cannot open the journal")?;
    if report.torn_bytes > 0 || report.dropped_segments > 0 {
        tracing::warn!(
            "journal recovery: cut a torn tail of {} bytes and {} unsynced segments",
            report.torn_bytes,
            report.dropped_segments
        );
    }
    tracing::info!(
        "journal: {} records in {} segments, next seq {}",
        report.records,
        report.segments,
        journal.next_seq()
    );
    let horizon = journal.next_seq() - 1;
    let first_held = journal.first_seq();

    let shared: Vec<Arc<MirrorShared>> = mirrors
        .iter()
        .map(|m| {
            Arc::new(MirrorShared {
                name: m.display().to_string(),
                path: m.clone(),
                state_dir: state.join("mirrors").join(mirror_id(m)),
                applied: AtomicU64::new(0),
                checkpoint: AtomicU64::new(0),
                phase: Mutex::new(MirrorPhase::Syncing {
                    done_bytes: 0,
                    total_bytes: 0,
                }),
                applied_bytes: AtomicU64::new(0),
                want_durable: AtomicU64::new(0),
            })
        })
        .collect();
    let vol = Arc::new(Volume {
        order: Mutex::new(Ordered { journal }),
        progress: Mutex::new(Progress {
            durable_seq: horizon,
            settled_seq: horizon,
            ..Progress::default()
        }),
        changed: Condvar::new(),
        mirrors: shared.clone(),
        ack: a.ack,
        settled: AtomicU64::new(horizon),
        poisoned: AtomicBool::new(false),
    });

    // The last record may not have reached the backing tree before a crash.
    if let Some(last) = &report.last {
        if !clean {
            let mut bt = dirtree::DirTree::open(&backing)?;
            vol.resolve_in_doubt(&mut bt, last)?;
        }
    }

    // Mirrors: resume from the cursor, or (first time, after being detached, or after a crash
    // during a previous initial sync) start a live initial sync once the mount is up.
    let mut appliers = Vec::new();
    let mut to_sync = Vec::new();
    for m in &shared {
        let needs = m.state_dir.join("NEEDS_RESYNC");
        let syncing = m.state_dir.join("SYNCING");
        let mut cur = volume::open_cursor(m)?;
        let existing = if needs.exists() || syncing.exists() {
            None
        } else {
            Applier::open(&mut cur, power_loss, horizon)?
        };
        let ap = match existing {
            Some(ap) if ap.cursor().applied + 1 >= first_held => {
                *lock(&m.phase) = MirrorPhase::Live;
                ap
            }
            other => {
                let was_ours = needs.exists() || syncing.exists() || other.is_some();
                let empty = fs::read_dir(&m.path)?.next().is_none();
                if !empty && !was_ours && !a.force_resync {
                    bail!(
                        "mirror {} is not empty and was never synced by mirrorfs; empty it, or pass --force-resync to replace its contents with a copy of {}",
                        m.path.display(),
                        backing.display()
                    );
                }
                if !empty {
                    tracing::warn!(
                        "mirror {}: replacing its contents with a fresh copy",
                        m.name
                    );
                    for e in fs::read_dir(&m.path)? {
                        let p = e?.path();
                        if p.is_dir() && !p.is_symlink() {
                            fs::remove_dir_all(&p)?
                        } else {
                            fs::remove_file(&p)?
                        }
                    }
                }
                fs::write(&syncing, b"initial sync in progress\n")?;
                let _ = fs::remove_file(&needs);
                let seq = lock(&vol.order).journal.next_seq() - 1;
                let mut ap = volume::new_applier_at(m, seq)?;
                ap.set_syncing(Some(mirror::sync_id(m)));
                to_sync.push(m.clone());
                ap
            }
        };
        m.applied.store(ap.cursor().applied, Ordering::Release);
        m.checkpoint
            .store(ap.cursor().checkpoint, Ordering::Release);
        appliers.push(ap);
    }

    let mut threads = Vec::new();
    {
        let v = vol.clone();
        threads.push(
            std::thread::Builder::new()
                .name("flusher".into())
                .spawn(move || v.run_flusher())?,
        );
    }
    for (m, ap) in shared.iter().cloned().zip(appliers) {
        let v = vol.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("mirror-{}", mirror_id(&m.path)))
                .spawn(move || mirror::run_worker(v, m, ap))?,
        );
    }
    let status_stop = Arc::new(AtomicBool::new(false));
    let reg = status::register(&mountpoint, &backing, &state)?;
    {
        let (v, st, stop) = (vol.clone(), state.clone(), status_stop.clone());
        let mp = mountpoint.clone();
        threads.push(
            std::thread::Builder::new()
                .name("status".into())
                .spawn(move || status::writer(v, &mp, &st, &stop))?,
        );
    }

    let mut opts = vec![
        fuser::MountOption::FSName(format!("mirrorfs:{}", backing.display())),
        fuser::MountOption::Subtype("mirrorfs".into()),
    ];
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut user_opts: Vec<String> = a
        .options
        .iter()
        .flat_map(|o| o.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if root {
        user_opts.push("allow_other".into());
    }
    user_opts.push("default_permissions".into());
    user_opts.sort();
    user_opts.dedup();
    for o in &user_opts {
        opts.push(match o.as_str() {
            "allow_other" => fuser::MountOption::CUSTOM("allow_other".into()),
            "allow_root" => fuser::MountOption::CUSTOM("allow_root".into()),
            "default_permissions" => fuser::MountOption::DefaultPermissions,
            "ro" => fuser::MountOption::RO,
            "rw" => fuser::MountOption::RW,
            "dev" => fuser::MountOption::Dev,
            "nodev" => fuser::MountOption::NoDev,
            "suid" => fuser::MountOption::Suid,
            "nosuid" => fuser::MountOption::NoSuid,
            "exec" => fuser::MountOption::Exec,
            "noexec" => fuser::MountOption::NoExec,
            "atime" => fuser::MountOption::Atime,
            "noatime" => fuser::MountOption::NoAtime,
            other => fuser::MountOption::CUSTOM(other.to_string()),
        });
    }
    let mut config = fuser::Config::default();
    config.mount_options = opts;
    if root {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(a.threads.max(1));
    config.clone_fd = a.threads > 1;
    // SAFETY: umask has no preconditions; modes are applied exactly by mirrorfs itself.
    unsafe { libc::umask(0) };
    let fs_impl = fuse::MirrorFs::new(vol.clone(), &backing, hidden.clone())?;
    let inodes = fs_impl.inodes();
    let session = fuser::Session::new(fs_impl, &mountpoint, &config)
        .with_context(|| format!("cannot mount on {}", mountpoint.display()))?;
    let bg = session.spawn()?;
    tracing::info!(
        "mounted {} on {} with {} mirror(s), ack={:?}",
        backing.display(),
        mountpoint.display(),
        mirrors.len(),
        a.ack
    );
    eprintln!(
        "mirrorfs: serving {} at {} (Ctrl-C to unmount)",
        backing.display(),
        mountpoint.display()
    );
    for m in to_sync {
        let (v, ino, b, h) = (vol.clone(), inodes.clone(), backing.clone(), hidden.clone());
        std::thread::Builder::new()
            .name("initial-sync".into())
            .spawn(move || {
                if let Err(e) = mirror::live_sync(v.clone(), ino, &b, m.clone(), h) {
                    let reason = format!("initial sync failed: {e}");
                    tracing::error!("mirror {}: {reason}", m.name);
                    mirror::mark_needs_resync(&m, &reason);
                    v.changed.notify_all();
                }
            })?;
    }

    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, term.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone())?;
    while !term.load(Ordering::Relaxed) && !bg.guard.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!("unmounting {}", mountpoint.display());
    if let Err(e) = bg.umount_and_join() {
        tracing::warn!("unmount: {e}");
    }
    // Drain: make the journal durable, let mirrors catch up and checkpoint, then stop.
    let target = vol.wait_journal_durable();
    for m in &shared {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while m.healthy()
            && m.applied.load(Ordering::Acquire) < target
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    lock(&vol.progress).stopping = true;
    vol.changed.notify_all();
    status_stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    status::write_status(&vol, &mountpoint, &state);
    drop(reg);
    if !vol.poisoned.load(Ordering::Acquire) {
        fs::write(state.join("clean"), b"")?;
    }
    eprintln!("mirrorfs: unmounted {}", mountpoint.display());
    Ok(())
}
