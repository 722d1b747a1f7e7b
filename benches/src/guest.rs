//! `rdma-guest`: the RDMA engine against perftest, inside the QEMU guest of `hw-tests/`
//! (soft-RoCE on a veth pair; these machines have no RDMA device).
//!
//! The scenario runs `hw-tests/run` with only the tests `rxe-up` and `rdma-hop`: the
//! guest interleaves five rounds of our durable append (RDMA WRITE + READ after it, real
//! link, real destination) at queue depth 1 with perftest's `ib_read_lat` of 4 KiB, then
//! five rounds of our batched append at queue depth 32 (with and without the staging copy)
//! with `ib_write_bw`'s message rate at the same depth (see
//! hw-tests/guest/tests/rdma-hop.sh). The figures come back as the
//! guest's `hwt-figure` lines; the targets: median ≤ 1.3x `ib_read_lat` at qd1, and at
//! least 0.7x `ib_write_bw`'s message rate at qd32. It boots a guest (minutes), so it is
//! not part of `all`, and the test suite does not run it.

use std::collections::HashMap;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::measure::{ArmResult, Latency};
use crate::report::{workspace_root, Check, ScenarioResult};

fn arm(name: &str, p50_us: f64, p99_us: f64, p999_us: f64, ops_s: f64, queue_depth: usize) -> ArmResult {
    ArmResult {
        name: name.into(),
        queue_depth: Some(queue_depth),
        ops: 0,
        wall_s: 0.0,
        latency_us: Latency { p50: p50_us, p90: 0.0, p99: p99_us, p99_9: p999_us, max: 0.0, mean: 0.0 },
        throughput_ops_s: ops_s,
        cpu_us_per_op: 0.0,
        round_p50_us: Vec::new(),
        round_throughput_ops_s: Vec::new(),
        curve: Vec::new(),
    }
}

/// Runs `hw-tests/run` with only the tests `only` (and `env` on top of the caller's); returns
/// the figures the guest reported.
pub fn guest_figures(only: &str, env: &[(&str, &str)]) -> Result<HashMap<String, f64>> {
    let root = workspace_root();
    let out = Command::new(root.join("hw-tests/run"))
        .env("HW_TESTS_ONLY", only)
        .envs(env.iter().copied())
        .current_dir(&root)
        .output()
        .context("run hw-tests/run")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("hw-tests/run failed ({}):\n{}", out.status, text.lines().rev().take(30).collect::<Vec<_>>().join("\n"));
    }
    // "hw-tests:   NAME = VALUE" lines (the last value of a name wins: the medians come last).
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("hw-tests:   "))
        .filter_map(|l| l.split_once(" = "))
        .filter_map(|(k, v)| v.trim().parse::<f64>().ok().map(|v| (k.trim().to_string(), v)))
        .collect())
}

pub fn run() -> Result<ScenarioResult> {
    eprintln!("[rdma-guest] hw-tests/run with rxe-up and rdma-hop (boots a QEMU guest: minutes)");
    let figures = guest_figures("rxe-up rdma-hop", &[])?;
    let get = |k: &str| figures.get(k).copied().with_context(|| format!("the guest reported no {k}"));
    let ours_qd1 = get("rdma_append_median_of_rounds_us")?;
    let floor_qd1 = get("ib_read_lat_4096B_median_of_rounds_us")?;
    let ours_qd32 = get("rdma_append_qd32_median_entries_per_s")?;
    let floor_qd32 = get("ib_write_bw_4096B_qd32_median_msg_per_s")?;
    let ratio_qd1 = ours_qd1 / floor_qd1.max(f64::MIN_POSITIVE);
    let ratio_qd32 = ours_qd32 / floor_qd32.max(f64::MIN_POSITIVE);
    let opt = |k: &str| figures.get(k).copied().unwrap_or(0.0);
    let qd32 = Check::at_least("entries/s(ours, qd32) / msg/s(ib_write_bw, qd32)", ratio_qd32, 0.7, None);
    Ok(ScenarioResult {
        name: "rdma-guest".into(),
        description: "inside the hw-tests QEMU guest over soft-RoCE: durable append of a 4 KiB entry (RDMA WRITE + \
                      READ after it) at qd1 against perftest ib_read_lat 4 KiB; batched at qd32 against ib_write_bw \
                      4 KiB message rate at tx depth 32, entries sent from the NVLog and (arm 'staging') copied \
                      through the staging ring; medians of five interleaved rounds each"
            .into(),
        params: json!({ "figures": figures }),
        cpu_counted: "not measured (inside the guest)".into(),
        arms: vec![
            arm("ours qd1", ours_qd1, opt("rdma_append_4096B_p99_us"), opt("rdma_append_4096B_p999_us"), 0.0, 1),
            arm(
                "ib_read_lat 4 KiB",
                floor_qd1,
                opt("ib_read_lat_4096B_p99_us"),
                opt("ib_read_lat_4096B_p999_us"),
                0.0,
                1,
            ),
            arm("ours qd32", 0.0, 0.0, 0.0, ours_qd32, 32),
            arm("ours qd32 staging", 0.0, 0.0, 0.0, opt("rdma_append_qd32_staging_median_entries_per_s"), 32),
            arm("ib_write_bw 4 KiB", 0.0, 0.0, 0.0, floor_qd32, 32),
        ],
        check: Some(Check::at_most("p50(ours, qd1) / typical(ib_read_lat 4 KiB)", ratio_qd1, 1.3, None)),
        notes: vec![format!("second target: {} = {ratio_qd32:.3} (target >= 0.7) {}", qd32.metric, qd32.verdict())],
    })
}

/// `nvmf-guest`: nvmirror's NVMe/TCP target against the kernel's nvmet-tcp and against
/// nvmirror through the kernel's NBD client, inside the hw-tests guest
/// (hw-tests/guest/tests/nvmf-bench.sh): fio, 4 KiB random writes, qd1 and qd32, three
/// rounds of 10 s, medians. The target: at least 0.9x nvmet-tcp's IOPS at qd32 for an
/// unmirrored volume.
pub fn run_nvmf() -> Result<ScenarioResult> {
    eprintln!("[nvmf-guest] hw-tests/run with nvmf-bench, 3 rounds of 10 s (boots a QEMU guest: minutes)");
    let figures = guest_figures("nvmf-bench", &[("HW_TESTS_NVMF_ROUNDS", "3"), ("HW_TESTS_NVMF_SECS", "10")])?;
    let get = |k: &str| figures.get(k).copied().with_context(|| format!("the guest reported no {k}"));
    let mut arms = Vec::new();
    for (system, label) in
        [("nvmf", "nvmirror NVMe/TCP"), ("nvmet", "nvmet-tcp (kernel)"), ("nbd", "nvmirror NBD (kernel client)")]
    {
        for qd in [1usize, 32] {
            let k = |what: &str| format!("nvmf_bench_{system}_qd{qd}_{what}");
            arms.push(arm(
                &format!("{label} qd{qd}"),
                get(&k("p50_us"))?,
                get(&k("p99_us"))?,
                0.0,
                get(&k("iops"))?,
                qd,
            ));
        }
    }
    let ratio32 = get("nvmf_bench_nvmf_qd32_iops")? / get("nvmf_bench_nvmet_qd32_iops")?.max(f64::MIN_POSITIVE);
    let ratio1 = get("nvmf_bench_nvmf_qd1_p50_us")? / get("nvmf_bench_nvmet_qd1_p50_us")?.max(f64::MIN_POSITIVE);
    let nbd32 = get("nvmf_bench_nbd_qd32_iops")?;
    Ok(ScenarioResult {
        name: "nvmf-guest".into(),
        description: "inside the hw-tests QEMU guest (TCG), loopback, every backing file on one tmpfs: fio libaio \
                      O_DIRECT 4 KiB random writes over 128 MiB at qd1 and qd32 on nvmirror's NVMe/TCP namespace \
                      (unmirrored volume), on the kernel's nvmet-tcp (file, buffered) and on nvmirror's NBD export \
                      through the kernel's NBD client; medians of three rounds of 10 s, the order turning"
            .into(),
        params: json!({ "figures": figures }),
        cpu_counted: "not measured (inside the guest)".into(),
        arms,
        check: Some(Check::at_least("IOPS(nvmirror NVMe/TCP, qd32) / IOPS(nvmet-tcp, qd32)", ratio32, 0.9, None)),
        notes: vec![
            format!("p50(nvmirror NVMe/TCP, qd1) / p50(nvmet-tcp, qd1) = {ratio1:.3}"),
            format!(
                "IOPS(nvmirror NVMe/TCP, qd32) / IOPS(nvmirror NBD, qd32) = {:.3}",
                get("nvmf_bench_nvmf_qd32_iops")? / nbd32.max(f64::MIN_POSITIVE)
            ),
        ],
    })
}
