//! What a source volume reports: where its pair stands, its counters and latencies.

use super::*;

/// Where a primary volume and its mirror stand: the `state` of its status, serialised as
/// the strings the status has always shown (`in-sync`, `out-of-sync`...).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairState {
    /// No mirror configured: writes are acknowledged once persistent here.
    #[default]
    NotMirrored,
    /// Reaching a mirror not joined yet, or fetching the log back from it.
    Connecting,
    /// The pair was in sync and the link is down.
    OutOfSync,
    /// A delta resync to the mirror is under way.
    Resyncing,
    /// A full copy to the mirror is under way.
    Baseline,
    /// Every write goes to both sites before it is acknowledged.
    InSync,
    /// Another node holds the volume at a newer epoch: nothing is acknowledged here.
    Fenced,
    /// The volume stopped on an error (see the reason).
    Failed,
    /// Drained for a switchover.
    Quiescing,
}

impl PairState {
    pub fn as_str(self) -> &'static str {
        match self {
            PairState::NotMirrored => "not-mirrored",
            PairState::Connecting => "connecting",
            PairState::OutOfSync => "out-of-sync",
            PairState::Resyncing => "resyncing",
            PairState::Baseline => "baseline",
            PairState::InSync => "in-sync",
            PairState::Fenced => "fenced",
            PairState::Failed => "failed",
            PairState::Quiescing => "quiescing",
        }
    }
}

impl std::fmt::Display for PairState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for PairState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    pub volume: String,
    pub volume_id: u64,
    pub epoch: u64,
    pub size_bytes: u64,
    pub state: PairState,
    pub peer: Option<String>,
    pub reason: Option<String>,
    pub next_seq: u64,
    pub acked_seq: u64,
    pub writes: u64,
    pub write_errors: u64,
    pub bytes_written: u64,
    pub cps: u64,
    pub last_cp: u64,
    pub last_cp_unix_ms: u64,
    pub last_cp_duration_us: u64,
    /// How long the last CP's local write-out (blocks and flush) took, off the poller.
    pub last_local_cp_us: u64,
    pub log_bytes_used: u64,
    pub log_bytes_max: u64,
    pub cache_blocks: u64,
    pub pending_writes: u64,
    pub baseline_done_bytes: u64,
    /// strict or sync.
    pub policy: String,
    /// Volume bytes marked changed since the mirror's last consistent point (what a
    /// delta resync would copy), where the volume has a change map.
    pub changed_bytes: u64,
    /// The node and CP the change map is relative to.
    pub changes_since: Option<crate::log::ChangeBase>,
    /// The mirror holds every write acknowledged so far: in sync, and caught up with what
    /// policy sync acknowledged alone. A failover to a mirror that is not current loses
    /// the writes acknowledged since it fell behind.
    pub mirror_current: bool,
    /// The highest sequence number the mirror acknowledged (or holds by a copy), and the
    /// highest acknowledged to a client without it (policy sync).
    pub mirror_acked_seq: u64,
    pub local_only_seq: u64,
    /// Acknowledged writes by latency (logged to acknowledged): counts at or below each
    /// bound of [`ACK_LATENCY_BOUNDS_US`], cumulative as Prometheus histograms are, and the
    /// sum of the latencies.
    pub ack_latency_le_us: Vec<(u64, u64)>,
    pub ack_latency_sum_us: u64,
    pub ack_latency_count: u64,
    /// The last copy to the mirror that completed: `baseline` or `resync`, and its bytes.
    pub last_copy_kind: Option<String>,
    pub last_copy_bytes: u64,
    /// Of those, the bytes that read as zeroes and went as ranges, not data.
    pub last_copy_zero_bytes: u64,
    /// Of those, the bytes of holes in the volume's files (`SEEK_DATA`), not even read.
    pub last_copy_hole_bytes: u64,
    /// A delta resync under way: bytes copied, of how many.
    pub resync_done_bytes: u64,
    pub resync_total_bytes: u64,
    /// The copy (baseline or resync) is paused (`ctl pause-copy`).
    pub copy_paused: bool,
    /// The copy under way is durable on the mirror up to this byte (its last checkpoint):
    /// stopped now, it resumes from here (as a delta resync) rather than from the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_resumable_from: Option<u64>,
    /// Bytes per second a copy keeps to (`ctl mirror --rate`, `node --copy-rate`); none:
    /// as fast as it goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_rate: Option<u64>,
    pub core: Option<usize>,
    pub parks: u64,
    /// Times writes had to wait for NVLog space (both partitions held by CPs), and for how
    /// long in all: a CP that cannot keep up with the write rate shows here.
    pub log_full_waits: u64,
    pub log_full_wait_us: u64,
    /// Writes the write throttle delayed the next request after, and the delay in all
    /// (see `THROTTLE_START_FILL`): a CP falling behind shows here first.
    pub throttled_writes: u64,
    pub throttle_us: u64,
    /// Log entries this node's log lacked after a restart (cut short, or damaged) that
    /// the mirror's copy gave back.
    pub log_entries_fetched: u64,
    /// Requests wait for the mirror's copy of the log (see `held_for_mirror_log`).
    pub awaiting_mirror_log: bool,
}

impl<C> Poller<C>
where
    C: Connector + 'static,
    C::Link: 'static,
{
    pub(super) fn status(&mut self) -> SourceStatus {
        let mut s = self.stats.clone();
        s.awaiting_mirror_log = self.held_for_mirror_log();
        let (state, reason) = match &self.link {
            LinkState::Unmirrored => (PairState::NotMirrored, None),
            // Connecting: to a mirror not joined yet (a copy to come, or none confirmed since
            // the start). A pair that was in sync stays out of sync through its reconnect
            // attempts, whichever moment the status is taken.
            LinkState::Down { reason, connecting, copy, .. } => {
                if copy.is_some() || (*connecting && !self.confirmed) {
                    (PairState::Connecting, Some(reason.clone()))
                } else {
                    (PairState::OutOfSync, Some(reason.clone()))
                }
            }
            LinkState::Up { copy: Some(c), .. } if c.kind == CopyKind::Resync => (PairState::Resyncing, None),
            LinkState::Up { copy: Some(_), .. } => (PairState::Baseline, None),
            LinkState::Up { copy: None, .. } if self.catch_up.is_some() => {
                (PairState::Connecting, Some("fetching the log back from the mirror".to_string()))
            }
            LinkState::Up { copy: None, .. } => (PairState::InSync, None),
            LinkState::Fenced(r) => (PairState::Fenced, Some(r.clone())),
        };
        s.state = state;
        s.reason = reason;
        if let Some(r) = &self.failed {
            s.state = PairState::Failed;
            s.reason = Some(r.clone());
        }
        s.peer = self.target.clone();
        s.copy_paused = self.copy_paused_at.is_some();
        s.next_seq = self.next_seq;
        s.acked_seq = self.acked_seq;
        s.epoch = self.cfg.epoch;
        s.log_bytes_used = PARTITION_IDS
            .into_iter()
            .filter(|p| self.parts[*p as usize] != Part::Free)
            .map(|p| self.nvlog.tail(p) as u64)
            .sum();
        s.cache_blocks = self.overlay.len() as u64;
        s.pending_writes = (self.pending.len() + self.waiting.len()) as u64;
        s.baseline_done_bytes = match &self.link {
            LinkState::Up { copy: Some(c), .. } if c.kind == CopyKind::Baseline => c.cursor,
            _ => s.size_bytes,
        };
        (s.resync_done_bytes, s.resync_total_bytes) = match &self.link {
            LinkState::Up { copy: Some(c), .. } if c.kind == CopyKind::Resync => {
                (c.bytes, c.marked * crate::log::REGION_BYTES)
            }
            _ => (0, 0),
        };
        if let Some(m) = &self.changes {
            s.changed_bytes = (m.marked() * crate::log::REGION_BYTES).min(s.size_bytes);
            s.changes_since = m.base().cloned();
        }
        if self.quiesced {
            s.state = PairState::Quiescing;
        }
        s.mirror_current = self.mirror_current();
        s.mirror_acked_seq = self.remote_acked_seq;
        let mut cumulative = 0;
        s.ack_latency_le_us = ACK_LATENCY_BOUNDS_US
            .iter()
            .zip(&self.ack_buckets)
            .map(|(&le, &n)| {
                cumulative += n;
                (le, cumulative)
            })
            .collect();
        s.ack_latency_count = self.ack_buckets.iter().sum();
        s.ack_latency_sum_us = self.ack_sum_us;
        s.local_only_seq = self.local_only_seq;
        s.core = self.core;
        s
    }
}

#[cfg(test)]
mod pair_state_tests {
    use super::PairState;

    /// The status JSON shows the pair state as the strings it always has.
    #[test]
    fn the_pair_state_serialises_to_the_status_strings() {
        let all = [
            (PairState::NotMirrored, "not-mirrored"),
            (PairState::Connecting, "connecting"),
            (PairState::OutOfSync, "out-of-sync"),
            (PairState::Resyncing, "resyncing"),
            (PairState::Baseline, "baseline"),
            (PairState::InSync, "in-sync"),
            (PairState::Fenced, "fenced"),
            (PairState::Failed, "failed"),
            (PairState::Quiescing, "quiescing"),
        ];
        for (state, text) in all {
            assert_eq!(serde_json::to_value(state).expect("serialise"), serde_json::Value::String(text.into()));
            assert_eq!(state.as_str(), text);
            assert_eq!(state.to_string(), text);
            assert_eq!(serde_json::from_value::<PairState>(text.into()).expect("deserialise"), state);
        }
    }
}
