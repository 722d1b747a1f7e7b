//! Events: what changed on a node, as JSON lines (`ctl events`, `GET /v1/events`).
//!
//! A bounded ring of the last [`KEPT`] events, each with an id that only grows and the
//! node's boot id (random per start: ids begin again at 1 after a restart, the boot id
//! tells). A look from the start (`since=0`) begins with a `snapshot` line (id 0): every
//! volume's and mirror's state at that moment, so that a consumer need not replay. Commands
//! (volume created, mirror paired, failover, resync, switchover, scrub, disk replaced)
//! record theirs as they happen; a sampler thread records the state changes of every
//! volume and mirror (in-sync, out-of-sync, baseline, resyncing, fenced, failed, broken),
//! with their reason, and completed CPs, by looking at their status every 200 ms.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use serde_json::Value;

/// Events kept for `?since=`.
pub const KEPT: usize = 1024;
/// Clients following the stream at once.
pub const FOLLOWERS_MAX: usize = 16;
/// A followed stream sends an empty line after this long without events, so that a client
/// gone away is noticed.
const KEEPALIVE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub id: u64,
    /// The node's start this event belongs to ([`EventLog::boot`]).
    pub boot: String,
    pub unix_ms: u64,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    pub detail: Value,
    /// Who asked for what the event records: the address of the API request (and its
    /// operator certificate's name), where a request caused it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
}

thread_local! {
    /// The caller of the API request this thread works on, for the events it records.
    static CALLER: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with the events this thread records in it naming `caller`.
pub fn on_behalf_of<T>(caller: &str, f: impl FnOnce() -> T) -> T {
    struct Reset(Option<String>);
    impl Drop for Reset {
        fn drop(&mut self) {
            CALLER.with(|c| *c.borrow_mut() = self.0.take());
        }
    }
    let _reset = Reset(CALLER.with(|c| c.borrow_mut().replace(caller.to_string())));
    f()
}

#[derive(Default)]
struct Ring {
    next_id: u64,
    events: VecDeque<Event>,
}

/// A random id of this start of the node, in hex.
struct BootId(String);

impl Default for BootId {
    fn default() -> Self {
        let n = nvmirror_dataplane::transport::auth::fresh_nonce().unwrap_or_else(|_| {
            // No randomness from the OS: the start time tells starts apart as well.
            let mut n = [0u8; 32];
            n[..16].copy_from_slice(&u128::from(nvmirror_dataplane::clock::unix_ms()).to_le_bytes());
            n
        });
        BootId(nvmirror_dataplane::transport::auth::to_hex(&n[..8]))
    }
}

#[derive(Default)]
pub struct EventLog {
    boot: BootId,
    ring: Mutex<Ring>,
    arrived: Condvar,
    followers: AtomicUsize,
}

impl EventLog {
    /// This start's boot id.
    pub fn boot(&self) -> &str {
        &self.boot.0
    }

    /// The `snapshot` line (id 0) of the volumes and mirrors of a node status (as JSON):
    /// each one's role, state, epoch and reason, as of the newest event so far.
    pub fn snapshot(&self, status: &Value) -> Event {
        let empty = Vec::new();
        let volumes: Vec<Value> = status["volumes"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .chain(status["unstarted"].as_array().unwrap_or(&empty))
            .map(|v| {
                serde_json::json!({ "volume": v["volume"], "role": "primary", "state": v["state"], "epoch": v["epoch"], "reason": v["reason"] })
            })
            .chain(status["mirrors"].as_array().unwrap_or(&empty).iter().map(|m| {
                serde_json::json!({ "volume": m["volume"], "role": "mirror", "source_node": m["source_node"], "state": m["state"], "epoch": m["epoch"], "reason": m["error"] })
            }))
            .collect();
        Event {
            id: 0,
            boot: self.boot.0.clone(),
            unix_ms: nvmirror_dataplane::clock::unix_ms(),
            kind: "snapshot".into(),
            volume: None,
            detail: serde_json::json!({ "as_of": self.ring.lock().next_id, "volumes": volumes }),
            caller: None,
        }
    }

    pub fn push(&self, kind: &str, volume: Option<&str>, detail: Value) {
        let mut r = self.ring.lock();
        r.next_id += 1;
        let e = Event {
            id: r.next_id,
            boot: self.boot.0.clone(),
            unix_ms: nvmirror_dataplane::clock::unix_ms(),
            kind: kind.into(),
            volume: volume.map(str::to_string),
            detail,
            caller: CALLER.with(|c| c.borrow().clone()),
        };
        r.events.push_back(e);
        while r.events.len() > KEPT {
            r.events.pop_front();
        }
        drop(r);
        self.arrived.notify_all();
    }

    /// Events with an id above `since`, oldest first.
    pub fn since(&self, since: u64) -> Vec<Event> {
        self.ring.lock().events.iter().filter(|e| e.id > since).cloned().collect()
    }

    /// As [`EventLog::since`], waiting up to `timeout` for one.
    fn wait_since(&self, since: u64, timeout: Duration) -> Vec<Event> {
        let mut r = self.ring.lock();
        if r.next_id <= since {
            let _ = self.arrived.wait_for(&mut r, timeout);
        }
        r.events.iter().filter(|e| e.id > since).cloned().collect()
    }

    /// A stream of the events after `since`, then of new ones as they come, as JSON lines;
    /// `None` when [`FOLLOWERS_MAX`] streams are open already.
    /// `first`: lines sent before them (the snapshot).
    pub fn follow(self: &Arc<Self>, since: u64, first: Vec<u8>) -> Option<EventStream> {
        let n = self.followers.fetch_add(1, Ordering::SeqCst);
        if n >= FOLLOWERS_MAX {
            self.followers.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(EventStream { log: self.clone(), next: since, buf: first, pos: 0 })
    }
}

/// A followed stream: blocks until there is something to send.
pub struct EventStream {
    log: Arc<EventLog>,
    next: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for EventStream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            let events = self.log.wait_since(self.next, KEEPALIVE);
            if events.is_empty() {
                self.buf.push(b'\n');
            }
            for e in events {
                self.next = e.id;
                self.buf.extend_from_slice(&serde_json::to_vec(&e).map_err(io::Error::other)?);
                self.buf.push(b'\n');
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.log.followers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Records into `log` the state changes of the volumes and mirrors in the node status that
/// `status` gives (as JSON), and their CPs, until it gives none (the node is gone).
pub fn spawn_sampler(log: Arc<EventLog>, status: impl Fn() -> Option<Value> + Send + 'static) {
    let _ = std::thread::Builder::new().name("nvm-events".into()).spawn(move || {
        let mut seen: HashMap<String, (String, Option<String>, u64)> = HashMap::new();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let Some(s) = status() else { return };
            let empty = Vec::new();
            let mut now: HashMap<String, (String, Option<String>, u64, Option<String>)> = HashMap::new();
            for v in s["volumes"].as_array().unwrap_or(&empty) {
                let name = v["volume"].as_str().unwrap_or("?").to_string();
                now.insert(
                    format!("volume {name}"),
                    (
                        v["state"].as_str().unwrap_or("?").into(),
                        v["reason"].as_str().map(str::to_string),
                        v["last_cp"].as_u64().unwrap_or(0),
                        Some(name),
                    ),
                );
            }
            for m in s["mirrors"].as_array().unwrap_or(&empty) {
                let name = m["volume"].as_str().unwrap_or("?").to_string();
                let src = m["source_node"].as_str().unwrap_or("?");
                now.insert(
                    format!("mirror {src}/{name}"),
                    (
                        m["state"].as_str().unwrap_or("?").into(),
                        m["error"].as_str().map(str::to_string),
                        m["applied_cp"].as_u64().unwrap_or(0),
                        Some(name),
                    ),
                );
            }
            for (key, (state, reason, cp, volume)) in &now {
                let role = if key.starts_with("volume") { "primary" } else { "mirror" };
                match seen.get(key) {
                    Some((s0, r0, cp0)) => {
                        if s0 != state || r0 != reason {
                            log.push(
                                "state",
                                volume.as_deref(),
                                serde_json::json!({ "role": role, "what": key, "state": state, "from": s0, "reason": reason }),
                            );
                        }
                        if cp > cp0 {
                            log.push(
                                "cp",
                                volume.as_deref(),
                                serde_json::json!({ "role": role, "what": key, "cp": cp }),
                            );
                        }
                    }
                    None => log.push(
                        "state",
                        volume.as_deref(),
                        serde_json::json!({ "role": role, "what": key, "state": state, "from": Value::Null, "reason": reason }),
                    ),
                }
            }
            for key in seen.keys().filter(|k| !now.contains_key(*k)) {
                log.push("gone", None, serde_json::json!({ "what": key }));
            }
            seen = now.into_iter().map(|(k, (s, r, c, _))| (k, (s, r, c))).collect();
        }
    });
}
