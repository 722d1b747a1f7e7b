//! An NVMe/TCP I/O queue served by the reactor of the volume it belongs to, as NBD
//! connections are ([`crate::frontend::nbd::Session`]): a non-blocking socket, the PDUs
//! read from it, and the answers gathered for it, with no thread between the socket and
//! the volume.
//!
//! A queue reaches a reactor once its Fabrics Connect is answered ([`Export::adopt_nvmf`]
//! with an [`AdoptedQueue`]). The reactor drives an [`IoSession`] in passes, through the
//! same calls as an NBD session: [`IoSession::fill`], [`IoSession::next_command`] (which
//! answers what it refuses itself, and fetches a large write's data with R2T before it
//! hands the write out), [`IoSession::reply`] / [`IoSession::reply_read`], and
//! [`IoSession::flush`]. Commands come out as the NBD session's [`Command`]s, their cookie
//! the command identifier. A Dataset Management command becomes one trim per range, and is
//! answered once all of them are.
//!
//! When the reactor lets go of the volume (a switchover, a stop), the queue goes back to
//! threads of its own ([`AdoptedQueue::serve_on_threads`]), where the path's ANA state
//! answers for it.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::command::{self, IoOp};
use super::pdu::{c2h_term_req, Framing, Pdu, PduError, PduReader};
use super::queue::{cqe, ConnectionError};
use super::transfer::{self, Data, NotStarted, Transfers};
use super::{Controller, Shared, Status};
use crate::frontend::nbd::Command;
#[cfg(doc)]
use crate::frontend::Export;

/// Answer bytes waiting for the socket past which no new command is taken.
const OUT_HIGH_BYTES: usize = 4 << 20;
/// Cookie bit: the command is one trim of a Dataset Management command.
const COOKIE_DSM: u64 = 1 << 16;

/// An I/O queue whose Connect was answered, handed to the volume's reactor whole, with the
/// bytes read past the Connect.
pub struct AdoptedQueue {
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) reader: Box<PduReader>,
    pub(super) framing: Framing,
    pub(super) ctrl: Arc<Controller>,
    pub(super) qid: u16,
    pub(super) entries: u32,
    pub(super) consumed: u32,
    pub(super) shared: Arc<Shared>,
}

impl AdoptedQueue {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Serves the queue on threads of its own, through the export the registry names for
    /// its volume (which may be another node's by then: the path is then inaccessible).
    pub fn serve_on_threads(self) {
        let peer = self.peer;
        let spawned =
            std::thread::Builder::new().name(format!("nvmf-{peer}")).spawn(move || super::queue::serve_resumed(self));
        if let Err(e) = spawned {
            tracing::warn!("nvmf: {peer}: cannot start a thread for the queue: {e}; closed");
        }
    }
}

impl std::fmt::Debug for AdoptedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdoptedQueue").field("peer", &self.peer).field("qid", &self.qid).finish()
    }
}

/// See the module documentation.
pub struct IoSession {
    q: AdoptedQueue,
    size: u64,
    /// Answers gathered and not yet written: `out[sent..]`.
    out: Vec<u8>,
    sent: usize,
    /// Commands handed out and not yet answered (a Dataset Management counts once).
    in_flight: usize,
    transfers: Transfers,
    /// The data of the last write handed out (see [`IoSession::data`]).
    write_data: Vec<u8>,
    /// Trims of a Dataset Management command not yet handed out.
    queued: VecDeque<Command>,
    /// Dataset Management commands in flight: trims outstanding, and the first failure.
    dsm: HashMap<u16, (usize, Status)>,
    eof: bool,
    failed: Option<ConnectionError>,
}

impl IoSession {
    /// The namespace's new size (a grown volume): commands are checked against it.
    pub fn set_size(&mut self, size: u64) {
        self.size = size;
    }

    /// Takes over an adopted queue of a namespace of `size` bytes.
    pub fn new(q: AdoptedQueue, size: u64) -> io::Result<IoSession> {
        q.stream.set_nonblocking(true)?;
        q.stream.set_nodelay(true)?;
        Ok(IoSession {
            q,
            size,
            out: Vec::with_capacity(256 << 10),
            sent: 0,
            in_flight: 0,
            transfers: Transfers::default(),
            write_data: Vec::new(),
            queued: VecDeque::new(),
            dsm: HashMap::new(),
            eof: false,
            failed: None,
        })
    }

    /// A session over a connected socket whose ICReq was answered with `framing` and whose
    /// Connect made it I/O queue 1 of a controller of volume `fuzz` (for tests and fuzzing;
    /// a node's sessions come from [`Export::adopt_nvmf`]). It cannot be given back to
    /// threads.
    pub fn over(stream: TcpStream, size: u64, framing: Framing) -> io::Result<IoSession> {
        struct Nothing;
        impl crate::frontend::ExportRegistry for Nothing {
            fn lookup(&self, _: &str) -> Option<Arc<dyn crate::frontend::Export>> {
                None
            }
            fn names(&self) -> Vec<String> {
                Vec::new()
            }
        }
        let shared = Arc::new(Shared {
            registry: Arc::new(Nothing),
            controllers: parking_lot::Mutex::new(HashMap::new()),
            shutdown: std::sync::atomic::AtomicBool::new(false),
            port: 0,
            next_cntlid: std::sync::atomic::AtomicU16::new(0),
        });
        let peer = stream.peer_addr()?;
        let ctrl = shared.new_controller(Some("fuzz".into()), super::subsystem_nqn("fuzz"), String::new(), peer);
        let mut reader = PduReader::new(super::INLINE_DATA_BYTES, super::H2C_DATA_BYTES_MAX);
        reader.initialize(framing.header_digest, framing.data_digest);
        let q = AdoptedQueue {
            stream,
            peer,
            reader: Box::new(reader),
            framing,
            ctrl,
            qid: 1,
            entries: u32::from(super::IO_QUEUE_ENTRIES),
            consumed: 1,
            shared,
        };
        IoSession::new(q, size)
    }

    pub fn peer(&self) -> SocketAddr {
        self.q.peer
    }

    /// Commands handed out and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn fd(&self) -> RawFd {
        self.q.stream.as_raw_fd()
    }

    /// Reads what the socket holds, until it has nothing more or the buffer is full;
    /// whether anything came (or more waits: the socket is watched edge-triggered, so a
    /// full buffer asks for another pass, after its PDUs are decoded).
    pub fn fill(&mut self) -> bool {
        if self.eof || self.failed.is_some() {
            return false;
        }
        if !self.q.ctrl.alive.load(Ordering::Acquire) {
            self.failed = Some(ConnectionError::ControllerGone(self.q.ctrl.cntlid));
            return false;
        }
        let mut worked = false;
        loop {
            if self.q.reader.full() {
                return true;
            }
            match self.q.reader.fill(&mut (&self.q.stream)) {
                Ok(0) => {
                    self.eof = true;
                    if self.q.reader.partial() {
                        self.failed = Some(ConnectionError::Truncated);
                    }
                    return true;
                }
                Ok(_) => worked = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.failed = Some(ConnectionError::Read(e));
                    return true;
                }
            }
        }
        worked
    }

    fn sqhd(&self) -> u16 {
        u16::try_from(self.q.consumed % self.q.entries.max(1)).unwrap_or(0)
    }

    fn respond(&mut self, cid: u16, status: Status) {
        let c = cqe(0, 0, self.sqhd(), self.q.qid, cid, status);
        self.q.framing.capsule_resp(&mut self.out, &c);
    }

    fn terminate(&mut self, e: PduError) {
        c2h_term_req(&mut self.out, &e);
        self.failed = Some(ConnectionError::Pdu(e));
    }

    /// The next command to serve, if a whole one is buffered (and the answers waiting
    /// leave room for it).
    pub fn next_command(&mut self) -> Option<Command> {
        if let Some(c) = self.queued.pop_front() {
            return Some(c);
        }
        if self.failed.is_some() || self.out.len() - self.sent > OUT_HIGH_BYTES {
            return None;
        }
        loop {
            let pdu = match self.q.reader.next_pdu() {
                Ok(Some(p)) => p,
                Ok(None) => return None,
                Err(e) => {
                    self.terminate(e);
                    return None;
                }
            };
            let command = match pdu {
                Pdu::CapsuleCmd { sqe, data } => {
                    self.q.consumed = self.q.consumed.wrapping_add(1);
                    self.capsule(sqe, data)
                }
                Pdu::H2CData { cccid, ttag, datao, data, last } => self.h2c_data(cccid, ttag, datao, &data, last),
                Pdu::TermReq { fes, fei } => {
                    self.failed = Some(ConnectionError::HostTerminated { fes, fei });
                    return None;
                }
                Pdu::IcReq { .. } => {
                    self.failed = Some(ConnectionError::Protocol("a second ICReq".into()));
                    return None;
                }
            };
            if self.failed.is_some() {
                return None;
            }
            if command.is_some() {
                return command;
            }
        }
    }

    fn capsule(&mut self, sqe: [u8; 64], data: Vec<u8>) -> Option<Command> {
        let opcode = sqe[0];
        let cid = u16::from_le_bytes([sqe[2], sqe[3]]);
        if opcode == 0x7f {
            // Fabrics commands other than the Connect this queue already made.
            self.respond(cid, if sqe[4] == 0x01 { Status::SEQUENCE_ERROR } else { Status::INVALID_FIELD });
            return None;
        }
        match transfer::data_of(&sqe, data) {
            Data::Here(data) => self.command(sqe, cid, data),
            Data::Refuse(status) => {
                self.respond(cid, status);
                None
            }
            Data::Fetch(len) => {
                let limit = (self.q.entries as usize).saturating_sub(self.in_flight);
                match self.transfers.start(sqe, len, limit) {
                    Ok(ttag) => {
                        let r2tl = u32::try_from(len).unwrap_or(u32::MAX);
                        self.q.framing.r2t(&mut self.out, cid, ttag, 0, r2tl);
                    }
                    Err(NotStarted::TooLarge) => self.respond(cid, Status::DATA_SGL_LENGTH),
                    Err(NotStarted::TooMany) => {
                        let why = format!("more than the queue's {} commands outstanding", self.q.entries);
                        self.failed = Some(ConnectionError::Protocol(why));
                    }
                }
                None
            }
        }
    }

    fn h2c_data(&mut self, cccid: u16, ttag: u16, datao: u32, data: &[u8], last: bool) -> Option<Command> {
        match self.transfers.receive(cccid, ttag, datao, data, last) {
            Ok(Some((sqe, data))) => self.command(sqe, u16::from_le_bytes([sqe[2], sqe[3]]), data),
            Ok(None) => None,
            Err(e) => {
                self.terminate(e);
                None
            }
        }
    }

    fn command(&mut self, sqe: [u8; 64], cid: u16, data: Vec<u8>) -> Option<Command> {
        if self.in_flight >= self.q.entries as usize {
            let why = format!("more than the queue's {} commands outstanding", self.q.entries);
            self.failed = Some(ConnectionError::Protocol(why));
            return None;
        }
        let cookie = u64::from(cid);
        let command = match command::decode(&sqe, &data, self.size) {
            Err(status) => {
                self.respond(cid, status);
                return None;
            }
            Ok(IoOp::Flush) => Command::Flush { cookie },
            Ok(IoOp::Read { offset, len }) => Command::Read { cookie, offset, len },
            Ok(IoOp::Write { offset, fua, .. }) => {
                let len = data.len();
                self.write_data = data;
                Command::Write { cookie, offset, data: 0..len, fua }
            }
            Ok(IoOp::WriteZeroes { offset, len, fua }) => Command::WriteZeroes { cookie, offset, len, fua },
            Ok(IoOp::Trims(trims)) => {
                if trims.is_empty() {
                    self.respond(cid, Status::SUCCESS);
                    return None;
                }
                self.dsm.insert(cid, (trims.len(), Status::SUCCESS));
                self.queued.extend(trims.into_iter().map(|(offset, len)| Command::Trim {
                    cookie: cookie | COOKIE_DSM,
                    offset,
                    len,
                }));
                self.queued.pop_front()?
            }
        };
        self.in_flight += 1;
        Some(command)
    }

    /// The payload of a write handed out by [`Self::next_command`], valid until the next.
    pub fn data(&self, range: Range<usize>) -> &[u8] {
        &self.write_data[range]
    }

    /// The status of a failed command: a path error where the volume is no longer writable
    /// here (the host retries on the path that is), else the volume's own failure.
    fn failure_status(&self) -> Status {
        let path = self.q.ctrl.volume.as_deref().and_then(|v| self.q.shared.ana_state(v).refusal());
        path.unwrap_or(Status::INTERNAL)
    }

    /// Answers a command other than a read.
    pub fn reply(&mut self, cookie: u64, result: io::Result<()>) {
        let cid = (cookie & 0xffff) as u16;
        let status = match &result {
            Ok(()) => Status::SUCCESS,
            Err(e) => {
                tracing::debug!("nvmf: {}: command {cid} on queue {} failed: {e}", self.q.peer, self.q.qid);
                self.failure_status()
            }
        };
        if cookie & COOKIE_DSM != 0 {
            let Some((left, first)) = self.dsm.get_mut(&cid) else { return };
            *left -= 1;
            if *first == Status::SUCCESS {
                *first = status;
            }
            if *left > 0 {
                return;
            }
            let (_, status) = self.dsm.remove(&cid).expect("present");
            self.in_flight -= 1;
            return self.respond(cid, status);
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        self.respond(cid, status);
    }

    /// Answers a read: `fill` writes the `len` bytes read from `offset` straight into the
    /// answer's data PDU.
    pub fn reply_read(&mut self, cookie: u64, offset: u64, len: u32, fill: impl FnOnce(&mut [u8]) -> io::Result<()>) {
        let _ = offset;
        let cid = (cookie & 0xffff) as u16;
        self.in_flight = self.in_flight.saturating_sub(1);
        let mark = self.out.len();
        let at = self.q.framing.c2h_data_head(&mut self.out, cid, 0, len as usize, true);
        self.out.resize(at + len as usize, 0);
        match fill(&mut self.out[at..]) {
            Ok(()) => {
                self.q.framing.c2h_data_digest(&mut self.out, at);
                self.respond(cid, Status::SUCCESS);
            }
            Err(e) => {
                self.out.truncate(mark);
                tracing::debug!("nvmf: {}: read of {len} bytes at {offset} failed: {e}", self.q.peer);
                let status = self.failure_status();
                self.respond(cid, status);
            }
        }
    }

    /// Writes what is gathered, as far as the socket takes it; whether anything went.
    pub fn flush(&mut self) -> bool {
        let mut worked = false;
        while self.sent < self.out.len() {
            match (&self.q.stream).write(&self.out[self.sent..]) {
                Ok(0) => {
                    self.failed.get_or_insert(ConnectionError::Write(io::ErrorKind::WriteZero.into()));
                    self.sent = self.out.len();
                    break;
                }
                Ok(n) => {
                    self.sent += n;
                    worked = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    if self.failed.is_none() {
                        self.failed = Some(ConnectionError::Write(e));
                    }
                    self.sent = self.out.len();
                    break;
                }
            }
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        }
        worked
    }

    /// Whether the session is over: the host left, or it failed, and nothing it is owed
    /// remains to be written.
    pub fn finished(&self) -> bool {
        (self.eof || self.failed.is_some()) && self.in_flight == 0 && self.out.is_empty()
    }

    pub fn error(&self) -> Option<&ConnectionError> {
        self.failed.as_ref()
    }

    /// Gives the queue back for threads of its own; refused (the session returned) while
    /// anything is in flight or half received, or after a failure.
    pub fn release(self) -> Result<AdoptedQueue, Box<IoSession>> {
        let busy = self.in_flight > 0 || !self.transfers.is_empty() || !self.queued.is_empty();
        if busy || self.failed.is_some() || self.sent < self.out.len() {
            return Err(Box::new(self));
        }
        let _ = self.q.stream.set_nonblocking(false);
        Ok(self.q)
    }

    pub fn close(&self) {
        let _ = self.q.stream.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // small, fixed block numbers and patterns
mod tests {
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::frontend::nvmf::client::{Command as HostCommand, HostQueue};
    use crate::storage::{BlockDevice, MemDevice};

    /// Serves `session` from `dev` as a reactor would, until the host leaves.
    fn serve(mut session: IoSession, dev: &MemDevice) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !session.finished() && Instant::now() < deadline {
            session.fill();
            while let Some(c) = session.next_command() {
                match c {
                    Command::Read { cookie, offset, len } => {
                        session.reply_read(cookie, offset, len, |b| dev.read_at(b, offset));
                    }
                    Command::Write { cookie, offset, data, .. } => {
                        let r = dev.write_at(session.data(data).to_vec().as_slice(), offset);
                        session.reply(cookie, r);
                    }
                    Command::Trim { cookie, offset, len } | Command::WriteZeroes { cookie, offset, len, .. } => {
                        let r = dev.write_at(&vec![0u8; len as usize], offset);
                        session.reply(cookie, r);
                    }
                    Command::Flush { cookie } => session.reply(cookie, Ok(())),
                    Command::BlockStatus { cookie, .. } => session.reply(cookie, Err(io::Error::other("none"))),
                }
            }
            session.flush();
            std::thread::sleep(Duration::from_micros(100));
        }
        session.close();
    }

    #[test]
    fn a_reactor_session_serves_in_capsule_and_r2t_writes_reads_and_deallocates_with_digests() {
        for digests in [false, true] {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let host = std::thread::spawn(move || {
                let mut q = HostQueue::open(addr, digests, digests).unwrap();
                q.inline_max = crate::frontend::nvmf::INLINE_DATA_BYTES;
                let mut results = Vec::new();
                for (slba, blocks, seed) in [(0u64, 1u32, 1u8), (8, 64, 2), (100, 256, 3)] {
                    let data: Vec<u8> = (0..blocks as usize * 4096).map(|i| (i as u8) ^ seed).collect();
                    let mut w = HostCommand::new(0x01, 1).dword(10, slba as u32).dword(12, blocks - 1);
                    w.data_out = data.clone();
                    results.push(q.execute(w).unwrap().0.ok());
                    let mut r = HostCommand::new(0x02, 1).dword(10, slba as u32).dword(12, blocks - 1);
                    r.data_in = data.len();
                    let (done, back) = q.execute(r).unwrap();
                    results.push(done.ok() && back == data);
                }
                let mut dsm = HostCommand::new(0x09, 1).dword(10, 1).dword(11, 1 << 2);
                for (slba, n) in [(8u64, 2u32), (100, 1)] {
                    dsm.data_out.extend_from_slice(&0u32.to_le_bytes());
                    dsm.data_out.extend_from_slice(&n.to_le_bytes());
                    dsm.data_out.extend_from_slice(&slba.to_le_bytes());
                }
                results.push(q.execute(dsm).unwrap().0.ok());
                let bad = q.execute(HostCommand::new(0x02, 1).dword(10, 4096).dword(12, 0)).unwrap().0;
                results.push(bad.status == Status::LBA_OUT_OF_RANGE);
                results
            });
            let (stream, _) = l.accept().unwrap();
            // The ICReq, answered as the accepting thread does before adoption.
            let mut ic = [0u8; 128];
            std::io::Read::read_exact(&mut &stream, &mut ic).unwrap();
            let framing = Framing { header_digest: ic[11] & 1 != 0, data_digest: ic[11] & 2 != 0, hpda: 0 };
            let mut resp = Vec::new();
            framing.ic_resp(&mut resp, 128 << 10);
            (&stream).write_all(&resp).unwrap();
            let dev = MemDevice::new(4 << 20);
            let session = IoSession::over(stream, dev.size(), framing).unwrap();
            let server = std::thread::spawn(move || {
                serve(session, &dev);
                dev
            });
            let results = host.join().unwrap();
            assert!(results.iter().all(|&ok| ok), "digests {digests}: {results:?}");
            let dev = server.join().unwrap();
            let mut b = vec![1u8; 8192];
            dev.read_at(&mut b, 8 << 12).unwrap();
            assert!(b.iter().all(|&x| x == 0), "the deallocated blocks were trimmed");
        }
    }
}
