//! `hw-tests/pair` (the runner of the `drbd-guest` scenario) fails loudly when its guests
//! do not boot: given two seconds, neither guest reaches its init, and the runner must
//! say so for each and exit non-zero, never pass. Skipped, with the reason, where the
//! host cannot boot the guests at all (no QEMU, no guest kernel).

use std::process::Command;

#[test]
fn runner_fails_when_the_guests_do_not_boot() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(root.join("hw-tests/pair"))
        .env("HW_PAIR_OUT", out.path())
        .env("HW_PAIR_BUILD", "0")
        .env("HW_PAIR_TIMEOUT", "2")
        .current_dir(root)
        .output()
        .expect("run hw-tests/pair");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "hw-tests/pair passed with a 2 s limit:\n{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or("");
    assert!(last.starts_with("hw-pair: FAIL ("), "the last line is not the failure: {last:?}\n{stdout}\n{stderr}");
    if !stdout.contains("booting guest b") {
        // The host lacks what the guests need: the runner said what, and failed.
        eprintln!("skipped: the host cannot boot the guests: {last}");
        return;
    }
    for role in ["a", "b"] {
        assert!(
            last.contains(&format!("guest {role} did not boot")),
            "the runner does not say that guest {role} did not boot: {last}"
        );
    }
    assert!(last.contains("measurements missing"), "no word of the missing measurements: {last}");
}
