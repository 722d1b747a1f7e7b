//! A destination log file: the bytes of one source NVLog partition, for one (source node,
//! volume, partition), placed at the same offsets as on the source.
//!
//! Entries are validated before they are placed (checksum, volume, partition, epoch, and
//! consecutive sequence numbers at exactly the current tail), so a log file only ever holds
//! a prefix of the source's partition. Placement and persistence are separate steps so that
//! a receiver can place a whole batch and persist it once (group commit).

use std::io;

use thiserror::Error;

use crate::format::{
    scan_partition, DecodeError, EntryHeader, PartitionHeader, PartitionScan, ScannedEntry, ENTRY_HEADER_BYTES,
    PARTITION_HEADER_BYTES,
};
use crate::nvram::Nvram;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LogFileError {
    #[error("partition header: {0}")]
    BadHeader(String),
    #[error("entries for a partition that is not open")]
    NotOpen,
    #[error("entries at offset {got}, but the log's tail is at {tail}")]
    OutOfOrder { got: u64, tail: usize },
    #[error("entries beyond the end of the log ({end} > {len})")]
    Overrun { end: u64, len: usize },
    #[error("bad entry at offset {at}: {source}")]
    BadEntry { at: usize, source: DecodeError },
    #[error("entry at offset {at}: {what}")]
    Mismatch { at: usize, what: String },
    #[error("persist: {0}")]
    Persist(#[source] io::Error),
}

pub struct LogFile<N: Nvram> {
    nvram: N,
    partition: u8,
    header: Option<PartitionHeader>,
    tail: usize,
    persisted: usize,
    /// Sequence number of the next entry; `persisted_seq` is the last one persisted.
    next_seq: u64,
    persisted_next_seq: u64,
    /// Every entry the log holds up to `tail`, as [`LogFile::place`] validated it or a scan
    /// found it: a CP applies from this without reading the log's checksums again.
    index: Vec<ScannedEntry>,
}

impl<N: Nvram> LogFile<N> {
    /// Opens a log file, scanning what it holds.
    pub fn open(nvram: N, partition: u8) -> (Self, PartitionScan) {
        let scan = scan_partition(nvram.bytes(), partition);
        let next_seq = scan.next_seq().unwrap_or(0);
        let log = LogFile {
            partition,
            header: scan.header,
            tail: scan.tail,
            persisted: scan.tail,
            next_seq,
            persisted_next_seq: next_seq,
            index: scan.entries.clone(),
            nvram,
        };
        (log, scan)
    }

    pub fn header(&self) -> Option<PartitionHeader> {
        self.header
    }
    pub fn tail(&self) -> usize {
        self.tail
    }
    pub fn bytes(&self) -> &[u8] {
        self.nvram.bytes()
    }
    /// The next sequence number expected; with no header, 0.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
    pub fn scan(&self) -> PartitionScan {
        scan_partition(self.nvram.bytes(), self.partition)
    }

    /// Starts a new use of the log (the source opened the partition).
    pub fn open_partition(&mut self, raw: &[u8]) -> Result<PartitionHeader, LogFileError> {
        let h = PartitionHeader::decode(raw)
            .map_err(|e| LogFileError::BadHeader(e.to_string()))?
            .ok_or_else(|| LogFileError::BadHeader("empty header".into()))?;
        if h.partition != self.partition {
            return Err(LogFileError::BadHeader(format!("partition {} sent to log {}", h.partition, self.partition)));
        }
        let bytes = self.nvram.bytes_mut();
        bytes[..PARTITION_HEADER_BYTES].copy_from_slice(&h.encode());
        bytes[PARTITION_HEADER_BYTES..PARTITION_HEADER_BYTES + ENTRY_HEADER_BYTES].fill(0);
        self.nvram.persist(0, PARTITION_HEADER_BYTES + ENTRY_HEADER_BYTES).map_err(LogFileError::Persist)?;
        self.header = Some(h);
        self.tail = PARTITION_HEADER_BYTES;
        self.persisted = self.tail;
        self.next_seq = h.first_seq;
        self.persisted_next_seq = h.first_seq;
        self.index.clear();
        Ok(h)
    }

    /// Validates and places entries at `offset` (which must be the tail). Not persisted
    /// until [`LogFile::persist`]. Returns the number placed.
    pub fn place(&mut self, offset: u64, entries: &[u8], epoch: u64) -> Result<usize, LogFileError> {
        let h = self.header.ok_or(LogFileError::NotOpen)?;
        if offset != self.tail as u64 {
            return Err(LogFileError::OutOfOrder { got: offset, tail: self.tail });
        }
        let end = offset + entries.len() as u64;
        if end > self.nvram.len() as u64 {
            return Err(LogFileError::Overrun { end, len: self.nvram.len() });
        }
        // Validate everything first: a bad batch places nothing.
        let mut at = 0usize;
        let mut seq = self.next_seq;
        let mut count = 0;
        let indexed = self.index.len();
        while at < entries.len() {
            let abs = self.tail + at;
            let (eh, _) = match EntryHeader::decode(&entries[at..]) {
                Ok(x) => x,
                Err(source) => {
                    self.index.truncate(indexed);
                    return Err(LogFileError::BadEntry { at: abs, source });
                }
            };
            let what = if eh.seq != seq {
                Some(format!("sequence {} where {} was expected", eh.seq, seq))
            } else if eh.volume_id != h.volume_id {
                Some("entry of another volume".into())
            } else if eh.partition != self.partition {
                Some("entry of another partition".into())
            } else if eh.epoch != epoch {
                Some(format!("epoch {} on a link of epoch {}", eh.epoch, epoch))
            } else if at + eh.footprint() > entries.len() {
                Some("entry padding truncated".into())
            } else {
                None
            };
            if let Some(what) = what {
                self.index.truncate(indexed);
                return Err(LogFileError::Mismatch { at: abs, what });
            }
            self.index.push(ScannedEntry { at: abs, header: eh });
            at += eh.footprint();
            seq += 1;
            count += 1;
        }
        let tail = self.tail;
        self.nvram.bytes_mut()[tail..tail + entries.len()].copy_from_slice(entries);
        self.tail += entries.len();
        self.next_seq = seq;
        Ok(count)
    }

    /// Persists everything placed. Returns the last persisted sequence number, if any
    /// entry is held.
    pub fn persist(&mut self) -> Result<Option<u64>, LogFileError> {
        if self.tail > self.persisted {
            self.nvram.persist(self.persisted, self.tail - self.persisted).map_err(LogFileError::Persist)?;
            self.persisted = self.tail;
            self.persisted_next_seq = self.next_seq;
        }
        Ok(self.last_persisted_seq())
    }

    pub fn last_persisted_seq(&self) -> Option<u64> {
        match self.header {
            Some(h) if self.persisted_next_seq > h.first_seq => Some(self.persisted_next_seq - 1),
            _ => None,
        }
    }

    /// Re-reads the log's state from its bytes: after an engine placed entries without
    /// this side's CPU (RDMA), the bookkeeping of [`LogFile::place`] knows nothing of them.
    /// What it finds past the last persist is persisted before it counts as persisted:
    /// entries placed by a connection that ended before its commit were never made
    /// durable, and a new session must not acknowledge them on the old one's word.
    pub fn rescan(&mut self) -> Result<PartitionScan, LogFileError> {
        let scan = self.scan();
        let from = self.persisted.min(scan.tail);
        if scan.tail > from {
            self.nvram.persist(from, scan.tail - from).map_err(LogFileError::Persist)?;
        }
        self.header = scan.header;
        self.tail = scan.tail;
        self.persisted = scan.tail;
        self.next_seq = scan.next_seq().unwrap_or(0);
        self.persisted_next_seq = self.next_seq;
        self.index.clone_from(&scan.entries);
        Ok(scan)
    }

    /// As [`LogFile::rescan`], scanning only where it must: when an entry was placed past
    /// the tail this side knows of (by RDMA, without this side's CPU), the log is scanned;
    /// otherwise its index is already whole, and only what was placed and not persisted is
    /// persisted. Afterwards [`LogFile::entries`] lists every entry the log holds.
    pub fn catch_up(&mut self) -> Result<(), LogFileError> {
        // RDMA places partition headers too: one this side did not write is news as well.
        let header_now = PartitionHeader::decode(self.nvram.bytes()).ok().flatten();
        let placed_elsewhere = header_now != self.header
            || (self.header.is_some()
                && EntryHeader::decode(&self.nvram.bytes()[self.tail..])
                    .is_ok_and(|(h, _)| h.seq == self.next_seq && h.partition == self.partition));
        if placed_elsewhere {
            return self.rescan().map(|_| ());
        }
        if self.tail > self.persisted {
            self.nvram.persist(self.persisted, self.tail - self.persisted).map_err(LogFileError::Persist)?;
            self.persisted = self.tail;
            self.persisted_next_seq = self.next_seq;
        }
        Ok(())
    }

    /// Where the persisted part of the log ends: what the destination may give back to a
    /// source that lost its own copy (`Message::LogFetch`).
    pub fn persisted_tail(&self) -> usize {
        self.persisted
    }

    /// Drops the entry at `at` and every one after it from the log's bookkeeping: an entry
    /// that failed its checksum when read back (the memory under it changed after it was
    /// validated). The source sends them again from its own log.
    pub fn truncate_at(&mut self, at: usize) {
        let Some(i) = self.index.iter().position(|e| e.at == at) else { return };
        let seq = self.index[i].header.seq;
        self.index.truncate(i);
        self.tail = at;
        self.persisted = self.persisted.min(at);
        self.next_seq = seq;
        self.persisted_next_seq = self.persisted_next_seq.min(seq);
    }

    /// The entries the log holds, in order (see [`LogFile::catch_up`]).
    pub fn entries(&self) -> &[ScannedEntry] {
        &self.index
    }

    /// The log's memory, for registration with an RDMA engine. Valid while the log lives.
    pub fn memory(&mut self) -> (*mut u8, usize) {
        let b = self.nvram.bytes_mut();
        (b.as_mut_ptr(), b.len())
    }

    /// Releases the log after its CP is durable.
    pub fn free(&mut self) -> Result<(), LogFileError> {
        self.nvram.bytes_mut()[..PARTITION_HEADER_BYTES].fill(0);
        self.nvram.persist(0, PARTITION_HEADER_BYTES).map_err(LogFileError::Persist)?;
        self.header = None;
        self.tail = 0;
        self.persisted = 0;
        self.next_seq = 0;
        self.persisted_next_seq = 0;
        self.index.clear();
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::format::EntryKind;
    use crate::nvram::MemNvram;

    fn entry(seq: u64, epoch: u64) -> Vec<u8> {
        let h = EntryHeader {
            kind: EntryKind::Write,
            partition: 1,
            volume_id: 5,
            epoch,
            seq,
            offset: 0,
            length: 100,
            data_len: 100,
        };
        let mut v = vec![0u8; h.footprint()];
        let data = [seq as u8; 100];
        v[64..164].copy_from_slice(&data);
        h.encode(&data, &mut v[..64]);
        v
    }

    #[test]
    fn places_validates_persists_reopens() {
        let (mut lf, scan) = LogFile::open(MemNvram::new(64 * 1024), 1);
        assert!(scan.header.is_none());
        let ph = PartitionHeader { partition: 1, volume_id: 5, cp_gen: 2, first_seq: 100, epoch: 3 };
        lf.open_partition(&ph.encode()).unwrap();
        let batch: Vec<u8> = [entry(100, 3), entry(101, 3)].concat();
        assert_eq!(lf.place(64, &batch, 3).unwrap(), 2);
        assert_eq!(lf.persist().unwrap(), Some(101));
        // Out of order, wrong epoch, gap in sequence, corruption: all refused, nothing placed.
        assert!(matches!(lf.place(64, &entry(102, 3), 3), Err(LogFileError::OutOfOrder { .. })));
        let tail = lf.tail() as u64;
        assert!(matches!(lf.place(tail, &entry(102, 2), 3), Err(LogFileError::Mismatch { .. })));
        assert!(matches!(lf.place(tail, &entry(103, 3), 3), Err(LogFileError::Mismatch { .. })));
        let mut bad = entry(102, 3);
        bad[70] ^= 1;
        assert!(matches!(lf.place(tail, &bad, 3), Err(LogFileError::BadEntry { .. })));
        assert_eq!(lf.tail() as u64, tail);
        lf.place(tail, &entry(102, 3), 3).unwrap();
        lf.persist().unwrap();
        assert_eq!(lf.scan().entries.len(), 3);
        assert_eq!(lf.next_seq(), 103);
        // Re-opening the partition starts the log over.
        lf.open_partition(&ph.encode()).unwrap();
        assert_eq!(lf.scan().entries.len(), 0);
        assert_eq!(lf.next_seq(), 100);
    }

    /// The index a CP applies from equals what a full scan finds, whether the entries came
    /// through `place` (no scan needed), by a write this side did not see (as RDMA places
    /// them: catching up scans), or after refused batches (which index nothing).
    #[test]
    fn catch_up_index_matches_a_scan() {
        let (mut lf, _) = LogFile::open(MemNvram::new(64 * 1024), 1);
        let ph = PartitionHeader { partition: 1, volume_id: 5, cp_gen: 2, first_seq: 100, epoch: 3 };
        lf.open_partition(&ph.encode()).unwrap();
        lf.place(64, &[entry(100, 3), entry(101, 3)].concat(), 3).unwrap();
        let tail = lf.tail() as u64;
        let mut bad = entry(102, 3);
        bad[70] ^= 1;
        assert!(lf.place(tail, &[entry(102, 3), bad].concat(), 3).is_err());
        lf.catch_up().unwrap();
        assert_eq!(lf.entries(), &lf.scan().entries[..]);
        assert_eq!(lf.entries().len(), 2);
        assert_eq!(lf.last_persisted_seq(), Some(101), "catching up persists what was placed");
        // Entries written into the log's memory behind its back, as RDMA does.
        let at = lf.tail();
        let more = [entry(102, 3), entry(103, 3)].concat();
        lf.nvram.bytes_mut()[at..at + more.len()].copy_from_slice(&more);
        assert_eq!(lf.entries().len(), 2, "not seen yet");
        lf.catch_up().unwrap();
        assert_eq!(lf.entries(), &lf.scan().entries[..]);
        assert_eq!(lf.entries().len(), 4);
        assert_eq!(lf.next_seq(), 104);
        // A partition opened behind this side's back (RDMA places partition headers too).
        lf.nvram.bytes_mut()[..PARTITION_HEADER_BYTES]
            .copy_from_slice(&PartitionHeader { first_seq: 150, cp_gen: 9, ..ph }.encode());
        let first = entry(150, 3);
        lf.nvram.bytes_mut()[64..64 + first.len()].copy_from_slice(&first);
        lf.catch_up().unwrap();
        assert_eq!(lf.header().map(|h| h.cp_gen), Some(9));
        assert_eq!(lf.entries(), &lf.scan().entries[..]);
        assert_eq!(lf.entries().len(), 1);
        // A stale entry of an earlier use past the tail is not taken for a new one.
        lf.open_partition(&PartitionHeader { first_seq: 200, cp_gen: 3, ..ph }.encode()).unwrap();
        lf.place(64, &entry(200, 3), 3).unwrap();
        lf.catch_up().unwrap();
        assert_eq!(lf.entries(), &lf.scan().entries[..]);
        assert_eq!(lf.entries().len(), 1);
    }
}
