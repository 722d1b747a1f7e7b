//! The NVMe passthrough engine on the guest's emulated NVMe drives.
//!
//! 1. Random batches written through `NvmeDevice` (io_uring `uring_cmd` on /dev/ngXnY)
//!    read back equal through it, through the io_uring engine on the block device
//!    (O_DIRECT) and the other way round; a flush succeeds on both; an out-of-range or
//!    partial-block request is a clear error and leaves the device usable.
//! 2. Figures (not assertions): 4 KiB writes and reads at queue depth 1 (p50, p99, IOPS)
//!    and in batches of 32 (IOPS), NVMe passthrough against io_uring on the block device.
//! 3. A RAID-4 volume over four NVMe namespaces, every member through the passthrough
//!    engine: written, read back, scrubbed clean, and read back equal with a member gone.
//!
//! Usage: hw-nvme-engine --chr /dev/ng0n1 --blk /dev/nvme0n1 --raid A,B,C,D

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use hdrhistogram::Histogram;
use nvmirror_dataplane::raid::{Geometry, Raid4};
use nvmirror_dataplane::storage::{BlockDevice, DiskSpec, NvmeDevice, ReadOp, UringDevice, WriteOp};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next().to_le_bytes()[3]).collect()
    }
}

/// Writes random batches through `w` and reads them back through `r1` and `r2`.
fn round_trip(
    w: &dyn BlockDevice,
    r1: &dyn BlockDevice,
    r2: &dyn BlockDevice,
    rng: &mut Rng,
    span: u64,
) -> Result<u64> {
    let mut blocks = 0;
    for _ in 0..8 {
        let mut ops: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut at = rng.next() % 64 * 4096;
        for _ in 0..16 {
            let n = 1 + rng.next() % 24;
            if at + n * 4096 > span {
                break;
            }
            ops.push((at, rng.bytes(usize::try_from(n * 4096)?)));
            blocks += n;
            at += (n + rng.next() % 8) * 4096;
        }
        let wops: Vec<WriteOp<'_>> = ops.iter().map(|(o, d)| WriteOp { offset: *o, buf: d }).collect();
        w.write_many(&wops)?;
        w.flush()?;
        for r in [r1, r2] {
            let mut bufs: Vec<Vec<u8>> = ops.iter().map(|(_, d)| vec![0; d.len()]).collect();
            let mut rops: Vec<ReadOp<'_>> =
                ops.iter().zip(bufs.iter_mut()).map(|((o, _), b)| ReadOp { offset: *o, buf: b }).collect();
            r.read_many(&mut rops)?;
            for ((o, d), b) in ops.iter().zip(&bufs) {
                ensure!(d == b, "blocks at {o} read back different");
            }
        }
    }
    Ok(blocks)
}

/// 4 KiB I/Os at queue depth 1 at random blocks: their latencies (ns) and the IOPS.
fn qd1(dev: &dyn BlockDevice, write: bool, rng: &mut Rng, span: u64) -> Result<(Histogram<u64>, f64)> {
    let mut h = Histogram::<u64>::new_with_bounds(100, 10_000_000_000, 3)?;
    let mut data = rng.bytes(4096);
    let n = 400u32;
    let all = Instant::now();
    for _ in 0..n {
        let off = rng.next() % (span / 4096) * 4096;
        let t = Instant::now();
        if write {
            dev.write_at(&data, off)?;
        } else {
            dev.read_at(&mut data, off)?;
        }
        h.record(u64::try_from(t.elapsed().as_nanos())?)?;
    }
    Ok((h, f64::from(n) / all.elapsed().as_secs_f64()))
}

/// Batches of 32 4 KiB I/Os at random distinct blocks, each batch submitted whole
/// (`write_many`/`read_many`): the IOPS.
fn batch32(dev: &dyn BlockDevice, write: bool, rng: &mut Rng, span: u64) -> Result<f64> {
    let data = rng.bytes(4096);
    let mut bufs = vec![vec![0u8; 4096]; 32];
    let t = Instant::now();
    let mut ios = 0usize;
    for _ in 0..40 {
        let mut offs: Vec<u64> = (0..32).map(|_| rng.next() % (span / 4096) * 4096).collect();
        offs.sort_unstable();
        offs.dedup();
        ios += offs.len();
        if write {
            let ops: Vec<WriteOp<'_>> = offs.iter().map(|&o| WriteOp { offset: o, buf: &data }).collect();
            dev.write_many(&ops)?;
        } else {
            let mut ops: Vec<ReadOp<'_>> =
                offs.iter().zip(bufs.iter_mut()).map(|(&o, b)| ReadOp { offset: o, buf: b }).collect();
            dev.read_many(&mut ops)?;
        }
    }
    Ok(ios as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let chr = arg(&args, "--chr").ok_or_else(|| anyhow!("--chr /dev/ngXnY"))?;
    let blk = arg(&args, "--blk").ok_or_else(|| anyhow!("--blk /dev/nvmeXnY"))?;
    let raid: Vec<String> =
        arg(&args, "--raid").ok_or_else(|| anyhow!("--raid A,B,C,D"))?.split(',').map(String::from).collect();
    let mut rng = Rng(0x6e76_6d65_0001);

    // 1. The engine.
    let span = 16u64 << 20;
    let nvme = NvmeDevice::open(Path::new(&chr), Some(span)).context("open the namespace")?;
    println!(
        "{chr}: namespace {}, {} B logical blocks, {} MiB; using the first {} MiB",
        nvme.nsid(),
        nvme.lba_bytes(),
        nvme.capacity() >> 20,
        span >> 20
    );
    let uring = UringDevice::open(Path::new(&blk)).context("open the block device with O_DIRECT")?;
    let a = round_trip(&nvme, &nvme, &uring, &mut rng, span).context("NVMe writes, NVMe and block-device reads")?;
    let b = round_trip(&uring, &nvme, &uring, &mut rng, span).context("block-device writes, NVMe reads")?;
    println!("hwt-check: {a} blocks written by NVMe passthrough and {b} by io_uring read back equal through both");
    nvme.flush().context("NVMe Flush")?;
    uring.flush().context("io_uring fdatasync on the block device")?;
    println!("hwt-check: NVMe Flush through passthrough and IORING_OP_FSYNC (datasync) on the block device succeed");
    let e = nvme.write_at(&[0u8; 4096], span).err().ok_or_else(|| anyhow!("a write past the end was accepted"))?;
    ensure!(e.kind() == std::io::ErrorKind::InvalidInput, "out of range: {e}");
    let e2 = nvme.write_at(&[0u8; 100], 0).err().ok_or_else(|| anyhow!("a partial-block write was accepted"))?;
    nvme.write_at(&[9u8; 4096], 0).context("the device after refused requests")?;
    println!("hwt-check: out of range refused ({e}); partial block refused ({e2}); still usable");

    // 2. Figures (TCG guest: for comparing the two engines side by side, nothing else).
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    for (op, write) in [("write", true), ("read", false)] {
        for (engine, dev) in [("nvme_passthrough", &nvme as &dyn BlockDevice), ("uring_blockdev", &uring)] {
            let (h, iops) = qd1(dev, write, &mut rng, span)?;
            println!("hwt-figure: {engine}_{op}_4k_qd1_p50_us={:.1}", us(&h, 0.5));
            println!("hwt-figure: {engine}_{op}_4k_qd1_p99_us={:.1}", us(&h, 0.99));
            println!("hwt-figure: {engine}_{op}_4k_qd1_iops={iops:.0}");
        }
        for (engine, dev) in [("nvme_passthrough", &nvme as &dyn BlockDevice), ("uring_blockdev", &uring)] {
            println!("hwt-figure: {engine}_{op}_4k_batch32_iops={:.0}", batch32(dev, write, &mut rng, span)?);
        }
    }
    drop(nvme);
    drop(uring);

    // 3. RAID-4 over four namespaces through the passthrough engine.
    ensure!(raid.len() == 4, "four namespaces for the RAID-4 test");
    let specs: Vec<DiskSpec> =
        raid.iter().map(|p| DiskSpec::parse(&format!("nvme:{p}"))).collect::<Result<_, _>>().map_err(|e| anyhow!(e))?;
    let geo = Geometry::new(3, 64 << 10, 48 << 20).map_err(|e| anyhow!(e))?;
    let t = Instant::now();
    let r = Raid4::create("nvme-raid", &specs, geo).context("create RAID-4 over NVMe")?;
    let data = rng.bytes(48 << 20);
    r.write_at(&data, 0)?;
    r.flush()?;
    let mut back = vec![0u8; data.len()];
    r.read_at(&mut back, 0)?;
    ensure!(back == data, "RAID-4 over NVMe read back different");
    let s = r.scrub(None)?;
    ensure!(s.result == "clean", "scrub: {s:?}");
    drop(r);
    let mut degraded = specs.clone();
    degraded[1] = DiskSpec::parse("nvme:/dev/ng-absent").map_err(|e| anyhow!(e))?;
    let r = Raid4::open("nvme-raid", &degraded).context("open degraded")?;
    let mut back = vec![0u8; data.len()];
    r.read_at(&mut back, 0)?;
    if back != data {
        bail!("degraded reads of RAID-4 over NVMe differ");
    }
    println!(
        "hwt-check: RAID-4 3+1 over {} NVMe namespaces (passthrough): 48 MiB written, read back, scrubbed clean ({} blocks), read back with member 1 gone ({:.1} s)",
        specs.len(),
        s.blocks_checked,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
