//! Directories of one mirror, for what hosts a mirror without a node (tests, tools,
//! benchmarks).

use super::*;

/// A directory of exactly one mirror, for what hosts a mirror without a node (benchmarks,
/// the hardware tests).
pub struct SingleMirror {
    pub mirror: Arc<Mirror>,
    pub rdma: Option<Arc<dyn RdmaPlacement>>,
}

impl crate::transport::MirrorDirectory for SingleMirror {
    fn attach(
        &self,
        hello: &Hello,
        sink: Arc<dyn ReplySink>,
    ) -> Result<(Box<dyn FrameHandler>, Welcome), (RefuseCode, String)> {
        let (session, welcome) = self.mirror.attach(hello, sink, self.rdma.clone())?;
        Ok((Box::new(session), welcome))
    }
}

/// A directory that makes one mirror in memory (a memory device, memory logs) at the
/// first hello and attaches every session to it: for tests and tools without a node.
#[derive(Default)]
pub struct MemMirrorDirectory {
    pub mirror: Mutex<Option<Arc<Mirror>>>,
    pub device: Mutex<Option<Arc<crate::storage::MemDevice>>>,
}

impl crate::transport::MirrorDirectory for MemMirrorDirectory {
    fn attach(
        &self,
        hello: &Hello,
        sink: Arc<dyn ReplySink>,
    ) -> Result<(Box<dyn FrameHandler>, Welcome), (RefuseCode, String)> {
        let mut m = self.mirror.lock();
        let mirror = match m.as_ref() {
            Some(mirror) => mirror.clone(),
            None => {
                let dev = Arc::new(crate::storage::MemDevice::new(hello.volume_bytes));
                let part = crate::usize_of(hello.partition_bytes);
                let logs: [Box<dyn Nvram>; PARTITIONS] =
                    [Box::new(crate::nvram::MemNvram::new(part)), Box::new(crate::nvram::MemNvram::new(part))];
                let mirror = Mirror::open(MirrorMeta::new(hello), Box::<MemMetaStore>::default(), logs, dev.clone())
                    .map_err(|e| (RefuseCode::Internal, format!("open the mirror: {e}")))?;
                *self.device.lock() = Some(dev);
                *m = Some(mirror.clone());
                mirror
            }
        };
        drop(m);
        let (session, welcome) = mirror.attach(hello, sink, None)?;
        Ok((Box::new(session), welcome))
    }
}
