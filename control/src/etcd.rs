//! A small etcd v3 client over etcd's JSON gateway (`/v3/...`, in etcd 3.4 and later):
//! leases, gets, puts, a create-if-absent and a delete — what the fleet mode needs, with
//! no gRPC stack. Keys and values travel base64-encoded; 64-bit integers come back as
//! strings, as the gateway writes them.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn unb64(s: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).context("etcd sent bad base64")
}

/// An int64 of the gateway's JSON (a string, or a number).
fn int(v: &Value) -> i64 {
    v.as_str().and_then(|s| s.parse().ok()).or_else(|| v.as_i64()).unwrap_or(0)
}

/// One key's value and its revisions.
#[derive(Debug, Clone)]
pub struct Kv {
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

fn kv_of(v: &Value) -> Result<Kv> {
    Ok(Kv {
        value: unb64(v["value"].as_str().unwrap_or(""))?,
        create_revision: int(&v["create_revision"]),
        mod_revision: int(&v["mod_revision"]),
        lease: int(&v["lease"]),
    })
}

/// A client of an etcd cluster: requests go to the member that answered last, and on to
/// the next where it does not answer (a refused or timed-out connection, or a 5xx such as
/// "no leader" from a member cut off from the others).
pub struct Etcd {
    /// `http://HOST:PORT`, one per member.
    members: Vec<String>,
    /// The member tried first: the last one that answered.
    current: std::sync::atomic::AtomicUsize,
    agent: ureq::Agent,
}

/// The longest one request may take at one member.
pub const REQUEST_TIMEOUT_MAX: Duration = Duration::from_secs(5);

impl Etcd {
    /// `etcd://HOST:PORT[,HOST:PORT...]` (or `http://...`), each request bounded by
    /// `timeout` per member (kept below the lease's time to live by the caller, so that a
    /// member that does not answer leaves time to renew through another).
    pub fn new(url: &str, timeout: Duration) -> Result<Etcd> {
        let list = url
            .strip_prefix("etcd://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| anyhow!("--state {url:?}: expected etcd://HOST:PORT[,HOST:PORT...]"))?;
        let members: Vec<String> = list.split(',').map(|m| format!("http://{}", m.trim())).collect();
        for (m, given) in members.iter().zip(list.split(',')) {
            let given = given.trim();
            if given.is_empty() || given.contains('/') || !given.contains(':') {
                bail!("--state {url:?}: member {given:?} is not HOST:PORT (expected etcd://HOST:PORT[,HOST:PORT...])");
            }
            if members.iter().filter(|o| *o == m).count() > 1 {
                bail!("--state {url:?}: member {given} is named twice");
            }
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout.min(REQUEST_TIMEOUT_MAX)))
            .build()
            .into();
        Ok(Etcd { members, current: std::sync::atomic::AtomicUsize::new(0), agent })
    }

    /// The member that answered last (the first one before any did).
    pub fn endpoint(&self) -> &str {
        &self.members[self.current.load(std::sync::atomic::Ordering::Relaxed) % self.members.len()]
    }

    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// Posts `body` to `path`, at the member that answered last, then at each other one
    /// in turn where it does not answer. An answer that says no (4xx) is final.
    fn call(&self, path: &str, body: Value) -> Result<Value> {
        use std::sync::atomic::Ordering;
        let first = self.current.load(Ordering::Relaxed);
        let mut failed = Vec::new();
        for i in 0..self.members.len() {
            let at = (first + i) % self.members.len();
            let url = format!("{}{path}", self.members[at]);
            let mut resp = match self.agent.post(&url).send_json(&body) {
                Ok(r) => r,
                Err(e) => {
                    failed.push(format!("{}: {e}", self.members[at]));
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let v: Value = match resp.body_mut().read_json() {
                Ok(v) => v,
                Err(e) if status >= 500 => {
                    failed.push(format!("{}: {status} ({e})", self.members[at]));
                    continue;
                }
                Err(e) => return Err(anyhow!("etcd {url}: answer is not JSON: {e}")),
            };
            let why = || v["message"].as_str().or(v["error"].as_str()).unwrap_or("error").to_string();
            if status >= 500 {
                failed.push(format!("{}: {status}: {}", self.members[at], why()));
                continue;
            }
            if at != first {
                self.current.store(at, Ordering::Relaxed);
                tracing::info!("etcd: now using member {} ({})", self.members[at], failed.join("; "));
            }
            if status != 200 {
                bail!("etcd {url}: {status}: {}", why());
            }
            return Ok(v);
        }
        bail!("etcd {path}: no member answered: {}", failed.join("; "))
    }

    /// A lease of `ttl` seconds.
    pub fn grant(&self, ttl: u64) -> Result<i64> {
        let v = self.call("/v3/lease/grant", json!({ "TTL": ttl }))?;
        let id = int(&v["ID"]);
        if id == 0 {
            bail!("etcd granted no lease: {v}");
        }
        Ok(id)
    }

    /// Renews a lease; `false` when it has expired already.
    pub fn keepalive(&self, lease: i64) -> Result<bool> {
        let v = self.call("/v3/lease/keepalive", json!({ "ID": lease.to_string() }))?;
        Ok(int(&v["result"]["TTL"]) > 0)
    }

    pub fn get(&self, key: &str) -> Result<Option<Kv>> {
        let v = self.call("/v3/kv/range", json!({ "key": b64(key.as_bytes()) }))?;
        v["kvs"].as_array().and_then(|a| a.first()).map(kv_of).transpose()
    }

    /// Puts `value` at `key`, attached to `lease` where given; the store's revision after.
    pub fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<i64> {
        let mut body = json!({ "key": b64(key.as_bytes()), "value": b64(value) });
        if let Some(l) = lease {
            body["lease"] = json!(l.to_string());
        }
        let v = self.call("/v3/kv/put", body)?;
        Ok(int(&v["header"]["revision"]))
    }

    /// Creates `key` only where it does not exist: `Ok(revision)` of the creation, or
    /// `Err(the key as it is)`.
    pub fn create(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<std::result::Result<i64, Option<Kv>>> {
        let k = b64(key.as_bytes());
        let mut put = json!({ "key": k, "value": b64(value) });
        if let Some(l) = lease {
            put["lease"] = json!(l.to_string());
        }
        let v = self.call(
            "/v3/kv/txn",
            json!({
                "compare": [{ "key": k, "result": "EQUAL", "target": "CREATE", "create_revision": "0" }],
                "success": [{ "request_put": put }],
                "failure": [{ "request_range": { "key": k } }],
            }),
        )?;
        if v["succeeded"].as_bool() == Some(true) {
            return Ok(Ok(int(&v["header"]["revision"])));
        }
        let kv =
            v["responses"][0]["response_range"]["kvs"].as_array().and_then(|a| a.first()).map(kv_of).transpose()?;
        Ok(Err(kv))
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        self.call("/v3/kv/deleterange", json!({ "key": b64(key.as_bytes()) }))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_url_names_every_member_once() {
        let t = Duration::from_secs(1);
        let e = Etcd::new("etcd://10.0.0.1:2379, 10.0.0.2:2379,[fd00::3]:2379", t).unwrap();
        assert_eq!(e.members(), ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://[fd00::3]:2379"]);
        assert_eq!(e.endpoint(), "http://10.0.0.1:2379");
        assert_eq!(Etcd::new("http://h:1", t).unwrap().members(), ["http://h:1"]);
        for (bad, why) in [
            ("etcd://h:1,,h:2", "is not HOST:PORT"),
            ("etcd://h:1,h:1", "named twice"),
            ("etcd://h", "is not HOST:PORT"),
            ("etcd://h:1/v3", "is not HOST:PORT"),
            ("https://h:1", "expected etcd://"),
            ("etcd://", "is not HOST:PORT"),
        ] {
            let e = Etcd::new(bad, t).err().unwrap_or_else(|| panic!("{bad} taken"));
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }
}
