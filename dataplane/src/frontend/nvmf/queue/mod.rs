//! One NVMe/TCP connection, one queue: initialization (ICReq/ICResp), Fabrics Connect, the
//! admin commands of an admin queue, the I/O commands of an I/O queue, R2T transfers, and
//! the writer thread that sends what the export completes. Fabrics commands (Connect,
//! properties) and the admin commands are in `admin_queue`, the writer thread in `writer`.

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, unbounded, Receiver, Sender};

use super::admin::{self, ControllerIdentity, DiscoveryEntry, OAES_ANA_CHANGE, OAES_NS_ATTRIBUTE};
use super::command::{self, IoOp};
use super::pdu::{c2h_term_req, Framing, Pdu, PduError, PduReader, CQE_BYTES};
use super::session::AdoptedQueue;
use super::transfer::{self, Data, NotStarted, Transfers};
use super::{
    AnaState, Controller, Shared, ADMIN_INLINE_DATA_BYTES, AER_MAX, DISCOVERY_NQN, H2C_DATA_BYTES_MAX,
    INLINE_DATA_BYTES, IO_QUEUES_MAX, IO_QUEUE_ENTRIES, NQN_PREFIX, NSID, TICK, TRANSFER_BYTES_MAX,
};
use crate::frontend::nbd::ErrorChain;
use crate::frontend::{Completer, Export, IoReply, IoRequest};

mod admin_queue;
mod writer;

use writer::write_loop;

/// A host must send its ICReq within this time.
const IC_TIMEOUT: Duration = Duration::from_secs(30);
/// A write of answers that makes no progress for this long means the host stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a Dataset Management command waits for each of its trims.
const TRIM_TIMEOUT: Duration = Duration::from_secs(120);
/// Answer bytes the writer gathers before a write system call.
const WRITE_BATCH_BYTES: usize = 256 << 10;

// Opcodes.
const OPC_FABRICS: u8 = 0x7f;
const FCTYPE_PROPERTY_SET: u8 = 0x00;
const FCTYPE_CONNECT: u8 = 0x01;
const FCTYPE_PROPERTY_GET: u8 = 0x04;
const ADMIN_GET_LOG_PAGE: u8 = 0x02;
const ADMIN_IDENTIFY: u8 = 0x06;
const ADMIN_ABORT: u8 = 0x08;
const ADMIN_SET_FEATURES: u8 = 0x09;
const ADMIN_GET_FEATURES: u8 = 0x0a;
const ADMIN_ASYNC_EVENT: u8 = 0x0c;
const ADMIN_KEEP_ALIVE: u8 = 0x18;

// Properties.
const PROP_CAP: u32 = 0x00;
const PROP_VS: u32 = 0x08;
const PROP_CC: u32 = 0x14;
const PROP_CSTS: u32 = 0x1c;

// Features.
const FEAT_NUM_QUEUES: u8 = 0x07;
const FEAT_ASYNC_EVENT: u8 = 0x0b;
const FEAT_KEEP_ALIVE: u8 = 0x0f;

/// A completion status: status code type, status code, do-not-retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    pub dnr: bool,
}

impl Status {
    pub const SUCCESS: Status = Status { sct: 0, sc: 0, dnr: false };
    pub const INVALID_OPCODE: Status = Status::generic(0x01);
    pub const INVALID_FIELD: Status = Status::generic(0x02);
    pub const INTERNAL: Status = Status { sct: 0, sc: 0x06, dnr: false };
    pub const INVALID_NAMESPACE: Status = Status::generic(0x0b);
    pub const SEQUENCE_ERROR: Status = Status::generic(0x0c);
    pub const DATA_SGL_LENGTH: Status = Status::generic(0x0f);
    pub const LBA_OUT_OF_RANGE: Status = Status::generic(0x80);
    pub const AER_LIMIT: Status = Status::specific(0x05);
    pub const INVALID_LOG_PAGE: Status = Status::specific(0x09);
    pub const CONNECT_INCOMPATIBLE_FORMAT: Status = Status::specific(0x80);
    pub const CONNECT_INVALID_PARAMETERS: Status = Status::specific(0x82);
    pub const CONNECT_INVALID_HOST: Status = Status::specific(0x84);
    /// Path related: the namespace is not accessible through this controller now; the
    /// host retries on another path (no DNR).
    pub const ANA_INACCESSIBLE: Status = Status { sct: 3, sc: 0x02, dnr: false };
    /// Path related: the path is in transition; the host waits and retries.
    pub const ANA_TRANSITION: Status = Status { sct: 3, sc: 0x03, dnr: false };

    const fn generic(sc: u8) -> Status {
        Status { sct: 0, sc, dnr: true }
    }
    const fn specific(sc: u8) -> Status {
        Status { sct: 1, sc, dnr: true }
    }

    /// The 16-bit status field of a completion queue entry (phase tag 0).
    pub fn field(self) -> u16 {
        (u16::from(self.sc) << 1) | (u16::from(self.sct & 7) << 9) | (u16::from(self.dnr) << 15)
    }

    pub fn from_field(field: u16) -> Status {
        Status { sc: ((field >> 1) & 0xff) as u8, sct: ((field >> 9) & 7) as u8, dnr: field & (1 << 15) != 0 }
    }
}

/// A completion queue entry.
pub fn cqe(dw0: u32, dw1: u32, sqhd: u16, sqid: u16, cid: u16, status: Status) -> [u8; CQE_BYTES] {
    let mut c = [0u8; CQE_BYTES];
    c[0..4].copy_from_slice(&dw0.to_le_bytes());
    c[4..8].copy_from_slice(&dw1.to_le_bytes());
    c[8..10].copy_from_slice(&sqhd.to_le_bytes());
    c[10..12].copy_from_slice(&sqid.to_le_bytes());
    c[12..14].copy_from_slice(&cid.to_le_bytes());
    c[14..16].copy_from_slice(&status.field().to_le_bytes());
    c
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}
/// The low and high 32 bits of `v` (dword 0 and dword 1 of a completion).
#[allow(clippy::cast_possible_truncation)]
fn halves(v: u64) -> (u32, u32) {
    (v as u32, (v >> 32) as u32)
}
/// A NUL-terminated string field.
fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Why a connection ended, on threads or on a volume's reactor. Logged as one line naming
/// the peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    #[error("configuring the socket failed")]
    Socket(#[source] io::Error),
    #[error("reading failed")]
    Read(#[source] io::Error),
    #[error("writing answers failed")]
    Write(#[source] io::Error),
    #[error("bad PDU, connection terminated")]
    Pdu(#[source] PduError),
    #[error("the host terminated the connection (status {fes:#x}, field at byte {fei})")]
    HostTerminated { fes: u16, fei: u32 },
    #[error("no ICReq within {0:?}")]
    NoIcReq(Duration),
    #[error("the host closed the connection in the middle of a PDU")]
    Truncated,
    #[error("keep alive timeout: nothing heard on the admin queue for {0} ms")]
    KeepAlive(u128),
    #[error("controller {0:#06x} is gone (its admin queue closed)")]
    ControllerGone(u16),
    #[error("{0}")]
    Protocol(String),
    #[error("starting the writer thread failed")]
    Spawn(#[source] io::Error),
}

/// What the reader and the writer of one queue share.
#[derive(Debug, Default)]
struct QueueInfo {
    qid: AtomicU16,
    /// Entries of the submission queue (SQSIZE + 1), once connected.
    entries: AtomicU32,
    /// Commands taken from the queue: the SQ head the completions report.
    consumed: AtomicU32,
    /// Commands handed to the export and not yet answered.
    in_flight: AtomicUsize,
    /// The volume of an I/O queue, once connected.
    volume: std::sync::OnceLock<String>,
}

impl QueueInfo {
    fn sqhd(&self) -> u16 {
        let entries = self.entries.load(Ordering::Relaxed).max(1);
        u16::try_from(self.consumed.load(Ordering::Relaxed) % entries).unwrap_or(0)
    }
}

/// The cookie of a submitted command: its command identifier, and whether it is a read.
const COOKIE_READ: u64 = 1 << 16;

/// Serves one connection until it ends; logs why it ended, if not cleanly.
pub(super) fn serve(stream: TcpStream, peer: SocketAddr, shared: &Arc<Shared>) {
    let closer = stream.try_clone().ok();
    match run(stream, peer, shared) {
        // The volume's reactor owns the socket now.
        Ok(Served::Adopted) => return,
        Ok(Served::Here) => {}
        Err(e) => tracing::warn!("nvmf: {peer}: {}", ErrorChain(&e)),
    }
    if let Some(c) = closer {
        let _ = c.shutdown(Shutdown::Both);
    }
}

/// Where a connection ended up.
enum Served {
    /// Served on this thread, to its end.
    Here,
    /// Handed to its volume's reactor.
    Adopted,
}

fn run(mut stream: TcpStream, peer: SocketAddr, shared: &Arc<Shared>) -> Result<Served, ConnectionError> {
    stream.set_nodelay(true).map_err(ConnectionError::Socket)?;
    stream.set_read_timeout(Some(TICK)).map_err(ConnectionError::Socket)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(ConnectionError::Socket)?;
    let mut reader = PduReader::new(ADMIN_INLINE_DATA_BYTES, H2C_DATA_BYTES_MAX);
    let started = Instant::now();
    let framing = loop {
        match reader.next_pdu() {
            Ok(Some(Pdu::IcReq { pfv, hpda, header_digest, data_digest, .. })) => {
                if pfv != 0 || hpda > 31 {
                    let e = PduError {
                        fes: super::pdu::FES_UNSUPPORTED,
                        fei: if pfv != 0 { 8 } else { 10 },
                        what: format!(
                            "ICReq with PDU format version {pfv} and data alignment {hpda} (0 and at most 31 served)"
                        ),
                        header: Vec::new(),
                    };
                    return Err(terminate(&mut stream, e));
                }
                let f = Framing { header_digest, data_digest, hpda };
                let mut out = Vec::new();
                f.ic_resp(&mut out, u32::try_from(H2C_DATA_BYTES_MAX).unwrap_or(u32::MAX));
                stream.write_all(&out).map_err(ConnectionError::Write)?;
                reader.initialize(header_digest, data_digest);
                break f;
            }
            Ok(Some(other)) => return Err(ConnectionError::Protocol(format!("{other:?} before the ICReq"))),
            Ok(None) => {}
            Err(e) => return Err(terminate(&mut stream, e)),
        }
        if shared.shutdown.load(Ordering::Acquire) {
            return Ok(Served::Here);
        }
        if started.elapsed() > IC_TIMEOUT {
            return Err(ConnectionError::NoIcReq(IC_TIMEOUT));
        }
        match reader.fill(&mut stream) {
            Ok(0) if reader.partial() => return Err(ConnectionError::Truncated),
            Ok(0) => return Ok(Served::Here),
            Ok(_) => {}
            Err(e) if would_block(&e) => {}
            Err(e) => return Err(ConnectionError::Read(e)),
        }
    };
    serve_queue(Start { stream, peer, reader, framing, ctrl: None, qid: 0, entries: 0, consumed: 0 }, shared)
}

/// What a queue is served from: a new connection past its ICReq, or an I/O queue a
/// volume's reactor gave back (or would not take).
struct Start {
    stream: TcpStream,
    peer: SocketAddr,
    reader: PduReader,
    framing: Framing,
    ctrl: Option<Arc<Controller>>,
    qid: u16,
    entries: u32,
    consumed: u32,
}

impl From<AdoptedQueue> for Start {
    fn from(q: AdoptedQueue) -> Start {
        Start {
            stream: q.stream,
            peer: q.peer,
            reader: *q.reader,
            framing: q.framing,
            ctrl: Some(q.ctrl),
            qid: q.qid,
            entries: q.entries,
            consumed: q.consumed,
        }
    }
}

/// How a queue's thread stopped serving it.
enum Outcome {
    Ended,
    /// An I/O queue just connected: offered to its volume's reactor.
    Adopt,
}

/// Serves a queue on this thread and a writer thread. An I/O queue, once connected, is
/// offered to its volume's reactor; one the reactor does not take is
/// served here.
fn serve_queue(start: Start, shared: &Arc<Shared>) -> Result<Served, ConnectionError> {
    let Start { mut stream, peer, reader, framing, ctrl, qid, entries, consumed } = start;
    stream.set_read_timeout(Some(TICK)).map_err(ConnectionError::Socket)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(ConnectionError::Socket)?;
    let local = stream.local_addr().map_err(ConnectionError::Socket)?;
    let info = Arc::new(QueueInfo::default());
    info.qid.store(qid, Ordering::Relaxed);
    info.entries.store(entries, Ordering::Relaxed);
    info.consumed.store(consumed, Ordering::Relaxed);
    if let Some(v) = ctrl.as_ref().and_then(|c| c.volume.clone()) {
        let _ = info.volume.set(v);
    }
    let (out_tx, out_rx) = unbounded::<Vec<u8>>();
    let (io_tx, io_rx) = unbounded::<IoReply>();
    let writer = {
        let stream = stream.try_clone().map_err(ConnectionError::Socket)?;
        let info = info.clone();
        let shared = shared.clone();
        thread::Builder::new()
            .name(format!("nvmf-w-{peer}"))
            .spawn(move || write_loop(stream, framing, &info, &shared, &out_rx, &io_rx))
            .map_err(ConnectionError::Spawn)?
    };
    let mut q = Queue {
        shared,
        peer,
        local,
        reader,
        framing,
        info: info.clone(),
        out: out_tx,
        io: io_tx,
        ctrl,
        admin: None,
        transfers: Transfers::default(),
        last_tick: Instant::now(),
        adopt: false,
        was_writable: true,
    };
    let result = q.run(&mut stream);
    if let (Some(c), Some(_)) = (&q.ctrl, &q.admin) {
        shared.drop_controller(c);
        tracing::info!("nvmf: {peer}: controller {:#06x} of {} ended", c.cntlid, c.subnqn);
    }
    let Queue { reader, ctrl, out, io, .. } = q;
    // The writer ends once every command handed to the export is answered (or dropped),
    // and the reader's channels are closed.
    drop((out, io));
    let written = writer.join().unwrap_or_else(|_| Err(io::Error::other("the writer thread panicked")));
    match (result, written) {
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(ConnectionError::Write(e)),
        (Ok(Outcome::Ended), Ok(())) => Ok(Served::Here),
        (Ok(Outcome::Adopt), Ok(())) => {
            let ctrl = ctrl.expect("an adopted queue is connected");
            let volume = ctrl.volume.clone().expect("I/O queues belong to volume controllers");
            let adopted = AdoptedQueue {
                stream,
                peer,
                reader: Box::new(reader),
                framing,
                ctrl,
                qid: info.qid.load(Ordering::Relaxed),
                entries: info.entries.load(Ordering::Relaxed),
                consumed: info.consumed.load(Ordering::Relaxed),
                shared: shared.clone(),
            };
            let back = match shared.registry.lookup(&volume) {
                Some(export) => match export.adopt_nvmf(adopted) {
                    Ok(()) => return Ok(Served::Adopted),
                    Err(back) => back,
                },
                None => adopted,
            };
            // Served here until its volume becomes writable here again.
            serve_queue(back.into(), shared)
        }
    }
}

/// Serves a queue a volume's reactor gave back, on this thread (see
/// [`AdoptedQueue::serve_on_threads`]).
pub(super) fn serve_resumed(q: AdoptedQueue) {
    let peer = q.peer;
    let shared = q.shared.clone();
    let closer = q.stream.try_clone().ok();
    match serve_queue(q.into(), &shared) {
        Ok(Served::Adopted) => return,
        Ok(Served::Here) => {}
        Err(e) => tracing::warn!("nvmf: {peer}: {}", ErrorChain(&e)),
    }
    if let Some(c) = closer {
        let _ = c.shutdown(Shutdown::Both);
    }
}

pub(super) fn would_block(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

/// Sends a C2HTermReq for `e` (best effort: the connection ends either way).
fn terminate(stream: &mut TcpStream, e: PduError) -> ConnectionError {
    let mut out = Vec::new();
    c2h_term_req(&mut out, &e);
    let _ = stream.write_all(&out);
    ConnectionError::Pdu(e)
}

/// The admin queue's own state.
#[derive(Debug)]
struct AdminState {
    cc: u32,
    csts: u32,
    kato_ms: u32,
    async_config: u32,
    /// Asynchronous Event Requests held, by command identifier.
    aers: Vec<u16>,
    ana: AnaState,
    ana_changes: u64,
    /// An ANA change not yet reported (no AER was held when it happened).
    notice_owed: bool,
    /// The namespace's size as last seen, and whether it changed since the Changed
    /// Namespace List was last read; a namespace attribute notice not yet reported.
    ns_bytes: u64,
    ns_changed: bool,
    ns_notice_owed: bool,
    last_heard: Instant,
}

struct Queue<'a> {
    shared: &'a Shared,
    peer: SocketAddr,
    local: SocketAddr,
    reader: PduReader,
    framing: Framing,
    info: Arc<QueueInfo>,
    out: Sender<Vec<u8>>,
    io: Sender<IoReply>,
    ctrl: Option<Arc<Controller>>,
    admin: Option<AdminState>,
    transfers: Transfers,
    last_tick: Instant,
    /// It just connected, or its volume just became writable here: stop here and offer it.
    adopt: bool,
    /// Whether the volume was writable here at the last look (an I/O queue's).
    was_writable: bool,
}

impl Queue<'_> {
    fn run(&mut self, stream: &mut TcpStream) -> Result<Outcome, ConnectionError> {
        loop {
            loop {
                match self.reader.next_pdu() {
                    Ok(Some(p)) => {
                        self.on_pdu(p)?;
                        if self.adopt {
                            return Ok(Outcome::Adopt);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Err(self.terminate_with(e)),
                }
            }
            match self.reader.fill(stream) {
                Ok(0) if self.reader.partial() => return Err(ConnectionError::Truncated),
                Ok(0) => return Ok(Outcome::Ended),
                Ok(_) => {}
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(ConnectionError::Read(e)),
            }
            if self.last_tick.elapsed() >= TICK {
                self.last_tick = Instant::now();
                if self.shared.shutdown.load(Ordering::Acquire) {
                    return Ok(Outcome::Ended);
                }
                self.tick()?;
                if self.adopt {
                    return Ok(Outcome::Adopt);
                }
            }
        }
    }

    /// Periodic work: the controller of an I/O queue still alive; the admin queue's keep
    /// alive timer and ANA state.
    fn tick(&mut self) -> Result<(), ConnectionError> {
        let Some(ctrl) = self.ctrl.clone() else { return Ok(()) };
        let Some(a) = self.admin.as_mut() else {
            if !ctrl.alive.load(Ordering::Acquire) {
                return Err(ConnectionError::ControllerGone(ctrl.cntlid));
            }
            // A queue served here because its volume was not writable on this node (a
            // mirror, a volume that moved) goes to the volume's reactor once it is (a
            // failover, a switchover back), between two commands.
            let writable =
                ctrl.volume.as_deref().and_then(|v| self.shared.registry.lookup(v)).is_some_and(|e| !e.read_only());
            let idle = self.info.in_flight.load(Ordering::Acquire) == 0 && self.transfers.is_empty();
            if writable && !self.was_writable && idle {
                self.adopt = true;
            }
            self.was_writable = writable;
            return Ok(());
        };
        if a.kato_ms > 0 && a.last_heard.elapsed() > Duration::from_millis(2 * u64::from(a.kato_ms)) {
            return Err(ConnectionError::KeepAlive(a.last_heard.elapsed().as_millis()));
        }
        let Some(volume) = &ctrl.volume else { return Ok(()) };
        let state = self.shared.ana_state(volume);
        if state != a.ana {
            tracing::info!(
                "nvmf: {}: controller {:#06x} of {}: ANA state {:?} -> {state:?}",
                self.peer,
                ctrl.cntlid,
                ctrl.subnqn,
                a.ana
            );
            a.ana = state;
            a.ana_changes += 1;
            ctrl.ana.store(state as u8, Ordering::Release);
            if a.async_config & OAES_ANA_CHANGE != 0 {
                a.notice_owed = true;
            }
        }
        // The volume grew (`volume resize`): the host reads the new size on its next
        // Identify, which the notice prompts.
        let bytes = self.shared.registry.lookup(volume).map_or(a.ns_bytes, |e| e.size());
        if bytes != a.ns_bytes {
            tracing::info!(
                "nvmf: {}: controller {:#06x} of {}: namespace size {} -> {bytes} bytes",
                self.peer,
                ctrl.cntlid,
                ctrl.subnqn,
                a.ns_bytes
            );
            a.ns_bytes = bytes;
            a.ns_changed = true;
            if a.async_config & OAES_NS_ATTRIBUTE != 0 {
                a.ns_notice_owed = true;
            }
        }
        self.send_owed_notice();
        Ok(())
    }

    fn send_owed_notice(&mut self) {
        let Some(a) = self.admin.as_mut() else { return };
        if !a.notice_owed && !a.ns_notice_owed {
            return;
        }
        let Some(cid) = a.aers.pop() else { return };
        let dw0 = if a.notice_owed {
            a.notice_owed = false;
            // Notice (type 2), ANA change (info 03h), log page 0Ch.
            2 | (0x03 << 8) | (0x0c << 16)
        } else {
            a.ns_notice_owed = false;
            // Notice (type 2), namespace attribute changed (info 00h), log page 04h.
            2 | (0x04 << 16)
        };
        self.respond(cid, dw0, 0, Status::SUCCESS);
    }

    fn on_pdu(&mut self, pdu: Pdu) -> Result<(), ConnectionError> {
        match pdu {
            Pdu::CapsuleCmd { sqe, data } => {
                self.info.consumed.fetch_add(1, Ordering::Relaxed);
                self.on_command(sqe, data)
            }
            Pdu::H2CData { cccid, ttag, datao, data, last } => self.on_h2c_data(cccid, ttag, datao, data, last),
            Pdu::TermReq { fes, fei } => Err(ConnectionError::HostTerminated { fes, fei }),
            Pdu::IcReq { .. } => Err(ConnectionError::Protocol("a second ICReq".into())),
        }
    }

    /// Ends the connection with a termination request for `e`.
    fn terminate_with(&self, e: PduError) -> ConnectionError {
        let mut out = Vec::new();
        c2h_term_req(&mut out, &e);
        let _ = self.out.send(out);
        ConnectionError::Pdu(e)
    }

    fn on_h2c_data(
        &mut self,
        cccid: u16,
        ttag: u16,
        datao: u32,
        data: Vec<u8>,
        last: bool,
    ) -> Result<(), ConnectionError> {
        match self.transfers.receive(cccid, ttag, datao, &data, last) {
            Ok(Some((sqe, data))) => self.dispatch(sqe, data),
            Ok(None) => Ok(()),
            Err(e) => Err(self.terminate_with(e)),
        }
    }

    fn on_command(&mut self, sqe: [u8; 64], data: Vec<u8>) -> Result<(), ConnectionError> {
        let cid = u16_at(&sqe, 2);
        match transfer::data_of(&sqe, data) {
            Data::Here(data) => self.dispatch(sqe, data),
            Data::Refuse(status) => {
                self.respond(cid, 0, 0, status);
                Ok(())
            }
            // Data the host sends, not in the capsule: fetched with an R2T first.
            Data::Fetch(_) if self.ctrl.is_none() && sqe[0] != OPC_FABRICS => {
                self.respond(cid, 0, 0, Status::SEQUENCE_ERROR);
                Ok(())
            }
            Data::Fetch(len) => {
                let limit = self.info.entries.load(Ordering::Relaxed).max(1) as usize;
                match self.transfers.start(sqe, len, limit) {
                    Ok(ttag) => {
                        let mut out = Vec::new();
                        self.framing.r2t(&mut out, cid, ttag, 0, u32_at(&sqe, 32));
                        let _ = self.out.send(out);
                        Ok(())
                    }
                    Err(NotStarted::TooLarge) => {
                        self.respond(cid, 0, 0, Status::DATA_SGL_LENGTH);
                        Ok(())
                    }
                    Err(NotStarted::TooMany) => {
                        Err(ConnectionError::Protocol(format!("more than {limit} write transfers at once")))
                    }
                }
            }
        }
    }

    /// A command with all its data at hand.
    fn dispatch(&mut self, sqe: [u8; 64], data: Vec<u8>) -> Result<(), ConnectionError> {
        let cid = u16_at(&sqe, 2);
        if let Some(a) = self.admin.as_mut() {
            a.last_heard = Instant::now();
        }
        if sqe[0] == OPC_FABRICS {
            return self.fabrics(&sqe, cid, &data);
        }
        if self.ctrl.is_none() {
            self.respond(cid, 0, 0, Status::SEQUENCE_ERROR);
            return Ok(());
        }
        if self.admin.is_some() {
            self.admin_command(&sqe, cid);
            Ok(())
        } else {
            self.io_command(&sqe, cid, data)
        }
    }

    fn respond(&self, cid: u16, dw0: u32, dw1: u32, status: Status) {
        let mut out = Vec::with_capacity(32);
        let qid = self.info.qid.load(Ordering::Relaxed);
        self.framing.capsule_resp(&mut out, &cqe(dw0, dw1, self.info.sqhd(), qid, cid, status));
        let _ = self.out.send(out);
    }

    /// Data for the host (at most the `want` bytes its SGL describes, zero-filled up to it),
    /// then a successful completion.
    fn respond_data(&self, cid: u16, sqe: &[u8; 64], page: &[u8], from: usize) {
        let want = u32_at(sqe, 32) as usize;
        let mut data = vec![0u8; want.min(TRANSFER_BYTES_MAX)];
        if from < page.len() {
            let n = (page.len() - from).min(data.len());
            data[..n].copy_from_slice(&page[from..from + n]);
        }
        let mut out = Vec::with_capacity(data.len() + 64);
        if !data.is_empty() {
            self.framing.c2h_data(&mut out, cid, 0, &data, true);
        }
        let qid = self.info.qid.load(Ordering::Relaxed);
        self.framing.capsule_resp(&mut out, &cqe(0, 0, self.info.sqhd(), qid, cid, Status::SUCCESS));
        let _ = self.out.send(out);
    }

    fn io_command(&mut self, sqe: &[u8; 64], cid: u16, data: Vec<u8>) -> Result<(), ConnectionError> {
        let ctrl = self.ctrl.clone().expect("connected");
        let volume = ctrl.volume.as_deref().expect("I/O queues belong to volume controllers");
        let export = match self.shared.registry.lookup(volume) {
            Some(e) if !e.read_only() => e,
            _ => {
                self.respond(cid, 0, 0, Status::ANA_INACCESSIBLE);
                return Ok(());
            }
        };
        if let Some(refused) = self.shared.ana_state(volume).refusal() {
            self.respond(cid, 0, 0, refused);
            return Ok(());
        }
        let request = match command::decode(sqe, &data, export.size()) {
            Err(status) => {
                self.respond(cid, 0, 0, status);
                return Ok(());
            }
            Ok(IoOp::Flush) => IoRequest::Flush,
            Ok(IoOp::Read { offset, len }) => IoRequest::Read { offset, len },
            Ok(IoOp::Write { offset, fua, .. }) => IoRequest::Write { offset, data, fua },
            Ok(IoOp::WriteZeroes { offset, len, fua }) => IoRequest::WriteZeroes { offset, len, fua },
            Ok(IoOp::Trims(trims)) => {
                let status = self.deallocate(export.as_ref(), trims);
                self.respond(cid, 0, 0, status);
                return Ok(());
            }
        };
        let entries = self.info.entries.load(Ordering::Relaxed) as usize;
        if self.info.in_flight.load(Ordering::Acquire) >= entries {
            return Err(ConnectionError::Protocol(format!("more than the queue's {entries} commands outstanding")));
        }
        self.info.in_flight.fetch_add(1, Ordering::AcqRel);
        let cookie = u64::from(cid) | if matches!(request, IoRequest::Read { .. }) { COOKIE_READ } else { 0 };
        export.submit(request, Completer::new(cookie, self.io.clone()));
        Ok(())
    }

    /// Dataset Management: the deallocate ranges' trims, served one after the other before
    /// the command is answered (a command rare enough to wait for here).
    fn deallocate(&self, export: &dyn Export, trims: Vec<(u64, u32)>) -> Status {
        for (offset, len) in trims {
            let (tx, rx) = crossbeam_channel::bounded(1);
            export.submit(IoRequest::Trim { offset, len }, Completer::new(0, tx));
            match rx.recv_timeout(TRIM_TIMEOUT) {
                Ok(IoReply { result: Ok(_), .. }) => {}
                Ok(IoReply { result: Err(e), .. }) => {
                    tracing::warn!("nvmf: {}: deallocate of {len} bytes at {offset} failed: {e}", self.peer);
                    return Status::INTERNAL;
                }
                Err(_) => return Status::INTERNAL,
            }
        }
        Status::SUCCESS
    }
}
