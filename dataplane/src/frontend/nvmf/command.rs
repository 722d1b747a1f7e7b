//! The I/O commands of an I/O queue, decoded and checked against the namespace: what both
//! the threaded queues and a volume's reactor serve.

use super::admin::lba_shift;
use super::{Status, NSID, TRANSFER_BYTES_MAX};

pub(super) const IO_FLUSH: u8 = 0x00;
pub(super) const IO_WRITE: u8 = 0x01;
pub(super) const IO_READ: u8 = 0x02;
pub(super) const IO_WRITE_ZEROES: u8 = 0x08;
pub(super) const IO_DSM: u8 = 0x09;

/// A trim names at most this many bytes: longer deallocate ranges go in pieces.
const TRIM_PIECE_BYTES: u64 = 1 << 30;

/// An I/O command, checked: byte offsets and lengths within the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum IoOp {
    Flush,
    Read {
        offset: u64,
        len: u32,
    },
    /// The data is the command's (in the capsule or fetched by R2T), `len` bytes.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// Dataset Management: the deallocate ranges as trims (none: attributes only).
    Trims(Vec<(u64, u32)>),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

/// Byte offset and length of `blocks` blocks from `slba`, where they lie within `size`.
fn byte_range(slba: u64, blocks: u64, shift: u8, size: u64) -> Option<(u64, u64)> {
    let offset = slba.checked_shl(u32::from(shift)).filter(|o| o >> shift == slba)?;
    let len = blocks << shift;
    (offset.checked_add(len)? <= size).then_some((offset, len))
}

/// Decodes I/O command `sqe` with its data (`data`: what came with it, for a write or a
/// Dataset Management) against a namespace of `size` bytes.
pub(super) fn decode(sqe: &[u8; 64], data: &[u8], size: u64) -> Result<IoOp, Status> {
    let opcode = sqe[0];
    if !matches!(opcode, IO_FLUSH | IO_WRITE | IO_READ | IO_WRITE_ZEROES | IO_DSM) {
        return Err(Status::INVALID_OPCODE);
    }
    if u32_at(sqe, 4) != NSID {
        return Err(Status::INVALID_NAMESPACE);
    }
    let shift = lba_shift(size);
    let cdw12 = u32_at(sqe, 48);
    let fua = cdw12 & (1 << 30) != 0;
    match opcode {
        IO_FLUSH => Ok(IoOp::Flush),
        IO_DSM => {
            let ranges = usize::from(sqe[40]) + 1;
            if data.len() < ranges * 16 {
                return Err(Status::DATA_SGL_LENGTH);
            }
            if u32_at(sqe, 44) & (1 << 2) == 0 {
                return Ok(IoOp::Trims(Vec::new())); // attributes only: nothing to do
            }
            let mut trims = Vec::new();
            for r in data[..ranges * 16].chunks_exact(16) {
                let blocks = u64::from(u32_at(r, 4));
                if blocks == 0 {
                    continue;
                }
                let (mut offset, mut len) =
                    byte_range(u64_at(r, 8), blocks, shift, size).ok_or(Status::LBA_OUT_OF_RANGE)?;
                while len > 0 {
                    let piece = len.min(TRIM_PIECE_BYTES);
                    trims.push((offset, u32::try_from(piece).unwrap_or(u32::MAX)));
                    offset += piece;
                    len -= piece;
                }
            }
            Ok(IoOp::Trims(trims))
        }
        _ => {
            let blocks = u64::from(cdw12 & 0xffff) + 1;
            let (offset, len) = byte_range(u64_at(sqe, 40), blocks, shift, size).ok_or(Status::LBA_OUT_OF_RANGE)?;
            // At most 65536 blocks of 4 KiB: 256 MiB, which a u32 holds.
            let len32 = u32::try_from(len).map_err(|_| Status::INVALID_FIELD)?;
            if opcode == IO_WRITE_ZEROES {
                return Ok(IoOp::WriteZeroes { offset, len: len32, fua });
            }
            if crate::usize_of(len) > TRANSFER_BYTES_MAX {
                return Err(Status::INVALID_FIELD);
            }
            if opcode == IO_READ {
                if u32_at(sqe, 32) < len32 {
                    return Err(Status::DATA_SGL_LENGTH);
                }
                return Ok(IoOp::Read { offset, len: len32 });
            }
            if data.len() as u64 != len {
                return Err(Status::DATA_SGL_LENGTH);
            }
            Ok(IoOp::Write { offset, len: len32, fua })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqe(opcode: u8, slba: u64, blocks: u32, sgl: u32) -> [u8; 64] {
        let mut s = [0u8; 64];
        s[0] = opcode;
        s[4..8].copy_from_slice(&NSID.to_le_bytes());
        s[32..36].copy_from_slice(&sgl.to_le_bytes());
        s[40..48].copy_from_slice(&slba.to_le_bytes());
        s[48..52].copy_from_slice(&(blocks - 1).to_le_bytes());
        s
    }

    #[test]
    fn ranges_lengths_and_namespaces_are_checked() {
        let size = 1 << 20; // 256 blocks of 4 KiB
        assert_eq!(decode(&sqe(IO_READ, 255, 1, 4096), &[], size), Ok(IoOp::Read { offset: 255 << 12, len: 4096 }));
        assert_eq!(decode(&sqe(IO_READ, 255, 2, 8192), &[], size), Err(Status::LBA_OUT_OF_RANGE));
        assert_eq!(decode(&sqe(IO_READ, u64::MAX >> 4, 1, 4096), &[], size), Err(Status::LBA_OUT_OF_RANGE));
        assert_eq!(decode(&sqe(IO_READ, 0, 2, 4096), &[], size), Err(Status::DATA_SGL_LENGTH));
        assert_eq!(decode(&sqe(IO_WRITE, 0, 1, 4096), &[0; 4095], size), Err(Status::DATA_SGL_LENGTH));
        assert_eq!(
            decode(&sqe(IO_WRITE, 1, 1, 4096), &[0; 4096], size),
            Ok(IoOp::Write { offset: 4096, len: 4096, fua: false })
        );
        let mut other_ns = sqe(IO_FLUSH, 0, 1, 0);
        other_ns[4] = 2;
        assert_eq!(decode(&other_ns, &[], size), Err(Status::INVALID_NAMESPACE));
        assert_eq!(decode(&sqe(0x42, 0, 1, 0), &[], size), Err(Status::INVALID_OPCODE));
        let big = 64 << 20;
        assert_eq!(decode(&sqe(IO_READ, 0, 512, 2 << 20), &[], big), Err(Status::INVALID_FIELD), "past MDTS");
    }

    #[test]
    fn deallocate_ranges_become_trims() {
        let size = 1 << 20;
        let mut s = sqe(IO_DSM, 0, 1, 32);
        s[40] = 1; // two ranges
        s[44] = 1 << 2;
        let mut data = Vec::new();
        for (slba, n) in [(3u64, 2u32), (10, 0)] {
            data.extend_from_slice(&0u32.to_le_bytes());
            data.extend_from_slice(&n.to_le_bytes());
            data.extend_from_slice(&slba.to_le_bytes());
        }
        assert_eq!(decode(&s, &data, size), Ok(IoOp::Trims(vec![(3 << 12, 8192)])));
        assert_eq!(decode(&s, &data[..16], size), Err(Status::DATA_SGL_LENGTH));
        s[44] = 0;
        assert_eq!(decode(&s, &data, size), Ok(IoOp::Trims(vec![])));
    }
}
