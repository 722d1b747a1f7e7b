//! Where a volume's blocks live: one disk, or a RAID-4 volume over several, and the long
//! operations on it (scrub, replace-disk and rebuild).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Weak};

use anyhow::{anyhow, bail, Context, Result};
use nvmirror_dataplane::format::BLOCK_BYTES;
use nvmirror_dataplane::raid::{Geometry, Raid4, RaidStatus, WriteHole};
use nvmirror_dataplane::storage::{BlockDevice, DiskSpec, Engine};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Data disks of a RAID-4 volume made of files in the data dir, unless told otherwise.
pub const DATA_DISKS_DEFAULT: u32 = 3;
/// Stripe unit of a RAID-4 volume, unless told otherwise.
pub const STRIPE_UNIT_DEFAULT: u32 = 64 << 10;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "layout", rename_all = "kebab-case")]
pub enum VolumeStorage {
    /// One disk, no redundancy and no checksums.
    Single { disk: DiskSpec },
    /// RAID-4: the data disks, then the parity disk.
    Raid4 { disks: Vec<DiskSpec> },
}

/// A node's default RAID-4 geometry, for volumes made of files in its data dir and for
/// the mirrors it hosts (a mirror picks its own geometry).
#[derive(Debug, Clone, Copy)]
pub struct RaidDefaults {
    pub data_disks: u32,
    pub stripe_unit: u32,
    pub engine: Engine,
}

impl Default for RaidDefaults {
    fn default() -> Self {
        Self { data_disks: DATA_DISKS_DEFAULT, stripe_unit: STRIPE_UNIT_DEFAULT, engine: Engine::Pread }
    }
}

/// How the mirrors a node hosts store their blocks (`node --mirror-layout`). A mirror
/// picks its own geometry, whatever the primary's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MirrorLayout {
    /// RAID-4 over data-dir files in the node's RAID geometry (`--raid-data-disks`):
    /// parity and per-block checksums, scrub and repair on the mirror.
    #[default]
    Raid4,
    /// One data-dir file: no parity and no checksums, and no RAID work when a CP is
    /// applied. For a mirror node whose data dir already sits on redundant storage (a
    /// hardware RAID, md, a replicated namespace), as DRBD's secondary writes to one
    /// backing device.
    Single,
}

impl VolumeStorage {
    /// The storage of a new mirror in `dir`, as `layout` says.
    pub fn mirror_in(dir: &Path, layout: MirrorLayout, raid: &RaidDefaults) -> Self {
        match layout {
            MirrorLayout::Raid4 => Self::raid_in(dir, raid.data_disks, raid.engine),
            MirrorLayout::Single => {
                VolumeStorage::Single { disk: DiskSpec { engine: raid.engine, path: dir.join("data") } }
            }
        }
    }

    /// RAID-4 over files `data0..dataN-1` and `parity` in `dir`.
    pub fn raid_in(dir: &Path, data_disks: u32, engine: Engine) -> Self {
        let mut disks: Vec<DiskSpec> =
            (0..data_disks).map(|i| DiskSpec { engine, path: dir.join(format!("data{i}")) }).collect();
        disks.push(DiskSpec { engine, path: dir.join("parity") });
        VolumeStorage::Raid4 { disks }
    }

    pub fn disks(&self) -> Vec<DiskSpec> {
        match self {
            VolumeStorage::Single { disk } => vec![disk.clone()],
            VolumeStorage::Raid4 { disks } => disks.clone(),
        }
    }

    /// A one-line description for messages.
    pub fn describe(&self) -> String {
        match self {
            VolumeStorage::Single { disk } => format!("{disk} (single disk, no redundancy)"),
            VolumeStorage::Raid4 { disks } => format!(
                "RAID-4 over {}+1 disks ({}, parity {})",
                disks.len() - 1,
                disks[..disks.len() - 1].iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                disks[disks.len() - 1]
            ),
        }
    }
}

/// An open volume's device, and its RAID-4 layer where it has one.
#[derive(Clone)]
pub struct Opened {
    pub device: Arc<dyn BlockDevice>,
    pub raid: Option<Arc<Raid4>>,
}

/// The status of a volume's storage, for `ctl status`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum StorageStatus {
    Raid(Box<RaidStatus>),
    Single { level: &'static str, disk: String },
}

impl Opened {
    pub fn status(&self, storage: &VolumeStorage) -> StorageStatus {
        match (&self.raid, storage) {
            (Some(r), _) => StorageStatus::Raid(Box::new(r.status())),
            (None, s) => StorageStatus::Single { level: "single", disk: s.disks()[0].to_string() },
        }
    }
}

fn is_device_node(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device() || m.file_type().is_char_device())
}

/// Bytes an unprivileged writer may still allocate on the file system holding `path` (the
/// nearest existing ancestor of it).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let at = path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let c = std::ffi::CString::new(at.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a statvfs buffer the call fills on success.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0: the buffer is filled.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Refuses a volume whose new files (regular files not there yet, or empty) would not fit
/// on their file systems: `need` bytes for each of `disks`.
fn check_room(name: &str, disks: &[&DiskSpec], need: u64) -> Result<()> {
    let mut by_dir: Vec<(std::path::PathBuf, u64)> = Vec::new();
    for d in disks {
        let new_file = !is_device_node(&d.path) && std::fs::metadata(&d.path).map_or(true, |m| m.len() == 0);
        if !new_file {
            continue;
        }
        let dir = d.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        match by_dir.iter_mut().find(|(p, _)| *p == dir) {
            Some((_, n)) => *n += need,
            None => by_dir.push((dir, need)),
        }
    }
    for (dir, n) in by_dir {
        let free = free_bytes(&dir).with_context(|| format!("free space under {}", dir.display()))?;
        if n > free {
            bail!(
                "volume {name} needs {n} bytes of files under {}, and its file system has {free} bytes free",
                dir.display()
            );
        }
    }
    Ok(())
}

/// The open RAID-4 volumes of a node, by their first disk: a volume is opened once, even
/// where a promoted mirror and the primary it became both name it.
#[derive(Default)]
pub struct OpenVolumes(Mutex<HashMap<std::path::PathBuf, Weak<Raid4>>>);

impl OpenVolumes {
    /// Creates the storage of a new volume of `size` bytes; a RAID-4 volume with room to
    /// grow to `max_bytes` (default [`grow_room`], or what its device members hold).
    pub fn create(
        &self,
        name: &str,
        storage: &VolumeStorage,
        size: u64,
        stripe_unit: u32,
        max_bytes: Option<u64>,
    ) -> Result<Opened> {
        match storage {
            VolumeStorage::Single { disk } => {
                check_room(name, &[disk], size)?;
                let dev = disk
                    .open(if is_device_node(&disk.path) { None } else { Some(size) })
                    .with_context(|| format!("use {disk} as the volume"))?;
                if dev.size() < size {
                    bail!("{disk} holds {} bytes, the volume needs {size}", dev.size());
                }
                Ok(Opened { device: dev, raid: None })
            }
            VolumeStorage::Raid4 { disks } => {
                let data = u32::try_from(disks.len() - 1).context("disk count")?;
                let geo = Geometry::new(data, stripe_unit, size).map_err(|e| anyhow!(e))?;
                // The room to grow is a hole in a file member: only the size needs space now.
                check_room(name, &disks.iter().collect::<Vec<_>>(), geo.member_bytes())?;
                if let Some(max) = max_bytes.filter(|&m| m < size) {
                    bail!("--max-size {max} is below the volume's size {size}");
                }
                let max = max_bytes.unwrap_or_else(|| devices_room(disks, geo).min(grow_room(size)));
                let geo = geo.with_room_for(max).map_err(|e| anyhow!(e))?;
                for d in disks {
                    if let Some(parent) = d.path.parent().filter(|p| !p.as_os_str().is_empty()) {
                        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
                    }
                }
                let raid = Arc::new(Raid4::create(name, disks, geo)?);
                self.0.lock().insert(disks[0].path.clone(), Arc::downgrade(&raid));
                Ok(Opened { device: raid.clone(), raid: Some(raid) })
            }
        }
    }

    /// Opens the storage of an existing volume.
    pub fn open(&self, name: &str, storage: &VolumeStorage) -> Result<Opened> {
        self.open_with(name, storage, WriteHole::Refuse)
    }

    /// As [`OpenVolumes::open`], for storage about to be copied over whole (a mirror that
    /// takes a baseline): a RAID-4 volume found dirty and degraded opens all the same
    /// (`Raid4::write_hole_found` says so).
    pub fn open_for_copy(&self, name: &str, storage: &VolumeStorage) -> Result<Opened> {
        self.open_with(name, storage, WriteHole::Accept)
    }

    fn open_with(&self, name: &str, storage: &VolumeStorage, write_hole: WriteHole) -> Result<Opened> {
        match storage {
            VolumeStorage::Single { disk } => {
                Ok(Opened { device: disk.open(None).with_context(|| format!("open {disk}"))?, raid: None })
            }
            VolumeStorage::Raid4 { disks } => {
                let mut open = self.0.lock();
                if let Some(raid) = open.get(&disks[0].path).and_then(Weak::upgrade) {
                    return Ok(Opened { device: raid.clone(), raid: Some(raid) });
                }
                let raid = Arc::new(match write_hole {
                    WriteHole::Refuse => Raid4::open(name, disks)?,
                    WriteHole::Accept => Raid4::open_for_copy(name, disks)?,
                });
                open.insert(disks[0].path.clone(), Arc::downgrade(&raid));
                Ok(Opened { device: raid.clone(), raid: Some(raid) })
            }
        }
    }
}

/// The size a RAID-4 volume of `size` bytes may grow to unless told otherwise: 16 times
/// its size, and at least 64 GiB. Its checksum area is sized for it (1/1024 of the data
/// per member); in a file member that room is a hole until the volume grows into it.
pub fn grow_room(size: u64) -> u64 {
    size.saturating_mul(16).max(64 << 30)
}

/// The largest volume of geometry `geo` whose members fit the smallest device among
/// `disks` (files grow, so without devices: no bound).
fn devices_room(disks: &[DiskSpec], geo: Geometry) -> u64 {
    let smallest =
        disks.iter().filter(|d| is_device_node(&d.path)).filter_map(|d| d.open(None).ok().map(|dev| dev.size())).min();
    let Some(bytes) = smallest else { return u64::MAX };
    // Blocks after the superblock hold rows and their checksums (one block per 1024 rows).
    let blocks = (bytes / BLOCK_BYTES as u64).saturating_sub(1);
    let rows = blocks * 1024 / 1025;
    let stripes = rows / geo.unit_blocks();
    (stripes * geo.stripe_data_blocks() * BLOCK_BYTES as u64).max(geo.volume_bytes)
}

/// Parses the disks of `volume create`: `--disk` (repeated) and `--parity`.
pub fn storage_from_args(disks: &[String], parity: Option<&str>) -> Result<Option<VolumeStorage>> {
    let parse = |s: &str| DiskSpec::parse(s).map_err(|e| anyhow!(e));
    match (disks, parity) {
        ([], None) => Ok(None),
        ([], Some(_)) => bail!("--parity needs the data disks too (--disk, at least two)"),
        ([one], None) => Ok(Some(VolumeStorage::Single { disk: parse(one)? })),
        (_, None) => bail!("{} data disks need a parity disk (--parity) for RAID-4", disks.len()),
        ([_], Some(_)) => bail!("RAID-4 needs at least two data disks (--disk twice) besides --parity"),
        (many, Some(p)) => {
            let mut specs: Vec<DiskSpec> = many.iter().map(|d| parse(d)).collect::<Result<_>>()?;
            specs.push(parse(p)?);
            let mut seen = std::collections::HashSet::new();
            if let Some(dup) = specs.iter().find(|d| !seen.insert(d.path.clone())) {
                bail!("disk {} is given twice", dup.path.display());
            }
            Ok(Some(VolumeStorage::Raid4 { disks: specs }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_args_make_sense_or_say_why() {
        assert_eq!(storage_from_args(&[], None).unwrap(), None);
        assert!(matches!(storage_from_args(&["/a".into()], None).unwrap(), Some(VolumeStorage::Single { .. })));
        let r = storage_from_args(&["/a".into(), "uring:/b".into()], Some("/p")).unwrap().unwrap();
        assert_eq!(r.disks().len(), 3);
        assert_eq!(r.disks()[1].engine, Engine::Uring);
        for (d, p, why) in [
            (vec![], Some("/p"), "needs the data disks"),
            (vec!["/a".to_string(), "/b".into()], None, "need a parity disk"),
            (vec!["/a".to_string()], Some("/p"), "at least two data disks"),
            (vec!["/a".to_string(), "/a".into()], Some("/p"), "given twice"),
        ] {
            let e = storage_from_args(&d, p).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }
}
