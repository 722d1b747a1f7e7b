//! `drbd-guest`: nvmirror against DRBD, the peer users would pick instead, in two QEMU
//! guests joined by one virtual link (`hw-tests/pair`; DRBD is a kernel module and needs a
//! kernel on each side).
//!
//! Both systems mirror a block device synchronously from guest a to guest b and are
//! written through a kernel block device by the same program (`hw-blk-lat`: 4 KiB random
//! writes, O_DIRECT, io_uring): DRBD 8.4 protocol C on /dev/drbd0, and nvmirror's
//! mirrored volume through the kernel's NBD client on /dev/nbd0. Each guest has two virtio
//! disks of the same kind, one under each system. Queue depth 1, then 32, the two systems
//! taking turns round after round on the same link (whichever went first in a round goes
//! second in the next), one warm-up round thrown away. What each acknowledges: DRBD a
//! write once it is on both backing disks (virtio disks with a volatile write cache,
//! protocol C, no flush per write); nvmirror once it is in the NVRAM of both nodes (a
//! file on tmpfs in each guest, `file:` mode), its volume written at consistency points.
//!
//! The guests write one JSON file per measurement (HdrHistogram buckets included); the
//! harness merges the measured rounds per arm. The ratios (nvmirror over DRBD: p50 at
//! queue depth 1, throughput at 32) have no target and are reported as they come. It boots
//! two guests (minutes), so it is not part of `all`, and the test suite does not run it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::measure::{new_histogram, ArmStats, RoundFigures, Spread};
use crate::report::{workspace_root, ScenarioResult};

const SYSTEMS: [(&str, &str); 2] = [("drbd", "DRBD"), ("nvmirror", "nvmirror")];
const DEPTHS: [usize; 2] = [1, 32];

/// Measured rounds (after the warm-up), and the bounds of one measurement.
const ROUNDS: usize = 3;
const OPS_MAX: u64 = 20_000;
const SECONDS_MAX: u64 = 10;

/// One measurement's JSON from the guest, as an arm's batch.
fn add_round(stats: &mut ArmStats, path: &Path) -> Result<()> {
    let v: Value = serde_json::from_slice(&std::fs::read(path).with_context(|| format!("read {}", path.display()))?)
        .with_context(|| format!("{}: not JSON", path.display()))?;
    let ops = v["ops"].as_u64().with_context(|| format!("{}: no ops", path.display()))?;
    let wall_s = v["wall_s"].as_f64().with_context(|| format!("{}: no wall_s", path.display()))?;
    let buckets = v["hist_ns"].as_array().with_context(|| format!("{}: no hist_ns", path.display()))?;
    let mut round = new_histogram();
    for b in buckets {
        let (Some(ns), Some(n)) = (b[0].as_u64(), b[1].as_u64()) else {
            bail!("{}: a histogram bucket is not [ns, count]: {b}", path.display());
        };
        round.record_n(ns.max(1), n).with_context(|| format!("{}: bucket {ns} ns", path.display()))?;
    }
    if round.len() != ops {
        bail!("{}: the histogram holds {} writes, ops says {ops}", path.display(), round.len());
    }
    stats.hist.add(&round).context("merge a round's histogram")?;
    stats.ops += ops;
    let wall = Duration::from_secs_f64(wall_s.max(0.0));
    stats.wall += wall;
    stats.rounds.push(RoundFigures { p50_ns: round.value_at_quantile(0.5), ops, wall });
    Ok(())
}

pub fn run() -> Result<ScenarioResult> {
    let root = workspace_root();
    let out = tempfile::Builder::new().prefix("nvmirror-bench-drbd-").tempdir_in(root.join("target"))?;
    eprintln!(
        "[drbd-guest] hw-tests/pair: two QEMU guests, DRBD and nvmirror interleaved, {ROUNDS} rounds after a warm-up \
         (minutes)"
    );
    let mut child = Command::new(root.join("hw-tests/pair"))
        .env("HW_PAIR_OUT", out.path())
        .env("HW_PAIR_ROUNDS", ROUNDS.to_string())
        .env("HW_PAIR_OPS", OPS_MAX.to_string())
        .env("HW_PAIR_SECONDS", SECONDS_MAX.to_string())
        .current_dir(&root)
        .stdout(Stdio::piped())
        .spawn()
        .context("run hw-tests/pair")?;
    // The runner's lines, the guests' progress among them, as they come.
    let mut tail: Vec<String> = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.context("read hw-tests/pair's output")?;
            eprintln!("[drbd-guest] {line}");
            tail.push(line);
            if tail.len() > 60 {
                tail.remove(0);
            }
        }
    }
    let status = child.wait().context("wait for hw-tests/pair")?;
    if !status.success() {
        bail!("hw-tests/pair failed ({status}):\n{}", tail.join("\n"));
    }

    let dir = out.path().join("pair");
    let mut arms: Vec<ArmStats> = Vec::new();
    for depth in DEPTHS {
        for (sys, label) in SYSTEMS {
            let mut stats = ArmStats {
                name: format!("{label} qd{depth}"),
                queue_depth: Some(depth),
                hist: new_histogram(),
                ops: 0,
                wall: Duration::ZERO,
                cpu_ns: 0,
                rounds: Vec::new(),
            };
            for round in 1..=ROUNDS {
                add_round(&mut stats, &dir.join(format!("r{round}-{sys}-qd{depth}.json")))?;
            }
            arms.push(stats);
        }
    }
    let arm = |name: &str| arms.iter().find(|a| a.name == name).context("arm");
    let (drbd1, ours1, drbd32, ours32) =
        (arm("DRBD qd1")?, arm("nvmirror qd1")?, arm("DRBD qd32")?, arm("nvmirror qd32")?);
    let div = |a: f64, b: f64| a / b.max(f64::MIN_POSITIVE);
    let ratio_p50_qd1 = div(ours1.p50_ns() as f64, drbd1.p50_ns() as f64);
    let ratio_tput_qd32 = div(ours32.throughput(), drbd32.throughput());
    let per_round = |a: &ArmStats, b: &ArmStats, f: fn(&RoundFigures) -> f64| {
        Spread::of(a.rounds.len().min(b.rounds.len()), |i| div(f(&a.rounds[i]), f(&b.rounds[i])))
    };
    let p50 = |r: &RoundFigures| r.p50_ns as f64;
    let spread = |s: Option<Spread>| {
        s.map_or_else(|| "no rounds".into(), |s| format!("median {:.3}, min {:.3}, max {:.3}", s.median, s.min, s.max))
    };
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default().trim().to_string();
    let ping = read("ping.txt");
    let mut notes = vec![
        format!(
            "p50(nvmirror, qd1) / p50(DRBD, qd1) = {ratio_p50_qd1:.3} (no target; round by round: {})",
            spread(per_round(ours1, drbd1, p50))
        ),
        format!(
            "throughput(nvmirror, qd32) / throughput(DRBD, qd32) = {ratio_tput_qd32:.3} (no target; round by round: \
             {})",
            spread(per_round(ours32, drbd32, RoundFigures::throughput))
        ),
        format!("ping between the guests: {ping}"),
    ];
    // Figures that look wrong are said so, not left for the reader to spot.
    for a in &arms {
        if a.ops == 0 || a.throughput() <= 0.0 {
            notes.push(format!("ODD: {} completed no writes", a.name));
        }
    }
    let rounds: BTreeMap<String, Vec<f64>> =
        arms.iter().map(|a| (a.name.clone(), a.rounds.iter().map(RoundFigures::throughput).collect())).collect();
    Ok(ScenarioResult {
        name: "drbd-guest".into(),
        description: "two QEMU TCG guests joined by one virtual link: 4 KiB random O_DIRECT writes through \
                      /dev/drbd0 (DRBD 8.4, protocol C) and through /dev/nbd0 (nvmirror's mirrored volume, the \
                      kernel's NBD client), at queue depth 1 and 32, interleaved round by round, the same program \
                      (hw-blk-lat) for both"
            .into(),
        params: json!({
            "rounds": ROUNDS,
            "warmup_rounds": 1,
            "ops_max_per_round": OPS_MAX,
            "seconds_max_per_round": SECONDS_MAX,
            "ratio_p50_qd1_nvmirror_over_drbd": ratio_p50_qd1,
            "ratio_throughput_qd32_nvmirror_over_drbd": ratio_tput_qd32,
            "round_throughput_ops_s": rounds,
            "ping": ping,
            "drbd_status": read("drbd-status.txt"),
        }),
        cpu_counted: "not measured (inside the guests)".into(),
        arms: arms.iter().map(ArmStats::result).collect(),
        check: None,
        notes,
    })
}
