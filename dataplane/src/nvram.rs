//! NVRAM: the memory-mapped regions that hold the source's NVLog and the destination's
//! log files.
//!
//! Four modes, each honest about what it survives:
//!
//! | mode | memory | `persist` | survives |
//! |---|---|---|---|
//! | `file:` | shared mapping of a regular file | nothing (the page cache holds it) | a killed process; with the mirror, the loss of one site |
//! | `file-sync:` | shared mapping of a regular file | `msync(MS_SYNC)` of the range | power loss, at the cost of a disk flush |
//! | `direct:` | process memory over an `O_DIRECT` file | one `O_DSYNC` write of the 4 KiB blocks that hold the range | power loss, at the cost of one device write (FUA) per group commit |
//! | `dax:` | `MAP_SYNC` mapping on a DAX filesystem | cache-line write-back (`clwb`/`clflushopt`) + `sfence` | power loss, at memory speed |

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::str::FromStr;

use thiserror::Error;

mod direct;
#[cfg(any(test, feature = "sim"))]
pub(crate) use direct::block_span;
pub use direct::{DeviceCache, DirectNvram, DIRECT_BLOCK};

/// A byte region whose contents can be made persistent range by range.
pub trait Nvram: Send {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
    /// Makes `bytes()[offset..offset + len]` as durable as the mode promises.
    fn persist(&mut self, offset: usize, len: usize) -> io::Result<()>;
    /// Whether `persist` waits for a storage device (a flush or a FUA write) rather than
    /// for memory: the source then sends a batch to its mirror before it persists it
    /// here, so that the two sites' device writes overlap (see `source::write`).
    fn persist_waits_for_device(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NvramMode {
    File,
    FileSync,
    Direct,
    Dax,
}

impl NvramMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NvramMode::File => "file",
            NvramMode::FileSync => "file-sync",
            NvramMode::Direct => "direct",
            NvramMode::Dax => "dax",
        }
    }
    /// Whether an entry this mode persisted survives a power cut (every mode but `file:`).
    pub fn survives_power_loss(self) -> bool {
        self != NvramMode::File
    }
    /// What a region in this mode survives, for status output and the README.
    pub fn survives(self) -> &'static str {
        match self {
            NvramMode::File => "process kill (page cache); not power loss",
            NvramMode::FileSync => "power loss (msync per group commit)",
            NvramMode::Direct => "power loss (O_DIRECT write with FUA per group commit)",
            NvramMode::Dax => "power loss (persistent memory, cache-line flush)",
        }
    }
}

/// `MODE:PATH` as given to `--nvram`: the mode and the directory that holds the regions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvramSpec {
    pub mode: NvramMode,
    pub dir: PathBuf,
}

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NvramError {
    #[error("bad --nvram value {0:?}: expected dax:PATH, direct:PATH, file:PATH or file-sync:PATH")]
    BadSpec(String),
    #[error("open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("size {path} to {len} bytes: {source}")]
    Size { path: PathBuf, len: usize, source: io::Error },
    #[error("map {path}: {source}")]
    Map { path: PathBuf, source: io::Error },
    #[error("{path} is {actual} bytes, expected {expected}")]
    WrongSize { path: PathBuf, actual: u64, expected: usize },
    #[error(
        "open {path} with O_DIRECT: {source} (direct: needs a file system or block device that supports O_DIRECT; \
         tmpfs does not)"
    )]
    NoDirect { path: PathBuf, source: io::Error },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
}

/// Opens (creating if absent) the region `path` of exactly `len` bytes in `mode`: a
/// mapping for `file:`, `file-sync:` and `dax:`, an `O_DIRECT` file for `direct:`.
pub fn open_region(path: &Path, len: usize, mode: NvramMode) -> Result<Box<dyn Nvram>, NvramError> {
    Ok(match mode {
        NvramMode::Direct => Box::new(DirectNvram::open(path, len)?),
        _ => Box::new(MappedNvram::open(path, len, mode)?),
    })
}

/// Grows the region `path` to hold `len` bytes in `mode` (a file is extended, its new
/// bytes zero, and synced; a block device must hold them already), for
/// [`open_region`] at the new length. What it holds stays. A region at least that large
/// already is left as it is.
pub fn grow_region(path: &Path, len: usize, mode: NvramMode) -> Result<(), NvramError> {
    let target = if mode == NvramMode::Direct { direct::round_up(len) } else { len } as u64;
    let io_err = |what: &'static str| move |source| NvramError::Io { what, path: path.to_path_buf(), source };
    let file = OpenOptions::new().write(true).open(path).map_err(io_err("open"))?;
    let meta = file.metadata().map_err(io_err("stat"))?;
    if !meta.file_type().is_file() {
        use std::io::Seek;
        let holds = { &file }.seek(io::SeekFrom::End(0)).map_err(io_err("size of"))?;
        if holds < target {
            return Err(NvramError::WrongSize { path: path.to_path_buf(), actual: holds, expected: len });
        }
        return Ok(());
    }
    if meta.len() < target {
        file.set_len(target).map_err(|source| NvramError::Size { path: path.to_path_buf(), len, source })?;
        file.sync_all().map_err(|source| NvramError::Size { path: path.to_path_buf(), len, source })?;
    }
    Ok(())
}

impl FromStr for NvramSpec {
    type Err = NvramError;
    fn from_str(s: &str) -> Result<Self, NvramError> {
        let (mode, path) = s.split_once(':').ok_or_else(|| NvramError::BadSpec(s.to_string()))?;
        let mode = match mode {
            "file" => NvramMode::File,
            "file-sync" => NvramMode::FileSync,
            "direct" => NvramMode::Direct,
            "dax" => NvramMode::Dax,
            _ => return Err(NvramError::BadSpec(s.to_string())),
        };
        if path.is_empty() {
            return Err(NvramError::BadSpec(s.to_string()));
        }
        Ok(NvramSpec { mode, dir: PathBuf::from(path) })
    }
}

/// A shared mapping of a file, persisted as its mode says.
pub struct MappedNvram {
    ptr: NonNull<u8>,
    len: usize,
    mode: NvramMode,
    /// Kept open for `msync`'s sake and so the mapping's file is visibly in use.
    _file: File,
    flush: CacheFlush,
}

// SAFETY: the mapping is owned by this value alone (no aliasing handle is handed out), so
// moving it to another thread is as safe as moving a Vec<u8>.
unsafe impl Send for MappedNvram {}

impl MappedNvram {
    /// Opens (creating if absent) `path` as a region of exactly `len` bytes. A new file is
    /// zero-filled. An existing file of another size is an error: a log is never resized
    /// under its entries.
    pub fn open(path: &Path, len: usize, mode: NvramMode) -> Result<Self, NvramError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| NvramError::Open { path: path.to_path_buf(), source })?;
        let actual = file.metadata().map_err(|source| NvramError::Open { path: path.to_path_buf(), source })?.len();
        if actual == 0 {
            file.set_len(len as u64).map_err(|source| NvramError::Size { path: path.to_path_buf(), len, source })?;
            if mode != NvramMode::File {
                file.sync_all().map_err(|source| NvramError::Size { path: path.to_path_buf(), len, source })?;
            }
        } else if actual != len as u64 {
            return Err(NvramError::WrongSize { path: path.to_path_buf(), actual, expected: len });
        }
        assert!(mode != NvramMode::Direct, "direct: regions are DirectNvram, not mappings");
        let mut flags = libc::MAP_SHARED;
        if mode == NvramMode::Dax {
            // MAP_SYNC fails unless the file is on a DAX mount: the mode never pretends.
            flags = libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC;
        }
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh mapping of `len` bytes of an open file we own; the kernel chooses
        // the address; the result is checked before use.
        let raw = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, file.as_raw_fd(), 0)
        };
        if raw == libc::MAP_FAILED {
            return Err(NvramError::Map { path: path.to_path_buf(), source: io::Error::last_os_error() });
        }
        let ptr = NonNull::new(raw.cast::<u8>()).expect("mmap returned null without MAP_FAILED");
        Ok(Self { ptr, len, mode, _file: file, flush: CacheFlush::detect() })
    }

    pub fn mode(&self) -> NvramMode {
        self.mode
    }
}

impl Drop for MappedNvram {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping made in `open`, unmapped exactly once here; no
        // borrow of the bytes outlives `self`.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        debug_assert_eq!(rc, 0, "munmap failed: {}", io::Error::last_os_error());
    }
}

impl Nvram for MappedNvram {
    fn len(&self) -> usize {
        self.len
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is valid for `len` bytes for the life of `self`, and `&self`
        // excludes writers through `bytes_mut`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
    fn persist(&mut self, offset: usize, len: usize) -> io::Result<()> {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len), "persist range out of the region");
        if len == 0 {
            return Ok(());
        }
        match self.mode {
            NvramMode::File => {
                // Stores to a shared mapping are in the page cache once made; the fence
                // keeps the compiler from sinking them below the acknowledgement.
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
            NvramMode::FileSync => {
                let page = page_size();
                let start = offset / page * page;
                // SAFETY: [start, offset + len) lies within the mapping (checked above;
                // start is rounded down to the page that holds `offset`).
                let rc =
                    unsafe { libc::msync(self.ptr.as_ptr().add(start).cast(), offset + len - start, libc::MS_SYNC) };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
            NvramMode::Dax => {
                // SAFETY: the range is within the mapping (checked above).
                unsafe { self.flush.write_back(self.ptr.as_ptr().add(offset), len) };
                Ok(())
            }
            NvramMode::Direct => unreachable!("MappedNvram::open refuses direct:"),
        }
    }
    fn persist_waits_for_device(&self) -> bool {
        self.mode == NvramMode::FileSync
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096)
}

/// The cache-line write-back instruction this CPU offers, best first.
#[derive(Debug, Clone, Copy)]
enum CacheFlush {
    Clwb,
    Clflushopt,
    Clflush,
    /// Not x86_64: a full fence only.
    #[cfg(not(target_arch = "x86_64"))]
    Fence,
}

impl CacheFlush {
    #[cfg(target_arch = "x86_64")]
    fn detect() -> Self {
        let max = core::arch::x86_64::__cpuid(0).eax;
        if max >= 7 {
            let ebx = core::arch::x86_64::__cpuid_count(7, 0).ebx;
            if ebx & (1 << 24) != 0 {
                return CacheFlush::Clwb;
            }
            if ebx & (1 << 23) != 0 {
                return CacheFlush::Clflushopt;
            }
        }
        CacheFlush::Clflush
    }
    #[cfg(not(target_arch = "x86_64"))]
    fn detect() -> Self {
        CacheFlush::Fence
    }

    /// Writes back every cache line of `[ptr, ptr + len)` and fences.
    ///
    /// # Safety
    /// The range must be mapped memory of this process.
    unsafe fn write_back(self, ptr: *const u8, len: usize) {
        let line = 64usize;
        let start = (ptr as usize) & !(line - 1);
        let end = ptr as usize + len;
        #[cfg(target_arch = "x86_64")]
        {
            let mut p = start;
            while p < end {
                // SAFETY: `p` points into the caller's mapped range (rounded down to its
                // cache line, which is mapped too); these instructions only write back.
                unsafe {
                    match self {
                        CacheFlush::Clwb => {
                            core::arch::asm!("clwb [{0}]", in(reg) p, options(nostack, preserves_flags))
                        }
                        CacheFlush::Clflushopt => {
                            core::arch::asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags))
                        }
                        CacheFlush::Clflush => core::arch::x86_64::_mm_clflush(p as *const u8),
                    }
                }
                p += line;
            }
            // SAFETY: sfence has no preconditions.
            unsafe { core::arch::x86_64::_mm_sfence() };
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (start, end);
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// A region in process memory, for tests and the simulator.
#[derive(Debug, Clone)]
pub struct MemNvram {
    bytes: Vec<u8>,
    pub persist_calls: u64,
}

impl MemNvram {
    pub fn new(len: usize) -> Self {
        Self { bytes: vec![0; len], persist_calls: 0 }
    }
}

impl Nvram for MemNvram {
    fn len(&self) -> usize {
        self.bytes.len()
    }
    fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
    fn persist(&mut self, offset: usize, len: usize) -> io::Result<()> {
        assert!(offset + len <= self.bytes.len());
        self.persist_calls += 1;
        Ok(())
    }
}

impl<T: Nvram + ?Sized> Nvram for Box<T> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn bytes(&self) -> &[u8] {
        (**self).bytes()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        (**self).bytes_mut()
    }
    fn persist(&mut self, offset: usize, len: usize) -> io::Result<()> {
        (**self).persist(offset, len)
    }
    fn persist_waits_for_device(&self) -> bool {
        (**self).persist_waits_for_device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses() {
        let s: NvramSpec = "file-sync:/tmp/x".parse().unwrap();
        assert_eq!(s.mode, NvramMode::FileSync);
        assert_eq!(s.dir, PathBuf::from("/tmp/x"));
        assert_eq!("direct:/srv/log".parse::<NvramSpec>().unwrap().mode, NvramMode::Direct);
        assert!("bogus:/x".parse::<NvramSpec>().is_err());
        assert!("file:".parse::<NvramSpec>().is_err());
        assert!("nocolon".parse::<NvramSpec>().is_err());
    }

    #[test]
    fn mapped_file_survives_reopen_in_both_file_modes() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [NvramMode::File, NvramMode::FileSync] {
            let path = dir.path().join(mode.as_str());
            {
                let mut r = MappedNvram::open(&path, 1 << 16, mode).unwrap();
                r.bytes_mut()[5000..5004].copy_from_slice(b"abcd");
                r.persist(5000, 4).unwrap();
            }
            let r = MappedNvram::open(&path, 1 << 16, mode).unwrap();
            assert_eq!(&r.bytes()[5000..5004], b"abcd");
            assert!(MappedNvram::open(&path, 1 << 17, mode).is_err(), "resize must be refused");
        }
    }

    #[test]
    fn dax_mode_is_refused_off_a_dax_mount() {
        let dir = tempfile::tempdir().unwrap();
        let err = MappedNvram::open(&dir.path().join("d"), 1 << 16, NvramMode::Dax);
        // tmpfs and ordinary filesystems refuse MAP_SYNC; DAX mode is tested in hw-tests.
        assert!(err.is_err(), "MAP_SYNC unexpectedly succeeded off a DAX mount");
    }
}
