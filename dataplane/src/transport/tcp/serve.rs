//! The destination's side: accepting, the handshake that admits or refuses a source, and
//! the connection thread that feeds its frames to the mirror's session.

use super::*;

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
                tracing::warn!("replication accept: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let directory = directory.clone();
        let security = security.clone();
        let _ = thread::Builder::new().name("nvm-repl-conn".into()).spawn(move || {
            let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
            if let Err(e) = serve_connection(stream, directory.as_ref(), &security) {
                tracing::warn!("replication: connection from {peer}: {e}");
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
    detect_dead_peer(&stream)?;
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
                    if let Err(reason) = handler.on_message(msg).map_err(|e| e.to_string()) {
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
        if let Err(reason) = handler.commit().map_err(|e| e.to_string()) {
            let _ = sink.send(&Message::Error { reason: reason.clone() });
            sink.close();
            return Err(io::Error::other(reason));
        }
    }
}
