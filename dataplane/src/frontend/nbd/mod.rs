//! NBD server: serves the volumes of an [`ExportRegistry`] to Network Block Device
//! clients (the Linux kernel's `nbd-client`, QEMU, libnbd's `nbdcopy` and `nbdinfo`).
//!
//! The protocol is the one in `doc/proto.md` of the NetworkBlockDevice/nbd repository.
//! This server speaks its fixed newstyle handshake, simple replies and, where the client
//! asks for them, structured replies and `base:allocation` block status; every integer on
//! the wire is big-endian (network byte order). Extended headers are not offered.
//!
//! # Handshake
//!
//! | Direction | Bytes | Content                                                        |
//! |-----------|-------|----------------------------------------------------------------|
//! | S → C     | 8     | `NBDMAGIC` (`0x4e42444d41474943`)                              |
//! | S → C     | 8     | `IHAVEOPT` (`0x49484156454f5054`)                              |
//! | S → C     | 2     | handshake flags: `FIXED_NEWSTYLE` \| `NO_ZEROES`               |
//! | C → S     | 4     | client flags; `C_FIXED_NEWSTYLE` is required, unknown bits close |
//! | C → S     | 16+n  | option: `IHAVEOPT`, option u32, length u32, n bytes of data    |
//! | S → C     | 20+n  | option reply: `0x3e889045565a9`, option u32, type u32, length u32, data |
//!
//! | Option              | Answer                                                         |
//! |---------------------|----------------------------------------------------------------|
//! | `EXPORT_NAME` (1)   | size u64, transmission flags u16, 124 zero bytes unless `NO_ZEROES`; an unknown name closes the connection |
//! | `ABORT` (2)         | `REP_ACK`, then close                                          |
//! | `LIST` (3)          | one `REP_SERVER` per export name, then `REP_ACK`               |
//! | `INFO` (6), `GO` (7)| `REP_INFO` `INFO_EXPORT`, `INFO_BLOCK_SIZE` (1, 4096, 32 MiB), `INFO_NAME` if asked, then `REP_ACK`; `GO` then enters transmission. An unknown name gets `REP_ERR_UNKNOWN` |
//! | `STRUCTURED_REPLY` (8) | `REP_ACK` (data: `REP_ERR_INVALID`): reads are answered with structured replies from then on |
//! | `LIST_META_CONTEXT` (9), `SET_META_CONTEXT` (10) | one `REP_META_CONTEXT` for `base:allocation` where no query or a `base:` one asks for it (id 1 when set), then `REP_ACK`; without structured replies `REP_ERR_INVALID`; an unknown export `REP_ERR_UNKNOWN` |
//! | anything else       | `REP_ERR_UNSUP` (this includes `EXTENDED_HEADERS`) |
//!
//! # Transmission
//!
//! A request is 28 bytes: magic `0x25609513` u32, command flags u16, type u16, cookie u64,
//! offset u64, length u32, followed by `length` bytes of data for `WRITE` only. A simple
//! reply is 16 bytes: magic `0x67446698` u32, error u32, cookie u64, followed by `length`
//! bytes of data for a successful `READ` only.
//!
//! | Command             | Checks before submission (answered without submitting)       |
//! |---------------------|--------------------------------------------------------------|
//! | `READ` (0)          | 0 < length ≤ 32 MiB, in bounds (else `EINVAL`)               |
//! | `WRITE` (1)         | length ≤ 32 MiB (else the stream cannot be resynchronised: close), writable (else `EPERM`), 0 < length, in bounds (else `EINVAL`) |
//! | `DISC` (2)          | stop reading; close once every in-flight reply is written    |
//! | `FLUSH` (3)         | none                                                         |
//! | `TRIM` (4)          | writable (`EPERM`), 0 < length, in bounds (`EINVAL`)          |
//! | `WRITE_ZEROES` (6)  | writable (`EPERM`), 0 < length, in bounds (`EINVAL`); `NO_HOLE` accepted |
//! | `BLOCK_STATUS` (7)  | `base:allocation` selected, 0 < length, in bounds, flags `REQ_ONE` at most (else `EINVAL`) |
//! | anything else       | `EINVAL`                                                     |
//!
//! With structured replies negotiated, a read is answered with one `OFFSET_DATA` chunk (or
//! an `ERROR` chunk), flagged `DONE`; the other commands keep simple replies (they carry
//! no data). `BLOCK_STATUS` answers one `BLOCK_STATUS` chunk for context 1: the extents of
//! at most [`BLOCK_STATUS_SCAN_BYTES`] from the offset asked, by 4 KiB block, `ZERO` where
//! the block reads as zeroes and 0 (allocated, contents unknown) elsewhere, so that
//! `qemu-img convert` and `nbdcopy` skip what is zero. Knowing nothing of allocation below
//! the volume, it never reports `HOLE`.
//!
//! Command flags other than `FUA` and `NO_HOLE` are answered with `EINVAL`. A request magic
//! other than `0x25609513` closes the connection: the stream cannot be trusted after it.
//!
//! # Threads and bounds
//!
//! One thread accepts connections (at most [`CONNECTIONS_MAX`]), and a thread per
//! connection negotiates. Once the handshake names an export, the connection is offered to
//! it whole ([`Export::adopt`]): a primary volume takes it onto its poller, which reads,
//! serves and answers its requests on that one thread ([`session`]). An export without a
//! poller of its own (a mirror, a volume that moved) gives it back, and the connection is
//! served here: a reader thread decodes requests and hands them to [`Export::submit`], and
//! a writer thread receives the [`IoReply`]s and writes the replies, buffered and flushed
//! whenever no further reply is waiting. At most
//! [`IN_FLIGHT_MAX`] requests and [`IN_FLIGHT_BYTES_MAX`] bytes of payload are in flight
//! per connection; the reader waits for replies to be written before it takes more. Replies
//! may leave in any order: the client's cookie is echoed untouched, and the
//! [`Completer`] carries a slot number private to this server instead, so that a client
//! reusing a cookie cannot confuse the bookkeeping.
//!
//! Every length the client sends is checked against a bound before anything is allocated
//! from it. A connection that sends garbage is closed with one line on stderr naming the
//! peer; the other connections carry on.

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use thiserror::Error;

use super::{Completer, Export, ExportRegistry, IoReply, IoRequest};

pub mod session;

pub use session::{Adopted, Command, Session, SessionError};

/// The IANA-assigned NBD port.
pub const PORT_DEFAULT: u16 = 10809;
/// Largest READ or WRITE payload, advertised as the maximum block size.
pub const PAYLOAD_BYTES_MAX: u32 = 32 << 20;
/// Preferred block size, advertised with `NBD_INFO_BLOCK_SIZE`.
pub const BLOCK_BYTES_PREFERRED: u32 = 4096;
/// Requests (submitted or answered but not yet written) per connection.
pub const IN_FLIGHT_MAX: usize = 128;
/// Bytes of READ and WRITE payload in flight per connection. The reader holds one more
/// WRITE payload while it waits for room, so a connection's payload memory stays below
/// `IN_FLIGHT_BYTES_MAX + PAYLOAD_BYTES_MAX`.
pub const IN_FLIGHT_BYTES_MAX: u64 = 128 << 20;
/// Connections served at once; further ones are closed as soon as they are accepted.
pub const CONNECTIONS_MAX: usize = 256;

/// Option data accepted during the handshake; export names are at most 4096 bytes.
const OPTION_BYTES_MAX: u32 = 64 << 10;
/// Options one handshake may send before the server gives up on it.
const OPTIONS_MAX: u32 = 1024;
/// A client must finish each handshake read within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A reply write that makes no progress for this long means the client stopped reading.
const REPLY_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the accept loop looks at the shutdown flag.
const ACCEPT_POLL_MS: i32 = 100;
/// Pause after a failed accept (for instance out of file descriptors) before retrying.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Request bytes the reader buffers: many pipelined headers per read system call.
const READ_BUFFER_BYTES: usize = 128 << 10;
/// Request bytes a reactor's [`Session`] reads at once, headers and write payloads
/// together (it grows to hold one larger write).
const ADOPTED_READ_BYTES: usize = 256 << 10;
/// Reply bytes the writer gathers before a write system call.
const REPLY_BUFFER_BYTES: usize = 256 << 10;
/// Read data up to this size is copied into the reply buffer; larger data is written
/// straight from its own buffer with a vectored write.
const REPLY_INLINE_BYTES_MAX: usize = 16 << 10;

const _: () = assert!(PAYLOAD_BYTES_MAX as u64 <= IN_FLIGHT_BYTES_MAX);
const _: () = assert!(IN_FLIGHT_MAX > 0 && CONNECTIONS_MAX > 0);
const _: () = assert!(REPLY_INLINE_BYTES_MAX + SIMPLE_REPLY_BYTES <= REPLY_BUFFER_BYTES);

pub(crate) const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub(crate) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const REQUEST_BYTES: usize = 28;
const SIMPLE_REPLY_BYTES: usize = 16;
const EXPORT_NAME_ZEROES_BYTES: usize = 124;

// Handshake flags (server) and client flags.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const FLAG_READ_ONLY: u16 = 1 << 1;
const FLAG_SEND_FLUSH: u16 = 1 << 2;
const FLAG_SEND_FUA: u16 = 1 << 3;
const FLAG_SEND_TRIM: u16 = 1 << 5;
const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub(crate) const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

// Information types for NBD_OPT_INFO and NBD_OPT_GO.
pub(crate) const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Structured replies.
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const STRUCTURED_REPLY_BYTES: usize = 20;
const REPLY_FLAG_DONE: u16 = 1 << 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// The one metadata context served, and the id it gets when selected.
const META_BASE_ALLOCATION: &str = "base:allocation";
const META_ALLOCATION_ID: u32 = 1;
/// `base:allocation` flags.
const STATE_ZERO: u32 = 1 << 1;
/// Bytes of the volume one `BLOCK_STATUS` reply describes at most: the server reads them
/// to find the zero blocks, so a client asking about a whole disk gets the first part and
/// asks again from where it ends (which the protocol allows).
pub const BLOCK_STATUS_SCAN_BYTES: u32 = 8 << 20;

// Command flags.
const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
const CMD_FLAGS_KNOWN: u16 = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE;

// Error values on the wire. They are the Linux errno numbers, named here so that the wire
// format does not depend on the host's libc.
const NBD_EPERM: u32 = 1;
const NBD_EIO: u32 = 5;
const NBD_ENOMEM: u32 = 12;
const NBD_EINVAL: u32 = 22;
const NBD_ENOSPC: u32 = 28;
const NBD_EOVERFLOW: u32 = 75;
const NBD_ENOTSUP: u32 = 95;
const NBD_ESHUTDOWN: u32 = 108;

/// Why a connection was closed by the server. Each one is logged as one line.
#[derive(Debug, Error)]
#[non_exhaustive]
enum ConnectionError {
    #[error("configuring the socket failed")]
    Socket(#[source] io::Error),
    #[error("reading the handshake failed")]
    ReadHandshake(#[source] io::Error),
    #[error("the client closed the connection in the middle of the handshake")]
    HandshakeClosed,
    #[error("writing the handshake failed")]
    WriteHandshake(#[source] io::Error),
    #[error("client flags {0:#x} refused (fixed newstyle required, no unknown flags)")]
    ClientFlags(u32),
    #[error("bad option magic {0:#018x}")]
    OptionMagic(u64),
    #[error("option {option} carries {len} bytes, more than {OPTION_BYTES_MAX}")]
    OptionTooLong { option: u32, len: u32 },
    #[error("more than {OPTIONS_MAX} options in one handshake")]
    TooManyOptions,
    #[error("NBD_OPT_EXPORT_NAME asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("starting the reply writer failed")]
    SpawnWriter(#[source] io::Error),
    #[error("reading a request failed")]
    ReadRequest(#[source] io::Error),
    #[error("bad request magic {0:#010x}, closing")]
    RequestMagic(u32),
    #[error("write of {0} bytes exceeds the {PAYLOAD_BYTES_MAX}-byte maximum, closing")]
    WriteTooLong(u32),
    #[error("writing replies failed")]
    WriteReply(#[source] io::Error),
    #[error("the reply writer panicked")]
    WriterPanicked,
}

/// Formats an error with its chain of sources on one line.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

/// A running NBD server: an accept thread and a thread pair per connection.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use nvmirror_dataplane::frontend::{ExportRegistry, nbd::NbdServer};
/// # fn run(registry: Arc<dyn ExportRegistry>) -> std::io::Result<()> {
/// let listener = std::net::TcpListener::bind(("0.0.0.0", 10809))?;
/// let server = NbdServer::spawn(listener, registry)?;
/// println!("serving on {}", server.local_addr());
/// // ...
/// server.shutdown()?;
/// # Ok(())
/// # }
/// ```
pub struct NbdServer {
    local_addr: SocketAddr,
    shutdown: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<io::Result<()>>>,
}

impl NbdServer {
    /// Serves `registry` on `listener` from a new accept thread.
    pub fn spawn(listener: TcpListener, registry: Arc<dyn ExportRegistry>) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let shutdown = Arc::new(AtomicBool::new(false));
        let acceptor = thread::Builder::new().name("nbd-accept".to_owned()).spawn({
            let shutdown = Arc::clone(&shutdown);
            move || serve(listener, registry, shutdown)
        })?;
        Ok(Self { local_addr, shutdown, acceptor: Some(acceptor) })
    }

    /// The address the server listens on (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes every connection it serves on threads and waits for them
    /// (connections a volume's poller adopted live and end with that volume), which first
    /// wait for the requests they submitted to complete. Returns the accept loop's error,
    /// if it stopped on one.
    pub fn shutdown(mut self) -> io::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> io::Result<()> {
        self.shutdown.store(true, Ordering::Release);
        match self.acceptor.take() {
            Some(acceptor) => acceptor.join().unwrap_or_else(|_| Err(io::Error::other("NBD accept thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("nbd: {}: server stopped on error: {err}", self.local_addr);
        }
    }
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer").field("local_addr", &self.local_addr).finish()
    }
}

/// Serves `registry` on `listener` from the calling thread until `shutdown` is set, then
/// closes every connection and waits for their threads. A thread negotiates each
/// connection, then serves it unless the export adopted it (see [`Export::adopt`]).
///
/// Errors from one connection are logged and end that connection only. The function
/// returns an error only when the listener itself fails.
pub fn serve(listener: TcpListener, registry: Arc<dyn ExportRegistry>, shutdown: Arc<AtomicBool>) -> io::Result<()> {
    let mut connections = Vec::new();
    let result = accept_loop(&listener, &registry, &shutdown, &mut connections);
    // Whether the loop ended on request or on error, no connection served on threads
    // outlives the server.
    for connection in &connections {
        let _ = connection.stream.shutdown(Shutdown::Both);
    }
    for connection in connections {
        let _ = connection.thread.join();
    }
    result
}

/// A connection's thread, and a handle on its socket to close it at shutdown.
struct Connection {
    stream: TcpStream,
    thread: JoinHandle<()>,
}

fn accept_loop(
    listener: &TcpListener,
    registry: &Arc<dyn ExportRegistry>,
    shutdown: &AtomicBool,
    connections: &mut Vec<Connection>,
) -> io::Result<()> {
    // Non-blocking, so that a connection reset between poll and accept cannot block the
    // loop past a shutdown request.
    listener.set_nonblocking(true)?;
    while !shutdown.load(Ordering::Acquire) {
        reap(connections);
        if !wait_readable(listener, ACCEPT_POLL_MS)? {
            continue;
        }
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) =>
            {
                continue;
            }
            Err(err) => {
                eprintln!("nbd: accept failed: {err}");
                thread::sleep(ACCEPT_RETRY);
                continue;
            }
        };
        if connections.len() >= CONNECTIONS_MAX {
            eprintln!("nbd: {peer}: refused, already serving {CONNECTIONS_MAX} connections");
            continue;
        }
        let handle = match stream.try_clone() {
            Ok(handle) => handle,
            Err(err) => {
                eprintln!("nbd: {peer}: cannot duplicate the socket: {err}");
                continue;
            }
        };
        let registry = Arc::clone(registry);
        let spawned = thread::Builder::new()
            .name(format!("nbd-{peer}"))
            .spawn(move || serve_connection(stream, peer, registry.as_ref()));
        match spawned {
            Ok(thread) => connections.push(Connection { stream: handle, thread }),
            Err(err) => eprintln!("nbd: {peer}: cannot start a connection thread: {err}"),
        }
    }
    Ok(())
}

/// Joins the connections whose threads have finished.
fn reap(connections: &mut Vec<Connection>) {
    let mut index = 0;
    while index < connections.len() {
        if connections[index].thread.is_finished() {
            let connection = connections.swap_remove(index);
            let _ = connection.thread.join();
        } else {
            index += 1;
        }
    }
}

/// Waits up to `timeout_ms` for a connection to accept.
fn wait_readable(listener: &TcpListener, timeout_ms: i32) -> io::Result<bool> {
    let mut fds = [libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    // SAFETY: `fds` is an array of one initialised pollfd that lives across the call, and
    // the count passed is its length; poll writes only its `revents` field.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout_ms) };
    if ready < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(err);
    }
    Ok(ready > 0)
}

fn serve_connection(stream: TcpStream, peer: SocketAddr, registry: &dyn ExportRegistry) {
    let closer = stream.try_clone().ok();
    match run_connection(stream, peer, registry) {
        // The export's reactor owns the socket now.
        Ok(Served::Adopted) => return,
        Ok(Served::Here) => {}
        Err(err) => eprintln!("nbd: {peer}: {}", ErrorChain(&err)),
    }
    // The accept loop holds a handle on the socket until it reaps this thread: shut it
    // down now, so that the client sees the connection end at once (a refused handshake
    // otherwise lingered until the next reap, up to an accept poll later).
    if let Some(c) = closer {
        let _ = c.shutdown(Shutdown::Both);
    }
}

/// Where a connection's transmission phase ran.
enum Served {
    /// On this thread (and its writer), to the end.
    Here,
    /// Handed to the export's reactor, which serves it from now on.
    Adopted,
}

fn run_connection(
    stream: TcpStream,
    peer: SocketAddr,
    registry: &dyn ExportRegistry,
) -> Result<Served, ConnectionError> {
    stream.set_nonblocking(false).map_err(ConnectionError::Socket)?;
    stream.set_nodelay(true).map_err(ConnectionError::Socket)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(ConnectionError::Socket)?;
    stream.set_write_timeout(Some(REPLY_WRITE_TIMEOUT)).map_err(ConnectionError::Socket)?;
    // One buffered reader for both phases: bytes it read ahead must not be lost when
    // transmission starts.
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, stream.try_clone().map_err(ConnectionError::Socket)?);
    let (export, options) = match negotiate(&mut reader, &stream, registry)? {
        Negotiated::Transmit(export, options) => (export, options),
        Negotiated::Closed => return Ok(Served::Here),
    };
    // Idle clients are normal once transmission starts.
    stream.set_read_timeout(None).map_err(ConnectionError::Socket)?;
    // The export's reactor takes the connection whole where it has one: its requests are
    // then read, served and answered on that one thread.
    let adopted =
        Adopted { stream, peer, read_ahead: reader.buffer().to_vec(), export: Arc::downgrade(&export), options };
    drop(reader);
    let adopted = match export.adopt(adopted) {
        Ok(()) => return Ok(Served::Adopted),
        Err(back) => back,
    };
    let Adopted { stream, read_ahead, .. } = adopted;
    let mut reader = BufReader::with_capacity(
        READ_BUFFER_BYTES,
        io::Cursor::new(read_ahead).chain(stream.try_clone().map_err(ConnectionError::Socket)?),
    );
    let result = transmit(&mut reader, &stream, export.as_ref(), peer, options);
    let _ = stream.shutdown(Shutdown::Both);
    result.map(|()| Served::Here)
}

/// Serves a connection a reactor gave back on threads of its own (see
/// [`Adopted::serve_on_threads`]).
fn serve_adopted_on_threads(adopted: Adopted) {
    let Adopted { stream, peer, read_ahead, export, options } = adopted;
    let Some(export) = export.upgrade() else {
        eprintln!("nbd: {peer}: the export it was served from is gone; closing");
        let _ = stream.shutdown(Shutdown::Both);
        return;
    };
    let spawned = thread::Builder::new().name(format!("nbd-{peer}")).spawn(move || {
        let run = || -> Result<(), ConnectionError> {
            stream.set_nonblocking(false).map_err(ConnectionError::Socket)?;
            stream.set_write_timeout(Some(REPLY_WRITE_TIMEOUT)).map_err(ConnectionError::Socket)?;
            let mut reader = BufReader::with_capacity(
                READ_BUFFER_BYTES,
                io::Cursor::new(read_ahead).chain(stream.try_clone().map_err(ConnectionError::Socket)?),
            );
            transmit(&mut reader, &stream, export.as_ref(), peer, options)
        };
        if let Err(err) = run() {
            eprintln!("nbd: {peer}: {}", ErrorChain(&err));
        }
        let _ = stream.shutdown(Shutdown::Both);
    });
    if let Err(err) = spawned {
        eprintln!("nbd: {peer}: cannot start a connection thread: {err}");
    }
}

/// What the handshake settled for the transmission phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Reads are answered with structured replies.
    pub structured: bool,
    /// `base:allocation` was selected for the export: `BLOCK_STATUS` is allowed.
    pub allocation: bool,
}

enum Negotiated {
    Transmit(Arc<dyn Export>, Options),
    /// The client aborted or left; no transmission follows.
    Closed,
}

fn handshake_read_error(err: io::Error) -> ConnectionError {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        ConnectionError::HandshakeClosed
    } else {
        ConnectionError::ReadHandshake(err)
    }
}

fn negotiate(
    reader: &mut impl Read,
    mut writer: &TcpStream,
    registry: &dyn ExportRegistry,
) -> Result<Negotiated, ConnectionError> {
    let mut greeting = [0u8; 18];
    greeting[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    writer.write_all(&greeting).map_err(ConnectionError::WriteHandshake)?;

    let mut client_flags = [0u8; 4];
    if !read_full(reader, &mut client_flags).map_err(handshake_read_error)? {
        // Connected and left without a word, as TCP health checks do: nothing to report.
        return Ok(Negotiated::Closed);
    }
    let client_flags = u32::from_be_bytes(client_flags);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 || client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ConnectionError::ClientFlags(client_flags));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // The export `SET_META_CONTEXT` last selected `base:allocation` for.
    let mut allocation_for: Option<Vec<u8>> = None;

    for _ in 0..OPTIONS_MAX {
        let mut header = [0u8; 16];
        reader.read_exact(&mut header).map_err(handshake_read_error)?;
        let magic = be_u64(&header, 0);
        let option = be_u32(&header, 8);
        let len = be_u32(&header, 12);
        if magic != IHAVEOPT {
            return Err(ConnectionError::OptionMagic(magic));
        }
        if len > OPTION_BYTES_MAX {
            return Err(ConnectionError::OptionTooLong { option, len });
        }
        let mut data = vec![0u8; len as usize];
        reader.read_exact(&mut data).map_err(handshake_read_error)?;

        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(export) = registry.lookup(&name) else {
                    // This option has no error reply: closing is the only refusal.
                    return Err(ConnectionError::UnknownExport(name.into_owned()));
                };
                let mut reply = Vec::with_capacity(10 + EXPORT_NAME_ZEROES_BYTES);
                reply.extend_from_slice(&export.size().to_be_bytes());
                reply.extend_from_slice(&transmission_flags(export.as_ref()).to_be_bytes());
                if !no_zeroes {
                    reply.resize(reply.len() + EXPORT_NAME_ZEROES_BYTES, 0);
                }
                writer.write_all(&reply).map_err(ConnectionError::WriteHandshake)?;
                let allocation = allocation_for.as_deref() == Some(&data[..]);
                return Ok(Negotiated::Transmit(export, Options { structured, allocation }));
            }
            OPT_ABORT => {
                // The client may already have gone; the acknowledgement is a courtesy.
                let _ = send_option_reply(writer, option, REP_ACK, &[]);
                return Ok(Negotiated::Closed);
            }
            OPT_LIST => list_exports(writer, registry, &data)?,
            OPT_INFO | OPT_GO => {
                if let Some(export) = export_info(writer, registry, option, &data)? {
                    if option == OPT_GO {
                        let name = InfoRequest::parse(&data).map(|r| r.name);
                        let allocation = name.is_some_and(|n| allocation_for.as_deref() == Some(n));
                        return Ok(Negotiated::Transmit(export, Options { structured, allocation }));
                    }
                }
            }
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    structured = true;
                    send_option_reply(writer, option, REP_ACK, &[])?;
                } else {
                    send_option_reply(writer, option, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // Every SET replaces what an earlier one selected, failed ones too.
                    allocation_for = None;
                }
                if !structured {
                    send_option_reply(writer, option, REP_ERR_INVALID, b"negotiate NBD_OPT_STRUCTURED_REPLY first")?;
                    continue;
                }
                let Some(query) = MetaQuery::parse(&data) else {
                    send_option_reply(writer, option, REP_ERR_INVALID, b"malformed metadata context request")?;
                    continue;
                };
                let known = std::str::from_utf8(query.export).ok().is_some_and(|n| registry.lookup(n).is_some());
                if !known {
                    send_option_reply(writer, option, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                if query.selects_allocation(set) {
                    let id = if set { META_ALLOCATION_ID } else { 0 };
                    let mut reply = Vec::with_capacity(4 + META_BASE_ALLOCATION.len());
                    reply.extend_from_slice(&id.to_be_bytes());
                    reply.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                    send_option_reply(writer, option, REP_META_CONTEXT, &reply)?;
                    if set {
                        allocation_for = Some(query.export.to_vec());
                    }
                }
                send_option_reply(writer, option, REP_ACK, &[])?;
            }
            _ => send_option_reply(writer, option, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
    Err(ConnectionError::TooManyOptions)
}

fn transmission_flags(export: &dyn Export) -> u16 {
    let mut flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN;
    if export.read_only() {
        flags |= FLAG_READ_ONLY;
    }
    flags
}

fn send_option_reply(mut writer: &TcpStream, option: u32, reply_type: u32, data: &[u8]) -> Result<(), ConnectionError> {
    // Reply data is an export name, a short message or a fixed-size info record; all are
    // bounded by OPTION_BYTES_MAX or by the registry's names, far below 4 GiB.
    let len = u32::try_from(data.len()).expect("option reply data fits in u32");
    let mut reply = Vec::with_capacity(20 + data.len());
    reply.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    reply.extend_from_slice(&option.to_be_bytes());
    reply.extend_from_slice(&reply_type.to_be_bytes());
    reply.extend_from_slice(&len.to_be_bytes());
    reply.extend_from_slice(data);
    writer.write_all(&reply).map_err(ConnectionError::WriteHandshake)
}

/// Answers NBD_OPT_LIST.
fn list_exports(writer: &TcpStream, registry: &dyn ExportRegistry, data: &[u8]) -> Result<(), ConnectionError> {
    if !data.is_empty() {
        return send_option_reply(writer, OPT_LIST, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
    }
    for name in registry.names() {
        let Ok(name_len) = u32::try_from(name.len()) else {
            continue;
        };
        let mut entry = Vec::with_capacity(4 + name.len());
        entry.extend_from_slice(&name_len.to_be_bytes());
        entry.extend_from_slice(name.as_bytes());
        send_option_reply(writer, OPT_LIST, REP_SERVER, &entry)?;
    }
    send_option_reply(writer, OPT_LIST, REP_ACK, &[])
}

/// Answers NBD_OPT_INFO or NBD_OPT_GO; returns the export when the answer was a success.
fn export_info(
    writer: &TcpStream,
    registry: &dyn ExportRegistry,
    option: u32,
    data: &[u8],
) -> Result<Option<Arc<dyn Export>>, ConnectionError> {
    // Data: name length u32, name, number of information requests u16, requests u16 each.
    let Some(request) = InfoRequest::parse(data) else {
        send_option_reply(writer, option, REP_ERR_INVALID, b"malformed information request")?;
        return Ok(None);
    };
    let export = std::str::from_utf8(request.name).ok().and_then(|name| registry.lookup(name));
    let Some(export) = export else {
        send_option_reply(writer, option, REP_ERR_UNKNOWN, b"no such export")?;
        return Ok(None);
    };

    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&export.size().to_be_bytes());
    info.extend_from_slice(&transmission_flags(export.as_ref()).to_be_bytes());
    send_option_reply(writer, option, REP_INFO, &info)?;

    // Sent whether or not it was asked for, which the protocol allows: a minimum of 1 asks
    // nothing of clients that do not read it.
    let mut block_size = Vec::with_capacity(14);
    block_size.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    block_size.extend_from_slice(&1u32.to_be_bytes());
    block_size.extend_from_slice(&BLOCK_BYTES_PREFERRED.to_be_bytes());
    block_size.extend_from_slice(&PAYLOAD_BYTES_MAX.to_be_bytes());
    send_option_reply(writer, option, REP_INFO, &block_size)?;

    if request.asks_for(INFO_NAME) {
        let mut name = Vec::with_capacity(2 + request.name.len());
        name.extend_from_slice(&INFO_NAME.to_be_bytes());
        name.extend_from_slice(request.name);
        send_option_reply(writer, option, REP_INFO, &name)?;
    }
    send_option_reply(writer, option, REP_ACK, &[])?;
    Ok(Some(export))
}

/// The data of an NBD_OPT_INFO or NBD_OPT_GO option, borrowed from the option bytes.
struct InfoRequest<'a> {
    name: &'a [u8],
    /// Information types asked for, two bytes each.
    requests: &'a [u8],
}

impl<'a> InfoRequest<'a> {
    fn parse(data: &'a [u8]) -> Option<Self> {
        let (name_len, rest) = data.split_first_chunk::<4>()?;
        let name_len = usize::try_from(u32::from_be_bytes(*name_len)).ok()?;
        if rest.len() < name_len {
            return None;
        }
        let (name, rest) = rest.split_at(name_len);
        let (count, requests) = rest.split_first_chunk::<2>()?;
        if requests.len() != usize::from(u16::from_be_bytes(*count)) * 2 {
            return None;
        }
        Some(Self { name, requests })
    }

    fn asks_for(&self, info_type: u16) -> bool {
        self.requests.chunks_exact(2).any(|pair| pair == info_type.to_be_bytes())
    }
}

/// The data of an NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT option.
struct MetaQuery<'a> {
    export: &'a [u8],
    queries: Vec<&'a [u8]>,
}

/// Queries one option may carry; more is a malformed request here.
const META_QUERIES_MAX: usize = 64;

impl<'a> MetaQuery<'a> {
    fn parse(data: &'a [u8]) -> Option<Self> {
        let (len, rest) = data.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        if rest.len() < len {
            return None;
        }
        let (export, rest) = rest.split_at(len);
        let (count, mut rest) = rest.split_first_chunk::<4>()?;
        let count = usize::try_from(u32::from_be_bytes(*count)).ok()?;
        if count > META_QUERIES_MAX {
            return None;
        }
        let mut queries = Vec::with_capacity(count);
        for _ in 0..count {
            let (len, r) = rest.split_first_chunk::<4>()?;
            let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
            if r.len() < len {
                return None;
            }
            let (q, r) = r.split_at(len);
            queries.push(q);
            rest = r;
        }
        rest.is_empty().then_some(Self { export, queries })
    }

    /// Whether `base:allocation` answers the queries: to a LIST, no query or a `base:`
    /// wildcard or the name itself; to a SET, the name itself only.
    fn selects_allocation(&self, set: bool) -> bool {
        let name = META_BASE_ALLOCATION.as_bytes();
        if self.queries.is_empty() {
            return !set;
        }
        self.queries.iter().any(|q| *q == name || (!set && *q == b"base:"))
    }
}

/// Appends a structured reply chunk header.
fn push_chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends the head of a read's one `OFFSET_DATA` chunk; its `len` bytes of data follow.
fn push_read_head(out: &mut Vec<u8>, cookie: u64, offset: u64, len: u32) {
    push_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, len + 8);
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends a final `ERROR` chunk (no message).
fn push_error_chunk(out: &mut Vec<u8>, cookie: u64, errno: u32) {
    push_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6);
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
}

/// Appends the `BLOCK_STATUS` chunk for `data`, the bytes of the volume from `offset`:
/// runs of 4 KiB blocks (the first up to the next block boundary) that read as zeroes, and
/// of those that do not. With `req_one`, the first run alone.
fn push_block_status(out: &mut Vec<u8>, cookie: u64, offset: u64, data: &[u8], req_one: bool) {
    let block = u64::from(BLOCK_BYTES_PREFERRED);
    let mut extents: Vec<(u32, u32)> = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let to_boundary = block - (offset + at as u64) % block;
        let end = data.len().min(at + usize::try_from(to_boundary).expect("below one block"));
        let piece = &data[at..end];
        let state = if piece.iter().all(|&b| b == 0) { STATE_ZERO } else { 0 };
        let len = u32::try_from(end - at).expect("a piece is at most one block");
        match extents.last_mut() {
            Some((l, s)) if *s == state => *l += len,
            _ => {
                if req_one && !extents.is_empty() {
                    break;
                }
                extents.push((len, state));
            }
        }
        at = end;
    }
    let len = u32::try_from(4 + 8 * extents.len()).expect("at most 2048 extents");
    push_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len);
    out.extend_from_slice(&META_ALLOCATION_ID.to_be_bytes());
    for (l, state) in extents {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&state.to_be_bytes());
    }
}

/// One decoded request header.
#[derive(Debug, Clone, Copy)]
struct Request {
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

impl Request {
    /// Decodes a header, or returns the bad magic.
    fn decode(bytes: &[u8; REQUEST_BYTES]) -> Result<Self, u32> {
        let magic = be_u32(bytes, 0);
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(Self {
            flags: be_u16(bytes, 4),
            command: be_u16(bytes, 6),
            cookie: be_u64(bytes, 8),
            offset: be_u64(bytes, 16),
            len: be_u32(bytes, 24),
        })
    }

    /// Whether `[offset, offset + len)` is non-empty and lies within an export of `size`.
    fn in_bounds(&self, size: u64) -> bool {
        self.len != 0 && self.offset.checked_add(u64::from(self.len)).is_some_and(|end| end <= size)
    }

    fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }

    /// Why the request must be answered with an error without being served, as a (libc)
    /// errno, on an export of `size` bytes with the options the handshake settled: the
    /// checks of the module's command table, for every command but `DISC` (which ends
    /// the connection and is never refused). Both the threaded connections and the
    /// poller's sessions decide with it.
    fn refusal(&self, read_only: bool, size: u64, options: Options) -> Option<i32> {
        let flags_ok = |known: u16| self.flags & !known == 0;
        let bad = match self.command {
            CMD_READ => !flags_ok(CMD_FLAGS_KNOWN) || self.len > PAYLOAD_BYTES_MAX || !self.in_bounds(size),
            CMD_FLUSH => !flags_ok(CMD_FLAGS_KNOWN),
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => {
                if flags_ok(CMD_FLAGS_KNOWN) && read_only {
                    return Some(libc::EPERM);
                }
                !flags_ok(CMD_FLAGS_KNOWN) || !self.in_bounds(size)
            }
            CMD_BLOCK_STATUS => !options.allocation || !flags_ok(CMD_FLAG_REQ_ONE) || !self.in_bounds(size),
            _ => true,
        };
        bad.then_some(libc::EINVAL)
    }
}

/// What the writer needs to answer one request: the client's cookie, and for a read the
/// exact length of data the reply must carry.
#[derive(Debug)]
struct Pending {
    cookie: u64,
    read_len: Option<u32>,
    /// Payload bytes counted against [`IN_FLIGHT_BYTES_MAX`].
    payload_bytes: u64,
    /// What the reply is for, where a structured reply differs from a simple one.
    kind: ReplyKind,
    offset: u64,
}

/// The commands whose replies are structured once structured replies are negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyKind {
    Simple,
    Read,
    /// A block status query, answered from a read of the range; `req_one` as asked.
    BlockStatus {
        req_one: bool,
    },
}

/// The requests of one connection that are submitted or answered but not yet written.
///
/// A request holds a slot from submission until its reply is written; the slot number is
/// the cookie its [`Completer`] carries.
struct InFlight {
    slots: Mutex<Slots>,
    freed: Condvar,
}

struct Slots {
    pending: Vec<Option<Pending>>,
    /// Slots whose `pending` entry is `None`.
    free: Vec<usize>,
    /// Sum of `payload_bytes` over the occupied slots; never above `IN_FLIGHT_BYTES_MAX`.
    payload_bytes: u64,
}

impl InFlight {
    fn new() -> Self {
        let slots = Slots {
            pending: (0..IN_FLIGHT_MAX).map(|_| None).collect(),
            free: (0..IN_FLIGHT_MAX).rev().collect(),
            payload_bytes: 0,
        };
        Self { slots: Mutex::new(slots), freed: Condvar::new() }
    }

    /// Takes a slot for `pending`, waiting for replies to be written while the connection
    /// is at its bound. Cannot wait forever: every occupied slot is freed once its reply is
    /// written, and one request alone always fits.
    fn acquire(&self, pending: Pending) -> u64 {
        assert!(pending.payload_bytes <= u64::from(PAYLOAD_BYTES_MAX));
        let mut slots = self.slots.lock();
        loop {
            if slots.payload_bytes + pending.payload_bytes <= IN_FLIGHT_BYTES_MAX {
                if let Some(slot) = slots.free.pop() {
                    slots.payload_bytes += pending.payload_bytes;
                    assert!(slots.pending[slot].is_none(), "free slot {slot} is occupied");
                    slots.pending[slot] = Some(pending);
                    return slot as u64;
                }
            }
            self.freed.wait(&mut slots);
        }
    }

    /// Frees a slot and returns what it held; `None` for a slot that was not occupied.
    fn release(&self, slot: u64) -> Option<Pending> {
        let mut slots = self.slots.lock();
        let index = usize::try_from(slot).ok()?;
        let pending = slots.pending.get_mut(index)?.take()?;
        slots.payload_bytes -= pending.payload_bytes;
        slots.free.push(index);
        drop(slots);
        self.freed.notify_one();
        Some(pending)
    }
}

/// Runs the transmission phase: this thread reads requests, a writer thread writes the
/// replies. Returns once the client disconnected (or was disconnected) and every request
/// it submitted has been answered.
fn transmit(
    reader: &mut impl Read,
    stream: &TcpStream,
    export: &dyn Export,
    peer: SocketAddr,
    options: Options,
) -> Result<(), ConnectionError> {
    let in_flight = Arc::new(InFlight::new());
    // Never full: there is at most one reply per occupied slot.
    let (reply_tx, reply_rx) = crossbeam_channel::bounded(IN_FLIGHT_MAX);
    let writer_stream = stream.try_clone().map_err(ConnectionError::Socket)?;
    let writer = thread::Builder::new()
        .name(format!("nbd-replies-{peer}"))
        .spawn({
            let in_flight = Arc::clone(&in_flight);
            move || write_replies(&writer_stream, &reply_rx, &in_flight, peer, options)
        })
        .map_err(ConnectionError::SpawnWriter)?;

    let read_result = read_requests(reader, export, &in_flight, &reply_tx, options);
    // The writer stops once every sender is gone: this one, and the one in each Completer
    // still held by the export. So joining it waits for every in-flight reply to be
    // written (or found unwritable), which is what NBD_CMD_DISC asks for.
    drop(reply_tx);
    let write_result = writer.join().unwrap_or(Err(ConnectionError::WriterPanicked));
    read_result.and(write_result)
}

/// Reads and submits requests until NBD_CMD_DISC, the end of the stream, or an error.
fn read_requests(
    reader: &mut impl Read,
    export: &dyn Export,
    in_flight: &InFlight,
    reply_tx: &Sender<IoReply>,
    options: Options,
) -> Result<(), ConnectionError> {
    let kind_of = |request: &Request| match request.command {
        CMD_READ => ReplyKind::Read,
        CMD_BLOCK_STATUS => ReplyKind::BlockStatus { req_one: request.flags & CMD_FLAG_REQ_ONE != 0 },
        _ => ReplyKind::Simple,
    };
    let submit = |request: &Request, read_len: Option<u32>, io: IoRequest| {
        let payload_bytes = match &io {
            IoRequest::Read { len, .. } => u64::from(*len),
            IoRequest::Write { data, .. } => data.len() as u64,
            _ => 0,
        };
        let pending =
            Pending { cookie: request.cookie, read_len, payload_bytes, kind: kind_of(request), offset: request.offset };
        let slot = in_flight.acquire(pending);
        export.submit(io, Completer::new(slot, reply_tx.clone()));
    };
    // Refusals travel the same path as completions, so that replies stay bounded and a
    // DISC still waits for them.
    let refuse = |request: &Request, errno: i32| {
        let kind = match kind_of(request) {
            ReplyKind::BlockStatus { .. } => ReplyKind::Read,
            k => k,
        };
        let pending = Pending { cookie: request.cookie, read_len: None, payload_bytes: 0, kind, offset: 0 };
        let slot = in_flight.acquire(pending);
        Completer::new(slot, reply_tx.clone()).complete(Err(io::Error::from_raw_os_error(errno)));
    };

    let mut header = [0u8; REQUEST_BYTES];
    loop {
        if !read_full(reader, &mut header).map_err(ConnectionError::ReadRequest)? {
            return Ok(()); // The client closed between requests.
        }
        let request = Request::decode(&header).map_err(ConnectionError::RequestMagic)?;
        if request.command == CMD_DISC {
            return Ok(());
        }
        if request.command == CMD_WRITE && request.len > PAYLOAD_BYTES_MAX {
            // The payload cannot be skipped safely: a garbled length would make the
            // server read gigabytes of what may be further requests.
            return Err(ConnectionError::WriteTooLong(request.len));
        }
        if let Some(errno) = request.refusal(export.read_only(), export.size(), options) {
            if request.command == CMD_WRITE {
                discard(reader, request.len).map_err(ConnectionError::ReadRequest)?;
            }
            refuse(&request, errno);
            continue;
        }
        let (offset, len) = (request.offset, request.len);
        match request.command {
            CMD_READ => submit(&request, Some(len), IoRequest::Read { offset, len }),
            CMD_WRITE => {
                let mut data = vec![0u8; len as usize];
                if !read_full(reader, &mut data).map_err(ConnectionError::ReadRequest)? {
                    let truncated =
                        io::Error::new(io::ErrorKind::UnexpectedEof, "write payload truncated after 0 bytes");
                    return Err(ConnectionError::ReadRequest(truncated));
                }
                submit(&request, None, IoRequest::Write { offset, data, fua: request.fua() });
            }
            CMD_FLUSH => submit(&request, None, IoRequest::Flush),
            CMD_TRIM => submit(&request, None, IoRequest::Trim { offset, len }),
            CMD_WRITE_ZEROES => submit(&request, None, IoRequest::WriteZeroes { offset, len, fua: request.fua() }),
            CMD_BLOCK_STATUS => {
                let len = len.min(BLOCK_STATUS_SCAN_BYTES);
                submit(&request, Some(len), IoRequest::Read { offset, len });
            }
            other => unreachable!("command {other} passed the refusal checks"),
        }
    }
}

/// Fills `buffer`; returns `false` if the stream ended cleanly before its first byte.
fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("message truncated after {filled} of {} bytes", buffer.len()),
                ))
            }
            Ok(read) => filled += read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(true)
}

/// Reads and drops the payload of a refused write.
fn discard(reader: &mut impl Read, len: u32) -> io::Result<()> {
    let copied = io::copy(&mut reader.take(u64::from(len)), &mut io::sink())?;
    if copied != u64::from(len) {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("write payload truncated after {copied} of {len} bytes"),
        ));
    }
    Ok(())
}

/// The writer thread: writes a simple reply for each completion, gathering replies while
/// more are waiting and flushing as soon as none is.
fn write_replies(
    stream: &TcpStream,
    replies: &Receiver<IoReply>,
    in_flight: &InFlight,
    peer: SocketAddr,
    options: Options,
) -> Result<(), ConnectionError> {
    let mut out = ReplyStream {
        stream,
        buffer: Vec::with_capacity(REPLY_BUFFER_BYTES),
        failed: None,
        structured: options.structured,
    };
    while let Ok(first) = replies.recv() {
        let mut next = Some(first);
        while let Some(reply) = next {
            out.push(reply, in_flight, peer);
            next = replies.try_recv().ok();
        }
        out.flush();
    }
    match out.failed {
        Some(err) => Err(ConnectionError::WriteReply(err)),
        None => Ok(()),
    }
}

/// The reply side of a connection's socket, with its gathering buffer.
struct ReplyStream<'a> {
    stream: &'a TcpStream,
    buffer: Vec<u8>,
    /// The first write error. Once set, replies are dropped (their slots still freed) so
    /// that the reader and the export can finish.
    failed: Option<io::Error>,
    /// Reads (and block status queries) are answered with structured replies.
    structured: bool,
}

impl ReplyStream<'_> {
    fn push(&mut self, reply: IoReply, in_flight: &InFlight, peer: SocketAddr) {
        let Some(pending) = in_flight.release(reply.cookie) else {
            eprintln!("nbd: {peer}: reply for slot {} that is not in flight, dropped", reply.cookie);
            return;
        };
        let (error, data) = match (reply.result, pending.read_len) {
            (Ok(Some(data)), Some(len)) if data.len() == len as usize => (0, data),
            (Ok(data), Some(len)) => {
                eprintln!(
                    "nbd: {peer}: export answered a {len}-byte read with {} bytes, replying EIO",
                    data.map_or(0, |data| data.len())
                );
                (NBD_EIO, Vec::new())
            }
            (Ok(_), None) => (0, Vec::new()),
            (Err(err), _) => (nbd_errno(&err), Vec::new()),
        };
        if self.failed.is_some() {
            return;
        }
        if let ReplyKind::BlockStatus { req_one } = pending.kind {
            if self.buffer.len() + STRUCTURED_REPLY_BYTES + 4 + 8 * 2050 > REPLY_BUFFER_BYTES {
                self.flush();
            }
            if error == 0 {
                push_block_status(&mut self.buffer, pending.cookie, pending.offset, &data, req_one);
            } else {
                push_error_chunk(&mut self.buffer, pending.cookie, error);
            }
            return;
        }
        let structured = self.structured && pending.kind == ReplyKind::Read;
        let inline = data.len() <= REPLY_INLINE_BYTES_MAX;
        let head = if structured { STRUCTURED_REPLY_BYTES + 8 } else { SIMPLE_REPLY_BYTES };
        let buffered = head + if inline { data.len() } else { 0 };
        if self.buffer.len() + buffered > REPLY_BUFFER_BYTES {
            self.flush();
        }
        if structured && error != 0 {
            push_error_chunk(&mut self.buffer, pending.cookie, error);
            return;
        }
        if structured {
            let len = u32::try_from(data.len()).expect("reads are at most 32 MiB");
            push_read_head(&mut self.buffer, pending.cookie, pending.offset, len);
        } else {
            self.buffer.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            self.buffer.extend_from_slice(&error.to_be_bytes());
            self.buffer.extend_from_slice(&pending.cookie.to_be_bytes());
        }
        if inline {
            self.buffer.extend_from_slice(&data);
        } else {
            let result = write_pair(self.stream, &self.buffer, &data);
            self.buffer.clear();
            self.check(result);
        }
    }

    fn flush(&mut self) {
        if self.failed.is_some() || self.buffer.is_empty() {
            self.buffer.clear();
            return;
        }
        let mut stream = self.stream;
        let result = stream.write_all(&self.buffer);
        self.buffer.clear();
        self.check(result);
    }

    fn check(&mut self, result: io::Result<()>) {
        if let Err(err) = result {
            // Wake the reader, which may be blocked reading a client that is gone.
            let _ = self.stream.shutdown(Shutdown::Both);
            self.failed = Some(err);
        }
    }
}

/// Writes `first` then `second` with as few system calls as the socket allows.
fn write_pair(mut stream: &TcpStream, mut first: &[u8], mut second: &[u8]) -> io::Result<()> {
    while !first.is_empty() {
        let written = match stream.write_vectored(&[IoSlice::new(first), IoSlice::new(second)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => written,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if written < first.len() {
            first = &first[written..];
        } else {
            second = &second[written - first.len()..];
            first = &[];
        }
    }
    stream.write_all(second)
}

/// The NBD error value for an export's error. NBD has only a few; EIO stands for the rest.
fn nbd_errno(err: &io::Error) -> u32 {
    match err.raw_os_error() {
        Some(libc::EPERM) => NBD_EPERM,
        Some(libc::EIO) => NBD_EIO,
        Some(libc::ENOMEM) => NBD_ENOMEM,
        Some(libc::EINVAL) => NBD_EINVAL,
        Some(libc::ENOSPC | libc::EDQUOT) => NBD_ENOSPC,
        Some(libc::EOVERFLOW) => NBD_EOVERFLOW,
        Some(libc::ENOTSUP) => NBD_ENOTSUP,
        Some(libc::ESHUTDOWN) => NBD_ESHUTDOWN,
        Some(_) => NBD_EIO,
        None => match err.kind() {
            io::ErrorKind::PermissionDenied => NBD_EPERM,
            io::ErrorKind::InvalidInput => NBD_EINVAL,
            io::ErrorKind::OutOfMemory => NBD_ENOMEM,
            io::ErrorKind::Unsupported => NBD_ENOTSUP,
            _ => NBD_EIO,
        },
    }
}

fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    (u64::from(be_u32(bytes, at)) << 32) | u64::from(be_u32(bytes, at + 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_parses_and_rejects_bad_lengths() {
        let mut data = Vec::new();
        data.extend_from_slice(&4u32.to_be_bytes());
        data.extend_from_slice(b"disk");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        data.extend_from_slice(&INFO_NAME.to_be_bytes());
        let request = InfoRequest::parse(&data).expect("well-formed");
        assert_eq!(request.name, b"disk");
        assert!(request.asks_for(INFO_NAME));
        assert!(!request.asks_for(INFO_EXPORT));

        assert!(InfoRequest::parse(&data[..data.len() - 1]).is_none());
        assert!(InfoRequest::parse(&data[..3]).is_none());
        let mut long_name = data.clone();
        long_name[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(InfoRequest::parse(&long_name).is_none());
    }

    #[test]
    fn bounds_reject_empty_overflowing_and_past_the_end() {
        let request = |offset, len| Request { flags: 0, command: CMD_READ, cookie: 0, offset, len };
        assert!(request(0, 4096).in_bounds(4096));
        assert!(!request(1, 4096).in_bounds(4096));
        assert!(!request(0, 0).in_bounds(4096));
        assert!(!request(u64::MAX, 1).in_bounds(u64::MAX));
    }

    #[test]
    fn in_flight_bounds_slots_and_bytes() {
        let in_flight = InFlight::new();
        let slots: Vec<u64> = (0..IN_FLIGHT_MAX as u64)
            .map(|cookie| {
                in_flight.acquire(Pending {
                    cookie,
                    read_len: None,
                    payload_bytes: 1,
                    kind: ReplyKind::Simple,
                    offset: 0,
                })
            })
            .collect();
        assert!(in_flight.slots.lock().free.is_empty());
        for (cookie, slot) in slots.iter().enumerate() {
            assert_eq!(in_flight.release(*slot).map(|p| p.cookie), Some(cookie as u64));
        }
        assert!(in_flight.release(slots[0]).is_none());
        assert!(in_flight.release(u64::MAX).is_none());
        assert_eq!(in_flight.slots.lock().payload_bytes, 0);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(nbd_errno(&io::Error::from_raw_os_error(libc::EPERM)), NBD_EPERM);
        assert_eq!(nbd_errno(&io::Error::from_raw_os_error(libc::ENOSPC)), NBD_ENOSPC);
        assert_eq!(nbd_errno(&io::Error::from_raw_os_error(libc::EBADF)), NBD_EIO);
        assert_eq!(nbd_errno(&io::Error::other("boom")), NBD_EIO);
        assert_eq!(nbd_errno(&io::ErrorKind::InvalidInput.into()), NBD_EINVAL);
    }
}
