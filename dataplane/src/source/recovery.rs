//! Recovery: the NVLog rebuilt into the cache at start, a CP a crash interrupted redone,
//! and entries the local log lacks fetched back from the mirror's copy.

use super::*;

/// Replays `recovered`'s entries directly onto `device` (used when a volume is opened
/// without a poller, e.g. for verification tools).
pub fn replay_nvlog(
    nvlog: &NvLog<Box<dyn Nvram>>,
    recovered: &Recovered,
    device: &dyn BlockDevice,
) -> io::Result<usize> {
    let entries = recovered.entries_in_order();
    let decoded: Vec<(EntryHeader, &[u8])> = entries
        .iter()
        .map(|(p, at, _)| EntryHeader::decode(&nvlog.partition(*p)[*at..]).map_err(|e| eio(e.to_string())))
        .collect::<io::Result<_>>()?;
    let _redo = RedoGuard::new(device);
    apply_entries(decoded, device)
}

/// Why the log bytes fetched back from the mirror were not taken: none of them is.
#[derive(Debug, thiserror::Error)]
pub(super) enum FetchedError {
    #[error("the partition is not held here")]
    NotHeld,
    #[error("where this log ends is not an entry boundary")]
    NotAtBoundary,
    #[error("at offset {offset}: {source}")]
    Entry { offset: usize, source: crate::format::DecodeError },
    #[error("at offset {offset}: sequence {got} where {want} was expected")]
    Sequence { offset: usize, got: u64, want: u64 },
    #[error("at offset {offset}: an entry of another volume, partition or epoch")]
    Foreign { offset: usize },
    #[error("at offset {offset}: a truncated entry")]
    Truncated { offset: usize },
    #[error("more than the partition holds")]
    TooLarge,
    #[error(transparent)]
    Append(#[from] crate::log::AppendError),
    #[error(transparent)]
    Log(#[from] crate::log::NvLogError),
    #[error("rebuild the cache: {0}")]
    RebuildCache(#[source] io::Error),
}

impl<C> Poller<C>
where
    C: Connector + 'static,
    C::Link: 'static,
{
    /// Rebuilds the cache from the NVLog found at start: the older held partition is a CP
    /// that did not finish, the newer the active one. The unfinished CP is redone locally;
    /// its remote half follows once the link is up.
    pub(super) fn recover(&mut self, rec: &Recovered) -> io::Result<()> {
        for problem in rec.problems() {
            tracing::warn!("volume {}: NVLog recovery: {problem}; entries after it are not replayed", self.cfg.volume);
        }
        // What is replayed here may have been half-written to the volume by a CP the crash
        // interrupted: the device must not trust its redundancy over it (no write hole).
        let device = self.device.clone();
        let _redo = RedoGuard::new(device.as_ref());
        let mut held: Vec<(u8, PartitionHeader)> =
            PARTITION_IDS.into_iter().filter_map(|p| self.nvlog.header(p).map(|h| (p, h))).collect();
        held.sort_by_key(|(_, h)| h.cp_gen);
        let mut next_seq = rec.checkpoint.next_seq.max(1);
        let mut next_gen = rec.checkpoint.released_cp + 1;
        for (p, h) in &held {
            let scan = &rec.scans[*p as usize];
            if matches!(scan.stop, crate::format::ScanStop::Invalid { .. }) {
                self.damaged_at[*p as usize] = Some(scan.next_seq().unwrap_or(h.first_seq));
            }
            next_seq = next_seq.max(h.first_seq);
            for e in &scan.entries {
                let bytes = self.nvlog.partition(*p);
                let (eh, data) = EntryHeader::decode(&bytes[e.at..]).map_err(|e| eio(e.to_string()))?;
                self.overlay.apply(&eh, data, self.device.as_ref(), &mut self.dirty[*p as usize])?;
                next_seq = next_seq.max(eh.seq + 1);
            }
            next_gen = next_gen.max(h.cp_gen + 1);
            self.unsent[*p as usize] = self.nvlog.tail(*p);
            self.part_blocks[*p as usize] = self.dirty[*p as usize].clone();
        }
        // Where the log's device writes are slow, a batch goes to the mirror before it is
        // persisted here (`flush_batch`): a crash can leave the mirror holding entries of
        // the newest partition that this log lost. They were never acknowledged, but a
        // write taken now would be logged under their sequence numbers, so requests wait
        // for the mirror's word on that partition, as for a log cut short (`damaged_at`).
        if self.nvlog.persist_waits_for_device() {
            if let Some((p, h)) = held.last() {
                let at = &mut self.damaged_at[*p as usize];
                if at.is_none() && self.cfg.peer.is_some() {
                    *at = Some(rec.scans[*p as usize].next_seq().unwrap_or(h.first_seq));
                    tracing::info!(
                        "volume {}: NVLog partition {p} went to the mirror before it was persisted here; requests \
                         wait for the mirror's word on how far it holds it",
                        self.cfg.volume
                    );
                }
            }
        }
        self.next_seq = next_seq;
        self.acked_seq = next_seq - 1;
        // Whatever the log holds may have been acknowledged here alone (policy sync with the
        // mirror away, before the restart): the mirror is not current until it has
        // acknowledged all of it.
        self.local_only_seq = next_seq - 1;
        match held.as_slice() {
            [] => {
                self.open_partition(0, next_gen)?;
            }
            [(p, h)] => {
                self.parts[*p as usize] = Part::Active { gen: h.cp_gen };
                self.active = *p;
                self.redo_active(*p)?;
            }
            [(old, oh), (new, nh)] => {
                self.active = *new;
                self.parts[*new as usize] = Part::Active { gen: nh.cp_gen };
                self.redo_active(*new)?;
                let upto = rec.scans[*old as usize].next_seq().unwrap_or(oh.first_seq).saturating_sub(1);
                self.parts[*old as usize] =
                    Part::Closing { gen: oh.cp_gen, upto_seq: upto, remote_done: false, local_done: false };
                self.local_cp(*old)?;
                if matches!(self.link, LinkState::Unmirrored) {
                    self.release(*old)?;
                }
            }
            _ => unreachable!("two partitions"),
        }
        Ok(())
    }

    /// Rewrites the active partition's blocks to the volume, as a redo, at recovery: a
    /// full flush (before a baseline) writes them too, and a crash in the middle of it can
    /// leave their rows with stale parity, which a later read-modify-write would keep. The
    /// blocks stay cached: the partition is still active.
    pub(super) fn redo_active(&mut self, p: u8) -> io::Result<()> {
        let dirty = &self.dirty[p as usize];
        if dirty.is_empty() {
            return Ok(());
        }
        self.overlay.write_blocks(dirty, self.device.as_ref())?;
        self.device.flush()
    }

    pub(super) fn open_partition(&mut self, p: u8, gen: u64) -> io::Result<()> {
        let header = PartitionHeader {
            partition: p,
            volume_id: self.cfg.volume_id,
            cp_gen: gen,
            first_seq: self.next_seq,
            epoch: self.cfg.epoch,
        };
        self.nvlog.open_partition(header).map_err(|e| eio(e.to_string()))?;
        self.parts[p as usize] = Part::Active { gen };
        self.active = p;
        self.unsent[p as usize] = PARTITION_HEADER_BYTES;
        if let LinkState::Up { link, .. } = &mut self.link {
            let r = link.send(&Message::PartitionOpen { header: header.encode() });
            if let Err(e) = r {
                self.link_down(format!("send: {e}"));
            }
        }
        Ok(())
    }

    /// Takes log bytes the mirror sent back (see [`CatchUp`]).
    pub(super) fn on_log_bytes(&mut self, partition: u8, offset: u64, bytes: Vec<u8>) {
        let ok = self.catch_up.as_mut().is_some_and(|c| {
            let expected = c.from + c.bytes.len();
            let fits = expected + bytes.len() <= self.cfg.partition_bytes;
            if c.partition == partition && offset == expected as u64 && fits {
                c.bytes.extend_from_slice(&bytes);
                true
            } else {
                false
            }
        });
        if !ok {
            self.catch_up = None;
            self.link_down(format!("log bytes of partition {partition} at offset {offset} that were not asked for"));
        }
    }

    /// The mirror sent all it holds of the partition: checks the bytes entry by entry,
    /// appends them to this node's log as its own, and goes on with the resume.
    pub(super) fn on_log_fetch_end(&mut self, partition: u8, tail: u64) {
        let Some(c) = self.catch_up.take() else {
            return self.link_down("the end of a log fetch nobody asked for".into());
        };
        if c.partition != partition || tail != (c.from + c.bytes.len()) as u64 {
            return self.link_down(format!(
                "log fetch of partition {partition} ended at {tail}, after {} bytes from {}",
                c.bytes.len(),
                c.from
            ));
        }
        if let Err(why) = self.append_fetched(&c) {
            // Bytes that do not continue this node's log: nothing is taken from them, and
            // nothing is sent over the mirror's log either.
            if let LinkState::Up { link, .. } = &mut self.link {
                link.close();
            }
            return self.lost_to_mirror(format!(
                "the mirror's log of partition {partition} from offset {} does not continue this node's ({why}); \
                 its entries may hold acknowledged writes: fail over to the mirror, then resync this node from it (`nvmirror ctl resync VOLUME --from NEW_PRIMARY`, run here)",
                c.from
            ));
        }
        let LinkState::Up { mut link, copy } = std::mem::replace(&mut self.link, LinkState::Unmirrored) else {
            unreachable!("a log fetch is answered on a link that is up")
        };
        let r = self.resume(&mut link, &c.welcome);
        // Put back as it was (still registered for readiness): not through `set_link`.
        self.link = LinkState::Up { link, copy };
        match r {
            Ok(Resumed::Done) => tracing::info!("volume {}: mirror link resumed", self.cfg.volume),
            Ok(Resumed::CatchingUp) => {}
            Ok(Resumed::Lost(why)) => {
                if let LinkState::Up { link, .. } = &mut self.link {
                    link.close();
                }
                self.lost_to_mirror(why);
            }
            Err(why) => self.link_down(format!("resume after a log fetch: {why}")),
        }
    }

    /// The mirror holds acknowledged writes this node lost: the volume takes no more writes
    /// and no longer connects (a copy from here would overwrite them); failover is the way
    /// on, as after a fence.
    pub(super) fn lost_to_mirror(&mut self, why: String) {
        self.fail_stop(why.clone());
        self.set_link(LinkState::Fenced(why));
    }

    /// Appends entries fetched from the mirror to partition `c.partition` after checking
    /// each (checksum, volume, partition, epoch, consecutive sequence numbers from where
    /// this node's log ends), and applies them to the cache as recovery would have.
    pub(super) fn append_fetched(&mut self, c: &CatchUp) -> Result<(), FetchedError> {
        let p = c.partition;
        let ph = self.nvlog.header(p).ok_or(FetchedError::NotHeld)?;
        let mut seq = self.nvlog_seq_at(p, c.from).ok_or(FetchedError::NotAtBoundary)?;
        let first = seq;
        let mut entries: Vec<(EntryHeader, usize)> = Vec::new();
        let mut at = 0usize;
        while at < c.bytes.len() {
            let offset = c.from + at;
            let (h, _) =
                EntryHeader::decode(&c.bytes[at..]).map_err(|source| FetchedError::Entry { offset, source })?;
            if h.seq != seq {
                return Err(FetchedError::Sequence { offset, got: h.seq, want: seq });
            } else if h.volume_id != self.cfg.volume_id || h.partition != p || h.epoch != ph.epoch {
                return Err(FetchedError::Foreign { offset });
            } else if at + h.footprint() > c.bytes.len() {
                return Err(FetchedError::Truncated { offset });
            }
            entries.push((h, at));
            at += h.footprint();
            seq += 1;
        }
        for (h, at) in &entries {
            let data = &c.bytes[at + crate::format::ENTRY_HEADER_BYTES..at + h.footprint()][..h.data_len as usize];
            if !self.nvlog.fits(p, data.len()) {
                return Err(FetchedError::TooLarge);
            }
            self.nvlog.append(h, data)?;
        }
        self.nvlog.persist(p)?;
        // What this node's log held past the damaged entry (never on the mirror, so never
        // acknowledged) must not read as following the fetched entries after a crash.
        self.nvlog.end_at_tail(p)?;
        let last = seq - 1;
        self.next_seq = self.next_seq.max(seq);
        // Persistent on both sites: acknowledged, in effect.
        self.acked_seq = self.acked_seq.max(last);
        self.remote_acked_seq = self.remote_acked_seq.max(last);
        self.unsent[p as usize] = self.nvlog.tail(p);
        if let Part::Closing { gen, .. } = self.parts[p as usize] {
            self.parts[p as usize] = Part::Closing { gen, upto_seq: last, remote_done: false, local_done: false };
        }
        // The cache was built from the entries recovery could read; entries of the newer
        // partition were applied on blocks that lacked these (a partial write keeps the
        // rest of its block). Built again from the whole log, in sequence order, as
        // recovery builds it, and the closing partition's local CP written again.
        self.rebuild_cache_from_log().map_err(FetchedError::RebuildCache)?;
        self.stats.log_entries_fetched += entries.len() as u64;
        tracing::warn!(
            "volume {}: the mirror's copy served {} entries of NVLog partition {p} (sequence {first} to {last}) that \
             this node's log lacked after its restart",
            self.cfg.volume,
            entries.len()
        );
        Ok(())
    }

    /// Builds the cache (overlay, dirty and logged blocks per partition) again from the
    /// held partitions' entries in sequence order, and writes a closing partition's local
    /// CP again: after entries were added behind a later partition's back (a log fetch).
    pub(super) fn rebuild_cache_from_log(&mut self) -> io::Result<()> {
        let device = self.device.clone();
        let _redo = RedoGuard::new(device.as_ref());
        self.overlay.clear();
        let mut held: Vec<(u8, u64)> =
            PARTITION_IDS.into_iter().filter_map(|p| self.parts[p as usize].gen().map(|g| (p, g))).collect();
        held.sort_by_key(|h| h.1);
        for &(p, _) in &held {
            self.dirty[p as usize].clear();
            // Only up to the log's tail: past it may lie entries of the timeline a restart
            // cut short (persisted here, never on the mirror, so never acknowledged).
            let tail = self.nvlog.tail(p);
            let scan = crate::format::scan_partition(self.nvlog.partition(p), p);
            for e in scan.entries.iter().filter(|e| e.at < tail) {
                let bytes = self.nvlog.partition(p);
                let (eh, data) = EntryHeader::decode(&bytes[e.at..]).map_err(|e| eio(e.to_string()))?;
                self.overlay.apply(&eh, data, device.as_ref(), &mut self.dirty[p as usize])?;
            }
            self.part_blocks[p as usize] = self.dirty[p as usize].clone();
        }
        for &(p, _) in &held {
            if matches!(self.parts[p as usize], Part::Closing { .. }) {
                self.local_cp(p)?;
            }
        }
        Ok(())
    }

    /// The sequence number of the entry at `offset` of partition `p` (or the next one, at
    /// the tail); `None` when `offset` is not an entry boundary.
    pub(super) fn nvlog_seq_at(&self, p: u8, offset: usize) -> Option<u64> {
        let h = self.nvlog.header(p)?;
        let mut at = PARTITION_HEADER_BYTES;
        let mut seq = h.first_seq;
        let tail = self.nvlog.tail(p);
        while at < offset && at < tail {
            at = self.nvlog.cut(p, at, 0);
            seq += 1;
        }
        (at == offset).then_some(seq)
    }

    // ---- CPs ----
}
