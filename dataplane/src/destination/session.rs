//! A connection from the source: its frames placed into the log files, persisted in
//! group commits and acknowledged; CPs, copies and log fetches queued to the worker.

use super::*;

/// Why a session ends its connection (sent to the source as the reason).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("mirror was failed over; this source is fenced")]
    Fenced,
    #[error("superseded by a newer connection")]
    Superseded,
    #[error("no partition {0}")]
    NoPartition(u8),
    /// A frame the protocol does not allow here (misaligned, out of order, too large, of
    /// another volume or epoch): the source is at fault.
    #[error("{0}")]
    Protocol(String),
    #[error("unexpected message from source: {0}")]
    Unexpected(&'static str),
    #[error("{0}")]
    Range(io::Error),
    #[error(transparent)]
    Log(#[from] crate::log::LogFileError),
    #[error("{what}: {source}")]
    LogAt { what: String, source: crate::log::LogFileError },
    #[error("{what}: {source}")]
    Send { what: &'static str, source: io::Error },
    /// The mirror's worker (CPs, copies) cannot take the job.
    #[error(transparent)]
    Worker(MirrorError),
    #[error("{0}")]
    Rdma(String),
}

impl SessionError {
    fn log_at(what: String) -> impl FnOnce(crate::log::LogFileError) -> SessionError {
        move |source| SessionError::LogAt { what, source }
    }

    fn send(what: &'static str) -> impl FnOnce(io::Error) -> SessionError {
        move |source| SessionError::Send { what, source }
    }
}

/// One connection from the source to a mirror.
pub struct Session {
    pub(super) mirror: Arc<Mirror>,
    pub(super) gen: u64,
    pub(super) sink: Arc<dyn ReplySink>,
    pub(super) epoch: u64,
    pub(super) volume_id: u64,
    pub(super) dirty: [bool; PARTITIONS],
    pub(super) by_value: Vec<(u64, Vec<u8>)>,
    pub(super) by_value_bytes: usize,
    pub(super) last_acked: Option<u64>,
    pub(super) rdma: Option<Arc<dyn RdmaPlacement>>,
    /// On a baseline session: the offset the next baseline data must start at. The copy
    /// arrives in order, whole; `BaselineDone` is accepted only once it covers the volume.
    pub(super) baseline_next: Option<u64>,
    /// On a delta resync session: what arrived so far.
    pub(super) resync: Option<ResyncProgress>,
    /// The source marks its copy before each CP while the copy runs (`CopyMark`), and
    /// this session checks it: a CP then vouches for the copy up to the mark.
    pub(super) copy_marks: bool,
    /// The last frame was a copy mark that matched what arrived.
    pub(super) marked: bool,
    /// The copy's end (`BaselineDone`, `ResyncDone`) arrived: CPs need no mark since.
    pub(super) copy_ended: bool,
}

/// A delta resync's data, as it arrives: regions in increasing order.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct ResyncProgress {
    /// The next region data may not start below this.
    pub(super) next_min: u64,
    pub(super) bytes: u64,
    pub(super) chunks: u64,
}

impl Session {
    fn check_current(&self) -> Result<(), SessionError> {
        if self.mirror.fenced.load(Ordering::SeqCst) {
            let _ = self.sink.send(&Message::Refuse {
                code: RefuseCode::StaleEpoch,
                reason: "volume failed over to the destination; this source is stale".into(),
            });
            return Err(SessionError::Fenced);
        }
        if self.mirror.session_gen.load(Ordering::SeqCst) != self.gen {
            return Err(SessionError::Superseded);
        }
        Ok(())
    }

    fn partition(p: u8) -> Result<usize, SessionError> {
        if (p as usize) < PARTITIONS {
            Ok(p as usize)
        } else {
            Err(SessionError::NoPartition(p))
        }
    }

    /// Takes the next piece of a baseline or resync, `len` bytes at `offset` (`what`:
    /// `data` or `zeroes`, for the errors): a baseline's must continue it exactly, a
    /// resync's must not go back; a resync counts what it received.
    fn take_copy_piece(
        &mut self,
        purpose: BlockPurpose,
        offset: u64,
        len: u64,
        what: &str,
    ) -> Result<(), SessionError> {
        let protocol = SessionError::Protocol;
        if purpose == BlockPurpose::Baseline {
            match self.baseline_next {
                Some(next) if next == offset => {}
                Some(next) => {
                    return Err(protocol(format!("baseline {what} at offset {offset}, where {next} was expected")))
                }
                None => return Err(protocol(format!("baseline {what} on a session that is not a baseline"))),
            }
            self.baseline_next = Some(offset + len);
            return Ok(());
        }
        let Some(r) = &mut self.resync else {
            return Err(protocol(format!("resync {what} on a session that is not a resync")));
        };
        if offset < r.next_min {
            return Err(protocol(format!("resync {what} at offset {offset}, below {} already sent", r.next_min)));
        }
        r.next_min = offset + len;
        r.bytes += len;
        r.chunks += 1;
        Ok(())
    }

    fn queue(&self, job: Job) -> Result<(), SessionError> {
        self.mirror.queue(job).map_err(SessionError::Worker)
    }
}

impl FrameHandler for Session {
    fn on_message(&mut self, msg: Message<'_>) -> Result<(), crate::transport::HandlerError> {
        Ok(self.handle(msg)?)
    }

    fn commit(&mut self) -> Result<(), crate::transport::HandlerError> {
        Ok(self.commit_placed()?)
    }
}

impl Session {
    fn handle(&mut self, msg: Message<'_>) -> Result<(), SessionError> {
        let protocol = |why: &str| SessionError::Protocol(why.to_string());
        self.check_current()?;
        // Not part of the stream's order (nor of a copy's marks): noted, and saved.
        if let Message::SourcePaths { nvmf } = &msg {
            let nvmf = match nvmf.as_str() {
                "" => None,
                a => Some(a.parse().map_err(|_| protocol("source paths: not an address (HOST:PORT)"))?),
            };
            return self.mirror.set_source_nvmf(nvmf).map_err(SessionError::Worker);
        }
        let marked = std::mem::take(&mut self.marked);
        let copying = !self.copy_ended && (self.baseline_next.is_some() || self.resync.is_some());
        match msg {
            Message::CopyMark { next, bytes, chunks } => {
                if !self.copy_marks || !copying {
                    return Err(protocol("copy mark outside a copy that is marked"));
                }
                let here = match (self.baseline_next, self.resync) {
                    (Some(at), _) => (at == next, format!("the baseline is at offset {at}")),
                    (None, Some(r)) => (
                        (r.bytes, r.chunks) == (bytes, chunks) && r.next_min <= next,
                        format!("the resync has {} bytes in {} chunks, up to offset {}", r.bytes, r.chunks, r.next_min),
                    ),
                    (None, None) => unreachable!("copying"),
                };
                if !here.0 {
                    return Err(SessionError::Protocol(format!(
                        "copy mark at offset {next} ({bytes} bytes in {chunks} chunks), but {}: a piece of the copy \
                         was lost or came out of order",
                        here.1
                    )));
                }
                self.marked = true;
                Ok(())
            }
            Message::Cp { .. } if self.copy_marks && copying && !marked => {
                Err(protocol("a CP during the copy without its copy mark: a frame was lost or came out of order"))
            }
            Message::PartitionOpen { header } => {
                let p = Session::partition(header[6])?;
                let mut log = self.mirror.logs[p].lock();
                let h = log.open_partition(&header)?;
                if h.volume_id != self.volume_id || h.epoch != self.epoch {
                    log.free()?;
                    return Err(protocol("partition header of another volume or epoch"));
                }
                Ok(())
            }
            Message::Entries { partition, offset, bytes } => {
                let p = Session::partition(partition)?;
                let n = self.mirror.logs[p].lock().place(offset, bytes, self.epoch)?;
                self.dirty[p] = true;
                self.mirror.entries_received.fetch_add(n as u64, Ordering::Relaxed);
                self.mirror.bytes_received.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Message::Cp { cp, partition, upto_seq, by_value } => {
                Session::partition(partition)?;
                // Entries of the CP must be durable before it is applied from them.
                self.commit_placed()?;
                let blocks = if by_value {
                    self.by_value_bytes = 0;
                    Some(std::mem::take(&mut self.by_value))
                } else {
                    None
                };
                self.queue(Job::Cp {
                    cp,
                    partition,
                    upto_seq,
                    by_value: blocks,
                    sink: self.sink.clone(),
                    gen: self.gen,
                })
            }
            Message::BlockData { purpose, offset, data } => {
                let size = self.mirror.device.size();
                if offset % BLOCK_BYTES as u64 != 0 || data.len() % BLOCK_BYTES != 0 || data.len() > ENTRY_DATA_MAX {
                    return Err(protocol("block data not block-aligned or too large"));
                }
                crate::storage::check_range(size, offset, data.len() as u64).map_err(SessionError::Range)?;
                match purpose {
                    BlockPurpose::Baseline | BlockPurpose::Resync => {
                        self.take_copy_piece(purpose, offset, data.len() as u64, "data")?;
                        self.queue(Job::Baseline { offset, data: data.to_vec() })
                    }
                    BlockPurpose::CpByValue => {
                        // A CP by value carries at most what two partitions can dirty.
                        let max = 2 * crate::usize_of(self.mirror.meta.lock().partition_bytes);
                        if self.by_value_bytes + data.len() > max {
                            return Err(protocol("CP by value larger than the log it replaces"));
                        }
                        self.by_value_bytes += data.len();
                        self.by_value.push((offset, data.to_vec()));
                        Ok(())
                    }
                }
            }
            Message::ZeroRange { purpose, offset, len } => {
                let size = self.mirror.device.size();
                if offset % BLOCK_BYTES as u64 != 0 || len % BLOCK_BYTES as u64 != 0 {
                    return Err(protocol("zero range not block-aligned"));
                }
                crate::storage::check_range(size, offset, len).map_err(SessionError::Range)?;
                if purpose == BlockPurpose::CpByValue {
                    return Err(protocol("zeroes for a CP by value"));
                }
                self.take_copy_piece(purpose, offset, len, "zeroes")?;
                self.queue(Job::Zero { offset, len })
            }
            Message::BaselineDone { volume_bytes } => {
                self.copy_ended = true;
                if volume_bytes != self.mirror.device.size() {
                    return Err(protocol("baseline size mismatch"));
                }
                if self.baseline_next != Some(volume_bytes) {
                    return Err(SessionError::Protocol(format!(
                        "baseline done after {} of {volume_bytes} bytes",
                        self.baseline_next.map_or("none".into(), |n| n.to_string())
                    )));
                }
                self.queue(Job::BaselineDone { sink: self.sink.clone(), gen: self.gen })
            }
            Message::ResyncDone { bytes, chunks } => {
                self.copy_ended = true;
                let Some(r) = self.resync else {
                    return Err(protocol("resync done on a session that is not a resync"));
                };
                if (r.bytes, r.chunks) != (bytes, chunks) {
                    return Err(SessionError::Protocol(format!(
                        "resync done after {} bytes in {} chunks, but the source sent {bytes} in {chunks}",
                        r.bytes, r.chunks
                    )));
                }
                self.queue(Job::BaselineDone { sink: self.sink.clone(), gen: self.gen })
            }
            Message::LogFetch { partition, offset } => {
                // The source restarted with less of this partition than this side holds:
                // what is here past its tail was persistent here, and perhaps acknowledged.
                let p = Session::partition(partition)?;
                let mut log = self.mirror.logs[p].lock();
                log.catch_up().map_err(SessionError::log_at(format!("log fetch: rescan log {p}")))?;
                let tail = log.persisted_tail();
                let from = usize::try_from(offset).map_err(|_| protocol("log fetch offset out of range"))?;
                let on_boundary = from == tail || log.entries().iter().any(|e| e.at == from);
                if log.header().is_none() || !on_boundary {
                    return Err(SessionError::Protocol(format!(
                        "log fetch at offset {offset} of log {p}, which is not an entry boundary there"
                    )));
                }
                let mut at = from;
                while at < tail {
                    let end = (at + LOG_BYTES_CHUNK).min(tail);
                    let msg = Message::LogBytes { partition, offset: at as u64, bytes: &log.bytes()[at..end] };
                    self.sink.send(&msg).map_err(SessionError::send("send log bytes"))?;
                    at = end;
                }
                drop(log);
                tracing::info!(
                    "mirror {}: sent log {p} from offset {from} to {tail} to the source, which restarted without it",
                    self.mirror.name()
                );
                self.sink
                    .send(&Message::LogFetchEnd { partition, tail: tail as u64 })
                    .map_err(SessionError::send("send log fetch end"))
            }
            Message::RdmaSetup => {
                let Some(rdma) = &self.rdma else {
                    return Err(SessionError::Rdma(
                        "this node has no RDMA engine (no device, or not built with it); use tcp".into(),
                    ));
                };
                let (addr, token) =
                    rdma.expect(self.mirror.clone(), self.sink.clone(), self.gen).map_err(SessionError::Rdma)?;
                self.sink.send(&Message::RdmaListen { addr, token }).map_err(SessionError::send("send"))
            }
            other => Err(SessionError::Unexpected(msg_name(&other))),
        }
    }

    /// Persists what was placed since the last commit and acknowledges it.
    fn commit_placed(&mut self) -> Result<(), SessionError> {
        let mut persisted_any = false;
        for p in 0..PARTITIONS {
            if std::mem::take(&mut self.dirty[p]) {
                self.mirror.logs[p].lock().persist()?;
                persisted_any = true;
            }
        }
        // An ack says every entry up to it is persistent here: the highest sequence number
        // below which the logs hold everything, not the highest any log holds. Entries of
        // the newer partition may arrive while the older one still lacks some (a frame
        // lost on a link that then carried on); acking those would acknowledge writes
        // whose predecessors this side never had.
        let high = if persisted_any { self.contiguous_persisted_seq() } else { None };
        if let Some(seq) = high {
            self.mirror.commits.fetch_add(1, Ordering::Relaxed);
            if self.last_acked.is_none_or(|a| seq > a) {
                self.last_acked = Some(seq);
                self.sink.send(&Message::Ack { seq }).map_err(SessionError::send("send ack"))?;
            }
        }
        Ok(())
    }
}

impl Session {
    /// The highest sequence number up to which the open logs, oldest CP generation first,
    /// hold every entry persistently (see `commit`).
    fn contiguous_persisted_seq(&self) -> Option<u64> {
        let mut logs: Vec<LogView> = (0..PARTITIONS)
            .filter_map(|p| {
                if let Some(l) = self.mirror.logs[p].try_lock() {
                    return log_view(&l);
                }
                // Held: by a CP applying it, for its whole write-out, with what it holds
                // published and fixed meanwhile; else briefly (placement, a free).
                let applying = self.mirror.applying.lock().filter(|(q, _)| *q == p).map(|(_, v)| v);
                applying.or_else(|| log_view(&self.mirror.logs[p].lock()))
            })
            .collect();
        logs.sort_unstable();
        // Everything up to the last applied CP's sequence number is on the mirror's volume:
        // the first log must continue from there, and each later log from what the logs
        // before it hold. A log that holds nothing extends nothing: the next one must
        // continue what precedes it (its own predecessors never arrived). Read after the
        // logs: a CP's new applied sequence is stored before its log is released.
        let applied = self.mirror.saved_applied_seq.load(Ordering::SeqCst);
        let mut high: Option<u64> = None;
        for (_, first_seq, last) in logs {
            if first_seq > high.unwrap_or(applied) + 1 {
                // A gap before this log: nothing of it counts.
                break;
            }
            if let Some(l) = last {
                high = Some(high.map_or(l, |h| h.max(l)));
            }
        }
        high
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.mirror.detach(self.gen);
    }
}

pub(super) fn msg_name(m: &Message<'_>) -> &'static str {
    match m {
        Message::Hello(_) => "hello",
        Message::Welcome(_) => "welcome",
        Message::Refuse { .. } => "refuse",
        Message::Ack { .. } => "ack",
        Message::CpDone { .. } => "cp-done",
        Message::BaselineAck => "baseline-ack",
        Message::Error { .. } => "error",
        _ => "data",
    }
}
