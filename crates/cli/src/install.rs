//! `install` and `uninstall`: files into place, users and directories, units
//! enabled. Idempotent: a re-run shows and applies only the difference, and
//! never touches a file Citadel did not generate (an operator's drop-in).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use citadel_config::{unit_names, Engine, Settings};
use citadel_render::{FileKind, Rendered};

use crate::commands::rooted;
use crate::fsutil::{self, Changes};
use crate::owned;
use crate::systemd::{ensure_booted, Systemd};

/// Citadel's binaries, installed into `/opt/citadel/bin`.
const BINARIES: &[&str] = &[
    "citadel-systemd",
    "citadel-model",
    "citadel-gateway",
    "citadel-engine-sim",
];

pub struct Plan {
    /// Text files: (target path, contents, mode).
    files: Vec<(PathBuf, String, u32)>,
    changes: Changes,
    /// Binaries: (source, target).
    binaries: Vec<(PathBuf, PathBuf)>,
    binaries_changed: Vec<PathBuf>,
    /// Units whose files were added, changed or removed.
    units_changed: bool,
    /// Instances of models no longer configured (to stop and disable).
    removed_units: Vec<String>,
    /// Where the rendered copies are kept (`/opt/citadel/config/systemd`).
    render_dir: PathBuf,
    /// The units to enable: only those new to this install ([`units_to_enable`]).
    enable: Vec<String>,
    /// The units whose enablement is left as the operator set it.
    enable_kept: Vec<String>,
}

/// Where the modules-load.d file goes (issue 10, item 5), relative to `/`.
fn modules_load_dir(root: &Path) -> PathBuf {
    rooted(root, Path::new("/usr/local/lib/modules-load.d"))
}

/// Issue 10, item 2: `install` enabled every unit on every run, so a
/// reinstall undid `citadel-systemd disable MODEL`. It enables a unit only
/// when the unit is new to this install: a first install (no record), a
/// model added to the config since the last install, or one whose files are
/// gone (after `uninstall`, which disables everything). A unit is not new
/// when the install record lists one of its files (the unit file or its
/// drop-in, in the vendor layer or, before issue 10, in /etc) and that file
/// is still there: its enablement is the operator's, and is left alone.
/// Returns (to enable, kept as they are).
pub fn units_to_enable(
    root: &Path,
    enable: &[String],
    previous: Option<&owned::Manifest>,
) -> (Vec<String>, Vec<String>) {
    let Some(m) = previous else {
        return (enable.to_vec(), Vec::new());
    };
    let layers = [
        Path::new(citadel_render::VENDOR_UNIT_DIR),
        Path::new(citadel_render::ADMIN_UNIT_DIR),
    ];
    let installed = |unit: &str| {
        let drop_in_dir = format!("{unit}.d");
        m.files.iter().any(|f| {
            let Some(dir) = f.parent() else {
                return false;
            };
            let own_file = layers.contains(&dir) && f.file_name().is_some_and(|n| n == unit);
            let drop_in = dir.file_name().is_some_and(|n| *n == *drop_in_dir)
                && dir.parent().is_some_and(|d| layers.contains(&d));
            (own_file || drop_in) && rooted(root, f).is_file()
        })
    };
    enable.iter().cloned().partition(|u| !installed(u))
}

/// Where Citadel's units and drop-ins go: the vendor layer (issue 10, item 3).
fn unit_dir(root: &Path) -> PathBuf {
    rooted(root, Path::new(citadel_render::VENDOR_UNIT_DIR))
}

/// The administrator's layer: enablement symlinks (systemd's) and operators'
/// drop-ins. Citadel versions before issue 10 installed their files here.
fn admin_unit_dir(root: &Path) -> PathBuf {
    rooted(root, Path::new(citadel_render::ADMIN_UNIT_DIR))
}

/// Citadel's own files left where versions before issue 10 installed them
/// (`/etc/systemd/system`, `/etc/sysusers.d`, `/etc/tmpfiles.d`), to remove
/// when installing into the vendor layer. A file there is Citadel's only if it
/// starts with `GENERATED_MARK` and, when there is an install record, the
/// record lists it: a copy an operator made with `systemctl edit --full`
/// starts with Citadel's header too, and is theirs.
pub fn legacy_files(root: &Path, previous: Option<&owned::Manifest>) -> Vec<PathBuf> {
    let logical = |p: &Path| Path::new("/").join(p.strip_prefix(root).unwrap_or(p));
    let mut found = fsutil::generated_files(&admin_unit_dir(root), 1);
    for f in [
        "/etc/sysusers.d/citadel.conf",
        "/etc/tmpfiles.d/citadel.conf",
    ] {
        let p = rooted(root, Path::new(f));
        if fsutil::is_generated(&p) {
            found.push(p);
        }
    }
    found.retain(|p| previous.is_none_or(|m| m.files.contains(&logical(p))));
    found
}

/// Works out what `install` would change under `root`.
pub fn plan(
    root: &Path,
    config: &Path,
    settings: &Settings,
    rendered: &Rendered,
    bin_dir: &Path,
    previous: Option<&owned::Manifest>,
) -> Result<Plan> {
    let config_target = rooted(root, &settings.paths.config_dir().join("citadel.toml"));
    let render_dir = rooted(root, &settings.paths.systemd_dir());
    let mut files = Vec::new();
    if fs::canonicalize(config).ok() != fs::canonicalize(&config_target).ok() {
        let text = fs::read_to_string(config)
            .with_context(|| format!("cannot read {}", config.display()))?;
        files.push((config_target.clone(), text, 0o644));
    }
    for f in &rendered.files {
        files.push((render_dir.join(&f.path), f.contents.clone(), 0o644));
        files.push((f.install_path(root), f.contents.clone(), 0o644));
    }
    let pairs: Vec<(PathBuf, String)> = files
        .iter()
        .map(|(p, c, _)| (p.clone(), c.clone()))
        .collect();
    let mut changes = fsutil::plan(&pairs);
    // The config copy is the operator's file by design: installing it replaces the old copy.
    if let Some(i) = changes.conflicts.iter().position(|p| *p == config_target) {
        changes.changed.push(changes.conflicts.remove(i));
    }
    // An operator's file where a rendered one goes: refuse before writing anything.
    fsutil::refuse_conflicts(&changes)?;
    // Generated files no longer rendered: in the unit directory, our render
    // directory and modules-load.d (no model has GPUs any more).
    for (dir, depth) in [
        (unit_dir(root), 1),
        (render_dir.clone(), 1),
        (modules_load_dir(root), 0),
    ] {
        for stale in fsutil::generated_files(&dir, depth) {
            if !pairs.iter().any(|(p, _)| *p == stale) && !changes.removed.contains(&stale) {
                changes.removed.push(stale);
            }
        }
    }
    // Migration from the old layout: Citadel's files in /etc go (they would
    // shadow the vendor layer and be lost to `systemctl revert`).
    for legacy in legacy_files(root, previous) {
        if !changes.removed.contains(&legacy) {
            changes.removed.push(legacy);
        }
    }
    let (unit_root, admin_root) = (unit_dir(root), admin_unit_dir(root));
    let units_changed = changes
        .added
        .iter()
        .chain(&changes.changed)
        .chain(&changes.removed)
        .any(|p| p.starts_with(&unit_root) || p.starts_with(&admin_root));
    // Instances whose drop-in went and was not rendered again (a migrated
    // drop-in moves to the vendor layer: its model stays): a model removed
    // from the config, or one of its local instances (issue 15).
    let configured: Vec<String> = crate::services::model_units(settings);
    let mut removed_units: Vec<String> = changes
        .removed
        .iter()
        .filter(|p| p.starts_with(&unit_root) || p.starts_with(&admin_root))
        .filter_map(|p| {
            let name = p.parent()?.file_name()?.to_str()?;
            name.strip_suffix(".d")
                .filter(|u| u.starts_with("citadel-model@"))
                .filter(|u| !configured.iter().any(|c| c == u))
                .map(str::to_owned)
        })
        .collect();
    removed_units.sort();
    removed_units.dedup();

    let needs_sim = settings.models.iter().any(
        |m| matches!(&m.engine, Engine::Sim { binary } if binary.starts_with(settings.paths.bin())),
    );
    let mut binaries = Vec::new();
    let mut binaries_changed = Vec::new();
    for name in BINARIES {
        let source = bin_dir.join(name);
        let target = rooted(root, &settings.paths.bin().join(name));
        if !source.is_file() {
            if *name != "citadel-engine-sim" || needs_sim {
                bail!(
                    "{name} was not found in {}; build the workspace or pass --bin-dir DIR",
                    bin_dir.display()
                );
            }
            continue;
        }
        if !same_file_contents(&source, &target) {
            binaries_changed.push(target.clone());
        }
        binaries.push((source, target));
    }
    let (enable, enable_kept) = units_to_enable(root, &rendered.enable, previous);
    Ok(Plan {
        files,
        changes,
        binaries,
        binaries_changed,
        units_changed,
        removed_units,
        render_dir,
        enable,
        enable_kept,
    })
}

impl Plan {
    /// "N units enabled (...)" and the units whose enablement was kept.
    fn enablement_summary(&self) -> String {
        let names = |units: &[String]| {
            units
                .iter()
                .map(|u| crate::services::short_name(u).to_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut text = if self.enable.is_empty() {
            "no new units to enable".to_owned()
        } else {
            format!(
                "{} new units enabled ({})",
                self.enable.len(),
                names(&self.enable)
            )
        };
        if !self.enable_kept.is_empty() {
            text.push_str(&format!(
                "; enablement of {} kept as it was (`citadel-systemd enable/disable` changes it)",
                names(&self.enable_kept)
            ));
        }
        text
    }

    pub fn print(&self) -> std::io::Result<()> {
        // The copies kept in the render directory mirror the installed files:
        // list the installed ones, count the copies.
        let mut copies = 0;
        let mut show = |verb: &str, paths: &[PathBuf]| {
            for p in paths {
                if p.starts_with(&self.render_dir) {
                    copies += 1;
                } else {
                    let _ = outln!("  {verb:<8} {}", p.display());
                }
            }
        };
        show("add", &self.changes.added);
        show("change", &self.changes.changed);
        show("remove", &self.changes.removed);
        show("update", &self.binaries_changed);
        if copies > 0 {
            let noun = if copies == 1 { "copy" } else { "copies" };
            outln!(
                "  (and {copies} rendered {noun} in {})",
                self.render_dir.display()
            )?;
        }
        let n = self.changes.added.len()
            + self.changes.changed.len()
            + self.changes.removed.len()
            + self.binaries_changed.len();
        if n == 0 {
            outln!(
                "  nothing to change ({} files up to date)",
                self.changes.unchanged + self.binaries.len()
            )?;
        }
        Ok(())
    }
}

/// Whether `root` is the running system's root: only then does Citadel talk
/// to systemd; below any other root everything is done offline, with `--root`.
pub fn is_live(root: &Path) -> bool {
    fs::canonicalize(root).is_ok_and(|p| p == Path::new("/"))
}

/// `--root=DIR` for systemd's tools when not operating on the live system.
fn root_flag(root: &Path) -> Option<std::ffi::OsString> {
    (!is_live(root)).then(|| {
        let mut flag = std::ffi::OsString::from("--root=");
        flag.push(root.as_os_str());
        flag
    })
}

pub async fn install(
    root: &Path,
    config: &Path,
    settings: &Settings,
    host: &citadel_render::Host,
    bin_dir: &Path,
    dry_run: bool,
) -> Result<ExitCode> {
    let started = Instant::now();
    let live = is_live(root);
    if !dry_run {
        if live {
            ensure_booted()?;
        }
        if !nix_is_root() {
            bail!("install changes /etc and /opt/citadel: run it as root");
        }
    }
    // Rendered with the GPUs resolved on this host (issue 10, item 5).
    let rendered = citadel_render::render_with(settings, host);
    let previous = owned::Manifest::load(root)?;
    let plan = plan(
        root,
        config,
        settings,
        &rendered,
        bin_dir,
        previous.as_ref(),
    )?;
    // Directories: refuse to take over one Citadel did not create, before anything changes.
    let config_target = rooted(root, &settings.paths.config_dir().join("citadel.toml"));
    let api_keys = rooted(root, &settings.gateway.api_keys_file);
    let ours: std::collections::BTreeSet<PathBuf> = plan
        .files
        .iter()
        .map(|(p, _, _)| p.clone())
        .chain(plan.binaries.iter().map(|(_, t)| t.clone()))
        .chain([config_target.clone(), api_keys.clone()])
        .collect();
    let dirs = owned::plan_dirs(root, settings, previous.as_ref(), &ours);
    if !dirs.refusals.is_empty() {
        bail!("nothing was changed: {}", dirs.refusals.join("\n  "));
    }
    outln!("{}install plan:", if dry_run { "dry run: " } else { "" })?;
    plan.print()?;
    if dry_run {
        return Ok(ExitCode::SUCCESS);
    }

    // Record what Citadel is about to create before creating it.
    let mut manifest = previous.clone().unwrap_or_default();
    manifest.version = 1;
    manifest.created_dirs.extend(dirs.created.iter().cloned());
    manifest
        .preexisting_dirs
        .extend(dirs.preexisting.iter().cloned());
    // The vendor directories this install creates (those it writes into).
    let logical = |p: &Path| Path::new("/").join(p.strip_prefix(root).unwrap_or(p));
    let written: Vec<PathBuf> = plan.files.iter().map(|(p, _, _)| logical(p)).collect();
    manifest.created_dirs.extend(
        owned::missing_vendor_dirs(root)
            .into_iter()
            .filter(|d| written.iter().any(|f| f.starts_with(d))),
    );
    let (user, group) = (&settings.service.user, &settings.service.group);
    if owned::id_of(root, "passwd", user).is_none() {
        manifest.created_user = Some(user.clone());
    }
    if owned::id_of(root, "group", group).is_none() {
        manifest.created_group = Some(group.clone());
    }
    manifest.save(root)?;

    // Users and directories first, so files can be given their owners.
    let sysusers = rendered
        .files
        .iter()
        .find(|f| f.kind == FileKind::Sysusers)
        .context("the renderer always writes a sysusers.d entry")?;
    let tmpfiles = rendered
        .files
        .iter()
        .find(|f| f.kind == FileKind::Tmpfiles)
        .context("the renderer always writes a tmpfiles.d entry")?;
    let flag = root_flag(root);
    // systemd-sysusers locks ROOT/etc/passwd: below an empty --root, /etc
    // exists only once something is written there (the entries live in
    // /usr/local/lib now).
    let etc = rooted(root, Path::new("/etc"));
    fs::create_dir_all(&etc).with_context(|| format!("cannot create {}", etc.display()))?;
    write_if_changed(&sysusers.install_path(root), &sysusers.contents)?;
    let mut args: Vec<&std::ffi::OsStr> = flag.iter().map(|f| f.as_os_str()).collect();
    let sysusers_path = sysusers.install_path(root);
    args.push(sysusers_path.as_os_str());
    run_tool("systemd-sysusers", &args)?;
    write_if_changed(&tmpfiles.install_path(root), &tmpfiles.contents)?;
    let mut args: Vec<&std::ffi::OsStr> = flag.iter().map(|f| f.as_os_str()).collect();
    let tmpfiles_path = tmpfiles.install_path(root);
    args.push("--create".as_ref());
    args.push(tmpfiles_path.as_os_str());
    run_tool("systemd-tmpfiles", &args)?;

    for (source, target) in &plan.binaries {
        if plan.binaries_changed.contains(target) {
            let bytes =
                fs::read(source).with_context(|| format!("cannot read {}", source.display()))?;
            fsutil::write_atomic(target, &bytes, 0o755)?;
        }
    }
    let pairs: Vec<(PathBuf, String)> = plan
        .files
        .iter()
        .map(|(p, c, _)| (p.clone(), c.clone()))
        .collect();
    fsutil::apply(&pairs, &plan.changes)?;
    repoint_links(root, &plan.changes.removed)?;
    // World-readable (issue 10, item 6): the config holds no secrets (the config
    // crate refuses them in `env`; keys are credentials), and `status` and
    // `health` read it as a non-root monitoring user. Only root may change it.
    fs::set_permissions(
        &config_target,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    let gid = group_id(root, &settings.service.group).with_context(|| {
        format!(
            "group `{}` does not exist after systemd-sysusers",
            settings.service.group
        )
    })?;
    std::os::unix::fs::chown(&config_target, Some(0), Some(gid)).with_context(|| {
        format!(
            "cannot give {} to group {}",
            config_target.display(),
            settings.service.group
        )
    })?;
    if settings.gateway.auth && ensure_api_key(&api_keys)? {
        manifest.files.insert(logical(&api_keys));
    }
    // What Citadel wrote, for `uninstall --purge`. A binary installed from
    // where it already is (the Debian package puts it in place and its
    // postinst runs `install`) is dpkg's, not Citadel's: purge must not remove it.
    let in_place: std::collections::BTreeSet<&PathBuf> = plan
        .binaries
        .iter()
        .filter(|(source, target)| same_file(source, target))
        .map(|(_, target)| target)
        .collect();
    for p in ours
        .iter()
        .filter(|p| **p != api_keys && !in_place.contains(p))
    {
        manifest.files.insert(logical(p));
    }
    for p in &plan.changes.removed {
        manifest.files.remove(&logical(p));
    }
    manifest.save(root)?;
    let files_done = started.elapsed();

    if !live {
        // Not the running system: enable offline; nothing to reload or stop.
        if !plan.removed_units.is_empty() {
            systemctl_offline(root, "disable", &plan.removed_units)?;
        }
        if !plan.enable.is_empty() {
            systemctl_offline(root, "enable", &plan.enable)?;
        }
        outln!(
            "installed into {} (not the running system): {}; files in {} ms",
            root.display(),
            plan.enablement_summary(),
            files_done.as_millis()
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let systemd = Systemd::connect().await?;
    if !plan.removed_units.is_empty() {
        outln!("stopping removed models: {}", plan.removed_units.join(" "))?;
        systemd
            .run_jobs(
                "stop",
                &plan.removed_units,
                std::time::Duration::from_secs(1),
                |_, _| {},
            )
            .await?;
        systemd.disable(&plan.removed_units).await.ok();
    }
    let reload_started = Instant::now();
    if plan.units_changed {
        systemd.daemon_reload().await?;
    }
    let reload_took = reload_started.elapsed();
    if !plan.enable.is_empty() {
        systemd.enable(&plan.enable).await?;
    }
    outln!(
        "installed: {}; files in {} ms, daemon-reload {} ms",
        plan.enablement_summary(),
        files_done.as_millis(),
        reload_took.as_millis()
    )?;
    if plan.units_changed {
        outln!("changed units take effect when restarted: `citadel-systemd restart [SERVICE...]`")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// After a migration, the enablement symlinks systemd made in
/// `/etc/systemd/system/*.wants/` (and `.requires/`) still point at the unit
/// files removed from /etc: each is pointed at the same file in the vendor
/// layer (atomically: a new link renamed over the old one), so what was
/// enabled stays enabled and what was disabled stays disabled. (Re-enabling
/// does not fix them: systemd takes a link to the same file name in another
/// unit directory as already in place.)
fn repoint_links(root: &Path, removed: &[PathBuf]) -> Result<()> {
    let admin = admin_unit_dir(root);
    let vendor = Path::new(citadel_render::VENDOR_UNIT_DIR);
    let removed: Vec<PathBuf> = removed
        .iter()
        .filter(|p| p.starts_with(&admin))
        .map(|p| Path::new("/").join(p.strip_prefix(root).unwrap_or(p)))
        .collect();
    if removed.is_empty() {
        return Ok(());
    }
    let Ok(dirs) = fs::read_dir(&admin) else {
        return Ok(());
    };
    for dir in dirs.flatten() {
        let name = dir.file_name();
        let name = name.to_string_lossy();
        if !(name.ends_with(".wants") || name.ends_with(".requires")) {
            continue;
        }
        for link in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
            let Ok(target) = fs::read_link(link.path()) else {
                continue;
            };
            let Some(file) = target.file_name() else {
                continue;
            };
            let new_target = vendor.join(file);
            if !removed.contains(&target) || !rooted(root, &new_target).is_file() {
                continue;
            }
            let tmp = dir
                .path()
                .join(format!(".citadel-{}", link.file_name().to_string_lossy()));
            let _ = fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&new_target, &tmp)
                .and_then(|()| fs::rename(&tmp, link.path()))
                .with_context(|| {
                    format!(
                        "cannot point {} at {}",
                        link.path().display(),
                        new_target.display()
                    )
                })?;
        }
    }
    Ok(())
}

/// `systemctl --root=DIR VERB UNITS`: unit files enabled or disabled offline.
fn systemctl_offline(root: &Path, verb: &str, units: &[String]) -> Result<()> {
    let flag = root_flag(root).context("offline systemctl needs a root")?;
    let mut args: Vec<&std::ffi::OsStr> = vec![flag.as_os_str(), "--quiet".as_ref(), verb.as_ref()];
    args.extend(units.iter().map(|u| std::ffi::OsStr::new(u.as_str())));
    run_tool("systemctl", &args)
}

pub async fn uninstall(root: &Path, settings: Option<&Settings>, purge: bool) -> Result<ExitCode> {
    let live = is_live(root);
    if live {
        ensure_booted()?;
    }
    if purge && !nix_is_root() {
        bail!("uninstall --purge removes users and files owned by root: run it as root");
    }
    let manifest = owned::Manifest::load(root)?;
    let units_dir = unit_dir(root);
    // Every unit of ours that is enabled or configured, whatever the config says now.
    let mut units: Vec<String> =
        fs::read_dir(admin_unit_dir(root).join(format!("{}.wants", unit_names::TARGET)))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
    if let Some(s) = settings {
        units.extend(crate::services::model_units(s));
    }
    units.push(unit_names::GATEWAY.to_owned());
    units.push(unit_names::GATEWAY_SOCKET.to_owned());
    units.push(unit_names::GATEWAY_ADMIN_SOCKET.to_owned());
    units.sort();
    units.dedup();
    let mut disable = units.clone();
    disable.push(unit_names::TARGET.to_owned());
    let systemd = if live {
        let systemd = Systemd::connect().await?;
        let mut stop = vec![unit_names::TARGET.to_owned()];
        stop.extend(units.iter().cloned());
        systemd
            .run_jobs("stop", &stop, std::time::Duration::from_secs(1), |_, _| {})
            .await?;
        systemd.disable(&disable).await.ok();
        Some(systemd)
    } else {
        // Not the running system: nothing runs there; disable offline.
        let _ = systemctl_offline(root, "disable", &disable);
        None
    };
    // Ours in the vendor layer, and any left in /etc by an old-layout install.
    let mut generated = fsutil::generated_files(&units_dir, 1);
    let admin = admin_unit_dir(root);
    generated.extend(
        legacy_files(root, manifest.as_ref())
            .into_iter()
            .filter(|p| p.starts_with(&admin)),
    );
    let changes = Changes {
        removed: generated.clone(),
        ..Changes::default()
    };
    fsutil::apply(&[], &changes)?;
    for path in &generated {
        outln!("  removed  {}", path.display())?;
    }
    // The NVIDIA modules-load.d entry serves the model units only: it goes
    // with them (an operator's file of that name is kept).
    for p in fsutil::generated_files(&modules_load_dir(root), 0) {
        if fs::remove_file(&p).is_ok() {
            outln!("  removed  {}", p.display())?;
        }
    }
    for f in [
        "/usr/local/lib/sysusers.d/citadel.conf",
        "/usr/local/lib/tmpfiles.d/citadel.conf",
        "/etc/sysusers.d/citadel.conf",
        "/etc/tmpfiles.d/citadel.conf",
    ] {
        let p = rooted(root, Path::new(f));
        if !fsutil::is_generated(&p) || !purge {
            // Kept: the user and directories stay until --purge; an operator's file always.
            continue;
        }
        if fs::remove_file(&p).is_ok() {
            outln!("  removed  {}", p.display())?;
        }
    }
    if let Some(systemd) = &systemd {
        systemd.daemon_reload().await?;
        for u in &units {
            systemd.reset_failed(u).await;
        }
    }
    if purge {
        owned::purge(root, settings, manifest.as_ref())?;
        let _ = fs::remove_dir(rooted(root, Path::new("/etc/citadel")));
        // The user and group, when Citadel created them, in the same root.
        let root_args: Vec<std::ffi::OsString> = if live {
            Vec::new()
        } else {
            vec!["--root".into(), root.as_os_str().to_owned()]
        };
        if let Some(user) = manifest.as_ref().and_then(|m| m.created_user.as_ref()) {
            if owned::id_of(root, "passwd", user).is_some() {
                let _ = Command::new("userdel").args(&root_args).arg(user).status();
            }
        }
        if let Some(group) = manifest.as_ref().and_then(|m| m.created_group.as_ref()) {
            // userdel may have removed a group named like the user already.
            if owned::id_of(root, "group", group).is_some() {
                let _ = Command::new("groupdel")
                    .args(&root_args)
                    .arg(group)
                    .status();
            }
        }
        if manifest.is_some() {
            owned::Manifest::remove(root);
        }
        outln!("uninstalled and purged (the journal keeps past logs until it rotates them)")?;
    } else {
        outln!("uninstalled; kept config, models, credentials, state and binaries (use --purge to remove them)")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn write_if_changed(path: &Path, contents: &str) -> Result<()> {
    if fs::read_to_string(path).ok().as_deref() != Some(contents) {
        fsutil::write_atomic(path, contents.as_bytes(), 0o644)?;
    }
    Ok(())
}

fn run_tool(tool: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether `a` and `b` are the same file (same device and inode).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn same_file_contents(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(ma), Ok(mb)) if ma.len() == mb.len() => fs::read(a).ok() == fs::read(b).ok(),
        _ => false,
    }
}

fn group_id(root: &Path, group: &str) -> Option<u32> {
    let text = fs::read_to_string(rooted(root, Path::new("/etc/group"))).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == group).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

fn nix_is_root() -> bool {
    // /proc/self/status "Uid:" real effective saved fs
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Creates the API keys file with one random key when it does not exist yet
/// (true when it did).
fn ensure_api_key(path: &Path) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    let mut bytes = [0u8; 24];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let key: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let text = format!("# Citadel API keys, one per line. Generated by citadel-systemd install.\nsk-citadel-{key}\n");
    fsutil::write_atomic(path, text.as_bytes(), 0o600)?;
    outln!(
        "generated an API key in {} (root-only; the gateway reads it as a credential)",
        path.display()
    )?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODELS: &str =
        "[models.a]\nport = 11400\nengine = \"sim\"\n[models.b]\nport = 11401\nengine = \"sim\"\n";

    fn settings(toml: &str) -> Settings {
        citadel_config::parse(toml, Path::new("c.toml"))
            .unwrap()
            .settings
    }

    fn put(root: &Path, path: &str, text: &str) {
        let p = rooted(root, Path::new(path));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    fn record(files: &[&str]) -> owned::Manifest {
        owned::Manifest {
            version: 1,
            files: files.iter().map(PathBuf::from).collect(),
            ..owned::Manifest::default()
        }
    }

    /// Issue 10, item 2: a reinstall re-enabled every model, undoing
    /// `disable`. Only units new to this install are enabled: all of them on
    /// a first install; then only a model added since, or one whose files
    /// are gone (after `uninstall`); an installed unit's enablement is kept.
    #[test]
    fn issue10_install_enables_only_new_units() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let s = settings(MODELS);
        let enable = citadel_render::render(&s).enable;
        let (on, kept) = units_to_enable(root, &enable, None);
        assert_eq!(on, enable, "a first install enables everything");
        assert!(kept.is_empty());

        let vendor = citadel_render::VENDOR_UNIT_DIR;
        // Installed before: every unit but model b (its drop-in is new); the
        // render directory's copy of b's drop-in is not an installed unit.
        let b = "citadel-model@b.service";
        let mut files: Vec<String> = enable
            .iter()
            .filter(|u| *u != b)
            .map(|u| {
                if u.starts_with("citadel-model@") {
                    format!("{vendor}/{u}.d/50-citadel.conf")
                } else {
                    format!("{vendor}/{u}")
                }
            })
            .collect();
        files.push(format!("{vendor}/citadel-model@.service"));
        files.push(format!("/opt/citadel/config/systemd/{b}.d/50-citadel.conf"));
        for f in &files {
            put(root, f, "# Generated by citadel-systemd\n");
        }
        let m = record(&files.iter().map(String::as_str).collect::<Vec<_>>());
        let (on, kept) = units_to_enable(root, &enable, Some(&m));
        assert_eq!(on, [b], "b is new to this install");
        let others: Vec<&String> = enable.iter().filter(|u| *u != b).collect();
        assert_eq!(kept.iter().collect::<Vec<_>>(), others);
        assert!(kept.contains(&"citadel.target".to_owned()), "{kept:?}");
        assert!(
            kept.contains(&"citadel-model@a.service".to_owned()),
            "{kept:?}"
        );

        // After `uninstall` the record still lists the files, but they are gone.
        fs::remove_file(rooted(
            root,
            Path::new(&format!(
                "{vendor}/citadel-model@a.service.d/50-citadel.conf"
            )),
        ))
        .unwrap();
        let (on, _) = units_to_enable(root, &enable, Some(&m));
        assert!(on.contains(&"citadel-model@a.service".to_owned()), "{on:?}");

        // The old layout (before issue 10) counts as installed: a migration
        // keeps the operator's enablement.
        let legacy = format!(
            "{}/citadel-model@a.service.d/50-citadel.conf",
            citadel_render::ADMIN_UNIT_DIR
        );
        put(root, &legacy, "# Generated by citadel-systemd\n");
        let (on, _) = units_to_enable(root, &enable, Some(&record(&[&legacy])));
        assert!(
            !on.contains(&"citadel-model@a.service".to_owned()),
            "{on:?}"
        );
    }

    /// A bin directory holding (empty) binaries, for [`plan`].
    fn bin_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for b in BINARIES {
            fs::write(d.path().join(b), "").unwrap();
        }
        d
    }

    /// Issue 10, items 3 and 5: the modules-load.d file a GPU config
    /// installed was never removed: `plan` now treats it as stale once no
    /// model has GPUs; an operator's file of the same name is not touched.
    #[test]
    fn issue10_modules_load_file_is_stale_without_gpus() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let bins = bin_dir();
        let config = root.join("citadel.toml");
        fs::write(&config, MODELS).unwrap();
        let target = modules_load_dir(root).join("citadel-nvidia.conf");
        let gpu = settings(&format!("{MODELS}gpus = [0]\n"));
        let rendered = citadel_render::render(&gpu);
        let file = rendered
            .file(citadel_render::MODULES_LOAD_FILE)
            .expect("a GPU config renders the modules-load file");
        put(
            root,
            "/usr/local/lib/modules-load.d/citadel-nvidia.conf",
            &file.contents,
        );

        // Still rendered: not stale.
        let p = plan(root, &config, &gpu, &rendered, bins.path(), None).unwrap();
        assert!(!p.changes.removed.contains(&target), "{:?}", p.changes);

        // No GPUs any more: removed.
        let s = settings(MODELS);
        let rendered = citadel_render::render(&s);
        let p = plan(root, &config, &s, &rendered, bins.path(), None).unwrap();
        assert!(p.changes.removed.contains(&target), "{:?}", p.changes);

        // An operator's file of that name stays.
        fs::write(&target, "nvidia\n").unwrap();
        let p = plan(root, &config, &s, &rendered, bins.path(), None).unwrap();
        assert!(!p.changes.removed.contains(&target), "{:?}", p.changes);
    }
}
