//! A small NVMe/TCP host: one admin queue and one I/O queue, one command at a time (with
//! Asynchronous Event Requests held on the side). The end-to-end tests drive the target
//! with it; it checks what it is sent as strictly as the target checks what it receives.

// Every value cast here fills a protocol field from a value the protocol bounds (PDU
// lengths under 16 MiB, header lengths under 256, block counts of one command).
#![allow(clippy::cast_possible_truncation)]

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::pdu::{
    Framing, CAPSULE_CMD_HLEN, CH_BYTES, DATA_HLEN, DIGEST_BYTES, FLAG_DDGST, FLAG_HDGST, FLAG_LAST_PDU, IC_BYTES,
    SQE_BYTES, TYPE_C2H_DATA, TYPE_C2H_TERM_REQ, TYPE_CAPSULE_CMD, TYPE_CAPSULE_RESP, TYPE_H2C_DATA, TYPE_IC_REQ,
    TYPE_IC_RESP, TYPE_R2T,
};
use super::queue::Status;
use super::{DISCOVERY_NQN, NSID};
use crate::checksum::crc32c;

/// Largest PDU this host takes.
const PDU_BYTES_MAX: usize = 16 << 20;

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A completion: its two command-specific dwords and its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub dw0: u32,
    pub dw1: u32,
    pub status: Status,
}

impl Completion {
    pub fn ok(&self) -> bool {
        self.status.sct == 0 && self.status.sc == 0
    }
}

/// A command to send: its 64 bytes, and the data that goes with it.
pub struct Command {
    pub sqe: [u8; SQE_BYTES],
    /// Data to the controller (in the capsule up to `inline_max`, else by R2T).
    pub data_out: Vec<u8>,
    /// Bytes of data expected back.
    pub data_in: usize,
}

impl Command {
    pub fn new(opcode: u8, nsid: u32) -> Command {
        let mut sqe = [0u8; SQE_BYTES];
        sqe[0] = opcode;
        sqe[1] = 0x40; // PSDT: SGL
        sqe[4..8].copy_from_slice(&nsid.to_le_bytes());
        Command { sqe, data_out: Vec::new(), data_in: 0 }
    }
    pub fn dword(mut self, n: usize, v: u32) -> Command {
        self.sqe[n * 4..n * 4 + 4].copy_from_slice(&v.to_le_bytes());
        self
    }
    pub fn byte(mut self, at: usize, v: u8) -> Command {
        self.sqe[at] = v;
        self
    }
}

/// One queue: one TCP connection.
pub struct HostQueue {
    stream: TcpStream,
    framing: Framing,
    next_cid: u16,
    /// In-capsule data this queue may send.
    pub inline_max: usize,
    maxh2cdata: usize,
    /// AERs this host holds on the controller, and the events they brought.
    aers: Vec<u16>,
    pub events: Vec<u32>,
}

/// A PDU from the controller.
enum FromController {
    Resp { cid: u16, completion: Completion },
    Data { cid: u16, offset: u32, data: Vec<u8> },
    R2t { cid: u16, ttag: u16, offset: u32, len: u32 },
}

impl HostQueue {
    /// Connects and initializes (ICReq/ICResp) a connection.
    pub fn open(addr: impl ToSocketAddrs, header_digest: bool, data_digest: bool) -> io::Result<HostQueue> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut ic = vec![0u8; IC_BYTES];
        ic[0] = TYPE_IC_REQ;
        ic[2] = IC_BYTES as u8;
        ic[4..8].copy_from_slice(&(IC_BYTES as u32).to_le_bytes());
        ic[11] = u8::from(header_digest) | (u8::from(data_digest) << 1);
        stream.write_all(&ic)?;
        let mut resp = [0u8; IC_BYTES];
        stream.read_exact(&mut resp)?;
        if resp[0] != TYPE_IC_RESP || u32_at(&resp, 4) as usize != IC_BYTES {
            return Err(bad(format!("expected an ICResp, got PDU type {:#04x}", resp[0])));
        }
        if resp[11] != ic[11] {
            return Err(bad("the controller changed the digests asked for"));
        }
        Ok(HostQueue {
            stream,
            framing: Framing { header_digest, data_digest, hpda: 0 },
            next_cid: 1,
            inline_max: super::ADMIN_INLINE_DATA_BYTES,
            maxh2cdata: u32_at(&resp, 12) as usize,
            aers: Vec::new(),
            events: Vec::new(),
        })
    }

    /// Sends raw bytes (tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads until the controller closes the connection; returns what it sent.
    pub fn read_to_close(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        let _ = self.stream.read_to_end(&mut all);
        all
    }

    fn hd(&self) -> usize {
        if self.framing.header_digest {
            DIGEST_BYTES
        } else {
            0
        }
    }

    fn send_pdu(&mut self, kind: u8, header: &[u8], data: &[u8], extra_flags: u8) -> io::Result<()> {
        let hd = self.hd();
        let dd = if self.framing.data_digest && !data.is_empty() { DIGEST_BYTES } else { 0 };
        let hlen = CH_BYTES + header.len();
        let pdo = if data.is_empty() { 0 } else { hlen + hd };
        let plen = hlen + hd + data.len() + dd;
        let mut flags = extra_flags;
        if hd > 0 {
            flags |= FLAG_HDGST;
        }
        if dd > 0 {
            flags |= FLAG_DDGST;
        }
        let mut b = Vec::with_capacity(plen);
        b.extend_from_slice(&[kind, flags, hlen as u8, pdo as u8]);
        b.extend_from_slice(&(plen as u32).to_le_bytes());
        b.extend_from_slice(header);
        if hd > 0 {
            let d = crc32c(&b);
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(data);
        if dd > 0 {
            b.extend_from_slice(&crc32c(data).to_le_bytes());
        }
        self.stream.write_all(&b)
    }

    fn read_pdu(&mut self) -> io::Result<FromController> {
        let mut ch = [0u8; CH_BYTES];
        self.stream.read_exact(&mut ch)?;
        let plen = u32_at(&ch, 4) as usize;
        let hlen = ch[2] as usize;
        if !(CH_BYTES..=PDU_BYTES_MAX).contains(&plen) || hlen < CH_BYTES || hlen > plen {
            return Err(bad(format!("PDU type {:#04x}: header length {hlen}, length {plen}", ch[0])));
        }
        let mut pdu = vec![0u8; plen];
        pdu[..CH_BYTES].copy_from_slice(&ch);
        self.stream.read_exact(&mut pdu[CH_BYTES..])?;
        if ch[0] == TYPE_C2H_TERM_REQ {
            return Err(bad(format!("the controller terminated the connection: status {:#x}", u16_at(&pdu, 8))));
        }
        let hd = self.hd();
        if (ch[1] & FLAG_HDGST != 0) != (hd > 0) {
            return Err(bad("header digest flag against the negotiated one"));
        }
        if hd > 0 && u32_at(&pdu, hlen) != crc32c(&pdu[..hlen]) {
            return Err(bad("header digest mismatch"));
        }
        match ch[0] {
            TYPE_CAPSULE_RESP => {
                let c = &pdu[CH_BYTES..CH_BYTES + 16];
                Ok(FromController::Resp {
                    cid: u16_at(c, 12),
                    completion: Completion {
                        dw0: u32_at(c, 0),
                        dw1: u32_at(c, 4),
                        status: Status::from_field(u16_at(c, 14)),
                    },
                })
            }
            TYPE_C2H_DATA => {
                let pdo = ch[3] as usize;
                let dd = if ch[1] & FLAG_DDGST != 0 { DIGEST_BYTES } else { 0 };
                if (dd > 0) != self.framing.data_digest || pdo < hlen + hd || pdo + dd > plen {
                    return Err(bad("C2HData framing"));
                }
                let data = pdu[pdo..plen - dd].to_vec();
                if dd > 0 && u32_at(&pdu, plen - dd) != crc32c(&data) {
                    return Err(bad("data digest mismatch"));
                }
                if u32_at(&pdu, 16) as usize != data.len() {
                    return Err(bad("C2HData length field against its data"));
                }
                Ok(FromController::Data { cid: u16_at(&pdu, 8), offset: u32_at(&pdu, 12), data })
            }
            TYPE_R2T => Ok(FromController::R2t {
                cid: u16_at(&pdu, 8),
                ttag: u16_at(&pdu, 10),
                offset: u32_at(&pdu, 12),
                len: u32_at(&pdu, 16),
            }),
            other => Err(bad(format!("unexpected PDU type {other:#04x}"))),
        }
    }

    fn take_cid(&mut self) -> u16 {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        cid
    }

    /// Runs one command to its completion; returns it and the data that came back.
    pub fn execute(&mut self, mut cmd: Command) -> io::Result<(Completion, Vec<u8>)> {
        let cid = self.take_cid();
        cmd.sqe[2..4].copy_from_slice(&cid.to_le_bytes());
        let out_len = cmd.data_out.len();
        let sgl_len = if out_len > 0 { out_len } else { cmd.data_in };
        cmd.sqe[32..36].copy_from_slice(&(sgl_len as u32).to_le_bytes());
        let inline = out_len > 0 && out_len <= self.inline_max;
        cmd.sqe[39] = if inline { 0x01 } else { 0x5a };
        let data: &[u8] = if inline { &cmd.data_out } else { &[] };
        self.send_pdu(TYPE_CAPSULE_CMD, &cmd.sqe, data, 0)?;
        let mut got = vec![0u8; cmd.data_in];
        let mut got_bytes = 0usize;
        loop {
            match self.read_pdu()? {
                FromController::Resp { cid: c, completion } if c == cid => {
                    if completion.ok() && got_bytes != cmd.data_in {
                        return Err(bad(format!("{got_bytes} bytes of data came back, {} expected", cmd.data_in)));
                    }
                    return Ok((completion, got));
                }
                FromController::Resp { cid: c, completion } if self.aers.contains(&c) => {
                    self.aers.retain(|&a| a != c);
                    self.events.push(completion.dw0);
                }
                FromController::Resp { cid: c, .. } => {
                    return Err(bad(format!("a completion for unknown command {c}")))
                }
                FromController::Data { cid: c, offset, data } if c == cid => {
                    let end = offset as usize + data.len();
                    if end > got.len() {
                        return Err(bad(format!("C2HData past the {} bytes asked for", got.len())));
                    }
                    got[offset as usize..end].copy_from_slice(&data);
                    got_bytes += data.len();
                }
                FromController::R2t { cid: c, ttag, offset, len } if c == cid && !inline => {
                    let (start, end) = (offset as usize, offset as usize + len as usize);
                    if end > out_len {
                        return Err(bad("R2T past the data"));
                    }
                    let mut at = start;
                    while at < end {
                        let n = (end - at).min(self.maxh2cdata);
                        let mut h = [0u8; DATA_HLEN - CH_BYTES];
                        h[0..2].copy_from_slice(&cid.to_le_bytes());
                        h[2..4].copy_from_slice(&ttag.to_le_bytes());
                        h[4..8].copy_from_slice(&(at as u32).to_le_bytes());
                        h[8..12].copy_from_slice(&(n as u32).to_le_bytes());
                        let last = if at + n == end { FLAG_LAST_PDU } else { 0 };
                        let chunk = cmd.data_out[at..at + n].to_vec();
                        self.send_pdu(TYPE_H2C_DATA, &h, &chunk, last)?;
                        at += n;
                    }
                }
                _ => return Err(bad("a PDU for another command")),
            }
        }
    }

    /// Sends an Asynchronous Event Request, held by the controller until an event.
    pub fn post_aer(&mut self) -> io::Result<()> {
        let cid = self.take_cid();
        let mut sqe = Command::new(0x0c, 0).sqe;
        sqe[2..4].copy_from_slice(&cid.to_le_bytes());
        sqe[39] = 0x5a;
        self.aers.push(cid);
        self.send_pdu(TYPE_CAPSULE_CMD, &sqe, &[], 0)
    }

    /// Waits for an event (the completion of a held AER).
    pub fn wait_event(&mut self, timeout: Duration) -> io::Result<u32> {
        let deadline = Instant::now() + timeout;
        while self.events.is_empty() {
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no asynchronous event"));
            }
            match self.read_pdu()? {
                FromController::Resp { cid, completion } if self.aers.contains(&cid) => {
                    self.aers.retain(|&a| a != cid);
                    self.events.push(completion.dw0);
                }
                _ => return Err(bad("an unexpected PDU while waiting for an event")),
            }
        }
        Ok(self.events.remove(0))
    }

    /// Fabrics Connect of this queue to a controller (`cntlid` 0xFFFF for a new one).
    pub fn connect(
        &mut self,
        qid: u16,
        sqsize: u16,
        cntlid: u16,
        subnqn: &str,
        hostnqn: &str,
    ) -> io::Result<Completion> {
        let mut data = vec![0u8; 1024];
        data[0..16].copy_from_slice(b"nvmirror-testhst");
        data[16..18].copy_from_slice(&cntlid.to_le_bytes());
        data[256..256 + subnqn.len()].copy_from_slice(subnqn.as_bytes());
        data[512..512 + hostnqn.len()].copy_from_slice(hostnqn.as_bytes());
        let mut cmd = Command::new(0x7f, 0).byte(4, 0x01);
        cmd.sqe[42..44].copy_from_slice(&qid.to_le_bytes());
        cmd.sqe[44..46].copy_from_slice(&sqsize.to_le_bytes());
        cmd.sqe[48..52].copy_from_slice(&5000u32.to_le_bytes());
        cmd.data_out = data;
        Ok(self.execute(cmd)?.0)
    }

    pub fn property_get(&mut self, offset: u32) -> io::Result<u64> {
        let c = self.execute(Command::new(0x7f, 0).byte(4, 0x04).byte(40, 1).dword(11, offset))?.0;
        if !c.ok() {
            return Err(bad(format!("Property Get {offset:#x}: {:?}", c.status)));
        }
        Ok(u64::from(c.dw0) | (u64::from(c.dw1) << 32))
    }

    pub fn property_set(&mut self, offset: u32, value: u32) -> io::Result<Completion> {
        Ok(self.execute(Command::new(0x7f, 0).byte(4, 0x00).dword(11, offset).dword(12, value))?.0)
    }

    pub fn identify(&mut self, cns: u8, nsid: u32) -> io::Result<(Completion, Vec<u8>)> {
        let mut cmd = Command::new(0x06, nsid).dword(10, u32::from(cns));
        cmd.data_in = 4096;
        self.execute(cmd)
    }

    pub fn get_log_page(&mut self, lid: u8, len: usize, offset: u64) -> io::Result<(Completion, Vec<u8>)> {
        let dwords = (len / 4 - 1) as u32;
        let mut cmd = Command::new(0x02, 0xffff_ffff)
            .dword(10, u32::from(lid) | ((dwords & 0xffff) << 16))
            .dword(11, dwords >> 16)
            .dword(12, offset as u32)
            .dword(13, (offset >> 32) as u32);
        cmd.data_in = len;
        self.execute(cmd)
    }
}

/// A host attached to one volume's subsystem: the admin queue and I/O queue 1.
pub struct NvmfClient {
    pub admin: HostQueue,
    pub io: HostQueue,
    pub cntlid: u16,
    /// The namespace's block size (log2) and its size in blocks.
    pub lba_shift: u8,
    pub blocks: u64,
}

pub const HOST_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";

fn check(c: Completion, what: &str) -> io::Result<Completion> {
    if c.ok() {
        Ok(c)
    } else {
        Err(bad(format!("{what}: {:?}", c.status)))
    }
}

/// Connects an admin queue and enables its controller; returns the queue and controller ID.
pub fn attach_admin(addr: &str, subnqn: &str, digests: bool) -> io::Result<(HostQueue, u16)> {
    let mut admin = HostQueue::open(addr, digests, digests)?;
    let c = check(admin.connect(0, 31, 0xffff, subnqn, HOST_NQN)?, "admin Connect")?;
    let cntlid = c.dw0 as u16;
    admin.property_get(0x00)?;
    check(admin.property_set(0x14, 0x0046_0001)?, "CC.EN")?;
    if admin.property_get(0x1c)? & 1 != 1 {
        return Err(bad("CSTS.RDY not set after CC.EN"));
    }
    Ok((admin, cntlid))
}

impl NvmfClient {
    /// Attaches volume `subnqn` at `addr` (digests both on or both off).
    pub fn connect(addr: &str, subnqn: &str, digests: bool) -> io::Result<NvmfClient> {
        let (mut admin, cntlid) = attach_admin(addr, subnqn, digests)?;
        let (c, ns) = admin.identify(0x00, NSID)?;
        check(c, "Identify Namespace")?;
        let lba_shift = ns[130];
        let blocks = u64::from_le_bytes(ns[0..8].try_into().expect("8 bytes"));
        // Asynchronous event configuration: ANA change notices.
        check(admin.execute(Command::new(0x09, 0).dword(10, 0x0b).dword(11, 1 << 11))?.0, "Set Features")?;
        check(admin.execute(Command::new(0x09, 0).dword(10, 0x07).dword(11, 0))?.0, "Number of Queues")?;
        let mut io = HostQueue::open(addr, digests, digests)?;
        check(io.connect(1, 127, cntlid, subnqn, HOST_NQN)?, "I/O queue Connect")?;
        io.inline_max = super::INLINE_DATA_BYTES;
        Ok(NvmfClient { admin, io, cntlid, lba_shift, blocks })
    }

    /// The ANA state of the namespace through this controller (1 optimized, 3 inaccessible).
    pub fn ana_state(&mut self) -> io::Result<u8> {
        let (c, page) = self.admin.get_log_page(0x0c, 52, 0)?;
        check(c, "ANA log")?;
        Ok(page[32])
    }

    pub fn read(&mut self, slba: u64, blocks: u32) -> io::Result<(Completion, Vec<u8>)> {
        let mut cmd =
            Command::new(0x02, NSID).dword(10, slba as u32).dword(11, (slba >> 32) as u32).dword(12, blocks - 1);
        cmd.data_in = (blocks as usize) << self.lba_shift;
        self.io.execute(cmd)
    }

    pub fn write(&mut self, slba: u64, data: &[u8], fua: bool) -> io::Result<Completion> {
        let blocks = (data.len() >> self.lba_shift) as u32;
        let mut cmd = Command::new(0x01, NSID)
            .dword(10, slba as u32)
            .dword(11, (slba >> 32) as u32)
            .dword(12, (blocks - 1) | (u32::from(fua) << 30));
        cmd.data_out = data.to_vec();
        Ok(self.io.execute(cmd)?.0)
    }

    pub fn write_zeroes(&mut self, slba: u64, blocks: u32) -> io::Result<Completion> {
        let cmd = Command::new(0x08, NSID).dword(10, slba as u32).dword(11, (slba >> 32) as u32).dword(12, blocks - 1);
        Ok(self.io.execute(cmd)?.0)
    }

    pub fn flush(&mut self) -> io::Result<Completion> {
        Ok(self.io.execute(Command::new(0x00, NSID))?.0)
    }

    /// Dataset Management, deallocate: each range (first block, blocks).
    pub fn deallocate(&mut self, ranges: &[(u64, u32)]) -> io::Result<Completion> {
        let mut data = Vec::new();
        for &(slba, n) in ranges {
            data.extend_from_slice(&0u32.to_le_bytes());
            data.extend_from_slice(&n.to_le_bytes());
            data.extend_from_slice(&slba.to_le_bytes());
        }
        let mut cmd = Command::new(0x09, NSID).dword(10, ranges.len() as u32 - 1).dword(11, 1 << 2);
        cmd.data_out = data;
        Ok(self.io.execute(cmd)?.0)
    }
}

/// The discovery log page at `addr`: each entry's subsystem NQN, address and port.
pub fn discover(addr: &str) -> io::Result<Vec<(String, String, String)>> {
    let (mut admin, _) = attach_admin(addr, DISCOVERY_NQN, false)?;
    let (c, head) = admin.get_log_page(0x70, 1024, 0)?;
    check(c, "discovery log header")?;
    let n = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes")) as usize;
    let (c, page) = admin.get_log_page(0x70, 1024 * (n + 1), 0)?;
    check(c, "discovery log")?;
    let field = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    Ok((0..n)
        .map(|i| {
            let e = &page[1024 * (i + 1)..1024 * (i + 2)];
            (field(&e[256..512]), field(&e[512..768]), field(&e[32..64]))
        })
        .collect())
}

/// The capsule header length, for tests that build PDUs by hand.
pub const CAPSULE_HLEN: usize = CAPSULE_CMD_HLEN;
