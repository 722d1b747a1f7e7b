//! The NBD server against real clients (`qemu-io`, `qemu-img` from `qemu-utils`; `nbdinfo`,
//! `nbdcopy` from `libnbd-bin`) and against hostile raw TCP clients.
//!
//! Each test starts its own server on 127.0.0.1:0 over in-memory exports:
//!
//! | Name   | Size   | Mode       | Completion                                       |
//! |--------|--------|------------|--------------------------------------------------|
//! | `disk` | 16 MiB | read-write | two worker threads (replies may reorder)         |
//! | `ro`   | 1 MiB  | read-only  | synchronous, inside `submit`; filled with `0x5a` |
//! | `slow` | 1 MiB  | read-write | worker threads; odd 4 KiB blocks wait 20 ms      |
//!
//! A missing client program fails its test with the Debian package to install.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use nvmirror_dataplane::frontend::nbd::{NbdServer, PAYLOAD_BYTES_MAX};
use nvmirror_dataplane::frontend::{Completer, Export, ExportRegistry, IoRequest, IoResult};
use rand::{RngCore, SeedableRng};

const DISK: &str = "disk";
const DISK_BYTES: u64 = 16 << 20;
const RO: &str = "ro";
const RO_BYTES: u64 = 1 << 20;
const RO_FILL: u8 = 0x5a;
const SLOW: &str = "slow";
const SLOW_BYTES: u64 = 1 << 20;
const SLOW_DELAY: Duration = Duration::from_millis(20);

/// Longest a client program may run before the test calls the server hung.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a raw client waits for one read from the server.
const RAW_READ_TIMEOUT: Duration = Duration::from_secs(20);

// Wire constants, written out here rather than imported so that the test checks the
// server against the protocol document, not against itself.
const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
const FLAG_C_NO_ZEROES: u32 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNKNOWN_EXPORT: u32 = (1 << 31) | 6;
const CMD_BLOCK_STATUS: u16 = 7;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_BLOCK_SIZE: u16 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1;
const CMD_FLAG_NO_HOLE: u16 = 2;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
/// HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN.
const FLAGS_WRITABLE: u16 = 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x100;
const FLAG_READ_ONLY: u16 = 0x2;

// ---------------------------------------------------------------------------------------
// In-memory exports.

/// What an export was asked to do, to check that clients' commands reached it.
#[derive(Default)]
struct Stats {
    writes: AtomicU64,
    fua: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    write_zeroes: AtomicU64,
    /// Requests the server should never have submitted: out of bounds, or mutating a
    /// read-only export.
    violations: AtomicU64,
}

struct Backing {
    bytes: Mutex<Vec<u8>>,
    read_only: bool,
    /// Odd 4 KiB blocks take this long, so that replies come back out of order.
    odd_block_delay: Option<Duration>,
    stats: Stats,
}

impl Backing {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn execute(&self, request: IoRequest) -> IoResult {
        if let Some(delay) = self.odd_block_delay {
            let offset = match &request {
                IoRequest::Read { offset, .. }
                | IoRequest::Write { offset, .. }
                | IoRequest::Trim { offset, .. }
                | IoRequest::WriteZeroes { offset, .. } => *offset,
                IoRequest::Flush => 0,
            };
            if (offset / 4096) % 2 == 1 {
                thread::sleep(delay);
            }
        }
        if self.read_only && request.is_mutation() {
            self.stats.violations.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let mut bytes = self.lock();
        let size = bytes.len() as u64;
        let range = |offset: u64, len: u64| {
            let end = offset.checked_add(len).filter(|&end| len > 0 && end <= size);
            match end {
                Some(end) => Ok(to_usize(offset)..to_usize(end)),
                None => {
                    self.stats.violations.fetch_add(1, Ordering::Relaxed);
                    Err(io::Error::from_raw_os_error(libc::EFAULT))
                }
            }
        };
        match request {
            IoRequest::Read { offset, len } => {
                let range = range(offset, u64::from(len))?;
                Ok(Some(bytes[range].to_vec()))
            }
            IoRequest::Write { offset, data, fua } => {
                let range = range(offset, data.len() as u64)?;
                bytes[range].copy_from_slice(&data);
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
                if fua {
                    self.stats.fua.fetch_add(1, Ordering::Relaxed);
                }
                Ok(None)
            }
            IoRequest::Flush => {
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            IoRequest::Trim { offset, len } => {
                // Trimmed blocks read back as zeroes here, which NBD allows.
                bytes[range(offset, u64::from(len))?].fill(0);
                self.stats.trims.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            IoRequest::WriteZeroes { offset, len, fua } => {
                bytes[range(offset, u64::from(len))?].fill(0);
                self.stats.write_zeroes.fetch_add(1, Ordering::Relaxed);
                if fua {
                    self.stats.fua.fetch_add(1, Ordering::Relaxed);
                }
                Ok(None)
            }
        }
    }
}

struct MemExport {
    backing: Arc<Backing>,
    /// Worker threads completing requests; `None` completes inside `submit`.
    workers: Option<Sender<(IoRequest, Completer)>>,
}

impl MemExport {
    fn new(size: u64, fill: u8, read_only: bool, workers: usize, odd_block_delay: Option<Duration>) -> Arc<Self> {
        let backing = Arc::new(Backing {
            bytes: Mutex::new(vec![fill; to_usize(size)]),
            read_only,
            odd_block_delay,
            stats: Stats::default(),
        });
        let workers = (workers > 0).then(|| {
            let (tx, rx) = crossbeam_channel::unbounded::<(IoRequest, Completer)>();
            for _ in 0..workers {
                let rx = rx.clone();
                let backing = Arc::clone(&backing);
                // Workers end when the export, and with it the sender, is dropped.
                thread::spawn(move || {
                    for (request, done) in rx {
                        done.complete(backing.execute(request));
                    }
                });
            }
            tx
        });
        Arc::new(Self { backing, workers })
    }

    fn bytes(&self, offset: u64, len: u64) -> Vec<u8> {
        self.backing.lock()[to_usize(offset)..to_usize(offset + len)].to_vec()
    }

    fn stat(&self, counter: impl Fn(&Stats) -> &AtomicU64) -> u64 {
        counter(&self.backing.stats).load(Ordering::Relaxed)
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.backing.lock().len() as u64
    }

    fn read_only(&self) -> bool {
        self.backing.read_only
    }

    fn submit(&self, request: IoRequest, done: Completer) {
        match &self.workers {
            Some(workers) => workers.send((request, done)).expect("workers run while the export lives"),
            None => done.complete(self.backing.execute(request)),
        }
    }
}

struct Registry(BTreeMap<String, Arc<MemExport>>);

impl ExportRegistry for Registry {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.0.get(name).map(|export| Arc::clone(export) as Arc<dyn Export>)
    }

    fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

/// A server on 127.0.0.1 with its three exports. Dropping it checks that the server never
/// submitted a request it should have refused.
struct Fixture {
    server: Option<NbdServer>,
    addr: SocketAddr,
    disk: Arc<MemExport>,
    ro: Arc<MemExport>,
    slow: Arc<MemExport>,
}

impl Fixture {
    fn start() -> Self {
        let disk = MemExport::new(DISK_BYTES, 0, false, 2, None);
        let ro = MemExport::new(RO_BYTES, RO_FILL, true, 0, None);
        let slow = MemExport::new(SLOW_BYTES, 0, false, 2, Some(SLOW_DELAY));
        let registry = Registry(BTreeMap::from([
            (DISK.to_owned(), Arc::clone(&disk)),
            (RO.to_owned(), Arc::clone(&ro)),
            (SLOW.to_owned(), Arc::clone(&slow)),
        ]));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let server = NbdServer::spawn(listener, Arc::new(registry)).expect("start the server");
        let addr = server.local_addr();
        Self { server: Some(server), addr, disk, ro, slow }
    }

    fn url(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.addr.port())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let result = server.shutdown();
            if !thread::panicking() {
                result.expect("server shut down cleanly");
            }
        }
        for export in [&self.disk, &self.ro, &self.slow] {
            let violations = export.stat(|s| &s.violations);
            if !thread::panicking() {
                assert_eq!(violations, 0, "the server submitted requests it had to refuse");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Client programs.

/// Runs a client program to completion, failing the test if it is not installed or hangs.
fn run_tool(program: &str, package: &str, args: &[&str]) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run `{program}` ({err}): install the Debian package `{package}` \
                 (apt-get install -y {package})"
            )
        });
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let stdout = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let stderr = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the client program") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{program} {}` ran longer than {TOOL_TIMEOUT:?}", args.join(" "));
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output { status, stdout: stdout.join().expect("stdout reader"), stderr: stderr.join().expect("stderr reader") }
}

fn describe(program: &str, args: &[&str], output: &Output) -> String {
    format!(
        "`{program} {}` exited with {}\n--- stdout\n{}\n--- stderr\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    )
}

/// Runs a client program and requires it to succeed; returns its stdout.
fn run_ok(program: &str, package: &str, args: &[&str]) -> String {
    let output = run_tool(program, package, args);
    assert!(output.status.success(), "{}", describe(program, args, &output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs qemu-io commands on `url` and requires every one of them to succeed.
fn qemu_io_ok(url: &str, options: &[&str], commands: &[&str]) -> String {
    let output = qemu_io(url, options, commands);
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    let args = qemu_io_args(url, options, commands);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // qemu-io reports some failures, pattern mismatches among them, only in its output.
    assert!(
        output.status.success() && !text.contains("failed") && !text.contains("Pattern"),
        "{}",
        describe("qemu-io", &args, &output)
    );
    text
}

fn qemu_io(url: &str, options: &[&str], commands: &[&str]) -> Output {
    let args = qemu_io_args(url, options, commands);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_tool("qemu-io", "qemu-utils", &args)
}

fn qemu_io_args(url: &str, options: &[&str], commands: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["-f", "raw"].iter().map(|s| s.to_string()).collect();
    args.extend(options.iter().map(|s| s.to_string()));
    for command in commands {
        args.push("-c".to_owned());
        args.push(command.to_string());
    }
    args.push(url.to_owned());
    args
}

// ---------------------------------------------------------------------------------------
// A raw client, to say exactly what goes on the wire.

struct Raw {
    stream: TcpStream,
}

/// One option reply.
#[derive(Debug)]
struct OptionReply {
    option: u32,
    reply_type: u32,
    data: Vec<u8>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect to the server");
        stream.set_read_timeout(Some(RAW_READ_TIMEOUT)).expect("set a read timeout");
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        Self { stream }
    }

    /// Reads the server's greeting and returns its handshake flags.
    fn greeting(&mut self) -> u16 {
        let greeting = self.read_exact(18);
        assert_eq!(be_u64(&greeting[..8]), NBD_MAGIC);
        assert_eq!(be_u64(&greeting[8..16]), IHAVEOPT);
        u16::from_be_bytes([greeting[16], greeting[17]])
    }

    /// Connects and sends the client flags, ready for options.
    fn negotiating(addr: SocketAddr, client_flags: u32) -> Self {
        let mut raw = Self::connect(addr);
        assert_eq!(raw.greeting(), 0b11, "FIXED_NEWSTYLE | NO_ZEROES");
        raw.send(&client_flags.to_be_bytes());
        raw
    }

    /// Connects with NBD_OPT_GO; returns the client, export size and transmission flags.
    fn go(addr: SocketAddr, name: &str) -> (Self, u64, u16) {
        let mut raw = Self::negotiating(addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        raw.send_option(OPT_GO, &info_data(name, &[]));
        let (size, flags) = raw.read_info_replies(OPT_GO);
        (raw, size, flags)
    }

    /// Reads the replies to NBD_OPT_INFO or NBD_OPT_GO up to the ACK; returns the export
    /// size and transmission flags.
    fn read_info_replies(&mut self, option: u32) -> (u64, u16) {
        let mut export = None;
        loop {
            let reply = self.read_option_reply();
            assert_eq!(reply.option, option);
            match reply.reply_type {
                REP_ACK => break,
                REP_INFO if be_u16(&reply.data) == INFO_EXPORT => {
                    assert_eq!(reply.data.len(), 12);
                    export = Some((be_u64(&reply.data[2..10]), be_u16(&reply.data[10..])));
                }
                REP_INFO => {}
                other => panic!("unexpected option reply {other:#x}: {reply:?}"),
            }
        }
        export.expect("NBD_INFO_EXPORT before the ACK")
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send to the server");
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&u32::try_from(data.len()).expect("short option").to_be_bytes());
        bytes.extend_from_slice(data);
        self.send(&bytes);
    }

    fn read_option_reply(&mut self) -> OptionReply {
        let header = self.read_exact(20);
        assert_eq!(be_u64(&header[..8]), OPTION_REPLY_MAGIC);
        let len = be_u32(&header[16..]);
        assert!(len <= 64 << 10, "option reply of {len} bytes");
        OptionReply {
            option: be_u32(&header[8..12]),
            reply_type: be_u32(&header[12..16]),
            data: self.read_exact(len as usize),
        }
    }

    fn send_request(&mut self, flags: u16, command: u16, cookie: u64, offset: u64, len: u32) {
        self.send(&request(flags, command, cookie, offset, len, &[]));
    }

    /// Reads a simple reply header: (error, cookie).
    fn read_reply(&mut self) -> (u32, u64) {
        let reply = self.read_exact(16);
        assert_eq!(be_u32(&reply[..4]), SIMPLE_REPLY_MAGIC);
        (be_u32(&reply[4..8]), be_u64(&reply[8..]))
    }

    fn read_exact(&mut self, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.stream.read_exact(&mut bytes).expect("read from the server");
        bytes
    }

    /// Requires the server to close the connection, without sending anything more.
    fn expect_closed(&mut self) {
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => {}
            Err(err) if err.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the server to close the connection, got {other:?}"),
        }
    }

    /// Requires the server to close the connection, whatever it sends first.
    fn drain_until_closed(&mut self) {
        let mut sink = [0u8; 4096];
        loop {
            match self.stream.read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::ConnectionReset => return,
                Err(err) => panic!("expected the server to close the connection, got {err}"),
            }
        }
    }

    fn disconnect(mut self) {
        self.send_request(0, CMD_DISC, 0, 0, 0);
        self.expect_closed();
    }
}

fn request(flags: u16, command: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(28 + payload.len());
    bytes.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    bytes.extend_from_slice(&flags.to_be_bytes());
    bytes.extend_from_slice(&command.to_be_bytes());
    bytes.extend_from_slice(&cookie.to_be_bytes());
    bytes.extend_from_slice(&offset.to_be_bytes());
    bytes.extend_from_slice(&len.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// The data of NBD_OPT_INFO and NBD_OPT_GO.
/// The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&u32::try_from(export.len()).unwrap().to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&u32::try_from(queries.len()).unwrap().to_be_bytes());
    for q in queries {
        d.extend_from_slice(&u32::try_from(q.len()).unwrap().to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&u32::try_from(name.len()).expect("short name").to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&u16::try_from(requests.len()).expect("few requests").to_be_bytes());
    for request in requests {
        data.extend_from_slice(&request.to_be_bytes());
    }
    data
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).expect("test sizes fit in usize")
}

fn byte(n: u64) -> u8 {
    u8::try_from(n).expect("test patterns are bytes")
}

fn be_u16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes(bytes[..2].try_into().expect("2 bytes"))
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"))
}

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"))
}

/// Requires the server to serve a fresh client: negotiate, read a block, disconnect.
fn assert_serves(addr: SocketAddr) {
    let (mut raw, size, _) = Raw::go(addr, DISK);
    assert_eq!(size, DISK_BYTES);
    raw.send_request(0, CMD_READ, 0x600d, 0, 4096);
    assert_eq!(raw.read_reply(), (0, 0x600d));
    raw.read_exact(4096);
    raw.disconnect();
}

/// Distinct, scattered cookies, to show that the server echoes them untouched.
fn cookie(index: u64) -> u64 {
    (index + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

// ---------------------------------------------------------------------------------------
// Real clients.

#[test]
fn qemu_io_writes_flushes_and_reads_back() {
    let fixture = Fixture::start();
    qemu_io_ok(
        &fixture.url(DISK),
        &[],
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -f -P 0xcd 1M 128k",
            "flush",
            "read -P 0xcd 1M 128k",
            "write -P 0x11 4097 100",
            "read -P 0x11 4097 100",
            "read -P 0xab 4197 1000",
            "read -P 0 2M 1M",
        ],
    );
    let mut expected = vec![0xab; 64 << 10];
    expected[4097..4197].fill(0x11);
    assert_eq!(fixture.disk.bytes(0, 64 << 10), expected);
    assert_eq!(fixture.disk.bytes(1 << 20, 128 << 10), vec![0xcd; 128 << 10]);
    assert!(fixture.disk.stat(|s| &s.fua) >= 1, "write -f sent FUA");
    assert!(fixture.disk.stat(|s| &s.flushes) >= 1, "flush reached the export");
}

#[test]
fn qemu_io_trims_and_writes_zeroes() {
    let fixture = Fixture::start();
    qemu_io_ok(
        &fixture.url(DISK),
        &["-d", "unmap"],
        &[
            "write -P 0xcd 0 512k",
            "discard 0 64k",
            "read -P 0 0 64k",
            "write -z 64k 64k",
            "read -P 0 64k 64k",
            "write -z -u 128k 64k",
            "read -P 0 128k 64k",
            "read -P 0xcd 192k 320k",
        ],
    );
    let mut expected = vec![0u8; 512 << 10];
    expected[192 << 10..].fill(0xcd);
    assert_eq!(fixture.disk.bytes(0, 512 << 10), expected);
    assert!(fixture.disk.stat(|s| &s.trims) >= 1, "discard sent NBD_CMD_TRIM");
    assert!(fixture.disk.stat(|s| &s.write_zeroes) >= 2, "write -z sent NBD_CMD_WRITE_ZEROES");
}

#[test]
fn read_only_export_refuses_writes() {
    let fixture = Fixture::start();
    let url = fixture.url(RO);
    qemu_io_ok(&url, &["-r"], &["read -P 0x5a 0 1M"]);
    let output = qemu_io(&url, &[], &["write -P 0x01 0 4k"]);
    let text = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() || text.contains("failed"), "qemu-io wrote to a read-only export:\n{text}");

    // The server itself refuses, whatever the client believes.
    let (mut raw, size, flags) = Raw::go(fixture.addr, RO);
    assert_eq!((size, flags), (RO_BYTES, FLAGS_WRITABLE | FLAG_READ_ONLY));
    raw.send(&request(0, CMD_WRITE, 1, 0, 4096, &[1; 4096]));
    assert_eq!(raw.read_reply(), (EPERM, 1));
    raw.send_request(0, CMD_TRIM, 2, 0, 4096);
    assert_eq!(raw.read_reply(), (EPERM, 2));
    raw.send_request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 3, 0, 4096);
    assert_eq!(raw.read_reply(), (EPERM, 3));
    raw.send_request(0, CMD_FLUSH, 4, 0, 0);
    assert_eq!(raw.read_reply(), (0, 4));
    raw.send_request(0, CMD_READ, 5, 0, 4096);
    assert_eq!(raw.read_reply(), (0, 5));
    assert_eq!(raw.read_exact(4096), vec![RO_FILL; 4096]);
    raw.disconnect();

    assert_eq!(fixture.ro.bytes(0, RO_BYTES), vec![RO_FILL; to_usize(RO_BYTES)]);
    assert_eq!(fixture.ro.stat(|s| &s.writes), 0);
}

#[test]
fn nbdinfo_lists_and_describes_exports() {
    let fixture = Fixture::start();
    let list_url = format!("nbd://127.0.0.1:{}", fixture.addr.port());
    let list = run_ok("nbdinfo", "libnbd-bin", &["--list", &list_url]);
    for name in [DISK, RO, SLOW] {
        assert!(list.contains(&format!("export=\"{name}\"")), "{name} missing from:\n{list}");
    }

    for (name, size, read_only) in [(DISK, DISK_BYTES, false), (RO, RO_BYTES, true)] {
        let json = run_ok("nbdinfo", "libnbd-bin", &["--json", &fixture.url(name)]);
        let info: serde_json::Value = serde_json::from_str(&json).expect("nbdinfo --json output");
        let export = &info["exports"][0];
        assert_eq!(export["export-name"], name, "{json}");
        assert_eq!(export["export-size"], size, "{json}");
        assert_eq!(export["is_read_only"], read_only, "{json}");
        for capability in ["can_flush", "can_fua", "can_multi_conn"] {
            assert_eq!(export[capability], true, "{capability} in {json}");
        }
        assert_eq!(export["block_size_minimum"], 1, "{json}");
        assert_eq!(export["block_size_preferred"], 4096, "{json}");
        assert_eq!(export["block_size_maximum"], PAYLOAD_BYTES_MAX, "{json}");
        if !read_only {
            assert_eq!(export["can_trim"], true, "{json}");
            assert_eq!(export["can_zero"], true, "{json}");
        }
    }
}

#[test]
fn nbdcopy_and_qemu_img_round_trip() {
    let fixture = Fixture::start();
    let dir = tempfile::tempdir().expect("temporary directory");
    let input = dir.path().join("input.img");
    let mut image = vec![0u8; to_usize(DISK_BYTES)];
    rand::rngs::StdRng::seed_from_u64(0x006e_6264).fill_bytes(&mut image);
    // A hole, which nbdcopy sends as zeroes rather than as data.
    image[4 << 20..6 << 20].fill(0);
    std::fs::write(&input, &image).expect("write the input image");
    let path = |file: &Path| file.to_str().expect("UTF-8 temporary path").to_owned();
    let url = fixture.url(DISK);

    // Pre-fill the hole's target so that only a zeroing request can clear it.
    qemu_io_ok(&url, &[], &["write -P 0xee 4M 2M"]);
    run_ok("nbdcopy", "libnbd-bin", &[&path(&input), &url]);
    assert!(fixture.disk.backing.lock().as_slice() == image.as_slice(), "nbdcopy in");

    let copied = dir.path().join("nbdcopy.img");
    run_ok("nbdcopy", "libnbd-bin", &[&url, &path(&copied)]);
    assert!(std::fs::read(&copied).expect("read the copy") == image, "nbdcopy out");

    let converted = dir.path().join("converted.img");
    run_ok("qemu-img", "qemu-utils", &["convert", "-f", "raw", "-O", "raw", &url, &path(&converted)]);
    assert!(std::fs::read(&converted).expect("read the conversion") == image, "qemu-img out");
    run_ok("qemu-img", "qemu-utils", &["compare", "-f", "raw", "-F", "raw", &path(&input), &url]);
}

#[test]
fn concurrent_qemu_io_clients() {
    let fixture = Fixture::start();
    const CLIENTS: u64 = 4;
    thread::scope(|scope| {
        for client in 0..CLIENTS {
            let url = fixture.url(DISK);
            scope.spawn(move || {
                let pattern = 0x21 + client;
                let offset = client << 20;
                qemu_io_ok(
                    &url,
                    &[],
                    &[&format!("write -P {pattern:#x} {offset} 1M"), &format!("read -P {pattern:#x} {offset} 1M")],
                );
            });
        }
    });
    for client in 0..CLIENTS {
        let pattern = byte(0x21 + client);
        assert_eq!(fixture.disk.bytes(client << 20, 1 << 20), vec![pattern; 1 << 20]);
    }
}

#[test]
fn unknown_export_fails_cleanly() {
    let fixture = Fixture::start();
    let output = qemu_io(&fixture.url("nope"), &[], &["read 0 4k"]);
    assert!(!output.status.success(), "{}", describe("qemu-io", &["nbd://.../nope"], &output));
    let output = run_tool("nbdinfo", "libnbd-bin", &[&fixture.url("nope")]);
    assert!(!output.status.success(), "{}", describe("nbdinfo", &["nbd://.../nope"], &output));

    // NBD_OPT_GO can say so and let the client choose again on the same connection.
    let mut raw = Raw::negotiating(fixture.addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    raw.send_option(OPT_GO, &info_data("nope", &[]));
    let reply = raw.read_option_reply();
    assert_eq!((reply.option, reply.reply_type), (OPT_GO, REP_ERR_UNKNOWN));
    raw.send_option(OPT_GO, &info_data(DISK, &[]));
    assert_eq!(raw.read_info_replies(OPT_GO), (DISK_BYTES, FLAGS_WRITABLE));
    raw.disconnect();

    // NBD_OPT_EXPORT_NAME cannot: the server closes.
    let mut raw = Raw::negotiating(fixture.addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    raw.send_option(OPT_EXPORT_NAME, b"nope");
    raw.expect_closed();
    assert_serves(fixture.addr);
}

// ---------------------------------------------------------------------------------------
// Handshake details.

#[test]
fn handshake_options() {
    let fixture = Fixture::start();
    // Without NO_ZEROES, so that EXPORT_NAME's 124 zero bytes are checked below.
    let mut raw = Raw::negotiating(fixture.addr, FLAG_C_FIXED_NEWSTYLE);

    // Structured replies take no data; metadata contexts need structured replies first.
    raw.send_option(OPT_STRUCTURED_REPLY, &[1]);
    let reply = raw.read_option_reply();
    assert_eq!((reply.option, reply.reply_type), (OPT_STRUCTURED_REPLY, REP_ERR_INVALID));
    raw.send_option(OPT_SET_META_CONTEXT, &meta_data(DISK, &["base:allocation"]));
    assert_eq!(raw.read_option_reply().reply_type, REP_ERR_INVALID);
    raw.send_option(0x4242, &[7; 100]);
    let reply = raw.read_option_reply();
    assert_eq!((reply.option, reply.reply_type), (0x4242, REP_ERR_UNSUP));

    raw.send_option(OPT_LIST, b"x");
    assert_eq!(raw.read_option_reply().reply_type, REP_ERR_INVALID);
    raw.send_option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let reply = raw.read_option_reply();
        assert_eq!(reply.option, OPT_LIST);
        match reply.reply_type {
            REP_SERVER => {
                let len = be_u32(&reply.data) as usize;
                names.push(String::from_utf8(reply.data[4..4 + len].to_vec()).expect("UTF-8"));
            }
            REP_ACK => break,
            other => panic!("unexpected reply {other:#x} to NBD_OPT_LIST"),
        }
    }
    assert_eq!(names, [DISK, RO, SLOW]);

    // Malformed: the request count says 2 but carries 1.
    let mut malformed = info_data(DISK, &[INFO_NAME]);
    let count_at = malformed.len() - 4;
    malformed[count_at..count_at + 2].copy_from_slice(&2u16.to_be_bytes());
    raw.send_option(OPT_INFO, &malformed);
    assert_eq!(raw.read_option_reply().reply_type, REP_ERR_INVALID);

    raw.send_option(OPT_INFO, &info_data(RO, &[INFO_NAME, INFO_BLOCK_SIZE]));
    let mut infos = BTreeMap::new();
    loop {
        let reply = raw.read_option_reply();
        assert_eq!(reply.option, OPT_INFO);
        if reply.reply_type == REP_ACK {
            break;
        }
        assert_eq!(reply.reply_type, REP_INFO);
        infos.insert(be_u16(&reply.data), reply.data[2..].to_vec());
    }
    let export = &infos[&INFO_EXPORT];
    assert_eq!(be_u64(export), RO_BYTES);
    assert_eq!(be_u16(&export[8..]), FLAGS_WRITABLE | FLAG_READ_ONLY);
    assert_eq!(infos[&INFO_NAME], RO.as_bytes());
    let block_size = &infos[&INFO_BLOCK_SIZE];
    assert_eq!((be_u32(block_size), be_u32(&block_size[4..]), be_u32(&block_size[8..])), (1, 4096, PAYLOAD_BYTES_MAX));

    // NBD_OPT_INFO left the connection negotiating; EXPORT_NAME now enters transmission.
    raw.send_option(OPT_EXPORT_NAME, DISK.as_bytes());
    let reply = raw.read_exact(8 + 2 + 124);
    assert_eq!(be_u64(&reply), DISK_BYTES);
    assert_eq!(be_u16(&reply[8..]), FLAGS_WRITABLE);
    assert!(reply[10..].iter().all(|&byte| byte == 0));
    raw.send_request(0, CMD_READ, 9, 0, 512);
    assert_eq!(raw.read_reply(), (0, 9));
    assert_eq!(raw.read_exact(512), vec![0; 512]);
    raw.disconnect();

    // NBD_OPT_ABORT is acknowledged, then the server closes.
    let mut raw = Raw::negotiating(fixture.addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    raw.send_option(OPT_ABORT, &[]);
    let reply = raw.read_option_reply();
    assert_eq!((reply.option, reply.reply_type), (OPT_ABORT, REP_ACK));
    raw.expect_closed();
}

/// Structured replies and `base:allocation` over the wire, on a connection served on
/// threads (an export without a poller of its own): the option replies, a read answered
/// with one `OFFSET_DATA` chunk, a refused read with an `ERROR` chunk, block status with
/// the zero and data extents, and block status refused without the context.
#[test]
fn structured_replies_and_block_status() {
    let fixture = Fixture::start();
    let mut raw = Raw::negotiating(fixture.addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    raw.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(raw.read_option_reply().reply_type, REP_ACK);
    // LIST with no query lists the one context; a query of another namespace finds none.
    raw.send_option(OPT_LIST_META_CONTEXT, &meta_data(DISK, &[]));
    let reply = raw.read_option_reply();
    assert_eq!(reply.reply_type, REP_META_CONTEXT);
    assert_eq!(&reply.data[4..], b"base:allocation");
    assert_eq!(raw.read_option_reply().reply_type, REP_ACK);
    raw.send_option(OPT_LIST_META_CONTEXT, &meta_data(DISK, &["qemu:dirty-bitmap:x"]));
    assert_eq!(raw.read_option_reply().reply_type, REP_ACK);
    raw.send_option(OPT_SET_META_CONTEXT, &meta_data("nope", &["base:allocation"]));
    assert_eq!(raw.read_option_reply().reply_type, REP_ERR_UNKNOWN_EXPORT);
    // A count of queries the data does not hold.
    let mut bad = meta_data(DISK, &["base:allocation"]);
    let at = 4 + DISK.len();
    bad[at..at + 4].copy_from_slice(&2u32.to_be_bytes());
    raw.send_option(OPT_SET_META_CONTEXT, &bad);
    assert_eq!(raw.read_option_reply().reply_type, REP_ERR_INVALID);
    raw.send_option(OPT_SET_META_CONTEXT, &meta_data(DISK, &["base:allocation"]));
    let reply = raw.read_option_reply();
    assert_eq!(reply.reply_type, REP_META_CONTEXT);
    let id = be_u32(&reply.data);
    assert_ne!(id, 0);
    assert_eq!(raw.read_option_reply().reply_type, REP_ACK);
    raw.send_option(OPT_GO, &info_data(DISK, &[]));
    raw.read_info_replies(OPT_GO);

    let chunk = |raw: &mut Raw| {
        let h = raw.read_exact(20);
        assert_eq!(be_u32(&h), 0x668e_33ef, "a structured reply chunk");
        assert_eq!(be_u16(&h[4..]), 1, "the DONE flag");
        let len = be_u32(&h[16..]) as usize;
        (be_u16(&h[6..]), be_u64(&h[8..]), raw.read_exact(len))
    };
    // A write of one block at 64 KiB, then a read of it: one OFFSET_DATA chunk.
    raw.send_request(0, CMD_WRITE, 1, 65536, 4096);
    raw.send(&[0x5a; 4096]);
    assert_eq!(raw.read_reply(), (0, 1));
    raw.send_request(0, CMD_READ, 2, 65536, 4096);
    let (kind, cookie, data) = chunk(&mut raw);
    assert_eq!((kind, cookie), (1, 2));
    assert_eq!(be_u64(&data), 65536);
    assert!(data[8..].iter().all(|&b| b == 0x5a) && data.len() == 8 + 4096);
    // A read past the end: an ERROR chunk (EINVAL), never a simple reply.
    raw.send_request(0, CMD_READ, 3, DISK_BYTES, 512);
    let (kind, cookie, data) = chunk(&mut raw);
    assert_eq!((kind, cookie), ((1 << 15) + 1, 3));
    assert_eq!(be_u32(&data), 22);
    // Block status of [0, 128 KiB): zero, the written block, zero.
    raw.send_request(0, CMD_BLOCK_STATUS, 4, 0, 131072);
    let (kind, cookie, data) = chunk(&mut raw);
    assert_eq!((kind, cookie), (5, 4));
    let words: Vec<u32> = data.chunks_exact(4).map(be_u32).collect();
    assert_eq!(words, vec![id, 65536, 2, 4096, 0, 131072 - 65536 - 4096, 2]);
    // REQ_ONE: the first extent alone.
    raw.send_request(1 << 3, CMD_BLOCK_STATUS, 5, 0, 131072);
    let (_, _, data) = chunk(&mut raw);
    assert_eq!(data.chunks_exact(4).map(be_u32).collect::<Vec<_>>(), vec![id, 65536, 2]);
    raw.disconnect();

    // Without SET_META_CONTEXT, block status is refused.
    let (mut raw, _, _) = Raw::go(fixture.addr, DISK);
    raw.send_request(0, CMD_BLOCK_STATUS, 6, 0, 4096);
    assert_eq!(raw.read_reply(), (22, 6));
    raw.disconnect();
    assert_serves(fixture.addr);
}

// ---------------------------------------------------------------------------------------
// Hostile clients. After each, the server must still serve a good client.

#[test]
fn garbage_instead_of_handshake() {
    let fixture = Fixture::start();
    let mut raw = Raw::connect(fixture.addr);
    raw.send(b"GET / HTTP/1.1\r\nHost: nbd\r\n\r\n");
    raw.drain_until_closed();

    // A client that never sets FIXED_NEWSTYLE is refused too.
    let mut raw = Raw::negotiating(fixture.addr, 0);
    raw.expect_closed();

    // Bad option magic.
    let mut raw = Raw::negotiating(fixture.addr, FLAG_C_FIXED_NEWSTYLE);
    raw.send(&[0xff; 16]);
    raw.expect_closed();

    // An option length that would make the server buffer a gigabyte.
    let mut raw = Raw::negotiating(fixture.addr, FLAG_C_FIXED_NEWSTYLE);
    let mut option = IHAVEOPT.to_be_bytes().to_vec();
    option.extend_from_slice(&OPT_GO.to_be_bytes());
    option.extend_from_slice(&(1u32 << 30).to_be_bytes());
    raw.send(&option);
    raw.expect_closed();

    // Connect and leave at once.
    drop(Raw::connect(fixture.addr));
    assert_serves(fixture.addr);
}

#[test]
fn bad_request_magic_closes_the_connection() {
    let fixture = Fixture::start();
    let (mut raw, _, _) = Raw::go(fixture.addr, DISK);
    let mut bad = request(0, CMD_READ, 1, 0, 4096, &[]);
    bad[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    raw.send(&bad);
    raw.expect_closed();
    assert_serves(fixture.addr);
}

#[test]
fn oversized_write_closes_the_connection() {
    let fixture = Fixture::start();
    let (mut raw, _, _) = Raw::go(fixture.addr, DISK);
    raw.send_request(0, CMD_WRITE, 1, 0, PAYLOAD_BYTES_MAX + 1);
    raw.expect_closed();

    let (mut raw, _, _) = Raw::go(fixture.addr, DISK);
    raw.send_request(0, CMD_WRITE, 1, 0, u32::MAX);
    raw.expect_closed();

    // A write of the largest allowed length past the end of the export: the payload is
    // skipped, the write refused, and the stream stays in step.
    let (mut raw, _, _) = Raw::go(fixture.addr, DISK);
    let len = PAYLOAD_BYTES_MAX;
    raw.send(&request(0, CMD_WRITE, 2, 0, len, &vec![0x77; len as usize]));
    assert_eq!(raw.read_reply(), (EINVAL, 2));
    raw.send_request(0, CMD_READ, 3, 0, 4096);
    assert_eq!(raw.read_reply(), (0, 3));
    assert_eq!(raw.read_exact(4096), vec![0; 4096]);
    raw.disconnect();
    assert_eq!(fixture.disk.stat(|s| &s.writes), 0);
    assert_serves(fixture.addr);
}

#[test]
fn truncated_request_then_close() {
    let fixture = Fixture::start();
    let (mut raw, _, _) = Raw::go(fixture.addr, DISK);
    raw.send(&request(0, CMD_READ, 1, 0, 4096, &[])[..10]);
    raw.stream.shutdown(Shutdown::Write).expect("half-close");
    raw.expect_closed();

    // A write whose payload stops short is never submitted.
    let (mut raw, _, _) = Raw::go(fixture.addr, DISK);
    raw.send(&request(0, CMD_WRITE, 2, 0, 4096, &[0x99; 4096])[..28 + 100]);
    raw.stream.shutdown(Shutdown::Write).expect("half-close");
    raw.expect_closed();
    assert_eq!(fixture.disk.stat(|s| &s.writes), 0);
    assert_serves(fixture.addr);
}

#[test]
fn invalid_requests_get_einval_and_the_connection_stays_usable() {
    let fixture = Fixture::start();
    let (mut raw, _, _) = Raw::go(fixture.addr, DISK);
    let invalid: [(u16, u16, u64, u32); 10] = [
        (0, CMD_READ, DISK_BYTES - 4096, 8192),    // past the end
        (0, CMD_READ, DISK_BYTES, 1),              // at the end
        (0, CMD_READ, u64::MAX - 10, 100),         // offset + length overflows
        (0, CMD_READ, 0, 0),                       // empty
        (0, CMD_READ, 0, PAYLOAD_BYTES_MAX + 1),   // too long
        (1 << 5, CMD_READ, 0, 4096),               // unknown flag
        (0, 42, 0, 4096),                          // unknown command
        (0, CMD_TRIM, DISK_BYTES - 1, 2),          // past the end
        (0, CMD_WRITE_ZEROES, u64::MAX, u32::MAX), // overflows
        (1 << 4, CMD_WRITE_ZEROES, 0, 4096),       // FAST_ZERO was not offered
    ];
    for (index, &(flags, command, offset, len)) in invalid.iter().enumerate() {
        raw.send_request(flags, command, cookie(index as u64), offset, len);
        assert_eq!(
            raw.read_reply(),
            (EINVAL, cookie(index as u64)),
            "request {index}: flags {flags:#x} command {command} offset {offset} length {len}"
        );
    }
    // An empty write carries no payload and is refused too.
    raw.send_request(0, CMD_WRITE, 100, 0, 0);
    assert_eq!(raw.read_reply(), (EINVAL, 100));

    // Valid requests at the very end of the export still work.
    let tail = DISK_BYTES - 4096;
    raw.send(&request(CMD_FLAG_FUA, CMD_WRITE, 101, tail, 4096, &[0x42; 4096]));
    assert_eq!(raw.read_reply(), (0, 101));
    raw.send_request(0, CMD_READ, 102, tail, 4096);
    assert_eq!(raw.read_reply(), (0, 102));
    assert_eq!(raw.read_exact(4096), vec![0x42; 4096]);
    raw.send_request(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 103, tail, 4096);
    assert_eq!(raw.read_reply(), (0, 103));
    raw.send_request(0, CMD_FLUSH, 104, 0, 0);
    assert_eq!(raw.read_reply(), (0, 104));
    raw.disconnect();
    assert_eq!(fixture.disk.bytes(tail, 4096), vec![0; 4096]);
    assert_eq!(fixture.disk.stat(|s| &s.fua), 2);
    assert_serves(fixture.addr);
}

// ---------------------------------------------------------------------------------------
// Pipelining.

#[test]
fn pipelined_writes_and_reads_match_cookies() {
    const REQUESTS: u64 = 32;
    let fixture = Fixture::start();
    let (mut raw, _, _) = Raw::go(fixture.addr, SLOW);
    let pattern = |index: u64| byte(0x40 + index);

    // All writes go out before any reply is read.
    let mut batch = Vec::new();
    for index in 0..REQUESTS {
        let payload = vec![pattern(index); 4096];
        batch.extend_from_slice(&request(0, CMD_WRITE, cookie(index), index * 4096, 4096, &payload));
    }
    raw.send(&batch);
    let mut order = Vec::new();
    for _ in 0..REQUESTS {
        let (error, cookie) = raw.read_reply();
        assert_eq!(error, 0);
        order.push(cookie);
    }
    let expected: HashSet<u64> = (0..REQUESTS).map(cookie).collect();
    assert_eq!(order.iter().copied().collect::<HashSet<_>>(), expected);
    assert_eq!(order.len(), expected.len(), "one reply per request");
    // The slow export finishes odd blocks late, so replies must have come out of order.
    assert_ne!(order, (0..REQUESTS).map(cookie).collect::<Vec<_>>());

    // Reads: each reply's data must belong to the cookie it carries.
    let mut batch = Vec::new();
    for index in 0..REQUESTS {
        batch.extend_from_slice(&request(0, CMD_READ, cookie(REQUESTS + index), index * 4096, 4096, &[]));
    }
    raw.send(&batch);
    let mut seen = HashSet::new();
    for _ in 0..REQUESTS {
        let (error, reply_cookie) = raw.read_reply();
        assert_eq!(error, 0);
        let index =
            (0..REQUESTS).find(|&index| cookie(REQUESTS + index) == reply_cookie).expect("a cookie that was sent");
        assert!(seen.insert(index), "cookie {reply_cookie:#x} answered twice");
        assert_eq!(raw.read_exact(4096), vec![pattern(index); 4096]);
    }
    raw.disconnect();
    for index in 0..REQUESTS {
        assert_eq!(fixture.slow.bytes(index * 4096, 4096), vec![pattern(index); 4096]);
    }
}

#[test]
fn more_requests_than_the_in_flight_bound() {
    const REQUESTS: u64 = 2000;
    let fixture = Fixture::start();
    let (mut raw, _, _) = Raw::go(fixture.addr, DISK);
    let mut sender = raw.stream.try_clone().expect("clone the socket");
    // Writes go to the first 1 MiB, reads to the second: they may complete in any order.
    let writer = thread::spawn(move || {
        for index in 0..REQUESTS {
            let slot = index % 256;
            let bytes = if index % 2 == 0 {
                request(0, CMD_WRITE, cookie(index), slot * 4096, 4096, &[byte(slot); 4096])
            } else {
                request(0, CMD_READ, cookie(index), (1 << 20) + slot * 4096, 4096, &[])
            };
            sender.write_all(&bytes).expect("send a request");
        }
    });
    let indices: HashMap<u64, u64> = (0..REQUESTS).map(|index| (cookie(index), index)).collect();
    let mut seen = HashSet::new();
    for _ in 0..REQUESTS {
        let (error, reply_cookie) = raw.read_reply();
        assert_eq!(error, 0);
        assert!(seen.insert(reply_cookie), "cookie {reply_cookie:#x} answered twice");
        // Odd cookies are reads; their data is zero.
        let index = indices[&reply_cookie];
        if index % 2 == 1 {
            assert_eq!(raw.read_exact(4096), vec![0; 4096]);
        }
    }
    writer.join().expect("request sender");
    raw.disconnect();
}

#[test]
fn disconnect_waits_for_in_flight_replies() {
    const REQUESTS: u64 = 16;
    let fixture = Fixture::start();
    let (mut raw, _, _) = Raw::go(fixture.addr, SLOW);
    // Odd blocks only, so that every write is still in flight when DISC arrives.
    let mut batch = Vec::new();
    for index in 0..REQUESTS {
        let offset = (2 * index + 1) * 4096;
        batch.extend_from_slice(&request(0, CMD_WRITE, cookie(index), offset, 4096, &[0x33; 4096]));
    }
    batch.extend_from_slice(&request(0, CMD_DISC, 0, 0, 0, &[]));
    raw.send(&batch);
    let mut seen = HashSet::new();
    for _ in 0..REQUESTS {
        let (error, reply_cookie) = raw.read_reply();
        assert_eq!(error, 0);
        seen.insert(reply_cookie);
    }
    assert_eq!(seen, (0..REQUESTS).map(cookie).collect());
    raw.expect_closed();
    for index in 0..REQUESTS {
        assert_eq!(fixture.slow.bytes((2 * index + 1) * 4096, 4096), vec![0x33; 4096]);
    }
}

#[test]
fn shutdown_closes_connections() {
    let mut fixture = Fixture::start();
    let (mut raw, _, _) = Raw::go(fixture.addr, DISK);
    let server = fixture.server.take().expect("running");
    server.shutdown().expect("clean shutdown");
    raw.expect_closed();
    assert!(TcpStream::connect(fixture.addr).is_err(), "the listener is closed");
}
