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

pub struct Etcd {
    base: String,
    agent: ureq::Agent,
}

impl Etcd {
    /// `etcd://HOST:PORT` (or `http://HOST:PORT`).
    pub fn new(url: &str) -> Result<Etcd> {
        let hostport = url
            .strip_prefix("etcd://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| anyhow!("--state {url:?}: expected etcd://HOST:PORT"))?;
        if hostport.is_empty() || hostport.contains('/') {
            bail!("--state {url:?}: expected etcd://HOST:PORT");
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        Ok(Etcd { base: format!("http://{hostport}"), agent })
    }

    pub fn endpoint(&self) -> &str {
        &self.base
    }

    fn call(&self, path: &str, body: Value) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut resp = self.agent.post(&url).send_json(&body).map_err(|e| anyhow!("etcd {url}: {e}"))?;
        let status = resp.status().as_u16();
        let v: Value = resp.body_mut().read_json().with_context(|| format!("etcd {url}: answer is not JSON"))?;
        if status != 200 {
            bail!("etcd {url}: {status}: {}", v["message"].as_str().or(v["error"].as_str()).unwrap_or("error"));
        }
        Ok(v)
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
