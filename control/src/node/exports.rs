//! The node as the front ends see it: which exports it has (primary volumes, and its
//! mirrors read-only), who each admits, and where their other NVMe/TCP paths are; and the
//! RDMA engine it offers its mirrors' peers.

use super::*;

impl ExportRegistry for Node {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        if let Some(v) = self.volumes.read().get(name) {
            return Some(v.clone() as Arc<dyn Export>);
        }
        let mirrors = self.mirrors.read();
        let m = mirrors.iter().find(|((_, v), m)| v == name && !m.meta().promoted)?;
        Some(Arc::new(MirrorExport(m.1.clone())))
    }
    /// A primary volume's allow-list (a mirror's read-only export admits every client).
    fn admits(&self, name: &str, client: &nvmirror_dataplane::frontend::ClientId) -> bool {
        let state = self.state.lock();
        let Some(rec) = state.volumes.iter().find(|v| v.name == name) else { return true };
        // The list was checked when it was set; an entry that no longer parses admits no one.
        crate::allow::parse(&rec.allow).is_ok_and(|list| crate::allow::admits(&list, client))
    }
    fn volume_id(&self, name: &str) -> Option<u64> {
        if let Some(v) = self.state.lock().volumes.iter().find(|v| v.name == name) {
            return Some(v.volume_id);
        }
        let mirrors = self.mirrors.read();
        mirrors.iter().find(|((_, v), m)| v == name && !m.meta().promoted).map(|(_, m)| m.meta().volume_id)
    }
    /// A primary's mirror, where its last welcome said it serves NVMe/TCP (else where it
    /// said when paired); a mirror's source, where its last connection said it. An address
    /// on no particular interface (0.0.0.0 or ::) is no path a host can use: left out.
    fn other_paths(&self, name: &str) -> Vec<SocketAddr> {
        let recorded =
            self.state.lock().volumes.iter().find(|v| v.name == name).map(|v| {
                v.mirror.as_ref().and_then(|t| t.peer_nvmf.as_deref()).and_then(|a| a.parse::<SocketAddr>().ok())
            });
        let addr = match recorded {
            Some(recorded) => self.volumes.read().get(name).and_then(|h| h.mirror_nvmf()).or(recorded),
            None => {
                let mirrors = self.mirrors.read();
                mirrors
                    .iter()
                    .find(|((_, v), m)| v == name && !m.meta().promoted)
                    .and_then(|(_, m)| m.meta().source_nvmf)
            }
        };
        addr.into_iter().filter(|a: &SocketAddr| !a.ip().is_unspecified()).collect()
    }
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.volumes.read().keys().cloned().collect();
        for ((_, v), m) in self.mirrors.read().iter() {
            if !m.meta().promoted && !names.contains(v) {
                names.push(v.clone());
            }
        }
        names.sort();
        names
    }
}

/// Starts the RDMA engine where this build has one, the host has a device, and the log
/// files' NVRAM mode allows placement without this node's CPU.
pub(super) fn start_rdma(cfg: &NodeConfig) -> Option<Arc<dyn RdmaPlacement>> {
    #[cfg(feature = "rdma")]
    {
        use nvmirror_dataplane::nvram::NvramMode;
        use nvmirror_dataplane::transport::rdma;
        if matches!(cfg.nvram.mode, NvramMode::FileSync | NvramMode::Direct) {
            // A one-sided RDMA write lands in memory, and only this node's CPU can make
            // it durable here (msync, or the O_DIRECT write): entries come over TCP and
            // are acknowledged once persisted.
            tracing::info!(
                "node {}: RDMA not offered: {} log files need this node's CPU to persist what arrives; mirrors \
                 hosted here take entries over TCP",
                cfg.name,
                cfg.nvram.mode.as_str()
            );
            return None;
        }
        if cfg.nvram.mode == nvmirror_dataplane::nvram::NvramMode::Dax {
            // Measured in the hw-tests guest: ibv_reg_mr of a file-DAX mapping fails with
            // EOPNOTSUPP (the kernel does not let a device pin fsdax pages for long).
            tracing::info!(
                "node {}: RDMA not offered: dax: log files are filesystem-DAX mappings, which the kernel does not let \
                 an RDMA device pin (ibv_reg_mr fails with EOPNOTSUPP); mirrors hosted here take entries over TCP",
                cfg.name
            );
            return None;
        }
        let devices = rdma::device_names();
        if devices.is_empty() {
            return None;
        }
        match rdma::RdmaService::start(cfg.replication) {
            Ok(s) => {
                tracing::info!("node {}: RDMA placement on {} ({})", cfg.name, cfg.replication, devices.join(", "));
                Some(s)
            }
            Err(e) => {
                tracing::info!("node {}: RDMA not offered: {e}", cfg.name);
                None
            }
        }
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = cfg;
        None
    }
}
