//! Results and their rendering as a plain or Markdown table.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::TargetKind;

/// One row of the main table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    SeqWrite,
    SeqWriteFsync,
    SeqReadWarm,
    SeqReadCold,
    RandWrite4k,
    RandWrite4kT4,
    RandWrite4kT16,
    SmallFiles,
    Stat,
    StatAgain,
    BuildUntar,
    BuildDelete,
    MirrorCatchUp,
    LagP50,
    LagP99,
    LagMax,
    BurstLagP50,
    BurstLagP99,
    BurstLag,
    BacklogPeak,
    RssPeak,
    VmHwm,
    VmRss,
}

impl Metric {
    pub const ALL: [Metric; 23] = [
        Metric::SeqWrite,
        Metric::SeqWriteFsync,
        Metric::SeqReadWarm,
        Metric::SeqReadCold,
        Metric::RandWrite4k,
        Metric::RandWrite4kT4,
        Metric::RandWrite4kT16,
        Metric::SmallFiles,
        Metric::Stat,
        Metric::StatAgain,
        Metric::BuildUntar,
        Metric::BuildDelete,
        Metric::MirrorCatchUp,
        Metric::LagP50,
        Metric::LagP99,
        Metric::LagMax,
        Metric::BurstLagP50,
        Metric::BurstLagP99,
        Metric::BurstLag,
        Metric::BacklogPeak,
        Metric::RssPeak,
        Metric::VmHwm,
        Metric::VmRss,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Metric::SeqWrite => "seq-write",
            Metric::SeqWriteFsync => "seq-write+fsync",
            Metric::SeqReadWarm => "seq-read (warm)",
            Metric::SeqReadCold => "seq-read (cold)",
            Metric::RandWrite4k => "rand-write-4k",
            Metric::RandWrite4kT4 => "rand-write-4k, 4 threads",
            Metric::RandWrite4kT16 => "rand-write-4k, 16 threads",
            Metric::SmallFiles => "small-files",
            Metric::Stat => "stat",
            Metric::StatAgain => "stat (again, 2 s later)",
            Metric::BuildUntar => "build-like: untar a source tree",
            Metric::BuildDelete => "build-like: rm -r it again",
            Metric::MirrorCatchUp => "mirror catch-up after bulk",
            Metric::LagP50 => "mirror lag p50 (single)",
            Metric::LagP99 => "mirror lag p99 (single)",
            Metric::LagMax => "mirror lag max (single)",
            Metric::BurstLagP50 => "mirror lag p50 (burst)",
            Metric::BurstLagP99 => "mirror lag p99 (burst)",
            Metric::BurstLag => "burst: last close -> all identical",
            Metric::BacklogPeak => "peak mirror backlog seen",
            Metric::RssPeak => "peak VmRSS seen (sampled)",
            Metric::VmHwm => "memory VmHWM (whole run)",
            Metric::VmRss => "memory VmRSS (at end)",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::SeqWrite
            | Metric::SeqWriteFsync
            | Metric::SeqReadWarm
            | Metric::SeqReadCold => "MiB/s",
            Metric::RandWrite4k | Metric::RandWrite4kT4 | Metric::RandWrite4kT16 => "IOPS",
            Metric::SmallFiles | Metric::BuildUntar | Metric::BuildDelete => "files/s",
            Metric::Stat | Metric::StatAgain => "stats/s",
            Metric::MirrorCatchUp
            | Metric::LagP50
            | Metric::LagP99
            | Metric::LagMax
            | Metric::BurstLagP50
            | Metric::BurstLagP99
            | Metric::BurstLag => "ms",
            Metric::BacklogPeak | Metric::RssPeak | Metric::VmHwm | Metric::VmRss => "MiB",
        }
    }

    /// Rows measured on every target (and compared with native).
    pub fn is_common(self) -> bool {
        !self.mirrorfs_only()
    }

    pub fn mirrorfs_only(self) -> bool {
        matches!(
            self,
            Metric::MirrorCatchUp
                | Metric::LagP50
                | Metric::LagP99
                | Metric::LagMax
                | Metric::BurstLagP50
                | Metric::BurstLagP99
                | Metric::BurstLag
                | Metric::BacklogPeak
                | Metric::RssPeak
                | Metric::VmHwm
                | Metric::VmRss
        )
    }

    /// The target the issues set for mirrorfs on this row (besides being
    /// ahead of bindfs on every common row).
    pub fn goal(self) -> Option<Goal> {
        match self {
            Metric::SeqWrite | Metric::SmallFiles => Some(Goal::RatioAtLeast(0.5)),
            Metric::RandWrite4k | Metric::RandWrite4kT4 | Metric::RandWrite4kT16 => {
                Some(Goal::RatioAtLeast(0.3))
            }
            Metric::SeqReadWarm | Metric::SeqReadCold => Some(Goal::RatioAtLeast(0.95)),
            Metric::LagP99 | Metric::BurstLagP99 => Some(Goal::ValueAtMost(10.0)),
            _ => None,
        }
    }
}

/// A target figure.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// value / baseline >= x
    RatioAtLeast(f64),
    /// value / baseline <= x
    RatioAtMost(f64),
    /// value <= x (in the row's unit)
    ValueAtMost(f64),
}

impl Goal {
    pub fn met(self, value: f64, ratio: Option<f64>) -> Option<bool> {
        match self {
            Goal::RatioAtLeast(x) => ratio.map(|r| r >= x),
            Goal::RatioAtMost(x) => ratio.map(|r| r <= x),
            Goal::ValueAtMost(x) => Some(value <= x),
        }
    }

    pub fn describe(self, unit: &str) -> String {
        match self {
            Goal::RatioAtLeast(x) => format!(">= {x:.2}x"),
            Goal::RatioAtMost(x) => format!("<= {x:.2}x"),
            Goal::ValueAtMost(x) => format!("<= {} {unit}", fmt_num(x)),
        }
    }
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "-",
    }
}

/// One row of the network table: a figure of the network target next to the
/// baseline it is compared with.
#[derive(Debug, Clone, Serialize)]
pub struct NetRow {
    pub label: String,
    pub unit: &'static str,
    /// The figure, or why it could not be measured (JSON: a number or `{"error": ...}`).
    #[serde(serialize_with = "ser_value")]
    pub value: Result<f64, String>,
    /// What it is compared with (same unit) and that figure.
    pub baseline_label: String,
    pub baseline: Option<f64>,
    pub goal: Option<Goal>,
    /// How it was measured (times, counts), for the notes.
    pub detail: String,
}

fn ser_value<S: serde::Serializer>(v: &Result<f64, String>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Failed<'a> {
        error: &'a str,
    }
    match v {
        Ok(x) => s.serialize_f64(*x),
        Err(e) => Failed { error: e }.serialize(s),
    }
}

impl NetRow {
    pub fn new(label: impl Into<String>, unit: &'static str) -> NetRow {
        NetRow {
            label: label.into(),
            unit,
            value: Err("not measured".into()),
            baseline_label: String::new(),
            baseline: None,
            goal: None,
            detail: String::new(),
        }
    }

    pub fn ratio(&self) -> Option<f64> {
        match (&self.value, self.baseline) {
            (Ok(v), Some(b)) if b > 0.0 => Some(v / b),
            _ => None,
        }
    }

    pub fn met(&self) -> Option<bool> {
        let v = *self.value.as_ref().ok()?;
        self.goal?.met(v, self.ratio())
    }
}

/// What one target produced.
#[derive(Debug, Serialize)]
pub struct TargetReport {
    pub target: TargetKind,
    /// Why the whole target was skipped, if it was.
    pub skipped: Option<String>,
    /// How the target was set up (command line, versions).
    pub description: String,
    /// Value, or the error that prevented it.
    pub values: BTreeMap<Metric, Result<f64, String>>,
    /// The network target's rows.
    pub net: Vec<NetRow>,
    /// Errors not tied to one row (e.g. unclean shutdown).
    pub notes: Vec<String>,
}

impl TargetReport {
    pub fn new(target: TargetKind) -> TargetReport {
        TargetReport {
            target,
            skipped: None,
            description: String::new(),
            values: BTreeMap::new(),
            net: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn value(&self, m: Metric) -> Option<f64> {
        self.values.get(&m).and_then(|v| v.as_ref().ok()).copied()
    }
}

/// `12345.6` -> `12,346`; small numbers keep a few significant digits.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    if v.abs() < 10.0 {
        return format!("{v:.2}");
    }
    if v.abs() < 100.0 {
        return format!("{v:.1}");
    }
    let s = format!("{:.0}", v.abs());
    let mut grouped = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    if v < 0.0 {
        format!("-{grouped}")
    } else {
        grouped
    }
}

/// The main table as rows of cells: header first, then one row per metric.
/// Every FUSE cell carries its ratio to native; when both bindfs and mirrorfs
/// ran, a column gives mirrorfs / bindfs, and a last column says whether
/// mirrorfs meets its target on the row.
pub fn table(reports: &[TargetReport]) -> Vec<Vec<String>> {
    let reports: Vec<&TargetReport> = reports
        .iter()
        .filter(|r| r.target.in_main_table())
        .collect();
    let mut rows = Vec::new();
    let mut header = vec!["workload".to_string()];
    header.extend(reports.iter().map(|r| r.target.name().to_string()));
    let find = |k: TargetKind| {
        reports
            .iter()
            .copied()
            .find(|r| r.target == k && r.skipped.is_none())
    };
    let native = find(TargetKind::Native);
    let bindfs = find(TargetKind::Bindfs);
    let mirrorfs = find(TargetKind::Mirrorfs);
    let vs_bindfs = bindfs.is_some() && mirrorfs.is_some();
    if vs_bindfs {
        header.push("mirrorfs/bindfs".to_string());
    }
    if mirrorfs.is_some() {
        header.push("mirrorfs target".to_string());
    }
    rows.push(header);
    let has_mirrorfs = reports.iter().any(|r| r.target.is_mirrorfs());
    for m in Metric::ALL {
        if m.mirrorfs_only() && !has_mirrorfs {
            continue;
        }
        let mut row = vec![m.label().to_string()];
        for r in &reports {
            let cell = if r.skipped.is_some() {
                "skipped".to_string()
            } else if m.mirrorfs_only() && !r.target.is_mirrorfs() {
                "-".to_string()
            } else {
                match r.values.get(&m) {
                    None => "-".to_string(),
                    Some(Err(_)) => "FAILED".to_string(),
                    Some(Ok(v)) => {
                        let mut s = format!("{} {}", fmt_num(*v), m.unit());
                        let base = native
                            .filter(|_| m.is_common() && r.target != TargetKind::Native)
                            .and_then(|n| n.value(m));
                        if let Some(b) = base {
                            if b > 0.0 {
                                s.push_str(&format!(" ({:.2}x)", v / b));
                            }
                        }
                        s
                    }
                }
            };
            row.push(cell);
        }
        let mv = mirrorfs.and_then(|r| r.value(m));
        let vb = match (mv, bindfs.and_then(|r| r.value(m))) {
            (Some(v), Some(b)) if m.is_common() && b > 0.0 => Some(v / b),
            _ => None,
        };
        if vs_bindfs {
            row.push(vb.map_or("-".to_string(), |x| format!("{x:.2}x")));
        }
        if mirrorfs.is_some() {
            let mut parts = Vec::new();
            if let (Some(g), Some(v)) = (m.goal(), mv) {
                let ratio = native
                    .and_then(|n| n.value(m))
                    .filter(|b| *b > 0.0)
                    .map(|b| v / b);
                let what = match g {
                    Goal::ValueAtMost(_) => g.describe(m.unit()),
                    _ => format!("{} native", g.describe(m.unit())),
                };
                parts.push(format!("{what}: {}", verdict(g.met(v, ratio))));
            }
            if let Some(x) = vb {
                parts.push(format!("> bindfs: {}", verdict(Some(x > 1.0))));
            }
            row.push(if parts.is_empty() {
                "-".to_string()
            } else {
                parts.join("; ")
            });
        }
        rows.push(row);
    }
    rows
}

/// The network table: one row per network figure, with its baseline.
pub fn net_table(rows: &[NetRow]) -> Vec<Vec<String>> {
    let mut out = vec![vec![
        "network (loopback, TLS)".to_string(),
        "mirrorfs".to_string(),
        "baseline".to_string(),
        "ratio".to_string(),
        "target".to_string(),
    ]];
    for r in rows {
        let value = match &r.value {
            Ok(v) => format!("{} {}", fmt_num(*v), r.unit),
            Err(_) => "FAILED".to_string(),
        };
        let baseline = match r.baseline {
            Some(b) => format!("{}: {} {}", r.baseline_label, fmt_num(b), r.unit),
            None if r.baseline_label.is_empty() => "-".to_string(),
            None => format!("{}: -", r.baseline_label),
        };
        let ratio = r.ratio().map_or("-".to_string(), |x| format!("{x:.3}x"));
        let target = match r.goal {
            Some(g) => format!("{}: {}", g.describe(r.unit), verdict(r.met())),
            None => "-".to_string(),
        };
        out.push(vec![r.label.clone(), value, baseline, ratio, target]);
    }
    out
}

/// Lines explaining skips and failures, shown under the table.
pub fn notes(reports: &[TargetReport]) -> Vec<String> {
    let mut out = Vec::new();
    for r in reports {
        if let Some(why) = &r.skipped {
            out.push(format!("{}: skipped: {why}", r.target.name()));
            continue;
        }
        if !r.description.is_empty() {
            out.push(format!("{}: {}", r.target.name(), r.description));
        }
        for (m, v) in &r.values {
            if let Err(e) = v {
                out.push(format!("{}: {} FAILED: {e}", r.target.name(), m.label()));
            }
        }
        for row in &r.net {
            match &row.value {
                Err(e) => out.push(format!("{}: {} FAILED: {e}", r.target.name(), row.label)),
                Ok(_) if !row.detail.is_empty() => out.push(format!(
                    "{}: {}: {}",
                    r.target.name(),
                    row.label,
                    row.detail
                )),
                Ok(_) => {}
            }
        }
        for n in &r.notes {
            out.push(format!("{}: {n}", r.target.name()));
        }
    }
    out
}

pub fn render_plain(rows: &[Vec<String>]) -> String {
    let ncol = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..ncol)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, s)| {
                if c == 0 {
                    format!("{s:<w$}", w = widths[c])
                } else {
                    format!("{s:>w$}", w = widths[c])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            let total = widths.iter().sum::<usize>() + 2 * ncol.saturating_sub(1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out
}

pub fn render_markdown(rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        out.push_str("| ");
        out.push_str(&row.join(" | "));
        out.push_str(" |\n");
        if i == 0 {
            out.push('|');
            for c in 0..row.len() {
                out.push_str(if c == 0 { " --- |" } else { " ---: |" });
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(412.4), "412");
        assert_eq!(fmt_num(1234.5), "1,234");
        assert_eq!(fmt_num(1_234_567.0), "1,234,567");
    }

    #[test]
    fn ratios_against_native() {
        let mut n = TargetReport::new(TargetKind::Native);
        n.values.insert(Metric::SeqWrite, Ok(1000.0));
        let mut b = TargetReport::new(TargetKind::Bindfs);
        b.values.insert(Metric::SeqWrite, Ok(610.0));
        let mut m = TargetReport::new(TargetKind::Mirrorfs);
        m.skipped = Some("binary missing".into());
        let rows = table(&[n, b, m]);
        assert_eq!(rows[0], ["workload", "native", "bindfs", "mirrorfs"]);
        assert_eq!(
            rows[1],
            ["seq-write", "1,000 MiB/s", "610 MiB/s (0.61x)", "skipped"]
        );
        let md = render_markdown(&rows[..1]);
        assert!(md.starts_with(
            "| workload | native | bindfs | mirrorfs |\n| --- | ---: | ---: | ---: |\n"
        ));
    }

    #[test]
    fn ratios_against_bindfs_and_targets() {
        let mut n = TargetReport::new(TargetKind::Native);
        n.values.insert(Metric::SeqWrite, Ok(1000.0));
        let mut b = TargetReport::new(TargetKind::Bindfs);
        b.values.insert(Metric::SeqWrite, Ok(400.0));
        let mut m = TargetReport::new(TargetKind::Mirrorfs);
        m.values.insert(Metric::SeqWrite, Ok(600.0));
        m.values.insert(Metric::LagP99, Ok(12.0));
        let net = TargetReport::new(TargetKind::Net);
        let rows = table(&[n, b, m, net]);
        assert_eq!(
            rows[0],
            [
                "workload",
                "native",
                "bindfs",
                "mirrorfs",
                "mirrorfs/bindfs",
                "mirrorfs target"
            ]
        );
        assert_eq!(
            rows[1],
            [
                "seq-write",
                "1,000 MiB/s",
                "400 MiB/s (0.40x)",
                "600 MiB/s (0.60x)",
                "1.50x",
                ">= 0.50x native: met; > bindfs: met"
            ]
        );
        let p99 = rows
            .iter()
            .find(|r| r[0] == Metric::LagP99.label())
            .map(|r| r[5].clone());
        assert_eq!(p99.as_deref(), Some("<= 10.0 ms: NOT met"));
    }

    #[test]
    fn net_rows() {
        let mut r = NetRow::new("bytes", "B");
        r.value = Ok(4400.0);
        r.baseline_label = "rsync".into();
        r.baseline = Some(17600.0);
        r.goal = Some(Goal::ValueAtMost(9216.0));
        assert_eq!(r.met(), Some(true));
        let t = net_table(&[r]);
        assert_eq!(
            t[1],
            [
                "bytes",
                "4,400 B",
                "rsync: 17,600 B",
                "0.250x",
                "<= 9,216 B: met"
            ]
        );
        let mut r = NetRow::new("resume", "B");
        r.value = Ok(110.0);
        r.baseline = Some(100.0);
        r.goal = Some(Goal::RatioAtMost(1.05));
        assert_eq!(r.met(), Some(false));
    }
}
