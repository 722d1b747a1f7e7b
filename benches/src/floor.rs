//! The floor of a replication hop: a plain TCP ping-pong over loopback.
//!
//! The client writes one message of exactly the bytes a 4 KiB replication hop puts on the
//! wire (frame header, `Entries` prefix, entry header: [`REQUEST_HEADER_BYTES`], then the
//! 4 KiB payload) with one `writev`, and busy-polls the socket with non-blocking `recv`
//! until the 8-byte reply is in, as the source's poller busy-polls its link. The server
//! thread blocks in `read` until the whole message is there and answers 8 bytes, as the
//! destination's receiver thread does. Both sockets have `TCP_NODELAY`, like the
//! replication engine's. Nothing else happens: no checksum, no copy into a log, no
//! persist. What the real hop costs above this is the price of the protocol and the
//! destination's work.

use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nvmirror_dataplane::format::{BLOCK_BYTES, ENTRY_HEADER_BYTES};
use nvmirror_dataplane::transport::wire::{ENTRIES_PREFIX_BYTES, FRAME_HEADER_BYTES};

/// Bytes before the payload of a one-entry `Entries` frame.
pub const REQUEST_HEADER_BYTES: usize = FRAME_HEADER_BYTES + ENTRIES_PREFIX_BYTES + ENTRY_HEADER_BYTES;
/// Bytes of the reply (an `Ack` frame is 24; the floor answers the smallest useful reply).
pub const REPLY_BYTES: usize = 8;
/// How long a round trip may take before the harness gives up.
const ROUND_TRIP_MAX: Duration = Duration::from_secs(10);

/// A connected ping-pong client and its server thread.
pub struct PingPong {
    stream: TcpStream,
    header: [u8; REQUEST_HEADER_BYTES],
    payload: Vec<u8>,
    server: Option<JoinHandle<io::Result<()>>>,
}

impl PingPong {
    /// Starts a server thread on an ephemeral loopback port and connects to it.
    pub fn start() -> Result<PingPong> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the ping-pong server")?;
        let addr = listener.local_addr()?;
        let server = thread::Builder::new().name("floor-server".into()).spawn(move || serve(listener))?;
        let stream = TcpStream::connect(addr).context("connect to the ping-pong server")?;
        stream.set_nodelay(true)?;
        let mut payload = vec![0u8; BLOCK_BYTES];
        for (i, b) in payload.iter_mut().enumerate() {
            *b = u8::try_from(i % 251).expect("below 251");
        }
        Ok(PingPong { stream, header: [0; REQUEST_HEADER_BYTES], payload, server: Some(server) })
    }

    /// One round trip: returns its duration.
    pub fn round_trip(&mut self, seq: u64) -> Result<Duration> {
        self.header[..8].copy_from_slice(&seq.to_le_bytes());
        self.payload[..8].copy_from_slice(&seq.to_le_bytes());
        let started = Instant::now();
        let mut bufs = [IoSlice::new(&self.header), IoSlice::new(&self.payload)];
        let mut bufs: &mut [IoSlice<'_>] = &mut bufs;
        while !bufs.is_empty() {
            let n = self.stream.write_vectored(bufs).context("ping-pong send")?;
            if n == 0 {
                bail!("ping-pong send: connection closed");
            }
            IoSlice::advance_slices(&mut bufs, n);
        }
        let mut reply = [0u8; REPLY_BYTES];
        let mut got = 0usize;
        let mut spins = 0u32;
        while got < REPLY_BYTES {
            let free = &mut reply[got..];
            // SAFETY: `free` is a valid, writable buffer of `free.len()` bytes for the whole
            // call, and the fd is the open socket `self.stream` owns.
            let n = unsafe {
                libc::recv(self.stream.as_raw_fd(), free.as_mut_ptr().cast(), free.len(), libc::MSG_DONTWAIT)
            };
            match n {
                0 => bail!("ping-pong server closed the connection"),
                n if n > 0 => got += n.unsigned_abs(),
                _ => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => {
                            spins = spins.wrapping_add(1);
                            if spins.is_multiple_of(65_536) && started.elapsed() > ROUND_TRIP_MAX {
                                bail!("ping-pong reply did not come within {ROUND_TRIP_MAX:?}");
                            }
                            std::hint::spin_loop();
                        }
                        _ => return Err(e).context("ping-pong recv"),
                    }
                }
            }
        }
        let elapsed = started.elapsed();
        if reply != seq.to_le_bytes() {
            bail!("ping-pong reply out of step");
        }
        Ok(elapsed)
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

/// The server: one connection, a blocking read of each whole message, an 8-byte answer.
fn serve(listener: TcpListener) -> io::Result<()> {
    let (mut stream, _) = listener.accept()?;
    stream.set_nodelay(true)?;
    let mut message = vec![0u8; REQUEST_HEADER_BYTES + BLOCK_BYTES];
    loop {
        match stream.read_exact(&mut message) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        stream.write_all(&message[..REPLY_BYTES])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_answer_in_step() {
        let mut p = PingPong::start().unwrap();
        for seq in 0..100 {
            p.round_trip(seq).unwrap();
        }
    }
}
