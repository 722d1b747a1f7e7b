//! A checked write workload: 4 KiB writes of self-describing blocks through NBD, with the
//! record of what was acknowledged, and the verification of a volume against it.
//!
//! Block `b` at version `v` holds a header (magic, b, v, crc32c of the rest) and bytes
//! generated from (b, v), so a block read back names the write it came from and a block
//! mixed from two writes matches neither. After a failover, every block must hold its last
//! acknowledged version, or a version written later whose acknowledgement was not seen
//! (lost with the source or failed), and nothing else.

use std::collections::HashMap;
use std::io;
use std::time::Instant;

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use nvmirror_dataplane::frontend::nbd_client::{NbdClient, CMD_WRITE};
use nvmirror_dataplane::usize_of;

pub const BLOCK: usize = 4096;
const BLOCK_U32: u32 = 4096;
const _: () = assert!(BLOCK_U32 as usize == BLOCK);
const MAGIC: u64 = 0x6e76_6d69_7272_6f72;

/// The contents of block `block` at `version` (version 0 is the never-written zero block).
pub fn block_data(block: u64, version: u64) -> Vec<u8> {
    let mut d = vec![0u8; BLOCK];
    if version == 0 {
        return d;
    }
    let mut x = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.wrapping_mul(0xD1B5_4A32_D192_ED03);
    for chunk in d[32..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    d[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    d[8..16].copy_from_slice(&block.to_le_bytes());
    d[16..24].copy_from_slice(&version.to_le_bytes());
    let crc = nvmirror_dataplane::checksum::crc32c(&d[32..]);
    d[24..28].copy_from_slice(&crc.to_le_bytes());
    d
}

/// Which write a block read back came from: `Some(version)` (0 = never written), or
/// `None` when it matches no write of this block (torn, mixed or corrupt).
pub fn identify(block: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    if data.len() != BLOCK || data[0..8] != MAGIC.to_le_bytes() || data[8..16] != block.to_le_bytes() {
        return None;
    }
    let version = u64::from_le_bytes(data[16..24].try_into().expect("8"));
    (block_data(block, version) == data).then_some(version)
}

pub struct Workload {
    /// Byte offset of block 0 on the volume.
    pub base: u64,
    pub blocks: u64,
    next_version: u64,
    last_acked: Vec<u64>,
    /// Versions written but not acknowledged, per block.
    unacked: Vec<Vec<u64>>,
    busy: Vec<bool>,
    rng: u64,
    pub latency_ns: Histogram<u64>,
    pub writes: u64,
    pub acks: u64,
    pub errors: u64,
}

#[derive(Debug)]
pub struct Verified {
    pub blocks_checked: u64,
    pub blocks_with_acked_data: u64,
    /// Blocks holding a version newer than their last ack (in flight at the crash).
    pub newer_than_acked: u64,
    pub bad: Vec<String>,
}

impl Workload {
    pub fn new(base: u64, blocks: u64, seed: u64) -> Workload {
        Workload {
            base,
            blocks,
            next_version: 1,
            last_acked: vec![0; usize_of(blocks)],
            unacked: vec![Vec::new(); usize_of(blocks)],
            busy: vec![false; usize_of(blocks)],
            rng: seed | 1,
            latency_ns: Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("histogram bounds"),
            writes: 0,
            acks: 0,
            errors: 0,
        }
    }

    fn pick(&mut self) -> u64 {
        loop {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let b = self.rng % self.blocks;
            if !self.busy[usize_of(b)] {
                return b;
            }
        }
    }

    /// Writes `count` blocks at queue depth `qd`. `after_ack(acks)` runs after every
    /// acknowledgement (the quickstart kills the source from it). Returns when all replies
    /// are in or the connection ends (a killed server): then every write without an OK
    /// reply counts as unacknowledged.
    pub fn run(&mut self, client: &mut NbdClient, qd: usize, count: u64, mut after_ack: impl FnMut(u64)) -> Result<()> {
        let qd = qd.clamp(1, usize_of(self.blocks) / 2);
        let mut inflight: HashMap<u64, (u64, Instant)> = HashMap::new();
        let mut sent = 0u64;
        loop {
            while inflight.len() < qd && sent < count {
                let b = self.pick();
                let v = self.next_version;
                self.next_version += 1;
                self.busy[usize_of(b)] = true;
                self.unacked[usize_of(b)].push(v);
                let data = block_data(b, v);
                let started = Instant::now();
                if let Err(e) = client.send(CMD_WRITE, v, self.base + b * BLOCK as u64, BLOCK_U32, &data) {
                    self.busy[usize_of(b)] = false;
                    return self.connection_ended(&inflight, e);
                }
                inflight.insert(v, (b, started));
                sent += 1;
                self.writes += 1;
            }
            if inflight.is_empty() {
                return Ok(());
            }
            let reply = match client.recv(None) {
                Ok(r) => r,
                Err(e) => return self.connection_ended(&inflight, e),
            };
            let Some((b, started)) = inflight.remove(&reply.cookie) else {
                bail!("reply for unknown cookie {}", reply.cookie);
            };
            self.busy[usize_of(b)] = false;
            if reply.error != 0 {
                self.errors += 1;
                continue;
            }
            let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.latency_ns.saturating_record(ns);
            self.acks += 1;
            let v = reply.cookie;
            let list = &mut self.unacked[usize_of(b)];
            list.retain(|&x| x > v);
            self.last_acked[usize_of(b)] = self.last_acked[usize_of(b)].max(v);
            after_ack(self.acks);
        }
    }

    fn connection_ended(&mut self, inflight: &HashMap<u64, (u64, Instant)>, e: io::Error) -> Result<()> {
        // Expected when the server was killed: whatever is in flight stays unacknowledged
        // (its versions stay in `unacked`, so a verification accepts them or the older
        // acknowledged one). Its blocks are free again for a later run on a new
        // connection, as after a failover, so that a long run does not leave more and
        // more blocks unwritable.
        let _ = e;
        for (b, _) in inflight.values() {
            self.busy[usize_of(*b)] = false;
        }
        Ok(())
    }

    /// Reads every block through `read` and checks it against the record.
    pub fn verify(&self, mut read: impl FnMut(u64, &mut [u8]) -> io::Result<()>) -> Result<Verified> {
        let mut out = Verified { blocks_checked: 0, blocks_with_acked_data: 0, newer_than_acked: 0, bad: Vec::new() };
        let mut buf = vec![0u8; BLOCK];
        for b in 0..self.blocks {
            read(self.base + b * BLOCK as u64, &mut buf)?;
            out.blocks_checked += 1;
            let acked = self.last_acked[usize_of(b)];
            match identify(b, &buf) {
                Some(v) if v == acked => {
                    if v > 0 {
                        out.blocks_with_acked_data += 1;
                    }
                }
                Some(v) if v > acked && self.unacked[usize_of(b)].contains(&v) => out.newer_than_acked += 1,
                Some(v) => out.bad.push(format!("block {b}: holds version {v}, last acknowledged {acked}")),
                None => {
                    out.bad.push(format!("block {b}: matches no write (torn or corrupt), last acknowledged {acked}"))
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_identify_themselves_and_mixes_do_not() {
        let a = block_data(5, 7);
        assert_eq!(identify(5, &a), Some(7));
        assert_eq!(identify(6, &a), None);
        assert_eq!(identify(5, &[0u8; BLOCK]), Some(0));
        let b = block_data(5, 8);
        let mut mixed = a.clone();
        mixed[2048..].copy_from_slice(&b[2048..]);
        assert_eq!(identify(5, &mixed), None);
    }
}
