//! The XOR of the RAID-4 layer (`nvmirror_dataplane::raid::xor`): four sources into one
//! parity buffer, against ISA-L's `xor_gen` (Debian's libisal-dev, linked with
//! `--features isal`) and against the portable path.
//!
//! - `xor-cache`: 16 KiB per source, the data in cache; ours / ISA-L, target ≥ 1.0.
//! - `xor-memory`: 64 MiB per source, memory-bound; ours / ISA-L, target ≥ 0.95.
//! - `xor-portable`: 16 KiB per source; ours / the portable path, target ≥ 3.
//!
//! An operation is one call over the four sources; throughput is reported as operations
//! per second and, in the notes, as GB/s of source bytes. Without the `isal` feature the
//! ISA-L arms are left out and the first two scenarios report no ratio, saying why.

use std::time::Instant;

use anyhow::Result;
use nvmirror_dataplane::raid::xor::{xor_gen_on, XorPath};
use serde_json::json;

use crate::measure::{interleave, Arm, ArmStats, CpuProbe, Plan, Spread};
use crate::report::{Check, ScenarioResult};

const SOURCES: usize = 4;

/// A buffer of `len` bytes starting on a 64-byte boundary (ISA-L needs 32).
struct Aligned {
    raw: Vec<u8>,
    at: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, seed: u8) -> Self {
        let mut raw = vec![0u8; len + 64];
        let at = raw.as_ptr().align_offset(64);
        for (i, b) in raw.iter_mut().enumerate() {
            *b = i.to_le_bytes()[0].wrapping_mul(31).wrapping_add(seed) ^ i.to_le_bytes()[1];
        }
        Aligned { raw, at, len }
    }
    fn get(&self) -> &[u8] {
        &self.raw[self.at..self.at + self.len]
    }
    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.at..self.at + self.len]
    }
}

#[cfg(feature = "isal")]
fn isal(srcs: &[&[u8]], dst: &mut [u8]) -> Result<()> {
    nvmirror_bindings::isal::xor_gen_isal(srcs, dst).map_err(anyhow::Error::from)
}

const ISAL_BUILT: bool = cfg!(feature = "isal");

struct Sizes {
    bytes: usize,
    ops_per_batch: u64,
    plan: Plan,
}

fn gbps(stats: &ArmStats, bytes: usize) -> f64 {
    stats.throughput() * (SOURCES * bytes) as f64 / 1e9
}

/// Runs the arms `names` (of "ours", "portable", "isal") over `SOURCES` buffers of
/// `bytes`, interleaved.
fn measure(scenario: &str, sizes: &Sizes, names: &[&str]) -> Result<Vec<ArmStats>> {
    let srcs: Vec<Aligned> = (0..SOURCES).map(|k| Aligned::new(sizes.bytes, k.to_le_bytes()[0])).collect();
    let refs: Vec<&[u8]> = srcs.iter().map(Aligned::get).collect();
    // One destination per arm, checked against the others at the end.
    let mut dsts: Vec<Aligned> = names.iter().map(|_| Aligned::new(sizes.bytes, 0)).collect();
    let cpu = CpuProbe::this_process();
    let ops = sizes.ops_per_batch;
    let best = XorPath::best();
    let mut arms: Vec<Arm<'_>> = names
        .iter()
        .zip(dsts.iter_mut())
        .map(|(&name, dst)| {
            let refs = &refs;
            let run: crate::measure::ArmFn<'_> = match name {
                "ours" => Box::new(move |b| {
                    for _ in 0..ops {
                        let t = Instant::now();
                        xor_gen_on(best, refs, dst.get_mut());
                        b.record(t.elapsed());
                    }
                    Ok(())
                }),
                "portable" => Box::new(move |b| {
                    for _ in 0..ops {
                        let t = Instant::now();
                        xor_gen_on(XorPath::Portable, refs, dst.get_mut());
                        b.record(t.elapsed());
                    }
                    Ok(())
                }),
                #[cfg(feature = "isal")]
                "isal" => Box::new(move |b| {
                    for _ in 0..ops {
                        let t = Instant::now();
                        isal(refs, dst.get_mut())?;
                        b.record(t.elapsed());
                    }
                    Ok(())
                }),
                other => unreachable!("arm {other}"),
            };
            Arm::new(name, None, run)
        })
        .collect();
    interleave(scenario, sizes.plan, &cpu, &mut arms)?;
    let stats: Vec<ArmStats> = arms.into_iter().map(|a| a.stats).collect();
    // Every arm computed the same parity.
    for (name, d) in names.iter().zip(&dsts).skip(1) {
        anyhow::ensure!(d.get() == dsts[0].get(), "{scenario}: {name}'s parity differs from {}'s", names[0]);
    }
    Ok(stats)
}

fn result(
    name: &str,
    description: String,
    sizes: &Sizes,
    stats: Vec<ArmStats>,
    floor: Option<(&str, f64)>,
) -> ScenarioResult {
    let figures: Vec<String> = stats.iter().map(|s| format!("{} {:.2} GB/s", s.name, gbps(s, sizes.bytes))).collect();
    let mut notes = vec![format!("source bytes per second: {}", figures.join(", "))];
    let check = match floor {
        Some((floor_name, target)) => {
            let ours = &stats[0];
            let f = stats.iter().find(|s| s.name == floor_name).expect("floor arm measured");
            let ratio = ours.throughput() / f.throughput().max(f64::MIN_POSITIVE);
            let per_round = Spread::of(ours.rounds.len(), |i| {
                ours.rounds[i].throughput() / f.rounds[i].throughput().max(f64::MIN_POSITIVE)
            });
            Some(Check::at_least(&format!("throughput(ours) / throughput({floor_name})"), ratio, target, per_round))
        }
        None => {
            notes.push("ISA-L is not built: run with `--features isal` (needs libisal-dev) for the ratio".into());
            None
        }
    };
    ScenarioResult {
        name: name.into(),
        description,
        params: json!({
            "sources": SOURCES,
            "bytes_per_source": sizes.bytes,
            "ops_per_batch": sizes.ops_per_batch,
            "plan": sizes.plan,
            "our_path": XorPath::best().name(),
            "isal_built": ISAL_BUILT,
        }),
        cpu_counted: CpuProbe::this_process().describe(),
        arms: stats.iter().map(ArmStats::result).collect(),
        check,
        notes,
    }
}

fn in_cache(quick: bool) -> Sizes {
    Sizes {
        bytes: 16 << 10,
        ops_per_batch: if quick { 10 } else { 20_000 },
        plan: if quick { Plan { warmup_rounds: 0, rounds: 1 } } else { Plan { warmup_rounds: 2, rounds: 12 } },
    }
}

pub fn cache(quick: bool) -> Result<ScenarioResult> {
    let sizes = in_cache(quick);
    let names: &[&str] = if ISAL_BUILT { &["ours", "isal"] } else { &["ours"] };
    let stats = measure("xor-cache", &sizes, names)?;
    Ok(result(
        "xor-cache",
        format!(
            "XOR of 4 x 16 KiB sources into parity, in cache: ours ({}) against ISA-L xor_gen",
            XorPath::best().name()
        ),
        &sizes,
        stats,
        ISAL_BUILT.then_some(("isal", 1.0)),
    ))
}

pub fn memory(quick: bool) -> Result<ScenarioResult> {
    let sizes = Sizes {
        bytes: if quick { 1 << 20 } else { 64 << 20 },
        ops_per_batch: if quick { 1 } else { 4 },
        plan: if quick { Plan { warmup_rounds: 0, rounds: 1 } } else { Plan { warmup_rounds: 1, rounds: 10 } },
    };
    let names: &[&str] = if ISAL_BUILT { &["ours", "isal"] } else { &["ours"] };
    let stats = measure("xor-memory", &sizes, names)?;
    Ok(result(
        "xor-memory",
        format!(
            "XOR of 4 x {} MiB sources into parity, memory-bound: ours ({}) against ISA-L xor_gen",
            sizes.bytes >> 20,
            XorPath::best().name()
        ),
        &sizes,
        stats,
        ISAL_BUILT.then_some(("isal", 0.95)),
    ))
}

pub fn portable(quick: bool) -> Result<ScenarioResult> {
    let sizes = in_cache(quick);
    let stats = measure("xor-portable", &sizes, &["ours", "portable"])?;
    Ok(result(
        "xor-portable",
        format!(
            "XOR of 4 x 16 KiB sources into parity, in cache: ours ({}) against the portable path",
            XorPath::best().name()
        ),
        &sizes,
        stats,
        Some(("portable", 3.0)),
    ))
}
