//! `hw-dax-nvram`: the `dax:` NVRAM mode on a real DAX mount, run inside the hw-tests guest.
//!
//! ```text
//! hw-dax-nvram --dax-dir DIR [--plain-dir DIR]...
//! ```
//!
//! `--dax-dir` must be a directory on a filesystem mounted with `-o dax` (the guest's
//! ext4 on the emulated NVDIMM, `/dev/pmem0`); each `--plain-dir` must be on a filesystem
//! without DAX (the guest's overlay root, a tmpfs). The program checks, and exits non-zero
//! with the first failure:
//!
//! 1. A `MappedNvram` in mode `Dax` opens on the DAX mount (`MAP_SYNC` accepted), takes a
//!    pattern, persists it with cache-line write-back, and holds it after unmap and reopen.
//!    A reopen at another size is refused.
//! 2. Mode `Dax` is refused on every plain directory: the mode never pretends.
//! 3. An `NvLog` over a `Box<dyn Nvram>` in mode `Dax`: entries appended to both
//!    partitions, persisted, unmapped, and found again by the scan at reopen, data
//!    included. A byte flipped in the last entry's data stops the scan at that entry
//!    (reported as a problem) and keeps every entry before it.
//!
//! Lines `hwt-detail: TEXT` and `hwt-figure: KEY=VALUE` are picked up by the guest runner
//! (`hw-tests/guest/plan.sh`) into the test's result.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use nvmirror_dataplane::format::{EntryHeader, EntryKind, PartitionHeader, ENTRY_HEADER_BYTES};
use nvmirror_dataplane::log::NvLog;
use nvmirror_dataplane::nvram::{MappedNvram, Nvram, NvramMode};

/// Size of the plain pattern region: several huge-page-sized chunks, so that the mapping
/// spans more than one page table of the DAX file.
const REGION_BYTES: usize = 8 << 20;
/// NVLog partition size for the round trip.
const PARTITION_BYTES: usize = 1 << 20;
const VOLUME_ID: u64 = 0x6877_2d74_6573_7473;
const EPOCH: u64 = 3;

struct Args {
    dax_dir: PathBuf,
    plain_dirs: Vec<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut dax_dir = None;
    let mut plain_dirs = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dax-dir" => dax_dir = Some(PathBuf::from(it.next().context("--dax-dir needs a value")?)),
            "--plain-dir" => plain_dirs.push(PathBuf::from(it.next().context("--plain-dir needs a value")?)),
            _ => bail!("unknown argument {a:?}; usage: hw-dax-nvram --dax-dir DIR [--plain-dir DIR]..."),
        }
    }
    Ok(Args { dax_dir: dax_dir.context("--dax-dir is required")?, plain_dirs })
}

/// The byte at `i` of the pattern `seed`: varies within and across cache lines and pages.
fn pattern(seed: u64, i: usize) -> u8 {
    let x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
    x.to_le_bytes()[7] ^ x.to_le_bytes()[0]
}

fn check_region(dir: &Path) -> Result<()> {
    let path = dir.join("region");
    let _ = std::fs::remove_file(&path);
    let seed = 0x5eed_0001;
    let started = Instant::now();
    {
        let mut r = MappedNvram::open(&path, REGION_BYTES, NvramMode::Dax)
            .with_context(|| format!("mode dax on the DAX mount {}", dir.display()))?;
        ensure!(r.mode() == NvramMode::Dax, "region opened in mode {:?}", r.mode());
        for (i, b) in r.bytes_mut().iter_mut().enumerate() {
            *b = pattern(seed, i);
        }
        r.persist(0, REGION_BYTES).context("persist the whole region")?;
        // Small persists at odd offsets and lengths, the way group commit issues them.
        for (off, len) in [(1usize, 1usize), (63, 2), (4095, 4097), (REGION_BYTES - 7, 7)] {
            r.bytes_mut()[off] ^= 0xff;
            r.persist(off, len).with_context(|| format!("persist {len} bytes at {off}"))?;
            r.bytes_mut()[off] ^= 0xff;
            r.persist(off, len).with_context(|| format!("persist {len} bytes at {off}"))?;
        }
    }
    let r = MappedNvram::open(&path, REGION_BYTES, NvramMode::Dax).context("reopen the DAX region")?;
    if let Some(i) = r.bytes().iter().enumerate().position(|(i, b)| *b != pattern(seed, i)) {
        bail!("DAX region differs after reopen at byte {i}");
    }
    drop(r);
    ensure!(
        MappedNvram::open(&path, REGION_BYTES * 2, NvramMode::Dax).is_err(),
        "reopening the DAX region at another size was not refused"
    );
    println!(
        "hwt-detail: dax region of {} MiB written, persisted, reopened and verified in {} ms",
        REGION_BYTES >> 20,
        started.elapsed().as_millis()
    );
    Ok(())
}

fn check_refused_off_dax(dir: &Path) -> Result<()> {
    let path = dir.join("hw-dax-nvram-refused");
    let _ = std::fs::remove_file(&path);
    let res = MappedNvram::open(&path, 1 << 20, NvramMode::Dax);
    let _ = std::fs::remove_file(&path);
    match res {
        Ok(_) => bail!("mode dax was accepted on {}, which is not a DAX mount", dir.display()),
        Err(e) => {
            println!("mode dax refused on {} as it must be: {e}", dir.display());
            Ok(())
        }
    }
}

fn entry(partition: u8, seq: u64, data_len: u32) -> EntryHeader {
    // Every fifth entry is a trim: a header without data.
    let (kind, length, data_len) =
        if seq.is_multiple_of(5) { (EntryKind::Trim, 8192, 0) } else { (EntryKind::Write, data_len, data_len) };
    EntryHeader { kind, partition, volume_id: VOLUME_ID, epoch: EPOCH, seq, offset: seq * 4096, length, data_len }
}

fn entry_data(h: &EntryHeader) -> Vec<u8> {
    (0..h.data_len as usize).map(|i| pattern(h.seq, i)).collect()
}

fn open_log(path: &Path) -> Result<(NvLog<Box<dyn Nvram>>, nvmirror_dataplane::log::Recovered)> {
    let len = NvLog::<Box<dyn Nvram>>::region_bytes(PARTITION_BYTES);
    let nv: Box<dyn Nvram> = Box::new(MappedNvram::open(path, len, NvramMode::Dax).context("map the NVLog region")?);
    NvLog::open(nv, VOLUME_ID, PARTITION_BYTES).context("open the NVLog")
}

fn check_nvlog(dir: &Path) -> Result<()> {
    let path = dir.join("nvlog");
    let _ = std::fs::remove_file(&path);
    let sizes = [4096u32, 512, 1, 65, 8192, 4096, 100, 12288];
    let mut written: Vec<EntryHeader> = Vec::new();
    let started = Instant::now();
    {
        let (mut log, rec) = open_log(&path)?;
        ensure!(rec.entries_in_order().is_empty(), "a fresh NVLog scanned {} entries", rec.entries_in_order().len());
        let mut seq = 1u64;
        for (p, count) in [(0u8, 40u64), (1, 13)] {
            log.open_partition(PartitionHeader {
                partition: p,
                volume_id: VOLUME_ID,
                cp_gen: u64::from(p) + 1,
                first_seq: seq,
                epoch: EPOCH,
            })?;
            for k in 0..count {
                let h = entry(p, seq, sizes[usize::try_from(k).expect("small") % sizes.len()]);
                log.append(&h, &entry_data(&h)).map_err(|e| anyhow::anyhow!("append seq {seq}: {e}"))?;
                written.push(h);
                seq += 1;
                // Group commit every few entries, as the source's poller does.
                if seq.is_multiple_of(4) {
                    log.persist(p)?;
                }
            }
            log.persist(p)?;
        }
    }
    let check = |log: &NvLog<Box<dyn Nvram>>, found: &[(u8, usize, EntryHeader)], expect: &[EntryHeader]| {
        ensure!(found.len() == expect.len(), "scan found {} entries, expected {}", found.len(), expect.len());
        for ((p, at, h), want) in found.iter().zip(expect) {
            ensure!(h == want, "entry seq {} read back as {h:?}, written as {want:?}", want.seq);
            let data = &log.partition(*p)[at + ENTRY_HEADER_BYTES..at + ENTRY_HEADER_BYTES + h.data_len as usize];
            ensure!(data == entry_data(want).as_slice(), "data of entry seq {} differs", want.seq);
        }
        Ok::<(), anyhow::Error>(())
    };
    let (last_p, last_at) = {
        let (log, rec) = open_log(&path).context("reopen the NVLog")?;
        ensure!(rec.problems().is_empty(), "clean NVLog scanned with problems: {:?}", rec.problems());
        let found = rec.entries_in_order();
        check(&log, &found, &written)?;
        let (p, at, _) = *found.last().context("no entries")?;
        (p, at)
    };
    let clean_ms = started.elapsed().as_millis();
    // Tear the last entry: flip a byte of its data straight in the DAX mapping and persist.
    let last = *written.last().context("no entries written")?;
    ensure!(last.data_len > 0, "the last entry must carry data for the torn-entry check");
    {
        let len = NvLog::<Box<dyn Nvram>>::region_bytes(PARTITION_BYTES);
        let mut raw = MappedNvram::open(&path, len, NvramMode::Dax)?;
        // A region for partitions of 0 bytes is the superblock alone: where partition 0 starts.
        let superblock_bytes = NvLog::<Box<dyn Nvram>>::region_bytes(0);
        let at = superblock_bytes + usize::from(last_p) * PARTITION_BYTES + last_at + ENTRY_HEADER_BYTES;
        raw.bytes_mut()[at] ^= 0x01;
        raw.persist(at, 1)?;
    }
    {
        let (log, rec) = open_log(&path).context("reopen the torn NVLog")?;
        let found = rec.entries_in_order();
        check(&log, &found, &written[..written.len() - 1])?;
        ensure!(rec.problems().len() == 1, "torn entry not reported: {:?}", rec.problems());
        println!("torn last entry stopped the scan as it must: {}", rec.problems()[0]);
    }
    println!(
        "hwt-detail: NVLog over dax: {} entries in 2 partitions appended, persisted, rescanned ({clean_ms} ms); torn tail refused",
        written.len()
    );
    println!("hwt-figure: nvlog_entries={}", written.len());
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    check_region(&args.dax_dir)?;
    for d in &args.plain_dirs {
        check_refused_off_dax(d)?;
    }
    println!("hwt-detail: dax refused on {} non-DAX dir(s)", args.plain_dirs.len());
    check_nvlog(&args.dax_dir)?;
    println!("hw-dax-nvram: all checks passed");
    Ok(())
}
