//! NVMe/TCP target: serves the volumes of an [`ExportRegistry`] to NVMe over Fabrics hosts
//! (the Linux kernel's `nvme-tcp` initiator through `nvme connect`, with native NVMe
//! multipath), per the NVMe/TCP Transport Specification and NVMe over Fabrics 1.1.
//!
//! # Subsystems, controllers, paths
//!
//! Each volume is one subsystem, `nqn.2026-01.io.nvmirror:VOL`, with one namespace (NSID
//! 1). Each node of a pair serves it: the host sees two controllers of one subsystem, one
//! per node, and its multipath joins them into one block device. Both nodes give the
//! namespace the same NGUID and UUID (from the volume's id and name) and the same serial.
//! Controller IDs count up from a random start per server, so that two nodes' controllers
//! of one host do not collide.
//!
//! ANA (Asymmetric Namespace Access): one ANA group, in state *optimized* on the node
//! where the volume is writable (its primary) and *inaccessible* elsewhere (a mirror, a
//! node the volume moved away from or that was fenced). In between it is in *change*: a
//! new primary whose mirror link has not been up since it started (a takeover, a
//! restart) refuses writes under policy strict, and a switchover's drain holds them, so
//! hosts hold their I/O until the state settles (commands get *ANA transition*). Each admin queue looks at the state every
//! [`TICK`]; when it changes (failover, switchover, failback) the controller completes an
//! Asynchronous Event Request with an ANA-change notice, and the host reads the ANA log
//! page and moves its I/O. An I/O command on an inaccessible path is answered with the
//! path status *ANA inaccessible*, which the host retries on another path.
//!
//! The discovery subsystem (`nqn.2014-08.org.nvmexpress.discovery`) lists every volume
//! with this node's address and, where the registry knows it, the other node's.
//!
//! # Connections
//!
//! One TCP connection is one queue: the admin queue (QID 0) or an I/O queue. A thread
//! reads each new connection's PDUs and serves its commands, and a writer thread sends the
//! answers. Admin queues stay there. An I/O queue, once its Connect is answered, is offered
//! to its volume ([`super::Export::adopt_nvmf`]): a primary volume's reactor takes it and
//! serves it as it serves NBD connections ([`session::IoSession`]: PDUs decoded, writes
//! logged, reads answered from the reactor's own thread, with no thread hand-off between
//! the socket and the volume). A queue of a volume that is not writable here (a mirror)
//! stays on threads, where every command is answered *ANA inaccessible*; it goes to the
//! reactor once the volume becomes writable here (a failover), and back to threads when the
//! reactor lets go of the volume (a switchover, a stop). The Linux host opens one I/O queue
//! per CPU (up to [`IO_QUEUES_MAX`] granted); they land on the volume's one reactor.
//!
//! | Command | Notes |
//! |---|---|
//! | Fabrics Connect, Property Get/Set | CAP, VS, CC, CSTS; CC.EN sets CSTS.RDY, CC.SHN completes at once |
//! | Identify | CNS 00h namespace, 01h controller, 02h active namespace list, 03h descriptors (NGUID, UUID) |
//! | Get Log Page | 01h error (empty), 02h SMART (nominal), 0Ch ANA, 70h discovery |
//! | Set/Get Features | 07h number of queues, 0Bh async event configuration, 0Fh keep alive timer |
//! | Asynchronous Event Request | up to [`AER_MAX`] held; completed with ANA-change notices |
//! | Keep Alive, Abort | keep alive resets the timer; abort aborts nothing |
//! | Read, Write, Flush, Write Zeroes, Dataset Management | FUA passed on; deallocate ranges become trims |
//!
//! Write data up to [`INLINE_DATA_BYTES`] comes in the command capsule; larger writes are
//! fetched with one R2T. Read data goes back in one C2HData PDU before the response.
//! Header and data digests (crc32c) are used where the host asks for them.
//!
//! # Bounds and bad input
//!
//! Every PDU's length is checked against the connection's bound from its first 8 bytes
//! ([`pdu::PduReader`]); a transfer is at most `2^MDTS` pages ([`TRANSFER_BYTES_MAX`]); a
//! queue holds at most its size in commands. A PDU that cannot be decoded ends its
//! connection with a C2HTermReq and one log line naming the peer; the other connections
//! carry on. A command that decodes but makes no sense is answered with an error status.

pub mod admin;
pub mod client;
mod command;
pub mod pdu;
mod queue;
pub mod session;
mod transfer;

pub use queue::{ConnectionError, Status};
pub use session::{AdoptedQueue, IoSession};

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use parking_lot::Mutex;

use super::ExportRegistry;

/// The IANA-assigned NVMe/TCP port.
pub const PORT_DEFAULT: u16 = 4420;
/// The discovery subsystem's NQN.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// A volume's subsystem NQN is this prefix and the volume's name.
pub const NQN_PREFIX: &str = "nqn.2026-01.io.nvmirror:";
/// The one namespace of each subsystem.
pub const NSID: u32 = 1;
/// The one ANA group of each subsystem.
pub const ANA_GROUP: u32 = 1;
/// Entries of an I/O queue (MAXCMD, and CAP.MQES + 1).
pub const IO_QUEUE_ENTRIES: u16 = 128;
/// I/O queues a controller grants at most.
pub const IO_QUEUES_MAX: u16 = 64;
/// Largest transfer: 2^MDTS pages of 4 KiB.
pub const MDTS_SHIFT: u8 = 8;
pub const TRANSFER_BYTES_MAX: usize = 4096 << MDTS_SHIFT;
/// Write data a command capsule of an I/O queue may carry.
pub const INLINE_DATA_BYTES: usize = 16 << 10;
/// Data a command capsule of the admin queue may carry (the Linux host's own bound).
pub const ADMIN_INLINE_DATA_BYTES: usize = 8 << 10;
/// The largest H2CData PDU a host may send (MAXH2CDATA).
pub const H2C_DATA_BYTES_MAX: usize = 128 << 10;
/// Asynchronous Event Requests held at once.
pub const AER_MAX: usize = 4;
/// Keep alive granularity (KAS), in units of 100 ms.
pub const KEEP_ALIVE_GRANULARITY_100MS: u16 = 1;
/// Largest block size exported: 4 KiB.
pub const LBA_SHIFT_MAX: u8 = 12;
/// Connections served at once; further ones are closed as soon as they are accepted.
pub const CONNECTIONS_MAX: usize = 1024;
/// How often an idle connection looks at its controller, the ANA state and the shutdown.
pub const TICK: Duration = Duration::from_millis(100);

const ACCEPT_POLL_MS: i32 = 100;
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

const _: () = assert!(TRANSFER_BYTES_MAX >= INLINE_DATA_BYTES && H2C_DATA_BYTES_MAX >= 4096);

/// ANA states (the values of the ANA log page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AnaState {
    Optimized = 1,
    Inaccessible = 3,
    /// In transition: the volume is about to take writes here (a takeover waiting for its
    /// mirror) or to move on (a switchover's drain). Hosts hold their I/O.
    Change = 0x0f,
}

impl AnaState {
    pub fn as_str(self) -> &'static str {
        match self {
            AnaState::Optimized => "optimized",
            AnaState::Inaccessible => "inaccessible",
            AnaState::Change => "change",
        }
    }

    /// The path status of a command this state refuses, if it refuses it.
    pub(crate) fn refusal(self) -> Option<Status> {
        match self {
            AnaState::Optimized => None,
            AnaState::Inaccessible => Some(Status::ANA_INACCESSIBLE),
            AnaState::Change => Some(Status::ANA_TRANSITION),
        }
    }
}

/// The subsystem NQN of volume `name`.
pub fn subsystem_nqn(name: &str) -> String {
    format!("{NQN_PREFIX}{name}")
}

/// A controller: the admin queue made it, I/O queues attach to it by its ID. It lives as
/// long as its admin queue's connection.
#[derive(Debug)]
pub(crate) struct Controller {
    pub cntlid: u16,
    /// `None`: the discovery controller.
    pub volume: Option<String>,
    pub subnqn: String,
    pub hostnqn: String,
    /// The host's address (of its admin queue).
    pub peer: SocketAddr,
    pub alive: AtomicBool,
    /// I/O queues granted by Set Features (Number of Queues); until then, one.
    pub io_queues: std::sync::atomic::AtomicU16,
    /// The ANA state this controller last reported (an [`AnaState`] value).
    pub ana: std::sync::atomic::AtomicU8,
}

/// What every connection of one server shares.
pub(crate) struct Shared {
    pub registry: Arc<dyn ExportRegistry>,
    pub controllers: Mutex<HashMap<u16, Arc<Controller>>>,
    pub shutdown: AtomicBool,
    /// The port the server listens on (discovery entries name it).
    pub port: u16,
    /// The next controller ID (before its reduction to the range allowed).
    pub next_cntlid: std::sync::atomic::AtomicU16,
}

impl Shared {
    /// Makes a controller with an ID no other live controller of this server has.
    pub fn new_controller(
        &self,
        volume: Option<String>,
        subnqn: String,
        hostnqn: String,
        peer: SocketAddr,
    ) -> Arc<Controller> {
        let mut table = self.controllers.lock();
        let cntlid = loop {
            // From a random start per server, so that two nodes' controllers of one host
            // do not collide; 0xFFF0 and above are reserved, 0 is avoided (some hosts read
            // it as "none").
            let id = self.next_cntlid.fetch_add(1, Ordering::Relaxed) % 0xffef + 1;
            if !table.contains_key(&id) {
                break id;
            }
        };
        let ana = volume.as_deref().map_or(AnaState::Optimized, |v| self.ana_state(v));
        let c = Arc::new(Controller {
            cntlid,
            volume,
            subnqn,
            hostnqn,
            peer,
            alive: AtomicBool::new(true),
            io_queues: std::sync::atomic::AtomicU16::new(1),
            ana: std::sync::atomic::AtomicU8::new(ana as u8),
        });
        table.insert(cntlid, c.clone());
        c
    }

    pub fn drop_controller(&self, c: &Controller) {
        c.alive.store(false, Ordering::Release);
        self.controllers.lock().remove(&c.cntlid);
    }

    /// The ANA state of volume `name` on this node.
    pub fn ana_state(&self, name: &str) -> AnaState {
        match self.registry.lookup(name).map(|e| e.writes()) {
            Some(super::Writes::Taken) => AnaState::Optimized,
            Some(super::Writes::Waiting) => AnaState::Change,
            Some(super::Writes::Elsewhere) | None => AnaState::Inaccessible,
        }
    }
}

/// A host attached to a volume over NVMe/TCP through this node: one controller, as
/// `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostPath {
    pub host_nqn: String,
    /// The host's address.
    pub address: String,
    pub controller: u16,
    /// I/O queues granted.
    pub io_queues: u16,
    /// What this path reports: `optimized`, `inaccessible`, or `change` (in transition).
    pub ana: &'static str,
}

/// A handle on a server's controllers, for status.
#[derive(Clone)]
pub struct NvmfHosts(Arc<Shared>);

impl NvmfHosts {
    /// The hosts attached to volume `name` through this node, by controller ID.
    pub fn of(&self, name: &str) -> Vec<HostPath> {
        let mut hosts: Vec<HostPath> = self
            .0
            .controllers
            .lock()
            .values()
            .filter(|c| c.volume.as_deref() == Some(name))
            .map(|c| HostPath {
                host_nqn: c.hostnqn.clone(),
                address: c.peer.to_string(),
                controller: c.cntlid,
                io_queues: c.io_queues.load(Ordering::Acquire),
                ana: match c.ana.load(Ordering::Acquire) {
                    s if s == AnaState::Optimized as u8 => "optimized",
                    s if s == AnaState::Change as u8 => "change",
                    _ => "inaccessible",
                },
            })
            .collect();
        hosts.sort_by_key(|h| h.controller);
        hosts
    }
}

impl std::fmt::Debug for NvmfHosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmfHosts").field("port", &self.0.port).finish()
    }
}

/// A running NVMe/TCP target: an accept thread and a thread pair per connection.
pub struct NvmfServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<io::Result<()>>>,
}

impl NvmfServer {
    /// Serves `registry` on `listener` from a new accept thread.
    pub fn spawn(listener: TcpListener, registry: Arc<dyn ExportRegistry>) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            registry,
            controllers: Mutex::new(HashMap::new()),
            shutdown: AtomicBool::new(false),
            port: local_addr.port(),
            next_cntlid: std::sync::atomic::AtomicU16::new(rand::random()),
        });
        let acceptor = thread::Builder::new().name("nvmf-accept".to_owned()).spawn({
            let shared = shared.clone();
            move || accept_loop(listener, shared)
        })?;
        Ok(NvmfServer { local_addr, shared, acceptor: Some(acceptor) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Controllers alive now (admin queues connected).
    pub fn controllers(&self) -> usize {
        self.shared.controllers.lock().len()
    }

    /// A handle on the hosts attached, for status (it outlives nothing: it holds the
    /// server's table, not its threads).
    pub fn hosts(&self) -> NvmfHosts {
        NvmfHosts(self.shared.clone())
    }

    /// Stops accepting, closes every connection and waits for their threads, which first
    /// wait for the commands they submitted to complete.
    pub fn shutdown(mut self) -> io::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> io::Result<()> {
        self.shared.shutdown.store(true, Ordering::Release);
        match self.acceptor.take() {
            Some(a) => a.join().unwrap_or_else(|_| Err(io::Error::other("NVMe/TCP accept thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for NvmfServer {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            tracing::error!("nvmf: {}: server stopped on error: {err}", self.local_addr);
        }
    }
}

impl std::fmt::Debug for NvmfServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmfServer").field("local_addr", &self.local_addr).finish()
    }
}

struct Connection {
    stream: TcpStream,
    thread: JoinHandle<()>,
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut connections: Vec<Connection> = Vec::new();
    while !shared.shutdown.load(Ordering::Acquire) {
        connections.retain_mut(|c| !c.thread.is_finished());
        if !super::nbd::wait_readable(&listener, ACCEPT_POLL_MS)? {
            continue;
        }
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!("nvmf: accept failed: {e}");
                thread::sleep(ACCEPT_RETRY);
                continue;
            }
        };
        if connections.len() >= CONNECTIONS_MAX {
            tracing::warn!("nvmf: {peer}: refused, already serving {CONNECTIONS_MAX} connections");
            continue;
        }
        let handle = match stream.try_clone() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("nvmf: {peer}: cannot duplicate the socket: {e}");
                continue;
            }
        };
        let shared2 = shared.clone();
        match thread::Builder::new().name(format!("nvmf-{peer}")).spawn(move || queue::serve(stream, peer, &shared2)) {
            Ok(thread) => connections.push(Connection { stream: handle, thread }),
            Err(e) => tracing::warn!("nvmf: {peer}: cannot start a connection thread: {e}"),
        }
    }
    for c in &connections {
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
    }
    for c in connections {
        let _ = c.thread.join();
    }
    Ok(())
}
