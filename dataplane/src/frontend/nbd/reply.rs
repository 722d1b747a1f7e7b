//! Structured replies: the chunks of read data, block status and errors.

use super::*;

/// Appends a structured reply chunk header.
pub(super) fn push_chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends the head of a read's one `OFFSET_DATA` chunk; its `len` bytes of data follow.
pub(super) fn push_read_head(out: &mut Vec<u8>, cookie: u64, offset: u64, len: u32) {
    push_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, len + 8);
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends a final `ERROR` chunk (no message).
pub(super) fn push_error_chunk(out: &mut Vec<u8>, cookie: u64, errno: u32) {
    push_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6);
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
}

/// Appends the `BLOCK_STATUS` chunk for `data`, the bytes of the volume from `offset`:
/// runs of 4 KiB blocks (the first up to the next block boundary) that read as zeroes, and
/// of those that do not. With `req_one`, the first run alone.
pub(super) fn push_block_status(out: &mut Vec<u8>, cookie: u64, offset: u64, data: &[u8], req_one: bool) {
    let block = u64::from(BLOCK_BYTES_PREFERRED);
    let mut extents: Vec<(u32, u32)> = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let to_boundary = block - (offset + at as u64) % block;
        let end = data.len().min(at + usize::try_from(to_boundary).expect("below one block"));
        let piece = &data[at..end];
        let state = if piece.iter().all(|&b| b == 0) { STATE_ZERO } else { 0 };
        let len = u32::try_from(end - at).expect("a piece is at most one block");
        match extents.last_mut() {
            Some((l, s)) if *s == state => *l += len,
            _ => {
                if req_one && !extents.is_empty() {
                    break;
                }
                extents.push((len, state));
            }
        }
        at = end;
    }
    let len = u32::try_from(4 + 8 * extents.len()).expect("at most 2048 extents");
    push_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len);
    out.extend_from_slice(&META_ALLOCATION_ID.to_be_bytes());
    for (l, state) in extents {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&state.to_be_bytes());
    }
}
