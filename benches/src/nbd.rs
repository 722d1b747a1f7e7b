//! Scenarios `nbd-qd1`, `nbd-qd32` and `qd-sweep`: end to end through NBD on two real
//! node processes (see [`crate::cluster`]).
//!
//! Method. The harness connects one [`NbdClient`] to the mirrored volume `bench` and one
//! to the unmirrored volume `plain` of node A, and writes 4 KiB blocks at random
//! block-aligned offsets (xorshift, the whole volume). At queue depth N it keeps N
//! requests in flight with `send`/`recv` (pipelined simple requests, one cookie per slot);
//! each write's latency is from just before its request is sent to the moment its reply is
//! read. Throughput is writes over the wall time of the arm's own batches. The arms run
//! interleaved, batch by batch, in one run ([`crate::measure`]).
//!
//! - `nbd-qd1`: mirrored, plain and a loopback TCP ping-pong ([`PingPong`], the `hop`
//!   floor) at queue depth 1. A mirrored write costs a plain write plus one replication
//!   round trip at best. Target: p50(mirrored) <= 1.5 x (p50(plain) + p50(ping-pong)).
//! - `nbd-qd32`: mirrored and plain at queue depth 32. Target: mirrored throughput at
//!   least 0.7 x plain.
//! - `qd-sweep`: mirrored and plain at queue depths 1 to 64: throughput and latency per
//!   depth, no target.
//! - `nbd-open`: mirrored and plain under an open-loop load: writes sent at a fixed rate
//!   (`--rate`) whatever the replies do, by one thread, their replies read by another.
//!   Each latency counts from the write's *scheduled* send time, not from when it was
//!   sent, so a stall delays every write scheduled during it in the figures too
//!   (coordinated omission corrected, as wrk2 does). No target.
//!
//! Each scenario starts its own pair of nodes, so that no scenario inherits another's log
//! or cache state. Its warm-up writes at least [`WARMUP_WRITES`] blocks per volume, which
//! takes both NVLog partitions (and the mirror's log files) through one CP cycle, so that
//! the first touch of their fresh pages (page faults, block allocation) is not measured.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use nvmirror_dataplane::format::BLOCK_BYTES;
use nvmirror_dataplane::frontend::nbd_client::{NbdClient, CMD_WRITE};
use nvmirror_dataplane::usize_of;
use serde_json::json;

use crate::cluster::{Cluster, Geometry, MIRRORED, PLAIN};
use crate::floor::PingPong;
use crate::measure::{interleave, Arm, Batch, Plan, Spread, XorShift};
use crate::report::{Check, ScenarioResult};

const BLOCK_U32: u32 = 4096;
const _: () = assert!(BLOCK_U32 as usize == BLOCK_BYTES);

/// Writes per volume before measuring: more than both partitions of a 16 MiB log hold
/// (2 x 4032 entries of 4 KiB).
pub const WARMUP_WRITES: u64 = 10_000;

/// Queue depths of `qd-sweep`.
pub const SWEEP_DEPTHS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

/// Random 4 KiB writes to one export.
struct Writer {
    client: NbdClient,
    blocks: u64,
    rng: XorShift,
    data: Vec<u8>,
    written: u64,
    /// Send time per slot; the cookie of a request is its slot.
    started: Vec<Option<Instant>>,
    free: Vec<u64>,
}

impl Writer {
    fn new(client: NbdClient, volume_bytes: u64, seed: u64) -> Writer {
        Writer {
            client,
            blocks: volume_bytes / BLOCK_BYTES as u64,
            rng: XorShift::new(seed),
            data: vec![0xa5; BLOCK_BYTES],
            written: 0,
            started: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Writes `count` blocks at `rate` writes per second, open loop: one thread sends on
    /// schedule, another reads the replies. Records each latency from the write's scheduled
    /// time; returns how far behind its schedule the sender fell at most.
    fn run_open(&mut self, rate: u64, count: u64, batch: &mut Batch<'_>) -> Result<std::time::Duration> {
        use std::sync::atomic::{AtomicU64, Ordering};
        let rate = rate.max(1);
        let scheduled = |i: u64| std::time::Duration::from_nanos(i.saturating_mul(1_000_000_000) / rate);
        let mut replies = self.client.try_clone()?;
        // Scheduled send time of each write, in ns from `t0`, by cookie (the write's index).
        let planned: Vec<AtomicU64> = (0..count).map(|_| AtomicU64::new(0)).collect();
        let t0 = Instant::now();
        let mut lag = std::time::Duration::ZERO;
        let (sent, latencies) = std::thread::scope(|s| -> Result<(u64, Vec<u64>)> {
            let planned = &planned;
            let receiver = s.spawn(move || -> Result<Vec<u64>> {
                let mut out = Vec::with_capacity(usize_of(count));
                for _ in 0..count {
                    let reply = replies.recv(None)?;
                    let now = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    if reply.error != 0 {
                        bail!("NBD write failed with error {}", reply.error);
                    }
                    let at = planned
                        .get(usize_of(reply.cookie))
                        .ok_or_else(|| anyhow::anyhow!("reply for cookie {} never sent", reply.cookie))?
                        .load(Ordering::Acquire);
                    out.push(now.saturating_sub(at));
                }
                Ok(out)
            });
            let mut sent = 0;
            for i in 0..count {
                let due = scheduled(i);
                loop {
                    let now = t0.elapsed();
                    if now >= due {
                        lag = lag.max(now - due);
                        break;
                    }
                    // Sleep when far from the next send; yield (never spin: 2 cores) when close.
                    let left = due - now;
                    if left > std::time::Duration::from_micros(200) {
                        std::thread::sleep(left - std::time::Duration::from_micros(100));
                    } else {
                        std::thread::yield_now();
                    }
                }
                planned[usize_of(i)].store(u64::try_from(due.as_nanos()).unwrap_or(u64::MAX), Ordering::Release);
                self.written += 1;
                self.data[..8].copy_from_slice(&self.written.to_le_bytes());
                let offset = self.rng.below(self.blocks) * BLOCK_BYTES as u64;
                self.client.send(CMD_WRITE, i, offset, BLOCK_U32, &self.data)?;
                sent += 1;
            }
            let latencies = receiver.join().map_err(|_| anyhow::anyhow!("the reply reader panicked"))??;
            Ok((sent, latencies))
        })?;
        debug_assert_eq!(sent, count);
        for ns in latencies {
            batch.record(std::time::Duration::from_nanos(ns));
        }
        Ok(lag)
    }

    /// Writes `count` blocks with `qd` requests in flight, recording each latency.
    fn run(&mut self, qd: usize, count: u64, batch: &mut Batch<'_>) -> Result<()> {
        let qd = qd.max(1);
        self.started.clear();
        self.started.resize(qd, None);
        self.free.clear();
        self.free.extend((0..qd as u64).rev());
        let (mut sent, mut done) = (0u64, 0u64);
        while done < count {
            while sent < count {
                let Some(slot) = self.free.pop() else { break };
                self.written += 1;
                self.data[..8].copy_from_slice(&self.written.to_le_bytes());
                let offset = self.rng.below(self.blocks) * BLOCK_BYTES as u64;
                self.started[usize_of(slot)] = Some(Instant::now());
                self.client.send(CMD_WRITE, slot, offset, BLOCK_U32, &self.data)?;
                sent += 1;
            }
            let reply = self.client.recv(None)?;
            let started = match self.started.get_mut(usize_of(reply.cookie)).and_then(Option::take) {
                Some(t) => t,
                None => bail!("NBD reply for cookie {} that is not in flight", reply.cookie),
            };
            let elapsed = started.elapsed();
            if reply.error != 0 {
                bail!("NBD write failed with error {}", reply.error);
            }
            batch.record(elapsed);
            self.free.push(reply.cookie);
            done += 1;
        }
        Ok(())
    }
}

struct Counts {
    plan: Plan,
    batch_ops: u64,
}

fn setup(scenario: &str, bin: &Path, quick: bool) -> Result<(Cluster, Writer, Writer)> {
    let cluster = Cluster::start(scenario, bin, Geometry::new(quick))?;
    let volume_bytes = cluster.geometry.volume_bytes;
    let mirrored = Writer::new(cluster.connect(MIRRORED)?, volume_bytes, 0x6d69_7272);
    let plain = Writer::new(cluster.connect(PLAIN)?, volume_bytes, 0x706c_6169);
    Ok((cluster, mirrored, plain))
}

fn common_params(cluster: &Cluster, counts: &Counts) -> serde_json::Value {
    json!({
        "block_bytes": BLOCK_BYTES,
        "volume_bytes": cluster.geometry.volume_bytes,
        "log_bytes": cluster.geometry.log_bytes,
        "nvram_mode": "file",
        "transport": "tcp",
        "policy": "strict",
        "baseline_s": cluster.baseline_s,
        "batch_ops": counts.batch_ops,
        "plan": counts.plan,
    })
}

/// Both volumes' status on node A and the mirror's on node B, at the end of the scenario
/// (cumulative counters: baseline and warm-up included).
fn final_status(cluster: &Cluster) -> serde_json::Value {
    let mirror = cluster.mirror_status();
    let entries_per_commit = match (mirror["entries_received"].as_u64(), mirror["commits"].as_u64()) {
        (Some(e), Some(c)) if c > 0 => json!(e as f64 / c as f64),
        _ => serde_json::Value::Null,
    };
    json!({
        MIRRORED: cluster.volume_status(MIRRORED),
        PLAIN: cluster.volume_status(PLAIN),
        "mirror_on_b": mirror,
        "mirror_entries_per_group_commit": entries_per_commit,
    })
}

pub fn qd1(bin: &Path, quick: bool) -> Result<ScenarioResult> {
    let counts = if quick {
        Counts { plan: Plan { warmup_rounds: 1, rounds: 2 }, batch_ops: 30 }
    } else {
        Counts { plan: Plan { warmup_rounds: usize_of(WARMUP_WRITES / 1000), rounds: 30 }, batch_ops: 1000 }
    };
    let (cluster, mut mirrored, mut plain) = setup("nbd-qd1", bin, quick)?;
    let mut floor = PingPong::start()?;
    let mut floor_seq = 0u64;
    let cpu = cluster.cpu_probe()?;
    let n = counts.batch_ops;
    let mut arms = [
        Arm::new("mirrored", Some(1), Box::new(|b| mirrored.run(1, n, b))),
        Arm::new("plain", Some(1), Box::new(|b| plain.run(1, n, b))),
        Arm::new(
            "ping-pong",
            Some(1),
            Box::new(|b| {
                for _ in 0..n {
                    floor_seq += 1;
                    b.record(floor.round_trip(floor_seq)?);
                }
                Ok(())
            }),
        ),
    ];
    interleave("nbd-qd1", counts.plan, &cpu, &mut arms)?;
    let [m, p, f] = arms.map(|a| a.stats);
    let ratio = m.p50_ns() as f64 / (p.p50_ns() + f.p50_ns()).max(1) as f64;
    let per_round = Spread::of(m.rounds.len(), |i| {
        m.rounds[i].p50_ns as f64 / (p.rounds[i].p50_ns + f.rounds[i].p50_ns).max(1) as f64
    });
    let mut params = common_params(&cluster, &counts);
    params["final_status"] = final_status(&cluster);
    Ok(ScenarioResult {
        name: "nbd-qd1".into(),
        description: "4 KiB random writes through NBD at queue depth 1 on two node processes (loopback): mirrored \
                      volume vs the same node's unmirrored volume, and a loopback TCP ping-pong of a replication \
                      hop's bytes"
            .into(),
        params,
        cpu_counted: format!("{}; the ping-pong runs in the harness process", cpu.describe()),
        check: Some(Check::at_most("p50(mirrored) / (p50(plain) + p50(ping-pong))", ratio, 1.5, per_round)),
        arms: vec![m.result(), p.result(), f.result()],
        notes: Vec::new(),
    })
}

pub fn qd32(bin: &Path, quick: bool) -> Result<ScenarioResult> {
    let counts = if quick {
        Counts { plan: Plan { warmup_rounds: 1, rounds: 2 }, batch_ops: 100 }
    } else {
        Counts { plan: Plan { warmup_rounds: usize_of(WARMUP_WRITES / 5000), rounds: 12 }, batch_ops: 5000 }
    };
    let (cluster, mut mirrored, mut plain) = setup("nbd-qd32", bin, quick)?;
    let cpu = cluster.cpu_probe()?;
    let n = counts.batch_ops;
    let mut arms = [
        Arm::new("mirrored", Some(32), Box::new(|b| mirrored.run(32, n, b))),
        Arm::new("plain", Some(32), Box::new(|b| plain.run(32, n, b))),
    ];
    interleave("nbd-qd32", counts.plan, &cpu, &mut arms)?;
    let [m, p] = arms.map(|a| a.stats);
    let ratio = m.throughput() / p.throughput().max(f64::MIN_POSITIVE);
    let per_round =
        Spread::of(m.rounds.len(), |i| m.rounds[i].throughput() / p.rounds[i].throughput().max(f64::MIN_POSITIVE));
    let mut params = common_params(&cluster, &counts);
    params["queue_depth"] = json!(32);
    params["final_status"] = final_status(&cluster);
    Ok(ScenarioResult {
        name: "nbd-qd32".into(),
        description: "4 KiB random writes through NBD at queue depth 32 (pipelined) on two node processes \
                      (loopback): throughput of the mirrored volume vs the same node's unmirrored volume"
            .into(),
        params,
        cpu_counted: cpu.describe(),
        check: Some(Check::at_least("throughput(mirrored) / throughput(plain)", ratio, 0.7, per_round)),
        arms: vec![m.result(), p.result()],
        notes: Vec::new(),
    })
}

pub fn sweep(bin: &Path, quick: bool) -> Result<ScenarioResult> {
    let counts = if quick {
        Counts { plan: Plan { warmup_rounds: 1, rounds: 1 }, batch_ops: 128 }
    } else {
        Counts { plan: Plan { warmup_rounds: 1, rounds: 6 }, batch_ops: 2000 }
    };
    let (cluster, mut mirrored, mut plain) = setup("qd-sweep", bin, quick)?;
    let cpu = cluster.cpu_probe()?;
    let n = counts.batch_ops;
    let mut results = Vec::new();
    let started = Instant::now();
    // One warm-up for the whole sweep, at queue depth 32 (quick); each depth then has its
    // own short warm-up.
    let warmup_ops = if quick { n } else { WARMUP_WRITES };
    let mut warmup = [
        Arm::new("mirrored", Some(32), Box::new(|b| mirrored.run(32, warmup_ops, b))),
        Arm::new("plain", Some(32), Box::new(|b| plain.run(32, warmup_ops, b))),
    ];
    interleave("qd-sweep warm-up", Plan { warmup_rounds: 1, rounds: 0 }, &cpu, &mut warmup)?;
    drop(warmup);
    for qd in SWEEP_DEPTHS {
        let mut arms = [
            Arm::new(&format!("mirrored qd{qd}"), Some(qd), Box::new(|b| mirrored.run(qd, n, b))),
            Arm::new(&format!("plain qd{qd}"), Some(qd), Box::new(|b| plain.run(qd, n, b))),
        ];
        interleave(&format!("qd-sweep qd{qd}"), counts.plan, &cpu, &mut arms)?;
        let [m, p] = arms.map(|a| a.stats);
        results.push(m.result());
        results.push(p.result());
    }
    let mut params = common_params(&cluster, &counts);
    params["queue_depths"] = json!(SWEEP_DEPTHS);
    params["final_status"] = final_status(&cluster);
    Ok(ScenarioResult {
        name: "qd-sweep".into(),
        description: "4 KiB random writes through NBD at queue depths 1..64 on two node processes (loopback), \
                      mirrored vs unmirrored volume, interleaved per depth; no target"
            .into(),
        params,
        cpu_counted: cpu.describe(),
        check: None,
        arms: results,
        notes: vec![format!("sweep took {:.1} s", started.elapsed().as_secs_f64())],
    })
}

pub fn open(bin: &Path, quick: bool, rate: u64) -> Result<ScenarioResult> {
    let (counts, rate) = if quick {
        (Counts { plan: Plan { warmup_rounds: 1, rounds: 1 }, batch_ops: 100 }, rate.min(2000))
    } else {
        // Batches of two seconds of load each.
        (Counts { plan: Plan { warmup_rounds: 2, rounds: 8 }, batch_ops: rate.saturating_mul(2).max(1) }, rate)
    };
    let (cluster, mut mirrored, mut plain) = setup("nbd-open", bin, quick)?;
    let cpu = cluster.cpu_probe()?;
    let n = counts.batch_ops;
    let (mut lag_m, mut lag_p) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    let mut arms = [
        Arm::new(
            "mirrored",
            None,
            Box::new(|b| {
                lag_m = lag_m.max(mirrored.run_open(rate, n, b)?);
                Ok(())
            }),
        ),
        Arm::new(
            "plain",
            None,
            Box::new(|b| {
                lag_p = lag_p.max(plain.run_open(rate, n, b)?);
                Ok(())
            }),
        ),
    ];
    interleave("nbd-open", counts.plan, &cpu, &mut arms)?;
    let [m, p] = arms.map(|a| a.stats);
    let mut params = common_params(&cluster, &counts);
    params["rate_writes_per_s"] = json!(rate);
    params["final_status"] = final_status(&cluster);
    let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
    Ok(ScenarioResult {
        name: "nbd-open".into(),
        description: format!(
            "4 KiB random writes through NBD sent open loop at {rate} writes/s on two node processes (loopback), \
             mirrored vs unmirrored volume; latency from each write's scheduled send time (coordinated omission \
             corrected); no target"
        ),
        params,
        cpu_counted: cpu.describe(),
        check: None,
        arms: vec![m.result(), p.result()],
        notes: vec![format!(
            "the sender fell behind its schedule by at most {:.0} us (mirrored) and {:.0} us (plain); those delays \
             are in the latencies",
            us(lag_m),
            us(lag_p)
        )],
    })
}
