//! `raid-write`: full-stripe writes through the RAID-4 layer against the same bytes written
//! raw to the same number of files.
//!
//! Ours: a RAID-4 volume (3 data disks + parity, 64 KiB stripe unit) over member files
//! opened with the io_uring engine; each operation is one `write_many` of a run of whole
//! stripes (parity from the new data alone, a crc32c per block), and each batch ends with a
//! flush (checksum blocks, then `fdatasync` of every member). The floor: four files of
//! the same size on the same engine, each operation writing the same data units to the
//! data files and one unit per stripe to the fourth file (the bytes parity would take, not
//! computed), the files side by side as the RAID layer writes its members, each batch
//! ending with `fdatasync` of every file. Throughput counts the volume's data bytes.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use nvmirror_dataplane::raid::{Geometry, Raid4};
use nvmirror_dataplane::storage::{BlockDevice, DiskSpec, Engine, WriteOp};
use serde_json::json;

use crate::measure::{interleave, Arm, CpuProbe, Plan, Spread};
use crate::report::{workspace_root, Check, ScenarioResult};

const DATA_DISKS: u32 = 3;
const STRIPE_UNIT: u32 = 64 << 10;
/// Stripes per write.
const STRIPES_PER_OP: u64 = 8;

struct Params {
    volume_bytes: u64,
    ops_per_batch: u64,
    plan: Plan,
}

impl Params {
    fn new(quick: bool) -> Self {
        if quick {
            Params { volume_bytes: 8 << 20, ops_per_batch: 2, plan: Plan { warmup_rounds: 0, rounds: 1 } }
        } else {
            Params { volume_bytes: 384 << 20, ops_per_batch: 24, plan: Plan { warmup_rounds: 1, rounds: 8 } }
        }
    }
}

/// Opens `path` with the io_uring engine, or, where this build or filesystem has none,
/// with pread (said in the result).
fn open(path: &std::path::Path, size: u64, engine: &mut Engine) -> Result<Arc<dyn BlockDevice>> {
    let spec = DiskSpec { engine: *engine, path: path.to_path_buf() };
    match spec.open(Some(size)) {
        Ok(d) => Ok(d),
        Err(e) if *engine == Engine::Uring => {
            eprintln!("[raid-write] io_uring engine unavailable ({e}); measuring with pread");
            *engine = Engine::Pread;
            let _ = std::fs::remove_file(path);
            open(path, size, engine)
        }
        Err(e) => Err(e).with_context(|| format!("open {}", path.display())),
    }
}

pub fn run(quick: bool) -> Result<ScenarioResult> {
    let p = Params::new(quick);
    let base = workspace_root().join("target");
    std::fs::create_dir_all(&base)?;
    // On the repository's filesystem: O_DIRECT does not work on tmpfs.
    let dir = tempfile::Builder::new().prefix("nvmirror-bench-raid-").tempdir_in(&base)?;
    let geo = Geometry::new(DATA_DISKS, STRIPE_UNIT, p.volume_bytes).map_err(anyhow::Error::msg)?;
    let mut engine = Engine::Uring;
    let members: Vec<(DiskSpec, Arc<dyn BlockDevice>)> = (0..geo.members())
        .map(|i| {
            let path = dir.path().join(format!("member{i}"));
            let dev = open(&path, geo.member_bytes(), &mut engine)?;
            Ok((DiskSpec { engine, path }, dev))
        })
        .collect::<Result<_>>()?;
    let raid = Raid4::create_devices("bench", members, geo)?;
    let raw: Vec<Arc<dyn BlockDevice>> = (0..geo.members())
        .map(|i| open(&dir.path().join(format!("raw{i}")), geo.member_bytes(), &mut engine))
        .collect::<Result<_>>()?;

    let stripe_bytes = u64::from(STRIPE_UNIT) * u64::from(DATA_DISKS);
    let op_bytes = stripe_bytes * STRIPES_PER_OP;
    let ops_in_volume = geo.stripes() / STRIPES_PER_OP;
    anyhow::ensure!(ops_in_volume > 0, "volume too small for one write");
    let data: Vec<u8> = (0..op_bytes).map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[2]).collect();
    let unit = nvmirror_dataplane::usize_of(u64::from(STRIPE_UNIT));
    let data_offset = geo.data_offset();

    let mut next_ours = 0u64;
    let mut next_raw = 0u64;
    let cpu = CpuProbe::this_process();
    let ops = p.ops_per_batch;
    let mut arms = [
        Arm::new(
            "raid4",
            None,
            Box::new(|b| {
                for _ in 0..ops {
                    let at = (next_ours % ops_in_volume) * op_bytes;
                    next_ours += 1;
                    let t = Instant::now();
                    raid.write_many(&[WriteOp { offset: at, buf: &data }])?;
                    b.record(t.elapsed());
                }
                raid.flush()?;
                Ok(())
            }),
        ),
        Arm::new(
            "raw",
            None,
            Box::new(|b| {
                for _ in 0..ops {
                    let stripe0 = (next_raw % ops_in_volume) * STRIPES_PER_OP;
                    next_raw += 1;
                    let t = Instant::now();
                    std::thread::scope(|s| -> Result<()> {
                        let handles: Vec<_> = raw
                            .iter()
                            .enumerate()
                            .map(|(m, dev)| {
                                let data = &data;
                                s.spawn(move || {
                                    let wops: Vec<WriteOp<'_>> = (0..STRIPES_PER_OP)
                                        .map(|k| {
                                            // Data files take their units of the stripe; the
                                            // fourth file takes a unit-sized piece too.
                                            let from = nvmirror_dataplane::usize_of(k * stripe_bytes)
                                                + (m % DATA_DISKS as usize) * unit;
                                            WriteOp {
                                                offset: data_offset + (stripe0 + k) * u64::from(STRIPE_UNIT),
                                                buf: &data[from..from + unit],
                                            }
                                        })
                                        .collect();
                                    dev.write_many(&wops)
                                })
                            })
                            .collect();
                        for h in handles {
                            h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
                        }
                        Ok(())
                    })?;
                    b.record(t.elapsed());
                }
                for dev in &raw {
                    dev.flush()?;
                }
                Ok(())
            }),
        ),
    ];
    interleave("raid-write", p.plan, &cpu, &mut arms)?;
    let [ours, floor] = arms.map(|a| a.stats);
    let ratio = ours.throughput() / floor.throughput().max(f64::MIN_POSITIVE);
    let per_round = Spread::of(ours.rounds.len(), |i| {
        ours.rounds[i].throughput() / floor.rounds[i].throughput().max(f64::MIN_POSITIVE)
    });
    let mb = |ops_per_s: f64| ops_per_s * op_bytes as f64 / 1e6;
    let status = raid.status();
    Ok(ScenarioResult {
        name: "raid-write".into(),
        description: format!(
            "full-stripe writes of {} KiB ({STRIPES_PER_OP} stripes of a 3+1 RAID-4, 64 KiB unit) through the {} \
             engine, a flush per batch; floor: the same bytes written to 4 files on the same engine with no parity \
             and no checksums",
            op_bytes >> 10,
            engine.name()
        ),
        params: json!({
            "engine": engine.name(),
            "data_disks": DATA_DISKS,
            "stripe_unit": STRIPE_UNIT,
            "volume_bytes": p.volume_bytes,
            "op_bytes": op_bytes,
            "ops_per_batch": ops,
            "xor_path": status.xor_path,
            "plan": p.plan,
        }),
        cpu_counted: cpu.describe(),
        check: Some(Check::at_least("throughput(raid4) / throughput(raw)", ratio, 0.75, per_round)),
        arms: vec![ours.result(), floor.result()],
        notes: vec![format!(
            "data throughput: raid4 {:.0} MB/s, raw {:.0} MB/s ({} engine{})",
            mb(ours.throughput()),
            mb(floor.throughput()),
            engine.name(),
            if engine == Engine::Uring { ", O_DIRECT" } else { ": the io_uring engine was not available" }
        )],
    })
}
