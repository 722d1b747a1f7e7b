//! The node as a service: a clean stop on SIGTERM (writes in flight answered, a pair in
//! sync left level, exit status 0) and systemd's notification protocol (READY, STOPPING).
//! Its own test binary: it sets NOTIFY_SOCKET for the nodes it starts.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::*;
use nvmirror_control::workload::Workload;
use nvmirror_dataplane::frontend::nbd_client::NbdClient;

const VOL: &str = "vol";

#[test]
fn sigterm_stops_a_node_cleanly_and_systemd_hears_it_ready_and_stopping() {
    let seed = base_seed("sigterm_stops_a_node_cleanly_and_systemd_hears_it_ready_and_stopping");
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    // The nodes started below inherit it (this binary runs this one test).
    std::env::set_var("NOTIFY_SOCKET", &sock_path);
    let mut pair = Pair::start("service");
    pair.create_mirrored(VOL, 16 * MIB, LOG_BYTES_MIN);
    let mut w = Workload::new(0, 4096, seed);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD connect");
    w.run(&mut c, 8, 1500, |_| {}).expect("writes");
    assert_eq!(w.errors, 0);

    let status = pair.src.terminate(Duration::from_secs(60)).expect("the node exits on SIGTERM");
    assert!(status.success(), "exit status {status:?} after SIGTERM");
    drop(c);
    let log = log_text(&pair.src.log_path());
    for want in ["SIGTERM: stopping", "volume vol stopped, every write in flight answered", "node site-a: stopped"] {
        assert!(log.contains(want), "the log lacks {want:?}:\n{log}");
    }
    let mut said = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        said.push(String::from_utf8_lossy(&buf[..n]).to_string());
        if said.iter().any(|m| m.contains("STOPPING=1")) {
            break;
        }
    }
    assert!(said.iter().filter(|m| m.contains("READY=1")).count() >= 2, "both nodes say READY: {said:?}");
    assert!(said.iter().any(|m| m.contains("STOPPING=1")), "the stopping node says STOPPING: {said:?}");

    // Restarted, it serves every acknowledged write and is level with its mirror at once.
    pair.src.restart().expect("restart after the clean stop");
    wait_state(&pair.src_api(), VOL, "in-sync", Duration::from_secs(30));
    assert_verified(&verify(&w, &pair.src.nbd, VOL).expect("verify"), "after a clean stop and a restart");
}
