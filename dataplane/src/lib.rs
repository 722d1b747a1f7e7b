//! nvmirror data plane.
//!
//! The write path, in folder order: a client request arrives through a front end
//! ([`frontend`]), is appended as an entry to the volume's NVLog ([`log`]) by the volume's
//! pinned poller ([`source`]), is forwarded over a replication transport ([`transport`])
//! into the destination's per-source log file ([`destination`]), and is acknowledged once
//! persistent on both sites. Consistency points ([`cp`]) push the dirty blocks into the
//! volumes behind the [`storage`] trait on each side.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod frontend;
pub mod clock;
pub mod cp;
pub mod destination;
pub mod format;
pub mod log;
pub mod nvram;
pub mod poller;
pub mod source;
pub mod storage;
pub mod transport;
