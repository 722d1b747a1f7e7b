//! The source's NVLog: a superblock and two partitions in one NVRAM region.
//!
//! ```text
//! superblock (64 bytes, copy 0 at 0 and copy 1 at 192, the rest of 4 KiB padding)
//!  0 magic u32 "NVLG" | 4 version u16 | 6 reserved u16 | 8 volume_id u64
//! 16 partition_bytes u64 | 24 reserved [36] | 60 crc32c u32
//! checkpoint record (64 bytes, slot 0 at 64 and slot 1 at 128), written whenever a
//! partition is freed
//!  0 magic u32 "NVCK" | 4 reserved u32 | 8 released_cp u64 | 16 next_seq u64
//! 24 generation u64 | 32 reserved [28] | 60 crc32c u32
//! partition 0 at 4096, partition 1 at 4096 + partition_bytes
//! ```
//!
//! Invariants: entries in a partition have consecutive sequence numbers from the
//! partition header's `first_seq`; an entry is appended only into the active partition,
//! only below `partition_bytes`; a partition is freed (header zeroed) only once its CP is
//! durable on both sites.
//!
//! Crash atomicity: a checkpoint record goes into the slot that does not hold the newest
//! generation, so a cut mid-write leaves the other slot, and the newest valid one wins.
//! The superblock is written once, when the log is formatted, copy 0 then copy 1; a cut
//! that tore copy 0 before any partition was opened leaves a log that is formatted again.
//! A partition header is one 64-byte line written with nothing acknowledged behind it,
//! and cleared only after the checkpoint that replaces it is durable: torn, it reads as
//! free, which is what it was becoming or had not yet stopped being.

use std::io;

use thiserror::Error;

use super::PARTITIONS;
use crate::format::{
    crc32c, scan_partition, EntryHeader, PartitionHeader, PartitionScan, ScanStop, ENTRY_HEADER_BYTES, FORMAT_VERSION,
    PARTITION_HEADER_BYTES,
};
use crate::nvram::Nvram;

const SUPER_MAGIC: u32 = u32::from_le_bytes(*b"NVLG");
const CHECKPOINT_MAGIC: u32 = u32::from_le_bytes(*b"NVCK");
/// The two checkpoint slots.
const CHECKPOINT_AT: [usize; 2] = [64, 128];
/// The two superblock copies.
const SUPER_AT: [usize; 2] = [0, 192];

/// The last CP whose partition was freed, and the first sequence number after it: where
/// the log resumes when both partitions are free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checkpoint {
    pub released_cp: u64,
    pub next_seq: u64,
}
pub const SUPERBLOCK_BYTES: usize = 4096;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NvLogError {
    #[error("NVLog region of {len} bytes is too small for two partitions of {partition_bytes}")]
    TooSmall { len: usize, partition_bytes: usize },
    #[error("NVLog superblock is corrupt: {0}")]
    BadSuperblock(String),
    #[error("NVLog checkpoint record is corrupt in both slots ({0}); a crash tears at most one")]
    BadCheckpoint(String),
    #[error("NVLog belongs to volume {found:#x}, expected {expected:#x}")]
    WrongVolume { found: u64, expected: u64 },
    #[error("NVLog persist failed: {0}")]
    Persist(#[source] io::Error),
}

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AppendError {
    #[error("partition {0} is not active")]
    NotActive(u8),
    #[error("partition full")]
    Full,
}

/// What a scan of the NVLog found at open.
#[derive(Debug)]
pub struct Recovered {
    pub scans: [PartitionScan; PARTITIONS],
    pub checkpoint: Checkpoint,
}

impl Recovered {
    /// All valid entries of both partitions in sequence order, as (partition, offset in
    /// partition, header).
    pub fn entries_in_order(&self) -> Vec<(u8, usize, EntryHeader)> {
        let mut all: Vec<_> = self
            .scans
            .iter()
            .enumerate()
            .zip(super::PARTITION_IDS)
            .flat_map(|((_, s), p)| s.entries.iter().map(move |e| (p, e.at, e.header)))
            .collect();
        all.sort_by_key(|e| e.2.seq);
        all
    }

    /// Torn or corrupt tails found, for the log.
    pub fn problems(&self) -> Vec<String> {
        self.scans
            .iter()
            .enumerate()
            .filter_map(|(p, s)| match &s.stop {
                ScanStop::Invalid { offset, reason } => {
                    Some(format!("partition {p}: scan stopped at offset {offset}: {reason}"))
                }
                _ => None,
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct PartitionState {
    header: Option<PartitionHeader>,
    /// Offset of the next entry.
    tail: usize,
    /// Entries below this offset have been persisted.
    persisted: usize,
}

pub struct NvLog<N: Nvram> {
    nvram: N,
    volume_id: u64,
    partition_bytes: usize,
    parts: [PartitionState; PARTITIONS],
    /// Generation of the newest checkpoint record.
    checkpoint_gen: u64,
}

fn superblock(volume_id: u64, partition_bytes: usize) -> [u8; 64] {
    let mut s = [0u8; 64];
    s[0..4].copy_from_slice(&SUPER_MAGIC.to_le_bytes());
    s[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    s[8..16].copy_from_slice(&volume_id.to_le_bytes());
    s[16..24].copy_from_slice(&(partition_bytes as u64).to_le_bytes());
    let crc = crc32c(&[&s[..60]]);
    s[60..64].copy_from_slice(&crc.to_le_bytes());
    s
}

fn checkpoint_record(c: Checkpoint, gen: u64) -> [u8; 64] {
    let mut r = [0u8; 64];
    r[0..4].copy_from_slice(&CHECKPOINT_MAGIC.to_le_bytes());
    r[8..16].copy_from_slice(&c.released_cp.to_le_bytes());
    r[16..24].copy_from_slice(&c.next_seq.to_le_bytes());
    r[24..32].copy_from_slice(&gen.to_le_bytes());
    let crc = crc32c(&[&r[..60]]);
    r[60..64].copy_from_slice(&crc.to_le_bytes());
    r
}

/// A sealed 64-byte record: `Ok(None)` never written, `Err` damaged.
fn sealed(b: &[u8], magic: u32) -> Result<Option<&[u8]>, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let m = u32::from_le_bytes(b[0..4].try_into().expect("4"));
    if m != magic {
        return Err(format!("magic {m:#x}"));
    }
    if u32::from_le_bytes(b[60..64].try_into().expect("4")) != crc32c(&[&b[..60]]) {
        return Err("checksum mismatch".into());
    }
    Ok(Some(b))
}

/// The newest valid checkpoint record and its generation; none where neither slot was
/// ever written.
fn read_checkpoint(bytes: &[u8]) -> Result<(Checkpoint, u64), NvLogError> {
    let mut best: Option<(Checkpoint, u64)> = None;
    let mut problems = Vec::new();
    let mut written = false;
    for (i, at) in CHECKPOINT_AT.into_iter().enumerate() {
        match sealed(&bytes[at..at + 64], CHECKPOINT_MAGIC) {
            Ok(None) => {}
            Ok(Some(r)) => {
                written = true;
                let c = Checkpoint {
                    released_cp: u64::from_le_bytes(r[8..16].try_into().expect("8")),
                    next_seq: u64::from_le_bytes(r[16..24].try_into().expect("8")),
                };
                let gen = u64::from_le_bytes(r[24..32].try_into().expect("8"));
                if best.is_none_or(|(_, g)| gen > g) {
                    best = Some((c, gen));
                }
            }
            Err(e) => {
                written = true;
                problems.push(format!("slot {i}: {e}"));
            }
        }
    }
    match best {
        Some(b) => Ok(b),
        None if !written => Ok((Checkpoint::default(), 0)),
        None => Err(NvLogError::BadCheckpoint(problems.join("; "))),
    }
}

impl<N: Nvram> NvLog<N> {
    /// Region bytes needed for partitions of `partition_bytes`.
    pub fn region_bytes(partition_bytes: usize) -> usize {
        SUPERBLOCK_BYTES + PARTITIONS * partition_bytes
    }

    /// Opens the NVLog in `nvram`, formatting it if blank, and scans both partitions.
    /// The log keeps the scanned tails; callers decide what to replay and then call
    /// [`NvLog::reset`] or continue.
    pub fn open(mut nvram: N, volume_id: u64, partition_bytes: usize) -> Result<(Self, Recovered), NvLogError> {
        if nvram.len() < Self::region_bytes(partition_bytes) {
            return Err(NvLogError::TooSmall { len: nvram.len(), partition_bytes });
        }
        // The first copy of the superblock that is valid; a blank or torn pair before any
        // partition was opened is a format a crash cut short, done again.
        let copies = SUPER_AT.map(|at| sealed(&nvram.bytes()[at..at + 64], SUPER_MAGIC));
        let valid = copies.iter().find_map(|c| c.as_ref().ok().copied().flatten()).map(<[u8]>::to_vec);
        let mut reformatted = false;
        let sb = match valid {
            Some(sb) => sb,
            None => {
                reformatted = true;
                let opened = [0u8, 1].into_iter().any(|p| {
                    let b = Self::base(p, partition_bytes);
                    nvram.bytes()[b..b + PARTITION_HEADER_BYTES].iter().any(|&x| x != 0)
                });
                if opened {
                    let why: Vec<String> = copies
                        .iter()
                        .enumerate()
                        .map(|(i, c)| match c {
                            Err(e) => format!("copy {i}: {e}"),
                            _ => format!("copy {i}: blank"),
                        })
                        .collect();
                    return Err(NvLogError::BadSuperblock(why.join("; ")));
                }
                let s = superblock(volume_id, partition_bytes);
                for at in SUPER_AT {
                    nvram.bytes_mut()[at..at + 64].copy_from_slice(&s);
                    nvram.persist(at, 64).map_err(NvLogError::Persist)?;
                }
                s.to_vec()
            }
        };
        let found = u64::from_le_bytes(sb[8..16].try_into().expect("8"));
        if found != volume_id {
            return Err(NvLogError::WrongVolume { found, expected: volume_id });
        }
        let pb = u64::from_le_bytes(sb[16..24].try_into().expect("8"));
        if pb != partition_bytes as u64 {
            return Err(NvLogError::BadSuperblock(format!(
                "partition size {pb} on disk, {partition_bytes} configured"
            )));
        }
        let (checkpoint, checkpoint_gen) = match read_checkpoint(nvram.bytes()) {
            // A format cut short before its superblock may have torn its record too: the
            // log starts with none (its numbering was never used).
            Err(NvLogError::BadCheckpoint(_)) if reformatted => {
                for at in CHECKPOINT_AT {
                    nvram.bytes_mut()[at..at + 64].fill(0);
                    nvram.persist(at, 64).map_err(NvLogError::Persist)?;
                }
                (Checkpoint::default(), 0)
            }
            r => r?,
        };
        let mut log = NvLog { nvram, volume_id, partition_bytes, parts: Default::default(), checkpoint_gen };
        let scans = [0u8, 1].map(|p| {
            let scan = scan_partition(log.partition(p), p);
            let header = scan.header.filter(|h| h.volume_id == volume_id);
            log.parts[p as usize] = PartitionState { header, tail: scan.tail, persisted: scan.tail };
            scan
        });
        Ok((log, Recovered { scans, checkpoint }))
    }

    pub fn volume_id(&self) -> u64 {
        self.volume_id
    }

    pub fn partition_bytes(&self) -> usize {
        self.partition_bytes
    }

    fn base(p: u8, partition_bytes: usize) -> usize {
        SUPERBLOCK_BYTES + p as usize * partition_bytes
    }

    /// Where partition `p` starts in the log's region (for tools that read a log's image).
    pub fn partition_base(p: u8, partition_bytes: usize) -> usize {
        Self::base(p, partition_bytes)
    }

    /// The whole log's memory (superblock, checkpoint and both partitions): what a link
    /// may register to send entries from.
    pub fn memory(&self) -> &[u8] {
        self.nvram.bytes()
    }

    /// The bytes of partition `p`.
    pub fn partition(&self, p: u8) -> &[u8] {
        let b = Self::base(p, self.partition_bytes);
        &self.nvram.bytes()[b..b + self.partition_bytes]
    }

    pub fn header(&self, p: u8) -> Option<PartitionHeader> {
        self.parts[p as usize].header
    }

    pub fn tail(&self, p: u8) -> usize {
        self.parts[p as usize].tail
    }

    /// Starts a new use of partition `p`: writes its header and persists it. Stale bytes
    /// of an earlier use stay behind the tail; scans reject them by sequence number.
    pub fn open_partition(&mut self, header: PartitionHeader) -> Result<(), NvLogError> {
        let p = header.partition;
        let b = Self::base(p, self.partition_bytes);
        let bytes = self.nvram.bytes_mut();
        bytes[b..b + PARTITION_HEADER_BYTES].copy_from_slice(&header.encode());
        // Zero the first entry slot so an empty partition scans as empty, not as "stale".
        bytes[b + PARTITION_HEADER_BYTES..b + PARTITION_HEADER_BYTES + ENTRY_HEADER_BYTES].fill(0);
        self.nvram.persist(b, PARTITION_HEADER_BYTES + ENTRY_HEADER_BYTES).map_err(NvLogError::Persist)?;
        self.parts[p as usize] =
            PartitionState { header: Some(header), tail: PARTITION_HEADER_BYTES, persisted: PARTITION_HEADER_BYTES };
        Ok(())
    }

    /// Formats `nvram` as an empty NVLog whose first partition will be CP generation
    /// `start.released_cp + 1` starting at sequence `start.next_seq`: a volume taken over
    /// by failover or switchover continues the numbering its mirror knows. The superblock
    /// is written last, so a format a crash cut short opens as unformatted (and is done
    /// again, perhaps without its numbering), which is why callers format before they
    /// record the volume.
    pub fn format(mut nvram: N, volume_id: u64, partition_bytes: usize, start: Checkpoint) -> Result<N, NvLogError> {
        if nvram.len() < Self::region_bytes(partition_bytes) {
            return Err(NvLogError::TooSmall { len: nvram.len(), partition_bytes });
        }
        let bytes = nvram.bytes_mut();
        bytes[..SUPERBLOCK_BYTES].fill(0);
        bytes[CHECKPOINT_AT[0]..CHECKPOINT_AT[0] + 64].copy_from_slice(&checkpoint_record(start, 0));
        for p in [0u8, 1] {
            let b = Self::base(p, partition_bytes);
            bytes[b..b + PARTITION_HEADER_BYTES + ENTRY_HEADER_BYTES].fill(0);
        }
        nvram.persist(0, SUPERBLOCK_BYTES).map_err(NvLogError::Persist)?;
        for p in [0u8, 1] {
            let b = Self::base(p, partition_bytes);
            nvram.persist(b, PARTITION_HEADER_BYTES + ENTRY_HEADER_BYTES).map_err(NvLogError::Persist)?;
        }
        let (log, _) = Self::open(nvram, volume_id, partition_bytes)?;
        Ok(log.nvram)
    }

    /// Frees partition `p` once its CP is durable on both sites, recording `checkpoint`
    /// first so that the log can resume from it when both partitions are free.
    pub fn free_partition(&mut self, p: u8, checkpoint: Checkpoint) -> Result<(), NvLogError> {
        let gen = self.checkpoint_gen + 1;
        let at = CHECKPOINT_AT[crate::usize_of(gen % 2)];
        self.nvram.bytes_mut()[at..at + 64].copy_from_slice(&checkpoint_record(checkpoint, gen));
        self.nvram.persist(at, 64).map_err(NvLogError::Persist)?;
        self.checkpoint_gen = gen;
        let b = Self::base(p, self.partition_bytes);
        self.nvram.bytes_mut()[b..b + PARTITION_HEADER_BYTES].fill(0);
        self.nvram.persist(b, PARTITION_HEADER_BYTES).map_err(NvLogError::Persist)?;
        self.parts[p as usize] = PartitionState::default();
        Ok(())
    }

    /// Whether an entry of `data_len` bytes fits in partition `p`.
    pub fn fits(&self, p: u8, data_len: usize) -> bool {
        self.parts[p as usize].tail + EntryHeader::footprint_for(data_len) <= self.partition_bytes
    }

    /// Appends an entry to partition `p` (not yet persisted). Returns its offset.
    pub fn append(&mut self, header: &EntryHeader, data: &[u8]) -> Result<usize, AppendError> {
        let p = header.partition;
        let state = self.parts[p as usize];
        let ph = state.header.ok_or(AppendError::NotActive(p))?;
        debug_assert_eq!(ph.volume_id, header.volume_id);
        let at = state.tail;
        let end = at + header.footprint();
        if end > self.partition_bytes {
            return Err(AppendError::Full);
        }
        let b = Self::base(p, self.partition_bytes);
        let bytes = &mut self.nvram.bytes_mut()[b..b + self.partition_bytes];
        bytes[at + ENTRY_HEADER_BYTES..at + ENTRY_HEADER_BYTES + data.len()].copy_from_slice(data);
        header.encode(data, &mut bytes[at..at + ENTRY_HEADER_BYTES]);
        self.parts[p as usize].tail = end;
        Ok(at)
    }

    /// Zeroes the entry slot at partition `p`'s tail and persists it, so that a scan ends
    /// there whatever an earlier use of the space left behind (see `open_partition`).
    pub fn end_at_tail(&mut self, p: u8) -> Result<(), NvLogError> {
        let tail = self.parts[p as usize].tail;
        if tail + ENTRY_HEADER_BYTES > self.partition_bytes {
            return Ok(());
        }
        let at = Self::base(p, self.partition_bytes) + tail;
        self.nvram.bytes_mut()[at..at + ENTRY_HEADER_BYTES].fill(0);
        self.nvram.persist(at, ENTRY_HEADER_BYTES).map_err(NvLogError::Persist)
    }

    /// Offset of the first entry at or after `from` whose end lies beyond `from + max`:
    /// where to cut a send of whole entries. Entries between `from` and the tail are valid.
    pub fn cut(&self, p: u8, from: usize, max: usize) -> usize {
        let bytes = self.partition(p);
        let tail = self.parts[p as usize].tail;
        let mut at = from;
        while at < tail {
            let data_len = u32::from_le_bytes(bytes[at + 44..at + 48].try_into().expect("4")) as usize;
            let next = at + EntryHeader::footprint_for(data_len);
            if next - from > max && at > from {
                break;
            }
            at = next;
        }
        at
    }

    /// Whether persisting waits for a device (see [`Nvram::persist_waits_for_device`]).
    pub fn persist_waits_for_device(&self) -> bool {
        self.nvram.persist_waits_for_device()
    }

    /// Persists partition `p` up to its tail (group commit). Returns the range persisted.
    pub fn persist(&mut self, p: u8) -> Result<(usize, usize), NvLogError> {
        let st = self.parts[p as usize];
        if st.tail > st.persisted {
            let b = Self::base(p, self.partition_bytes);
            self.nvram.persist(b + st.persisted, st.tail - st.persisted).map_err(NvLogError::Persist)?;
            self.parts[p as usize].persisted = st.tail;
        }
        Ok((st.persisted, st.tail))
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::format::EntryKind;
    use crate::nvram::MemNvram;

    fn h(p: u8, seq: u64) -> EntryHeader {
        EntryHeader {
            kind: EntryKind::Write,
            partition: p,
            volume_id: 9,
            epoch: 1,
            seq,
            offset: 0,
            length: 4096,
            data_len: 4096,
        }
    }

    #[test]
    fn append_fill_recover() {
        let pb = 64 * 1024;
        let nv = MemNvram::new(NvLog::<MemNvram>::region_bytes(pb));
        let (mut log, rec) = NvLog::open(nv, 9, pb).unwrap();
        assert!(rec.entries_in_order().is_empty());
        log.open_partition(PartitionHeader { partition: 0, volume_id: 9, cp_gen: 1, first_seq: 1, epoch: 1 }).unwrap();
        let mut seq = 1;
        while log.fits(0, 4096) {
            log.append(&h(0, seq), &[seq as u8; 4096]).unwrap();
            seq += 1;
        }
        assert_eq!(log.append(&h(0, seq), &[0; 4096]), Err(AppendError::Full));
        log.open_partition(PartitionHeader { partition: 1, volume_id: 9, cp_gen: 2, first_seq: seq, epoch: 1 })
            .unwrap();
        log.append(&h(1, seq), &[7; 4096]).unwrap();
        log.persist(0).unwrap();
        log.persist(1).unwrap();
        let nv = log.nvram;
        let (_log2, rec) = NvLog::open(nv, 9, pb).unwrap();
        let all = rec.entries_in_order();
        assert_eq!(all.len() as u64, seq);
        assert!(all.windows(2).all(|w| w[1].2.seq == w[0].2.seq + 1));
        assert_eq!(all.last().unwrap().0, 1);
    }

    #[test]
    fn wrong_volume_and_corrupt_superblock_are_refused() {
        let pb = 8192;
        let nv = MemNvram::new(NvLog::<MemNvram>::region_bytes(pb));
        let (mut log, _) = NvLog::open(nv, 9, pb).unwrap();
        log.open_partition(PartitionHeader { partition: 0, volume_id: 9, cp_gen: 1, first_seq: 1, epoch: 1 }).unwrap();
        let nv = log.nvram;
        assert!(matches!(NvLog::open(nv.clone(), 10, pb), Err(NvLogError::WrongVolume { .. })));
        // One damaged copy: the other serves.
        let mut one = nv.clone();
        one.bytes_mut()[20] ^= 1;
        assert!(NvLog::open(one.clone(), 9, pb).is_ok());
        let mut both = one;
        both.bytes_mut()[SUPER_AT[1] + 20] ^= 1;
        assert!(matches!(NvLog::open(both, 9, pb), Err(NvLogError::BadSuperblock(_))));
        // Both checkpoint slots damaged: refused, never read as "no checkpoint".
        let mut cp = nv.clone();
        cp.bytes_mut()[CHECKPOINT_AT[0] + 8] ^= 1;
        cp.bytes_mut()[CHECKPOINT_AT[1]] = 1;
        assert!(matches!(NvLog::open(cp, 9, pb), Err(NvLogError::BadCheckpoint(_))));
        assert!(matches!(NvLog::open(nv, 9, pb * 2), Err(NvLogError::TooSmall { .. })));
    }

    const PB: usize = 8 * 4096;

    /// A log with entries 1..=3 in partition 0 (CP 1) and 4 in partition 1, after `frees`
    /// earlier partitions were freed.
    fn busy_log(frees: u64) -> Vec<u8> {
        let nv = MemNvram::new(NvLog::<MemNvram>::region_bytes(PB));
        let mut log = NvLog::format(nv, 9, PB, Checkpoint { released_cp: 0, next_seq: 1 })
            .map(|nv| NvLog::open(nv, 9, PB).unwrap().0)
            .unwrap();
        for _ in 0..frees {
            log.free_partition(1, Checkpoint { released_cp: 0, next_seq: 1 }).unwrap();
        }
        log.open_partition(PartitionHeader { partition: 0, volume_id: 9, cp_gen: 1, first_seq: 1, epoch: 1 }).unwrap();
        for seq in 1..=3 {
            log.append(&h(0, seq), &[seq as u8; 4096]).unwrap();
        }
        log.persist(0).unwrap();
        log.open_partition(PartitionHeader { partition: 1, volume_id: 9, cp_gen: 2, first_seq: 4, epoch: 1 }).unwrap();
        log.append(&h(1, 4), &[4; 4096]).unwrap();
        log.persist(1).unwrap();
        log.nvram.bytes().to_vec()
    }

    fn entries(rec: &Recovered, p: u8) -> Vec<u64> {
        rec.entries_in_order().into_iter().filter(|e| e.0 == p).map(|e| e.2.seq).collect()
    }

    #[test]
    fn freeing_a_partition_survives_a_tear_at_every_line() {
        let old_cp = Checkpoint { released_cp: 0, next_seq: 1 };
        let new_cp = Checkpoint { released_cp: 1, next_seq: 4 };
        // The record lands in either slot: after an odd and an even number of earlier frees.
        for frees in [0, 1] {
            let start = busy_log(frees);
            let runs = crate::tear::cut_at_every_persist(&start, &mut |nv| {
                let (mut log, _) = NvLog::open(nv, 9, PB).unwrap();
                log.free_partition(0, new_cp).unwrap();
                log.nvram.bytes().to_vec()
            });
            assert_eq!(runs.len(), 3, "a record, then the header");
            let mut images = 0;
            for (old, new) in &runs {
                for img in crate::tear::nvram_images(old, new) {
                    images += 1;
                    let mut nv = MemNvram::new(img.len());
                    nv.bytes_mut().copy_from_slice(&img);
                    let (log, rec) = NvLog::open(nv, 9, PB).expect("a torn free opens");
                    assert!(rec.checkpoint == old_cp || rec.checkpoint == new_cp, "{:?}", rec.checkpoint);
                    assert_eq!(entries(&rec, 1), vec![4], "the other partition is untouched");
                    match entries(&rec, 0).as_slice() {
                        [1, 2, 3] => {}
                        [] => {
                            assert!(log.header(0).is_none());
                            assert_eq!(rec.checkpoint, new_cp, "a partition is free only once its record is durable");
                        }
                        other => panic!("partition 0 holds {other:?}"),
                    }
                }
            }
            assert!(images > 1000);
        }
    }

    #[test]
    fn format_and_open_partition_survive_a_tear_at_every_line() {
        // Callers format a new (zeroed) file before the volume's record names it.
        let region = NvLog::<MemNvram>::region_bytes(PB);
        let start = Checkpoint { released_cp: 6, next_seq: 70 };
        let runs = crate::tear::cut_at_every_persist(&vec![0; region], &mut |nv| {
            let nv = NvLog::format(nv, 9, PB, start).unwrap();
            let (mut log, _) = NvLog::open(nv, 9, PB).unwrap();
            log.open_partition(PartitionHeader { partition: 0, volume_id: 9, cp_gen: 7, first_seq: 70, epoch: 2 })
                .unwrap();
            log.nvram.bytes().to_vec()
        });
        assert!(runs.len() > 3);
        for (old, new) in &runs {
            for img in crate::tear::nvram_images(old, new) {
                let mut nv = MemNvram::new(img.len());
                nv.bytes_mut().copy_from_slice(&img);
                let (log, rec) = NvLog::open(nv, 9, PB).expect("a torn format opens");
                assert!(rec.entries_in_order().is_empty(), "a fresh log holds no entry");
                assert!(rec.checkpoint == start || rec.checkpoint == Checkpoint::default(), "{:?}", rec.checkpoint);
                if log.header(0).is_some() {
                    assert_eq!(rec.checkpoint, start, "a partition opens only after the format is whole");
                }
            }
        }
    }
}
