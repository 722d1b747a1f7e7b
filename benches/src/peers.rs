//! `nbd-peers`: nvmirror's NBD front end against the NBD servers users compare it with,
//! with one client for all: fio's `nbd` engine (libnbd), 4 KiB random writes.
//!
//! Arms, each a 256 MiB volume or file on this machine's filesystem, on loopback:
//!
//! - `nbdkit`: nbdkit's `file` plugin on a raw file (its default thread pool);
//! - `qemu-nbd`: qemu-nbd on a raw file (`-f raw`, writeback cache, its default);
//! - `plain`: an unmirrored nvmirror volume on one disk file (`--disk FILE`);
//! - `mirrored`: the same, mirrored (strict, TCP) to a second node on this host that keeps
//!   its mirrors on one file each (`--mirror-layout single`): one disk on each site, as
//!   `plain` and as DRBD's pair;
//! - `mirrored-raid4`: the same, mirrored to a third node that keeps its mirrors in the
//!   default geometry (RAID-4, 3+1 files in its data dir, parity and checksums computed as
//!   each CP is applied).
//!
//! Both nodes use `file:` NVRAM, the embedded default. Neither peer syncs its file, and
//! neither does nvmirror under `file:` (a killed process loses nothing; a power cut at
//! one site is covered by the other site only when mirrored).
//!
//! Method. Round by round, at queue depth 32 then 1, every arm in turn gets one fio run of
//! a fixed time (`--time_based`, the same for all); the arms thus see the same machine
//! state, interleaved. From each run the harness takes fio's own IOPS and its completion
//! latency histogram (`--output-format=json+`, exact bins), which it merges over the
//! measured rounds, and the CPU time its server processes used during the run (all their
//! threads, ended ones included: `/proc/PID/stat`). A loopback TCP ping-pong of a 4 KiB
//! replication hop ([`PingPong`], the `hop` floor) runs in each round too.
//!
//! Targets (issue: run to completion): at QD32 plain IOPS at least 1.0x nbdkit's and p99
//! at most 1.5x; at QD1 plain p50 at most nbdkit's and p99 at most 1.5x; mirrored IOPS at
//! QD32 at least 0.7x plain; mirrored p50 at QD1 at most plain's plus 1.2x a ping-pong.
//! `mirrored-raid4` is held to the same throughput target, reported beside it.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use nvmirror_control::api::{Client, CreateVolume};
use nvmirror_control::cluster::NodeProc;
use serde_json::{json, Value};

use crate::floor::PingPong;
use crate::measure::{new_histogram, stat_cpu_ns, ArmResult, Latency, Spread, CURVE_PERCENTILES, LATENCY_NS_MAX};
use crate::report::{Check, ScenarioResult};

pub(crate) const VOLUME_BYTES: u64 = 256 << 20;
const DEPTHS: [usize; 2] = [32, 1];
const ARMS: [&str; 5] = ["nbdkit", "qemu-nbd", "plain", "mirrored", "mirrored-raid4"];

pub(crate) struct Params {
    pub(crate) secs: f64,
    pub(crate) rounds: usize,
    pub(crate) warmup_rounds: usize,
    pub(crate) ping_pongs: u64,
}

/// A server under test: the NBD URI fio connects to and the processes whose CPU counts.
pub(crate) struct Target {
    pub(crate) uri: String,
    pub(crate) pids: Vec<u32>,
}

/// One fio run's figures.
pub(crate) struct FioRun {
    iops: f64,
    ops: u64,
    runtime_s: f64,
    /// Completion latency histogram bins: (ns, count).
    bins: Vec<(u64, u64)>,
}

/// One arm at one depth, over the measured rounds.
pub(crate) struct Figures {
    hist: Histogram<u64>,
    ops: u64,
    runtime_s: f64,
    cpu_ns: u64,
    round_iops: Vec<f64>,
    round_p50_us: Vec<f64>,
    round_p99_us: Vec<f64>,
}

impl Figures {
    pub(crate) fn new() -> Self {
        Figures {
            hist: new_histogram(),
            ops: 0,
            runtime_s: 0.0,
            cpu_ns: 0,
            round_iops: Vec::new(),
            round_p50_us: Vec::new(),
            round_p99_us: Vec::new(),
        }
    }

    /// Adds one measured run, and `cpu_ns` of server CPU time spent during it.
    pub(crate) fn add(&mut self, r: &FioRun, cpu_ns: u64) -> Result<()> {
        let mut round_hist = new_histogram();
        for &(ns, count) in &r.bins {
            let v = ns.clamp(1, LATENCY_NS_MAX);
            self.hist.record_n(v, count).context("record a latency")?;
            round_hist.record_n(v, count).context("record a latency")?;
        }
        self.ops += r.ops;
        self.runtime_s += r.runtime_s;
        self.cpu_ns += cpu_ns;
        self.round_iops.push(r.iops);
        self.round_p50_us.push(round_hist.value_at_quantile(0.5) as f64 / 1000.0);
        self.round_p99_us.push(round_hist.value_at_quantile(0.99) as f64 / 1000.0);
        Ok(())
    }

    /// `f(num) / f(den)` round by round.
    pub(crate) fn by_round(num: &Figures, den: &Figures, f: fn(&Figures, usize) -> f64) -> Option<Spread> {
        Spread::of(num.round_iops.len().min(den.round_iops.len()), |r| f(num, r) / f(den, r).max(f64::MIN_POSITIVE))
    }
    pub(crate) fn iops_in(&self, round: usize) -> f64 {
        self.round_iops[round]
    }
    pub(crate) fn p50_in(&self, round: usize) -> f64 {
        self.round_p50_us[round]
    }
    pub(crate) fn p99_in(&self, round: usize) -> f64 {
        self.round_p99_us[round]
    }

    pub(crate) fn cpu_us_per_op(&self) -> f64 {
        self.cpu_ns as f64 / 1000.0 / self.ops.max(1) as f64
    }

    pub(crate) fn iops(&self) -> f64 {
        if self.runtime_s > 0.0 {
            self.ops as f64 / self.runtime_s
        } else {
            0.0
        }
    }

    pub(crate) fn us_at(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    pub(crate) fn result(&self, name: &str, depth: usize) -> ArmResult {
        let h = &self.hist;
        ArmResult {
            name: name.to_string(),
            queue_depth: Some(depth),
            ops: self.ops,
            wall_s: self.runtime_s,
            latency_us: Latency {
                p50: self.us_at(0.5),
                p90: self.us_at(0.9),
                p99: self.us_at(0.99),
                p99_9: self.us_at(0.999),
                max: h.max() as f64 / 1000.0,
                mean: h.mean() / 1000.0,
            },
            throughput_ops_s: self.iops(),
            cpu_us_per_op: self.cpu_us_per_op(),
            round_p50_us: self.round_p50_us.clone(),
            round_throughput_ops_s: self.round_iops.clone(),
            curve: CURVE_PERCENTILES
                .iter()
                .map(|&p| (p, self.us_at(p / 100.0)))
                .chain(std::iter::once((100.0, h.max() as f64 / 1000.0)))
                .collect(),
        }
    }
}

pub(crate) fn tool(name: &str, version_arg: &str, package: &str) -> Result<()> {
    match Command::new(name).arg(version_arg).output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => bail!("{name} is not installed (apt-get install {package}); nbd-peers needs it"),
    }
}

pub(crate) fn fio(uri: &str, depth: usize, secs: f64) -> Result<FioRun> {
    fio_randwrite(&["--ioengine=nbd".into(), format!("--uri={uri}")], uri, depth, secs)
}

/// One time-based fio run of 4 KiB random writes over `VOLUME_BYTES` with `target` (the
/// engine and where it writes), at queue depth `depth`; `what` names it in errors.
pub(crate) fn fio_randwrite(target: &[String], what: &str, depth: usize, secs: f64) -> Result<FioRun> {
    fio_randwrite_by(Command::new("fio"), target, what, depth, secs)
}

/// As [`fio_randwrite`], fio started by `fio` (a command that runs fio, with what it needs
/// around it: another user, another home).
pub(crate) fn fio_randwrite_by(
    mut fio: Command,
    target: &[String],
    what: &str,
    depth: usize,
    secs: f64,
) -> Result<FioRun> {
    let out = fio
        .arg("--name=bench")
        .args(target)
        .args([
            "--rw=randwrite",
            "--bs=4k",
            &format!("--iodepth={depth}"),
            &format!("--size={VOLUME_BYTES}"),
            &format!("--runtime={secs}"),
            "--time_based",
            "--randrepeat=0",
            "--norandommap",
            "--group_reporting",
            "--output-format=json+",
        ])
        .stdin(Stdio::null())
        .output()
        .context("run fio")?;
    if !out.status.success() {
        bail!("fio against {what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    // fio's nbd engine prints a line of its own before the JSON.
    let text = String::from_utf8_lossy(&out.stdout);
    let json_at = text.find('{').ok_or_else(|| anyhow!("fio printed no JSON report: {text}"))?;
    let v: Value = serde_json::from_str(&text[json_at..]).context("fio's JSON report")?;
    let job = &v["jobs"][0];
    if job["error"].as_i64().unwrap_or(0) != 0 {
        bail!("fio against {what} reported error {}", job["error"]);
    }
    let w = &job["write"];
    let bins = w["clat_ns"]["bins"]
        .as_object()
        .ok_or_else(|| anyhow!("fio's report has no latency bins"))?
        .iter()
        .filter_map(|(k, c)| Some((k.parse::<u64>().ok()?, c.as_u64()?)))
        .collect();
    Ok(FioRun {
        iops: w["iops"].as_f64().context("fio reported no IOPS")?,
        ops: w["total_ios"].as_u64().context("fio reported no I/O count")?,
        runtime_s: w["runtime"].as_f64().context("fio reported no runtime")? / 1000.0,
        bins,
    })
}

/// The CPU time of the processes, threads that ended included: nbdkit and qemu-nbd serve
/// a connection on threads that end with it, so a sum over the live threads would miss
/// them (`/proc/PID/stat`, clock-tick resolution, plenty for runs of seconds).
pub(crate) fn cpu_of(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|&p| stat_cpu_ns(p)).sum()
}

/// A peer server process, killed when dropped.
pub(crate) struct Peer(pub(crate) Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn wait_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{what} did not listen on port {port} within 20 s")
}

pub(crate) fn raw_file(path: &Path) -> Result<()> {
    let f = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(VOLUME_BYTES)?;
    Ok(())
}

/// nbdkit's `file` plugin on a new raw file `NAME.raw` in `dir`; over TLS only
/// (`--tls=require`) with the certificates of `pki` (GnuTLS's directory layout) where given.
pub(crate) fn start_nbdkit(dir: &Path, name: &str, pki: Option<&Path>) -> Result<(Peer, Target)> {
    let file = dir.join(format!("{name}.raw"));
    raw_file(&file)?;
    let port = free_port()?;
    let mut cmd = Command::new("nbdkit");
    cmd.args(["--foreground", "--exit-with-parent", "-i", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(pki) = pki {
        cmd.arg("--tls=require").arg(format!("--tls-certificates={}", pki.display()));
    }
    let child = cmd
        .arg("file")
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start nbdkit")?;
    let pid = child.id();
    let peer = Peer(child);
    wait_port(port, "nbdkit")?;
    let scheme = if pki.is_some() { "nbds" } else { "nbd" };
    Ok((peer, Target { uri: format!("{scheme}://127.0.0.1:{port}/"), pids: vec![pid] }))
}

fn start_qemu_nbd(dir: &Path) -> Result<(Peer, Target)> {
    let file = dir.join("qemu-nbd.raw");
    raw_file(&file)?;
    let port = free_port()?;
    let child = Command::new("qemu-nbd")
        .args(["-f", "raw", "-t", "-b", "127.0.0.1", "-p", &port.to_string()])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start qemu-nbd")?;
    let pid = child.id();
    let peer = Peer(child);
    wait_port(port, "qemu-nbd")?;
    Ok((peer, Target { uri: format!("nbd://127.0.0.1:{port}/"), pids: vec![pid] }))
}

/// Creates volume `name` of `VOLUME_BYTES` on one disk file, `disk`, on the node `api`
/// reaches.
pub(crate) fn create_on_file(api: &Client, name: &str, disk: &Path) -> Result<()> {
    let _: Value = api
        .post(
            "/v1/volumes",
            &CreateVolume {
                name: name.into(),
                size: VOLUME_BYTES,
                disks: vec![disk.display().to_string()],
                ..Default::default()
            },
        )
        .with_context(|| format!("create volume {name}"))?;
    Ok(())
}

/// Nodes A (volumes `plain`, `mirrored` and `mirrored-raid4`, each on one disk file), B
/// (the mirror of `mirrored`, on one file) and C (the mirror of `mirrored-raid4`, RAID-4).
fn start_nodes(bin: &Path, dir: &Path) -> Result<[NodeProc; 3]> {
    let a = NodeProc::start(bin, "peers-a", &dir.join("a"), &[]).context("start node A")?;
    let b = NodeProc::start(bin, "peers-b", &dir.join("b"), &["--mirror-layout", "single"]).context("start node B")?;
    let c = NodeProc::start(bin, "peers-c", &dir.join("c"), &[]).context("start node C")?;
    let ca = Client::new(&a.control);
    for name in ["plain", "mirrored", "mirrored-raid4"] {
        create_on_file(&ca, name, &dir.join(format!("{name}.img")))?;
    }
    crate::cluster::mirror_in_sync(&ca, "mirrored", &b.control, Duration::from_secs(300), |_| {})?;
    crate::cluster::mirror_in_sync(&ca, "mirrored-raid4", &c.control, Duration::from_secs(300), |_| {})?;
    Ok([a, b, c])
}

/// Runs every target at every depth, round by round and interleaved, warm-up rounds first
/// (`tag` names the scenario in the progress lines): the figures of the measured rounds,
/// by depth then arm. `run` is one fio run; `after_round` runs after each round, told
/// whether it was measured.
pub(crate) fn rounds(
    tag: &str,
    arms: &[&str],
    depths: &[usize],
    targets: &[Target],
    p: &Params,
    mut run: impl FnMut(&Target, usize) -> Result<FioRun>,
    mut after_round: impl FnMut(bool) -> Result<()>,
) -> Result<Vec<Vec<Figures>>> {
    let mut figures: Vec<Vec<Figures>> = depths.iter().map(|_| arms.iter().map(|_| Figures::new()).collect()).collect();
    let total_rounds = p.warmup_rounds + p.rounds;
    for round in 0..total_rounds {
        let measured = round >= p.warmup_rounds;
        for (d, &depth) in depths.iter().enumerate() {
            for (i, t) in targets.iter().enumerate() {
                eprintln!(
                    "[{tag}] round {}/{total_rounds}{}: {} at queue depth {depth}",
                    round + 1,
                    if measured { "" } else { " (warm-up)" },
                    arms[i]
                );
                let cpu0 = cpu_of(&t.pids)?;
                let r = run(t, depth).with_context(|| format!("arm {}", arms[i]))?;
                let cpu = cpu_of(&t.pids)?.saturating_sub(cpu0);
                if measured {
                    figures[d][i].add(&r, cpu)?;
                }
            }
        }
        after_round(measured)?;
    }
    Ok(figures)
}

pub fn run(bin: &Path, quick: bool) -> Result<Vec<ScenarioResult>> {
    tool("fio", "--version", "fio")?;
    tool("nbdkit", "--version", "nbdkit")?;
    tool("qemu-nbd", "--version", "qemu-utils")?;
    let p = if quick {
        Params { secs: 0.3, rounds: 1, warmup_rounds: 0, ping_pongs: 200 }
    } else {
        Params { secs: 4.0, rounds: 5, warmup_rounds: 1, ping_pongs: 20_000 }
    };
    let dir = tempfile::Builder::new().prefix("nvmirror-bench-peers-").tempdir()?;
    let (_nbdkit, nbdkit) = start_nbdkit(dir.path(), "nbdkit", None)?;
    let (_qemu, qemu) = start_qemu_nbd(dir.path())?;
    let nodes = start_nodes(bin, dir.path())?;
    let [pa, pb, pc] = [0, 1, 2].map(|i| nodes[i].pid());
    let (pa, pb, pc) = (
        pa.context("node A is not running")?,
        pb.context("node B is not running")?,
        pc.context("node C is not running")?,
    );
    let nbd = &nodes[0].nbd;
    let targets = [
        nbdkit,
        qemu,
        Target { uri: format!("nbd://{nbd}/plain"), pids: vec![pa] },
        Target { uri: format!("nbd://{nbd}/mirrored"), pids: vec![pa, pb] },
        Target { uri: format!("nbd://{nbd}/mirrored-raid4"), pids: vec![pa, pc] },
    ];
    let mut ping = PingPong::start()?;
    let mut ping_hist = new_histogram();
    let mut seq = 0u64;
    let figures = rounds(
        "nbd-peers",
        &ARMS,
        &DEPTHS,
        &targets,
        &p,
        |t, depth| fio(&t.uri, depth, p.secs),
        |measured| {
            for _ in 0..p.ping_pongs {
                seq += 1;
                let rt = ping.round_trip(seq)?;
                if measured {
                    ping_hist.record(u64::try_from(rt.as_nanos()).unwrap_or(u64::MAX).clamp(1, LATENCY_NS_MAX))?;
                }
            }
            Ok(())
        },
    )?;
    drop(nodes);

    let at = |depth: usize, arm: &str| -> &Figures {
        let d = DEPTHS.iter().position(|&x| x == depth).expect("a measured depth");
        let i = ARMS.iter().position(|&x| x == arm).expect("an arm");
        &figures[d][i]
    };
    let ping_p50_us = ping_hist.value_at_quantile(0.5) as f64 / 1000.0;
    let per_round = |depth: usize, num: &str, den: &str, f: fn(&Figures, usize) -> f64| {
        Figures::by_round(at(depth, num), at(depth, den), f)
    };
    let iops_of = Figures::iops_in;
    let p50_of = Figures::p50_in;
    let p99_of = Figures::p99_in;
    let arms_at = |depth: usize, names: &[&str]| -> Vec<ArmResult> {
        names.iter().map(|n| at(depth, n).result(n, depth)).collect()
    };
    let cpu_note = |depth: usize| {
        ARMS.iter().map(|n| format!("{n} {:.1} us", at(depth, n).cpu_us_per_op())).collect::<Vec<_>>().join(", ")
    };
    let params = json!({
        "volume_bytes": VOLUME_BYTES,
        "secs_per_run": p.secs,
        "rounds": p.rounds,
        "warmup_rounds": p.warmup_rounds,
        "client": "fio --ioengine=nbd --rw=randwrite --bs=4k --time_based",
        "ping_pong_p50_us": ping_p50_us,
    });
    let cpu_counted = "the server processes of each arm, all threads, ended ones included (/proc/PID/stat): nbdkit; \
                       qemu-nbd; node A; nodes A and B; nodes A and C (fio's own CPU is not counted)"
        .to_string();
    let result =
        |name: &str, description: String, arms: Vec<ArmResult>, check: Check, notes: Vec<String>| ScenarioResult {
            name: name.into(),
            description,
            params: params.clone(),
            cpu_counted: cpu_counted.clone(),
            arms,
            check: Some(check),
            notes,
        };
    let (plain32, kit32, plain1, kit1) = (at(32, "plain"), at(32, "nbdkit"), at(1, "plain"), at(1, "nbdkit"));
    let mirrored32 = at(32, "mirrored");
    let mirrored1 = at(1, "mirrored");
    let raid32 = at(32, "mirrored-raid4");
    let qd32_note = format!(
        "QD32 IOPS: {}; CPU per write: {}",
        ARMS.iter().map(|n| format!("{n} {:.0}", at(32, n).iops())).collect::<Vec<_>>().join(", "),
        cpu_note(32)
    );
    let qd1_note = format!(
        "QD1 p50/p99 us: {}; ping-pong p50 {ping_p50_us:.1}; CPU per write: {}",
        ARMS.iter()
            .map(|n| format!("{n} {:.1}/{:.1}", at(1, n).us_at(0.5), at(1, n).us_at(0.99)))
            .collect::<Vec<_>>()
            .join(", "),
        cpu_note(1)
    );
    Ok(vec![
        result(
            "nbd-peers-qd32",
            "4 KiB random writes at QD32 through fio's nbd engine: unmirrored nvmirror volume on one disk against \
             nbdkit's file plugin (and qemu-nbd), interleaved"
                .into(),
            arms_at(32, &ARMS),
            Check::at_least(
                "IOPS(plain) / IOPS(nbdkit), QD32",
                plain32.iops() / kit32.iops().max(f64::MIN_POSITIVE),
                1.0,
                per_round(32, "plain", "nbdkit", iops_of),
            ),
            vec![qd32_note.clone()],
        ),
        result(
            "nbd-peers-qd32-p99",
            "the same runs: tail latency".into(),
            arms_at(32, &["nbdkit", "plain"]),
            Check::at_most(
                "p99(plain) / p99(nbdkit), QD32",
                plain32.us_at(0.99) / kit32.us_at(0.99).max(f64::MIN_POSITIVE),
                1.5,
                per_round(32, "plain", "nbdkit", p99_of),
            ),
            vec![],
        ),
        result(
            "nbd-peers-qd1",
            "4 KiB random writes at QD1 through fio's nbd engine: unmirrored nvmirror volume against nbdkit".into(),
            arms_at(1, &ARMS),
            Check::at_most(
                "p50(plain) / p50(nbdkit), QD1",
                plain1.us_at(0.5) / kit1.us_at(0.5).max(f64::MIN_POSITIVE),
                1.0,
                per_round(1, "plain", "nbdkit", p50_of),
            ),
            vec![qd1_note.clone()],
        ),
        result(
            "nbd-peers-qd1-p99",
            "the same runs: tail latency".into(),
            arms_at(1, &["nbdkit", "plain"]),
            Check::at_most(
                "p99(plain) / p99(nbdkit), QD1",
                plain1.us_at(0.99) / kit1.us_at(0.99).max(f64::MIN_POSITIVE),
                1.5,
                per_round(1, "plain", "nbdkit", p99_of),
            ),
            vec![],
        ),
        result(
            "nbd-peers-mirrored-qd32",
            "QD32: the volume mirrored to a second node on this host (its mirror on one file) against the \
             unmirrored one"
                .into(),
            arms_at(32, &["plain", "mirrored"]),
            Check::at_least(
                "IOPS(mirrored) / IOPS(plain), QD32",
                mirrored32.iops() / plain32.iops().max(f64::MIN_POSITIVE),
                0.7,
                per_round(32, "mirrored", "plain", iops_of),
            ),
            vec![qd32_note.clone()],
        ),
        result(
            "nbd-peers-mirrored-raid4-qd32",
            "QD32: the volume mirrored to a node that keeps its mirror in RAID-4 3+1 against the unmirrored one".into(),
            arms_at(32, &["plain", "mirrored-raid4"]),
            Check::at_least(
                "IOPS(mirrored-raid4) / IOPS(plain), QD32",
                raid32.iops() / plain32.iops().max(f64::MIN_POSITIVE),
                0.7,
                per_round(32, "mirrored-raid4", "plain", iops_of),
            ),
            vec![qd32_note],
        ),
        result(
            "nbd-peers-mirrored-qd1",
            "QD1: mirrored against unmirrored plus a replication round trip (loopback TCP ping-pong)".into(),
            arms_at(1, &["plain", "mirrored"]),
            Check::at_most(
                "p50(mirrored) / (p50(plain) + 1.2 x p50(ping-pong)), QD1",
                mirrored1.us_at(0.5) / (plain1.us_at(0.5) + 1.2 * ping_p50_us).max(f64::MIN_POSITIVE),
                1.0,
                Spread::of(mirrored1.round_p50_us.len().min(plain1.round_p50_us.len()), |r| {
                    mirrored1.round_p50_us[r] / (plain1.round_p50_us[r] + 1.2 * ping_p50_us).max(f64::MIN_POSITIVE)
                }),
            ),
            vec![qd1_note],
        ),
    ])
}
