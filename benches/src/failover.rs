//! `failover`: how long a failover takes with a full log to replay.
//!
//! Each round starts two node processes, mirrors a volume whose NVLog partitions are
//! 64 MiB, writes 4 KiB random blocks through NBD at queue depth 32 until the active
//! partition is nearly full (no CP has applied them on the mirror yet), kills the source
//! with SIGKILL, and times on the mirror `POST /failover` (the epoch raised, every logged
//! entry replayed, the volume started as a primary) and the first write acknowledged by
//! the promoted volume after it: failover command to writable primary. The target (the
//! control-plane issue's) is under one second.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nvmirror_control::api::{Client, CreateVolume};
use nvmirror_control::cluster::NodeProc;
use nvmirror_control::workload::Workload;
use nvmirror_dataplane::frontend::nbd_client::NbdClient;
use serde_json::{json, Value};

use crate::measure::{new_histogram, ArmStats, Progress, RoundFigures, Spread};
use crate::report::{Check, ScenarioResult};

const VOL: &str = "fo";
const ENTRY_BYTES: u64 = 4096 + 64;

struct Params {
    volume_bytes: u64,
    log_bytes: u64,
    rounds: usize,
}

fn arm(name: &str) -> ArmStats {
    ArmStats {
        name: name.into(),
        queue_depth: None,
        hist: new_histogram(),
        ops: 0,
        wall: Duration::ZERO,
        cpu_ns: 0,
        rounds: Vec::new(),
    }
}

fn record(a: &mut ArmStats, d: Duration) {
    a.hist.saturating_record(crate::measure::ns(d).max(1));
    a.ops += 1;
    a.wall += d;
    a.rounds.push(RoundFigures { p50_ns: crate::measure::ns(d), ops: 1, wall: d });
}

pub fn run(bin: &std::path::Path, quick: bool) -> Result<ScenarioResult> {
    let p = if quick {
        Params { volume_bytes: 16 << 20, log_bytes: 4 << 20, rounds: 1 }
    } else {
        Params { volume_bytes: 256 << 20, log_bytes: 64 << 20, rounds: 5 }
    };
    let mut api = arm("failover command");
    let mut writable = arm("to the first acknowledged write");
    let mut replayed = Vec::new();
    let mut progress = Progress::new("failover");
    for round in 0..p.rounds {
        let dir = tempfile::Builder::new().prefix("nvmirror-bench-failover-").tempdir()?;
        let mut a = NodeProc::start(bin, "fo-a", &dir.path().join("a"), &[]).context("start node A")?;
        let b = NodeProc::start(bin, "fo-b", &dir.path().join("b"), &[]).context("start node B")?;
        let ca = Client::new(&a.control);
        let _: Value = ca.post(
            "/v1/volumes",
            &CreateVolume {
                name: VOL.into(),
                size: p.volume_bytes,
                log_bytes: Some(p.log_bytes),
                ..Default::default()
            },
        )?;
        crate::cluster::mirror_in_sync(&ca, VOL, &b.control, Duration::from_secs(600), |_| {})?;
        // Wait out the CP that follows the baseline, so the writes start a partition.
        std::thread::sleep(Duration::from_millis(500));
        // Nearly a whole partition of entries, none applied on the mirror yet.
        let entries = (p.log_bytes * 95 / 100) / ENTRY_BYTES;
        progress.say(true, || {
            format!("round {round}: writing {entries} entries of 4 KiB (a {} MiB partition)", p.log_bytes >> 20)
        });
        let mut w = Workload::new(0, p.volume_bytes / 4096, 0xf0 + round as u64);
        let mut c = NbdClient::connect(a.nbd.as_str(), VOL)?;
        w.run(&mut c, 32, entries, |_| {})?;
        if w.errors > 0 {
            bail!("{} writes failed before the failover", w.errors);
        }
        let cb = Client::new(&b.control);
        let before: Value = cb.get("/v1/status")?;
        let m = before["mirrors"].as_array().and_then(|m| m.first()).cloned().unwrap_or(Value::Null);
        let pending = m["persisted_seq"].as_u64().unwrap_or(0).saturating_sub(m["applied_seq"].as_u64().unwrap_or(0));
        a.kill();
        let t0 = Instant::now();
        let report: Value = cb.post(&format!("/v1/volumes/{VOL}/failover"), &json!({}))?;
        let t1 = t0.elapsed();
        let mut nc = NbdClient::connect(b.nbd.as_str(), VOL)?;
        nc.write(0, &vec![0x5a; 4096])?;
        let t2 = t0.elapsed();
        drop(b);
        let n = report["entries_replayed"].as_u64().unwrap_or(0);
        progress.say(true, || {
            format!(
                "round {round}: {pending} entries past the mirror's last CP; failover replayed {n} in {:.0} ms, \
                 first write acknowledged at {:.0} ms",
                t1.as_secs_f64() * 1e3,
                t2.as_secs_f64() * 1e3
            )
        });
        if n < entries / 2 {
            bail!("round {round}: the failover replayed {n} entries, fewer than half of the {entries} written");
        }
        replayed.push(n);
        record(&mut api, t1);
        record(&mut writable, t2);
    }
    let worst = writable.hist.max() as f64 / 1e9;
    Ok(ScenarioResult {
        name: "failover".into(),
        description: format!(
            "failover command to writable primary on two node processes (loopback), the source killed with a \
             nearly full {} MiB NVLog partition of 4 KiB random writes that no CP applied on the mirror",
            p.log_bytes >> 20
        ),
        params: json!({
            "volume_bytes": p.volume_bytes,
            "log_partition_bytes": p.log_bytes,
            "rounds": p.rounds,
            "entries_replayed": replayed,
        }),
        cpu_counted: "none (wall time of each failover)".into(),
        check: Some(Check::at_most(
            "seconds to a writable primary, worst round",
            worst,
            1.0,
            Spread::of(writable.rounds.len(), |i| writable.rounds[i].wall.as_secs_f64()),
        )),
        arms: vec![api.result(), writable.result()],
        notes: Vec::new(),
    })
}
