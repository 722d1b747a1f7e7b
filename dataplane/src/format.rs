//! On-disk and on-wire layouts shared by the NVLog, the destination's log files and the
//! replication frames.
//!
//! Every structure is explicit little-endian with a magic, a version and a crc32c. The
//! NVLog entry is the unit of replication: its bytes are identical in the source's NVLog,
//! on the wire, and in the destination's log file, so that a one-sided transport can place
//! them without translation.
//!
//! ```text
//! entry header (64 bytes), followed by `data_len` bytes of data, padded to 64 bytes
//!  0 magic u32 | 4 version u16 | 6 kind u8 | 7 partition u8
//!  8 volume_id u64 | 16 epoch u64 | 24 seq u64 | 32 offset u64
//! 40 length u32 | 44 data_len u32 | 48 reserved [12] | 60 crc32c u32 (header[0..60] + data)
//!
//! partition header (64 bytes) at the start of each NVLog partition and each log file
//!  0 magic u32 | 4 version u16 | 6 partition u8 | 7 reserved u8
//!  8 volume_id u64 | 16 cp_gen u64 | 24 first_seq u64 | 32 epoch u64
//! 40 reserved [20] | 60 crc32c u32 (header[0..60])
//! ```

use thiserror::Error;

pub const ENTRY_MAGIC: u32 = u32::from_le_bytes(*b"NVLE");
pub const PARTITION_MAGIC: u32 = u32::from_le_bytes(*b"NVLP");
pub const FORMAT_VERSION: u16 = 1;
pub const ENTRY_HEADER_BYTES: usize = 64;
pub const PARTITION_HEADER_BYTES: usize = 64;
/// Entries start on this boundary so that a cache-line flush never covers two entries'
/// headers and a torn write tears at most the entry being written.
pub const ENTRY_ALIGN: usize = 64;
/// The block size of every volume: the unit of the block cache and of CP updates.
pub const BLOCK_BYTES: usize = 4096;
/// The largest data payload of one entry. Larger client writes are split at block
/// boundaries, so each block is still written atomically.
pub const ENTRY_DATA_MAX: usize = 1 << 20;

const _: () = assert!(ENTRY_HEADER_BYTES.is_multiple_of(ENTRY_ALIGN));
const _: () = assert!(PARTITION_HEADER_BYTES.is_multiple_of(ENTRY_ALIGN));
const _: () = assert!(ENTRY_DATA_MAX.is_multiple_of(BLOCK_BYTES));

pub use crate::checksum::crc32c_parts as crc32c;

/// Rounds `n` up to the entry alignment.
pub const fn align_up(n: usize) -> usize {
    (n + ENTRY_ALIGN - 1) & !(ENTRY_ALIGN - 1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EntryKind {
    Write = 1,
    Trim = 2,
    WriteZeroes = 3,
}

impl EntryKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Write),
            2 => Some(Self::Trim),
            3 => Some(Self::WriteZeroes),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryHeader {
    pub kind: EntryKind,
    pub partition: u8,
    pub volume_id: u64,
    pub epoch: u64,
    pub seq: u64,
    /// Byte offset on the volume.
    pub offset: u64,
    /// Bytes of the volume the entry covers.
    pub length: u32,
    /// Bytes of data that follow the header: `length` for writes, 0 otherwise.
    pub data_len: u32,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported version {0}")]
    BadVersion(u16),
    #[error("unknown entry kind {0}")]
    BadKind(u8),
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum { stored: u32, computed: u32 },
    #[error("inconsistent field: {0}")]
    BadField(&'static str),
}

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl EntryHeader {
    /// Bytes the entry occupies in a log: header, data, padding.
    pub fn footprint(&self) -> usize {
        ENTRY_HEADER_BYTES + align_up(self.data_len as usize)
    }

    pub fn footprint_for(data_len: usize) -> usize {
        ENTRY_HEADER_BYTES + align_up(data_len)
    }

    /// Writes the header, with the crc over header and `data`, into `out[..64]`.
    pub fn encode(&self, data: &[u8], out: &mut [u8]) {
        assert_eq!(data.len(), self.data_len as usize, "entry data length");
        let h = &mut out[..ENTRY_HEADER_BYTES];
        h[0..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
        h[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[6] = self.kind as u8;
        h[7] = self.partition;
        h[8..16].copy_from_slice(&self.volume_id.to_le_bytes());
        h[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        h[24..32].copy_from_slice(&self.seq.to_le_bytes());
        h[32..40].copy_from_slice(&self.offset.to_le_bytes());
        h[40..44].copy_from_slice(&self.length.to_le_bytes());
        h[44..48].copy_from_slice(&self.data_len.to_le_bytes());
        h[48..60].fill(0);
        let crc = crc32c(&[&h[..60], data]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and verifies the entry at the start of `bytes` (header, data and checksum).
    /// Returns the header and its data.
    pub fn decode(bytes: &[u8]) -> Result<(EntryHeader, &[u8]), DecodeError> {
        if bytes.len() < ENTRY_HEADER_BYTES {
            return Err(DecodeError::Truncated { need: ENTRY_HEADER_BYTES, have: bytes.len() });
        }
        let magic = get_u32(bytes, 0);
        if magic != ENTRY_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let version = get_u16(bytes, 4);
        if version != FORMAT_VERSION {
            return Err(DecodeError::BadVersion(version));
        }
        let kind = EntryKind::from_u8(bytes[6]).ok_or(DecodeError::BadKind(bytes[6]))?;
        let header = EntryHeader {
            kind,
            partition: bytes[7],
            volume_id: get_u64(bytes, 8),
            epoch: get_u64(bytes, 16),
            seq: get_u64(bytes, 24),
            offset: get_u64(bytes, 32),
            length: get_u32(bytes, 40),
            data_len: get_u32(bytes, 44),
        };
        let data_len = header.data_len as usize;
        if data_len > ENTRY_DATA_MAX {
            return Err(DecodeError::BadField("data_len above the entry maximum"));
        }
        match kind {
            EntryKind::Write if header.data_len != header.length => {
                return Err(DecodeError::BadField("write entry with data_len != length"))
            }
            EntryKind::Trim | EntryKind::WriteZeroes if header.data_len != 0 => {
                return Err(DecodeError::BadField("trim/zero entry carries data"))
            }
            _ => {}
        }
        if header.length == 0 {
            return Err(DecodeError::BadField("zero-length entry"));
        }
        if header.offset.checked_add(u64::from(header.length)).is_none() {
            return Err(DecodeError::BadField("offset + length overflows"));
        }
        let need = ENTRY_HEADER_BYTES + data_len;
        if bytes.len() < need {
            return Err(DecodeError::Truncated { need, have: bytes.len() });
        }
        let data = &bytes[ENTRY_HEADER_BYTES..need];
        let stored = get_u32(bytes, 60);
        let computed = crc32c(&[&bytes[..60], data]);
        if stored != computed {
            return Err(DecodeError::BadChecksum { stored, computed });
        }
        Ok((header, data))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionHeader {
    pub partition: u8,
    pub volume_id: u64,
    /// The CP generation of the partition: entries in it are made durable on the volume by
    /// CP number `cp_gen`.
    pub cp_gen: u64,
    /// Sequence number of the first entry; entries follow with consecutive numbers.
    pub first_seq: u64,
    pub epoch: u64,
}

impl PartitionHeader {
    pub fn encode(&self) -> [u8; PARTITION_HEADER_BYTES] {
        let mut h = [0u8; PARTITION_HEADER_BYTES];
        h[0..4].copy_from_slice(&PARTITION_MAGIC.to_le_bytes());
        h[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[6] = self.partition;
        h[8..16].copy_from_slice(&self.volume_id.to_le_bytes());
        h[16..24].copy_from_slice(&self.cp_gen.to_le_bytes());
        h[24..32].copy_from_slice(&self.first_seq.to_le_bytes());
        h[32..40].copy_from_slice(&self.epoch.to_le_bytes());
        let crc = crc32c(&[&h[..60]]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Decodes a partition header. A partition whose first word is zero is free:
    /// `Ok(None)`.
    pub fn decode(bytes: &[u8]) -> Result<Option<PartitionHeader>, DecodeError> {
        if bytes.len() < PARTITION_HEADER_BYTES {
            return Err(DecodeError::Truncated { need: PARTITION_HEADER_BYTES, have: bytes.len() });
        }
        let magic = get_u32(bytes, 0);
        if magic == 0 {
            return Ok(None);
        }
        if magic != PARTITION_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let version = get_u16(bytes, 4);
        if version != FORMAT_VERSION {
            return Err(DecodeError::BadVersion(version));
        }
        let stored = get_u32(bytes, 60);
        let computed = crc32c(&[&bytes[..60]]);
        if stored != computed {
            return Err(DecodeError::BadChecksum { stored, computed });
        }
        Ok(Some(PartitionHeader {
            partition: bytes[6],
            volume_id: get_u64(bytes, 8),
            cp_gen: get_u64(bytes, 16),
            first_seq: get_u64(bytes, 24),
            epoch: get_u64(bytes, 32),
        }))
    }
}

/// Why a log scan stopped where it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanStop {
    /// The partition is free (no header).
    Free,
    /// A zeroed header slot: the clean end of the log.
    End,
    /// A valid entry of an earlier use of the partition (a lower sequence number): the
    /// clean end of the current use.
    Stale { offset: usize },
    /// The region is full up to its last byte.
    Full,
    /// A header or entry failed to decode: a torn or corrupted entry, or an entry that
    /// belongs to an earlier use of the partition. Nothing past it is replayed.
    Invalid { offset: usize, reason: String },
}

/// One valid entry found by a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScannedEntry {
    /// Byte offset of the entry's header within the partition.
    pub at: usize,
    pub header: EntryHeader,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionScan {
    pub header: Option<PartitionHeader>,
    pub entries: Vec<ScannedEntry>,
    /// Offset just past the last valid entry: where the next entry goes.
    pub tail: usize,
    pub stop: ScanStop,
}

impl PartitionScan {
    pub fn next_seq(&self) -> Option<u64> {
        let h = self.header?;
        Some(self.entries.last().map_or(h.first_seq, |e| e.header.seq + 1))
    }
}

/// Scans one partition (an NVLog half or a destination log file): the header, then entries
/// with consecutive sequence numbers from `first_seq`, up to the first entry that is torn,
/// fails its checksum, breaks the sequence, or belongs to another volume or partition.
/// Never reads past that point.
pub fn scan_partition(bytes: &[u8], expect_partition: u8) -> PartitionScan {
    let header = match PartitionHeader::decode(bytes) {
        Ok(Some(h)) if h.partition == expect_partition => h,
        Ok(Some(_)) => {
            return PartitionScan {
                header: None,
                entries: Vec::new(),
                tail: 0,
                stop: ScanStop::Invalid { offset: 0, reason: "partition number mismatch".into() },
            }
        }
        Ok(None) => return PartitionScan { header: None, entries: Vec::new(), tail: 0, stop: ScanStop::Free },
        Err(e) => {
            return PartitionScan {
                header: None,
                entries: Vec::new(),
                tail: 0,
                stop: ScanStop::Invalid { offset: 0, reason: format!("partition header: {e}") },
            }
        }
    };
    let mut entries = Vec::new();
    let mut at = PARTITION_HEADER_BYTES;
    let mut expect_seq = header.first_seq;
    let stop = loop {
        if at + ENTRY_HEADER_BYTES > bytes.len() {
            break ScanStop::Full;
        }
        if bytes[at..at + 4] == [0, 0, 0, 0] {
            break ScanStop::End;
        }
        match EntryHeader::decode(&bytes[at..]) {
            Ok((h, _)) => {
                if h.seq < expect_seq && h.volume_id == header.volume_id && h.partition == expect_partition {
                    break ScanStop::Stale { offset: at };
                }
                let bad = if h.seq != expect_seq {
                    Some(format!("sequence {} where {} was expected", h.seq, expect_seq))
                } else if h.volume_id != header.volume_id {
                    Some("entry of another volume".to_string())
                } else if h.partition != expect_partition {
                    Some("entry of another partition".to_string())
                } else if at + h.footprint() > bytes.len() {
                    Some("entry overruns the partition".to_string())
                } else {
                    None
                };
                if let Some(reason) = bad {
                    break ScanStop::Invalid { offset: at, reason };
                }
                entries.push(ScannedEntry { at, header: h });
                at += h.footprint();
                expect_seq += 1;
            }
            Err(e) => break ScanStop::Invalid { offset: at, reason: e.to_string() },
        }
    };
    PartitionScan { header: Some(header), entries, tail: at, stop }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(seq: u64, data: &[u8]) -> Vec<u8> {
        let h = EntryHeader {
            kind: EntryKind::Write,
            partition: 0,
            volume_id: 7,
            epoch: 1,
            seq,
            offset: seq.wrapping_mul(4096) % (1 << 50),
            length: data.len() as u32,
            data_len: data.len() as u32,
        };
        let mut out = vec![0u8; h.footprint()];
        h.encode(data, &mut out);
        out[ENTRY_HEADER_BYTES..ENTRY_HEADER_BYTES + data.len()].copy_from_slice(data);
        out
    }

    fn partition(entries: &[Vec<u8>], size: usize) -> Vec<u8> {
        let mut p = vec![0u8; size];
        let h = PartitionHeader { partition: 0, volume_id: 7, cp_gen: 3, first_seq: 10, epoch: 1 };
        p[..64].copy_from_slice(&h.encode());
        let mut at = 64;
        for e in entries {
            p[at..at + e.len()].copy_from_slice(e);
            at += e.len();
        }
        p
    }

    proptest! {
        #[test]
        fn entry_round_trips(seq in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 1..5000)) {
            let e = entry(seq, &data);
            let (h, d) = EntryHeader::decode(&e).unwrap();
            prop_assert_eq!(h.seq, seq);
            prop_assert_eq!(d, &data[..]);
        }

        #[test]
        fn any_flipped_bit_is_detected(data in proptest::collection::vec(any::<u8>(), 1..600), bit in 0usize..(64 * 8)) {
            let mut e = entry(1, &data);
            let total_bits = (ENTRY_HEADER_BYTES + data.len()) * 8;
            let bit = bit % total_bits;
            e[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(EntryHeader::decode(&e).is_err());
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = EntryHeader::decode(&bytes);
            let _ = PartitionHeader::decode(&bytes);
            let _ = scan_partition(&bytes, 0);
        }
    }

    #[test]
    fn scan_stops_at_torn_entry_and_never_past_it() {
        let es: Vec<_> = (10..15).map(|s| entry(s, &[s as u8; 4096])).collect();
        let mut p = partition(&es, 64 * 1024);
        let scan = scan_partition(&p, 0);
        assert_eq!(scan.entries.len(), 5);
        assert_eq!(scan.stop, ScanStop::End);
        assert_eq!(scan.next_seq(), Some(15));
        // Tear the third entry's data: entries 3..5 are not replayed, though 4 and 5 are intact.
        let third = scan.entries[2].at;
        p[third + 100] ^= 0xff;
        let scan = scan_partition(&p, 0);
        assert_eq!(scan.entries.len(), 2);
        assert!(matches!(scan.stop, ScanStop::Invalid { offset, .. } if offset == third));
        assert_eq!(scan.tail, third);
    }

    #[test]
    fn scan_stops_at_stale_entry_from_an_earlier_use() {
        // Old contents: seqs 10..15; the partition is reused from seq 20 with two entries, and
        // the third slot still holds an old (valid-checksum) entry.
        let old: Vec<_> = (10..15).map(|s| entry(s, &[1u8; 4096])).collect();
        let mut p = partition(&old, 64 * 1024);
        let h = PartitionHeader { partition: 0, volume_id: 7, cp_gen: 4, first_seq: 20, epoch: 1 };
        p[..64].copy_from_slice(&h.encode());
        let new: Vec<_> = (20..22).map(|s| entry(s, &[2u8; 4096])).collect();
        let mut at = 64;
        for e in &new {
            p[at..at + e.len()].copy_from_slice(e);
            at += e.len();
        }
        let scan = scan_partition(&p, 0);
        assert_eq!(scan.entries.len(), 2);
        assert_eq!(scan.stop, ScanStop::Stale { offset: scan.tail });
    }

    #[test]
    fn free_and_corrupt_partition_headers() {
        let p = vec![0u8; 4096];
        assert_eq!(scan_partition(&p, 0).stop, ScanStop::Free);
        let mut p = partition(&[], 4096);
        p[20] ^= 1;
        assert!(matches!(scan_partition(&p, 0).stop, ScanStop::Invalid { offset: 0, .. }));
        let p = partition(&[], 4096);
        assert!(matches!(scan_partition(&p, 1).stop, ScanStop::Invalid { .. }));
    }

    #[test]
    fn hostile_length_fields_are_refused() {
        let mut e = entry(1, &[0u8; 64]);
        e[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(EntryHeader::decode(&e).is_err());
    }
}
