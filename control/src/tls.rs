//! What the control API's clients trust and present: the CA certificates of `ctl --tls-ca`
//! (or of the node's own `--tls-ca`), the operator certificate of `ctl --tls-cert`, and the
//! secret an operator's calls are signed with (`ctl --secret-file`). The server side of the
//! API's TLS is [`crate::api::http`].
//!
//! Clients (`ctl --tls-ca`, and a node with TLS calling its peers) speak https to every
//! `HOST:PORT` once [`trust`] has been called, verifying the node's certificate against
//! the given CA certificates only; an address written `https://HOST:PORT` or
//! `http://HOST:PORT` keeps its scheme.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use nvmirror_dataplane::transport::auth::PeerSecret;
use nvmirror_dataplane::transport::tls as dtls;
use rustls_pki_types::CertificateDer;

static TRUSTED: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
static OPERATOR_SECRET: OnceLock<PeerSecret> = OnceLock::new();
static OPERATOR_CERT: OnceLock<ureq::tls::ClientCert> = OnceLock::new();

/// From now on this process's API clients present `cert` where a node asks for one (`ctl
/// --tls-cert/--tls-key`, for a node with `--ctl-client-ca`).
pub fn present_operator_certificate(cert: &Path, key: &Path) -> Result<()> {
    let _ = OPERATOR_CERT.set(client_cert(cert, key, "--tls-cert", "--tls-key")?);
    Ok(())
}

/// A client certificate chain and its key (PEM files) as ureq presents them; `what_cert`
/// and `what_key` name the options they came from in errors.
pub fn client_cert(cert: &Path, key: &Path, what_cert: &'static str, what_key: &str) -> Result<ureq::tls::ClientCert> {
    let chain = ureq_certs(&dtls::load_certs(what_cert, cert).map_err(|e| anyhow!("{e}"))?);
    let pem = read_small(key, what_key, dtls::PEM_BYTES_MAX)?;
    let key = ureq::tls::PrivateKey::from_pem(&pem).map_err(|e| anyhow!("{what_key} {}: {e}", key.display()))?;
    Ok(ureq::tls::ClientCert::new_with_certs(&chain, key))
}

/// A small file (a key, a password): an error where it holds more than `max` bytes.
pub fn read_small(path: &Path, what: &str, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
        .with_context(|| format!("{what} {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!("{what} {}: larger than {max} bytes", path.display());
    }
    Ok(bytes)
}

/// From now on this process's API clients sign their POSTs with `secret` (`ctl
/// --secret-file`; a node signs its own node-to-node calls explicitly, and never calls
/// this).
pub fn sign_operator_calls(secret: PeerSecret) {
    let _ = OPERATOR_SECRET.set(secret);
}

/// The secret of [`sign_operator_calls`], if set.
pub fn operator_secret() -> Option<PeerSecret> {
    OPERATOR_SECRET.get().cloned()
}

/// From now on this process's API clients speak https, trusting `roots` only. The first
/// call wins (a process has one configuration).
pub fn trust(roots: Vec<CertificateDer<'static>>) {
    let _ = TRUSTED.set(roots);
}

/// Reads the CA certificates of `ctl --tls-ca` and [`trust`]s them.
pub fn trust_file(path: &Path) -> Result<()> {
    let roots = dtls::load_certs("TLS CA", path).map_err(|e| anyhow!("--tls-ca: {e}"))?;
    trust(roots);
    Ok(())
}

/// The base URL of a control address: its own scheme where written, else https where
/// [`trust`] was called, else http.
pub fn base_url(addr: &str) -> String {
    if addr.starts_with("https://") || addr.starts_with("http://") {
        return addr.trim_end_matches('/').to_string();
    }
    let scheme = if TRUSTED.get().is_some() { "https" } else { "http" };
    format!("{scheme}://{addr}")
}

/// The TLS settings of an API client: rustls (ring), verifying against the trusted CA
/// certificates (none where [`trust`] was not called: an https address then fails
/// verification, and says so).
pub fn client_tls() -> ureq::tls::TlsConfig {
    trusting(TRUSTED.get().map_or(&[][..], Vec::as_slice)).client_cert(OPERATOR_CERT.get().cloned()).build()
}

/// ureq's TLS settings of this project's https clients: rustls (ring), trusting `roots`
/// only.
pub fn trusting(roots: &[CertificateDer<'static>]) -> ureq::tls::TlsConfigBuilder {
    ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(dtls::provider())
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(ureq_certs(roots))))
}

/// Certificates as ureq takes them.
pub fn ureq_certs(certs: &[CertificateDer<'static>]) -> Vec<ureq::tls::Certificate<'static>> {
    certs.iter().map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned()).collect()
}

/// Whether a transport error is a server dropping the TLS handshake over the client's
/// certificate (none given where one is required, or one it does not trust): depending on
/// timing and version the client sees the server's alert (`BadCertificate`,
/// `CertificateRequired`) or only the connection closing under it.
pub fn refused_in_handshake(e: &str) -> bool {
    ["Broken pipe", "reset", "BadCertificate", "CertificateRequired"].iter().any(|s| e.contains(s))
}

/// A hint for an API call's error that TLS explains, if one does.
pub fn hint(error: &str) -> Option<&'static str> {
    if error.contains("UnknownIssuer") || error.contains("invalid peer certificate") {
        Some("the node's certificate is not signed by a CA given with --tls-ca")
    } else if error.contains("https://") && (error.contains("corrupt message") || error.contains("InvalidContentType"))
    {
        Some("the node does not serve TLS: leave out --tls-ca")
    } else if OPERATOR_CERT.get().is_some() && (refused_in_handshake(error) || error.contains("UnknownCA")) {
        // Under TLS 1.3 a client learns that its certificate was refused only when the
        // server's alert, or its closing, meets the request that follows the handshake.
        Some("the node refused the connection: does it trust the operator certificate of --tls-cert (its --ctl-client-ca)?")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_way_a_server_drops_a_handshake_without_a_certificate_is_recognised() {
        for e in [
            "io: received fatal alert: BadCertificate",
            "io: received fatal alert: CertificateRequired",
            "io: Broken pipe (os error 32)",
            "io: Connection reset by peer (os error 104)",
        ] {
            assert!(refused_in_handshake(e), "{e}");
        }
        assert!(!refused_in_handshake("io: Connection refused (os error 111)"));
        assert!(!refused_in_handshake("io: received fatal alert: UnknownCA"));
    }
}
