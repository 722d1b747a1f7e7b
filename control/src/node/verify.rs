//! `verify VOL`: the primary against its mirror, online, by region checksums (as `drbdadm
//! verify`). Both sides are compared as of a CP. A region that differs is compared again
//! after another CP, up to [`RECHECKS`] times. It is reported as differing once both sides
//! read the same as in the pass before and still differ: stable contents that disagree. A
//! region that changes on every pass (written to while verify runs, or caught by a CP in
//! flight) is reported as busy, not compared, never as damage.

use std::collections::BTreeMap;

use super::*;

/// Bytes a checksum request covers at most (one call to the mirror's node).
pub const CHECKSUM_SPAN_MAX: u64 = 256 << 20;
/// The region size range: each region has one checksum.
pub const REGION_MIN: u64 = 4096;
pub const REGION_MAX: u64 = 64 << 20;
/// The region size where the caller gives none.
pub const REGION_DEFAULT: u64 = 1 << 20;
/// Passes over the regions that differed (each after a fresh CP) before a difference is
/// reported.
const RECHECKS: usize = 3;

/// A span of a volume, summed region by region: `[offset, offset + length)`, one crc32c
/// per `region` bytes (the last region may be shorter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SumSpan {
    pub offset: u64,
    pub length: u64,
    pub region: u64,
}

/// What `verify` found.
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub volume: String,
    pub peer: String,
    /// The CP both sides were first compared at.
    pub cp: u64,
    pub region_bytes: u64,
    pub regions: u64,
    /// Regions that differed in the first pass and were compared again.
    pub rechecked: u64,
    /// Regions that differ: (offset, length) in bytes.
    pub differing: Vec<(u64, u64)>,
    /// Regions that changed on every pass (written to meanwhile): not compared.
    pub busy: Vec<(u64, u64)>,
    /// With repair: the differing regions the primary's contents were written to the
    /// mirror over, and that compared equal after. Those still differing stay in
    /// `differing`.
    pub repaired: Vec<(u64, u64)>,
    pub duration_ms: u64,
}

/// crc32c of each `region` bytes of `[offset, offset + length)`, read by `read`.
pub fn region_sums(
    offset: u64,
    length: u64,
    region: u64,
    mut read: impl FnMut(&mut [u8], u64) -> io::Result<()>,
) -> Result<Vec<u32>> {
    check_span(length, region)?;
    let mut buf = vec![0u8; nvmirror_dataplane::usize_of(region)];
    let mut sums = Vec::with_capacity(nvmirror_dataplane::usize_of(length.div_ceil(region)));
    let mut at = offset;
    while at < offset + length {
        let n = nvmirror_dataplane::usize_of(region.min(offset + length - at));
        read(&mut buf[..n], at).with_context(|| format!("read {n} bytes at {at}"))?;
        sums.push(nvmirror_dataplane::checksum::crc32c(&buf[..n]));
        at += n as u64;
    }
    Ok(sums)
}

/// The regions starting at `starts` (sorted), as spans of adjacent regions of at most
/// [`CHECKSUM_SPAN_MAX`] bytes, within a volume of `size` bytes.
fn spans_of(starts: &[u64], region: u64, size: u64) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for &at in starts {
        let len = region.min(size - at);
        match spans.last_mut() {
            Some((s, l)) if *s + *l == at && *l + len <= CHECKSUM_SPAN_MAX => *l += len,
            _ => spans.push((at, len)),
        }
    }
    spans
}

/// A checksum request's span and region size, within bounds.
pub fn check_span(length: u64, region: u64) -> Result<()> {
    if !(REGION_MIN..=REGION_MAX).contains(&region) || !region.is_multiple_of(REGION_MIN) {
        bail!("region {region}: a multiple of {REGION_MIN} bytes from {REGION_MIN} to {REGION_MAX}");
    }
    if length == 0 || length > CHECKSUM_SPAN_MAX {
        bail!("length {length}: from 1 to {CHECKSUM_SPAN_MAX} bytes");
    }
    Ok(())
}

impl Node {
    /// The region checksums of the mirror of `volume` from `source`, as of its last
    /// applied CP (which is returned with them).
    pub fn mirror_sums(&self, source: &str, volume: &str, span: SumSpan) -> Result<(u64, Vec<u32>)> {
        let m = self.mirrors.read().get(&(source.to_string(), volume.to_string())).cloned();
        let m = m.ok_or_else(|| NotFound(format!("no mirror of {volume} from {source} on this node")))?;
        let cp = m.meta().applied_cp;
        let sums = region_sums(span.offset, span.length, span.region, |buf, at| m.read(buf, at))?;
        Ok((cp, sums))
    }

    /// Compares primary volume `name` with its mirror, region by region; with `repair`,
    /// writes the primary's contents of each region that differs to the mirror (as a write
    /// through the volume's log, like any other), and compares those regions again.
    pub fn verify(&self, name: &str, region: Option<u64>, repair: bool) -> Result<VerifyReport> {
        let started = std::time::Instant::now();
        let region = region.unwrap_or(REGION_DEFAULT);
        check_span(region, region)?;
        let rec = self.volume_record(name)?;
        let Some(target) = rec.mirror.clone() else {
            bail!("volume {name} is not mirrored: there is nothing to verify it against")
        };
        let device = self
            .storage
            .read()
            .get(&StorageOwner::Volume(name.to_string()))
            .map(|(_, o)| o.device.clone())
            .ok_or_else(|| anyhow!("volume {name} is not open"))?;
        // The regions that differ, with both sides' sums, by the spans compared.
        let compare = |spans: &[(u64, u64)]| -> Result<BTreeMap<u64, (u32, u32)>> {
            let mut differ = BTreeMap::new();
            for &(at, len) in spans {
                let span = SumSpan { offset: at, length: len, region };
                let theirs = self.cfg.peers.checksums(&target.peer_control, name, &self.cfg.name, span)?;
                let ours = region_sums(at, len, region, |buf, off| device.read_at(buf, off))?;
                if theirs.len() != ours.len() {
                    bail!("{} answered {} checksums for {} regions", target.peer_name, theirs.len(), ours.len());
                }
                for i in (0..ours.len()).filter(|&i| ours[i] != theirs[i]) {
                    differ.insert(at + i as u64 * region, (ours[i], theirs[i]));
                }
            }
            Ok(differ)
        };
        let cp = self.cp(name, Duration::from_secs(120))?;
        let spans: Vec<(u64, u64)> = (0..rec.size.div_ceil(CHECKSUM_SPAN_MAX))
            .map(|i| i * CHECKSUM_SPAN_MAX)
            .map(|at| (at, CHECKSUM_SPAN_MAX.min(rec.size - at)))
            .collect();
        let mut pending = compare(&spans)?;
        let rechecked = pending.len() as u64;
        // Stable and different: the same sums on both sides as in the pass before.
        let mut damaged: Vec<u64> = Vec::new();
        for _ in 0..RECHECKS {
            if pending.is_empty() {
                break;
            }
            self.cp(name, Duration::from_secs(120))?;
            let starts: Vec<u64> = pending.keys().copied().collect();
            let again = compare(&spans_of(&starts, region, rec.size))?;
            pending = again
                .into_iter()
                .filter(|(at, sums)| {
                    let stable = pending.get(at) == Some(sums);
                    if stable {
                        damaged.push(*at);
                    }
                    !stable
                })
                .collect();
        }
        damaged.sort_unstable();
        let extent = |at: &u64| (*at, region.min(rec.size - at));
        let mut repaired = Vec::new();
        if repair && !damaged.is_empty() {
            for at in &damaged {
                let (offset, len) = extent(at);
                self.rewrite(name, offset, len)?;
            }
            // The rewrites reach the mirror's volume with the next CP.
            self.cp(name, Duration::from_secs(120))?;
            let still = compare(&spans_of(&damaged, region, rec.size))?;
            (repaired, damaged) = damaged.into_iter().partition(|at| !still.contains_key(at));
            tracing::info!(
                "volume {name}: verify repaired {} regions on {}; {} still differ",
                repaired.len(),
                target.peer_name,
                damaged.len()
            );
        }
        let report = VerifyReport {
            volume: name.to_string(),
            peer: target.peer_name.clone(),
            cp,
            region_bytes: region,
            regions: rec.size.div_ceil(region),
            rechecked,
            differing: damaged.iter().map(extent).collect(),
            busy: pending.keys().map(extent).collect(),
            repaired: repaired.iter().map(extent).collect(),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        self.events.push("verify-finished", Some(name), serde_json::to_value(&report).unwrap_or_default());
        if !report.differing.is_empty() {
            tracing::warn!(
                "volume {name}: verify found {} regions that differ from the mirror on {}",
                report.differing.len(),
                report.peer
            );
        }
        Ok(report)
    }

    /// Logs the current contents of `len` bytes at `offset` of volume `name` again, and
    /// waits until they are persistent on both sites. Retried while writes wait for log
    /// space (the poller refuses it then).
    fn rewrite(&self, name: &str, offset: u64, len: u64) -> Result<()> {
        let handle = self.volume(name)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let (tx, rx) = bounded(1);
            let done = nvmirror_dataplane::frontend::Completer::new(0, tx);
            handle.control(Control::Rewrite { offset, len, done }).map_err(|e| anyhow!(e))?;
            let reply = rx
                .recv_timeout(Duration::from_secs(120))
                .map_err(|_| anyhow!("volume {name}: the rewrite of {len} bytes at {offset} was not answered"))?;
            match reply.result {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => bail!("volume {name}: rewrite of {len} bytes at {offset}: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_regions_make_one_span_up_to_the_bound() {
        let r = 1 << 20;
        assert_eq!(spans_of(&[0, r, 3 * r], r, 10 * r), [(0, 2 * r), (3 * r, r)]);
        // The last region of a volume that is not a multiple of the region size is short.
        assert_eq!(spans_of(&[9 * r], r, 9 * r + 4096), [(9 * r, 4096)]);
        let many: Vec<u64> = (0..300).map(|i| i * r).collect();
        let spans = spans_of(&many, r, 300 * r);
        assert_eq!(spans, [(0, CHECKSUM_SPAN_MAX), (CHECKSUM_SPAN_MAX, 300 * r - CHECKSUM_SPAN_MAX)]);
    }

    #[test]
    fn spans_and_regions_out_of_bounds_are_refused() {
        assert!(check_span(1 << 20, 1 << 20).is_ok());
        for (len, region) in [(0, 4096), (CHECKSUM_SPAN_MAX + 1, 4096), (4096, 100), (4096, REGION_MAX * 2)] {
            assert!(check_span(len, region).is_err(), "{len} {region}");
        }
        let sums = region_sums(0, 8192 + 100, 4096, |buf, _| {
            buf.fill(7);
            Ok(())
        })
        .unwrap();
        assert_eq!(sums.len(), 3);
        assert_eq!(sums[0], sums[1]);
        assert_ne!(sums[1], sums[2], "the short last region is summed over its own bytes");
    }
}
