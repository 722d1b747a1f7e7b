//! NVMe/TCP end to end: two `nvmirror node` processes serve one mirrored volume over
//! NVMe/TCP (`--nvmf`), and a host (the project's test initiator) attaches it through both
//! nodes, as Linux native multipath does. The namespace is the same through both paths;
//! ANA says which one takes I/O, and changes with a switchover and with a failover after
//! the primary is killed, each change announced by an asynchronous event; every write
//! acknowledged through either path reads back through the other.

mod common;

use std::time::Duration;

use common::*;
use nvmirror_dataplane::frontend::nvmf::client::{discover, NvmfClient};
use nvmirror_dataplane::frontend::nvmf::{subsystem_nqn, Status};

const VOL: &str = "fabric";
const ANA_OPTIMIZED: u8 = 1;
const ANA_INACCESSIBLE: u8 = 3;
/// Completion of an AER for an ANA change: notice, ANA change, log page 0Ch.
const ANA_CHANGE_EVENT: u32 = 0x000c_0302;
const EVENT_WAIT: Duration = Duration::from_secs(30);

fn block(seed: u64, slba: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed ^ slba.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut b = vec![0u8; 4096];
    rng.fill(&mut b);
    b
}

/// Waits for the path's ANA state to become `want`: an event may first report a state in
/// transition (a new primary waiting for its mirror link).
fn wait_ana(c: &mut NvmfClient, want: u8, what: &str) {
    let deadline = std::time::Instant::now() + EVENT_WAIT;
    loop {
        let state = c.ana_state().expect("ANA log");
        if state == want {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: ANA state {state:#x}, not {want:#x}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_blocks(c: &mut NvmfClient, seed: u64, blocks: std::ops::Range<u64>) {
    for slba in blocks {
        let done = c.write(slba, &block(seed, slba), false).expect("write");
        assert!(done.ok(), "write of block {slba}: {:?}", done.status);
    }
}

fn check_blocks(c: &mut NvmfClient, seed: u64, blocks: std::ops::Range<u64>, what: &str) {
    for slba in blocks {
        let (done, data) = c.read(slba, 1).expect("read");
        assert!(done.ok(), "{what}: read of block {slba}: {:?}", done.status);
        assert!(data == block(seed, slba), "{what}: block {slba} differs from what was acknowledged");
    }
}

#[test]
fn ana_follows_switchover_and_failover_and_every_acknowledged_write_reads_back() {
    let seed = base_seed("nvmf_ana");
    let nvmf = ["--nvmf", "127.0.0.1:0"];
    let mut pair = Pair::start_with("nvmf", &nvmf, &nvmf);
    pair.create_mirrored(VOL, 64 * MIB, LOG_BYTES_MIN);
    let a_addr = pair.src.nvmf.clone().expect("site-a serves NVMe/TCP");
    let b_addr = pair.dst.nvmf.clone().expect("site-b serves NVMe/TCP");
    let nqn = subsystem_nqn(VOL);
    let mut a = NvmfClient::connect(&a_addr, &nqn, false).expect("attach through site-a");
    let mut b = NvmfClient::connect(&b_addr, &nqn, true).expect("attach through site-b (with digests)");
    assert_ne!(a.cntlid, b.cntlid, "each path its own controller");
    assert_eq!(a.ana_state().unwrap(), ANA_OPTIMIZED, "the primary's path");
    assert_eq!(b.ana_state().unwrap(), ANA_INACCESSIBLE, "the mirror's path");
    // Each node's status names the host attached through it, and what its path says.
    let hosts_a = volume_status(&pair.src_api(), VOL).unwrap()["nvmf_hosts"].clone();
    assert_eq!(hosts_a.as_array().map(Vec::len), Some(1), "{hosts_a}");
    assert_eq!(hosts_a[0]["ana"], "optimized");
    assert_eq!(hosts_a[0]["controller"], a.cntlid);
    let hosts_b = mirror_status(&pair.dst_api(), VOL).unwrap()["nvmf_hosts"].clone();
    assert_eq!(hosts_b[0]["ana"], "inaccessible", "{hosts_b}");
    assert!(ctl_ok(&pair.src.control, &["status"]).contains("path optimized"));
    let (_, ns_a) = a.admin.identify(0x00, 1).unwrap();
    let (_, ns_b) = b.admin.identify(0x00, 1).unwrap();
    assert_eq!(ns_a[104..120], ns_b[104..120], "one NGUID through both paths");
    assert_ne!(ns_a[104..120], [0u8; 16]);
    let (_, id_a) = a.admin.identify(0x01, 0).unwrap();
    let (_, id_b) = b.admin.identify(0x01, 0).unwrap();
    assert_eq!(id_a[4..24], id_b[4..24], "one serial through both paths");
    let paths = discover(&a_addr).expect("discovery at the primary");
    let port = |addr: &str| addr.rsplit_once(':').unwrap().1.to_owned();
    assert!(paths.contains(&(nqn.clone(), "127.0.0.1".into(), port(&a_addr))), "{paths:?}");
    assert!(paths.contains(&(nqn.clone(), "127.0.0.1".into(), port(&b_addr))), "{paths:?}");
    // The mirror lists both paths too: the source said its own when it connected.
    let paths = discover(&b_addr).expect("discovery at the mirror");
    assert!(paths.contains(&(nqn.clone(), "127.0.0.1".into(), port(&a_addr))), "at the mirror: {paths:?}");
    assert!(paths.contains(&(nqn.clone(), "127.0.0.1".into(), port(&b_addr))), "at the mirror: {paths:?}");
    // The mirror comes back on another port (ephemeral here): once the link is up again,
    // the primary's discovery says where it is now, not where it was when paired.
    drop(b);
    pair.dst.restart().expect("restart site-b");
    let b_addr = pair.dst.nvmf.clone().expect("site-b serves NVMe/TCP");
    let new_path = (nqn.clone(), "127.0.0.1".to_string(), port(&b_addr));
    let started = std::time::Instant::now();
    let paths = loop {
        let paths = discover(&a_addr).expect("discovery at the primary");
        if paths.contains(&new_path) || started.elapsed() > Duration::from_secs(30) {
            break paths;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(paths.contains(&new_path), "after the restart: {paths:?}");
    assert_eq!(paths.len(), 2, "{paths:?}");
    wait_state(&pair.src_api(), VOL, "in-sync", Duration::from_secs(30));
    let mut b = NvmfClient::connect(&b_addr, &nqn, true).expect("attach through site-b again");

    write_blocks(&mut a, seed, 0..64);
    assert_eq!(b.write(0, &[1u8; 4096], false).unwrap().status, Status::ANA_INACCESSIBLE);
    // Writes too large for the capsule come by R2T and H2CData (here 1 MiB: eight PDUs);
    // a deallocate becomes trims, answered once all are done.
    let big: Vec<u8> = (256..512).flat_map(|slba| block(seed, slba)).collect();
    assert!(a.write(256, &big, true).unwrap().ok(), "a 1 MiB write");
    assert!(a.read(256, 256).unwrap().1 == big, "the 1 MiB write reads back");
    assert!(a.deallocate(&[(600, 4), (700, 2)]).unwrap().ok());
    assert!(a.read(600, 4).unwrap().1.iter().all(|&b| b == 0), "deallocated blocks read as zeroes");

    // A planned switchover: site-b becomes the primary, site-a its mirror.
    a.admin.post_aer().unwrap();
    b.admin.post_aer().unwrap();
    ctl_ok(&pair.src.control, &["switchover", VOL]);
    assert_eq!(b.admin.wait_event(EVENT_WAIT).unwrap(), ANA_CHANGE_EVENT);
    assert_eq!(a.admin.wait_event(EVENT_WAIT).unwrap(), ANA_CHANGE_EVENT);
    wait_ana(&mut b, ANA_OPTIMIZED, "site-b after the switchover");
    wait_ana(&mut a, ANA_INACCESSIBLE, "site-a after the switchover");
    assert_eq!(a.write(0, &[1u8; 4096], false).unwrap().status, Status::ANA_INACCESSIBLE);
    check_blocks(&mut b, seed, 0..64, "after the switchover, through site-b");
    check_blocks(&mut b, seed, 256..512, "the 1 MiB write, after the switchover");
    write_blocks(&mut b, seed, 64..128);

    // Site-b is lost; site-a takes the volume over.
    a.admin.post_aer().unwrap();
    pair.dst.kill();
    drop(b);
    failover(&pair.src_api(), VOL).expect("failover on site-a");
    assert_eq!(a.admin.wait_event(EVENT_WAIT).unwrap(), ANA_CHANGE_EVENT);
    wait_ana(&mut a, ANA_OPTIMIZED, "site-a after the failover");
    check_blocks(&mut a, seed, 0..128, "after the failover, through site-a");
    write_blocks(&mut a, seed ^ 1, 0..8);
    check_blocks(&mut a, seed ^ 1, 0..8, "written after the failover");
}

/// `volume resize` reaches hosts attached over NVMe/TCP while they stay attached: each path
/// announces the namespace's change, Identify then says the new size, and the I/O queue
/// (on the primary's reactor) takes writes past the old end, which the mirror then holds.
#[test]
fn a_resize_is_announced_on_both_paths_and_the_new_blocks_take_io() {
    use nvmirror_dataplane::frontend::nvmf::client::Command;
    let seed = base_seed("nvmf_resize");
    let nvmf = ["--nvmf", "127.0.0.1:0"];
    let mut pair = Pair::start_with("nvmfgrow", &nvmf, &nvmf);
    pair.create_mirrored(VOL, 64 * MIB, LOG_BYTES_MIN);
    let nqn = subsystem_nqn(VOL);
    let mut a = NvmfClient::connect(pair.src.nvmf.as_deref().expect("nvmf"), &nqn, false).expect("attach a");
    let mut b = NvmfClient::connect(pair.dst.nvmf.as_deref().expect("nvmf"), &nqn, false).expect("attach b");
    for c in [&mut a, &mut b] {
        // Namespace attribute notices as well as ANA ones, as the Linux host asks.
        let (done, _) = c.admin.execute(Command::new(0x09, 0).dword(10, 0x0b).dword(11, (1 << 11) | (1 << 8))).unwrap();
        assert!(done.ok());
        c.admin.post_aer().expect("AER");
    }
    write_blocks(&mut a, seed, 0..8);
    let out = ctl_ok(&pair.src.control, &["volume", "resize", VOL, "--size", "96M"]);
    assert!(out.contains("grown from"), "{out}");
    for (c, path) in [(&mut a, "primary"), (&mut b, "mirror")] {
        assert_eq!(c.admin.wait_event(EVENT_WAIT).expect("event"), 0x0004_0002, "{path}: namespace attribute notice");
        let (_, ns) = c.admin.identify(0x00, 1).expect("Identify Namespace");
        assert_eq!(u64::from_le_bytes(ns[0..8].try_into().unwrap()), (96 * MIB) >> 12, "{path}: the new size");
    }
    let last = ((96 * MIB) >> 12) - 4;
    write_blocks(&mut a, seed, last..last + 4);
    check_blocks(&mut a, seed, 0..8, "the old blocks");
    assert_eq!(a.read(last + 4, 1).unwrap().0.status, Status::LBA_OUT_OF_RANGE);
    // The site burns down: the mirror's path takes over with the blocks past the old end.
    cp(&pair.src_api(), VOL).expect("cp");
    pair.src.kill();
    ctl_ok(&pair.dst.control, &["failover", VOL]);
    wait_ana(&mut b, ANA_OPTIMIZED, "after the failover");
    check_blocks(&mut b, seed, last..last + 4, "the new blocks on the new primary");
}
