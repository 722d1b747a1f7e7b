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
    /// The largest size a RAID-4 volume may grow to (`volume resize`): its checksum area
    /// is sized for it. Default: 16 times the size, at least 64 GiB.
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// Send CPs to the mirror by value instead of by reference.
    #[serde(default)]
    pub cp_by_value: bool,
    /// The NBD clients' addresses that may attach it (networks or addresses); empty: all.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// `POST /v1/volumes/VOL/allow`: the volume's NBD allow-list, replaced whole.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowRequest {
    /// Networks or addresses; empty: every client.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// `POST /v1/volumes/VOL/copy`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyRequest {
    /// Pause (true) or resume (false) the baseline or resync under way.
    pub paused: bool,
}

/// `POST /v1/volumes/VOL/verify`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// Bytes per checksum (default 1 MiB).
    #[serde(default)]
    pub region: Option<u64>,
    /// Write the primary's contents of the regions that differ to the mirror.
    #[serde(default)]
    pub repair: bool,
}

/// `POST /v1/volumes/VOL/resize`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    /// The new size, bytes.
    pub size: u64,
    /// Grow the mirror of VOL from this source node (the source's resize, step 1).
    #[serde(default)]
    pub mirror_of: Option<String>,
}

/// `POST /v1/volumes/VOL/delete`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteRequest {
    /// Delete a mirrored primary (and its mirror on the peer), or a mirror its source is
    /// connected to.
    #[serde(default)]
    pub force: bool,
    /// Delete the mirror of VOL from this source node only (a source's forced delete).
    #[serde(default)]
    pub mirror_of: Option<String>,
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
pub struct ResyncRequest {
    /// The control address of the node that holds the volume now.
    pub from: String,
    /// The checks alone, and what would be copied: nothing changes.
    #[serde(default)]
    pub dry_run: bool,
}

/// The body of `failover` and `switchover` (an empty body is `{}`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleChange {
    /// The checks alone, and what the change would do ([`crate::node::RoleChangePlan`]).
    #[serde(default)]
    pub dry_run: bool,
}

pub use crate::node::{MirrorRequest, NodeInfo, TakeoverRequest, RESYNC_RANGES_MAX};
