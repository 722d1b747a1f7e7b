//! The simulated nodes: their durable state (NVRAM, disks, records), the mirrors they
//! host, starting a volume, crashes and restarts.

use super::*;

/// What a node keeps across crashes: its media and the records it would keep in its data
/// dir (each saved atomically).
pub(super) struct Durable {
    pub(super) power: Arc<Power>,
    pub(super) nvram: BTreeMap<String, Arc<Mutex<NvramMedia>>>,
    pub(super) disks: BTreeMap<String, Arc<Mutex<DiskMedia>>>,
    /// Mirror metadata (`meta.json`), by source node.
    pub(super) metas: BTreeMap<String, Arc<Mutex<Option<MirrorMeta>>>>,
    /// Mirror storage (`storage.json`): the mirror volume's disks, by source node.
    pub(super) mirror_disks: BTreeMap<String, Vec<String>>,
    /// The primary volume (`node.json`), if this node holds it.
    pub(super) volume: Option<VolumeRecord>,
    /// The highest epoch this node has known the volume at, kept when the records that
    /// held it go (a promoted mirror whose disks became another mirror): a node never takes
    /// a hello from an older epoch.
    pub(super) fence_epoch: u64,
    /// This node's RAID-4 geometry for volumes it creates and mirrors it hosts.
    pub(super) data_disks: u32,
    pub(super) stripe_unit: u32,
    /// The node's NVRAM is `direct:` (an O_DIRECT log: whole device writes survive a
    /// cut, stores not yet written do not), else memory-like (`dax:`).
    pub(super) direct_nvram: bool,
}

#[derive(Debug, Clone)]
pub(super) struct VolumeRecord {
    pub(super) epoch: u64,
    pub(super) disks: Vec<String>,
    pub(super) mirror: Option<String>,
    /// The volume is a promoted mirror of this source node (and shares its RAID volume).
    pub(super) promoted_from: Option<String>,
}

impl Durable {
    pub(super) fn disk(&mut self, key: &str, len: u64) -> Arc<Mutex<DiskMedia>> {
        self.disks.entry(key.to_string()).or_insert_with(|| DiskMedia::new(len)).clone()
    }
    pub(super) fn region(&mut self, key: &str, len: usize) -> Arc<Mutex<NvramMedia>> {
        let direct = self.direct_nvram;
        self.nvram.entry(key.to_string()).or_insert_with(|| NvramMedia::new(len, direct)).clone()
    }
    pub(super) fn geometry(&self) -> Geometry {
        Geometry::new(self.data_disks, self.stripe_unit, BLOCKS * BLOCK_BYTES as u64).expect("valid sim geometry")
    }
}

pub(super) type Shared<T> = Arc<Mutex<T>>;

pub(super) type HostedMirror = (Arc<Mirror>, Arc<Raid4>);

/// A running node's mirrors, as the network's hellos find them.
pub(super) struct Directory {
    pub(super) name: String,
    pub(super) durable: Shared<Durable>,
    /// By source node: the mirror and its RAID-4 volume.
    pub(super) mirrors: Mutex<BTreeMap<String, HostedMirror>>,
}

pub(super) fn disk_spec(key: &str) -> DiskSpec {
    DiskSpec { engine: Engine::Pread, path: format!("sim:{key}").into() }
}

pub(super) fn open_raid(
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
pub(super) fn disk_key(raid: &Raid4, member: usize) -> String {
    raid.disks()[member].path.to_string_lossy().trim_start_matches("sim:").to_string()
}

/// What names a RAID volume's disks: `volumes/vol` or `mirrors/SOURCE/vol`.
pub(super) fn volume_prefix(raid: &Raid4) -> String {
    let k = disk_key(raid, 0);
    k.rsplit_once('/').map_or(k.clone(), |(p, _)| p.to_string())
}

/// A new mirror's metadata for the run's volume, sourced from `source` at `epoch`.
pub(super) fn mirror_meta(source: &str, epoch: u64) -> MirrorMeta {
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
        features: 0,
    })
}

/// A RAID-4 volume that stopped with writes in flight while degraded: refused to start.
pub(super) fn is_write_hole(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<crate::raid::RaidError>())
        .is_some_and(|r| matches!(r, crate::raid::RaidError::DirtyDegraded { .. }))
}

pub(super) fn member_keys(prefix: &str, members: usize) -> Vec<String> {
    (0..members).map(|m| format!("{prefix}/d{m}")).collect()
}

impl Directory {
    pub(super) fn open_mirror(&self, meta: MirrorMeta, create: bool) -> io::Result<(Arc<Mirror>, Arc<Raid4>)> {
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
        if raid.write_hole_found() && meta.take_full_copy_after_write_hole() {
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

/// A running primary volume.
pub(super) struct LiveSource {
    pub(super) stepped: SteppedSource<MemNet>,
    pub(super) handle: SourceHandle,
    pub(super) raid: Arc<Raid4>,
    pub(super) epoch: u64,
}

pub(super) struct Node {
    pub(super) durable: Shared<Durable>,
    pub(super) live: Option<Live>,
    /// Damaged disks (failed member, flipped bits) not yet repaired: no power cut then.
    pub(super) disk_damage: u32,
}

pub(super) struct Live {
    pub(super) source: Option<LiveSource>,
    pub(super) directory: Arc<Directory>,
}

impl World {
    pub(super) fn add_node(&mut self) -> String {
        let name = ((b'a' + u8::try_from(self.next_node).expect("few nodes")) as char).to_string();
        self.next_node += 1;
        let data_disks = self.rng.gen_range(2..=4);
        let stripe_unit = [4096, 8192, 16384][self.rng.gen_range(0..3)];
        // Drawn apart from the run's stream, so that a seed's other choices stay as they were.
        let direct_nvram =
            SimRng::seed_from_u64(self.seed ^ u64::from(self.next_node).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .gen_bool(0.5);
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
            direct_nvram,
        }));
        let nvram = if direct_nvram { "direct:" } else { "dax:" };
        self.event(format!(
            "node {name} added: RAID-4 {data_disks}+1, {} KiB stripe unit, {nvram} NVRAM",
            stripe_unit / 1024
        ));
        let directory =
            Arc::new(Directory { name: name.clone(), durable: durable.clone(), mirrors: Default::default() });
        let flag = durable.lock().power.flag();
        self.net.node_up(&name, Some(directory.clone() as Arc<dyn MirrorDirectory>), flag);
        self.nodes.insert(name.clone(), Node { durable, live: Some(Live { source: None, directory }), disk_damage: 0 });
        name
    }

    pub(super) fn source_config(&self, node: &str, epoch: u64) -> SourceConfig {
        let mut cfg = SourceConfig::new(node, VOLUME, VOLUME_ID, PARTITION_BYTES);
        cfg.epoch = epoch;
        cfg.cp_interval = Duration::from_millis(150);
        cfg.cache_blocks_max = 96;
        cfg.reconnect_interval = Duration::from_millis(40);
        cfg.ack_timeout = Duration::from_millis(250);
        cfg.cp_timeout = Duration::from_millis(1500);
        cfg.planted_bug = self.opts.planted_bug;
        cfg.policy = self.policy;
        // Copies of the small volume in several steps, CPs and faults between them.
        cfg.copy_chunk = 64 << 10;
        cfg
    }

    pub(super) fn create_volume(&mut self, node: &str) -> io::Result<()> {
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
    pub(super) fn start_source(&mut self, node: &str, raid: Option<Arc<Raid4>>) -> io::Result<()> {
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

    pub(super) fn attach(&mut self, target: &str) {
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

    pub(super) fn live_source(&mut self, node: &str) -> Option<&mut LiveSource> {
        self.nodes.get_mut(node)?.live.as_mut()?.source.as_mut()
    }

    pub(super) fn is_live(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.live.is_some())
    }

    /// The node lost power (or crashed): everything not durable is gone.
    pub(super) fn crash(&mut self, node: &str) -> Result<(), String> {
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

    pub(super) fn restart(&mut self, node: &str) -> Result<(), String> {
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

    /// Crashes every node whose power was cut during the last step.
    pub(super) fn reap_power_cuts(&mut self) -> Result<(), String> {
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
    pub(super) fn after_crash(&mut self, node: &str) {
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

    pub(super) fn mirror_meta(&self, node: &str) -> Option<MirrorMeta> {
        let live = self.nodes.get(node)?.live.as_ref()?;
        let m = live.directory.mirrors.lock().get(&self.primary).map(|(m, _)| m.meta());
        m
    }

    pub(super) fn mirror_consistent(&self, node: &str) -> bool {
        self.mirror_meta(node).is_some_and(|m| m.consistent && !m.promoted)
    }
}
