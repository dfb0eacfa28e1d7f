// The version line of Citadel's binaries (issue 13, item 2), shared by the
// build scripts of crates/{cli,supervisor,gateway,engine-sim} (each is
// `include!("../../packaging/build-version.rs")`).
//
// `--version` prints "NAME <package version> (commit <git commit>)":
// - the package version is CITADEL_PKG_VERSION when set (`cargo xtask deb`
//   sets it to the .deb's version), otherwise the crate's Cargo version;
// - the commit is CITADEL_GIT_COMMIT when set (a build outside a checkout,
//   e.g. from a source tarball), otherwise `git rev-parse --short=12 HEAD`
//   in a git checkout, otherwise "unknown".
// The result is the compile-time variable CITADEL_VERSION. The script runs
// again when either variable changes, or HEAD moves (a checkout, a commit).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=CITADEL_PKG_VERSION");
    println!("cargo:rerun-if-env-changed=CITADEL_GIT_COMMIT");
    let nonempty = |name: &str| {
        std::env::var(name)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let version = nonempty("CITADEL_PKG_VERSION")
        .or_else(|| nonempty("CARGO_PKG_VERSION"))
        .unwrap_or_else(|| "unknown".to_owned());
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let commit = nonempty("CITADEL_GIT_COMMIT")
        .or_else(|| git_commit(&dir))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=CITADEL_VERSION={version} (commit {commit})");
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn git_commit(dir: &Path) -> Option<String> {
    let commit = git(dir, &["rev-parse", "--short=12", "HEAD"])?;
    // HEAD (a checkout), the branch it names (a commit) and packed-refs (where
    // a branch may live after `git gc`); watched only when they exist, since
    // cargo reruns a script on every build for a missing file.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(dir, &["rev-parse", "--git-path", &name]) {
            let path = dir.join(path);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    Some(commit)
}
