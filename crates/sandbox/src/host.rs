//! Small host-side helpers: /proc parsing, external commands, cgroup trees.
//! Everything here is std-only and tolerant of races with concurrent cleaners
//! (a file that vanished is not an error).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::SandboxError;

/// Poll interval for every condition we wait on.
pub(crate) const POLL: Duration = Duration::from_millis(50);

pub(crate) fn io_err(context: impl Into<String>, source: io::Error) -> SandboxError {
    SandboxError::Io {
        context: context.into(),
        source,
    }
}

/// Runs a host command to completion, stdin closed; error carries status and stderr.
pub(crate) fn run_host(program: &str, args: &[&str]) -> Result<String, SandboxError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io_err(format!("cannot run `{program}`"), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(SandboxError::Command {
            argv: std::iter::once(program)
                .chain(args.iter().copied())
                .map(String::from)
                .collect(),
            status: out.status.to_string(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// Sends `signal` (a name understood by kill(1), e.g. "TERM", "KILL") to pids.
/// Best effort: processes that already exited are fine.
pub(crate) fn signal(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let mut cmd = Command::new("kill");
    cmd.arg("-s").arg(signal).arg("--");
    for p in pids {
        cmd.arg(p.to_string());
    }
    let _ = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Polls `f` every [`POLL`] until it returns true or `timeout` elapses.
pub(crate) fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Fields of /proc/PID/stat after the `(comm)` field: index 0 is the state.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(String::from).collect())
}

/// True if the process exists and is not a zombie.
pub(crate) fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().map(String::as_str) != Some("Z"))
}

/// Process start time (clock ticks since boot); with the pid it identifies a
/// process across pid reuse.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    // starttime is field 22 of stat; fields after comm start at field 3.
    stat_fields(pid)?.get(22 - 3)?.parse().ok()
}

pub(crate) fn parent_pid(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(4 - 3)?.parse().ok()
}

pub(crate) fn cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Direct children of `pid` (scan of /proc; no CONFIG_PROC_CHILDREN needed).
pub(crate) fn children(pid: u32) -> Vec<u32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| parent_pid(p) == Some(pid))
        .collect()
}

/// True if `pid` is PID 1 of a pid namespace nested below ours.
pub(crate) fn is_ns_init(pid: u32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .is_some_and(|ids| ids.len() >= 2 && ids.last() == Some(&"1"))
}

pub(crate) fn euid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// One line of a /proc/*/mounts file.
pub(crate) struct MountEntry {
    pub point: PathBuf,
    pub fstype: String,
    pub options: Vec<String>,
}

/// Parses a mounts table (`/proc/self/mounts`, `/proc/PID/mounts`).
pub(crate) fn mounts(table: &str) -> Vec<MountEntry> {
    let Ok(text) = fs::read_to_string(table) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _src = f.next()?;
            let point = unescape_mount_path(f.next()?);
            let fstype = f.next()?.to_string();
            let options = f.next()?.split(',').map(String::from).collect();
            Some(MountEntry {
                point: PathBuf::from(point),
                fstype,
                options,
            })
        })
        .collect()
}

fn unescape_mount_path(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Host mounts at or below `dir`.
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mounts("/proc/self/mounts")
        .into_iter()
        .map(|m| m.point)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// A cgroup hierarchy mounted on the host.
pub(crate) struct Hierarchy {
    pub mount_point: PathBuf,
    pub is_cpuset: bool,
}

/// Every cgroup (v1 and v2) hierarchy mounted under /sys/fs/cgroup on the host.
pub(crate) fn cgroup_hierarchies() -> Vec<Hierarchy> {
    mounts("/proc/self/mounts")
        .into_iter()
        .filter(|m| {
            (m.fstype == "cgroup" || m.fstype == "cgroup2") && m.point.starts_with("/sys/fs/cgroup")
        })
        .map(|m| Hierarchy {
            is_cpuset: m.fstype == "cgroup" && m.options.iter().any(|o| o == "cpuset"),
            mount_point: m.point,
        })
        .collect()
}

/// All pids in the cgroup subtree rooted at `dir`.
pub(crate) fn cgroup_tree_pids(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for d in cgroup_tree_dirs(dir) {
        if let Ok(s) = fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Directories of the cgroup subtree rooted at `dir`, parents before children.
pub(crate) fn cgroup_tree_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
        out.push(d);
    }
    out.sort_by_key(|p| p.components().count());
    out
}

/// Removes a cgroup subtree bottom-up (cgroup dirs can only be rmdir'ed, and
/// only once empty). Retries briefly: the kernel releases a cgroup slightly
/// after its last process was reaped.
pub(crate) fn remove_cgroup_tree(dir: &Path, timeout: Duration) -> Result<(), String> {
    let mut last_err = String::new();
    let done = poll_until(timeout, || {
        last_err.clear();
        for d in cgroup_tree_dirs(dir).iter().rev() {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => last_err = format!("rmdir {}: {e}", d.display()),
            }
        }
        last_err.is_empty() && !dir.exists()
    });
    if done {
        Ok(())
    } else {
        Err(last_err)
    }
}

/// Finds `program` in PATH (plus the sbin dirs, which non-login root shells may lack).
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file());
    found
}
