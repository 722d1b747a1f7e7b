//! Fleet mode (`nvmirror node --state etcd://HOST:PORT[,HOST:PORT...]`, the members of one
//! etcd cluster, each tried in turn where another does not answer): who is each volume's
//! primary is recorded in etcd, held by the primary's lease, and a mirror whose primary's
//! lease expires fails over by itself.
//!
//! Keys, per volume: `/nvmirror/volumes/VOL/primary` = `{"node", "control", "epoch"}`,
//! attached to the primary node's lease (it vanishes when the node stops renewing it), and
//! `/nvmirror/volumes/VOL/state` = the primary's last pair state (epoch, state, peer,
//! policy, last CP), with no lease. Every node keeps one lease of `--lease-ttl` and renews
//! it every third of that.
//!
//! - A primary registers its volumes (creating the key, or finding it its own); a primary
//!   that finds the key held by another node fences its volume: it may no longer be the
//!   primary, and writes it acknowledged alone could be lost (policy strict cannot: its
//!   mirror's epoch refuses them).
//! - A primary that cannot renew its lease within the TTL (it lost etcd) keeps each volume
//!   whose pair is in sync, held to policy strict until etcd answers (no write is
//!   acknowledged on its site alone; a mirror that fails over fences it through the link),
//!   and fences every other one: it can prove neither that it is the primary nor that its
//!   mirror takes its writes.
//! - A mirror that has seen its source hold the key and then finds it gone (the lease
//!   expired: the node died, or lost etcd) takes the key for itself, and fails over with
//!   the revision of that creation as the new epoch: the fencing token. Only one mirror
//!   can create the key; a mirror that cannot fail over (not consistent) gives it back.
//!   Not while the source's connection is up: a source that lost etcd, not its mirror, is
//!   alive (a dead one's connection ends: its kernel closes it, or keepalive probes go
//!   unanswered, `transport::tcp::DEAD_PEER`).

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};

use crate::etcd::Etcd;
use crate::node::Node;

fn primary_key(vol: &str) -> String {
    format!("/nvmirror/volumes/{vol}/primary")
}

fn state_key(vol: &str) -> String {
    format!("/nvmirror/volumes/{vol}/state")
}

/// Starts the fleet thread of `node`.
pub fn start(node: &Arc<Node>, url: &str, security: &crate::etcd::EtcdSecurity, ttl: Duration) -> Result<()> {
    let ttl_s = ttl.as_secs().max(1);
    // A request at one member that does not answer ends within a third of the lease's
    // life: the renewal (every third) then goes to another member in time.
    let etcd = Etcd::secured(url, Duration::from_millis(ttl_s * 1000 / 3), security)?;
    // Reachable now, or the node does not start: a fleet node without its store would
    // take no part in failover.
    let lease = etcd.grant(ttl_s)?;
    tracing::warn!(
        "node {}: fleet state in etcd at {} (lease {lease:x}, {ttl_s} s; answered by {})",
        node.cfg.name,
        etcd.members().join(","),
        etcd.endpoint()
    );
    let weak = Arc::downgrade(node);
    std::thread::Builder::new().name("nvm-fleet".into()).spawn(move || run(weak, etcd, lease, ttl_s))?;
    Ok(())
}

fn run(node: Weak<Node>, etcd: Etcd, mut lease: i64, ttl_s: u64) {
    let period = Duration::from_millis(ttl_s * 1000 / 3);
    let mut renewed = Instant::now();
    // Mirrors whose source was seen holding the key: only those fail over by themselves.
    let mut seen_primary: HashSet<(String, String)> = HashSet::new();
    // Primary volumes going on without etcd, held to policy strict (their pair in sync).
    let mut held: HashSet<String> = HashSet::new();
    loop {
        std::thread::sleep(period);
        let Some(node) = node.upgrade() else { return };
        match etcd.keepalive(lease) {
            Ok(true) => {
                renewed = Instant::now();
                node.release_held(&mut held);
            }
            Ok(false) | Err(_) => {
                if renewed.elapsed() >= Duration::from_secs(ttl_s) {
                    // The lease is gone (or may be): a mirror may be taking over. A volume
                    // whose mirror takes its writes goes on (the mirror fences it if it
                    // fails over); any other is fenced.
                    node.hold_or_fence_primaries(
                        "this node's etcd lease expired: another node may take its volumes over",
                        &mut held,
                    );
                    if let Ok(l) = etcd.grant(ttl_s) {
                        lease = l;
                        renewed = Instant::now();
                        node.release_held(&mut held);
                    }
                }
                continue;
            }
        }
        let status = serde_json::to_value(node.status()).unwrap_or(Value::Null);
        let empty = Vec::new();
        for v in status["volumes"].as_array().unwrap_or(&empty) {
            let vol = v["volume"].as_str().unwrap_or("").to_string();
            if v["state"] == "fenced" || v["state"] == "failed" || vol.is_empty() {
                continue;
            }
            let me = json!({ "node": node.cfg.name, "control": node.cfg.control.to_string(), "epoch": v["epoch"] });
            let body = me.to_string().into_bytes();
            match etcd.get(&primary_key(&vol)) {
                Ok(None) => {
                    if let Ok(Err(Some(kv))) = etcd.create(&primary_key(&vol), &body, Some(lease)) {
                        fence_unless_ours(&node, &vol, &kv.value);
                    }
                }
                Ok(Some(kv)) => {
                    if !fence_unless_ours(&node, &vol, &kv.value) && kv.lease != lease {
                        // Ours, from an earlier lease of this node: moved to the current one.
                        let _ = etcd.put(&primary_key(&vol), &body, Some(lease));
                    }
                }
                Err(_) => {}
            }
            let state = json!({
                "primary": node.cfg.name,
                "epoch": v["epoch"],
                "state": v["state"],
                "peer": v["peer"],
                "policy": v["policy"],
                "last_cp": v["last_cp"],
                "mirror_current": v["mirror_current"],
            });
            let _ = etcd.put(&state_key(&vol), state.to_string().as_bytes(), None);
        }
        for m in status["mirrors"].as_array().unwrap_or(&empty) {
            let vol = m["volume"].as_str().unwrap_or("").to_string();
            let src = m["source_node"].as_str().unwrap_or("").to_string();
            if m["promoted"] == true || vol.is_empty() {
                continue;
            }
            match etcd.get(&primary_key(&vol)) {
                Ok(Some(kv)) => {
                    let holder: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
                    if holder["node"] == src.as_str() {
                        seen_primary.insert((src.clone(), vol.clone()));
                    }
                }
                // A source whose link to this mirror is up is alive, whatever etcd says (it
                // lost etcd, not its mirror): no failover under it. A dead source's
                // connection ends (its kernel closes it, or keepalive probes go unanswered).
                Ok(None) if seen_primary.contains(&(src.clone(), vol.clone())) && m["connected"] == true => {}
                Ok(None) if seen_primary.contains(&(src.clone(), vol.clone())) && m["consistent"] == true => {
                    automatic_failover(&node, &etcd, lease, &src, &vol);
                    seen_primary.remove(&(src, vol));
                }
                _ => {}
            }
        }
    }
}

/// Fences `vol` here if `holder` (the primary key's value) names another node; whether
/// it did.
fn fence_unless_ours(node: &Node, vol: &str, holder: &[u8]) -> bool {
    let holder: Value = serde_json::from_slice(holder).unwrap_or(Value::Null);
    if holder["node"] == node.cfg.name.as_str() {
        return false;
    }
    let who = holder["node"].as_str().unwrap_or("another node");
    node.fence_volume(vol, &format!("etcd names {who} the primary of {vol} (epoch {})", holder["epoch"]));
    true
}

fn automatic_failover(node: &Node, etcd: &Etcd, lease: i64, src: &str, vol: &str) {
    let me = json!({ "node": node.cfg.name, "control": node.cfg.control.to_string(), "epoch": Value::Null });
    let revision = match etcd.create(&primary_key(vol), me.to_string().as_bytes(), Some(lease)) {
        Ok(Ok(r)) => r,
        // Another node took it first, or etcd is away: not ours to do.
        _ => return,
    };
    let epoch = u64::try_from(revision).unwrap_or(0);
    tracing::warn!(
        "node {}: the primary {src} of {vol} lost its etcd lease; failing over (fencing token {epoch})",
        node.cfg.name
    );
    match node.failover_at(vol, Some(epoch)) {
        Ok(r) => {
            let me = json!({ "node": node.cfg.name, "control": node.cfg.control.to_string(), "epoch": r.epoch });
            let _ = etcd.put(&primary_key(vol), me.to_string().as_bytes(), Some(lease));
            node.events.push(
                "automatic-failover",
                Some(vol),
                json!({ "from": src, "epoch": r.epoch, "etcd_revision": revision }),
            );
        }
        Err(e) => {
            tracing::warn!(
                "node {}: automatic failover of {vol} failed: {e:#}; giving the primary key back",
                node.cfg.name
            );
            let _ = etcd.delete(&primary_key(vol));
        }
    }
}
