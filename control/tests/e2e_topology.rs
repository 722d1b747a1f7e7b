//! Many-to-many mirroring with real node processes: one destination hosts mirrors of
//! volumes from two different source nodes, and one source mirrors two of its volumes to
//! two different destinations. Every mirror is then failed over and checked.

use std::path::Path;
use std::time::{Duration, Instant};

use nvmirror_control::api::{Client, CreateVolume, MirrorRequest};
use nvmirror_control::cluster::NodeProc;
use nvmirror_control::workload::Workload;
use nvmirror_dataplane::frontend::nbd_client::NbdClient;
use serde_json::{json, Value};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nvmirror"))
}

fn create(c: &Client, name: &str) {
    let _: Value = c
        .post(
            "/v1/volumes",
            &CreateVolume { name: name.into(), size: 16 << 20, log_bytes: Some(4 << 20), ..Default::default() },
        )
        .unwrap();
}

fn mirror(c: &Client, name: &str, to: &NodeProc) {
    let _: Value = c
        .post(
            &format!("/v1/volumes/{name}/mirror"),
            &MirrorRequest {
                to: to.control.clone(),
                transport: "tcp".into(),
                policy: "strict".into(),
                resync_ranges: Vec::new(),
                rate: None,
            },
        )
        .unwrap();
    let t = Instant::now();
    loop {
        let s: Value = c.get("/v1/status").unwrap();
        let v = s["volumes"].as_array().unwrap().iter().find(|v| v["volume"] == name).cloned().unwrap();
        if v["state"] == "in-sync" {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{name} never reached in-sync: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn one_destination_two_sources_and_one_source_two_destinations() {
    let dir = tempfile::tempdir().unwrap();
    // a: source of a1 (to c) and a2 (to d); b: source of b1 (to c); c: destination for a
    // and b. c keeps its logs in file-sync mode, the others in the default file mode.
    let sync_dir = dir.path().join("c-nvram");
    let sync_arg = format!("file-sync:{}", sync_dir.display());
    let mut a = NodeProc::start(bin(), "a", &dir.path().join("a"), &[]).unwrap();
    let mut b = NodeProc::start(bin(), "b", &dir.path().join("b"), &[]).unwrap();
    let c = NodeProc::start(bin(), "c", &dir.path().join("c"), &["--nvram", &sync_arg]).unwrap();
    let d = NodeProc::start(bin(), "d", &dir.path().join("d"), &[]).unwrap();
    let (ca, cb, cc, cd) =
        (Client::new(&a.control), Client::new(&b.control), Client::new(&c.control), Client::new(&d.control));
    create(&ca, "a1");
    create(&ca, "a2");
    create(&cb, "b1");
    mirror(&ca, "a1", &c);
    mirror(&ca, "a2", &d);
    mirror(&cb, "b1", &c);

    let s: Value = cc.get("/v1/status").unwrap();
    let sources: Vec<&str> =
        s["mirrors"].as_array().unwrap().iter().map(|m| m["source_node"].as_str().unwrap()).collect();
    assert_eq!(sources.len(), 2, "{s}");
    assert!(sources.contains(&"a") && sources.contains(&"b"), "{s}");
    assert!(s["nvram"].as_str().unwrap().starts_with("file-sync:"), "{s}");
    // Each (source, volume, partition) has a log file of its own on c.
    for (src, vol) in [("a", "a1"), ("b", "b1")] {
        for p in 0..2 {
            assert!(sync_dir.join("mirrors").join(src).join(vol).join(format!("log.{p}")).exists());
        }
    }

    // Checked writes to all three volumes, interleaved in rounds, with a CP in the middle.
    let mut loads: Vec<(String, Workload, NbdClient)> = Vec::new();
    for (i, (name, node)) in [("a1", &a), ("a2", &a), ("b1", &b)].into_iter().enumerate() {
        let client = NbdClient::connect(node.nbd.as_str(), name).unwrap();
        loads.push((name.to_string(), Workload::new(0, 1024, 7 + i as u64), client));
    }
    for round in 0..4 {
        for (_, w, client) in &mut loads {
            w.run(client, 4, 300, |_| {}).unwrap();
        }
        if round == 1 {
            let _: Value = ca.post("/v1/volumes/a1/cp", &json!({})).unwrap();
            let _: Value = cb.post("/v1/volumes/b1/cp", &json!({})).unwrap();
        }
    }
    for (name, w, _) in &loads {
        assert_eq!(w.acks, 1200, "{name}: every write acknowledged while in sync");
        assert_eq!(w.errors, 0, "{name}");
    }

    // Both sources are lost; every mirror is failed over on its own destination.
    a.kill();
    b.kill();
    for (name, dest) in [("a1", &cc), ("a2", &cd), ("b1", &cc)] {
        let r: Value = dest.post(&format!("/v1/volumes/{name}/failover"), &json!({})).unwrap();
        assert_eq!(r["epoch"], 2, "{name}: {r}");
        assert!(r["stops"].as_array().unwrap().is_empty(), "{name}: {r}");
    }
    for (name, w, _) in &loads {
        let dest = if name == "a2" { &d } else { &c };
        let mut client = NbdClient::connect(dest.nbd.as_str(), name).unwrap();
        assert!(!client.read_only, "{name}: promoted volume must be writable");
        let v = w.verify(|off, buf| client.read(off, buf)).unwrap();
        assert!(v.bad.is_empty(), "{name}: {:?}", &v.bad[..v.bad.len().min(5)]);
        assert!(v.blocks_with_acked_data > 500, "{name}: {v:?}");
    }
}

/// Many writes in flight are persisted and acknowledged in batches (group commit), and an
/// idle node parks its pollers instead of spinning.
#[test]
fn group_commit_under_load_and_idle_nodes_do_not_spin() {
    let dir = tempfile::tempdir().unwrap();
    let a = NodeProc::start(bin(), "a", &dir.path().join("a"), &[]).unwrap();
    let b = NodeProc::start(bin(), "b", &dir.path().join("b"), &[]).unwrap();
    let (ca, cb) = (Client::new(&a.control), Client::new(&b.control));
    create(&ca, "v");
    mirror(&ca, "v", &b);
    let mut client = NbdClient::connect(a.nbd.as_str(), "v").unwrap();
    let mut w = Workload::new(0, 2048, 3);
    w.run(&mut client, 32, 4000, |_| {}).unwrap();
    assert_eq!(w.acks, 4000);
    let s: Value = cb.get("/v1/status").unwrap();
    let m = &s["mirrors"][0];
    let entries = m["entries_received"].as_u64().unwrap();
    let commits = m["commits"].as_u64().unwrap();
    assert!(entries >= 4000, "{m}");
    assert!(commits < entries, "no batching at queue depth 32: {commits} commits for {entries} entries");
    eprintln!("group commit: {entries} entries in {commits} commits");

    // Idle: both nodes together use a small fraction of one core.
    std::thread::sleep(Duration::from_millis(300));
    let cpu = |n: &NodeProc| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", n.pid().unwrap())).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before = cpu(&a) + cpu(&b);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = (cpu(&a) + cpu(&b) - before) as f64 / ticks_per_s;
    let share = used / t.elapsed().as_secs_f64();
    eprintln!("idle pair: {:.1}% of one core", share * 100.0);
    assert!(share < 0.25, "idle nodes burn {:.0}% of a core: pollers are not parking", share * 100.0);
}

/// Malformed, oversized and hostile control API bodies get a clear 4xx error, and the node
/// keeps serving.
#[test]
fn control_api_refuses_bad_bodies_and_keeps_serving() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let a = NodeProc::start(bin(), "a", &dir.path().join("a"), &[]).unwrap();
    let raw = |request: &str| -> String {
        let mut s = std::net::TcpStream::connect(&a.control).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let post = |path: &str, body: &str| {
        raw(&format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ))
    };
    let cases = [
        ("/v1/volumes", "{not json", "400"),
        ("/v1/volumes", "{\"name\":\"v\",\"size\":4096,\"bogus\":1}", "400"),
        ("/v1/volumes", "{\"name\":\"v\",\"size\":-1}", "400"),
        ("/v1/volumes", "{\"name\":\"../../etc\",\"size\":4096}", "409"),
        ("/v1/volumes", "{\"name\":\"v\",\"size\":4097}", "409"),
        ("/v1/volumes", "{\"name\":\"v\",\"size\":18446744073709551615}", "409"),
        ("/v1/volumes/nope/cp", "{}", "404"),
        ("/v1/volumes/nope/mirror", "{\"to\":\"127.0.0.1:1\"}", "404"),
        ("/v1/nothing", "{}", "404"),
    ];
    for (path, body, code) in cases {
        let resp = post(path, body);
        let status = resp.split_whitespace().nth(1).unwrap_or("");
        assert_eq!(status, code, "{path} {body}: {resp}");
        assert!(resp.contains("\"error\""), "{path} {body}: no error message: {resp}");
    }
    // A body above the limit is refused without being read whole.
    let big = format!("{{\"name\":\"{}\",\"size\":4096}}", "x".repeat(200_000));
    let resp = post("/v1/volumes", &big);
    assert_eq!(resp.split_whitespace().nth(1), Some("413"), "{}", &resp[..resp.len().min(200)]);
    // Garbage that is not HTTP at all.
    let _ = raw("\x00\x01\x02garbage\r\n\r\n");
    // Still serving, and nothing was created by the refused requests.
    let c = Client::new(&a.control);
    let s: Value = c.get("/v1/status").unwrap();
    assert_eq!(s["volumes"].as_array().unwrap().len(), 0, "{s}");
    create(&c, "ok");
    assert!(!dir.path().join("etc").exists());
}
