//! The writer and the checker of the `power-cut` test (hw-tests/power-cut): checked 4 KiB
//! writes through NBD whose acknowledgements are recorded where the power cut cannot reach
//! (the results share, on the host), and, after the guest booted again, the volume read
//! back against that record.
//!
//! `write ADDR EXPORT BLOCKS RECORD [QD]`: writes self-describing blocks
//! (`nvmirror_control::workload::block_data`) at random among the first `BLOCKS` of the
//! export, `QD` in flight (default 8), each version once. After each acknowledgement it
//! appends `BLOCK VERSION` to `RECORD` in one `write`. It stops after `WRITES_MAX` writes or
//! `SECONDS_MAX`, or when the connection ends; the test cuts the power long before.
//!
//! `verify ADDR EXPORT BLOCKS RECORD`: for every block the record names, the block must
//! hold its last acknowledged version or a later one (written, its acknowledgement lost
//! with the power); an older version is a lost acknowledged write, a block that matches no
//! write is torn. Prints one line, `acked=N blocks=M verified=V newer=W lost=L torn=T`,
//! and the first problems; exits 1 if any write was lost or torn.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nvmirror_control::workload::{block_data, identify, BLOCK};
use nvmirror_dataplane::frontend::nbd_client::{NbdClient, CMD_WRITE};

const WRITES_MAX: u64 = 2_000_000;
const BLOCK_U32: u32 = 4096;
const _: () = assert!(BLOCK_U32 as usize == BLOCK);
const SECONDS_MAX: u64 = 600;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: hw-power-cut write ADDR EXPORT BLOCKS RECORD [QD] | verify ADDR EXPORT BLOCKS RECORD";
    let [cmd, addr, export, blocks, record, rest @ ..] = args.as_slice() else { bail!("{usage}") };
    let blocks: u64 = blocks.parse().context("BLOCKS")?;
    if blocks < 2 {
        bail!("BLOCKS must be at least 2");
    }
    let mut c = NbdClient::connect(addr.as_str(), export).with_context(|| format!("NBD connect to {addr} {export}"))?;
    match cmd.as_str() {
        "write" => {
            let qd = rest.first().map(|q| q.parse::<usize>()).transpose().context("QD")?.unwrap_or(8);
            write(&mut c, blocks, record, qd.clamp(1, 64))
        }
        "verify" => verify(&mut c, blocks, record),
        _ => bail!("{usage}"),
    }
}

fn write(c: &mut NbdClient, blocks: u64, record: &str, qd: usize) -> Result<()> {
    let mut out =
        OpenOptions::new().create(true).append(true).open(record).with_context(|| format!("open {record}"))?;
    let started = Instant::now();
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id());
    let mut inflight: HashMap<u64, u64> = HashMap::new();
    let (mut next_version, mut acks) = (1u64, 0u64);
    while next_version <= WRITES_MAX && started.elapsed() < Duration::from_secs(SECONDS_MAX) {
        while inflight.len() < qd {
            let b = loop {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let b = rng % blocks;
                if !inflight.values().any(|&x| x == b) {
                    break b;
                }
            };
            let v = next_version;
            next_version += 1;
            c.send(CMD_WRITE, v, b * u64::from(BLOCK_U32), BLOCK_U32, &block_data(b, v)).context("send a write")?;
            inflight.insert(v, b);
        }
        let reply = c.recv(None).context("receive a reply")?;
        let Some(b) = inflight.remove(&reply.cookie) else { bail!("reply for unknown cookie {}", reply.cookie) };
        if reply.error != 0 {
            bail!("write of block {b} failed: NBD error {}", reply.error);
        }
        acks += 1;
        out.write_all(format!("{b} {}\n", reply.cookie).as_bytes()).context("record an acknowledgement")?;
    }
    println!("{acks} writes acknowledged; stopped at the limit");
    Ok(())
}

fn verify(c: &mut NbdClient, blocks: u64, record: &str) -> Result<()> {
    let text = std::fs::read_to_string(record).with_context(|| format!("read {record}"))?;
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut lines = 0u64;
    for line in text.lines() {
        // The last line may have been cut by the power: only whole records count.
        let mut f = line.split(' ');
        let (Some(Ok(b)), Some(Ok(v)), None) =
            (f.next().map(str::parse::<u64>), f.next().map(str::parse::<u64>), f.next())
        else {
            continue;
        };
        if b >= blocks {
            bail!("{record}: block {b} is past the {blocks} written");
        }
        let e = acked.entry(b).or_insert(0);
        *e = (*e).max(v);
        lines += 1;
    }
    let (mut verified, mut newer, mut lost, mut torn) = (0u64, 0u64, 0u64, 0u64);
    let mut problems = Vec::new();
    let mut buf = vec![0u8; BLOCK];
    for (&b, &v) in &acked {
        c.read(b * BLOCK as u64, &mut buf).with_context(|| format!("read block {b}"))?;
        match identify(b, &buf) {
            Some(got) if got == v => verified += 1,
            Some(got) if got > v => newer += 1,
            Some(got) => {
                lost += 1;
                problems.push(format!("block {b}: version {got}, acknowledged {v}"));
            }
            None => {
                torn += 1;
                problems.push(format!("block {b}: matches no write (acknowledged {v})"));
            }
        }
    }
    println!("acked={lines} blocks={} verified={verified} newer={newer} lost={lost} torn={torn}", acked.len());
    for p in problems.iter().take(10) {
        println!("  {p}");
    }
    if lost + torn > 0 {
        std::process::exit(1);
    }
    Ok(())
}
