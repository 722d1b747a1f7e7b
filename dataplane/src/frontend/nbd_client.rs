//! A small NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies, TLS through
//! `NBD_OPT_STARTTLS`) with pipelining: the quickstart, the end-to-end tests and the
//! benchmarks drive volumes with it.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ClientConnection, StreamOwned};
use rustls_pki_types::ServerName;

pub use super::nbd::{CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES};
use super::nbd::{
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, FLAG_READ_ONLY, IHAVEOPT, INFO_EXPORT, NBD_MAGIC, OPTION_REPLY_MAGIC, OPT_GO,
    OPT_STARTTLS, REP_ACK, REP_INFO, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};

/// Bound on option replies read during the handshake.
const OPT_REPLY_MAX: usize = 1 << 16;

pub struct NbdClient {
    stream: Stream,
    pub size: u64,
    pub read_only: bool,
}

/// The client's connection: plain, or TLS after `NBD_OPT_STARTTLS`.
enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// How a client proves the server (and itself, where the server asks): the CAs it trusts
/// and its own certificate in `config`, and the name the server's certificate must hold.
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// One simple reply: the request's cookie and its NBD error (0 for success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdReply {
    pub cookie: u64,
    pub error: u32,
}

impl NbdClient {
    pub fn connect(addr: impl ToSocketAddrs, export: &str) -> io::Result<NbdClient> {
        Self::connect_with(addr, export, None)
    }

    /// Connects, starting TLS first where `tls` is given (a server with TLS requires it).
    pub fn connect_with(addr: impl ToSocketAddrs, export: &str, tls: Option<&ClientTls>) -> io::Result<NbdClient> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        if read_u64(&mut s)? != NBD_MAGIC || read_u64(&mut s)? != IHAVEOPT {
            return Err(bad("not an NBD newstyle server"));
        }
        let flags = read_u16(&mut s)?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad("server is not fixed newstyle"));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
        s.write_all(&client_flags.to_be_bytes())?;
        let mut stream = match tls {
            None => Stream::Plain(s),
            Some(tls) => {
                send_option(&mut s, OPT_STARTTLS, &[])?;
                option_replies(&mut s, "NBD_OPT_STARTTLS", |_, _| Ok(()))?;
                let mut conn = ClientConnection::new(tls.config.clone(), tls.server_name.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                crate::transport::tls::handshake(&mut conn, &mut s)?;
                Stream::Tls(Box::new(StreamOwned::new(conn, s)))
            }
        };
        let name = export.as_bytes();
        let mut go = Vec::new();
        go.extend_from_slice(&u32::try_from(name.len()).map_err(|_| bad("export name too long"))?.to_be_bytes());
        go.extend_from_slice(name);
        go.extend_from_slice(&0u16.to_be_bytes());
        send_option(&mut stream, OPT_GO, &go)?;
        let mut size = None;
        let mut read_only = false;
        option_replies(&mut stream, &format!("export {export:?}"), |kind, data| {
            if kind == REP_INFO && data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT {
                size = Some(u64::from_be_bytes(data[2..10].try_into().expect("8")));
                read_only = u16::from_be_bytes([data[10], data[11]]) & FLAG_READ_ONLY != 0;
            }
            Ok(())
        })?;
        let size = size.ok_or_else(|| bad("server sent no export info"))?;
        if let Stream::Plain(s) = &stream {
            s.set_read_timeout(None)?;
        }
        if let Stream::Tls(s) = &stream {
            s.sock.set_read_timeout(None)?;
        }
        Ok(NbdClient { stream, size, read_only })
    }

    /// Sends one request without waiting for its reply.
    pub fn send(&mut self, cmd: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) -> io::Result<()> {
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[6..8].copy_from_slice(&cmd.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        if data.is_empty() {
            self.stream.write_all(&h)?;
            self.stream.flush()
        } else {
            let mut bufs = [io::IoSlice::new(&h), io::IoSlice::new(data)];
            let mut bufs: &mut [io::IoSlice<'_>] = &mut bufs;
            while !bufs.is_empty() {
                let n = self.stream.write_vectored(bufs)?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                io::IoSlice::advance_slices(&mut bufs, n);
            }
            self.stream.flush()
        }
    }

    /// A second handle on the same connection, for a thread that only receives while
    /// another only sends (an open-loop load generator).
    pub fn try_clone(&self) -> io::Result<NbdClient> {
        let Stream::Plain(stream) = &self.stream else {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "a TLS connection has one handle only"));
        };
        Ok(NbdClient { stream: Stream::Plain(stream.try_clone()?), size: self.size, read_only: self.read_only })
    }

    /// Receives one simple reply; for a read, `read_into` receives its data (the caller
    /// knows each cookie's length).
    pub fn recv(&mut self, read_into: Option<&mut [u8]>) -> io::Result<NbdReply> {
        let mut h = [0u8; 16];
        self.stream.read_exact(&mut h)?;
        if u32::from_be_bytes(h[0..4].try_into().expect("4")) != SIMPLE_REPLY_MAGIC {
            return Err(bad("bad reply magic"));
        }
        let error = u32::from_be_bytes(h[4..8].try_into().expect("4"));
        let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8"));
        if error == 0 {
            if let Some(buf) = read_into {
                self.stream.read_exact(buf)?;
            }
        }
        Ok(NbdReply { cookie, error })
    }

    fn check(r: NbdReply, what: &str) -> io::Result<()> {
        if r.error == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(i32::try_from(r.error).unwrap_or(libc::EIO)))
                .map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| bad("write too large"))?;
        self.send(CMD_WRITE, 1, offset, len, data)?;
        let r = self.recv(None)?;
        Self::check(r, "write")
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = u32::try_from(buf.len()).map_err(|_| bad("read too large"))?;
        self.send(CMD_READ, 2, offset, len, &[])?;
        let r = self.recv(Some(buf))?;
        Self::check(r, "read")
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.send(CMD_FLUSH, 3, 0, 0, &[])?;
        let r = self.recv(None)?;
        Self::check(r, "flush")
    }

    pub fn disconnect(mut self) -> io::Result<()> {
        self.send(CMD_DISC, 4, 0, 0, &[])
    }
}

fn send_option(s: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    let mut opt = Vec::with_capacity(16 + data.len());
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&option.to_be_bytes());
    opt.extend_from_slice(&u32::try_from(data.len()).map_err(|_| bad("option too long"))?.to_be_bytes());
    opt.extend_from_slice(data);
    s.write_all(&opt)?;
    s.flush()
}

/// Reads option replies up to the `REP_ACK`, handing each other one to `each`; an error
/// reply is an error naming `what` and carrying the server's message.
fn option_replies(s: &mut impl Read, what: &str, mut each: impl FnMut(u32, &[u8]) -> io::Result<()>) -> io::Result<()> {
    loop {
        if read_u64(s)? != OPTION_REPLY_MAGIC {
            return Err(bad("bad option reply magic"));
        }
        let _opt = read_u32(s)?;
        let kind = read_u32(s)?;
        let len = read_u32(s)? as usize;
        if len > OPT_REPLY_MAX {
            return Err(bad("option reply too long"));
        }
        let mut data = vec![0u8; len];
        s.read_exact(&mut data)?;
        match kind {
            REP_ACK => return Ok(()),
            REP_INFO => each(kind, &data)?,
            k if k & (1 << 31) != 0 => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{what} refused: {}", String::from_utf8_lossy(&data)),
                ))
            }
            _ => return Err(bad(format!("unexpected option reply {kind}"))),
        }
    }
}
