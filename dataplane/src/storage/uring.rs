//! The io_uring engine: O_DIRECT, registered buffers, batched submission.
//!
//! Each device owns one ring and a pool of page-aligned buffers registered with it, so the
//! kernel maps them once instead of per I/O (`IORING_OP_{READ,WRITE}_FIXED`). A batch
//! ([`BlockDevice::write_many`], [`BlockDevice::read_many`]) is cut into chunks of at most
//! one buffer; the chunks go out in waves of up to one per buffer, each wave with a single
//! `io_uring_enter` that submits it and waits for all of it. Callers' buffers are copied
//! into (or out of) the registered ones: they are neither aligned for O_DIRECT nor
//! registered. [`UringDevice::write_stream`] keeps a fixed number of writes in flight
//! instead of waiting for whole waves (what a benchmark at a queue depth, or fio, does).
//!
//! The ring is behind a mutex: a device is used from one thread at a time (the RAID layer
//! writes its members side by side, one thread each). Fails stop after an I/O error, like
//! [`super::FileDevice`].

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use io_uring::{opcode, types, IoUring};
use parking_lot::Mutex;

use super::{check_range, BlockDevice, ReadOp, WriteOp};
use crate::format::BLOCK_BYTES;

/// Registered buffers per device, and so the most I/Os a wave holds.
pub const URING_BUFFERS: usize = 32;
/// Bytes per registered buffer: the largest single I/O.
pub const URING_BUFFER_BYTES: usize = 256 << 10;
/// Entries of the submission queue.
const RING_ENTRIES: u32 = 64;
const ALIGN: usize = BLOCK_BYTES;
const _: () = assert!(URING_BUFFERS <= RING_ENTRIES as usize && URING_BUFFER_BYTES.is_multiple_of(ALIGN));

/// One page-aligned heap buffer, registered with a ring for the ring's whole life.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain heap memory owned by this value; access to it is serialized
// by the owner (the device's mutex).
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len, ALIGN).expect("valid layout");
        // SAFETY: `layout` has a non-zero size (asserted by callers' constants).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Self { ptr, len }
    }
    pub(crate) fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    pub(crate) fn slice(&self, len: usize) -> &[u8] {
        assert!(len <= self.len);
        // SAFETY: the allocation holds `self.len` initialized bytes; no I/O is in flight on
        // it while it is read here (waves are waited for before their buffers are touched).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len) }
    }
    pub(crate) fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.len);
        // SAFETY: as `slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len) }
    }
    pub(crate) fn iovec(&self) -> libc::iovec {
        libc::iovec { iov_base: self.ptr.as_ptr().cast(), iov_len: self.len }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, ALIGN).expect("valid layout");
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// A ring and the buffers registered with it.
pub(super) struct RingBufs<R> {
    pub(super) ring: R,
    /// Declared after the ring: dropped after it, so never while registered.
    pub(super) bufs: Vec<AlignedBuf>,
    /// Entries pushed whose completions have not been reaped. Zero between calls unless a
    /// call failed in the ring itself (not in an I/O); see `Drop`.
    pub(super) inflight: usize,
}

impl<R> Drop for RingBufs<R> {
    fn drop(&mut self) {
        // The kernel tears a ring down asynchronously: I/O still in flight when the fd
        // closes may write (or DMA) into its buffers afterwards. Such buffers are leaked,
        // never handed back to the allocator (this happens only after the ring itself
        // failed).
        if self.inflight != 0 {
            std::mem::forget(std::mem::take(&mut self.bufs));
        }
    }
}

type Ring = RingBufs<IoUring>;

/// `io_uring_enter` submitting what is queued and waiting for `want` completions, again
/// when a signal interrupts the wait (the entries stay queued until the kernel takes them,
/// so entering again never submits one twice).
pub(crate) fn submit_and_wait(submitter: io_uring::Submitter<'_>, want: usize) -> io::Result<()> {
    loop {
        match submitter.submit_and_wait(want) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("io_uring_enter: {e}"))),
            Ok(_) => return Ok(()),
        }
    }
}

/// A regular file or block device through io_uring with O_DIRECT.
pub struct UringDevice {
    path: PathBuf,
    /// Grows ([`BlockDevice::grow`]), never shrinks.
    size: AtomicU64,
    /// Kept open for the ring's fd.
    file: File,
    ring: Mutex<Ring>,
    failed: super::FailStop,
}

/// One piece of a batch, at most one buffer long.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    /// Index of the caller's op.
    op: usize,
    /// Offset of this piece in the caller's buffer.
    at: usize,
    len: usize,
    offset: u64,
}

fn misaligned(what: &str, v: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("the io_uring engine does O_DIRECT I/O: {what} {v} is not a multiple of {ALIGN} bytes"),
    )
}

fn chunks(spans: impl Iterator<Item = (u64, usize)>) -> io::Result<Vec<Chunk>> {
    let mut out = Vec::new();
    for (op, (offset, len)) in spans.enumerate() {
        if !offset.is_multiple_of(ALIGN as u64) {
            return Err(misaligned("offset", offset));
        }
        if !len.is_multiple_of(ALIGN) {
            return Err(misaligned("length", len as u64));
        }
        let mut at = 0;
        while at < len {
            let n = (len - at).min(URING_BUFFER_BYTES);
            out.push(Chunk { op, at, len: n, offset: offset + at as u64 });
            at += n;
        }
    }
    Ok(out)
}

impl UringDevice {
    /// Creates (or opens) a regular file of exactly `size` bytes.
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        drop(super::create_sized_file(path, size)?);
        Self::open(path)
    }

    /// Opens an existing file or block device at its current size.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path).map_err(|e| {
            if e.raw_os_error() == Some(libc::EINVAL) {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{}: the filesystem refuses O_DIRECT (tmpfs does); the io_uring engine needs it, use pread: here",
                        path.display()
                    ),
                )
            } else {
                e
            }
        })?;
        let size = {
            use std::io::Seek;
            // Only whole blocks can be addressed with O_DIRECT: a partial last block (a
            // block device of 512-byte sectors, an odd file) is left out.
            (&file).seek(io::SeekFrom::End(0))? / BLOCK_BYTES as u64 * BLOCK_BYTES as u64
        };
        if size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: smaller than one {BLOCK_BYTES}-byte block", path.display()),
            ));
        }
        let ring = IoUring::new(RING_ENTRIES)?;
        let bufs: Vec<AlignedBuf> = (0..URING_BUFFERS).map(|_| AlignedBuf::new(URING_BUFFER_BYTES)).collect();
        let iovecs: Vec<libc::iovec> = bufs.iter().map(AlignedBuf::iovec).collect();
        // SAFETY: the buffers live in `Ring` beside the ring, declared after it, so they
        // outlive the registration (unregistered when the ring's fd closes).
        unsafe { ring.submitter().register_buffers(&iovecs) }
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring: register buffers: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            size: AtomicU64::new(size),
            file,
            ring: Mutex::new(Ring { ring, bufs, inflight: 0 }),
            failed: super::FailStop::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }

    /// Runs `chunks` in waves: `fill` copies a write chunk into its buffer, `drain` copies a
    /// read chunk out of it. Every completion of a wave is reaped and checked before the
    /// wave's buffers are touched again or an error is returned; a short transfer goes out
    /// again for its remainder, a transfer of nothing is an error.
    fn run(
        &self,
        write: bool,
        chunks: &[Chunk],
        mut fill: impl FnMut(&Chunk, &mut [u8]),
        mut drain: impl FnMut(&Chunk, &[u8]),
    ) -> io::Result<()> {
        let what = if write { "write" } else { "read" };
        let mut r = self.ring.lock();
        let Ring { ring, bufs, inflight } = &mut *r;
        for wave in chunks.chunks(URING_BUFFERS) {
            for (i, c) in wave.iter().enumerate() {
                if write {
                    fill(c, bufs[i].slice_mut(c.len));
                }
            }
            // (chunk index in the wave, bytes done) for every chunk still to finish.
            let mut pending: Vec<(usize, usize)> = (0..wave.len()).map(|i| (i, 0)).collect();
            while !pending.is_empty() {
                for &(i, done) in &pending {
                    let c = &wave[i];
                    let ptr = bufs[i].as_mut_ptr().wrapping_add(done);
                    let len = u32::try_from(c.len - done).expect("at most one buffer");
                    let index = u16::try_from(i).expect("few buffers");
                    let sqe = if write {
                        opcode::WriteFixed::new(self.fd(), ptr, len, index).offset(c.offset + done as u64).build()
                    } else {
                        opcode::ReadFixed::new(self.fd(), ptr, len, index).offset(c.offset + done as u64).build()
                    }
                    .user_data(i as u64);
                    // SAFETY: the buffer (registered, index `i`, `len` bytes from `ptr`
                    // within it) stays alive and untouched until this entry's completion
                    // is reaped below; `inflight` counts it until then, and a ring dropped
                    // with entries in flight leaks its buffers rather than free them.
                    unsafe { ring.submission().push(&sqe) }
                        .expect("the submission queue holds a whole wave (URING_BUFFERS <= RING_ENTRIES)");
                    *inflight += 1;
                }
                let want = pending.len();
                submit_and_wait(ring.submitter(), want)?;
                let mut next = Vec::new();
                let mut first_err: Option<io::Error> = None;
                let mut seen = 0;
                while seen < want {
                    let cqe = ring.completion().next();
                    let Some(cqe) = cqe else {
                        submit_and_wait(ring.submitter(), want - seen)?;
                        continue;
                    };
                    seen += 1;
                    *inflight -= 1;
                    let i = usize::try_from(cqe.user_data()).expect("a wave index");
                    let done = pending.iter().find(|(j, _)| *j == i).map_or(0, |(_, d)| *d);
                    let c = &wave[i];
                    let res = cqe.result();
                    let err = if res < 0 {
                        let e = io::Error::from_raw_os_error(-res);
                        Some(io::Error::new(
                            e.kind(),
                            format!(
                                "{}: io_uring {what} of {} bytes at {}: {e}",
                                self.path.display(),
                                c.len - done,
                                c.offset + done as u64
                            ),
                        ))
                    } else if res == 0 {
                        Some(io::Error::new(
                            if write { io::ErrorKind::WriteZero } else { io::ErrorKind::UnexpectedEof },
                            format!(
                                "{}: io_uring {what} transferred nothing at {}",
                                self.path.display(),
                                c.offset + done as u64
                            ),
                        ))
                    } else {
                        let n = done + usize::try_from(res).expect("positive");
                        if n < c.len {
                            // Short: the rest goes again.
                            next.push((i, n));
                        }
                        None
                    };
                    if first_err.is_none() {
                        first_err = err;
                    }
                }
                if let Some(e) = first_err {
                    return Err(e);
                }
                pending = next;
            }
            if !write {
                for (i, c) in wave.iter().enumerate() {
                    drain(c, bufs[i].slice(c.len));
                }
            }
        }
        Ok(())
    }

    /// Writes `count` blocks of `data` (one I/O each, `data.len()` bytes, at most one
    /// buffer) at the offsets `next_offset` gives, keeping `depth` writes in flight: a new
    /// write goes out as soon as any completes. Returns each write's latency in
    /// nanoseconds, in completion order, through `done`.
    pub fn write_stream(
        &self,
        data: &[u8],
        count: u64,
        depth: usize,
        mut next_offset: impl FnMut() -> u64,
        mut done: impl FnMut(u64),
    ) -> io::Result<()> {
        self.failed.check(&self.path)?;
        if data.len() > URING_BUFFER_BYTES || !data.len().is_multiple_of(ALIGN) || data.is_empty() {
            return Err(misaligned("length", data.len() as u64));
        }
        let depth = depth.clamp(1, URING_BUFFERS);
        let mut r = self.ring.lock();
        let Ring { ring, bufs, inflight } = &mut *r;
        for b in bufs.iter_mut().take(depth) {
            b.slice_mut(data.len()).copy_from_slice(data);
        }
        let len = u32::try_from(data.len()).expect("at most one buffer");
        let mut started = vec![std::time::Instant::now(); depth];
        let mut free: Vec<usize> = (0..depth).collect();
        let (mut sent, mut finished) = (0u64, 0u64);
        // Set when a write is refused before it starts (a bad offset): the device stays usable.
        let mut refused = false;
        let mut result = (|| -> io::Result<()> {
            while finished < count {
                // Every free buffer gets a write, and each goes to the kernel on its own:
                // the device sees a steady trickle rather than bursts of a whole queue
                // (measured: bursts completed together, and took longer each).
                while sent < count {
                    let Some(&i) = free.last() else { break };
                    let offset = next_offset();
                    refused = true;
                    check_range(self.size(), offset, data.len() as u64)?;
                    if !offset.is_multiple_of(ALIGN as u64) {
                        return Err(misaligned("offset", offset));
                    }
                    refused = false;
                    free.pop();
                    let index = u16::try_from(i).expect("few buffers");
                    let sqe = opcode::WriteFixed::new(self.fd(), bufs[i].as_mut_ptr(), len, index)
                        .offset(offset)
                        .build()
                        .user_data(i as u64);
                    started[i] = std::time::Instant::now();
                    // SAFETY: buffer `i` is registered and not reused (it is off the free
                    // list) until its completion is reaped below; `inflight` counts it
                    // until then.
                    unsafe { ring.submission().push(&sqe) }
                        .expect("the submission queue holds every buffer (URING_BUFFERS <= RING_ENTRIES)");
                    *inflight += 1;
                    submit_and_wait(ring.submitter(), 0)?;
                    sent += 1;
                }
                if ring.completion().is_empty() {
                    submit_and_wait(ring.submitter(), 1)?;
                }
                // One completion at a time, its replacement submitted before the next.
                let cqe = ring.completion().next();
                let Some(cqe) = cqe else { continue };
                *inflight -= 1;
                let i = usize::try_from(cqe.user_data()).expect("a buffer index");
                free.push(i);
                let res = cqe.result();
                if res < 0 {
                    let e = io::Error::from_raw_os_error(-res);
                    return Err(io::Error::new(e.kind(), format!("{}: io_uring write: {e}", self.path.display())));
                }
                if usize::try_from(res).ok() != Some(data.len()) {
                    // A stream does not split writes: a short one is an error here.
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("{}: short io_uring write: {res} of {} bytes", self.path.display(), data.len()),
                    ));
                }
                done(u64::try_from(started[i].elapsed().as_nanos()).unwrap_or(u64::MAX));
                finished += 1;
            }
            Ok(())
        })();
        // Reap what is still in flight before the buffers can be reused.
        while *inflight > 0 {
            if let Err(e) = submit_and_wait(ring.submitter(), 1) {
                result = result.and(Err(e));
                break;
            }
            while ring.completion().next().is_some() {
                *inflight -= 1;
            }
        }
        let drained = *inflight == 0;
        drop(r);
        if refused && drained {
            return result;
        }
        self.failed.guard(result)
    }
}

impl BlockDevice for UringDevice {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn grow(&self, size: u64) -> io::Result<()> {
        self.failed.check(&self.path)?;
        super::grow_file(&self.file, &self.path, size, &self.size)
    }
    fn may_hold_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.failed.check(&self.path)?;
        Ok(super::file_may_hold_data(&self.file, offset, len))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_many(&mut [ReadOp { offset, buf }])
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_many(&[WriteOp { offset, buf }])
    }
    fn write_many(&self, ops: &[WriteOp<'_>]) -> io::Result<()> {
        self.failed.check(&self.path)?;
        for op in ops {
            check_range(self.size(), op.offset, op.buf.len() as u64)?;
        }
        let chunks = chunks(ops.iter().map(|op| (op.offset, op.buf.len())))?;
        let r = self.run(true, &chunks, |c, dst| dst.copy_from_slice(&ops[c.op].buf[c.at..c.at + c.len]), |_, _| {});
        self.failed.guard(r)
    }
    fn read_many(&self, ops: &mut [ReadOp<'_>]) -> io::Result<()> {
        self.failed.check(&self.path)?;
        for op in ops.iter() {
            check_range(self.size(), op.offset, op.buf.len() as u64)?;
        }
        let chunks = chunks(ops.iter().map(|op| (op.offset, op.buf.len())))?;
        let r = self.run(false, &chunks, |_, _| {}, |c, src| ops[c.op].buf[c.at..c.at + c.len].copy_from_slice(src));
        self.failed.guard(r)
    }
    fn flush(&self) -> io::Result<()> {
        self.failed.check(&self.path)?;
        let r = (|| {
            let mut r = self.ring.lock();
            let Ring { ring, inflight, .. } = &mut *r;
            let sqe = opcode::Fsync::new(self.fd()).flags(types::FsyncFlags::DATASYNC).build().user_data(u64::MAX);
            // SAFETY: an fsync references no memory.
            unsafe { ring.submission().push(&sqe) }.expect("the submission queue is empty between calls");
            *inflight += 1;
            loop {
                submit_and_wait(ring.submitter(), 1)?;
                let cqe = ring.completion().next();
                let Some(cqe) = cqe else { continue };
                *inflight -= 1;
                if cqe.result() < 0 {
                    let e = io::Error::from_raw_os_error(-cqe.result());
                    return Err(io::Error::new(e.kind(), format!("{}: io_uring fdatasync: {e}", self.path.display())));
                }
                return Ok(());
            }
        })();
        self.failed.guard(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::FileDevice;
    use rand::{Rng, SeedableRng};

    fn dir() -> tempfile::TempDir {
        // The repository's filesystem: /tmp may be a tmpfs, which refuses O_DIRECT.
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-tmp");
        std::fs::create_dir_all(&base).unwrap();
        tempfile::tempdir_in(base).unwrap()
    }

    #[test]
    fn batches_round_trip_with_the_pread_engine() {
        let d = dir();
        let path = d.path().join("u");
        let size = 4 << 20;
        let dev = UringDevice::create(&path, size).unwrap();
        let plain = FileDevice::open(&path).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut model = vec![0u8; crate::usize_of(size)];
        for round in 0..20 {
            // Disjoint random block-aligned ops, some larger than one registered buffer.
            let mut ops: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut at = rng.gen_range(0..64u64) * 4096;
            while ops.len() < 40 {
                let blocks = if rng.gen_bool(0.1) { rng.gen_range(60..100u64) } else { rng.gen_range(1..9u64) };
                if at + blocks * 4096 > size {
                    break;
                }
                ops.push((at, (0..blocks * 4096).map(|_| rng.gen()).collect()));
                at += blocks * 4096 + rng.gen_range(0..4u64) * 4096;
            }
            let writer: &dyn BlockDevice = if round % 2 == 0 { &dev } else { &plain };
            crate::storage::write_then_read_back(writer, &dev, &ops, &mut model);
        }
        dev.flush().unwrap();
        let mut all = vec![0u8; model.len()];
        plain.read_at(&mut all, 0).unwrap();
        assert!(all == model);
        let mut all2 = vec![0u8; model.len()];
        dev.read_at(&mut all2, 0).unwrap();
        assert!(all2 == model);
    }

    #[test]
    fn misaligned_and_out_of_range_requests_are_refused_without_failing_the_device() {
        let d = dir();
        let dev = UringDevice::create(&d.path().join("u"), 1 << 20).unwrap();
        let e = dev.write_at(&[1u8; 100], 0).unwrap_err();
        assert!(e.to_string().contains("not a multiple of 4096"), "{e}");
        let e = dev.write_at(&[1u8; 4096], 512).unwrap_err();
        assert!(e.to_string().contains("offset 512"), "{e}");
        let e = dev.write_at(&[1u8; 8192], (1 << 20) - 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // Still usable.
        dev.write_at(&[7u8; 4096], 4096).unwrap();
        let mut b = [0u8; 4096];
        dev.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [7u8; 4096]);
    }

    #[test]
    fn a_stream_keeps_writes_in_flight_and_lands_them() {
        let d = dir();
        let dev = UringDevice::create(&d.path().join("u"), 8 << 20).unwrap();
        let data = vec![0x3cu8; 4096];
        let mut next = 0u64;
        let mut lat = Vec::new();
        dev.write_stream(
            &data,
            512,
            32,
            || {
                next += 4096;
                next - 4096
            },
            |ns| lat.push(ns),
        )
        .unwrap();
        assert_eq!(lat.len(), 512);
        let mut all = vec![0u8; 512 * 4096];
        dev.read_at(&mut all, 0).unwrap();
        assert!(all.iter().all(|&b| b == 0x3c));
    }
    #[test]
    fn a_transfer_of_nothing_is_an_error_and_the_device_then_refuses_work() {
        let d = dir();
        let path = d.path().join("u");
        let dev = UringDevice::create(&path, 1 << 20).unwrap();
        dev.write_at(&[5u8; 8192], 0).unwrap();
        // The file shrinks behind the device's back: a read past its new end transfers
        // nothing, which must be an error, never a buffer silently left as it was.
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4096).unwrap();
        let mut b = vec![0u8; 8192];
        let e = dev.read_at(&mut b, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert!(e.to_string().contains("transferred nothing"), "{e}");
        // Fail-stop: even a request that would succeed is refused now.
        let e = dev.read_at(&mut b[..4096], 0).unwrap_err();
        assert!(e.to_string().contains("refusing I/O after an earlier I/O error"), "{e}");
        assert!(dev.flush().is_err());
    }

    #[test]
    fn a_stream_with_a_bad_offset_stops_cleanly_and_leaves_the_device_usable() {
        let d = dir();
        let dev = UringDevice::create(&d.path().join("u"), 1 << 20).unwrap();
        let data = vec![1u8; 4096];
        let mut n = 0u64;
        let e = dev
            .write_stream(
                &data,
                100,
                8,
                || {
                    n += 1;
                    if n == 20 {
                        100
                    } else {
                        n % 256 * 4096
                    }
                },
                |_| {},
            )
            .unwrap_err();
        assert!(e.to_string().contains("offset 100"), "{e}");
        let e = dev.write_stream(&data, 10, 8, || 1 << 20, |_| {}).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // Nothing left in flight on the ring: a batch and a flush go through.
        dev.write_many(&[WriteOp { offset: 0, buf: &data }, WriteOp { offset: 8192, buf: &data }]).unwrap();
        dev.flush().unwrap();
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(24))]
            /// Random batches of random offsets and lengths (in 512-byte steps, so some
            /// are misaligned), alternately through the io_uring and the pread engine,
            /// against a model: aligned batches land and read back through both engines;
            /// a batch with any misaligned or out-of-range op is refused whole, writes
            /// nothing and leaves the device usable.
            #[test]
            fn batches_match_a_model_through_both_engines(
                batches in proptest::collection::vec(
                    (any::<bool>(), proptest::collection::vec((0u64..(600 << 3), 1usize..(80 << 3), any::<u8>()), 1..12)),
                    1..6,
                )
            ) {
                let d = dir();
                let path = d.path().join("u");
                let size = 2u64 << 20;
                let dev = UringDevice::create(&path, size).unwrap();
                let plain = FileDevice::open(&path).unwrap();
                let mut model = vec![0u8; crate::usize_of(size)];
                for (through_uring, ops) in batches {
                    let ops: Vec<(u64, Vec<u8>)> =
                        ops.into_iter().map(|(o, l, b)| (o * 512, vec![b; l * 512])).collect();
                    let wops: Vec<WriteOp<'_>> = ops.iter().map(|(o, d)| WriteOp { offset: *o, buf: d }).collect();
                    let valid = ops.iter().all(|(o, d)| {
                        o % 4096 == 0 && d.len() % 4096 == 0 && o + d.len() as u64 <= size
                    });
                    let r = if through_uring { dev.write_many(&wops) } else { plain.write_many(&wops) };
                    if through_uring && !valid {
                        let e = r.unwrap_err();
                        prop_assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
                        continue;
                    }
                    if !valid && ops.iter().any(|(o, d)| o + d.len() as u64 > size) {
                        prop_assert!(r.is_err());
                        continue;
                    }
                    r.unwrap();
                    for (o, d) in &ops {
                        model[crate::usize_of(*o)..crate::usize_of(*o) + d.len()].copy_from_slice(d);
                    }
                }
                plain.flush().unwrap();
                let mut all = vec![0u8; model.len()];
                dev.read_at(&mut all, 0).unwrap();
                prop_assert!(all == model, "io_uring read differs from the model");
                plain.read_at(&mut all, 0).unwrap();
                prop_assert!(all == model, "pread read differs from the model");
            }
        }
    }
}
