//! TLS (RFC 8446, through rustls with the ring provider) for the replication engine and the
//! control API: the node's certificate and key (`--tls-cert`, `--tls-key`), and the
//! certificates it trusts for its peers (`--tls-ca`).
//!
//! A node with TLS serves TLS only, and opens TLS to its peers, verifying their
//! certificates against the trusted set: by default the certificates of `--tls-cert`
//! itself (enough where both nodes share one certificate, or where the file carries the CA
//! after the node's own certificate). A certificate must name the address its peers dial
//! (an IP address or DNS subject alternative name). Clients are not asked for
//! certificates: a source proves itself with the pair's secret (`auth.rs`) inside the TLS
//! connection, and operators with the control API's signatures.
//!
//! The source's poller reads a TLS connection without waiting, as it reads a plain socket:
//! [`DontWait`] hands rustls the socket through `recv(MSG_DONTWAIT)`.

use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use thiserror::Error;

/// The largest PEM file a node reads (certificates and keys are a few KiB).
pub const PEM_BYTES_MAX: u64 = 1 << 20;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("{what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: io::Error },
    #[error("{what} {path}: {reason}")]
    Pem { what: &'static str, path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("{0:?} is not a name a certificate can hold (an IP address or a DNS name)")]
    ServerName(String),
}

/// The crypto provider of every TLS connection here.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let err = |source| TlsError::Read { what, path: path.to_path_buf(), source };
    let mut bytes = Vec::new();
    fs::File::open(path).map_err(err)?.take(PEM_BYTES_MAX + 1).read_to_end(&mut bytes).map_err(err)?;
    if bytes.len() as u64 > PEM_BYTES_MAX {
        return Err(TlsError::Pem {
            what,
            path: path.to_path_buf(),
            reason: format!("larger than {PEM_BYTES_MAX} bytes"),
        });
    }
    Ok(bytes)
}

/// The certificates of a PEM file, in order; an error where it holds none.
pub fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what, path: path.to_path_buf(), reason: "no CERTIFICATE in it".into() });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let what = "TLS key";
    let pem = read_pem(what, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// A client configuration that trusts `roots` only.
pub fn client_config(roots: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in roots {
        store.add(c.clone())?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The names a certificate holds, for an allow-list or an operator's identity: its subject
/// alternative DNS names, then its common names. A certificate that does not parse holds
/// none.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else { return Vec::new() };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push((*d).to_string());
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            names.push(cn.to_string());
        }
    }
    names
}

/// A node's TLS: how it serves and how it verifies its peers. Cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    roots: Arc<Vec<CertificateDer<'static>>>,
    /// The node's own chain and key, for the NBD port's configuration.
    chain: Arc<Vec<CertificateDer<'static>>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig(..)")
    }
}

impl TlsConfig {
    /// Reads the node's certificate chain and key, and the certificates it trusts for its
    /// peers (`ca`; by default those of `cert`).
    pub fn from_files(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<TlsConfig, TlsError> {
        let chain = load_certs("TLS certificate", cert)?;
        let key = load_key(key)?;
        let roots = match ca {
            Some(ca) => load_certs("TLS CA", ca)?,
            None => chain.clone(),
        };
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key.clone_key())?;
        Ok(TlsConfig {
            server: Arc::new(server),
            client: client_config(&roots)?,
            roots: Arc::new(roots),
            chain: Arc::new(chain),
            key: Arc::new(key),
        })
    }

    /// The NBD port's server configuration: the node's certificate, and where `client_ca`
    /// is given, a client certificate signed by one of its certificates required of every
    /// client (`--nbd-client-ca`).
    pub fn nbd_server(&self, client_ca: Option<&[CertificateDer<'static>]>) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_verifying(client_ca, true)
    }

    /// The control API's server configuration: the node's certificate, and where
    /// `operator_ca` is given, a client certificate asked of every client and verified
    /// against it where one is offered (`--ctl-client-ca`); a client without one (a peer
    /// node, `ctl` without `--tls-cert`) is served as before.
    pub fn api_server(&self, operator_ca: Option<&[CertificateDer<'static>]>) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_verifying(operator_ca, false)
    }

    fn server_verifying(
        &self,
        client_ca: Option<&[CertificateDer<'static>]>,
        required: bool,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut store = RootCertStore::empty();
                for c in ca {
                    store.add(c.clone())?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider());
                let verifier = if required { verifier } else { verifier.allow_unauthenticated() };
                builder.with_client_cert_verifier(verifier.build().map_err(|e| TlsError::Verifier(e.to_string()))?)
            }
        };
        Ok(Arc::new(builder.with_single_cert(self.chain.to_vec(), self.key.clone_key())?))
    }

    pub fn server(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    pub fn client(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// The certificates trusted for peers.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// A client connection to `target` (`HOST:PORT`), verified against HOST.
    pub fn connect(&self, target: &str) -> Result<ClientConnection, TlsError> {
        let name = server_name(target)?;
        Ok(ClientConnection::new(self.client(), name)?)
    }

    pub fn accept(&self) -> Result<ServerConnection, TlsError> {
        Ok(ServerConnection::new(self.server())?)
    }
}

/// The host of `HOST:PORT` (`[V6]:PORT` too) as the name its certificate must hold.
pub fn server_name(target: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match target.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => target,
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName(host.to_string()))
}

/// Runs a TLS handshake to its end on a blocking socket (its timeouts bound it); a failure
/// names the flags of replication and the control API that explain it.
pub fn handshake<D, S: Read + Write>(conn: &mut rustls::ConnectionCommon<D>, stream: &mut S) -> io::Result<()> {
    handshake_explained(conn, stream, |e| {
        let untrusted = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
        let why = if untrusted {
            format!("TLS handshake: {e} (is the peer's CA in --tls-ca?)")
        } else {
            format!("TLS handshake: {e} (does the peer run with TLS, --tls-cert?)")
        };
        io::Error::new(e.kind(), why)
    })
}

/// As [`handshake`], with `explain` turning rustls's error into the one returned, after
/// the alert rustls queued has told the peer why (a plain peer sees TLS bytes).
pub fn handshake_explained<D, S: Read + Write>(
    conn: &mut rustls::ConnectionCommon<D>,
    stream: &mut S,
    explain: impl FnOnce(io::Error) -> io::Error,
) -> io::Result<()> {
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(stream) {
            while conn.wants_write() {
                if conn.write_tls(stream).is_err() {
                    break;
                }
            }
            return Err(explain(e));
        }
    }
    Ok(())
}

/// Encrypts `data` and writes it out, blocking (within the socket's timeout) while the
/// peer does not read; rustls's own bounded buffer is drained after each piece.
pub fn send<D, W: Write>(conn: &mut rustls::ConnectionCommon<D>, mut stream: W, mut data: &[u8]) -> io::Result<()> {
    loop {
        while conn.wants_write() {
            conn.write_tls(&mut stream)?;
        }
        if data.is_empty() {
            return Ok(());
        }
        let n = conn.writer().write(data)?;
        data = &data[n..];
    }
}

/// A socket read and written without waiting (`MSG_DONTWAIT`), whatever the socket's own
/// mode: a read with nothing there, or a write with no room, is `WouldBlock`.
pub struct DontWait<'a>(pub &'a TcpStream);

impl Read for DontWait<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid and writable for `buf.len()` bytes during the call, and
        // the fd is the open socket the borrowed TcpStream owns.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.unsigned_abs())
    }
}

impl Write for DontWait<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes during the call, and the fd
        // is the open socket the borrowed TcpStream owns.
        let n = unsafe {
            libc::send(self.0.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.unsigned_abs())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Test certificates, made at run time (no key is ever committed).
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};

    /// A CA, and a certificate it signed for 127.0.0.1 and localhost, written to `dir`:
    /// (ca.pem, cert.pem, key.pem).
    pub fn write_pair(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, "nvmirror test CA");
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let paths = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&paths.0, ca.pem()).unwrap();
        std::fs::write(&paths.1, cert.pem()).unwrap();
        std::fs::write(&paths.2, key.serialize_pem()).unwrap();
        paths
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        assert!(matches!(server_name("127.0.0.1:7000").unwrap(), ServerName::IpAddress(_)));
        assert!(matches!(server_name("[::1]:7000").unwrap(), ServerName::IpAddress(_)));
        assert!(matches!(server_name("node-b.example:7000").unwrap(), ServerName::DnsName(_)));
        assert!(server_name("bad name:1").is_err());
    }

    #[test]
    fn files() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = testing::write_pair(dir.path());
        TlsConfig::from_files(&cert, &key, Some(&ca)).unwrap();
        let e = TlsConfig::from_files(&cert, &dir.path().join("none"), Some(&ca)).unwrap_err().to_string();
        assert!(e.contains("TLS key") && e.contains("none"), "{e}");
        let e = TlsConfig::from_files(&key, &key, None).unwrap_err().to_string();
        assert!(e.contains("no CERTIFICATE"), "{e}");
        let e = TlsConfig::from_files(&cert, &cert, None).unwrap_err().to_string();
        assert!(e.contains("TLS key"), "{e}");
    }
}
