//! TLS for the control API: the node's TLS front, and what its clients trust (and, for
//! `ctl --secret-file`, the secret an operator's clients sign with).
//!
//! tiny_http speaks plain HTTP only (its own TLS support is tied to an old rustls), so a
//! node with `--tls-cert` serves its control address through a small TLS front: each
//! connection is decrypted by one thread and relayed to the API's HTTP server on a Unix
//! socket in the data dir (`control.sock`, reachable only by whoever may read the data
//! dir). At most [`CONNECTIONS_MAX`] connections are relayed at once. A client that speaks
//! plain HTTP to it gets a plain `400` saying to use https, not a TLS alert it cannot read.
//!
//! Clients (`ctl --tls-ca`, and a node with TLS calling its peers) speak https to every
//! `HOST:PORT` once [`trust`] has been called, verifying the node's certificate against
//! the given CA certificates only; an address written `https://HOST:PORT` or
//! `http://HOST:PORT` keeps its scheme.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, Result};
use nvmirror_dataplane::transport::auth::PeerSecret;
use nvmirror_dataplane::transport::tls::{self as dtls, TlsConfig};
use rustls_pki_types::CertificateDer;

/// Connections the TLS front relays at once; more are closed at accept.
pub const CONNECTIONS_MAX: usize = 64;
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes relayed per read, either way.
const RELAY_BUF_BYTES: usize = 16 * 1024;

static TRUSTED: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
static OPERATOR_SECRET: OnceLock<PeerSecret> = OnceLock::new();

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
    trusting(TRUSTED.get().map_or(&[][..], Vec::as_slice)).build()
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

/// A hint for an API call's error that TLS explains, if one does.
pub fn hint(error: &str) -> Option<&'static str> {
    if error.contains("UnknownIssuer") || error.contains("invalid peer certificate") {
        Some("the node's certificate is not signed by a CA given with --tls-ca")
    } else if error.contains("https://") && (error.contains("corrupt message") || error.contains("InvalidContentType"))
    {
        Some("the node does not serve TLS: leave out --tls-ca")
    } else {
        None
    }
}

/// Where the API's HTTP server listens behind the TLS front.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// Serves TLS on `listener`, relaying each connection to the HTTP server at `backend`,
/// until the process ends.
pub fn serve_front(listener: TcpListener, tls: TlsConfig, backend: PathBuf) {
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(stream) = conn else {
            thread::sleep(Duration::from_millis(50));
            continue;
        };
        if open.fetch_add(1, Ordering::SeqCst) >= CONNECTIONS_MAX {
            open.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let (tls, backend, open) = (tls.clone(), backend.clone(), open.clone());
        let spawned = thread::Builder::new().name("nvm-api-tls".into()).spawn(move || {
            let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
            match relay(stream, &tls, &backend) {
                // A client that went away mid-answer is no news.
                Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => {}
                Err(e) => tracing::warn!("control: TLS connection from {peer}: {e}"),
                Ok(()) => {}
            }
            open.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            tracing::warn!("control: no thread for a TLS connection");
        }
    }
}

/// Whether the first bytes of a connection are a plain HTTP request line.
fn looks_like_http(head: &[u8]) -> bool {
    [&b"GET "[..], b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC"].iter().any(|m| head.starts_with(m))
}

fn relay(mut tcp: TcpStream, tls: &TlsConfig, backend: &Path) -> io::Result<()> {
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut head = [0u8; 4];
    if tcp.peek(&mut head).is_ok_and(|n| n == head.len()) && looks_like_http(&head) {
        let body = r#"{"error":"this node's control API speaks TLS only: use https (ctl --tls-ca CA.pem)"}"#;
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        // The request head is taken first (bounded), so that closing does not reset the
        // connection before the client reads the answer.
        let mut seen = Vec::new();
        let mut chunk = [0u8; 1024];
        while seen.len() < 8192 && !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = tcp.write_all(answer.as_bytes());
        let _ = tcp.shutdown(std::net::Shutdown::Write);
        return Ok(());
    }
    let mut conn = tls.accept().map_err(io::Error::other)?;
    dtls::handshake(&mut conn, &mut tcp)?;
    tcp.set_read_timeout(None)?;
    let mut http = UnixStream::connect(backend)?;
    let mut buf = vec![0u8; RELAY_BUF_BYTES];
    // Whether the client is done sending (its end of TLS, or of TCP).
    let mut client_done = false;
    loop {
        // Plaintext rustls holds already goes first.
        loop {
            match conn.reader().read(&mut buf) {
                Ok(0) => {
                    client_done = true;
                    let _ = http.shutdown(std::net::Shutdown::Write);
                    break;
                }
                Ok(n) => http.write_all(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    client_done = true;
                    let _ = http.shutdown(std::net::Shutdown::Write);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        let mut fds = [
            libc::pollfd { fd: tcp.as_raw_fd(), events: if client_done { 0 } else { libc::POLLIN }, revents: 0 },
            libc::pollfd { fd: http.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call, and
        // both fds are the open sockets `tcp` and `http` own.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let ready = |f: &libc::pollfd| f.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
        if !client_done && ready(&fds[0]) {
            match conn.read_tls(&mut tcp) {
                Ok(0) => {
                    client_done = true;
                    let _ = http.shutdown(std::net::Shutdown::Write);
                }
                Ok(_) => {
                    conn.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    dtls::send(&mut conn, &tcp, &[])?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if ready(&fds[1]) {
            let n = match http.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                // The API closed the connection: end TLS cleanly, then TCP.
                conn.send_close_notify();
                dtls::send(&mut conn, &tcp, &[])?;
                return Ok(());
            }
            dtls::send(&mut conn, &tcp, &buf[..n])?;
        }
    }
}

/// The control API's HTTP server, and the address it answers on: plain on `addr`, or,
/// with `tls`, on the Unix socket of [`socket_path`] behind a TLS front on `addr` (started
/// here, on a thread of its own).
pub fn control_server(
    addr: std::net::SocketAddr,
    data_dir: &Path,
    tls: Option<&TlsConfig>,
) -> Result<(tiny_http::Server, std::net::SocketAddr)> {
    let listener = crate::api::control_listener(addr).map_err(|e| anyhow!("bind control address {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let Some(tls) = tls else {
        let server =
            tiny_http::Server::from_listener(listener, None).map_err(|e| anyhow!("control address {addr}: {e}"))?;
        return Ok((server, local));
    };
    std::fs::create_dir_all(data_dir)?;
    let path = socket_path(data_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow!("remove the stale {}: {e}", path.display())),
    }
    let unix = std::os::unix::net::UnixListener::bind(&path).map_err(|e| anyhow!("bind {}: {e}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    let server = tiny_http::Server::from_listener(unix, None).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let tls = tls.clone();
    thread::Builder::new().name("nvm-api-tls-accept".into()).spawn(move || serve_front(listener, tls, path))?;
    Ok((server, local))
}
