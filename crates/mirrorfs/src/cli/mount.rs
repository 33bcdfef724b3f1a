//! `mirrorfs mount`: a primary site (journal, mirrors, status) under a FUSE shell.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mirrorfs_core::applier::Applier;
use mirrorfs_core::journal::{Journal, JournalConfig};

use crate::fuse;
use crate::mirror::{self, mark};
use crate::net::{identity, remote};
use crate::site::meta::CopyState;
use crate::site::state_dir::{MirrorStateDir, StateDir, StateLockError};
use crate::site::volume;
use crate::site::volume::{lock, AckMode, MirrorPhase, MirrorShared, Ordered, Progress, Volume};
use crate::site::{boot, dirlock, meta, statefile, status, store};
use crate::sys;
use crate::tree::dirtree;

#[derive(clap::Args)]
pub struct MountArgs {
    /// The directory whose contents are served and mirrored.
    backing: PathBuf,
    /// Where to mount.
    mountpoint: PathBuf,
    /// A mirror (repeat for several): a directory, which must exist and be empty the first time,
    /// or `mirror://HOST:PORT`, a `mirrorfs serve` daemon (see `mirrorfs init` and `trust`).
    #[arg(long = "mirror", required = true)]
    mirrors: Vec<String>,
    /// When a change is acknowledged: `async` (after the local change and its journal record),
    /// `local` (also after the journal is durable and the record was handed to each remote
    /// mirror's socket), `received` (the quorum holds it), `durable` (the quorum's journals made it
    /// durable) or `sync` (the quorum applied it durably). See the README's guarantees table.
    #[arg(long, value_enum, default_value = "async")]
    ack: AckMode,
    /// How many mirrors acknowledgements and application fsyncs wait for (default: all). While
    /// fewer are healthy, they wait for the healthy ones.
    #[arg(long)]
    quorum: Option<usize>,
    /// Configuration directory with this machine's identity and trusted peers, for remote
    /// mirrors (default: $MIRRORFS_CONFIG or /etc/mirrorfs).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Compress the replication stream to remote mirrors with zstd.
    #[arg(long)]
    compress: bool,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9108); off by default.
    #[arg(long)]
    metrics: Option<String>,
    /// Where mirrorfs keeps its journal and cursors (default: BACKING/.mirrorfs, hidden from the mount).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Mount options, comma separated, as for other FUSE file systems (allow_other,
    /// default_permissions, ro, ...). allow_other and default_permissions are on by default as root.
    #[arg(short = 'o', value_delimiter = ',')]
    options: Vec<String>,
    /// The journal's size limit in MiB. When it is reached, the mirror furthest behind is detached
    /// and marked for a resync (re-copied at the next mount); local writes never block on a mirror.
    /// At least 128 (two 64 MiB segments).
    #[arg(long, default_value_t = 4096, value_parser = crate::site::volume::parse_journal_max_mib)]
    journal_max_mib: u64,
    /// Replace the contents of a never-synced, non-empty mirror directory with a copy of BACKING.
    #[arg(long)]
    force_resync: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// The primary's identity of its volume (`STATE/volume.json`, the same file a mirror keeps):
/// made at the first mount; a promoted mirror's copy carries its new generation.
fn primary_meta(state: &Path) -> Result<meta::Meta> {
    let mut meta = meta::read_meta(state)?;
    if meta.state == CopyState::Primary || meta.promoted {
        if meta.promoted && meta.state != CopyState::Primary {
            meta.state = CopyState::Primary;
            meta::write_meta(state, &meta)?;
        }
        return Ok(meta);
    }
    if meta.state != CopyState::Empty {
        bail!(
            "{} holds a mirror's state (a `{}` copy of volume {}): promote it first with `mirrorfs promote`",
            state.display(),
            meta.state,
            meta.volume_id
        );
    }
    let mut id = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut id))
        .context("cannot read /dev/urandom")?;
    meta = meta::Meta {
        volume_id: String::new(),
        generation: 0,
        state: CopyState::Primary,
        sync_id: 0,
        promoted: false,
        history: Vec::new(),
    };
    meta.set_history(&mirrorfs_core::history::History::new(
        id,
        meta::random_u64()?,
    ));
    meta::write_meta(state, &meta)?;
    Ok(meta)
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

/// Creates and removes a probe file in `dir`, then puts the directory's times back (a mirror's
/// root mtime is part of the copy).
fn check_writable(dir: &Path) -> Result<()> {
    let before = fs::metadata(dir)?;
    let probe = dir.join(format!(".mirrorfs-probe-{}", std::process::id()));
    fs::write(&probe, b"probe")
        .with_context(|| format!("mirror {} is not writable", dir.display()))?;
    fs::remove_file(&probe).with_context(|| format!("mirror {} is not writable", dir.display()))?;
    mark::restore_times(dir, &before);
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

/// A mirrorfs that died (`kill -9`, a crash) leaves its mount behind, dead: every access to it
/// fails with ENOTCONN. Such a mount of ours is detached (nothing can be using it any more);
/// any other dead mount is the operator's to remove.
fn clear_dead_mount(mnt: &Path) -> Result<()> {
    match fs::symlink_metadata(mnt) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
        _ => return Ok(()),
    }
    let abs = match (mnt.parent(), mnt.file_name()) {
        (Some(p), Some(n)) => canon(
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            },
            "parent of the mountpoint",
        )?
        .join(n),
        _ => mnt.to_path_buf(),
    };
    let fix = format!("unmount it first: umount -l {}", abs.display());
    match sys::mount_entry(&abs) {
        Some((fstype, source)) if fstype == "fuse.mirrorfs" || source.starts_with("mirrorfs:") => {
            tracing::warn!(
                "{} was left mounted by a mirrorfs that died ({source}; killed or crashed): detaching the dead mount",
                abs.display()
            );
            let c = std::ffi::CString::new(abs.as_os_str().as_bytes())?;
            // SAFETY: a valid NUL-terminated path.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                bail!(
                    "{} is a dead mirrorfs mount and detaching it failed ({}); {fix}",
                    abs.display(),
                    std::io::Error::last_os_error()
                );
            }
            Ok(())
        }
        Some((fstype, source)) => bail!(
            "{} is a dead mount of another file system ({fstype}, {source}); {fix}",
            abs.display()
        ),
        None => bail!(
            "{}: transport endpoint is not connected (a dead FUSE mount?); {fix}",
            abs.display()
        ),
    }
}

pub fn mount(a: MountArgs) -> Result<()> {
    let backing = canon(&a.backing, "backing directory")?;
    clear_dead_mount(&a.mountpoint)?;
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
    let mut remotes = Vec::new();
    for spec in &a.mirrors {
        if let Some(addr) = spec.strip_prefix("mirror://") {
            let addr = addr.trim_end_matches('/');
            if addr.is_empty() || !addr.contains(':') {
                bail!("remote mirror {spec}: expected mirror://HOST:PORT");
            }
            if remotes.iter().any(|r: &String| r == addr) {
                bail!("mirror {spec} is given twice");
            }
            remotes.push(addr.to_string());
            continue;
        }
        if spec.contains("://") {
            bail!("mirror {spec}: only directories and mirror://HOST:PORT are supported");
        }
        let c = canon(Path::new(spec), "mirror")?;
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
    let n_mirrors = mirrors.len() + remotes.len();
    let quorum = a.quorum.unwrap_or(n_mirrors);
    if quorum == 0 || quorum > n_mirrors {
        bail!("--quorum {quorum}: must be between 1 and the number of mirrors ({n_mirrors})");
    }
    let link_identity = if remotes.is_empty() {
        None
    } else {
        let dir = identity::config_dir(a.config.as_deref());
        let id = identity::load(&dir)?;
        let pinned = identity::pinned(&dir)?;
        if pinned.is_empty() {
            bail!(
                "no trusted mirrors in {}: run `mirrorfs trust FINGERPRINT NAME` with each mirror daemon's fingerprint (`mirrorfs init` prints it on that machine)",
                dir.join("peers").display()
            );
        }
        Some((Arc::new(id), pinned))
    };
    let state = match &a.state {
        Some(s) => {
            statefile::private_dir(s)
                .with_context(|| format!("cannot create state directory {}", s.display()))?;
            s.canonicalize()?
        }
        None => backing.join(".mirrorfs"),
    };
    if let Some(found) = mark::read_file(&state) {
        // A local mirror's tree mounted as a primary (failover to a local copy): it becomes the
        // backing of a new volume; its mark goes, the state directory takes its place.
        tracing::warn!(
            "{} was a local mirror of volume {} (copy since record {}): it is now the backing directory of a new volume",
            backing.display(),
            found.volume_id,
            found.since_seq
        );
        fs::remove_file(&state)
            .with_context(|| format!("cannot remove the mirror mark {}", state.display()))?;
    }
    for m in &mirrors {
        if state.starts_with(m) {
            bail!(
                "the state directory {} is inside mirror {}",
                state.display(),
                m.display()
            );
        }
    }
    statefile::private_dir(&state)
        .with_context(|| format!("cannot create state directory {}", state.display()))?;
    // The state directory's name at the backing's root, or `.mirrorfs` if the state is elsewhere:
    // hidden from the mount, never in a record, and the name of each local mirror's identity
    // mark (`mark.rs`).
    let hidden: Option<Vec<u8>> = Some(
        (state.parent() == Some(backing.as_path()))
            .then(|| state.file_name().map(|n| n.as_bytes().to_vec()))
            .flatten()
            .unwrap_or_else(|| b".mirrorfs".to_vec()),
    );
    let mark_name = String::from_utf8_lossy(hidden.as_deref().unwrap_or(b".mirrorfs")).into_owned();

    // One instance per backing directory, whatever `--state` says, and one user per local
    // mirror: exclusive locks on the directories themselves, held for the life of the mount.
    let _backing_lock = dirlock::lock(&backing).map_err(|e| match e {
        dirlock::LockError::Held(pid) => anyhow::anyhow!(
            "another mirrorfs ({}) is already serving {}; unmount it first",
            pid.map(|p| format!("pid {p}"))
                .unwrap_or_else(|| "another process".into()),
            backing.display()
        ),
        dirlock::LockError::Io(e) => {
            anyhow::anyhow!("cannot lock {}: {e}", backing.display())
        }
    })?;
    let mut _mirror_locks = Vec::new();
    for m in &mirrors {
        _mirror_locks.push(dirlock::lock(m).map_err(|e| {
            anyhow::anyhow!(
                "mirror {} is in use by another mirrorfs ({e}): a directory can be the mirror of one mount only, and never a backing directory or a daemon's directory at the same time",
                m.display()
            )
        })?);
    }
    // The state directory's own lock: two backing directories cannot share one `--state`.
    let sd = StateDir::at(&state);
    let _state_lock = match sd.lock() {
        Ok(l) => l,
        Err(StateLockError::Held(pid)) => bail!(
            "another mirrorfs (pid {}) is already serving {}; unmount it first",
            pid.unwrap_or_default(),
            backing.display()
        ),
        Err(StateLockError::Io(e)) => return Err(e.into()),
    };
    sd.write_pid()?;

    let clean = StateDir::at(&state).is_clean();
    let power_loss = boot::power_lost(&state);
    let meta = primary_meta(&state)?;

    let store = store::FileStore::open(&sd.journal_dir())?;
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

    let mut shared: Vec<Arc<MirrorShared>> = mirrors
        .iter()
        .map(|m| {
            Arc::new(MirrorShared::new(
                m.display().to_string(),
                m.clone(),
                StateDir::at(&state)
                    .mirror(&mirror_id(m))
                    .path()
                    .to_path_buf(),
                None,
            ))
        })
        .collect();
    let n_local = shared.len();
    for r in &remotes {
        let name = format!("mirror://{r}");
        let m = MirrorShared::new(
            name.clone(),
            PathBuf::from(&name),
            state
                .join("mirrors")
                .join(mirror_id(Path::new(&format!("remote-{r}")))),
            Some(r.clone()),
        );
        fs::create_dir_all(&m.state_dir)?;
        *lock(&m.phase) = MirrorPhase::Retrying {
            error: "connecting".into(),
            since_unix: sys::now().sec as u64,
        };
        // Until the mirror says where it is, hold the whole journal for it.
        // A garbage file holds everything too (as before), but says so.
        let hold = match MirrorStateDir::at(&m.state_dir).remote_durable() {
            Ok(pos) => pos.unwrap_or(0),
            Err(e) => {
                tracing::warn!("mirror {name}: {e}; holding the whole journal for it");
                0
            }
        };
        m.durable.store(hold, Ordering::Release);
        shared.push(Arc::new(m));
    }
    let vol = Arc::new(Volume {
        order: Mutex::new(Ordered::new(journal)),
        progress: Mutex::new(Progress {
            durable_seq: horizon,
            settled_seq: horizon,
            ..Progress::default()
        }),
        changed: Condvar::new(),
        mirrors: shared.clone(),
        ack: a.ack,
        quorum,
        settled: AtomicU64::new(horizon),
        poisoned: AtomicBool::new(false),
    });

    // The last record may not have reached the backing tree before a crash. If it is aborted,
    // the Abort is made durable and settled before any mirror may look at the record.
    if let Some(last) = &report.last {
        if !clean {
            let mut bt = dirtree::DirTree::open(&backing)?;
            vol.resolve_in_doubt(&mut bt, last)?;
            let timed = vol.record_backing_times(&bt, first_held)?;
            if timed > 0 {
                tracing::info!(
                    "after the crash: journaled the backing's times of {timed} entries changed by the last {} records, so mirrors carry them",
                    last.seq.saturating_sub(first_held) + 1
                );
            }
            let end = {
                let mut o = lock(&vol.order);
                if let Some(plan) = o.journal.sync_plan() {
                    use mirrorfs_core::journal::storage::SegmentFile;
                    for (sid, f, _) in &plan.files {
                        f.sync()
                            .with_context(|| format!("fsync of journal segment {sid} failed"))?;
                    }
                    o.journal.mark_synced(&plan);
                }
                o.journal.next_seq() - 1
            };
            if end != horizon {
                let mut p = lock(&vol.progress);
                p.durable_seq = end;
                p.settled_seq = end;
                vol.settled.store(end, Ordering::Release);
            }
        }
    }

    // Mirrors: resume from the cursor, or (first time, after being detached, or after a crash
    // during a previous initial sync) start a live initial sync once the mount is up.
    let mut appliers = Vec::new();
    let mut to_sync = Vec::new();
    for m in &shared[..n_local] {
        let ms = MirrorStateDir::at(&m.state_dir);
        let mut cur = volume::open_cursor(m)?;
        let existing = if ms.needs_resync().is_some() || ms.is_syncing() {
            None
        } else {
            Applier::open(&mut cur, power_loss, horizon)?
        };
        // The tree's identity mark: a missing or foreign one (another disk) is never copied over
        // unless asked; a live mirror then waits as `refused` (mirror::run_worker re-checks).
        let bad_mark = mark::problem(m);
        let existing = match existing {
            Some(_) if bad_mark.is_some() && a.force_resync => {
                tracing::warn!(
                    "mirror {}: {}; --force-resync: copying it again",
                    m.name,
                    bad_mark.as_deref().unwrap_or_default()
                );
                None
            }
            e => e,
        };
        let ap = match existing {
            Some(ap) if ap.cursor().applied + 1 >= first_held => {
                if mark::expected(m).is_none() {
                    // Attached before marks existed: its cursor vouches for it.
                    mark::write_new(m, &mark_name, &meta, ap.cursor().applied)?;
                }
                *lock(&m.phase) = MirrorPhase::Live;
                ap
            }
            other => {
                let was_ours = ms.needs_resync().is_some() || ms.is_syncing() || other.is_some();
                let empty = fs::read_dir(&m.path)?.next().is_none();
                if let (Some(why), false, false) = (&bad_mark, empty, a.force_resync) {
                    bail!("mirror {}: {why}", m.path.display());
                }
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
                ms.set_syncing()?;
                let _ = ms.clear_needs_resync();
                let seq = lock(&vol.order).journal.next_seq() - 1;
                mark::write_new(m, &mark_name, &meta, seq + 1)?;
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

    // Every cursor has taken a power loss into account: from now on this boot is the one we run in.
    boot::record_boot(&state)?;
    let mut threads = Vec::new();
    {
        let v = vol.clone();
        threads.push(
            std::thread::Builder::new()
                .name("flusher".into())
                .spawn(move || v.run_flusher())?,
        );
    }
    for (m, ap) in shared[..n_local].iter().cloned().zip(appliers) {
        let v = vol.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("mirror-{}", mirror_id(&m.path)))
                .spawn(move || mirror::run_worker(v, m, ap))?,
        );
    }
    let status_stop = Arc::new(AtomicBool::new(false));
    // The first status is on disk before the mount appears: `mirrorfs status` works at once.
    status::write_status(&vol, &mountpoint, &state);
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

    if let Some(addr) = &a.metrics {
        let (v, mp) = (vol.clone(), mountpoint.clone());
        status::serve_metrics(addr, Arc::new(move || status::metrics_text(&v, &mp)))?;
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
    // Signal handlers before the mount appears: a SIGTERM at any moment after it unmounts cleanly.
    let term = Arc::new(AtomicBool::new(false));
    // A second SIGINT/SIGTERM while the first one is being handled exits at once (status 1).
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 1, term.clone())?;
        signal_hook::flag::register(sig, term.clone())?;
    }
    let fs_impl = fuse::MirrorFs::new(vol.clone(), &backing, hidden.clone())?;
    let session = fuser::Session::new(fs_impl, &mountpoint, &config)
        .with_context(|| format!("cannot mount on {}", mountpoint.display()))?;
    let bg = session.spawn()?;
    tracing::info!(
        "mounted {} on {} with {} mirror(s), ack={:?}, quorum {}",
        backing.display(),
        mountpoint.display(),
        n_mirrors,
        a.ack,
        quorum
    );
    if let Some((id, pinned)) = link_identity {
        let cfg = Arc::new(remote::LinkConfig {
            identity: id,
            pinned,
            compress: a.compress,
            history: meta.history(),
            name: format!("{}:{}", super::hostname(), backing.display()),
            backing: backing.clone(),
            hidden: hidden.clone(),
        });
        for m in &shared[n_local..] {
            let (v, m, c) = (vol.clone(), m.clone(), cfg.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("link".into())
                    .spawn(move || remote::run_link(v, m, c))?,
            );
        }
    }
    eprintln!(
        "mirrorfs: serving {} at {} (Ctrl-C to unmount)",
        backing.display(),
        mountpoint.display()
    );
    let copying = to_sync.clone();
    for m in to_sync {
        let (v, b, h, t) = (vol.clone(), backing.clone(), hidden.clone(), term.clone());
        std::thread::Builder::new()
            .name("initial-sync".into())
            .spawn(move || {
                if let Err(e) = mirror::live_sync(v.clone(), &b, m.clone(), h) {
                    if t.load(Ordering::Relaxed) {
                        tracing::info!(
                            "mirror {}: initial sync stopped by the shutdown; the next mount copies it again",
                            m.name
                        );
                        return;
                    }
                    let reason = format!("initial sync failed: {e}");
                    tracing::error!("mirror {}: {reason}", m.name);
                    m.mark_needs_resync(&reason);
                    v.changed.notify_all();
                }
            })?;
    }

    while !term.load(Ordering::Relaxed) && !bg.guard.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
    }
    // An initial copy still running stops at its next chunk: the shutdown does not wait for it
    // (the mirror keeps its SYNCING marker and the next mount copies it again).
    for m in &copying {
        m.cancel_copy.store(true, Ordering::Release);
    }
    tracing::info!("unmounting {}", mountpoint.display());
    if let Err(e) = bg.umount_and_join() {
        // Busy (a process still has something open on it): detach it lazily rather than leave
        // a dead mount behind when this process exits.
        tracing::warn!(
            "unmount: {e}; detaching {} lazily (it disappears once nothing uses it)",
            mountpoint.display()
        );
        if sys::is_mountpoint(&mountpoint) {
            if let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) {
                // SAFETY: a valid NUL-terminated path.
                if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                    tracing::warn!(
                        "lazy unmount of {} failed: {}",
                        mountpoint.display(),
                        std::io::Error::last_os_error()
                    );
                }
            }
        }
    }
    // Drain: make the journal durable, let mirrors catch up and checkpoint, then stop.
    let target = vol.wait_journal_durable();
    for m in &shared {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let syncing = || matches!(*lock(&m.phase), MirrorPhase::Syncing { .. });
        while m.healthy()
            && !syncing()
            && m.needed_after() < target
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
    for m in &shared[n_local..] {
        let _ =
            MirrorStateDir::at(&m.state_dir).set_remote_durable(m.durable.load(Ordering::Acquire));
    }
    drop(reg);
    if !vol.poisoned.load(Ordering::Acquire) {
        StateDir::at(&state).set_clean()?;
    }
    eprintln!("mirrorfs: unmounted {}", mountpoint.display());
    Ok(())
}
