//! SVG plots drawn by the bench (`--plots DIR`), with plotters' SVG backend only.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use crate::disaster::Row;

/// One line of a plot: its name and its points.
struct Line {
    name: String,
    points: Vec<(f64, f64)>,
}

/// `disaster.svg` (acknowledged but lost, mean per run, against the loss raised before the cut,
/// one line per mode) and `disaster-layers.svg` (the UDP path's, against its FEC layers c, one
/// line per loss).
pub fn disaster(dir: &Path, rows: &[Row]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut by_mode: Vec<Line> = Vec::new();
    let mut by_loss: Vec<Line> = Vec::new();
    for r in rows {
        let name = r.mode.label();
        push(&mut by_mode, name, (r.loss * 100.0, r.mean_lost()));
        if let Some(c) = r.mode.udp_layers() {
            let name = format!("L = {:.1} %", r.loss * 100.0);
            push(&mut by_loss, name, (c as f64, r.mean_lost()));
        }
    }
    let losses: Vec<f64> = rows.iter().map(|r| r.loss * 100.0).collect();
    let lo = losses.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = losses.iter().copied().fold(0.0, f64::max);
    draw(
        &dir.join("disaster.svg"),
        "Rolling disaster: acknowledged but lost (50 ms one-way, 4 KiB messages)",
        "loss L raised for 0.5 s before the cut (%, log scale)",
        (lo / 2.0, hi * 2.0),
        true,
        &by_mode,
    )?;
    if !by_loss.is_empty() {
        draw(
            &dir.join("disaster-layers.svg"),
            "Rolling disaster, network-sync over UDP: lost against FEC layers",
            "FEC layers c of (r, c) = (8, c); 0: no FEC",
            (-0.2, 3.2),
            false,
            &by_loss,
        )?;
    }
    Ok(())
}

fn push(lines: &mut Vec<Line>, name: String, point: (f64, f64)) {
    match lines.iter_mut().find(|l| l.name == name) {
        Some(l) => l.points.push(point),
        None => lines.push(Line {
            name,
            points: vec![point],
        }),
    }
}

fn draw(
    path: &Path,
    title: &str,
    x_desc: &str,
    (x0, x1): (f64, f64),
    log_x: bool,
    lines: &[Line],
) -> Result<()> {
    let y_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root);
    chart
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    if log_x {
        let mut c = chart
            .build_cartesian_2d((x0..x1).log_scale(), 0.0..y_max)
            .map_err(|e| err(&e))?;
        c.configure_mesh()
            .x_desc(x_desc)
            .y_desc("acknowledged but lost (mean per run)")
            .draw()
            .map_err(|e| err(&e))?;
        for (i, l) in lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            c.draw_series(LineSeries::new(l.points.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(l.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            c.draw_series(l.points.iter().map(|p| Circle::new(*p, 4, color.filled())))
                .map_err(|e| err(&e))?;
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    } else {
        let mut c = chart
            .build_cartesian_2d(x0..x1, 0.0..y_max)
            .map_err(|e| err(&e))?;
        c.configure_mesh()
            .x_desc(x_desc)
            .y_desc("acknowledged but lost (mean per run)")
            .draw()
            .map_err(|e| err(&e))?;
        for (i, l) in lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            c.draw_series(LineSeries::new(l.points.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(l.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            c.draw_series(l.points.iter().map(|p| Circle::new(*p, 4, color.filled())))
                .map_err(|e| err(&e))?;
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// `latency.svg`: mirroring latency p99 (solid) and p50 (dots only) against the loss, one line
/// per mode and data path, log-scale milliseconds, with the target (one-way delay + 5 ms) and
/// the one-way delay drawn across.
pub fn latency(dir: &Path, cells: &[crate::latency::Cell], delay_ms: f64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut p99: Vec<Line> = Vec::new();
    let mut p50: Vec<Line> = Vec::new();
    for c in cells {
        // A log scale cannot show lags at or below zero (durable mode applies before it
        // acknowledges): those are drawn at 1 ms.
        push(
            &mut p99,
            c.label.clone(),
            (c.loss * 100.0, c.p(0.99).max(1.0)),
        );
        push(
            &mut p50,
            c.label.clone(),
            (c.loss * 100.0, c.p(0.5).max(1.0)),
        );
    }
    let y_max = cells.iter().map(|c| c.p(0.99)).fold(100.0, f64::max) * 1.5;
    let path = dir.join("latency.svg");
    let root = SVGBackend::new(&path, (1000, 620)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut c = ChartBuilder::on(&root)
        .caption(
            "Mirroring latency p99 (lines) and p50 (dots) against loss (50 ms one-way, 4 KiB messages)",
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.05..1.1, (1.0..y_max).log_scale())
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("random loss each way (%)")
        .y_desc("acknowledged → applied at the mirror (ms, log scale)")
        .draw()
        .map_err(|e| err(&e))?;
    let target = delay_ms + 5.0;
    c.draw_series(LineSeries::new(
        vec![(-0.05, target), (1.1, target)],
        BLACK.stroke_width(1),
    ))
    .map_err(|e| err(&e))?
    .label(format!("target: one-way delay + 5 ms = {target:.0} ms"))
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(1)));
    for (i, l) in p99.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        c.draw_series(LineSeries::new(l.points.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(l.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        if let Some(m) = p50.iter().find(|m| m.name == l.name) {
            c.draw_series(m.points.iter().map(|p| Circle::new(*p, 3, color.filled())))
                .map_err(|e| err(&e))?;
        }
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// One measured point of a throughput plot: its line (the data path), x (loss in % or one-way
/// delay in ms), MiB/s, and whether the row finished within its time limit (if not, its MiB/s is
/// what reached the mirror by then, a ceiling on the real figure's low side).
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub line: String,
    pub x: f64,
    pub mib_s: f64,
    pub finished: bool,
}

/// A throughput plot's line: its points in x order, and those of them that did not finish.
#[derive(Debug, PartialEq)]
struct ThroughputLine {
    name: String,
    points: Vec<(f64, f64)>,
    unfinished: Vec<(f64, f64)>,
}

/// The points grouped into one line per data path, in the order the paths first appear, each
/// line's points sorted by x.
fn throughput_lines(points: &[Point]) -> Vec<ThroughputLine> {
    let mut lines: Vec<ThroughputLine> = Vec::new();
    for p in points {
        let i = match lines.iter().position(|l| l.name == p.line) {
            Some(i) => i,
            None => {
                lines.push(ThroughputLine {
                    name: p.line.clone(),
                    points: Vec::new(),
                    unfinished: Vec::new(),
                });
                lines.len() - 1
            }
        };
        lines[i].points.push((p.x, p.mib_s));
        if !p.finished {
            lines[i].unfinished.push((p.x, p.mib_s));
        }
    }
    for l in &mut lines {
        l.points.sort_by(|a, b| a.0.total_cmp(&b.0));
        l.unfinished.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    lines
}

/// The y range of a log-scale MiB/s axis that shows every point clear of the frame: half the
/// smallest (at least 0.01; a row at 0 MiB/s is drawn at the bottom) to half again the largest.
fn log_range(points: &[Point]) -> (f64, f64) {
    let lo = points
        .iter()
        .map(|p| p.mib_s)
        .fold(f64::INFINITY, f64::min)
        .max(0.01);
    let hi = points.iter().map(|p| p.mib_s).fold(1.0, f64::max);
    let lo = if lo.is_finite() { lo } else { 0.01 };
    ((lo / 2.0).max(0.01), hi * 1.5)
}

/// A throughput plot (`throughput-loss.svg`, `throughput-delay.svg`): MiB/s on a log scale
/// against a linear x, one line per data path; a row that did not finish within `limit_s` is
/// drawn at its measured MiB/s and ringed in black.
pub fn throughput(
    file: &Path,
    title: &str,
    x_desc: &str,
    (x0, x1): (f64, f64),
    limit_s: u64,
    points: &[Point],
) -> Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let (y0, y1) = log_range(points);
    let mut lines = throughput_lines(points);
    for l in &mut lines {
        for p in l.points.iter_mut().chain(l.unfinished.iter_mut()) {
            p.1 = p.1.max(y0);
        }
    }
    let root = SVGBackend::new(file, (900, 560)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", file.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc(x_desc)
        .y_desc("MiB/s on the mirror (log scale)")
        .draw()
        .map_err(|e| err(&e))?;
    for (i, l) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        c.draw_series(LineSeries::new(l.points.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(l.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        c.draw_series(l.points.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(|e| err(&e))?;
    }
    if lines.iter().any(|l| !l.unfinished.is_empty()) {
        let ringed: Vec<(f64, f64)> = lines
            .iter()
            .flat_map(|l| l.unfinished.iter().copied())
            .collect();
        c.draw_series(
            ringed
                .into_iter()
                .map(|p| Circle::new(p, 8, BLACK.stroke_width(2))),
        )
        .map_err(|e| err(&e))?
        .label(format!(
            "unfinished within {limit_s} s: what reached the mirror by then"
        ))
        .legend(|(x, y)| Circle::new((x + 10, y), 6, BLACK.stroke_width(2)));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::MiddleRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: &str, x: f64, mib_s: f64, finished: bool) -> Point {
        Point {
            line: line.into(),
            x,
            mib_s,
            finished,
        }
    }

    #[test]
    fn rows_group_into_one_line_per_path_in_x_order() {
        let pts = [
            p("tcp", 0.5, 12.0, true),
            p("udp", 0.5, 14.0, true),
            p("tcp", 0.0, 17.0, true),
            p("cubic", 1.0, 0.13, false),
            p("udp", 0.0, 14.2, true),
            p("cubic", 0.0, 17.9, true),
        ];
        let lines = throughput_lines(&pts);
        let names: Vec<&str> = lines.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["tcp", "udp", "cubic"]);
        assert_eq!(lines[0].points, [(0.0, 17.0), (0.5, 12.0)]);
        assert_eq!(lines[1].points, [(0.0, 14.2), (0.5, 14.0)]);
        assert_eq!(lines[2].points, [(0.0, 17.9), (1.0, 0.13)]);
        assert!(lines[0].unfinished.is_empty());
        assert_eq!(lines[2].unfinished, [(1.0, 0.13)]);
    }

    #[test]
    fn the_log_axis_shows_the_slowest_and_the_fastest_row() {
        let (lo, hi) = log_range(&[p("a", 0.0, 0.13, false), p("b", 0.0, 14.3, true)]);
        assert!(
            (lo - 0.065).abs() < 1e-12 && (hi - 21.45).abs() < 1e-9,
            "{lo} {hi}"
        );
        let (lo, hi) = log_range(&[p("a", 0.0, 0.0, false), p("b", 0.0, 9.0, true)]);
        assert!(
            (lo - 0.01).abs() < 1e-12 && (hi - 13.5).abs() < 1e-9,
            "{lo} {hi}"
        );
        assert_eq!(log_range(&[]), (0.01, 1.5));
    }
}
