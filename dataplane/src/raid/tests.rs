//! RAID-4 behaviour: a model check of reads and writes, and the faults of the issue:
//! flipped bytes in data and parity members, a deleted, truncated or failing member,
//! stale and corrupt superblocks, two failures, rebuild under writes, and crashes at every
//! write of a batch (no write hole).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::format::BLOCK_BYTES;
use crate::storage::{BlockDevice, DiskSpec, FaultDevice, FaultPlan, FileDevice, MemDevice, WriteOp};

const B: u64 = BLOCK_BYTES as u64;

fn spec(name: &str) -> DiskSpec {
    DiskSpec::parse(name).unwrap()
}

/// A volume over memory members, each behind its own fault plan.
struct MemRaid {
    raid: Raid4,
    mems: Vec<Arc<MemDevice>>,
    plans: Vec<Arc<FaultPlan>>,
}

fn mem_raid(data: u32, unit: u32, blocks: u64) -> MemRaid {
    let geo = Geometry::new(data, unit, blocks * B).unwrap();
    let mems: Vec<Arc<MemDevice>> = (0..geo.members()).map(|_| Arc::new(MemDevice::new(geo.member_bytes()))).collect();
    let plans: Vec<Arc<FaultPlan>> = (0..geo.members()).map(|_| FaultPlan::new()).collect();
    let devs = faulty(&mems, &plans);
    let raid = Raid4::create_devices("t", devs, geo).unwrap();
    MemRaid { raid, mems, plans }
}

fn faulty(mems: &[Arc<MemDevice>], plans: &[Arc<FaultPlan>]) -> Vec<(DiskSpec, Arc<dyn BlockDevice>)> {
    mems.iter()
        .zip(plans)
        .enumerate()
        .map(|(i, (m, p))| {
            let dev: Arc<dyn BlockDevice> = Arc::new(FaultDevice::new(m.clone(), p.clone()));
            (spec(&format!("mem{i}")), dev)
        })
        .collect()
}

/// Reopens the members as they are on "disk", with `missing` absent.
fn reopen(mems: &[Arc<MemDevice>], missing: &[usize]) -> Result<Raid4, RaidError> {
    let disks = mems
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let dev: io::Result<Arc<dyn BlockDevice>> = if missing.contains(&i) {
                Err(io::Error::new(io::ErrorKind::NotFound, "no such file"))
            } else {
                Ok(m.clone())
            };
            (spec(&format!("mem{i}")), dev)
        })
        .collect();
    Raid4::open_devices("t", disks)
}

/// A copy of the members, so that opening them (which records what it finds) leaves the
/// originals as they were.
fn copies(mems: &[Arc<MemDevice>]) -> Vec<Arc<MemDevice>> {
    mems.iter()
        .map(|m| {
            let c = MemDevice::new(m.size());
            c.write_at(&m.snapshot(), 0).unwrap();
            Arc::new(c)
        })
        .collect()
}

fn random_fill(rng: &mut StdRng, dev: &dyn BlockDevice, model: &mut [u8]) {
    rng.fill(model);
    dev.write_at(model, 0).unwrap();
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; crate::usize_of(dev.size())];
    dev.read_at(&mut v, 0).unwrap();
    v
}

fn flip(mem: &MemDevice, offset: u64) {
    let mut b = [0u8; 1];
    mem.read_at(&mut b, offset).unwrap();
    b[0] ^= 0x5a;
    mem.write_at(&b, offset).unwrap();
}

/// Where volume block `vbn` lives, as a byte offset on its member.
fn member_offset(geo: Geometry, vbn: u64) -> (usize, u64) {
    let p = geo.place(vbn);
    (p.member, geo.data_offset() + p.row * B)
}

#[test]
fn reads_and_writes_match_a_model_and_survive_any_one_member_loss() {
    for (data, unit, blocks, seed) in [(2, 4096, 37, 1), (3, 8192, 64, 2), (4, 16384, 101, 3), (5, 4096, 50, 4)] {
        let mut rng = StdRng::seed_from_u64(seed);
        let t = mem_raid(data, unit, blocks);
        let size = blocks * B;
        let mut model = vec![0u8; crate::usize_of(size)];
        for _ in 0..300 {
            let len = rng.gen_range(1..=6 * B).min(size);
            let off = rng.gen_range(0..=size - len);
            let (off, len) = if rng.gen_bool(0.7) {
                // Mostly block-aligned, as the CP writes.
                let o = off / B * B;
                (o, (len.div_ceil(B) * B).min(size - o))
            } else {
                (off, len)
            };
            match rng.gen_range(0..4) {
                0 => {
                    let mut got = vec![0u8; crate::usize_of(len)];
                    t.raid.read_at(&mut got, off).unwrap();
                    assert_eq!(got, model[crate::usize_of(off)..crate::usize_of(off + len)]);
                }
                1 if off.is_multiple_of(B) && len.is_multiple_of(B) => {
                    t.raid.write_zeroes(off, len).unwrap();
                    model[crate::usize_of(off)..crate::usize_of(off + len)].fill(0);
                }
                2 => {
                    // A batch of two disjoint writes.
                    let half = len / 2 / B * B;
                    if half == 0 {
                        continue;
                    }
                    let a: Vec<u8> = (0..half).map(|_| rng.gen()).collect();
                    let b: Vec<u8> = (0..len - half).map(|_| rng.gen()).collect();
                    t.raid
                        .write_many(&[WriteOp { offset: off + half, buf: &b }, WriteOp { offset: off, buf: &a }])
                        .unwrap();
                    model[crate::usize_of(off)..crate::usize_of(off + half)].copy_from_slice(&a);
                    model[crate::usize_of(off + half)..crate::usize_of(off + len)].copy_from_slice(&b);
                }
                _ => {
                    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    t.raid.write_at(&data, off).unwrap();
                    model[crate::usize_of(off)..crate::usize_of(off + len)].copy_from_slice(&data);
                }
            }
        }
        assert_eq!(read_all(&t.raid), model);
        t.raid.flush().unwrap();
        let report = t.raid.scrub(None).unwrap();
        assert_eq!(report.result, "clean", "{report:?}");
        assert_eq!(report.rows_checked, t.raid.geometry().rows());
        // Parity is right for every row: any one member can go.
        for gone in 0..t.mems.len() {
            let r = reopen(&copies(&t.mems), &[gone]).unwrap();
            assert_eq!(read_all(&r), model, "{data}+1, member {gone} missing");
            assert!(r.status().degraded);
        }
    }
}

#[test]
fn a_flipped_data_block_is_rebuilt_on_read_and_rewritten() {
    let mut rng = StdRng::seed_from_u64(7);
    let t = mem_raid(3, 8192, 48);
    let mut model = vec![0u8; 48 * BLOCK_BYTES];
    random_fill(&mut rng, &t.raid, &mut model);
    t.raid.flush().unwrap();
    let geo = t.raid.geometry();
    let (m, off) = member_offset(geo, 13);
    flip(&t.mems[m], off + 100);
    let mut got = vec![0u8; BLOCK_BYTES];
    t.raid.read_at(&mut got, 13 * B).unwrap();
    assert_eq!(got, model[13 * BLOCK_BYTES..14 * BLOCK_BYTES]);
    let c = t.raid.counters();
    assert_eq!((c.checksum_errors, c.blocks_repaired, c.unrecoverable), (1, 1, 0));
    // Rewritten in place: the member holds the right bytes again.
    let mut raw = vec![0u8; BLOCK_BYTES];
    t.mems[m].read_at(&mut raw, off).unwrap();
    assert_eq!(raw, model[13 * BLOCK_BYTES..14 * BLOCK_BYTES]);
    assert_eq!(t.raid.scrub(None).unwrap().result, "clean");
}

#[test]
fn scrub_finds_and_repairs_flipped_parity_and_data() {
    let mut rng = StdRng::seed_from_u64(8);
    let t = mem_raid(4, 4096, 64);
    let mut model = vec![0u8; 64 * BLOCK_BYTES];
    random_fill(&mut rng, &t.raid, &mut model);
    t.raid.flush().unwrap();
    let geo = t.raid.geometry();
    let p = geo.parity_member();
    flip(&t.mems[p], geo.data_offset() + 3 * B + 7);
    flip(&t.mems[p], geo.data_offset() + 9 * B);
    let (m, off) = member_offset(geo, 30);
    flip(&t.mems[m], off + 4095);
    // Reads of data never look at parity; they stay right.
    assert_eq!(read_all(&t.raid), model);
    let r = t.raid.scrub(None).unwrap();
    assert_eq!(r.result, "repaired", "{r:?}");
    assert_eq!((r.checksum_errors, r.blocks_repaired, r.unrecoverable), (2, 2, 0), "{r:?}");
    assert_eq!(t.raid.status().last_scrub.unwrap(), r);
    let again = t.raid.scrub(None).unwrap();
    assert_eq!((again.result.as_str(), again.checksum_errors), ("clean", 0));
    // Parity is right again: any member can go.
    drop(t.raid);
    assert_eq!(read_all(&reopen(&copies(&t.mems), &[m]).unwrap()), model);
}

#[test]
fn a_corrupt_checksum_entry_is_corrected_not_trusted() {
    let mut rng = StdRng::seed_from_u64(9);
    let t = mem_raid(3, 4096, 30);
    let mut model = vec![0u8; 30 * BLOCK_BYTES];
    random_fill(&mut rng, &t.raid, &mut model);
    t.raid.flush().unwrap();
    let geo = t.raid.geometry();
    drop(t.raid);
    // Member 1's checksum of row 2.
    flip(&t.mems[1], geo.csum_offset() + 2 * 4);
    let r = reopen(&t.mems, &[]).unwrap();
    assert_eq!(read_all(&r), model);
    let c = r.counters();
    assert_eq!((c.checksum_errors, c.checksums_corrected, c.blocks_repaired), (1, 1, 0));
}

#[test]
fn two_bad_blocks_in_one_row_are_an_error_never_garbage() {
    let mut rng = StdRng::seed_from_u64(10);
    let t = mem_raid(3, 4096, 30);
    let mut model = vec![0u8; 30 * BLOCK_BYTES];
    random_fill(&mut rng, &t.raid, &mut model);
    t.raid.flush().unwrap();
    let geo = t.raid.geometry();
    // Blocks 0 and 1 share row 0 (members 0 and 1).
    for v in [0, 1] {
        let (m, off) = member_offset(geo, v);
        flip(&t.mems[m], off);
    }
    let mut got = vec![0u8; BLOCK_BYTES];
    let err = t.raid.read_at(&mut got, 0).unwrap_err().to_string();
    assert!(err.contains("row 0") && err.contains("one block per row"), "{err}");
    // The rest of the volume reads fine.
    let mut rest = vec![0u8; 27 * BLOCK_BYTES];
    t.raid.read_at(&mut rest, 3 * B).unwrap();
    assert_eq!(rest, model[3 * BLOCK_BYTES..]);
    let s = t.raid.scrub(None).unwrap();
    assert_eq!((s.result.as_str(), s.unrecoverable), ("errors", 1));
}

#[test]
fn a_failing_member_is_dropped_and_io_goes_on_degraded_until_a_second_fails() {
    let mut rng = StdRng::seed_from_u64(11);
    let t = mem_raid(3, 8192, 60);
    let mut model = vec![0u8; 60 * BLOCK_BYTES];
    random_fill(&mut rng, &t.raid, &mut model);
    t.plans[1].fail_reads.store(true, Ordering::SeqCst);
    t.plans[1].fail_writes.store(true, Ordering::SeqCst);
    assert_eq!(read_all(&t.raid), model);
    let st = t.raid.status();
    assert!(st.degraded);
    assert_eq!(st.members[1].state, "failed");
    assert!(st.members[1].reason.as_deref().unwrap().contains("injected"), "{:?}", st.members[1]);
    // Writes go on, to every member's blocks (member 1's only in parity).
    let data: Vec<u8> = (0..20 * BLOCK_BYTES).map(|_| rng.gen()).collect();
    t.raid.write_at(&data, 5 * B).unwrap();
    model[5 * BLOCK_BYTES..25 * BLOCK_BYTES].copy_from_slice(&data);
    t.raid.flush().unwrap();
    assert_eq!(read_all(&t.raid), model);
    // The failure is in the other members' superblocks: member 1 stays out when reopened.
    t.plans[1].fail_reads.store(false, Ordering::SeqCst);
    t.plans[1].fail_writes.store(false, Ordering::SeqCst);
    drop(t.raid);
    let r = reopen(&t.mems, &[]).unwrap();
    assert_eq!(r.status().members[1].state, "failed");
    assert_eq!(read_all(&r), model);
    // A second failure: a clear error, never garbage.
    let t2 = MemRaid { raid: r, mems: t.mems.clone(), plans: t.plans.clone() };
    let plans = (0..4).map(|_| FaultPlan::new()).collect::<Vec<_>>();
    drop(t2);
    let devs = faulty(&t.mems, &plans);
    let r = Raid4::open_devices("t", devs.into_iter().map(|(s, d)| (s, Ok(d))).collect()).unwrap();
    plans[2].fail_reads.store(true, Ordering::SeqCst);
    let mut buf = vec![0u8; 60 * BLOCK_BYTES];
    let err = r.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(err.contains("survives one"), "{err}");
}

#[test]
fn open_explains_missing_stale_corrupt_and_too_many_members() {
    let mut rng = StdRng::seed_from_u64(12);
    let t = mem_raid(3, 4096, 24);
    let mut model = vec![0u8; 24 * BLOCK_BYTES];
    random_fill(&mut rng, &t.raid, &mut model);
    t.raid.flush().unwrap();
    drop(t.raid);
    // A corrupt superblock on one member: opens degraded, and says why.
    flip(&t.mems[2], 20);
    let r = reopen(&copies(&t.mems), &[]).unwrap();
    let st = r.status();
    assert_eq!(st.members[2].state, "failed");
    assert!(st.members[2].reason.as_deref().unwrap().contains("superblock checksum mismatch"), "{st:?}");
    assert_eq!(read_all(&r), model);
    drop(r);
    // And a second one missing: a clear error naming both.
    let err = reopen(&t.mems, &[0]).unwrap_err().to_string();
    assert!(err.contains("member 0") && err.contains("member 2") && err.contains("survives the loss of one"), "{err}");
    // No superblock anywhere.
    let blank: Vec<Arc<MemDevice>> = (0..4).map(|_| Arc::new(MemDevice::new(64 * B))).collect();
    let err = reopen(&blank, &[]).unwrap_err().to_string();
    assert!(err.contains("no member holds a valid superblock") && err.contains("bad magic"), "{err}");
}

#[test]
fn a_member_that_missed_writes_comes_back_stale() {
    let mut rng = StdRng::seed_from_u64(13);
    let t = mem_raid(3, 4096, 24);
    let mut model = vec![0u8; 24 * BLOCK_BYTES];
    random_fill(&mut rng, &t.raid, &mut model);
    t.raid.flush().unwrap();
    drop(t.raid);
    // Member 0 is away for one run, in which the volume is written.
    let r = reopen(&t.mems, &[0]).unwrap();
    let data: Vec<u8> = (0..24 * BLOCK_BYTES).map(|_| rng.gen()).collect();
    r.write_at(&data, 0).unwrap();
    r.flush().unwrap();
    drop(r);
    // It returns: its superblock is older; it is not trusted.
    let r = reopen(&t.mems, &[]).unwrap();
    let st = r.status();
    assert_eq!(st.members[0].state, "failed", "{st:?}");
    assert_eq!(read_all(&r), data);
}

#[test]
fn a_superblock_round_cut_at_any_member_and_sector_opens_whole() {
    let mut rng = StdRng::seed_from_u64(14);
    let t = mem_raid(3, 4096, 24);
    let mut model = vec![0u8; 24 * BLOCK_BYTES];
    random_fill(&mut rng, &t.raid, &mut model);
    t.raid.flush().unwrap();
    let old: Vec<Vec<u8>> = t.mems.iter().map(|m| m.snapshot()).collect();
    // A round (what a rebuild's cursor or an open's findings write): the next event on
    // every member, one after another.
    t.raid.next_event().unwrap();
    let new: Vec<Vec<u8>> = t.mems.iter().map(|m| m.snapshot()).collect();
    drop(t.raid);
    let mut opened = 0;
    for_each_cut_round(&old, &new, |k, mems| {
        let r = reopen(&mems, &[]).expect("a cut round opens");
        let st = r.status();
        assert!(st.members.iter().all(|m| m.state == "in-sync"), "cut at member {k}: {st:?}");
        assert_eq!(read_all(&r), model);
        drop(r);
        // The open finished the round: every member at one event.
        let events: Vec<u64> = mems
            .iter()
            .map(|m| super::superblock::Superblock::decode(&m.snapshot()[..BLOCK_BYTES]).unwrap().events)
            .collect();
        assert!(events.windows(2).all(|w| w[0] == w[1]), "{events:?}");
        opened += 1;
    });
    assert!(opened >= 4 * 16);
}

/// Every way a superblock round from members `old` to `new` can be cut: the members before
/// `k` written and flushed, member `k` cut every way a disk can leave a block, those after
/// it untouched. `check` gets `k` and the members as the cut left them.
fn for_each_cut_round(old: &[Vec<u8>], new: &[Vec<u8>], mut check: impl FnMut(usize, Vec<Arc<MemDevice>>)) {
    let n = old.len();
    for k in 0..n {
        for img in crate::tear::disk_images(&old[k][..BLOCK_BYTES], &new[k][..BLOCK_BYTES]) {
            let mems: Vec<Arc<MemDevice>> = (0..n)
                .map(|i| {
                    let m = MemDevice::new(old[i].len() as u64);
                    m.write_at(if i < k { &new[i] } else { &old[i] }, 0).unwrap();
                    if i == k {
                        m.write_at(&img, 0).unwrap();
                    }
                    Arc::new(m)
                })
                .collect();
            check(k, mems);
        }
    }
}

#[test]
fn a_member_two_rounds_behind_is_stale_even_if_held_in_sync() {
    // The old disk of a slot that was replaced and rebuilt, put back: its superblock names
    // the right volume and slot, the table holds the slot in sync, but it is rounds behind.
    let mut rng = StdRng::seed_from_u64(15);
    let t = mem_raid(3, 4096, 24);
    let mut model = vec![0u8; 24 * BLOCK_BYTES];
    random_fill(&mut rng, &t.raid, &mut model);
    t.raid.flush().unwrap();
    let old_disk = t.mems[1].snapshot();
    for _ in 0..2 {
        t.raid.next_event().unwrap();
    }
    drop(t.raid);
    let mems = copies(&t.mems);
    mems[1].write_at(&old_disk, 0).unwrap();
    let r = reopen(&mems, &[]).unwrap();
    let st = r.status();
    assert_eq!(st.members[1].state, "failed", "{st:?}");
    assert!(st.members[1].reason.as_deref().unwrap().contains("stale"), "{st:?}");
    assert_eq!(read_all(&r), model);
}

fn tmpdir() -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-tmp");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

fn file_specs(dir: &Path, n: usize) -> Vec<DiskSpec> {
    (0..n).map(|i| DiskSpec::parse(&dir.join(format!("d{i}")).display().to_string()).unwrap()).collect()
}

#[test]
fn file_members_deleted_or_truncated_then_replaced_and_rebuilt() {
    let dir = tmpdir();
    let specs = file_specs(dir.path(), 4);
    let geo = Geometry::new(3, 16384, 256 * B).unwrap();
    let raid = Raid4::create("v", &specs, geo).unwrap();
    let mut rng = StdRng::seed_from_u64(14);
    let mut model = vec![0u8; 256 * BLOCK_BYTES];
    random_fill(&mut rng, &raid, &mut model);
    raid.flush().unwrap();
    drop(raid);
    // A fresh create over a member that exists is refused.
    let err = Raid4::create("v", &specs, geo).unwrap_err().to_string();
    assert!(err.contains("not empty"), "{err}");

    for (victim, damage) in [(1usize, "delete"), (3, "truncate")] {
        let path = specs[victim].path.clone();
        match damage {
            "delete" => std::fs::remove_file(&path).unwrap(),
            _ => std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(geo.member_bytes() / 2).unwrap(),
        }
        let raid = Raid4::open("v", &specs).unwrap();
        let st = raid.status();
        assert_eq!(st.members[victim].state, "failed");
        let why = st.members[victim].reason.clone().unwrap();
        assert!(why.contains(if damage == "delete" { "cannot open" } else { "truncated" }), "{why}");
        assert_eq!(read_all(&raid), model, "degraded reads after {damage}");
        // Writes go on while degraded.
        let data: Vec<u8> = (0..40 * BLOCK_BYTES).map(|_| rng.gen()).collect();
        raid.write_at(&data, 100 * B).unwrap();
        model[100 * BLOCK_BYTES..140 * BLOCK_BYTES].copy_from_slice(&data);
        // Replace and rebuild onto a new file.
        let new = DiskSpec::parse(&dir.path().join(format!("new{victim}")).display().to_string()).unwrap();
        raid.replace_member(raid.member_index(&path.display().to_string()).unwrap(), &new).unwrap();
        raid.rebuild(None).unwrap();
        let st = raid.status();
        assert!(!st.degraded, "{st:?}");
        assert_eq!(read_all(&raid), model);
        assert_eq!(raid.scrub(None).unwrap().result, "clean");
        drop(raid);
        // The volume now lives on the new member list.
        let mut now = specs.clone();
        now[victim] = new;
        let raid = Raid4::open("v", &now).unwrap();
        assert!(!raid.status().degraded);
        assert_eq!(read_all(&raid), model);
        // Redundancy is back: any three members serve every block (checked on copies,
        // since an open records a missing member).
        drop(raid);
        let copy = dir.path().join("copy");
        std::fs::create_dir_all(&copy).unwrap();
        let mut without = Vec::new();
        for (i, s) in now.iter().enumerate() {
            let to = copy.join(format!("c{i}"));
            std::fs::copy(&s.path, &to).unwrap();
            without.push(DiskSpec::parse(&to.display().to_string()).unwrap());
        }
        without[(victim + 1) % 4] = DiskSpec::parse(&dir.path().join("absent").display().to_string()).unwrap();
        assert_eq!(read_all(&Raid4::open("v", &without).unwrap()), model);
        std::fs::remove_dir_all(&copy).unwrap();
        // For the next round the original paths are the member list again.
        for (i, s) in now.iter().enumerate() {
            if s.path != specs[i].path {
                std::fs::rename(&s.path, &specs[i].path).unwrap();
            }
        }
    }
}

#[test]
fn rebuild_runs_beside_writes_and_reports_progress() {
    let dir = tmpdir();
    let specs = file_specs(dir.path(), 4);
    let geo = Geometry::new(3, 4096, 1024 * B).unwrap();
    let raid = Arc::new(Raid4::create("v", &specs, geo).unwrap());
    let mut rng = StdRng::seed_from_u64(15);
    let mut model = vec![0u8; 1024 * BLOCK_BYTES];
    random_fill(&mut rng, raid.as_ref(), &mut model);
    let new = DiskSpec::parse(&dir.path().join("new").display().to_string()).unwrap();
    raid.replace_member(2, &new).unwrap();
    assert_eq!(raid.rebuilding_member(), Some(2));
    // Rate-limited to about 40 ms for the member's 4 MiB.
    let rebuilder = {
        let raid = raid.clone();
        std::thread::spawn(move || raid.rebuild(Some(100 << 20)))
    };
    let mut saw_progress = false;
    let model = {
        let mut model = model;
        for i in 0..60u64 {
            let v = rng.gen_range(0..1000u64);
            let data: Vec<u8> = (0..8 * BLOCK_BYTES).map(|_| rng.gen()).collect();
            raid.write_at(&data, v * B).unwrap();
            model[crate::usize_of(v * B)..crate::usize_of((v + 8) * B)].copy_from_slice(&data);
            if let Some(p) = raid.status().rebuild {
                saw_progress |= p.done_bytes > 0 && p.done_bytes < p.total_bytes && p.member == Some(2);
            }
            if i % 10 == 0 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        model
    };
    rebuilder.join().unwrap().unwrap();
    assert!(saw_progress, "progress was published while the rebuild ran");
    assert_eq!(read_all(raid.as_ref()), model);
    let s = raid.scrub(None).unwrap();
    assert_eq!(s.result, "clean", "{s:?}");
    // Every block is right on the rebuilt member: the others alone cannot be missed.
    drop(raid);
    let mut without = specs.clone();
    without[2] = new;
    without[0] = DiskSpec::parse(&dir.path().join("absent").display().to_string()).unwrap();
    assert_eq!(read_all(&Raid4::open("v", &without).unwrap()), model);
}

/// `base` with every write of `batch` (offset, bytes) applied.
fn after_batch(base: &[u8], batch: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = base.to_vec();
    for (off, d) in batch {
        out[crate::usize_of(*off)..crate::usize_of(*off) + d.len()].copy_from_slice(d);
    }
    out
}

/// Writes `batch` as one `write_many`, then flushes.
fn write_batch_flushed(dev: &dyn BlockDevice, batch: &[(u64, Vec<u8>)]) -> io::Result<()> {
    let ops: Vec<WriteOp<'_>> = batch.iter().map(|(o, d)| WriteOp { offset: *o, buf: d }).collect();
    dev.write_many(&ops)?;
    dev.flush()
}

/// A batch cut at every possible write by a crash, reopened and redone from the "log":
/// every row's parity is right afterwards (no write hole), whatever the cut.
#[test]
fn a_redo_after_a_crash_at_any_write_leaves_no_write_hole() {
    let geo = Geometry::new(3, 8192, 60 * B).unwrap();
    let mut rng = StdRng::seed_from_u64(16);
    let base: Vec<u8> = (0..60 * BLOCK_BYTES).map(|_| rng.gen()).collect();
    // The CP: full stripes, partial rows and single blocks.
    let batch: Vec<(u64, Vec<u8>)> = vec![
        (0, (0..6 * BLOCK_BYTES).map(|_| rng.gen()).collect()),
        (9 * B, (0..3 * BLOCK_BYTES).map(|_| rng.gen()).collect()),
        (20 * B, (0..BLOCK_BYTES).map(|_| rng.gen()).collect()),
        (31 * B, (0..14 * BLOCK_BYTES).map(|_| rng.gen()).collect()),
    ];
    let expect = after_batch(&base, &batch);
    let write_batch = |dev: &dyn BlockDevice| write_batch_flushed(dev, &batch);
    // Count the member writes of the batch once.
    let total = {
        let t = mem_raid(3, 8192, 60);
        t.raid.write_at(&base, 0).unwrap();
        t.raid.flush().unwrap();
        let before: u64 = t.plans.iter().map(|p| p.writes.load(Ordering::SeqCst)).sum();
        write_batch(&t.raid).unwrap();
        t.plans.iter().map(|p| p.writes.load(Ordering::SeqCst)).sum::<u64>() - before
    };
    assert!(total > 8, "the batch writes every member: {total}");
    for cut in 0..=total {
        let mems: Vec<Arc<MemDevice>> = (0..4).map(|_| Arc::new(MemDevice::new(geo.member_bytes()))).collect();
        // One plan shared by all members: the crash point counts writes across them.
        let plan = FaultPlan::new();
        let plans = vec![plan.clone(); 4];
        let raid = Raid4::create_devices("t", faulty(&mems, &plans), geo).unwrap();
        raid.write_at(&base, 0).unwrap();
        raid.flush().unwrap();
        plan.crash_after(i64::try_from(cut).unwrap());
        write_batch(&raid).unwrap();
        drop(raid);
        // Restart: reopen what reached the members, redo the logged batch.
        let raid = reopen(&mems, &[]).unwrap();
        raid.set_redo(true);
        write_batch(&raid).unwrap();
        raid.set_redo(false);
        assert_eq!(read_all(&raid), expect, "cut after {cut} of {total} writes");
        let s = raid.scrub(None).unwrap();
        assert_eq!((s.unrecoverable, s.parity_mismatches), (0, 0), "cut {cut}: {s:?}");
        assert_eq!(s.result, "clean", "cut {cut}: {s:?}");
        // Parity is right: each member can go, and the volume still reads right.
        drop(raid);
        for gone in 0..4 {
            assert_eq!(read_all(&reopen(&copies(&mems), &[gone]).unwrap()), expect, "cut {cut}, member {gone} gone");
        }
    }
}

#[test]
fn member_index_names_members_by_index_path_or_spec() {
    let dir = tmpdir();
    let specs = file_specs(dir.path(), 3);
    let raid = Raid4::create("v", &specs, Geometry::new(2, 4096, 8 * B).unwrap()).unwrap();
    assert_eq!(raid.member_index("1"), Some(1));
    assert_eq!(raid.member_index(&specs[2].path.display().to_string()), Some(2));
    assert_eq!(raid.member_index(&specs[0].to_string()), Some(0));
    assert_eq!(raid.member_index("7"), None);
    assert_eq!(raid.member_index("/nowhere"), None);
    let _: PathBuf = specs[0].path.clone();
    let _ = FileDevice::open(&specs[0].path).unwrap();
}

#[test]
fn a_crash_with_writes_in_flight_on_a_degraded_volume_is_a_clear_error_never_garbage() {
    let geo = Geometry::new(3, 8192, 60 * B).unwrap();
    let mut rng = StdRng::seed_from_u64(21);
    let base: Vec<u8> = (0..60 * BLOCK_BYTES).map(|_| rng.gen()).collect();
    // Partial rows and single blocks: read-modify-write of parity with member 1 gone.
    let batch: Vec<(u64, Vec<u8>)> = vec![
        (2 * B, (0..3 * BLOCK_BYTES).map(|_| rng.gen()).collect()),
        (20 * B, (0..BLOCK_BYTES).map(|_| rng.gen()).collect()),
        (33 * B, (0..5 * BLOCK_BYTES).map(|_| rng.gen()).collect()),
    ];
    let expect = after_batch(&base, &batch);
    let write_batch = |dev: &dyn BlockDevice| write_batch_flushed(dev, &batch);
    // A volume with member 1 gone, its base on the others, closed clean.
    let fresh = || {
        let mems = members_holding(geo, &base);
        let degraded = reopen(&mems, &[1]).unwrap();
        assert!(degraded.status().degraded);
        drop(degraded);
        mems
    };
    let open_degraded = |mems: &[Arc<MemDevice>], plan: &Arc<FaultPlan>| {
        open_without(faulty(mems, &vec![plan.clone(); 4]), 1, WriteHole::Refuse).unwrap()
    };
    let total = {
        let mems = fresh();
        let plan = FaultPlan::new();
        let raid = open_degraded(&mems, &plan);
        write_batch(&raid).unwrap();
        plan.writes.load(Ordering::SeqCst)
    };
    assert!(total > 6, "superblock rounds and the batch: {total} writes");
    let (mut refused, mut opened) = (0, 0);
    for cut in 0..=total {
        let mems = fresh();
        let plan = FaultPlan::new();
        let raid = open_degraded(&mems, &plan);
        plan.crash_after(i64::try_from(cut).unwrap());
        write_batch(&raid).unwrap();
        drop(raid);
        match reopen(&mems, &[1]) {
            Err(RaidError::DirtyDegraded { .. }) => refused += 1,
            Err(e) => panic!("cut {cut}: {e}"),
            Ok(r) => {
                // Only where no write of the batch reached a member, or all of it and the
                // flush did: then it reads one or the other, whole.
                let got = read_all(&r);
                assert!(got == base || got == expect, "cut {cut} of {total}: opened with other contents");
                opened += 1;
            }
        }
    }
    assert!(refused > 0 && opened > 0, "refused {refused}, opened {opened}");
}

/// The four members of a new RAID-4 volume of `geo` (3+1) holding `base`, closed clean.
fn members_holding(geo: Geometry, base: &[u8]) -> Vec<Arc<MemDevice>> {
    let mems: Vec<Arc<MemDevice>> = (0..4).map(|_| Arc::new(MemDevice::new(geo.member_bytes()))).collect();
    let raid =
        Raid4::create_devices("t", faulty(&mems, &(0..4).map(|_| FaultPlan::new()).collect::<Vec<_>>()), geo).unwrap();
    raid.write_at(base, 0).unwrap();
    raid.flush().unwrap();
    mems
}

/// Opens the volume over `devs` with member `gone` missing.
fn open_without(devs: Vec<(DiskSpec, Arc<dyn BlockDevice>)>, gone: usize, hole: WriteHole) -> Result<Raid4, RaidError> {
    let devs = devs
        .into_iter()
        .enumerate()
        .map(|(i, (s, d))| (s, if i == gone { Err(io::Error::new(io::ErrorKind::NotFound, "gone")) } else { Ok(d) }))
        .collect();
    Raid4::open_devices_with("t", devs, hole)
}

/// `may_hold_data` says no only where every data member's piece is a hole: a written
/// block's stripe unit, and any row of a member that is down, may hold data.
#[test]
fn holes_are_seen_through_the_layout_and_never_over_a_member_that_is_down() {
    let dir = tmpdir();
    let specs = file_specs(dir.path(), 4);
    // 3 data members, 64 KiB stripe unit (16 blocks), 16 MiB.
    let geo = Geometry::new(3, 65536, 4096 * B).unwrap();
    let raid = Raid4::create("v", &specs, geo).unwrap();
    let mib = 1u64 << 20;
    raid.write_at(&[7u8; BLOCK_BYTES], 5 * mib + 8192).unwrap();
    raid.flush().unwrap();
    assert!(raid.may_hold_data(5 * mib, 64 * 1024).unwrap(), "the written block's unit");
    assert!(raid.may_hold_data(4 * mib, 2 * mib).unwrap(), "a range around it");
    assert!(!raid.may_hold_data(0, 4 * mib).unwrap(), "never written");
    assert!(!raid.may_hold_data(8 * mib, 8 * mib).unwrap(), "never written, to the end");
    // A member down: its rows may hold data through parity.
    raid.fail_member(1, &io::Error::other("test"));
    let (first_on_1, len) = (64 * 1024, 64 * 1024);
    assert!(raid.may_hold_data(first_on_1, len).unwrap(), "a unit on the failed member");
    assert!(!raid.may_hold_data(0, 64 * 1024).unwrap(), "a unit on a member still up");
    // What a hole claims, a read gives: zeroes (degraded, from parity, on member 1).
    let mut b = [1u8; BLOCK_BYTES];
    raid.read_at(&mut b, first_on_1).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    raid.read_at(&mut b, 5 * mib + 8192).unwrap();
    assert!(b.iter().all(|&x| x == 7), "the written block, degraded or not");
}

#[test]
fn a_volume_grows_in_place_on_files_and_reopens_at_its_new_size() {
    let dir = tmpdir();
    let specs = file_specs(dir.path(), 4);
    let small = 96 * B;
    let geo = Geometry::new(3, 16384, small).unwrap().with_room_for(64 << 20).unwrap();
    let raid = Raid4::create("v", &specs, geo).unwrap();
    let mut rng = StdRng::seed_from_u64(15);
    let mut model = vec![0u8; crate::usize_of(small)];
    random_fill(&mut rng, &raid, &mut model);
    raid.flush().unwrap();
    let big = 5000 * B;
    // Step 1 changes no size; reads and writes go on meanwhile.
    raid.prepare_grow(big).unwrap();
    assert_eq!(raid.size(), small);
    raid.write_at(&[7u8; BLOCK_BYTES], 5 * B).unwrap();
    model[5 * BLOCK_BYTES..6 * BLOCK_BYTES].fill(7);
    raid.commit_grow(big).unwrap();
    assert_eq!(raid.size(), big);
    let mut after = read_all(&raid);
    assert_eq!(&after[..model.len()], &model[..], "the old blocks stayed where they were");
    assert!(after[model.len()..].iter().all(|&b| b == 0), "the new blocks read as zeroes");
    // The new blocks take writes, parity included.
    let tail: Vec<u8> = (0..16 * BLOCK_BYTES).map(|i| u8::try_from(i % 251).expect("below 251")).collect();
    raid.write_at(&tail, big - 16 * B).unwrap();
    after[crate::usize_of(big) - tail.len()..].copy_from_slice(&tail);
    raid.flush().unwrap();
    drop(raid);
    // The member files stay sparse: the checksum area's room and the new rows are holes.
    use std::os::unix::fs::MetadataExt;
    let allocated: u64 = specs.iter().map(|s| std::fs::metadata(&s.path).unwrap().blocks() * 512).sum();
    assert!(allocated < 4 * (64 << 10) + 4 * 1024 * B, "{allocated} bytes allocated");
    // Reopened: the new size, the same contents, every block checked; and with a member
    // lost, the new rows rebuild from parity.
    let raid = Raid4::open("v", &specs).unwrap();
    assert_eq!(raid.size(), big);
    assert_eq!(read_all(&raid), after);
    assert_eq!(raid.counters().checksum_errors, 0);
    drop(raid);
    std::fs::remove_file(&specs[2].path).unwrap();
    let raid = Raid4::open("v", &specs).unwrap();
    assert!(raid.status().degraded);
    assert_eq!(read_all(&raid), after);
    // Degraded, it does not grow, and says why.
    let e = raid.prepare_grow(big + 1024 * B).unwrap_err().to_string();
    assert!(e.contains("before growing"), "{e}");
}

#[test]
fn growing_past_the_checksum_room_or_shrinking_is_refused_and_changes_nothing() {
    let t = mem_raid(3, 4096, 24);
    let max = t.raid.max_bytes();
    assert!(max >= 24 * B);
    let e = t.raid.prepare_grow(max + 64 * 1024 * B).unwrap_err().to_string();
    assert!(e.contains("can grow to"), "{e}");
    let e = t.raid.prepare_grow(8 * B).unwrap_err().to_string();
    assert!(e.contains("cannot shrink"), "{e}");
    assert_eq!(t.raid.size(), 24 * B);
    // Within the room of its last checksum block it grows (memory members grow too).
    t.raid.commit_grow(max).unwrap();
    assert_eq!(t.raid.size(), max);
}

#[test]
fn a_grow_cut_at_any_member_and_sector_opens_whole() {
    let mut rng = StdRng::seed_from_u64(16);
    let geo = Geometry::new(3, 4096, 24 * B).unwrap().with_room_for(4096 * B).unwrap();
    let mems: Vec<Arc<MemDevice>> = (0..geo.members()).map(|_| Arc::new(MemDevice::new(geo.member_bytes()))).collect();
    let devs = mems.iter().enumerate().map(|(i, m)| (spec(&format!("mem{i}")), m.clone() as Arc<dyn BlockDevice>));
    let raid = Raid4::create_devices("t", devs.collect(), geo).unwrap();
    let mut model = vec![0u8; 24 * BLOCK_BYTES];
    random_fill(&mut rng, &raid, &mut model);
    raid.flush().unwrap();
    raid.prepare_grow(300 * B).unwrap();
    let old: Vec<Vec<u8>> = mems.iter().map(|m| m.snapshot()).collect();
    raid.commit_grow(300 * B).unwrap();
    let new: Vec<Vec<u8>> = mems.iter().map(|m| m.snapshot()).collect();
    drop(raid);
    for_each_cut_round(&old, &new, |k, mems| {
        let r = reopen(&mems, &[]).expect("a cut grow opens");
        let st = r.status();
        assert!(st.members.iter().all(|m| m.state == "in-sync"), "cut at member {k}: {st:?}");
        // Old or new size, whichever the newest superblock says; the data whole.
        let size = r.size();
        assert!(size == 24 * B || size == 300 * B, "{size}");
        let all = read_all(&r);
        assert_eq!(&all[..model.len()], &model[..]);
        assert!(all[model.len()..].iter().all(|&b| b == 0));
        assert_eq!(r.counters().checksum_errors, 0, "cut at member {k}");
        drop(r);
        let sbs: Vec<_> =
            mems.iter().map(|m| super::superblock::Superblock::decode(&m.snapshot()[..BLOCK_BYTES]).unwrap()).collect();
        assert!(sbs.windows(2).all(|w| w[0].events == w[1].events && w[0].geometry == w[1].geometry), "{sbs:?}");
    });
}

/// A volume found dirty and degraded (the write hole) and opened to be copied over whole
/// takes the copy block by block, partial rows and all, over its torn rows, with
/// [`BlockDevice::set_copy_over`]; without it, a torn row stops the copy. Once every
/// block is written, the volume reads the copy whole, the missing member's blocks
/// included (from parity).
#[test]
fn a_copy_over_a_volume_with_the_write_hole_goes_through_its_torn_rows() {
    let geo = Geometry::new(3, 8192, 60 * B).unwrap();
    let mut rng = StdRng::seed_from_u64(22);
    let base: Vec<u8> = (0..60 * BLOCK_BYTES).map(|_| rng.gen()).collect();
    let copy: Vec<u8> = (0..60 * BLOCK_BYTES).map(|_| rng.gen()).collect();
    let batch: Vec<(u64, Vec<u8>)> =
        (0..12).map(|i| (i * 5 * B, (0..BLOCK_BYTES).map(|_| rng.gen()).collect())).collect();
    let (mut stopped, mut copied) = (0, 0);
    for cut in 0..40 {
        let mems = members_holding(geo, &base);
        let open = |hole| {
            let devs =
                mems.iter().enumerate().map(|(i, m)| (spec(&format!("mem{i}")), m.clone() as Arc<dyn BlockDevice>));
            open_without(devs.collect(), 1, hole)
        };
        // Writes in flight with member 1 gone, cut by a crash.
        let plan = FaultPlan::new();
        {
            let raid = open_without(faulty(&mems, &vec![plan.clone(); 4]), 1, WriteHole::Refuse).unwrap();
            plan.crash_after(cut);
            let _ = write_batch_flushed(&raid, &batch);
        }
        let Ok(raid) = open(WriteHole::Accept) else { panic!("cut {cut}: opened for a copy") };
        if !raid.write_hole_found() {
            continue;
        }
        // Without the copy-over mode, some block of a torn row cannot be written.
        let plain = (0..60u64).all(|b| raid.write_at(&copy[crate::usize_of(b * B)..][..BLOCK_BYTES], b * B).is_ok());
        drop(raid);
        let raid = open(WriteHole::Accept).unwrap();
        raid.set_copy_over(true);
        for b in (0..60u64).rev() {
            raid.write_at(&copy[crate::usize_of(b * B)..][..BLOCK_BYTES], b * B)
                .unwrap_or_else(|e| panic!("cut {cut}: copy block {b}: {e}"));
        }
        raid.set_copy_over(false);
        raid.flush().unwrap();
        assert!(read_all(&raid) == copy, "cut {cut}: the copy does not read back");
        assert_eq!(raid.counters().unrecoverable, 0);
        if plain {
            copied += 1;
        } else {
            stopped += 1;
        }
    }
    assert!(stopped > 0, "no cut left a row that stops a plain copy ({copied} went through)");
}
