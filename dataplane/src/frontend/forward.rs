//! Forwarding: a volume that moved (a planned switchover) keeps answering the clients
//! still connected to its old primary by passing their requests to the new primary's
//! NBD export, one connection, pipelined in order. Clients keep working through the
//! switchover with a pause; they may reconnect to the new primary at leisure.

use std::collections::VecDeque;
use std::io;
use std::thread;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::nbd_client::{NbdClient, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES};
use super::{Completer, Export, IoRequest};

/// Requests queued for the forwarding connection.
const QUEUE_MAX: usize = 1024;
/// Requests in flight on it.
const IN_FLIGHT_MAX: usize = 32;

/// An export whose requests go to another node's NBD export.
pub struct NbdForward {
    size: u64,
    tx: Sender<(IoRequest, Completer)>,
}

impl NbdForward {
    /// Connects to export `name` at `addr` and starts the forwarding threads.
    pub fn connect(addr: &str, name: &str) -> io::Result<NbdForward> {
        let client = NbdClient::connect(addr, name)?;
        if client.read_only {
            return Err(io::Error::other(format!("{addr} exports {name} read-only: it is not the primary")));
        }
        let size = client.size;
        let (tx, rx) = bounded(QUEUE_MAX);
        let recv = client.try_clone()?;
        let (sent_tx, sent_rx) = bounded::<(u64, u32, Completer)>(IN_FLIGHT_MAX);
        thread::Builder::new().name("nvm-fwd-send".into()).spawn(move || send_loop(client, rx, sent_tx))?;
        thread::Builder::new().name("nvm-fwd-recv".into()).spawn(move || recv_loop(recv, sent_rx))?;
        Ok(NbdForward { size, tx })
    }
}

fn send_loop(mut c: NbdClient, rx: Receiver<(IoRequest, Completer)>, sent: Sender<(u64, u32, Completer)>) {
    let mut cookie = 0u64;
    for (request, done) in rx {
        cookie += 1;
        let (cmd, offset, len, data) = match &request {
            IoRequest::Read { offset, len } => (CMD_READ, *offset, *len, &[][..]),
            IoRequest::Write { offset, data, .. } => {
                let Ok(len) = u32::try_from(data.len()) else {
                    done.complete(Err(io::Error::other("write too large to forward")));
                    continue;
                };
                (CMD_WRITE, *offset, len, &data[..])
            }
            IoRequest::Flush => (CMD_FLUSH, 0, 0, &[][..]),
            IoRequest::Trim { offset, len } => (CMD_TRIM, *offset, *len, &[][..]),
            IoRequest::WriteZeroes { offset, len, .. } => (CMD_WRITE_ZEROES, *offset, *len, &[][..]),
        };
        let read_len = if cmd == CMD_READ { len } else { 0 };
        if let Err(e) = c.send(cmd, cookie, offset, len, data) {
            done.complete(Err(io::Error::other(format!("forward to the new primary: {e}"))));
            return;
        }
        if sent.send((cookie, read_len, done)).is_err() {
            return;
        }
    }
}

fn recv_loop(mut c: NbdClient, sent: Receiver<(u64, u32, Completer)>) {
    // Simple replies come back in order on one connection from nvmirror's server, but
    // match them by cookie all the same.
    let mut waiting: VecDeque<(u64, u32, Completer)> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match sent.recv() {
                Ok(x) => waiting.push_back(x),
                Err(_) => return,
            }
        }
        while let Ok(x) = sent.try_recv() {
            waiting.push_back(x);
        }
        let (_, read_len, _) = waiting.front().expect("non-empty");
        let mut buf = vec![0u8; *read_len as usize];
        let r = c.recv(if buf.is_empty() { None } else { Some(&mut buf) });
        match r {
            Ok(reply) => {
                let Some(i) = waiting.iter().position(|w| w.0 == reply.cookie) else { return };
                let (_, read_len, done) = waiting.remove(i).expect("found");
                if reply.error != 0 {
                    let e = io::Error::from_raw_os_error(i32::try_from(reply.error).unwrap_or(libc::EIO));
                    done.complete(Err(e));
                } else if read_len > 0 {
                    done.complete(Ok(Some(buf)));
                } else {
                    done.complete(Ok(None));
                }
            }
            Err(e) => {
                for (_, _, done) in waiting.drain(..) {
                    done.complete(Err(io::Error::other(format!("forward to the new primary: {e}"))));
                }
                return;
            }
        }
    }
}

impl Export for NbdForward {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn submit(&self, request: IoRequest, done: Completer) {
        if let Err(e) = self.tx.send((request, done)) {
            let (_, done) = e.into_inner();
            done.complete(Err(io::Error::other("forwarding to the new primary stopped")));
        }
    }
}

/// Holds requests while a volume moves (between a switchover's handover and the new
/// primary taking them): nothing fails, nothing is answered yet.
#[derive(Default)]
pub struct Parked {
    size: u64,
    held: parking_lot::Mutex<Vec<(IoRequest, Completer)>>,
}

impl Parked {
    pub fn new(size: u64) -> Self {
        Self { size, held: parking_lot::Mutex::new(Vec::new()) }
    }
    pub fn held_len(&self) -> usize {
        self.held.lock().len()
    }
    /// The requests held so far, in arrival order.
    pub fn take(&self) -> Vec<(IoRequest, Completer)> {
        std::mem::take(&mut *self.held.lock())
    }
}

impl Export for Parked {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn submit(&self, request: IoRequest, done: Completer) {
        self.held.lock().push((request, done));
    }
}
