//! The poller's own client connections: NBD sessions and NVMe/TCP I/O queues it reads,
//! serves and answers on its thread (run to completion, see `crate::poller`).
//!
//! A connection reaches the poller once, when its handshake names the volume
//! ([`crate::frontend::Export::adopt`]). From then on each pass reads what its socket
//! holds, decodes whole requests, logs writes straight from the session's read buffer
//! into the NVLog, serves reads from the cache and the volume into the reply buffer, and
//! at the end of the pass writes every reply gathered with one system call per
//! connection. A write's reply waits (as a [`ReplyTo::Client`] in `pending`) until the
//! destination's ack covers it, exactly as a submitted request's [`Completer`] does.

use std::io;

use super::{Poller, REWRITE_BYTES_MAX};
use crate::format::{EntryKind, BLOCK_BYTES};
use crate::frontend::nbd::{Adopted, Command, Session};
use crate::frontend::nvmf::{AdoptedQueue, IoSession};
use crate::frontend::Completer;
use crate::transport::Connector;
use crate::usize_of;

/// Who is owed the answer to a mutation.
pub(super) enum ReplyTo {
    /// A request submitted through [`crate::frontend::Export::submit`].
    Submitter(Completer),
    /// A request of one of the poller's own sessions: its slot, the slot's generation
    /// when the request was taken (a reused slot is another connection), and the cookie.
    Client { slot: usize, gen: u64, cookie: u64 },
}

/// A client connection the poller serves: an NBD session, or an NVMe/TCP I/O queue. Both
/// hand out the same [`Command`]s and take the same answers.
enum Conn {
    Nbd(Session),
    Nvmf(Box<IoSession>),
}

impl Conn {
    fn protocol(&self) -> &'static str {
        match self {
            Conn::Nbd(_) => "nbd",
            Conn::Nvmf(_) => "nvmf",
        }
    }
    fn peer(&self) -> std::net::SocketAddr {
        match self {
            Conn::Nbd(s) => s.peer(),
            Conn::Nvmf(s) => s.peer(),
        }
    }
    fn fd(&self) -> std::os::fd::RawFd {
        match self {
            Conn::Nbd(s) => s.fd(),
            Conn::Nvmf(s) => s.fd(),
        }
    }
    fn fill(&mut self) -> bool {
        match self {
            Conn::Nbd(s) => s.fill(),
            Conn::Nvmf(s) => s.fill(),
        }
    }
    fn next_command(&mut self) -> Option<Command> {
        match self {
            Conn::Nbd(s) => s.next_command(),
            Conn::Nvmf(s) => s.next_command(),
        }
    }
    fn data(&self, range: std::ops::Range<usize>) -> &[u8] {
        match self {
            Conn::Nbd(s) => s.data(range),
            Conn::Nvmf(s) => s.data(range),
        }
    }
    fn reply(&mut self, cookie: u64, result: io::Result<()>) {
        match self {
            Conn::Nbd(s) => s.reply(cookie, result),
            Conn::Nvmf(s) => s.reply(cookie, result),
        }
    }
    fn reply_read(&mut self, cookie: u64, offset: u64, len: u32, fill: impl FnOnce(&mut [u8]) -> io::Result<()>) {
        match self {
            Conn::Nbd(s) => s.reply_read(cookie, offset, len, fill),
            Conn::Nvmf(s) => s.reply_read(cookie, offset, len, fill),
        }
    }
    fn flush(&mut self) -> bool {
        match self {
            Conn::Nbd(s) => s.flush(),
            Conn::Nvmf(s) => s.flush(),
        }
    }
    fn finished(&self) -> bool {
        match self {
            Conn::Nbd(s) => s.finished(),
            Conn::Nvmf(s) => s.finished(),
        }
    }
    fn error(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Conn::Nbd(s) => s.error().map(|e| e as _),
            Conn::Nvmf(s) => s.error().map(|e| e as _),
        }
    }
    fn close(&mut self) {
        match self {
            Conn::Nbd(s) => s.close(),
            Conn::Nvmf(s) => s.close(),
        }
    }
}

/// A connection in its slot.
struct Client {
    session: Conn,
    gen: u64,
}

/// The poller's sessions, in slots that keep their index for as long as the connection
/// lives (requests in flight name it).
#[derive(Default)]
pub(super) struct Clients {
    slots: Vec<Option<Client>>,
    next_gen: u64,
    /// The slot whose session is out of its slot being served, and answers for it that
    /// arrived meanwhile (delivered when it goes back).
    serving: Option<(usize, u64)>,
    deferred: Vec<(u64, io::Result<()>)>,
}

/// Sessions one poller serves at once; further connections are refused at adoption.
pub const SESSIONS_MAX: usize = 256;

impl Clients {
    /// The volume grew to `bytes`: NVMe/TCP queues address it from now on (their host
    /// hears of it by a namespace notice on its admin queue). An NBD connection keeps the
    /// size its handshake gave: the protocol has no way to tell it otherwise, and its
    /// client sees the new size when it connects again.
    pub(super) fn grown(&mut self, bytes: u64) {
        for c in self.slots.iter_mut().flatten() {
            if let Conn::Nvmf(s) = &mut c.session {
                s.set_size(bytes);
            }
        }
    }

    fn answer(&mut self, slot: usize, gen: u64, cookie: u64, result: io::Result<()>) {
        if self.serving == Some((slot, gen)) {
            self.deferred.push((cookie, result));
            return;
        }
        if let Some(Some(c)) = self.slots.get_mut(slot) {
            if c.gen == gen {
                c.session.reply(cookie, result);
            }
        }
        // Otherwise the connection is gone, and nobody is owed an answer.
    }

    fn take(&mut self, slot: usize) -> Option<Client> {
        let c = self.slots.get_mut(slot)?.take()?;
        self.serving = Some((slot, c.gen));
        Some(c)
    }

    fn put(&mut self, slot: usize, mut c: Client) {
        self.serving = None;
        for (cookie, result) in self.deferred.drain(..) {
            c.session.reply(cookie, result);
        }
        self.slots[slot] = Some(c);
    }
}

impl<C> Poller<C>
where
    C: Connector + 'static,
    C::Link: 'static,
{
    /// Answers a mutation (or a request that failed before it was logged).
    pub(super) fn answer(&mut self, to: ReplyTo, result: io::Result<()>) {
        match to {
            ReplyTo::Submitter(done) => done.complete(result.map(|()| None)),
            ReplyTo::Client { slot, gen, cookie } => self.clients.answer(slot, gen, cookie, result),
        }
    }

    /// Takes a connection whose handshake named this volume.
    pub(super) fn adopt(&mut self, adopted: Adopted) {
        let peer = adopted.peer();
        match Session::new(adopted, self.device.size(), false) {
            Ok(s) => self.take_client(Conn::Nbd(s)),
            Err(e) => tracing::warn!("nbd: {peer}: volume {}: cannot take the connection: {e}", self.cfg.volume),
        }
    }

    /// Takes an NVMe/TCP I/O queue of this volume that just connected.
    pub(super) fn adopt_nvmf(&mut self, adopted: AdoptedQueue) {
        let peer = adopted.peer();
        match IoSession::new(adopted, self.device.size()) {
            Ok(s) => self.take_client(Conn::Nvmf(Box::new(s))),
            Err(e) => tracing::warn!("nvmf: {peer}: volume {}: cannot take the queue: {e}", self.cfg.volume),
        }
    }

    fn take_client(&mut self, mut session: Conn) {
        let (peer, protocol) = (session.peer(), session.protocol());
        let slot = match self.clients.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None if self.clients.slots.len() < SESSIONS_MAX => {
                self.clients.slots.push(None);
                self.clients.slots.len() - 1
            }
            None => {
                tracing::warn!(
                    "{protocol}: {peer}: volume {} already serves {SESSIONS_MAX} connections; closed",
                    self.cfg.volume
                );
                return session.close();
            }
        };
        if let Some(r) = &self.readiness {
            if let Err(e) = r.register(session.fd(), CLIENT_TOKEN_BASE + slot) {
                tracing::warn!(
                    "{protocol}: {peer}: volume {}: cannot watch the connection: {e}; closed",
                    self.cfg.volume
                );
                return session.close();
            }
        }
        self.clients.next_gen += 1;
        self.clients.slots[slot] = Some(Client { session, gen: self.clients.next_gen });
    }

    /// Reads and serves what every session has; whether there was anything.
    pub(super) fn poll_clients(&mut self) -> bool {
        let mut worked = false;
        for slot in 0..self.clients.slots.len() {
            let Some(mut c) = self.clients.take(slot) else { continue };
            worked |= c.session.fill();
            // Writes waiting for log space go first, in order: while any waits, no new
            // request is taken; nor is one during a switchover's drain, while the write
            // throttle holds requests back, or while the log waits for the mirror's copy.
            while self.waiting.is_empty() && !self.quiesced && !self.throttled() && !self.held_for_mirror_log() {
                let Some(command) = c.session.next_command() else { break };
                worked = true;
                self.serve(&mut c.session, slot, c.gen, command);
            }
            self.clients.put(slot, c);
        }
        worked
    }

    fn serve(&mut self, session: &mut Conn, slot: usize, gen: u64, command: Command) {
        match command {
            Command::Read { cookie, offset, len } => {
                let (overlay, device) = (&self.overlay, self.device.as_ref());
                session.reply_read(cookie, offset, len, |buf| overlay.read(buf, offset, device));
            }
            // Answered from the volume's contents: the zero blocks of the range.
            Command::BlockStatus { cookie, offset, len, req_one } => {
                let mut data = vec![0u8; len as usize];
                let read = self.overlay.read(&mut data, offset, self.device.as_ref());
                match session {
                    Conn::Nbd(s) => s.reply_block_status(cookie, offset, req_one, read.map(|()| &data[..])),
                    // NVMe/TCP hands out no block status.
                    Conn::Nvmf(s) => s.reply(cookie, Err(io::Error::other("no block status over NVMe/TCP"))),
                }
            }
            // Every acknowledged write is already persistent on both sites (or, under
            // policy sync with the mirror away, here): a flush has nothing left to do, on
            // this connection or any other of the volume (NBD_FLAG_CAN_MULTI_CONN).
            Command::Flush { cookie } => session.reply(cookie, Ok(())),
            Command::Write { cookie, offset, data, .. } => {
                let len = data.len() as u64;
                self.mutate(EntryKind::Write, offset, len, session.data(data), ReplyTo::Client { slot, gen, cookie });
            }
            Command::Trim { cookie, offset, len } => {
                self.mutate(EntryKind::Trim, offset, u64::from(len), &[], ReplyTo::Client { slot, gen, cookie });
            }
            Command::WriteZeroes { cookie, offset, len, .. } => {
                let to = ReplyTo::Client { slot, gen, cookie };
                self.mutate(EntryKind::WriteZeroes, offset, u64::from(len), &[], to);
            }
        }
    }

    /// Writes every session's gathered replies, and ends the sessions that are over.
    pub(super) fn flush_clients(&mut self) -> bool {
        let mut worked = false;
        for slot in 0..self.clients.slots.len() {
            let Some(c) = &mut self.clients.slots[slot] else { continue };
            worked |= c.session.flush();
            if c.session.finished() {
                let mut c = self.clients.slots[slot].take().expect("the slot was just looked at");
                if let Some(e) = c.session.error() {
                    tracing::warn!(
                        "{}: {}: volume {}: {}",
                        c.session.protocol(),
                        c.session.peer(),
                        self.cfg.volume,
                        crate::frontend::nbd::ErrorChain(e)
                    );
                }
                if let Some(r) = &self.readiness {
                    r.deregister(c.session.fd());
                }
                c.session.close();
                worked = true;
            }
        }
        worked
    }

    /// Hands every session on to threads of its own, serving through the volume's handle
    /// (which forwards, after a switchover, or refuses, once stopped): the poller stops.
    /// Sessions with requests in flight were answered by the caller first.
    pub(super) fn release_clients(&mut self, why: &str) {
        for slot in 0..self.clients.slots.len() {
            let Some(c) = self.clients.slots[slot].take() else { continue };
            let mut session = c.session;
            session.flush();
            if let Some(r) = &self.readiness {
                r.deregister(session.fd());
            }
            let (peer, protocol) = (session.peer(), session.protocol());
            let released = match session {
                Conn::Nbd(s) => s.release().map(Adopted::serve_on_threads).map_err(|mut s| s.close()),
                Conn::Nvmf(s) => s.release().map(AdoptedQueue::serve_on_threads).map_err(|s| s.close()),
            };
            if released.is_err() {
                tracing::warn!("{protocol}: {peer}: volume {}: {why}; connection closed", self.cfg.volume);
            }
        }
    }

    /// Logs the current contents of `[offset, offset + len)` again (see
    /// [`Control::Rewrite`]). They are read and logged in this one step, so no client write
    /// falls between the two. Writes waiting for log space would: it is refused then, with
    /// `WouldBlock` (try again).
    pub(super) fn rewrite(&mut self, offset: u64, len: u64, done: Completer) {
        let to = ReplyTo::Submitter(done);
        if !self.waiting.is_empty() {
            let busy = io::Error::new(io::ErrorKind::WouldBlock, "writes are waiting for log space; try again");
            return self.answer(to, Err(busy));
        }
        let checked = crate::storage::check_range(self.device.size(), offset, len).and_then(|()| {
            let block = BLOCK_BYTES as u64;
            if !offset.is_multiple_of(block) || !len.is_multiple_of(block) || len > REWRITE_BYTES_MAX {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a rewrite is whole blocks, at most {REWRITE_BYTES_MAX} bytes"),
                ));
            }
            let mut data = vec![0u8; usize_of(len)];
            self.overlay.read(&mut data, offset, self.device.as_ref()).map(|()| data)
        });
        match checked {
            Ok(data) => self.mutate(EntryKind::Write, offset, len, &data, to),
            Err(e) => self.answer(to, Err(e)),
        }
    }

    /// Logs a mutation whose data (for a write) is `data`, and leaves its answer pending
    /// until the write is persistent on both sites; or queues it for log space.
    pub(super) fn mutate(&mut self, kind: EntryKind, offset: u64, len: u64, data: &[u8], to: ReplyTo) {
        if let Some(e) = self.write_refusal() {
            self.stats.write_errors += 1;
            return self.answer(to, Err(e));
        }
        if !self.waiting.is_empty() {
            let request = owned_request(kind, offset, len, data);
            return self.waiting.push_back(super::Waiting { request, done: Some(to), progress: 0 });
        }
        let mut progress = 0;
        match self.log_pieces(kind, offset, len, data, &mut progress) {
            Ok(true) => self.logged(len, to),
            Ok(false) => {
                let request = owned_request(kind, offset, len, data);
                self.waiting.push_back(super::Waiting { request, done: Some(to), progress });
            }
            Err(e) => {
                self.stats.write_errors += 1;
                self.answer(to, Err(e));
            }
        }
    }
}

/// Token numbers of client sockets in the poller's readiness set start here.
pub(super) const CLIENT_TOKEN_BASE: usize = 16;

/// A mutation as an owned request, for the queue of those waiting for log space (the only
/// place a session's write payload is copied before it is logged).
fn owned_request(kind: EntryKind, offset: u64, len: u64, data: &[u8]) -> crate::frontend::IoRequest {
    use crate::frontend::IoRequest;
    let len32 = || u32::try_from(len).unwrap_or(u32::MAX);
    match kind {
        EntryKind::Write => IoRequest::Write { offset, data: data.to_vec(), fua: false },
        EntryKind::Trim => IoRequest::Trim { offset, len: len32() },
        _ => IoRequest::WriteZeroes { offset, len: len32(), fua: false },
    }
}
