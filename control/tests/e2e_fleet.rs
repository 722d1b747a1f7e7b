//! Fleet mode against a real etcd (Debian's etcd-server, started by the test on loopback):
//! the primary holds the volume's key through its lease; killed, its lease expires and the
//! mirror fails over by itself with the etcd revision as its epoch; every acknowledged
//! write is there; the old primary, restarted, finds the key held elsewhere and stays
//! fenced. Against a three-member cluster, a member killed and restarted under writes (one
//! after another) changes nothing: no fencing, no failover, every write acknowledged.
//! Against an etcd that serves https only, requires client certificates and has auth
//! enabled, a pair with the CA, a certificate, a user and its password registers; without
//! them a node does not start.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nvmirror_control::etcd::Etcd;
use nvmirror_control::workload::Workload;
use nvmirror_dataplane::frontend::nbd_client::NbdClient;
use serde_json::Value;

const VOL: &str = "vol";

fn etcd_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("etcd")).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("etcd is not installed: this test needs the Debian package etcd-server (apt-get install etcd-server)")
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

struct EtcdProc {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for EtcdProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_etcd() -> EtcdProc {
    let dir = tempfile::Builder::new().prefix("nvmirror-etcd-").tempdir().expect("tempdir");
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let child = Command::new(etcd_binary())
        .args(["--name", "nvmirror-test", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-cluster", &format!("nvmirror-test=http://127.0.0.1:{peer}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("etcd.log")).expect("log"))
        .spawn()
        .expect("start etcd");
    let e = EtcdProc { child, url: format!("etcd://127.0.0.1:{client}"), _dir: dir };
    let client = Etcd::new(&e.url, Duration::from_secs(2)).expect("client");
    wait_for("etcd to answer", Duration::from_secs(30), || Ok(client.grant(1).ok().map(|_| ())));
    e
}

/// One member of a test cluster, which the test may kill and start again (on its data).
struct Member {
    name: String,
    client: u16,
    peer: u16,
    initial_cluster: String,
    dir: PathBuf,
    child: Option<Child>,
    /// etcd's TLS flags for its client port (https only where given).
    client_tls: Vec<String>,
}

impl Member {
    fn spawn(&mut self) {
        let scheme = if self.client_tls.is_empty() { "http" } else { "https" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", self.name)))
            .expect("log");
        let child = Command::new(etcd_binary())
            .args(["--name", &self.name, "--data-dir"])
            .arg(self.dir.join(&self.name))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster, "--initial-cluster-token", "nvmirror-test"])
            .args(&self.client_tls)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd member");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A three-member cluster on loopback, answering; and its `etcd://` URL naming all three.
fn start_cluster(dir: &std::path::Path) -> (Vec<Member>, String) {
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let initial_cluster =
        ports.iter().enumerate().map(|(i, p)| format!("m{i}=http://127.0.0.1:{}", p.1)).collect::<Vec<_>>().join(",");
    let mut members: Vec<Member> = ports
        .iter()
        .enumerate()
        .map(|(i, &(client, peer))| Member {
            name: format!("m{i}"),
            client,
            peer,
            initial_cluster: initial_cluster.clone(),
            dir: dir.to_path_buf(),
            child: None,
            client_tls: Vec::new(),
        })
        .collect();
    for m in &mut members {
        m.spawn();
    }
    let url = format!("etcd://{}", ports.iter().map(|p| format!("127.0.0.1:{}", p.0)).collect::<Vec<_>>().join(","));
    let client = Etcd::new(&url, Duration::from_secs(2)).expect("client");
    wait_for("the etcd cluster to answer", Duration::from_secs(60), || Ok(client.grant(1).ok().map(|_| ())));
    (members, url)
}

fn holder(etcd: &Etcd) -> Option<Value> {
    etcd.get(&format!("/nvmirror/volumes/{VOL}/primary"))
        .ok()
        .flatten()
        .and_then(|kv| serde_json::from_slice(&kv.value).ok())
}

#[test]
fn a_killed_primary_is_failed_over_by_its_lease_and_stays_fenced() {
    let etcd_proc = start_etcd();
    let etcd = Etcd::new(&etcd_proc.url, Duration::from_secs(2)).expect("client");
    let args = ["--state", etcd_proc.url.as_str(), "--lease-ttl", "2"];
    let mut pair = Pair::start_with("fleet", &args, &args);
    pair.create_mirrored(VOL, 16 * MIB, LOG_BYTES_MIN);
    wait_for("the primary to register in etcd", Duration::from_secs(30), || {
        Ok(holder(&etcd).filter(|h| h["node"] == "site-a").map(|_| ()))
    });
    let mut w = Workload::new(0, 1024, base_seed("fleet"));
    {
        let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD");
        w.run(&mut c, 8, 2000, |_| {}).expect("writes");
    }
    assert_eq!(w.errors, 0);
    let epoch_before = volume_status(&pair.src_api(), VOL).expect("status")["epoch"].as_u64().expect("epoch");

    // The primary dies; nobody runs a failover.
    pair.src.kill();
    let killed = Instant::now();
    let v = wait_for("the mirror to fail over by itself", Duration::from_secs(30), || {
        Ok(status(&pair.dst_api())?["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["volume"] == VOL))
            .cloned())
    });
    let took = killed.elapsed();
    eprintln!("automatic failover {:.1} s after the kill (lease TTL 2 s): {}", took.as_secs_f64(), v["epoch"]);
    let epoch = v["epoch"].as_u64().expect("epoch");
    assert!(epoch > epoch_before, "epoch {epoch} not above {epoch_before}");
    let h = wait_for("site-b to hold the key", Duration::from_secs(10), || {
        Ok(holder(&etcd).filter(|h| h["node"] == "site-b"))
    });
    assert_eq!(h["epoch"].as_u64(), Some(epoch), "{h}");
    assert_verified(&verify(&w, &pair.dst.nbd, VOL).expect("verify"), "after the automatic failover");
    {
        let mut c = NbdClient::connect(pair.dst.nbd.as_str(), VOL).expect("NBD to b");
        c.write(0, &[1u8; 4096]).expect("the promoted volume takes writes");
    }
    let events = run_bin(&["ctl", "--node", &pair.dst.control, "events", "--once"], Duration::from_secs(30));
    assert!(String::from_utf8_lossy(&events.stdout).contains("automatic-failover"));

    // The old primary returns: the key is held elsewhere, its epoch is stale; it stays fenced.
    pair.src.restart().expect("restart site-a");
    wait_state(&pair.src_api(), VOL, "fenced", Duration::from_secs(30));
    {
        let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD to a");
        assert!(c.write(0, &[2u8; 4096]).is_err(), "the old primary took a write");
    }
    assert_eq!(holder(&etcd).expect("key")["node"], "site-b");
}

/// A three-member etcd cluster loses one member, then another (each started again before
/// the next goes), while a fleet pair takes writes: the nodes go on through the members
/// left, the primary keeps its key and its volume, the mirror does not fail over, and
/// every acknowledged write is on both sites.
#[test]
fn a_member_of_a_three_member_etcd_cluster_lost_under_writes_changes_nothing() {
    let dir = tempfile::Builder::new().prefix("nvmirror-etcd3-").tempdir().expect("tempdir");
    let (mut members, url) = start_cluster(dir.path());
    let etcd = Etcd::new(&url, Duration::from_secs(2)).expect("client");
    let args = ["--state", url.as_str(), "--lease-ttl", "3"];
    let pair = Pair::start_with("fleet3", &args, &args);
    pair.create_mirrored(VOL, 16 * MIB, LOG_BYTES_MIN);
    wait_for("the primary to register in etcd", Duration::from_secs(30), || {
        Ok(holder(&etcd).filter(|h| h["node"] == "site-a").map(|_| ()))
    });
    let epoch = volume_status(&pair.src_api(), VOL).expect("status")["epoch"].as_u64().expect("epoch");
    let mut w = Workload::new(0, 2048, base_seed("fleet3"));
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD");
    // The first member is the one both nodes use until it goes; then whichever answered.
    for m in [0, 1] {
        members[m].kill();
        // Several lease lives without that member, writing all along.
        let (started, before) = (Instant::now(), w.acks);
        while started.elapsed() < Duration::from_secs(8) {
            w.run(&mut c, 4, 200, |_| {}).expect("writes");
        }
        assert_eq!(w.errors, 0, "writes failed with member {} down", members[m].name);
        assert!(w.acks > before + 1000, "writes stalled with member {} down", members[m].name);
        let v = volume_status(&pair.src_api(), VOL).expect("status");
        assert_eq!(v["state"], "in-sync", "member {} down: {v}", members[m].name);
        let h = holder(&etcd).expect("the primary key");
        assert_eq!(h["node"], "site-a", "member {} down: {h}", members[m].name);
        members[m].spawn();
        wait_for("the member to answer again", Duration::from_secs(30), || {
            let one = Etcd::new(&format!("etcd://127.0.0.1:{}", members[m].client), Duration::from_secs(2))?;
            Ok(one.get("/nvmirror/none").ok().map(|_| ()))
        });
    }
    drop(c);
    let s = status(&pair.dst_api()).expect("mirror status");
    assert!(s["volumes"].as_array().is_none_or(Vec::is_empty), "the mirror took the volume over: {s}");
    let v = volume_status(&pair.src_api(), VOL).expect("status");
    assert_eq!(v["epoch"].as_u64(), Some(epoch), "the epoch moved: {v}");
    assert_verified(&verify(&w, &pair.src.nbd, VOL).expect("verify"), "after two members went and came back");
    let events = run_bin(&["ctl", "--node", &pair.dst.control, "events", "--once"], Duration::from_secs(30));
    assert!(!String::from_utf8_lossy(&events.stdout).contains("automatic-failover"));
}

/// The primary loses etcd (the only member it names goes) while its mirror still reaches
/// etcd and the primary: its lease expires, and yet nothing fails over, since the mirror
/// hears its source; the primary goes on taking writes under policy sync, held to strict
/// meanwhile (its mirror takes every write). When etcd answers again it takes its policy
/// back and its key.
#[test]
fn a_primary_that_loses_etcd_but_not_its_mirror_goes_on() {
    let dir = tempfile::Builder::new().prefix("nvmirror-etcd3-").tempdir().expect("tempdir");
    let (mut members, url) = start_cluster(dir.path());
    let etcd = Etcd::new(&url, Duration::from_secs(2)).expect("client");
    let only_first = format!("etcd://127.0.0.1:{}", members[0].client);
    let others = format!("etcd://127.0.0.1:{},127.0.0.1:{}", members[1].client, members[2].client);
    let a_args = ["--state", only_first.as_str(), "--lease-ttl", "2"];
    let b_args = ["--state", others.as_str(), "--lease-ttl", "2"];
    let pair = Pair::start_with("fleetlost", &a_args, &b_args);
    create_volume(&pair.src_api(), VOL, 16 * MIB, Some(LOG_BYTES_MIN)).expect("create");
    ctl(&pair.src.control, &["mirror", VOL, "--to", &pair.dst.control, "--policy", "sync"]);
    wait_state(&pair.src_api(), VOL, "in-sync", Duration::from_secs(60));
    wait_for("the primary to register in etcd", Duration::from_secs(30), || {
        Ok(holder(&etcd).filter(|h| h["node"] == "site-a").map(|_| ()))
    });
    let mut w = Workload::new(0, 2048, base_seed("fleetlost"));
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD");
    w.run(&mut c, 4, 500, |_| {}).expect("writes");

    members[0].kill();
    // Its lease expires (2 s) and its key goes; several lease lives later, still serving.
    wait_for("the primary's key to go with its lease", Duration::from_secs(30), || {
        Ok(holder(&etcd).is_none().then_some(()))
    });
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        w.run(&mut c, 4, 200, |_| {}).expect("writes");
    }
    assert_eq!(w.errors, 0, "writes failed without etcd");
    let v = volume_status(&pair.src_api(), VOL).expect("status");
    assert_eq!(v["state"], "in-sync", "{v}");
    assert_eq!(v["policy"], "strict", "held to strict while etcd is away: {v}");
    let m = mirror_status(&pair.dst_api(), VOL).expect("mirror status");
    assert_eq!(m["promoted"], false, "the mirror failed over under a live source: {m}");
    let events = |n: &str| {
        String::from_utf8_lossy(&run_bin(&["ctl", "--node", n, "events", "--once"], Duration::from_secs(30)).stdout)
            .to_string()
    };
    assert!(events(&pair.src.control).contains("held-strict"));
    assert!(!events(&pair.dst.control).contains("automatic-failover"));

    // etcd again: the policy back, the key taken again, writes as before.
    members[0].spawn();
    wait_for("the primary to hold its key again", Duration::from_secs(30), || {
        Ok(holder(&etcd).filter(|h| h["node"] == "site-a").map(|_| ()))
    });
    wait_for("the policy to come back", Duration::from_secs(30), || {
        Ok((volume_status(&pair.src_api(), VOL)?["policy"] == "sync").then_some(()))
    });
    w.run(&mut c, 4, 500, |_| {}).expect("writes");
    assert_eq!(w.errors, 0);
    drop(c);
    // The mirror's export shows its last CP: one now holds every write.
    cp(&pair.src_api(), VOL).expect("CP");
    assert_verified(&verify(&w, &pair.dst.nbd, VOL).expect("verify"), "the mirror, after etcd came back");
}

/// A certificate the CA signed, for `sans` with common name `cn` (none where empty), written
/// to `dir` as NAME.pem and NAME.key; returns their paths.
fn issue(
    dir: &std::path::Path,
    ca: &(rcgen::Certificate, rcgen::KeyPair),
    name: &str,
    sans: &[&str],
    cn: &str,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let cert = params.signed_by(&key, &ca.0, &ca.1).expect("certificate");
    let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&c, cert.pem()).expect("write certificate");
    std::fs::write(&k, key.serialize_pem()).expect("write key");
    (c.to_str().unwrap().to_string(), k.to_str().unwrap().to_string())
}

/// etcd serving https only, requiring client certificates signed by the test's CA, with
/// auth enabled and a user `nvm` allowed `/nvmirror/`: a pair given the CA, a client
/// certificate, the user and its password registers its volume; a wrong password, no client
/// certificate, or one with a common name (which etcd's gateway refuses), and a node does
/// not start, saying why. (A token etcd forgot is taken again: the unit test
/// `a_token_etcd_no_longer_knows_is_taken_again`.)
#[test]
fn a_node_reaches_etcd_over_tls_with_a_client_certificate_and_a_password() {
    let dir = tempfile::Builder::new().prefix("nvmirror-etcd-tls-").tempdir().expect("tempdir");
    let d = dir.path();
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "etcd test CA");
    let ca = (ca.self_signed(&ca_key).expect("CA"), ca_key);
    let ca_file = d.join("ca.pem");
    std::fs::write(&ca_file, ca.0.pem()).expect("write CA");
    let ca_path = ca_file.to_str().unwrap().to_string();
    let (server_cert, server_key) = issue(d, &ca, "etcd", &["127.0.0.1"], "etcd");
    // etcd's JSON gateway refuses a client certificate with a common name (CVE-2018-16886):
    // the node's identity is its user, the certificate only opens the door.
    let (node_cert, node_key) = issue(d, &ca, "node", &[], "");
    let (named_cert, named_key) = issue(d, &ca, "named", &[], "nvmirror-node");
    let (client, peer) = (free_port(), free_port());
    let mut etcd = Member {
        name: "tls".into(),
        client,
        peer,
        initial_cluster: format!("tls=http://127.0.0.1:{peer}"),
        dir: d.to_path_buf(),
        child: None,
        client_tls: [
            "--cert-file",
            &server_cert,
            "--key-file",
            &server_key,
            "--trusted-ca-file",
            &ca_path,
            "--client-cert-auth",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    };
    etcd.spawn();
    let url = format!("etcds://127.0.0.1:{client}");
    let with_cert = nvmirror_control::etcd::EtcdSecurity {
        ca: Some(ca_file.clone()),
        cert: Some(node_cert.clone().into()),
        key: Some(node_key.clone().into()),
        ..Default::default()
    };
    let admin = Etcd::secured(&url, Duration::from_secs(2), &with_cert).expect("client");
    wait_for("etcd to answer over https", Duration::from_secs(30), || Ok(admin.grant(1).ok().map(|_| ())));
    // Users and a role that may use /nvmirror/ only, then auth on.
    let b64 = |s: &str| base64::engine::Engine::encode(&base64::engine::general_purpose::STANDARD, s);
    for (path, body) in [
        ("/v3/auth/user/add", serde_json::json!({ "name": "root", "password": "root-pw" })),
        ("/v3/auth/user/grant", serde_json::json!({ "user": "root", "role": "root" })),
        ("/v3/auth/role/add", serde_json::json!({ "name": "nvmirror" })),
        (
            "/v3/auth/role/grant",
            serde_json::json!({ "name": "nvmirror", "perm": {
                "permType": "READWRITE", "key": b64("/nvmirror/"), "range_end": b64("/nvmirror0") } }),
        ),
        ("/v3/auth/user/add", serde_json::json!({ "name": "nvm", "password": "nvm-pw" })),
        ("/v3/auth/user/grant", serde_json::json!({ "user": "nvm", "role": "nvmirror" })),
        ("/v3/auth/enable", serde_json::json!({})),
    ] {
        admin.call(path, body).unwrap_or_else(|e| panic!("{path}: {e:#}"));
    }
    let pw = d.join("nvm.pw");
    std::fs::write(&pw, "nvm-pw\n").expect("password file");
    let root_pw = d.join("root.pw");
    std::fs::write(&root_pw, "root-pw\n").expect("password file");
    let root = Etcd::secured(
        &url,
        Duration::from_secs(2),
        &nvmirror_control::etcd::EtcdSecurity {
            user: Some("root".into()),
            password_file: Some(root_pw),
            ..with_cert.clone()
        },
    )
    .expect("root client");
    let pw_path = pw.to_str().unwrap().to_string();
    let secure: Vec<&str> = vec![
        "--state",
        &url,
        "--lease-ttl",
        "2",
        "--etcd-ca",
        &ca_path,
        "--etcd-cert",
        &node_cert,
        "--etcd-key",
        &node_key,
        "--etcd-user",
        "nvm",
        "--etcd-password-file",
        &pw_path,
    ];

    // Without a client certificate, or with a wrong password: no start, and why.
    let wrong = d.join("wrong.pw");
    std::fs::write(&wrong, "guess").expect("password file");
    let wrong = wrong.to_str().unwrap().to_string();
    let refused = |n: &str| d.join(n).to_str().unwrap().to_string();
    let mut wrong_pw = secure.clone();
    *wrong_pw.last_mut().unwrap() = &wrong;
    let dir1 = refused("refused-1");
    fails_with(&node_args(&dir1, &wrong_pw), "authenticating as \"nvm\"");
    let no_cert: Vec<&str> =
        vec!["--state", &url, "--etcd-ca", &ca_path, "--etcd-user", "nvm", "--etcd-password-file", &pw_path];
    let dir2 = refused("refused-2");
    fails_with(&node_args(&dir2, &no_cert), "client certificate");
    let mut named = secure.clone();
    named[7] = &named_cert;
    named[9] = &named_key;
    let dir3 = refused("refused-3");
    fails_with(&node_args(&dir3, &named), "common name");

    // A pair (an in-sync volume rides out etcd's absence, held to strict).
    let pair = Pair::start_with("fleettls", &secure, &secure);
    create_volume(&pair.src_api(), VOL, 16 * MIB, Some(LOG_BYTES_MIN)).expect("create");
    ctl(&pair.src.control, &["mirror", VOL, "--to", &pair.dst.control]);
    wait_state(&pair.src_api(), VOL, "in-sync", Duration::from_secs(60));
    wait_for("the primary to register its volume in etcd", Duration::from_secs(30), || {
        Ok(holder(&root).filter(|h| h["node"] == "site-a").map(|_| ()))
    });

    let log = log_text(&pair.src.log_path());
    assert!(log.contains("fleet state in etcd at https://"), "{log}");
    assert_eq!(mirror_status(&pair.dst_api(), VOL).expect("mirror status")["promoted"], false);
}
