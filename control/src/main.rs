//! `nvmirror`: run a node, administer nodes, or take the quickstart tour.

mod ctl_cmd;
mod node_cmd;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use nvmirror_control::api::{self, Client, CreateVolume, MirrorRequest};
use nvmirror_control::config::FlagKind;
use nvmirror_control::{quickstart, size};
use nvmirror_dataplane::transport::auth::PeerSecret;
use serde_json::Value;

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
        Cmd::Node(a) => node_cmd::run_node(*a),
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
