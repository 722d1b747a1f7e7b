//! Runs every scenario of the harness with `--quick` (a few iterations) and checks that the
//! run's JSON result is well-formed: every scenario is there, every arm has numeric
//! figures, every target has a ratio and a verdict. No timing is asserted: the figures of
//! a quick run on a shared machine mean nothing.
//!
//! The end-to-end scenarios need the `nvmirror` node binary: the harness builds it with
//! cargo itself (same profile and target directory as the harness).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const SCENARIOS: [&str; 23] = [
    "hop",
    "nbd-peers-qd32",
    "nbd-peers-qd32-p99",
    "nbd-peers-qd1",
    "nbd-peers-qd1-p99",
    "nbd-peers-mirrored-qd32",
    "nbd-peers-mirrored-raid4-qd32",
    "nbd-peers-mirrored-qd1",
    "nbd-tls-qd32",
    "nbd-tls-qd1",
    "direct-log-qd1",
    "direct-log-mirrored-qd1",
    "direct-log-qd32",
    "nbd-qd1",
    "nbd-qd32",
    "qd-sweep",
    "nbd-open",
    "raid-write",
    "xor-cache",
    "xor-memory",
    "xor-portable",
    "uring-fio",
    "failover",
];

fn number(v: &Value, what: &str) -> f64 {
    let n = v.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(n.is_finite() && n >= 0.0, "{what} is not a finite non-negative number: {n}");
    n
}

fn check_arm(scenario: &str, arm: &Value) {
    let name = arm["name"].as_str().unwrap_or_else(|| panic!("{scenario}: arm without a name: {arm}"));
    let what = |f: &str| format!("{scenario}/{name}/{f}");
    let ops = arm["ops"].as_u64().unwrap_or_else(|| panic!("{} is not an integer", what("ops")));
    assert!(ops > 0, "{} is zero", what("ops"));
    for f in ["wall_s", "throughput_ops_s", "cpu_us_per_op"] {
        number(&arm[f], &what(f));
    }
    for p in ["p50", "p90", "p99", "p99.9", "max", "mean"] {
        number(&arm["latency_us"][p], &what(&format!("latency_us.{p}")));
    }
    for f in ["round_p50_us", "round_throughput_ops_s"] {
        let rounds = arm[f].as_array().unwrap_or_else(|| panic!("{} is not an array", what(f)));
        assert!(!rounds.is_empty(), "{} is empty", what(f));
        for r in rounds {
            number(r, &what(f));
        }
    }
}

#[test]
fn quick_run_writes_a_well_formed_result_for_every_scenario() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_nvmirror-benches"))
        .args(["--quick", "--out"])
        .arg(out.path())
        .arg("all")
        .output()
        .expect("run the harness");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "harness failed ({}):\n{stdout}\n{stderr}", run.status);
    for s in SCENARIOS {
        assert!(stdout.contains(s), "the table lacks scenario {s}:\n{stdout}");
    }

    let files: Vec<_> = std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().path()).collect();
    let ext = |p: &Path, e: &str| p.extension().and_then(|x| x.to_str()) == Some(e);
    let json: Vec<_> = files.iter().filter(|p| ext(p, "json")).collect();
    assert_eq!(json.len(), 1, "one JSON file per run, found {files:?}");
    let path: &Path = json[0];
    let run: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).expect("result is valid JSON");
    // The plots: an SVG per scenario with its arms' latency curves (named in the legend),
    // and the sweep's throughput against queue depth; nothing else in the directory.
    let svgs: Vec<_> = files.iter().filter(|p| ext(p, "svg")).collect();
    assert_eq!(svgs.len() + 1, files.len(), "only the JSON and SVG plots: {files:?}");
    for s in run["scenarios"].as_array().expect("scenarios") {
        let name = s["name"].as_str().unwrap();
        let plot = svgs
            .iter()
            .find(|p| p.to_string_lossy().ends_with(&format!("-{name}-latency.svg")))
            .unwrap_or_else(|| panic!("no latency plot for {name}: {svgs:?}"));
        let svg = std::fs::read_to_string(plot).unwrap();
        assert!(svg.contains("<svg") && svg.contains("</svg>"), "{name}: not an SVG document");
        assert!(svg.contains("<polyline"), "{name}: the plot draws no curve");
        let arms = s["arms"].as_array().unwrap();
        if name != "qd-sweep" {
            for arm in arms {
                let arm = arm["name"].as_str().unwrap();
                assert!(svg.contains(arm), "{name}: the plot's legend lacks arm {arm}");
            }
        }
        for arm in arms {
            let curve = arm["curve"].as_array().unwrap_or_else(|| panic!("{name}: an arm without a curve"));
            assert!(curve.len() >= 10, "{name}: a curve of {} points", curve.len());
        }
    }
    assert!(
        svgs.iter().any(|p| p.to_string_lossy().ends_with("-qd-sweep-throughput.svg")),
        "no throughput plot for qd-sweep: {svgs:?}"
    );

    assert_eq!(run["quick"], Value::Bool(true));
    for f in ["timestamp_utc", "command"] {
        assert!(!run[f].is_null(), "run lacks {f}");
    }
    assert!(run["git"]["commit"].as_str().is_some_and(|c| !c.is_empty()), "no git commit");
    let m = &run["machine"];
    assert!(m["cpu_model"].as_str().is_some_and(|c| !c.is_empty()), "no CPU model");
    assert!(m["cores"].as_u64().is_some_and(|c| c > 0), "no core count");
    assert!(m["kernel"].as_str().is_some_and(|k| !k.is_empty()), "no kernel");
    number(&run["wall_s"], "wall_s");

    let scenarios = run["scenarios"].as_array().expect("scenarios array");
    let names: Vec<&str> = scenarios.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, SCENARIOS, "every scenario, in order");
    for s in scenarios {
        let name = s["name"].as_str().unwrap();
        assert!(s["cpu_counted"].as_str().is_some_and(|c| !c.is_empty()), "{name}: cpu_counted");
        let arms = s["arms"].as_array().unwrap_or_else(|| panic!("{name}: arms"));
        assert!(!arms.is_empty(), "{name}: no arms");
        for arm in arms {
            check_arm(name, arm);
        }
        match name {
            "nbd-open" => {
                assert!(s["check"].is_null(), "nbd-open has no target");
                assert!(s["params"]["rate_writes_per_s"].as_u64().is_some_and(|r| r > 0), "nbd-open: no rate");
                assert!(s["notes"].to_string().contains("behind its schedule"), "nbd-open: no sender lag note");
            }
            // Measured and recorded, with no target: the ratios are in the notes.
            "nbd-tls-qd32" | "nbd-tls-qd1" => {
                assert!(s["check"].is_null(), "{name} has no target");
                assert_eq!(arms.len(), 6, "{name}: nbdkit, nvmirror plain and mirrored, each with and without TLS");
                assert!(s["notes"].to_string().contains("TLS / plain"), "{name}: no cost note");
            }
            "qd-sweep" => {
                assert!(s["check"].is_null(), "qd-sweep has no target");
                assert_eq!(arms.len(), 14, "mirrored and plain at 7 queue depths");
                for arm in arms {
                    assert!(arm["queue_depth"].as_u64().is_some(), "qd-sweep arm without a queue depth");
                }
            }
            // Built without ISA-L (as the test suite builds): no ratio, and the reason why.
            "uring-fio" if s["check"].is_null() => {
                assert_eq!(s["params"]["fio"], false, "{name}: no ratio although fio ran");
                assert!(s["notes"].to_string().contains("fio is not installed"), "{name}: no reason for no ratio");
            }
            "xor-cache" | "xor-memory" if s["check"].is_null() => {
                assert_eq!(s["params"]["isal_built"], false, "{name}: no ratio although ISA-L is built");
                let notes = s["notes"].to_string();
                assert!(notes.contains("--features isal"), "{name}: no reason for the missing ratio: {notes}");
            }
            _ => {
                let c = &s["check"];
                number(&c["ratio"], &format!("{name}: ratio"));
                number(&c["target"], &format!("{name}: target"));
                assert!(c["pass"].is_boolean(), "{name}: pass is not a boolean");
                for f in ["median", "min", "max"] {
                    number(&c["per_round"][f], &format!("{name}: per_round.{f}"));
                }
                assert!(matches!(c["comparison"].as_str(), Some("<=" | ">=")), "{name}: comparison");
            }
        }
    }
}
