//! Logs: the source's NVLog ([`NvLog`], two partitions in one NVRAM region) and the
//! destination's per-source log files ([`LogFile`], one per (source node, volume,
//! partition), created on demand). A partition and its log file hold the same bytes at the
//! same offsets (see [`crate::format`]).

mod changemap;
mod logfile;
mod nvlog;

pub use changemap::{ChangeBase, ChangeMap, ChangeMapError, REGION_BYTES};
pub use logfile::{LogFile, LogFileError};
pub use nvlog::{AppendError, Checkpoint, NvLog, NvLogError, Recovered};

/// Number of NVLog partitions: writes go to the active half while the other is in a CP.
pub const PARTITIONS: usize = 2;
/// The partitions' numbers, as entries and frames carry them.
pub const PARTITION_IDS: [u8; PARTITIONS] = [0, 1];
