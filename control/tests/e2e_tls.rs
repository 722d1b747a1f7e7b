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
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("nvmirror e2e CA {tag}"));
    let ca = ca.self_signed(&ca_key).expect("CA certificate");
    let key = rcgen::KeyPair::generate().expect("node key");
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("node params");
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
