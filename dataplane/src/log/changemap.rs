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
//! Layout (little-endian): a 256-byte header (magic `NVCM`, version, region bytes, region
//! count, whether a base is set, base CP, base peer name, crc32c of the header), then one
//! bit per region.

use std::io;

use thiserror::Error;

use crate::nvram::Nvram;

pub const CHANGE_MAGIC: u32 = u32::from_le_bytes(*b"NVCM");
const VERSION: u16 = 1;
const HEADER_BYTES: usize = 256;
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChangeBase {
    pub peer: String,
    pub cp: u64,
}

pub struct ChangeMap {
    nvram: Box<dyn Nvram>,
    regions: u64,
    base: Option<ChangeBase>,
    marked: u64,
    /// Bytes of the bit area changed since the last persist: `[lo, hi)`.
    dirty: Option<(usize, usize)>,
    header_dirty: bool,
}

impl ChangeMap {
    /// Bytes of NVRAM a map for a volume of `volume_bytes` takes.
    pub fn region_bytes(volume_bytes: u64) -> usize {
        HEADER_BYTES + crate::usize_of(volume_bytes.div_ceil(REGION_BYTES).div_ceil(8))
    }

    /// Opens the map in `nvram`, formatting it (no base: a full copy is needed) where it
    /// holds nothing yet.
    pub fn open(nvram: Box<dyn Nvram>, volume_bytes: u64) -> Result<Self, ChangeMapError> {
        let need = Self::region_bytes(volume_bytes);
        if nvram.len() < need {
            return Err(ChangeMapError::TooSmall { len: nvram.len(), need });
        }
        let regions = volume_bytes.div_ceil(REGION_BYTES);
        let h: [u8; HEADER_BYTES] = nvram.bytes()[..HEADER_BYTES].try_into().expect("checked length");
        let magic = u32::from_le_bytes(h[0..4].try_into().expect("4"));
        let mut map = ChangeMap { nvram, regions, base: None, marked: 0, dirty: None, header_dirty: false };
        if magic == 0 {
            map.header_dirty = true;
            map.persist()?;
            return Ok(map);
        }
        if magic != CHANGE_MAGIC {
            return Err(ChangeMapError::BadHeader(format!("magic {magic:#x}")));
        }
        let crc = u32::from_le_bytes(h[HEADER_BYTES - 4..].try_into().expect("4"));
        if crc != crc32c::crc32c(&h[..HEADER_BYTES - 4]) {
            return Err(ChangeMapError::BadHeader("checksum mismatch".into()));
        }
        let version = u16::from_le_bytes(h[4..6].try_into().expect("2"));
        let region = u64::from_le_bytes(h[8..16].try_into().expect("8"));
        let count = u64::from_le_bytes(h[16..24].try_into().expect("8"));
        if version != VERSION || region != REGION_BYTES || count != regions {
            return Err(ChangeMapError::BadHeader(format!(
                "version {version}, {count} regions of {region} bytes; expected {regions} of {REGION_BYTES}"
            )));
        }
        if h[24] == 1 {
            let cp = u64::from_le_bytes(h[32..40].try_into().expect("8"));
            let n = usize::from(u16::from_le_bytes(h[40..42].try_into().expect("2")));
            if n > PEER_MAX {
                return Err(ChangeMapError::BadHeader("peer name too long".into()));
            }
            let peer = String::from_utf8(h[42..42 + n].to_vec())
                .map_err(|_| ChangeMapError::BadHeader("peer name is not UTF-8".into()))?;
            map.base = Some(ChangeBase { peer, cp });
        }
        map.marked = map.bits().iter().map(|b| u64::from(b.count_ones())).sum();
        Ok(map)
    }

    fn bits(&self) -> &[u8] {
        &self.nvram.bytes()[HEADER_BYTES..HEADER_BYTES + crate::usize_of(self.regions.div_ceil(8))]
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
        let byte = HEADER_BYTES + crate::usize_of(r / 8);
        let bit = 1u8 << (r % 8);
        let b = &mut self.nvram.bytes_mut()[byte];
        if *b & bit == 0 {
            *b |= bit;
            self.marked += 1;
            self.dirty = Some(self.dirty.map_or((byte, byte + 1), |(lo, hi)| (lo.min(byte), hi.max(byte + 1))));
        }
    }

    pub fn is_marked(&self, r: u64) -> bool {
        r < self.regions && self.bits()[crate::usize_of(r / 8)] & (1 << (r % 8)) != 0
    }

    /// The marked regions, in order.
    pub fn marked_regions(&self) -> Vec<u64> {
        (0..self.regions).filter(|&r| self.is_marked(r)).collect()
    }

    /// The marks as they are now, one bit per region (for a resync to copy, then
    /// [`ChangeMap::rebase`]).
    pub fn snapshot(&self) -> Vec<u8> {
        self.bits().to_vec()
    }

    /// Clears the regions `copied` marks (a snapshot a copy sent; marks made since stay) and
    /// makes the map relative to `base`.
    pub fn rebase(&mut self, copied: &[u8], base: ChangeBase) {
        let n = self.regions;
        for r in (0..n).filter(|&r| copied.get(crate::usize_of(r / 8)).is_some_and(|b| b & (1 << (r % 8)) != 0)) {
            let byte = HEADER_BYTES + crate::usize_of(r / 8);
            let bit = 1u8 << (r % 8);
            let b = &mut self.nvram.bytes_mut()[byte];
            if *b & bit != 0 {
                *b &= !bit;
                self.marked -= 1;
                self.dirty = Some(self.dirty.map_or((byte, byte + 1), |(lo, hi)| (lo.min(byte), hi.max(byte + 1))));
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

    /// Marks every region: nothing is known of any peer.
    pub fn mark_all(&mut self) {
        for r in 0..self.regions {
            self.mark_region(r);
        }
    }

    /// Makes the marks and the header durable.
    pub fn persist(&mut self) -> Result<(), ChangeMapError> {
        if let Some((lo, hi)) = self.dirty.take() {
            self.nvram.persist(lo, hi - lo).map_err(ChangeMapError::Persist)?;
        }
        if std::mem::take(&mut self.header_dirty) {
            let mut h = [0u8; HEADER_BYTES];
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
            let crc = crc32c::crc32c(&h[..HEADER_BYTES - 4]);
            h[HEADER_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
            self.nvram.bytes_mut()[..HEADER_BYTES].copy_from_slice(&h);
            self.nvram.persist(0, HEADER_BYTES).map_err(ChangeMapError::Persist)?;
        }
        Ok(())
    }
}

const _: () = assert!(42 + PEER_MAX <= HEADER_BYTES - 4);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::MemNvram;
    use proptest::prelude::*;

    fn fresh(volume: u64) -> ChangeMap {
        ChangeMap::open(Box::new(MemNvram::new(ChangeMap::region_bytes(volume))), volume).expect("open")
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

    #[test]
    fn a_damaged_header_is_refused() {
        let mut m = fresh(4 * REGION_BYTES);
        m.set_base(Some(ChangeBase { peer: "p".into(), cp: 1 }));
        m.persist().expect("persist");
        let mut bytes = m.nvram.bytes().to_vec();
        bytes[33] ^= 1;
        let mut n = MemNvram::new(bytes.len());
        n.bytes_mut().copy_from_slice(&bytes);
        assert!(matches!(ChangeMap::open(Box::new(n), 4 * REGION_BYTES), Err(ChangeMapError::BadHeader(_))));
        let small = MemNvram::new(10);
        assert!(matches!(ChangeMap::open(Box::new(small), 4 * REGION_BYTES), Err(ChangeMapError::TooSmall { .. })));
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
        fn open_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 300..400)) {
            let mut n = MemNvram::new(bytes.len());
            n.bytes_mut().copy_from_slice(&bytes);
            let _ = ChangeMap::open(Box::new(n), 8 * REGION_BYTES);
        }
    }
}
