//! NBD server (placeholder until written).
