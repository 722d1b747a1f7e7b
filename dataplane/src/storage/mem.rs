use std::io;

use parking_lot::Mutex;

use super::{check_range, BlockDevice};

/// A volume in process memory, for tests and the simulator.
#[derive(Debug)]
pub struct MemDevice {
    bytes: Mutex<Vec<u8>>,
}

impl MemDevice {
    pub fn new(size: u64) -> Self {
        Self { bytes: Mutex::new(vec![0; usize::try_from(size).expect("size fits memory")]) }
    }
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.lock().clone()
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.bytes.lock().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let b = self.bytes.lock();
        check_range(b.len() as u64, offset, buf.len() as u64)?;
        // In range (checked), so the offset fits a usize.
        let o = crate::usize_of(offset);
        buf.copy_from_slice(&b[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut b = self.bytes.lock();
        check_range(b.len() as u64, offset, buf.len() as u64)?;
        let o = crate::usize_of(offset);
        b[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn grow(&self, size: u64) -> io::Result<()> {
        let mut b = self.bytes.lock();
        let size = usize::try_from(size).map_err(|_| io::Error::other("size does not fit memory"))?;
        if size > b.len() {
            b.resize(size, 0);
        }
        Ok(())
    }
}
