//! Consistency points: the closed partition's dirty blocks written to the volume off the
//! poller, the destination told, the partition released once both sides hold the CP.

use super::*;

/// A local CP for the writer thread: a copy of a closed partition's blocks.
pub(super) struct CpJob {
    pub(super) partition: u8,
    pub(super) gen: u64,
    pub(super) image: CpImage,
}

pub(super) struct CpLocalDone {
    pub(super) partition: u8,
    pub(super) gen: u64,
    pub(super) result: io::Result<()>,
    pub(super) micros: u64,
}

/// The CP writer: writes each job's blocks to the volume and flushes it, off the poller
/// thread, so that a CP's write-out and `fdatasync` do not stop client writes. Ends when
/// the poller drops its sender.
pub(super) fn cp_writer(
    device: Arc<dyn BlockDevice>,
    jobs: Receiver<CpJob>,
    done: Sender<CpLocalDone>,
    waker: PollerWaker,
) {
    for job in jobs {
        let result = write_cp_job(device.as_ref(), &job);
        // The image goes before the answer: the poller then finds the cached blocks it
        // releases unshared, and reuses their buffers.
        drop(job);
        let sent = done.send(result);
        waker.wake();
        if sent.is_err() {
            return;
        }
    }
}

pub(super) fn write_cp_job(device: &dyn BlockDevice, job: &CpJob) -> CpLocalDone {
    let started = Instant::now();
    let result = job.image.write_out(device);
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    CpLocalDone { partition: job.partition, gen: job.gen, result, micros }
}

impl<C> Poller<C>
where
    C: Connector + 'static,
    C::Link: 'static,
{
    pub(super) fn force_cp(&mut self, tx: Sender<Result<u64, ControlError>>) {
        let active = self.active;
        let has_entries = self.nvlog.tail(active) > PARTITION_HEADER_BYTES;
        let closing = self.parts.iter().find_map(|p| match p {
            Part::Closing { gen, .. } => Some(*gen),
            _ => None,
        });
        if let LinkState::Fenced(r) = &self.link {
            let _ = tx.send(Err(ControlError::Fenced(r.clone())));
            return;
        }
        let copying = matches!(self.link, LinkState::Up { copy: Some(_), .. });
        if has_entries || (copying && closing.is_none()) {
            // (With a copy under way, even an empty CP: its `CpDone` makes the copy
            // resumable from where it is.)
            let gen = self.parts[active as usize].gen().expect("active partition has a generation");
            self.cp_waiters.push((gen, tx));
            self.cp_wanted = true;
            self.cp_even_empty |= copying;
            self.try_start_cp();
        } else if let Some(gen) = closing {
            self.cp_waiters.push((gen, tx));
        } else {
            let _ = tx.send(Ok(self.stats.last_cp));
        }
    }

    pub(super) fn try_start_cp(&mut self) {
        // The log stays as recovery found it until the mirror has said how far it holds
        // it (a CP would close a partition the mirror may have to fill in).
        if self.held_for_mirror_log() {
            return;
        }
        let other = 1 - self.active;
        if self.parts[other as usize] != Part::Free {
            return;
        }
        if matches!(self.link, LinkState::Fenced(_)) {
            self.cp_wanted = false;
            return;
        }
        let active = self.active;
        if self.nvlog.tail(active) <= PARTITION_HEADER_BYTES && !self.cp_even_empty {
            self.cp_wanted = false;
            return;
        }
        self.cp_wanted = false;
        self.cp_even_empty = false;
        // Everything of the closing partition goes out before its CP message.
        self.flush_batch();
        let gen = self.parts[active as usize].gen().expect("active");
        let upto_seq = self.next_seq - 1;
        self.cp_started_ns = self.clock.now_ns();
        self.parts[active as usize] = Part::Closing { gen, upto_seq, remote_done: false, local_done: false };
        if let Err(e) = self.open_partition(other, gen + 1) {
            return self.fail_stop(format!("open partition {other}: {e}"));
        }
        // By value: the closed partition's blocks as they are now, before any write of the
        // new partition can change them.
        let by_value = match (&self.link, self.cfg.cp_by_value) {
            (LinkState::Up { .. }, true) => match self.cp_blocks(active) {
                Ok(b) => b,
                Err(e) => return self.fail_stop(format!("CP {gen}: read blocks: {e}")),
            },
            _ => None,
        };
        // The local half runs on the CP writer thread, from a copy of the blocks: this
        // thread goes on taking writes into the new partition meanwhile.
        if let Err(e) = self.start_local_cp(active, gen) {
            return self.fail_stop(format!("CP {gen}: local volume: {e}"));
        }
        self.last_cp_ns = self.clock.now_ns();
        self.cp_sent_ns = self.last_cp_ns;
        let size = self.device.size();
        match &mut self.link {
            LinkState::Unmirrored => {}
            LinkState::Up { link, copy } => {
                // While a copy runs, where the destination checks them: the copy's mark, so
                // that the CP's `CpDone` vouches for the copy up to it (a checkpoint).
                let copy = copy.as_mut().filter(|c| c.copy_marks && !c.done_sent);
                let mark = copy.as_ref().map(|c| Message::CopyMark {
                    next: match c.kind {
                        CopyKind::Baseline => c.cursor,
                        CopyKind::Resync => (c.cursor * crate::log::REGION_BYTES).min(size),
                    },
                    bytes: c.bytes,
                    chunks: c.chunks,
                });
                let mut r = Ok(());
                for (offset, data) in by_value.iter().flatten() {
                    r = r.and_then(|()| {
                        link.send(&Message::BlockData { purpose: BlockPurpose::CpByValue, offset: *offset, data })
                    });
                }
                let r = r
                    .and_then(|()| mark.as_ref().map_or(Ok(()), |m| link.send(m)))
                    .and_then(|()| {
                        link.send(&Message::Cp { cp: gen, partition: active, upto_seq, by_value: by_value.is_some() })
                    })
                    .and_then(|()| link.flush());
                match (r, copy) {
                    (Err(e), _) => self.link_down(format!("send CP: {e}")),
                    (Ok(()), Some(c)) => {
                        c.checkpoint = Some((gen, c.cursor));
                        c.since_checkpoint = 0;
                    }
                    (Ok(()), None) => {}
                }
            }
            // Sent on resume.
            LinkState::Down { .. } | LinkState::Fenced(_) => {}
        }
    }

    /// The current contents of partition `p`'s dirty blocks, in runs of adjacent blocks, for
    /// a CP by value; `None` (by reference instead) when they exceed what the destination
    /// accepts by value (twice the partition size).
    pub(super) fn cp_blocks(&self, p: u8) -> io::Result<Option<BlockRuns>> {
        const RUN_BLOCKS_MAX: u64 = (ENTRY_DATA_MAX / BLOCK_BYTES) as u64;
        let dirty = &self.dirty[p as usize];
        if dirty.len() * BLOCK_BYTES > 2 * self.cfg.partition_bytes {
            return Ok(None);
        }
        let mut sorted: Vec<Vbn> = dirty.iter().copied().collect();
        sorted.sort_unstable();
        let mut runs: Vec<(Vbn, u64)> = Vec::new();
        for vbn in sorted {
            match runs.last_mut() {
                Some((start, n)) if *start + *n == vbn && *n < RUN_BLOCKS_MAX => *n += 1,
                _ => runs.push((vbn, 1)),
            }
        }
        let mut out = Vec::with_capacity(runs.len());
        for (start, n) in runs {
            let mut buf = vec![0u8; usize_of(n) * BLOCK_BYTES];
            let offset = start * BLOCK_BYTES as u64;
            self.overlay.read(&mut buf, offset, self.device.as_ref())?;
            out.push((offset, buf));
        }
        Ok(Some(out))
    }

    /// Writes partition `p`'s dirty blocks to the local volume and flushes it, here and
    /// now (recovery; the asynchronous path is [`Self::start_local_cp`]).
    pub(super) fn local_cp(&mut self, p: u8) -> io::Result<()> {
        let dirty = std::mem::take(&mut self.dirty[p as usize]);
        self.overlay.write_blocks(&dirty, self.device.as_ref())?;
        self.device.flush()?;
        self.overlay.release(&dirty, p);
        if let Part::Closing { local_done, .. } = &mut self.parts[p as usize] {
            *local_done = true;
        }
        Ok(())
    }

    /// Hands a copy of partition `p`'s dirty blocks to the CP writer thread.
    pub(super) fn start_local_cp(&mut self, p: u8, gen: u64) -> io::Result<()> {
        // One local CP at a time: the next CP needs this partition free, which needs this
        // one done.
        assert!(self.local_cp_inflight.is_none(), "a local CP is already being written");
        let dirty = std::mem::take(&mut self.dirty[p as usize]);
        let image = self.overlay.snapshot(&dirty);
        self.cp_jobs
            .send(CpJob { partition: p, gen, image })
            .map_err(|_| eio("the CP writer thread is gone".into()))?;
        self.local_cp_inflight = Some((p, gen, dirty));
        self.inline_job_step = self.steps;
        Ok(())
    }

    /// Takes the CP writer's answer, waiting for it when `wait`; returns whether one came.
    pub(super) fn poll_local_cp(&mut self, wait: bool) -> bool {
        if self.local_cp_inflight.is_none() {
            return false;
        }
        if let Some((jobs, done)) = &self.inline {
            // Stepped: the job runs here, a step after the one that queued it (or at once
            // when waited for).
            if wait || self.steps > self.inline_job_step {
                if let Ok(job) = jobs.try_recv() {
                    let _ = done.send(write_cp_job(self.device.as_ref(), &job));
                }
            }
        }
        let done =
            if wait { self.cp_done.recv().map_err(|_| TryRecvError::Disconnected) } else { self.cp_done.try_recv() };
        let done = match done {
            Ok(d) => d,
            Err(TryRecvError::Empty) => return false,
            Err(TryRecvError::Disconnected) => {
                self.local_cp_inflight = None;
                self.fail_stop("the CP writer thread is gone".into());
                return true;
            }
        };
        let Some((p, gen, dirty)) = self.local_cp_inflight.take() else { return true };
        assert_eq!((done.partition, done.gen), (p, gen), "CP writer answered another CP");
        if let Err(e) = done.result {
            self.fail_stop(format!("CP {gen}: local volume: {e}"));
            return true;
        }
        self.stats.last_local_cp_us = done.micros;
        // The blocks whose newest write is in `p` are on the volume now; those rewritten
        // since (in the active partition) stay cached.
        self.overlay.release(&dirty, p);
        if let Part::Closing { local_done, .. } = &mut self.parts[p as usize] {
            *local_done = true;
        }
        self.maybe_release(p);
        true
    }

    /// Frees partition `p` if both halves of its CP are done (the local one alone while
    /// unmirrored).
    pub(super) fn maybe_release(&mut self, p: u8) {
        // Unmirrored, or policy sync with the mirror away: the partition goes on the local
        // half alone, its blocks marked in the change map.
        let alone = matches!(self.link, LinkState::Unmirrored)
            || (self.tracks_changes() && !matches!(self.link, LinkState::Up { .. }) && !self.held_for_mirror_log());
        if let Part::Closing { local_done: true, remote_done, .. } = self.parts[p as usize] {
            if remote_done || alone {
                if let Err(e) = self.release(p) {
                    self.fail_stop(format!("release partition {p}: {e}"));
                }
            }
        }
    }

    pub(super) fn mark_remote_done(&mut self, p: u8) {
        if let Part::Closing { remote_done, .. } = &mut self.parts[p as usize] {
            *remote_done = true;
        }
        self.maybe_release(p);
    }

    pub(super) fn on_cp_done(&mut self, cp: u64) {
        let p = PARTITION_IDS
            .into_iter()
            .find(|p| matches!(self.parts[*p as usize], Part::Closing { gen, .. } if gen == cp));
        if let Some(p) = p {
            self.mark_remote_done(p);
        }
    }

    /// Frees a partition whose CP is durable on both sites.
    pub(super) fn release(&mut self, p: u8) -> io::Result<()> {
        let Part::Closing { gen, upto_seq, remote_done, .. } = self.parts[p as usize] else { return Ok(()) };
        let blocks = std::mem::take(&mut self.part_blocks[p as usize]);
        if !remote_done {
            let blocks: Vec<Vbn> = blocks.into_iter().collect();
            self.mark_changed(&blocks)?;
        }
        self.nvlog
            .free_partition(p, Checkpoint { released_cp: gen, next_seq: upto_seq + 1 })
            .map_err(|e| eio(e.to_string()))?;
        self.parts[p as usize] = Part::Free;
        self.stats.cps += 1;
        self.stats.last_cp = gen;
        self.stats.last_cp_unix_ms = self.clock.unix_ms();
        self.stats.last_cp_duration_us = self.clock.now_ns().saturating_sub(self.cp_started_ns) / 1000;
        self.notify_cp_waiters(gen, Ok(gen));
        Ok(())
    }

    pub(super) fn notify_cp_waiters(&mut self, upto_gen: u64, r: Result<u64, ControlError>) {
        let mut keep = Vec::new();
        for (g, tx) in self.cp_waiters.drain(..) {
            if g <= upto_gen {
                let _ = tx.send(r.clone());
            } else {
                keep.push((g, tx));
            }
        }
        self.cp_waiters = keep;
    }

    // ---- I/O ----
}
