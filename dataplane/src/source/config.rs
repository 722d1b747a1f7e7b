//! What a source volume is configured with, and what its owner can ask of its poller.

use super::*;

#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// This node's name, as destinations know it.
    pub node: String,
    pub volume: String,
    pub volume_id: u64,
    pub epoch: u64,
    pub partition_bytes: usize,
    pub cp_interval: Duration,
    /// Cached dirty blocks above which a CP starts.
    pub cache_blocks_max: usize,
    pub backoff: BackoffConfig,
    /// Core index to pin the poller to.
    pub core: Option<usize>,
    /// Delay between reconnection attempts.
    pub reconnect_interval: Duration,
    /// Send CPs by value (block number + data) instead of by reference to the
    /// destination's log file.
    pub cp_by_value: bool,
    /// How long a sent write may wait for the destination's acknowledgement before the
    /// link is declared down (the write then fails under policy strict and the source
    /// reconnects). A peer that goes silent without closing the connection (a partition,
    /// a hung node) is noticed within this time, not when the kernel gives up on TCP.
    pub ack_timeout: Duration,
    /// How long a CP or a baseline may wait for the destination's answer: longer than
    /// [`Self::ack_timeout`], since applying a CP writes a whole partition's blocks.
    pub cp_timeout: Duration,
    /// What a write does when it cannot be mirrored (see [`Policy`]).
    pub policy: Policy,
    /// The mirror's node name: what the change map is relative to.
    pub peer: Option<String>,
    /// Bytes a copy to the mirror sends per step, a multiple of 64 KiB up to 1 MiB (the
    /// default): the simulator takes smaller steps, so that CPs and faults fall inside
    /// its small volume's copies.
    pub copy_chunk: usize,
    /// Where clients reach the volume over NVMe/TCP through this node: told to the mirror
    /// on every connection, for its discovery controller.
    pub nvmf: Option<std::net::SocketAddr>,
    /// Deliberate defects, for the simulator's own test that it catches them.
    #[cfg(any(test, feature = "sim"))]
    pub planted_bug: Option<PlantedBug>,
}

/// What a write does when the mirror cannot take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// The write fails with an I/O error: nothing is acknowledged that is not on both sites.
    #[default]
    Strict,
    /// The write goes on locally and its region is marked in the change map; when the link
    /// returns, a delta resync copies the marked regions. Needs a change map (without one
    /// the volume behaves as `strict`).
    Sync,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Strict => "strict",
            Policy::Sync => "sync",
        }
    }
}

/// A deliberate defect the simulator must catch (see `crate::sim`).
#[cfg(any(test, feature = "sim"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// Complete a write once it is persistent in the local NVLog, without waiting for the
    /// destination's acknowledgement.
    AckBeforeRemotePersist,
    /// Fail over without replaying the mirror's log past its last applied CP.
    FailoverSkipsReplay,
}

impl SourceConfig {
    pub fn new(node: &str, volume: &str, volume_id: u64, partition_bytes: usize) -> Self {
        SourceConfig {
            node: node.to_string(),
            volume: volume.to_string(),
            volume_id,
            epoch: 1,
            partition_bytes,
            cp_interval: Duration::from_secs(10),
            cache_blocks_max: 1 << 20,
            backoff: BackoffConfig::default(),
            core: None,
            reconnect_interval: Duration::from_millis(500),
            cp_by_value: false,
            ack_timeout: Duration::from_secs(6),
            cp_timeout: Duration::from_secs(60),
            policy: Policy::Strict,
            peer: None,
            copy_chunk: super::BASELINE_CHUNK,
            nvmf: None,
            #[cfg(any(test, feature = "sim"))]
            planted_bug: None,
        }
    }
}

/// Why a poller refused a control request, or could not finish it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// Another node may be the primary now (the reason given when it was fenced).
    #[error("{0}")]
    Fenced(String),
    #[error("volume failed: {0}")]
    Failed(String),
    #[error("volume is already mirrored to {0}")]
    AlreadyMirrored(String),
    #[error("volume is not mirrored")]
    NotMirrored,
    #[error("a switchover is under way")]
    SwitchoverUnderWay,
    #[error("the volume waits for the mirror's copy of its log (recovery found it cut short)")]
    AwaitingMirrorLog,
    #[error("the mirror is not in sync; a switchover needs it in sync")]
    NotInSync,
    #[error("the mirror left sync during the switchover")]
    LeftSync,
    #[error("switchover cancelled")]
    SwitchoverCancelled,
    #[error("this volume keeps no change map")]
    NoChangeMap,
    /// The NVLog or the change map could not be made durable.
    #[error("{0}")]
    Persist(String),
    #[error("a {0} to the mirror is under way; resize the volume once it ends")]
    CopyUnderWay(&'static str),
    #[error("{0}")]
    Grow(String),
}

/// Control-plane requests to a poller.
/// Opens a volume's change map region anew at the length given (see [`Control::Grow`]).
pub type ReopenRegion = Box<dyn FnOnce(usize) -> std::io::Result<Box<dyn crate::nvram::Nvram>> + Send>;

pub enum Control {
    /// Force a CP; answered with its number once durable on both sites.
    Cp(Sender<Result<u64, ControlError>>),
    /// Start mirroring to the replication address `target` of node `peer` (baseline or
    /// delta resync, then in sync).
    Attach {
        target: String,
        peer: Option<String>,
        reply: Sender<Result<(), ControlError>>,
    },
    Status(Sender<SourceStatus>),
    /// Stop the poller; pending requests fail.
    Stop(Sender<()>),
    /// Marks regions in the change map (a returning peer's own changes, for its resync)
    /// and makes them durable.
    MarkRegions {
        regions: Vec<u64>,
        reply: Sender<Result<(), ControlError>>,
    },
    /// Planned switchover, first half: stop taking new requests (they wait in the queue),
    /// complete what was logged, and bring the mirror level with a CP. Answered with the
    /// last CP and the next sequence number once both partitions are free and the mirror
    /// applied everything.
    Quiesce(Sender<Result<(u64, u64), ControlError>>),
    /// Planned switchover, second half: stop the poller and hand back the requests that
    /// waited in the queue, unanswered, for whoever serves the volume next.
    Handover(Sender<Vec<(IoRequest, Completer)>>),
    /// Takes back a quiesce that did not lead to a handover.
    Resume,
    /// Changes the policy (`ctl mirror --policy`).
    SetPolicy(Policy),
    /// An NBD client connection that named this volume: the poller serves it from now on.
    Adopt(crate::frontend::nbd::Adopted),
    /// An NVMe/TCP I/O queue of this volume, just connected: the poller serves it from now on.
    AdoptNvmf(crate::frontend::nvmf::AdoptedQueue),
    /// Stop taking writes: another node may be the primary now (fleet mode lost its lease,
    /// or found the volume held elsewhere).
    Fence(String),
    /// Bounds the bytes per second a baseline or resync sends (`None`: as fast as it goes).
    SetCopyRate(Option<u64>),
    /// Stops mirroring: the volume goes on alone (`ctl unpair`).
    Detach(Sender<Result<(), ControlError>>),
    /// Pauses (`true`) or resumes the baseline or resync under way; writes go on as
    /// before. A resumed copy's rate does not count the pause. A restart resumes it.
    PauseCopy(bool),
    /// Logs the current contents of `len` bytes at `offset` again, as a write that the
    /// mirror receives like any other (`ctl verify --repair`); `done` is answered once it
    /// is persistent on both sites. Refused while writes wait for log space.
    Rewrite {
        offset: u64,
        len: u64,
        done: Completer,
    },
    /// Grows the volume to `bytes` (its mirror grew first): the device, then the change
    /// map, whose NVRAM region `reopen_changes` opens at the length it is given (the
    /// region's file grown to it). New connections see the new size; answered once the
    /// device and map say so durably. Refused while a baseline or resync runs.
    Grow {
        bytes: u64,
        reopen_changes: ReopenRegion,
        reply: Sender<Result<(), ControlError>>,
    },
    /// The regions this volume may hold that its mirror (or a new primary) does not: the
    /// change map's marks and the blocks of the partitions the NVLog still holds. A fenced
    /// old primary sends them to the new one for its failback resync.
    ChangedRegions(Sender<Vec<u64>>),
}
