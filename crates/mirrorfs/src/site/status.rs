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

/// A mount's status as text: the volume, its journal, then each mirror.
fn print_volume(v: &serde_json::Value) -> Result<()> {
    let s: VolumeStatus = serde_json::from_value(v.clone())?;
    println!(
        "{} (pid {}, ack {}, quorum {}, fsync waits for the {})",
        s.mountpoint,
        s.pid,
        s.ack,
        s.quorum,
        if s.fsync_waits == "quorum" {
            "quorum"
        } else {
            "mode"
        }
    );
    print_not_answering(v);
    if let Some(r) = &s.read_only {
        println!("  read-only: {r}");
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
        "  at risk if this machine died now: {} change(s), {} bytes (durable on no mirror)",
        s.at_risk_ops, s.at_risk_bytes
    );
    println!(
        "  journal: {} bytes in {} segment(s), last seq {}, durable through {}{}",
        s.journal_bytes,
        s.journal_segments,
        s.journal_next_seq - 1,
        s.journal_durable_seq,
        s.journal_error
            .as_ref()
            .map(|e| format!(", ERROR: {e}"))
            .unwrap_or_default()
    );
    match &v["conflicts"] {
        serde_json::Value::Number(n) if n.as_u64() != Some(0) => println!(
            "  conflicts: {n} left by reintegrations (both versions kept): `mirrorfs conflicts {}`",
            s.mountpoint
        ),
        serde_json::Value::String(e) => println!("  conflicts: {e}"),
        _ => {}
    }
    for m in &s.mirrors {
        print_mirror(m);
    }
    Ok(())
}

/// One mirror of a mount as text: its phase and lag, and its link if it is remote.
fn print_mirror(m: &MirrorStatus) {
    let state = m.phase.get("state").and_then(|v| v.as_str()).unwrap_or("?");
    let detail = m
        .phase
        .get("error")
        .or_else(|| m.phase.get("reason"))
        .and_then(|v| v.as_str())
        .map(|e| format!(" ({e})"))
        .unwrap_or_default();
    let detail = match state {
        "reintegrating" => {
            let n = |k: &str| m.phase.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            format!(
                " (split brain: its changes are being taken into this primary, step {} of {}, {} conflict(s) listed)",
                n("done_steps"),
                n("total_steps"),
                n("conflicts")
            )
        }
        _ => detail,
    };
    println!(
        "  mirror {}: {state}{detail}; applied {} (durable {}), lag {} ops / {} bytes / {:.3} s",
        m.path, m.applied_seq, m.durable_seq, m.lag_ops, m.lag_bytes, m.lag_seconds
    );
    if let Some(l) = &m.link {
        println!(
            "    link: {}{}, peer {}, sent {} / received {} / durable {} / applied {}, {} bytes out, {} in, {} reconnect(s){}",
            if l.connected { "connected" } else { "disconnected" },
            if l.transport.is_empty() {
                String::new()
            } else {
                format!(" over {}", l.transport)
            },
            l.peer.as_deref().unwrap_or("-"),
            m.sent_seq.unwrap_or(0),
            m.received_seq.unwrap_or(0),
            m.durable_seq,
            m.applied_seq,
            l.bytes_sent,
            l.bytes_received,
            l.reconnects,
            if l.compress { ", zstd" } else { "" }
        );
    }
}

fn print_not_answering(v: &serde_json::Value) {
    if let Some(why) = v["not_answering"].as_str() {
        println!("  NOT ANSWERING: {why}; the figures below are from then");
    }
}

fn print_mirror_daemon(v: &serde_json::Value) {
    let g = |k: &str| v.get(k).cloned().unwrap_or_default();
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    println!(
        "{} (mirror daemon, pid {}): copy {} of volume {} generation {}",
        g("dir").as_str().unwrap_or("?"),
        n("pid"),
        g("copy").as_str().unwrap_or("?"),
        g("volume_id").as_str().unwrap_or("-"),
        n("generation")
    );
    print_not_answering(v);
    println!(
        "  primary: {}",
        g("primary").as_str().unwrap_or("not connected")
    );
    println!(
        "  received {} / durable {} / applied {} / checkpoint {}; journal {} bytes in {} segment(s)",
        n("received_seq"),
        n("durable_seq"),
        n("applied_seq"),
        n("checkpoint_seq"),
        n("journal_bytes"),
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

/// Prometheus text exposition of a mount's state.
pub fn metrics_text(vol: &Volume, mountpoint: &Path) -> String {
    let s = snapshot(vol, mountpoint);
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, rows: Vec<(String, f64)>| {
        out.push_str(&format!(
            "# HELP mirrorfs_{name} {help}\n# TYPE mirrorfs_{name} gauge\n"
        ));
        for (labels, v) in rows {
            out.push_str(&format!("mirrorfs_{name}{labels} {v}\n"));
        }
    };
    gauge(
        "journal_last_seq",
        "Seq of the last journal record.",
        vec![(String::new(), (s.journal_next_seq - 1) as f64)],
    );
    gauge(
        "journal_durable_seq",
        "Every journal record up to this seq is durable.",
        vec![(String::new(), s.journal_durable_seq as f64)],
    );
    gauge(
        "groups_open",
        "Groups of changes open now (mirrorfs group): mirrors wait before the first until they end.",
        vec![(String::new(), f64::from(s.groups_open))],
    );
    gauge(
        "journal_bytes",
        "Bytes of journal on disk.",
        vec![(String::new(), s.journal_bytes as f64)],
    );
    gauge(
        "at_risk_ops",
        "Changes durable on no mirror (lost if this machine died now).",
        vec![(String::new(), s.at_risk_ops as f64)],
    );
    gauge(
        "at_risk_bytes",
        "Data bytes durable on no mirror.",
        vec![(String::new(), s.at_risk_bytes as f64)],
    );
    if vol.fence.get().is_some() {
        gauge(
            "read_only",
            "1 while changes fail with EROFS because the witness granted no valid write lease.",
            vec![(String::new(), f64::from(u8::from(s.read_only.is_some())))],
        );
    }
    let per = |f: &dyn Fn(&MirrorStatus) -> f64| -> Vec<(String, f64)> {
        s.mirrors
            .iter()
            .map(|m| (format!("{{mirror=\"{}\"}}", m.path.replace('"', "'")), f(m)))
            .collect()
    };
    gauge(
        "mirror_applied_seq",
        "Last record applied on the mirror.",
        per(&|m| m.applied_seq as f64),
    );
    gauge(
        "mirror_durable_seq",
        "Every record up to this is durable on the mirror.",
        per(&|m| m.durable_seq as f64),
    );
    gauge(
        "mirror_lag_ops",
        "Records not yet applied on the mirror.",
        per(&|m| m.lag_ops as f64),
    );
    gauge(
        "mirror_lag_bytes",
        "Data bytes not yet applied on the mirror.",
        per(&|m| m.lag_bytes as f64),
    );
    gauge(
        "mirror_lag_seconds",
        "Age of the oldest record not applied on the mirror.",
        per(&|m| m.lag_seconds),
    );
    gauge(
        "mirror_healthy",
        "1 if the mirror is live or syncing (and, for a remote one, connected).",
        per(&|m| {
            let st = m.phase.get("state").and_then(|v| v.as_str()).unwrap_or("");
            f64::from(u8::from(st == "live" || st == "syncing"))
        }),
    );
    out
}

/// Serves `GET /metrics` (any path, in fact) on `addr` with the text `render` makes, until the
/// process ends. One request at a time; requests are bounded to 8 KiB and 2 s.
pub fn serve_metrics(addr: &str, render: Arc<dyn Fn() -> String + Send + Sync>) -> Result<()> {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    tracing::info!("metrics on http://{addr}/metrics");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { continue };
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
                let mut req = [0u8; 8192];
                let mut n = 0;
                while n < req.len() {
                    match c.read(&mut req[n..]) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            n += k;
                            if req[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
                let body = render();
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    body.len(),
                    body
                );
            }
        })?;
    Ok(())
}
