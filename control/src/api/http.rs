//! The control API's HTTP server: hyper (HTTP/1.1) on a small tokio runtime of its own,
//! serving TLS itself (tokio-rustls) where the node has a certificate.
//!
//! - **Bounds.** At most [`Limits::connections`] connections are served at once; as many
//!   again are answered `503` (the bound, and to retry) and closed, and past those a
//!   connection is closed at accept. At most [`Limits::requests`] requests are worked on at
//!   once; a request waits up to [`Limits::request_wait`] for its turn, then is answered `503`.
//!   Followed event streams are bounded by the event log ([`crate::events::FOLLOWERS_MAX`]).
//! - **Slow clients.** A request's head must arrive within [`Limits::header_timeout`] (an
//!   idle kept-alive connection is closed after as long), its body within
//!   [`Limits::body_timeout`] (else `408`), and a client that stops reading its answer is
//!   dropped once a write has waited [`Limits::write_timeout`]. Bodies above
//!   [`super::BODY_MAX`] bytes are refused (`413`) without being read whole.
//! - **Callers.** Each request carries its [`Caller`]: the address it came from, and with
//!   `--ctl-client-ca`, the name of the operator certificate it presented. Logs and the
//!   events a request causes name it.
//! - **Plain HTTP to a TLS node.** A client that speaks plain HTTP to a node serving TLS
//!   gets a plain `400` that says to use https, not a TLS alert it cannot read.
//!
//! The routes themselves are the [`Api`]'s: they run on the runtime's blocking threads, as
//! they call into the node, which may block (a failover, a CP).

use std::convert::Infallible;
use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

use super::BODY_MAX;

/// How many requests and connections the server takes, and how long it waits on a client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connections: usize,
    pub requests: usize,
    /// How long a request waits for one of `requests` before its `503`.
    pub request_wait: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub write_timeout: Duration,
}

/// The node's limits.
pub const LIMITS: Limits = Limits {
    connections: 128,
    requests: 32,
    request_wait: Duration::from_secs(2),
    header_timeout: Duration::from_secs(10),
    body_timeout: Duration::from_secs(30),
    write_timeout: Duration::from_secs(30),
};

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a followed stream read from its source at once.
const STREAM_CHUNK: usize = 16 << 10;

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub addr: SocketAddr,
    /// The first name of the operator certificate the caller presented, verified against
    /// `--ctl-client-ca`.
    pub operator: Option<String>,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.operator {
            Some(name) => write!(f, "{} (operator {name})", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// A request, read whole (its body at most [`BODY_MAX`] bytes).
#[derive(Debug)]
pub struct ApiRequest {
    pub method: Method,
    /// The path and query, as sent.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub caller: Caller,
}

/// An answer.
pub enum Reply {
    /// A whole answer.
    Full { status: u16, content_type: &'static str, body: Vec<u8>, headers: Vec<(&'static str, String)> },
    /// An answer that goes on as long as `source` gives bytes (a followed event stream),
    /// each piece sent as it comes. A source blocks until it has something; the client
    /// going away ends it at its next piece.
    Stream { content_type: &'static str, source: Box<dyn Read + Send> },
}

impl Reply {
    /// `{"error": message}` with `status`.
    pub fn error(status: u16, message: &str) -> Reply {
        Reply::Full { status, content_type: "application/json", body: error_body(message), headers: Vec::new() }
    }
}

/// What answers the requests.
pub trait Api: Send + Sync + 'static {
    fn handle(&self, request: ApiRequest) -> Reply;
}

/// A kind of log line said at most once per `every`; the lines left unsaid in between are
/// counted in the next one.
struct RateLimited {
    every: Duration,
    state: parking_lot::Mutex<(Option<Instant>, u64)>,
}

impl RateLimited {
    fn every(every: Duration) -> RateLimited {
        RateLimited { every, state: parking_lot::Mutex::new((None, 0)) }
    }

    /// Whether a line is due now: if so, what to add to it about those left unsaid.
    fn due(&self) -> Option<String> {
        let mut g = self.state.lock();
        if g.0.is_some_and(|t| t.elapsed() < self.every) {
            g.1 += 1;
            return None;
        }
        g.0 = Some(Instant::now());
        let unsaid = std::mem::take(&mut g.1);
        Some(if unsaid > 0 { format!(" ({unsaid} more since the last such line)") } else { String::new() })
    }
}

/// The server's shared state: its bounds.
struct Shared {
    limits: Limits,
    /// TLS handshakes that failed, and connections closed at accept: anyone can cause
    /// them, so they are logged sparingly.
    handshakes_failed: RateLimited,
    closed_at_accept: RateLimited,
    connections: Arc<Semaphore>,
    /// Connections past the bound that are answered `503`.
    overflow: Arc<Semaphore>,
    requests: Arc<Semaphore>,
    api: Arc<dyn Api>,
}

impl Shared {
    fn new(api: Arc<dyn Api>, limits: Limits) -> Arc<Shared> {
        Arc::new(Shared {
            limits,
            connections: Arc::new(Semaphore::new(limits.connections)),
            overflow: Arc::new(Semaphore::new(limits.connections)),
            requests: Arc::new(Semaphore::new(limits.requests)),
            api,
            handshakes_failed: RateLimited::every(Duration::from_secs(1)),
            closed_at_accept: RateLimited::every(Duration::from_secs(10)),
        })
    }
}

/// How a connection is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Serve,
    /// Past the connection bound: each request answered `503`, then closed.
    Busy,
    /// Plain HTTP on a TLS port: answered `400`, then closed.
    PlainOnTls,
}

/// The tokio runtime the API runs on: two workers for the connections, and blocking
/// threads for the requests and streams at work.
pub fn runtime(limits: &Limits) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(limits.requests + crate::events::FOLLOWERS_MAX + 4)
        .thread_name("nvm-api")
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| anyhow!("control API runtime: {e}"))
}

/// Serves `api` on `listener` until the process ends: over TLS with `tls` (its client
/// certificates, where it asks for them, name the caller's operator identity).
pub fn serve(
    listener: std::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    api: Arc<dyn Api>,
    limits: Limits,
) -> Result<()> {
    runtime(&limits)?.block_on(serve_async(listener, tls, api, limits))
}

/// As [`serve`], on the caller's runtime.
pub async fn serve_async(
    listener: std::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    api: Arc<dyn Api>,
    limits: Limits,
) -> Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let shared = Shared::new(api, limits);
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, mostly: wait for some to close.
                tracing::warn!("control: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (mode, permit) = match shared.connections.clone().try_acquire_owned() {
            Ok(p) => (Mode::Serve, p),
            Err(_) => match shared.overflow.clone().try_acquire_owned() {
                Ok(p) => (Mode::Busy, p),
                Err(_) => {
                    if let Some(unsaid) = shared.closed_at_accept.due() {
                        tracing::warn!(
                            "control: {addr}: closed at accept, {} connections open already{unsaid}",
                            2 * limits.connections
                        );
                    }
                    continue;
                }
            },
        };
        let (shared, acceptor) = (shared.clone(), acceptor.clone());
        tokio::spawn(async move {
            connection(tcp, addr, acceptor, mode, &shared).await;
            drop(permit);
        });
    }
}

/// Serves one connection already accepted (`io`, from `caller`), as [`serve_async`] serves
/// each of its own: for a front that accepts connections itself, and for the fuzz target.
pub async fn serve_stream<I: AsyncRead + AsyncWrite + Send + 'static>(
    io: I,
    caller: Caller,
    api: Arc<dyn Api>,
    limits: Limits,
) {
    serve_io(io, caller, Mode::Serve, &Shared::new(api, limits)).await;
}

/// Whether the first bytes of a connection are a plain HTTP request line.
fn looks_like_http(head: &[u8]) -> bool {
    [&b"GET "[..], b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC"].iter().any(|m| head.starts_with(m))
}

async fn connection(
    tcp: TcpStream,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mode: Mode,
    shared: &Arc<Shared>,
) {
    let _ = tcp.set_nodelay(true);
    let Some(acceptor) = tls else {
        return serve_io(tcp, Caller { addr, operator: None }, mode, shared).await;
    };
    let mut head = [0u8; 4];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut head)).await {
        Ok(Ok(n)) if n == head.len() && looks_like_http(&head) => {
            return serve_io(tcp, Caller { addr, operator: None }, Mode::PlainOnTls, shared).await;
        }
        Ok(Ok(_)) => {}
        Ok(Err(_)) | Err(_) => return,
    }
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            if let Some(unsaid) = shared.handshakes_failed.due() {
                tracing::info!("control: {addr}: TLS handshake: {e}{unsaid}");
            }
            return;
        }
        Err(_) => {
            if let Some(unsaid) = shared.handshakes_failed.due() {
                tracing::info!("control: {addr}: no TLS handshake within {HANDSHAKE_TIMEOUT:?}{unsaid}");
            }
            return;
        }
    };
    let operator = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| nvmirror_dataplane::transport::tls::certificate_names(c).into_iter().next());
    serve_io(stream, Caller { addr, operator }, mode, shared).await;
}

async fn serve_io<I: AsyncRead + AsyncWrite + Send + 'static>(io: I, caller: Caller, mode: Mode, shared: &Arc<Shared>) {
    let mut io = tokio_io_timeout::TimeoutStream::new(io);
    io.set_write_timeout(Some(shared.limits.write_timeout));
    let io = TokioIo::new(Box::pin(io));
    let addr = caller.addr;
    let caller = Arc::new(caller);
    let service = {
        let shared = shared.clone();
        hyper::service::service_fn(move |request| {
            let (shared, caller) = (shared.clone(), caller.clone());
            async move { Ok::<_, Infallible>(answer(request, mode, &shared, &caller).await) }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Half-closed: a client may end its sending side after its request and still read the
    // answer.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_timeout)
        .keep_alive(mode == Mode::Serve)
        .half_close(true);
    if let Err(e) = builder.serve_connection(io, service).await {
        // A client gone, or a head that did not arrive in time: the connection's own end.
        tracing::debug!("control: {addr}: {e}");
    }
}

/// An answer's body: whole, or the pieces of a stream as they come.
pub enum ApiBody {
    Full(Full<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ApiBody::Full(f) => Pin::new(f).poll_frame(cx),
            ApiBody::Stream(rx) => rx.poll_recv(cx).map(|piece| piece.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ApiBody::Full(f) => f.is_end_stream(),
            ApiBody::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ApiBody::Full(f) => f.size_hint(),
            ApiBody::Stream(_) => SizeHint::default(),
        }
    }
}

fn whole(
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
    close: bool,
) -> Response<ApiBody> {
    let mut response = Response::new(ApiBody::Full(Full::new(Bytes::from(body))));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    if close {
        h.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// `{"error": message}` with `status`, and the connection closed after it.
fn refuse(status: u16, message: &str) -> Response<ApiBody> {
    whole(status, "application/json", error_body(message), Vec::new(), true)
}

fn error_body(message: &str) -> Vec<u8> {
    serde_json::json!({ "error": message }).to_string().into_bytes()
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    mode: Mode,
    shared: &Shared,
    caller: &Caller,
) -> Response<ApiBody> {
    let limits = &shared.limits;
    match mode {
        Mode::Serve => {}
        Mode::Busy => {
            return refuse(
                503,
                &format!("this node serves {} control connections already: retry later", limits.connections),
            )
        }
        Mode::PlainOnTls => {
            return refuse(400, "this node's control API speaks TLS only: use https (ctl --tls-ca CA.pem)");
        }
    }
    // The body first: a client that sends it slowly holds its connection, not one of the
    // requests the node works on.
    let (parts, body) = request.into_parts();
    let declared = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_MAX) {
        return refuse(413, &format!("body above {BODY_MAX} bytes"));
    }
    let limit = usize::try_from(BODY_MAX).unwrap_or(usize::MAX);
    let body = match tokio::time::timeout(limits.body_timeout, Limited::new(body, limit).collect()).await {
        Ok(Ok(b)) => b.to_bytes().to_vec(),
        Ok(Err(e)) if e.is::<LengthLimitError>() => return refuse(413, &format!("body above {BODY_MAX} bytes")),
        Ok(Err(e)) => return refuse(400, &format!("read body: {e}")),
        Err(_) => return refuse(408, &format!("the body did not arrive within {:?}", limits.body_timeout)),
    };
    let request = ApiRequest {
        method: parts.method,
        target: parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string()),
        headers: parts.headers,
        body,
        caller: caller.clone(),
    };
    let Ok(Ok(permit)) = tokio::time::timeout(limits.request_wait, shared.requests.clone().acquire_owned()).await
    else {
        return refuse(
            503,
            &format!("this node is working on {} control requests already: retry later", limits.requests),
        );
    };
    let api = shared.api.clone();
    // The request's place goes with its work: a client that leaves while its route runs
    // (which drops this future) does not free a place the route still takes.
    let reply = match tokio::task::spawn_blocking(move || {
        let _permit = permit;
        api.handle(request)
    })
    .await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("control: a request from {caller} failed: {e}");
            Reply::error(500, &format!("the request failed: {e}"))
        }
    };
    match reply {
        Reply::Full { status, content_type, body, headers } => whole(status, content_type, body, headers, false),
        Reply::Stream { content_type, mut source } => {
            let (tx, rx) = mpsc::channel::<Bytes>(4);
            // The source blocks: it is read on a blocking thread of its own, which ends at
            // the first piece the client is no longer there to take.
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; STREAM_CHUNK];
                loop {
                    let n = match source.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                        return;
                    }
                }
            });
            let mut response = Response::new(ApiBody::Stream(rx));
            let h = response.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpStream as StdTcp;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers `/slow` after 1.5 s, `/stream` with bytes for as long as they are taken, and
    /// anything else with what it saw of the request.
    struct Stub {
        streams_ended: Arc<AtomicUsize>,
    }

    struct Endless(Arc<AtomicUsize>);

    impl Read for Endless {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            out.fill(b'x');
            Ok(out.len())
        }
    }

    impl Drop for Endless {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Api for Stub {
        fn handle(&self, r: ApiRequest) -> Reply {
            match r.target.as_str() {
                "/slow" => std::thread::sleep(Duration::from_millis(1500)),
                "/stream" => {
                    return Reply::Stream {
                        content_type: "text/plain",
                        source: Box::new(Endless(self.streams_ended.clone())),
                    }
                }
                _ => {}
            }
            let seen = serde_json::json!({
                "addr": r.caller.addr.to_string(),
                "operator": r.caller.operator,
                "method": r.method.as_str(),
                "target": r.target,
                "body": r.body.len(),
            });
            Reply::Full {
                status: 200,
                content_type: "application/json",
                body: seen.to_string().into_bytes(),
                headers: Vec::new(),
            }
        }
    }

    const QUICK: Limits = Limits {
        connections: 3,
        requests: 1,
        request_wait: Duration::from_millis(300),
        header_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_millis(500),
        write_timeout: Duration::from_millis(500),
    };

    /// A server with `limits` (and `tls`) on a loopback port of its own, and the count of
    /// its `/stream` sources dropped.
    fn start(limits: Limits, tls: Option<Arc<rustls::ServerConfig>>) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let ended = Arc::new(AtomicUsize::new(0));
        let api = Arc::new(Stub { streams_ended: ended.clone() });
        std::thread::spawn(move || serve(listener, tls, api, limits));
        (addr, ended)
    }

    /// Sends `request` and reads the answer until the server closes.
    fn exchange<S: Read + Write>(mut s: S, request: &[u8]) -> String {
        s.write_all(request).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn get(addr: SocketAddr, path: &str) -> String {
        let s = StdTcp::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        exchange(s, format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
    }

    /// Whether the server closes `s` within `within` without a byte.
    fn closed_silently(mut s: &StdTcp, within: Duration) -> bool {
        s.set_read_timeout(Some(within)).unwrap();
        let mut b = [0u8; 64];
        matches!(s.read(&mut b), Ok(0))
            || matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    }

    #[test]
    fn connections_past_the_bound_are_told_503_then_closed_at_accept_and_idle_ones_time_out() {
        let (addr, _) = start(QUICK, None);
        let idle: Vec<StdTcp> = (0..QUICK.connections).map(|_| StdTcp::connect(addr).unwrap()).collect();
        let over: Vec<StdTcp> = (0..QUICK.connections).map(|_| StdTcp::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200));
        let past = StdTcp::connect(addr).unwrap();
        assert!(
            closed_silently(&past, Duration::from_secs(5)),
            "a connection past twice the bound is closed at accept"
        );
        let busy = exchange(&over[0], b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
        assert!(busy.contains("this node serves 3 control connections already: retry later"), "{busy}");
        assert!(busy.to_ascii_lowercase().contains("connection: close"), "{busy}");
        // Idle connections are closed once the head does not come in time, and make room.
        for s in &idle {
            assert!(closed_silently(s, Duration::from_secs(5)), "an idle connection outlived the head timeout");
        }
        drop(over);
        let ok = get(addr, "/v1/status");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    }

    #[test]
    fn requests_past_the_bound_wait_then_are_told_503() {
        let (addr, _) = start(QUICK, None);
        let slow = std::thread::spawn(move || get(addr, "/slow"));
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let busy = get(addr, "/v1/status");
        assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
        assert!(busy.contains("this node is working on 1 control requests already"), "{busy}");
        assert!(t.elapsed() >= QUICK.request_wait, "answered 503 before waiting its turn: {:?}", t.elapsed());
        assert!(slow.join().unwrap().starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/v1/status").starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn a_slow_body_holds_its_connection_not_a_request_place() {
        let (addr, _) = start(QUICK, None);
        let mut slow = StdTcp::connect(addr).unwrap();
        slow.write_all(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let beside = get(addr, "/v1/status");
        assert!(beside.starts_with("HTTP/1.1 200"), "a body on its way took the only request place: {beside}");
        drop(slow);
    }

    #[test]
    fn a_client_that_ends_its_sending_side_still_gets_its_answer() {
        let (addr, _) = start(QUICK, None);
        let mut s = StdTcp::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /v1/node HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let answer = exchange(&s, b"");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    }

    #[test]
    fn bodies_over_the_bound_or_late_are_refused() {
        let (addr, _) = start(QUICK, None);
        let connect = || {
            let s = StdTcp::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        };
        let declared = exchange(
            connect(),
            format!("POST /v1/volumes HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", BODY_MAX + 1).as_bytes(),
        );
        assert!(declared.starts_with("HTTP/1.1 413"), "{declared}");
        // Chunked, with no length declared: refused once past the bound, not read whole.
        let mut s = connect();
        s.write_all(b"POST /v1/volumes HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        let chunk = vec![b'a'; 16 << 10];
        for _ in 0..(BODY_MAX / (16 << 10) + 2) {
            if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).is_err()
                || s.write_all(&chunk).is_err()
                || s.write_all(b"\r\n").is_err()
            {
                break;
            }
        }
        let chunked = exchange(s, b"");
        assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
        let late = exchange(connect(), b"POST /v1/volumes HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{}");
        assert!(late.starts_with("HTTP/1.1 408"), "{late}");
        let fine =
            exchange(connect(), b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
        assert!(fine.starts_with("HTTP/1.1 200") && fine.contains(r#""body":2"#), "{fine}");
    }

    #[test]
    fn a_stream_flows_and_a_client_that_stops_reading_it_is_dropped() {
        let (addr, ended) = start(QUICK, None);
        let mut s = StdTcp::connect(addr).unwrap();
        s.write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("xxxx") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(seen.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&seen));
        // Then it stops reading: the server's writes wait, and the stream is dropped after
        // the write timeout (once the socket buffers are full).
        let t = Instant::now();
        while ended.load(Ordering::SeqCst) == 0 {
            assert!(t.elapsed() < Duration::from_secs(20), "a stream nobody reads was kept");
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(s);
    }

    /// A CA and a certificate it signed (for `sans`, with common name `cn`): (CA, chain,
    /// key) as DER.
    fn issue(
        sans: &[&str],
        cn: &str,
    ) -> (rustls_pki_types::CertificateDer<'static>, rustls_pki_types::CertificateDer<'static>, Vec<u8>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        (ca.der().clone(), cert.der().clone(), key.serialize_der())
    }

    fn tls_client(
        server_ca: &rustls_pki_types::CertificateDer<'static>,
        cert: Option<(&rustls_pki_types::CertificateDer<'static>, &[u8])>,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(server_ca.clone()).unwrap();
        let b = rustls::ClientConfig::builder_with_provider(nvmirror_dataplane::transport::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        Arc::new(match cert {
            None => b.with_no_client_auth(),
            Some((c, k)) => b
                .with_client_auth_cert(vec![c.clone()], rustls_pki_types::PrivateKeyDer::Pkcs8(k.to_vec().into()))
                .unwrap(),
        })
    }

    fn over_tls(addr: SocketAddr, client: Arc<rustls::ClientConfig>) -> (String, SocketAddr) {
        let tcp = StdTcp::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let local = tcp.local_addr().unwrap();
        let conn = rustls::ClientConnection::new(client, "127.0.0.1".try_into().unwrap()).unwrap();
        let answer = exchange(
            rustls::StreamOwned::new(conn, tcp),
            b"GET /v1/node HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        (answer, local)
    }

    #[test]
    fn tls_names_each_callers_address_and_operator_and_plain_http_is_told_to_use_https() {
        let dir = tempfile::tempdir().unwrap();
        let (server_ca, server_cert, server_key) = issue(&["127.0.0.1"], "node");
        let (operator_ca, alice, alice_key) = issue(&["alice.ops.example"], "alice");
        let (_, mallory, mallory_key) = issue(&["mallory"], "mallory");
        let pem = |tag: &str, der: &[u8]| {
            let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der);
            let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
            format!("-----BEGIN {tag}-----\n{}\n-----END {tag}-----\n", lines.join("\n"))
        };
        let (cert_file, key_file) = (dir.path().join("node.pem"), dir.path().join("node.key"));
        std::fs::write(&cert_file, pem("CERTIFICATE", &server_cert)).unwrap();
        std::fs::write(&key_file, pem("PRIVATE KEY", &server_key)).unwrap();
        let tls = nvmirror_dataplane::transport::tls::TlsConfig::from_files(&cert_file, &key_file, None).unwrap();
        let (addr, _) = start(LIMITS, Some(tls.api_server(Some(&[operator_ca])).unwrap()));

        let (answer, local) = over_tls(addr, tls_client(&server_ca, Some((&alice, &alice_key))));
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let body: serde_json::Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["operator"], "alice.ops.example", "{body}");
        assert_eq!(body["addr"], local.to_string(), "{body}");

        let (answer, _) = over_tls(addr, tls_client(&server_ca, None));
        assert!(answer.starts_with("HTTP/1.1 200") && answer.contains(r#""operator":null"#), "{answer}");

        // A certificate another CA signed: no handshake, no answer.
        let (answer, _) = over_tls(addr, tls_client(&server_ca, Some((&mallory, &mallory_key))));
        assert!(answer.is_empty(), "{answer}");

        let plain = get(addr, "/v1/node");
        assert!(plain.starts_with("HTTP/1.1 400"), "{plain}");
        assert!(plain.contains("this node's control API speaks TLS only: use https"), "{plain}");
    }
}
