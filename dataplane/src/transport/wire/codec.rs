//! Frames to bytes and back: each message's body, the frame header and its crc32c, and the
//! decoder that takes a frame from the front of a buffer, refusing what is malformed.

use super::*;

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        let s = &s.as_bytes()[..s.len().min(STRING_MAX)];
        self.u16(u16::try_from(s.len()).expect("bounded by STRING_MAX"));
        self.0.extend_from_slice(s);
    }
    /// The layout of `Entries`, `BlockData` and `LogBytes`: a byte, three of padding, an
    /// offset, then the bytes to the end of the body.
    fn bulk(&mut self, small: u8, offset: u64, bytes: &[u8]) {
        self.u8(small);
        self.0.extend_from_slice(&[0; 3]);
        self.u64(offset);
        self.0.extend_from_slice(bytes);
    }
}

struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Truncated(self.what));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn str(&mut self) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        if n > STRING_MAX {
            return Err(WireError::BadField(self.what, "string too long"));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::BadField(self.what, "string is not UTF-8"))
    }
    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::BadField(self.what, "boolean not 0 or 1")),
        }
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    /// The layout [`Writer::bulk`] writes: the byte, the offset and the bytes.
    fn bulk(&mut self) -> Result<(u8, u64, &'a [u8]), WireError> {
        let small = self.u8()?;
        self.take(3)?;
        let offset = self.u64()?;
        Ok((small, offset, self.rest()))
    }
    fn end(self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.what, self.b.len()))
        }
    }
}

/// The frame header for a body of `body_len` bytes whose crc (over header[0..12] and the
/// body) is computed by the caller through [`frame_crc`].
pub fn frame_header(kind: u8, body_len: usize, crc: u32) -> [u8; FRAME_HEADER_BYTES] {
    let mut h = [0u8; FRAME_HEADER_BYTES];
    h[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    h[4] = FRAME_VERSION;
    h[5] = kind;
    h[8..12].copy_from_slice(&u32::try_from(body_len).expect("body below BODY_MAX").to_le_bytes());
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// crc32c over the first 12 header bytes and the body parts.
pub fn frame_crc(kind: u8, body_len: usize, body: &[&[u8]]) -> u32 {
    let h = frame_header(kind, body_len, 0);
    let mut crc = crate::checksum::Crc32cStream::new();
    crc.update(&h[..12]);
    for part in body {
        crc.update(part);
    }
    crc.finish()
}

/// The header and body prefix of an `Entries` frame; the entry bytes follow it on the
/// wire unchanged (sent straight from the NVLog). With `header_crc` (where the
/// destination's welcome takes it), the frame's crc covers the header and this prefix
/// only ([`FLAG_HEADER_CRC`]).
pub fn entries_prefix(
    partition: u8,
    offset: u64,
    bytes: &[u8],
    header_crc: bool,
) -> [u8; FRAME_HEADER_BYTES + ENTRIES_PREFIX_BYTES] {
    let mut prefix = [0u8; ENTRIES_PREFIX_BYTES];
    prefix[0] = partition;
    prefix[4..12].copy_from_slice(&offset.to_le_bytes());
    let body_len = ENTRIES_PREFIX_BYTES + bytes.len();
    let mut header = frame_header(K_ENTRIES, body_len, 0);
    let covered: &[u8] = if header_crc {
        header[6..8].copy_from_slice(&FLAG_HEADER_CRC.to_le_bytes());
        &[]
    } else {
        bytes
    };
    let crc = crc32c(&[&header[..12], &prefix, covered]);
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    let mut out = [0u8; FRAME_HEADER_BYTES + ENTRIES_PREFIX_BYTES];
    out[..FRAME_HEADER_BYTES].copy_from_slice(&header);
    out[FRAME_HEADER_BYTES..].copy_from_slice(&prefix);
    out
}

impl Message<'_> {
    /// Encodes the whole frame (header and body).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(64));
        let kind = match self {
            Message::Hello(h) => {
                w.str(&h.source_node);
                w.str(&h.volume);
                w.u64(h.volume_id);
                w.u64(h.epoch);
                w.u64(h.volume_bytes);
                w.u64(h.partition_bytes);
                w.u8(h.intent as u8);
                w.u64(h.base_seq);
                w.u64(h.base_cp_gen);
                K_HELLO
            }
            Message::Welcome(wl) => {
                w.u64(wl.epoch);
                w.u64(wl.applied_cp);
                w.u64(wl.applied_seq);
                w.u8(u8::from(wl.consistent)
                    | (u8::from(wl.resyncable) << 1)
                    | (u8::from(wl.copy_marks) << 2)
                    | (u8::from(wl.header_crc_entries) << 3)
                    | (u8::from(wl.source_paths) << 4));
                for t in &wl.logs {
                    w.u8(u8::from(t.open));
                    w.u64(t.cp_gen);
                    w.u64(t.first_seq);
                    w.u64(t.next_seq);
                    w.u64(t.tail);
                }
                if wl.source_paths {
                    w.str(&wl.mirror_nvmf);
                }
                K_WELCOME
            }
            Message::Refuse { code, reason } => {
                w.u16(*code as u16);
                w.str(reason);
                K_REFUSE
            }
            Message::PartitionOpen { header } => {
                w.0.extend_from_slice(header);
                K_PARTITION_OPEN
            }
            Message::Entries { partition, offset, bytes } => {
                w.bulk(*partition, *offset, bytes);
                K_ENTRIES
            }
            Message::Cp { cp, partition, upto_seq, by_value } => {
                w.u64(*cp);
                w.u8(*partition);
                w.u64(*upto_seq);
                w.u8(u8::from(*by_value));
                K_CP
            }
            Message::BlockData { purpose, offset, data } => {
                w.bulk(*purpose as u8, *offset, data);
                K_BLOCK_DATA
            }
            Message::ZeroRange { purpose, offset, len } => {
                w.u8(*purpose as u8);
                w.u64(*offset);
                w.u64(*len);
                K_ZERO_RANGE
            }
            Message::BaselineDone { volume_bytes } => {
                w.u64(*volume_bytes);
                K_BASELINE_DONE
            }
            Message::CopyMark { next, bytes, chunks } => {
                w.u64(*next);
                w.u64(*bytes);
                w.u64(*chunks);
                K_COPY_MARK
            }
            Message::SourcePaths { nvmf } => {
                w.str(nvmf);
                K_SOURCE_PATHS
            }
            Message::ResyncDone { bytes, chunks } => {
                w.u64(*bytes);
                w.u64(*chunks);
                K_RESYNC_DONE
            }
            Message::Ack { seq } => {
                w.u64(*seq);
                K_ACK
            }
            Message::CpDone { cp } => {
                w.u64(*cp);
                K_CP_DONE
            }
            Message::BaselineAck => K_BASELINE_ACK,
            Message::Error { reason } => {
                w.str(reason);
                K_ERROR
            }
            Message::RdmaSetup => K_RDMA_SETUP,
            Message::RdmaListen { addr, token } => {
                w.str(addr);
                w.u64(*token);
                K_RDMA_LISTEN
            }
            Message::RdmaRegions { regions } => {
                for r in regions {
                    w.u64(r.addr);
                    w.0.extend_from_slice(&r.rkey.to_le_bytes());
                    w.u64(r.len);
                }
                K_RDMA_REGIONS
            }
            Message::LogFetch { partition, offset } => {
                w.u8(*partition);
                w.u64(*offset);
                K_LOG_FETCH
            }
            Message::LogBytes { partition, offset, bytes } => {
                w.bulk(*partition, *offset, bytes);
                K_LOG_BYTES
            }
            Message::LogFetchEnd { partition, tail } => {
                w.u8(*partition);
                w.u64(*tail);
                K_LOG_FETCH_END
            }
            Message::AuthRequest { nonce } => {
                w.0.extend_from_slice(nonce);
                K_AUTH_REQUEST
            }
            Message::AuthChallenge { nonce } => {
                w.0.extend_from_slice(nonce);
                K_AUTH_CHALLENGE
            }
            Message::AuthProof { proof } => {
                w.0.extend_from_slice(proof);
                K_AUTH_PROOF
            }
        };
        let body = w.0;
        assert!(body.len() <= BODY_MAX, "frame body above BODY_MAX");
        let flags = if let Message::Hello(h) = self { h.features } else { 0 };
        let mut header = frame_header(kind, body.len(), 0);
        header[6..8].copy_from_slice(&flags.to_le_bytes());
        let crc = crc32c(&[&header[..12], &body]);
        header[12..16].copy_from_slice(&crc.to_le_bytes());
        let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&body);
        out
    }
}

/// Checks a frame header; returns (kind, body_len). Call before reading the body, so a
/// hostile length is refused before any allocation.
pub fn decode_header(h: &[u8; FRAME_HEADER_BYTES]) -> Result<(u8, usize), WireError> {
    let magic = u32::from_le_bytes(h[0..4].try_into().expect("4"));
    if magic != FRAME_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if h[4] != FRAME_VERSION {
        return Err(WireError::BadVersion(h[4]));
    }
    let len = u32::from_le_bytes(h[8..12].try_into().expect("4"));
    if len as usize > BODY_MAX {
        return Err(WireError::TooLarge(len));
    }
    Ok((h[5], len as usize))
}

/// Decodes one whole frame from the start of `buf`. `Ok(None)` when `buf` holds less than
/// one frame (read more); otherwise the message and the bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Message<'_>, usize)>, WireError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let header: &[u8; FRAME_HEADER_BYTES] = buf[..FRAME_HEADER_BYTES].try_into().expect("16");
    let (kind, body_len) = decode_header(header)?;
    let total = FRAME_HEADER_BYTES + body_len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[FRAME_HEADER_BYTES..total];
    let stored = u32::from_le_bytes(header[12..16].try_into().expect("4"));
    let flags = u16::from_le_bytes(header[6..8].try_into().expect("2"));
    // What the crc covers; the header bytes it covers include the flags, so a flag changed
    // on the way fails the check too.
    let covered = match (kind, flags) {
        (K_HELLO, _) | (_, 0) => body,
        (K_ENTRIES, FLAG_HEADER_CRC) => body.get(..ENTRIES_PREFIX_BYTES).ok_or(WireError::Truncated("entries"))?,
        (K_ENTRIES, _) => return Err(WireError::BadField("entries", "unknown frame flags")),
        _ => return Err(WireError::BadField("frame", "flags on a frame that takes none")),
    };
    if stored != crc32c(&[&header[..12], covered]) {
        return Err(WireError::BadChecksum);
    }
    let mut msg = decode_body(kind, body)?;
    if let Message::Hello(h) = &mut msg {
        h.features = flags;
    }
    Ok(Some((msg, total)))
}

fn purpose(b: u8) -> Option<BlockPurpose> {
    match b {
        1 => Some(BlockPurpose::CpByValue),
        2 => Some(BlockPurpose::Baseline),
        3 => Some(BlockPurpose::Resync),
        _ => None,
    }
}

fn decode_body(kind: u8, body: &[u8]) -> Result<Message<'_>, WireError> {
    let name = match kind {
        K_HELLO => "hello",
        K_WELCOME => "welcome",
        K_REFUSE => "refuse",
        K_PARTITION_OPEN => "partition-open",
        K_ENTRIES => "entries",
        K_CP => "cp",
        K_BLOCK_DATA => "block-data",
        K_BASELINE_DONE => "baseline-done",
        K_ACK => "ack",
        K_CP_DONE => "cp-done",
        K_BASELINE_ACK => "baseline-ack",
        K_ERROR => "error",
        K_RDMA_SETUP => "rdma-setup",
        K_RDMA_LISTEN => "rdma-listen",
        K_RDMA_REGIONS => "rdma-regions",
        K_RESYNC_DONE => "resync-done",
        K_COPY_MARK => "copy-mark",
        K_SOURCE_PATHS => "source-paths",
        K_LOG_FETCH => "log-fetch",
        K_LOG_BYTES => "log-bytes",
        K_LOG_FETCH_END => "log-fetch-end",
        K_ZERO_RANGE => "zero-range",
        K_AUTH_REQUEST => "auth-request",
        K_AUTH_CHALLENGE => "auth-challenge",
        K_AUTH_PROOF => "auth-proof",
        _ => return Err(WireError::BadKind(kind)),
    };
    let mut r = Reader { b: body, what: name };
    let msg = match kind {
        K_HELLO => {
            let source_node = r.str()?;
            let volume = r.str()?;
            let volume_id = r.u64()?;
            let epoch = r.u64()?;
            let volume_bytes = r.u64()?;
            let partition_bytes = r.u64()?;
            let intent = match r.u8()? {
                1 => Intent::Resume,
                2 => Intent::Baseline,
                3 => Intent::Resync,
                _ => return Err(WireError::BadField(name, "unknown intent")),
            };
            let base_seq = r.u64()?;
            let base_cp_gen = r.u64()?;
            Message::Hello(Hello {
                source_node,
                volume,
                volume_id,
                epoch,
                volume_bytes,
                partition_bytes,
                intent,
                base_seq,
                base_cp_gen,
                features: 0,
            })
        }
        K_WELCOME => {
            let epoch = r.u64()?;
            let applied_cp = r.u64()?;
            let applied_seq = r.u64()?;
            let state = r.u8()?;
            if state & !31 != 0 {
                return Err(WireError::BadField(name, "unknown mirror state bits"));
            }
            let (consistent, resyncable, copy_marks) = (state & 1 != 0, state & 2 != 0, state & 4 != 0);
            let (header_crc_entries, source_paths) = (state & 8 != 0, state & 16 != 0);
            let mut logs = [LogTail::default(); 2];
            for t in &mut logs {
                t.open = r.bool()?;
                t.cp_gen = r.u64()?;
                t.first_seq = r.u64()?;
                t.next_seq = r.u64()?;
                t.tail = r.u64()?;
            }
            let mirror_nvmf = if source_paths { r.str()? } else { String::new() };
            Message::Welcome(Welcome {
                epoch,
                applied_cp,
                applied_seq,
                consistent,
                resyncable,
                copy_marks,
                header_crc_entries,
                source_paths,
                logs,
                mirror_nvmf,
            })
        }
        K_REFUSE => {
            let code = match r.u16()? {
                1 => RefuseCode::StaleEpoch,
                2 => RefuseCode::Mismatch,
                3 => RefuseCode::Busy,
                4 => RefuseCode::Broken,
                5 => RefuseCode::Internal,
                6 => RefuseCode::Unauthenticated,
                _ => return Err(WireError::BadField(name, "unknown refusal code")),
            };
            Message::Refuse { code, reason: r.str()? }
        }
        K_PARTITION_OPEN => {
            let header = r.take(PARTITION_HEADER_BYTES)?.try_into().expect("64");
            Message::PartitionOpen { header }
        }
        K_ENTRIES => {
            let (partition, offset, bytes) = r.bulk()?;
            if bytes.is_empty() {
                return Err(WireError::BadField(name, "no entries"));
            }
            Message::Entries { partition, offset, bytes }
        }
        K_CP => Message::Cp { cp: r.u64()?, partition: r.u8()?, upto_seq: r.u64()?, by_value: r.bool()? },
        K_BLOCK_DATA => {
            let purpose = purpose(r.u8()?).ok_or(WireError::BadField(name, "unknown purpose"))?;
            r.take(3)?;
            let offset = r.u64()?;
            let data = r.rest();
            if data.is_empty() {
                return Err(WireError::BadField(name, "no data"));
            }
            Message::BlockData { purpose, offset, data }
        }
        K_ZERO_RANGE => {
            let purpose = match purpose(r.u8()?) {
                Some(p @ (BlockPurpose::Baseline | BlockPurpose::Resync)) => p,
                _ => return Err(WireError::BadField(name, "purpose not baseline or resync")),
            };
            let (offset, len) = (r.u64()?, r.u64()?);
            if len == 0 {
                return Err(WireError::BadField(name, "empty range"));
            }
            Message::ZeroRange { purpose, offset, len }
        }
        K_BASELINE_DONE => Message::BaselineDone { volume_bytes: r.u64()? },
        K_RESYNC_DONE => Message::ResyncDone { bytes: r.u64()?, chunks: r.u64()? },
        K_COPY_MARK => Message::CopyMark { next: r.u64()?, bytes: r.u64()?, chunks: r.u64()? },
        K_SOURCE_PATHS => Message::SourcePaths { nvmf: r.str()? },
        K_ACK => Message::Ack { seq: r.u64()? },
        K_CP_DONE => Message::CpDone { cp: r.u64()? },
        K_BASELINE_ACK => Message::BaselineAck,
        K_ERROR => Message::Error { reason: r.str()? },
        K_RDMA_SETUP => Message::RdmaSetup,
        K_RDMA_LISTEN => Message::RdmaListen { addr: r.str()?, token: r.u64()? },
        K_RDMA_REGIONS => {
            let mut regions = [RdmaRegion::default(); 2];
            for g in &mut regions {
                g.addr = r.u64()?;
                g.rkey = u32::from_le_bytes(r.take(4)?.try_into().expect("4"));
                g.len = r.u64()?;
            }
            Message::RdmaRegions { regions }
        }
        K_LOG_FETCH => Message::LogFetch { partition: r.u8()?, offset: r.u64()? },
        K_LOG_BYTES => {
            let (partition, offset, bytes) = r.bulk()?;
            if bytes.is_empty() || bytes.len() > LOG_BYTES_CHUNK {
                return Err(WireError::BadField(name, "empty, or above the chunk size"));
            }
            Message::LogBytes { partition, offset, bytes }
        }
        K_LOG_FETCH_END => Message::LogFetchEnd { partition: r.u8()?, tail: r.u64()? },
        K_AUTH_REQUEST => Message::AuthRequest { nonce: r.take(NONCE_BYTES)?.try_into().expect("32") },
        K_AUTH_CHALLENGE => Message::AuthChallenge { nonce: r.take(NONCE_BYTES)?.try_into().expect("32") },
        K_AUTH_PROOF => Message::AuthProof { proof: r.take(MAC_BYTES)?.try_into().expect("32") },
        _ => unreachable!("kind checked above"),
    };
    if matches!(
        msg,
        Message::PartitionOpen { .. }
            | Message::Hello(_)
            | Message::Welcome(_)
            | Message::Cp { .. }
            | Message::ZeroRange { .. }
            | Message::BaselineDone { .. }
            | Message::ResyncDone { .. }
            | Message::CopyMark { .. }
            | Message::SourcePaths { .. }
            | Message::Ack { .. }
            | Message::CpDone { .. }
            | Message::BaselineAck
            | Message::Refuse { .. }
            | Message::Error { .. }
            | Message::RdmaSetup
            | Message::RdmaListen { .. }
            | Message::RdmaRegions { .. }
            | Message::LogFetch { .. }
            | Message::LogFetchEnd { .. }
            | Message::AuthRequest { .. }
            | Message::AuthChallenge { .. }
            | Message::AuthProof { .. }
    ) {
        r.end()?;
    }
    Ok(msg)
}
