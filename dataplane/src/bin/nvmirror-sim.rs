//! Runs the deterministic simulator over many seeds, or replays one.
//!
//! ```text
//! nvmirror-sim --seeds 2000 [--from SEED] [--budget-secs S] [--jobs N] [--json FILE]
//! nvmirror-sim --regressions dataplane/sim-regressions.txt --seeds 3000 --from 0x5eed
//! nvmirror-sim --seed 0x1234 [--trace]        # replay one seed exactly
//! ```
//!
//! `--regressions FILE` runs every seed the file lists (one per line, hex or decimal, `#`
//! starts a comment) before the range.
//!
//! Exits non-zero on the first failing seed, after printing it, the events that led to it,
//! and the one-line command that replays it; or when the budget ran out before `--seeds`
//! were run. With `--keep-going` (long exploratory runs) every seed runs, each failure is
//! printed as it is found (message and replay command), and the run exits non-zero at the
//! end if any failed.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvmirror_dataplane::sim::{self, SimOptions, SimReport};
use nvmirror_dataplane::source::PlantedBug;

struct Args {
    seed: Option<u64>,
    seeds: u64,
    from: u64,
    budget: Option<Duration>,
    jobs: usize,
    json: Option<String>,
    regressions: Vec<u64>,
    opts: SimOptions,
    quiet_stderr: bool,
    keep_going: bool,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let r = if let Some(h) = s.strip_prefix("0x") { u64::from_str_radix(h, 16) } else { s.parse() };
    r.map_err(|_| format!("not a number: {s}"))
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        seed: None,
        seeds: 100,
        from: 0,
        budget: None,
        jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
        json: None,
        regressions: Vec::new(),
        opts: SimOptions::default(),
        quiet_stderr: true,
        keep_going: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--seed" => a.seed = Some(parse_u64(&val()?)?),
            "--seeds" => a.seeds = parse_u64(&val()?)?,
            "--from" => a.from = parse_u64(&val()?)?,
            "--budget-secs" => a.budget = Some(Duration::from_secs(parse_u64(&val()?)?)),
            "--jobs" => a.jobs = usize::try_from(parse_u64(&val()?)?.max(1)).map_err(|e| e.to_string())?,
            "--json" => a.json = Some(val()?),
            "--regressions" => a.regressions.extend(read_seed_list(&val()?)?),
            "--phases" => a.opts.phases = u32::try_from(parse_u64(&val()?)?).map_err(|e| e.to_string())?,
            "--phase-ms" => a.opts.phase_ns = parse_u64(&val()?)? * 1_000_000,
            "--no-faults" => a.opts.faults = false,
            "--planted-bug" => match val()?.as_str() {
                "ack-before-remote-persist" => a.opts.planted_bug = Some(PlantedBug::AckBeforeRemotePersist),
                "failover-skips-replay" => a.opts.planted_bug = Some(PlantedBug::FailoverSkipsReplay),
                other => return Err(format!("unknown planted bug {other}")),
            },
            "--watch-block" => a.opts.watch_block = Some(parse_u64(&val()?)?),
            "--trace" => {
                a.opts.trace = true;
                a.quiet_stderr = false;
            }
            "--verbose" => a.quiet_stderr = false,
            "--keep-going" => a.keep_going = true,
            "-h" | "--help" => {
                println!(
                    "nvmirror-sim: the deterministic simulator\n\n  --seeds N        seeds to run (default 100)\n  --from SEED      first seed (default 0)\n  --budget-secs S  stop after S seconds; fail if fewer than --seeds ran\n  --jobs N         seeds run side by side (default: the cores)\n  --regressions F  also run every seed file F lists (one per line, # comments)\n  --seed SEED      replay one seed\n  --trace          print its events (with --seed)\n  --verbose        keep the data plane's own messages\n  --json FILE      write the summary as JSON\n  --keep-going     run every seed; list each failure as found, fail at the end\n  --phases N, --phase-ms MS, --no-faults, --planted-bug ack-before-remote-persist|failover-skips-replay"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other} (see --help)")),
        }
    }
    Ok(a)
}

/// The seeds of a regression list: one per line, hex (`0x`) or decimal, `#` to the end of
/// a line is a comment.
fn read_seed_list(path: &str) -> Result<Vec<u64>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut seeds = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let s = line.split('#').next().unwrap_or("").trim();
        if !s.is_empty() {
            seeds.push(parse_u64(s).map_err(|e| format!("{path}:{}: {e}", n + 1))?);
        }
    }
    Ok(seeds)
}

/// The data plane reports on stderr what an operator should see (links down, recovery);
/// across thousands of seeds that is noise. Sent to /dev/null unless asked for.
fn silence_stderr() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto fd 2 with a valid open descriptor; nothing holds a reference
        // to the old stderr's file description but the fd itself.
        unsafe {
            libc::dup2(null.as_raw_fd(), 2);
        }
    }
}

#[derive(Default, serde::Serialize)]
struct Totals {
    seeds: u64,
    writes_acked: u64,
    writes_failed: u64,
    blocks_verified: u64,
    volume_checks: u64,
    power_cuts: u64,
    crashes: u64,
    failovers: u64,
    stale_primary_writes: u64,
    link_cuts: u64,
    frame_fault_windows: u64,
    frames_dropped: u64,
    frames_duplicated: u64,
    frames_reordered: u64,
    clock_jumps: u64,
    disk_faults: u64,
    nvram_bit_flips: u64,
    degraded_crashes: u64,
    write_holes_refused: u64,
    write_holes_copied_over: u64,
    disks_replaced: u64,
    switchovers: u64,
    failbacks_delta: u64,
    failbacks_baseline: u64,
    sync_policy_seeds: u64,
    nvram_lines_lost_or_torn: u64,
    /// Blocks of `direct:` NVRAM writes in flight at a cut, lost or torn.
    nvram_blocks_lost_or_torn: u64,
    disk_blocks_lost_or_torn: u64,
    durable_ops: u64,
    sim_secs: f64,
    wall_secs: f64,
}

impl Totals {
    fn add(&mut self, r: &SimReport) {
        self.seeds += 1;
        self.writes_acked += r.writes_acked;
        self.writes_failed += r.writes_failed;
        self.blocks_verified += r.blocks_verified;
        self.volume_checks += r.volume_checks;
        self.power_cuts += r.faults.power_cuts;
        self.crashes += r.faults.crashes_at_op;
        self.failovers += r.faults.failovers;
        self.stale_primary_writes += r.faults.stale_primary_writes;
        self.link_cuts += r.faults.link_stalls + r.faults.link_resets + r.faults.link_drops;
        self.frame_fault_windows += r.faults.frame_fault_windows;
        self.frames_dropped += r.net.frames_dropped;
        self.frames_duplicated += r.net.frames_duplicated;
        self.frames_reordered += r.net.frames_reordered;
        self.clock_jumps += r.faults.clock_jumps;
        self.disk_faults += r.faults.disk_bit_flips + r.faults.disk_read_errors + r.faults.disks_lost;
        self.nvram_bit_flips += r.faults.nvram_bit_flips;
        self.degraded_crashes += r.faults.degraded_crashes;
        self.write_holes_refused += r.faults.write_holes_refused;
        self.write_holes_copied_over += r.faults.write_holes_copied_over;
        self.disks_replaced += r.faults.disks_replaced;
        self.switchovers += r.faults.switchovers;
        self.failbacks_delta += r.faults.failbacks_delta;
        self.failbacks_baseline += r.faults.failbacks_baseline;
        self.sync_policy_seeds += r.faults.sync_policy;
        let c = &r.crash_damage;
        self.nvram_lines_lost_or_torn += c.nvram_lines_lost + c.nvram_lines_torn;
        self.nvram_blocks_lost_or_torn += c.nvram_blocks_lost + c.nvram_blocks_torn;
        self.disk_blocks_lost_or_torn += c.disk_blocks_lost + c.disk_blocks_torn;
        self.durable_ops += r.durable_ops;
        self.sim_secs += r.sim_ns as f64 / 1e9;
    }
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nvmirror-sim: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(seed) = args.seed {
        if args.quiet_stderr {
            silence_stderr();
        }
        return match sim::run(seed, &args.opts) {
            Ok(r) => {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                println!("seed {seed:#x}: passed");
                ExitCode::SUCCESS
            }
            Err(f) => {
                println!("{f}");
                println!("replay: {}", sim::replay_command(seed, &args.opts));
                ExitCode::FAILURE
            }
        };
    }
    if args.quiet_stderr {
        silence_stderr();
    }
    let started = Instant::now();
    let end = args.from.saturating_add(args.seeds);
    let list: Arc<Vec<u64>> = Arc::new(args.regressions.iter().copied().chain(args.from..end).collect());
    let want = list.len() as u64;
    if !args.regressions.is_empty() {
        println!("{} regression seeds, then seeds {:#x}..{end:#x}", args.regressions.len(), args.from);
    }
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let totals = Arc::new(Mutex::new(Totals::default()));
    let failure = Arc::new(Mutex::new(None));
    let failed_seeds = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..args.jobs)
        .map(|_| {
            let (next, stop, totals, failure, opts, list, failed_seeds) = (
                next.clone(),
                stop.clone(),
                totals.clone(),
                failure.clone(),
                args.opts.clone(),
                list.clone(),
                failed_seeds.clone(),
            );
            let (budget, keep_going) = (args.budget, args.keep_going);
            std::thread::spawn(move || loop {
                if stop.load(Ordering::SeqCst) || budget.is_some_and(|b| started.elapsed() > b) {
                    return;
                }
                let Some(&seed) = usize::try_from(next.fetch_add(1, Ordering::SeqCst)).ok().and_then(|i| list.get(i))
                else {
                    return;
                };
                // A panic in a seed is that seed's failure, reported like any other.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim::run(seed, &opts)))
                    .unwrap_or_else(|p| {
                        let what = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
                            .unwrap_or_else(|| "a panic".into());
                        Err(sim::SimFailure {
                            seed,
                            sim_ns: 0,
                            tick: 0,
                            message: format!("panicked: {what}"),
                            trace: Vec::new(),
                        })
                    });
                match outcome {
                    Ok(r) => {
                        let mut t = totals.lock().expect("totals");
                        t.add(&r);
                        if t.seeds % 100 == 0 {
                            print!("\r{} seeds passed, {:.0} s", t.seeds, started.elapsed().as_secs_f64());
                            let _ = std::io::stdout().flush();
                        }
                    }
                    Err(f) if keep_going => {
                        println!("\nseed {seed:#x} FAILED: {}", f.message);
                        println!("replay: {}", sim::replay_command(f.seed, &opts));
                        failed_seeds.lock().expect("failed seeds").push(seed);
                    }
                    Err(f) => {
                        stop.store(true, Ordering::SeqCst);
                        let mut slot = failure.lock().expect("failure");
                        if slot.is_none() {
                            *slot = Some(f);
                        }
                        return;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let mut t = std::mem::take(&mut *totals.lock().expect("totals"));
    t.wall_secs = started.elapsed().as_secs_f64();
    println!();
    if let Some(f) = failure.lock().expect("failure").take() {
        println!("{f}");
        println!("replay: {}", sim::replay_command(f.seed, &args.opts));
        println!("({} seeds passed before it)", t.seeds);
        return ExitCode::FAILURE;
    }
    println!(
        "{} seeds passed in {:.1} s ({:.0} simulated s): {} writes acknowledged and verified over {} volume checks; \
         {} power cuts, {} failovers, {} writes to stale primaries refused, {} link cuts, {} frames dropped, {} duplicated, \
         {} reordered, {} clock jumps, {} disk faults ({} disks replaced), {} bits flipped in acknowledged NVLog entries, \
         {} power cuts on degraded RAID-4 volumes ({} refused to start, {} copied over), {} switchovers, {} failbacks by delta resync and \
         {} by baseline, {} seeds under policy sync; crashes lost or tore {} NVRAM lines, {} blocks of direct: NVRAM writes in flight and {} disk \
         blocks; {} durable \
         operations",
        t.seeds,
        t.wall_secs,
        t.sim_secs,
        t.writes_acked,
        t.volume_checks,
        t.power_cuts,
        t.failovers,
        t.stale_primary_writes,
        t.link_cuts,
        t.frames_dropped,
        t.frames_duplicated,
        t.frames_reordered,
        t.clock_jumps,
        t.disk_faults,
        t.disks_replaced,
        t.nvram_bit_flips,
        t.degraded_crashes,
        t.write_holes_refused,
        t.write_holes_copied_over,
        t.switchovers,
        t.failbacks_delta,
        t.failbacks_baseline,
        t.sync_policy_seeds,
        t.nvram_lines_lost_or_torn,
        t.nvram_blocks_lost_or_torn,
        t.disk_blocks_lost_or_torn,
        t.durable_ops
    );
    if let Some(path) = &args.json {
        if let Err(e) = std::fs::write(path, serde_json::to_vec_pretty(&t).unwrap_or_default()) {
            println!("cannot write {path}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let failed = std::mem::take(&mut *failed_seeds.lock().expect("failed seeds"));
    if !failed.is_empty() {
        let list: Vec<String> = failed.iter().map(|s| format!("{s:#x}")).collect();
        println!("{} seeds failed: {}", failed.len(), list.join(" "));
        return ExitCode::FAILURE;
    }
    if t.seeds < want {
        println!("only {} of {} seeds ran within the budget of {:?}", t.seeds, want, args.budget.unwrap_or_default());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
