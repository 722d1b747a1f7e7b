//! Shared pieces of the end-to-end tests: real `nvmirror node` processes on loopback, the
//! control API, NBD reads of whole volumes, bounded waits, seeds that are printed so that a
//! failing round can be replayed.
//!
//! Every wait here is bounded in time and every loop in count; a test that hits a bound
//! fails with the last state it saw and the tails of the nodes' logs.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use nvmirror_control::api::{Client, CreateVolume, MirrorRequest};
use nvmirror_control::cluster::NodeProc;
use nvmirror_control::workload::{Verified, Workload, BLOCK};
use nvmirror_dataplane::frontend::nbd_client::NbdClient;
use nvmirror_dataplane::usize_of;
use serde_json::{json, Value};

pub const MIB: u64 = 1 << 20;
/// The smallest NVLog partition a volume may have: CPs come often through partition fill.
pub const LOG_BYTES_MIN: u64 = 4 << 20;
/// Bytes one 4 KiB write takes in an NVLog partition or a log file (64-byte header + data).
pub const ENTRY_BYTES_4K: u64 = 64 + 4096;
/// 4 KiB entries that fit in one minimum partition (after its 64-byte header).
pub const ENTRIES_PER_MIN_PARTITION: u64 = (LOG_BYTES_MIN - 64) / ENTRY_BYTES_4K;

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nvmirror"))
}

/// A small deterministic generator (xorshift64*), so that every choice a test makes can be
/// replayed from its printed seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The run's base seed: `NVMIRROR_E2E_SEED` when set (to replay a failure), else the clock.
/// Printed either way.
pub fn base_seed(test: &str) -> u64 {
    let seed = match std::env::var("NVMIRROR_E2E_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("NVMIRROR_E2E_SEED={s:?} is not a number"))
        }
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs().wrapping_mul(1_000_000_007) ^ u64::from(d.subsec_nanos()))
            .unwrap_or(1),
    };
    println!("{test}: seed {seed:#x} (replay with NVMIRROR_E2E_SEED={seed:#x})");
    seed
}

/// Polls `probe` every 20 ms until it yields a value or `timeout` passes; then panics with
/// `what` and the last error or state the probe reported.
pub fn wait_for<T>(what: &str, timeout: Duration, probe: impl FnMut() -> Result<Option<T>>) -> T {
    try_wait_for(what, timeout, probe).unwrap_or_else(|e| panic!("{e}"))
}

/// [`wait_for`] that returns the timeout as an error, for checks that are collected and
/// reported together at the end of a test.
pub fn try_wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T, String> {
    let start = Instant::now();
    let mut last = String::from("never probed");
    let max_polls = timeout.as_millis() / 20 + 2;
    for _ in 0..max_polls {
        match probe() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => last = "condition not met".into(),
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() > timeout {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("timed out after {:?} waiting for {what}: {last}", start.elapsed()))
}

/// Sends SIGKILL to `pid` at once (from inside a write loop, between two acknowledgements).
pub fn sigkill(pid: u32) {
    let pid = i32::try_from(pid).expect("pid fits an i32");
    // SAFETY: kill(2) on a child process this test spawned; no memory is shared with it.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9 {pid}: {}", std::io::Error::last_os_error());
}

/// The replication transport of the pairs: `tcp`, or `NVMIRROR_E2E_TRANSPORT` (hw-tests runs
/// these tests with `rdma` in the soft-RoCE guest, from a `--features rdma` build).
pub fn transport() -> String {
    std::env::var("NVMIRROR_E2E_TRANSPORT").unwrap_or_else(|_| "tcp".into())
}

/// The address nodes replicate on: loopback, or `NVMIRROR_E2E_HOST` (for RDMA, the address
/// of the RDMA interface).
pub fn replication_host() -> String {
    std::env::var("NVMIRROR_E2E_HOST").unwrap_or_else(|_| "127.0.0.1".into())
}

/// Two nodes (`site-a` is the source, `site-b` the destination) in a temporary directory.
/// When a test panics, the tails of both node logs are printed (and the directory is kept
/// with `NVMIRROR_E2E_KEEP=1`).
pub struct Pair {
    dir: Option<tempfile::TempDir>,
    pub root: PathBuf,
    pub src: NodeProc,
    pub dst: NodeProc,
}

impl Pair {
    pub fn start(tag: &str) -> Pair {
        Self::start_with(tag, &[], &[])
    }

    /// As [`Pair::start`], with extra node arguments for each site.
    pub fn start_with(tag: &str, src_args: &[&str], dst_args: &[&str]) -> Pair {
        let dir = tempfile::Builder::new().prefix(&format!("nvmirror-e2e-{tag}-")).tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let host = replication_host();
        let src = NodeProc::start_on(&bin(), "site-a", &root.join("site-a"), &host, src_args).expect("start site-a");
        let dst = NodeProc::start_on(&bin(), "site-b", &root.join("site-b"), &host, dst_args).expect("start site-b");
        Pair { dir: Some(dir), root, src, dst }
    }

    /// As [`Pair::start`], both nodes keeping their NVRAM in `mode` (`direct`, `file-sync`)
    /// under their data dirs.
    pub fn start_nvram(tag: &str, mode: &str) -> Pair {
        let dir = tempfile::Builder::new().prefix(&format!("nvmirror-e2e-{tag}-")).tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let host = replication_host();
        let node = |name: &str| {
            let data = root.join(name);
            let nvram = format!("{mode}:{}", data.join("nvram").display());
            NodeProc::start_on(&bin(), name, &data, &host, &["--nvram", &nvram])
                .unwrap_or_else(|e| panic!("start {name}: {e:#}"))
        };
        let (src, dst) = (node("site-a"), node("site-b"));
        Pair { dir: Some(dir), root, src, dst }
    }

    pub fn src_api(&self) -> Client {
        Client::new(&self.src.control)
    }

    pub fn dst_api(&self) -> Client {
        Client::new(&self.dst.control)
    }

    /// Creates `vol` on the source and mirrors it to the destination; returns once in sync.
    pub fn create_mirrored(&self, vol: &str, size: u64, log_bytes: u64) {
        create_volume(&self.src_api(), vol, size, Some(log_bytes)).expect("create volume");
        mirror(&self.src_api(), vol, &self.dst.control).expect("mirror volume");
        wait_state(&self.src_api(), vol, "in-sync", Duration::from_secs(60));
        wait_for("the mirror to be consistent on the destination", Duration::from_secs(30), || {
            Ok(mirror_status(&self.dst_api(), vol)?["consistent"].as_bool().filter(|c| *c))
        });
    }

    /// The NVRAM file of `vol`'s NVLog on the source at `epoch`.
    pub fn src_nvlog(&self, vol: &str, epoch: u64) -> PathBuf {
        self.src.data_dir.join("nvram").join(format!("{vol}.{epoch}.nvlog"))
    }

    /// The destination's log file for partition `p` of `vol`.
    pub fn dst_log(&self, vol: &str, p: u8) -> PathBuf {
        self.dst.data_dir.join("nvram").join("mirrors").join(&self.src.name).join(vol).join(format!("log.{p}"))
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in [&self.src, &self.dst] {
                dump_log(n);
            }
            // The data dirs are large; keep them only when asked to.
            if std::env::var_os("NVMIRROR_E2E_KEEP").is_some() {
                if let Some(d) = self.dir.take() {
                    eprintln!("node data kept under {}", d.keep().display());
                }
            } else {
                eprintln!("set NVMIRROR_E2E_KEEP=1 to keep the nodes' data dirs of a failing test");
            }
        }
    }
}

/// Prints the last lines of a node's log (stderr of every run of it).
pub fn dump_log(n: &NodeProc) {
    let text = fs::read_to_string(n.log_path()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(40);
    eprintln!("---- last lines of {} ({}) ----", n.name, n.log_path().display());
    for l in &lines[from..] {
        eprintln!("  {l}");
    }
}

pub fn create_volume(api: &Client, vol: &str, size: u64, log_bytes: Option<u64>) -> Result<Value> {
    api.post("/v1/volumes", &CreateVolume { name: vol.into(), size, log_bytes, ..CreateVolume::default() })
}

pub fn mirror(api: &Client, vol: &str, to: &str) -> Result<Value> {
    api.post(
        &format!("/v1/volumes/{vol}/mirror"),
        &MirrorRequest {
            to: to.into(),
            transport: transport(),
            policy: "strict".into(),
            resync_ranges: Vec::new(),
            rate: None,
        },
    )
}

/// Forces a CP; returns its number once durable on both sites.
pub fn cp(api: &Client, vol: &str) -> Result<u64> {
    let v: Value = api.post(&format!("/v1/volumes/{vol}/cp"), &json!({}))?;
    v["cp"].as_u64().ok_or_else(|| anyhow!("CP answer without a number: {v}"))
}

pub fn failover(api: &Client, vol: &str) -> Result<Value> {
    api.post(&format!("/v1/volumes/{vol}/failover"), &json!({}))
}

pub fn status(api: &Client) -> Result<Value> {
    api.get("/v1/status")
}

/// The status of primary volume `vol` on a node.
pub fn volume_status(api: &Client, vol: &str) -> Result<Value> {
    let s = status(api)?;
    s["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["volume"] == vol))
        .cloned()
        .ok_or_else(|| anyhow!("no primary volume {vol} in status {s}"))
}

/// The status of the mirror of `vol` on a node.
pub fn mirror_status(api: &Client, vol: &str) -> Result<Value> {
    let s = status(api)?;
    s["mirrors"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["volume"] == vol))
        .cloned()
        .ok_or_else(|| anyhow!("no mirror of {vol} in status {s}"))
}

/// Waits until primary volume `vol` reports `state`; panics with its last status otherwise.
pub fn wait_state(api: &Client, vol: &str, state: &str, timeout: Duration) -> Value {
    try_wait_state(api, vol, state, timeout).unwrap_or_else(|e| panic!("{e}"))
}

pub fn try_wait_state(api: &Client, vol: &str, state: &str, timeout: Duration) -> Result<Value, String> {
    try_wait_for(&format!("volume {vol} to be {state}"), timeout, || {
        let v = volume_status(api, vol)?;
        if v["state"] == state {
            Ok(Some(v))
        } else {
            bail!("state {} ({})", v["state"], v["reason"])
        }
    })
}

/// The TLS this test binary's NBD connections start (nodes with `--tls-cert` require it);
/// plain text until set.
static NBD_TLS: std::sync::Mutex<Option<nvmirror_dataplane::frontend::nbd_client::ClientTls>> =
    std::sync::Mutex::new(None);

/// Makes every NBD connection of the helpers here start TLS with `tls`.
#[allow(dead_code)]
pub fn use_nbd_tls(tls: nvmirror_dataplane::frontend::nbd_client::ClientTls) {
    *NBD_TLS.lock().expect("NBD TLS lock") = Some(tls);
}

/// An NBD connection to export `vol` at `nbd`, over TLS where [`use_nbd_tls`] said so.
pub fn nbd_connect(nbd: &str, vol: &str) -> std::io::Result<NbdClient> {
    let tls = NBD_TLS.lock().expect("NBD TLS lock").clone();
    NbdClient::connect_with(nbd, vol, tls.as_ref())
}

/// Reads `len` bytes from `offset` of an export, in 1 MiB requests.
pub fn read_range(nbd: &str, vol: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut c = nbd_connect(nbd, vol).with_context(|| format!("NBD connect to {vol} at {nbd}"))?;
    let mut out = vec![0u8; usize::try_from(len)?];
    for (i, chunk) in out.chunks_mut(usize_of(MIB)).enumerate() {
        c.read(offset + i as u64 * MIB, chunk).with_context(|| format!("NBD read at {}", offset + i as u64 * MIB))?;
    }
    let _ = c.disconnect();
    Ok(out)
}

/// Reads a whole export.
pub fn read_volume(nbd: &str, vol: &str) -> Result<Vec<u8>> {
    let size = nbd_connect(nbd, vol).with_context(|| format!("NBD connect to {vol} at {nbd}"))?.size;
    read_range(nbd, vol, 0, size)
}

/// Checks `w`'s record against export `vol` at `nbd` (read in bulk, checked block by block).
pub fn verify(w: &Workload, nbd: &str, vol: &str) -> Result<Verified> {
    let image = read_range(nbd, vol, w.base, w.blocks * BLOCK as u64)?;
    w.verify(|off, buf| {
        let at = usize::try_from(off - w.base).expect("offset");
        buf.copy_from_slice(&image[at..at + buf.len()]);
        Ok(())
    })
}

/// Panics with the first lost blocks when a verification found any.
pub fn assert_verified(v: &Verified, what: &str) {
    if !v.bad.is_empty() {
        for line in v.bad.iter().take(20) {
            eprintln!("  LOST: {line}");
        }
        panic!("{what}: {} blocks do not hold their acknowledged data (first: {})", v.bad.len(), v.bad[0]);
    }
}

/// Offset of the first differing byte of two images, if any.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.chunks(4096).zip(b.chunks(4096)).position(|(x, y)| x != y).map(|blk| {
        let x = &a[blk * 4096..];
        let y = &b[blk * 4096..];
        blk * 4096 + x.iter().zip(y).position(|(p, q)| p != q).unwrap_or(0)
    })
}

pub fn log_text(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Runs the binary with `args`, bounded by `timeout`; returns its output.
pub fn run_bin(args: &[&str], timeout: Duration) -> Output {
    try_run_bin(args, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// How long one `nvmirror` command of a test may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `nvmirror ARGS...` and prints the command, its exit status and its output;
/// returns (success, stdout, stderr).
pub fn nvmirror(args: &[&str]) -> (bool, String, String) {
    let (code, stdout, stderr) = nvmirror_code(args);
    (code == Some(0), stdout, stderr)
}

/// As [`nvmirror`], with the exit code (None: killed by a signal).
pub fn nvmirror_code(args: &[&str]) -> (Option<i32>, String, String) {
    let out = run_bin(args, COMMAND_TIMEOUT);
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    println!(
        "$ nvmirror {}\n  exit {:?}\n  stdout: {}\n  stderr: {}",
        args.join(" "),
        out.status.code(),
        stdout.trim(),
        stderr.trim()
    );
    (out.status.code(), stdout, stderr)
}

/// Runs `nvmirror ctl --node NODE ARGS...`, as [`nvmirror`].
pub fn ctl(node: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["ctl", "--node", node];
    all.extend_from_slice(args);
    nvmirror(&all)
}

/// `nvmirror ctl --node NODE ARGS...` succeeds; its stdout.
pub fn ctl_ok(node: &str, args: &[&str]) -> String {
    let (ok, stdout, stderr) = ctl(node, args);
    assert!(ok, "nvmirror ctl {} failed: {stderr}", args.join(" "));
    stdout
}

/// `nvmirror ARGS...` fails with nothing on stdout and one line on stderr, `nvmirror:
/// REASON`, where the reason contains `want`. Returns the exit code.
pub fn fails_with(args: &[&str], want: &str) -> i32 {
    let (code, stdout, stderr) = nvmirror_code(args);
    assert!(code != Some(0), "nvmirror {} succeeded: {stdout}", args.join(" "));
    assert!(stdout.trim().is_empty(), "a failing command printed on stdout: {stdout}");
    let lines: Vec<&str> = stderr.trim().lines().collect();
    assert_eq!(lines.len(), 1, "the reason is not one line: {stderr:?}");
    assert!(lines[0].starts_with("nvmirror: "), "reason: {}", lines[0]);
    assert!(lines[0].contains(want), "the reason {:?} does not mention {want:?}", lines[0]);
    code.expect("exited, not killed")
}

/// `nvmirror ctl --node NODE ARGS...` fails, as [`fails_with`]; returns the exit code.
pub fn ctl_fails(node: &str, args: &[&str], want: &str) -> i32 {
    let mut all = vec!["ctl", "--node", node];
    all.extend_from_slice(args);
    fails_with(&all, want)
}

/// The arguments of `nvmirror node` on `data_dir`, every address an ephemeral loopback
/// port, then `extra`: for the tests of nodes that must refuse to start.
pub fn node_args<'a>(data_dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "node",
        "--data-dir",
        data_dir,
        "--listen",
        "127.0.0.1:0",
        "--control",
        "127.0.0.1:0",
        "--nbd",
        "127.0.0.1:0",
    ];
    a.extend_from_slice(extra);
    a
}

/// Writes a secret file (mode 600) and returns its path.
pub fn secret_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    fs::write(&p, format!("{secret}\n")).expect("write secret file");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).expect("chmod secret file");
    p
}

/// [`run_bin`] that returns a run past `timeout` (killed) as an error.
pub fn try_run_bin(args: &[&str], timeout: Duration) -> Result<Output, String> {
    let child = Command::new(bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn nvmirror");
    wait_output(child, timeout, &format!("nvmirror {}", args.join(" ")))
}

/// Waits for a child's exit within `timeout` (killing it past that) and collects its output.
pub fn wait_output(mut child: std::process::Child, timeout: Duration, what: &str) -> Result<Output, String> {
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what} did not finish within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output { status, stdout: out_reader.join().expect("stdout"), stderr: err_reader.join().expect("stderr") })
}

/// Sends raw bytes on a new TCP connection and reads whatever comes back until the peer
/// closes or `timeout` passes. Returns (bytes read, how the read ended).
pub fn raw_exchange(addr: &str, send: &[u8], shutdown_write: bool, timeout: Duration) -> (Vec<u8>, ReadEnd) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(timeout)).expect("timeout");
    // The peer may close before taking everything; that is one of the accepted outcomes.
    let _ = s.write_all(send);
    if shutdown_write {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    read_until_close(&mut s)
}

/// How a raw connection's reading ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadEnd {
    /// The peer closed the connection (EOF).
    Closed,
    /// The peer reset the connection (it closed with our bytes unread).
    Reset,
    /// Nothing more came within the timeout: the peer kept the connection open.
    TimedOut,
    Other(String),
}

pub fn read_until_close(s: &mut TcpStream) -> (Vec<u8>, ReadEnd) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Bounded: at most 1 MiB is read back.
    for _ in 0..256 {
        match s.read(&mut buf) {
            Ok(0) => return (got, ReadEnd::Closed),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, ReadEnd::Reset),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return (got, ReadEnd::TimedOut)
            }
            Err(e) => return (got, ReadEnd::Other(e.to_string())),
        }
    }
    (got, ReadEnd::Other("more than 1 MiB came back".into()))
}

/// A checked writer on its own NBD connection, running until stopped (bounded: 600 rounds
/// of 50 writes at most) or until a write fails.
pub struct BackgroundWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub acks: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: std::thread::JoinHandle<Workload>,
    /// Acknowledged writes once the writer was under way.
    pub acks_at_start: u64,
}

impl BackgroundWriter {
    pub fn start(nbd: &str, volume: &str, seed: u64) -> BackgroundWriter {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicU64::new(0));
        let (stop2, acks2, nbd, volume) = (stop.clone(), acks.clone(), nbd.to_string(), volume.to_string());
        let thread = std::thread::spawn(move || {
            let mut w = Workload::new(0, 2048, seed);
            let mut c = nbd_connect(nbd.as_str(), &volume).expect("NBD connect");
            for _ in 0..600 {
                w.run(&mut c, 4, 50, |a| acks2.store(a, Ordering::SeqCst)).expect("writes");
                if stop2.load(Ordering::SeqCst) || w.errors > 0 {
                    break;
                }
            }
            w
        });
        let acks_at_start = wait_for("the writer to start", Duration::from_secs(30), || {
            let a = acks.load(Ordering::SeqCst);
            Ok((a > 50).then_some(a))
        });
        BackgroundWriter { stop, acks, thread, acks_at_start }
    }

    pub fn acks(&self) -> u64 {
        self.acks.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops the writer and returns its record.
    pub fn finish(self) -> Workload {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().expect("writer")
    }
}
