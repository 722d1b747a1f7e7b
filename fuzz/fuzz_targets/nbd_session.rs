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
use nvmirror_dataplane::frontend::{Completer, Export, ExportRegistry, IoRequest};
use nvmirror_dataplane::storage::{BlockDevice, MemDevice};

struct Disk {
    dev: MemDevice,
    read_only: bool,
}

impl Export for Disk {
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn submit(&self, request: IoRequest, done: Completer) {
        match request {
            IoRequest::Read { offset, len } => {
                let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
                done.complete(self.dev.read_at(&mut buf, offset).map(|()| Some(buf)));
            }
            IoRequest::Write { offset, data, .. } => done.complete(self.dev.write_at(&data, offset).map(|()| None)),
            _ => done.complete(Ok(None)),
        }
    }
}

struct Registry(Vec<(String, Arc<Disk>)>);

impl ExportRegistry for Registry {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, d)| d.clone() as Arc<dyn Export>)
    }
    fn names(&self) -> Vec<String> {
        self.0.iter().map(|(n, _)| n.clone()).collect()
    }
}

fn server() -> String {
    static ADDR: OnceLock<(String, NbdServer)> = OnceLock::new();
    ADDR.get_or_init(|| {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let reg = Registry(vec![
            ("rw".into(), Arc::new(Disk { dev: MemDevice::new(1 << 20), read_only: false })),
            ("ro".into(), Arc::new(Disk { dev: MemDevice::new(1 << 20), read_only: true })),
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
