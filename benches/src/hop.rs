//! Scenario `hop`: one replication hop at queue depth 1, against a TCP ping-pong floor.
//!
//! Method. The destination is the real one, in this process: a
//! [`nvmirror_dataplane::destination::Mirror`] with its two log files as `file:`
//! [`MappedNvram`] regions and a [`FileDevice`] mirror volume in a temporary directory,
//! served by the real TCP engine ([`tcp::serve`] on 127.0.0.1:0, one receiver thread per
//! connection). The source side is the real [`TcpConnector`] link (hello with intent
//! `Baseline`, then `PartitionOpen`) fed from a real [`NvLog`] over a `file:` region, the
//! way the volume poller feeds it: per operation one 4 KiB entry is appended and persisted,
//! then handed to the link (`send_entries` + `flush`), and the link is busy-polled until
//! the destination's `Ack` for that sequence number arrives. The latency recorded is from
//! the hand-over to the ack: placement, checksum checks and group commit on the
//! destination, both directions of loopback TCP, and the link's framing.
//!
//! When the active partition is full, the harness does what the poller does at a CP (not
//! timed): opens the other partition with the next CP generation, sends `Cp` for the full
//! one (by reference), waits for `CpDone` and frees it. The destination then applies the
//! partition's entries to its volume from its log file and releases the log.
//!
//! Floor: [`PingPong`], the same bytes over loopback TCP with no protocol around them.
//! Target: our median at most 1.5 times the floor's median.
//!
//! A third arm, `ours-tls`, is the same hop to a second destination over TLS (the link
//! security of `--tls-cert`: rustls, TLS 1.3, ECDSA P-256 certificates made for the run):
//! what TLS costs replication alone, with no NBD around it. It is recorded, not checked.

use std::fs;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nvmirror_dataplane::destination::{MetaStore, Mirror, MirrorMeta, SingleMirror};
use nvmirror_dataplane::format::{EntryHeader, EntryKind, PartitionHeader, BLOCK_BYTES};
use nvmirror_dataplane::log::{Checkpoint, NvLog, PARTITIONS};
use nvmirror_dataplane::nvram::{MappedNvram, Nvram, NvramMode};
use nvmirror_dataplane::storage::FileDevice;
use nvmirror_dataplane::transport::tcp::{self, TcpConnector, TcpLink};
use nvmirror_dataplane::transport::tls::TlsConfig;
use nvmirror_dataplane::transport::{
    Connector, Hello, Intent, Link, LinkEvent, LinkSecurity, Message, MirrorDirectory, Reply,
};
use serde_json::json;

use crate::floor::PingPong;
use crate::measure::{interleave, Arm, CpuProbe, Plan, Spread, XorShift};
use crate::report::{Check, ScenarioResult};

const VOLUME_ID: u64 = 0x6265_6e63_6830_0001;
const EPOCH: u64 = 1;
/// How long an ack or a CP may take before the harness gives up.
const REPLY_MAX: Duration = Duration::from_secs(60);

pub struct Params {
    pub plan: Plan,
    pub batch_ops: u64,
    pub partition_bytes: usize,
    pub volume_bytes: u64,
}

impl Params {
    pub fn new(quick: bool) -> Self {
        if quick {
            // A tiny partition, so that the quick run goes through CPs too.
            Params {
                plan: Plan { warmup_rounds: 1, rounds: 2 },
                batch_ops: 40,
                partition_bytes: 64 << 10,
                volume_bytes: 4 << 20,
            }
        } else {
            // The node's default partition size. The warm-up (10 000 hops) goes through both
            // partitions once, so that the first touch of the fresh log files' pages (page
            // faults, block allocation) is not measured.
            Params {
                plan: Plan { warmup_rounds: 5, rounds: 40 },
                batch_ops: 2000,
                partition_bytes: 16 << 20,
                volume_bytes: 256 << 20,
            }
        }
    }
}

/// Mirror metadata in a file, replaced atomically as the node does it.
struct FileMeta(PathBuf);

impl MetaStore for FileMeta {
    fn save(&self, meta: &MirrorMeta) -> io::Result<()> {
        let tmp = self.0.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec(meta).map_err(io::Error::other)?)?;
        fs::File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, &self.0)
    }
}

/// The source side of the hop: an NVLog, the link, and where the log stands.
struct Source {
    nvlog: NvLog<MappedNvram>,
    link: TcpLink,
    active: u8,
    gen: u64,
    next_seq: u64,
    blocks: u64,
    rng: XorShift,
    data: Vec<u8>,
    cps: u64,
    /// Wall time spent in CPs (inside the arm's batches, outside its latency samples).
    cp_time: Duration,
}

impl Source {
    fn open_partition(&mut self, p: u8, gen: u64) -> Result<()> {
        let header =
            PartitionHeader { partition: p, volume_id: VOLUME_ID, cp_gen: gen, first_seq: self.next_seq, epoch: EPOCH };
        self.nvlog.open_partition(header)?;
        self.link.send(&Message::PartitionOpen { header: header.encode() })?;
        self.active = p;
        self.gen = gen;
        Ok(())
    }

    /// What the poller does when the active partition is full.
    fn cp(&mut self) -> Result<()> {
        let started = Instant::now();
        let (full, gen, upto_seq) = (self.active, self.gen, self.next_seq - 1);
        self.open_partition(1 - full, gen + 1)?;
        self.link.send(&Message::Cp { cp: gen, partition: full, upto_seq, by_value: false })?;
        self.link.flush()?;
        self.wait(|r| matches!(r, Reply::CpDone { cp } if *cp == gen))?;
        self.nvlog.free_partition(full, Checkpoint { released_cp: gen, next_seq: self.next_seq })?;
        self.cps += 1;
        self.cp_time += started.elapsed();
        Ok(())
    }

    /// Busy-polls the link until a reply `done` accepts.
    fn wait(&mut self, done: impl Fn(&Reply) -> bool) -> Result<()> {
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            match self.link.poll() {
                Some(LinkEvent::Reply(r)) if done(&r) => return Ok(()),
                Some(LinkEvent::Reply(Reply::Error { reason } | Reply::Refuse { reason, .. })) => {
                    bail!("destination: {reason}")
                }
                Some(LinkEvent::Reply(_)) => {}
                Some(LinkEvent::Closed { reason }) => bail!("link closed: {reason}"),
                None => {
                    spins = spins.wrapping_add(1);
                    if spins.is_multiple_of(65_536) && started.elapsed() > REPLY_MAX {
                        bail!("no reply from the destination within {REPLY_MAX:?}");
                    }
                    std::hint::spin_loop();
                }
            }
        }
    }

    /// One timed hop: append, persist, hand to the transport, wait for the ack.
    fn hop(&mut self) -> Result<Duration> {
        if !self.nvlog.fits(self.active, BLOCK_BYTES) {
            self.cp()?;
        }
        let seq = self.next_seq;
        self.data[..8].copy_from_slice(&seq.to_le_bytes());
        let header = EntryHeader {
            kind: EntryKind::Write,
            partition: self.active,
            volume_id: VOLUME_ID,
            epoch: EPOCH,
            seq,
            offset: self.rng.below(self.blocks) * BLOCK_BYTES as u64,
            length: u32::try_from(BLOCK_BYTES).expect("4096"),
            data_len: u32::try_from(BLOCK_BYTES).expect("4096"),
        };
        let p = self.active;
        let at = self.nvlog.append(&header, &self.data).map_err(|e| anyhow!("append: {e}"))?;
        self.nvlog.persist(p)?;
        let tail = self.nvlog.tail(p);
        self.next_seq += 1;
        let started = Instant::now();
        self.link.send_entries(p, at as u64, &self.nvlog.partition(p)[at..tail])?;
        self.link.flush()?;
        self.wait(|r| matches!(r, Reply::Ack { seq: s } if *s >= seq))?;
        Ok(started.elapsed())
    }
}

/// The in-process destination's accept loop, stopped on drop.
struct Server {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<io::Result<()>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A destination in this process, serving on loopback with `security`, and a source
/// connected to it; their files in `dir`.
fn destination_and_source(
    dir: &std::path::Path,
    params: &Params,
    security: LinkSecurity,
) -> Result<(Server, Source, Arc<Mirror>)> {
    let pb = params.partition_bytes;
    fs::create_dir_all(dir)?;

    let hello = Hello {
        source_node: "bench-source".into(),
        volume: "hop".into(),
        volume_id: VOLUME_ID,
        epoch: EPOCH,
        volume_bytes: params.volume_bytes,
        partition_bytes: pb as u64,
        intent: Intent::Baseline,
        base_seq: 1,
        base_cp_gen: 1,
        features: 0,
    };
    let logs: Vec<Box<dyn Nvram>> = (0..PARTITIONS)
        .map(|p| {
            MappedNvram::open(&dir.join(format!("log.{p}")), pb, NvramMode::File).map(|r| Box::new(r) as Box<dyn Nvram>)
        })
        .collect::<Result<_, _>>()?;
    let logs: [Box<dyn Nvram>; PARTITIONS] = logs.try_into().map_err(|_| anyhow!("two log files"))?;
    let device = Arc::new(FileDevice::create(&dir.join("volume.img"), params.volume_bytes)?);
    let store = Box::new(FileMeta(dir.join("meta.json")));
    let mirror = Mirror::open(MirrorMeta::new(&hello), store, logs, device).context("open the mirror")?;

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let directory: Arc<dyn MirrorDirectory> = Arc::new(SingleMirror { mirror: mirror.clone(), rdma: None });
    let server = Server {
        addr: addr.clone(),
        stop: stop.clone(),
        thread: Some(thread::Builder::new().name("hop-destination".into()).spawn({
            let security = security.clone();
            move || tcp::serve(listener, directory, stop, security)
        })?),
    };

    let region = MappedNvram::open(&dir.join("source.nvlog"), NvLog::<MappedNvram>::region_bytes(pb), NvramMode::File)?;
    let (nvlog, _) = NvLog::open(region, VOLUME_ID, pb)?;
    let (link, _welcome) = TcpConnector::new(security).connect(&addr, &hello).context("connect to the destination")?;
    let mut source = Source {
        nvlog,
        link,
        active: 0,
        gen: 1,
        next_seq: 1,
        blocks: params.volume_bytes / BLOCK_BYTES as u64,
        rng: XorShift::new(0x0068_6f70),
        data: vec![0x5a; BLOCK_BYTES],
        cps: 0,
        cp_time: Duration::ZERO,
    };
    source.open_partition(0, 1)?;
    source.link.flush()?;
    Ok((server, source, mirror))
}

/// An arm of `batch_ops` timed hops of `source` per batch.
fn hops<'a>(name: &str, source: &'a mut Source, batch_ops: u64) -> Arm<'a> {
    Arm::new(
        name,
        Some(1),
        Box::new(move |b| {
            for _ in 0..batch_ops {
                let d = source.hop()?;
                b.record(d);
            }
            Ok(())
        }),
    )
}

pub fn run(quick: bool) -> Result<ScenarioResult> {
    let params = Params::new(quick);
    let dir = tempfile::Builder::new().prefix("nvmirror-bench-hop-").tempdir()?;
    let pb = params.partition_bytes;
    let (server, mut source, mirror) = destination_and_source(&dir.path().join("plain"), &params, Default::default())?;
    let pki = crate::tls::certificates(dir.path())?;
    let tls = TlsConfig::from_files(
        &pki.join("server-cert.pem"),
        &pki.join("server-key.pem"),
        Some(&pki.join("ca-cert.pem")),
    )
    .map_err(|e| anyhow!("TLS: {e}"))?;
    let (tls_server, mut tls_source, _tls_mirror) =
        destination_and_source(&dir.path().join("tls"), &params, LinkSecurity { secret: None, tls: Some(tls) })?;

    let mut floor = PingPong::start()?;
    let mut floor_seq = 0u64;
    let batch_ops = params.batch_ops;
    let cpu = CpuProbe::this_process();
    let mut arms = [
        hops("ours", &mut source, batch_ops),
        hops("ours-tls", &mut tls_source, batch_ops),
        Arm::new(
            "floor",
            Some(1),
            Box::new(|b| {
                for _ in 0..batch_ops {
                    floor_seq += 1;
                    b.record(floor.round_trip(floor_seq)?);
                }
                Ok(())
            }),
        ),
    ];
    interleave("hop", params.plan, &cpu, &mut arms)?;
    let [ours, ours_tls, floor_arm] = arms.map(|a| a.stats);
    let (cps, cp_time) = (source.cps, source.cp_time);
    let status = mirror.status();
    drop((source, tls_source));
    drop((server, tls_server));
    let tls_ratio = ours_tls.p50_ns() as f64 / ours.p50_ns().max(1) as f64;

    let ratio = ours.p50_ns() as f64 / floor_arm.p50_ns().max(1) as f64;
    let per_round =
        Spread::of(ours.rounds.len(), |i| ours.rounds[i].p50_ns as f64 / floor_arm.rounds[i].p50_ns.max(1) as f64);
    Ok(ScenarioResult {
        name: "hop".into(),
        description: "replication hop at queue depth 1, 4 KiB entries, loopback TCP: entry handed to the TCP link \
                      until the in-process destination's persist ack (file: logs); floor: TCP ping-pong of the same \
                      bytes with an 8-byte reply, busy-polled"
            .into(),
        params: json!({
            "block_bytes": BLOCK_BYTES,
            "wire_bytes_per_op": crate::floor::REQUEST_HEADER_BYTES + BLOCK_BYTES,
            "partition_bytes": pb,
            "volume_bytes": params.volume_bytes,
            "nvram_mode": "file",
            "batch_ops": batch_ops,
            "plan": params.plan,
            "cps_during_run": cps,
            "cp_wall_s_during_run": cp_time.as_secs_f64(),
            "destination_commits": status.commits,
            "destination_entries_received": status.entries_received,
        }),
        cpu_counted: format!("{} (client, in-process destination, floor server)", cpu.describe()),
        check: Some(Check::at_most("p50(ours) / p50(floor)", ratio, 1.5, per_round)),
        arms: vec![ours.result(), ours_tls.result(), floor_arm.result()],
        notes: vec![
            format!(
                "replication over TLS (ours-tls / ours): p50 {tls_ratio:.3} ({:.1} against {:.1} us); ours-tls's \
                 CPs are its own, as ours'",
                ours_tls.p50_ns() as f64 / 1e3,
                ours.p50_ns() as f64 / 1e3
            ),
            format!(
            "ours' throughput and cpu/op include the CPs run between hops ({cps} CPs, {:.2} s wall in all, warm-up \
             included: each applies a partition to the destination's volume with pwrite + fdatasync and saves the \
             mirror's metadata with fsync); its latencies do not",
                cp_time.as_secs_f64()
            ),
        ],
    })
}
