//! Block devices: where volumes live.
//!
//! The mirror logic reads and writes volumes only through [`BlockDevice`]. Engines: a
//! plain file or block device through `pread`/`pwrite` ([`FileDevice`]), io_uring with
//! O_DIRECT and registered buffers ([`UringDevice`]), NVMe passthrough through io_uring
//! `uring_cmd` on a `/dev/ngXnY` char device ([`NvmeDevice`]), and process memory for
//! tests ([`MemDevice`]). The RAID-4 layer (`crate::raid`) is itself a `BlockDevice` over
//! member devices of any engine. Each disk names its engine in a [`DiskSpec`].

pub mod fault;
mod file;
mod mem;
mod nvme;
mod uring;

pub use fault::{FaultDevice, FaultPlan};
pub use file::FileDevice;
pub use mem::MemDevice;
pub use nvme::NvmeDevice;
pub use uring::{UringDevice, URING_BUFFERS, URING_BUFFER_BYTES};

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::format::BLOCK_BYTES;

/// A storage engine's fail-stop guard: once an I/O it started fails, the device refuses
/// every later one, so that nothing reads back what a failed write left behind (RAID-4
/// then takes the member as failed). Requests refused before any I/O (misaligned, out of
/// range) do not pass through it and leave the device usable.
#[derive(Debug, Default)]
pub(crate) struct FailStop(AtomicBool);

impl FailStop {
    /// Refuses, naming the device at `path`, once an earlier I/O failed.
    pub(crate) fn check(&self, path: &Path) -> io::Result<()> {
        if self.0.load(Ordering::SeqCst) {
            return Err(io::Error::other(format!("{}: refusing I/O after an earlier I/O error", path.display())));
        }
        Ok(())
    }

    /// Passes `r` on, failing the device if it is an error.
    pub(crate) fn guard<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if r.is_err() {
            self.0.store(true, Ordering::SeqCst);
        }
        r
    }
}

/// Creates (or opens) a regular file of exactly `size` bytes, a positive multiple of the
/// block size: a new file is sized and synced, an existing one of another size refused.
pub(crate) fn create_sized_file(path: &Path, size: u64) -> io::Result<std::fs::File> {
    if size == 0 || !size.is_multiple_of(BLOCK_BYTES as u64) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("volume size {size} is not a positive multiple of {BLOCK_BYTES}"),
        ));
    }
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
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
    Ok(file)
}

/// Makes the file or block device `file` (at `path`) hold at least `size` bytes, then
/// raises the engine's `usable` size to it: a regular file shorter than that is extended
/// (the new bytes read as zeroes) and synced, so that a crash never finds it shorter again;
/// a block device must hold `size` already.
pub(crate) fn grow_file(
    file: &std::fs::File,
    path: &Path,
    size: u64,
    usable: &std::sync::atomic::AtomicU64,
) -> io::Result<()> {
    use std::io::Seek;
    if !size.is_multiple_of(BLOCK_BYTES as u64) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: size {size} is not a multiple of {BLOCK_BYTES}", path.display()),
        ));
    }
    let meta = file.metadata()?;
    if meta.file_type().is_file() {
        if meta.len() < size {
            file.set_len(size)?;
            file.sync_all()?;
        }
        usable.fetch_max(size, Ordering::AcqRel);
        return Ok(());
    }
    let holds = { file }.seek(io::SeekFrom::End(0))?;
    if holds < size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} holds {holds} bytes, {size} are needed (grow the device first)", path.display()),
        ));
    }
    usable.fetch_max(size, Ordering::AcqRel);
    Ok(())
}

/// One write of a batch: `buf` goes to `offset`.
#[derive(Debug, Clone, Copy)]
pub struct WriteOp<'a> {
    pub offset: u64,
    pub buf: &'a [u8],
}

/// One read of a batch: `buf` is filled from `offset`.
#[derive(Debug)]
pub struct ReadOp<'a> {
    pub offset: u64,
    pub buf: &'a mut [u8],
}

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
    /// Writes a batch; engines with a submission queue submit it in one go. Returns once
    /// every write has completed; on an error some writes of the batch may have landed.
    fn write_many(&self, ops: &[WriteOp<'_>]) -> io::Result<()> {
        ops.iter().try_for_each(|op| self.write_at(op.buf, op.offset))
    }
    /// Reads a batch; engines with a submission queue submit it in one go.
    fn read_many(&self, ops: &mut [ReadOp<'_>]) -> io::Result<()> {
        ops.iter_mut().try_for_each(|op| self.read_at(op.buf, op.offset))
    }
    /// Marks the start (`true`) and end (`false`) of a redo: rewriting, from a log, writes
    /// that a crash may have interrupted. While it lasts, engines with redundancy must not
    /// trust the redundancy of what they rewrite (the RAID layer recomputes parity from
    /// the data instead of updating it). Plain engines have nothing to do.
    fn set_redo(&self, on: bool) {
        let _ = on;
    }
    /// Marks the start (`true`) and end (`false`) of a copy over the whole device (a
    /// mirror's baseline, until it is done, across restarts): every block is to be
    /// written before anything trusts it. Engines with redundancy then take a row whose
    /// blocks fail their checks as it reads, where they would refuse it, so that the
    /// copy's writes can go on over what a crash tore (the RAID layer: rows of a volume
    /// found dirty and degraded). Plain engines have nothing to do.
    fn set_copy_over(&self, on: bool) {
        let _ = on;
    }
    /// Grows the device to `size` bytes (a multiple of [`BLOCK_BYTES`]); the new bytes
    /// read as zeroes where the engine makes them (a file extended), and hold whatever the
    /// medium held where it does not (a block device: the caller zeroes what it uses). A
    /// size at or below the current one changes nothing. Engines of a fixed size refuse.
    fn grow(&self, size: u64) -> io::Result<()> {
        if size <= self.size() {
            return Ok(());
        }
        Err(io::Error::new(io::ErrorKind::Unsupported, "this storage engine cannot grow"))
    }
    /// Whether `[offset, offset + len)` may hold data: `false` only where the engine knows,
    /// without reading, that the range reads as zeroes (a hole of a sparse file). A copy to
    /// the mirror sends such a range as zeroes unread. `true`, the default, is always right.
    fn may_hold_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        let _ = (offset, len);
        Ok(true)
    }
}

/// [`BlockDevice::may_hold_data`] for a file: `false` when `lseek(SEEK_DATA)` finds no
/// data before the range's end. Where the file system or the file (a block device) cannot
/// say, `true`.
pub fn file_may_hold_data(file: &std::fs::File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let (Ok(at), Ok(end)) = (libc::off_t::try_from(offset), libc::off_t::try_from(offset.saturating_add(len))) else {
        return true;
    };
    // SAFETY: lseek on a descriptor this process owns; it changes only the file offset,
    // which the engines never use (they read and write at explicit offsets).
    let next = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
    if next < 0 {
        // ENXIO: no data at or after `offset`. Anything else: unknown.
        return io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO);
    }
    next < end
}

impl<T: BlockDevice + ?Sized> BlockDevice for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn write_many(&self, ops: &[WriteOp<'_>]) -> io::Result<()> {
        (**self).write_many(ops)
    }
    fn read_many(&self, ops: &mut [ReadOp<'_>]) -> io::Result<()> {
        (**self).read_many(ops)
    }
    fn set_redo(&self, on: bool) {
        (**self).set_redo(on)
    }
    fn may_hold_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        (**self).may_hold_data(offset, len)
    }
    fn grow(&self, size: u64) -> io::Result<()> {
        (**self).grow(size)
    }
    fn set_copy_over(&self, on: bool) {
        (**self).set_copy_over(on)
    }
}

/// What a flush of a volume's disks must reach. A node chooses once, at start, from its
/// NVRAM mode: the volumes need be no more durable than the log they are written from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushReach {
    /// The device's stable storage (`fdatasync`, an NVMe flush): what survives power loss.
    /// The default, and what every power-safe NVRAM mode needs.
    Device,
    /// What the process has handed to the kernel: a flush has nothing to wait for. It is
    /// what the `file:` NVRAM mode promises (a killed process loses nothing; a power cut
    /// may lose what the page cache held, the log's last entries included), so CPs under
    /// it cost no device round trip.
    Kernel,
}

static FLUSH_TO_KERNEL_ONLY: AtomicBool = AtomicBool::new(false);

/// Sets what flushes of disks opened from now on must reach (see [`FlushReach`]).
pub fn set_flush_reach(reach: FlushReach) {
    FLUSH_TO_KERNEL_ONLY.store(reach == FlushReach::Kernel, Ordering::SeqCst);
}

/// What flushes of newly opened disks reach.
pub fn flush_reach() -> FlushReach {
    if FLUSH_TO_KERNEL_ONLY.load(Ordering::SeqCst) {
        FlushReach::Kernel
    } else {
        FlushReach::Device
    }
}

/// A disk whose flushes reach the kernel only ([`FlushReach::Kernel`]): every write and
/// read goes to the engine beneath, a flush checks nothing more is owed and returns.
struct KernelFlush(Arc<dyn BlockDevice>);

impl BlockDevice for KernelFlush {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        // Every write returned only once the engine completed it: the kernel has it.
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.write_zeroes(offset, len)
    }
    fn grow(&self, size: u64) -> io::Result<()> {
        self.0.grow(size)
    }
    fn set_copy_over(&self, on: bool) {
        self.0.set_copy_over(on)
    }
    fn write_many(&self, ops: &[WriteOp<'_>]) -> io::Result<()> {
        self.0.write_many(ops)
    }
    fn read_many(&self, ops: &mut [ReadOp<'_>]) -> io::Result<()> {
        self.0.read_many(ops)
    }
    fn set_redo(&self, on: bool) {
        self.0.set_redo(on)
    }
    fn may_hold_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.0.may_hold_data(offset, len)
    }
}

/// Marks a redo on a device for as long as it lives (see [`BlockDevice::set_redo`]).
pub struct RedoGuard<'a>(&'a dyn BlockDevice);

impl<'a> RedoGuard<'a> {
    pub fn new(dev: &'a dyn BlockDevice) -> Self {
        dev.set_redo(true);
        Self(dev)
    }
}

impl Drop for RedoGuard<'_> {
    fn drop(&mut self) {
        self.0.set_redo(false);
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

/// The I/O engine of one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// `pread`/`pwrite` on a file or block device, through the page cache.
    Pread,
    /// io_uring, O_DIRECT, registered buffers, batched submission.
    Uring,
    /// NVMe read/write commands through io_uring `uring_cmd` on a `/dev/ngXnY` char device.
    Nvme,
}

impl Engine {
    pub const fn name(self) -> &'static str {
        match self {
            Engine::Pread => "pread",
            Engine::Uring => "uring",
            Engine::Nvme => "nvme",
        }
    }
}

/// A disk as given on the command line: `[ENGINE:]PATH`, the engine one of `pread`,
/// `uring`, `nvme`. Without a prefix: `nvme` for an NVMe char device (`/dev/ngXnY`),
/// `pread` otherwise.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskSpec {
    pub engine: Engine,
    pub path: PathBuf,
}

impl DiskSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (engine, path) = match s.split_once(':') {
            Some(("pread", p)) => (Some(Engine::Pread), p),
            Some(("uring", p)) => (Some(Engine::Uring), p),
            Some(("nvme", p)) => (Some(Engine::Nvme), p),
            _ => (None, s),
        };
        if path.is_empty() {
            return Err(format!("disk {s:?} names no path (expected [pread:|uring:|nvme:]PATH)"));
        }
        let path = PathBuf::from(path);
        let engine = engine.unwrap_or_else(|| if is_nvme_char_device(&path) { Engine::Nvme } else { Engine::Pread });
        Ok(Self { engine, path })
    }

    /// Opens the disk, creating a regular file of `size` bytes where none exists (never for
    /// NVMe). `size: None` opens an existing disk at its own size.
    /// Opens (or, given a size, creates) the disk with its engine; its flushes reach what
    /// [`flush_reach`] says.
    pub fn open(&self, size: Option<u64>) -> io::Result<Arc<dyn BlockDevice>> {
        let dev: Arc<dyn BlockDevice> = match self.engine {
            Engine::Pread => Arc::new(match size {
                Some(size) => FileDevice::create(&self.path, size)?,
                None => FileDevice::open(&self.path)?,
            }),
            Engine::Uring => Arc::new(match size {
                Some(size) => UringDevice::create(&self.path, size)?,
                None => UringDevice::open(&self.path)?,
            }),
            Engine::Nvme => Arc::new(NvmeDevice::open(&self.path, size)?),
        };
        Ok(match flush_reach() {
            FlushReach::Device => dev,
            FlushReach::Kernel => Arc::new(KernelFlush(dev)),
        })
    }
}

impl fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.engine.name(), self.path.display())
    }
}

/// `/dev/ngXnY`: the NVMe generic char device of a namespace.
fn is_nvme_char_device(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        n.starts_with("ng") && n[2..].split_once('n').is_some_and(|(a, b)| !a.is_empty() && !b.is_empty())
    })
}

/// Writes `ops` (disjoint ranges) through `writer` in one `write_many` and flushes it,
/// records them in `model`, then reads them back through `reader` in one `read_many` and
/// checks each against what was written.
#[cfg(test)]
pub(crate) fn write_then_read_back(
    writer: &dyn BlockDevice,
    reader: &dyn BlockDevice,
    ops: &[(u64, Vec<u8>)],
    model: &mut [u8],
) {
    let wops: Vec<WriteOp<'_>> = ops.iter().map(|(o, d)| WriteOp { offset: *o, buf: d }).collect();
    writer.write_many(&wops).unwrap();
    writer.flush().unwrap();
    for (o, d) in ops {
        model[crate::usize_of(*o)..crate::usize_of(*o) + d.len()].copy_from_slice(d);
    }
    let mut bufs: Vec<Vec<u8>> = ops.iter().map(|(_, d)| vec![0; d.len()]).collect();
    let mut rops: Vec<ReadOp<'_>> =
        ops.iter().zip(bufs.iter_mut()).map(|((o, _), b)| ReadOp { offset: *o, buf: b }).collect();
    reader.read_many(&mut rops).unwrap();
    for ((o, d), b) in ops.iter().zip(&bufs) {
        assert!(d == b, "the {} bytes at {o} read back differ from those written", d.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs_parse() {
        let d = DiskSpec::parse("uring:/tmp/a").unwrap();
        assert_eq!((d.engine, d.path.as_path()), (Engine::Uring, Path::new("/tmp/a")));
        assert_eq!(DiskSpec::parse("/tmp/b").unwrap().engine, Engine::Pread);
        assert_eq!(DiskSpec::parse("/dev/ng0n1").unwrap().engine, Engine::Nvme);
        assert_eq!(DiskSpec::parse("pread:/dev/ng0n1").unwrap().engine, Engine::Pread);
        assert_eq!(DiskSpec::parse("/dev/nvme0n1").unwrap().engine, Engine::Pread);
        // An unknown prefix is part of the path, as in `./a:b`.
        assert_eq!(DiskSpec::parse("x:y").unwrap().path, Path::new("x:y"));
        assert!(DiskSpec::parse("uring:").is_err());
        assert_eq!(DiskSpec::parse("nvme:/dev/ng1n2").unwrap().to_string(), "nvme:/dev/ng1n2");
    }
}
