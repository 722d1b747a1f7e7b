//! NVLog recovery on a hostile partition image (a torn, corrupt or forged log): the scan
//! stops at the first entry it cannot trust and says why; every entry it returns decodes
//! with a valid checksum, in sequence, inside the image.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvmirror_dataplane::format::{scan_partition, EntryHeader, PartitionHeader};

fuzz_target!(|data: &[u8]| {
    let _ = PartitionHeader::decode(data);
    let _ = EntryHeader::decode(data);
    for p in [0u8, 1] {
        let scan = scan_partition(data, p);
        let mut last = None;
        for e in &scan.entries {
            assert!(e.at < data.len());
            let (h, body) = EntryHeader::decode(&data[e.at..]).expect("a scanned entry decodes");
            assert_eq!(h, e.header);
            assert!(body.len() <= data.len());
            if let Some(prev) = last {
                assert!(h.seq > prev, "scanned entries out of sequence");
            }
            last = Some(h.seq);
        }
    }
});
