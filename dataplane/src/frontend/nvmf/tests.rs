//! The target end to end over loopback, driven by [`super::client`], against exports in
//! memory whose role a test can flip.

// Sizes and patterns here are small and fixed.
#![allow(clippy::cast_possible_truncation)]

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::client::{attach_admin, discover, Command, HostQueue, NvmfClient, HOST_NQN};
use super::pdu::{FLAG_HDGST, TYPE_C2H_TERM_REQ, TYPE_CAPSULE_CMD};
use super::{subsystem_nqn, NvmfServer, Status};
use crate::frontend::{Completer, Export, ExportRegistry, IoRequest, Writes};
use crate::storage::{BlockDevice, MemDevice};

struct Disk {
    dev: MemDevice,
    read_only: AtomicBool,
    /// The next write fails; with `moves`, the volume stops being writable here as it
    /// fails (a switchover overtaking it).
    fail_next: AtomicBool,
    moves: AtomicBool,
    /// Writable, but not taking writes yet (a takeover waiting for its mirror).
    waiting: AtomicBool,
}

impl Disk {
    fn new(bytes: u64, read_only: bool) -> Disk {
        Disk {
            dev: MemDevice::new(bytes),
            read_only: AtomicBool::new(read_only),
            fail_next: AtomicBool::new(false),
            moves: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
        }
    }
}

impl Export for Disk {
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }
    fn writes(&self) -> Writes {
        if self.read_only() {
            Writes::Elsewhere
        } else if self.waiting.load(Ordering::Acquire) {
            Writes::Waiting
        } else {
            Writes::Taken
        }
    }
    fn submit(&self, request: IoRequest, done: Completer) {
        let r = match request {
            IoRequest::Read { offset, len } => {
                let mut buf = vec![0u8; len as usize];
                self.dev.read_at(&mut buf, offset).map(|()| Some(buf))
            }
            IoRequest::Write { .. } if self.fail_next.swap(false, Ordering::AcqRel) => {
                if self.moves.load(Ordering::Acquire) {
                    self.read_only.store(true, Ordering::Release);
                }
                Err(std::io::Error::other("the write failed"))
            }
            IoRequest::Write { offset, data, .. } => self.dev.write_at(&data, offset).map(|()| None),
            IoRequest::Trim { offset, len } | IoRequest::WriteZeroes { offset, len, .. } => {
                self.dev.write_at(&vec![0u8; len as usize], offset).map(|()| None)
            }
            IoRequest::Flush => Ok(None),
        };
        done.complete(r);
    }
}

struct Registry(Vec<(String, Arc<Disk>)>);

impl ExportRegistry for Registry {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, d)| d.clone() as Arc<dyn Export>)
    }
    fn names(&self) -> Vec<String> {
        self.0.iter().map(|(n, _)| n.clone()).collect()
    }
    /// Volume "closed" admits no client.
    fn admits(&self, name: &str, _client: &crate::frontend::ClientId) -> bool {
        name != "closed"
    }
    fn volume_id(&self, name: &str) -> Option<u64> {
        self.lookup(name).map(|_| 0x1234_5678)
    }
    fn other_paths(&self, name: &str) -> Vec<std::net::SocketAddr> {
        if name == "ro" {
            vec!["192.0.2.7:4420".parse().unwrap()]
        } else {
            Vec::new()
        }
    }
}

fn server() -> (NvmfServer, String, Arc<Disk>, Arc<Disk>) {
    let rw = Arc::new(Disk::new(8 << 20, false));
    let ro = Arc::new(Disk::new(4 << 20, true));
    let closed = Arc::new(Disk::new(1 << 20, false));
    let reg = Registry(vec![("rw".into(), rw.clone()), ("ro".into(), ro.clone()), ("closed".into(), closed)]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let s = NvmfServer::spawn(l, Arc::new(reg)).unwrap();
    let addr = s.local_addr().to_string();
    (s, addr, rw, ro)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn writes_and_reads_round_trip_in_capsule_and_by_r2t_with_and_without_digests() {
    let (_s, addr, rw, _) = server();
    for digests in [false, true] {
        let mut c = NvmfClient::connect(&addr, &subsystem_nqn("rw"), digests).unwrap();
        assert_eq!(c.lba_shift, 12);
        assert_eq!(c.blocks, (8 << 20) >> 12);
        for (slba, len, seed) in [(0u64, 4096usize, 1u8), (10, 16 << 10, 2), (100, 256 << 10, 3), (1000, 1 << 20, 4)] {
            let data = pattern(len, seed + u8::from(digests));
            assert!(c.write(slba, &data, slba == 10).unwrap().ok(), "write of {len} bytes");
            let mut on_disk = vec![0u8; len];
            rw.dev.read_at(&mut on_disk, slba << 12).unwrap();
            assert!(on_disk == data, "the export holds what was written ({len} bytes)");
            let (done, back) = c.read(slba, (len >> 12) as u32).unwrap();
            assert!(done.ok());
            assert!(back == data, "read back {len} bytes");
        }
        assert!(c.flush().unwrap().ok());
    }
}

#[test]
fn identify_gives_the_controller_and_a_namespace_identity_both_nodes_share() {
    let (_s, addr, _, _) = server();
    let mut c = NvmfClient::connect(&addr, &subsystem_nqn("rw"), false).unwrap();
    let (done, id) = c.admin.identify(0x01, 0).unwrap();
    assert!(done.ok());
    assert_eq!(u16::from_le_bytes([id[78], id[79]]), c.cntlid);
    assert_eq!(&id[768..768 + subsystem_nqn("rw").len()], subsystem_nqn("rw").as_bytes());
    assert_eq!(&id[4..20], b"0000000012345678");
    let (_, descs) = c.admin.identify(0x03, 1).unwrap();
    let (_, ns) = c.admin.identify(0x00, 1).unwrap();
    assert_eq!(descs[0], 2);
    assert_eq!(&descs[4..20], &ns[104..120], "NGUID the same in both");
    assert_eq!(&ns[104..120], &super::admin::namespace_guid(0x1234_5678, "rw"));
    let (_, list) = c.admin.identify(0x02, 0).unwrap();
    assert_eq!(&list[0..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(c.admin.identify(0x00, 2).unwrap().0.status, Status::INVALID_NAMESPACE);
    assert_eq!(c.admin.identify(0x42, 0).unwrap().0.status, Status::INVALID_FIELD);
}

#[test]
fn bad_commands_get_their_status_and_the_queue_goes_on() {
    let (_s, addr, rw, _) = server();
    let mut c = NvmfClient::connect(&addr, &subsystem_nqn("rw"), false).unwrap();
    let last = c.blocks - 1;
    assert_eq!(c.read(last, 2).unwrap().0.status, Status::LBA_OUT_OF_RANGE);
    assert_eq!(c.write(u64::MAX >> 4, &[0u8; 4096], false).unwrap().status, Status::LBA_OUT_OF_RANGE);
    assert_eq!(c.io.execute(Command::new(0x7e, 1)).unwrap().0.status, Status::INVALID_OPCODE);
    assert_eq!(c.io.execute(Command::new(0x00, 9)).unwrap().0.status, Status::INVALID_NAMESPACE);
    assert_eq!(c.admin.get_log_page(0x33, 512, 0).unwrap().0.status, Status::INVALID_LOG_PAGE);
    // Write zeroes and deallocate reach the export.
    c.write(20, &pattern(8192, 9), false).unwrap();
    assert!(c.write_zeroes(20, 1).unwrap().ok());
    assert!(c.deallocate(&[(21, 1)]).unwrap().ok());
    let mut back = vec![1u8; 8192];
    rw.dev.read_at(&mut back, 20 << 12).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    assert!(c.read(last, 1).unwrap().0.ok(), "the queue still serves");
}

#[test]
fn a_mirror_path_is_inaccessible_until_its_volume_becomes_writable_and_the_host_hears_of_it() {
    let (s, addr, _, ro) = server();
    let mut c = NvmfClient::connect(&addr, &subsystem_nqn("ro"), false).unwrap();
    assert_eq!(c.ana_state().unwrap(), 3);
    let hosts = s.hosts().of("ro");
    assert_eq!(hosts.len(), 1);
    assert_eq!((hosts[0].controller, hosts[0].ana, hosts[0].host_nqn.as_str()), (c.cntlid, "inaccessible", HOST_NQN));
    assert!(s.hosts().of("rw").is_empty());
    assert_eq!(c.write(0, &[5u8; 4096], false).unwrap().status, Status::ANA_INACCESSIBLE);
    assert_eq!(c.read(0, 1).unwrap().0.status, Status::ANA_INACCESSIBLE);
    c.admin.post_aer().unwrap();
    ro.read_only.store(false, Ordering::Release);
    let event = c.admin.wait_event(Duration::from_secs(5)).unwrap();
    assert_eq!(event, 0x000c_0302, "notice, ANA change, log page 0Ch");
    assert_eq!(c.ana_state().unwrap(), 1);
    assert_eq!(s.hosts().of("ro")[0].ana, "optimized");
    // Writable but waiting for its mirror: in transition, commands held by the host.
    c.admin.post_aer().unwrap();
    ro.waiting.store(true, Ordering::Release);
    assert_eq!(c.admin.wait_event(Duration::from_secs(5)).unwrap(), 0x000c_0302);
    assert_eq!(c.ana_state().unwrap(), 0x0f);
    assert_eq!(c.write(0, &[5u8; 4096], false).unwrap().status, Status::ANA_TRANSITION);
    assert_eq!(s.hosts().of("ro")[0].ana, "change");
    c.admin.post_aer().unwrap();
    ro.waiting.store(false, Ordering::Release);
    assert_eq!(c.admin.wait_event(Duration::from_secs(5)).unwrap(), 0x000c_0302);
    assert_eq!(c.ana_state().unwrap(), 1);
    assert!(c.write(0, &[5u8; 4096], false).unwrap().ok());
    // And back: a switchover makes this node the mirror again.
    c.admin.post_aer().unwrap();
    ro.read_only.store(true, Ordering::Release);
    assert_eq!(c.admin.wait_event(Duration::from_secs(5)).unwrap(), 0x000c_0302);
    assert_eq!(c.ana_state().unwrap(), 3);
}

#[test]
fn discovery_lists_each_volume_at_each_path() {
    let (_s, addr, _, _) = server();
    let entries = discover(&addr).unwrap();
    let port = addr.rsplit_once(':').unwrap().1.to_owned();
    assert!(entries.contains(&(subsystem_nqn("rw"), "127.0.0.1".into(), port.clone())), "{entries:?}");
    assert!(entries.contains(&(subsystem_nqn("ro"), "127.0.0.1".into(), port)), "{entries:?}");
    assert!(entries.contains(&(subsystem_nqn("ro"), "192.0.2.7".into(), "4420".into())), "{entries:?}");
    assert_eq!(entries.len(), 4);
}

#[test]
fn connects_that_name_nothing_here_are_refused() {
    let (s, addr, _, _) = server();
    let mut q = HostQueue::open(&addr, false, false).unwrap();
    let c = q.connect(0, 31, 0xffff, "nqn.2026-01.io.nvmirror:nope", HOST_NQN).unwrap();
    assert_eq!(c.status, Status::CONNECT_INVALID_PARAMETERS);
    assert_eq!(c.dw0, 1 | (256 << 16), "the subsystem NQN in the data is at fault");
    let mut q = HostQueue::open(&addr, false, false).unwrap();
    let c = q.connect(1, 127, 0x4242, &subsystem_nqn("rw"), HOST_NQN).unwrap();
    assert_eq!(c.status, Status::CONNECT_INVALID_PARAMETERS);
    let mut q = HostQueue::open(&addr, false, false).unwrap();
    assert_eq!(
        q.connect(0, 4000, 0xffff, &subsystem_nqn("rw"), HOST_NQN).unwrap().status,
        Status::CONNECT_INVALID_PARAMETERS
    );
    // A volume whose allow-list leaves this host out.
    let mut q = HostQueue::open(&addr, false, false).unwrap();
    assert_eq!(
        q.connect(0, 31, 0xffff, &subsystem_nqn("closed"), HOST_NQN).unwrap().status,
        Status::CONNECT_INVALID_HOST
    );
    // A command before Connect.
    let mut q = HostQueue::open(&addr, false, false).unwrap();
    assert_eq!(q.identify(0x01, 0).unwrap().0.status, Status::SEQUENCE_ERROR);
    assert_eq!(s.controllers(), 0);
}

#[test]
fn a_malformed_pdu_ends_its_connection_with_a_termination_request_and_no_other() {
    let (s, addr, _, _) = server();
    let mut c = NvmfClient::connect(&addr, &subsystem_nqn("rw"), false).unwrap();
    c.write(3, &pattern(4096, 7), false).unwrap();
    for bad in [
        // A capsule whose length says 4 GiB.
        {
            let mut b = vec![TYPE_CAPSULE_CMD, 0, 72, 0];
            b.extend_from_slice(&u32::MAX.to_le_bytes());
            b
        },
        // A header digest flag the connection did not negotiate.
        {
            let mut b = vec![TYPE_CAPSULE_CMD, FLAG_HDGST, 72, 0];
            b.extend_from_slice(&76u32.to_le_bytes());
            b.resize(76, 0);
            b
        },
        // A PDU type only a controller sends.
        vec![0x05, 0, 24, 0, 24, 0, 0, 0],
    ] {
        let mut q = HostQueue::open(&addr, false, false).unwrap();
        q.send_raw(&bad).unwrap();
        let answer = q.read_to_close();
        assert_eq!(answer.first(), Some(&TYPE_C2H_TERM_REQ), "{bad:?} answered with {answer:?}");
    }
    // Garbage before the ICReq: closed.
    let mut raw = std::net::TcpStream::connect(&addr).unwrap();
    std::io::Write::write_all(&mut raw, &[0xff; 200]).unwrap();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut raw, &mut rest);
    assert_eq!(rest.first(), Some(&TYPE_C2H_TERM_REQ));
    // The first connection never noticed.
    assert_eq!(c.read(3, 1).unwrap().1, pattern(4096, 7));
    assert_eq!(s.controllers(), 1);
}

#[test]
fn an_io_queue_ends_with_its_controller() {
    let (s, addr, _, _) = server();
    let c = NvmfClient::connect(&addr, &subsystem_nqn("rw"), false).unwrap();
    let NvmfClient { admin, mut io, .. } = c;
    drop(admin);
    io.read_to_close();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while s.controllers() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.controllers(), 0);
    // And a discovery controller serves no I/O queues.
    let (_admin, cntlid) = attach_admin(&addr, super::DISCOVERY_NQN, false).unwrap();
    let mut q = HostQueue::open(&addr, false, false).unwrap();
    let refused = q.connect(1, 31, cntlid, super::DISCOVERY_NQN, HOST_NQN).unwrap();
    assert_eq!(refused.status, Status::CONNECT_INVALID_PARAMETERS);
}

#[test]
fn a_write_that_fails_because_the_volume_moved_is_a_path_error_and_any_other_is_not() {
    let (_s, addr, rw, _) = server();
    let mut c = NvmfClient::connect(&addr, &subsystem_nqn("rw"), false).unwrap();
    rw.fail_next.store(true, Ordering::Release);
    assert_eq!(c.write(0, &[1u8; 4096], false).unwrap().status, Status::INTERNAL, "the volume's own failure");
    assert!(c.write(0, &[1u8; 4096], false).unwrap().ok());
    rw.moves.store(true, Ordering::Release);
    rw.fail_next.store(true, Ordering::Release);
    let status = c.write(0, &[2u8; 4096], false).unwrap().status;
    assert_eq!(status, Status::ANA_INACCESSIBLE, "a switchover overtook it: the host retries on the other path");
    assert!(!status.dnr);
}

#[test]
fn a_grown_volume_is_announced_to_its_hosts_and_takes_io_past_its_old_end() {
    let (_s, addr, rw, _) = server();
    let mut c = NvmfClient::connect(&addr, &subsystem_nqn("rw"), false).unwrap();
    let old_blocks = c.blocks;
    // Namespace attribute notices too (the Linux host asks for them where offered).
    let (_, id) = c.admin.identify(0x01, 0).unwrap();
    let oaes = u32::from_le_bytes(id[92..96].try_into().unwrap());
    assert_eq!(oaes & (1 << 8), 1 << 8, "OAES offers namespace attribute notices");
    assert!(c.admin.execute(Command::new(0x09, 0).dword(10, 0x0b).dword(11, (1 << 11) | (1 << 8))).unwrap().0.ok());
    assert_eq!(c.admin.get_log_page(0x04, 4096, 0).unwrap().1[..4], [0, 0, 0, 0], "nothing changed yet");
    c.admin.post_aer().unwrap();
    rw.dev.grow(16 << 20).unwrap();
    let event = c.admin.wait_event(Duration::from_secs(5)).unwrap();
    assert_eq!(event, 0x0004_0002, "notice, namespace attribute changed, log page 04h");
    // The changed namespace list names it once; read again, it is empty.
    assert_eq!(c.admin.get_log_page(0x04, 4096, 0).unwrap().1[..8], [1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(c.admin.get_log_page(0x04, 4096, 0).unwrap().1[..4], [0, 0, 0, 0]);
    let (_, ns) = c.admin.identify(0x00, 1).unwrap();
    let blocks = u64::from_le_bytes(ns[0..8].try_into().unwrap());
    assert_eq!(blocks, 2 * old_blocks);
    // The I/O queue connected before takes the new blocks.
    let data = pattern(4096, 7);
    assert!(c.write(blocks - 1, &data, false).unwrap().ok());
    assert!(c.read(blocks - 1, 1).unwrap().1 == data);
    assert_eq!(c.read(blocks, 1).unwrap().0.status, Status::LBA_OUT_OF_RANGE);
}
