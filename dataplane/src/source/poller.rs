//! The poll loop: one pass over the volume's inputs (clients, link, control, timers, CP
//! completions), sleeping in epoll when there is nothing to do; start-up and shutdown.

use super::*;

impl<C> Poller<C>
where
    C: Connector + 'static,
    C::Link: 'static,
{
    pub(super) fn new(
        parts: SourceParts<C>,
        io_rx: Receiver<(IoRequest, Completer)>,
        ctl_rx: Receiver<Control>,
        inline: bool,
    ) -> io::Result<Self> {
        let SourceParts { cfg, nvlog, recovered, device, connector, clock, mirror, changes } = parts;
        let now = clock.now_ns();
        let link = match &mirror {
            None => LinkState::Unmirrored,
            Some(_) => LinkState::Down { reason: "starting".into(), next_try: now, connecting: false, copy: None },
        };
        let stats = SourceStatus {
            volume: cfg.volume.clone(),
            volume_id: cfg.volume_id,
            epoch: cfg.epoch,
            size_bytes: device.size(),
            state: PairState::default(),
            peer: mirror.clone(),
            reason: None,
            next_seq: 0,
            acked_seq: 0,
            writes: 0,
            write_errors: 0,
            bytes_written: 0,
            cps: 0,
            last_cp: recovered.checkpoint.released_cp,
            last_cp_unix_ms: 0,
            last_cp_duration_us: 0,
            last_local_cp_us: 0,
            log_bytes_used: 0,
            log_bytes_max: (cfg.partition_bytes * PARTITIONS) as u64,
            cache_blocks: 0,
            pending_writes: 0,
            baseline_done_bytes: 0,
            policy: cfg.policy.as_str().into(),
            changed_bytes: 0,
            changes_since: None,
            mirror_current: false,
            mirror_acked_seq: 0,
            local_only_seq: 0,
            last_copy_kind: None,
            last_copy_bytes: 0,
            last_copy_zero_bytes: 0,
            last_copy_hole_bytes: 0,
            ack_latency_le_us: Vec::new(),
            ack_latency_sum_us: 0,
            ack_latency_count: 0,
            resync_done_bytes: 0,
            resync_total_bytes: 0,
            copy_paused: false,
            copy_resumable_from: None,
            copy_rate: None,
            core: None,
            parks: 0,
            log_full_waits: 0,
            log_full_wait_us: 0,
            throttled_writes: 0,
            throttle_us: 0,
            log_entries_fetched: 0,
            awaiting_mirror_log: false,
        };
        let (cp_jobs, cp_jobs_rx) = bounded::<CpJob>(1);
        let (cp_done_tx, cp_done) = bounded::<CpLocalDone>(1);
        let (inline, readiness) = if inline {
            (Some((cp_jobs_rx, cp_done_tx)), None)
        } else {
            let readiness = Readiness::new()?;
            let (device, waker) = (device.clone(), readiness.waker());
            thread::Builder::new()
                .name(format!("nvm-cp-{}", cfg.volume))
                .spawn(move || cp_writer(device, cp_jobs_rx, cp_done_tx, waker))?;
            (None, Some(readiness))
        };
        let mut p = Poller {
            cfg,
            nvlog,
            device,
            connector,
            clock,
            io_rx,
            ctl_rx,
            target: mirror,
            link,
            connect_rx: None,
            parts: [Part::Free; PARTITIONS],
            active: 0,
            next_seq: 1,
            acked_seq: 0,
            unsent: [PARTITION_HEADER_BYTES; PARTITIONS],
            overlay: Overlay::new(),
            dirty: [HashSet::new(), HashSet::new()],
            waiting: VecDeque::new(),
            pending: VecDeque::new(),
            cp_wanted: false,
            cp_waiters: Vec::new(),
            cp_started_ns: 0,
            last_cp_ns: now,
            stats,
            core: None,
            failed: None,
            cp_jobs,
            cp_done,
            local_cp_inflight: None,
            inline,
            steps: 0,
            admit_at_ns: 0,
            pass_entries: 0,
            batch_16ths: 16,
            inline_job_step: 0,
            cp_sent_ns: 0,
            changes,
            part_blocks: [HashSet::new(), HashSet::new()],
            quiesce: None,
            quiesced: false,
            ack_buckets: [0; ACK_LATENCY_BOUNDS_US.len() + 1],
            ack_sum_us: 0,
            remote_acked_seq: 0,
            local_only_seq: 0,
            copy_rate: None,
            copy_paused_at: None,
            cp_even_empty: false,
            confirmed: false,
            damaged_at: [None; PARTITIONS],
            catch_up: None,
            clients: Clients::default(),
            writes: Arc::new(std::sync::atomic::AtomicU8::new(super::WRITES_WAITING)),
            mirror_nvmf: Arc::default(),
            link_was_up: false,
            log_full_since: None,
            readiness,
            link_fd: None,
        };
        p.recover(&recovered)?;
        Ok(p)
    }

    pub(super) fn run(&mut self) {
        // A poller whose log waits for a device sleeps in each write and is woken by the
        // device's completion interrupt: pinned away from the core that takes it, every
        // write pays a cross-core wake-up (measured, direct: on this project's 2-core
        // machine at queue depth 1: 196 us at the median pinned to the other core, 135 us
        // on the interrupt's). Unpinned, the scheduler wakes it where the interrupt is.
        if !self.nvlog.persist_waits_for_device() {
            self.core = self.cfg.core.and_then(pin_to_core);
        }
        let mut backoff = Backoff::new(self.cfg.backoff);
        loop {
            let Ok(worked) = self.poll_once() else { return };
            if worked {
                backoff.reset();
            } else if backoff.idle(self.must_poll_link(), self.batch_16ths <= SPIN_BATCH_MAX_16THS) == Idle::Park {
                self.park();
            }
            self.stats.parks = backoff.parks;
        }
    }

    /// One pass over every input; whether any had work. `Err` once stopped.
    pub(super) fn poll_once(&mut self) -> Result<bool, ()> {
        self.steps += 1;
        if self.pass_entries > 0 {
            let n = self.pass_entries.min(u32::try_from(BATCH_MAX).unwrap_or(u32::MAX)) * 16;
            self.batch_16ths = (self.batch_16ths * 7 + n) / 8;
            self.pass_entries = 0;
        }
        self.account_log_wait();
        let mut worked = self.poll_control()?;
        worked |= self.poll_link();
        worked |= self.poll_io();
        worked |= self.poll_clients();
        worked |= self.flush_batch();
        worked |= self.copy_step();
        worked |= self.poll_local_cp(false);
        worked |= self.timers();
        // Every reply this pass produced, one write per connection.
        worked |= self.flush_clients();
        self.publish_writes();
        Ok(worked)
    }

    /// Whether writes are taken now, for the handle: refused only by policy (the mirror
    /// lost after it was up once) or by a failed volume still counts as taken (the
    /// writes fail here as they would anywhere); refused before the link was ever up
    /// since the start (a takeover, a restart) or held by a switchover's drain is
    /// waiting; fenced is elsewhere.
    fn publish_writes(&mut self) {
        if matches!(self.link, LinkState::Up { .. } | LinkState::Unmirrored) {
            self.link_was_up = true;
        }
        let state = if matches!(self.link, LinkState::Fenced(_)) {
            super::WRITES_FENCED
        } else if self.failed.is_some() {
            super::WRITES_TAKEN
        } else if self.quiesced || (!self.link_was_up && self.write_refusal().is_some()) {
            super::WRITES_WAITING
        } else {
            super::WRITES_TAKEN
        };
        self.writes.store(state, std::sync::atomic::Ordering::Release);
    }

    /// Sleeps until an input is ready or a timer is due: a client socket or the link
    /// becomes readable, or a thread that queued work (control, submitted requests, a
    /// connect, a CP write-out) wakes the poller.
    pub(super) fn park(&mut self) {
        self.watch_link();
        // Timers (ack and CP timeouts, the CP interval, reconnecting) are looked at on
        // every pass; sleeping at most this long keeps them within it of their due time.
        let mut timeout = if self.must_poll_link() { Duration::from_micros(500) } else { Duration::from_millis(50) };
        // The write throttle's hold ends by the clock, not by an event.
        let now = self.clock.now_ns();
        if self.admit_at_ns > now {
            timeout = timeout.min(Duration::from_nanos(self.admit_at_ns - now));
        }
        match &mut self.readiness {
            Some(r) => r.wait(timeout),
            None => thread::sleep(timeout),
        }
    }

    /// Acts on what is due by the clock; whether it did anything (a CP started, the link
    /// declared down, a connection attempt started, a switchover's drain moved on).
    pub(super) fn timers(&mut self) -> bool {
        let mut worked = false;
        let now = self.clock.now_ns();
        let active = self.active;
        let has_entries = self.nvlog.tail(active) > PARTITION_HEADER_BYTES;
        let interval = u64::try_from(self.cfg.cp_interval.as_nanos()).unwrap_or(u64::MAX);
        if has_entries && now.saturating_sub(self.last_cp_ns) >= interval {
            self.cp_wanted = true;
        }
        if self.cp_wanted {
            let before = self.parts;
            self.try_start_cp();
            worked |= self.parts != before;
        }
        if let LinkState::Up { copy, .. } = &self.link {
            let late = |since: u64, limit: Duration| now.saturating_sub(since) > nanos(limit);
            let why = if self.catch_up.as_ref().is_some_and(|c| late(c.started_ns, self.cfg.cp_timeout)) {
                Some(format!("the mirror did not send its log back within {:?}", self.cfg.cp_timeout))
            } else if self.pending.front().is_some_and(|p| late(p.sent_ns, self.cfg.ack_timeout)) {
                Some(format!("no acknowledgement from the destination within {:?}", self.cfg.ack_timeout))
            } else if self.catch_up.is_none()
                && self.parts.iter().any(|p| matches!(p, Part::Closing { remote_done: false, .. }))
                && late(self.cp_sent_ns, self.cfg.cp_timeout)
            {
                Some(format!("the destination did not finish a CP within {:?}", self.cfg.cp_timeout))
            } else if copy.as_ref().is_some_and(|c| c.done_sent && late(c.done_ns, self.cfg.cp_timeout)) {
                Some(format!("the destination did not confirm the copy within {:?}", self.cfg.cp_timeout))
            } else {
                None
            };
            if let Some(why) = why {
                self.link_down(why);
                worked = true;
            }
        }
        if let LinkState::Down { next_try, connecting: false, copy, .. } = &self.link {
            if now >= *next_try {
                let copy = *copy;
                self.start_connect(copy);
                worked = true;
            }
        }
        let (wanted, quiescing) = (self.cp_wanted, self.quiesce.is_some());
        self.poll_quiesce();
        worked | (!wanted && self.cp_wanted) | (quiescing && self.quiesce.is_none())
    }

    // ---- control ----

    pub(super) fn poll_control(&mut self) -> Result<bool, ()> {
        let mut worked = false;
        loop {
            match self.ctl_rx.try_recv() {
                Ok(Control::Status(tx)) => {
                    let _ = tx.send(self.status());
                }
                Ok(Control::Cp(tx)) => self.force_cp(tx),
                Ok(Control::Attach { target, peer, reply }) => {
                    let r = self.attach(target, peer);
                    let _ = reply.send(r);
                }
                Ok(Control::Rewrite { offset, len, done }) => self.rewrite(offset, len, done),
                Ok(Control::MarkRegions { regions, reply }) => {
                    let r = match &mut self.changes {
                        None => Err(ControlError::NoChangeMap),
                        Some(m) => {
                            for r in regions {
                                m.mark_region(r);
                            }
                            m.persist().map_err(|e| ControlError::Persist(format!("change map: {e}")))
                        }
                    };
                    let _ = reply.send(r);
                }
                Ok(Control::Quiesce(tx)) => {
                    if !matches!(self.link, LinkState::Up { copy: None, .. }) {
                        let _ = tx.send(Err(ControlError::NotInSync));
                    } else if let Some(why) = &self.failed {
                        let _ = tx.send(Err(ControlError::Failed(why.clone())));
                    } else {
                        self.quiesced = true;
                        self.quiesce = Some(tx);
                        self.cp_wanted = true;
                    }
                }
                Ok(Control::SetCopyRate(r)) => {
                    self.copy_rate = r.filter(|&r| r > 0);
                    self.stats.copy_rate = self.copy_rate;
                }
                Ok(Control::PauseCopy(pause)) => self.pause_copy(pause),
                Ok(Control::Detach(reply)) => {
                    let r = self.detach();
                    let _ = reply.send(r);
                }
                Ok(Control::Fence(why)) => {
                    if !matches!(self.link, LinkState::Fenced(_)) {
                        self.fence(why);
                    }
                }
                Ok(Control::SetPolicy(p)) => {
                    self.cfg.policy = p;
                    self.stats.policy = p.as_str().into();
                }
                Ok(Control::Grow { bytes, reopen_changes, reply }) => {
                    let _ = reply.send(self.grow(bytes, reopen_changes));
                }
                Ok(Control::ChangedRegions(tx)) => {
                    let _ = tx.send(self.changed_regions());
                }
                Ok(Control::Resume) => {
                    self.quiesced = false;
                    if let Some(tx) = self.quiesce.take() {
                        let _ = tx.send(Err(ControlError::SwitchoverCancelled));
                    }
                }
                Ok(Control::Adopt(conn)) => self.adopt(conn),
                Ok(Control::AdoptNvmf(queue)) => self.adopt_nvmf(queue),
                Ok(Control::Handover(tx)) => {
                    let mut queued = Vec::new();
                    while let Ok(r) = self.io_rx.try_recv() {
                        queued.push(r);
                    }
                    self.shutdown("volume handed over");
                    let _ = tx.send(queued);
                    return Err(());
                }
                Ok(Control::Stop(tx)) => {
                    self.shutdown("volume stopped");
                    let _ = tx.send(());
                    return Err(());
                }
                Err(TryRecvError::Empty) => return Ok(worked),
                Err(TryRecvError::Disconnected) => {
                    self.shutdown("volume handle dropped");
                    return Err(());
                }
            }
            worked = true;
        }
    }

    pub(super) fn shutdown(&mut self, why: &str) {
        let _ = self.flush_batch();
        // A local CP being written finishes first: the volume is left flushed.
        self.poll_local_cp(true);
        let waiting: Vec<Waiting> = self.waiting.drain(..).collect();
        for w in waiting {
            if let Some(to) = w.done {
                self.answer(to, Err(eio(why.to_string())));
            }
        }
        let pending: Vec<Pending> = self.pending.drain(..).collect();
        for p in pending {
            self.answer(p.done, Err(eio(why.to_string())));
        }
        while let Ok((_, done)) = self.io_rx.try_recv() {
            done.complete(Err(eio(why.to_string())));
        }
        // Connections that were handed over (a switchover) or outlive the volume go on
        // through its handle, which forwards them or refuses their requests.
        // (Connections still queued for adoption are served on threads when the poller is
        // dropped.)
        self.release_clients(why);
        if let LinkState::Up { link, .. } = &mut self.link {
            link.close();
        }
    }

    pub(super) fn fail_stop(&mut self, reason: String) {
        tracing::error!("volume {}: failed, refusing writes: {reason}", self.cfg.volume);
        self.fail_pending(&reason);
        self.failed = Some(reason);
    }

    /// Writes every cached block to the volume and frees both partitions: the volume then
    /// holds everything, and a baseline can copy it.
    pub(super) fn full_flush(&mut self) -> io::Result<()> {
        // A local CP being written must land before everything is written over it.
        self.poll_local_cp(true);
        if let Some(why) = &self.failed {
            return Err(eio(why.clone()));
        }
        if !self.tracks_changes() {
            self.fail_pending("mirror is being re-established");
        }
        let all: HashSet<Vbn> = self.dirty.iter().flatten().copied().collect();
        self.overlay.write_blocks(&all, self.device.as_ref())?;
        self.device.flush()?;
        if self.tracks_changes() {
            // Policy sync: pending writes are on the volume now, flushed.
            if !self.pending.is_empty() {
                self.local_only_seq = self.next_seq - 1;
            }
            self.acked_seq = self.next_seq - 1;
            self.complete_acked();
        }
        // The partitions go without the destination's CP: their blocks count as changed.
        for p in PARTITION_IDS {
            let blocks: Vec<Vbn> = self.part_blocks[p as usize].iter().copied().chain(all.iter().copied()).collect();
            self.mark_changed(&blocks)?;
            self.part_blocks[p as usize].clear();
        }
        self.overlay.clear();
        let mut gen = 0;
        for p in PARTITION_IDS {
            self.dirty[p as usize].clear();
            if let Some(g) = self.parts[p as usize].gen() {
                gen = gen.max(g);
                self.nvlog
                    .free_partition(p, Checkpoint { released_cp: g, next_seq: self.next_seq })
                    .map_err(|e| eio(e.to_string()))?;
                self.parts[p as usize] = Part::Free;
            }
        }
        self.stats.last_cp = gen;
        self.acked_seq = self.next_seq - 1;
        self.open_partition(0, gen + 1)?;
        self.last_cp_ns = self.clock.now_ns();
        self.notify_cp_waiters(gen, Ok(gen));
        Ok(())
    }
}
