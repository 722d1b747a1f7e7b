//! Peer authentication: a shared secret and the HMAC-SHA256 (RFC 2104 over FIPS 180-4)
//! proofs of the replication handshake and of node-to-node control calls.
//!
//! Both nodes of a pair hold the same secret. A connection is authenticated by a mutual
//! challenge-response: each side sends a fresh 32-byte random nonce, and each proves that
//! it holds the secret with an HMAC over both nonces (and the hello the source sent),
//! behind a label that names the proving side, so that no proof is ever valid for the
//! other direction or for another connection. The frames and their order are in
//! `README.md` beside this file. Proofs are compared in constant time.
//!
//! Rotation: a [`PeerSecret`] may hold several keys. The first proves; a proof made with
//! any of them is accepted. A pair moves to a new secret one node at a time with no
//! refusal: each node first accepts the new key beside the old (old first), then proves
//! with it (new first), then drops the old. The keys change in place
//! ([`PeerSecret::replace_with`]), for every connection and call of the node at once.
//!
//! What this does not do: frames after the handshake carry no MAC and are not encrypted.
//! It keeps nodes without the secret (a misconfigured peer, a stray process, a scanner)
//! from pairing or placing anything; it does not stand against an active attacker on the
//! path, who could take over an authenticated connection (run the link on a network you
//! trust, or under IPsec or WireGuard, for that).

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use thiserror::Error;

/// Bytes of a challenge nonce.
pub const NONCE_BYTES: usize = 32;
/// Bytes of a proof (an HMAC-SHA256 tag, whole: never truncated).
pub const MAC_BYTES: usize = 32;
/// The longest secret a node takes; a secret file above this is refused before it is
/// read whole.
pub const SECRET_BYTES_MAX: usize = 4096;

/// Label of the source's proof in the replication handshake.
pub const LABEL_SOURCE: &[u8] = b"nvmirror-src";
/// Label of the destination's proof in the replication handshake.
pub const LABEL_DESTINATION: &[u8] = b"nvmirror-dst";
/// Label of a node's proof on a control API answer to another node.
pub const LABEL_API: &[u8] = b"nvmirror-api";
/// Label of a node's proof on a control API request to another node.
pub const LABEL_CALL: &[u8] = b"nvmirror-call";

pub type Nonce = [u8; NONCE_BYTES];
pub type Proof = [u8; MAC_BYTES];

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error("secret file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("secret file {path} is empty (after its trailing newline): a secret is needed")]
    Empty { path: PathBuf },
    #[error("secret file {path} is larger than {SECRET_BYTES_MAX} bytes")]
    TooLong { path: PathBuf },
    #[error("the secret is empty")]
    EmptySecret,
    #[error("the secret is larger than {SECRET_BYTES_MAX} bytes")]
    SecretTooLong,
    #[error("no randomness for a nonce: {0}")]
    Random(#[source] rand::Error),
}

/// The pair's shared secret: one key or more, the first of which proves. Clones share the
/// keys (a rotation reaches all of them). Cheap to clone; never printed.
#[derive(Clone)]
pub struct PeerSecret(Arc<parking_lot::RwLock<Keys>>);

/// A secret's keys, the first of which proves.
type Keys = Arc<[Arc<[u8]>]>;

impl fmt::Debug for PeerSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerSecret(..)")
    }
}

/// A secret read from a file, and what the node should warn about it.
#[derive(Debug)]
pub struct LoadedSecret {
    pub secret: PeerSecret,
    /// Set when the file can be read by every user of the host.
    pub warning: Option<String>,
}

impl PeerSecret {
    pub fn new(bytes: &[u8]) -> Result<PeerSecret, AuthError> {
        if bytes.is_empty() {
            return Err(AuthError::EmptySecret);
        }
        if bytes.len() > SECRET_BYTES_MAX {
            return Err(AuthError::SecretTooLong);
        }
        Ok(PeerSecret::of(vec![bytes.into()]))
    }

    fn of(keys: Vec<Arc<[u8]>>) -> PeerSecret {
        PeerSecret(Arc::new(parking_lot::RwLock::new(keys.into())))
    }

    /// The keys of `secrets`, in order, as one secret: the first proves, any is accepted.
    /// `None` for an empty list.
    pub fn all_of(secrets: &[PeerSecret]) -> Option<PeerSecret> {
        let keys: Vec<Arc<[u8]>> =
            secrets.iter().flat_map(|s| s.0.read().iter().cloned().collect::<Vec<_>>()).collect();
        (!keys.is_empty()).then(|| PeerSecret::of(keys))
    }

    /// Takes `other`'s keys, for this secret and every clone of it (a rotation).
    pub fn replace_with(&self, other: &PeerSecret) {
        let keys = other.0.read().clone();
        *self.0.write() = keys;
    }

    /// How many keys it holds.
    pub fn keys(&self) -> usize {
        self.0.read().len()
    }

    /// Reads a secret file: its bytes, less one trailing newline (`\n` or `\r\n`), so that
    /// `echo secret > FILE` and a file written without the newline hold the same secret.
    pub fn from_file(path: &Path) -> Result<LoadedSecret, AuthError> {
        let err = |source| AuthError::Read { path: path.to_path_buf(), source };
        let file = fs::File::open(path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        if meta.is_dir() {
            return Err(err(io::Error::other("is a directory")));
        }
        let mut bytes = Vec::new();
        // Bounded whatever the file is (a device reports no length): one byte more than
        // the limit tells a file that is too long.
        file.take(SECRET_BYTES_MAX as u64 + 2).read_to_end(&mut bytes).map_err(err)?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        if bytes.len() > SECRET_BYTES_MAX {
            return Err(AuthError::TooLong { path: path.to_path_buf() });
        }
        if bytes.is_empty() {
            return Err(AuthError::Empty { path: path.to_path_buf() });
        }
        let warning = (meta.permissions().mode() & 0o004 != 0)
            .then(|| format!("secret file {} is readable by every user of this host (chmod 600 it)", path.display()));
        Ok(LoadedSecret { secret: PeerSecret::of(vec![bytes.into()]), warning })
    }

    fn mac(key: &[u8], label: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
        mac.update(label);
        for p in parts {
            mac.update(p);
        }
        mac
    }

    /// A proof with the first key.
    fn prove(&self, label: &[u8], parts: &[&[u8]]) -> Proof {
        let keys = self.0.read();
        Self::mac(&keys[0], label, parts).finalize().into_bytes().into()
    }

    /// Whether any key makes `proof`.
    fn check(&self, label: &[u8], parts: &[&[u8]], proof: &Proof) -> bool {
        // verify_slice compares in constant time; every key is tried, whichever matches.
        let keys = self.0.read().clone();
        keys.iter().map(|k| Self::mac(k, label, parts).verify_slice(proof).is_ok()).fold(false, |a, b| a | b)
    }

    /// The source's proof: HMAC(secret, "nvmirror-src" || server_nonce || client_nonce ||
    /// hello frame). Binding the hello frame (header, body and crc, as sent) makes the
    /// proof valid for that hello only.
    pub fn source_proof(&self, server_nonce: &Nonce, client_nonce: &Nonce, hello_frame: &[u8]) -> Proof {
        self.prove(LABEL_SOURCE, &[server_nonce, client_nonce, hello_frame])
    }

    pub fn verify_source(&self, server_nonce: &Nonce, client_nonce: &Nonce, hello_frame: &[u8], proof: &Proof) -> bool {
        self.check(LABEL_SOURCE, &[server_nonce, client_nonce, hello_frame], proof)
    }

    /// The destination's proof: HMAC(secret, "nvmirror-dst" || client_nonce ||
    /// server_nonce || hello frame || answer frame). It covers the answer (the welcome, or
    /// a refusal that could fence the source), so that no answer is taken on trust.
    pub fn destination_proof(
        &self,
        client_nonce: &Nonce,
        server_nonce: &Nonce,
        hello_frame: &[u8],
        answer_frame: &[u8],
    ) -> Proof {
        self.prove(LABEL_DESTINATION, &[client_nonce, server_nonce, hello_frame, answer_frame])
    }

    pub fn verify_destination(
        &self,
        client_nonce: &Nonce,
        server_nonce: &Nonce,
        hello_frame: &[u8],
        answer_frame: &[u8],
        proof: &Proof,
    ) -> bool {
        self.check(LABEL_DESTINATION, &[client_nonce, server_nonce, hello_frame, answer_frame], proof)
    }

    /// A node's proof on a control API answer: HMAC(secret, "nvmirror-api" || nonce ||
    /// body), for the caller's nonce and the answer's exact body.
    pub fn api_proof(&self, nonce: &Nonce, body: &[u8]) -> Proof {
        self.prove(LABEL_API, &[nonce, body])
    }

    pub fn verify_api(&self, nonce: &Nonce, body: &[u8], proof: &Proof) -> bool {
        self.check(LABEL_API, &[nonce, body], proof)
    }

    /// A node's proof on a control API request to another: HMAC(secret, "nvmirror-call" ||
    /// nonce || method || 0 || path || 0 || body), for a nonce the called node issued.
    /// The zero bytes keep method and path apart (neither holds one).
    pub fn call_proof(&self, nonce: &Nonce, method: &str, path: &str, body: &[u8]) -> Proof {
        self.prove(LABEL_CALL, &[nonce, method.as_bytes(), &[0], path.as_bytes(), &[0], body])
    }

    pub fn verify_call(&self, nonce: &Nonce, method: &str, path: &str, body: &[u8], proof: &Proof) -> bool {
        self.check(LABEL_CALL, &[nonce, method.as_bytes(), &[0], path.as_bytes(), &[0], body], proof)
    }
}

/// A fresh random nonce from the operating system.
pub fn fresh_nonce() -> Result<Nonce, AuthError> {
    let mut n = [0u8; NONCE_BYTES];
    rand::rngs::OsRng.try_fill_bytes(&mut n).map_err(AuthError::Random)?;
    Ok(n)
}

/// Lower-case hex, for nonces and proofs in HTTP headers.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Parses exactly 32 bytes of hex (either case); `None` for anything else.
pub fn from_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (digit(s[2 * i])? << 4) | digit(s[2 * i + 1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> PeerSecret {
        PeerSecret::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn proofs_verify_only_with_the_same_secret_nonces_and_hello() {
        let (k, other) = (secret("k"), secret("not k"));
        let (sn, cn) = (fresh_nonce().unwrap(), fresh_nonce().unwrap());
        let hello = b"hello frame";
        let p = k.source_proof(&sn, &cn, hello);
        assert!(k.verify_source(&sn, &cn, hello, &p));
        assert!(!other.verify_source(&sn, &cn, hello, &p), "another secret");
        assert!(!k.verify_source(&cn, &sn, hello, &p), "nonces swapped");
        assert!(!k.verify_source(&sn, &cn, b"hello framE", &p), "another hello");
        let mut bad = p;
        bad[31] ^= 1;
        assert!(!k.verify_source(&sn, &cn, hello, &bad), "one bit of the tag");
        // A proof is for its direction only: the destination's is not a source's.
        let d = k.destination_proof(&cn, &sn, hello, b"welcome");
        assert!(k.verify_destination(&cn, &sn, hello, b"welcome", &d));
        assert!(!k.verify_destination(&cn, &sn, hello, b"refuse", &d), "another answer");
        assert!(!k.verify_source(&sn, &cn, hello, &d));
        assert!(!k.verify_destination(&cn, &sn, hello, b"", &p));
        // The API's label is apart from both.
        assert!(!k.verify_api(&sn, hello, &p));
        let c = k.call_proof(&sn, "POST", "/v1/volumes/v/takeover", b"{}");
        assert!(k.verify_call(&sn, "POST", "/v1/volumes/v/takeover", b"{}", &c));
        assert!(!k.verify_call(&sn, "POST", "/v1/volumes/w/takeover", b"{}", &c), "another path");
        assert!(!k.verify_call(&sn, "GET", "/v1/volumes/v/takeover", b"{}", &c), "another method");
        assert!(!k.verify_call(&sn, "POST", "/v1/volumes/v/takeover", b"{ }", &c), "another body");
        assert!(!k.verify_call(&cn, "POST", "/v1/volumes/v/takeover", b"{}", &c), "another nonce");
    }

    #[test]
    fn a_replayed_proof_fails_a_fresh_challenge() {
        let k = secret("k");
        let cn = fresh_nonce().unwrap();
        let first = fresh_nonce().unwrap();
        let proof = k.source_proof(&first, &cn, b"h");
        let fresh = fresh_nonce().unwrap();
        assert_ne!(first, fresh);
        assert!(!k.verify_source(&fresh, &cn, b"h", &proof));
    }

    #[test]
    fn secret_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        fs::write(&p, "swordfish\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let a = PeerSecret::from_file(&p).unwrap();
        assert!(a.warning.is_none());
        fs::write(&p, "swordfish").unwrap();
        let b = PeerSecret::from_file(&p).unwrap();
        let n = [7u8; 32];
        assert_eq!(a.secret.api_proof(&n, b"x"), b.secret.api_proof(&n, b"x"), "one trailing newline is stripped");
        fs::write(&p, "swordfish\r\n").unwrap();
        assert_eq!(PeerSecret::from_file(&p).unwrap().secret.api_proof(&n, b"x"), b.secret.api_proof(&n, b"x"));
        fs::write(&p, "swordfish\n\n").unwrap();
        assert_ne!(PeerSecret::from_file(&p).unwrap().secret.api_proof(&n, b"x"), b.secret.api_proof(&n, b"x"));
        fs::write(&p, "\n").unwrap();
        assert!(matches!(PeerSecret::from_file(&p), Err(AuthError::Empty { .. })));
        fs::write(&p, vec![b'x'; SECRET_BYTES_MAX + 1]).unwrap();
        assert!(matches!(PeerSecret::from_file(&p), Err(AuthError::TooLong { .. })));
        fs::write(&p, vec![b'x'; SECRET_BYTES_MAX]).unwrap();
        assert!(PeerSecret::from_file(&p).is_ok());
        assert!(matches!(PeerSecret::from_file(&dir.path().join("none")), Err(AuthError::Read { .. })));
        assert!(matches!(PeerSecret::from_file(dir.path()), Err(AuthError::Read { .. })));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(PeerSecret::from_file(&p).unwrap().warning.is_some(), "world-readable");
        assert_eq!(format!("{:?}", a.secret), "PeerSecret(..)", "never printed");
    }

    #[test]
    fn hex() {
        let n = fresh_nonce().unwrap();
        assert_eq!(from_hex32(&to_hex(&n)), Some(n));
        assert_eq!(from_hex32(&to_hex(&n).to_uppercase()), Some(n));
        assert_eq!(from_hex32("00"), None);
        assert_eq!(from_hex32(&"g".repeat(64)), None);
        assert_eq!(from_hex32(&"é".repeat(32)), None);
    }

    #[test]
    fn the_first_key_proves_and_any_is_accepted_and_a_rotation_reaches_every_clone() {
        let old = PeerSecret::new(b"old").unwrap();
        let new = PeerSecret::new(b"new").unwrap();
        let (sn, cn) = ([1u8; 32], [2u8; 32]);
        let both_old_first = PeerSecret::all_of(&[old.clone(), new.clone()]).unwrap();
        let both_new_first = PeerSecret::all_of(&[new.clone(), old.clone()]).unwrap();
        assert_eq!(both_old_first.keys(), 2);
        // Mid-rotation, each accepts the other's proof.
        let p = both_old_first.source_proof(&sn, &cn, b"h");
        assert!(both_new_first.verify_source(&sn, &cn, b"h", &p) && old.verify_source(&sn, &cn, b"h", &p));
        assert!(!new.verify_source(&sn, &cn, b"h", &p), "proved with the old key, which new alone lacks");
        let p = both_new_first.source_proof(&sn, &cn, b"h");
        assert!(both_old_first.verify_source(&sn, &cn, b"h", &p) && new.verify_source(&sn, &cn, b"h", &p));
        assert!(!old.verify_source(&sn, &cn, b"h", &p));
        // In place: a clone taken before sees the new keys.
        let held = old.clone();
        old.replace_with(&new);
        assert!(held.verify_source(&sn, &cn, b"h", &new.source_proof(&sn, &cn, b"h")));
        assert!(PeerSecret::all_of(&[]).is_none());
    }
}
