//! Faults with real processes: the destination killed during a CP and restarted (the source
//! resumes, the CP finishes, the mirror equals the primary byte for byte; writes fail while
//! the destination is away), hostile input on the replication port of a live destination,
//! and NVLog and log files corrupted between a kill and a restart.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use nvmirror_control::workload::{identify, Workload, BLOCK};
use nvmirror_dataplane::format::{scan_partition, EntryHeader, EntryKind, PartitionHeader, ScanStop};
use nvmirror_dataplane::frontend::nbd_client::NbdClient;
use nvmirror_dataplane::transport::wire::{self, frame_crc, frame_header, BODY_MAX, FRAME_HEADER_BYTES};
use nvmirror_dataplane::transport::{Hello, Intent, Message, RefuseCode};
use nvmirror_dataplane::usize_of;

const VOL: &str = "vol";

// ---------------------------------------------------------------------------------------
// Destination killed during a CP.

#[derive(Debug, Clone, Copy)]
enum CpStart {
    /// `POST /cp` from another thread; the destination dies `delay_ms` later.
    Forced { delay_ms: u64 },
    /// Partition fill: the destination dies from the writer, right after the write that
    /// switched partitions and started the CP.
    Fill,
}

fn destination_killed_during_cp(how: CpStart, seed: u64) {
    let mut rng = Rng::new(seed);
    let size = 32 * MIB;
    let mut pair = Pair::start("dstkill");
    pair.create_mirrored(VOL, size, LOG_BYTES_MIN);
    let mut w = Workload::new(0, 4096, seed);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD connect");
    let qd = usize::try_from(rng.range(1, 8)).expect("small");
    let dst_pid = pair.dst.pid().expect("destination runs");
    let cp_before = volume_status(&pair.src_api(), VOL).expect("status")["last_cp"].as_u64().expect("last_cp");

    let (cp_tx, cp_rx) = mpsc::channel();
    match how {
        CpStart::Forced { delay_ms } => {
            w.run(&mut c, qd, rng.range(300, 900), |_| {}).expect("writes");
            let api = pair.src_api();
            thread::spawn(move || {
                let _ = cp_tx.send(cp(&api, VOL).map_err(|e| format!("{e:#}")));
            });
            thread::sleep(Duration::from_millis(delay_ms));
            sigkill(dst_pid);
        }
        CpStart::Fill => {
            // Acknowledgement E is the last entry of the first partition; the next write
            // starts the CP. The writes after the kill fail (strict policy).
            let target = ENTRIES_PER_MIN_PARTITION + 1;
            let mut killed = false;
            w.run(&mut c, qd, target + 50, |acks| {
                if acks >= target && !killed {
                    killed = true;
                    sigkill(dst_pid);
                }
            })
            .expect("writes");
            assert!(killed, "the writer never reached acknowledgement {target}");
            drop(cp_tx);
        }
    }
    pair.dst.kill();
    let acks_at_kill = w.acks;
    println!("dstkill {how:?} seed {seed:#x} qd {qd}: destination killed after {acks_at_kill} acks");
    if let CpStart::Forced { .. } = how {
        // The CP cannot be durable on both sites while the destination is down: if it has
        // answered already, the kill came after it and this run tested nothing.
        if let Ok(r) = cp_rx.try_recv() {
            panic!("the forced CP finished ({r:?}) before the destination was killed; the kill was too late");
        }
    }

    // While the destination is away, policy strict: every write fails, none is acked.
    let st = wait_for("the source to notice the destination is gone", Duration::from_secs(20), || {
        let v = volume_status(&pair.src_api(), VOL)?;
        Ok((v["state"] != "in-sync").then_some(v))
    });
    println!("dstkill: source during the outage: {} ({})", st["state"], st["reason"]);
    let (acks, errors) = (w.acks, w.errors);
    w.run(&mut c, 1, 20, |_| {}).expect("writes during the outage");
    assert_eq!(w.acks, acks, "a write was acknowledged while the destination was down");
    assert_eq!(w.errors, errors + 20, "writes during the outage did not all fail");

    // Back: the source resumes, the CP finishes, writes succeed again.
    let t = Instant::now();
    pair.dst.restart().expect("restart the destination");
    wait_state(&pair.src_api(), VOL, "in-sync", Duration::from_secs(30));
    println!("dstkill: in sync again {:.2} s after the restart", t.elapsed().as_secs_f64());
    if let CpStart::Forced { .. } = how {
        let r = cp_rx.recv_timeout(Duration::from_secs(60)).expect("the forced CP never answered");
        let n = r.expect("the CP under way when the destination died did not finish after it came back");
        let m = mirror_status(&pair.dst_api(), VOL).expect("mirror status");
        assert!(m["applied_cp"].as_u64().unwrap_or(0) >= n, "CP {n} answered, mirror applied {}", m["applied_cp"]);
        println!("dstkill: CP {n} finished; mirror applied CP {}", m["applied_cp"]);
    }
    // The CP that the kill interrupted is complete on both sites now.
    wait_for("the interrupted CP to complete", Duration::from_secs(30), || {
        let src = volume_status(&pair.src_api(), VOL)?["last_cp"].as_u64().unwrap_or(0);
        let dst = mirror_status(&pair.dst_api(), VOL)?["applied_cp"].as_u64().unwrap_or(0);
        Ok((src > cp_before && dst > cp_before).then_some(()))
    });
    let errors = w.errors;
    w.run(&mut c, qd, 300, |_| {}).expect("writes after the restart");
    assert_eq!(w.errors, errors, "writes failed after the destination came back");

    // Mirror == primary, byte for byte, once a CP covers everything.
    let n = cp(&pair.src_api(), VOL).expect("CP after the restart");
    let m = mirror_status(&pair.dst_api(), VOL).expect("mirror status");
    assert_eq!(m["applied_cp"], n, "mirror status after CP {n}: {m}");
    let primary = read_volume(&pair.src.nbd, VOL).expect("read the primary");
    let mirror_export = NbdClient::connect(pair.dst.nbd.as_str(), VOL).expect("NBD connect to the mirror");
    assert!(mirror_export.read_only, "the mirror is exported writable");
    let copy = read_volume(&pair.dst.nbd, VOL).expect("read the mirror");
    assert_eq!(primary.len(), usize_of(size));
    if let Some(at) = first_difference(&primary, &copy) {
        panic!("the mirror differs from the primary at byte {at} (block {})", at / BLOCK);
    }
    let v = verify(&w, &pair.src.nbd, VOL).expect("verify the primary");
    assert_verified(&v, "primary after the destination's restart");
    let v = verify(&w, &pair.dst.nbd, VOL).expect("verify the mirror");
    assert_verified(&v, "mirror after the destination's restart");
    assert!(v.blocks_with_acked_data > 0);
    println!(
        "dstkill: CP {n}: mirror equals primary ({} MiB); {} writes, {} acked, {} failed",
        size >> 20,
        w.writes,
        w.acks,
        w.errors
    );
}

#[test]
fn destination_killed_during_forced_cp() {
    let seed = base_seed("destination_killed_during_forced_cp");
    let delay_ms = Rng::new(seed).range(0, 2);
    destination_killed_during_cp(CpStart::Forced { delay_ms }, seed);
}

#[test]
fn destination_killed_during_partition_fill_cp() {
    let seed = base_seed("destination_killed_during_partition_fill_cp");
    destination_killed_during_cp(CpStart::Fill, seed);
}

// ---------------------------------------------------------------------------------------
// Hostile input on the replication port.

/// A frame received on a raw replication connection, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Welcome,
    Ack(u64),
    CpDone(u64),
    Refuse(RefuseCode, String),
    Error(String),
    Other(String),
}

fn parse_frames(mut bytes: &[u8]) -> Vec<Got> {
    let mut out = Vec::new();
    // Bounded by the input: every step consumes at least a frame header.
    while !bytes.is_empty() {
        match wire::decode(bytes) {
            Ok(Some((m, used))) => {
                out.push(match m {
                    Message::Welcome(_) => Got::Welcome,
                    Message::Ack { seq } => Got::Ack(seq),
                    Message::CpDone { cp } => Got::CpDone(cp),
                    Message::Refuse { code, reason } => Got::Refuse(code, reason),
                    Message::Error { reason } => Got::Error(reason),
                    other => Got::Other(format!("{other:?}")),
                });
                bytes = &bytes[used..];
            }
            Ok(None) => {
                out.push(Got::Other(format!("{} bytes of a partial frame", bytes.len())));
                break;
            }
            Err(e) => {
                out.push(Got::Other(format!("undecodable reply: {e}")));
                break;
            }
        }
    }
    out
}

/// Reads one frame from `s` (bounded by the first-frame size a reply may have).
fn read_reply(s: &mut TcpStream) -> std::io::Result<Got> {
    let mut h = [0u8; FRAME_HEADER_BYTES];
    s.read_exact(&mut h)?;
    let (_, len) = wire::decode_header(&h).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    assert!(len <= 4096, "a reply frame of {len} bytes");
    let mut buf = h.to_vec();
    buf.resize(FRAME_HEADER_BYTES + len, 0);
    s.read_exact(&mut buf[FRAME_HEADER_BYTES..])?;
    Ok(parse_frames(&buf).remove(0))
}

/// The end of a connection that was sent something bad: what came back must be refusals
/// or errors only (never a welcome or an ack for the bad part), and the node must close it.
fn expect_rejected(what: &str, frames: &[Got], end: &ReadEnd, want: &str) -> String {
    assert!(
        matches!(end, ReadEnd::Closed | ReadEnd::Reset),
        "{what}: the node kept the connection open ({end:?}); got {frames:?}"
    );
    let last = frames.last();
    let reason = match last {
        Some(Got::Error(r)) | Some(Got::Refuse(_, r)) => r.clone(),
        None => String::new(),
        Some(other) => panic!("{what}: answered {other:?} (all frames: {frames:?})"),
    };
    // Where a frame came back (it may be lost to a reset when our bytes were left
    // unread), it names the problem.
    if last.is_some() {
        assert!(reason.contains(want), "{what}: reason {reason:?} does not mention {want:?}");
    }
    println!("bad input {what}: {frames:?}, then {end:?}");
    reason
}

fn hello(source: &str, volume: &str, volume_id: u64, epoch: u64, intent: Intent, volume_bytes: u64) -> Vec<u8> {
    Message::Hello(Hello {
        source_node: source.into(),
        volume: volume.into(),
        volume_id,
        epoch,
        volume_bytes,
        partition_bytes: LOG_BYTES_MIN,
        intent,
        base_seq: 1,
        base_cp_gen: 1,
        features: 0,
    })
    .encode()
}

/// A 4 KiB write entry of partition 0 at epoch 1.
fn entry(volume_id: u64, seq: u64, offset: u64, fill: u8) -> Vec<u8> {
    let data = vec![fill; 4096];
    let h = EntryHeader {
        kind: EntryKind::Write,
        partition: 0,
        volume_id,
        epoch: 1,
        seq,
        offset,
        length: 4096,
        data_len: 4096,
    };
    let mut out = vec![0u8; h.footprint()];
    out[64..64 + data.len()].copy_from_slice(&data);
    h.encode(&data, &mut out);
    out
}

const FUZZ_SOURCE: &str = "intruder";
const FUZZ_VOL: &str = "fuzzvol";
const FUZZ_ID: u64 = 0x1234_5678;

/// Opens a session of a made-up source ("intruder"/"fuzzvol", a new mirror on the node,
/// so the real mirror is not touched), opens partition 0 and places entry 1; returns the
/// connection once entry 1 is acknowledged.
fn fuzz_session(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    s.write_all(&hello(FUZZ_SOURCE, FUZZ_VOL, FUZZ_ID, 1, Intent::Baseline, MIB)).expect("hello");
    assert_eq!(read_reply(&mut s).expect("welcome"), Got::Welcome, "a fresh baseline hello is welcome");
    let ph = PartitionHeader { partition: 0, volume_id: FUZZ_ID, cp_gen: 1, first_seq: 1, epoch: 1 };
    let mut frames = Message::PartitionOpen { header: ph.encode() }.encode();
    frames.extend(Message::Entries { partition: 0, offset: 64, bytes: &entry(FUZZ_ID, 1, 0, 1) }.encode());
    s.write_all(&frames).expect("first entry");
    assert_eq!(read_reply(&mut s).expect("ack"), Got::Ack(1), "a well-formed first entry is acknowledged");
    s
}

/// Sends `bad` on an established fuzz session and reads until the node closes.
fn fuzz_session_then(addr: &str, bad: &[u8], shutdown: bool) -> (Vec<Got>, ReadEnd) {
    let mut s = fuzz_session(addr);
    let _ = s.write_all(bad);
    if shutdown {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let (bytes, end) = read_until_close(&mut s);
    (parse_frames(&bytes), end)
}

#[test]
fn replication_port_survives_hostile_input() {
    let seed = base_seed("replication_port_survives_hostile_input");
    let mut rng = Rng::new(seed);
    let mut pair = Pair::start("replfuzz");
    pair.create_mirrored(VOL, 16 * MIB, LOG_BYTES_MIN);
    let volume_id = volume_status(&pair.src_api(), VOL).expect("status")["volume_id"].as_u64().expect("volume_id");
    let repl = pair.dst.replication.clone();

    // Checked writes through the real mirror all along.
    let writer = BackgroundWriter::start(&pair.src.nbd, VOL, seed);
    let acks_at_start = writer.acks_at_start;
    // Persisted sequence numbers, which both engines report (RDMA placements pass no
    // entry counter on the destination).
    let persisted_before = mirror_status(&pair.dst_api(), VOL).expect("mirror status")["persisted_seq"].as_u64();
    let t = Duration::from_secs(20);

    // 1. Garbage: one frame header's worth, then a lot.
    let mut g = vec![0u8; 16];
    rng.fill(&mut g);
    g[0] ^= 0x80; // never the frame magic
    let (b, end) = raw_exchange(&repl, &g, false, t);
    expect_rejected("16 garbage bytes", &parse_frames(&b), &end, "magic");
    let mut g = vec![0u8; 256 << 10];
    rng.fill(&mut g);
    g[0] ^= 0x80;
    let (b, end) = raw_exchange(&repl, &g, false, t);
    expect_rejected("256 KiB of garbage", &parse_frames(&b), &end, "magic");

    // 2. A truncated hello (the peer stops sending half-way).
    let h = hello(FUZZ_SOURCE, FUZZ_VOL, FUZZ_ID, 1, Intent::Baseline, MIB);
    let (b, end) = raw_exchange(&repl, &h[..FRAME_HEADER_BYTES + 7], true, t);
    expect_rejected("truncated hello", &parse_frames(&b), &end, "hello");
    let (b, end) = raw_exchange(&repl, &h[..9], true, t);
    expect_rejected("truncated frame header", &parse_frames(&b), &end, "hello");

    // 3. A hello with a bad crc (a flipped bit in the volume name).
    let mut h = hello("site-a", VOL, volume_id, 1, Intent::Resume, 16 * MIB);
    h[FRAME_HEADER_BYTES + 10] ^= 0x04;
    let (b, end) = raw_exchange(&repl, &h, false, t);
    expect_rejected("hello with a bad crc", &parse_frames(&b), &end, "checksum");

    // 4. Oversized body lengths: above BODY_MAX, and above what a first frame may be.
    for (len, want) in [(BODY_MAX + 1, "maximum"), (u32::MAX as usize, "maximum"), (1 << 20, "4096")] {
        let mut hdr = frame_header(1, 0, 0);
        hdr[8..12].copy_from_slice(&u32::try_from(len).expect("u32").to_le_bytes());
        let (b, end) = raw_exchange(&repl, &hdr, false, t);
        expect_rejected(&format!("first frame of {len} bytes"), &parse_frames(&b), &end, want);
    }

    // 5. Hellos the node must refuse: an unknown volume with intent resume; the real
    //    volume at a stale epoch, or under another volume id (neither may disturb it).
    let (b, end) = raw_exchange(&repl, &hello("site-a", "novol", 77, 1, Intent::Resume, 16 * MIB), false, t);
    let frames = parse_frames(&b);
    assert!(matches!(frames.first(), Some(Got::Refuse(RefuseCode::Mismatch, _))), "unknown volume: {frames:?}");
    expect_rejected("resume of an unknown volume", &frames, &end, "baseline");
    let (b, end) = raw_exchange(&repl, &hello("site-a", VOL, volume_id, 0, Intent::Resume, 16 * MIB), false, t);
    let frames = parse_frames(&b);
    assert!(matches!(frames.first(), Some(Got::Refuse(RefuseCode::StaleEpoch, _))), "stale epoch: {frames:?}");
    expect_rejected("resume at a stale epoch", &frames, &end, "epoch");
    let (b, end) = raw_exchange(&repl, &hello("site-a", VOL, volume_id ^ 1, 1, Intent::Resume, 16 * MIB), false, t);
    let frames = parse_frames(&b);
    assert!(matches!(frames.first(), Some(Got::Refuse(RefuseCode::Mismatch, _))), "other volume id: {frames:?}");
    expect_rejected("resume under another volume id", &frames, &end, "volume");

    // 6. Inside a session (of a made-up source): entries out of order, a sequence gap,
    //    entries for a partition that is not open, a frame with a bad crc, an oversized
    //    body length, a frame cut short.
    let next_at = 64 + ENTRY_BYTES_4K;
    let out_of_order = Message::Entries { partition: 0, offset: 64, bytes: &entry(FUZZ_ID, 2, 4096, 2) }.encode();
    let (f, end) = fuzz_session_then(&repl, &out_of_order, false);
    expect_rejected("entries at an offset behind the tail", &f, &end, "tail");
    let gap = Message::Entries { partition: 0, offset: next_at, bytes: &entry(FUZZ_ID, 3, 4096, 3) }.encode();
    let (f, end) = fuzz_session_then(&repl, &gap, false);
    expect_rejected("entries with a sequence gap", &f, &end, "sequence");
    let closed_partition = Message::Entries { partition: 1, offset: 64, bytes: &entry(FUZZ_ID, 2, 4096, 2) }.encode();
    let (f, end) = fuzz_session_then(&repl, &closed_partition, false);
    expect_rejected("entries for a partition that is not open", &f, &end, "not open");
    let mut bad_crc = Message::Entries { partition: 0, offset: next_at, bytes: &entry(FUZZ_ID, 2, 4096, 2) }.encode();
    bad_crc[FRAME_HEADER_BYTES + 100] ^= 1;
    let (f, end) = fuzz_session_then(&repl, &bad_crc, false);
    expect_rejected("an entries frame with a bad crc", &f, &end, "checksum");
    let mut bad_entry = entry(FUZZ_ID, 2, 4096, 2);
    bad_entry[64 + 17] ^= 1; // the frame is sound, the entry inside it is corrupt
    let (f, end) = fuzz_session_then(
        &repl,
        &Message::Entries { partition: 0, offset: next_at, bytes: &bad_entry }.encode(),
        false,
    );
    expect_rejected("a corrupt entry in a sound frame", &f, &end, "checksum");
    // The same under a frame crc that covers its header only (FLAG_HEADER_CRC): the
    // entry's own crc is what catches it.
    let mut header_crc = wire::entries_prefix(0, next_at, &bad_entry, true).to_vec();
    header_crc.extend_from_slice(&bad_entry);
    let (f, end) = fuzz_session_then(&repl, &header_crc, false);
    expect_rejected("a corrupt entry in a frame whose crc covers its header", &f, &end, "checksum");
    let mut big = frame_header(5, 0, 0);
    big[8..12].copy_from_slice(&u32::try_from(BODY_MAX + 4096).expect("u32").to_le_bytes());
    let (f, end) = fuzz_session_then(&repl, &big, false);
    expect_rejected("an oversized body length in a session", &f, &end, "maximum");
    let unknown_kind = {
        let crc = frame_crc(200, 0, &[]);
        frame_header(200, 0, crc).to_vec()
    };
    let (f, end) = fuzz_session_then(&repl, &unknown_kind, false);
    expect_rejected("a frame of an unknown kind", &f, &end, "kind");
    let good = Message::Entries { partition: 0, offset: next_at, bytes: &entry(FUZZ_ID, 2, 4096, 2) }.encode();
    let (f, end) = fuzz_session_then(&repl, &good[..good.len() / 2], true);
    expect_rejected("an entries frame cut short", &f, &end, "");

    // The node kept serving the real mirror throughout.
    let acks_before_stop = writer.acks();
    thread::sleep(Duration::from_millis(200));
    let w = writer.finish();
    println!("replfuzz: writer {} writes, {} acked, {} failed during the bad input", w.writes, w.acks, w.errors);
    assert_eq!(w.errors, 0, "writes through the real mirror failed while the bad input came in");
    assert!(
        acks_before_stop > acks_at_start,
        "the writer made no progress while the bad input came in ({acks_at_start} -> {acks_before_stop} acks)"
    );
    let st = volume_status(&pair.src_api(), VOL).expect("status");
    assert_eq!(st["state"], "in-sync", "the real mirror left in-sync: {st}");
    let m = mirror_status(&pair.dst_api(), VOL).expect("mirror status");
    assert_eq!(m["connected"], true, "{m}");
    assert!(m["persisted_seq"].as_u64() > persisted_before, "the real mirror received nothing meanwhile: {m}");

    // And it holds every acknowledged write after a failover.
    pair.src.kill();
    let report = failover(&pair.dst_api(), VOL).expect("failover");
    let v = verify(&w, &pair.dst.nbd, VOL).expect("verify after failover");
    assert_verified(&v, "real mirror after the hostile input and a failover");
    println!("replfuzz: failover {report}; {} acked writes verified", w.acks);
}

// ---------------------------------------------------------------------------------------
// Corrupted NVLog and log files.

/// Offset of partition `p` in an NVLog file.
fn nvlog_partition_base(p: u64) -> u64 {
    4096 + p * LOG_BYTES_MIN
}

/// Writes `w1` (base 0) then `w2` (base 8 MiB) at queue depth 1, so that the log's entries
/// are the writes in order: w1's first, then w2's.
fn two_runs(nbd: &str, seed: u64, n1: u64, n2: u64) -> (Workload, Workload) {
    let mut c = NbdClient::connect(nbd, VOL).expect("NBD connect");
    let mut w1 = Workload::new(0, 256, seed);
    let mut w2 = Workload::new(8 * MIB, 256, seed ^ 0xFF);
    w1.run(&mut c, 1, n1, |_| {}).expect("first run");
    w2.run(&mut c, 1, n2, |_| {}).expect("second run");
    assert_eq!((w1.acks, w2.acks), (n1, n2), "writes failed before the corruption");
    (w1, w2)
}

/// Flips one byte of the data of entry number `index` of the partition at `base` of
/// `path`; returns the entry's offset in the partition.
fn corrupt_entry(path: &std::path::Path, base: u64, part_len: u64, p: u8, index: usize, expect: usize) -> usize {
    let mut bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let b = usize_of(base);
    let part = &bytes[b..b + usize_of(part_len)];
    let scan = scan_partition(part, p);
    assert_eq!(scan.entries.len(), expect, "{}: entries before corruption (stop {:?})", path.display(), scan.stop);
    assert_eq!(scan.stop, ScanStop::End, "{}: the log did not end cleanly before the corruption", path.display());
    let at = scan.entries[index].at;
    bytes[b + at + 64 + 1000] ^= 0x5a;
    std::fs::write(path, &bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    at
}

fn assert_region_unwritten(nbd: &str, w: &Workload, what: &str) {
    let image = read_range(nbd, VOL, w.base, w.blocks * BLOCK as u64).expect("read region");
    for (b, blk) in image.chunks(BLOCK).enumerate() {
        let id = identify(b as u64, blk);
        assert_eq!(id, Some(0), "{what}: block {b} holds {id:?}: an entry past the corruption was replayed");
    }
}

#[test]
fn corrupted_nvlog_tail_is_cut_at_restart() {
    let seed = base_seed("corrupted_nvlog_tail_is_cut_at_restart");
    let mut pair = Pair::start("nvlogtail");
    create_volume(&pair.src_api(), VOL, 16 * MIB, Some(LOG_BYTES_MIN)).expect("create");
    let (w1, w2) = two_runs(&pair.src.nbd, seed, 200, 60);
    pair.src.kill();
    let path = pair.src_nvlog(VOL, 1);
    // Entry 200 is the first of the second run: nothing of that run may come back.
    let at = corrupt_entry(&path, nvlog_partition_base(0), LOG_BYTES_MIN, 0, 200, 260);
    pair.src.restart().expect("the node must start with a corrupt NVLog tail");
    let log = log_text(&pair.src.log_path());
    let line = log
        .lines()
        .find(|l| l.contains("NVLog recovery"))
        .unwrap_or_else(|| panic!("no NVLog recovery message in {}", pair.src.log_path().display()));
    println!("nvlogtail: corrupted entry at partition offset {at}; node says: {line}");
    assert!(line.contains(&format!("offset {at}")), "the message does not name offset {at}: {line}");
    assert!(line.contains("checksum"), "the message does not say why: {line}");

    let v = verify(&w1, &pair.src.nbd, VOL).expect("verify the first run");
    assert_verified(&v, "entries before the corrupt one");
    assert_eq!(v.newer_than_acked, 0, "queue depth 1 and a clean kill leave no write half-acknowledged");
    assert!(v.blocks_with_acked_data > 100, "the first run's blocks came back empty: {v:?}");
    assert_region_unwritten(&pair.src.nbd, &w2, "NVLog past the corrupt entry");

    // It serves the volume: new writes go on from the cut, and survive another restart.
    let mut w3 = Workload::new(4 * MIB, 256, seed ^ 0x33);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD connect");
    w3.run(&mut c, 4, 300, |_| {}).expect("writes after the restart");
    assert_eq!((w3.acks, w3.errors), (300, 0), "writes after the restart");
    drop(c);
    pair.src.kill();
    pair.src.restart().expect("second restart");
    for (w, what) in [(&w1, "first run"), (&w3, "writes after the cut")] {
        let v = verify(w, &pair.src.nbd, VOL).expect("verify");
        assert_verified(&v, &format!("{what}, after a second restart"));
    }
    assert_region_unwritten(&pair.src.nbd, &w2, "after a second restart");
}

#[test]
fn corrupted_nvlog_superblock_keeps_the_volume_down_with_a_clear_error() {
    let mut pair = Pair::start("nvlogsuper");
    create_volume(&pair.src_api(), VOL, 16 * MIB, Some(LOG_BYTES_MIN)).expect("create");
    let _ = two_runs(&pair.src.nbd, 7, 20, 0);
    pair.src.kill();
    let path = pair.src_nvlog(VOL, 1);
    let mut bytes = std::fs::read(&path).expect("read the NVLog");
    // The partition_bytes field of both superblock copies (at 0 and 192): caught by their
    // crcs. (One damaged copy is no error: the other serves.)
    bytes[20] ^= 0x01;
    bytes[192 + 20] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write the NVLog");
    // The node comes up (its other volumes and mirrors are not held hostage), the volume
    // does not: it is reported failed, with what is wrong and where.
    pair.src.restart().expect("restart");
    let s = status(&pair.src_api()).expect("status");
    let u = s["unstarted"].as_array().and_then(|u| u.iter().find(|u| u["volume"] == VOL)).cloned();
    let u = u.unwrap_or_else(|| panic!("volume {VOL} started on a corrupt NVLog superblock: {s}"));
    let why = u["reason"].as_str().unwrap_or("");
    assert!(why.contains("superblock"), "the error does not say what is wrong: {why}");
    let name = path.file_name().expect("name").to_string_lossy().to_string();
    assert!(why.contains(&name), "the error does not name the corrupt file {} (it says: {why})", path.display());
    assert!(log_text(&pair.src.log_path()).contains(&name), "the node's log does not name the corrupt file");
    assert!(NbdClient::connect(&pair.src.nbd, VOL).is_err(), "the volume is served on a corrupt NVLog");
    let out = run_bin(&["ctl", "--node", &pair.src.control, "status"], Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cannot start") && text.contains(&name), "ctl status: {text}");
}

#[test]
fn corrupted_destination_log_stops_failover_replay() {
    let seed = base_seed("corrupted_destination_log_stops_failover_replay");
    let mut pair = Pair::start("dstlog");
    pair.create_mirrored(VOL, 16 * MIB, LOG_BYTES_MIN);
    let (w1, w2) = two_runs(&pair.src.nbd, seed, 200, 60);
    // The source dies first (else it would resend the damaged part on reconnect), then the
    // destination, whose log file is then damaged.
    pair.src.kill();
    pair.dst.kill();
    let held: Vec<u8> = (0u8..2)
        .filter(|p| std::fs::read(pair.dst_log(VOL, *p)).map(|b| b[..4] == *b"NVLP").unwrap_or(false))
        .collect();
    assert_eq!(held.len(), 1, "expected one open log file on the destination, found {held:?}");
    let p = held[0];
    let path = pair.dst_log(VOL, p);
    let at = corrupt_entry(&path, 0, LOG_BYTES_MIN, p, 200, 260);
    pair.dst.restart().expect("the destination must start with a corrupt log file");
    let log = log_text(&pair.dst.log_path());
    let line = log
        .lines()
        .find(|l| l.contains("scan stopped"))
        .unwrap_or_else(|| panic!("no message about the corrupt log file in {}", pair.dst.log_path().display()));
    println!("dstlog: corrupted log.{p} entry at offset {at}; node says: {line}");
    assert!(line.contains(&format!("log {p}")) && line.contains(&format!("offset {at}")), "{line}");

    let report = failover(&pair.dst_api(), VOL).expect("failover");
    println!("dstlog: failover {report}");
    let stops: Vec<&str> = report["stops"].as_array().expect("stops").iter().filter_map(|s| s.as_str()).collect();
    assert!(
        stops
            .iter()
            .any(|s| s.contains(&format!("log {p}")) && s.contains(&format!("offset {at}")) && s.contains("checksum")),
        "the failover report does not name the corrupt entry (log {p}, offset {at}): {stops:?}"
    );
    assert_eq!(report["entries_replayed"], 200, "replayed entries: {report}");
    let v = verify(&w1, &pair.dst.nbd, VOL).expect("verify");
    assert_verified(&v, "entries before the corrupt one, on the promoted mirror");
    assert_region_unwritten(&pair.dst.nbd, &w2, "promoted mirror past the corrupt entry");
}
