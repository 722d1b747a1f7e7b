//! Real NBD clients against a node: Debian's qemu-io, qemu-img, nbdinfo and nbdcopy on the
//! primary and on the read-only mirror export, and garbage on the NBD port while a checked
//! writer carries on.
//!
//! The Debian tools are required: where one is missing the test fails and names the
//! package to install (`apt-get install qemu-utils libnbd-bin`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use nvmirror_dataplane::frontend::nbd_client::NbdClient;
use nvmirror_dataplane::usize_of;

const VOL: &str = "vol";
const SIZE: u64 = 32 * MIB;

/// The path of `tool`, or a failure that names the Debian package that provides it.
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("{name} is not installed: this test needs the Debian package {package} (apt-get install {package})")
    })
}

/// Runs a client tool, bounded in time; returns its output with stdout and stderr joined.
fn client(program: &Path, args: &[&str]) -> (Output, String) {
    let child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    let what = format!("{} {}", program.display(), args.join(" "));
    let out = wait_output(child, Duration::from_secs(120), &what).unwrap_or_else(|e| panic!("{e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("$ {what}\n  exit {:?}: {}", out.status.code(), text.trim().replace('\n', "\n  "));
    (out, text)
}

fn ok(program: &Path, args: &[&str]) -> String {
    let (out, text) = client(program, args);
    assert!(out.status.success(), "{} {} failed: {text}", program.display(), args.join(" "));
    text
}

fn random_file(path: &Path, len: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; usize_of(len)];
    Rng::new(seed).fill(&mut data);
    std::fs::write(path, &data).expect("write image file");
    data
}

fn nbdinfo_export(nbdinfo: &Path, uri: &str) -> serde_json::Value {
    let text = ok(nbdinfo, &["--json", uri]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("nbdinfo --json: {e}: {text}"));
    v["exports"][0].clone()
}

#[test]
fn debian_nbd_clients_on_primary_and_mirror() {
    let qemu_io = tool("qemu-io", "qemu-utils");
    let qemu_img = tool("qemu-img", "qemu-utils");
    let nbdinfo = tool("nbdinfo", "libnbd-bin");
    let nbdcopy = tool("nbdcopy", "libnbd-bin");
    let seed = base_seed("debian_nbd_clients_on_primary_and_mirror");

    let pair = Pair::start("clients");
    pair.create_mirrored(VOL, SIZE, LOG_BYTES_MIN);
    let primary = format!("nbd://{}/{VOL}", pair.src.nbd);
    let mirror_uri = format!("nbd://{}/{VOL}", pair.dst.nbd);
    let files = pair.root.join("files");
    std::fs::create_dir_all(&files).expect("mkdir");

    // nbdinfo: size and the read-only flag of each export.
    let p = nbdinfo_export(&nbdinfo, &primary);
    assert_eq!(p["export-size"], SIZE, "{p}");
    assert_eq!(p["is_read_only"], false, "the primary is exported read-only: {p}");
    let m = nbdinfo_export(&nbdinfo, &mirror_uri);
    assert_eq!(m["export-size"], SIZE, "{m}");
    assert_eq!(m["is_read_only"], true, "the mirror is exported writable: {m}");

    // qemu-io on the primary: write a pattern, read it back; a wrong pattern is noticed.
    let text = ok(&qemu_io, &["-f", "raw", "-c", "write -P 0xab 1M 1M", "-c", "read -P 0xab 1M 1M", &primary]);
    assert!(text.contains("wrote 1048576/1048576"), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    let (_, text) = client(&qemu_io, &["-f", "raw", "-c", "read -P 0xcd 1M 64k", &primary]);
    assert!(text.contains("Pattern verification failed"), "qemu-io accepted a wrong pattern: {text}");

    // The mirror shows the volume as of the last CP: not yet the new pattern.
    let (_, text) = client(&qemu_io, &["-r", "-f", "raw", "-c", "read -P 0xab 1M 1M", &mirror_uri]);
    assert!(text.contains("Pattern verification failed"), "the mirror showed data of an unfinished CP: {text}");
    // The mirror export refuses writes, through qemu-io and through a raw NBD write.
    let (out, text) = client(&qemu_io, &["-f", "raw", "-c", "write -P 0x11 0 64k", &mirror_uri]);
    assert!(
        !out.status.success() || !text.contains("wrote 65536/65536"),
        "qemu-io wrote to the read-only mirror export: {text}"
    );
    let lower = text.to_lowercase();
    assert!(
        lower.contains("permission denied") || lower.contains("read-only") || lower.contains("read only"),
        "qemu-io's write to the mirror failed for another reason than its being read-only: {text}"
    );
    let mut raw = NbdClient::connect(pair.dst.nbd.as_str(), VOL).expect("NBD connect to the mirror");
    assert!(raw.read_only);
    assert!(raw.write(0, &[0x11; 4096]).is_err(), "an NBD write to the mirror export succeeded");

    // After a CP the mirror holds what was written; the failed writes left no trace.
    let n = cp(&pair.src_api(), VOL).expect("CP");
    let text = ok(&qemu_io, &["-r", "-f", "raw", "-c", "read -P 0xab 1M 1M", "-c", "read -P 0 0 64k", &mirror_uri]);
    assert!(!text.contains("Pattern verification failed"), "mirror after CP {n}: {text}");
    let text = ok(&qemu_img, &["compare", "-f", "raw", "-F", "raw", &primary, &mirror_uri]);
    assert!(text.contains("identical"), "{text}");

    // nbdcopy into the primary and out of it.
    let input = files.join("in.img");
    let data = random_file(&input, SIZE, seed);
    ok(&nbdcopy, &[input.to_str().expect("utf-8"), &primary]);
    let output = files.join("out.img");
    ok(&nbdcopy, &[&primary, output.to_str().expect("utf-8")]);
    let back = std::fs::read(&output).expect("read nbdcopy's output");
    assert!(
        first_difference(&data, &back).is_none(),
        "nbdcopy out != nbdcopy in at {:?}",
        first_difference(&data, &back)
    );
    let text = ok(&qemu_img, &["compare", "-f", "raw", "-F", "raw", input.to_str().expect("utf-8"), &primary]);
    assert!(text.contains("identical"), "{text}");
    // qemu-img compare notices a difference (so "identical" above means something).
    let other = files.join("other.img");
    random_file(&other, SIZE, seed ^ 1);
    let (out, text) =
        client(&qemu_img, &["compare", "-f", "raw", "-F", "raw", other.to_str().expect("utf-8"), &primary]);
    assert_eq!(out.status.code(), Some(1), "qemu-img compare of different images: {text}");

    // qemu-img convert into the primary (with zero runs: write-zeroes or trim), a CP, then
    // out of the mirror: the mirror holds exactly the converted image.
    let mut mixed = random_file(&files.join("tmp.img"), SIZE, seed ^ 2);
    mixed[usize_of(4 * MIB)..usize_of(12 * MIB)].fill(0);
    mixed[usize_of(20 * MIB)..usize_of(20 * MIB) + 4096].fill(0);
    let mixed_path = files.join("mixed.img");
    std::fs::write(&mixed_path, &mixed).expect("write mixed image");
    ok(&qemu_img, &["convert", "-n", "-f", "raw", "-O", "raw", mixed_path.to_str().expect("utf-8"), &primary]);
    let n = cp(&pair.src_api(), VOL).expect("CP");
    let converted = files.join("converted.img");
    ok(&qemu_img, &["convert", "-f", "raw", "-O", "raw", &mirror_uri, converted.to_str().expect("utf-8")]);
    let back = std::fs::read(&converted).expect("read converted image");
    assert!(
        first_difference(&mixed, &back).is_none(),
        "mirror after CP {n} differs from what qemu-img convert wrote to the primary at {:?}",
        first_difference(&mixed, &back)
    );
    let text = ok(&qemu_img, &["compare", "-f", "raw", "-F", "raw", &primary, &mirror_uri]);
    assert!(text.contains("identical"), "{text}");
    // nbdcopy out of the mirror export too.
    let from_mirror = files.join("from-mirror.img");
    ok(&nbdcopy, &[&mirror_uri, from_mirror.to_str().expect("utf-8")]);
    assert!(std::fs::read(&from_mirror).expect("read") == mixed, "nbdcopy out of the mirror differs");
}

/// Garbage on the NBD port (raw bytes, half handshakes, a bad request magic, an unknown
/// export, many idle half-open connections) while a checked writer runs on another
/// connection: the writer sees no error, keeps progressing, and its writes verify.
#[test]
fn nbd_port_garbage_does_not_disturb_a_writer() {
    let seed = base_seed("nbd_port_garbage_does_not_disturb_a_writer");
    let mut rng = Rng::new(seed);
    let pair = Pair::start("nbdfuzz");
    pair.create_mirrored(VOL, 16 * MIB, LOG_BYTES_MIN);
    let nbd = pair.src.nbd.clone();

    let writer = BackgroundWriter::start(nbd.as_str(), VOL, seed);
    let acks_at_start = writer.acks_at_start;
    let t = Duration::from_secs(40);
    let greeting = |b: &[u8]| b.len() >= 18 && b[..8] == *b"NBDMAGIC" && b[8..16] == *b"IHAVEOPT";

    // 1. Raw garbage: the server greets, then drops the connection on the bad client flags.
    let mut g = vec![0u8; 4096];
    rng.fill(&mut g);
    g[0] = 0xff; // unknown client flag bits
    let mut s = TcpStream::connect(&nbd).expect("connect");
    s.set_read_timeout(Some(t)).expect("timeout");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("greeting");
    assert!(greeting(&hello), "no NBD greeting");
    let _ = s.write_all(&g);
    let (b, end) = read_until_close(&mut s);
    println!("nbd garbage: {} bytes back, then {end:?}", b.len());
    assert!(b.is_empty(), "the server answered garbage client flags with {} bytes", b.len());
    assert!(matches!(end, ReadEnd::Closed | ReadEnd::Reset), "garbage: the connection stayed open ({end:?})");
    // And garbage straight away, before reading anything.
    let (_, end) = raw_exchange(&nbd, &g, false, t);
    assert!(matches!(end, ReadEnd::Closed | ReadEnd::Reset), "garbage: the connection stayed open ({end:?})");

    // 2. Half handshakes: client flags and half an option header, left hanging while the
    //    writer writes; and many idle connections that never say anything.
    let mut half = TcpStream::connect(&nbd).expect("connect");
    let mut hello = [0u8; 18];
    half.read_exact(&mut hello).expect("greeting");
    assert!(greeting(&hello));
    half.write_all(&1u32.to_be_bytes()).expect("client flags");
    half.write_all(b"IHAVEOPT\x00\x00").expect("half an option");
    let idle: Vec<TcpStream> = (0..32).map(|_| TcpStream::connect(&nbd).expect("connect")).collect();
    let a = writer.acks();
    wait_for("the writer to progress past the half-open connections", Duration::from_secs(30), || {
        Ok((writer.acks() > a + 200).then_some(()))
    });

    // 3. An option with an absurd length, a full handshake then a bad request magic, an
    //    unknown export: each closes (or refuses) its own connection only.
    let mut opt = 1u32.to_be_bytes().to_vec();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&u32::MAX.to_be_bytes());
    let (b, end) = raw_exchange(&nbd, &opt, false, t);
    println!("nbd huge option: {} bytes back, then {end:?}", b.len());
    assert!(matches!(end, ReadEnd::Closed | ReadEnd::Reset), "huge option: the connection stayed open ({end:?})");

    let mut c = NbdClient::connect(nbd.as_str(), VOL).expect("handshake");
    c.send(0, 1, 0, 4096, &[]).expect("a good request first");
    let r = c.recv(Some(&mut [0u8; 4096])).expect("its reply");
    assert_eq!(r.error, 0);
    drop(c);
    let mut s = TcpStream::connect(&nbd).expect("connect");
    s.set_read_timeout(Some(t)).expect("timeout");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("greeting");
    let mut go = 1u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"IHAVEOPT");
    go.extend_from_slice(&1u32.to_be_bytes()); // EXPORT_NAME
    go.extend_from_slice(&u32::try_from(VOL.len()).expect("short").to_be_bytes());
    go.extend_from_slice(VOL.as_bytes());
    s.write_all(&go).expect("export name");
    let mut info = [0u8; 10];
    s.read_exact(&mut info).expect("export info");
    assert_eq!(u64::from_be_bytes(info[..8].try_into().expect("8")), 16 * MIB);
    let mut bad = [0u8; 28];
    rng.fill(&mut bad);
    let _ = s.write_all(&bad);
    let (b, end) = read_until_close(&mut s);
    println!("nbd bad request magic: {} bytes back, then {end:?}", b.len());
    assert!(b.len() <= 124, "the server answered a request with a bad magic");
    assert!(matches!(end, ReadEnd::Closed | ReadEnd::Reset), "bad magic: the connection stayed open ({end:?})");

    let e = NbdClient::connect(nbd.as_str(), "no-such-volume").err().expect("an unknown export is refused");
    println!("nbd unknown export: {e}");

    drop(half);
    drop(idle);
    let acks_before_stop = writer.acks();
    let w = writer.finish();
    println!(
        "nbdfuzz: writer {} writes, {} acked, {} failed ({} acks during the garbage)",
        w.writes,
        w.acks,
        w.errors,
        acks_before_stop - acks_at_start
    );
    assert_eq!(w.errors, 0, "the writer saw errors while garbage came in on other connections");
    assert!(acks_before_stop > acks_at_start + 200, "the writer stalled during the garbage");
    let v = verify(&w, &nbd, VOL).expect("verify the primary");
    assert_verified(&v, "primary after NBD garbage");
    cp(&pair.src_api(), VOL).expect("CP");
    let v = verify(&w, &pair.dst.nbd, VOL).expect("verify the mirror");
    assert_verified(&v, "mirror after NBD garbage and a CP");
}

/// The extents `nbdinfo --map --json` reports for `uri`: (offset, length, type).
fn nbd_map(nbdinfo: &Path, uri: &str) -> Vec<(u64, u64, u64)> {
    let text = ok(nbdinfo, &["--map", "--json", uri]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("nbdinfo --map: {e}: {text}"));
    v.as_array()
        .unwrap_or_else(|| panic!("nbdinfo --map printed no list: {text}"))
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap()))
        .collect()
}

/// Whether the map calls every byte of `[from, to)` zero (`want_zero`) or data.
fn map_says(map: &[(u64, u64, u64)], from: u64, to: u64, want_zero: bool) -> bool {
    map.iter().filter(|(o, l, _)| *o < to && o + l > from).all(|(_, _, t)| (t & 2 != 0) == want_zero)
}

/// Block status (`base:allocation`) through structured replies, on the primary (served by
/// its poller) and on the mirror (served on threads): `nbdinfo --map` sees the data and the
/// zeroes where they are, the extents cover the export end to end, and `nbdcopy
/// --destination-is-zero` skips the zero extents, leaving its output sparse.
#[test]
fn block_status_reports_zero_extents_and_copies_skip_them() {
    let nbdinfo = tool("nbdinfo", "libnbd-bin");
    let nbdcopy = tool("nbdcopy", "libnbd-bin");
    let qemu_io = tool("qemu-io", "qemu-utils");
    let pair = Pair::start("blockstatus");
    pair.create_mirrored(VOL, SIZE, LOG_BYTES_MIN);
    let primary = format!("nbd://{}/{VOL}", pair.src.nbd);
    let mirror_uri = format!("nbd://{}/{VOL}", pair.dst.nbd);
    // Data at [1 MiB, 2 MiB) and one block at 20 MiB + 8 KiB; zeroes elsewhere.
    ok(&qemu_io, &["-f", "raw", "-c", "write -P 0x5a 1M 1M", "-c", "write -P 0x33 20488k 4k", &primary]);
    cp(&pair.src_api(), VOL).expect("CP");
    for uri in [&primary, &mirror_uri] {
        let map = nbd_map(&nbdinfo, uri);
        let mut end = 0;
        for (o, l, _) in &map {
            assert_eq!(*o, end, "{uri}: extents leave a gap or overlap at {end}: {map:?}");
            end = o + l;
        }
        assert_eq!(end, SIZE, "{uri}: the extents do not cover the export: {map:?}");
        assert!(map_says(&map, 0, MIB, true), "{uri}: [0, 1M) is zero: {map:?}");
        assert!(map_says(&map, MIB, 2 * MIB, false), "{uri}: [1M, 2M) holds data: {map:?}");
        assert!(map_says(&map, 2 * MIB, 20 * MIB + 8192, true), "{uri}: [2M, 20M+8K) is zero: {map:?}");
        assert!(map_says(&map, 20 * MIB + 8192, 20 * MIB + 12288, false), "{uri}: the block at 20M+8K: {map:?}");
        assert!(map_says(&map, 20 * MIB + 12288, SIZE, true), "{uri}: the rest is zero: {map:?}");
    }
    // A copy that trusts the map writes the data extents only.
    let out = pair.root.join("sparse-copy.img");
    std::fs::File::create(&out).expect("create").set_len(SIZE).expect("size");
    ok(&nbdcopy, &["--destination-is-zero", &primary, out.to_str().expect("utf-8")]);
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&out).expect("stat").blocks() * 512;
    assert!(
        allocated <= 2 * MIB,
        "nbdcopy wrote {allocated} bytes of a {SIZE}-byte copy holding 1 MiB + 4 KiB of data"
    );
    let back = std::fs::read(&out).expect("read the copy");
    assert!(back[usize_of(MIB)..usize_of(2 * MIB)].iter().all(|&b| b == 0x5a), "the data extent was not copied");
    assert!(back[usize_of(20 * MIB + 8192)..usize_of(20 * MIB + 12288)].iter().all(|&b| b == 0x33));
    assert!(back[..usize_of(MIB)].iter().all(|&b| b == 0), "zeroes where the volume has zeroes");
}

/// A volume's allow-list: a client from an address it does not hold is refused in the
/// handshake (NBD_REP_ERR_POLICY to nbdinfo, and the export is not listed); set to hold
/// it, or emptied, the client attaches.
#[test]
fn an_allow_list_refuses_clients_from_other_addresses() {
    let nbdinfo = tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().expect("tempdir");
    let node = nvmirror_control::cluster::NodeProc::start(&bin(), "allow", &dir.path().join("n"), &[]).expect("node");
    let ctl = |args: &[&str]| ctl_ok(&node.control, args);
    ctl(&["volume", "create", "v", "--size", "8M", "--allow", "10.9.9.0/24", "--allow", "fd00::/8"]);
    let s: serde_json::Value = serde_json::from_str(&ctl(&["status", "v", "--json"])).expect("status");
    assert_eq!(s["volumes"][0]["allow"], serde_json::json!(["10.9.9.0/24", "fd00::/8"]), "{s}");
    let uri = format!("nbd://{}/v", node.nbd);
    let (out, text) = client(&nbdinfo, &[&uri]);
    assert!(!out.status.success(), "a client outside the allow-list attached: {text}");
    // libnbd reports NBD_REP_ERR_POLICY as an error reply to its NBD_OPT_GO (as ENOTSUP).
    assert!(text.contains("server replied with error to opt_go request"), "{text}");
    let e = NbdClient::connect(node.nbd.as_str(), "v").err().expect("refused");
    assert!(e.to_string().contains("does not admit your address"), "{e}");
    let (_, list) = client(&nbdinfo, &["--list", &format!("nbd://{}", node.nbd)]);
    assert!(!list.contains("export=\"v\""), "an export it may not use is listed: {list}");

    ctl(&["volume", "allow", "v", "127.0.0.0/8"]);
    ok(&nbdinfo, &[&uri]);
    let list = ok(&nbdinfo, &["--list", &format!("nbd://{}", node.nbd)]);
    assert!(list.contains("export=\"v\""), "an export it may use is not listed: {list}");
    ctl(&["volume", "allow", "v"]);
    NbdClient::connect(node.nbd.as_str(), "v").expect("an empty allow-list admits everyone");
    // Malformed entries: a usage error of the node's answer, nothing changed.
    assert_eq!(ctl_fails(&node.control, &["volume", "allow", "v", "10.0.0.0/40"], "prefix 0 to 32"), 2);
    assert_eq!(
        ctl_fails(&node.control, &["volume", "create", "w", "--size", "8M", "--allow", "host"], "not an address"),
        2
    );
}
