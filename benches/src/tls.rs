//! `nbd-tls`: what TLS costs on the NBD path and on replication, with one client for all
//! (fio's `nbd` engine, libnbd, `nbds://` URIs for the TLS arms), 4 KiB random writes.
//!
//! Arms, each a 256 MiB volume or file on this machine's filesystem, on loopback:
//!
//! - `nbdkit` and `nbdkit-tls`: nbdkit's `file` plugin, plain and with `--tls=require`
//!   (GnuTLS), for scale;
//! - `plain`: an unmirrored nvmirror volume on one disk file, on a node without TLS;
//! - `plain-tls`: the same on a node with `--tls-cert`, so NBD over TLS;
//! - `mirrored`: a volume mirrored (strict, TCP) to a second node, neither with TLS;
//! - `mirrored-tls`: the same on a pair with `--tls-cert`: NBD and replication over TLS.
//!
//! fio runs as `nobody` where the harness runs as root (see [`fio_client`]), for every arm.
//! NBD's TLS cost is `plain-tls` against `plain`; replication's is what `mirrored-tls` loses
//! against `mirrored` beyond that. Certificates are made at run time (rcgen, ECDSA P-256);
//! no client certificate is asked for. Method as `nbd-peers`: rounds, arms interleaved,
//! fio's own IOPS and exact latency bins, server CPU from `/proc/PID/stat`.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use nvmirror_control::api::Client;
use nvmirror_control::cluster::NodeProc;
use serde_json::json;

use crate::measure::ArmResult;
use crate::peers::{create_on_file, fio_randwrite_by, rounds, start_nbdkit, tool, Figures, Params, Target};
use crate::report::ScenarioResult;

const DEPTHS: [usize; 2] = [32, 1];
const ARMS: [&str; 6] = ["nbdkit", "nbdkit-tls", "plain", "plain-tls", "mirrored", "mirrored-tls"];

/// libnbd takes the CA a TLS client trusts from a directory of its own (a URI may not name
/// one when fio opens it): `/etc/pki/libnbd` for root, `$HOME/.pki/libnbd` for others. So
/// fio runs, for every arm alike, as `nobody` (where this runs as root) with a home whose
/// `.pki/libnbd/ca-cert.pem` is the run's CA.
fn fio_client(home: &Path) -> Command {
    // SAFETY: geteuid takes no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "fio"]);
        c
    } else {
        Command::new("fio")
    };
    cmd.env("HOME", home);
    cmd
}

/// A home for [`fio_client`], readable by anyone, trusting `ca`.
fn client_home(ca: &Path) -> Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::Builder::new().prefix("nvmirror-bench-tls-home-").tempdir()?;
    let pki = home.path().join(".pki").join("libnbd");
    fs::create_dir_all(&pki)?;
    fs::copy(ca, pki.join("ca-cert.pem"))?;
    for d in [home.path().to_path_buf(), home.path().join(".pki"), pki.clone()] {
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
    }
    fs::set_permissions(pki.join("ca-cert.pem"), fs::Permissions::from_mode(0o644))?;
    Ok(home)
}

/// A CA and the one certificate it signed for 127.0.0.1, written as both nvmirror
/// (`--tls-cert`) and the GnuTLS tools (a directory: `ca-cert.pem`, `server-cert.pem`,
/// `server-key.pem`) read them. Returns the directory.
pub(crate) fn certificates(dir: &Path) -> Result<std::path::PathBuf> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "nvmirror bench CA");
    let ca = ca.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?
        .signed_by(&key, &ca, &ca_key)?;
    let pki = dir.join("pki");
    fs::create_dir_all(&pki)?;
    fs::write(pki.join("ca-cert.pem"), ca.pem())?;
    fs::write(pki.join("server-cert.pem"), cert.pem())?;
    fs::write(pki.join("server-key.pem"), key.serialize_pem())?;
    Ok(pki)
}

pub fn run(bin: &Path, quick: bool) -> Result<Vec<ScenarioResult>> {
    tool("fio", "--version", "fio")?;
    tool("nbdkit", "--version", "nbdkit")?;
    let p = if quick {
        Params { secs: 0.3, rounds: 1, warmup_rounds: 0, ping_pongs: 0 }
    } else {
        Params { secs: 4.0, rounds: 5, warmup_rounds: 1, ping_pongs: 0 }
    };
    let dir = tempfile::Builder::new().prefix("nvmirror-bench-tls-").tempdir()?;
    let pki = certificates(dir.path())?;
    let (cert, key, ca) = (pki.join("server-cert.pem"), pki.join("server-key.pem"), pki.join("ca-cert.pem"));
    let tls_args: Vec<String> = [("--tls-cert", &cert), ("--tls-key", &key), ("--tls-ca", &ca)]
        .iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
        .collect();
    let tls_args: Vec<&str> = tls_args.iter().map(String::as_str).collect();

    let (_kit, kit) = start_nbdkit(dir.path(), "nbdkit", None)?;
    let (_kit_tls, kit_tls) = start_nbdkit(dir.path(), "nbdkit-tls", Some(&pki))?;
    let a = NodeProc::start(bin, "tls-a", &dir.path().join("a"), &[]).context("start node A")?;
    let b =
        NodeProc::start(bin, "tls-b", &dir.path().join("b"), &["--mirror-layout", "single"]).context("start node B")?;
    let c = NodeProc::start(bin, "tls-c", &dir.path().join("c"), &tls_args).context("start node C (TLS)")?;
    let mut d_args = tls_args.clone();
    d_args.extend(["--mirror-layout", "single"]);
    let d = NodeProc::start(bin, "tls-d", &dir.path().join("d"), &d_args).context("start node D (TLS)")?;
    let api_a = Client::new(&a.control);
    create_on_file(&api_a, "plain", &dir.path().join("plain.img"))?;
    create_on_file(&api_a, "mirrored", &dir.path().join("mirrored.img"))?;
    crate::cluster::mirror_in_sync(&api_a, "mirrored", &b.control, Duration::from_secs(300), |_| {})?;
    // The API client of this process speaks plain http (its https is for the whole
    // process): the TLS pair is set up with `ctl` over https.
    let ctl = |args: &[&str]| -> Result<()> {
        let out = Command::new(bin)
            .args(["ctl", "--node", &c.control, "--tls-ca"])
            .arg(&ca)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run nvmirror ctl")?;
        anyhow::ensure!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(())
    };
    let size = crate::peers::VOLUME_BYTES.to_string();
    for (name, file) in [("plain", "plain-tls.img"), ("mirrored", "mirrored-tls.img")] {
        let disk = dir.path().join(file).display().to_string();
        ctl(&["volume", "create", name, "--size", &size, "--disk", &disk])?;
    }
    ctl(&["mirror", "mirrored", "--to", &d.control, "--timeout", "300"])?;
    let pid = |n: &NodeProc| n.pid().with_context(|| format!("node {} is not running", n.name));
    let home = client_home(&ca)?;
    let targets = [
        kit,
        kit_tls,
        Target { uri: format!("nbd://{}/plain", a.nbd), pids: vec![pid(&a)?] },
        Target { uri: format!("nbds://{}/plain", c.nbd), pids: vec![pid(&c)?] },
        Target { uri: format!("nbd://{}/mirrored", a.nbd), pids: vec![pid(&a)?, pid(&b)?] },
        Target { uri: format!("nbds://{}/mirrored", c.nbd), pids: vec![pid(&c)?, pid(&d)?] },
    ];
    let figures = rounds(
        "nbd-tls",
        &ARMS,
        &DEPTHS,
        &targets,
        &p,
        |t, depth| {
            let engine = ["--ioengine=nbd".to_string(), format!("--uri={}", t.uri)];
            fio_randwrite_by(fio_client(home.path()), &engine, &t.uri, depth, p.secs)
        },
        |_| Ok(()),
    )?;
    drop((a, b, c, d));

    let at = |depth: usize, arm: &str| -> &Figures {
        let di = DEPTHS.iter().position(|&x| x == depth).expect("a measured depth");
        &figures[di][ARMS.iter().position(|&x| x == arm).expect("an arm")]
    };
    let ratio = |depth: usize, num: &str, den: &str, f: fn(&Figures) -> f64| {
        f(at(depth, num)) / f(at(depth, den)).max(f64::MIN_POSITIVE)
    };
    let iops = Figures::iops;
    let p50 = |f: &Figures| f.us_at(0.5);
    let params = json!({
        "volume_bytes": crate::peers::VOLUME_BYTES,
        "secs_per_run": p.secs,
        "rounds": p.rounds,
        "warmup_rounds": p.warmup_rounds,
        "client": "fio --ioengine=nbd --rw=randwrite --bs=4k --time_based (nbds:// URIs for the TLS arms)",
        "certificates": "ECDSA P-256 (rcgen); TLS 1.3; no client certificate",
    });
    let cpu_counted =
        "the server processes of each arm (/proc/PID/stat): nbdkit; nbdkit; node A; node C; nodes A and B; \
                       nodes C and D (fio's own CPU, TLS included, is not counted)"
            .to_string();
    let arms_at = |depth: usize| -> Vec<ArmResult> { ARMS.iter().map(|n| at(depth, n).result(n, depth)).collect() };
    let summary = |depth: usize| {
        ARMS.iter()
            .map(|n| {
                let f = at(depth, n);
                format!(
                    "{n} {:.0} IOPS, p50 {:.1} us, p99 {:.1} us, CPU {:.1} us/write",
                    f.iops(),
                    p50(f),
                    f.us_at(0.99),
                    f.cpu_us_per_op()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let costs = format!(
        "TLS / plain: NBD QD32 IOPS {:.3}, QD1 p50 {:.3}; NBD and replication QD32 IOPS {:.3}, QD1 p50 {:.3}; \
         nbdkit QD32 IOPS {:.3}, QD1 p50 {:.3}",
        ratio(32, "plain-tls", "plain", iops),
        ratio(1, "plain-tls", "plain", p50),
        ratio(32, "mirrored-tls", "mirrored", iops),
        ratio(1, "mirrored-tls", "mirrored", p50),
        ratio(32, "nbdkit-tls", "nbdkit", iops),
        ratio(1, "nbdkit-tls", "nbdkit", p50),
    );
    let result = |name: &str, description: &str, depth: usize| ScenarioResult {
        name: name.into(),
        description: description.into(),
        params: params.clone(),
        cpu_counted: cpu_counted.clone(),
        arms: arms_at(depth),
        check: None,
        notes: vec![costs.clone(), summary(depth)],
    };
    Ok(vec![
        result(
            "nbd-tls-qd32",
            "4 KiB random writes at QD32 with and without TLS: NBD alone, and NBD with replication",
            32,
        ),
        result("nbd-tls-qd1", "the same at QD1", 1),
    ])
}
