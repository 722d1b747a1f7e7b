//! The NBD server in forced-TLS mode (an [`NbdTls`]), against a raw client that speaks the
//! option haggling byte by byte: before `NBD_OPT_STARTTLS` every option but `ABORT` is
//! refused with `NBD_REP_ERR_TLS_REQD` and `EXPORT_NAME` closes; `STARTTLS` with data is
//! invalid, and so is a second one once TLS runs; after TLS, the export is served (on the
//! server's threads, as a mirror's is), large reads and pipelined writes included.
//! Certificates are made by the test (rcgen).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use nvmirror_dataplane::frontend::mem::{MemExport, MemRegistry};
use nvmirror_dataplane::frontend::nbd::{NbdServer, NbdTls};
use nvmirror_dataplane::frontend::nbd_client::{ClientTls, NbdClient, CMD_WRITE};
use nvmirror_dataplane::transport::tls;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;
const BYTES: u64 = 8 << 20;
const MIB: usize = 1 << 20;
const CHUNK: u32 = 64 << 10;

struct Server {
    server: NbdServer,
    client: ClientTls,
    _dir: tempfile::TempDir,
}

fn start() -> Server {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let config = tls::TlsConfig::from_files(&cert_path, &key_path, None).expect("TLS configuration");
    let nbd = NbdTls::new(config.nbd_server(None).expect("NBD TLS configuration"));
    let registry = MemRegistry(vec![("disk".into(), Arc::new(MemExport::new(BYTES, false)))]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = NbdServer::spawn_with(listener, Arc::new(registry), Some(nbd)).expect("start the server");
    let roots = vec![CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap()];
    let client = ClientTls {
        config: tls::client_config(&roots).unwrap(),
        server_name: ServerName::try_from("127.0.0.1").unwrap(),
    };
    Server { server, client, _dir: dir }
}

/// Connects, reads the greeting and sends the client flags (fixed newstyle, no zeroes).
fn negotiating(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

fn send_option(s: &mut impl Write, option: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
    s.flush().unwrap();
}

/// One option reply: (option, type, message).
fn reply(s: &mut impl Read) -> (u32, u32, String) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
    let len = u32::from_be_bytes(h[16..].try_into().unwrap());
    assert!(len < 4096);
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).unwrap();
    let u = |r: std::ops::Range<usize>| u32::from_be_bytes(h[r].try_into().unwrap());
    (u(8..12), u(12..16), String::from_utf8_lossy(&data).into_owned())
}

fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn before_starttls_every_option_is_refused_and_after_it_the_export_is_served() {
    let server = start();
    let addr = server.server.local_addr();

    let mut s = negotiating(addr);
    for option in [OPT_LIST, OPT_GO, OPT_STRUCTURED_REPLY, 99] {
        send_option(&mut s, option, if option == OPT_GO { b"\0\0\0\x04disk\0\0" } else { b"" });
        let (o, t, why) = reply(&mut s);
        assert_eq!((o, t), (option, REP_ERR_TLS_REQD), "option {option}: {why}");
        assert!(why.contains("STARTTLS"), "{why}");
    }
    send_option(&mut s, OPT_STARTTLS, b"x");
    assert_eq!(reply(&mut s).1, REP_ERR_INVALID, "STARTTLS takes no data");
    send_option(&mut s, OPT_STARTTLS, b"");
    assert_eq!(reply(&mut s), (OPT_STARTTLS, REP_ACK, String::new()));
    let mut conn =
        rustls::ClientConnection::new(server.client.config.clone(), server.client.server_name.clone()).unwrap();
    tls::handshake(&mut conn, &mut s).expect("TLS handshake");
    let mut t = rustls::StreamOwned::new(conn, s);
    send_option(&mut t, OPT_STARTTLS, b"");
    let (_, kind, why) = reply(&mut t);
    assert_eq!(kind, REP_ERR_INVALID, "a second STARTTLS: {why}");
    send_option(&mut t, OPT_LIST, b"");
    assert_eq!(reply(&mut t).2.len(), 8, "the list, over TLS: one export, disk");
    assert_eq!(reply(&mut t).1, REP_ACK);

    // EXPORT_NAME has no error reply: in plain text it closes.
    let mut s = negotiating(addr);
    send_option(&mut s, OPT_EXPORT_NAME, b"disk");
    assert!(closed(&mut s), "EXPORT_NAME before TLS was not refused");
    // ABORT is answered as ever.
    let mut s = negotiating(addr);
    send_option(&mut s, OPT_ABORT, b"");
    assert_eq!(reply(&mut s).1, REP_ACK);

    // Over TLS: pipelined writes, then reads large enough to go out apart from their header.
    let mut c = NbdClient::connect_with(addr, "disk", Some(&server.client)).expect("connect over TLS");
    assert_eq!(c.size, BYTES);
    let data: Vec<u8> = (0..BYTES).map(|i| ((i * 7 + i / 4096) % 251) as u8).collect();
    for (i, piece) in (0u64..).zip(data.chunks(CHUNK as usize)) {
        c.send(CMD_WRITE, i, i * u64::from(CHUNK), CHUNK, piece).unwrap();
    }
    for _ in 0..data.len() / CHUNK as usize {
        assert_eq!(c.recv(None).unwrap().error, 0);
    }
    let mut back = vec![0u8; MIB];
    for (at, want) in (0u64..).step_by(MIB).zip(data.chunks(MIB)) {
        c.read(at, &mut back).unwrap();
        assert!(back == want, "read at {at} differs");
    }
    c.disconnect().unwrap();
    server.server.shutdown().expect("server shut down cleanly");
}
