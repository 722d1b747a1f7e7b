//! Front ends: how clients reach a volume.
//!
//! A front end decodes client requests and hands them to an [`Export`] as
//! [`IoRequest`]s. The export answers each through its [`Completer`], from whatever
//! thread finishes the work (for a primary volume, its poller thread once the write is
//! persistent on both sites), so a front-end connection can keep many requests in flight.

pub mod forward;
pub mod mem;
pub mod nbd;
pub mod nbd_client;
pub mod nvmf;

use std::io;
use std::sync::Arc;

use crossbeam_channel::Sender;

/// One client request, already decoded and bounds-checked against the export size.
#[derive(Debug)]
pub enum IoRequest {
    Read { offset: u64, len: u32 },
    Write { offset: u64, data: Vec<u8>, fua: bool },
    Flush,
    Trim { offset: u64, len: u32 },
    WriteZeroes { offset: u64, len: u32, fua: bool },
}

impl IoRequest {
    /// Whether the request changes the volume.
    pub fn is_mutation(&self) -> bool {
        matches!(self, IoRequest::Write { .. } | IoRequest::Trim { .. } | IoRequest::WriteZeroes { .. })
    }
}

/// The answer to one [`IoRequest`]: read data for reads, nothing for the others.
pub type IoResult = io::Result<Option<Vec<u8>>>;

/// A finished request, as sent back to the front end that submitted it.
#[derive(Debug)]
pub struct IoReply {
    /// The front end's own tag for the request (the NBD cookie).
    pub cookie: u64,
    pub result: IoResult,
}

/// Completes one request exactly once. Dropping it uncompleted answers the request with an
/// I/O error, so that a request can never be left hanging by a component that stopped.
pub struct Completer {
    cookie: u64,
    reply_to: Option<Sender<IoReply>>,
}

impl Completer {
    pub fn new(cookie: u64, reply_to: Sender<IoReply>) -> Self {
        Self { cookie, reply_to: Some(reply_to) }
    }

    pub fn complete(mut self, result: IoResult) {
        if let Some(tx) = self.reply_to.take() {
            // The front end may have gone (client disconnected); nothing is owed then.
            let _ = tx.send(IoReply { cookie: self.cookie, result });
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if let Some(tx) = self.reply_to.take() {
            let _ = tx.send(IoReply {
                cookie: self.cookie,
                result: Err(io::Error::other("request dropped before completion")),
            });
        }
    }
}

impl std::fmt::Debug for Completer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completer").field("cookie", &self.cookie).finish()
    }
}

/// Whether a volume takes writes through this node now: what NVMe/TCP reports as the ANA
/// state of its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// Writes are taken (or refused by the volume's policy, as they would be by any
    /// node: the path is still the one to use).
    Taken,
    /// Not yet, soon: the volume just became writable here and waits for its mirror (a
    /// takeover, a restart), or a switchover is handing it on. Hosts wait.
    Waiting,
    /// The volume is written elsewhere (a mirror, a volume that moved or was fenced).
    Elsewhere,
}

/// A block volume as a front end sees it.
pub trait Export: Send + Sync {
    /// Size in bytes; requests past it are refused by the front end before submission.
    fn size(&self) -> u64;
    /// A mirror is exported read-only until failover.
    fn read_only(&self) -> bool;
    /// Hands a request over; `done` is completed later, possibly from another thread.
    fn submit(&self, request: IoRequest, done: Completer);
    /// Whether writes are taken through this node now (see [`Writes`]).
    fn writes(&self) -> Writes {
        if self.read_only() {
            Writes::Elsewhere
        } else {
            Writes::Taken
        }
    }
    /// Takes an NBD client connection whole, once its handshake named this export: an
    /// export with a reactor of its own reads, serves and answers its requests there, with
    /// no thread between the socket and the volume. An export without one gives it back,
    /// and the front end serves it through [`Export::submit`].
    fn adopt(&self, conn: nbd::Adopted) -> Result<(), nbd::Adopted> {
        Err(conn)
    }
    /// Takes an NVMe/TCP I/O queue whole, once its Connect is answered, as
    /// [`Export::adopt`] takes an NBD connection.
    fn adopt_nvmf(&self, queue: nvmf::AdoptedQueue) -> Result<(), nvmf::AdoptedQueue> {
        Err(queue)
    }
}

/// Who a client is, as far as the front end could establish it: its address, and the names
/// of the certificate it presented where the port verifies client certificates (NBD over
/// TLS with `--nbd-client-ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientId {
    pub addr: std::net::IpAddr,
    /// The verified certificate's subject alternative DNS names and common name; empty
    /// where no certificate was verified.
    pub cert_names: Vec<String>,
}

impl ClientId {
    /// A client known by its address only.
    pub fn at(addr: std::net::IpAddr) -> ClientId {
        ClientId { addr, cert_names: Vec::new() }
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.addr)?;
        if !self.cert_names.is_empty() {
            write!(f, " (certificate {})", self.cert_names.join(", "))?;
        }
        Ok(())
    }
}

/// The set of volumes a front end may serve, looked up by export name.
pub trait ExportRegistry: Send + Sync {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>>;
    /// Names for NBD_OPT_LIST.
    fn names(&self) -> Vec<String>;
    /// Whether `client` may use export `name` (its allow-list); every client may unless
    /// the registry says otherwise.
    fn admits(&self, name: &str, client: &ClientId) -> bool {
        let _ = (name, client);
        true
    }
    /// The volume's id, the same on both nodes of a pair: NVMe/TCP derives the namespace's
    /// NGUID and UUID and the controller's serial from it, so that a host's multipath sees
    /// one namespace through both nodes.
    fn volume_id(&self, name: &str) -> Option<u64> {
        let _ = name;
        None
    }
    /// The NVMe/TCP addresses of the other node of the volume's pair, for the discovery log.
    fn other_paths(&self, name: &str) -> Vec<std::net::SocketAddr> {
        let _ = name;
        Vec::new()
    }
}
