//! What `status` shows: each primary volume's row, the mirrors hosted here, the volumes
//! that did not start, and what an acknowledgement survives.

use super::*;

/// What an acknowledgement of a volume survives, while its pair is in sync, from the
/// NVRAM modes of its primary and of its mirror (`None`: unmirrored; `Some(None)`:
/// mirrored, the mirror's mode not known).
pub fn ack_survives(own: NvramMode, mirror: Option<Option<NvramMode>>) -> Vec<&'static str> {
    let power_safe = NvramMode::survives_power_loss;
    let mut out = vec!["a killed process"];
    match mirror {
        None if power_safe(own) => out.push("a power cut"),
        None => {}
        Some(peer) => {
            out.push("the loss of one site");
            match peer {
                Some(p) if power_safe(own) && power_safe(p) => out.push("a power cut at both sites"),
                Some(_) => {}
                None if power_safe(own) => out
                    .push("a power cut at both sites if the mirror's NVRAM is power-safe (its mode is not known here)"),
                None => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod ack_survives_tests {
    use super::*;

    #[test]
    fn a_power_cut_at_both_sites_needs_both_modes_power_safe() {
        let both = "a power cut at both sites";
        assert_eq!(ack_survives(NvramMode::File, None), ["a killed process"]);
        assert_eq!(ack_survives(NvramMode::Direct, None), ["a killed process", "a power cut"]);
        let mirrored = |own, peer| ack_survives(own, Some(Some(peer)));
        assert!(mirrored(NvramMode::Direct, NvramMode::Dax).contains(&both));
        assert!(!mirrored(NvramMode::Direct, NvramMode::File).contains(&both));
        assert!(!mirrored(NvramMode::File, NvramMode::Direct).contains(&both));
        assert_eq!(mirrored(NvramMode::File, NvramMode::File), ["a killed process", "the loss of one site"]);
        assert!(ack_survives(NvramMode::FileSync, Some(None)).iter().any(|s| s.contains("not known")));
    }
}

impl Node {
    /// The status of `name` alone: its row as a primary, the mirrors of that name hosted
    /// here, or why it did not start.
    pub fn volume_status(&self, name: &str) -> Result<NodeStatus> {
        let mut s = self.status();
        s.volumes.retain(|v| v.source.volume == name);
        s.mirrors.retain(|m| m.mirror.volume == name);
        s.unstarted.retain(|u| u.volume == name);
        if s.volumes.is_empty() && s.mirrors.is_empty() && s.unstarted.is_empty() {
            return Err(NotFound(format!("no volume or mirror {name} on this node")).into());
        }
        Ok(s)
    }

    pub fn status(&self) -> NodeStatus {
        let state = self.state.lock().clone();
        let mut volumes = Vec::new();
        let handles: Vec<_> = self.volumes.read().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (name, h) in handles {
            let rec = state.volumes.iter().find(|v| v.name == name);
            match h.status() {
                Ok(s) => volumes.push(VolumeStatus {
                    role: "primary",
                    replication_lag_entries: if s.peer.is_some() {
                        s.acked_seq.saturating_sub(s.mirror_acked_seq)
                    } else {
                        0
                    },
                    peer: rec.and_then(|r| r.mirror.as_ref().map(|m| format!("{} ({})", m.peer_name, m.peer_control))),
                    storage: self.storage_status(&StorageOwner::Volume(name.clone())),
                    allow: rec.map(|r| r.allow.clone()).unwrap_or_default(),
                    ack_survives: ack_survives(
                        self.cfg.nvram.mode,
                        rec.and_then(|r| r.mirror.as_ref()).map(|m| m.peer_nvram),
                    ),
                    nvmf_hosts: self.nvmf_hosts(&name),
                    source: s,
                }),
                Err(e) => tracing::warn!("status of {name}: {e}"),
            }
        }
        volumes.sort_by(|a, b| a.source.volume.cmp(&b.source.volume));
        // A promoted mirror is a primary volume's storage now: the volume's row shows it
        // (one row per volume), while it is there or could not start.
        let primaries: Vec<String> = volumes
            .iter()
            .map(|v| v.source.volume.clone())
            .chain(self.unstarted.lock().iter().map(|(v, _)| v.clone()))
            .collect();
        let mut mirrors: Vec<MirrorEntry> = self
            .mirrors
            .read()
            .values()
            .filter(|m| {
                let meta = m.meta();
                !(meta.promoted && primaries.contains(&meta.volume))
            })
            .map(|m| {
                let mirror = m.status();
                let storage =
                    self.storage_status(&StorageOwner::Mirror(mirror.source_node.clone(), mirror.volume.clone()));
                let meta = m.meta();
                let state = if mirror.promoted {
                    "broken"
                } else if meta.resyncing {
                    "resyncing"
                } else if !mirror.consistent {
                    "baseline"
                } else if mirror.connected {
                    "in-sync"
                } else {
                    "out-of-sync"
                };
                let nvmf_hosts = self.nvmf_hosts(&mirror.volume);
                MirrorEntry { role: "mirror", state, mirror, storage, nvmf_hosts }
            })
            .collect();
        mirrors
            .sort_by(|a, b| (&a.mirror.volume, &a.mirror.source_node).cmp(&(&b.mirror.volume, &b.mirror.source_node)));
        NodeStatus {
            node: self.cfg.name.clone(),
            replication: self.cfg.advertised_replication(),
            nbd: self.cfg.nbd.to_string(),
            nvmf: self.cfg.nvmf.map(|a| a.to_string()),
            control: self.cfg.control.to_string(),
            nvram: format!("{}:{}", self.cfg.nvram.mode.as_str(), self.cfg.nvram.dir.display()),
            nvram_survives: self.cfg.nvram.mode.survives().to_string(),
            volumes,
            mirrors,
            unstarted: self
                .unstarted
                .lock()
                .iter()
                .map(|(volume, reason)| UnstartedVolume {
                    volume: volume.clone(),
                    state: "failed",
                    reason: reason.clone(),
                })
                .collect(),
        }
    }

    pub(super) fn storage_status(&self, owner: &StorageOwner) -> Option<StorageStatus> {
        self.storage.read().get(owner).map(|(s, o)| o.status(s))
    }

    /// Status shows the hosts attached over NVMe/TCP through `hosts` from now on.
    pub fn set_nvmf_hosts(&self, hosts: nvmirror_dataplane::frontend::nvmf::NvmfHosts) {
        let _ = self.nvmf_hosts.set(hosts);
    }

    pub(super) fn nvmf_hosts(&self, volume: &str) -> Vec<nvmirror_dataplane::frontend::nvmf::HostPath> {
        self.nvmf_hosts.get().map(|h| h.of(volume)).unwrap_or_default()
    }
}

#[derive(Debug, Serialize)]
pub struct VolumeStatus {
    /// Always `primary`.
    pub role: &'static str,
    /// Entries acknowledged to clients and not yet to the mirror.
    pub replication_lag_entries: u64,
    #[serde(flatten)]
    pub source: SourceStatus,
    pub peer: Option<String>,
    pub storage: Option<StorageStatus>,
    /// The NBD allow-list; empty (left out): every client.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// What an acknowledgement survives ([`ack_survives`]).
    pub ack_survives: Vec<&'static str>,
    /// The hosts attached over NVMe/TCP through this node (left out: none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nvmf_hosts: Vec<nvmirror_dataplane::frontend::nvmf::HostPath>,
}

#[derive(Debug, Serialize)]
pub struct MirrorEntry {
    /// Always `mirror`.
    pub role: &'static str,
    /// baseline, resyncing, in-sync, out-of-sync, or broken (failed over).
    pub state: &'static str,
    #[serde(flatten)]
    pub mirror: MirrorStatus,
    pub storage: Option<StorageStatus>,
    /// The hosts attached over NVMe/TCP through this node (left out: none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nvmf_hosts: Vec<nvmirror_dataplane::frontend::nvmf::HostPath>,
}

#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub replication: String,
    pub nbd: String,
    /// The NVMe/TCP address, where the node serves it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvmf: Option<String>,
    pub control: String,
    pub nvram: String,
    pub nvram_survives: String,
    pub volumes: Vec<VolumeStatus>,
    pub mirrors: Vec<MirrorEntry>,
    /// Volumes whose storage could not be opened at start.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unstarted: Vec<UnstartedVolume>,
}

#[derive(Debug, Serialize)]
pub struct UnstartedVolume {
    pub volume: String,
    pub state: &'static str,
    pub reason: String,
}
