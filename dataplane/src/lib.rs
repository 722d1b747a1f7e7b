//! nvmirror data plane.
//!
//! The write path, in folder order: a client request arrives through a front end
//! ([`frontend`]), is appended as an entry to the volume's NVLog ([`log`]) by the volume's
//! pinned poller ([`source`]), is forwarded over a replication transport ([`transport`])
//! into the destination's per-source log file ([`destination`]), and is acknowledged once
//! persistent on both sites. Consistency points ([`cp`]) push the dirty blocks into the
//! volumes behind the [`storage`] trait on each side.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod checksum;
pub mod clock;
pub mod cp;
pub mod destination;
pub mod format;
pub mod frontend;
pub mod log;
pub mod node;
pub mod nvram;
pub mod poller;
pub mod raid;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod source;
pub mod storage;
#[cfg(test)]
mod tear;
pub mod transport;

// nvmirror maps whole logs and volumes' offsets into memory sizes: it is built for 64-bit
// targets only, where a u64 offset or length always fits a usize.
const _: () = assert!(usize::BITS == 64, "nvmirror supports 64-bit targets only");

/// A u64 byte count or offset as a usize (lossless: 64-bit targets only, checked above).
#[allow(clippy::cast_possible_truncation)]
#[inline]
pub const fn usize_of(v: u64) -> usize {
    v as usize
}
