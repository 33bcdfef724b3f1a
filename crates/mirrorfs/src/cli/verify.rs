//! `mirrorfs verify MOUNT [--mirror M] [--repair] [--json]`: compares each local mirror of a
//! running mount with its backing directory (`tree::scan` on both sides, `core::verify::compare`)
//! and lists the differences. `--repair` asks the mount to resync the mirror through the journal
//! (`cli::resync`), then verifies again.
//!
//! A network mirror (`--mirror mirror://HOST:PORT`) is scanned by its daemon, which answers with
//! its own hashes over the pinned mutual-TLS link (`Msg::Verify`, `net::serve::verify`): only
//! hashes cross the link. `--repair` of a network mirror goes through the journal too: the
//! mount's link asks the daemon for a block-hash resync (`mirror::operator`, `net::remote`),
//! then the daemon is asked for its hashes again.
//!
//! Incremental (the default): the mount keeps the paths its journal changed since each mirror's
//! last verify (`site::verify_dirty`); verify scans only those, and what still differed last
//! time, on both sides (`tree::scan::scan_plan`; a network mirror's daemon is sent the plan), and
//! records per mirror how far it compared (`STATE/verify/ID.state`). It compares the whole trees
//! when asked (`--full`, `--no-cache`), every `--full-every` verifies, and whenever the record
//! cannot vouch for every change since (`core::verify::incremental::decide`).
//!
//! Exit codes: 0 the mirrors equal the primary (after the repair, with `--repair`); 3 differences
//! were found (and, with `--repair`, some remain: what only a mirror has is kept unless
//! `--delete-extra`); 1 an error (nothing compared, or not everything).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mirrorfs_core::verify::{compare, summary, Difference};
use serde_json::json;

use crate::site::{status, verify_dirty};
use crate::tree::hashcache::HashCache;
use crate::tree::scan::{self, Progress};
use mirrorfs_core::path::RelPath;
use mirrorfs_core::verify::incremental::{self, DirtySet, FullReason, Mode, Scope, VerifyState};

/// The exit code when differences are found.
pub const EXIT_DIFFERENCES: i32 = 3;

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The mountpoint of a running mirrorfs mount.
    mountpoint: PathBuf,
    /// A mirror of that mount to verify: a local mirror's directory, or a network mirror's
    /// mirror://HOST:PORT as the mount names it (its daemon scans its directory and sends only
    /// hashes). Repeat for several; default: all its local mirrors.
    #[arg(long = "mirror")]
    mirrors: Vec<PathBuf>,
    /// For a network mirror: the configuration directory with this machine's identity and
    /// trusted peers, as the mount uses it (default: $MIRRORFS_CONFIG or /etc/mirrorfs).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Bring each mirror that differs back in line with the primary: the mount resyncs it
    /// through the journal (only what differs is copied), then it is verified again. What only
    /// the mirror has is reported and kept, unless --delete-extra. A network mirror's daemon
    /// sends the block hashes of its files, and only the blocks that differ are sent to it.
    #[arg(long)]
    repair: bool,
    /// With --repair: also delete what only the mirror has.
    #[arg(long, requires = "repair")]
    delete_extra: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Read every file, neither using nor updating the hash cache (STATE/verify/); implies
    /// --full.
    #[arg(long)]
    no_cache: bool,
    /// Compare the whole trees, not only what the journal changed since the last verify (what
    /// finds a difference made directly in a mirror, behind the mount's back).
    #[arg(long)]
    full: bool,
    /// Every N-th verify of a mirror in a row is a full one (0: only when asked with --full or
    /// when the record of changes cannot tell).
    #[arg(long, default_value_t = 10)]
    full_every: u32,
    /// How long to wait for the mirrors to apply what the journal holds before comparing, in
    /// seconds (a mirror still behind shows the changes it has yet to apply as differences).
    #[arg(long, default_value_t = 30)]
    settle_secs: u64,
}

/// A running mount, as `verify` and `resync` need it.
pub struct Target {
    pub mountpoint: PathBuf,
    pub backing: PathBuf,
    pub state: PathBuf,
    /// The name hidden at the backing's root and used for each local mirror's identity mark.
    pub hidden: Vec<u8>,
    /// The mount's local mirrors, as its status lists them.
    pub local_mirrors: Vec<PathBuf>,
    /// The mount's network mirrors (`mirror://HOST:PORT`), as its status lists them.
    pub remote_mirrors: Vec<String>,
}

/// Finds the running mount at `mountpoint`.
pub fn target(mountpoint: &Path) -> Result<Target> {
    let mp = mountpoint
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", mountpoint.display()))?;
    let running = status::registered(Some(&mp))?;
    let Some(r) = running.into_iter().find(|r| r.mountpoint == mp) else {
        bail!(
            "{} is not the mountpoint of a running mirrorfs mount (give the mountpoint itself; see `mirrorfs status`)",
            mp.display()
        );
    };
    if r.is_daemon() {
        bail!(
            "{} is a mirror daemon's directory, not a mount: verify the primary's mount instead",
            mp.display()
        );
    }
    let hidden = match (r.state.parent(), r.state.file_name()) {
        (Some(p), Some(n)) if p == r.backing => std::os::unix::ffi::OsStrExt::as_bytes(n).to_vec(),
        _ => b".mirrorfs".to_vec(),
    };
    let st = read_status(&r.state)?;
    let paths = st["mirrors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["path"].as_str());
    let (remote, local): (Vec<&str>, Vec<&str>) = paths.partition(|p| is_remote(p));
    let local_mirrors = local.into_iter().map(PathBuf::from).collect();
    let remote_mirrors = remote.into_iter().map(String::from).collect();
    Ok(Target {
        mountpoint: mp,
        backing: r.backing,
        state: r.state,
        hidden,
        local_mirrors,
        remote_mirrors,
    })
}

fn is_remote(p: &str) -> bool {
    p.starts_with("mirror://")
}

fn read_status(state: &Path) -> Result<serde_json::Value> {
    let p = state.join("status.json");
    let b = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_slice(&b).with_context(|| format!("{} is not valid JSON", p.display()))
}

/// Waits (at most `limit`) until `mirror` applied every record the journal held when called.
/// Returns false if it did not.
pub fn wait_caught_up(state: &Path, mirror: &Path, limit: Duration) -> Result<bool> {
    Ok(wait_caught_up_at(state, mirror, limit)?.0)
}

/// [`wait_caught_up`], also returning the journal's last seq it waited for.
fn wait_caught_up_at(state: &Path, mirror: &Path, limit: Duration) -> Result<(bool, u64)> {
    let t0 = Instant::now();
    let target = fresh_status(state, limit)?["journal_next_seq"]
        .as_u64()
        .unwrap_or(1)
        .saturating_sub(1);
    let name = mirror.display().to_string();
    loop {
        let st = read_status(state)?;
        let applied = st["mirrors"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["path"].as_str() == Some(&name))
            .and_then(|m| m["applied_seq"].as_u64())
            .unwrap_or(0);
        if applied >= target {
            return Ok((true, target));
        }
        if t0.elapsed() >= limit {
            return Ok((false, target));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `status.json` as written after this call began (the mount writes it twice a second): a
/// target taken from an older one could miss records journaled just before, such as a
/// repair's, and the scan would then race their apply. After `limit`, the newest there is.
fn fresh_status(state: &Path, limit: Duration) -> Result<serde_json::Value> {
    let since_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let t0 = Instant::now();
    loop {
        let st = read_status(state)?;
        let updated = st["updated_unix_ms"].as_i64().unwrap_or(i64::MAX);
        if updated > since_ms || t0.elapsed() >= limit {
            return Ok(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The hash cache's file for the tree at `tree`.
fn cache_path(state: &Path, tree: &Path) -> PathBuf {
    let id = blake3::hash(std::os::unix::ffi::OsStrExt::as_bytes(tree.as_os_str()));
    state
        .join("verify")
        .join(format!("{}.cache", &id.to_hex()[..16]))
}

/// A spinner on a terminal (stderr), nothing otherwise.
struct Bar {
    pb: indicatif::ProgressBar,
    entries: u64,
    bytes: u64,
}

impl Bar {
    fn new(what: String) -> Bar {
        let pb = if std::io::stderr().is_terminal() {
            let pb = indicatif::ProgressBar::new_spinner();
            pb.enable_steady_tick(Duration::from_millis(120));
            pb
        } else {
            indicatif::ProgressBar::hidden()
        };
        pb.set_prefix(what);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {prefix}: {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        Bar {
            pb,
            entries: 0,
            bytes: 0,
        }
    }

    fn show(&self) {
        self.pb.set_message(format!(
            "{} entries, {} read",
            self.entries,
            indicatif::HumanBytes(self.bytes)
        ));
    }
}

impl Progress for Bar {
    fn entry(&mut self) {
        self.entries += 1;
        if self.entries.is_multiple_of(256) {
            self.show();
        }
    }
    fn bytes(&mut self, n: u64) {
        self.bytes += n;
        self.show();
    }
}

/// One side scanned.
struct Scanned {
    entries: Vec<mirrorfs_core::verify::Entry>,
    bytes_read: u64,
    cache_hits: u64,
    /// Files whose data was read to hash them (not taken from the cache); None for a network
    /// mirror (its daemon reports bytes, not files).
    files_read: Option<u64>,
    /// A network mirror's scan: the bytes that came over the link (TLS records included).
    link_bytes: Option<u64>,
}

fn scan_tree(
    tree: &Path,
    t: &Target,
    use_cache: bool,
    what: &str,
    plan: Option<&[(RelPath, Scope)]>,
) -> Result<Scanned> {
    let cp = cache_path(&t.state, tree);
    let mut cache = if use_cache {
        let (c, problem) = HashCache::load(&cp);
        if let Some(p) = problem {
            tracing::warn!("hash cache: {p}");
        }
        c
    } else {
        HashCache::default()
    };
    let mut bar = Bar::new(format!("scanning {what} {}", tree.display()));
    let entries = match plan {
        None => scan::scan(tree, Some(&t.hidden), &mut cache, &mut bar),
        Some(plan) => scan::scan_plan(tree, Some(&t.hidden), plan, &mut cache, &mut bar),
    }
    .with_context(|| format!("cannot scan {}", tree.display()))?;
    bar.pb.finish_and_clear();
    // A scan of part of the tree keeps the cache's other entries too (a full one only what it
    // saw: the cache forgets what is gone).
    if use_cache {
        if plan.is_some() {
            cache.keep_unseen();
        }
        if let Err(e) = cache.save(&cp) {
            tracing::warn!("cannot save the hash cache {}: {e}", cp.display());
        }
    }
    Ok(Scanned {
        entries,
        bytes_read: cache.bytes_read,
        cache_hits: cache.hits,
        files_read: Some(cache.misses),
        link_bytes: None,
    })
}

/// How long a network mirror's daemon may stay silent (while it scans, it sends nothing).
const REMOTE_SILENCE: Duration = Duration::from_secs(3600);

/// Asks the daemon of network mirror `url` for its own scan (`Msg::Verify`): its entries with
/// the hashes it computed (or took from its cache), validated and bounded as they arrive.
fn scan_remote(
    url: &str,
    t: &Target,
    config: Option<&Path>,
    no_cache: bool,
    plan: Option<&[(RelPath, Scope)]>,
) -> Result<Scanned> {
    use crate::net::identity;
    use mirrorfs_core::wire::{Decoder, Msg};
    let addr = crate::net::witness::address(url);
    let cfg_dir = identity::config_dir(config);
    let id = identity::load(&cfg_dir)?;
    let pinned = identity::pinned(&cfg_dir)?;
    if pinned.is_empty() {
        bail!(
            "no trusted peers in {}: verify a network mirror with the configuration the mount uses (--config)",
            cfg_dir.join("peers").display()
        );
    }
    let volume_id = crate::site::meta::read_meta(&t.state)?.volume_id();
    let link = crate::net::conn::Duplex::connect(&addr, &id, pinned)
        .with_context(|| format!("cannot reach the mirror daemon {addr}"))?;
    link.send(&Msg::Verify {
        volume_id,
        no_cache,
        plan: plan.map(<[_]>::to_vec),
    })
    .with_context(|| format!("cannot send to the mirror daemon {addr}"))?;
    let mut bar = Bar::new(format!("receiving the scan of {url}"));
    let mut dec = Decoder::new();
    let mut entries: Vec<mirrorfs_core::verify::Entry> = Vec::new();
    let mut heard = Instant::now();
    loop {
        let m = link
            .recv(&mut dec)
            .with_context(|| format!("the mirror daemon {addr}"))?;
        let Some(m) = m else {
            if heard.elapsed() > REMOTE_SILENCE {
                bail!(
                    "the mirror daemon {addr} sent nothing for {}s while scanning",
                    REMOTE_SILENCE.as_secs()
                );
            }
            continue;
        };
        heard = Instant::now();
        match m {
            Msg::Scan { entries: batch } => {
                // Each batch is in order (the decoder checks); so must be the batches.
                if let (Some(last), Some(first)) = (entries.last(), batch.first()) {
                    if mirrorfs_core::verify::path_order(&last.path, &first.path)
                        != std::cmp::Ordering::Less
                    {
                        bail!("the mirror daemon {addr} sent its scan out of order");
                    }
                }
                if entries.len() + batch.len() > scan::MAX_ENTRIES {
                    bail!(
                        "the mirror daemon {addr} sent more than {} entries",
                        scan::MAX_ENTRIES
                    );
                }
                for _ in &batch {
                    bar.entry();
                }
                entries.extend(batch);
            }
            Msg::ScanEnd {
                count,
                bytes_read,
                cache_hits,
                ..
            } => {
                bar.pb.finish_and_clear();
                if count != entries.len() as u64 {
                    bail!(
                        "the mirror daemon {addr} announced {count} entries but sent {}",
                        entries.len()
                    );
                }
                return Ok(Scanned {
                    entries,
                    bytes_read,
                    cache_hits,
                    files_read: None,
                    link_bytes: Some(link.bytes_in.load(std::sync::atomic::Ordering::Relaxed)),
                });
            }
            Msg::Error { message, .. } => {
                bail!("the mirror daemon {addr} refused to verify: {message}")
            }
            other => bail!(
                "the mirror daemon {addr} sent an unexpected message (type {}): is it a mirrorfs of the same version?",
                other.type_code()
            ),
        }
    }
}

/// Scans mirror `m`: a local one here (only what `plan` names, if given), a network one by its
/// daemon.
fn scan_mirror(
    m: &Path,
    t: &Target,
    a: &VerifyArgs,
    plan: Option<&[(RelPath, Scope)]>,
) -> Result<Scanned> {
    match m.to_str().filter(|p| is_remote(p)) {
        Some(url) => scan_remote(url, t, a.config.as_deref(), a.no_cache, plan),
        None => scan_tree(m, t, !a.no_cache, "mirror", plan),
    }
}

/// The mount's record of changes (`site::verify_dirty`), once it has read the journal through
/// `target` (waiting at most `limit`; then the newest there is, still complete through its own
/// `through`). `None` when the mount keeps none.
fn record_of_changes(state: &Path, target: u64, limit: Duration) -> Result<Option<DirtySet>> {
    let t0 = Instant::now();
    loop {
        let d = verify_dirty::load(state);
        match &d {
            Ok(d) if d.through >= target => break,
            _ if t0.elapsed() >= limit => break,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    match verify_dirty::load(state) {
        Ok(d) => Ok(Some(d)),
        Err(e) => {
            tracing::info!("no record of changes: {e}");
            Ok(None)
        }
    }
}

/// The name a mirror has in the mount's status, as its verify state is keyed.
fn mirror_name(m: &Path) -> Vec<u8> {
    std::os::unix::ffi::OsStrExt::as_bytes(m.as_os_str()).to_vec()
}

/// Full or incremental for this run: incremental only if every mirror may be (one plan, the
/// union of theirs, serves the primary's scan for all).
fn choose(mirrors: &[PathBuf], t: &Target, a: &VerifyArgs, dirty: Option<&DirtySet>) -> Mode {
    let mut items = Vec::new();
    let remote = mirrors.iter().any(|m| m.to_str().is_some_and(is_remote));
    for m in mirrors {
        let st = verify_dirty::load_state(&t.state, &mirror_name(m));
        match incremental::decide(st.as_ref(), dirty, a.full || a.no_cache, a.full_every) {
            Mode::Full(r) => return Mode::Full(r),
            Mode::Incremental(p) => items.extend(p),
        }
    }
    let plan = incremental::plan(items);
    // A network mirror's daemon gets the plan in its `Verify`: bounded.
    if remote && !mirrorfs_core::wire::verify_plan_fits(&plan) {
        return Mode::Full(FullReason::Network);
    }
    Mode::Incremental(plan)
}

/// Records that mirror `m` was compared through `dirty.through`, with what still differs.
fn save_state(t: &Target, m: &Path, dirty: &DirtySet, mode: &Mode, differences: &[Difference]) {
    let name = mirror_name(m);
    let since_full = match mode {
        Mode::Full(_) => 0,
        Mode::Incremental(_) => {
            verify_dirty::load_state(&t.state, &name).map_or(0, |s| s.since_full.saturating_add(1))
        }
    };
    let mut pending: Vec<RelPath> = differences
        .iter()
        .filter_map(|d| match &d.path[..] {
            b"." => Some(RelPath::root()),
            p => RelPath::new(p.to_vec()).ok(),
        })
        .collect();
    pending.dedup();
    pending.truncate(incremental::MAX_PENDING);
    let st = VerifyState {
        mirror: name.clone(),
        epoch: dirty.epoch,
        verified: dirty.through,
        since_full,
        pending,
    };
    let p = verify_dirty::state_path(&t.state, &name);
    let r = p
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|_| crate::site::statefile::replace(&p, &st.encode(), 0o600));
    if let Err(e) = r {
        tracing::warn!(
            "cannot save {}: {e} (the next verify is a full one)",
            p.display()
        );
    }
}

/// What the primary's scans cost, summed over the run (a repair scans it again).
#[derive(Default)]
struct PrimaryCounts {
    entries: u64,
    files: u64,
    bytes: u64,
    hits: u64,
}

impl PrimaryCounts {
    fn add(&mut self, p: &Scanned) {
        self.entries += p.entries.len() as u64;
        self.files += p.files_read.unwrap_or(0);
        self.bytes += p.bytes_read;
        self.hits += p.cache_hits;
    }
}

/// The result for one mirror.
struct MirrorResult {
    mirror: PathBuf,
    entries: usize,
    bytes_read: u64,
    cache_hits: u64,
    files_read: Option<u64>,
    link_bytes: Option<u64>,
    caught_up: bool,
    differences: Vec<Difference>,
    /// With --repair: the differences found before the repair.
    repaired: Option<Vec<Difference>>,
}

fn diff_json(d: &Difference) -> serde_json::Value {
    json!({
        "path": String::from_utf8_lossy(&d.path),
        "kind": d.kind.name(),
        "primary": d.primary,
        "mirror": d.mirror,
    })
}

fn summary_words(d: &[Difference]) -> String {
    summary(d)
        .iter()
        .map(|(k, n)| format!("{n} {}", k.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn verify(a: VerifyArgs) -> Result<()> {
    let t = target(&a.mountpoint)?;
    let mirrors: Vec<PathBuf> = if a.mirrors.is_empty() {
        t.local_mirrors.clone()
    } else {
        let mut v = Vec::new();
        for m in &a.mirrors {
            if let Some(url) = m.to_str().filter(|p| is_remote(p)) {
                if !t.remote_mirrors.iter().any(|r| r == url) {
                    bail!(
                        "{url} is not a network mirror of {} (its network mirrors: {}; give the address as `mirrorfs status` shows it)",
                        t.mountpoint.display(),
                        if t.remote_mirrors.is_empty() { "none".to_string() } else { t.remote_mirrors.join(", ") }
                    );
                }
                v.push(PathBuf::from(url));
                continue;
            }
            let c = m
                .canonicalize()
                .with_context(|| format!("cannot resolve {}", m.display()))?;
            if !t.local_mirrors.contains(&c) {
                bail!(
                    "{} is not a local mirror of {} (its local mirrors: {})",
                    m.display(),
                    t.mountpoint.display(),
                    t.local_mirrors
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            v.push(c);
        }
        v
    };
    if mirrors.is_empty() {
        bail!(
            "{} has no local mirror to verify (name a network mirror with --mirror mirror://HOST:PORT)",
            t.mountpoint.display()
        );
    }
    let settle = Duration::from_secs(a.settle_secs);
    let mut caught = Vec::new();
    let mut target = 0;
    for m in &mirrors {
        let (caught_up, upto) = wait_caught_up_at(&t.state, m, settle)?;
        target = target.max(upto);
        if !caught_up {
            tracing::warn!(
                "mirror {} is still behind after {}s: changes it has yet to apply show as differences",
                m.display(),
                a.settle_secs
            );
        }
        caught.push(caught_up);
    }
    // Read after the mirrors caught up: everything they applied is in it.
    let dirty = record_of_changes(&t.state, target, settle)?;
    let mode = choose(&mirrors, &t, &a, dirty.as_ref());
    let plan = match &mode {
        Mode::Incremental(p) => Some(&p[..]),
        Mode::Full(_) => None,
    };
    let mut results = Vec::new();
    let mut primary: Option<Scanned> = None;
    let mut pc = PrimaryCounts::default();
    for (m, caught_up) in mirrors.iter().zip(caught) {
        let p = match primary.take() {
            Some(p) => p,
            None => {
                let p = scan_tree(&t.backing, &t, !a.no_cache, "primary", plan)?;
                pc.add(&p);
                p
            }
        };
        let s = scan_mirror(m, &t, &a, plan)?;
        let mut differences = compare(&p.entries, &s.entries);
        let mut r = MirrorResult {
            mirror: m.clone(),
            entries: p.entries.len(),
            bytes_read: s.bytes_read,
            cache_hits: s.cache_hits,
            files_read: s.files_read,
            link_bytes: s.link_bytes,
            caught_up,
            differences: Vec::new(),
            repaired: None,
        };
        primary = Some(p);
        let needs_repair = differences
            .iter()
            .any(|d| a.delete_extra || d.kind != mirrorfs_core::verify::DiffKind::OnlyOnMirror);
        if a.repair && needs_repair {
            if !a.json {
                eprintln!(
                    "mirror {}: {} difference(s) ({}); repairing through the journal",
                    m.display(),
                    differences.len(),
                    summary_words(&differences)
                );
            }
            crate::cli::resync::resync_and_wait(&t, m, a.delete_extra)?;
            wait_caught_up(&t.state, m, settle)?;
            let p = scan_tree(&t.backing, &t, !a.no_cache, "primary", plan)?;
            pc.add(&p);
            let s = scan_mirror(m, &t, &a, plan)?;
            r.bytes_read += s.bytes_read;
            r.link_bytes = match (r.link_bytes, s.link_bytes) {
                (Some(x), Some(y)) => Some(x + y),
                (x, y) => x.or(y),
            };
            r.cache_hits += s.cache_hits;
            r.files_read = r.files_read.zip(s.files_read).map(|(x, y)| x + y);
            let after = compare(&p.entries, &s.entries);
            r.repaired = Some(std::mem::replace(&mut differences, after));
            primary = Some(p);
        }
        if let Some(d) = &dirty {
            save_state(&t, m, d, &mode, &differences);
        }
        r.differences = differences;
        results.push(r);
    }
    let (incremental, full_reason, rescanned) = match &mode {
        Mode::Incremental(p) => (true, None, Some(p.len())),
        Mode::Full(r) => (false, Some(r.words()), None),
    };
    let total: usize = results.iter().map(|r| r.differences.len()).sum();
    let mut out = std::io::stdout().lock();
    if a.json {
        let v = json!({
            "mountpoint": t.mountpoint,
            "backing": t.backing,
            "primary_bytes_read": pc.bytes,
            "primary_cache_hits": pc.hits,
            "primary_files_read": pc.files,
            "primary_entries_scanned": pc.entries,
            "incremental": incremental,
            "full_reason": full_reason,
            "changed_paths": rescanned,
            "verified_through_seq": dirty.as_ref().map(|d| d.through),
            "record_of_changes": dirty.as_ref().map(|d| json!({
                "paths": d.len(),
                "through_seq": d.through,
                "floor_seq": d.floor,
                "floor_reason": (d.floor > 0).then(|| d.floor_reason.words()),
                "epoch": d.epoch,
            })),
            "differences": total,
            "mirrors": results.iter().map(|r| json!({
                "mirror": r.mirror,
                "entries_primary": r.entries,
                "bytes_read": r.bytes_read,
                "cache_hits": r.cache_hits,
                "files_read": r.files_read,
                "link_bytes": r.link_bytes,
                "caught_up": r.caught_up,
                "summary": summary(&r.differences).iter().map(|(k, n)| (k.name().to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
                "differences": r.differences.iter().map(diff_json).collect::<Vec<_>>(),
                "repaired": r.repaired.as_ref().map(|v| v.iter().map(diff_json).collect::<Vec<_>>()),
            })).collect::<Vec<_>>(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        let how = match &mode {
            Mode::Incremental(p) => format!(
                "incremental ({} path(s) changed since the last verify)",
                p.len()
            ),
            Mode::Full(r) => format!("full ({})", r.words()),
        };
        writeln!(
            out,
            "primary {} (mounted at {}): {how} scan of {} entries, {} file(s) read ({}), {} files' hashes from the cache",
            t.backing.display(),
            t.mountpoint.display(),
            pc.entries,
            pc.files,
            indicatif::HumanBytes(pc.bytes),
            pc.hits
        )?;
        for r in &results {
            if let Some(before) = &r.repaired {
                writeln!(
                    out,
                    "mirror {}: {} difference(s) before the repair ({})",
                    r.mirror.display(),
                    before.len(),
                    summary_words(before)
                )?;
            }
            if r.differences.is_empty() {
                writeln!(
                    out,
                    "mirror {}: equal to the primary ({} entries; {} read, {} from the cache)",
                    r.mirror.display(),
                    r.entries,
                    indicatif::HumanBytes(r.bytes_read),
                    r.cache_hits
                )?;
                continue;
            }
            writeln!(
                out,
                "mirror {}: {} difference(s): {}",
                r.mirror.display(),
                r.differences.len(),
                summary_words(&r.differences)
            )?;
            for d in &r.differences {
                writeln!(
                    out,
                    "  {:<16} {}: primary {} / mirror {}",
                    d.kind.name(),
                    String::from_utf8_lossy(&d.path),
                    if d.primary.is_empty() {
                        "-"
                    } else {
                        &d.primary
                    },
                    if d.mirror.is_empty() { "-" } else { &d.mirror },
                )?;
            }
            if r.differences
                .iter()
                .any(|d| d.kind == mirrorfs_core::verify::DiffKind::OnlyOnMirror)
            {
                writeln!(out, "  (what only the mirror has is kept: `mirrorfs verify --repair --delete-extra` removes it)")?;
            }
            if !r.caught_up {
                writeln!(out, "  (the mirror was still behind the journal: run verify again once it caught up)")?;
            }
        }
        if total > 0 && !a.repair {
            writeln!(
                out,
                "run `mirrorfs verify {} --repair` to bring the mirror(s) back in line",
                t.mountpoint.display()
            )?;
        }
    }
    out.flush()?;
    if total > 0 {
        std::process::exit(EXIT_DIFFERENCES);
    }
    Ok(())
}
