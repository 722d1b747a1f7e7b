//! A new primary volume: its name and size checked, its storage laid out (data-dir RAID-4
//! members, or the disks given), its NVLog formatted, its record saved, then started.

use super::*;

/// What `volume create` sets besides the layout.
#[derive(Debug, Clone, Default)]
pub struct VolumeOptions {
    /// CPs go to the mirror by value.
    pub cp_by_value: bool,
    /// The NBD allow-list (see [`VolumeRecord::allow`]).
    pub allow: Vec<String>,
}

/// How `volume create` lays out a volume made of data-dir files.
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateLayout {
    pub data_disks: Option<u32>,
    pub stripe_unit: Option<u32>,
    pub engine: Option<Engine>,
    /// The size a RAID-4 volume may grow to (default [`crate::storage::grow_room`]).
    pub max_bytes: Option<u64>,
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    pub fn create_volume(
        &self,
        name: &str,
        size: u64,
        storage: Option<VolumeStorage>,
        layout: CreateLayout,
        partition_bytes: Option<usize>,
        options: VolumeOptions,
    ) -> Result<VolumeRecord> {
        valid_name(name)?;
        check_allow(&options.allow, self.cfg.nbd_client_ca.is_some())?;
        if size == 0 || !size.is_multiple_of(BLOCK_BYTES as u64) {
            bail!("size {size} is not a positive multiple of {BLOCK_BYTES} bytes");
        }
        let partition_bytes = partition_bytes.unwrap_or(PARTITION_BYTES_DEFAULT);
        if partition_bytes < PARTITION_BYTES_MIN || !partition_bytes.is_multiple_of(BLOCK_BYTES) {
            bail!("log partition size must be a multiple of {BLOCK_BYTES} and at least {PARTITION_BYTES_MIN} bytes");
        }
        // The NVLog (two partitions) and the change map live in the NVRAM dir.
        let nvram_bytes =
            NvLog::<Box<dyn Nvram>>::region_bytes(partition_bytes) as u64 + ChangeMap::region_bytes(size) as u64;
        let free = crate::storage::free_bytes(&self.cfg.nvram.dir)
            .with_context(|| format!("free space under {}", self.cfg.nvram.dir.display()))?;
        if nvram_bytes > free {
            bail!(
                "volume {name}'s log (two partitions of {partition_bytes} bytes) and change map need {nvram_bytes} bytes \
                 of NVRAM under {}, which has {free} bytes free",
                self.cfg.nvram.dir.display()
            );
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
            .create(name, &storage, size, layout.stripe_unit.unwrap_or(self.cfg.raid.stripe_unit), layout.max_bytes)
            .with_context(|| format!("create volume {name} on {}", storage.describe()));
        if opened.is_err() {
            // A creation refused before any member was made leaves no directory behind
            // that would block the next try (one that made members leaves them, to look at).
            let _ = fs::remove_dir(self.cfg.data_dir.join("volumes").join(name));
        }
        drop(opened?);
        let record = VolumeRecord {
            name: name.to_string(),
            volume_id: rand::random::<u64>() | 1,
            size,
            partition_bytes,
            epoch: 1,
            storage,
            cp_interval_ms: 10_000,
            mirror: None,
            cp_by_value: options.cp_by_value,
            policy: Policy::Strict,
            allow: options.allow,
        };
        state.volumes.push(record.clone());
        // Saved under the state lock: saves are ordered with the changes they record.
        self.save_state(&state)?;
        drop(state);
        self.start_volume(&record)?;
        self.events.push("volume-created", Some(name), serde_json::json!({ "size": size }));
        Ok(record)
    }
}
