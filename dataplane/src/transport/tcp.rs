//! The TCP engine.
//!
//! Source side: the volume's poller writes frames straight from its NVLog with one
//! `writev` per batch, and busy-polls the socket for the destination's replies with
//! non-blocking reads: no thread sits between the poller and the connection. Destination
//! side: one thread per connection reads whatever has arrived, hands every whole frame to
//! the mirror's handler (which copies entries into the mapped log file), and commits once
//! the input is drained: one persist and one ack for the whole batch (group commit).
//!
//! [`LinkSecurity`] adds, on both ends: the pair's secret, with which each end
//! authenticates the other before the hello is acted on (the challenge-response of
//! `README.md`, "Authentication"), and TLS around the whole connection (`tls.rs`). With
//! TLS the source's poller still reads without waiting (rustls is fed by
//! `recv(MSG_DONTWAIT)`), and the destination's reader decrypts under the connection's
//! lock, never holding it while it waits for the socket.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use parking_lot::Mutex;
use rustls::{ClientConnection, ServerConnection};

use super::auth::{self, PeerSecret};
use super::tls::{handshake as tls_handshake, send as tls_send, DontWait};
use super::wire::{self, entries_prefix, Message, FRAME_HEADER_BYTES};
use super::{
    ConnectError, Connector, Hello, Link, LinkError, LinkEvent, LinkSecurity, MirrorDirectory, RefuseCode, Reply,
    ReplySink, Welcome,
};

/// How long a connect or a hello may take, and how long a send may block on a peer that
/// does not read.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest hello or welcome: strings are bounded, so a first frame above this is
/// refused before its body is read.
const FIRST_FRAME_BODY_MAX: usize = 4096;

/// Whether a frame header's first bytes are a TLS record's (handshake or alert, TLS 1.x):
/// a peer that speaks TLS to a node that does not, or the other way round.
fn looks_like_tls(header: &[u8]) -> bool {
    matches!(header, [0x15 | 0x16, 0x03, ..])
}

fn read_frame(stream: &mut impl Read, buf: &mut Vec<u8>, body_max: usize) -> io::Result<()> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    stream.read_exact(&mut header)?;
    let (_, len) = wire::decode_header(&header).map_err(|e| {
        if looks_like_tls(&header) {
            io::Error::new(io::ErrorKind::InvalidData, "the peer speaks TLS, and this end does not (--tls-cert)")
        } else {
            io::Error::new(io::ErrorKind::InvalidData, e)
        }
    })?;
    if len > body_max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame body of {len} bytes where at most {body_max} fit"),
        ));
    }
    buf.clear();
    buf.extend_from_slice(&header);
    buf.resize(FRAME_HEADER_BYTES + len, 0);
    stream.read_exact(&mut buf[FRAME_HEADER_BYTES..])
}

/// Opens replication connections, secured as its [`LinkSecurity`] says.
#[derive(Debug, Clone, Default)]
pub struct TcpConnector {
    security: LinkSecurity,
}

impl TcpConnector {
    pub fn new(security: LinkSecurity) -> TcpConnector {
        TcpConnector { security }
    }
}

/// Bytes of replies buffered between polls; replies are small control frames.
const REPLY_BUF_BYTES: usize = 64 * 1024;

pub struct TcpLink {
    stream: TcpStream,
    /// The TLS session, where the link has one: every byte goes through it.
    tls: Option<Box<ClientConnection>>,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    rfill: usize,
    closed: Option<String>,
    close_reported: bool,
}

impl Connector for TcpConnector {
    type Link = TcpLink;
    fn connect(&self, target: &str, hello: &Hello) -> Result<(TcpLink, Welcome), ConnectError> {
        let io_err = |source| ConnectError::Io { target: target.to_string(), source };
        let addr: SocketAddr = target
            .to_socket_addrs()
            .map_err(io_err)?
            .next()
            .ok_or_else(|| io_err(io::Error::new(io::ErrorKind::NotFound, "no address")))?;
        let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(io_err)?;
        stream.set_nodelay(true).map_err(io_err)?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
        stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
        let hello_frame = Message::Hello(hello.clone()).encode();
        let secret = self.security.secret.as_ref();
        let mut reply = Vec::new();
        let tls = match &self.security.tls {
            None => {
                source_handshake(&mut stream, target, secret, &hello_frame, &mut reply)?;
                None
            }
            Some(tls) => {
                let mut conn = tls.connect(target).map_err(|e| io_err(io::Error::other(e)))?;
                tls_handshake(&mut conn, &mut stream).map_err(io_err)?;
                source_handshake(
                    &mut rustls::Stream::new(&mut conn, &mut stream),
                    target,
                    secret,
                    &hello_frame,
                    &mut reply,
                )?;
                Some(Box::new(conn))
            }
        };
        let welcome = match decode_first(&reply, target)? {
            Message::Welcome(w) => w,
            Message::Refuse { code, reason } => {
                return Err(ConnectError::Refused { target: target.to_string(), code, reason })
            }
            other => {
                return Err(ConnectError::Protocol {
                    target: target.to_string(),
                    reason: format!("expected welcome, got {other:?}"),
                })
            }
        };
        Ok((
            TcpLink {
                stream,
                tls,
                wbuf: Vec::with_capacity(4096),
                rbuf: vec![0; REPLY_BUF_BYTES],
                rfill: 0,
                closed: None,
                close_reported: false,
            },
            welcome,
        ))
    }
}

/// Decodes a whole handshake frame read by [`read_frame`].
fn decode_first<'a>(buf: &'a [u8], target: &str) -> Result<Message<'a>, ConnectError> {
    let protocol = |reason: String| ConnectError::Protocol { target: target.to_string(), reason };
    match wire::decode(buf).map_err(|e| protocol(e.to_string()))? {
        Some((m, _)) => Ok(m),
        None => Err(protocol("short frame".into())),
    }
}

/// The source's half of the handshake: the hello, and with a secret the challenge-response
/// around it. Leaves in `reply` the destination's answer to the hello (welcome or
/// refusal), proven by the destination where there is a secret: an answer that the
/// destination did not prove is never returned, so nothing unauthenticated can fence the
/// source or start a baseline.
fn source_handshake<S: Read + Write>(
    stream: &mut S,
    target: &str,
    secret: Option<&PeerSecret>,
    hello_frame: &[u8],
    reply: &mut Vec<u8>,
) -> Result<(), ConnectError> {
    let io_err = |source| ConnectError::Io { target: target.to_string(), source };
    let unauthenticated = |reason: String| ConnectError::Unauthenticated { target: target.to_string(), reason };
    let Some(secret) = secret else {
        stream.write_all(hello_frame).and_then(|()| stream.flush()).map_err(io_err)?;
        return read_frame(stream, reply, FIRST_FRAME_BODY_MAX).map_err(io_err);
    };
    let client_nonce = auth::fresh_nonce().map_err(|e| io_err(io::Error::other(e)))?;
    stream
        .write_all(&Message::AuthRequest { nonce: client_nonce }.encode())
        .and_then(|()| stream.flush())
        .map_err(io_err)?;
    let mut buf = Vec::new();
    read_frame(stream, &mut buf, FIRST_FRAME_BODY_MAX).map_err(io_err)?;
    let server_nonce = match decode_first(&buf, target)? {
        Message::AuthChallenge { nonce } => nonce,
        // Unproven answers: whatever they say, they are only reported (and retried).
        Message::Refuse { reason, .. } => {
            return Err(unauthenticated(format!("peer did not authenticate (its answer: {reason})")))
        }
        Message::Error { reason } => {
            return Err(unauthenticated(format!(
                "peer did not authenticate: it does not take authentication requests ({reason})"
            )))
        }
        other => {
            return Err(unauthenticated(format!("peer did not authenticate: expected its challenge, got {other:?}")))
        }
    };
    let proof = secret.source_proof(&server_nonce, &client_nonce, hello_frame);
    let mut out = Vec::with_capacity(hello_frame.len() + FRAME_HEADER_BYTES + auth::MAC_BYTES);
    out.extend_from_slice(hello_frame);
    out.extend_from_slice(&Message::AuthProof { proof }.encode());
    stream.write_all(&out).and_then(|()| stream.flush()).map_err(io_err)?;
    read_frame(stream, &mut buf, FIRST_FRAME_BODY_MAX).map_err(io_err)?;
    let proof = match decode_first(&buf, target)? {
        Message::AuthProof { proof } => proof,
        // The destination did not take our proof: a refusal it cannot prove either, and
        // one that only makes the source retry.
        Message::Refuse { code: code @ RefuseCode::Unauthenticated, reason } => {
            return Err(ConnectError::Refused { target: target.to_string(), code, reason })
        }
        Message::Welcome(_) => {
            return Err(unauthenticated(
                "peer did not authenticate: it answered without proving that it holds the secret (a welcome)".into(),
            ))
        }
        Message::Refuse { reason, .. } => {
            return Err(unauthenticated(format!(
                "peer did not authenticate: it answered without proving that it holds the secret (a refusal: {reason})"
            )))
        }
        other => return Err(unauthenticated(format!("peer did not authenticate: got {other:?}"))),
    };
    read_frame(stream, reply, FIRST_FRAME_BODY_MAX).map_err(io_err)?;
    if !secret.verify_destination(&client_nonce, &server_nonce, hello_frame, reply, &proof) {
        return Err(unauthenticated(
            "wrong secret: the destination's proof does not verify (the two nodes hold different secrets)".into(),
        ));
    }
    Ok(())
}

impl TcpLink {
    fn check(&self) -> Result<(), LinkError> {
        match &self.closed {
            Some(reason) => Err(LinkError::Closed(reason.clone())),
            None => Ok(()),
        }
    }

    /// Decodes one buffered reply, if a whole one is there.
    fn decode_one(&mut self) -> Option<Result<Reply, String>> {
        let (reply, used) = match wire::decode(&self.rbuf[..self.rfill]) {
            Ok(None) => return None,
            Err(e) => return Some(Err(format!("bad frame from destination: {e}"))),
            Ok(Some((msg, used))) => {
                let reply =
                    Reply::from_message(&msg).ok_or_else(|| format!("unexpected frame from destination: {msg:?}"));
                (reply, used)
            }
        };
        self.rbuf.copy_within(used..self.rfill, 0);
        self.rfill -= used;
        Some(reply)
    }

    fn close_with(&mut self, reason: String) {
        if self.closed.is_none() {
            self.closed = Some(reason);
            if let Some(c) = &mut self.tls {
                // Best effort, without waiting: the peer sees a clean end where it can.
                c.send_close_notify();
                let _ = c.write_tls(&mut DontWait(&self.stream));
            }
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }

    /// Reads what has arrived into the reply buffer, without waiting. `Ok(false)`: nothing
    /// there now.
    fn fill(&mut self) -> Result<bool, String> {
        let free = &mut self.rbuf[self.rfill..];
        let Some(c) = &mut self.tls else {
            // SAFETY: `free` is a valid, writable buffer of `free.len()` bytes for the
            // duration of the call, and the fd is the open socket `self.stream` owns.
            let n = unsafe {
                libc::recv(self.stream.as_raw_fd(), free.as_mut_ptr().cast(), free.len(), libc::MSG_DONTWAIT)
            };
            return match n {
                0 => Err("destination closed the connection".into()),
                n if n > 0 => {
                    self.rfill += n.unsigned_abs();
                    Ok(true)
                }
                _ => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => Ok(false),
                        io::ErrorKind::Interrupted => Ok(true),
                        _ => Err(format!("read: {e}")),
                    }
                }
            };
        };
        // Plaintext rustls holds already, then records from the socket.
        match c.reader().read(free) {
            Ok(0) => return Err("destination closed the connection".into()),
            Ok(n) => {
                self.rfill += n;
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("TLS read: {e}")),
        }
        match c.read_tls(&mut DontWait(&self.stream)) {
            Ok(0) => Err("destination closed the connection".into()),
            Ok(_) => {
                c.process_new_packets().map_err(|e| format!("TLS: {e}"))?;
                // Anything rustls must answer (an alert, a key update) goes out now.
                while c.wants_write() {
                    c.write_tls(&mut &self.stream).map_err(|e| format!("TLS write: {e}"))?;
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

impl TcpLink {
    /// Queues an already encoded frame (sent on the next flush).
    pub fn send_raw(&mut self, frame: &[u8]) -> Result<(), LinkError> {
        self.check()?;
        self.wbuf.extend_from_slice(frame);
        Ok(())
    }
}

impl Link for TcpLink {
    fn send_entries(&mut self, partition: u8, offset: u64, bytes: &[u8]) -> Result<(), LinkError> {
        self.check()?;
        let prefix = entries_prefix(partition, offset, bytes);
        let r = match &mut self.tls {
            None => {
                let mut slices = [IoSlice::new(&self.wbuf), IoSlice::new(&prefix), IoSlice::new(bytes)];
                self.stream.write_all_vectored_compat(&mut slices)
            }
            Some(c) => tls_send(c, &self.stream, &self.wbuf)
                .and_then(|()| tls_send(c, &self.stream, &prefix))
                .and_then(|()| tls_send(c, &self.stream, bytes)),
        };
        self.wbuf.clear();
        r.map_err(LinkError::Io)
    }
    fn send(&mut self, msg: &Message<'_>) -> Result<(), LinkError> {
        self.check()?;
        self.wbuf.extend_from_slice(&msg.encode());
        Ok(())
    }
    fn flush(&mut self) -> Result<(), LinkError> {
        self.check()?;
        if !self.wbuf.is_empty() {
            let r = match &mut self.tls {
                None => self.stream.write_all(&self.wbuf),
                Some(c) => tls_send(c, &self.stream, &self.wbuf),
            };
            self.wbuf.clear();
            r?;
        }
        Ok(())
    }
    fn poll(&mut self) -> Option<LinkEvent> {
        loop {
            if let Some(r) = self.decode_one() {
                return match r {
                    Ok(reply) => Some(LinkEvent::Reply(reply)),
                    Err(reason) => {
                        self.close_with(reason.clone());
                        self.close_reported = true;
                        Some(LinkEvent::Closed { reason })
                    }
                };
            }
            if let Some(reason) = &self.closed {
                if self.close_reported {
                    return None;
                }
                self.close_reported = true;
                return Some(LinkEvent::Closed { reason: reason.clone() });
            }
            if self.rfill == self.rbuf.len() {
                self.close_with("reply larger than the reply buffer".into());
                continue;
            }
            match self.fill() {
                Ok(true) => {}
                Ok(false) => return None,
                Err(reason) => self.close_with(reason),
            }
        }
    }
    fn close(&mut self) {
        self.close_with("closed by the source".into());
    }
    fn readiness_fd(&self) -> Option<std::os::fd::RawFd> {
        // `poll` reads until the socket would block (and drains what rustls holds), so an
        // edge on this descriptor is all a sleeping poller needs.
        Some(self.stream.as_raw_fd())
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.close();
    }
}

/// `write_all` over several slices with one `writev` in the common case.
trait WriteAllVectored {
    fn write_all_vectored_compat(&mut self, bufs: &mut [IoSlice<'_>]) -> io::Result<()>;
}

impl WriteAllVectored for TcpStream {
    fn write_all_vectored_compat(&mut self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match self.write_vectored(bufs) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "failed to write whole buffer")),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The destination's answer channel on one TCP connection.
struct TcpSink {
    stream: Mutex<TcpStream>,
    /// The TLS session, where the connection has one. Lock order: this, then `stream`.
    /// The connection's reader takes it to decrypt what it read, never while it waits for
    /// the socket; a sender holds it while its records go out (bounded by the socket's
    /// write timeout).
    tls: Option<Mutex<ServerConnection>>,
    closed: AtomicBool,
}

impl TcpSink {
    /// Sends frames already encoded, in one write.
    fn send_frames(&self, frames: &[u8]) -> io::Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "connection closed"));
        }
        match &self.tls {
            None => self.stream.lock().write_all(frames),
            Some(c) => {
                let mut c = c.lock();
                let s = self.stream.lock();
                tls_send(&mut c, &*s, frames)
            }
        }
    }
}

impl ReplySink for TcpSink {
    fn send(&self, msg: &Message<'_>) -> io::Result<()> {
        self.send_frames(&msg.encode())
    }
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.stream.lock().shutdown(Shutdown::Both);
    }
}

/// Accepts replication connections until `stop` is set, a thread per connection, secured
/// as `security` says: with a secret, only sources that prove they hold it are heard; with
/// TLS, only TLS is spoken.
pub fn serve(
    listener: TcpListener,
    directory: Arc<dyn MirrorDirectory>,
    stop: Arc<AtomicBool>,
    security: LinkSecurity,
) -> io::Result<()> {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("replication accept: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let directory = directory.clone();
        let security = security.clone();
        let _ = thread::Builder::new().name("nvm-repl-conn".into()).spawn(move || {
            let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
            if let Err(e) = serve_connection(stream, directory.as_ref(), &security) {
                eprintln!("replication: connection from {peer}: {e}");
            }
        });
    }
    Ok(())
}

/// What the handshake's first frame was.
enum First {
    Hello(Hello),
    AuthRequest(auth::Nonce),
}

/// Reads a handshake frame into `buf` and decodes it as a hello or an authentication
/// request; anything else is answered with `Error` and ends the connection.
fn read_first<S: Read + Write>(stream: &mut S, buf: &mut Vec<u8>, want: &str) -> io::Result<First> {
    let answer = |stream: &mut S, reason: String| {
        let _ = stream.write_all(&Message::Error { reason }.encode()).and_then(|()| stream.flush());
    };
    if let Err(e) = read_frame(stream, buf, FIRST_FRAME_BODY_MAX) {
        answer(stream, format!("bad {want}: {e}"));
        return Err(e);
    }
    match wire::decode(buf) {
        Ok(Some((Message::Hello(h), _))) => Ok(First::Hello(h)),
        Ok(Some((Message::AuthRequest { nonce }, _))) => Ok(First::AuthRequest(nonce)),
        Ok(other) => {
            let reason = format!("expected {want}, got {:?}", other.map(|(m, _)| m));
            answer(stream, reason.clone());
            Err(io::Error::new(io::ErrorKind::InvalidData, reason))
        }
        Err(e) => {
            answer(stream, e.to_string());
            Err(io::Error::new(io::ErrorKind::InvalidData, e))
        }
    }
}

/// Refuses a peer before its hello is acted on: a `Refuse(unauthenticated)` to it, the
/// directory told, and the error the accept loop logs with the peer's address.
fn refuse_unauthenticated<S: Write>(
    stream: &mut S,
    directory: &dyn MirrorDirectory,
    peer: &str,
    to_peer: &str,
    logged: String,
) -> io::Error {
    let frame = Message::Refuse { code: RefuseCode::Unauthenticated, reason: to_peer.into() }.encode();
    let _ = stream.write_all(&frame).and_then(|()| stream.flush());
    directory.peer_refused(peer, &logged);
    io::Error::new(io::ErrorKind::PermissionDenied, format!("refused: {logged}"))
}

/// What the destination keeps of an authenticated handshake to prove its answer with.
struct Proven<'a> {
    secret: &'a PeerSecret,
    client_nonce: auth::Nonce,
    server_nonce: auth::Nonce,
    hello_frame: Vec<u8>,
}

impl Proven<'_> {
    /// The destination's proof frame over its answer frame, then the answer.
    fn frames(&self, answer: &[u8]) -> Vec<u8> {
        let proof = self.secret.destination_proof(&self.client_nonce, &self.server_nonce, &self.hello_frame, answer);
        let mut out = Message::AuthProof { proof }.encode();
        out.extend_from_slice(answer);
        out
    }
}

/// The destination's half of the handshake: with a secret, the challenge-response (the
/// source's proof checked; ours goes with the answer, [`Proven`]); without one, the hello
/// as it comes. Returns the hello, authenticated where this node has a secret; a refused
/// peer has touched nothing.
fn accept_hello<'s, S: Read + Write>(
    stream: &mut S,
    peer: &str,
    directory: &dyn MirrorDirectory,
    secret: Option<&'s PeerSecret>,
) -> io::Result<(Hello, Option<Proven<'s>>)> {
    let mut first = Vec::new();
    let first_msg = read_first(stream, &mut first, "hello")?;
    let (secret, client_nonce) = match (secret, first_msg) {
        (None, First::Hello(h)) => return Ok((h, None)),
        (None, First::AuthRequest(_)) => {
            return Err(refuse_unauthenticated(
                stream,
                directory,
                peer,
                "this node has no shared secret (--secret-file) and cannot authenticate",
                format!("peer {peer} asked to authenticate, and this node has no secret (--secret-file)"),
            ))
        }
        (Some(_), First::Hello(h)) => {
            return Err(refuse_unauthenticated(
                stream,
                directory,
                peer,
                "this node requires authentication: the source did not authenticate (start it with the pair's --secret-file)",
                format!("{}/{} from {peer}: peer did not authenticate (it runs without --secret-file)", h.source_node, h.volume),
            ))
        }
        (Some(secret), First::AuthRequest(nonce)) => (secret, nonce),
    };
    let server_nonce = auth::fresh_nonce().map_err(io::Error::other)?;
    stream.write_all(&Message::AuthChallenge { nonce: server_nonce }.encode())?;
    stream.flush()?;
    let hello = match read_first(stream, &mut first, "hello")? {
        First::Hello(h) => h,
        First::AuthRequest(_) => {
            let reason = "expected hello, got a second authentication request".to_string();
            let _ = stream.write_all(&Message::Error { reason: reason.clone() }.encode()).and_then(|()| stream.flush());
            return Err(io::Error::new(io::ErrorKind::InvalidData, reason));
        }
    };
    // `first` now holds the hello frame exactly as it came: the bytes the proofs cover.
    let mut proof_frame = Vec::new();
    let who = format!("{}/{} from {peer}", hello.source_node, hello.volume);
    let proof = match read_frame(stream, &mut proof_frame, FIRST_FRAME_BODY_MAX)
        .map_err(|e| e.to_string())
        .and_then(|()| wire::decode(&proof_frame).map_err(|e| e.to_string()))
    {
        Ok(Some((Message::AuthProof { proof }, _))) => proof,
        Ok(other) => {
            let got = format!("{:?}", other.map(|(m, _)| m));
            return Err(refuse_unauthenticated(
                stream,
                directory,
                peer,
                "peer did not authenticate: expected the source's proof after its hello",
                format!("{who}: peer did not authenticate: expected its proof after the hello, got {got}"),
            ));
        }
        Err(e) => {
            return Err(refuse_unauthenticated(
                stream,
                directory,
                peer,
                &format!("peer did not authenticate: bad proof frame: {e}"),
                format!("{who}: peer did not authenticate: bad proof frame: {e}"),
            ))
        }
    };
    if !secret.verify_source(&server_nonce, &client_nonce, &first, &proof) {
        return Err(refuse_unauthenticated(
            stream,
            directory,
            peer,
            "wrong secret: the source's proof does not verify (the two nodes hold different secrets)",
            format!("{who}: wrong secret (its proof does not verify)"),
        ));
    }
    Ok((hello, Some(Proven { secret, client_nonce, server_nonce, hello_frame: first })))
}

/// The connection's input on the destination: the socket, or the socket through TLS.
struct Input {
    stream: TcpStream,
    /// Records read from the socket and not yet given to rustls: `raw[start..end]`.
    raw: Vec<u8>,
    start: usize,
    end: usize,
}

/// Bytes of TLS records read from the socket at once.
const RAW_BUF_BYTES: usize = 64 * 1024;

impl Input {
    /// Reads what has arrived into `out`, waiting for something where nothing has: at most
    /// one socket read, so that everything one read brought in is committed together.
    /// `Ok(0)`: the peer is gone.
    fn read(&mut self, sink: &TcpSink, out: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &sink.tls else {
            return self.stream.read(out);
        };
        let mut got = 0usize;
        loop {
            {
                let mut c = tls.lock();
                while got < out.len() {
                    match c.reader().read(&mut out[got..]) {
                        Ok(0) => return Ok(got),
                        Ok(n) => got += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // The peer went away without ending TLS: as a plain end of input.
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(got),
                        Err(e) => return Err(e),
                    }
                }
                if got == out.len() {
                    return Ok(got);
                }
                // rustls holds no plaintext now: the records read already come next.
                if self.start < self.end {
                    let mut pending = &self.raw[self.start..self.end];
                    let n = c.read_tls(&mut pending)?;
                    self.start += n;
                    c.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    if c.wants_write() {
                        let s = sink.stream.lock();
                        while c.wants_write() {
                            c.write_tls(&mut &*s)?;
                        }
                    }
                    continue;
                }
            }
            if got > 0 {
                return Ok(got);
            }
            let n = self.stream.read(&mut self.raw)?;
            if n == 0 {
                return Ok(0);
            }
            (self.start, self.end) = (0, n);
        }
    }
}

/// Serves one connection: TLS and the handshake (authenticated, where `security` has a
/// secret), then frames until the peer leaves or errs.
pub fn serve_connection(
    mut stream: TcpStream,
    directory: &dyn MirrorDirectory,
    security: &LinkSecurity,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let secret = security.secret.as_ref();
    let (tls, (hello, proven)) = match &security.tls {
        None => (None, accept_hello(&mut stream, &peer, directory, secret)?),
        Some(tls) => {
            // A plain source's hello: told in its own terms, not with a TLS alert.
            let mut magic = [0u8; 4];
            if stream.peek(&mut magic).is_ok_and(|n| n == magic.len()) && u32::from_le_bytes(magic) == wire::FRAME_MAGIC
            {
                let reason = "this node speaks TLS only (--tls-cert): the source must use TLS too".to_string();
                // The hello is taken first, so that closing does not reset the connection
                // before the source reads why.
                let _ = read_frame(&mut stream, &mut Vec::new(), FIRST_FRAME_BODY_MAX);
                let _ = stream.write_all(&Message::Error { reason: reason.clone() }.encode());
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a plain hello from {peer}: {reason}")));
            }
            let mut conn = tls.accept().map_err(io::Error::other)?;
            tls_handshake(&mut conn, &mut stream)?;
            let r = accept_hello(&mut rustls::Stream::new(&mut conn, &mut stream), &peer, directory, secret)?;
            (Some(Mutex::new(conn)), r)
        }
    };
    let sink = Arc::new(TcpSink { stream: Mutex::new(stream.try_clone()?), tls, closed: AtomicBool::new(false) });
    // The answer to the hello, behind the destination's proof where the source proved itself.
    let answer = |msg: Message<'_>| -> io::Result<()> {
        let frame = msg.encode();
        match &proven {
            None => sink.send_frames(&frame),
            Some(p) => sink.send_frames(&p.frames(&frame)),
        }
    };
    let (mut handler, welcome) = match directory.attach(&hello, sink.clone()) {
        Ok(x) => x,
        Err((code, reason)) => {
            let _ = answer(Message::Refuse { code, reason: reason.clone() });
            sink.close();
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("refused {}/{}: {reason}", hello.source_node, hello.volume),
            ));
        }
    };
    answer(Message::Welcome(welcome))?;
    // A source may be idle for long between writes; the connection lives until closed.
    stream.set_read_timeout(None)?;
    let mut input =
        Input { stream, raw: if sink.tls.is_some() { vec![0u8; RAW_BUF_BYTES] } else { Vec::new() }, start: 0, end: 0 };
    let mut buf = vec![0u8; wire::BODY_MAX + 2 * FRAME_HEADER_BYTES];
    let mut filled = 0usize;
    loop {
        let n = match input.read(&sink, &mut buf[filled..]) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if sink.closed.load(Ordering::SeqCst) {
                    return Ok(());
                }
                return Err(e);
            }
        };
        filled += n;
        let mut used = 0usize;
        loop {
            match wire::decode(&buf[used..filled]) {
                Ok(Some((msg, len))) => {
                    used += len;
                    if let Err(reason) = handler.on_message(msg) {
                        let _ = sink.send(&Message::Error { reason: reason.clone() });
                        sink.close();
                        return Err(io::Error::new(io::ErrorKind::InvalidData, reason));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // Commit what was good before the bad frame, then refuse the rest.
                    let _ = handler.commit();
                    let reason = format!("bad frame: {e}");
                    let _ = sink.send(&Message::Error { reason: reason.clone() });
                    sink.close();
                    return Err(io::Error::new(io::ErrorKind::InvalidData, reason));
                }
            }
        }
        buf.copy_within(used..filled, 0);
        filled -= used;
        // Everything that arrived with this read is placed: one persist and one ack for it.
        if let Err(reason) = handler.commit() {
            let _ = sink.send(&Message::Error { reason: reason.clone() });
            sink.close();
            return Err(io::Error::other(reason));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{FrameHandler, Intent, LogTail};
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    /// A directory that welcomes every hello it is given and counts them.
    #[derive(Default)]
    struct Counting {
        attached: AtomicUsize,
        refused: Mutex<Vec<(String, String)>>,
    }

    struct Noop;

    impl FrameHandler for Noop {
        fn on_message(&mut self, _: Message<'_>) -> Result<(), String> {
            Ok(())
        }
        fn commit(&mut self) -> Result<(), String> {
            Ok(())
        }
    }

    impl MirrorDirectory for Counting {
        fn attach(
            &self,
            _: &Hello,
            _: Arc<dyn ReplySink>,
        ) -> Result<(Box<dyn FrameHandler>, Welcome), (RefuseCode, String)> {
            self.attached.fetch_add(1, Ordering::SeqCst);
            Ok((Box::new(Noop), welcome()))
        }
        fn peer_refused(&self, peer: &str, reason: &str) {
            self.refused.lock().push((peer.to_string(), reason.to_string()));
        }
    }

    fn welcome() -> Welcome {
        Welcome {
            epoch: 1,
            applied_cp: 0,
            applied_seq: 0,
            consistent: false,
            resyncable: false,
            logs: [LogTail::default(); 2],
        }
    }

    fn hello() -> Hello {
        Hello {
            source_node: "a".into(),
            volume: "vol".into(),
            volume_id: 1,
            epoch: 1,
            volume_bytes: 1 << 20,
            partition_bytes: 1 << 20,
            intent: Intent::Baseline,
            base_seq: 1,
            base_cp_gen: 1,
        }
    }

    fn secret(s: &str) -> LinkSecurity {
        LinkSecurity { secret: Some(PeerSecret::new(s.as_bytes()).unwrap()), tls: None }
    }

    /// A destination on loopback: its address and its directory.
    fn destination(security: LinkSecurity) -> (String, Arc<Counting>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let dir = Arc::new(Counting::default());
        let d: Arc<dyn MirrorDirectory> = dir.clone();
        thread::spawn(move || serve(listener, d, Arc::new(AtomicBool::new(false)), security));
        (addr, dir)
    }

    /// Waits (bounded) for the directory to hear of `n` refusals.
    fn refusals(dir: &Counting, n: usize) -> Vec<(String, String)> {
        let start = Instant::now();
        while dir.refused.lock().len() < n && start.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(5));
        }
        dir.refused.lock().clone()
    }

    fn refused_reason(r: Result<(TcpLink, Welcome), ConnectError>) -> String {
        match r {
            Err(ConnectError::Refused { code: RefuseCode::Unauthenticated, reason, .. }) => reason,
            Err(e) => panic!("expected a refusal as unauthenticated, got {e}"),
            Ok(_) => panic!("expected a refusal as unauthenticated, got a welcome"),
        }
    }

    fn unauthenticated_reason(r: Result<(TcpLink, Welcome), ConnectError>) -> String {
        match r {
            Err(ConnectError::Unauthenticated { reason, .. }) => reason,
            Err(e) => panic!("expected the destination unauthenticated, got {e}"),
            Ok(_) => panic!("a destination that did not authenticate was believed"),
        }
    }

    #[test]
    fn the_same_secret_or_none_on_both_sides_connects() {
        for s in [LinkSecurity::default(), secret("k")] {
            let (addr, dir) = destination(s.clone());
            let (_link, w) = TcpConnector::new(s).connect(&addr, &hello()).unwrap();
            assert_eq!(w, welcome());
            assert_eq!(dir.attached.load(Ordering::SeqCst), 1);
            assert!(dir.refused.lock().is_empty());
        }
    }

    #[test]
    fn a_destination_with_a_secret_refuses_sources_without_it() {
        let (addr, dir) = destination(secret("k"));
        let r = refused_reason(TcpConnector::default().connect(&addr, &hello()));
        assert!(r.contains("this node requires authentication"), "{r}");
        let r = refused_reason(TcpConnector::new(secret("not k")).connect(&addr, &hello()));
        assert!(r.contains("wrong secret"), "{r}");
        let seen = refusals(&dir, 2);
        assert!(seen[0].1.contains("peer did not authenticate"), "{seen:?}");
        assert!(seen[1].1.contains("wrong secret"), "{seen:?}");
        assert!(seen.iter().all(|(peer, _)| peer.starts_with("127.0.0.1:")), "{seen:?}");
        assert_eq!(dir.attached.load(Ordering::SeqCst), 0, "a refused peer reached the directory");
    }

    #[test]
    fn a_source_with_a_secret_refuses_a_destination_without_it() {
        let (addr, dir) = destination(LinkSecurity::default());
        let r = unauthenticated_reason(TcpConnector::new(secret("k")).connect(&addr, &hello()));
        assert!(r.contains("peer did not authenticate") && r.contains("has no shared secret"), "{r}");
        assert_eq!(dir.attached.load(Ordering::SeqCst), 0);
        let seen = refusals(&dir, 1);
        assert!(seen[0].1.contains("asked to authenticate"), "{seen:?}");
    }

    /// A destination that goes through the motions without the secret: it answers the
    /// request with `challenge`, reads the hello and the proof, then answers with `answer`
    /// (its frames, raw).
    fn rogue(challenge: Vec<u8>, answer: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            read_frame(&mut s, &mut buf, FIRST_FRAME_BODY_MAX).unwrap();
            s.write_all(&challenge).unwrap();
            if read_frame(&mut s, &mut buf, FIRST_FRAME_BODY_MAX).is_ok() {
                read_frame(&mut s, &mut buf, FIRST_FRAME_BODY_MAX).unwrap();
                s.write_all(&answer).unwrap();
            }
            let _ = s.read(&mut [0u8; 1]);
        });
        addr
    }

    #[test]
    fn a_source_with_a_secret_refuses_a_destination_that_cannot_prove_it() {
        let challenge = Message::AuthChallenge { nonce: [5; 32] }.encode();
        let w = Message::Welcome(welcome()).encode();
        let mut forged = Message::AuthProof { proof: [9; 32] }.encode();
        forged.extend_from_slice(&w);
        let stale = Message::Refuse { code: RefuseCode::StaleEpoch, reason: "failed over".into() }.encode();
        let mismatch = Message::Refuse { code: RefuseCode::Mismatch, reason: "start over".into() }.encode();
        // A proof made with the right secret for another answer: the welcome was swapped.
        let k = PeerSecret::new(b"k").unwrap();
        let mut swapped = Message::AuthProof { proof: k.destination_proof(&[0; 32], &[5; 32], b"", &stale) }.encode();
        swapped.extend_from_slice(&w);
        for (challenge, answer, want) in [
            (challenge.clone(), forged, "wrong secret"),
            (challenge.clone(), swapped, "wrong secret"),
            (challenge.clone(), w.clone(), "without proving"),
            (challenge.clone(), stale.clone(), "without proving"),
            // Unproven refusals before the challenge: never a fence, never a baseline.
            (stale, Vec::new(), "peer did not authenticate"),
            (mismatch, Vec::new(), "peer did not authenticate"),
            (w, Vec::new(), "expected its challenge"),
        ] {
            let addr = rogue(challenge, answer);
            let r = unauthenticated_reason(TcpConnector::new(secret("k")).connect(&addr, &hello()));
            assert!(r.contains(want), "{r}");
        }
    }

    /// A raw source: the authentication request with `client_nonce`, then the challenge.
    fn challenge(s: &mut TcpStream, client_nonce: auth::Nonce) -> auth::Nonce {
        s.write_all(&Message::AuthRequest { nonce: client_nonce }.encode()).unwrap();
        let mut buf = Vec::new();
        read_frame(s, &mut buf, FIRST_FRAME_BODY_MAX).unwrap();
        match wire::decode(&buf).unwrap() {
            Some((Message::AuthChallenge { nonce }, _)) => nonce,
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    fn answer(s: &mut TcpStream) -> Message<'static> {
        let mut buf = Vec::new();
        read_frame(s, &mut buf, FIRST_FRAME_BODY_MAX).unwrap();
        match wire::decode(&buf).unwrap() {
            Some((Message::Refuse { code, reason }, _)) => Message::Refuse { code, reason },
            Some((Message::AuthProof { proof }, _)) => Message::AuthProof { proof },
            Some((Message::Error { reason }, _)) => Message::Error { reason },
            other => panic!("unexpected answer {other:?}"),
        }
    }

    #[test]
    fn a_replayed_proof_does_not_verify_against_a_fresh_challenge() {
        let k = PeerSecret::new(b"k").unwrap();
        let (addr, dir) = destination(secret("k"));
        let hello_frame = Message::Hello(hello()).encode();
        let cn = [1u8; 32];
        // A genuine exchange, recorded.
        let mut s = TcpStream::connect(&addr).unwrap();
        let sn1 = challenge(&mut s, cn);
        let recorded = Message::AuthProof { proof: k.source_proof(&sn1, &cn, &hello_frame) }.encode();
        s.write_all(&hello_frame).unwrap();
        s.write_all(&recorded).unwrap();
        assert!(matches!(answer(&mut s), Message::AuthProof { .. }));
        // The proof covers the welcome that follows it.
        drop(s);
        // The same frames again on a new connection: a new challenge, and the old proof fails.
        let mut s = TcpStream::connect(&addr).unwrap();
        let sn2 = challenge(&mut s, cn);
        assert_ne!(sn1, sn2, "challenges are fresh");
        s.write_all(&hello_frame).unwrap();
        s.write_all(&recorded).unwrap();
        assert!(matches!(answer(&mut s), Message::Refuse { code: RefuseCode::Unauthenticated, .. }));
        assert_eq!(dir.attached.load(Ordering::SeqCst), 1, "only the genuine exchange attached");
    }

    #[test]
    fn truncated_and_misplaced_handshake_frames_are_refused() {
        let k = PeerSecret::new(b"k").unwrap();
        let (addr, dir) = destination(secret("k"));
        let hello_frame = Message::Hello(hello()).encode();
        // An authentication request cut short (the peer goes away mid-frame).
        let full = Message::AuthRequest { nonce: [1; 32] }.encode();
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&full[..full.len() - 10]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let _ = read_until_eof(&mut s);
        // A request whose body is one byte short, with a valid checksum.
        let body = [1u8; 31];
        let mut short = wire::frame_header(32, body.len(), wire::frame_crc(32, body.len(), &[&body])).to_vec();
        short.extend_from_slice(&body);
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&short).unwrap();
        assert!(matches!(answer(&mut s), Message::Error { .. }));
        // A proof frame cut short after the hello.
        let mut s = TcpStream::connect(&addr).unwrap();
        let sn = challenge(&mut s, [2; 32]);
        let proof = Message::AuthProof { proof: k.source_proof(&sn, &[2; 32], &hello_frame) }.encode();
        s.write_all(&hello_frame).unwrap();
        s.write_all(&proof[..20]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        assert!(matches!(answer(&mut s), Message::Refuse { code: RefuseCode::Unauthenticated, .. }));
        // A welcome where the proof belongs, and a proof with no hello before it.
        let mut s = TcpStream::connect(&addr).unwrap();
        challenge(&mut s, [3; 32]);
        s.write_all(&hello_frame).unwrap();
        s.write_all(&Message::Welcome(welcome()).encode()).unwrap();
        assert!(matches!(answer(&mut s), Message::Refuse { code: RefuseCode::Unauthenticated, .. }));
        let mut s = TcpStream::connect(&addr).unwrap();
        challenge(&mut s, [4; 32]);
        s.write_all(&proof).unwrap();
        assert!(matches!(answer(&mut s), Message::Error { .. }));
        // A proof for another hello (the hello changed after it was proven).
        let mut s = TcpStream::connect(&addr).unwrap();
        let sn = challenge(&mut s, [5; 32]);
        let proof = Message::AuthProof { proof: k.source_proof(&sn, &[5; 32], &hello_frame) }.encode();
        let mut other = hello();
        other.epoch = 9;
        s.write_all(&Message::Hello(other).encode()).unwrap();
        s.write_all(&proof).unwrap();
        assert!(matches!(answer(&mut s), Message::Refuse { code: RefuseCode::Unauthenticated, .. }));
        assert_eq!(dir.attached.load(Ordering::SeqCst), 0);
    }

    /// A directory whose handler counts entry bytes and acks every commit with the
    /// number of frames seen so far.
    #[derive(Default)]
    struct Echo {
        bytes: Arc<AtomicUsize>,
    }

    struct EchoHandler {
        sink: Arc<dyn ReplySink>,
        bytes: Arc<AtomicUsize>,
        frames: u64,
    }

    impl FrameHandler for EchoHandler {
        fn on_message(&mut self, m: Message<'_>) -> Result<(), String> {
            if let Message::Entries { bytes, .. } = m {
                self.bytes.fetch_add(bytes.len(), Ordering::SeqCst);
            }
            self.frames += 1;
            Ok(())
        }
        fn commit(&mut self) -> Result<(), String> {
            self.sink.send(&Message::Ack { seq: self.frames }).map_err(|e| e.to_string())
        }
    }

    impl MirrorDirectory for Echo {
        fn attach(
            &self,
            _: &Hello,
            sink: Arc<dyn ReplySink>,
        ) -> Result<(Box<dyn FrameHandler>, Welcome), (RefuseCode, String)> {
            Ok((Box::new(EchoHandler { sink, bytes: self.bytes.clone(), frames: 0 }), welcome()))
        }
    }

    fn tls_security(dir: &std::path::Path, secret: Option<&str>) -> LinkSecurity {
        let (ca, cert, key) = crate::transport::tls::testing::write_pair(dir);
        LinkSecurity {
            secret: secret.map(|s| PeerSecret::new(s.as_bytes()).unwrap()),
            tls: Some(crate::transport::tls::TlsConfig::from_files(&cert, &key, Some(&ca)).unwrap()),
        }
    }

    #[test]
    fn entries_cross_tls_and_replies_are_polled_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        for security in [tls_security(dir.path(), Some("k")), tls_security(dir.path(), None)] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let echo = Arc::new(Echo::default());
            let d: Arc<dyn MirrorDirectory> = echo.clone();
            let served = security.clone();
            thread::spawn(move || serve(listener, d, Arc::new(AtomicBool::new(false)), served));
            let (mut link, w) = TcpConnector::new(security).connect(&addr, &hello()).unwrap();
            assert_eq!(w, welcome());
            // Batches well above rustls's buffers and the TLS record size.
            let batch = vec![0xa5u8; 300 * 1024];
            let mut sent = 0usize;
            for i in 0..8u64 {
                link.send(&Message::Cp { cp: i, partition: 0, upto_seq: i, by_value: false }).unwrap();
                link.send_entries(0, i, &batch).unwrap();
                sent += batch.len();
            }
            link.flush().unwrap();
            let start = Instant::now();
            let mut last = 0;
            while last < 16 {
                assert!(start.elapsed() < Duration::from_secs(20), "acks stopped at {last}");
                match link.poll() {
                    Some(LinkEvent::Reply(Reply::Ack { seq })) => last = seq,
                    Some(other) => panic!("{other:?}"),
                    None => thread::sleep(Duration::from_millis(1)),
                }
            }
            assert_eq!(echo.bytes.load(Ordering::SeqCst), sent);
            link.close();
            assert!(matches!(link.poll(), Some(LinkEvent::Closed { .. })));
        }
    }

    #[test]
    fn tls_on_one_end_only_or_an_untrusted_certificate_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let tls = tls_security(dir.path(), None);
        let other = tempfile::tempdir().unwrap();
        let untrusted = tls_security(other.path(), None);
        // A TLS source, a plain destination.
        let (addr, dir_plain) = destination(LinkSecurity::default());
        let e = TcpConnector::new(tls.clone()).connect(&addr, &hello()).err().expect("refused").to_string();
        assert!(e.contains("TLS"), "{e}");
        assert_eq!(dir_plain.attached.load(Ordering::SeqCst), 0);
        // A plain source, a TLS destination.
        let (addr, dir_tls) = destination(tls.clone());
        let e = TcpConnector::default().connect(&addr, &hello()).err().expect("refused").to_string();
        assert!(e.contains("speaks TLS only"), "{e}");
        // A source that trusts another CA.
        let e = TcpConnector::new(untrusted).connect(&addr, &hello()).err().expect("refused").to_string();
        assert!(e.contains("certificate"), "{e}");
        assert_eq!(dir_tls.attached.load(Ordering::SeqCst), 0);
    }

    fn read_until_eof(s: &mut TcpStream) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }
}
