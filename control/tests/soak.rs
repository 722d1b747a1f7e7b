//! The soak: real `nvmirror node` processes, a checked writer on NBD, and faults at random
//! for a bounded time. Each round the writer runs against the primary (a fresh queue depth
//! 1 to 8) and, at a random moment, one of:
//!
//! - **kill-source**: SIGKILL the primary, fail over on the mirror, verify every
//!   acknowledged write on the promoted volume, write there, then either pair it with a
//!   fresh node (a new data dir) or fail back: restart the old primary on its data dir,
//!   which must find itself fenced and refuse a write, and make it the new primary's
//!   mirror again by `resync` (a delta copy of what either side changed); go on writing;
//! - **kill-destination**: SIGKILL the mirror, let writes fail for a while (policy strict),
//!   restart it on the same data dir; the source must resume;
//! - **cut-link**: the replication link runs through a TCP proxy this test owns, which
//!   either resets every connection and refuses new ones, or stalls them (holds the bytes,
//!   sometimes past the transport's 10 s I/O timeout), for a while, then lets them through.
//!
//! Every node has such a proxy in front of its replication port and tells its peers to
//! connect there (`nvmirror node --advertise`), so that whichever node is the mirror, after
//! any number of failovers and failbacks, the link into it runs through its proxy.
//!
//! After the destination's return or the link's, writes must be acknowledged again within
//! a generous bound, and a forced CP must leave the mirror equal to the primary byte for
//! byte, both holding every acknowledged write. One record of acknowledged writes runs
//! through the whole soak, across every failover. Assertions are on data and liveness,
//! never on speed.
//!
//! `NVMIRROR_SOAK_SECS` (default 45) bounds the run, `NVMIRROR_SOAK_SEED` replays one
//! (the choices, not the timings of the processes); the seed and a replay command are
//! printed first.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use nvmirror_control::api::{Client, MirrorRequest, ResyncRequest};
use nvmirror_control::cluster::NodeProc;
use nvmirror_control::workload::Workload;
use nvmirror_dataplane::frontend::nbd_client::NbdClient;
use serde_json::Value;

const VOL: &str = "soak";
const VOLUME_BYTES: u64 = 16 * MIB;
/// Blocks the writer covers (the first 8 MiB of the volume): hot enough that blocks are
/// overwritten within a partition and across CPs.
const BLOCKS: u64 = 2048;
/// The whole soak never runs more rounds than this, whatever its time bound.
const ROUNDS_MAX: u64 = 100_000;
/// How long writes may take to be acknowledged again after the destination or the link
/// came back and the source reported in-sync.
const RESUME_BOUND: Duration = Duration::from_secs(60);
/// How long one write may stay unanswered before the writer is reported stuck.
const WRITE_STUCK_BOUND: Duration = Duration::from_secs(90);

fn env_u64(name: &str) -> Option<u64> {
    let s = std::env::var(name).ok()?;
    let s = s.trim();
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={s:?} is not a number")))
}

// ---------------------------------------------------------------------------------------
// The link: a TCP proxy in front of a node's replication port.

const LINK_UP: u8 = 0;
/// Every connection is shut down; new ones are accepted and closed at once.
const LINK_RESET: u8 = 1;
/// Nothing is forwarded (bytes stay in the sockets' buffers); new connections are
/// accepted and held.
const LINK_STALL: u8 = 2;

struct LinkProxy {
    addr: String,
    /// Where connections go: the node's replication address, once it runs.
    upstream: Arc<Mutex<String>>,
    state: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl LinkProxy {
    /// Listens on a loopback port and forwards every connection to the upstream set with
    /// [`LinkProxy::set_upstream`] (until then, connections are closed at once). Every
    /// thread of it ends by `until` at the latest.
    fn start(until: Instant) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the link proxy");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let state = Arc::new(AtomicU8::new(LINK_UP));
        let stop = Arc::new(AtomicBool::new(false));
        let upstream = Arc::new(Mutex::new(String::new()));
        let (state2, stop2, upstream2) = (state.clone(), stop.clone(), upstream.clone());
        let accept = thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) && Instant::now() < until {
                let client = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => continue,
                };
                if state2.load(Ordering::SeqCst) == LINK_RESET {
                    drop(client);
                    continue;
                }
                let to = upstream2.lock().expect("upstream lock").clone();
                let Ok(server) = to
                    .parse()
                    .map_err(|_| ())
                    .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).map_err(|_| ()))
                else {
                    // The destination is down: the source sees its connection closed.
                    drop(client);
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let closed = Arc::new(AtomicBool::new(false));
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else { continue };
                    let (state, stop, closed) = (state2.clone(), stop2.clone(), closed.clone());
                    thread::spawn(move || pump(from, to, &state, &stop, &closed, until));
                }
            }
        });
        LinkProxy { addr, upstream, state, stop, accept: Some(accept) }
    }

    fn set_upstream(&self, addr: &str) {
        *self.upstream.lock().expect("upstream lock") = addr.to_string();
    }

    fn set(&self, state: u8) {
        self.state.store(state, Ordering::SeqCst);
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Copies `from` to `to` while the link is up, holds while it stalls, and shuts both down
/// when it is reset, when either side closes, when the proxy stops, or at `until`.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    state: &AtomicU8,
    stop: &AtomicBool,
    closed: &AtomicBool,
    until: Instant,
) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    let _ = to.set_write_timeout(Some(Duration::from_secs(10)));
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::SeqCst) && !closed.load(Ordering::SeqCst) && Instant::now() < until {
        match state.load(Ordering::SeqCst) {
            LINK_RESET => break,
            LINK_STALL => {
                thread::sleep(Duration::from_millis(10));
                continue;
            }
            _ => {}
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    closed.store(true, Ordering::SeqCst);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// A node and the proxy in front of its replication port, which it advertises.
struct Site {
    node: NodeProc,
    link: LinkProxy,
}

impl Site {
    fn start(root: &std::path::Path, name: &str, until: Instant) -> Site {
        let link = LinkProxy::start(until);
        let node = NodeProc::start(&bin(), name, &root.join(name), &["--advertise", &link.addr])
            .unwrap_or_else(|e| panic!("start {name}: {e:#}"));
        link.set_upstream(&node.replication);
        Site { node, link }
    }

    fn api(&self) -> Client {
        Client::new(&self.node.control)
    }
}

// ---------------------------------------------------------------------------------------
// The writer.

/// The checked writer on its own NBD connection to the primary, in batches of 16 writes,
/// until stopped, until the connection ends (the primary died), or at its bound. Writes
/// that fail (the mirror unreachable, policy strict) are paced, not retried.
struct Writer {
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    thread: JoinHandle<(Workload, bool)>,
}

impl Writer {
    fn start(nbd: &str, mut w: Workload, qd: usize, until: Instant) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicU64::new(w.acks));
        let errors = Arc::new(AtomicU64::new(w.errors));
        let mut c = NbdClient::connect(nbd, VOL).expect("NBD connect to the primary");
        assert!(!c.read_only, "the primary is exported read-only");
        let (stop2, acks2, errors2) = (stop.clone(), acks.clone(), errors.clone());
        let thread = thread::spawn(move || {
            let mut connection_lost = false;
            for _ in 0..1_000_000u64 {
                if stop2.load(Ordering::SeqCst) || Instant::now() > until {
                    break;
                }
                let (writes, replies, errors) = (w.writes, w.acks + w.errors, w.errors);
                w.run(&mut c, qd, 16, |a| acks2.store(a, Ordering::SeqCst)).expect("write run");
                errors2.store(w.errors, Ordering::SeqCst);
                // Fewer than 16 sent, or sent and not answered: the connection ended.
                if w.writes - writes < 16 || w.acks + w.errors - replies < w.writes - writes {
                    connection_lost = true;
                    break;
                }
                if w.errors > errors {
                    thread::sleep(Duration::from_millis(20));
                }
            }
            (w, connection_lost)
        });
        Writer { stop, acks, errors, thread }
    }

    fn acks(&self) -> u64 {
        self.acks.load(Ordering::SeqCst)
    }

    fn errors(&self) -> u64 {
        self.errors.load(Ordering::SeqCst)
    }

    /// Stops the writer and returns its record and whether its connection was lost. A
    /// write left unanswered past the bound fails the soak (a stuck primary).
    fn finish(self) -> (Workload, bool) {
        self.stop.store(true, Ordering::SeqCst);
        self.join()
    }

    /// Waits for the writer to end by itself (its primary was killed), without stopping
    /// it: a writer told to stop could end between two batches, before it saw the
    /// connection go.
    fn join(self) -> (Workload, bool) {
        let started = Instant::now();
        while !self.thread.is_finished() {
            assert!(
                started.elapsed() < WRITE_STUCK_BOUND,
                "a write to the primary stayed unanswered for {WRITE_STUCK_BOUND:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
        self.thread.join().expect("writer thread")
    }
}

// ---------------------------------------------------------------------------------------
// The soak.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// `failback`: the old primary comes back as the mirror (resync), not a fresh node.
    KillSource {
        failback: bool,
    },
    KillDestination {
        down_ms: u64,
    },
    CutLink {
        stall: bool,
        ms: u64,
    },
}

impl Fault {
    fn kind(self) -> usize {
        match self {
            Fault::KillSource { .. } => 0,
            Fault::KillDestination { .. } => 1,
            Fault::CutLink { .. } => 2,
        }
    }
}

const KINDS: [&str; 3] = ["kill-source", "kill-destination", "cut-link"];

#[derive(Default)]
struct Totals {
    rounds: [u64; 3],
    /// Kill-source rounds that failed back (resync) rather than pairing a fresh node.
    failbacks: u64,
    /// Bytes the failbacks' resyncs copied, and what a full copy would have.
    failback_bytes: u64,
    /// Link cuts that stalled rather than reset.
    stalls: u64,
    /// Verifications of the whole record, on a primary or a mirror.
    verifications: u64,
    blocks_verified: u64,
    failover_ms_max: f64,
    resume_ms_max: f64,
}

struct Soak {
    root: PathBuf,
    _dir: Option<tempfile::TempDir>,
    until: Instant,
    primary: Site,
    mirror: Site,
    next_node: u32,
    /// Epoch of the volume: raised by every failover.
    epoch: u64,
    w: Option<Workload>,
    totals: Totals,
}

impl Soak {
    fn start(seed: u64, until: Instant) -> Soak {
        let dir = tempfile::Builder::new().prefix("nvmirror-soak-").tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let primary = Site::start(&root, "node-0", until);
        let mirror = Site::start(&root, "node-1", until);
        create_volume(&primary.api(), VOL, VOLUME_BYTES, Some(LOG_BYTES_MIN)).expect("create volume");
        pair(&primary, &mirror);
        Soak {
            root,
            _dir: Some(dir),
            until,
            primary,
            mirror,
            next_node: 2,
            epoch: 1,
            w: Some(Workload::new(0, BLOCKS, seed)),
            totals: Totals::default(),
        }
    }

    fn src_api(&self) -> Client {
        self.primary.api()
    }

    fn dst_api(&self) -> Client {
        self.mirror.api()
    }

    /// Runs one round: the writer, the fault at a random moment, recovery, verification.
    fn round(&mut self, index: u64, fault: Fault, rng: &mut Rng) {
        let started = Instant::now();
        let qd = usize::try_from(rng.range(1, 8)).expect("small");
        let delay_ms = rng.range(0, 600);
        let with_cp = rng.range(0, 2) == 0;
        let before = self.w.as_ref().map(|w| (w.writes, w.acks, w.errors)).expect("the record");
        let writer = Writer::start(&self.primary.node.nbd, self.w.take().expect("the record"), qd, self.until);
        let acks_before = writer.acks();
        wait_for("the writer to get 20 acknowledgements", Duration::from_secs(60), || {
            Ok((writer.acks() >= acks_before + 20).then_some(()))
        });
        thread::sleep(Duration::from_millis(delay_ms));
        if with_cp {
            // A forced CP under way at the fault (its answer does not matter: with the
            // source dead it fails, with the mirror away it waits for its return).
            let api = self.src_api();
            thread::spawn(move || {
                let _ = cp(&api, VOL);
            });
            thread::sleep(Duration::from_millis(rng.range(0, 20)));
        }
        let what = match fault {
            Fault::KillSource { failback } => self.kill_source(writer, failback),
            Fault::KillDestination { down_ms } => {
                sigkill(self.mirror.node.pid().expect("the mirror runs"));
                self.mirror.node.kill();
                thread::sleep(Duration::from_millis(down_ms));
                let failed = writer.errors() - before.2;
                self.mirror.node.restart().expect("restart the mirror");
                let resumed = self.resume(writer);
                format!("mirror down {down_ms} ms ({failed} writes failed meanwhile); {resumed}")
            }
            Fault::CutLink { stall, ms } => {
                self.mirror.link.set(if stall { LINK_STALL } else { LINK_RESET });
                thread::sleep(Duration::from_millis(ms));
                self.mirror.link.set(LINK_UP);
                let resumed = self.resume(writer);
                format!("link {} for {ms} ms; {resumed}", if stall { "stalled" } else { "reset" })
            }
        };
        self.totals.rounds[fault.kind()] += 1;
        let w = self.w.as_ref().expect("the record");
        println!(
            "soak: round {index:3} {:<16} qd {qd} cp {} after {delay_ms:3} ms: {what}; this round: {} writes, {} acked, {} failed; {:.1} s",
            KINDS[fault.kind()],
            if with_cp { "yes" } else { "no " },
            w.writes - before.0,
            w.acks - before.1,
            w.errors - before.2,
            started.elapsed().as_secs_f64()
        );
    }

    /// SIGKILL of the primary with the writer running, failover, verification on the
    /// promoted volume and writes on it alone; then a mirror for it: a fresh node, or
    /// (`failback`) the old primary, fenced on its return, brought back by a delta resync.
    fn kill_source(&mut self, writer: Writer, failback: bool) -> String {
        sigkill(self.primary.node.pid().expect("the primary runs"));
        let (w, lost) = writer.join();
        assert!(lost, "the writer did not notice that the primary died");
        self.primary.node.kill();
        let t = Instant::now();
        let report =
            failover(&self.dst_api(), VOL).unwrap_or_else(|e| panic!("failover on {}: {e:#}", self.mirror.node.name));
        let failover_ms = t.elapsed().as_secs_f64() * 1000.0;
        self.epoch += 1;
        assert_eq!(report["epoch"], self.epoch, "failover report {report}");
        let v = verify(&w, &self.mirror.node.nbd, VOL).expect("read the promoted volume");
        assert_verified(&v, &format!("promoted volume on {} after the primary was killed", self.mirror.node.name));
        self.count(&v);
        self.totals.failover_ms_max = self.totals.failover_ms_max.max(failover_ms);
        // The promoted mirror is the primary, and takes writes alone.
        let mut w = w;
        write_all_acked(&mut w, &self.mirror.node.nbd, "the promoted volume");
        let t = Instant::now();
        let how = if failback {
            // The roles turn: the promoted node is the primary, the old primary (dead)
            // the mirror to be. It returns on its data dir and learns that it was failed
            // over.
            std::mem::swap(&mut self.primary, &mut self.mirror);
            self.mirror.node.restart().expect("restart the old primary");
            wait_state(&self.dst_api(), VOL, "fenced", Duration::from_secs(60));
            {
                let mut c =
                    NbdClient::connect(self.mirror.node.nbd.as_str(), VOL).expect("NBD connect to the old primary");
                assert!(c.write(0, &vec![0xee; 4096]).is_err(), "the fenced old primary took a write");
            }
            let started: Value = self
                .dst_api()
                .post(
                    &format!("/v1/volumes/{VOL}/resync"),
                    &ResyncRequest { from: self.primary.node.control.clone(), dry_run: false },
                )
                .unwrap_or_else(|e| panic!("resync {VOL} on {}: {e:#}", self.mirror.node.name));
            assert_eq!(started["delta"], true, "the failback is not a delta resync: {started}");
            let s = wait_state(&self.src_api(), VOL, "in-sync", Duration::from_secs(120));
            assert_eq!(s["last_copy_kind"], "resync", "the failback copied the whole volume: {s}");
            let copied = s["last_copy_bytes"].as_u64().unwrap_or(u64::MAX);
            // The writer covers the first BLOCKS blocks only: a delta never copies more.
            assert!(
                copied <= BLOCKS * 4096,
                "the failback copied {copied} bytes; the writer changed at most the first {} of {VOLUME_BYTES}",
                BLOCKS * 4096
            );
            wait_for("the resynced mirror to be consistent", Duration::from_secs(60), || {
                Ok(mirror_status(&self.dst_api(), VOL)?["consistent"].as_bool().filter(|c| *c))
            });
            self.totals.failbacks += 1;
            self.totals.failback_bytes += copied;
            format!("old primary fenced, refused a write, failed back by a delta resync of {} KiB", copied >> 10)
        } else {
            let name = format!("node-{}", self.next_node);
            self.next_node += 1;
            let fresh = Site::start(&self.root, &name, self.until);
            let promoted = std::mem::replace(&mut self.mirror, fresh);
            let old = std::mem::replace(&mut self.primary, promoted);
            let old_dir = old.node.data_dir.clone();
            drop(old);
            // The dead source's data is of no further use here; its log stays beside the
            // data dirs.
            let _ = std::fs::remove_dir_all(&old_dir);
            pair(&self.primary, &self.mirror);
            "a fresh mirror paired".to_string()
        };
        let pair_s = t.elapsed().as_secs_f64();
        // Writes resume on the new primary, mirrored.
        write_all_acked(&mut w, &self.primary.node.nbd, "the new primary");
        // Whichever mirror it has now holds every acknowledged write after a CP.
        let n = self.cp_applied("a CP on the new primary");
        let vm = verify(&w, &self.mirror.node.nbd, VOL).expect("verify the new mirror");
        assert_verified(&vm, &format!("the new mirror {} after CP {n}", self.mirror.node.name));
        self.count(&vm);
        self.w = Some(w);
        format!(
            "failover to {} epoch {} in {failover_ms:.0} ms ({} entries replayed); verified {} blocks ({} acked data, {} newer); \
             {how}: {} in sync {pair_s:.1} s later, holds every acknowledged write after CP {n}",
            self.primary.node.name,
            report["epoch"],
            report["entries_replayed"],
            v.blocks_checked,
            v.blocks_with_acked_data,
            v.newer_than_acked,
            self.mirror.node.name
        )
    }

    /// After the mirror or the link came back: in sync again, writes acknowledged again,
    /// then a CP, mirror == primary, every acknowledged write on both.
    fn resume(&mut self, writer: Writer) -> String {
        let back = Instant::now();
        let acks_at_return = writer.acks();
        wait_state(&self.src_api(), VOL, "in-sync", RESUME_BOUND);
        let in_sync_ms = back.elapsed().as_secs_f64() * 1000.0;
        wait_for("writes to be acknowledged again", RESUME_BOUND, || {
            Ok((writer.acks() >= acks_at_return + 32).then_some(()))
        });
        let resume_ms = back.elapsed().as_secs_f64() * 1000.0;
        self.totals.resume_ms_max = self.totals.resume_ms_max.max(resume_ms);
        let (mut w, lost) = writer.finish();
        assert!(!lost, "the writer's connection to the primary ended, but the primary was not touched");
        // In sync: every write is acknowledged.
        write_all_acked(&mut w, &self.primary.node.nbd, "the primary with the mirror in sync again");
        let n = self.cp_applied("a CP after the return");
        let primary = read_volume(&self.primary.node.nbd, VOL).expect("read the primary");
        let copy = read_volume(&self.mirror.node.nbd, VOL).expect("read the mirror");
        if let Some(at) = first_difference(&primary, &copy) {
            panic!("after CP {n} the mirror differs from the primary at byte {at} (block {})", at / 4096);
        }
        let vp = verify(&w, &self.primary.node.nbd, VOL).expect("verify the primary");
        assert_verified(&vp, "the primary after the mirror or the link came back");
        let vm = verify(&w, &self.mirror.node.nbd, VOL).expect("verify the mirror");
        assert_verified(&vm, "the mirror after it or the link came back");
        self.count(&vp);
        self.count(&vm);
        self.w = Some(w);
        format!(
            "in sync {in_sync_ms:.0} ms and writes acked {resume_ms:.0} ms after the return; CP {n}: mirror == primary, \
             {} blocks verified on each ({} acked data)",
            vp.blocks_checked, vp.blocks_with_acked_data
        )
    }

    /// Forces a CP on the primary and waits until the mirror applied it; returns its number.
    fn cp_applied(&self, what: &str) -> u64 {
        let n = cp(&self.src_api(), VOL).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        wait_for("the mirror to apply the CP", Duration::from_secs(60), || {
            Ok((mirror_status(&self.dst_api(), VOL)?["applied_cp"].as_u64().unwrap_or(0) >= n).then_some(()))
        });
        n
    }

    fn count(&mut self, v: &nvmirror_control::workload::Verified) {
        self.totals.verifications += 1;
        self.totals.blocks_verified += v.blocks_checked;
    }
}

impl Drop for Soak {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in [&self.primary.node, &self.mirror.node] {
                dump_log(n);
            }
            if std::env::var_os("NVMIRROR_E2E_KEEP").is_some() {
                if let Some(d) = self._dir.take() {
                    eprintln!("soak data kept under {}", d.keep().display());
                }
            }
        }
    }
}

/// 64 writes on a new NBD connection to `nbd`, queue depth 4: every one must be acknowledged.
fn write_all_acked(w: &mut Workload, nbd: &str, what: &str) {
    let mut c = NbdClient::connect(nbd, VOL).unwrap_or_else(|e| panic!("NBD connect to {what}: {e:#}"));
    let (acks, errors) = (w.acks, w.errors);
    w.run(&mut c, 4, 64, |_| {}).unwrap_or_else(|e| panic!("writes on {what}: {e:#}"));
    assert_eq!((w.acks - acks, w.errors - errors), (64, 0), "writes on {what} failed");
}

/// Pairs the volume on `primary` with `mirror` (through the mirror's link proxy, which it
/// advertises); returns once in sync and the mirror is consistent.
fn pair(primary: &Site, mirror: &Site) {
    let api = primary.api();
    let _: Value = api
        .post(
            &format!("/v1/volumes/{VOL}/mirror"),
            &MirrorRequest {
                to: mirror.node.control.clone(),
                transport: "tcp".into(),
                policy: "strict".into(),
                resync_ranges: Vec::new(),
                rate: None,
            },
        )
        .unwrap_or_else(|e| panic!("mirror {VOL} from {} to {}: {e:#}", primary.node.name, mirror.node.name));
    wait_state(&api, VOL, "in-sync", Duration::from_secs(120));
    wait_for("the new mirror to be consistent", Duration::from_secs(60), || {
        Ok(mirror_status(&mirror.api(), VOL)?["consistent"].as_bool().filter(|c| *c))
    });
}

#[test]
fn soak_kills_and_link_cuts() {
    let secs = env_u64("NVMIRROR_SOAK_SECS").unwrap_or(45);
    let seed = env_u64("NVMIRROR_SOAK_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs().wrapping_mul(1_000_000_007) ^ u64::from(d.subsec_nanos()))
            .unwrap_or(1)
    });
    println!(
        "soak: {secs} s, seed {seed:#x}; replay: NVMIRROR_SOAK_SEED={seed:#x} NVMIRROR_SOAK_SECS={secs} \
         cargo test --release -p nvmirror-control --test soak -- --nocapture"
    );
    let started = Instant::now();
    let end = started + Duration::from_secs(secs);
    // Every thread of the soak ends by this, whatever happens.
    let until = end + Duration::from_secs(600);
    let mut rng = Rng::new(seed);
    let mut soak = Soak::start(seed, until);
    println!(
        "soak: {VOL} ({} MiB) on {} mirrored to {} through a link proxy",
        VOLUME_BYTES >> 20,
        soak.primary.node.name,
        soak.mirror.node.name
    );
    // The kinds come in shuffled threes, so that a short soak has each a few times.
    let mut plan: Vec<usize> = Vec::new();
    let mut index = 0;
    while Instant::now() < end && index < ROUNDS_MAX {
        if plan.is_empty() {
            plan = vec![0, 1, 2];
            for i in (1..plan.len()).rev() {
                let j = usize::try_from(rng.range(0, i as u64)).expect("small");
                plan.swap(i, j);
            }
        }
        let fault = match plan.pop().expect("refilled") {
            0 => Fault::KillSource { failback: rng.range(0, 1) == 0 },
            1 => Fault::KillDestination { down_ms: rng.range(50, 2000) },
            _ => {
                let stall = rng.range(0, 1) == 0;
                // One stall in four outlasts the transport's 10 s I/O timeout.
                let ms = if stall && rng.range(0, 3) == 0 { rng.range(10_500, 12_000) } else { rng.range(100, 3000) };
                if stall {
                    soak.totals.stalls += 1;
                }
                Fault::CutLink { stall, ms }
            }
        };
        soak.round(index, fault, &mut rng);
        index += 1;
    }
    let w = soak.w.as_ref().expect("the record");
    let t = &soak.totals;
    println!(
        "soak: seed {seed:#x}: {index} rounds in {:.1} s ({} kill-source of which {} failed back by resync, copying {} KiB in all, \
         {} kill-destination, {} cut-link of which {} stalled); \
         {} writes, {} acknowledged, {} failed; {} verifications of the record ({} blocks), none lost; \
         longest failover {:.0} ms, longest return to acknowledged writes {:.0} ms",
        started.elapsed().as_secs_f64(),
        t.rounds[0],
        t.failbacks,
        t.failback_bytes >> 10,
        t.rounds[1],
        t.rounds[2],
        t.stalls,
        w.writes,
        w.acks,
        w.errors,
        t.verifications,
        t.blocks_verified,
        t.failover_ms_max,
        t.resume_ms_max
    );
    assert!(index > 0, "the soak ran no round in {secs} s");
}
