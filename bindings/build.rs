//! Detects, for the rdma feature, whether the system's rdma-core headers offer RDMA FLUSH
//! (`IBV_WR_FLUSH`, rdma-core 45 and later): the RDMA engine says at start-up which
//! durability it uses.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(rdma_flush_in_headers)");
    if std::env::var_os("CARGO_FEATURE_RDMA").is_none() {
        return;
    }
    println!("cargo::rerun-if-changed=/usr/include/infiniband/verbs.h");
    let headers = std::fs::read_to_string("/usr/include/infiniband/verbs.h").unwrap_or_default();
    if headers.contains("IBV_WR_FLUSH") {
        println!("cargo::rustc-cfg=rdma_flush_in_headers");
    }
}
