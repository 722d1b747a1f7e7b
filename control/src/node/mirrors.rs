//! The mirrors this node hosts: their files (metadata, storage, log files), opening them
//! at start, pairing a volume with a peer, and the replication directory sources attach to.

use super::*;

struct FileMetaStore(PathBuf);

impl MetaStore for FileMetaStore {
    fn save(&self, meta: &MirrorMeta) -> io::Result<()> {
        write_atomic(&self.0, &serde_json::to_vec_pretty(meta).map_err(io::Error::other)?)
    }
}

/// A mirror exported read-only: reads see the mirror as of its last completed CP.
pub(super) struct MirrorExport(pub(super) Arc<Mirror>);

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
            tracing::warn!("node {}: refused {}: {why}", self.cfg.name, hello.source_node);
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
                tracing::info!("node {}: new mirror of {}/{}", self.cfg.name, hello.source_node, hello.volume);
                self.mirrors.write().insert(key, m.clone());
                m
            }
        };
        let (session, welcome) = mirror.attach(hello, sink, self.rdma.clone())?;
        Ok((Box::new(session), welcome))
    }
}

impl Node {
    /// Pauses (`pause`) or resumes the baseline or resync copy of primary volume `name`;
    /// writes go on, mirrored as before. Pausing needs a copy under way.
    pub fn pause_copy(&self, name: &str, pause: bool) -> Result<()> {
        let handle = self.volume(name)?;
        if pause {
            let st = handle.status().map_err(|e| anyhow!(e))?;
            if !matches!(st.state, PairState::Baseline | PairState::Resyncing) {
                bail!("volume {name} is {}: there is no baseline or resync under way to pause", st.state);
            }
        }
        handle.control(Control::PauseCopy(pause)).map_err(|e| anyhow!(e))?;
        self.events.push(if pause { "copy-paused" } else { "copy-resumed" }, Some(name), serde_json::json!({}));
        Ok(())
    }

    pub(super) fn load_mirrors(&self) -> Result<()> {
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

    pub(super) fn open_mirror(&self, meta: MirrorMeta) -> Result<Arc<Mirror>> {
        self.open_mirror_with(meta, None)
    }

    /// Opens the mirror `meta` describes, with its log files (opened here where `None`).
    pub(super) fn open_mirror_with(
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
                        open_region(&path, pb, self.cfg.nvram.mode)
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
            if opened.raid.as_ref().is_some_and(|r| r.write_hole_found()) && meta.take_full_copy_after_write_hole() {
                tracing::warn!(
                    "mirror {}/{}: its storage was left dirty and degraded by a crash; it takes a baseline copy",
                    meta.source_node,
                    meta.volume
                );
            }
            (storage, opened)
        } else {
            // A new mirror, in this node's own layout and geometry. Member files left by a creation
            // that did not finish hold nothing: nothing was acknowledged into them.
            let storage = VolumeStorage::mirror_in(&dir, self.cfg.mirror_layout, &self.cfg.raid);
            for d in storage.disks() {
                if d.path.starts_with(&dir) && d.path.exists() {
                    fs::remove_file(&d.path)?;
                }
            }
            let opened =
                self.open_volumes.create(&meta.volume, &storage, meta.volume_bytes, self.cfg.raid.stripe_unit, None)?;
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
        let mirror = Mirror::open(meta, store, logs, device)?;
        mirror.set_local_nvmf(self.cfg.nvmf);
        Ok(mirror)
    }

    /// Restarts a rebuild that a restart interrupted.
    pub(super) fn resume_rebuild(&self, name: &str, opened: &Opened) {
        if let Some(raid) = &opened.raid {
            if let Some(m) = raid.rebuilding_member() {
                tracing::info!("node {}: volume {name}: resuming the rebuild of member {m}", self.cfg.name);
                spawn_rebuild(raid.clone(), None, name, self.events.clone());
            }
        }
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
            let v = state.volume_mut(name)?;
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
        match rate.filter(|&r| r > 0) {
            Some(r) => {
                self.own_copy_rates.lock().insert(name.to_string(), r);
            }
            None => {
                self.own_copy_rates.lock().remove(name);
            }
        }
        handle.control(Control::SetCopyRate(self.copy_rate_of(name))).map_err(|e| anyhow!(e))?;
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
}
