//! The RAID-4 superblock: block 0 of every member.
//!
//! | offset | bytes | field                                                     |
//! |--------|-------|-----------------------------------------------------------|
//! | 0      | 8     | magic `NVMRAID4`                                          |
//! | 8      | 4     | version (1)                                               |
//! | 12     | 4     | flags: bit 0 dirty (writes may be in flight since the last flush) |
//! | 16     | 16    | volume uuid (the same on every member)                    |
//! | 32     | 4     | this member's index (data 0..N-1, parity N)               |
//! | 36     | 4     | data disks N                                              |
//! | 40     | 4     | stripe unit, bytes                                        |
//! | 44     | 4     | checksum area, blocks (0: as the volume size needs, as written before growth) |
//! | 48     | 8     | volume bytes                                              |
//! | 56     | 8     | events: bumped on every change of the member table        |
//! | 64     | 32    | member table: one state byte per member (0 in sync, 1 failed, 2 rebuilding) |
//! | 96     | 8     | rebuild cursor: rows rebuilt on the rebuilding member     |
//! | 104    | 8     | creation time, Unix ms                                    |
//! | 112    | 4     | crc32c of bytes 0..112                                    |
//!
//! All integers little-endian. The member with the highest `events` holds the truth about
//! the others; a member whose own `events` is two or more lower missed changes and is
//! stale.
//!
//! Crash atomicity: the superblock lies whole in the first 512-byte sector of block 0 and
//! is written by one aligned write and a flush per member, so each member's copy is old or
//! new after a cut (disks write a sector whole). A round is written member by member: a
//! cut in between leaves members one event apart, which [`super::Raid4::open`] tells from
//! a member that missed changes (two rounds at least: its failure and its return) and
//! finishes at the same event.
//!
//! The dirty flag (no change of `events`): set on every member before the first write
//! after a flush reaches any member, cleared after a flush. A volume found dirty had writes
//! in flight when it stopped, whose rows may hold data and parity out of step (the redo
//! of the log that fed them puts them right); found dirty and degraded, a missing member's
//! blocks in those rows cannot be told from parity (the RAID-4 write hole), and the volume
//! does not start.

use thiserror::Error;

use super::layout::{Geometry, MEMBERS_MAX};

pub const MAGIC: [u8; 8] = *b"NVMRAID4";
pub const VERSION: u32 = 1;
pub const SUPERBLOCK_BYTES: usize = 116;
const CRC_AT: usize = 112;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    InSync,
    Failed,
    /// Being rebuilt: rows below the superblock's rebuild cursor are in sync.
    Rebuilding,
}

impl MemberState {
    fn byte(self) -> u8 {
        match self {
            MemberState::InSync => 0,
            MemberState::Failed => 1,
            MemberState::Rebuilding => 2,
        }
    }
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(MemberState::InSync),
            1 => Some(MemberState::Failed),
            2 => Some(MemberState::Rebuilding),
            _ => None,
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            MemberState::InSync => "in-sync",
            MemberState::Failed => "failed",
            MemberState::Rebuilding => "rebuilding",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub member_index: u32,
    pub geometry: Geometry,
    pub events: u64,
    pub members: Vec<MemberState>,
    pub rebuild_cursor: u64,
    pub created_unix_ms: u64,
    /// Writes may have been in flight since the last flush (see the module docs).
    pub dirty: bool,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SuperblockError {
    #[error("no superblock (the member holds {0} bytes, a superblock needs {SUPERBLOCK_BYTES})")]
    Truncated(usize),
    #[error("no RAID-4 superblock (bad magic)")]
    BadMagic,
    #[error("superblock version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    #[error("superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("superblock geometry is invalid: {0}")]
    Geometry(String),
    #[error("superblock member index {index} is out of range for {members} members")]
    Index { index: u32, members: usize },
    #[error("superblock member table holds an unknown state {0}")]
    State(u8),
    #[error("superblock flags {0:#x} hold bits this build does not know")]
    Flags(u32),
}

const FLAG_DIRTY: u32 = 1;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Superblock {
    pub fn encode(&self) -> [u8; SUPERBLOCK_BYTES] {
        assert!(self.members.len() == self.geometry.members() && self.members.len() <= MEMBERS_MAX);
        let mut b = [0u8; SUPERBLOCK_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let flags = if self.dirty { FLAG_DIRTY } else { 0 };
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..32].copy_from_slice(&self.uuid);
        b[32..36].copy_from_slice(&self.member_index.to_le_bytes());
        b[36..40].copy_from_slice(&self.geometry.data_disks.to_le_bytes());
        b[40..44].copy_from_slice(&self.geometry.stripe_unit.to_le_bytes());
        let area = u32::try_from(self.geometry.csum_area).expect("checked in Geometry::with_csum_area");
        b[44..48].copy_from_slice(&area.to_le_bytes());
        b[48..56].copy_from_slice(&self.geometry.volume_bytes.to_le_bytes());
        b[56..64].copy_from_slice(&self.events.to_le_bytes());
        for (i, s) in self.members.iter().enumerate() {
            b[64 + i] = s.byte();
        }
        b[96..104].copy_from_slice(&self.rebuild_cursor.to_le_bytes());
        b[104..112].copy_from_slice(&self.created_unix_ms.to_le_bytes());
        let crc = crate::checksum::crc32c(&b[..CRC_AT]);
        b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, SuperblockError> {
        if b.len() < SUPERBLOCK_BYTES {
            return Err(SuperblockError::Truncated(b.len()));
        }
        if b[0..8] != MAGIC {
            return Err(SuperblockError::BadMagic);
        }
        let stored = u32_at(b, CRC_AT);
        let computed = crate::checksum::crc32c(&b[..CRC_AT]);
        if stored != computed {
            return Err(SuperblockError::Checksum { stored, computed });
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(SuperblockError::Version(version));
        }
        let flags = u32_at(b, 12);
        if flags & !FLAG_DIRTY != 0 {
            return Err(SuperblockError::Flags(flags));
        }
        let mut geometry =
            Geometry::new(u32_at(b, 36), u32_at(b, 40), u64_at(b, 48)).map_err(SuperblockError::Geometry)?;
        if u32_at(b, 44) != 0 {
            geometry = geometry.with_csum_area(u64::from(u32_at(b, 44))).map_err(SuperblockError::Geometry)?;
        }
        let n = geometry.members();
        let member_index = u32_at(b, 32);
        if member_index as usize >= n {
            return Err(SuperblockError::Index { index: member_index, members: n });
        }
        let members = b[64..64 + n]
            .iter()
            .map(|&s| MemberState::from_byte(s).ok_or(SuperblockError::State(s)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            uuid: b[16..32].try_into().expect("16 bytes"),
            member_index,
            geometry,
            events: u64_at(b, 56),
            members,
            rebuild_cursor: u64_at(b, 96),
            created_unix_ms: u64_at(b, 104),
            dirty: flags & FLAG_DIRTY != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Superblock {
        Superblock {
            uuid: [7; 16],
            member_index: 2,
            geometry: Geometry::new(3, 65536, 1 << 30).unwrap().with_room_for(1 << 40).unwrap(),
            events: 9,
            members: vec![MemberState::InSync, MemberState::Failed, MemberState::InSync, MemberState::Rebuilding],
            rebuild_cursor: 123,
            created_unix_ms: 1_700_000_000_000,
            dirty: true,
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(Superblock::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn damage_is_named() {
        let s = sample().encode();
        assert_eq!(Superblock::decode(&s[..50]), Err(SuperblockError::Truncated(50)));
        assert_eq!(Superblock::decode(&[0u8; 4096]), Err(SuperblockError::BadMagic));
        let mut flipped = s;
        flipped[50] ^= 1;
        assert!(matches!(Superblock::decode(&flipped), Err(SuperblockError::Checksum { .. })));
        // A well-formed superblock with impossible contents: re-sealed after the change.
        let reseal = |mut b: [u8; SUPERBLOCK_BYTES], at: usize, v: u8| {
            b[at] = v;
            let crc = crate::checksum::crc32c(&b[..CRC_AT]);
            b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        assert_eq!(Superblock::decode(&reseal(s, 8, 2)), Err(SuperblockError::Version(2)));
        assert!(matches!(Superblock::decode(&reseal(s, 36, 1)), Err(SuperblockError::Geometry(_))));
        assert_eq!(Superblock::decode(&reseal(s, 32, 9)), Err(SuperblockError::Index { index: 9, members: 4 }));
        assert_eq!(Superblock::decode(&reseal(s, 65, 7)), Err(SuperblockError::State(7)));
        assert_eq!(Superblock::decode(&reseal(s, 12, 3)), Err(SuperblockError::Flags(3)));
    }

    #[test]
    fn the_checksum_area_is_read_back_and_zero_means_as_the_size_needs() {
        let s = sample();
        assert!(s.geometry.csum_area > s.geometry.csum_blocks());
        let mut b = s.encode();
        let reseal = |b: &mut [u8; SUPERBLOCK_BYTES]| {
            let crc = crate::checksum::crc32c(&b[..CRC_AT]);
            b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        };
        // Written before volumes could grow: zero, the area the size needs.
        b[44..48].fill(0);
        reseal(&mut b);
        let old = Superblock::decode(&b).unwrap();
        assert_eq!(old.geometry.csum_area, old.geometry.csum_blocks());
        // An area too small for the volume is refused, not trusted.
        b[44..48].copy_from_slice(&1u32.to_le_bytes());
        reseal(&mut b);
        assert!(matches!(Superblock::decode(&b), Err(SuperblockError::Geometry(_))));
    }

    proptest! {
        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Superblock::decode(&bytes);
        }

        #[test]
        fn any_single_bit_flip_is_detected(bit in 0usize..(CRC_AT * 8)) {
            let mut b = sample().encode();
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Superblock::decode(&b).is_err());
        }
    }
}
