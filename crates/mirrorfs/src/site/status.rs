//! `mirrorfs status` and `mirrorfs demo`. A running mount writes `STATE/status.json` twice a
//! second and registers itself in `/run/mirrorfs/`, which is how `status` finds it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use crate::site::volume::{lock, Volume};

const RUN_DIR: &str = "/run/mirrorfs";

#[derive(Serialize, Deserialize)]
struct Registration {
    mountpoint: PathBuf,
    backing: PathBuf,
    state: PathBuf,
    pid: u32,
}

pub struct Registered(PathBuf);

impl Drop for Registered {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Milliseconds since the epoch, for the age of a status.
pub fn now_ms() -> i64 {
    let t = crate::sys::now();
    t.sec * 1000 + i64::from(t.nsec / 1_000_000)
}

/// A status older than this means the process that writes it (twice a second) stopped running:
/// stopped by a signal, hung, or starved.
const STALE_AFTER_MS: i64 = 3_000;

pub fn register(mountpoint: &Path, backing: &Path, state: &Path) -> Result<Registered> {
    fs::create_dir_all(RUN_DIR).with_context(|| format!("cannot create {RUN_DIR}"))?;
    // Anyone may read the registrations (they only say where a mount's state is); only root
    // (or the mount's owner) may write them: a planted one could point `status` at forged
    // figures.
    {
        use std::os::unix::fs::PermissionsExt;
        let md = fs::symlink_metadata(RUN_DIR)?;
        if md.permissions().mode() & 0o022 != 0 {
            fs::set_permissions(RUN_DIR, fs::Permissions::from_mode(0o755))?;
        }
    }
    let file = Path::new(RUN_DIR).join(format!(
        "{:08x}.json",
        crc32c::crc32c(mountpoint.as_os_str().as_encoded_bytes())
    ));
    let reg = Registration {
        mountpoint: mountpoint.into(),
        backing: backing.into(),
        state: state.into(),
        pid: std::process::id(),
    };
    crate::site::statefile::replace(&file, &serde_json::to_vec_pretty(&reg)?, 0o644)
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(Registered(file))
}

#[derive(Serialize, Deserialize)]
struct MirrorStatus {
    path: String,
    #[serde(flatten)]
    phase: serde_json::Value,
    /// Last record applied to the mirror's tree.
    applied_seq: u64,
    /// Every record ≤ this is durable on the mirror (a local mirror: checkpointed in its tree;
    /// a remote one: in its journal).
    durable_seq: u64,
    /// Every record ≤ this is durably applied to the mirror's tree.
    #[serde(default)]
    checkpoint_seq: u64,
    /// Remote mirrors: last record handed to the socket, and acknowledged as received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sent_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    received_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    link: Option<crate::site::volume::LinkInfo>,
    lag_ops: u64,
    lag_bytes: u64,
    lag_seconds: f64,
    /// Errors met since the mount started, by kind (as `mirrorfs_mirror_errors_total`).
    #[serde(default)]
    errors_total: std::collections::BTreeMap<String, u64>,
    /// The last error of a remote mirror's connection, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct VolumeStatus {
    mountpoint: String,
    pid: u32,
    ack: String,
    #[serde(default)]
    quorum: usize,
    /// `--fsync-waits`: what an application's sync waits for on mirrors.
    #[serde(default)]
    fsync_waits: String,
    journal_next_seq: u64,
    journal_durable_seq: u64,
    journal_bytes: u64,
    journal_segments: usize,
    journal_error: Option<String>,
    mirrors: Vec<MirrorStatus>,
    /// Changes that exist durably nowhere but on this machine: lost if it died now.
    #[serde(default)]
    at_risk_ops: u64,
    #[serde(default)]
    at_risk_bytes: u64,
    updated_unix: i64,
    #[serde(default)]
    updated_unix_ms: i64,
    /// With `--witness`, while changes are refused: why and since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    read_only: Option<String>,
    /// Groups of changes open now (`mirrorfs group`), and the seq of the first one's
    /// `GroupBegin`: mirrors wait before it until the groups end.
    #[serde(default)]
    groups_open: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group_open_since_seq: Option<u64>,
    /// With `--fsync-groups`: the implicit groups of the changes between two syncs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fsync_groups: Option<FsyncGroupsStatus>,
    /// With `--write-tokens`: the gate, and why the last write was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    write_tokens: Option<crate::site::tokens::TokenStatus>,
    /// With `--receive`: the peer writable site's stream into this site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    peer_receive: Option<crate::site::peer::ReceiveStatus>,
    /// The record of paths changed since the mirrors' last verify (`site::verify_dirty`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    verify_changes: Option<crate::site::verify_dirty::Summary>,
}

/// `--fsync-groups` in `status`: how many groups began, and how they ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct FsyncGroupsStatus {
    begun: u64,
    ended_by_sync: u64,
    ended_by_age: u64,
    open: bool,
}

fn snapshot(vol: &Volume, mountpoint: &Path) -> VolumeStatus {
    let (next, durable, bytes, segs, err) = {
        let o = lock(&vol.order);
        (
            o.journal.next_seq(),
            o.journal.durable_seq(),
            o.journal.bytes(),
            o.journal.segment_count(),
            o.journal.poisoned().map(str::to_string),
        )
    };
    use crate::site::volume::Level;
    let mirrors = vol
        .mirrors
        .iter()
        .map(|m| {
            let applied = m.applied.load(Ordering::Acquire);
            let phase = serde_json::to_value(&*lock(&m.phase)).unwrap_or_default();
            let remote = m.remote.is_some();
            let durable = m.level(Level::Durable);
            // Separate statements: each lock guard must be dropped before the next is taken.
            let lag_bytes = lock(&vol.progress).bytes_after(applied);
            let lag_seconds = vol.lag_seconds(applied);
            MirrorStatus {
                path: m.name.clone(),
                phase,
                applied_seq: applied,
                durable_seq: durable,
                checkpoint_seq: m.level(Level::Checkpoint),
                sent_seq: remote.then(|| m.level(Level::Sent)),
                received_seq: remote.then(|| m.level(Level::Received)),
                link: remote.then(|| lock(&m.link).clone()),
                lag_ops: (next - 1).saturating_sub(applied),
                lag_bytes,
                lag_seconds,
                errors_total: lock(&m.errors)
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
                last_error: lock(&m.link).last_error.clone(),
            }
        })
        .collect::<Vec<_>>();
    let safe = vol
        .mirrors
        .iter()
        .map(|m| m.level(Level::Durable))
        .max()
        .unwrap_or(0);
    let at_risk_bytes = lock(&vol.progress).bytes_after(safe);
    let (groups_open, group_open_since_seq) = {
        let g = lock(&vol.groups);
        (g.open(), g.open_since())
    };
    VolumeStatus {
        mountpoint: mountpoint.display().to_string(),
        pid: std::process::id(),
        ack: vol.ack.to_string(),
        quorum: vol.quorum,
        fsync_waits: vol.fsync_waits.to_string(),
        journal_next_seq: next,
        journal_durable_seq: durable,
        journal_bytes: bytes,
        journal_segments: segs,
        journal_error: err,
        mirrors,
        at_risk_ops: (next - 1).saturating_sub(safe),
        at_risk_bytes,
        updated_unix: crate::sys::now().sec,
        updated_unix_ms: now_ms(),
        read_only: vol.fence.get().and_then(|f| f.read_only()),
        groups_open,
        group_open_since_seq,
        fsync_groups: vol.sync_groups.get().map(|c| {
            let st = c.stats();
            FsyncGroupsStatus {
                begun: st.begun,
                ended_by_sync: st.ended_by_sync,
                ended_by_age: st.ended_by_age,
                open: c.is_open(),
            }
        }),
        write_tokens: vol.tokens.get().map(|g| g.status()),
        peer_receive: vol.peer_receive.get().map(|r| lock(r).clone()),
        verify_changes: vol.verify_changes.get().map(|r| lock(r).clone()),
    }
}

pub fn write_status(vol: &Volume, mountpoint: &Path, state: &Path) {
    let s = snapshot(vol, mountpoint);
    if let Ok(bytes) = serde_json::to_vec_pretty(&s) {
        let _ = crate::site::statefile::replace(
            &crate::site::state_dir::StateDir::at(state).status_json(),
            &bytes,
            0o600,
        );
    }
}

pub fn writer(vol: Arc<Volume>, mountpoint: &Path, state: &Path, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        write_status(&vol, mountpoint, state);
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Whether the process behind a status still answers, from the status's age and the process's
/// run state. `None` when all is well. (No request is sent through the mount: a stopped or hung
/// mount would leave `status` itself waiting in the kernel, unkillable, for its answer.)
fn not_answering(pid: u32, age_ms: i64) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state is the first field after the parenthesised command name.
    let run_state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .unwrap_or("");
    if run_state == "T" || run_state == "t" {
        return Some(format!(
            "process {pid} is stopped (SIGSTOP or a debugger); its figures are {:.1} s old — `kill -CONT {pid}` resumes it",
            age_ms as f64 / 1e3
        ));
    }
    if run_state == "Z" || run_state == "X" {
        return Some(format!(
            "process {pid} has exited (it is a zombie waiting for its parent)"
        ));
    }
    if age_ms > STALE_AFTER_MS {
        return Some(format!(
            "its figures are {:.1} s old (written every 0.25 s): process {pid} is hung or starved",
            age_ms as f64 / 1e3
        ));
    }
    None
}

/// Reads a file that `status` may believe (see `statefile::trustworthy`).
fn read_trusted(p: &Path, denied: &mut Vec<PathBuf>) -> Option<Vec<u8>> {
    let md = fs::metadata(p).ok()?;
    if !crate::site::statefile::trustworthy(&md) {
        tracing::warn!(
            "ignoring {}: writable by others or owned by another user",
            p.display()
        );
        return None;
    }
    match fs::read(p) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            denied.push(p.to_path_buf());
            None
        }
        Err(_) => None,
    }
}

/// `mirrorfs status [MOUNTPOINT] [--json]`: the running mounts and mirror daemons (only the one
/// at `mountpoint` if given), as JSON or as text.
pub fn show(mountpoint: Option<&Path>, json: bool) -> Result<()> {
    let want = mountpoint.map(|m| m.canonicalize().unwrap_or_else(|_| m.to_path_buf()));
    let mut denied = Vec::new();
    let found = find_running(want.as_deref(), &mut denied);
    if found.is_empty() {
        return Err(none_found(want.as_deref(), &denied));
    }
    if json {
        let v = if found.len() == 1 {
            serde_json::to_value(&found[0])?
        } else {
            serde_json::to_value(&found)?
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for v in &found {
        if v.get("role").and_then(|r| r.as_str()) == Some("mirror") {
            print_mirror_daemon(v);
            continue;
        }
        print_volume(v)?;
    }
    Ok(())
}

/// The statuses of the registered processes still running (at `want` only, if given), each
/// with whether it still answers; files `status` may not read are added to `denied`.
fn find_running(want: Option<&Path>, denied: &mut Vec<PathBuf>) -> Vec<serde_json::Value> {
    registrations(denied)
        .into_iter()
        .filter(|r| want.is_none_or(|w| w == r.mountpoint.as_path()))
        .filter_map(|r| read_running(&r, denied))
        .collect()
}

/// A running mount or mirror daemon, as it registered itself in `/run/mirrorfs/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// A mount's mountpoint; a daemon's directory.
    pub mountpoint: PathBuf,
    /// A mount's backing directory; a daemon's directory again.
    pub backing: PathBuf,
    pub state: PathBuf,
    pub pid: u32,
}

impl Running {
    /// A mirror daemon registers its directory as both mountpoint and backing.
    pub fn is_daemon(&self) -> bool {
        self.mountpoint == self.backing
    }
}

/// The registered processes still running: every one, or (given `within`, an absolute path
/// with its symlinks resolved) the one whose mountpoint holds it — the deepest, for a mount
/// inside another. An error says why none was found (none running there, or a registration
/// this user may not read).
pub fn registered(within: Option<&Path>) -> Result<Vec<Running>> {
    let mut denied = Vec::new();
    let all = registrations(&mut denied);
    let Some(p) = within else {
        return Ok(all);
    };
    match containing(&all, p) {
        Some(r) => Ok(vec![r.clone()]),
        None => Err(none_found(Some(p), &denied)),
    }
}

/// The one of `all` whose mountpoint is `path` or holds it, the deepest if several do.
pub fn containing<'a>(all: &'a [Running], path: &Path) -> Option<&'a Running> {
    all.iter()
        .filter(|r| path.starts_with(&r.mountpoint))
        .max_by_key(|r| r.mountpoint.components().count())
}

/// The registrations in `/run/mirrorfs/` that are trusted and whose process still runs; files
/// this user may not read are added to `denied`.
fn registrations(denied: &mut Vec<PathBuf>) -> Vec<Running> {
    let mut found = Vec::new();
    if let Ok(rd) = fs::read_dir(RUN_DIR) {
        for e in rd.flatten() {
            let Some(bytes) = read_trusted(&e.path(), denied) else {
                continue;
            };
            let Ok(reg) = serde_json::from_slice::<Registration>(&bytes) else {
                continue;
            };
            if Path::new(&format!("/proc/{}", reg.pid)).exists() {
                found.push(Running {
                    mountpoint: reg.mountpoint,
                    backing: reg.backing,
                    state: reg.state,
                    pid: reg.pid,
                });
            }
        }
    }
    found
}

/// The status of the running process `reg`, if its status is readable and trusted.
fn read_running(reg: &Running, denied: &mut Vec<PathBuf>) -> Option<serde_json::Value> {
    let s = read_trusted(&reg.state.join("status.json"), denied)?;
    let mut v = serde_json::from_slice::<serde_json::Value>(&s).ok()?;
    let daemon = v.get("role").and_then(|r| r.as_str()) == Some("mirror");
    if !daemon && serde_json::from_value::<VolumeStatus>(v.clone()).is_err() {
        return None;
    }
    let updated_ms = v["updated_unix_ms"]
        .as_i64()
        .filter(|&t| t > 0)
        .or_else(|| v["updated_unix"].as_i64().map(|t| t * 1000))
        .unwrap_or(0);
    let age_ms = (now_ms() - updated_ms).max(0);
    let problem = not_answering(reg.pid, age_ms);
    v["status_age_seconds"] = serde_json::json!(age_ms as f64 / 1e3);
    v["answering"] = serde_json::json!(problem.is_none());
    v["errors"] = serde_json::json!(errors_of(&v, problem.as_deref()));
    v["not_answering"] = serde_json::json!(problem);
    if !daemon {
        // Conflicts left by reintegrations, until someone settles them (`mirrorfs conflicts`).
        let n = crate::site::conflicts::list(&reg.state).map(|c| c.len());
        v["conflicts"] = match n {
            Ok(n) => serde_json::json!(n),
            Err(e) => serde_json::json!(format!("unreadable: {e:#}")),
        };
    }
    Some(v)
}

/// Why `status` found nothing: a state it may not read, or no mount (at `want`).
fn none_found(want: Option<&Path>, denied: &[PathBuf]) -> anyhow::Error {
    if let Some(p) = denied.first() {
        return anyhow!(
            "cannot read {}: permission denied (a mount's state is readable by its owner only: run `mirrorfs status` as that user, usually root)",
            p.display()
        );
    }
    match want {
        Some(w) => anyhow!(
            "no running mirrorfs mount at {} (is it mounted? start it with `mirrorfs mount`)",
            w.display()
        ),
        None => anyhow!("no running mirrorfs mounts"),
    }
}

/// Every problem a status shows, in words, for `--json`'s `errors` (empty when all is well):
/// the process not answering, the journal's error, read-only, each mirror not live or syncing
/// with its reason, a refused primary.
fn errors_of(v: &serde_json::Value, not_answering: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(w) = not_answering {
        out.push(format!("not answering: {w}"));
    }
    let s = |k: &str| v.get(k).and_then(|x| x.as_str());
    if let Some(e) = s("journal_error") {
        out.push(format!("journal: {e}"));
    }
    if let Some(r) = s("read_only") {
        out.push(format!("read-only: {r}"));
    }
    if let Some(t) = v.get("write_tokens") {
        if t.get("connected").and_then(|c| c.as_bool()) == Some(false) {
            out.push(format!(
                "write tokens: the link to the peer is down: writes to files whose token is at the peer are {}",
                if t.get("policy").and_then(|p| p.as_str()) == Some("reconcile") {
                    "made without it (reconcile)"
                } else {
                    "refused with EROFS (read-only)"
                }
            ));
        }
        if let Some(f) = t.get("failed").and_then(|f| f.as_str()) {
            out.push(format!("write tokens failed: {f}"));
        }
    }
    if let Some(r) = s("refused") {
        out.push(format!("refused the last primary: {r}"));
    }
    for m in v
        .get("mirrors")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
    {
        let state = m.get("state").and_then(|x| x.as_str()).unwrap_or("?");
        if state == "live" || state == "syncing" {
            continue;
        }
        let path = m.get("path").and_then(|x| x.as_str()).unwrap_or("?");
        out.push(format!(
            "mirror {path}: {state}{}",
            reason_of(m).map(|r| format!(": {r}")).unwrap_or_default()
        ));
    }
    out
}

/// Why a mirror is in its state (the phase's error or reason), if it says.
fn reason_of(phase: &serde_json::Value) -> Option<&str> {
    phase
        .get("error")
        .or_else(|| phase.get("reason"))
        .and_then(|v| v.as_str())
}

/// `1.5 KiB`, `3.0 MiB`: a byte count a person reads at a glance.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `12 s`, `4 min`, `3 h`: how long ago `since_unix` was.
fn ago(since_unix: u64) -> String {
    let secs = (crate::sys::now().sec.max(0) as u64).saturating_sub(since_unix);
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        _ => format!("{} h", secs / 3600),
    }
}

/// A mount's status as text, like `drbdadm status`: the volume on one line (with the age of
/// its figures), its journal, then one line per mirror: state, lag in seconds and what it is
/// behind, and the reason when it is not live.
fn print_volume(v: &serde_json::Value) -> Result<()> {
    let s: VolumeStatus = serde_json::from_value(v.clone())?;
    let age = v["status_age_seconds"].as_f64().unwrap_or(0.0);
    println!(
        "{} role:primary pid:{} ack:{} quorum:{} fsync-waits:{}  (figures {age:.1} s old)",
        s.mountpoint, s.pid, s.ack, s.quorum, s.fsync_waits
    );
    print_not_answering(v);
    if let Some(r) = &s.read_only {
        println!("  read-only: {r}");
    }
    if let Some(r) = &s.peer_receive {
        println!(
            "  peer stream in (on {}): {}, its records applied through {}{}",
            r.listen,
            if r.connected {
                "connected"
            } else {
                "not connected"
            },
            r.applied,
            if r.failed > 0 {
                format!(", {} failed here (journaled with their abort)", r.failed)
            } else {
                String::new()
            }
        );
        if let Some(c) = &r.copy {
            println!(
                "  receiving the initial copy from {}: {} bytes of data so far ({} shows the total); changes through the mount are refused (EROFS) until it is complete",
                c.from, c.bytes, c.from
            );
        }
        if let (false, Some(e)) = (r.connected, &r.last_error) {
            println!("  peer stream in, last error: {e}");
        }
    }
    if let Some(t) = &s.write_tokens {
        println!(
            "  write tokens: site {} (peer {}{}), link {}, {} across a split; {} token(s) in the table, {} write(s) waited, {} refused",
            t.site,
            t.peer,
            if t.home { ", home of the tokens" } else { "" },
            if t.connected { "up" } else { "down" },
            t.policy,
            t.entries,
            t.writes_parked,
            t.writes_refused
        );
        if let Some(q) = &t.quorum {
            println!("  witness quorum: {q}");
        }
        if let Some(r) = &t.last_refusal {
            println!("  last write refused: {r}");
        }
        if let Some(f) = &t.failed {
            println!("  write tokens failed: {f}");
        }
    }
    if let Some(since) = s.group_open_since_seq {
        println!(
            "  groups: {} open since record {since}: mirrors wait before it until they end (`mirrorfs group end {}`)",
            s.groups_open, s.mountpoint
        );
    }
    if let Some(f) = &s.fsync_groups {
        println!(
            "  fsync groups: {} begun, {} ended by a sync, {} by age{}",
            f.begun,
            f.ended_by_sync,
            f.ended_by_age,
            if f.open { "; one open" } else { "" }
        );
    }
    println!(
        "  journal: {} in {} segment(s), last record {}, durable through {}{}",
        human_bytes(s.journal_bytes),
        s.journal_segments,
        s.journal_next_seq - 1,
        s.journal_durable_seq,
        s.journal_error
            .as_ref()
            .map(|e| format!(", ERROR: {e}"))
            .unwrap_or_default()
    );
    if let Some(c) = &s.verify_changes {
        match &c.full_verify_because {
            Some(why) => println!(
                "  verify: {} path(s) changed since the last verify; the next verify is a full one ({why})",
                c.paths
            ),
            None => println!(
                "  verify: {} path(s) changed since the last verify (the next one compares only them)",
                c.paths
            ),
        }
    }
    println!(
        "  at risk if this machine died now: {} change(s), {} (durable on no mirror)",
        s.at_risk_ops,
        human_bytes(s.at_risk_bytes)
    );
    match &v["conflicts"] {
        serde_json::Value::Number(n) if n.as_u64() != Some(0) => println!(
            "  conflicts: {n} left by reintegrations (both versions kept): `mirrorfs conflicts {}`",
            s.mountpoint
        ),
        serde_json::Value::String(e) => println!("  conflicts: {e}"),
        _ => {}
    }
    let width = s
        .mirrors
        .iter()
        .map(|m| m.path.len())
        .max()
        .unwrap_or(0)
        .max(6);
    for m in &s.mirrors {
        print_mirror(m, width);
    }
    Ok(())
}

/// One mirror of a mount on one line: where, state, lag in seconds, what it is behind by, the
/// link for a remote one, and the reason when it is not live.
fn print_mirror(m: &MirrorStatus, width: usize) {
    let state = m.phase.get("state").and_then(|v| v.as_str()).unwrap_or("?");
    let since = m
        .phase
        .get("since_unix")
        .and_then(|v| v.as_u64())
        .map(|t| format!(" for {}", ago(t)))
        .unwrap_or_default();
    let detail = match state {
        "reintegrating" => {
            let n = |k: &str| m.phase.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            format!(
                "  split brain: its changes are being taken into this primary, step {} of {}, {} conflict(s) listed",
                n("done_steps"),
                n("total_steps"),
                n("conflicts")
            )
        }
        "syncing" => {
            let n = |k: &str| m.phase.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            format!(
                "  initial copy {} of {}",
                human_bytes(n("done_bytes")),
                human_bytes(n("total_bytes"))
            )
        }
        _ => reason_of(&m.phase)
            .map(|r| format!("  reason{since}: {r}"))
            .unwrap_or_default(),
    };
    let link = m
        .link
        .as_ref()
        .map(|l| {
            format!(
                " link:{}{}",
                if l.connected { "connected" } else { "down" },
                if l.transport.is_empty() {
                    String::new()
                } else {
                    format!("/{}", l.transport)
                }
            )
        })
        .unwrap_or_default();
    println!(
        "  {:<width$} {state:<13} lag:{:.3}s behind:{} record(s)/{} applied:{} durable:{}{link}{detail}",
        m.path,
        m.lag_seconds,
        m.lag_ops,
        human_bytes(m.lag_bytes),
        m.applied_seq,
        m.durable_seq
    );
}

fn print_not_answering(v: &serde_json::Value) {
    if let Some(why) = v["not_answering"].as_str() {
        println!("  NOT ANSWERING: {why}; the figures below are from then");
    }
}

fn print_mirror_daemon(v: &serde_json::Value) {
    let g = |k: &str| v.get(k).cloned().unwrap_or_default();
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let age = v["status_age_seconds"].as_f64().unwrap_or(0.0);
    let dir = g("dir");
    let dir = dir.as_str().unwrap_or("?");
    println!(
        "{dir} role:mirror pid:{} copy:{} volume:{} generation:{}  (figures {age:.1} s old)",
        n("pid"),
        g("copy").as_str().unwrap_or("?"),
        g("volume_id").as_str().unwrap_or("-"),
        n("generation")
    );
    print_not_answering(v);
    let phase = g("phase");
    let state = phase.get("state").and_then(|s| s.as_str()).unwrap_or("?");
    println!(
        "  {dir} {state} lag:{:.3}s behind:{} record(s) received:{} durable:{} applied:{} checkpoint:{} primary:{}{}",
        v.get("lag_seconds").and_then(|x| x.as_f64()).unwrap_or(0.0),
        n("lag_ops"),
        n("received_seq"),
        n("durable_seq"),
        n("applied_seq"),
        n("checkpoint_seq"),
        g("primary").as_str().unwrap_or("not connected"),
        reason_of(&phase).map(|r| format!("  reason: {r}")).unwrap_or_default()
    );
    println!(
        "  journal: {} in {} segment(s)",
        human_bytes(n("journal_bytes")),
        n("journal_segments")
    );
    if let Some(u) = v.get("udp").filter(|u| u.is_object()) {
        let c = |k: &str| u.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        println!(
            "  UDP port {}: {} packets, {} records, {} rebuilt by FEC, {} NAK entries; dropped {} unauthentic, {} replayed, {} malformed, {} of other sessions, {} invalid",
            n("udp_port"),
            c("packets"),
            c("records"),
            c("recovered"),
            c("nak_entries"),
            c("dropped_unauthentic"),
            c("dropped_replayed"),
            c("dropped_malformed"),
            c("dropped_other_session"),
            c("dropped_invalid")
        );
    }
    if let Some(r) = v.get("reintegration").and_then(|r| r.as_str()) {
        println!("  reintegration: {r}");
    }
    if let Some(r) = v.get("refused").and_then(|r| r.as_str()) {
        println!("  REFUSED the last primary: {r}");
    }
}

/// Prometheus text exposition of a mount's state (names in docs/metrics.md).
pub fn metrics_text(vol: &Volume, mountpoint: &Path, state: &Path) -> String {
    use crate::site::metrics::Exposition;
    let s = snapshot(vol, mountpoint);
    let mut x = Exposition::default();
    x.one(
        "journal_last_seq",
        "gauge",
        "Seq of the last journal record.",
        (s.journal_next_seq - 1) as f64,
    );
    x.one(
        "journal_durable_seq",
        "gauge",
        "Every journal record up to this seq is durable in this process's journal.",
        s.journal_durable_seq as f64,
    );
    x.one(
        "journal_size_bytes",
        "gauge",
        "Bytes of journal on disk.",
        s.journal_bytes as f64,
    );
    x.one(
        "journal_segments",
        "gauge",
        "Journal segment files on disk.",
        s.journal_segments as f64,
    );
    x.one(
        "journal_poisoned",
        "gauge",
        "1 once a journal write or fsync failed: the mount refuses changes until it is restarted.",
        f64::from(u8::from(s.journal_error.is_some())),
    );
    x.one(
        "groups_open",
        "gauge",
        "Groups of changes open now (mirrorfs group): mirrors wait before the first until they end.",
        f64::from(s.groups_open),
    );
    x.one(
        "at_risk_records",
        "gauge",
        "Journal records durable on no mirror (lost if this machine died now).",
        s.at_risk_ops as f64,
    );
    x.one(
        "at_risk_bytes",
        "gauge",
        "Data bytes durable on no mirror.",
        s.at_risk_bytes as f64,
    );
    if vol.fence.get().is_some() {
        x.one(
            "read_only",
            "gauge",
            "1 while changes fail with EROFS because the witness granted no valid write lease.",
            f64::from(u8::from(s.read_only.is_some())),
        );
    }
    if let Ok(c) = crate::site::conflicts::list(state) {
        x.one(
            "conflicts_unresolved",
            "gauge",
            "Conflicts left by reintegrations (both versions kept) that nobody settled yet (mirrorfs conflicts).",
            c.len() as f64,
        );
    }
    let mirrors: Vec<(&str, &crate::site::volume::MirrorShared)> = vol
        .mirrors
        .iter()
        .map(|m| (m.name.as_str(), &**m))
        .collect();
    crate::site::metrics::mirror_families(&mut x, &mirrors);
    let per = |f: &dyn Fn(&MirrorStatus) -> f64| -> Vec<(Vec<(&str, &str)>, f64)> {
        s.mirrors
            .iter()
            .map(|m| (vec![("mirror", m.path.as_str())], f(m)))
            .collect()
    };
    x.family(
        "mirror_durable_seq",
        "gauge",
        "Every journal record up to this seq is durable on the mirror.",
        &per(&|m| m.durable_seq as f64),
    );
    x.family(
        "mirror_lag_records",
        "gauge",
        "Journal records not yet applied on the mirror.",
        &per(&|m| m.lag_ops as f64),
    );
    x.family(
        "mirror_lag_bytes",
        "gauge",
        "Data bytes not yet applied on the mirror.",
        &per(&|m| m.lag_bytes as f64),
    );
    x.family(
        "mirror_lag_seconds",
        "gauge",
        "Age of the oldest journal record not yet applied on the mirror (0 when it is caught up).",
        &per(&|m| m.lag_seconds),
    );
    let remote: Vec<&MirrorStatus> = s.mirrors.iter().filter(|m| m.link.is_some()).collect();
    if !remote.is_empty() {
        let link =
            |f: &dyn Fn(&crate::site::volume::LinkInfo) -> f64| -> Vec<(Vec<(&str, &str)>, f64)> {
                remote
                    .iter()
                    .filter_map(|m| {
                        m.link
                            .as_ref()
                            .map(|l| (vec![("mirror", m.path.as_str())], f(l)))
                    })
                    .collect()
            };
        x.family(
            "mirror_sent_bytes_total",
            "counter",
            "Bytes sent to the remote mirror on its connections (TLS payload) since this process started.",
            &link(&|l| (l.bytes_sent_before + l.bytes_sent) as f64),
        );
        x.family(
            "mirror_received_bytes_total",
            "counter",
            "Bytes received from the remote mirror on its connections since this process started.",
            &link(&|l| (l.bytes_received_before + l.bytes_received) as f64),
        );
        x.family(
            "mirror_reconnects_total",
            "counter",
            "Connections to the remote mirror that ended (and were made again) since this process started.",
            &link(&|l| l.reconnects as f64),
        );
        x.family(
            "mirror_connected",
            "gauge",
            "1 while the connection to the remote mirror is up.",
            &link(&|l| f64::from(u8::from(l.connected))),
        );
    }
    x.finish()
}
