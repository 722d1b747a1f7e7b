//! The TCP engine.
//!
//! Source side: the volume's poller writes frames straight from its NVLog with one
//! `writev` per batch, and busy-polls the socket for the destination's replies with
//! non-blocking reads: no thread sits between the poller and the connection. Destination side: one thread per connection
//! reads whatever has arrived, hands every whole frame to the mirror's handler (which
//! copies entries into the mapped log file), and commits once the input is drained: one
//! persist and one ack for the whole batch (group commit).

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use parking_lot::Mutex;

use super::wire::{self, entries_prefix, Message, FRAME_HEADER_BYTES};
use super::{ConnectError, Connector, Hello, Link, LinkError, LinkEvent, MirrorDirectory, Reply, ReplySink, Welcome};

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

pub struct TcpConnector;

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
        stream.write_all(&Message::Hello(hello.clone()).encode()).map_err(io_err)?;
        let mut buf = Vec::new();
        read_frame(&mut stream, &mut buf, FIRST_FRAME_BODY_MAX).map_err(io_err)?;
        let protocol = |reason: String| ConnectError::Protocol { target: target.to_string(), reason };
        let welcome = match wire::decode(&buf).map_err(|e| protocol(e.to_string()))? {
            Some((Message::Welcome(w), _)) => w,
            Some((Message::Refuse { code, reason }, _)) => {
                return Err(ConnectError::Refused { target: target.to_string(), code, reason })
            }
            Some((other, _)) => return Err(protocol(format!("expected welcome, got {other:?}"))),
            None => return Err(protocol("short frame".into())),
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

/// Accepts replication connections until `stop` is set, a thread per connection.
pub fn serve(listener: TcpListener, directory: Arc<dyn MirrorDirectory>, stop: Arc<AtomicBool>) -> io::Result<()> {
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
        let _ = thread::Builder::new().name("nvm-repl-conn".into()).spawn(move || {
            let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
            if let Err(e) = serve_connection(stream, directory.as_ref()) {
                eprintln!("replication: connection from {peer}: {e}");
            }
        });
    }
    Ok(())
}

/// Serves one connection: hello, then frames until the peer leaves or errs.
pub fn serve_connection(mut stream: TcpStream, directory: &dyn MirrorDirectory) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut first = Vec::new();
    if let Err(e) = read_frame(&mut stream, &mut first, FIRST_FRAME_BODY_MAX) {
        let _ = stream.write_all(&Message::Error { reason: format!("bad hello: {e}") }.encode());
        return Err(e);
    }
    let hello = match wire::decode(&first) {
        Ok(Some((Message::Hello(h), _))) => h,
        Ok(other) => {
            let reason = format!("expected hello, got {:?}", other.map(|(m, _)| m));
            let _ = stream.write_all(&Message::Error { reason: reason.clone() }.encode());
            return Err(io::Error::new(io::ErrorKind::InvalidData, reason));
        }
        Err(e) => {
            let _ = stream.write_all(&Message::Error { reason: e.to_string() }.encode());
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    };
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
