//! The destination: mirrors of other nodes' volumes.
//!
//! A [`Mirror`] is one (source node, volume) pair hosted here: two log files (one per
//! source NVLog partition, placed by the transport), the mirror volume behind
//! [`BlockDevice`], and its metadata (epoch, last applied CP). A [`Session`] is one
//! connection from the source. CP applications and baseline copies run on the mirror's own
//! worker thread, in stream order, so that the connection keeps placing entries meanwhile.
//!
//! Invariants:
//! - `applied_seq` never exceeds the highest sequence number persisted in the logs or the
//!   volume; a log file is freed only after the CP that covers it is recorded as applied.
//! - Nothing is accepted from an epoch older than the mirror's; failover raises the epoch
//!   before it replays, so the old source is fenced from then on.
//! - Mirror reads take the apply lock shared and CP application takes it exclusive: a
//!   reader sees the mirror as of a completed CP, never half of one.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::cp::apply_entries;
use crate::format::{EntryHeader, PartitionScan, ScannedEntry, BLOCK_BYTES, ENTRY_DATA_MAX, ENTRY_HEADER_BYTES};
use crate::log::{LogFile, PARTITIONS};
use crate::nvram::Nvram;
use crate::storage::{BlockDevice, RedoGuard};
use crate::transport::wire::{BlockPurpose, LOG_BYTES_CHUNK};
use crate::transport::{FrameHandler, Hello, Intent, LogTail, Message, RefuseCode, ReplySink, Welcome};

/// The destination's RDMA engine, as a session sees it: it accepts the source's queue pair
/// for a mirror, registers the mirror's log files, and sends their keys on the session.
pub trait RdmaPlacement: Send + Sync {
    /// Expects a queue pair for `mirror` (session `gen`); returns the rdma_cm address to
    /// connect to and the token the source presents.
    fn expect(&self, mirror: Arc<Mirror>, sink: Arc<dyn ReplySink>, gen: u64) -> Result<(String, u64), String>;
}

/// Where a mirror's metadata is kept (a file replaced atomically, or memory).
pub trait MetaStore: Send + Sync {
    fn save(&self, meta: &MirrorMeta) -> io::Result<()>;
}

/// A [`MetaStore`] in memory: the last metadata saved, for tests and tools whose mirror
/// need not survive the process.
#[derive(Debug, Default, Clone)]
pub struct MemMetaStore(pub Arc<Mutex<Option<MirrorMeta>>>);

impl MetaStore for MemMetaStore {
    fn save(&self, meta: &MirrorMeta) -> io::Result<()> {
        *self.0.lock() = Some(meta.clone());
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingCp {
    pub cp: u64,
    pub partition: u8,
    pub upto_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorMeta {
    pub source_node: String,
    pub volume: String,
    pub volume_id: u64,
    pub volume_bytes: u64,
    pub partition_bytes: u64,
    pub epoch: u64,
    /// The last CP applied to the mirror volume, and the last sequence number it covers.
    pub applied_cp: u64,
    pub applied_seq: u64,
    /// A complete baseline is on the mirror volume (it may be failed over).
    pub consistent: bool,
    /// A CP being applied; redone from the log after a crash.
    pub pending_cp: Option<PendingCp>,
    /// Failed over: this node is the volume's primary now and the mirror is broken.
    pub promoted: bool,
    /// A failover raised the epoch and has not finished its replay: the old source is
    /// fenced already, so the mirror can only go forward. Opening the mirror finishes it.
    #[serde(default)]
    pub promoting: bool,
    /// A delta resync is under way: the mirror is inconsistent, but another delta resync
    /// (not a full copy) can bring it level.
    #[serde(default)]
    pub resyncing: bool,
    pub last_cp_unix_ms: u64,
    pub last_cp_duration_us: u64,
}

impl MirrorMeta {
    pub fn new(hello: &Hello) -> Self {
        MirrorMeta {
            source_node: hello.source_node.clone(),
            volume: hello.volume.clone(),
            volume_id: hello.volume_id,
            volume_bytes: hello.volume_bytes,
            partition_bytes: hello.partition_bytes,
            epoch: hello.epoch,
            applied_cp: 0,
            applied_seq: 0,
            consistent: false,
            pending_cp: None,
            promoted: false,
            promoting: false,
            resyncing: false,
            last_cp_unix_ms: 0,
            last_cp_duration_us: 0,
        }
    }
}

/// What a failover found and did.
#[derive(Debug, Clone, Serialize)]
pub struct PromoteReport {
    pub epoch: u64,
    pub entries_replayed: usize,
    pub last_seq: u64,
    /// Why the replay stopped where it did, where a log held more (torn or corrupt tail).
    pub stops: Vec<String>,
    /// The last CP the mirror had applied: what the old source and this volume have in
    /// common (the new primary's change map is relative to it).
    pub applied_cp: u64,
    /// The byte ranges the replay wrote (offset, length): changed since `applied_cp`.
    #[serde(skip)]
    pub replayed: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MirrorStatus {
    pub source_node: String,
    pub volume: String,
    pub epoch: u64,
    pub applied_cp: u64,
    pub applied_seq: u64,
    pub persisted_seq: u64,
    pub consistent: bool,
    pub promoted: bool,
    pub connected: bool,
    pub entries_received: u64,
    pub bytes_received: u64,
    /// CPs stopped by a log entry that failed its checksum when read back (the log was cut
    /// there and the source sent the entries again).
    pub log_repairs: u64,
    /// Group commits: persists of the log files, each answered by one ack.
    pub commits: u64,
    pub log_bytes_used: u64,
    pub log_bytes_max: u64,
    pub last_cp_unix_ms: u64,
    pub last_cp_duration_us: u64,
    pub baseline_bytes: u64,
    /// CPs applied since the node started, and how many of them by value.
    pub cps_applied: u64,
    pub cps_applied_by_value: u64,
    pub error: Option<String>,
}

enum Job {
    Cp {
        cp: u64,
        partition: u8,
        upto_seq: u64,
        by_value: Option<Vec<(u64, Vec<u8>)>>,
        sink: Arc<dyn ReplySink>,
        gen: u64,
    },
    Baseline {
        offset: u64,
        data: Vec<u8>,
    },
    BaselineDone {
        sink: Arc<dyn ReplySink>,
        gen: u64,
    },
    Barrier(Sender<()>),
}

/// Jobs queued per mirror; the connection waits when the worker is this far behind.
const JOBS_MAX: usize = 64;

pub struct Mirror {
    /// The RDMA engine's hold on the log files (queue pair and memory registrations).
    /// Declared first so that it is dropped before the logs it registered.
    rdma_attachment: Mutex<Option<(u64, Box<dyn std::any::Any + Send>)>>,
    meta: Mutex<MirrorMeta>,
    store: Box<dyn MetaStore>,
    logs: [Mutex<LogFile<Box<dyn Nvram>>>; PARTITIONS],
    /// While a CP applies entries from a log (holding its lock for the whole write-out):
    /// that log and what it holds, which cannot change meanwhile, so that acknowledging
    /// newer entries does not wait for the write-out (`Session::contiguous_persisted_seq`).
    applying: Mutex<Option<(usize, LogView)>>,
    device: Arc<dyn BlockDevice>,
    apply: RwLock<()>,
    /// Held for the whole of a failover.
    promoting: Mutex<()>,
    session: Mutex<Option<Arc<dyn ReplySink>>>,
    session_gen: AtomicU64,
    fenced: AtomicBool,
    jobs: Sender<Job>,
    /// Stepped (no worker thread): the job queue, run by [`Mirror::run_jobs`] and by
    /// whatever waits for it.
    stepped_jobs: Option<Receiver<Job>>,
    entries_received: AtomicU64,
    log_repairs: AtomicU64,
    bytes_received: AtomicU64,
    commits: AtomicU64,
    baseline_bytes: AtomicU64,
    cps_applied: AtomicU64,
    cps_applied_by_value: AtomicU64,
    error: Mutex<Option<String>>,
}

/// What an open log holds, for acknowledgements: its CP generation, first sequence
/// number and last persisted one.
type LogView = (u64, u64, Option<u64>);

fn log_view(log: &LogFile<Box<dyn Nvram>>) -> Option<LogView> {
    log.header().map(|h| (h.cp_gen, h.first_seq, log.last_persisted_seq()))
}

impl Mirror {
    /// Opens a mirror from its parts, redoing a CP that a crash interrupted, and starts its
    /// worker thread.
    pub fn open(
        meta: MirrorMeta,
        store: Box<dyn MetaStore>,
        logs: [Box<dyn Nvram>; PARTITIONS],
        device: Arc<dyn BlockDevice>,
    ) -> io::Result<Arc<Mirror>> {
        Self::open_with(meta, store, logs, device, false)
    }

    /// As [`Mirror::open`], without a worker thread: CP applications and baseline writes
    /// wait in the queue until [`Mirror::run_jobs`] runs them (the deterministic simulator
    /// drives a mirror this way).
    pub fn open_stepped(
        meta: MirrorMeta,
        store: Box<dyn MetaStore>,
        logs: [Box<dyn Nvram>; PARTITIONS],
        device: Arc<dyn BlockDevice>,
    ) -> io::Result<Arc<Mirror>> {
        Self::open_with(meta, store, logs, device, true)
    }

    fn open_with(
        meta: MirrorMeta,
        store: Box<dyn MetaStore>,
        logs: [Box<dyn Nvram>; PARTITIONS],
        device: Arc<dyn BlockDevice>,
        stepped: bool,
    ) -> io::Result<Arc<Mirror>> {
        let [l0, l1] = logs;
        let (log0, scan0) = LogFile::open(l0, 0);
        let (log1, scan1) = LogFile::open(l1, 1);
        for (p, scan) in [(0, &scan0), (1, &scan1)] {
            if let crate::format::ScanStop::Invalid { offset, reason } = &scan.stop {
                eprintln!(
                    "mirror {}/{}: log {p}: scan stopped at offset {offset}: {reason}; entries after it are not used",
                    meta.source_node, meta.volume
                );
            }
        }
        let (tx, rx) = bounded(JOBS_MAX);
        let mirror = Arc::new(Mirror {
            rdma_attachment: Mutex::new(None),
            meta: Mutex::new(meta),
            store,
            logs: [Mutex::new(log0), Mutex::new(log1)],
            applying: Mutex::new(None),
            device,
            apply: RwLock::new(()),
            promoting: Mutex::new(()),
            session: Mutex::new(None),
            session_gen: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
            jobs: tx,
            stepped_jobs: stepped.then(|| rx.clone()),
            entries_received: AtomicU64::new(0),
            log_repairs: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            baseline_bytes: AtomicU64::new(0),
            cps_applied: AtomicU64::new(0),
            cps_applied_by_value: AtomicU64::new(0),
            error: Mutex::new(None),
        });
        let pending = mirror.meta.lock().pending_cp;
        if let Some(p) = pending {
            eprintln!("mirror {}: finishing CP {} interrupted by a restart", mirror.name(), p.cp);
            // The interrupted CP may have half-written the volume: a redo (no write hole).
            let _redo = RedoGuard::new(mirror.device.as_ref());
            mirror.apply_cp(p.cp, p.partition, p.upto_seq, None).map_err(|e| io::Error::other(e.to_string()))?;
        }
        if !stepped {
            let weak = Arc::downgrade(&mirror);
            thread::Builder::new().name("nvm-mirror-cp".into()).spawn(move || worker(weak, rx))?;
        }
        let (promoting, epoch) = {
            let m = mirror.meta.lock();
            (m.promoting && !m.promoted, m.epoch)
        };
        if promoting {
            eprintln!("mirror {}: finishing the failover a restart interrupted (epoch {epoch})", mirror.name());
            let _one = mirror.promoting.lock();
            mirror.fenced.store(true, Ordering::SeqCst);
            mirror.finish_promotion(epoch, true).map_err(io::Error::other)?;
        }
        Ok(mirror)
    }

    /// Stepped mirrors: runs up to `max` queued jobs; how many ran.
    pub fn run_jobs(&self, max: usize) -> usize {
        let Some(rx) = &self.stepped_jobs else { return 0 };
        let mut n = 0;
        while n < max {
            let Ok(job) = rx.try_recv() else { break };
            run_job(self, job);
            n += 1;
        }
        n
    }

    /// Jobs waiting (stepped mirrors).
    pub fn jobs_queued(&self) -> usize {
        self.stepped_jobs.as_ref().map_or(0, Receiver::len)
    }

    fn queue(&self, job: Job) -> Result<(), String> {
        if self.stepped_jobs.is_some() {
            // Nobody else runs the queue: make room by running the oldest job here.
            let mut job = job;
            loop {
                match self.jobs.try_send(job) {
                    Ok(()) => return Ok(()),
                    Err(crossbeam_channel::TrySendError::Full(j)) => {
                        job = j;
                        self.run_jobs(1);
                    }
                    Err(crossbeam_channel::TrySendError::Disconnected(_)) => return Err("mirror worker stopped".into()),
                }
            }
        }
        self.jobs.send(job).map_err(|_| "mirror worker stopped".to_string())
    }

    pub fn name(&self) -> String {
        let m = self.meta.lock();
        format!("{}/{}", m.source_node, m.volume)
    }

    pub fn meta(&self) -> MirrorMeta {
        self.meta.lock().clone()
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    fn save(&self, meta: &MirrorMeta) -> Result<(), String> {
        self.store.save(meta).map_err(|e| format!("save mirror metadata: {e}"))
    }

    fn fail(&self, reason: &str) {
        eprintln!("mirror {}: {reason}", self.name());
        *self.error.lock() = Some(reason.to_string());
    }

    /// The log files' memory, for an RDMA engine to register: valid while the mirror lives.
    pub fn log_memory(&self) -> [(*mut u8, usize); PARTITIONS] {
        [0, 1].map(|p| self.logs[p].lock().memory())
    }

    /// Keeps an RDMA engine's registrations for session `gen`, unless a newer session or a
    /// failover came first.
    pub fn set_rdma_attachment(&self, gen: u64, attachment: Box<dyn std::any::Any + Send>) -> Result<(), String> {
        if self.fenced.load(Ordering::SeqCst) || self.session_gen.load(Ordering::SeqCst) != gen {
            return Err("the session this queue pair was for is gone".into());
        }
        *self.rdma_attachment.lock() = Some((gen, attachment));
        Ok(())
    }

    /// Drops the RDMA engine's registrations: from here on the source can place nothing.
    fn drop_rdma_attachment(&self) {
        let old = self.rdma_attachment.lock().take();
        drop(old);
    }

    /// Whether a hello may take over the mirror, given its metadata.
    fn admit(&self, meta: &MirrorMeta, hello: &Hello) -> Result<(), (RefuseCode, String)> {
        if meta.promoted {
            return Err((
                RefuseCode::StaleEpoch,
                format!("volume {} was failed over here at epoch {}; the source is stale", meta.volume, meta.epoch),
            ));
        }
        if hello.epoch < meta.epoch {
            return Err((
                RefuseCode::StaleEpoch,
                format!("epoch {} is older than the mirror's {}", hello.epoch, meta.epoch),
            ));
        }
        let keeps = matches!(hello.intent, Intent::Resume | Intent::Resync);
        if hello.volume_bytes != meta.volume_bytes && keeps {
            return Err((RefuseCode::Mismatch, "volume size changed; a baseline is needed".into()));
        }
        if hello.partition_bytes != meta.partition_bytes {
            return Err((RefuseCode::Mismatch, "NVLog partition size differs from the mirror's log files".into()));
        }
        if hello.volume_id != meta.volume_id && keeps {
            return Err((RefuseCode::Mismatch, "another volume of that name is mirrored here".into()));
        }
        if hello.intent == Intent::Resync && !(meta.consistent || meta.resyncing) {
            return Err((
                RefuseCode::Mismatch,
                "the mirror holds no consistent copy to resync from; a baseline is needed".into(),
            ));
        }
        if hello.intent == Intent::Baseline && hello.volume_bytes != self.device.size() {
            return Err((
                RefuseCode::Mismatch,
                format!("mirror volume is {} bytes, source {}", self.device.size(), hello.volume_bytes),
            ));
        }
        Ok(())
    }

    /// Accepts a connection from the source after checking who it is and its epoch.
    pub fn attach(
        self: &Arc<Self>,
        hello: &Hello,
        sink: Arc<dyn ReplySink>,
        rdma: Option<Arc<dyn RdmaPlacement>>,
    ) -> Result<(Session, Welcome), (RefuseCode, String)> {
        if self.fenced.load(Ordering::SeqCst) {
            // Failed over here (or being): the source's epoch is stale, and it must know so
            // that it stops taking writes, rather than retry.
            let epoch = self.meta.lock().epoch;
            return Err((
                RefuseCode::StaleEpoch,
                format!("volume failed over to this node at epoch {epoch}; the source is stale"),
            ));
        }
        // Refuse before disturbing anything: a hello that is turned away must leave the
        // current session, its queued work and its RDMA placements alone.
        self.admit(&self.meta.lock(), hello)?;
        // Quiesce the previous session's queued work and placements before looking at the logs.
        self.drop_rdma_attachment();
        self.barrier();
        for log in &self.logs {
            log.lock().rescan().map_err(|e| (RefuseCode::Internal, format!("rescan log: {e}")))?;
        }
        let mut meta = self.meta.lock();
        // Checked again: a failover or another session may have come in meanwhile.
        if self.fenced.load(Ordering::SeqCst) {
            return Err((RefuseCode::StaleEpoch, format!("volume failed over to this node at epoch {}", meta.epoch)));
        }
        self.admit(&meta, hello)?;
        if hello.intent == Intent::Baseline {
            for log in &self.logs {
                log.lock().free().map_err(|e| (RefuseCode::Internal, e.to_string()))?;
            }
            *meta = MirrorMeta::new(hello);
            meta.applied_seq = hello.base_seq.saturating_sub(1);
            meta.applied_cp = hello.base_cp_gen.saturating_sub(1);
            self.baseline_bytes.store(0, Ordering::SeqCst);
            self.save(&meta).map_err(|e| (RefuseCode::Internal, e))?;
        } else if hello.intent == Intent::Resync {
            // The contents stay; the logs start over, and until the resync is done the
            // mirror is not consistent (it may not be failed over), but resyncable.
            for log in &self.logs {
                log.lock().free().map_err(|e| (RefuseCode::Internal, e.to_string()))?;
            }
            meta.epoch = hello.epoch;
            meta.consistent = false;
            meta.resyncing = true;
            meta.pending_cp = None;
            meta.applied_seq = hello.base_seq.saturating_sub(1);
            meta.applied_cp = hello.base_cp_gen.saturating_sub(1);
            self.baseline_bytes.store(0, Ordering::SeqCst);
            self.save(&meta).map_err(|e| (RefuseCode::Internal, e))?;
        } else {
            meta.epoch = hello.epoch;
            self.save(&meta).map_err(|e| (RefuseCode::Internal, e))?;
        }
        let gen = self.session_gen.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(old) = self.session.lock().replace(sink.clone()) {
            old.close();
        }
        *self.error.lock() = None;
        let logs = [0, 1].map(|p| {
            let l = self.logs[p].lock();
            match l.header() {
                Some(h) => LogTail {
                    open: true,
                    cp_gen: h.cp_gen,
                    first_seq: h.first_seq,
                    next_seq: l.next_seq(),
                    tail: l.tail() as u64,
                },
                None => LogTail::default(),
            }
        });
        let welcome = Welcome {
            epoch: meta.epoch,
            applied_cp: meta.applied_cp,
            applied_seq: meta.applied_seq,
            consistent: meta.consistent,
            resyncable: meta.consistent || meta.resyncing,
            logs,
        };
        let session = Session {
            mirror: self.clone(),
            gen,
            sink,
            epoch: meta.epoch,
            volume_id: meta.volume_id,
            dirty: [false; PARTITIONS],
            by_value: Vec::new(),
            by_value_bytes: 0,
            last_acked: None,
            rdma,
            baseline_next: (hello.intent == Intent::Baseline).then_some(0),
            resync: (hello.intent == Intent::Resync).then_some(ResyncProgress::default()),
        };
        Ok((session, welcome))
    }

    /// Waits until every queued job has run.
    fn barrier(&self) {
        if self.stepped_jobs.is_some() {
            self.run_jobs(usize::MAX);
            return;
        }
        let (tx, rx) = bounded(1);
        if self.jobs.send(Job::Barrier(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Applies CP `cp`: by reference (the newest contents per block from log `partition`, up
    /// to `upto_seq`) or by value (`blocks`). Idempotent: a CP already applied is a no-op.
    fn apply_cp(
        &self,
        cp: u64,
        partition: u8,
        upto_seq: u64,
        blocks: Option<Vec<(u64, Vec<u8>)>>,
    ) -> Result<(), CpError> {
        let started = Instant::now();
        {
            let mut meta = self.meta.lock();
            if cp <= meta.applied_cp && meta.pending_cp.is_none_or(|p| p.cp != cp) {
                drop(meta);
                return Ok(self.release_log(partition, cp)?);
            }
            // A CP is recorded as pending (to be redone after a crash) only once its log
            // holds everything it needs: one that names entries that never arrived (a lost
            // frame, a dropped connection) fails here and leaves nothing to redo.
            if blocks.is_none() {
                self.check_cp_log(cp, partition, upto_seq)?;
            }
            meta.pending_cp = Some(PendingCp { cp, partition, upto_seq });
            // Saved under the meta lock: saves are ordered with the changes they record.
            self.save(&meta)?;
            drop(meta);
        }
        {
            let _exclusive = self.apply.write();
            match blocks {
                None => {
                    // Checked again under the log's lock, which is held while the entries
                    // are applied: what the scan validated is what is applied.
                    let p = partition as usize;
                    let mut log = self.logs[p].lock();
                    // What it holds, published for acknowledgements while the lock is
                    // held (it only grows under `check_cp_log`'s catch-up; an entry found
                    // damaged below was persistent when it was placed, and the view is
                    // withdrawn as the log is cut there).
                    *self.applying.lock() = log_view(&log).map(|v| (p, v));
                    let checked = check_cp_log(&mut log, cp, partition, upto_seq);
                    *self.applying.lock() = log_view(&log).map(|v| (p, v));
                    if let Err(e) = checked {
                        *self.applying.lock() = None;
                        return Err(e.into());
                    }
                    // Every entry was checked when it was placed; the memory under it may
                    // have changed since (NVRAM does flip bits). Checked again as it is
                    // read for the CP, whose image is final: a damaged entry stops the CP
                    // before anything is written, and the source, which holds the same
                    // entries, sends them again.
                    if let Some((at, seq, why)) = first_damaged_entry(&log, upto_seq) {
                        log.truncate_at(at);
                        *self.applying.lock() = None;
                        drop(log);
                        let mut meta = self.meta.lock();
                        meta.pending_cp = None;
                        self.save(&meta)?;
                        return Err(CpError::LogDamaged(format!(
                            "CP {cp}: the entry of sequence {seq} at offset {at} of log {partition} fails its \
                             checksum ({why}); the log is cut there and the source will send it again"
                        )));
                    }
                    let bytes = log.bytes();
                    let entries = log
                        .entries()
                        .iter()
                        .filter(|e| e.header.seq <= upto_seq)
                        .map(|e| (e.header, scanned_data(bytes, e)));
                    let applied = apply_entries(entries, self.device.as_ref());
                    *self.applying.lock() = None;
                    drop(log);
                    applied.map_err(|e| format!("CP {cp}: apply: {e}"))?;
                }
                Some(blocks) => {
                    self.cps_applied_by_value.fetch_add(1, Ordering::Relaxed);
                    for (offset, data) in &blocks {
                        self.device.write_at(data, *offset).map_err(|e| format!("CP {cp}: write: {e}"))?;
                    }
                    self.device.flush().map_err(|e| format!("CP {cp}: flush: {e}"))?;
                }
            }
            self.cps_applied.fetch_add(1, Ordering::Relaxed);
            let mut meta = self.meta.lock();
            meta.applied_cp = cp;
            meta.applied_seq = meta.applied_seq.max(upto_seq);
            meta.pending_cp = None;
            meta.last_cp_unix_ms = crate::clock::unix_ms();
            meta.last_cp_duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            // Saved under the meta lock: saves are ordered with the changes they record.
            self.save(&meta)?;
            drop(meta);
        }
        Ok(self.release_log(partition, cp)?)
    }

    /// Checks that log `partition` holds CP `cp` up to `upto_seq`.
    fn check_cp_log(&self, cp: u64, partition: u8, upto_seq: u64) -> Result<(), String> {
        check_cp_log(&mut self.logs[partition as usize].lock(), cp, partition, upto_seq)
    }

    fn release_log(&self, partition: u8, cp: u64) -> Result<(), String> {
        let mut log = self.logs[partition as usize].lock();
        if log.header().is_some_and(|h| h.cp_gen <= cp) {
            log.free().map_err(|e| format!("free log {partition}: {e}"))?;
        }
        Ok(())
    }

    /// Reads the mirror as of the last completed CP.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let _shared = self.apply.read();
        self.device.read_at(buf, offset)
    }

    /// Breaks the mirror and makes its volume this node's primary: raises the epoch (the
    /// old source is refused from here on), then replays every logged entry past the last
    /// applied CP in sequence order.
    pub fn promote(&self) -> Result<PromoteReport, String> {
        self.promote_to(None)
    }

    /// As [`Mirror::promote`], with the new epoch at least `epoch` (an external fencing
    /// token, such as an etcd revision) rather than one more than the mirror's.
    pub fn promote_to(&self, epoch: Option<u64>) -> Result<PromoteReport, String> {
        self.promote_with(epoch, true)
    }

    /// The planted defect `failover-skips-replay`: a promotion that replays nothing past
    /// the last applied CP (the simulator must catch it).
    #[cfg(any(test, feature = "sim"))]
    pub fn promote_skipping_replay(&self, epoch: Option<u64>) -> Result<PromoteReport, String> {
        self.promote_with(epoch, false)
    }

    fn promote_with(&self, epoch: Option<u64>, replay: bool) -> Result<PromoteReport, String> {
        // One failover at a time; a second request finds the volume promoted.
        let _one = self.promoting.lock();
        {
            let meta = self.meta.lock();
            if meta.promoted {
                return Err(format!("volume {} is already failed over (epoch {})", meta.volume, meta.epoch));
            }
            if !meta.consistent {
                return Err(format!(
                    "mirror of {} is inconsistent (its baseline copy or resync did not finish); refusing to fail over",
                    meta.volume
                ));
            }
        }
        self.fenced.store(true, Ordering::SeqCst);
        self.session_gen.fetch_add(1, Ordering::SeqCst);
        let epoch = {
            let mut meta = self.meta.lock();
            meta.epoch = (meta.epoch + 1).max(epoch.unwrap_or(0));
            meta.promoting = true;
            self.save(&meta)?;
            meta.epoch
        };
        self.finish_promotion(epoch, replay)
    }

    /// The promotion after the epoch is raised: the old session dropped, every logged entry
    /// past the last applied CP replayed (as a redo), the mirror marked promoted.
    fn finish_promotion(&self, epoch: u64, replay: bool) -> Result<PromoteReport, String> {
        if let Some(sink) = self.session.lock().take() {
            let _ = sink.send(&Message::Refuse {
                code: RefuseCode::StaleEpoch,
                reason: format!("failed over at epoch {epoch}"),
            });
            sink.close();
        }
        self.drop_rdma_attachment();
        self.barrier();
        let _exclusive = self.apply.write();
        let applied_seq = self.meta.lock().applied_seq;
        let mut guards = [self.logs[0].lock(), self.logs[1].lock()];
        // What is replayed must be durable first: entries placed and not yet persisted (a
        // batch whose commit never came) would otherwise be written to the volume, then
        // lost with a crash before the promotion completes, and the redo of the next
        // attempt could not rewrite the blocks they touched.
        let scans: Vec<PartitionScan> =
            guards.iter_mut().map(|l| l.rescan().map_err(|e| format!("persist log: {e}"))).collect::<Result<_, _>>()?;
        let mut stops = Vec::new();
        for (p, s) in scans.iter().enumerate() {
            if let crate::format::ScanStop::Invalid { offset, reason } = &s.stop {
                stops.push(format!("log {p}: stopped at offset {offset}: {reason}"));
            }
        }
        let mut all: Vec<(usize, usize, u64)> = scans
            .iter()
            .enumerate()
            .flat_map(|(p, s)| {
                s.entries.iter().filter(|e| e.header.seq > applied_seq).map(move |e| (p, e.at, e.header.seq))
            })
            .collect();
        all.sort_by_key(|e| e.2);
        // Replay a gap-free run from applied_seq + 1 and never past a gap.
        let mut expect = applied_seq + 1;
        let mut run = Vec::new();
        for (p, at, seq) in all {
            if seq != expect {
                stops.push(format!(
                    "sequence gap: {seq} found where {expect} was expected; nothing past it is replayed"
                ));
                break;
            }
            if !replay {
                break;
            }
            run.push((p, at));
            expect += 1;
        }
        let replayed_ranges: Vec<(u64, u64)> = run
            .iter()
            .map(|&(p, at)| {
                let (h, _) = entry_data(guards[p].bytes(), at);
                (h.offset, u64::from(h.length))
            })
            .collect();
        let entries = run.iter().map(|&(p, at)| entry_data(guards[p].bytes(), at));
        // A CP interrupted before the promotion may have half-written the volume.
        let replayed = {
            let _redo = RedoGuard::new(self.device.as_ref());
            apply_entries(entries, self.device.as_ref()).map_err(|e| format!("replay: {e}"))?
        };
        drop(guards);
        let mut meta = self.meta.lock();
        meta.applied_seq = expect - 1;
        meta.promoted = true;
        meta.promoting = false;
        meta.pending_cp = None;
        let applied_cp = meta.applied_cp;
        // Saved under the meta lock: saves are ordered with the changes they record.
        self.save(&meta)?;
        drop(meta);
        for log in &self.logs {
            log.lock().free().map_err(|e| e.to_string())?;
        }
        Ok(PromoteReport {
            epoch,
            entries_replayed: replayed,
            last_seq: expect - 1,
            stops,
            applied_cp,
            replayed: replayed_ranges,
        })
    }

    pub fn status(&self) -> MirrorStatus {
        let meta = self.meta.lock().clone();
        let mut used = 0u64;
        let mut persisted_seq = meta.applied_seq;
        // Entries placed by RDMA pass no bookkeeping on this side: read the logs themselves.
        let placed_by_rdma = self.rdma_attachment.lock().is_some();
        for log in &self.logs {
            let mut l = log.lock();
            if placed_by_rdma {
                if let Err(e) = l.rescan() {
                    eprintln!("mirror {}/{}: rescan log: {e}", meta.source_node, meta.volume);
                }
            }
            used += l.tail() as u64;
            if let Some(s) = l.last_persisted_seq() {
                persisted_seq = persisted_seq.max(s);
            }
        }
        MirrorStatus {
            source_node: meta.source_node.clone(),
            volume: meta.volume.clone(),
            epoch: meta.epoch,
            applied_cp: meta.applied_cp,
            applied_seq: meta.applied_seq,
            persisted_seq,
            consistent: meta.consistent,
            promoted: meta.promoted,
            connected: self.session.lock().is_some(),
            entries_received: self.entries_received.load(Ordering::Relaxed),
            log_repairs: self.log_repairs.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            commits: self.commits.load(Ordering::Relaxed),
            log_bytes_used: used,
            log_bytes_max: meta.partition_bytes * PARTITIONS as u64,
            last_cp_unix_ms: meta.last_cp_unix_ms,
            last_cp_duration_us: meta.last_cp_duration_us,
            baseline_bytes: self.baseline_bytes.load(Ordering::Relaxed),
            cps_applied: self.cps_applied.load(Ordering::Relaxed),
            cps_applied_by_value: self.cps_applied_by_value.load(Ordering::Relaxed),
            error: self.error.lock().clone(),
        }
    }

    fn detach(&self, gen: u64) {
        let mut s = self.session.lock();
        if self.session_gen.load(Ordering::SeqCst) == gen {
            *s = None;
        }
    }
}

/// Header and data of the (already validated) entry at `at` of a log.
/// Checks that `log` (partition `partition`) holds CP `cp` up to `upto_seq`; its
/// [`LogFile::entries`] are then the CP's entries (and any after), each validated (header
/// and data checksum) when it was placed or scanned.
fn check_cp_log(log: &mut LogFile<Box<dyn Nvram>>, cp: u64, partition: u8, upto_seq: u64) -> Result<(), String> {
    // Entries may have been placed by RDMA, unseen by this side's bookkeeping: catching up
    // scans the log then, and persists whatever was placed and not yet persisted.
    log.catch_up().map_err(|e| format!("CP {cp}: rescan log {partition}: {e}"))?;
    let h = log.header().ok_or_else(|| format!("CP {cp}: log {partition} is not open"))?;
    if h.cp_gen != cp {
        return Err(format!("CP {cp}: log {partition} holds CP generation {}", h.cp_gen));
    }
    let last = log.entries().last().map(|e| e.header.seq);
    if upto_seq >= h.first_seq && last.is_none_or(|s| s < upto_seq) {
        return Err(format!(
            "CP {cp}: log {partition} ends at sequence {last:?}, the CP needs up to {upto_seq}: {:?}",
            log.scan().stop
        ));
    }
    Ok(())
}

/// Why a CP could not be applied.
#[derive(Debug)]
enum CpError {
    /// An entry of the log failed its checksum when read back for the CP: the log was cut
    /// before it, and the source sends the rest again when it reconnects.
    LogDamaged(String),
    /// Anything else: the mirror is failed.
    Other(String),
}

impl From<String> for CpError {
    fn from(e: String) -> Self {
        CpError::Other(e)
    }
}

impl std::fmt::Display for CpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CpError::LogDamaged(e) | CpError::Other(e) => f.write_str(e),
        }
    }
}

/// The first entry of `log` up to `upto_seq` whose bytes no longer pass their checksum:
/// its offset, sequence number and what is wrong.
fn first_damaged_entry(log: &LogFile<Box<dyn Nvram>>, upto_seq: u64) -> Option<(usize, u64, String)> {
    let bytes = log.bytes();
    log.entries().iter().take_while(|e| e.header.seq <= upto_seq).find_map(|e| {
        match EntryHeader::decode(&bytes[e.at..]) {
            Ok((h, _)) if h == e.header => None,
            Ok(_) => Some((e.at, e.header.seq, "its header changed".to_string())),
            Err(why) => Some((e.at, e.header.seq, why.to_string())),
        }
    })
}

/// The data of an entry a scan validated.
fn scanned_data<'a>(bytes: &'a [u8], e: &ScannedEntry) -> &'a [u8] {
    let at = e.at + ENTRY_HEADER_BYTES;
    &bytes[at..at + e.header.data_len as usize]
}

fn entry_data(bytes: &[u8], at: usize) -> (EntryHeader, &[u8]) {
    EntryHeader::decode(&bytes[at..]).expect("entry validated by the scan")
}

fn worker(mirror: std::sync::Weak<Mirror>, rx: Receiver<Job>) {
    for job in rx {
        let Some(m) = mirror.upgrade() else { return };
        run_job(&m, job);
    }
}

fn run_job(m: &Mirror, job: Job) {
    match job {
        Job::Barrier(done) => {
            let _ = done.send(());
        }
        Job::Cp { cp, partition, upto_seq, by_value, sink, gen } => {
            if m.session_gen.load(Ordering::SeqCst) != gen {
                return;
            }
            match m.apply_cp(cp, partition, upto_seq, by_value) {
                Ok(()) => {
                    let _ = sink.send(&Message::CpDone { cp });
                }
                Err(CpError::LogDamaged(e)) => {
                    // Not the mirror's failure: the connection ends, and the source's
                    // resume sends the entries from the cut on, then the CP again.
                    eprintln!("mirror {}: {e}", m.name());
                    m.log_repairs.fetch_add(1, Ordering::Relaxed);
                    let _ = sink.send(&Message::Error { reason: e });
                    sink.close();
                }
                Err(CpError::Other(e)) => {
                    m.fail(&e);
                    let _ = sink.send(&Message::Error { reason: e });
                    sink.close();
                }
            }
        }
        Job::Baseline { offset, data } => {
            // A baseline overwrites what a crash may have left half-written (an earlier
            // baseline, or an interrupted CP): parity is recomputed from the data.
            let _redo = RedoGuard::new(m.device.as_ref());
            if let Err(e) = m.device.write_at(&data, offset) {
                m.fail(&format!("baseline write at {offset}: {e}"));
            } else {
                m.baseline_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        Job::BaselineDone { sink, gen } => {
            if m.session_gen.load(Ordering::SeqCst) != gen {
                return;
            }
            let r = if let Some(e) = m.error.lock().clone() {
                Err(e)
            } else {
                m.device.flush().map_err(|e| format!("baseline flush: {e}")).and_then(|()| {
                    let mut meta = m.meta.lock();
                    meta.consistent = true;
                    meta.resyncing = false;
                    m.save(&meta)
                })
            };
            match r {
                Ok(()) => {
                    let _ = sink.send(&Message::BaselineAck);
                }
                Err(e) => {
                    let _ = sink.send(&Message::Error { reason: e });
                    sink.close();
                }
            }
        }
    }
}

/// One connection from the source to a mirror.
pub struct Session {
    mirror: Arc<Mirror>,
    gen: u64,
    sink: Arc<dyn ReplySink>,
    epoch: u64,
    volume_id: u64,
    dirty: [bool; PARTITIONS],
    by_value: Vec<(u64, Vec<u8>)>,
    by_value_bytes: usize,
    last_acked: Option<u64>,
    rdma: Option<Arc<dyn RdmaPlacement>>,
    /// On a baseline session: the offset the next baseline data must start at. The copy
    /// arrives in order, whole; `BaselineDone` is accepted only once it covers the volume.
    baseline_next: Option<u64>,
    /// On a delta resync session: what arrived so far.
    resync: Option<ResyncProgress>,
}

/// A delta resync's data, as it arrives: regions in increasing order.
#[derive(Debug, Default, Clone, Copy)]
struct ResyncProgress {
    /// The next region data may not start below this.
    next_min: u64,
    bytes: u64,
    chunks: u64,
}

impl Session {
    fn check_current(&self) -> Result<(), String> {
        if self.mirror.fenced.load(Ordering::SeqCst) {
            let _ = self.sink.send(&Message::Refuse {
                code: RefuseCode::StaleEpoch,
                reason: "volume failed over to the destination; this source is stale".into(),
            });
            return Err("mirror was failed over; this source is fenced".into());
        }
        if self.mirror.session_gen.load(Ordering::SeqCst) != self.gen {
            return Err("superseded by a newer connection".into());
        }
        Ok(())
    }

    fn partition(p: u8) -> Result<usize, String> {
        if (p as usize) < PARTITIONS {
            Ok(p as usize)
        } else {
            Err(format!("no partition {p}"))
        }
    }

    fn queue(&self, job: Job) -> Result<(), String> {
        self.mirror.queue(job)
    }
}

impl FrameHandler for Session {
    fn on_message(&mut self, msg: Message<'_>) -> Result<(), String> {
        self.check_current()?;
        match msg {
            Message::PartitionOpen { header } => {
                let p = Session::partition(header[6])?;
                let mut log = self.mirror.logs[p].lock();
                let h = log.open_partition(&header).map_err(|e| e.to_string())?;
                if h.volume_id != self.volume_id || h.epoch != self.epoch {
                    log.free().map_err(|e| e.to_string())?;
                    return Err("partition header of another volume or epoch".into());
                }
                Ok(())
            }
            Message::Entries { partition, offset, bytes } => {
                let p = Session::partition(partition)?;
                let n = self.mirror.logs[p].lock().place(offset, bytes, self.epoch).map_err(|e| e.to_string())?;
                self.dirty[p] = true;
                self.mirror.entries_received.fetch_add(n as u64, Ordering::Relaxed);
                self.mirror.bytes_received.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Message::Cp { cp, partition, upto_seq, by_value } => {
                Session::partition(partition)?;
                // Entries of the CP must be durable before it is applied from them.
                self.commit()?;
                let blocks = if by_value {
                    self.by_value_bytes = 0;
                    Some(std::mem::take(&mut self.by_value))
                } else {
                    None
                };
                self.queue(Job::Cp {
                    cp,
                    partition,
                    upto_seq,
                    by_value: blocks,
                    sink: self.sink.clone(),
                    gen: self.gen,
                })
            }
            Message::BlockData { purpose, offset, data } => {
                let size = self.mirror.device.size();
                if offset % BLOCK_BYTES as u64 != 0 || data.len() % BLOCK_BYTES != 0 || data.len() > ENTRY_DATA_MAX {
                    return Err("block data not block-aligned or too large".into());
                }
                crate::storage::check_range(size, offset, data.len() as u64).map_err(|e| e.to_string())?;
                match purpose {
                    BlockPurpose::Baseline => {
                        match self.baseline_next {
                            Some(next) if next == offset => {}
                            Some(next) => {
                                return Err(format!("baseline data at offset {offset}, where {next} was expected"))
                            }
                            None => return Err("baseline data on a session that is not a baseline".into()),
                        }
                        self.baseline_next = Some(offset + data.len() as u64);
                        self.queue(Job::Baseline { offset, data: data.to_vec() })
                    }
                    BlockPurpose::Resync => {
                        let Some(r) = &mut self.resync else {
                            return Err("resync data on a session that is not a resync".into());
                        };
                        if offset < r.next_min {
                            return Err(format!("resync data at offset {offset}, below {} already sent", r.next_min));
                        }
                        r.next_min = offset + data.len() as u64;
                        r.bytes += data.len() as u64;
                        r.chunks += 1;
                        self.queue(Job::Baseline { offset, data: data.to_vec() })
                    }
                    BlockPurpose::CpByValue => {
                        // A CP by value carries at most what two partitions can dirty.
                        let max = 2 * crate::usize_of(self.mirror.meta.lock().partition_bytes);
                        if self.by_value_bytes + data.len() > max {
                            return Err("CP by value larger than the log it replaces".into());
                        }
                        self.by_value_bytes += data.len();
                        self.by_value.push((offset, data.to_vec()));
                        Ok(())
                    }
                }
            }
            Message::BaselineDone { volume_bytes } => {
                if volume_bytes != self.mirror.device.size() {
                    return Err("baseline size mismatch".into());
                }
                if self.baseline_next != Some(volume_bytes) {
                    return Err(format!(
                        "baseline done after {} of {volume_bytes} bytes",
                        self.baseline_next.map_or("none".into(), |n| n.to_string())
                    ));
                }
                self.queue(Job::BaselineDone { sink: self.sink.clone(), gen: self.gen })
            }
            Message::ResyncDone { bytes, chunks } => {
                let Some(r) = self.resync else {
                    return Err("resync done on a session that is not a resync".into());
                };
                if (r.bytes, r.chunks) != (bytes, chunks) {
                    return Err(format!(
                        "resync done after {} bytes in {} chunks, but the source sent {bytes} in {chunks}",
                        r.bytes, r.chunks
                    ));
                }
                self.queue(Job::BaselineDone { sink: self.sink.clone(), gen: self.gen })
            }
            Message::LogFetch { partition, offset } => {
                // The source restarted with less of this partition than this side holds:
                // what is here past its tail was persistent here, and perhaps acknowledged.
                let p = Session::partition(partition)?;
                let mut log = self.mirror.logs[p].lock();
                log.catch_up().map_err(|e| format!("log fetch: rescan log {p}: {e}"))?;
                let tail = log.persisted_tail();
                let from = usize::try_from(offset).map_err(|_| "log fetch offset out of range".to_string())?;
                let on_boundary = from == tail || log.entries().iter().any(|e| e.at == from);
                if log.header().is_none() || !on_boundary {
                    return Err(format!(
                        "log fetch at offset {offset} of log {p}, which is not an entry boundary there"
                    ));
                }
                let mut at = from;
                while at < tail {
                    let end = (at + LOG_BYTES_CHUNK).min(tail);
                    let msg = Message::LogBytes { partition, offset: at as u64, bytes: &log.bytes()[at..end] };
                    self.sink.send(&msg).map_err(|e| format!("send log bytes: {e}"))?;
                    at = end;
                }
                drop(log);
                eprintln!(
                    "mirror {}: sent log {p} from offset {from} to {tail} to the source, which restarted without it",
                    self.mirror.name()
                );
                self.sink
                    .send(&Message::LogFetchEnd { partition, tail: tail as u64 })
                    .map_err(|e| format!("send log fetch end: {e}"))
            }
            Message::RdmaSetup => {
                let Some(rdma) = &self.rdma else {
                    return Err("this node has no RDMA engine (no device, or not built with it); use tcp".into());
                };
                let (addr, token) = rdma.expect(self.mirror.clone(), self.sink.clone(), self.gen)?;
                self.sink.send(&Message::RdmaListen { addr, token }).map_err(|e| format!("send: {e}"))
            }
            other => Err(format!("unexpected message from source: {}", msg_name(&other))),
        }
    }

    fn commit(&mut self) -> Result<(), String> {
        let mut persisted_any = false;
        for p in 0..PARTITIONS {
            if std::mem::take(&mut self.dirty[p]) {
                self.mirror.logs[p].lock().persist().map_err(|e| e.to_string())?;
                persisted_any = true;
            }
        }
        // An ack says every entry up to it is persistent here: the highest sequence number
        // below which the logs hold everything, not the highest any log holds. Entries of
        // the newer partition may arrive while the older one still lacks some (a frame
        // lost on a link that then carried on); acking those would acknowledge writes
        // whose predecessors this side never had.
        let high = if persisted_any { self.contiguous_persisted_seq() } else { None };
        if let Some(seq) = high {
            self.mirror.commits.fetch_add(1, Ordering::Relaxed);
            if self.last_acked.is_none_or(|a| seq > a) {
                self.last_acked = Some(seq);
                self.sink.send(&Message::Ack { seq }).map_err(|e| format!("send ack: {e}"))?;
            }
        }
        Ok(())
    }
}

impl Session {
    /// The highest sequence number up to which the open logs, oldest CP generation first,
    /// hold every entry persistently (see `commit`).
    fn contiguous_persisted_seq(&self) -> Option<u64> {
        let mut logs: Vec<LogView> = (0..PARTITIONS)
            .filter_map(|p| {
                if let Some(l) = self.mirror.logs[p].try_lock() {
                    return log_view(&l);
                }
                // Held: by a CP applying it, for its whole write-out, with what it holds
                // published and fixed meanwhile; else briefly (placement, a free).
                let applying = self.mirror.applying.lock().filter(|(q, _)| *q == p).map(|(_, v)| v);
                applying.or_else(|| log_view(&self.mirror.logs[p].lock()))
            })
            .collect();
        logs.sort_unstable();
        // Everything up to the last applied CP's sequence number is on the mirror's volume:
        // the first log must continue from there, and each later log from what the logs
        // before it hold. A log that holds nothing extends nothing: the next one must
        // continue what precedes it (its own predecessors never arrived).
        let applied = self.mirror.meta.lock().applied_seq;
        let mut high: Option<u64> = None;
        for (_, first_seq, last) in logs {
            if first_seq > high.unwrap_or(applied) + 1 {
                // A gap before this log: nothing of it counts.
                break;
            }
            if let Some(l) = last {
                high = Some(high.map_or(l, |h| h.max(l)));
            }
        }
        high
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.mirror.detach(self.gen);
    }
}

fn msg_name(m: &Message<'_>) -> &'static str {
    match m {
        Message::Hello(_) => "hello",
        Message::Welcome(_) => "welcome",
        Message::Refuse { .. } => "refuse",
        Message::Ack { .. } => "ack",
        Message::CpDone { .. } => "cp-done",
        Message::BaselineAck => "baseline-ack",
        Message::Error { .. } => "error",
        _ => "data",
    }
}

/// A directory of exactly one mirror, for what hosts a mirror without a node (benchmarks,
/// the hardware tests).
pub struct SingleMirror {
    pub mirror: Arc<Mirror>,
    pub rdma: Option<Arc<dyn RdmaPlacement>>,
}

impl crate::transport::MirrorDirectory for SingleMirror {
    fn attach(
        &self,
        hello: &Hello,
        sink: Arc<dyn ReplySink>,
    ) -> Result<(Box<dyn FrameHandler>, Welcome), (RefuseCode, String)> {
        let (session, welcome) = self.mirror.attach(hello, sink, self.rdma.clone())?;
        Ok((Box::new(session), welcome))
    }
}

/// A directory that makes one mirror in memory (a memory device, memory logs) at the
/// first hello and attaches every session to it: for tests and tools without a node.
#[derive(Default)]
pub struct MemMirrorDirectory {
    pub mirror: Mutex<Option<Arc<Mirror>>>,
    pub device: Mutex<Option<Arc<crate::storage::MemDevice>>>,
}

impl crate::transport::MirrorDirectory for MemMirrorDirectory {
    fn attach(
        &self,
        hello: &Hello,
        sink: Arc<dyn ReplySink>,
    ) -> Result<(Box<dyn FrameHandler>, Welcome), (RefuseCode, String)> {
        let mut m = self.mirror.lock();
        let mirror = match m.as_ref() {
            Some(mirror) => mirror.clone(),
            None => {
                let dev = Arc::new(crate::storage::MemDevice::new(hello.volume_bytes));
                let part = crate::usize_of(hello.partition_bytes);
                let logs: [Box<dyn Nvram>; PARTITIONS] =
                    [Box::new(crate::nvram::MemNvram::new(part)), Box::new(crate::nvram::MemNvram::new(part))];
                let mirror = Mirror::open(MirrorMeta::new(hello), Box::<MemMetaStore>::default(), logs, dev.clone())
                    .map_err(|e| (RefuseCode::Internal, format!("open the mirror: {e}")))?;
                *self.device.lock() = Some(dev);
                *m = Some(mirror.clone());
                mirror
            }
        };
        drop(m);
        let (session, welcome) = mirror.attach(hello, sink, None)?;
        Ok((Box::new(session), welcome))
    }
}
