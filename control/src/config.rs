//! `nvmirror node --config FILE`: a TOML file whose keys are the node's flags, by the same
//! names (`data-dir = "/srv/a"`, `listen = "10.0.0.1:7100"`, `require-signed-ctl = true`).
//! Its settings go before the command line's, so a flag given there wins; a key that is
//! not a flag is an error naming the key and its line. A node started with neither
//! `--config` nor `--data-dir` reads [`DEFAULT_PATH`] (or `NVMIRROR_CONFIG`) where it
//! exists: `nvmirror node` alone runs the installed configuration.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

/// Where a package installs the node's settings.
pub const DEFAULT_PATH: &str = "/etc/nvmirror/node.toml";

/// The config file a node started with neither `--config` nor `--data-dir` reads:
/// `NVMIRROR_CONFIG` if set, else [`DEFAULT_PATH`] if it exists.
fn default_file() -> Option<OsString> {
    match std::env::var_os("NVMIRROR_CONFIG") {
        Some(p) => Some(p),
        None => Path::new(DEFAULT_PATH).exists().then(|| OsString::from(DEFAULT_PATH)),
    }
}

/// What a flag takes, for its key in a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagKind {
    /// `true` or `false`.
    Switch,
    /// A string or a number.
    Value,
    /// A string or a number, or a list of them (the flag repeated).
    Values,
}

/// The arguments with the settings of any `node --config FILE` spliced in right after
/// `node`, as the flags they stand for. `flags`: the node command's long flags, and
/// what each takes.
pub fn expand(args: Vec<OsString>, flags: &[(String, FlagKind)]) -> Result<Vec<OsString>> {
    let Some(node_at) = args.iter().skip(1).position(|a| a == "node").map(|i| i + 1) else { return Ok(args) };
    // The file named by --config FILE or --config=FILE (the last one, as flags go).
    let mut file = None;
    let mut i = node_at + 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--config" {
            file = Some(args.get(i + 1).ok_or_else(|| anyhow!("--config needs a file"))?.clone());
            i += 2;
            continue;
        }
        if let Some(f) = a.strip_prefix("--config=") {
            file = Some(OsString::from(f));
        }
        i += 1;
    }
    let names_data_dir = args[node_at + 1..].iter().any(|a| {
        let a = a.to_string_lossy();
        a == "--data-dir" || a.starts_with("--data-dir=")
    });
    let help = args[node_at + 1..].iter().any(|a| a == "--help" || a == "-h");
    let Some(file) = file.or_else(|| (!names_data_dir && !help).then(default_file).flatten()) else {
        return Ok(args);
    };
    let settings = read(Path::new(&file), flags)?;
    let mut out: Vec<OsString> = args[..=node_at].to_vec();
    out.extend(settings.into_iter().map(OsString::from));
    out.extend(args[node_at + 1..].iter().cloned());
    Ok(out)
}

/// A string or a number, as a flag's value.
fn scalar(v: &toml::Value) -> Result<String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(n) => Ok(n.to_string()),
        other => bail!("a string or a number, not {}", other.type_str()),
    }
}

/// The config file `path`, its text and its table.
fn load(path: &Path) -> Result<(String, toml::Table)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--config {}", path.display()))?;
    let table = text.parse().map_err(|e| anyhow!("--config {}: {e}", path.display()))?;
    Ok((text, table))
}

/// The values of `key` in the config file `path` (a string, a number, or a list of
/// them); empty if it has none.
pub fn settings(path: &Path, key: &str) -> Result<Vec<String>> {
    let (_, table) = load(path)?;
    let at = |e: anyhow::Error| anyhow!("--config {}: {key}: {e}", path.display());
    match table.get(key) {
        None => Ok(Vec::new()),
        Some(toml::Value::Array(items)) => items.iter().map(|v| scalar(v).map_err(at)).collect(),
        Some(v) => Ok(vec![scalar(v).map_err(at)?]),
    }
}

/// The value of `key` in the config file `path` (a string or a number), if it has one.
pub fn setting(path: &Path, key: &str) -> Result<Option<String>> {
    Ok(settings(path, key)?.pop())
}

/// The flags a config file stands for.
fn read(path: &Path, flags: &[(String, FlagKind)]) -> Result<Vec<String>> {
    let (text, table) = load(path)?;
    let line_of = |key: &str| {
        text.lines()
            .position(|l| {
                let l = l.trim_start();
                l.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('='))
                    || l.strip_prefix(&format!("\"{key}\"")).is_some_and(|rest| rest.trim_start().starts_with('='))
            })
            .map_or(0, |i| i + 1)
    };
    let mut out = Vec::new();
    for (key, value) in &table {
        let at = format!("{}:{}", path.display(), line_of(key));
        if key == "config" {
            bail!("{at}: a config file cannot name another (key \"config\")");
        }
        let Some((_, kind)) = flags.iter().find(|(name, _)| name == key) else {
            let known: Vec<&str> = flags.iter().map(|(n, _)| n.as_str()).filter(|n| *n != "config").collect();
            bail!("{at}: unknown key {key:?}: the keys are the node's flags ({})", known.join(", "));
        };
        match (value, kind) {
            (toml::Value::Boolean(true), FlagKind::Switch) => out.push(format!("--{key}")),
            (toml::Value::Boolean(false), FlagKind::Switch) => {}
            (toml::Value::String(_) | toml::Value::Integer(_), FlagKind::Value | FlagKind::Values) => {
                out.push(format!("--{key}={}", scalar(value)?));
            }
            // A flag given several times (secret-file = ["new.key", "old.key"]).
            (toml::Value::Array(items), FlagKind::Values) => {
                for item in items {
                    let v = scalar(item).map_err(|e| anyhow!("{at}: {key}: {e}"))?;
                    out.push(format!("--{key}={v}"));
                }
            }
            (_, FlagKind::Switch) => bail!("{at}: {key} is a switch: true or false"),
            (other, FlagKind::Value) => bail!("{at}: {key} takes a string or a number, not {}", other.type_str()),
            (other, FlagKind::Values) => {
                bail!("{at}: {key} takes a string, a number or a list of them, not {}", other.type_str())
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Vec<(String, FlagKind)> {
        [
            ("data-dir", FlagKind::Value),
            ("listen", FlagKind::Value),
            ("lease-ttl", FlagKind::Value),
            ("require-signed-ctl", FlagKind::Switch),
            ("config", FlagKind::Value),
            ("secret-file", FlagKind::Values),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), *v))
        .collect()
    }

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_file_s_settings_go_before_the_command_line_s() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("node.toml");
        std::fs::write(&f, "# a node\ndata-dir = \"/srv/a\"\nlease-ttl = 5\nrequire-signed-ctl = true\n").unwrap();
        let out =
            expand(args(&["nvmirror", "node", "--config", f.to_str().unwrap(), "--lease-ttl", "9"]), &flags()).unwrap();
        let out: Vec<String> = out.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        let f = f.to_str().unwrap().to_string();
        assert_eq!(
            out,
            [
                "nvmirror",
                "node",
                "--data-dir=/srv/a",
                "--lease-ttl=5",
                "--require-signed-ctl",
                "--config",
                &f,
                "--lease-ttl",
                "9"
            ]
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_errors_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("node.toml");
        let run = |text: &str| {
            std::fs::write(&f, text).unwrap();
            expand(args(&["nvmirror", "node", &format!("--config={}", f.display())]), &flags()).unwrap_err().to_string()
        };
        let e = run("data-dir = \"/a\"\n\nlistne = \"x\"\n");
        assert!(e.contains("node.toml:3: unknown key \"listne\"") && e.contains("listen"), "{e}");
        let e = run("require-signed-ctl = \"yes\"\n");
        assert!(e.contains(":1: require-signed-ctl is a switch"), "{e}");
        let e = run("listen = [1]\n");
        assert!(e.contains("listen takes a string or a number"), "{e}");
        let e = run("secret-file = [\"a\", 7, true]\n");
        assert!(e.contains("secret-file: a string or a number, not boolean"), "{e}");
        let e = run("listen = \n");
        assert!(e.contains("--config"), "{e}");
    }

    #[test]
    fn a_list_repeats_a_flag_that_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("node.toml");
        std::fs::write(&f, "secret-file = [\"/k/new\", \"/k/old\"]\n").unwrap();
        let out = expand(args(&["nvmirror", "node", "--config", f.to_str().unwrap()]), &flags()).unwrap();
        let out: Vec<String> = out.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        assert_eq!(out[2..4], ["--secret-file=/k/new", "--secret-file=/k/old"]);
        assert_eq!(settings(&f, "secret-file").unwrap(), ["/k/new", "/k/old"]);
        assert!(settings(&f, "log-level").unwrap().is_empty());
    }

    #[test]
    fn other_commands_and_nodes_without_a_file_are_left_alone() {
        let a = args(&["nvmirror", "ctl", "--node", "x:1", "status"]);
        assert_eq!(expand(a.clone(), &flags()).unwrap(), a);
        let a = args(&["nvmirror", "node", "--data-dir", "/d"]);
        assert_eq!(expand(a.clone(), &flags()).unwrap(), a);
    }
}
