//! RAID-4 superblocks and whole member images from hostile bytes: the superblock decoder,
//! then a volume assembled from four members whose first blocks (superblock and checksum
//! area) are the input, which must open with an error or degraded, and read with data or
//! an error, never panic or allocate from a forged length.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use nvmirror_dataplane::raid::superblock::Superblock;
use nvmirror_dataplane::raid::{Geometry, Raid4};
use nvmirror_dataplane::storage::{BlockDevice, DiskSpec, MemDevice};

const MEMBER_BYTES: u64 = 256 << 10;

fuzz_target!(|data: &[u8]| {
    let _ = Superblock::decode(data);
    // A real volume's members, then the input written over their first bytes.
    let geo = Geometry::new(3, 8192, 384 << 10).expect("geometry");
    assert!(geo.member_bytes() <= MEMBER_BYTES);
    let mems: Vec<Arc<MemDevice>> = (0..4).map(|_| Arc::new(MemDevice::new(MEMBER_BYTES))).collect();
    let disks = mems
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let d: Arc<dyn BlockDevice> = m.clone();
            (DiskSpec::parse(&format!("m{i}")).expect("spec"), d)
        })
        .collect();
    if Raid4::create_devices("fuzz", disks, geo).is_err() {
        return;
    }
    let chunk = data.len().div_ceil(4).max(1);
    for (m, part) in mems.iter().zip(data.chunks(chunk)) {
        let n = part.len().min(usize::try_from(MEMBER_BYTES).expect("small"));
        m.write_at(&part[..n], 0).expect("in range");
    }
    let disks = mems
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let d: Arc<dyn BlockDevice> = m.clone();
            (DiskSpec::parse(&format!("m{i}")).expect("spec"), Ok(d))
        })
        .collect();
    if let Ok(r) = Raid4::open_devices("fuzz", disks) {
        let mut buf = vec![0u8; usize::try_from(r.size().min(1 << 20)).expect("small")];
        let _ = r.read_at(&mut buf, 0);
        let _ = r.scrub(None);
    }
});
