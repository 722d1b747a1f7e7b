//! The NBD server on a hostile client: the input is everything a client sends on one
//! connection (handshake, options, requests), over a real loopback socket to a real
//! server with one writable and one read-only export. The server must answer or close the
//! connection, never panic; it serves the next connection afterwards.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nvmirror_dataplane::frontend::nbd::NbdServer;
use nvmirror_dataplane::frontend::mem::{MemExport, MemRegistry};

fn server() -> String {
    static ADDR: OnceLock<(String, NbdServer)> = OnceLock::new();
    ADDR.get_or_init(|| {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let reg = MemRegistry(vec![
            ("rw".into(), Arc::new(MemExport::new(1 << 20, false))),
            ("ro".into(), Arc::new(MemExport::new(1 << 20, true))),
        ]);
        (addr, NbdServer::spawn(l, Arc::new(reg)).expect("server"))
    })
    .0
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let addr = server();
    let mut s = TcpStream::connect(&addr).expect("the server accepts");
    s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let _ = s.write_all(data);
    let _ = s.shutdown(Shutdown::Write);
    let mut sink = [0u8; 65536];
    // Drain whatever the server answers until it closes (or stops talking).
    for _ in 0..1024 {
        match s.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
});
