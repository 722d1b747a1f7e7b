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
//!
//! Files: `nodes` (durable state, mirrors hosted, crashes and restarts), `env` (the node
//! core's environment), `client` (the checked writes and reads), `roles` (the
//! administrator's failovers, failbacks and switchovers), `faults` (injection), `media`
//! (simulated NVRAM, disks, power and clock), `model` (what every block must hold); the
//! world and its event loop here.

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

mod client;
mod env;
mod faults;
mod nodes;
mod roles;

use client::Inflight;
use env::SimEnv;
use nodes::{
    disk_key, disk_spec, mirror_meta, open_raid, volume_prefix, Durable, LiveSource, Node, Shared, VolumeRecord,
};

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

// ---- the client ----

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
    attach_rx: Option<Receiver<Result<(), crate::source::ControlError>>>,
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
