//! The administrator: failover, failback (delta resync or baseline), switchover, pairing
//! a new mirror; the durable steps are the shipped node core's.

use super::*;

impl World {
    pub(super) fn failover(&mut self, node: &str) -> Result<(), String> {
        if self.mirror.as_deref() != Some(node) {
            return Ok(());
        }
        let old = self.primary.clone();
        let old_refused = self.refused.contains(&old);
        if !self.is_live(node) {
            if old_refused {
                // The primary cannot serve: the failover waits for the mirror's node.
                self.schedule(50 * MS, Action::Failover(node.to_string()));
            }
            return Ok(());
        }
        // The administrator decided while the primary was down and its mirror current. If
        // the primary came back meanwhile and its mirror is no longer current (policy sync
        // went on alone), failing over now would drop writes it acknowledged since: the
        // administrator looks at the status first, and restarts the primary instead.
        if !self.primary_current && self.retry_failover.as_deref() != Some(node) && !old_refused {
            self.event(format!("failover on {node} called off: the mirror is no longer current for {old}"));
            if !self.is_live(&old) {
                self.schedule(MS, Action::Restart(old));
            }
            return Ok(());
        }
        // Under policy sync a primary that is back and serving goes on alone when its link
        // drops: failing over under it would leave two primaries until it hears of the new
        // epoch. The administrator, who decided while it was down, sees it serving and
        // leaves it be (under strict it can acknowledge nothing alone, and the failover
        // goes ahead: the stale primary must refuse writes).
        let serving = self.live_source(&old).is_some_and(|s| s.stepped.status().state != PairState::Fenced);
        if self.policy == Policy::Sync && serving && self.retry_failover.as_deref() != Some(node) && !old_refused {
            self.event(format!("failover on {node} called off: {old} is back and serving (policy sync)"));
            return Ok(());
        }
        let live = self.nodes[node].live.as_ref().expect("live");
        let Some((mirror, _)) = live.directory.mirrors.lock().get(&old).cloned() else { return Ok(()) };
        // The shipped failover: promote (replay), the new epoch's logs, the record, start.
        let result = crate::node::failover(&mut SimEnv { world: self, node: node.to_string() }, &mirror, None);
        let promoted = mirror.meta().promoted;
        drop(mirror);
        let report = match result {
            Ok(r) => r,
            Err(e) if self.nodes[node].durable.lock().power.is_cut() => {
                // It died during the failover: the administrator runs it again once the
                // node is back (it may find the mirror promoted already, or not).
                self.event(format!("failover on {node} cut short by a power cut (promoted: {promoted}): {e}"));
                if promoted {
                    self.faults.failovers += 1;
                }
                self.retry_failover = Some(node.to_string());
                return Ok(());
            }
            Err(e @ (NodeError::Refused(_) | NodeError::Promote(_))) if old_refused => {
                return Err(format!(
                    "the volume on {old} refused to start (the write hole) and its mirror on {node} refused the failover: {e}"
                ));
            }
            Err(e @ (NodeError::Refused(_) | NodeError::Promote(_))) => {
                self.faults.failovers_refused += 1;
                self.event(format!("failover on {node} refused: {e}"));
                self.schedule(MS, Action::Restart(old));
                return Ok(());
            }
            Err(e) => return Err(format!("failover on {node}: {e}")),
        };
        self.faults.failovers += 1;
        self.event(format!(
            "failover on {node}: epoch {}, {} entries replayed up to seq {}{}",
            report.epoch,
            report.entries_replayed,
            report.last_seq,
            if report.stops.is_empty() { String::new() } else { format!(" (stops: {})", report.stops.join("; ")) }
        ));
        self.took_over(node)
    }

    /// The fenced old primary comes back as the new primary's mirror: its own changes
    /// since the last common CP are sent along, and the new primary brings it level by a
    /// delta resync (or a baseline where its change map is not relative to this node).
    pub(super) fn failback(&mut self, old: &str) -> Result<(), String> {
        let primary = self.primary.clone();
        if self.mirror.is_some() {
            return Ok(());
        }
        if self.refused.contains(old) && self.is_live(old) && self.live_source(&primary).is_some() {
            return self.failback_refused(old);
        }
        if self.live_source(&primary).is_none() || self.live_source(old).is_none() {
            self.schedule(50 * MS, Action::Failback(old.to_string()));
            return Ok(());
        }
        // 1. What the old primary holds that the new one may not.
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.live_source(old).expect("live").handle.control(Control::ChangedRegions(tx))?;
        self.live_source(old).expect("live").stepped.step();
        let regions = rx.try_recv().map_err(|_| "the old primary did not answer")?;
        // 2. What the new primary's change map is relative to.
        let status = self.live_source(&primary).expect("live").stepped.status();
        let base = status.changes_since.clone().filter(|b| b.peer == old);
        // 3. The old primary's volume becomes a mirror of the new one, in place.
        let src = self.nodes.get_mut(old).and_then(|n| n.live.as_mut()).and_then(|l| l.source.take()).expect("live");
        let LiveSource { mut stepped, handle, raid, .. } = src;
        handle.stop_stepped();
        stepped.step();
        drop(stepped);
        drop(handle);
        let keys = self.nodes[old].durable.lock().volume.as_ref().map(|v| v.disks.clone()).ok_or("no volume record")?;
        let meta = crate::node::returning_mirror_meta(mirror_meta(&primary, status.epoch), old, base.as_ref(), true);
        self.adopt_mirror(old, meta, raid, keys).map_err(|e| format!("make {old} a mirror of {primary}: {e}"))?;
        self.stale.remove(old);
        // 4. The new primary marks those regions and pairs with it.
        let (tx, rx) = crossbeam_channel::bounded(1);
        let marks = Control::MarkRegions { regions: regions.clone(), reply: tx };
        self.live_source(&primary).expect("live").handle.control(marks)?;
        self.live_source(&primary).expect("live").stepped.step();
        rx.try_recv().map_err(|_| "no answer to MarkRegions".to_string())?.map_err(|e| e.to_string())?;
        self.event(format!(
            "failback: {old} is the mirror of {primary} again ({} of its own regions to copy back; change map {})",
            regions.len(),
            if base.is_some() { "relative to it: a delta resync" } else { "not relative to it: a baseline" }
        ));
        if base.is_some() {
            self.faults.failbacks_delta += 1;
        } else {
            self.faults.failbacks_baseline += 1;
        }
        self.mirror = Some(old.to_string());
        self.attach(old);
        Ok(())
    }

    /// The old primary's volume refused to start (the write hole): it becomes the new
    /// primary's mirror all the same, its storage opened for a copy and inconsistent, and
    /// the new primary copies it over whole (a baseline). Its own changes since the last
    /// common CP cannot be read, and need not be: the failover replayed every
    /// acknowledged one.
    pub(super) fn failback_refused(&mut self, old: &str) -> Result<(), String> {
        let primary = self.primary.clone();
        let epoch = self.live_source(&primary).expect("checked").epoch;
        let keys = self.nodes[old].durable.lock().volume.as_ref().map(|v| v.disks.clone()).ok_or("no volume record")?;
        let raid = open_raid(&self.nodes[old].durable, &keys, false, crate::raid::WriteHole::Accept)
            .map_err(|e| format!("open the refused volume on {old} for a copy: {e}"))?;
        // Its own changes cannot be read (the volume did not start): a baseline.
        let meta = crate::node::returning_mirror_meta(mirror_meta(&primary, epoch), old, None, false);
        let failed = raid.status().members.iter().position(|m| m.state != "in-sync");
        let prefix = volume_prefix(&raid);
        self.adopt_mirror(old, meta, raid, keys).map_err(|e| format!("make {old} a mirror of {primary}: {e}"))?;
        self.stale.remove(old);
        self.refused.remove(old);
        if let Some(member) = failed {
            // The failed disk is replaced too, once the copy has rewritten every row.
            self.nodes.get_mut(old).expect("node").disk_damage += 1;
            self.schedule(100 * MS, Action::ReplaceDisk { node: old.to_string(), member, volume: prefix });
        }
        self.faults.failbacks_baseline += 1;
        self.event(format!("failback: {old}, whose volume refused to start, is the mirror of {primary}: a baseline"));
        self.mirror = Some(old.to_string());
        self.attach(old);
        Ok(())
    }

    /// Makes `raid` (with its disks `keys`) on `node`, its primary volume until now, the
    /// mirror that `meta` describes (the shipped code that does so).
    pub(super) fn adopt_mirror(
        &mut self,
        node: &str,
        meta: MirrorMeta,
        raid: Arc<Raid4>,
        keys: Vec<String>,
    ) -> io::Result<()> {
        let fence = self.nodes[node].durable.lock().volume.as_ref().map_or(0, |v| v.epoch);
        crate::node::adopt_as_mirror(&mut SimEnv { world: self, node: node.to_string() }, meta, (raid, keys), fence)
            .map(drop)
            .map_err(io::Error::other)
    }

    /// A planned switchover from the primary to its mirror, under load: the primary drains
    /// and brings the mirror level, hands its queued requests over, becomes the mirror; the
    /// mirror takes the volume up with nothing to replay, and the pair resumes the other
    /// way round with nothing to copy.
    pub(super) fn switchover(&mut self, deadline: u64) -> Result<(), String> {
        let (a, b) = (self.primary.clone(), self.mirror.clone().ok_or("no mirror")?);
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.live_source(&a).ok_or("no primary")?.handle.control(Control::Quiesce(tx))?;
        let (cp, next_seq) = loop {
            if let Ok(r) = rx.try_recv() {
                match r {
                    Ok(x) => break x,
                    Err(e) => {
                        self.event(format!("switchover {a} -> {b} refused: {e}"));
                        return Ok(());
                    }
                }
            }
            if self.clock.now_ns() > deadline {
                return Err(format!("liveness: the switchover's quiesce on {a} did not complete"));
            }
            self.tick()?;
        };
        let meta = self.mirror_meta(&b).ok_or("no mirror meta")?;
        if meta.applied_cp != cp || meta.applied_seq + 1 != next_seq || !meta.consistent {
            return Err(format!(
                "switchover: {a} quiesced at CP {cp}, next sequence {next_seq}, but the mirror on {b} holds {meta:?}"
            ));
        }
        // The primary stops; what waited in its queue goes to the new primary.
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.live_source(&a).expect("live").handle.control(Control::Handover(tx))?;
        self.live_source(&a).expect("live").stepped.step();
        let queued = rx.try_recv().map_err(|_| "no handover")?;
        let src = self.nodes.get_mut(&a).and_then(|n| n.live.as_mut()).and_then(|l| l.source.take()).expect("live");
        let raid_a = src.raid.clone();
        drop(src);
        // The old primary becomes the mirror, then the mirror takes over (the shipped
        // takeover: nothing to replay), in the order the daemon's switchover runs them.
        let mirror = self.nodes[&b].live.as_ref().expect("live").directory.mirrors.lock().get(&a).cloned();
        let (mirror, _) = mirror.ok_or("mirror")?;
        let keys_a = self.nodes[&a].durable.lock().volume.as_ref().map(|v| v.disks.clone()).ok_or("no volume")?;
        let meta_a = crate::node::switched_mirror_meta(mirror_meta(&b, meta.epoch + 1), cp, next_seq);
        self.adopt_mirror(&a, meta_a, raid_a, keys_a).map_err(|e| format!("switchover: make {a} the mirror: {e}"))?;
        let report = crate::node::takeover(&mut SimEnv { world: self, node: b.clone() }, &mirror, cp, next_seq)
            .map_err(|e| format!("switchover: take over on {b}: {e}"))?;
        drop(mirror);
        if report.entries_replayed != 0 {
            return Err(format!(
                "switchover: the mirror on {b} replayed {} entries after a full CP",
                report.entries_replayed
            ));
        }
        self.primary = b.clone();
        self.mirror = Some(a.clone());
        // As the daemon's takeover does: the pair resumes the other way round before the
        // requests that waited go to the new primary (a write would find its link down).
        while self.clock.now_ns() <= deadline
            && self.live_source(&b).is_some_and(|s| s.stepped.status().state != PairState::InSync)
        {
            self.tick()?;
        }
        // The requests that waited on the old primary are answered by the new one.
        let epoch = report.epoch;
        let n = queued.len();
        for (request, done) in queued {
            self.live_source(&b).expect("started").handle.submit(request, done);
        }
        for f in self.inflight.values_mut() {
            if f.node == a {
                f.node.clone_from(&b);
                f.epoch = epoch;
            }
        }
        self.faults.switchovers += 1;
        self.event(format!("switchover {a} -> {b}: epoch {epoch}, CP {cp}, {n} queued requests handed over"));
        self.check_primary("after the switchover")
    }

    /// `node` is the volume's primary now.
    pub(super) fn took_over(&mut self, node: &str) -> Result<(), String> {
        let old = self.primary.clone();
        self.stale.insert(old.clone(), self.clock.now_ns());
        self.primary = node.to_string();
        self.mirror = None;
        // Writes in flight to the old primary are its business now: the client gave up.
        for f in self.inflight.values_mut() {
            if f.node == old {
                f.node = String::new();
            }
        }
        self.check_primary("after the failover")?;
        let after = self.rng.gen_range(10 * MS..300 * MS);
        self.schedule(after, Action::PairNew);
        Ok(())
    }

    pub(super) fn pair_new(&mut self) {
        if self.mirror.is_some() {
            return;
        }
        // Half the time the old primary comes back (failback), else a fresh node.
        let old = self.stale.iter().max_by_key(|(_, t)| **t).map(|(n, _)| n.clone());
        if let Some(old) = old.filter(|_| self.rng.gen_bool(0.5) || self.nodes.len() >= NODES_MAX) {
            self.schedule(0, Action::Failback(old));
            return;
        }
        if self.nodes.len() >= NODES_MAX {
            return;
        }
        let primary = self.primary.clone();
        if self.live_source(&primary).is_none() {
            // `ctl mirror` needs the primary up: the administrator tries again later.
            self.schedule(50 * MS, Action::PairNew);
            return;
        }
        let n = self.add_node();
        self.mirror = Some(n.clone());
        self.attach(&n);
    }

    // ---- faults ----
}
