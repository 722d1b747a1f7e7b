//! The checker's model of the volume: what every block may hold.
//!
//! Each write carries blocks that describe themselves (block number, version, a pattern
//! derived from both), and versions only grow. A block read back must be a whole,
//! untorn version that was written to it (or zeroes, where a zeroing write or the
//! initial contents allow), never older than the newest version any client saw
//! acknowledged.

use std::collections::BTreeSet;

use crate::format::BLOCK_BYTES;

/// The contents of `block` at `version` (version 0: zeroes).
pub fn block_contents(block: u64, version: u64, out: &mut [u8]) {
    debug_assert_eq!(out.len(), BLOCK_BYTES);
    if version == 0 {
        out.fill(0);
        return;
    }
    out[0..8].copy_from_slice(&block.to_le_bytes());
    out[8..16].copy_from_slice(&version.to_le_bytes());
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version.wrapping_mul(0xd1b5_4a32_d192_ed03) | 1;
    for w in out[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
}

#[derive(Debug, Default, Clone)]
struct BlockModel {
    /// The newest version acknowledged to a client (0: none yet).
    acked: u64,
    /// Versions ever written with data.
    written: BTreeSet<u64>,
    /// Versions that were zeroing writes (write-zeroes, trim).
    zeroed: BTreeSet<u64>,
}

#[derive(Debug)]
pub struct Model {
    blocks: Vec<BlockModel>,
    next_version: u64,
}

impl Model {
    pub fn new(blocks: u64) -> Self {
        Self { blocks: vec![BlockModel::default(); crate::usize_of(blocks)], next_version: 0 }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// A version for a new write to `block`.
    pub fn next_version(&mut self) -> u64 {
        self.next_version += 1;
        self.next_version
    }

    pub fn submitted(&mut self, block: u64, version: u64, zero: bool) {
        let b = &mut self.blocks[crate::usize_of(block)];
        if zero {
            b.zeroed.insert(version);
        } else {
            b.written.insert(version);
        }
    }

    pub fn acked(&mut self, block: u64, version: u64) {
        let b = &mut self.blocks[crate::usize_of(block)];
        b.acked = b.acked.max(version);
    }

    /// Acknowledged writes: how many blocks have one.
    pub fn blocks_acked(&self) -> usize {
        self.blocks.iter().filter(|b| b.acked > 0).count()
    }

    /// Checks one block as read back; the reason it is wrong, if it is.
    pub fn check(&self, block: u64, data: &[u8]) -> Result<(), String> {
        let b = &self.blocks[crate::usize_of(block)];
        if data.iter().all(|&x| x == 0) {
            let allowed = b.acked == 0 || b.zeroed.range(b.acked..).next().is_some();
            return if allowed {
                Ok(())
            } else {
                Err(format!("block {block} reads as zeroes, but version {} was acknowledged", b.acked))
            };
        }
        let found_block = u64::from_le_bytes(data[0..8].try_into().expect("8"));
        let version = u64::from_le_bytes(data[8..16].try_into().expect("8"));
        let mut expect = vec![0u8; BLOCK_BYTES];
        block_contents(found_block, version, &mut expect);
        if found_block != block || version == 0 || expect != data {
            return Err(format!(
                "block {block} holds neither zeroes nor a whole version (torn or misplaced: header says block \
                 {found_block} version {version}); newest acknowledged version {}",
                b.acked
            ));
        }
        if !b.written.contains(&version) {
            return Err(format!("block {block} holds version {version}, which was never written to it"));
        }
        if version < b.acked {
            return Err(format!(
                "lost acknowledged write: block {block} holds version {version}, but version {} was acknowledged",
                b.acked
            ));
        }
        Ok(())
    }

    /// Checks a whole volume image; every problem found (at most `max`).
    pub fn check_volume(&self, image: &[u8], max: usize) -> Vec<String> {
        image.chunks(BLOCK_BYTES).enumerate().filter_map(|(i, d)| self.check(i as u64, d).err()).take(max).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_accepts_what_may_be_there_and_nothing_else() {
        let mut m = Model::new(4);
        let mut buf = vec![0u8; BLOCK_BYTES];
        assert!(m.check(0, &buf).is_ok(), "initial zeroes");
        let v1 = m.next_version();
        m.submitted(0, v1, false);
        block_contents(0, v1, &mut buf);
        assert!(m.check(0, &buf).is_ok(), "a submitted version");
        m.acked(0, v1);
        assert!(m.check(0, &[0u8; BLOCK_BYTES]).is_err(), "zeroes after an acked write");
        let v2 = m.next_version();
        m.submitted(0, v2, false);
        let mut b2 = vec![0u8; BLOCK_BYTES];
        block_contents(0, v2, &mut b2);
        assert!(m.check(0, &b2).is_ok(), "a later, unacknowledged version");
        m.acked(0, v2);
        assert!(m.check(0, &buf).unwrap_err().contains("lost acknowledged write"));
        let mut torn = b2.clone();
        torn[2048..].copy_from_slice(&buf[2048..]);
        assert!(m.check(0, &torn).unwrap_err().contains("torn"));
        let mut other = vec![0u8; BLOCK_BYTES];
        block_contents(1, v2, &mut other);
        assert!(m.check(0, &other).is_err(), "another block's contents");
        let v3 = m.next_version();
        m.submitted(0, v3, true);
        assert!(m.check(0, &[0u8; BLOCK_BYTES]).is_ok(), "a later zeroing write");
        block_contents(0, 99, &mut buf);
        assert!(m.check(0, &buf).unwrap_err().contains("never written"));
    }
}
