//! Replication frames: the messages of the data path and the control channel beside it.
//! The message table and the protocol's invariants are in `dataplane/src/transport/README.md`.
//!
//! ```text
//! frame header (16 bytes), then `body_len` bytes of body
//!  0 magic u32 "NVMF" | 4 version u8 | 5 kind u8 | 6 flags u16 (a hello's features; on
//!    `Entries`, [`FLAG_HEADER_CRC`]; else 0)
//!  8 body_len u32 | 12 crc32c u32 (header[0..12] + body; with FLAG_HEADER_CRC, header[0..12]
//!    + the body's 12-byte prefix)
//! ```
//! Strings are a u16 length and UTF-8 bytes, at most [`STRING_MAX`] bytes.
//!
//! The messages and their constants are here; their encoding and decoding in `codec`.

use thiserror::Error;

use super::auth::{Nonce, Proof, MAC_BYTES, NONCE_BYTES};
use crate::format::{crc32c, PARTITION_HEADER_BYTES};

pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"NVMF");
pub const FRAME_VERSION: u8 = 1;
pub const FRAME_HEADER_BYTES: usize = 16;
/// The largest body a peer may send: a batch of entries or a block of baseline data.
pub const BODY_MAX: usize = 8 << 20;
/// The most log bytes one `LogBytes` frame carries: small enough for the source's reply
/// buffer, which it reads without waiting.
pub const LOG_BYTES_CHUNK: usize = 32 << 10;
pub const STRING_MAX: usize = 255;

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported frame version {0}")]
    BadVersion(u8),
    #[error("frame body of {0} bytes is above the maximum {BODY_MAX}")]
    TooLarge(u32),
    #[error("frame checksum mismatch")]
    BadChecksum,
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    #[error("frame body truncated in {0}")]
    Truncated(&'static str),
    #[error("frame {0} has {1} trailing bytes")]
    Trailing(&'static str, usize),
    #[error("bad field in {0}: {1}")]
    BadField(&'static str, &'static str),
}

/// Why the source opened the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Intent {
    /// Continue from what the destination holds (after a link blip or a destination
    /// restart).
    Resume = 1,
    /// Start the mirror over with a full copy.
    Baseline = 2,
    /// Keep the mirror's contents and copy only the regions changed since the last
    /// consistent point the two share (a delta resync); the logs start over as with a
    /// baseline.
    Resync = 3,
}

/// What the destination holds of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogTail {
    pub open: bool,
    pub cp_gen: u64,
    pub first_seq: u64,
    pub next_seq: u64,
    pub tail: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub source_node: String,
    pub volume: String,
    pub volume_id: u64,
    pub epoch: u64,
    pub volume_bytes: u64,
    pub partition_bytes: u64,
    pub intent: Intent,
    /// With `Baseline`: everything before this sequence number is on the source's volume
    /// (and so in the baseline copy); the logs start here.
    pub base_seq: u64,
    /// With `Baseline`: the CP generation of the first partition the logs will hold.
    pub base_cp_gen: u64,
    /// What the source understands beyond this protocol's first version ([`FEATURE_COPY_MARKS`]),
    /// carried in the frame header's flags, which a destination that predates them ignores.
    pub features: u16,
}

/// A hello's feature: the source marks its copies' progress (`CopyMark`) before each CP
/// while a copy runs, where the destination's welcome asks for it (`Welcome::copy_marks`).
pub const FEATURE_COPY_MARKS: u16 = 1;

/// A hello's feature: the source may send `Entries` frames under [`FLAG_HEADER_CRC`], where
/// the destination's welcome takes them (`Welcome::header_crc_entries`).
pub const FEATURE_HEADER_CRC_ENTRIES: u16 = 2;

/// A hello's feature: the source says where clients reach the volume through it
/// (`SourcePaths`), where the destination's welcome takes it (`Welcome::source_paths`).
pub const FEATURE_SOURCE_PATHS: u16 = 4;

/// A frame flag, valid on `Entries` only: the frame's crc covers header[0..12] and the
/// body's prefix (partition and offset), not the entries after it. Each entry carries its
/// own crc32c over its header and data, and the destination checks every one before it
/// places any of the frame's entries (`LogFile::place`): the entries' bytes are checked
/// once on each side of the link instead of twice. (An entry's padding, which nothing
/// reads, is covered by neither.)
pub const FLAG_HEADER_CRC: u16 = 1;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Welcome {
    pub epoch: u64,
    pub applied_cp: u64,
    pub applied_seq: u64,
    /// Whether the mirror holds a complete baseline.
    pub consistent: bool,
    /// Whether the mirror can be brought level by a delta resync (consistent, or in the
    /// middle of one). Encoded in the same byte as `consistent` (bit 1).
    pub resyncable: bool,
    /// The destination checks copy marks: every CP sent while a copy runs follows a
    /// `CopyMark` (bit 2 of that byte; set only for a hello with [`FEATURE_COPY_MARKS`], so
    /// a source that predates it never sees the bit).
    pub copy_marks: bool,
    /// The destination takes `Entries` frames under [`FLAG_HEADER_CRC`] (bit 3 of that
    /// byte; set only for a hello with [`FEATURE_HEADER_CRC_ENTRIES`]).
    pub header_crc_entries: bool,
    /// The destination takes `SourcePaths` (bit 4; set only for a hello with
    /// [`FEATURE_SOURCE_PATHS`]), and says its own paths after the logs (`mirror_nvmf`).
    pub source_paths: bool,
    pub logs: [LogTail; 2],
    /// With `source_paths`: where clients reach the volume through the destination over
    /// NVMe/TCP (empty: none). Encoded after the logs, only then.
    pub mirror_nvmf: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockPurpose {
    CpByValue = 1,
    Baseline = 2,
    /// A region of a delta resync.
    Resync = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RefuseCode {
    StaleEpoch = 1,
    Mismatch = 2,
    Busy = 3,
    Broken = 4,
    Internal = 5,
    /// Authentication is missing or failed on one side (`--secret-file`).
    Unauthenticated = 6,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Hello(Hello),
    Welcome(Welcome),
    Refuse {
        code: RefuseCode,
        reason: String,
    },
    PartitionOpen {
        header: [u8; PARTITION_HEADER_BYTES],
    },
    /// Entry bytes to place at `offset` of the partition's log file.
    Entries {
        partition: u8,
        offset: u64,
        bytes: &'a [u8],
    },
    /// CP `cp` covers partition `partition` up to `upto_seq`; by reference from the log
    /// file, or by value from the `BlockData` frames sent just before it.
    Cp {
        cp: u64,
        partition: u8,
        upto_seq: u64,
        by_value: bool,
    },
    BlockData {
        purpose: BlockPurpose,
        offset: u64,
        data: &'a [u8],
    },
    /// `len` bytes at `offset` that read as zeroes on the source, for a baseline or a
    /// resync: sent as a range, not as data, and written as zeroes only where the mirror
    /// does not read as zeroes already (it stays sparse).
    ZeroRange {
        purpose: BlockPurpose,
        offset: u64,
        len: u64,
    },
    BaselineDone {
        volume_bytes: u64,
    },
    /// A delta resync sent `bytes` of region data in `chunks` frames: the destination
    /// checks it received as much before it counts the mirror consistent.
    ResyncDone {
        bytes: u64,
        chunks: u64,
    },
    /// Where the copy under way stands, right before a CP: the destination has received
    /// every piece of it up to byte `next` (a baseline's next offset; a resync's regions
    /// below it), `bytes` in `chunks` frames, or it ends the session. The CP's `CpDone`
    /// then vouches for that much of the copy.
    CopyMark {
        next: u64,
        bytes: u64,
        chunks: u64,
    },
    /// Where clients reach the volume through the source: its NVMe/TCP address (empty:
    /// none), which the mirror's discovery controller lists as the volume's other path.
    /// Sent after the welcome of every connection, where the welcome takes it.
    SourcePaths {
        nvmf: String,
    },
    /// Every entry up to `seq` is persistent in the destination's log files.
    Ack {
        seq: u64,
    },
    CpDone {
        cp: u64,
    },
    BaselineAck,
    /// A fatal error; the sender closes the connection after it.
    Error {
        reason: String,
    },
    /// The source asks to place entries by RDMA instead of `Entries` frames.
    RdmaSetup,
    /// Where to connect the RDMA queue pair (rdma_cm address), and the token to present as
    /// its private data.
    RdmaListen {
        addr: String,
        token: u64,
    },
    /// The destination's registered log files, per partition: address, key, length.
    RdmaRegions {
        regions: [RdmaRegion; 2],
    },
    /// The source asks for the destination's log bytes of `partition` from `offset` to
    /// the destination's tail: after a crash, the source's own log may end earlier (a torn
    /// last batch, or an entry that fails its checksum), and what the destination holds
    /// past that point was persistent there, acknowledged to clients perhaps: the mirror's
    /// copy serves (see `LogBytes`, `LogFetchEnd`).
    LogFetch {
        partition: u8,
        offset: u64,
    },
    /// Log bytes of `partition` at `offset`, in answer to `LogFetch` (as many frames as it
    /// takes, in order, each at most `LOG_BYTES_CHUNK` bytes).
    LogBytes {
        partition: u8,
        offset: u64,
        bytes: &'a [u8],
    },
    /// The last answer to `LogFetch`: the destination's log of `partition` ends at `tail`.
    LogFetchEnd {
        partition: u8,
        tail: u64,
    },
    /// The source asks to authenticate, with its nonce: its first frame where it holds a
    /// secret.
    AuthRequest {
        nonce: Nonce,
    },
    /// The destination's challenge: its nonce.
    AuthChallenge {
        nonce: Nonce,
    },
    /// A proof of the secret over the handshake (`auth.rs`): the source's right after its
    /// hello, the destination's right before its welcome or refusal.
    AuthProof {
        proof: Proof,
    },
}

/// One registered log file, as the source addresses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RdmaRegion {
    pub addr: u64,
    pub rkey: u32,
    pub len: u64,
}

const K_HELLO: u8 = 1;
const K_WELCOME: u8 = 2;
const K_REFUSE: u8 = 3;
const K_PARTITION_OPEN: u8 = 4;
const K_ENTRIES: u8 = 5;
const K_CP: u8 = 7;
const K_BLOCK_DATA: u8 = 8;
const K_BASELINE_DONE: u8 = 9;
const K_ACK: u8 = 10;
const K_CP_DONE: u8 = 11;
const K_BASELINE_ACK: u8 = 12;
const K_ERROR: u8 = 13;
const K_RDMA_SETUP: u8 = 14;
const K_RDMA_LISTEN: u8 = 15;
const K_RDMA_REGIONS: u8 = 16;
const K_RESYNC_DONE: u8 = 17;
const K_LOG_FETCH: u8 = 18;
const K_LOG_BYTES: u8 = 19;
const K_LOG_FETCH_END: u8 = 20;
const K_ZERO_RANGE: u8 = 21;
const K_COPY_MARK: u8 = 22;
const K_SOURCE_PATHS: u8 = 23;
// The handshake's authentication frames, apart from the data path's kinds.
const K_AUTH_REQUEST: u8 = 32;
const K_AUTH_CHALLENGE: u8 = 33;
const K_AUTH_PROOF: u8 = 34;

/// Prefix of an `Entries` body before the entry bytes.
pub const ENTRIES_PREFIX_BYTES: usize = 12;
/// Prefix of a `BlockData` body before the data.
pub const BLOCK_DATA_PREFIX_BYTES: usize = 12;

mod codec;
#[cfg(test)]
mod tests;

pub use codec::{decode, decode_header, entries_prefix, frame_crc, frame_header};
