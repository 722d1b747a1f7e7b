//! The bodies and answers of the control API, as both sides (de)serialise them.

use super::*;

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
