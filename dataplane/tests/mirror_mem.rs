//! The mirroring core end to end in one process over the in-process transport: writes
//! acknowledged only once on both sides, CPs by reference, failover replay.
#![allow(clippy::cast_possible_truncation)]

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver};
use nvmirror_dataplane::clock::SystemClock;
use nvmirror_dataplane::destination::{MemMetaStore, MemMirrorDirectory, Mirror, MirrorMeta};
use nvmirror_dataplane::frontend::{Completer, Export, IoReply, IoRequest};
use nvmirror_dataplane::log::NvLog;
use nvmirror_dataplane::nvram::{MemNvram, Nvram};
use nvmirror_dataplane::source::{self, Control, SourceConfig, SourceHandle};
use nvmirror_dataplane::storage::{BlockDevice, MemDevice};
use nvmirror_dataplane::transport::mem::MemConnector;
use nvmirror_dataplane::transport::{FrameHandler, Hello, MirrorDirectory, RefuseCode, ReplySink, Welcome};
use parking_lot::Mutex;

const VOL: u64 = 8 << 20;
const PART: usize = 4 << 20;

fn start(dir: Arc<MemMirrorDirectory>, device: Arc<MemDevice>) -> SourceHandle {
    start_with(dir, device, false)
}

fn start_with(dir: Arc<MemMirrorDirectory>, device: Arc<MemDevice>, cp_by_value: bool) -> SourceHandle {
    let mut cfg = SourceConfig::new("src", "vol", 42, PART);
    cfg.cp_by_value = cp_by_value;
    cfg.cp_interval = Duration::from_secs(3600);
    let nv: Box<dyn Nvram> = Box::new(MemNvram::new(NvLog::<MemNvram>::region_bytes(PART)));
    let (log, rec) = NvLog::open(nv, 42, PART).unwrap();
    source::spawn(source::SourceParts {
        cfg,
        nvlog: log,
        recovered: rec,
        device,
        connector: Arc::new(MemConnector { directory: dir }),
        clock: Arc::new(SystemClock::default()),
        mirror: None,
        changes: None,
    })
    .unwrap()
}

fn submit(h: &SourceHandle, req: IoRequest) -> Receiver<IoReply> {
    let (tx, rx) = bounded(1);
    h.submit(req, Completer::new(0, tx));
    rx
}

fn write(h: &SourceHandle, offset: u64, data: Vec<u8>) -> io::Result<()> {
    submit(h, IoRequest::Write { offset, data, fua: false })
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .result
        .map(|_| ())
}

fn read(h: &SourceHandle, offset: u64, len: u32) -> Vec<u8> {
    submit(h, IoRequest::Read { offset, len }).recv_timeout(Duration::from_secs(10)).unwrap().result.unwrap().unwrap()
}

fn attach(h: &SourceHandle) {
    let (tx, rx) = bounded(1);
    h.control(Control::Attach { target: "mem".into(), peer: None, reply: tx }).unwrap();
    rx.recv().unwrap().unwrap();
    for _ in 0..500 {
        if h.status().unwrap().state == "in-sync" {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("mirror never reached in-sync: {:?}", h.status());
}

fn cp(h: &SourceHandle) -> u64 {
    let (tx, rx) = bounded(1);
    h.control(Control::Cp(tx)).unwrap();
    rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap()
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8).collect()
}

#[test]
fn writes_are_mirrored_cps_apply_and_failover_replays_the_log() {
    let dir = Arc::new(MemMirrorDirectory::default());
    let src_dev = Arc::new(MemDevice::new(VOL));
    // Data on the volume before mirroring starts: the baseline must carry it.
    src_dev.write_at(&pattern(999, 65536), 65536 * 3).unwrap();
    let h = start(dir.clone(), src_dev.clone());
    write(&h, 0, pattern(1, 8192)).unwrap();
    attach(&h);
    // Writes of every shape, then a CP, then more writes that only the log holds.
    write(&h, 4096, pattern(2, 4096)).unwrap();
    write(&h, 100, pattern(3, 777)).unwrap();
    write(&h, 1 << 20, pattern(4, 3 << 20)).unwrap();
    submit(&h, IoRequest::WriteZeroes { offset: 2 << 20, len: 10_000, fua: false }).recv().unwrap().result.unwrap();
    let n = cp(&h);
    assert!(n >= 1);
    let mirror = dir.mirror.lock().clone().unwrap();
    let st = mirror.status();
    assert!(st.consistent && st.applied_cp >= n, "{st:?}");
    assert_eq!(st.cps_applied_by_value, 0, "CPs go by reference by default");
    // After the CP the mirror volume equals the source volume.
    assert_eq!(dir.device.lock().as_ref().unwrap().snapshot(), src_dev.snapshot());
    write(&h, 7 << 20, pattern(5, 4096)).unwrap();
    submit(&h, IoRequest::Trim { offset: 1 << 20, len: 8192 }).recv().unwrap().result.unwrap();
    let expect = read(&h, 0, VOL as u32);
    // The source dies; the mirror is failed over and replays its log.
    h.stop();
    let report = mirror.promote().unwrap();
    assert_eq!(report.entries_replayed, 2, "{report:?}");
    assert!(report.stops.is_empty(), "{report:?}");
    let mut got = vec![0u8; VOL as usize];
    mirror.read(&mut got, 0).unwrap();
    assert!(got == expect, "promoted mirror differs from what the source served");
    // The old source's epoch is refused from now on.
    assert!(mirror.promote().is_err());
}

#[test]
fn partition_fill_triggers_cps_and_writes_continue() {
    let dir = Arc::new(MemMirrorDirectory::default());
    let src_dev = Arc::new(MemDevice::new(VOL));
    let h = start(dir.clone(), src_dev.clone());
    attach(&h);
    // 3 x the log size in 4 KiB writes: needs several partition switches.
    for i in 0..(3 * 2 * PART / 4096) as u64 {
        write(&h, (i * 4096 * 7) % VOL, pattern(i, 4096)).unwrap();
    }
    let st = h.status().unwrap();
    assert!(st.cps >= 3, "{st:?}");
    let expect = read(&h, 0, VOL as u32);
    h.stop();
    let mirror = dir.mirror.lock().clone().unwrap();
    mirror.promote().unwrap();
    let mut got = vec![0u8; VOL as usize];
    mirror.read(&mut got, 0).unwrap();
    assert!(got == expect);
}

#[test]
fn unmirrored_volume_acks_locally_and_refuses_out_of_range() {
    let dir = Arc::new(MemMirrorDirectory::default());
    let h = start(dir, Arc::new(MemDevice::new(VOL)));
    write(&h, 0, vec![1; 4096]).unwrap();
    assert_eq!(read(&h, 0, 4096), vec![1; 4096]);
    assert!(write(&h, VOL - 10, vec![1; 4096]).is_err());
    assert_eq!(h.status().unwrap().state, "not-mirrored");
}

#[test]
fn cps_by_value_make_the_mirror_equal_the_source() {
    let dir = Arc::new(MemMirrorDirectory::default());
    let src_dev = Arc::new(MemDevice::new(VOL));
    let h = start_with(dir.clone(), src_dev.clone(), true);
    attach(&h);
    for i in 0..300u64 {
        write(&h, (i * 4096 * 13 + i) % (VOL - 8192), pattern(i, 5000)).unwrap();
    }
    submit(&h, IoRequest::Trim { offset: 4096, len: 3 * 4096 }).recv().unwrap().result.unwrap();
    let n = cp(&h);
    let mirror = dir.mirror.lock().clone().unwrap();
    let st = mirror.status();
    assert!(st.applied_cp >= n);
    assert!(st.cps_applied_by_value >= 1 && st.cps_applied_by_value == st.cps_applied, "{st:?}");
    assert_eq!(dir.device.lock().as_ref().unwrap().snapshot(), src_dev.snapshot());
    h.stop();
}

/// Attaches a session to `inner`'s mirror, made at the first hello over the device and
/// log files `make` gives.
/// A directory whose one mirror is made at the first attach, over the storage and log files
/// that `make` gives for the source's hello.
struct MadeMirror<F> {
    inner: MemMirrorDirectory,
    make: F,
}

type MirrorParts = (Arc<MemDevice>, [Box<dyn Nvram>; 2]);

impl<F: Fn(&Hello) -> MirrorParts> MadeMirror<F> {
    fn new(make: F) -> Self {
        MadeMirror { inner: MemMirrorDirectory::default(), make }
    }
}

impl<F: Fn(&Hello) -> MirrorParts + Send + Sync> MirrorDirectory for MadeMirror<F> {
    fn attach(
        &self,
        hello: &Hello,
        sink: Arc<dyn ReplySink>,
    ) -> Result<(Box<dyn FrameHandler>, Welcome), (RefuseCode, String)> {
        let mut m = self.inner.mirror.lock();
        if m.is_none() {
            let (dev, logs) = (self.make)(hello);
            *self.inner.device.lock() = Some(dev.clone());
            *m = Some(Mirror::open(MirrorMeta::new(hello), Box::<MemMetaStore>::default(), logs, dev).unwrap());
        }
        let (s, w) = m.as_ref().unwrap().attach(hello, sink, None)?;
        Ok((Box::new(s), w))
    }
}

#[test]
fn a_log_entry_damaged_after_it_was_placed_stops_the_cp_and_the_source_sends_it_again() {
    // A mirror whose log files are mapped files, which the test can damage behind its back.
    let logs = tempfile::tempdir().unwrap();
    let logs_at = logs.path().to_path_buf();
    let dir = Arc::new(MadeMirror::new(move |hello: &Hello| {
        use nvmirror_dataplane::nvram::{MappedNvram, NvramMode};
        let log = |p: usize| -> Box<dyn Nvram> {
            Box::new(MappedNvram::open(&logs_at.join(format!("log{p}")), PART, NvramMode::File).unwrap())
        };
        (Arc::new(MemDevice::new(hello.volume_bytes)), [log(0), log(1)])
    }));
    let src_dev = Arc::new(MemDevice::new(VOL));
    let mut cfg = SourceConfig::new("src", "vol", 42, PART);
    cfg.cp_interval = Duration::from_secs(3600);
    cfg.reconnect_interval = Duration::from_millis(20);
    let nv: Box<dyn Nvram> = Box::new(MemNvram::new(NvLog::<MemNvram>::region_bytes(PART)));
    let (log, rec) = NvLog::open(nv, 42, PART).unwrap();
    let h = source::spawn(source::SourceParts {
        cfg,
        nvlog: log,
        recovered: rec,
        device: src_dev.clone(),
        connector: Arc::new(MemConnector { directory: dir.clone() }),
        clock: Arc::new(SystemClock::default()),
        mirror: None,
        changes: None,
    })
    .unwrap();
    attach(&h);
    for i in 0..8u64 {
        write(&h, i * 4096, pattern(10 + i, 4096)).unwrap();
    }
    // The active partition's log file on the mirror holds the 8 entries: flip a bit in the
    // data of the third (each entry is its 64-byte header and 4 KiB of data, after the
    // 64-byte partition header).
    let mirror = dir.inner.mirror.lock().clone().unwrap();
    let damaged = (0..2).find_map(|p| {
        let path = logs.path().join(format!("log{p}"));
        let mut bytes = std::fs::read(&path).unwrap();
        // An open log with entries: its first entry's magic is "NVLE".
        (bytes[64..68] == *b"NVLE").then(|| {
            let at = 64 + 2 * (64 + 4096) + 64 + 100;
            bytes[at] ^= 0x10;
            // The log file is mapped shared: writing the file changes the mirror's memory.
            std::fs::write(&path, &bytes).unwrap();
            p
        })
    });
    assert!(damaged.is_some(), "no log file holds the entries");
    // The CP finds the damaged entry, the mirror cuts its log there and ends the
    // connection; the source reconnects, sends the entries again from the cut, then the CP.
    let _ = h.control(Control::Cp(bounded(1).0));
    let mut st = mirror.status();
    for _ in 0..500 {
        st = mirror.status();
        if st.log_repairs >= 1 && st.applied_cp >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(st.log_repairs, 1, "{st:?}");
    assert!(st.applied_cp >= 2 && st.consistent && !st.promoted, "the mirror applied the CP and is not failed: {st:?}");
    assert!(mirror.status().error.is_none(), "{:?}", mirror.status());
    // What it applied is what the source wrote, damaged entry included.
    let dev = dir.inner.device.lock().clone().unwrap();
    let mut got = vec![0u8; 8 * 4096];
    dev.read_at(&mut got, 0).unwrap();
    for i in 0..8u64 {
        let at = (i * 4096) as usize;
        assert!(got[at..at + 4096] == pattern(10 + i, 4096)[..], "block {i} on the mirror differs");
    }
    h.stop();
}

/// Records the acknowledgements a destination sends back.
#[derive(Default)]
struct Acks(Mutex<Vec<u64>>);
impl ReplySink for Acks {
    fn send(&self, msg: &nvmirror_dataplane::transport::Message<'_>) -> io::Result<()> {
        if let nvmirror_dataplane::transport::Message::Ack { seq } = msg {
            self.0.lock().push(*seq);
        }
        Ok(())
    }
    fn close(&self) {}
}

/// A baseline hello of volume 42, epoch 1, from sequence number 1.
fn hello_from_1() -> Hello {
    Hello {
        source_node: "src".into(),
        volume: "vol".into(),
        volume_id: 42,
        epoch: 1,
        volume_bytes: VOL,
        partition_bytes: PART as u64,
        intent: nvmirror_dataplane::transport::Intent::Baseline,
        base_seq: 1,
        base_cp_gen: 1,
        features: 0,
    }
}

fn partition_open(p: u8, cp_gen: u64, first_seq: u64) -> nvmirror_dataplane::transport::Message<'static> {
    use nvmirror_dataplane::format::PartitionHeader;
    nvmirror_dataplane::transport::Message::PartitionOpen {
        header: PartitionHeader { partition: p, volume_id: 42, cp_gen, first_seq, epoch: 1 }.encode(),
    }
}

/// The bytes of 4 KiB write entries `seqs` of partition `p`, as the source logs them.
fn entry_bytes(p: u8, seqs: std::ops::Range<u64>) -> Vec<u8> {
    use nvmirror_dataplane::format::{EntryHeader, EntryKind, ENTRY_HEADER_BYTES};
    let mut out = Vec::new();
    for seq in seqs {
        let data = pattern(seq, 4096);
        let h = EntryHeader {
            kind: EntryKind::Write,
            partition: p,
            volume_id: 42,
            epoch: 1,
            seq,
            offset: seq * 4096,
            length: 4096,
            data_len: 4096,
        };
        let at = out.len();
        out.resize(at + h.footprint(), 0);
        out[at + ENTRY_HEADER_BYTES..at + ENTRY_HEADER_BYTES + data.len()].copy_from_slice(&data);
        h.encode(&data, &mut out[at..]);
    }
    out
}

/// An ack says every entry up to it is persistent on the mirror. When the older
/// partition's entries never arrived (frames lost on a link that carried on) and it holds
/// none at all, entries of the newer partition must not be acknowledged: the mirror lacks
/// their predecessors.
#[test]
fn an_ack_never_passes_entries_the_mirror_never_had() {
    use nvmirror_dataplane::transport::Message;
    for older_has_some in [false, true] {
        let logs: [Box<dyn Nvram>; 2] = [Box::new(MemNvram::new(PART)), Box::new(MemNvram::new(PART))];
        let dev = Arc::new(MemDevice::new(VOL));
        let mirror = Mirror::open(MirrorMeta::new(&hello_from_1()), Box::<MemMetaStore>::default(), logs, dev).unwrap();
        let acks = Arc::new(Acks::default());
        let (mut s, _) = mirror.attach(&hello_from_1(), acks.clone(), None).unwrap();
        // Older partition: CP 1, sequence 1 on; of its 20 entries only the first 5 arrive,
        // or none. Newer: CP 2, sequence 21 on, all of 21..30 arrive.
        s.on_message(partition_open(0, 1, 1)).unwrap();
        let older = entry_bytes(0, 1..6);
        if older_has_some {
            s.on_message(Message::Entries { partition: 0, offset: 64, bytes: &older }).unwrap();
        }
        s.on_message(partition_open(1, 2, 21)).unwrap();
        let newer = entry_bytes(1, 21..31);
        s.on_message(Message::Entries { partition: 1, offset: 64, bytes: &newer }).unwrap();
        s.commit().unwrap();
        let got = acks.0.lock().clone();
        let want: Vec<u64> = if older_has_some { vec![5] } else { Vec::new() };
        assert_eq!(got, want, "older partition holding {}: acks {got:?}", if older_has_some { 5 } else { 0 });
    }
}

/// A volume whose writes wait at a gate until the test opens it.
struct GatedDevice {
    inner: MemDevice,
    open: Mutex<bool>,
    waiting: std::sync::atomic::AtomicBool,
    cv: parking_lot::Condvar,
}

impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut open = self.open.lock();
        while !*open {
            self.waiting.store(true, std::sync::atomic::Ordering::SeqCst);
            self.cv.wait(&mut open);
        }
        drop(open);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A CP's write-out holds its log for as long as the volume takes; entries of the newer
/// partition arriving meanwhile are persisted and acknowledged without waiting for it
/// (the ack walk once waited for the older log's lock: every CP stalled the pair's writes
/// for the length of the write-out, 50-100 ms under load).
#[test]
fn acks_of_newer_entries_do_not_wait_for_a_cp_write_out() {
    use nvmirror_dataplane::transport::Message;
    let logs: [Box<dyn Nvram>; 2] = [Box::new(MemNvram::new(PART)), Box::new(MemNvram::new(PART))];
    let dev = Arc::new(GatedDevice {
        inner: MemDevice::new(VOL),
        open: Mutex::new(false),
        waiting: Default::default(),
        cv: parking_lot::Condvar::new(),
    });
    let mirror =
        Mirror::open(MirrorMeta::new(&hello_from_1()), Box::<MemMetaStore>::default(), logs, dev.clone()).unwrap();
    let acks = Arc::new(Acks::default());
    let (mut s, _) = mirror.attach(&hello_from_1(), acks.clone(), None).unwrap();
    s.on_message(partition_open(0, 1, 1)).unwrap();
    let older = entry_bytes(0, 1..6);
    s.on_message(Message::Entries { partition: 0, offset: 64, bytes: &older }).unwrap();
    s.commit().unwrap();
    s.on_message(partition_open(1, 2, 6)).unwrap();
    s.on_message(Message::Cp { cp: 1, partition: 0, upto_seq: 5, by_value: false }).unwrap();
    // The CP's write-out is under way, and waits at the gate.
    for _ in 0..500 {
        if dev.waiting.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(dev.waiting.load(std::sync::atomic::Ordering::SeqCst), "the CP never reached the volume");
    let newer = entry_bytes(1, 6..11);
    s.on_message(Message::Entries { partition: 1, offset: 64, bytes: &newer }).unwrap();
    let (tx, rx) = bounded(1);
    let committer = std::thread::spawn(move || {
        let r = s.commit();
        let _ = tx.send(());
        (r, s)
    });
    let prompt = rx.recv_timeout(Duration::from_secs(5)).is_ok();
    let acked = acks.0.lock().clone();
    *dev.open.lock() = true;
    dev.cv.notify_all();
    let (r, _s) = committer.join().unwrap();
    r.unwrap();
    assert!(prompt, "the commit of newer entries waited for the CP's write-out");
    assert_eq!(acked, vec![5, 10], "acks while the CP wrote");
}

/// A baseline sends what reads as zeroes as ranges, not data: a new mirror is left as it
/// is there (sparse), and a mirror over storage that held something else is zeroed there,
/// so that both end equal to the source.
#[test]
fn a_baseline_sends_zeroes_as_ranges_and_the_mirror_ends_equal_either_way() {
    for stale in [false, true] {
        let dir: Arc<dyn MirrorDirectory>;
        let device: Box<dyn Fn() -> Arc<MemDevice>>;
        if stale {
            // Over storage that holds something already (a failed-over primary's volume
            // coming back by baseline).
            let d = Arc::new(MadeMirror::new(|hello: &Hello| -> MirrorParts {
                let dev = Arc::new(MemDevice::new(hello.volume_bytes));
                dev.write_at(&vec![0xee; hello.volume_bytes as usize], 0).unwrap();
                (dev, [Box::new(MemNvram::new(PART)), Box::new(MemNvram::new(PART))])
            }));
            dir = d.clone();
            device = Box::new(move || d.inner.device.lock().clone().unwrap());
        } else {
            let d = Arc::new(MemMirrorDirectory::default());
            dir = d.clone();
            device = Box::new(move || d.device.lock().clone().unwrap());
        }
        let src_dev = Arc::new(MemDevice::new(VOL));
        // Data in two places of the 8 MiB volume; the rest reads as zeroes.
        src_dev.write_at(&pattern(1, 3 * 4096), 65536).unwrap();
        src_dev.write_at(&pattern(2, 4096), VOL - 4096).unwrap();
        let nv: Box<dyn Nvram> = Box::new(MemNvram::new(NvLog::<MemNvram>::region_bytes(PART)));
        let (log, rec) = NvLog::open(nv, 42, PART).unwrap();
        let mut cfg = SourceConfig::new("src", "vol", 42, PART);
        cfg.cp_interval = Duration::from_secs(3600);
        let h = source::spawn(source::SourceParts {
            cfg,
            nvlog: log,
            recovered: rec,
            device: src_dev.clone(),
            connector: Arc::new(MemConnector { directory: dir }),
            clock: Arc::new(SystemClock::default()),
            mirror: None,
            changes: None,
        })
        .unwrap();
        attach(&h);
        let st = h.status().unwrap();
        assert_eq!(st.last_copy_kind.as_deref(), Some("baseline"));
        assert_eq!(st.last_copy_bytes, VOL);
        // Two 64 KiB pieces hold data; everything else went as zero ranges.
        assert_eq!(st.last_copy_zero_bytes, VOL - 2 * 65536, "stale storage: {stale}");
        assert!(
            device().snapshot() == src_dev.snapshot(),
            "the mirror differs from the source (stale storage: {stale})"
        );
        h.stop();
    }
}

/// A source that marks its copies (`FEATURE_COPY_MARKS`) is welcomed with copy marks; the
/// mirror then takes a CP during the copy only right after a mark that matches what
/// arrived: a piece lost before it, or a CP without its mark, ends the session. A source
/// that does not mark its copies is not asked to.
#[test]
fn a_cp_during_a_marked_copy_needs_the_mark_of_what_arrived() {
    use nvmirror_dataplane::transport::wire::BlockPurpose;
    use nvmirror_dataplane::transport::wire::FEATURE_COPY_MARKS;
    use nvmirror_dataplane::transport::Message;
    let marked = Hello { features: FEATURE_COPY_MARKS, ..hello_from_1() };
    let fresh = || {
        let logs: [Box<dyn Nvram>; 2] = [Box::new(MemNvram::new(PART)), Box::new(MemNvram::new(PART))];
        let dev = Arc::new(MemDevice::new(VOL));
        Mirror::open(MirrorMeta::new(&marked), Box::<MemMetaStore>::default(), logs, dev).unwrap()
    };
    let piece = vec![7u8; 8192];
    let cp = Message::Cp { cp: 1, partition: 0, upto_seq: 0, by_value: false };
    // The mark matches: the CP is taken.
    let mirror = fresh();
    let (mut s, welcome) = mirror.attach(&marked, Arc::new(Acks::default()), None).unwrap();
    assert!(welcome.copy_marks);
    s.on_message(partition_open(0, 1, 1)).unwrap();
    s.on_message(Message::BlockData { purpose: BlockPurpose::Baseline, offset: 0, data: &piece }).unwrap();
    s.on_message(Message::CopyMark { next: 8192, bytes: 8192, chunks: 1 }).unwrap();
    s.on_message(cp.clone()).expect("a CP after a mark that matches");
    // A piece lost on the way: the mark says more than arrived.
    let mirror = fresh();
    let (mut s, _) = mirror.attach(&marked, Arc::new(Acks::default()), None).unwrap();
    s.on_message(partition_open(0, 1, 1)).unwrap();
    s.on_message(Message::BlockData { purpose: BlockPurpose::Baseline, offset: 0, data: &piece }).unwrap();
    let e = s.on_message(Message::CopyMark { next: 16384, bytes: 16384, chunks: 2 }).unwrap_err();
    assert!(e.to_string().contains("lost or came out of order"), "{e}");
    // The mark lost: the CP is refused.
    let mirror = fresh();
    let (mut s, _) = mirror.attach(&marked, Arc::new(Acks::default()), None).unwrap();
    s.on_message(partition_open(0, 1, 1)).unwrap();
    s.on_message(Message::BlockData { purpose: BlockPurpose::Baseline, offset: 0, data: &piece }).unwrap();
    let e = s.on_message(cp.clone()).unwrap_err();
    assert!(e.to_string().contains("without its copy mark"), "{e}");
    // A source that predates marks: no marks asked, its CPs taken as before.
    let mirror = fresh();
    let (mut s, welcome) = mirror.attach(&hello_from_1(), Arc::new(Acks::default()), None).unwrap();
    assert!(!welcome.copy_marks);
    s.on_message(partition_open(0, 1, 1)).unwrap();
    s.on_message(Message::BlockData { purpose: BlockPurpose::Baseline, offset: 0, data: &piece }).unwrap();
    s.on_message(cp).expect("an unmarked copy's CP");
}

/// A source that says where clients reach it (`FEATURE_SOURCE_PATHS`) is welcomed to; what
/// it says is kept in the mirror's metadata (for its discovery) and replaced by what the
/// next connection says, between a copy's mark and its CP too. Anything but an address is
/// refused.
#[test]
fn a_mirror_keeps_where_its_source_serves_nvme_tcp() {
    use nvmirror_dataplane::transport::wire::{BlockPurpose, FEATURE_COPY_MARKS, FEATURE_SOURCE_PATHS};
    use nvmirror_dataplane::transport::Message;
    let hello = Hello { features: FEATURE_COPY_MARKS | FEATURE_SOURCE_PATHS, ..hello_from_1() };
    let logs: [Box<dyn Nvram>; 2] = [Box::new(MemNvram::new(PART)), Box::new(MemNvram::new(PART))];
    let store = MemMetaStore::default();
    let mirror =
        Mirror::open(MirrorMeta::new(&hello), Box::new(store.clone()), logs, Arc::new(MemDevice::new(VOL))).unwrap();
    let (mut s, welcome) = mirror.attach(&hello, Arc::new(Acks::default()), None).unwrap();
    assert!(welcome.source_paths);
    s.on_message(Message::SourcePaths { nvmf: "10.0.0.1:4420".into() }).unwrap();
    let addr = Some("10.0.0.1:4420".parse().unwrap());
    assert_eq!(mirror.meta().source_nvmf, addr);
    assert_eq!(store.0.lock().as_ref().map(|m| m.source_nvmf), Some(addr), "saved");
    // Between a copy's mark and its CP: the mark still stands.
    let piece = vec![7u8; 8192];
    s.on_message(partition_open(0, 1, 1)).unwrap();
    s.on_message(Message::BlockData { purpose: BlockPurpose::Baseline, offset: 0, data: &piece }).unwrap();
    s.on_message(Message::CopyMark { next: 8192, bytes: 8192, chunks: 1 }).unwrap();
    s.on_message(Message::SourcePaths { nvmf: "[fd00::1]:4420".into() }).unwrap();
    s.on_message(Message::Cp { cp: 1, partition: 0, upto_seq: 0, by_value: false }).expect("the mark stands");
    assert_eq!(mirror.meta().source_nvmf, Some("[fd00::1]:4420".parse().unwrap()));
    s.on_message(Message::SourcePaths { nvmf: String::new() }).unwrap();
    assert_eq!(mirror.meta().source_nvmf, None, "a source without NVMe/TCP");
    let e = s.on_message(Message::SourcePaths { nvmf: "somewhere".into() }).unwrap_err();
    assert!(e.to_string().contains("not an address"), "{e}");
    // A source that predates the frame is not asked for it.
    let (_, welcome) = mirror.attach(&hello_from_1(), Arc::new(Acks::default()), None).unwrap();
    assert!(!welcome.source_paths);
}
