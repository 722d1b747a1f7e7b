//! The Debian package: `packaging/build-deb` (cargo-deb) builds it, and it holds the
//! binary, the systemd unit, the default config as a conffile, the man pages and the
//! shell completions.

use std::path::Path;
use std::process::Command;

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let out = Command::new("dpkg-deb").args(args).arg(deb).output().expect("run dpkg-deb");
    assert!(out.status.success(), "dpkg-deb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_debian_package_holds_the_binary_unit_config_man_pages_and_completions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace");
    let out = tempfile::tempdir().expect("tempdir");
    let status = Command::new(root.join("packaging/build-deb"))
        .arg("--output")
        .arg(out.path())
        .status()
        .expect("run packaging/build-deb");
    assert!(status.success(), "packaging/build-deb failed: {status}");
    let debs: Vec<_> = std::fs::read_dir(out.path())
        .expect("the output dir")
        .map(|e| e.expect("an entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "one .deb expected: {debs:?}");
    let deb = &debs[0];
    let fields = dpkg_deb(&["-f"], deb);
    assert!(fields.contains("Package: nvmirror\n"), "{fields}");
    let contents = dpkg_deb(&["-c"], deb);
    for want in [
        "./usr/bin/nvmirror",
        "./lib/systemd/system/nvmirror.service",
        "./etc/nvmirror/node.toml",
        "./usr/share/man/man1/nvmirror.1",
        "./usr/share/man/man1/nvmirror-node.1",
        "./usr/share/man/man1/nvmirror-ctl-failover.1",
        "./usr/share/bash-completion/completions/nvmirror",
        "./usr/share/zsh/vendor-completions/_nvmirror",
        "./usr/share/fish/vendor_completions.d/nvmirror.fish",
    ] {
        assert!(contents.lines().any(|l| l.ends_with(want)), "the package lacks {want}:\n{contents}");
    }
    // The config is a conffile: an upgrade keeps the administrator's edits.
    let out = Command::new("dpkg-deb").arg("-I").arg(deb).arg("conffiles").output().expect("dpkg-deb -I");
    let conffiles = String::from_utf8_lossy(&out.stdout);
    assert!(conffiles.lines().any(|l| l == "/etc/nvmirror/node.toml"), "not a conffile: {conffiles:?}");
    // The packed binary runs and is the one built from this tree.
    let x = tempfile::tempdir().expect("tempdir");
    let status = Command::new("dpkg-deb").arg("-x").arg(deb).arg(x.path()).status().expect("dpkg-deb -x");
    assert!(status.success());
    let v = Command::new(x.path().join("usr/bin/nvmirror")).arg("--version").output().expect("run the packed binary");
    assert_eq!(String::from_utf8_lossy(&v.stdout).trim(), format!("nvmirror {}", env!("CARGO_PKG_VERSION")));
    let unit = std::fs::read_to_string(x.path().join("lib/systemd/system/nvmirror.service")).expect("the unit");
    assert!(
        unit.contains("Type=notify")
            && unit.contains("ExecStart=/usr/bin/nvmirror node --config /etc/nvmirror/node.toml")
    );
    verify_unit(&unit, &x.path().join("usr/bin/nvmirror"));
}

/// `systemd-analyze verify` on the packed unit, its binary where it was unpacked: systemd
/// itself parses it. It warns (on stderr, still exiting 0) of an unknown key, a bad value
/// or a command that is not executable, so any word on stderr fails the test.
fn verify_unit(unit: &str, binary: &Path) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nvmirror.service");
    let unit = unit.replace("/usr/bin/nvmirror", binary.to_str().expect("a UTF-8 path"));
    std::fs::write(&path, unit).expect("write the unit");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("run systemd-analyze (Debian's systemd package)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {}\n{stderr}", out.status);
}
