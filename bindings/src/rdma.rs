//! Safe wrappers over RDMA verbs and the RDMA connection manager (`rdma-sys`).
//!
//! Ownership follows the verbs object tree: a [`ProtectionDomain`] and a
//! [`CompletionQueue`] are shared (`Arc`) by the [`Connection`]s and [`MemoryRegion`]s
//! that use them, so a parent is destroyed only after its last child. Every `Drop` checks
//! the destroy call's return code. Posting is `&mut self` on the connection; the buffers of
//! a posted work request must stay valid until its completion is polled, which
//! [`Connection::post`] states in its `# Safety` section.

use std::ffi::c_void;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_sys::*;
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RdmaError {
    #[error("{op}: {source}")]
    Os { op: &'static str, source: io::Error },
    #[error("{op}: expected {expected}, got CM event {got} (status {status})")]
    UnexpectedEvent { op: &'static str, expected: &'static str, got: u32, status: i32 },
    #[error("{op}: timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("peer rejected the connection: {0}")]
    Rejected(String),
    #[error("work request {wr_id} failed: status {status} ({name})")]
    Completion { wr_id: u64, status: u32, name: &'static str },
    #[error("private data of {0} bytes is above the 196 bytes rdma_cm carries")]
    PrivateDataTooLong(usize),
}

fn os(op: &'static str) -> RdmaError {
    RdmaError::Os { op, source: io::Error::last_os_error() }
}

fn check(op: &'static str, rc: i32) -> Result<(), RdmaError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(os(op))
    }
}

/// The RDMA devices this host has, by name (empty where there is none).
/// Whether the rdma-core this was built against has RDMA FLUSH (`IBV_WR_FLUSH`, rdma-core
/// 45+), which would make placement in remote persistent memory explicit. rdma-core 44
/// (Debian 12) has not; the engine then makes placements durable with an RDMA READ after
/// the WRITE on the same queue pair.
pub const FLUSH_IN_HEADERS: bool = cfg!(rdma_flush_in_headers);

/// One line on the RDMA durability in use, for logs.
pub fn flush_support() -> &'static str {
    if FLUSH_IN_HEADERS {
        "RDMA FLUSH is in this rdma-core's headers but not used yet: durability by RDMA READ after WRITE"
    } else {
        "RDMA FLUSH is not available (this rdma-core's headers have no IBV_WR_FLUSH; it came in rdma-core 45): \
         durability by RDMA READ after WRITE"
    }
}

pub fn device_names() -> Vec<String> {
    let mut n = 0i32;
    // SAFETY: ibv_get_device_list writes the count into `n` and returns a list (or null)
    // that we free below with ibv_free_device_list.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Vec::new();
    }
    let mut names = Vec::new();
    for i in 0..usize::try_from(n).unwrap_or(0) {
        // SAFETY: `list` holds `n` valid device pointers (the verbs contract).
        let dev = unsafe { *list.add(i) };
        // SAFETY: `dev` is a valid device; its name is a NUL-terminated C string owned by it.
        let name = unsafe { std::ffi::CStr::from_ptr(ibv_get_device_name(dev)) };
        names.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    names
}

/// An rdma_cm event channel: the file descriptor CM events arrive on.
pub struct EventChannel {
    raw: NonNull<rdma_event_channel>,
}

// SAFETY: an event channel is a file descriptor wrapper; librdmacm allows its use from any
// thread, and this type hands out no aliasing access.
unsafe impl Send for EventChannel {}
// SAFETY: as above; rdma_get_cm_event on one channel is serialized by our callers
// (`&self` methods wait for one event at a time per owner).
unsafe impl Sync for EventChannel {}

impl EventChannel {
    pub fn new() -> Result<Arc<Self>, RdmaError> {
        // SAFETY: no preconditions; null on failure.
        let raw = unsafe { rdma_create_event_channel() };
        Ok(Arc::new(EventChannel { raw: NonNull::new(raw).ok_or_else(|| os("rdma_create_event_channel"))? }))
    }

    fn fd(&self) -> RawFd {
        // SAFETY: `raw` is a live channel for the life of `self`.
        unsafe { self.raw.as_ref().fd }
    }

    /// Waits up to `timeout` for the next CM event.
    fn next(&self, op: &'static str, timeout: Duration) -> Result<CmEvent<'_>, RdmaError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd { fd: self.fd(), events: libc::POLLIN, revents: 0 };
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(RdmaError::Os { op, source: e });
            }
            if rc == 0 {
                return Err(RdmaError::Timeout { op, after: timeout });
            }
            let mut ev: *mut rdma_cm_event = ptr::null_mut();
            // SAFETY: the channel is live; on success `ev` points to an event we must ack.
            check(op, unsafe { rdma_get_cm_event(self.raw.as_ptr(), &mut ev) })?;
            let raw = NonNull::new(ev).ok_or_else(|| os(op))?;
            return Ok(CmEvent { raw, _ch: self });
        }
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: created by rdma_create_event_channel, destroyed once, after every id on it
        // (ids hold an Arc to their channel).
        unsafe { rdma_destroy_event_channel(self.raw.as_ptr()) };
    }
}

/// One CM event, acknowledged on drop.
struct CmEvent<'a> {
    raw: NonNull<rdma_cm_event>,
    _ch: &'a EventChannel,
}

impl CmEvent<'_> {
    fn kind(&self) -> u32 {
        // SAFETY: the event is valid until acked in Drop.
        unsafe { self.raw.as_ref().event }
    }
    fn status(&self) -> i32 {
        // SAFETY: as above.
        unsafe { self.raw.as_ref().status }
    }
    fn id(&self) -> *mut rdma_cm_id {
        // SAFETY: as above.
        unsafe { self.raw.as_ref().id }
    }
    fn private_data(&self) -> Vec<u8> {
        // SAFETY: as above; for connection events `param.conn` is the active member, and
        // its private data (if any) is `private_data_len` bytes owned by the event.
        unsafe {
            let conn = &self.raw.as_ref().param.conn;
            if conn.private_data.is_null() || conn.private_data_len == 0 {
                return Vec::new();
            }
            std::slice::from_raw_parts(conn.private_data.cast::<u8>(), usize::from(conn.private_data_len)).to_vec()
        }
    }
    fn expect(self, op: &'static str, want: u32, name: &'static str) -> Result<Self, RdmaError> {
        if self.kind() == want && self.status() == 0 {
            Ok(self)
        } else if self.kind() == rdma_cm_event_type::RDMA_CM_EVENT_REJECTED {
            Err(RdmaError::Rejected(String::from_utf8_lossy(&self.private_data()).into_owned()))
        } else {
            Err(RdmaError::UnexpectedEvent { op, expected: name, got: self.kind(), status: self.status() })
        }
    }
}

impl Drop for CmEvent<'_> {
    fn drop(&mut self) {
        // SAFETY: the event came from rdma_get_cm_event and is acked exactly once.
        let rc = unsafe { rdma_ack_cm_event(self.raw.as_ptr()) };
        debug_assert_eq!(rc, 0, "rdma_ack_cm_event");
    }
}

pub struct ProtectionDomain {
    raw: NonNull<ibv_pd>,
}

// SAFETY: verbs objects may be used from any thread (libibverbs is thread-safe).
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: allocated by ibv_alloc_pd; every MR and QP on it holds an Arc to it and is
        // gone by now.
        let rc = unsafe { ibv_dealloc_pd(self.raw.as_ptr()) };
        if rc != 0 {
            eprintln!("ibv_dealloc_pd: {}", io::Error::from_raw_os_error(rc));
        }
    }
}

pub struct CompletionQueue {
    raw: NonNull<ibv_cq>,
}

// SAFETY: as for ProtectionDomain; polling is done through `&mut Connection` only.
unsafe impl Send for CompletionQueue {}
// SAFETY: as above.
unsafe impl Sync for CompletionQueue {}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_cq; the QP using it is destroyed first (the
        // connection destroys its QP before dropping its Arc to this CQ).
        let rc = unsafe { ibv_destroy_cq(self.raw.as_ptr()) };
        if rc != 0 {
            eprintln!("ibv_destroy_cq: {}", io::Error::from_raw_os_error(rc));
        }
    }
}

/// Access a memory region grants to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Local use only (the source of RDMA WRITEs, the target of READs).
    Local,
    /// Read by the local device only (the source of RDMA WRITEs): pinned without write
    /// access, so memory the device never writes (a mapped log) is not dirtied by the pin.
    LocalRead,
    /// The peer may RDMA WRITE into it and READ from it.
    RemoteReadWrite,
}

/// A registered memory region.
pub struct MemoryRegion {
    raw: NonNull<ibv_mr>,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: an MR handle is plain data once registered; verbs are thread-safe.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Registers `len` bytes at `addr`.
    ///
    /// # Safety
    /// The memory must stay mapped (and, for remote access, may be written by the peer at
    /// any time) until this region is dropped. With [`Access::LocalRead`] the device only
    /// reads it.
    pub unsafe fn register(
        pd: &Arc<ProtectionDomain>,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<Self, RdmaError> {
        let flags = match access {
            Access::Local => ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0,
            Access::LocalRead => 0,
            Access::RemoteReadWrite => {
                (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                    | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
                    | ibv_access_flags::IBV_ACCESS_REMOTE_READ)
                    .0
            }
        };
        // SAFETY: the PD is live (we hold an Arc); the caller guarantees the memory.
        let raw = unsafe { ibv_reg_mr(pd.raw.as_ptr(), addr.cast::<c_void>(), len, i32::try_from(flags).unwrap_or(0)) };
        Ok(MemoryRegion { raw: NonNull::new(raw).ok_or_else(|| os("ibv_reg_mr"))?, _pd: pd.clone() })
    }
    pub fn lkey(&self) -> u32 {
        // SAFETY: the MR is live for the life of self.
        unsafe { self.raw.as_ref().lkey }
    }
    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { self.raw.as_ref().rkey }
    }
    pub fn addr(&self) -> u64 {
        // SAFETY: as above.
        unsafe { self.raw.as_ref().addr as u64 }
    }
    pub fn len(&self) -> usize {
        // SAFETY: as above.
        unsafe { self.raw.as_ref().length }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered by ibv_reg_mr and deregistered once.
        let rc = unsafe { ibv_dereg_mr(self.raw.as_ptr()) };
        if rc != 0 {
            eprintln!("ibv_dereg_mr: {}", io::Error::from_raw_os_error(rc));
        }
    }
}

/// A local buffer of a work request.
#[derive(Debug, Clone, Copy)]
pub struct Sge {
    pub addr: u64,
    pub len: u32,
    pub lkey: u32,
}

/// A one-sided operation on the peer's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Write,
    Read,
}

#[derive(Debug, Clone, Copy)]
pub struct WorkRequest {
    pub wr_id: u64,
    pub op: Op,
    pub local: Sge,
    pub remote_addr: u64,
    pub rkey: u32,
    /// Ask for a completion (selective signalling: unsignalled requests complete silently,
    /// in order, before the next signalled one).
    pub signaled: bool,
}

/// A finished work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub ok: bool,
    pub status: u32,
}

/// Queue depths of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Depth {
    pub send: u32,
    pub cq: i32,
}

/// A connected RC queue pair, made through rdma_cm.
pub struct Connection {
    id: NonNull<rdma_cm_id>,
    channel: Arc<EventChannel>,
    cq: Arc<CompletionQueue>,
    pd: Arc<ProtectionDomain>,
    wrs: Vec<ibv_send_wr>,
    sges: Vec<ibv_sge>,
}

// SAFETY: the QP and id are used only through `&mut self` (posting, polling) or `&self`
// reads of immutable fields; librdmacm/libibverbs allow use from any thread.
unsafe impl Send for Connection {}

const PRIVATE_DATA_MAX: usize = 196;

fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET fits"),
                sin_port: a.port().to_be(),
                // s_addr is in network byte order: the octets as they stand in memory.
                sin_addr: libc::in_addr { s_addr: u32::from_be_bytes(a.ip().octets()).to_be() },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage, which is suitably aligned.
            unsafe { ptr::write((&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::sa_family_t::try_from(libc::AF_INET6).expect("AF_INET6 fits"),
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above for sockaddr_in6.
            unsafe { ptr::write((&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, libc::socklen_t::try_from(len).expect("small"))
}

impl Connection {
    /// Allocates the PD, CQ and QP of `id` (a connected or connecting id).
    fn setup(id: NonNull<rdma_cm_id>, channel: Arc<EventChannel>, depth: Depth) -> Result<Self, RdmaError> {
        // SAFETY: `id` is live and bound to a device (after address resolution or a
        // connect request), so `verbs` is a valid context.
        let verbs = unsafe { id.as_ref().verbs };
        // SAFETY: `verbs` is a valid context.
        let pd = NonNull::new(unsafe { ibv_alloc_pd(verbs) }).ok_or_else(|| os("ibv_alloc_pd"))?;
        let pd = Arc::new(ProtectionDomain { raw: pd });
        // SAFETY: as above; no completion channel, no vector.
        let cq = NonNull::new(unsafe { ibv_create_cq(verbs, depth.cq, ptr::null_mut(), ptr::null_mut(), 0) })
            .ok_or_else(|| os("ibv_create_cq"))?;
        let cq = Arc::new(CompletionQueue { raw: cq });
        // SAFETY: all-zero is a valid initial ibv_qp_init_attr (null pointers, zero caps).
        let mut attr: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = cq.raw.as_ptr();
        attr.recv_cq = cq.raw.as_ptr();
        attr.cap.max_send_wr = depth.send;
        attr.cap.max_recv_wr = 1;
        attr.cap.max_send_sge = 1;
        attr.cap.max_recv_sge = 1;
        attr.qp_type = ibv_qp_type::IBV_QPT_RC;
        attr.sq_sig_all = 0;
        // SAFETY: id, pd and attr are valid; the QP is destroyed in Drop before the CQ/PD.
        check("rdma_create_qp", unsafe { rdma_create_qp(id.as_ptr(), pd.raw.as_ptr(), &mut attr) })?;
        Ok(Connection { id, channel, cq, pd, wrs: Vec::new(), sges: Vec::new() })
    }

    /// Connects to `addr` with `private` data for the peer (at most 196 bytes).
    pub fn connect(addr: SocketAddr, private: &[u8], depth: Depth, timeout: Duration) -> Result<Self, RdmaError> {
        if private.len() > PRIVATE_DATA_MAX {
            return Err(RdmaError::PrivateDataTooLong(private.len()));
        }
        let channel = EventChannel::new()?;
        let mut raw: *mut rdma_cm_id = ptr::null_mut();
        // SAFETY: the channel is live; on success `raw` is a new id we own.
        check("rdma_create_id", unsafe {
            rdma_create_id(channel.raw.as_ptr(), &mut raw, ptr::null_mut(), rdma_port_space::RDMA_PS_TCP)
        })?;
        let id = NonNull::new(raw).ok_or_else(|| os("rdma_create_id"))?;
        let guard = IdGuard(Some(id));
        let (mut ss, _) = sockaddr_of(&addr);
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: id live; `ss` holds a valid sockaddr for the call's duration.
        check("rdma_resolve_addr", unsafe {
            rdma_resolve_addr(id.as_ptr(), ptr::null_mut(), (&mut ss as *mut libc::sockaddr_storage).cast(), ms)
        })?;
        channel.next("rdma_resolve_addr", timeout)?.expect(
            "rdma_resolve_addr",
            rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED,
            "ADDR_RESOLVED",
        )?;
        // SAFETY: id live, address resolved.
        check("rdma_resolve_route", unsafe { rdma_resolve_route(id.as_ptr(), ms) })?;
        channel.next("rdma_resolve_route", timeout)?.expect(
            "rdma_resolve_route",
            rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED,
            "ROUTE_RESOLVED",
        )?;
        let conn = Connection::setup(guard.take(), channel, depth)?;
        // SAFETY: all-zero is a valid rdma_conn_param.
        let mut param: rdma_conn_param = unsafe { std::mem::zeroed() };
        param.private_data = private.as_ptr().cast();
        param.private_data_len = u8::try_from(private.len()).expect("checked above");
        param.initiator_depth = 16;
        param.responder_resources = 16;
        param.retry_count = 7;
        param.rnr_retry_count = 7;
        // SAFETY: the id has a QP; `param` and the private data outlive the call.
        check("rdma_connect", unsafe { rdma_connect(conn.id.as_ptr(), &mut param) })?;
        conn.channel.next("rdma_connect", timeout)?.expect(
            "rdma_connect",
            rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED,
            "ESTABLISHED",
        )?;
        Ok(conn)
    }

    pub fn pd(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }

    /// Posts `reqs` as one linked list (one doorbell).
    ///
    /// # Safety
    /// Every request's local buffer must lie in a live MR and stay valid (and, for READs,
    /// unread by anyone else) until the request completes: until its completion, or for an
    /// unsignalled request the completion of a later signalled one, is polled. The remote
    /// ranges must lie in MRs the peer registered with `rkey`.
    pub unsafe fn post(&mut self, reqs: &[WorkRequest]) -> Result<(), RdmaError> {
        if reqs.is_empty() {
            return Ok(());
        }
        self.sges.clear();
        self.wrs.clear();
        for r in reqs {
            self.sges.push(ibv_sge { addr: r.local.addr, length: r.local.len, lkey: r.local.lkey });
        }
        for (i, r) in reqs.iter().enumerate() {
            // SAFETY: all-zero is a valid ibv_send_wr (null list pointers, zero fields).
            let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
            wr.wr_id = r.wr_id;
            wr.sg_list = &mut self.sges[i];
            wr.num_sge = 1;
            wr.opcode = match r.op {
                Op::Write => ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                Op::Read => ibv_wr_opcode::IBV_WR_RDMA_READ,
            };
            wr.send_flags = if r.signaled { ibv_send_flags::IBV_SEND_SIGNALED.0 } else { 0 };
            wr.wr.rdma = rdma_t { remote_addr: r.remote_addr, rkey: r.rkey };
            self.wrs.push(wr);
        }
        // Link the list now that the vector no longer moves.
        let n = self.wrs.len();
        for i in 0..n - 1 {
            let next: *mut ibv_send_wr = &mut self.wrs[i + 1];
            self.wrs[i].next = next;
        }
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the QP is live; the list and its SGEs live in self until the call returns
        // (the provider copies them); the caller guarantees the buffers.
        let rc = unsafe { ibv_post_send(self.id.as_ref().qp, self.wrs.as_mut_ptr(), &mut bad) };
        if rc != 0 {
            return Err(RdmaError::Os { op: "ibv_post_send", source: io::Error::from_raw_os_error(rc) });
        }
        Ok(())
    }

    /// Polls up to `out.len()` completions without waiting.
    pub fn poll(&mut self, out: &mut Vec<Completion>, max: usize) -> Result<usize, RdmaError> {
        const BATCH: usize = 16;
        // SAFETY: all-zero is a valid ibv_wc array for the provider to fill.
        let mut wcs: [ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
        let n = max.min(BATCH);
        // SAFETY: the CQ is live and `wcs` has room for `n` entries.
        let got = unsafe { ibv_poll_cq(self.cq.raw.as_ptr(), i32::try_from(n).unwrap_or(1), wcs.as_mut_ptr()) };
        if got < 0 {
            return Err(RdmaError::Os { op: "ibv_poll_cq", source: io::Error::other("poll failed") });
        }
        let got = usize::try_from(got).unwrap_or(0);
        for wc in &wcs[..got] {
            out.push(Completion { wr_id: wc.wr_id, ok: wc.status == ibv_wc_status::IBV_WC_SUCCESS, status: wc.status });
        }
        Ok(got)
    }

    /// Disconnects (the peer sees a DISCONNECTED event; outstanding requests flush with
    /// errors).
    pub fn disconnect(&mut self) {
        // SAFETY: the id is live; disconnecting twice is harmless (returns an error).
        unsafe { rdma_disconnect(self.id.as_ptr()) };
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: the id and its QP are live and destroyed once, QP first; the CQ and PD
        // (fields) are dropped after this, once nothing on the QP refers to them.
        unsafe {
            rdma_disconnect(self.id.as_ptr());
            rdma_destroy_qp(self.id.as_ptr());
            let rc = rdma_destroy_id(self.id.as_ptr());
            if rc != 0 {
                eprintln!("rdma_destroy_id: {}", io::Error::last_os_error());
            }
        }
        let _ = &self.channel;
    }
}

/// Destroys an id on early return.
struct IdGuard(Option<NonNull<rdma_cm_id>>);

impl IdGuard {
    fn take(mut self) -> NonNull<rdma_cm_id> {
        self.0.take().expect("taken once")
    }
}

impl Drop for IdGuard {
    fn drop(&mut self) {
        if let Some(id) = self.0.take() {
            // SAFETY: an id we created and did not hand on.
            unsafe { rdma_destroy_id(id.as_ptr()) };
        }
    }
}

/// A listening rdma_cm id.
pub struct Listener {
    id: NonNull<rdma_cm_id>,
    channel: Arc<EventChannel>,
}

// SAFETY: used from one accepting thread at a time (`&mut self` to accept).
unsafe impl Send for Listener {}

/// A connection request, to accept or reject.
pub struct Incoming<'a> {
    id: Option<NonNull<rdma_cm_id>>,
    pub private_data: Vec<u8>,
    listener: &'a Listener,
}

impl Listener {
    pub fn bind(addr: SocketAddr) -> Result<Self, RdmaError> {
        let channel = EventChannel::new()?;
        let mut raw: *mut rdma_cm_id = ptr::null_mut();
        // SAFETY: as in Connection::connect.
        check("rdma_create_id", unsafe {
            rdma_create_id(channel.raw.as_ptr(), &mut raw, ptr::null_mut(), rdma_port_space::RDMA_PS_TCP)
        })?;
        let id = NonNull::new(raw).ok_or_else(|| os("rdma_create_id"))?;
        let guard = IdGuard(Some(id));
        let (mut ss, _) = sockaddr_of(&addr);
        // SAFETY: id live, address valid for the call.
        check("rdma_bind_addr", unsafe {
            rdma_bind_addr(id.as_ptr(), (&mut ss as *mut libc::sockaddr_storage).cast())
        })?;
        // SAFETY: id bound.
        check("rdma_listen", unsafe { rdma_listen(id.as_ptr(), 16) })?;
        Ok(Listener { id: guard.take(), channel })
    }

    /// Waits for the next connection request.
    pub fn next_request(&mut self, timeout: Duration) -> Result<Incoming<'_>, RdmaError> {
        let ev = self.channel.next("rdma_get_request", timeout)?.expect(
            "rdma_get_request",
            rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST,
            "CONNECT_REQUEST",
        )?;
        let id = NonNull::new(ev.id()).ok_or_else(|| os("connect request without id"))?;
        Ok(Incoming { id: Some(id), private_data: ev.private_data(), listener: self })
    }
}

impl Incoming<'_> {
    /// Accepts: sets up the QP and waits until established; the connection then gets an
    /// event channel of its own.
    pub fn accept(mut self, depth: Depth, timeout: Duration) -> Result<Connection, RdmaError> {
        let id = self.id.take().expect("taken once");
        let conn = Connection::setup(id, self.listener.channel.clone(), depth)?;
        // SAFETY: all-zero is a valid rdma_conn_param.
        let mut param: rdma_conn_param = unsafe { std::mem::zeroed() };
        param.initiator_depth = 16;
        param.responder_resources = 16;
        param.rnr_retry_count = 7;
        // SAFETY: the id has a QP; `param` outlives the call.
        check("rdma_accept", unsafe { rdma_accept(conn.id.as_ptr(), &mut param) })?;
        conn.channel.next("rdma_accept", timeout)?.expect(
            "rdma_accept",
            rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED,
            "ESTABLISHED",
        )?;
        // Later events of this connection (disconnect) go to a channel of its own, not the
        // listener's.
        let mut conn = conn;
        let own = EventChannel::new()?;
        // SAFETY: both the id and the new channel are live.
        check("rdma_migrate_id", unsafe { rdma_migrate_id(conn.id.as_ptr(), own.raw.as_ptr()) })?;
        conn.channel = own;
        Ok(conn)
    }

    /// Rejects with a reason the peer sees.
    pub fn reject(mut self, reason: &str) {
        if let Some(id) = self.id.take() {
            let r = &reason.as_bytes()[..reason.len().min(PRIVATE_DATA_MAX)];
            // SAFETY: a connect-request id; the reason outlives the call.
            unsafe {
                rdma_reject(id.as_ptr(), r.as_ptr().cast(), u8::try_from(r.len()).unwrap_or(0));
                rdma_destroy_id(id.as_ptr());
            }
        }
    }
}

impl Drop for Incoming<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            // SAFETY: an unanswered request: reject and destroy it once.
            unsafe {
                rdma_reject(id.as_ptr(), ptr::null(), 0);
                rdma_destroy_id(id.as_ptr());
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // SAFETY: the listening id, destroyed once, before its channel (an Arc field).
        let rc = unsafe { rdma_destroy_id(self.id.as_ptr()) };
        if rc != 0 {
            eprintln!("rdma_destroy_id: {}", io::Error::last_os_error());
        }
    }
}
