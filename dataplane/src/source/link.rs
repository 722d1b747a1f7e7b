//! The replication link: connecting, resuming from what the destination holds, its
//! messages, and what a lost link or a newer epoch does to the volume.

use super::*;

/// Sends partition `p`'s entries from `*unsent` to its tail, in frames of whole entries.
pub(super) fn send_range<L: Link>(
    nvlog: &NvLog<Box<dyn Nvram>>,
    unsent: &mut usize,
    p: u8,
    link: &mut L,
) -> Result<(), LinkError> {
    let tail = nvlog.tail(p);
    let mut from = *unsent;
    while from < tail {
        let to = nvlog.cut(p, from, SEND_MAX);
        link.send_entries(p, from as u64, &nvlog.partition(p)[from..to])?;
        from = to;
    }
    *unsent = tail;
    Ok(())
}

/// Why the link could not resume where the mirror is: a copy brings it level instead.
#[derive(Debug, thiserror::Error)]
pub(super) enum ResumeError {
    #[error("mirror has no complete baseline")]
    NoBaseline,
    #[error("destination applied CP {applied}, but our log starts at CP {oldest}")]
    LogGap { applied: u64, oldest: u64 },
    #[error(transparent)]
    Link(#[from] LinkError),
}

impl<C> Poller<C>
where
    C: Connector + 'static,
    C::Link: 'static,
{
    /// Whether a reply is owed on the link: writes or a CP in flight, or a copy running.
    pub(super) fn link_owes(&self) -> bool {
        matches!(self.link, LinkState::Up { .. })
            && (!self.pending.is_empty()
                || self.parts.iter().any(|p| matches!(p, Part::Closing { .. }))
                || matches!(self.link, LinkState::Up { copy: Some(_), .. }))
    }

    /// Whether the link owes replies but offers no descriptor to sleep on (RDMA): then the
    /// poller polls it between short sleeps.
    pub(super) fn must_poll_link(&self) -> bool {
        self.link_fd.is_none() && self.link_owes()
    }

    /// Keeps the link's descriptor (where it has one) in the readiness set.
    pub(super) fn watch_link(&mut self) {
        let fd = match &self.link {
            LinkState::Up { link, .. } => link.readiness_fd(),
            _ => None,
        };
        if fd == self.link_fd {
            return;
        }
        let Some(r) = &self.readiness else { return };
        if let Some(old) = self.link_fd.take() {
            r.deregister(old);
        }
        if let Some(fd) = fd {
            match r.register(fd, LINK_TOKEN) {
                Ok(()) => self.link_fd = Some(fd),
                Err(e) => tracing::warn!("volume {}: cannot watch the link: {e}; polling it", self.cfg.volume),
            }
        }
    }

    /// Replaces the link state; a link leaving is taken out of the readiness set before it
    /// is dropped (its descriptor number may be reused at once).
    pub(super) fn set_link(&mut self, next: LinkState<C::Link>) {
        if let (Some(fd), Some(r)) = (self.link_fd.take(), &self.readiness) {
            r.deregister(fd);
        }
        self.link = next;
    }

    /// Starts mirroring to `target`: a full local flush, then a baseline copy.
    pub(super) fn attach(&mut self, target: String, peer: Option<String>) -> Result<(), ControlError> {
        match &self.link {
            LinkState::Up { .. } | LinkState::Down { .. } if self.target.as_deref() == Some(&target) => return Ok(()),
            LinkState::Unmirrored => {}
            LinkState::Fenced(r) => return Err(ControlError::Fenced(r.clone())),
            _ => return Err(ControlError::AlreadyMirrored(self.target.clone().unwrap_or_else(|| "?".into()))),
        }
        self.target = Some(target);
        self.cfg.peer = peer;
        // A resume first: a peer that already holds a consistent copy (a returning old
        // primary, made a mirror) is then brought level by a delta resync if the change map
        // allows, and by a baseline otherwise.
        self.set_link(LinkState::Down {
            reason: "attaching".into(),
            next_try: self.clock.now_ns(),
            connecting: false,
            copy: None,
        });
        Ok(())
    }

    /// Stops mirroring (`ctl unpair`): the link closes and the volume goes on alone. Writes
    /// waiting for the mirror's acknowledgement are answered (their entries are durable
    /// here, and there is no pair any more), and partitions waiting for the mirror's CP go
    /// once their local half is done. Refused during a switchover, and while the volume
    /// waits for the mirror's copy of a log that recovery found cut short (without it, a
    /// read could miss an acknowledged write).
    pub(super) fn detach(&mut self) -> Result<(), ControlError> {
        match &self.link {
            LinkState::Unmirrored => return Err(ControlError::NotMirrored),
            LinkState::Fenced(r) => return Err(ControlError::Fenced(r.clone())),
            _ => {}
        }
        if self.quiesced {
            return Err(ControlError::SwitchoverUnderWay);
        }
        if self.held_for_mirror_log() {
            return Err(ControlError::AwaitingMirrorLog);
        }
        self.set_link(LinkState::Unmirrored);
        self.target = None;
        self.cfg.peer = None;
        for p in PARTITION_IDS {
            if self.parts[p as usize] == Part::Free {
                continue;
            }
            if let Err(e) = self.nvlog.persist(p) {
                self.fail_stop(format!("NVLog persist: {e}"));
                return Err(ControlError::Persist(format!("NVLog persist: {e}")));
            }
            self.unsent[p as usize] = self.nvlog.tail(p);
        }
        self.acked_seq = self.next_seq - 1;
        self.complete_acked();
        for p in PARTITION_IDS {
            self.maybe_release(p);
        }
        tracing::info!("volume {}: unpaired; it goes on alone", self.cfg.volume);
        Ok(())
    }

    // ---- link ----

    pub(super) fn start_connect(&mut self, copy: Option<CopyKind>) {
        let Some(target) = self.target.clone() else { return };
        if copy.is_some() {
            if let Err(e) = self.full_flush() {
                self.fail_stop(format!("local flush before a copy to the mirror: {e}"));
                return;
            }
        }
        if copy == Some(CopyKind::Baseline) {
            // The destination keeps nothing of what it held once it takes the baseline's
            // hello: the change map is relative to no copy, every region marked, before
            // it is asked. The copy's checkpoints then make it relative to this one.
            if let Some(m) = &mut self.changes {
                m.set_base(None);
                m.mark_all();
                if let Err(e) = m.persist() {
                    self.fail_stop(format!("change map: {e}"));
                    return;
                }
            }
        }
        let active = self.active;
        let hello = Hello {
            source_node: self.cfg.node.clone(),
            volume: self.cfg.volume.clone(),
            volume_id: self.cfg.volume_id,
            epoch: self.cfg.epoch,
            volume_bytes: self.device.size(),
            partition_bytes: self.cfg.partition_bytes as u64,
            intent: match copy {
                None => Intent::Resume,
                Some(CopyKind::Baseline) => Intent::Baseline,
                Some(CopyKind::Resync) => Intent::Resync,
            },
            base_seq: self.nvlog.header(active).map_or(self.next_seq, |h| h.first_seq),
            base_cp_gen: self.parts[active as usize].gen().unwrap_or(0),
            features: crate::transport::wire::FEATURE_COPY_MARKS | crate::transport::wire::FEATURE_SOURCE_PATHS,
        };
        if self.inline.is_some() {
            let result = self.connector.connect(&target, &hello);
            return self.on_connected(result);
        }
        let (tx, rx) = bounded(1);
        let connector = self.connector.clone();
        let waker = self.readiness.as_ref().map(Readiness::waker);
        let spawned = thread::Builder::new().name("nvm-connect".into()).spawn(move || {
            let _ = tx.send(connector.connect(&target, &hello));
            if let Some(w) = waker {
                w.wake();
            }
        });
        match spawned {
            Ok(_) => {
                self.connect_rx = Some(rx);
                if let LinkState::Down { connecting, .. } = &mut self.link {
                    *connecting = true;
                }
            }
            Err(e) => self.link_down(format!("spawn connect: {e}")),
        }
    }

    pub(super) fn reconnect_at(&self) -> u64 {
        self.clock.now_ns().saturating_add(nanos(self.cfg.reconnect_interval))
    }

    pub(super) fn poll_link(&mut self) -> bool {
        let mut worked = false;
        if let Some(rx) = &self.connect_rx {
            if let Ok(result) = rx.try_recv() {
                self.connect_rx = None;
                self.on_connected(result);
                worked = true;
            }
        }
        while let LinkState::Up { link, .. } = &mut self.link {
            let Some(ev) = link.poll() else { break };
            worked = true;
            match ev {
                LinkEvent::Reply(Reply::Ack { seq }) => {
                    if seq > self.acked_seq && seq < self.next_seq {
                        self.acked_seq = seq;
                    }
                    if seq < self.next_seq {
                        self.remote_acked_seq = self.remote_acked_seq.max(seq);
                    }
                    self.complete_acked();
                }
                LinkEvent::Reply(Reply::CpDone { cp }) => {
                    self.copy_checkpoint_done(cp);
                    self.on_cp_done(cp);
                }
                LinkEvent::Reply(Reply::BaselineAck) => {
                    let done = match &mut self.link {
                        LinkState::Up { copy, .. } => copy.take(),
                        _ => None,
                    };
                    if let Some(c) = done {
                        // Everything before the copy's first sequence number is in it.
                        self.remote_acked_seq = self.remote_acked_seq.max(c.base_seq.saturating_sub(1));
                        let what = if c.kind == CopyKind::Resync { "delta resync" } else { "baseline" };
                        self.stats.last_copy_kind =
                            Some(if c.kind == CopyKind::Resync { "resync" } else { "baseline" }.into());
                        self.stats.last_copy_bytes = c.bytes;
                        self.stats.last_copy_zero_bytes = c.zero_bytes;
                        self.stats.last_copy_hole_bytes = c.hole_bytes;
                        self.stats.copy_resumable_from = None;
                        tracing::info!(
                            "volume {}: {what} done ({} bytes in {} frames, {} of them zeroes sent as ranges); mirror in sync",
                            self.cfg.volume, c.bytes, c.chunks, c.zero_bytes
                        );
                        // The change map is relative to this peer's copy from now on.
                        if let (Some(m), Some(peer)) = (&mut self.changes, &self.cfg.peer) {
                            let base = ChangeBase { peer: peer.clone(), cp: c.base_cp_gen.saturating_sub(1) };
                            if c.kind == CopyKind::Baseline {
                                let all = vec![0xff; c.marks.len()];
                                m.rebase(&all, base);
                            } else {
                                m.rebase(&c.marks, base);
                            }
                            if let Err(e) = m.persist() {
                                self.fail_stop(format!("change map: {e}"));
                            }
                        }
                    }
                    // Make the mirror consistent as of a CP.
                    self.cp_wanted = true;
                }
                LinkEvent::Reply(Reply::Refuse { code: RefuseCode::StaleEpoch, reason }) => {
                    self.fence(reason);
                }
                LinkEvent::Reply(Reply::Refuse { reason, .. }) | LinkEvent::Reply(Reply::Error { reason }) => {
                    self.link_down(format!("destination: {reason}"));
                }
                LinkEvent::Closed { reason } => self.link_down(reason),
                LinkEvent::Reply(Reply::LogBytes { partition, offset, bytes }) => {
                    self.on_log_bytes(partition, offset, bytes);
                }
                LinkEvent::Reply(Reply::LogFetchEnd { partition, tail }) => self.on_log_fetch_end(partition, tail),
                // Set-up replies are consumed by the RDMA engine's connect.
                LinkEvent::Reply(other @ (Reply::RdmaListen { .. } | Reply::RdmaRegions { .. })) => {
                    self.link_down(format!("unexpected reply after set-up: {other:?}"));
                }
            }
        }
        worked
    }

    pub(super) fn fence(&mut self, reason: String) {
        let msg = format!("fenced: the mirror was failed over ({reason}); this node no longer accepts writes");
        tracing::warn!("volume {}: {msg}", self.cfg.volume);
        if let LinkState::Up { link, .. } = &mut self.link {
            link.close();
        }
        self.set_link(LinkState::Fenced(msg.clone()));
        self.fail_pending(&msg);
        for (_, tx) in self.cp_waiters.drain(..) {
            let _ = tx.send(Err(ControlError::Fenced(msg.clone())));
        }
    }

    pub(super) fn link_down(&mut self, reason: String) {
        // A log fetch under way starts over on the next connection.
        self.catch_up = None;
        if matches!(self.link, LinkState::Fenced(_) | LinkState::Unmirrored) {
            return;
        }
        let copy = match &mut self.link {
            LinkState::Up { link, copy } => {
                link.close();
                copy.as_ref().map(|c| c.kind)
            }
            LinkState::Down { copy, .. } => *copy,
            _ => None,
        };
        tracing::warn!("volume {}: mirror link down: {reason}", self.cfg.volume);
        self.set_link(LinkState::Down {
            reason: reason.clone(),
            next_try: self.reconnect_at(),
            connecting: false,
            copy,
        });
        if self.tracks_changes() {
            // Policy sync: what was sent and not acknowledged completes once persistent
            // here (the next batch flush), and a resume or a resync brings it over later.
            for p in PARTITION_IDS {
                self.maybe_release(p);
            }
        } else {
            self.fail_pending(&format!("mirror link down ({reason}); policy strict"));
        }
    }

    pub(super) fn fail_pending(&mut self, why: &str) {
        let pending: Vec<Pending> = self.pending.drain(..).collect();
        for p in pending {
            self.stats.write_errors += 1;
            self.answer(p.done, Err(eio(why.to_string())));
        }
    }

    pub(super) fn on_connected(&mut self, result: ConnectResult<C::Link>) {
        let copy = match self.link {
            LinkState::Down { copy, .. } => copy,
            _ => None,
        };
        let (mut link, welcome) = match result {
            Ok(x) => x,
            Err(ConnectError::Refused { code: RefuseCode::StaleEpoch, reason, .. }) => return self.fence(reason),
            Err(ConnectError::Refused { code: RefuseCode::Mismatch, reason, .. })
                if copy != Some(CopyKind::Baseline) =>
            {
                tracing::warn!("volume {}: {reason}; starting a baseline", self.cfg.volume);
                self.set_link(LinkState::Down {
                    reason,
                    next_try: self.clock.now_ns(),
                    connecting: false,
                    copy: Some(CopyKind::Baseline),
                });
                return;
            }
            Err(e) => {
                self.link =
                    LinkState::Down { reason: e.to_string(), next_try: self.reconnect_at(), connecting: false, copy };
                return;
            }
        };
        if welcome.epoch > self.cfg.epoch {
            link.close();
            return self.fence(format!("destination is at epoch {}", welcome.epoch));
        }
        // SAFETY: the NVLog's memory is mapped for the poller's life, and the link is
        // dropped first (field order) or replaced when it goes down. Entry bytes are sent
        // only from a partition's written part, which changes only when the partition is
        // freed: after the destination's CpDone for it (which follows the completion of
        // every placement before the CP), or with the link down (dropped).
        unsafe { link.offer_source_memory(self.nvlog.memory()) };
        *self.mirror_nvmf.lock() = welcome.mirror_nvmf.parse().ok();
        if welcome.source_paths {
            let nvmf = self.cfg.nvmf.map(|a| a.to_string()).unwrap_or_default();
            if let Err(e) = link.send(&Message::SourcePaths { nvmf }) {
                link.close();
                self.link = LinkState::Down {
                    reason: format!("send: {e}"),
                    next_try: self.reconnect_at(),
                    connecting: false,
                    copy,
                };
                return;
            }
        }
        if let Some(kind) = copy {
            let active = self.active;
            let header = self.nvlog.header(active).expect("active partition open");
            // The active partition is fresh (full flush) and writes went on into it only
            // through this link from here.
            self.unsent[active as usize] = PARTITION_HEADER_BYTES;
            let r = link.send(&Message::PartitionOpen { header: header.encode() }).and_then(|()| link.flush());
            if let Err(e) = r {
                return self.link_down(format!("copy start: {e}"));
            }
            let marks = self.changes.as_ref().map(ChangeMap::snapshot).unwrap_or_default();
            let marked: u64 = marks.iter().map(|b| u64::from(b.count_ones())).sum();
            let target = self.target.as_deref().unwrap_or("?");
            match kind {
                CopyKind::Baseline => tracing::info!(
                    "volume {}: mirroring to {target}: baseline copy of {} bytes",
                    self.cfg.volume,
                    self.device.size()
                ),
                CopyKind::Resync => tracing::info!(
                    "volume {}: mirroring to {target}: delta resync of {marked} regions ({} bytes at most)",
                    self.cfg.volume,
                    marked * crate::log::REGION_BYTES
                ),
            }
            let base_cp_gen = header.cp_gen;
            let base_seq = header.first_seq;
            self.stats.copy_resumable_from = None;
            self.confirmed = true;
            // The mirror is rebuilt from this volume: no copy of it can fill in the log.
            self.damaged_at = [None; PARTITIONS];
            self.set_link(LinkState::Up {
                link,
                copy: Some(Copying {
                    kind,
                    cursor: 0,
                    marks,
                    marked,
                    bytes: 0,
                    zero_bytes: 0,
                    hole_bytes: 0,
                    chunks: 0,
                    done_sent: false,
                    done_ns: 0,
                    base_cp_gen,
                    base_seq,
                    started_ns: self.clock.now_ns(),
                    checkpoint: None,
                    since_checkpoint: 0,
                    copy_marks: welcome.copy_marks,
                }),
            });
            return;
        }
        match self.resume(&mut link, &welcome) {
            Ok(Resumed::Lost(why)) => {
                link.close();
                self.lost_to_mirror(why);
            }
            Ok(how) => {
                if matches!(how, Resumed::Done) {
                    tracing::info!("volume {}: mirror link resumed", self.cfg.volume);
                }
                self.confirmed = true;
                self.set_link(LinkState::Up { link, copy: None });
            }
            Err(why) => {
                link.close();
                let next = if self.can_resync(&welcome) { CopyKind::Resync } else { CopyKind::Baseline };
                let what = if next == CopyKind::Resync { "a delta resync" } else { "a baseline" };
                tracing::warn!("volume {}: cannot resume ({why}); starting {what}", self.cfg.volume);
                self.link = LinkState::Down {
                    reason: why.to_string(),
                    next_try: self.clock.now_ns(),
                    connecting: false,
                    copy: Some(next),
                };
            }
        }
    }

    /// Brings the destination's logs level with ours after a reconnect: resends what it
    /// lacks, re-opens logs that diverged, re-sends an unfinished CP.
    pub(super) fn resume(&mut self, link: &mut C::Link, w: &Welcome) -> Result<Resumed, ResumeError> {
        if !w.consistent {
            return Err(ResumeError::NoBaseline);
        }
        let mut held: Vec<(u8, u64)> =
            PARTITION_IDS.into_iter().filter_map(|p| self.parts[p as usize].gen().map(|g| (p, g))).collect();
        held.sort_by_key(|h| h.1);
        // First, before anything is sent or copied: where the mirror holds more of a
        // partition than this node's log (a restart found the log cut short: a torn last
        // batch, or an entry that no longer passes its checksum), what the mirror holds
        // was persistent there, and may have been acknowledged. It is fetched back.
        for &(p, gen) in &held {
            let ours = self.nvlog.header(p).expect("held partition has a header");
            let theirs = w.logs[p as usize];
            let tail = self.nvlog.tail(p);
            if theirs.open && theirs.cp_gen == gen && theirs.first_seq == ours.first_seq && usize_of(theirs.tail) > tail
            {
                tracing::info!(
                    "volume {}: NVLog partition {p} ends at offset {tail} here, the mirror's at {}: fetching the \
                     rest from the mirror",
                    self.cfg.volume,
                    theirs.tail
                );
                link.send(&Message::LogFetch { partition: p, offset: tail as u64 })?;
                link.flush()?;
                self.catch_up = Some(CatchUp {
                    partition: p,
                    from: tail,
                    bytes: Vec::new(),
                    welcome: w.clone(),
                    started_ns: self.clock.now_ns(),
                });
                return Ok(Resumed::CatchingUp);
            }
        }
        let oldest = held.first().map(|h| h.1).unwrap_or(w.applied_cp + 1);
        if w.applied_cp + 1 < oldest {
            return Err(ResumeError::LogGap { applied: w.applied_cp, oldest });
        }
        self.remote_acked_seq = self.remote_acked_seq.max(w.applied_seq);
        // Whether the mirror holds every entry of the partitions looked at so far: what it
        // holds of a later one counts as acknowledged only then (an entry frame of the
        // older one may have been lost on a link that carried on).
        let mut whole_so_far = true;
        for (p, gen) in held {
            if let Part::Closing { remote_done: false, .. } = self.parts[p as usize] {
                if w.applied_cp >= gen {
                    if let Some(seq) = self.damaged_at[p as usize].filter(|&s| s <= w.applied_seq) {
                        // The mirror applied this partition's CP, entries this node could
                        // not read back included: they are on the mirror only now.
                        return Ok(Resumed::Lost(format!(
                            "NVLog partition {p} is damaged from sequence {seq} on (see the recovery message), and \
                             the mirror applied its CP up to {}: writes acknowledged past {} are on the mirror only. \
                             Fail over to the mirror, then resync this node from it (`nvmirror ctl resync VOLUME --from NEW_PRIMARY`, run here)",
                            w.applied_seq,
                            seq.saturating_sub(1)
                        )));
                    }
                    self.mark_remote_done(p);
                    continue;
                }
            }
            let ours = self.nvlog.header(p).expect("held partition has a header");
            let theirs = w.logs[p as usize];
            let tail = self.nvlog.tail(p);
            let same = theirs.open && theirs.cp_gen == gen && theirs.first_seq == ours.first_seq;
            // Continue from their tail where it is a prefix of ours; otherwise start their
            // log over from our partition's start.
            let from = if same
                && usize_of(theirs.tail) <= tail
                && self.nvlog_seq_at(p, usize_of(theirs.tail)) == Some(theirs.next_seq)
            {
                // What the destination holds of this log is persistent there (it persists
                // what it finds before it welcomes): acknowledged, in effect, where it
                // holds everything before it too.
                if whole_so_far {
                    self.remote_acked_seq = self.remote_acked_seq.max(theirs.next_seq.saturating_sub(1));
                }
                usize_of(theirs.tail)
            } else {
                link.send(&Message::PartitionOpen { header: ours.encode() })?;
                PARTITION_HEADER_BYTES
            };
            if from < tail {
                whole_so_far = false;
            }
            self.unsent[p as usize] = from;
            send_range(&self.nvlog, &mut self.unsent[p as usize], p, link)?;
            if let Part::Closing { upto_seq, remote_done: false, .. } = self.parts[p as usize] {
                link.send(&Message::Cp { cp: gen, partition: p, upto_seq, by_value: false })?;
                self.cp_sent_ns = self.clock.now_ns();
            }
        }
        link.flush()?;
        // The log is whole again, wherever recovery found it cut.
        self.damaged_at = [None; PARTITIONS];
        Ok(Resumed::Done)
    }
}
