//! The read path: every block checked against its checksum, a block that fails rebuilt
//! from the rest of its row and rewritten, stale checksums corrected.

use super::*;

pub(super) fn row_xor_is_zero(blocks: &[Option<Vec<u8>>]) -> bool {
    let srcs: Vec<&[u8]> = blocks.iter().map(|b| b.as_deref().expect("present")).collect();
    let mut acc = vec![0u8; BLOCK_BYTES];
    xor::xor_gen(&srcs, &mut acc);
    acc.iter().all(|&b| b == 0)
}

impl Raid4 {
    /// Reads `rows` consecutive rows of every alive member in `members`, starting at `row`:
    /// one buffer per member (`None` where the member is not alive for the first row).
    /// A member whose read fails is failed, and the error returned, for the caller to retry.
    pub(in crate::raid) fn read_rows(
        &self,
        view: &View,
        row: u64,
        rows: u64,
        members: impl Iterator<Item = usize>,
    ) -> Result<Vec<(usize, Vec<u8>)>, Retry> {
        let mut out = Vec::new();
        for m in members {
            if !view.alive(m, row) {
                continue;
            }
            let mut buf = vec![0u8; crate::usize_of(rows * B)];
            if let Err(e) = view.dev(m).read_at(&mut buf, self.geo().data_offset() + row * B) {
                self.fail_member(m, &e);
                return Err(Retry);
            }
            out.push((m, buf));
        }
        Ok(out)
    }

    /// Reads one row whole, checks every block, and rebuilds what is missing or bad from
    /// the rest (rewriting a bad block in place). Returns every member's block. The caller
    /// holds the row's stripe lock.
    pub(in crate::raid) fn verified_row(
        &self,
        view: &View,
        row: u64,
        scrub: Option<&mut crate::raid::maintain::ScrubReport>,
    ) -> Result<Vec<Vec<u8>>, RowError> {
        let n = self.geo().members();
        let got = self.read_rows(view, row, 1, 0..n).map_err(|Retry| RowError::Retry)?;
        let mut blocks: Vec<Option<Vec<u8>>> = vec![None; n];
        for (m, b) in got {
            blocks[m] = Some(b);
        }
        let missing: Vec<usize> = (0..n).filter(|&m| blocks[m].is_none()).collect();
        let bad: Vec<usize> = (0..n)
            .filter(|&m| blocks[m].as_ref().is_some_and(|b| crate::checksum::crc32c(b) != self.csum(m, row)))
            .collect();
        let mut scrub = scrub;
        if !bad.is_empty() {
            self.counters.checksum_errors.fetch_add(bad.len() as u64, Ordering::Relaxed);
            if let Some(s) = scrub.as_deref_mut() {
                s.checksum_errors += bad.len() as u64;
            }
        }
        let redo = self.redo.load(Ordering::Relaxed);
        if missing.is_empty() && (bad.len() == 1 || (redo && !bad.is_empty())) && row_xor_is_zero(&blocks) {
            // Data and parity agree: the checksum is what is wrong (a corrupt checksum
            // entry; or, in a redo, checksums a crash kept from being written). Two bad
            // blocks in a row whose XOR still holds are not trusted outside a redo: two
            // equal corruptions cancel out in parity.
            let fixes: Vec<(usize, u64, u32)> =
                bad.iter().map(|&m| (m, row, crate::checksum::crc32c(blocks[m].as_ref().expect("present")))).collect();
            self.set_csums(&fixes);
            self.counters.checksums_corrected.fetch_add(fixes.len() as u64, Ordering::Relaxed);
            if let Some(s) = scrub.as_deref_mut() {
                s.checksums_corrected += fixes.len() as u64;
            }
            return Ok(blocks.into_iter().map(|b| b.expect("present")).collect());
        }
        if let Some(s) = scrub.as_deref_mut() {
            if missing.is_empty() && bad.is_empty() && !row_xor_is_zero(&blocks) {
                // Every block matches its checksum, yet parity disagrees: parity was
                // written from other data than the checksums saw. Data wins (it is what
                // the checksums vouch for); parity is recomputed.
                s.parity_mismatches += 1;
                let p = self.geo().parity_member();
                let mut parity = vec![0u8; BLOCK_BYTES];
                let srcs: Vec<&[u8]> = (0..p).map(|m| blocks[m].as_deref().expect("present")).collect();
                xor::xor_gen(&srcs, &mut parity);
                self.rewrite_block(view, p, row, &parity).map_err(|Retry| RowError::Retry)?;
                s.blocks_repaired += 1;
                blocks[p] = Some(parity);
            }
        }
        let lost: Vec<usize> = missing.iter().chain(&bad).copied().collect();
        match lost.as_slice() {
            [] => Ok(blocks.into_iter().map(|b| b.expect("present")).collect()),
            [one] => {
                let one = *one;
                let mut rebuilt = vec![0u8; BLOCK_BYTES];
                let srcs: Vec<&[u8]> =
                    (0..n).filter(|&m| m != one).map(|m| blocks[m].as_deref().expect("present")).collect();
                xor::xor_gen(&srcs, &mut rebuilt);
                if missing.contains(&one) {
                    self.counters.degraded_reads.fetch_add(1, Ordering::Relaxed);
                    blocks[one] = Some(rebuilt);
                } else if crate::checksum::crc32c(&rebuilt) == self.csum(one, row) {
                    self.rewrite_block(view, one, row, &rebuilt).map_err(|Retry| RowError::Retry)?;
                    self.counters.blocks_repaired.fetch_add(1, Ordering::Relaxed);
                    if let Some(s) = scrub.as_deref_mut() {
                        s.blocks_repaired += 1;
                    }
                    blocks[one] = Some(rebuilt);
                } else if self.redo.load(Ordering::Relaxed) || self.copy_over.load(Ordering::Relaxed) {
                    // A crash tore this row: the redo (or the copy) overwrites what it needs.
                    self.counters.redo_unverified.fetch_add(1, Ordering::Relaxed);
                } else {
                    return Err(self.unrecoverable(row, &lost, &missing, scrub));
                }
                Ok(blocks.into_iter().map(|b| b.expect("present")).collect())
            }
            _ => {
                if missing.is_empty() && self.redo.load(Ordering::Relaxed) {
                    self.counters.redo_unverified.fetch_add(bad.len() as u64, Ordering::Relaxed);
                    return Ok(blocks.into_iter().map(|b| b.expect("present")).collect());
                }
                if missing.len() <= 1 && self.copy_over.load(Ordering::Relaxed) {
                    // Being copied over whole: the row is taken as it reads, a missing
                    // member's block as the XOR of the rest, so that the writes of the copy
                    // keep its parity consistent until they have replaced all of it.
                    if let Some(&gone) = missing.first() {
                        let mut rebuilt = vec![0u8; BLOCK_BYTES];
                        let srcs: Vec<&[u8]> =
                            (0..n).filter(|&m| m != gone).map(|m| blocks[m].as_deref().expect("present")).collect();
                        xor::xor_gen(&srcs, &mut rebuilt);
                        blocks[gone] = Some(rebuilt);
                    }
                    self.counters.redo_unverified.fetch_add(lost.len() as u64, Ordering::Relaxed);
                    return Ok(blocks.into_iter().map(|b| b.expect("present")).collect());
                }
                Err(self.unrecoverable(row, &lost, &missing, scrub))
            }
        }
    }

    pub(super) fn unrecoverable(
        &self,
        row: u64,
        lost: &[usize],
        missing: &[usize],
        scrub: Option<&mut crate::raid::maintain::ScrubReport>,
    ) -> RowError {
        self.counters.unrecoverable.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = scrub {
            s.unrecoverable += 1;
        }
        let what: Vec<String> = lost
            .iter()
            .map(|m| format!("member {m} {}", if missing.contains(m) { "missing" } else { "fails its checksum" }))
            .collect();
        RowError::Lost(io::Error::other(format!(
            "RAID-4 volume {}: row {row} (stripe {}) cannot be read: {}{}",
            self.name,
            self.geo().stripe_of_row(row),
            what.join(", "),
            if lost.len() > 1 {
                "; RAID-4 rebuilds one block per row"
            } else {
                ", and its rebuild from parity fails it too"
            }
        )))
    }

    /// Rewrites one block (repaired) and its checksum.
    pub(super) fn rewrite_block(&self, view: &View, member: usize, row: u64, data: &[u8]) -> Result<(), Retry> {
        if self.begin_write().is_err() {
            return Err(Retry);
        }
        let r = view.dev(member).write_at(data, self.geo().data_offset() + row * B);
        self.end_write();
        if let Err(e) = r {
            self.fail_member(member, &e);
            return Err(Retry);
        }
        self.set_csums(&[(member, row, crate::checksum::crc32c(data))]);
        Ok(())
    }

    // ---- reads ----

    pub(super) fn read_blocks(&self, buf: &mut [u8], first_vbn: u64) -> io::Result<()> {
        let nblocks = buf.len() as u64 / B;
        let rows_touched = (first_vbn..first_vbn + nblocks).map(|v| self.geo().place(v).row);
        let _locks = self.lock_rows(rows_touched);
        for attempt in 0..=self.geo().members() {
            match self.read_blocks_locked(buf, first_vbn) {
                Ok(()) => return Ok(()),
                Err(RowError::Retry) if attempt < self.geo().members() => continue,
                Err(RowError::Retry) => return self.check_survivable().and(Err(io::Error::other("member failures"))),
                Err(RowError::Lost(e)) => return Err(e),
            }
        }
        unreachable!("the loop returns")
    }

    pub(super) fn read_blocks_locked(&self, buf: &mut [u8], first_vbn: u64) -> Result<(), RowError> {
        self.check_survivable().map_err(RowError::Lost)?;
        let view = self.view();
        let nblocks = buf.len() as u64 / B;
        let unit = self.geo().unit_blocks();
        // Runs of blocks on one member (a stripe unit at most), read in one op each.
        let mut reads: BTreeMap<usize, Vec<(u64, usize, usize)>> = BTreeMap::new(); // member -> (row, at, blocks)
        let mut rebuild: Vec<(u64, usize, u64)> = Vec::new(); // (vbn, member, row)
        let mut v = first_vbn;
        while v < first_vbn + nblocks {
            let p = self.geo().place(v);
            let run = (unit - p.row % unit).min(first_vbn + nblocks - v);
            let at = crate::usize_of((v - first_vbn) * B);
            // A run is alive as a whole or not: the rebuild cursor moves by whole stripes.
            if view.alive(p.member, p.row) {
                reads.entry(p.member).or_default().push((p.row, at, crate::usize_of(run)));
            } else {
                rebuild.extend((0..run).map(|i| (v + i, p.member, p.row + i)));
            }
            v += run;
        }
        for (m, runs) in &reads {
            let mut rest: &mut [u8] = buf;
            let mut consumed = 0usize;
            let mut ops = Vec::with_capacity(runs.len());
            for &(row, at, n) in runs {
                let tail = std::mem::take(&mut rest);
                let (_, tail) = tail.split_at_mut(at - consumed);
                let (mine, tail) = tail.split_at_mut(n * BLOCK_BYTES);
                consumed = at + n * BLOCK_BYTES;
                rest = tail;
                ops.push(ReadOp { offset: self.geo().data_offset() + row * B, buf: mine });
            }
            if let Err(e) = view.dev(*m).read_many(&mut ops) {
                self.fail_member(*m, &e);
                return Err(RowError::Retry);
            }
        }
        // Check every block read; rebuild the bad ones and those of dead members.
        for (m, runs) in &reads {
            for &(row, at, n) in runs {
                for i in 0..n {
                    let b = &buf[at + i * BLOCK_BYTES..at + (i + 1) * BLOCK_BYTES];
                    if crate::checksum::crc32c(b) != self.csum(*m, row + i as u64) {
                        let vbn = first_vbn + (at / BLOCK_BYTES + i) as u64;
                        rebuild.push((vbn, *m, row + i as u64));
                    }
                }
            }
        }
        for (vbn, m, row) in rebuild {
            let blocks = self.verified_row(&view, row, None)?;
            let at = crate::usize_of((vbn - first_vbn) * B);
            buf[at..at + BLOCK_BYTES].copy_from_slice(&blocks[m]);
        }
        Ok(())
    }

    // ---- writes ----

    pub(super) fn read_ops(&self, ops: &mut [ReadOp<'_>]) -> io::Result<()> {
        for op in ops.iter_mut() {
            check_range(self.geo().volume_bytes, op.offset, op.buf.len() as u64)?;
            if op.offset.is_multiple_of(B) && (op.buf.len() as u64).is_multiple_of(B) {
                for (i, chunk) in op.buf.chunks_mut(crate::usize_of(BATCH_BYTES_MAX)).enumerate() {
                    self.read_blocks(chunk, (op.offset + i as u64 * BATCH_BYTES_MAX) / B)?;
                }
            } else {
                let start = op.offset / B * B;
                let end = (op.offset + op.buf.len() as u64).div_ceil(B) * B;
                let mut block = vec![0u8; crate::usize_of(end - start)];
                self.read_blocks(&mut block, start / B)?;
                let at = crate::usize_of(op.offset - start);
                let len = op.buf.len();
                op.buf.copy_from_slice(&block[at..at + len]);
            }
        }
        Ok(())
    }
}
