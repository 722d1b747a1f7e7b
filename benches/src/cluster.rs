//! Two real nodes on loopback for the end-to-end scenarios.
//!
//! The node binary is the workspace's `nvmirror` (package `nvmirror-control`). Unless
//! `--node-bin` names one, the harness builds it first with the same cargo profile as
//! itself (`cargo build [--release] -p nvmirror-control --bin nvmirror`, into the target
//! directory the harness runs from) and takes it from beside its own executable, so that
//! the nodes always run the code of the work tree being measured.
//!
//! Setup per scenario: nodes A and B are started with [`NodeProc`] (ephemeral loopback
//! ports, data dirs and logs in a temporary directory, `file:` NVRAM, the default). On A,
//! volume `bench` is created first and volume `plain` second (so their pollers are pinned
//! to cores 0 and 1 respectively), both of the same size and log size; `bench` is
//! mirrored to B (`strict` policy, TCP) and the harness waits for `in-sync` in
//! `GET /v1/status`. `plain` stays unmirrored: it is the same write path with mirroring
//! off.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nvmirror_control::api::{Client, CreateVolume, MirrorRequest};
use nvmirror_control::cluster::NodeProc;
use nvmirror_dataplane::frontend::nbd_client::NbdClient;
use serde_json::Value;

use crate::measure::{CpuProbe, Progress};
use crate::report::workspace_root;

pub const MIRRORED: &str = "bench";
pub const PLAIN: &str = "plain";
const IN_SYNC_MAX: Duration = Duration::from_secs(600);

/// Builds (unless given) and locates the `nvmirror` node binary.
pub fn node_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("--node-bin {}: no such file", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("locate the harness executable")?;
    let mut profile_dir = exe.parent().ok_or_else(|| anyhow!("harness executable has no directory"))?.to_path_buf();
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir.pop();
    }
    let bin = profile_dir.join("nvmirror");
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap_or("release").to_string();
    let target_dir = profile_dir.parent().map(Path::to_path_buf);
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cmd.arg("build");
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    cmd.args(["-p", "nvmirror-control", "--bin", "nvmirror"]).current_dir(workspace_root());
    if let Some(t) = &target_dir {
        cmd.env("CARGO_TARGET_DIR", t);
    }
    let hint = || {
        format!(
            "build it with `cargo build --release -p nvmirror-control` (same target directory as the harness) \
             or pass --node-bin PATH; expected at {}",
            bin.display()
        )
    };
    eprintln!("[harness] building the node binary: {cmd:?}");
    let status = cmd.status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) if bin.is_file() => eprintln!(
            "[harness] WARNING: cargo build failed ({s}); using the existing {}, which may be stale",
            bin.display()
        ),
        Err(e) if bin.is_file() => eprintln!(
            "[harness] WARNING: cannot run cargo ({e}); using the existing {}, which may be stale",
            bin.display()
        ),
        Ok(s) => bail!("cargo build of the node binary failed ({s}); {}", hint()),
        Err(e) => bail!("cannot run cargo to build the node binary ({e}); {}", hint()),
    }
    if !bin.is_file() {
        bail!("node binary missing; {}", hint());
    }
    Ok(bin)
}

/// Mirrors `volume` of the node `ca` speaks to onto the node whose control address is
/// `to` (TCP, policy strict, as every node scenario does) and waits until the pair is in
/// sync, calling `waiting` with the volume's status between looks.
pub fn mirror_in_sync(
    ca: &Client,
    volume: &str,
    to: &str,
    max: Duration,
    mut waiting: impl FnMut(&Value),
) -> Result<()> {
    let _: Value = ca
        .post(
            &format!("/v1/volumes/{volume}/mirror"),
            &MirrorRequest {
                to: to.to_string(),
                transport: "tcp".into(),
                policy: "strict".into(),
                resync_ranges: Vec::new(),
                rate: None,
            },
        )
        .with_context(|| format!("mirror volume {volume}"))?;
    let started = Instant::now();
    loop {
        let s: Value = ca.get("/v1/status")?;
        let v = s["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["volume"] == volume))
            .cloned()
            .ok_or_else(|| anyhow!("volume {volume} missing from the status"))?;
        if v["state"] == "in-sync" {
            return Ok(());
        }
        if started.elapsed() > max {
            bail!("volume {volume} did not reach in-sync within {max:?}: {v}");
        }
        waiting(&v);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sizes of the volumes a scenario writes to.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub volume_bytes: u64,
    pub log_bytes: u64,
}

impl Geometry {
    pub fn new(quick: bool) -> Self {
        if quick {
            // The smallest partition a node accepts (PARTITION_BYTES_MIN).
            Geometry { volume_bytes: 16 << 20, log_bytes: 4 << 20 }
        } else {
            Geometry { volume_bytes: 256 << 20, log_bytes: 16 << 20 }
        }
    }
}

/// Nodes A (holding `bench`, mirrored to B, and `plain`) and B.
pub struct Cluster {
    pub a: NodeProc,
    pub b: NodeProc,
    pub geometry: Geometry,
    pub baseline_s: f64,
    // Dropped last: the nodes are killed before their directories go.
    _dir: tempfile::TempDir,
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Cluster {
    pub fn start(scenario: &str, bin: &Path, geometry: Geometry) -> Result<Cluster> {
        let mut progress = Progress::new(scenario);
        let dir = tempfile::Builder::new().prefix("nvmirror-bench-nodes-").tempdir()?;
        progress.say(true, || format!("starting nodes A and B under {}", dir.path().display()));
        let a = NodeProc::start(bin, "bench-a", &dir.path().join("a"), &[]).context("start node A")?;
        let b = NodeProc::start(bin, "bench-b", &dir.path().join("b"), &[]).context("start node B")?;
        let mut cluster = Cluster { a, b, geometry, baseline_s: 0.0, _dir: dir };
        cluster.setup(&mut progress).map_err(|e| {
            anyhow!(
                "{e:#}\n--- node A log ---\n{}\n--- node B log ---\n{}",
                log_tail(&cluster.a.log_path(), 20),
                log_tail(&cluster.b.log_path(), 20)
            )
        })?;
        Ok(cluster)
    }

    fn setup(&mut self, progress: &mut Progress) -> Result<()> {
        let ca = Client::new(&self.a.control);
        for name in [MIRRORED, PLAIN] {
            let _: Value = ca
                .post(
                    "/v1/volumes",
                    &CreateVolume {
                        name: name.into(),
                        size: self.geometry.volume_bytes,
                        log_bytes: Some(self.geometry.log_bytes),
                        ..Default::default()
                    },
                )
                .with_context(|| format!("create volume {name}"))?;
        }
        let started = Instant::now();
        mirror_in_sync(&ca, MIRRORED, &self.b.control, IN_SYNC_MAX, |v| {
            progress.say(false, || {
                format!(
                    "mirroring {MIRRORED}: state {}, baseline {} of {} MiB",
                    v["state"].as_str().unwrap_or("?"),
                    v["baseline_done_bytes"].as_u64().unwrap_or(0) >> 20,
                    self.geometry.volume_bytes >> 20
                )
            });
        })?;
        self.baseline_s = started.elapsed().as_secs_f64();
        progress.say(true, || format!("{MIRRORED} in sync after {:.1} s", self.baseline_s));
        Ok(())
    }

    pub fn connect(&self, export: &str) -> Result<NbdClient> {
        let c = NbdClient::connect(self.a.nbd.as_str(), export).with_context(|| format!("NBD connect to {export}"))?;
        if c.read_only || c.size < self.geometry.volume_bytes {
            bail!("export {export} is read-only or smaller than expected");
        }
        Ok(c)
    }

    /// CPU of the harness and both nodes.
    pub fn cpu_probe(&self) -> Result<CpuProbe> {
        let pids = [self.a.pid(), self.b.pid()].into_iter().collect::<Option<Vec<u32>>>();
        Ok(CpuProbe::with_children(pids.ok_or_else(|| anyhow!("a node is not running"))?))
    }

    /// Node B's status of its mirror of `bench` (entries received, group commits), for the
    /// result's parameters.
    pub fn mirror_status(&self) -> Value {
        Client::new(&self.b.control)
            .get::<Value>("/v1/status")
            .ok()
            .and_then(|s| s["mirrors"].as_array().and_then(|ms| ms.iter().find(|m| m["volume"] == MIRRORED)).cloned())
            .unwrap_or(Value::Null)
    }

    /// Node A's status of `volume`, for the result's parameters.
    pub fn volume_status(&self, volume: &str) -> Value {
        Client::new(&self.a.control)
            .get::<Value>("/v1/status")
            .ok()
            .and_then(|s| s["volumes"].as_array().and_then(|vs| vs.iter().find(|v| v["volume"] == volume)).cloned())
            .unwrap_or(Value::Null)
    }
}
