//! A destination that presents wrong memory keys, addresses, sizes or epochs when an RDMA
//! link is set up: the source must refuse it with a clear error, and nothing may be placed.
//!
//! Each case runs a real destination in this process (a `Mirror`, the node's RDMA service
//! with its presented regions changed, the TCP control channel) and connects the real
//! `RdmaConnector` to it. The wrong epoch is a source whose hello is older than the
//! mirror's epoch (a fenced primary).
//!
//! Usage: hw-rdma-bad-peer --addr IP --port FIRST_PORT --dir DIR

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use nvmirror_dataplane::destination::{MemMetaStore, Mirror, MirrorMeta, SingleMirror};
use nvmirror_dataplane::log::PARTITIONS;
use nvmirror_dataplane::nvram::{MappedNvram, Nvram, NvramMode};
use nvmirror_dataplane::storage::MemDevice;
use nvmirror_dataplane::transport::rdma::{RdmaConnector, RdmaService, Tamper};
use nvmirror_dataplane::transport::wire::RdmaRegion;
use nvmirror_dataplane::transport::{tcp, Connector, Hello, Intent, MirrorDirectory};

const VOLUME_ID: u64 = 0x6877_6261_6470_0001;
const PARTITION_BYTES: usize = 4 << 20;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn hello(epoch: u64) -> Hello {
    Hello {
        source_node: "bad-peer-src".into(),
        volume: "badpeer".into(),
        volume_id: VOLUME_ID,
        epoch,
        volume_bytes: 16 << 20,
        partition_bytes: PARTITION_BYTES as u64,
        intent: Intent::Baseline,
        base_seq: 1,
        base_cp_gen: 1,
        features: 0,
    }
}

fn wrong_key(r: &mut [RdmaRegion; PARTITIONS]) {
    r[1].rkey ^= 0x00a5_5a00;
}
fn outside_registration(r: &mut [RdmaRegion; PARTITIONS]) {
    r[0].addr += r[0].len;
}
fn larger_than_registered(r: &mut [RdmaRegion; PARTITIONS]) {
    // Claims the partition's size, from an address that leaves the last bytes outside.
    r[1].addr += 4096;
}
fn wrong_size(r: &mut [RdmaRegion; PARTITIONS]) {
    r[0].len /= 2;
}

/// Runs one destination that presents regions through `tamper`, with its mirror at
/// `mirror_epoch`, and connects a source at `source_epoch`. Returns the source's error,
/// or `None` when it connected.
fn case(
    addr: SocketAddr,
    dir: &Path,
    tamper: Option<Tamper>,
    mirror_epoch: u64,
    source_epoch: u64,
) -> Result<Option<String>> {
    std::fs::create_dir_all(dir)?;
    let logs: [Box<dyn Nvram>; 2] = [0, 1].map(|p| {
        Box::new(MappedNvram::open(&dir.join(format!("log.{p}")), PARTITION_BYTES, NvramMode::File).expect("log file"))
            as Box<dyn Nvram>
    });
    let mut meta = MirrorMeta::new(&hello(mirror_epoch));
    meta.epoch = mirror_epoch;
    let device = Arc::new(MemDevice::new(16 << 20));
    let mirror = Mirror::open(meta, Box::<MemMetaStore>::default(), logs, device)?;
    let rdma = RdmaService::start_with(addr, tamper).map_err(|e| anyhow!(e))?;
    let listener = TcpListener::bind(addr).context("control listener")?;
    let directory: Arc<dyn MirrorDirectory> = Arc::new(SingleMirror { mirror: mirror.clone(), rdma: Some(rdma) });
    std::thread::spawn(move || tcp::serve(listener, directory, Arc::new(AtomicBool::new(false)), Default::default()));
    let r = RdmaConnector::default().connect(&addr.to_string(), &hello(source_epoch));
    // Nothing was placed in the destination's log files.
    for (p, (ptr, len)) in mirror.log_memory().into_iter().enumerate() {
        // SAFETY: the mirror's log mappings live as long as `mirror`, held here; only read.
        let bytes = unsafe { std::slice::from_raw_parts(ptr.cast_const(), len) };
        if bytes.iter().any(|&b| b != 0) {
            bail!("log file {p} was written to during a refused set-up");
        }
    }
    Ok(r.err().map(|e| e.to_string()))
}

/// A case: its name, how the destination changes its regions, the mirror's and the
/// source's epochs, and what the refusal must say (nothing: it must connect).
type Case = (&'static str, Option<Tamper>, u64, u64, &'static [&'static str]);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let ip = arg(&args, "--addr").ok_or_else(|| anyhow!("--addr IP"))?;
    let first_port: u16 = arg(&args, "--port").unwrap_or_else(|| "18900".into()).parse()?;
    let dir = PathBuf::from(arg(&args, "--dir").ok_or_else(|| anyhow!("--dir DIR"))?);
    let cases: [Case; 6] = [
        ("honest", None, 1, 1, &[]),
        ("wrong-memory-key", Some(wrong_key), 1, 1, &["log file 1", "remote access error", "wrong memory key"]),
        ("address-outside-registration", Some(outside_registration), 1, 1, &["log file 0", "refused an RDMA READ"]),
        ("region-beyond-registration", Some(larger_than_registered), 1, 1, &["log file 1", "last bytes"]),
        ("wrong-size", Some(wrong_size), 1, 1, &["log file 0", "bytes, the partition"]),
        ("stale-epoch", None, 3, 2, &["epoch"]),
    ];
    let mut failed = 0;
    for (port, (name, tamper, mirror_epoch, source_epoch, want)) in (first_port..).zip(cases) {
        let addr: SocketAddr = format!("{ip}:{port}").parse()?;
        let got =
            case(addr, &dir.join(name), tamper, mirror_epoch, source_epoch).with_context(|| format!("case {name}"))?;
        match (got, want.is_empty()) {
            (None, true) => println!("hwt-check: {name}: connected, regions proved"),
            (Some(e), true) => {
                failed += 1;
                println!("hwt-check: FAIL {name}: an honest destination was refused: {e}");
            }
            (None, false) => {
                failed += 1;
                println!("hwt-check: FAIL {name}: the source accepted it");
            }
            (Some(e), false) => {
                if want.iter().all(|w| e.contains(w)) {
                    println!("hwt-check: {name}: refused: {e}");
                } else {
                    failed += 1;
                    println!("hwt-check: FAIL {name}: refused, but the error does not say {want:?}: {e}");
                }
            }
        }
    }
    if failed > 0 {
        bail!("{failed} cases failed");
    }
    println!("all {} cases behaved", 6);
    Ok(())
}
