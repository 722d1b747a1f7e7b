//! The calls a node's role changes make to a peer node, behind [`PeerCalls`] (the control
//! API's HTTP client, `crate::api::HttpPeers`, in the daemon), and the bodies they carry.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::SumSpan;

/// What a node's role changes ask of a peer, by the peer's control address.
pub trait PeerCalls: Send + Sync {
    /// Who the peer is (proven with the pair's secret, where there is one).
    fn info(&self, control: &str) -> Result<NodeInfo>;
    /// The peer's status (`GET /v1/status`, proven likewise).
    fn status(&self, control: &str) -> Result<Value>;
    /// Asks the peer to mirror `volume` as `req` says (a failback's resync to this node).
    fn mirror(&self, control: &str, volume: &str, req: &MirrorRequest) -> Result<()>;
    /// Hands `volume` over to the peer, its mirror: the second half of a switchover.
    fn takeover(&self, control: &str, volume: &str, req: &TakeoverRequest) -> Result<Value>;
    /// Asks the peer to delete its mirror of `volume` from `source` (this node).
    fn delete_mirror(&self, control: &str, volume: &str, source: &str) -> Result<()>;
    /// Asks the peer to grow its mirror of `volume` from `source` (this node) to `size`
    /// bytes (step 1 of `volume resize`).
    fn resize_mirror(&self, control: &str, volume: &str, source: &str, size: u64) -> Result<()>;
    /// The peer's region checksums of its mirror of `volume` from `source` (this node)
    /// over `span` (`verify`; proven like the status).
    fn checksums(&self, control: &str, volume: &str, source: &str, span: SumSpan) -> Result<Vec<u32>>;
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
    /// The mode of its NVRAM: what an acknowledgement of a mirror hosted there survives.
    #[serde(default)]
    pub nvram: Option<nvmirror_dataplane::nvram::NvramMode>,
    /// Its NVMe/TCP address, where it serves NVMe/TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvmf: Option<String>,
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
