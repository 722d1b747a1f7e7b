//! Per-core pollers: pinning and the adaptive back-off.
//!
//! A poller busy-polls its inputs while there is work, so that a request or an ack is
//! picked up within nanoseconds of arriving. When idle it backs off in three steps: spin
//! (a short window, for the next request of a busy client), yield (give the core to other
//! threads but stay runnable), then park in a blocking wait on its channels with a timeout,
//! so that an idle node does not burn its cores.

use std::time::{Duration, Instant};

/// How long an idle poller spins before yielding, and yields before parking.
#[derive(Debug, Clone, Copy)]
pub struct BackoffConfig {
    pub spin: Duration,
    pub yield_for: Duration,
}

impl Default for BackoffConfig {
    /// Spinning pays where a core can be spared for it. On a host with few cores a spinning
    /// poller takes the core the threads it waits on (the front end, the replication
    /// receiver, the client) need, and costs more than it saves: measured on 2 cores, NBD
    /// writes at queue depth 1 took 105 us at the median with a 50 us spin and 65 us with
    /// none (benches `nbd-qd1`). So the spin window is used from 8 cores up; below, an idle
    /// poller yields at once.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let spin = if cores >= 8 { Duration::from_micros(50) } else { Duration::ZERO };
        Self { spin, yield_for: Duration::from_micros(300) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Poll again at once.
    Spin,
    /// Poll again after yielding the core.
    Yield,
    /// Block on the inputs.
    Park,
}

#[derive(Debug)]
pub struct Backoff {
    cfg: BackoffConfig,
    idle_since: Option<Instant>,
    /// Times the poller parked: a measure of how idle it has been.
    pub parks: u64,
}

impl Backoff {
    pub fn new(cfg: BackoffConfig) -> Self {
        Self { cfg, idle_since: None, parks: 0 }
    }

    /// There was work: poll hot again.
    pub fn reset(&mut self) {
        self.idle_since = None;
    }

    /// There was no work: what to do next.
    pub fn idle(&mut self) -> Idle {
        let since = *self.idle_since.get_or_insert_with(Instant::now);
        let idle = since.elapsed();
        if idle < self.cfg.spin {
            std::hint::spin_loop();
            Idle::Spin
        } else if idle < self.cfg.spin + self.cfg.yield_for {
            std::thread::yield_now();
            Idle::Yield
        } else {
            self.parks += 1;
            Idle::Park
        }
    }
}

/// Pins the calling thread to core `index` modulo the cores this process may use.
/// Returns the core's id, or `None` where pinning is not possible.
pub fn pin_to_core(index: usize) -> Option<usize> {
    let cores = core_affinity::get_core_ids()?;
    if cores.is_empty() {
        return None;
    }
    let core = cores[index % cores.len()];
    core_affinity::set_for_current(core).then_some(core.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_goes_spin_yield_park_and_resets() {
        let mut b = Backoff::new(BackoffConfig { spin: Duration::from_millis(2), yield_for: Duration::from_millis(2) });
        assert_eq!(b.idle(), Idle::Spin);
        std::thread::sleep(Duration::from_millis(3));
        assert_eq!(b.idle(), Idle::Yield);
        std::thread::sleep(Duration::from_millis(3));
        assert_eq!(b.idle(), Idle::Park);
        assert_eq!(b.parks, 1);
        b.reset();
        assert_eq!(b.idle(), Idle::Spin);
    }
}
