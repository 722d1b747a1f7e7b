use super::*;
use proptest::prelude::*;

fn samples() -> Vec<Message<'static>> {
    vec![
        Message::Hello(Hello {
            source_node: "a".into(),
            volume: "vol".into(),
            volume_id: 1,
            epoch: 2,
            volume_bytes: 3,
            partition_bytes: 4,
            intent: Intent::Resume,
            base_seq: 5,
            base_cp_gen: 6,
            features: 0,
        }),
        Message::Welcome(Welcome {
            epoch: 1,
            applied_cp: 2,
            applied_seq: 3,
            consistent: true,
            resyncable: true,
            copy_marks: true,
            header_crc_entries: true,
            source_paths: true,
            mirror_nvmf: "10.0.0.2:4420".into(),
            logs: [LogTail { open: true, cp_gen: 1, first_seq: 2, next_seq: 3, tail: 4 }, LogTail::default()],
        }),
        Message::CopyMark { next: 5 << 16, bytes: 3 << 16, chunks: 2 },
        Message::SourcePaths { nvmf: "10.0.0.1:4420".into() },
        Message::SourcePaths { nvmf: String::new() },
        Message::Refuse { code: RefuseCode::StaleEpoch, reason: "old".into() },
        Message::PartitionOpen { header: [7; 64] },
        Message::Entries { partition: 1, offset: 64, bytes: &[1, 2, 3] },
        Message::Cp { cp: 9, partition: 1, upto_seq: 77, by_value: true },
        Message::BlockData { purpose: BlockPurpose::Baseline, offset: 4096, data: &[9; 10] },
        Message::BaselineDone { volume_bytes: 1 << 30 },
        Message::ZeroRange { purpose: BlockPurpose::Baseline, offset: 1 << 20, len: 3 << 20 },
        Message::ZeroRange { purpose: BlockPurpose::Resync, offset: 0, len: 4096 },
        Message::ResyncDone { bytes: 1 << 20, chunks: 3 },
        Message::BlockData { purpose: BlockPurpose::Resync, offset: 1 << 16, data: &[1; 8] },
        Message::Hello(Hello {
            source_node: "b".into(),
            volume: "vol".into(),
            volume_id: 1,
            epoch: 3,
            volume_bytes: 3,
            partition_bytes: 4,
            intent: Intent::Resync,
            base_seq: 5,
            base_cp_gen: 6,
            features: FEATURE_COPY_MARKS,
        }),
        Message::Ack { seq: 5 },
        Message::CpDone { cp: 5 },
        Message::BaselineAck,
        Message::Error { reason: "bad".into() },
        Message::RdmaSetup,
        Message::RdmaListen { addr: "10.0.0.1:7100".into(), token: 99 },
        Message::RdmaRegions {
            regions: [RdmaRegion { addr: 1, rkey: 2, len: 3 }, RdmaRegion { addr: 4, rkey: 5, len: 6 }],
        },
        Message::Refuse { code: RefuseCode::Unauthenticated, reason: "who are you".into() },
        Message::LogFetch { partition: 1, offset: 4160 },
        Message::LogBytes { partition: 0, offset: 8256, bytes: &[7u8; 300] },
        Message::LogFetchEnd { partition: 1, tail: 12345 },
        Message::AuthRequest { nonce: [1; 32] },
        Message::AuthChallenge { nonce: [2; 32] },
        Message::AuthProof { proof: [3; 32] },
    ]
}

#[test]
fn every_message_round_trips() {
    for m in samples() {
        let bytes = m.encode();
        let (back, used) = decode(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back, m);
        // Every strict prefix is "need more", never an error or a panic.
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), Ok(None));
        }
    }
}

#[test]
fn entries_prefix_matches_encode() {
    let bytes = [5u8; 200];
    let whole = Message::Entries { partition: 1, offset: 4160, bytes: &bytes }.encode();
    let p = entries_prefix(1, 4160, &bytes, false);
    assert_eq!(&whole[..p.len()], &p[..]);
}

/// An entries frame under `FLAG_HEADER_CRC`: its header and prefix are checked, its
/// entries are left to their own checksums, and the flag is taken on nothing else.
#[test]
fn header_crc_entries_cover_header_and_prefix_only() {
    let bytes = [5u8; 200];
    let frame = |header_crc: bool| {
        let mut f = entries_prefix(1, 4160, &bytes, header_crc).to_vec();
        f.extend_from_slice(&bytes);
        f
    };
    let want = Message::Entries { partition: 1, offset: 4160, bytes: &bytes };
    let f = frame(true);
    assert_eq!(decode(&f), Ok(Some((want.clone(), f.len()))));
    // The entries' bytes are not the frame's to check; without the flag they are.
    let mut g = f.clone();
    g[FRAME_HEADER_BYTES + ENTRIES_PREFIX_BYTES + 7] ^= 1;
    assert!(matches!(decode(&g), Ok(Some((Message::Entries { .. }, _)))));
    let mut g = frame(false);
    g[FRAME_HEADER_BYTES + ENTRIES_PREFIX_BYTES + 7] ^= 1;
    assert_eq!(decode(&g), Err(WireError::BadChecksum));
    // Every byte of the header and the prefix is covered, the flag included.
    for i in (0..FRAME_HEADER_BYTES + ENTRIES_PREFIX_BYTES).filter(|i| !(8..12).contains(i)) {
        let mut g = f.clone();
        g[i] ^= 0x10;
        assert!(!matches!(decode(&g), Ok(Some(_))), "byte {i} changed unnoticed");
    }
    // The flag on another kind, or another flag: refused, whatever the crc says.
    let mut ack = Message::Ack { seq: 1 }.encode();
    ack[6..8].copy_from_slice(&FLAG_HEADER_CRC.to_le_bytes());
    let crc = crc32c(&[&ack[..12], &ack[FRAME_HEADER_BYTES..]]);
    ack[12..16].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(decode(&ack), Err(WireError::BadField("frame", "flags on a frame that takes none")));
    let mut g = f.clone();
    g[6..8].copy_from_slice(&3u16.to_le_bytes());
    assert_eq!(decode(&g), Err(WireError::BadField("entries", "unknown frame flags")));
    // A body shorter than the prefix it claims to cover.
    let mut short = frame_header(K_ENTRIES, 4, 0).to_vec();
    short[6..8].copy_from_slice(&FLAG_HEADER_CRC.to_le_bytes());
    short.extend_from_slice(&[1, 0, 0, 0]);
    assert_eq!(decode(&short), Err(WireError::Truncated("entries")));
}

#[test]
fn hostile_headers_are_refused_before_allocation() {
    let mut f = Message::Ack { seq: 1 }.encode();
    f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(decode(&f), Err(WireError::TooLarge(u32::MAX)));
    let mut f = Message::Ack { seq: 1 }.encode();
    f[0] ^= 1;
    assert!(matches!(decode(&f), Err(WireError::BadMagic(_))));
    let mut f = Message::Ack { seq: 1 }.encode();
    f[20] ^= 1;
    assert_eq!(decode(&f), Err(WireError::BadChecksum));
}

#[test]
fn auth_frames_are_exactly_their_nonce_or_proof() {
    for kind in [K_AUTH_REQUEST, K_AUTH_CHALLENGE, K_AUTH_PROOF] {
        for len in [0usize, 1, 31, 33, 64] {
            let body = vec![9u8; len];
            let mut f = frame_header(kind, len, frame_crc(kind, len, &[&body])).to_vec();
            f.extend_from_slice(&body);
            let e = decode(&f).unwrap_err();
            assert!(
                matches!(e, WireError::Truncated(_) | WireError::Trailing(_, _)),
                "kind {kind} with a {len}-byte body: {e:?}"
            );
        }
    }
    // A refusal code this build does not know is an error, not a default.
    let body = [7u8, 0, 0, 0];
    let mut f = frame_header(K_REFUSE, body.len(), frame_crc(K_REFUSE, body.len(), &[&body])).to_vec();
    f.extend_from_slice(&body);
    assert_eq!(decode(&f), Err(WireError::BadField("refuse", "unknown refusal code")));
}

proptest! {
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn flipped_bits_are_caught(idx in 0usize..40, bit in 0u8..8) {
        let m = Message::Cp { cp: 9, partition: 1, upto_seq: 77, by_value: false };
        let mut f = m.encode();
        let idx = idx % f.len();
        f[idx] ^= 1 << bit;
        prop_assert!(!matches!(decode(&f), Ok(Some(_))), "corruption went unnoticed");
    }
}
