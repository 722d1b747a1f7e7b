//! 4 KiB random writes to a block device, O_DIRECT, at a fixed queue depth: the load that
//! `hw-tests/pair` drives through DRBD's /dev/drbd0 and through nvmirror's NBD export
//! attached as /dev/nbd0, so that both systems are kernel block devices under the same
//! program.
//!
//! The writes go through the io_uring engine's stream ([`UringDevice::write_stream`]):
//! `--depth` writes in flight, a new one submitted as soon as one completes (at depth 1,
//! one `io_uring_enter` per write, as a `pwrite` loop would make). Offsets are random
//! whole blocks in the first `--span` bytes of the device (xorshift, `--seed`). The run
//! stops after `--ops` writes or `--seconds`, whichever comes first: the stream runs in
//! chunks sized to take about `CHUNK_S` at the rate seen so far, and the time limit is
//! checked between them (when the queue is drained, which at queue depth 32 costs one
//! write's latency a chunk).
//!
//! Prints one JSON object on stdout: the device, depth, writes, wall time, writes per
//! second, the latency percentiles in microseconds (p50, p90, p99, p99.9, max, mean), and
//! the whole HdrHistogram as `[nanoseconds, count]` pairs, so that the caller can merge
//! rounds exactly.
//!
//! Usage: hw-blk-lat --dev /dev/drbd0 --depth 32 [--ops 20000] [--seconds 20] [--span 128M] [--seed 1]

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hdrhistogram::Histogram;
use nvmirror_dataplane::storage::{BlockDevice, UringDevice};
use serde_json::json;

const BLOCK_BYTES: u64 = 4096;
/// Seconds one call of the stream should take; the time limit is checked between calls.
const CHUNK_S: f64 = 0.5;
/// Highest latency recorded (one minute); slower writes saturate.
const LATENCY_NS_MAX: u64 = 60_000_000_000;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// A byte count with an optional K/M/G suffix (powers of 1024).
fn bytes(s: &str) -> Result<u64> {
    let (num, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num.parse().with_context(|| format!("not a byte count: {s:?}"))?;
    n.checked_mul(1 << shift).with_context(|| format!("byte count too large: {s:?}"))
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dev_path = arg(&args, "--dev").context("--dev PATH is required")?;
    let depth: usize = arg(&args, "--depth").context("--depth N is required")?.parse().context("--depth")?;
    let ops_max: u64 = arg(&args, "--ops").map_or(Ok(20_000), |v| v.parse()).context("--ops")?;
    let seconds: f64 = arg(&args, "--seconds").map_or(Ok(20.0), |v| v.parse()).context("--seconds")?;
    let span_arg = arg(&args, "--span").map_or(Ok(128 << 20), |v| bytes(&v))?;
    let seed: u64 = arg(&args, "--seed").map_or(Ok(1), |v| v.parse()).context("--seed")?;
    ensure!((1..=256).contains(&depth), "--depth must be 1 to 256");
    ensure!(ops_max > 0 && seconds > 0.0, "--ops and --seconds must be positive");

    let dev = UringDevice::open(Path::new(&dev_path)).with_context(|| format!("open {dev_path} (O_DIRECT)"))?;
    let span = span_arg.min(dev.size()) / BLOCK_BYTES * BLOCK_BYTES;
    if span < BLOCK_BYTES * 16 {
        bail!("{dev_path}: {} bytes to write into, too few for random writes", span);
    }
    let blocks = span / BLOCK_BYTES;
    // Random, non-repeating-looking bytes: nothing on the way can compress or skip them.
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let data: Vec<u8> = (0..BLOCK_BYTES).map(|_| next().to_le_bytes()[5]).collect();

    let mut hist = Histogram::<u64>::new_with_bounds(1, LATENCY_NS_MAX, 3).context("histogram bounds")?;
    let limit = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut done = 0u64;
    while done < ops_max && started.elapsed() < limit {
        // The first chunk is short (the rate is unknown), later ones about CHUNK_S long.
        let elapsed = started.elapsed().as_secs_f64();
        let rate = if done == 0 { 0.0 } else { done as f64 / elapsed.max(1e-6) };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped to a small positive range
        let sized = (rate * CHUNK_S).clamp(1.0, 1e6) as u64;
        let n = sized.max(2 * depth as u64).min(ops_max - done);
        dev.write_stream(&data, n, depth, || next() % blocks * BLOCK_BYTES, |ns| hist.saturating_record(ns.max(1)))
            .with_context(|| format!("{dev_path}: write at queue depth {depth} after {done} writes"))?;
        done += n;
    }
    let wall = started.elapsed().as_secs_f64();
    ensure!(hist.len() == done, "recorded {} latencies for {done} writes", hist.len());
    let buckets: Vec<[u64; 2]> = hist.iter_recorded().map(|v| [v.value_iterated_to(), v.count_at_value()]).collect();
    let out = json!({
        "dev": dev_path,
        "depth": depth,
        "span_bytes": span,
        "ops": done,
        "wall_s": wall,
        "ops_per_s": done as f64 / wall.max(f64::MIN_POSITIVE),
        "latency_us": {
            "p50": us(hist.value_at_quantile(0.5)),
            "p90": us(hist.value_at_quantile(0.9)),
            "p99": us(hist.value_at_quantile(0.99)),
            "p99.9": us(hist.value_at_quantile(0.999)),
            "max": us(hist.max()),
            "mean": hist.mean() / 1000.0,
        },
        "hist_ns": buckets,
    });
    println!("{out}");
    Ok(())
}
