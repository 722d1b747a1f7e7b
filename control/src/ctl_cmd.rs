//! `nvmirror ctl`: each command's call to the node's control API, and how its answer is
//! printed (one line of reason on failure, `--json` where asked).

use super::*;

pub(crate) fn ctl(addr: &str, cmd: CtlCmd) -> Result<()> {
    let client = Client::new(addr);
    match cmd {
        CtlCmd::Volume {
            cmd:
                VolumeCmd::Create {
                    name,
                    size: sz,
                    disk,
                    parity,
                    stripe_unit,
                    data_disks,
                    engine,
                    log_size,
                    max_size,
                    cp_by_value,
                    allow,
                },
        } => {
            let body = CreateVolume {
                name: name.clone(),
                size: sz,
                disks: disk,
                parity,
                stripe_unit,
                data_disks,
                engine: engine.map(arg_name),
                log_bytes: log_size,
                max_bytes: max_size,
                cp_by_value,
                allow,
            };
            let rec: Value = client.post("/v1/volumes", &body)?;
            println!("created volume {name}: {} bytes on {}", rec["size"], describe_storage(&rec["storage"]));
        }
        CtlCmd::Volume { cmd: VolumeCmd::Resize { name, size: sz, json } } => {
            let r: Value = client
                .post(&format!("/v1/volumes/{name}/resize"), &api::ResizeRequest { size: sz, mirror_of: None })?;
            if json {
                println!("{r}");
            } else {
                let (old, new) = (r["old_bytes"].as_u64().unwrap_or(0), r["new_bytes"].as_u64().unwrap_or(0));
                let mirror = r["mirror"].as_str().map(|m| format!("; mirror {m}")).unwrap_or_default();
                if old == new {
                    println!("volume {name}: already {new} bytes{mirror}");
                } else {
                    println!("volume {name}: grown from {old} to {new} bytes{mirror}");
                }
            }
        }
        CtlCmd::Volume { cmd: VolumeCmd::Allow { name, nets } } => {
            let _: Value =
                client.post(&format!("/v1/volumes/{name}/allow"), &api::AllowRequest { allow: nets.clone() })?;
            if nets.is_empty() {
                println!("volume {name}: every NBD client may attach it");
            } else {
                println!("volume {name}: NBD clients from {} may attach it", nets.join(", "));
            }
        }
        CtlCmd::Volume { cmd: VolumeCmd::Delete { name, force } } => {
            let r: Value =
                client.post(&format!("/v1/volumes/{name}/delete"), &api::DeleteRequest { force, mirror_of: None })?;
            let list = |k: &str| {
                r[k].as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default()
            };
            println!("deleted {name}: {}", list("deleted"));
            if !list("left").is_empty() {
                println!("  left as they are (named at creation): {}", list("left"));
            }
            if let Some(peer) = r["peer"].as_str() {
                println!("  {peer}");
            }
        }
        CtlCmd::Volume { cmd: VolumeCmd::ReplaceDisk { name, old, new, rate, no_wait } } => {
            let r: Value = client.post(
                &format!("/v1/volumes/{name}/replace-disk"),
                &api::ReplaceDisk { old: old.clone(), new: new.clone(), rate },
            )?;
            println!("volume {name}: member {} ({old}) replaced by {new}; rebuilding", r["member"]);
            if !no_wait {
                let s = wait_storage_op(&client, &name, "rebuild", |s| {
                    s["members"].as_array().is_some_and(|ms| ms.iter().all(|m| m["state"] != "rebuilding"))
                })?;
                if s["degraded"].as_bool() == Some(true) {
                    bail!("volume {name} is still degraded after the rebuild: {}", member_problems(&s));
                }
                println!("volume {name}: rebuilt; all members in sync");
            }
        }
        CtlCmd::Scrub { volume, rate, no_wait, json } => {
            let before: Value = client.get(&format!("/v1/volumes/{volume}/storage"))?;
            let _: Value = client.post(&format!("/v1/volumes/{volume}/scrub"), &api::ScrubRequest { rate })?;
            if no_wait {
                println!("scrub of {volume} started");
                return Ok(());
            }
            let s = wait_storage_op(&client, &volume, "scrub", |s| {
                !s["last_scrub"].is_null() && s["last_scrub"] != before["last_scrub"]
            })?;
            let r = &s["last_scrub"];
            if json {
                println!("{}", serde_json::to_string_pretty(r)?);
            } else {
                println!(
                    "scrub of {volume}: {}: {} rows, {} blocks checked; {} checksum errors, {} checksums corrected, {} parity mismatches, {} blocks repaired, {} unrecoverable{}",
                    r["result"].as_str().unwrap_or("?"),
                    r["rows_checked"],
                    r["blocks_checked"],
                    r["checksum_errors"],
                    r["checksums_corrected"],
                    r["parity_mismatches"],
                    r["blocks_repaired"],
                    r["unrecoverable"],
                    if r["rows_degraded"].as_u64().unwrap_or(0) > 0 {
                        format!(" ({} rows checked degraded: parity not comparable)", r["rows_degraded"])
                    } else {
                        String::new()
                    }
                );
            }
            if r["unrecoverable"].as_u64().unwrap_or(0) > 0 {
                return Err(api::DamageFound(format!("scrub of {volume} found what it could not repair")).into());
            }
            if r["result"].as_str().is_some_and(|x| x.starts_with("aborted")) {
                bail!("scrub of {volume} did not finish: {}", r["result"].as_str().unwrap_or("?"));
            }
        }
        CtlCmd::Mirror { volume, to, transport, policy, rate, no_wait, timeout } => {
            let (transport, policy) = (arg_name(transport), arg_name(policy));
            let _: Value = client.post(
                &format!("/v1/volumes/{volume}/mirror"),
                &MirrorRequest { to: to.clone(), transport, policy, resync_ranges: Vec::new(), rate },
            )?;
            if no_wait {
                println!("mirroring {volume} to {to}: baseline started");
                return Ok(());
            }
            wait_in_sync(&client, &volume, Duration::from_secs(timeout))?;
            println!("volume {volume} is in sync with {to}");
        }
        CtlCmd::Resync { volume, from, no_wait, timeout, dry_run } => {
            let r: Value = client
                .post(&format!("/v1/volumes/{volume}/resync"), &api::ResyncRequest { from: from.clone(), dry_run })?;
            let how = if r["delta"].as_bool() == Some(true) { "delta resync" } else { "baseline (no common point)" };
            if dry_run {
                println!(
                    "dry run: volume {volume} would become the mirror of {} by {how}, {} regions of this node's own \
                     changes copied back; nothing changed",
                    r["primary"].as_str().unwrap_or("?"),
                    r["regions_here"]
                );
                return Ok(());
            }
            println!(
                "volume {volume} is now the mirror of {} ({how}; {} regions of this node's own changes copied back)",
                r["primary"].as_str().unwrap_or("?"),
                r["regions_here"]
            );
            if no_wait {
                return Ok(());
            }
            wait_in_sync(&Client::new(&from), &volume, Duration::from_secs(timeout))?;
            println!(
                "volume {volume} is in sync again, {} primary, this node its mirror",
                r["primary"].as_str().unwrap_or("?")
            );
        }
        CtlCmd::Events { since, follow, once: _ } => {
            use std::io::Write;
            let path = format!("/v1/events?since={since}{}", if follow { "&follow=1" } else { "" });
            let mut out = std::io::stdout().lock();
            client.get_lines(&path, follow, |l| {
                let _ = writeln!(out, "{l}");
                let _ = out.flush();
            })?;
            if follow {
                bail!("the node closed the event stream");
            }
        }
        CtlCmd::Switchover { volume, dry_run: true } => role_change_plan(&client, &volume, "switchover")?,
        CtlCmd::Failover { volume, dry_run: true } => role_change_plan(&client, &volume, "failover")?,
        CtlCmd::Switchover { volume, dry_run: false } => {
            let r: Value = client.post(&format!("/v1/volumes/{volume}/switchover"), &serde_json::json!({}))?;
            println!(
                "volume {volume} switched over in {} ms: {} is the primary at epoch {}, this node its mirror as of CP {}; \
                 {} waiting requests handed over (clients still connected here are forwarded)",
                r["duration_ms"],
                r["new_primary"].as_str().unwrap_or("?"),
                r["epoch"],
                r["cp"],
                r["requests_handed_over"]
            );
        }
        CtlCmd::Unpair { volume } => {
            let r: Value = client.post(&format!("/v1/volumes/{volume}/unpair"), &serde_json::json!({}))?;
            println!(
                "volume {volume} is no longer mirrored to {}; {}",
                r["peer"].as_str().unwrap_or("?"),
                r["mirror"].as_str().unwrap_or("")
            );
        }
        CtlCmd::PauseCopy { volume } => pause_copy(&client, &volume, true)?,
        CtlCmd::ResumeCopy { volume } => pause_copy(&client, &volume, false)?,
        CtlCmd::Verify { volume, region, repair, json } => {
            let r: Value =
                client.post(&format!("/v1/volumes/{volume}/verify"), &api::VerifyRequest { region, repair })?;
            let differing = r["differing"].as_array().cloned().unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "verify of {volume} against its mirror on {} as of CP {}: {} regions of {} compared in {} ms; {} differ",
                    r["peer"].as_str().unwrap_or("?"),
                    r["cp"],
                    r["regions"],
                    human(r["region_bytes"].as_u64().unwrap_or(0)),
                    r["duration_ms"],
                    differing.len()
                );
                let busy = r["busy"].as_array().map_or(0, Vec::len);
                if busy > 0 {
                    println!("  {busy} regions changed on every pass (written to meanwhile) and were not compared");
                }
                for d in r["repaired"].as_array().into_iter().flatten() {
                    println!(
                        "  repaired: offset {} length {} (the primary's contents written to the mirror)",
                        d[0], d[1]
                    );
                }
                for d in &differing {
                    println!("  differs: offset {} length {}", d[0], d[1]);
                }
            }
            if !differing.is_empty() {
                return Err(
                    api::DamageFound(format!("{volume} and its mirror differ in {} regions", differing.len())).into()
                );
            }
        }
        CtlCmd::Cp { volume } => {
            let r: Value = client.post(&format!("/v1/volumes/{volume}/cp"), &serde_json::json!({}))?;
            println!("CP {} of {volume} is durable on both sites", r["cp"]);
        }
        CtlCmd::Failover { volume, dry_run: false } => {
            let r: Value = client.post(&format!("/v1/volumes/{volume}/failover"), &serde_json::json!({}))?;
            println!(
                "volume {volume} failed over: epoch {}, {} log entries replayed up to sequence {}; it is now a writable primary here",
                r["epoch"], r["entries_replayed"], r["last_seq"]
            );
            if let Some(stops) = r["stops"].as_array().filter(|s| !s.is_empty()) {
                for s in stops {
                    println!("  note: {}", s.as_str().unwrap_or(""));
                }
            }
        }
        CtlCmd::Status { volume, json } => {
            let s: Value = match &volume {
                Some(v) => client.get(&format!("/v1/volumes/{v}/status"))?,
                None => client.get("/v1/status")?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
        }
    }
    Ok(())
}

/// `pause-copy`, `resume-copy`.
fn pause_copy(client: &Client, volume: &str, paused: bool) -> Result<()> {
    let _: Value = client.post(&format!("/v1/volumes/{volume}/copy"), &api::CopyRequest { paused })?;
    println!("volume {volume}: copy {}", if paused { "paused" } else { "resumed" });
    Ok(())
}

/// `failover --dry-run`, `switchover --dry-run`: what the change would do.
fn role_change_plan(client: &Client, volume: &str, what: &str) -> Result<()> {
    let r: Value = client.post(&format!("/v1/volumes/{volume}/{what}"), &serde_json::json!({ "dry_run": true }))?;
    println!(
        "dry run: a {what} would make {} the primary of {volume} at epoch {}, replaying {} log entries; nothing changed",
        r["new_primary"].as_str().unwrap_or("?"),
        r["epoch"],
        r["entries_to_replay"]
    );
    for note in r["notes"].as_array().into_iter().flatten() {
        println!("  note: {}", note.as_str().unwrap_or(""));
    }
    Ok(())
}

/// Waits for the running scrub or rebuild of `volume` to end, with a progress line;
/// returns the storage status after it.
fn wait_storage_op(client: &Client, volume: &str, op: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
    let mut last_line = String::new();
    let started = Instant::now();
    loop {
        let s: Value = client.get(&format!("/v1/volumes/{volume}/storage"))?;
        let p = &s[op];
        if p.is_null() && done(&s) {
            if !last_line.is_empty() {
                eprintln!();
            }
            return Ok(s);
        }
        let done = p["done_bytes"].as_u64().unwrap_or(0);
        let total = p["total_bytes"].as_u64().unwrap_or(1).max(1);
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let line = format!(
            "\r{volume}: {op} {:5.1}% ({} / {} MiB, {:.0} MiB/s)",
            done as f64 * 100.0 / total as f64,
            done >> 20,
            total >> 20,
            (done >> 20) as f64 / secs
        );
        if line != last_line {
            eprint!("{line}");
            last_line = line;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn member_problems(s: &Value) -> String {
    let empty = Vec::new();
    s["members"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .filter(|m| m["state"] != "in-sync")
        .map(|m| {
            format!(
                "member {} ({}) {}{}",
                m["index"],
                m["disk"].as_str().unwrap_or("?"),
                m["state"].as_str().unwrap_or("?"),
                m["reason"].as_str().map(|r| format!(": {r}")).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn describe_storage(s: &Value) -> String {
    let empty = Vec::new();
    let disks: Vec<&str> = s["disks"].as_array().unwrap_or(&empty).iter().filter_map(|d| d["path"].as_str()).collect();
    match s["layout"].as_str() {
        Some("raid4") if !disks.is_empty() => {
            format!("RAID-4, {} data disks + parity {}", disks.len() - 1, disks.last().copied().unwrap_or("?"))
        }
        Some("single") => format!("{} (single disk, no redundancy)", s["disk"]["path"].as_str().unwrap_or("?")),
        _ => s.to_string(),
    }
}

/// One line about a volume's storage for `ctl status`.
fn storage_line(s: &Value) -> Option<String> {
    match s["level"].as_str()? {
        "raid4" => {
            let c = &s["counters"];
            let mut line = format!(
                "raid4 {}+1, {} unit, {}",
                s["data_disks"],
                human(s["stripe_unit"].as_u64().unwrap_or(0)),
                if s["degraded"].as_bool() == Some(true) {
                    format!("DEGRADED: {}", member_problems(s))
                } else {
                    "all members in sync".into()
                }
            );
            if c["checksum_errors"].as_u64().unwrap_or(0) + c["unrecoverable"].as_u64().unwrap_or(0) > 0 {
                line += &format!(
                    "; {} checksum errors, {} repaired, {} unrecoverable",
                    c["checksum_errors"], c["blocks_repaired"], c["unrecoverable"]
                );
            }
            for op in ["rebuild", "scrub"] {
                let p = &s[op];
                if !p.is_null() {
                    let pct = p["done_bytes"].as_f64().unwrap_or(0.0) * 100.0
                        / p["total_bytes"].as_f64().unwrap_or(1.0).max(1.0);
                    line += &format!("; {op} {pct:.1}%");
                }
            }
            let r = &s["last_scrub"];
            if !r.is_null() {
                line += &format!(
                    "; last scrub {} ({} errors, {} repaired, {} unrecoverable)",
                    r["result"].as_str().unwrap_or("?"),
                    r["checksum_errors"].as_u64().unwrap_or(0) + r["parity_mismatches"].as_u64().unwrap_or(0),
                    r["blocks_repaired"],
                    r["unrecoverable"]
                );
            }
            Some(line)
        }
        "single" => Some(format!("single disk {} (no redundancy)", s["disk"].as_str().unwrap_or("?"))),
        _ => None,
    }
}

fn wait_in_sync(client: &Client, volume: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let mut last_line = String::new();
    loop {
        let s: Value = client.get("/v1/status")?;
        let v = s["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["volume"] == volume))
            .ok_or_else(|| anyhow!("volume {volume} vanished"))?;
        let state = v["state"].as_str().unwrap_or("?");
        let (done, size) = if state == "resyncing" {
            (v["resync_done_bytes"].as_u64().unwrap_or(0), v["resync_total_bytes"].as_u64().unwrap_or(1).max(1))
        } else {
            (v["baseline_done_bytes"].as_u64().unwrap_or(0), v["size_bytes"].as_u64().unwrap_or(1).max(1))
        };
        match state {
            "in-sync" => {
                eprintln!();
                return Ok(());
            }
            "fenced" | "failed" => bail!("volume {volume} is {state}: {}", v["reason"].as_str().unwrap_or("")),
            _ => {}
        }
        let line = format!(
            "\r{volume}: {state} {:5.1}% ({} / {} MiB){}",
            done as f64 * 100.0 / size as f64,
            done >> 20,
            size >> 20,
            v["reason"].as_str().map(|r| format!(" [{r}]")).unwrap_or_default()
        );
        if line != last_line {
            eprint!("{line}");
            last_line = line;
        }
        if start.elapsed() > timeout {
            bail!("volume {volume} not in sync after {timeout:?} (state {state})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_status(s: &Value) {
    println!(
        "node {}  control {}  replication {}  nbd {}{}",
        s["node"].as_str().unwrap_or("?"),
        s["control"].as_str().unwrap_or("?"),
        s["replication"].as_str().unwrap_or("?"),
        s["nbd"].as_str().unwrap_or("?"),
        s["nvmf"].as_str().map(|a| format!("  nvmf {a}")).unwrap_or_default()
    );
    println!("nvram {} (survives {})", s["nvram"].as_str().unwrap_or("?"), s["nvram_survives"].as_str().unwrap_or("?"));
    let empty = Vec::new();
    let vols = s["volumes"].as_array().unwrap_or(&empty);
    let mirrors = s["mirrors"].as_array().unwrap_or(&empty);
    if vols.is_empty() && mirrors.is_empty() && s["unstarted"].as_array().is_none_or(Vec::is_empty) {
        println!("no volumes");
        return;
    }
    println!(
        "{:<16} {:<8} {:<12} {:>5} {:>10} {:>10} {:>8} {:<}",
        "VOLUME", "ROLE", "STATE", "EPOCH", "SIZE", "LOG USED", "LAST CP", "PEER"
    );
    for v in vols {
        println!(
            "{:<16} {:<8} {:<12} {:>5} {:>10} {:>10} {:>8} {}{}",
            v["volume"].as_str().unwrap_or("?"),
            "primary",
            v["state"].as_str().unwrap_or("?"),
            v["epoch"],
            human(v["size_bytes"].as_u64().unwrap_or(0)),
            human(v["log_bytes_used"].as_u64().unwrap_or(0)),
            v["last_cp"],
            v["peer"].as_str().unwrap_or("-"),
            v["reason"].as_str().map(|r| format!("  ({r})")).unwrap_or_default()
        );
        let changed = v["changed_bytes"].as_u64().unwrap_or(0);
        println!(
            "{:<16} policy {}; mirror {}; {} changed since {}{}",
            "",
            v["policy"].as_str().unwrap_or("?"),
            if v["mirror_current"].as_bool() == Some(true) { "current" } else { "not current" },
            human(changed),
            match (v["changes_since"]["peer"].as_str(), v["changes_since"]["cp"].as_u64()) {
                (Some(p), Some(cp)) => format!("{p}'s CP {cp}"),
                _ => "(no common point: a full copy)".into(),
            },
            match v["state"].as_str() {
                Some("resyncing") => format!(
                    "; resync {} / {}",
                    human(v["resync_done_bytes"].as_u64().unwrap_or(0)),
                    human(v["resync_total_bytes"].as_u64().unwrap_or(0))
                ),
                Some("baseline") => format!(
                    "; baseline {} / {}",
                    human(v["baseline_done_bytes"].as_u64().unwrap_or(0)),
                    human(v["size_bytes"].as_u64().unwrap_or(0))
                ),
                _ => String::new(),
            } + if v["copy_paused"] == true { " (copy paused: ctl resume-copy)" } else { "" }
        );
        if let Some(line) = storage_line(&v["storage"]) {
            println!("{:<16} storage: {line}", "");
        }
        if let Some(what) = v["ack_survives"].as_array() {
            let what: Vec<&str> = what.iter().filter_map(Value::as_str).collect();
            println!("{:<16} an acknowledged write survives {}", "", what.join(", "));
        }
        print_nvmf_hosts(&v["nvmf_hosts"]);
    }
    let unstarted = s["unstarted"].as_array().unwrap_or(&empty);
    for u in unstarted {
        println!(
            "{:<16} {:<8} {:<12} cannot start: {}",
            u["volume"].as_str().unwrap_or("?"),
            "primary",
            "failed",
            u["reason"].as_str().unwrap_or("?")
        );
    }
    for m in mirrors {
        let state = m["state"].as_str().unwrap_or("?");
        println!(
            "{:<16} {:<8} {:<12} {:>5} {:>10} {:>10} {:>8} {}",
            m["volume"].as_str().unwrap_or("?"),
            "mirror",
            state,
            m["epoch"],
            "",
            human(m["log_bytes_used"].as_u64().unwrap_or(0)),
            m["applied_cp"],
            m["source_node"].as_str().unwrap_or("?"),
        );
        if let Some(line) = storage_line(&m["storage"]) {
            println!("{:<16} storage: {line}", "");
        }
        print_nvmf_hosts(&m["nvmf_hosts"]);
    }
}

/// One line per host attached over NVMe/TCP through this node.
fn print_nvmf_hosts(hosts: &Value) {
    for h in hosts.as_array().map(Vec::as_slice).unwrap_or_default() {
        println!(
            "{:<16} nvmf: {} at {}, controller {:#06x}, {} I/O queues, path {}",
            "",
            h["host_nqn"].as_str().unwrap_or("?"),
            h["address"].as_str().unwrap_or("?"),
            h["controller"].as_u64().unwrap_or(0),
            h["io_queues"],
            h["ana"].as_str().unwrap_or("?")
        );
    }
}

fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", U[i])
    }
}
