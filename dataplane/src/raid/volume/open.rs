//! Creating and assembling a RAID-4 volume from its members' superblocks: a member
//! missing, stale or of another volume; the write hole found at start.

use super::*;

pub(super) fn is_device_node(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device() || m.file_type().is_char_device())
}

/// A member's device and superblock, or why it has none.
pub(super) type Found = Result<(Arc<dyn BlockDevice>, Superblock), String>;

/// A volume of geometry `geo` needs exactly its members: `given` disks are refused otherwise.
fn check_disk_count(name: &str, geo: Geometry, given: usize) -> Result<(), RaidError> {
    if given != geo.members() {
        return Err(RaidError::DiskCount { volume: name.into(), expected: geo.members(), data: geo.data_disks, given });
    }
    Ok(())
}

impl Raid4 {
    /// Creates a volume over `disks` (data members first, parity last). Regular files are
    /// created at the size each member needs and must not exist with contents already;
    /// devices are zeroed over their data area.
    pub fn create(name: &str, disks: &[DiskSpec], geo: Geometry) -> Result<Self, RaidError> {
        check_disk_count(name, geo, disks.len())?;
        let need = geo.member_bytes();
        let mut devs = Vec::new();
        for d in disks {
            let derr = |source: io::Error| RaidError::Disk { volume: name.into(), disk: d.to_string(), source };
            let device_node = is_device_node(&d.path);
            if !device_node && std::fs::metadata(&d.path).is_ok_and(|m| m.len() > 0) {
                return Err(derr(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "exists and is not empty; a new RAID-4 member must be a new file or a device".to_string(),
                )));
            }
            let dev = d.open(if device_node { None } else { Some(need) }).map_err(derr)?;
            if dev.size() < need {
                return Err(derr(invalid(format!("holds {} bytes, a member needs {need}", dev.size()))));
            }
            if device_node {
                dev.write_zeroes(geo.data_offset(), need - geo.data_offset()).map_err(derr)?;
            }
            devs.push((d.clone(), dev));
        }
        Self::create_devices(name, devs, geo)
    }

    /// As [`Raid4::create`], over devices already open whose data areas read as zeroes.
    pub fn create_devices(
        name: &str,
        disks: Vec<(DiskSpec, Arc<dyn BlockDevice>)>,
        geo: Geometry,
    ) -> Result<Self, RaidError> {
        check_disk_count(name, geo, disks.len())?;
        for (d, dev) in &disks {
            if dev.size() < geo.member_bytes() {
                return Err(RaidError::Disk {
                    volume: name.into(),
                    disk: d.to_string(),
                    source: invalid(format!("holds {} bytes, a member needs {}", dev.size(), geo.member_bytes())),
                });
            }
        }
        let uuid: [u8; 16] = rand::random();
        let members = disks
            .into_iter()
            .map(|(spec, dev)| Member {
                spec,
                dev: Some(dev),
                state: MemberState::InSync,
                reason: None,
                csums: new_csums(geo.rows(), *ZERO_CRC),
            })
            .collect();
        let raid = Self::assemble(name, geo, uuid, crate::clock::unix_ms(), members, 1, 0);
        // Every checksum block, then the superblocks, then a flush: a member with a valid
        // superblock has a valid checksum area.
        {
            let mut dirty = raid.dirty_csums.lock();
            for m in 0..geo.members() {
                dirty.extend((0..geo.csum_blocks()).map(|b| (m, b)));
            }
        }
        let io_err = |source: io::Error| RaidError::Disk { volume: name.into(), disk: "(all)".into(), source };
        raid.write_csums().map_err(io_err)?;
        raid.write_superblocks().map_err(io_err)?;
        Ok(raid)
    }

    /// Opens a volume from its disks (data members first, parity last). Up to one member
    /// may be missing, unreadable, truncated, stale or marked failed: the volume then opens
    /// degraded and says why in [`Raid4::status`].
    pub fn open(name: &str, disks: &[DiskSpec]) -> Result<Self, RaidError> {
        let opened = disks.iter().map(|d| (d.clone(), d.open(None))).collect();
        Self::open_devices(name, opened)
    }

    /// As [`Raid4::open`], for a volume about to be overwritten whole (a mirror that will
    /// take a baseline copy): one found dirty and degraded ([`RaidError::DirtyDegraded`])
    /// opens all the same, and [`Raid4::write_hole_found`] says so.
    pub fn open_for_copy(name: &str, disks: &[DiskSpec]) -> Result<Self, RaidError> {
        let opened = disks.iter().map(|d| (d.clone(), d.open(None))).collect();
        Self::open_devices_with(name, opened, WriteHole::Accept)
    }

    /// As [`Raid4::open`], with the disks already opened (or failed to open).
    pub fn open_devices(
        name: &str,
        disks: Vec<(DiskSpec, io::Result<Arc<dyn BlockDevice>>)>,
    ) -> Result<Self, RaidError> {
        Self::open_devices_with(name, disks, WriteHole::Refuse)
    }

    /// Whether the open found the volume dirty and degraded (see [`Raid4::open_for_copy`]):
    /// some blocks of the missing member may read as garbage until everything is rewritten.
    pub fn write_hole_found(&self) -> bool {
        self.write_hole_found
    }

    /// As [`Raid4::open_devices`], saying what a volume found dirty and degraded does.
    pub fn open_devices_with(
        name: &str,
        disks: Vec<(DiskSpec, io::Result<Arc<dyn BlockDevice>>)>,
        write_hole: WriteHole,
    ) -> Result<Self, RaidError> {
        let mut found: Vec<Found> = Vec::new();
        for (_, dev) in &disks {
            found.push(match dev {
                Err(e) => Err(format!("cannot open: {e}")),
                Ok(dev) => {
                    let mut b = vec![0u8; BLOCK_BYTES];
                    match dev.read_at(&mut b, 0) {
                        Err(e) => Err(format!("cannot read the superblock: {e}")),
                        Ok(()) => Superblock::decode(&b).map(|sb| (dev.clone(), sb)).map_err(|e| e.to_string()),
                    }
                }
            });
        }
        // The authority: the valid superblock with the most events.
        let Some(auth) =
            found.iter().filter_map(|f| f.as_ref().ok()).map(|(_, sb)| sb).max_by_key(|sb| sb.events).cloned()
        else {
            let problems = disks
                .iter()
                .zip(&found)
                .map(|((d, _), f)| format!("{d}: {}", f.as_ref().err().map_or("", |s| s)))
                .collect();
            return Err(RaidError::NoSuperblock { volume: name.into(), problems });
        };
        let geo = auth.geometry;
        check_disk_count(name, geo, disks.len())?;
        // A member one event behind that the authority holds in sync missed only the last
        // superblock round, which a crash cut short: every change that takes a member out
        // of sync is recorded in the table of the others before anything more is written,
        // so a member that missed data is marked so, or missed two rounds (its failure and
        // its return).
        let mut found_dirty = false;
        let mut lagging = Vec::new();
        let mut members = Vec::new();
        for (i, ((spec, _), f)) in disks.into_iter().zip(found).enumerate() {
            let mut state = auth.members[i];
            let mut reason = None;
            let dev = match f {
                Err(why) => {
                    reason = Some(why);
                    None
                }
                Ok((dev, sb)) => {
                    let problem = if sb.uuid != auth.uuid {
                        Some("belongs to another volume (superblock uuid differs)".to_string())
                    } else if sb.member_index as usize != i {
                        Some(format!("is member {} of this volume, given in place of member {i}", sb.member_index))
                    } else if sb.geometry != geo
                        && !(sb.events + 1 == auth.events
                            && sb.geometry.same_layout(&geo)
                            && sb.geometry.volume_bytes < geo.volume_bytes)
                    {
                        // (One event behind at a smaller size is the round of a grow that a
                        // crash cut short: brought up to the authority's below.)
                        Some(format!("superblock geometry {:?} differs from {:?}", sb.geometry, geo))
                    } else if dev.size() < geo.member_bytes() {
                        Some(format!("truncated: holds {} bytes, a member needs {}", dev.size(), geo.member_bytes()))
                    } else if sb.events + 1 < auth.events && state == MemberState::InSync {
                        Some(format!("stale: its superblock is at event {}, the volume at {}", sb.events, auth.events))
                    } else if state == MemberState::Failed {
                        Some("marked failed by the other members".to_string())
                    } else {
                        None
                    };
                    if problem.is_none() && sb.events < auth.events {
                        lagging.push(i);
                    }
                    // The members that count (a failed member's superblock is as old as
                    // its failure): dirty where any of them says so, a round that set the
                    // flag may have been cut short.
                    found_dirty |= problem.is_none() && sb.dirty;
                    match problem {
                        Some(p) => {
                            reason = Some(p);
                            None
                        }
                        None => Some(dev),
                    }
                }
            };
            if dev.is_none() {
                state = MemberState::Failed;
            }
            members.push(Member { spec, dev, state, reason, csums: new_csums(geo.rows(), *ZERO_CRC) });
        }
        let not_in_sync: Vec<String> = members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.state != MemberState::InSync)
            .map(|(i, m)| format!("member {i} ({}) {}: {}", m.spec, m.state.name(), m.reason.as_deref().unwrap_or("")))
            .collect();
        if not_in_sync.len() > 1 {
            return Err(RaidError::TooManyFailed { volume: name.into(), failed: not_in_sync });
        }
        let cursor = if members.iter().any(|m| m.state == MemberState::Rebuilding) { auth.rebuild_cursor } else { 0 };
        let changed = members.iter().zip(&auth.members).any(|(m, s)| m.state != *s);
        let dirty = found_dirty;
        let hole = dirty && !not_in_sync.is_empty();
        if hole {
            let e = RaidError::DirtyDegraded { volume: name.into(), missing: not_in_sync.join("; ") };
            if write_hole == WriteHole::Refuse {
                return Err(e);
            }
            tracing::warn!("{e} (opened all the same: it is to be copied over whole)");
        }
        let mut raid = Self::assemble(name, geo, auth.uuid, auth.created_unix_ms, members, auth.events, cursor);
        raid.meta.get_mut().dirty = dirty;
        raid.write_hole_found = hole;
        raid.load_csums().map_err(|source| RaidError::Disk {
            volume: name.into(),
            disk: "(checksum area)".into(),
            source,
        })?;
        if !lagging.is_empty() {
            // Finish the interrupted round first, at the same event: however often a crash
            // cuts this short too, no member falls further behind.
            tracing::warn!(
                "RAID-4 volume {name}: member(s) {lagging:?} missed the last superblock update (a crash cut it short); \
                 brought up to event {}",
                auth.events
            );
            raid.write_superblocks().map_err(|source| RaidError::Disk {
                volume: name.into(),
                disk: "(superblocks)".into(),
                source,
            })?;
        }
        if changed {
            // Record what this open found (a member gone since the last run), so that the
            // member cannot come back unnoticed.
            let mut meta = raid.meta.lock();
            meta.events += 1;
            drop(meta);
            raid.write_superblocks().map_err(|source| RaidError::Disk {
                volume: name.into(),
                disk: "(superblocks)".into(),
                source,
            })?;
        }
        for (i, m) in raid.members.read().iter().enumerate() {
            if let Some(r) = &m.reason {
                tracing::warn!("RAID-4 volume {name}: member {i} ({}) is {}: {r}", m.spec, m.state.name());
            }
        }
        Ok(raid)
    }

    pub(super) fn assemble(
        name: &str,
        geo: Geometry,
        uuid: [u8; 16],
        created_unix_ms: u64,
        members: Vec<Member>,
        events: u64,
        rebuild_cursor: u64,
    ) -> Self {
        Self {
            name: name.to_string(),
            layout: geo,
            volume_bytes: AtomicU64::new(geo.volume_bytes),
            prepared_bytes: Mutex::new(geo.volume_bytes),
            grow_round: Mutex::new(()),
            uuid,
            created_unix_ms,
            members: RwLock::new(members),
            meta: Mutex::new(Meta { events, rebuild_cursor, dirty: false, writes_in_flight: 0, writes_started: 0 }),
            dirty_round: Mutex::new(()),
            write_hole_found: false,
            dirty_csums: Mutex::new(BTreeSet::new()),
            locks: (0..STRIPE_LOCKS).map(|_| Mutex::new(())).collect(),
            redo: AtomicBool::new(false),
            copy_over: AtomicBool::new(false),
            serial_io: AtomicBool::new(false),
            counters: Counters::default(),
            maint: crate::raid::maintain::MaintState::new(rebuild_cursor),
        }
    }
}
