//! The RAID-4 volume: the read and write paths, checksums, degraded mode, member failure.
//!
//! Writes are planned row by row (see `layout`): a row whose data blocks are all written
//! gets its parity from the new data alone; a partial row takes the cheaper of
//! read-modify-write (read the old data being replaced and the old parity) and
//! reconstruct-write (read the data not being replaced). Every block's crc32c lives in
//! its member's checksum area, held in memory and written back at `flush`; every read is
//! checked against it. A block that fails its check is rebuilt from the rest of its row,
//! checked again and rewritten. A row whose blocks fail their checks while data and parity
//! agree has stale checksums (a crash between a data write and the checksum write-back),
//! and its checksums are corrected instead.
//!
//! Crash consistency (no write hole): every write reaching a volume comes from a log (the
//! NVLog, a mirror's log file) or from a baseline that restarts from scratch. After a
//! crash the log's writes are redone under [`BlockDevice::set_redo`], and a redo computes
//! the parity of each row it touches from the data (reconstruct-write), never from the
//! parity on disk, which the crash may have left out of step with the data.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use parking_lot::{Mutex, MutexGuard, RwLock};
use serde::Serialize;

use super::layout::{Geometry, CSUMS_PER_BLOCK};
use super::superblock::{MemberState, Superblock, SUPERBLOCK_BYTES};
use super::{scratch, xor};
use crate::format::BLOCK_BYTES;
use crate::storage::{check_range, BlockDevice, DiskSpec, ReadOp, WriteOp};

const B: u64 = BLOCK_BYTES as u64;
/// Stripe locks: a stripe's lock is `locks[stripe % STRIPE_LOCKS]`.
const STRIPE_LOCKS: usize = 1024;
/// The bytes one planned write batch aims at (larger writes are cut, at stripe boundaries,
/// into batches of about this size, and never smaller than a stripe), and the most one
/// read batch covers. Small enough that a batch's old blocks, parity and new data stay in
/// the CPU's caches between the read, the checks, the XOR and the write: measured on a
/// mirror's CP of random 4 KiB blocks (RAID-4 3+1), 16 MiB batches spent 6% of the
/// machine's CPU in crc32c and reached 74-78k writes/s at queue depth 32; 256 KiB batches
/// spent 1.3% and reached 98-103k.
const BATCH_BYTES_MAX: u64 = 256 << 10;

static ZERO_BLOCK: [u8; BLOCK_BYTES] = [0; BLOCK_BYTES];
static ZERO_CRC: LazyLock<u32> = LazyLock::new(|| crate::checksum::crc32c(&ZERO_BLOCK));

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// One member: its disk, and what the volume knows of it.
struct Member {
    spec: DiskSpec,
    /// `None` while failed or missing.
    dev: Option<Arc<dyn BlockDevice>>,
    state: MemberState,
    /// Why the member is failed, for status and errors.
    reason: Option<String>,
    /// One crc32c per row. Meaningful while the member is in sync, and below the rebuild
    /// cursor while it is rebuilt.
    csums: Box<[AtomicU32]>,
}

/// Which members can serve which rows, taken once per operation.
#[derive(Clone)]
pub(super) struct View {
    devs: Vec<Option<Arc<dyn BlockDevice>>>,
    /// The member being rebuilt and the rows already rebuilt on it.
    rebuilding: Option<(usize, u64)>,
}

impl View {
    fn alive(&self, member: usize, row: u64) -> bool {
        match self.rebuilding {
            Some((m, cursor)) if m == member => self.devs[m].is_some() && row < cursor,
            _ => self.devs[member].is_some(),
        }
    }
    fn dev(&self, member: usize) -> &Arc<dyn BlockDevice> {
        self.devs[member].as_ref().expect("only alive members are accessed")
    }
    pub(super) fn devs_of(&self, member: usize) -> &Arc<dyn BlockDevice> {
        self.dev(member)
    }
    pub(super) fn rebuilding_member(&self) -> Option<usize> {
        self.rebuilding.map(|(m, _)| m)
    }
}

#[derive(Debug, Default)]
struct Counters {
    /// Blocks read whose checksum did not match.
    checksum_errors: AtomicU64,
    /// Blocks rebuilt from their row and rewritten.
    blocks_repaired: AtomicU64,
    /// Checksum entries corrected where data and parity agreed.
    checksums_corrected: AtomicU64,
    /// Reads that could not be served correctly.
    unrecoverable: AtomicU64,
    /// Blocks served by reconstruction from a failed member's row.
    degraded_reads: AtomicU64,
    /// Blocks accepted unverified during a redo, to be overwritten by it.
    redo_unverified: AtomicU64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub checksum_errors: u64,
    pub blocks_repaired: u64,
    pub checksums_corrected: u64,
    pub unrecoverable: u64,
    pub degraded_reads: u64,
    pub redo_unverified: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    pub index: usize,
    pub role: &'static str,
    pub disk: String,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RaidStatus {
    pub level: &'static str,
    pub data_disks: u32,
    pub stripe_unit: u32,
    pub volume_bytes: u64,
    pub member_bytes: u64,
    pub xor_path: &'static str,
    pub degraded: bool,
    pub members: Vec<MemberStatus>,
    pub counters: CounterSnapshot,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<super::maintain::Progress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scrub: Option<super::maintain::Progress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_scrub: Option<super::maintain::ScrubReport>,
}

/// What an open does with a volume found dirty and degraded (the RAID-4 write hole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteHole {
    /// Refuses to open it ([`RaidError::DirtyDegraded`]): the default.
    Refuse,
    /// Opens it: for a volume that is to be copied over whole.
    Accept,
}

/// Why a volume could not be created or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RaidError {
    #[error("{0}")]
    Geometry(String),
    #[error("RAID-4 volume {volume} needs {expected} disks ({data} data and 1 parity), {given} given")]
    DiskCount { volume: String, expected: usize, data: u32, given: usize },
    #[error("RAID-4 volume {volume}: disk {disk}: {source}")]
    Disk {
        volume: String,
        disk: String,
        #[source]
        source: io::Error,
    },
    #[error("RAID-4 volume {volume}: {}; RAID-4 survives the loss of one member", .failed.join("; "))]
    TooManyFailed { volume: String, failed: Vec<String> },
    #[error("RAID-4 volume {volume}: no member holds a valid superblock: {}", .problems.join("; "))]
    NoSuperblock { volume: String, problems: Vec<String> },
    /// Writes were in flight when the volume stopped (its superblocks say dirty) and a
    /// member is missing: rows those writes touched may hold data and parity out of step,
    /// and the missing member's blocks in them cannot be told (the RAID-4 write hole).
    #[error(
        "RAID-4 volume {volume}: stopped with writes in flight while {missing}; the rows they touched may \
         hold data and parity out of step, and the missing member's blocks in them cannot be rebuilt (the \
         RAID-4 write hole): the volume does not start. Its mirror holds it: fail over to the mirror, then \
         resync this node from it (`nvmirror ctl resync VOLUME --from NEW_PRIMARY`, run here: its storage is copied over whole)"
    )]
    DirtyDegraded { volume: String, missing: String },
}

pub struct Raid4 {
    name: String,
    geo: Geometry,
    uuid: [u8; 16],
    created_unix_ms: u64,
    /// The member table. Changed under `meta` and written to every present member's
    /// superblock before the change is used.
    members: RwLock<Vec<Member>>,
    meta: Mutex<Meta>,
    /// Held while the dirty flag is written to the superblocks: a write waits for the
    /// round that sets it, and none starts during the round that clears it.
    dirty_round: Mutex<()>,
    /// The open found the volume dirty and degraded (see [`Raid4::open_for_copy`]).
    write_hole_found: bool,
    dirty_csums: Mutex<BTreeSet<(usize, u64)>>,
    locks: Box<[Mutex<()>]>,
    redo: AtomicBool,
    /// Member I/O one member after another on the calling thread, never side by side:
    /// what the deterministic simulator needs to replay a run exactly.
    serial_io: AtomicBool,
    counters: Counters,
    pub(super) maint: super::maintain::MaintState,
}

struct Meta {
    events: u64,
    /// The rebuild cursor as persisted in the superblocks.
    rebuild_cursor: u64,
    /// The superblocks say dirty: writes may be in flight since the last flush.
    dirty: bool,
    /// Write batches under way, and started since the volume opened (see `begin_write`).
    writes_in_flight: u64,
    writes_started: u64,
}

impl fmt::Debug for Raid4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Raid4").field("name", &self.name).field("geometry", &self.geo).finish_non_exhaustive()
    }
}

fn new_csums(rows: u64, init: u32) -> Box<[AtomicU32]> {
    (0..rows).map(|_| AtomicU32::new(init)).collect()
}

fn is_device_node(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device() || m.file_type().is_char_device())
}

impl Raid4 {
    /// Creates a volume over `disks` (data members first, parity last). Regular files are
    /// created at the size each member needs and must not exist with contents already;
    /// devices are zeroed over their data area.
    pub fn create(name: &str, disks: &[DiskSpec], geo: Geometry) -> Result<Self, RaidError> {
        if disks.len() != geo.members() {
            return Err(RaidError::DiskCount {
                volume: name.into(),
                expected: geo.members(),
                data: geo.data_disks,
                given: disks.len(),
            });
        }
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
        if disks.len() != geo.members() {
            return Err(RaidError::DiskCount {
                volume: name.into(),
                expected: geo.members(),
                data: geo.data_disks,
                given: disks.len(),
            });
        }
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
        if disks.len() != geo.members() {
            return Err(RaidError::DiskCount {
                volume: name.into(),
                expected: geo.members(),
                data: geo.data_disks,
                given: disks.len(),
            });
        }
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
                    } else if sb.geometry != geo {
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
            eprintln!("{e} (opened all the same: it is to be copied over whole)");
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
            eprintln!(
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
                eprintln!("RAID-4 volume {name}: member {i} ({}) is {}: {r}", m.spec, m.state.name());
            }
        }
        Ok(raid)
    }

    fn assemble(
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
            geo,
            uuid,
            created_unix_ms,
            members: RwLock::new(members),
            meta: Mutex::new(Meta { events, rebuild_cursor, dirty: false, writes_in_flight: 0, writes_started: 0 }),
            dirty_round: Mutex::new(()),
            write_hole_found: false,
            dirty_csums: Mutex::new(BTreeSet::new()),
            locks: (0..STRIPE_LOCKS).map(|_| Mutex::new(())).collect(),
            redo: AtomicBool::new(false),
            serial_io: AtomicBool::new(false),
            counters: Counters::default(),
            maint: super::maintain::MaintState::new(rebuild_cursor),
        }
    }

    /// Issues member I/O one member after another on the calling thread (see the field).
    pub fn set_serial_io(&self, on: bool) {
        self.serial_io.store(on, Ordering::SeqCst);
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }
    pub fn disks(&self) -> Vec<DiskSpec> {
        self.members.read().iter().map(|m| m.spec.clone()).collect()
    }

    pub fn counters(&self) -> CounterSnapshot {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterSnapshot {
            checksum_errors: l(&c.checksum_errors),
            blocks_repaired: l(&c.blocks_repaired),
            checksums_corrected: l(&c.checksums_corrected),
            unrecoverable: l(&c.unrecoverable),
            degraded_reads: l(&c.degraded_reads),
            redo_unverified: l(&c.redo_unverified),
        }
    }

    pub fn status(&self) -> RaidStatus {
        let members = self.members.read();
        let p = self.geo.parity_member();
        RaidStatus {
            level: "raid4",
            data_disks: self.geo.data_disks,
            stripe_unit: self.geo.stripe_unit,
            volume_bytes: self.geo.volume_bytes,
            member_bytes: self.geo.member_bytes(),
            xor_path: xor::XorPath::best().name(),
            degraded: members.iter().any(|m| m.state != MemberState::InSync),
            members: members
                .iter()
                .enumerate()
                .map(|(i, m)| MemberStatus {
                    index: i,
                    role: if i == p { "parity" } else { "data" },
                    disk: m.spec.to_string(),
                    state: m.state.name(),
                    reason: m.reason.clone(),
                })
                .collect(),
            counters: self.counters(),
            rebuild: self.maint.rebuild_progress(),
            scrub: self.maint.scrub_progress(),
            last_scrub: self.maint.last_scrub(),
        }
    }

    pub(super) fn view(&self) -> View {
        let members = self.members.read();
        let rebuilding = members
            .iter()
            .position(|m| m.state == MemberState::Rebuilding)
            .map(|i| (i, self.maint.rebuild_cursor.load(Ordering::Acquire)));
        View {
            devs: members.iter().map(|m| if m.state == MemberState::Failed { None } else { m.dev.clone() }).collect(),
            rebuilding,
        }
    }

    pub(super) fn csum_of(&self, member: usize, row: u64) -> u32 {
        self.csum(member, row)
    }
    pub(super) fn set_csums_pub(&self, updates: &[(usize, u64, u32)]) {
        self.set_csums(updates);
    }

    fn csum(&self, member: usize, row: u64) -> u32 {
        self.members.read()[member].csums[crate::usize_of(row)].load(Ordering::Relaxed)
    }

    fn set_csums(&self, updates: &[(usize, u64, u32)]) {
        if updates.is_empty() {
            return;
        }
        let members = self.members.read();
        let mut dirty = self.dirty_csums.lock();
        for &(m, row, crc) in updates {
            members[m].csums[crate::usize_of(row)].store(crc, Ordering::Relaxed);
            dirty.insert((m, row / CSUMS_PER_BLOCK));
        }
    }

    // ---- locking ----

    /// Locks the stripes of `rows` (in lock order, so that two batches never deadlock).
    fn lock_rows(&self, rows: impl Iterator<Item = u64>) -> Vec<MutexGuard<'_, ()>> {
        let idx: BTreeSet<usize> =
            rows.map(|r| crate::usize_of(self.geo.stripe_of_row(r) % STRIPE_LOCKS as u64)).collect();
        idx.into_iter().map(|i| self.locks[i].lock()).collect()
    }

    pub(super) fn lock_stripe(&self, stripe: u64) -> MutexGuard<'_, ()> {
        self.locks[crate::usize_of(stripe % STRIPE_LOCKS as u64)].lock()
    }

    // ---- member failure and superblocks ----

    /// Marks `member` failed after an I/O error, records it in the other members'
    /// superblocks and carries on degraded.
    pub(super) fn fail_member(&self, member: usize, why: &io::Error) {
        {
            let mut members = self.members.write();
            let m = &mut members[member];
            if m.state == MemberState::Failed {
                return;
            }
            eprintln!("RAID-4 volume {}: member {member} ({}) failed: {why}; running degraded", self.name, m.spec);
            m.state = MemberState::Failed;
            m.reason = Some(format!("I/O error: {why}"));
            m.dev = None;
        }
        self.meta.lock().events += 1;
        if let Err(e) = self.write_superblocks() {
            eprintln!("RAID-4 volume {}: recording the failure of member {member}: {e}", self.name);
        }
    }

    /// A superblock round with no change but the event, as a rebuild's cursor writes one.
    #[cfg(test)]
    pub(super) fn next_event(&self) -> io::Result<()> {
        self.meta.lock().events += 1;
        self.write_superblocks()
    }

    /// Writes the current member table into every present member's superblock, and flushes.
    pub(super) fn write_superblocks(&self) -> io::Result<()> {
        let meta = self.meta.lock();
        let members = self.members.read();
        let table: Vec<MemberState> = members.iter().map(|m| m.state).collect();
        let mut first_err = None;
        let mut failed = Vec::new();
        for (i, m) in members.iter().enumerate() {
            let Some(dev) = &m.dev else { continue };
            if m.state == MemberState::Failed {
                continue;
            }
            let sb = Superblock {
                uuid: self.uuid,
                member_index: u32::try_from(i).expect("member index fits u32"),
                geometry: self.geo,
                events: meta.events,
                members: table.clone(),
                rebuild_cursor: meta.rebuild_cursor,
                created_unix_ms: self.created_unix_ms,
                dirty: meta.dirty,
            };
            let mut block = vec![0u8; BLOCK_BYTES];
            block[..SUPERBLOCK_BYTES].copy_from_slice(&sb.encode());
            if let Err(e) = dev.write_at(&block, 0).and_then(|()| dev.flush()) {
                failed.push(i);
                first_err.get_or_insert(io::Error::new(e.kind(), format!("member {i} ({}): superblock: {e}", m.spec)));
            }
        }
        drop(members);
        drop(meta);
        for i in failed {
            // A member whose superblock cannot be written is failed too.
            let e = io::Error::other("superblock write failed");
            self.fail_member(i, &e);
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Starts a write batch: the superblocks say dirty before any of it reaches a member
    /// (see the superblock's module docs). Pair with [`Self::end_write`].
    fn begin_write(&self) -> io::Result<()> {
        let _round = self.dirty_round.lock();
        let mut meta = self.meta.lock();
        meta.writes_in_flight += 1;
        meta.writes_started += 1;
        if meta.dirty {
            return Ok(());
        }
        meta.dirty = true;
        drop(meta);
        // A member whose superblock cannot be written is failed (and left out): the flag
        // is on every member that counts, if the volume survives it.
        self.write_superblocks().or_else(|_| self.check_survivable()).inspect_err(|_| {
            let mut meta = self.meta.lock();
            meta.writes_in_flight -= 1;
        })
    }

    fn end_write(&self) {
        self.meta.lock().writes_in_flight -= 1;
    }

    /// After a flush that began once `started` write batches had started: the superblocks
    /// say clean again, if no batch is under way or began since.
    fn mark_clean(&self, started: u64) -> io::Result<()> {
        let _round = self.dirty_round.lock();
        let mut meta = self.meta.lock();
        if !meta.dirty || meta.writes_in_flight > 0 || meta.writes_started != started {
            return Ok(());
        }
        meta.dirty = false;
        drop(meta);
        self.write_superblocks().or_else(|_| self.check_survivable())
    }

    pub(super) fn set_rebuild_cursor_persisted(&self, cursor: u64) {
        self.meta.lock().rebuild_cursor = cursor;
    }

    pub(super) fn bump_events(&self) {
        self.meta.lock().events += 1;
    }

    /// Replaces member `member`'s disk: the new disk starts as rebuilding, at row 0.
    pub(super) fn install_member(&self, member: usize, spec: DiskSpec, dev: Arc<dyn BlockDevice>) {
        let mut members = self.members.write();
        let m = &mut members[member];
        m.spec = spec;
        m.dev = Some(dev);
        m.state = MemberState::Rebuilding;
        m.reason = None;
        self.maint.rebuild_cursor.store(0, Ordering::Release);
    }

    pub(super) fn finish_member(&self, member: usize) {
        let mut members = self.members.write();
        members[member].state = MemberState::InSync;
        members[member].reason = None;
    }

    pub(super) fn member_state(&self, member: usize) -> MemberState {
        self.members.read()[member].state
    }

    pub(super) fn member_spec(&self, member: usize) -> DiskSpec {
        self.members.read()[member].spec.clone()
    }

    fn load_csums(&self) -> io::Result<()> {
        let members = self.members.read();
        let n = crate::usize_of(self.geo.csum_blocks()) * BLOCK_BYTES;
        let mut failed = Vec::new();
        for (i, m) in members.iter().enumerate() {
            let Some(dev) = &m.dev else { continue };
            let mut buf = vec![0u8; n];
            if let Err(e) = dev.read_at(&mut buf, self.geo.csum_offset()) {
                failed.push((i, e));
                continue;
            }
            for (row, c) in m.csums.iter().enumerate() {
                let at = row * 4;
                c.store(u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")), Ordering::Relaxed);
            }
        }
        drop(members);
        for (i, e) in failed {
            self.fail_member(i, &e);
        }
        if self.members.read().iter().filter(|m| m.state != MemberState::InSync).count() > 1 {
            return Err(io::Error::other("a second member failed while its checksums were read"));
        }
        Ok(())
    }

    /// Writes the dirty checksum blocks back to their members.
    fn write_csums(&self) -> io::Result<()> {
        let dirty = std::mem::take(&mut *self.dirty_csums.lock());
        if dirty.is_empty() {
            return Ok(());
        }
        let mut per_member: BTreeMap<usize, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
        {
            let members = self.members.read();
            for (m, cb) in dirty {
                let member = &members[m];
                if member.dev.is_none() || member.state == MemberState::Failed {
                    continue;
                }
                let mut block = vec![0u8; BLOCK_BYTES];
                let first = cb * CSUMS_PER_BLOCK;
                let last = (first + CSUMS_PER_BLOCK).min(self.geo.rows());
                for row in first..last {
                    let at = crate::usize_of(row - first) * 4;
                    let c = member.csums[crate::usize_of(row)].load(Ordering::Relaxed);
                    block[at..at + 4].copy_from_slice(&c.to_le_bytes());
                }
                per_member.entry(m).or_default().push((self.geo.csum_offset() + cb * B, block));
            }
        }
        let view = self.view();
        for (m, blocks) in per_member {
            let Some(dev) = &view.devs[m] else { continue };
            let ops: Vec<WriteOp<'_>> = blocks.iter().map(|(off, b)| WriteOp { offset: *off, buf: b }).collect();
            if let Err(e) = dev.write_many(&ops) {
                self.fail_member(m, &e);
            }
        }
        self.check_survivable()
    }

    fn check_survivable(&self) -> io::Result<()> {
        let members = self.members.read();
        let down: Vec<String> = members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.state == MemberState::Failed)
            .map(|(i, m)| format!("member {i} ({}): {}", m.spec, m.reason.as_deref().unwrap_or("failed")))
            .collect();
        if down.len() > 1 {
            return Err(io::Error::other(format!(
                "RAID-4 volume {}: {} members have failed ({}); RAID-4 survives one",
                self.name,
                down.len(),
                down.join("; ")
            )));
        }
        Ok(())
    }

    // ---- row reads and repair ----

    /// Reads `rows` consecutive rows of every alive member in `members`, starting at `row`:
    /// one buffer per member (`None` where the member is not alive for the first row).
    /// A member whose read fails is failed, and the error returned, for the caller to retry.
    pub(super) fn read_rows(
        &self,
        view: &View,
        row: u64,
        rows: u64,
        members: impl Iterator<Item = usize>,
    ) -> Result<Vec<(usize, Vec<u8>)>, Retry> {
        let mut out = Vec::new();
        for m in members {
            if !view.alive(m, row) {
                continue;
            }
            let mut buf = vec![0u8; crate::usize_of(rows * B)];
            if let Err(e) = view.dev(m).read_at(&mut buf, self.geo.data_offset() + row * B) {
                self.fail_member(m, &e);
                return Err(Retry);
            }
            out.push((m, buf));
        }
        Ok(out)
    }

    /// Reads one row whole, checks every block, and rebuilds what is missing or bad from
    /// the rest (rewriting a bad block in place). Returns every member's block. The caller
    /// holds the row's stripe lock.
    pub(super) fn verified_row(
        &self,
        view: &View,
        row: u64,
        scrub: Option<&mut super::maintain::ScrubReport>,
    ) -> Result<Vec<Vec<u8>>, RowError> {
        let n = self.geo.members();
        let got = self.read_rows(view, row, 1, 0..n).map_err(|Retry| RowError::Retry)?;
        let mut blocks: Vec<Option<Vec<u8>>> = vec![None; n];
        for (m, b) in got {
            blocks[m] = Some(b);
        }
        let missing: Vec<usize> = (0..n).filter(|&m| blocks[m].is_none()).collect();
        let bad: Vec<usize> = (0..n)
            .filter(|&m| blocks[m].as_ref().is_some_and(|b| crate::checksum::crc32c(b) != self.csum(m, row)))
            .collect();
        let mut scrub = scrub;
        if !bad.is_empty() {
            self.counters.checksum_errors.fetch_add(bad.len() as u64, Ordering::Relaxed);
            if let Some(s) = scrub.as_deref_mut() {
                s.checksum_errors += bad.len() as u64;
            }
        }
        let redo = self.redo.load(Ordering::Relaxed);
        if missing.is_empty() && (bad.len() == 1 || (redo && !bad.is_empty())) && row_xor_is_zero(&blocks) {
            // Data and parity agree: the checksum is what is wrong (a corrupt checksum
            // entry; or, in a redo, checksums a crash kept from being written). Two bad
            // blocks in a row whose XOR still holds are not trusted outside a redo: two
            // equal corruptions cancel out in parity.
            let fixes: Vec<(usize, u64, u32)> =
                bad.iter().map(|&m| (m, row, crate::checksum::crc32c(blocks[m].as_ref().expect("present")))).collect();
            self.set_csums(&fixes);
            self.counters.checksums_corrected.fetch_add(fixes.len() as u64, Ordering::Relaxed);
            if let Some(s) = scrub.as_deref_mut() {
                s.checksums_corrected += fixes.len() as u64;
            }
            return Ok(blocks.into_iter().map(|b| b.expect("present")).collect());
        }
        if let Some(s) = scrub.as_deref_mut() {
            if missing.is_empty() && bad.is_empty() && !row_xor_is_zero(&blocks) {
                // Every block matches its checksum, yet parity disagrees: parity was
                // written from other data than the checksums saw. Data wins (it is what
                // the checksums vouch for); parity is recomputed.
                s.parity_mismatches += 1;
                let p = self.geo.parity_member();
                let mut parity = vec![0u8; BLOCK_BYTES];
                let srcs: Vec<&[u8]> = (0..p).map(|m| blocks[m].as_deref().expect("present")).collect();
                xor::xor_gen(&srcs, &mut parity);
                self.rewrite_block(view, p, row, &parity).map_err(|Retry| RowError::Retry)?;
                s.blocks_repaired += 1;
                blocks[p] = Some(parity);
            }
        }
        let lost: Vec<usize> = missing.iter().chain(&bad).copied().collect();
        match lost.as_slice() {
            [] => Ok(blocks.into_iter().map(|b| b.expect("present")).collect()),
            [one] => {
                let one = *one;
                let mut rebuilt = vec![0u8; BLOCK_BYTES];
                let srcs: Vec<&[u8]> =
                    (0..n).filter(|&m| m != one).map(|m| blocks[m].as_deref().expect("present")).collect();
                xor::xor_gen(&srcs, &mut rebuilt);
                if missing.contains(&one) {
                    self.counters.degraded_reads.fetch_add(1, Ordering::Relaxed);
                    blocks[one] = Some(rebuilt);
                } else if crate::checksum::crc32c(&rebuilt) == self.csum(one, row) {
                    self.rewrite_block(view, one, row, &rebuilt).map_err(|Retry| RowError::Retry)?;
                    self.counters.blocks_repaired.fetch_add(1, Ordering::Relaxed);
                    if let Some(s) = scrub.as_deref_mut() {
                        s.blocks_repaired += 1;
                    }
                    blocks[one] = Some(rebuilt);
                } else if self.redo.load(Ordering::Relaxed) {
                    // A crash tore this row: the redo overwrites what it needs.
                    self.counters.redo_unverified.fetch_add(1, Ordering::Relaxed);
                } else {
                    return Err(self.unrecoverable(row, &lost, &missing, scrub));
                }
                Ok(blocks.into_iter().map(|b| b.expect("present")).collect())
            }
            _ => {
                if missing.is_empty() && self.redo.load(Ordering::Relaxed) {
                    self.counters.redo_unverified.fetch_add(bad.len() as u64, Ordering::Relaxed);
                    return Ok(blocks.into_iter().map(|b| b.expect("present")).collect());
                }
                Err(self.unrecoverable(row, &lost, &missing, scrub))
            }
        }
    }

    fn unrecoverable(
        &self,
        row: u64,
        lost: &[usize],
        missing: &[usize],
        scrub: Option<&mut super::maintain::ScrubReport>,
    ) -> RowError {
        self.counters.unrecoverable.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = scrub {
            s.unrecoverable += 1;
        }
        let what: Vec<String> = lost
            .iter()
            .map(|m| format!("member {m} {}", if missing.contains(m) { "missing" } else { "fails its checksum" }))
            .collect();
        RowError::Lost(io::Error::other(format!(
            "RAID-4 volume {}: row {row} (stripe {}) cannot be read: {}{}",
            self.name,
            self.geo.stripe_of_row(row),
            what.join(", "),
            if lost.len() > 1 {
                "; RAID-4 rebuilds one block per row"
            } else {
                ", and its rebuild from parity fails it too"
            }
        )))
    }

    /// Rewrites one block (repaired) and its checksum.
    fn rewrite_block(&self, view: &View, member: usize, row: u64, data: &[u8]) -> Result<(), Retry> {
        if self.begin_write().is_err() {
            return Err(Retry);
        }
        let r = view.dev(member).write_at(data, self.geo.data_offset() + row * B);
        self.end_write();
        if let Err(e) = r {
            self.fail_member(member, &e);
            return Err(Retry);
        }
        self.set_csums(&[(member, row, crate::checksum::crc32c(data))]);
        Ok(())
    }

    // ---- reads ----

    fn read_blocks(&self, buf: &mut [u8], first_vbn: u64) -> io::Result<()> {
        let nblocks = buf.len() as u64 / B;
        let rows_touched = (first_vbn..first_vbn + nblocks).map(|v| self.geo.place(v).row);
        let _locks = self.lock_rows(rows_touched);
        for attempt in 0..=self.geo.members() {
            match self.read_blocks_locked(buf, first_vbn) {
                Ok(()) => return Ok(()),
                Err(RowError::Retry) if attempt < self.geo.members() => continue,
                Err(RowError::Retry) => return self.check_survivable().and(Err(io::Error::other("member failures"))),
                Err(RowError::Lost(e)) => return Err(e),
            }
        }
        unreachable!("the loop returns")
    }

    fn read_blocks_locked(&self, buf: &mut [u8], first_vbn: u64) -> Result<(), RowError> {
        self.check_survivable().map_err(RowError::Lost)?;
        let view = self.view();
        let nblocks = buf.len() as u64 / B;
        let unit = self.geo.unit_blocks();
        // Runs of blocks on one member (a stripe unit at most), read in one op each.
        let mut reads: BTreeMap<usize, Vec<(u64, usize, usize)>> = BTreeMap::new(); // member -> (row, at, blocks)
        let mut rebuild: Vec<(u64, usize, u64)> = Vec::new(); // (vbn, member, row)
        let mut v = first_vbn;
        while v < first_vbn + nblocks {
            let p = self.geo.place(v);
            let run = (unit - p.row % unit).min(first_vbn + nblocks - v);
            let at = crate::usize_of((v - first_vbn) * B);
            // A run is alive as a whole or not: the rebuild cursor moves by whole stripes.
            if view.alive(p.member, p.row) {
                reads.entry(p.member).or_default().push((p.row, at, crate::usize_of(run)));
            } else {
                rebuild.extend((0..run).map(|i| (v + i, p.member, p.row + i)));
            }
            v += run;
        }
        for (m, runs) in &reads {
            let mut rest: &mut [u8] = buf;
            let mut consumed = 0usize;
            let mut ops = Vec::with_capacity(runs.len());
            for &(row, at, n) in runs {
                let tail = std::mem::take(&mut rest);
                let (_, tail) = tail.split_at_mut(at - consumed);
                let (mine, tail) = tail.split_at_mut(n * BLOCK_BYTES);
                consumed = at + n * BLOCK_BYTES;
                rest = tail;
                ops.push(ReadOp { offset: self.geo.data_offset() + row * B, buf: mine });
            }
            if let Err(e) = view.dev(*m).read_many(&mut ops) {
                self.fail_member(*m, &e);
                return Err(RowError::Retry);
            }
        }
        // Check every block read; rebuild the bad ones and those of dead members.
        for (m, runs) in &reads {
            for &(row, at, n) in runs {
                for i in 0..n {
                    let b = &buf[at + i * BLOCK_BYTES..at + (i + 1) * BLOCK_BYTES];
                    if crate::checksum::crc32c(b) != self.csum(*m, row + i as u64) {
                        let vbn = first_vbn + (at / BLOCK_BYTES + i) as u64;
                        rebuild.push((vbn, *m, row + i as u64));
                    }
                }
            }
        }
        for (vbn, m, row) in rebuild {
            let blocks = self.verified_row(&view, row, None)?;
            let at = crate::usize_of((vbn - first_vbn) * B);
            buf[at..at + BLOCK_BYTES].copy_from_slice(&blocks[m]);
        }
        Ok(())
    }

    // ---- writes ----

    /// Writes block-aligned ops that do not overlap one another.
    fn write_aligned(&self, ops: &[WriteOp<'_>]) -> io::Result<()> {
        self.begin_write()?;
        let r = self.write_aligned_dirty(ops);
        self.end_write();
        r
    }

    fn write_aligned_dirty(&self, ops: &[WriteOp<'_>]) -> io::Result<()> {
        for attempt in 0..=self.geo.members() {
            let rows = ops.iter().flat_map(|op| {
                let first = op.offset / B;
                (first..first + op.buf.len() as u64 / B).map(|v| self.geo.place(v).row)
            });
            let locks = self.lock_rows(rows);
            let r = self.write_locked(ops);
            drop(locks);
            match r {
                Ok(()) => return Ok(()),
                Err(RowError::Retry) if attempt < self.geo.members() => continue,
                Err(RowError::Retry) => return self.check_survivable().and(Err(io::Error::other("member failures"))),
                Err(RowError::Lost(e)) => return Err(e),
            }
        }
        unreachable!("the loop returns")
    }

    fn write_locked(&self, ops: &[WriteOp<'_>]) -> Result<(), RowError> {
        self.check_survivable().map_err(RowError::Lost)?;
        let view = self.view();
        let g = self.geo;
        let n = g.data_disks as usize;
        let p = g.parity_member();
        let unit = g.unit_blocks();
        let redo = self.redo.load(Ordering::Relaxed);

        // The new data: per member, pieces (a stripe unit at most) to write as they are;
        // per row, the new block of each data member.
        let mut pieces: Vec<(usize, u64, &[u8])> = Vec::new();
        let mut rows: BTreeMap<u64, Vec<Option<&[u8]>>> = BTreeMap::new();
        for op in ops {
            let first = op.offset / B;
            let count = op.buf.len() as u64 / B;
            let mut v = first;
            while v < first + count {
                let pl = g.place(v);
                let run = (unit - pl.row % unit).min(first + count - v);
                let at = crate::usize_of((v - first) * B);
                let piece = &op.buf[at..at + crate::usize_of(run * B)];
                pieces.push((pl.member, pl.row, piece));
                for (i, block) in piece.chunks_exact(BLOCK_BYTES).enumerate() {
                    rows.entry(pl.row + i as u64).or_insert_with(|| vec![None; n])[pl.member] = Some(block);
                }
                v += run;
            }
        }

        // Plan each row, and what it needs read.
        #[derive(Clone, Copy, PartialEq)]
        enum Mode {
            Full,
            Rmw,
            Rcw,
            NoParity,
        }
        let mut plan: Vec<(u64, Mode)> = Vec::with_capacity(rows.len());
        // Per member, the rows to read, in increasing order (rows are planned in order).
        let mut need: Vec<Vec<u64>> = vec![Vec::new(); n + 1];
        for (&row, new) in &rows {
            let down: Vec<usize> = (0..=n).filter(|&m| !view.alive(m, row)).collect();
            if down.len() > 1 {
                return Err(RowError::Lost(io::Error::other(format!(
                    "RAID-4 volume {}: row {row} has {} members down ({down:?}); RAID-4 survives one",
                    self.name,
                    down.len()
                ))));
            }
            let touched = new.iter().filter(|b| b.is_some()).count();
            let down_data = down.first().copied().filter(|&m| m < n);
            let mode = if down.first() == Some(&p) {
                Mode::NoParity
            } else if touched == n {
                Mode::Full
            } else if let Some(d) = down_data {
                if new[d].is_some() {
                    Mode::Rcw
                } else {
                    Mode::Rmw
                }
            } else if redo || n - touched <= touched + 1 {
                Mode::Rcw
            } else {
                Mode::Rmw
            };
            match mode {
                Mode::Rmw => {
                    for m in (0..n).filter(|&m| new[m].is_some()) {
                        need[m].push(row);
                    }
                    need[p].push(row);
                }
                Mode::Rcw => {
                    for m in (0..n).filter(|&m| new[m].is_none()) {
                        need[m].push(row);
                    }
                }
                Mode::Full | Mode::NoParity => {}
            }
            plan.push((row, mode));
        }

        // Read what the plan needs: per member one buffer, its runs of rows back to back,
        // one op per run; the old blocks are views into those buffers (no copy per block).
        /// One member's reads: its runs of rows (first, count) and their blocks back to back.
        struct MemberReads {
            member: usize,
            runs: Vec<(u64, u64)>,
            buf: Vec<u8>,
        }
        let mut reads: Vec<MemberReads> = Vec::new();
        for (m, want) in need.iter().enumerate().filter(|(_, w)| !w.is_empty()) {
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for &r in want {
                match runs.last_mut() {
                    Some((s, len)) if *s + *len == r => *len += 1,
                    _ => runs.push((r, 1)),
                }
            }
            let mut buf = scratch::take(want.len() * BLOCK_BYTES);
            let mut rops: Vec<ReadOp<'_>> = Vec::with_capacity(runs.len());
            let mut rest = &mut buf[..];
            for &(s, len) in &runs {
                let (head, tail) = rest.split_at_mut(crate::usize_of(len * B));
                rops.push(ReadOp { offset: g.data_offset() + s * B, buf: head });
                rest = tail;
            }
            if let Err(e) = view.dev(m).read_many(&mut rops) {
                self.fail_member(m, &e);
                return Err(RowError::Retry);
            }
            drop(rops);
            reads.push(MemberReads { member: m, runs, buf });
        }
        let mut old: HashMap<(usize, u64), Cow<'_, [u8]>> = HashMap::new();
        for r in &reads {
            let mut blocks = r.buf.chunks_exact(BLOCK_BYTES);
            for &(s, len) in &r.runs {
                for row in s..s + len {
                    old.insert((r.member, row), Cow::Borrowed(blocks.next().expect("a block per row read")));
                }
            }
        }
        // A row whose old blocks fail their checks gets its parity from its data
        // (reconstruct-write): what is overwritten does not matter, what stays must pass
        // its check, or be rebuilt from the row.
        let mut verified: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
        for (row, mode) in &mut plan {
            let bad =
                (0..=n).any(|m| old.get(&(m, *row)).is_some_and(|b| crate::checksum::crc32c(b) != self.csum(m, *row)));
            if !bad {
                continue;
            }
            let new = &rows[row];
            if *mode == Mode::Rmw {
                *mode = Mode::Rcw;
                let untouched = (0..n).filter(|&m| new[m].is_none() && !old.contains_key(&(m, *row)));
                for (m, b) in self.read_rows(&view, *row, 1, untouched).map_err(|Retry| RowError::Retry)? {
                    old.insert((m, *row), Cow::Owned(b));
                }
            }
            let stays_good = (0..n)
                .filter(|&m| new[m].is_none())
                .all(|m| old.get(&(m, *row)).is_some_and(|b| crate::checksum::crc32c(b) == self.csum(m, *row)));
            if !stays_good {
                verified.insert(*row, self.verified_row(&view, *row, None)?);
            }
        }

        // Parity, into one buffer in row order.
        let parity_rows: Vec<(u64, Mode)> = plan.iter().copied().filter(|(_, m)| *m != Mode::NoParity).collect();
        let mut parity = scratch::take(parity_rows.len() * BLOCK_BYTES);
        for ((row, mode), out) in parity_rows.iter().zip(parity.chunks_exact_mut(BLOCK_BYTES)) {
            let new = &rows[row];
            let mut srcs: Vec<&[u8]> = Vec::with_capacity(2 * n + 1);
            match mode {
                Mode::Full => srcs.extend(new.iter().map(|b| b.expect("full row"))),
                Mode::Rmw => {
                    srcs.push(&old[&(p, *row)]);
                    for m in (0..n).filter(|&m| new[m].is_some()) {
                        srcs.push(&old[&(m, *row)]);
                        srcs.push(new[m].expect("touched"));
                    }
                }
                Mode::Rcw => {
                    for m in 0..n {
                        srcs.push(match (new[m], verified.get(row)) {
                            (Some(b), _) => b,
                            (None, Some(v)) => &v[m],
                            (None, None) => &old[&(m, *row)],
                        });
                    }
                }
                Mode::NoParity => unreachable!("filtered out"),
            }
            xor::xor_gen(&srcs, out);
        }

        // Checksums of everything written.
        let mut crcs: Vec<(usize, u64, u32)> = Vec::new();
        for (&row, new) in &rows {
            for (m, b) in new.iter().enumerate() {
                if let Some(b) = b {
                    crcs.push((m, row, crate::checksum::crc32c(b)));
                }
            }
        }
        for ((row, _), b) in parity_rows.iter().zip(parity.chunks_exact(BLOCK_BYTES)) {
            crcs.push((p, *row, crate::checksum::crc32c(b)));
        }

        // Write: each member's ops in one batch, the members side by side.
        let mut per_member: Vec<Vec<WriteOp<'_>>> = vec![Vec::new(); n + 1];
        for &(m, row, piece) in &pieces {
            if view.alive(m, row) {
                per_member[m].push(WriteOp { offset: g.data_offset() + row * B, buf: piece });
            }
        }
        let mut i = 0;
        while i < parity_rows.len() {
            let mut j = i + 1;
            while j < parity_rows.len() && parity_rows[j].0 == parity_rows[j - 1].0 + 1 {
                j += 1;
            }
            if view.alive(p, parity_rows[i].0) {
                per_member[p].push(WriteOp {
                    offset: g.data_offset() + parity_rows[i].0 * B,
                    buf: &parity[i * BLOCK_BYTES..j * BLOCK_BYTES],
                });
            }
            i = j;
        }
        let bytes: usize = per_member.iter().flatten().map(|op| op.buf.len()).sum();
        let results: Vec<(usize, io::Result<()>)> = if bytes >= (512 << 10) && !self.serial_io.load(Ordering::Relaxed) {
            std::thread::scope(|s| {
                let handles: Vec<_> = per_member
                    .iter()
                    .enumerate()
                    .filter(|(_, ops)| !ops.is_empty())
                    .map(|(m, ops)| {
                        let dev = view.dev(m).clone();
                        (m, s.spawn(move || dev.write_many(ops)))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|(m, h)| (m, h.join().unwrap_or_else(|_| Err(io::Error::other("member writer panicked")))))
                    .collect()
            })
        } else {
            per_member
                .iter()
                .enumerate()
                .filter(|(_, ops)| !ops.is_empty())
                .map(|(m, ops)| (m, view.dev(m).write_many(ops)))
                .collect()
        };
        self.set_csums(&crcs);
        for (m, r) in results {
            if let Err(e) = r {
                // The member's new data is in parity (or the member is parity): the write
                // stands, degraded, unless this was the second failure.
                self.fail_member(m, &e);
            }
        }
        drop((per_member, old));
        for r in reads {
            scratch::give(r.buf);
        }
        scratch::give(parity);
        self.check_survivable().map_err(RowError::Lost)
    }

    /// Splits `ops` into aligned, non-overlapping batches of bounded size and writes them.
    fn write_ops(&self, ops: &[WriteOp<'_>]) -> io::Result<()> {
        let size = self.geo.volume_bytes;
        for op in ops {
            check_range(size, op.offset, op.buf.len() as u64)?;
        }
        let aligned = ops.iter().all(|op| op.offset.is_multiple_of(B) && (op.buf.len() as u64).is_multiple_of(B));
        if !aligned {
            // Sub-block writes: read, patch and write the covering blocks, op by op.
            for op in ops {
                let start = op.offset / B * B;
                let end = (op.offset + op.buf.len() as u64).div_ceil(B) * B;
                let mut block = vec![0u8; crate::usize_of(end - start)];
                self.read_blocks(&mut block, start / B)?;
                let at = crate::usize_of(op.offset - start);
                block[at..at + op.buf.len()].copy_from_slice(op.buf);
                self.write_aligned(&[WriteOp { offset: start, buf: &block }])?;
            }
            return Ok(());
        }
        // Overlapping ops are written one after the other, so the later one wins.
        let mut spans: Vec<(u64, u64)> = ops.iter().map(|op| (op.offset, op.offset + op.buf.len() as u64)).collect();
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            return ops.iter().try_for_each(|op| self.write_ops(std::slice::from_ref(op)));
        }
        // Batches hold whole stripes (a full stripe's parity needs no reads), about
        // BATCH_BYTES_MAX each: every op is cut at stripe boundaries, and a batch is closed
        // only where the next piece starts another stripe.
        let stripe_bytes = self.geo.stripe_data_blocks() * B;
        let target = BATCH_BYTES_MAX.max(stripe_bytes);
        let mut batch: Vec<WriteOp<'_>> = Vec::new();
        let mut batch_bytes = 0u64;
        let mut last_stripe: Option<u64> = None;
        for op in ops {
            let mut at = 0usize;
            while at < op.buf.len() {
                let offset = op.offset + at as u64;
                let stripe = offset / stripe_bytes;
                let piece = crate::usize_of(((stripe + 1) * stripe_bytes - offset).min((op.buf.len() - at) as u64));
                if batch_bytes + piece as u64 > target && last_stripe != Some(stripe) && !batch.is_empty() {
                    self.write_aligned(&batch)?;
                    batch.clear();
                    batch_bytes = 0;
                }
                batch.push(WriteOp { offset, buf: &op.buf[at..at + piece] });
                batch_bytes += piece as u64;
                last_stripe = Some(stripe);
                at += piece;
            }
        }
        if !batch.is_empty() {
            self.write_aligned(&batch)?;
        }
        Ok(())
    }

    fn read_ops(&self, ops: &mut [ReadOp<'_>]) -> io::Result<()> {
        for op in ops.iter_mut() {
            check_range(self.geo.volume_bytes, op.offset, op.buf.len() as u64)?;
            if op.offset.is_multiple_of(B) && (op.buf.len() as u64).is_multiple_of(B) {
                for (i, chunk) in op.buf.chunks_mut(crate::usize_of(BATCH_BYTES_MAX)).enumerate() {
                    self.read_blocks(chunk, (op.offset + i as u64 * BATCH_BYTES_MAX) / B)?;
                }
            } else {
                let start = op.offset / B * B;
                let end = (op.offset + op.buf.len() as u64).div_ceil(B) * B;
                let mut block = vec![0u8; crate::usize_of(end - start)];
                self.read_blocks(&mut block, start / B)?;
                let at = crate::usize_of(op.offset - start);
                let len = op.buf.len();
                op.buf.copy_from_slice(&block[at..at + len]);
            }
        }
        Ok(())
    }
}

/// A member's device and superblock, or why it has none.
type Found = Result<(Arc<dyn BlockDevice>, Superblock), String>;

/// The caller should take a fresh view (a member failed) and try again.
#[derive(Debug)]
pub(super) struct Retry;

#[derive(Debug)]
pub(super) enum RowError {
    Retry,
    Lost(io::Error),
}

fn row_xor_is_zero(blocks: &[Option<Vec<u8>>]) -> bool {
    let srcs: Vec<&[u8]> = blocks.iter().map(|b| b.as_deref().expect("present")).collect();
    let mut acc = vec![0u8; BLOCK_BYTES];
    xor::xor_gen(&srcs, &mut acc);
    acc.iter().all(|&b| b == 0)
}

impl BlockDevice for Raid4 {
    fn size(&self) -> u64 {
        self.geo.volume_bytes
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_ops(&mut [ReadOp { offset, buf }])
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_ops(&[WriteOp { offset, buf }])
    }
    fn write_many(&self, ops: &[WriteOp<'_>]) -> io::Result<()> {
        self.write_ops(ops)
    }
    fn read_many(&self, ops: &mut [ReadOp<'_>]) -> io::Result<()> {
        self.read_ops(ops)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        static ZEROES: [u8; 16 * BLOCK_BYTES] = [0; 16 * BLOCK_BYTES];
        let mut ops = Vec::new();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROES.len() as u64);
            ops.push(WriteOp { offset: offset + done, buf: &ZEROES[..crate::usize_of(n)] });
            done += n;
        }
        self.write_ops(&ops)
    }
    /// Writes the checksum blocks, flushes every member (side by side), then marks the
    /// volume clean where no write came in meanwhile.
    fn flush(&self) -> io::Result<()> {
        let started = self.meta.lock().writes_started;
        self.flush_members()?;
        self.mark_clean(started)
    }
    fn set_redo(&self, on: bool) {
        self.redo.store(on, Ordering::SeqCst);
    }
}

impl Raid4 {
    /// The checksum blocks, then every member's flush.
    fn flush_members(&self) -> io::Result<()> {
        self.write_csums()?;
        let view = self.view();
        // Members flushed side by side, each on a thread, where a flush waits on a device;
        // where flushes reach the kernel only (`file:` NVRAM), they return at once, and a
        // thread each would cost more than they do.
        if self.serial_io.load(Ordering::Relaxed) || crate::storage::flush_reach() == crate::storage::FlushReach::Kernel
        {
            for (m, d) in view.devs.iter().enumerate() {
                if let Some(Err(e)) = d.as_ref().map(|d| d.flush()) {
                    self.fail_member(m, &e);
                }
            }
            return self.check_survivable();
        }
        let results: Vec<(usize, io::Result<()>)> = std::thread::scope(|s| {
            let handles: Vec<_> = view
                .devs
                .iter()
                .enumerate()
                .filter_map(|(m, d)| d.clone().map(|d| (m, d)))
                .map(|(m, d)| (m, s.spawn(move || d.flush())))
                .collect();
            handles
                .into_iter()
                .map(|(m, h)| (m, h.join().unwrap_or_else(|_| Err(io::Error::other("flush panicked")))))
                .collect()
        });
        for (m, r) in results {
            if let Err(e) = r {
                self.fail_member(m, &e);
            }
        }
        self.check_survivable()
    }
}
