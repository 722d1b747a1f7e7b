//! FFI for nvmirror, and nothing else.
//!
//! Every use of a `-sys` crate (rdma-sys for verbs and rdma_cm, NVMe passthrough
//! structures for io_uring `uring_cmd`) lives here, behind thin safe wrappers: RAII
//! handles that keep their parent alive and check return codes on drop. The TCP engine
//! of the data plane needs no FFI beyond `libc`, so this crate is empty until the RDMA
//! and NVMe passthrough engines land; the workspace keeps its place so that nothing
//! outside it grows raw bindings in the meantime.
#![deny(unsafe_op_in_unsafe_fn)]
