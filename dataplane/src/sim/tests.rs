use super::*;

#[test]
fn a_healthy_cluster_passes_every_check() {
    let opts = SimOptions { faults: false, phases: 1, phase_ns: SEC, ..SimOptions::default() };
    let r = run(1, &opts).unwrap_or_else(|f| panic!("{f}"));
    assert!(r.writes_acked > 100, "{r:?}");
    assert_eq!(r.writes_failed, 0, "{r:?}");
    assert_eq!(r.faults.power_cuts + r.faults.failovers + r.net.frames_dropped, 0, "{r:?}");
}

#[test]
fn a_seed_replays_exactly() {
    let opts = SimOptions::default();
    for seed in [3, 0x4d6] {
        let a = run(seed, &opts).unwrap_or_else(|f| panic!("{f}"));
        let b = run(seed, &opts).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(a.digest, b.digest, "seed {seed:#x} took two different courses");
        assert_eq!((a.ticks, a.writes_acked, a.durable_ops), (b.ticks, b.writes_acked, b.durable_ops));
        assert!(a.faults.power_cuts + a.faults.link_stalls + a.faults.link_resets > 0, "{a:?}");
    }
    let c = run(4, &opts).unwrap_or_else(|f| panic!("{f}"));
    let d = run(3, &opts).unwrap_or_else(|f| panic!("{f}"));
    assert_ne!(c.digest, d.digest, "two seeds, one course: the seed is not steering the run");
}

/// A few seeds with every fault class, in the test suite; CI runs thousands in release
/// (`nvmirror-sim --seeds 2000`).
#[test]
fn seeds_with_faults_pass() {
    let opts = SimOptions::default();
    let mut faults = FaultCounts::default();
    for seed in 100..112 {
        let r = run(seed, &opts).unwrap_or_else(|f| panic!("{f}\nreplay: {}", replay_command(seed, &opts)));
        faults.power_cuts += r.faults.power_cuts;
        faults.failovers += r.faults.failovers;
        faults.disk_bit_flips += r.faults.disk_bit_flips + r.faults.disks_lost + r.faults.disk_read_errors;
        faults.link_resets += r.faults.link_resets + r.faults.link_stalls + r.faults.link_drops;
    }
    assert!(
        faults.power_cuts > 0 && faults.failovers > 0 && faults.disk_bit_flips > 0 && faults.link_resets > 0,
        "{faults:?}"
    );
}

/// The simulator must find a planted defect: a source that acknowledges writes once
/// they are in its own NVLog, before the destination has them, loses acknowledged writes
/// when it dies and its mirror takes over.
#[test]
fn the_simulator_catches_an_ack_before_the_remote_persist() {
    let opts = SimOptions { planted_bug: Some(PlantedBug::AckBeforeRemotePersist), ..SimOptions::default() };
    let caught = (0..50).find_map(|seed| run(seed, &opts).err());
    let f = caught.expect("50 seeds ran with the planted bug and none failed");
    assert!(
        f.message.contains("lost acknowledged write") || f.message.contains("reads as zeroes"),
        "caught, but not as a lost write: {f}"
    );
}

/// The simulator runs the node core's failover, the one the daemon ships: a defect
/// planted there (a promotion that replays nothing past the mirror's last applied CP)
/// loses the acknowledged writes of the last CP interval, and the seeds find it.
#[test]
fn the_simulator_catches_a_failover_that_skips_the_replay() {
    let opts = SimOptions { planted_bug: Some(PlantedBug::FailoverSkipsReplay), ..SimOptions::default() };
    let caught = (0..50).find_map(|seed| run(seed, &opts).err());
    let f = caught.expect("50 seeds ran with the planted bug and none failed");
    assert!(
        f.message.contains("after the failover")
            && (f.message.contains("lost acknowledged write") || f.message.contains("reads as zeroes")),
        "caught, but not as a write lost by the failover: {f}"
    );
}

/// A power cut on a degraded RAID-4 volume with writes in flight (the write hole): a
/// primary's volume refuses to start and the mirror takes over, a mirror's storage is
/// copied over whole; every check of the run holds (no acknowledged write lost, scrubs
/// clean once the copy is done). The seeds are searched, so that a change of course still
/// finds both outcomes.
#[test]
fn a_crash_on_a_degraded_volume_is_refused_or_copied_over_and_loses_nothing() {
    let opts = SimOptions::default();
    let (mut refused, mut copied) = (0, 0);
    for seed in 0x71_0100..0x71_0300 {
        let r = run(seed, &opts).unwrap_or_else(|f| panic!("{f}\nreplay: {}", replay_command(seed, &opts)));
        refused += r.faults.write_holes_refused;
        copied += r.faults.write_holes_copied_over;
        if refused > 0 && copied > 0 {
            return;
        }
    }
    panic!("512 seeds and the write hole was not reached on both sides: {refused} refused, {copied} copied over");
}
