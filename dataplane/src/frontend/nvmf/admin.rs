//! The data structures admin commands return: Identify (controller, namespace, active
//! namespace list, namespace identification descriptors) and the log pages (error, SMART,
//! ANA, discovery). Offsets are those of the NVMe Base Specification 1.4 and of NVMe over
//! Fabrics 1.1; every multi-byte field is little-endian.

use std::net::SocketAddr;

use super::{
    AnaState, ANA_GROUP, DISCOVERY_NQN, INLINE_DATA_BYTES, IO_QUEUE_ENTRIES, KEEP_ALIVE_GRANULARITY_100MS,
    LBA_SHIFT_MAX, MDTS_SHIFT, NSID,
};

pub const IDENTIFY_BYTES: usize = 4096;
pub const ERROR_LOG_ENTRY_BYTES: usize = 64;
pub const SMART_LOG_BYTES: usize = 512;
pub const DISCOVERY_HEADER_BYTES: usize = 1024;
pub const DISCOVERY_ENTRY_BYTES: usize = 1024;

const VERSION_1_3: u32 = 0x0001_0300;
/// CMIC: more than one port, more than one controller, ANA reporting.
const CMIC_MULTI_PORT_CTRL_ANA: u8 = 0b1011;
/// OAES: ANA change notices.
pub const OAES_ANA_CHANGE: u32 = 1 << 11;
/// OAES: namespace attribute notices (the namespace's size changed: `volume resize`).
pub const OAES_NS_ATTRIBUTE: u32 = 1 << 8;
/// Bytes of the Changed Namespace List log page (1024 namespace ids).
pub const CHANGED_NS_LOG_BYTES: usize = 4096;
/// ONCS: Dataset Management, Write Zeroes.
const ONCS_DSM_WRITE_ZEROES: u16 = (1 << 2) | (1 << 3);
/// SGLS: SGLs supported (no alignment), SGL offset addressing for in-capsule data.
const SGLS: u32 = 1 | (1 << 20);
/// ANACAP: reports optimized, inaccessible and change; group ids never change while
/// attached.
const ANACAP: u8 = 1 | (1 << 2) | (1 << 4) | (1 << 6);
/// ANATT: seconds a host waits for a state to settle (nothing here is ever "in change").
const ANA_TRANSITION_SECS: u8 = 10;

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
/// An ASCII field, space-padded (serial, model, firmware).
fn put_ascii(b: &mut [u8], at: usize, len: usize, s: &str) {
    let field = &mut b[at..at + len];
    field.fill(b' ');
    let bytes = s.as_bytes();
    let n = bytes.len().min(len);
    field[..n].copy_from_slice(&bytes[..n]);
}
/// A NUL-padded string field (NQNs, addresses).
fn put_str(b: &mut [u8], at: usize, len: usize, s: &str) {
    let bytes = s.as_bytes();
    let n = bytes.len().min(len - 1);
    b[at..at + n].copy_from_slice(&bytes[..n]);
}

/// What the controller of one subsystem says about itself.
#[derive(Debug, Clone)]
pub struct ControllerIdentity<'a> {
    pub cntlid: u16,
    pub subnqn: &'a str,
    /// The same on both nodes of a pair (the volume's identity).
    pub serial: &'a str,
    /// `None`: the discovery controller.
    pub io: bool,
}

/// Identify Controller (CNS 01h).
pub fn identify_controller(c: &ControllerIdentity<'_>) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_BYTES];
    put_ascii(&mut b, 4, 20, c.serial);
    put_ascii(&mut b, 24, 40, "nvmirror");
    put_ascii(&mut b, 64, 8, env!("CARGO_PKG_VERSION"));
    b[77] = MDTS_SHIFT;
    put_u16(&mut b, 78, c.cntlid);
    put_u32(&mut b, 80, VERSION_1_3);
    b[111] = if c.io { 1 } else { 2 }; // CNTRLTYPE: I/O or discovery controller
    b[258] = 3; // ACL: 4 aborts
    b[259] = u8::try_from(super::AER_MAX - 1).unwrap_or(0); // AERL, 0-based
    b[261] = 1 << 2; // LPA: extended data (offsets) for Get Log Page
    b[262] = 0; // ELPE: one error log entry
    put_u16(&mut b, 320, KEEP_ALIVE_GRANULARITY_100MS);
    b[512] = 0x66; // SQES
    b[513] = 0x44; // CQES
    put_u16(&mut b, 514, IO_QUEUE_ENTRIES);
    put_u32(&mut b, 536, SGLS);
    put_str(&mut b, 768, 256, c.subnqn);
    if c.io {
        b[76] = CMIC_MULTI_PORT_CTRL_ANA;
        put_u32(&mut b, 92, OAES_ANA_CHANGE | OAES_NS_ATTRIBUTE);
        b[342] = ANA_TRANSITION_SECS;
        b[343] = ANACAP;
        put_u32(&mut b, 344, ANA_GROUP); // ANAGRPMAX
        put_u32(&mut b, 348, ANA_GROUP); // NANAGRPID
        put_u32(&mut b, 516, NSID); // NN
        put_u16(&mut b, 520, ONCS_DSM_WRITE_ZEROES);
        // VWC 0: no volatile write cache. A write is answered once it is as durable as
        // the node's NVRAM mode makes it, on both sites; there is nothing for a flush to do.
        b[525] = 0;
        put_u32(&mut b, 540, NSID); // MNAN
                                    // Fabrics: I/O command capsule size in 16-byte units, response capsule size,
                                    // in-capsule data at offset 0, dynamic controller model, one SGL descriptor.
        put_u32(&mut b, 1792, u32::try_from((64 + INLINE_DATA_BYTES) / 16).unwrap_or(u32::MAX));
        put_u32(&mut b, 1796, 1);
        b[1803] = 1;
    } else {
        b[1803] = 1;
    }
    b
}

/// The identity a namespace has on both nodes of a pair: 16 bytes from the volume's id
/// and name, as NGUID and (with version and variant bits) as UUID.
pub fn namespace_guid(volume_id: u64, name: &str) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[..8].copy_from_slice(&volume_id.to_be_bytes());
    let h = crate::checksum::crc32c(name.as_bytes());
    let h2 = crate::checksum::crc32c_parts(&[name.as_bytes(), &volume_id.to_le_bytes()]);
    g[8..12].copy_from_slice(&h.to_be_bytes());
    g[12..16].copy_from_slice(&h2.to_be_bytes());
    g
}

fn uuid_of(guid: [u8; 16]) -> [u8; 16] {
    let mut u = guid;
    u[6] = 0x80 | (u[6] & 0x0f); // version 8 (custom)
    u[8] = 0x80 | (u[8] & 0x3f); // RFC 4122 variant
    u
}

/// The block size a volume of `size` bytes is exported with: 4 KiB where the size is a
/// multiple of it, else 512 bytes.
pub fn lba_shift(size: u64) -> u8 {
    if size.is_multiple_of(1 << LBA_SHIFT_MAX) {
        LBA_SHIFT_MAX
    } else {
        9
    }
}

/// Identify Namespace (CNS 00h).
pub fn identify_namespace(size: u64, guid: [u8; 16]) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_BYTES];
    let shift = lba_shift(size);
    let blocks = size >> shift;
    put_u64(&mut b, 0, blocks); // NSZE
    put_u64(&mut b, 8, blocks); // NCAP
    put_u64(&mut b, 16, blocks); // NUSE
    b[24] = 1 << 3; // NSFEAT: NGUID never reused
    b[25] = 0; // NLBAF: one format
    b[26] = 0; // FLBAS: format 0
    b[30] = 1; // NMIC: shared namespace (one per path)
    put_u32(&mut b, 92, ANA_GROUP);
    b[104..120].copy_from_slice(&guid);
    b[128 + 2] = shift; // LBAF0: no metadata, LBADS
    b
}

/// Identify Active Namespace ID list (CNS 02h): the namespaces above `after`.
pub fn active_namespaces(after: u32) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_BYTES];
    if after < NSID {
        put_u32(&mut b, 0, NSID);
    }
    b
}

/// Namespace Identification Descriptor list (CNS 03h): NGUID and UUID.
pub fn namespace_descriptors(guid: [u8; 16]) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_BYTES];
    b[0] = 2; // NIDT: NGUID
    b[1] = 16;
    b[4..20].copy_from_slice(&guid);
    b[20] = 3; // NIDT: UUID
    b[21] = 16;
    b[24..40].copy_from_slice(&uuid_of(guid));
    b
}

/// The ANA log page (LID 0Ch): one group, this namespace, in `state`. With `groups_only`
/// (LSP bit 0) the namespace list is left out.
pub fn ana_log(change_count: u64, state: AnaState, groups_only: bool) -> Vec<u8> {
    let mut b = vec![0u8; 16 + 32 + 4];
    put_u64(&mut b, 0, change_count);
    put_u16(&mut b, 8, 1); // NGRPS
    put_u32(&mut b, 16, ANA_GROUP);
    put_u32(&mut b, 20, if groups_only { 0 } else { 1 }); // NNSIDV
    put_u64(&mut b, 24, change_count);
    b[32] = state as u8;
    if groups_only {
        b.truncate(48);
    } else {
        put_u32(&mut b, 48, NSID);
    }
    b
}

/// The SMART / health log page (LID 02h): no warnings, spare full, nothing worn.
/// The Changed Namespace List log page: the namespace, where it changed since the page
/// was last read.
pub fn changed_namespaces(changed: bool) -> Vec<u8> {
    let mut b = vec![0u8; CHANGED_NS_LOG_BYTES];
    if changed {
        put_u32(&mut b, 0, NSID);
    }
    b
}

pub fn smart_log() -> Vec<u8> {
    let mut b = vec![0u8; SMART_LOG_BYTES];
    put_u16(&mut b, 1, 273 + 30); // composite temperature in kelvin: nothing measured, a nominal value
    b[3] = 100; // available spare
    b[4] = 10; // threshold
    b
}

/// One entry of the discovery log page: an NVMe subsystem reachable over TCP at `addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryEntry {
    pub subnqn: String,
    pub addr: SocketAddr,
    pub port_id: u16,
}

/// The discovery log page (LID 70h).
pub fn discovery_log(entries: &[DiscoveryEntry]) -> Vec<u8> {
    let mut b = vec![0u8; DISCOVERY_HEADER_BYTES + entries.len() * DISCOVERY_ENTRY_BYTES];
    for (i, e) in entries.iter().enumerate() {
        let at = DISCOVERY_HEADER_BYTES + i * DISCOVERY_ENTRY_BYTES;
        b[at] = 3; // TRTYPE: TCP
        b[at + 1] = if e.addr.is_ipv4() { 1 } else { 2 }; // ADRFAM
        b[at + 2] = 2; // SUBTYPE: NVMe subsystem
        b[at + 3] = 0b10; // TREQ: secure channel not required
        put_u16(&mut b, at + 4, e.port_id);
        put_u16(&mut b, at + 6, 0xffff); // CNTLID: dynamic controllers
        put_u16(&mut b, at + 8, 32); // ASQSZ
        put_str(&mut b, at + 32, 32, &e.addr.port().to_string());
        put_str(&mut b, at + 256, 256, &e.subnqn);
        put_str(&mut b, at + 512, 256, &e.addr.ip().to_string());
        // TSAS for TCP: SECTYPE 0 (no security), left zero.
    }
    // The generation counter changes whenever the list does.
    let genctr = u64::from(crate::checksum::crc32c(&b[DISCOVERY_HEADER_BYTES..])) | ((entries.len() as u64) << 32);
    put_u64(&mut b, 0, genctr);
    put_u64(&mut b, 8, entries.len() as u64);
    b
}

/// The discovery controller's NQN.
pub fn is_discovery(subnqn: &str) -> bool {
    subnqn == DISCOVERY_NQN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_controller_fields_sit_where_the_linux_host_reads_them() {
        let id =
            identify_controller(&ControllerIdentity { cntlid: 0x1234, subnqn: "nqn.x:v", serial: "abc", io: true });
        assert_eq!(&id[4..8], b"abc ");
        assert_eq!(u16::from_le_bytes([id[78], id[79]]), 0x1234);
        assert_eq!(id[76] & 0b1010, 0b1010, "multi-controller and ANA reporting");
        assert_eq!(u32::from_le_bytes(id[344..348].try_into().unwrap()), ANA_GROUP);
        assert_eq!(u32::from_le_bytes(id[516..520].try_into().unwrap()), 1);
        assert_eq!(&id[768..775], b"nqn.x:v");
        assert_eq!(id[775], 0);
        assert_eq!(u32::from_le_bytes(id[1792..1796].try_into().unwrap()) as usize * 16, 64 + INLINE_DATA_BYTES);
    }

    #[test]
    fn a_namespace_reads_the_same_identity_on_both_nodes() {
        let g = namespace_guid(0xfeed, "vol");
        assert_eq!(g, namespace_guid(0xfeed, "vol"));
        assert_ne!(g, namespace_guid(0xfeed, "vol2"));
        assert_ne!(g, namespace_guid(0xbeef, "vol"));
        let ns = identify_namespace(1 << 30, g);
        assert_eq!(u64::from_le_bytes(ns[0..8].try_into().unwrap()), (1 << 30) >> 12);
        assert_eq!(&ns[104..120], &g);
        assert_eq!(ns[130], 12);
        assert_eq!(identify_namespace((1 << 20) + 512, g)[130], 9);
        let d = namespace_descriptors(g);
        assert_eq!(&d[4..20], &g);
        assert_eq!(d[24 + 6] >> 4, 8);
    }

    #[test]
    fn ana_log_names_one_group_and_its_state() {
        let l = ana_log(5, AnaState::Inaccessible, false);
        assert_eq!(u64::from_le_bytes(l[0..8].try_into().unwrap()), 5);
        assert_eq!(u16::from_le_bytes([l[8], l[9]]), 1);
        assert_eq!(l[32], 3);
        assert_eq!(u32::from_le_bytes(l[48..52].try_into().unwrap()), NSID);
        assert_eq!(ana_log(5, AnaState::Optimized, true).len(), 48);
    }

    #[test]
    fn discovery_log_lists_each_path() {
        let e = |a: &str| DiscoveryEntry { subnqn: "nqn.x:v".into(), addr: a.parse().unwrap(), port_id: 1 };
        let l = discovery_log(&[e("10.0.0.1:4420"), e("10.0.0.2:4420")]);
        assert_eq!(u64::from_le_bytes(l[8..16].try_into().unwrap()), 2);
        assert_eq!(&l[1024 + 512..1024 + 520], b"10.0.0.1");
        assert_eq!(&l[2048 + 512..2048 + 520], b"10.0.0.2");
        assert_eq!(&l[1024 + 32..1024 + 36], b"4420");
        assert_ne!(discovery_log(&[e("10.0.0.1:4420")])[0..8], l[0..8]);
    }
}
