//! Fault injection: power cuts (on degraded volumes too), bit flips in acknowledged
//! NVLog entries, disk faults and replacements, scrubs.

use super::*;

impl World {
    pub(super) fn inject(&mut self) -> Result<(), String> {
        // About one fault every 40 ticks of ~0.3 ms: a dozen or more a simulated second.
        if !self.rng.gen_ratio(1, 40) {
            return Ok(());
        }
        let primary = self.primary.clone();
        let mirror = self.mirror.clone();
        match self.rng.gen_range(0..100) {
            0..14 => self.cut_power(&primary)?,
            14..26 => {
                if let Some(m) = mirror {
                    self.cut_power(&m)?;
                }
            }
            26..44 => {
                let Some(m) = mirror else { return Ok(()) };
                let how = [Cut::Stall, Cut::Reset, Cut::Drop][self.rng.gen_range(0..3)];
                match how {
                    Cut::Stall => self.faults.link_stalls += 1,
                    Cut::Reset => self.faults.link_resets += 1,
                    Cut::Drop => self.faults.link_drops += 1,
                }
                self.net.cut(&primary, &m, how);
                let len = if self.rng.gen_ratio(1, 6) {
                    self.rng.gen_range(2 * SEC..4 * SEC)
                } else {
                    self.rng.gen_range(5 * MS..800 * MS)
                };
                self.event(format!("link {primary}-{m} cut ({how:?}) for {} ms", len / MS));
                self.schedule(len, Action::Heal(primary, m));
            }
            44..56 => {
                let f = FrameFaults {
                    drop_ppm: self.rng.gen_range(0..20_000),
                    duplicate_ppm: self.rng.gen_range(0..20_000),
                    reorder_ppm: self.rng.gen_range(0..20_000),
                };
                self.faults.frame_fault_windows += 1;
                self.net.set_faults(f);
                let len = self.rng.gen_range(5 * MS..300 * MS);
                self.event(format!("frame faults {f:?} for {} ms", len / MS));
                self.schedule(len, Action::FramesClean);
            }
            56..64 => {
                let j = self.rng.gen_range(200 * MS..3 * SEC);
                self.faults.clock_jumps += 1;
                self.clock.advance(j);
                self.event(format!("clock jumped {} ms forward", j / MS));
            }
            64..67 => self.nvram_flip()?,
            67..100 => self.disk_fault()?,
            _ => unreachable!(),
        }
        Ok(())
    }

    pub(super) fn cut_power(&mut self, node: &str) -> Result<(), String> {
        let Some(n) = self.nodes.get(node) else { return Ok(()) };
        if n.live.is_none() {
            return Ok(());
        }
        if n.disk_damage > 0 {
            return self.cut_power_degraded(node);
        }
        if self.degraded_cut_pending() {
            return Ok(());
        }
        let d = n.durable.lock();
        if d.power.armed() {
            return Ok(());
        }
        self.faults.power_cuts += 1;
        if self.rng.gen_bool(0.3) {
            d.power.cut_now();
            drop(d);
            self.event(format!("node {node}: power cut"));
        } else {
            let ops = self.rng.gen_range(1..400);
            d.power.cut_after(ops);
            drop(d);
            self.event(format!("node {node}: power to be cut at its {ops}th durable operation from now"));
        }
        Ok(())
    }

    /// Cuts the power of a node whose RAID-4 volume is degraded (a member lost or failing,
    /// not yet replaced), now: if writes were in flight, the volume is dirty and degraded
    /// at restart, the RAID write hole. A primary's volume must then refuse to start with
    /// a clear error, and the administrator fails over to the mirror, which holds every
    /// acknowledged write; a mirror's storage is opened for a copy over it, inconsistent.
    /// Never garbage: every check of the run holds. Only where the other site holds every
    /// acknowledged write, so that the crash is the second fault and not the third.
    pub(super) fn cut_power_degraded(&mut self, node: &str) -> Result<(), String> {
        let primary_side = node == self.primary;
        if !primary_side && self.mirror.as_deref() != Some(node) {
            return Ok(());
        }
        // One site at a time: the other is up, and no cut is coming to it.
        let others_whole =
            self.nodes.iter().all(|(k, n)| k == node || (n.live.is_some() && !n.durable.lock().power.armed()));
        if !others_whole || self.nodes[node].durable.lock().power.armed() {
            return Ok(());
        }
        let Some(raid) = self.raid_of(node, !primary_side) else { return Ok(()) };
        if !raid.status().degraded {
            return Ok(());
        }
        if primary_side {
            let Some(mirror) = self.mirror.clone() else { return Ok(()) };
            let mirror_whole = self.nodes[&mirror].disk_damage == 0;
            let can_fail_over = self.primary_current && self.nodes.len() < NODES_MAX && mirror_whole;
            if !can_fail_over || self.mirror_holds_every_ack().is_none() {
                return Ok(());
            }
        } else {
            // The primary holds every acknowledged write, whole.
            let p = self.primary.clone();
            let healthy = self.nodes[&p].disk_damage == 0 && self.live_source(&p).is_some();
            if !healthy {
                return Ok(());
            }
        }
        self.faults.power_cuts += 1;
        self.faults.degraded_crashes += 1;
        self.degraded_crashed.insert(node.to_string());
        let side = if primary_side { "its volume" } else { "its mirror" };
        // The write hole opens only with writes in flight: mostly the cut comes at one of
        // the next durable operations (a CP's write-out or application, likely), where
        // the other site holds every acknowledged write however long that takes: a
        // mirror's cut (the primary holds them), or a primary's under policy strict (it
        // acknowledges nothing its mirror does not hold). Otherwise now.
        if (!primary_side || self.policy == Policy::Strict) && self.rng.gen_bool(0.75) {
            let ops = self.rng.gen_range(1..64);
            self.nodes[node].durable.lock().power.cut_after(ops);
            self.event(format!(
                "node {node}: power to be cut at its {ops}th durable operation from now, while {side} is degraded"
            ));
            return Ok(());
        }
        self.nodes[node].durable.lock().power.cut_now();
        self.event(format!("node {node}: power cut while {side} is degraded"));
        self.crash(node)?;
        self.after_crash(node);
        Ok(())
    }

    /// Whether the primary's mirror is up and consistent (able to take over, or to serve
    /// its logs) and holds every write the primary acknowledged, the pair in sync: the
    /// sequence number acknowledged up to, if so.
    pub(super) fn mirror_holds_every_ack(&mut self) -> Option<u64> {
        let primary = self.primary.clone();
        let mirror = self.mirror.clone()?;
        if !self.is_live(&mirror) || !self.mirror_consistent(&mirror) {
            return None;
        }
        let st = self.live_source(&primary)?.stepped.status();
        (st.state == PairState::InSync && st.acked_seq <= st.mirror_acked_seq).then_some(st.acked_seq)
    }

    /// A node's power is to be cut at a coming durable operation while one of its volumes
    /// is degraded: no other site may fail meanwhile (that is the third fault).
    pub(super) fn degraded_cut_pending(&self) -> bool {
        self.degraded_crashed.iter().any(|k| self.nodes.get(k).is_some_and(|n| n.durable.lock().power.armed()))
    }

    /// Flips a bit of an acknowledged entry in the primary's NVLog, one the mirror holds as
    /// well, as the primary's power is cut: recovery must find the entry damaged and say
    /// so, and the mirror's copy must serve (no acknowledged write may be missing once the
    /// pair has resumed). The entry is in the active partition: the mirror applies nothing
    /// of it before the source's CP.
    pub(super) fn nvram_flip(&mut self) -> Result<(), String> {
        let primary = self.primary.clone();
        if !self.is_live(&primary) || self.degraded_cut_pending() {
            return Ok(());
        }
        {
            let n = &self.nodes[&primary];
            if n.disk_damage > 0 || n.durable.lock().power.armed() {
                return Ok(());
            }
        }
        // Recovery reads a log up to its first damaged entry and never past it: every
        // acknowledged entry after the flipped one must be on the mirror too, and the
        // mirror able to serve it. Under policy sync with the mirror away, writes
        // acknowledged alone have one copy by the policy's own terms, and a flip before
        // them is a double fault.
        let Some(safe) = self.mirror_holds_every_ack() else { return Ok(()) };
        let Some(epoch) = self.live_source(&primary).map(|s| s.epoch) else { return Ok(()) };
        self.faults.power_cuts += 1;
        self.nodes[&primary].durable.lock().power.cut_now();
        self.crash(&primary)?;
        let media = self.nodes[&primary].durable.lock().nvram.get(&format!("{VOLUME}.{epoch}.nvlog")).cloned();
        let target = media.as_ref().and_then(|m| {
            let image = m.lock().durable().to_vec();
            let scans: Vec<(usize, crate::format::PartitionScan)> = [0u8, 1]
                .into_iter()
                .map(|p| {
                    let base = NvLog::<SimNvram>::partition_base(p, PARTITION_BYTES);
                    (base, crate::format::scan_partition(&image[base..base + PARTITION_BYTES], p))
                })
                .collect();
            let (base, scan) = scans
                .into_iter()
                .filter(|(_, s)| s.header.is_some())
                .max_by_key(|(_, s)| s.header.map(|h| h.cp_gen))?;
            let candidates: Vec<_> = scan.entries.iter().filter(|e| e.header.seq <= safe).copied().collect();
            Some((base, candidates))
        });
        match (media, target) {
            (Some(m), Some((base, candidates))) if !candidates.is_empty() => {
                let e = candidates[self.rng.gen_range(0..candidates.len())];
                let span = crate::format::ENTRY_HEADER_BYTES + e.header.data_len as usize;
                let at = base + e.at + self.rng.gen_range(0..span);
                let bit = self.rng.gen_range(0..8);
                m.lock().flip_bit(at, bit);
                self.faults.nvram_bit_flips += 1;
                self.event(format!(
                    "node {primary}: power cut, and bit {bit} of NVLog entry {} (acknowledged, on the mirror too: \
                     in-sync, mirror acknowledged up to {safe}) flipped at region offset {at}",
                    e.header.seq
                ));
            }
            _ => self.event(format!("node {primary}: power cut (no acknowledged entry in the log to flip)")),
        }
        self.after_crash(&primary);
        Ok(())
    }

    /// The RAID volume a disk fault may hit: the primary's, or the mirror's on its node.
    pub(super) fn disk_fault(&mut self) -> Result<(), String> {
        let mirror_side = self.rng.gen_bool(0.5);
        let node = if mirror_side { self.mirror.clone() } else { Some(self.primary.clone()) };
        let Some(node) = node else { return Ok(()) };
        let Some(raid) = self.raid_of(&node, mirror_side) else { return Ok(()) };
        let n = &self.nodes[&node];
        if n.disk_damage > 0 || n.durable.lock().power.armed() || raid.status().degraded {
            return Ok(());
        }
        // A mirror that a crash left in the middle of a copy holds rows only the rest of
        // the copy rewrites: a disk fault on top is a second fault.
        if mirror_side && !self.mirror_meta(&node).is_some_and(|m| m.consistent) {
            return Ok(());
        }
        let geo = raid.geometry();
        let member = self.rng.gen_range(0..geo.members());
        let key = disk_key(&raid, member);
        let prefix = volume_prefix(&raid);
        let media = n.durable.lock().disks.get(&key).cloned().ok_or("no media for a member")?;
        let kind = self.rng.gen_range(0..3);
        let side = if mirror_side { "mirror" } else { "volume" };
        self.nodes.get_mut(&node).expect("node").disk_damage += 1;
        match kind {
            0 => {
                let offset = self.rng.gen_range(geo.data_offset()..geo.member_bytes());
                let bit = self.rng.gen_range(0..8);
                media.lock().flip_bit(offset, bit);
                *self.flips.entry((node.clone(), prefix)).or_default() += 1;
                self.faults.disk_bit_flips += 1;
                self.event(format!("node {node}: {side} member {member}: bit {bit} flipped at {offset}"));
            }
            1 => {
                media.lock().read_errors = self.rng.gen_range(1..3);
                self.faults.disk_read_errors += 1;
                self.event(format!("node {node}: {side} member {member}: read errors"));
                let after = self.rng.gen_range(20 * MS..400 * MS);
                self.schedule(after, Action::ReplaceDisk { node, member, volume: prefix });
            }
            _ => {
                media.lock().lost = true;
                self.faults.disks_lost += 1;
                self.event(format!("node {node}: {side} member {member}: disk lost"));
                let after = self.rng.gen_range(20 * MS..400 * MS);
                self.schedule(after, Action::ReplaceDisk { node, member, volume: prefix });
            }
        }
        Ok(())
    }

    /// The RAID volume on `node` whose disks are named under `prefix`.
    pub(super) fn raid_by_prefix(&self, node: &str, prefix: &str) -> Option<Arc<Raid4>> {
        let live = self.nodes.get(node)?.live.as_ref()?;
        let mut all: Vec<Arc<Raid4>> = live.directory.mirrors.lock().values().map(|(_, r)| r.clone()).collect();
        all.extend(live.source.as_ref().map(|s| s.raid.clone()));
        all.into_iter().find(|r| volume_prefix(r) == prefix)
    }

    pub(super) fn raid_of(&self, node: &str, mirror_side: bool) -> Option<Arc<Raid4>> {
        let live = self.nodes.get(node)?.live.as_ref()?;
        if mirror_side {
            let m = live.directory.mirrors.lock().get(&self.primary).map(|(_, r)| r.clone());
            m
        } else {
            live.source.as_ref().map(|s| s.raid.clone())
        }
    }

    /// The disk fault is dealt with: read errors end; a member that failed (or fails under
    /// a scrub) is replaced and rebuilt; then the volume must scrub clean.
    pub(super) fn replace_disk(&mut self, node: &str, member: usize, volume: &str) -> Result<(), String> {
        if self.nodes.get(node).is_some_and(|n| n.durable.lock().power.armed()) {
            // Its power is to be cut at a coming durable operation (a degraded crash): the
            // administrator is not that quick.
            self.schedule(100 * MS, Action::ReplaceDisk { node: node.to_string(), member, volume: volume.to_string() });
            return Ok(());
        }
        if !self.is_live(node) && self.degraded_crashed.contains(node) {
            // Crashed with the member still failed: it is replaced once the node is back.
            self.schedule(100 * MS, Action::ReplaceDisk { node: node.to_string(), member, volume: volume.to_string() });
            return Ok(());
        }
        let Some(raid) = self.raid_by_prefix(node, volume) else {
            // The volume moved (failover) or its node is down: the damage went with it.
            if let Some(n) = self.nodes.get_mut(node) {
                n.disk_damage = n.disk_damage.saturating_sub(1);
            }
            return Ok(());
        };
        if raid.write_hole_found() && raid.status().degraded && !self.copied_over(node, &raid) {
            // Rows the write hole left out of step cannot be rebuilt (the rebuild says so):
            // the disk is replaced once the copy over them has rewritten every row.
            self.schedule(100 * MS, Action::ReplaceDisk { node: node.to_string(), member, volume: volume.to_string() });
            return Ok(());
        }
        if let Some(media) = self.nodes[node].durable.lock().disks.get(&disk_key(&raid, member)) {
            media.lock().read_errors = 0;
        }
        if !raid.status().degraded {
            // Whatever was not read yet: a scrub reads everything.
            raid.scrub(None).map_err(|e| format!("scrub on {node}: {e}"))?;
            self.scrubs += 1;
        }
        if let Some(failed) = raid.status().members.iter().position(|m| m.state != "in-sync") {
            let old = disk_key(&raid, failed);
            let new = format!("{old}.r{}", self.ticks);
            let (media, power) = {
                let mut d = self.nodes[node].durable.lock();
                (d.disk(&new, raid.geometry().member_bytes()), d.power.clone())
            };
            let dev: Arc<dyn BlockDevice> = Arc::new(SimDisk::new(media, power));
            raid.replace_member_device(failed, &disk_spec(&new), dev)
                .map_err(|e| format!("replace member {failed} on {node}: {e}"))?;
            raid.rebuild(None).map_err(|e| format!("rebuild member {failed} on {node}: {e}"))?;
            // Every record naming the old disk names the new one.
            {
                let mut d = self.nodes[node].durable.lock();
                let d = &mut *d;
                for keys in d.mirror_disks.values_mut().chain(d.volume.as_mut().map(|v| &mut v.disks)) {
                    for k in keys.iter_mut().filter(|k| **k == old) {
                        k.clone_from(&new);
                    }
                }
            }
            self.faults.disks_replaced += 1;
            self.event(format!("node {node}: member {failed} replaced by {new} and rebuilt"));
        }
        let n = self.nodes.get_mut(node).expect("node");
        n.disk_damage = n.disk_damage.saturating_sub(1);
        if raid.write_hole_found() {
            // Rows the write hole left out of step are rewritten by the copy under way:
            // the scrub waits for it (the settle scrubs once the mirror is consistent).
            self.event(format!("node {node}: scrub deferred until the copy over the write hole completes"));
            return Ok(());
        }
        self.scrub_clean(node, &raid, "after a disk fault")
    }

    /// Whether the mirror on `node` driving `raid` is consistent again (a copy over it
    /// completed).
    pub(super) fn copied_over(&self, node: &str, raid: &Arc<Raid4>) -> bool {
        let Some(live) = self.nodes.get(node).and_then(|n| n.live.as_ref()) else { return false };
        let mirrors = live.directory.mirrors.lock();
        mirrors.values().any(|(m, r)| Arc::ptr_eq(r, raid) && m.meta().consistent)
    }

    /// Scrubs a RAID volume: it may repair what the simulator damaged; a second scrub must
    /// then find nothing at all.
    pub(super) fn scrub_clean(&mut self, node: &str, raid: &Raid4, when: &str) -> Result<(), String> {
        let first = raid.scrub(None).map_err(|e| format!("scrub on {node} {when}: {e}"))?;
        let second = raid.scrub(None).map_err(|e| format!("scrub on {node} {when}: {e}"))?;
        self.scrubs += 2;
        let flipped = self.flips.remove(&(node.to_string(), volume_prefix(raid))).unwrap_or(0);
        let found = first.checksum_errors + first.parity_mismatches + first.checksums_corrected;
        if first.unrecoverable > 0
            || found > flipped
            || second.checksum_errors + second.parity_mismatches + second.unrecoverable + second.checksums_corrected > 0
        {
            return Err(format!(
                "scrub on {node} {when} ({flipped} bits flipped since the last): first {first:?}; second {second:?}"
            ));
        }
        self.event(format!(
            "scrub on {node} {when}: {} checksum errors, {} parity mismatches repaired; then clean",
            first.checksum_errors, first.parity_mismatches
        ));
        Ok(())
    }

    // ---- phases ----
}
