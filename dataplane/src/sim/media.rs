//! Simulated media: NVRAM, disks and metadata stores whose writes become durable only
//! when persisted, flushed or saved, and a node's power, which can be cut after any
//! number of those operations.
//!
//! What a crash leaves: everything persisted survives; of what was written and not yet
//! persisted, each 64-byte NVRAM line and each 4 KiB disk block independently survives,
//! is lost, or is torn (NVRAM: a mix of old and new 8-byte words, sometimes garbage; disk:
//! the first sectors new, the rest old). Nothing written after the power was cut lands.
//!
//! A `direct:` NVRAM region (the log in process memory over an O_DIRECT file) keeps only
//! whole persists: what was stored and not persisted is gone, and of the persist the cut
//! fell on (the device write in flight), each 4 KiB block landed, was lost, or is torn
//! like a disk block.

use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::Rng;
use rand_chacha::ChaCha12Rng as SimRng;

use crate::clock::Clock;
use crate::destination::{MetaStore, MirrorMeta};
use crate::format::BLOCK_BYTES;
use crate::nvram::Nvram;
use crate::storage::{check_range, BlockDevice};

/// The simulated clock, advanced by the simulator only.
#[derive(Debug, Default)]
pub struct SimClock(AtomicU64);

impl SimClock {
    pub fn advance(&self, ns: u64) {
        self.0.fetch_add(ns, Ordering::SeqCst);
    }
}

impl Clock for SimClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
    /// The simulated run starts at 2026-01-01T00:00:00Z.
    fn unix_ms(&self) -> u64 {
        1_767_225_600_000 + self.now_ns() / 1_000_000
    }
}

/// A node's power. Every durable operation of the node's media (an NVRAM persist, a disk
/// write or flush, a metadata save) asks it first; once cut, none happens.
#[derive(Debug)]
pub struct Power {
    /// Operations left before the cut; negative: no cut planned.
    ops_left: AtomicI64,
    cut: Arc<AtomicBool>,
    /// Durable operations performed (the crash points a cut can fall on).
    pub ops: AtomicU64,
}

impl Default for Power {
    fn default() -> Self {
        Self { ops_left: AtomicI64::new(-1), cut: Arc::new(AtomicBool::new(false)), ops: AtomicU64::new(0) }
    }
}

impl Power {
    /// Plans a cut: the `ops`-th durable operation from now (1 = the next) does not happen,
    /// nor anything after it.
    pub fn cut_after(&self, ops: u64) {
        self.ops_left.store(i64::try_from(ops.max(1)).unwrap_or(i64::MAX), Ordering::SeqCst);
    }
    /// Cancels a planned cut (one that has not happened).
    pub fn disarm(&self) {
        self.ops_left.store(-1, Ordering::SeqCst);
    }
    pub fn cut_now(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }
    /// A cut is planned or has happened.
    pub fn armed(&self) -> bool {
        self.is_cut() || self.ops_left.load(Ordering::SeqCst) > 0
    }
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
    /// The flag the network watches: a node without power sends nothing.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.cut.clone()
    }
    /// Whether one durable operation may happen now.
    pub fn admit(&self) -> bool {
        if self.is_cut() {
            return false;
        }
        let left = self.ops_left.load(Ordering::SeqCst);
        if left == 1 {
            self.ops_left.store(-1, Ordering::SeqCst);
            self.cut.store(true, Ordering::SeqCst);
            return false;
        }
        if left > 1 {
            self.ops_left.store(left - 1, Ordering::SeqCst);
        }
        self.ops.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// What a crash did to a node's media, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CrashDamage {
    pub nvram_lines_lost: u64,
    pub nvram_lines_landed: u64,
    pub nvram_lines_torn: u64,
    /// Blocks of a `direct:` region's write in flight at the cut.
    pub nvram_blocks_lost: u64,
    pub nvram_blocks_landed: u64,
    pub nvram_blocks_torn: u64,
    pub disk_blocks_lost: u64,
    pub disk_blocks_landed: u64,
    pub disk_blocks_torn: u64,
}

impl CrashDamage {
    pub fn add(&mut self, o: &CrashDamage) {
        self.nvram_lines_lost += o.nvram_lines_lost;
        self.nvram_lines_landed += o.nvram_lines_landed;
        self.nvram_lines_torn += o.nvram_lines_torn;
        self.nvram_blocks_lost += o.nvram_blocks_lost;
        self.nvram_blocks_landed += o.nvram_blocks_landed;
        self.nvram_blocks_torn += o.nvram_blocks_torn;
        self.disk_blocks_lost += o.disk_blocks_lost;
        self.disk_blocks_landed += o.disk_blocks_landed;
        self.disk_blocks_torn += o.disk_blocks_torn;
    }
}

const LINE: usize = 64;
/// The unit a torn device write is torn at.
const SECTOR: usize = 512;

/// What a crash did to one block a device was writing.
enum BlockFate {
    Lost,
    Landed,
    Torn,
}

/// One block written to a device and not yet durable when the power went (`durable`, its
/// old contents; `written`, the new, at most a block): lost, landed, or torn, its first
/// sectors new and the rest old.
fn resolve_block(rng: &mut SimRng, durable: &mut [u8], written: &[u8]) -> BlockFate {
    match rng.gen_range(0..100) {
        0..40 => BlockFate::Lost,
        40..80 => {
            durable.copy_from_slice(written);
            BlockFate::Landed
        }
        _ => {
            let torn = (rng.gen_range(1..BLOCK_BYTES / SECTOR) * SECTOR).min(written.len());
            durable[..torn].copy_from_slice(&written[..torn]);
            BlockFate::Torn
        }
    }
}

/// An NVRAM region's durable contents, which outlive the node's processes.
#[derive(Debug)]
pub struct NvramMedia {
    durable: Vec<u8>,
    /// What the last open left in memory (persisted or not) when it was dropped.
    left: Option<Vec<u8>>,
    /// A `direct:` region: persisted by whole device writes, memory lost at a crash.
    direct: bool,
    /// Of a `direct:` region, the device write the power cut fell on: where it starts
    /// (block-aligned) and the blocks it carried.
    in_flight: Option<(usize, Vec<u8>)>,
}

impl NvramMedia {
    pub fn new(len: usize, direct: bool) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self { durable: vec![0; len], left: None, direct, in_flight: None }))
    }

    /// What survives a power cut, as it stands.
    pub fn durable(&self) -> &[u8] {
        &self.durable
    }

    /// Flips a bit of what was persisted (the memory changed under a written entry).
    pub fn flip_bit(&mut self, offset: usize, bit: u8) {
        self.durable[offset] ^= 1 << (bit % 8);
    }

    /// The node crashed: resolves what was in memory and not persisted.
    pub fn crash(&mut self, rng: &mut SimRng, damage: &mut CrashDamage) {
        if self.direct {
            // Process memory is gone; only the write in flight may have reached the device.
            self.left = None;
            if let Some((at, blocks)) = self.in_flight.take() {
                for (i, new) in blocks.chunks(BLOCK_BYTES).enumerate() {
                    let old = &mut self.durable[at + i * BLOCK_BYTES..at + i * BLOCK_BYTES + new.len()];
                    *match resolve_block(rng, old, new) {
                        BlockFate::Lost => &mut damage.nvram_blocks_lost,
                        BlockFate::Landed => &mut damage.nvram_blocks_landed,
                        BlockFate::Torn => &mut damage.nvram_blocks_torn,
                    } += 1;
                }
            }
            return;
        }
        let Some(left) = self.left.take() else { return };
        for (line, (d, l)) in self.durable.chunks_mut(LINE).zip(left.chunks(LINE)).enumerate() {
            if d == l {
                continue;
            }
            let _ = line;
            match rng.gen_range(0..100) {
                0..50 => damage.nvram_lines_lost += 1,
                50..85 => {
                    d.copy_from_slice(l);
                    damage.nvram_lines_landed += 1;
                }
                _ => {
                    damage.nvram_lines_torn += 1;
                    for (dw, lw) in d.chunks_mut(8).zip(l.chunks(8)) {
                        match rng.gen_range(0..10) {
                            0..5 => dw.copy_from_slice(lw),
                            5..9 => {}
                            _ => rng.fill(dw),
                        }
                    }
                }
            }
        }
    }
}

/// A mapped NVRAM region over [`NvramMedia`]: stores go to memory, `persist` makes a range
/// durable.
pub struct SimNvram {
    cur: Vec<u8>,
    /// The media is `direct:` (see [`NvramMedia`]).
    direct: bool,
    /// Memory as it was when the power was cut (later stores never land).
    at_cut: Option<Vec<u8>>,
    media: Arc<Mutex<NvramMedia>>,
    power: Arc<Power>,
}

impl SimNvram {
    pub fn open(media: Arc<Mutex<NvramMedia>>, power: Arc<Power>) -> Self {
        let (cur, direct) = {
            let m = media.lock();
            (m.durable.clone(), m.direct)
        };
        Self { cur, direct, at_cut: None, media, power }
    }
    fn note_cut(&mut self) {
        if self.power.is_cut() && self.at_cut.is_none() {
            self.at_cut = Some(self.cur.clone());
        }
    }
}

impl Nvram for SimNvram {
    fn len(&self) -> usize {
        self.cur.len()
    }
    fn bytes(&self) -> &[u8] {
        &self.cur
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.note_cut();
        &mut self.cur
    }
    fn persist(&mut self, offset: usize, len: usize) -> io::Result<()> {
        assert!(offset + len <= self.cur.len(), "persist past the region");
        self.note_cut();
        let (offset, end) = if self.direct {
            // One device write of the whole blocks that hold the range.
            let span = crate::nvram::block_span(offset, len);
            (span.start, span.end.min(self.cur.len()))
        } else {
            (offset, offset + len)
        };
        let was_cut = self.power.is_cut();
        if self.power.admit() {
            self.media.lock().durable[offset..end].copy_from_slice(&self.cur[offset..end]);
        } else if self.direct && !was_cut {
            // The cut fell on this write: it was in flight.
            self.media.lock().in_flight = Some((offset, self.cur[offset..end].to_vec()));
        }
        Ok(())
    }
    fn persist_waits_for_device(&self) -> bool {
        self.direct
    }
}

impl Drop for SimNvram {
    fn drop(&mut self) {
        let left = self.at_cut.take().unwrap_or_else(|| std::mem::take(&mut self.cur));
        self.media.lock().left = Some(left);
    }
}

/// A disk's media: a volatile write cache over durable blocks, and its faults.
#[derive(Debug)]
pub struct DiskMedia {
    durable: Vec<u8>,
    cur: Vec<u8>,
    /// Blocks written since the last flush.
    dirty: BTreeSet<u64>,
    /// Reads still to fail (a transient error).
    pub read_errors: u32,
    /// The disk is gone: every I/O fails.
    pub lost: bool,
}

impl DiskMedia {
    pub fn new(len: u64) -> Arc<Mutex<Self>> {
        let len = crate::usize_of(len);
        Arc::new(Mutex::new(Self {
            durable: vec![0; len],
            cur: vec![0; len],
            dirty: BTreeSet::new(),
            read_errors: 0,
            lost: false,
        }))
    }

    /// The node crashed: resolves the write cache.
    pub fn crash(&mut self, rng: &mut SimRng, damage: &mut CrashDamage) {
        for b in std::mem::take(&mut self.dirty) {
            let at = crate::usize_of(b) * BLOCK_BYTES;
            let range = at..at + BLOCK_BYTES;
            *match resolve_block(rng, &mut self.durable[range.clone()], &self.cur[range]) {
                BlockFate::Lost => &mut damage.disk_blocks_lost,
                BlockFate::Landed => &mut damage.disk_blocks_landed,
                BlockFate::Torn => &mut damage.disk_blocks_torn,
            } += 1;
        }
        self.cur.clone_from(&self.durable);
    }

    /// Flips one bit of the durable contents, at `offset` (latent corruption).
    pub fn flip_bit(&mut self, offset: u64, bit: u8) {
        let o = crate::usize_of(offset);
        self.durable[o] ^= 1 << (bit % 8);
        self.cur[o] ^= 1 << (bit % 8);
    }

    pub fn len(&self) -> u64 {
        self.durable.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.durable.is_empty()
    }
}

pub struct SimDisk {
    media: Arc<Mutex<DiskMedia>>,
    power: Arc<Power>,
}

impl SimDisk {
    pub fn new(media: Arc<Mutex<DiskMedia>>, power: Arc<Power>) -> Self {
        Self { media, power }
    }
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("simulated disk: {what}"))
}

impl BlockDevice for SimDisk {
    fn size(&self) -> u64 {
        self.media.lock().len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut m = self.media.lock();
        check_range(m.len(), offset, buf.len() as u64)?;
        if m.lost {
            return Err(eio("the disk is gone"));
        }
        if m.read_errors > 0 {
            m.read_errors -= 1;
            return Err(eio("read error"));
        }
        let o = crate::usize_of(offset);
        buf.copy_from_slice(&m.cur[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut m = self.media.lock();
        check_range(m.len(), offset, buf.len() as u64)?;
        if m.lost {
            return Err(eio("the disk is gone"));
        }
        if !self.power.admit() {
            return Ok(());
        }
        let o = crate::usize_of(offset);
        m.cur[o..o + buf.len()].copy_from_slice(buf);
        let first = offset / BLOCK_BYTES as u64;
        let last = (offset + buf.len() as u64).div_ceil(BLOCK_BYTES as u64);
        m.dirty.extend(first..last);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let mut m = self.media.lock();
        if m.lost {
            return Err(eio("the disk is gone"));
        }
        if !self.power.admit() {
            return Ok(());
        }
        let m = &mut *m;
        for b in std::mem::take(&mut m.dirty) {
            let at = crate::usize_of(b) * BLOCK_BYTES;
            m.durable[at..at + BLOCK_BYTES].copy_from_slice(&m.cur[at..at + BLOCK_BYTES]);
        }
        Ok(())
    }
}

/// A mirror's metadata file, replaced atomically: a save either happened or did not.
pub struct SimMetaStore {
    pub durable: Arc<Mutex<Option<MirrorMeta>>>,
    pub power: Arc<Power>,
}

impl MetaStore for SimMetaStore {
    fn save(&self, meta: &MirrorMeta) -> io::Result<()> {
        if self.power.admit() {
            *self.durable.lock() = Some(meta.clone());
        }
        Ok(())
    }
}
