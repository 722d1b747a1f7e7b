//! The NVMe passthrough engine: NVMe Read, Write and Flush commands sent straight to a
//! namespace through io_uring `IORING_OP_URING_CMD` on its generic char device
//! (`/dev/ngXnY`), bypassing the block layer's request merging and the filesystem.
//!
//! The ring uses 128-byte submission entries (the command sits in the entry) and 32-byte
//! completions (the NVMe result beside the status). Batches go out in waves as in the
//! io_uring engine ([`super::UringDevice`]), through page-aligned buffers the device
//! DMAs from. The namespace id comes from `NVME_IOCTL_ID`; its logical block size,
//! capacity and largest transfer from sysfs (`/sys/block/nvmeXnY/`). A completion with a
//! non-zero status fails the batch with that status (positive values are NVMe status
//! codes, negative ones errnos). Fails stop, like the other engines.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use nvmirror_bindings::nvme::{
    NvmeUringCmd, NVME_CMD_FLUSH, NVME_CMD_READ, NVME_CMD_WRITE, NVME_IOCTL_ID, NVME_URING_CMD_IO,
};
use parking_lot::Mutex;

use super::uring::{submit_and_wait, AlignedBuf, RingBufs};
use super::{check_range, BlockDevice, ReadOp, WriteOp};
use crate::format::BLOCK_BYTES;

/// Aligned buffers, and so the most commands a wave holds.
const BUFFERS: usize = 32;
/// Entries of the submission queue.
const RING_ENTRIES: u32 = 64;
const _: () = assert!(BUFFERS <= RING_ENTRIES as usize);
/// The largest transfer this engine issues; the namespace's own limit may be lower.
const TRANSFER_BYTES_MAX: usize = 256 << 10;

type Ring = IoUring<squeue::Entry128, cqueue::Entry32>;

type State = RingBufs<Ring>;

pub struct NvmeDevice {
    path: PathBuf,
    file: File,
    nsid: u32,
    lba_bytes: u64,
    /// Bytes this device exposes (at most the namespace's capacity).
    size: u64,
    /// The namespace's capacity in bytes.
    capacity: u64,
    transfer_bytes: usize,
    state: Mutex<State>,
    failed: super::FailStop,
}

fn sysfs_u64(path: &Path) -> io::Result<u64> {
    let s =
        std::fs::read_to_string(path).map_err(|e| io::Error::new(e.kind(), format!("read {}: {e}", path.display())))?;
    s.trim().parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {s:?}", path.display())))
}

/// `/sys/block/nvmeXnY` for `/dev/ngXnY`.
fn sysfs_block_dir(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let block = name.strip_prefix("ng").map(|rest| format!("nvme{rest}")).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: the NVMe engine takes a namespace's generic char device, /dev/ngXnY", path.display()),
        )
    })?;
    Ok(Path::new("/sys/block").join(block))
}

struct Chunk {
    op: usize,
    at: usize,
    len: usize,
    offset: u64,
}

impl NvmeDevice {
    /// Opens `/dev/ngXnY`; `size` (at most the namespace's capacity) limits what is used
    /// of it, `None` takes it whole.
    pub fn open(path: &Path, size: Option<u64>) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        // SAFETY: NVME_IOCTL_ID takes no argument and returns the namespace id or -1.
        let nsid = unsafe { libc::ioctl(file.as_raw_fd(), libc::c_ulong::from(NVME_IOCTL_ID)) };
        if nsid < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("{}: NVME_IOCTL_ID: {e} (not an NVMe namespace?)", path.display()),
            ));
        }
        let nsid = u32::try_from(nsid).expect("non-negative");
        let sys = sysfs_block_dir(path)?;
        let lba_bytes = sysfs_u64(&sys.join("queue/logical_block_size"))?;
        let capacity = sysfs_u64(&sys.join("size"))? * 512;
        let max_kb = sysfs_u64(&sys.join("queue/max_hw_sectors_kb")).unwrap_or(128);
        let transfer_bytes =
            crate::usize_of((max_kb * 1024).min(TRANSFER_BYTES_MAX as u64)) / BLOCK_BYTES * BLOCK_BYTES;
        if lba_bytes == 0 || !(BLOCK_BYTES as u64).is_multiple_of(lba_bytes) || transfer_bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{}: logical blocks of {lba_bytes} bytes (or transfers of {max_kb} KiB) do not fit {BLOCK_BYTES}-byte blocks", path.display()),
            ));
        }
        let size = match size {
            None => capacity / BLOCK_BYTES as u64 * BLOCK_BYTES as u64,
            Some(s) if s == 0 || !s.is_multiple_of(BLOCK_BYTES as u64) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: size {s} is not a positive multiple of {BLOCK_BYTES}", path.display()),
                ))
            }
            Some(s) if s <= capacity => s,
            Some(s) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: namespace {nsid} holds {capacity} bytes, {s} asked for", path.display()),
                ))
            }
        };
        let ring: Ring = IoUring::builder().build(RING_ENTRIES)?;
        let bufs = (0..BUFFERS).map(|_| AlignedBuf::new(TRANSFER_BYTES_MAX)).collect();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            nsid,
            lba_bytes,
            size,
            capacity,
            transfer_bytes,
            state: Mutex::new(State { ring, bufs, inflight: 0 }),
            failed: super::FailStop::default(),
        })
    }

    pub fn nsid(&self) -> u32 {
        self.nsid
    }
    pub fn lba_bytes(&self) -> u64 {
        self.lba_bytes
    }
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn chunks(&self, spans: impl Iterator<Item = (u64, usize)>) -> io::Result<Vec<Chunk>> {
        let mut out = Vec::new();
        for (op, (offset, len)) in spans.enumerate() {
            check_range(self.size, offset, len as u64)?;
            if !offset.is_multiple_of(BLOCK_BYTES as u64) || !len.is_multiple_of(BLOCK_BYTES) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the NVMe engine takes {BLOCK_BYTES}-byte blocks: {len} bytes at {offset}"),
                ));
            }
            let mut at = 0;
            while at < len {
                let n = (len - at).min(self.transfer_bytes);
                out.push(Chunk { op, at, len: n, offset: offset + at as u64 });
                at += n;
            }
        }
        Ok(out)
    }

    fn submit(&self, state: &mut State, cmds: &[(u64, NvmeUringCmd)], what: &str) -> io::Result<()> {
        let State { ring, inflight, .. } = state;
        for (user, cmd) in cmds {
            let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), NVME_URING_CMD_IO)
                .cmd(cmd.to_bytes())
                .build()
                .user_data(*user);
            // SAFETY: the command's buffer (if any) is one of the state's aligned buffers,
            // untouched until every completion of this call is reaped below; `inflight`
            // counts it until then, and a ring dropped with commands in flight leaks its
            // buffers rather than free them.
            unsafe { ring.submission().push(&sqe) }
                .expect("the submission queue holds a whole wave (BUFFERS <= RING_ENTRIES)");
            *inflight += 1;
        }
        submit_and_wait(ring.submitter(), cmds.len())?;
        let mut seen = 0;
        let mut first_err = None;
        while seen < cmds.len() {
            let cqe = ring.completion().next();
            let Some(cqe) = cqe else {
                submit_and_wait(ring.submitter(), cmds.len() - seen)?;
                continue;
            };
            seen += 1;
            *inflight -= 1;
            let res = cqe.result();
            if res != 0 && first_err.is_none() {
                let (_, cmd) = cmds.iter().find(|(u, _)| *u == cqe.user_data()).copied().unwrap_or_default();
                let slba = u64::from(cmd.cdw10) | (u64::from(cmd.cdw11) << 32);
                let why = if res < 0 {
                    io::Error::from_raw_os_error(-res).to_string()
                } else {
                    format!(
                        "NVMe status {res:#x} (status code type {}, status code {:#x})",
                        (res >> 8) & 0x7,
                        res & 0xff
                    )
                };
                first_err = Some(io::Error::other(format!(
                    "{}: NVMe {what} of {} bytes at LBA {slba} (namespace {}): {why}",
                    self.path.display(),
                    cmd.data_len,
                    self.nsid
                )));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn rw(
        &self,
        write: bool,
        chunks: &[Chunk],
        mut fill: impl FnMut(&Chunk, &mut [u8]),
        mut drain: impl FnMut(&Chunk, &[u8]),
    ) -> io::Result<()> {
        let mut state = self.state.lock();
        for wave in chunks.chunks(BUFFERS) {
            let mut cmds = Vec::with_capacity(wave.len());
            for (i, c) in wave.iter().enumerate() {
                if write {
                    fill(c, state.bufs[i].slice_mut(c.len));
                }
                let nlb = u32::try_from(c.len as u64 / self.lba_bytes).expect("a transfer's blocks fit u32");
                let cmd = NvmeUringCmd::rw(
                    if write { NVME_CMD_WRITE } else { NVME_CMD_READ },
                    self.nsid,
                    c.offset / self.lba_bytes,
                    nlb,
                    state.bufs[i].as_mut_ptr() as u64,
                    u32::try_from(c.len).expect("at most one buffer"),
                );
                cmds.push((i as u64, cmd));
            }
            self.submit(&mut state, &cmds, if write { "write" } else { "read" })?;
            if !write {
                for (i, c) in wave.iter().enumerate() {
                    drain(c, state.bufs[i].slice(c.len));
                }
            }
        }
        Ok(())
    }
}

impl BlockDevice for NvmeDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_many(&mut [ReadOp { offset, buf }])
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_many(&[WriteOp { offset, buf }])
    }
    fn write_many(&self, ops: &[WriteOp<'_>]) -> io::Result<()> {
        self.failed.check(&self.path)?;
        let chunks = self.chunks(ops.iter().map(|op| (op.offset, op.buf.len())))?;
        let r = self.rw(true, &chunks, |c, dst| dst.copy_from_slice(&ops[c.op].buf[c.at..c.at + c.len]), |_, _| {});
        self.failed.guard(r)
    }
    fn read_many(&self, ops: &mut [ReadOp<'_>]) -> io::Result<()> {
        self.failed.check(&self.path)?;
        let chunks = self.chunks(ops.iter().map(|op| (op.offset, op.buf.len())))?;
        let r = self.rw(false, &chunks, |_, _| {}, |c, src| ops[c.op].buf[c.at..c.at + c.len].copy_from_slice(src));
        self.failed.guard(r)
    }
    /// An NVMe Flush: the namespace's volatile write cache to media.
    fn flush(&self) -> io::Result<()> {
        self.failed.check(&self.path)?;
        let cmd = NvmeUringCmd { opcode: NVME_CMD_FLUSH, nsid: self.nsid, ..Default::default() };
        let r = self.submit(&mut self.state.lock(), &[(0, cmd)], "flush");
        self.failed.guard(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_namespace_char_devices_are_taken() {
        let e = NvmeDevice::open(Path::new("/dev/null"), None).err().expect("not NVMe");
        assert!(e.to_string().contains("NVME_IOCTL_ID") || e.to_string().contains("ngXnY"), "{e}");
        assert_eq!(sysfs_block_dir(Path::new("/dev/ng1n2")).unwrap(), Path::new("/sys/block/nvme1n2"));
        assert!(sysfs_block_dir(Path::new("/dev/sda")).is_err());
    }
}
