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

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        let s = &s.as_bytes()[..s.len().min(STRING_MAX)];
        self.u16(u16::try_from(s.len()).expect("bounded by STRING_MAX"));
        self.0.extend_from_slice(s);
    }
    /// The layout of `Entries`, `BlockData` and `LogBytes`: a byte, three of padding, an
    /// offset, then the bytes to the end of the body.
    fn bulk(&mut self, small: u8, offset: u64, bytes: &[u8]) {
        self.u8(small);
        self.0.extend_from_slice(&[0; 3]);
        self.u64(offset);
        self.0.extend_from_slice(bytes);
    }
}

struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Truncated(self.what));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn str(&mut self) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        if n > STRING_MAX {
            return Err(WireError::BadField(self.what, "string too long"));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::BadField(self.what, "string is not UTF-8"))
    }
    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::BadField(self.what, "boolean not 0 or 1")),
        }
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    /// The layout [`Writer::bulk`] writes: the byte, the offset and the bytes.
    fn bulk(&mut self) -> Result<(u8, u64, &'a [u8]), WireError> {
        let small = self.u8()?;
        self.take(3)?;
        let offset = self.u64()?;
        Ok((small, offset, self.rest()))
    }
    fn end(self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.what, self.b.len()))
        }
    }
}

/// The frame header for a body of `body_len` bytes whose crc (over header[0..12] and the
/// body) is computed by the caller through [`frame_crc`].
pub fn frame_header(kind: u8, body_len: usize, crc: u32) -> [u8; FRAME_HEADER_BYTES] {
    let mut h = [0u8; FRAME_HEADER_BYTES];
    h[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    h[4] = FRAME_VERSION;
    h[5] = kind;
    h[8..12].copy_from_slice(&u32::try_from(body_len).expect("body below BODY_MAX").to_le_bytes());
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// crc32c over the first 12 header bytes and the body parts.
pub fn frame_crc(kind: u8, body_len: usize, body: &[&[u8]]) -> u32 {
    let h = frame_header(kind, body_len, 0);
    let mut crc = crate::checksum::Crc32cStream::new();
    crc.update(&h[..12]);
    for part in body {
        crc.update(part);
    }
    crc.finish()
}

/// The header and body prefix of an `Entries` frame; the entry bytes follow it on the
/// wire unchanged (sent straight from the NVLog). With `header_crc` (where the
/// destination's welcome takes it), the frame's crc covers the header and this prefix
/// only ([`FLAG_HEADER_CRC`]).
pub fn entries_prefix(
    partition: u8,
    offset: u64,
    bytes: &[u8],
    header_crc: bool,
) -> [u8; FRAME_HEADER_BYTES + ENTRIES_PREFIX_BYTES] {
    let mut prefix = [0u8; ENTRIES_PREFIX_BYTES];
    prefix[0] = partition;
    prefix[4..12].copy_from_slice(&offset.to_le_bytes());
    let body_len = ENTRIES_PREFIX_BYTES + bytes.len();
    let mut header = frame_header(K_ENTRIES, body_len, 0);
    let covered: &[u8] = if header_crc {
        header[6..8].copy_from_slice(&FLAG_HEADER_CRC.to_le_bytes());
        &[]
    } else {
        bytes
    };
    let crc = crc32c(&[&header[..12], &prefix, covered]);
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    let mut out = [0u8; FRAME_HEADER_BYTES + ENTRIES_PREFIX_BYTES];
    out[..FRAME_HEADER_BYTES].copy_from_slice(&header);
    out[FRAME_HEADER_BYTES..].copy_from_slice(&prefix);
    out
}

impl Message<'_> {
    /// Encodes the whole frame (header and body).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(64));
        let kind = match self {
            Message::Hello(h) => {
                w.str(&h.source_node);
                w.str(&h.volume);
                w.u64(h.volume_id);
                w.u64(h.epoch);
                w.u64(h.volume_bytes);
                w.u64(h.partition_bytes);
                w.u8(h.intent as u8);
                w.u64(h.base_seq);
                w.u64(h.base_cp_gen);
                K_HELLO
            }
            Message::Welcome(wl) => {
                w.u64(wl.epoch);
                w.u64(wl.applied_cp);
                w.u64(wl.applied_seq);
                w.u8(u8::from(wl.consistent)
                    | (u8::from(wl.resyncable) << 1)
                    | (u8::from(wl.copy_marks) << 2)
                    | (u8::from(wl.header_crc_entries) << 3)
                    | (u8::from(wl.source_paths) << 4));
                for t in &wl.logs {
                    w.u8(u8::from(t.open));
                    w.u64(t.cp_gen);
                    w.u64(t.first_seq);
                    w.u64(t.next_seq);
                    w.u64(t.tail);
                }
                if wl.source_paths {
                    w.str(&wl.mirror_nvmf);
                }
                K_WELCOME
            }
            Message::Refuse { code, reason } => {
                w.u16(*code as u16);
                w.str(reason);
                K_REFUSE
            }
            Message::PartitionOpen { header } => {
                w.0.extend_from_slice(header);
                K_PARTITION_OPEN
            }
            Message::Entries { partition, offset, bytes } => {
                w.bulk(*partition, *offset, bytes);
                K_ENTRIES
            }
            Message::Cp { cp, partition, upto_seq, by_value } => {
                w.u64(*cp);
                w.u8(*partition);
                w.u64(*upto_seq);
                w.u8(u8::from(*by_value));
                K_CP
            }
            Message::BlockData { purpose, offset, data } => {
                w.bulk(*purpose as u8, *offset, data);
                K_BLOCK_DATA
            }
            Message::ZeroRange { purpose, offset, len } => {
                w.u8(*purpose as u8);
                w.u64(*offset);
                w.u64(*len);
                K_ZERO_RANGE
            }
            Message::BaselineDone { volume_bytes } => {
                w.u64(*volume_bytes);
                K_BASELINE_DONE
            }
            Message::CopyMark { next, bytes, chunks } => {
                w.u64(*next);
                w.u64(*bytes);
                w.u64(*chunks);
                K_COPY_MARK
            }
            Message::SourcePaths { nvmf } => {
                w.str(nvmf);
                K_SOURCE_PATHS
            }
            Message::ResyncDone { bytes, chunks } => {
                w.u64(*bytes);
                w.u64(*chunks);
                K_RESYNC_DONE
            }
            Message::Ack { seq } => {
                w.u64(*seq);
                K_ACK
            }
            Message::CpDone { cp } => {
                w.u64(*cp);
                K_CP_DONE
            }
            Message::BaselineAck => K_BASELINE_ACK,
            Message::Error { reason } => {
                w.str(reason);
                K_ERROR
            }
            Message::RdmaSetup => K_RDMA_SETUP,
            Message::RdmaListen { addr, token } => {
                w.str(addr);
                w.u64(*token);
                K_RDMA_LISTEN
            }
            Message::RdmaRegions { regions } => {
                for r in regions {
                    w.u64(r.addr);
                    w.0.extend_from_slice(&r.rkey.to_le_bytes());
                    w.u64(r.len);
                }
                K_RDMA_REGIONS
            }
            Message::LogFetch { partition, offset } => {
                w.u8(*partition);
                w.u64(*offset);
                K_LOG_FETCH
            }
            Message::LogBytes { partition, offset, bytes } => {
                w.bulk(*partition, *offset, bytes);
                K_LOG_BYTES
            }
            Message::LogFetchEnd { partition, tail } => {
                w.u8(*partition);
                w.u64(*tail);
                K_LOG_FETCH_END
            }
            Message::AuthRequest { nonce } => {
                w.0.extend_from_slice(nonce);
                K_AUTH_REQUEST
            }
            Message::AuthChallenge { nonce } => {
                w.0.extend_from_slice(nonce);
                K_AUTH_CHALLENGE
            }
            Message::AuthProof { proof } => {
                w.0.extend_from_slice(proof);
                K_AUTH_PROOF
            }
        };
        let body = w.0;
        assert!(body.len() <= BODY_MAX, "frame body above BODY_MAX");
        let flags = if let Message::Hello(h) = self { h.features } else { 0 };
        let mut header = frame_header(kind, body.len(), 0);
        header[6..8].copy_from_slice(&flags.to_le_bytes());
        let crc = crc32c(&[&header[..12], &body]);
        header[12..16].copy_from_slice(&crc.to_le_bytes());
        let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&body);
        out
    }
}

/// Checks a frame header; returns (kind, body_len). Call before reading the body, so a
/// hostile length is refused before any allocation.
pub fn decode_header(h: &[u8; FRAME_HEADER_BYTES]) -> Result<(u8, usize), WireError> {
    let magic = u32::from_le_bytes(h[0..4].try_into().expect("4"));
    if magic != FRAME_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if h[4] != FRAME_VERSION {
        return Err(WireError::BadVersion(h[4]));
    }
    let len = u32::from_le_bytes(h[8..12].try_into().expect("4"));
    if len as usize > BODY_MAX {
        return Err(WireError::TooLarge(len));
    }
    Ok((h[5], len as usize))
}

/// Decodes one whole frame from the start of `buf`. `Ok(None)` when `buf` holds less than
/// one frame (read more); otherwise the message and the bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Message<'_>, usize)>, WireError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let header: &[u8; FRAME_HEADER_BYTES] = buf[..FRAME_HEADER_BYTES].try_into().expect("16");
    let (kind, body_len) = decode_header(header)?;
    let total = FRAME_HEADER_BYTES + body_len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[FRAME_HEADER_BYTES..total];
    let stored = u32::from_le_bytes(header[12..16].try_into().expect("4"));
    let flags = u16::from_le_bytes(header[6..8].try_into().expect("2"));
    // What the crc covers; the header bytes it covers include the flags, so a flag changed
    // on the way fails the check too.
    let covered = match (kind, flags) {
        (K_HELLO, _) | (_, 0) => body,
        (K_ENTRIES, FLAG_HEADER_CRC) => body.get(..ENTRIES_PREFIX_BYTES).ok_or(WireError::Truncated("entries"))?,
        (K_ENTRIES, _) => return Err(WireError::BadField("entries", "unknown frame flags")),
        _ => return Err(WireError::BadField("frame", "flags on a frame that takes none")),
    };
    if stored != crc32c(&[&header[..12], covered]) {
        return Err(WireError::BadChecksum);
    }
    let mut msg = decode_body(kind, body)?;
    if let Message::Hello(h) = &mut msg {
        h.features = flags;
    }
    Ok(Some((msg, total)))
}

fn purpose(b: u8) -> Option<BlockPurpose> {
    match b {
        1 => Some(BlockPurpose::CpByValue),
        2 => Some(BlockPurpose::Baseline),
        3 => Some(BlockPurpose::Resync),
        _ => None,
    }
}

fn decode_body(kind: u8, body: &[u8]) -> Result<Message<'_>, WireError> {
    let name = match kind {
        K_HELLO => "hello",
        K_WELCOME => "welcome",
        K_REFUSE => "refuse",
        K_PARTITION_OPEN => "partition-open",
        K_ENTRIES => "entries",
        K_CP => "cp",
        K_BLOCK_DATA => "block-data",
        K_BASELINE_DONE => "baseline-done",
        K_ACK => "ack",
        K_CP_DONE => "cp-done",
        K_BASELINE_ACK => "baseline-ack",
        K_ERROR => "error",
        K_RDMA_SETUP => "rdma-setup",
        K_RDMA_LISTEN => "rdma-listen",
        K_RDMA_REGIONS => "rdma-regions",
        K_RESYNC_DONE => "resync-done",
        K_COPY_MARK => "copy-mark",
        K_SOURCE_PATHS => "source-paths",
        K_LOG_FETCH => "log-fetch",
        K_LOG_BYTES => "log-bytes",
        K_LOG_FETCH_END => "log-fetch-end",
        K_ZERO_RANGE => "zero-range",
        K_AUTH_REQUEST => "auth-request",
        K_AUTH_CHALLENGE => "auth-challenge",
        K_AUTH_PROOF => "auth-proof",
        _ => return Err(WireError::BadKind(kind)),
    };
    let mut r = Reader { b: body, what: name };
    let msg = match kind {
        K_HELLO => {
            let source_node = r.str()?;
            let volume = r.str()?;
            let volume_id = r.u64()?;
            let epoch = r.u64()?;
            let volume_bytes = r.u64()?;
            let partition_bytes = r.u64()?;
            let intent = match r.u8()? {
                1 => Intent::Resume,
                2 => Intent::Baseline,
                3 => Intent::Resync,
                _ => return Err(WireError::BadField(name, "unknown intent")),
            };
            let base_seq = r.u64()?;
            let base_cp_gen = r.u64()?;
            Message::Hello(Hello {
                source_node,
                volume,
                volume_id,
                epoch,
                volume_bytes,
                partition_bytes,
                intent,
                base_seq,
                base_cp_gen,
                features: 0,
            })
        }
        K_WELCOME => {
            let epoch = r.u64()?;
            let applied_cp = r.u64()?;
            let applied_seq = r.u64()?;
            let state = r.u8()?;
            if state & !31 != 0 {
                return Err(WireError::BadField(name, "unknown mirror state bits"));
            }
            let (consistent, resyncable, copy_marks) = (state & 1 != 0, state & 2 != 0, state & 4 != 0);
            let (header_crc_entries, source_paths) = (state & 8 != 0, state & 16 != 0);
            let mut logs = [LogTail::default(); 2];
            for t in &mut logs {
                t.open = r.bool()?;
                t.cp_gen = r.u64()?;
                t.first_seq = r.u64()?;
                t.next_seq = r.u64()?;
                t.tail = r.u64()?;
            }
            let mirror_nvmf = if source_paths { r.str()? } else { String::new() };
            Message::Welcome(Welcome {
                epoch,
                applied_cp,
                applied_seq,
                consistent,
                resyncable,
                copy_marks,
                header_crc_entries,
                source_paths,
                logs,
                mirror_nvmf,
            })
        }
        K_REFUSE => {
            let code = match r.u16()? {
                1 => RefuseCode::StaleEpoch,
                2 => RefuseCode::Mismatch,
                3 => RefuseCode::Busy,
                4 => RefuseCode::Broken,
                5 => RefuseCode::Internal,
                6 => RefuseCode::Unauthenticated,
                _ => return Err(WireError::BadField(name, "unknown refusal code")),
            };
            Message::Refuse { code, reason: r.str()? }
        }
        K_PARTITION_OPEN => {
            let header = r.take(PARTITION_HEADER_BYTES)?.try_into().expect("64");
            Message::PartitionOpen { header }
        }
        K_ENTRIES => {
            let (partition, offset, bytes) = r.bulk()?;
            if bytes.is_empty() {
                return Err(WireError::BadField(name, "no entries"));
            }
            Message::Entries { partition, offset, bytes }
        }
        K_CP => Message::Cp { cp: r.u64()?, partition: r.u8()?, upto_seq: r.u64()?, by_value: r.bool()? },
        K_BLOCK_DATA => {
            let purpose = purpose(r.u8()?).ok_or(WireError::BadField(name, "unknown purpose"))?;
            r.take(3)?;
            let offset = r.u64()?;
            let data = r.rest();
            if data.is_empty() {
                return Err(WireError::BadField(name, "no data"));
            }
            Message::BlockData { purpose, offset, data }
        }
        K_ZERO_RANGE => {
            let purpose = match purpose(r.u8()?) {
                Some(p @ (BlockPurpose::Baseline | BlockPurpose::Resync)) => p,
                _ => return Err(WireError::BadField(name, "purpose not baseline or resync")),
            };
            let (offset, len) = (r.u64()?, r.u64()?);
            if len == 0 {
                return Err(WireError::BadField(name, "empty range"));
            }
            Message::ZeroRange { purpose, offset, len }
        }
        K_BASELINE_DONE => Message::BaselineDone { volume_bytes: r.u64()? },
        K_RESYNC_DONE => Message::ResyncDone { bytes: r.u64()?, chunks: r.u64()? },
        K_COPY_MARK => Message::CopyMark { next: r.u64()?, bytes: r.u64()?, chunks: r.u64()? },
        K_SOURCE_PATHS => Message::SourcePaths { nvmf: r.str()? },
        K_ACK => Message::Ack { seq: r.u64()? },
        K_CP_DONE => Message::CpDone { cp: r.u64()? },
        K_BASELINE_ACK => Message::BaselineAck,
        K_ERROR => Message::Error { reason: r.str()? },
        K_RDMA_SETUP => Message::RdmaSetup,
        K_RDMA_LISTEN => Message::RdmaListen { addr: r.str()?, token: r.u64()? },
        K_RDMA_REGIONS => {
            let mut regions = [RdmaRegion::default(); 2];
            for g in &mut regions {
                g.addr = r.u64()?;
                g.rkey = u32::from_le_bytes(r.take(4)?.try_into().expect("4"));
                g.len = r.u64()?;
            }
            Message::RdmaRegions { regions }
        }
        K_LOG_FETCH => Message::LogFetch { partition: r.u8()?, offset: r.u64()? },
        K_LOG_BYTES => {
            let (partition, offset, bytes) = r.bulk()?;
            if bytes.is_empty() || bytes.len() > LOG_BYTES_CHUNK {
                return Err(WireError::BadField(name, "empty, or above the chunk size"));
            }
            Message::LogBytes { partition, offset, bytes }
        }
        K_LOG_FETCH_END => Message::LogFetchEnd { partition: r.u8()?, tail: r.u64()? },
        K_AUTH_REQUEST => Message::AuthRequest { nonce: r.take(NONCE_BYTES)?.try_into().expect("32") },
        K_AUTH_CHALLENGE => Message::AuthChallenge { nonce: r.take(NONCE_BYTES)?.try_into().expect("32") },
        K_AUTH_PROOF => Message::AuthProof { proof: r.take(MAC_BYTES)?.try_into().expect("32") },
        _ => unreachable!("kind checked above"),
    };
    if matches!(
        msg,
        Message::PartitionOpen { .. }
            | Message::Hello(_)
            | Message::Welcome(_)
            | Message::Cp { .. }
            | Message::ZeroRange { .. }
            | Message::BaselineDone { .. }
            | Message::ResyncDone { .. }
            | Message::CopyMark { .. }
            | Message::SourcePaths { .. }
            | Message::Ack { .. }
            | Message::CpDone { .. }
            | Message::BaselineAck
            | Message::Refuse { .. }
            | Message::Error { .. }
            | Message::RdmaSetup
            | Message::RdmaListen { .. }
            | Message::RdmaRegions { .. }
            | Message::LogFetch { .. }
            | Message::LogFetchEnd { .. }
            | Message::AuthRequest { .. }
            | Message::AuthChallenge { .. }
            | Message::AuthProof { .. }
    ) {
        r.end()?;
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message<'static>> {
        vec![
            Message::Hello(Hello {
                source_node: "a".into(),
                volume: "vol".into(),
                volume_id: 1,
                epoch: 2,
                volume_bytes: 3,
                partition_bytes: 4,
                intent: Intent::Resume,
                base_seq: 5,
                base_cp_gen: 6,
                features: 0,
            }),
            Message::Welcome(Welcome {
                epoch: 1,
                applied_cp: 2,
                applied_seq: 3,
                consistent: true,
                resyncable: true,
                copy_marks: true,
                header_crc_entries: true,
                source_paths: true,
                mirror_nvmf: "10.0.0.2:4420".into(),
                logs: [LogTail { open: true, cp_gen: 1, first_seq: 2, next_seq: 3, tail: 4 }, LogTail::default()],
            }),
            Message::CopyMark { next: 5 << 16, bytes: 3 << 16, chunks: 2 },
            Message::SourcePaths { nvmf: "10.0.0.1:4420".into() },
            Message::SourcePaths { nvmf: String::new() },
            Message::Refuse { code: RefuseCode::StaleEpoch, reason: "old".into() },
            Message::PartitionOpen { header: [7; 64] },
            Message::Entries { partition: 1, offset: 64, bytes: &[1, 2, 3] },
            Message::Cp { cp: 9, partition: 1, upto_seq: 77, by_value: true },
            Message::BlockData { purpose: BlockPurpose::Baseline, offset: 4096, data: &[9; 10] },
            Message::BaselineDone { volume_bytes: 1 << 30 },
            Message::ZeroRange { purpose: BlockPurpose::Baseline, offset: 1 << 20, len: 3 << 20 },
            Message::ZeroRange { purpose: BlockPurpose::Resync, offset: 0, len: 4096 },
            Message::ResyncDone { bytes: 1 << 20, chunks: 3 },
            Message::BlockData { purpose: BlockPurpose::Resync, offset: 1 << 16, data: &[1; 8] },
            Message::Hello(Hello {
                source_node: "b".into(),
                volume: "vol".into(),
                volume_id: 1,
                epoch: 3,
                volume_bytes: 3,
                partition_bytes: 4,
                intent: Intent::Resync,
                base_seq: 5,
                base_cp_gen: 6,
                features: FEATURE_COPY_MARKS,
            }),
            Message::Ack { seq: 5 },
            Message::CpDone { cp: 5 },
            Message::BaselineAck,
            Message::Error { reason: "bad".into() },
            Message::RdmaSetup,
            Message::RdmaListen { addr: "10.0.0.1:7100".into(), token: 99 },
            Message::RdmaRegions {
                regions: [RdmaRegion { addr: 1, rkey: 2, len: 3 }, RdmaRegion { addr: 4, rkey: 5, len: 6 }],
            },
            Message::Refuse { code: RefuseCode::Unauthenticated, reason: "who are you".into() },
            Message::LogFetch { partition: 1, offset: 4160 },
            Message::LogBytes { partition: 0, offset: 8256, bytes: &[7u8; 300] },
            Message::LogFetchEnd { partition: 1, tail: 12345 },
            Message::AuthRequest { nonce: [1; 32] },
            Message::AuthChallenge { nonce: [2; 32] },
            Message::AuthProof { proof: [3; 32] },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let bytes = m.encode();
            let (back, used) = decode(&bytes).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(back, m);
            // Every strict prefix is "need more", never an error or a panic.
            for cut in 0..bytes.len() {
                assert_eq!(decode(&bytes[..cut]), Ok(None));
            }
        }
    }

    #[test]
    fn entries_prefix_matches_encode() {
        let bytes = [5u8; 200];
        let whole = Message::Entries { partition: 1, offset: 4160, bytes: &bytes }.encode();
        let p = entries_prefix(1, 4160, &bytes, false);
        assert_eq!(&whole[..p.len()], &p[..]);
    }

    /// An entries frame under `FLAG_HEADER_CRC`: its header and prefix are checked, its
    /// entries are left to their own checksums, and the flag is taken on nothing else.
    #[test]
    fn header_crc_entries_cover_header_and_prefix_only() {
        let bytes = [5u8; 200];
        let frame = |header_crc: bool| {
            let mut f = entries_prefix(1, 4160, &bytes, header_crc).to_vec();
            f.extend_from_slice(&bytes);
            f
        };
        let want = Message::Entries { partition: 1, offset: 4160, bytes: &bytes };
        let f = frame(true);
        assert_eq!(decode(&f), Ok(Some((want.clone(), f.len()))));
        // The entries' bytes are not the frame's to check; without the flag they are.
        let mut g = f.clone();
        g[FRAME_HEADER_BYTES + ENTRIES_PREFIX_BYTES + 7] ^= 1;
        assert!(matches!(decode(&g), Ok(Some((Message::Entries { .. }, _)))));
        let mut g = frame(false);
        g[FRAME_HEADER_BYTES + ENTRIES_PREFIX_BYTES + 7] ^= 1;
        assert_eq!(decode(&g), Err(WireError::BadChecksum));
        // Every byte of the header and the prefix is covered, the flag included.
        for i in (0..FRAME_HEADER_BYTES + ENTRIES_PREFIX_BYTES).filter(|i| !(8..12).contains(i)) {
            let mut g = f.clone();
            g[i] ^= 0x10;
            assert!(!matches!(decode(&g), Ok(Some(_))), "byte {i} changed unnoticed");
        }
        // The flag on another kind, or another flag: refused, whatever the crc says.
        let mut ack = Message::Ack { seq: 1 }.encode();
        ack[6..8].copy_from_slice(&FLAG_HEADER_CRC.to_le_bytes());
        let crc = crc32c(&[&ack[..12], &ack[FRAME_HEADER_BYTES..]]);
        ack[12..16].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&ack), Err(WireError::BadField("frame", "flags on a frame that takes none")));
        let mut g = f.clone();
        g[6..8].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(decode(&g), Err(WireError::BadField("entries", "unknown frame flags")));
        // A body shorter than the prefix it claims to cover.
        let mut short = frame_header(K_ENTRIES, 4, 0).to_vec();
        short[6..8].copy_from_slice(&FLAG_HEADER_CRC.to_le_bytes());
        short.extend_from_slice(&[1, 0, 0, 0]);
        assert_eq!(decode(&short), Err(WireError::Truncated("entries")));
    }

    #[test]
    fn hostile_headers_are_refused_before_allocation() {
        let mut f = Message::Ack { seq: 1 }.encode();
        f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&f), Err(WireError::TooLarge(u32::MAX)));
        let mut f = Message::Ack { seq: 1 }.encode();
        f[0] ^= 1;
        assert!(matches!(decode(&f), Err(WireError::BadMagic(_))));
        let mut f = Message::Ack { seq: 1 }.encode();
        f[20] ^= 1;
        assert_eq!(decode(&f), Err(WireError::BadChecksum));
    }

    #[test]
    fn auth_frames_are_exactly_their_nonce_or_proof() {
        for kind in [K_AUTH_REQUEST, K_AUTH_CHALLENGE, K_AUTH_PROOF] {
            for len in [0usize, 1, 31, 33, 64] {
                let body = vec![9u8; len];
                let mut f = frame_header(kind, len, frame_crc(kind, len, &[&body])).to_vec();
                f.extend_from_slice(&body);
                let e = decode(&f).unwrap_err();
                assert!(
                    matches!(e, WireError::Truncated(_) | WireError::Trailing(_, _)),
                    "kind {kind} with a {len}-byte body: {e:?}"
                );
            }
        }
        // A refusal code this build does not know is an error, not a default.
        let body = [7u8, 0, 0, 0];
        let mut f = frame_header(K_REFUSE, body.len(), frame_crc(K_REFUSE, body.len(), &[&body])).to_vec();
        f.extend_from_slice(&body);
        assert_eq!(decode(&f), Err(WireError::BadField("refuse", "unknown refusal code")));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn flipped_bits_are_caught(idx in 0usize..40, bit in 0u8..8) {
            let m = Message::Cp { cp: 9, partition: 1, upto_seq: 77, by_value: false };
            let mut f = m.encode();
            let idx = idx % f.len();
            f[idx] ^= 1 << bit;
            prop_assert!(!matches!(decode(&f), Ok(Some(_))), "corruption went unnoticed");
        }
    }
}
