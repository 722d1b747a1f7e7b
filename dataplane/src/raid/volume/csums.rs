//! Block checksums: one crc32c per member block, held in memory and kept in each member's
//! checksum area (loaded at open, written back at flush).

use super::*;

pub(super) fn new_csums(rows: u64, init: u32) -> Box<[AtomicU32]> {
    (0..rows).map(|_| AtomicU32::new(init)).collect()
}

impl Raid4 {
    pub(in crate::raid) fn csum_of(&self, member: usize, row: u64) -> u32 {
        self.csum(member, row)
    }

    pub(in crate::raid) fn set_csums_pub(&self, updates: &[(usize, u64, u32)]) {
        self.set_csums(updates);
    }

    pub(super) fn csum(&self, member: usize, row: u64) -> u32 {
        self.members.read()[member].csums[crate::usize_of(row)].load(Ordering::Relaxed)
    }

    pub(super) fn set_csums(&self, updates: &[(usize, u64, u32)]) {
        if updates.is_empty() {
            return;
        }
        let members = self.members.read();
        let mut dirty = self.dirty_csums.lock();
        for &(m, row, crc) in updates {
            members[m].csums[crate::usize_of(row)].store(crc, Ordering::Relaxed);
            dirty.insert((m, row / CSUMS_PER_BLOCK));
        }
    }

    // ---- locking ----

    pub(super) fn load_csums(&self) -> io::Result<()> {
        let members = self.members.read();
        let n = crate::usize_of(self.geo().csum_blocks()) * BLOCK_BYTES;
        let mut failed = Vec::new();
        for (i, m) in members.iter().enumerate() {
            let Some(dev) = &m.dev else { continue };
            let mut buf = vec![0u8; n];
            if let Err(e) = dev.read_at(&mut buf, self.geo().csum_offset()) {
                failed.push((i, e));
                continue;
            }
            for (row, c) in m.csums.iter().enumerate() {
                let at = row * 4;
                c.store(u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")), Ordering::Relaxed);
            }
        }
        drop(members);
        for (i, e) in failed {
            self.fail_member(i, &e);
        }
        if self.members.read().iter().filter(|m| m.state != MemberState::InSync).count() > 1 {
            return Err(io::Error::other("a second member failed while its checksums were read"));
        }
        Ok(())
    }

    /// Writes the dirty checksum blocks back to their members.
    pub(super) fn write_csums(&self) -> io::Result<()> {
        let dirty = std::mem::take(&mut *self.dirty_csums.lock());
        if dirty.is_empty() {
            return Ok(());
        }
        let mut per_member: BTreeMap<usize, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
        {
            let members = self.members.read();
            for (m, cb) in dirty {
                let member = &members[m];
                if member.dev.is_none() || member.state == MemberState::Failed {
                    continue;
                }
                let mut block = vec![0u8; BLOCK_BYTES];
                let first = cb * CSUMS_PER_BLOCK;
                // (The rows a grow is preparing included: their checksums are set first.)
                let last = (first + CSUMS_PER_BLOCK).min(member.csums.len() as u64);
                for row in first..last {
                    let at = crate::usize_of(row - first) * 4;
                    let c = member.csums[crate::usize_of(row)].load(Ordering::Relaxed);
                    block[at..at + 4].copy_from_slice(&c.to_le_bytes());
                }
                per_member.entry(m).or_default().push((self.geo().csum_offset() + cb * B, block));
            }
        }
        let view = self.view();
        for (m, blocks) in per_member {
            let Some(dev) = &view.devs[m] else { continue };
            let ops: Vec<WriteOp<'_>> = blocks.iter().map(|(off, b)| WriteOp { offset: *off, buf: b }).collect();
            if let Err(e) = dev.write_many(&ops) {
                self.fail_member(m, &e);
            }
        }
        self.check_survivable()
    }
}
