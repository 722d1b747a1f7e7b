//! The data a command brings: in its capsule, or fetched with R2T and H2CData PDUs. What
//! both the threaded queues and a volume's reactor do with it.

use std::collections::HashMap;

use super::pdu::{PduError, FES_OUT_OF_RANGE, FES_SEQUENCE};
use super::{Status, TRANSFER_BYTES_MAX};

/// SGL descriptor types (byte 15 of the descriptor): data block with an offset into the
/// capsule, and transport data block (data comes by R2T and H2CData, or goes by C2HData).
pub(super) const SGL_IN_CAPSULE: u8 = 0x01;
pub(super) const SGL_TRANSPORT: u8 = 0x5a;
const OPC_FABRICS: u8 = 0x7f;

/// Where a command's data stands once its capsule is in.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Data {
    /// At hand (none, or what the capsule carried): the command can be served.
    Here(Vec<u8>),
    /// This many bytes are to be fetched from the host first (an R2T; see
    /// [`Transfers::start`]).
    Fetch(usize),
    /// Refused with this status, without fetching anything.
    Refuse(Status),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Checks the data of command `sqe` against its SGL descriptor: in-capsule data must be
/// what the descriptor says (offset 0, its length); a command that sends data to the
/// controller with a transport descriptor and no in-capsule data fetches it.
pub(super) fn data_of(sqe: &[u8; 64], data: Vec<u8>) -> Data {
    let opcode = sqe[0];
    let host_to_controller = if opcode == OPC_FABRICS { sqe[4] & 3 == 1 } else { opcode & 3 == 1 };
    let sgl_len = u32_at(sqe, 32) as usize;
    if host_to_controller && data.is_empty() && sqe[39] == SGL_TRANSPORT && sgl_len > 0 {
        return Data::Fetch(sgl_len);
    }
    let in_capsule = sqe[24..32].iter().all(|&b| b == 0) && sqe[39] == SGL_IN_CAPSULE && sgl_len == data.len();
    if !data.is_empty() && !in_capsule {
        return Data::Refuse(Status::DATA_SGL_LENGTH);
    }
    Data::Here(data)
}

/// Write data being fetched with R2T.
struct Transfer {
    sqe: [u8; 64],
    data: Vec<u8>,
    total: usize,
}

/// A command whose data is whole: its 64 bytes and the data.
pub(super) type Whole = ([u8; 64], Vec<u8>);

/// Why a transfer was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NotStarted {
    /// More than [`TRANSFER_BYTES_MAX`]: answered with [`Status::DATA_SGL_LENGTH`].
    TooLarge,
    /// The queue holds as many as it may: the host broke flow control.
    TooMany,
}

/// A queue's transfers in progress, by transfer tag.
#[derive(Default)]
pub(super) struct Transfers {
    by_tag: HashMap<u16, Transfer>,
    next_tag: u16,
}

impl Transfers {
    pub fn is_empty(&self) -> bool {
        self.by_tag.is_empty()
    }

    /// Starts fetching `len` bytes for command `sqe`, unless it is too large or `limit`
    /// transfers are in progress; returns the transfer tag its R2T names.
    pub fn start(&mut self, sqe: [u8; 64], len: usize, limit: usize) -> Result<u16, NotStarted> {
        if len > TRANSFER_BYTES_MAX {
            return Err(NotStarted::TooLarge);
        }
        if self.by_tag.len() >= limit {
            return Err(NotStarted::TooMany);
        }
        let mut tag = self.next_tag;
        while self.by_tag.contains_key(&tag) {
            tag = tag.wrapping_add(1);
        }
        self.next_tag = tag.wrapping_add(1);
        self.by_tag.insert(tag, Transfer { sqe, data: Vec::with_capacity(len), total: len });
        Ok(tag)
    }

    /// Takes an H2CData PDU's data. Once a transfer is whole, returns its command and
    /// data. An H2CData PDU that does not continue a transfer exactly (unknown tag,
    /// another command, a gap, an overrun, marked last too early) ends the connection.
    pub fn receive(
        &mut self,
        cccid: u16,
        tag: u16,
        datao: u32,
        data: &[u8],
        last: bool,
    ) -> Result<Option<Whole>, PduError> {
        let fail = |fes, fei, what| PduError { fes, fei, what, header: Vec::new() };
        let Some(t) = self.by_tag.get_mut(&tag) else {
            return Err(fail(FES_SEQUENCE, 10, format!("H2CData for unknown transfer tag {tag}")));
        };
        let cid = u16::from_le_bytes([t.sqe[2], t.sqe[3]]);
        if cccid != cid || datao as usize != t.data.len() || t.data.len() + data.len() > t.total {
            let what = format!(
                "H2CData (command {cccid}, offset {datao}, {} bytes) does not continue transfer {tag} (command {cid}, {} of {} bytes)",
                data.len(),
                t.data.len(),
                t.total
            );
            return Err(fail(FES_OUT_OF_RANGE, 12, what));
        }
        t.data.extend_from_slice(data);
        if t.data.len() < t.total {
            if last {
                let what = format!("H2CData marked last after {} of {} bytes", t.data.len(), t.total);
                return Err(fail(FES_SEQUENCE, 1, what));
            }
            return Ok(None);
        }
        let t = self.by_tag.remove(&tag).expect("present");
        Ok(Some((t.sqe, t.data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqe(opcode: u8, sgl_type: u8, sgl_len: u32) -> [u8; 64] {
        let mut s = [0u8; 64];
        s[0] = opcode;
        s[2] = 7;
        s[32..36].copy_from_slice(&sgl_len.to_le_bytes());
        s[39] = sgl_type;
        s
    }

    #[test]
    fn capsule_data_is_checked_against_its_descriptor() {
        assert_eq!(data_of(&sqe(0x01, SGL_IN_CAPSULE, 4), vec![1; 4]), Data::Here(vec![1; 4]));
        assert_eq!(data_of(&sqe(0x01, SGL_IN_CAPSULE, 8), vec![1; 4]), Data::Refuse(Status::DATA_SGL_LENGTH));
        assert_eq!(data_of(&sqe(0x01, SGL_TRANSPORT, 8192), vec![]), Data::Fetch(8192));
        assert_eq!(data_of(&sqe(0x02, SGL_TRANSPORT, 4096), vec![]), Data::Here(vec![]), "a read fetches nothing");
        let mut connect = sqe(OPC_FABRICS, SGL_TRANSPORT, 1024);
        connect[4] = 0x01;
        assert_eq!(data_of(&connect, vec![]), Data::Fetch(1024));
    }

    #[test]
    fn a_transfer_completes_only_in_order_and_whole() {
        let mut t = Transfers::default();
        assert_eq!(t.start(sqe(0x01, SGL_TRANSPORT, 8), TRANSFER_BYTES_MAX + 1, 4), Err(NotStarted::TooLarge));
        assert_eq!(t.start(sqe(0x01, SGL_TRANSPORT, 8), 8, 0), Err(NotStarted::TooMany));
        let tag = t.start(sqe(0x01, SGL_TRANSPORT, 8), 8, 4).unwrap();
        assert_eq!(t.receive(7, tag, 0, &[1; 4], false), Ok(None));
        assert_eq!(t.receive(7, tag, 0, &[1; 4], false).unwrap_err().fes, FES_OUT_OF_RANGE, "a gap or a repeat");
        let (s, data) = t.receive(7, tag, 4, &[2; 4], true).unwrap().unwrap();
        assert_eq!((s[0], data), (0x01, vec![1, 1, 1, 1, 2, 2, 2, 2]));
        assert!(t.is_empty());
        let tag = t.start(sqe(0x01, SGL_TRANSPORT, 8), 8, 4).unwrap();
        assert_eq!(t.receive(7, tag, 0, &[1; 4], true).unwrap_err().fes, FES_SEQUENCE, "last too early");
        assert_eq!(t.receive(7, tag + 9, 0, &[1; 4], true).unwrap_err().fes, FES_SEQUENCE, "unknown tag");
        assert_eq!(t.receive(8, tag, 4, &[1; 4], true).unwrap_err().fes, FES_OUT_OF_RANGE, "another command");
    }
}
