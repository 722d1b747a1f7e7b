//! A source's hello: admitted or refused (epoch, identity, what the mirror holds), and the
//! session it gets.

use super::*;

impl Mirror {
    /// Whether a hello may take over the mirror, given its metadata.
    pub(super) fn admit(&self, meta: &MirrorMeta, hello: &Hello) -> Result<(), (RefuseCode, String)> {
        if meta.promoted {
            return Err((
                RefuseCode::StaleEpoch,
                format!("volume {} was failed over here at epoch {}; the source is stale", meta.volume, meta.epoch),
            ));
        }
        if hello.epoch < meta.epoch {
            return Err((
                RefuseCode::StaleEpoch,
                format!("epoch {} is older than the mirror's {}", hello.epoch, meta.epoch),
            ));
        }
        let keeps = matches!(hello.intent, Intent::Resume | Intent::Resync);
        // A source smaller than its mirror is one whose resize grew the mirror first and
        // has not reached the source yet: what the mirror holds is still the source's.
        if hello.volume_bytes > meta.volume_bytes && keeps {
            return Err((RefuseCode::Mismatch, "volume size changed; a baseline is needed".into()));
        }
        if hello.partition_bytes != meta.partition_bytes {
            return Err((RefuseCode::Mismatch, "NVLog partition size differs from the mirror's log files".into()));
        }
        if hello.volume_id != meta.volume_id && keeps {
            return Err((RefuseCode::Mismatch, "another volume of that name is mirrored here".into()));
        }
        if hello.intent == Intent::Resync && !meta.resyncable() {
            return Err((
                RefuseCode::Mismatch,
                "the mirror holds no consistent copy to resync from; a baseline is needed".into(),
            ));
        }
        if hello.intent == Intent::Baseline && hello.volume_bytes != self.device.size() {
            return Err((
                RefuseCode::Mismatch,
                format!("mirror volume is {} bytes, source {}", self.device.size(), hello.volume_bytes),
            ));
        }
        Ok(())
    }

    /// Accepts a connection from the source after checking who it is and its epoch.
    pub fn attach(
        self: &Arc<Self>,
        hello: &Hello,
        sink: Arc<dyn ReplySink>,
        rdma: Option<Arc<dyn RdmaPlacement>>,
    ) -> Result<(Session, Welcome), (RefuseCode, String)> {
        if self.fenced.load(Ordering::SeqCst) {
            // Failed over here (or being): the source's epoch is stale, and it must know so
            // that it stops taking writes, rather than retry.
            let epoch = self.meta.lock().epoch;
            return Err((
                RefuseCode::StaleEpoch,
                format!("volume failed over to this node at epoch {epoch}; the source is stale"),
            ));
        }
        // Refuse before disturbing anything: a hello that is turned away must leave the
        // current session, its queued work and its RDMA placements alone.
        self.admit(&self.meta.lock(), hello)?;
        // Quiesce the previous session's queued work and placements before looking at the logs.
        self.drop_rdma_attachment();
        self.barrier();
        for log in &self.logs {
            log.lock().rescan().map_err(|e| (RefuseCode::Internal, format!("rescan log: {e}")))?;
        }
        let mut meta = self.meta.lock();
        // Checked again: a failover or another session may have come in meanwhile.
        if self.fenced.load(Ordering::SeqCst) {
            return Err((RefuseCode::StaleEpoch, format!("volume failed over to this node at epoch {}", meta.epoch)));
        }
        self.admit(&meta, hello)?;
        if hello.intent == Intent::Baseline {
            for log in &self.logs {
                log.lock().free().map_err(|e| (RefuseCode::Internal, e.to_string()))?;
            }
            *meta = MirrorMeta::new(hello);
            meta.baseline_started = true;
            // Until the copy is done, whatever its storage held is to be written over.
            self.device.set_copy_over(true);
            meta.applied_seq = hello.base_seq.saturating_sub(1);
            meta.applied_cp = hello.base_cp_gen.saturating_sub(1);
            self.baseline_bytes.store(0, Ordering::SeqCst);
            self.save(&meta).map_err(|e| (RefuseCode::Internal, e.to_string()))?;
        } else if hello.intent == Intent::Resync {
            // The contents stay; the logs start over, and until the resync is done the
            // mirror is not consistent (it may not be failed over), but resyncable.
            for log in &self.logs {
                log.lock().free().map_err(|e| (RefuseCode::Internal, e.to_string()))?;
            }
            meta.epoch = hello.epoch;
            meta.consistent = false;
            meta.resyncing = true;
            meta.pending_cp = None;
            meta.applied_seq = hello.base_seq.saturating_sub(1);
            meta.applied_cp = hello.base_cp_gen.saturating_sub(1);
            self.baseline_bytes.store(0, Ordering::SeqCst);
            self.save(&meta).map_err(|e| (RefuseCode::Internal, e.to_string()))?;
        } else {
            meta.epoch = hello.epoch;
            self.save(&meta).map_err(|e| (RefuseCode::Internal, e.to_string()))?;
        }
        let gen = self.session_gen.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(old) = self.session.lock().replace(sink.clone()) {
            old.close();
        }
        *self.error.lock() = None;
        let logs = [0, 1].map(|p| {
            let l = self.logs[p].lock();
            match l.header() {
                Some(h) => LogTail {
                    open: true,
                    cp_gen: h.cp_gen,
                    first_seq: h.first_seq,
                    next_seq: l.next_seq(),
                    tail: l.tail() as u64,
                },
                None => LogTail::default(),
            }
        });
        let welcome = Welcome {
            epoch: meta.epoch,
            applied_cp: meta.applied_cp,
            applied_seq: meta.applied_seq,
            consistent: meta.consistent,
            resyncable: meta.resyncable(),
            copy_marks: hello.features & crate::transport::wire::FEATURE_COPY_MARKS != 0,
            header_crc_entries: hello.features & crate::transport::wire::FEATURE_HEADER_CRC_ENTRIES != 0,
            source_paths: hello.features & crate::transport::wire::FEATURE_SOURCE_PATHS != 0,
            mirror_nvmf: self.local_nvmf.lock().map(|a| a.to_string()).unwrap_or_default(),
            logs,
        };
        let session = Session {
            mirror: self.clone(),
            gen,
            sink,
            epoch: meta.epoch,
            volume_id: meta.volume_id,
            dirty: [false; PARTITIONS],
            by_value: Vec::new(),
            by_value_bytes: 0,
            last_acked: None,
            rdma,
            baseline_next: (hello.intent == Intent::Baseline).then_some(0),
            resync: (hello.intent == Intent::Resync).then_some(ResyncProgress::default()),
            copy_marks: welcome.copy_marks,
            marked: false,
            copy_ended: false,
        };
        Ok((session, welcome))
    }

    /// Ends the session open on this mirror, if any, without fencing its source (a mirror
    /// deleted under a connected source: the source reconnects and finds none here), and
    /// waits for the work it queued. Nothing the source sends after this is placed.
    pub fn disconnect(&self) {
        self.session_gen.fetch_add(1, Ordering::SeqCst);
        if let Some(sink) = self.session.lock().take() {
            sink.close();
        }
        self.drop_rdma_attachment();
        self.barrier();
        drop(self.apply.write());
    }

    /// Waits until every queued job has run.
    pub(super) fn barrier(&self) {
        if self.stepped_jobs.is_some() {
            self.run_jobs(usize::MAX);
            return;
        }
        let (tx, rx) = bounded(1);
        if self.jobs.send(Job::Barrier(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    pub(super) fn detach(&self, gen: u64) {
        let mut s = self.session.lock();
        if self.session_gen.load(Ordering::SeqCst) == gen {
            *s = None;
        }
    }
}
