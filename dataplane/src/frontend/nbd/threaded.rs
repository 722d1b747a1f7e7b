//! Connections served on threads of their own (a mirror's read-only export, and a session
//! given back by a poller): a reader, a bounded window of requests in flight, a writer.

use super::*;

/// Serves a connection a reactor gave back on threads of its own (see
/// [`Adopted::serve_on_threads`]).
pub(super) fn serve_adopted_on_threads(adopted: Adopted) {
    let peer = adopted.peer;
    let Some(export) = adopted.export.upgrade() else {
        tracing::warn!("nbd: {peer}: the export it was served from is gone; closing");
        let _ = adopted.stream.shutdown(Shutdown::Both);
        return;
    };
    let spawned = thread::Builder::new().name(format!("nbd-{peer}")).spawn(move || {
        if let Err(err) = transmit_adopted(adopted, export.as_ref()) {
            tracing::warn!("nbd: {peer}: {}", ErrorChain(&err));
        }
    });
    if let Err(err) = spawned {
        tracing::warn!("nbd: {peer}: cannot start a connection thread: {err}");
    }
}

/// Runs a connection's transmission phase on this thread and a writer thread, in plain
/// text or TLS as its handshake left it, then closes it.
pub(super) fn transmit_adopted(adopted: Adopted, export: &dyn Export) -> Result<(), ConnectionError> {
    let Adopted { stream, tls, peer, read_ahead, options, .. } = adopted;
    let run = || -> Result<(), ConnectionError> {
        stream.set_nonblocking(false).map_err(ConnectionError::Socket)?;
        stream.set_write_timeout(Some(REPLY_WRITE_TIMEOUT)).map_err(ConnectionError::Socket)?;
        let handle = stream.try_clone().map_err(ConnectionError::Socket)?;
        match tls {
            None => {
                let mut reader = BufReader::with_capacity(
                    READ_BUFFER_BYTES,
                    io::Cursor::new(read_ahead).chain(stream.try_clone().map_err(ConnectionError::Socket)?),
                );
                transmit(&mut reader, ReplyOut::Plain(handle), export, peer, options)
            }
            Some(conn) => {
                let shared = tls::Shared::new(*conn, handle);
                let mut reader = BufReader::with_capacity(
                    READ_BUFFER_BYTES,
                    io::Cursor::new(read_ahead).chain(tls::SharedReader(Arc::clone(&shared))),
                );
                let result = transmit(&mut reader, ReplyOut::Tls(Arc::clone(&shared)), export, peer, options);
                shared.close_notify();
                result
            }
        }
    };
    let result = run();
    let _ = stream.shutdown(Shutdown::Both);
    result
}

/// Where a connection served on threads writes its replies.
pub(super) enum ReplyOut {
    Plain(TcpStream),
    Tls(Arc<tls::Shared>),
}

impl ReplyOut {
    fn write_all(&self, data: &[u8]) -> io::Result<()> {
        match self {
            ReplyOut::Plain(stream) => (&*stream).write_all(data),
            ReplyOut::Tls(shared) => shared.write_all(data),
        }
    }

    /// Writes `first` then `second`.
    fn write_pair(&self, first: &[u8], second: &[u8]) -> io::Result<()> {
        match self {
            ReplyOut::Plain(stream) => write_pair(stream, first, second),
            ReplyOut::Tls(shared) => shared.write_all(first).and_then(|()| shared.write_all(second)),
        }
    }

    fn shutdown(&self) {
        match self {
            ReplyOut::Plain(stream) => {
                let _ = stream.shutdown(Shutdown::Both);
            }
            ReplyOut::Tls(shared) => shared.shutdown(),
        }
    }
}

/// What the writer needs to answer one request: the client's cookie, and for a read the
/// exact length of data the reply must carry.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) cookie: u64,
    pub(super) read_len: Option<u32>,
    /// Payload bytes counted against [`IN_FLIGHT_BYTES_MAX`].
    pub(super) payload_bytes: u64,
    /// What the reply is for, where a structured reply differs from a simple one.
    pub(super) kind: ReplyKind,
    pub(super) offset: u64,
}

/// The commands whose replies are structured once structured replies are negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReplyKind {
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
pub(super) struct InFlight {
    pub(super) slots: Mutex<Slots>,
    pub(super) freed: Condvar,
}

pub(super) struct Slots {
    pub(super) pending: Vec<Option<Pending>>,
    /// Slots whose `pending` entry is `None`.
    pub(super) free: Vec<usize>,
    /// Sum of `payload_bytes` over the occupied slots; never above `IN_FLIGHT_BYTES_MAX`.
    pub(super) payload_bytes: u64,
}

impl InFlight {
    pub(super) fn new() -> Self {
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
    pub(super) fn acquire(&self, pending: Pending) -> u64 {
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
    pub(super) fn release(&self, slot: u64) -> Option<Pending> {
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
pub(super) fn transmit(
    reader: &mut impl Read,
    out: ReplyOut,
    export: &dyn Export,
    peer: SocketAddr,
    options: Options,
) -> Result<(), ConnectionError> {
    let in_flight = Arc::new(InFlight::new());
    // Never full: there is at most one reply per occupied slot.
    let (reply_tx, reply_rx) = crossbeam_channel::bounded(IN_FLIGHT_MAX);
    let writer = thread::Builder::new()
        .name(format!("nbd-replies-{peer}"))
        .spawn({
            let in_flight = Arc::clone(&in_flight);
            move || write_replies(&out, &reply_rx, &in_flight, peer, options)
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

/// The writer thread: writes a simple reply for each completion, gathering replies while
/// more are waiting and flushing as soon as none is.
fn write_replies(
    out: &ReplyOut,
    replies: &Receiver<IoReply>,
    in_flight: &InFlight,
    peer: SocketAddr,
    options: Options,
) -> Result<(), ConnectionError> {
    let mut replies_out = ReplyStream {
        out,
        buffer: Vec::with_capacity(REPLY_BUFFER_BYTES),
        failed: None,
        structured: options.structured,
    };
    while let Ok(first) = replies.recv() {
        let mut next = Some(first);
        while let Some(reply) = next {
            replies_out.push(reply, in_flight, peer);
            next = replies.try_recv().ok();
        }
        replies_out.flush();
    }
    match replies_out.failed {
        Some(err) => Err(ConnectionError::WriteReply(err)),
        None => Ok(()),
    }
}

/// The reply side of a connection's socket, with its gathering buffer.
struct ReplyStream<'a> {
    pub(super) out: &'a ReplyOut,
    pub(super) buffer: Vec<u8>,
    /// The first write error. Once set, replies are dropped (their slots still freed) so
    /// that the reader and the export can finish.
    pub(super) failed: Option<io::Error>,
    /// Reads (and block status queries) are answered with structured replies.
    pub(super) structured: bool,
}

impl ReplyStream<'_> {
    pub(super) fn push(&mut self, reply: IoReply, in_flight: &InFlight, peer: SocketAddr) {
        let Some(pending) = in_flight.release(reply.cookie) else {
            tracing::warn!("nbd: {peer}: reply for slot {} that is not in flight, dropped", reply.cookie);
            return;
        };
        let (error, data) = match (reply.result, pending.read_len) {
            (Ok(Some(data)), Some(len)) if data.len() == len as usize => (0, data),
            (Ok(data), Some(len)) => {
                tracing::warn!(
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
            let result = self.out.write_pair(&self.buffer, &data);
            self.buffer.clear();
            self.check(result);
        }
    }

    pub(super) fn flush(&mut self) {
        if self.failed.is_some() || self.buffer.is_empty() {
            self.buffer.clear();
            return;
        }
        let result = self.out.write_all(&self.buffer);
        self.buffer.clear();
        self.check(result);
    }

    pub(super) fn check(&mut self, result: io::Result<()>) {
        if let Err(err) = result {
            // Wake the reader, which may be blocked reading a client that is gone.
            self.out.shutdown();
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
