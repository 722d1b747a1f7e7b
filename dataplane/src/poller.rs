//! Per-core pollers: pinning, the adaptive back-off, and the readiness set a poller
//! sleeps on.
//!
//! A poller runs to completion: it polls every input it owns (client sockets, its
//! replication link, its control queue, its CP writer's answers) in passes, and a pass
//! that found work is followed by another at once. When a pass finds nothing it may spin
//! for a short window (where cores can be spared, for the next request of a busy client),
//! then sleeps in the kernel in [`Readiness::wait`] (epoll, through mio) until a socket it
//! owns is ready, a thread that queued work for it wakes it, or a timer is due. Only a
//! link without a file descriptor to sleep on (RDMA completions are polled) still yields
//! between passes while it owes replies.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

/// How long an idle poller spins before yielding, and yields before parking.
#[derive(Debug, Clone, Copy)]
pub struct BackoffConfig {
    pub spin: Duration,
    pub yield_for: Duration,
}

impl Default for BackoffConfig {
    /// A poller that found work spins for [`SPIN_WINDOW`] before it sleeps, so that the next
    /// request of a busy client is taken without a wake-up (see there for the measurement).
    fn default() -> Self {
        Self { spin: SPIN_WINDOW, yield_for: Duration::from_micros(300) }
    }
}

/// How long a thread on the write path (a poller, a destination's receiver) polls
/// without blocking after it last had work, before it sleeps in the kernel.
///
/// A wake-up of a thread sleeping on another core costs tens of microseconds on virtual
/// machines (an inter-processor interrupt to a halted virtual CPU), more than the work of
/// a 4 KiB write. Measured on this project's 2-core machine with fio's nbd engine at queue
/// depth 1 (benches `nbd-peers`'s workload): an unmirrored write took 61 us at the median
/// with no spin, 59 us with 10 us, 20 us with 30 us and 20 us with 80 us; mirrored, 87, 103,
/// 48 and 49 us; queue depth 32 was the same within noise with and without (145-158k IOPS
/// unmirrored, 66-75k mirrored). The window must cover the client's turnaround (about
/// 20 us here); past it, spinning buys nothing. An idle poller does not spin: the window
/// starts at its last work. Nor does a poller with many writes in flight (see
/// `source::SPIN_PENDING_MAX`): there the next event comes anyway, and the spin takes a
/// core from the threads that produce it.
pub const SPIN_WINDOW: Duration = Duration::from_micros(30);

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

    /// There was no work: what to do next. `may_yield`: the poller has an input it cannot
    /// sleep on and must poll (see the module documentation); without one it goes from
    /// spinning straight to parking. `may_spin`: spinning can pay now (few requests in
    /// flight); without it the poller goes on to yield or park at once.
    pub fn idle(&mut self, may_yield: bool, may_spin: bool) -> Idle {
        let since = *self.idle_since.get_or_insert_with(Instant::now);
        let idle = since.elapsed();
        if may_spin && idle < self.cfg.spin {
            std::hint::spin_loop();
            Idle::Spin
        } else if may_yield && idle < self.cfg.spin + self.cfg.yield_for {
            std::thread::yield_now();
            Idle::Yield
        } else {
            self.parks += 1;
            Idle::Park
        }
    }
}

/// Wakes a poller sleeping in [`Readiness::wait`]: whoever queues work for it (a control
/// request, a submitted request, a finished connect or CP write-out) calls
/// [`PollerWaker::wake`] after queueing.
#[derive(Clone)]
pub struct PollerWaker(Arc<Waker>);

impl PollerWaker {
    pub fn wake(&self) {
        // Fails only if the eventfd's counter is at its maximum, which means the poller
        // has a wake-up pending anyway.
        let _ = self.0.wake();
    }
}

impl std::fmt::Debug for PollerWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PollerWaker")
    }
}

/// A poller's readiness set: the sockets it owns, registered edge-triggered, and a waker.
///
/// Edge-triggered registration asks one thing of the poller: it sleeps only after a pass
/// in which every registered socket was read until it would block (or could not be read
/// for a reason that another event ends: a bound on requests in flight, which an ack or a
/// finished write-out lifts). The pass structure gives that, since a pass that did work is
/// followed by another.
pub struct Readiness {
    poll: Poll,
    events: Events,
    waker: PollerWaker,
    /// A timer for waits shorter than epoll's millisecond resolution (the write
    /// throttle's), made at the first such wait.
    timer: Option<std::os::fd::OwnedFd>,
}

const WAKE_TOKEN: Token = Token(usize::MAX);
const TIMER_TOKEN: Token = Token(usize::MAX - 1);

/// Events taken per wait; more stay queued in the kernel for the next wait.
const EVENTS_MAX: usize = 256;

impl Readiness {
    pub fn new() -> std::io::Result<Readiness> {
        let poll = Poll::new()?;
        let waker = PollerWaker(Arc::new(Waker::new(poll.registry(), WAKE_TOKEN)?));
        Ok(Readiness { poll, events: Events::with_capacity(EVENTS_MAX), waker, timer: None })
    }

    pub fn waker(&self) -> PollerWaker {
        self.waker.clone()
    }

    /// Adds a socket, for reading and writing. `token` names it (the poller polls every
    /// input after a wake-up, so tokens only need to be distinct).
    pub fn register(&self, fd: RawFd, token: usize) -> std::io::Result<()> {
        self.poll.registry().register(&mut SourceFd(&fd), Token(token), Interest::READABLE | Interest::WRITABLE)
    }

    /// Removes a socket; called before it is closed, so that a descriptor number reused by
    /// a later socket is never mistaken for it.
    pub fn deregister(&self, fd: RawFd) {
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
    }

    /// Sleeps until a registered socket is ready, the waker is woken, or `timeout` passes.
    /// epoll counts in milliseconds (and rounds up): a timeout with a part below one is
    /// kept by a timer in the set.
    pub fn wait(&mut self, timeout: Duration) {
        if !timeout.subsec_nanos().is_multiple_of(1_000_000) {
            if let Err(e) = self.arm_timer(timeout) {
                tracing::warn!("poller: no timer for a wait of {timeout:?} ({e}); it may last up to 1 ms longer");
            }
        }
        if let Err(e) = self.poll.poll(&mut self.events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                // Nothing the poller can do about it but poll again: it still makes
                // progress on its timeout, and says so once per failure.
                tracing::warn!("poller: waiting for readiness failed: {e}");
                std::thread::sleep(timeout.min(Duration::from_millis(1)));
            }
        }
    }
}

impl Readiness {
    /// Arms the timer (one shot) to fire after `after`, making it first where need be.
    fn arm_timer(&mut self, after: Duration) -> std::io::Result<()> {
        use std::os::fd::{AsRawFd, FromRawFd};
        if self.timer.is_none() {
            // SAFETY: timerfd_create takes plain integers and returns a new descriptor or -1.
            let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `fd` is a descriptor just returned to us, owned by nothing else.
            let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            self.poll.registry().register(&mut SourceFd(&owned.as_raw_fd()), TIMER_TOKEN, Interest::READABLE)?;
            self.timer = Some(owned);
        }
        let fd = self.timer.as_ref().expect("made above").as_raw_fd();
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(after.as_secs()).unwrap_or(libc::time_t::MAX),
                // Below 10^9: fits every c_long.
                tv_nsec: libc::c_long::from(i32::try_from(after.subsec_nanos()).expect("below 10^9")).max(1),
            },
        };
        // Edge-triggered: an expiry that was never read would not signal again. Drain it.
        let mut expirations = [0u8; 8];
        // SAFETY: reading 8 bytes into an 8-byte buffer from our own timerfd (non-blocking).
        let _ = unsafe { libc::read(fd, expirations.as_mut_ptr().cast(), expirations.len()) };
        // SAFETY: `fd` is our timerfd; `spec` is a valid itimerspec; a null old value is allowed.
        if unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Readiness")
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
        assert_eq!(b.idle(true, true), Idle::Spin);
        std::thread::sleep(Duration::from_millis(3));
        assert_eq!(b.idle(true, true), Idle::Yield);
        assert_eq!(b.idle(false, true), Idle::Park, "without an input to poll, no yielding");
        std::thread::sleep(Duration::from_millis(3));
        assert_eq!(b.idle(true, true), Idle::Park);
        assert_eq!(b.parks, 2);
        b.reset();
        assert_eq!(b.idle(true, true), Idle::Spin);
        b.reset();
        assert_eq!(b.idle(false, false), Idle::Park, "not allowed to spin: parks at once");
        b.reset();
        assert_eq!(b.idle(true, false), Idle::Yield, "not allowed to spin, must poll: yields");
    }

    #[test]
    fn a_wait_below_a_millisecond_is_kept_by_the_timer() {
        let mut r = Readiness::new().expect("epoll");
        let mut slowest = Duration::ZERO;
        for _ in 0..20 {
            let started = Instant::now();
            r.wait(Duration::from_micros(100));
            let took = started.elapsed();
            assert!(took >= Duration::from_micros(90), "woke early: {took:?}");
            slowest = slowest.max(took);
        }
        // epoll alone would round every one of them up to a whole millisecond.
        let mut fast = 0;
        for _ in 0..20 {
            let started = Instant::now();
            r.wait(Duration::from_micros(100));
            if started.elapsed() < Duration::from_micros(900) {
                fast += 1;
            }
        }
        assert!(fast >= 10, "only {fast} of 20 waits of 100 us took less than 900 us (slowest {slowest:?})");
    }

    #[test]
    fn readiness_wakes_on_the_waker_and_on_a_socket() {
        use std::io::Write;
        let mut r = Readiness::new().expect("epoll");
        let started = Instant::now();
        r.wait(Duration::from_millis(20));
        assert!(started.elapsed() >= Duration::from_millis(15), "nothing ready: sleeps for the timeout");

        let waker = r.waker();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            waker.wake();
        });
        let started = Instant::now();
        r.wait(Duration::from_secs(10));
        assert!(started.elapsed() < Duration::from_secs(5), "woken by the waker");

        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("pair");
        use std::os::fd::AsRawFd;
        r.register(a.as_raw_fd(), 1).expect("register");
        // The first wait reports it writable.
        r.wait(Duration::from_millis(10));
        b.write_all(b"x").expect("write");
        let started = Instant::now();
        r.wait(Duration::from_secs(10));
        assert!(started.elapsed() < Duration::from_secs(5), "woken by the socket");
        r.deregister(a.as_raw_fd());
    }
}
