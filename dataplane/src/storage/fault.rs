//! A fault-injecting engine for tests: wraps a device and fails, or silently drops, its
//! I/O on command. A [`FaultPlan`] may be shared by several devices, so that a crash point
//! counts writes across all the members of a RAID volume.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use super::{BlockDevice, ReadOp, WriteOp};

#[derive(Debug, Default)]
pub struct FaultPlan {
    /// Every read fails with EIO.
    pub fail_reads: AtomicBool,
    /// Every write fails with EIO.
    pub fail_writes: AtomicBool,
    /// Writes still allowed before the crash point; below zero, no crash point. Once it
    /// reaches zero, later writes and flushes are dropped without an error, as if the
    /// machine had stopped there.
    pub writes_before_crash: AtomicI64,
    /// Writes (single ones and members of batches) seen so far.
    pub writes: AtomicU64,
}

impl FaultPlan {
    pub fn new() -> Arc<Self> {
        let p = Self::default();
        p.writes_before_crash.store(-1, Ordering::SeqCst);
        Arc::new(p)
    }
    pub fn crash_after(&self, writes: i64) {
        self.writes_before_crash.store(writes, Ordering::SeqCst);
    }
    pub fn crashed(&self) -> bool {
        self.writes_before_crash.load(Ordering::SeqCst) == 0
    }
    /// Whether the next write lands.
    fn admit_write(&self) -> bool {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let left = self.writes_before_crash.load(Ordering::SeqCst);
        if left < 0 {
            return true;
        }
        if left == 0 {
            return false;
        }
        self.writes_before_crash.fetch_sub(1, Ordering::SeqCst);
        true
    }
}

pub struct FaultDevice {
    inner: Arc<dyn BlockDevice>,
    plan: Arc<FaultPlan>,
}

impl FaultDevice {
    pub fn new(inner: Arc<dyn BlockDevice>, plan: Arc<FaultPlan>) -> Self {
        Self { inner, plan }
    }
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected {what} error"))
}

impl BlockDevice for FaultDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.plan.fail_reads.load(Ordering::SeqCst) {
            return Err(eio("read"));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.plan.fail_writes.load(Ordering::SeqCst) {
            return Err(eio("write"));
        }
        if self.plan.admit_write() {
            self.inner.write_at(buf, offset)
        } else {
            Ok(())
        }
    }
    fn flush(&self) -> io::Result<()> {
        if self.plan.fail_writes.load(Ordering::SeqCst) {
            return Err(eio("flush"));
        }
        if self.plan.crashed() {
            return Ok(());
        }
        self.inner.flush()
    }
    fn write_many(&self, ops: &[WriteOp<'_>]) -> io::Result<()> {
        ops.iter().try_for_each(|op| self.write_at(op.buf, op.offset))
    }
    fn read_many(&self, ops: &mut [ReadOp<'_>]) -> io::Result<()> {
        ops.iter_mut().try_for_each(|op| self.read_at(op.buf, op.offset))
    }
    fn set_copy_over(&self, on: bool) {
        self.inner.set_copy_over(on)
    }
    fn grow(&self, size: u64) -> io::Result<()> {
        if self.plan.fail_writes.load(Ordering::SeqCst) {
            return Err(eio("grow"));
        }
        self.inner.grow(size)
    }
    fn may_hold_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        if self.plan.fail_reads.load(Ordering::SeqCst) {
            return Err(eio("read"));
        }
        self.inner.may_hold_data(offset, len)
    }
}
