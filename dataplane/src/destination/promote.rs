//! Failover: the epoch raised first, every entry past the last applied CP replayed in
//! sequence order, the mirror marked promoted.

use super::*;

impl Mirror {
    /// Breaks the mirror and makes its volume this node's primary: raises the epoch (the
    /// old source is refused from here on), then replays every logged entry past the last
    /// applied CP in sequence order.
    pub fn promote(&self) -> Result<PromoteReport, MirrorError> {
        self.promote_to(None)
    }

    /// As [`Mirror::promote`], with the new epoch at least `epoch` (an external fencing
    /// token, such as an etcd revision) rather than one more than the mirror's.
    pub fn promote_to(&self, epoch: Option<u64>) -> Result<PromoteReport, MirrorError> {
        self.promote_with(epoch, true)
    }

    /// The planted defect `failover-skips-replay`: a promotion that replays nothing past
    /// the last applied CP (the simulator must catch it).
    #[cfg(any(test, feature = "sim"))]
    pub fn promote_skipping_replay(&self, epoch: Option<u64>) -> Result<PromoteReport, MirrorError> {
        self.promote_with(epoch, false)
    }

    pub(super) fn promote_with(&self, epoch: Option<u64>, replay: bool) -> Result<PromoteReport, MirrorError> {
        // One failover at a time; a second request finds the volume promoted.
        let _one = self.promoting.lock();
        {
            let meta = self.meta.lock();
            if meta.promoted {
                return Err(MirrorError::AlreadyPromoted { volume: meta.volume.clone(), epoch: meta.epoch });
            }
            if !meta.consistent {
                return Err(MirrorError::Inconsistent { volume: meta.volume.clone() });
            }
        }
        self.fenced.store(true, Ordering::SeqCst);
        self.session_gen.fetch_add(1, Ordering::SeqCst);
        let epoch = {
            let mut meta = self.meta.lock();
            meta.epoch = (meta.epoch + 1).max(epoch.unwrap_or(0));
            meta.promoting = true;
            self.save(&meta)?;
            meta.epoch
        };
        self.finish_promotion(epoch, replay)
    }

    /// The promotion after the epoch is raised: the old session dropped, every logged entry
    /// past the last applied CP replayed (as a redo), the mirror marked promoted.
    pub(super) fn finish_promotion(&self, epoch: u64, replay: bool) -> Result<PromoteReport, MirrorError> {
        if let Some(sink) = self.session.lock().take() {
            let _ = sink.send(&Message::Refuse {
                code: RefuseCode::StaleEpoch,
                reason: format!("failed over at epoch {epoch}"),
            });
            sink.close();
        }
        self.drop_rdma_attachment();
        self.barrier();
        let _exclusive = self.apply.write();
        let applied_seq = self.meta.lock().applied_seq;
        let mut guards = [self.logs[0].lock(), self.logs[1].lock()];
        // What is replayed must be durable first: entries placed and not yet persisted (a
        // batch whose commit never came) would otherwise be written to the volume, then
        // lost with a crash before the promotion completes, and the redo of the next
        // attempt could not rewrite the blocks they touched.
        let scans: Vec<PartitionScan> = guards
            .iter_mut()
            .enumerate()
            .map(|(partition, l)| l.rescan().map_err(|source| MirrorError::PersistLog { partition, source }))
            .collect::<Result<_, _>>()?;
        let mut stops = Vec::new();
        for (p, s) in scans.iter().enumerate() {
            if let crate::format::ScanStop::Invalid { offset, reason } = &s.stop {
                stops.push(format!("log {p}: stopped at offset {offset}: {reason}"));
            }
        }
        let mut all: Vec<(usize, usize, u64)> = scans
            .iter()
            .enumerate()
            .flat_map(|(p, s)| {
                s.entries.iter().filter(|e| e.header.seq > applied_seq).map(move |e| (p, e.at, e.header.seq))
            })
            .collect();
        all.sort_by_key(|e| e.2);
        // Replay a gap-free run from applied_seq + 1 and never past a gap.
        let mut expect = applied_seq + 1;
        let mut run = Vec::new();
        for (p, at, seq) in all {
            if seq != expect {
                stops.push(format!(
                    "sequence gap: {seq} found where {expect} was expected; nothing past it is replayed"
                ));
                break;
            }
            if !replay {
                break;
            }
            run.push((p, at));
            expect += 1;
        }
        let replayed_ranges: Vec<(u64, u64)> = run
            .iter()
            .map(|&(p, at)| {
                let (h, _) = entry_data(guards[p].bytes(), at);
                (h.offset, u64::from(h.length))
            })
            .collect();
        let entries = run.iter().map(|&(p, at)| entry_data(guards[p].bytes(), at));
        // A CP interrupted before the promotion may have half-written the volume.
        let replayed = {
            let _redo = RedoGuard::new(self.device.as_ref());
            apply_entries(entries, self.device.as_ref()).map_err(MirrorError::Replay)?
        };
        drop(guards);
        let mut meta = self.meta.lock();
        meta.applied_seq = expect - 1;
        meta.promoted = true;
        meta.promoting = false;
        meta.pending_cp = None;
        let applied_cp = meta.applied_cp;
        // Saved under the meta lock: saves are ordered with the changes they record.
        self.save(&meta)?;
        drop(meta);
        for (partition, log) in self.logs.iter().enumerate() {
            log.lock().free().map_err(|source| MirrorError::FreeLog { partition, source })?;
        }
        Ok(PromoteReport {
            epoch,
            entries_replayed: replayed,
            last_seq: expect - 1,
            stops,
            applied_cp,
            replayed: replayed_ranges,
        })
    }
}
