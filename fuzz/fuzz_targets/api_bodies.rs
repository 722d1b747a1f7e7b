//! The control API's request bodies and the disk specs in them, from hostile JSON: decoded
//! or refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvmirror_control::api::{
    AllowRequest, CopyRequest, CreateVolume, DeleteRequest, MirrorRequest, ReplaceDisk, ResyncRequest, RoleChange,
    ScrubRequest, VerifyRequest,
};
use nvmirror_control::storage::storage_from_args;
use nvmirror_dataplane::storage::DiskSpec;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<CreateVolume>(data) {
        let _ = storage_from_args(&v.disks, v.parity.as_deref());
        let _ = nvmirror_control::allow::parse(&v.allow);
    }
    if let Ok(a) = serde_json::from_slice::<AllowRequest>(data) {
        let _ = nvmirror_control::allow::parse(&a.allow);
    }
    if let Ok(v) = serde_json::from_slice::<VerifyRequest>(data) {
        let r = v.region.unwrap_or(1 << 20);
        let _ = nvmirror_control::node::check_span(r, r);
    }
    let _ = serde_json::from_slice::<DeleteRequest>(data);
    let _ = serde_json::from_slice::<CopyRequest>(data);
    let _ = serde_json::from_slice::<RoleChange>(data);
    let _ = serde_json::from_slice::<ResyncRequest>(data);
    let _ = serde_json::from_slice::<MirrorRequest>(data);
    let _ = serde_json::from_slice::<ScrubRequest>(data);
    if let Ok(r) = serde_json::from_slice::<ReplaceDisk>(data) {
        let _ = DiskSpec::parse(&r.new);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = DiskSpec::parse(s);
    }
});
