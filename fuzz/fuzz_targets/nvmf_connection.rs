//! The NVMe/TCP target on a hostile host: one connection's bytes, over a real loopback
//! socket to a real server with one writable and one read-only volume. The first input
//! byte picks how the rest is sent:
//!
//! - bit 0: raw bytes from the first one (no ICReq first), else a valid ICReq first;
//! - bits 1, 2: header and data digests asked for in that ICReq;
//! - bit 3: the rest is cut into commands (a u16 length, then that many bytes: the first
//!   64 are the command, the others its in-capsule data), each sent as a well-framed
//!   capsule with correct digests, so that the command decoders are reached;
//! - bit 4: a valid admin Connect (to the writable volume, or the read-only one with bit
//!   6) goes first; with bit 5 it is an I/O queue's Connect, to a controller a real host
//!   made on another connection.
//!
//! The server must answer or end the connection, never panic, and serve the next one.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nvmirror_dataplane::checksum::crc32c;
use nvmirror_dataplane::frontend::nvmf::client::{attach_admin, Command, HOST_NQN};
use nvmirror_dataplane::frontend::nvmf::{subsystem_nqn, NvmfServer};
use nvmirror_dataplane::frontend::mem::{MemExport, MemRegistry};

struct Target {
    addr: String,
    /// A controller of the writable volume, held open by a real host for I/O queues.
    cntlid: u16,
    _admin: nvmirror_dataplane::frontend::nvmf::client::HostQueue,
    _server: NvmfServer,
}

fn target() -> &'static Target {
    static T: OnceLock<Target> = OnceLock::new();
    T.get_or_init(|| {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let reg = MemRegistry(vec![
            ("rw".into(), Arc::new(MemExport::new(1 << 20, false))),
            ("ro".into(), Arc::new(MemExport::new(1 << 20, true))),
        ]);
        let server = NvmfServer::spawn(l, Arc::new(reg)).expect("server");
        let (mut admin, cntlid) = attach_admin(&addr, &subsystem_nqn("rw"), false).expect("a real host attaches");
        // No keep alive: the controller lives as long as the fuzzing does.
        admin.execute(Command::new(0x09, 0).dword(10, 0x0f).dword(11, 0)).expect("Set Features (keep alive)");
        Target { addr, cntlid, _admin: admin, _server: server }
    })
}

/// A command capsule PDU around `sqe` and `data`, framed as negotiated.
fn capsule(out: &mut Vec<u8>, sqe: &[u8; 64], data: &[u8], hd: bool, dd: bool) {
    let hd_len = if hd { 4 } else { 0 };
    let dd_len = if dd && !data.is_empty() { 4 } else { 0 };
    let pdo = if data.is_empty() { 0 } else { 72 + hd_len };
    let plen = 72 + hd_len + data.len() + dd_len;
    let at = out.len();
    let flags = u8::from(hd) | if dd_len > 0 { 2 } else { 0 };
    out.extend_from_slice(&[0x04, flags, 72, u8::try_from(pdo).unwrap_or(0)]);
    out.extend_from_slice(&u32::try_from(plen).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(sqe);
    if hd {
        let d = crc32c(&out[at..]);
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(data);
    if dd_len > 0 {
        out.extend_from_slice(&crc32c(data).to_le_bytes());
    }
}

fn connect_capsule(out: &mut Vec<u8>, qid: u16, cntlid: u16, volume: &str, hd: bool, dd: bool) {
    let mut sqe = [0u8; 64];
    sqe[0] = 0x7f;
    sqe[1] = 0x40;
    sqe[2] = 1;
    sqe[4] = 0x01;
    sqe[32..36].copy_from_slice(&1024u32.to_le_bytes());
    sqe[39] = 0x01;
    sqe[42..44].copy_from_slice(&qid.to_le_bytes());
    sqe[44..46].copy_from_slice(&31u16.to_le_bytes());
    let mut data = vec![0u8; 1024];
    data[16..18].copy_from_slice(&cntlid.to_le_bytes());
    let nqn = subsystem_nqn(volume);
    data[256..256 + nqn.len()].copy_from_slice(nqn.as_bytes());
    data[512..512 + HOST_NQN.len()].copy_from_slice(HOST_NQN.as_bytes());
    capsule(out, &sqe, &data, hd, dd);
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else { return };
    let t = target();
    let (raw, hd, dd, wrap, connect, io, ro) =
        (mode & 1 != 0, mode & 2 != 0, mode & 4 != 0, mode & 8 != 0, mode & 16 != 0, mode & 32 != 0, mode & 64 != 0);
    let mut out = Vec::new();
    if !raw {
        let mut ic = [0u8; 128];
        ic[2] = 128;
        ic[4] = 128;
        ic[11] = u8::from(hd) | (u8::from(dd) << 1);
        out.extend_from_slice(&ic);
        if connect {
            let volume = if ro { "ro" } else { "rw" };
            if io {
                connect_capsule(&mut out, 1, t.cntlid, volume, hd, dd);
            } else {
                connect_capsule(&mut out, 0, 0xffff, volume, hd, dd);
            }
        }
    }
    if wrap && !raw {
        let mut left = rest;
        for _ in 0..64 {
            if left.len() < 2 {
                break;
            }
            let n = usize::from(u16::from_le_bytes([left[0], left[1]])).min(left.len() - 2);
            let chunk = &left[2..2 + n];
            left = &left[2 + n..];
            let mut sqe = [0u8; 64];
            let head = chunk.len().min(64);
            sqe[..head].copy_from_slice(&chunk[..head]);
            capsule(&mut out, &sqe, &chunk[head..], hd, dd);
        }
    } else {
        out.extend_from_slice(rest);
    }
    let mut s = TcpStream::connect(&t.addr).expect("the server accepts");
    s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let _ = s.write_all(&out);
    let _ = s.shutdown(Shutdown::Write);
    let mut sink = [0u8; 65536];
    for _ in 0..1024 {
        match s.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
});
