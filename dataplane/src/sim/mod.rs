//! The deterministic simulator: the real source, destination, CP, failover and RAID-4
//! code, run on one thread against simulated media, a simulated network and a simulated
//! clock, every choice drawn from one seed. After the fault phases of a run it checks
//! what nvmirror promises, and a failing seed replays exactly.
//!
//! The shape follows TigerBeetle's VOPR and FoundationDB's simulation: the code under test
//! is generic over its environment ([`crate::clock::Clock`], [`crate::transport::Connector`],
//! [`crate::storage::BlockDevice`], [`crate::nvram::Nvram`]), and here each of those is
//! a model the simulator controls:
//!
//! - nodes run their volumes' pollers ([`crate::source::stepped`]) and their mirrors'
//!   job queues ([`crate::destination::Mirror::open_stepped`]) one step at a time, in an
//!   order drawn from the seed;
//! - the network ([`crate::transport::mem::MemNet`]) delays every frame, and in fault
//!   phases cuts links (stalled, reset, or silently dropping), loses, duplicates and
//!   reorders frames;
//! - media ([`media`]) keep only what was persisted, flushed or saved when a node's power
//!   is cut, which may happen after any durable operation: the rest is lost or torn;
//! - disks fail reads, flip bits, and disappear; the clock jumps forward.
//!
//! Checks, on every run:
//! - every acknowledged write is readable, whole, from whichever node is primary: after
//!   every failover and restart, and at the end of every phase;
//! - the mirror equals the primary at a completed CP (forced once faults stop);
//! - parity and checksums are consistent after recovery (scrub finds nothing it cannot
//!   explain by the bits the simulator flipped, and a second scrub finds nothing);
//! - no two nodes acknowledged writes of the volume in one epoch, and a node that lost
//!   the volume to a failover acknowledges no write submitted to it afterwards;
//! - liveness: once faults stop, the pair gets back in sync and new writes are
//!   acknowledged within a bounded simulated time.
//!
//! Faults are kept within what the design claims to survive: one failed disk per RAID-4
//! volume at a time, and a node's power is cut while one of its volumes is degraded only
//! where the other site holds every acknowledged write. That crash is the RAID write
//! hole's double fault, which no RAID-4 survives alone without a parity log: the volume
//! must refuse to start with a clear error (a primary's; the administrator then fails over)
//! or be copied over whole (a mirror's), and every check must still hold.

pub mod media;
pub mod model;

use std::collections::{BTreeMap, VecDeque};
use std::hash::Hasher;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, Sender};
use parking_lot::Mutex;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng as SimRng;
use serde::Serialize;

use crate::clock::Clock;
use crate::destination::{Mirror, MirrorMeta};
use crate::format::BLOCK_BYTES;
use crate::frontend::{Completer, Export, IoReply, IoRequest};
use crate::log::ChangeMap;
use crate::log::{NvLog, PARTITIONS};
use crate::node::{MirrorEnv, NodeEnv, NodeError, Promoted};
use crate::nvram::Nvram;
use crate::raid::{Geometry, Raid4};
use crate::source::{
    self, Control, PairState, PlantedBug, Policy, SourceConfig, SourceHandle, SteppedSource, PARTITION_BYTES_MIN,
};
use crate::storage::{BlockDevice, DiskSpec, Engine};
use crate::transport::mem::{Cut, FrameFaults, MemNet, NetCounters};
use crate::transport::{FrameHandler, Hello, Intent, MirrorDirectory, RefuseCode, ReplySink, Welcome};

use media::{CrashDamage, DiskMedia, NvramMedia, Power, SimClock, SimDisk, SimMetaStore, SimNvram};
use model::{block_contents, Model};

/// The one volume of every run.
pub const VOLUME: &str = "vol";
const VOLUME_ID: u64 = 0x5157_0000_0000_0001;
/// Volume blocks (4 KiB each).
const BLOCKS: u64 = 192;
const PARTITION_BYTES: usize = PARTITION_BYTES_MIN;
const MS: u64 = 1_000_000;
const SEC: u64 = 1_000 * MS;
/// How long a healed cluster may take to get back in sync and take writes again.
const LIVENESS_NS: u64 = 60 * SEC;
/// The media key of a node's change map.
const CHANGES: &str = "vol.changes";
/// Nodes a run may add (fresh mirrors after failovers).
const NODES_MAX: usize = 6;

/// What a run does.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Fault phases, each followed by a calm phase that checks everything.
    pub phases: u32,
    /// Simulated length of each fault phase.
    pub phase_ns: u64,
    /// Inject faults (off: the same workload on a healthy cluster).
    pub faults: bool,
    /// A deliberate defect in the source, for the simulator's own test.
    pub planted_bug: Option<PlantedBug>,
    /// Print every event as it happens.
    pub trace: bool,
    /// Trace every write to this block and its outcome (to follow one block through a
    /// failing seed).
    pub watch_block: Option<u64>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self { phases: 3, phase_ns: 2 * SEC, faults: true, planted_bug: None, trace: false, watch_block: None }
    }
}

/// Faults injected, by class.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct FaultCounts {
    pub power_cuts: u64,
    pub crashes_at_op: u64,
    pub restarts: u64,
    pub failovers: u64,
    pub failovers_refused: u64,
    pub stale_primary_writes: u64,
    pub link_stalls: u64,
    pub link_resets: u64,
    pub link_drops: u64,
    pub frame_fault_windows: u64,
    pub clock_jumps: u64,
    pub disk_read_errors: u64,
    pub disk_bit_flips: u64,
    /// Bits flipped in acknowledged NVLog entries of the primary (then its power cut).
    pub nvram_bit_flips: u64,
    /// Power cut on a node whose RAID-4 volume (the primary's, or a mirror's) was degraded.
    pub degraded_crashes: u64,
    /// Of those, restarts that found the volume dirty and degraded (the write hole): a
    /// primary refused to start (a clear error, then a failover), a mirror opened for a
    /// copy over it.
    pub write_holes_refused: u64,
    pub write_holes_copied_over: u64,
    pub disks_lost: u64,
    pub disks_replaced: u64,
    pub switchovers: u64,
    /// Old primaries brought back as mirrors, by delta resync or (change map not
    /// relative to them) baseline.
    pub failbacks_delta: u64,
    pub failbacks_baseline: u64,
    /// Runs (of one) under policy sync.
    pub sync_policy: u64,
}

/// What a run did, when it passed.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    pub seed: u64,
    pub ticks: u64,
    pub sim_ns: u64,
    pub writes_submitted: u64,
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub blocks_verified: u64,
    pub volume_checks: u64,
    pub cps_forced: u64,
    pub scrubs: u64,
    pub nodes: usize,
    pub faults: FaultCounts,
    pub net: NetCounters,
    pub crash_damage: CrashDamage,
    /// Durable operations performed across all nodes (the points a power cut can hit).
    pub durable_ops: u64,
    /// A digest of the run's events: the same seed gives the same digest.
    pub digest: u64,
}

/// Why a run failed, with the events that led there.
#[derive(Debug, Clone)]
pub struct SimFailure {
    pub seed: u64,
    pub sim_ns: u64,
    pub tick: u64,
    pub message: String,
    pub trace: Vec<String>,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed {:#x} failed at {} ms (tick {}): {}", self.seed, self.sim_ns / MS, self.tick, self.message)?;
        writeln!(f, "last events:")?;
        for t in &self.trace {
            writeln!(f, "  {t}")?;
        }
        Ok(())
    }
}

/// The command that replays a seed exactly.
pub fn replay_command(seed: u64, opts: &SimOptions) -> String {
    let mut cmd =
        format!("cargo run --release -p nvmirror-dataplane --features sim --bin nvmirror-sim -- --seed {seed:#x}");
    let d = SimOptions::default();
    if opts.phases != d.phases {
        cmd += &format!(" --phases {}", opts.phases);
    }
    if opts.phase_ns != d.phase_ns {
        cmd += &format!(" --phase-ms {}", opts.phase_ns / MS);
    }
    if !opts.faults {
        cmd += " --no-faults";
    }
    match opts.planted_bug {
        Some(PlantedBug::AckBeforeRemotePersist) => cmd += " --planted-bug ack-before-remote-persist",
        Some(PlantedBug::FailoverSkipsReplay) => cmd += " --planted-bug failover-skips-replay",
        None => {}
    }
    cmd + " --trace"
}

/// Runs one seed.
pub fn run(seed: u64, opts: &SimOptions) -> Result<SimReport, SimFailure> {
    let mut w = World::new(seed, opts.clone());
    let r = w.run();
    match r {
        Ok(()) => Ok(w.report()),
        Err(message) => Err(SimFailure {
            seed,
            sim_ns: w.clock.now_ns(),
            tick: w.ticks,
            message,
            trace: w.trace.iter().cloned().collect(),
        }),
    }
}

// ---- nodes ----

/// What a node keeps across crashes: its media and the records it would keep in its data
/// dir (each saved atomically).
struct Durable {
    power: Arc<Power>,
    nvram: BTreeMap<String, Arc<Mutex<NvramMedia>>>,
    disks: BTreeMap<String, Arc<Mutex<DiskMedia>>>,
    /// Mirror metadata (`meta.json`), by source node.
    metas: BTreeMap<String, Arc<Mutex<Option<MirrorMeta>>>>,
    /// Mirror storage (`storage.json`): the mirror volume's disks, by source node.
    mirror_disks: BTreeMap<String, Vec<String>>,
    /// The primary volume (`node.json`), if this node holds it.
    volume: Option<VolumeRecord>,
    /// The highest epoch this node has known the volume at, kept when the records that
    /// held it go (a promoted mirror whose disks became another mirror): a node never takes
    /// a hello from an older epoch.
    fence_epoch: u64,
    /// This node's RAID-4 geometry for volumes it creates and mirrors it hosts.
    data_disks: u32,
    stripe_unit: u32,
}

#[derive(Debug, Clone)]
struct VolumeRecord {
    epoch: u64,
    disks: Vec<String>,
    mirror: Option<String>,
    /// The volume is a promoted mirror of this source node (and shares its RAID volume).
    promoted_from: Option<String>,
}

impl Durable {
    fn disk(&mut self, key: &str, len: u64) -> Arc<Mutex<DiskMedia>> {
        self.disks.entry(key.to_string()).or_insert_with(|| DiskMedia::new(len)).clone()
    }
    fn region(&mut self, key: &str, len: usize) -> Arc<Mutex<NvramMedia>> {
        self.nvram.entry(key.to_string()).or_insert_with(|| NvramMedia::new(len)).clone()
    }
    fn geometry(&self) -> Geometry {
        Geometry::new(self.data_disks, self.stripe_unit, BLOCKS * BLOCK_BYTES as u64).expect("valid sim geometry")
    }
}

type Shared<T> = Arc<Mutex<T>>;

type HostedMirror = (Arc<Mirror>, Arc<Raid4>);

/// A running node's mirrors, as the network's hellos find them.
struct Directory {
    name: String,
    durable: Shared<Durable>,
    /// By source node: the mirror and its RAID-4 volume.
    mirrors: Mutex<BTreeMap<String, HostedMirror>>,
}

fn disk_spec(key: &str) -> DiskSpec {
    DiskSpec { engine: Engine::Pread, path: format!("sim:{key}").into() }
}

fn open_raid(
    durable: &Shared<Durable>,
    keys: &[String],
    create: bool,
    write_hole: crate::raid::WriteHole,
) -> io::Result<Arc<Raid4>> {
    let mut d = durable.lock();
    let geo = d.geometry();
    let power = d.power.clone();
    let devs: Vec<(DiskSpec, Arc<dyn BlockDevice>)> = keys
        .iter()
        .map(|k| (disk_spec(k), Arc::new(SimDisk::new(d.disk(k, geo.member_bytes()), power.clone())) as _))
        .collect();
    drop(d);
    let raid = if create {
        Raid4::create_devices(VOLUME, devs, geo)
    } else {
        Raid4::open_devices_with(VOLUME, devs.into_iter().map(|(s, d)| (s, Ok(d))).collect(), write_hole)
    }
    .map_err(io::Error::other)?;
    raid.set_serial_io(true);
    Ok(Arc::new(raid))
}

/// The media key of a RAID volume's member.
fn disk_key(raid: &Raid4, member: usize) -> String {
    raid.disks()[member].path.to_string_lossy().trim_start_matches("sim:").to_string()
}

/// What names a RAID volume's disks: `volumes/vol` or `mirrors/SOURCE/vol`.
fn volume_prefix(raid: &Raid4) -> String {
    let k = disk_key(raid, 0);
    k.rsplit_once('/').map_or(k.clone(), |(p, _)| p.to_string())
}

/// A new mirror's metadata for the run's volume, sourced from `source` at `epoch`.
fn mirror_meta(source: &str, epoch: u64) -> MirrorMeta {
    MirrorMeta::new(&Hello {
        source_node: source.to_string(),
        volume: VOLUME.into(),
        volume_id: VOLUME_ID,
        epoch,
        volume_bytes: BLOCKS * BLOCK_BYTES as u64,
        partition_bytes: PARTITION_BYTES as u64,
        intent: Intent::Resume,
        base_seq: 0,
        base_cp_gen: 0,
    })
}

/// A RAID-4 volume that stopped with writes in flight while degraded: refused to start.
fn is_write_hole(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<crate::raid::RaidError>())
        .is_some_and(|r| matches!(r, crate::raid::RaidError::DirtyDegraded { .. }))
}

fn member_keys(prefix: &str, members: usize) -> Vec<String> {
    (0..members).map(|m| format!("{prefix}/d{m}")).collect()
}

impl Directory {
    fn open_mirror(&self, meta: MirrorMeta, create: bool) -> io::Result<(Arc<Mirror>, Arc<Raid4>)> {
        let src = meta.source_node.clone();
        let prefix = format!("mirrors/{src}/{VOLUME}");
        let (keys, store_cell, power, logs) = {
            let mut d = self.durable.lock();
            let members = d.geometry().members();
            let keys = d.mirror_disks.get(&src).cloned().unwrap_or_else(|| member_keys(&prefix, members));
            if create {
                // Members left by a creation that did not finish hold nothing anyone saw.
                for k in &keys {
                    d.disks.remove(k);
                }
                for p in 0..PARTITIONS {
                    d.nvram.remove(&format!("{prefix}/log.{p}"));
                }
            }
            let power = d.power.clone();
            let logs: Vec<Box<dyn Nvram>> = (0..PARTITIONS)
                .map(|p| {
                    let r = d.region(&format!("{prefix}/log.{p}"), PARTITION_BYTES);
                    Box::new(SimNvram::open(r, power.clone())) as Box<dyn Nvram>
                })
                .collect();
            let cell = d.metas.entry(src.clone()).or_insert_with(|| Arc::new(Mutex::new(None))).clone();
            (keys, cell, power, logs)
        };
        // A mirror's storage found dirty and degraded (the node crashed during a CP with a
        // member gone) is opened all the same and taken as inconsistent: the source then
        // copies it over whole. A promoted mirror is a primary's volume: refused instead.
        let write_hole = if meta.promoted { crate::raid::WriteHole::Refuse } else { crate::raid::WriteHole::Accept };
        let raid = open_raid(&self.durable, &keys, create, write_hole)?;
        let mut meta = meta;
        if raid.write_hole_found() && (meta.consistent || meta.pending_cp.is_some()) {
            // Nothing to redo on it either: the copy rewrites everything.
            meta.consistent = false;
            meta.resyncing = false;
            meta.pending_cp = None;
            crate::destination::MetaStore::save(
                &SimMetaStore { durable: store_cell.clone(), power: power.clone() },
                &meta,
            )?;
        }
        if create && power.admit() {
            self.durable.lock().mirror_disks.insert(src.clone(), keys);
        }
        let store = SimMetaStore { durable: store_cell, power };
        if create {
            crate::destination::MetaStore::save(&store, &meta)?;
        }
        let logs: [Box<dyn Nvram>; PARTITIONS] = logs.try_into().map_err(|_| io::Error::other("two logs"))?;
        let mirror = Mirror::open_stepped(meta, Box::new(store), logs, raid.clone())?;
        Ok((mirror, raid))
    }
}

impl MirrorDirectory for Directory {
    fn attach(
        &self,
        hello: &Hello,
        sink: Arc<dyn ReplySink>,
    ) -> Result<(Box<dyn FrameHandler>, Welcome), (RefuseCode, String)> {
        if hello.source_node == self.name {
            return Err((RefuseCode::Mismatch, "a node cannot mirror to itself".into()));
        }
        let known = {
            let d = self.durable.lock();
            let metas = d.metas.values().filter_map(|m| m.lock().as_ref().map(|m| m.epoch)).max().unwrap_or(0);
            d.fence_epoch.max(metas).max(d.volume.as_ref().map_or(0, |v| v.epoch))
        };
        if hello.epoch < known {
            return Err((
                RefuseCode::StaleEpoch,
                format!("this node knows volume {VOLUME} at epoch {known}; the source's {} is stale", hello.epoch),
            ));
        }
        let existing = self.mirrors.lock().get(&hello.source_node).map(|(m, _)| m.clone());
        let mirror = match existing {
            Some(m) => m,
            None => {
                if self.durable.lock().volume.is_some() {
                    return Err((RefuseCode::Mismatch, format!("volume {VOLUME} is a primary on {}", self.name)));
                }
                if hello.intent != Intent::Baseline {
                    return Err((RefuseCode::Mismatch, "no mirror of this volume here; a baseline is needed".into()));
                }
                let (m, raid) = self
                    .open_mirror(MirrorMeta::new(hello), true)
                    .map_err(|e| (RefuseCode::Internal, format!("create mirror: {e}")))?;
                self.mirrors.lock().insert(hello.source_node.clone(), (m.clone(), raid));
                m
            }
        };
        let (session, welcome) = mirror.attach(hello, sink, None)?;
        Ok((Box::new(session), welcome))
    }
}

/// The node core's environment in the simulator: one node's simulated NVRAM, its record
/// and its stepped source. Power cut, it refuses every durable step.
struct SimEnv<'w> {
    world: &'w mut World,
    node: String,
}

impl SimEnv<'_> {
    fn durable(&self) -> io::Result<Shared<Durable>> {
        let durable = self.world.nodes[&self.node].durable.clone();
        if durable.lock().power.is_cut() {
            return Err(io::Error::other(format!("node {}: power cut", self.node)));
        }
        Ok(durable)
    }
}

impl NodeEnv for SimEnv<'_> {
    fn fresh_region(&mut self, name: &str, bytes: usize) -> io::Result<Box<dyn Nvram>> {
        let durable = self.durable()?;
        let mut d = durable.lock();
        d.nvram.remove(name);
        let region = d.region(name, bytes);
        Ok(Box::new(SimNvram::open(region, d.power.clone())))
    }

    fn record_primary(&mut self, v: &Promoted) -> io::Result<()> {
        let durable = self.durable()?;
        let mut d = durable.lock();
        let disks =
            d.mirror_disks.get(&v.from).cloned().ok_or_else(|| io::Error::other("promoted mirror without storage"))?;
        d.volume = Some(VolumeRecord {
            epoch: v.epoch,
            disks,
            mirror: v.mirrored_to_from.then(|| v.from.clone()),
            promoted_from: Some(v.from.clone()),
        });
        Ok(())
    }

    fn start_primary(&mut self, v: &Promoted) -> io::Result<()> {
        let live = self.world.nodes[&self.node].live.as_ref().ok_or_else(|| io::Error::other("down"))?;
        let raid = live.directory.mirrors.lock().get(&v.from).map(|(_, r)| r.clone());
        self.world.start_source(&self.node, raid)
    }

    fn planted_bug(&self) -> Option<PlantedBug> {
        self.world.opts.planted_bug
    }
}

impl MirrorEnv for SimEnv<'_> {
    /// The RAID volume and its disks' keys.
    type Storage = (Arc<Raid4>, Vec<String>);

    fn retire_for_mirror(&mut self, meta: &MirrorMeta, storage: &Self::Storage, fence_epoch: u64) -> io::Result<()> {
        let durable = self.durable()?;
        let live = self.world.nodes[&self.node].live.as_ref().ok_or_else(|| io::Error::other("down"))?;
        let directory = live.directory.clone();
        let src = &meta.source_node;
        let mut d = durable.lock();
        d.volume = None;
        d.fence_epoch = d.fence_epoch.max(fence_epoch);
        // Promoted mirrors of earlier eras on these disks (of this source or another) go:
        // the disks are this mirror's now, and only one RAID volume may drive them.
        let sharing: Vec<String> =
            d.mirror_disks.iter().filter(|(s, k)| *s == src || **k == storage.1).map(|(s, _)| s.clone()).collect();
        for s in sharing {
            directory.mirrors.lock().remove(&s);
            d.mirror_disks.remove(&s);
            if let Some(m) = d.metas.remove(&s) {
                let e = m.lock().as_ref().map_or(0, |m| m.epoch);
                d.fence_epoch = d.fence_epoch.max(e);
            }
        }
        directory.mirrors.lock().remove(src);
        Ok(())
    }

    fn record_mirror_storage(&mut self, meta: &MirrorMeta, storage: &Self::Storage) -> io::Result<()> {
        self.durable()?.lock().mirror_disks.insert(meta.source_node.clone(), storage.1.clone());
        Ok(())
    }

    fn open_mirror(
        &mut self,
        meta: MirrorMeta,
        logs: [Box<dyn Nvram>; PARTITIONS],
        storage: Self::Storage,
    ) -> io::Result<Arc<Mirror>> {
        let durable = self.durable()?;
        let src = meta.source_node.clone();
        let (cell, power) = {
            let mut d = durable.lock();
            let cell = Arc::new(Mutex::new(None));
            d.metas.insert(src.clone(), cell.clone());
            (cell, d.power.clone())
        };
        let store = SimMetaStore { durable: cell, power };
        crate::destination::MetaStore::save(&store, &meta)?;
        let (raid, _) = storage;
        let mirror = Mirror::open_stepped(meta, Box::new(store), logs, raid.clone())?;
        let live = self.world.nodes[&self.node].live.as_ref().ok_or_else(|| io::Error::other("down"))?;
        live.directory.mirrors.lock().insert(src, (mirror.clone(), raid));
        Ok(mirror)
    }
}

/// A running primary volume.
struct LiveSource {
    stepped: SteppedSource<MemNet>,
    handle: SourceHandle,
    raid: Arc<Raid4>,
    epoch: u64,
}

struct Node {
    durable: Shared<Durable>,
    live: Option<Live>,
    /// Damaged disks (failed member, flipped bits) not yet repaired: no power cut then.
    disk_damage: u32,
}

struct Live {
    source: Option<LiveSource>,
    directory: Arc<Directory>,
}

// ---- the client ----

#[derive(Debug)]
struct Inflight {
    node: String,
    epoch: u64,
    blocks: Vec<(u64, u64)>,
    /// Sent to a node that had lost the volume to a failover: must fail.
    stale: bool,
}

// ---- scheduled actions ----

#[derive(Debug, Clone)]
enum Action {
    Restart(String),
    Failover(String),
    PairNew,
    Failback(String),
    Heal(String, String),
    FramesClean,
    /// `volume`: the RAID volume's disk prefix (it may have changed roles since).
    ReplaceDisk {
        node: String,
        member: usize,
        volume: String,
    },
}

struct World {
    seed: u64,
    opts: SimOptions,
    rng: SimRng,
    clock: Arc<SimClock>,
    net: MemNet,
    nodes: BTreeMap<String, Node>,
    /// The node the client writes to: the volume's primary as the administrator knows it.
    primary: String,
    /// Its mirror, once paired.
    mirror: Option<String>,
    /// Nodes that lost the volume to a failover, and when.
    stale: BTreeMap<String, u64>,
    next_node: u32,
    model: Model,
    inflight: BTreeMap<u64, Inflight>,
    next_cookie: u64,
    replies_tx: Sender<IoReply>,
    replies_rx: Receiver<IoReply>,
    qd: usize,
    /// The volume's policy for this run.
    policy: Policy,
    /// The primary's mirror held every acknowledged write at its last step.
    primary_current: bool,
    writing: bool,
    faulting: bool,
    /// Which node acknowledged writes in each epoch.
    ack_epochs: BTreeMap<u64, String>,
    actions: BTreeMap<(u64, u64), Action>,
    action_seq: u64,
    attach_rx: Option<Receiver<Result<(), String>>>,
    /// The watched block's version last seen on each mirror.
    watched: BTreeMap<String, u64>,
    /// A failover its node's crash interrupted: run again once it is back.
    retry_failover: Option<String>,
    /// Nodes whose volume refused to start (dirty and degraded: the RAID-4 write hole).
    refused: std::collections::BTreeSet<String>,
    /// Nodes whose power was cut while a RAID-4 volume of theirs was degraded: a disk
    /// replacement that finds one down waits for it.
    degraded_crashed: std::collections::BTreeSet<String>,
    ticks: u64,
    trace: VecDeque<String>,
    digest: std::collections::hash_map::DefaultHasher,
    faults: FaultCounts,
    /// Bits flipped per RAID volume (node, disk prefix) since its last scrub.
    flips: BTreeMap<(String, String), u64>,
    damage: CrashDamage,
    durable_ops_done: u64,
    writes_submitted: u64,
    writes_acked: u64,
    writes_failed: u64,
    blocks_verified: u64,
    volume_checks: u64,
    cps_forced: u64,
    scrubs: u64,
}

const TRACE_KEEP: usize = 400;

impl World {
    fn new(seed: u64, opts: SimOptions) -> Self {
        let clock = Arc::new(SimClock::default());
        let mut rng = SimRng::seed_from_u64(seed);
        let net = MemNet::new(clock.clone(), rng.gen(), (20_000, 400_000));
        let (replies_tx, replies_rx) = unbounded();
        let mut w = World {
            seed,
            opts,
            rng,
            clock,
            net,
            nodes: BTreeMap::new(),
            primary: "a".into(),
            mirror: None,
            stale: BTreeMap::new(),
            next_node: 0,
            model: Model::new(BLOCKS),
            inflight: BTreeMap::new(),
            next_cookie: 0,
            replies_tx,
            replies_rx,
            qd: 4,
            policy: Policy::Strict,
            primary_current: false,
            writing: true,
            faulting: false,
            ack_epochs: BTreeMap::new(),
            actions: BTreeMap::new(),
            action_seq: 0,
            attach_rx: None,
            retry_failover: None,
            refused: Default::default(),
            degraded_crashed: Default::default(),
            watched: BTreeMap::new(),
            ticks: 0,
            trace: VecDeque::new(),
            digest: Default::default(),
            faults: FaultCounts::default(),
            flips: BTreeMap::new(),
            damage: CrashDamage::default(),
            durable_ops_done: 0,
            writes_submitted: 0,
            writes_acked: 0,
            writes_failed: 0,
            blocks_verified: 0,
            volume_checks: 0,
            cps_forced: 0,
            scrubs: 0,
        };
        w.policy = if w.rng.gen_bool(0.5) { Policy::Sync } else { Policy::Strict };
        w.event(format!("policy {}", w.policy.as_str()));
        w.faults.sync_policy = u64::from(w.policy == Policy::Sync);
        // Each site its own geometry: the mirror protocol carries volume blocks.
        let a = w.add_node();
        let b = w.add_node();
        w.primary = a.clone();
        w.create_volume(&a).expect("create the volume");
        w.mirror = Some(b.clone());
        w.attach(&b);
        w
    }

    fn event(&mut self, what: String) {
        let line = format!("{:>9.3} ms  {what}", self.clock.now_ns() as f64 / MS as f64);
        self.digest.write(line.as_bytes());
        if self.opts.trace {
            println!("{line}");
        }
        self.trace.push_back(line);
        if self.trace.len() > TRACE_KEEP {
            self.trace.pop_front();
        }
    }

    fn report(&mut self) -> SimReport {
        let ops: u64 =
            self.nodes.values().map(|n| n.durable.lock().power.ops.load(std::sync::atomic::Ordering::Relaxed)).sum();
        SimReport {
            seed: self.seed,
            ticks: self.ticks,
            sim_ns: self.clock.now_ns(),
            writes_submitted: self.writes_submitted,
            writes_acked: self.writes_acked,
            writes_failed: self.writes_failed,
            blocks_verified: self.blocks_verified,
            volume_checks: self.volume_checks,
            cps_forced: self.cps_forced,
            scrubs: self.scrubs,
            nodes: self.nodes.len(),
            faults: self.faults,
            net: self.net.counters(),
            crash_damage: self.damage,
            durable_ops: self.durable_ops_done + ops,
            digest: self.digest.finish(),
        }
    }

    fn schedule(&mut self, after_ns: u64, a: Action) {
        self.action_seq += 1;
        self.actions.insert((self.clock.now_ns() + after_ns, self.action_seq), a);
    }

    // ---- nodes ----

    fn add_node(&mut self) -> String {
        let name = ((b'a' + u8::try_from(self.next_node).expect("few nodes")) as char).to_string();
        self.next_node += 1;
        let data_disks = self.rng.gen_range(2..=4);
        let stripe_unit = [4096, 8192, 16384][self.rng.gen_range(0..3)];
        let durable = Arc::new(Mutex::new(Durable {
            power: Arc::new(Power::default()),
            nvram: BTreeMap::new(),
            disks: BTreeMap::new(),
            metas: BTreeMap::new(),
            mirror_disks: BTreeMap::new(),
            volume: None,
            fence_epoch: 0,
            data_disks,
            stripe_unit,
        }));
        self.event(format!("node {name} added: RAID-4 {data_disks}+1, {} KiB stripe unit", stripe_unit / 1024));
        let directory =
            Arc::new(Directory { name: name.clone(), durable: durable.clone(), mirrors: Default::default() });
        let flag = durable.lock().power.flag();
        self.net.node_up(&name, Some(directory.clone() as Arc<dyn MirrorDirectory>), flag);
        self.nodes.insert(name.clone(), Node { durable, live: Some(Live { source: None, directory }), disk_damage: 0 });
        name
    }

    fn source_config(&self, node: &str, epoch: u64) -> SourceConfig {
        let mut cfg = SourceConfig::new(node, VOLUME, VOLUME_ID, PARTITION_BYTES);
        cfg.epoch = epoch;
        cfg.cp_interval = Duration::from_millis(150);
        cfg.cache_blocks_max = 96;
        cfg.reconnect_interval = Duration::from_millis(40);
        cfg.ack_timeout = Duration::from_millis(250);
        cfg.cp_timeout = Duration::from_millis(1500);
        cfg.planted_bug = self.opts.planted_bug;
        cfg.policy = self.policy;
        cfg
    }

    fn create_volume(&mut self, node: &str) -> io::Result<()> {
        let n = &self.nodes[node];
        let members = n.durable.lock().geometry().members();
        let keys = member_keys(&format!("volumes/{VOLUME}"), members);
        let raid = open_raid(&n.durable, &keys, true, crate::raid::WriteHole::Refuse)?;
        drop(raid);
        n.durable.lock().volume = Some(VolumeRecord { epoch: 1, disks: keys, mirror: None, promoted_from: None });
        self.start_source(node, None)?;
        self.event(format!("node {node}: volume created ({members} members)"));
        Ok(())
    }

    /// Starts the node's primary volume from its record: NVLog recovery, redo of an
    /// interrupted CP, then the poller. `raid`: the volume's RAID-4, where already open.
    fn start_source(&mut self, node: &str, raid: Option<Arc<Raid4>>) -> io::Result<()> {
        let n = self.nodes.get_mut(node).expect("node");
        let durable = n.durable.clone();
        let Some(rec) = durable.lock().volume.clone() else { return Ok(()) };
        let raid = match raid {
            Some(r) => r,
            None => open_raid(&durable, &rec.disks, false, crate::raid::WriteHole::Refuse)?,
        };
        let (region, power) = {
            let mut d = durable.lock();
            let len = NvLog::<SimNvram>::region_bytes(PARTITION_BYTES);
            (d.region(&format!("{VOLUME}.{}.nvlog", rec.epoch), len), d.power.clone())
        };
        let nvram: Box<dyn Nvram> = Box::new(SimNvram::open(region, power.clone()));
        let (log, recovered) = NvLog::open(nvram, VOLUME_ID, PARTITION_BYTES).map_err(io::Error::other)?;
        let changes = {
            let r = durable.lock().region(CHANGES, ChangeMap::region_bytes(BLOCKS * BLOCK_BYTES as u64));
            ChangeMap::open(Box::new(SimNvram::open(r, power)), BLOCKS * BLOCK_BYTES as u64)
                .map_err(io::Error::other)?
        };
        if let Some(what) = changes.repaired() {
            self.event(format!("node {node}: change map repaired: {what}"));
        }
        let mut cfg = self.source_config(node, rec.epoch);
        cfg.peer = rec.mirror.clone();
        let (stepped, handle) = source::stepped(source::SourceParts {
            cfg,
            nvlog: log,
            recovered,
            device: raid.clone(),
            connector: Arc::new(self.net.clone()),
            clock: self.clock.clone() as Arc<dyn Clock>,
            mirror: rec.mirror.clone(),
            changes: Some(changes),
        })?;
        let n = self.nodes.get_mut(node).expect("node");
        if let Some(live) = &mut n.live {
            live.source = Some(LiveSource { stepped, handle, raid, epoch: rec.epoch });
        }
        Ok(())
    }

    fn attach(&mut self, target: &str) {
        let primary = self.primary.clone();
        let Some(src) = self.live_source(&primary) else { return };
        let (tx, rx) = crossbeam_channel::bounded(1);
        if src
            .handle
            .control(Control::Attach { target: target.to_string(), peer: Some(target.to_string()), reply: tx })
            .is_ok()
        {
            self.attach_rx = Some(rx);
        }
        let n = &self.nodes[&primary];
        if let Some(v) = n.durable.lock().volume.as_mut() {
            v.mirror = Some(target.to_string());
        }
        self.event(format!("pair {primary} -> {target}: attach (baseline)"));
    }

    fn live_source(&mut self, node: &str) -> Option<&mut LiveSource> {
        self.nodes.get_mut(node)?.live.as_mut()?.source.as_mut()
    }

    fn is_live(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.live.is_some())
    }

    /// The node lost power (or crashed): everything not durable is gone.
    fn crash(&mut self, node: &str) -> Result<(), String> {
        let Some(n) = self.nodes.get_mut(node) else { return Ok(()) };
        let Some(live) = n.live.take() else { return Ok(()) };
        n.durable.lock().power.cut_now();
        let reset = self.rng.gen_bool(0.5);
        self.net.node_down(node, reset);
        let Live { source, directory } = live;
        drop(source);
        let mirrors = std::mem::take(&mut *directory.mirrors.lock());
        for (src, (m, _)) in &mirrors {
            if Arc::strong_count(m) > 1 {
                return Err(format!("simulator: the mirror of {src} on {node} is still referenced after a crash"));
            }
        }
        drop(mirrors);
        drop(directory);
        let n = self.nodes.get_mut(node).expect("node");
        let mut d = n.durable.lock();
        let mut damage = CrashDamage::default();
        for m in d.nvram.values() {
            m.lock().crash(&mut self.rng, &mut damage);
        }
        for m in d.disks.values() {
            m.lock().crash(&mut self.rng, &mut damage);
        }
        self.durable_ops_done += d.power.ops.load(std::sync::atomic::Ordering::Relaxed);
        d.power = Arc::new(Power::default());
        drop(d);
        self.damage.add(&damage);
        // Replies the node sent as it died never reached the client.
        self.event(format!("node {node} crashed: {damage:?}"));
        self.drain_replies()?;
        for f in self.inflight.values_mut() {
            if f.node == node {
                f.node = String::new();
            }
        }
        Ok(())
    }

    fn restart(&mut self, node: &str) -> Result<(), String> {
        if self.is_live(node) || !self.nodes.contains_key(node) {
            return Ok(());
        }
        self.faults.restarts += 1;
        let durable = self.nodes[node].durable.clone();
        let directory =
            Arc::new(Directory { name: node.to_string(), durable: durable.clone(), mirrors: Default::default() });
        let flag = durable.lock().power.flag();
        self.nodes.get_mut(node).expect("node").live = Some(Live { source: None, directory: directory.clone() });
        // Mirrors first (a CP a crash interrupted is redone as each opens), then the volume.
        let metas: Vec<(String, Option<MirrorMeta>)> =
            durable.lock().metas.iter().map(|(s, m)| (s.clone(), m.lock().clone())).collect();
        for (src, meta) in metas {
            let Some(meta) = meta else { continue };
            let has_storage = durable.lock().mirror_disks.contains_key(&src);
            if !has_storage {
                continue;
            }
            let (m, raid) = match directory.open_mirror(meta.clone(), false) {
                Ok(x) => x,
                Err(e) if meta.promoted && is_write_hole(&e) => {
                    // A promoted mirror is this node's volume: the volume refuses below.
                    self.event(format!("node {node}: promoted mirror of {src} not opened: {e}"));
                    continue;
                }
                Err(e) => return Err(format!("node {node}: open mirror of {src}: {e}")),
            };
            if raid.write_hole_found() {
                self.faults.write_holes_copied_over += 1;
                self.event(format!(
                    "node {node}: mirror of {src} found dirty and degraded (the write hole): opened for a copy over it"
                ));
            }
            // Opening finishes a failover that raised the epoch before the crash.
            if m.meta().promoted && durable.lock().volume.is_none() {
                // Failed over, and the crash came before the volume record was saved: the
                // promoted mirror is this node's volume now (the shipped code that does so).
                crate::node::take_up_promoted(&mut SimEnv { world: self, node: node.to_string() }, &m, None, false)
                    .map_err(|e| format!("node {node}: take up the promoted mirror of {src}: {e}"))?;
                self.event(format!("node {node}: promoted mirror of {src} taken up as the volume"));
            }
            directory.mirrors.lock().insert(src, (m, raid));
        }
        self.net.node_up(node, Some(directory as Arc<dyn MirrorDirectory>), flag);
        // A primary that is a promoted mirror shares that mirror's RAID volume.
        let from = durable.lock().volume.as_ref().and_then(|v| v.promoted_from.clone());
        let shared = from.and_then(|src| {
            let live = self.nodes[node].live.as_ref().expect("live");
            let r = live.directory.mirrors.lock().get(&src).map(|(_, r)| r.clone());
            r
        });
        match self.start_source(node, shared) {
            Ok(()) => {
                self.refused.remove(node);
            }
            Err(e) if is_write_hole(&e) && self.degraded_crashed.contains(node) => {
                self.faults.write_holes_refused += 1;
                self.refused.insert(node.to_string());
                self.event(format!("node {node}: volume refused to start: {e}"));
                if node == self.primary {
                    // What the error says to do: fail over to the mirror.
                    let Some(m) = self.mirror.clone() else {
                        return Err(format!("node {node}: the volume refused to start and it has no mirror: {e}"));
                    };
                    self.schedule(MS, Action::Failover(m));
                }
            }
            Err(e) => return Err(format!("node {node}: start volume: {e}")),
        }
        self.event(format!("node {node} restarted"));
        if self.retry_failover.as_deref() == Some(node) {
            self.retry_failover = None;
            let promoted = self.nodes[node].durable.lock().volume.is_some();
            if promoted {
                // The promotion was complete: the node took the volume up as it restarted.
                self.took_over(node)?;
            } else {
                self.schedule(MS, Action::Failover(node.to_string()));
            }
        }
        if node == self.primary {
            self.check_primary("after a restart of the primary")?;
        }
        Ok(())
    }

    // ---- the client ----

    fn submit(&mut self, node: &str, stale: bool) {
        let epoch = self.nodes.get(node).and_then(|n| n.live.as_ref()?.source.as_ref().map(|s| s.epoch));
        let Some(epoch) = epoch else { return };
        let first = self.rng.gen_range(0..BLOCKS);
        let n = if self.rng.gen_bool(0.2) { self.rng.gen_range(2..=4u64).min(BLOCKS - first) } else { 1 };
        let zero = !stale && self.rng.gen_ratio(1, 25);
        let trim = zero && self.rng.gen_bool(0.5);
        let mut blocks = Vec::new();
        let mut data = Vec::with_capacity(crate::usize_of(n) * BLOCK_BYTES);
        let mut buf = vec![0u8; BLOCK_BYTES];
        // One version for the whole write: its blocks land together or not at all.
        let version = self.model.next_version();
        for b in first..first + n {
            if !stale {
                self.model.submitted(b, version, zero);
            }
            blocks.push((b, version));
            if !zero {
                block_contents(b, version, &mut buf);
                data.extend_from_slice(&buf);
            }
        }
        let offset = first * BLOCK_BYTES as u64;
        let len = u32::try_from(n * BLOCK_BYTES as u64).expect("small");
        let request = if !zero {
            IoRequest::Write { offset, data, fua: false }
        } else if trim {
            IoRequest::Trim { offset, len }
        } else {
            IoRequest::WriteZeroes { offset, len, fua: false }
        };
        self.next_cookie += 1;
        let cookie = self.next_cookie;
        if self.opts.watch_block.is_some_and(|w| (first..first + n).contains(&w)) {
            let kind = if !zero {
                "write"
            } else if trim {
                "trim"
            } else {
                "write-zeroes"
            };
            self.event(format!(
                "watch: {kind} v{version} of blocks {first}..{} to {node} (cookie {cookie})",
                first + n
            ));
        }
        self.inflight.insert(cookie, Inflight { node: node.to_string(), epoch, blocks, stale });
        self.writes_submitted += 1;
        let done = Completer::new(cookie, self.replies_tx.clone());
        let src = self.live_source(node).expect("checked");
        src.handle.submit(request, done);
    }

    fn drain_replies(&mut self) -> Result<(), String> {
        while let Ok(r) = self.replies_rx.try_recv() {
            let Some(f) = self.inflight.remove(&r.cookie) else { continue };
            if let Some(w) = self.opts.watch_block.filter(|w| f.blocks.iter().any(|(b, _)| b == w)) {
                let v = f.blocks.iter().find(|(b, _)| *b == w).map(|x| x.1);
                let how = match &r.result {
                    Ok(_) => "acknowledged".to_string(),
                    Err(e) => format!("failed: {e}"),
                };
                self.event(format!("watch: v{v:?} to {} (cookie {}) {how}", f.node, r.cookie));
            }
            // A node that lost power sent nothing that arrived, however far it got.
            let alive = self.nodes.get(&f.node).is_some_and(|n| n.live.is_some() && !n.durable.lock().power.is_cut());
            match r.result {
                Ok(_) if alive => {
                    if f.stale {
                        return Err(format!(
                            "node {} lost the volume to a failover, yet acknowledged a write submitted to it afterwards",
                            f.node
                        ));
                    }
                    match self.ack_epochs.get(&f.epoch) {
                        Some(n) if *n != f.node => {
                            return Err(format!(
                                "two nodes acknowledged writes in epoch {}: {n} and {}",
                                f.epoch, f.node
                            ))
                        }
                        Some(_) => {}
                        None => {
                            self.ack_epochs.insert(f.epoch, f.node.clone());
                        }
                    }
                    for (b, v) in &f.blocks {
                        self.model.acked(*b, *v);
                    }
                    self.writes_acked += 1;
                }
                _ => self.writes_failed += 1,
            }
        }
        Ok(())
    }

    /// Reads the whole volume from `node`'s primary, stepping it until it answers.
    fn read_volume(&mut self, node: &str) -> Result<Vec<u8>, String> {
        let (tx, rx) = unbounded();
        let len = u32::try_from(BLOCKS * BLOCK_BYTES as u64).expect("small");
        {
            let src = self.live_source(node).ok_or_else(|| format!("node {node} has no running volume to read"))?;
            src.handle.submit(IoRequest::Read { offset: 0, len }, Completer::new(0, tx));
        }
        for _ in 0..1000 {
            if let Ok(r) = rx.try_recv() {
                return r
                    .result
                    .map_err(|e| format!("read of the volume on {node} failed: {e}"))?
                    .ok_or_else(|| "read returned nothing".into());
            }
            let src = self.live_source(node).expect("live");
            src.stepped.step();
        }
        Err(format!("read of the volume on {node} did not complete"))
    }

    /// Every acknowledged write must be on the primary.
    fn check_primary(&mut self, when: &str) -> Result<(), String> {
        let primary = self.primary.clone();
        // Not running, or waiting for its mirror's copy of a log it found cut short (it
        // serves nothing meanwhile): checked once it runs again.
        if self.live_source(&primary).is_none_or(|s| s.stepped.status().awaiting_mirror_log) {
            return Ok(());
        }
        let image = self.read_volume(&primary)?;
        let problems = self.model.check_volume(&image, 4);
        self.volume_checks += 1;
        self.blocks_verified += BLOCKS;
        if !problems.is_empty() {
            return Err(format!("{when}, on {primary}: {}", problems.join("; ")));
        }
        self.event(format!(
            "checked {BLOCKS} blocks on {primary} {when}: {} with acknowledged writes",
            self.model.blocks_acked()
        ));
        Ok(())
    }

    // ---- stepping ----

    fn tick(&mut self) -> Result<(), String> {
        self.ticks += 1;
        let dt = if self.rng.gen_bool(0.9) {
            self.rng.gen_range(5_000..150_000)
        } else {
            self.rng.gen_range(150_000..3 * MS)
        };
        self.clock.advance(dt);
        self.run_actions()?;
        let mut order = [0u8, 1, 2, 3, 4];
        order.shuffle(&mut self.rng);
        for a in order {
            match a {
                0 => {
                    self.net.deliver();
                }
                1 => self.step_sources()?,
                2 => self.step_mirrors(),
                3 => self.client()?,
                _ => {
                    if self.faulting {
                        self.inject()?;
                    }
                }
            }
            self.reap_power_cuts()?;
        }
        if let Some(w) = self.opts.watch_block {
            self.watch_mirrors(w);
        }
        if let Some(rx) = &self.attach_rx {
            if let Ok(r) = rx.try_recv() {
                self.attach_rx = None;
                if let Err(e) = r {
                    self.event(format!("attach refused: {e}"));
                }
            }
        }
        Ok(())
    }

    /// Reports every change of the watched block on every mirror.
    fn watch_mirrors(&mut self, block: u64) {
        let mut seen = Vec::new();
        for (name, n) in &self.nodes {
            let Some(live) = &n.live else { continue };
            for (src, (m, _)) in live.directory.mirrors.lock().iter() {
                let mut buf = vec![0u8; BLOCK_BYTES];
                if m.read(&mut buf, block * BLOCK_BYTES as u64).is_ok() {
                    let v = u64::from_le_bytes(buf[8..16].try_into().expect("8"));
                    seen.push((format!("{name}:{src}"), v, m.meta().applied_cp));
                }
            }
        }
        for (k, v, cp) in seen {
            if self.watched.get(&k) != Some(&v) {
                self.event(format!("watch: mirror {k} block {block} now v{v} (applied CP {cp})"));
                self.watched.insert(k, v);
            }
        }
    }

    fn step_sources(&mut self) -> Result<(), String> {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            let k = self.rng.gen_range(1..=3);
            for _ in 0..k {
                let Some(src) = self.live_source(&name) else { break };
                src.stepped.step();
                let current = src.stepped.mirror_current();
                if name == self.primary {
                    // What the administrator sees in the primary's status: whether its
                    // mirror holds every acknowledged write (policy sync may have gone on
                    // alone). Only a current mirror is failed over to.
                    self.primary_current = current;
                }
                self.drain_replies()?;
            }
        }
        Ok(())
    }

    fn step_mirrors(&mut self) {
        for n in self.nodes.values() {
            let Some(live) = &n.live else { continue };
            let mirrors: Vec<Arc<Mirror>> = live.directory.mirrors.lock().values().map(|(m, _)| m.clone()).collect();
            for m in mirrors {
                let k = self.rng.gen_range(0..=2);
                m.run_jobs(k);
            }
        }
    }

    fn client(&mut self) -> Result<(), String> {
        self.drain_replies()?;
        if !self.writing {
            return Ok(());
        }
        let primary = self.primary.clone();
        let mut burst = 0;
        while self.inflight.len() < self.qd && burst < 4 {
            if self.live_source(&primary).is_none() {
                break;
            }
            self.submit(&primary, false);
            burst += 1;
        }
        // Now and then a write reaches a node that lost the volume (a client that did not
        // follow the failover): it must fail.
        if self.rng.gen_ratio(1, 200) {
            let stale: Vec<String> = self.stale.keys().filter(|n| self.is_live(n)).cloned().collect();
            if let Some(n) = stale.choose(&mut self.rng).cloned() {
                if self.live_source(&n).is_some() {
                    self.faults.stale_primary_writes += 1;
                    self.submit(&n, true);
                }
            }
        }
        Ok(())
    }

    /// Crashes every node whose power was cut during the last step.
    fn reap_power_cuts(&mut self) -> Result<(), String> {
        let cut: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.live.is_some() && n.durable.lock().power.is_cut())
            .map(|(k, _)| k.clone())
            .collect();
        for node in cut {
            self.faults.crashes_at_op += 1;
            self.crash(&node)?;
            self.after_crash(&node);
        }
        Ok(())
    }

    /// What the administrator does about a crashed node: restart it, or (the primary,
    /// when its mirror can take over) fail over.
    fn after_crash(&mut self, node: &str) {
        let can_fail_over = node == self.primary
            && self.primary_current
            && self.nodes.len() < NODES_MAX
            && self.mirror.as_ref().is_some_and(|m| self.is_live(m) && self.mirror_consistent(m));
        if can_fail_over && self.rng.gen_bool(0.5) {
            let m = self.mirror.clone().expect("checked");
            let after = self.rng.gen_range(0..200 * MS);
            self.schedule(after, Action::Failover(m));
            // The old primary comes back later, to find itself fenced.
            let back = self.rng.gen_range(100 * MS..2 * SEC);
            self.schedule(back, Action::Restart(node.to_string()));
        } else {
            let after = self.rng.gen_range(MS..500 * MS);
            self.schedule(after, Action::Restart(node.to_string()));
        }
    }

    fn mirror_meta(&self, node: &str) -> Option<MirrorMeta> {
        let live = self.nodes.get(node)?.live.as_ref()?;
        let m = live.directory.mirrors.lock().get(&self.primary).map(|(m, _)| m.meta());
        m
    }

    fn mirror_consistent(&self, node: &str) -> bool {
        self.mirror_meta(node).is_some_and(|m| m.consistent && !m.promoted)
    }

    fn run_actions(&mut self) -> Result<(), String> {
        let now = self.clock.now_ns();
        while let Some((&key, _)) = self.actions.iter().next() {
            if key.0 > now {
                break;
            }
            let a = self.actions.remove(&key).expect("found");
            self.act(a)?;
        }
        Ok(())
    }

    fn act(&mut self, a: Action) -> Result<(), String> {
        match a {
            Action::Restart(n) => self.restart(&n)?,
            Action::Failover(n) => self.failover(&n)?,
            Action::PairNew => self.pair_new(),
            Action::Failback(n) => self.failback(&n)?,
            Action::Heal(a, b) => {
                self.net.heal(&a, &b);
                self.event(format!("link {a}-{b} healed"));
            }
            Action::FramesClean => {
                self.net.set_faults(FrameFaults::default());
                self.event("frame faults off".into());
            }
            Action::ReplaceDisk { node, member, volume } => self.replace_disk(&node, member, &volume)?,
        }
        Ok(())
    }

    fn failover(&mut self, node: &str) -> Result<(), String> {
        if self.mirror.as_deref() != Some(node) {
            return Ok(());
        }
        let old = self.primary.clone();
        let old_refused = self.refused.contains(&old);
        if !self.is_live(node) {
            if old_refused {
                // The primary cannot serve: the failover waits for the mirror's node.
                self.schedule(50 * MS, Action::Failover(node.to_string()));
            }
            return Ok(());
        }
        // The administrator decided while the primary was down and its mirror current. If
        // the primary came back meanwhile and its mirror is no longer current (policy sync
        // went on alone), failing over now would drop writes it acknowledged since: the
        // administrator looks at the status first, and restarts the primary instead.
        if !self.primary_current && self.retry_failover.as_deref() != Some(node) && !old_refused {
            self.event(format!("failover on {node} called off: the mirror is no longer current for {old}"));
            if !self.is_live(&old) {
                self.schedule(MS, Action::Restart(old));
            }
            return Ok(());
        }
        // Under policy sync a primary that is back and serving goes on alone when its link
        // drops: failing over under it would leave two primaries until it hears of the new
        // epoch. The administrator, who decided while it was down, sees it serving and
        // leaves it be (under strict it can acknowledge nothing alone, and the failover
        // goes ahead: the stale primary must refuse writes).
        let serving = self.live_source(&old).is_some_and(|s| s.stepped.status().state != PairState::Fenced);
        if self.policy == Policy::Sync && serving && self.retry_failover.as_deref() != Some(node) && !old_refused {
            self.event(format!("failover on {node} called off: {old} is back and serving (policy sync)"));
            return Ok(());
        }
        let live = self.nodes[node].live.as_ref().expect("live");
        let Some((mirror, _)) = live.directory.mirrors.lock().get(&old).cloned() else { return Ok(()) };
        // The shipped failover: promote (replay), the new epoch's logs, the record, start.
        let result = crate::node::failover(&mut SimEnv { world: self, node: node.to_string() }, &mirror, None);
        let promoted = mirror.meta().promoted;
        drop(mirror);
        let report = match result {
            Ok(r) => r,
            Err(e) if self.nodes[node].durable.lock().power.is_cut() => {
                // It died during the failover: the administrator runs it again once the
                // node is back (it may find the mirror promoted already, or not).
                self.event(format!("failover on {node} cut short by a power cut (promoted: {promoted}): {e}"));
                if promoted {
                    self.faults.failovers += 1;
                }
                self.retry_failover = Some(node.to_string());
                return Ok(());
            }
            Err(NodeError::Refused(e)) if old_refused => {
                return Err(format!(
                    "the volume on {old} refused to start (the write hole) and its mirror on {node} refused the failover: {e}"
                ));
            }
            Err(NodeError::Refused(e)) => {
                self.faults.failovers_refused += 1;
                self.event(format!("failover on {node} refused: {e}"));
                self.schedule(MS, Action::Restart(old));
                return Ok(());
            }
            Err(e) => return Err(format!("failover on {node}: {e}")),
        };
        self.faults.failovers += 1;
        self.event(format!(
            "failover on {node}: epoch {}, {} entries replayed up to seq {}{}",
            report.epoch,
            report.entries_replayed,
            report.last_seq,
            if report.stops.is_empty() { String::new() } else { format!(" (stops: {})", report.stops.join("; ")) }
        ));
        self.took_over(node)
    }

    /// The fenced old primary comes back as the new primary's mirror: its own changes
    /// since the last common CP are sent along, and the new primary brings it level by a
    /// delta resync (or a baseline where its change map is not relative to this node).
    fn failback(&mut self, old: &str) -> Result<(), String> {
        let primary = self.primary.clone();
        if self.mirror.is_some() {
            return Ok(());
        }
        if self.refused.contains(old) && self.is_live(old) && self.live_source(&primary).is_some() {
            return self.failback_refused(old);
        }
        if self.live_source(&primary).is_none() || self.live_source(old).is_none() {
            self.schedule(50 * MS, Action::Failback(old.to_string()));
            return Ok(());
        }
        // 1. What the old primary holds that the new one may not.
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.live_source(old).expect("live").handle.control(Control::ChangedRegions(tx))?;
        self.live_source(old).expect("live").stepped.step();
        let regions = rx.try_recv().map_err(|_| "the old primary did not answer")?;
        // 2. What the new primary's change map is relative to.
        let status = self.live_source(&primary).expect("live").stepped.status();
        let base = status.changes_since.clone().filter(|b| b.peer == old);
        // 3. The old primary's volume becomes a mirror of the new one, in place.
        let src = self.nodes.get_mut(old).and_then(|n| n.live.as_mut()).and_then(|l| l.source.take()).expect("live");
        let LiveSource { mut stepped, handle, raid, .. } = src;
        handle.stop_stepped();
        stepped.step();
        drop(stepped);
        drop(handle);
        let keys = self.nodes[old].durable.lock().volume.as_ref().map(|v| v.disks.clone()).ok_or("no volume record")?;
        let mut meta = mirror_meta(&primary, status.epoch);
        if let Some(b) = &base {
            meta.applied_cp = b.cp;
            meta.resyncing = true;
        }
        self.adopt_mirror(old, meta, raid, keys).map_err(|e| format!("make {old} a mirror of {primary}: {e}"))?;
        self.stale.remove(old);
        // 4. The new primary marks those regions and pairs with it.
        let (tx, rx) = crossbeam_channel::bounded(1);
        let marks = Control::MarkRegions { regions: regions.clone(), reply: tx };
        self.live_source(&primary).expect("live").handle.control(marks)?;
        self.live_source(&primary).expect("live").stepped.step();
        rx.try_recv().map_err(|_| "no answer to MarkRegions".to_string())??;
        self.event(format!(
            "failback: {old} is the mirror of {primary} again ({} of its own regions to copy back; change map {})",
            regions.len(),
            if base.is_some() { "relative to it: a delta resync" } else { "not relative to it: a baseline" }
        ));
        if base.is_some() {
            self.faults.failbacks_delta += 1;
        } else {
            self.faults.failbacks_baseline += 1;
        }
        self.mirror = Some(old.to_string());
        self.attach(old);
        Ok(())
    }

    /// The old primary's volume refused to start (the write hole): it becomes the new
    /// primary's mirror all the same, its storage opened for a copy and inconsistent, and
    /// the new primary copies it over whole (a baseline). Its own changes since the last
    /// common CP cannot be read, and need not be: the failover replayed every
    /// acknowledged one.
    fn failback_refused(&mut self, old: &str) -> Result<(), String> {
        let primary = self.primary.clone();
        let epoch = self.live_source(&primary).expect("checked").epoch;
        let keys = self.nodes[old].durable.lock().volume.as_ref().map(|v| v.disks.clone()).ok_or("no volume record")?;
        let raid = open_raid(&self.nodes[old].durable, &keys, false, crate::raid::WriteHole::Accept)
            .map_err(|e| format!("open the refused volume on {old} for a copy: {e}"))?;
        let meta = mirror_meta(&primary, epoch);
        let failed = raid.status().members.iter().position(|m| m.state != "in-sync");
        let prefix = volume_prefix(&raid);
        self.adopt_mirror(old, meta, raid, keys).map_err(|e| format!("make {old} a mirror of {primary}: {e}"))?;
        self.stale.remove(old);
        self.refused.remove(old);
        if let Some(member) = failed {
            // The failed disk is replaced too, once the copy has rewritten every row.
            self.nodes.get_mut(old).expect("node").disk_damage += 1;
            self.schedule(100 * MS, Action::ReplaceDisk { node: old.to_string(), member, volume: prefix });
        }
        self.faults.failbacks_baseline += 1;
        self.event(format!("failback: {old}, whose volume refused to start, is the mirror of {primary}: a baseline"));
        self.mirror = Some(old.to_string());
        self.attach(old);
        Ok(())
    }

    /// Makes `raid` (with its disks `keys`) on `node`, its primary volume until now, the
    /// mirror that `meta` describes (the shipped code that does so).
    fn adopt_mirror(&mut self, node: &str, meta: MirrorMeta, raid: Arc<Raid4>, keys: Vec<String>) -> io::Result<()> {
        let fence = self.nodes[node].durable.lock().volume.as_ref().map_or(0, |v| v.epoch);
        crate::node::adopt_as_mirror(&mut SimEnv { world: self, node: node.to_string() }, meta, (raid, keys), fence)
            .map(drop)
            .map_err(io::Error::other)
    }

    /// A planned switchover from the primary to its mirror, under load: the primary drains
    /// and brings the mirror level, hands its queued requests over, becomes the mirror; the
    /// mirror takes the volume up with nothing to replay, and the pair resumes the other
    /// way round with nothing to copy.
    fn switchover(&mut self, deadline: u64) -> Result<(), String> {
        let (a, b) = (self.primary.clone(), self.mirror.clone().ok_or("no mirror")?);
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.live_source(&a).ok_or("no primary")?.handle.control(Control::Quiesce(tx))?;
        let (cp, next_seq) = loop {
            if let Ok(r) = rx.try_recv() {
                match r {
                    Ok(x) => break x,
                    Err(e) => {
                        self.event(format!("switchover {a} -> {b} refused: {e}"));
                        return Ok(());
                    }
                }
            }
            if self.clock.now_ns() > deadline {
                return Err(format!("liveness: the switchover's quiesce on {a} did not complete"));
            }
            self.tick()?;
        };
        let meta = self.mirror_meta(&b).ok_or("no mirror meta")?;
        if meta.applied_cp != cp || meta.applied_seq + 1 != next_seq || !meta.consistent {
            return Err(format!(
                "switchover: {a} quiesced at CP {cp}, next sequence {next_seq}, but the mirror on {b} holds {meta:?}"
            ));
        }
        // The primary stops; what waited in its queue goes to the new primary.
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.live_source(&a).expect("live").handle.control(Control::Handover(tx))?;
        self.live_source(&a).expect("live").stepped.step();
        let queued = rx.try_recv().map_err(|_| "no handover")?;
        let src = self.nodes.get_mut(&a).and_then(|n| n.live.as_mut()).and_then(|l| l.source.take()).expect("live");
        let raid_a = src.raid.clone();
        drop(src);
        // The old primary becomes the mirror, then the mirror takes over (the shipped
        // takeover: nothing to replay), in the order the daemon's switchover runs them.
        let mirror = self.nodes[&b].live.as_ref().expect("live").directory.mirrors.lock().get(&a).cloned();
        let (mirror, _) = mirror.ok_or("mirror")?;
        let keys_a = self.nodes[&a].durable.lock().volume.as_ref().map(|v| v.disks.clone()).ok_or("no volume")?;
        let meta_a = MirrorMeta {
            applied_cp: cp,
            applied_seq: next_seq - 1,
            consistent: true,
            ..mirror_meta(&b, meta.epoch + 1)
        };
        self.adopt_mirror(&a, meta_a, raid_a, keys_a).map_err(|e| format!("switchover: make {a} the mirror: {e}"))?;
        let report = crate::node::takeover(&mut SimEnv { world: self, node: b.clone() }, &mirror, cp, next_seq)
            .map_err(|e| format!("switchover: take over on {b}: {e}"))?;
        drop(mirror);
        if report.entries_replayed != 0 {
            return Err(format!(
                "switchover: the mirror on {b} replayed {} entries after a full CP",
                report.entries_replayed
            ));
        }
        self.primary = b.clone();
        self.mirror = Some(a.clone());
        // The requests that waited on the old primary are answered by the new one.
        let epoch = report.epoch;
        let n = queued.len();
        for (request, done) in queued {
            self.live_source(&b).expect("started").handle.submit(request, done);
        }
        for f in self.inflight.values_mut() {
            if f.node == a {
                f.node.clone_from(&b);
                f.epoch = epoch;
            }
        }
        self.faults.switchovers += 1;
        self.event(format!("switchover {a} -> {b}: epoch {epoch}, CP {cp}, {n} queued requests handed over"));
        self.check_primary("after the switchover")
    }

    /// `node` is the volume's primary now.
    fn took_over(&mut self, node: &str) -> Result<(), String> {
        let old = self.primary.clone();
        self.stale.insert(old.clone(), self.clock.now_ns());
        self.primary = node.to_string();
        self.mirror = None;
        // Writes in flight to the old primary are its business now: the client gave up.
        for f in self.inflight.values_mut() {
            if f.node == old {
                f.node = String::new();
            }
        }
        self.check_primary("after the failover")?;
        let after = self.rng.gen_range(10 * MS..300 * MS);
        self.schedule(after, Action::PairNew);
        Ok(())
    }

    fn pair_new(&mut self) {
        if self.mirror.is_some() {
            return;
        }
        // Half the time the old primary comes back (failback), else a fresh node.
        let old = self.stale.iter().max_by_key(|(_, t)| **t).map(|(n, _)| n.clone());
        if let Some(old) = old.filter(|_| self.rng.gen_bool(0.5) || self.nodes.len() >= NODES_MAX) {
            self.schedule(0, Action::Failback(old));
            return;
        }
        if self.nodes.len() >= NODES_MAX {
            return;
        }
        let primary = self.primary.clone();
        if self.live_source(&primary).is_none() {
            // `ctl mirror` needs the primary up: the administrator tries again later.
            self.schedule(50 * MS, Action::PairNew);
            return;
        }
        let n = self.add_node();
        self.mirror = Some(n.clone());
        self.attach(&n);
    }

    // ---- faults ----

    fn inject(&mut self) -> Result<(), String> {
        // About one fault every 40 ticks of ~0.3 ms: a dozen or more a simulated second.
        if !self.rng.gen_ratio(1, 40) {
            return Ok(());
        }
        let primary = self.primary.clone();
        let mirror = self.mirror.clone();
        match self.rng.gen_range(0..100) {
            0..14 => self.cut_power(&primary)?,
            14..26 => {
                if let Some(m) = mirror {
                    self.cut_power(&m)?;
                }
            }
            26..44 => {
                let Some(m) = mirror else { return Ok(()) };
                let how = [Cut::Stall, Cut::Reset, Cut::Drop][self.rng.gen_range(0..3)];
                match how {
                    Cut::Stall => self.faults.link_stalls += 1,
                    Cut::Reset => self.faults.link_resets += 1,
                    Cut::Drop => self.faults.link_drops += 1,
                }
                self.net.cut(&primary, &m, how);
                let len = if self.rng.gen_ratio(1, 6) {
                    self.rng.gen_range(2 * SEC..4 * SEC)
                } else {
                    self.rng.gen_range(5 * MS..800 * MS)
                };
                self.event(format!("link {primary}-{m} cut ({how:?}) for {} ms", len / MS));
                self.schedule(len, Action::Heal(primary, m));
            }
            44..56 => {
                let f = FrameFaults {
                    drop_ppm: self.rng.gen_range(0..20_000),
                    duplicate_ppm: self.rng.gen_range(0..20_000),
                    reorder_ppm: self.rng.gen_range(0..20_000),
                };
                self.faults.frame_fault_windows += 1;
                self.net.set_faults(f);
                let len = self.rng.gen_range(5 * MS..300 * MS);
                self.event(format!("frame faults {f:?} for {} ms", len / MS));
                self.schedule(len, Action::FramesClean);
            }
            56..64 => {
                let j = self.rng.gen_range(200 * MS..3 * SEC);
                self.faults.clock_jumps += 1;
                self.clock.advance(j);
                self.event(format!("clock jumped {} ms forward", j / MS));
            }
            64..67 => self.nvram_flip()?,
            67..100 => self.disk_fault()?,
            _ => unreachable!(),
        }
        Ok(())
    }

    fn cut_power(&mut self, node: &str) -> Result<(), String> {
        let Some(n) = self.nodes.get(node) else { return Ok(()) };
        if n.live.is_none() {
            return Ok(());
        }
        if n.disk_damage > 0 {
            return self.cut_power_degraded(node);
        }
        if self.degraded_cut_pending() {
            return Ok(());
        }
        let d = n.durable.lock();
        if d.power.armed() {
            return Ok(());
        }
        self.faults.power_cuts += 1;
        if self.rng.gen_bool(0.3) {
            d.power.cut_now();
            drop(d);
            self.event(format!("node {node}: power cut"));
        } else {
            let ops = self.rng.gen_range(1..400);
            d.power.cut_after(ops);
            drop(d);
            self.event(format!("node {node}: power to be cut at its {ops}th durable operation from now"));
        }
        Ok(())
    }

    /// Cuts the power of a node whose RAID-4 volume is degraded (a member lost or failing,
    /// not yet replaced), now: if writes were in flight, the volume is dirty and degraded
    /// at restart, the RAID write hole. A primary's volume must then refuse to start with
    /// a clear error, and the administrator fails over to the mirror, which holds every
    /// acknowledged write; a mirror's storage is opened for a copy over it, inconsistent.
    /// Never garbage: every check of the run holds. Only where the other site holds every
    /// acknowledged write, so that the crash is the second fault and not the third.
    fn cut_power_degraded(&mut self, node: &str) -> Result<(), String> {
        let primary_side = node == self.primary;
        if !primary_side && self.mirror.as_deref() != Some(node) {
            return Ok(());
        }
        // One site at a time: the other is up, and no cut is coming to it.
        let others_whole =
            self.nodes.iter().all(|(k, n)| k == node || (n.live.is_some() && !n.durable.lock().power.armed()));
        if !others_whole || self.nodes[node].durable.lock().power.armed() {
            return Ok(());
        }
        let Some(raid) = self.raid_of(node, !primary_side) else { return Ok(()) };
        if !raid.status().degraded {
            return Ok(());
        }
        if primary_side {
            let Some(mirror) = self.mirror.clone() else { return Ok(()) };
            let mirror_whole = self.nodes[&mirror].disk_damage == 0;
            let can_fail_over = self.primary_current && self.nodes.len() < NODES_MAX && mirror_whole;
            if !can_fail_over || self.mirror_holds_every_ack().is_none() {
                return Ok(());
            }
        } else {
            // The primary holds every acknowledged write, whole.
            let p = self.primary.clone();
            let healthy = self.nodes[&p].disk_damage == 0 && self.live_source(&p).is_some();
            if !healthy {
                return Ok(());
            }
        }
        self.faults.power_cuts += 1;
        self.faults.degraded_crashes += 1;
        self.degraded_crashed.insert(node.to_string());
        let side = if primary_side { "its volume" } else { "its mirror" };
        // The write hole opens only with writes in flight: mostly the cut comes at one of
        // the next durable operations (a CP's write-out or application, likely), where
        // the other site holds every acknowledged write however long that takes: a
        // mirror's cut (the primary holds them), or a primary's under policy strict (it
        // acknowledges nothing its mirror does not hold). Otherwise now.
        if (!primary_side || self.policy == Policy::Strict) && self.rng.gen_bool(0.75) {
            let ops = self.rng.gen_range(1..64);
            self.nodes[node].durable.lock().power.cut_after(ops);
            self.event(format!(
                "node {node}: power to be cut at its {ops}th durable operation from now, while {side} is degraded"
            ));
            return Ok(());
        }
        self.nodes[node].durable.lock().power.cut_now();
        self.event(format!("node {node}: power cut while {side} is degraded"));
        self.crash(node)?;
        self.after_crash(node);
        Ok(())
    }

    /// Whether the primary's mirror is up and consistent (able to take over, or to serve
    /// its logs) and holds every write the primary acknowledged, the pair in sync: the
    /// sequence number acknowledged up to, if so.
    fn mirror_holds_every_ack(&mut self) -> Option<u64> {
        let primary = self.primary.clone();
        let mirror = self.mirror.clone()?;
        if !self.is_live(&mirror) || !self.mirror_consistent(&mirror) {
            return None;
        }
        let st = self.live_source(&primary)?.stepped.status();
        (st.state == PairState::InSync && st.acked_seq <= st.mirror_acked_seq).then_some(st.acked_seq)
    }

    /// A node's power is to be cut at a coming durable operation while one of its volumes
    /// is degraded: no other site may fail meanwhile (that is the third fault).
    fn degraded_cut_pending(&self) -> bool {
        self.degraded_crashed.iter().any(|k| self.nodes.get(k).is_some_and(|n| n.durable.lock().power.armed()))
    }

    /// Flips a bit of an acknowledged entry in the primary's NVLog, one the mirror holds as
    /// well, as the primary's power is cut: recovery must find the entry damaged and say
    /// so, and the mirror's copy must serve (no acknowledged write may be missing once the
    /// pair has resumed). The entry is in the active partition: the mirror applies nothing
    /// of it before the source's CP.
    fn nvram_flip(&mut self) -> Result<(), String> {
        let primary = self.primary.clone();
        if !self.is_live(&primary) || self.degraded_cut_pending() {
            return Ok(());
        }
        {
            let n = &self.nodes[&primary];
            if n.disk_damage > 0 || n.durable.lock().power.armed() {
                return Ok(());
            }
        }
        // Recovery reads a log up to its first damaged entry and never past it: every
        // acknowledged entry after the flipped one must be on the mirror too, and the
        // mirror able to serve it. Under policy sync with the mirror away, writes
        // acknowledged alone have one copy by the policy's own terms, and a flip before
        // them is a double fault.
        let Some(safe) = self.mirror_holds_every_ack() else { return Ok(()) };
        let Some(epoch) = self.live_source(&primary).map(|s| s.epoch) else { return Ok(()) };
        self.faults.power_cuts += 1;
        self.nodes[&primary].durable.lock().power.cut_now();
        self.crash(&primary)?;
        let media = self.nodes[&primary].durable.lock().nvram.get(&format!("{VOLUME}.{epoch}.nvlog")).cloned();
        let target = media.as_ref().and_then(|m| {
            let image = m.lock().durable().to_vec();
            let scans: Vec<(usize, crate::format::PartitionScan)> = [0u8, 1]
                .into_iter()
                .map(|p| {
                    let base = NvLog::<SimNvram>::partition_base(p, PARTITION_BYTES);
                    (base, crate::format::scan_partition(&image[base..base + PARTITION_BYTES], p))
                })
                .collect();
            let (base, scan) = scans
                .into_iter()
                .filter(|(_, s)| s.header.is_some())
                .max_by_key(|(_, s)| s.header.map(|h| h.cp_gen))?;
            let candidates: Vec<_> = scan.entries.iter().filter(|e| e.header.seq <= safe).copied().collect();
            Some((base, candidates))
        });
        match (media, target) {
            (Some(m), Some((base, candidates))) if !candidates.is_empty() => {
                let e = candidates[self.rng.gen_range(0..candidates.len())];
                let span = crate::format::ENTRY_HEADER_BYTES + e.header.data_len as usize;
                let at = base + e.at + self.rng.gen_range(0..span);
                let bit = self.rng.gen_range(0..8);
                m.lock().flip_bit(at, bit);
                self.faults.nvram_bit_flips += 1;
                self.event(format!(
                    "node {primary}: power cut, and bit {bit} of NVLog entry {} (acknowledged, on the mirror too: \
                     in-sync, mirror acknowledged up to {safe}) flipped at region offset {at}",
                    e.header.seq
                ));
            }
            _ => self.event(format!("node {primary}: power cut (no acknowledged entry in the log to flip)")),
        }
        self.after_crash(&primary);
        Ok(())
    }

    /// The RAID volume a disk fault may hit: the primary's, or the mirror's on its node.
    fn disk_fault(&mut self) -> Result<(), String> {
        let mirror_side = self.rng.gen_bool(0.5);
        let node = if mirror_side { self.mirror.clone() } else { Some(self.primary.clone()) };
        let Some(node) = node else { return Ok(()) };
        let Some(raid) = self.raid_of(&node, mirror_side) else { return Ok(()) };
        let n = &self.nodes[&node];
        if n.disk_damage > 0 || n.durable.lock().power.armed() || raid.status().degraded {
            return Ok(());
        }
        // A mirror that a crash left in the middle of a copy holds rows only the rest of
        // the copy rewrites: a disk fault on top is a second fault.
        if mirror_side && !self.mirror_meta(&node).is_some_and(|m| m.consistent) {
            return Ok(());
        }
        let geo = raid.geometry();
        let member = self.rng.gen_range(0..geo.members());
        let key = disk_key(&raid, member);
        let prefix = volume_prefix(&raid);
        let media = n.durable.lock().disks.get(&key).cloned().ok_or("no media for a member")?;
        let kind = self.rng.gen_range(0..3);
        let side = if mirror_side { "mirror" } else { "volume" };
        self.nodes.get_mut(&node).expect("node").disk_damage += 1;
        match kind {
            0 => {
                let offset = self.rng.gen_range(geo.data_offset()..geo.member_bytes());
                let bit = self.rng.gen_range(0..8);
                media.lock().flip_bit(offset, bit);
                *self.flips.entry((node.clone(), prefix)).or_default() += 1;
                self.faults.disk_bit_flips += 1;
                self.event(format!("node {node}: {side} member {member}: bit {bit} flipped at {offset}"));
            }
            1 => {
                media.lock().read_errors = self.rng.gen_range(1..3);
                self.faults.disk_read_errors += 1;
                self.event(format!("node {node}: {side} member {member}: read errors"));
                let after = self.rng.gen_range(20 * MS..400 * MS);
                self.schedule(after, Action::ReplaceDisk { node, member, volume: prefix });
            }
            _ => {
                media.lock().lost = true;
                self.faults.disks_lost += 1;
                self.event(format!("node {node}: {side} member {member}: disk lost"));
                let after = self.rng.gen_range(20 * MS..400 * MS);
                self.schedule(after, Action::ReplaceDisk { node, member, volume: prefix });
            }
        }
        Ok(())
    }

    /// The RAID volume on `node` whose disks are named under `prefix`.
    fn raid_by_prefix(&self, node: &str, prefix: &str) -> Option<Arc<Raid4>> {
        let live = self.nodes.get(node)?.live.as_ref()?;
        let mut all: Vec<Arc<Raid4>> = live.directory.mirrors.lock().values().map(|(_, r)| r.clone()).collect();
        all.extend(live.source.as_ref().map(|s| s.raid.clone()));
        all.into_iter().find(|r| volume_prefix(r) == prefix)
    }

    fn raid_of(&self, node: &str, mirror_side: bool) -> Option<Arc<Raid4>> {
        let live = self.nodes.get(node)?.live.as_ref()?;
        if mirror_side {
            let m = live.directory.mirrors.lock().get(&self.primary).map(|(_, r)| r.clone());
            m
        } else {
            live.source.as_ref().map(|s| s.raid.clone())
        }
    }

    /// The disk fault is dealt with: read errors end; a member that failed (or fails under
    /// a scrub) is replaced and rebuilt; then the volume must scrub clean.
    fn replace_disk(&mut self, node: &str, member: usize, volume: &str) -> Result<(), String> {
        if self.nodes.get(node).is_some_and(|n| n.durable.lock().power.armed()) {
            // Its power is to be cut at a coming durable operation (a degraded crash): the
            // administrator is not that quick.
            self.schedule(100 * MS, Action::ReplaceDisk { node: node.to_string(), member, volume: volume.to_string() });
            return Ok(());
        }
        if !self.is_live(node) && self.degraded_crashed.contains(node) {
            // Crashed with the member still failed: it is replaced once the node is back.
            self.schedule(100 * MS, Action::ReplaceDisk { node: node.to_string(), member, volume: volume.to_string() });
            return Ok(());
        }
        let Some(raid) = self.raid_by_prefix(node, volume) else {
            // The volume moved (failover) or its node is down: the damage went with it.
            if let Some(n) = self.nodes.get_mut(node) {
                n.disk_damage = n.disk_damage.saturating_sub(1);
            }
            return Ok(());
        };
        if raid.write_hole_found() && raid.status().degraded && !self.copied_over(node, &raid) {
            // Rows the write hole left out of step cannot be rebuilt (the rebuild says so):
            // the disk is replaced once the copy over them has rewritten every row.
            self.schedule(100 * MS, Action::ReplaceDisk { node: node.to_string(), member, volume: volume.to_string() });
            return Ok(());
        }
        if let Some(media) = self.nodes[node].durable.lock().disks.get(&disk_key(&raid, member)) {
            media.lock().read_errors = 0;
        }
        if !raid.status().degraded {
            // Whatever was not read yet: a scrub reads everything.
            raid.scrub(None).map_err(|e| format!("scrub on {node}: {e}"))?;
            self.scrubs += 1;
        }
        if let Some(failed) = raid.status().members.iter().position(|m| m.state != "in-sync") {
            let old = disk_key(&raid, failed);
            let new = format!("{old}.r{}", self.ticks);
            let (media, power) = {
                let mut d = self.nodes[node].durable.lock();
                (d.disk(&new, raid.geometry().member_bytes()), d.power.clone())
            };
            let dev: Arc<dyn BlockDevice> = Arc::new(SimDisk::new(media, power));
            raid.replace_member_device(failed, &disk_spec(&new), dev)
                .map_err(|e| format!("replace member {failed} on {node}: {e}"))?;
            raid.rebuild(None).map_err(|e| format!("rebuild member {failed} on {node}: {e}"))?;
            // Every record naming the old disk names the new one.
            {
                let mut d = self.nodes[node].durable.lock();
                let d = &mut *d;
                for keys in d.mirror_disks.values_mut().chain(d.volume.as_mut().map(|v| &mut v.disks)) {
                    for k in keys.iter_mut().filter(|k| **k == old) {
                        k.clone_from(&new);
                    }
                }
            }
            self.faults.disks_replaced += 1;
            self.event(format!("node {node}: member {failed} replaced by {new} and rebuilt"));
        }
        let n = self.nodes.get_mut(node).expect("node");
        n.disk_damage = n.disk_damage.saturating_sub(1);
        if raid.write_hole_found() {
            // Rows the write hole left out of step are rewritten by the copy under way:
            // the scrub waits for it (the settle scrubs once the mirror is consistent).
            self.event(format!("node {node}: scrub deferred until the copy over the write hole completes"));
            return Ok(());
        }
        self.scrub_clean(node, &raid, "after a disk fault")
    }

    /// Whether the mirror on `node` driving `raid` is consistent again (a copy over it
    /// completed).
    fn copied_over(&self, node: &str, raid: &Arc<Raid4>) -> bool {
        let Some(live) = self.nodes.get(node).and_then(|n| n.live.as_ref()) else { return false };
        let mirrors = live.directory.mirrors.lock();
        mirrors.values().any(|(m, r)| Arc::ptr_eq(r, raid) && m.meta().consistent)
    }

    /// Scrubs a RAID volume: it may repair what the simulator damaged; a second scrub must
    /// then find nothing at all.
    fn scrub_clean(&mut self, node: &str, raid: &Raid4, when: &str) -> Result<(), String> {
        let first = raid.scrub(None).map_err(|e| format!("scrub on {node} {when}: {e}"))?;
        let second = raid.scrub(None).map_err(|e| format!("scrub on {node} {when}: {e}"))?;
        self.scrubs += 2;
        let flipped = self.flips.remove(&(node.to_string(), volume_prefix(raid))).unwrap_or(0);
        let found = first.checksum_errors + first.parity_mismatches + first.checksums_corrected;
        if first.unrecoverable > 0
            || found > flipped
            || second.checksum_errors + second.parity_mismatches + second.unrecoverable + second.checksums_corrected > 0
        {
            return Err(format!(
                "scrub on {node} {when} ({flipped} bits flipped since the last): first {first:?}; second {second:?}"
            ));
        }
        self.event(format!(
            "scrub on {node} {when}: {} checksum errors, {} parity mismatches repaired; then clean",
            first.checksum_errors, first.parity_mismatches
        ));
        Ok(())
    }

    // ---- phases ----

    fn run(&mut self) -> Result<(), String> {
        // The baseline first, on a calm cluster.
        self.settle("after the baseline")?;
        for phase in 0..self.opts.phases {
            self.qd = self.rng.gen_range(1..=8);
            self.writing = true;
            self.faulting = self.opts.faults;
            self.event(format!("phase {phase}: faults {}, queue depth {}", self.faulting, self.qd));
            let end = self.clock.now_ns() + self.opts.phase_ns;
            while self.clock.now_ns() < end {
                self.tick()?;
            }
            self.faulting = false;
            self.settle(&format!("after phase {phase}"))?;
        }
        Ok(())
    }

    /// Faults stop: links heal, crashed nodes come back. The pair must then get back in
    /// sync, a forced CP must make the mirror equal the primary, scrub must find both
    /// volumes consistent, every acknowledged write must be there, and new writes must be
    /// acknowledged.
    fn settle(&mut self, when: &str) -> Result<(), String> {
        for n in self.nodes.values() {
            n.durable.lock().power.disarm();
        }
        self.reap_power_cuts()?;
        self.net.heal_all();
        self.net.set_faults(FrameFaults::default());
        let deadline = self.clock.now_ns() + LIVENESS_NS;
        // Pending administrator actions happen now (a failover decided stays decided), and
        // crashed nodes come back; what they schedule in turn (a failover to run again)
        // happens too, before anything is checked.
        for _ in 0..16 {
            let actions: Vec<Action> = std::mem::take(&mut self.actions).into_values().collect();
            let down: Vec<String> =
                self.nodes.iter().filter(|(_, n)| n.live.is_none()).map(|(k, _)| k.clone()).collect();
            if down.is_empty() && actions.iter().all(|a| matches!(a, Action::Heal(..) | Action::FramesClean)) {
                break;
            }
            for a in actions {
                match a {
                    Action::Heal(..) | Action::FramesClean => {}
                    a => self.act(a)?,
                }
            }
            for n in down {
                self.restart(&n)?;
            }
        }
        if self.mirror.is_none() {
            self.pair_new();
        }
        self.wait(deadline, "a mirror to be paired", |w| w.mirror.is_some())?;
        // In sync again, then a CP forced through to the mirror with the writes drained.
        // Under policy sync a CP can complete alone (the link dropped again: a resync then
        // follows), so the round repeats until the mirror applied it, in sync and current.
        self.writing = false;
        let mirror = self.mirror.clone().expect("paired");
        let cp = loop {
            self.wait(deadline, "the pair to get back in sync", |w| {
                w.primary_state() == Some(PairState::InSync) && w.primary_current
            })?;
            self.wait(deadline, "the writes in flight to complete", |w| w.inflight.is_empty())?;
            let cp = self.force_cp(deadline)?;
            self.wait(deadline, "the mirror to apply the forced CP", |w| {
                let left = w.primary_state() != Some(PairState::InSync);
                left || (w.mirror_meta(&mirror).is_some_and(|m| m.applied_cp >= cp && m.consistent)
                    && w.nodes[&mirror]
                        .live
                        .as_ref()
                        .is_some_and(|l| l.directory.mirrors.lock().values().all(|(m, _)| m.jobs_queued() == 0)))
            })?;
            if self.primary_state() == Some(PairState::InSync) && self.primary_current {
                break cp;
            }
            self.event(format!("{when}: the pair left sync during the forced CP {cp}; again"));
        };
        let primary = self.primary.clone();
        let ours = self.read_volume(&primary)?;
        let theirs = {
            let live = self.nodes[&mirror].live.as_ref().expect("live");
            let m = live.directory.mirrors.lock().get(&primary).map(|(m, _)| m.clone()).expect("mirror");
            let mut buf = vec![0u8; ours.len()];
            m.read(&mut buf, 0).map_err(|e| format!("read the mirror on {mirror}: {e}"))?;
            buf
        };
        if let Some(b) = (0..BLOCKS).find(|&b| {
            let r = crate::usize_of(b) * BLOCK_BYTES..crate::usize_of(b + 1) * BLOCK_BYTES;
            ours[r.clone()] != theirs[r]
        }) {
            let at = crate::usize_of(b) * BLOCK_BYTES;
            let version = |d: &[u8]| u64::from_le_bytes(d[at + 8..at + 16].try_into().expect("8"));
            let meta = self.mirror_meta(&mirror);
            let status = self.live_source(&primary).map(|s| s.stepped.status());
            return Err(format!(
                "{when}: after CP {cp}, block {b} of the mirror on {mirror} (version {}) differs from the primary on \
                 {primary} (version {}); mirror {meta:?}; source {status:?}",
                version(&theirs),
                version(&ours)
            ));
        }
        self.event(format!("{when}: CP {cp}: the mirror on {mirror} equals the primary on {primary}"));
        self.check_primary(when)?;
        for (node, side) in [(primary.clone(), false), (mirror.clone(), true)] {
            if let Some(raid) = self.raid_of(&node, side) {
                self.scrub_clean(&node, &raid, when)?;
                if !raid.status().degraded {
                    // (A member waiting for its replacement keeps the node's damage.)
                    self.nodes.get_mut(&node).expect("node").disk_damage = 0;
                }
            }
        }
        // Liveness: new writes are acknowledged.
        let acked = self.writes_acked;
        self.writing = true;
        self.qd = 4;
        self.wait(deadline, "new writes to be acknowledged", |w| w.writes_acked >= acked + 24)?;
        // Now and then a planned switchover, with the writes going on.
        if self.rng.gen_ratio(1, 3) {
            self.switchover(deadline)?;
            let acked = self.writes_acked;
            self.wait(deadline, "writes acknowledged after the switchover", |w| w.writes_acked >= acked + 16)?;
        }
        self.writing = false;
        self.wait(deadline, "the writes in flight to complete", |w| w.inflight.is_empty())?;
        self.writing = true;
        Ok(())
    }

    fn primary_state(&mut self) -> Option<PairState> {
        let p = self.primary.clone();
        Some(self.live_source(&p)?.stepped.status().state)
    }

    fn wait(&mut self, deadline: u64, what: &str, mut done: impl FnMut(&mut World) -> bool) -> Result<(), String> {
        while !done(self) {
            if self.clock.now_ns() > deadline {
                let p = self.primary.clone();
                let status = self.live_source(&p).map(|s| s.stepped.status());
                self.event(format!("primary status: {status:?}"));
                let state = self.primary_state();
                return Err(format!(
                    "liveness: no progress with the faults stopped: still waiting for {what} after {} s (primary {} state {state:?})",
                    LIVENESS_NS / SEC,
                    self.primary
                ));
            }
            self.tick()?;
        }
        Ok(())
    }

    fn force_cp(&mut self, deadline: u64) -> Result<u64, String> {
        let primary = self.primary.clone();
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.live_source(&primary).ok_or("no primary")?.handle.control(Control::Cp(tx))?;
        self.cps_forced += 1;
        loop {
            if let Ok(r) = rx.try_recv() {
                let cp = r.map_err(|e| format!("forced CP on {primary} failed: {e}"))?;
                self.event(format!("CP {cp} forced on {primary}"));
                return Ok(cp);
            }
            if self.clock.now_ns() > deadline {
                return Err(format!("liveness: the forced CP on {primary} did not complete"));
            }
            self.tick()?;
        }
    }
}

#[cfg(test)]
mod tests;
