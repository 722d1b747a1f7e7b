//! The Prometheus text exposition of a node's status, served at `GET /metrics` on the
//! control address: per primary volume, per mirror, and per RAID-4 layer.
//!
//! Names follow Prometheus conventions: `_total` for counters, base units (bytes,
//! seconds). Every family is written once, its HELP and TYPE then all its samples (every
//! volume's, every mirror's), as the text format requires; label values are escaped.

use std::fmt::Write;

use crate::node::NodeStatus;
use crate::storage::StorageStatus;

/// A label value as the text format wants it: backslash, double quote and line feed
/// escaped.
fn esc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// One metric family: its description, then its samples in the order they came.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: String,
    samples: String,
}

#[derive(Default)]
struct Out {
    families: Vec<Family>,
}

impl Out {
    fn family(&mut self, name: &'static str, kind: &'static str, help: &str) -> &mut String {
        let i = match self.families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.families.push(Family { name, kind, help: help.to_string(), samples: String::new() });
                self.families.len() - 1
            }
        };
        &mut self.families[i].samples
    }

    fn metric(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &str,
        labels: &str,
        value: impl std::fmt::Display,
    ) {
        let _ = writeln!(self.family(name, kind, help), "{name}{{{labels}}} {value}");
    }

    /// A histogram's `_bucket`, `_sum` and `_count` samples in the family `name`:
    /// cumulative counts at or below each bound (seconds), then `+Inf`.
    fn histogram(&mut self, name: &'static str, help: &str, labels: &str, le: &[(f64, u64)], sum: f64, count: u64) {
        let out = self.family(name, "histogram", help);
        for (bound, n) in le {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }

    fn text(self) -> String {
        let mut text = String::new();
        for f in self.families {
            let _ = writeln!(text, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(text, "# TYPE {} {}", f.name, f.kind);
            text.push_str(&f.samples);
        }
        text
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
    let mut out = Out::default();
    let node = esc(&s.node);
    for v in &s.volumes {
        let src = &v.source;
        let l = format!("node=\"{node}\",volume=\"{}\"", esc(&src.volume));
        out.metric(
            "nvmirror_volume_info",
            "gauge",
            "A primary volume; its pair state in the label",
            &format!("{l},state=\"{}\"", esc(src.state.as_str())),
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
        let l = format!("node=\"{node}\",volume=\"{}\",source=\"{}\"", esc(&st.volume), esc(&st.source_node));
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
            &format!("node=\"{node}\",volume=\"{}\"", esc(&u.volume)),
            1,
        );
    }
    out.text()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_family_is_written_once_with_all_its_samples() {
        let mut out = Out::default();
        for v in ["a", "b"] {
            out.metric("x_total", "counter", "X", &format!("volume=\"{v}\""), 1);
            out.histogram("lat_seconds", "L", &format!("volume=\"{v}\""), &[(0.001, 1)], 0.5, 2);
            out.metric("y", "gauge", "Y", &format!("volume=\"{v}\""), 2);
        }
        let text = out.text();
        for name in ["x_total", "lat_seconds", "y"] {
            assert_eq!(text.matches(&format!("# TYPE {name} ")).count(), 1, "{text}");
        }
        // A family's samples follow its TYPE line, before the next family's description.
        let lines: Vec<&str> = text.lines().collect();
        let mut current = "";
        for l in &lines {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().expect("name");
            } else if !l.starts_with('#') {
                assert!(l.starts_with(current), "{l} outside its family {current}:\n{text}");
            }
        }
        assert_eq!(lines.iter().filter(|l| l.starts_with("lat_seconds_count{")).count(), 2);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(esc("x\ny"), "x\\ny");
        assert_eq!(esc("site-a.1_2"), "site-a.1_2");
    }
}
