//! NVMe/TCP PDUs: the common header, the decoder of what a host sends and the encoders of
//! what a controller answers (NVMe/TCP Transport Specification, section 3.6).
//!
//! Every PDU starts with an 8-byte common header: type u8, flags u8, header length
//! (`hlen`) u8, data offset (`pdo`) u8, total length (`plen`) u32, little-endian. After the
//! PDU-specific header come the header digest (crc32c of the `hlen` header bytes, where
//! negotiated), padding up to `pdo`, the data, and the data digest (crc32c of the data,
//! where negotiated and the PDU carries data).
//!
//! [`PduReader`] takes bytes as the socket gives them and hands out whole PDUs. Before a
//! PDU is buffered its header is checked against the bounds of the connection: a `plen`
//! past [`PduReader::plen_max`] is refused from the first 8 bytes, so a length field never
//! sizes an allocation past that bound.

use std::io::{self, Read};
use std::ops::Range;

use crate::checksum::crc32c;

pub const TYPE_IC_REQ: u8 = 0x00;
pub const TYPE_IC_RESP: u8 = 0x01;
pub const TYPE_H2C_TERM_REQ: u8 = 0x02;
pub const TYPE_C2H_TERM_REQ: u8 = 0x03;
pub const TYPE_CAPSULE_CMD: u8 = 0x04;
pub const TYPE_CAPSULE_RESP: u8 = 0x05;
pub const TYPE_H2C_DATA: u8 = 0x06;
pub const TYPE_C2H_DATA: u8 = 0x07;
pub const TYPE_R2T: u8 = 0x09;

pub const FLAG_HDGST: u8 = 1 << 0;
pub const FLAG_DDGST: u8 = 1 << 1;
pub const FLAG_LAST_PDU: u8 = 1 << 2;

pub const CH_BYTES: usize = 8;
pub const IC_BYTES: usize = 128;
pub const SQE_BYTES: usize = 64;
pub const CQE_BYTES: usize = 16;
pub const CAPSULE_CMD_HLEN: usize = CH_BYTES + SQE_BYTES;
pub const CAPSULE_RESP_HLEN: usize = CH_BYTES + CQE_BYTES;
pub const DATA_HLEN: usize = 24;
pub const R2T_HLEN: usize = 24;
pub const TERM_HLEN: usize = 24;
pub const DIGEST_BYTES: usize = 4;
/// Bytes of the offending PDU's header a termination request carries back.
pub const TERM_DATA_MAX: usize = 128;

/// Fatal error status of a termination request (the FES field).
pub const FES_INVALID_HEADER: u16 = 0x01;
pub const FES_SEQUENCE: u16 = 0x02;
pub const FES_HEADER_DIGEST: u16 = 0x03;
pub const FES_OUT_OF_RANGE: u16 = 0x04;
pub const FES_LIMIT_EXCEEDED: u16 = 0x05;
pub const FES_UNSUPPORTED: u16 = 0x06;

/// A PDU the host sent, whole and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pdu {
    IcReq {
        pfv: u16,
        hpda: u8,
        header_digest: bool,
        data_digest: bool,
        maxr2t: u32,
    },
    CapsuleCmd {
        sqe: [u8; SQE_BYTES],
        /// In-capsule data.
        data: Vec<u8>,
    },
    H2CData {
        cccid: u16,
        ttag: u16,
        datao: u32,
        data: Vec<u8>,
        last: bool,
    },
    TermReq {
        fes: u16,
        fei: u32,
    },
}

/// Why a PDU was refused: the connection ends with a termination request carrying `fes`
/// and `fei` (the byte offset of the field at fault), and a log line with `what`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}")]
pub struct PduError {
    pub fes: u16,
    pub fei: u32,
    pub what: String,
    /// The first bytes of the offending PDU (at most [`TERM_DATA_MAX`]).
    pub header: Vec<u8>,
}

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Buffers a connection's bytes and decodes them into [`Pdu`]s.
pub struct PduReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Set once the connection is initialized (ICReq answered): digests as negotiated.
    pub header_digest: bool,
    pub data_digest: bool,
    initialized: bool,
    /// Largest data a capsule may carry in it.
    capsule_data_max: usize,
    /// Largest data one H2CData PDU may carry.
    h2c_data_max: usize,
}

impl PduReader {
    /// A reader for a new connection: only an ICReq is accepted until [`Self::initialize`].
    pub fn new(capsule_data_max: usize, h2c_data_max: usize) -> Self {
        PduReader {
            buf: vec![0; 64 << 10],
            start: 0,
            end: 0,
            header_digest: false,
            data_digest: false,
            initialized: false,
            capsule_data_max,
            h2c_data_max,
        }
    }

    /// The ICReq was answered: from now on PDUs carry the digests negotiated.
    pub fn initialize(&mut self, header_digest: bool, data_digest: bool) {
        self.initialized = true;
        self.header_digest = header_digest;
        self.data_digest = data_digest;
    }

    /// Capsules of an admin queue carry up to 8 KiB of data (the host's own bound),
    /// those of an I/O queue what the controller advertised.
    pub fn set_capsule_data_max(&mut self, bytes: usize) {
        self.capsule_data_max = bytes;
    }

    /// The largest PDU this reader accepts now.
    pub fn plen_max(&self) -> usize {
        if !self.initialized {
            return IC_BYTES;
        }
        let data = self.capsule_data_max.max(self.h2c_data_max).max(TERM_DATA_MAX);
        CAPSULE_CMD_HLEN + 2 * DIGEST_BYTES + 256 + data
    }

    /// Whether the buffer has no room for more bytes: it holds a whole PDU (the largest
    /// fits), which must be decoded first.
    pub fn full(&self) -> bool {
        self.end == self.buf.len() && self.end - self.start >= self.plen_max()
    }

    /// Whether bytes are buffered that do not make a whole PDU yet.
    pub fn partial(&self) -> bool {
        self.end > self.start
    }

    /// Reads once from `r` into the buffer; `Ok(0)` at end of stream.
    pub fn fill(&mut self, r: &mut impl Read) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let want = self.plen_max();
        if self.buf.len() - self.start < want && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        if self.end == self.buf.len() {
            // A whole PDU fits; the caller decodes before reading more.
            return Err(io::Error::other("PDU buffer full"));
        }
        let n = r.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Takes bytes already read elsewhere (tests, fuzzing).
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if self.end + bytes.len() > self.buf.len() {
            self.buf.resize(self.end + bytes.len(), 0);
        }
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// The next whole PDU, if the buffer holds one.
    pub fn next_pdu(&mut self) -> Result<Option<Pdu>, PduError> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < CH_BYTES {
            return Ok(None);
        }
        let (kind, flags, hlen, pdo, plen) =
            (avail[0], avail[1], avail[2] as usize, avail[3] as usize, get_u32(avail, 4));
        let head = &avail[..avail.len().min(TERM_DATA_MAX)];
        let fail = |fes: u16, fei: u32, what: String| PduError {
            fes,
            fei,
            what,
            header: head[..head.len().min(CH_BYTES)].to_vec(),
        };
        let plen = usize::try_from(plen).unwrap_or(usize::MAX);
        if plen > self.plen_max() {
            return Err(fail(
                FES_LIMIT_EXCEEDED,
                4,
                format!("PDU type {kind:#04x} of {plen} bytes exceeds the {}-byte bound", self.plen_max()),
            ));
        }
        if !self.initialized && kind != TYPE_IC_REQ {
            return Err(fail(
                FES_SEQUENCE,
                0,
                format!("PDU type {kind:#04x} before the connection was initialized (ICReq)"),
            ));
        }
        if self.initialized && kind == TYPE_IC_REQ {
            return Err(fail(FES_SEQUENCE, 0, "a second ICReq".into()));
        }
        let want_hlen = match kind {
            TYPE_IC_REQ => IC_BYTES,
            TYPE_CAPSULE_CMD => CAPSULE_CMD_HLEN,
            TYPE_H2C_DATA => DATA_HLEN,
            TYPE_H2C_TERM_REQ => TERM_HLEN,
            other => return Err(fail(FES_INVALID_HEADER, 0, format!("PDU type {other:#04x} is not one a host sends"))),
        };
        if hlen != want_hlen {
            return Err(fail(
                FES_INVALID_HEADER,
                2,
                format!("PDU type {kind:#04x} with header length {hlen}, expected {want_hlen}"),
            ));
        }
        let hd = if kind != TYPE_IC_REQ && kind != TYPE_H2C_TERM_REQ && self.header_digest { DIGEST_BYTES } else { 0 };
        if plen < hlen + hd {
            return Err(fail(
                FES_INVALID_HEADER,
                4,
                format!("PDU length {plen} shorter than its header ({})", hlen + hd),
            ));
        }
        if avail.len() < plen {
            return Ok(None);
        }
        let pdu = &avail[..plen];
        if kind != TYPE_IC_REQ && kind != TYPE_H2C_TERM_REQ && (flags & FLAG_HDGST != 0) != self.header_digest {
            return Err(fail(
                FES_INVALID_HEADER,
                1,
                format!("header digest flag {} against the negotiated {}", flags & FLAG_HDGST != 0, self.header_digest),
            ));
        }
        if hd > 0 && get_u32(pdu, hlen) != crc32c(&pdu[..hlen]) {
            return Err(fail(
                FES_HEADER_DIGEST,
                u32::try_from(hlen).unwrap_or(0),
                format!("header digest mismatch on PDU type {kind:#04x}"),
            ));
        }
        // Data, where the PDU has any: from pdo to the end, less the data digest.
        let data: Range<usize> = if plen > hlen + hd {
            if kind == TYPE_IC_REQ {
                return Err(fail(FES_INVALID_HEADER, 4, format!("ICReq of {plen} bytes, expected {IC_BYTES}")));
            }
            if kind == TYPE_H2C_TERM_REQ {
                hlen..plen
            } else {
                if pdo < hlen + hd || pdo > plen {
                    return Err(fail(
                        FES_INVALID_HEADER,
                        3,
                        format!("data offset {pdo} outside {}..={plen}", hlen + hd),
                    ));
                }
                let dd = if flags & FLAG_DDGST != 0 { DIGEST_BYTES } else { 0 };
                if (dd > 0) != self.data_digest {
                    return Err(fail(
                        FES_INVALID_HEADER,
                        1,
                        format!("data digest flag {} against the negotiated {}", dd > 0, self.data_digest),
                    ));
                }
                if plen < pdo + dd {
                    return Err(fail(
                        FES_INVALID_HEADER,
                        4,
                        format!("PDU length {plen} leaves no room for the data digest"),
                    ));
                }
                let data = pdo..plen - dd;
                if dd > 0 && get_u32(pdu, plen - dd) != crc32c(&pdu[data.clone()]) {
                    return Err(fail(
                        FES_HEADER_DIGEST,
                        u32::try_from(plen - dd).unwrap_or(0),
                        format!("data digest mismatch on PDU type {kind:#04x}"),
                    ));
                }
                data
            }
        } else {
            plen..plen
        };
        let decoded = match kind {
            TYPE_IC_REQ => Pdu::IcReq {
                pfv: get_u16(pdu, 8),
                hpda: pdu[10],
                header_digest: pdu[11] & 1 != 0,
                data_digest: pdu[11] & 2 != 0,
                maxr2t: get_u32(pdu, 12),
            },
            TYPE_CAPSULE_CMD => {
                if data.len() > self.capsule_data_max {
                    return Err(fail(
                        FES_LIMIT_EXCEEDED,
                        4,
                        format!(
                            "{} bytes of in-capsule data exceed the {}-byte bound",
                            data.len(),
                            self.capsule_data_max
                        ),
                    ));
                }
                let mut sqe = [0u8; SQE_BYTES];
                sqe.copy_from_slice(&pdu[CH_BYTES..CAPSULE_CMD_HLEN]);
                Pdu::CapsuleCmd { sqe, data: pdu[data].to_vec() }
            }
            TYPE_H2C_DATA => {
                let datal = get_u32(pdu, 16) as usize;
                if datal != data.len() {
                    return Err(fail(
                        FES_INVALID_HEADER,
                        16,
                        format!("H2CData says {datal} bytes and carries {}", data.len()),
                    ));
                }
                if datal > self.h2c_data_max {
                    return Err(fail(
                        FES_LIMIT_EXCEEDED,
                        16,
                        format!("H2CData of {datal} bytes exceeds the {}-byte bound", self.h2c_data_max),
                    ));
                }
                Pdu::H2CData {
                    cccid: get_u16(pdu, 8),
                    ttag: get_u16(pdu, 10),
                    datao: get_u32(pdu, 12),
                    data: pdu[data].to_vec(),
                    last: flags & FLAG_LAST_PDU != 0,
                }
            }
            _ => Pdu::TermReq { fes: get_u16(pdu, 8), fei: get_u32(pdu, 10) },
        };
        self.start += plen;
        Ok(Some(decoded))
    }
}

/// Writes a common header.
fn common(out: &mut Vec<u8>, kind: u8, flags: u8, hlen: usize, pdo: usize, plen: usize) {
    out.push(kind);
    out.push(flags);
    out.push(u8::try_from(hlen).unwrap_or(u8::MAX));
    out.push(u8::try_from(pdo).unwrap_or(u8::MAX));
    out.extend_from_slice(&u32::try_from(plen).unwrap_or(u32::MAX).to_le_bytes());
}

/// How this connection's PDUs are framed, as negotiated by ICReq/ICResp.
#[derive(Debug, Clone, Copy, Default)]
pub struct Framing {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The host's PDU data alignment: data starts at a multiple of `(hpda + 1) * 4`.
    pub hpda: u8,
}

impl Framing {
    fn hd(&self) -> usize {
        if self.header_digest {
            DIGEST_BYTES
        } else {
            0
        }
    }

    fn flags(&self, data: bool) -> u8 {
        let mut f = 0;
        if self.header_digest {
            f |= FLAG_HDGST;
        }
        if data && self.data_digest {
            f |= FLAG_DDGST;
        }
        f
    }

    /// Appends the header digest of the header that starts at `at`.
    fn seal_header(&self, out: &mut Vec<u8>, at: usize) {
        if self.header_digest {
            let d = crc32c(&out[at..]);
            out.extend_from_slice(&d.to_le_bytes());
        }
    }

    /// ICResp: no alignment asked of the host's data, digests as the host asked.
    pub fn ic_resp(&self, out: &mut Vec<u8>, maxh2cdata: u32) {
        let at = out.len();
        common(out, TYPE_IC_RESP, 0, IC_BYTES, 0, IC_BYTES);
        out.extend_from_slice(&0u16.to_le_bytes()); // PFV 0
        out.push(0); // CPDA
        out.push(u8::from(self.header_digest) | (u8::from(self.data_digest) << 1));
        out.extend_from_slice(&maxh2cdata.to_le_bytes());
        out.resize(at + IC_BYTES, 0);
    }

    /// A response capsule holding `cqe`.
    pub fn capsule_resp(&self, out: &mut Vec<u8>, cqe: &[u8; CQE_BYTES]) {
        let at = out.len();
        common(out, TYPE_CAPSULE_RESP, self.flags(false), CAPSULE_RESP_HLEN, 0, CAPSULE_RESP_HLEN + self.hd());
        out.extend_from_slice(cqe);
        self.seal_header(out, at);
    }

    /// Where a data PDU's data starts.
    fn data_offset(&self) -> usize {
        let align = (usize::from(self.hpda) + 1) * 4;
        (DATA_HLEN + self.hd()).div_ceil(align) * align
    }

    /// A C2HData PDU carrying `data` at offset `datao` of command `cccid`'s transfer.
    pub fn c2h_data(&self, out: &mut Vec<u8>, cccid: u16, datao: u32, data: &[u8], last: bool) {
        let at = self.c2h_data_head(out, cccid, datao, data.len(), last);
        out.extend_from_slice(data);
        self.c2h_data_digest(out, at);
    }

    /// The header of a C2HData PDU of `len` bytes of data (and its padding): the data goes
    /// at the returned offset of `out`, then [`Self::c2h_data_digest`] ends the PDU.
    pub fn c2h_data_head(&self, out: &mut Vec<u8>, cccid: u16, datao: u32, len: usize, last: bool) -> usize {
        let at = out.len();
        let pdo = self.data_offset();
        let dd = if self.data_digest { DIGEST_BYTES } else { 0 };
        let mut flags = self.flags(true);
        if last {
            flags |= FLAG_LAST_PDU;
        }
        common(out, TYPE_C2H_DATA, flags, DATA_HLEN, pdo, pdo + len + dd);
        out.extend_from_slice(&cccid.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&datao.to_le_bytes());
        out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        self.seal_header(out, at);
        out.resize(at + pdo, 0);
        out.len()
    }

    /// Ends a C2HData PDU whose data starts at `data_at` of `out` and runs to its end.
    pub fn c2h_data_digest(&self, out: &mut Vec<u8>, data_at: usize) {
        if self.data_digest {
            let d = crc32c(&out[data_at..]);
            out.extend_from_slice(&d.to_le_bytes());
        }
    }

    /// A ready-to-transfer PDU asking the host for `r2tl` bytes from `r2to` of command
    /// `cccid`'s data, to be sent with transfer tag `ttag`.
    pub fn r2t(&self, out: &mut Vec<u8>, cccid: u16, ttag: u16, r2to: u32, r2tl: u32) {
        let at = out.len();
        common(out, TYPE_R2T, self.flags(false), R2T_HLEN, 0, R2T_HLEN + self.hd());
        out.extend_from_slice(&cccid.to_le_bytes());
        out.extend_from_slice(&ttag.to_le_bytes());
        out.extend_from_slice(&r2to.to_le_bytes());
        out.extend_from_slice(&r2tl.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        self.seal_header(out, at);
    }
}

/// A C2HTermReq: the controller ends the connection, saying why.
pub fn c2h_term_req(out: &mut Vec<u8>, err: &PduError) {
    let data = &err.header[..err.header.len().min(TERM_DATA_MAX)];
    common(out, TYPE_C2H_TERM_REQ, 0, TERM_HLEN, 0, TERM_HLEN + data.len());
    out.extend_from_slice(&err.fes.to_le_bytes());
    out.extend_from_slice(&err.fei.to_le_bytes());
    out.extend_from_slice(&[0; 10]);
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ic_req(digests: u8) -> Vec<u8> {
        let mut b = vec![0u8; IC_BYTES];
        b[0] = TYPE_IC_REQ;
        b[2] = 128;
        b[4..8].copy_from_slice(&128u32.to_le_bytes());
        b[11] = digests;
        b
    }

    fn capsule(framing: Framing, sqe: [u8; 64], data: &[u8]) -> Vec<u8> {
        let hd = if framing.header_digest { 4 } else { 0 };
        let dd = if framing.data_digest && !data.is_empty() { 4 } else { 0 };
        let pdo = if data.is_empty() { 0 } else { CAPSULE_CMD_HLEN + hd };
        let mut flags = if framing.header_digest { FLAG_HDGST } else { 0 };
        if dd > 0 {
            flags |= FLAG_DDGST;
        }
        let mut b = Vec::new();
        common(&mut b, TYPE_CAPSULE_CMD, flags, CAPSULE_CMD_HLEN, pdo, CAPSULE_CMD_HLEN + hd + data.len() + dd);
        b.extend_from_slice(&sqe);
        if hd > 0 {
            let d = crc32c(&b);
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(data);
        if dd > 0 {
            b.extend_from_slice(&crc32c(data).to_le_bytes());
        }
        b
    }

    #[test]
    fn ic_req_then_capsules_with_digests_decode_byte_by_byte() {
        let mut r = PduReader::new(8192, 65536);
        let mut stream = ic_req(3);
        let framing = Framing { header_digest: true, data_digest: true, hpda: 0 };
        let mut sqe = [0u8; 64];
        sqe[0] = 0x01;
        sqe[2] = 7;
        stream.extend(capsule(framing, sqe, b"hello world"));
        let mut got = Vec::new();
        for b in &stream {
            r.push(std::slice::from_ref(b));
            while let Some(p) = r.next_pdu().expect("valid") {
                if let Pdu::IcReq { header_digest, data_digest, .. } = p {
                    r.initialize(header_digest, data_digest);
                }
                got.push(p);
            }
        }
        assert_eq!(got.len(), 2);
        assert!(matches!(got[0], Pdu::IcReq { header_digest: true, data_digest: true, .. }));
        assert_eq!(got[1], Pdu::CapsuleCmd { sqe, data: b"hello world".to_vec() });
        assert!(!r.partial());
    }

    #[test]
    fn a_corrupt_digest_or_a_huge_length_is_refused_with_its_status() {
        let mut r = PduReader::new(8192, 65536);
        r.push(&ic_req(1));
        let Some(Pdu::IcReq { header_digest, data_digest, .. }) = r.next_pdu().unwrap() else { panic!() };
        r.initialize(header_digest, data_digest);
        let mut c = capsule(Framing { header_digest: true, ..Default::default() }, [0; 64], &[]);
        c[CAPSULE_CMD_HLEN] ^= 1;
        r.push(&c);
        assert_eq!(r.next_pdu().unwrap_err().fes, FES_HEADER_DIGEST);

        let mut r = PduReader::new(8192, 65536);
        r.initialize(false, false);
        let mut huge = Vec::new();
        common(&mut huge, TYPE_H2C_DATA, 0, DATA_HLEN, DATA_HLEN, u32::MAX as usize);
        r.push(&huge);
        assert_eq!(r.next_pdu().unwrap_err().fes, FES_LIMIT_EXCEEDED);

        let mut r = PduReader::new(8192, 65536);
        r.initialize(false, false);
        r.push(&capsule(Framing::default(), [0; 64], &[7u8; 8193]));
        assert_eq!(r.next_pdu().unwrap_err().fes, FES_LIMIT_EXCEEDED);

        let mut r = PduReader::new(8192, 65536);
        r.push(&capsule(Framing::default(), [0; 64], &[]));
        assert_eq!(r.next_pdu().unwrap_err().fes, FES_SEQUENCE, "a capsule before ICReq");
    }

    #[test]
    fn c2h_data_is_aligned_and_digested_as_negotiated() {
        let f = Framing { header_digest: true, data_digest: true, hpda: 1 };
        let mut out = Vec::new();
        f.c2h_data(&mut out, 9, 0, b"abcd", true);
        assert_eq!(out[0], TYPE_C2H_DATA);
        assert_eq!(out[1], FLAG_HDGST | FLAG_DDGST | FLAG_LAST_PDU);
        let pdo = out[3] as usize;
        assert_eq!(pdo % 8, 0);
        assert!(pdo >= DATA_HLEN + 4);
        assert_eq!(get_u32(&out, DATA_HLEN), crc32c(&out[..DATA_HLEN]));
        assert_eq!(&out[pdo..pdo + 4], b"abcd");
        assert_eq!(get_u32(&out, pdo + 4), crc32c(b"abcd"));
        assert_eq!(get_u32(&out, 4) as usize, out.len());
    }
}
