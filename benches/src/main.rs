//! nvmirror benchmark harness.
//!
//! ```text
//! cargo run --release -p nvmirror-benches -- [--quick] [--out DIR] [--node-bin PATH] SCENARIO...
//! ```
//!
//! Scenarios (by name, or `all`): `hop` (one replication hop against a TCP ping-pong),
//! `nbd-peers` (fio's nbd engine against nbdkit, qemu-nbd and nvmirror, unmirrored and
//! mirrored, at queue depths 32 and 1; six ratios), `nbd-qd1` and `nbd-qd32` (end to end through NBD on two node processes, mirrored
//! against unmirrored), `qd-sweep` (queue depths 1 to 64), `nbd-open` (open loop at `--rate` writes/s,
//! coordinated omission corrected), `raid-write` (full-stripe RAID-4
//! writes against the same bytes written raw), `xor-cache`, `xor-memory` and `xor-portable`
//! (the RAID-4 XOR against ISA-L's `xor_gen`, built with `--features isal`, and the
//! portable path), `uring-fio` (the io_uring engine against fio at queue depth 32), `failover` (failover
//! command to writable primary with a nearly full 64 MiB log partition to replay), and, only when named,
//! `rdma-guest` (the RDMA engine against perftest inside the hw-tests QEMU guest), `drbd-guest` (nvmirror
//! against DRBD in two QEMU guests joined by one link, `hw-tests/pair`) and `nvmf-guest` (nvmirror's
//! NVMe/TCP target against the kernel's nvmet-tcp, in the hw-tests guest). Every scenario runs its system
//! and its floor interleaved in the same run, batch by batch, after warm-up rounds
//! ([`measure`]); the figures are HdrHistogram percentiles, throughput, and CPU time per
//! operation. At the end the harness prints a table with each scenario's ratio against its
//! floor, the target and PASS or FAIL, and writes one JSON file for the run into `--out`
//! (default `benches/results/`). A failing ratio is reported, never hidden; the exit
//! status is non-zero only when the harness itself failed. `--quick` runs a few
//! iterations only (for the test suite): its figures mean nothing.

mod cluster;
mod direct;
mod drbd;
mod failover;
mod floor;
mod guest;
mod hop;
mod measure;
mod nbd;
mod peers;
mod plot;
mod raid;
mod report;
mod tls;
mod uring;
mod xor;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::report::{RunResult, ScenarioResult};

/// Every scenario, in the order `all` runs them.
const SCENARIOS: [&str; 14] = [
    "hop",
    "nbd-peers",
    "nbd-tls",
    "direct-log",
    "nbd-qd1",
    "nbd-qd32",
    "qd-sweep",
    "nbd-open",
    "raid-write",
    "xor-cache",
    "xor-memory",
    "xor-portable",
    "uring-fio",
    "failover",
];
/// Scenarios run only when named: they boot QEMU guests (minutes).
const GUEST_SCENARIOS: [&str; 3] = ["rdma-guest", "drbd-guest", "nvmf-guest"];
/// The scenarios that run `nvmirror` node processes.
const NODE_SCENARIOS: [&str; 8] =
    ["nbd-peers", "nbd-tls", "direct-log", "nbd-qd1", "nbd-qd32", "qd-sweep", "nbd-open", "failover"];

#[derive(Parser, Debug)]
#[command(name = "nvmirror-benches", about = "nvmirror benchmarks, each measured interleaved with its floor")]
struct Cli {
    /// A few iterations only, to check that the scenarios run (figures are meaningless).
    #[arg(long)]
    quick: bool,
    /// Directory for the run's JSON result file.
    #[arg(long, default_value_os_t = default_out())]
    out: PathBuf,
    /// The `nvmirror` binary for the node processes (default: build it with cargo and
    /// take it from beside this executable).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// Writes per second of the open-loop scenario (nbd-open).
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Scenarios to run: hop, nbd-peers, nbd-tls, direct-log, nbd-qd1, nbd-qd32, qd-sweep, nbd-open, raid-write, xor-cache, xor-memory,
    /// xor-portable, uring-fio, or all; and, only when named, rdma-guest, drbd-guest and nvmf-guest.
    #[arg(required = true)]
    scenarios: Vec<String>,
}

fn default_out() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results")
}

fn selected(names: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for n in names {
        let add: Vec<&str> = match n.as_str() {
            "all" => SCENARIOS.to_vec(),
            s if SCENARIOS.contains(&s) || GUEST_SCENARIOS.contains(&s) => vec![s],
            s => bail!(
                "unknown scenario {s:?}; scenarios: {}, all (which leaves out {})",
                SCENARIOS.iter().chain(&GUEST_SCENARIOS).copied().collect::<Vec<_>>().join(", "),
                GUEST_SCENARIOS.join(", ")
            ),
        };
        for s in add {
            if !out.iter().any(|o| o == s) {
                out.push(s.to_string());
            }
        }
    }
    Ok(out)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let names = selected(&cli.scenarios)?;
    let (timestamp_utc, stamp) = report::timestamp();
    let started = Instant::now();
    let needs_nodes = names.iter().any(|n| NODE_SCENARIOS.contains(&n.as_str()));
    let bin = if needs_nodes { Some(cluster::node_binary(cli.node_bin.as_deref())?) } else { None };
    let mut scenarios: Vec<ScenarioResult> = Vec::new();
    for name in &names {
        eprintln!("[harness] scenario {name}{}", if cli.quick { " (quick)" } else { "" });
        let t = Instant::now();
        let bin = || bin.as_deref().context("node binary");
        if name == "nbd-peers" || name == "nbd-tls" || name == "direct-log" {
            let results = match name.as_str() {
                "nbd-peers" => peers::run(bin()?, cli.quick),
                "nbd-tls" => tls::run(bin()?, cli.quick),
                _ => direct::run(bin()?, cli.quick),
            }
            .with_context(|| format!("scenario {name}"))?;
            eprintln!("[harness] scenario {name} done in {:.1} s", t.elapsed().as_secs_f64());
            scenarios.extend(results);
            continue;
        }
        let result = match name.as_str() {
            "hop" => hop::run(cli.quick),
            "nbd-qd1" => nbd::qd1(bin()?, cli.quick),
            "nbd-qd32" => nbd::qd32(bin()?, cli.quick),
            "qd-sweep" => nbd::sweep(bin()?, cli.quick),
            "nbd-open" => nbd::open(bin()?, cli.quick, cli.rate),
            "raid-write" => raid::run(cli.quick),
            "xor-cache" => xor::cache(cli.quick),
            "xor-memory" => xor::memory(cli.quick),
            "xor-portable" => xor::portable(cli.quick),
            "uring-fio" => uring::run(cli.quick),
            "failover" => failover::run(bin()?, cli.quick),
            "rdma-guest" => guest::run(),
            "drbd-guest" => drbd::run(),
            "nvmf-guest" => guest::run_nvmf(),
            other => unreachable!("scenario {other} was checked"),
        }
        .with_context(|| format!("scenario {name}"))?;
        eprintln!("[harness] scenario {name} done in {:.1} s", t.elapsed().as_secs_f64());
        scenarios.push(result);
    }
    let run = RunResult {
        harness: "nvmirror-benches",
        command: std::env::args().collect(),
        quick: cli.quick,
        timestamp_utc,
        git: report::git(),
        machine: report::machine(),
        wall_s: started.elapsed().as_secs_f64(),
        scenarios,
    };
    let path = report::write_json(&cli.out, &stamp, &names, &run)?;
    let plots = plot::write(&cli.out, &stamp, &run)?;
    println!("{}", report::table(&run));
    println!("results: {}", path.display());
    for p in plots {
        println!("plot: {}", p.display());
    }
    Ok(())
}
