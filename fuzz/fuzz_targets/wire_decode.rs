//! The replication frame decoder on hostile bytes: as they come (mostly failing the frame
//! checksum), and wrapped in a valid header and checksum so that every message body
//! decoder is reached. It must answer with a message or an error, never panic, and never
//! claim more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvmirror_dataplane::transport::wire::{self, frame_crc, frame_header, BODY_MAX, FRAME_HEADER_BYTES};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((_, used))) = wire::decode(rest) {
        assert!(used >= FRAME_HEADER_BYTES && used <= rest.len());
        rest = &rest[used..];
    }
    if let Some((&kind, body)) = data.split_first() {
        if body.len() <= BODY_MAX {
            let mut frame = frame_header(kind, body.len(), frame_crc(kind, body.len(), &[body])).to_vec();
            frame.extend_from_slice(body);
            if let Ok(Some((_, used))) = wire::decode(&frame) {
                assert_eq!(used, frame.len());
            }
        }
    }
});
