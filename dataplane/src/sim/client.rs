//! The checked client: writes with known contents, replies matched to what was sent,
//! reads of whole volumes checked against the model.

use super::*;

#[derive(Debug)]
pub(super) struct Inflight {
    pub(super) node: String,
    pub(super) epoch: u64,
    pub(super) blocks: Vec<(u64, u64)>,
    /// Sent to a node that had lost the volume to a failover: must fail.
    pub(super) stale: bool,
}

impl World {
    pub(super) fn submit(&mut self, node: &str, stale: bool) {
        let epoch = self.nodes.get(node).and_then(|n| n.live.as_ref()?.source.as_ref().map(|s| s.epoch));
        let Some(epoch) = epoch else { return };
        let first = self.rng.gen_range(0..BLOCKS);
        let n = if self.rng.gen_bool(0.2) { self.rng.gen_range(2..=4u64).min(BLOCKS - first) } else { 1 };
        let zero = !stale && self.rng.gen_ratio(1, 25);
        let trim = zero && self.rng.gen_bool(0.5);
        let mut blocks = Vec::new();
        let mut data = Vec::with_capacity(crate::usize_of(n) * BLOCK_BYTES);
        let mut buf = vec![0u8; BLOCK_BYTES];
        // One version for the whole write: its blocks land together or not at all.
        let version = self.model.next_version();
        for b in first..first + n {
            if !stale {
                self.model.submitted(b, version, zero);
            }
            blocks.push((b, version));
            if !zero {
                block_contents(b, version, &mut buf);
                data.extend_from_slice(&buf);
            }
        }
        let offset = first * BLOCK_BYTES as u64;
        let len = u32::try_from(n * BLOCK_BYTES as u64).expect("small");
        let request = if !zero {
            IoRequest::Write { offset, data, fua: false }
        } else if trim {
            IoRequest::Trim { offset, len }
        } else {
            IoRequest::WriteZeroes { offset, len, fua: false }
        };
        self.next_cookie += 1;
        let cookie = self.next_cookie;
        if self.opts.watch_block.is_some_and(|w| (first..first + n).contains(&w)) {
            let kind = if !zero {
                "write"
            } else if trim {
                "trim"
            } else {
                "write-zeroes"
            };
            self.event(format!(
                "watch: {kind} v{version} of blocks {first}..{} to {node} (cookie {cookie})",
                first + n
            ));
        }
        self.inflight.insert(cookie, Inflight { node: node.to_string(), epoch, blocks, stale });
        self.writes_submitted += 1;
        let done = Completer::new(cookie, self.replies_tx.clone());
        let src = self.live_source(node).expect("checked");
        src.handle.submit(request, done);
    }

    pub(super) fn drain_replies(&mut self) -> Result<(), String> {
        while let Ok(r) = self.replies_rx.try_recv() {
            let Some(f) = self.inflight.remove(&r.cookie) else { continue };
            if let Some(w) = self.opts.watch_block.filter(|w| f.blocks.iter().any(|(b, _)| b == w)) {
                let v = f.blocks.iter().find(|(b, _)| *b == w).map(|x| x.1);
                let how = match &r.result {
                    Ok(_) => "acknowledged".to_string(),
                    Err(e) => format!("failed: {e}"),
                };
                self.event(format!("watch: v{v:?} to {} (cookie {}) {how}", f.node, r.cookie));
            }
            // A node that lost power sent nothing that arrived, however far it got.
            let alive = self.nodes.get(&f.node).is_some_and(|n| n.live.is_some() && !n.durable.lock().power.is_cut());
            match r.result {
                Ok(_) if alive => {
                    if f.stale {
                        return Err(format!(
                            "node {} lost the volume to a failover, yet acknowledged a write submitted to it afterwards",
                            f.node
                        ));
                    }
                    match self.ack_epochs.get(&f.epoch) {
                        Some(n) if *n != f.node => {
                            return Err(format!(
                                "two nodes acknowledged writes in epoch {}: {n} and {}",
                                f.epoch, f.node
                            ))
                        }
                        Some(_) => {}
                        None => {
                            self.ack_epochs.insert(f.epoch, f.node.clone());
                        }
                    }
                    for (b, v) in &f.blocks {
                        self.model.acked(*b, *v);
                    }
                    self.writes_acked += 1;
                }
                _ => self.writes_failed += 1,
            }
        }
        Ok(())
    }

    /// Reads the whole volume from `node`'s primary, stepping it until it answers.
    pub(super) fn read_volume(&mut self, node: &str) -> Result<Vec<u8>, String> {
        let (tx, rx) = unbounded();
        let len = u32::try_from(BLOCKS * BLOCK_BYTES as u64).expect("small");
        {
            let src = self.live_source(node).ok_or_else(|| format!("node {node} has no running volume to read"))?;
            src.handle.submit(IoRequest::Read { offset: 0, len }, Completer::new(0, tx));
        }
        for _ in 0..1000 {
            if let Ok(r) = rx.try_recv() {
                return r
                    .result
                    .map_err(|e| format!("read of the volume on {node} failed: {e}"))?
                    .ok_or_else(|| "read returned nothing".into());
            }
            let src = self.live_source(node).expect("live");
            src.stepped.step();
        }
        Err(format!("read of the volume on {node} did not complete"))
    }

    /// Every acknowledged write must be on the primary.
    pub(super) fn check_primary(&mut self, when: &str) -> Result<(), String> {
        let primary = self.primary.clone();
        // Not running, or waiting for its mirror's copy of a log it found cut short (it
        // serves nothing meanwhile): checked once it runs again.
        if self.live_source(&primary).is_none_or(|s| s.stepped.status().awaiting_mirror_log) {
            return Ok(());
        }
        let image = self.read_volume(&primary)?;
        let problems = self.model.check_volume(&image, 4);
        self.volume_checks += 1;
        self.blocks_verified += BLOCKS;
        if !problems.is_empty() {
            return Err(format!("{when}, on {primary}: {}", problems.join("; ")));
        }
        self.event(format!(
            "checked {BLOCKS} blocks on {primary} {when}: {} with acknowledged writes",
            self.model.blocks_acked()
        ));
        Ok(())
    }

    // ---- stepping ----

    pub(super) fn client(&mut self) -> Result<(), String> {
        self.drain_replies()?;
        if !self.writing {
            return Ok(());
        }
        let primary = self.primary.clone();
        let mut burst = 0;
        while self.inflight.len() < self.qd && burst < 4 {
            if self.live_source(&primary).is_none() {
                break;
            }
            self.submit(&primary, false);
            burst += 1;
        }
        // Now and then a write reaches a node that lost the volume (a client that did not
        // follow the failover): it must fail.
        if self.rng.gen_ratio(1, 200) {
            let stale: Vec<String> = self.stale.keys().filter(|n| self.is_live(n)).cloned().collect();
            if let Some(n) = stale.choose(&mut self.rng).cloned() {
                if self.live_source(&n).is_some() {
                    self.faults.stale_primary_writes += 1;
                    self.submit(&n, true);
                }
            }
        }
        Ok(())
    }

    /// Reports every change of the watched block on every mirror.
    pub(super) fn watch_mirrors(&mut self, block: u64) {
        let mut seen = Vec::new();
        for (name, n) in &self.nodes {
            let Some(live) = &n.live else { continue };
            for (src, (m, _)) in live.directory.mirrors.lock().iter() {
                let mut buf = vec![0u8; BLOCK_BYTES];
                if m.read(&mut buf, block * BLOCK_BYTES as u64).is_ok() {
                    let v = u64::from_le_bytes(buf[8..16].try_into().expect("8"));
                    seen.push((format!("{name}:{src}"), v, m.meta().applied_cp));
                }
            }
        }
        for (k, v, cp) in seen {
            if self.watched.get(&k) != Some(&v) {
                self.event(format!("watch: mirror {k} block {block} now v{v} (applied CP {cp})"));
                self.watched.insert(k, v);
            }
        }
    }
}
