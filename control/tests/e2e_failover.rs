//! The end-to-end promise with real processes: SIGKILL the source at many different points
//! of a checked write run (between acknowledgements at queue depths 1 to 8, right after a
//! forced CP, while a forced CP runs, at the partition switch of a CP that partition fill
//! started, on a timer), fail over on the destination, and find every acknowledged write
//! on the promoted mirror. Then fencing: a source that is failed over without being
//! killed, and the same source restarted, never acknowledges a write again.
//!
//! Every round prints its seed; `NVMIRROR_E2E_SEED=<seed>` replays the whole test.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use nvmirror_control::workload::{block_data, Workload};
use nvmirror_dataplane::frontend::nbd_client::NbdClient;

const VOL: &str = "vol";
const VOLUME_BYTES: u64 = 16 * MIB;
/// Entries per NVLog partition of the minimum size: the first partition fills at this many
/// 4 KiB writes after the mirror is in sync, and the write after it starts a CP.
const E: u64 = ENTRIES_PER_MIN_PARTITION;

/// Where in the run the source dies.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// In sync, nothing written.
    Idle,
    /// From the writer, right after the acknowledgement numbered `n` (writes in flight).
    AfterAck(u64),
    /// `before` writes, a forced CP durable on both sites, then SIGKILL with nothing in
    /// flight.
    AfterForcedCp { before: u64 },
    /// `before` writes, a forced CP, then `after` more acknowledged writes and SIGKILL.
    WritesAfterForcedCp { before: u64, after: u64 },
    /// `before` writes, then a forced CP asked for from another thread while writes go
    /// on, SIGKILL `after` acknowledgements later (while that CP runs or just after).
    DuringForcedCp { before: u64, after: u64 },
    /// SIGKILL `ms` milliseconds after the writes start, from another thread.
    Timer { ms: u64 },
}

#[derive(Debug, Clone)]
struct Round {
    name: String,
    seed: u64,
    qd: usize,
    blocks: u64,
    kill: KillPoint,
}

/// Runs the writer until the acknowledgement numbered `target` and kills the source from
/// inside the loop. Returns the number of writes the run was allowed, to check that the
/// run ended because the source died and not because it ran out of writes.
fn write_and_kill_at(w: &mut Workload, c: &mut NbdClient, qd: usize, target: u64, pid: u32) {
    let budget = target.saturating_sub(w.acks) + 20_000;
    let writes_before = w.writes;
    let mut killed = false;
    w.run(c, qd, budget, |acks| {
        if acks >= target && !killed {
            killed = true;
            sigkill(pid);
        }
    })
    .expect("write run");
    assert!(killed, "the run ended before acknowledgement {target} (acks {}, errors {})", w.acks, w.errors);
    assert!(w.writes - writes_before < budget, "the writer did not notice that the source died");
}

/// Runs one round; returns the error of a failover that failed at the first attempt.
fn run_round(index: usize, r: &Round) -> Option<String> {
    let started = Instant::now();
    let pair = Pair::start(&format!("kill{index}"));
    pair.create_mirrored(VOL, VOLUME_BYTES, LOG_BYTES_MIN);
    let mut w = Workload::new(0, r.blocks, r.seed);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD connect to the source");
    let pid = pair.src.pid().expect("source runs");
    let mut cp_done = None;
    match r.kill {
        KillPoint::Idle => sigkill(pid),
        KillPoint::AfterAck(n) => write_and_kill_at(&mut w, &mut c, r.qd, n, pid),
        KillPoint::AfterForcedCp { before } => {
            w.run(&mut c, r.qd, before, |_| {}).expect("writes");
            cp_done = Some(cp(&pair.src_api(), VOL).expect("forced CP"));
            sigkill(pid);
        }
        KillPoint::WritesAfterForcedCp { before, after } => {
            w.run(&mut c, r.qd, before, |_| {}).expect("writes");
            cp_done = Some(cp(&pair.src_api(), VOL).expect("forced CP"));
            let target = w.acks + after;
            write_and_kill_at(&mut w, &mut c, r.qd, target, pid);
        }
        KillPoint::DuringForcedCp { before, after } => {
            w.run(&mut c, r.qd, before, |_| {}).expect("writes");
            let api = pair.src_api();
            // The CP's answer is lost when the source dies first: either outcome is fine.
            let cp_thread = thread::spawn(move || cp(&api, VOL).ok());
            let target = w.acks + after;
            write_and_kill_at(&mut w, &mut c, r.qd, target, pid);
            cp_done = cp_thread.join().expect("CP thread");
        }
        KillPoint::Timer { ms } => {
            let killer = thread::spawn(move || {
                thread::sleep(Duration::from_millis(ms));
                sigkill(pid);
            });
            let budget = 200_000;
            w.run(&mut c, r.qd, budget, |_| {}).expect("writes");
            killer.join().expect("killer thread");
            assert!(w.writes < budget, "the writer did not notice that the source died");
        }
    }
    drop(c);
    let mut pair = pair;
    pair.src.kill();
    let in_flight = w.writes - w.acks - w.errors;
    assert_eq!(w.errors, 0, "{}: writes failed before the source was killed", r.name);

    let t = Instant::now();
    let (report, failover_error) = match failover(&pair.dst_api(), VOL) {
        Ok(r) => (r, None),
        Err(e) => {
            // A failed failover is a product failure and fails the test (see run_rounds);
            // a second attempt lets the round still check every acknowledged write.
            let first = format!("{e:#}");
            println!("round {index}: FAILOVER FAILED: {first}; trying once more");
            let r = failover(&pair.dst_api(), VOL).unwrap_or_else(|e| panic!("second failover failed too: {e:#}"));
            (r, Some(first))
        }
    };
    let failover_ms = t.elapsed().as_secs_f64() * 1000.0;
    if failover_error.is_none() {
        assert_eq!(report["epoch"], 2, "failover report {report}");
    }
    let stops: Vec<String> =
        report["stops"].as_array().expect("stops").iter().map(|s| s.as_str().unwrap_or("").to_string()).collect();
    // The source was killed, not the destination: its log files hold whole entries only.
    assert!(
        !stops.iter().any(|s| s.contains("checksum") || s.contains("truncated")),
        "{}: a log file on the live destination is torn: {stops:?}",
        r.name
    );

    let mut promoted = NbdClient::connect(pair.dst.nbd.as_str(), VOL).expect("NBD connect to the promoted volume");
    assert!(!promoted.read_only, "the promoted volume is exported read-only");
    let v = verify(&w, &pair.dst.nbd, VOL).expect("read the promoted volume");
    println!(
        "round {index:2} {:<34} seed {:#018x} qd {} blocks {:4}: writes {:5} acked {:5} in flight {} cp {:?}; \
         failover epoch {} replayed {} last_seq {} in {failover_ms:.1} ms; verified {} blocks ({} acked data, {} newer); \
         stops {stops:?}; round {:.2} s",
        r.name,
        r.seed,
        r.qd,
        r.blocks,
        w.writes,
        w.acks,
        in_flight,
        cp_done,
        report["epoch"],
        report["entries_replayed"],
        report["last_seq"],
        v.blocks_checked,
        v.blocks_with_acked_data,
        v.newer_than_acked,
        started.elapsed().as_secs_f64()
    );
    assert_verified(&v, &format!("round {index} ({}, seed {:#x})", r.name, r.seed));
    if w.acks > 0 {
        assert!(v.blocks_with_acked_data > 0, "{}: acked writes but no block holds acked data", r.name);
    }
    // The promoted volume takes writes and reads them back (after the verification, so
    // block 0 may change now).
    let data = block_data(0, u64::MAX / 2);
    let at = 0;
    promoted.write(at, &data).expect("write to the promoted volume");
    let mut back = vec![0u8; 4096];
    promoted.read(at, &mut back).expect("read back from the promoted volume");
    assert_eq!(back, data, "the promoted volume does not read back what was written to it");
    failover_error
}

fn run_rounds(test: &str, make: impl Fn(usize, &mut Rng) -> (String, u64, KillPoint)) {
    let seed = base_seed(test);
    let started = Instant::now();
    let rounds: Vec<Round> = (0..8)
        .map(|i| {
            let round_seed = seed ^ (i as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F);
            let mut rng = Rng::new(round_seed);
            let qd = usize::try_from(rng.range(1, 8)).expect("small");
            let (name, blocks, kill) = make(i, &mut rng);
            Round { name, seed: round_seed, qd, blocks, kill }
        })
        .collect();
    let mut failed_failovers = Vec::new();
    for (i, r) in rounds.iter().enumerate() {
        println!("{test}: round {i}: {r:?}");
        if let Some(e) = run_round(i, r) {
            failed_failovers.push(format!("round {i} ({}, seed {:#x}): {e}", r.name, r.seed));
        }
    }
    println!("{test}: {} kill points in {:.1} s", rounds.len(), started.elapsed().as_secs_f64());
    assert!(
        failed_failovers.is_empty(),
        "failover failed at the first attempt (every acknowledged write was still found after a retry): {failed_failovers:#?}"
    );
}

#[test]
fn kill_source_between_acknowledgements() {
    run_rounds("kill_source_between_acknowledgements", |i, rng| {
        let blocks = if rng.range(0, 1) == 0 { 4096 } else { 1024 };
        let kill = match i {
            0 => KillPoint::Idle,
            1 => KillPoint::AfterAck(1),
            2 => KillPoint::AfterAck(rng.range(2, 60)),
            3 => KillPoint::AfterAck(rng.range(100, 400)),
            4 => KillPoint::AfterAck(rng.range(500, E - 20)),
            5 => KillPoint::AfterAck(rng.range(E + 100, 2 * E - 20)),
            6 => KillPoint::AfterAck(rng.range(2 * E + 50, 3 * E - 20)),
            _ => KillPoint::Timer { ms: rng.range(40, 400) },
        };
        (format!("{kill:?}"), blocks, kill)
    });
}

#[test]
fn kill_source_around_consistency_points() {
    run_rounds("kill_source_around_consistency_points", |i, rng| {
        let blocks = if rng.range(0, 1) == 0 { 4096 } else { 2048 };
        let kill = match i {
            0 => KillPoint::AfterForcedCp { before: rng.range(100, 700) },
            1 => KillPoint::WritesAfterForcedCp { before: rng.range(100, 700), after: 1 },
            2 => KillPoint::WritesAfterForcedCp { before: rng.range(100, 700), after: rng.range(2, 40) },
            3 => KillPoint::DuringForcedCp { before: rng.range(200, 700), after: rng.range(1, 30) },
            // Partition fill: acknowledgement E is the last write of the first partition;
            // the write after it switches partitions and starts the CP.
            4 => KillPoint::AfterAck(E - rng.range(0, 3)),
            5 => KillPoint::AfterAck(E + 1),
            6 => KillPoint::AfterAck(E + rng.range(2, 16)),
            _ => KillPoint::AfterAck(2 * E + rng.range(0, 8)),
        };
        let name = match kill {
            KillPoint::AfterAck(n) => format!("fill-CP switch at ack {n} (E={E})"),
            k => format!("{k:?}"),
        };
        (name, blocks, kill)
    });
}

#[test]
fn kill_source_with_hot_blocks_and_timers() {
    // Few blocks: most writes overwrite a block already in the partition or in the CP in
    // flight, so replay order and "newest entry per block" both matter.
    run_rounds("kill_source_with_hot_blocks_and_timers", |i, rng| {
        let blocks = [16, 64, 256][usize::try_from(rng.range(0, 2)).expect("small")];
        let kill = match i {
            0 => KillPoint::AfterAck(rng.range(1, 20)),
            1 => KillPoint::AfterAck(rng.range(300, 900)),
            2 => KillPoint::AfterAck(E + rng.range(0, 4)),
            3 => KillPoint::AfterAck(3 * E + rng.range(0, 30)),
            4 => KillPoint::WritesAfterForcedCp { before: rng.range(E + 10, 2 * E - 10), after: rng.range(1, 10) },
            5 => KillPoint::DuringForcedCp { before: rng.range(50, 300), after: rng.range(0, 3) },
            6 => KillPoint::Timer { ms: rng.range(5, 60) },
            _ => KillPoint::Timer { ms: rng.range(300, 900) },
        };
        (format!("{kill:?}"), blocks, kill)
    });
}

/// A failover while the old source is alive and being written to: from then on it never
/// acknowledges a write (not on the open connection, not on a new one, not after a
/// restart), its status says "fenced", and the new primary holds every write it did
/// acknowledge.
#[test]
fn failover_fences_the_old_source() {
    let seed = base_seed("failover_fences_the_old_source");
    let mut pair = Pair::start("fence");
    pair.create_mirrored(VOL, VOLUME_BYTES, LOG_BYTES_MIN);

    // A writer at queue depth 8 that is still writing when the destination fails over.
    let acks = Arc::new(AtomicU64::new(0));
    let src_nbd = pair.src.nbd.clone();
    let acks2 = acks.clone();
    let writer = thread::spawn(move || {
        let mut w = Workload::new(0, 2048, seed);
        let mut c = NbdClient::connect(src_nbd.as_str(), VOL).expect("NBD connect");
        // Bounded: at most 40 000 writes; it stops early once writes fail (fenced).
        for _ in 0..40 {
            w.run(&mut c, 8, 1000, |a| acks2.store(a, Ordering::SeqCst)).expect("writes");
            if w.errors > 0 {
                break;
            }
        }
        w
    });
    wait_for("the writer to get 300 acknowledgements", Duration::from_secs(60), || {
        Ok((acks.load(Ordering::SeqCst) >= 300).then_some(()))
    });
    let report = failover(&pair.dst_api(), VOL).expect("failover while the source is alive");
    let acks_at_failover = acks.load(Ordering::SeqCst);
    let w = writer.join().expect("writer");
    println!(
        "fence: failover {report} after {acks_at_failover} acks; writer: {} writes, {} acked, {} failed",
        w.writes, w.acks, w.errors
    );
    assert_eq!(report["epoch"], 2);
    assert!(w.errors > 0, "the writer at the old source never saw a write fail after the failover");

    // Every write the old source acknowledged, before or during the failover, is on the new
    // primary: nothing was acknowledged after the mirror was broken.
    let v = verify(&w, &pair.dst.nbd, VOL).expect("read the new primary");
    assert_verified(&v, "new primary after a failover with the old source alive");
    println!(
        "fence: new primary holds all {} acked writes ({} blocks with acked data)",
        w.acks, v.blocks_with_acked_data
    );

    // The old source's status says fenced (through the API and `ctl status --json`). A
    // status other than fenced is collected and fails the test at the end, so that the
    // checks that no write is acknowledged still run.
    let mut status_failures = Vec::new();
    let fenced_within = Duration::from_secs(5);
    match try_wait_state(&pair.src_api(), VOL, "fenced", fenced_within) {
        Ok(st) => println!("fence: old source status: {st}"),
        Err(e) => status_failures.push(format!("old source after failover: {e}")),
    }
    let out = run_bin(&["ctl", "--node", &pair.src.control, "status", "--json"], Duration::from_secs(30));
    assert!(out.status.success(), "ctl status: {}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    let vs = s["volumes"].as_array().expect("volumes");
    let old = vs.iter().find(|v| v["volume"] == VOL).expect("old source still lists the volume");
    if old["state"] != "fenced" {
        status_failures
            .push(format!("ctl status --json of the old source: state {} ({})", old["state"], old["reason"]));
    }

    let refuse_writes = |nbd: &str, what: &str| {
        let mut c = NbdClient::connect(nbd, VOL).unwrap_or_else(|e| panic!("{what}: NBD connect: {e}"));
        for i in 0..3u64 {
            let r = c.write(i * 4096, &block_data(i, 99));
            assert!(r.is_err(), "{what}: the old source acknowledged a write after the failover");
        }
    };
    refuse_writes(&pair.src.nbd, "old source, new connection");
    // A forced CP on the failed-over volume fails too, with a non-zero exit.
    // A fenced volume answers at once; one that is not fenced waits for a mirror that
    // will never take the CP (collected as a status failure).
    match try_run_bin(&["ctl", "--node", &pair.src.control, "cp", VOL], Duration::from_secs(10)) {
        Ok(out) => {
            assert!(
                !out.status.success(),
                "ctl cp on a fenced volume succeeded: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        }
        Err(e) => status_failures.push(format!("ctl cp on the failed-over source: {e}")),
    }

    // The new primary takes writes.
    let mut np = NbdClient::connect(pair.dst.nbd.as_str(), VOL).expect("NBD connect to the new primary");
    assert!(!np.read_only);
    np.write(0, &block_data(0, 1_000_000)).expect("write to the new primary");

    // Restarted, the old source still never acknowledges a write: refused while it
    // reconnects, fenced once the new primary refuses its stale epoch.
    pair.src.restart().expect("restart the old source");
    let t = Instant::now();
    let mut refused = 0;
    for _ in 0..30 {
        refuse_writes(&pair.src.nbd, "old source after restart");
        refused += 3;
        if t.elapsed() > Duration::from_millis(1500) {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    match try_wait_state(&pair.src_api(), VOL, "fenced", fenced_within) {
        Ok(st) => println!("fence: restarted old source is {} ({})", st["state"], st["reason"]),
        Err(e) => status_failures.push(format!("old source after its restart: {e}")),
    }
    refuse_writes(&pair.src.nbd, "old source after restart, later");
    println!("fence: the restarted old source refused all {refused} writes tried over 1.5 s and 3 more after");
    // Nothing of the old source reached the new primary.
    let mut back = vec![0u8; 4096];
    np.read(0, &mut back).expect("read the new primary");
    assert_eq!(back, block_data(0, 1_000_000), "the new primary's block changed behind its back");
    assert!(
        status_failures.is_empty(),
        "writes were refused, but the failed-over source does not report itself fenced: {status_failures:#?}"
    );
}

/// A mirror whose baseline copy did not finish is not a copy of the volume: failing over
/// to it is refused, through the API and through `ctl` (non-zero exit, one line).
#[test]
fn failover_refused_while_baseline_incomplete() {
    let pair = Pair::start("baseline");
    let size = 512 * MIB;
    create_volume(&pair.src_api(), VOL, size, Some(LOG_BYTES_MIN)).expect("create");
    mirror(&pair.src_api(), VOL, &pair.dst.control).expect("start the mirror");
    let st = wait_for("the baseline copy to be under way", Duration::from_secs(30), || {
        let v = volume_status(&pair.src_api(), VOL)?;
        Ok((v["state"] == "baseline").then_some(v))
    });
    sigkill(pair.src.pid().expect("source runs"));
    let m = mirror_status(&pair.dst_api(), VOL).expect("mirror status");
    println!("baseline: killed the source at {st}; mirror {m}");
    assert_eq!(m["consistent"], false, "the baseline finished before the kill; the test needs a larger volume");
    let err = failover(&pair.dst_api(), VOL).expect_err("failover to a half-copied mirror");
    assert!(format!("{err:#}").contains("inconsistent"), "unexpected failover error: {err:#}");
    let out = run_bin(&["ctl", "--node", &pair.dst.control, "failover", VOL], Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ctl failover of a half-copied mirror succeeded");
    assert_eq!(stderr.trim().lines().count(), 1, "ctl's reason is not one line: {stderr:?}");
    assert!(stderr.contains("inconsistent"), "ctl's reason: {stderr}");
    // The mirror is still there, still not promoted.
    let m = mirror_status(&pair.dst_api(), VOL).expect("mirror status");
    assert_eq!(m["promoted"], false);
}

/// Several failover requests for one volume at once (an operator retrying a slow `ctl
/// failover`, two automation agents): exactly one promotes the mirror, the others are
/// refused, and the node holds one primary of the volume, also after a restart.
#[test]
fn concurrent_failover_requests_promote_once() {
    let seed = base_seed("concurrent_failover_requests_promote_once");
    let mut pair = Pair::start("dupfailover");
    pair.create_mirrored(VOL, VOLUME_BYTES, LOG_BYTES_MIN);
    let mut w = Workload::new(0, 1024, seed);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD connect");
    w.run(&mut c, 4, 600, |_| {}).expect("writes");
    drop(c);
    pair.src.kill();
    const REQUESTS: usize = 8;
    let start = Arc::new(std::sync::Barrier::new(REQUESTS));
    let threads: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let api = pair.dst_api();
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                failover(&api, VOL).map_err(|e| format!("{e:#}"))
            })
        })
        .collect();
    let results: Vec<Result<serde_json::Value, String>> =
        threads.into_iter().map(|t| t.join().expect("failover thread")).collect();
    println!("concurrent failovers: {results:#?}");
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let st = status(&pair.dst_api()).expect("status");
    let primaries = st["volumes"].as_array().expect("volumes").iter().filter(|v| v["volume"] == VOL).count();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pair.dst.data_dir.join("node.json")).expect("node.json")).expect("json");
    let records = state["volumes"].as_array().expect("volumes").iter().filter(|v| v["name"] == VOL).count();
    println!("concurrent failovers: {ok} succeeded; {primaries} primaries in status; {records} records in node.json");
    assert_eq!(ok, 1, "{ok} of {REQUESTS} concurrent failover requests succeeded: {results:#?}");
    // The others are refused because the volume is (being) failed over, not because the
    // requests tripped over each other.
    for r in &results {
        if let Err(e) = r {
            assert!(
                e.contains("already") || e.contains("in progress"),
                "a concurrent failover request failed for another reason than the first one: {e}"
            );
        }
    }
    assert_eq!(primaries, 1, "status lists {primaries} primaries of {VOL}");
    assert_eq!(records, 1, "node.json holds {records} records of {VOL}");
    let v = verify(&w, &pair.dst.nbd, VOL).expect("read the promoted volume");
    assert_verified(&v, "promoted volume after concurrent failover requests");
    pair.dst.restart().expect("the promoted node restarts");
    let v = verify(&w, &pair.dst.nbd, VOL).expect("read the promoted volume after a restart");
    assert_verified(&v, "promoted volume after a restart");
}

/// A failover that a crash of the mirror's node cut short, once the raised epoch was saved
/// and before the replay, the new NVLog or the volume's record: the node, restarted,
/// finishes the promotion (the replay) and takes the mirror up as its primary volume
/// (the node core's take-up, the one the simulator runs), with every write the old
/// primary acknowledged.
#[test]
fn a_failover_cut_short_by_a_crash_is_finished_when_the_node_restarts() {
    let seed = base_seed("a_failover_cut_short_by_a_crash_is_finished_when_the_node_restarts");
    let mut pair = Pair::start("cut-short");
    pair.create_mirrored(VOL, VOLUME_BYTES, LOG_BYTES_MIN);
    // A partition and a half: a CP has applied the first, and the log holds the rest.
    let mut w = Workload::new(0, VOLUME_BYTES / 4096, seed);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD connect");
    w.run(&mut c, 8, E + E / 2, |_| {}).expect("writes");
    assert_eq!(w.errors, 0);
    drop(c);
    pair.src.kill();
    pair.dst.kill();
    let applied_seq = {
        // The crash came right after the promotion saved its raised epoch.
        let path = pair.dst.data_dir.join("mirrors").join(&pair.src.name).join(VOL).join("meta.json");
        let mut meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read the mirror's meta")).expect("meta is JSON");
        assert_eq!(meta["epoch"], 1);
        meta["epoch"] = 2.into();
        meta["promoting"] = true.into();
        std::fs::write(&path, serde_json::to_vec_pretty(&meta).expect("JSON")).expect("write meta");
        meta["applied_seq"].as_u64().expect("applied_seq")
    };
    assert!(applied_seq < w.acks, "every write applied by a CP: nothing left for the replay to do");
    pair.dst.restart().expect("restart the mirror's node");
    let st = wait_state(&pair.dst_api(), VOL, "not-mirrored", Duration::from_secs(30));
    assert_eq!(st["epoch"], 2, "{st}");
    assert!(
        log_text(&pair.dst.log_path()).contains("was failed over here before a restart; taking it up"),
        "the restart did not take the promoted mirror up"
    );
    let v = verify(&w, &pair.dst.nbd, VOL).expect("read the new primary");
    assert_verified(&v, "a failover finished at the restart");
    // It takes writes, in its own epoch.
    let mut np = NbdClient::connect(pair.dst.nbd.as_str(), VOL).expect("NBD connect to the new primary");
    np.write(0, &block_data(0, 1_000_000)).expect("write to the new primary");
}

/// A destination started with `--mirror-layout single` keeps its mirror in one file (no
/// parity member), applies CPs to it and, failed over, serves every acknowledged write.
#[test]
fn a_mirror_on_a_single_file_applies_cps_and_fails_over_with_every_acknowledged_write() {
    let seed = base_seed("a_mirror_on_a_single_file_applies_cps_and_fails_over_with_every_acknowledged_write");
    let mut pair = Pair::start_with("single-mirror", &[], &["--mirror-layout", "single"]);
    pair.create_mirrored(VOL, VOLUME_BYTES, LOG_BYTES_MIN);
    let mut w = Workload::new(0, VOLUME_BYTES / 4096, seed);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD connect");
    // Two partitions and a half: CPs have applied some of it to the mirror's file.
    w.run(&mut c, 8, 2 * E + E / 2, |_| {}).expect("writes");
    assert_eq!(w.errors, 0);
    drop(c);
    let m = mirror_status(&pair.dst_api(), VOL).expect("mirror status");
    assert_eq!(m["storage"]["level"], "single", "{m}");
    assert!(m["cps_applied"].as_u64().unwrap_or(0) >= 1, "no CP reached the mirror: {m}");
    let dir = pair.dst.data_dir.join("mirrors").join(&pair.src.name).join(VOL);
    assert!(dir.join("data").is_file(), "the mirror's file is missing in {}", dir.display());
    assert!(!dir.join("parity").exists(), "a single-file mirror has a parity member");
    // The source's own volume stays RAID-4: the layout is the mirror node's alone.
    assert_eq!(volume_status(&pair.src_api(), VOL).expect("status")["storage"]["level"], "raid4");
    pair.src.kill();
    failover(&pair.dst_api(), VOL).expect("failover");
    let v = verify(&w, &pair.dst.nbd, VOL).expect("read the new primary");
    assert_verified(&v, "a failover of a single-file mirror");
}

/// `direct:` logs on both sites (O_DIRECT, written before the ack): the source, killed
/// between acknowledgements, restarts as the primary and takes its log up again with the
/// mirror's word on it (a batch goes to the mirror before it is persisted here); killed
/// again, its mirror takes over with every acknowledged write.
#[test]
fn direct_logs_keep_every_acknowledged_write_through_a_restart_and_a_failover() {
    let seed = base_seed("direct_logs_keep_every_acknowledged_write_through_a_restart_and_a_failover");
    let mut pair = Pair::start_nvram("direct", "direct");
    pair.create_mirrored(VOL, VOLUME_BYTES, LOG_BYTES_MIN);
    let st = status(&pair.src_api()).expect("status");
    assert!(st["nvram"].as_str().is_some_and(|n| n.starts_with("direct:")), "{st}");
    assert!(st["nvram_survives"].as_str().is_some_and(|s| s.contains("power loss")), "{st}");
    let survives = volume_status(&pair.src_api(), VOL).expect("volume status")["ack_survives"].clone();
    assert!(survives.as_array().is_some_and(|a| a.iter().any(|s| s == "a power cut at both sites")), "{survives}");
    let mut w = Workload::new(0, VOLUME_BYTES / 4096, seed);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD connect");
    // Past one partition, so that a CP ran, then killed with writes in flight.
    let target = E + E / 3;
    write_and_kill_at(&mut w, &mut c, 8, target, pair.src.pid().expect("source runs"));
    drop(c);
    pair.src.kill();
    pair.src.restart().expect("restart the source");
    wait_state(&pair.src_api(), VOL, "in-sync", Duration::from_secs(60));
    assert!(
        log_text(&pair.src.log_path()).contains("went to the mirror before it was persisted here"),
        "the restarted source did not wait for the mirror's word on its log"
    );
    let v = verify(&w, &pair.src.nbd, VOL).expect("read the restarted primary");
    assert_verified(&v, "the primary restarted on its direct: log");
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD connect after the restart");
    let target = w.acks + E / 2;
    write_and_kill_at(&mut w, &mut c, 4, target, pair.src.pid().expect("source runs"));
    drop(c);
    pair.src.kill();
    failover(&pair.dst_api(), VOL).expect("failover");
    let v = verify(&w, &pair.dst.nbd, VOL).expect("read the promoted mirror");
    assert_verified(&v, "the mirror failed over from direct: logs");
    assert!(v.blocks_with_acked_data > 0, "no block holds acked data");
}
