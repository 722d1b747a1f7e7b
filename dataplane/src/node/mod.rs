//! The node core: a volume's role changes, written once and run both by the daemon
//! (`nvmirror node`, whose environment is files in its data and NVRAM dirs) and by the
//! simulator (simulated media and power), so that the seeds test the code that ships.
//!
//! A role change is a sequence of durable steps, and its order is what makes a crash
//! between any two of them recoverable (see `CP-AND-FAILOVER.md`):
//!
//! 1. the mirror is promoted: its epoch raised and saved first (from then on the old
//!    primary is refused), every logged entry past its last applied CP replayed, the
//!    mirror marked promoted ([`Mirror::promote_to`]);
//! 2. the new primary's NVLog for that epoch is formatted, its numbering continuing the
//!    mirror's, and its change map made relative to the old primary's last common CP, with
//!    what the replay wrote marked ([`prepare_logs`]);
//! 3. the record that names the volume (and so those logs) is saved;
//! 4. the volume starts.
//!
//! A crash before 3 leaves a promoted mirror and no record: the node finishes the change
//! at its next start ([`take_up_promoted`] with no report: the change map marks all of
//! the volume, as what the replay wrote is not known any more). Logs formatted by an
//! attempt that did not reach 3 are never trusted: they are formatted again.
//!
//! What differs between the daemon and the simulator is behind [`NodeEnv`]: where NVRAM
//! regions and records live, and how a primary volume is started.

use std::io;
use std::sync::Arc;

use crate::destination::{Mirror, MirrorError, MirrorMeta, PromoteReport};
use crate::log::{ChangeBase, ChangeMap, ChangeMapError, Checkpoint, NvLog, NvLogError, PARTITIONS};
use crate::nvram::Nvram;
#[cfg(any(test, feature = "sim"))]
use crate::source::PlantedBug;

#[cfg(test)]
mod tests;

/// A primary volume taken up from its promoted mirror: what its record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promoted {
    pub volume: String,
    pub volume_id: u64,
    pub size: u64,
    pub partition_bytes: usize,
    pub epoch: u64,
    /// The node whose mirror this was: the old primary.
    pub from: String,
    /// A switchover: the old primary is the new volume's mirror (else it has none yet).
    pub mirrored_to_from: bool,
}

/// What a node's role changes need of where they run.
pub trait NodeEnv {
    /// A new, empty NVRAM region of `bytes` named `name` ([`nvlog_name`], [`changes_name`]),
    /// replacing whatever was held under that name.
    fn fresh_region(&mut self, name: &str, bytes: usize) -> io::Result<Box<dyn Nvram>>;
    /// Saves the record of primary volume `v` durably, with the storage of the mirror it
    /// was promoted from: once saved, the node starts `v` whenever it starts.
    fn record_primary(&mut self, v: &Promoted) -> io::Result<()>;
    /// Starts primary volume `v` (its record saved): NVLog recovery, then its poller.
    fn start_primary(&mut self, v: &Promoted) -> io::Result<()>;
    /// A deliberate defect the simulator must catch.
    #[cfg(any(test, feature = "sim"))]
    fn planted_bug(&self) -> Option<PlantedBug> {
        None
    }
}

/// What hosting a mirror on storage that was a primary volume needs of where it runs. The
/// storage is the environment's own (files and RAID volumes for the daemon, simulated
/// disks for the simulator).
pub trait MirrorEnv: NodeEnv {
    /// A volume's storage, as the environment describes it.
    type Storage;
    /// One durable step: the primary record of `meta.volume` goes, with the mirrors this
    /// node hosts of `meta.source_node`'s volume or on `storage` (a promoted mirror of an
    /// earlier era), and the node keeps `fence_epoch` (and those mirrors' epochs) as the
    /// epochs it has known the volume at: no hello from an older one is taken.
    fn retire_for_mirror(&mut self, meta: &MirrorMeta, storage: &Self::Storage, fence_epoch: u64) -> io::Result<()>;
    /// Records `storage` as where the mirror `meta` describes lives.
    fn record_mirror_storage(&mut self, meta: &MirrorMeta, storage: &Self::Storage) -> io::Result<()>;
    /// Saves `meta`, then opens and registers the mirror over `storage` with its `logs`.
    fn open_mirror(
        &mut self,
        meta: MirrorMeta,
        logs: [Box<dyn Nvram>; PARTITIONS],
        storage: Self::Storage,
    ) -> io::Result<Arc<Mirror>>;
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The mirror is not level with the primary for a takeover: nothing changed.
    #[error("{0}")]
    Refused(String),
    /// The promotion itself failed or was refused (already promoted, inconsistent).
    #[error(transparent)]
    Promote(#[from] MirrorError),
    #[error("format NVLog {name}: {source}")]
    NvLog {
        name: String,
        #[source]
        source: NvLogError,
    },
    #[error("change map {name}: {source}")]
    ChangeMap {
        name: String,
        #[source]
        source: ChangeMapError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// The NVRAM region of `volume`'s NVLog at `epoch`.
pub fn nvlog_name(volume: &str, epoch: u64) -> String {
    format!("{volume}.{epoch}.nvlog")
}

/// The NVRAM region of `volume`'s change map.
pub fn changes_name(volume: &str) -> String {
    format!("{volume}.changes")
}

/// The NVRAM region of the log file a mirror keeps for its source's partition `p`.
pub fn mirror_log_name(source: &str, volume: &str, p: usize) -> String {
    format!("mirrors/{source}/{volume}/log.{p}")
}

/// The logs of a new primary: its NVLog at `epoch`, numbering from `start`, and a change
/// map relative to `base` with `changed` marked (all of the volume where unknown).
#[derive(Debug, Clone)]
pub struct NewLogs<'a> {
    pub volume: &'a str,
    pub volume_id: u64,
    pub size: u64,
    pub partition_bytes: usize,
    pub epoch: u64,
    pub start: Checkpoint,
    pub base: Option<ChangeBase>,
    pub changed: Option<&'a [(u64, u64)]>,
}

/// Formats a new primary's NVLog and change map. Done before the record that names them
/// is saved: a crash in between leaves nothing that a restart would trust.
pub fn prepare_logs(env: &mut impl NodeEnv, l: &NewLogs<'_>) -> Result<(), NodeError> {
    let name = nvlog_name(l.volume, l.epoch);
    let region = env
        .fresh_region(&name, NvLog::<Box<dyn Nvram>>::region_bytes(l.partition_bytes))
        .map_err(|source| NodeError::Io { what: format!("NVRAM region {name}"), source })?;
    NvLog::format(region, l.volume_id, l.partition_bytes, l.start)
        .map_err(|source| NodeError::NvLog { name: name.clone(), source })?;
    let name = changes_name(l.volume);
    let region = env
        .fresh_region(&name, ChangeMap::region_bytes(l.size))
        .map_err(|source| NodeError::Io { what: format!("NVRAM region {name}"), source })?;
    let changes = |source| NodeError::ChangeMap { name: name.clone(), source };
    let mut map = ChangeMap::open(region, l.size).map_err(changes)?;
    match l.changed {
        Some(ranges) => {
            for &(o, len) in ranges {
                map.mark(o, len);
            }
        }
        None => map.mark_all(),
    }
    map.set_base(l.base.clone());
    map.persist().map_err(changes)
}

/// Makes promoted `mirror` this node's primary volume: its logs (steps 2 and 3 of the
/// module's sequence), without starting it. `report`: the promotion's, where it ran in
/// this process; `None` at a start that finds a mirror promoted without its record.
pub fn take_up_promoted(
    env: &mut impl NodeEnv,
    mirror: &Mirror,
    report: Option<&PromoteReport>,
    mirrored_to_from: bool,
) -> Result<Promoted, NodeError> {
    let meta = mirror.meta();
    if !meta.promoted {
        return Err(NodeError::Refused(format!("the mirror of {} is not promoted", meta.volume)));
    }
    let v = Promoted {
        volume: meta.volume.clone(),
        volume_id: meta.volume_id,
        size: meta.volume_bytes,
        partition_bytes: crate::usize_of(meta.partition_bytes),
        epoch: meta.epoch,
        from: meta.source_node.clone(),
        mirrored_to_from,
    };
    // The NVLog's numbering continues the mirror's; the change map is relative to the old
    // source's last CP here, with what the replay wrote marked (everything, where the
    // replay is not known): a returning old primary is brought back by a delta resync.
    let (start, changed) = match report {
        Some(r) => (Checkpoint { released_cp: r.applied_cp, next_seq: r.last_seq + 1 }, Some(&r.replayed[..])),
        None => (Checkpoint { released_cp: meta.applied_cp, next_seq: meta.applied_seq + 1 }, None),
    };
    prepare_logs(
        env,
        &NewLogs {
            volume: &v.volume,
            volume_id: v.volume_id,
            size: v.size,
            partition_bytes: v.partition_bytes,
            epoch: v.epoch,
            start,
            base: Some(ChangeBase { peer: meta.source_node.clone(), cp: meta.applied_cp }),
            changed,
        },
    )?;
    env.record_primary(&v)
        .map_err(|source| NodeError::Io { what: format!("save the record of volume {}", v.volume), source })?;
    Ok(v)
}

/// Fails `mirror` over: promotes it (epoch at least `epoch`, an external fencing token,
/// where given), takes it up as this node's primary and starts it.
pub fn failover(env: &mut impl NodeEnv, mirror: &Mirror, epoch: Option<u64>) -> Result<PromoteReport, NodeError> {
    let report = promote(env, mirror, epoch)?;
    let v = take_up_promoted(env, mirror, Some(&report), false)?;
    start(env, &v)?;
    Ok(report)
}

/// The new primary's half of a switchover: `mirror` must hold everything the primary
/// drained at (CP `cp`, next sequence `next_seq`); it is promoted (nothing to replay) and
/// taken up mirrored to the old primary, which was made this volume's mirror first.
pub fn takeover(env: &mut impl NodeEnv, mirror: &Mirror, cp: u64, next_seq: u64) -> Result<PromoteReport, NodeError> {
    let meta = mirror.meta();
    if meta.promoted || !meta.consistent || meta.applied_cp != cp || meta.applied_seq + 1 != next_seq {
        return Err(NodeError::Refused(format!(
            "the mirror holds CP {} up to sequence {} (consistent: {}, promoted: {}); the primary drained at CP {cp} \
             before sequence {next_seq}: not level, no switchover",
            meta.applied_cp, meta.applied_seq, meta.consistent, meta.promoted,
        )));
    }
    let report = promote(env, mirror, None)?;
    let v = take_up_promoted(env, mirror, Some(&report), true)?;
    start(env, &v)?;
    Ok(report)
}

fn start(env: &mut impl NodeEnv, v: &Promoted) -> Result<(), NodeError> {
    env.start_primary(v)
        .map_err(|source| NodeError::Io { what: format!("start the promoted volume {}", v.volume), source })
}

fn promote(env: &mut impl NodeEnv, mirror: &Mirror, epoch: Option<u64>) -> Result<PromoteReport, NodeError> {
    #[cfg(any(test, feature = "sim"))]
    if env.planted_bug() == Some(PlantedBug::FailoverSkipsReplay) {
        return mirror.promote_skipping_replay(epoch).map_err(NodeError::Promote);
    }
    let _ = &env;
    mirror.promote_to(epoch).map_err(NodeError::Promote)
}

/// Makes `storage`, this node's primary volume until now, the mirror `meta` describes: a
/// switchover's old primary (level with the new one), or a failed-over one coming back
/// (a delta resync where `meta.resyncing`, else a baseline). In this order, so that a
/// crash between two steps never leaves the storage both a primary and a mirror: the
/// primary record goes (and the epochs it knew are kept as fences), the storage is
/// recorded as the mirror's, its log files are made empty, its metadata saved, and it
/// opens.
pub fn adopt_as_mirror<E: MirrorEnv>(
    env: &mut E,
    meta: MirrorMeta,
    storage: E::Storage,
    fence_epoch: u64,
) -> Result<Arc<Mirror>, NodeError> {
    let what = |step: &str| format!("make {} the mirror of {}: {step}", meta.volume, meta.source_node);
    env.retire_for_mirror(&meta, &storage, fence_epoch)
        .map_err(|source| NodeError::Io { what: what("retire the primary"), source })?;
    env.record_mirror_storage(&meta, &storage)
        .map_err(|source| NodeError::Io { what: what("record its storage"), source })?;
    let bytes = crate::usize_of(meta.partition_bytes);
    let mut logs = Vec::with_capacity(PARTITIONS);
    for p in 0..PARTITIONS {
        let name = mirror_log_name(&meta.source_node, &meta.volume, p);
        let log = env.fresh_region(&name, bytes).map_err(|source| NodeError::Io { what: what(&name), source })?;
        logs.push(log);
    }
    let logs: [Box<dyn Nvram>; PARTITIONS] = logs.try_into().map_err(|_| NodeError::Refused("two logs".into()))?;
    let what = what("open");
    env.open_mirror(meta, logs, storage).map_err(|source| NodeError::Io { what, source })
}

/// The metadata with which a failed-over primary's storage comes back as the new
/// primary's mirror (`meta`: its identity and the new primary's epoch, nothing applied).
/// A delta resync, from the last CP the two have in common, where the new primary's change
/// map is relative to this node (`me`; `new_primary_base`) and this node knows its own
/// changes since (its volume ran: `own_changes_known`), the new primary then copying back
/// both sides' changes; a baseline otherwise.
pub fn returning_mirror_meta(
    mut meta: MirrorMeta,
    me: &str,
    new_primary_base: Option<&ChangeBase>,
    own_changes_known: bool,
) -> MirrorMeta {
    if let Some(base) = new_primary_base.filter(|b| own_changes_known && b.peer == me) {
        meta.applied_cp = base.cp;
        meta.resyncing = true;
    }
    meta
}

/// The metadata with which a switchover's old primary is its successor's mirror (`meta`:
/// its identity and the successor's epoch): level with it, every entry before `next_seq`
/// applied as of CP `cp`, the CP the primary drained at. Nothing is copied.
pub fn switched_mirror_meta(meta: MirrorMeta, cp: u64, next_seq: u64) -> MirrorMeta {
    MirrorMeta { applied_cp: cp, applied_seq: next_seq - 1, consistent: true, baseline_started: false, ..meta }
}
