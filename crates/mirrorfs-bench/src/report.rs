//! Results and their rendering as a plain or Markdown table.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::TargetKind;

/// One table row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    SeqWrite,
    SeqWriteFsync,
    SeqReadWarm,
    SeqReadCold,
    RandWrite4k,
    SmallFiles,
    Stat,
    MirrorCatchUp,
    LagP50,
    LagP99,
    LagMax,
    BurstLag,
    VmHwm,
    VmRss,
}

impl Metric {
    pub const ALL: [Metric; 14] = [
        Metric::SeqWrite,
        Metric::SeqWriteFsync,
        Metric::SeqReadWarm,
        Metric::SeqReadCold,
        Metric::RandWrite4k,
        Metric::SmallFiles,
        Metric::Stat,
        Metric::MirrorCatchUp,
        Metric::LagP50,
        Metric::LagP99,
        Metric::LagMax,
        Metric::BurstLag,
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
            Metric::SmallFiles => "small-files",
            Metric::Stat => "stat",
            Metric::MirrorCatchUp => "mirror catch-up after bulk",
            Metric::LagP50 => "mirror lag p50",
            Metric::LagP99 => "mirror lag p99",
            Metric::LagMax => "mirror lag max",
            Metric::BurstLag => "mirror burst lag",
            Metric::VmHwm => "memory VmHWM",
            Metric::VmRss => "memory VmRSS",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::SeqWrite
            | Metric::SeqWriteFsync
            | Metric::SeqReadWarm
            | Metric::SeqReadCold => "MiB/s",
            Metric::RandWrite4k => "IOPS",
            Metric::SmallFiles => "files/s",
            Metric::Stat => "stats/s",
            Metric::MirrorCatchUp
            | Metric::LagP50
            | Metric::LagP99
            | Metric::LagMax
            | Metric::BurstLag => "ms",
            Metric::VmHwm | Metric::VmRss => "MiB",
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
                | Metric::BurstLag
                | Metric::VmHwm
                | Metric::VmRss
        )
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
            notes: Vec::new(),
        }
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

/// The table as rows of cells: header first, then one row per metric.
pub fn table(reports: &[TargetReport]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut header = vec!["workload".to_string()];
    header.extend(reports.iter().map(|r| r.target.name().to_string()));
    rows.push(header);
    let native = reports.iter().find(|r| r.target == TargetKind::Native);
    let has_mirrorfs = reports.iter().any(|r| r.target == TargetKind::Mirrorfs);
    for m in Metric::ALL {
        if m.mirrorfs_only() && !has_mirrorfs {
            continue;
        }
        let mut row = vec![m.label().to_string()];
        for r in reports {
            let cell = if r.skipped.is_some() {
                "skipped".to_string()
            } else if m.mirrorfs_only() && r.target != TargetKind::Mirrorfs {
                "-".to_string()
            } else {
                match r.values.get(&m) {
                    None => "-".to_string(),
                    Some(Err(_)) => "FAILED".to_string(),
                    Some(Ok(v)) => {
                        let mut s = format!("{} {}", fmt_num(*v), m.unit());
                        let base = native
                            .filter(|_| m.is_common() && r.target != TargetKind::Native)
                            .and_then(|n| n.values.get(&m))
                            .and_then(|b| b.as_ref().ok());
                        if let Some(b) = base {
                            if *b > 0.0 {
                                s.push_str(&format!(" ({:.2}x)", v / b));
                            }
                        }
                        s
                    }
                }
            };
            row.push(cell);
        }
        rows.push(row);
    }
    rows
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
        let md = render_markdown(&rows);
        assert!(md.starts_with(
            "| workload | native | bindfs | mirrorfs |\n| --- | ---: | ---: | ---: |\n"
        ));
    }
}
