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
//! | `STARTTLS` (5)      | with TLS (see below): `REP_ACK`, then the TLS handshake; once TLS runs, `REP_ERR_INVALID`; without TLS, `REP_ERR_POLICY` |
//! | `INFO` (6), `GO` (7)| `REP_INFO` `INFO_EXPORT`, `INFO_BLOCK_SIZE` (1, 4096, 32 MiB), `INFO_NAME` if asked, then `REP_ACK`; `GO` then enters transmission. An unknown name gets `REP_ERR_UNKNOWN` |
//! | `STRUCTURED_REPLY` (8) | `REP_ACK` (data: `REP_ERR_INVALID`): reads are answered with structured replies from then on |
//! | `LIST_META_CONTEXT` (9), `SET_META_CONTEXT` (10) | one `REP_META_CONTEXT` for `base:allocation` where no query or a `base:` one asks for it (id 1 when set), then `REP_ACK`; without structured replies `REP_ERR_INVALID`; an unknown export `REP_ERR_UNKNOWN` |
//! | anything else       | `REP_ERR_UNSUP` (this includes `EXTENDED_HEADERS`) |
//!
//! A server given an [`NbdTls`] (a node with `--tls-cert`) is in the protocol's forced-TLS
//! mode: before TLS runs, `STARTTLS` and `ABORT` are answered as above, `EXPORT_NAME`
//! closes the connection, and every other option gets `REP_ERR_TLS_REQD`. TLS starts the
//! option haggling afresh (nothing settled before counts), and the allow-list checks the
//! client's certificate names from then on (see `tls`).
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
//!
//! Files: `handshake` (options), `session` (a connection a poller adopts), `threaded` (a
//! connection on threads of its own), `reply` (structured reply chunks), `tls` (TLS in
//! each phase); accepting, request decoding and the constants of the protocol here.

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

mod handshake;
mod reply;
mod threaded;
mod tls;

pub use tls::NbdTls;
use tls::Wire;

#[cfg(test)]
use handshake::InfoRequest;
pub use handshake::Options;
use handshake::{negotiate, Negotiated};
use reply::{push_block_status, push_error_chunk, push_read_head};
use threaded::serve_adopted_on_threads;
#[cfg(test)]
use threaded::{InFlight, Pending, ReplyKind};

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
pub(crate) const OPT_STARTTLS: u32 = 5;
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
const REP_ERR_POLICY: u32 = (1 << 31) | 2;
const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;
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
    #[error("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS: this server requires TLS")]
    TlsRequired,
    #[error("refused: the client did not start TLS (NBD_OPT_STARTTLS), which this server requires, and left")]
    PlainClientLeft,
    #[error("starting TLS failed")]
    TlsHandshake(#[source] io::Error),
    #[error("NBD_OPT_EXPORT_NAME asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("export {0:?} does not admit this client (its allow-list)")]
    NotAdmitted(String),
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
    /// Serves `registry` on `listener` from a new accept thread, in plain text.
    pub fn spawn(listener: TcpListener, registry: Arc<dyn ExportRegistry>) -> io::Result<Self> {
        Self::spawn_with(listener, registry, None)
    }

    /// As [`NbdServer::spawn`]; with `tls`, every client must start TLS before anything
    /// else (`NBD_OPT_STARTTLS`).
    pub fn spawn_with(
        listener: TcpListener,
        registry: Arc<dyn ExportRegistry>,
        tls: Option<NbdTls>,
    ) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let shutdown = Arc::new(AtomicBool::new(false));
        let acceptor = thread::Builder::new().name("nbd-accept".to_owned()).spawn({
            let shutdown = Arc::clone(&shutdown);
            move || serve(listener, registry, shutdown, tls)
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
            tracing::error!("nbd: {}: server stopped on error: {err}", self.local_addr);
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
pub fn serve(
    listener: TcpListener,
    registry: Arc<dyn ExportRegistry>,
    shutdown: Arc<AtomicBool>,
    tls: Option<NbdTls>,
) -> io::Result<()> {
    let mut connections = Vec::new();
    let result = accept_loop(&listener, &registry, &shutdown, tls.as_ref(), &mut connections);
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
    tls: Option<&NbdTls>,
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
                tracing::warn!("nbd: accept failed: {err}");
                thread::sleep(ACCEPT_RETRY);
                continue;
            }
        };
        if connections.len() >= CONNECTIONS_MAX {
            tracing::warn!("nbd: {peer}: refused, already serving {CONNECTIONS_MAX} connections");
            continue;
        }
        let handle = match stream.try_clone() {
            Ok(handle) => handle,
            Err(err) => {
                tracing::warn!("nbd: {peer}: cannot duplicate the socket: {err}");
                continue;
            }
        };
        let registry = Arc::clone(registry);
        let tls = tls.cloned();
        let spawned = thread::Builder::new()
            .name(format!("nbd-{peer}"))
            .spawn(move || serve_connection(stream, peer, registry.as_ref(), tls.as_ref()));
        match spawned {
            Ok(thread) => connections.push(Connection { stream: handle, thread }),
            Err(err) => tracing::warn!("nbd: {peer}: cannot start a connection thread: {err}"),
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
pub(crate) fn wait_readable(listener: &TcpListener, timeout_ms: i32) -> io::Result<bool> {
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

fn serve_connection(stream: TcpStream, peer: SocketAddr, registry: &dyn ExportRegistry, tls: Option<&NbdTls>) {
    let closer = stream.try_clone().ok();
    match run_connection(stream, peer, registry, tls) {
        // The export's reactor owns the socket now.
        Ok(Served::Adopted) => return,
        Ok(Served::Here) => {}
        Err(err) => tracing::warn!("nbd: {peer}: {}", ErrorChain(&err)),
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
    tls: Option<&NbdTls>,
) -> Result<Served, ConnectionError> {
    stream.set_nonblocking(false).map_err(ConnectionError::Socket)?;
    stream.set_nodelay(true).map_err(ConnectionError::Socket)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(ConnectionError::Socket)?;
    stream.set_write_timeout(Some(REPLY_WRITE_TIMEOUT)).map_err(ConnectionError::Socket)?;
    // One buffered reader for both phases: bytes it read ahead must not be lost when
    // transmission starts.
    let wire = Wire::plain(stream, READ_BUFFER_BYTES).map_err(ConnectionError::Socket)?;
    let (wire, negotiated) = negotiate(wire, registry, tls)?;
    let (export, options) = match negotiated {
        Negotiated::Transmit(export, options) => (export, options),
        Negotiated::Closed => return Ok(Served::Here),
    };
    let (stream, tls, read_ahead) = wire.into_parts();
    // Idle clients are normal once transmission starts.
    stream.set_read_timeout(None).map_err(ConnectionError::Socket)?;
    // The export's reactor takes the connection whole where it has one: its requests are
    // then read, served and answered on that one thread.
    let adopted = Adopted { stream, tls, peer, read_ahead, export: Arc::downgrade(&export), options };
    let adopted = match export.adopt(adopted) {
        Ok(()) => return Ok(Served::Adopted),
        Err(back) => back,
    };
    threaded::transmit_adopted(adopted, export.as_ref()).map(|()| Served::Here)
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
