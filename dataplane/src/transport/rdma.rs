//! The RDMA engine: entries placed straight into the destination's log files by one-sided
//! RDMA WRITE, made durable by an RDMA READ after the WRITE on the same queue pair, with no
//! destination CPU on the data path.
//!
//! Control messages (hello, CPs, baseline data, acks of CPs) travel on the TCP connection
//! of the [`super::tcp`] engine, which doubles as the small control channel. Set-up:
//!
//! 1. The source opens the TCP link (hello, welcome) and sends `RdmaSetup`.
//! 2. The destination answers `RdmaListen { addr, token }`: its rdma_cm address and a token.
//! 3. The source connects an RC queue pair to `addr` with the token as private data; the
//!    destination's listener registers the mirror's two log files on that connection
//!    (remote read/write) and sends `RdmaRegions` (address, key, length per partition).
//! 4. The source checks the regions against its partition size, proves each with an
//!    8-byte RDMA READ at its first and last bytes (a wrong key or address fails here, with
//!    the device's status, before any placement), and starts placing.
//!
//! Data path: a batch of whole entries is written with one unsignalled RDMA WRITE at the
//! same offset of the remote log file, straight from the source's NVLog, which the source
//! offers at connect time ([`Link::offer_source_memory`]) and the link registers once, read
//! only; where that registration is refused (file-DAX memory), or for a partition header,
//! the bytes are first copied into a registered staging ring. The WRITE is followed by a
//! signalled 8-byte RDMA READ of that range: by the ordering
//! rules of a reliable connection the READ's completion means every WRITE before it has been
//! placed in the destination's memory. That completion is the batch's `Ack`. Placement in a
//! `file:` log file is what that mode promises; for `dax:` it is placement in persistent
//! memory only on platforms that count memory-controller arrival as persistent (ADR with
//! DDIO off): RDMA FLUSH, which would make it explicit, is not in rdma-core 44 and is not
//! used. `file-sync:` needs the destination's CPU to `msync` and is refused with RDMA.
//!
//! Ordering: control messages that follow placements on the stream (a CP after its
//! partition's entries, baseline data after a CP) are held back until every placement
//! posted before them has completed, so the destination sees the same order as over TCP.
//!
//! Credits: the source writes at the offsets of its own NVLog partition, and re-uses a
//! partition only after the destination reported its CP done and freed the log file: the
//! partition is the unit of credit, released by `CpDone` on the control channel.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub use nvmirror_bindings::rdma::device_names;
use nvmirror_bindings::rdma::{Access, Completion, Connection, Depth, Listener, MemoryRegion, Op, Sge, WorkRequest};
use parking_lot::Mutex;

use super::tcp::{TcpConnector, TcpLink};
use super::wire::{Message, RdmaRegion};
use super::{
    ConnectError, Connector, Hello, Link, LinkError, LinkEvent, PlacementTarget, RdmaPlacement, Reply, ReplySink,
    Welcome,
};
use crate::format::{EntryHeader, PARTITION_HEADER_BYTES};
use crate::log::PARTITIONS;

/// Send queue depth and completion queue size of a link.
const DEPTH: Depth = Depth { send: 256, cq: 512 };
/// Bytes of the staging ring a source copies batches into.
const STAGING_BYTES: usize = 16 << 20;
/// How long set-up steps may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// With placements in flight, the control channel is looked at once every this many polls.
const TCP_POLL_EVERY: u32 = 64;
/// How long a placement may stay incomplete before the link is declared dead.
const PLACEMENT_TIMEOUT: Duration = Duration::from_secs(10);

// ---- destination ----

struct Expected {
    mirror: Arc<dyn PlacementTarget>,
    sink: Arc<dyn ReplySink>,
    gen: u64,
    tamper: Option<Tamper>,
}

/// Changes the regions a destination presents: for the hw-tests programs that check how a
/// source treats a peer presenting wrong keys, addresses or sizes. Never set by a node.
#[doc(hidden)]
pub type Tamper = fn(&mut [RdmaRegion; PARTITIONS]);

/// The destination's RDMA engine: one rdma_cm listener for all mirrors of the node.
pub struct RdmaService {
    addr: SocketAddr,
    expected: Arc<Mutex<HashMap<u64, Expected>>>,
    next_token: AtomicU64,
    tamper: Option<Tamper>,
}

/// What a mirror holds while its source places by RDMA; dropping it disconnects the queue
/// pair and deregisters the log files.
struct Attachment {
    _mrs: Vec<MemoryRegion>,
    _conn: Connection,
}

impl RdmaService {
    /// Starts the listener on `addr` (an address of an RDMA-capable interface).
    pub fn start(addr: SocketAddr) -> Result<Arc<Self>, String> {
        Self::start_with(addr, None)
    }

    /// As [`RdmaService::start`], presenting regions changed by `tamper` (hw-tests only).
    #[doc(hidden)]
    pub fn start_with(addr: SocketAddr, tamper: Option<Tamper>) -> Result<Arc<Self>, String> {
        let mut listener = Listener::bind(addr).map_err(|e| format!("RDMA listen on {addr}: {e}"))?;
        tracing::info!("rdma: {}", nvmirror_bindings::rdma::flush_support());
        let service = Arc::new(RdmaService {
            addr,
            expected: Arc::new(Mutex::new(HashMap::new())),
            next_token: AtomicU64::new(rand_token()),
            tamper,
        });
        let expected = service.expected.clone();
        thread::Builder::new()
            .name("nvm-rdma-accept".into())
            .spawn(move || loop {
                match listener.next_request(Duration::from_secs(3600)) {
                    Ok(req) => {
                        let token = req.private_data.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8")));
                        let Some(exp) = token.and_then(|t| expected.lock().remove(&t)) else {
                            tracing::warn!("rdma: refused a queue pair with an unknown token");
                            req.reject("unknown token");
                            continue;
                        };
                        let conn = match req.accept(DEPTH, SETUP_TIMEOUT) {
                            Ok(c) => c,
                            Err(e) => {
                                tracing::warn!("rdma: accept: {e}");
                                continue;
                            }
                        };
                        let sink = exp.sink.clone();
                        if let Err(e) = register(exp, conn) {
                            tracing::warn!("rdma: {e}");
                            // The source is waiting for the regions: tell it why none come.
                            let _ =
                                sink.send(&Message::Error { reason: format!("RDMA set-up on the destination: {e}") });
                        }
                    }
                    Err(nvmirror_bindings::rdma::RdmaError::Timeout { .. }) => {}
                    Err(e) => {
                        tracing::warn!("rdma: listener: {e}");
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(service)
    }
}

fn rand_token() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    u64::try_from(t & u128::from(u64::MAX)).unwrap_or(1) ^ u64::from(std::process::id()) << 32
}

/// Registers the mirror's log files on the accepted connection and tells the source.
fn register(exp: Expected, conn: Connection) -> Result<(), String> {
    let mut mrs = Vec::new();
    let mut regions = [RdmaRegion::default(); PARTITIONS];
    for (p, (ptr, len)) in exp.mirror.log_memory().into_iter().enumerate() {
        // SAFETY: the log files are mappings owned by the mirror for its whole life; the
        // registration is held in the mirror's RDMA attachment, which the mirror drops
        // before its logs (field order) and before any failover replay.
        let mr = unsafe { MemoryRegion::register(conn.pd(), ptr, len, Access::RemoteReadWrite) }
            .map_err(|e| format!("register log file {p}: {e}"))?;
        regions[p] = RdmaRegion { addr: mr.addr(), rkey: mr.rkey(), len: len as u64 };
        mrs.push(mr);
    }
    if let Some(tamper) = exp.tamper {
        tamper(&mut regions);
    }
    let name = exp.mirror.name();
    exp.mirror
        .set_rdma_attachment(exp.gen, Box::new(Attachment { _mrs: mrs, _conn: conn }))
        .map_err(|e| e.to_string())?;
    tracing::info!("rdma: mirror {name}: log files registered; the source places entries by RDMA");
    exp.sink.send(&Message::RdmaRegions { regions }).map_err(|e| format!("send regions: {e}"))
}

impl RdmaPlacement for RdmaService {
    fn expect(
        &self,
        mirror: Arc<dyn PlacementTarget>,
        sink: Arc<dyn ReplySink>,
        gen: u64,
    ) -> Result<(String, u64), String> {
        let token = self.next_token.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        let mut expected = self.expected.lock();
        // Bounded: an expectation that never saw its queue pair is replaced by its mirror's
        // next session; cap the table all the same.
        if expected.len() >= 1024 {
            return Err("too many pending RDMA set-ups".into());
        }
        expected.insert(token, Expected { mirror, sink, gen, tamper: self.tamper });
        Ok((self.addr.to_string(), token))
    }
}

// ---- source ----

/// Makes RDMA links: TCP for control (authenticated as its connector says), an RC queue
/// pair for placement.
#[derive(Debug, Clone, Default)]
pub struct RdmaConnector {
    tcp: TcpConnector,
}

impl RdmaConnector {
    /// An RDMA connector whose control channel is opened by `tcp` (with its secret).
    pub fn over(tcp: TcpConnector) -> RdmaConnector {
        RdmaConnector { tcp }
    }
}

struct Batch {
    wr_id: u64,
    /// The highest sequence number placed by this batch, if it carried entries.
    seq: Option<u64>,
    /// Staging ring offset just past this batch.
    ring_end: usize,
    posted: Instant,
}

pub struct RdmaLink {
    tcp: TcpLink,
    conn: Connection,
    /// The source's NVLog, registered read only: batches inside it are written from it
    /// without a copy. Its memory outlives the link (the offer's contract).
    source: Option<SourceMemory>,
    /// Deregistered (dropped) before the buffer it covers.
    staging_mr: MemoryRegion,
    staging: Box<[u8]>,
    regions: [RdmaRegion; PARTITIONS],
    /// Staging ring: bytes in [tail, head) (modulo) belong to batches in flight.
    head: usize,
    tail: usize,
    inflight: VecDeque<Batch>,
    /// Encoded control frames waiting for the placements posted before them.
    held: VecDeque<(u64, Vec<u8>)>,
    next_wr: u64,
    /// The last wr_id completed.
    done_wr: u64,
    events: VecDeque<LinkEvent>,
    completions: Vec<Completion>,
    dead: Option<String>,
    /// Polls since the control channel was last looked at.
    tcp_skips: u32,
}

struct SourceMemory {
    mr: MemoryRegion,
    base: usize,
    len: usize,
}

impl SourceMemory {
    /// The local address of `bytes` and the key to send them with, if they lie inside.
    fn covers(&self, bytes: &[u8]) -> Option<(u64, u32)> {
        let at = (bytes.as_ptr() as usize).checked_sub(self.base)?;
        (at.checked_add(bytes.len())? <= self.len).then(|| (bytes.as_ptr() as u64, self.mr.lkey()))
    }
}

// The staging ring's first bytes serve as the READ target: 8 bytes, never a batch.
const READ_SCRATCH: usize = 64;

fn setup_reply(tcp: &mut TcpLink, want: &'static str) -> Result<Reply, String> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        match tcp.poll() {
            Some(LinkEvent::Reply(r @ (Reply::RdmaListen { .. } | Reply::RdmaRegions { .. }))) => return Ok(r),
            Some(LinkEvent::Reply(Reply::Error { reason })) | Some(LinkEvent::Reply(Reply::Refuse { reason, .. })) => {
                return Err(reason)
            }
            Some(LinkEvent::Closed { reason }) => return Err(reason),
            Some(other) => return Err(format!("expected {want}, got {other:?}")),
            None => {
                if Instant::now() > deadline {
                    return Err(format!("no {want} within {SETUP_TIMEOUT:?}"));
                }
                thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

impl Connector for RdmaConnector {
    type Link = RdmaLink;
    fn connect(&self, target: &str, hello: &Hello) -> Result<(RdmaLink, Welcome), ConnectError> {
        let protocol = |reason: String| ConnectError::Protocol { target: target.to_string(), reason };
        let (mut tcp, welcome) = self.tcp.connect(target, hello)?;
        tcp.send(&Message::RdmaSetup).and_then(|()| tcp.flush()).map_err(|e| protocol(e.to_string()))?;
        let Reply::RdmaListen { addr, token } = setup_reply(&mut tcp, "rdma-listen").map_err(&protocol)? else {
            return Err(protocol("expected rdma-listen".into()));
        };
        let addr: SocketAddr = addr
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| protocol(format!("bad RDMA address {addr:?}")))?;
        let conn = Connection::connect(addr, &token.to_le_bytes(), DEPTH, SETUP_TIMEOUT)
            .map_err(|e| protocol(format!("RDMA connect to {addr}: {e}")))?;
        let Reply::RdmaRegions { regions } = setup_reply(&mut tcp, "rdma-regions").map_err(&protocol)? else {
            return Err(protocol("expected rdma-regions".into()));
        };
        for (p, r) in regions.iter().enumerate() {
            if r.len != hello.partition_bytes {
                return Err(protocol(format!(
                    "destination log file {p} is {} bytes, the partition {}: refusing to place into it",
                    r.len, hello.partition_bytes
                )));
            }
        }
        let mut staging = vec![0u8; STAGING_BYTES].into_boxed_slice();
        // SAFETY: the staging buffer is a heap allocation owned by the link that never
        // moves; the link declares `staging_mr` before `staging`, so the registration is
        // dropped before the buffer is freed.
        let staging_mr =
            unsafe { MemoryRegion::register(conn.pd(), staging.as_mut_ptr(), STAGING_BYTES, Access::Local) }
                .map_err(|e| protocol(format!("register staging ring: {e}")))?;
        let mut conn = conn;
        probe_regions(&mut conn, &staging, &staging_mr, &regions).map_err(protocol)?;
        Ok((
            RdmaLink {
                tcp,
                conn,
                source: None,
                staging,
                staging_mr,
                regions,
                head: READ_SCRATCH,
                tail: READ_SCRATCH,
                inflight: VecDeque::new(),
                held: VecDeque::new(),
                next_wr: 1,
                done_wr: 0,
                events: VecDeque::new(),
                completions: Vec::new(),
                dead: None,
                tcp_skips: 0,
            },
            welcome,
        ))
    }
}

/// Reads 8 bytes at the first and at the last bytes of every region the destination
/// presented: a wrong key, an address outside its registration or a region shorter than it
/// claims fails here with the device's completion status, before anything is placed.
fn probe_regions(
    conn: &mut Connection,
    staging: &[u8],
    staging_mr: &MemoryRegion,
    regions: &[RdmaRegion; PARTITIONS],
) -> Result<(), String> {
    const PROBE_BYTES: u32 = 8;
    let base = staging.as_ptr() as u64;
    let mut reqs = Vec::new();
    for (p, r) in regions.iter().enumerate() {
        if r.len < u64::from(PROBE_BYTES) {
            return Err(format!("destination log file {p} is {} bytes: refusing to place into it", r.len));
        }
        for (i, at) in [0, r.len - u64::from(PROBE_BYTES)].into_iter().enumerate() {
            reqs.push(WorkRequest {
                wr_id: u64::MAX - (2 * p + i) as u64,
                op: Op::Read,
                // Each probe reads into its own 8 bytes of the scratch area at the ring's head.
                local: Sge { addr: base + (8 * (2 * p + i)) as u64, len: PROBE_BYTES, lkey: staging_mr.lkey() },
                remote_addr: r.addr.wrapping_add(at),
                rkey: r.rkey,
                signaled: true,
            });
        }
    }
    const _: () = assert!(8 * 2 * PARTITIONS <= READ_SCRATCH, "probes fit the scratch area");
    // SAFETY: the probes read into the staging ring's scratch bytes, registered and owned by
    // the caller for the whole call; the completions are polled below before it returns.
    unsafe { conn.post(&reqs) }.map_err(|e| format!("post the region probes: {e}"))?;
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut done = Vec::new();
    while done.len() < reqs.len() {
        if Instant::now() > deadline {
            return Err(format!("the region probes did not complete within {SETUP_TIMEOUT:?}"));
        }
        conn.poll(&mut done, reqs.len()).map_err(|e| format!("poll the region probes: {e}"))?;
        if let Some(bad) = done.iter().find(|c| !c.ok) {
            let k = u64::MAX - bad.wr_id;
            let p = k / 2;
            let (r, end) = (regions[partition_index(p)], if k % 2 == 0 { "first" } else { "last" });
            return Err(format!(
                "destination log file {p} (address {:#x}, key {:#x}, {} bytes) refused an RDMA READ of its {end} bytes with completion status {} ({}): wrong memory key, address or size; refusing to place into it",
                r.addr,
                r.rkey,
                r.len,
                bad.status,
                wc_status_name(bad.status)
            ));
        }
        std::hint::spin_loop();
    }
    Ok(())
}

fn partition_index(p: u64) -> usize {
    usize::try_from(p).unwrap_or(0).min(PARTITIONS - 1)
}

/// The name of an `ibv_wc_status`, for errors.
fn wc_status_name(status: u32) -> &'static str {
    match status {
        0 => "success",
        1 => "local length error",
        2 => "local QP operation error",
        4 => "local protection error",
        5 => "work request flushed",
        9 => "remote invalid request",
        10 => "remote access error",
        11 => "remote operation error",
        12 => "transport retry counter exceeded",
        13 => "RNR retry counter exceeded",
        _ => "see ibv_wc_status",
    }
}

/// The sequence number of the last whole entry in `bytes` (None for a partition header).
fn last_seq(bytes: &[u8]) -> Option<u64> {
    let mut at = 0usize;
    let mut seq = None;
    while at + 64 <= bytes.len() {
        let data_len = u32::from_le_bytes(bytes[at + 44..at + 48].try_into().expect("4")) as usize;
        seq = Some(u64::from_le_bytes(bytes[at + 24..at + 32].try_into().expect("8")));
        at += EntryHeader::footprint_for(data_len);
    }
    seq
}

impl RdmaLink {
    fn fail(&mut self, reason: String) {
        if self.dead.is_none() {
            self.dead = Some(reason.clone());
            self.tcp.close();
            self.conn.disconnect();
            self.events.push_back(LinkEvent::Closed { reason });
        }
    }

    fn check(&self) -> Result<(), LinkError> {
        match &self.dead {
            Some(r) => Err(LinkError::Closed(r.clone())),
            None => Ok(()),
        }
    }

    /// Room for `n` bytes in the ring, contiguous; `None` until batches complete.
    fn reserve(&mut self, n: usize) -> Option<usize> {
        let cap = self.staging.len();
        if self.inflight.is_empty() {
            self.head = READ_SCRATCH;
            self.tail = READ_SCRATCH;
        }
        if self.head >= self.tail {
            if self.head + n <= cap {
                return Some(self.head);
            }
            if READ_SCRATCH + n < self.tail {
                return Some(READ_SCRATCH);
            }
            None
        } else if self.head + n < self.tail {
            Some(self.head)
        } else {
            None
        }
    }

    /// Reaps completions: acks for finished batches, held control frames released.
    fn reap(&mut self) {
        if self.dead.is_some() {
            return;
        }
        let mut comps = std::mem::take(&mut self.completions);
        comps.clear();
        let polled = self.conn.poll(&mut comps, 16);
        let mut failure = polled.err().map(|e| format!("poll: {e}"));
        for c in &comps {
            if !c.ok {
                failure = Some(format!("RDMA work request {} failed with status {}", c.wr_id, c.status));
                break;
            }
            while self.inflight.front().is_some_and(|b| b.wr_id <= c.wr_id) {
                let b = self.inflight.pop_front().expect("front");
                self.tail = b.ring_end;
                self.done_wr = b.wr_id;
                if let Some(seq) = b.seq {
                    self.events.push_back(LinkEvent::Reply(Reply::Ack { seq }));
                }
            }
        }
        self.completions = comps;
        if let Some(reason) = failure {
            return self.fail(reason);
        }
        if let Some(b) = self.inflight.front() {
            if b.posted.elapsed() > PLACEMENT_TIMEOUT {
                let reason = format!("placement {} incomplete after {PLACEMENT_TIMEOUT:?}", b.wr_id);
                return self.fail(reason);
            }
        }
        self.release_held();
    }

    fn release_held(&mut self) {
        while self.held.front().is_some_and(|(barrier, _)| *barrier <= self.done_wr) {
            let (_, frame) = self.held.pop_front().expect("front");
            if let Err(e) = self.tcp.send_raw(&frame) {
                return self.fail(format!("send: {e}"));
            }
        }
        if let Err(e) = self.tcp.flush() {
            self.fail(format!("send: {e}"));
        }
    }

    /// Places `bytes` at `offset` of partition `p`'s remote log file.
    /// `entries`: the bytes are whole entries (their last sequence number is acked), not a
    /// partition header. `from_source`: the bytes came through `send_entries` and may be
    /// written straight from the offered source memory.
    fn place(&mut self, p: u8, offset: u64, bytes: &[u8], entries: bool, from_source: bool) -> Result<(), LinkError> {
        self.check()?;
        let region = self.regions[p as usize];
        if offset + bytes.len() as u64 > region.len || bytes.len() > self.staging.len() / 2 {
            return Err(LinkError::Closed(format!("placement {offset}+{} outside log file {p}", bytes.len())));
        }
        while self.inflight.len() + 2 > usize::try_from(DEPTH.send / 2).unwrap_or(64) {
            self.reap();
            self.check()?;
        }
        let len = u32::try_from(bytes.len()).expect("below the ring");
        let direct = if from_source { self.source.as_ref().and_then(|s| s.covers(bytes)) } else { None };
        let (local, staged_end) = match direct {
            Some((addr, lkey)) => (Sge { addr, len, lkey }, None),
            None => {
                let at = loop {
                    if let Some(at) = self.reserve(bytes.len()) {
                        break at;
                    }
                    // Ring full: wait for batches to finish (bounded by PLACEMENT_TIMEOUT).
                    self.reap();
                    self.check()?;
                    std::hint::spin_loop();
                };
                self.staging[at..at + bytes.len()].copy_from_slice(bytes);
                let addr = self.staging.as_ptr() as u64 + at as u64;
                (Sge { addr, len, lkey: self.staging_mr.lkey() }, Some(at + bytes.len()))
            }
        };
        let scratch = self.staging.as_ptr() as u64;
        let wr_id = self.next_wr;
        self.next_wr += 1;
        let reqs = [
            WorkRequest {
                wr_id,
                op: Op::Write,
                local,
                remote_addr: region.addr + offset,
                rkey: region.rkey,
                signaled: false,
            },
            WorkRequest {
                wr_id,
                op: Op::Read,
                local: Sge { addr: scratch, len: 8, lkey: self.staging_mr.lkey() },
                remote_addr: region.addr + offset,
                rkey: region.rkey,
                signaled: true,
            },
        ];
        // SAFETY: the WRITE's local buffer lies either in the staging ring (registered as
        // `staging_mr`), which the ring accounting keeps untouched until this batch's READ
        // completes, or in the offered source memory (registered as `source`), which the
        // offer's contract keeps mapped and unchanged until the batch is acknowledged,
        // which is that same completion; the READ's scratch bytes are never read; the
        // remote range was checked against the region the destination registered.
        if let Err(e) = unsafe { self.conn.post(&reqs) } {
            let reason = format!("post: {e}");
            self.fail(reason.clone());
            return Err(LinkError::Closed(reason));
        }
        if let Some(end) = staged_end {
            self.head = end;
        }
        let seq = if entries { last_seq(bytes) } else { None };
        self.inflight.push_back(Batch { wr_id, seq, ring_end: self.head, posted: Instant::now() });
        Ok(())
    }
}

impl Link for RdmaLink {
    fn send_entries(&mut self, partition: u8, offset: u64, bytes: &[u8]) -> Result<(), LinkError> {
        self.place(partition, offset, bytes, true, true)
    }

    unsafe fn offer_source_memory(&mut self, memory: &[u8]) {
        // SAFETY: the device only reads the memory (LocalRead); the caller keeps it mapped
        // for the link's life, and `source` is dropped with the link.
        let mr = unsafe {
            MemoryRegion::register(self.conn.pd(), memory.as_ptr().cast_mut(), memory.len(), Access::LocalRead)
        };
        match mr {
            Ok(mr) => self.source = Some(SourceMemory { mr, base: memory.as_ptr() as usize, len: memory.len() }),
            // File-DAX memory cannot be pinned: copy batches through the staging ring.
            Err(e) => tracing::warn!(
                "rdma: the NVLog ({} bytes) cannot be registered ({e}): entries are copied into the staging ring",
                memory.len()
            ),
        }
    }

    fn send(&mut self, msg: &Message<'_>) -> Result<(), LinkError> {
        self.check()?;
        match msg {
            // The partition header is placed like entries, so it is ordered with them.
            Message::PartitionOpen { header } => {
                let mut h = [0u8; 2 * PARTITION_HEADER_BYTES];
                h[..PARTITION_HEADER_BYTES].copy_from_slice(header);
                self.place(header[6], 0, &h, false, false)
            }
            Message::Entries { partition, offset, bytes } => self.place(*partition, *offset, bytes, true, false),
            other => {
                let barrier = self.next_wr - 1;
                if barrier <= self.done_wr && self.held.is_empty() {
                    self.tcp.send(other)
                } else {
                    self.held.push_back((barrier, other.encode()));
                    Ok(())
                }
            }
        }
    }

    fn flush(&mut self) -> Result<(), LinkError> {
        self.check()?;
        self.tcp.flush()
    }

    fn poll(&mut self) -> Option<LinkEvent> {
        if let Some(ev) = self.events.pop_front() {
            return Some(ev);
        }
        self.reap();
        if let Some(ev) = self.events.pop_front() {
            return Some(ev);
        }
        // While placements are in flight, their completions (polled from user space) are
        // what the caller waits for: the control channel, a system call per look, is
        // looked at only every TCP_POLL_EVERY polls then.
        if !self.inflight.is_empty() && self.dead.is_none() {
            self.tcp_skips += 1;
            if self.tcp_skips < TCP_POLL_EVERY {
                return None;
            }
        }
        self.tcp_skips = 0;
        match self.tcp.poll() {
            Some(LinkEvent::Closed { reason }) => {
                self.fail(reason);
                self.events.pop_front()
            }
            other => other,
        }
    }

    fn close(&mut self) {
        self.fail("closed by the source".into());
        self.events.clear();
    }
}
