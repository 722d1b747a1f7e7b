//! The API's routes: the signed calls and proofs checked, each route answered from the
//! node. The HTTP server that carries them is [`super::http`].

use super::http::{ApiRequest, Caller, Reply};
use super::*;

/// Checks a node-to-node request where this node has a secret: the nonce is one it
/// issued, unused, and the proof covers this method, path and body.
fn check_call(
    node: &Node,
    nonces: &CallNonces,
    request: &Incoming,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(), ApiError> {
    let Some(secret) = &node.cfg.secret else { return Ok(()) };
    let peer = request.caller.to_string();
    let why = match request.headers.get(CALL_HEADER) {
        None => Some("it carries no proof (the caller has no --secret-file)"),
        Some(h) => match h.to_str().unwrap_or("").split_once(' ') {
            Some((n, p)) => match (auth::from_hex32(n), auth::from_hex32(p)) {
                (Some(n), Some(p)) => {
                    if !nonces.take(&n) {
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
            tracing::warn!("control: refused {method} {path} from {peer}: {why}");
            node.events.push(
                "peer-refused",
                None,
                json!({ "peer": peer, "request": format!("{method} {path}"), "reason": why }),
            );
            Err(ApiError { status: 401, message: format!("node-to-node request refused: {why}") })
        }
    }
}

struct ApiError {
    status: u16,
    message: String,
}

impl From<anyhow::Error> for ApiError {
    /// What this node does not have is 404, a request it cannot take as given 400;
    /// anything else the node would not do is 409.
    fn from(e: anyhow::Error) -> Self {
        let status = if e.chain().any(|c| c.is::<crate::node::NotFound>()) {
            404
        } else if e.chain().any(|c| c.is::<crate::node::Invalid>()) {
            400
        } else {
            409
        };
        ApiError { status, message: format!("{e:#}") }
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError { status: 400, message: message.into() }
}

/// Binds the control API's listener.
pub fn control_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr)
}

/// The node's routes, for [`super::http::serve`].
pub struct NodeApi {
    node: Arc<Node>,
    /// The nonces this node issues for node-to-node calls.
    nonces: CallNonces,
}

impl NodeApi {
    pub fn new(node: Arc<Node>) -> NodeApi {
        NodeApi { node, nonces: CallNonces::default() }
    }
}

impl super::http::Api for NodeApi {
    fn handle(&self, request: ApiRequest) -> Reply {
        handle(request, &self.node, &self.nonces)
    }
}

/// A URL's query parameters, `key=value` (a key alone has the value "").
fn query(url: &str) -> impl Iterator<Item = (&str, &str)> {
    let q = url.split_once('?').map_or("", |(_, q)| q);
    q.split('&').filter(|kv| !kv.is_empty()).map(|kv| kv.split_once('=').unwrap_or((kv, "")))
}

/// `GET /v1/events?since=ID[&follow=1]`: the events after `since` as JSON lines; with
/// `follow`, then new ones as they happen, on an answer that stays open.
fn events(node: &Node, url: &str) -> Reply {
    let mut since = 0u64;
    let mut follow = false;
    for (k, v) in query(url) {
        match k {
            "since" => match v.parse() {
                Ok(n) => since = n,
                Err(_) => return Reply::error(400, &format!("since={v:?} is not an event id")),
            },
            "follow" => match v {
                "" | "1" | "true" => follow = true,
                "0" | "false" => follow = false,
                _ => return Reply::error(400, &format!("follow={v:?}: 1, true, 0 or false")),
            },
            other => return Reply::error(400, &format!("unknown parameter {other:?}: since, follow")),
        }
    }
    // A look from the start begins with the snapshot of every volume's state.
    let mut body = String::new();
    if since == 0 {
        let status = serde_json::to_value(node.status()).expect("serializable");
        body.push_str(&serde_json::to_string(&node.events.snapshot(&status)).expect("serializable"));
        body.push('\n');
    }
    if !follow {
        for e in node.events.since(since) {
            body.push_str(&serde_json::to_string(&e).expect("serializable"));
            body.push('\n');
        }
        return Reply::Full { status: 200, content_type: NDJSON, body: body.into_bytes(), headers: Vec::new() };
    }
    match node.events.follow(since, body.into_bytes()) {
        Some(stream) => Reply::Stream { content_type: NDJSON, source: Box::new(stream) },
        None => Reply::error(503, &format!("{} event streams are open already", crate::events::FOLLOWERS_MAX)),
    }
}

const NDJSON: &str = "application/x-ndjson";

fn read_body<T: DeserializeOwned>(request: &mut Incoming) -> Result<T, ApiError> {
    parse_body(&read_raw_body(request)?)
}

/// The body of a failover or switchover; none at all is `{}`.
fn read_role_change(request: &mut Incoming) -> Result<RoleChange, ApiError> {
    let raw = read_raw_body(request)?;
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(RoleChange::default());
    }
    parse_body(&raw)
}

fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

/// A request whose body was read (at most [`BODY_MAX`] bytes) before it is routed, so
/// that a signature over it can be checked first ([`authorize`]).
struct Incoming {
    headers: hyper::HeaderMap,
    body: Vec<u8>,
    caller: Caller,
}

/// The methods the routes know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Get,
    Post,
    Other,
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Other => "that method",
        })
    }
}

/// The request's body (read once, before routing).
fn read_raw_body(request: &mut Incoming) -> Result<Vec<u8>, ApiError> {
    Ok(std::mem::take(&mut request.body))
}

/// Operator calls signed with the node's secret (`ctl --secret-file`), and the admin
/// calls a node started with `--require-signed-ctl` refuses unsigned: every POST but the
/// node-to-node `takeover`, which [`route`] checks itself. Reads stay open. An operator
/// who presented a certificate of `--ctl-client-ca` is an admin: their calls need no
/// signature.
fn authorize(node: &Node, nonces: &CallNonces, request: &Incoming, method: Verb, url: &str) -> Result<(), ApiError> {
    let path = url.split('?').next().unwrap_or("");
    if method != Verb::Post || path.ends_with("/takeover") {
        return Ok(());
    }
    if request.headers.contains_key(CALL_HEADER) {
        return check_call(node, nonces, request, "POST", path, &request.body);
    }
    if node.cfg.require_signed_ctl && request.caller.operator.is_none() {
        let peer = request.caller.to_string();
        let why = "this node requires signed admin calls (--require-signed-ctl): sign them with ctl --secret-file, or present an operator certificate (ctl --tls-cert) of its --ctl-client-ca";
        tracing::warn!("control: refused POST {path} from {peer}: unsigned");
        node.events.push(
            "peer-refused",
            None,
            json!({ "peer": peer, "request": format!("POST {path}"), "reason": why }),
        );
        return Err(ApiError { status: 401, message: why.into() });
    }
    Ok(())
}

/// Answers `request`; a POST is logged with its caller and its outcome, and the events it
/// causes name the caller.
fn handle(request: ApiRequest, node: &Node, nonces: &CallNonces) -> Reply {
    let ApiRequest { method, target: url, headers, body, caller } = request;
    let verb = match method {
        hyper::Method::GET => Verb::Get,
        hyper::Method::POST => Verb::Post,
        _ => Verb::Other,
    };
    let path = url.split('?').next().unwrap_or("");
    if verb == Verb::Get && path == "/metrics" {
        let body = crate::metrics::render(&node.status()).into_bytes();
        return Reply::Full { status: 200, content_type: "text/plain; version=0.0.4", body, headers: Vec::new() };
    }
    if verb == Verb::Get && path == "/v1/events" {
        return events(node, &url);
    }
    let challenge = challenge_of(&headers);
    let who = caller.to_string();
    let mut incoming = Incoming { headers, body, caller };
    let result = match &challenge {
        Err(e) => Err(bad_request(e.clone())),
        Ok(_) => crate::events::on_behalf_of(&who, || {
            authorize(node, nonces, &incoming, verb, &url)?;
            route(&mut incoming, node, nonces, verb, &url)
        }),
    };
    let (status, body) = match result {
        Ok(v) => (200, v),
        Err(e) => (e.status, json!({ "error": e.message })),
    };
    if verb == Verb::Post {
        tracing::info!("control: POST {path} from {who}: {status}");
    }
    let body = body.to_string();
    let mut headers = Vec::new();
    if let (Ok(Some(nonce)), Some(secret)) = (challenge, &node.cfg.secret) {
        headers.push((PROOF_HEADER, auth::to_hex(&secret.api_proof(&nonce, body.as_bytes()))));
    }
    Reply::Full { status, content_type: "application/json", body: body.into_bytes(), headers }
}

/// The nonce of a caller that asks this node to prove its secret, if it asks.
fn challenge_of(headers: &hyper::HeaderMap) -> Result<Option<auth::Nonce>, String> {
    let Some(h) = headers.get(CHALLENGE_HEADER) else {
        return Ok(None);
    };
    auth::from_hex32(h.to_str().unwrap_or(""))
        .map(Some)
        .ok_or_else(|| format!("{CHALLENGE_HEADER} must be {} hex digits", 2 * auth::NONCE_BYTES))
}

fn route(request: &mut Incoming, node: &Node, nonces: &CallNonces, method: Verb, url: &str) -> Result<Value, ApiError> {
    use Verb::{Get, Post};
    let path: Vec<&str> = url.split('?').next().unwrap_or("").trim_matches('/').split('/').collect();
    match (method, path.as_slice()) {
        (Get, ["v1", "node"]) => Ok(serde_json::to_value(NodeInfo {
            name: node.cfg.name.clone(),
            replication: node.cfg.advertised_replication(),
            nbd: node.cfg.nbd.to_string(),
            control: node.cfg.control.to_string(),
            rdma: node.rdma_addr(),
            auth: node.cfg.secret.is_some(),
            nvram: Some(node.cfg.nvram.mode),
            nvmf: node.cfg.nvmf.map(|a| a.to_string()),
        })
        .expect("serializable")),
        (Get, ["v1", "call-challenge"]) => match &node.cfg.secret {
            None => Err(ApiError {
                status: 409,
                message: "this node has no secret (--secret-file): node-to-node requests to it are not signed".into(),
            }),
            Some(_) => {
                let n = nonces.issue().map_err(|e| ApiError { status: 500, message: e.to_string() })?;
                Ok(json!({ "nonce": auth::to_hex(&n) }))
            }
        },
        (Get, ["v1", "status"]) => Ok(serde_json::to_value(node.status()).expect("serializable")),
        (Get, ["v1", "volumes", name, "status"]) => {
            Ok(serde_json::to_value(node.volume_status(name)?).expect("serializable"))
        }
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
            let layout = CreateLayout { data_disks: body.data_disks, stripe_unit, engine, max_bytes: body.max_bytes };
            let log_bytes =
                body.log_bytes.map(usize::try_from).transpose().map_err(|_| bad_request("log size too large"))?;
            let options = crate::node::VolumeOptions { cp_by_value: body.cp_by_value, allow: body.allow };
            let rec = node.create_volume(&body.name, body.size, storage, layout, log_bytes, options)?;
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
            let target = MirrorTarget {
                peer_name: peer.name,
                peer_control: body.to,
                replication,
                peer_nvram: peer.nvram,
                peer_nvmf: peer.nvmf,
            };
            node.mirror_volume(name, target, policy, &body.resync_ranges, body.rate)?;
            Ok(json!({}))
        }
        (Get, ["v1", "volumes", name, "checksums"]) => {
            let q: HashMap<&str, &str> = query(url).collect();
            let arg = |k: &str| q.get(k).copied().ok_or_else(|| bad_request(format!("missing parameter {k:?}")));
            let number = |k: &str| {
                let v = arg(k)?;
                v.parse::<u64>().map_err(|_| bad_request(format!("{k}={v:?} is not a number")))
            };
            let (offset, length, region) = (number("offset")?, number("length")?, number("region")?);
            crate::node::check_span(length, region).map_err(|e| bad_request(format!("{e:#}")))?;
            let span = crate::node::SumSpan { offset, length, region };
            let (cp, sums) = node.mirror_sums(arg("source")?, name, span)?;
            Ok(json!({ "cp": cp, "sums": sums }))
        }
        (Post, ["v1", "volumes", name, "allow"]) => {
            let body: AllowRequest = read_body(request)?;
            node.set_allow(name, body.allow)?;
            Ok(json!({}))
        }
        (Post, ["v1", "volumes", name, "unpair"]) => {
            Ok(serde_json::to_value(node.unpair(name)?).expect("serializable"))
        }
        (Post, ["v1", "volumes", name, "copy"]) => {
            let body: CopyRequest = read_body(request)?;
            node.pause_copy(name, body.paused)?;
            Ok(json!({}))
        }
        (Post, ["v1", "volumes", name, "verify"]) => {
            let body: VerifyRequest = read_body(request)?;
            Ok(serde_json::to_value(node.verify(name, body.region, body.repair)?).expect("serializable"))
        }
        (Post, ["v1", "volumes", name, "resize"]) => {
            let body: ResizeRequest = read_body(request)?;
            match &body.mirror_of {
                Some(source) => {
                    node.resize_mirror(source, name, body.size)?;
                    Ok(json!({}))
                }
                None => Ok(serde_json::to_value(node.resize_volume(name, body.size)?).expect("serializable")),
            }
        }
        (Post, ["v1", "volumes", name, "delete"]) => {
            let body: DeleteRequest = read_body(request)?;
            let report = match &body.mirror_of {
                Some(source) => node.delete_mirror_of(source, name)?,
                None => node.delete_volume(name, body.force)?,
            };
            Ok(serde_json::to_value(report).expect("serializable"))
        }
        (Post, ["v1", "volumes", name, "cp"]) => {
            let cp = node.cp(name, Duration::from_secs(120))?;
            Ok(json!({ "cp": cp }))
        }
        (Post, ["v1", "volumes", name, "failover"]) => {
            if read_role_change(request)?.dry_run {
                return Ok(serde_json::to_value(node.failover_plan(name)?).expect("serializable"));
            }
            let report = node.failover(name)?;
            Ok(serde_json::to_value(report).expect("serializable"))
        }
        (Post, ["v1", "volumes", name, "resync"]) => {
            let body: ResyncRequest = read_body(request)?;
            let r = node.resync_from(name, &body.from, body.dry_run)?;
            Ok(serde_json::to_value(r).expect("serializable"))
        }
        (Post, ["v1", "volumes", name, "switchover"]) => {
            if read_role_change(request)?.dry_run {
                return Ok(serde_json::to_value(node.switchover_plan(name)?).expect("serializable"));
            }
            let r = node.switchover(name)?;
            Ok(serde_json::to_value(r).expect("serializable"))
        }
        (Post, ["v1", "volumes", name, "takeover"]) => {
            let raw = read_raw_body(request)?;
            check_call(node, nonces, request, "POST", &format!("/v1/volumes/{name}/takeover"), &raw)?;
            let body: TakeoverRequest = parse_body(&raw)?;
            let r = node.takeover(name, &body)?;
            Ok(serde_json::to_value(r).expect("serializable"))
        }
        (Get, ["v1", "volumes", name, "storage"]) => {
            let (_, raid) = node.raid(name)?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
