//! Buffers of the RAID-4 write path, reused across batches.
//!
//! A batch of a CP reads the old blocks it replaces (read-modify-write) and computes its
//! parity into buffers of about the batch's size. Allocated fresh, each would be zeroed
//! first, which cost more than the XOR (measured on the mirror's CP at queue depth 32:
//! zeroing 12 KiB per block was 3% of the machine's CPU, more than the parity itself).
//! Reused, a buffer is only written by the read or the XOR that fills it: every byte of a
//! taken buffer is overwritten before it is read, so what a previous batch left in it
//! never shows.
//!
//! Bounded: at most [`RETAINED_BUFFERS_MAX`] buffers and [`RETAINED_BYTES_MAX`] bytes are
//! kept between batches, for every volume of the process together; a buffer returned past
//! that is freed.

use parking_lot::Mutex;

/// Buffers kept for reuse.
pub const RETAINED_BUFFERS_MAX: usize = 16;
/// Bytes kept for reuse.
pub const RETAINED_BYTES_MAX: usize = 64 << 20;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer of `len` bytes whose contents are unspecified (zeroes or an earlier batch's
/// bytes): the caller overwrites all of it before reading any.
pub fn take(len: usize) -> Vec<u8> {
    let mut buf = {
        let mut pool = POOL.lock();
        // The smallest retained buffer that holds `len` without growing, else the largest.
        let fit = (0..pool.len()).filter(|&i| pool[i].capacity() >= len).min_by_key(|&i| pool[i].capacity());
        let pick = fit.or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].capacity()));
        pick.map(|i| pool.swap_remove(i)).unwrap_or_default()
    };
    // Bytes past the buffer's earlier length are zeroed (safe Rust has no uninitialised
    // bytes); within it, the earlier contents stay until the caller overwrites them.
    buf.truncate(len);
    buf.resize(len, 0);
    buf
}

/// Gives a buffer back for reuse (or frees it, past the bounds).
pub fn give(buf: Vec<u8>) {
    let mut pool = POOL.lock();
    let held: usize = pool.iter().map(Vec::capacity).sum();
    if pool.len() < RETAINED_BUFFERS_MAX && held + buf.capacity() <= RETAINED_BYTES_MAX {
        pool.push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_at_the_asked_length_and_the_pool_stays_bounded() {
        let mut a = take(3 * 4096);
        assert_eq!(a.len(), 3 * 4096);
        a.fill(7);
        give(a);
        let b = take(4096);
        assert_eq!(b.len(), 4096);
        give(b);
        for _ in 0..2 * RETAINED_BUFFERS_MAX {
            give(vec![0u8; 4096]);
        }
        give(vec![0u8; RETAINED_BYTES_MAX + 1]);
        let pool = POOL.lock();
        assert!(pool.len() <= RETAINED_BUFFERS_MAX);
        assert!(pool.iter().map(Vec::capacity).sum::<usize>() <= RETAINED_BYTES_MAX);
    }
}
