//! Volumes in memory behind the front ends, for tests and fuzzing: an [`Export`] over a
//! [`MemDevice`] that answers every request at once, and a registry of them by name.

use std::sync::Arc;

use super::{Completer, Export, ExportRegistry, IoRequest};
use crate::storage::{BlockDevice, MemDevice};

/// A volume in memory; trims and write zeroes zero their range, a flush has nothing to do.
pub struct MemExport {
    dev: MemDevice,
    read_only: bool,
}

impl MemExport {
    pub fn new(bytes: u64, read_only: bool) -> MemExport {
        MemExport { dev: MemDevice::new(bytes), read_only }
    }

    pub fn device(&self) -> &MemDevice {
        &self.dev
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn submit(&self, request: IoRequest, done: Completer) {
        let result = match request {
            IoRequest::Read { offset, len } => {
                let mut buf = vec![0u8; crate::usize_of(u64::from(len))];
                self.dev.read_at(&mut buf, offset).map(|()| Some(buf))
            }
            IoRequest::Write { offset, data, .. } => self.dev.write_at(&data, offset).map(|()| None),
            IoRequest::Trim { offset, len } | IoRequest::WriteZeroes { offset, len, .. } => {
                self.dev.write_at(&vec![0u8; crate::usize_of(u64::from(len))], offset).map(|()| None)
            }
            IoRequest::Flush => Ok(None),
        };
        done.complete(result);
    }
}

/// Volumes in memory by name.
pub struct MemRegistry(pub Vec<(String, Arc<MemExport>)>);

impl ExportRegistry for MemRegistry {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, e)| e.clone() as Arc<dyn Export>)
    }
    fn names(&self) -> Vec<String> {
        self.0.iter().map(|(n, _)| n.clone()).collect()
    }
}
