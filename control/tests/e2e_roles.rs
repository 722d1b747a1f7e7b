//! Role changes with real processes: policy sync riding out a lost mirror and coming back
//! by a delta resync that copies only what changed; failover, then failback of the old
//! primary by `ctl resync`, then a planned switchover back under load, with every
//! acknowledged write verified after each step and no write failed by the switchover.

mod common;

use std::time::Duration;

use common::*;
use nvmirror_control::workload::Workload;
use nvmirror_dataplane::frontend::nbd_client::NbdClient;
use nvmirror_dataplane::log::REGION_BYTES;

const VOL: &str = "vol";
const SIZE: u64 = 64 * MIB;
const BLOCK: u64 = 4096;

fn ctl(node: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["ctl", "--node", node];
    all.extend_from_slice(args);
    let out = run_bin(&all, Duration::from_secs(180));
    assert!(
        out.status.success(),
        "ctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Reads the whole volume from both sites (the mirror's export shows its last CP) and
/// requires them equal.
fn assert_mirror_equals_primary(primary_nbd: &str, mirror_nbd: &str, what: &str) {
    let a = read_volume(primary_nbd, VOL).expect("read the primary");
    let b = read_volume(mirror_nbd, VOL).expect("read the mirror");
    if let Some(at) = first_difference(&a, &b) {
        panic!("{what}: the mirror differs from the primary first at byte {at}");
    }
}

#[test]
fn policy_sync_rides_out_a_lost_mirror_and_resyncs_only_what_changed() {
    let seed = base_seed("policy_sync");
    let mut pair = Pair::start("sync");
    create_volume(&pair.src_api(), VOL, SIZE, Some(LOG_BYTES_MIN)).expect("create");
    ctl(&pair.src.control, &["mirror", VOL, "--to", &pair.dst.control, "--policy", "sync"]);
    let before = volume_status(&pair.src_api(), VOL).expect("status");
    assert_eq!(before["policy"], "sync");
    assert_eq!(before["mirror_current"], true, "{before}");

    // Some writes in sync.
    let mut w = Workload::new(0, 512, seed);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD connect");
    w.run(&mut c, 4, 400, |_| {}).expect("writes in sync");
    assert_eq!(w.errors, 0);

    // The mirror goes away for a while: writes go on (policy sync), to a range of their own.
    pair.dst.kill();
    let cut_first = 8192u64;
    let cut_blocks = 256u64;
    let mut cut = Workload::new(cut_first * BLOCK, cut_blocks, seed ^ 1);
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        cut.run(&mut c, 4, 100, |_| {}).expect("writes without the mirror");
    }
    assert_eq!(cut.errors, 0, "policy sync failed writes while the mirror was away");
    assert!(cut.acks > 200, "too few writes during the cut: {}", cut.acks);
    let away = volume_status(&pair.src_api(), VOL).expect("status");
    assert_eq!(away["state"], "out-of-sync", "{away}");
    assert_eq!(away["mirror_current"], false, "{away}");
    // CPs complete alone: the partitions that held the cut's writes are freed, their
    // regions marked in the change map.
    for _ in 0..2 {
        cp(&pair.src_api(), VOL).expect("CP without the mirror");
        w.run(&mut c, 2, 20, |_| {}).expect("writes");
    }
    let marked = volume_status(&pair.src_api(), VOL).expect("status")["changed_bytes"].as_u64().expect("changed");
    assert!(marked > 0, "nothing marked changed");

    // The mirror returns: a delta resync, then in sync and current.
    pair.dst.restart().expect("restart the destination");
    wait_state(&pair.src_api(), VOL, "in-sync", Duration::from_secs(120));
    wait_for("the mirror to be current", Duration::from_secs(60), || {
        let v = volume_status(&pair.src_api(), VOL)?;
        Ok((v["mirror_current"] == true).then_some(()))
    });
    let s = volume_status(&pair.src_api(), VOL).expect("status");
    assert_eq!(s["last_copy_kind"], "resync", "the mirror came back by a full copy: {s}");
    let copied = s["last_copy_bytes"].as_u64().expect("bytes");
    // The regions the two writers touched: the in-sync writer's (whose last partition may
    // have been freed alone too) and the cut's.
    let regions = |first: u64, blocks: u64| {
        (first * BLOCK / REGION_BYTES..=((first + blocks) * BLOCK - 1) / REGION_BYTES).count() as u64
    };
    let bound = (regions(0, 512) + regions(cut_first, cut_blocks)) * REGION_BYTES;
    eprintln!(
        "delta resync copied {copied} bytes; the cut wrote {} blocks ({} acknowledged writes) in {} regions; bound {bound}; volume {SIZE}",
        cut_blocks,
        cut.acks,
        regions(cut_first, cut_blocks)
    );
    assert!(copied > 0 && copied <= bound, "the resync copied {copied} bytes, more than the {bound} that changed");
    assert!(copied >= regions(cut_first, cut_blocks) * REGION_BYTES, "the resync missed regions the cut changed");

    // Every acknowledged write, on both sites.
    cp(&pair.src_api(), VOL).expect("CP");
    assert_verified(&verify(&w, &pair.src.nbd, VOL).expect("verify"), "in-sync writes on the primary");
    assert_verified(&verify(&cut, &pair.src.nbd, VOL).expect("verify"), "the cut's writes on the primary");
    assert_mirror_equals_primary(&pair.src.nbd, &pair.dst.nbd, "after the resync");
    let m = mirror_status(&pair.dst_api(), VOL).expect("mirror");
    assert_eq!(m["state"], "in-sync", "{m}");
}

#[test]
fn failover_failback_and_switchback_keep_every_acknowledged_write() {
    let seed = base_seed("failback");
    let mut pair = Pair::start("failback");
    pair.create_mirrored(VOL, SIZE, LOG_BYTES_MIN);
    // Blocks 4096 on; the switchover's background writer takes blocks 0-2047.
    let mut w = Workload::new(4096 * BLOCK, 2048, seed);
    {
        let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD connect");
        w.run(&mut c, 8, 3000, |_| {}).expect("writes on site-a");
    }

    // Site a is lost; b takes over and takes writes.
    pair.src.kill();
    failover(&pair.dst_api(), VOL).expect("failover");
    assert_verified(&verify(&w, &pair.dst.nbd, VOL).expect("verify"), "after failover, on site-b");
    {
        let mut c = NbdClient::connect(pair.dst.nbd.as_str(), VOL).expect("NBD connect to b");
        w.run(&mut c, 8, 1500, |_| {}).expect("writes on site-b");
    }

    // Site a returns, learns it was failed over, and refuses writes.
    pair.src.restart().expect("restart site-a");
    wait_state(&pair.src_api(), VOL, "fenced", Duration::from_secs(60));
    {
        let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD connect to a");
        assert!(c.write(0, &vec![0xee; 4096]).is_err(), "the fenced old primary took a write");
    }

    // Failback: a becomes b's mirror by a delta resync.
    let out = ctl(&pair.src.control, &["resync", VOL, "--from", &pair.dst.control]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("delta resync"), "{text}");
    let s = wait_state(&pair.dst_api(), VOL, "in-sync", Duration::from_secs(120));
    assert_eq!(s["last_copy_kind"], "resync", "{s}");
    let copied = s["last_copy_bytes"].as_u64().expect("bytes");
    assert!(copied < SIZE / 2, "the failback copied {copied} bytes of a {SIZE}-byte volume");
    eprintln!("failback resync copied {copied} of {SIZE} bytes");
    cp(&pair.dst_api(), VOL).expect("CP on b");
    assert_mirror_equals_primary(&pair.dst.nbd, &pair.src.nbd, "after the failback");
    assert_verified(&verify(&w, &pair.src.nbd, VOL).expect("verify"), "on a, the mirror again");

    // Switchback, planned, under load: a writer on b's export goes on through it.
    let writer = BackgroundWriter::start(&pair.dst.nbd, VOL, seed ^ 7);
    let out = ctl(&pair.dst.control, &["switchover", VOL]);
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    // Writes go on (forwarded by b to a) after the switch.
    let at = writer.acks();
    wait_for("writes after the switchover", Duration::from_secs(60), || Ok((writer.acks() > at + 200).then_some(())));
    let bw = writer.finish();
    assert_eq!(bw.errors, 0, "the switchover failed client writes");
    let a = wait_state(&pair.src_api(), VOL, "in-sync", Duration::from_secs(60));
    assert_eq!(a["role"], "primary");
    assert_eq!(a["mirror_current"], true, "{a}");
    // One row per volume on the new primary: the mirror it took over from is its volume now.
    let s = status(&pair.src_api()).expect("status of a");
    let rows = s["mirrors"].as_array().map_or(0, |ms| ms.iter().filter(|m| m["volume"] == VOL).count());
    assert_eq!(rows, 0, "the new primary still lists its promoted mirror: {s}");
    let m = mirror_status(&pair.dst_api(), VOL).expect("b's mirror");
    assert_eq!(m["state"], "in-sync", "{m}");
    // Every acknowledged write of both writers, on the primary again.
    assert_verified(&verify(&bw, &pair.src.nbd, VOL).expect("verify"), "the switchover writer's, on a");
    cp(&pair.src_api(), VOL).expect("CP on a");
    assert_mirror_equals_primary(&pair.src.nbd, &pair.dst.nbd, "after the switchback");
}

#[test]
fn a_baseline_keeps_to_its_rate_limit() {
    let pair = Pair::start("rate");
    let size = 24 * MIB;
    create_volume(&pair.src_api(), VOL, size, Some(LOG_BYTES_MIN)).expect("create");
    let started = std::time::Instant::now();
    // 8 MiB/s: the 24 MiB copy takes at least 24/8 s less one chunk of credit.
    ctl(&pair.src.control, &["mirror", VOL, "--to", &pair.dst.control, "--rate", "8M"]);
    let took = started.elapsed();
    eprintln!("baseline of {} MiB at 8 MiB/s took {:.2} s", size >> 20, took.as_secs_f64());
    assert!(took >= Duration::from_millis(2500), "the baseline ran past its rate limit: {took:?}");
    let s = volume_status(&pair.src_api(), VOL).expect("status");
    assert_eq!(s["last_copy_kind"], "baseline");
    assert_eq!(s["last_copy_bytes"], size);
}

/// Allocated bytes (what `du` counts) of the files under `dir`.
fn du(dir: &std::path::Path) -> u64 {
    let out = std::process::Command::new("du").args(["-s", "--block-size=1"]).arg(dir).output().expect("du");
    assert!(out.status.success(), "du {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("du said {text}"))
}

/// A baseline of a volume that is mostly empty sends its zeroes as ranges: the mirror's
/// files stay sparse (measured with du), and the mirror reads back equal to the primary.
#[test]
fn a_baseline_of_a_mostly_empty_volume_leaves_the_mirror_sparse() {
    let pair = Pair::start("sparse");
    let size = 64 * MIB;
    create_volume(&pair.src_api(), VOL, size, Some(LOG_BYTES_MIN)).expect("create");
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD connect");
    for i in 0..256u64 {
        c.write(i * BLOCK * 4, &[0x5a; 4096]).expect("write");
    }
    drop(c);
    ctl(&pair.src.control, &["mirror", VOL, "--to", &pair.dst.control]);
    wait_for("the mirror to be consistent", Duration::from_secs(60), || {
        Ok(mirror_status(&pair.dst_api(), VOL)?["consistent"].as_bool().filter(|c| *c))
    });
    let s = volume_status(&pair.src_api(), VOL).expect("status");
    assert_eq!(s["last_copy_kind"], "baseline");
    let zero = s["last_copy_zero_bytes"].as_u64().expect("zero bytes");
    assert!(zero >= size - 8 * MIB, "only {zero} of {size} bytes went as zero ranges: {s}");
    // The holes of the volume's files were not even read (SEEK_DATA).
    let holes = s["last_copy_hole_bytes"].as_u64().expect("hole bytes");
    assert!(holes >= size - 8 * MIB && holes <= zero, "only {holes} of {size} bytes were skipped as holes: {s}");
    let files = pair.dst.data_dir.join("mirrors").join("site-a").join(VOL);
    let used = du(&files);
    eprintln!("mirror of a {} MiB volume holding 1 MiB: du {} KiB", size >> 20, used >> 10);
    assert!(used < 8 * MIB, "the mirror's files take {used} bytes for 1 MiB of data");
    cp(&pair.src_api(), VOL).expect("CP");
    assert_mirror_equals_primary(&pair.src.nbd, &pair.dst.nbd, "after a sparse baseline");
}
