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
use crate::transport::{ConnectError, Connector, Hello, Intent, Link, LinkEvent, Message, RefuseCode, Reply, Welcome};
use crate::usize_of;

mod clients;

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
/// Entry bytes per frame.
const SEND_MAX: usize = BODY_MAX - ENTRIES_PREFIX_BYTES - FRAME_HEADER_BYTES;

#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// This node's name, as destinations know it.
    pub node: String,
    pub volume: String,
    pub volume_id: u64,
    pub epoch: u64,
    pub partition_bytes: usize,
    pub cp_interval: Duration,
    /// Cached dirty blocks above which a CP starts.
    pub cache_blocks_max: usize,
    pub backoff: BackoffConfig,
    /// Core index to pin the poller to.
    pub core: Option<usize>,
    /// Delay between reconnection attempts.
    pub reconnect_interval: Duration,
    /// Send CPs by value (block number + data) instead of by reference to the
    /// destination's log file.
    pub cp_by_value: bool,
    /// How long a sent write may wait for the destination's acknowledgement before the
    /// link is declared down (the write then fails under policy strict and the source
    /// reconnects). A peer that goes silent without closing the connection (a partition,
    /// a hung node) is noticed within this time, not when the kernel gives up on TCP.
    pub ack_timeout: Duration,
    /// How long a CP or a baseline may wait for the destination's answer: longer than
    /// [`Self::ack_timeout`], since applying a CP writes a whole partition's blocks.
    pub cp_timeout: Duration,
    /// What a write does when it cannot be mirrored (see [`Policy`]).
    pub policy: Policy,
    /// The mirror's node name: what the change map is relative to.
    pub peer: Option<String>,
    /// Deliberate defects, for the simulator's own test that it catches them.
    #[cfg(any(test, feature = "sim"))]
    pub planted_bug: Option<PlantedBug>,
}

/// What a write does when the mirror cannot take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// The write fails with an I/O error: nothing is acknowledged that is not on both sites.
    #[default]
    Strict,
    /// The write goes on locally and its region is marked in the change map; when the link
    /// returns, a delta resync copies the marked regions. Needs a change map (without one
    /// the volume behaves as `strict`).
    Sync,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Strict => "strict",
            Policy::Sync => "sync",
        }
    }
}

/// A deliberate defect the simulator must catch (see `crate::sim`).
#[cfg(any(test, feature = "sim"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// Complete a write once it is persistent in the local NVLog, without waiting for the
    /// destination's acknowledgement.
    AckBeforeRemotePersist,
    /// Fail over without replaying the mirror's log past its last applied CP.
    FailoverSkipsReplay,
}

impl SourceConfig {
    pub fn new(node: &str, volume: &str, volume_id: u64, partition_bytes: usize) -> Self {
        SourceConfig {
            node: node.to_string(),
            volume: volume.to_string(),
            volume_id,
            epoch: 1,
            partition_bytes,
            cp_interval: Duration::from_secs(10),
            cache_blocks_max: 1 << 20,
            backoff: BackoffConfig::default(),
            core: None,
            reconnect_interval: Duration::from_millis(500),
            cp_by_value: false,
            ack_timeout: Duration::from_secs(6),
            cp_timeout: Duration::from_secs(60),
            policy: Policy::Strict,
            peer: None,
            #[cfg(any(test, feature = "sim"))]
            planted_bug: None,
        }
    }
}

/// Bucket bounds of the acknowledgement latency histogram, in microseconds.
pub const ACK_LATENCY_BOUNDS_US: [u64; 14] =
    [25, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 500_000, 1_000_000];

/// Smallest partition: room for the largest entry and some more.
pub const PARTITION_BYTES_MIN: usize = 4 * ENTRY_DATA_MAX;

/// Control-plane requests to a poller.
pub enum Control {
    /// Force a CP; answered with its number once durable on both sites.
    Cp(Sender<Result<u64, String>>),
    /// Start mirroring to the replication address `target` of node `peer` (baseline or
    /// delta resync, then in sync).
    Attach {
        target: String,
        peer: Option<String>,
        reply: Sender<Result<(), String>>,
    },
    Status(Sender<SourceStatus>),
    /// Stop the poller; pending requests fail.
    Stop(Sender<()>),
    /// Marks regions in the change map (a returning peer's own changes, for its resync)
    /// and makes them durable.
    MarkRegions {
        regions: Vec<u64>,
        reply: Sender<Result<(), String>>,
    },
    /// Planned switchover, first half: stop taking new requests (they wait in the queue),
    /// complete what was logged, and bring the mirror level with a CP. Answered with the
    /// last CP and the next sequence number once both partitions are free and the mirror
    /// applied everything.
    Quiesce(Sender<Result<(u64, u64), String>>),
    /// Planned switchover, second half: stop the poller and hand back the requests that
    /// waited in the queue, unanswered, for whoever serves the volume next.
    Handover(Sender<Vec<(IoRequest, Completer)>>),
    /// Takes back a quiesce that did not lead to a handover.
    Resume,
    /// Changes the policy (`ctl mirror --policy`).
    SetPolicy(Policy),
    /// An NBD client connection that named this volume: the poller serves it from now on.
    Adopt(crate::frontend::nbd::Adopted),
    /// Stop taking writes: another node may be the primary now (fleet mode lost its lease,
    /// or found the volume held elsewhere).
    Fence(String),
    /// Bounds the bytes per second a baseline or resync sends (`None`: as fast as it goes).
    SetCopyRate(Option<u64>),
    /// The regions this volume may hold that its mirror (or a new primary) does not: the
    /// change map's marks and the blocks of the partitions the NVLog still holds. A fenced
    /// old primary sends them to the new one for its failback resync.
    ChangedRegions(Sender<Vec<u64>>),
}

/// Where a primary volume and its mirror stand: the `state` of its status, serialised as
/// the strings the status has always shown (`in-sync`, `out-of-sync`...).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairState {
    /// No mirror configured: writes are acknowledged once persistent here.
    #[default]
    NotMirrored,
    /// Reaching a mirror not joined yet, or fetching the log back from it.
    Connecting,
    /// The pair was in sync and the link is down.
    OutOfSync,
    /// A delta resync to the mirror is under way.
    Resyncing,
    /// A full copy to the mirror is under way.
    Baseline,
    /// Every write goes to both sites before it is acknowledged.
    InSync,
    /// Another node holds the volume at a newer epoch: nothing is acknowledged here.
    Fenced,
    /// The volume stopped on an error (see the reason).
    Failed,
    /// Drained for a switchover.
    Quiescing,
}

impl PairState {
    pub fn as_str(self) -> &'static str {
        match self {
            PairState::NotMirrored => "not-mirrored",
            PairState::Connecting => "connecting",
            PairState::OutOfSync => "out-of-sync",
            PairState::Resyncing => "resyncing",
            PairState::Baseline => "baseline",
            PairState::InSync => "in-sync",
            PairState::Fenced => "fenced",
            PairState::Failed => "failed",
            PairState::Quiescing => "quiescing",
        }
    }
}

impl std::fmt::Display for PairState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for PairState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    pub volume: String,
    pub volume_id: u64,
    pub epoch: u64,
    pub size_bytes: u64,
    pub state: PairState,
    pub peer: Option<String>,
    pub reason: Option<String>,
    pub next_seq: u64,
    pub acked_seq: u64,
    pub writes: u64,
    pub write_errors: u64,
    pub bytes_written: u64,
    pub cps: u64,
    pub last_cp: u64,
    pub last_cp_unix_ms: u64,
    pub last_cp_duration_us: u64,
    /// How long the last CP's local write-out (blocks and flush) took, off the poller.
    pub last_local_cp_us: u64,
    pub log_bytes_used: u64,
    pub log_bytes_max: u64,
    pub cache_blocks: u64,
    pub pending_writes: u64,
    pub baseline_done_bytes: u64,
    /// strict or sync.
    pub policy: String,
    /// Volume bytes marked changed since the mirror's last consistent point (what a
    /// delta resync would copy), where the volume has a change map.
    pub changed_bytes: u64,
    /// The node and CP the change map is relative to.
    pub changes_since: Option<crate::log::ChangeBase>,
    /// The mirror holds every write acknowledged so far: in sync, and caught up with what
    /// policy sync acknowledged alone. A failover to a mirror that is not current loses
    /// the writes acknowledged since it fell behind.
    pub mirror_current: bool,
    /// The highest sequence number the mirror acknowledged (or holds by a copy), and the
    /// highest acknowledged to a client without it (policy sync).
    pub mirror_acked_seq: u64,
    pub local_only_seq: u64,
    /// Acknowledged writes by latency (logged to acknowledged): counts at or below each
    /// bound of [`ACK_LATENCY_BOUNDS_US`], cumulative as Prometheus histograms are, and the
    /// sum of the latencies.
    pub ack_latency_le_us: Vec<(u64, u64)>,
    pub ack_latency_sum_us: u64,
    pub ack_latency_count: u64,
    /// The last copy to the mirror that completed: `baseline` or `resync`, and its bytes.
    pub last_copy_kind: Option<String>,
    pub last_copy_bytes: u64,
    /// A delta resync under way: bytes copied, of how many.
    pub resync_done_bytes: u64,
    pub resync_total_bytes: u64,
    pub core: Option<usize>,
    pub parks: u64,
    /// Times writes had to wait for NVLog space (both partitions held by CPs), and for how
    /// long in all: a CP that cannot keep up with the write rate shows here.
    pub log_full_waits: u64,
    pub log_full_wait_us: u64,
    /// Writes the write throttle delayed the next request after, and the delay in all
    /// (see `THROTTLE_START_FILL`): a CP falling behind shows here first.
    pub throttled_writes: u64,
    pub throttle_us: u64,
    /// Log entries this node's log lacked after a restart (cut short, or damaged) that
    /// the mirror's copy gave back.
    pub log_entries_fetched: u64,
    /// Requests wait for the mirror's copy of the log (see `held_for_mirror_log`).
    pub awaiting_mirror_log: bool,
}

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
    size: u64,
    thread: parking_lot::Mutex<Option<JoinHandle<()>>>,
    /// After a switchover: where requests go instead of the stopped poller.
    forward: parking_lot::RwLock<Option<Arc<dyn Export>>>,
    /// Wakes the poller after a request or a control message is queued (none for a
    /// stepped poller, whose owner steps it).
    waker: Option<PollerWaker>,
}

impl SourceHandle {
    pub fn control(&self, c: Control) -> Result<(), String> {
        self.ctl.send(c).map_err(|_| "volume poller has stopped".to_string())?;
        self.wake();
        Ok(())
    }

    fn wake(&self) {
        if let Some(w) = &self.waker {
            w.wake();
        }
    }

    pub fn status(&self) -> Result<SourceStatus, String> {
        let (tx, rx) = bounded(1);
        self.control(Control::Status(tx))?;
        rx.recv_timeout(Duration::from_secs(30)).map_err(|_| "volume poller did not answer".to_string())
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
        self.size
    }
    fn read_only(&self) -> bool {
        false
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
    let size = parts.device.size();
    let (io_tx, io_rx) = bounded(IO_QUEUE_MAX);
    let (ctl_tx, ctl_rx) = bounded(CONTROL_QUEUE_MAX);
    let poller = Poller::new(parts, io_rx, ctl_rx, inline)?;
    let handle = SourceHandle {
        io: io_tx,
        ctl: ctl_tx,
        size,
        thread: parking_lot::Mutex::new(None),
        forward: parking_lot::RwLock::new(None),
        waker: poller.readiness.as_ref().map(Readiness::waker),
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
    cp_waiters: Vec<(u64, Sender<Result<u64, String>>)>,
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
    quiesce: Option<Sender<Result<(u64, u64), String>>>,
    quiesced: bool,
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
            if let Control::Adopt(conn) = c {
                conn.serve_on_threads();
            }
        }
    }
}

/// A local CP for the writer thread: a copy of a closed partition's blocks.
struct CpJob {
    partition: u8,
    gen: u64,
    image: CpImage,
}

struct CpLocalDone {
    partition: u8,
    gen: u64,
    result: io::Result<()>,
    micros: u64,
}

/// The CP writer: writes each job's blocks to the volume and flushes it, off the poller
/// thread, so that a CP's write-out and `fdatasync` do not stop client writes. Ends when
/// the poller drops its sender.
fn cp_writer(device: Arc<dyn BlockDevice>, jobs: Receiver<CpJob>, done: Sender<CpLocalDone>, waker: PollerWaker) {
    for job in jobs {
        let result = write_cp_job(device.as_ref(), &job);
        // The image goes before the answer: the poller then finds the cached blocks it
        // releases unshared, and reuses their buffers.
        drop(job);
        let sent = done.send(result);
        waker.wake();
        if sent.is_err() {
            return;
        }
    }
}

fn write_cp_job(device: &dyn BlockDevice, job: &CpJob) -> CpLocalDone {
    let started = Instant::now();
    let result = job.image.write_out(device);
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    CpLocalDone { partition: job.partition, gen: job.gen, result, micros }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn eio(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl<C> Poller<C>
where
    C: Connector + 'static,
    C::Link: 'static,
{
    fn new(
        parts: SourceParts<C>,
        io_rx: Receiver<(IoRequest, Completer)>,
        ctl_rx: Receiver<Control>,
        inline: bool,
    ) -> io::Result<Self> {
        let SourceParts { cfg, nvlog, recovered, device, connector, clock, mirror, changes } = parts;
        let now = clock.now_ns();
        let link = match &mirror {
            None => LinkState::Unmirrored,
            Some(_) => LinkState::Down { reason: "starting".into(), next_try: now, connecting: false, copy: None },
        };
        let stats = SourceStatus {
            volume: cfg.volume.clone(),
            volume_id: cfg.volume_id,
            epoch: cfg.epoch,
            size_bytes: device.size(),
            state: PairState::default(),
            peer: mirror.clone(),
            reason: None,
            next_seq: 0,
            acked_seq: 0,
            writes: 0,
            write_errors: 0,
            bytes_written: 0,
            cps: 0,
            last_cp: recovered.checkpoint.released_cp,
            last_cp_unix_ms: 0,
            last_cp_duration_us: 0,
            last_local_cp_us: 0,
            log_bytes_used: 0,
            log_bytes_max: (cfg.partition_bytes * PARTITIONS) as u64,
            cache_blocks: 0,
            pending_writes: 0,
            baseline_done_bytes: 0,
            policy: cfg.policy.as_str().into(),
            changed_bytes: 0,
            changes_since: None,
            mirror_current: false,
            mirror_acked_seq: 0,
            local_only_seq: 0,
            last_copy_kind: None,
            last_copy_bytes: 0,
            ack_latency_le_us: Vec::new(),
            ack_latency_sum_us: 0,
            ack_latency_count: 0,
            resync_done_bytes: 0,
            resync_total_bytes: 0,
            core: None,
            parks: 0,
            log_full_waits: 0,
            log_full_wait_us: 0,
            throttled_writes: 0,
            throttle_us: 0,
            log_entries_fetched: 0,
            awaiting_mirror_log: false,
        };
        let (cp_jobs, cp_jobs_rx) = bounded::<CpJob>(1);
        let (cp_done_tx, cp_done) = bounded::<CpLocalDone>(1);
        let (inline, readiness) = if inline {
            (Some((cp_jobs_rx, cp_done_tx)), None)
        } else {
            let readiness = Readiness::new()?;
            let (device, waker) = (device.clone(), readiness.waker());
            thread::Builder::new()
                .name(format!("nvm-cp-{}", cfg.volume))
                .spawn(move || cp_writer(device, cp_jobs_rx, cp_done_tx, waker))?;
            (None, Some(readiness))
        };
        let mut p = Poller {
            cfg,
            nvlog,
            device,
            connector,
            clock,
            io_rx,
            ctl_rx,
            target: mirror,
            link,
            connect_rx: None,
            parts: [Part::Free; PARTITIONS],
            active: 0,
            next_seq: 1,
            acked_seq: 0,
            unsent: [PARTITION_HEADER_BYTES; PARTITIONS],
            overlay: Overlay::new(),
            dirty: [HashSet::new(), HashSet::new()],
            waiting: VecDeque::new(),
            pending: VecDeque::new(),
            cp_wanted: false,
            cp_waiters: Vec::new(),
            cp_started_ns: 0,
            last_cp_ns: now,
            stats,
            core: None,
            failed: None,
            cp_jobs,
            cp_done,
            local_cp_inflight: None,
            inline,
            steps: 0,
            admit_at_ns: 0,
            pass_entries: 0,
            batch_16ths: 16,
            inline_job_step: 0,
            cp_sent_ns: 0,
            changes,
            part_blocks: [HashSet::new(), HashSet::new()],
            quiesce: None,
            quiesced: false,
            ack_buckets: [0; ACK_LATENCY_BOUNDS_US.len() + 1],
            ack_sum_us: 0,
            remote_acked_seq: 0,
            local_only_seq: 0,
            copy_rate: None,
            confirmed: false,
            damaged_at: [None; PARTITIONS],
            catch_up: None,
            clients: Clients::default(),
            log_full_since: None,
            readiness,
            link_fd: None,
        };
        p.recover(&recovered)?;
        Ok(p)
    }

    /// Rebuilds the cache from the NVLog found at start: the older held partition is a CP
    /// that did not finish, the newer the active one. The unfinished CP is redone locally;
    /// its remote half follows once the link is up.
    fn recover(&mut self, rec: &Recovered) -> io::Result<()> {
        for problem in rec.problems() {
            eprintln!("volume {}: NVLog recovery: {problem}; entries after it are not replayed", self.cfg.volume);
        }
        // What is replayed here may have been half-written to the volume by a CP the crash
        // interrupted: the device must not trust its redundancy over it (no write hole).
        let device = self.device.clone();
        let _redo = RedoGuard::new(device.as_ref());
        let mut held: Vec<(u8, PartitionHeader)> =
            PARTITION_IDS.into_iter().filter_map(|p| self.nvlog.header(p).map(|h| (p, h))).collect();
        held.sort_by_key(|(_, h)| h.cp_gen);
        let mut next_seq = rec.checkpoint.next_seq.max(1);
        let mut next_gen = rec.checkpoint.released_cp + 1;
        for (p, h) in &held {
            let scan = &rec.scans[*p as usize];
            if matches!(scan.stop, crate::format::ScanStop::Invalid { .. }) {
                self.damaged_at[*p as usize] = Some(scan.next_seq().unwrap_or(h.first_seq));
            }
            next_seq = next_seq.max(h.first_seq);
            for e in &scan.entries {
                let bytes = self.nvlog.partition(*p);
                let (eh, data) = EntryHeader::decode(&bytes[e.at..]).map_err(|e| eio(e.to_string()))?;
                self.overlay.apply(&eh, data, self.device.as_ref(), &mut self.dirty[*p as usize])?;
                next_seq = next_seq.max(eh.seq + 1);
            }
            next_gen = next_gen.max(h.cp_gen + 1);
            self.unsent[*p as usize] = self.nvlog.tail(*p);
            self.part_blocks[*p as usize] = self.dirty[*p as usize].clone();
        }
        self.next_seq = next_seq;
        self.acked_seq = next_seq - 1;
        // Whatever the log holds may have been acknowledged here alone (policy sync with the
        // mirror away, before the restart): the mirror is not current until it has
        // acknowledged all of it.
        self.local_only_seq = next_seq - 1;
        match held.as_slice() {
            [] => {
                self.open_partition(0, next_gen)?;
            }
            [(p, h)] => {
                self.parts[*p as usize] = Part::Active { gen: h.cp_gen };
                self.active = *p;
                self.redo_active(*p)?;
            }
            [(old, oh), (new, nh)] => {
                self.active = *new;
                self.parts[*new as usize] = Part::Active { gen: nh.cp_gen };
                self.redo_active(*new)?;
                let upto = rec.scans[*old as usize].next_seq().unwrap_or(oh.first_seq).saturating_sub(1);
                self.parts[*old as usize] =
                    Part::Closing { gen: oh.cp_gen, upto_seq: upto, remote_done: false, local_done: false };
                self.local_cp(*old)?;
                if matches!(self.link, LinkState::Unmirrored) {
                    self.release(*old)?;
                }
            }
            _ => unreachable!("two partitions"),
        }
        Ok(())
    }

    /// Rewrites the active partition's blocks to the volume, as a redo, at recovery: a
    /// full flush (before a baseline) writes them too, and a crash in the middle of it can
    /// leave their rows with stale parity, which a later read-modify-write would keep. The
    /// blocks stay cached: the partition is still active.
    fn redo_active(&mut self, p: u8) -> io::Result<()> {
        let dirty = &self.dirty[p as usize];
        if dirty.is_empty() {
            return Ok(());
        }
        self.overlay.write_blocks(dirty, self.device.as_ref())?;
        self.device.flush()
    }

    fn open_partition(&mut self, p: u8, gen: u64) -> io::Result<()> {
        let header = PartitionHeader {
            partition: p,
            volume_id: self.cfg.volume_id,
            cp_gen: gen,
            first_seq: self.next_seq,
            epoch: self.cfg.epoch,
        };
        self.nvlog.open_partition(header).map_err(|e| eio(e.to_string()))?;
        self.parts[p as usize] = Part::Active { gen };
        self.active = p;
        self.unsent[p as usize] = PARTITION_HEADER_BYTES;
        if let LinkState::Up { link, .. } = &mut self.link {
            let r = link.send(&Message::PartitionOpen { header: header.encode() });
            if let Err(e) = r {
                self.link_down(format!("send: {e}"));
            }
        }
        Ok(())
    }

    fn run(&mut self) {
        self.core = self.cfg.core.and_then(pin_to_core);
        let mut backoff = Backoff::new(self.cfg.backoff);
        loop {
            let Ok(worked) = self.poll_once() else { return };
            if worked {
                backoff.reset();
            } else if backoff.idle(self.must_poll_link(), self.batch_16ths <= SPIN_BATCH_MAX_16THS) == Idle::Park {
                self.park();
            }
            self.stats.parks = backoff.parks;
        }
    }

    /// One pass over every input; whether any had work. `Err` once stopped.
    fn poll_once(&mut self) -> Result<bool, ()> {
        self.steps += 1;
        if self.pass_entries > 0 {
            let n = self.pass_entries.min(u32::try_from(BATCH_MAX).unwrap_or(u32::MAX)) * 16;
            self.batch_16ths = (self.batch_16ths * 7 + n) / 8;
            self.pass_entries = 0;
        }
        self.account_log_wait();
        let mut worked = self.poll_control()?;
        worked |= self.poll_link();
        worked |= self.poll_io();
        worked |= self.poll_clients();
        worked |= self.flush_batch();
        worked |= self.copy_step();
        worked |= self.poll_local_cp(false);
        worked |= self.timers();
        // Every reply this pass produced, one write per connection.
        worked |= self.flush_clients();
        Ok(worked)
    }

    /// Whether a reply is owed on the link: writes or a CP in flight, or a copy running.
    fn link_owes(&self) -> bool {
        matches!(self.link, LinkState::Up { .. })
            && (!self.pending.is_empty()
                || self.parts.iter().any(|p| matches!(p, Part::Closing { .. }))
                || matches!(self.link, LinkState::Up { copy: Some(_), .. }))
    }

    /// Whether the link owes replies but offers no descriptor to sleep on (RDMA): then the
    /// poller polls it between short sleeps.
    fn must_poll_link(&self) -> bool {
        self.link_fd.is_none() && self.link_owes()
    }

    /// Sleeps until an input is ready or a timer is due: a client socket or the link
    /// becomes readable, or a thread that queued work (control, submitted requests, a
    /// connect, a CP write-out) wakes the poller.
    fn park(&mut self) {
        self.watch_link();
        // Timers (ack and CP timeouts, the CP interval, reconnecting) are looked at on
        // every pass; sleeping at most this long keeps them within it of their due time.
        let mut timeout = if self.must_poll_link() { Duration::from_micros(500) } else { Duration::from_millis(50) };
        // The write throttle's hold ends by the clock, not by an event.
        let now = self.clock.now_ns();
        if self.admit_at_ns > now {
            timeout = timeout.min(Duration::from_nanos(self.admit_at_ns - now));
        }
        match &mut self.readiness {
            Some(r) => r.wait(timeout),
            None => thread::sleep(timeout),
        }
    }

    /// Keeps the link's descriptor (where it has one) in the readiness set.
    fn watch_link(&mut self) {
        let fd = match &self.link {
            LinkState::Up { link, .. } => link.readiness_fd(),
            _ => None,
        };
        if fd == self.link_fd {
            return;
        }
        let Some(r) = &self.readiness else { return };
        if let Some(old) = self.link_fd.take() {
            r.deregister(old);
        }
        if let Some(fd) = fd {
            match r.register(fd, LINK_TOKEN) {
                Ok(()) => self.link_fd = Some(fd),
                Err(e) => eprintln!("volume {}: cannot watch the link: {e}; polling it", self.cfg.volume),
            }
        }
    }

    /// Replaces the link state; a link leaving is taken out of the readiness set before it
    /// is dropped (its descriptor number may be reused at once).
    fn set_link(&mut self, next: LinkState<C::Link>) {
        if let (Some(fd), Some(r)) = (self.link_fd.take(), &self.readiness) {
            r.deregister(fd);
        }
        self.link = next;
    }

    /// Acts on what is due by the clock; whether it did anything (a CP started, the link
    /// declared down, a connection attempt started, a switchover's drain moved on).
    fn timers(&mut self) -> bool {
        let mut worked = false;
        let now = self.clock.now_ns();
        let active = self.active;
        let has_entries = self.nvlog.tail(active) > PARTITION_HEADER_BYTES;
        let interval = u64::try_from(self.cfg.cp_interval.as_nanos()).unwrap_or(u64::MAX);
        if has_entries && now.saturating_sub(self.last_cp_ns) >= interval {
            self.cp_wanted = true;
        }
        if self.cp_wanted {
            let before = self.parts;
            self.try_start_cp();
            worked |= self.parts != before;
        }
        if let LinkState::Up { copy, .. } = &self.link {
            let late = |since: u64, limit: Duration| now.saturating_sub(since) > nanos(limit);
            let why = if self.catch_up.as_ref().is_some_and(|c| late(c.started_ns, self.cfg.cp_timeout)) {
                Some(format!("the mirror did not send its log back within {:?}", self.cfg.cp_timeout))
            } else if self.pending.front().is_some_and(|p| late(p.sent_ns, self.cfg.ack_timeout)) {
                Some(format!("no acknowledgement from the destination within {:?}", self.cfg.ack_timeout))
            } else if self.catch_up.is_none()
                && self.parts.iter().any(|p| matches!(p, Part::Closing { remote_done: false, .. }))
                && late(self.cp_sent_ns, self.cfg.cp_timeout)
            {
                Some(format!("the destination did not finish a CP within {:?}", self.cfg.cp_timeout))
            } else if copy.as_ref().is_some_and(|c| c.done_sent && late(c.done_ns, self.cfg.cp_timeout)) {
                Some(format!("the destination did not confirm the copy within {:?}", self.cfg.cp_timeout))
            } else {
                None
            };
            if let Some(why) = why {
                self.link_down(why);
                worked = true;
            }
        }
        if let LinkState::Down { next_try, connecting: false, copy, .. } = &self.link {
            if now >= *next_try {
                let copy = *copy;
                self.start_connect(copy);
                worked = true;
            }
        }
        let (wanted, quiescing) = (self.cp_wanted, self.quiesce.is_some());
        self.poll_quiesce();
        worked | (!wanted && self.cp_wanted) | (quiescing && self.quiesce.is_none())
    }

    // ---- control ----

    fn poll_control(&mut self) -> Result<bool, ()> {
        let mut worked = false;
        loop {
            match self.ctl_rx.try_recv() {
                Ok(Control::Status(tx)) => {
                    let _ = tx.send(self.status());
                }
                Ok(Control::Cp(tx)) => self.force_cp(tx),
                Ok(Control::Attach { target, peer, reply }) => {
                    let r = self.attach(target, peer);
                    let _ = reply.send(r);
                }
                Ok(Control::MarkRegions { regions, reply }) => {
                    let r = match &mut self.changes {
                        None => Err("this volume keeps no change map".to_string()),
                        Some(m) => {
                            for r in regions {
                                m.mark_region(r);
                            }
                            m.persist().map_err(|e| format!("change map: {e}"))
                        }
                    };
                    let _ = reply.send(r);
                }
                Ok(Control::Quiesce(tx)) => {
                    if !matches!(self.link, LinkState::Up { copy: None, .. }) {
                        let _ = tx.send(Err("the mirror is not in sync; a switchover needs it in sync".into()));
                    } else if let Some(why) = &self.failed {
                        let _ = tx.send(Err(format!("volume failed: {why}")));
                    } else {
                        self.quiesced = true;
                        self.quiesce = Some(tx);
                        self.cp_wanted = true;
                    }
                }
                Ok(Control::SetCopyRate(r)) => self.copy_rate = r.filter(|&r| r > 0),
                Ok(Control::Fence(why)) => {
                    if !matches!(self.link, LinkState::Fenced(_)) {
                        self.fence(why);
                    }
                }
                Ok(Control::SetPolicy(p)) => {
                    self.cfg.policy = p;
                    self.stats.policy = p.as_str().into();
                }
                Ok(Control::ChangedRegions(tx)) => {
                    let _ = tx.send(self.changed_regions());
                }
                Ok(Control::Resume) => {
                    self.quiesced = false;
                    if let Some(tx) = self.quiesce.take() {
                        let _ = tx.send(Err("switchover cancelled".into()));
                    }
                }
                Ok(Control::Adopt(conn)) => self.adopt(conn),
                Ok(Control::Handover(tx)) => {
                    let mut queued = Vec::new();
                    while let Ok(r) = self.io_rx.try_recv() {
                        queued.push(r);
                    }
                    self.shutdown("volume handed over");
                    let _ = tx.send(queued);
                    return Err(());
                }
                Ok(Control::Stop(tx)) => {
                    self.shutdown("volume stopped");
                    let _ = tx.send(());
                    return Err(());
                }
                Err(TryRecvError::Empty) => return Ok(worked),
                Err(TryRecvError::Disconnected) => {
                    self.shutdown("volume handle dropped");
                    return Err(());
                }
            }
            worked = true;
        }
    }

    fn shutdown(&mut self, why: &str) {
        let _ = self.flush_batch();
        // A local CP being written finishes first: the volume is left flushed.
        self.poll_local_cp(true);
        let waiting: Vec<Waiting> = self.waiting.drain(..).collect();
        for w in waiting {
            if let Some(to) = w.done {
                self.answer(to, Err(eio(why.to_string())));
            }
        }
        let pending: Vec<Pending> = self.pending.drain(..).collect();
        for p in pending {
            self.answer(p.done, Err(eio(why.to_string())));
        }
        while let Ok((_, done)) = self.io_rx.try_recv() {
            done.complete(Err(eio(why.to_string())));
        }
        // Connections that were handed over (a switchover) or outlive the volume go on
        // through its handle, which forwards them or refuses their requests.
        // (Connections still queued for adoption are served on threads when the poller is
        // dropped.)
        self.release_clients(why);
        if let LinkState::Up { link, .. } = &mut self.link {
            link.close();
        }
    }

    fn status(&mut self) -> SourceStatus {
        let mut s = self.stats.clone();
        s.awaiting_mirror_log = self.held_for_mirror_log();
        let (state, reason) = match &self.link {
            LinkState::Unmirrored => (PairState::NotMirrored, None),
            // Connecting: to a mirror not joined yet (a copy to come, or none confirmed since
            // the start). A pair that was in sync stays out of sync through its reconnect
            // attempts, whichever moment the status is taken.
            LinkState::Down { reason, connecting, copy, .. } => {
                if copy.is_some() || (*connecting && !self.confirmed) {
                    (PairState::Connecting, Some(reason.clone()))
                } else {
                    (PairState::OutOfSync, Some(reason.clone()))
                }
            }
            LinkState::Up { copy: Some(c), .. } if c.kind == CopyKind::Resync => (PairState::Resyncing, None),
            LinkState::Up { copy: Some(_), .. } => (PairState::Baseline, None),
            LinkState::Up { copy: None, .. } if self.catch_up.is_some() => {
                (PairState::Connecting, Some("fetching the log back from the mirror".to_string()))
            }
            LinkState::Up { copy: None, .. } => (PairState::InSync, None),
            LinkState::Fenced(r) => (PairState::Fenced, Some(r.clone())),
        };
        s.state = state;
        s.reason = reason;
        if let Some(r) = &self.failed {
            s.state = PairState::Failed;
            s.reason = Some(r.clone());
        }
        s.peer = self.target.clone();
        s.next_seq = self.next_seq;
        s.acked_seq = self.acked_seq;
        s.epoch = self.cfg.epoch;
        s.log_bytes_used = PARTITION_IDS
            .into_iter()
            .filter(|p| self.parts[*p as usize] != Part::Free)
            .map(|p| self.nvlog.tail(p) as u64)
            .sum();
        s.cache_blocks = self.overlay.len() as u64;
        s.pending_writes = (self.pending.len() + self.waiting.len()) as u64;
        s.baseline_done_bytes = match &self.link {
            LinkState::Up { copy: Some(c), .. } if c.kind == CopyKind::Baseline => c.cursor,
            _ => s.size_bytes,
        };
        (s.resync_done_bytes, s.resync_total_bytes) = match &self.link {
            LinkState::Up { copy: Some(c), .. } if c.kind == CopyKind::Resync => {
                (c.bytes, c.marked * crate::log::REGION_BYTES)
            }
            _ => (0, 0),
        };
        if let Some(m) = &self.changes {
            s.changed_bytes = (m.marked() * crate::log::REGION_BYTES).min(s.size_bytes);
            s.changes_since = m.base().cloned();
        }
        if self.quiesced {
            s.state = PairState::Quiescing;
        }
        s.mirror_current = self.mirror_current();
        s.mirror_acked_seq = self.remote_acked_seq;
        let mut cumulative = 0;
        s.ack_latency_le_us = ACK_LATENCY_BOUNDS_US
            .iter()
            .zip(&self.ack_buckets)
            .map(|(&le, &n)| {
                cumulative += n;
                (le, cumulative)
            })
            .collect();
        s.ack_latency_count = self.ack_buckets.iter().sum();
        s.ack_latency_sum_us = self.ack_sum_us;
        s.local_only_seq = self.local_only_seq;
        s.core = self.core;
        s
    }

    fn force_cp(&mut self, tx: Sender<Result<u64, String>>) {
        let active = self.active;
        let has_entries = self.nvlog.tail(active) > PARTITION_HEADER_BYTES;
        let closing = self.parts.iter().find_map(|p| match p {
            Part::Closing { gen, .. } => Some(*gen),
            _ => None,
        });
        if let LinkState::Fenced(r) = &self.link {
            let _ = tx.send(Err(r.clone()));
            return;
        }
        if has_entries {
            let gen = self.parts[active as usize].gen().expect("active partition has a generation");
            self.cp_waiters.push((gen, tx));
            self.cp_wanted = true;
            self.try_start_cp();
        } else if let Some(gen) = closing {
            self.cp_waiters.push((gen, tx));
        } else {
            let _ = tx.send(Ok(self.stats.last_cp));
        }
    }

    /// Starts mirroring to `target`: a full local flush, then a baseline copy.
    fn attach(&mut self, target: String, peer: Option<String>) -> Result<(), String> {
        match &self.link {
            LinkState::Up { .. } | LinkState::Down { .. } if self.target.as_deref() == Some(&target) => return Ok(()),
            LinkState::Unmirrored => {}
            LinkState::Fenced(r) => return Err(r.clone()),
            _ => return Err(format!("volume is already mirrored to {}", self.target.as_deref().unwrap_or("?"))),
        }
        self.target = Some(target);
        self.cfg.peer = peer;
        // A resume first: a peer that already holds a consistent copy (a returning old
        // primary, made a mirror) is then brought level by a delta resync if the change map
        // allows, and by a baseline otherwise.
        self.set_link(LinkState::Down {
            reason: "attaching".into(),
            next_try: self.clock.now_ns(),
            connecting: false,
            copy: None,
        });
        Ok(())
    }

    // ---- link ----

    fn start_connect(&mut self, copy: Option<CopyKind>) {
        let Some(target) = self.target.clone() else { return };
        if copy.is_some() {
            if let Err(e) = self.full_flush() {
                self.fail_stop(format!("local flush before a copy to the mirror: {e}"));
                return;
            }
        }
        let active = self.active;
        let hello = Hello {
            source_node: self.cfg.node.clone(),
            volume: self.cfg.volume.clone(),
            volume_id: self.cfg.volume_id,
            epoch: self.cfg.epoch,
            volume_bytes: self.device.size(),
            partition_bytes: self.cfg.partition_bytes as u64,
            intent: match copy {
                None => Intent::Resume,
                Some(CopyKind::Baseline) => Intent::Baseline,
                Some(CopyKind::Resync) => Intent::Resync,
            },
            base_seq: self.nvlog.header(active).map_or(self.next_seq, |h| h.first_seq),
            base_cp_gen: self.parts[active as usize].gen().unwrap_or(0),
        };
        if self.inline.is_some() {
            let result = self.connector.connect(&target, &hello);
            return self.on_connected(result);
        }
        let (tx, rx) = bounded(1);
        let connector = self.connector.clone();
        let waker = self.readiness.as_ref().map(Readiness::waker);
        let spawned = thread::Builder::new().name("nvm-connect".into()).spawn(move || {
            let _ = tx.send(connector.connect(&target, &hello));
            if let Some(w) = waker {
                w.wake();
            }
        });
        match spawned {
            Ok(_) => {
                self.connect_rx = Some(rx);
                if let LinkState::Down { connecting, .. } = &mut self.link {
                    *connecting = true;
                }
            }
            Err(e) => self.link_down(format!("spawn connect: {e}")),
        }
    }

    fn reconnect_at(&self) -> u64 {
        self.clock.now_ns().saturating_add(nanos(self.cfg.reconnect_interval))
    }

    fn fail_stop(&mut self, reason: String) {
        eprintln!("volume {}: failed, refusing writes: {reason}", self.cfg.volume);
        self.fail_pending(&reason);
        self.failed = Some(reason);
    }

    /// Writes every cached block to the volume and frees both partitions: the volume then
    /// holds everything, and a baseline can copy it.
    fn full_flush(&mut self) -> io::Result<()> {
        // A local CP being written must land before everything is written over it.
        self.poll_local_cp(true);
        if let Some(why) = &self.failed {
            return Err(eio(why.clone()));
        }
        if !self.tracks_changes() {
            self.fail_pending("mirror is being re-established");
        }
        let all: HashSet<Vbn> = self.dirty.iter().flatten().copied().collect();
        self.overlay.write_blocks(&all, self.device.as_ref())?;
        self.device.flush()?;
        if self.tracks_changes() {
            // Policy sync: pending writes are on the volume now, flushed.
            if !self.pending.is_empty() {
                self.local_only_seq = self.next_seq - 1;
            }
            self.acked_seq = self.next_seq - 1;
            self.complete_acked();
        }
        // The partitions go without the destination's CP: their blocks count as changed.
        for p in PARTITION_IDS {
            let blocks: Vec<Vbn> = self.part_blocks[p as usize].iter().copied().chain(all.iter().copied()).collect();
            self.mark_changed(&blocks)?;
            self.part_blocks[p as usize].clear();
        }
        self.overlay.clear();
        let mut gen = 0;
        for p in PARTITION_IDS {
            self.dirty[p as usize].clear();
            if let Some(g) = self.parts[p as usize].gen() {
                gen = gen.max(g);
                self.nvlog
                    .free_partition(p, Checkpoint { released_cp: g, next_seq: self.next_seq })
                    .map_err(|e| eio(e.to_string()))?;
                self.parts[p as usize] = Part::Free;
            }
        }
        self.stats.last_cp = gen;
        self.acked_seq = self.next_seq - 1;
        self.open_partition(0, gen + 1)?;
        self.last_cp_ns = self.clock.now_ns();
        self.notify_cp_waiters(gen, Ok(gen));
        Ok(())
    }

    fn poll_link(&mut self) -> bool {
        let mut worked = false;
        if let Some(rx) = &self.connect_rx {
            if let Ok(result) = rx.try_recv() {
                self.connect_rx = None;
                self.on_connected(result);
                worked = true;
            }
        }
        while let LinkState::Up { link, .. } = &mut self.link {
            let Some(ev) = link.poll() else { break };
            worked = true;
            match ev {
                LinkEvent::Reply(Reply::Ack { seq }) => {
                    if seq > self.acked_seq && seq < self.next_seq {
                        self.acked_seq = seq;
                    }
                    if seq < self.next_seq {
                        self.remote_acked_seq = self.remote_acked_seq.max(seq);
                    }
                    self.complete_acked();
                }
                LinkEvent::Reply(Reply::CpDone { cp }) => self.on_cp_done(cp),
                LinkEvent::Reply(Reply::BaselineAck) => {
                    let done = match &mut self.link {
                        LinkState::Up { copy, .. } => copy.take(),
                        _ => None,
                    };
                    if let Some(c) = done {
                        // Everything before the copy's first sequence number is in it.
                        self.remote_acked_seq = self.remote_acked_seq.max(c.base_seq.saturating_sub(1));
                        let what = if c.kind == CopyKind::Resync { "delta resync" } else { "baseline" };
                        self.stats.last_copy_kind =
                            Some(if c.kind == CopyKind::Resync { "resync" } else { "baseline" }.into());
                        self.stats.last_copy_bytes = c.bytes;
                        eprintln!(
                            "volume {}: {what} done ({} bytes in {} chunks); mirror in sync",
                            self.cfg.volume, c.bytes, c.chunks
                        );
                        // The change map is relative to this peer's copy from now on.
                        if let (Some(m), Some(peer)) = (&mut self.changes, &self.cfg.peer) {
                            let base = ChangeBase { peer: peer.clone(), cp: c.base_cp_gen.saturating_sub(1) };
                            if c.kind == CopyKind::Baseline {
                                let all = vec![0xff; c.marks.len()];
                                m.rebase(&all, base);
                            } else {
                                m.rebase(&c.marks, base);
                            }
                            if let Err(e) = m.persist() {
                                self.fail_stop(format!("change map: {e}"));
                            }
                        }
                    }
                    // Make the mirror consistent as of a CP.
                    self.cp_wanted = true;
                }
                LinkEvent::Reply(Reply::Refuse { code: RefuseCode::StaleEpoch, reason }) => {
                    self.fence(reason);
                }
                LinkEvent::Reply(Reply::Refuse { reason, .. }) | LinkEvent::Reply(Reply::Error { reason }) => {
                    self.link_down(format!("destination: {reason}"));
                }
                LinkEvent::Closed { reason } => self.link_down(reason),
                LinkEvent::Reply(Reply::LogBytes { partition, offset, bytes }) => {
                    self.on_log_bytes(partition, offset, bytes);
                }
                LinkEvent::Reply(Reply::LogFetchEnd { partition, tail }) => self.on_log_fetch_end(partition, tail),
                // Set-up replies are consumed by the RDMA engine's connect.
                LinkEvent::Reply(other @ (Reply::RdmaListen { .. } | Reply::RdmaRegions { .. })) => {
                    self.link_down(format!("unexpected reply after set-up: {other:?}"));
                }
            }
        }
        worked
    }

    fn fence(&mut self, reason: String) {
        let msg = format!("fenced: the mirror was failed over ({reason}); this node no longer accepts writes");
        eprintln!("volume {}: {msg}", self.cfg.volume);
        if let LinkState::Up { link, .. } = &mut self.link {
            link.close();
        }
        self.set_link(LinkState::Fenced(msg.clone()));
        self.fail_pending(&msg);
        for (_, tx) in self.cp_waiters.drain(..) {
            let _ = tx.send(Err(msg.clone()));
        }
    }

    fn link_down(&mut self, reason: String) {
        // A log fetch under way starts over on the next connection.
        self.catch_up = None;
        if matches!(self.link, LinkState::Fenced(_) | LinkState::Unmirrored) {
            return;
        }
        let copy = match &mut self.link {
            LinkState::Up { link, copy } => {
                link.close();
                copy.as_ref().map(|c| c.kind)
            }
            LinkState::Down { copy, .. } => *copy,
            _ => None,
        };
        eprintln!("volume {}: mirror link down: {reason}", self.cfg.volume);
        self.set_link(LinkState::Down {
            reason: reason.clone(),
            next_try: self.reconnect_at(),
            connecting: false,
            copy,
        });
        if self.tracks_changes() {
            // Policy sync: what was sent and not acknowledged completes once persistent
            // here (the next batch flush), and a resume or a resync brings it over later.
            for p in PARTITION_IDS {
                self.maybe_release(p);
            }
        } else {
            self.fail_pending(&format!("mirror link down ({reason}); policy strict"));
        }
    }

    fn fail_pending(&mut self, why: &str) {
        let pending: Vec<Pending> = self.pending.drain(..).collect();
        for p in pending {
            self.stats.write_errors += 1;
            self.answer(p.done, Err(eio(why.to_string())));
        }
    }

    fn on_connected(&mut self, result: ConnectResult<C::Link>) {
        let copy = match self.link {
            LinkState::Down { copy, .. } => copy,
            _ => None,
        };
        let (mut link, welcome) = match result {
            Ok(x) => x,
            Err(ConnectError::Refused { code: RefuseCode::StaleEpoch, reason, .. }) => return self.fence(reason),
            Err(ConnectError::Refused { code: RefuseCode::Mismatch, reason, .. })
                if copy != Some(CopyKind::Baseline) =>
            {
                eprintln!("volume {}: {reason}; starting a baseline", self.cfg.volume);
                self.set_link(LinkState::Down {
                    reason,
                    next_try: self.clock.now_ns(),
                    connecting: false,
                    copy: Some(CopyKind::Baseline),
                });
                return;
            }
            Err(e) => {
                self.link =
                    LinkState::Down { reason: e.to_string(), next_try: self.reconnect_at(), connecting: false, copy };
                return;
            }
        };
        if welcome.epoch > self.cfg.epoch {
            link.close();
            return self.fence(format!("destination is at epoch {}", welcome.epoch));
        }
        // SAFETY: the NVLog's memory is mapped for the poller's life, and the link is
        // dropped first (field order) or replaced when it goes down. Entry bytes are sent
        // only from a partition's written part, which changes only when the partition is
        // freed: after the destination's CpDone for it (which follows the completion of
        // every placement before the CP), or with the link down (dropped).
        unsafe { link.offer_source_memory(self.nvlog.memory()) };
        if let Some(kind) = copy {
            let active = self.active;
            let header = self.nvlog.header(active).expect("active partition open");
            // The active partition is fresh (full flush) and writes went on into it only
            // through this link from here.
            self.unsent[active as usize] = PARTITION_HEADER_BYTES;
            let r = link.send(&Message::PartitionOpen { header: header.encode() }).and_then(|()| link.flush());
            if let Err(e) = r {
                return self.link_down(format!("copy start: {e}"));
            }
            let marks = self.changes.as_ref().map(ChangeMap::snapshot).unwrap_or_default();
            let marked: u64 = marks.iter().map(|b| u64::from(b.count_ones())).sum();
            let target = self.target.as_deref().unwrap_or("?");
            match kind {
                CopyKind::Baseline => eprintln!(
                    "volume {}: mirroring to {target}: baseline copy of {} bytes",
                    self.cfg.volume,
                    self.device.size()
                ),
                CopyKind::Resync => eprintln!(
                    "volume {}: mirroring to {target}: delta resync of {marked} regions ({} bytes at most)",
                    self.cfg.volume,
                    marked * crate::log::REGION_BYTES
                ),
            }
            let base_cp_gen = header.cp_gen;
            let base_seq = header.first_seq;
            self.confirmed = true;
            // The mirror is rebuilt from this volume: no copy of it can fill in the log.
            self.damaged_at = [None; PARTITIONS];
            self.set_link(LinkState::Up {
                link,
                copy: Some(Copying {
                    kind,
                    cursor: 0,
                    marks,
                    marked,
                    bytes: 0,
                    chunks: 0,
                    done_sent: false,
                    done_ns: 0,
                    base_cp_gen,
                    base_seq,
                    started_ns: self.clock.now_ns(),
                }),
            });
            return;
        }
        match self.resume(&mut link, &welcome) {
            Ok(Resumed::Lost(why)) => {
                link.close();
                self.lost_to_mirror(why);
            }
            Ok(how) => {
                if matches!(how, Resumed::Done) {
                    eprintln!("volume {}: mirror link resumed", self.cfg.volume);
                }
                self.confirmed = true;
                self.set_link(LinkState::Up { link, copy: None });
            }
            Err(why) => {
                link.close();
                let next = if self.can_resync(&welcome) { CopyKind::Resync } else { CopyKind::Baseline };
                let what = if next == CopyKind::Resync { "a delta resync" } else { "a baseline" };
                eprintln!("volume {}: cannot resume ({why}); starting {what}", self.cfg.volume);
                self.link =
                    LinkState::Down { reason: why, next_try: self.clock.now_ns(), connecting: false, copy: Some(next) };
            }
        }
    }

    /// Brings the destination's logs level with ours after a reconnect: resends what it
    /// lacks, re-opens logs that diverged, re-sends an unfinished CP.
    fn resume(&mut self, link: &mut C::Link, w: &Welcome) -> Result<Resumed, String> {
        if !w.consistent {
            return Err("mirror has no complete baseline".into());
        }
        let mut held: Vec<(u8, u64)> =
            PARTITION_IDS.into_iter().filter_map(|p| self.parts[p as usize].gen().map(|g| (p, g))).collect();
        held.sort_by_key(|h| h.1);
        // First, before anything is sent or copied: where the mirror holds more of a
        // partition than this node's log (a restart found the log cut short: a torn last
        // batch, or an entry that no longer passes its checksum), what the mirror holds
        // was persistent there, and may have been acknowledged. It is fetched back.
        for &(p, gen) in &held {
            let ours = self.nvlog.header(p).expect("held partition has a header");
            let theirs = w.logs[p as usize];
            let tail = self.nvlog.tail(p);
            if theirs.open && theirs.cp_gen == gen && theirs.first_seq == ours.first_seq && usize_of(theirs.tail) > tail
            {
                eprintln!(
                    "volume {}: NVLog partition {p} ends at offset {tail} here, the mirror's at {}: fetching the \
                     rest from the mirror",
                    self.cfg.volume, theirs.tail
                );
                let send_err = |e: crate::transport::LinkError| e.to_string();
                link.send(&Message::LogFetch { partition: p, offset: tail as u64 }).map_err(send_err)?;
                link.flush().map_err(send_err)?;
                self.catch_up = Some(CatchUp {
                    partition: p,
                    from: tail,
                    bytes: Vec::new(),
                    welcome: w.clone(),
                    started_ns: self.clock.now_ns(),
                });
                return Ok(Resumed::CatchingUp);
            }
        }
        let oldest = held.first().map(|h| h.1).unwrap_or(w.applied_cp + 1);
        if w.applied_cp + 1 < oldest {
            return Err(format!("destination applied CP {}, but our log starts at CP {oldest}", w.applied_cp));
        }
        self.remote_acked_seq = self.remote_acked_seq.max(w.applied_seq);
        let send_err = |e: crate::transport::LinkError| e.to_string();
        // Whether the mirror holds every entry of the partitions looked at so far: what it
        // holds of a later one counts as acknowledged only then (an entry frame of the
        // older one may have been lost on a link that carried on).
        let mut whole_so_far = true;
        for (p, gen) in held {
            if let Part::Closing { remote_done: false, .. } = self.parts[p as usize] {
                if w.applied_cp >= gen {
                    if let Some(seq) = self.damaged_at[p as usize].filter(|&s| s <= w.applied_seq) {
                        // The mirror applied this partition's CP, entries this node could
                        // not read back included: they are on the mirror only now.
                        return Ok(Resumed::Lost(format!(
                            "NVLog partition {p} is damaged from sequence {seq} on (see the recovery message), and \
                             the mirror applied its CP up to {}: writes acknowledged past {} are on the mirror only. \
                             Fail over to the mirror, then resync this node from it (`nvmirror ctl resync VOLUME --from NEW_PRIMARY`, run here)",
                            w.applied_seq,
                            seq.saturating_sub(1)
                        )));
                    }
                    self.mark_remote_done(p);
                    continue;
                }
            }
            let ours = self.nvlog.header(p).expect("held partition has a header");
            let theirs = w.logs[p as usize];
            let tail = self.nvlog.tail(p);
            let same = theirs.open && theirs.cp_gen == gen && theirs.first_seq == ours.first_seq;
            // Continue from their tail where it is a prefix of ours; otherwise start their
            // log over from our partition's start.
            let from = if same
                && usize_of(theirs.tail) <= tail
                && self.nvlog_seq_at(p, usize_of(theirs.tail)) == Some(theirs.next_seq)
            {
                // What the destination holds of this log is persistent there (it persists
                // what it finds before it welcomes): acknowledged, in effect, where it
                // holds everything before it too.
                if whole_so_far {
                    self.remote_acked_seq = self.remote_acked_seq.max(theirs.next_seq.saturating_sub(1));
                }
                usize_of(theirs.tail)
            } else {
                link.send(&Message::PartitionOpen { header: ours.encode() }).map_err(send_err)?;
                PARTITION_HEADER_BYTES
            };
            if from < tail {
                whole_so_far = false;
            }
            self.unsent[p as usize] = from;
            send_range(&self.nvlog, &mut self.unsent[p as usize], p, link)?;
            if let Part::Closing { upto_seq, remote_done: false, .. } = self.parts[p as usize] {
                link.send(&Message::Cp { cp: gen, partition: p, upto_seq, by_value: false }).map_err(send_err)?;
                self.cp_sent_ns = self.clock.now_ns();
            }
        }
        link.flush().map_err(send_err)?;
        // The log is whole again, wherever recovery found it cut.
        self.damaged_at = [None; PARTITIONS];
        Ok(Resumed::Done)
    }

    /// Takes log bytes the mirror sent back (see [`CatchUp`]).
    fn on_log_bytes(&mut self, partition: u8, offset: u64, bytes: Vec<u8>) {
        let ok = self.catch_up.as_mut().is_some_and(|c| {
            let expected = c.from + c.bytes.len();
            let fits = expected + bytes.len() <= self.cfg.partition_bytes;
            if c.partition == partition && offset == expected as u64 && fits {
                c.bytes.extend_from_slice(&bytes);
                true
            } else {
                false
            }
        });
        if !ok {
            self.catch_up = None;
            self.link_down(format!("log bytes of partition {partition} at offset {offset} that were not asked for"));
        }
    }

    /// The mirror sent all it holds of the partition: checks the bytes entry by entry,
    /// appends them to this node's log as its own, and goes on with the resume.
    fn on_log_fetch_end(&mut self, partition: u8, tail: u64) {
        let Some(c) = self.catch_up.take() else {
            return self.link_down("the end of a log fetch nobody asked for".into());
        };
        if c.partition != partition || tail != (c.from + c.bytes.len()) as u64 {
            return self.link_down(format!(
                "log fetch of partition {partition} ended at {tail}, after {} bytes from {}",
                c.bytes.len(),
                c.from
            ));
        }
        if let Err(why) = self.append_fetched(&c) {
            // Bytes that do not continue this node's log: nothing is taken from them, and
            // nothing is sent over the mirror's log either.
            if let LinkState::Up { link, .. } = &mut self.link {
                link.close();
            }
            return self.lost_to_mirror(format!(
                "the mirror's log of partition {partition} from offset {} does not continue this node's ({why}); \
                 its entries may hold acknowledged writes: fail over to the mirror, then resync this node from it (`nvmirror ctl resync VOLUME --from NEW_PRIMARY`, run here)",
                c.from
            ));
        }
        let LinkState::Up { mut link, copy } = std::mem::replace(&mut self.link, LinkState::Unmirrored) else {
            unreachable!("a log fetch is answered on a link that is up")
        };
        let r = self.resume(&mut link, &c.welcome);
        // Put back as it was (still registered for readiness): not through `set_link`.
        self.link = LinkState::Up { link, copy };
        match r {
            Ok(Resumed::Done) => eprintln!("volume {}: mirror link resumed", self.cfg.volume),
            Ok(Resumed::CatchingUp) => {}
            Ok(Resumed::Lost(why)) => {
                if let LinkState::Up { link, .. } = &mut self.link {
                    link.close();
                }
                self.lost_to_mirror(why);
            }
            Err(why) => self.link_down(format!("resume after a log fetch: {why}")),
        }
    }

    /// The mirror holds acknowledged writes this node lost: the volume takes no more writes
    /// and no longer connects (a copy from here would overwrite them); failover is the way
    /// on, as after a fence.
    fn lost_to_mirror(&mut self, why: String) {
        self.fail_stop(why.clone());
        self.set_link(LinkState::Fenced(why));
    }

    /// Appends entries fetched from the mirror to partition `c.partition` after checking
    /// each (checksum, volume, partition, epoch, consecutive sequence numbers from where
    /// this node's log ends), and applies them to the cache as recovery would have.
    fn append_fetched(&mut self, c: &CatchUp) -> Result<(), String> {
        let p = c.partition;
        let ph = self.nvlog.header(p).ok_or("the partition is not held here")?;
        let mut seq = self.nvlog_seq_at(p, c.from).ok_or("where this log ends is not an entry boundary")?;
        let first = seq;
        let mut entries: Vec<(EntryHeader, usize)> = Vec::new();
        let mut at = 0usize;
        while at < c.bytes.len() {
            let (h, _) = EntryHeader::decode(&c.bytes[at..]).map_err(|e| format!("at offset {}: {e}", c.from + at))?;
            let what = if h.seq != seq {
                Some(format!("sequence {} where {seq} was expected", h.seq))
            } else if h.volume_id != self.cfg.volume_id || h.partition != p || h.epoch != ph.epoch {
                Some("an entry of another volume, partition or epoch".to_string())
            } else if at + h.footprint() > c.bytes.len() {
                Some("a truncated entry".to_string())
            } else {
                None
            };
            if let Some(what) = what {
                return Err(format!("at offset {}: {what}", c.from + at));
            }
            entries.push((h, at));
            at += h.footprint();
            seq += 1;
        }
        for (h, at) in &entries {
            let data = &c.bytes[at + crate::format::ENTRY_HEADER_BYTES..at + h.footprint()][..h.data_len as usize];
            if !self.nvlog.fits(p, data.len()) {
                return Err("more than the partition holds".into());
            }
            self.nvlog.append(h, data).map_err(|e| e.to_string())?;
        }
        self.nvlog.persist(p).map_err(|e| e.to_string())?;
        // What this node's log held past the damaged entry (never on the mirror, so never
        // acknowledged) must not read as following the fetched entries after a crash.
        self.nvlog.end_at_tail(p).map_err(|e| e.to_string())?;
        let last = seq - 1;
        self.next_seq = self.next_seq.max(seq);
        // Persistent on both sites: acknowledged, in effect.
        self.acked_seq = self.acked_seq.max(last);
        self.remote_acked_seq = self.remote_acked_seq.max(last);
        self.unsent[p as usize] = self.nvlog.tail(p);
        if let Part::Closing { gen, .. } = self.parts[p as usize] {
            self.parts[p as usize] = Part::Closing { gen, upto_seq: last, remote_done: false, local_done: false };
        }
        // The cache was built from the entries recovery could read; entries of the newer
        // partition were applied on blocks that lacked these (a partial write keeps the
        // rest of its block). Built again from the whole log, in sequence order, as
        // recovery builds it, and the closing partition's local CP written again.
        self.rebuild_cache_from_log().map_err(|e| format!("rebuild the cache: {e}"))?;
        self.stats.log_entries_fetched += entries.len() as u64;
        eprintln!(
            "volume {}: the mirror's copy served {} entries of NVLog partition {p} (sequence {first} to {last}) that \
             this node's log lacked after its restart",
            self.cfg.volume,
            entries.len()
        );
        Ok(())
    }

    /// Builds the cache (overlay, dirty and logged blocks per partition) again from the
    /// held partitions' entries in sequence order, and writes a closing partition's local
    /// CP again: after entries were added behind a later partition's back (a log fetch).
    fn rebuild_cache_from_log(&mut self) -> io::Result<()> {
        let device = self.device.clone();
        let _redo = RedoGuard::new(device.as_ref());
        self.overlay.clear();
        let mut held: Vec<(u8, u64)> =
            PARTITION_IDS.into_iter().filter_map(|p| self.parts[p as usize].gen().map(|g| (p, g))).collect();
        held.sort_by_key(|h| h.1);
        for &(p, _) in &held {
            self.dirty[p as usize].clear();
            // Only up to the log's tail: past it may lie entries of the timeline a restart
            // cut short (persisted here, never on the mirror, so never acknowledged).
            let tail = self.nvlog.tail(p);
            let scan = crate::format::scan_partition(self.nvlog.partition(p), p);
            for e in scan.entries.iter().filter(|e| e.at < tail) {
                let bytes = self.nvlog.partition(p);
                let (eh, data) = EntryHeader::decode(&bytes[e.at..]).map_err(|e| eio(e.to_string()))?;
                self.overlay.apply(&eh, data, device.as_ref(), &mut self.dirty[p as usize])?;
            }
            self.part_blocks[p as usize] = self.dirty[p as usize].clone();
        }
        for &(p, _) in &held {
            if matches!(self.parts[p as usize], Part::Closing { .. }) {
                self.local_cp(p)?;
            }
        }
        Ok(())
    }

    /// The sequence number of the entry at `offset` of partition `p` (or the next one, at
    /// the tail); `None` when `offset` is not an entry boundary.
    fn nvlog_seq_at(&self, p: u8, offset: usize) -> Option<u64> {
        let h = self.nvlog.header(p)?;
        let mut at = PARTITION_HEADER_BYTES;
        let mut seq = h.first_seq;
        let tail = self.nvlog.tail(p);
        while at < offset && at < tail {
            at = self.nvlog.cut(p, at, 0);
            seq += 1;
        }
        (at == offset).then_some(seq)
    }

    // ---- CPs ----

    fn try_start_cp(&mut self) {
        // The log stays as recovery found it until the mirror has said how far it holds
        // it (a CP would close a partition the mirror may have to fill in).
        if self.held_for_mirror_log() {
            return;
        }
        let other = 1 - self.active;
        if self.parts[other as usize] != Part::Free {
            return;
        }
        if matches!(self.link, LinkState::Fenced(_)) {
            self.cp_wanted = false;
            return;
        }
        let active = self.active;
        if self.nvlog.tail(active) <= PARTITION_HEADER_BYTES {
            self.cp_wanted = false;
            return;
        }
        self.cp_wanted = false;
        // Everything of the closing partition goes out before its CP message.
        self.flush_batch();
        let gen = self.parts[active as usize].gen().expect("active");
        let upto_seq = self.next_seq - 1;
        self.cp_started_ns = self.clock.now_ns();
        self.parts[active as usize] = Part::Closing { gen, upto_seq, remote_done: false, local_done: false };
        if let Err(e) = self.open_partition(other, gen + 1) {
            return self.fail_stop(format!("open partition {other}: {e}"));
        }
        // By value: the closed partition's blocks as they are now, before any write of the
        // new partition can change them.
        let by_value = match (&self.link, self.cfg.cp_by_value) {
            (LinkState::Up { .. }, true) => match self.cp_blocks(active) {
                Ok(b) => b,
                Err(e) => return self.fail_stop(format!("CP {gen}: read blocks: {e}")),
            },
            _ => None,
        };
        // The local half runs on the CP writer thread, from a copy of the blocks: this
        // thread goes on taking writes into the new partition meanwhile.
        if let Err(e) = self.start_local_cp(active, gen) {
            return self.fail_stop(format!("CP {gen}: local volume: {e}"));
        }
        self.last_cp_ns = self.clock.now_ns();
        self.cp_sent_ns = self.last_cp_ns;
        match &mut self.link {
            LinkState::Unmirrored => {}
            LinkState::Up { link, .. } => {
                let mut r = Ok(());
                for (offset, data) in by_value.iter().flatten() {
                    r = r.and_then(|()| {
                        link.send(&Message::BlockData { purpose: BlockPurpose::CpByValue, offset: *offset, data })
                    });
                }
                let r = r
                    .and_then(|()| {
                        link.send(&Message::Cp { cp: gen, partition: active, upto_seq, by_value: by_value.is_some() })
                    })
                    .and_then(|()| link.flush());
                if let Err(e) = r {
                    self.link_down(format!("send CP: {e}"));
                }
            }
            // Sent on resume.
            LinkState::Down { .. } | LinkState::Fenced(_) => {}
        }
    }

    /// The current contents of partition `p`'s dirty blocks, in runs of adjacent blocks, for
    /// a CP by value; `None` (by reference instead) when they exceed what the destination
    /// accepts by value (twice the partition size).
    fn cp_blocks(&self, p: u8) -> io::Result<Option<BlockRuns>> {
        const RUN_BLOCKS_MAX: u64 = (ENTRY_DATA_MAX / BLOCK_BYTES) as u64;
        let dirty = &self.dirty[p as usize];
        if dirty.len() * BLOCK_BYTES > 2 * self.cfg.partition_bytes {
            return Ok(None);
        }
        let mut sorted: Vec<Vbn> = dirty.iter().copied().collect();
        sorted.sort_unstable();
        let mut runs: Vec<(Vbn, u64)> = Vec::new();
        for vbn in sorted {
            match runs.last_mut() {
                Some((start, n)) if *start + *n == vbn && *n < RUN_BLOCKS_MAX => *n += 1,
                _ => runs.push((vbn, 1)),
            }
        }
        let mut out = Vec::with_capacity(runs.len());
        for (start, n) in runs {
            let mut buf = vec![0u8; usize_of(n) * BLOCK_BYTES];
            let offset = start * BLOCK_BYTES as u64;
            self.overlay.read(&mut buf, offset, self.device.as_ref())?;
            out.push((offset, buf));
        }
        Ok(Some(out))
    }

    /// Writes partition `p`'s dirty blocks to the local volume and flushes it, here and
    /// now (recovery; the asynchronous path is [`Self::start_local_cp`]).
    fn local_cp(&mut self, p: u8) -> io::Result<()> {
        let dirty = std::mem::take(&mut self.dirty[p as usize]);
        self.overlay.write_blocks(&dirty, self.device.as_ref())?;
        self.device.flush()?;
        self.overlay.release(&dirty, p);
        if let Part::Closing { local_done, .. } = &mut self.parts[p as usize] {
            *local_done = true;
        }
        Ok(())
    }

    /// Hands a copy of partition `p`'s dirty blocks to the CP writer thread.
    fn start_local_cp(&mut self, p: u8, gen: u64) -> io::Result<()> {
        // One local CP at a time: the next CP needs this partition free, which needs this
        // one done.
        assert!(self.local_cp_inflight.is_none(), "a local CP is already being written");
        let dirty = std::mem::take(&mut self.dirty[p as usize]);
        let image = self.overlay.snapshot(&dirty);
        self.cp_jobs
            .send(CpJob { partition: p, gen, image })
            .map_err(|_| eio("the CP writer thread is gone".into()))?;
        self.local_cp_inflight = Some((p, gen, dirty));
        self.inline_job_step = self.steps;
        Ok(())
    }

    /// Takes the CP writer's answer, waiting for it when `wait`; returns whether one came.
    fn poll_local_cp(&mut self, wait: bool) -> bool {
        if self.local_cp_inflight.is_none() {
            return false;
        }
        if let Some((jobs, done)) = &self.inline {
            // Stepped: the job runs here, a step after the one that queued it (or at once
            // when waited for).
            if wait || self.steps > self.inline_job_step {
                if let Ok(job) = jobs.try_recv() {
                    let _ = done.send(write_cp_job(self.device.as_ref(), &job));
                }
            }
        }
        let done =
            if wait { self.cp_done.recv().map_err(|_| TryRecvError::Disconnected) } else { self.cp_done.try_recv() };
        let done = match done {
            Ok(d) => d,
            Err(TryRecvError::Empty) => return false,
            Err(TryRecvError::Disconnected) => {
                self.local_cp_inflight = None;
                self.fail_stop("the CP writer thread is gone".into());
                return true;
            }
        };
        let Some((p, gen, dirty)) = self.local_cp_inflight.take() else { return true };
        assert_eq!((done.partition, done.gen), (p, gen), "CP writer answered another CP");
        if let Err(e) = done.result {
            self.fail_stop(format!("CP {gen}: local volume: {e}"));
            return true;
        }
        self.stats.last_local_cp_us = done.micros;
        // The blocks whose newest write is in `p` are on the volume now; those rewritten
        // since (in the active partition) stay cached.
        self.overlay.release(&dirty, p);
        if let Part::Closing { local_done, .. } = &mut self.parts[p as usize] {
            *local_done = true;
        }
        self.maybe_release(p);
        true
    }

    /// Frees partition `p` if both halves of its CP are done (the local one alone while
    /// unmirrored).
    fn maybe_release(&mut self, p: u8) {
        // Unmirrored, or policy sync with the mirror away: the partition goes on the local
        // half alone, its blocks marked in the change map.
        let alone = matches!(self.link, LinkState::Unmirrored)
            || (self.tracks_changes() && !matches!(self.link, LinkState::Up { .. }) && !self.held_for_mirror_log());
        if let Part::Closing { local_done: true, remote_done, .. } = self.parts[p as usize] {
            if remote_done || alone {
                if let Err(e) = self.release(p) {
                    self.fail_stop(format!("release partition {p}: {e}"));
                }
            }
        }
    }

    fn mark_remote_done(&mut self, p: u8) {
        if let Part::Closing { remote_done, .. } = &mut self.parts[p as usize] {
            *remote_done = true;
        }
        self.maybe_release(p);
    }

    fn on_cp_done(&mut self, cp: u64) {
        let p = PARTITION_IDS
            .into_iter()
            .find(|p| matches!(self.parts[*p as usize], Part::Closing { gen, .. } if gen == cp));
        if let Some(p) = p {
            self.mark_remote_done(p);
        }
    }

    /// Frees a partition whose CP is durable on both sites.
    fn release(&mut self, p: u8) -> io::Result<()> {
        let Part::Closing { gen, upto_seq, remote_done, .. } = self.parts[p as usize] else { return Ok(()) };
        let blocks = std::mem::take(&mut self.part_blocks[p as usize]);
        if !remote_done {
            let blocks: Vec<Vbn> = blocks.into_iter().collect();
            self.mark_changed(&blocks)?;
        }
        self.nvlog
            .free_partition(p, Checkpoint { released_cp: gen, next_seq: upto_seq + 1 })
            .map_err(|e| eio(e.to_string()))?;
        self.parts[p as usize] = Part::Free;
        self.stats.cps += 1;
        self.stats.last_cp = gen;
        self.stats.last_cp_unix_ms = self.clock.unix_ms();
        self.stats.last_cp_duration_us = self.clock.now_ns().saturating_sub(self.cp_started_ns) / 1000;
        self.notify_cp_waiters(gen, Ok(gen));
        Ok(())
    }

    fn notify_cp_waiters(&mut self, upto_gen: u64, r: Result<u64, String>) {
        let mut keep = Vec::new();
        for (g, tx) in self.cp_waiters.drain(..) {
            if g <= upto_gen {
                let _ = tx.send(r.clone());
            } else {
                keep.push((g, tx));
            }
        }
        self.cp_waiters = keep;
    }

    // ---- I/O ----

    fn poll_io(&mut self) -> bool {
        let mut worked = false;
        // Writes waiting for log space go first, in order; the mirror may have gone away
        // while they waited.
        while let Some(mut w) = self.waiting.pop_front() {
            if let Some(e) = self.write_refusal() {
                self.stats.write_errors += 1;
                if let Some(to) = w.done.take() {
                    self.answer(to, Err(e));
                }
                worked = true;
                continue;
            }
            match self.log_write(&mut w) {
                Ok(true) => {
                    worked = true;
                }
                Ok(false) => {
                    self.waiting.push_front(w);
                    return worked;
                }
                Err(e) => {
                    self.stats.write_errors += 1;
                    if let Some(to) = w.done.take() {
                        self.answer(to, Err(e));
                    }
                    worked = true;
                }
            }
        }
        for _ in 0..BATCH_MAX {
            // Nothing new during a switchover's drain, nor while the log waits for the
            // mirror's copy (see `held_for_mirror_log`).
            if self.quiesced || self.held_for_mirror_log() {
                break;
            }
            let Ok((request, done)) = self.io_rx.try_recv() else { break };
            worked = true;
            self.handle(request, done);
            if !self.waiting.is_empty() {
                break;
            }
        }
        worked
    }

    /// Counts the time writes wait for log space: from when the first of them had to wait
    /// to when none waits.
    fn account_log_wait(&mut self) {
        match (self.waiting.is_empty(), self.log_full_since) {
            (false, None) => {
                self.log_full_since = Some(self.clock.now_ns());
                self.stats.log_full_waits += 1;
            }
            (true, Some(since)) => {
                self.log_full_since = None;
                self.stats.log_full_wait_us += self.clock.now_ns().saturating_sub(since) / 1000;
            }
            _ => {}
        }
    }

    fn write_refusal(&self) -> Option<io::Error> {
        if let Some(r) = &self.failed {
            return Some(eio(format!("volume failed: {r}")));
        }
        match &self.link {
            LinkState::Fenced(r) => Some(eio(r.clone())),
            LinkState::Down { .. } if self.tracks_changes() && self.confirmed => None,
            LinkState::Down { reason, .. } if self.tracks_changes() => Some(eio(format!(
                "mirror link down ({reason}); policy sync goes on alone only once the mirror has confirmed this \
                 node's epoch since it started"
            ))),
            LinkState::Down { reason, .. } => {
                Some(eio(format!("mirror link down ({reason}); policy strict refuses writes")))
            }
            _ => None,
        }
    }

    /// Serves a request submitted through the handle.
    fn handle(&mut self, request: IoRequest, done: Completer) {
        match request {
            IoRequest::Read { offset, len } => {
                let mut buf = vec![0u8; len as usize];
                let r = self.overlay.read(&mut buf, offset, self.device.as_ref()).map(|()| Some(buf));
                done.complete(r);
            }
            // Every acknowledged write is already persistent on both sites.
            IoRequest::Flush => done.complete(Ok(None)),
            IoRequest::Write { offset, data, .. } => {
                self.mutate(EntryKind::Write, offset, data.len() as u64, &data, ReplyTo::Submitter(done));
            }
            IoRequest::Trim { offset, len } => {
                self.mutate(EntryKind::Trim, offset, u64::from(len), &[], ReplyTo::Submitter(done));
            }
            IoRequest::WriteZeroes { offset, len, .. } => {
                self.mutate(EntryKind::WriteZeroes, offset, u64::from(len), &[], ReplyTo::Submitter(done));
            }
        }
    }

    /// Logs as much of a waiting mutation as fits. `Ok(true)`: all of it is logged and its
    /// completion is pending; `Ok(false)`: it waits for log space.
    fn log_write(&mut self, w: &mut Waiting) -> io::Result<bool> {
        let (kind, offset, len, data): (_, _, _, &[u8]) = match &w.request {
            IoRequest::Write { offset, data, .. } => (EntryKind::Write, *offset, data.len() as u64, data),
            IoRequest::Trim { offset, len } => (EntryKind::Trim, *offset, u64::from(*len), &[]),
            IoRequest::WriteZeroes { offset, len, .. } => (EntryKind::WriteZeroes, *offset, u64::from(*len), &[]),
            _ => unreachable!("only mutations are logged"),
        };
        if !self.log_pieces(kind, offset, len, data, &mut w.progress)? {
            return Ok(false);
        }
        let to = w.done.take().expect("a logged write is completed once");
        self.logged(len, to);
        Ok(true)
    }

    /// Appends the entries of a mutation from `*progress` on, as far as log space goes.
    /// `data` is a write's payload (empty for the other kinds). `Ok(true)`: all of it is
    /// logged.
    fn log_pieces(
        &mut self,
        kind: EntryKind,
        offset: u64,
        len: u64,
        data: &[u8],
        progress: &mut u64,
    ) -> io::Result<bool> {
        crate::storage::check_range(self.device.size(), offset, len)?;
        while *progress < len {
            let at = offset + *progress;
            let piece = if kind == EntryKind::Write {
                let boundary = (at / ENTRY_DATA_MAX as u64 + 1) * ENTRY_DATA_MAX as u64;
                boundary.min(offset + len) - at
            } else {
                len - *progress
            };
            let data_len = if kind == EntryKind::Write { usize_of(piece) } else { 0 };
            if !self.nvlog.fits(self.active, data_len) {
                self.cp_wanted = true;
                self.try_start_cp();
                if !self.nvlog.fits(self.active, data_len) {
                    return Ok(false);
                }
            }
            let header = EntryHeader {
                kind,
                partition: self.active,
                volume_id: self.cfg.volume_id,
                epoch: self.cfg.epoch,
                seq: self.next_seq,
                offset: at,
                length: u32::try_from(piece).expect("pieces are below 4 GiB"),
                data_len: u32::try_from(data_len).expect("entry data below 1 MiB"),
            };
            let data: &[u8] = if kind == EntryKind::Write {
                let s = usize_of(*progress);
                &data[s..s + data_len]
            } else {
                &[]
            };
            self.nvlog.append(&header, data).map_err(|e| eio(e.to_string()))?;
            self.pass_entries += 1;
            let active = self.active as usize;
            self.overlay.apply(&header, data, self.device.as_ref(), &mut self.dirty[active])?;
            let first = header.offset / BLOCK_BYTES as u64;
            let last = (header.offset + u64::from(header.length)).div_ceil(BLOCK_BYTES as u64);
            self.part_blocks[active].extend(first..last);
            self.next_seq += 1;
            *progress += piece;
        }
        Ok(true)
    }

    /// A mutation of `len` bytes is logged whole: its answer waits for the ack covering
    /// its last entry (an empty one is answered at once).
    fn logged(&mut self, len: u64, to: ReplyTo) {
        if len == 0 {
            return self.answer(to, Ok(()));
        }
        self.stats.writes += 1;
        self.stats.bytes_written += len;
        if self.overlay.len() > self.cfg.cache_blocks_max {
            self.cp_wanted = true;
        }
        let now = self.clock.now_ns();
        let delay_ns = self.throttle_delay_us() * 1000;
        if delay_ns > 0 {
            self.admit_at_ns = self.admit_at_ns.max(now) + delay_ns;
            self.stats.throttled_writes += 1;
            self.stats.throttle_us += delay_ns / 1000;
        }
        self.pending.push_back(Pending { last_seq: self.next_seq - 1, sent_ns: now, done: to });
    }

    /// How long the write just logged delays the next client request (see
    /// [`THROTTLE_START_FILL`]): nothing while the other partition is free.
    fn throttle_delay_us(&self) -> u64 {
        let other = 1 - self.active;
        if self.parts[other as usize] == Part::Free {
            return 0;
        }
        let used = self.nvlog.tail(self.active) as f64;
        let f = (used / self.cfg.partition_bytes as f64).min(0.999);
        if f <= THROTTLE_START_FILL {
            return 0;
        }
        let us = THROTTLE_SCALE_US * (f - THROTTLE_START_FILL) / (1.0 - f);
        // A finite, non-negative float below the cap: the cast keeps its integer part.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let us = us.min(THROTTLE_DELAY_MAX_US as f64) as u64;
        us
    }

    /// Whether requests wait for the mirror's copy of the log: recovery found a partition
    /// cut short (a torn last batch, or an entry whose memory changed), and until the
    /// mirror has said how far it holds that partition, a read could miss a write it
    /// acknowledged. Until the first resume; while a log fetch runs.
    pub(super) fn held_for_mirror_log(&self) -> bool {
        self.catch_up.is_some()
            || (self.damaged_at.iter().any(Option::is_some)
                && !matches!(self.link, LinkState::Unmirrored | LinkState::Fenced(_)))
    }

    /// Whether the write throttle holds new client requests back now.
    pub(super) fn throttled(&self) -> bool {
        self.admit_at_ns > self.clock.now_ns()
    }

    /// Persists and sends what the last requests logged, then completes what is durable.
    fn flush_batch(&mut self) -> bool {
        let mut worked = false;
        let mut order: Vec<u8> = PARTITION_IDS.into_iter().filter(|p| self.parts[*p as usize] != Part::Free).collect();
        order.sort_by_key(|p| self.parts[*p as usize].gen());
        for p in order {
            if self.unsent[p as usize] >= self.nvlog.tail(p) {
                continue;
            }
            worked = true;
            if let Err(e) = self.nvlog.persist(p) {
                self.fail_stop(format!("NVLog persist: {e}"));
                return true;
            }
            match &mut self.link {
                LinkState::Up { link, .. } => {
                    if let Err(e) = send_range(&self.nvlog, &mut self.unsent[p as usize], p, link) {
                        self.link_down(format!("send: {e}"));
                    }
                }
                _ => self.unsent[p as usize] = self.nvlog.tail(p),
            }
        }
        if worked {
            if let LinkState::Up { link, .. } = &mut self.link {
                if let Err(e) = link.flush() {
                    self.link_down(format!("send: {e}"));
                }
            }
            let alone = matches!(self.link, LinkState::Unmirrored);
            if alone || self.planted_ack_before_remote_persist() {
                self.acked_seq = self.next_seq - 1;
            }
            self.complete_acked();
        }
        // Policy sync with the mirror away: everything logged is persistent here now (the
        // loop above persisted every partition with something unsent).
        if self.tracks_changes() && matches!(self.link, LinkState::Down { .. }) && !self.pending.is_empty() {
            self.acked_seq = self.next_seq - 1;
            self.local_only_seq = self.acked_seq;
            self.complete_acked();
            worked = true;
        }
        worked
    }

    #[cfg(any(test, feature = "sim"))]
    fn planted_ack_before_remote_persist(&self) -> bool {
        self.cfg.planted_bug == Some(PlantedBug::AckBeforeRemotePersist)
    }
    #[cfg(not(any(test, feature = "sim")))]
    fn planted_ack_before_remote_persist(&self) -> bool {
        false
    }

    fn complete_acked(&mut self) {
        let now = self.clock.now_ns();
        while self.pending.front().is_some_and(|p| p.last_seq <= self.acked_seq) {
            let p = self.pending.pop_front().expect("front exists");
            let us = now.saturating_sub(p.sent_ns) / 1000;
            let b = ACK_LATENCY_BOUNDS_US.iter().position(|&le| us <= le).unwrap_or(ACK_LATENCY_BOUNDS_US.len());
            self.ack_buckets[b] += 1;
            self.ack_sum_us = self.ack_sum_us.saturating_add(us);
            self.answer(p.done, Ok(()));
        }
    }

    /// Sends the next piece of the copy under way: a chunk of the volume (baseline), or
    /// of the marked regions (resync), then the end of the copy.
    fn copy_step(&mut self) -> bool {
        let size = self.device.size();
        let LinkState::Up { link, copy: Some(c) } = &mut self.link else { return false };
        if c.done_sent {
            return false;
        }
        if let Some(rate) = self.copy_rate {
            // Ahead of the rate: wait (a chunk's worth of credit up front).
            let secs = self.clock.now_ns().saturating_sub(c.started_ns) as f64 / 1e9;
            if c.bytes as f64 > rate as f64 * secs + BASELINE_CHUNK as f64 {
                return false;
            }
        }
        // The next run: `(offset, bytes)`, or `None` at the end.
        let next = match c.kind {
            CopyKind::Baseline => (c.cursor < size).then(|| (c.cursor, (size - c.cursor).min(BASELINE_CHUNK as u64))),
            CopyKind::Resync => {
                let marked = |r: u64| c.marks.get(usize_of(r / 8)).is_some_and(|b| b & (1 << (r % 8)) != 0);
                let regions = size.div_ceil(crate::log::REGION_BYTES);
                while c.cursor < regions && !marked(c.cursor) {
                    c.cursor += 1;
                }
                (c.cursor < regions).then(|| {
                    // Adjacent regions go in one frame, up to a chunk.
                    let per = BASELINE_CHUNK as u64 / crate::log::REGION_BYTES;
                    let first = c.cursor;
                    let mut n = 1u64;
                    while n < per && first + n < regions && marked(first + n) {
                        n += 1;
                    }
                    let offset = first * crate::log::REGION_BYTES;
                    (offset, (n * crate::log::REGION_BYTES).min(size - offset))
                })
            }
        };
        let r = match next {
            Some((offset, len)) => {
                let mut buf = vec![0u8; usize_of(len)];
                // Through the cache: the newest contents as of this point of the stream. The
                // volume itself may be behind (a CP being written by the CP writer, whose
                // message went out already and is applied before this copy).
                if let Err(e) = self.overlay.read(&mut buf, offset, self.device.as_ref()) {
                    let msg = format!("copy read at {offset}: {e}");
                    self.fail_stop(msg);
                    return true;
                }
                let purpose = if c.kind == CopyKind::Baseline { BlockPurpose::Baseline } else { BlockPurpose::Resync };
                let r = link.send(&Message::BlockData { purpose, offset, data: &buf });
                c.bytes += len;
                c.chunks += 1;
                c.cursor += match c.kind {
                    CopyKind::Baseline => len,
                    CopyKind::Resync => len.div_ceil(crate::log::REGION_BYTES),
                };
                r
            }
            None => {
                c.done_sent = true;
                c.done_ns = self.clock.now_ns();
                match c.kind {
                    CopyKind::Baseline => link.send(&Message::BaselineDone { volume_bytes: size }),
                    CopyKind::Resync => link.send(&Message::ResyncDone { bytes: c.bytes, chunks: c.chunks }),
                }
            }
        };
        let r = r.and_then(|()| link.flush());
        if let Err(e) = r {
            self.link_down(format!("copy send: {e}"));
        }
        true
    }

    fn changed_regions(&self) -> Vec<u64> {
        let mut regions: std::collections::BTreeSet<u64> =
            self.changes.as_ref().map(ChangeMap::marked_regions).unwrap_or_default().into_iter().collect();
        let per = crate::log::REGION_BYTES / BLOCK_BYTES as u64;
        for b in self.part_blocks.iter().chain(self.dirty.iter()).flatten() {
            regions.insert(b / per);
        }
        if let Some((_, _, blocks)) = &self.local_cp_inflight {
            regions.extend(blocks.iter().map(|b| b / per));
        }
        regions.into_iter().collect()
    }

    fn mirror_current(&self) -> bool {
        matches!(self.link, LinkState::Up { copy: None, .. }) && self.remote_acked_seq >= self.local_only_seq
    }

    /// Policy sync, with a change map to track what the mirror lacks.
    fn tracks_changes(&self) -> bool {
        self.cfg.policy == Policy::Sync && self.changes.is_some()
    }

    /// Whether a delta resync can bring the destination that sent `w` level: it holds a
    /// copy the change map is relative to (this peer, at or past the map's CP).
    fn can_resync(&self, w: &Welcome) -> bool {
        let Some(base) = self.changes.as_ref().and_then(ChangeMap::base) else { return false };
        w.resyncable && self.cfg.peer.as_deref() == Some(base.peer.as_str()) && w.applied_cp >= base.cp
    }

    /// Marks `blocks` changed and makes the marks durable (before the partition that held
    /// them is freed).
    fn mark_changed(&mut self, blocks: &[Vbn]) -> io::Result<()> {
        let Some(m) = &mut self.changes else { return Ok(()) };
        for &b in blocks {
            m.mark(b * BLOCK_BYTES as u64, BLOCK_BYTES as u64);
        }
        m.persist().map_err(|e| eio(format!("change map: {e}")))
    }

    /// A planned switchover drains: once nothing is waiting or unacknowledged, a CP
    /// brings the mirror level; once both partitions are free, the quiesce is answered.
    fn poll_quiesce(&mut self) {
        if self.quiesce.is_none() {
            return;
        }
        if !matches!(self.link, LinkState::Up { copy: None, .. }) || self.failed.is_some() {
            self.quiesced = false;
            if let Some(tx) = self.quiesce.take() {
                let _ = tx.send(Err("the mirror left sync during the switchover".into()));
            }
            return;
        }
        if !self.pending.is_empty() || !self.waiting.is_empty() {
            return;
        }
        let active_empty = self.nvlog.tail(self.active) <= PARTITION_HEADER_BYTES;
        let other_free = self.parts[1 - self.active as usize] == Part::Free;
        if !(active_empty && other_free) {
            self.cp_wanted = true;
            return;
        }
        if let Some(tx) = self.quiesce.take() {
            let _ = tx.send(Ok((self.stats.last_cp, self.next_seq)));
        }
    }
}

/// Sends partition `p`'s entries from `*unsent` to its tail, in frames of whole entries.
fn send_range<L: Link>(nvlog: &NvLog<Box<dyn Nvram>>, unsent: &mut usize, p: u8, link: &mut L) -> Result<(), String> {
    let tail = nvlog.tail(p);
    let mut from = *unsent;
    while from < tail {
        let to = nvlog.cut(p, from, SEND_MAX);
        link.send_entries(p, from as u64, &nvlog.partition(p)[from..to]).map_err(|e| e.to_string())?;
        from = to;
    }
    *unsent = tail;
    Ok(())
}

/// Replays `recovered`'s entries directly onto `device` (used when a volume is opened
/// without a poller, e.g. for verification tools).
pub fn replay_nvlog(
    nvlog: &NvLog<Box<dyn Nvram>>,
    recovered: &Recovered,
    device: &dyn BlockDevice,
) -> io::Result<usize> {
    let entries = recovered.entries_in_order();
    let decoded: Vec<(EntryHeader, &[u8])> = entries
        .iter()
        .map(|(p, at, _)| EntryHeader::decode(&nvlog.partition(*p)[*at..]).map_err(|e| eio(e.to_string())))
        .collect::<io::Result<_>>()?;
    let _redo = RedoGuard::new(device);
    apply_entries(decoded, device)
}

const _: () = assert!(BASELINE_CHUNK.is_multiple_of(BLOCK_BYTES));

#[cfg(test)]
mod pair_state_tests {
    use super::PairState;

    /// The status JSON shows the pair state as the strings it always has.
    #[test]
    fn the_pair_state_serialises_to_the_status_strings() {
        let all = [
            (PairState::NotMirrored, "not-mirrored"),
            (PairState::Connecting, "connecting"),
            (PairState::OutOfSync, "out-of-sync"),
            (PairState::Resyncing, "resyncing"),
            (PairState::Baseline, "baseline"),
            (PairState::InSync, "in-sync"),
            (PairState::Fenced, "fenced"),
            (PairState::Failed, "failed"),
            (PairState::Quiescing, "quiescing"),
        ];
        for (state, text) in all {
            assert_eq!(serde_json::to_value(state).expect("serialise"), serde_json::Value::String(text.into()));
            assert_eq!(state.as_str(), text);
            assert_eq!(state.to_string(), text);
            assert_eq!(serde_json::from_value::<PairState>(text.into()).expect("deserialise"), state);
        }
    }
}
