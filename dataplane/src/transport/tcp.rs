//! The TCP engine.
//!
//! Source side: the volume's poller writes frames straight from its NVLog with one
//! `writev` per batch; a reader thread decodes the destination's replies into the link's
//! event channel, which the poller polls. Destination side: one thread per connection
//! reads whatever has arrived, hands every whole frame to the mirror's handler (which
//! copies entries into the mapped log file), and commits once the input is drained: one
//! persist and one ack for the whole batch (group commit).

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;

use super::wire::{self, entries_prefix, Message, FRAME_HEADER_BYTES};
use super::{ConnectError, Connector, Hello, Link, LinkError, LinkEvent, MirrorDirectory, Reply, ReplySink, Welcome};

/// How long a connect or a hello may take, and how long a send may block on a peer that
/// does not read.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Replies queued between the reader thread and the poller.
const EVENTS_MAX: usize = 4096;

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

pub struct TcpLink {
    stream: TcpStream,
    wbuf: Vec<u8>,
    events: Receiver<LinkEvent>,
    closed: Arc<AtomicBool>,
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
        stream.set_read_timeout(None).map_err(io_err)?;
        let (tx, rx) = bounded(EVENTS_MAX);
        let closed = Arc::new(AtomicBool::new(false));
        let reader = stream.try_clone().map_err(io_err)?;
        let closed2 = closed.clone();
        thread::Builder::new()
            .name("nvm-link-rx".into())
            .spawn(move || link_reader(reader, tx, closed2))
            .map_err(io_err)?;
        Ok((TcpLink { stream, wbuf: Vec::with_capacity(4096), events: rx, closed }, welcome))
    }
}

fn link_reader(mut stream: TcpStream, tx: Sender<LinkEvent>, closed: Arc<AtomicBool>) {
    let mut buf = Vec::new();
    let reason = loop {
        // Replies are small control messages.
        if let Err(e) = read_frame(&mut stream, &mut buf, FIRST_FRAME_BODY_MAX) {
            break format!("read: {e}");
        }
        let reply = match wire::decode(&buf) {
            Ok(Some((Message::Ack { seq }, _))) => Reply::Ack { seq },
            Ok(Some((Message::CpDone { cp }, _))) => Reply::CpDone { cp },
            Ok(Some((Message::BaselineAck, _))) => Reply::BaselineAck,
            Ok(Some((Message::Refuse { code, reason }, _))) => Reply::Refuse { code, reason },
            Ok(Some((Message::Error { reason }, _))) => Reply::Error { reason },
            Ok(Some((other, _))) => break format!("unexpected frame from destination: {other:?}"),
            Ok(None) => break "short frame".to_string(),
            Err(e) => break format!("bad frame from destination: {e}"),
        };
        if tx.send(LinkEvent::Reply(reply)).is_err() {
            return;
        }
    };
    closed.store(true, Ordering::SeqCst);
    let _ = tx.send(LinkEvent::Closed { reason });
}

impl TcpLink {
    fn check(&self) -> Result<(), LinkError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(LinkError::Closed("connection lost".into()));
        }
        Ok(())
    }
}

impl Link for TcpLink {
    fn send_entries(&mut self, partition: u8, offset: u64, bytes: &[u8]) -> Result<(), LinkError> {
        self.check()?;
        let prefix = entries_prefix(partition, offset, bytes);
        let mut slices = [IoSlice::new(&self.wbuf), IoSlice::new(&prefix), IoSlice::new(bytes)];
        let mut bufs: &mut [IoSlice<'_>] = &mut slices;
        IoSlice::advance_slices(&mut bufs, 0);
        let r = self.stream.write_all_vectored_compat(bufs);
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
    fn events(&self) -> &Receiver<LinkEvent> {
        &self.events
    }
    fn close(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(Shutdown::Both);
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
