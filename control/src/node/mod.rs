//! A node: its primary volumes (each with its poller), the mirrors it hosts for other
//! nodes, and the state that survives a restart.
//!
//! Data dir layout:
//! ```text
//! node.json                      node state (volumes and their mirror targets), replaced atomically
//! volumes/VOL/data0..N-1,parity a primary's RAID-4 members, unless created with --disk
//! mirrors/SOURCE/VOL/meta.json   a mirror's metadata (epoch, last applied CP), replaced atomically
//! mirrors/SOURCE/VOL/storage.json  the mirror volume's disks, replaced atomically
//! mirrors/SOURCE/VOL/data0..,parity  the mirror volume's RAID-4 members (this node's geometry)
//! NVRAM dir (--nvram, default file:DATA/nvram):
//!   VOL.EPOCH.nvlog              a primary's NVLog (superblock + two partitions)
//!   mirrors/SOURCE/VOL/log.P     a mirror's log file for source partition P
//! ```
//!
//! Files: `mirrors` (hosted mirrors and pairing), `roles` (failover, switchover, takeover,
//! resync), `env` (the node core's environment), `maintain` (scrub, rebuild), `status`
//! (what `status` shows), `create` (a new volume), `exports` (the node as the front ends see it); the node's state
//! and volumes here.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::bounded;
use nvmirror_dataplane::clock::SystemClock;
use nvmirror_dataplane::destination::{MetaStore, Mirror, MirrorMeta, MirrorStatus, PromoteReport, RdmaPlacement};
use nvmirror_dataplane::format::BLOCK_BYTES;
use nvmirror_dataplane::frontend::{Completer, Export, ExportRegistry, IoRequest};
use nvmirror_dataplane::log::{ChangeMap, NvLog, PARTITIONS};
use nvmirror_dataplane::node::{self as core, MirrorEnv, NodeEnv, Promoted};
use nvmirror_dataplane::nvram::{open_region, Nvram, NvramMode, NvramSpec};
use nvmirror_dataplane::raid::Raid4;
use nvmirror_dataplane::source::{
    self, Control, PairState, Policy, SourceConfig, SourceHandle, SourceStatus, PARTITION_BYTES_MIN,
};
use nvmirror_dataplane::storage::{DiskSpec, Engine};
use nvmirror_dataplane::transport::auth::PeerSecret;
use nvmirror_dataplane::transport::AnyConnector;
use nvmirror_dataplane::transport::{FrameHandler, Hello, Intent, MirrorDirectory, RefuseCode, ReplySink, Welcome};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::storage::{MirrorLayout, OpenVolumes, Opened, RaidDefaults, StorageStatus, VolumeStorage};

mod create;
mod env;
mod exports;
mod lifecycle;
mod maintain;
mod mirrors;
mod peers;
mod resize;
mod roles;
mod status;
mod verify;

pub use create::{CreateLayout, VolumeOptions};
use env::FileEnv;
use exports::start_rdma;
pub use lifecycle::{DeleteReport, UnpairReport};
use maintain::spawn_rebuild;
use mirrors::MirrorExport;
pub use peers::{MirrorRequest, NodeInfo, PeerCalls, TakeoverRequest, RESYNC_RANGES_MAX};
pub use resize::ResizeReport;
pub use roles::{region_ranges, ResyncStarted, RoleChangePlan, SwitchoverReport};
pub use status::{ack_survives, MirrorEntry, NodeStatus, UnstartedVolume, VolumeStatus};
pub use verify::{check_span, SumSpan, VerifyReport};

/// Default NVLog partition size (two per volume). One partition fills while the other's CP
/// runs on both sites; writes are throttled once it is half full with that CP still
/// running. 4 KiB random writes at queue depth 32, mirrored on this project's 2-core machine
/// (about 100,000 a second), fill 16 MiB in 40 ms, against CPs of 15-28 ms: 3.5% of the
/// writes were throttled. With 32 MiB, 0.1% were (benches/README.md).
pub const PARTITION_BYTES_DEFAULT: usize = 32 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    pub volume_id: u64,
    pub size: u64,
    pub partition_bytes: usize,
    pub epoch: u64,
    /// Where the volume's blocks live.
    pub storage: VolumeStorage,
    pub cp_interval_ms: u64,
    /// The mirror destination, once paired.
    pub mirror: Option<MirrorTarget>,
    /// CPs go to the mirror by value instead of by reference to its log files.
    #[serde(default)]
    pub cp_by_value: bool,
    /// What a write does when the mirror cannot take it.
    #[serde(default)]
    pub policy: Policy,
    /// The client addresses that may attach the volume over NBD (networks or addresses);
    /// empty: every client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MirrorTarget {
    pub peer_name: String,
    pub peer_control: String,
    pub replication: String,
    /// The peer's NVRAM mode, as it said when paired (older records: not known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_nvram: Option<NvramMode>,
    /// The peer's NVMe/TCP address, as it said when paired (a second path for discovery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_nvmf: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub volumes: Vec<VolumeRecord>,
    /// The highest epoch this node has known each volume at (by volume id, in hex), kept
    /// when the records that held it go (a promoted mirror whose disks became another
    /// mirror, a primary turned mirror): a hello from an older epoch is refused as stale.
    #[serde(default)]
    pub fences: std::collections::BTreeMap<String, u64>,
}

impl NodeState {
    /// Where primary volume `name`'s record is in `volumes`.
    fn volume_at(&self, name: &str) -> Result<usize> {
        self.volumes
            .iter()
            .position(|v| v.name == name)
            .ok_or_else(|| NotFound(format!("no volume {name} on this node")).into())
    }

    /// The record of primary volume `name`, to change.
    fn volume_mut(&mut self, name: &str) -> Result<&mut VolumeRecord> {
        let at = self.volume_at(name)?;
        Ok(&mut self.volumes[at])
    }
}

/// A volume, mirror or peer this node does not have (the API answers 404, `ctl` exits 4).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

/// A request the node cannot take as given (the API answers 400, `ctl` exits 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// Checks an NBD allow-list before it is recorded. A certificate name admits no one on a
/// node that does not verify client certificates: refused there, with the reason.
fn check_allow(list: &[String], client_certs: bool) -> Result<()> {
    let parsed = crate::allow::parse(list).map_err(|e| Invalid(format!("{e:#}")))?;
    if !client_certs {
        if let Some(crate::allow::Allow::Cert(name)) = parsed.iter().find(|a| matches!(a, crate::allow::Allow::Cert(_)))
        {
            return Err(Invalid(format!(
                "allow cert:{name}: this node does not verify NBD client certificates (start it with --tls-cert and --nbd-client-ca)"
            ))
            .into());
        }
    }
    Ok(())
}

pub struct NodeConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub nvram: NvramSpec,
    pub replication: SocketAddr,
    pub nbd: SocketAddr,
    /// `--nvmf`: the NVMe/TCP address, where the node serves it.
    pub nvmf: Option<SocketAddr>,
    pub control: SocketAddr,
    /// Geometry of RAID-4 volumes made of data-dir files, and of hosted mirrors.
    pub raid: RaidDefaults,
    /// How the mirrors this node hosts store their blocks.
    pub mirror_layout: MirrorLayout,
    /// The pair's shared secret (`--secret-file`): replication connections and pairings
    /// are authenticated with it, both ways. None: peers are not authenticated.
    pub secret: Option<PeerSecret>,
    /// TLS (`--tls-cert`, `--tls-key`, `--tls-ca`): the control API and the replication
    /// engine serve TLS only, and this node speaks TLS to its peers. None: plain TCP.
    pub tls: Option<nvmirror_dataplane::transport::tls::TlsConfig>,
    /// `--nbd-client-ca`: the NBD port requires client certificates signed by these CAs,
    /// and allow-lists may name clients by their certificate (`cert:NAME`).
    pub nbd_client_ca: Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
    /// `--require-signed-ctl`: admin calls (POSTs) must be signed with the secret (`ctl
    /// --secret-file`); reads stay open. Needs a secret.
    pub require_signed_ctl: bool,
    /// `--advertise`: the replication address peers are told to connect to, where it is
    /// not the one bound (NAT, a proxy, a replication network with names of its own).
    pub advertise: Option<String>,
    /// `--copy-rate`: bytes per second a copy sends at most, for volumes without a rate of
    /// their own (the node's default; SIGHUP changes it).
    pub copy_rate: Option<u64>,
    /// How this node calls its peers (their control API, in the daemon).
    pub peers: Arc<dyn PeerCalls>,
}

impl NodeConfig {
    /// How this node's replication connections are secured, both ways.
    pub fn link_security(&self) -> nvmirror_dataplane::transport::LinkSecurity {
        nvmirror_dataplane::transport::LinkSecurity { secret: self.secret.clone(), tls: self.tls.clone() }
    }

    /// The TCP replication address peers connect to: `--advertise`, or the bound one.
    pub fn advertised_replication(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.replication.to_string())
    }
}

/// Whose storage: a primary volume, or the mirror of (source node, volume).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StorageOwner {
    Volume(String),
    Mirror(String, String),
}

pub struct Node {
    pub cfg: NodeConfig,
    state: Mutex<NodeState>,
    volumes: RwLock<HashMap<String, Arc<SourceHandle>>>,
    mirrors: RwLock<HashMap<(String, String), Arc<Mirror>>>,
    next_core: AtomicUsize,
    failover_lock: Mutex<()>,
    connector: Arc<AnyConnector>,
    /// The RDMA engine, where the node has one.
    rdma: Option<Arc<dyn RdmaPlacement>>,
    open_volumes: OpenVolumes,
    /// The storage of every open primary and mirror.
    storage: RwLock<HashMap<StorageOwner, (VolumeStorage, Opened)>>,
    /// Volumes that could not start, and why.
    unstarted: Mutex<Vec<(String, String)>>,
    /// The hosts attached over NVMe/TCP, where the node serves it (set once it listens).
    nvmf_hosts: std::sync::OnceLock<nvmirror_dataplane::frontend::nvmf::NvmfHosts>,
    /// What changed on this node, for `ctl events`.
    pub events: Arc<crate::events::EventLog>,
    /// The copy rate of volumes without their own: `--copy-rate`, then SIGHUP's.
    copy_rate: Mutex<Option<u64>>,
    /// Volumes given a copy rate of their own (`ctl mirror --rate`), until the node stops.
    own_copy_rates: Mutex<HashMap<String, u64>>,
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync of the directory
/// (the syncs only where flushes must reach the device).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::other("no parent directory"))?;
    // A name of its own per call: two saves never share a temp file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    // Under file: NVRAM nothing the node writes need outlast more than the process (see
    // `storage::FlushReach`): the rename alone makes the update atomic against a kill, and
    // a mirror's CP, which saves its metadata twice, costs no device round trip.
    let durable = nvmirror_dataplane::storage::flush_reach() == nvmirror_dataplane::storage::FlushReach::Device;
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
    }
    fs::rename(&tmp, path)?;
    if durable {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn valid_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if !ok {
        bail!("invalid name {name:?}: use 1-64 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

impl Node {
    pub fn open(cfg: NodeConfig) -> Result<Arc<Node>> {
        // Node names go into paths, peers' records and metric labels.
        valid_name(&cfg.name).map_err(|e| anyhow!("--name: {e}"))?;
        fs::create_dir_all(&cfg.data_dir).with_context(|| format!("create {}", cfg.data_dir.display()))?;
        fs::create_dir_all(&cfg.nvram.dir).with_context(|| format!("create {}", cfg.nvram.dir.display()))?;
        if cfg.nvram.mode == nvmirror_dataplane::nvram::NvramMode::Direct {
            match nvmirror_dataplane::nvram::DeviceCache::of(&cfg.nvram.dir) {
                Ok(c) => tracing::info!("node {}: direct: log files on {c}", cfg.name),
                Err(e) => tracing::warn!(
                    "node {}: direct: cannot tell how the device under {} caches writes ({e}); every group commit \
                     is written with O_DSYNC, which the kernel makes durable either way",
                    cfg.name,
                    cfg.nvram.dir.display()
                ),
            }
        }
        let state_path = cfg.data_dir.join("node.json");
        let mut state: NodeState = if state_path.exists() {
            let bytes = fs::read(&state_path)?;
            serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not valid node state", state_path.display()))?
        } else {
            NodeState::default()
        };
        if state.name.is_empty() {
            state.name = cfg.name.clone();
        } else if state.name != cfg.name {
            bail!("data dir {} belongs to node {:?}, not {:?}", cfg.data_dir.display(), state.name, cfg.name);
        }
        let rdma = start_rdma(&cfg);
        let connector = Arc::new(AnyConnector::new(cfg.link_security()));
        let node = Arc::new(Node {
            copy_rate: Mutex::new(cfg.copy_rate),
            cfg,
            state: Mutex::new(state.clone()),
            volumes: RwLock::new(HashMap::new()),
            mirrors: RwLock::new(HashMap::new()),
            next_core: AtomicUsize::new(0),
            failover_lock: Mutex::new(()),
            connector,
            rdma,
            open_volumes: OpenVolumes::default(),
            storage: RwLock::new(HashMap::new()),
            unstarted: Mutex::new(Vec::new()),
            own_copy_rates: Mutex::new(HashMap::new()),
            nvmf_hosts: std::sync::OnceLock::new(),
            events: Arc::default(),
        });
        node.events.push("node-started", None, serde_json::json!({ "node": node.cfg.name }));
        node.save_state(&state)?;
        node.load_mirrors()?;
        // A failover that a crash cut short between the promotion and the record: the
        // promoted mirror is this node's volume, and it comes up as one.
        let orphans: Vec<(String, Arc<Mirror>)> = node
            .mirrors
            .read()
            .iter()
            .filter(|((_, v), m)| m.meta().promoted && !state.volumes.iter().any(|r| r.name == *v))
            .map(|((_, v), m)| (v.clone(), m.clone()))
            .collect();
        for (v, m) in orphans {
            tracing::info!("node {}: volume {v} was failed over here before a restart; taking it up", node.cfg.name);
            if let Err(e) = core::take_up_promoted(&mut FileEnv::new(&node, None), &m, None, false) {
                let why = format!("{e:#}");
                tracing::error!("node {}: volume {v} cannot start: {why}", node.cfg.name);
                node.unstarted.lock().push((v, why));
            }
        }
        // The records saved so far, those of volumes just taken up included.
        let volumes = node.state.lock().volumes.clone();
        for v in &volumes {
            // One volume that cannot start (its disks are gone) does not keep the node, and
            // the others, down: it is reported, with why, in the status.
            if let Err(e) = node.start_volume(v) {
                let why = format!("{e:#}");
                tracing::error!("node {}: volume {} cannot start: {why}", node.cfg.name, v.name);
                node.unstarted.lock().push((v.name.clone(), why));
            }
        }
        Ok(node)
    }

    fn save_state(&self, state: &NodeState) -> Result<()> {
        write_atomic(&self.cfg.data_dir.join("node.json"), &serde_json::to_vec_pretty(state)?)
            .context("save node state")
    }

    fn nvlog_path(&self, name: &str, epoch: u64) -> PathBuf {
        self.cfg.nvram.dir.join(core::nvlog_name(name, epoch))
    }

    fn start_volume(&self, v: &VolumeRecord) -> Result<()> {
        let opened = self.open_volumes.open(&v.name, &v.storage)?;
        let device = opened.device.clone();
        if device.size() < v.size {
            bail!("{} holds {} bytes, the volume needs {}", v.storage.describe(), device.size(), v.size);
        }
        // The storage's size is the volume's: larger than the record where a resize whose
        // storage grew before a crash kept its record from saying so (`resize`'s step 4).
        let size = device.size();
        if size > v.size {
            tracing::warn!(
                "node {}: volume {}: its storage holds {size} bytes, its record {}: a resize was cut short; \
                 the volume is {size} bytes",
                self.cfg.name,
                v.name,
                v.size,
            );
            let mut state = self.state.lock();
            state.volume_mut(&v.name)?.size = size;
            self.save_state(&state)?;
        }
        self.resume_rebuild(&v.name, &opened);
        self.storage.write().insert(StorageOwner::Volume(v.name.clone()), (v.storage.clone(), opened));
        let path = self.nvlog_path(&v.name, v.epoch);
        let region = open_region(&path, NvLog::<Box<dyn Nvram>>::region_bytes(v.partition_bytes), self.cfg.nvram.mode)?;
        let (log, recovered) =
            NvLog::open(region, v.volume_id, v.partition_bytes).with_context(|| format!("NVLog {}", path.display()))?;
        let changes = self.open_changes(&v.name, size)?;
        let mut cfg = SourceConfig::new(&self.cfg.name, &v.name, v.volume_id, v.partition_bytes);
        cfg.epoch = v.epoch;
        cfg.policy = v.policy;
        cfg.peer = v.mirror.as_ref().map(|m| m.peer_name.clone());
        cfg.cp_interval = Duration::from_millis(v.cp_interval_ms);
        cfg.cp_by_value = v.cp_by_value;
        cfg.core = Some(self.next_core.fetch_add(1, Ordering::Relaxed));
        cfg.nvmf = self.cfg.nvmf;
        let handle = source::spawn(source::SourceParts {
            cfg,
            nvlog: log,
            recovered,
            device,
            connector: self.connector.clone(),
            clock: Arc::new(SystemClock::default()),
            mirror: v.mirror.as_ref().map(|m| m.replication.clone()),
            changes: Some(changes),
        })?;
        if let Some(rate) = self.copy_rate_of(&v.name) {
            handle.control(Control::SetCopyRate(Some(rate))).map_err(|e| anyhow!(e))?;
        }
        self.volumes.write().insert(v.name.clone(), Arc::new(handle));
        Ok(())
    }

    /// The rate a copy of volume `name` keeps to: its own (`ctl mirror --rate`), else the
    /// node's (`--copy-rate`).
    fn copy_rate_of(&self, name: &str) -> Option<u64> {
        self.own_copy_rates.lock().get(name).copied().or(*self.copy_rate.lock())
    }

    /// The node's copy rate, for volumes without their own (SIGHUP): applied at once.
    pub fn set_copy_rate(&self, rate: Option<u64>) {
        let rate = rate.filter(|&r| r > 0);
        *self.copy_rate.lock() = rate;
        let own = self.own_copy_rates.lock().clone();
        for (_, h) in self.volumes.read().iter().filter(|(name, _)| !own.contains_key(*name)) {
            let _ = h.control(Control::SetCopyRate(rate));
        }
    }

    fn changes_path(&self, name: &str) -> PathBuf {
        self.cfg.nvram.dir.join(core::changes_name(name))
    }

    /// The volume's change map. One a crash damaged opens conservatively (and says so);
    /// one of another shape (an older format, another size) is replaced by a map with no
    /// base (the next mirror is a full baseline): what it knew is lost, never trusted
    /// wrongly.
    fn open_changes(&self, name: &str, size: u64) -> Result<ChangeMap> {
        let path = self.changes_path(name);
        // A region file grown for a resize that a crash cut short may be larger than the
        // size needs: opened whole.
        let grown = fs::metadata(&path).ok().filter(fs::Metadata::is_file).map_or(0, |m| m.len());
        let len = ChangeMap::region_bytes(size).max(usize::try_from(grown).unwrap_or(usize::MAX));
        let open = || -> Result<ChangeMap> {
            let r = open_region(&path, len, self.cfg.nvram.mode)?;
            Ok(ChangeMap::open(r, size)?)
        };
        match open() {
            Ok(m) => {
                if let Some(what) = m.repaired() {
                    tracing::warn!("node {}: volume {name}: change map {}: {what}", self.cfg.name, path.display());
                }
                Ok(m)
            }
            Err(e) => {
                tracing::warn!(
                    "node {}: volume {name}: change map {}: {e:#}; starting a new one (the next mirror copy is whole)",
                    self.cfg.name,
                    path.display()
                );
                let _ = fs::remove_file(&path);
                let mut m = open()?;
                m.mark_all();
                m.persist()?;
                Ok(m)
            }
        }
    }

    /// Records that this node has known volume `volume_id` at `epoch`.
    fn fence(state: &mut NodeState, volume_id: u64, epoch: u64) {
        let e = state.fences.entry(format!("{volume_id:016x}")).or_insert(0);
        *e = (*e).max(epoch);
    }

    /// The highest epoch this node knows volume `volume_id` at.
    fn known_epoch(&self, volume_id: u64) -> u64 {
        let state = self.state.lock();
        let fenced = state.fences.get(&format!("{volume_id:016x}")).copied().unwrap_or(0);
        let own = state.volumes.iter().filter(|v| v.volume_id == volume_id).map(|v| v.epoch).max().unwrap_or(0);
        drop(state);
        let mirrors =
            self.mirrors.read().values().map(|m| m.meta()).filter(|m| m.volume_id == volume_id).map(|m| m.epoch).max();
        fenced.max(own).max(mirrors.unwrap_or(0))
    }

    fn mirror_dir(&self, source: &str, volume: &str) -> PathBuf {
        self.cfg.data_dir.join("mirrors").join(source).join(volume)
    }

    fn mirror_log_path(&self, source: &str, volume: &str, p: usize) -> PathBuf {
        self.cfg.nvram.dir.join(core::mirror_log_name(source, volume, p))
    }

    /// The RDMA engine's address, where this node offers one.
    pub fn rdma_addr(&self) -> Option<String> {
        self.rdma.as_ref().map(|_| self.cfg.replication.to_string())
    }

    // ---- administration ----

    pub fn volume(&self, name: &str) -> Result<Arc<SourceHandle>> {
        if let Some(v) = self.volumes.read().get(name) {
            return Ok(v.clone());
        }
        if let Some((_, why)) = self.unstarted.lock().iter().find(|(v, _)| v == name) {
            bail!("volume {name} could not start: {why}");
        }
        Err(NotFound(format!("no volume {name} on this node")).into())
    }

    pub fn cp(&self, name: &str, timeout: Duration) -> Result<u64> {
        let handle = self.volume(name)?;
        let (tx, rx) = bounded(1);
        handle.control(Control::Cp(tx)).map_err(|e| anyhow!(e))?;
        let cp = rx
            .recv_timeout(timeout)
            .map_err(|_| anyhow!("CP did not complete within {timeout:?} (is the mirror link up?)"))?
            .map_err(|e| anyhow!(e))?;
        self.events.push("cp-forced", Some(name), serde_json::json!({ "cp": cp }));
        Ok(cp)
    }

    /// Fences primary volume `name` here (fleet mode: another node holds it).
    pub fn fence_volume(&self, name: &str, why: &str) {
        if let Some(h) = self.volumes.read().get(name) {
            if h.control(Control::Fence(why.to_string())).is_ok() {
                tracing::error!("node {}: volume {name} fenced: {why}", self.cfg.name);
                self.events.push("fenced", Some(name), serde_json::json!({ "reason": why }));
            }
        }
    }

    /// This node cannot renew its etcd lease: etcd may soon say no node is the primary, and
    /// a mirror may take over. Each primary volume whose pair is in sync goes on, held to
    /// policy strict (its mirror must take every write, so none is acknowledged here alone
    /// while etcd cannot vouch for this node; a mirror that fails over fences it through the
    /// link); every other one is fenced: this node can prove neither. `held` is the set of
    /// volumes held so far; the ones held are added, a held one no longer in sync is fenced.
    pub fn hold_or_fence_primaries(&self, why: &str, held: &mut std::collections::HashSet<String>) {
        let handles: Vec<_> = self.volumes.read().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (name, h) in handles {
            match h.status().map(|s| s.state) {
                Ok(PairState::InSync) => {}
                // Fenced or failed already: nothing to do again every round.
                Ok(PairState::Fenced | PairState::Failed) => {
                    held.remove(&name);
                    continue;
                }
                _ => {
                    held.remove(&name);
                    self.fence_volume(&name, why);
                    continue;
                }
            }
            if held.insert(name.clone()) && h.control(Control::SetPolicy(Policy::Strict)).is_ok() {
                tracing::warn!(
                    "node {}: volume {name} goes on while its mirror takes every write ({why}); held to policy \
                     strict until etcd answers",
                    self.cfg.name
                );
                self.events.push("held-strict", Some(&name), serde_json::json!({ "reason": why }));
            }
        }
    }

    /// etcd answers again: the volumes held to strict by [`Node::hold_or_fence_primaries`]
    /// take their own policy back.
    pub fn release_held(&self, held: &mut std::collections::HashSet<String>) {
        for name in held.drain() {
            let policy = self.state.lock().volumes.iter().find(|v| v.name == name).map(|v| v.policy);
            let handle = self.volumes.read().get(&name).cloned();
            if let (Some(policy), Some(h)) = (policy, handle) {
                if h.control(Control::SetPolicy(policy)).is_ok() {
                    tracing::warn!(
                        "node {}: etcd answers again: volume {name} back to policy {}",
                        self.cfg.name,
                        policy.as_str()
                    );
                }
            }
        }
    }

    fn volume_record(&self, name: &str) -> Result<VolumeRecord> {
        let state = self.state.lock();
        Ok(state.volumes[state.volume_at(name)?].clone())
    }

    /// Stops every primary volume cleanly, within `bound` in all: a pair in sync
    /// quiesces (its in-flight writes acknowledged, new ones held, a last CP taken, so that
    /// it restarts level with its mirror); any other volume gets until its in-flight
    /// writes are done. Then the pollers stop; writes still held fail, none of them
    /// acknowledged. Returns, per volume, whether it drained.
    pub fn stop_cleanly(&self, bound: Duration) -> Vec<(String, bool)> {
        let deadline = std::time::Instant::now() + bound;
        let handles: Vec<(String, Arc<SourceHandle>)> =
            self.volumes.read().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut quiescing = Vec::new();
        for (name, h) in &handles {
            let (tx, rx) = bounded(1);
            if h.control(Control::Quiesce(tx)).is_ok() {
                quiescing.push((name.clone(), h.clone(), rx));
            }
        }
        let mut report = Vec::new();
        for (name, h, rx) in quiescing {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let drained = match rx.recv_timeout(left) {
                Ok(Ok(_)) => true,
                // A copy under way: a CP, whose acknowledgement makes what the mirror has
                // of the copy stay there (the copy resumes from it after the restart).
                Ok(Err(_))
                    if h.status().is_ok_and(|s| matches!(s.state, PairState::Baseline | PairState::Resyncing)) =>
                {
                    // (A CP already closing when asked may have started before the copy
                    // did: its acknowledgement is no checkpoint, the next one is.)
                    let mut cp = None;
                    let mut from = None;
                    for _ in 0..3 {
                        let (tx, rx) = bounded(1);
                        let left = deadline.saturating_duration_since(std::time::Instant::now());
                        cp = h.control(Control::Cp(tx)).ok().and_then(|()| rx.recv_timeout(left).ok());
                        from = h.status().ok().and_then(|s| s.copy_resumable_from);
                        if from.is_some() || !matches!(cp, Some(Ok(_))) {
                            break;
                        }
                    }
                    let done = matches!(cp, Some(Ok(_)));
                    match (cp, from) {
                        (Some(Ok(_)), Some(from)) => tracing::info!(
                            "node {}: volume {name}: the copy to the mirror stops; it resumes from byte {from} \
                             after the restart",
                            self.cfg.name
                        ),
                        (cp, _) => tracing::warn!(
                            "node {}: volume {name}: the copy to the mirror stops without a checkpoint ({}); it \
                             starts again after the restart",
                            self.cfg.name,
                            match cp {
                                Some(Err(e)) => e.to_string(),
                                Some(Ok(_)) => "no CP confirmed a checkpoint".into(),
                                None => "the mirror did not confirm in time".into(),
                            }
                        ),
                    }
                    done
                }
                // Not in sync (or unmirrored): wait for the writes in flight alone.
                Ok(Err(_)) => loop {
                    match h.status() {
                        Ok(s) if s.pending_writes == 0 => break true,
                        Ok(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                        _ => break false,
                    }
                },
                Err(_) => false,
            };
            h.stop();
            self.volumes.write().remove(&name);
            report.push((name, drained));
        }
        report
    }

    pub fn shutdown(&self) {
        let handles: Vec<_> = self.volumes.write().drain().map(|(_, h)| h).collect();
        for h in handles {
            h.stop();
        }
    }
}
