//! Block devices: where volumes live.
//!
//! The mirror logic reads and writes volumes only through [`BlockDevice`]. Backends: a
//! plain file or block device through `pread`/`pwrite` ([`FileDevice`]) and process
//! memory for tests ([`MemDevice`]). The io_uring, NVMe passthrough and RAID-4 engines plug
//! in behind the same trait.

mod file;
mod mem;

pub use file::FileDevice;
pub use mem::MemDevice;

use std::io;

use crate::format::BLOCK_BYTES;

pub trait BlockDevice: Send + Sync {
    /// Size in bytes, a multiple of [`BLOCK_BYTES`].
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Writes zeroes over a range; backends may punch holes instead.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        static ZEROES: [u8; BLOCK_BYTES * 16] = [0; BLOCK_BYTES * 16];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZEROES.len() as u64);
            self.write_at(&ZEROES[..crate::usize_of(n)], offset + done)?;
            done += n;
        }
        Ok(())
    }
}

/// Checks that `[offset, offset + len)` lies within a device of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} is beyond the device end {size}"),
        )),
    }
}
