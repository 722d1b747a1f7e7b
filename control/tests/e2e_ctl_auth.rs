//! Signed operator calls with real processes: a node started with `--secret-file` and
//! `--require-signed-ctl` refuses unsigned admin calls (401, one clear line from `ctl`, a
//! logged refusal) and calls signed with another secret, while reads stay open; `ctl
//! --secret-file` signs them and they go through. A node without the flag takes unsigned
//! and signed admin calls alike.

mod common;

use common::*;
use nvmirror_control::cluster::NodeProc;

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_node_that_requires_signed_ctl_takes_only_signed_admin_calls() {
    let keys = tempfile::tempdir().expect("tempdir");
    let good = secret_file(keys.path(), "pair.key", "correct horse battery staple");
    let wrong = secret_file(keys.path(), "other.key", "Tr0ub4dor&3");
    let (good, wrong) = (good.to_str().unwrap(), wrong.to_str().unwrap());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut n =
        NodeProc::start(&bin(), "strict", &dir.path().join("n"), &["--secret-file", good, "--require-signed-ctl"])
            .expect("start the node");
    let node = n.control.clone();
    let create = |extra: &[&str], vol: &str| -> Vec<String> {
        let mut a = vec!["ctl", "--node", node.as_str()];
        a.extend_from_slice(extra);
        a.extend(["volume", "create", vol, "--size", "4M"]);
        a.into_iter().map(str::to_string).collect()
    };

    // Reads stay open; unsigned admin calls, and calls signed with another secret, do not.
    let (ok, _, stderr) = nvmirror(&["ctl", "--node", &node, "status", "--json"]);
    assert!(ok, "an unsigned read was refused: {stderr}");
    fails_with(&strs(&create(&[], "v1")), "requires signed admin calls");
    fails_with(&strs(&create(&["--secret-file", wrong], "v1")), "does not verify");
    let log = log_text(&n.log_path());
    assert!(log.contains("control: refused POST /v1/volumes from 127.0.0.1:"), "no refusal logged:\n{log}");
    let (ok, stdout, _) = nvmirror(&["ctl", "--node", &node, "status", "--json"]);
    assert!(ok);
    assert!(!stdout.contains("\"v1\""), "a refused call created a volume: {stdout}");

    // Signed with the pair's secret: done, and so are the commands that POST after it.
    let (ok, _, stderr) = nvmirror(&strs(&create(&["--secret-file", good], "v1")));
    assert!(ok, "a signed admin call was refused: {stderr}");
    let (ok, _, stderr) = nvmirror(&["ctl", "--node", &node, "--secret-file", good, "scrub", "v1"]);
    assert!(ok, "a signed scrub was refused: {stderr}");
    n.kill();

    // Without --require-signed-ctl: unsigned and signed admin calls alike.
    let mut open = NodeProc::start(&bin(), "open", &dir.path().join("o"), &["--secret-file", good]).expect("start");
    let node = open.control.clone();
    for (extra, vol) in [(vec![], "u"), (vec!["--secret-file", good], "s")] {
        let mut a = vec!["ctl", "--node", node.as_str()];
        a.extend(extra);
        a.extend(["volume", "create", vol, "--size", "4M"]);
        let (ok, _, stderr) = nvmirror(&a);
        assert!(ok, "{a:?}: {stderr}");
    }
    open.kill();

    // The flag needs a secret.
    let d = dir.path().join("x");
    let d = d.to_str().unwrap();
    let (ok, _, stderr) = nvmirror(&node_args(d, &["--require-signed-ctl"]));
    assert!(!ok && stderr.contains("--secret-file"), "{stderr}");
}
