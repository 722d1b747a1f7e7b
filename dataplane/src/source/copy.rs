//! Copies to the mirror (baseline and delta resync), the change map, and the drain a
//! switchover waits for.

use super::*;

impl<C> Poller<C>
where
    C: Connector + 'static,
    C::Link: 'static,
{
    /// Pauses or resumes the copy under way (and any that starts while paused). The time
    /// paused does not count toward a resumed copy's rate.
    pub(super) fn pause_copy(&mut self, pause: bool) {
        let now = self.clock.now_ns();
        match (pause, self.copy_paused_at) {
            (true, None) => self.copy_paused_at = Some(now),
            (false, Some(at)) => {
                self.copy_paused_at = None;
                if let LinkState::Up { copy: Some(c), .. } = &mut self.link {
                    c.started_ns += now.saturating_sub(at);
                }
            }
            _ => {}
        }
    }

    /// Bytes a copy step sends ([`SourceConfig::copy_chunk`], kept to what the copy can
    /// cut: whole zero pieces, at most a baseline chunk).
    fn copy_chunk(&self) -> usize {
        (self.cfg.copy_chunk / ZERO_PIECE * ZERO_PIECE).clamp(ZERO_PIECE, BASELINE_CHUNK)
    }

    /// The destination has CP `cp`: where that is the copy's checkpoint, everything the
    /// copy sent before it is durable there, so the change map forgets those regions and
    /// becomes relative to this CP. Should the copy stop now (a restart, a lost link),
    /// the destination is resyncable and the map says what it lacks: the copy resumes as
    /// a delta resync of the regions not yet copied (and of those written since), rather
    /// than starting over.
    pub(super) fn copy_checkpoint_done(&mut self, cp: u64) {
        let size = self.device.size();
        let LinkState::Up { copy: Some(c), .. } = &mut self.link else { return };
        if c.checkpoint.map(|(gen, _)| gen) != Some(cp) {
            return;
        }
        let (_, cursor) = c.checkpoint.take().expect("matched");
        let (Some(m), Some(peer)) = (&mut self.changes, &self.cfg.peer) else { return };
        // The regions wholly copied before the CP was sent.
        let copied: Vec<u8> = match c.kind {
            CopyKind::Baseline => {
                let regions = if cursor >= size {
                    size.div_ceil(crate::log::REGION_BYTES)
                } else {
                    cursor / crate::log::REGION_BYTES
                };
                let mut bits = vec![0u8; usize_of(regions.div_ceil(8))];
                for r in 0..regions {
                    bits[usize_of(r / 8)] |= 1 << (r % 8);
                }
                bits
            }
            CopyKind::Resync => {
                let mut bits = c.marks.clone();
                for r in cursor..(bits.len() as u64 * 8) {
                    bits[usize_of(r / 8)] &= !(1 << (r % 8));
                }
                bits
            }
        };
        m.rebase(&copied, ChangeBase { peer: peer.clone(), cp });
        if let Err(e) = m.persist() {
            return self.fail_stop(format!("change map: {e}"));
        }
        self.stats.copy_resumable_from = Some(match c.kind {
            CopyKind::Baseline => cursor.min(size),
            CopyKind::Resync => (cursor * crate::log::REGION_BYTES).min(size),
        });
        tracing::debug!("volume {}: copy checkpoint at CP {cp}: resumable from {cursor}", self.cfg.volume);
    }

    /// Grows the volume to `bytes` ([`Control::Grow`]). Between the device's growth and
    /// the map's, no request runs (this poller serves them): no write lands in a region
    /// the map cannot mark.
    pub(super) fn grow(&mut self, bytes: u64, reopen_changes: ReopenRegion) -> Result<(), ControlError> {
        if let LinkState::Fenced(r) = &self.link {
            return Err(ControlError::Fenced(r.clone()));
        }
        if let Some(f) = &self.failed {
            return Err(ControlError::Failed(f.clone()));
        }
        if self.quiesced {
            return Err(ControlError::SwitchoverUnderWay);
        }
        if let LinkState::Up { copy: Some(c), .. } = &self.link {
            return Err(ControlError::CopyUnderWay(match c.kind {
                CopyKind::Baseline => "baseline",
                CopyKind::Resync => "resync",
            }));
        }
        let old = self.device.size();
        if bytes <= old {
            return if bytes == old {
                Ok(())
            } else {
                Err(ControlError::Grow(format!("the volume holds {old} bytes already")))
            };
        }
        self.device.grow(bytes).map_err(|e| ControlError::Grow(format!("grow the volume's storage: {e}")))?;
        if let Some(map) = &mut self.changes {
            if let Err(e) = map.grow(bytes, reopen_changes) {
                // The map cannot mark the new regions: it is made relative to nothing, so
                // the next copy to a mirror is whole, never a delta that misses a write.
                tracing::error!(
                    "volume {}: change map: {e}; it no longer knows what the mirror lacks (the next copy is whole)",
                    self.cfg.volume
                );
                map.set_base(None);
                map.mark_all();
                if let Err(e) = map.persist() {
                    self.fail_stop(format!("change map persist: {e}"));
                    return Err(ControlError::Persist(format!("change map persist: {e}")));
                }
            }
        }
        self.stats.size_bytes = bytes;
        self.clients.grown(bytes);
        tracing::info!("volume {}: grown from {old} to {bytes} bytes", self.cfg.volume);
        Ok(())
    }

    /// Sends the next piece of the copy under way: a chunk of the volume (baseline), or
    /// of the marked regions (resync), then the end of the copy.
    pub(super) fn copy_step(&mut self) -> bool {
        let size = self.device.size();
        let chunk = self.copy_chunk();
        let LinkState::Up { link, copy: Some(c) } = &mut self.link else { return false };
        if c.done_sent || self.copy_paused_at.is_some() {
            return false;
        }
        if let Some(rate) = self.copy_rate {
            // Ahead of the rate: wait (a chunk's worth of credit up front).
            let secs = self.clock.now_ns().saturating_sub(c.started_ns) as f64 / 1e9;
            if c.bytes as f64 > rate as f64 * secs + chunk as f64 {
                return false;
            }
        }
        // The next run: `(offset, bytes)`, or `None` at the end.
        let next = match c.kind {
            CopyKind::Baseline => (c.cursor < size).then(|| (c.cursor, (size - c.cursor).min(chunk as u64))),
            CopyKind::Resync => {
                let marked = |r: u64| c.marks.get(usize_of(r / 8)).is_some_and(|b| b & (1 << (r % 8)) != 0);
                let regions = size.div_ceil(crate::log::REGION_BYTES);
                while c.cursor < regions && !marked(c.cursor) {
                    c.cursor += 1;
                }
                (c.cursor < regions).then(|| {
                    // Adjacent regions go in one frame, up to a chunk.
                    let per = chunk as u64 / crate::log::REGION_BYTES;
                    let first = c.cursor;
                    let mut n = 1u64;
                    while n < per && first + n < regions && marked(first + n) {
                        n += 1;
                    }
                    let offset = first * crate::log::REGION_BYTES;
                    (offset, (n * crate::log::REGION_BYTES).min(size - offset))
                })
            }
        };
        let purpose = if c.kind == CopyKind::Baseline { BlockPurpose::Baseline } else { BlockPurpose::Resync };
        let advance = |c: &mut Copying, len: u64| {
            c.bytes += len;
            c.since_checkpoint += len;
            c.cursor += match c.kind {
                CopyKind::Baseline => len,
                CopyKind::Resync => len.div_ceil(crate::log::REGION_BYTES),
            };
        };
        let r = match next {
            // A hole of the volume's files that the cache holds nothing of: zeroes, unread.
            Some((offset, len))
                if !self.overlay.holds_any(offset / BLOCK_BYTES as u64, len.div_ceil(BLOCK_BYTES as u64))
                    && matches!(self.device.may_hold_data(offset, len), Ok(false)) =>
            {
                c.zero_bytes += len;
                c.hole_bytes += len;
                c.chunks += 1;
                advance(c, len);
                link.send(&Message::ZeroRange { purpose, offset, len })
            }
            Some((offset, len)) => {
                let mut buf = vec![0u8; usize_of(len)];
                // Through the cache: the newest contents as of this point of the stream. The
                // volume itself may be behind (a CP being written by the CP writer, whose
                // message went out already and is applied before this copy).
                if let Err(e) = self.overlay.read(&mut buf, offset, self.device.as_ref()) {
                    let msg = format!("copy read at {offset}: {e}");
                    self.fail_stop(msg);
                    return true;
                }
                // Runs of pieces that read as zeroes go as ranges, not data: the wire carries
                // nothing for them, and a new mirror stays sparse.
                let zero: Vec<bool> = buf.chunks(ZERO_PIECE).map(|p| p.iter().all(|&b| b == 0)).collect();
                let mut r = Ok(());
                let mut first = 0;
                while first < zero.len() && r.is_ok() {
                    let n = zero[first..].iter().take_while(|&&z| z == zero[first]).count();
                    let (at, end) = (first * ZERO_PIECE, ((first + n) * ZERO_PIECE).min(buf.len()));
                    let o = offset + at as u64;
                    r = if zero[first] {
                        c.zero_bytes += (end - at) as u64;
                        link.send(&Message::ZeroRange { purpose, offset: o, len: (end - at) as u64 })
                    } else {
                        link.send(&Message::BlockData { purpose, offset: o, data: &buf[at..end] })
                    };
                    c.chunks += 1;
                    first += n;
                }
                advance(c, len);
                r
            }
            None => {
                c.done_sent = true;
                c.done_ns = self.clock.now_ns();
                match c.kind {
                    CopyKind::Baseline => link.send(&Message::BaselineDone { volume_bytes: size }),
                    CopyKind::Resync => link.send(&Message::ResyncDone { bytes: c.bytes, chunks: c.chunks }),
                }
            }
        };
        let r = r.and_then(|()| link.flush());
        let checkpoint_due = c.since_checkpoint >= COPY_CHECKPOINT_BYTES && c.checkpoint.is_none() && !c.done_sent;
        if let Err(e) = r {
            self.link_down(format!("copy send: {e}"));
        } else if checkpoint_due {
            self.cp_wanted = true;
            self.cp_even_empty = true;
        }
        true
    }

    pub(super) fn changed_regions(&self) -> Vec<u64> {
        let mut regions: std::collections::BTreeSet<u64> =
            self.changes.as_ref().map(ChangeMap::marked_regions).unwrap_or_default().into_iter().collect();
        let per = crate::log::REGION_BYTES / BLOCK_BYTES as u64;
        for b in self.part_blocks.iter().chain(self.dirty.iter()).flatten() {
            regions.insert(b / per);
        }
        if let Some((_, _, blocks)) = &self.local_cp_inflight {
            regions.extend(blocks.iter().map(|b| b / per));
        }
        regions.into_iter().collect()
    }

    pub(super) fn mirror_current(&self) -> bool {
        matches!(self.link, LinkState::Up { copy: None, .. }) && self.remote_acked_seq >= self.local_only_seq
    }

    /// Policy sync, with a change map to track what the mirror lacks.
    pub(super) fn tracks_changes(&self) -> bool {
        self.cfg.policy == Policy::Sync && self.changes.is_some()
    }

    /// Whether a delta resync can bring the destination that sent `w` level: it holds a
    /// copy the change map is relative to (this peer, at or past the map's CP).
    pub(super) fn can_resync(&self, w: &Welcome) -> bool {
        let Some(base) = self.changes.as_ref().and_then(ChangeMap::base) else { return false };
        w.resyncable && self.cfg.peer.as_deref() == Some(base.peer.as_str()) && w.applied_cp >= base.cp
    }

    /// Marks `blocks` changed and makes the marks durable (before the partition that held
    /// them is freed).
    pub(super) fn mark_changed(&mut self, blocks: &[Vbn]) -> io::Result<()> {
        let Some(m) = &mut self.changes else { return Ok(()) };
        for &b in blocks {
            m.mark(b * BLOCK_BYTES as u64, BLOCK_BYTES as u64);
        }
        m.persist().map_err(|e| eio(format!("change map: {e}")))
    }

    /// A planned switchover drains: once nothing is waiting or unacknowledged, a CP
    /// brings the mirror level; once both partitions are free, the quiesce is answered.
    pub(super) fn poll_quiesce(&mut self) {
        if self.quiesce.is_none() {
            return;
        }
        if !matches!(self.link, LinkState::Up { copy: None, .. }) || self.failed.is_some() {
            self.quiesced = false;
            if let Some(tx) = self.quiesce.take() {
                let _ = tx.send(Err(ControlError::LeftSync));
            }
            return;
        }
        if !self.pending.is_empty() || !self.waiting.is_empty() {
            return;
        }
        let active_empty = self.nvlog.tail(self.active) <= PARTITION_HEADER_BYTES;
        let other_free = self.parts[1 - self.active as usize] == Part::Free;
        if !(active_empty && other_free) {
            self.cp_wanted = true;
            return;
        }
        if let Some(tx) = self.quiesce.take() {
            let _ = tx.send(Ok((self.stats.last_cp, self.next_seq)));
        }
    }
}
