//! Role changes as the daemon runs them: failover, switchover (the primary's half, and the
//! takeover on the mirror), resync of a failed-over primary; the durable steps are the
//! node core's (`nvmirror_dataplane::node`).

use super::*;

/// The export of a volume that moved away: every request fails, saying where it went.
struct Moved(String);

impl Export for Moved {
    fn size(&self) -> u64 {
        0
    }
    fn read_only(&self) -> bool {
        true
    }
    fn submit(&self, _request: IoRequest, done: Completer) {
        done.complete(Err(io::Error::other(self.0.clone())));
    }
}

/// What `resync` started.
#[derive(Debug, Serialize, Deserialize)]
pub struct ResyncStarted {
    pub primary: String,
    /// A delta resync (else a baseline).
    pub delta: bool,
    /// Regions this node held that the new primary may not, copied back with its own.
    pub regions_here: u64,
    /// Only the checks ran (`--dry-run`): nothing changed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// What a failover or switchover would do (`--dry-run`): nothing changed.
#[derive(Debug, Serialize, Deserialize)]
pub struct RoleChangePlan {
    pub volume: String,
    /// The node that would be the primary.
    pub new_primary: String,
    /// The epoch it would be at.
    pub epoch: u64,
    /// Log entries past the mirror's last applied CP, replayed as the mirror is promoted.
    pub entries_to_replay: u64,
    /// What else the change would do (a source still connected is fenced...).
    pub notes: Vec<String>,
}

/// What a switchover did.
#[derive(Debug, Serialize, Deserialize)]
pub struct SwitchoverReport {
    pub new_primary: String,
    pub epoch: u64,
    pub cp: u64,
    pub requests_handed_over: u64,
    pub duration_ms: u64,
}

/// Regions as `(first, count)` runs, at most [`RESYNC_RANGES_MAX`] of them
/// (neighbouring runs merge, copying a little more, where there would be more).
pub fn region_ranges(regions: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &r in regions {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == r => *n += 1,
            _ => runs.push((r, 1)),
        }
    }
    while runs.len() > RESYNC_RANGES_MAX {
        // Merge the pair with the smallest gap.
        let i = (0..runs.len() - 1).min_by_key(|&i| runs[i + 1].0 - (runs[i].0 + runs[i].1)).expect("two runs");
        let (f, _) = runs[i];
        let (g, m) = runs.remove(i + 1);
        runs[i].1 = g + m - f;
    }
    runs
}

impl Node {
    /// Fails the mirror of `name` over to this node and serves it as a writable primary.
    pub fn failover(&self, name: &str) -> Result<PromoteReport> {
        self.failover_at(name, None)
    }

    /// As [`Node::failover`], the new epoch at least `epoch` where given (a fencing token).
    pub fn failover_at(&self, name: &str, epoch: Option<u64>) -> Result<PromoteReport> {
        // One failover at a time on this node: the checks below and the promotion are one
        // step.
        let _one = self.failover_lock.lock();
        let mirror = self.failover_candidate(name)?;
        let report = core::failover(&mut FileEnv::new(self, None), &mirror, epoch)?;
        self.events.push(
            "failover",
            Some(name),
            serde_json::json!({ "epoch": report.epoch, "entries_replayed": report.entries_replayed, "stops": report.stops }),
        );
        Ok(report)
    }

    /// The mirror a failover of `name` here would promote.
    fn failover_candidate(&self, name: &str) -> Result<Arc<Mirror>> {
        if self.volumes.read().contains_key(name) {
            bail!("volume {name} is already a primary on this node");
        }
        let mirrors = self.mirrors.read();
        let found: Vec<_> = mirrors.iter().filter(|((_, v), m)| v == name && !m.meta().promoted).collect();
        match found.as_slice() {
            [] => Err(NotFound(format!("no mirror of volume {name} on this node")).into()),
            [(_, m)] => Ok((*m).clone()),
            _ => bail!("mirrors of several volumes named {name} live here"),
        }
    }

    /// What a failover of `name` here would do, changing nothing (`failover --dry-run`):
    /// the checks of a failover, the epoch it would raise, the entries it would replay.
    pub fn failover_plan(&self, name: &str) -> Result<RoleChangePlan> {
        let m = self.failover_candidate(name)?.status();
        if !m.consistent {
            return Err(nvmirror_dataplane::destination::MirrorError::Inconsistent { volume: name.into() }.into());
        }
        let mut notes = Vec::new();
        if m.connected {
            notes.push(format!(
                "{} is still connected: it is fenced by the new epoch and its clients' writes fail from then on",
                m.source_node
            ));
        }
        Ok(RoleChangePlan {
            volume: name.into(),
            new_primary: self.cfg.name.clone(),
            epoch: m.epoch + 1,
            entries_to_replay: m.persisted_seq.saturating_sub(m.applied_seq),
            notes,
        })
    }

    /// What a switchover of `name` would do, changing nothing (`switchover --dry-run`).
    pub fn switchover_plan(&self, name: &str) -> Result<RoleChangePlan> {
        let (rec, target) = self.switchover_checks(name)?;
        let peer = self.cfg.peers.info(&target.peer_control)?;
        Ok(RoleChangePlan {
            volume: name.into(),
            new_primary: peer.name,
            epoch: rec.epoch + 1,
            entries_to_replay: 0,
            notes: Vec::new(),
        })
    }

    /// A switchover's checks: the volume is a primary here, mirrored, and in sync.
    fn switchover_checks(&self, name: &str) -> Result<(VolumeRecord, MirrorTarget)> {
        let handle = self.volume(name)?;
        let rec = self.volume_record(name)?;
        let target = rec.mirror.clone().ok_or_else(|| anyhow!("volume {name} is not mirrored"))?;
        let st = handle.status().map_err(|e| anyhow!(e))?;
        if st.state != PairState::InSync || !st.mirror_current {
            bail!(
                "volume {name} is {} (mirror current: {}): a switchover needs the pair in sync",
                st.state,
                st.mirror_current
            );
        }
        Ok((rec, target))
    }

    /// Makes this node's volume `name` (stopped by the caller) the mirror that `meta`
    /// describes, in place on its storage, with fresh log files. The volume record goes;
    /// so do promoted mirrors of earlier failovers on the same storage (one RAID volume
    /// drives a set of disks); the epochs they knew stay as fences.
    /// Makes `storage`, primary volume `name` here until now, the mirror `meta` describes
    /// (the node core's adoption, the one the simulator runs).
    pub(super) fn adopt_as_mirror(&self, storage: &VolumeStorage, meta: MirrorMeta, fence_epoch: u64) -> Result<()> {
        core::adopt_as_mirror(&mut FileEnv::new(self, None), meta, storage.clone(), fence_epoch)?;
        Ok(())
    }

    /// `ctl resync VOL --from PRIMARY`, on a node that lost `name` to a failover: the
    /// volume becomes the new primary's mirror in place, and the new primary brings it
    /// level with a delta resync of what either side changed since their last common CP
    /// (a baseline, where its change map is not relative to this node). A volume that could
    /// not start here (its storage dirty and degraded after a crash: the RAID-4 write hole)
    /// becomes the mirror all the same, its storage opened for the copy, by a baseline.
    /// With `dry_run`, the checks alone, and what it would copy (nothing changes).
    pub fn resync_from(&self, name: &str, primary_control: &str, dry_run: bool) -> Result<ResyncStarted> {
        let handle = match self.volume(name) {
            Ok(h) => Some(h),
            Err(e) if self.unstarted.lock().iter().any(|(v, _)| v == name) => {
                tracing::warn!(
                    "node {}: volume {name} is not running ({e:#}): it takes a baseline copy",
                    self.cfg.name
                );
                None
            }
            Err(e) => return Err(e),
        };
        let rec = self.volume_record(name)?;
        let (volume_id, epoch) = match &handle {
            Some(h) => {
                let st = h.status().map_err(|e| anyhow!(e))?;
                (st.volume_id, st.epoch)
            }
            None => (rec.volume_id, rec.epoch),
        };
        let peer = self.cfg.peers.info(primary_control)?;
        if peer.name == self.cfg.name {
            bail!("{primary_control} is this node");
        }
        let status = self.cfg.peers.status(primary_control)?;
        let empty = Vec::new();
        let theirs = status["volumes"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .find(|v| v["volume"] == name)
            .ok_or_else(|| {
                anyhow!("{} holds no primary volume {name}: resync needs the node that took it over", peer.name)
            })?
            .clone();
        if theirs["volume_id"].as_u64() != Some(volume_id) {
            bail!("{}'s volume {name} is another volume (a different id)", peer.name);
        }
        let their_epoch = theirs["epoch"].as_u64().unwrap_or(0);
        if their_epoch <= epoch {
            bail!(
                "{} holds {name} at epoch {their_epoch}, this node at {epoch}: it did not take the volume over from \
                 here (for a planned change of roles, use switchover)",
                peer.name
            );
        }
        if theirs["state"] == "fenced" {
            bail!("{}'s volume {name} is fenced itself: resync from the current primary", peer.name);
        }
        let policy: Policy = serde_json::from_value(theirs["policy"].clone()).unwrap_or_default();
        // The new primary's change map is relative to a node's CP; a volume here that did not
        // start cannot say what it changed: everything is copied.
        let base: Option<nvmirror_dataplane::log::ChangeBase> =
            serde_json::from_value(theirs["changes_since"].clone()).ok().flatten();
        // What this node holds that the new primary may not.
        let regions = match &handle {
            Some(handle) => {
                let (tx, rx) = bounded(1);
                handle.control(Control::ChangedRegions(tx)).map_err(|e| anyhow!(e))?;
                rx.recv_timeout(Duration::from_secs(30)).map_err(|_| anyhow!("volume poller did not answer"))?
            }
            None => Vec::new(),
        };
        let meta = MirrorMeta::new(&Hello {
            source_node: peer.name.clone(),
            volume: name.to_string(),
            volume_id: rec.volume_id,
            epoch: their_epoch,
            volume_bytes: rec.size,
            partition_bytes: rec.partition_bytes as u64,
            intent: Intent::Resync,
            base_seq: 0,
            base_cp_gen: 0,
            features: 0,
        });
        let meta = core::returning_mirror_meta(meta, &self.cfg.name, base.as_ref(), handle.is_some());
        let delta = meta.resyncing;
        if dry_run {
            return Ok(ResyncStarted { primary: peer.name, delta, regions_here: regions.len() as u64, dry_run: true });
        }
        if let Some(handle) = &handle {
            handle.stop();
        }
        self.volumes.write().remove(name);
        let _ = fs::remove_file(self.nvlog_path(name, rec.epoch));
        self.adopt_as_mirror(&rec.storage, meta, rec.epoch)?;
        self.unstarted.lock().retain(|(v, _)| v != name);
        tracing::warn!(
            "node {}: volume {name} is now the mirror of {} ({} regions of its own to copy back; {})",
            self.cfg.name,
            peer.name,
            regions.len(),
            if delta { "delta resync" } else { "the new primary's change map is not relative to this node: baseline" }
        );
        let ranges = region_ranges(&regions);
        self.cfg.peers.mirror(
            primary_control,
            name,
            &MirrorRequest {
                to: self.cfg.control.to_string(),
                transport: "tcp".into(),
                policy: policy.as_str().into(),
                resync_ranges: ranges,
                rate: None,
            },
        )?;
        self.events.push(
            "resync-started",
            Some(name),
            serde_json::json!({ "primary": peer.name, "delta": delta, "regions_here": regions.len() }),
        );
        Ok(ResyncStarted { primary: peer.name, delta, regions_here: regions.len() as u64, dry_run: false })
    }

    /// `ctl switchover VOL` on the primary: a planned exchange of roles, with nothing lost
    /// and no write failed. The volume drains (new requests wait) and a CP brings the
    /// mirror level; the requests waiting are handed over; this node becomes the mirror,
    /// consistent as of that CP; the mirror takes the volume up with nothing to replay and
    /// resumes the pair the other way round; requests still arriving here are forwarded to
    /// the new primary's NBD export until the clients reconnect there.
    pub fn switchover(&self, name: &str) -> Result<SwitchoverReport> {
        let started = std::time::Instant::now();
        let (rec, target) = self.switchover_checks(name)?;
        let handle = self.volume(name)?;
        let peer = self.cfg.peers.info(&target.peer_control)?;
        let (tx, rx) = bounded(1);
        handle.control(Control::Quiesce(tx)).map_err(|e| anyhow!(e))?;
        let quiesced =
            rx.recv_timeout(Duration::from_secs(60)).map_err(|_| anyhow!("the volume did not drain within 60 s"));
        let (cp, next_seq) = match quiesced.and_then(|r| r.map_err(|e| anyhow!(e))) {
            Ok(x) => x,
            Err(e) => {
                let _ = handle.control(Control::Resume);
                return Err(e.context("switchover"));
            }
        };
        // From here requests wait (parked) instead of reaching the stopped poller.
        let parked = Arc::new(nvmirror_dataplane::frontend::forward::Parked::new(handle.size()));
        handle.forward_to(parked.clone());
        let (tx, rx) = bounded(1);
        handle.control(Control::Handover(tx)).map_err(|e| anyhow!(e))?;
        let queued = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| anyhow!("the volume did not hand over"))?;
        self.volumes.write().remove(name);
        let meta = core::switched_mirror_meta(
            MirrorMeta::new(&Hello {
                source_node: peer.name.clone(),
                volume: name.to_string(),
                volume_id: rec.volume_id,
                epoch: rec.epoch + 1,
                volume_bytes: rec.size,
                partition_bytes: rec.partition_bytes as u64,
                intent: Intent::Resume,
                base_seq: 0,
                base_cp_gen: 0,
                features: 0,
            }),
            cp,
            next_seq,
        );
        let takeover = self.adopt_as_mirror(&rec.storage, meta, rec.epoch).and_then(|()| {
            self.cfg.peers.takeover(
                &target.peer_control,
                name,
                &TakeoverRequest {
                    from: self.cfg.name.clone(),
                    control: self.cfg.control.to_string(),
                    replication: self.cfg.advertised_replication(),
                    cp,
                    next_seq,
                    policy: rec.policy.as_str().into(),
                },
            )
        });
        let taken = match takeover {
            Ok(v) => v,
            Err(e) => {
                // Back to where it was: this node the primary again, the requests served here.
                tracing::warn!("node {}: switchover of {name} failed ({e:#}); staying primary", self.cfg.name);
                self.mirrors.write().remove(&(peer.name.clone(), name.to_string()));
                self.storage.write().remove(&StorageOwner::Mirror(peer.name.clone(), name.to_string()));
                let _ = fs::remove_file(self.mirror_dir(&peer.name, name).join("meta.json"));
                {
                    let mut state = self.state.lock();
                    state.volumes.push(rec.clone());
                    self.save_state(&state)?;
                }
                self.start_volume(&rec)?;
                let local = self.volume(name)?;
                for (r, d) in queued.into_iter().chain(parked.take()) {
                    local.submit(r, d);
                }
                handle.forward_to(local.clone());
                for (r, d) in parked.take() {
                    local.submit(r, d);
                }
                return Err(e.context("switchover"));
            }
        };
        // Requests that waited, then those still coming here, go to the new primary.
        let mut fwd = None;
        for _ in 0..50 {
            match nvmirror_dataplane::frontend::forward::NbdForward::connect(&peer.nbd, name) {
                Ok(f) => {
                    fwd = Some(Arc::new(f));
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let handed = queued.len() + parked.held_len();
        match fwd {
            Some(f) => {
                for (r, d) in queued.into_iter().chain(parked.take()) {
                    f.submit(r, d);
                }
                handle.forward_to(f.clone());
                for (r, d) in parked.take() {
                    f.submit(r, d);
                }
            }
            None => {
                // The new primary serves the volume, but not its NBD export to us: the
                // waiting requests fail, and clients must reconnect to it.
                let gone = || io::Error::other(format!("volume {name} moved to {}: reconnect there", peer.name));
                for (_, d) in queued.into_iter().chain(parked.take()) {
                    d.complete(Err(gone()));
                }
                handle.forward_to(Arc::new(Moved(format!("volume {name} moved to {}: reconnect there", peer.name))));
                for (_, d) in parked.take() {
                    d.complete(Err(gone()));
                }
            }
        }
        self.events.push("switchover", Some(name), serde_json::json!({ "new_primary": peer.name, "cp": cp }));
        Ok(SwitchoverReport {
            new_primary: peer.name,
            epoch: taken["epoch"].as_u64().unwrap_or(rec.epoch + 1),
            cp,
            requests_handed_over: handed as u64,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// The second half of a switchover, on the mirror: checks it holds everything the
    /// primary quiesced at, promotes with nothing to replay, and takes the volume up
    /// mirrored to the old primary (now its mirror, consistent as of that CP).
    pub fn takeover(&self, name: &str, req: &TakeoverRequest) -> Result<PromoteReport> {
        let _one = self.failover_lock.lock();
        let mirror = self
            .mirrors
            .read()
            .get(&(req.from.clone(), name.to_string()))
            .cloned()
            .ok_or_else(|| NotFound(format!("no mirror of {name} from {} on this node", req.from)))?;
        let policy: Policy = serde_json::from_value(serde_json::Value::String(req.policy.clone())).unwrap_or_default();
        let target = MirrorTarget {
            peer_name: req.from.clone(),
            peer_control: req.control.clone(),
            replication: req.replication.clone(),
            // The old primary's mode is not in the request: status says it is not known.
            peer_nvram: None,
            peer_nvmf: None,
        };
        let report = core::takeover(&mut FileEnv::new(self, Some((target, policy))), &mirror, req.cp, req.next_seq)?;
        self.events.push("takeover", Some(name), serde_json::json!({ "from": req.from, "epoch": report.epoch }));
        // The pair resumes the other way round before the old primary forwards its
        // clients' requests here: until then a write would find the mirror link down.
        let handle = self.volume(name)?;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if handle.status().is_ok_and(|s| s.state == PairState::InSync) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(report)
    }
}
