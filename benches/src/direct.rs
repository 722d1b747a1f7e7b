//! `direct-log`: nvmirror with `direct:` NVRAM (the log written with O_DIRECT and O_DSYNC,
//! one device write per group commit) against the file system's own synchronous write, and
//! against the same volumes with `file:` NVRAM (the page cache), with one client for all:
//! fio, 4 KiB random writes, files of the same file system (this machine's one disk).
//!
//! Arms:
//!
//! - `fio-dsync`: fio itself, `--ioengine=psync --direct=1 --sync=1` on a file: the floor
//!   of one acknowledged, power-safe write (queue depth 1 only);
//! - `fio-dsync-x2`: the same with two jobs at once: two sites writing synchronously to
//!   the one disk this host has, the floor of a mirrored write here (QD1 only);
//! - `direct-plain`: an unmirrored volume (one disk file) on a node with `direct:` NVRAM;
//! - `direct-mirrored`: a volume mirrored (strict, TCP) to a second `direct:` node that
//!   keeps its mirror on one file;
//! - `file-plain`, `file-mirrored`: the same on two nodes with `file:` NVRAM.
//!
//! Method as `nbd-peers`: rounds, every arm in turn one time-based fio run, the first
//! round a warm-up, fio's histograms merged over the measured rounds, the server
//! processes' CPU time counted. Before each run, `sync(2)`: the `file:` arms leave their
//! writes in the page cache, and their write-back would otherwise land on the next arm's
//! device writes.
//!
//! Targets (issue: power-safe acknowledgements without persistent memory): unmirrored QD1
//! p50 at most 1.2x fio's; mirrored QD1 p50 at most 1.5x unmirrored; QD32 IOPS at least
//! 0.8x the same workload with `file:` logs.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use nvmirror_control::api::Client;
use nvmirror_control::cluster::NodeProc;
use serde_json::json;

use crate::measure::ArmResult;
use crate::peers::{cpu_of, create_on_file, fio_randwrite, tool, Figures, VOLUME_BYTES};
use crate::report::{Check, ScenarioResult};

const ARMS: [&str; 6] = ["fio-dsync", "fio-dsync-x2", "direct-plain", "direct-mirrored", "file-plain", "file-mirrored"];
/// The arms run at each depth (fio's synchronous writes have no queue).
const AT_QD1: [&str; 5] = ["fio-dsync", "fio-dsync-x2", "direct-plain", "direct-mirrored", "file-plain"];
const AT_QD32: [&str; 4] = ["direct-plain", "direct-mirrored", "file-plain", "file-mirrored"];
const DEPTHS: [usize; 2] = [1, 32];

/// Two nodes with NVRAM `mode`, the first holding volumes `plain` and `mirrored`, the
/// second the mirror of `mirrored` (on one file).
fn start_pair(bin: &Path, dir: &Path, mode: &str) -> Result<[NodeProc; 2]> {
    let node = |name: &str, extra: &[&str]| -> Result<NodeProc> {
        let data = dir.join(name);
        let nvram = format!("{mode}:{}", data.join("nvram").display());
        let mut args = vec!["--nvram", nvram.as_str()];
        args.extend_from_slice(extra);
        NodeProc::start(bin, name, &data, &args).with_context(|| format!("start node {name}"))
    };
    let a = node(&format!("{mode}-a"), &[])?;
    let b = node(&format!("{mode}-b"), &["--mirror-layout", "single"])?;
    let ca = Client::new(&a.control);
    for name in ["plain", "mirrored"] {
        create_on_file(&ca, name, &dir.join(format!("{mode}-{name}.img")))
            .with_context(|| format!("on the {mode}: node"))?;
    }
    crate::cluster::mirror_in_sync(&ca, "mirrored", &b.control, Duration::from_secs(300), |_| {})?;
    Ok([a, b])
}

pub fn run(bin: &Path, quick: bool) -> Result<Vec<ScenarioResult>> {
    tool("fio", "--version", "fio")?;
    let (secs, rounds, warmup) = if quick { (0.3, 1, 0) } else { (3.0, 5, 1) };
    let dir = tempfile::Builder::new().prefix("nvmirror-bench-direct-").tempdir_in(std::env::temp_dir())?;
    let direct = start_pair(bin, dir.path(), "direct")?;
    let file = start_pair(bin, dir.path(), "file")?;
    let pid = |n: &NodeProc| n.pid().with_context(|| format!("node {} is not running", n.name));
    let (da, db, fa, fb) = (pid(&direct[0])?, pid(&direct[1])?, pid(&file[0])?, pid(&file[1])?);
    let fio_file = dir.path().join("fio.raw");
    // Where each arm writes (fio's arguments) and whose CPU it uses.
    let target = |arm: &str| -> (Vec<String>, Vec<u32>) {
        let nbd = |n: &NodeProc, vol: &str| vec!["--ioengine=nbd".to_string(), format!("--uri=nbd://{}/{vol}", n.nbd)];
        match arm {
            "fio-dsync" | "fio-dsync-x2" => {
                let mut a = vec![
                    "--ioengine=psync".to_string(),
                    format!("--filename={}", fio_file.display()),
                    "--direct=1".into(),
                    "--sync=1".into(),
                ];
                if arm == "fio-dsync-x2" {
                    a.push("--numjobs=2".into());
                }
                (a, vec![])
            }
            "direct-plain" => (nbd(&direct[0], "plain"), vec![da]),
            "direct-mirrored" => (nbd(&direct[0], "mirrored"), vec![da, db]),
            "file-plain" => (nbd(&file[0], "plain"), vec![fa]),
            "file-mirrored" => (nbd(&file[0], "mirrored"), vec![fa, fb]),
            other => unreachable!("arm {other}"),
        }
    };
    let mut figures: Vec<Vec<Figures>> = DEPTHS.iter().map(|_| ARMS.iter().map(|_| Figures::new()).collect()).collect();
    for round in 0..warmup + rounds {
        let measured = round >= warmup;
        for (d, &depth) in DEPTHS.iter().enumerate() {
            let arms: &[&str] = if depth == 1 { &AT_QD1 } else { &AT_QD32 };
            for arm in arms {
                eprintln!(
                    "[direct-log] round {}/{}{}: {arm} at queue depth {depth}",
                    round + 1,
                    warmup + rounds,
                    if measured { "" } else { " (warm-up)" }
                );
                let (args, pids) = target(arm);
                // What the file: arms left in the page cache is written back now, not
                // under the next arm's device writes.
                // SAFETY: sync(2) has no preconditions.
                unsafe { libc::sync() };
                let cpu0 = cpu_of(&pids)?;
                let r = fio_randwrite(&args, arm, depth, secs).with_context(|| format!("arm {arm}"))?;
                let cpu = cpu_of(&pids)?.saturating_sub(cpu0);
                if measured {
                    let i = ARMS.iter().position(|a| a == arm).expect("an arm");
                    figures[d][i].add(&r, cpu)?;
                }
            }
        }
    }
    drop(direct);
    drop(file);

    let at = |depth: usize, arm: &str| -> &Figures {
        let d = DEPTHS.iter().position(|&x| x == depth).expect("a measured depth");
        &figures[d][ARMS.iter().position(|&x| x == arm).expect("an arm")]
    };
    let ratio = |a: f64, b: f64| a / b.max(f64::MIN_POSITIVE);
    let spread = |depth: usize, num: &str, den: &str, f: fn(&Figures, usize) -> f64| {
        Figures::by_round(at(depth, num), at(depth, den), f)
    };
    let (p50_of, iops_of) = (Figures::p50_in, Figures::iops_in);
    let mut arms: Vec<ArmResult> = AT_QD1.iter().map(|a| at(1, a).result(a, 1)).collect();
    arms.extend(AT_QD32.iter().map(|a| at(32, a).result(a, 32)));
    let qd1 = |a: &str| at(1, a).us_at(0.5);
    let qd32 = |a: &str| at(32, a).iops();
    let cpu = |depth: usize, a: &str| at(depth, a).cpu_us_per_op();
    let checks = [
        Check::at_most(
            "p50(direct-plain) / p50(fio --direct=1 --sync=1), QD1",
            ratio(qd1("direct-plain"), qd1("fio-dsync")),
            1.2,
            spread(1, "direct-plain", "fio-dsync", p50_of),
        ),
        Check::at_most(
            "p50(direct-mirrored) / p50(direct-plain), QD1",
            ratio(qd1("direct-mirrored"), qd1("direct-plain")),
            1.5,
            spread(1, "direct-mirrored", "direct-plain", p50_of),
        ),
        Check::at_least(
            "IOPS(direct-plain) / IOPS(file-plain), QD32",
            ratio(qd32("direct-plain"), qd32("file-plain")),
            0.8,
            spread(32, "direct-plain", "file-plain", iops_of),
        ),
    ];
    let notes = vec![
        format!("QD1 p50 us: {}", AT_QD1.iter().map(|a| format!("{a} {:.1}", qd1(a))).collect::<Vec<_>>().join(", ")),
        format!(
            "both sites of a mirrored pair write to this host's one disk: two synchronous writers at once \
             (fio-dsync-x2) see p50 {:.1} us each, against {:.1} us alone; p50(direct-mirrored) / p50(fio-dsync-x2) \
             = {:.3}",
            qd1("fio-dsync-x2"),
            qd1("fio-dsync"),
            ratio(qd1("direct-mirrored"), qd1("fio-dsync-x2"))
        ),
        format!(
            "QD32 IOPS: {}; IOPS(direct-mirrored) / IOPS(file-mirrored) = {:.3}",
            AT_QD32.iter().map(|a| format!("{a} {:.0}", qd32(a))).collect::<Vec<_>>().join(", "),
            ratio(qd32("direct-mirrored"), qd32("file-mirrored"))
        ),
        format!(
            "CPU per write, QD1/QD32 us: {}",
            AT_QD32.iter().map(|a| format!("{a} {:.1}/{:.1}", cpu(1, a), cpu(32, a))).collect::<Vec<_>>().join(", ")
        ),
    ];
    let params = json!({
        "volume_bytes": VOLUME_BYTES,
        "secs_per_run": secs,
        "rounds": rounds,
        "warmup_rounds": warmup,
        "dir": std::env::temp_dir(),
    });
    let names = ["direct-log-qd1", "direct-log-mirrored-qd1", "direct-log-qd32"];
    let descriptions = [
        "4 KiB random writes at QD1: an unmirrored volume on a direct: node against fio's own O_DIRECT|O_DSYNC write \
         on the same file system",
        "QD1: the volume mirrored between two direct: nodes against the unmirrored one",
        "QD32: the unmirrored volume on a direct: node against the same on a file: node (group commit)",
    ];
    Ok(checks
        .into_iter()
        .zip(names.iter().zip(descriptions))
        .map(|(check, (name, description))| ScenarioResult {
            name: (*name).into(),
            description: description.into(),
            params: params.clone(),
            cpu_counted: "the node processes of each nvmirror arm, all threads (/proc/PID/stat); none for fio's own \
                          arms"
                .into(),
            arms: arms.clone(),
            check: Some(check),
            notes: notes.clone(),
        })
        .collect())
}
