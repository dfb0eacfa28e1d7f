//! What Citadel owns on a host. `install` records, in a manifest, the
//! directories it created and the files it wrote; `uninstall --purge` removes
//! exactly that and nothing an operator put there (issue 9, items 10 and 13:
//! purge deleted model weights, a venv, all of `home = "/srv"` and
//! `credentials = "/etc/ssl"`, and install chmodded `/etc/ssl` to 0700).
//!
//! Rules:
//! - A directory of the tmpfiles.d entry that does not exist yet is created by
//!   Citadel and recorded as its own. One that exists is Citadel's only if the
//!   manifest says so, or if it holds nothing but Citadel's own entries (the
//!   `mkdir -p /opt/citadel/config` an operator does to write the config).
//! - Any other existing directory is "pre-existing": used as it is when its
//!   mode and owner are already exactly what the tmpfiles.d line sets, never
//!   purged, and never chmodded: when they differ, `install` refuses before
//!   changing anything.
//! - Purge removes the files the manifest lists, removes the state and cache
//!   directories Citadel created with their contents (they hold only what its
//!   services wrote), and removes every other directory it created only once
//!   empty: model weights, a venv under the home or any unknown file keep
//!   their directory, and purge says what it kept and why.
//!
//! - Generated files live in the vendor layer (`/usr/local/lib/...`, issue
//!   10, item 3); files of the old layout in `/etc` that the record lists are
//!   dropped from it when `install` migrates them (an operator's copy made
//!   with `systemctl edit --full` is not in the record and is never touched).
//!   The vendor directories Citadel had to create are recorded like the others.
//!
//! The manifest lives at [`MANIFEST`] (root-only, 0600 in a 0700 directory),
//! outside every directory the services can write, and is written atomically.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use citadel_config::Settings;
use serde::{Deserialize, Serialize};

use crate::commands::rooted;
use crate::fsutil;

/// Where `install` records what it created (below `--root`).
pub const MANIFEST: &str = "/var/lib/citadel-systemd/installed.json";

/// Citadel's record of what it created, paths as on the installed system.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// Directories Citadel created (or adopted while they held only its entries).
    pub created_dirs: BTreeSet<PathBuf>,
    /// Directories that existed before and were used as they were.
    pub preexisting_dirs: BTreeSet<PathBuf>,
    /// Files Citadel wrote.
    pub files: BTreeSet<PathBuf>,
    /// The service user, when Citadel's sysusers.d entry created it.
    pub created_user: Option<String>,
    /// The service group, when Citadel's sysusers.d entry created it.
    pub created_group: Option<String>,
}

impl Manifest {
    pub fn load(root: &Path) -> Result<Option<Manifest>> {
        let path = rooted(root, Path::new(MANIFEST));
        match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .with_context(|| format!("{} is not a Citadel install record", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub fn save(&self, root: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = rooted(root, Path::new(MANIFEST));
        let dir = path.parent().context("the manifest has a directory")?;
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        let text = serde_json::to_string_pretty(self)?;
        fsutil::write_atomic(&path, text.as_bytes(), 0o600)
    }

    /// Removes the record and its directory (the last step of a purge).
    pub fn remove(root: &Path) {
        let path = rooted(root, Path::new(MANIFEST));
        let _ = fs::remove_file(&path);
        if let Some(dir) = path.parent() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// The vendor-layer directories Citadel installs its generated files into
/// (issue 10, item 3; `modules-load.d` only when a model has GPUs), parents
/// first. Those that do not exist yet when `install` runs and that it writes
/// into are recorded as Citadel's ([`missing_vendor_dirs`]), so
/// `uninstall --purge` removes them again once empty; one that existed
/// (another package's units) is never recorded and never removed.
pub const VENDOR_DIRS: &[&str] = &[
    "/usr/local/lib/systemd",
    citadel_render::VENDOR_UNIT_DIR,
    "/usr/local/lib/sysusers.d",
    "/usr/local/lib/tmpfiles.d",
    "/usr/local/lib/modules-load.d",
];

/// The [`VENDOR_DIRS`] that do not exist below `root` (paths as installed).
pub fn missing_vendor_dirs(root: &Path) -> Vec<PathBuf> {
    VENDOR_DIRS
        .iter()
        .map(PathBuf::from)
        .filter(|d| fs::symlink_metadata(rooted(root, d)).is_err())
        .collect()
}

/// What purge does with a directory Citadel created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purge {
    /// State and cache: only Citadel's services write there; removed whole.
    Whole,
    /// Removed once the files Citadel wrote are gone and nothing else is left.
    IfEmpty,
}

/// One directory of Citadel's tmpfiles.d entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dir {
    pub path: PathBuf,
    pub mode: u32,
    pub owner: String,
    pub group: String,
    pub purge: Purge,
}

/// The directories of Citadel's tmpfiles.d entry (the same list, modes and
/// owners `citadel_render` writes there; a test keeps the two in step).
pub fn dirs(settings: &Settings) -> Vec<Dir> {
    let p = &settings.paths;
    let (user, group) = (&settings.service.user, &settings.service.group);
    let dir = |path: PathBuf, mode, owner: &str, group: &str, purge| Dir {
        path,
        mode,
        owner: owner.to_owned(),
        group: group.to_owned(),
        purge,
    };
    vec![
        dir(p.home.clone(), 0o755, "root", "root", Purge::IfEmpty),
        dir(p.bin(), 0o755, "root", "root", Purge::IfEmpty),
        dir(p.config_dir(), 0o755, "root", group, Purge::IfEmpty),
        dir(p.systemd_dir(), 0o755, "root", group, Purge::IfEmpty),
        dir(p.models.clone(), 0o750, "root", group, Purge::IfEmpty),
        dir(p.credentials.clone(), 0o700, "root", "root", Purge::IfEmpty),
        dir("/var/lib/citadel".into(), 0o750, user, group, Purge::Whole),
        dir(
            "/var/cache/citadel".into(),
            0o750,
            user,
            group,
            Purge::Whole,
        ),
    ]
}

/// The id of `name` in `ROOT/etc/passwd` (`file = "passwd"`) or `ROOT/etc/group`.
pub fn id_of(root: &Path, file: &str, name: &str) -> Option<u32> {
    let text = fs::read_to_string(rooted(root, &Path::new("/etc").join(file))).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// What `install` will do with each directory, worked out before it changes anything.
#[derive(Debug, Default)]
pub struct DirPlan {
    pub created: Vec<PathBuf>,
    pub preexisting: Vec<PathBuf>,
    /// Why the install must not go ahead (one line per directory).
    pub refusals: Vec<String>,
}

/// Sorts Citadel's directories into created, pre-existing and refused.
/// `ours` are the rooted paths of everything Citadel writes (files and
/// directories): an existing directory holding only those is adopted.
pub fn plan_dirs(
    root: &Path,
    settings: &Settings,
    previous: Option<&Manifest>,
    ours: &BTreeSet<PathBuf>,
) -> DirPlan {
    let mut plan = DirPlan::default();
    let dirs = dirs(settings);
    let all_ours: BTreeSet<PathBuf> = ours
        .iter()
        .cloned()
        .chain(dirs.iter().map(|d| rooted(root, &d.path)))
        .chain(std::iter::once(rooted(root, Path::new(MANIFEST))))
        .collect();
    for d in &dirs {
        let at = rooted(root, &d.path);
        let Ok(meta) = fs::symlink_metadata(&at) else {
            plan.created.push(d.path.clone());
            continue;
        };
        if previous.is_some_and(|m| m.created_dirs.contains(&d.path)) {
            plan.created.push(d.path.clone());
            continue;
        }
        // `/var/lib/citadel` and `/var/cache/citadel` are fixed names (not
        // configurable), the bases of the units' StateDirectory= and
        // CacheDirectory=: what they hold was written by Citadel's services,
        // e.g. an engine's compiled kernels kept from an earlier install whose
        // `citadel` user had another uid. Citadel's by name, taken over.
        if d.purge == Purge::Whole {
            plan.created.push(d.path.clone());
            continue;
        }
        let wanted_uid = id_of(root, "passwd", &d.owner);
        let wanted_gid = id_of(root, "group", &d.group);
        let foreign: Vec<String> = if meta.is_dir() {
            fs::read_dir(&at)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| !all_ours.contains(p))
                .map(|p| {
                    p.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        } else {
            vec!["(it is not a directory)".to_owned()]
        };
        if foreign.is_empty() {
            // Empty, or only Citadel's entries: the operator made it for Citadel.
            plan.created.push(d.path.clone());
            continue;
        }
        let exact = meta.is_dir()
            && meta.mode() & 0o7777 == d.mode
            && Some(meta.uid()) == wanted_uid
            && Some(meta.gid()) == wanted_gid;
        if exact {
            plan.preexisting.push(d.path.clone());
            continue;
        }
        let mut shown: Vec<String> = foreign.iter().take(3).cloned().collect();
        if foreign.len() > 3 {
            shown.push(format!("and {} more", foreign.len() - 3));
        }
        plan.refusals.push(format!(
            "{} exists and holds files Citadel did not create ({}); its tmpfiles.d line would make it {:04o} {}:{} (now {:04o} uid {} gid {}). \
             Citadel does not take over a directory it did not create: point the config at a new directory, \
             or empty this one (for model weights: install first, then put them in)",
            at.display(),
            shown.join(", "),
            d.mode,
            d.owner,
            d.group,
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid()
        ));
    }
    plan
}

/// Removes what the manifest says Citadel created, printing what it removed
/// and what it kept, and why. Without a manifest nothing but the files the
/// caller already removed goes: every directory is kept and listed.
pub fn purge(root: &Path, settings: Option<&Settings>, manifest: Option<&Manifest>) -> Result<()> {
    let Some(m) = manifest else {
        outln!(
            "  kept     every directory: there is no install record ({}), so nothing says which are Citadel's",
            rooted(root, Path::new(MANIFEST)).display()
        )?;
        return Ok(());
    };
    for f in &m.files {
        let at = rooted(root, f);
        if fs::remove_file(&at).is_ok() {
            outln!("  removed  {}", at.display())?;
        }
        // Directories made on the way to the file (a drop-in's `NAME.d`) go
        // once empty, up to the directory Citadel created around them.
        let mut dir = f.parent();
        while let Some(d) = dir {
            let inside_ours = m.created_dirs.iter().any(|c| d.starts_with(c) && d != c);
            if !inside_ours || fs::remove_dir(rooted(root, d)).is_err() {
                break;
            }
            dir = d.parent();
        }
    }
    let policy = |p: &Path| {
        settings
            .map(dirs)
            .unwrap_or_default()
            .into_iter()
            .find(|d| d.path == p)
            .map_or_else(
                || {
                    if p.starts_with("/var/lib/citadel") || p.starts_with("/var/cache/citadel") {
                        Purge::Whole
                    } else {
                        Purge::IfEmpty
                    }
                },
                |d| d.purge,
            )
    };
    let models = settings.map(|s| s.paths.models.clone());
    // Deepest first, so a parent is looked at after its children went.
    let mut created: Vec<&PathBuf> = m.created_dirs.iter().collect();
    created.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for d in created {
        let at = rooted(root, d);
        if !at.is_dir() {
            continue;
        }
        if policy(d) == Purge::Whole {
            fs::remove_dir_all(&at).with_context(|| format!("cannot remove {}", at.display()))?;
            outln!("  purged   {}", at.display())?;
            continue;
        }
        if fs::remove_dir(&at).is_ok() {
            outln!("  removed  {}", at.display())?;
            continue;
        }
        let left: Vec<String> = fs::read_dir(&at)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let why = if models.as_deref() == Some(d.as_path()) {
            "model weights are never purged"
        } else {
            "it holds files Citadel did not write"
        };
        outln!(
            "  kept     {} ({why}: {})",
            at.display(),
            left.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        )?;
    }
    for d in &m.preexisting_dirs {
        outln!(
            "  kept     {} (it existed before Citadel's install)",
            rooted(root, d).display()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The directories here are the ones the renderer's tmpfiles.d entry creates.
    #[test]
    fn dirs_match_the_rendered_tmpfiles_entry() {
        let s = citadel_config::parse(citadel_config::SIM_EXAMPLE_CONFIG, Path::new("c.toml"))
            .unwrap()
            .settings;
        let rendered = citadel_render::render(&s);
        let tmpfiles = rendered
            .files
            .iter()
            .find(|f| f.kind == citadel_render::FileKind::Tmpfiles)
            .unwrap();
        let lines: Vec<(PathBuf, u32, String, String)> = tmpfiles
            .contents
            .lines()
            .filter(|l| l.starts_with("d "))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (
                    PathBuf::from(f[1].trim_matches('"')),
                    u32::from_str_radix(f[2], 8).unwrap(),
                    f[3].to_owned(),
                    f[4].to_owned(),
                )
            })
            .collect();
        let ours: Vec<(PathBuf, u32, String, String)> = dirs(&s)
            .into_iter()
            .map(|d| (d.path, d.mode, d.owner, d.group))
            .collect();
        assert_eq!(lines, ours);
    }
}
