//! The API client that `nvmirror ctl` and the node's calls to its peers use: plain or
//! TLS, proven answers and signed calls.

use super::*;

/// A client of one node's control API.
pub struct Client {
    base: String,
    agent: ureq::Agent,
    /// Signs every POST ([`Client::post_signed`]) where set: an operator's `ctl
    /// --secret-file` ([`crate::tls::sign_operator_calls`]).
    secret: Option<PeerSecret>,
}

impl Client {
    pub fn new(addr: &str) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .tls_config(crate::tls::client_tls())
            .build();
        Client { base: crate::tls::base_url(addr), agent: config.into(), secret: crate::tls::operator_secret() }
    }

    fn decode<T: DeserializeOwned>(mut resp: ureq::http::Response<ureq::Body>) -> Result<T> {
        let status = resp.status().as_u16();
        let body: Value = resp.body_mut().read_json().context("response is not JSON")?;
        if status != 200 {
            let message = body.get("error").and_then(Value::as_str).unwrap_or("unknown error").to_string();
            return Err(CallError::Answered { status, message }.into());
        }
        serde_json::from_value(body).context("unexpected response shape")
    }

    /// A request that got no answer: the node is down, unreachable or not an nvmirror API.
    fn unreachable(&self, e: ureq::Error) -> anyhow::Error {
        CallError::Unreachable(format!("{}: {e}", self.base)).into()
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.agent.get(&format!("{}{path}", self.base)).call().map_err(|e| self.unreachable(e))?;
        Self::decode(resp)
    }

    /// `GET /v1/node` of a peer to pair with (or hand a volume to, or take one from). With
    /// `secret`, the peer must prove that it holds the same one; without, it must not
    /// require one.
    pub fn peer_info(&self, secret: Option<&PeerSecret>) -> Result<NodeInfo, PeerError> {
        let info: NodeInfo = self.get_proven("/v1/node", secret)?;
        if secret.is_none() && info.auth {
            return Err(PeerError::Unauthenticated(format!(
                "node {} requires authentication: start this node with the pair's --secret-file",
                info.name
            )));
        }
        Ok(info)
    }

    /// A GET whose answer, with `secret`, must carry the node's proof of it over the exact
    /// body ([`CHALLENGE_HEADER`], [`PROOF_HEADER`]); without, a plain [`Client::get`].
    pub fn get_proven<T: DeserializeOwned>(&self, path: &str, secret: Option<&PeerSecret>) -> Result<T, PeerError> {
        let Some(secret) = secret else {
            return self.get(path).map_err(PeerError::Unreachable);
        };
        let nonce = auth::fresh_nonce().map_err(|e| PeerError::Unreachable(anyhow!(e)))?;
        let mut resp = self
            .agent
            .get(&format!("{}{path}", self.base))
            .header(CHALLENGE_HEADER, auth::to_hex(&nonce))
            .call()
            .map_err(|e| PeerError::Unreachable(anyhow!("{}: {e}", self.base)))?;
        let proof = resp.headers().get(PROOF_HEADER).and_then(|v| v.to_str().ok()).and_then(auth::from_hex32);
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(PROVEN_ANSWER_MAX)
            .read_to_vec()
            .map_err(|e| PeerError::Unreachable(anyhow!("{}: read the answer: {e}", self.base)))?;
        if status != 200 {
            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
            let msg = v.get("error").and_then(Value::as_str).unwrap_or("unknown error");
            return Err(PeerError::Unreachable(anyhow!("{msg}")));
        }
        if !proof.is_some_and(|p| secret.verify_api(&nonce, &body, &p)) {
            return Err(PeerError::Unauthenticated(
                "it did not prove that it holds this node's secret (it runs without --secret-file, or with another secret)"
                    .into(),
            ));
        }
        serde_json::from_slice(&body).map_err(|e| PeerError::Unreachable(anyhow!("unexpected answer: {e}")))
    }

    /// A node-to-node POST: with `secret`, signed for a nonce the called node issues
    /// (`GET /v1/call-challenge`, then [`CALL_HEADER`]); without, a plain [`Client::post`].
    pub fn post_signed<B: Serialize, T: DeserializeOwned>(
        &self,
        secret: Option<&PeerSecret>,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let Some(secret) = secret else { return self.post(path, body) };
        let c: Value = self.get("/v1/call-challenge")?;
        let nonce = c["nonce"]
            .as_str()
            .and_then(auth::from_hex32)
            .ok_or_else(|| anyhow!("{}: a challenge without a nonce: {c}", self.base))?;
        let bytes = serde_json::to_vec(body)?;
        let proof = secret.call_proof(&nonce, "POST", path, &bytes);
        let resp = self
            .agent
            .post(&format!("{}{path}", self.base))
            .header(CALL_HEADER, format!("{} {}", auth::to_hex(&nonce), auth::to_hex(&proof)))
            .header("Content-Type", "application/json")
            .send(&bytes[..])
            .map_err(|e| self.unreachable(e))?;
        Self::decode(resp)
    }

    /// A GET whose answer is JSON lines: `line` is called with each non-empty line until
    /// the answer ends. `follow`: no time limit past connecting (a followed event stream);
    /// otherwise the client's usual one.
    pub fn get_lines(&self, path: &str, follow: bool, mut line: impl FnMut(&str)) -> Result<()> {
        use std::io::BufRead;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global((!follow).then_some(Duration::from_secs(300)))
            .tls_config(crate::tls::client_tls())
            .build()
            .into();
        let resp = agent.get(&format!("{}{path}", self.base)).call().map_err(|e| self.unreachable(e))?;
        if resp.status().as_u16() != 200 {
            return Self::decode::<Value>(resp).map(|_| ());
        }
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        for l in reader.lines() {
            let l = l.with_context(|| format!("{}: reading the stream", self.base))?;
            if !l.is_empty() {
                line(&l);
            }
        }
        Ok(())
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        if let Some(secret) = &self.secret {
            return self.post_signed(Some(secret), path, body);
        }
        let resp = self.agent.post(&format!("{}{path}", self.base)).send_json(body).map_err(|e| self.unreachable(e))?;
        Self::decode(resp)
    }
}

/// Why a call to a node's API failed, for `ctl`'s exit code ([`exit_code`]).
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No answer: the node is down, unreachable, or does not speak this API.
    #[error("{0}")]
    Unreachable(String),
    /// The node answered with an error status.
    #[error("{message}")]
    Answered { status: u16, message: String },
}

/// Found problems a check did not repair (a scrub, a verify): `ctl` exits 6.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DamageFound(pub String);

/// `ctl`'s exit code for a failure (DESIGN.md): 3 the node unreachable, 4 no such volume
/// or peer, 5 refused (an illegal transition, fenced, not authorised), 6 damage found and
/// not repaired, 2 a request the node found malformed, 1 anything else.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if cause.is::<DamageFound>() {
            return 6;
        }
        match cause.downcast_ref::<CallError>() {
            Some(CallError::Unreachable(_)) => return 3,
            Some(CallError::Answered { status: 404, .. }) => return 4,
            Some(CallError::Answered { status: 401 | 403 | 409, .. }) => return 5,
            Some(CallError::Answered { status: 400, .. }) => return 2,
            Some(CallError::Answered { .. }) => return 1,
            None => {}
        }
    }
    1
}

/// Why a peer's `GET /v1/node` did not yield a peer to pair with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    #[error("{0:#}")]
    Unreachable(anyhow::Error),
    #[error("{0}")]
    Unauthenticated(String),
}

/// Parses the address of a control API given on the command line.
pub fn parse_addr(s: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .with_context(|| format!("bad address {s:?}"))?
        .next()
        .ok_or_else(|| anyhow!("no address for {s:?}"))
}

/// A node's calls to its peers over their control API: answers proven, and node-to-node
/// POSTs signed, with the pair's secret where there is one.
pub struct HttpPeers {
    pub secret: Option<PeerSecret>,
}

impl crate::node::PeerCalls for HttpPeers {
    fn info(&self, control: &str) -> Result<NodeInfo> {
        Client::new(control).peer_info(self.secret.as_ref()).map_err(|e| anyhow!("peer {control}: {e}"))
    }
    fn status(&self, control: &str) -> Result<Value> {
        Client::new(control).get_proven("/v1/status", self.secret.as_ref()).map_err(|e| anyhow!("peer {control}: {e}"))
    }
    fn mirror(&self, control: &str, volume: &str, req: &MirrorRequest) -> Result<()> {
        let _: Value = Client::new(control).post(&format!("/v1/volumes/{volume}/mirror"), req)?;
        Ok(())
    }
    fn takeover(&self, control: &str, volume: &str, req: &TakeoverRequest) -> Result<Value> {
        Client::new(control).post_signed(self.secret.as_ref(), &format!("/v1/volumes/{volume}/takeover"), req)
    }
    fn checksums(&self, control: &str, volume: &str, source: &str, span: crate::node::SumSpan) -> Result<Vec<u32>> {
        let crate::node::SumSpan { offset, length, region } = span;
        let path =
            format!("/v1/volumes/{volume}/checksums?source={source}&offset={offset}&length={length}&region={region}");
        let v: Value =
            Client::new(control).get_proven(&path, self.secret.as_ref()).map_err(|e| anyhow!("peer {control}: {e}"))?;
        serde_json::from_value(v["sums"].clone()).map_err(|e| anyhow!("peer {control}: checksums: {e}"))
    }
    fn resize_mirror(&self, control: &str, volume: &str, source: &str, size: u64) -> Result<()> {
        let req = ResizeRequest { size, mirror_of: Some(source.to_string()) };
        let _: Value =
            Client::new(control).post_signed(self.secret.as_ref(), &format!("/v1/volumes/{volume}/resize"), &req)?;
        Ok(())
    }
    fn delete_mirror(&self, control: &str, volume: &str, source: &str) -> Result<()> {
        let req = DeleteRequest { force: true, mirror_of: Some(source.to_string()) };
        let _: Value =
            Client::new(control).post_signed(self.secret.as_ref(), &format!("/v1/volumes/{volume}/delete"), &req)?;
        Ok(())
    }
}
