//! The node's HTTP/JSON control API, and the client `nvmirror ctl` uses.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | /v1/node | | name and addresses, and whether it authenticates peers |
//! | GET | /v1/call-challenge | | `{"nonce": HEX}` for one signed node-to-node request (nodes with a secret) |
//! | GET | /v1/status | | [`crate::node::NodeStatus`] |
//! | GET | /v1/volumes/VOL/status | | the same, of VOL alone (its primary row, its mirrors here); 404 if this node has neither |
//! | GET | /metrics | | Prometheus text exposition ([`crate::metrics`]) |
//! | GET | /v1/events?since=ID&follow=1 | | JSON lines of [`crate::events::Event`]; with `follow`, kept open for new ones |
//! | POST | /v1/volumes | [`CreateVolume`] | the volume record |
//! | POST | /v1/volumes/VOL/mirror | [`MirrorRequest`] | `{}` once the baseline has started |
//! | POST | /v1/volumes/VOL/cp | | `{"cp": n}` once durable on both sites |
//! | POST | /v1/volumes/VOL/allow | [`AllowRequest`] | `{}`: the volume's NBD allow-list replaced (new connections) |
//! | POST | /v1/volumes/VOL/unpair | | [`crate::node::UnpairReport`]: VOL goes on alone; its mirror on the peer is deleted |
//! | POST | /v1/volumes/VOL/copy | [`CopyRequest`] | `{}`: the baseline or resync under way paused or resumed |
//! | POST | /v1/volumes/VOL/verify | [`VerifyRequest`] | [`crate::node::VerifyReport`]: VOL against its mirror, by region checksums, as of a CP |
//! | GET | /v1/volumes/VOL/checksums?source=S&offset=O&length=L&region=R | | `{"cp": n, "sums": [crc32c per region]}` of the mirror of VOL from S, as of its last applied CP (node to node, proven) |
//! | POST | /v1/volumes/VOL/resize | [`ResizeRequest`] | [`crate::node::ResizeReport`]: VOL grown online, its mirror first (with `mirror_of`: the mirror of VOL from that source, node to node) |
//! | POST | /v1/volumes/VOL/delete | [`DeleteRequest`] | [`crate::node::DeleteReport`]: the primary VOL (with `force`, mirrored too, and its mirror on the peer) or the mirrors of VOL here |
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
//! With `--tls-cert` the API is served over TLS only, and a node's calls to its peers, like
//! `ctl --tls-ca`, speak https. With `--ctl-client-ca` too, an operator who presents a
//! certificate signed by it (`ctl --tls-cert/--tls-key`) is an admin: their POSTs need no
//! signature under `--require-signed-ctl`, and logs and events name them.
//!
//! Files: `http` (the HTTP server: TLS, bounds, callers), `types` (bodies and answers),
//! `server` (routes and checks), `client` (what `ctl` and peers call with); the call
//! nonces here.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use nvmirror_dataplane::source::Policy;
use nvmirror_dataplane::storage::Engine;
use nvmirror_dataplane::transport::auth::{self, PeerSecret};

use crate::node::{CreateLayout, MirrorTarget, Node};
use crate::storage::storage_from_args;

mod client;
pub mod http;
mod server;
mod types;

pub use client::{exit_code, parse_addr, CallError, Client, DamageFound, HttpPeers, PeerError};
pub use server::{control_listener, NodeApi};
pub use types::*;

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
