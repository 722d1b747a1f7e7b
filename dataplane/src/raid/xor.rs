//! Parity by XOR: `dst = src[0] ^ src[1] ^ ...` (and `dst ^= ...` for read-modify-write).
//!
//! Three paths, the fastest the CPU runs chosen once at run time
//! (`is_x86_feature_detected!`):
//!
//! - **AVX-512**: 64-byte vectors, and `vpternlogq` with immediate `0x96` (the truth table
//!   of `a ^ b ^ c`) folds two sources into the accumulator per instruction, halving the
//!   instruction count of a plain XOR loop. Four vectors (256 bytes) per step keep the
//!   loads in flight. Where the destination is large (beyond the caches) and the data is
//!   streamed, stores are non-temporal: they skip the read-for-ownership of the
//!   destination's lines, a sixth of the memory traffic with four sources.
//! - **AVX2**: 32-byte vectors, one XOR per source, four vectors per step.
//! - **Portable**: 64-bit words, the reference every other path must equal (property
//!   tests in this module), and the fallback off x86-64.
//!
//! Every path takes any length and any alignment: vector loads and stores are unaligned,
//! and the bytes past the last whole step are done word by word, then byte by byte.

use std::sync::OnceLock;

/// An implementation of the XOR kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XorPath {
    Avx512,
    Avx2,
    Portable,
}

/// Destinations at least this long are written with non-temporal stores on the AVX-512
/// path: larger than the caches of the machines these run on, so the lines would be
/// evicted before they were read again.
const STREAM_BYTES_MIN: usize = 8 << 20;

impl XorPath {
    /// The fastest path this CPU runs (detected once).
    pub fn best() -> Self {
        static BEST: OnceLock<XorPath> = OnceLock::new();
        *BEST.get_or_init(|| Self::available()[0])
    }

    /// Every path this CPU runs, fastest first.
    pub fn available() -> Vec<XorPath> {
        let mut out = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                out.push(XorPath::Avx512);
            }
            if is_x86_feature_detected!("avx2") {
                out.push(XorPath::Avx2);
            }
        }
        out.push(XorPath::Portable);
        out
    }

    pub const fn name(self) -> &'static str {
        match self {
            XorPath::Avx512 => "avx512",
            XorPath::Avx2 => "avx2",
            XorPath::Portable => "portable",
        }
    }
}

/// `dst = srcs[0] ^ srcs[1] ^ ...` on the best path. Every source is `dst.len()` long;
/// with no sources `dst` is zeroed.
///
/// # Panics
/// If a source's length differs from `dst`'s (a programmer error).
pub fn xor_gen(srcs: &[&[u8]], dst: &mut [u8]) {
    xor_gen_on(XorPath::best(), srcs, dst);
}

/// `dst ^= srcs[0] ^ srcs[1] ^ ...` on the best path (read-modify-write parity update).
pub fn xor_acc(srcs: &[&[u8]], dst: &mut [u8]) {
    xor_acc_on(XorPath::best(), srcs, dst);
}

/// [`xor_gen`] on a given path.
///
/// # Panics
/// If the CPU does not run `path`, or a source's length differs from `dst`'s.
pub fn xor_gen_on(path: XorPath, srcs: &[&[u8]], dst: &mut [u8]) {
    run(path, srcs, dst, false);
}

/// [`xor_acc`] on a given path.
///
/// # Panics
/// As [`xor_gen_on`].
pub fn xor_acc_on(path: XorPath, srcs: &[&[u8]], dst: &mut [u8]) {
    run(path, srcs, dst, true);
}

fn run(path: XorPath, srcs: &[&[u8]], dst: &mut [u8], acc: bool) {
    assert!(srcs.iter().all(|s| s.len() == dst.len()), "XOR sources and destination differ in length");
    if srcs.is_empty() {
        if !acc {
            dst.fill(0);
        }
        return;
    }
    match path {
        XorPath::Portable => portable(srcs, dst, acc),
        #[cfg(target_arch = "x86_64")]
        XorPath::Avx512 => {
            assert!(is_x86_feature_detected!("avx512f"), "this CPU has no AVX-512F");
            // SAFETY: AVX-512F is present (checked above); every source is as long as
            // `dst` (asserted above).
            unsafe { x86::avx512(srcs, dst, acc) }
        }
        #[cfg(target_arch = "x86_64")]
        XorPath::Avx2 => {
            assert!(is_x86_feature_detected!("avx2"), "this CPU has no AVX2");
            // SAFETY: AVX2 is present (checked above); every source is as long as `dst`.
            unsafe { x86::avx2(srcs, dst, acc) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        XorPath::Avx512 | XorPath::Avx2 => panic!("{} is an x86-64 path", path.name()),
    }
}

/// From byte `from` to the end: word by word, then byte by byte.
fn tail(srcs: &[&[u8]], dst: &mut [u8], acc: bool, from: usize) {
    let mut at = from;
    while at + 8 <= dst.len() {
        let word = |b: &[u8]| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let mut x = if acc { word(dst) } else { 0 };
        for s in srcs {
            x ^= word(s);
        }
        dst[at..at + 8].copy_from_slice(&x.to_le_bytes());
        at += 8;
    }
    for i in at..dst.len() {
        let mut x = if acc { dst[i] } else { 0 };
        for s in srcs {
            x ^= s[i];
        }
        dst[i] = x;
    }
}

fn portable(srcs: &[&[u8]], dst: &mut [u8], acc: bool) {
    tail(srcs, dst, acc, 0);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{tail, STREAM_BYTES_MIN};

    const STEP512: usize = 4 * 64;
    const STEP256: usize = 4 * 32;

    /// # Safety
    /// The CPU runs AVX-512F, and every source is at least `dst.len()` long.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(srcs: &[&[u8]], dst: &mut [u8], acc: bool) {
        let n = dst.len();
        let stream = n >= STREAM_BYTES_MIN;
        let mut at = 0;
        if stream {
            // Non-temporal stores need 64-byte aligned addresses: the bytes before the
            // first aligned one go the ordinary way.
            let head = dst.as_ptr().align_offset(64).min(n);
            tail_range(srcs, dst, acc, 0, head);
            at = head;
        }
        let d = dst.as_mut_ptr();
        while at + STEP512 <= n {
            // SAFETY: [at, at + STEP512) lies within `dst` and within every source (each is
            // at least as long); unaligned loads and stores take any address; the streaming
            // stores' address is 64-byte aligned (the head above).
            unsafe {
                let (mut v0, mut v1, mut v2, mut v3, rest) = if acc {
                    (
                        _mm512_loadu_si512(d.add(at).cast()),
                        _mm512_loadu_si512(d.add(at + 64).cast()),
                        _mm512_loadu_si512(d.add(at + 128).cast()),
                        _mm512_loadu_si512(d.add(at + 192).cast()),
                        srcs,
                    )
                } else {
                    let s = srcs[0].as_ptr();
                    (
                        _mm512_loadu_si512(s.add(at).cast()),
                        _mm512_loadu_si512(s.add(at + 64).cast()),
                        _mm512_loadu_si512(s.add(at + 128).cast()),
                        _mm512_loadu_si512(s.add(at + 192).cast()),
                        &srcs[1..],
                    )
                };
                let mut pairs = rest.chunks_exact(2);
                for pair in &mut pairs {
                    let (a, b) = (pair[0].as_ptr(), pair[1].as_ptr());
                    v0 = _mm512_ternarylogic_epi64::<0x96>(
                        v0,
                        _mm512_loadu_si512(a.add(at).cast()),
                        _mm512_loadu_si512(b.add(at).cast()),
                    );
                    v1 = _mm512_ternarylogic_epi64::<0x96>(
                        v1,
                        _mm512_loadu_si512(a.add(at + 64).cast()),
                        _mm512_loadu_si512(b.add(at + 64).cast()),
                    );
                    v2 = _mm512_ternarylogic_epi64::<0x96>(
                        v2,
                        _mm512_loadu_si512(a.add(at + 128).cast()),
                        _mm512_loadu_si512(b.add(at + 128).cast()),
                    );
                    v3 = _mm512_ternarylogic_epi64::<0x96>(
                        v3,
                        _mm512_loadu_si512(a.add(at + 192).cast()),
                        _mm512_loadu_si512(b.add(at + 192).cast()),
                    );
                }
                if let [last] = pairs.remainder() {
                    let a = last.as_ptr();
                    v0 = _mm512_xor_si512(v0, _mm512_loadu_si512(a.add(at).cast()));
                    v1 = _mm512_xor_si512(v1, _mm512_loadu_si512(a.add(at + 64).cast()));
                    v2 = _mm512_xor_si512(v2, _mm512_loadu_si512(a.add(at + 128).cast()));
                    v3 = _mm512_xor_si512(v3, _mm512_loadu_si512(a.add(at + 192).cast()));
                }
                if stream {
                    _mm512_stream_si512(d.add(at).cast(), v0);
                    _mm512_stream_si512(d.add(at + 64).cast(), v1);
                    _mm512_stream_si512(d.add(at + 128).cast(), v2);
                    _mm512_stream_si512(d.add(at + 192).cast(), v3);
                } else {
                    _mm512_storeu_si512(d.add(at).cast(), v0);
                    _mm512_storeu_si512(d.add(at + 64).cast(), v1);
                    _mm512_storeu_si512(d.add(at + 128).cast(), v2);
                    _mm512_storeu_si512(d.add(at + 192).cast(), v3);
                }
            }
            at += STEP512;
        }
        if stream {
            // Non-temporal stores are weakly ordered: fence them before the caller (or
            // another thread) reads `dst`.
            _mm_sfence();
        }
        tail(srcs, dst, acc, at);
    }

    /// `tail` over `[from, to)` only.
    fn tail_range(srcs: &[&[u8]], dst: &mut [u8], acc: bool, from: usize, to: usize) {
        let cut: Vec<&[u8]> = srcs.iter().map(|s| &s[..to]).collect();
        tail(&cut, &mut dst[..to], acc, from);
    }

    /// # Safety
    /// The CPU runs AVX2, and every source is at least `dst.len()` long.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2(srcs: &[&[u8]], dst: &mut [u8], acc: bool) {
        let n = dst.len();
        let d = dst.as_mut_ptr();
        let mut at = 0;
        while at + STEP256 <= n {
            // SAFETY: [at, at + STEP256) lies within `dst` and within every source;
            // unaligned loads and stores take any address.
            unsafe {
                let (mut v0, mut v1, mut v2, mut v3, rest) = if acc {
                    (
                        _mm256_loadu_si256(d.add(at).cast()),
                        _mm256_loadu_si256(d.add(at + 32).cast()),
                        _mm256_loadu_si256(d.add(at + 64).cast()),
                        _mm256_loadu_si256(d.add(at + 96).cast()),
                        srcs,
                    )
                } else {
                    let s = srcs[0].as_ptr();
                    (
                        _mm256_loadu_si256(s.add(at).cast()),
                        _mm256_loadu_si256(s.add(at + 32).cast()),
                        _mm256_loadu_si256(s.add(at + 64).cast()),
                        _mm256_loadu_si256(s.add(at + 96).cast()),
                        &srcs[1..],
                    )
                };
                for src in rest {
                    let a = src.as_ptr();
                    v0 = _mm256_xor_si256(v0, _mm256_loadu_si256(a.add(at).cast()));
                    v1 = _mm256_xor_si256(v1, _mm256_loadu_si256(a.add(at + 32).cast()));
                    v2 = _mm256_xor_si256(v2, _mm256_loadu_si256(a.add(at + 64).cast()));
                    v3 = _mm256_xor_si256(v3, _mm256_loadu_si256(a.add(at + 96).cast()));
                }
                _mm256_storeu_si256(d.add(at).cast(), v0);
                _mm256_storeu_si256(d.add(at + 32).cast(), v1);
                _mm256_storeu_si256(d.add(at + 64).cast(), v2);
                _mm256_storeu_si256(d.add(at + 96).cast(), v3);
            }
            at += STEP256;
        }
        tail(srcs, dst, acc, at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        let a = [0b1010u8; 300];
        let b = [0b0110u8; 300];
        let mut d = [0xffu8; 300];
        for path in XorPath::available() {
            xor_gen_on(path, &[&a, &b], &mut d);
            assert!(d.iter().all(|&x| x == 0b1100), "{path:?}");
            xor_gen_on(path, &[&a, &a], &mut d);
            assert!(d.iter().all(|&x| x == 0), "{path:?}: x ^ x");
            d.fill(0x0f);
            xor_acc_on(path, &[&a], &mut d);
            assert!(d.iter().all(|&x| x == 0b0101), "{path:?}: acc");
            d.fill(7);
            xor_gen_on(path, &[], &mut d);
            assert!(d.iter().all(|&x| x == 0), "{path:?}: no sources zeroes");
        }
        assert_eq!(XorPath::available().last(), Some(&XorPath::Portable));
        assert_eq!(XorPath::best(), XorPath::available()[0]);
    }

    #[test]
    #[should_panic(expected = "differ in length")]
    fn length_mismatch_is_refused() {
        let mut d = [0u8; 10];
        xor_gen(&[&[1u8; 9]], &mut d);
    }

    #[test]
    fn streaming_stores_equal_the_reference() {
        // Large enough for the non-temporal path, from a misaligned destination.
        let n = STREAM_BYTES_MIN + 4096 + 77;
        let srcs: Vec<Vec<u8>> =
            (0..4u8).map(|k| (0..n).map(|i| i.to_le_bytes()[0].wrapping_mul(k + 3) ^ k).collect()).collect();
        let refs: Vec<&[u8]> = srcs.iter().map(|s| &s[3..]).collect();
        let mut want = vec![0u8; n - 3];
        xor_gen_on(XorPath::Portable, &refs, &mut want);
        for path in XorPath::available() {
            let mut buf = vec![0u8; n];
            xor_gen_on(path, &refs, &mut buf[3..]);
            assert!(buf[3..] == want[..], "{path:?}");
        }
    }

    proptest! {
        #[test]
        fn every_path_equals_the_portable_one(
            nsrc in 1usize..=8,
            len in 0usize..=3000,
            offs in proptest::collection::vec(0usize..64, 9),
            seed in any::<u64>(),
            acc in any::<bool>(),
        ) {
            let mut x = seed | 1;
            let mut next = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x.to_le_bytes()[0] };
            let bufs: Vec<Vec<u8>> = (0..nsrc).map(|_| (0..len + 64).map(|_| next()).collect()).collect();
            let srcs: Vec<&[u8]> = bufs.iter().zip(&offs).map(|(b, &o)| &b[o..o + len]).collect();
            let init: Vec<u8> = (0..len + 64).map(|_| next()).collect();
            let o = offs[8];
            let mut want = init.clone();
            if acc {
                xor_acc_on(XorPath::Portable, &srcs, &mut want[o..o + len]);
            } else {
                xor_gen_on(XorPath::Portable, &srcs, &mut want[o..o + len]);
            }
            // The reference itself: byte by byte.
            for i in 0..len {
                let mut b = if acc { init[o + i] } else { 0 };
                for s in &srcs {
                    b ^= s[i];
                }
                prop_assert_eq!(want[o + i], b);
            }
            for path in XorPath::available() {
                let mut got = init.clone();
                if acc {
                    xor_acc_on(path, &srcs, &mut got[o..o + len]);
                } else {
                    xor_gen_on(path, &srcs, &mut got[o..o + len]);
                }
                prop_assert!(got == want, "{:?} differs (len {}, {} sources, acc {})", path, len, nsrc, acc);
            }
        }
    }
}
