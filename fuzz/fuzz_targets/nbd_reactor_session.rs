//! The NBD session a volume's poller serves (run to completion) on a hostile client: the
//! input's first byte picks the negotiated options (structured replies, block status), the
//! rest is everything the client sends in transmission, over a real loopback socket. The
//! session must decode, refuse or end with an error, never panic, never take more than
//! its bounds, and answer every request it hands out exactly once.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use nvmirror_dataplane::frontend::nbd::{Command, Options, Session, IN_FLIGHT_MAX};

const SIZE: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let options = Options { structured: first & 1 != 0, allocation: first & 2 != 0 };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    let mut session = Session::over(server, SIZE, first & 4 != 0, options).expect("session");
    // The client sends everything and closes its end; a reader drains the replies.
    let input = rest.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = client.write_all(&input);
        let _ = client.shutdown(Shutdown::Write);
        let mut sink = [0u8; 64 << 10];
        while matches!(client.read(&mut sink), Ok(n) if n > 0) {}
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut owed: Vec<Command> = Vec::new();
    while !session.finished() && Instant::now() < deadline {
        session.fill();
        while let Some(c) = session.next_command() {
            owed.push(c);
            assert!(session.in_flight() <= IN_FLIGHT_MAX, "more requests taken than the bound");
        }
        for c in owed.drain(..) {
            match c {
                Command::Read { cookie, offset, len } => session.reply_read(cookie, offset, len, |b| {
                    b.fill(0);
                    Ok(())
                }),
                Command::Write { cookie, data, .. } => {
                    assert!(session.data(data).len() <= 32 << 20);
                    session.reply(cookie, Ok(()));
                }
                Command::BlockStatus { cookie, offset, len, req_one } => {
                    let zeroes = vec![0u8; len as usize];
                    session.reply_block_status(cookie, offset, req_one, Ok(&zeroes));
                }
                Command::Flush { cookie } | Command::Trim { cookie, .. } | Command::WriteZeroes { cookie, .. } => {
                    session.reply(cookie, Ok(()))
                }
            }
        }
        assert_eq!(session.in_flight(), 0, "every request handed out was answered");
        session.flush();
        std::thread::sleep(Duration::from_micros(50));
    }
    session.close();
    let _ = writer.join();
});
