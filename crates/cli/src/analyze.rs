//! Offline checks of rendered units with systemd's own tools:
//! `systemd-analyze verify` (syntax, unknown keys, missing binaries) and
//! `systemd-analyze security --offline=true` (exposure score per unit).
//!
//! Both run against a throw-away root holding the rendered units, the host's
//! unit directory (for the units ours depend on) and the binaries the units run.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use citadel_config::Settings;
use citadel_render::{FileKind, Rendered};

/// Highest acceptable `systemd-analyze security` exposure per unit.
pub fn exposure_target(unit: &str) -> f64 {
    if unit == citadel_config::unit_names::GATEWAY {
        2.0
    } else {
        3.0
    }
}

#[derive(Debug)]
pub struct Exposure {
    pub unit: String,
    pub score: f64,
    pub target: f64,
}

#[derive(Debug)]
pub struct Analysis {
    /// `systemd-analyze verify` exit status was 0 and it printed nothing.
    pub verify_ok: bool,
    /// What verify printed (it exits 0 on unknown keys, so this matters too).
    pub verify_output: String,
    pub exposures: Vec<Exposure>,
}

impl Analysis {
    pub fn ok(&self) -> bool {
        self.verify_ok && self.exposures.iter().all(|e| e.score <= e.target)
    }
}

/// Builds the scratch root and runs both checks.
pub fn analyze(settings: &Settings, rendered: &Rendered, bin_dir: &Path) -> Result<Analysis> {
    let tool = which("systemd-analyze").context(
        "systemd-analyze was not found; install systemd (Debian/Ubuntu: `apt-get install systemd`)",
    )?;
    let root = tempfile::Builder::new()
        .prefix("citadel-validate-")
        .tempdir()
        .context("cannot create a scratch directory")?;
    populate_root(root.path(), settings, rendered, bin_dir)?;
    let root_arg = format!("--root={}", root.path().display());

    let mut verify_units: Vec<String> = rendered.verify.clone();
    verify_units.push(citadel_render::FAILURE_UNIT.replace("@.", "@citadel-gateway."));
    let out = Command::new(&tool)
        .arg("verify")
        .arg(&root_arg)
        .args(verify_units.iter().map(|u| verify_arg(root.path(), u)))
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .context("cannot run systemd-analyze verify")?;
    let mut verify_output = String::from_utf8_lossy(&out.stderr).into_owned();
    verify_output.push_str(&String::from_utf8_lossy(&out.stdout));
    let root_prefix = root.path().display().to_string();
    let verify_output = verify_output.replace(&root_prefix, "");
    let verify_ok = out.status.success() && verify_output.trim().is_empty();

    let mut exposures = Vec::new();
    // citadel-netns.service runs only `ip netns` as root (it must mount in the
    // host's mount namespace); the exposure targets are for Citadel's services.
    for unit in rendered
        .verify
        .iter()
        .filter(|u| u.ends_with(".service") && *u != citadel_config::unit_names::NETNS)
    {
        let out = Command::new(&tool)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&root_arg)
            .arg(unit)
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .context("cannot run systemd-analyze security")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let score = parse_exposure(&text).with_context(|| {
            format!(
                "systemd-analyze security printed no exposure level for {unit}:\n{}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        exposures.push(Exposure {
            unit: unit.clone(),
            score,
            target: exposure_target(unit),
        });
    }
    Ok(Analysis {
        verify_ok,
        verify_output,
        exposures,
    })
}

/// How `systemd-analyze verify` is told to check `unit`. It reads an argument
/// `FILE:ALIAS` as "FILE, loaded under the name ALIAS" (systemd 252,
/// `process_aliases()`), so an instance with `:` in its name
/// (`citadel-model@phi3:2.service`, issue 15) would be read as the file
/// `citadel-model@phi3` and fail. Such an instance is given as its template's
/// file in the scratch root, loaded under the instance's name: `%i` is the
/// instance, and its drop-ins come from the root as for any other unit.
fn verify_arg(root: &Path, unit: &str) -> String {
    let Some((prefix, rest)) = unit.split_once('@').filter(|_| unit.contains(':')) else {
        return unit.to_owned();
    };
    let kind = rest.rsplit_once('.').map_or("service", |(_, k)| k);
    let template = root
        .join(&citadel_render::VENDOR_UNIT_DIR[1..])
        .join(format!("{prefix}@.{kind}"));
    format!("{}:{unit}", template.display())
}

fn parse_exposure(text: &str) -> Option<f64> {
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let after = line.rsplit_once(": ")?.1;
    after.split_whitespace().next()?.parse().ok()
}

fn populate_root(
    root: &Path,
    settings: &Settings,
    rendered: &Rendered,
    bin_dir: &Path,
) -> Result<()> {
    for f in &rendered.files {
        let path = f.install_path(root);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&path, &f.contents)?;
    }
    // The units ours refer to (network.target, multi-user.target, ...).
    let host_units = Path::new("/usr/lib/systemd/system");
    let dest = root.join("usr/lib/systemd/system");
    fs::create_dir_all(&dest)?;
    for e in
        fs::read_dir(host_units).with_context(|| format!("cannot read {}", host_units.display()))?
    {
        let e = e?;
        if e.file_type()?.is_file() {
            fs::copy(e.path(), dest.join(e.file_name()))?;
        }
    }
    // The programs the units run: Citadel's from `bin_dir`, others from the host.
    let ours = settings.paths.bin();
    for program in exec_programs(rendered) {
        let target = root.join(program.strip_prefix("/").unwrap_or(&program));
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        let source = match program.strip_prefix(&ours) {
            Ok(name) => bin_dir.join(name),
            Err(_) => program.clone(),
        };
        if !source.exists() {
            if program.starts_with(&ours) {
                bail!(
                    "{} was not found in {}; build it (`cargo build --workspace`) or pass --bin-dir DIR",
                    source.file_name().unwrap_or_default().to_string_lossy(),
                    bin_dir.display()
                );
            }
            continue; // verify will report the missing program
        }
        fs::copy(&source, &target).with_context(|| format!("cannot copy {}", source.display()))?;
    }
    Ok(())
}

/// Absolute programs named by Exec*= lines of the rendered units.
fn exec_programs(rendered: &Rendered) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = rendered
        .files
        .iter()
        .filter(|f| matches!(f.kind, FileKind::Unit | FileKind::DropIn))
        .flat_map(|f| f.contents.lines())
        .filter(|l| l.starts_with("Exec") && l.contains('='))
        .filter_map(|l| {
            l.split_once('=')?
                .1
                .split_whitespace()
                .next()
                .map(|w| w.trim_start_matches(['-', '@', '+', '!', ':']))
        })
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect();
    out.sort();
    out.dedup();
    out
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposure_line_is_parsed() {
        let text =
            "✗ UMask= ...\n\n→ Overall exposure level for citadel-gateway.service: 1.2 OK 🙂\n";
        assert_eq!(parse_exposure(text), Some(1.2));
        assert_eq!(parse_exposure("nothing"), None);
    }

    /// Issue 15: `verify` reads `a:b` as file `a` loaded as `b`; an instance
    /// name with `:` is given as its template's file under the instance's name.
    #[test]
    fn issue15_instance_with_colon_is_verified_through_its_template() {
        let root = Path::new("/tmp/citadel-validate-x");
        assert_eq!(
            verify_arg(root, "citadel-model@phi3.service"),
            "citadel-model@phi3.service"
        );
        assert_eq!(verify_arg(root, "citadel.target"), "citadel.target");
        assert_eq!(
            verify_arg(root, "citadel-model@phi3:2.service"),
            "/tmp/citadel-validate-x/usr/local/lib/systemd/system/citadel-model@.service:citadel-model@phi3:2.service"
        );
    }

    /// Issue 15: systemd 252 accepts the instance units (`:` in the instance
    /// name, the drop-in's reset and own `CacheDirectory=`/`StateDirectory=`,
    /// `LogExtraFields=CITADEL_INSTANCE=`) with nothing on stderr, and scores
    /// them like the model's first instance. Stand-in binaries: verify only
    /// needs the programs to exist.
    #[test]
    fn issue15_validate_checks_instance_units() {
        if which("systemd-analyze").is_none() {
            eprintln!("systemd-analyze not installed: skipped");
            return;
        }
        let text = "[gateway]\nauth = false\n\n[models.phi3]\nport = 11403\nengine = \"sim\"\nmemory_max = \"2G\"\n\n[[models.phi3.instances]]\nport = 11404\n";
        let settings = citadel_config::parse(text, Path::new("/opt/citadel/config/citadel.toml"))
            .map(|l| l.settings)
            .map_err(|e| e.to_string())
            .unwrap();
        let rendered = citadel_render::render(&settings);
        let bins = tempfile::tempdir().unwrap();
        for name in ["citadel-model", "citadel-gateway", "citadel-systemd"] {
            fs::copy("/bin/true", bins.path().join(name)).unwrap();
        }
        let a = analyze(&settings, &rendered, bins.path()).unwrap();
        assert!(a.verify_ok, "verify said:\n{}", a.verify_output);
        let score = |unit: &str| {
            a.exposures
                .iter()
                .find(|e| e.unit == unit)
                .map(|e| e.score)
                .unwrap_or_else(|| panic!("{unit} not scored: {:?}", a.exposures))
        };
        assert_eq!(
            score("citadel-model@phi3:2.service"),
            score("citadel-model@phi3.service")
        );
        assert!(a.ok(), "{a:?}");

        // A broken instance drop-in is found (verify looks at it at all).
        let mut broken = rendered.clone();
        for f in &mut broken.files {
            if f.path
                .to_string_lossy()
                .starts_with("citadel-model@phi3:2.service.d/")
            {
                f.contents.push_str("NoSuchDirective=1\n");
            }
        }
        let a = analyze(&settings, &broken, bins.path()).unwrap();
        assert!(!a.verify_ok);
        assert!(
            a.verify_output.contains("NoSuchDirective"),
            "{}",
            a.verify_output
        );
    }
}
