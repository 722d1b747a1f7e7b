//! Results: the table printed at the end of a run and the JSON file written per run.
//!
//! A run's JSON file holds when and where it ran (UTC timestamp, git commit and whether
//! the work tree was dirty, CPU model, cores, kernel, memory), the command line, and per
//! scenario its parameters, which processes its CPU figures count, every arm's figures
//! (operations, latency percentiles in microseconds, throughput, CPU per operation) and,
//! where the scenario has a target, the ratio, the target and PASS or FAIL. A failing ratio
//! is reported as such; it does not make the harness fail.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::measure::{ArmResult, Spread};

/// A scenario's target and how it came out.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What the ratio is, in words.
    pub metric: String,
    pub ratio: f64,
    /// `<=` or `>=`.
    pub comparison: String,
    pub target: f64,
    pub pass: bool,
    /// The same ratio computed round by round from the batches that ran next to each other
    /// (a diagnostic of how the noise moved it; the verdict uses `ratio`).
    pub per_round: Option<Spread>,
}

impl Check {
    pub fn at_most(metric: &str, ratio: f64, target: f64, per_round: Option<Spread>) -> Check {
        Check { metric: metric.into(), ratio, comparison: "<=".into(), target, pass: ratio <= target, per_round }
    }

    pub fn at_least(metric: &str, ratio: f64, target: f64, per_round: Option<Spread>) -> Check {
        Check { metric: metric.into(), ratio, comparison: ">=".into(), target, pass: ratio >= target, per_round }
    }

    /// `>= 0.7`, `<= 1.5`.
    pub fn target_text(&self) -> String {
        format!("{} {}", self.comparison, self.target)
    }

    pub fn verdict(&self) -> &'static str {
        if self.pass {
            "PASS"
        } else {
            "FAIL"
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    pub description: String,
    pub params: Value,
    /// Which processes the CPU figures count.
    pub cpu_counted: String,
    pub arms: Vec<ArmResult>,
    pub check: Option<Check>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub mem_total_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Git {
    pub commit: String,
    /// Whether the work tree had uncommitted changes.
    pub dirty: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub harness: &'static str,
    pub command: Vec<String>,
    pub quick: bool,
    pub timestamp_utc: String,
    pub git: Git,
    pub machine: Machine,
    pub wall_s: f64,
    pub scenarios: Vec<ScenarioResult>,
}

pub fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let cores = if cores > 0 { cores } else { std::thread::available_parallelism().map_or(0, |n| n.get()) };
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
    let mem_total_kib = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Machine { cpu_model, cores, kernel, mem_total_kib }
}

/// The workspace this harness was built from.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

pub fn git() -> Git {
    let root = workspace_root();
    let out = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(&root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    Git {
        commit: out(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into()),
        dirty: out(&["status", "--porcelain"]).map(|s| !s.is_empty()),
    }
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).expect("day of month");
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).expect("month");
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`, and as `YYYYMMDDTHHMMSSZ` for a file name.
pub fn timestamp() -> (String, String) {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let secs = i64::try_from(secs).unwrap_or(0);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    let (h, mi, se) = (s / 3600, s % 3600 / 60, s % 60);
    (format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{se:02}Z"), format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{se:02}Z"))
}

/// Writes the run's JSON file into `dir`; returns its path.
pub fn write_json(dir: &Path, stamp: &str, names: &[String], run: &RunResult) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let label = names.join("+");
    let mut path = dir.join(format!("{stamp}-{label}.json"));
    let mut n = 1;
    while path.exists() {
        n += 1;
        path = dir.join(format!("{stamp}-{label}-{n}.json"));
    }
    let mut bytes = serde_json::to_vec_pretty(run)?;
    bytes.push(b'\n');
    fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// The table of every scenario, for stdout.
pub fn table(run: &RunResult) -> String {
    let mut out = String::new();
    let m = &run.machine;
    out.push_str(&format!(
        "nvmirror benchmarks {} on {} ({} cores, kernel {}), commit {}{}{}\n",
        run.timestamp_utc,
        m.cpu_model,
        m.cores,
        m.kernel,
        run.git.commit.get(..12).unwrap_or(&run.git.commit),
        if run.git.dirty == Some(true) { " (dirty)" } else { "" },
        if run.quick { ", QUICK (few iterations: figures are not meaningful)" } else { "" },
    ));
    out.push_str("latencies in microseconds; cpu/op = CPU time per operation in microseconds\n\n");
    let header = format!(
        "{:<10} {:<14} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10} {:>8}\n",
        "scenario", "arm", "ops", "p50", "p90", "p99", "p99.9", "max", "ops/s", "cpu/op"
    );
    for s in &run.scenarios {
        out.push_str(&header);
        for a in &s.arms {
            let l = &a.latency_us;
            out.push_str(&format!(
                "{:<10} {:<14} {:>9} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>10.0} {:>8.1}\n",
                s.name, a.name, a.ops, l.p50, l.p90, l.p99, l.p99_9, l.max, a.throughput_ops_s, a.cpu_us_per_op
            ));
        }
        if let Some(c) = &s.check {
            out.push_str(&format!(
                "  {}: {} = {:.3} (target {}) {}\n",
                s.name,
                c.metric,
                c.ratio,
                c.target_text(),
                c.verdict()
            ));
            if let Some(r) = &c.per_round {
                out.push_str(&format!(
                    "  the same ratio round by round: median {:.3}, min {:.3}, max {:.3}\n",
                    r.median, r.min, r.max
                ));
            }
        }
        for n in &s.notes {
            out.push_str(&format!("  note: {n}\n"));
        }
        out.push_str(&format!("  cpu counts: {}\n\n", s.cpu_counted));
    }
    let checks: Vec<&ScenarioResult> = run.scenarios.iter().filter(|s| s.check.is_some()).collect();
    if !checks.is_empty() {
        out.push_str("summary:\n");
        for s in checks {
            let c = s.check.as_ref().expect("filtered");
            let line = format!("{:<10} {:<52} {:>7.3}", s.name, c.metric, c.ratio);
            out.push_str(&format!("  {line}  target {:<7} {}\n", c.target_text(), c.verdict()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
