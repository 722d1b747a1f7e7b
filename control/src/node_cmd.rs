//! `nvmirror node`: a node's start (its listeners, TLS, secrets, the API's server), its
//! signals (SIGHUP rereads the log level, the secret and the copy rate) and its clean stop.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nvmirror_control::api;
use nvmirror_control::node::{Node, NodeConfig};
use nvmirror_control::size;
use nvmirror_dataplane::frontend::nbd::{NbdServer, NbdTls};
use nvmirror_dataplane::frontend::nvmf::NvmfServer;
use nvmirror_dataplane::nvram::NvramSpec;
use nvmirror_dataplane::transport::auth::PeerSecret;
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::NodeArgs;

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

pub(super) fn run_node(a: NodeArgs) -> Result<()> {
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
