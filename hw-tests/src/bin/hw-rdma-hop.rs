//! The RDMA engine's durable append at queue depth 1, measured in the guest.
//!
//! A real destination runs in this process: a `Mirror` with two `file:` log files, the
//! node's RDMA service (rdma_cm listener, log-file registration) and the TCP control
//! channel. The source side is the real `RdmaConnector` link fed from a real NVLog: per
//! operation one 4 KiB entry is appended and persisted, handed to the link
//! (`send_entries`), and the link is busy-polled until the ack, which is the completion of
//! the RDMA READ posted after the WRITE. The latency from hand-over to ack is recorded
//! (hdrhistogram). The floor, perftest's `ib_read_lat` of 4 KiB, is run by the calling
//! script interleaved with this program.
//!
//! With `--qd N` (N > 1) it measures batching instead: entries appended and handed over
//! in batches of up to 16, at most N unacknowledged, and reports entries per second (the
//! calling script compares them with perftest's `ib_write_bw` message rate).
//!
//! The source offers its NVLog to the link, which sends entries straight from it; with
//! `--staging` it does not, and every batch is copied into the link's staging ring first.
//!
//! Usage: hw-rdma-hop --addr IP:PORT --dir DIR --ops N [--qd N] [--staging]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use nvmirror_dataplane::destination::{MemMetaStore, Mirror, MirrorMeta, SingleMirror};
use nvmirror_dataplane::format::{EntryHeader, EntryKind, PartitionHeader};
use nvmirror_dataplane::log::NvLog;
use nvmirror_dataplane::nvram::{MappedNvram, MemNvram, Nvram, NvramMode};
use nvmirror_dataplane::storage::FileDevice;
use nvmirror_dataplane::transport::rdma::{RdmaConnector, RdmaService};
use nvmirror_dataplane::transport::wire::BlockPurpose;
use nvmirror_dataplane::transport::{tcp, Connector, Hello, Intent, Link, LinkEvent, Message, MirrorDirectory, Reply};

const VOLUME_ID: u64 = 0x6877_7264_6d61_0001;
const PARTITION_BYTES: usize = 32 << 20;
const ENTRY_BYTES: usize = 4096;
const ENTRY_BYTES_U32: u32 = 4096;
const _: () = assert!(ENTRY_BYTES_U32 as usize == ENTRY_BYTES);

/// The header of a one-entry 4 KiB write of sequence `seq` at `offset`, in `partition`.
fn write_entry(partition: u8, seq: u64, offset: u64) -> EntryHeader {
    EntryHeader {
        kind: EntryKind::Write,
        partition,
        volume_id: VOLUME_ID,
        epoch: 1,
        seq,
        offset,
        length: ENTRY_BYTES_U32,
        data_len: ENTRY_BYTES_U32,
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let addr: SocketAddr = arg(&args, "--addr").ok_or_else(|| anyhow!("--addr IP:PORT"))?.parse()?;
    let dir = PathBuf::from(arg(&args, "--dir").ok_or_else(|| anyhow!("--dir DIR"))?);
    let ops: u64 = arg(&args, "--ops").unwrap_or_else(|| "2000".into()).parse()?;
    let qd: u64 = arg(&args, "--qd").unwrap_or_else(|| "1".into()).parse()?;
    // Copy every batch into the link's staging ring instead of offering the NVLog's memory
    // (the engine's path where the NVLog cannot be registered, e.g. on file-DAX).
    let staging = args.iter().any(|a| a == "--staging");
    std::fs::create_dir_all(&dir)?;

    // The destination.
    let hello = Hello {
        source_node: "hop-src".into(),
        volume: "hop".into(),
        volume_id: VOLUME_ID,
        epoch: 1,
        volume_bytes: 64 << 20,
        partition_bytes: PARTITION_BYTES as u64,
        intent: Intent::Baseline,
        base_seq: 1,
        base_cp_gen: 1,
        features: 0,
    };
    let logs: [Box<dyn Nvram>; 2] = [0, 1].map(|p| {
        Box::new(MappedNvram::open(&dir.join(format!("log.{p}")), PARTITION_BYTES, NvramMode::File).expect("log file"))
            as Box<dyn Nvram>
    });
    let device = Arc::new(FileDevice::create(&dir.join("volume.img"), hello.volume_bytes)?);
    let mirror = Mirror::open(MirrorMeta::new(&hello), Box::<MemMetaStore>::default(), logs, device)?;
    let rdma = RdmaService::start(addr).map_err(|e| anyhow!(e))?;
    let listener = TcpListener::bind(addr).context("control listener")?;
    let directory: Arc<dyn MirrorDirectory> = Arc::new(SingleMirror { mirror: mirror.clone(), rdma: Some(rdma) });
    std::thread::spawn(move || tcp::serve(listener, directory, Arc::new(AtomicBool::new(false)), Default::default()));

    // The source. Its NVLog is declared before the link, so it is dropped after it.
    let region: Box<dyn Nvram> = Box::new(MemNvram::new(NvLog::<MemNvram>::region_bytes(PARTITION_BYTES)));
    let (mut nvlog, _) = NvLog::open(region, VOLUME_ID, PARTITION_BYTES)?;
    let (mut link, _welcome) =
        RdmaConnector::default().connect(&addr.to_string(), &hello).map_err(|e| anyhow!("{e}"))?;
    if !staging {
        // SAFETY: the NVLog outlives the link (declared before it) and, as in the source's
        // poller, the bytes of a partition already sent are never rewritten here.
        unsafe { link.offer_source_memory(nvlog.memory()) };
    }
    let header = PartitionHeader { partition: 0, volume_id: VOLUME_ID, cp_gen: 1, first_seq: 1, epoch: 1 };
    nvlog.open_partition(header)?;
    link.send(&Message::PartitionOpen { header: header.encode() })?;
    // The source's volume is empty: the baseline copies zeroes (the destination takes a
    // baseline as done only once every byte of it arrived), so that the mirror may be
    // failed over at the end.
    let zeroes = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < hello.volume_bytes {
        link.send(&Message::BlockData { purpose: BlockPurpose::Baseline, offset, data: &zeroes })?;
        offset += zeroes.len() as u64;
    }
    link.send(&Message::BaselineDone { volume_bytes: hello.volume_bytes })?;
    link.flush()?;
    let started = Instant::now();
    loop {
        match link.poll() {
            Some(LinkEvent::Reply(Reply::BaselineAck)) => break,
            Some(other) => bail!("unexpected {other:?} before the baseline ack"),
            None if started.elapsed() > Duration::from_secs(30) => bail!("no baseline ack"),
            None => std::thread::sleep(Duration::from_micros(100)),
        }
    }

    if qd > 1 {
        let (rate, batches) = pipelined(&mut link, &mut nvlog, ops, qd)?;
        let how = if staging { "_staging" } else { "" };
        println!("hwt-figure: rdma_append_4096B_qd{qd}{how}_entries_per_s={rate:.0}");
        let how = if staging { "copied through the staging ring" } else { "sent from the NVLog" };
        println!("rdma durable append 4 KiB, {ops} entries, at most {qd} unacknowledged, {how}: {rate:.0} entries/s in {batches} batches");
        return Ok(());
    }
    let mut hist = Histogram::<u64>::new_with_bounds(100, 60_000_000_000, 3)?;
    let data = vec![0x5au8; ENTRY_BYTES];
    let warmup = ops / 10;
    for seq in 1..=ops + warmup {
        let h = write_entry(0, seq, (seq % 1024) * ENTRY_BYTES as u64);
        if !nvlog.fits(0, ENTRY_BYTES) {
            bail!("partition full: lower --ops");
        }
        let at = nvlog.append(&h, &data)?;
        nvlog.persist(0)?;
        let end = nvlog.tail(0);
        let started = Instant::now();
        link.send_entries(0, at as u64, &nvlog.partition(0)[at..end])?;
        link.flush()?;
        loop {
            match link.poll() {
                Some(LinkEvent::Reply(Reply::Ack { seq: s })) if s == seq => break,
                Some(LinkEvent::Reply(Reply::Ack { .. })) => {}
                Some(other) => bail!("unexpected {other:?}"),
                None => {
                    if started.elapsed() > Duration::from_secs(30) {
                        bail!("no ack for {seq}");
                    }
                    std::hint::spin_loop();
                }
            }
        }
        if seq > warmup {
            hist.record(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX))?;
        }
    }
    // The destination really holds what was acknowledged: a CP by reference applies it.
    link.send(&Message::Cp { cp: 1, partition: 0, upto_seq: ops + warmup, by_value: false })?;
    link.flush()?;
    let started = Instant::now();
    loop {
        match link.poll() {
            Some(LinkEvent::Reply(Reply::CpDone { cp: 1 })) => break,
            Some(LinkEvent::Reply(Reply::Ack { .. })) | None => {
                if started.elapsed() > Duration::from_secs(60) {
                    bail!("no CpDone");
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            Some(other) => bail!("unexpected {other:?}"),
        }
    }
    let st = mirror.status();
    if st.applied_seq != ops + warmup || st.entries_received != 0 {
        bail!(
            "mirror applied up to {} (expected {}), TCP entries {}",
            st.applied_seq,
            ops + warmup,
            st.entries_received
        );
    }
    torn_placement(&mut link, &mut nvlog, &mirror, ops + warmup + 1)?;
    let us = |v: u64| v as f64 / 1000.0;
    println!("hwt-figure: rdma_append_4096B_p50_us={:.2}", us(hist.value_at_quantile(0.5)));
    println!("hwt-figure: rdma_append_4096B_p99_us={:.2}", us(hist.value_at_quantile(0.99)));
    println!("hwt-figure: rdma_append_4096B_p999_us={:.2}", us(hist.value_at_quantile(0.999)));
    println!(
        "rdma durable append 4 KiB, qd1, {ops} ops: p50 {:.2} us, p99 {:.2} us, max {:.2} us; CP by reference applied all {} entries",
        us(hist.value_at_quantile(0.5)),
        us(hist.value_at_quantile(0.99)),
        us(hist.max()),
        ops + warmup
    );
    Ok(())
}

/// Appends `total` 4 KiB entries in batches of up to 16, at most `qd` unacknowledged, and
/// returns entries per second and the number of batches.
fn pipelined(link: &mut impl Link, nvlog: &mut NvLog<Box<dyn Nvram>>, total: u64, qd: u64) -> Result<(f64, u64)> {
    const BATCH: u64 = 16;
    let data = vec![0x6bu8; ENTRY_BYTES];
    let (mut next, mut acked, mut batches) = (1u64, 0u64, 0u64);
    let started = Instant::now();
    while acked < total {
        while next <= total && next - 1 - acked < qd {
            let k = BATCH.min(qd - (next - 1 - acked)).min(total - next + 1);
            let mut first = None;
            for seq in next..next + k {
                let h = write_entry(0, seq, (seq % 1024) * ENTRY_BYTES as u64);
                if !nvlog.fits(0, ENTRY_BYTES) {
                    bail!("partition full: lower --ops");
                }
                let at = nvlog.append(&h, &data)?;
                first.get_or_insert(at);
            }
            nvlog.persist(0)?;
            let at = first.expect("k >= 1");
            let end = nvlog.tail(0);
            link.send_entries(0, at as u64, &nvlog.partition(0)[at..end])?;
            link.flush()?;
            next += k;
            batches += 1;
        }
        match link.poll() {
            Some(LinkEvent::Reply(Reply::Ack { seq })) => acked = acked.max(seq),
            Some(other) => bail!("unexpected {other:?}"),
            None => {
                if started.elapsed() > Duration::from_secs(120) {
                    bail!("acks stopped at {acked} of {total}");
                }
                std::hint::spin_loop();
            }
        }
    }
    Ok((total as f64 / started.elapsed().as_secs_f64(), batches))
}

/// A torn placement: the last entry of a batch only partly placed, as when the connection
/// is lost mid-batch. Failover must replay the whole entries before it and stop there,
/// never replaying an entry with a bad checksum.
fn torn_placement(
    link: &mut impl Link,
    nvlog: &mut NvLog<Box<dyn Nvram>>,
    mirror: &Arc<Mirror>,
    first_seq: u64,
) -> Result<()> {
    const WHOLE: u64 = 9;
    let header = PartitionHeader { partition: 1, volume_id: VOLUME_ID, cp_gen: 2, first_seq, epoch: 1 };
    nvlog.open_partition(header)?;
    link.send(&Message::PartitionOpen { header: header.encode() })?;
    let data = vec![0xa7u8; ENTRY_BYTES];
    for i in 0..=WHOLE {
        let seq = first_seq + i;
        let h = write_entry(1, seq, i * ENTRY_BYTES as u64);
        nvlog.append(&h, &data)?;
    }
    nvlog.persist(1)?;
    let tail = nvlog.tail(1);
    // All but the last 1000 bytes of the last entry reach the destination.
    let start = nvmirror_dataplane::format::PARTITION_HEADER_BYTES;
    link.send_entries(1, start as u64, &nvlog.partition(1)[start..tail - 1000])?;
    link.flush()?;
    let started = Instant::now();
    loop {
        match link.poll() {
            Some(LinkEvent::Reply(Reply::Ack { seq })) if seq == first_seq + WHOLE => break,
            Some(LinkEvent::Reply(_)) | None => {
                if started.elapsed() > Duration::from_secs(30) {
                    bail!("torn batch never completed");
                }
                std::hint::spin_loop();
            }
            Some(other) => bail!("unexpected {other:?}"),
        }
    }
    link.close();
    let report = mirror.promote().map_err(|e| anyhow!(e))?;
    let whole = usize::try_from(WHOLE).expect("small");
    if report.entries_replayed != whole || report.last_seq != first_seq + WHOLE - 1 {
        bail!(
            "torn placement: replayed {} entries up to {}, expected {whole} up to {}: {:?}",
            report.entries_replayed,
            report.last_seq,
            first_seq + WHOLE - 1,
            report.stops
        );
    }
    if !report.stops.iter().any(|s| s.contains("log 1") && (s.contains("checksum") || s.contains("truncated"))) {
        bail!("torn placement: the replay did not report where it stopped: {:?}", report.stops);
    }
    println!("torn placement: {whole} whole entries replayed, stopped at the torn one: {:?}", report.stops);
    Ok(())
}
