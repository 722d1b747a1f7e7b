//! RAID maintenance: scrub and disk replacement (rebuild), rate-shaped, off the data path.

use super::*;

pub(super) fn spawn_rebuild(raid: Arc<Raid4>, rate: Option<u64>, volume: &str, events: Arc<crate::events::EventLog>) {
    let volume = volume.to_string();
    let r = std::thread::Builder::new().name("nvm-rebuild".into()).spawn(move || {
        let result = match raid.rebuild(rate) {
            Ok(_) => "done".to_string(),
            Err(e) => {
                tracing::warn!("RAID-4 volume {}: rebuild: {e}", raid.name());
                format!("failed: {e}")
            }
        };
        events.push("rebuild-finished", Some(&volume), serde_json::json!({ "result": result }));
    });
    if let Err(e) = r {
        tracing::warn!("cannot start a rebuild thread: {e}");
    }
}

impl Node {
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
            [] => Err(NotFound(format!("no volume or mirror {name} on this node")).into()),
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
                tracing::info!("scrub of {name}: {} ({r:?})", r.result);
                events.push("scrub-finished", Some(&name), serde_json::to_value(&r).unwrap_or_default());
            }
            Err(e) => {
                tracing::warn!("scrub of {name}: {e}");
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
}
