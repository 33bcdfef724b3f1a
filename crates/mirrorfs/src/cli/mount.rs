//! `mirrorfs mount`: a primary site (journal, mirrors, status) under a FUSE shell.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mirrorfs_core::applier::Applier;

use crate::fuse;
use crate::mirror::{self, mark};
use crate::net::{identity, remote};
use crate::site::engine::{Role, Site};
use crate::site::meta::CopyState;
use crate::site::state_dir::{MirrorStateDir, StateDir, StateLockError};
use crate::site::sync_groups::SyncGroupClock;
use crate::site::tokens::TokenGate;
use crate::site::volume;
use crate::site::volume::{lock, AckMode, FsyncWaits, MirrorPhase, MirrorShared, Volume};
use crate::site::{dirlock, meta, stamp, statefile, status};
use crate::sys;
use mirrorfs_core::token::{PartitionPolicy, TokenConfig};

#[derive(clap::Args)]
pub struct MountArgs {
    /// The directory whose contents are served and mirrored.
    backing: PathBuf,
    /// Where to mount.
    mountpoint: PathBuf,
    /// A mirror (repeat for several): a directory, which must exist and be empty the first time,
    /// or `mirror://HOST:PORT`, a `mirrorfs serve` daemon (see `mirrorfs init` and `trust`).
    #[arg(long = "mirror", required_unless_present = "peer")]
    mirrors: Vec<String>,
    /// The other writable site of a pair (`mirror://HOST:PORT`: its `--receive` address): this
    /// site streams its journal there like to a network mirror (TLS only; changes that came
    /// from the peer are not sent back), and both sites stay writable. Needs `--receive`. A new
    /// pair starts from two identical trees (two empty directories, say). See the README, "Two
    /// writable sites".
    #[arg(long, value_name = "URL", requires = "receive")]
    peer: Option<String>,
    /// With `--peer`: where this site listens (e.g. 0.0.0.0:7071) for the peer's stream, whose
    /// changes it applies to BACKING through the mount (the mount's users see them; this site's
    /// own mirrors get them). Only the peers `mirrorfs trust`ed in `--config` may connect.
    #[arg(long, value_name = "ADDR", requires = "peer")]
    receive: Option<String>,
    /// With `--peer`: per-file write tokens, `SITE:PEER` (this site's id and the peer's, two
    /// different numbers ≥ 1, swapped at the peer: `1:2` here, `2:1` there). A change of a file
    /// or of a name (write, truncate, fallocate, chmod, chown, times, xattrs; create, mkdir,
    /// mknod, symlink, unlink, rmdir; rename and link: both names) waits for the token of each
    /// name it changes: at once while this site holds it, one round trip when the peer does; so
    /// one file written at both sites is never mixed. The lower id holds every token at first.
    /// Both sites need it. Tokens survive crashes (STATE/tokens).
    #[arg(long, value_name = "SITE:PEER", requires = "peer", value_parser = parse_token_ids)]
    write_tokens: Option<(u64, u64)>,
    /// With `--write-tokens`: a change to a file or name whose token is at the peer while the
    /// link is down: `read-only` fails it with EROFS (`status` says why), `reconcile` lets it
    /// go on (both sites may then change the file; at the heal a file changed at both is kept
    /// twice and listed by `mirrorfs conflicts`), `quorum` (with `--witness`) lets only the
    /// site holding the witness's partition lease write, every file, while the other fails
    /// every change with EROFS (`status` says why); at the heal the majority's writes reach
    /// the other site before it writes again.
    #[arg(
        long,
        value_enum,
        default_value = "read-only",
        requires = "write_tokens"
    )]
    partition: PartitionArg,
    /// With `--write-tokens`: how long (ms, 10 to 600000) a file open for writing here keeps
    /// its token once the peer asks for it: a write session (open, writes, close) shorter than
    /// this reaches the peer whole, never mixed with the peer's writes, and the peer's change
    /// to that file or its name waits up to this long (its wait for a token ends in ETIMEDOUT
    /// after this plus 10 s).
    #[arg(
        long,
        value_name = "MS",
        default_value_t = mirrorfs_core::token::HOLD_MAX_MS,
        value_parser = clap::value_parser!(u64).range(10..=600_000),
        requires = "write_tokens"
    )]
    token_hold_max_ms: u64,
    /// When a change is acknowledged: `async` (after the local change and its journal record),
    /// `local` (also after the local journal made it durable), `network` (also after it was
    /// handed to the quorum's sockets; fsync waits for no more than that), `received` (the
    /// quorum holds it), `durable` (the quorum's journals made it durable) or `sync` (the quorum
    /// applied it durably). See the README's guarantees table.
    #[arg(long, value_enum, default_value = "async")]
    ack: AckMode,
    /// What an application's fsync/fdatasync waits for on mirrors, after the file and the local
    /// journal are durable: `mode` (as far as --ack takes a change: nothing more with async and
    /// local, the quorum's sockets with network, its memory with received, its journals with
    /// durable, its trees with sync) or `quorum` (durable on the quorum whatever --ack says;
    /// with async and local, a sync then survives the loss of this site). See the README's
    /// guarantees table.
    #[arg(long, value_enum, default_value = "mode")]
    fsync_waits: FsyncWaits,
    /// How many mirrors acknowledgements and application fsyncs wait for (default: all). While
    /// fewer are healthy, they wait for the healthy ones.
    #[arg(long)]
    quorum: Option<usize>,
    /// Configuration directory with this machine's identity and trusted peers, for remote
    /// mirrors (default: $MIRRORFS_CONFIG or /etc/mirrorfs).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Compress the replication stream to remote mirrors with zstd (TCP only: UDP datagrams
    /// go uncompressed). `--no-compress` turns it off (over a config file's `compress = true`).
    #[arg(long, overrides_with = "no_compress")]
    compress: bool,
    /// Turn `--compress` off.
    #[arg(long, hide = true, overrides_with = "compress")]
    no_compress: bool,
    /// How records travel to remote mirrors: `tcp` (on the TLS connection), `udp` (as
    /// authenticated, encrypted UDP datagrams with forward error correction to the daemon's
    /// port, the TLS connection staying the control channel; a daemon that declines is an
    /// error), or `auto` (UDP when the daemon accepts it and datagrams get through within 3 s,
    /// else TCP until the next mount).
    #[arg(long, value_enum, default_value = "tcp")]
    transport: crate::net::udp::Transport,
    /// The UDP data path's pace in Mbit/s (datagrams with their FEC repairs): with
    /// `--udp-rate-control fixed` the rate it always sends at (set it to what the link can
    /// carry), with `adaptive` the most it sends at.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    udp_rate_mbit: u64,
    /// How the UDP data path's pace is chosen: `fixed` (always `--udp-rate-mbit`: a dedicated
    /// link of known capacity) or `adaptive` (from 10 Mbit/s, doubling each round trip, then
    /// backing off when a queue builds on the path (round-trip time 10 ms above its minimum)
    /// or more is lost than FEC repairs (NAKs above 0.5 % of packets), between 1 Mbit/s and
    /// `--udp-rate-mbit`; random loss FEC repairs does not slow it down).
    #[arg(long, value_enum, default_value = "fixed")]
    udp_rate_control: crate::net::udp::RateControlMode,
    /// The UDP data path's FEC layers, c of Maelstrom's (r, c) = (8, c) at interleave distances
    /// 1, 10, 100: 3 (the default, SMFS's setting) down to 0 (no repair packets: what the link
    /// loses is only asked for again). A record is acknowledged with `--ack network` once its
    /// data and repair packets were handed to the socket.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=3))]
    udp_fec_layers: u64,
    /// The TCP congestion control of the connections to remote mirrors (e.g. `cubic`, `bbr`;
    /// default: the system's). Over a long lossy link it decides TCP's throughput.
    #[arg(long)]
    tcp_congestion: Option<String>,
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
    /// Copy BACKING again to every local mirror, replacing its contents: a never-synced,
    /// non-empty directory, one with a foreign identity mark, or a known mirror whose tree was
    /// changed behind mirrorfs's back (`mirrorfs verify` finds those; `verify --repair` and
    /// `mirrorfs resync` mend a running mount's mirror without a full copy).
    /// `--no-force-resync` turns it off (over a config file's `force_resync = true`).
    #[arg(long, overrides_with = "no_force_resync")]
    force_resync: bool,
    /// Turn `--force-resync` off.
    #[arg(long, hide = true, overrides_with = "force_resync")]
    no_force_resync: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// A witness (`mirror://HOST:PORT`, a `mirrorfs witness` this machine trusts and that trusts
    /// it): the mount writes only while it holds the volume's write lease from the witness. Cut
    /// off from the witness (the minority side of a split), every change fails with EROFS after
    /// the lease runs out, reads keep working, `status` says why, and writes resume by themselves
    /// when a renewal is granted. A promoted copy (`promote --witness`) supersedes this site for
    /// good. At start the mount waits up to 5 s for the first grant, then mounts read-only until
    /// one comes. With `--partition quorum` (two writable sites) the witness grants the pair's
    /// partition lease instead: only a split's lease holder writes.
    #[arg(long)]
    witness: Option<String>,
    /// The lease's length in ms (renewed every third of it; writes stop a fifth of it before it
    /// ends, so a site cut off from the witness is read-only within this time). With
    /// `--partition quorum` also the link lease between the two sites (probed every quarter).
    #[arg(long, default_value_t = 3000, requires = "witness")]
    lease_ms: u64,
    /// Crash-atomic groups without an explicit API: the changes made between two syncs
    /// (`fsync`, `fdatasync` or `fsyncdir` of anything on the mount) form one group, which
    /// mirrors show all together or not at all (see `mirrorfs group` for explicit groups).
    /// A change is then acknowledged once the local journal holds it, and a sync waits for the
    /// `--ack` level. A group nobody syncs ends after --fsync-group-max-ms. `--no-fsync-groups`
    /// turns it off (over a config file's `fsync_groups = true`).
    #[arg(long, overrides_with = "no_fsync_groups")]
    fsync_groups: bool,
    /// Turn `--fsync-groups` off.
    #[arg(long, hide = true, overrides_with = "fsync_groups")]
    no_fsync_groups: bool,
    /// With --fsync-groups: the longest a group stays open without a sync, in ms; how far it
    /// may hold mirrors back.
    #[arg(long, default_value_t = 1000, requires = "fsync_groups", value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    fsync_group_max_ms: u64,
    /// Let the kernel cache writes (FUSE's writeback cache): write(2) fills the page cache and
    /// returns, and the kernel sends the data later (at the latest when the file is closed or
    /// synced), as one larger request. Mirrors then keep a weaker order, stated in the README
    /// ("With --writeback-cache"): a file's data written before its close or fsync is
    /// journaled before that close or fsync returns, but between those points it may reach the
    /// mirrors after later changes, and a crash of this process can lose data not yet closed or
    /// synced; `--ack` then applies to the kernel's writes, close and fsync, not to each
    /// write(2). Refused with `--peer` (two writable sites). `--no-writeback-cache` turns it
    /// off (over a config file's `writeback_cache = true`).
    #[arg(long, overrides_with = "no_writeback_cache")]
    writeback_cache: bool,
    /// Turn `--writeback-cache` off.
    #[arg(long, hide = true, overrides_with = "writeback_cache")]
    no_writeback_cache: bool,
    /// Take the settings of volume NAME from the config file ($MIRRORFS_CONFIG or
    /// /etc/mirrorfs: `[volume.NAME]` in mirrorfs.toml, or volumes.d/NAME.toml); flags given
    /// here override them. `mirrorfs config show NAME` prints what it gets.
    #[arg(long, value_name = "NAME")]
    volume: Option<String>,
}

/// How long a mount waits for the witness's first grant before it serves (read-only until a
/// grant comes).
const FIRST_GRANT_WAIT: Duration = Duration::from_secs(5);

/// With `--witness`: sets the volume's write fence and starts the thread that keeps the lease,
/// then waits (at most [`FIRST_GRANT_WAIT`]) for the first grant.
fn start_fence(a: &MountArgs, vol: &Volume, meta: &meta::Meta, backing: &Path) -> Result<()> {
    let Some(w) = &a.witness else {
        return Ok(());
    };
    let history = meta.history();
    let Some(generation) = history.current() else {
        bail!("the volume has no generation history");
    };
    let client = crate::net::witness::Client::new(w, a.config.as_deref())?;
    let request = mirrorfs_core::lease::Request {
        volume_id: history.volume_id,
        site: crate::site::fence::site_name(backing),
        generation_number: generation.number,
        generation_id: generation.id,
        ttl_ms: a.lease_ms,
        renewal: false,
    };
    let fence = Arc::new(crate::site::fence::Fence::new(
        request,
        format!("mirror://{}", crate::net::witness::address(w)),
    ));
    if vol.fence.set(fence.clone()).is_err() {
        bail!("the volume's fence is set already");
    }
    let keeper = fence.clone();
    // Not joined at the unmount: it may wait on the network for up to a connect timeout, and
    // it holds nothing that needs stopping. It never gives the lease back: `promote --witness`
    // of a copy waits for its expiry.
    std::thread::Builder::new()
        .name("lease".into())
        .spawn(move || crate::net::witness::keep_lease(keeper, client, || false))
        .context("cannot start the lease thread")?;
    let t0 = std::time::Instant::now();
    while fence.check().is_err() && t0.elapsed() < FIRST_GRANT_WAIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    match fence.check() {
        Ok(()) => tracing::info!("holding the write lease from the witness {w}"),
        Err(f) => {
            let line = format!(
                "mounting read-only until the witness grants the write lease: {}",
                fence.describe(&f)
            );
            tracing::warn!("{line}");
            eprintln!("mirrorfs: {line}");
        }
    }
    Ok(())
}

/// `--partition quorum`: the thread that keeps the witness's partition lease for the gate. The
/// lease is the pair's: its volume id is both sites' volume ids xor-ed (the same at both), so it
/// starts once the peer's volume is known (its first connection); a site names itself by its
/// token id ("2 (host:/backing)"), which `status` shows at the other site.
fn start_partition_lease(
    a: &MountArgs,
    site: &mut Site,
    gate: Arc<TokenGate>,
    receiver: Arc<crate::net::peer::PeerReceiver>,
    meta: &meta::Meta,
    backing: &Path,
) -> Result<()> {
    let (Some(w), Some((me, _))) = (&a.witness, a.write_tokens) else {
        return Ok(());
    };
    let client = crate::net::witness::Client::new(w, a.config.as_deref())?;
    let own = meta.history().volume_id;
    let name = format!("{me} ({})", crate::site::fence::site_name(backing));
    let (ttl_ms, url) = (
        a.lease_ms,
        format!("mirror://{}", crate::net::witness::address(w)),
    );
    let vol = site.vol.clone();
    // A thread of the site: told by the site's stop (`Site::stop`, after the unmount and the
    // drain: this site writes no more) and joined there; its waits on the network are bounded
    // (`keep_lease`). On its way out it gives the lease back, so that the peer, cut off from
    // this stopped site, takes it without waiting for it to expire.
    site.spawn("partition-lease", move || {
        let peer = loop {
            if lock(&vol.progress).stopping {
                return;
            }
            if let Some(v) = receiver.peer_volume() {
                break v;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut volume_id = own;
        for (x, y) in volume_id.iter_mut().zip(peer) {
            *x ^= y;
        }
        let request = mirrorfs_core::lease::Request {
            volume_id,
            site: name,
            generation_number: 1,
            generation_id: 1,
            ttl_ms,
            renewal: false,
        };
        let fence = Arc::new(crate::site::fence::Fence::new(request, url));
        if gate.lease.set(fence.clone()).is_err() {
            return;
        }
        let stopping = || lock(&vol.progress).stopping;
        crate::net::witness::keep_lease(fence, client, stopping);
    })?;
    Ok(())
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

/// Where the mount puts things, checked before anything is created or locked.
struct Places {
    backing: PathBuf,
    mountpoint: PathBuf,
    /// Local mirror directories, canonical.
    mirrors: Vec<PathBuf>,
    /// Remote mirrors, `HOST:PORT`.
    remotes: Vec<String>,
    quorum: usize,
    /// The peer writable site (`--peer`), the last of `remotes`.
    peer: Option<String>,
}

/// The state directory and the name hidden at the backing's root.
struct StatePlace {
    path: PathBuf,
    /// The state directory's name at the backing's root, or `.mirrorfs` if the state is
    /// elsewhere: hidden from the mount, never in a record, and the name of each local mirror's
    /// identity mark (`mark.rs`).
    hidden: Vec<u8>,
}

impl StatePlace {
    fn mark_name(&self) -> String {
        String::from_utf8_lossy(&self.hidden).into_owned()
    }
}

/// The locks held for the life of the mount: one instance per backing directory (whatever
/// `--state` says), one user per local mirror, and the state directory's own.
struct Locks {
    _backing: dirlock::DirLock,
    _mirrors: Vec<dirlock::DirLock>,
    _state: crate::site::state_dir::StateLock,
}

/// `mirrorfs mount`: check and lock, open the primary site, attach its mirrors, mount, serve until
/// a signal or an external unmount, then drain and stop.
pub fn mount(a: MountArgs) -> Result<()> {
    if a.partition == PartitionArg::Quorum && (a.witness.is_none() || a.write_tokens.is_none()) {
        bail!(
            "--partition quorum needs --witness mirror://HOST:PORT and --write-tokens SITE:PEER (the witness grants the partition lease)"
        );
    }
    if let Some(v) = &a.volume {
        tracing::info!("volume {v}: settings from the config file, then the command line");
    }
    check_writeback_cache(&a)?;
    let places = check_places(&a)?;
    let link_identity = link_identity(&a, &places.remotes)?;
    let state = prepare_state(&a, &places)?;
    let _locks = take_locks(&places, &state.path)?;
    let behind = stamp::check(
        &places.backing,
        &state.hidden,
        &state.path,
        &places.mountpoint,
    );
    if let Some(w) = &behind {
        tracing::warn!("{w}");
        eprintln!("mirrorfs: warning: {w}");
    }
    let meta = primary_meta(&state.path)?;
    let shared = mirror_shares(&places, &state.path)?;
    let n_local = places.mirrors.len();
    let role = Role::Primary {
        backing: places.backing.clone(),
        ack: a.ack,
        quorum: places.quorum,
        fsync_waits: a.fsync_waits,
    };
    let mut site = Site::open(
        StateDir::at(&state.path),
        &role,
        a.journal_max_mib,
        shared.clone(),
    )?;
    // What changes from here on, for an incremental `mirrorfs verify` (`site::verify_dirty`).
    crate::site::verify_dirty::start(&mut site, behind.is_some())?;
    let vol = site.vol.clone();
    if places.peer.is_some() && a.receive.is_some() {
        // Before the mount serves anything: is this a new volume on an empty tree
        // (`core::pair`, what the `Hello` to the peer says)?
        let end = lock(&vol.order).journal.next_seq() - 1;
        crate::site::peer::born_empty(
            &StateDir::at(&state.path).pair_born_empty_file(),
            end,
            &places.backing,
            &state.hidden,
        )?;
    }
    if a.partition != PartitionArg::Quorum {
        start_fence(&a, &vol, &meta, &places.backing)?;
    }
    let gate = start_tokens(&a, &mut site, &vol, &state)?;
    if gate.is_some() {
        // Where a change of a file's data or metadata reads its link count, to take the token
        // of hard-linked files too (`Volume::take_file_tokens`).
        let root = crate::tree::dirtree::Root::open(&places.backing)
            .with_context(|| format!("open {}", places.backing.display()))?;
        let _ = vol.links.set(root);
    }
    if a.fsync_groups {
        let clock = SyncGroupClock::new(Duration::from_millis(a.fsync_group_max_ms));
        let _ = vol.sync_groups.set(clock);
        let v = vol.clone();
        site.spawn("sync-groups", move || v.run_sync_group_timer())?;
    }
    {
        let (v, b, h) = (
            Arc::downgrade(&vol),
            places.backing.clone(),
            state.hidden.clone(),
        );
        let hook: volume::ResyncHook = Box::new(move |req: &[u8]| {
            let v = v.upgrade().ok_or(libc::ESHUTDOWN)?;
            mirror::operator::start(&v, b.clone(), h.clone(), req)
        });
        let _ = vol.resync.set(hook);
    }
    let local = &shared[..n_local];
    let to_sync = start_local_mirrors(&mut site, local, &a, &meta, &state, &places.backing)?;
    let status_stop = Arc::new(AtomicBool::new(false));
    let reg = start_status(&mut site, &a, &places, &status_stop)?;
    let term = shutdown_signals()?;
    let fs_impl = fuse::MirrorFs::new(vol.clone(), &places.backing, Some(state.hidden.clone()))?
        .with_writeback_cache(a.writeback_cache);
    let view = fs_impl.view();
    let (session, own_mount) = open_session(fs_impl, &a, &places)?;
    // Changes the site makes beneath the mount (a failback's reintegration) reach the mount's
    // inode table and the kernel's caches.
    view.attach(session.notifier());
    let _ = vol.view.set(view);
    let bg = session.spawn()?;
    raise_readahead(&places.mountpoint);
    tracing::info!(
        "mounted {} on {} with {} mirror(s), --ack {}, quorum {}",
        places.backing.display(),
        places.mountpoint.display(),
        shared.len(),
        a.ack,
        places.quorum
    );
    // Before the links start: the link to the peer must know, from its first record, which
    // records came from the peer, and carry the token messages from its first connection.
    let _receiver = start_peer(
        &a,
        &vol,
        &places,
        &state,
        &shared[n_local..],
        &term,
        gate.clone(),
    )?;
    if let (Some(g), Some(r), PartitionArg::Quorum) = (&gate, &_receiver, a.partition) {
        start_partition_lease(&a, &mut site, g.clone(), r.clone(), &meta, &places.backing)?;
    }
    if let Some((id, pinned)) = link_identity {
        let cfg = Arc::new(remote::LinkConfig {
            identity: id,
            pinned,
            compress: a.compress,
            history: meta.history(),
            name: format!(
                "{}:{}{}",
                super::hostname(),
                places.backing.display(),
                a.write_tokens
                    .map(|(me, peer)| crate::site::tokens::hello_suffix(
                        me,
                        peer,
                        a.partition == PartitionArg::Quorum
                    ))
                    .unwrap_or_default()
            ),
            backing: places.backing.clone(),
            hidden: Some(state.hidden.clone()),
            state: state.path.clone(),
            transport: a.transport,
            udp_rate_bytes_per_s: a.udp_rate_mbit * 125_000,
            udp_rate_control: a.udp_rate_control,
            udp_fec_layers: a.udp_fec_layers as usize,
            tcp_congestion: a.tcp_congestion.clone(),
            writeback_cache: a.writeback_cache,
        });
        for m in &shared[n_local..] {
            let (v, m, c) = (vol.clone(), m.clone(), cfg.clone());
            site.spawn("link", move || remote::run_link(v, m, c))?;
        }
    }
    eprintln!(
        "mirrorfs: serving {} at {} (Ctrl-C to unmount)",
        places.backing.display(),
        places.mountpoint.display()
    );
    start_initial_copies(&vol, &places.backing, &state, &to_sync, &term)?;
    crate::readiness::ready(&format!(
        "serving {} at {}",
        places.backing.display(),
        places.mountpoint.display()
    ));
    let mut watchdog = crate::readiness::Watchdog::new();
    while !term.load(Ordering::Relaxed) && !bg.guard.is_finished() {
        watchdog.tick();
        std::thread::sleep(Duration::from_millis(50));
    }
    crate::readiness::stopping();
    // An initial copy still running stops at its next chunk: the shutdown does not wait for it
    // (the mirror keeps its SYNCING marker and the next mount copies it again).
    for m in &to_sync {
        m.cancel_copy.store(true, Ordering::Release);
    }
    unmount(bg, &places.mountpoint, own_mount);
    mirror::drain::drain_mirrors(&vol, &shared);
    status_stop.store(true, Ordering::Relaxed);
    site.stop()?;
    stamp::save(&places.backing, &state.hidden, &state.path);
    status::write_status(&vol, &places.mountpoint, &state.path);
    for m in &shared[n_local..] {
        let _ =
            MirrorStateDir::at(&m.state_dir).set_remote_durable(m.durable.load(Ordering::Acquire));
    }
    drop(reg);
    eprintln!("mirrorfs: unmounted {}", places.mountpoint.display());
    Ok(())
}

/// `--writeback-cache` is refused where its order guarantee cannot hold: with two writable sites
/// (`--peer`, and so `--write-tokens`), the peer's changes are applied to BACKING beneath the
/// mount, and the kernel, which owns a cached file's size and pages under the writeback cache,
/// would keep showing its own (and write its dirty pages over the peer's data), while a write
/// token would be taken when the kernel writes the pages back, not at write(2), so one file's
/// writes at both sites could mix.
fn check_writeback_cache(a: &MountArgs) -> Result<()> {
    if a.writeback_cache && a.peer.is_some() {
        bail!(
            "--writeback-cache cannot be used with --peer: the kernel's page cache would hide the \
             peer's writes to a file and write its own cached pages over them, and a write token \
             would be taken when the kernel writes the pages back, not at write(2)"
        );
    }
    Ok(())
}

/// `--partition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PartitionArg {
    ReadOnly,
    Reconcile,
    Quorum,
}

/// `--write-tokens SITE:PEER`.
fn parse_token_ids(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("{s}: expected SITE:PEER, e.g. 1:2"))?;
    let n = |x: &str| {
        x.trim()
            .parse::<u64>()
            .map_err(|e| format!("{s}: {x} is not a site id ({e})"))
    };
    let (a, b) = (n(a)?, n(b)?);
    if a == 0 || b == 0 || a == b {
        return Err(format!("{s}: the two ids must differ and be at least 1"));
    }
    Ok((a, b))
}

/// The write-token gate of `--write-tokens` on the volume (and its ticker), before the mount
/// serves anything.
fn start_tokens(
    a: &MountArgs,
    site: &mut Site,
    vol: &Arc<Volume>,
    state: &StatePlace,
) -> Result<Option<Arc<TokenGate>>> {
    let Some((me, peer)) = a.write_tokens else {
        return Ok(None);
    };
    let policy = match a.partition {
        PartitionArg::ReadOnly => PartitionPolicy::ReadOnly,
        PartitionArg::Reconcile => PartitionPolicy::Reconcile,
        PartitionArg::Quorum => PartitionPolicy::Quorum,
    };
    let dir = StateDir::at(&state.path);
    let end = lock(&vol.order).journal.next_seq() - 1;
    let applied = crate::site::peer::PeerPosition::load(&dir.peer_applied_file())?.applied;
    let gate = Arc::new(TokenGate::open_in(
        &dir,
        TokenConfig::new(me, peer, policy).with_hold_max(a.token_hold_max_ms),
        end,
        applied,
    )?);
    // The ticker drives the machine's timings (idle give-backs, hold_max, park timeouts)
    // until the site stops.
    let g = gate.clone();
    let v = Arc::downgrade(vol);
    site.spawn("tokens", move || {
        while v.upgrade().is_some_and(|v| !lock(&v.progress).stopping) {
            std::thread::sleep(crate::site::tokens::TICK);
            g.tick();
        }
    })?;
    if policy == PartitionPolicy::Quorum {
        gate.start_quorum(a.lease_ms, end, applied);
    }
    let _ = vol.tokens.set(gate.clone());
    tracing::info!(
        "write tokens: site {me}, peer {peer}, {} across a split, held up to {} ms for an open file",
        match policy {
            PartitionPolicy::ReadOnly => "read-only",
            PartitionPolicy::Reconcile => "reconcile",
            PartitionPolicy::Quorum => "witness quorum",
        },
        a.token_hold_max_ms
    );
    Ok(Some(gate))
}

/// The pair's receiving half (`--receive`), and the link to the peer marked so that the peer's
/// own changes are not sent back to it (`site::peer`, `net::peer`).
fn start_peer(
    a: &MountArgs,
    vol: &Arc<Volume>,
    places: &Places,
    state: &StatePlace,
    remotes: &[Arc<MirrorShared>],
    term: &Arc<AtomicBool>,
    gate: Option<Arc<TokenGate>>,
) -> Result<Option<Arc<crate::net::peer::PeerReceiver>>> {
    let (Some(peer), Some(listen)) = (&places.peer, &a.receive) else {
        return Ok(None);
    };
    let dir = StateDir::at(&state.path);
    let end = lock(&vol.order).journal.next_seq() - 1;
    let link = remotes
        .iter()
        .find(|m| m.remote.as_deref() == Some(peer.as_str()))
        .ok_or_else(|| anyhow::anyhow!("internal: no link to the peer {peer}"))?;
    crate::site::peer::attach_link(vol, &dir, link)?;
    if let Some(g) = &gate {
        let _ = link
            .tokens
            .set(Arc::new(crate::site::tokens::TokenWire::new(g.clone())));
    }
    let reconcile = match (a.write_tokens, a.partition) {
        // Quorum: the majority's writes to tokens at the peer are unguarded; the peer's writes
        // that crossed the cut are the concurrent ones the reconciliation finds.
        (Some((me, peer)), PartitionArg::Reconcile | PartitionArg::Quorum) => {
            let pos = crate::site::peer::PeerPosition::load(&dir.peer_applied_file())?;
            let rc = Arc::new(crate::site::reconcile::SiteReconcile::new(
                me,
                peer,
                pos.seen,
                pos.applied,
                pos.point,
                end + 1,
                &state.path,
            ));
            let n = rc
                .rebuild(vol, link.peer.get().map(|l| l.as_ref()))
                .context("cannot read the journal for the reconciliation's entries")?;
            tracing::info!(
                "reconciliation after a split: {n} data records of this site not yet seen by the peer (after {})",
                pos.seen
            );
            // Hard links: the files behind the names of our changes (`site::reconcile`).
            rc.set_backing(&places.backing)?;
            let _ = link.reconcile.set(rc.clone());
            let _ = vol.reconcile.set(rc.clone());
            Some(rc)
        }
        _ => None,
    };
    let receiver = crate::net::peer::PeerReceiver::new(
        vol.clone(),
        &places.backing,
        state.hidden.clone(),
        dir.peer_applied_file(),
        crate::net::peer::Pairing { gate, reconcile },
        listen,
    )?;
    let cfg_dir = identity::config_dir(a.config.as_deref());
    let id = identity::load(&cfg_dir)?;
    let pinned = identity::pinned(&cfg_dir)?;
    receiver.serve(listen, &id, &cfg_dir, pinned, term.clone())?;
    Ok(Some(receiver))
}

/// The backing, the mountpoint and the mirrors exist, do not overlap, and the quorum fits.
fn check_places(a: &MountArgs) -> Result<Places> {
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
    let mut places = Places {
        backing,
        mountpoint,
        mirrors: Vec::new(),
        remotes: Vec::new(),
        quorum: 0,
        peer: None,
    };
    for spec in &a.mirrors {
        add_mirror(&mut places, spec)?;
    }
    if let Some(spec) = &a.peer {
        if !spec.starts_with("mirror://") {
            bail!("--peer {spec}: expected mirror://HOST:PORT (the peer's --receive address)");
        }
        add_mirror(&mut places, spec)?;
        places.peer = places.remotes.last().cloned();
    }
    let n_mirrors = places.mirrors.len() + places.remotes.len();
    places.quorum = a.quorum.unwrap_or(n_mirrors);
    if places.quorum == 0 || places.quorum > n_mirrors {
        bail!(
            "--quorum {}: must be between 1 and the number of mirrors ({n_mirrors})",
            places.quorum
        );
    }
    Ok(places)
}

/// One `--mirror`: `mirror://HOST:PORT`, or a writable directory outside the backing and the
/// mountpoint, each given once.
fn add_mirror(places: &mut Places, spec: &str) -> Result<()> {
    if let Some(addr) = spec.strip_prefix("mirror://") {
        let addr = addr.trim_end_matches('/');
        if addr.is_empty() || !addr.contains(':') {
            bail!("remote mirror {spec}: expected mirror://HOST:PORT");
        }
        if places.remotes.iter().any(|r| r == addr) {
            bail!("mirror {spec} is given twice");
        }
        places.remotes.push(addr.to_string());
        return Ok(());
    }
    if spec.contains("://") {
        bail!("mirror {spec}: only directories and mirror://HOST:PORT are supported");
    }
    let c = canon(Path::new(spec), "mirror")?;
    let backing = &places.backing;
    if c == *backing || c.starts_with(backing) || backing.starts_with(&c) {
        bail!("mirror {} overlaps the backing directory {}: a mirror must be outside it (and must not contain it)", c.display(), backing.display());
    }
    if c == places.mountpoint || c.starts_with(&places.mountpoint) {
        bail!(
            "mirror {} is inside the mountpoint {}",
            c.display(),
            places.mountpoint.display()
        );
    }
    if places.mirrors.contains(&c) {
        bail!("mirror {} is given twice", c.display());
    }
    check_writable(&c)?;
    places.mirrors.push(c);
    Ok(())
}

/// This machine's identity and its trusted peers, when there are remote mirrors.
fn link_identity(
    a: &MountArgs,
    remotes: &[String],
) -> Result<Option<(Arc<identity::Identity>, Vec<identity::Fingerprint>)>> {
    if remotes.is_empty() {
        return Ok(None);
    }
    let dir = identity::config_dir(a.config.as_deref());
    let id = identity::load(&dir)?;
    let pinned = identity::pinned(&dir)?;
    if pinned.is_empty() {
        bail!(
            "no trusted mirrors in {}: run `mirrorfs trust FINGERPRINT NAME` with each mirror daemon's fingerprint (`mirrorfs init` prints it on that machine)",
            dir.join("peers").display()
        );
    }
    Ok(Some((Arc::new(id), pinned)))
}

/// The state directory: created owner-only, outside every mirror; a local mirror's tree mounted
/// as a primary (failover to a local copy) loses its identity mark here.
fn prepare_state(a: &MountArgs, places: &Places) -> Result<StatePlace> {
    let backing = &places.backing;
    let state = match &a.state {
        Some(s) => {
            statefile::private_dir(s)
                .with_context(|| format!("cannot create state directory {}", s.display()))?;
            s.canonicalize()?
        }
        None => backing.join(".mirrorfs"),
    };
    if let Some(found) = mark::read_file(&state) {
        // It becomes the backing of a new volume; its mark goes, the state directory takes its
        // place.
        tracing::warn!(
            "{} was a local mirror of volume {} (copy since record {}): it is now the backing directory of a new volume",
            backing.display(),
            found.volume_id,
            found.since_seq
        );
        fs::remove_file(&state)
            .with_context(|| format!("cannot remove the mirror mark {}", state.display()))?;
    }
    if let Some(m) = places.mirrors.iter().find(|m| state.starts_with(m)) {
        bail!(
            "the state directory {} is inside mirror {}",
            state.display(),
            m.display()
        );
    }
    statefile::private_dir(&state)
        .with_context(|| format!("cannot create state directory {}", state.display()))?;
    let hidden = (state.parent() == Some(backing.as_path()))
        .then(|| state.file_name().map(|n| n.as_bytes().to_vec()))
        .flatten()
        .unwrap_or_else(|| b".mirrorfs".to_vec());
    Ok(StatePlace {
        path: state,
        hidden,
    })
}

/// Locks the backing, each local mirror and the state directory, and records our pid.
fn take_locks(places: &Places, state: &Path) -> Result<Locks> {
    let backing = &places.backing;
    let backing_lock = dirlock::lock(backing).map_err(|e| match e {
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
    let mut mirror_locks = Vec::new();
    for m in &places.mirrors {
        mirror_locks.push(dirlock::lock(m).map_err(|e| {
            anyhow::anyhow!(
                "mirror {} is in use by another mirrorfs ({e}): a directory can be the mirror of one mount only, and never a backing directory or a daemon's directory at the same time",
                m.display()
            )
        })?);
    }
    // Two backing directories cannot share one `--state`.
    let sd = StateDir::at(state);
    let state_lock = match sd.lock() {
        Ok(l) => l,
        Err(StateLockError::Held(pid)) => bail!(
            "another mirrorfs (pid {}) is already serving {}; unmount it first",
            pid.unwrap_or_default(),
            backing.display()
        ),
        Err(StateLockError::Io(e)) => return Err(e.into()),
    };
    sd.write_pid()?;
    Ok(Locks {
        _backing: backing_lock,
        _mirrors: mirror_locks,
        _state: state_lock,
    })
}

/// The shared state of each mirror, local ones first. A remote mirror holds the journal from
/// the position it last said was durable (all of it until it says).
fn mirror_shares(places: &Places, state: &Path) -> Result<Vec<Arc<MirrorShared>>> {
    let sd = StateDir::at(state);
    let mut shared: Vec<Arc<MirrorShared>> = places
        .mirrors
        .iter()
        .map(|m| {
            let dir = sd.mirror(&mirror_id(m)).path().to_path_buf();
            Arc::new(MirrorShared::new(
                m.display().to_string(),
                m.clone(),
                dir,
                None,
            ))
        })
        .collect();
    for r in &places.remotes {
        let name = format!("mirror://{r}");
        let dir = sd.mirror(&mirror_id(Path::new(&format!("remote-{r}"))));
        let m = MirrorShared::new(
            name.clone(),
            PathBuf::from(&name),
            dir.path().to_path_buf(),
            Some(r.clone()),
        );
        fs::create_dir_all(&m.state_dir)?;
        *lock(&m.phase) = MirrorPhase::Retrying {
            error: "connecting".into(),
            since_unix: sys::now().sec as u64,
        };
        // A garbage file holds everything too (as before), but says so.
        let hold = match dir.remote_durable() {
            Ok(pos) => pos.unwrap_or(0),
            Err(e) => {
                tracing::warn!("mirror {name}: {e}; holding the whole journal for it");
                0
            }
        };
        m.durable.store(hold, Ordering::Release);
        shared.push(Arc::new(m));
    }
    Ok(shared)
}

/// A local mirror's applier: resumed from its cursor when the mirror is ours and the journal
/// still holds what it lacks; otherwise the mirror is prepared for an initial copy (`true`).
/// A tree with a missing or foreign identity mark (another disk) is never copied over unless
/// asked; a live mirror with a bad mark waits as `refused` (mirror::run_worker re-checks).
fn attach_local_mirror(
    site: &Site,
    m: &Arc<MirrorShared>,
    a: &MountArgs,
    meta: &meta::Meta,
    state: &StatePlace,
    backing: &Path,
) -> Result<(Applier, bool)> {
    let ms = MirrorStateDir::at(&m.state_dir);
    let mut cur = volume::open_cursor(m)?;
    let opening = &site.opening;
    let existing = if ms.needs_resync().is_some() || ms.is_syncing() {
        None
    } else {
        Applier::open(&mut cur, opening.power_loss, opening.horizon)?
    };
    let bad_mark = mark::problem(m);
    // `--force-resync` copies every mirror again, a known one too (its cursor vouches only for
    // what mirrorfs applied, not for changes made behind its back).
    let existing = match existing {
        Some(_) if a.force_resync => {
            tracing::warn!(
                "mirror {}: {}--force-resync: copying it again",
                m.name,
                bad_mark
                    .as_deref()
                    .map(|w| format!("{w}; "))
                    .unwrap_or_default()
            );
            None
        }
        e => e,
    };
    match existing {
        Some(ap) if ap.cursor().applied + 1 >= opening.first_held => {
            if mark::expected(m).is_none() {
                // Attached before marks existed: its cursor vouches for it.
                mark::write_new(m, &state.mark_name(), meta, ap.cursor().applied)?;
            }
            *lock(&m.phase) = MirrorPhase::Live;
            Ok((ap, false))
        }
        other => {
            let was_ours = ms.needs_resync().is_some() || ms.is_syncing() || other.is_some();
            prepare_for_copy(m, a, bad_mark.as_deref(), was_ours, backing)?;
            ms.set_syncing()?;
            let _ = ms.clear_needs_resync();
            let seq = lock(&site.vol.order).journal.next_seq() - 1;
            mark::write_new(m, &state.mark_name(), meta, seq + 1)?;
            let mut ap = volume::new_applier_at(m, seq)?;
            ap.set_syncing(Some(mirror::sync_id(m)));
            Ok((ap, true))
        }
    }
}

/// Attaches every local mirror, records the boot (every cursor has taken a power loss into
/// account), then starts one worker per mirror. Returns the mirrors that need an initial copy,
/// started once the mount is up.
fn start_local_mirrors(
    site: &mut Site,
    local: &[Arc<MirrorShared>],
    a: &MountArgs,
    meta: &meta::Meta,
    state: &StatePlace,
    backing: &Path,
) -> Result<Vec<Arc<MirrorShared>>> {
    let mut to_sync = Vec::new();
    let mut appliers = Vec::new();
    for m in local {
        let (ap, copy) = attach_local_mirror(site, m, a, meta, state, backing)?;
        m.applied.store(ap.cursor().applied, Ordering::Release);
        m.checkpoint
            .store(ap.cursor().checkpoint, Ordering::Release);
        if copy {
            to_sync.push(m.clone());
        }
        appliers.push(ap);
    }
    // From here a crash is a primary's: a daemon must not serve the directory before a clean
    // unmount settles its last change.
    StateDir::at(&state.path).clear_served_primary()?;
    site.record_boot()?;
    for (m, ap) in local.iter().cloned().zip(appliers) {
        let v = site.vol.clone();
        let name = format!("mirror-{}", mirror_id(&m.path));
        site.spawn(&name, move || mirror::run_worker(v, m, ap))?;
    }
    Ok(to_sync)
}

/// Empties a mirror about to be copied, if that is allowed: it was ours, or `--force-resync`.
/// A non-empty directory that never was a mirror of ours, or has a bad mark, is refused.
fn prepare_for_copy(
    m: &MirrorShared,
    a: &MountArgs,
    bad_mark: Option<&str>,
    was_ours: bool,
    backing: &Path,
) -> Result<()> {
    let empty = fs::read_dir(&m.path)?.next().is_none();
    if empty {
        return Ok(());
    }
    if let (Some(why), false) = (bad_mark, a.force_resync) {
        bail!("mirror {}: {why}", m.path.display());
    }
    if !was_ours && !a.force_resync {
        bail!(
            "mirror {} is not empty and was never synced by mirrorfs; empty it, or pass --force-resync to replace its contents with a copy of {}",
            m.path.display(),
            backing.display()
        );
    }
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
    Ok(())
}

/// The first status on disk before the mount appears (`mirrorfs status` works at once), the
/// registration that lets `status` find it, the writer thread, and the metrics endpoint.
fn start_status(
    site: &mut Site,
    a: &MountArgs,
    places: &Places,
    stop: &Arc<AtomicBool>,
) -> Result<status::Registered> {
    let state = site.state.path().to_path_buf();
    let mountpoint = places.mountpoint.as_path();
    status::write_status(&site.vol, mountpoint, &state);
    let reg = status::register(mountpoint, &places.backing, &state)?;
    let (v, stop) = (site.vol.clone(), stop.clone());
    let mp = mountpoint.to_path_buf();
    if let Some(addr) = &a.metrics {
        let (v, mp, st) = (site.vol.clone(), mp.clone(), state.clone());
        let render = move || status::metrics_text(&v, &mp, &st);
        crate::site::metrics::serve(addr, Arc::new(render))?;
    }
    site.spawn("status", move || status::writer(v, &mp, &state, &stop))?;
    Ok(reg)
}

/// SIGINT/SIGTERM set the returned flag; a second one while the first is being handled exits at
/// once (status 1). Registered before the mount appears: a signal at any moment after it
/// unmounts cleanly.
fn shutdown_signals() -> Result<Arc<AtomicBool>> {
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 1, term.clone())?;
        signal_hook::flag::register(sig, term.clone())?;
    }
    Ok(term)
}

/// Mounts and opens the FUSE session. As root, mirrorfs mounts /dev/fuse itself so that the
/// mount is of type `fuse.mirrorfs` with the backing directory as its source (see
/// `fuse::kernel_mount`); otherwise fuser mounts it through fusermount3. Returns whether the
/// mount is ours to unmount.
fn open_session(
    fs_impl: fuse::MirrorFs,
    a: &MountArgs,
    places: &Places,
) -> Result<(fuser::Session<fuse::MirrorFs>, bool)> {
    let (config, user_opts) = fuse_config(a, &places.backing);
    let mp = &places.mountpoint;
    let k = fuse::kernel_mount::kernel_options(&user_opts).map_err(anyhow::Error::msg)?;
    let fd = fuse::kernel_mount::mount(mp, &places.backing, &k)
        .with_context(|| format!("cannot mount on {}", mp.display()))?;
    let Some(fd) = fd else {
        let s = fuser::Session::new(fs_impl, mp, &config)
            .with_context(|| format!("cannot mount on {}", mp.display()))?;
        return Ok((s, false));
    };
    let acl = config.acl;
    match fuser::Session::from_fd(fs_impl, fd, acl, config) {
        Ok(s) => Ok((s, true)),
        Err(e) => {
            detach(mp);
            Err(e).with_context(|| format!("cannot start the FUSE session on {}", mp.display()))
        }
    }
}

/// Larger READs for sequential reads through the mount (`kernel_mount::raise_readahead`); the
/// mount works without, at the kernel's default window of 128 KiB.
fn raise_readahead(mp: &Path) {
    match fuse::kernel_mount::raise_readahead(mp) {
        Ok(()) => tracing::debug!(
            "readahead window of {} set to {} KiB",
            mp.display(),
            fuse::kernel_mount::READAHEAD_BYTES / 1024
        ),
        Err(e) => tracing::info!(
            "readahead window of {} left at the kernel's default: {e}",
            mp.display()
        ),
    }
}

/// The FUSE session's options: the user's `-o` list, plus `allow_other` as root and always
/// `default_permissions` (the kernel checks permissions; mirrorfs applies modes exactly).
/// Also returns that list as words, for `fuse::kernel_mount`.
fn fuse_config(a: &MountArgs, backing: &Path) -> (fuser::Config, Vec<String>) {
    let mut opts = vec![
        fuser::MountOption::FSName(backing.display().to_string()),
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
    opts.extend(user_opts.iter().map(|o| mount_option(o)));
    let mut config = fuser::Config::default();
    config.mount_options = opts;
    if root {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(a.threads.max(1));
    config.clone_fd = a.threads > 1;
    // SAFETY: umask has no preconditions; modes are applied exactly by mirrorfs itself.
    unsafe { libc::umask(0) };
    (config, user_opts)
}

fn mount_option(o: &str) -> fuser::MountOption {
    match o {
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
    }
}

/// One thread per mirror that needs an initial copy. A copy that fails marks its mirror for a
/// resync; one stopped by the shutdown is copied again at the next mount.
fn start_initial_copies(
    vol: &Arc<Volume>,
    backing: &Path,
    state: &StatePlace,
    to_sync: &[Arc<MirrorShared>],
    term: &Arc<AtomicBool>,
) -> Result<()> {
    for m in to_sync {
        let (v, b, t, m) = (vol.clone(), backing.to_path_buf(), term.clone(), m.clone());
        let h = Some(state.hidden.clone());
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
    Ok(())
}

/// Unmounts; when busy (a process still has something open on it), detaches lazily rather than
/// leave a dead mount behind when this process exits. `own`: mirrorfs mounted it itself (see
/// `open_session`), so it unmounts it itself, unless `umount` already did (the session ended).
fn unmount(bg: fuser::BackgroundSession, mountpoint: &Path, own: bool) {
    let r = if !own {
        tracing::info!("unmounting {}", mountpoint.display());
        bg.umount_and_join()
    } else if bg.guard.is_finished() {
        // Unmounted from outside (`umount MOUNTPOINT`), or the session failed: then a mount of
        // ours may be left, dead.
        if let Err(e) = bg.join() {
            tracing::warn!("the FUSE session ended with: {e}");
        }
        match sys::mount_entry(mountpoint) {
            Some((t, _)) if t == fuse::kernel_mount::FSTYPE => Err(std::io::Error::other(
                "the FUSE session ended with the mount still there",
            )),
            _ => Ok(()),
        }
    } else {
        tracing::info!("unmounting {}", mountpoint.display());
        match std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            Ok(c) if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 => bg.join(),
            Ok(_) => Err(std::io::Error::last_os_error()),
            Err(e) => Err(e.into()),
        }
    };
    let Err(e) = r else {
        return;
    };
    tracing::warn!(
        "unmount: {e}; detaching {} lazily (it disappears once nothing uses it)",
        mountpoint.display()
    );
    detach(mountpoint);
}

/// Detaches the mount at `mountpoint` lazily (`umount -l`), if there is one.
fn detach(mountpoint: &Path) {
    if !sys::is_mountpoint(mountpoint) {
        return;
    }
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
