//! CP application on the mirror's worker: the newest entry per block written through the
//! mirror's own storage, then the log files released; a damaged log refuses the CP.

use super::*;

/// Header and data of the (already validated) entry at `at` of a log.
/// Checks that `log` (partition `partition`) holds CP `cp` up to `upto_seq`; its
/// [`LogFile::entries`] are then the CP's entries (and any after), each validated (header
/// and data checksum) when it was placed or scanned.
pub(super) fn check_cp_log(
    log: &mut LogFile<Box<dyn Nvram>>,
    cp: u64,
    partition: u8,
    upto_seq: u64,
) -> Result<(), MirrorError> {
    // Entries may have been placed by RDMA, unseen by this side's bookkeeping: catching up
    // scans the log then, and persists whatever was placed and not yet persisted.
    log.catch_up().map_err(|source| MirrorError::CpRescan { cp, partition, source })?;
    let h = log.header().ok_or(MirrorError::CpLogNotOpen { cp, partition })?;
    if h.cp_gen != cp {
        return Err(MirrorError::CpGeneration { cp, partition, holds: h.cp_gen });
    }
    let last = log.entries().last().map(|e| e.header.seq);
    if upto_seq >= h.first_seq && last.is_none_or(|s| s < upto_seq) {
        return Err(MirrorError::CpLogShort { cp, partition, last, upto_seq, stop: format!("{:?}", log.scan().stop) });
    }
    Ok(())
}

/// Why a CP could not be applied.
#[derive(Debug, thiserror::Error)]
pub(super) enum CpError {
    /// An entry of the log failed its checksum when read back for the CP: the log was cut
    /// before it, and the source sends the rest again when it reconnects.
    #[error(
        "CP {cp}: the entry of sequence {seq} at offset {at} of log {partition} fails its checksum ({why}); \
         the log is cut there and the source will send it again"
    )]
    LogDamaged { cp: u64, partition: u8, seq: u64, at: usize, why: String },
    /// Anything else: the mirror is failed.
    #[error(transparent)]
    Other(#[from] MirrorError),
}

/// The first entry of `log` up to `upto_seq` whose bytes no longer pass their checksum:
/// its offset, sequence number and what is wrong.
pub(super) fn first_damaged_entry(log: &LogFile<Box<dyn Nvram>>, upto_seq: u64) -> Option<(usize, u64, String)> {
    let bytes = log.bytes();
    log.entries().iter().take_while(|e| e.header.seq <= upto_seq).find_map(|e| {
        match EntryHeader::decode(&bytes[e.at..]) {
            Ok((h, _)) if h == e.header => None,
            Ok(_) => Some((e.at, e.header.seq, "its header changed".to_string())),
            Err(why) => Some((e.at, e.header.seq, why.to_string())),
        }
    })
}

pub(super) fn worker(mirror: std::sync::Weak<Mirror>, rx: Receiver<Job>) {
    for job in rx {
        let Some(m) = mirror.upgrade() else { return };
        run_job(&m, job);
    }
}

/// How much of a zero range the worker checks (reads) at a time.
const ZERO_CHECK_BYTES: u64 = 1 << 20;

pub(super) fn run_job(m: &Mirror, job: Job) {
    match job {
        Job::Barrier(done) => {
            let _ = done.send(());
        }
        Job::Cp { cp, partition, upto_seq, by_value, sink, gen } => {
            if m.session_gen.load(Ordering::SeqCst) != gen {
                return;
            }
            match m.apply_cp(cp, partition, upto_seq, by_value) {
                Ok(()) => {
                    let _ = sink.send(&Message::CpDone { cp });
                }
                Err(e @ CpError::LogDamaged { .. }) => {
                    // Not the mirror's failure: the connection ends, and the source's
                    // resume sends the entries from the cut on, then the CP again.
                    tracing::warn!("mirror {}: {e}", m.name());
                    m.log_repairs.fetch_add(1, Ordering::Relaxed);
                    let _ = sink.send(&Message::Error { reason: e.to_string() });
                    sink.close();
                }
                Err(CpError::Other(e)) => {
                    let e = e.to_string();
                    m.fail(&e);
                    let _ = sink.send(&Message::Error { reason: e });
                    sink.close();
                }
            }
        }
        Job::Baseline { offset, data } => {
            // A baseline overwrites what a crash may have left half-written (an earlier
            // baseline, or an interrupted CP): parity is recomputed from the data.
            let _redo = RedoGuard::new(m.device.as_ref());
            if let Err(e) = m.device.write_at(&data, offset) {
                m.fail(&format!("baseline write at {offset}: {e}"));
            } else {
                m.baseline_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        Job::Zero { offset, len } => {
            // Zeroes are written only where the mirror reads otherwise (storage that was a
            // volume before, or damaged): a new mirror's storage reads as zeroes, and stays
            // sparse.
            let _redo = RedoGuard::new(m.device.as_ref());
            let mut buf = vec![0u8; crate::usize_of(len.min(ZERO_CHECK_BYTES))];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(buf.len() as u64);
                let piece = &mut buf[..crate::usize_of(n)];
                let zero = m.device.read_at(piece, at).is_ok() && piece.iter().all(|&b| b == 0);
                if !zero {
                    if let Err(e) = m.device.write_zeroes(at, n) {
                        m.fail(&format!("baseline zeroes at {at}: {e}"));
                        return;
                    }
                }
                m.baseline_bytes.fetch_add(n, Ordering::Relaxed);
                at += n;
            }
        }
        Job::BaselineDone { sink, gen } => {
            if m.session_gen.load(Ordering::SeqCst) != gen {
                return;
            }
            let r = if let Some(e) = m.error.lock().clone() {
                Err(e)
            } else {
                m.device.flush().map_err(|e| format!("baseline flush: {e}")).and_then(|()| {
                    let mut meta = m.meta.lock();
                    meta.consistent = true;
                    meta.resyncing = false;
                    meta.baseline_started = false;
                    m.device.set_copy_over(false);
                    m.save(&meta).map_err(|e| e.to_string())
                })
            };
            match r {
                Ok(()) => {
                    let _ = sink.send(&Message::BaselineAck);
                }
                Err(e) => {
                    let _ = sink.send(&Message::Error { reason: e });
                    sink.close();
                }
            }
        }
    }
}

impl Mirror {
    /// Applies CP `cp`: by reference (the newest contents per block from log `partition`, up
    /// to `upto_seq`) or by value (`blocks`). Idempotent: a CP already applied is a no-op.
    pub(super) fn apply_cp(
        &self,
        cp: u64,
        partition: u8,
        upto_seq: u64,
        blocks: Option<Vec<(u64, Vec<u8>)>>,
    ) -> Result<(), CpError> {
        let started = Instant::now();
        {
            let mut meta = self.meta.lock();
            if cp <= meta.applied_cp && meta.pending_cp.is_none_or(|p| p.cp != cp) {
                drop(meta);
                return Ok(self.release_log(partition, cp)?);
            }
            // A CP is recorded as pending (to be redone after a crash) only once its log
            // holds everything it needs: one that names entries that never arrived (a lost
            // frame, a dropped connection) fails here and leaves nothing to redo.
            if blocks.is_none() {
                self.check_cp_log(cp, partition, upto_seq)?;
            }
            meta.pending_cp = Some(PendingCp { cp, partition, upto_seq });
            // Saved under the meta lock: saves are ordered with the changes they record.
            self.save(&meta)?;
            drop(meta);
        }
        {
            let _exclusive = self.apply.write();
            match blocks {
                None => {
                    // Checked again under the log's lock, which is held while the entries
                    // are applied: what the scan validated is what is applied.
                    let p = partition as usize;
                    let mut log = self.logs[p].lock();
                    // What it holds, published for acknowledgements while the lock is
                    // held (it only grows under `check_cp_log`'s catch-up; an entry found
                    // damaged below was persistent when it was placed, and the view is
                    // withdrawn as the log is cut there).
                    *self.applying.lock() = log_view(&log).map(|v| (p, v));
                    let checked = check_cp_log(&mut log, cp, partition, upto_seq);
                    *self.applying.lock() = log_view(&log).map(|v| (p, v));
                    if let Err(e) = checked {
                        *self.applying.lock() = None;
                        return Err(e.into());
                    }
                    // Every entry was checked when it was placed; the memory under it may
                    // have changed since (NVRAM does flip bits). Checked again as it is
                    // read for the CP, whose image is final: a damaged entry stops the CP
                    // before anything is written, and the source, which holds the same
                    // entries, sends them again.
                    if let Some((at, seq, why)) = first_damaged_entry(&log, upto_seq) {
                        log.truncate_at(at);
                        *self.applying.lock() = None;
                        drop(log);
                        let mut meta = self.meta.lock();
                        meta.pending_cp = None;
                        self.save(&meta)?;
                        return Err(CpError::LogDamaged { cp, partition, seq, at, why });
                    }
                    let bytes = log.bytes();
                    let entries = log
                        .entries()
                        .iter()
                        .filter(|e| e.header.seq <= upto_seq)
                        .map(|e| (e.header, scanned_data(bytes, e)));
                    let applied = apply_entries(entries, self.device.as_ref());
                    *self.applying.lock() = None;
                    drop(log);
                    applied.map_err(|source| MirrorError::CpWrite { cp, what: "apply", source })?;
                }
                Some(blocks) => {
                    self.cps_applied_by_value.fetch_add(1, Ordering::Relaxed);
                    for (offset, data) in &blocks {
                        self.device.write_at(data, *offset).map_err(|source| MirrorError::CpWrite {
                            cp,
                            what: "write",
                            source,
                        })?;
                    }
                    self.device.flush().map_err(|source| MirrorError::CpWrite { cp, what: "flush", source })?;
                }
            }
            self.cps_applied.fetch_add(1, Ordering::Relaxed);
            let mut meta = self.meta.lock();
            meta.applied_cp = cp;
            meta.applied_seq = meta.applied_seq.max(upto_seq);
            meta.pending_cp = None;
            meta.last_cp_unix_ms = crate::clock::unix_ms();
            meta.last_cp_duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            // Saved under the meta lock: saves are ordered with the changes they record.
            self.save(&meta)?;
            drop(meta);
        }
        Ok(self.release_log(partition, cp)?)
    }

    /// Checks that log `partition` holds CP `cp` up to `upto_seq`.
    pub(super) fn check_cp_log(&self, cp: u64, partition: u8, upto_seq: u64) -> Result<(), MirrorError> {
        check_cp_log(&mut self.logs[partition as usize].lock(), cp, partition, upto_seq)
    }

    pub(super) fn release_log(&self, partition: u8, cp: u64) -> Result<(), MirrorError> {
        let mut log = self.logs[partition as usize].lock();
        if log.header().is_some_and(|h| h.cp_gen <= cp) {
            log.free().map_err(|source| MirrorError::FreeLog { partition: usize::from(partition), source })?;
        }
        Ok(())
    }
}
