//! NVMe passthrough structures for io_uring `uring_cmd` on the namespace char device
//! (`/dev/ngXnY`), from the kernel's `include/uapi/linux/nvme_ioctl.h`. No `-sys` crate
//! carries them; they are declared here by hand, their layout checked at compile time.
//! Always compiled: they link nothing.

/// `struct nvme_uring_cmd`: the 72 bytes an NVMe I/O command takes in the 80-byte
/// command area of a 128-byte submission queue entry.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NvmeUringCmd {
    pub opcode: u8,
    pub flags: u8,
    pub rsvd1: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub metadata: u64,
    pub addr: u64,
    pub metadata_len: u32,
    pub data_len: u32,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
    pub timeout_ms: u32,
    pub rsvd2: u32,
}

const _: () = assert!(std::mem::size_of::<NvmeUringCmd>() == 72);
const _: () = assert!(std::mem::offset_of!(NvmeUringCmd, addr) == 24);
const _: () = assert!(std::mem::offset_of!(NvmeUringCmd, cdw10) == 40);

/// NVM command set opcodes.
pub const NVME_CMD_FLUSH: u8 = 0x00;
pub const NVME_CMD_WRITE: u8 = 0x01;
pub const NVME_CMD_READ: u8 = 0x02;

const fn iowr(ty: u8, nr: u8, size: usize) -> u32 {
    // _IOC(_IOC_READ | _IOC_WRITE, type, nr, size): direction in bits 30-31, size in 16-29.
    assert!(size < 1 << 14, "an ioctl size has 14 bits");
    #[allow(clippy::cast_possible_truncation)] // checked just above
    let size = size as u32;
    (3u32 << 30) | (size << 16) | ((ty as u32) << 8) | nr as u32
}

/// `NVME_URING_CMD_IO`: the `cmd_op` of an I/O command sent with `IORING_OP_URING_CMD`.
pub const NVME_URING_CMD_IO: u32 = iowr(b'N', 0x80, std::mem::size_of::<NvmeUringCmd>());
/// `NVME_IOCTL_ID`: `ioctl(fd, NVME_IOCTL_ID)` returns the namespace id.
pub const NVME_IOCTL_ID: u32 = (b'N' as u32) << 8 | 0x40;

const _: () = assert!(NVME_URING_CMD_IO == 0xC048_4E80);

impl NvmeUringCmd {
    /// A read or write of `nlb` logical blocks at `slba`, `data_len` bytes at `addr`.
    pub fn rw(opcode: u8, nsid: u32, slba: u64, nlb: u32, addr: u64, data_len: u32) -> Self {
        assert!((1..=1 << 16).contains(&nlb), "1 to 65536 blocks per command");
        NvmeUringCmd {
            opcode,
            nsid,
            addr,
            data_len,
            cdw10: u32::try_from(slba & 0xffff_ffff).expect("32 bits"),
            cdw11: u32::try_from(slba >> 32).expect("32 bits"),
            // Number of logical blocks, 0-based.
            cdw12: nlb - 1,
            ..Default::default()
        }
    }

    /// The 80-byte command area of a submission queue entry holding this command.
    pub fn to_bytes(&self) -> [u8; 80] {
        let mut out = [0u8; 80];
        let mut at = 0;
        let mut put = |b: &[u8]| {
            out[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        };
        put(&[self.opcode, self.flags]);
        put(&self.rsvd1.to_le_bytes());
        for v in [self.nsid, self.cdw2, self.cdw3] {
            put(&v.to_le_bytes());
        }
        put(&self.metadata.to_le_bytes());
        put(&self.addr.to_le_bytes());
        for v in [
            self.metadata_len,
            self.data_len,
            self.cdw10,
            self.cdw11,
            self.cdw12,
            self.cdw13,
            self.cdw14,
            self.cdw15,
            self.timeout_ms,
            self.rsvd2,
        ] {
            put(&v.to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_encode_as_the_kernel_lays_them_out() {
        let c = NvmeUringCmd::rw(NVME_CMD_WRITE, 1, 0x1_0000_0002, 8, 0xdead_beef_0000, 4096);
        let b = c.to_bytes();
        assert_eq!(b[0], NVME_CMD_WRITE);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1, "nsid");
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 0xdead_beef_0000, "addr");
        assert_eq!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 4096, "data_len");
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 2, "slba low");
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 1, "slba high");
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 7, "nlb, 0-based");
        assert!(b[72..].iter().all(|&x| x == 0));
        assert_eq!(NVME_IOCTL_ID, 0x4E40);
    }
}
