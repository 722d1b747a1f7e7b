//! The node's HTTP/JSON control API, and the client `nvmirror ctl` uses.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | /v1/node | | name and addresses, and whether it authenticates peers |
//! | GET | /v1/call-challenge | | `{"nonce": HEX}` for one signed node-to-node request (nodes with a secret) |
//! | GET | /v1/status | | [`crate::node::NodeStatus`] |
//! | GET | /metrics | | Prometheus text exposition ([`crate::metrics`]) |
//! | GET | /v1/events?since=ID&follow=1 | | JSON lines of [`crate::events::Event`]; with `follow`, kept open for new ones |
//! | POST | /v1/volumes | [`CreateVolume`] | the volume record |
//! | POST | /v1/volumes/VOL/mirror | [`MirrorRequest`] | `{}` once the baseline has started |
//! | POST | /v1/volumes/VOL/cp | | `{"cp": n}` once durable on both sites |
//! | POST | /v1/volumes/VOL/failover | | the failover report |
//! | POST | /v1/volumes/VOL/resync | [`ResyncRequest`] | on a node that lost VOL to a failover: it becomes the new primary's mirror, brought level by a delta resync |
//! | POST | /v1/volumes/VOL/switchover | | on the primary: a planned exchange of roles with its mirror ([`crate::node::SwitchoverReport`]) |
//! | POST | /v1/volumes/VOL/takeover | [`TakeoverRequest`] | node to node, the mirror's half of a switchover |
//! | GET | /v1/volumes/VOL/storage | | the RAID-4 status of the volume (or mirror) VOL |
//! | POST | /v1/volumes/VOL/scrub | [`ScrubRequest`] | `{}` once the scrub has started |
//! | POST | /v1/volumes/VOL/replace-disk | [`ReplaceDisk`] | `{"member": i}` once the rebuild has started |
//!
//! Errors are `{"error": "..."}` with a 4xx or 5xx status. Bodies above [`BODY_MAX`]
//! bytes are refused before they are read whole.
//!
//! **Node to node.** Nodes call each other's API to pair (`mirror --to`: `GET /v1/node`),
//! to fail back (`resync --from`: `GET /v1/node`, `GET /v1/status`) and to switch over
//! (`GET /v1/node`, then `POST /v1/volumes/VOL/takeover`). With a secret (`--secret-file`):
//! - the caller's GETs carry a fresh nonce ([`CHALLENGE_HEADER`], 64 hex digits), and the
//!   answer counts only with [`PROOF_HEADER`], HMAC-SHA256(secret, "nvmirror-api" || nonce
//!   || body) over the exact body ([`Client::get_proven`]); a peer with a secret says so in
//!   `GET /v1/node` (`auth`), and a node without one refuses to pair with it;
//! - a node-to-node POST (`takeover`) is refused (401) unless it carries [`CALL_HEADER`]: a
//!   nonce the called node issued by `GET /v1/call-challenge` (good once, for
//!   [`CALL_NONCE_TTL`]) and HMAC-SHA256(secret, "nvmirror-call" || nonce || method || 0 ||
//!   path || 0 || body) ([`Client::post_signed`]).
//!
//! An operator's requests carry none of this and are answered as before, unless the node
//! runs with `--require-signed-ctl`: then every POST but `takeover` must carry
//! [`CALL_HEADER`] as node-to-node POSTs do (`ctl --secret-file` signs them, [`Client`]
//! with [`crate::tls::sign_operator_calls`]), or is refused with 401; a POST that carries
//! it is checked whatever the flag. Reads stay open. The replication handshake authenticates
//! both nodes again, whatever was paired.
//!
//! With `--tls-cert` the API is served over TLS only (the front of [`crate::tls`]), and a
//! node's calls to its peers, like `ctl --tls-ca`, speak https.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use nvmirror_dataplane::source::Policy;
use nvmirror_dataplane::storage::Engine;
use nvmirror_dataplane::transport::auth::{self, PeerSecret};

use crate::node::{CreateLayout, MirrorTarget, Node};
use crate::storage::storage_from_args;

pub const BODY_MAX: u64 = 64 * 1024;

/// A caller's nonce, asking the node to prove that it holds the pair's secret.
pub const CHALLENGE_HEADER: &str = "X-Nvmirror-Challenge";
/// The node's proof over its answer, for the nonce of [`CHALLENGE_HEADER`].
pub const PROOF_HEADER: &str = "X-Nvmirror-Proof";
/// A node-to-node request's nonce (issued by the called node) and the caller's proof,
/// hex, separated by a space.
pub const CALL_HEADER: &str = "X-Nvmirror-Call";
/// The largest answer [`Client::get_proven`] reads (a node's status with many volumes).
pub const PROVEN_ANSWER_MAX: u64 = 4 << 20;
/// How long a nonce of `GET /v1/call-challenge` stays good, and how many may be out at once
/// (the oldest is forgotten first).
pub const CALL_NONCE_TTL: Duration = Duration::from_secs(120);
pub const CALL_NONCES_MAX: usize = 64;

/// The nonces this node issued for node-to-node requests; each is good for one request.
#[derive(Default)]
pub struct CallNonces(parking_lot::Mutex<VecDeque<(auth::Nonce, Instant)>>);

impl CallNonces {
    pub fn issue(&self) -> Result<auth::Nonce, auth::AuthError> {
        let n = auth::fresh_nonce()?;
        let mut q = self.0.lock();
        q.retain(|(_, at)| at.elapsed() < CALL_NONCE_TTL);
        while q.len() >= CALL_NONCES_MAX {
            q.pop_front();
        }
        q.push_back((n, Instant::now()));
        Ok(n)
    }

    /// Whether `nonce` was issued here and is still good; it is used up either way.
    pub fn take(&self, nonce: &auth::Nonce) -> bool {
        let mut q = self.0.lock();
        match q.iter().position(|(n, _)| n == nonce) {
            Some(i) => q.remove(i).is_some_and(|(_, at)| at.elapsed() < CALL_NONCE_TTL),
            None => false,
        }
    }
}

/// Checks a node-to-node request where this node has a secret: the nonce is one it
/// issued, unused, and the proof covers this method, path and body.
fn check_call(
    node: &Node,
    request: &tiny_http::Request,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(), ApiError> {
    let Some(secret) = &node.cfg.secret else { return Ok(()) };
    let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "?".into());
    let why = match request.headers().iter().find(|h| h.field.equiv(CALL_HEADER)) {
        None => Some("it carries no proof (the caller has no --secret-file)"),
        Some(h) => match h.value.as_str().split_once(' ') {
            Some((n, p)) => match (auth::from_hex32(n), auth::from_hex32(p)) {
                (Some(n), Some(p)) => {
                    if !node.call_nonces.take(&n) {
                        Some("its nonce was not issued here, was used already, or is too old")
                    } else if !secret.verify_call(&n, method, path, body, &p) {
                        Some("its proof does not verify (the two nodes hold different secrets)")
                    } else {
                        None
                    }
                }
                _ => Some("its proof header is not two 64-digit hex strings"),
            },
            None => Some("its proof header is not two 64-digit hex strings"),
        },
    };
    match why {
        None => Ok(()),
        Some(why) => {
            eprintln!("control: refused {method} {path} from {peer}: {why}");
            node.events.push(
                "peer-refused",
                None,
                json!({ "peer": peer, "request": format!("{method} {path}"), "reason": why }),
            );
            Err(ApiError { status: 401, message: format!("node-to-node request refused: {why}") })
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub size: u64,
    /// Disks as `[ENGINE:]PATH`: one alone, or the data disks of a RAID-4 volume.
    #[serde(default)]
    pub disks: Vec<String>,
    #[serde(default)]
    pub parity: Option<String>,
    #[serde(default)]
    pub stripe_unit: Option<u64>,
    /// Data disks of a RAID-4 volume made of data-dir files (default: the node's).
    #[serde(default)]
    pub data_disks: Option<u32>,
    /// Engine of the data-dir files: pread or uring (default: the node's).
    #[serde(default)]
    pub engine: Option<String>,
    #[serde(default)]
    pub log_bytes: Option<u64>,
    /// Send CPs to the mirror by value instead of by reference.
    #[serde(default)]
    pub cp_by_value: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrubRequest {
    /// Bytes read per second at most.
    #[serde(default)]
    pub rate: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaceDisk {
    /// The member to replace: its index, path or `ENGINE:PATH`.
    pub old: String,
    /// The new disk, `[ENGINE:]PATH`: a new file or a device.
    pub new: String,
    /// Bytes rebuilt per second at most.
    #[serde(default)]
    pub rate: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorRequest {
    /// The peer's control address.
    pub to: String,
    #[serde(default = "default_transport")]
    pub transport: String,
    #[serde(default = "default_policy")]
    pub policy: String,
    /// Regions (first, count) the peer holds changed, to copy back with the volume's own
    /// changes: a failback resync.
    #[serde(default)]
    pub resync_ranges: Vec<(u64, u64)>,
    /// Bytes per second the baseline or resync sends at most.
    #[serde(default)]
    pub rate: Option<u64>,
}

/// Region runs a resync request may carry.
pub const RESYNC_RANGES_MAX: usize = 2048;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncRequest {
    /// The control address of the node that holds the volume now.
    pub from: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TakeoverRequest {
    /// The primary handing the volume over: its name, control and replication addresses.
    pub from: String,
    pub control: String,
    pub replication: String,
    /// The CP it drained at, and its next sequence number: the mirror must hold exactly that.
    pub cp: u64,
    pub next_seq: u64,
    pub policy: String,
}

fn default_transport() -> String {
    "tcp".into()
}
fn default_policy() -> String {
    "strict".into()
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub replication: String,
    pub nbd: String,
    pub control: String,
    /// The RDMA engine's rdma_cm address, where the node offers RDMA placement.
    #[serde(default)]
    pub rdma: Option<String>,
    /// The node authenticates its peers (it runs with `--secret-file`).
    #[serde(default)]
    pub auth: bool,
}

struct ApiError {
    status: u16,
    message: String,
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError { status: 409, message: format!("{e:#}") }
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError { status: 400, message: message.into() }
}

/// How long a write to an API client may block: a client that stops reading (an event
/// stream it no longer takes, or any answer) is dropped after this, instead of holding its
/// thread, and its event stream's place, for good.
pub const CLIENT_SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds the control API's listener. Its sockets time out sends after
/// [`CLIENT_SEND_TIMEOUT`]: set on the listener, the option is inherited by every
/// connection it accepts (Linux copies it at accept), which tiny_http gives no other way to
/// set.
pub fn control_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::AsRawFd;
    let listener = std::net::TcpListener::bind(addr)?;
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(CLIENT_SEND_TIMEOUT.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: 0,
    };
    // SAFETY: setsockopt on the listener's open fd, with a pointer to a timeval that lives
    // across the call and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            std::ptr::from_ref(&tv).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).expect("small"),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(listener)
}

/// Serves the API until the process ends, a thread per request. Threads: tiny_http's
/// accept thread hands each connection to a thread of its own, which parses requests; each
/// request is then answered on a thread of its own here. A request that blocks (a followed
/// event stream, a slow client) holds only its own thread, never the server's others; a
/// client that stops reading is dropped after [`CLIENT_SEND_TIMEOUT`], and event streams
/// are bounded ([`crate::events::FOLLOWERS_MAX`]).
pub fn serve(server: tiny_http::Server, node: Arc<Node>) {
    let server = Arc::new(server);
    for request in server.incoming_requests() {
        let node = node.clone();
        let _ = thread::Builder::new().name("nvm-api".into()).spawn(move || handle(request, &node));
    }
}

/// `GET /v1/events?since=ID[&follow=1]`: the events after `since` as JSON lines; with
/// `follow`, then new ones as they happen, on a response that stays open.
fn events(request: tiny_http::Request, node: &Node, url: &str) {
    let header =
        tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/x-ndjson"[..]).expect("static header");
    let mut since = 0u64;
    let mut follow = false;
    for kv in url.split_once('?').map(|(_, q)| q).unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "since" => match v.parse() {
                Ok(n) => since = n,
                Err(_) => return respond_error(request, 400, &format!("since={v:?} is not an event id")),
            },
            "follow" => match v {
                "" | "1" | "true" => follow = true,
                "0" | "false" => follow = false,
                _ => return respond_error(request, 400, &format!("follow={v:?}: 1, true, 0 or false")),
            },
            other => return respond_error(request, 400, &format!("unknown parameter {other:?}: since, follow")),
        }
    }
    if !follow {
        let mut body = String::new();
        for e in node.events.since(since) {
            body.push_str(&serde_json::to_string(&e).expect("serializable"));
            body.push('\n');
        }
        let _ = request.respond(tiny_http::Response::from_string(body).with_header(header));
        return;
    }
    let Some(stream) = node.events.follow(since) else {
        return respond_error(
            request,
            503,
            &format!("{} event streams are open already", crate::events::FOLLOWERS_MAX),
        );
    };
    // Written by hand on the connection, flushed line by line (tiny_http's chunked
    // encoder would hold small lines back), and delimited by closing: the stream ends
    // when the client goes away (a keepalive line every few seconds notices it).
    let mut stream = stream;
    let mut w = request.into_writer();
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";
    if w.write_all(head.as_bytes()).and_then(|()| w.flush()).is_err() {
        return;
    }
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(_) => return,
        };
        if w.write_all(&buf[..n]).and_then(|()| w.flush()).is_err() {
            return;
        }
    }
}

fn respond_error(request: tiny_http::Request, status: u16, message: &str) {
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]).expect("static header");
    let body = json!({ "error": message }).to_string();
    let _ = request.respond(tiny_http::Response::from_string(body).with_status_code(status).with_header(header));
}

fn read_body<T: DeserializeOwned>(request: &mut Incoming<'_>) -> Result<T, ApiError> {
    parse_body(&read_raw_body(request)?)
}

fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

/// A request whose body was read (at most [`BODY_MAX`] bytes) before it is routed, so
/// that a signature over it can be checked first ([`authorize`]).
struct Incoming<'a> {
    http: &'a mut tiny_http::Request,
    body: Vec<u8>,
}

impl std::ops::Deref for Incoming<'_> {
    type Target = tiny_http::Request;
    fn deref(&self) -> &tiny_http::Request {
        self.http
    }
}

/// The request's body (read once, before routing).
fn read_raw_body(request: &mut Incoming<'_>) -> Result<Vec<u8>, ApiError> {
    Ok(std::mem::take(&mut request.body))
}

/// Operator calls signed with the node's secret (`ctl --secret-file`), and the admin
/// calls a node started with `--require-signed-ctl` refuses unsigned: every POST but the
/// node-to-node `takeover`, which [`route`] checks itself. Reads stay open.
fn authorize(node: &Node, request: &Incoming<'_>, method: &tiny_http::Method, url: &str) -> Result<(), ApiError> {
    let path = url.split('?').next().unwrap_or("");
    if *method != tiny_http::Method::Post || path.ends_with("/takeover") {
        return Ok(());
    }
    if request.headers().iter().any(|h| h.field.equiv(CALL_HEADER)) {
        return check_call(node, request, "POST", path, &request.body);
    }
    if node.cfg.require_signed_ctl {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "?".into());
        let why = "this node requires signed admin calls (--require-signed-ctl): sign them with ctl --secret-file";
        eprintln!("control: refused POST {path} from {peer}: unsigned");
        node.events.push(
            "peer-refused",
            None,
            json!({ "peer": peer, "request": format!("POST {path}"), "reason": why }),
        );
        return Err(ApiError { status: 401, message: why.into() });
    }
    Ok(())
}

/// A request's body, at most [`BODY_MAX`] bytes.
fn read_http_body(request: &mut tiny_http::Request) -> Result<Vec<u8>, ApiError> {
    if request.body_length().is_some_and(|n| n as u64 > BODY_MAX) {
        return Err(ApiError { status: 413, message: format!("body above {BODY_MAX} bytes") });
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(BODY_MAX + 1)
        .read_to_end(&mut body)
        .map_err(|e| bad_request(format!("read body: {e}")))?;
    if body.len() as u64 > BODY_MAX {
        return Err(ApiError { status: 413, message: format!("body above {BODY_MAX} bytes") });
    }
    Ok(body)
}

fn handle(mut request: tiny_http::Request, node: &Node) {
    let method = request.method().clone();
    let url = request.url().to_string();
    if method == tiny_http::Method::Get && url.split('?').next() == Some("/metrics") {
        let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"text/plain; version=0.0.4"[..])
            .expect("static header");
        let body = crate::metrics::render(&node.status());
        let _ = request.respond(tiny_http::Response::from_string(body).with_header(header));
        return;
    }
    if method == tiny_http::Method::Get && url.split('?').next() == Some("/v1/events") {
        return events(request, node, &url);
    }
    let challenge = challenge_of(&request);
    let result = match &challenge {
        Err(e) => Err(bad_request(e.clone())),
        Ok(_) => read_http_body(&mut request).and_then(|body| {
            let mut incoming = Incoming { http: &mut request, body };
            authorize(node, &incoming, &method, &url)?;
            route(&mut incoming, node, &method, &url)
        }),
    };
    let (status, body) = match result {
        Ok(v) => (200, v),
        Err(e) => (e.status, json!({ "error": e.message })),
    };
    let body = body.to_string();
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]).expect("static header");
    let mut response = tiny_http::Response::from_string(body.clone()).with_status_code(status).with_header(header);
    if let (Ok(Some(nonce)), Some(secret)) = (challenge, &node.cfg.secret) {
        let proof = auth::to_hex(&secret.api_proof(&nonce, body.as_bytes()));
        response.add_header(
            tiny_http::Header::from_bytes(PROOF_HEADER.as_bytes(), proof.as_bytes()).expect("hex is a header value"),
        );
    }
    let _ = request.respond(response);
}

/// The nonce of a caller that asks this node to prove its secret, if it asks.
fn challenge_of(request: &tiny_http::Request) -> Result<Option<auth::Nonce>, String> {
    let Some(h) = request.headers().iter().find(|h| h.field.equiv(CHALLENGE_HEADER)) else {
        return Ok(None);
    };
    auth::from_hex32(h.value.as_str())
        .map(Some)
        .ok_or_else(|| format!("{CHALLENGE_HEADER} must be {} hex digits", 2 * auth::NONCE_BYTES))
}

fn route(request: &mut Incoming<'_>, node: &Node, method: &tiny_http::Method, url: &str) -> Result<Value, ApiError> {
    use tiny_http::Method::{Get, Post};
    let path: Vec<&str> = url.split('?').next().unwrap_or("").trim_matches('/').split('/').collect();
    match (method, path.as_slice()) {
        (Get, ["v1", "node"]) => Ok(serde_json::to_value(NodeInfo {
            name: node.cfg.name.clone(),
            replication: node.cfg.advertised_replication(),
            nbd: node.cfg.nbd.to_string(),
            control: node.cfg.control.to_string(),
            rdma: node.rdma_addr(),
            auth: node.cfg.secret.is_some(),
        })
        .expect("serializable")),
        (Get, ["v1", "call-challenge"]) => match &node.cfg.secret {
            None => Err(ApiError {
                status: 409,
                message: "this node has no secret (--secret-file): node-to-node requests to it are not signed".into(),
            }),
            Some(_) => {
                let n = node.call_nonces.issue().map_err(|e| ApiError { status: 500, message: e.to_string() })?;
                Ok(json!({ "nonce": auth::to_hex(&n) }))
            }
        },
        (Get, ["v1", "status"]) => Ok(serde_json::to_value(node.status()).expect("serializable")),
        (Post, ["v1", "volumes"]) => {
            let body: CreateVolume = read_body(request)?;
            let storage =
                storage_from_args(&body.disks, body.parity.as_deref()).map_err(|e| bad_request(e.to_string()))?;
            let stripe_unit = body
                .stripe_unit
                .map(u32::try_from)
                .transpose()
                .map_err(|_| bad_request("stripe unit too large (16M at most)"))?;
            let engine = match body.engine.as_deref() {
                None => None,
                Some("pread") => Some(Engine::Pread),
                Some("uring") => Some(Engine::Uring),
                Some(other) => {
                    return Err(bad_request(format!("unknown engine {other:?} for data-dir files: pread or uring")))
                }
            };
            let layout = CreateLayout { data_disks: body.data_disks, stripe_unit, engine };
            let log_bytes =
                body.log_bytes.map(usize::try_from).transpose().map_err(|_| bad_request("log size too large"))?;
            let rec = node.create_volume(&body.name, body.size, storage, layout, log_bytes, body.cp_by_value)?;
            Ok(serde_json::to_value(rec).expect("serializable"))
        }
        (Post, ["v1", "volumes", name, "mirror"]) => {
            let body: MirrorRequest = read_body(request)?;
            let rdma = match body.transport.as_str() {
                "tcp" => false,
                "rdma" if !nvmirror_dataplane::transport::RDMA_BUILT => {
                    return Err(bad_request(
                        "transport rdma is not available in this build (built without the rdma feature); use tcp",
                    ))
                }
                "rdma" => true,
                other => return Err(bad_request(format!("unknown transport {other:?}: tcp or rdma"))),
            };
            let policy = match body.policy.as_str() {
                "strict" => Policy::Strict,
                "sync" => Policy::Sync,
                other => return Err(bad_request(format!("unknown policy {other:?}: strict or sync"))),
            };
            if body.resync_ranges.len() > RESYNC_RANGES_MAX {
                return Err(bad_request(format!("more than {RESYNC_RANGES_MAX} region runs to resync")));
            }
            node.volume(name)?;
            let peer = Client::new(&body.to).peer_info(node.cfg.secret.as_ref()).map_err(|e| match e {
                PeerError::Unreachable(e) => ApiError { status: 502, message: format!("peer {}: {e:#}", body.to) },
                PeerError::Unauthenticated(why) => {
                    ApiError { status: 409, message: format!("peer {}: {why}", body.to) }
                }
            })?;
            let replication = if rdma {
                let Some(_) = &peer.rdma else {
                    return Err(ApiError {
                        status: 409,
                        message: format!(
                            "peer {} offers no RDMA engine (no RDMA device, or file-sync: or dax: log files; its log says which)",
                            peer.name
                        ),
                    });
                };
                format!("{}{}", nvmirror_dataplane::transport::RDMA_SCHEME, peer.replication)
            } else {
                peer.replication.clone()
            };
            let target = MirrorTarget { peer_name: peer.name, peer_control: body.to, replication };
            node.mirror_volume(name, target, policy, &body.resync_ranges, body.rate)?;
            Ok(json!({}))
        }
        (Post, ["v1", "volumes", name, "cp"]) => {
            let cp = node.cp(name, Duration::from_secs(120))?;
            Ok(json!({ "cp": cp }))
        }
        (Post, ["v1", "volumes", name, "failover"]) => {
            let report = node.failover(name)?;
            Ok(serde_json::to_value(report).expect("serializable"))
        }
        (Post, ["v1", "volumes", name, "resync"]) => {
            let body: ResyncRequest = read_body(request)?;
            let r = node.resync_from(name, &body.from)?;
            Ok(serde_json::to_value(r).expect("serializable"))
        }
        (Post, ["v1", "volumes", name, "switchover"]) => {
            let r = node.switchover(name)?;
            Ok(serde_json::to_value(r).expect("serializable"))
        }
        (Post, ["v1", "volumes", name, "takeover"]) => {
            let raw = read_raw_body(request)?;
            check_call(node, request, "POST", &format!("/v1/volumes/{name}/takeover"), &raw)?;
            let body: TakeoverRequest = parse_body(&raw)?;
            let r = node.takeover(name, &body)?;
            Ok(serde_json::to_value(r).expect("serializable"))
        }
        (Get, ["v1", "volumes", name, "storage"]) => {
            let (_, raid) = node.raid(name).map_err(|e| ApiError { status: 404, message: format!("{e:#}") })?;
            Ok(serde_json::to_value(raid.status()).expect("serializable"))
        }
        (Post, ["v1", "volumes", name, "scrub"]) => {
            let body: ScrubRequest = read_body(request)?;
            node.scrub(name, body.rate)?;
            Ok(json!({}))
        }
        (Post, ["v1", "volumes", name, "replace-disk"]) => {
            let body: ReplaceDisk = read_body(request)?;
            let member = node.replace_disk(name, &body.old, &body.new, body.rate)?;
            Ok(json!({ "member": member }))
        }
        _ => Err(ApiError { status: 404, message: format!("no such endpoint: {method} {url}") }),
    }
}

/// A client of one node's control API.
pub struct Client {
    base: String,
    agent: ureq::Agent,
    /// Signs every POST ([`Client::post_signed`]) where set: an operator's `ctl
    /// --secret-file` ([`crate::tls::sign_operator_calls`]).
    secret: Option<PeerSecret>,
}

impl Client {
    pub fn new(addr: &str) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .tls_config(crate::tls::client_tls())
            .build();
        Client { base: crate::tls::base_url(addr), agent: config.into(), secret: crate::tls::operator_secret() }
    }

    fn decode<T: DeserializeOwned>(mut resp: ureq::http::Response<ureq::Body>) -> Result<T> {
        let status = resp.status().as_u16();
        let body: Value = resp.body_mut().read_json().context("response is not JSON")?;
        if status != 200 {
            let msg = body.get("error").and_then(Value::as_str).unwrap_or("unknown error");
            bail!("{msg}");
        }
        serde_json::from_value(body).context("unexpected response shape")
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.agent.get(&format!("{}{path}", self.base)).call().map_err(|e| anyhow!("{}: {e}", self.base))?;
        Self::decode(resp)
    }

    /// `GET /v1/node` of a peer to pair with (or hand a volume to, or take one from). With
    /// `secret`, the peer must prove that it holds the same one; without, it must not
    /// require one.
    pub fn peer_info(&self, secret: Option<&PeerSecret>) -> Result<NodeInfo, PeerError> {
        let info: NodeInfo = self.get_proven("/v1/node", secret)?;
        if secret.is_none() && info.auth {
            return Err(PeerError::Unauthenticated(format!(
                "node {} requires authentication: start this node with the pair's --secret-file",
                info.name
            )));
        }
        Ok(info)
    }

    /// A GET whose answer, with `secret`, must carry the node's proof of it over the exact
    /// body ([`CHALLENGE_HEADER`], [`PROOF_HEADER`]); without, a plain [`Client::get`].
    pub fn get_proven<T: DeserializeOwned>(&self, path: &str, secret: Option<&PeerSecret>) -> Result<T, PeerError> {
        let Some(secret) = secret else {
            return self.get(path).map_err(PeerError::Unreachable);
        };
        let nonce = auth::fresh_nonce().map_err(|e| PeerError::Unreachable(anyhow!(e)))?;
        let mut resp = self
            .agent
            .get(&format!("{}{path}", self.base))
            .header(CHALLENGE_HEADER, auth::to_hex(&nonce))
            .call()
            .map_err(|e| PeerError::Unreachable(anyhow!("{}: {e}", self.base)))?;
        let proof = resp.headers().get(PROOF_HEADER).and_then(|v| v.to_str().ok()).and_then(auth::from_hex32);
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(PROVEN_ANSWER_MAX)
            .read_to_vec()
            .map_err(|e| PeerError::Unreachable(anyhow!("{}: read the answer: {e}", self.base)))?;
        if status != 200 {
            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
            let msg = v.get("error").and_then(Value::as_str).unwrap_or("unknown error");
            return Err(PeerError::Unreachable(anyhow!("{msg}")));
        }
        if !proof.is_some_and(|p| secret.verify_api(&nonce, &body, &p)) {
            return Err(PeerError::Unauthenticated(
                "it did not prove that it holds this node's secret (it runs without --secret-file, or with another secret)"
                    .into(),
            ));
        }
        serde_json::from_slice(&body).map_err(|e| PeerError::Unreachable(anyhow!("unexpected answer: {e}")))
    }

    /// A node-to-node POST: with `secret`, signed for a nonce the called node issues
    /// (`GET /v1/call-challenge`, then [`CALL_HEADER`]); without, a plain [`Client::post`].
    pub fn post_signed<B: Serialize, T: DeserializeOwned>(
        &self,
        secret: Option<&PeerSecret>,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let Some(secret) = secret else { return self.post(path, body) };
        let c: Value = self.get("/v1/call-challenge")?;
        let nonce = c["nonce"]
            .as_str()
            .and_then(auth::from_hex32)
            .ok_or_else(|| anyhow!("{}: a challenge without a nonce: {c}", self.base))?;
        let bytes = serde_json::to_vec(body)?;
        let proof = secret.call_proof(&nonce, "POST", path, &bytes);
        let resp = self
            .agent
            .post(&format!("{}{path}", self.base))
            .header(CALL_HEADER, format!("{} {}", auth::to_hex(&nonce), auth::to_hex(&proof)))
            .header("Content-Type", "application/json")
            .send(&bytes[..])
            .map_err(|e| anyhow!("{}: {e}", self.base))?;
        Self::decode(resp)
    }

    /// A GET whose answer is JSON lines: `line` is called with each non-empty line until
    /// the answer ends. `follow`: no time limit past connecting (a followed event stream);
    /// otherwise the client's usual one.
    pub fn get_lines(&self, path: &str, follow: bool, mut line: impl FnMut(&str)) -> Result<()> {
        use std::io::BufRead;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global((!follow).then_some(Duration::from_secs(300)))
            .tls_config(crate::tls::client_tls())
            .build()
            .into();
        let resp = agent.get(&format!("{}{path}", self.base)).call().map_err(|e| anyhow!("{}: {e}", self.base))?;
        if resp.status().as_u16() != 200 {
            return Self::decode::<Value>(resp).map(|_| ());
        }
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        for l in reader.lines() {
            let l = l.with_context(|| format!("{}: reading the stream", self.base))?;
            if !l.is_empty() {
                line(&l);
            }
        }
        Ok(())
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        if let Some(secret) = &self.secret {
            return self.post_signed(Some(secret), path, body);
        }
        let resp = self
            .agent
            .post(&format!("{}{path}", self.base))
            .send_json(body)
            .map_err(|e| anyhow!("{}: {e}", self.base))?;
        Self::decode(resp)
    }
}

/// Why a peer's `GET /v1/node` did not yield a peer to pair with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    #[error("{0:#}")]
    Unreachable(anyhow::Error),
    #[error("{0}")]
    Unauthenticated(String),
}

/// Parses the address of a control API given on the command line.
pub fn parse_addr(s: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .with_context(|| format!("bad address {s:?}"))?
        .next()
        .ok_or_else(|| anyhow!("no address for {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_api_connections_time_out_sends() {
        use std::os::fd::AsRawFd;
        let listener = control_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let mut tv = libc::timeval { tv_sec: 0, tv_usec: 0 };
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).unwrap();
        // SAFETY: getsockopt on an open fd into a timeval of the size given, both live across
        // the call.
        let rc = unsafe {
            libc::getsockopt(
                conn.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                std::ptr::from_mut(&mut tv).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        assert_eq!(u64::try_from(tv.tv_sec).unwrap(), CLIENT_SEND_TIMEOUT.as_secs(), "not inherited at accept");
    }

    #[test]
    fn call_nonces_are_good_once_and_bounded() {
        let n = CallNonces::default();
        let a = n.issue().unwrap();
        assert!(n.take(&a));
        assert!(!n.take(&a), "a nonce is good for one request");
        assert!(!n.take(&[0; 32]), "a nonce never issued");
        let first = n.issue().unwrap();
        for _ in 0..CALL_NONCES_MAX {
            n.issue().unwrap();
        }
        assert!(!n.take(&first), "the oldest is forgotten past the bound");
        assert!(n.0.lock().len() <= CALL_NONCES_MAX);
    }
}
