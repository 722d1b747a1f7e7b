//! The node core's environment here: NVRAM regions are files in the NVRAM dir, records go
//! to `node.json`, a mirror's storage to `mirrors/SOURCE/VOL/storage.json`.

use super::*;

/// The node core's environment here: NVRAM regions are files in the NVRAM dir, records
/// go to `node.json`, and a primary starts with its poller.
pub(super) struct FileEnv<'a> {
    node: &'a Node,
    /// A takeover: the volume goes on mirrored to the old primary, with this policy.
    then_mirror: Option<(MirrorTarget, Policy)>,
    record: Option<VolumeRecord>,
}

impl<'a> FileEnv<'a> {
    pub(super) fn new(node: &'a Node, then_mirror: Option<(MirrorTarget, Policy)>) -> Self {
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
        open_region(&path, bytes, self.node.cfg.nvram.mode)
            .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))
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
            // The allow-list is the old primary's, which the mirror does not hold: the new
            // primary admits every client until one is set here.
            allow: Vec::new(),
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
