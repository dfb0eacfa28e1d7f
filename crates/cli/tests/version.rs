//! Issue 13, item 2: `--version` names the package version and the git commit
//! the binary was built from (`packaging/build-version.rs`).

use std::process::Command;

#[test]
fn issue13_version_names_the_package_version_and_the_commit() {
    let out = Command::new(env!("CARGO_BIN_EXE_citadel-systemd"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    let rest = line
        .trim()
        .strip_prefix("citadel-systemd ")
        .unwrap_or_else(|| panic!("{line:?}"));
    let (version, commit) = rest
        .split_once(" (commit ")
        .unwrap_or_else(|| panic!("no commit in {line:?}"));
    let commit = commit.strip_suffix(')').unwrap();
    // The package version: CITADEL_PKG_VERSION when the build set it, else Cargo's.
    let expected = option_env!("CITADEL_PKG_VERSION")
        .filter(|v| !v.trim().is_empty())
        .unwrap_or(env!("CARGO_PKG_VERSION"));
    assert_eq!(version, expected.trim(), "{line:?}");
    // In a checkout, the 12-digit commit of HEAD; `unknown` elsewhere.
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match (option_env!("CITADEL_GIT_COMMIT"), head) {
        (Some(c), _) if !c.trim().is_empty() => assert_eq!(commit, c.trim()),
        (_, Some(head)) => {
            // The build script reruns when HEAD moves, so this is HEAD now.
            assert_eq!(commit.len(), 12, "{line:?}");
            assert!(commit.chars().all(|c| c.is_ascii_hexdigit()), "{line:?}");
            assert_eq!(commit, head, "{line:?}");
        }
        (_, None) => assert_eq!(commit, "unknown"),
    }
}
