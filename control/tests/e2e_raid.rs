//! RAID-4 under real node processes: a mirror in its own geometry equal block for block to
//! its primary; and a volume whose member files are damaged (bytes flipped in a data and
//! in the parity member, a member deleted, another truncated) between runs of the node,
//! read back with every acknowledged write, scrubbed, rebuilt onto a new disk with
//! `ctl volume replace-disk`, and refused clearly when two members are gone.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use nvmirror_control::workload::Workload;
use nvmirror_dataplane::frontend::nbd_client::NbdClient;
use nvmirror_dataplane::raid::Geometry;

const VOL: &str = "r4";

fn ctl(node: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec!["ctl", "--node", node];
    all.extend_from_slice(args);
    let out = run_bin(&all, Duration::from_secs(120));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn write(w: &mut Workload, nbd: &str, count: u64) {
    let mut c = NbdClient::connect(nbd, VOL).expect("NBD connect");
    w.run(&mut c, 8, count, |_| {}).expect("workload");
    let _ = c.disconnect();
    assert_eq!(w.errors, 0, "writes failed");
}

fn flip(path: &Path, offset: u64) {
    let f = fs::OpenOptions::new().read(true).write(true).open(path).expect("open member");
    let mut b = [0u8; 16];
    f.read_exact_at(&mut b, offset).expect("read member");
    for x in &mut b {
        *x ^= 0xa5;
    }
    f.write_all_at(&b, offset).expect("write member");
    f.sync_all().expect("sync member");
}

#[test]
fn a_3_plus_1_primary_and_a_5_plus_1_mirror_hold_equal_volumes() {
    let seed = base_seed("raid_geometry");
    let pair = Pair::start_with(
        "raid-geometry",
        &["--raid-data-disks", "3", "--raid-stripe-unit", "64K"],
        &["--raid-data-disks", "5", "--raid-stripe-unit", "16K"],
    );
    let size = 24 * MIB;
    pair.create_mirrored(VOL, size, LOG_BYTES_MIN);
    let mut w = Workload::new(0, size / 4096, seed);
    write(&mut w, &pair.src.nbd, 4000);
    cp(&pair.src_api(), VOL).expect("CP");

    let src = volume_status(&pair.src_api(), VOL).unwrap()["storage"].clone();
    let dst = mirror_status(&pair.dst_api(), VOL).unwrap()["storage"].clone();
    assert_eq!(
        (src["level"].as_str(), src["data_disks"].as_u64(), src["stripe_unit"].as_u64()),
        (Some("raid4"), Some(3), Some(65536)),
        "{src}"
    );
    assert_eq!(
        (dst["level"].as_str(), dst["data_disks"].as_u64(), dst["stripe_unit"].as_u64()),
        (Some("raid4"), Some(5), Some(16384)),
        "{dst}"
    );
    assert_eq!(dst["members"].as_array().map(Vec::len), Some(6));
    let mirror_dir = pair.dst.data_dir.join("mirrors").join(&pair.src.name).join(VOL);
    for m in ["data0", "data1", "data2", "data3", "data4", "parity"] {
        assert!(mirror_dir.join(m).exists(), "mirror member {m} under {}", mirror_dir.display());
    }
    // Block for block, through each side's own RAID layer.
    let a = read_volume(&pair.src.nbd, VOL).expect("read the primary");
    let b = read_volume(&pair.dst.nbd, VOL).expect("read the mirror");
    assert_eq!(a.len(), b.len());
    assert!(first_difference(&a, &b).is_none(), "mirror differs from primary at byte {:?}", first_difference(&a, &b));
    assert_verified(&verify(&w, &pair.dst.nbd, VOL).unwrap(), "mirror");
    // Parity and checksums are right on both sides.
    for node in [&pair.src.control, &pair.dst.control] {
        let (ok, out) = ctl(node, &["scrub", VOL]);
        assert!(ok && out.contains(": clean:"), "scrub on {node}: {out}");
    }
}

fn member(dir: &Path, name: &str) -> PathBuf {
    dir.join("volumes").join(VOL).join(name)
}

#[test]
fn damaged_members_are_repaired_scrubbed_and_rebuilt_and_two_losses_are_refused() {
    let seed = base_seed("raid_faults");
    let mut pair = Pair::start("raid-faults");
    let api = pair.src_api();
    let size = 16 * MIB;
    create_volume(&api, VOL, size, Some(LOG_BYTES_MIN)).expect("create");
    let mut w = Workload::new(0, size / 4096, seed);
    write(&mut w, &pair.src.nbd, 3000);
    cp(&api, VOL).expect("CP");
    let data_dir = pair.src.data_dir.clone();
    // The node's layout: its checksum area has room to grow (`volume create --max-size`).
    let geo =
        Geometry::new(3, 64 << 10, size).unwrap().with_room_for(nvmirror_control::storage::grow_room(size)).unwrap();
    let row = |r: u64| geo.data_offset() + r * 4096;

    // 1. Bytes flipped in a data member and in the parity member while the node is down.
    pair.src.kill();
    for r in [10, 500, 1300] {
        flip(&member(&data_dir, "data1"), row(r) + 100);
    }
    for r in [3, 700] {
        flip(&member(&data_dir, "parity"), row(r));
    }
    pair.src.restart().expect("restart");
    assert_verified(&verify(&w, &pair.src.nbd, VOL).unwrap(), "after flipped bytes");
    let st = volume_status(&api, VOL).unwrap()["storage"].clone();
    assert!(st["counters"]["checksum_errors"].as_u64() >= Some(3), "{st}");
    assert!(st["counters"]["blocks_repaired"].as_u64() >= Some(3), "{st}");
    let (ok, out) = ctl(&pair.src.control, &["scrub", VOL, "--json"]);
    assert!(ok, "{out}");
    let report: serde_json::Value = serde_json::Deserializer::from_str(&out[out.find('{').unwrap()..])
        .into_iter()
        .next()
        .expect("a scrub report")
        .expect("scrub JSON");
    assert_eq!(report["result"], "repaired", "{report}");
    assert_eq!(
        (report["checksum_errors"].as_u64(), report["unrecoverable"].as_u64()),
        (Some(2), Some(0)),
        "parity flips: {report}"
    );
    let (ok, out) = ctl(&pair.src.control, &["scrub", VOL]);
    assert!(ok && out.contains(": clean:"), "{out}");
    let (_, out) = ctl(&pair.src.control, &["status"]);
    assert!(out.contains("raid4 3+1") && out.contains("last scrub clean"), "{out}");

    // 2. A member deleted: the volume runs degraded, reads and writes go on.
    pair.src.kill();
    fs::remove_file(member(&data_dir, "data2")).unwrap();
    pair.src.restart().expect("restart");
    let st = volume_status(&api, VOL).unwrap()["storage"].clone();
    assert_eq!(st["degraded"], true, "{st}");
    assert_eq!(st["members"][2]["state"], "failed", "{st}");
    assert!(st["members"][2]["reason"].as_str().unwrap().contains("cannot open"), "{st}");
    let (_, out) = ctl(&pair.src.control, &["status"]);
    assert!(out.contains("DEGRADED") && out.contains("data2"), "{out}");
    assert_verified(&verify(&w, &pair.src.nbd, VOL).unwrap(), "degraded");
    write(&mut w, &pair.src.nbd, 1500);
    cp(&api, VOL).expect("CP while degraded");

    // 3. Replaced and rebuilt.
    let new = data_dir.join("new-data2");
    let old = member(&data_dir, "data2");
    let (ok, out) = ctl(
        &pair.src.control,
        &["volume", "replace-disk", VOL, "--old", old.to_str().unwrap(), "--new", new.to_str().unwrap()],
    );
    assert!(ok && out.contains("rebuilt"), "{out}");
    let st = volume_status(&api, VOL).unwrap()["storage"].clone();
    assert_eq!(st["degraded"], false, "{st}");
    assert!(st["members"][2]["disk"].as_str().unwrap().ends_with("new-data2"), "{st}");
    // A bad replacement is refused with a reason.
    let (ok, out) = ctl(&pair.src.control, &["volume", "replace-disk", VOL, "--old", "9", "--new", "/tmp/x"]);
    assert!(!ok && out.contains("not a member"), "{out}");

    // 4. Redundancy is back: another member goes, and every acknowledged write is there.
    pair.src.kill();
    fs::remove_file(member(&data_dir, "data0")).unwrap();
    pair.src.restart().expect("restart");
    assert_eq!(volume_status(&api, VOL).unwrap()["storage"]["members"][0]["state"], "failed");
    assert_verified(&verify(&w, &pair.src.nbd, VOL).unwrap(), "after the rebuild, with data0 gone");

    // 5. A second member truncated: two members lost is a clear error, never garbage.
    pair.src.kill();
    let parity = member(&data_dir, "parity");
    fs::OpenOptions::new().write(true).open(&parity).unwrap().set_len(geo.member_bytes() / 3).unwrap();
    pair.src.restart().expect("the node starts with one volume it cannot serve");
    let s = status(&api).unwrap();
    let u = &s["unstarted"][0];
    assert_eq!(u["volume"], VOL, "{s}");
    let why = u["reason"].as_str().unwrap();
    assert!(
        why.contains("member 0") && why.contains("member 3") && why.contains("truncated") && why.contains("survives"),
        "{why}"
    );
    assert!(NbdClient::connect(&pair.src.nbd, VOL).is_err(), "the volume is not served");
    let (ok, out) = ctl(&pair.src.control, &["cp", VOL]);
    assert!(!ok && out.contains("could not start"), "{out}");
}

/// The RAID-4 write hole under real processes: a primary stops with writes in flight (its
/// superblocks say dirty) and then loses a member. It must not start (a clear error naming
/// the write hole, never garbage served); its mirror takes over with every acknowledged
/// write; `ctl resync --from` on the old primary makes its storage the new primary's
/// mirror by a baseline copy, and the two are then equal.
#[test]
fn a_primary_left_dirty_and_degraded_does_not_start_and_comes_back_as_a_mirror() {
    use nvmirror_dataplane::raid::Raid4;
    use nvmirror_dataplane::storage::{BlockDevice, DiskSpec};

    let seed = base_seed("raid_write_hole");
    let mut pair = Pair::start("raid-hole");
    let size = 16 * MIB;
    pair.create_mirrored(VOL, size, LOG_BYTES_MIN);
    let mut w = Workload::new(0, size / 4096, seed);
    write(&mut w, &pair.src.nbd, 2000);
    let disks: Vec<DiskSpec> = volume_status(&pair.src_api(), VOL).unwrap()["storage"]["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| DiskSpec::parse(m["disk"].as_str().expect("disk")).expect("disk spec"))
        .collect();
    assert_eq!(disks.len(), 4, "a 3+1 volume: {disks:?}");

    // Killed with writes in flight: a write batch began (superblocks dirty) and no flush
    // followed. The block written is the one already there: the test knows every byte.
    pair.src.kill();
    {
        let raid = Raid4::open(VOL, &disks).expect("open the stopped volume's members");
        let mut block = vec![0u8; 4096];
        raid.read_at(&mut block, 0).expect("read block 0");
        raid.write_at(&block, 0).expect("write block 0 again");
    }
    fs::remove_file(&disks[1].path).expect("remove a data member");
    pair.src.restart().expect("the node starts with one volume it cannot serve");
    let s = status(&pair.src_api()).unwrap();
    let why = s["unstarted"][0]["reason"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("write hole") && why.contains("fail over to the mirror"), "{s}");
    assert!(NbdClient::connect(&pair.src.nbd, VOL).is_err(), "the volume is served");

    // The mirror takes over with every acknowledged write.
    failover(&pair.dst_api(), VOL).expect("failover");
    assert_verified(&verify(&w, &pair.dst.nbd, VOL).unwrap(), "after the failover, on the mirror's site");
    write(&mut w, &pair.dst.nbd, 500);

    // The old primary's storage becomes the mirror, copied over whole.
    let (ok, out) = ctl(&pair.src.control, &["resync", VOL, "--from", &pair.dst.control]);
    assert!(ok && out.contains("baseline"), "{out}");
    let st = wait_state(&pair.dst_api(), VOL, "in-sync", Duration::from_secs(120));
    assert_eq!(st["last_copy_kind"], "baseline", "{st}");
    cp(&pair.dst_api(), VOL).expect("CP on the new primary");
    let m = mirror_status(&pair.src_api(), VOL).unwrap();
    assert_eq!(m["consistent"], true, "{m}");
    let a = read_volume(&pair.dst.nbd, VOL).expect("read the primary");
    let b = read_volume(&pair.src.nbd, VOL).expect("read the mirror (degraded)");
    assert!(first_difference(&a, &b).is_none(), "the copied-over mirror differs from the primary");
    assert_verified(&verify(&w, &pair.src.nbd, VOL).unwrap(), "on the old primary, a mirror now");
    let s = status(&pair.src_api()).unwrap();
    assert!(s["unstarted"].as_array().is_none_or(Vec::is_empty), "still reported as unstarted: {s}");
}
