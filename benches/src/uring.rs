//! `uring-fio`: the io_uring engine's 4 KiB random writes at queue depth 32 against
//! `fio --ioengine=io_uring --direct=1` on the same file.
//!
//! Both write into one preallocated, fully written file on the repository's filesystem
//! (O_DIRECT, so the page cache plays no part), interleaved round by round: ours through
//! [`UringDevice::write_stream`] (registered buffers, 32 writes in flight, a new one as
//! soon as one completes), then one fio run of the same number of writes. Our IOPS are
//! the writes over the wall time of the stream; fio's are those fio reports (its own
//! timing, which leaves out its start-up). fio's latency percentiles are fio's, reported
//! in the notes; the harness's histogram for the fio arm holds fio's mean completion
//! latency once per write (fio does not give per-write figures).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nvmirror_dataplane::storage::{BlockDevice, UringDevice, WriteOp};
use serde_json::{json, Value};

use crate::measure::{interleave, Arm, CpuProbe, Plan, Spread, XorShift};
use crate::report::{workspace_root, Check, ScenarioResult};

const BLOCK: u64 = 4096;
const DEPTH: usize = 32;

struct Params {
    file_bytes: u64,
    ops_per_batch: u64,
    plan: Plan,
}

fn fio_available() -> bool {
    Command::new("fio").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// One fio run: `ops` random 4 KiB writes at queue depth 32. Returns (IOPS, mean
/// completion latency in ns, its JSON report of the writes).
fn fio(path: &Path, file_bytes: u64, ops: u64) -> Result<(f64, f64, Value)> {
    let out = Command::new("fio")
        .args([
            "--name=nvmirror-bench",
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randwrite",
            "--bs=4k",
            &format!("--iodepth={DEPTH}"),
            &format!("--size={file_bytes}"),
            &format!("--io_size={}", ops * BLOCK),
            "--randrepeat=0",
            "--norandommap",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", path.display()))
        .output()
        .context("run fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("fio's JSON report")?;
    let w = v["jobs"][0]["write"].clone();
    let iops = w["iops"].as_f64().context("fio reported no write IOPS")?;
    let mean = w["clat_ns"]["mean"].as_f64().unwrap_or(0.0);
    Ok((iops, mean, w))
}

pub fn run(quick: bool) -> Result<ScenarioResult> {
    let p = if quick {
        Params { file_bytes: 16 << 20, ops_per_batch: 256, plan: Plan { warmup_rounds: 0, rounds: 1 } }
    } else {
        Params { file_bytes: 1 << 30, ops_per_batch: 40_000, plan: Plan { warmup_rounds: 1, rounds: 6 } }
    };
    let base = workspace_root().join("target");
    std::fs::create_dir_all(&base)?;
    let dir = tempfile::Builder::new().prefix("nvmirror-bench-uring-").tempdir_in(&base)?;
    let path = dir.path().join("file");
    let dev = UringDevice::create(&path, p.file_bytes).context("the io_uring engine on the bench file")?;
    // Written once whole: both arms then overwrite allocated, written blocks.
    let chunk = vec![0x77u8; 1 << 20];
    let mut at = 0;
    while at < p.file_bytes {
        dev.write_many(&[WriteOp { offset: at, buf: &chunk }])?;
        at += chunk.len() as u64;
    }
    dev.flush()?;

    let have_fio = fio_available();
    let blocks = p.file_bytes / BLOCK;
    let data = vec![0xa5u8; 4096];
    let mut rng = XorShift::new(0x0075_7269_6e67);
    let ops = p.ops_per_batch;
    let mut ours_iops: Vec<f64> = Vec::new();
    let mut fio_runs: Vec<(f64, f64, Value)> = Vec::new();
    let cpu = CpuProbe::with_children(Vec::new());
    {
        let mut arms = vec![Arm::new(
            "ours",
            Some(DEPTH),
            Box::new(|b| {
                let t = Instant::now();
                dev.write_stream(
                    &data,
                    ops,
                    DEPTH,
                    || rng.below(blocks) * BLOCK,
                    |ns| b.record(Duration::from_nanos(ns)),
                )?;
                ours_iops.push(ops as f64 / t.elapsed().as_secs_f64());
                Ok(())
            }),
        )];
        if have_fio {
            arms.push(Arm::new(
                "fio",
                Some(DEPTH),
                Box::new(|b| {
                    let (iops, mean, w) = fio(&path, p.file_bytes, ops)?;
                    for _ in 0..ops {
                        b.record(Duration::from_secs_f64(mean / 1e9));
                    }
                    fio_runs.push((iops, mean, w));
                    Ok(())
                }),
            ));
        }
        interleave("uring-fio", p.plan, &cpu, &mut arms)?;
        let stats: Vec<_> = arms.into_iter().map(|a| a.stats).collect();
        // The warm-up rounds pushed figures too: keep the measured rounds only.
        let skip = p.plan.warmup_rounds;
        let ours_r: Vec<f64> = ours_iops[skip..].to_vec();
        let fio_r: Vec<f64> = fio_runs.iter().skip(skip).map(|r| r.0).collect();
        let total = |v: &[f64]| {
            // Same ops per round: the overall rate is the harmonic mean of the rounds'.
            v.len() as f64 / v.iter().map(|x| 1.0 / x.max(f64::MIN_POSITIVE)).sum::<f64>()
        };
        let ours_total = total(&ours_r);
        let mut notes = vec![format!("ours: {ours_total:.0} IOPS (writes over the wall time of each stream)")];
        let check = if have_fio {
            let fio_total = total(&fio_r);
            let last = &fio_runs.last().expect("a fio run").2;
            let pct = |k: &str| last["clat_ns"]["percentile"][k].as_f64().unwrap_or(0.0) / 1000.0;
            notes.push(format!(
                "fio: {fio_total:.0} IOPS (its own report); its last run's completion latency p50 {:.1} us, p99 {:.1} \
                 us, p99.9 {:.1} us",
                pct("50.000000"),
                pct("99.000000"),
                pct("99.900000")
            ));
            let per_round = Spread::of(ours_r.len().min(fio_r.len()), |i| ours_r[i] / fio_r[i].max(f64::MIN_POSITIVE));
            Some(Check::at_least(
                "IOPS(ours) / IOPS(fio)",
                ours_total / fio_total.max(f64::MIN_POSITIVE),
                0.9,
                per_round,
            ))
        } else {
            notes.push("fio is not installed (apt-get install fio): no ratio".into());
            None
        };
        Ok(ScenarioResult {
            name: "uring-fio".into(),
            description: format!(
                "4 KiB random writes at queue depth {DEPTH}, O_DIRECT, on one {} MiB file: the io_uring engine against \
                 fio --ioengine=io_uring --direct=1 on the same file",
                p.file_bytes >> 20
            ),
            params: json!({
                "file_bytes": p.file_bytes,
                "ops_per_batch": ops,
                "queue_depth": DEPTH,
                "plan": p.plan,
                "fio": have_fio,
                "ours_iops_per_round": ours_r,
                "fio_iops_per_round": fio_r,
            }),
            cpu_counted: format!("{} (fio's own CPU is not counted)", cpu.describe()),
            arms: stats.iter().map(|s| s.result()).collect(),
            check,
            notes,
        })
    }
}
