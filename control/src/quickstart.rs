//! `nvmirror quickstart`: the whole promise on one machine. Two nodes on loopback, a
//! volume mirrored from one to the other, checked writes through NBD, the source killed
//! with SIGKILL while writes are in flight, failover, and every acknowledged write verified
//! on the promoted mirror.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nvmirror_dataplane::frontend::nbd_client::NbdClient;
use serde_json::{json, Value};

use crate::api::{Client, CreateVolume, MirrorRequest};
use crate::cluster::NodeProc;
use crate::workload::Workload;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Writes to issue before the source is killed.
    #[arg(long, default_value_t = 20_000)]
    writes: u64,
    /// Writes in flight at once.
    #[arg(long, default_value_t = 1)]
    queue_depth: usize,
    /// Volume size.
    #[arg(long, default_value = "64M")]
    size: String,
    /// Keep the nodes' data dirs (printed) instead of deleting them.
    #[arg(long)]
    keep: bool,
    /// Replication transport: tcp, or rdma (needs an RDMA device and the rdma build).
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// Address the nodes replicate on (for rdma: an address of the RDMA interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// NVRAM of both nodes, MODE:DIR (file:, file-sync: or dax:); each node gets a
    /// subdirectory. Default: file: in each node's data dir.
    #[arg(long)]
    nvram: Option<String>,
}

fn mib(n: u64) -> String {
    format!("{} MiB", n >> 20)
}

/// "RAID-4 3+1, 64 KiB stripe unit" from a storage status.
fn geometry(s: &Value) -> String {
    match s["level"].as_str() {
        Some("raid4") => {
            format!("RAID-4 {}+1, {} KiB stripe unit", s["data_disks"], s["stripe_unit"].as_u64().unwrap_or(0) >> 10)
        }
        _ => "on a single disk".into(),
    }
}

fn us(ns: u64) -> String {
    format!("{:.1} us", ns as f64 / 1000.0)
}

pub fn run(args: Args) -> Result<()> {
    let bin = std::env::current_exe().context("locate the nvmirror binary")?;
    let tmp = tempfile::Builder::new().prefix("nvmirror-quickstart-").tempdir()?;
    let root: PathBuf = if args.keep { tmp.keep() } else { tmp.path().to_path_buf() };
    let size = crate::size::parse(&args.size)?;
    println!("nvmirror quickstart: two nodes on loopback, data under {}", root.display());

    let nvram = |site: &str| -> Result<Vec<String>> {
        Ok(match &args.nvram {
            None => Vec::new(),
            Some(spec) => {
                let (mode, dir) = spec.split_once(':').context("--nvram MODE:DIR")?;
                vec!["--nvram".into(), format!("{mode}:{}", PathBuf::from(dir).join(site).display())]
            }
        })
    };
    // Each site's own RAID-4 geometry: the mirror protocol carries volume blocks.
    let args_a: Vec<String> = ["--raid-data-disks", "3", "--raid-stripe-unit", "64K"]
        .map(String::from)
        .into_iter()
        .chain(nvram("site-a")?)
        .collect();
    let args_b: Vec<String> = ["--raid-data-disks", "5", "--raid-stripe-unit", "16K"]
        .map(String::from)
        .into_iter()
        .chain(nvram("site-b")?)
        .collect();
    let refs_a: Vec<&str> = args_a.iter().map(String::as_str).collect();
    let refs_b: Vec<&str> = args_b.iter().map(String::as_str).collect();
    let mut a = NodeProc::start_on(&bin, "site-a", &root.join("site-a"), &args.host, &refs_a)?;
    let b = NodeProc::start_on(&bin, "site-b", &root.join("site-b"), &args.host, &refs_b)?;
    let ca = Client::new(&a.control);
    let cb = Client::new(&b.control);
    for (n, c) in [(&a, &ca), (&b, &cb)] {
        let s: Value = c.get("/v1/status")?;
        println!(
            "  {}: control {}  replication {}  nbd {}  nvram {}",
            n.name,
            n.control,
            n.replication,
            n.nbd,
            s["nvram"].as_str().unwrap_or("?")
        );
    }

    let _: Value = ca.post(
        "/v1/volumes",
        &CreateVolume { name: "demo".into(), size, log_bytes: Some(8 << 20), ..CreateVolume::default() },
    )?;
    let s: Value = ca.get("/v1/status")?;
    println!("1. created volume demo ({}) on site-a, {}", mib(size), geometry(&s["volumes"][0]["storage"]));

    let t = Instant::now();
    let _: Value = ca.post(
        "/v1/volumes/demo/mirror",
        &MirrorRequest {
            to: b.control.clone(),
            transport: args.transport.clone(),
            policy: "strict".into(),
            resync_ranges: Vec::new(),
            rate: None,
        },
    )?;
    loop {
        let s: Value = ca.get("/v1/status")?;
        let state = s["volumes"][0]["state"].as_str().unwrap_or("").to_string();
        if state == "in-sync" {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("mirror did not reach in-sync (state {state})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let s: Value = cb.get("/v1/status")?;
    println!(
        "2. mirrored demo to site-b over {}: baseline of {} copied, in sync after {:.2} s; the mirror is {}",
        args.transport,
        mib(size),
        t.elapsed().as_secs_f64(),
        geometry(&s["mirrors"][0]["storage"])
    );

    let blocks = (size / 4096).min(4096);
    let mut w = Workload::new(0, blocks, 0x5eed);
    let mut client = NbdClient::connect(a.nbd.as_str(), "demo").context("NBD connect to site-a")?;
    let first = args.writes / 2;
    let t = Instant::now();
    w.run(&mut client, args.queue_depth, first, |_| {})?;
    let cp: Value = ca.post("/v1/volumes/demo/cp", &json!({}))?;
    println!(
        "3. wrote {first} x 4 KiB through NBD at queue depth {} in {:.2} s; forced CP {}: durable on both sites",
        args.queue_depth,
        t.elapsed().as_secs_f64(),
        cp["cp"]
    );

    // The rest of the writes; the source dies part-way, with writes in flight.
    let kill_at = w.acks + (args.writes - first) / 2;
    let mut killed = false;
    let pid = a.pid();
    w.run(&mut client, args.queue_depth.max(4), args.writes - first, |acks| {
        if acks == kill_at && !killed {
            killed = true;
            if let Some(pid) = pid {
                // SIGKILL straight from the writer, between an ack and the next writes.
                // SAFETY: kill(2) on a pid we spawned; no memory is involved.
                unsafe { libc::kill(i32::try_from(pid).unwrap_or(0), libc::SIGKILL) };
            }
        }
    })?;
    a.kill();
    let in_flight = w.writes - w.acks - w.errors;
    println!("4. killed site-a with SIGKILL after {} acknowledged writes ({in_flight} writes were in flight)", w.acks);

    let t = Instant::now();
    let report: Value = cb.post("/v1/volumes/demo/failover", &json!({}))?;
    println!(
        "5. failover on site-b: epoch {}, {} log entries past the last CP replayed, in {:.1} ms; demo is now writable on site-b",
        report["epoch"],
        report["entries_replayed"],
        t.elapsed().as_secs_f64() * 1000.0
    );

    let mut reader = NbdClient::connect(b.nbd.as_str(), "demo").context("NBD connect to site-b")?;
    if reader.read_only {
        bail!("the promoted volume is still exported read-only");
    }
    let v = w.verify(|off, buf| reader.read(off, buf))?;
    let h = &w.latency_ns;
    println!(
        "6. verified {} blocks on site-b: all {} acknowledged writes are there ({} blocks hold acknowledged data, {} hold a newer unacknowledged write)",
        v.blocks_checked,
        w.acks,
        v.blocks_with_acked_data,
        v.newer_than_acked
    );
    println!(
        "   measured: {} writes, {} acknowledged, {} failed; ack latency p50 {}  p99 {}  p99.9 {}  max {}",
        w.writes,
        w.acks,
        w.errors,
        us(h.value_at_quantile(0.5)),
        us(h.value_at_quantile(0.99)),
        us(h.value_at_quantile(0.999)),
        us(h.max())
    );
    // The promoted volume takes writes.
    reader.write(0, &vec![0xa5; 4096]).context("write to the promoted volume")?;
    drop(reader);
    // Parity and checksums on site-b after the replay: a scrub finds nothing to repair.
    let _: Value = cb.post("/v1/volumes/demo/scrub", &json!({}))?;
    let t = Instant::now();
    let report = loop {
        let s: Value = cb.get("/v1/volumes/demo/storage")?;
        if s["scrub"].is_null() && !s["last_scrub"].is_null() {
            break s["last_scrub"].clone();
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the scrub of demo on site-b did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "7. scrubbed demo on site-b in {:.2} s: {} ({} blocks checked, {} checksum errors, {} parity mismatches)",
        t.elapsed().as_secs_f64(),
        report["result"].as_str().unwrap_or("?"),
        report["blocks_checked"],
        report["checksum_errors"],
        report["parity_mismatches"]
    );
    if report["result"] != "clean" {
        bail!("the scrub after failover found damage: {report}");
    }
    drop(b);
    if !v.bad.is_empty() {
        for line in v.bad.iter().take(20) {
            eprintln!("   LOST: {line}");
        }
        bail!("{} blocks do not hold their acknowledged data", v.bad.len());
    }
    if args.keep {
        println!("data kept under {}", root.display());
    }
    println!("OK: no acknowledged write was lost");
    Ok(())
}
