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
//!
//! Files: `attach` (a source's hello, admitted or refused), `session` (its frames, group
//! commits and acks), `apply` (CP application on the worker), `promote` (failover),
//! `directory` (one-mirror directories for tests and tools); the mirror itself here.

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

mod apply;
mod attach;
mod directory;
mod promote;
mod session;

use apply::{run_job, worker};
pub use directory::{MemMirrorDirectory, SingleMirror};
use session::ResyncProgress;
pub use session::{Session, SessionError};

pub use crate::transport::RdmaPlacement;

/// Why an operation on a mirror failed: a failover, a resize, a CP, a job for its worker.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("volume {volume} is already failed over (epoch {epoch})")]
    AlreadyPromoted { volume: String, epoch: u64 },
    #[error("mirror of {volume} is inconsistent (its baseline copy or resync did not finish); refusing to fail over")]
    Inconsistent { volume: String },
    /// The mirror's metadata could not be made durable.
    #[error("save mirror metadata: {0}")]
    SaveMeta(#[source] io::Error),
    /// A log file could not be released or started over.
    #[error("free log {partition}: {source}")]
    FreeLog { partition: usize, source: crate::log::LogFileError },
    /// What a log file holds could not be made durable before it is replayed.
    #[error("persist log {partition}: {source}")]
    PersistLog { partition: usize, source: crate::log::LogFileError },
    /// The replay of the log onto the mirror's volume failed.
    #[error("replay: {0}")]
    Replay(#[source] io::Error),
    /// The worker that runs CPs and copies is gone.
    #[error("mirror worker stopped")]
    WorkerStopped,
    #[error("mirror {mirror} was failed over here; resize the volume here instead")]
    FailedOver { mirror: String },
    #[error("mirror {mirror} holds {holds} bytes: a volume does not shrink")]
    Shrink { mirror: String, holds: u64 },
    #[error("grow mirror {mirror}'s storage: {source}")]
    Grow { mirror: String, source: io::Error },
    /// A CP's log could not be brought up to date (entries placed by RDMA, persisted).
    #[error("CP {cp}: rescan log {partition}: {source}")]
    CpRescan { cp: u64, partition: u8, source: crate::log::LogFileError },
    #[error("CP {cp}: log {partition} is not open")]
    CpLogNotOpen { cp: u64, partition: u8 },
    #[error("CP {cp}: log {partition} holds CP generation {holds}")]
    CpGeneration { cp: u64, partition: u8, holds: u64 },
    /// The log lacks entries the CP covers (a lost frame, a dropped connection).
    #[error("CP {cp}: log {partition} ends at sequence {last:?}, the CP needs up to {upto_seq}: {stop}")]
    CpLogShort { cp: u64, partition: u8, last: Option<u64>, upto_seq: u64, stop: String },
    /// Writing a CP onto the mirror's volume failed.
    #[error("CP {cp}: {what}: {source}")]
    CpWrite { cp: u64, what: &'static str, source: io::Error },
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
    /// A baseline is under way, or stopped part-way: the mirror is not consistent, but
    /// resyncable by its source, whose change map (made relative to a CP this mirror
    /// applied during the copy) says what it still lacks. A source whose map is relative
    /// to no such CP sends a baseline again.
    #[serde(default)]
    pub baseline_started: bool,
    /// The source's NVMe/TCP address, as its last connection said (`SourcePaths`): the
    /// volume's other path in this node's discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_nvmf: Option<std::net::SocketAddr>,
    pub last_cp_unix_ms: u64,
    pub last_cp_duration_us: u64,
}

impl MirrorMeta {
    /// Whether a delta resync can bring the mirror level (from a source whose change map
    /// is relative to a CP it applied).
    pub fn resyncable(&self) -> bool {
        self.consistent || self.resyncing || self.baseline_started
    }

    /// The mirror's storage was found dirty and degraded (the write hole: the node crashed
    /// during a CP with a member gone). Its torn rows may be anywhere, so neither a CP
    /// redone from the log nor a delta resync, nor a baseline resumed part-way, can bring
    /// it level: it takes a full copy. Returns whether the metadata changed (and must be
    /// saved before the mirror is opened).
    pub fn take_full_copy_after_write_hole(&mut self) -> bool {
        if !(self.resyncable() || self.pending_cp.is_some()) {
            return false;
        }
        self.consistent = false;
        self.resyncing = false;
        self.baseline_started = false;
        self.pending_cp = None;
        true
    }

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
            baseline_started: false,
            source_nvmf: None,
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
    /// The mirror's size (it grows ahead of its source in a resize).
    pub volume_bytes: u64,
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
    /// A range of a baseline or resync that reads as zeroes on the source.
    Zero {
        offset: u64,
        len: u64,
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
    /// `applied_seq` of the metadata last saved, for acknowledgements: read without the
    /// meta lock, which a CP holds while it saves (a rename, up to milliseconds), so that
    /// acknowledging newer entries never waits for a CP's bookkeeping. Stored after the
    /// save and before the applied log is released (`Session::contiguous_persisted_seq`).
    saved_applied_seq: AtomicU64,
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
    /// Where clients reach the volume through this node over NVMe/TCP, told to sources
    /// that ask (`Welcome::mirror_nvmf`).
    local_nvmf: Mutex<Option<std::net::SocketAddr>>,
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
                tracing::warn!(
                    "mirror {}/{}: log {p}: scan stopped at offset {offset}: {reason}; entries after it are not used",
                    meta.source_node,
                    meta.volume
                );
            }
        }
        let (tx, rx) = bounded(JOBS_MAX);
        // A baseline stopped part-way goes on (as a delta resync) over what was there.
        device.set_copy_over(meta.baseline_started && !meta.consistent);
        let mirror = Arc::new(Mirror {
            rdma_attachment: Mutex::new(None),
            saved_applied_seq: AtomicU64::new(meta.applied_seq),
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
            local_nvmf: Mutex::new(None),
        });
        let pending = mirror.meta.lock().pending_cp;
        if let Some(p) = pending {
            tracing::info!("mirror {}: finishing CP {} interrupted by a restart", mirror.name(), p.cp);
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
            tracing::info!("mirror {}: finishing the failover a restart interrupted (epoch {epoch})", mirror.name());
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

    fn queue(&self, job: Job) -> Result<(), MirrorError> {
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
                    Err(crossbeam_channel::TrySendError::Disconnected(_)) => return Err(MirrorError::WorkerStopped),
                }
            }
        }
        self.jobs.send(job).map_err(|_| MirrorError::WorkerStopped)
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

    /// Grows the mirror to `bytes`, ahead of its source: the device, then the metadata
    /// (a source still at the old size is admitted meanwhile). CPs and the connection go on
    /// beside it. Refused once failed over here.
    pub fn grow(&self, bytes: u64) -> Result<(), MirrorError> {
        let name = self.name();
        if self.fenced.load(Ordering::SeqCst) {
            return Err(MirrorError::FailedOver { mirror: name });
        }
        let old = self.meta.lock().volume_bytes;
        if bytes < old {
            return Err(MirrorError::Shrink { mirror: name, holds: old });
        }
        self.device.grow(bytes).map_err(|source| MirrorError::Grow { mirror: name.clone(), source })?;
        let mut meta = self.meta.lock();
        if meta.promoted {
            return Err(MirrorError::FailedOver { mirror: name });
        }
        if meta.volume_bytes < bytes {
            let mut next = meta.clone();
            next.volume_bytes = bytes;
            self.save(&next)?;
            *meta = next;
            drop(meta);
            tracing::info!("mirror {name}: grown from {old} to {bytes} bytes");
        }
        Ok(())
    }

    /// Where clients reach the volume through this node over NVMe/TCP: said to the source
    /// in the welcome of each connection after this call (for its discovery controller).
    pub fn set_local_nvmf(&self, nvmf: Option<std::net::SocketAddr>) {
        *self.local_nvmf.lock() = nvmf;
    }

    /// Records where clients reach the volume through its source (saved where it changed).
    pub fn set_source_nvmf(&self, nvmf: Option<std::net::SocketAddr>) -> Result<(), MirrorError> {
        let mut meta = self.meta.lock();
        if meta.source_nvmf != nvmf {
            let mut next = meta.clone();
            next.source_nvmf = nvmf;
            self.save(&next)?;
            *meta = next;
        }
        Ok(())
    }

    fn save(&self, meta: &MirrorMeta) -> Result<(), MirrorError> {
        self.store.save(meta).map_err(MirrorError::SaveMeta)?;
        self.saved_applied_seq.store(meta.applied_seq, Ordering::SeqCst);
        Ok(())
    }

    fn fail(&self, reason: &str) {
        tracing::warn!("mirror {}: {reason}", self.name());
        *self.error.lock() = Some(reason.to_string());
    }

    /// The log files' memory, for an RDMA engine to register: valid while the mirror lives.
    pub fn log_memory(&self) -> [(*mut u8, usize); PARTITIONS] {
        [0, 1].map(|p| self.logs[p].lock().memory())
    }

    /// Keeps an RDMA engine's registrations for session `gen`, unless a newer session or a
    /// failover came first.
    pub fn set_rdma_attachment(
        &self,
        gen: u64,
        attachment: Box<dyn std::any::Any + Send>,
    ) -> Result<(), crate::transport::SessionGone> {
        if self.fenced.load(Ordering::SeqCst) || self.session_gen.load(Ordering::SeqCst) != gen {
            return Err(crate::transport::SessionGone);
        }
        *self.rdma_attachment.lock() = Some((gen, attachment));
        Ok(())
    }

    /// Drops the RDMA engine's registrations: from here on the source can place nothing.
    fn drop_rdma_attachment(&self) {
        let old = self.rdma_attachment.lock().take();
        drop(old);
    }

    /// Reads the mirror as of the last completed CP.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let _shared = self.apply.read();
        self.device.read_at(buf, offset)
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
                    tracing::warn!("mirror {}/{}: rescan log: {e}", meta.source_node, meta.volume);
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
            volume_bytes: meta.volume_bytes,
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
}

/// The data of an entry a scan validated.
fn scanned_data<'a>(bytes: &'a [u8], e: &ScannedEntry) -> &'a [u8] {
    let at = e.at + ENTRY_HEADER_BYTES;
    &bytes[at..at + e.header.data_len as usize]
}

fn entry_data(bytes: &[u8], at: usize) -> (EntryHeader, &[u8]) {
    EntryHeader::decode(&bytes[at..]).expect("entry validated by the scan")
}

impl crate::transport::PlacementTarget for Mirror {
    fn name(&self) -> String {
        Mirror::name(self)
    }
    fn log_memory(&self) -> [(*mut u8, usize); PARTITIONS] {
        Mirror::log_memory(self)
    }
    fn set_rdma_attachment(
        &self,
        gen: u64,
        attachment: Box<dyn std::any::Any + Send>,
    ) -> Result<(), crate::transport::SessionGone> {
        Mirror::set_rdma_attachment(self, gen, attachment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::wire::Intent;

    fn meta() -> MirrorMeta {
        MirrorMeta::new(&Hello {
            source_node: "a".into(),
            volume: "v".into(),
            volume_id: 1,
            epoch: 1,
            volume_bytes: 1 << 20,
            partition_bytes: 1 << 20,
            intent: Intent::Baseline,
            base_seq: 0,
            base_cp_gen: 0,
            features: 0,
        })
    }

    /// Whatever a mirror found with the write hole held (a complete copy, a CP to redo, a
    /// resync or a baseline part-way), it is left with nothing but a full copy.
    #[test]
    fn a_write_hole_leaves_only_a_full_copy() {
        let states: [fn(&mut MirrorMeta); 4] = [
            |m| m.consistent = true,
            |m| m.pending_cp = Some(PendingCp { cp: 3, partition: 1, upto_seq: 9 }),
            |m| m.resyncing = true,
            |m| m.baseline_started = true,
        ];
        for (i, set) in states.iter().enumerate() {
            let mut m = meta();
            set(&mut m);
            assert!(m.take_full_copy_after_write_hole(), "state {i}");
            assert!(!m.resyncable() && m.pending_cp.is_none(), "state {i}: {m:?}");
            assert!(!m.take_full_copy_after_write_hole(), "state {i}: a second time changes nothing");
        }
        // A mirror that never started a copy has nothing to drop.
        assert!(!meta().take_full_copy_after_write_hole());
    }
}
