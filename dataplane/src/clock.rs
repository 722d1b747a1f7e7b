//! Time, as the mirror logic sees it: a monotonic nanosecond counter, so that the
//! simulator can drive CP timers and link time-outs from a simulated clock.

use std::time::Instant;

pub trait Clock: Send + Sync {
    fn now_ns(&self) -> u64;
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
