//! A small etcd v3 client over etcd's JSON gateway (`/v3/...`, in etcd 3.4 and later):
//! leases, gets, puts, a create-if-absent and a delete — what the fleet mode needs, with
//! no gRPC stack. Keys and values travel base64-encoded; 64-bit integers come back as
//! strings, as the gateway writes them.
//!
//! Security ([`EtcdSecurity`]): `etcds://` members are reached over https, verified
//! against a CA (`--etcd-ca`), with a client certificate where etcd asks for one
//! (`--etcd-cert`, `--etcd-key`: etcd's `--client-cert-auth`); and where etcd has auth
//! enabled, as a user (`--etcd-user`, `--etcd-password-file`): the client authenticates
//! for a token, sends it with every request, and authenticates again when etcd no longer
//! knows it (a restarted member, an expired simple token).

use std::path::PathBuf;
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
    /// `http://HOST:PORT` or `https://HOST:PORT`, one per member.
    members: Vec<String>,
    /// The member tried first: the last one that answered.
    current: std::sync::atomic::AtomicUsize,
    agent: ureq::Agent,
    /// User and password, where etcd has auth enabled.
    credentials: Option<(String, String)>,
    /// The token of the last authentication.
    token: parking_lot::Mutex<Option<String>>,
    /// Over https, and with a client certificate: for the hint of a refused connection.
    https: bool,
    client_cert: bool,
}

/// How a node reaches etcd: the files and names of `--etcd-ca`, `--etcd-cert`,
/// `--etcd-key`, `--etcd-user` and `--etcd-password-file`.
#[derive(Debug, Clone, Default)]
pub struct EtcdSecurity {
    /// The CA certificates (PEM) etcd's server certificates are checked against; required
    /// for `etcds://`.
    pub ca: Option<PathBuf>,
    /// A client certificate chain and its key (PEM), for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    /// A file holding the user's password (one trailing newline is ignored).
    pub password_file: Option<PathBuf>,
}

/// The largest answer read from etcd (a range of one key, a lease).
const ANSWER_BYTES_MAX: u64 = 16 << 20;

/// The largest password file read.
const PASSWORD_BYTES_MAX: u64 = 4096;

impl EtcdSecurity {
    /// ureq's TLS settings for `etcds://`: rustls (ring), trusting the CA only, with the
    /// client certificate where given.
    fn tls(&self) -> Result<ureq::tls::TlsConfig> {
        use nvmirror_dataplane::transport::tls::load_certs;
        let ca = self.ca.as_ref().ok_or_else(|| anyhow!("etcds:// needs --etcd-ca, the CA of etcd's certificates"))?;
        let roots = load_certs("--etcd-ca", ca).map_err(|e| anyhow!("{e}"))?;
        let mut builder = crate::tls::trusting(&roots);
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                builder = builder.client_cert(Some(crate::tls::client_cert(cert, key, "--etcd-cert", "--etcd-key")?));
            }
            (None, None) => {}
            _ => bail!("--etcd-cert and --etcd-key go together"),
        }
        Ok(builder.build())
    }

    fn credentials(&self) -> Result<Option<(String, String)>> {
        match (&self.user, &self.password_file) {
            (Some(user), Some(file)) => {
                let bytes = crate::tls::read_small(file, "--etcd-password-file", PASSWORD_BYTES_MAX)?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| anyhow!("--etcd-password-file {}: not UTF-8", file.display()))?;
                let password = text.strip_suffix('\n').unwrap_or(&text).to_string();
                if password.is_empty() {
                    bail!("--etcd-password-file {}: empty", file.display());
                }
                Ok(Some((user.clone(), password)))
            }
            (None, None) => Ok(None),
            _ => bail!("--etcd-user and --etcd-password-file go together"),
        }
    }
}

/// etcd's reason, with what to do where it is not plain.
fn explained(why: &str) -> String {
    if why.contains("CommonName") {
        format!(
            "{why} (etcd's JSON gateway, which nodes use, refuses a client certificate with a common name: give \
             --etcd-cert one without)"
        )
    } else {
        why.to_string()
    }
}

/// The longest one request may take at one member.
pub const REQUEST_TIMEOUT_MAX: Duration = Duration::from_secs(5);

impl Etcd {
    /// `etcd://HOST:PORT[,HOST:PORT...]` (or `http://...`), each request bounded by
    /// `timeout` per member (kept below the lease's time to live by the caller, so that a
    /// member that does not answer leaves time to renew through another).
    pub fn new(url: &str, timeout: Duration) -> Result<Etcd> {
        Self::secured(url, timeout, &EtcdSecurity::default())
    }

    /// As [`Etcd::new`], with `etcds://HOST:PORT[,...]` (or `https://`) for https, and the
    /// CA, client certificate and user of `security`.
    pub fn secured(url: &str, timeout: Duration, security: &EtcdSecurity) -> Result<Etcd> {
        let (scheme, list) = if let Some(l) = url.strip_prefix("etcd://").or_else(|| url.strip_prefix("http://")) {
            ("http", l)
        } else if let Some(l) = url.strip_prefix("etcds://").or_else(|| url.strip_prefix("https://")) {
            ("https", l)
        } else {
            bail!("--state {url:?}: expected etcd://HOST:PORT[,HOST:PORT...] (or etcds:// for https)")
        };
        if scheme == "http" && (security.ca.is_some() || security.cert.is_some()) {
            bail!("--state {url:?}: --etcd-ca and --etcd-cert are for https: name the members etcds://HOST:PORT");
        }
        let members: Vec<String> = list.split(',').map(|m| format!("{scheme}://{}", m.trim())).collect();
        for (m, given) in members.iter().zip(list.split(',')) {
            let given = given.trim();
            if given.is_empty() || given.contains('/') || !given.contains(':') {
                bail!("--state {url:?}: member {given:?} is not HOST:PORT (expected etcd://HOST:PORT[,HOST:PORT...])");
            }
            if members.iter().filter(|o| *o == m).count() > 1 {
                bail!("--state {url:?}: member {given} is named twice");
            }
        }
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout.min(REQUEST_TIMEOUT_MAX)));
        if scheme == "https" {
            config = config.tls_config(security.tls()?);
        }
        Ok(Etcd {
            members,
            current: std::sync::atomic::AtomicUsize::new(0),
            agent: config.build().into(),
            credentials: security.credentials()?,
            token: parking_lot::Mutex::new(None),
            https: scheme == "https",
            client_cert: security.cert.is_some(),
        })
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
    pub fn call(&self, path: &str, body: Value) -> Result<Value> {
        use std::sync::atomic::Ordering;
        let first = self.current.load(Ordering::Relaxed);
        let mut failed = Vec::new();
        for i in 0..self.members.len() {
            let at = (first + i) % self.members.len();
            let url = format!("{}{path}", self.members[at]);
            let (status, v) = match self.post_authenticated(at, &url, &body) {
                Ok(answer) => answer,
                Err(e) if self.https && !self.client_cert && crate::tls::refused_in_handshake(&e) => {
                    failed.push(format!("{e} (does etcd require a client certificate? --etcd-cert, --etcd-key)"));
                    continue;
                }
                Err(e) => {
                    failed.push(e);
                    continue;
                }
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
                bail!("etcd {url}: {status}: {}", explained(&why()));
            }
            return Ok(v);
        }
        bail!("etcd {path}: no member answered: {}", failed.join("; "))
    }

    /// Posts to member `at` with the current token (authenticating first where there is
    /// none, and again once where etcd no longer knows it): the status and the JSON
    /// answer, or why the member did not answer.
    fn post_authenticated(&self, at: usize, url: &str, body: &Value) -> std::result::Result<(u16, Value), String> {
        let member = &self.members[at];
        for attempt in 0..2 {
            let token = match &self.credentials {
                None => None,
                Some(_) => {
                    // Not in the match below: its guard would live through authenticate.
                    let cached = self.token.lock().clone();
                    match cached {
                        Some(t) if attempt == 0 => Some(t),
                        _ => Some(self.authenticate(at)?),
                    }
                }
            };
            let (status, v) = self.post(url, body, token.as_deref()).map_err(|e| format!("{member}: {e}"))?;
            // etcd answers an unknown token with gRPC's Unauthenticated (HTTP 401).
            let stale = status == 401 || v["message"].as_str().is_some_and(|m| m.contains("invalid auth token"));
            if stale && self.credentials.is_some() && attempt == 0 {
                *self.token.lock() = None;
                continue;
            }
            return Ok((status, v));
        }
        unreachable!("the second attempt returns")
    }

    /// Authenticates at member `at`, keeping the token.
    fn authenticate(&self, at: usize) -> std::result::Result<String, String> {
        let member = &self.members[at];
        let (user, password) = self.credentials.as_ref().expect("authenticate only with credentials");
        let url = format!("{member}/v3/auth/authenticate");
        let (status, v) = self
            .post(&url, &json!({ "name": user, "password": password }), None)
            .map_err(|e| format!("{member}: {e}"))?;
        match v["token"].as_str() {
            Some(t) if status == 200 && !t.is_empty() => {
                *self.token.lock() = Some(t.to_string());
                Ok(t.to_string())
            }
            _ => Err(format!(
                "{member}: authenticating as {user:?}: {status}: {}",
                explained(v["message"].as_str().or(v["error"].as_str()).unwrap_or("no token"))
            )),
        }
    }

    /// One POST: the status and the JSON answer (a 5xx without JSON is an error).
    fn post(&self, url: &str, body: &Value, token: Option<&str>) -> Result<(u16, Value)> {
        let mut req = self.agent.post(url);
        if let Some(t) = token {
            req = req.header("Authorization", t);
        }
        let mut resp = req.send_json(body)?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().with_config().limit(ANSWER_BYTES_MAX).read_to_string()?;
        match serde_json::from_str::<Value>(&text) {
            Ok(v) => Ok((status, v)),
            Err(e) if status >= 500 => bail!("{status} ({e})"),
            // An error in plain text (the gateway's, for one): its words are the reason.
            Err(_) if status != 200 => Ok((status, json!({ "message": text.trim() }))),
            Err(e) => bail!("answer of {status} is not JSON: {e}"),
        }
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

    /// An etcd gateway stand-in with auth: tokens `t1`, `t2`... in turn, of which only the
    /// last is valid; a request with another answers 401 "invalid auth token", as etcd
    /// does once it dropped a token (a password change, an expired simple token).
    fn fake_etcd() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let server = tiny_http::Server::http("127.0.0.1:0").expect("bind");
        let addr = server.server_addr().to_ip().expect("ip");
        let issued = std::sync::Arc::new(AtomicUsize::new(0));
        let count = issued.clone();
        std::thread::spawn(move || {
            for mut req in server.incoming_requests() {
                let mut body = String::new();
                let _ = std::io::Read::read_to_string(req.as_reader(), &mut body);
                let token = req.headers().iter().find(|h| h.field.equiv("Authorization")).map(|h| h.value.to_string());
                let (status, answer) = if req.url() == "/v3/auth/authenticate" {
                    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                    if v["password"] == "pw" {
                        (200, json!({ "token": format!("t{}", count.fetch_add(1, Ordering::SeqCst) + 1) }))
                    } else {
                        (400, json!({ "message": "etcdserver: authentication failed, invalid user ID or password" }))
                    }
                } else if token == Some(format!("t{}", count.load(Ordering::SeqCst))) {
                    (200, json!({ "header": { "revision": "7" } }))
                } else {
                    (
                        401,
                        json!({ "error": "etcdserver: invalid auth token", "code": 16, "message": "etcdserver: invalid auth token" }),
                    )
                };
                let _ = req.respond(tiny_http::Response::from_string(answer.to_string()).with_status_code(status));
            }
        });
        (format!("etcd://{addr}"), issued)
    }

    #[test]
    fn a_token_etcd_no_longer_knows_is_taken_again() {
        use std::sync::atomic::Ordering;
        let (url, issued) = fake_etcd();
        let dir = tempfile::tempdir().expect("tempdir");
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "pw\n").expect("password file");
        let security = EtcdSecurity { user: Some("nvm".into()), password_file: Some(pw), ..Default::default() };
        let etcd = Etcd::secured(&url, Duration::from_secs(2), &security).expect("client");
        assert!(etcd.get("/k").expect("a get, authenticated").is_none());
        assert_eq!(issued.load(Ordering::SeqCst), 1, "authenticated once");
        assert_eq!(etcd.put("/k", b"v", None).expect("a put with the same token"), 7);
        assert_eq!(issued.load(Ordering::SeqCst), 1, "the token is kept");
        // etcd drops it (here: a new one was issued to someone else).
        issued.fetch_add(1, Ordering::SeqCst);
        assert_eq!(etcd.put("/k", b"v", None).expect("a put after the token was dropped"), 7);
        assert_eq!(issued.load(Ordering::SeqCst), 3, "authenticated again, once");

        std::fs::write(dir.path().join("bad"), "guess").expect("password file");
        let wrong = EtcdSecurity { password_file: Some(dir.path().join("bad")), ..security };
        let e = Etcd::secured(&url, Duration::from_secs(2), &wrong).expect("client").get("/k").expect_err("refused");
        assert!(e.to_string().contains("authenticating as \"nvm\": 400: etcdserver: authentication failed"), "{e:#}");
    }

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
            ("ftp://h:1", "expected etcd://"),
            ("etcd://", "is not HOST:PORT"),
        ] {
            let e = Etcd::new(bad, t).err().unwrap_or_else(|| panic!("{bad} taken"));
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
        let e = Etcd::new("etcds://h:1", t).err().expect("https without a CA");
        assert!(e.to_string().contains("--etcd-ca"), "{e}");
        let with_ca = EtcdSecurity { ca: Some("/nonexistent/ca.pem".into()), ..Default::default() };
        let e = Etcd::secured("etcd://h:1", t, &with_ca).err().expect("a CA for http");
        assert!(e.to_string().contains("etcds://"), "{e}");
        let half = EtcdSecurity { user: Some("u".into()), ..Default::default() };
        let e = Etcd::secured("etcd://h:1", t, &half).err().expect("a user without a password");
        assert!(e.to_string().contains("go together"), "{e}");
    }
}
