//! The Prometheus endpoint (`mount --metrics ADDR`, `serve --metrics ADDR`) and the text
//! exposition format it serves. The names follow Prometheus's conventions: counters end in
//! `_total`, gauges carry their unit (`_seconds`, `_bytes`), the mirror is a label, and a
//! mirror's state is a state set (`mirrorfs_mirror_state{state="live"} 1`, the others 0). The
//! mount and the mirror daemon use the same name for the same thing: `mirrorfs_mirror_*` is
//! always about a mirror's copy (the daemon reports on its own directory), `mirrorfs_journal_*`
//! about the journal of the process that serves them. docs/metrics.md lists every name.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::site::volume::{lock, MirrorPhase, MirrorShared};

/// The states a mirror can be in, as the `state` label takes them (`MirrorPhase`'s names).
pub const MIRROR_STATES: [&str; 7] = [
    "syncing",
    "live",
    "retrying",
    "refused",
    "needs_resync",
    "reintegrating",
    "stopped",
];

/// The name of a mirror's state, as `status` and the `state` label show it.
pub fn state_name(p: &MirrorPhase) -> &'static str {
    match p {
        MirrorPhase::Syncing { .. } => "syncing",
        MirrorPhase::Live => "live",
        MirrorPhase::Retrying { .. } => "retrying",
        MirrorPhase::Refused { .. } => "refused",
        MirrorPhase::NeedsResync { .. } => "needs_resync",
        MirrorPhase::Reintegrating { .. } => "reintegrating",
        MirrorPhase::Stopped => "stopped",
    }
}

/// Metric families being written, each with its `# HELP` and `# TYPE` once.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

/// A label value, escaped as the text format asks (`\`, `"` and line breaks).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Exposition {
    /// A family: `kind` is `counter` or `gauge`; each sample is its labels and its value.
    pub fn family(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: &[(Vec<(&str, &str)>, f64)],
    ) {
        debug_assert!(kind != "counter" || name.ends_with("_total"), "{name}");
        let _ = writeln!(self.out, "# HELP mirrorfs_{name} {help}");
        let _ = writeln!(self.out, "# TYPE mirrorfs_{name} {kind}");
        for (labels, v) in samples {
            let l = if labels.is_empty() {
                String::new()
            } else {
                let inner: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                format!("{{{}}}", inner.join(","))
            };
            let _ = writeln!(self.out, "mirrorfs_{name}{l} {v}");
        }
    }

    /// A family with one unlabelled sample.
    pub fn one(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.family(name, kind, help, &[(Vec::new(), v)]);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// The families every process writes about its mirrors (a mount: each mirror; a daemon: its own
/// copy): positions, state, records applied, bytes applied, errors by kind.
pub fn mirror_families(x: &mut Exposition, mirrors: &[(&str, &MirrorShared)]) {
    let per = |f: &dyn Fn(&MirrorShared) -> f64| -> Vec<(Vec<(&str, &str)>, f64)> {
        mirrors
            .iter()
            .map(|(name, m)| (vec![("mirror", *name)], f(m)))
            .collect()
    };
    x.family(
        "mirror_applied_seq",
        "gauge",
        "Seq of the last journal record applied to the mirror's tree.",
        &per(&|m| m.applied.load(Ordering::Acquire) as f64),
    );
    x.family(
        "mirror_records_applied_total",
        "counter",
        "Journal records applied to the mirror's tree since this process started.",
        &per(&|m| m.records_applied.load(Ordering::Relaxed) as f64),
    );
    x.family(
        "mirror_applied_bytes_total",
        "counter",
        "Data bytes (file contents written) applied to the mirror's tree since this process started.",
        &per(&|m| m.applied_bytes.load(Ordering::Relaxed) as f64),
    );
    let mut states = Vec::new();
    for (name, m) in mirrors {
        let now = state_name(&lock(&m.phase));
        for s in MIRROR_STATES {
            states.push((
                vec![("mirror", *name), ("state", s)],
                f64::from(u8::from(s == now)),
            ));
        }
    }
    x.family(
        "mirror_state",
        "gauge",
        "1 for the state the mirror is in, 0 for the others (syncing, live, retrying, refused, needs_resync, reintegrating, stopped).",
        &states,
    );
    x.family(
        "mirror_up",
        "gauge",
        "1 while the mirror is live or syncing.",
        &per(&|m| f64::from(u8::from(m.healthy()))),
    );
    let mut errors = Vec::new();
    let counts: Vec<_> = mirrors
        .iter()
        .map(|(name, m)| (*name, lock(&m.errors).clone()))
        .collect();
    for (name, c) in &counts {
        for kind in ERROR_KINDS {
            errors.push((
                vec![("mirror", *name), ("kind", kind)],
                c.get(kind).copied().unwrap_or(0) as f64,
            ));
        }
    }
    x.family(
        "mirror_errors_total",
        "counter",
        "Errors met by the mirror since this process started, by kind: apply (a change could not be applied; retried), journal_read, diverged (the copy left the primary's history), link (a connection to a remote mirror ended with an error).",
        &errors,
    );
}

/// The kinds of `mirrorfs_mirror_errors_total`, always all shown (a counter that appears only
/// after its first error defeats `rate()`).
pub const ERROR_KINDS: [&str; 4] = ["apply", "journal_read", "diverged", "link"];

/// Serves `GET /metrics` on `addr` with the text `render` makes, until the process ends; any
/// other path or method gets 404 or 405. One request at a time; a request is bounded to 8 KiB
/// and 2 s.
pub fn serve(addr: &str, render: Arc<dyn Fn() -> String + Send + Sync>) -> Result<()> {
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
                let (status, kind, body) = match request_line(&req[..n]) {
                    Some(("GET" | "HEAD", "/metrics")) => {
                        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render())
                    }
                    Some(("GET" | "HEAD", _)) => (
                        "404 Not Found",
                        "text/plain; charset=utf-8",
                        "not found: the metrics are at /metrics\n".to_string(),
                    ),
                    Some(_) => (
                        "405 Method Not Allowed",
                        "text/plain; charset=utf-8",
                        "only GET /metrics\n".to_string(),
                    ),
                    None => (
                        "400 Bad Request",
                        "text/plain; charset=utf-8",
                        "bad request\n".to_string(),
                    ),
                };
                let head = matches!(request_line(&req[..n]), Some(("HEAD", _)));
                let _ = write!(
                    c,
                    "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    body.len(),
                    if head { "" } else { body.as_str() }
                );
            }
        })?;
    Ok(())
}

/// The method and the path (without a query) of an HTTP request's first line.
fn request_line(req: &[u8]) -> Option<(&str, &str)> {
    let line = req.split(|&b| b == b'\r' || b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    parts.next()?.starts_with("HTTP/").then_some(())?;
    Some((method, target.split('?').next().unwrap_or(target)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            request_line(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            request_line(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(request_line(b"garbage"), None);
    }

    /// Every metric the dashboard queries is one docs/metrics.md lists.
    #[test]
    fn the_dashboard_queries_documented_metrics() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/");
        let dash =
            std::fs::read_to_string(format!("{root}grafana-dashboard.json")).expect("dashboard");
        let doc = std::fs::read_to_string(format!("{root}metrics.md")).expect("metrics.md");
        let v: serde_json::Value = serde_json::from_str(&dash).expect("the dashboard is JSON");
        assert!(v["panels"].as_array().is_some_and(|p| p.len() >= 3));
        let mut names = 0;
        for (i, _) in dash.match_indices("mirrorfs_") {
            let name: String = dash[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            assert!(
                doc.contains(&format!("`{name}`")),
                "{name} is not in docs/metrics.md"
            );
            names += 1;
        }
        assert!(names >= 8, "{names}");
    }

    #[test]
    fn labels_are_escaped() {
        let mut x = Exposition::default();
        x.family(
            "a_total",
            "counter",
            "h",
            &[(vec![("mirror", "we\"ird\\\n")], 1.0)],
        );
        assert!(x
            .finish()
            .contains(r#"mirrorfs_a_total{mirror="we\"ird\\\n"} 1"#));
    }
}
