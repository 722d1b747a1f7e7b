//! Time, as the mirror logic sees it: a monotonic nanosecond counter, so that the
//! simulator can drive CP timers and link time-outs from a simulated clock.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync {
    fn now_ns(&self) -> u64;
    /// Wall-clock time in milliseconds since the Unix epoch, as this clock has it: for
    /// timestamps people read (the last CP's), never for timers.
    fn unix_ms(&self) -> u64 {
        unix_ms()
    }
}

/// The system's wall-clock time in milliseconds since the Unix epoch (0 before it).
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        Self { origin: Instant::now() }
    }
}

impl Clock for SystemClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}
