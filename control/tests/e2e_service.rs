//! The node as a service: a clean stop on SIGTERM (writes in flight answered, a pair in
//! sync left level, exit status 0), systemd's notification protocol (READY, STOPPING), log
//! lines with the journal's priorities, and the log level reread on SIGHUP.
//! Its own test binary: it sets NOTIFY_SOCKET and JOURNAL_STREAM for the nodes it starts.

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
    // The nodes started below inherit them (this binary runs this one test).
    std::env::set_var("NOTIFY_SOCKET", &sock_path);
    std::env::set_var("JOURNAL_STREAM", "8:12345");
    // The source starts at level warn, from its config file.
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "log-level = \"warn\"\n").expect("write the config");
    let mut pair = Pair::start_with("service", &["--config", config.to_str().expect("utf-8 path")], &[]);
    pair.create_mirrored(VOL, 16 * MIB, LOG_BYTES_MIN);
    // At warn, the baseline's info lines are not logged; the mirror's node logs them, with
    // the journal's priority for info.
    assert!(!log_text(&pair.src.log_path()).contains("baseline copy"), "an info line at level warn");
    let b = log_text(&pair.dst.log_path());
    assert!(b.lines().any(|l| l.starts_with("<6>") && l.contains("new mirror of")), "no <6> info line:\n{b}");
    // SIGHUP rereads the level from the file.
    std::fs::write(&config, "log-level = \"info\"\n").expect("rewrite the config");
    let pid = pair.src.pid().expect("the source's pid");
    // SAFETY: kill(2) on a child process of this test, running.
    unsafe { libc::kill(i32::try_from(pid).expect("pid"), libc::SIGHUP) };
    wait_for("the log level reread", Duration::from_secs(10), || {
        Ok(log_text(&pair.src.log_path()).contains("<6>SIGHUP: log level info").then_some(()))
    });
    let mut w = Workload::new(0, 4096, seed);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), VOL).expect("NBD connect");
    w.run(&mut c, 8, 1500, |_| {}).expect("writes");
    assert_eq!(w.errors, 0);

    let status = pair.src.terminate(Duration::from_secs(60)).expect("the node exits on SIGTERM");
    assert!(status.success(), "exit status {status:?} after SIGTERM");
    drop(c);
    let log = log_text(&pair.src.log_path());
    for want in ["SIGTERM: stopping", "volume vol stopped, every write in flight answered", "node site-a: stopped"] {
        assert!(log.lines().any(|l| l.starts_with("<6>") && l.contains(want)), "the log lacks <6>{want:?}:\n{log}");
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
