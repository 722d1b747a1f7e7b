//! The write path: rows planned as full, read-modify-write or reconstruct-write (always
//! reconstruct under redo), parity by XOR, members written side by side.

use super::*;

impl Raid4 {
    /// Starts a write batch: the superblocks say dirty before any of it reaches a member
    /// (see the superblock's module docs). Pair with [`Self::end_write`].
    pub(super) fn begin_write(&self) -> io::Result<()> {
        let _round = self.dirty_round.lock();
        let mut meta = self.meta.lock();
        meta.writes_in_flight += 1;
        meta.writes_started += 1;
        if meta.dirty {
            return Ok(());
        }
        meta.dirty = true;
        drop(meta);
        // A member whose superblock cannot be written is failed (and left out): the flag
        // is on every member that counts, if the volume survives it.
        self.write_superblocks().or_else(|_| self.check_survivable()).inspect_err(|_| {
            let mut meta = self.meta.lock();
            meta.writes_in_flight -= 1;
        })
    }

    pub(super) fn end_write(&self) {
        self.meta.lock().writes_in_flight -= 1;
    }

    /// After a flush that began once `started` write batches had started: the superblocks
    /// say clean again, if no batch is under way or began since.
    pub(super) fn mark_clean(&self, started: u64) -> io::Result<()> {
        let _round = self.dirty_round.lock();
        let mut meta = self.meta.lock();
        if !meta.dirty || meta.writes_in_flight > 0 || meta.writes_started != started {
            return Ok(());
        }
        meta.dirty = false;
        drop(meta);
        self.write_superblocks().or_else(|_| self.check_survivable())
    }

    /// Writes block-aligned ops that do not overlap one another.
    pub(super) fn write_aligned(&self, ops: &[WriteOp<'_>]) -> io::Result<()> {
        self.begin_write()?;
        let r = self.write_aligned_dirty(ops);
        self.end_write();
        r
    }

    pub(super) fn write_aligned_dirty(&self, ops: &[WriteOp<'_>]) -> io::Result<()> {
        for attempt in 0..=self.geo().members() {
            let rows = ops.iter().flat_map(|op| {
                let first = op.offset / B;
                (first..first + op.buf.len() as u64 / B).map(|v| self.geo().place(v).row)
            });
            let locks = self.lock_rows(rows);
            let r = self.write_locked(ops);
            drop(locks);
            match r {
                Ok(()) => return Ok(()),
                Err(RowError::Retry) if attempt < self.geo().members() => continue,
                Err(RowError::Retry) => return self.check_survivable().and(Err(io::Error::other("member failures"))),
                Err(RowError::Lost(e)) => return Err(e),
            }
        }
        unreachable!("the loop returns")
    }

    pub(super) fn write_locked(&self, ops: &[WriteOp<'_>]) -> Result<(), RowError> {
        self.check_survivable().map_err(RowError::Lost)?;
        let view = self.view();
        let g = self.geo();
        let n = g.data_disks as usize;
        let p = g.parity_member();
        let unit = g.unit_blocks();
        let redo = self.redo.load(Ordering::Relaxed);

        // The new data: per member, pieces (a stripe unit at most) to write as they are;
        // per row, the new block of each data member.
        let mut pieces: Vec<(usize, u64, &[u8])> = Vec::new();
        let mut rows: BTreeMap<u64, Vec<Option<&[u8]>>> = BTreeMap::new();
        for op in ops {
            let first = op.offset / B;
            let count = op.buf.len() as u64 / B;
            let mut v = first;
            while v < first + count {
                let pl = g.place(v);
                let run = (unit - pl.row % unit).min(first + count - v);
                let at = crate::usize_of((v - first) * B);
                let piece = &op.buf[at..at + crate::usize_of(run * B)];
                pieces.push((pl.member, pl.row, piece));
                for (i, block) in piece.chunks_exact(BLOCK_BYTES).enumerate() {
                    rows.entry(pl.row + i as u64).or_insert_with(|| vec![None; n])[pl.member] = Some(block);
                }
                v += run;
            }
        }

        // Plan each row, and what it needs read.
        #[derive(Clone, Copy, PartialEq)]
        enum Mode {
            Full,
            Rmw,
            Rcw,
            NoParity,
        }
        let mut plan: Vec<(u64, Mode)> = Vec::with_capacity(rows.len());
        // Per member, the rows to read, in increasing order (rows are planned in order).
        let mut need: Vec<Vec<u64>> = vec![Vec::new(); n + 1];
        for (&row, new) in &rows {
            let down: Vec<usize> = (0..=n).filter(|&m| !view.alive(m, row)).collect();
            if down.len() > 1 {
                return Err(RowError::Lost(io::Error::other(format!(
                    "RAID-4 volume {}: row {row} has {} members down ({down:?}); RAID-4 survives one",
                    self.name,
                    down.len()
                ))));
            }
            let touched = new.iter().filter(|b| b.is_some()).count();
            let down_data = down.first().copied().filter(|&m| m < n);
            let mode = if down.first() == Some(&p) {
                Mode::NoParity
            } else if touched == n {
                Mode::Full
            } else if let Some(d) = down_data {
                if new[d].is_some() {
                    Mode::Rcw
                } else {
                    Mode::Rmw
                }
            } else if redo || n - touched <= touched + 1 {
                Mode::Rcw
            } else {
                Mode::Rmw
            };
            match mode {
                Mode::Rmw => {
                    for m in (0..n).filter(|&m| new[m].is_some()) {
                        need[m].push(row);
                    }
                    need[p].push(row);
                }
                Mode::Rcw => {
                    for m in (0..n).filter(|&m| new[m].is_none()) {
                        need[m].push(row);
                    }
                }
                Mode::Full | Mode::NoParity => {}
            }
            plan.push((row, mode));
        }

        // Read what the plan needs: per member one buffer, its runs of rows back to back,
        // one op per run; the old blocks are views into those buffers (no copy per block).
        /// One member's reads: its runs of rows (first, count) and their blocks back to back.
        struct MemberReads {
            member: usize,
            runs: Vec<(u64, u64)>,
            buf: Vec<u8>,
        }
        let mut reads: Vec<MemberReads> = Vec::new();
        for (m, want) in need.iter().enumerate().filter(|(_, w)| !w.is_empty()) {
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for &r in want {
                match runs.last_mut() {
                    Some((s, len)) if *s + *len == r => *len += 1,
                    _ => runs.push((r, 1)),
                }
            }
            let mut buf = scratch::take(want.len() * BLOCK_BYTES);
            let mut rops: Vec<ReadOp<'_>> = Vec::with_capacity(runs.len());
            let mut rest = &mut buf[..];
            for &(s, len) in &runs {
                let (head, tail) = rest.split_at_mut(crate::usize_of(len * B));
                rops.push(ReadOp { offset: g.data_offset() + s * B, buf: head });
                rest = tail;
            }
            if let Err(e) = view.dev(m).read_many(&mut rops) {
                self.fail_member(m, &e);
                return Err(RowError::Retry);
            }
            drop(rops);
            reads.push(MemberReads { member: m, runs, buf });
        }
        let mut old: HashMap<(usize, u64), Cow<'_, [u8]>> = HashMap::new();
        for r in &reads {
            let mut blocks = r.buf.chunks_exact(BLOCK_BYTES);
            for &(s, len) in &r.runs {
                for row in s..s + len {
                    old.insert((r.member, row), Cow::Borrowed(blocks.next().expect("a block per row read")));
                }
            }
        }
        // A row whose old blocks fail their checks gets its parity from its data
        // (reconstruct-write): what is overwritten does not matter, what stays must pass
        // its check, or be rebuilt from the row.
        let mut verified: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
        for (row, mode) in &mut plan {
            let bad =
                (0..=n).any(|m| old.get(&(m, *row)).is_some_and(|b| crate::checksum::crc32c(b) != self.csum(m, *row)));
            if !bad {
                continue;
            }
            let new = &rows[row];
            if *mode == Mode::Rmw {
                *mode = Mode::Rcw;
                let untouched = (0..n).filter(|&m| new[m].is_none() && !old.contains_key(&(m, *row)));
                for (m, b) in self.read_rows(&view, *row, 1, untouched).map_err(|Retry| RowError::Retry)? {
                    old.insert((m, *row), Cow::Owned(b));
                }
            }
            let stays_good = (0..n)
                .filter(|&m| new[m].is_none())
                .all(|m| old.get(&(m, *row)).is_some_and(|b| crate::checksum::crc32c(b) == self.csum(m, *row)));
            if !stays_good {
                verified.insert(*row, self.verified_row(&view, *row, None)?);
            }
        }

        // Parity, into one buffer in row order.
        let parity_rows: Vec<(u64, Mode)> = plan.iter().copied().filter(|(_, m)| *m != Mode::NoParity).collect();
        let mut parity = scratch::take(parity_rows.len() * BLOCK_BYTES);
        for ((row, mode), out) in parity_rows.iter().zip(parity.chunks_exact_mut(BLOCK_BYTES)) {
            let new = &rows[row];
            let mut srcs: Vec<&[u8]> = Vec::with_capacity(2 * n + 1);
            match mode {
                Mode::Full => srcs.extend(new.iter().map(|b| b.expect("full row"))),
                Mode::Rmw => {
                    srcs.push(&old[&(p, *row)]);
                    for m in (0..n).filter(|&m| new[m].is_some()) {
                        srcs.push(&old[&(m, *row)]);
                        srcs.push(new[m].expect("touched"));
                    }
                }
                Mode::Rcw => {
                    for m in 0..n {
                        srcs.push(match (new[m], verified.get(row)) {
                            (Some(b), _) => b,
                            (None, Some(v)) => &v[m],
                            (None, None) => &old[&(m, *row)],
                        });
                    }
                }
                Mode::NoParity => unreachable!("filtered out"),
            }
            xor::xor_gen(&srcs, out);
        }

        // Checksums of everything written.
        let mut crcs: Vec<(usize, u64, u32)> = Vec::new();
        for (&row, new) in &rows {
            for (m, b) in new.iter().enumerate() {
                if let Some(b) = b {
                    crcs.push((m, row, crate::checksum::crc32c(b)));
                }
            }
        }
        for ((row, _), b) in parity_rows.iter().zip(parity.chunks_exact(BLOCK_BYTES)) {
            crcs.push((p, *row, crate::checksum::crc32c(b)));
        }

        // Write: each member's ops in one batch, the members side by side.
        let mut per_member: Vec<Vec<WriteOp<'_>>> = vec![Vec::new(); n + 1];
        for &(m, row, piece) in &pieces {
            if view.alive(m, row) {
                per_member[m].push(WriteOp { offset: g.data_offset() + row * B, buf: piece });
            }
        }
        let mut i = 0;
        while i < parity_rows.len() {
            let mut j = i + 1;
            while j < parity_rows.len() && parity_rows[j].0 == parity_rows[j - 1].0 + 1 {
                j += 1;
            }
            if view.alive(p, parity_rows[i].0) {
                per_member[p].push(WriteOp {
                    offset: g.data_offset() + parity_rows[i].0 * B,
                    buf: &parity[i * BLOCK_BYTES..j * BLOCK_BYTES],
                });
            }
            i = j;
        }
        let bytes: usize = per_member.iter().flatten().map(|op| op.buf.len()).sum();
        let results: Vec<(usize, io::Result<()>)> = if bytes >= (512 << 10) && !self.serial_io.load(Ordering::Relaxed) {
            std::thread::scope(|s| {
                let handles: Vec<_> = per_member
                    .iter()
                    .enumerate()
                    .filter(|(_, ops)| !ops.is_empty())
                    .map(|(m, ops)| {
                        let dev = view.dev(m).clone();
                        (m, s.spawn(move || dev.write_many(ops)))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|(m, h)| (m, h.join().unwrap_or_else(|_| Err(io::Error::other("member writer panicked")))))
                    .collect()
            })
        } else {
            per_member
                .iter()
                .enumerate()
                .filter(|(_, ops)| !ops.is_empty())
                .map(|(m, ops)| (m, view.dev(m).write_many(ops)))
                .collect()
        };
        self.set_csums(&crcs);
        for (m, r) in results {
            if let Err(e) = r {
                // The member's new data is in parity (or the member is parity): the write
                // stands, degraded, unless this was the second failure.
                self.fail_member(m, &e);
            }
        }
        drop((per_member, old));
        for r in reads {
            scratch::give(r.buf);
        }
        scratch::give(parity);
        self.check_survivable().map_err(RowError::Lost)
    }

    /// Splits `ops` into aligned, non-overlapping batches of bounded size and writes them.
    pub(super) fn write_ops(&self, ops: &[WriteOp<'_>]) -> io::Result<()> {
        let size = self.geo().volume_bytes;
        for op in ops {
            check_range(size, op.offset, op.buf.len() as u64)?;
        }
        let aligned = ops.iter().all(|op| op.offset.is_multiple_of(B) && (op.buf.len() as u64).is_multiple_of(B));
        if !aligned {
            // Sub-block writes: read, patch and write the covering blocks, op by op.
            for op in ops {
                let start = op.offset / B * B;
                let end = (op.offset + op.buf.len() as u64).div_ceil(B) * B;
                let mut block = vec![0u8; crate::usize_of(end - start)];
                self.read_blocks(&mut block, start / B)?;
                let at = crate::usize_of(op.offset - start);
                block[at..at + op.buf.len()].copy_from_slice(op.buf);
                self.write_aligned(&[WriteOp { offset: start, buf: &block }])?;
            }
            return Ok(());
        }
        // Overlapping ops are written one after the other, so the later one wins.
        let mut spans: Vec<(u64, u64)> = ops.iter().map(|op| (op.offset, op.offset + op.buf.len() as u64)).collect();
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            return ops.iter().try_for_each(|op| self.write_ops(std::slice::from_ref(op)));
        }
        // Batches hold whole stripes (a full stripe's parity needs no reads), about
        // BATCH_BYTES_MAX each: every op is cut at stripe boundaries, and a batch is closed
        // only where the next piece starts another stripe.
        let stripe_bytes = self.geo().stripe_data_blocks() * B;
        let target = BATCH_BYTES_MAX.max(stripe_bytes);
        let mut batch: Vec<WriteOp<'_>> = Vec::new();
        let mut batch_bytes = 0u64;
        let mut last_stripe: Option<u64> = None;
        for op in ops {
            let mut at = 0usize;
            while at < op.buf.len() {
                let offset = op.offset + at as u64;
                let stripe = offset / stripe_bytes;
                let piece = crate::usize_of(((stripe + 1) * stripe_bytes - offset).min((op.buf.len() - at) as u64));
                if batch_bytes + piece as u64 > target && last_stripe != Some(stripe) && !batch.is_empty() {
                    self.write_aligned(&batch)?;
                    batch.clear();
                    batch_bytes = 0;
                }
                batch.push(WriteOp { offset, buf: &op.buf[at..at + piece] });
                batch_bytes += piece as u64;
                last_stripe = Some(stripe);
                at += piece;
            }
        }
        if !batch.is_empty() {
            self.write_aligned(&batch)?;
        }
        Ok(())
    }
}
