use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::{check_range, BlockDevice};
use crate::format::BLOCK_BYTES;

/// A regular file or a block device, through `pread`/`pwrite`.
///
/// Fails stop: after one I/O error every later call is refused, so a volume never carries
/// on half-written.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: u64,
    failed: AtomicBool,
}

impl FileDevice {
    /// Creates (or opens) a file of exactly `size` bytes.
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        if size == 0 || !size.is_multiple_of(BLOCK_BYTES as u64) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("volume size {size} is not a positive multiple of {BLOCK_BYTES}"),
            ));
        }
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            file.set_len(size)?;
            file.sync_all()?;
        } else if len != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is {len} bytes, expected {size}", path.display()),
            ));
        }
        Ok(Self { file, path: path.to_path_buf(), size, failed: AtomicBool::new(false) })
    }

    /// Opens an existing file or block device with its current size.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        let size = if size == 0 {
            // Block devices report 0 in metadata; ask the device.
            use std::io::Seek;
            (&file).seek(io::SeekFrom::End(0))?
        } else {
            size
        };
        Ok(Self { file, path: path.to_path_buf(), size, failed: AtomicBool::new(false) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn guard<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if r.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        r
    }

    fn check_alive(&self) -> io::Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(io::Error::other(format!("{}: refusing I/O after an earlier I/O error", self.path.display())));
        }
        Ok(())
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_alive()?;
        check_range(self.size, offset, buf.len() as u64)?;
        self.guard(self.file.read_exact_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_alive()?;
        check_range(self.size, offset, buf.len() as u64)?;
        self.guard(self.file.write_all_at(buf, offset))
    }
    fn flush(&self) -> io::Result<()> {
        self.check_alive()?;
        self.guard(self.file.sync_data())
    }
}
