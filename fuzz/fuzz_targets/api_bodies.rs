//! The control API's request bodies and the disk specs in them, from hostile JSON: decoded
//! or refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvmirror_control::api::{CreateVolume, MirrorRequest, ReplaceDisk, ScrubRequest};
use nvmirror_control::storage::storage_from_args;
use nvmirror_dataplane::storage::DiskSpec;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<CreateVolume>(data) {
        let _ = storage_from_args(&v.disks, v.parity.as_deref());
    }
    let _ = serde_json::from_slice::<MirrorRequest>(data);
    let _ = serde_json::from_slice::<ScrubRequest>(data);
    if let Ok(r) = serde_json::from_slice::<ReplaceDisk>(data) {
        let _ = DiskSpec::parse(&r.new);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = DiskSpec::parse(s);
    }
});
