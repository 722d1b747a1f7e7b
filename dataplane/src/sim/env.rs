//! The node core's environment in the simulator: simulated NVRAM, records and stepped
//! sources, refusing every durable step once the node's power is cut.

use super::*;

/// The node core's environment in the simulator: one node's simulated NVRAM, its record
/// and its stepped source. Power cut, it refuses every durable step.
pub(super) struct SimEnv<'w> {
    pub(super) world: &'w mut World,
    pub(super) node: String,
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
