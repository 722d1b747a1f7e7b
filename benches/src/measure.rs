//! Measurement: interleaved batches, latency histograms and CPU time.
//!
//! The machines these benchmarks run on are small (2 cores) and shared, so a figure taken
//! at one moment says little about a figure taken a minute later. Every scenario therefore
//! measures its system and its floor (the peer it is compared with) *interleaved in the
//! same process run*: round after round, each arm runs one batch of operations in turn
//! (ours, floor, ours, floor, ...), so that both see the same noise. Warm-up rounds run
//! first and are thrown away.
//!
//! Per arm the harness keeps an HdrHistogram of operation latencies in nanoseconds (3
//! significant digits), the number of operations, the wall time of its batches (throughput
//! is operations over that time, so the other arms' batches do not count against it) and
//! the CPU time spent during its batches. CPU time is `getrusage(RUSAGE_SELF)` user + system
//! of the harness process (every thread, including in-process servers) plus, for scenarios
//! with node processes, the on-CPU time of every thread of those processes from
//! `/proc/PID/task/TID/schedstat` (nanoseconds; `/proc/PID/stat` ticks where schedstat is
//! missing). It is sampled before and after each batch, so idle spinning or parking of a
//! component during another arm's batch is charged to that batch's arm.
//!
//! Each batch also keeps its own median and throughput. Scenarios report their target
//! ratio from the whole-run figures, and beside it the same ratio computed round by round
//! from batches that ran next to each other ([`Spread`]): when the machine's noise drifts
//! during a run, the two differ, and the per-round spread shows by how much.

use std::fs;
use std::io;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histograms hold (one minute); slower operations saturate.
pub const LATENCY_NS_MAX: u64 = 60_000_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("valid histogram bounds")
}

/// Nanoseconds of a duration, saturating.
pub fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// How many rounds a scenario runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Plan {
    pub warmup_rounds: usize,
    pub rounds: usize,
}

/// The operations of one batch: each arm records one latency per operation.
pub struct Batch<'a> {
    hist: &'a mut Histogram<u64>,
    ops: u64,
}

impl Batch<'_> {
    pub fn record(&mut self, d: Duration) {
        self.hist.saturating_record(ns(d).max(1));
        self.ops += 1;
    }
}

/// What an arm runs per batch.
pub type ArmFn<'a> = Box<dyn FnMut(&mut Batch<'_>) -> Result<()> + 'a>;

/// One side of a comparison: a name, its batch, and what was measured of it.
pub struct Arm<'a> {
    pub stats: ArmStats,
    run: ArmFn<'a>,
}

impl<'a> Arm<'a> {
    pub fn new(name: &str, queue_depth: Option<usize>, run: ArmFn<'a>) -> Self {
        Arm {
            stats: ArmStats {
                name: name.to_string(),
                queue_depth,
                hist: new_histogram(),
                ops: 0,
                wall: Duration::ZERO,
                cpu_ns: 0,
                rounds: Vec::new(),
            },
            run,
        }
    }
}

/// What was measured of one arm.
pub struct ArmStats {
    pub name: String,
    pub queue_depth: Option<usize>,
    pub hist: Histogram<u64>,
    pub ops: u64,
    /// Wall time of the measured batches only.
    pub wall: Duration,
    pub cpu_ns: u64,
    /// Each measured round's batch on its own, in order.
    pub rounds: Vec<RoundFigures>,
}

/// One batch of one arm: how the figures moved from round to round.
#[derive(Debug, Clone, Copy)]
pub struct RoundFigures {
    pub p50_ns: u64,
    pub ops: u64,
    pub wall: Duration,
}

/// Operations per second over `wall` (0 over no time).
fn per_second(ops: u64, wall: Duration) -> f64 {
    let s = wall.as_secs_f64();
    if s > 0.0 {
        ops as f64 / s
    } else {
        0.0
    }
}

impl RoundFigures {
    pub fn throughput(&self) -> f64 {
        per_second(self.ops, self.wall)
    }
}

/// Median, minimum and maximum of a per-round figure.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `f(round)` over `rounds` rounds; `None` when there are none.
    pub fn of(rounds: usize, f: impl Fn(usize) -> f64) -> Option<Spread> {
        let mut v: Vec<f64> = (0..rounds).map(f).filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let median = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
        Some(Spread { median, min: v[0], max: v[v.len() - 1] })
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    #[serde(rename = "p99.9")]
    pub p99_9: f64,
    pub max: f64,
    pub mean: f64,
}

/// The figures of one arm, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct ArmResult {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<usize>,
    pub ops: u64,
    pub wall_s: f64,
    pub latency_us: Latency,
    pub throughput_ops_s: f64,
    pub cpu_us_per_op: f64,
    /// Each measured round's batch: its median latency and its throughput.
    pub round_p50_us: Vec<f64>,
    pub round_throughput_ops_s: Vec<f64>,
    /// The latency distribution: (percentile, microseconds) at [`CURVE_PERCENTILES`] and
    /// the maximum (percentile 100), for the plots.
    pub curve: Vec<(f64, f64)>,
}

/// Percentiles of each arm's latency curve.
pub const CURVE_PERCENTILES: [f64; 14] =
    [1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.995, 99.999];

impl ArmStats {
    pub fn p50_ns(&self) -> u64 {
        self.hist.value_at_quantile(0.5)
    }

    pub fn throughput(&self) -> f64 {
        per_second(self.ops, self.wall)
    }

    pub fn result(&self) -> ArmResult {
        let h = &self.hist;
        let ops = self.ops.max(1);
        ArmResult {
            name: self.name.clone(),
            queue_depth: self.queue_depth,
            ops: self.ops,
            wall_s: self.wall.as_secs_f64(),
            latency_us: Latency {
                p50: us(h.value_at_quantile(0.5)),
                p90: us(h.value_at_quantile(0.9)),
                p99: us(h.value_at_quantile(0.99)),
                p99_9: us(h.value_at_quantile(0.999)),
                max: us(h.max()),
                mean: h.mean() / 1000.0,
            },
            throughput_ops_s: self.throughput(),
            cpu_us_per_op: us(self.cpu_ns) / ops as f64,
            round_p50_us: self.rounds.iter().map(|r| us(r.p50_ns)).collect(),
            round_throughput_ops_s: self.rounds.iter().map(RoundFigures::throughput).collect(),
            curve: CURVE_PERCENTILES
                .iter()
                .map(|&p| (p, us(h.value_at_quantile(p / 100.0))))
                .chain(std::iter::once((100.0, us(h.max()))))
                .collect(),
        }
    }
}

/// CPU time of the harness process and of the node processes it started.
pub struct CpuProbe {
    children: Vec<u32>,
}

impl CpuProbe {
    /// The harness process alone.
    pub fn this_process() -> Self {
        CpuProbe { children: Vec::new() }
    }

    /// The harness process and the processes `pids`.
    pub fn with_children(pids: Vec<u32>) -> Self {
        CpuProbe { children: pids }
    }

    pub fn describe(&self) -> String {
        if self.children.is_empty() {
            "harness process, all threads (getrusage RUSAGE_SELF user+sys)".to_string()
        } else {
            format!(
                "harness process, all threads (getrusage RUSAGE_SELF user+sys) + node processes {:?}, all live \
                 threads (/proc/PID/task/*/schedstat on-CPU time)",
                self.children
            )
        }
    }

    /// CPU nanoseconds used so far by everything this probe counts.
    pub fn sample(&self) -> Result<u64> {
        let mut total = self_cpu_ns()?;
        for &pid in &self.children {
            total += process_cpu_ns(pid).with_context(|| format!("CPU time of node process {pid}"))?;
        }
        Ok(total)
    }
}

fn self_cpu_ns() -> Result<u64> {
    // SAFETY: `rusage` is plain old data; all-zero is a valid value for getrusage to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the duration of the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("getrusage");
    }
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    Ok(tv(ru.ru_utime) + tv(ru.ru_stime))
}

/// On-CPU nanoseconds of every live thread of `pid`.
pub fn process_cpu_ns(pid: u32) -> Result<u64> {
    let mut total = 0u64;
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).context("list threads")?;
    for task in tasks {
        let task = task?;
        match fs::read_to_string(task.path().join("schedstat")) {
            Ok(s) => total += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0),
            // The thread may have ended since it was listed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(_) => return stat_cpu_ns(pid),
        }
    }
    Ok(total)
}

/// utime + stime of `/proc/PID/stat`, in nanoseconds (clock-tick resolution).
pub fn stat_cpu_ns(pid: u32) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).context("read /proc/PID/stat")?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    Ok((ticks(11) + ticks(12)) * 1_000_000_000 / hz)
}

/// Progress lines on stderr, at most one a second (and the last one).
pub struct Progress {
    scenario: String,
    last: Option<Instant>,
}

impl Progress {
    pub fn new(scenario: &str) -> Self {
        Progress { scenario: scenario.to_string(), last: None }
    }

    pub fn say(&mut self, force: bool, msg: impl FnOnce() -> String) {
        if force || self.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            eprintln!("[{}] {}", self.scenario, msg());
            self.last = Some(Instant::now());
        }
    }
}

/// Runs the arms' batches interleaved: warm-up rounds (discarded), then measured rounds.
pub fn interleave(scenario: &str, plan: Plan, cpu: &CpuProbe, arms: &mut [Arm<'_>]) -> Result<()> {
    let mut progress = Progress::new(scenario);
    let mut scratch = new_histogram();
    let mut round_hist = new_histogram();
    for round in 0..plan.warmup_rounds {
        for arm in arms.iter_mut() {
            let mut batch = Batch { hist: &mut scratch, ops: 0 };
            (arm.run)(&mut batch).with_context(|| format!("{scenario}: warm-up of {}", arm.stats.name))?;
        }
        progress.say(false, || format!("warm-up round {}/{}", round + 1, plan.warmup_rounds));
    }
    for round in 0..plan.rounds {
        for arm in arms.iter_mut() {
            round_hist.reset();
            let cpu_before = cpu.sample()?;
            let started = Instant::now();
            let mut batch = Batch { hist: &mut round_hist, ops: 0 };
            (arm.run)(&mut batch).with_context(|| format!("{scenario}: {}", arm.stats.name))?;
            let ops = batch.ops;
            let wall = started.elapsed();
            arm.stats.cpu_ns += cpu.sample()?.saturating_sub(cpu_before);
            arm.stats.wall += wall;
            arm.stats.ops += ops;
            arm.stats.hist.add(&round_hist).context("merge a batch's histogram")?;
            arm.stats.rounds.push(RoundFigures { p50_ns: round_hist.value_at_quantile(0.5), ops, wall });
        }
        progress.say(round + 1 == plan.rounds, || {
            let figures: Vec<String> = arms
                .iter()
                .map(|a| {
                    format!("{} p50 {:.1} us {:.0} ops/s", a.stats.name, us(a.stats.p50_ns()), a.stats.throughput())
                })
                .collect();
            format!("round {}/{}: {}", round + 1, plan.rounds, figures.join(", "))
        });
    }
    Ok(())
}

/// A small xorshift generator: random block numbers without a dependency, reproducible.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_rounds() {
        let v = [3.0, 1.0, 2.0, f64::NAN];
        let s = Spread::of(v.len(), |i| v[i]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of(2, |i| [1.0, 2.0][i]).unwrap();
        assert_eq!(s.median, 1.5);
        assert!(Spread::of(0, |_| 0.0).is_none());
    }

    #[test]
    fn cpu_probe_counts_this_process() {
        let probe = CpuProbe::with_children(vec![std::process::id()]);
        let a = probe.sample().unwrap();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(probe.sample().unwrap() >= a);
    }
}
