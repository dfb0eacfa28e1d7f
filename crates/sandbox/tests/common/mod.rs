//! Shared helpers for the sandbox tests. These tests need root and
//! systemd-nspawn and fail (never skip) when they are missing.
#![allow(dead_code)]

use std::fs;
use std::path::Path;

use citadel_sandbox::{Sandbox, SandboxOptions, BASE_DIR, CGROUP_PREFIX};

pub fn boot(prefix: &str) -> Sandbox {
    let sb = Sandbox::boot(SandboxOptions::new(prefix)).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "booted sandbox `{}` (leader {}) in {:?}",
        sb.name(),
        sb.leader(),
        sb.boot_duration()
    );
    sb
}

/// Everything a sandbox leaves on the host, as human-readable findings.
pub fn leftovers(name: &str) -> Vec<String> {
    let mut found = Vec::new();
    let cgroup = format!("{CGROUP_PREFIX}{name}");
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if cmdline.contains("systemd-nspawn") && cmdline.contains(name) {
            found.push(format!("nspawn process {pid}: {cmdline}"));
        } else if cgroups.contains(&format!("/{cgroup}")) {
            found.push(format!("process {pid} in the sandbox cgroups: {cmdline}"));
        }
    }
    let dir = Path::new(BASE_DIR).join(name);
    for line in fs::read_to_string("/proc/self/mounts").unwrap().lines() {
        if line.contains(&*dir.to_string_lossy()) {
            found.push(format!("mount: {line}"));
        }
    }
    if dir.exists() {
        found.push(format!("scratch dir {}", dir.display()));
    }
    for h in fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let cg = h.path().join(&cgroup);
        if cg.exists() {
            found.push(format!("cgroup {}", cg.display()));
        }
    }
    found
}

pub fn assert_no_leftovers(name: &str) {
    let found = leftovers(name);
    assert!(
        found.is_empty(),
        "sandbox `{name}` left things behind:\n  {}",
        found.join("\n  ")
    );
}
