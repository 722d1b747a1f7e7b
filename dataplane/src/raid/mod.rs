//! RAID-4: N data disks and one dedicated parity disk.
pub mod xor;
