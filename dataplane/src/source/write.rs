//! The write path: requests decoded into NVLog entries, persisted and sent as one batch
//! per pass, and acknowledged once the destination holds them.

use super::*;

impl<C> Poller<C>
where
    C: Connector + 'static,
    C::Link: 'static,
{
    pub(super) fn poll_io(&mut self) -> bool {
        let mut worked = false;
        // Writes waiting for log space go first, in order; the mirror may have gone away
        // while they waited.
        while let Some(mut w) = self.waiting.pop_front() {
            if let Some(e) = self.write_refusal() {
                self.stats.write_errors += 1;
                if let Some(to) = w.done.take() {
                    self.answer(to, Err(e));
                }
                worked = true;
                continue;
            }
            match self.log_write(&mut w) {
                Ok(true) => {
                    worked = true;
                }
                Ok(false) => {
                    self.waiting.push_front(w);
                    return worked;
                }
                Err(e) => {
                    self.stats.write_errors += 1;
                    if let Some(to) = w.done.take() {
                        self.answer(to, Err(e));
                    }
                    worked = true;
                }
            }
        }
        for _ in 0..BATCH_MAX {
            // Nothing new during a switchover's drain, nor while the log waits for the
            // mirror's copy (see `held_for_mirror_log`).
            if self.quiesced || self.held_for_mirror_log() {
                break;
            }
            let Ok((request, done)) = self.io_rx.try_recv() else { break };
            worked = true;
            self.handle(request, done);
            if !self.waiting.is_empty() {
                break;
            }
        }
        worked
    }

    /// Counts the time writes wait for log space: from when the first of them had to wait
    /// to when none waits.
    pub(super) fn account_log_wait(&mut self) {
        match (self.waiting.is_empty(), self.log_full_since) {
            (false, None) => {
                self.log_full_since = Some(self.clock.now_ns());
                self.stats.log_full_waits += 1;
            }
            (true, Some(since)) => {
                self.log_full_since = None;
                self.stats.log_full_wait_us += self.clock.now_ns().saturating_sub(since) / 1000;
            }
            _ => {}
        }
    }

    pub(super) fn write_refusal(&self) -> Option<io::Error> {
        if let Some(r) = &self.failed {
            return Some(eio(format!("volume failed: {r}")));
        }
        match &self.link {
            LinkState::Fenced(r) => Some(eio(r.clone())),
            LinkState::Down { .. } if self.tracks_changes() && self.confirmed => None,
            LinkState::Down { reason, .. } if self.tracks_changes() => Some(eio(format!(
                "mirror link down ({reason}); policy sync goes on alone only once the mirror has confirmed this \
                 node's epoch since it started"
            ))),
            LinkState::Down { reason, .. } => {
                Some(eio(format!("mirror link down ({reason}); policy strict refuses writes")))
            }
            _ => None,
        }
    }

    /// Serves a request submitted through the handle.
    pub(super) fn handle(&mut self, request: IoRequest, done: Completer) {
        match request {
            IoRequest::Read { offset, len } => {
                let mut buf = vec![0u8; len as usize];
                let r = self.overlay.read(&mut buf, offset, self.device.as_ref()).map(|()| Some(buf));
                done.complete(r);
            }
            // Every acknowledged write is already persistent on both sites.
            IoRequest::Flush => done.complete(Ok(None)),
            IoRequest::Write { offset, data, .. } => {
                self.mutate(EntryKind::Write, offset, data.len() as u64, &data, ReplyTo::Submitter(done));
            }
            IoRequest::Trim { offset, len } => {
                self.mutate(EntryKind::Trim, offset, u64::from(len), &[], ReplyTo::Submitter(done));
            }
            IoRequest::WriteZeroes { offset, len, .. } => {
                self.mutate(EntryKind::WriteZeroes, offset, u64::from(len), &[], ReplyTo::Submitter(done));
            }
        }
    }

    /// Logs as much of a waiting mutation as fits. `Ok(true)`: all of it is logged and its
    /// completion is pending; `Ok(false)`: it waits for log space.
    pub(super) fn log_write(&mut self, w: &mut Waiting) -> io::Result<bool> {
        let (kind, offset, len, data): (_, _, _, &[u8]) = match &w.request {
            IoRequest::Write { offset, data, .. } => (EntryKind::Write, *offset, data.len() as u64, data),
            IoRequest::Trim { offset, len } => (EntryKind::Trim, *offset, u64::from(*len), &[]),
            IoRequest::WriteZeroes { offset, len, .. } => (EntryKind::WriteZeroes, *offset, u64::from(*len), &[]),
            _ => unreachable!("only mutations are logged"),
        };
        if !self.log_pieces(kind, offset, len, data, &mut w.progress)? {
            return Ok(false);
        }
        let to = w.done.take().expect("a logged write is completed once");
        self.logged(len, to);
        Ok(true)
    }

    /// Appends the entries of a mutation from `*progress` on, as far as log space goes.
    /// `data` is a write's payload (empty for the other kinds). `Ok(true)`: all of it is
    /// logged.
    pub(super) fn log_pieces(
        &mut self,
        kind: EntryKind,
        offset: u64,
        len: u64,
        data: &[u8],
        progress: &mut u64,
    ) -> io::Result<bool> {
        crate::storage::check_range(self.device.size(), offset, len)?;
        while *progress < len {
            let at = offset + *progress;
            let piece = if kind == EntryKind::Write {
                let boundary = (at / ENTRY_DATA_MAX as u64 + 1) * ENTRY_DATA_MAX as u64;
                boundary.min(offset + len) - at
            } else {
                len - *progress
            };
            let data_len = if kind == EntryKind::Write { usize_of(piece) } else { 0 };
            if !self.nvlog.fits(self.active, data_len) {
                self.cp_wanted = true;
                self.try_start_cp();
                if !self.nvlog.fits(self.active, data_len) {
                    return Ok(false);
                }
            }
            let header = EntryHeader {
                kind,
                partition: self.active,
                volume_id: self.cfg.volume_id,
                epoch: self.cfg.epoch,
                seq: self.next_seq,
                offset: at,
                length: u32::try_from(piece).expect("pieces are below 4 GiB"),
                data_len: u32::try_from(data_len).expect("entry data below 1 MiB"),
            };
            let data: &[u8] = if kind == EntryKind::Write {
                let s = usize_of(*progress);
                &data[s..s + data_len]
            } else {
                &[]
            };
            self.nvlog.append(&header, data).map_err(|e| eio(e.to_string()))?;
            self.pass_entries += 1;
            let active = self.active as usize;
            self.overlay.apply(&header, data, self.device.as_ref(), &mut self.dirty[active])?;
            let first = header.offset / BLOCK_BYTES as u64;
            let last = (header.offset + u64::from(header.length)).div_ceil(BLOCK_BYTES as u64);
            self.part_blocks[active].extend(first..last);
            self.next_seq += 1;
            *progress += piece;
        }
        Ok(true)
    }

    /// A mutation of `len` bytes is logged whole: its answer waits for the ack covering
    /// its last entry (an empty one is answered at once).
    pub(super) fn logged(&mut self, len: u64, to: ReplyTo) {
        if len == 0 {
            return self.answer(to, Ok(()));
        }
        self.stats.writes += 1;
        self.stats.bytes_written += len;
        if self.overlay.len() > self.cfg.cache_blocks_max {
            self.cp_wanted = true;
        }
        let now = self.clock.now_ns();
        let delay_ns = self.throttle_delay_us() * 1000;
        if delay_ns > 0 {
            self.admit_at_ns = self.admit_at_ns.max(now) + delay_ns;
            self.stats.throttled_writes += 1;
            self.stats.throttle_us += delay_ns / 1000;
        }
        self.pending.push_back(Pending { last_seq: self.next_seq - 1, sent_ns: now, done: to });
    }

    /// How long the write just logged delays the next client request (see
    /// [`THROTTLE_START_FILL`]): nothing while the other partition is free.
    pub(super) fn throttle_delay_us(&self) -> u64 {
        let other = 1 - self.active;
        if self.parts[other as usize] == Part::Free {
            return 0;
        }
        let used = self.nvlog.tail(self.active) as f64;
        let f = (used / self.cfg.partition_bytes as f64).min(0.999);
        if f <= THROTTLE_START_FILL {
            return 0;
        }
        let us = THROTTLE_SCALE_US * (f - THROTTLE_START_FILL) / (1.0 - f);
        // A finite, non-negative float below the cap: the cast keeps its integer part.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let us = us.min(THROTTLE_DELAY_MAX_US as f64) as u64;
        us
    }

    /// Whether requests wait for the mirror's copy of the log: recovery found a partition
    /// cut short (a torn last batch, or an entry whose memory changed), and until the
    /// mirror has said how far it holds that partition, a read could miss a write it
    /// acknowledged. Until the first resume; while a log fetch runs.
    pub(super) fn held_for_mirror_log(&self) -> bool {
        self.catch_up.is_some()
            || (self.damaged_at.iter().any(Option::is_some)
                && !matches!(self.link, LinkState::Unmirrored | LinkState::Fenced(_)))
    }

    /// Persists partition `p` of the NVLog up to its tail; false once that failed (and the
    /// volume stopped).
    fn persist_log(&mut self, p: u8) -> bool {
        match self.nvlog.persist(p) {
            Ok(_) => true,
            Err(e) => {
                self.fail_stop(format!("NVLog persist: {e}"));
                false
            }
        }
    }

    /// Whether the write throttle holds new client requests back now.
    pub(super) fn throttled(&self) -> bool {
        self.admit_at_ns > self.clock.now_ns()
    }

    /// Persists and sends what the last requests logged, then completes what is durable.
    ///
    /// Where persisting waits for a device (`direct:`, `file-sync:`), the batch goes to the
    /// mirror first, so that the two sites' device writes overlap; nothing is acknowledged
    /// before both hold it either way. A crash between the send and the persist leaves the
    /// mirror ahead of this log, which recovery allows for (see `recover`).
    pub(super) fn flush_batch(&mut self) -> bool {
        let mut worked = false;
        let mut order: Vec<u8> = PARTITION_IDS.into_iter().filter(|p| self.parts[*p as usize] != Part::Free).collect();
        order.sort_by_key(|p| self.parts[*p as usize].gen());
        let send_first = self.nvlog.persist_waits_for_device();
        for &p in &order {
            if self.unsent[p as usize] >= self.nvlog.tail(p) {
                continue;
            }
            worked = true;
            if !send_first && !self.persist_log(p) {
                return true;
            }
            match &mut self.link {
                LinkState::Up { link, .. } => {
                    if let Err(e) = send_range(&self.nvlog, &mut self.unsent[p as usize], p, link) {
                        self.link_down(format!("send: {e}"));
                    }
                }
                _ => self.unsent[p as usize] = self.nvlog.tail(p),
            }
        }
        if worked {
            if let LinkState::Up { link, .. } = &mut self.link {
                if let Err(e) = link.flush() {
                    self.link_down(format!("send: {e}"));
                }
            }
            if send_first && !order.iter().all(|&p| self.persist_log(p)) {
                return true;
            }
            let alone = matches!(self.link, LinkState::Unmirrored);
            if alone || self.planted_ack_before_remote_persist() {
                self.acked_seq = self.next_seq - 1;
            }
            self.complete_acked();
        }
        // Policy sync with the mirror away: everything logged is persistent here now (the
        // loop above persisted every partition with something unsent).
        if self.tracks_changes() && matches!(self.link, LinkState::Down { .. }) && !self.pending.is_empty() {
            self.acked_seq = self.next_seq - 1;
            self.local_only_seq = self.acked_seq;
            self.complete_acked();
            worked = true;
        }
        worked
    }

    #[cfg(any(test, feature = "sim"))]
    pub(super) fn planted_ack_before_remote_persist(&self) -> bool {
        self.cfg.planted_bug == Some(PlantedBug::AckBeforeRemotePersist)
    }

    #[cfg(not(any(test, feature = "sim")))]
    pub(super) fn planted_ack_before_remote_persist(&self) -> bool {
        false
    }

    pub(super) fn complete_acked(&mut self) {
        let now = self.clock.now_ns();
        while self.pending.front().is_some_and(|p| p.last_seq <= self.acked_seq) {
            let p = self.pending.pop_front().expect("front exists");
            let us = now.saturating_sub(p.sent_ns) / 1000;
            let b = ACK_LATENCY_BOUNDS_US.iter().position(|&le| us <= le).unwrap_or(ACK_LATENCY_BOUNDS_US.len());
            self.ack_buckets[b] += 1;
            self.ack_sum_us = self.ack_sum_us.saturating_add(us);
            self.answer(p.done, Ok(()));
        }
    }
}
