//! Plots of a run, as SVG (plotters): per scenario, the latency distribution of every arm
//! side by side (percentile on a "nines" axis, latency on a log axis); for the queue-depth
//! sweep, throughput against queue depth.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::report::{RunResult, ScenarioResult};

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// The percentile `p` (0 < p < 100) as nines: 90 -> 1, 99 -> 2, 99.9 -> 3.
fn nines(p: f64) -> f64 {
    -(1.0 - p.min(99.9999) / 100.0).log10()
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plot: {e}")
}

/// A small non-negative float as a count (axis ticks): at most 10.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped to 0..=10 first
fn small(x: f64) -> usize {
    x.round().clamp(0.0, 10.0) as usize
}

/// The latency distribution of each arm of `s` (the max drawn at the last nine shown).
fn latency(path: &Path, s: &ScenarioResult) -> Result<()> {
    let arms: Vec<_> = if s.name == "qd-sweep" {
        // One curve per arm at the sweep's ends and middle: the plot stays readable.
        s.arms.iter().filter(|a| matches!(a.queue_depth, Some(1) | Some(8) | Some(64))).collect()
    } else {
        s.arms.iter().collect()
    };
    let points: Vec<Vec<(f64, f64)>> = arms
        .iter()
        .map(|a| a.curve.iter().filter(|(p, _)| *p < 100.0).map(|&(p, us)| (nines(p), us.max(0.01))).collect())
        .collect();
    let x_max = points.iter().flatten().map(|p| p.0).fold(1.0, f64::max).ceil();
    let y_min = points.iter().flatten().map(|p| p.1).fold(f64::MAX, f64::min).max(0.01) / 1.5;
    let y_max = points.iter().flatten().map(|p| p.1).fold(0.0, f64::max).max(y_min * 10.0) * 1.5;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{}: latency distribution", s.name), ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("percentile (nines: 1 = p90, 2 = p99, 3 = p99.9, ...)")
        .y_desc("latency (us, log)")
        .x_labels(small(x_max) + 1)
        .x_label_formatter(&|x| match small(*x) {
            0 => "p0".into(),
            1 => "p90".into(),
            n => format!("p99.{}", "9".repeat(n - 2)).trim_end_matches('.').into(),
        })
        .draw()
        .map_err(err)?;
    for (i, (a, pts)) in arms.iter().zip(points).enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(err)?
            .label(a.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Throughput against queue depth, one line per kind of arm (mirrored, plain).
fn sweep(path: &Path, s: &ScenarioResult) -> Result<()> {
    let mut lines: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for a in &s.arms {
        let Some(qd) = a.queue_depth else { continue };
        let kind = a.name.split_whitespace().next().unwrap_or(&a.name).to_string();
        let point = ((qd as f64).log2(), a.throughput_ops_s);
        match lines.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, v)) => v.push(point),
            None => lines.push((kind, vec![point])),
        }
    }
    let x_max = lines.iter().flat_map(|(_, v)| v).map(|p| p.0).fold(0.0, f64::max).max(1.0);
    let y_max = lines.iter().flat_map(|(_, v)| v).map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.15;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{}: throughput against queue depth", s.name), ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("queue depth")
        .y_desc("writes per second")
        .x_label_formatter(&|x| format!("{}", 2f64.powf(*x).round()))
        .draw()
        .map_err(err)?;
    for (i, (kind, pts)) in lines.into_iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(err)?
            .label(kind)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled()))).map_err(err)?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Writes the run's plots into `dir`, named after the run's stamp; returns their paths.
pub fn write(dir: &Path, stamp: &str, run: &RunResult) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for s in &run.scenarios {
        // Scenarios without latency distributions (figures reported by the guest) have no
        // latency plot.
        if s.arms.iter().all(|a| a.curve.is_empty()) {
            continue;
        }
        let path = dir.join(format!("{stamp}-{}-latency.svg", s.name));
        latency(&path, s)?;
        out.push(path);
        if s.name == "qd-sweep" {
            let path = dir.join(format!("{stamp}-{}-throughput.svg", s.name));
            sweep(&path, s)?;
            out.push(path);
        }
    }
    Ok(out)
}
