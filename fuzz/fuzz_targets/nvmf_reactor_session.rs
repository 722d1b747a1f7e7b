//! An NVMe/TCP I/O queue as a volume's reactor serves it ([`IoSession`]) on a hostile host:
//! the input's first byte picks the digests, the rest is everything the host sends after
//! its ICReq and Connect, over a real loopback socket. The session must decode, refuse or
//! end with a termination request, never panic, never take more than its queue's size, and
//! hand out each command once, answered once.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use nvmirror_dataplane::frontend::nbd::Command;
use nvmirror_dataplane::frontend::nvmf::pdu::Framing;
use nvmirror_dataplane::frontend::nvmf::{IoSession, IO_QUEUE_ENTRIES, TRANSFER_BYTES_MAX};

const SIZE: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let framing = Framing { header_digest: first & 1 != 0, data_digest: first & 2 != 0, hpda: 0 };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut host = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    let mut session = IoSession::over(server, SIZE, framing).expect("session");
    let input = rest.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = host.write_all(&input);
        let _ = host.shutdown(Shutdown::Write);
        let mut sink = [0u8; 64 << 10];
        while matches!(host.read(&mut sink), Ok(n) if n > 0) {}
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut owed: Vec<Command> = Vec::new();
    while !session.finished() && Instant::now() < deadline {
        session.fill();
        while let Some(c) = session.next_command() {
            owed.push(c);
            assert!(session.in_flight() <= usize::from(IO_QUEUE_ENTRIES), "more commands taken than the queue holds");
        }
        for c in owed.drain(..) {
            match c {
                Command::Read { cookie, offset, len } => {
                    assert!(offset + u64::from(len) <= SIZE, "a read past the namespace");
                    session.reply_read(cookie, offset, len, |b| {
                        b.fill(0);
                        Ok(())
                    })
                }
                Command::Write { cookie, offset, data, .. } => {
                    let len = session.data(data).len();
                    assert!(len <= TRANSFER_BYTES_MAX && offset + len as u64 <= SIZE, "a write past its bounds");
                    session.reply(cookie, Ok(()));
                }
                Command::Flush { cookie }
                | Command::Trim { cookie, .. }
                | Command::WriteZeroes { cookie, .. }
                | Command::BlockStatus { cookie, .. } => session.reply(cookie, Ok(())),
            }
        }
        assert_eq!(session.in_flight(), 0, "every command handed out was answered");
        session.flush();
        std::thread::sleep(Duration::from_micros(50));
    }
    session.close();
    let _ = writer.join();
});
