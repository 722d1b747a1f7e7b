//! FFI for nvmirror, and nothing else.
//!
//! Every use of a `-sys` crate (rdma-sys for verbs and rdma_cm; ISA-L's XOR for the benchmark;
//! NVMe passthrough structures for io_uring `uring_cmd`) lives here, behind thin safe wrappers: RAII
//! handles that keep their parent alive and check return codes on drop, `# Safety`
//! sections on every unsafe fn and a `// SAFETY:` comment on every unsafe block. Engines
//! that link system libraries are behind cargo features, so the default build needs only
//! the Rust toolchain.
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "isal")]
pub mod isal;
pub mod nvme;
#[cfg(feature = "rdma")]
pub mod rdma;
