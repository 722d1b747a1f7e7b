//! The NBD server in its forced-TLS mode (a node with `--tls-cert`) on a hostile client,
//! over a real loopback socket to a real server with one writable and one read-only export.
//! The first byte picks what the rest is:
//! - even: everything the client sends in the clear (the option phase before STARTTLS,
//!   where every option but STARTTLS and ABORT is refused, and a TLS handshake that is
//!   not one);
//! - odd: the rest of the option phase and the transmission phase inside TLS, after a
//!   valid handshake, NBD_OPT_STARTTLS and a real TLS handshake.
//! The server must answer or close the connection, never panic; it serves the next one.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nvmirror_dataplane::frontend::mem::{MemExport, MemRegistry};
use nvmirror_dataplane::frontend::nbd::{NbdServer, NbdTls};
use nvmirror_dataplane::transport::tls::{provider, TlsConfig};

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_STARTTLS: u32 = 5;

struct World {
    addr: String,
    client: Arc<rustls::ClientConfig>,
    _server: NbdServer,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let dir = std::env::temp_dir().join(format!("nvmirror-fuzz-nbd-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_file, cert.pem()).expect("write certificate");
        std::fs::write(&key_file, key.serialize_pem()).expect("write key");
        let tls = TlsConfig::from_files(&cert_file, &key_file, None).expect("TLS");
        let _ = std::fs::remove_dir_all(&dir);
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let reg = MemRegistry(vec![
            ("rw".into(), Arc::new(MemExport::new(1 << 20, false))),
            ("ro".into(), Arc::new(MemExport::new(1 << 20, true))),
        ]);
        let server = NbdServer::spawn_with(l, Arc::new(reg), Some(NbdTls::new(tls.nbd_server(None).expect("server"))))
            .expect("server");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        World { addr, client: Arc::new(client), _server: server }
    })
}

/// Reads whatever the server answers until it closes (or stops talking).
fn drain(mut r: impl Read) {
    let mut sink = [0u8; 65536];
    for _ in 0..1024 {
        match r.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let w = world();
    let mut s = TcpStream::connect(&w.addr).expect("the server accepts");
    s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    if pick % 2 == 0 {
        let _ = s.write_all(rest);
        let _ = s.shutdown(Shutdown::Write);
        return drain(&s);
    }
    // A valid opening: the greeting, fixed newstyle without zeroes, STARTTLS and its ack.
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("the greeting");
    s.write_all(&3u32.to_be_bytes()).expect("client flags");
    let mut opt = Vec::with_capacity(16);
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).expect("STARTTLS");
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).expect("STARTTLS answered");
    assert_eq!(u32::from_be_bytes(reply[12..16].try_into().expect("4")), 1, "STARTTLS not acknowledged");
    let conn = rustls::ClientConnection::new(w.client.clone(), "127.0.0.1".try_into().expect("name")).expect("client");
    let mut tls = rustls::StreamOwned::new(conn, s);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("the TLS handshake completes");
    }
    let _ = tls.write_all(rest);
    tls.conn.send_close_notify();
    let _ = tls.conn.complete_io(&mut tls.sock);
    drain(tls);
});
