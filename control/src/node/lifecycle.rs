//! A volume's end, or its pair's: `volume delete` of a primary (and, with `--force`, of its
//! mirror on the peer) or of a mirror hosted here; `unpair`.

use super::*;

/// What `volume delete` did.
#[derive(Debug, Default, Serialize)]
pub struct DeleteReport {
    /// What was deleted on this node: `primary`, or `mirror of SOURCE`.
    pub deleted: Vec<String>,
    /// Files removed (log, change map, data-dir disks, a mirror's files).
    pub removed: Vec<String>,
    /// Disks named at creation (`--disk`, `--parity`): left as they are, contents and all.
    pub left: Vec<String>,
    /// The mirror on the peer: deleted there, or why not.
    pub peer: Option<String>,
}

/// What `unpair` did.
#[derive(Debug, Serialize)]
pub struct UnpairReport {
    /// The peer the volume was mirrored to.
    pub peer: String,
    /// Its mirror there: deleted, or why not.
    pub mirror: String,
}

impl Node {
    /// Replaces primary volume `name`'s NBD allow-list, refused (`Invalid`) if it does not
    /// parse; it applies to connections made from now on.
    pub fn set_allow(&self, name: &str, allow: Vec<String>) -> Result<()> {
        check_allow(&allow, self.cfg.nbd_client_ca.is_some())?;
        let mut state = self.state.lock();
        state.volume_mut(name)?.allow.clone_from(&allow);
        self.save_state(&state)?;
        drop(state);
        self.events.push("allow-list", Some(name), serde_json::json!({ "allow": allow }));
        Ok(())
    }

    /// Stops mirroring primary volume `name`: it goes on alone (writes waiting for the
    /// mirror are answered), and its mirror on the peer is deleted (a peer that cannot be
    /// reached is reported, and the unpair stands). The volume can then be mirrored to any
    /// node, by a baseline.
    pub fn unpair(&self, name: &str) -> Result<UnpairReport> {
        let handle = self.volume(name)?;
        let rec = self.volume_record(name)?;
        let Some(target) = rec.mirror.clone() else { bail!("volume {name} is not mirrored") };
        let (tx, rx) = bounded(1);
        handle.control(Control::Detach(tx)).map_err(|e| anyhow!(e))?;
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow!("volume poller did not answer"))?
            .map_err(|e| anyhow!("volume {name}: {e}"))?;
        {
            let mut state = self.state.lock();
            state.volume_mut(name)?.mirror = None;
            self.save_state(&state)?;
        }
        let mirror = self.delete_peer_mirror(&target, name);
        self.events.push("unpaired", Some(name), serde_json::json!({ "peer": target.peer_name, "mirror": mirror }));
        Ok(UnpairReport { peer: target.peer_name, mirror })
    }

    /// Asks the peer to delete its mirror of `name`; what came of it, for the report (a
    /// peer that cannot be reached leaves its mirror, and the caller's change stands).
    fn delete_peer_mirror(&self, target: &MirrorTarget, name: &str) -> String {
        match self.cfg.peers.delete_mirror(&target.peer_control, name, &self.cfg.name) {
            Ok(()) => format!("the mirror on {} is deleted", target.peer_name),
            Err(e) => format!(
                "the mirror on {} ({}) is left: {e:#}; delete it there with `volume delete {name} --force`",
                target.peer_name, target.peer_control
            ),
        }
    }

    /// Deletes `name`: the primary volume of that name here, or else the mirrors of that
    /// name hosted here. A mirrored primary, or a mirror its source is connected to, is
    /// refused unless `force`; a forced delete of a primary deletes its mirror on the peer
    /// too (a peer that cannot be reached is reported, and the local delete stands). A
    /// mirror deleted under a connected source is rebuilt by a baseline when the source
    /// reconnects.
    pub fn delete_volume(&self, name: &str, force: bool) -> Result<DeleteReport> {
        match self.volume_record(name) {
            Ok(rec) => self.delete_primary(rec, force),
            Err(_) => self.delete_mirrors(name, force),
        }
    }

    fn delete_primary(&self, rec: VolumeRecord, force: bool) -> Result<DeleteReport> {
        let name = rec.name.clone();
        if let (Some(m), false) = (&rec.mirror, force) {
            bail!("volume {name} is mirrored to {} ({}): --force deletes it there too", m.peer_name, m.peer_control);
        }
        let mut report = DeleteReport { deleted: vec!["primary".into()], ..DeleteReport::default() };
        // Stopped first: no client is served and the link is closed before anything goes.
        if let Some(h) = self.volumes.write().remove(&name) {
            h.stop();
        }
        {
            let mut state = self.state.lock();
            state.volumes.retain(|v| v.name != name);
            // A hello of this volume at its epoch is stale from now on.
            Node::fence(&mut state, rec.volume_id, rec.epoch);
            self.save_state(&state)?;
        }
        self.unstarted.lock().retain(|(v, _)| *v != name);
        self.storage.write().remove(&StorageOwner::Volume(name.clone()));
        let remove = |path: PathBuf, report: &mut DeleteReport| {
            if fs::remove_file(&path).is_ok() {
                report.removed.push(path.display().to_string());
            }
        };
        remove(self.nvlog_path(&name, rec.epoch), &mut report);
        remove(self.changes_path(&name), &mut report);
        let own = self.cfg.data_dir.join("volumes").join(&name);
        for d in rec.storage.disks() {
            if d.path.starts_with(&own) {
                remove(d.path.clone(), &mut report);
            } else {
                report.left.push(d.to_string());
            }
        }
        let _ = fs::remove_dir(&own);
        report.peer = rec.mirror.as_ref().map(|m| self.delete_peer_mirror(m, &name));
        self.events.push("volume-deleted", Some(&name), serde_json::to_value(&report).unwrap_or_default());
        tracing::info!("node {}: volume {name} deleted", self.cfg.name);
        Ok(report)
    }

    fn delete_mirrors(&self, name: &str, force: bool) -> Result<DeleteReport> {
        let found: Vec<((String, String), Arc<Mirror>)> =
            self.mirrors.read().iter().filter(|((_, v), _)| v == name).map(|(k, m)| (k.clone(), m.clone())).collect();
        if found.is_empty() {
            return Err(NotFound(format!("no volume or mirror {name} on this node")).into());
        }
        if let (Some(((src, _), _)), false) = (found.iter().find(|(_, m)| m.status().connected), force) {
            bail!("the mirror of {src}/{name} is connected to its source: delete the volume there, or --force");
        }
        let mut report = DeleteReport::default();
        for ((src, v), m) in found {
            self.delete_mirror(&src, &v, &m, &mut report)?;
        }
        Ok(report)
    }

    /// Deletes the mirror of `volume` from `source` (a source's forced delete asks this).
    pub fn delete_mirror_of(&self, source: &str, volume: &str) -> Result<DeleteReport> {
        let m = self.mirrors.read().get(&(source.to_string(), volume.to_string())).cloned();
        let m = m.ok_or_else(|| NotFound(format!("no mirror of {volume} from {source} on this node")))?;
        let mut report = DeleteReport::default();
        self.delete_mirror(source, volume, &m, &mut report)?;
        Ok(report)
    }

    fn delete_mirror(&self, source: &str, volume: &str, m: &Mirror, report: &mut DeleteReport) -> Result<()> {
        let key = (source.to_string(), volume.to_string());
        self.mirrors.write().remove(&key);
        m.disconnect();
        self.storage.write().remove(&StorageOwner::Mirror(key.0.clone(), key.1.clone()));
        {
            // A hello of the source at this epoch is refused as stale from now on.
            let meta = m.meta();
            let mut state = self.state.lock();
            Node::fence(&mut state, meta.volume_id, meta.epoch);
            self.save_state(&state)?;
        }
        let logs = self.mirror_log_path(source, volume, 0);
        for dir in [self.mirror_dir(source, volume), logs.parent().map(Path::to_path_buf).unwrap_or(logs)] {
            if fs::remove_dir_all(&dir).is_ok() {
                report.removed.push(dir.display().to_string());
            }
        }
        report.deleted.push(format!("mirror of {source}"));
        self.events.push("mirror-deleted", Some(volume), serde_json::json!({ "source_node": source }));
        tracing::info!("node {}: mirror of {source}/{volume} deleted", self.cfg.name);
        Ok(())
    }
}
