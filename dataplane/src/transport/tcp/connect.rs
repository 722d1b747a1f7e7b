//! The source's side: connecting, the authenticated (and TLS) handshake, and the link
//! that sends entries and polls replies without waiting.

use super::*;

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
    /// The destination takes entries frames whose crc covers their header only
    /// ([`wire::FLAG_HEADER_CRC`]): each entry's own crc covers its bytes.
    header_crc: bool,
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
        detect_dead_peer(&stream).map_err(io_err)?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
        stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
        // This engine sends entries straight from the NVLog under their own checksums.
        let hello = Hello { features: hello.features | wire::FEATURE_HEADER_CRC_ENTRIES, ..hello.clone() };
        let hello_frame = Message::Hello(hello).encode();
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
                header_crc: welcome.header_crc_entries,
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
        let prefix = entries_prefix(partition, offset, bytes, self.header_crc);
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
