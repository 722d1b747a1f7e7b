//! The TCP engine.
//!
//! Source side: the volume's poller writes frames straight from its NVLog with one
//! `writev` per batch, and busy-polls the socket for the destination's replies with
//! non-blocking reads: no thread sits between the poller and the connection. Destination side: one thread per connection
//! reads whatever has arrived, hands every whole frame to the mirror's handler (which
//! copies entries into the mapped log file), and commits once the input is drained: one
//! persist and one ack for the whole batch (group commit).
//!
//! With a shared secret ([`PeerSecret`]) both ends authenticate the other before the hello
//! is acted on: the challenge-response of `README.md` ("Authentication"), in [`TcpConnector`]
//! and [`serve_connection`].

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use parking_lot::Mutex;

use super::auth::{self, PeerSecret};
use super::wire::{self, entries_prefix, Message, FRAME_HEADER_BYTES};
use super::{
    ConnectError, Connector, Hello, Link, LinkError, LinkEvent, MirrorDirectory, RefuseCode, Reply, ReplySink, Welcome,
};

/// How long a connect or a hello may take, and how long a send may block on a peer that
/// does not read.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest hello or welcome: strings are bounded, so a first frame above this is
/// refused before its body is read.
const FIRST_FRAME_BODY_MAX: usize = 4096;

fn read_frame(stream: &mut TcpStream, buf: &mut Vec<u8>, body_max: usize) -> io::Result<()> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    stream.read_exact(&mut header)?;
    let (_, len) = wire::decode_header(&header).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
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

/// Opens replication connections; with a secret, it authenticates each one both ways.
#[derive(Debug, Clone, Default)]
pub struct TcpConnector {
    secret: Option<PeerSecret>,
}

impl TcpConnector {
    pub fn new(secret: Option<PeerSecret>) -> TcpConnector {
        TcpConnector { secret }
    }
}

/// Bytes of replies buffered between polls; replies are small control frames.
const REPLY_BUF_BYTES: usize = 64 * 1024;

pub struct TcpLink {
    stream: TcpStream,
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
        let mut buf = Vec::new();
        match &self.secret {
            None => stream.write_all(&hello_frame).map_err(io_err)?,
            Some(secret) => authenticate_destination(&mut stream, &mut buf, target, secret, &hello_frame)?,
        }
        read_frame(&mut stream, &mut buf, FIRST_FRAME_BODY_MAX).map_err(io_err)?;
        let welcome = match decode_first(&buf, target)? {
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

/// The source's half of the challenge-response, up to the destination's proof, verified:
/// what follows on the stream is the destination's welcome or refusal.
fn authenticate_destination(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    target: &str,
    secret: &PeerSecret,
    hello_frame: &[u8],
) -> Result<(), ConnectError> {
    let io_err = |source| ConnectError::Io { target: target.to_string(), source };
    let unauthenticated =
        |reason: &str| ConnectError::Unauthenticated { target: target.to_string(), reason: reason.into() };
    let client_nonce = auth::fresh_nonce().map_err(|e| io_err(io::Error::other(e)))?;
    stream.write_all(&Message::AuthRequest { nonce: client_nonce }.encode()).map_err(io_err)?;
    read_frame(stream, buf, FIRST_FRAME_BODY_MAX).map_err(io_err)?;
    let server_nonce = match decode_first(buf, target)? {
        Message::AuthChallenge { nonce } => nonce,
        // A destination without a secret refuses to authenticate: a plain refusal, which
        // the source reports and retries; nothing it could be fenced by.
        Message::Refuse { code, reason } => {
            return Err(ConnectError::Refused { target: target.to_string(), code, reason })
        }
        Message::Error { reason } => {
            return Err(unauthenticated(&format!("it did not answer the authentication request: {reason}")))
        }
        other => return Err(unauthenticated(&format!("expected its challenge, got {other:?}"))),
    };
    let proof = secret.source_proof(&server_nonce, &client_nonce, hello_frame);
    let mut out = Vec::with_capacity(hello_frame.len() + FRAME_HEADER_BYTES + auth::MAC_BYTES);
    out.extend_from_slice(hello_frame);
    out.extend_from_slice(&Message::AuthProof { proof }.encode());
    stream.write_all(&out).map_err(io_err)?;
    read_frame(stream, buf, FIRST_FRAME_BODY_MAX).map_err(io_err)?;
    match decode_first(buf, target)? {
        Message::AuthProof { proof } => {
            if secret.verify_destination(&client_nonce, &server_nonce, hello_frame, &proof) {
                Ok(())
            } else {
                Err(unauthenticated("its proof does not verify: it does not hold this node's secret"))
            }
        }
        // The destination did not take our proof (another secret): it proves nothing
        // itself then, and its refusal only makes the source retry.
        Message::Refuse { code: code @ RefuseCode::Unauthenticated, reason } => {
            Err(ConnectError::Refused { target: target.to_string(), code, reason })
        }
        // Anything else unproven (a welcome, a refusal that would fence) is not acted on.
        other => Err(unauthenticated(&format!(
            "it answered without proving that it holds this node's secret ({})",
            match other {
                Message::Welcome(_) => "a welcome".to_string(),
                Message::Refuse { reason, .. } => format!("a refusal: {reason}"),
                other => format!("{other:?}"),
            }
        ))),
    }
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
                let reply = match msg {
                    Message::Ack { seq } => Ok(Reply::Ack { seq }),
                    Message::CpDone { cp } => Ok(Reply::CpDone { cp }),
                    Message::BaselineAck => Ok(Reply::BaselineAck),
                    Message::Refuse { code, reason } => Ok(Reply::Refuse { code, reason }),
                    Message::Error { reason } => Ok(Reply::Error { reason }),
                    Message::RdmaListen { addr, token } => Ok(Reply::RdmaListen { addr, token }),
                    Message::RdmaRegions { regions } => Ok(Reply::RdmaRegions { regions }),
                    other => Err(format!("unexpected frame from destination: {other:?}")),
                };
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
            let _ = self.stream.shutdown(Shutdown::Both);
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
        let mut slices = [IoSlice::new(&self.wbuf), IoSlice::new(&prefix), IoSlice::new(bytes)];
        let r = self.stream.write_all_vectored_compat(&mut slices);
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
            let r = self.stream.write_all(&self.wbuf);
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
            let free = &mut self.rbuf[self.rfill..];
            // SAFETY: `free` is a valid, writable buffer of `free.len()` bytes for the
            // duration of the call, and the fd is the open socket `self.stream` owns.
            let n = unsafe {
                libc::recv(self.stream.as_raw_fd(), free.as_mut_ptr().cast(), free.len(), libc::MSG_DONTWAIT)
            };
            match n {
                0 => self.close_with("destination closed the connection".into()),
                n if n > 0 => self.rfill += n.unsigned_abs(),
                _ => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => return None,
                        io::ErrorKind::Interrupted => {}
                        _ => self.close_with(format!("read: {e}")),
                    }
                }
            }
        }
    }
    fn close(&mut self) {
        self.close_with("closed by the source".into());
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
    closed: AtomicBool,
}

impl ReplySink for TcpSink {
    fn send(&self, msg: &Message<'_>) -> io::Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "connection closed"));
        }
        self.stream.lock().write_all(&msg.encode())
    }
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.stream.lock().shutdown(Shutdown::Both);
    }
}

/// Accepts replication connections until `stop` is set, a thread per connection. With a
/// secret, only sources that prove they hold it are heard.
pub fn serve(
    listener: TcpListener,
    directory: Arc<dyn MirrorDirectory>,
    stop: Arc<AtomicBool>,
    secret: Option<PeerSecret>,
) -> io::Result<()> {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("replication: accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let directory = directory.clone();
        let secret = secret.clone();
        let _ = thread::Builder::new().name("nvm-repl-conn".into()).spawn(move || {
            let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
            if let Err(e) = serve_connection(stream, directory.as_ref(), secret.as_ref()) {
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
fn read_first(stream: &mut TcpStream, buf: &mut Vec<u8>, want: &str) -> io::Result<First> {
    if let Err(e) = read_frame(stream, buf, FIRST_FRAME_BODY_MAX) {
        let _ = stream.write_all(&Message::Error { reason: format!("bad {want}: {e}") }.encode());
        return Err(e);
    }
    match wire::decode(buf) {
        Ok(Some((Message::Hello(h), _))) => Ok(First::Hello(h)),
        Ok(Some((Message::AuthRequest { nonce }, _))) => Ok(First::AuthRequest(nonce)),
        Ok(other) => {
            let reason = format!("expected {want}, got {:?}", other.map(|(m, _)| m));
            let _ = stream.write_all(&Message::Error { reason: reason.clone() }.encode());
            Err(io::Error::new(io::ErrorKind::InvalidData, reason))
        }
        Err(e) => {
            let _ = stream.write_all(&Message::Error { reason: e.to_string() }.encode());
            Err(io::Error::new(io::ErrorKind::InvalidData, e))
        }
    }
}

/// Refuses a peer before its hello is acted on: a `Refuse(unauthenticated)` to it, the
/// directory told, and the error the accept loop logs with the peer's address.
fn refuse_unauthenticated(
    stream: &mut TcpStream,
    directory: &dyn MirrorDirectory,
    peer: &str,
    to_peer: &str,
    logged: String,
) -> io::Error {
    let _ = stream.write_all(&Message::Refuse { code: RefuseCode::Unauthenticated, reason: to_peer.into() }.encode());
    let _ = stream.shutdown(Shutdown::Both);
    directory.peer_refused(peer, &logged);
    io::Error::new(io::ErrorKind::PermissionDenied, logged)
}

/// The destination's half of the handshake: with a secret, the challenge-response (the
/// source's proof checked, then ours sent); without one, the hello as it comes. Returns
/// the hello, authenticated where this node has a secret; a refused peer has touched
/// nothing.
fn accept_hello(
    stream: &mut TcpStream,
    directory: &dyn MirrorDirectory,
    secret: Option<&PeerSecret>,
) -> io::Result<Hello> {
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let mut first = Vec::new();
    let first_msg = read_first(stream, &mut first, "hello")?;
    let (secret, client_nonce) = match (secret, first_msg) {
        (None, First::Hello(h)) => return Ok(h),
        (None, First::AuthRequest(_)) => {
            return Err(refuse_unauthenticated(
                stream,
                directory,
                &peer,
                "the destination has no shared secret (--secret-file) and cannot authenticate; this source requires authentication",
                "the peer asked to authenticate, and this node has no secret (--secret-file)".into(),
            ))
        }
        (Some(_), First::Hello(h)) => {
            return Err(refuse_unauthenticated(
                stream,
                directory,
                &peer,
                "the destination requires authentication: this source did not authenticate (start it with the pair's --secret-file)",
                format!("refused {}/{}: peer did not authenticate (it has no --secret-file)", h.source_node, h.volume),
            ))
        }
        (Some(secret), First::AuthRequest(nonce)) => (secret, nonce),
    };
    let server_nonce = auth::fresh_nonce().map_err(io::Error::other)?;
    stream.write_all(&Message::AuthChallenge { nonce: server_nonce }.encode())?;
    let hello = match read_first(stream, &mut first, "hello")? {
        First::Hello(h) => h,
        First::AuthRequest(_) => {
            let reason = "expected hello, got a second authentication request".to_string();
            let _ = stream.write_all(&Message::Error { reason: reason.clone() }.encode());
            return Err(io::Error::new(io::ErrorKind::InvalidData, reason));
        }
    };
    // `first` now holds the hello frame exactly as it came: the bytes the proof covers.
    let mut proof_frame = Vec::new();
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
                &peer,
                "authentication failed: expected the source's proof after its hello",
                format!(
                    "refused {}/{}: expected its proof after the hello, got {got}",
                    hello.source_node, hello.volume
                ),
            ));
        }
        Err(e) => {
            return Err(refuse_unauthenticated(
                stream,
                directory,
                &peer,
                &format!("authentication failed: bad proof frame: {e}"),
                format!("refused {}/{}: bad proof frame: {e}", hello.source_node, hello.volume),
            ))
        }
    };
    if !secret.verify_source(&server_nonce, &client_nonce, &first, &proof) {
        return Err(refuse_unauthenticated(
            stream,
            directory,
            &peer,
            "authentication failed: the source's proof does not verify (the two nodes hold different secrets)",
            format!("refused {}/{}: authentication failed: wrong secret", hello.source_node, hello.volume),
        ));
    }
    stream.write_all(
        &Message::AuthProof { proof: secret.destination_proof(&client_nonce, &server_nonce, &first) }.encode(),
    )?;
    Ok(hello)
}

/// Serves one connection: the handshake (authenticated with `secret`, where given), then
/// frames until the peer leaves or errs.
pub fn serve_connection(
    mut stream: TcpStream,
    directory: &dyn MirrorDirectory,
    secret: Option<&PeerSecret>,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let hello = accept_hello(&mut stream, directory, secret)?;
    let sink = Arc::new(TcpSink { stream: Mutex::new(stream.try_clone()?), closed: AtomicBool::new(false) });
    let (mut handler, welcome) = match directory.attach(&hello, sink.clone()) {
        Ok(x) => x,
        Err((code, reason)) => {
            let _ = sink.send(&Message::Refuse { code, reason: reason.clone() });
            sink.close();
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("refused {}/{}: {reason}", hello.source_node, hello.volume),
            ));
        }
    };
    sink.send(&Message::Welcome(welcome))?;
    // A source may be idle for long between writes; the connection lives until closed.
    stream.set_read_timeout(None)?;
    let mut buf = vec![0u8; wire::BODY_MAX + 2 * FRAME_HEADER_BYTES];
    let mut filled = 0usize;
    loop {
        let n = match stream.read(&mut buf[filled..]) {
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

    fn secret(s: &str) -> Option<PeerSecret> {
        Some(PeerSecret::new(s.as_bytes()).unwrap())
    }

    /// A destination on loopback: its address and its directory.
    fn destination(secret: Option<PeerSecret>) -> (String, Arc<Counting>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let dir = Arc::new(Counting::default());
        let d: Arc<dyn MirrorDirectory> = dir.clone();
        thread::spawn(move || serve(listener, d, Arc::new(AtomicBool::new(false)), secret));
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

    #[test]
    fn the_same_secret_or_none_on_both_sides_connects() {
        for s in [None, secret("k")] {
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
        assert!(r.contains("requires authentication"), "{r}");
        let r = refused_reason(TcpConnector::new(secret("not k")).connect(&addr, &hello()));
        assert!(r.contains("does not verify"), "{r}");
        let seen = refusals(&dir, 2);
        assert!(seen[0].1.contains("peer did not authenticate"), "{seen:?}");
        assert!(seen[1].1.contains("wrong secret"), "{seen:?}");
        assert!(seen.iter().all(|(peer, _)| peer.starts_with("127.0.0.1:")), "{seen:?}");
        assert_eq!(dir.attached.load(Ordering::SeqCst), 0, "a refused peer reached the directory");
    }

    #[test]
    fn a_source_with_a_secret_refuses_a_destination_without_it() {
        let (addr, dir) = destination(None);
        let r = refused_reason(TcpConnector::new(secret("k")).connect(&addr, &hello()));
        assert!(r.contains("has no shared secret"), "{r}");
        assert_eq!(dir.attached.load(Ordering::SeqCst), 0);
    }

    /// A destination that goes through the motions without the secret: it challenges,
    /// reads the hello and the proof, then answers with `answer` (its frames, raw).
    fn rogue(answer: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            read_frame(&mut s, &mut buf, FIRST_FRAME_BODY_MAX).unwrap();
            s.write_all(&Message::AuthChallenge { nonce: [5; 32] }.encode()).unwrap();
            read_frame(&mut s, &mut buf, FIRST_FRAME_BODY_MAX).unwrap();
            read_frame(&mut s, &mut buf, FIRST_FRAME_BODY_MAX).unwrap();
            s.write_all(&answer).unwrap();
            let _ = s.read(&mut [0u8; 1]);
        });
        addr
    }

    #[test]
    fn a_source_with_a_secret_refuses_a_destination_that_cannot_prove_it() {
        let w = Message::Welcome(welcome()).encode();
        let mut forged = Message::AuthProof { proof: [9; 32] }.encode();
        forged.extend_from_slice(&w);
        let stale = Message::Refuse { code: RefuseCode::StaleEpoch, reason: "failed over".into() }.encode();
        for (answer, want) in [(forged, "does not verify"), (w.clone(), "without proving"), (stale, "without proving")]
        {
            let addr = rogue(answer);
            match TcpConnector::new(secret("k")).connect(&addr, &hello()) {
                Err(ConnectError::Unauthenticated { reason, .. }) => assert!(reason.contains(want), "{reason}"),
                Err(e) => panic!("expected the destination unauthenticated, got {e}"),
                Ok(_) => panic!("a destination without the secret was believed"),
            }
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
        let (addr, dir) = destination(Some(k.clone()));
        let hello_frame = Message::Hello(hello()).encode();
        let cn = [1u8; 32];
        // A genuine exchange, recorded.
        let mut s = TcpStream::connect(&addr).unwrap();
        let sn1 = challenge(&mut s, cn);
        let recorded = Message::AuthProof { proof: k.source_proof(&sn1, &cn, &hello_frame) }.encode();
        s.write_all(&hello_frame).unwrap();
        s.write_all(&recorded).unwrap();
        assert!(matches!(answer(&mut s), Message::AuthProof { .. }));
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
        let (addr, dir) = destination(Some(k.clone()));
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

    fn read_until_eof(s: &mut TcpStream) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }
}
