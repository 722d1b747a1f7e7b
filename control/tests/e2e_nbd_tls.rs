//! NBD over TLS with real processes and real clients: a node started with `--tls-cert`
//! serves NBD to clients that start TLS (`NBD_OPT_STARTTLS`) only; with `--nbd-client-ca`
//! it also requires a client certificate signed by that CA, and a volume's allow-list may
//! name clients by their certificate (`cert:NAME`). Driven with this project's client,
//! QEMU (`qemu-io` with `tls-creds-x509`) and libnbd (`nbdinfo`, `nbdcopy` with
//! `nbds://` URIs). Certificates are made by the test (rcgen): no key is committed.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nvmirror_control::workload::Workload;
use nvmirror_dataplane::frontend::nbd_client::{ClientTls, NbdClient};
use nvmirror_dataplane::usize_of;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const VOL: &str = "vol";

/// A certificate authority the test signs with.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca { cert: params.self_signed(&key).expect("CA certificate"), key }
    }

    /// A certificate for `sans` (IP addresses and DNS names) with common name `cn`: (PEM
    /// certificate, PEM key, PEM of this CA).
    fn issue(&self, sans: &[&str], cn: &str) -> (String, String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("certificate");
        (cert.pem(), key.serialize_pem(), self.cert.pem())
    }
}

/// A client's credentials: a directory as QEMU's `tls-creds-x509` and libnbd's
/// `tls-certificates` read it (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`), and the
/// same as a rustls configuration for this project's client.
struct ClientCreds {
    dir: PathBuf,
    tls: ClientTls,
}

/// QEMU checks the client's own certificate against `ca-cert.pem` too: it holds the server's
/// CA and the client's issuer.
fn client_creds(root: &Path, name: &str, server_ca: &Ca, cert: Option<(String, String, String)>) -> ClientCreds {
    let dir = root.join(name);
    fs::create_dir_all(&dir).expect("creds dir");
    let issuer = cert.as_ref().map(|c| c.2.clone()).unwrap_or_default();
    fs::write(dir.join("ca-cert.pem"), format!("{}{issuer}", server_ca.cert.pem())).expect("write CA");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.cert.der().clone()).expect("trust the server CA");
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some((cert, key, _)) => {
            fs::write(dir.join("client-cert.pem"), &cert).expect("write client certificate");
            fs::write(dir.join("client-key.pem"), &key).expect("write client key");
            let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("client certificate PEM")];
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("client key PEM");
            builder.with_client_auth_cert(chain, key).expect("client certificate")
        }
    };
    let server_name = ServerName::try_from("127.0.0.1").expect("server name");
    ClientCreds { dir, tls: ClientTls { config: Arc::new(config), server_name } }
}

/// The nodes' side, one for the test binary (the control API client's trust is the
/// process's): the server CA, and the files of a node certificate for 127.0.0.1 it signed.
struct Server {
    ca: Ca,
    cert: String,
    key: String,
    ca_file: String,
    _dir: tempfile::TempDir,
}

fn server() -> &'static Server {
    static SERVER: std::sync::OnceLock<Server> = std::sync::OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new("server CA");
        let (cert, key, _) = ca.issue(&["127.0.0.1", "localhost"], "nvmirror node");
        let paths =
            (dir.path().join("node-cert.pem"), dir.path().join("node-key.pem"), dir.path().join("server-ca.pem"));
        fs::write(&paths.0, cert).expect("write node certificate");
        fs::write(&paths.1, key).expect("write node key");
        fs::write(&paths.2, ca.cert.pem()).expect("write server CA");
        nvmirror_control::tls::trust_file(&paths.2).expect("trust the server CA");
        let s = |p: &PathBuf| p.to_str().expect("utf-8 path").to_string();
        Server { cert: s(&paths.0), key: s(&paths.1), ca_file: s(&paths.2), ca, _dir: dir }
    })
}

fn qemu_io(creds: &ClientCreds, nbd: &str, command: &str) -> std::process::Output {
    let (host, port) = nbd.rsplit_once(':').expect("HOST:PORT");
    let object = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", creds.dir.display());
    let image =
        format!("driver=nbd,server.type=inet,server.host={host},server.port={port},export={VOL},tls-creds=tls0");
    Command::new("qemu-io")
        .args(["--object", &object, "--image-opts", &image, "-c", command])
        .output()
        .expect("run qemu-io (Debian's qemu-utils)")
}

fn nbds_uri(creds: &ClientCreds, nbd: &str) -> String {
    format!("nbds://{nbd}/{VOL}?tls-certificates={}", creds.dir.display())
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn nbd_over_tls_admits_only_clients_that_start_tls_with_a_certificate_from_the_client_ca() {
    let seed = base_seed("nbd_over_tls_admits_only_clients_that_start_tls_with_a_certificate_from_the_client_ca");
    let keys = tempfile::tempdir().expect("tempdir");
    let (client_ca, rogue_ca) = (Ca::new("client CA"), Ca::new("rogue CA"));
    let server = server();
    let (server_ca, cert, key, ca) = (&server.ca, &server.cert, &server.key, &server.ca_file);
    let client_ca_path = keys.path().join("client-ca.pem");
    fs::write(&client_ca_path, client_ca.cert.pem()).expect("write client CA");
    let args =
        ["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca, "--nbd-client-ca", client_ca_path.to_str().unwrap()];
    let pair = Pair::start_with("nbdtls", &args, &args);
    pair.create_mirrored(VOL, 16 * MIB, LOG_BYTES_MIN);

    let a = client_creds(keys.path(), "a", server_ca, Some(client_ca.issue(&["client-a.example"], "client-a")));
    let b = client_creds(keys.path(), "b", server_ca, Some(client_ca.issue(&[], "client-b")));
    let rogue = client_creds(keys.path(), "rogue", server_ca, Some(rogue_ca.issue(&["client-a.example"], "client-a")));
    let anonymous = client_creds(keys.path(), "anonymous", server_ca, None);

    // Plain text is refused before any export is named, with the reason.
    let err = NbdClient::connect(pair.src.nbd.as_str(), VOL).err().expect("a plain client was served");
    assert!(err.to_string().contains("requires TLS"), "{err}");
    // TLS without a certificate, or with one from another CA, fails its handshake.
    assert!(NbdClient::connect_with(pair.src.nbd.as_str(), VOL, Some(&anonymous.tls)).is_err());
    assert!(NbdClient::connect_with(pair.src.nbd.as_str(), VOL, Some(&rogue.tls)).is_err());
    let log = log_text(&pair.src.log_path());
    assert!(
        log.contains("did not start TLS") && log.contains("--nbd-client-ca"),
        "refusals are not logged with their reason:\n{log}"
    );

    // Writes through the primary's reactor over TLS, checked block by block.
    use_nbd_tls(a.tls.clone());
    let mut w = Workload::new(0, 1024, seed);
    let mut nbd = nbd_connect(&pair.src.nbd, VOL).expect("NBD over TLS with client a");
    w.run(&mut nbd, 8, 800, |_| {}).expect("writes over TLS");
    assert_eq!(w.errors, 0, "writes failed over TLS");
    drop(nbd);
    assert_verified(&verify(&w, &pair.src.nbd, VOL).expect("read back over TLS"), "the primary over TLS");

    // QEMU writes a pattern; libnbd reads it back; both over TLS with client a's files.
    let out = qemu_io(&a, &pair.src.nbd, "write -P 0xa7 1M 192k");
    assert!(out.status.success(), "qemu-io over TLS failed: {}", text(&out));
    let out = Command::new("nbdinfo").arg(nbds_uri(&a, &pair.src.nbd)).output().expect("run nbdinfo (libnbd-bin)");
    assert!(out.status.success(), "nbdinfo over TLS failed: {}", text(&out));
    assert!(text(&out).contains(&(16 * MIB).to_string()), "nbdinfo does not show the size: {}", text(&out));
    let copy = keys.path().join("copy.img");
    let out = Command::new("nbdcopy")
        .args([&nbds_uri(&a, &pair.src.nbd), copy.to_str().unwrap()])
        .output()
        .expect("run nbdcopy (libnbd-bin)");
    assert!(out.status.success(), "nbdcopy over TLS failed: {}", text(&out));
    let image = fs::read(&copy).expect("read the copy");
    assert_eq!(image.len() as u64, 16 * MIB);
    assert!(
        image[usize_of(MIB)..usize_of(MIB) + (192 << 10)].iter().all(|&b| b == 0xa7),
        "QEMU's pattern is not in the copy"
    );
    assert_eq!(image, read_volume(&pair.src.nbd, VOL).expect("read the primary"), "nbdcopy and this client disagree");
    // libnbd without TLS is refused.
    let out = Command::new("nbdinfo").arg(format!("nbd://{}/{VOL}", pair.src.nbd)).output().expect("run nbdinfo");
    assert!(!out.status.success(), "nbdinfo without TLS was served: {}", text(&out));

    // The mirror's read-only export (served on threads) over TLS: after a CP it reads as
    // the primary does.
    cp(&pair.src_api(), VOL).expect("forced CP");
    wait_for("the mirror to read as the primary", Duration::from_secs(30), || {
        Ok((read_volume(&pair.dst.nbd, VOL)? == image).then_some(()))
    });

    // An allow-list by certificate name: client a (its DNS name) is admitted, b is not,
    // whatever its address.
    ctl_ok(&pair.src.control, &["--tls-ca", ca, "volume", "allow", VOL, "cert:client-a.example"]);
    assert!(NbdClient::connect_with(pair.src.nbd.as_str(), VOL, Some(&a.tls)).is_ok(), "client a was refused");
    let err = NbdClient::connect_with(pair.src.nbd.as_str(), VOL, Some(&b.tls)).err().expect("client b was admitted");
    assert!(err.to_string().contains("does not admit"), "{err}");
    let out = qemu_io(&b, &pair.src.nbd, "read 0 4k");
    assert!(!out.status.success(), "QEMU with client b's certificate was admitted: {}", text(&out));
    // By common name too.
    ctl_ok(&pair.src.control, &["--tls-ca", ca, "volume", "allow", VOL, "cert:client-b"]);
    let out = qemu_io(&b, &pair.src.nbd, "read -P 0xa7 1M 4k");
    assert!(out.status.success(), "QEMU with client b's certificate was refused: {}", text(&out));
}

#[test]
fn nbd_over_tls_without_client_certificates_serves_any_tls_client_and_refuses_certificate_names() {
    let keys = tempfile::tempdir().expect("tempdir");
    let server = server();
    let (server_ca, cert, key, ca) = (&server.ca, &server.cert, &server.key, &server.ca_file);
    let data = keys.path().join("node");
    let mut node = nvmirror_control::cluster::NodeProc::start(
        &bin(),
        "solo",
        &data,
        &["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca],
    )
    .expect("start the node");
    create_volume(&nvmirror_control::api::Client::new(&node.control), VOL, 8 * MIB, Some(LOG_BYTES_MIN))
        .expect("create");
    let anonymous = client_creds(keys.path(), "anonymous", server_ca, None);

    let out = qemu_io(&anonymous, &node.nbd, "write -P 0x5c 0 64k");
    assert!(out.status.success(), "qemu-io over TLS without a client certificate failed: {}", text(&out));
    let mut c = NbdClient::connect_with(node.nbd.as_str(), VOL, Some(&anonymous.tls)).expect("connect over TLS");
    let mut buf = vec![0u8; 64 << 10];
    c.read(0, &mut buf).expect("read over TLS");
    assert!(buf.iter().all(|&b| b == 0x5c), "QEMU's write does not read back");
    assert!(NbdClient::connect(node.nbd.as_str(), VOL).is_err(), "a plain client was served");
    // Nothing could match a certificate name here: refused, saying why.
    ctl_fails(&node.control, &["--tls-ca", ca, "volume", "allow", VOL, "cert:client-a"], "--nbd-client-ca");
    node.kill();
}
