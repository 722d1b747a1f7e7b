//! `ctl events` and `GET /v1/events`: state changes as JSON lines, in order, resumable from
//! an id, followed live; bad parameters refused.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const VOL: &str = "vol";

fn events(node: &str, since: u64) -> Vec<Value> {
    let out =
        run_bin(&["ctl", "--node", node, "events", "--once", "--since", &since.to_string()], Duration::from_secs(30));
    assert!(out.status.success(), "ctl events failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

#[test]
fn state_changes_stream_in_order_and_resume_from_an_id() {
    let mut pair = Pair::start("events");
    pair.create_mirrored(VOL, 16 * MIB, LOG_BYTES_MIN);

    // Follow the stream from now on, in a child process.
    let mut follower = Command::new(bin())
        .args(["ctl", "--node", &pair.src.control, "events", "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ctl events");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = follower.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });

    // The mirror goes away and comes back (after the sampler, 200 ms apart, saw it in sync:
    // a state shorter than that can pass unseen).
    std::thread::sleep(Duration::from_millis(500));
    let dst_boot = events(&pair.dst.control, 0)[0]["boot"].as_str().expect("a boot id").to_string();
    pair.dst.kill();
    wait_for("the source to see its mirror gone", Duration::from_secs(60), || {
        let s = volume_status(&pair.src_api(), VOL)?;
        Ok((s["state"] != "in-sync").then_some(()))
    });
    pair.dst.restart().expect("restart");
    wait_state(&pair.src_api(), VOL, "in-sync", Duration::from_secs(60));
    let mut c = nvmirror_dataplane::frontend::nbd_client::NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD");
    c.write(0, &[7u8; 4096]).expect("a write");
    cp(&pair.src_api(), VOL).expect("CP");
    std::thread::sleep(Duration::from_millis(600));

    let all = events(&pair.src.control, 0);
    // A look from the start opens with the snapshot (id 0) of every volume's state; every
    // line carries this start's boot id, and the restarted node has another.
    let snap = &all[0];
    assert_eq!((snap["kind"].as_str(), snap["id"].as_u64()), (Some("snapshot"), Some(0)), "{snap}");
    let row = snap["detail"]["volumes"].as_array().expect("volumes").iter().find(|v| v["volume"] == VOL).cloned();
    let row = row.unwrap_or_else(|| panic!("{VOL} missing from the snapshot: {snap}"));
    assert_eq!((row["role"].as_str(), row["state"].as_str()), (Some("primary"), Some("in-sync")), "{row}");
    let boot = snap["boot"].as_str().expect("a boot id");
    assert!(boot.len() == 16 && all.iter().all(|e| e["boot"] == boot), "boot ids: {all:?}");
    let dst_now = events(&pair.dst.control, 0);
    assert!(dst_now[0]["boot"].as_str().is_some_and(|b| b != dst_boot), "the restarted node kept its boot id");
    let ids: Vec<u64> = all.iter().map(|e| e["id"].as_u64().expect("id")).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids not increasing: {ids:?}");
    let kinds: Vec<&str> = all.iter().map(|e| e["kind"].as_str().unwrap_or("?")).collect();
    for k in ["node-started", "volume-created", "mirror-paired", "state", "cp"] {
        assert!(kinds.contains(&k), "no {k} event in {kinds:?}");
    }
    // The volume's states, in order: in sync, then away, then in sync again.
    let states: Vec<&str> = all
        .iter()
        .filter(|e| e["kind"] == "state" && e["detail"]["role"] == "primary")
        .map(|e| e["detail"]["state"].as_str().unwrap_or("?"))
        .collect();
    let first_away =
        states.iter().position(|s| *s != "in-sync" && *s != "not-mirrored" && *s != "baseline" && *s != "connecting");
    let away = first_away.unwrap_or_else(|| panic!("no state change away from in-sync: {states:?}"));
    assert!(states[..away].contains(&"in-sync"), "not in sync before the cut: {states:?}");
    assert!(states[away..].contains(&"in-sync"), "not in sync again after the return: {states:?}");
    let reason = all.iter().find(|e| e["kind"] == "state" && e["detail"]["state"] == states[away]).expect("the event");
    assert!(reason["detail"]["reason"].is_string(), "a state change without its reason: {reason}");

    // Resuming from an id skips what came before.
    let mid = ids[ids.len() / 2];
    let later = events(&pair.src.control, mid);
    assert!(later.iter().all(|e| e["id"].as_u64().unwrap_or(0) > mid));
    assert_eq!(later.len(), ids.iter().filter(|&&i| i > mid).count());

    // The follower saw them live, in the same order.
    let mut seen = Vec::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
        let e: Value = serde_json::from_str(&l).expect("a JSON line");
        seen.push(e["id"].as_u64().expect("id"));
        if seen.len() >= 3 && seen.last() == ids.last() {
            break;
        }
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "follower ids not increasing: {seen:?}");
    assert!(seen.len() >= 3, "the follower saw too little: {seen:?}");
    let _ = follower.kill();
    let _ = follower.wait();

    // Bad parameters: a clear error and a non-zero exit.
    let out =
        run_bin(&["ctl", "--node", &pair.src.control, "events", "--once", "--since", "x"], Duration::from_secs(30));
    assert!(!out.status.success());
    let (body, _) =
        raw_exchange(&pair.src.control, b"GET /v1/events?since=abc HTTP/1.0\r\n\r\n", false, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with("HTTP/1.0 400") || text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("not an event id"), "{text}");
}

#[test]
fn ctl_events_prints_and_exits_and_streams_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = nvmirror_control::cluster::NodeProc::start(&bin(), "solo", &dir.path().join("solo"), &[])
        .expect("start a node");
    create_volume(&nvmirror_control::api::Client::new(&node.control), VOL, 4 * MIB, Some(LOG_BYTES_MIN))
        .expect("create");
    cp(&nvmirror_control::api::Client::new(&node.control), VOL).expect("CP");

    // Without --follow: what is kept, then exit 0.
    let out = run_bin(&["ctl", "--node", &node.control, "events"], Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let kinds: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line")["kind"].as_str().unwrap_or("?").to_string())
        .collect();
    for k in ["node-started", "volume-created", "cp-forced"] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in {kinds:?}");
    }

    // Followers that never read hold their own streams only: the API answers beside them,
    // and the stream after the last allowed one is refused clearly.
    let max = nvmirror_control::events::FOLLOWERS_MAX;
    let mut stuck = Vec::new();
    for _ in 0..max {
        let mut s = std::net::TcpStream::connect(&node.control).expect("connect");
        std::io::Write::write_all(&mut s, b"GET /v1/events?follow=1 HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
        stuck.push(s);
    }
    let refused = wait_for("a stream past the bound to be refused", Duration::from_secs(30), || {
        let (body, _) = raw_exchange(
            &node.control,
            b"GET /v1/events?follow=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            false,
            Duration::from_secs(2),
        );
        let text = String::from_utf8_lossy(&body).to_string();
        Ok(text.starts_with("HTTP/1.1 503").then_some(text))
    });
    assert!(refused.contains("event streams are open already"), "{refused}");
    let t = std::time::Instant::now();
    status(&nvmirror_control::api::Client::new(&node.control)).expect("status beside stuck streams");
    assert!(t.elapsed() < Duration::from_secs(5), "the API was held up by event streams: {:?}", t.elapsed());
    drop(stuck);

    // A node that cannot be reached: a non-zero exit with one line.
    let gone = node.control.clone();
    drop(node);
    let out = run_bin(&["ctl", "--node", &gone, "events"], Duration::from_secs(30));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("nvmirror: "), "{stderr}");
}
