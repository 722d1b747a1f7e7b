//! The change map: which regions of a volume changed since a given peer last held a
//! consistent copy, kept in NVRAM beside the NVLog (DRBD keeps the same thing as its
//! on-disk bitmap).
//!
//! Invariant: every write with a sequence number past the last one of CP `base_cp`, as
//! the peer `base_peer` applied it, is either in a partition the NVLog still holds or
//! marked here. A partition is freed without the peer's `CpDone` (policy `sync` with the
//! link down, a full flush, an unmirrored volume) only after its blocks are marked and the
//! map persisted. So when the link comes back to that peer, or the peer returns after a
//! failover, copying the marked regions (and the held partitions' blocks) brings it level:
//! a delta resync, not a full copy.
//!
//! Layout (version 2, little-endian):
//!
//! ```text
//! header copy 0 at 0, copy 1 at 256, 256 bytes each:
//!   0 magic u32 "NVCM" | 4 version u16 | 8 region bytes u64 | 16 region count u64
//!  24 base set u8 | 32 base CP u64 | 40 peer name length u16 | 42 peer name [160]
//! 208 sequence u64 | 252 crc32c of bytes 0..252
//! marks from 512, in 64-byte lines: 60 bytes of bits (480 regions), then a u32 check,
//!   crc32c of the 60 bytes xor crc32c of 60 zero bytes (a blank line checks)
//! ```
//!
//! Crash atomicity, by construction: a header update writes the copy that does not hold
//! the newest sequence, so a cut leaves the other intact and the newest valid copy wins.
//! A line of marks that fails its check is read as all marked: a torn line can only add
//! work to the next resync, never hide a change. Marks are persisted before a header that
//! may depend on them, and cleared only after the header that makes them unneeded. Where
//! neither header copy is valid, the map opens with no base and every region marked (the
//! next mirror copy is whole) and says so in [`ChangeMap::repaired`]: a power cut never
//! leaves a volume that refuses to start over its map.

use std::io;

use thiserror::Error;

use crate::nvram::Nvram;

pub const CHANGE_MAGIC: u32 = u32::from_le_bytes(*b"NVCM");
const VERSION: u16 = 2;
const SLOT_BYTES: usize = 256;
const HEADER_BYTES: usize = 2 * SLOT_BYTES;
const SEQ_AT: usize = 208;
const CRC_AT: usize = SLOT_BYTES - 4;
const LINE: usize = 64;
const LINE_BITS_BYTES: usize = 60;
/// Regions one line of marks holds.
const LINE_REGIONS: u64 = LINE_BITS_BYTES as u64 * 8;
/// Bytes of volume per bit: 64 KiB, DRBD's resync granularity is 4 KiB per bit, but a
/// mirror volume of 16 TiB then needs 512 MiB of bitmap; 64 KiB keeps that at 32 MiB.
pub const REGION_BYTES: u64 = 64 << 10;
const PEER_MAX: usize = 160;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ChangeMapError {
    #[error("change map region of {len} bytes is too small: {need} needed")]
    TooSmall { len: usize, need: usize },
    #[error("change map header: {0}")]
    BadHeader(String),
    #[error("persist: {0}")]
    Persist(#[source] io::Error),
}

/// A peer and CP the map is relative to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChangeBase {
    pub peer: String,
    pub cp: u64,
}

/// A byte range `[lo, hi)` of the marks written since the last persist.
type Dirty = Option<(usize, usize)>;

fn widen(d: Dirty, byte: usize) -> Dirty {
    Some(d.map_or((byte, byte + 1), |(lo, hi)| (lo.min(byte), hi.max(byte + 1))))
}

/// The check word of a line of marks: zero for a blank line.
fn line_check(bits: &[u8]) -> u32 {
    static BLANK: std::sync::LazyLock<u32> =
        std::sync::LazyLock::new(|| crate::checksum::crc32c(&[0; LINE_BITS_BYTES]));
    crate::checksum::crc32c(bits) ^ *BLANK
}

/// One decoded header copy.
struct Slot {
    seq: u64,
    base: Option<ChangeBase>,
    /// Regions the copy was written for: fewer than the map's where the volume grew since.
    regions: u64,
}

pub struct ChangeMap {
    nvram: Box<dyn Nvram>,
    regions: u64,
    base: Option<ChangeBase>,
    /// Sequence of the newest header copy.
    seq: u64,
    marked: u64,
    /// Marks set since the last persist (persisted before the header).
    set: Dirty,
    /// Regions a rebase cleared, still marked in NVRAM: they are cleared there only once
    /// the header that no longer needs them is durable.
    clearing: std::collections::BTreeSet<u64>,
    header_dirty: bool,
    repaired: Option<String>,
}

impl ChangeMap {
    /// Bytes of NVRAM a map for a volume of `volume_bytes` takes.
    pub fn region_bytes(volume_bytes: u64) -> usize {
        HEADER_BYTES + LINE * crate::usize_of(volume_bytes.div_ceil(REGION_BYTES).div_ceil(LINE_REGIONS))
    }

    /// Byte and bit of region `r`.
    fn locate(r: u64) -> (usize, u8) {
        let line = crate::usize_of(r / LINE_REGIONS);
        let within = r % LINE_REGIONS;
        (HEADER_BYTES + line * LINE + crate::usize_of(within / 8), 1u8 << (within % 8))
    }

    fn lines(&self) -> usize {
        crate::usize_of(self.regions.div_ceil(LINE_REGIONS))
    }

    /// Decodes header copy `i`: `Ok(None)` where it was never written, `Err(Ok(why))`
    /// where it is damaged, `Err(Err(why))` where it is sealed but of another shape.
    #[allow(clippy::type_complexity)]
    fn slot(&self, i: usize) -> Result<Option<Slot>, Result<String, String>> {
        let h = &self.nvram.bytes()[i * SLOT_BYTES..(i + 1) * SLOT_BYTES];
        if h.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let magic = u32::from_le_bytes(h[0..4].try_into().expect("4"));
        if magic != CHANGE_MAGIC {
            return Err(Ok(format!("copy {i}: magic {magic:#x}")));
        }
        let crc = u32::from_le_bytes(h[CRC_AT..].try_into().expect("4"));
        if crc != crate::checksum::crc32c(&h[..CRC_AT]) {
            return Err(Ok(format!("copy {i}: checksum mismatch")));
        }
        let version = u16::from_le_bytes(h[4..6].try_into().expect("2"));
        let region = u64::from_le_bytes(h[8..16].try_into().expect("8"));
        let count = u64::from_le_bytes(h[16..24].try_into().expect("8"));
        if version != VERSION || region != REGION_BYTES || count > self.regions {
            // A sealed copy of another shape is no tear: the file is not this volume's map.
            // (One of fewer regions is this map before its volume grew: the new regions
            // are unmarked, and their lines blank.)
            return Err(Err(format!(
                "version {version}, {count} regions of {region} bytes; expected version {VERSION}, {} of {REGION_BYTES}",
                self.regions
            )));
        }
        let seq = u64::from_le_bytes(h[SEQ_AT..SEQ_AT + 8].try_into().expect("8"));
        let base = if h[24] == 1 {
            let cp = u64::from_le_bytes(h[32..40].try_into().expect("8"));
            let n = usize::from(u16::from_le_bytes(h[40..42].try_into().expect("2")));
            if n > PEER_MAX {
                return Err(Ok(format!("copy {i}: peer name of {n} bytes")));
            }
            let peer = String::from_utf8(h[42..42 + n].to_vec())
                .map_err(|_| Ok(format!("copy {i}: peer name is not UTF-8")))?;
            Some(ChangeBase { peer, cp })
        } else {
            None
        };
        Ok(Some(Slot { seq, base, regions: count }))
    }

    /// Opens the map in `nvram`, formatting it (no base: a full copy is needed) where it
    /// holds nothing yet. A map a crash damaged opens in the conservative state (see the
    /// module's notes, and [`ChangeMap::repaired`]); only a map of another shape (another
    /// version or volume size) is an error.
    pub fn open(nvram: Box<dyn Nvram>, volume_bytes: u64) -> Result<Self, ChangeMapError> {
        let need = Self::region_bytes(volume_bytes);
        if nvram.len() < need {
            return Err(ChangeMapError::TooSmall { len: nvram.len(), need });
        }
        let regions = volume_bytes.div_ceil(REGION_BYTES);
        let mut map = ChangeMap {
            nvram,
            regions,
            base: None,
            seq: 0,
            marked: 0,
            set: None,
            clearing: std::collections::BTreeSet::new(),
            header_dirty: false,
            repaired: None,
        };
        let slots = [map.slot(0), map.slot(1)];
        let mut problems = Vec::new();
        let mut newest: Option<Slot> = None;
        let mut blank = true;
        for s in slots {
            match s {
                Ok(None) => {}
                Ok(Some(s)) => {
                    blank = false;
                    if newest.as_ref().is_none_or(|n| s.seq > n.seq) {
                        newest = Some(s);
                    }
                }
                Err(Err(e)) => return Err(ChangeMapError::BadHeader(e)),
                Err(Ok(e)) => {
                    blank = false;
                    problems.push(e);
                }
            }
        }
        let mut damaged_lines = 0u64;
        for line in 0..map.lines() {
            let at = HEADER_BYTES + line * LINE;
            let l = &map.nvram.bytes()[at..at + LINE];
            let check = u32::from_le_bytes(l[LINE_BITS_BYTES..].try_into().expect("4"));
            if check != line_check(&l[..LINE_BITS_BYTES]) {
                damaged_lines += 1;
                let first = line as u64 * LINE_REGIONS;
                for r in first..(first + LINE_REGIONS).min(regions) {
                    let (byte, bit) = Self::locate(r);
                    map.nvram.bytes_mut()[byte] |= bit;
                }
                map.set = widen(widen(map.set, at), at + LINE_BITS_BYTES - 1);
            }
        }
        map.marked = (0..regions).filter(|&r| map.is_marked(r)).count() as u64;
        match newest {
            Some(s) => {
                map.seq = s.seq;
                map.base = s.base;
                map.header_dirty = s.regions < regions;
            }
            None if blank => map.header_dirty = true,
            None => {
                problems.push("no valid header copy: the map is relative to no copy, every region marked".into());
                map.mark_all();
                map.header_dirty = true;
            }
        }
        if damaged_lines > 0 {
            problems.push(format!("{damaged_lines} line(s) of marks failed their check and read as all marked"));
        }
        if !problems.is_empty() {
            map.repaired = Some(problems.join("; "));
        }
        if map.header_dirty || map.set.is_some() {
            map.persist()?;
        }
        Ok(map)
    }

    /// What the open found damaged (a power cut's torn update) and how it was read
    /// instead, for the node's log; `None` where the map was whole.
    pub fn repaired(&self) -> Option<&str> {
        self.repaired.as_deref()
    }

    pub fn base(&self) -> Option<&ChangeBase> {
        self.base.as_ref()
    }

    /// Regions marked.
    pub fn marked(&self) -> u64 {
        self.marked
    }

    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// Marks the regions a write of `len` bytes at `offset` touches.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / REGION_BYTES;
        let last = ((offset + len - 1) / REGION_BYTES).min(self.regions.saturating_sub(1));
        for r in first..=last {
            self.mark_region(r);
        }
    }

    pub fn mark_region(&mut self, r: u64) {
        if r >= self.regions {
            return;
        }
        let (byte, bit) = Self::locate(r);
        if self.clearing.remove(&r) {
            self.marked += 1;
            return;
        }
        let b = &mut self.nvram.bytes_mut()[byte];
        if *b & bit == 0 {
            *b |= bit;
            self.marked += 1;
            self.set = widen(self.set, byte);
        }
    }

    pub fn is_marked(&self, r: u64) -> bool {
        let (byte, bit) = Self::locate(r);
        r < self.regions && self.nvram.bytes()[byte] & bit != 0 && !self.clearing.contains(&r)
    }

    /// The marked regions, in order.
    pub fn marked_regions(&self) -> Vec<u64> {
        (0..self.regions).filter(|&r| self.is_marked(r)).collect()
    }

    /// The marks as they are now, one bit per region (for a resync to copy, then
    /// [`ChangeMap::rebase`]).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; crate::usize_of(self.regions.div_ceil(8))];
        for r in (0..self.regions).filter(|&r| self.is_marked(r)) {
            out[crate::usize_of(r / 8)] |= 1 << (r % 8);
        }
        out
    }

    /// Clears the regions `copied` marks (a snapshot a copy sent; marks made since stay) and
    /// makes the map relative to `base`. The clears reach NVRAM only after the new base
    /// (at [`ChangeMap::persist`]).
    pub fn rebase(&mut self, copied: &[u8], base: ChangeBase) {
        let n = self.regions;
        for r in (0..n).filter(|&r| copied.get(crate::usize_of(r / 8)).is_some_and(|b| b & (1 << (r % 8)) != 0)) {
            if self.is_marked(r) {
                self.clearing.insert(r);
                self.marked -= 1;
            }
        }
        self.set_base(Some(base));
    }

    /// Sets (or clears: a full copy is needed) what the map is relative to.
    pub fn set_base(&mut self, base: Option<ChangeBase>) {
        let mut base = base;
        if let Some(b) = &mut base {
            // Node names are short; one that is not cannot be compared, so it is no base.
            if b.peer.len() > PEER_MAX {
                base = None;
            }
        }
        if self.base != base {
            self.base = base;
            self.header_dirty = true;
        }
    }

    /// The map of the volume grown to `volume_bytes`, in the same NVRAM region grown to
    /// hold it: what it holds is persisted, `reopen` opens the region at its new length
    /// (the same bytes, more of them, the new ones zero), and the new regions start
    /// unmarked (a grown volume's new blocks are zeroes on both sites). The header
    /// records the new size last; until it does, an open at the new size reads the old
    /// header as this map before it grew.
    pub fn grow(
        &mut self,
        volume_bytes: u64,
        reopen: impl FnOnce(usize) -> io::Result<Box<dyn Nvram>>,
    ) -> Result<(), ChangeMapError> {
        let regions = volume_bytes.div_ceil(REGION_BYTES);
        if regions <= self.regions {
            return Ok(());
        }
        self.persist()?;
        let need = Self::region_bytes(volume_bytes);
        let nvram = reopen(need).map_err(ChangeMapError::Persist)?;
        if nvram.len() < need {
            return Err(ChangeMapError::TooSmall { len: nvram.len(), need });
        }
        self.nvram = nvram;
        self.regions = regions;
        self.header_dirty = true;
        self.persist()
    }

    /// Marks every region: nothing is known of any peer.
    pub fn mark_all(&mut self) {
        for r in 0..self.regions {
            self.mark_region(r);
        }
    }

    /// Seals the lines of `dirty` with their checks and persists them.
    fn persist_lines(&mut self, dirty: Dirty) -> Result<(), ChangeMapError> {
        let Some((lo, hi)) = dirty else { return Ok(()) };
        let first = (lo - HEADER_BYTES) / LINE;
        let last = (hi - 1 - HEADER_BYTES) / LINE;
        for line in first..=last {
            let at = HEADER_BYTES + line * LINE;
            let l = &mut self.nvram.bytes_mut()[at..at + LINE];
            let check = line_check(&l[..LINE_BITS_BYTES]);
            l[LINE_BITS_BYTES..].copy_from_slice(&check.to_le_bytes());
        }
        let at = HEADER_BYTES + first * LINE;
        self.nvram.persist(at, (last + 1 - first) * LINE).map_err(ChangeMapError::Persist)
    }

    /// Makes the marks and the header durable: new marks first, then the header (into the
    /// copy that does not hold the newest), then the clears of a rebase. Each step's
    /// stores are made only after the step before is durable: a cut lands none early.
    pub fn persist(&mut self) -> Result<(), ChangeMapError> {
        let set = self.set.take();
        self.persist_lines(set)?;
        if std::mem::take(&mut self.header_dirty) {
            let seq = self.seq + 1;
            let mut h = [0u8; SLOT_BYTES];
            h[0..4].copy_from_slice(&CHANGE_MAGIC.to_le_bytes());
            h[4..6].copy_from_slice(&VERSION.to_le_bytes());
            h[8..16].copy_from_slice(&REGION_BYTES.to_le_bytes());
            h[16..24].copy_from_slice(&self.regions.to_le_bytes());
            if let Some(b) = &self.base {
                h[24] = 1;
                h[32..40].copy_from_slice(&b.cp.to_le_bytes());
                let n = u16::try_from(b.peer.len()).expect("bounded by PEER_MAX");
                h[40..42].copy_from_slice(&n.to_le_bytes());
                h[42..42 + b.peer.len()].copy_from_slice(b.peer.as_bytes());
            }
            h[SEQ_AT..SEQ_AT + 8].copy_from_slice(&seq.to_le_bytes());
            let crc = crate::checksum::crc32c(&h[..CRC_AT]);
            h[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
            let at = crate::usize_of(seq % 2) * SLOT_BYTES;
            self.nvram.bytes_mut()[at..at + SLOT_BYTES].copy_from_slice(&h);
            self.nvram.persist(at, SLOT_BYTES).map_err(ChangeMapError::Persist)?;
            self.seq = seq;
        }
        let mut cleared = None;
        for r in std::mem::take(&mut self.clearing) {
            let (byte, bit) = Self::locate(r);
            self.nvram.bytes_mut()[byte] &= !bit;
            cleared = widen(cleared, byte);
        }
        self.persist_lines(cleared)
    }
}

const _: () = assert!(42 + PEER_MAX <= SEQ_AT && SEQ_AT + 8 <= CRC_AT);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::MemNvram;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn fresh(volume: u64) -> ChangeMap {
        ChangeMap::open(Box::new(MemNvram::new(ChangeMap::region_bytes(volume))), volume).expect("open")
    }

    /// `map`'s NVRAM bytes in a region for a volume of `volume` bytes.
    fn grown_copy(map: &ChangeMap, volume: u64) -> MemNvram {
        let mut n = MemNvram::new(ChangeMap::region_bytes(volume));
        let old = map.nvram.bytes();
        n.bytes_mut()[..old.len()].copy_from_slice(old);
        n
    }

    #[test]
    fn a_grown_map_keeps_its_marks_and_base_and_reopens_at_either_step() {
        let small = 10 * REGION_BYTES;
        let big = 2000 * REGION_BYTES;
        let mut m = fresh(small);
        m.set_base(Some(ChangeBase { peer: "b".into(), cp: 7 }));
        m.mark(3 * REGION_BYTES, 1);
        m.persist().unwrap();
        // A crash after the volume's record grew, before the map did: the map opens at the
        // new size, its marks and base kept, and records the size.
        let m2 = ChangeMap::open(Box::new(grown_copy(&m, big)), big).expect("opens at the new size");
        assert_eq!((m2.regions(), m2.marked_regions()), (2000, vec![3]));
        assert_eq!(m2.base(), Some(&ChangeBase { peer: "b".into(), cp: 7 }));
        // Grown in place: the same, and new regions take marks.
        let mut g = fresh(small);
        g.set_base(Some(ChangeBase { peer: "b".into(), cp: 7 }));
        g.mark(3 * REGION_BYTES, 1);
        g.persist().unwrap();
        // (Persisted already: the region as the reopen finds it.)
        let before = g.nvram.bytes().to_vec();
        g.grow(big, |len| {
            assert_eq!(len, ChangeMap::region_bytes(big));
            let mut n = MemNvram::new(len);
            n.bytes_mut()[..before.len()].copy_from_slice(&before);
            Ok(Box::new(n) as Box<dyn Nvram>)
        })
        .unwrap_or_else(|e| panic!("{e}"));
        g.mark(1999 * REGION_BYTES, 1);
        g.persist().unwrap();
        assert_eq!(g.marked_regions(), vec![3, 1999]);
        let reopened = ChangeMap::open(Box::new(grown_copy(&g, big)), big).unwrap();
        assert_eq!((reopened.marked_regions(), reopened.base().cloned()), (vec![3, 1999], g.base().cloned()));
        // Its header says the new size: opened as the smaller volume, it is another shape.
        let e = ChangeMap::open(Box::new(grown_copy(&g, big)), small).err().expect("another shape");
        assert!(e.to_string().contains("regions"), "{e}");
    }

    #[test]
    fn marks_survive_a_reopen_with_their_base() {
        let volume = 10 * REGION_BYTES + 4096;
        let mut m = fresh(volume);
        assert_eq!(m.regions(), 11);
        assert!(m.base().is_none());
        m.mark(REGION_BYTES - 4096, 8192);
        m.mark(10 * REGION_BYTES, 4096);
        m.set_base(Some(ChangeBase { peer: "site-b".into(), cp: 42 }));
        m.persist().expect("persist");
        assert_eq!(m.marked_regions(), vec![0, 1, 10]);
        let bytes = m.nvram.bytes().to_vec();
        let mut n = MemNvram::new(bytes.len());
        n.bytes_mut().copy_from_slice(&bytes);
        let m2 = ChangeMap::open(Box::new(n), volume).expect("reopen");
        assert_eq!(m2.marked_regions(), vec![0, 1, 10]);
        assert_eq!(m2.marked(), 3);
        assert_eq!(m2.base(), Some(&ChangeBase { peer: "site-b".into(), cp: 42 }));
    }

    #[test]
    fn rebase_clears_only_what_was_copied() {
        let mut m = fresh(8 * REGION_BYTES);
        m.mark_region(1);
        let copied = m.snapshot();
        m.mark_region(5);
        m.rebase(&copied, ChangeBase { peer: "p".into(), cp: 7 });
        assert_eq!(m.marked_regions(), vec![5]);
        assert_eq!(m.marked(), 1);
    }

    fn reopen(bytes: &[u8], volume: u64) -> Result<ChangeMap, ChangeMapError> {
        let mut n = MemNvram::new(bytes.len());
        n.bytes_mut().copy_from_slice(bytes);
        ChangeMap::open(Box::new(n), volume)
    }

    #[test]
    fn damage_opens_conservatively_and_says_so() {
        let volume = 4 * REGION_BYTES;
        let mut m = fresh(volume);
        m.set_base(Some(ChangeBase { peer: "p".into(), cp: 1 }));
        m.mark_region(2);
        m.persist().expect("persist");
        let good = m.nvram.bytes().to_vec();
        // Copy 0 holds the newest header (sequence 2); damage it: copy 1's older header
        // (sequence 1, no base) wins, which asks for a whole copy.
        let mut one = good.clone();
        one[33] ^= 1;
        let r = reopen(&one, volume).expect("open");
        assert_eq!(r.base(), None);
        assert!(r.repaired().expect("said").contains("copy 0: checksum mismatch"), "{:?}", r.repaired());
        // Both copies damaged: no base, every region marked.
        let mut both = one.clone();
        both[SLOT_BYTES + 33] ^= 1;
        let r = reopen(&both, volume).expect("open");
        assert_eq!((r.base(), r.marked()), (None, 4));
        assert!(r.repaired().expect("said").contains("no valid header copy"));
        // A damaged line of marks reads as all marked; the base stands.
        let mut line = good.clone();
        line[HEADER_BYTES] ^= 0x10;
        let r = reopen(&line, volume).expect("open");
        assert_eq!(r.base(), Some(&ChangeBase { peer: "p".into(), cp: 1 }));
        assert_eq!(r.marked_regions(), vec![0, 1, 2, 3]);
        assert!(r.repaired().expect("said").contains("failed their check"));
        // Repaired maps are whole again once persisted: a second open finds nothing.
        let again = reopen(r.nvram.bytes(), volume).expect("open");
        assert!(again.repaired().is_none());
        assert_eq!(again.marked_regions(), vec![0, 1, 2, 3]);
        // A map of another shape is no tear: refused.
        assert!(matches!(reopen(&good, 600 * REGION_BYTES), Err(ChangeMapError::TooSmall { .. })));
        let other = fresh(40 * REGION_BYTES);
        let bytes = other.nvram.bytes()[..ChangeMap::region_bytes(4 * REGION_BYTES)].to_vec();
        assert!(matches!(reopen(&bytes, volume), Err(ChangeMapError::BadHeader(_))));
    }

    /// A state the map may be in: its base and its marks.
    type State = (Option<ChangeBase>, BTreeSet<u64>);

    fn state(m: &ChangeMap) -> State {
        (m.base().cloned(), m.marked_regions().into_iter().collect())
    }

    /// Tears `update` of the map in `start` at every persist and every line and word a
    /// power cut can leave, and checks each image opens to a safe state: relative to no
    /// copy, or to the old base with every old mark, or to the new base with every new one.
    fn tear_every_way(volume: u64, start: &[u8], update: &dyn Fn(&mut ChangeMap)) -> usize {
        let before = state(&reopen(start, volume).expect("start opens"));
        let mut after = None;
        let runs = crate::tear::cut_at_every_persist(start, &mut |nv| {
            let mut m = ChangeMap::open(Box::new(nv), volume).expect("open");
            update(&mut m);
            m.persist().expect("persist");
            after = Some(state(&m));
            m.nvram.bytes().to_vec()
        });
        let after = after.expect("ran");
        assert!(runs.len() > 1, "the update persists nothing");
        let mut images = 0;
        for (admitted, (old, new)) in runs.iter().enumerate() {
            for img in crate::tear::nvram_images(old, new) {
                images += 1;
                let r = reopen(&img, volume).expect("a torn map opens");
                let (base, marks) = state(&r);
                let safe = base.is_none()
                    || (base == before.0 && marks.is_superset(&before.1))
                    || (base == after.0 && marks.is_superset(&after.1));
                assert!(safe, "{admitted} persists admitted: {base:?} {marks:?}, before {before:?}, after {after:?}");
                if base.is_none() && before.0.is_some() && after.0.is_some() {
                    assert!(r.repaired().is_some() && r.marked() == r.regions(), "a lost base is said, all marked");
                }
            }
        }
        images
    }

    #[test]
    fn every_update_survives_a_tear_at_every_line() {
        // Two lines of marks, the second partly used.
        let volume = 700 * REGION_BYTES;
        let mut m = fresh(volume);
        m.mark_region(3);
        m.mark_region(500);
        m.set_base(Some(ChangeBase { peer: "site-b".into(), cp: 5 }));
        m.persist().expect("persist");
        let start = m.nvram.bytes().to_vec();
        let mut images = 0;
        // New marks (a partition freed without the peer's CpDone).
        images += tear_every_way(volume, &start, &|m| {
            m.mark_region(7);
            m.mark_region(699);
        });
        // A delta resync done: what it copied cleared, relative to the peer's newer CP.
        images += tear_every_way(volume, &start, &|m| {
            let copied = m.snapshot();
            m.mark_region(600);
            m.rebase(&copied, ChangeBase { peer: "site-b".into(), cp: 9 });
        });
        // Relative to another peer (a failover's new map), with its marks.
        images += tear_every_way(volume, &start, &|m| {
            m.mark_region(42);
            m.set_base(Some(ChangeBase { peer: "site-c".into(), cp: 11 }));
        });
        // Nothing known: every region.
        images += tear_every_way(volume, &start, &|m| {
            m.set_base(None);
            m.mark_all();
        });
        println!("{images} torn images of 4 updates opened");
        assert!(images > 10_000, "{images} images");
    }

    proptest! {
        #[test]
        fn marking_covers_every_written_byte(writes in proptest::collection::vec((0u64..(1 << 22), 1u64..(1 << 18)), 1..20)) {
            let volume = 1u64 << 22;
            let mut m = fresh(volume);
            for (o, l) in &writes {
                let l = (*l).min(volume - o);
                if l > 0 { m.mark(*o, l); }
            }
            for (o, l) in &writes {
                let l = (*l).min(volume - o);
                for byte in [*o, o + l.saturating_sub(1)] {
                    prop_assert!(l == 0 || m.is_marked(byte / REGION_BYTES));
                }
            }
            prop_assert_eq!(m.marked(), m.marked_regions().len() as u64);
        }

        #[test]
        fn garbage_opens_conservatively_or_is_refused(bytes in proptest::collection::vec(any::<u8>(), 576..700)) {
            let mut n = MemNvram::new(bytes.len());
            n.bytes_mut().copy_from_slice(&bytes);
            // Garbage is no sealed header of another shape (that needs a valid checksum):
            // it opens, relative to no copy, with every region marked.
            let m = ChangeMap::open(Box::new(n), 8 * REGION_BYTES).expect("garbage opens");
            prop_assert!(m.base().is_none());
            prop_assert_eq!(m.marked(), 8);
            prop_assert!(m.repaired().is_some());
        }
    }
}
