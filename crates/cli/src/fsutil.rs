//! File writes that are atomic (temp file + rename) and syncing of a directory
//! Citadel owns to a rendered set, touching only files Citadel wrote.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Writes `contents` to `path` atomically: readers see the old or the new file, never half of one.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().context("path has no parent directory")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".citadel-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode))?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// What a sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<PathBuf>,
    pub changed: Vec<PathBuf>,
    pub removed: Vec<PathBuf>,
    pub unchanged: usize,
    /// Files in the way: they exist, differ, and Citadel did not write them
    /// (no [`citadel_render::GENERATED_MARK`]). Never written; see [`refuse_conflicts`].
    pub conflicts: Vec<PathBuf>,
}

/// Plans writing `files` (target path, contents): which are new, which differ,
/// and which are in the way (exist without Citadel's header: an operator's file).
pub fn plan(files: &[(PathBuf, String)]) -> Changes {
    let mut c = Changes::default();
    for (path, contents) in files {
        match fs::read(path) {
            Ok(old) if old == contents.as_bytes() => c.unchanged += 1,
            Ok(old) if old.starts_with(citadel_render::GENERATED_MARK.as_bytes()) => {
                c.changed.push(path.clone());
            }
            Ok(_) => c.conflicts.push(path.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => c.added.push(path.clone()),
            // Unreadable (a directory, no permission): not ours to replace either.
            Err(_) => c.conflicts.push(path.clone()),
        }
    }
    c
}

/// Fails, naming every conflicting file and what to do, when `changes` has
/// conflicts. Called before anything is written, so a refusal changes nothing.
pub fn refuse_conflicts(changes: &Changes) -> Result<()> {
    if changes.conflicts.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = changes
        .conflicts
        .iter()
        .map(|p| format!("  {}", p.display()))
        .collect();
    anyhow::bail!(
        "nothing was changed: {} file(s) where Citadel renders its own are not Citadel's \
         (they do not start with `{}`), and Citadel never overwrites a file it did not write:\n{}\n\
         Move each aside or delete it (local changes to a unit belong in a drop-in, \
         e.g. `citadel-gateway.service.d/override.conf`), then run this again.",
        changes.conflicts.len(),
        citadel_render::GENERATED_MARK.trim_end(),
        list.join("\n")
    )
}

/// Writes what [`plan`] found new or changed, atomically, one file at a time.
pub fn apply(files: &[(PathBuf, String)], changes: &Changes) -> Result<()> {
    for (path, contents) in files {
        if changes.added.contains(path) || changes.changed.contains(path) {
            write_atomic(path, contents.as_bytes(), 0o644)?;
        }
    }
    for path in &changes.removed {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
        if let Some(dir) = path.parent() {
            // Drop-in directories go once empty; an operator's override keeps them.
            if dir.extension().is_some_and(|e| e == "d") {
                let _ = fs::remove_dir(dir);
            }
        }
    }
    Ok(())
}

/// Files Citadel generated earlier (recognised by the header every rendered file
/// starts with) below `dir`, to `depth` levels.
pub fn generated_files(dir: &Path, depth: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() && depth > 0 {
            out.extend(generated_files(&path, depth - 1));
        } else if ft.is_file() && is_generated(&path) {
            out.push(path);
        }
    }
    out.sort();
    out
}

pub fn is_generated(path: &Path) -> bool {
    fs::read_to_string(path).is_ok_and(|t| t.starts_with(citadel_render::GENERATED_MARK))
}
