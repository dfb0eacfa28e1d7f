//! `cargo xtask deb`: the Debian package `citadel_VERSION_ARCH.deb` (issue 13,
//! item 1), built with Debian's own tools from a staged tree: `cargo build
//! --release`, then `dpkg-deb --build --root-owner-group`, with
//! `dpkg-shlibdeps` for the library dependencies. (Not `cargo-deb`: it needs
//! `cargo install cargo-deb`, another hundred crates compiled on every fresh
//! machine, for what a page of code does here with tools every Debian has.)
//!
//! Contents:
//! - `/opt/citadel/bin/`: the four release binaries, stripped, where the units
//!   run them from; `/usr/bin/citadel-systemd` links to the CLI;
//! - `/usr/share/man/man1/`: `citadel-systemd.1.gz`, one page per subcommand
//!   (`citadel-systemd-install.1.gz`, ...), `citadel-model.1.gz`,
//!   `citadel-gateway.1.gz`, all from the clap definitions (clap_mangen);
//! - bash, zsh and fish completions in their vendor directories (clap_complete,
//!   with SERVICE names from the config for bash and fish);
//! - `/usr/lib/sysusers.d/citadel.conf`, `/usr/lib/tmpfiles.d/citadel.conf`:
//!   the user and base directories for the default paths, rendered by the CLI
//!   itself from the example config. `citadel-systemd install` renders the
//!   same names into `/usr/local/lib/...`, which systemd reads first: the
//!   operator's config wins once installed, and the user and group are the
//!   same either way;
//! - `/usr/share/doc/citadel/`: README, docs, example configs, `copyright`
//!   (Apache-2.0, Debian's format) and `changelog.gz` (the name for a native
//!   package: the version has no Debian revision);
//! - no unit: the stack's units are rendered from the operator's config by
//!   `citadel-systemd install` (even the gateway's socket takes its port from
//!   it), so none is static;
//! - maintainer scripts from `packaging/debian/` (what each does: there).
//!
//! The version is the workspace's unless `--version V`; the binaries are
//! built with `CITADEL_PKG_VERSION=V`, so their `--version` names the package
//! version (and the commit). A second build with another version recompiles
//! only the four binary crates.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::tier::CITADEL_BINS;

const PACKAGE: &str = "citadel";
const MAINTAINER: &str = "Citadel maintainers <citadel@example.org>";

fn usage() -> &'static str {
    "usage: cargo xtask deb [--version V] [--out DIR]\n\
     \n\
     --version V  the package version (default: the workspace's, from Cargo.toml)\n\
     --out DIR    where the .deb goes (default: target/deb)"
}

pub fn run(args: Vec<String>) -> Result<()> {
    let mut version = env!("CARGO_PKG_VERSION").to_owned();
    let mut out: Option<PathBuf> = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--version" => version = it.next().context(usage())?,
            "--out" => out = Some(it.next().context(usage())?.into()),
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            other => bail!("unknown argument `{other}`\n{}", usage()),
        }
    }
    let out = out.unwrap_or_else(|| target_dir().join("deb"));
    let deb = build(&version, &out)?;
    println!("deb: {}", deb.display());
    Ok(())
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace().join("target"), PathBuf::from)
}

/// A Debian version: digits first, then `[A-Za-z0-9.+~-]` (no epoch here).
fn check_version(v: &str) -> Result<()> {
    let ok = v.starts_with(|c: char| c.is_ascii_digit())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+~-".contains(c));
    if !ok {
        bail!("`{v}` is not a Debian version (digits first, then letters, digits and . + ~ -)");
    }
    Ok(())
}

/// `cargo build --release` of the four binaries with the package version;
/// returns `target/release`.
pub fn build_release(version: &str) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let t = Instant::now();
    let status = Command::new(cargo)
        .current_dir(workspace())
        .env("CITADEL_PKG_VERSION", version)
        .args(["build", "--release", "--quiet", "--bins"])
        .args(["-p", "citadel-systemd", "-p", "citadel-supervisor"])
        .args(["-p", "citadel-gateway", "-p", "citadel-engine-sim"])
        .status()
        .context("running cargo build --release")?;
    if !status.success() {
        bail!("cargo build --release failed: {status}");
    }
    println!(
        "deb: release binaries ({version}) built in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(target_dir().join("release"))
}

/// Builds the package into `out`; returns its path.
pub fn build(version: &str, out: &Path) -> Result<PathBuf> {
    check_version(version)?;
    for tool in ["dpkg-deb", "dpkg-shlibdeps", "strip", "gzip"] {
        if !tool_exists(tool) {
            bail!("`{tool}` is missing: apt-get install dpkg-dev binutils gzip (scripts/setup-dev.sh does)");
        }
    }
    let bins = build_release(version)?;
    let t = Instant::now();
    let arch = output("dpkg", &["--print-architecture"])?;
    let stage = out.join(format!("{PACKAGE}_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    stage_tree(&stage, &bins, version)?;
    let deb = out.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    run_tool(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group", "-Zxz"])
            .arg(&stage)
            .arg(&deb)
            .stdout(Stdio::null()),
    )?;
    println!(
        "deb: {} staged and packed in {:.1} s",
        deb.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(deb)
}

fn stage_tree(stage: &Path, bins: &Path, version: &str) -> Result<()> {
    let ws = workspace();
    let pkg = ws.join("packaging/debian");
    // Binaries, stripped (lintian: unstripped-binary-or-object).
    let bin_dir = stage.join("opt/citadel/bin");
    mkdir(&bin_dir)?;
    for b in CITADEL_BINS {
        run_tool(
            Command::new("strip")
                .args(["--strip-unneeded", "--remove-section=.comment", "-o"])
                .arg(bin_dir.join(b))
                .arg(bins.join(b)),
        )?;
        mode(&bin_dir.join(b), 0o755)?;
    }
    mkdir(&stage.join("usr/bin"))?;
    // Between top-level directories Debian wants absolute links.
    std::os::unix::fs::symlink(
        "/opt/citadel/bin/citadel-systemd",
        stage.join("usr/bin/citadel-systemd"),
    )?;

    // Man pages and completions, from the binaries just built.
    let scratch = PathBuf::from(format!("{}.assets", stage.display()));
    if scratch.exists() {
        fs::remove_dir_all(&scratch)?;
    }
    let cli = bin_dir.join("citadel-systemd");
    run_tool(Command::new(&cli).arg("assets").arg("--out").arg(&scratch))?;
    let man1 = stage.join("usr/share/man/man1");
    mkdir(&man1)?;
    for entry in fs::read_dir(scratch.join("man"))? {
        let path = entry?.path();
        let name = path.file_name().context("a man page's name")?;
        gzip_into(
            &fs::read(&path)?,
            &man1.join(format!("{}.gz", name.to_string_lossy())),
        )?;
    }
    let model = output_bytes(&bin_dir.join("citadel-model"), &["man-page"])?;
    gzip_into(&model, &man1.join("citadel-model.1.gz"))?;
    let gateway = output_bytes(&bin_dir.join("citadel-gateway"), &["--man-page"])?;
    gzip_into(&gateway, &man1.join("citadel-gateway.1.gz"))?;
    let completions = scratch.join("completions");
    for (from, to) in [
        (
            "citadel-systemd.bash",
            "usr/share/bash-completion/completions/citadel-systemd",
        ),
        (
            "_citadel-systemd",
            "usr/share/zsh/vendor-completions/_citadel-systemd",
        ),
        (
            "citadel-systemd.fish",
            "usr/share/fish/vendor_completions.d/citadel-systemd.fish",
        ),
    ] {
        copy(&completions.join(from), &stage.join(to), 0o644)?;
    }

    // sysusers.d and tmpfiles.d for the default paths, as the CLI renders them.
    let example = scratch.join("example");
    run_tool(
        Command::new(&cli)
            .arg("--root")
            .arg(&example)
            .args(["init", "--example", "sim"])
            .stdout(Stdio::null()),
    )?;
    let rendered = scratch.join("rendered");
    run_tool(
        Command::new(&cli)
            .arg("--root")
            .arg(&example)
            .arg("render")
            .arg("--out")
            .arg(&rendered)
            .stdout(Stdio::null()),
    )?;
    for kind in ["sysusers.d", "tmpfiles.d"] {
        let text = fs::read_to_string(rendered.join(kind).join("citadel.conf"))?;
        write(
            &stage.join("usr/lib").join(kind).join("citadel.conf"),
            &vendor_entry(kind, &text),
            0o644,
        )?;
    }
    fs::remove_dir_all(&scratch)?;

    // Documentation.
    let doc = stage.join("usr/share/doc/citadel");
    copy(&ws.join("README.md"), &doc.join("README.md"), 0o644)?;
    for entry in fs::read_dir(ws.join("docs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md") {
            let name = path.file_name().context("a doc's name")?;
            copy(&path, &doc.join("docs").join(name), 0o644)?;
        }
    }
    for example in ["citadel.example.toml", "citadel.sim.toml"] {
        copy(
            &ws.join("crates/config").join(example),
            &doc.join("examples").join(example),
            0o644,
        )?;
    }
    copy(&pkg.join("copyright"), &doc.join("copyright"), 0o644)?;
    gzip_into(changelog(version)?.as_bytes(), &doc.join("changelog.gz"))?;
    copy(
        &pkg.join("lintian-overrides"),
        &stage.join("usr/share/lintian/overrides/citadel"),
        0o644,
    )?;

    // Control area.
    let debian = stage.join("DEBIAN");
    mkdir(&debian)?;
    for script in ["postinst", "prerm", "postrm"] {
        copy(&pkg.join(script), &debian.join(script), 0o755)?;
    }
    let depends = shlib_depends(stage, &bin_dir)?;
    write(
        &debian.join("control"),
        &control(
            version,
            &output("dpkg", &["--print-architecture"])?,
            &depends,
            installed_kib(stage)?,
        ),
        0o644,
    )?;
    write(&debian.join("md5sums"), &md5sums(stage)?, 0o644)?;
    fix_dir_modes(stage)
}

/// The package's sysusers.d/tmpfiles.d entry: the rendered lines under a
/// header saying what overrides it.
fn vendor_entry(kind: &str, rendered: &str) -> String {
    let mut text = format!(
        "# Citadel's {kind} entry for its default paths, shipped by the citadel package.\n\
         # `citadel-systemd install` renders /usr/local/lib/{kind}/citadel.conf from the\n\
         # operator's config, which systemd reads instead of this file.\n"
    );
    for line in rendered.lines().filter(|l| !l.starts_with('#')) {
        text.push_str(line);
        text.push('\n');
    }
    text
}

fn control(version: &str, arch: &str, depends: &str, installed_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}, systemd (>= 247), iproute2\n\
         Recommends: curl\n\
         Section: admin\n\
         Priority: optional\n\
         Description: hardened systemd services for an LLM inference stack\n \
         Citadel runs LLM inference engines (vLLM, TGI, llama.cpp, Ollama) and an\n \
         OpenAI-compatible API gateway as hardened systemd services, described in\n \
         one file, /opt/citadel/config/citadel.toml.\n \
         .\n \
         citadel-systemd renders the units from that file, installs, starts and\n \
         watches them; upgrades of this package restart the gateway without\n \
         dropping requests and leave the models serving until restarted.\n"
    )
}

fn changelog(version: &str) -> Result<String> {
    let ws = workspace();
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(&ws)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    // The commit's date keeps the package reproducible; a tarball has none.
    let date = git(&["log", "-1", "--format=%aD"]).map_or_else(|| output("date", &["-R"]), Ok)?;
    Ok(format!(
        "{PACKAGE} ({version}) unstable; urgency=medium\n\n  \
         * Built with `cargo xtask deb` from commit {commit}.\n\n \
         -- {MAINTAINER}  {date}\n"
    ))
}

/// `dpkg-shlibdeps` over the binaries: `libc6 (>= ...), libgcc-s1 (>= ...)`.
fn shlib_depends(stage: &Path, bin_dir: &Path) -> Result<String> {
    // dpkg-shlibdeps wants a source package's debian/control around it.
    let dir = PathBuf::from(format!("{}.shlibdeps", stage.display()));
    mkdir(&dir.join("debian"))?;
    write(
        &dir.join("debian/control"),
        &format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n"),
        0o644,
    )?;
    let mut cmd = Command::new("dpkg-shlibdeps");
    cmd.current_dir(&dir).args(["-O", "--warnings=0"]);
    for b in CITADEL_BINS {
        cmd.arg(format!("-e{}", bin_dir.join(b).display()));
    }
    let out = cmd.output().context("running dpkg-shlibdeps")?;
    fs::remove_dir_all(&dir)?;
    if !out.status.success() {
        bail!(
            "dpkg-shlibdeps failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_owned)
        .context("dpkg-shlibdeps printed no shlibs:Depends")
}

fn installed_kib(stage: &Path) -> Result<u64> {
    let mut total = 0;
    for f in files_below(stage)? {
        if !f.starts_with(stage.join("DEBIAN")) {
            total += fs::symlink_metadata(&f)?.len().div_ceil(1024);
        }
    }
    Ok(total)
}

fn md5sums(stage: &Path) -> Result<String> {
    let mut lines = Vec::new();
    for f in files_below(stage)? {
        let rel = f.strip_prefix(stage)?;
        if rel.starts_with("DEBIAN") || fs::symlink_metadata(&f)?.file_type().is_symlink() {
            continue;
        }
        let sum = output("md5sum", &[&f.display().to_string()])?;
        let sum = sum.split_whitespace().next().unwrap_or_default().to_owned();
        lines.push(format!("{sum}  {}\n", rel.display()));
    }
    lines.sort();
    Ok(lines.concat())
}

/// Every file and link below `dir` (not directories).
fn files_below(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d)? {
            let path = entry?.path();
            if fs::symlink_metadata(&path)?.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    Ok(out)
}

fn gzip_into(bytes: &[u8], dest: &Path) -> Result<()> {
    use std::io::Write as _;
    if let Some(parent) = dest.parent() {
        mkdir(parent)?;
    }
    // -n: no name or timestamp inside (lintian: package-contains-timestamped-gzip).
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running gzip")?;
    child
        .stdin
        .take()
        .context("gzip's stdin")?
        .write_all(bytes)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("gzip failed: {}", out.status);
    }
    write_bytes(dest, &out.stdout, 0o644)
}

fn mkdir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Every directory of the tree 0755, whatever the umask was.
fn fix_dir_modes(dir: &Path) -> Result<()> {
    mode(dir, 0o755)?;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if fs::symlink_metadata(&path)?.is_dir() {
            fix_dir_modes(&path)?;
        }
    }
    Ok(())
}

fn mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn write(dest: &Path, text: &str, m: u32) -> Result<()> {
    write_bytes(dest, text.as_bytes(), m)
}

fn write_bytes(dest: &Path, bytes: &[u8], m: u32) -> Result<()> {
    if let Some(parent) = dest.parent() {
        mkdir(parent)?;
    }
    fs::write(dest, bytes).with_context(|| format!("writing {}", dest.display()))?;
    mode(dest, m)
}

fn copy(from: &Path, to: &Path, m: u32) -> Result<()> {
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write_bytes(to, &bytes, m)
}

fn tool_exists(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run_tool(cmd: &mut Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed: {status}");
    }
    Ok(())
}

fn output(tool: &str, args: &[&str]) -> Result<String> {
    Ok(
        String::from_utf8_lossy(&output_bytes(Path::new(tool), args)?)
            .trim()
            .to_owned(),
    )
}

fn output_bytes(tool: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .with_context(|| format!("running {}", tool.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed: {}\n{}",
            tool.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue13_deb_versions_are_checked() {
        for ok in ["0.1.0", "0.1.0+e2e1", "1.2~rc1", "0.1.0-1"] {
            check_version(ok).unwrap();
        }
        for bad in ["", "v0.1", "0.1 0", "0.1/0", "1:0.1"] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn issue13_control_and_changelog_are_what_dpkg_reads() {
        let c = control("0.1.0+e2e1", "amd64", "libc6 (>= 2.34)", 42);
        assert!(c.contains("\nVersion: 0.1.0+e2e1\n"));
        assert!(c.contains("\nDepends: libc6 (>= 2.34), systemd"));
        // Every continuation line of the description starts with a space.
        let desc = c.split_once("Description:").unwrap().1;
        assert!(desc.lines().skip(1).all(|l| l.starts_with(' ')), "{desc}");
        let log = changelog("0.1.0").unwrap();
        assert!(log.starts_with("citadel (0.1.0) unstable; urgency=medium\n\n  * "));
        assert!(log.contains("\n -- Citadel maintainers <"));
    }

    #[test]
    fn issue13_vendor_entries_keep_the_rendered_lines_only() {
        let e = vendor_entry(
            "sysusers.d",
            "# Generated by citadel-systemd from x\ng citadel -\n",
        );
        assert!(e.ends_with("\ng citadel -\n"));
        assert!(!e.contains("Generated by"));
    }
}
