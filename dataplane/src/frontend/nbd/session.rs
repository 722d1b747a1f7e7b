//! A client connection in its transmission phase, owned by the reactor of the volume it
//! named: a non-blocking socket, the request bytes read from it, and the replies gathered
//! for it.
//!
//! The reactor drives a [`Session`] in passes: [`Session::fill`] reads whatever the socket
//! holds, [`Session::next_command`] decodes one whole request at a time (answering the ones it
//! refuses itself), the reactor serves each and answers through [`Session::reply`] or
//! [`Session::reply_read`], and [`Session::flush`] writes every reply gathered in the
//! pass with one system call. A write's payload is handed out as a range of the read
//! buffer, so the reactor logs it from there without another buffer in between.
//!
//! Bounds, as for the threaded connections of `super`: at most [`IN_FLIGHT_MAX`] requests
//! taken and unanswered, no new request while more than [`REPLY_BUFFER_BYTES`] of replies
//! wait for the socket, and a read buffer that grows past its starting size only to hold
//! one write of up to [`PAYLOAD_BYTES_MAX`].

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Weak;

use super::tls::TlsConn;
use super::{
    nbd_errno, push_block_status, push_error_chunk, push_read_head, Options, Request, ADOPTED_READ_BYTES,
    BLOCK_STATUS_SCAN_BYTES, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    IN_FLIGHT_MAX, PAYLOAD_BYTES_MAX, REPLY_BUFFER_BYTES, REQUEST_BYTES, SIMPLE_REPLY_MAGIC,
};
use crate::frontend::Export;

/// How long giving a session back may wait for its client to take the replies owed.
const RELEASE_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection whose handshake named an export, handed to that export whole (see
/// [`Export::adopt`]). `read_ahead` holds the bytes the handshake read past its end: the
/// first requests.
pub struct Adopted {
    pub(super) stream: TcpStream,
    /// The connection's TLS, where the handshake started it (`NBD_OPT_STARTTLS`): it holds
    /// whatever it decrypted and was not read yet, after `read_ahead`.
    pub(super) tls: Option<Box<TlsConn>>,
    pub(super) peer: SocketAddr,
    pub(super) read_ahead: Vec<u8>,
    /// The export the handshake found, for serving the connection on threads of its own
    /// again if its reactor gives it back (a switchover hands the volume on). Weak: a
    /// reactor owns its sessions, and must not keep its own handle alive through them.
    pub(super) export: Weak<dyn Export>,
    /// What the handshake negotiated (structured replies, block status).
    pub(super) options: Options,
}

impl Adopted {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Serves the connection the way connections of exports without a reactor are served
    /// (a reader and a writer thread, through [`Export::submit`]), against the export the
    /// handshake found. A connection whose export is gone is closed.
    pub fn serve_on_threads(self) {
        super::serve_adopted_on_threads(self);
    }
}

impl std::fmt::Debug for Adopted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adopted").field("peer", &self.peer).field("read_ahead", &self.read_ahead.len()).finish()
    }
}

/// The export of a session made with [`Session::over`]: none.
struct Detached;

impl Export for Detached {
    fn size(&self) -> u64 {
        0
    }
    fn read_only(&self) -> bool {
        true
    }
    fn submit(&self, _: crate::frontend::IoRequest, done: crate::frontend::Completer) {
        done.complete(Err(io::Error::other("a detached session serves nothing")));
    }
}

/// One request, decoded and checked against the export; the reactor serves it and answers
/// it exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Read {
        cookie: u64,
        offset: u64,
        len: u32,
    },
    /// `data` is a range of the session's read buffer (see [`Session::data`]), valid until
    /// the next [`Session::fill`].
    Write {
        cookie: u64,
        offset: u64,
        data: Range<usize>,
        fua: bool,
    },
    Flush {
        cookie: u64,
    },
    Trim {
        cookie: u64,
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        cookie: u64,
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// `base:allocation` of `len` bytes (at most [`BLOCK_STATUS_SCAN_BYTES`]) from
    /// `offset`: answered with [`Session::reply_block_status`] from their contents.
    BlockStatus {
        cookie: u64,
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// Why a session ended early. Logged as one line naming the peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error("reading a request failed")]
    Read(#[source] io::Error),
    #[error("writing replies failed")]
    Write(#[source] io::Error),
    #[error("bad request magic {0:#010x}")]
    RequestMagic(u32),
    #[error("write of {0} bytes exceeds the {PAYLOAD_BYTES_MAX}-byte maximum")]
    WriteTooLong(u32),
    #[error("the client closed the connection in the middle of a request")]
    Truncated,
}

/// See the module documentation.
pub struct Session {
    stream: TcpStream,
    tls: Option<Box<TlsConn>>,
    peer: SocketAddr,
    export: Weak<dyn Export>,
    size: u64,
    read_only: bool,
    options: Options,
    /// Bytes read and not yet decoded: `rbuf[start..end]`.
    rbuf: Vec<u8>,
    start: usize,
    end: usize,
    /// Replies gathered and not yet written: `out[sent..]`.
    out: Vec<u8>,
    sent: usize,
    /// Requests handed to the reactor and not yet answered.
    in_flight: usize,
    /// The client sent `NBD_CMD_DISC`: nothing more is read or decoded, and the session
    /// ends once every reply is written.
    draining: bool,
    /// The client closed its end: the whole requests it sent before are still served, and
    /// the session ends once they are answered (a partial one left is an error).
    eof: bool,
    /// Bytes from `start` that the request being received needs whole (its header and
    /// write payload): the read buffer grows to hold them, once.
    want: usize,
    failed: Option<SessionError>,
}

impl Session {
    /// Takes over an adopted connection for an export of `size` bytes.
    pub fn new(adopted: Adopted, size: u64, read_only: bool) -> io::Result<Session> {
        adopted.stream.set_nonblocking(true)?;
        adopted.stream.set_nodelay(true)?;
        let mut rbuf = vec![0u8; ADOPTED_READ_BYTES.max(adopted.read_ahead.len())];
        let end = adopted.read_ahead.len();
        rbuf[..end].copy_from_slice(&adopted.read_ahead);
        Ok(Session {
            stream: adopted.stream,
            tls: adopted.tls,
            peer: adopted.peer,
            export: adopted.export,
            size,
            read_only,
            options: adopted.options,
            rbuf,
            start: 0,
            end,
            out: Vec::with_capacity(REPLY_BUFFER_BYTES),
            sent: 0,
            in_flight: 0,
            draining: false,
            eof: false,
            want: 0,
            failed: None,
        })
    }

    /// A session over a connected socket already in transmission, with the options its
    /// handshake settled (for tests and fuzzing; a node's sessions come from
    /// [`Export::adopt`]). A session made this way cannot be given back to threads.
    pub fn over(stream: TcpStream, size: u64, read_only: bool, options: Options) -> io::Result<Session> {
        let peer = stream.peer_addr()?;
        let export: Weak<dyn Export> = Weak::<Detached>::new();
        Session::new(Adopted { stream, tls: None, peer, read_ahead: Vec::new(), export, options }, size, read_only)
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The socket, for the reactor's readiness set.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Requests taken and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Reads what the socket holds, without waiting, until it has nothing more or the
    /// buffer is full. Whether anything was read (or the end of the stream seen).
    pub fn fill(&mut self) -> bool {
        if self.draining || self.eof || self.failed.is_some() {
            return false;
        }
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
            // The room one large write took goes back once it is consumed.
            if self.rbuf.len() > ADOPTED_READ_BYTES {
                self.rbuf.truncate(ADOPTED_READ_BYTES);
                self.rbuf.shrink_to_fit();
            }
        } else if self.start > 0 && (self.end == self.rbuf.len() || self.start + self.want > self.rbuf.len()) {
            self.rbuf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.want > self.rbuf.len() {
            // One large write: room for it alone (at most a header and the largest payload).
            self.rbuf.resize(self.want, 0);
        }
        let mut worked = false;
        while self.end < self.rbuf.len() {
            let buf = &mut self.rbuf[self.end..];
            let read = match &mut self.tls {
                None => (&self.stream).read(buf),
                Some(tls) => tls.read(&self.stream, buf),
            };
            match read {
                Ok(0) => {
                    self.eof = true;
                    return true;
                }
                Ok(n) => {
                    self.end += n;
                    worked = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.failed = Some(SessionError::Read(e));
                    return true;
                }
            }
        }
        worked
    }

    /// The next whole request in the buffer, checked; `None` when none is whole yet, when
    /// the session is at its bounds, or when it is ending. Requests it refuses (bad flags,
    /// out of bounds, read-only) are answered here and skipped.
    pub fn next_command(&mut self) -> Option<Command> {
        loop {
            if self.draining || self.failed.is_some() {
                return None;
            }
            if self.in_flight >= IN_FLIGHT_MAX || self.out.len() - self.sent > REPLY_BUFFER_BYTES {
                return None;
            }
            let have = self.end - self.start;
            if have < REQUEST_BYTES {
                self.want = REQUEST_BYTES;
                if self.eof && have > 0 {
                    self.failed = Some(SessionError::Truncated);
                }
                return None;
            }
            let header: &[u8; REQUEST_BYTES] =
                self.rbuf[self.start..self.start + REQUEST_BYTES].try_into().expect("a whole header");
            let request = match Request::decode(header) {
                Ok(r) => r,
                Err(magic) => {
                    self.failed = Some(SessionError::RequestMagic(magic));
                    return None;
                }
            };
            let payload = if request.command == CMD_WRITE {
                if request.len > PAYLOAD_BYTES_MAX {
                    // The payload cannot be skipped safely: a garbled length would make the
                    // server take what may be further requests for data.
                    self.failed = Some(SessionError::WriteTooLong(request.len));
                    return None;
                }
                request.len as usize
            } else {
                0
            };
            let whole = REQUEST_BYTES + payload;
            if have < whole {
                // `fill` makes the room (the next pass: this one counted its read as work).
                self.want = whole;
                if self.eof {
                    self.failed = Some(SessionError::Truncated);
                }
                return None;
            }
            self.want = 0;
            let data = self.start + REQUEST_BYTES..self.start + whole;
            self.start += whole;
            let cookie = request.cookie;
            if request.command == CMD_DISC {
                self.draining = true;
                return None;
            }
            let refusal = request
                .refusal(self.read_only, self.size, self.options)
                .map(|errno| nbd_errno(&io::Error::from_raw_os_error(errno)));
            if let Some(errno) = refusal {
                // A read is never answered with a simple reply once structured replies
                // are negotiated, not even a refusal.
                if self.options.structured && matches!(request.command, CMD_READ | CMD_BLOCK_STATUS) {
                    push_error_chunk(&mut self.out, cookie, errno);
                } else {
                    self.push_reply(cookie, errno);
                }
                continue;
            }
            self.in_flight += 1;
            let (offset, len, fua) = (request.offset, request.len, request.fua());
            return Some(match request.command {
                CMD_READ => Command::Read { cookie, offset, len },
                CMD_WRITE => Command::Write { cookie, offset, data, fua },
                CMD_FLUSH => Command::Flush { cookie },
                CMD_TRIM => Command::Trim { cookie, offset, len },
                CMD_BLOCK_STATUS => Command::BlockStatus {
                    cookie,
                    offset,
                    len: len.min(BLOCK_STATUS_SCAN_BYTES),
                    req_one: request.flags & CMD_FLAG_REQ_ONE != 0,
                },
                _ => Command::WriteZeroes { cookie, offset, len, fua },
            });
        }
    }

    /// A write's payload, by the range its [`Command::Write`] carries.
    pub fn data(&self, range: Range<usize>) -> &[u8] {
        &self.rbuf[range]
    }

    /// Answers a request taken with [`Session::next_command`]: success, or the error's NBD errno.
    pub fn reply(&mut self, cookie: u64, result: io::Result<()>) {
        self.in_flight = self.in_flight.checked_sub(1).expect("a reply answers a request taken");
        let errno = match result {
            Ok(()) => 0,
            Err(e) => nbd_errno(&e),
        };
        self.push_reply(cookie, errno);
    }

    /// Answers a read of `len` bytes at `offset`: `fill` writes the data straight into the
    /// reply buffer; if it fails, the reply carries its error and no data. The reply is
    /// one `OFFSET_DATA` chunk where structured replies were negotiated, a simple reply
    /// otherwise.
    pub fn reply_read(&mut self, cookie: u64, offset: u64, len: u32, fill: impl FnOnce(&mut [u8]) -> io::Result<()>) {
        self.in_flight = self.in_flight.checked_sub(1).expect("a reply answers a request taken");
        let at = self.out.len();
        if self.options.structured {
            push_read_head(&mut self.out, cookie, offset, len);
        } else {
            self.push_reply(cookie, 0);
        }
        let data_at = self.out.len();
        self.out.resize(data_at + len as usize, 0);
        if let Err(e) = fill(&mut self.out[data_at..]) {
            self.out.truncate(at);
            if self.options.structured {
                push_error_chunk(&mut self.out, cookie, nbd_errno(&e));
            } else {
                self.push_reply(cookie, nbd_errno(&e));
            }
        }
    }

    /// Answers a [`Command::BlockStatus`]: `data` holds the contents of the range it asked
    /// about (or the read of them failed).
    pub fn reply_block_status(&mut self, cookie: u64, offset: u64, req_one: bool, data: io::Result<&[u8]>) {
        self.in_flight = self.in_flight.checked_sub(1).expect("a reply answers a request taken");
        match data {
            Ok(data) => push_block_status(&mut self.out, cookie, offset, data, req_one),
            Err(e) => push_error_chunk(&mut self.out, cookie, nbd_errno(&e)),
        }
    }

    fn push_reply(&mut self, cookie: u64, errno: u32) {
        self.out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        self.out.extend_from_slice(&errno.to_be_bytes());
        self.out.extend_from_slice(&cookie.to_be_bytes());
    }

    /// Writes the gathered replies, without waiting; what the socket does not take stays
    /// for the next flush. Whether anything was written.
    pub fn flush(&mut self) -> bool {
        if self.sent == self.out.len() && !self.tls_pending() {
            return false;
        }
        let mut worked = false;
        if let Some(conn) = &mut self.tls {
            match conn.write(&self.stream, &self.out[self.sent..]) {
                Ok(n) => {
                    self.sent += n;
                    worked = n > 0;
                }
                Err(e) => self.failed = Some(SessionError::Write(e)),
            }
        } else {
            while self.sent < self.out.len() {
                match (&self.stream).write(&self.out[self.sent..]) {
                    Ok(0) => {
                        self.failed = Some(SessionError::Write(io::ErrorKind::WriteZero.into()));
                        break;
                    }
                    Ok(n) => {
                        self.sent += n;
                        worked = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.failed = Some(SessionError::Write(e));
                        break;
                    }
                }
            }
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
            // The room one large read reply took goes back.
            if self.out.capacity() > 4 * REPLY_BUFFER_BYTES {
                self.out.shrink_to(REPLY_BUFFER_BYTES);
            }
        }
        worked
    }

    /// Whether the session is over: it failed, or the client is done and every reply it
    /// is owed is written. Requests still in flight on a failed session are answered into
    /// the void.
    pub fn finished(&self) -> bool {
        let done_reading = self.draining || (self.eof && self.start == self.end);
        self.failed.is_some() || (done_reading && self.in_flight == 0 && self.out.is_empty() && !self.tls_pending())
    }

    /// Whether TLS holds ciphertext the socket has not taken yet.
    fn tls_pending(&self) -> bool {
        self.tls.as_ref().is_some_and(|c| c.wants_write())
    }

    /// Why it failed, if it did.
    pub fn error(&self) -> Option<&SessionError> {
        self.failed.as_ref()
    }

    /// Gives the connection back, for serving elsewhere: with the bytes it read and did
    /// not decode, once the replies it owes are written. Only a session with nothing in
    /// flight can be given back.
    pub fn release(mut self) -> Result<Adopted, Box<Session>> {
        // A client that sent DISC or closed waits for the server to close, not for more.
        if self.in_flight != 0 || self.failed.is_some() || self.draining || self.eof {
            return Err(Box::new(self));
        }
        // Replies the socket did not take yet go first, waiting for it (bounded).
        let blocking = self
            .stream
            .set_nonblocking(false)
            .and_then(|()| self.stream.set_write_timeout(Some(RELEASE_WRITE_TIMEOUT)))
            .and_then(|()| match &mut self.tls {
                None => (&self.stream).write_all(&self.out[self.sent..]),
                Some(tls) => tls.write_blocking(&self.stream, &self.out[self.sent..]),
            });
        if let Err(e) = blocking {
            self.failed = Some(SessionError::Write(e));
            return Err(Box::new(self));
        }
        let Session { stream, tls, peer, export, rbuf, start, end, options, .. } = self;
        Ok(Adopted { stream, tls, peer, read_ahead: rbuf[start..end].to_vec(), export, options })
    }

    /// Closes the connection now (over TLS, with a close_notify where the socket takes it).
    pub fn close(&mut self) {
        if let Some(tls) = &mut self.tls {
            tls.close(&self.stream);
        }
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer)
            .field("in_flight", &self.in_flight)
            .field("buffered", &(self.end - self.start))
            .field("unwritten", &(self.out.len() - self.sent))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::super::NBD_EINVAL;
    use super::*;
    use crate::frontend::{Completer, IoRequest};
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    struct NoExport;
    impl Export for NoExport {
        fn size(&self) -> u64 {
            0
        }
        fn read_only(&self) -> bool {
            true
        }
        fn submit(&self, _: IoRequest, _: Completer) {}
    }

    const SIZE: u64 = 1 << 20;

    /// A session on one end of a loopback connection, and the client's end.
    fn session(options: Options) -> (Session, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, peer) = l.accept().unwrap();
        let export: Weak<dyn Export> = Weak::<NoExport>::new();
        let adopted = Adopted { stream: server, tls: None, peer, read_ahead: Vec::new(), export, options };
        (Session::new(adopted, SIZE, false).unwrap(), client)
    }

    fn request(command: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&super::super::REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&command.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r
    }

    /// Fills until `f` says the session has what it waits for (bounded in time).
    fn fill_until(s: &mut Session, mut f: impl FnMut(&mut Session) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f(s) {
            assert!(Instant::now() < deadline, "the session never got there: {s:?}");
            s.fill();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn read_exact(c: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.read_exact(&mut b).unwrap();
        b
    }

    #[test]
    fn pipelined_requests_are_decoded_served_and_answered_in_one_write() {
        let (mut s, mut c) = session(Options::default());
        let mut bytes = request(CMD_WRITE, 0, 7, 4096, 4096);
        bytes.extend(std::iter::repeat_n(0xab, 4096));
        bytes.extend(request(CMD_READ, 0, 8, 0, 512));
        bytes.extend(request(CMD_FLUSH, 0, 9, 0, 0));
        // Out of bounds: refused by the session itself, never handed out.
        bytes.extend(request(CMD_READ, 0, 10, SIZE, 512));
        c.write_all(&bytes).unwrap();
        let mut got = Vec::new();
        fill_until(&mut s, |s| {
            while let Some(cmd) = s.next_command() {
                got.push(cmd);
            }
            got.len() == 3
        });
        let Command::Write { cookie: 7, offset: 4096, data, .. } = got[0].clone() else { panic!("{got:?}") };
        assert!(s.data(data).iter().all(|&b| b == 0xab));
        assert_eq!(got[1], Command::Read { cookie: 8, offset: 0, len: 512 });
        assert_eq!(got[2], Command::Flush { cookie: 9 });
        assert_eq!(s.in_flight(), 3);
        s.reply(7, Ok(()));
        s.reply_read(8, 0, 512, |b| {
            b.fill(0x11);
            Ok(())
        });
        s.reply(9, Err(io::Error::from_raw_os_error(libc::EIO)));
        assert_eq!(s.in_flight(), 0);
        assert!(s.flush());
        let r = read_exact(&mut c, 16 * 4 + 512);
        let reply = |at: usize| (u32::from_be_bytes(r[at + 4..at + 8].try_into().unwrap()), &r[at + 8..at + 16]);
        // The refusal went out first, then the answers in the order given.
        assert_eq!(reply(0), (NBD_EINVAL, &10u64.to_be_bytes()[..]));
        assert_eq!(reply(16), (0, &7u64.to_be_bytes()[..]));
        assert_eq!(reply(32), (0, &8u64.to_be_bytes()[..]));
        assert!(r[48..48 + 512].iter().all(|&b| b == 0x11));
        assert_eq!(reply(560), (5, &9u64.to_be_bytes()[..]));
    }

    #[test]
    fn hostile_input_ends_the_session_with_a_reason() {
        // A bad magic.
        let (mut s, mut c) = session(Options::default());
        let mut r = request(CMD_READ, 0, 1, 0, 512);
        r[0] ^= 0xff;
        c.write_all(&r).unwrap();
        fill_until(&mut s, |s| s.next_command().is_none() && s.finished());
        assert!(matches!(s.error(), Some(SessionError::RequestMagic(_))), "{:?}", s.error());

        // A write longer than any payload: nothing is allocated for it.
        let (mut s, mut c) = session(Options::default());
        c.write_all(&request(CMD_WRITE, 0, 1, 0, u32::MAX)).unwrap();
        fill_until(&mut s, |s| s.next_command().is_none() && s.finished());
        assert!(matches!(s.error(), Some(SessionError::WriteTooLong(u32::MAX))), "{:?}", s.error());
        assert!(s.rbuf.len() <= ADOPTED_READ_BYTES, "the read buffer grew for a refused length");

        // A client that goes away in the middle of a write.
        let (mut s, mut c) = session(Options::default());
        let mut r = request(CMD_WRITE, 0, 1, 0, 8192);
        r.extend([0u8; 100]);
        c.write_all(&r).unwrap();
        drop(c);
        fill_until(&mut s, |s| s.next_command().is_none() && s.finished());
        assert!(matches!(s.error(), Some(SessionError::Truncated)), "{:?}", s.error());
    }

    #[test]
    fn disc_drains_and_bounds_hold_back_requests() {
        let (mut s, mut c) = session(Options::default());
        let mut bytes = Vec::new();
        for cookie in 0..(IN_FLIGHT_MAX as u64 + 5) {
            bytes.extend(request(CMD_FLUSH, 0, cookie, 0, 0));
        }
        bytes.extend(request(CMD_DISC, 0, 0, 0, 0));
        c.write_all(&bytes).unwrap();
        let mut taken = 0;
        fill_until(&mut s, |s| {
            while s.next_command().is_some() {
                taken += 1;
            }
            taken == IN_FLIGHT_MAX
        });
        // At the bound nothing more is taken until a reply goes.
        assert!(s.next_command().is_none());
        s.reply(0, Ok(()));
        assert!(s.next_command().is_some(), "a reply makes room for one more");
        taken += 1;
        for cookie in 1..=IN_FLIGHT_MAX as u64 {
            s.reply(cookie, Ok(()));
        }
        while s.next_command().is_some() {
            taken += 1;
        }
        assert_eq!(taken, IN_FLIGHT_MAX + 5);
        for cookie in IN_FLIGHT_MAX as u64 + 1..IN_FLIGHT_MAX as u64 + 5 {
            s.reply(cookie, Ok(()));
        }
        assert!(!s.finished(), "replies are still unwritten");
        s.flush();
        assert!(s.finished(), "after DISC and every reply written, the session is over");
        assert!(s.error().is_none());
    }

    #[test]
    fn structured_reads_and_block_status() {
        let options = Options { structured: true, allocation: true };
        let (mut s, mut c) = session(options);
        let mut bytes = request(CMD_READ, 0, 1, 8192, 16);
        bytes.extend(request(CMD_BLOCK_STATUS, 0, 2, 4096, 3 * 4096));
        bytes.extend(request(CMD_READ, 1 << 7, 3, 0, 16)); // an unknown flag
        c.write_all(&bytes).unwrap();
        let mut got = Vec::new();
        fill_until(&mut s, |s| {
            while let Some(cmd) = s.next_command() {
                got.push(cmd);
            }
            got.len() == 2
        });
        assert_eq!(got[1], Command::BlockStatus { cookie: 2, offset: 4096, len: 3 * 4096, req_one: false });
        s.reply_read(1, 8192, 16, |b| {
            b.fill(7);
            Ok(())
        });
        let mut data = vec![0u8; 3 * 4096];
        data[4096 + 100] = 1;
        s.reply_block_status(2, 4096, false, Ok(&data));
        s.flush();
        let chunk = |c: &mut TcpStream| {
            let h = read_exact(c, 20);
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), super::super::STRUCTURED_REPLY_MAGIC);
            assert_eq!(u16::from_be_bytes(h[4..6].try_into().unwrap()), super::super::REPLY_FLAG_DONE);
            (cookie, kind, read_exact(c, len))
        };
        // The refused read: an error chunk, never a simple reply.
        let (cookie, kind, p) = chunk(&mut c);
        assert_eq!((cookie, kind), (3, super::super::REPLY_TYPE_ERROR));
        assert_eq!(u32::from_be_bytes(p[0..4].try_into().unwrap()), NBD_EINVAL);
        let (cookie, kind, p) = chunk(&mut c);
        assert_eq!((cookie, kind), (1, super::super::REPLY_TYPE_OFFSET_DATA));
        assert_eq!(u64::from_be_bytes(p[0..8].try_into().unwrap()), 8192);
        assert_eq!(&p[8..], &[7u8; 16]);
        let (cookie, kind, p) = chunk(&mut c);
        assert_eq!((cookie, kind), (2, super::super::REPLY_TYPE_BLOCK_STATUS));
        let words: Vec<u32> = p.chunks_exact(4).map(|w| u32::from_be_bytes(w.try_into().unwrap())).collect();
        // Context 1: a zero block, a data block, a zero block.
        assert_eq!(words, vec![1, 4096, 2, 4096, 0, 4096, 2]);
    }

    #[test]
    fn block_status_needs_the_context_selected() {
        let (mut s, mut c) = session(Options { structured: true, allocation: false });
        c.write_all(&request(CMD_BLOCK_STATUS, 0, 4, 0, 4096)).unwrap();
        s.fill();
        fill_until(&mut s, |s| s.next_command().is_none() && !s.out.is_empty());
        assert_eq!(s.in_flight(), 0, "refused, not handed out");
    }
}
