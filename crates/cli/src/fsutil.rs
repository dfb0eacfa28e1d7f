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
}

/// Plans writing `files` (target path, contents): which are new, which differ.
pub fn plan(files: &[(PathBuf, String)]) -> Changes {
    let mut c = Changes::default();
    for (path, contents) in files {
        match fs::read_to_string(path) {
            Ok(old) if old == *contents => c.unchanged += 1,
            Ok(_) => c.changed.push(path.clone()),
            Err(_) => c.added.push(path.clone()),
        }
    }
    c
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
