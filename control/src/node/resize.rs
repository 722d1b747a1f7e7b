//! `volume resize`: a volume grows online, its mirror first.
//!
//! Order, so that a crash or a lost peer at any step loses nothing and leaves a volume that
//! starts:
//!
//! 1. The mirror grows (the peer's `resize` with `mirror_of`): its storage, then its
//!    metadata. A source still at the old size is admitted by it meanwhile. A peer that
//!    cannot be reached stops the resize here, with nothing changed on this node.
//! 2. Here, beside the I/O: a RAID-4 volume's members are extended and their new rows
//!    made ready (`Raid4::prepare_grow`); the change map's NVRAM file is extended.
//! 3. In the volume's poller, between two requests: the storage takes the new size and
//!    the change map covers it (`Control::Grow`). New NBD connections and NVMe/TCP
//!    Identify see the new size from here on.
//! 4. The volume's record says the new size.
//!
//! A crash after 3 and before 4 starts the volume at its storage's size (the record is
//! brought up to it); a crash before 3 starts it at the old size, and the resize can be
//! run again.

use super::*;

/// What `volume resize` did.
#[derive(Debug, Serialize)]
pub struct ResizeReport {
    pub volume: String,
    pub old_bytes: u64,
    pub new_bytes: u64,
    /// The mirror on the peer: grown there, or `None` for an unmirrored volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    /// The largest size the volume can grow to (its RAID-4 checksum area's room; absent
    /// for a single disk, bounded by the disk alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
}

/// How long the volume's poller has to take the new size.
const GROW_TIMEOUT: Duration = Duration::from_secs(120);

impl Node {
    /// Grows primary volume `name` to `size` bytes, its mirror first (see the module's
    /// notes). Refused for a mirror (resize its primary), a smaller size, a size past the
    /// volume's room, or while a baseline or resync runs.
    pub fn resize_volume(&self, name: &str, size: u64) -> Result<ResizeReport> {
        let rec = match self.volume_record(name) {
            Ok(rec) => rec,
            Err(e) => {
                if let Some(((source, _), _)) = self.mirrors.read().iter().find(|((_, v), _)| v == name) {
                    bail!("{name} is a mirror here (of {source}'s volume): resize it on its primary, which grows this mirror first");
                }
                return Err(e);
            }
        };
        if size == 0 || !size.is_multiple_of(BLOCK_BYTES as u64) {
            return Err(Invalid(format!("size {size} is not a positive multiple of {BLOCK_BYTES} bytes")).into());
        }
        let handle = self.volume(name)?;
        let raid = self.storage.read().get(&StorageOwner::Volume(name.to_string())).and_then(|(_, o)| o.raid.clone());
        let max_bytes = raid.as_ref().map(|r| r.max_bytes());
        let old = handle.size();
        let report = |mirror| ResizeReport { volume: name.into(), old_bytes: old, new_bytes: size, mirror, max_bytes };
        if size < old {
            bail!("volume {name} holds {old} bytes: a volume grows, it does not shrink (to {size})");
        }
        if size == old {
            return Ok(report(rec.mirror.as_ref().map(|m| format!("{} holds {size} bytes", m.peer_name))));
        }
        if let Some(max) = max_bytes.filter(|&m| size > m) {
            bail!(
                "volume {name} can grow to {max} bytes at most: its RAID-4 checksum area was sized for that at \
                 creation (`volume create --max-size`)"
            );
        }
        check_room_to_grow(name, &rec.storage, old, size)?;
        match handle.status().map(|s| s.state) {
            Ok(PairState::Baseline) => {
                bail!("volume {name}: a baseline to the mirror is under way; resize it once it ends")
            }
            Ok(PairState::Resyncing) => {
                bail!("volume {name}: a resync to the mirror is under way; resize it once it ends")
            }
            _ => {}
        }
        // 1. The mirror.
        let mirror = match &rec.mirror {
            None => None,
            Some(m) => {
                self.cfg.peers.resize_mirror(&m.peer_control, name, &self.cfg.name, size).with_context(|| {
                    format!(
                        "the mirror on {} ({}) did not grow, so volume {name} did not either (nothing changed)",
                        m.peer_name, m.peer_control
                    )
                })?;
                Some(format!("grown on {}", m.peer_name))
            }
        };
        // 2. Room, beside the I/O.
        if let Some(r) = &raid {
            r.prepare_grow(size).with_context(|| format!("volume {name}"))?;
        }
        let path = self.changes_path(name);
        let mode = self.cfg.nvram.mode;
        nvmirror_dataplane::nvram::grow_region(&path, ChangeMap::region_bytes(size), mode)
            .with_context(|| format!("volume {name}: grow its change map"))?;
        // 3. The size, in the poller.
        let (tx, rx) = bounded(1);
        let reopen: nvmirror_dataplane::source::ReopenRegion =
            Box::new(move |len| open_region(&path, len, mode).map_err(io::Error::other));
        handle.control(Control::Grow { bytes: size, reopen_changes: reopen, reply: tx }).map_err(|e| anyhow!(e))?;
        rx.recv_timeout(GROW_TIMEOUT)
            .map_err(|_| anyhow!("volume {name}: its poller did not take the new size within {GROW_TIMEOUT:?}"))?
            .map_err(|e| anyhow!("volume {name}: {e}"))?;
        // 4. The record.
        {
            let mut state = self.state.lock();
            state.volume_mut(name)?.size = size;
            self.save_state(&state)?;
        }
        tracing::info!("node {}: volume {name} grown from {old} to {size} bytes", self.cfg.name);
        self.events.push("volume-resized", Some(name), serde_json::json!({ "old_bytes": old, "new_bytes": size }));
        Ok(report(mirror))
    }

    /// Grows the mirror of `volume` from `source` hosted here to `size` (step 1 of the
    /// source's resize).
    pub fn resize_mirror(&self, source: &str, volume: &str, size: u64) -> Result<()> {
        let m = self.mirrors.read().get(&(source.to_string(), volume.to_string())).cloned();
        let Some(m) = m else { return Err(NotFound(format!("no mirror of {source}'s {volume} on this node")).into()) };
        if size == 0 || !size.is_multiple_of(BLOCK_BYTES as u64) {
            return Err(Invalid(format!("size {size} is not a positive multiple of {BLOCK_BYTES} bytes")).into());
        }
        let owner = StorageOwner::Mirror(source.to_string(), volume.to_string());
        let (storage, raid) = self
            .storage
            .read()
            .get(&owner)
            .map(|(s, o)| (s.clone(), o.raid.clone()))
            .ok_or_else(|| NotFound(format!("no storage of the mirror of {source}'s {volume} on this node")))?;
        if let Some(max) = raid.as_ref().map(|r| r.max_bytes()).filter(|&max| size > max) {
            bail!("the mirror of {volume} here can grow to {max} bytes at most (its RAID-4 checksum area's room)");
        }
        check_room_to_grow(volume, &storage, m.meta().volume_bytes, size)?;
        m.grow(size).map_err(|e| anyhow!(e))?;
        self.events.push("mirror-resized", Some(volume), serde_json::json!({ "source": source, "new_bytes": size }));
        Ok(())
    }
}

/// Refuses a grow whose new file blocks would not fit their file systems (the disks that
/// are files; a device was sized by its administrator).
fn check_room_to_grow(name: &str, storage: &VolumeStorage, old: u64, new: u64) -> Result<()> {
    let disks = storage.disks();
    let members = disks.len() as u64;
    let per_member = match storage {
        VolumeStorage::Single { .. } => new.saturating_sub(old),
        VolumeStorage::Raid4 { .. } => new.saturating_sub(old).div_ceil(members.saturating_sub(1).max(1)),
    };
    let mut by_dir: HashMap<PathBuf, u64> = HashMap::new();
    for d in disks.iter().filter(|d| d.path.is_file()) {
        *by_dir.entry(d.path.parent().unwrap_or(Path::new(".")).to_path_buf()).or_default() += per_member;
    }
    for (dir, need) in by_dir {
        let free = crate::storage::free_bytes(&dir).with_context(|| format!("free space under {}", dir.display()))?;
        if need > free {
            bail!(
                "volume {name} needs {need} more bytes under {} to grow to {new} bytes, and its file system has \
                 {free} bytes free",
                dir.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvmirror_dataplane::storage::Engine;

    #[test]
    fn a_grow_past_the_free_space_of_its_files_is_refused_before_anything_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data");
        fs::write(&path, [0u8; 4096]).expect("a disk file");
        let disk = DiskSpec { engine: Engine::Pread, path };
        let single = VolumeStorage::Single { disk: disk.clone() };
        check_room_to_grow("v", &single, 4096, 1 << 20).expect("a megabyte fits");
        let e = check_room_to_grow("v", &single, 4096, 1 << 62).unwrap_err().to_string();
        assert!(e.contains("more bytes under") && e.contains("bytes free"), "{e}");
        // RAID-4: the growth spreads over the data disks.
        let raid = VolumeStorage::Raid4 { disks: vec![disk.clone(), disk.clone(), disk] };
        assert!(check_room_to_grow("v", &raid, 4096, 1 << 62).is_err());
    }
}
