//! Peer authentication with real processes (`--secret-file`): a pair with the same secret
//! mirrors, writes and fails over; a destination with a secret refuses a source without
//! it and one with another secret (the source says why in its status, the destination
//! logs the refused peer, and nothing of the mirror changes); a source with a secret
//! refuses a destination that cannot prove it (one without a secret, and an impostor that
//! speaks the protocol without knowing the secret, which cannot fence the source either).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use nvmirror_control::workload::Workload;
use nvmirror_dataplane::frontend::nbd_client::NbdClient;
use nvmirror_dataplane::transport::wire::{self, FRAME_HEADER_BYTES};
use nvmirror_dataplane::transport::{Message, RefuseCode, Welcome};
use serde_json::Value;

const VOL: &str = "vol";
const T: Duration = Duration::from_secs(60);

/// The source's volume status through `ctl status --json`.
fn ctl_volume_status(node: &str, vol: &str) -> Value {
    let (ok, stdout, stderr) = ctl(node, &["status", "--json"]);
    assert!(ok, "status --json failed: {stderr}");
    let s: Value = serde_json::from_str(&stdout).expect("status --json is JSON");
    s["volumes"].as_array().and_then(|vs| vs.iter().find(|v| v["volume"] == vol)).cloned().expect("volume listed")
}

/// Waits until the source's volume reports a reason containing `want`; returns its status.
fn wait_reason(api: &nvmirror_control::api::Client, vol: &str, want: &str) -> Value {
    wait_for(&format!("volume {vol}'s reason to mention {want:?}"), T, || {
        let v = volume_status(api, vol)?;
        if v["reason"].as_str().is_some_and(|r| r.contains(want)) {
            Ok(Some(v))
        } else {
            anyhow::bail!("state {} reason {}", v["state"], v["reason"])
        }
    })
}

fn wait_log(n: &nvmirror_control::cluster::NodeProc, want: &[&str]) -> String {
    wait_for(&format!("{}'s log to show {want:?}", n.name), T, || {
        let text = log_text(&n.log_path());
        Ok(text.lines().find(|l| want.iter().all(|w| l.contains(w))).map(str::to_string))
    })
}

#[test]
fn a_pair_with_the_same_secret_mirrors_writes_and_fails_over() {
    let seed = base_seed("a_pair_with_the_same_secret_mirrors_writes_and_fails_over");
    let keys = tempfile::tempdir().expect("tempdir");
    let s = secret_file(keys.path(), "pair.key", "correct horse battery staple");
    let s = s.to_str().expect("path");
    let mut pair = Pair::start_with("auth-ok", &["--secret-file", s], &["--secret-file", s]);
    for api in [pair.src_api(), pair.dst_api()] {
        let info: Value = api.get("/v1/node").expect("node info");
        assert_eq!(info["auth"], true, "{info}");
    }
    pair.create_mirrored(VOL, 16 * MIB, LOG_BYTES_MIN);
    let mut w = Workload::new(0, 1024, seed);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD connect");
    w.run(&mut c, 4, 600, |_| {}).expect("writes");
    cp(&pair.src_api(), VOL).expect("forced CP");
    w.run(&mut c, 4, 300, |_| {}).expect("writes after the CP");
    assert_eq!(w.errors, 0, "writes failed on an authenticated pair");
    drop(c);
    pair.src.kill();
    let report = failover(&pair.dst_api(), VOL).expect("failover");
    println!("failover: {report}");
    let v = verify(&w, &pair.dst.nbd, VOL).expect("read the promoted volume");
    assert_verified(&v, "authenticated pair after failover");
    assert!(v.blocks_with_acked_data > 0);
}

/// What of the destination's mirror a refused peer must leave as it was.
#[derive(Debug, PartialEq, Eq)]
struct MirrorSnapshot {
    image: Vec<u8>,
    logs: Vec<Vec<u8>>,
    epoch: Value,
    applied_cp: Value,
    consistent: Value,
}

fn snapshot(pair: &Pair) -> MirrorSnapshot {
    let m = mirror_status(&pair.dst_api(), VOL).expect("mirror status");
    MirrorSnapshot {
        image: read_volume(&pair.dst.nbd, VOL).expect("read the mirror"),
        logs: (0..2).map(|p| fs::read(pair.dst_log(VOL, p)).expect("log file")).collect(),
        epoch: m["epoch"].clone(),
        applied_cp: m["applied_cp"].clone(),
        consistent: m["consistent"].clone(),
    }
}

#[test]
fn a_destination_with_a_secret_refuses_sources_without_it() {
    let seed = base_seed("a_destination_with_a_secret_refuses_sources_without_it");
    let keys = tempfile::tempdir().expect("tempdir");
    let good = secret_file(keys.path(), "pair.key", "correct horse battery staple");
    let wrong = secret_file(keys.path(), "other.key", "Tr0ub4dor&3");
    let (good, wrong) = (good.to_str().expect("path"), wrong.to_str().expect("path"));
    let mut pair = Pair::start_with("auth-dst", &["--secret-file", good], &["--secret-file", good]);
    pair.create_mirrored(VOL, 16 * MIB, LOG_BYTES_MIN);
    let mut w = Workload::new(0, 1024, seed);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD connect");
    w.run(&mut c, 4, 400, |_| {}).expect("writes");
    cp(&pair.src_api(), VOL).expect("forced CP");
    w.run(&mut c, 4, 100, |_| {}).expect("writes after the CP");
    drop(c);
    pair.src.kill();
    wait_for("the destination to see its source gone", T, || {
        Ok((mirror_status(&pair.dst_api(), VOL)?["connected"] == false).then_some(()))
    });
    let before = snapshot(&pair);

    // No secret: the source resumes its mirror from its state, and is refused.
    pair.src.set_args(&[]);
    pair.src.restart().expect("restart the source without a secret");
    wait_reason(&pair.src_api(), VOL, "requires authentication");
    let v = ctl_volume_status(&pair.src.control, VOL);
    assert_ne!(v["state"], "in-sync", "{v}");
    assert!(v["reason"].as_str().unwrap_or("").contains("did not authenticate"), "{v}");
    let line = wait_log(&pair.dst, &["replication: connection from 127.0.0.1:", "peer did not authenticate"]);
    println!("destination logged: {line}");
    let mut refused = Vec::new();
    pair.dst_api()
        .get_lines("/v1/events", false, |l| refused.push(serde_json::from_str::<Value>(l).expect("a JSON line")))
        .expect("the destination's events");
    refused.retain(|e| e["kind"] == "peer-refused");
    assert!(
        refused.iter().any(|e| e["detail"]["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:"))
            && e["detail"]["reason"].as_str().is_some_and(|r| r.contains("peer did not authenticate"))),
        "no peer-refused event with the peer's address: {refused:?}"
    );
    // Nor may it pair anything new.
    create_volume(&pair.src_api(), "vol2", 4 * MIB, Some(LOG_BYTES_MIN)).expect("create vol2");
    ctl_fails(&pair.src.control, &["mirror", "vol2", "--to", &pair.dst.control], "requires authentication");

    // Another secret: refused as such.
    pair.src.set_args(&["--secret-file", wrong]);
    pair.src.restart().expect("restart the source with another secret");
    let v = wait_reason(&pair.src_api(), VOL, "different secrets");
    assert_ne!(v["state"], "in-sync", "{v}");
    let line = wait_log(&pair.dst, &["replication: connection from 127.0.0.1:", "wrong secret"]);
    println!("destination logged: {line}");
    ctl_fails(&pair.src.control, &["mirror", "vol2", "--to", &pair.dst.control], "did not prove");

    let after = snapshot(&pair);
    assert!(after == before, "a refused source changed the mirror (epoch, applied CP, image or log files)");
    assert!(mirror_status(&pair.dst_api(), "vol2").is_err(), "a refused pairing created a mirror");

    // The right secret again: the pair resumes.
    pair.src.set_args(&["--secret-file", good]);
    pair.src.restart().expect("restart the source with the pair's secret");
    wait_state(&pair.src_api(), VOL, "in-sync", T);
    cp(&pair.src_api(), VOL).expect("a CP on the resumed pair");
}

/// Reads one whole frame (bounded by the wire format's own limit).
fn read_raw_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut h = [0u8; FRAME_HEADER_BYTES];
    s.read_exact(&mut h)?;
    let (_, len) = wire::decode_header(&h).map_err(std::io::Error::other)?;
    let mut f = h.to_vec();
    f.resize(FRAME_HEADER_BYTES + len, 0);
    s.read_exact(&mut f[FRAME_HEADER_BYTES..])?;
    Ok(f)
}

/// A destination impostor on `addr` that speaks the handshake without the secret: it
/// challenges, takes the hello and the proof, then answers connection n with `answer(n)`.
fn impostor(addr: &str, stop: Arc<AtomicBool>, answer: fn(usize) -> Vec<u8>) -> Arc<AtomicUsize> {
    let listener = wait_for("the destination's replication address to be free", T, || Ok(TcpListener::bind(addr).ok()));
    listener.set_nonblocking(true).expect("nonblocking");
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    thread::spawn(move || {
        // Bounded: at most 10 minutes of polling.
        for _ in 0..60_000 {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let Ok((mut s, _)) = listener.accept() else {
                thread::sleep(Duration::from_millis(10));
                continue;
            };
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let n = count.load(Ordering::SeqCst);
            let _ = (|| -> std::io::Result<()> {
                read_raw_frame(&mut s)?;
                s.write_all(&Message::AuthChallenge { nonce: [0x5a; 32] }.encode())?;
                read_raw_frame(&mut s)?;
                read_raw_frame(&mut s)?;
                s.write_all(&answer(n))?;
                thread::sleep(Duration::from_millis(50));
                Ok(())
            })();
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    served
}

fn impostor_answer(n: usize) -> Vec<u8> {
    let welcome = Message::Welcome(Welcome { epoch: 1, ..Welcome::default() }).encode();
    if n.is_multiple_of(2) {
        // A forged proof, then a welcome that would start a baseline into the impostor.
        let mut f = Message::AuthProof { proof: [0xa5; 32] }.encode();
        f.extend_from_slice(&welcome);
        f
    } else {
        // An unproven refusal that would fence the source were it believed.
        Message::Refuse { code: RefuseCode::StaleEpoch, reason: "failed over (says who?)".into() }.encode()
    }
}

#[test]
fn a_source_with_a_secret_refuses_a_destination_that_cannot_prove_it() {
    let keys = tempfile::tempdir().expect("tempdir");
    let good = secret_file(keys.path(), "pair.key", "correct horse battery staple");
    let good = good.to_str().expect("path");
    let mut pair = Pair::start_with("auth-src", &["--secret-file", good], &["--secret-file", good]);
    pair.create_mirrored(VOL, 8 * MIB, LOG_BYTES_MIN);

    // An impostor where the destination was.
    pair.dst.kill();
    let stop = Arc::new(AtomicBool::new(false));
    let served = impostor(&pair.dst.replication, stop.clone(), impostor_answer);
    // From the first refusal on, the source's state is watched: the impostor may not move it.
    let mut states = Vec::new();
    for want in ["does not verify", "without proving"] {
        wait_for(&format!("the source to refuse the impostor ({want})"), T, || {
            let v = volume_status(&pair.src_api(), VOL)?;
            let reason = v["reason"].as_str().unwrap_or("");
            if want == "without proving" || reason.contains("does not verify") {
                states.push(v["state"].as_str().unwrap_or("?").to_string());
            }
            Ok(reason.contains(want).then_some(()))
        });
    }
    wait_for("the impostor to be tried again", T, || Ok((served.load(Ordering::SeqCst) >= 4).then_some(())));
    let v = ctl_volume_status(&pair.src.control, VOL);
    states.push(v["state"].as_str().unwrap_or("?").to_string());
    println!("source states while the impostor answered: {states:?}; last status reason {}", v["reason"]);
    assert!(
        states.iter().all(|s| s == "out-of-sync" || s == "connecting"),
        "the impostor moved the source: {states:?}"
    );
    stop.store(true, Ordering::SeqCst);
    thread::sleep(Duration::from_millis(100));

    // A destination without a secret: refused, and no pairing with it.
    pair.dst.set_args(&[]);
    pair.dst.restart().expect("restart the destination without a secret");
    wait_reason(&pair.src_api(), VOL, "has no shared secret");
    create_volume(&pair.src_api(), "vol2", 4 * MIB, Some(LOG_BYTES_MIN)).expect("create vol2");
    ctl_fails(&pair.src.control, &["mirror", "vol2", "--to", &pair.dst.control], "did not prove");
    let line = wait_log(&pair.dst, &["replication: connection from 127.0.0.1:", "no secret"]);
    println!("destination logged: {line}");

    // The destination with the pair's secret again: back in sync.
    pair.dst.set_args(&["--secret-file", good]);
    pair.dst.restart().expect("restart the destination with the secret");
    wait_state(&pair.src_api(), VOL, "in-sync", T);
}

#[test]
fn secret_files_that_cannot_be_used_stop_the_node() {
    let keys = tempfile::tempdir().expect("tempdir");
    let empty = keys.path().join("empty.key");
    fs::write(&empty, "\n").expect("write");
    let open = secret_file(keys.path(), "open.key", "s");
    fs::set_permissions(&open, fs::Permissions::from_mode(0o644)).expect("chmod");
    let dir = tempfile::tempdir().expect("tempdir");
    let node = |secret: &Path| {
        let d = dir.path().join("n");
        let args = node_args(d.to_str().expect("path"), &["--secret-file", secret.to_str().expect("path")]);
        try_run_bin(&args, Duration::from_secs(3))
    };
    for (file, want) in [(empty.clone(), "is empty"), (keys.path().join("missing.key"), "No such file")] {
        let out = node(&file).expect("a node with an unusable secret exits at once");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("--secret-file") && stderr.contains(want), "{stderr}");
    }
    // A world-readable secret is used, with a warning (the node runs: the bounded run ends it).
    let mut n = nvmirror_control::cluster::NodeProc::start(
        &bin(),
        "warned",
        &dir.path().join("w"),
        &["--secret-file", open.to_str().expect("path")],
    )
    .expect("a node with a world-readable secret starts");
    let line = wait_log(&n, &["WARN", "--secret-file", "readable by every user"]);
    println!("node warned: {line}");
    n.kill();
}

#[test]
fn node_to_node_requests_between_authenticated_nodes_are_signed() {
    let keys = tempfile::tempdir().expect("tempdir");
    let good = secret_file(keys.path(), "pair.key", "correct horse battery staple");
    let good = good.to_str().expect("path");
    let pair = Pair::start_with("auth-calls", &["--secret-file", good], &["--secret-file", good]);
    pair.create_mirrored(VOL, 8 * MIB, LOG_BYTES_MIN);
    let takeover = nvmirror_control::api::TakeoverRequest {
        from: pair.src.name.clone(),
        control: pair.src.control.clone(),
        replication: pair.src.replication.clone(),
        cp: 0,
        next_seq: 1,
        policy: "strict".into(),
    };
    let body = serde_json::to_string(&takeover).expect("JSON");
    let path = format!("/v1/volumes/{VOL}/takeover");
    // Unsigned, and signed for a nonce the destination never issued: refused, and logged.
    for (header, want) in [
        (String::new(), "carries no proof"),
        (format!("X-Nvmirror-Call: {} {}\r\n", "ab".repeat(32), "cd".repeat(32)), "not issued here"),
    ] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n{header}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (answer, _) = raw_exchange(&pair.dst.control, req.as_bytes(), false, Duration::from_secs(10));
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 401"), "{text}");
        assert!(text.contains(want), "{text}");
    }
    let line = wait_log(&pair.dst, &["control: refused POST /v1/volumes/vol/takeover from 127.0.0.1:"]);
    println!("destination logged: {line}");
    let m = mirror_status(&pair.dst_api(), VOL).expect("mirror");
    assert_eq!(m["promoted"], false, "a refused takeover promoted the mirror: {m}");

    // The nodes' own switchover signs its takeover, and goes through.
    let (ok, stdout, stderr) = ctl(&pair.src.control, &["switchover", VOL]);
    assert!(ok, "switchover between authenticated nodes failed: {stdout}{stderr}");
    let v = wait_state(&pair.dst_api(), VOL, "in-sync", T);
    assert_eq!(v["role"], "primary", "{v}");
}

/// A pair moves from one secret to another one node at a time, with SIGHUP and no restart:
/// each node accepts the new key beside the old, then proves with it, then drops the old.
/// A switchover after every step (proven peer calls, a signed takeover, a new replication
/// handshake each way) finds the pair agreeing; in the end the old secret is refused.
#[test]
fn the_pair_s_secret_rotates_one_node_at_a_time_without_a_refusal() {
    let keys = tempfile::tempdir().expect("tempdir");
    let old = secret_file(keys.path(), "old.key", "the old secret");
    let new = secret_file(keys.path(), "new.key", "the new secret");
    let conf = |node: &str, files: &[&Path]| {
        let path = keys.path().join(format!("{node}.toml"));
        let list: Vec<String> = files.iter().map(|f| format!("{:?}", f.display().to_string())).collect();
        fs::write(&path, format!("secret-file = [{}]\n", list.join(", "))).expect("write the config");
        path
    };
    let (a_conf, b_conf) = (conf("a", &[&old]), conf("b", &[&old]));
    let pair = Pair::start_with(
        "rotate",
        &["--config", a_conf.to_str().expect("path")],
        &["--config", b_conf.to_str().expect("path")],
    );
    pair.create_mirrored(VOL, 8 * MIB, LOG_BYTES_MIN);
    let hup = |n: &nvmirror_control::cluster::NodeProc, keys_now: usize, step: usize| {
        let pid = i32::try_from(n.pid().expect("running")).expect("pid");
        // SAFETY: kill(2) on a child process of this test, running.
        unsafe { libc::kill(pid, libc::SIGHUP) };
        let seen = format!("{keys_now} key(s)");
        wait_for(&format!("{} to reread its secret (step {step})", n.name), T, || {
            let lines = log_text(&n.log_path()).lines().filter(|l| l.contains("secret reread")).count();
            Ok((lines >= step && log_text(&n.log_path()).contains(&seen)).then_some(()))
        });
    };
    // Each switchover hands the volume to the other node and back is the next one's.
    let mut primary_is_a = true;
    let mut switch = |what: &str| {
        let (from, to) = if primary_is_a { (&pair.src, &pair.dst) } else { (&pair.dst, &pair.src) };
        let out = ctl_ok(&from.control, &["switchover", VOL]);
        assert!(out.contains("switched over"), "{what}: {out}");
        wait_state(&nvmirror_control::api::Client::new(&to.control), VOL, "in-sync", T);
        let mut c = NbdClient::connect(to.nbd.as_str(), VOL).expect("NBD connect to the new primary");
        c.write(0, &[0x42; 4096]).unwrap_or_else(|e| panic!("{what}: a write: {e}"));
        primary_is_a = !primary_is_a;
    };
    // 1. Both accept the new key; both still prove with the old.
    conf("b", &[&old, &new]);
    hup(&pair.dst, 2, 1);
    conf("a", &[&old, &new]);
    hup(&pair.src, 2, 1);
    switch("both accept both, prove with the old");
    // 2. One node proves with the new key, the other still with the old.
    conf("a", &[&new, &old]);
    hup(&pair.src, 2, 2);
    switch("a proves with the new key, b with the old");
    conf("b", &[&new, &old]);
    hup(&pair.dst, 2, 2);
    switch("both prove with the new key");
    // 3. The old key goes.
    conf("a", &[&new]);
    hup(&pair.src, 1, 3);
    conf("b", &[&new]);
    hup(&pair.dst, 1, 3);
    switch("the new key alone");
    // A node that still holds only the old secret is refused.
    let stale = nvmirror_control::cluster::NodeProc::start(
        &bin(),
        "stale",
        &pair.root.join("stale"),
        &["--secret-file", old.to_str().expect("path")],
    )
    .expect("start a node with the old secret");
    let primary = if primary_is_a { &pair.src } else { &pair.dst };
    ctl_ok(&primary.control, &["volume", "create", "w", "--size", "8M"]);
    ctl_fails(&primary.control, &["mirror", "w", "--to", &stale.control], "secret");
}
