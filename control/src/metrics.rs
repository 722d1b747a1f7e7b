//! The Prometheus text exposition of a node's status, served at `GET /metrics` on the
//! control address: per primary volume, per mirror, and per RAID-4 layer.
//!
//! Names follow Prometheus conventions: `_total` for counters, base units (bytes,
//! seconds). Volume, source node and state names are restricted to `[A-Za-z0-9._-]` by the
//! node, so they need no escaping in label values.

use std::fmt::Write;

use crate::node::NodeStatus;
use crate::storage::StorageStatus;

struct Out {
    text: String,
    described: Vec<&'static str>,
}

impl Out {
    fn metric(&mut self, name: &'static str, kind: &str, help: &str, labels: &str, value: impl std::fmt::Display) {
        if !self.described.contains(&name) {
            self.described.push(name);
            let _ = writeln!(self.text, "# HELP {name} {help}");
            let _ = writeln!(self.text, "# TYPE {name} {kind}");
        }
        let _ = writeln!(self.text, "{name}{{{labels}}} {value}");
    }

    /// A histogram's `_bucket`, `_sum` and `_count` samples under one description of
    /// `name`: cumulative counts at or below each bound (seconds), then `+Inf`.
    fn histogram(&mut self, name: &'static str, help: &str, labels: &str, le: &[(f64, u64)], sum: f64, count: u64) {
        if !self.described.contains(&name) {
            self.described.push(name);
            let _ = writeln!(self.text, "# HELP {name} {help}");
            let _ = writeln!(self.text, "# TYPE {name} histogram");
        }
        for (bound, n) in le {
            let _ = writeln!(self.text, "{name}_bucket{{{labels},le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(self.text, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(self.text, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(self.text, "{name}_count{{{labels}}} {count}");
    }
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

fn storage(out: &mut Out, labels: &str, s: &Option<StorageStatus>) {
    let Some(StorageStatus::Raid(r)) = s else { return };
    let c = &r.counters;
    out.metric(
        "nvmirror_raid_degraded",
        "gauge",
        "1 while a RAID-4 member is failed or rebuilding",
        labels,
        u8::from(r.degraded),
    );
    out.metric(
        "nvmirror_raid_checksum_errors_total",
        "counter",
        "Blocks read that failed their crc32c",
        labels,
        c.checksum_errors,
    );
    out.metric(
        "nvmirror_raid_blocks_repaired_total",
        "counter",
        "Blocks rebuilt from parity and rewritten",
        labels,
        c.blocks_repaired,
    );
    out.metric(
        "nvmirror_raid_checksums_corrected_total",
        "counter",
        "Checksum entries corrected where data and parity agreed",
        labels,
        c.checksums_corrected,
    );
    out.metric(
        "nvmirror_raid_unrecoverable_total",
        "counter",
        "Reads that could not be served correctly",
        labels,
        c.unrecoverable,
    );
    out.metric(
        "nvmirror_raid_degraded_reads_total",
        "counter",
        "Blocks served by reconstruction",
        labels,
        c.degraded_reads,
    );
    if let Some(p) = &r.rebuild {
        out.metric(
            "nvmirror_raid_rebuild_done_bytes",
            "gauge",
            "Bytes rebuilt so far by the running rebuild",
            labels,
            p.done_bytes,
        );
        out.metric(
            "nvmirror_raid_rebuild_total_bytes",
            "gauge",
            "Bytes the running rebuild covers",
            labels,
            p.total_bytes,
        );
    }
    if let Some(s) = &r.last_scrub {
        out.metric(
            "nvmirror_raid_last_scrub_checksum_errors",
            "gauge",
            "Checksum errors the last scrub found",
            labels,
            s.checksum_errors,
        );
        out.metric(
            "nvmirror_raid_last_scrub_parity_mismatches",
            "gauge",
            "Parity mismatches the last scrub found",
            labels,
            s.parity_mismatches,
        );
        out.metric(
            "nvmirror_raid_last_scrub_unrecoverable",
            "gauge",
            "Rows the last scrub could not repair",
            labels,
            s.unrecoverable,
        );
    }
}

/// The exposition of `s`.
pub fn render(s: &NodeStatus) -> String {
    let mut out = Out { text: String::new(), described: Vec::new() };
    let node = &s.node;
    for v in &s.volumes {
        let src = &v.source;
        let l = format!("node=\"{node}\",volume=\"{}\"", src.volume);
        out.metric(
            "nvmirror_volume_info",
            "gauge",
            "A primary volume; its pair state in the label",
            &format!("{l},state=\"{}\"", src.state),
            1,
        );
        out.metric("nvmirror_volume_epoch", "gauge", "The volume's epoch (fencing token)", &l, src.epoch);
        out.metric("nvmirror_volume_writes_total", "counter", "Client writes acknowledged", &l, src.writes);
        out.metric("nvmirror_volume_write_errors_total", "counter", "Client writes failed", &l, src.write_errors);
        out.metric(
            "nvmirror_volume_written_bytes_total",
            "counter",
            "Bytes of acknowledged client writes",
            &l,
            src.bytes_written,
        );
        out.metric(
            "nvmirror_volume_replication_lag_entries",
            "gauge",
            "Log entries appended but not yet persistent on the mirror",
            &l,
            src.next_seq.saturating_sub(1).saturating_sub(src.acked_seq),
        );
        out.metric("nvmirror_volume_log_used_bytes", "gauge", "NVLog bytes in use", &l, src.log_bytes_used);
        out.metric("nvmirror_volume_log_max_bytes", "gauge", "NVLog capacity", &l, src.log_bytes_max);
        out.metric("nvmirror_volume_cps_total", "counter", "Consistency points completed", &l, src.cps);
        out.metric(
            "nvmirror_volume_last_cp_seconds",
            "gauge",
            "Duration of the last CP, both sites",
            &l,
            secs(src.last_cp_duration_us),
        );
        out.metric(
            "nvmirror_volume_last_local_cp_seconds",
            "gauge",
            "Duration of the last CP's local write-out and flush",
            &l,
            secs(src.last_local_cp_us),
        );
        out.metric(
            "nvmirror_volume_baseline_done_bytes",
            "gauge",
            "Bytes copied by the running baseline",
            &l,
            src.baseline_done_bytes,
        );
        let le: Vec<(f64, u64)> = src.ack_latency_le_us.iter().map(|&(us, n)| (secs(us), n)).collect();
        out.histogram(
            "nvmirror_volume_ack_latency_seconds",
            "Client writes by latency from logged to acknowledged (persistent on both sites)",
            &l,
            &le,
            secs(src.ack_latency_sum_us),
            src.ack_latency_count,
        );
        out.metric(
            "nvmirror_volume_changed_bytes",
            "gauge",
            "Bytes marked changed since the mirror's last consistent point (a delta resync's size)",
            &l,
            src.changed_bytes,
        );
        out.metric(
            "nvmirror_volume_resync_done_bytes",
            "gauge",
            "Bytes copied by the running delta resync",
            &l,
            src.resync_done_bytes,
        );
        out.metric(
            "nvmirror_volume_resync_total_bytes",
            "gauge",
            "Bytes the running delta resync copies",
            &l,
            src.resync_total_bytes,
        );
        out.metric(
            "nvmirror_volume_mirror_current",
            "gauge",
            "1 while the mirror holds every acknowledged write",
            &l,
            u8::from(src.mirror_current),
        );
        out.metric(
            "nvmirror_volume_pending_writes",
            "gauge",
            "Writes waiting for the mirror's ack",
            &l,
            src.pending_writes,
        );
        storage(&mut out, &format!("{l},role=\"primary\""), &v.storage);
    }
    for m in &s.mirrors {
        let st = &m.mirror;
        let l = format!("node=\"{node}\",volume=\"{}\",source=\"{}\"", st.volume, st.source_node);
        out.metric("nvmirror_mirror_connected", "gauge", "1 while the source is connected", &l, u8::from(st.connected));
        out.metric(
            "nvmirror_mirror_consistent",
            "gauge",
            "1 once the baseline is complete",
            &l,
            u8::from(st.consistent),
        );
        out.metric("nvmirror_mirror_epoch", "gauge", "The mirror's epoch", &l, st.epoch);
        out.metric(
            "nvmirror_mirror_entries_received_total",
            "counter",
            "Log entries placed over TCP",
            &l,
            st.entries_received,
        );
        out.metric("nvmirror_mirror_received_bytes_total", "counter", "Bytes placed over TCP", &l, st.bytes_received);
        out.metric("nvmirror_mirror_commits_total", "counter", "Group commits of the log files", &l, st.commits);
        out.metric(
            "nvmirror_mirror_cps_applied_total",
            "counter",
            "CPs applied to the mirror volume",
            &l,
            st.cps_applied,
        );
        out.metric("nvmirror_mirror_log_used_bytes", "gauge", "Log file bytes in use", &l, st.log_bytes_used);
        out.metric(
            "nvmirror_mirror_last_cp_seconds",
            "gauge",
            "Duration of the last CP applied",
            &l,
            secs(st.last_cp_duration_us),
        );
        out.metric("nvmirror_mirror_baseline_bytes", "gauge", "Bytes of baseline received", &l, st.baseline_bytes);
        storage(&mut out, &format!("{l},role=\"mirror\""), &m.storage);
    }
    for u in &s.unstarted {
        out.metric(
            "nvmirror_volume_unstarted",
            "gauge",
            "A volume whose storage could not be opened",
            &format!("node=\"{node}\",volume=\"{}\"", u.volume),
            1,
        );
    }
    out.text
}
