//! Replication transports: one trait pair, several engines.
//!
//! The source side holds a [`Link`] per mirrored volume, made by a [`Connector`]. The
//! destination side is transport-independent: an engine accepts a connection, reads the
//! [`Hello`], asks the node's [`MirrorDirectory`] for a [`FrameHandler`], and then feeds it
//! every frame; the handler answers through a [`ReplySink`]. The engine calls
//! [`FrameHandler::commit`] whenever it has no more input at hand, which makes every
//! batch that arrived together one persist and one ack (group commit).
//!
//! Engines: [`tcp`] (everywhere, the default) and [`mem`] (in-process, for tests and the
//! simulator). The protocol is described in `README.md` beside this file.

pub mod auth;
pub mod mem;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod tcp;
pub mod tls;
pub mod wire;

use std::io;
use std::sync::Arc;

use thiserror::Error;

pub use wire::{Hello, Intent, LogTail, Message, RefuseCode, Welcome};

/// What the destination sends back on a link, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ack { seq: u64 },
    CpDone { cp: u64 },
    BaselineAck,
    Refuse { code: RefuseCode, reason: String },
    Error { reason: String },
    RdmaListen { addr: String, token: u64 },
    RdmaRegions { regions: [wire::RdmaRegion; 2] },
    LogBytes { partition: u8, offset: u64, bytes: Vec<u8> },
    LogFetchEnd { partition: u8, tail: u64 },
}

impl Reply {
    /// The reply a frame from the destination carries; `None` for a frame a destination
    /// never sends.
    pub fn from_message(msg: &Message<'_>) -> Option<Reply> {
        Some(match msg {
            Message::Ack { seq } => Reply::Ack { seq: *seq },
            Message::CpDone { cp } => Reply::CpDone { cp: *cp },
            Message::BaselineAck => Reply::BaselineAck,
            Message::Refuse { code, reason } => Reply::Refuse { code: *code, reason: reason.clone() },
            Message::Error { reason } => Reply::Error { reason: reason.clone() },
            Message::RdmaListen { addr, token } => Reply::RdmaListen { addr: addr.clone(), token: *token },
            Message::RdmaRegions { regions } => Reply::RdmaRegions { regions: *regions },
            Message::LogBytes { partition, offset, bytes } => {
                Reply::LogBytes { partition: *partition, offset: *offset, bytes: bytes.to_vec() }
            }
            Message::LogFetchEnd { partition, tail } => Reply::LogFetchEnd { partition: *partition, tail: *tail },
            _ => return None,
        })
    }
}

/// An event on a link, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    Reply(Reply),
    /// The link is gone; nothing more will arrive.
    Closed {
        reason: String,
    },
}

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LinkError {
    #[error("link I/O: {0}")]
    Io(#[from] io::Error),
    #[error("link closed: {0}")]
    Closed(String),
}

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error("connect to {target}: {source}")]
    Io { target: String, source: io::Error },
    #[error("refused by {target}: {reason}")]
    Refused { target: String, code: RefuseCode, reason: String },
    #[error("protocol error with {target}: {reason}")]
    Protocol { target: String, reason: String },
    /// The destination did not prove that it holds this node's secret.
    #[error("destination {target} failed authentication: {reason}")]
    Unauthenticated { target: String, reason: String },
}

/// The source's end of a replication connection.
pub trait Link: Send {
    /// Sends entry bytes (one or more whole NVLog entries) to be placed at `offset` of
    /// partition `partition`'s log file.
    fn send_entries(&mut self, partition: u8, offset: u64, bytes: &[u8]) -> Result<(), LinkError>;
    /// Sends a control message (may be buffered until [`Link::flush`]).
    fn send(&mut self, msg: &Message<'_>) -> Result<(), LinkError>;
    fn flush(&mut self) -> Result<(), LinkError>;
    /// The next reply from the destination, without waiting: the poller busy-polls the
    /// link itself, with no thread between it and the connection. After `Closed`, `None`.
    fn poll(&mut self) -> Option<LinkEvent>;
    /// Closes the link; later sends fail.
    fn close(&mut self);
    /// The descriptor that becomes readable when a reply may have arrived, for the poller
    /// to sleep on (see `crate::poller::Readiness`). `None`: the link must be polled
    /// (its completions arrive without a descriptor, as RDMA's do).
    fn readiness_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Tells the link where the bytes of later [`Link::send_entries`] calls live (the
    /// NVLog's memory), so that an engine able to send straight from memory (RDMA)
    /// registers it once instead of copying every batch. Engines that copy or stream the
    /// bytes at once ignore it.
    ///
    /// # Safety
    /// `memory` must stay mapped for as long as the link lives, and the bytes of every
    /// `send_entries` call that lie in it must stay unchanged until the link acknowledges
    /// them (an `Ack` covering their last entry) or is dropped.
    unsafe fn offer_source_memory(&mut self, memory: &[u8]) {
        let _ = memory;
    }
}

pub trait Connector: Send + Sync {
    type Link: Link;
    /// Opens a link to `target` (engine-specific address), says hello, and returns the
    /// destination's welcome.
    fn connect(&self, target: &str, hello: &Hello) -> Result<(Self::Link, Welcome), ConnectError>;
}

/// How the destination answers on a connection. Safe to call from any thread.
pub trait ReplySink: Send + Sync {
    fn send(&self, msg: &Message<'_>) -> io::Result<()>;
    /// Ends the connection (after a refusal, a fatal error, or a failover).
    fn close(&self);
}

/// Why a [`FrameHandler`] ends its connection: the engine sends its text to the source in
/// an `Error` frame.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// The destination's handling of one connection after its hello.
pub trait FrameHandler: Send {
    /// Handles one frame. An error is fatal for the connection: the engine sends it as an
    /// `Error` frame and closes.
    fn on_message(&mut self, msg: Message<'_>) -> Result<(), HandlerError>;
    /// Persists what was placed since the last commit and acknowledges it.
    fn commit(&mut self) -> Result<(), HandlerError>;
}

/// What the RDMA engine needs of a mirror: the memory of its log files to register, a name
/// for its messages, and a place to keep the registration for as long as the session that
/// asked for it lasts (dropped before the logs, and at failover).
pub trait PlacementTarget: Send + Sync {
    fn name(&self) -> String;
    /// Each log file's mapping: (address, length), by partition.
    fn log_memory(&self) -> [(*mut u8, usize); crate::log::PARTITIONS];
    /// Keeps `attachment` for session `gen`; refused once a newer session or a failover came.
    fn set_rdma_attachment(&self, gen: u64, attachment: Box<dyn std::any::Any + Send>) -> Result<(), SessionGone>;
}

/// A placement target refused an engine's registrations: a newer session or a failover
/// replaced the session they were for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the session this queue pair was for is gone")]
pub struct SessionGone;

/// The destination's RDMA engine, as a session sees it: it accepts the source's queue pair
/// for a mirror, registers the mirror's log files, and sends their keys on the session.
pub trait RdmaPlacement: Send + Sync {
    /// Expects a queue pair for `target` (session `gen`); returns the rdma_cm address to
    /// connect to and the token the source presents.
    fn expect(
        &self,
        target: Arc<dyn PlacementTarget>,
        sink: Arc<dyn ReplySink>,
        gen: u64,
    ) -> Result<(String, u64), String>;
}

/// The destination node's mirrors, as engines see them.
pub trait MirrorDirectory: Send + Sync {
    fn attach(
        &self,
        hello: &Hello,
        sink: Arc<dyn ReplySink>,
    ) -> Result<(Box<dyn FrameHandler>, Welcome), (RefuseCode, String)>;

    /// A peer at address `peer` was refused before its hello was acted on (authentication
    /// missing or failed): nothing of any mirror was touched. The engine logs it; a node
    /// may record it too.
    fn peer_refused(&self, peer: &str, reason: &str) {
        let _ = (peer, reason);
    }
}

/// The transport engine a volume is mirrored with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    Tcp,
    Rdma,
}

impl<L: Link + ?Sized> Link for Box<L> {
    fn send_entries(&mut self, partition: u8, offset: u64, bytes: &[u8]) -> Result<(), LinkError> {
        (**self).send_entries(partition, offset, bytes)
    }
    fn send(&mut self, msg: &Message<'_>) -> Result<(), LinkError> {
        (**self).send(msg)
    }
    fn flush(&mut self) -> Result<(), LinkError> {
        (**self).flush()
    }
    fn poll(&mut self) -> Option<LinkEvent> {
        (**self).poll()
    }
    fn close(&mut self) {
        (**self).close()
    }
    fn readiness_fd(&self) -> Option<std::os::fd::RawFd> {
        (**self).readiness_fd()
    }
    unsafe fn offer_source_memory(&mut self, memory: &[u8]) {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { (**self).offer_source_memory(memory) }
    }
}

/// Prefix of a replication target that asks for the RDMA engine (`rdma://HOST:PORT`).
pub const RDMA_SCHEME: &str = "rdma://";

/// Whether this build has the RDMA engine.
pub const RDMA_BUILT: bool = cfg!(feature = "rdma");

/// The engine a node's volumes use, chosen per target: `rdma://HOST:PORT` for RDMA (where
/// built), `HOST:PORT` for TCP. Both authenticate with the node's secret, where it has one.
#[derive(Debug, Clone, Default)]
pub struct AnyConnector {
    tcp: tcp::TcpConnector,
}

impl AnyConnector {
    pub fn new(security: LinkSecurity) -> AnyConnector {
        AnyConnector { tcp: tcp::TcpConnector::new(security) }
    }
}

/// How a node's replication connections are secured, both ways: the pair's shared secret
/// (each end proves it holds it before the hello is acted on) and TLS around the whole
/// connection. The default, neither, is the engine as it was before either existed.
#[derive(Debug, Clone, Default)]
pub struct LinkSecurity {
    pub secret: Option<auth::PeerSecret>,
    pub tls: Option<tls::TlsConfig>,
}

impl Connector for AnyConnector {
    type Link = Box<dyn Link>;
    fn connect(&self, target: &str, hello: &Hello) -> Result<(Box<dyn Link>, Welcome), ConnectError> {
        if let Some(addr) = target.strip_prefix(RDMA_SCHEME) {
            #[cfg(feature = "rdma")]
            {
                let (l, w) = rdma::RdmaConnector::over(self.tcp.clone()).connect(addr, hello)?;
                return Ok((Box::new(l), w));
            }
            #[cfg(not(feature = "rdma"))]
            return Err(ConnectError::Protocol {
                target: addr.to_string(),
                reason: "this build has no RDMA engine (build with the rdma feature)".into(),
            });
        }
        let (l, w) = self.tcp.connect(target, hello)?;
        Ok((Box::new(l), w))
    }
}
