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
use nvmirror_dataplane::nvram::{MappedNvram, Nvram, NvramSpec};
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

use crate::storage::{OpenVolumes, Opened, RaidDefaults, StorageStatus, VolumeStorage};

/// Default NVLog partition size (two per volume).
pub const PARTITION_BYTES_DEFAULT: usize = 16 << 20;

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
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MirrorTarget {
    pub peer_name: String,
    pub peer_control: String,
    pub replication: String,
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

pub struct NodeConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub nvram: NvramSpec,
    pub replication: SocketAddr,
    pub nbd: SocketAddr,
    pub control: SocketAddr,
    /// Geometry of RAID-4 volumes made of data-dir files, and of hosted mirrors.
    pub raid: RaidDefaults,
    /// The pair's shared secret (`--secret-file`): replication connections and pairings
    /// are authenticated with it, both ways. None: peers are not authenticated.
    pub secret: Option<PeerSecret>,
    /// TLS (`--tls-cert`, `--tls-key`, `--tls-ca`): the control API and the replication
    /// engine serve TLS only, and this node speaks TLS to its peers. None: plain TCP.
    pub tls: Option<nvmirror_dataplane::transport::tls::TlsConfig>,
    /// `--require-signed-ctl`: admin calls (POSTs) must be signed with the secret (`ctl
    /// --secret-file`); reads stay open. Needs a secret.
    pub require_signed_ctl: bool,
    /// `--advertise`: the replication address peers are told to connect to, where it is
    /// not the one bound (NAT, a proxy, a replication network with names of its own).
    pub advertise: Option<String>,
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
    /// What changed on this node, for `ctl events`.
    pub events: Arc<crate::events::EventLog>,
    /// Nonces issued for node-to-node requests to this node (`GET /v1/call-challenge`).
    pub call_nonces: crate::api::CallNonces,
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

struct FileMetaStore(PathBuf);

impl MetaStore for FileMetaStore {
    fn save(&self, meta: &MirrorMeta) -> io::Result<()> {
        write_atomic(&self.0, &serde_json::to_vec_pretty(meta).map_err(io::Error::other)?)
    }
}

/// A mirror exported read-only: reads see the mirror as of its last completed CP.
struct MirrorExport(Arc<Mirror>);

impl Export for MirrorExport {
    fn size(&self) -> u64 {
        self.0.meta().volume_bytes
    }
    fn read_only(&self) -> bool {
        true
    }
    fn submit(&self, request: IoRequest, done: Completer) {
        match request {
            IoRequest::Read { offset, len } => {
                let mut buf = vec![0u8; len as usize];
                done.complete(self.0.read(&mut buf, offset).map(|()| Some(buf)));
            }
            IoRequest::Flush => done.complete(Ok(None)),
            _ => done.complete(Err(io::Error::from_raw_os_error(libc::EPERM))),
        }
    }
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
        fs::create_dir_all(&cfg.data_dir).with_context(|| format!("create {}", cfg.data_dir.display()))?;
        fs::create_dir_all(&cfg.nvram.dir).with_context(|| format!("create {}", cfg.nvram.dir.display()))?;
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
            events: Arc::default(),
            call_nonces: crate::api::CallNonces::default(),
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
            eprintln!("node {}: volume {v} was failed over here before a restart; taking it up", node.cfg.name);
            if let Err(e) = core::take_up_promoted(&mut FileEnv::new(&node, None), &m, None, false) {
                let why = format!("{e:#}");
                eprintln!("node {}: volume {v} cannot start: {why}", node.cfg.name);
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
                eprintln!("node {}: volume {} cannot start: {why}", node.cfg.name, v.name);
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
        self.resume_rebuild(&v.name, &opened);
        self.storage.write().insert(StorageOwner::Volume(v.name.clone()), (v.storage.clone(), opened));
        let path = self.nvlog_path(&v.name, v.epoch);
        let region =
            MappedNvram::open(&path, NvLog::<MappedNvram>::region_bytes(v.partition_bytes), self.cfg.nvram.mode)?;
        let region: Box<dyn Nvram> = Box::new(region);
        let (log, recovered) =
            NvLog::open(region, v.volume_id, v.partition_bytes).with_context(|| format!("NVLog {}", path.display()))?;
        let changes = self.open_changes(&v.name, v.size)?;
        let mut cfg = SourceConfig::new(&self.cfg.name, &v.name, v.volume_id, v.partition_bytes);
        cfg.epoch = v.epoch;
        cfg.policy = v.policy;
        cfg.peer = v.mirror.as_ref().map(|m| m.peer_name.clone());
        cfg.cp_interval = Duration::from_millis(v.cp_interval_ms);
        cfg.cp_by_value = v.cp_by_value;
        cfg.core = Some(self.next_core.fetch_add(1, Ordering::Relaxed));
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
        self.volumes.write().insert(v.name.clone(), Arc::new(handle));
        Ok(())
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
        let len = ChangeMap::region_bytes(size);
        let open = || -> Result<ChangeMap> {
            let r = MappedNvram::open(&path, len, self.cfg.nvram.mode)?;
            Ok(ChangeMap::open(Box::new(r), size)?)
        };
        match open() {
            Ok(m) => {
                if let Some(what) = m.repaired() {
                    eprintln!("node {}: volume {name}: change map {}: {what}", self.cfg.name, path.display());
                }
                Ok(m)
            }
            Err(e) => {
                eprintln!(
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

    fn load_mirrors(&self) -> Result<()> {
        let root = self.cfg.data_dir.join("mirrors");
        let Ok(sources) = fs::read_dir(&root) else { return Ok(()) };
        for s in sources {
            let s = s?;
            for v in fs::read_dir(s.path())? {
                let v = v?;
                let meta_path = v.path().join("meta.json");
                if !meta_path.exists() {
                    continue;
                }
                let meta: MirrorMeta = serde_json::from_slice(&fs::read(&meta_path)?)
                    .with_context(|| format!("{} is not valid mirror metadata", meta_path.display()))?;
                let mirror = self.open_mirror(meta).with_context(|| format!("open mirror {}", v.path().display()))?;
                let m = mirror.meta();
                self.mirrors.write().insert((m.source_node, m.volume), mirror);
            }
        }
        Ok(())
    }

    fn open_mirror(&self, meta: MirrorMeta) -> Result<Arc<Mirror>> {
        self.open_mirror_with(meta, None)
    }

    /// Opens the mirror `meta` describes, with its log files (opened here where `None`).
    fn open_mirror_with(
        &self,
        mut meta: MirrorMeta,
        logs: Option<[Box<dyn Nvram>; PARTITIONS]>,
    ) -> Result<Arc<Mirror>> {
        let dir = self.mirror_dir(&meta.source_node, &meta.volume);
        fs::create_dir_all(&dir)?;
        let logs = match logs {
            Some(logs) => logs,
            None => {
                let logdir = self.mirror_log_path(&meta.source_node, &meta.volume, 0);
                fs::create_dir_all(logdir.parent().expect("log path has a parent"))?;
                let pb = usize::try_from(meta.partition_bytes).context("partition size")?;
                let logs: Vec<Box<dyn Nvram>> = (0..PARTITIONS)
                    .map(|p| {
                        let path = self.mirror_log_path(&meta.source_node, &meta.volume, p);
                        MappedNvram::open(&path, pb, self.cfg.nvram.mode).map(|r| Box::new(r) as Box<dyn Nvram>)
                    })
                    .collect::<Result<_, _>>()?;
                logs.try_into().map_err(|_| anyhow!("two logs"))?
            }
        };
        let storage_path = dir.join("storage.json");
        let (storage, opened) = if storage_path.exists() {
            let storage: VolumeStorage = serde_json::from_slice(&fs::read(&storage_path)?)
                .with_context(|| format!("{} is not a valid storage description", storage_path.display()))?;
            // A mirror's storage found dirty and degraded (a crash during a CP with a member
            // gone) opens all the same, taken as inconsistent: the source copies it over
            // whole. A promoted mirror is a volume's storage: refused, as a volume's is.
            let opened = if meta.promoted {
                self.open_volumes.open(&meta.volume, &storage)?
            } else {
                self.open_volumes.open_for_copy(&meta.volume, &storage)?
            };
            if opened.raid.as_ref().is_some_and(|r| r.write_hole_found())
                && (meta.consistent || meta.pending_cp.is_some())
            {
                eprintln!(
                    "mirror {}/{}: its storage was left dirty and degraded by a crash; it takes a baseline copy",
                    meta.source_node, meta.volume
                );
                meta.consistent = false;
                meta.resyncing = false;
                meta.pending_cp = None;
            }
            (storage, opened)
        } else {
            // A new mirror, in this node's own geometry. Member files left by a creation
            // that did not finish hold nothing: nothing was acknowledged into them.
            let storage = VolumeStorage::raid_in(&dir, self.cfg.raid.data_disks, self.cfg.raid.engine);
            for d in storage.disks() {
                if d.path.starts_with(&dir) && d.path.exists() {
                    fs::remove_file(&d.path)?;
                }
            }
            let opened =
                self.open_volumes.create(&meta.volume, &storage, meta.volume_bytes, self.cfg.raid.stripe_unit)?;
            write_atomic(&storage_path, &serde_json::to_vec_pretty(&storage)?)?;
            (storage, opened)
        };
        if opened.device.size() < meta.volume_bytes {
            bail!(
                "{} holds {} bytes, the mirror needs {}",
                storage.describe(),
                opened.device.size(),
                meta.volume_bytes
            );
        }
        self.resume_rebuild(&meta.volume, &opened);
        let device = opened.device.clone();
        self.storage
            .write()
            .insert(StorageOwner::Mirror(meta.source_node.clone(), meta.volume.clone()), (storage, opened));
        let store = Box::new(FileMetaStore(dir.join("meta.json")));
        store.save(&meta)?;
        Ok(Mirror::open(meta, store, logs, device)?)
    }

    /// Restarts a rebuild that a restart interrupted.
    fn resume_rebuild(&self, name: &str, opened: &Opened) {
        if let Some(raid) = &opened.raid {
            if let Some(m) = raid.rebuilding_member() {
                eprintln!("node {}: volume {name}: resuming the rebuild of member {m}", self.cfg.name);
                spawn_rebuild(raid.clone(), None, name, self.events.clone());
            }
        }
    }

    /// The RDMA engine's address, where this node offers one.
    pub fn rdma_addr(&self) -> Option<String> {
        self.rdma.as_ref().map(|_| self.cfg.replication.to_string())
    }

    // ---- administration ----

    #[allow(clippy::too_many_arguments)]
    pub fn create_volume(
        &self,
        name: &str,
        size: u64,
        storage: Option<VolumeStorage>,
        layout: CreateLayout,
        partition_bytes: Option<usize>,
        cp_by_value: bool,
    ) -> Result<VolumeRecord> {
        valid_name(name)?;
        if size == 0 || !size.is_multiple_of(BLOCK_BYTES as u64) {
            bail!("size {size} is not a positive multiple of {BLOCK_BYTES} bytes");
        }
        let partition_bytes = partition_bytes.unwrap_or(PARTITION_BYTES_DEFAULT);
        if partition_bytes < PARTITION_BYTES_MIN || !partition_bytes.is_multiple_of(BLOCK_BYTES) {
            bail!("log partition size must be a multiple of {BLOCK_BYTES} and at least {PARTITION_BYTES_MIN} bytes");
        }
        let mut state = self.state.lock();
        if state.volumes.iter().any(|v| v.name == name) || self.volumes.read().contains_key(name) {
            bail!("volume {name} already exists on this node");
        }
        if self.mirrors.read().keys().any(|(_, v)| v == name) {
            bail!("a mirror of a volume named {name} lives on this node; pick another name");
        }
        let storage = match storage {
            Some(s) => {
                if layout.data_disks.is_some() || layout.engine.is_some() {
                    bail!("--data-disks and --engine are for volumes made of data-dir files; with --disk, name each disk (ENGINE:PATH)");
                }
                if matches!(s, VolumeStorage::Single { .. }) && layout.stripe_unit.is_some() {
                    bail!("--stripe-unit needs RAID-4 (--disk at least twice, and --parity)");
                }
                s
            }
            None => {
                let dir = self.cfg.data_dir.join("volumes").join(name);
                if dir.exists() {
                    bail!("{} exists from an earlier volume {name}; remove it first", dir.display());
                }
                fs::create_dir_all(&dir)?;
                VolumeStorage::raid_in(
                    &dir,
                    layout.data_disks.unwrap_or(self.cfg.raid.data_disks),
                    layout.engine.unwrap_or(self.cfg.raid.engine),
                )
            }
        };
        let opened = self
            .open_volumes
            .create(name, &storage, size, layout.stripe_unit.unwrap_or(self.cfg.raid.stripe_unit))
            .with_context(|| format!("create volume {name} on {}", storage.describe()))?;
        drop(opened);
        let record = VolumeRecord {
            name: name.to_string(),
            volume_id: rand::random::<u64>() | 1,
            size,
            partition_bytes,
            epoch: 1,
            storage,
            cp_interval_ms: 10_000,
            mirror: None,
            cp_by_value,
            policy: Policy::Strict,
        };
        state.volumes.push(record.clone());
        // Saved under the state lock: saves are ordered with the changes they record.
        self.save_state(&state)?;
        drop(state);
        self.start_volume(&record)?;
        self.events.push("volume-created", Some(name), serde_json::json!({ "size": size }));
        Ok(record)
    }

    pub fn volume(&self, name: &str) -> Result<Arc<SourceHandle>> {
        if let Some(v) = self.volumes.read().get(name) {
            return Ok(v.clone());
        }
        if let Some((_, why)) = self.unstarted.lock().iter().find(|(v, _)| v == name) {
            bail!("volume {name} could not start: {why}");
        }
        bail!("no volume {name} on this node")
    }

    /// Pairs `name` with the peer whose control API answered `peer`, and starts the
    /// baseline.
    pub fn mirror_volume(
        &self,
        name: &str,
        target: MirrorTarget,
        policy: Policy,
        resync: &[(u64, u64)],
        rate: Option<u64>,
    ) -> Result<()> {
        let handle = self.volume(name)?;
        if target.peer_name == self.cfg.name {
            bail!("cannot mirror a volume to its own node");
        }
        {
            let mut state = self.state.lock();
            let v = state.volumes.iter_mut().find(|v| v.name == name).ok_or_else(|| anyhow!("no volume {name}"))?;
            match &v.mirror {
                Some(m) if *m != target => {
                    bail!("volume {name} is already mirrored to {} ({})", m.peer_name, m.peer_control)
                }
                _ => v.mirror = Some(target.clone()),
            }
            v.policy = policy;
            // Saved under the state lock: saves are ordered with the changes they record.
            self.save_state(&state)?;
            drop(state);
        }
        handle.control(Control::SetPolicy(policy)).map_err(|e| anyhow!(e))?;
        handle.control(Control::SetCopyRate(rate)).map_err(|e| anyhow!(e))?;
        self.events.push(
            "mirror-paired",
            Some(name),
            serde_json::json!({ "peer": target.peer_name, "policy": policy.as_str(), "resync_ranges": resync.len() }),
        );
        if !resync.is_empty() {
            // The peer's own changes (a returning old primary): copied back with ours.
            let per = nvmirror_dataplane::log::REGION_BYTES;
            let size = handle.size();
            let regions: Vec<u64> = resync
                .iter()
                .flat_map(|&(first, n)| first..first.saturating_add(n))
                .filter(|r| r.saturating_mul(per) < size)
                .collect();
            let (tx, rx) = bounded(1);
            handle.control(Control::MarkRegions { regions, reply: tx }).map_err(|e| anyhow!(e))?;
            rx.recv_timeout(Duration::from_secs(30))
                .map_err(|_| anyhow!("volume poller did not answer"))?
                .map_err(|e| anyhow!(e))?;
        }
        let (tx, rx) = bounded(1);
        handle
            .control(Control::Attach {
                target: target.replication.clone(),
                peer: Some(target.peer_name.clone()),
                reply: tx,
            })
            .map_err(|e| anyhow!(e))?;
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow!("volume poller did not answer"))?
            .map_err(|e| anyhow!(e))
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

    /// Fails the mirror of `name` over to this node and serves it as a writable primary.
    pub fn failover(&self, name: &str) -> Result<PromoteReport> {
        self.failover_at(name, None)
    }

    /// Fences primary volume `name` here (fleet mode: another node holds it).
    pub fn fence_volume(&self, name: &str, why: &str) {
        if let Some(h) = self.volumes.read().get(name) {
            if h.control(Control::Fence(why.to_string())).is_ok() {
                eprintln!("node {}: volume {name} fenced: {why}", self.cfg.name);
                self.events.push("fenced", Some(name), serde_json::json!({ "reason": why }));
            }
        }
    }

    /// Fences every primary volume here.
    pub fn fence_primaries(&self, why: &str) {
        let names: Vec<String> = self.volumes.read().keys().cloned().collect();
        for n in names {
            self.fence_volume(&n, why);
        }
    }

    /// As [`Node::failover`], the new epoch at least `epoch` where given (a fencing token).
    pub fn failover_at(&self, name: &str, epoch: Option<u64>) -> Result<PromoteReport> {
        // One failover at a time on this node: the checks below and the promotion are one
        // step.
        let _one = self.failover_lock.lock();
        if self.volumes.read().contains_key(name) {
            bail!("volume {name} is already a primary on this node");
        }
        let mirror = {
            let mirrors = self.mirrors.read();
            let found: Vec<_> = mirrors.iter().filter(|((_, v), m)| v == name && !m.meta().promoted).collect();
            match found.as_slice() {
                [] => bail!("no mirror of volume {name} on this node"),
                [(_, m)] => (*m).clone(),
                _ => bail!("mirrors of several volumes named {name} live here"),
            }
        };
        let report = core::failover(&mut FileEnv::new(self, None), &mirror, epoch)?;
        self.events.push(
            "failover",
            Some(name),
            serde_json::json!({ "epoch": report.epoch, "entries_replayed": report.entries_replayed, "stops": report.stops }),
        );
        Ok(report)
    }

    pub fn status(&self) -> NodeStatus {
        let state = self.state.lock().clone();
        let mut volumes = Vec::new();
        let handles: Vec<_> = self.volumes.read().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (name, h) in handles {
            let rec = state.volumes.iter().find(|v| v.name == name);
            match h.status() {
                Ok(s) => volumes.push(VolumeStatus {
                    role: "primary",
                    replication_lag_entries: if s.peer.is_some() {
                        s.acked_seq.saturating_sub(s.mirror_acked_seq)
                    } else {
                        0
                    },
                    peer: rec.and_then(|r| r.mirror.as_ref().map(|m| format!("{} ({})", m.peer_name, m.peer_control))),
                    storage: self.storage_status(&StorageOwner::Volume(name.clone())),
                    source: s,
                }),
                Err(e) => eprintln!("status of {name}: {e}"),
            }
        }
        volumes.sort_by(|a, b| a.source.volume.cmp(&b.source.volume));
        let mut mirrors: Vec<MirrorEntry> = self
            .mirrors
            .read()
            .values()
            .map(|m| {
                let mirror = m.status();
                let storage =
                    self.storage_status(&StorageOwner::Mirror(mirror.source_node.clone(), mirror.volume.clone()));
                let meta = m.meta();
                let state = if mirror.promoted {
                    "broken"
                } else if meta.resyncing {
                    "resyncing"
                } else if !mirror.consistent {
                    "baseline"
                } else if mirror.connected {
                    "in-sync"
                } else {
                    "out-of-sync"
                };
                MirrorEntry { role: "mirror", state, mirror, storage }
            })
            .collect();
        mirrors
            .sort_by(|a, b| (&a.mirror.volume, &a.mirror.source_node).cmp(&(&b.mirror.volume, &b.mirror.source_node)));
        NodeStatus {
            node: self.cfg.name.clone(),
            replication: self.cfg.advertised_replication(),
            nbd: self.cfg.nbd.to_string(),
            control: self.cfg.control.to_string(),
            nvram: format!("{}:{}", self.cfg.nvram.mode.as_str(), self.cfg.nvram.dir.display()),
            nvram_survives: self.cfg.nvram.mode.survives().to_string(),
            volumes,
            mirrors,
            unstarted: self
                .unstarted
                .lock()
                .iter()
                .map(|(volume, reason)| UnstartedVolume {
                    volume: volume.clone(),
                    state: "failed",
                    reason: reason.clone(),
                })
                .collect(),
        }
    }

    fn storage_status(&self, owner: &StorageOwner) -> Option<StorageStatus> {
        self.storage.read().get(owner).map(|(s, o)| o.status(s))
    }

    /// The RAID-4 layer of volume `name`: the primary's, else the mirror's of that name.
    pub fn raid(&self, name: &str) -> Result<(StorageOwner, Arc<Raid4>)> {
        let storage = self.storage.read();
        let primary = StorageOwner::Volume(name.to_string());
        let found: Vec<(StorageOwner, Option<Arc<Raid4>>)> = match storage.get(&primary) {
            Some((_, o)) => vec![(primary, o.raid.clone())],
            None => storage
                .iter()
                .filter(|(k, _)| matches!(k, StorageOwner::Mirror(_, v) if v == name))
                .map(|(k, (_, o))| (k.clone(), o.raid.clone()))
                .collect(),
        };
        match found.as_slice() {
            [] => bail!("no volume or mirror {name} on this node"),
            [(owner, Some(r))] => Ok((owner.clone(), r.clone())),
            [(_, None)] => bail!("volume {name} is on a single disk: there is no RAID-4 layer to scrub or rebuild"),
            _ => bail!("mirrors of several volumes named {name} live here"),
        }
    }

    /// Starts a scrub of volume `name` in the background.
    pub fn scrub(&self, name: &str, rate: Option<u64>) -> Result<()> {
        let (_, raid) = self.raid(name)?;
        if let Some(p) = raid.status().scrub.or(raid.status().rebuild) {
            bail!("a {} of {name} is already running ({} of {} bytes)", p.operation, p.done_bytes, p.total_bytes);
        }
        let name = name.to_string();
        let events = self.events.clone();
        events.push("scrub-started", Some(&name), serde_json::json!({ "rate": rate }));
        std::thread::Builder::new().name("nvm-scrub".into()).spawn(move || match raid.scrub(rate) {
            Ok(r) => {
                eprintln!("scrub of {name}: {} ({r:?})", r.result);
                events.push("scrub-finished", Some(&name), serde_json::to_value(&r).unwrap_or_default());
            }
            Err(e) => {
                eprintln!("scrub of {name}: {e}");
                events.push("scrub-finished", Some(&name), serde_json::json!({ "result": format!("aborted: {e}") }));
            }
        })?;
        Ok(())
    }

    /// Replaces member `old` (an index or a disk) of volume `name` by `new`, records the
    /// new member list, and starts the rebuild in the background.
    pub fn replace_disk(&self, name: &str, old: &str, new: &str, rate: Option<u64>) -> Result<usize> {
        let (owner, raid) = self.raid(name)?;
        let member = raid
            .member_index(old)
            .ok_or_else(|| anyhow!("{old} is not a member of {name} (members: {:?})", raid.disks()))?;
        let new = DiskSpec::parse(new).map_err(|e| anyhow!(e))?;
        raid.replace_member(member, &new).with_context(|| format!("replace member {member} of {name}"))?;
        let mut disks = raid.disks();
        disks[member] = new;
        let storage = VolumeStorage::Raid4 { disks };
        match &owner {
            StorageOwner::Volume(v) => {
                let mut state = self.state.lock();
                if let Some(rec) = state.volumes.iter_mut().find(|r| r.name == *v) {
                    rec.storage = storage.clone();
                }
                self.save_state(&state)?;
            }
            StorageOwner::Mirror(src, v) => {
                write_atomic(&self.mirror_dir(src, v).join("storage.json"), &serde_json::to_vec_pretty(&storage)?)?;
            }
        }
        if let Some(entry) = self.storage.write().get_mut(&owner) {
            entry.0 = storage;
        }
        self.events.push(
            "disk-replaced",
            Some(name),
            serde_json::json!({ "member": member, "old": old, "new": raid.disks()[member].to_string() }),
        );
        spawn_rebuild(raid, rate, name, self.events.clone());
        Ok(member)
    }

    // ---- role changes: failback resync, planned switchover ----

    /// Makes this node's volume `name` (stopped by the caller) the mirror that `meta`
    /// describes, in place on its storage, with fresh log files. The volume record goes;
    /// so do promoted mirrors of earlier failovers on the same storage (one RAID volume
    /// drives a set of disks); the epochs they knew stay as fences.
    /// Makes `storage`, primary volume `name` here until now, the mirror `meta` describes
    /// (the node core's adoption, the one the simulator runs).
    fn adopt_as_mirror(&self, storage: &VolumeStorage, meta: MirrorMeta, fence_epoch: u64) -> Result<()> {
        core::adopt_as_mirror(&mut FileEnv::new(self, None), meta, storage.clone(), fence_epoch)?;
        Ok(())
    }

    fn volume_record(&self, name: &str) -> Result<VolumeRecord> {
        self.state
            .lock()
            .volumes
            .iter()
            .find(|v| v.name == name)
            .cloned()
            .ok_or_else(|| anyhow!("no record of volume {name}"))
    }

    /// `ctl resync VOL --from PRIMARY`, on a node that lost `name` to a failover: the
    /// volume becomes the new primary's mirror in place, and the new primary brings it
    /// level with a delta resync of what either side changed since their last common CP
    /// (a baseline, where its change map is not relative to this node). A volume that could
    /// not start here (its storage dirty and degraded after a crash: the RAID-4 write hole)
    /// becomes the mirror all the same, its storage opened for the copy, by a baseline.
    pub fn resync_from(&self, name: &str, primary_control: &str) -> Result<ResyncStarted> {
        let handle = match self.volume(name) {
            Ok(h) => Some(h),
            Err(e) if self.unstarted.lock().iter().any(|(v, _)| v == name) => {
                eprintln!("node {}: volume {name} is not running ({e:#}): it takes a baseline copy", self.cfg.name);
                None
            }
            Err(e) => return Err(e),
        };
        let rec = self.volume_record(name)?;
        let (volume_id, epoch) = match &handle {
            Some(h) => {
                let st = h.status().map_err(|e| anyhow!(e))?;
                (st.volume_id, st.epoch)
            }
            None => (rec.volume_id, rec.epoch),
        };
        let client = crate::api::Client::new(primary_control);
        let secret = self.cfg.secret.as_ref();
        let peer = client.peer_info(secret).map_err(|e| anyhow!("peer {primary_control}: {e}"))?;
        if peer.name == self.cfg.name {
            bail!("{primary_control} is this node");
        }
        let status: serde_json::Value =
            client.get_proven("/v1/status", secret).map_err(|e| anyhow!("peer {primary_control}: {e}"))?;
        let empty = Vec::new();
        let theirs = status["volumes"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .find(|v| v["volume"] == name)
            .ok_or_else(|| {
                anyhow!("{} holds no primary volume {name}: resync needs the node that took it over", peer.name)
            })?
            .clone();
        if theirs["volume_id"].as_u64() != Some(volume_id) {
            bail!("{}'s volume {name} is another volume (a different id)", peer.name);
        }
        let their_epoch = theirs["epoch"].as_u64().unwrap_or(0);
        if their_epoch <= epoch {
            bail!(
                "{} holds {name} at epoch {their_epoch}, this node at {epoch}: it did not take the volume over from \
                 here (for a planned change of roles, use switchover)",
                peer.name
            );
        }
        if theirs["state"] == "fenced" {
            bail!("{}'s volume {name} is fenced itself: resync from the current primary", peer.name);
        }
        let policy: Policy = serde_json::from_value(theirs["policy"].clone()).unwrap_or_default();
        let base = theirs["changes_since"].clone();
        // A volume that did not start cannot say what it changed: everything is copied.
        let delta = handle.is_some() && base["peer"] == self.cfg.name.as_str();
        let base_cp = base["cp"].as_u64().unwrap_or(0);
        // What this node holds that the new primary may not.
        let regions = match &handle {
            Some(handle) => {
                let (tx, rx) = bounded(1);
                handle.control(Control::ChangedRegions(tx)).map_err(|e| anyhow!(e))?;
                let regions =
                    rx.recv_timeout(Duration::from_secs(30)).map_err(|_| anyhow!("volume poller did not answer"))?;
                handle.stop();
                regions
            }
            None => Vec::new(),
        };
        self.volumes.write().remove(name);
        let _ = fs::remove_file(self.nvlog_path(name, rec.epoch));
        let mut meta = MirrorMeta::new(&Hello {
            source_node: peer.name.clone(),
            volume: name.to_string(),
            volume_id: rec.volume_id,
            epoch: their_epoch,
            volume_bytes: rec.size,
            partition_bytes: rec.partition_bytes as u64,
            intent: Intent::Resync,
            base_seq: 0,
            base_cp_gen: 0,
        });
        if delta {
            meta.applied_cp = base_cp;
            meta.resyncing = true;
        }
        self.adopt_as_mirror(&rec.storage, meta, rec.epoch)?;
        self.unstarted.lock().retain(|(v, _)| v != name);
        eprintln!(
            "node {}: volume {name} is now the mirror of {} ({} regions of its own to copy back; {})",
            self.cfg.name,
            peer.name,
            regions.len(),
            if delta { "delta resync" } else { "the new primary's change map is not relative to this node: baseline" }
        );
        let ranges = region_ranges(&regions);
        let _: serde_json::Value = client.post(
            &format!("/v1/volumes/{name}/mirror"),
            &crate::api::MirrorRequest {
                to: self.cfg.control.to_string(),
                transport: "tcp".into(),
                policy: policy.as_str().into(),
                resync_ranges: ranges,
                rate: None,
            },
        )?;
        self.events.push(
            "resync-started",
            Some(name),
            serde_json::json!({ "primary": peer.name, "delta": delta, "regions_here": regions.len() }),
        );
        Ok(ResyncStarted { primary: peer.name, delta, regions_here: regions.len() as u64 })
    }

    /// `ctl switchover VOL` on the primary: a planned exchange of roles, with nothing lost
    /// and no write failed. The volume drains (new requests wait) and a CP brings the
    /// mirror level; the requests waiting are handed over; this node becomes the mirror,
    /// consistent as of that CP; the mirror takes the volume up with nothing to replay and
    /// resumes the pair the other way round; requests still arriving here are forwarded to
    /// the new primary's NBD export until the clients reconnect there.
    pub fn switchover(&self, name: &str) -> Result<SwitchoverReport> {
        let started = std::time::Instant::now();
        let handle = self.volume(name)?;
        let rec = self.volume_record(name)?;
        let target = rec.mirror.clone().ok_or_else(|| anyhow!("volume {name} is not mirrored"))?;
        let st = handle.status().map_err(|e| anyhow!(e))?;
        if st.state != PairState::InSync || !st.mirror_current {
            bail!(
                "volume {name} is {} (mirror current: {}): a switchover needs the pair in sync",
                st.state,
                st.mirror_current
            );
        }
        let client = crate::api::Client::new(&target.peer_control);
        let peer =
            client.peer_info(self.cfg.secret.as_ref()).map_err(|e| anyhow!("peer {}: {e}", target.peer_control))?;
        let (tx, rx) = bounded(1);
        handle.control(Control::Quiesce(tx)).map_err(|e| anyhow!(e))?;
        let quiesced =
            rx.recv_timeout(Duration::from_secs(60)).map_err(|_| anyhow!("the volume did not drain within 60 s"));
        let (cp, next_seq) = match quiesced.and_then(|r| r.map_err(|e| anyhow!(e))) {
            Ok(x) => x,
            Err(e) => {
                let _ = handle.control(Control::Resume);
                return Err(e.context("switchover"));
            }
        };
        // From here requests wait (parked) instead of reaching the stopped poller.
        let parked = Arc::new(nvmirror_dataplane::frontend::forward::Parked::new(handle.size()));
        handle.forward_to(parked.clone());
        let (tx, rx) = bounded(1);
        handle.control(Control::Handover(tx)).map_err(|e| anyhow!(e))?;
        let queued = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| anyhow!("the volume did not hand over"))?;
        self.volumes.write().remove(name);
        let meta = MirrorMeta {
            epoch: rec.epoch + 1,
            applied_cp: cp,
            applied_seq: next_seq - 1,
            consistent: true,
            ..MirrorMeta::new(&Hello {
                source_node: peer.name.clone(),
                volume: name.to_string(),
                volume_id: rec.volume_id,
                epoch: rec.epoch + 1,
                volume_bytes: rec.size,
                partition_bytes: rec.partition_bytes as u64,
                intent: Intent::Resume,
                base_seq: 0,
                base_cp_gen: 0,
            })
        };
        let takeover = self.adopt_as_mirror(&rec.storage, meta, rec.epoch).and_then(|()| {
            client.post_signed::<_, serde_json::Value>(
                self.cfg.secret.as_ref(),
                &format!("/v1/volumes/{name}/takeover"),
                &crate::api::TakeoverRequest {
                    from: self.cfg.name.clone(),
                    control: self.cfg.control.to_string(),
                    replication: self.cfg.advertised_replication(),
                    cp,
                    next_seq,
                    policy: rec.policy.as_str().into(),
                },
            )
        });
        let taken = match takeover {
            Ok(v) => v,
            Err(e) => {
                // Back to where it was: this node the primary again, the requests served here.
                eprintln!("node {}: switchover of {name} failed ({e:#}); staying primary", self.cfg.name);
                self.mirrors.write().remove(&(peer.name.clone(), name.to_string()));
                self.storage.write().remove(&StorageOwner::Mirror(peer.name.clone(), name.to_string()));
                let _ = fs::remove_file(self.mirror_dir(&peer.name, name).join("meta.json"));
                {
                    let mut state = self.state.lock();
                    state.volumes.push(rec.clone());
                    self.save_state(&state)?;
                }
                self.start_volume(&rec)?;
                let local = self.volume(name)?;
                for (r, d) in queued.into_iter().chain(parked.take()) {
                    local.submit(r, d);
                }
                handle.forward_to(local.clone());
                for (r, d) in parked.take() {
                    local.submit(r, d);
                }
                return Err(e.context("switchover"));
            }
        };
        // Requests that waited, then those still coming here, go to the new primary.
        let mut fwd = None;
        for _ in 0..50 {
            match nvmirror_dataplane::frontend::forward::NbdForward::connect(&peer.nbd, name) {
                Ok(f) => {
                    fwd = Some(Arc::new(f));
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let handed = queued.len() + parked.held_len();
        match fwd {
            Some(f) => {
                for (r, d) in queued.into_iter().chain(parked.take()) {
                    f.submit(r, d);
                }
                handle.forward_to(f.clone());
                for (r, d) in parked.take() {
                    f.submit(r, d);
                }
            }
            None => {
                // The new primary serves the volume, but not its NBD export to us: the
                // waiting requests fail, and clients must reconnect to it.
                let gone = || io::Error::other(format!("volume {name} moved to {}: reconnect there", peer.name));
                for (_, d) in queued.into_iter().chain(parked.take()) {
                    d.complete(Err(gone()));
                }
                handle.forward_to(Arc::new(Moved(format!("volume {name} moved to {}: reconnect there", peer.name))));
                for (_, d) in parked.take() {
                    d.complete(Err(gone()));
                }
            }
        }
        self.events.push("switchover", Some(name), serde_json::json!({ "new_primary": peer.name, "cp": cp }));
        Ok(SwitchoverReport {
            new_primary: peer.name,
            epoch: taken["epoch"].as_u64().unwrap_or(rec.epoch + 1),
            cp,
            requests_handed_over: handed as u64,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// The second half of a switchover, on the mirror: checks it holds everything the
    /// primary quiesced at, promotes with nothing to replay, and takes the volume up
    /// mirrored to the old primary (now its mirror, consistent as of that CP).
    pub fn takeover(&self, name: &str, req: &crate::api::TakeoverRequest) -> Result<PromoteReport> {
        let _one = self.failover_lock.lock();
        let mirror = self
            .mirrors
            .read()
            .get(&(req.from.clone(), name.to_string()))
            .cloned()
            .ok_or_else(|| anyhow!("no mirror of {name} from {} on this node", req.from))?;
        let policy: Policy = serde_json::from_value(serde_json::Value::String(req.policy.clone())).unwrap_or_default();
        let target = MirrorTarget {
            peer_name: req.from.clone(),
            peer_control: req.control.clone(),
            replication: req.replication.clone(),
        };
        let report = core::takeover(&mut FileEnv::new(self, Some((target, policy))), &mirror, req.cp, req.next_seq)?;
        self.events.push("takeover", Some(name), serde_json::json!({ "from": req.from, "epoch": report.epoch }));
        // The pair resumes the other way round before the old primary forwards its
        // clients' requests here: until then a write would find the mirror link down.
        let handle = self.volume(name)?;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if handle.status().is_ok_and(|s| s.state == PairState::InSync) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(report)
    }

    pub fn shutdown(&self) {
        let handles: Vec<_> = self.volumes.write().drain().map(|(_, h)| h).collect();
        for h in handles {
            h.stop();
        }
    }
}

/// The export of a volume that moved away: every request fails, saying where it went.
struct Moved(String);

impl Export for Moved {
    fn size(&self) -> u64 {
        0
    }
    fn read_only(&self) -> bool {
        true
    }
    fn submit(&self, _request: IoRequest, done: Completer) {
        done.complete(Err(io::Error::other(self.0.clone())));
    }
}

/// What `resync` started.
#[derive(Debug, Serialize, Deserialize)]
pub struct ResyncStarted {
    pub primary: String,
    /// A delta resync (else a baseline).
    pub delta: bool,
    /// Regions this node held that the new primary may not, copied back with its own.
    pub regions_here: u64,
}

/// What a switchover did.
#[derive(Debug, Serialize, Deserialize)]
pub struct SwitchoverReport {
    pub new_primary: String,
    pub epoch: u64,
    pub cp: u64,
    pub requests_handed_over: u64,
    pub duration_ms: u64,
}

/// The node core's environment here: NVRAM regions are files in the NVRAM dir, records
/// go to `node.json`, and a primary starts with its poller.
struct FileEnv<'a> {
    node: &'a Node,
    /// A takeover: the volume goes on mirrored to the old primary, with this policy.
    then_mirror: Option<(MirrorTarget, Policy)>,
    record: Option<VolumeRecord>,
}

impl<'a> FileEnv<'a> {
    fn new(node: &'a Node, then_mirror: Option<(MirrorTarget, Policy)>) -> Self {
        FileEnv { node, then_mirror, record: None }
    }
}

impl NodeEnv for FileEnv<'_> {
    fn fresh_region(&mut self, name: &str, bytes: usize) -> io::Result<Box<dyn Nvram>> {
        let path = self.node.cfg.nvram.dir.join(name);
        if path.exists() {
            fs::remove_file(&path)?;
        }
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let region = MappedNvram::open(&path, bytes, self.node.cfg.nvram.mode)
            .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
        Ok(Box::new(region))
    }

    fn record_primary(&mut self, v: &Promoted) -> io::Result<()> {
        let storage = self
            .node
            .storage
            .read()
            .get(&StorageOwner::Mirror(v.from.clone(), v.volume.clone()))
            .map(|(s, _)| s.clone())
            .ok_or_else(|| io::Error::other(format!("the mirror of {} has no open storage", v.volume)))?;
        let record = VolumeRecord {
            name: v.volume.clone(),
            volume_id: v.volume_id,
            size: v.size,
            partition_bytes: v.partition_bytes,
            epoch: v.epoch,
            storage,
            cp_interval_ms: 10_000,
            mirror: self.then_mirror.as_ref().map(|(t, _)| t.clone()),
            cp_by_value: false,
            policy: self.then_mirror.as_ref().map_or(Policy::Strict, |(_, p)| *p),
        };
        let mut state = self.node.state.lock();
        state.volumes.push(record.clone());
        // Saved under the state lock: saves are ordered with the changes they record.
        self.node.save_state(&state).map_err(|e| io::Error::other(format!("{e:#}")))?;
        drop(state);
        self.record = Some(record);
        Ok(())
    }

    fn start_primary(&mut self, v: &Promoted) -> io::Result<()> {
        let record = self.record.as_ref().filter(|r| r.name == v.volume);
        let record = record.ok_or_else(|| io::Error::other(format!("volume {} has no record", v.volume)))?;
        self.node.start_volume(record).map_err(|e| io::Error::other(format!("{e:#}")))
    }
}

impl MirrorEnv for FileEnv<'_> {
    type Storage = VolumeStorage;

    fn retire_for_mirror(&mut self, meta: &MirrorMeta, storage: &VolumeStorage, fence_epoch: u64) -> io::Result<()> {
        let node = self.node;
        let name = &meta.volume;
        let retired: Vec<((String, String), Arc<Mirror>)> = node
            .mirrors
            .read()
            .iter()
            .filter(|((_, v), _)| v == name)
            .filter(|(k, _)| {
                node.storage
                    .read()
                    .get(&StorageOwner::Mirror(k.0.clone(), k.1.clone()))
                    .is_some_and(|(s, _)| s == storage)
                    || k.0 == meta.source_node
            })
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect();
        {
            let mut state = node.state.lock();
            state.volumes.retain(|v| v.name != *name);
            Node::fence(&mut state, meta.volume_id, fence_epoch);
            for (_, m) in &retired {
                let mm = m.meta();
                Node::fence(&mut state, mm.volume_id, mm.epoch);
            }
            // Saved under the state lock: saves are ordered with the changes they record.
            node.save_state(&state).map_err(|e| io::Error::other(format!("{e:#}")))?;
        }
        for ((src, v), _) in &retired {
            node.mirrors.write().remove(&(src.clone(), v.clone()));
            node.storage.write().remove(&StorageOwner::Mirror(src.clone(), v.clone()));
            let dir = node.mirror_dir(src, v);
            let _ = fs::remove_file(dir.join("meta.json"));
            let _ = fs::remove_file(dir.join("storage.json"));
        }
        node.storage.write().remove(&StorageOwner::Volume(name.clone()));
        Ok(())
    }

    fn record_mirror_storage(&mut self, meta: &MirrorMeta, storage: &VolumeStorage) -> io::Result<()> {
        let dir = self.node.mirror_dir(&meta.source_node, &meta.volume);
        fs::create_dir_all(&dir)?;
        write_atomic(&dir.join("storage.json"), &serde_json::to_vec_pretty(storage).map_err(io::Error::other)?)
    }

    fn open_mirror(
        &mut self,
        meta: MirrorMeta,
        logs: [Box<dyn Nvram>; PARTITIONS],
        _storage: VolumeStorage,
    ) -> io::Result<Arc<Mirror>> {
        // The storage is opened from the record just written, as at every start.
        let key = (meta.source_node.clone(), meta.volume.clone());
        let m = self.node.open_mirror_with(meta, Some(logs)).map_err(|e| io::Error::other(format!("{e:#}")))?;
        self.node.mirrors.write().insert(key, m.clone());
        Ok(m)
    }
}

/// Regions as `(first, count)` runs, at most [`crate::api::RESYNC_RANGES_MAX`] of them
/// (neighbouring runs merge, copying a little more, where there would be more).
pub fn region_ranges(regions: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &r in regions {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == r => *n += 1,
            _ => runs.push((r, 1)),
        }
    }
    while runs.len() > crate::api::RESYNC_RANGES_MAX {
        // Merge the pair with the smallest gap.
        let i = (0..runs.len() - 1).min_by_key(|&i| runs[i + 1].0 - (runs[i].0 + runs[i].1)).expect("two runs");
        let (f, _) = runs[i];
        let (g, m) = runs.remove(i + 1);
        runs[i].1 = g + m - f;
    }
    runs
}

#[derive(Debug, Serialize)]
pub struct VolumeStatus {
    /// Always `primary`.
    pub role: &'static str,
    /// Entries acknowledged to clients and not yet to the mirror.
    pub replication_lag_entries: u64,
    #[serde(flatten)]
    pub source: SourceStatus,
    pub peer: Option<String>,
    pub storage: Option<StorageStatus>,
}

#[derive(Debug, Serialize)]
pub struct MirrorEntry {
    /// Always `mirror`.
    pub role: &'static str,
    /// baseline, resyncing, in-sync, out-of-sync, or broken (failed over).
    pub state: &'static str,
    #[serde(flatten)]
    pub mirror: MirrorStatus,
    pub storage: Option<StorageStatus>,
}

/// How `volume create` lays out a volume made of data-dir files.
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateLayout {
    pub data_disks: Option<u32>,
    pub stripe_unit: Option<u32>,
    pub engine: Option<Engine>,
}

#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub replication: String,
    pub nbd: String,
    pub control: String,
    pub nvram: String,
    pub nvram_survives: String,
    pub volumes: Vec<VolumeStatus>,
    pub mirrors: Vec<MirrorEntry>,
    /// Volumes whose storage could not be opened at start.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unstarted: Vec<UnstartedVolume>,
}

#[derive(Debug, Serialize)]
pub struct UnstartedVolume {
    pub volume: String,
    pub state: &'static str,
    pub reason: String,
}

impl MirrorDirectory for Node {
    fn peer_refused(&self, peer: &str, reason: &str) {
        self.events.push("peer-refused", None, serde_json::json!({ "peer": peer, "reason": reason }));
    }

    fn attach(
        &self,
        hello: &Hello,
        sink: Arc<dyn ReplySink>,
    ) -> Result<(Box<dyn FrameHandler>, Welcome), (RefuseCode, String)> {
        let refuse = |code, msg: String| (code, msg);
        if valid_name(&hello.volume).is_err() || valid_name(&hello.source_node).is_err() {
            return Err(refuse(RefuseCode::Mismatch, "invalid source or volume name".into()));
        }
        if hello.source_node == self.cfg.name {
            return Err(refuse(RefuseCode::Mismatch, "a node cannot mirror to itself".into()));
        }
        let known = self.known_epoch(hello.volume_id);
        if hello.epoch < known {
            let why = format!(
                "this node knows volume {} at epoch {known}; a source at epoch {} is stale",
                hello.volume, hello.epoch
            );
            eprintln!("node {}: refused {}: {why}", self.cfg.name, hello.source_node);
            return Err(refuse(RefuseCode::StaleEpoch, why));
        }
        let key = (hello.source_node.clone(), hello.volume.clone());
        let existing = self.mirrors.read().get(&key).cloned();
        let mirror = match existing {
            Some(m) => m,
            None => {
                if hello.intent != Intent::Baseline {
                    return Err(refuse(
                        RefuseCode::Mismatch,
                        "no mirror of this volume here; a baseline is needed".into(),
                    ));
                }
                if self.volumes.read().contains_key(&hello.volume)
                    || self.mirrors.read().keys().any(|(_, v)| *v == hello.volume)
                {
                    return Err(refuse(
                        RefuseCode::Mismatch,
                        format!("a volume named {} already exists on {}", hello.volume, self.cfg.name),
                    ));
                }
                let pb = usize::try_from(hello.partition_bytes).unwrap_or(0);
                if pb < PARTITION_BYTES_MIN
                    || hello.volume_bytes == 0
                    || !hello.volume_bytes.is_multiple_of(BLOCK_BYTES as u64)
                {
                    return Err(refuse(RefuseCode::Mismatch, "unusable volume or log geometry".into()));
                }
                let m = self
                    .open_mirror(MirrorMeta::new(hello))
                    .map_err(|e| refuse(RefuseCode::Internal, format!("create mirror: {e:#}")))?;
                eprintln!("node {}: new mirror of {}/{}", self.cfg.name, hello.source_node, hello.volume);
                self.mirrors.write().insert(key, m.clone());
                m
            }
        };
        let (session, welcome) = mirror.attach(hello, sink, self.rdma.clone())?;
        Ok((Box::new(session), welcome))
    }
}

impl ExportRegistry for Node {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        if let Some(v) = self.volumes.read().get(name) {
            return Some(v.clone() as Arc<dyn Export>);
        }
        let mirrors = self.mirrors.read();
        let m = mirrors.iter().find(|((_, v), m)| v == name && !m.meta().promoted)?;
        Some(Arc::new(MirrorExport(m.1.clone())))
    }
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.volumes.read().keys().cloned().collect();
        for ((_, v), m) in self.mirrors.read().iter() {
            if !m.meta().promoted && !names.contains(v) {
                names.push(v.clone());
            }
        }
        names.sort();
        names
    }
}

/// Starts the RDMA engine where this build has one, the host has a device, and the log
/// files' NVRAM mode allows placement without this node's CPU.
fn start_rdma(cfg: &NodeConfig) -> Option<Arc<dyn RdmaPlacement>> {
    #[cfg(feature = "rdma")]
    {
        use nvmirror_dataplane::transport::rdma;
        if cfg.nvram.mode == nvmirror_dataplane::nvram::NvramMode::FileSync {
            eprintln!("node {}: RDMA not offered: file-sync log files need this node's CPU to msync", cfg.name);
            return None;
        }
        if cfg.nvram.mode == nvmirror_dataplane::nvram::NvramMode::Dax {
            // Measured in the hw-tests guest: ibv_reg_mr of a file-DAX mapping fails with
            // EOPNOTSUPP (the kernel does not let a device pin fsdax pages for long).
            eprintln!(
                "node {}: RDMA not offered: dax: log files are filesystem-DAX mappings, which the kernel does not let \
                 an RDMA device pin (ibv_reg_mr fails with EOPNOTSUPP); mirrors hosted here take entries over TCP",
                cfg.name
            );
            return None;
        }
        let devices = rdma::device_names();
        if devices.is_empty() {
            return None;
        }
        match rdma::RdmaService::start(cfg.replication) {
            Ok(s) => {
                eprintln!("node {}: RDMA placement on {} ({})", cfg.name, cfg.replication, devices.join(", "));
                Some(s)
            }
            Err(e) => {
                eprintln!("node {}: RDMA not offered: {e}", cfg.name);
                None
            }
        }
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = cfg;
        None
    }
}

fn spawn_rebuild(raid: Arc<Raid4>, rate: Option<u64>, volume: &str, events: Arc<crate::events::EventLog>) {
    let volume = volume.to_string();
    let r = std::thread::Builder::new().name("nvm-rebuild".into()).spawn(move || {
        let result = match raid.rebuild(rate) {
            Ok(_) => "done".to_string(),
            Err(e) => {
                eprintln!("RAID-4 volume {}: rebuild: {e}", raid.name());
                format!("failed: {e}")
            }
        };
        events.push("rebuild-finished", Some(&volume), serde_json::json!({ "result": result }));
    });
    if let Err(e) = r {
        eprintln!("cannot start a rebuild thread: {e}");
    }
}
