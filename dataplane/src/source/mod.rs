//! The source: a primary volume and its pinned poller.
//!
//! One poller thread owns everything of a volume, run to completion: its NBD client
//! connections (adopted once their handshake names the volume, see `clients`), its NVLog,
//! its block cache (the [`Overlay`] of blocks dirtied since the last CP), its volume device
//! and its replication [`Link`]. Other submitters (a forward after a switchover, tests, the
//! simulator) hand it requests through a bounded queue and wake it. Per pass it appends one
//! entry per write to the active NVLog partition, persists the batch once, sends it to the
//! destination as one frame, and answers each write when the destination's ack covers it:
//! a write is acknowledged only once persistent on both sites. Replies leave once per pass.
//! With nothing to do it sleeps in epoll on its sockets and a waker (`crate::poller`).
//!
//! Consistency points: when the active partition fills, a timer fires, the cache grows past
//! its bound, or an administrator asks, the poller switches writes to the other partition,
//! writes the closed partition's dirty blocks to the volume, flushes it, and sends the
//! destination "CP n = partition p up to seq s"; the partition is freed when the
//! destination reports CP n applied. One CP is in flight at a time; writes wait for log
//! space only when both partitions are held.
//!
//! Policy is `strict`: a write that cannot be mirrored (link down, mirror fenced) fails
//! with an I/O error. A link that comes back resumes from what the destination holds; when
//! that is not possible the mirror is rebuilt with a baseline copy.
//!
//! The poller's parts, a file each: `poller` (the loop, start and shutdown), `clients`
//! (NBD connections), `write` (the write path), `link` (the replication link), `cp`
//! (consistency points), `copy` (baseline, resync, switchover drain), `recovery` (what a
//! restart finds), `status`, and `config` (what a volume starts with).

use std::collections::{HashSet, VecDeque};
use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TryRecvError};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::cp::{apply_entries, CpImage, Overlay, Vbn};
use crate::format::{EntryHeader, EntryKind, PartitionHeader, BLOCK_BYTES, ENTRY_DATA_MAX, PARTITION_HEADER_BYTES};
use crate::frontend::{Completer, Export, IoRequest};
use crate::log::{ChangeBase, ChangeMap, Checkpoint, NvLog, Recovered, PARTITIONS, PARTITION_IDS};
use crate::nvram::Nvram;
use crate::poller::{pin_to_core, Backoff, BackoffConfig, Idle, PollerWaker, Readiness};
use crate::storage::{BlockDevice, RedoGuard};
use crate::transport::wire::{BlockPurpose, BODY_MAX, ENTRIES_PREFIX_BYTES, FRAME_HEADER_BYTES};
use crate::transport::{
    ConnectError, Connector, Hello, Intent, Link, LinkError, LinkEvent, Message, RefuseCode, Reply, Welcome,
};
use crate::usize_of;

mod clients;
mod config;
mod copy;
mod cp;
mod link;
mod poller;
mod recovery;
mod status;
mod write;

#[cfg(any(test, feature = "sim"))]
pub use config::PlantedBug;
pub use config::{Control, ControlError, Policy, ReopenRegion, SourceConfig};
use cp::{cp_writer, CpJob, CpLocalDone};
use link::send_range;
pub use recovery::replay_nvlog;
pub use status::{PairState, SourceStatus};

use clients::{Clients, ReplyTo};

/// Requests queued from front ends to a poller.
pub const IO_QUEUE_MAX: usize = 1024;
/// Control messages (and connections to adopt) queued to a poller.
const CONTROL_QUEUE_MAX: usize = 64;
/// The link's token in the poller's readiness set (clients use theirs from
/// `clients::CLIENT_TOKEN_BASE`).
const LINK_TOKEN: usize = 1;
/// Requests taken per poller iteration: the most entries one group commit carries.
pub const BATCH_MAX: usize = 64;
/// The most bytes one [`Control::Rewrite`] logs.
pub const REWRITE_BYTES_MAX: u64 = 64 << 20;
/// The mean entries logged per working pass (in sixteenths, an exponential average over
/// about eight passes) above which an idle poller sleeps at once instead of spinning
/// (`poller::SPIN_WINDOW`). Batches that large mean many requests in flight: the next
/// one comes soon anyway and its wake-up is shared by a batch, while a spinning poller
/// takes CPU from the threads that produce the next events (the mirror's receiver and CP).
/// Measured on this project's 2-core machine, fio's nbd engine at queue depth 32 to a
/// mirrored volume: 72-76k writes/s spinning, 82-86k sleeping; at queue depth 1, where the
/// spin pays (20 us against 63 at the median), every pass logs one entry.
pub const SPIN_BATCH_MAX_16THS: u32 = 2 * 16;
/// The write throttle (after ZFS's dirty-data throttle): while the other partition is
/// still held by its CP, each write logged past this fill of the active partition delays
/// the next client request by `THROTTLE_SCALE_US * (f - start) / (1 - f)` (f: the fill),
/// so that writers slow down smoothly as the log runs out instead of all stopping at once
/// when it has (a stall as long as the rest of the CP: the tail of every queue-depth-32
/// run). 10 us at f = 0.6, 30 us at 0.75, 120 us at 0.9, 280 us at 0.95; a request
/// submitted through the handle is not delayed. Measured with the harness's `nbd-qd32`
/// (RAID-4 3+1 on both sites, where the CP is the bottleneck): p99.9 25.7 ms unmirrored and
/// 8.1 ms mirrored without the throttle, 7.6 and 7.3 ms with it, at about 20% less
/// throughput unmirrored; starting at 0.6 with half the scale left 10.5 ms unmirrored.
const THROTTLE_START_FILL: f64 = 0.5;
const THROTTLE_SCALE_US: f64 = 10.0;
/// The longest one write delays the next.
const THROTTLE_DELAY_MAX_US: u64 = 2_000;
/// Bytes of baseline data per frame.
const BASELINE_CHUNK: usize = 1 << 20;
/// A copy asks for a CP (empty if need be) each time it has copied this much: what the
/// destination then has is kept across a restart or a lost link, and the copy resumes
/// from there as a delta resync instead of starting over (see `copy_checkpoint_done`).
const COPY_CHECKPOINT_BYTES: u64 = 256 << 20;
/// A copy's chunk is looked at in pieces of this size: a run of pieces that read as zeroes
/// goes as a zero range.
const ZERO_PIECE: usize = 64 << 10;
/// Entry bytes per frame.
const SEND_MAX: usize = BODY_MAX - ENTRIES_PREFIX_BYTES - FRAME_HEADER_BYTES;

/// Bucket bounds of the acknowledgement latency histogram, in microseconds.
pub const ACK_LATENCY_BOUNDS_US: [u64; 14] =
    [25, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 500_000, 1_000_000];

/// Smallest partition: room for the largest entry and some more.
pub const PARTITION_BYTES_MIN: usize = 4 * ENTRY_DATA_MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Free,
    Active {
        gen: u64,
    },
    /// `local_done`: the partition's blocks are on the local volume (written and flushed);
    /// `remote_done`: the destination applied the CP. Freed when both hold (the first alone
    /// while unmirrored).
    Closing {
        gen: u64,
        upto_seq: u64,
        remote_done: bool,
        local_done: bool,
    },
}

impl Part {
    fn gen(self) -> Option<u64> {
        match self {
            Part::Free => None,
            Part::Active { gen } | Part::Closing { gen, .. } => Some(gen),
        }
    }
}

enum LinkState<L> {
    /// Not mirrored.
    Unmirrored,
    /// Mirrored, link down; reconnecting.
    Down {
        reason: String,
        /// Clock time (ns) of the next connection attempt.
        next_try: u64,
        connecting: bool,
        /// What the next connection must copy first (none: resume).
        copy: Option<CopyKind>,
    },
    Up {
        link: L,
        copy: Option<Copying>,
    },
    /// The destination failed over: this node is no longer the primary.
    Fenced(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyKind {
    /// The whole volume.
    Baseline,
    /// The regions the change map marks.
    Resync,
}

/// A copy under way on the link: the baseline, or a delta resync.
#[derive(Debug, Clone)]
struct Copying {
    kind: CopyKind,
    /// Baseline: the byte offset reached. Resync: the region reached.
    cursor: u64,
    /// The change map's marks when the copy started (one bit per region): a resync copies
    /// those regions; either kind clears them from the map once the destination has the
    /// copy (a baseline copied everything, so all of them).
    marks: Vec<u8>,
    /// Regions a resync copies.
    marked: u64,
    bytes: u64,
    /// Of `bytes`, those sent as zero ranges (no data on the wire).
    zero_bytes: u64,
    /// Of those, the bytes of holes in the volume's files, sent without being read.
    hole_bytes: u64,
    chunks: u64,
    done_sent: bool,
    /// Clock time (ns) the end of the copy was sent.
    done_ns: u64,
    /// The CP generation the destination's logs start at: it holds CP `base_cp_gen - 1`
    /// once the copy is done.
    base_cp_gen: u64,
    /// The first sequence number of the logs: everything before is in the copy.
    base_seq: u64,
    /// Clock time (ns) the copy started, for its rate limit.
    started_ns: u64,
    /// The CP sent while this copy ran whose `CpDone` makes the copy resumable, and the
    /// cursor when it was sent (every piece before it went out before the CP message, so
    /// the destination has them durably once it has the CP): see `copy_checkpoint_done`.
    checkpoint: Option<(u64, u64)>,
    /// Bytes copied since the last checkpoint was asked for.
    since_checkpoint: u64,
    /// The destination checks copy marks (`Welcome::copy_marks`): each CP sent while the
    /// copy runs follows one, and is a checkpoint. Without, the copy has none (a restart
    /// starts it over).
    copy_marks: bool,
}

/// A write not yet completed: `progress` bytes of it are logged so far.
struct Waiting {
    request: IoRequest,
    done: Option<ReplyTo>,
    progress: u64,
}

/// Log bytes being fetched back from the mirror after a restart (`Message::LogFetch`):
/// this node's log of `partition` ends at `from`, the mirror's goes on.
struct CatchUp {
    partition: u8,
    from: usize,
    bytes: Vec<u8>,
    /// The welcome the resume goes on with once the bytes are in.
    welcome: Welcome,
    /// Clock time (ns) the fetch was asked for: unanswered past the CP timeout, the link
    /// is declared down (and the fetch asked for again on the next connection).
    started_ns: u64,
}

/// What a resume did.
enum Resumed {
    /// The mirror has everything this node's log holds (sent now where it lacked it).
    Done,
    /// The mirror holds more of a partition than this node's log, which a restart cut
    /// short: those bytes are being fetched first (see [`CatchUp`]).
    CatchingUp,
    /// The mirror applied a CP whose entries this node's log lost: the volume is the
    /// mirror's now (failover), never to be copied over from here. Why, for the operator.
    Lost(String),
}

struct Pending {
    last_seq: u64,
    /// Clock time (ns) it was sent (or logged, while unmirrored).
    sent_ns: u64,
    done: ReplyTo,
}

type ConnectResult<L> = Result<(L, Welcome), ConnectError>;
/// Runs of adjacent blocks: (byte offset, data).
type BlockRuns = Vec<(u64, Vec<u8>)>;

/// Handle to a running source volume: submit I/O, send control requests.
pub struct SourceHandle {
    io: Sender<(IoRequest, Completer)>,
    ctl: Sender<Control>,
    /// The volume's storage: its size is the volume's (it grows, `Control::Grow`).
    device: Arc<dyn BlockDevice>,
    thread: parking_lot::Mutex<Option<JoinHandle<()>>>,
    /// After a switchover: where requests go instead of the stopped poller.
    forward: parking_lot::RwLock<Option<Arc<dyn Export>>>,
    /// Wakes the poller after a request or a control message is queued (none for a
    /// stepped poller, whose owner steps it).
    waker: Option<PollerWaker>,
    /// Whether the poller takes writes now (`WRITES_*`).
    writes: Arc<std::sync::atomic::AtomicU8>,
    /// Where the mirror serves the volume over NVMe/TCP, as its last welcome said.
    mirror_nvmf: Arc<parking_lot::Mutex<Option<std::net::SocketAddr>>>,
}

/// Values of the poller's write state.
const WRITES_TAKEN: u8 = 0;
const WRITES_WAITING: u8 = 1;
const WRITES_FENCED: u8 = 2;

impl SourceHandle {
    pub fn control(&self, c: Control) -> Result<(), SourceError> {
        self.ctl.send(c).map_err(|_| SourceError::Stopped)?;
        self.wake();
        Ok(())
    }

    fn wake(&self) {
        if let Some(w) = &self.waker {
            w.wake();
        }
    }

    /// Where the mirror serves the volume over NVMe/TCP, as it said when the link last came
    /// up (`None`: not said). Read without a round trip to the poller.
    pub fn mirror_nvmf(&self) -> Option<std::net::SocketAddr> {
        *self.mirror_nvmf.lock()
    }

    pub fn status(&self) -> Result<SourceStatus, SourceError> {
        let (tx, rx) = bounded(1);
        self.control(Control::Status(tx))?;
        rx.recv_timeout(Duration::from_secs(30)).map_err(|_| SourceError::NoAnswer)
    }

    /// Stops the poller and waits for it.
    pub fn stop(&self) {
        let (tx, rx) = bounded(1);
        if self.control(Control::Stop(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(30));
        }
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }

    /// From now on, requests submitted here go to `to` (the volume moved).
    pub fn forward_to(&self, to: Arc<dyn Export>) {
        *self.forward.write() = Some(to);
    }

    /// Asks a stepped poller to stop, without waiting: its next step stops it.
    pub fn stop_stepped(&self) {
        let (tx, _rx) = bounded(1);
        let _ = self.control(Control::Stop(tx));
    }
}

impl Export for SourceHandle {
    fn size(&self) -> u64 {
        self.device.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn writes(&self) -> crate::frontend::Writes {
        use crate::frontend::Writes;
        if self.forward.read().is_some() {
            return Writes::Elsewhere;
        }
        match self.writes.load(std::sync::atomic::Ordering::Acquire) {
            WRITES_TAKEN => Writes::Taken,
            WRITES_WAITING => Writes::Waiting,
            _ => Writes::Elsewhere,
        }
    }
    fn submit(&self, request: IoRequest, done: Completer) {
        if let Some(f) = self.forward.read().as_ref() {
            return f.submit(request, done);
        }
        if let Err(e) = self.io.send((request, done)) {
            let (_, done) = e.into_inner();
            done.complete(Err(io::Error::other("volume is stopped")));
            return;
        }
        self.wake();
    }
    fn adopt(&self, conn: crate::frontend::nbd::Adopted) -> Result<(), crate::frontend::nbd::Adopted> {
        // A volume that moved is served through its forward, on threads of the front end.
        // The guard is held across the send: a switchover sets the forward before it asks
        // the poller to hand over, so a connection queued here reaches the poller first.
        let forward = self.forward.read();
        if forward.is_some() {
            return Err(conn);
        }
        match self.ctl.send(Control::Adopt(conn)) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(e) => match e.into_inner() {
                Control::Adopt(conn) => Err(conn),
                _ => unreachable!("the message sent is the one given back"),
            },
        }
    }
    fn adopt_nvmf(
        &self,
        queue: crate::frontend::nvmf::AdoptedQueue,
    ) -> Result<(), crate::frontend::nvmf::AdoptedQueue> {
        // As for NBD connections: a volume that moved serves its queues on threads.
        let forward = self.forward.read();
        if forward.is_some() {
            return Err(queue);
        }
        match self.ctl.send(Control::AdoptNvmf(queue)) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(e) => match e.into_inner() {
                Control::AdoptNvmf(queue) => Err(queue),
                _ => unreachable!("the message sent is the one given back"),
            },
        }
    }
}

/// Why a source volume's poller could not be asked something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("volume poller has stopped")]
    Stopped,
    #[error("volume poller did not answer")]
    NoAnswer,
}

impl From<SourceError> for String {
    fn from(e: SourceError) -> String {
        e.to_string()
    }
}

/// What a source volume starts from.
pub struct SourceParts<C> {
    pub cfg: SourceConfig,
    /// The volume's NVLog, and what opening it found: rebuilt into the cache, and a CP
    /// interrupted by a crash redone.
    pub nvlog: NvLog<Box<dyn Nvram>>,
    pub recovered: Recovered,
    pub device: Arc<dyn BlockDevice>,
    pub connector: Arc<C>,
    pub clock: Arc<dyn Clock>,
    /// The destination's replication address when the volume is mirrored.
    pub mirror: Option<String>,
    /// The volume's change map, where it keeps one (what a delta resync copies).
    pub changes: Option<ChangeMap>,
}

/// Starts a source volume on its own poller thread.
pub fn spawn<C>(parts: SourceParts<C>) -> io::Result<SourceHandle>
where
    C: Connector + 'static,
    C::Link: 'static,
{
    let (mut poller, handle) = build(parts, false)?;
    let name = format!("nvm-vol-{}", poller.cfg.volume);
    let thread = thread::Builder::new().name(name).spawn(move || poller.run())?;
    *handle.thread.lock() = Some(thread);
    Ok(handle)
}

/// A source volume without threads of its own, driven one step at a time by its owner:
/// the deterministic simulator runs the real poller this way. The CP write-out happens
/// on the step after the one that started it, and connecting happens within a step.
pub struct SteppedSource<C: Connector> {
    poller: Poller<C>,
}

impl<C> SteppedSource<C>
where
    C: Connector + 'static,
    C::Link: 'static,
{
    /// One pass of the poller over its inputs; whether it found work. `false` once stopped.
    pub fn step(&mut self) -> bool {
        self.poller.poll_once().unwrap_or(false)
    }
    pub fn status(&mut self) -> SourceStatus {
        self.poller.status()
    }
    /// Whether the mirror holds every write acknowledged so far (see
    /// [`SourceStatus::mirror_current`]).
    pub fn mirror_current(&self) -> bool {
        self.poller.mirror_current()
    }
}

/// As [`spawn`], but the poller runs only when [`SteppedSource::step`] is called.
pub fn stepped<C>(parts: SourceParts<C>) -> io::Result<(SteppedSource<C>, SourceHandle)>
where
    C: Connector + 'static,
    C::Link: 'static,
{
    let (poller, handle) = build(parts, true)?;
    Ok((SteppedSource { poller }, handle))
}

fn build<C>(parts: SourceParts<C>, inline: bool) -> io::Result<(Poller<C>, SourceHandle)>
where
    C: Connector + 'static,
    C::Link: 'static,
{
    let partition_bytes = parts.cfg.partition_bytes;
    if partition_bytes < PARTITION_BYTES_MIN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NVLog partition of {partition_bytes} bytes is below the minimum {PARTITION_BYTES_MIN}"),
        ));
    }
    let device = parts.device.clone();
    let (io_tx, io_rx) = bounded(IO_QUEUE_MAX);
    let (ctl_tx, ctl_rx) = bounded(CONTROL_QUEUE_MAX);
    let poller = Poller::new(parts, io_rx, ctl_rx, inline)?;
    let handle = SourceHandle {
        io: io_tx,
        ctl: ctl_tx,
        device,
        thread: parking_lot::Mutex::new(None),
        forward: parking_lot::RwLock::new(None),
        waker: poller.readiness.as_ref().map(Readiness::waker),
        writes: poller.writes.clone(),
        mirror_nvmf: poller.mirror_nvmf.clone(),
    };
    Ok((poller, handle))
}

struct Poller<C: Connector> {
    cfg: SourceConfig,
    /// Declared (so dropped) before `nvlog`: a link may send straight from the NVLog's
    /// memory, offered to it at connect time.
    link: LinkState<C::Link>,
    connect_rx: Option<Receiver<ConnectResult<C::Link>>>,
    nvlog: NvLog<Box<dyn Nvram>>,
    device: Arc<dyn BlockDevice>,
    connector: Arc<C>,
    clock: Arc<dyn Clock>,
    io_rx: Receiver<(IoRequest, Completer)>,
    ctl_rx: Receiver<Control>,
    target: Option<String>,

    parts: [Part; PARTITIONS],
    active: u8,
    next_seq: u64,
    /// Every entry up to here is persistent on the destination.
    acked_seq: u64,
    /// Per partition: entries from this offset on are not yet sent.
    unsent: [usize; PARTITIONS],
    overlay: Overlay<'static>,
    dirty: [HashSet<Vbn>; PARTITIONS],
    waiting: VecDeque<Waiting>,
    pending: VecDeque<Pending>,
    cp_wanted: bool,
    cp_waiters: Vec<(u64, Sender<Result<u64, ControlError>>)>,
    cp_started_ns: u64,
    last_cp_ns: u64,
    stats: SourceStatus,
    core: Option<usize>,
    /// A local storage error: the volume refuses further writes (fail stop).
    failed: Option<String>,
    /// To the CP writer thread, and its answers.
    cp_jobs: Sender<CpJob>,
    cp_done: Receiver<CpLocalDone>,
    /// The local CP being written: its partition, generation and blocks.
    local_cp_inflight: Option<(u8, u64, HashSet<Vbn>)>,
    /// Clock time (ns) since which writes have waited for log space.
    log_full_since: Option<u64>,
    /// Stepped (no threads): the CP writer's queue, run by the poller itself, and the
    /// step a job was queued at (it runs on a later one).
    inline: Option<(Receiver<CpJob>, Sender<CpLocalDone>)>,
    steps: u64,
    /// Clock time (ns) before which no new client request is taken (the write throttle,
    /// see [`THROTTLE_START_FILL`]).
    admit_at_ns: u64,
    /// Entries logged in this pass, and their mean per working pass in sixteenths (see
    /// [`SPIN_BATCH_MAX_16THS`]).
    pass_entries: u32,
    batch_16ths: u32,
    inline_job_step: u64,
    /// Clock time (ns) the last CP message was sent: the destination owes its `CpDone`.
    cp_sent_ns: u64,
    /// Regions changed since the mirror's last consistent point (see [`ChangeMap`]).
    changes: Option<ChangeMap>,
    /// Per partition: every block logged into it since it opened. A partition freed
    /// without the destination's `CpDone` has these marked in the change map first.
    part_blocks: [HashSet<Vbn>; PARTITIONS],
    /// A planned switchover is draining the volume: new requests wait in the queue.
    quiesce: Option<Sender<Result<(u64, u64), ControlError>>>,
    quiesced: bool,
    /// Whether writes are taken now, for the handle's [`Export::writes`]: one of
    /// `WRITES_*`, stored at the end of every pass.
    writes: Arc<std::sync::atomic::AtomicU8>,
    /// Where the mirror serves the volume over NVMe/TCP, as its last welcome said (none
    /// where the mirror does not say: then the pair's record is what is known).
    mirror_nvmf: Arc<parking_lot::Mutex<Option<std::net::SocketAddr>>>,
    /// The mirror link has been up (or the volume has no mirror) since the poller started.
    link_was_up: bool,
    /// Acknowledged writes per latency bucket (the last one: above every bound).
    ack_buckets: [u64; ACK_LATENCY_BOUNDS_US.len() + 1],
    ack_sum_us: u64,
    /// The highest sequence number the destination acknowledged (or holds by a copy).
    remote_acked_seq: u64,
    /// The highest sequence number acknowledged to a client without the mirror (policy
    /// sync, link down). The mirror holds every acknowledged write again once
    /// `remote_acked_seq` reaches it with the link up.
    local_only_seq: u64,
    /// Bytes per second a copy may send at most.
    copy_rate: Option<u64>,
    /// When the copy was paused (`ctl pause-copy`), on the poller's clock.
    copy_paused_at: Option<u64>,
    /// A CP is wanted even with nothing logged: a copy's checkpoint (an empty CP still
    /// tells when the destination has everything sent before it).
    cp_even_empty: bool,
    /// The mirror accepted this node's epoch since the poller started. Until it has, a
    /// volume under policy sync does not go on alone: a restarted old primary that cannot
    /// reach its mirror may have been failed over meanwhile.
    confirmed: bool,
    /// Per partition: the sequence number at which recovery found the log damaged (an entry
    /// that failed to decode: torn by a power cut, or its memory changed since), if it did.
    damaged_at: [Option<u64>; PARTITIONS],
    /// Log bytes being fetched back from the mirror; no request is taken meanwhile.
    catch_up: Option<CatchUp>,
    /// The NBD sessions this poller serves itself.
    clients: Clients,
    /// What the poller sleeps on (none when stepped: its owner steps it).
    readiness: Option<Readiness>,
    /// The link's descriptor while it is registered in `readiness`.
    link_fd: Option<std::os::fd::RawFd>,
}

impl<C: Connector> Drop for Poller<C> {
    /// Connections queued for adoption that the poller did not take before it stopped
    /// are served on threads instead (through the handle, which refuses or forwards them),
    /// never dropped on the floor.
    fn drop(&mut self) {
        while let Ok(c) = self.ctl_rx.try_recv() {
            match c {
                Control::Adopt(conn) => conn.serve_on_threads(),
                Control::AdoptNvmf(queue) => queue.serve_on_threads(),
                _ => {}
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn eio(msg: String) -> io::Error {
    io::Error::other(msg)
}

const _: () = assert!(BASELINE_CHUNK.is_multiple_of(BLOCK_BYTES));
const _: () = assert!(ZERO_PIECE.is_multiple_of(BLOCK_BYTES) && BASELINE_CHUNK.is_multiple_of(ZERO_PIECE));
