//! Scrub and rebuild: the long operations over a whole RAID-4 volume.
//!
//! Both walk the volume a stripe at a time under that stripe's lock, so client I/O goes on
//! beside them, and both publish their progress. A rebuild reconstructs the new member's
//! blocks from the other members; rows below its cursor are in sync and take writes like
//! any member, rows above are treated as missing. The cursor is written to the
//! superblocks every few seconds (after the checksums of the rows below it), so a rebuild
//! interrupted by a restart resumes where it was.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::superblock::MemberState;
use super::volume::{Raid4, RowError};
use super::xor;
use crate::format::BLOCK_BYTES;
use crate::storage::{BlockDevice, DiskSpec};

const B: u64 = BLOCK_BYTES as u64;
/// How often a rebuild records its cursor.
const CURSOR_SAVE_EVERY: Duration = Duration::from_secs(2);

/// A running scrub or rebuild.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    pub operation: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<usize>,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub started_unix_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_bytes_per_s: Option<u64>,
}

/// What a scrub found and did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScrubReport {
    pub started_unix_ms: u64,
    pub finished_unix_ms: u64,
    pub rows_checked: u64,
    pub blocks_checked: u64,
    /// Blocks that failed their checksum.
    pub checksum_errors: u64,
    /// Checksum entries corrected (data and parity agreed; the entry was stale).
    pub checksums_corrected: u64,
    /// Rows whose blocks all passed their checksums but whose parity disagreed.
    pub parity_mismatches: u64,
    /// Blocks rewritten: rebuilt data, or recomputed parity.
    pub blocks_repaired: u64,
    /// Rows that could not be repaired.
    pub unrecoverable: u64,
    /// Rows checked with a member missing (nothing to compare parity with).
    pub rows_degraded: u64,
    /// `clean`, `repaired`, `errors` (something unrecoverable) or `aborted: WHY`.
    pub result: String,
}

pub(crate) struct MaintState {
    pub(super) rebuild_cursor: AtomicU64,
    running: Mutex<Option<Progress>>,
    last_scrub: Mutex<Option<ScrubReport>>,
}

impl MaintState {
    pub(super) fn new(cursor: u64) -> Self {
        Self { rebuild_cursor: AtomicU64::new(cursor), running: Mutex::new(None), last_scrub: Mutex::new(None) }
    }
    pub(super) fn rebuild_progress(&self) -> Option<Progress> {
        self.running.lock().clone().filter(|p| p.operation == "rebuild")
    }
    pub(super) fn scrub_progress(&self) -> Option<Progress> {
        self.running.lock().clone().filter(|p| p.operation == "scrub")
    }
    pub(super) fn last_scrub(&self) -> Option<ScrubReport> {
        self.last_scrub.lock().clone()
    }
    fn begin(&self, p: Progress) -> io::Result<Busy<'_>> {
        let mut running = self.running.lock();
        if let Some(r) = running.as_ref() {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!("a {} is already running ({} of {} bytes)", r.operation, r.done_bytes, r.total_bytes),
            ));
        }
        *running = Some(p);
        Ok(Busy(self))
    }
    fn advance(&self, done: u64) {
        if let Some(p) = self.running.lock().as_mut() {
            p.done_bytes = done;
        }
    }
}

/// Clears the running operation when dropped.
struct Busy<'a>(&'a MaintState);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        *self.0.running.lock() = None;
    }
}

/// Keeps an operation at or below `rate` bytes per second.
struct Pace {
    rate: Option<u64>,
    started: Instant,
}

impl Pace {
    fn wait(&self, done: u64) {
        if let Some(rate) = self.rate.filter(|&r| r > 0) {
            #[allow(clippy::cast_precision_loss)]
            let due = Duration::from_secs_f64(done as f64 / rate as f64);
            let elapsed = self.started.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
    }
}

impl Raid4 {
    /// Checks every block's checksum and every row's parity, and repairs what it can.
    /// `rate` bounds the bytes read per second. Client I/O goes on beside it.
    pub fn scrub(&self, rate: Option<u64>) -> io::Result<ScrubReport> {
        let g = self.geometry();
        let unit = g.unit_blocks();
        let total = g.rows() * g.members() as u64 * B;
        let _busy = self.maint.begin(Progress {
            operation: "scrub".into(),
            member: None,
            done_bytes: 0,
            total_bytes: total,
            started_unix_ms: crate::clock::unix_ms(),
            rate_bytes_per_s: rate,
        })?;
        let mut report = ScrubReport { started_unix_ms: crate::clock::unix_ms(), ..ScrubReport::default() };
        let pace = Pace { rate, started: Instant::now() };
        let mut aborted = None;
        'stripes: for stripe in 0..g.stripes() {
            let _lock = self.lock_stripe(stripe);
            let first = stripe * unit;
            let mut tries = 0;
            let got = loop {
                let view = self.view();
                match self.read_rows(&view, first, unit, 0..g.members()) {
                    Ok(got) => break got,
                    Err(_) if tries < g.members() => tries += 1,
                    Err(_) => {
                        aborted = Some("members kept failing".to_string());
                        break 'stripes;
                    }
                }
            };
            let degraded = got.len() < g.members();
            for r in 0..unit {
                let row = first + r;
                report.rows_checked += 1;
                report.blocks_checked += got.len() as u64;
                let at = crate::usize_of(r * B);
                let blocks: Vec<(usize, &[u8])> = got.iter().map(|(m, b)| (*m, &b[at..at + BLOCK_BYTES])).collect();
                let crcs_ok = blocks.iter().all(|(m, b)| crate::checksum::crc32c(b) == self.csum_of(*m, row));
                let parity_ok = degraded || {
                    let srcs: Vec<&[u8]> = blocks.iter().map(|(_, b)| *b).collect();
                    let mut acc = [0u8; BLOCK_BYTES];
                    xor::xor_gen(&srcs, &mut acc);
                    acc.iter().all(|&x| x == 0)
                };
                if degraded {
                    report.rows_degraded += 1;
                }
                if crcs_ok && parity_ok {
                    continue;
                }
                let mut tries = 0;
                loop {
                    let view = self.view();
                    match self.verified_row(&view, row, Some(&mut report)) {
                        Ok(_) => break,
                        Err(RowError::Lost(e)) => {
                            tracing::warn!("scrub of {}: {e}", self.name());
                            break;
                        }
                        Err(RowError::Retry) if tries < g.members() => tries += 1,
                        Err(RowError::Retry) => {
                            aborted = Some("members kept failing".to_string());
                            break 'stripes;
                        }
                    }
                }
            }
            let done = (stripe + 1) * unit * g.members() as u64 * B;
            self.maint.advance(done);
            drop(_lock);
            pace.wait(done);
        }
        self.flush()?;
        report.finished_unix_ms = crate::clock::unix_ms();
        report.result = match aborted {
            Some(why) => format!("aborted: {why}"),
            None if report.unrecoverable > 0 => "errors".into(),
            None if report.blocks_repaired + report.checksums_corrected > 0 => "repaired".into(),
            None => "clean".into(),
        };
        *self.maint.last_scrub.lock() = Some(report.clone());
        Ok(report)
    }

    /// The member index `which` names: an index, or a member's disk path or spec.
    pub fn member_index(&self, which: &str) -> Option<usize> {
        let disks = self.disks();
        which.parse::<usize>().ok().filter(|&i| i < disks.len()).or_else(|| {
            disks.iter().position(|d| d.to_string() == which || d.path.as_os_str() == std::ffi::OsStr::new(which))
        })
    }

    fn check_replace(&self, member: usize, new: &DiskSpec) -> io::Result<()> {
        let g = self.geometry();
        if member >= g.members() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("no member {member}")));
        }
        if self.maint.running.lock().is_some() {
            return Err(io::Error::new(io::ErrorKind::ResourceBusy, "a scrub or rebuild is running"));
        }
        let others_down =
            (0..g.members()).filter(|&m| m != member && self.member_state(m) != MemberState::InSync).count();
        if others_down > 0 {
            return Err(io::Error::other(
                "another member is not in sync; replacing this one would leave nothing to rebuild from",
            ));
        }
        if self.disks().iter().enumerate().any(|(i, d)| i != member && d.path == new.path) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{new} is already a member")));
        }
        Ok(())
    }

    /// Puts `new` in place of member `member` (failed, or in sync while every other member
    /// is): the new disk is written a superblock and starts rebuilding. Call
    /// [`Raid4::rebuild`] next.
    pub fn replace_member(&self, member: usize, new: &DiskSpec) -> io::Result<()> {
        self.check_replace(member, new)?;
        let g = self.geometry();
        let need = g.member_bytes();
        let device_node = {
            use std::os::unix::fs::FileTypeExt;
            std::fs::metadata(&new.path)
                .is_ok_and(|m| m.file_type().is_block_device() || m.file_type().is_char_device())
        };
        if !device_node && std::fs::metadata(&new.path).is_ok_and(|m| m.len() > 0) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{new} exists and is not empty; give a new file or a device"),
            ));
        }
        let dev: Arc<dyn BlockDevice> = new.open(if device_node { None } else { Some(need) })?;
        if dev.size() < need {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{new} holds {} bytes, a member needs {need}", dev.size()),
            ));
        }
        self.install_replacement(member, new, dev)
    }

    /// As [`Raid4::replace_member`], with the new disk already open (its contents are
    /// written over whole).
    pub fn replace_member_device(&self, member: usize, new: &DiskSpec, dev: Arc<dyn BlockDevice>) -> io::Result<()> {
        self.check_replace(member, new)?;
        let need = self.geometry().member_bytes();
        if dev.size() < need {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{new} holds {} bytes, a member needs {need}", dev.size()),
            ));
        }
        self.install_replacement(member, new, dev)
    }

    fn install_replacement(&self, member: usize, new: &DiskSpec, dev: Arc<dyn BlockDevice>) -> io::Result<()> {
        tracing::info!(
            "RAID-4 volume {}: member {member}: {} replaced by {new}",
            self.name(),
            self.member_spec(member)
        );
        self.install_member(member, new.clone(), dev);
        self.set_rebuild_cursor_persisted(0);
        self.bump_events();
        self.write_superblocks()
    }

    /// Whether a member is being rebuilt (after `replace_member`, or found so at open).
    pub fn rebuilding_member(&self) -> Option<usize> {
        (0..self.geometry().members()).find(|&m| self.member_state(m) == MemberState::Rebuilding)
    }

    /// Rebuilds the rebuilding member from the others, resuming at its cursor; `rate`
    /// bounds the bytes written per second. Returns once it is in sync.
    pub fn rebuild(&self, rate: Option<u64>) -> io::Result<()> {
        let g = self.geometry();
        let unit = g.unit_blocks();
        let Some(member) = self.rebuilding_member() else {
            return Err(io::Error::other("no member is being rebuilt"));
        };
        let start_row = self.maint.rebuild_cursor.load(Ordering::Acquire);
        let total = g.rows() * B;
        let _busy = self.maint.begin(Progress {
            operation: "rebuild".into(),
            member: Some(member),
            done_bytes: start_row * B,
            total_bytes: total,
            started_unix_ms: crate::clock::unix_ms(),
            rate_bytes_per_s: rate,
        })?;
        let pace = Pace { rate, started: Instant::now() };
        let mut saved = Instant::now();
        let started = Instant::now();
        for stripe in g.stripe_of_row(start_row)..g.stripes() {
            let lock = self.lock_stripe(stripe);
            let first = stripe * unit;
            let mut tries = 0;
            let (view, got) = loop {
                let view = self.view();
                if view.rebuilding_member() != Some(member) {
                    return Err(io::Error::other(format!("member {member} failed during its rebuild")));
                }
                match self.read_rows(&view, first, unit, (0..g.members()).filter(|&m| m != member)) {
                    Ok(got) if got.len() == g.members() - 1 => break (view, got),
                    Ok(_) => return Err(io::Error::other("another member failed; the rebuild cannot go on")),
                    Err(_) if tries < g.members() => tries += 1,
                    Err(_) => return Err(io::Error::other("members kept failing during the rebuild")),
                }
            };
            let mut out = vec![0u8; crate::usize_of(unit * B)];
            let mut crcs = Vec::with_capacity(crate::usize_of(unit));
            for r in 0..unit {
                let row = first + r;
                let at = crate::usize_of(r * B);
                let blocks: Vec<(usize, &[u8])> = got.iter().map(|(m, b)| (*m, &b[at..at + BLOCK_BYTES])).collect();
                let dst = &mut out[at..at + BLOCK_BYTES];
                if blocks.iter().all(|(m, b)| crate::checksum::crc32c(b) == self.csum_of(*m, row)) {
                    let srcs: Vec<&[u8]> = blocks.iter().map(|(_, b)| *b).collect();
                    xor::xor_gen(&srcs, dst);
                } else {
                    match self.verified_row(&view, row, None) {
                        Ok(all) => dst.copy_from_slice(&all[member]),
                        Err(RowError::Lost(e)) => return Err(e),
                        Err(RowError::Retry) => return Err(io::Error::other("a member failed during the rebuild")),
                    }
                }
                crcs.push((member, row, crate::checksum::crc32c(dst)));
            }
            let dev = view.devs_of(member);
            if let Err(e) = dev.write_at(&out, g.data_offset() + first * B) {
                self.fail_member(member, &e);
                return Err(io::Error::other(format!("writing the new member: {e}")));
            }
            self.set_csums_pub(&crcs);
            let cursor = first + unit;
            self.maint.rebuild_cursor.store(cursor, Ordering::Release);
            drop(lock);
            self.maint.advance(cursor * B);
            if saved.elapsed() >= CURSOR_SAVE_EVERY {
                // Checksums and data first, then the cursor that vouches for them.
                self.flush()?;
                self.set_rebuild_cursor_persisted(cursor);
                self.write_superblocks()?;
                saved = Instant::now();
            }
            pace.wait((cursor - start_row) * B);
        }
        self.flush()?;
        self.finish_member(member);
        self.set_rebuild_cursor_persisted(0);
        self.bump_events();
        self.write_superblocks()?;
        tracing::info!(
            "RAID-4 volume {}: member {member} rebuilt ({} MiB in {:.1} s)",
            self.name(),
            ((g.rows() - start_row) * B) >> 20,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}
