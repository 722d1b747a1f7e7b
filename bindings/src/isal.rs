//! ISA-L's XOR parity (`xor_gen` from `isa-l/raid.h`, Debian's libisal-dev), linked only
//! by the benchmark harness that compares the RAID-4 layer's own XOR with it.

use std::os::raw::{c_int, c_void};

#[link(name = "isal")]
extern "C" {
    /// `array` holds `vects` pointers: the sources, then the destination; `len` bytes each.
    fn xor_gen(vects: c_int, len: c_int, array: *mut *mut c_void) -> c_int;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IsalError {
    #[error("xor_gen needs at least two sources, got {0}")]
    TooFewSources(usize),
    #[error("xor_gen buffers must be equally long: a source is {source_len} bytes, the destination {dst_len}")]
    Length { source_len: usize, dst_len: usize },
    #[error("xor_gen buffers must be 32-byte aligned and a multiple of 32 bytes long")]
    Alignment,
    #[error("xor_gen takes at most {} bytes", c_int::MAX)]
    TooLong,
    #[error("xor_gen failed with {0}")]
    Failed(c_int),
}

/// `dst = srcs[0] ^ srcs[1] ^ ...` by ISA-L.
pub fn xor_gen_isal(srcs: &[&[u8]], dst: &mut [u8]) -> Result<(), IsalError> {
    if srcs.len() < 2 {
        return Err(IsalError::TooFewSources(srcs.len()));
    }
    if let Some(s) = srcs.iter().find(|s| s.len() != dst.len()) {
        return Err(IsalError::Length { source_len: s.len(), dst_len: dst.len() });
    }
    let aligned = |p: *const u8| (p as usize).is_multiple_of(32);
    if !aligned(dst.as_ptr()) || !srcs.iter().all(|s| aligned(s.as_ptr())) || !dst.len().is_multiple_of(32) {
        return Err(IsalError::Alignment);
    }
    let len = c_int::try_from(dst.len()).map_err(|_| IsalError::TooLong)?;
    let vects = c_int::try_from(srcs.len() + 1).map_err(|_| IsalError::TooLong)?;
    let mut array: Vec<*mut c_void> = srcs.iter().map(|s| s.as_ptr().cast_mut().cast()).collect();
    array.push(dst.as_mut_ptr().cast());
    // SAFETY: `array` holds `vects` valid pointers to buffers of `len` bytes each, 32-byte
    // aligned (checked above); ISA-L only reads the sources and writes the destination,
    // which is borrowed mutably and alone for the call.
    let rc = unsafe { xor_gen(vects, len, array.as_mut_ptr()) };
    if rc != 0 {
        return Err(IsalError::Failed(rc));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(align(64))]
    struct Aligned([u8; 4096]);

    #[test]
    fn matches_a_plain_xor_and_checks_its_inputs() {
        let a = Aligned([0x0f; 4096]);
        let b = Aligned([0xf3; 4096]);
        let mut d = Aligned([0; 4096]);
        xor_gen_isal(&[&a.0, &b.0], &mut d.0).unwrap();
        assert!(d.0.iter().all(|&x| x == 0x0f ^ 0xf3));
        assert_eq!(xor_gen_isal(&[&a.0], &mut d.0), Err(IsalError::TooFewSources(1)));
        assert_eq!(xor_gen_isal(&[&a.0[1..33], &b.0[..32]], &mut d.0[..32]), Err(IsalError::Alignment));
        assert!(matches!(xor_gen_isal(&[&a.0[..64], &b.0], &mut d.0), Err(IsalError::Length { .. })));
    }
}
