//! TLS with real processes (`--tls-cert`, `--tls-key`, `--tls-ca`): a pair whose control
//! APIs and replication engine speak TLS only mirrors, writes and fails over; `ctl` over
//! https works with the CA and fails with one clear line without it or with another CA;
//! the replication port refuses a plain hello, saying why. Certificates are made by the
//! test (rcgen): no key is committed.
//!
//! This binary's own API clients speak https (`tls::trust`), so every test in it is a TLS
//! test.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nvmirror_control::workload::Workload;
use nvmirror_dataplane::frontend::nbd_client::{ClientTls, NbdClient};
use nvmirror_dataplane::transport::wire::{self, FRAME_HEADER_BYTES};
use nvmirror_dataplane::transport::{Hello, Intent, Message};
use serde_json::Value;

const VOL: &str = "vol";
const T: Duration = Duration::from_secs(60);

struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A CA and a certificate it signed for 127.0.0.1 and localhost (both nodes of a test pair
/// live there, so they share it), written to `dir`.
fn certs(dir: &Path, tag: &str) -> Certs {
    certs_for(dir, tag, &["127.0.0.1", "localhost"])
}

/// A CA and a certificate it signed for `sans`, written to `dir`.
fn certs_for(dir: &Path, tag: &str, sans: &[&str]) -> Certs {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("nvmirror e2e CA {tag}"));
    let ca = ca.self_signed(&ca_key).expect("CA certificate");
    let key = rcgen::KeyPair::generate().expect("node key");
    let params = rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("certificate params");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("node certificate");
    let c = Certs {
        ca: dir.join(format!("{tag}-ca.pem")),
        cert: dir.join(format!("{tag}-cert.pem")),
        key: dir.join(format!("{tag}-key.pem")),
    };
    fs::write(&c.ca, ca.pem()).expect("write CA");
    fs::write(&c.cert, cert.pem()).expect("write certificate");
    fs::write(&c.key, key.serialize_pem()).expect("write key");
    c
}

#[test]
fn a_pair_over_tls_mirrors_writes_and_fails_over_and_ctl_needs_the_ca() {
    let seed = base_seed("a_pair_over_tls_mirrors_writes_and_fails_over_and_ctl_needs_the_ca");
    let keys = tempfile::tempdir().expect("tempdir");
    let c = certs(keys.path(), "pair");
    let other = certs(keys.path(), "other");
    let secret = keys.path().join("pair.key");
    fs::write(&secret, "correct horse battery staple\n").expect("secret");
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let (ca, cert, key) = (c.ca.to_str().unwrap(), c.cert.to_str().unwrap(), c.key.to_str().unwrap());
    // TLS with the pair's secret on both nodes: both layers together.
    let args = ["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca, "--secret-file", secret.to_str().unwrap()];
    nvmirror_control::tls::trust_file(&c.ca).expect("trust the test CA");
    let mut pair = Pair::start_with("tls", &args, &args);

    // ctl over https: with the CA it works; without it, or with another CA, one clear line.
    let (ok, stdout, stderr) = nvmirror(&["ctl", "--node", &pair.src.control, "--tls-ca", ca, "status", "--json"]);
    assert!(ok, "ctl over https with the CA failed: {stderr}");
    let _: Value = serde_json::from_str(&stdout).expect("status --json is JSON");
    fails_with(&["ctl", "--node", &pair.src.control, "status"], "speaks TLS only");
    fails_with(
        &["ctl", "--node", &pair.src.control, "--tls-ca", other.ca.to_str().unwrap(), "status"],
        "not signed by a CA given with --tls-ca",
    );

    // The replication port: a plain hello is refused, with the reason.
    let hello = Message::Hello(Hello {
        source_node: "plain".into(),
        volume: VOL.into(),
        volume_id: 1,
        epoch: 1,
        volume_bytes: MIB,
        partition_bytes: MIB,
        intent: Intent::Baseline,
        base_seq: 1,
        base_cp_gen: 1,
        features: 0,
    })
    .encode();
    let (answer, _) = raw_exchange(&pair.dst.replication, &hello, false, T);
    assert!(answer.len() >= FRAME_HEADER_BYTES, "no answer to a plain hello: {answer:?}");
    match wire::decode(&answer) {
        Ok(Some((Message::Error { reason }, _))) => assert!(reason.contains("TLS only"), "{reason}"),
        other => panic!("expected an error frame, got {other:?}"),
    }

    // Mirror, write, fail over: every acknowledged write is on the promoted mirror.
    pair.create_mirrored(VOL, 16 * MIB, LOG_BYTES_MIN);
    let mut w = Workload::new(0, 1024, seed);
    // NBD on a node with --tls-cert is TLS only: a plain client is refused.
    assert!(NbdClient::connect(pair.src.nbd.as_str(), VOL).is_err(), "a plain NBD client was served");
    let roots = nvmirror_dataplane::transport::tls::load_certs("CA", &c.ca).expect("read the test CA");
    use_nbd_tls(ClientTls {
        config: nvmirror_dataplane::transport::tls::client_config(&roots).expect("client TLS"),
        server_name: rustls_pki_types::ServerName::try_from("127.0.0.1").expect("server name"),
    });
    let mut nbd = nbd_connect(&pair.src.nbd, VOL).expect("NBD connect over TLS");
    w.run(&mut nbd, 4, 600, |_| {}).expect("writes");
    cp(&pair.src_api(), VOL).expect("forced CP");
    w.run(&mut nbd, 4, 300, |_| {}).expect("writes after the CP");
    assert_eq!(w.errors, 0, "writes failed on a TLS pair");
    drop(nbd);
    let log = log_text(&pair.dst.log_path());
    assert!(!log.contains("TLS handshake"), "a TLS handshake failed between the nodes:\n{log}");
    pair.src.kill();
    let report = failover(&pair.dst_api(), VOL).expect("failover");
    println!("failover: {report}");
    let v = verify(&w, &pair.dst.nbd, VOL).expect("read the promoted volume");
    assert_verified(&v, "TLS pair after failover");
    assert!(v.blocks_with_acked_data > 0);
}

#[test]
fn tls_flags_that_cannot_be_used_stop_the_node() {
    let keys = tempfile::tempdir().expect("tempdir");
    let c = certs(keys.path(), "n");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("n");
    let data = data.to_str().unwrap();
    let base = node_args(data, &[]);
    let with = |extra: &[&str]| -> Vec<String> { base.iter().chain(extra).map(|s| s.to_string()).collect() };
    let missing = keys.path().join("missing.pem");
    for (extra, want) in [
        (vec!["--tls-cert", c.cert.to_str().unwrap(), "--tls-key", missing.to_str().unwrap()], "TLS key"),
        (vec!["--tls-cert", c.key.to_str().unwrap(), "--tls-key", c.key.to_str().unwrap()], "no CERTIFICATE"),
    ] {
        let args = with(&extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&args, want);
    }
    // A key without a certificate is a usage error (clap's own message).
    let args = with(&["--tls-key", c.key.to_str().unwrap()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, stderr) = nvmirror(&args);
    assert!(!ok && stderr.contains("--tls-cert"), "{stderr}");
}

/// A node with `--ctl-client-ca` and `--require-signed-ctl`: an operator who presents a
/// certificate its CA signed (`ctl --tls-cert/--tls-key`) is an admin, named in the log and
/// in the events of what they did; one without a certificate, or with one another CA
/// signed, is refused with one clear line. Then 200 clients hold TLS connections at once:
/// the first 128 are served, each other one is answered 503 with the bound, and the node
/// serves at once when they are gone.
#[test]
fn operators_with_a_certificate_are_admins_and_200_connections_meet_the_bound() {
    let keys = tempfile::tempdir().expect("tempdir");
    let c = certs(keys.path(), "node");
    let ops = certs_for(keys.path(), "ops", &["alice.ops.example"]);
    let rogue = certs_for(keys.path(), "rogue", &["alice.ops.example"]);
    let secret = secret_file(keys.path(), "pair.key", "correct horse battery staple");
    let p = |p: &PathBuf| p.to_str().expect("utf-8 path").to_string();
    let (ca, cert, key) = (p(&c.ca), p(&c.cert), p(&c.key));
    let dir = tempfile::tempdir().expect("tempdir");
    let args = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-ca",
        &ca,
        "--ctl-client-ca",
        &p(&ops.ca),
        "--secret-file",
        &p(&secret),
        "--require-signed-ctl",
    ];
    let mut n = nvmirror_control::cluster::NodeProc::start(&bin(), "ops", &dir.path().join("n"), &args)
        .expect("start the node");
    let node = n.control.clone();
    let create = |who: &[&str], vol: &str| -> Vec<String> {
        let mut a = vec!["ctl", "--node", node.as_str(), "--tls-ca", ca.as_str()];
        a.extend_from_slice(who);
        a.extend(["volume", "create", vol, "--size", "4M"]);
        a.into_iter().map(str::to_string).collect()
    };
    let run = |v: Vec<String>| nvmirror(&v.iter().map(String::as_str).collect::<Vec<_>>());
    let refused = |v: Vec<String>, want: &str| {
        fails_with(&v.iter().map(String::as_str).collect::<Vec<_>>(), want);
    };

    refused(create(&[], "v1"), "requires signed admin calls");
    refused(
        create(&["--tls-cert", &p(&rogue.cert), "--tls-key", &p(&rogue.key)], "v1"),
        "does it trust the operator certificate of --tls-cert",
    );
    let (ok, _, stderr) = run(create(&["--tls-cert", &p(&ops.cert), "--tls-key", &p(&ops.key)], "v1"));
    assert!(ok, "an operator with a certificate of --ctl-client-ca was refused: {stderr}");
    let log = log_text(&n.log_path());
    assert!(
        log.contains("control: POST /v1/volumes from 127.0.0.1:") && log.contains("(operator alice.ops.example): 200"),
        "the operator's call is not logged with its caller:\n{log}"
    );
    let (ok, events, stderr) = nvmirror(&["ctl", "--node", &node, "--tls-ca", &ca, "events"]);
    assert!(ok, "{stderr}");
    let created = events
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["kind"] == "volume-created")
        .expect("a volume-created event");
    let caller = created["caller"].as_str().unwrap_or("");
    assert!(
        caller.starts_with("127.0.0.1:") && caller.ends_with("(operator alice.ops.example)"),
        "the event does not name its caller: {created}"
    );

    // 200 TLS connections held open at once, then a request on each.
    let mut roots = rustls::RootCertStore::empty();
    for der in nvmirror_dataplane::transport::tls::load_certs("CA", &c.ca).expect("CA") {
        roots.add(der).expect("root");
    }
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(nvmirror_dataplane::transport::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    const CLIENTS: usize = 200;
    const SERVED: usize = nvmirror_control::api::http::LIMITS.connections;
    let mut held = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let tcp = std::net::TcpStream::connect(&node).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let conn = rustls::ClientConnection::new(client.clone(), "127.0.0.1".try_into().expect("name")).expect("tls");
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).expect("TLS handshake");
        }
        held.push(s);
    }
    let answers: Vec<String> = std::thread::scope(|scope| {
        let threads: Vec<_> = held
            .iter_mut()
            .map(|s| {
                scope.spawn(move || {
                    let _ = std::io::Write::write_all(
                        s,
                        b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    );
                    let mut out = Vec::new();
                    let _ = std::io::Read::read_to_end(s, &mut out);
                    String::from_utf8_lossy(&out).into_owned()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("client thread")).collect()
    });
    let ok = answers.iter().filter(|a| a.starts_with("HTTP/1.1 200")).count();
    let busy: Vec<&String> = answers.iter().filter(|a| a.starts_with("HTTP/1.1 503")).collect();
    println!("{CLIENTS} connections: {ok} answered 200, {} answered 503", busy.len());
    assert_eq!(
        ok + busy.len(),
        CLIENTS,
        "some connections got neither: {:?}",
        answers.iter().find(|a| !a.starts_with("HTTP/1.1 200") && !a.starts_with("HTTP/1.1 503"))
    );
    assert_eq!(ok, SERVED, "the bound of {SERVED} connections did not hold");
    assert!(
        busy.iter().all(|a| a.contains(&format!("this node serves {SERVED} control connections already: retry later"))),
        "{:?}",
        busy.first()
    );
    drop(held);
    let t = std::time::Instant::now();
    let (ok, _, stderr) = nvmirror(&["ctl", "--node", &node, "--tls-ca", &ca, "status"]);
    assert!(ok, "the node did not serve after the crowd left: {stderr}");
    assert!(t.elapsed() < Duration::from_secs(10), "status took {:?} after the crowd left", t.elapsed());
    n.kill();
}
