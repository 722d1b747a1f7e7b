//! `nvmirror`: run a node, administer nodes, or take the quickstart tour.

mod ctl_cmd;

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use nvmirror_control::api::{self, Client, CreateVolume, MirrorRequest};
use nvmirror_control::config::FlagKind;
use nvmirror_control::node::{Node, NodeConfig};
use nvmirror_control::{quickstart, size};
use nvmirror_dataplane::frontend::nbd::{NbdServer, NbdTls};
use nvmirror_dataplane::frontend::nvmf::NvmfServer;
use nvmirror_dataplane::nvram::NvramSpec;
use nvmirror_dataplane::transport::auth::PeerSecret;
use sd_notify::NotifyState;
use serde_json::Value;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

#[derive(Parser)]
#[command(name = "nvmirror", version, about = "Synchronous block-volume mirroring")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node.
    Node(Box<NodeArgs>),
    /// Administer a running node through its control API.
    Ctl {
        /// The node's control address (HOST:PORT).
        #[arg(long, env = "NVMIRROR_NODE", default_value = "127.0.0.1:7200")]
        node: String,
        /// Speak https to the node, trusting these CA certificates (PEM) for its
        /// certificate (a node started with --tls-cert).
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// An operator certificate (PEM) to present: a node started with --ctl-client-ca
        /// that verifies it takes this operator's calls as an admin's (no --secret-file
        /// needed under --require-signed-ctl).
        #[arg(long, requires_all = ["tls_key", "tls_ca"])]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Sign admin calls with the pair's secret (needed by a node started with
        /// --require-signed-ctl).
        #[arg(long)]
        secret_file: Option<PathBuf>,
        #[command(subcommand)]
        cmd: CtlCmd,
    },
    /// Start two nodes on loopback, mirror a volume, write through NBD, kill the source,
    /// fail over, and verify every acknowledged write.
    Quickstart(quickstart::Args),
    /// Print the shell completion script for SHELL to stdout (e.g. `nvmirror completions
    /// bash > /usr/share/bash-completion/completions/nvmirror`).
    Completions {
        /// The shell the script is for.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (nvmirror.1, and nvmirror-CMD.1 for each command) into a
    /// directory.
    Man {
        /// The directory to write them to (made if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
#[command(args_override_self = true)]
struct NodeArgs {
    /// A TOML file of settings, each key a flag of this command (`data-dir = "/srv/a"`);
    /// flags given here win over the file's.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The node's directory: its state, its volumes' files (default NVRAM under it too).
    #[arg(long)]
    data_dir: PathBuf,
    /// Replication listen address.
    #[arg(long)]
    listen: String,
    /// The replication address peers are told to connect to (default: the --listen
    /// address as bound): for a node behind NAT or a proxy, or on a replication network
    /// whose addresses differ from the one bound here. TCP engine only; RDMA placement
    /// uses the bound address.
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Control API address.
    #[arg(long)]
    control: String,
    /// NBD export address.
    #[arg(long)]
    nbd: String,
    /// NVMe/TCP address (4420 is NVMe/TCP's port): each volume is a subsystem,
    /// nqn.2026-01.io.nvmirror:VOL, and each node of a pair a path to it with ANA
    /// (optimized on the primary, inaccessible on the mirror), for `nvme connect` and
    /// native NVMe multipath. Not served unless given.
    #[arg(long, value_name = "HOST:PORT")]
    nvmf: Option<String>,
    /// Node name (default: node-PORT of the replication address).
    #[arg(long)]
    name: Option<String>,
    /// A file holding the pair's shared secret (one trailing newline is ignored): every
    /// replication connection, both ways, and every pairing is then authenticated with it
    /// (HMAC-SHA256 challenge-response). Both nodes of a pair need the same secret.
    /// Repeated, for a rotation: the first proves, any is accepted. SIGHUP rereads them
    /// (from the --config file's secret-file where it names them).
    #[arg(long)]
    secret_file: Vec<PathBuf>,
    /// Refuse admin calls (every POST of the control API) that are not signed with the
    /// secret (`ctl --secret-file`) with 401; reads (status, events, metrics) stay open.
    #[arg(long, requires = "secret_file")]
    require_signed_ctl: bool,
    /// Bytes per second a baseline or resync to a mirror sends at most (K/M/G suffixes),
    /// for volumes not given a rate of their own (`ctl mirror --rate`). SIGHUP rereads it
    /// from the config file (`copy-rate`). Default: as fast as it goes.
    #[arg(long, value_parser = size_arg)]
    copy_rate: Option<u64>,
    /// TLS: this node's certificate chain (PEM). The control API and the replication
    /// engine then serve TLS only, and the node speaks TLS to its peers (both nodes of a
    /// pair use TLS, or neither). The certificate must name the address peers dial.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA certificates (PEM) this node trusts for its peers' certificates (default:
    /// those of --tls-cert itself).
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// The CA certificates (PEM) NBD clients' certificates must be signed by: the NBD port
    /// (TLS only with --tls-cert) then requires a client certificate of every client, as
    /// nbdkit's --tls-verify-peer does, and volume allow-lists may name clients by it
    /// (`cert:NAME`, a DNS name or the common name of the certificate).
    #[arg(long, requires = "tls_cert", value_name = "CA.pem")]
    nbd_client_ca: Option<PathBuf>,
    /// The CA certificates (PEM) of operators' certificates (`ctl --tls-cert`): the control
    /// API (TLS only with --tls-cert) asks each client for a certificate, and one that
    /// presents a certificate signed by these is an admin, named in logs and events by
    /// the certificate's name; its calls need no signature under --require-signed-ctl.
    /// Clients without a certificate (peer nodes, plain ctl) are served as before.
    #[arg(long, requires = "tls_cert", value_name = "CA.pem")]
    ctl_client_ca: Option<PathBuf>,
    /// NVRAM for the NVLog and the mirrors' log files: file:DIR (default DATA/nvram),
    /// file-sync:DIR, direct:DIR (O_DIRECT writes, power-safe without persistent memory)
    /// or dax:DIR.
    #[arg(long)]
    nvram: Option<String>,
    /// Fleet mode: record each volume's primary and pair state in etcd
    /// (etcd://HOST:PORT[,HOST:PORT...]: the cluster's members, tried in turn; etcds://
    /// for https), held by this node's lease; a mirror whose primary's lease expires fails
    /// over by itself, the etcd revision its new epoch (node state stays in the data dir).
    #[arg(long)]
    state: Option<String>,
    /// The CA certificates (PEM) of etcd's server certificates (--state etcds://...).
    #[arg(long, requires = "state", value_name = "CA.pem")]
    etcd_ca: Option<PathBuf>,
    /// A client certificate chain (PEM) for etcd's --client-cert-auth.
    #[arg(long, requires_all = ["state", "etcd_key"])]
    etcd_cert: Option<PathBuf>,
    /// The private key of --etcd-cert (PEM).
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// The etcd user this node authenticates as, where etcd has auth enabled.
    #[arg(long, requires_all = ["state", "etcd_password_file"])]
    etcd_user: Option<String>,
    /// A file holding --etcd-user's password (one trailing newline is ignored).
    #[arg(long, requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// The fleet lease's time to live, in seconds: how long a dead primary goes unnoticed.
    #[arg(long, default_value_t = 3)]
    lease_ttl: u64,
    /// Data disks of the RAID-4 volumes this node makes from data-dir files, and of the
    /// mirrors it hosts.
    #[arg(long, default_value_t = nvmirror_control::storage::DATA_DISKS_DEFAULT)]
    raid_data_disks: u32,
    /// Stripe unit of those RAID-4 volumes (K/M suffixes).
    #[arg(long, default_value = "64K", value_parser = size_arg)]
    raid_stripe_unit: u64,
    /// I/O engine of those volumes' files.
    #[arg(long, value_enum, default_value_t = EngineArg::Pread)]
    raid_engine: EngineArg,
    /// What the log shows: error, warn, info (the default), debug or trace, or a filter
    /// of `RUST_LOG`'s syntax (`info,nvmirror_dataplane=debug`); RUST_LOG applies where
    /// this is not given. SIGHUP rereads it from the --config file.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// How the mirrors this node hosts store their blocks: raid4 (the RAID-4 geometry
    /// above, with parity and checksums) or single (one file, no RAID work; for a data dir
    /// on storage that is redundant already). Existing mirrors keep theirs.
    #[arg(long, value_enum, default_value_t = nvmirror_control::storage::MirrorLayout::Raid4)]
    mirror_layout: nvmirror_control::storage::MirrorLayout,
}

#[derive(Subcommand)]
enum CtlCmd {
    /// Volumes on this node.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Pair a volume with a peer node, copy it (baseline) and keep it in sync.
    Mirror {
        /// The volume (its name).
        volume: String,
        /// The peer's control address.
        #[arg(long)]
        to: String,
        /// The replication engine.
        #[arg(long, value_enum, default_value_t = TransportArg::Tcp)]
        transport: TransportArg,
        /// What a write does while the mirror cannot take it.
        #[arg(long, value_enum, default_value_t = PolicyArg::Strict)]
        policy: PolicyArg,
        /// Bytes per second the baseline (or a later resync) sends at most (K/M/G suffixes).
        #[arg(long, value_parser = size_arg)]
        rate: Option<u64>,
        /// Return once the baseline has started instead of waiting for in-sync.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting for in-sync after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Force a consistency point.
    Cp {
        /// The volume (its name).
        volume: String,
    },
    /// On a node that lost the volume to a failover: become the new primary's mirror,
    /// brought level by a delta resync of what either side changed since their last
    /// common CP.
    Resync {
        /// The volume (its name).
        volume: String,
        /// The control address of the node that holds the volume now.
        #[arg(long)]
        from: String,
        /// Return once the resync has started instead of waiting for in-sync.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting for in-sync after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        /// Run the checks and say what would be copied; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// On the primary: exchange roles with the mirror, planned, nothing lost and no write
    /// failed (clients still connected here are forwarded to the new primary).
    Switchover {
        /// The volume (its name).
        volume: String,
        /// Run the checks and say what would happen; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// State changes, failovers, resyncs, CPs...: JSON lines. Prints the events the node
    /// keeps and exits; with --follow, then new ones as they happen, until interrupted.
    Events {
        /// Only events after this id.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Keep the stream open and print new events as they happen.
        #[arg(long, conflicts_with = "once")]
        follow: bool,
        /// Print the events kept so far and exit (the default; kept for scripts).
        #[arg(long)]
        once: bool,
    },
    /// On the primary: stop mirroring the volume; it goes on alone, and its mirror on the
    /// peer is deleted. It can then be mirrored to any node (a baseline).
    Unpair {
        /// The volume (its name).
        volume: String,
    },
    /// Pause the baseline or resync copy of a volume (writes go on, mirrored as before;
    /// a restart of the node resumes it).
    PauseCopy {
        /// The volume (its name).
        volume: String,
    },
    /// Resume a paused baseline or resync copy.
    ResumeCopy {
        /// The volume (its name).
        volume: String,
    },
    /// On the primary: compare the volume with its mirror, online, by region checksums as
    /// of a CP; exits 6 if regions differ (they are listed).
    Verify {
        /// The volume (its name).
        volume: String,
        /// Bytes per checksum (K/M suffixes; 4K to 64M).
        #[arg(long, value_parser = size_arg)]
        region: Option<u64>,
        /// Write the primary's contents of the regions that differ to the mirror, then
        /// compare them again; exits 6 only if some still differ.
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Break the mirror on this (destination) node and make the volume a writable primary.
    Failover {
        /// The volume (its name).
        volume: String,
        /// Run the checks and say what would happen; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Node, volume and mirror status; of one volume (its primary and its mirrors here)
    /// when named.
    Status {
        /// The volume (its name); all of them when left out.
        volume: Option<String>,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every block's checksum and every stripe's parity of a volume (or of the
    /// mirror of that name), repairing what can be repaired.
    Scrub {
        /// The volume (its name).
        volume: String,
        /// Bytes read per second at most (K/M/G suffixes).
        #[arg(long, value_parser = size_arg)]
        rate: Option<u64>,
        /// Return once the scrub has started.
        #[arg(long)]
        no_wait: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    Create {
        /// The volume (its name).
        name: String,
        /// Size, with K/M/G/T suffixes (powers of 1024).
        #[arg(long, value_parser = size_arg)]
        size: u64,
        /// A disk, `[pread:|uring:|nvme:]PATH`: one alone (no redundancy), or, repeated,
        /// the data disks of a RAID-4 volume with --parity. Default: RAID-4 over files in
        /// the data dir.
        #[arg(long)]
        disk: Vec<String>,
        /// The parity disk of a RAID-4 volume.
        #[arg(long)]
        parity: Option<String>,
        /// RAID-4 stripe unit (K/M suffixes; default the node's, 64K).
        #[arg(long, value_parser = size_arg)]
        stripe_unit: Option<u64>,
        /// Data disks of a RAID-4 volume made of data-dir files (default the node's, 3).
        #[arg(long)]
        data_disks: Option<u32>,
        /// Engine of the data-dir files (default the node's).
        #[arg(long, value_enum)]
        engine: Option<EngineArg>,
        /// Size of each of the two NVLog partitions (default 32M). A partition is written
        /// while the other's CP runs: it should hold more than a CP's duration of writes.
        #[arg(long, value_parser = size_arg)]
        log_size: Option<u64>,
        /// The largest size a RAID-4 volume may grow to with `volume resize` (K/M/G/T
        /// suffixes): its checksum area is sized for it, 1/1024 of that per member (a hole
        /// in a file member until used). Default: 16 times --size, at least 64G; on device
        /// members, what the smallest holds.
        #[arg(long, value_parser = size_arg)]
        max_size: Option<u64>,
        /// Send consistency points to the mirror by value (block data) instead of by
        /// reference to the mirror's log files.
        #[arg(long)]
        cp_by_value: bool,
        /// A network or address whose NBD clients may attach the volume (10.0.0.0/24,
        /// fd00::/64, 10.0.0.7), or cert:NAME, a name their verified client certificate
        /// holds (--nbd-client-ca); repeat for more. Default: every client.
        #[arg(long, value_name = "NET")]
        allow: Vec<String>,
    },
    /// Set which NBD clients may attach a volume (for connections made from now on).
    Allow {
        /// The volume (its name).
        name: String,
        /// The networks, addresses and cert:NAMEs admitted; none: every client.
        nets: Vec<String>,
    },
    /// Delete a volume: its log, change map and data-dir disks (disks named at creation
    /// are left as they are), or the mirror of that name hosted here.
    Delete {
        /// The volume (its name).
        name: String,
        /// Also a mirrored volume, and its mirror on the peer; or a mirror whose source is
        /// connected (the source rebuilds it by a baseline when it reconnects).
        #[arg(long)]
        force: bool,
    },
    /// Grow a volume online, its mirror first. Clients see the new size when they
    /// connect again (NBD), or at once (NVMe/TCP Identify).
    Resize {
        /// The volume (its name), on its primary.
        name: String,
        /// The new size (K/M/G/T suffixes): larger than the volume's.
        #[arg(long, value_parser = size_arg)]
        size: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replace a member of a RAID-4 volume and rebuild onto the new disk.
    ReplaceDisk {
        /// The volume (its name).
        name: String,
        /// The member to replace: its index (0.., parity last) or its path.
        #[arg(long)]
        old: String,
        /// The new disk, `[pread:|uring:|nvme:]PATH`: a new file or a device.
        #[arg(long)]
        new: String,
        /// Bytes rebuilt per second at most (K/M/G suffixes).
        #[arg(long, value_parser = size_arg)]
        rate: Option<u64>,
        /// Return once the rebuild has started.
        #[arg(long)]
        no_wait: bool,
    },
}

/// A SIZE argument (K/M/G/T suffixes): a malformed one is a usage error (exit 2).
fn size_arg(s: &str) -> Result<u64> {
    size::parse(s)
}

/// `--transport`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum TransportArg {
    /// TCP, the default: everywhere.
    Tcp,
    /// RDMA (RoCE, InfiniBand, soft-RoCE): needs a node built with the `rdma` feature.
    Rdma,
}

/// `--policy`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum PolicyArg {
    /// A write that cannot be mirrored fails.
    Strict,
    /// Writes go on locally while the mirror is away; the changed blocks are resynced
    /// when it returns.
    Sync,
}

/// `--engine`, `--raid-engine`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum EngineArg {
    /// pread/pwrite through the page cache.
    Pread,
    /// io_uring with O_DIRECT and registered buffers.
    Uring,
}

impl EngineArg {
    fn engine(self) -> nvmirror_dataplane::storage::Engine {
        match self {
            EngineArg::Pread => nvmirror_dataplane::storage::Engine::Pread,
            EngineArg::Uring => nvmirror_dataplane::storage::Engine::Uring,
        }
    }
}

/// The name a value enum has on the command line (and in the API's bodies).
fn arg_name(v: impl clap::ValueEnum) -> String {
    v.to_possible_value().expect("no variant is skipped").get_name().to_string()
}

fn main() {
    // `node --config FILE`: the file's settings go in as flags before the command line's.
    let node_flags: Vec<(String, FlagKind)> = <NodeArgs as clap::Args>::augment_args(clap::Command::new("node"))
        .get_arguments()
        .filter_map(|a| {
            let kind = match a.get_action() {
                clap::ArgAction::Append => FlagKind::Values,
                action if action.takes_values() => FlagKind::Value,
                _ => FlagKind::Switch,
            };
            Some((a.get_long()?.to_string(), kind))
        })
        .collect();
    let args = match nvmirror_control::config::expand(std::env::args_os().collect(), &node_flags) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nvmirror: {e:#}");
            std::process::exit(2);
        }
    };
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        // --help, --version: printed as clap prints them.
        Err(e) if !e.use_stderr() => e.exit(),
        // A usage error: one line, exit 2.
        Err(e) => {
            eprintln!("nvmirror: {}", usage_line(&e.render().to_string()));
            std::process::exit(2);
        }
    };
    let r = match cli.cmd {
        Cmd::Node(a) => run_node(*a),
        Cmd::Ctl { node, tls_ca, tls_cert, tls_key, secret_file, cmd } => {
            // `ctl status | head`: a closed pipe ends the command quietly, as for any Unix
            // tool, where Rust's default would panic in println!. The node keeps ignoring
            // SIGPIPE: its sockets report a closed peer as an error.
            // SAFETY: signal(2) with SIG_DFL, before any thread of this command starts.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            let operator = tls_cert.as_deref().zip(tls_key.as_deref());
            ctl_security(tls_ca.as_deref(), operator, secret_file.as_deref()).and_then(|()| ctl_cmd::ctl(&node, cmd))
        }
        Cmd::Quickstart(a) => quickstart::run(a),
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "nvmirror", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man { out } => std::fs::create_dir_all(&out)
            .and_then(|()| clap_mangen::generate_to(Cli::command(), &out))
            .with_context(|| format!("write the man pages into {}", out.display())),
    };
    if let Err(e) = r {
        let text = format!("{e:#}");
        match nvmirror_control::tls::hint(&text) {
            Some(hint) => eprintln!("nvmirror: {text} ({hint})"),
            None => eprintln!("nvmirror: {text}"),
        }
        std::process::exit(api::exit_code(&e));
    }
}

/// clap's usage error as one line: its message lines up to the usage, joined.
fn usage_line(rendered: &str) -> String {
    let lines: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    format!("{} (see --help)", lines.join(" ").trim_start_matches("error: "))
}

/// What `ctl --tls-ca`, `ctl --tls-cert/--tls-key` and `ctl --secret-file` set for this
/// process's API clients.
fn ctl_security(
    tls_ca: Option<&std::path::Path>,
    operator: Option<(&std::path::Path, &std::path::Path)>,
    secret_file: Option<&std::path::Path>,
) -> Result<()> {
    if let Some(ca) = tls_ca {
        nvmirror_control::tls::trust_file(ca)?;
    }
    if let Some((cert, key)) = operator {
        nvmirror_control::tls::present_operator_certificate(cert, key)?;
    }
    if let Some(path) = secret_file {
        let loaded = PeerSecret::from_file(path).map_err(|e| anyhow!("--secret-file: {e}"))?;
        if let Some(w) = &loaded.warning {
            eprintln!("nvmirror ctl: warning: {w}");
        }
        nvmirror_control::tls::sign_operator_calls(loaded.secret);
    }
    Ok(())
}

/// The node's TLS, from --tls-cert, --tls-key and --tls-ca; its API clients then speak
/// https to its peers, trusting the same CA certificates.
fn node_tls(a: &NodeArgs) -> Result<Option<nvmirror_dataplane::transport::tls::TlsConfig>> {
    let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) else { return Ok(None) };
    let tls = nvmirror_dataplane::transport::tls::TlsConfig::from_files(cert, key, a.tls_ca.as_deref())
        .map_err(|e| anyhow!("--tls-cert/--tls-key/--tls-ca: {e}"))?;
    nvmirror_control::tls::trust(tls.roots().to_vec());
    Ok(Some(tls))
}

/// The pair's secret from `--secret-file`s, in order (the first proves); none without.
fn load_secrets(paths: &[PathBuf]) -> Result<Option<PeerSecret>> {
    let mut all = Vec::with_capacity(paths.len());
    for path in paths {
        let loaded = PeerSecret::from_file(path).map_err(|e| anyhow!("--secret-file: {e}"))?;
        if let Some(w) = &loaded.warning {
            tracing::warn!("--secret-file: {w}");
        }
        all.push(loaded.secret);
    }
    Ok(PeerSecret::all_of(&all))
}

/// SIGHUP: the pair's secret again, from the files the config file's `secret-file` names
/// (where it names any), else from those the node started with; every connection and call
/// of the node uses the new keys from then on. A node started without a secret does not
/// take one, nor does one with a secret drop it: that takes a restart.
fn reload_secrets(current: Option<&PeerSecret>, config: Option<&std::path::Path>, started: &[PathBuf]) {
    let Some(current) = current else { return };
    let paths: Vec<PathBuf> = match config.map(|c| nvmirror_control::config::settings(c, "secret-file")) {
        Some(Ok(list)) if !list.is_empty() => list.into_iter().map(PathBuf::from).collect(),
        Some(Err(e)) => return tracing::warn!("SIGHUP: {e:#}; the secret stays"),
        _ => started.to_vec(),
    };
    match load_secrets(&paths) {
        Ok(Some(s)) => {
            current.replace_with(&s);
            tracing::info!("SIGHUP: the pair's secret reread: {} key(s), the first proves", s.keys());
        }
        Ok(None) => tracing::warn!("SIGHUP: no secret file named; the secret stays"),
        Err(e) => tracing::warn!("SIGHUP: {e:#}; the secret stays"),
    }
}

/// SIGHUP: the default copy rate again, from the config file's `copy-rate` where it has
/// one, else the command line's; volumes without a rate of their own take it at once.
fn reload_copy_rate(node: &Node, config: Option<&std::path::Path>, started: Option<u64>) {
    let rate = match config.map(|c| nvmirror_control::config::setting(c, "copy-rate")) {
        Some(Ok(Some(v))) => match size::parse(&v) {
            Ok(r) => Some(r),
            Err(e) => return tracing::warn!("SIGHUP: copy-rate {v:?}: {e:#}; the copy rate stays"),
        },
        Some(Err(e)) => return tracing::warn!("SIGHUP: {e:#}; the copy rate stays"),
        _ => started,
    };
    node.set_copy_rate(rate);
    match rate {
        Some(r) => tracing::info!("SIGHUP: copy rate {r} bytes/s, for volumes without their own"),
        None => tracing::info!("SIGHUP: copies go as fast as they go, for volumes without a rate of their own"),
    }
}

fn run_node(a: NodeArgs) -> Result<()> {
    let log = nvmirror_control::logging::init(a.log_level.as_deref())?;
    let secret = load_secrets(&a.secret_file)?;
    let nvram: NvramSpec = match &a.nvram {
        Some(s) => s.parse()?,
        None => format!("file:{}", a.data_dir.join("nvram").display()).parse()?,
    };
    // The volumes need be no more durable than the log: under file: NVRAM (a killed
    // process loses nothing, a power cut may) a CP's write-out is done once the kernel has
    // it; under the power-safe modes it waits for the device.
    nvmirror_dataplane::storage::set_flush_reach(if nvram.mode.survives_power_loss() {
        nvmirror_dataplane::storage::FlushReach::Device
    } else {
        nvmirror_dataplane::storage::FlushReach::Kernel
    });
    if let Some(adv) = &a.advertise {
        let port = adv.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
        if port.and_then(|p| p.parse::<u16>().ok()).is_none_or(|p| p == 0) {
            bail!("--advertise {adv:?}: expected HOST:PORT with a port other than 0");
        }
    }
    let replication = TcpListener::bind(&a.listen).with_context(|| format!("bind replication address {}", a.listen))?;
    let nbd = TcpListener::bind(&a.nbd).with_context(|| format!("bind NBD address {}", a.nbd))?;
    let nvmf = match &a.nvmf {
        Some(addr) => Some(TcpListener::bind(addr).with_context(|| format!("bind NVMe/TCP address {addr}"))?),
        None => None,
    };
    let tls = node_tls(&a)?;
    let nbd_client_ca = a
        .nbd_client_ca
        .as_deref()
        .map(|p| nvmirror_dataplane::transport::tls::load_certs("--nbd-client-ca", p))
        .transpose()
        .map_err(|e| anyhow!("{e}"))?;
    let nbd_tls = tls
        .as_ref()
        .map(|t| t.nbd_server(nbd_client_ca.as_deref()))
        .transpose()
        .map_err(|e| anyhow!("--tls-cert/--nbd-client-ca: {e}"))?;
    let ctl_client_ca = a
        .ctl_client_ca
        .as_deref()
        .map(|p| nvmirror_dataplane::transport::tls::load_certs("--ctl-client-ca", p))
        .transpose()
        .map_err(|e| anyhow!("{e}"))?;
    let api_tls = tls
        .as_ref()
        .map(|t| t.api_server(ctl_client_ca.as_deref()))
        .transpose()
        .map_err(|e| anyhow!("--tls-cert/--ctl-client-ca: {e}"))?;
    let control_at = api::parse_addr(&a.control)?;
    let control = api::control_listener(control_at).with_context(|| format!("bind control address {control_at}"))?;
    let control_addr = control.local_addr()?;
    let replication_addr = replication.local_addr()?;
    let name = a.name.unwrap_or_else(|| format!("node-{}", replication_addr.port()));
    let raid = nvmirror_control::storage::RaidDefaults {
        data_disks: a.raid_data_disks,
        stripe_unit: u32::try_from(a.raid_stripe_unit).context("--raid-stripe-unit too large")?,
        engine: a.raid_engine.engine(),
    };
    nvmirror_dataplane::raid::Geometry::new(raid.data_disks, raid.stripe_unit, 1 << 20)
        .map_err(|e| anyhow!("--raid-data-disks / --raid-stripe-unit: {e}"))?;
    let node = Node::open(NodeConfig {
        raid,
        mirror_layout: a.mirror_layout,
        name: name.clone(),
        data_dir: a.data_dir,
        nvram,
        replication: replication_addr,
        nbd: nbd.local_addr()?,
        nvmf: nvmf.as_ref().map(TcpListener::local_addr).transpose()?,
        control: control_addr,
        secret: secret.clone(),
        tls,
        nbd_client_ca,
        require_signed_ctl: a.require_signed_ctl,
        advertise: a.advertise.clone(),
        copy_rate: a.copy_rate,
        peers: Arc::new(nvmirror_control::api::HttpPeers { secret: secret.clone() }),
    })?;
    let security = node.cfg.link_security();
    let stop = Arc::new(AtomicBool::new(false));
    let dir: Arc<dyn nvmirror_dataplane::transport::MirrorDirectory> = node.clone();
    std::thread::Builder::new()
        .name("nvm-repl-accept".into())
        .spawn(move || nvmirror_dataplane::transport::tcp::serve(replication, dir, stop, security))?;
    let _nbd = NbdServer::spawn_with(nbd, node.clone(), nbd_tls.map(NbdTls::new))?;
    let _nvmf = nvmf.map(|l| NvmfServer::spawn(l, node.clone())).transpose()?;
    if let Some(server) = &_nvmf {
        node.set_nvmf_hosts(server.hosts());
    }
    // Fleet mode: etcd answers now, or the node does not start (nor say it is ready).
    if let Some(url) = &a.state {
        let security = nvmirror_control::etcd::EtcdSecurity {
            ca: a.etcd_ca.clone(),
            cert: a.etcd_cert.clone(),
            key: a.etcd_key.clone(),
            user: a.etcd_user.clone(),
            password_file: a.etcd_password_file.clone(),
        };
        nvmirror_control::fleet::start(&node, url, &security, Duration::from_secs(a.lease_ttl.max(1)))?;
    }
    println!(
        "nvmirror node {name} ready: control={} replication={} nbd={} nvram={}{}{}",
        node.cfg.control,
        node.cfg.replication,
        node.cfg.nbd,
        node.status().nvram,
        node.cfg.nvmf.map(|a| format!(" nvmf={a}")).unwrap_or_default(),
        node.cfg.advertise.as_ref().map(|a| format!(" advertised={a}")).unwrap_or_default()
    );
    std::io::stdout().flush()?;
    let weak = Arc::downgrade(&node);
    nvmirror_control::events::spawn_sampler(node.events.clone(), move || {
        weak.upgrade().map(|n| serde_json::to_value(n.status()).unwrap_or(serde_json::Value::Null))
    });
    // Under systemd (Type=notify): ready now, and alive while the watchdog asks.
    let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status("serving")]);
    let mut watchdog_us = 0;
    if sd_notify::watchdog_enabled(false, &mut watchdog_us) {
        let every = Duration::from_micros(watchdog_us / 2);
        std::thread::Builder::new().name("nvm-watchdog".into()).spawn(move || loop {
            let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
            std::thread::sleep(every);
        })?;
    }
    let api_node = node.clone();
    let api_runtime = api::http::runtime(&api::http::LIMITS)?;
    std::thread::Builder::new().name("nvm-api-accept".into()).spawn(move || {
        let api = Arc::new(api::NodeApi::new(api_node));
        if let Err(e) = api_runtime.block_on(api::http::serve_async(control, api_tls, api, api::http::LIMITS)) {
            tracing::error!("control API: {e:#}");
        }
    })?;
    // SIGHUP: the log level again, from the --config file. SIGTERM or SIGINT: a clean
    // stop. No new NBD connections; every volume's writes in flight drained (a pair in sync
    // takes a last CP); state is on disk as it changes.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).context("install signal handlers")?;
    let signal = signals
        .forever()
        .find(|&s| {
            if s == SIGHUP {
                log.reload_from(a.config.as_deref(), a.log_level.as_deref());
                reload_secrets(secret.as_ref(), a.config.as_deref(), &a.secret_file);
                reload_copy_rate(&node, a.config.as_deref(), a.copy_rate);
            }
            s != SIGHUP
        })
        .unwrap_or(SIGTERM);
    let what = if signal == SIGINT { "SIGINT" } else { "SIGTERM" };
    tracing::info!(
        "node {name}: {what}: stopping (no new connections; draining writes in flight, {STOP_BOUND_SECS} s at most)"
    );
    let _ = sd_notify::notify(false, &[NotifyState::Stopping, NotifyState::Status("stopping: draining writes")]);
    drop(_nbd);
    drop(_nvmf);
    for (volume, drained) in node.stop_cleanly(Duration::from_secs(STOP_BOUND_SECS)) {
        if drained {
            tracing::info!("node {name}: volume {volume} stopped, every write in flight answered");
        } else {
            tracing::error!("node {name}: volume {volume} stopped with writes unanswered after {STOP_BOUND_SECS} s (none acknowledged; clients see errors)");
        }
    }
    tracing::info!("node {name}: stopped");
    Ok(())
}

/// How long a clean stop may take before what is left in flight is failed.
const STOP_BOUND_SECS: u64 = 30;
