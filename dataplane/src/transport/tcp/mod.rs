//! The TCP engine.
//!
//! Source side: the volume's poller writes frames straight from its NVLog with one
//! `writev` per batch, and busy-polls the socket for the destination's replies with
//! non-blocking reads: no thread sits between the poller and the connection. Destination
//! side: one thread per connection reads whatever has arrived, hands every whole frame to
//! the mirror's handler (which copies entries into the mapped log file), and commits once
//! the input is drained: one persist and one ack for the whole batch (group commit).
//!
//! [`LinkSecurity`] adds, on both ends: the pair's secret, with which each end
//! authenticates the other before the hello is acted on (the challenge-response of
//! `README.md`, "Authentication"), and TLS around the whole connection (`tls.rs`). With
//! TLS the source's poller still reads without waiting (rustls is fed by
//! `recv(MSG_DONTWAIT)`), and the destination's reader decrypts under the connection's
//! lock, never holding it while it waits for the socket.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use parking_lot::Mutex;
use rustls::{ClientConnection, ServerConnection};

use super::auth::{self, PeerSecret};
use super::tls::{handshake as tls_handshake, send as tls_send, DontWait};
use super::wire::{self, entries_prefix, Message, FRAME_HEADER_BYTES};
use super::{
    ConnectError, Connector, Hello, Link, LinkError, LinkEvent, LinkSecurity, MirrorDirectory, RefuseCode, Reply,
    ReplySink, Welcome,
};

mod connect;
mod serve;

pub use connect::{TcpConnector, TcpLink};
pub use serve::{serve, serve_connection};

/// How long a connect or a hello may take, and how long a send may block on a peer that
/// does not read.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A replication connection whose peer went away without closing it (a lost host, a cut
/// cable: nothing comes back, not even a reset) ends within about [`DEAD_PEER`]: the kernel
/// probes a silent connection after 2 s, every second, and gives up after 8 probes
/// unanswered, or once data it sent has gone unacknowledged that long (as long as a send
/// may block, [`IO_TIMEOUT`]). A live peer's kernel answers the probes even while its
/// process is stopped. Without this, a mirror would hold an idle source's connection (and
/// believe it alive) for hours.
pub const DEAD_PEER: Duration = IO_TIMEOUT;

/// Sets [`DEAD_PEER`]'s keepalive and user timeout on `stream`.
pub(crate) fn detect_dead_peer(stream: &TcpStream) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| -> io::Result<()> {
        // SAFETY: `fd` is the open socket `stream` owns, and `value` a c_int that lives
        // through the call, whose size is passed.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                std::ptr::from_ref(&value).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).expect("small"),
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 2)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 8)?;
    let user_timeout_ms = libc::c_int::try_from(DEAD_PEER.as_millis()).expect("small");
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, user_timeout_ms)
}

/// The largest hello or welcome: strings are bounded, so a first frame above this is
/// refused before its body is read.
const FIRST_FRAME_BODY_MAX: usize = 4096;

/// Whether a frame header's first bytes are a TLS record's (handshake or alert, TLS 1.x):
/// a peer that speaks TLS to a node that does not, or the other way round.
fn looks_like_tls(header: &[u8]) -> bool {
    matches!(header, [0x15 | 0x16, 0x03, ..])
}

fn read_frame(stream: &mut impl Read, buf: &mut Vec<u8>, body_max: usize) -> io::Result<()> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    stream.read_exact(&mut header)?;
    let (_, len) = wire::decode_header(&header).map_err(|e| {
        if looks_like_tls(&header) {
            io::Error::new(io::ErrorKind::InvalidData, "the peer speaks TLS, and this end does not (--tls-cert)")
        } else {
            io::Error::new(io::ErrorKind::InvalidData, e)
        }
    })?;
    if len > body_max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame body of {len} bytes where at most {body_max} fit"),
        ));
    }
    buf.clear();
    buf.extend_from_slice(&header);
    buf.resize(FRAME_HEADER_BYTES + len, 0);
    stream.read_exact(&mut buf[FRAME_HEADER_BYTES..])
}

/// `write_all` over several slices with one `writev` in the common case.
trait WriteAllVectored {
    fn write_all_vectored_compat(&mut self, bufs: &mut [IoSlice<'_>]) -> io::Result<()>;
}

impl WriteAllVectored for TcpStream {
    fn write_all_vectored_compat(&mut self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match self.write_vectored(bufs) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "failed to write whole buffer")),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{FrameHandler, Intent};
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    /// Both ends of a link find a peer that went away silently: keepalive probes and a
    /// user timeout, read back from the sockets.
    #[test]
    fn replication_sockets_probe_a_silent_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let out = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (inn, _) = listener.accept().unwrap();
        for s in [&out, &inn] {
            detect_dead_peer(s).unwrap();
            let get = |level: libc::c_int, name: libc::c_int| {
                let mut v: libc::c_int = 0;
                let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap();
                // SAFETY: a valid socket, and a c_int buffer whose size is passed.
                let r = unsafe {
                    libc::getsockopt(s.as_raw_fd(), level, name, std::ptr::from_mut(&mut v).cast(), &mut len)
                };
                assert_eq!(r, 0, "{}", io::Error::last_os_error());
                v
            };
            assert_eq!(get(libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
            let (idle, intvl, cnt) = (
                get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
                get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
                get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
            );
            assert_eq!(u64::try_from(idle + intvl * cnt).unwrap(), DEAD_PEER.as_secs());
            assert_eq!(u128::try_from(get(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT)).unwrap(), DEAD_PEER.as_millis());
        }
    }

    /// A directory that welcomes every hello it is given and counts them.
    #[derive(Default)]
    struct Counting {
        attached: AtomicUsize,
        refused: Mutex<Vec<(String, String)>>,
    }

    struct Noop;

    impl FrameHandler for Noop {
        fn on_message(&mut self, _: Message<'_>) -> Result<(), crate::transport::HandlerError> {
            Ok(())
        }
        fn commit(&mut self) -> Result<(), crate::transport::HandlerError> {
            Ok(())
        }
    }

    impl MirrorDirectory for Counting {
        fn attach(
            &self,
            _: &Hello,
            _: Arc<dyn ReplySink>,
        ) -> Result<(Box<dyn FrameHandler>, Welcome), (RefuseCode, String)> {
            self.attached.fetch_add(1, Ordering::SeqCst);
            Ok((Box::new(Noop), welcome()))
        }
        fn peer_refused(&self, peer: &str, reason: &str) {
            self.refused.lock().push((peer.to_string(), reason.to_string()));
        }
    }

    fn welcome() -> Welcome {
        Welcome { epoch: 1, ..Welcome::default() }
    }

    fn hello() -> Hello {
        Hello {
            source_node: "a".into(),
            volume: "vol".into(),
            volume_id: 1,
            epoch: 1,
            volume_bytes: 1 << 20,
            partition_bytes: 1 << 20,
            intent: Intent::Baseline,
            base_seq: 1,
            base_cp_gen: 1,
            features: 0,
        }
    }

    fn secret(s: &str) -> LinkSecurity {
        LinkSecurity { secret: Some(PeerSecret::new(s.as_bytes()).unwrap()), tls: None }
    }

    /// A destination on loopback: its address and its directory.
    fn destination(security: LinkSecurity) -> (String, Arc<Counting>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let dir = Arc::new(Counting::default());
        let d: Arc<dyn MirrorDirectory> = dir.clone();
        thread::spawn(move || serve(listener, d, Arc::new(AtomicBool::new(false)), security));
        (addr, dir)
    }

    /// Waits (bounded) for the directory to hear of `n` refusals.
    fn refusals(dir: &Counting, n: usize) -> Vec<(String, String)> {
        let start = Instant::now();
        while dir.refused.lock().len() < n && start.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(5));
        }
        dir.refused.lock().clone()
    }

    fn refused_reason(r: Result<(TcpLink, Welcome), ConnectError>) -> String {
        match r {
            Err(ConnectError::Refused { code: RefuseCode::Unauthenticated, reason, .. }) => reason,
            Err(e) => panic!("expected a refusal as unauthenticated, got {e}"),
            Ok(_) => panic!("expected a refusal as unauthenticated, got a welcome"),
        }
    }

    fn unauthenticated_reason(r: Result<(TcpLink, Welcome), ConnectError>) -> String {
        match r {
            Err(ConnectError::Unauthenticated { reason, .. }) => reason,
            Err(e) => panic!("expected the destination unauthenticated, got {e}"),
            Ok(_) => panic!("a destination that did not authenticate was believed"),
        }
    }

    #[test]
    fn the_same_secret_or_none_on_both_sides_connects() {
        for s in [LinkSecurity::default(), secret("k")] {
            let (addr, dir) = destination(s.clone());
            let (_link, w) = TcpConnector::new(s).connect(&addr, &hello()).unwrap();
            assert_eq!(w, welcome());
            assert_eq!(dir.attached.load(Ordering::SeqCst), 1);
            assert!(dir.refused.lock().is_empty());
        }
    }

    #[test]
    fn a_destination_with_a_secret_refuses_sources_without_it() {
        let (addr, dir) = destination(secret("k"));
        let r = refused_reason(TcpConnector::default().connect(&addr, &hello()));
        assert!(r.contains("this node requires authentication"), "{r}");
        let r = refused_reason(TcpConnector::new(secret("not k")).connect(&addr, &hello()));
        assert!(r.contains("wrong secret"), "{r}");
        // Each connection is refused on its own thread: the two may be recorded in either order.
        let seen = refusals(&dir, 2);
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen.iter().any(|(_, why)| why.contains("peer did not authenticate")), "{seen:?}");
        assert!(seen.iter().any(|(_, why)| why.contains("wrong secret")), "{seen:?}");
        assert!(seen.iter().all(|(peer, _)| peer.starts_with("127.0.0.1:")), "{seen:?}");
        assert_eq!(dir.attached.load(Ordering::SeqCst), 0, "a refused peer reached the directory");
    }

    #[test]
    fn a_source_with_a_secret_refuses_a_destination_without_it() {
        let (addr, dir) = destination(LinkSecurity::default());
        let r = unauthenticated_reason(TcpConnector::new(secret("k")).connect(&addr, &hello()));
        assert!(r.contains("peer did not authenticate") && r.contains("has no shared secret"), "{r}");
        assert_eq!(dir.attached.load(Ordering::SeqCst), 0);
        let seen = refusals(&dir, 1);
        assert!(seen[0].1.contains("asked to authenticate"), "{seen:?}");
    }

    /// A destination that goes through the motions without the secret: it answers the
    /// request with `challenge`, reads the hello and the proof, then answers with `answer`
    /// (its frames, raw).
    fn rogue(challenge: Vec<u8>, answer: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            read_frame(&mut s, &mut buf, FIRST_FRAME_BODY_MAX).unwrap();
            s.write_all(&challenge).unwrap();
            if read_frame(&mut s, &mut buf, FIRST_FRAME_BODY_MAX).is_ok() {
                read_frame(&mut s, &mut buf, FIRST_FRAME_BODY_MAX).unwrap();
                s.write_all(&answer).unwrap();
            }
            let _ = s.read(&mut [0u8; 1]);
        });
        addr
    }

    #[test]
    fn a_source_with_a_secret_refuses_a_destination_that_cannot_prove_it() {
        let challenge = Message::AuthChallenge { nonce: [5; 32] }.encode();
        let w = Message::Welcome(welcome()).encode();
        let mut forged = Message::AuthProof { proof: [9; 32] }.encode();
        forged.extend_from_slice(&w);
        let stale = Message::Refuse { code: RefuseCode::StaleEpoch, reason: "failed over".into() }.encode();
        let mismatch = Message::Refuse { code: RefuseCode::Mismatch, reason: "start over".into() }.encode();
        // A proof made with the right secret for another answer: the welcome was swapped.
        let k = PeerSecret::new(b"k").unwrap();
        let mut swapped = Message::AuthProof { proof: k.destination_proof(&[0; 32], &[5; 32], b"", &stale) }.encode();
        swapped.extend_from_slice(&w);
        for (challenge, answer, want) in [
            (challenge.clone(), forged, "wrong secret"),
            (challenge.clone(), swapped, "wrong secret"),
            (challenge.clone(), w.clone(), "without proving"),
            (challenge.clone(), stale.clone(), "without proving"),
            // Unproven refusals before the challenge: never a fence, never a baseline.
            (stale, Vec::new(), "peer did not authenticate"),
            (mismatch, Vec::new(), "peer did not authenticate"),
            (w, Vec::new(), "expected its challenge"),
        ] {
            let addr = rogue(challenge, answer);
            let r = unauthenticated_reason(TcpConnector::new(secret("k")).connect(&addr, &hello()));
            assert!(r.contains(want), "{r}");
        }
    }

    /// A raw source: the authentication request with `client_nonce`, then the challenge.
    fn challenge(s: &mut TcpStream, client_nonce: auth::Nonce) -> auth::Nonce {
        s.write_all(&Message::AuthRequest { nonce: client_nonce }.encode()).unwrap();
        let mut buf = Vec::new();
        read_frame(s, &mut buf, FIRST_FRAME_BODY_MAX).unwrap();
        match wire::decode(&buf).unwrap() {
            Some((Message::AuthChallenge { nonce }, _)) => nonce,
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    fn answer(s: &mut TcpStream) -> Message<'static> {
        let mut buf = Vec::new();
        read_frame(s, &mut buf, FIRST_FRAME_BODY_MAX).unwrap();
        match wire::decode(&buf).unwrap() {
            Some((Message::Refuse { code, reason }, _)) => Message::Refuse { code, reason },
            Some((Message::AuthProof { proof }, _)) => Message::AuthProof { proof },
            Some((Message::Error { reason }, _)) => Message::Error { reason },
            other => panic!("unexpected answer {other:?}"),
        }
    }

    #[test]
    fn a_replayed_proof_does_not_verify_against_a_fresh_challenge() {
        let k = PeerSecret::new(b"k").unwrap();
        let (addr, dir) = destination(secret("k"));
        let hello_frame = Message::Hello(hello()).encode();
        let cn = [1u8; 32];
        // A genuine exchange, recorded.
        let mut s = TcpStream::connect(&addr).unwrap();
        let sn1 = challenge(&mut s, cn);
        let recorded = Message::AuthProof { proof: k.source_proof(&sn1, &cn, &hello_frame) }.encode();
        s.write_all(&hello_frame).unwrap();
        s.write_all(&recorded).unwrap();
        assert!(matches!(answer(&mut s), Message::AuthProof { .. }));
        // The proof covers the welcome that follows it.
        drop(s);
        // The same frames again on a new connection: a new challenge, and the old proof fails.
        let mut s = TcpStream::connect(&addr).unwrap();
        let sn2 = challenge(&mut s, cn);
        assert_ne!(sn1, sn2, "challenges are fresh");
        s.write_all(&hello_frame).unwrap();
        s.write_all(&recorded).unwrap();
        assert!(matches!(answer(&mut s), Message::Refuse { code: RefuseCode::Unauthenticated, .. }));
        assert_eq!(dir.attached.load(Ordering::SeqCst), 1, "only the genuine exchange attached");
    }

    #[test]
    fn truncated_and_misplaced_handshake_frames_are_refused() {
        let k = PeerSecret::new(b"k").unwrap();
        let (addr, dir) = destination(secret("k"));
        let hello_frame = Message::Hello(hello()).encode();
        // An authentication request cut short (the peer goes away mid-frame).
        let full = Message::AuthRequest { nonce: [1; 32] }.encode();
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&full[..full.len() - 10]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let _ = read_until_eof(&mut s);
        // A request whose body is one byte short, with a valid checksum.
        let body = [1u8; 31];
        let mut short = wire::frame_header(32, body.len(), wire::frame_crc(32, body.len(), &[&body])).to_vec();
        short.extend_from_slice(&body);
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&short).unwrap();
        assert!(matches!(answer(&mut s), Message::Error { .. }));
        // A proof frame cut short after the hello.
        let mut s = TcpStream::connect(&addr).unwrap();
        let sn = challenge(&mut s, [2; 32]);
        let proof = Message::AuthProof { proof: k.source_proof(&sn, &[2; 32], &hello_frame) }.encode();
        s.write_all(&hello_frame).unwrap();
        s.write_all(&proof[..20]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        assert!(matches!(answer(&mut s), Message::Refuse { code: RefuseCode::Unauthenticated, .. }));
        // A welcome where the proof belongs, and a proof with no hello before it.
        let mut s = TcpStream::connect(&addr).unwrap();
        challenge(&mut s, [3; 32]);
        s.write_all(&hello_frame).unwrap();
        s.write_all(&Message::Welcome(welcome()).encode()).unwrap();
        assert!(matches!(answer(&mut s), Message::Refuse { code: RefuseCode::Unauthenticated, .. }));
        let mut s = TcpStream::connect(&addr).unwrap();
        challenge(&mut s, [4; 32]);
        s.write_all(&proof).unwrap();
        assert!(matches!(answer(&mut s), Message::Error { .. }));
        // A proof for another hello (the hello changed after it was proven).
        let mut s = TcpStream::connect(&addr).unwrap();
        let sn = challenge(&mut s, [5; 32]);
        let proof = Message::AuthProof { proof: k.source_proof(&sn, &[5; 32], &hello_frame) }.encode();
        let mut other = hello();
        other.epoch = 9;
        s.write_all(&Message::Hello(other).encode()).unwrap();
        s.write_all(&proof).unwrap();
        assert!(matches!(answer(&mut s), Message::Refuse { code: RefuseCode::Unauthenticated, .. }));
        assert_eq!(dir.attached.load(Ordering::SeqCst), 0);
    }

    /// A directory whose handler counts entry bytes and acks every commit with the
    /// number of frames seen so far.
    #[derive(Default)]
    struct Echo {
        bytes: Arc<AtomicUsize>,
    }

    struct EchoHandler {
        sink: Arc<dyn ReplySink>,
        bytes: Arc<AtomicUsize>,
        frames: u64,
    }

    impl FrameHandler for EchoHandler {
        fn on_message(&mut self, m: Message<'_>) -> Result<(), crate::transport::HandlerError> {
            if let Message::Entries { bytes, .. } = m {
                self.bytes.fetch_add(bytes.len(), Ordering::SeqCst);
            }
            self.frames += 1;
            Ok(())
        }
        fn commit(&mut self) -> Result<(), crate::transport::HandlerError> {
            self.sink.send(&Message::Ack { seq: self.frames }).map_err(Into::into)
        }
    }

    impl MirrorDirectory for Echo {
        fn attach(
            &self,
            _: &Hello,
            sink: Arc<dyn ReplySink>,
        ) -> Result<(Box<dyn FrameHandler>, Welcome), (RefuseCode, String)> {
            Ok((Box::new(EchoHandler { sink, bytes: self.bytes.clone(), frames: 0 }), welcome()))
        }
    }

    fn tls_security(dir: &std::path::Path, secret: Option<&str>) -> LinkSecurity {
        let (ca, cert, key) = crate::transport::tls::testing::write_pair(dir);
        LinkSecurity {
            secret: secret.map(|s| PeerSecret::new(s.as_bytes()).unwrap()),
            tls: Some(crate::transport::tls::TlsConfig::from_files(&cert, &key, Some(&ca)).unwrap()),
        }
    }

    #[test]
    fn entries_cross_tls_and_replies_are_polled_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        for security in [tls_security(dir.path(), Some("k")), tls_security(dir.path(), None)] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let echo = Arc::new(Echo::default());
            let d: Arc<dyn MirrorDirectory> = echo.clone();
            let served = security.clone();
            thread::spawn(move || serve(listener, d, Arc::new(AtomicBool::new(false)), served));
            let (mut link, w) = TcpConnector::new(security).connect(&addr, &hello()).unwrap();
            assert_eq!(w, welcome());
            // Batches well above rustls's buffers and the TLS record size.
            let batch = vec![0xa5u8; 300 * 1024];
            let mut sent = 0usize;
            for i in 0..8u64 {
                link.send(&Message::Cp { cp: i, partition: 0, upto_seq: i, by_value: false }).unwrap();
                link.send_entries(0, i, &batch).unwrap();
                sent += batch.len();
            }
            link.flush().unwrap();
            let start = Instant::now();
            let mut last = 0;
            while last < 16 {
                assert!(start.elapsed() < Duration::from_secs(20), "acks stopped at {last}");
                match link.poll() {
                    Some(LinkEvent::Reply(Reply::Ack { seq })) => last = seq,
                    Some(other) => panic!("{other:?}"),
                    None => thread::sleep(Duration::from_millis(1)),
                }
            }
            assert_eq!(echo.bytes.load(Ordering::SeqCst), sent);
            link.close();
            assert!(matches!(link.poll(), Some(LinkEvent::Closed { .. })));
        }
    }

    #[test]
    fn tls_on_one_end_only_or_an_untrusted_certificate_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let tls = tls_security(dir.path(), None);
        let other = tempfile::tempdir().unwrap();
        let untrusted = tls_security(other.path(), None);
        // A TLS source, a plain destination.
        let (addr, dir_plain) = destination(LinkSecurity::default());
        let e = TcpConnector::new(tls.clone()).connect(&addr, &hello()).err().expect("refused").to_string();
        assert!(e.contains("TLS"), "{e}");
        assert_eq!(dir_plain.attached.load(Ordering::SeqCst), 0);
        // A plain source, a TLS destination.
        let (addr, dir_tls) = destination(tls.clone());
        let e = TcpConnector::default().connect(&addr, &hello()).err().expect("refused").to_string();
        assert!(e.contains("speaks TLS only"), "{e}");
        // A source that trusts another CA.
        let e = TcpConnector::new(untrusted).connect(&addr, &hello()).err().expect("refused").to_string();
        assert!(e.contains("certificate"), "{e}");
        assert_eq!(dir_tls.attached.load(Ordering::SeqCst), 0);
    }

    fn read_until_eof(s: &mut TcpStream) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }
}
