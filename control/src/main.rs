//! `nvmirror`: run a node, administer nodes, or take the quickstart tour.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use nvmirror_control::api::{self, Client, CreateVolume, MirrorRequest};
use nvmirror_control::node::{Node, NodeConfig};
use nvmirror_control::{quickstart, size};
use nvmirror_dataplane::frontend::nbd::NbdServer;
use nvmirror_dataplane::nvram::NvramSpec;
use serde_json::Value;

#[derive(Parser)]
#[command(name = "nvmirror", version, about = "Synchronous block-volume mirroring")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node.
    Node(NodeArgs),
    /// Administer a running node through its control API.
    Ctl {
        /// The node's control address (HOST:PORT).
        #[arg(long)]
        node: String,
        #[command(subcommand)]
        cmd: CtlCmd,
    },
    /// Start two nodes on loopback, mirror a volume, write through NBD, kill the source,
    /// fail over, and verify every acknowledged write.
    Quickstart(quickstart::Args),
}

#[derive(clap::Args)]
struct NodeArgs {
    #[arg(long)]
    data_dir: PathBuf,
    /// Replication listen address.
    #[arg(long)]
    listen: String,
    /// Control API address.
    #[arg(long)]
    control: String,
    /// NBD export address.
    #[arg(long)]
    nbd: String,
    /// Node name (default: node-PORT of the replication address).
    #[arg(long)]
    name: Option<String>,
    /// Shared secret for peer authentication.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// NVRAM for the NVLog and the mirrors' log files: file:DIR (default DATA/nvram),
    /// file-sync:DIR or dax:DIR.
    #[arg(long)]
    nvram: Option<String>,
    /// Keep node state in etcd (etcd://HOST:PORT).
    #[arg(long)]
    state: Option<String>,
}

#[derive(Subcommand)]
enum CtlCmd {
    /// Volumes on this node.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Pair a volume with a peer node, copy it (baseline) and keep it in sync.
    Mirror {
        volume: String,
        /// The peer's control address.
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "tcp")]
        transport: String,
        #[arg(long, default_value = "strict")]
        policy: String,
        /// Return once the baseline has started instead of waiting for in-sync.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting for in-sync after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Force a consistency point.
    Cp { volume: String },
    /// Break the mirror on this (destination) node and make the volume a writable primary.
    Failover { volume: String },
    /// Node, volume and mirror status.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    Create {
        name: String,
        /// Size, with K/M/G/T suffixes (powers of 1024).
        #[arg(long)]
        size: String,
        /// Device or file for the volume (default: a file in the data dir).
        #[arg(long)]
        disk: Vec<PathBuf>,
        #[arg(long)]
        parity: Option<PathBuf>,
        #[arg(long)]
        stripe_unit: Option<String>,
        /// Size of each of the two NVLog partitions (default 16M).
        #[arg(long)]
        log_size: Option<String>,
        /// Send consistency points to the mirror by value (block data) instead of by
        /// reference to the mirror's log files.
        #[arg(long)]
        cp_by_value: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Node(a) => run_node(a),
        Cmd::Ctl { node, cmd } => ctl(&node, cmd),
        Cmd::Quickstart(a) => quickstart::run(a),
    };
    if let Err(e) = r {
        eprintln!("nvmirror: {e:#}");
        std::process::exit(1);
    }
}

fn run_node(a: NodeArgs) -> Result<()> {
    if a.secret_file.is_some() {
        bail!("--secret-file: peer authentication is not available in this build yet; run without it on a trusted network");
    }
    if a.state.is_some() {
        bail!("--state: etcd-backed node state is not available in this build yet; state is kept in the data dir");
    }
    let nvram: NvramSpec = match &a.nvram {
        Some(s) => s.parse()?,
        None => format!("file:{}", a.data_dir.join("nvram").display()).parse()?,
    };
    let replication = TcpListener::bind(&a.listen).with_context(|| format!("bind replication address {}", a.listen))?;
    let nbd = TcpListener::bind(&a.nbd).with_context(|| format!("bind NBD address {}", a.nbd))?;
    let control_addr = api::parse_addr(&a.control)?;
    let control =
        tiny_http::Server::http(control_addr).map_err(|e| anyhow!("bind control address {}: {e}", a.control))?;
    let control_addr = control.server_addr().to_ip().ok_or_else(|| anyhow!("control address is not IP"))?;
    let replication_addr = replication.local_addr()?;
    let name = a.name.unwrap_or_else(|| format!("node-{}", replication_addr.port()));
    let node = Node::open(NodeConfig {
        name: name.clone(),
        data_dir: a.data_dir,
        nvram,
        replication: replication_addr,
        nbd: nbd.local_addr()?,
        control: control_addr,
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let dir: Arc<dyn nvmirror_dataplane::transport::MirrorDirectory> = node.clone();
    std::thread::Builder::new()
        .name("nvm-repl-accept".into())
        .spawn(move || nvmirror_dataplane::transport::tcp::serve(replication, dir, stop))?;
    let _nbd = NbdServer::spawn(nbd, node.clone())?;
    println!(
        "nvmirror node {name} ready: control={} replication={} nbd={} nvram={}",
        node.cfg.control,
        node.cfg.replication,
        node.cfg.nbd,
        node.status().nvram
    );
    std::io::stdout().flush()?;
    api::serve(control, node);
    Ok(())
}

fn ctl(addr: &str, cmd: CtlCmd) -> Result<()> {
    let client = Client::new(addr);
    match cmd {
        CtlCmd::Volume {
            cmd: VolumeCmd::Create { name, size: sz, disk, parity, stripe_unit, log_size, cp_by_value },
        } => {
            let body = CreateVolume {
                name: name.clone(),
                size: size::parse(&sz)?,
                disks: disk,
                parity,
                stripe_unit: stripe_unit.as_deref().map(size::parse).transpose()?,
                log_bytes: log_size.as_deref().map(size::parse).transpose()?,
                cp_by_value,
            };
            let rec: Value = client.post("/v1/volumes", &body)?;
            println!("created volume {name}: {} bytes at {}", rec["size"], rec["device"].as_str().unwrap_or("?"));
        }
        CtlCmd::Mirror { volume, to, transport, policy, no_wait, timeout } => {
            let _: Value = client
                .post(&format!("/v1/volumes/{volume}/mirror"), &MirrorRequest { to: to.clone(), transport, policy })?;
            if no_wait {
                println!("mirroring {volume} to {to}: baseline started");
                return Ok(());
            }
            wait_in_sync(&client, &volume, Duration::from_secs(timeout))?;
            println!("volume {volume} is in sync with {to}");
        }
        CtlCmd::Cp { volume } => {
            let r: Value = client.post(&format!("/v1/volumes/{volume}/cp"), &serde_json::json!({}))?;
            println!("CP {} of {volume} is durable on both sites", r["cp"]);
        }
        CtlCmd::Failover { volume } => {
            let r: Value = client.post(&format!("/v1/volumes/{volume}/failover"), &serde_json::json!({}))?;
            println!(
                "volume {volume} failed over: epoch {}, {} log entries replayed up to sequence {}; it is now a writable primary here",
                r["epoch"], r["entries_replayed"], r["last_seq"]
            );
            if let Some(stops) = r["stops"].as_array().filter(|s| !s.is_empty()) {
                for s in stops {
                    println!("  note: {}", s.as_str().unwrap_or(""));
                }
            }
        }
        CtlCmd::Status { json } => {
            let s: Value = client.get("/v1/status")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
        }
    }
    Ok(())
}

fn wait_in_sync(client: &Client, volume: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let mut last_line = String::new();
    loop {
        let s: Value = client.get("/v1/status")?;
        let v = s["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["volume"] == volume))
            .ok_or_else(|| anyhow!("volume {volume} vanished"))?;
        let state = v["state"].as_str().unwrap_or("?");
        let done = v["baseline_done_bytes"].as_u64().unwrap_or(0);
        let size = v["size_bytes"].as_u64().unwrap_or(1).max(1);
        match state {
            "in-sync" => {
                eprintln!();
                return Ok(());
            }
            "fenced" | "failed" => bail!("volume {volume} is {state}: {}", v["reason"].as_str().unwrap_or("")),
            _ => {}
        }
        let line = format!(
            "\r{volume}: {state} {:5.1}% ({} / {} MiB){}",
            done as f64 * 100.0 / size as f64,
            done >> 20,
            size >> 20,
            v["reason"].as_str().map(|r| format!(" [{r}]")).unwrap_or_default()
        );
        if line != last_line {
            eprint!("{line}");
            last_line = line;
        }
        if start.elapsed() > timeout {
            bail!("volume {volume} not in sync after {timeout:?} (state {state})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_status(s: &Value) {
    println!(
        "node {}  control {}  replication {}  nbd {}",
        s["node"].as_str().unwrap_or("?"),
        s["control"].as_str().unwrap_or("?"),
        s["replication"].as_str().unwrap_or("?"),
        s["nbd"].as_str().unwrap_or("?")
    );
    println!("nvram {} (survives {})", s["nvram"].as_str().unwrap_or("?"), s["nvram_survives"].as_str().unwrap_or("?"));
    let empty = Vec::new();
    let vols = s["volumes"].as_array().unwrap_or(&empty);
    let mirrors = s["mirrors"].as_array().unwrap_or(&empty);
    if vols.is_empty() && mirrors.is_empty() {
        println!("no volumes");
        return;
    }
    println!(
        "{:<16} {:<8} {:<12} {:>5} {:>10} {:>10} {:>8} {:<}",
        "VOLUME", "ROLE", "STATE", "EPOCH", "SIZE", "LOG USED", "LAST CP", "PEER"
    );
    for v in vols {
        println!(
            "{:<16} {:<8} {:<12} {:>5} {:>10} {:>10} {:>8} {}{}",
            v["volume"].as_str().unwrap_or("?"),
            "primary",
            v["state"].as_str().unwrap_or("?"),
            v["epoch"],
            human(v["size_bytes"].as_u64().unwrap_or(0)),
            human(v["log_bytes_used"].as_u64().unwrap_or(0)),
            v["last_cp"],
            v["peer"].as_str().unwrap_or("-"),
            v["reason"].as_str().map(|r| format!("  ({r})")).unwrap_or_default()
        );
    }
    for m in mirrors {
        let state = if m["promoted"].as_bool() == Some(true) {
            "broken"
        } else if m["consistent"].as_bool() != Some(true) {
            "baseline"
        } else if m["connected"].as_bool() == Some(true) {
            "in-sync"
        } else {
            "out-of-sync"
        };
        println!(
            "{:<16} {:<8} {:<12} {:>5} {:>10} {:>10} {:>8} {}",
            m["volume"].as_str().unwrap_or("?"),
            "mirror",
            state,
            m["epoch"],
            "",
            human(m["log_bytes_used"].as_u64().unwrap_or(0)),
            m["applied_cp"],
            m["source_node"].as_str().unwrap_or("?"),
        );
    }
}

fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", U[i])
    }
}
