//! The `nvmirror ctl` command line against real nodes: the whole flow (create, mirror, cp,
//! status, failover) and its failures, each a non-zero exit with a one-line reason.

mod common;

use std::time::Duration;

use common::*;
use nvmirror_control::workload::Workload;
use nvmirror_dataplane::frontend::nbd_client::NbdClient;
use serde_json::Value;

fn ctl_json(node: &str) -> Value {
    let out = ctl_ok(node, &["status", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out}"))
}

#[test]
fn ctl_drives_create_mirror_cp_failover() {
    let seed = base_seed("ctl_drives_create_mirror_cp_failover");
    let mut pair = Pair::start("cli");
    let (src, dst) = (pair.src.control.clone(), pair.dst.control.clone());

    let out = ctl_ok(&src, &["volume", "create", "vol", "--size", "64M"]);
    assert!(out.contains("created volume vol: 67108864 bytes"), "{out}");
    let out = ctl_ok(&src, &["volume", "create", "small", "--size", "16M", "--log-size", "4M"]);
    assert!(out.contains("created volume small: 16777216 bytes"), "{out}");
    let s = ctl_json(&src);
    let small = s["volumes"].as_array().expect("volumes").iter().find(|v| v["volume"] == "small").expect("small");
    assert_eq!(small["log_bytes_max"], 8 << 20, "two partitions of --log-size 4M: {small}");
    assert_eq!(small["state"], "not-mirrored");

    let out = ctl_ok(&src, &["mirror", "vol", "--to", &dst]);
    assert!(out.contains("in sync"), "{out}");
    let s = ctl_json(&src);
    let v = s["volumes"].as_array().expect("volumes").iter().find(|v| v["volume"] == "vol").expect("vol").clone();
    assert_eq!(v["state"], "in-sync", "{v}");
    assert!(v["peer"].as_str().unwrap_or("").contains(&dst), "peer {} should name {dst}", v["peer"]);
    let d = ctl_json(&dst);
    let m = d["mirrors"].as_array().expect("mirrors").iter().find(|m| m["volume"] == "vol").expect("mirror").clone();
    assert_eq!(m["consistent"], true, "{m}");
    assert_eq!(m["source_node"], "site-a", "{m}");

    let mut w = Workload::new(0, 4096, seed);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), "vol").expect("NBD connect");
    w.run(&mut c, 4, 500, |_| {}).expect("writes");
    assert_eq!(w.acks, 500);

    let out = ctl_ok(&src, &["cp", "vol"]);
    let n: u64 = out
        .strip_prefix("CP ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("ctl cp said: {out}"));
    assert!(out.contains("durable on both sites"), "{out}");
    let d = ctl_json(&dst);
    let m = d["mirrors"].as_array().expect("mirrors").iter().find(|m| m["volume"] == "vol").expect("mirror").clone();
    assert_eq!(m["applied_cp"], n, "ctl cp said CP {n}: {m}");

    let human = ctl_ok(&src, &["status"]);
    let line = human.lines().find(|l| l.starts_with("vol ")).unwrap_or_else(|| panic!("no line for vol: {human}"));
    assert!(line.contains("primary") && line.contains("in-sync"), "{line}");
    let human = ctl_ok(&dst, &["status"]);
    let line = human.lines().find(|l| l.starts_with("vol ")).unwrap_or_else(|| panic!("no line for vol: {human}"));
    assert!(line.contains("mirror") && line.contains("in-sync"), "{line}");

    w.run(&mut c, 4, 300, |_| {}).expect("writes after the CP");
    drop(c);
    // Dry runs say what would happen and change nothing.
    let out = ctl_ok(&src, &["switchover", "vol", "--dry-run"]);
    assert!(
        out.contains("would make site-b the primary of vol at epoch 2") && out.contains("nothing changed"),
        "{out}"
    );
    let out = ctl_ok(&dst, &["failover", "vol", "--dry-run"]);
    assert!(out.contains("would make site-b the primary of vol at epoch 2"), "{out}");
    assert!(out.contains("site-a is still connected"), "{out}");
    assert_eq!(
        volume_status(&pair.src_api(), "vol").expect("status")["state"],
        "in-sync",
        "a dry run changed the pair"
    );
    assert_eq!(mirror_status(&pair.dst_api(), "vol").expect("mirror")["epoch"], 1);
    pair.src.kill();
    let out = ctl_ok(&dst, &["failover", "vol", "--dry-run"]);
    assert!(out.contains("epoch 2, replaying") && !out.contains("still connected"), "{out}");
    let out = ctl_ok(&dst, &["failover", "vol"]);
    assert!(out.contains("failed over: epoch 2"), "{out}");
    assert!(out.contains("writable primary"), "{out}");
    let v = verify(&w, &pair.dst.nbd, "vol").expect("verify");
    assert_verified(&v, "volume failed over with ctl");
    let d = ctl_json(&dst);
    let v = d["volumes"].as_array().expect("volumes").iter().find(|v| v["volume"] == "vol").expect("vol").clone();
    assert_eq!(v["epoch"], 2, "{v}");
    assert_eq!(v["state"], "not-mirrored", "{v}");
    // One row per volume: the promoted mirror is the volume's row now.
    let rows = d["mirrors"].as_array().expect("mirrors").iter().filter(|m| m["volume"] == "vol").count();
    assert_eq!(rows, 0, "the failed-over mirror is still listed as a mirror: {d}");
    // A second failover of the same volume is refused, dry or not.
    ctl_fails(&dst, &["failover", "vol"], "already a primary");
    assert_eq!(ctl_fails(&dst, &["failover", "vol", "--dry-run"], "already a primary"), 5);
    // The old primary, back, is told how it would come back, and stays as it is.
    pair.src.restart().expect("restart site-a");
    let out = ctl_ok(&pair.src.control, &["resync", "vol", "--from", &dst, "--dry-run"]);
    assert!(
        out.contains("would become the mirror of site-b by delta resync") && out.contains("nothing changed"),
        "{out}"
    );
    let s = volume_status(&pair.src_api(), "vol").expect("site-a still holds vol");
    assert_eq!(s["epoch"], 1, "{s}");
}

#[test]
fn ctl_failures_exit_non_zero_with_one_line() {
    let pair = Pair::start("clifail");
    let (src, dst) = (pair.src.control.clone(), pair.dst.control.clone());
    ctl_ok(&src, &["volume", "create", "dup", "--size", "16M"]);

    // Unknown volumes: exit 4.
    assert_eq!(ctl_fails(&src, &["cp", "nope"], "no volume nope"), 4);
    assert_eq!(ctl_fails(&src, &["mirror", "nope", "--to", &dst], "no volume nope"), 4);
    assert_eq!(ctl_fails(&dst, &["failover", "nope"], "no mirror of volume nope"), 4);
    assert_eq!(ctl_fails(&src, &["status", "nope"], "no volume or mirror nope"), 4);
    assert_eq!(ctl_fails(&src, &["scrub", "nope"], "no volume or mirror nope"), 4);
    // A failover on the node that holds the primary, not a mirror: refused, exit 5.
    assert_eq!(ctl_fails(&src, &["failover", "dup"], "already a primary"), 5);
    // Bad sizes and names; a malformed value is a usage error, exit 2.
    assert_eq!(ctl_fails(&src, &["volume", "create", "v", "--size", "12X"], "bad size"), 2);
    assert_eq!(ctl_fails(&src, &["volume", "create", "v"], "--size"), 2);
    ctl_fails(&src, &["volume", "create", "v", "--size", "0"], "zero");
    ctl_fails(&src, &["volume", "create", "v", "--size=-1M"], "bad size");
    ctl_fails(&src, &["volume", "create", "v", "--size", "99999999999T"], "too large");
    ctl_fails(&src, &["volume", "create", "v", "--size", "5000"], "multiple of 4096");
    ctl_fails(&src, &["volume", "create", "v", "--size", "16M", "--log-size", "1M"], "log partition");
    // Sizes the NVRAM dir or the data dir cannot hold are refused up front, and leave
    // nothing that blocks a right-sized volume of the same name.
    ctl_fails(&src, &["volume", "create", "v", "--size", "16M", "--log-size", "100T"], "bytes free");
    ctl_fails(&src, &["volume", "create", "v", "--size", "900T"], "bytes free");
    ctl_ok(&src, &["volume", "create", "v", "--size", "16M"]);
    ctl_fails(&src, &["volume", "create", "bad/name", "--size", "16M"], "invalid name");
    ctl_fails(&src, &["volume", "create", "dup", "--size", "16M"], "already exists");
    // Mirror requests that cannot be met.
    ctl_fails(&src, &["mirror", "dup", "--to", "127.0.0.1:1"], "127.0.0.1:1");
    ctl_fails(&src, &["mirror", "dup", "--to", &dst, "--transport", "rdma"], "rdma");
    assert_eq!(ctl_fails(&src, &["mirror", "dup", "--to", &dst, "--policy", "lazy"], "lazy"), 2);
    // Illegal role changes: a switchover of a volume that is not mirrored, or not here; a
    // resync from a node that is not the volume's primary, or of a volume not here.
    assert_eq!(ctl_fails(&src, &["switchover", "dup"], "not mirrored"), 5);
    assert_eq!(ctl_fails(&dst, &["switchover", "dup"], "no volume dup"), 4);
    ctl_fails(&src, &["resync", "dup", "--from", &dst], "holds no primary volume dup");
    ctl_fails(&dst, &["resync", "dup", "--from", &src], "no volume dup");
    ctl_fails(&src, &["resync", "dup", "--from", &src], "this node");
    ctl_fails(&src, &["mirror", "dup", "--to", &src], "own node");
    // Unreachable nodes, and a port that is not a control API: exit 3.
    assert_eq!(ctl_fails("127.0.0.1:1", &["status"], "127.0.0.1:1"), 3);
    assert_eq!(ctl_fails("127.0.0.1:1", &["volume", "create", "v", "--size", "16M"], "127.0.0.1:1"), 3);
    assert_eq!(ctl_fails("no-such-host.invalid:80", &["status"], "no-such-host.invalid"), 3);
    assert_eq!(ctl_fails(&pair.src.nbd, &["status"], &pair.src.nbd), 3);
    // None of the failures created anything (v is the right-sized one made on purpose).
    let s = ctl_json(&src);
    let names: Vec<&str> =
        s["volumes"].as_array().expect("volumes").iter().filter_map(|v| v["volume"].as_str()).collect();
    assert_eq!(names, ["dup", "v"], "failed commands left volumes behind");
    assert_eq!(s["volumes"][0]["state"], "not-mirrored");
    // The status of one volume: its row alone.
    let one: Value = serde_json::from_str(&ctl_ok(&src, &["status", "v", "--json"])).expect("status v --json");
    let rows: Vec<&str> =
        one["volumes"].as_array().expect("volumes").iter().filter_map(|v| v["volume"].as_str()).collect();
    assert_eq!(rows, ["v"], "{one}");
    assert!(ctl_ok(&src, &["status", "v"]).lines().any(|l| l.starts_with("v ")), "status v has no row for v");
}

#[test]
fn completions_and_man_pages_are_generated() {
    let dir = tempfile::tempdir().expect("tempdir");
    for shell in ["bash", "zsh", "fish"] {
        let (ok, script, err) = nvmirror(&["completions", shell]);
        assert!(ok, "completions {shell}: {err}");
        assert!(script.contains("failover") && script.contains("switchover"), "{shell}: no ctl commands in the script");
    }
    // bash loads the script and registers the completion.
    let (_, script, _) = nvmirror(&["completions", "bash"]);
    let file = dir.path().join("nvmirror.bash");
    std::fs::write(&file, script).expect("write the script");
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p nvmirror", file.display()))
        .output()
        .expect("run bash");
    assert!(String::from_utf8_lossy(&out.stdout).contains("nvmirror"), "bash did not register: {out:?}");
    fails_with(&["completions", "tcsh"], "tcsh");

    let man = dir.path().join("man");
    let (ok, _, err) = nvmirror(&["man", "--out", man.to_str().expect("utf-8 path")]);
    assert!(ok, "man: {err}");
    for page in ["nvmirror.1", "nvmirror-node.1", "nvmirror-ctl.1", "nvmirror-ctl-failover.1"] {
        let text = std::fs::read_to_string(man.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page} is not a man page");
    }
    let node = std::fs::read_to_string(man.join("nvmirror-node.1")).expect("node page");
    assert!(node.contains("data\\-dir") && node.contains("mirror\\-layout"), "the node page lacks its flags");
}

#[test]
fn node_advertises_the_replication_address_it_is_given_and_refuses_a_bad_one() {
    let dir = tempfile::Builder::new().prefix("nvmirror-e2e-advertise-").tempdir().expect("tempdir");
    for bad in ["nope", "host:0", ":7000", "host:99999", "host:port"] {
        let out = std::process::Command::new(bin())
            .arg("node")
            .arg("--data-dir")
            .arg(dir.path().join("bad"))
            .args(["--listen", "127.0.0.1:0", "--control", "127.0.0.1:0", "--nbd", "127.0.0.1:0", "--advertise", bad])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run nvmirror node");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a node started with --advertise {bad:?}");
        assert!(err.contains("--advertise") && err.contains("HOST:PORT"), "--advertise {bad:?}: {err}");
    }
    let node = nvmirror_control::cluster::NodeProc::start(
        &bin(),
        "adv",
        &dir.path().join("adv"),
        &["--advertise", "replication.example:7789"],
    )
    .expect("start a node with --advertise");
    let info: Value = nvmirror_control::api::Client::new(&node.control).get("/v1/node").expect("GET /v1/node");
    assert_eq!(info["replication"], "replication.example:7789", "{info}");
    let status: Value = nvmirror_control::api::Client::new(&node.control).get("/v1/status").expect("GET /v1/status");
    assert_eq!(status["replication"], "replication.example:7789", "{status}");
    assert_ne!(node.replication, "replication.example:7789", "the ready line names the bound address");
}

/// The text of GET /metrics of a node.
fn exposition(control: &str) -> String {
    let mut resp = ureq::get(&format!("http://{control}/metrics")).call().expect("GET /metrics");
    let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert!(ctype.starts_with("text/plain"), "content type {ctype}");
    resp.body_mut().read_to_string().expect("body")
}

/// `promtool check metrics` (Debian's prometheus package) over an exposition: the parser
/// and linter Prometheus itself uses. Its complaints, if any.
fn promtool(text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; test.sh installs it)");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write to promtool");
    let out = wait_output(child, COMMAND_TIMEOUT, "promtool").expect("promtool ran");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool check metrics: {:?}: {said}", out.status.code()))
    }
}

/// GET /metrics of a node, as (name, labels, value) samples, checking the exposition's
/// shape on the way: every sample's name was described (HELP and TYPE) before it.
fn metrics(control: &str) -> Vec<(String, String, f64)> {
    let text = exposition(control);
    let mut described = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let name = it.next().expect("name");
            match it.next() {
                Some("counter" | "gauge") => {
                    described.insert(name.to_string());
                }
                Some("histogram") => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        described.insert(format!("{name}{suffix}"));
                    }
                }
                _ => panic!("{line}"),
            }
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (name, rest) = line.split_once('{').unwrap_or_else(|| panic!("no labels: {line}"));
        let (labels, value) = rest.split_once("} ").unwrap_or_else(|| panic!("bad sample: {line}"));
        assert!(described.contains(name), "{name} sampled before its TYPE");
        assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{name}");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        out.push((name.to_string(), labels.to_string(), value));
    }
    out
}

fn sample(m: &[(String, String, f64)], name: &str, label: &str) -> f64 {
    m.iter()
        .find(|(n, l, _)| n == name && l.contains(label))
        .map(|s| s.2)
        .unwrap_or_else(|| panic!("no {name} with {label} in {m:?}"))
}

#[test]
fn metrics_expose_volumes_mirrors_and_their_raid_layers() {
    let pair = Pair::start("metrics");
    pair.create_mirrored("mvol", 8 * MIB, LOG_BYTES_MIN);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), "mvol").unwrap();
    for i in 0..50u64 {
        c.write(i * 4096, &[0x5a; 4096]).unwrap();
    }
    cp(&pair.src_api(), "mvol").unwrap();
    let src = metrics(&pair.src.control);
    let vol = "volume=\"mvol\"";
    assert_eq!(sample(&src, "nvmirror_volume_writes_total", vol), 50.0);
    assert_eq!(sample(&src, "nvmirror_volume_written_bytes_total", vol), 50.0 * 4096.0);
    assert!(sample(&src, "nvmirror_volume_cps_total", vol) >= 1.0);
    assert_eq!(sample(&src, "nvmirror_volume_replication_lag_entries", vol), 0.0);
    assert_eq!(sample(&src, "nvmirror_volume_info", "state=\"in-sync\""), 1.0);
    assert_eq!(sample(&src, "nvmirror_raid_degraded", "role=\"primary\""), 0.0);
    // The acknowledgement latency histogram: every write counted, the buckets cumulative.
    assert_eq!(sample(&src, "nvmirror_volume_ack_latency_seconds_count", vol), 50.0);
    assert_eq!(sample(&src, "nvmirror_volume_ack_latency_seconds_bucket", "le=\"+Inf\""), 50.0);
    let buckets: Vec<f64> = src
        .iter()
        .filter(|(n, l, _)| n == "nvmirror_volume_ack_latency_seconds_bucket" && l.contains(vol))
        .map(|s| s.2)
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "buckets not cumulative: {buckets:?}");
    assert!(sample(&src, "nvmirror_volume_ack_latency_seconds_sum", vol) > 0.0);
    assert_eq!(sample(&src, "nvmirror_volume_mirror_current", vol), 1.0);
    assert_eq!(sample(&src, "nvmirror_volume_changed_bytes", vol), 0.0);
    assert_eq!(sample(&src, "nvmirror_raid_unrecoverable_total", "role=\"primary\""), 0.0);
    let dst = metrics(&pair.dst.control);
    let mirror = "source=\"site-a\"";
    assert_eq!(sample(&dst, "nvmirror_mirror_connected", mirror), 1.0);
    assert!(sample(&dst, "nvmirror_mirror_cps_applied_total", mirror) >= 1.0);
    assert!(sample(&dst, "nvmirror_mirror_received_bytes_total", mirror) >= 50.0 * 4096.0 || transport() == "rdma");
    assert_eq!(sample(&dst, "nvmirror_raid_degraded", "role=\"mirror\""), 0.0);
}

/// Two volumes on a node, one mirrored, and a node holding a primary and a mirror: both
/// expositions parse and lint clean in Prometheus's own checker, every family once.
#[test]
fn metrics_of_nodes_with_several_volumes_and_roles_pass_promtool() {
    let pair = Pair::start("metrics-promtool");
    pair.create_mirrored("mvol", 8 * MIB, LOG_BYTES_MIN);
    create_volume(&pair.src_api(), "pvol", 8 * MIB, Some(LOG_BYTES_MIN)).expect("create pvol");
    create_volume(&pair.dst_api(), "dvol", 8 * MIB, Some(LOG_BYTES_MIN)).expect("create dvol on the mirror's node");
    for vol in ["mvol", "pvol"] {
        let mut c = NbdClient::connect(pair.src.nbd.as_str(), vol).unwrap();
        c.write(0, &[7; 4096]).unwrap();
    }
    for (node, control) in [("site-a", &pair.src.control), ("site-b", &pair.dst.control)] {
        let text = exposition(control);
        if let Err(e) = promtool(&text) {
            panic!("{node}: {e}\n{text}");
        }
        // Each family once, all its samples together after its TYPE line: what the text
        // format requires and strict parsers (Python's prometheus_client) enforce;
        // promtool 2.42 accepts a family's samples split by another's.
        let mut seen = std::collections::HashSet::new();
        let mut current = String::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().expect("name").to_string();
                assert!(seen.insert(current.clone()), "{node}: family {current} described twice:\n{text}");
            } else if !l.starts_with('#') {
                let name = l.split('{').next().expect("name");
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| *f == current))
                    .unwrap_or(name);
                assert_eq!(family, current, "{node}: sample {l} outside its family's group:\n{text}");
            }
        }
    }
    // The same samples as before, by family: site-a's two volumes in one group.
    let src = metrics(&pair.src.control);
    assert_eq!(sample(&src, "nvmirror_volume_writes_total", "volume=\"pvol\""), 1.0);
    assert_eq!(sample(&src, "nvmirror_volume_writes_total", "volume=\"mvol\""), 1.0);
    let dst = metrics(&pair.dst.control);
    assert_eq!(sample(&dst, "nvmirror_volume_info", "volume=\"dvol\""), 1.0);
    assert_eq!(sample(&dst, "nvmirror_mirror_connected", "volume=\"mvol\""), 1.0);
}

/// A node name ends up in paths, peers' records and metric labels: one that could not be
/// all three is refused at start, with one line.
#[test]
fn a_node_name_that_cannot_be_a_path_or_a_label_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("n");
    let d = d.to_str().expect("path");
    for bad in ["site\"a", "a/b", "", "x y"] {
        fails_with(&node_args(d, &["--name", bad]), "--name");
    }
}

/// `node --config FILE`: every flag as a TOML key; a flag on the command line wins; an
/// unknown key is refused with its line.
#[test]
fn a_config_file_sets_the_node_s_flags_and_the_command_line_wins() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("node.toml");
    let data = dir.path().join("n");
    std::fs::write(
        &conf,
        format!(
            "# nvmirror node\ndata-dir = \"{}\"\nlisten = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\nnbd = \"127.0.0.1:0\"\nname = \"from-file\"\nraid-data-disks = 2\n",
            data.display()
        ),
    )
    .expect("write config");
    let mut child = std::process::Command::new(bin())
        .args(["node", "--config", conf.to_str().expect("path"), "--name", "from-cli"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start a node from its config file");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
    let control = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("control="))
        .unwrap_or_else(|| panic!("no control address in {line:?}"))
        .to_string();
    assert!(line.contains("node from-cli ready"), "{line}");
    ctl_ok(&control, &["volume", "create", "v", "--size", "8M"]);
    let s = ctl_json(&control);
    assert_eq!(s["node"], "from-cli", "the command line's --name wins: {s}");
    assert_eq!(s["volumes"][0]["storage"]["data_disks"], 2, "the file's raid-data-disks applies: {s}");
    let _ = child.kill();
    let _ = child.wait();
    // `nvmirror node` alone reads the installed file (here NVMIRROR_CONFIG stands for
    // /etc/nvmirror/node.toml); with --data-dir it reads none.
    let installed = dir.path().join("installed.toml");
    let text = format!(
        "data-dir = \"{}\"\nlisten = \"127.0.0.1:0\"\ncontrol = \"127.0.0.1:0\"\nnbd = \"127.0.0.1:0\"\nname = \"from-file\"\n",
        dir.path().join("n2").display()
    );
    std::fs::write(&installed, text).expect("write the installed config");
    let mut child = std::process::Command::new(bin())
        .arg("node")
        .env("NVMIRROR_CONFIG", &installed)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("default.log")).expect("log file"))
        .spawn()
        .expect("start a node from the default config");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
    assert!(
        line.contains("node from-file ready"),
        "{line}: {}",
        std::fs::read_to_string(dir.path().join("default.log")).unwrap_or_default()
    );
    let _ = child.kill();
    let _ = child.wait();
    let out = std::process::Command::new(bin())
        .args(["node", "--data-dir", data.to_str().expect("path")])
        .env("NVMIRROR_CONFIG", &installed)
        .output()
        .expect("run a node with --data-dir and no --listen");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--listen"),
        "the default file was read with --data-dir given"
    );
    std::fs::write(&conf, "data-dir = \"/tmp/x\"\nlisten = \"127.0.0.1:0\"\nrepl-secret = \"x\"\n").expect("write");
    fails_with(&["node", "--config", conf.to_str().expect("path")], "node.toml:3: unknown key \"repl-secret\"");
}

#[test]
fn volume_delete_removes_a_volume_its_files_and_with_force_its_mirror() {
    let pair = Pair::start("delete");
    let (src, dst) = (pair.src.control.clone(), pair.dst.control.clone());
    pair.create_mirrored("m", 16 * MIB, LOG_BYTES_MIN);
    ctl_ok(&src, &["volume", "create", "solo", "--size", "16M"]);
    let ext = pair.root.join("ext.img");
    ctl_ok(&src, &["volume", "create", "ext", "--size", "16M", "--disk", ext.to_str().expect("utf-8 path")]);

    // A mirrored volume is refused without --force: exit 5, nothing touched.
    assert_eq!(ctl_fails(&src, &["volume", "delete", "m"], "--force"), 5);
    assert_eq!(volume_status(&pair.src_api(), "m").expect("status")["state"], "in-sync");

    // An unmirrored one goes with its log, change map and data-dir disks; its name is free.
    let solo_dir = pair.src.data_dir.join("volumes").join("solo");
    assert!(solo_dir.is_dir() && pair.src_nvlog("solo", 1).is_file());
    let out = ctl_ok(&src, &["volume", "delete", "solo"]);
    assert!(out.contains("deleted solo: primary"), "{out}");
    assert!(!solo_dir.exists(), "{} is left", solo_dir.display());
    assert!(!pair.src_nvlog("solo", 1).exists(), "the NVLog is left");
    assert!(NbdClient::connect(pair.src.nbd.as_str(), "solo").is_err(), "the export is still served");
    assert_eq!(ctl_fails(&src, &["volume", "delete", "solo"], "no volume or mirror solo"), 4);
    ctl_ok(&src, &["volume", "create", "solo", "--size", "16M"]);

    // A disk named at creation is left as it is, and said so.
    let out = ctl_ok(&src, &["volume", "delete", "ext"]);
    assert!(out.contains("left as they are") && out.contains("ext.img"), "{out}");
    assert!(ext.is_file(), "a disk named at creation was removed");

    // A mirror its source is connected to: refused on the mirror's node without --force.
    assert_eq!(ctl_fails(&dst, &["volume", "delete", "m"], "connected to its source"), 5);
    // Forced there, the source finds no mirror when it reconnects and rebuilds it whole.
    let out = ctl_ok(&dst, &["volume", "delete", "m", "--force"]);
    assert!(out.contains("deleted m: mirror of site-a"), "{out}");
    wait_for("the mirror rebuilt by a baseline", Duration::from_secs(60), || {
        let m = mirror_status(&pair.dst_api(), "m").ok();
        Ok(m.filter(|m| m["consistent"] == true && m["connected"] == true).map(|_| ()))
    });
    wait_state(&pair.src_api(), "m", "in-sync", Duration::from_secs(60));
    // --force on the primary deletes the mirror on the peer too.
    let out = ctl_ok(&src, &["volume", "delete", "m", "--force"]);
    assert!(out.contains("the mirror on site-b is deleted"), "{out}");
    let mirror_dir = pair.dst.data_dir.join("mirrors").join(&pair.src.name).join("m");
    assert!(!mirror_dir.exists(), "the mirror's files are left in {}", mirror_dir.display());
    assert!(!pair.dst_log("m", 0).exists(), "the mirror's log files are left");
    let s = ctl_json(&dst);
    assert!(s["mirrors"].as_array().is_some_and(Vec::is_empty), "the mirror is still listed: {s}");
    assert_eq!(ctl_fails(&dst, &["status", "m"], "no volume or mirror m"), 4);
}

#[test]
fn verify_finds_the_mirror_equal_and_then_the_region_that_was_damaged() {
    let seed = base_seed("verify_finds_the_mirror_equal_and_then_the_region_that_was_damaged");
    // A mirror on one file, so that a damaged block is not repaired from parity on read.
    let pair = Pair::start_with("verify", &[], &["--mirror-layout", "single"]);
    let src = pair.src.control.clone();
    pair.create_mirrored("v", 16 * MIB, LOG_BYTES_MIN);
    let mut w = Workload::new(0, 16 * MIB / 4096, seed);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), "v").expect("NBD connect");
    w.run(&mut c, 8, 3000, |_| {}).expect("writes");
    // Online: writes (and the CPs they start) go on all through it; none is a difference.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                w.run(&mut c, 8, 200, |_| {}).expect("writes during verify");
            }
            w
        })
    };
    for _ in 0..3 {
        let out = ctl_ok(&src, &["verify", "v", "--region", "256K"]);
        assert!(out.contains("64 regions of 256.0K compared") && out.contains("; 0 differ"), "{out}");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let w = writer.join().expect("the writer");
    assert_eq!(w.errors, 0);
    let out = ctl_ok(&src, &["verify", "v", "--region", "256K"]);
    assert!(out.contains("; 0 differ"), "{out}");

    // Damage one block of the mirror's file (5 MiB + 8 KiB in): that region alone differs.
    let file = pair.dst.data_dir.join("mirrors").join(&pair.src.name).join("v").join("data");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&file).expect("open the mirror's file");
        f.write_all_at(&[0x5a; 4096], 5 * MIB + 8192).expect("damage it");
    }
    let (code, stdout, stderr) = nvmirror_code(&["ctl", "--node", &src, "verify", "v", "--region", "256K", "--json"]);
    assert_eq!(code, Some(6), "verify of a damaged mirror: {stderr}");
    let r: Value = serde_json::from_str(&stdout).expect("the JSON report");
    assert_eq!(r["differing"], serde_json::json!([[5 * MIB, 256 * 1024]]), "{r}");
    assert!(stderr.contains("differ in 1 regions"), "{stderr}");

    // --repair writes the primary's contents of that region to the mirror, then compares
    // it again: the mirror's file holds the primary's block once more, and a plain verify
    // finds nothing.
    let (code, stdout, stderr) =
        nvmirror_code(&["ctl", "--node", &src, "verify", "v", "--region", "256K", "--repair", "--json"]);
    assert_eq!(code, Some(0), "verify --repair: {stderr}");
    let r: Value = serde_json::from_str(&stdout).expect("the JSON report");
    assert_eq!(r["repaired"], serde_json::json!([[5 * MIB, 256 * 1024]]), "{r}");
    assert_eq!(r["differing"], serde_json::json!([]), "{r}");
    let mut primary = vec![0u8; 4096];
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), "v").expect("NBD connect");
    c.read(5 * MIB + 8192, &mut primary).expect("read the primary's block");
    let mut mirror = vec![0u8; 4096];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&file).expect("open the mirror's file");
        f.read_exact_at(&mut mirror, 5 * MIB + 8192).expect("read the mirror's block");
    }
    assert!(primary == mirror, "the mirror's block was not repaired");
    let out = ctl_ok(&src, &["verify", "v", "--region", "256K"]);
    assert!(out.contains("; 0 differ"), "{out}");

    // Nothing to compare with, or nothing of that name.
    ctl_ok(&src, &["volume", "create", "alone", "--size", "16M"]);
    assert_eq!(ctl_fails(&src, &["verify", "alone"], "not mirrored"), 5);
    assert_eq!(ctl_fails(&src, &["verify", "nope"], "no volume nope"), 4);
}

#[test]
fn a_baseline_pauses_and_resumes() {
    let pair = Pair::start("pause");
    let (src, dst) = (pair.src.control.clone(), pair.dst.control.clone());
    ctl_ok(&src, &["volume", "create", "p", "--size", "16M"]);
    // Slow enough to be caught under way: 16 MiB at 2 MiB/s.
    ctl_ok(&src, &["mirror", "p", "--to", &dst, "--rate", "2M", "--no-wait"]);
    wait_state(&pair.src_api(), "p", "baseline", Duration::from_secs(30));
    ctl_ok(&src, &["pause-copy", "p"]);
    let before = volume_status(&pair.src_api(), "p").expect("status");
    assert_eq!(before["copy_paused"], true, "{before}");
    std::thread::sleep(Duration::from_millis(1500));
    let after = volume_status(&pair.src_api(), "p").expect("status");
    assert_eq!(after["state"], "baseline", "{after}");
    assert_eq!(after["baseline_done_bytes"], before["baseline_done_bytes"], "a paused baseline went on");
    assert!(ctl_ok(&src, &["status"]).contains("copy paused"), "status does not say the copy is paused");
    // Resumed, and faster: it finishes.
    ctl_ok(&src, &["resume-copy", "p"]);
    ctl_ok(&src, &["mirror", "p", "--to", &dst, "--rate", "1G", "--no-wait"]);
    wait_state(&pair.src_api(), "p", "in-sync", Duration::from_secs(60));
    assert_eq!(volume_status(&pair.src_api(), "p").expect("status")["copy_paused"], false);
    // Nothing to pause once in sync.
    assert_eq!(ctl_fails(&src, &["pause-copy", "p"], "no baseline or resync under way"), 5);
}

#[test]
fn unpair_lets_a_volume_go_on_alone_and_be_mirrored_elsewhere() {
    let seed = base_seed("unpair_lets_a_volume_go_on_alone_and_be_mirrored_elsewhere");
    let mut pair = Pair::start("unpair");
    let (src, dst) = (pair.src.control.clone(), pair.dst.control.clone());
    pair.create_mirrored("u", 16 * MIB, LOG_BYTES_MIN);
    let mut w = Workload::new(0, 16 * MIB / 4096, seed);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), "u").expect("NBD connect");
    w.run(&mut c, 8, 500, |_| {}).expect("writes");

    // With the peer up: its mirror goes, and the pair can be made again (a baseline).
    let out = ctl_ok(&src, &["unpair", "u"]);
    assert!(out.contains("no longer mirrored to site-b; the mirror on site-b is deleted"), "{out}");
    assert_eq!(volume_status(&pair.src_api(), "u").expect("status")["state"], "not-mirrored");
    assert_eq!(ctl_fails(&dst, &["status", "u"], "no volume or mirror u"), 4);
    assert_eq!(ctl_fails(&src, &["unpair", "u"], "not mirrored"), 5);
    w.run(&mut c, 8, 300, |_| {}).expect("writes alone");
    ctl_ok(&src, &["mirror", "u", "--to", &dst]);

    // With the peer gone for good: the volume goes on alone, and is mirrored to a new node.
    pair.dst.kill();
    let out = ctl_ok(&src, &["unpair", "u"]);
    assert!(out.contains("the mirror on site-b") && out.contains("is left"), "{out}");
    w.run(&mut c, 8, 500, |_| {}).expect("writes after the unpair");
    assert_eq!(w.errors, 0);
    drop(c);
    let third = nvmirror_control::cluster::NodeProc::start(&bin(), "site-c", &pair.root.join("site-c"), &[])
        .expect("start site-c");
    ctl_ok(&src, &["mirror", "u", "--to", &third.control]);
    pair.src.kill();
    ctl_ok(&third.control, &["failover", "u"]);
    assert_verified(&verify(&w, &third.nbd, "u").expect("verify on site-c"), "the new mirror, failed over");
}

#[test]
fn a_volume_grows_online_mirror_first_and_fails_over_at_its_new_size() {
    let seed = base_seed("a_volume_grows_online_mirror_first_and_fails_over_at_its_new_size");
    let mut pair = Pair::start("resize");
    let (src, dst) = (pair.src.control.clone(), pair.dst.control.clone());
    pair.create_mirrored("g", 16 * MIB, LOG_BYTES_MIN);
    let mut w = Workload::new(0, 16 * MIB / 4096, seed);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), "g").expect("NBD connect");
    w.run(&mut c, 8, 1000, |_| {}).expect("writes");
    // Online: a client writes all through the resize, and none of its writes fails.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                w.run(&mut c, 8, 100, |_| {}).expect("writes during the resize");
            }
            (w, c)
        })
    };
    let out = ctl_ok(&src, &["volume", "resize", "g", "--size", "48M"]);
    assert!(out.contains("grown from 16777216 to 50331648 bytes; mirror grown on site-b"), "{out}");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut w, c) = writer.join().expect("the writer");
    assert_eq!(w.errors, 0);
    assert_eq!(c.size, 16 * MIB, "a connection keeps the size it was told");
    drop(c);
    // Both sites say the new size; a new connection sees it and writes past the old end.
    let s = volume_status(&pair.src_api(), "g").expect("status");
    assert_eq!(s["size_bytes"], 48 * MIB, "{s}");
    assert_eq!(s["state"], "in-sync", "{s}");
    assert_eq!(mirror_status(&pair.dst_api(), "g").expect("mirror")["volume_bytes"], 48 * MIB);
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), "g").expect("NBD connect");
    assert_eq!(c.size, 48 * MIB);
    let mut fresh = vec![1u8; 4096];
    c.read(30 * MIB, &mut fresh).expect("read the new space");
    assert!(fresh.iter().all(|&b| b == 0), "the new space reads as zeroes");
    let tail: Vec<u8> = (0..64 * 1024).map(|i| u8::try_from(i % 253).expect("below 253")).collect();
    c.write(48 * MIB - tail.len() as u64, &tail).expect("write at the new end");
    c.flush().expect("flush");
    w.run(&mut c, 8, 300, |_| {}).expect("writes after the resize");
    let out = ctl_ok(&src, &["verify", "g", "--region", "1M"]);
    assert!(out.contains("48 regions of 1.0M compared") && out.contains("; 0 differ"), "{out}");
    drop(c);

    // What a resize refuses, and why.
    assert_eq!(ctl_fails(&src, &["volume", "resize", "g", "--size", "8M"], "does not shrink"), 5);
    assert_eq!(ctl_fails(&dst, &["volume", "resize", "g", "--size", "64M"], "is a mirror here"), 5);
    assert_eq!(ctl_fails(&src, &["volume", "resize", "g", "--size", "2T"], "can grow to"), 5);
    assert_eq!(ctl_fails(&src, &["volume", "resize", "nope", "--size", "2G"], "no volume nope"), 4);
    let out = ctl_ok(&src, &["volume", "resize", "g", "--size", "48M"]);
    assert!(out.contains("already 50331648 bytes"), "{out}");
    // An unmirrored volume grows alone, and keeps its size across a restart.
    ctl_ok(&src, &["volume", "create", "alone", "--size", "16M", "--max-size", "32M"]);
    let r: Value = serde_json::from_str(&ctl_ok(&src, &["volume", "resize", "alone", "--size", "32M", "--json"]))
        .expect("the JSON report");
    assert_eq!((r["old_bytes"].as_u64(), r["new_bytes"].as_u64()), (Some(16 * MIB), Some(32 * MIB)), "{r}");
    // (The room is whole checksum blocks: 1024 rows of each of the three data disks, 12M.)
    assert!(r["max_bytes"].as_u64().is_some_and(|m| (32 * MIB..44 * MIB).contains(&m)), "--max-size 32M: {r}");
    assert_eq!(ctl_fails(&src, &["volume", "resize", "alone", "--size", "64M"], "can grow to"), 5);
    // A crash after the storage grew and before the record said so: the record is older
    // than the storage, and the volume starts at its storage's size.
    pair.src.kill();
    let state_path = pair.src.data_dir.join("node.json");
    let mut state: Value = serde_json::from_slice(&std::fs::read(&state_path).expect("node.json")).expect("JSON");
    let alone = state["volumes"].as_array_mut().expect("volumes").iter_mut().find(|v| v["name"] == "alone");
    alone.expect("alone's record")["size"] = (16 * MIB).into();
    std::fs::write(&state_path, serde_json::to_vec(&state).expect("JSON")).expect("write node.json");
    pair.src.restart().expect("restart site-a");
    assert_eq!(volume_status(&pair.src_api(), "alone").expect("status")["size_bytes"], 32 * MIB);
    assert_eq!(NbdClient::connect(pair.src.nbd.as_str(), "alone").expect("NBD connect").size, 32 * MIB);
    assert!(log_text(&pair.src.log_path()).contains("a resize was cut short"));
    let state: Value = serde_json::from_slice(&std::fs::read(&state_path).expect("node.json")).expect("JSON");
    let alone = state["volumes"].as_array().expect("volumes").iter().find(|v| v["name"] == "alone").cloned();
    assert_eq!(alone.expect("alone's record")["size"], 32 * MIB, "the record is brought up to the storage");

    // The site burns down: the mirror takes over at the new size, every write on it.
    wait_state(&pair.src_api(), "g", "in-sync", Duration::from_secs(60));
    cp(&pair.src_api(), "g").expect("cp");
    pair.src.kill();
    ctl_ok(&dst, &["failover", "g"]);
    let mut c = NbdClient::connect(pair.dst.nbd.as_str(), "g").expect("NBD connect to the new primary");
    assert_eq!(c.size, 48 * MIB);
    let mut back = vec![0u8; tail.len()];
    c.read(48 * MIB - tail.len() as u64, &mut back).expect("read the new end");
    assert!(back == tail, "the write past the old end is not on the new primary");
    drop(c);
    let v = verify(&w, &pair.dst.nbd, "g").expect("verify");
    assert_verified(&v, "the grown volume failed over");
}

#[test]
fn a_baseline_stopped_by_sigterm_resumes_where_it_was_after_the_restart() {
    let seed = base_seed("a_baseline_stopped_by_sigterm_resumes_where_it_was_after_the_restart");
    let mut pair = Pair::start("resume");
    let (src, dst) = (pair.src.control.clone(), pair.dst.control.clone());
    let size = 32 * MIB;
    ctl_ok(&src, &["volume", "create", "r", "--size", "32M"]);
    // Data everywhere, so that every region of the copy is data on the wire.
    let mut c = NbdClient::connect(pair.src.nbd.as_str(), "r").expect("NBD connect");
    for m in 0..32u64 {
        let chunk: Vec<u8> = (0..MIB).map(|i| u8::try_from((i / 4096 + m * 7) % 251 + 1).expect("byte")).collect();
        c.write(m * MIB, &chunk).expect("fill");
    }
    // Slow enough to be stopped part-way: 32 MiB at 4 MiB/s; writes go on during it.
    ctl_ok(&src, &["mirror", "r", "--to", &dst, "--rate", "4M", "--no-wait"]);
    // (Policy strict: a write fails until the link is up, the baseline under way.)
    wait_state(&pair.src_api(), "r", "baseline", Duration::from_secs(30));
    let mut w = Workload::new(0, size / 4096, seed);
    w.run(&mut c, 8, 300, |_| {}).expect("writes during the baseline");
    wait_for("a third of the baseline", Duration::from_secs(60), || {
        let s = volume_status(&pair.src_api(), "r")?;
        Ok((s["state"] == "baseline" && s["baseline_done_bytes"].as_u64().unwrap_or(0) >= 10 * MIB).then_some(()))
    });
    w.run(&mut c, 8, 300, |_| {}).expect("more writes during the baseline");
    assert_eq!(w.errors, 0);
    drop(c);

    let status = pair.src.terminate(Duration::from_secs(60)).expect("the node exits on SIGTERM");
    assert!(status.success(), "exit status {status:?} after SIGTERM");
    let log = log_text(&pair.src.log_path());
    let line = log.lines().find(|l| l.contains("the copy to the mirror stops")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("it resumes from byte"), "{line}");
    let from: u64 = line
        .split("resumes from byte ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the byte");
    assert!(from >= 10 * MIB && from < size, "{line}");

    // Restarted: the copy goes on as a delta resync of what the mirror lacks, not a second
    // baseline of the whole volume.
    pair.src.restart().expect("restart after the clean stop");
    let s = wait_state(&pair.src_api(), "r", "in-sync", Duration::from_secs(60));
    assert_eq!(s["last_copy_kind"], "resync", "{s}");
    let sent = s["last_copy_bytes"].as_u64().expect("bytes");
    assert!(sent <= size - from && sent > 0, "the resumed copy sent {sent} bytes, from byte {from}: {s}");
    let out = ctl_ok(&src, &["verify", "r", "--region", "1M"]);
    assert!(out.contains("32 regions of 1.0M compared") && out.contains("; 0 differ"), "{out}");
    // The mirror holds every acknowledged write: the site burns down, it takes over, and
    // its blocks are the primary's, fill and writes alike.
    cp(&pair.src_api(), "r").expect("cp");
    let primary = read_volume(&pair.src.nbd, "r").expect("read the primary");
    pair.src.kill();
    ctl_ok(&dst, &["failover", "r"]);
    let mirror = read_volume(&pair.dst.nbd, "r").expect("read the new primary");
    assert!(first_difference(&primary, &mirror).is_none(), "differ at {:?}", first_difference(&primary, &mirror));
    assert!(w.writes >= 600, "{} writes", w.writes);
}

#[test]
fn the_node_copy_rate_comes_from_the_config_and_sighup_rereads_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "copy-rate = \"2M\"\n").expect("write the config");
    let mut pair = Pair::start_with("copyrate", &["--config", config.to_str().expect("utf-8 path")], &[]);
    let (src, dst) = (pair.src.control.clone(), pair.dst.control.clone());
    for v in ["own", "node"] {
        ctl_ok(&src, &["volume", "create", v, "--size", "16M"]);
    }
    let rate = |v: &str| volume_status(&pair.src_api(), v).expect("status")["copy_rate"].as_u64();
    assert_eq!((rate("own"), rate("node")), (Some(2 * MIB), Some(2 * MIB)), "the config's copy-rate");
    ctl_ok(&src, &["mirror", "own", "--to", &dst, "--rate", "1M", "--no-wait"]);
    assert_eq!(rate("own"), Some(MIB), "a volume's own rate wins");
    // SIGHUP: the file's rate again, for the volumes without their own.
    std::fs::write(&config, "copy-rate = \"8M\"\n").expect("rewrite the config");
    let pid = pair.src.pid().expect("the source's pid");
    // SAFETY: kill(2) on a child process of this test, running.
    unsafe { libc::kill(i32::try_from(pid).expect("pid"), libc::SIGHUP) };
    wait_for("the copy rate reread", Duration::from_secs(10), || Ok((rate("node") == Some(8 * MIB)).then_some(())));
    assert_eq!(rate("own"), Some(MIB));
    assert!(log_text(&pair.src.log_path()).contains("SIGHUP: copy rate 8388608 bytes/s"));
    // A value that does not parse leaves the rate as it is, and says why.
    std::fs::write(&config, "copy-rate = \"fast\"\n").expect("rewrite the config");
    // SAFETY: as above.
    unsafe { libc::kill(i32::try_from(pid).expect("pid"), libc::SIGHUP) };
    wait_for("the bad rate reported", Duration::from_secs(10), || {
        Ok(log_text(&pair.src.log_path()).contains("copy-rate \"fast\"").then_some(()))
    });
    assert_eq!(rate("node"), Some(8 * MIB));
    // A restart takes the file's rate (the volume's own lasts until the node stops).
    std::fs::write(&config, "copy-rate = \"4M\"\n").expect("rewrite the config");
    pair.src.restart().expect("restart");
    assert_eq!(volume_status(&pair.src_api(), "node").expect("status")["copy_rate"].as_u64(), Some(4 * MIB));
}
