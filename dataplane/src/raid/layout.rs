//! RAID-4 geometry: where a volume block lives on the members.
//!
//! Each member holds, in order: a superblock (one block), its checksum area (one crc32c
//! per data-area block, 1024 to a block), and its data area. The checksum area may be
//! larger than the volume needs (sized at creation for the largest size the volume may
//! grow to), so that growing a volume adds rows at the end of the data area and moves
//! nothing. Data-area block `b` of every
//! member forms *row* `b`; the parity member's block `b` is the XOR of the data members'
//! blocks `b`. A *stripe* is `unit_blocks` consecutive rows: volume blocks fill stripe
//! unit 0 of member 0, then unit 0 of member 1, ..., then the next stripe.

use crate::format::BLOCK_BYTES;

/// Checksums held by one checksum-area block.
pub const CSUMS_PER_BLOCK: u64 = (BLOCK_BYTES / 4) as u64;
/// Members a volume may have, parity included (the superblock's member table).
pub const MEMBERS_MAX: usize = 32;
/// The largest stripe unit: 16 MiB.
pub const STRIPE_UNIT_MAX: u32 = 16 << 20;

const B: u64 = BLOCK_BYTES as u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Data members (the parity member is one more, with index `data_disks`).
    pub data_disks: u32,
    /// Bytes per stripe unit, a multiple of the block size.
    pub stripe_unit: u32,
    /// The volume's size as exported, a multiple of the block size.
    pub volume_bytes: u64,
    /// Blocks of the checksum area: at least [`Geometry::csum_blocks`], more where the
    /// volume may grow ([`Geometry::with_room_for`]).
    pub csum_area: u64,
}

/// Where one volume block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub member: usize,
    /// Row, i.e. block number in the member's data area.
    pub row: u64,
}

impl Geometry {
    pub fn new(data_disks: u32, stripe_unit: u32, volume_bytes: u64) -> Result<Self, String> {
        if data_disks < 2 || data_disks as usize >= MEMBERS_MAX {
            return Err(format!(
                "RAID-4 needs 2 to {} data disks and one parity disk, got {data_disks} data disks",
                MEMBERS_MAX - 1
            ));
        }
        if stripe_unit == 0 || !u64::from(stripe_unit).is_multiple_of(B) || stripe_unit > STRIPE_UNIT_MAX {
            return Err(format!(
                "stripe unit {stripe_unit} is not a multiple of {BLOCK_BYTES} bytes between {BLOCK_BYTES} and {STRIPE_UNIT_MAX}"
            ));
        }
        if volume_bytes == 0 || !volume_bytes.is_multiple_of(B) {
            return Err(format!("volume size {volume_bytes} is not a positive multiple of {BLOCK_BYTES}"));
        }
        let mut g = Self { data_disks, stripe_unit, volume_bytes, csum_area: 0 };
        // Every size derived from the geometry must fit a u64.
        g.member_bytes_checked().ok_or_else(|| format!("volume size {volume_bytes} is too large"))?;
        g.csum_area = g.csum_blocks();
        Ok(g)
    }

    /// This geometry with a checksum area of `blocks` (at least what the volume needs now).
    pub fn with_csum_area(self, blocks: u64) -> Result<Self, String> {
        if blocks < self.csum_blocks() {
            return Err(format!(
                "a checksum area of {blocks} blocks is too small: the volume's {} rows need {}",
                self.rows(),
                self.csum_blocks()
            ));
        }
        if blocks > u64::from(u32::MAX) {
            return Err(format!("a checksum area of {blocks} blocks is too large"));
        }
        let g = Self { csum_area: blocks, ..self };
        g.member_bytes_checked().ok_or_else(|| format!("a checksum area of {blocks} blocks is too large"))?;
        Ok(g)
    }

    /// This geometry with a checksum area large enough for the volume to grow to
    /// `max_bytes` (rounded down to whole blocks; no smaller than the volume needs now).
    pub fn with_room_for(self, max_bytes: u64) -> Result<Self, String> {
        let max_bytes = (max_bytes / B * B).max(self.volume_bytes);
        let big = Self::new(self.data_disks, self.stripe_unit, max_bytes)
            .map_err(|e| format!("room to grow to {max_bytes} bytes: {e}"))?;
        self.with_csum_area(big.csum_blocks())
    }

    /// The largest volume this geometry's checksum area has room for.
    pub fn max_volume_bytes(&self) -> u64 {
        let stripes = self.csum_area.saturating_mul(CSUMS_PER_BLOCK) / self.unit_blocks();
        stripes.saturating_mul(self.stripe_data_blocks()).saturating_mul(B)
    }

    /// The same layout grown to `volume_bytes`: the same members, stripe unit and
    /// checksum area, more rows.
    pub fn grown(self, volume_bytes: u64) -> Result<Self, String> {
        if volume_bytes < self.volume_bytes {
            return Err(format!("a volume of {} bytes cannot shrink to {volume_bytes}", self.volume_bytes));
        }
        let g = Self::new(self.data_disks, self.stripe_unit, volume_bytes)?;
        if g.csum_blocks() > self.csum_area {
            return Err(format!(
                "the volume can grow to {} bytes at most: its checksum area was sized for that when it was created",
                self.max_volume_bytes()
            ));
        }
        let g = Self { csum_area: self.csum_area, ..g };
        g.member_bytes_checked().ok_or_else(|| format!("volume size {volume_bytes} is too large"))?;
        Ok(g)
    }

    /// Whether `other` is this layout at another size (a superblock round that a crash
    /// cut short while the volume grew).
    pub fn same_layout(&self, other: &Geometry) -> bool {
        self.data_disks == other.data_disks
            && self.stripe_unit == other.stripe_unit
            && self.csum_area == other.csum_area
    }

    pub fn members(&self) -> usize {
        self.data_disks as usize + 1
    }
    pub fn parity_member(&self) -> usize {
        self.data_disks as usize
    }
    pub fn unit_blocks(&self) -> u64 {
        u64::from(self.stripe_unit) / B
    }
    pub fn stripe_data_blocks(&self) -> u64 {
        self.unit_blocks() * u64::from(self.data_disks)
    }
    pub fn volume_blocks(&self) -> u64 {
        self.volume_bytes / B
    }
    pub fn stripes(&self) -> u64 {
        self.volume_blocks().div_ceil(self.stripe_data_blocks())
    }
    /// Rows: data-area blocks per member.
    pub fn rows(&self) -> u64 {
        self.stripes() * self.unit_blocks()
    }
    /// Checksum blocks the volume's rows use (the area may hold more).
    pub fn csum_blocks(&self) -> u64 {
        self.rows().div_ceil(CSUMS_PER_BLOCK)
    }
    /// Byte offset of the checksum area on each member.
    pub fn csum_offset(&self) -> u64 {
        B
    }
    /// Byte offset of the data area on each member.
    pub fn data_offset(&self) -> u64 {
        (1 + self.csum_area) * B
    }
    fn member_bytes_checked(&self) -> Option<u64> {
        let unit = self.unit_blocks();
        let stripes = self.volume_blocks().div_ceil(unit.checked_mul(u64::from(self.data_disks))?);
        let rows = stripes.checked_mul(unit)?;
        let csum = rows.div_ceil(CSUMS_PER_BLOCK).max(self.csum_area);
        (1 + csum).checked_add(rows)?.checked_mul(B)
    }
    /// Bytes each member must hold.
    pub fn member_bytes(&self) -> u64 {
        self.member_bytes_checked().expect("checked in Geometry::new")
    }

    /// Where volume block `vbn` lives.
    pub fn place(&self, vbn: u64) -> Place {
        debug_assert!(vbn < self.volume_blocks());
        let unit = self.unit_blocks();
        let stripe = vbn / self.stripe_data_blocks();
        let within = vbn % self.stripe_data_blocks();
        Place { member: crate::usize_of(within / unit), row: stripe * unit + within % unit }
    }

    /// The volume block at `member`'s `row`, or `None` where that block lies past the
    /// volume's end (the tail of the last stripe) or `member` is the parity member.
    pub fn vbn(&self, member: usize, row: u64) -> Option<u64> {
        if member >= self.data_disks as usize || row >= self.rows() {
            return None;
        }
        let unit = self.unit_blocks();
        let v = (row / unit) * self.stripe_data_blocks() + member as u64 * unit + row % unit;
        (v < self.volume_blocks()).then_some(v)
    }

    pub fn stripe_of_row(&self, row: u64) -> u64 {
        row / self.unit_blocks()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_layout() {
        // 3 data disks, 2-block units: blocks 0,1 on member 0, 2,3 on member 1, 4,5 on
        // member 2, then 6,7 on member 0 rows 2,3.
        let g = Geometry::new(3, 8192, 10 * B).unwrap();
        let places: Vec<(usize, u64)> = (0..10).map(|v| g.place(v)).map(|p| (p.member, p.row)).collect();
        assert_eq!(places, [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (0, 2), (0, 3), (1, 2), (1, 3)]);
        assert_eq!(g.stripes(), 2);
        assert_eq!(g.rows(), 4);
        assert_eq!(g.vbn(2, 2), None, "past the volume end");
        assert_eq!(g.vbn(3, 0), None, "parity");
        assert_eq!(g.data_offset(), 2 * B);
        assert_eq!(g.member_bytes(), 6 * B);
    }

    #[test]
    fn bad_geometry_is_refused() {
        assert!(Geometry::new(1, 4096, B).is_err());
        assert!(Geometry::new(3, 1000, B).is_err());
        assert!(Geometry::new(3, 0, B).is_err());
        assert!(Geometry::new(3, 4096, 0).is_err());
        assert!(Geometry::new(3, 4096, 100).is_err());
        assert!(Geometry::new(40, 4096, B).is_err());
    }

    #[test]
    fn room_to_grow_moves_nothing() {
        let g = Geometry::new(3, 65536, 64 << 20).unwrap();
        assert_eq!(g.csum_area, g.csum_blocks());
        let roomy = g.with_room_for(1 << 40).unwrap();
        assert!(roomy.csum_area > g.csum_area && roomy.max_volume_bytes() >= 1 << 40);
        assert!(roomy.member_bytes() > g.member_bytes(), "the checksum area is part of each member");
        let grown = roomy.grown(1 << 40).unwrap();
        assert_eq!(grown.data_offset(), roomy.data_offset(), "the data area stays where it was");
        for v in [0, 12_345, (64 << 20) / B - 1] {
            assert_eq!(grown.place(v), roomy.place(v), "block {v} moved");
        }
        assert!(grown.same_layout(&roomy) && !grown.same_layout(&g));
        let e = roomy.grown(roomy.max_volume_bytes() + (16 << 20)).unwrap_err();
        assert!(e.contains("can grow to"), "{e}");
        assert!(roomy.grown(B).unwrap_err().contains("cannot shrink"));
        // Without room, a volume grows only within its last checksum block's rows.
        assert!(g.grown(g.max_volume_bytes()).is_ok() && g.grown(g.max_volume_bytes() + (1 << 20)).is_err());
        assert!(g.with_csum_area(g.csum_area - 1).is_err());
    }

    proptest! {
        #[test]
        fn place_and_vbn_are_inverse(disks in 2u32..8, unit in 1u32..9, blocks in 1u64..500) {
            let g = Geometry::new(disks, unit * 4096, blocks * B).unwrap();
            let mut seen = std::collections::HashSet::new();
            for v in 0..blocks {
                let p = g.place(v);
                prop_assert!(p.member < disks as usize && p.row < g.rows());
                prop_assert!(seen.insert((p.member, p.row)), "two blocks at one place");
                prop_assert_eq!(g.vbn(p.member, p.row), Some(v));
            }
            prop_assert!(g.rows() * u64::from(disks) >= blocks);
            prop_assert!(g.rows() * u64::from(disks) < blocks + g.stripe_data_blocks());
            prop_assert!(g.csum_blocks() * CSUMS_PER_BLOCK >= g.rows());
        }
    }
}
