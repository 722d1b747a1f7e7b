//! `direct:` regions, for machines without persistent memory: the region's bytes live in
//! process memory, and `persist` writes the 4 KiB blocks that hold a range to a file (or
//! block device) opened `O_DIRECT | O_DSYNC`. The page cache is never involved, so what a
//! power cut keeps is exactly what a completed `persist` wrote: whole device writes, and
//! for the one in flight, some of its blocks (each torn at worst at the device's sector
//! size). A rewritten block repeats the bytes it held before wherever they were already
//! persisted, so tearing it never damages what an earlier `persist` made durable.
//!
//! With `O_DSYNC` on an `O_DIRECT` descriptor the kernel sends each write with FUA where
//! the device honours it, and otherwise follows it with a cache flush: the write returns
//! once the device holds it through a power cut. [`DeviceCache`] says which the device
//! does, for the node's start-up log.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use super::{Nvram, NvramError};

/// The unit of every device write: what `O_DIRECT` needs on 4Kn devices, and what a
/// partial-block persist is rounded out to.
pub const DIRECT_BLOCK: usize = 4096;
/// How much the start-up fill and read move per system call.
const CHUNK: usize = 1 << 20;

/// A block-aligned, zeroed heap buffer (`O_DIRECT` needs aligned memory).
struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is owned by this value alone, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn zeroed(len: usize) -> Self {
        let layout = Layout::from_size_align(len.max(DIRECT_BLOCK), DIRECT_BLOCK).expect("region layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Self { ptr, len }
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is an allocation of at least `len` initialised (zeroed) bytes,
        // alive as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len.max(DIRECT_BLOCK), DIRECT_BLOCK).expect("region layout");
        // SAFETY: allocated in `zeroed` with this very layout, freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

/// A region whose durable copy is an `O_DIRECT` file or block device.
pub struct DirectNvram {
    /// The region, rounded up to whole blocks; `len` of it is the region proper.
    buf: AlignedBuf,
    len: usize,
    file: File,
}

pub(super) fn round_up(n: usize) -> usize {
    n.div_ceil(DIRECT_BLOCK) * DIRECT_BLOCK
}

/// The whole blocks that hold `[offset, offset + len)`: what one persist writes.
pub(crate) fn block_span(offset: usize, len: usize) -> std::ops::Range<usize> {
    offset / DIRECT_BLOCK * DIRECT_BLOCK..round_up(offset + len)
}

impl DirectNvram {
    /// Opens (creating if absent) `path` as a region of `len` bytes. A new file is written
    /// with zeroes in full (not left sparse: an overwrite of allocated blocks needs no
    /// file-system journal commit), then read back whole. A file of another size is
    /// refused, as for the mapped modes; a block device must hold at least the region.
    pub fn open(path: &Path, len: usize) -> Result<Self, NvramError> {
        let blocks = round_up(len);
        let io_err = |what: &'static str| move |source| NvramError::Io { what, path: path.to_path_buf(), source };
        let size_err = |source| NvramError::Size { path: path.to_path_buf(), len, source };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(path)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EINVAL) => NvramError::NoDirect { path: path.to_path_buf(), source },
                _ => NvramError::Open { path: path.to_path_buf(), source },
            })?;
        let meta = file.metadata().map_err(|source| NvramError::Open { path: path.to_path_buf(), source })?;
        let mut buf = AlignedBuf::zeroed(blocks);
        if meta.file_type().is_block_device() {
            let size = device_bytes(&file).map_err(io_err("size of"))?;
            if size < blocks as u64 {
                return Err(NvramError::WrongSize { path: path.to_path_buf(), actual: size, expected: blocks });
            }
        } else if meta.len() == 0 {
            for at in (0..blocks).step_by(CHUNK) {
                let end = (at + CHUNK).min(blocks);
                file.write_all_at(&buf.as_slice()[at..end], at as u64).map_err(size_err)?;
            }
        } else if meta.len() == len as u64 && len < blocks {
            // Made by a mapped mode, whose regions need not end on a block: grown to one.
            file.set_len(blocks as u64).map_err(size_err)?;
            file.sync_all().map_err(size_err)?;
        } else if meta.len() != blocks as u64 {
            return Err(NvramError::WrongSize { path: path.to_path_buf(), actual: meta.len(), expected: blocks });
        }
        for at in (0..blocks).step_by(CHUNK) {
            let end = (at + CHUNK).min(blocks);
            file.read_exact_at(&mut buf.as_mut_slice()[at..end], at as u64).map_err(io_err("read"))?;
        }
        Ok(Self { buf, len, file })
    }
}

/// A block device's size in bytes.
fn device_bytes(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

impl Nvram for DirectNvram {
    fn len(&self) -> usize {
        self.len
    }
    fn bytes(&self) -> &[u8] {
        &self.buf.as_slice()[..self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf.as_mut_slice()[..self.len]
    }
    fn persist(&mut self, offset: usize, len: usize) -> io::Result<()> {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len), "persist range out of the region");
        if len == 0 {
            return Ok(());
        }
        let span = block_span(offset, len);
        self.file.write_all_at(&self.buf.as_slice()[span.clone()], span.start as u64)
    }
    fn persist_waits_for_device(&self) -> bool {
        true
    }
}

/// How the device under a `direct:` path keeps what it is sent, from sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCache {
    /// The block device's kernel name (`nvme0n1`, `vda`).
    pub device: String,
    /// The device has a volatile write cache (`queue/write_cache` is "write back").
    pub volatile: bool,
    /// The device takes FUA writes (`queue/fua`).
    pub fua: bool,
}

impl DeviceCache {
    /// The device that holds `path` (a file on it, or the block device itself).
    pub fn of(path: &Path) -> io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        let dev = if meta.file_type().is_block_device() { meta.rdev() } else { meta.dev() };
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        // A partition's queue is its disk's.
        let queue = [sys.join("queue"), sys.join("../queue")]
            .into_iter()
            .find(|q| q.is_dir())
            .ok_or_else(|| io::Error::other(format!("{} has no queue in sysfs", sys.display())))?;
        let read = |name: &str| std::fs::read_to_string(queue.join(name)).map(|s| s.trim().to_string());
        let device = std::fs::canonicalize(&sys)?
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("{major}:{minor}"));
        Ok(Self { device, volatile: read("write_cache")? == "write back", fua: read("fua").is_ok_and(|f| f == "1") })
    }
}

impl std::fmt::Display for DeviceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.volatile, self.fua) {
            (false, _) => write!(f, "{}: no volatile write cache; each group commit is one write", self.device),
            (true, true) => write!(f, "{}: volatile write cache, FUA: each group commit is one FUA write", self.device),
            (true, false) => write!(
                f,
                "{}: volatile write cache without FUA: each group commit is a write and a cache flush",
                self.device
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_disk(path: &Path) -> Vec<u8> {
        std::fs::read(path).expect("read region file")
    }

    #[test]
    fn persist_writes_whole_blocks_and_nothing_else_reaches_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let len = 5 * DIRECT_BLOCK + 100;
        {
            let mut r = DirectNvram::open(&path, len).unwrap();
            assert_eq!(on_disk(&path).len(), 6 * DIRECT_BLOCK, "the file is the region rounded up to blocks");
            r.bytes_mut()[5000..5004].copy_from_slice(b"abcd");
            r.bytes_mut()[4096] = 7;
            r.bytes_mut()[9000] = 9; // block 2: stored, never persisted
            r.persist(5000, 4).unwrap();
            let file = on_disk(&path);
            assert_eq!(&file[5000..5004], b"abcd");
            assert_eq!(file[4096], 7, "the persist writes the whole block that holds the range");
            assert_eq!(file[9000], 0, "a store without a persist never reaches the device");
            r.bytes_mut()[len - 1] = 1;
            r.persist(len - 1, 1).unwrap();
        }
        let r = DirectNvram::open(&path, len).unwrap();
        assert_eq!(&r.bytes()[5000..5004], b"abcd");
        assert_eq!(r.bytes()[9000], 0, "what was not persisted is gone after a reopen");
        assert_eq!(r.bytes()[len - 1], 1, "the last, partial block persists too");
        assert!(matches!(DirectNvram::open(&path, 8 * DIRECT_BLOCK), Err(NvramError::WrongSize { .. })));
    }

    #[test]
    fn a_region_made_by_a_mapped_mode_opens_direct() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let len = 2 * DIRECT_BLOCK + 64;
        {
            let mut m = super::super::MappedNvram::open(&path, len, super::super::NvramMode::File).unwrap();
            m.bytes_mut()[len - 64..].fill(0x5a);
        }
        let r = DirectNvram::open(&path, len).unwrap();
        assert!(r.bytes()[len - 64..].iter().all(|&b| b == 0x5a));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * DIRECT_BLOCK as u64);
    }

    #[test]
    fn the_device_under_a_file_is_described() {
        let dir = tempfile::tempdir().unwrap();
        // Containers may hide sysfs; where it is there, the answer names a device.
        if Path::new("/sys/dev/block").is_dir() {
            let c = DeviceCache::of(dir.path()).unwrap();
            assert!(!c.device.is_empty() && !c.device.contains(':'), "{c:?}");
            assert!(c.to_string().starts_with(&c.device));
        }
    }
}
