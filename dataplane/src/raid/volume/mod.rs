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
//!
//! Files: `open` (creation and assembly), `csums` (block checksums), `read` (the checked
//! read path and repair), `write` (row planning, parity, member writes); the volume's
//! state, member failure and superblocks here.

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

mod csums;
mod grow;
mod open;
mod read;
mod write;

use csums::new_csums;

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
    /// The geometry but for its size: `volume_bytes` holds that (it grows, see
    /// `Raid4::grow`).
    layout: Geometry,
    volume_bytes: AtomicU64,
    /// The size the members have room for, checksums written: `Raid4::prepare_grow`
    /// made it ready, `Raid4::commit_grow` makes it the volume's.
    prepared_bytes: Mutex<u64>,
    /// Held by each step of a grow.
    grow_round: Mutex<()>,
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
    /// The volume is being copied over whole (see [`BlockDevice::set_copy_over`]).
    copy_over: AtomicBool,
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
        f.debug_struct("Raid4").field("name", &self.name).field("geometry", &self.geo()).finish_non_exhaustive()
    }
}

impl Raid4 {
    /// Issues member I/O one member after another on the calling thread (see the field).
    pub fn set_serial_io(&self, on: bool) {
        self.serial_io.store(on, Ordering::SeqCst);
    }

    pub fn geometry(&self) -> Geometry {
        self.geo()
    }

    /// The geometry at the volume's current size.
    fn geo(&self) -> Geometry {
        Geometry { volume_bytes: self.volume_bytes.load(Ordering::Acquire), ..self.layout }
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
        let p = self.geo().parity_member();
        RaidStatus {
            level: "raid4",
            data_disks: self.geo().data_disks,
            stripe_unit: self.geo().stripe_unit,
            volume_bytes: self.geo().volume_bytes,
            member_bytes: self.geo().member_bytes(),
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

    /// Locks the stripes of `rows` (in lock order, so that two batches never deadlock).
    fn lock_rows(&self, rows: impl Iterator<Item = u64>) -> Vec<MutexGuard<'_, ()>> {
        let idx: BTreeSet<usize> =
            rows.map(|r| crate::usize_of(self.geo().stripe_of_row(r) % STRIPE_LOCKS as u64)).collect();
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
            tracing::error!(
                "RAID-4 volume {}: member {member} ({}) failed: {why}; running degraded",
                self.name,
                m.spec
            );
            m.state = MemberState::Failed;
            m.reason = Some(format!("I/O error: {why}"));
            m.dev = None;
        }
        self.meta.lock().events += 1;
        if let Err(e) = self.write_superblocks() {
            tracing::error!("RAID-4 volume {}: recording the failure of member {member}: {e}", self.name);
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
                geometry: self.geo(),
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
}

/// The caller should take a fresh view (a member failed) and try again.
#[derive(Debug)]
pub(super) struct Retry;

#[derive(Debug)]
pub(super) enum RowError {
    Retry,
    Lost(io::Error),
}

impl BlockDevice for Raid4 {
    fn size(&self) -> u64 {
        self.geo().volume_bytes
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
    fn grow(&self, size: u64) -> io::Result<()> {
        self.commit_grow(size)
    }
    fn set_copy_over(&self, on: bool) {
        self.copy_over.store(on, Ordering::SeqCst);
    }
    fn set_redo(&self, on: bool) {
        self.redo.store(on, Ordering::SeqCst);
    }
    /// `false` where every data member's piece of the range is a hole (a row on a member
    /// that is down or being rebuilt may hold data through parity: `true`).
    fn may_hold_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        check_range(self.geo().volume_bytes, offset, len)?;
        let (g, view) = (self.geo(), self.view());
        let unit = g.unit_blocks();
        let end = (offset + len).div_ceil(B);
        let mut v = offset / B;
        while v < end {
            let pl = g.place(v);
            let run = (unit - pl.row % unit).min(end - v);
            if !view.alive(pl.member, pl.row)
                || view.rebuilding_member() == Some(pl.member)
                || view.dev(pl.member).may_hold_data(g.data_offset() + pl.row * B, run * B)?
            {
                return Ok(true);
            }
            v += run;
        }
        Ok(false)
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
