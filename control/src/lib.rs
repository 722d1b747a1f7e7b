//! nvmirror control plane: the node runtime, its HTTP/JSON API and the command line.

pub mod allow;
pub mod api;
pub mod cluster;
pub mod config;
pub mod etcd;
pub mod events;
pub mod fleet;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod quickstart;
pub mod size;
pub mod storage;
pub mod tls;
pub mod workload;
