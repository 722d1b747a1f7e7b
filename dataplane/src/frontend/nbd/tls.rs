//! NBD over TLS (`NBD_OPT_STARTTLS`, the protocol's "forced TLS" mode): the connection of
//! a server with an [`NbdTls`] in each of its phases.
//!
//! - The handshake reads and writes through a [`Wire`], plain until the client asks for
//!   `STARTTLS` and TLS from the acknowledgement on (blocking, within the socket's
//!   timeouts). Before TLS, every option but `STARTTLS` and `ABORT` is answered
//!   `NBD_REP_ERR_TLS_REQD`, and `EXPORT_NAME` (which has no error reply) closes.
//! - A reactor's [`super::Session`] reads and writes its TLS connection without waiting
//!   ([`TlsConn`]): ciphertext from the socket only when the plaintext rustls holds is used
//!   up, so the socket is read until it would block, as edge-triggered readiness asks.
//! - A connection served on threads shares its TLS state between its reader and its writer
//!   ([`Shared`]): each takes the lock only to move bytes through rustls, never across a
//!   wait on the socket, and the ciphertext goes out in the order rustls made it.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use parking_lot::Mutex;
use rustls::{ServerConfig, ServerConnection};

use crate::frontend::ClientId;
use crate::transport::tls::DontWait;

/// The TLS an NBD server requires of its clients: the node's certificate, and the CAs that
/// client certificates must be signed by where it verifies them.
#[derive(Clone)]
pub struct NbdTls {
    config: Arc<ServerConfig>,
}

impl NbdTls {
    /// From a server configuration (see `TlsConfig::nbd_server`); a configuration with a
    /// client certificate verifier requires a certificate of every client.
    pub fn new(config: Arc<ServerConfig>) -> NbdTls {
        NbdTls { config }
    }
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NbdTls(..)")
    }
}

/// The handshake's side of a connection.
pub(super) enum Wire {
    /// Plain text: reads buffered (a buffer whose bytes past the handshake are the first
    /// requests), writes straight to the socket.
    Plain { reader: BufReader<TcpStream>, stream: TcpStream },
    /// After `STARTTLS`: everything through rustls (which buffers what it decrypted).
    Tls { conn: Box<ServerConnection>, stream: TcpStream },
}

impl Wire {
    pub(super) fn plain(stream: TcpStream, read_buffer: usize) -> io::Result<Wire> {
        let reader = BufReader::with_capacity(read_buffer, stream.try_clone()?);
        Ok(Wire::Plain { reader, stream })
    }

    pub(super) fn stream(&self) -> &TcpStream {
        match self {
            Wire::Plain { stream, .. } | Wire::Tls { stream, .. } => stream,
        }
    }

    pub(super) fn is_tls(&self) -> bool {
        matches!(self, Wire::Tls { .. })
    }

    /// Runs the TLS handshake after `STARTTLS` was acknowledged: whatever the client sent
    /// after the option (its hello, read ahead into the buffer) goes to rustls first.
    pub(super) fn start_tls(self, tls: &NbdTls) -> io::Result<Wire> {
        let Wire::Plain { reader, stream } = self else {
            return Err(io::Error::other("TLS is already running"));
        };
        let ahead = reader.buffer().to_vec();
        drop(reader);
        let mut conn = ServerConnection::new(tls.config.clone()).map_err(io::Error::other)?;
        let mut ahead = &ahead[..];
        while !ahead.is_empty() {
            conn.read_tls(&mut ahead)?;
            conn.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        crate::transport::tls::handshake_explained(&mut conn, &mut &stream, handshake_error)?;
        Ok(Wire::Tls { conn: Box::new(conn), stream })
    }

    /// The client as the handshake knows it: its address, and the names of its certificate
    /// where one was verified.
    pub(super) fn client(&self) -> Option<ClientId> {
        let addr = self.stream().peer_addr().ok()?.ip();
        let cert_names = match self {
            Wire::Plain { .. } => Vec::new(),
            Wire::Tls { conn, .. } => conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| crate::transport::tls::certificate_names(c))
                .unwrap_or_default(),
        };
        Some(ClientId { addr, cert_names })
    }

    /// Ends the handshake: the socket, the TLS connection if any, and the plain bytes read
    /// past the handshake.
    pub(super) fn into_parts(self) -> (TcpStream, Option<Box<TlsConn>>, Vec<u8>) {
        match self {
            Wire::Plain { reader, stream } => {
                let ahead = reader.buffer().to_vec();
                (stream, None, ahead)
            }
            Wire::Tls { conn, stream } => (stream, Some(Box::new(TlsConn::new(*conn))), Vec::new()),
        }
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Wire::Plain { reader, .. } => reader.read(buf),
            Wire::Tls { conn, stream } => rustls::Stream::new(conn.as_mut(), &mut &*stream).read(buf),
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Wire::Plain { stream, .. } => stream.write(buf),
            Wire::Tls { conn, stream } => rustls::Stream::new(conn.as_mut(), &mut &*stream).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Wire::Plain { stream, .. } => stream.flush(),
            Wire::Tls { conn, stream } => {
                while conn.wants_write() {
                    conn.write_tls(&mut &*stream)?;
                }
                Ok(())
            }
        }
    }
}

/// A failed handshake's error, with what the administrator can do about it.
fn handshake_error(e: io::Error) -> io::Error {
    let hint = match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::NoCertificatesPresented) => {
            " (this port requires a client certificate signed by a CA of --nbd-client-ca)"
        }
        Some(rustls::Error::InvalidCertificate(_)) => {
            " (the client's certificate is not one a CA of --nbd-client-ca signed, or is not valid now)"
        }
        Some(_) => "",
        None if e.kind() == io::ErrorKind::UnexpectedEof => " (the client left: did it trust this node's certificate?)",
        None => "",
    };
    io::Error::new(e.kind(), format!("TLS handshake: {e}{hint}"))
}

/// A TLS connection in its transmission phase, with the ciphertext read from its socket
/// and not yet handed to rustls. rustls reads a socket 4 KiB at a time, which would cost a
/// system call or two for every 4 KiB write a client sends; so the socket is read in pieces
/// of up to [`INBOX_BYTES`] here, and rustls fed from memory.
pub struct TlsConn {
    conn: ServerConnection,
    inbox: Vec<u8>,
    /// Ciphertext not yet handed to rustls: `inbox[at..end]`.
    at: usize,
    end: usize,
}

/// Ciphertext read from the socket at once.
const INBOX_BYTES: usize = 64 << 10;

impl TlsConn {
    pub(super) fn new(conn: ServerConnection) -> TlsConn {
        TlsConn { conn, inbox: vec![0; INBOX_BYTES], at: 0, end: 0 }
    }

    /// Reads decrypted bytes without waiting: `WouldBlock` when the socket has nothing
    /// more, `Ok(0)` at the end of the stream (the client's close_notify, or its socket
    /// closed).
    pub(super) fn read(&mut self, stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The client closed its socket without close_notify: an end like any
                // other, since NBD knows where each of its messages ends.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if self.at == self.end {
                let n = DontWait(stream).read(&mut self.inbox)?;
                if n == 0 {
                    return Ok(0);
                }
                (self.at, self.end) = (0, n);
            }
            let mut pending = &self.inbox[self.at..self.end];
            let used = self.conn.read_tls(&mut pending)?;
            if used == 0 {
                return Err(io::Error::other("TLS took none of the bytes received"));
            }
            self.at += used;
            if let Err(e) = self.conn.process_new_packets() {
                // The alert rustls queued tells the client why; then the connection ends.
                let _ = self.write(stream, &[]);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }

    /// Encrypts what of `data` rustls takes and writes out what the socket takes, without
    /// waiting; the plain bytes taken (the rest stays for the next call). Ciphertext
    /// waiting from an earlier call goes first.
    pub(super) fn write(&mut self, stream: &TcpStream, data: &[u8]) -> io::Result<usize> {
        let conn = &mut self.conn;
        let mut taken = 0;
        loop {
            while conn.wants_write() {
                match conn.write_tls(&mut DontWait(stream)) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(taken),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if taken == data.len() {
                return Ok(taken);
            }
            // rustls takes as much as its bounded buffer has room for.
            let n = conn.writer().write(&data[taken..])?;
            if n == 0 && !conn.wants_write() {
                return Ok(taken);
            }
            taken += n;
        }
    }

    /// Writes `data` out whole, waiting for a blocking socket (within its timeout).
    pub(super) fn write_blocking(&mut self, stream: &TcpStream, data: &[u8]) -> io::Result<()> {
        crate::transport::tls::send(&mut self.conn, stream, data)
    }

    /// Whether rustls holds ciphertext the socket has not taken yet.
    pub(super) fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Sends close_notify where the socket takes it at once.
    pub(super) fn close(&mut self, stream: &TcpStream) {
        self.conn.send_close_notify();
        let _ = self.write(stream, &[]);
    }
}

/// A TLS connection served on threads: the reader's and the writer's common state.
pub(super) struct Shared {
    conn: Mutex<TlsConn>,
    /// Held while ciphertext is written to the socket, taken before `conn` is let go, so
    /// that records leave in the order rustls sealed them.
    send: Mutex<()>,
    stream: TcpStream,
}

impl Shared {
    /// `stream` must be blocking, with a write timeout.
    pub(super) fn new(mut conn: TlsConn, stream: TcpStream) -> Arc<Shared> {
        // The writer drains rustls after every reply, so its buffer is one reply at most.
        conn.conn.set_buffer_limit(None);
        Arc::new(Shared { conn: Mutex::new(conn), send: Mutex::new(()), stream })
    }

    /// Encrypts `data` and writes it out, waiting for the socket (within its timeout).
    pub(super) fn write_all(&self, data: &[u8]) -> io::Result<()> {
        let mut conn = self.conn.lock();
        conn.conn.writer().write_all(data)?;
        self.send_pending(conn)
    }

    /// Writes out what rustls has sealed; `conn` is let go before the socket is waited on.
    fn send_pending(&self, mut conn: parking_lot::MutexGuard<'_, TlsConn>) -> io::Result<()> {
        if !conn.wants_write() {
            return Ok(());
        }
        let mut sealed = Vec::new();
        while conn.wants_write() {
            conn.conn.write_tls(&mut sealed)?;
        }
        let _send = self.send.lock();
        drop(conn);
        (&self.stream).write_all(&sealed)
    }

    pub(super) fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Sends close_notify (best effort: the client may be gone).
    pub(super) fn close_notify(&self) {
        let mut conn = self.conn.lock();
        conn.conn.send_close_notify();
        let _ = self.send_pending(conn);
    }
}

/// The reader's side of a [`Shared`] connection: decrypted bytes, waiting for the socket.
pub(super) struct SharedReader(pub(super) Arc<Shared>);

impl Read for SharedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut conn = self.0.conn.lock();
            let read = conn.read(&self.0.stream, buf);
            // Anything rustls must answer (an alert, a key update) goes out now.
            self.0.send_pending(conn)?;
            match read {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(&self.0.stream)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

/// Waits, with no bound, until the socket has bytes or its end (a shutdown wakes it).
fn wait_readable(stream: &TcpStream) -> io::Result<()> {
    let mut fds = [libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    // SAFETY: `fds` is an array of one initialised pollfd that lives across the call, and
    // the count passed is its length; poll writes only its `revents` field.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
    if ready < 0 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(())
}
