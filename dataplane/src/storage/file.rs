use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{check_range, BlockDevice, ReadOp, WriteOp};

/// A regular file or a block device, through `pread`/`pwrite`.
///
/// Fails stop: after one I/O error every later call is refused, so a volume never carries
/// on half-written.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    /// Grows ([`BlockDevice::grow`]), never shrinks.
    size: AtomicU64,
    failed: super::FailStop,
}

impl FileDevice {
    /// Creates (or opens) a file of exactly `size` bytes.
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        let file = super::create_sized_file(path, size)?;
        Ok(Self::with_random_access(file, path, size))
    }

    /// Volumes are read and written at random 4 KiB blocks: readahead would only pull
    /// whole large folios into the page cache, and every later 4 KiB write into a large
    /// folio costs the kernel a walk of all its buffers (measured: the CP write-out of a
    /// mirrored volume, whose baseline had read it end to end, took 3x the CPU per block of
    /// an unmirrored one). The hint is advisory; where it fails nothing else changes.
    fn with_random_access(file: File, path: &Path, size: u64) -> Self {
        // SAFETY: fadvise takes a valid descriptor (the open `file`) and plain integers.
        let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        Self { file, path: path.to_path_buf(), size: AtomicU64::new(size), failed: super::FailStop::default() }
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
        Ok(Self::with_random_access(file, path, size))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn grow(&self, size: u64) -> io::Result<()> {
        self.failed.check(&self.path)?;
        super::grow_file(&self.file, &self.path, size, &self.size)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.failed.check(&self.path)?;
        check_range(self.size(), offset, buf.len() as u64)?;
        self.failed.guard(self.file.read_exact_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.failed.check(&self.path)?;
        check_range(self.size(), offset, buf.len() as u64)?;
        let r = self.pwritev_all(&mut [IoSlice::new(buf)], offset);
        self.failed.guard(r)
    }
    fn flush(&self) -> io::Result<()> {
        self.failed.check(&self.path)?;
        self.failed.guard(self.file.sync_data())
    }
    fn may_hold_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.failed.check(&self.path)?;
        Ok(super::file_may_hold_data(&self.file, offset, len))
    }
    /// Adjacent writes go out in one `pwritev`.
    fn write_many(&self, ops: &[WriteOp<'_>]) -> io::Result<()> {
        self.failed.check(&self.path)?;
        for op in ops {
            check_range(self.size(), op.offset, op.buf.len() as u64)?;
        }
        for run in runs(ops.iter().map(|op| (op.offset, op.buf.len()))) {
            let mut iov: Vec<IoSlice<'_>> = ops[run.clone()].iter().map(|op| IoSlice::new(op.buf)).collect();
            let r = self.pwritev_all(&mut iov, ops[run.start].offset);
            self.failed.guard(r)?;
        }
        Ok(())
    }
    /// Adjacent reads come in with one `preadv`.
    fn read_many(&self, ops: &mut [ReadOp<'_>]) -> io::Result<()> {
        self.failed.check(&self.path)?;
        for op in ops.iter() {
            check_range(self.size(), op.offset, op.buf.len() as u64)?;
        }
        for run in runs(ops.iter().map(|op| (op.offset, op.buf.len()))) {
            let offset = ops[run.start].offset;
            let mut iov: Vec<IoSliceMut<'_>> = ops[run].iter_mut().map(|op| IoSliceMut::new(op.buf)).collect();
            let r = self.preadv_all(&mut iov, offset);
            self.failed.guard(r)?;
        }
        Ok(())
    }
}

/// The most buffers one `pwritev`/`preadv` takes (Linux's IOV_MAX).
const IOV_MAX: usize = 1024;

/// The most bytes one `pwritev` writes. The kernel sizes the page-cache folio a buffered
/// write creates by the write's length, up to 2 MiB, and every later 4 KiB write into a
/// folio costs ext4 a walk of all its buffer heads; volumes take 4 KiB writes at random. So
/// a large write (a baseline's, a resync's, a CP's run of adjacent blocks) is cut into calls
/// of this size. Measured here (ext4, random 4 KiB `pwrite`s into a 256 MiB file, from
/// Python, so about 1 us of each is the interpreter's), by the size of the writes that
/// filled the file: 1 MiB 10.0 us, 64 KiB 2.7 us, 32 KiB 2.3 us, 16 KiB 2.1 us, 4 KiB 1.7
/// us; on a mirror's CP after a baseline of 1 MiB writes, at queue depth 32, the walk
/// (`ext4_block_write_begin`, `mark_buffer_dirty`) took 9% of the machine's CPU. 16 KiB
/// keeps most of the gain at a quarter of the calls of 4 KiB.
const WRITE_CALL_BYTES_MAX: usize = 16 << 10;

/// Index ranges of `ops` (offset, length) whose byte ranges follow one another.
fn runs(ops: impl Iterator<Item = (u64, usize)>) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let mut end = 0u64;
    for (i, (offset, len)) in ops.enumerate() {
        match out.last_mut() {
            Some(r) if offset == end && r.len() < IOV_MAX => r.end = i + 1,
            _ => out.push(i..i + 1),
        }
        end = offset + len as u64;
    }
    out
}

fn off_t(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

fn iov_count(n: usize) -> libc::c_int {
    // At most IOV_MAX, see `runs`.
    libc::c_int::try_from(n).expect("at most IOV_MAX buffers")
}

/// What a `pwritev` or `preadv` that returned `n` moved: `None` when a signal interrupted
/// it (call again), an error when it failed or moved nothing (`none`, `why`).
fn transferred(n: isize, none: io::ErrorKind, why: &'static str) -> io::Result<Option<usize>> {
    match n {
        0 => Err(io::Error::new(none, why)),
        n if n > 0 => Ok(Some(n.unsigned_abs())),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

impl FileDevice {
    fn pwritev_all(&self, mut iov: &mut [IoSlice<'_>], mut offset: u64) -> io::Result<()> {
        while !iov.is_empty() {
            // At most WRITE_CALL_BYTES_MAX per call: the buffers that fit whole, or the
            // first piece of a larger first one.
            let (mut fit, mut bytes) = (0usize, 0usize);
            while fit < iov.len() && bytes + iov[fit].len() <= WRITE_CALL_BYTES_MAX {
                bytes += iov[fit].len();
                fit += 1;
            }
            let first_piece = [IoSlice::new(&iov[0][..iov[0].len().min(WRITE_CALL_BYTES_MAX)])];
            let call: &[IoSlice<'_>] = if fit == 0 { &first_piece } else { &iov[..fit] };
            let at = off_t(offset)?;
            // SAFETY: `IoSlice` is ABI-compatible with `struct iovec` on Unix, and every
            // buffer it points to is borrowed for the whole call.
            let n = unsafe { libc::pwritev(self.file.as_raw_fd(), call.as_ptr().cast(), iov_count(call.len()), at) };
            let Some(n) = transferred(n, io::ErrorKind::WriteZero, "pwritev wrote nothing")? else { continue };
            offset += n as u64;
            IoSlice::advance_slices(&mut iov, n);
        }
        Ok(())
    }

    fn preadv_all(&self, mut iov: &mut [IoSliceMut<'_>], mut offset: u64) -> io::Result<()> {
        while !iov.is_empty() {
            let at = off_t(offset)?;
            // SAFETY: `IoSliceMut` is ABI-compatible with `struct iovec` on Unix, and every
            // buffer it points to is borrowed mutably for the whole call.
            let n = unsafe { libc::preadv(self.file.as_raw_fd(), iov.as_ptr().cast(), iov_count(iov.len()), at) };
            let Some(n) = transferred(n, io::ErrorKind::UnexpectedEof, "preadv reached the end of the file")? else {
                continue;
            };
            offset += n as u64;
            IoSliceMut::advance_slices(&mut iov, n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn batches_read_back_what_single_writes_wrote_and_vice_versa() {
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-tmp");
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::tempdir_in(base).unwrap();
        let size = 256 * 4096u64;
        let dev = FileDevice::create(&dir.path().join("f"), size).unwrap();
        let mut model = vec![0u8; 256 * 4096];
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..50 {
            // A batch of adjacent and scattered ops of odd lengths.
            let mut ops = Vec::new();
            let mut at = rng.gen_range(0..size / 2);
            for _ in 0..rng.gen_range(1..40) {
                let len = rng.gen_range(1..9000u64).min(size - at);
                if len == 0 {
                    break;
                }
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                ops.push((at, data));
                at += len + if rng.gen_bool(0.7) { 0 } else { rng.gen_range(1..5000) };
                if at >= size {
                    break;
                }
            }
            crate::storage::write_then_read_back(&dev, &dev, &ops, &mut model);
        }
        let mut all = vec![0u8; model.len()];
        dev.read_at(&mut all, 0).unwrap();
        assert_eq!(all, model);
        let err = dev.write_many(&[WriteOp { offset: size - 10, buf: &[0; 20] }]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(runs([(0, 10), (10, 5), (20, 1), (21, 1)].into_iter()), vec![0..2, 2..4]);
    }
}
