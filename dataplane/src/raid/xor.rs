//! Parity by XOR: `dst = src[0] ^ src[1] ^ ...`.
//!
//! Paths: AVX-512 (three-way `vpternlogq`), AVX2 and portable, chosen once at run time.
//! (SIMD paths to come; the portable path is the reference every other path must equal.)

/// An implementation of the XOR kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XorPath {
    Portable,
}

impl XorPath {
    /// The fastest path this CPU runs.
    pub fn best() -> Self {
        XorPath::Portable
    }
    pub const fn name(self) -> &'static str {
        match self {
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

pub fn xor_gen_on(path: XorPath, srcs: &[&[u8]], dst: &mut [u8]) {
    check_lengths(srcs, dst);
    match path {
        XorPath::Portable => portable(srcs, dst, false),
    }
}

pub fn xor_acc_on(path: XorPath, srcs: &[&[u8]], dst: &mut [u8]) {
    check_lengths(srcs, dst);
    match path {
        XorPath::Portable => portable(srcs, dst, true),
    }
}

fn check_lengths(srcs: &[&[u8]], dst: &[u8]) {
    assert!(srcs.iter().all(|s| s.len() == dst.len()), "XOR sources and destination differ in length");
}

fn portable(srcs: &[&[u8]], dst: &mut [u8], acc: bool) {
    if !acc {
        dst.fill(0);
    }
    for s in srcs {
        for (d, x) in dst.iter_mut().zip(s.iter()) {
            *d ^= *x;
        }
    }
}
