//! RAID-4: N data disks and one dedicated parity disk, under every volume and mirror.
//!
//! - [`layout`]: where blocks, parity and checksums live on the members;
//! - [`superblock`]: block 0 of each member (geometry, member table, events);
//! - [`xor`]: parity by SIMD XOR;
//! - [`volume`]: [`Raid4`], its assembly, checksums, read and write paths, degraded mode;
//! - [`maintain`]: scrub and rebuild.
//!
//! The mirror's RAID layer is independent of the primary's: each node picks its own
//! geometry, and the mirror protocol carries volume blocks, never member blocks.

pub mod layout;
pub mod maintain;
mod scratch;
pub mod superblock;
pub mod volume;
pub mod xor;

#[cfg(test)]
mod tests;

pub use layout::Geometry;
pub use maintain::{Progress, ScrubReport};
pub use superblock::MemberState;
pub use volume::{Raid4, RaidError, RaidStatus, WriteHole};
