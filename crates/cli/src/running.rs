//! Which binary a unit's main process runs (issue 13, item 2): after a package
//! upgrade replaced the files in `/opt/citadel/bin`, a model unit keeps serving
//! with the binary it started with until the operator restarts it, and
//! `status` says so ("restart to apply").
//!
//! A file replaced by a package (dpkg renames the new file over the old one)
//! or by `install` (atomic write) gets a new inode; the kernel's link
//! `/proc/PID/exe` then names the old file with " (deleted)" appended, and
//! its inode differs from the installed file's. Reading the link of another
//! user's process needs root (ptrace access): for anyone else it is unknown.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Whether a running process uses the installed binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BinaryState {
    /// The process runs the file installed now.
    Current,
    /// The process runs a binary that has since been replaced or removed.
    RestartToApply,
    /// Not readable (another user's process without root) or gone.
    Unknown,
}

impl BinaryState {
    /// The word `status` prints.
    pub fn label(self) -> &'static str {
        match self {
            BinaryState::Current => "current",
            BinaryState::RestartToApply => "restart to apply",
            BinaryState::Unknown => "?",
        }
    }
}

/// The state of process `pid` against the binary installed at `installed`;
/// `None` when there is no process (pid 0).
pub fn of_process(pid: u32, installed: &Path) -> Option<BinaryState> {
    if pid == 0 {
        return None;
    }
    let exe = PathBuf::from(format!("/proc/{pid}/exe"));
    let link = std::fs::read_link(&exe);
    // Metadata through the link is the file the process runs, deleted or not.
    let running = std::fs::metadata(&exe).map(|m| (m.dev(), m.ino()));
    let now = std::fs::metadata(installed).map(|m| (m.dev(), m.ino()));
    Some(judge(link, running, now))
}

/// [`of_process`]'s decision over what was read: the link's target, the
/// (device, inode) of the running file and of the installed one.
pub fn judge(
    link: io::Result<PathBuf>,
    running: io::Result<(u64, u64)>,
    installed: io::Result<(u64, u64)>,
) -> BinaryState {
    let Ok(link) = link else {
        return BinaryState::Unknown;
    };
    if link.as_os_str().as_encoded_bytes().ends_with(b" (deleted)") {
        return BinaryState::RestartToApply;
    }
    match (running, installed) {
        (Ok(r), Ok(i)) if r == i => BinaryState::Current,
        (Ok(_), Ok(_)) => BinaryState::RestartToApply,
        _ => BinaryState::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied<T>() -> io::Result<T> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }

    #[test]
    fn issue13_judge_replaced_deleted_current_and_unreadable() {
        let bin = || Ok(PathBuf::from("/opt/citadel/bin/citadel-model"));
        assert_eq!(judge(bin(), Ok((1, 7)), Ok((1, 7))), BinaryState::Current);
        assert_eq!(
            judge(bin(), Ok((1, 7)), Ok((1, 8))),
            BinaryState::RestartToApply
        );
        let deleted = Ok(PathBuf::from("/opt/citadel/bin/citadel-model (deleted)"));
        assert_eq!(
            judge(deleted, Ok((1, 7)), Ok((1, 8))),
            BinaryState::RestartToApply
        );
        // Not root: the link of another user's process cannot be read.
        assert_eq!(judge(denied(), denied(), Ok((1, 8))), BinaryState::Unknown);
        // Nothing installed there (any more): unknown, not "current".
        assert_eq!(
            judge(bin(), Ok((1, 7)), Err(io::ErrorKind::NotFound.into())),
            BinaryState::Unknown
        );
    }

    /// A real process: current while its file is in place, "restart to apply"
    /// once a new file is renamed over it (what dpkg and `install` do) and
    /// once it is removed.
    #[test]
    fn issue13_status_sees_a_replaced_binary() {
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("prog");
        std::fs::copy("/bin/sleep", &prog).unwrap();
        let mut child = std::process::Command::new(&prog).arg("30").spawn().unwrap();
        let pid = child.id();
        assert_eq!(of_process(pid, &prog), Some(BinaryState::Current));
        let new = dir.path().join("prog.new");
        std::fs::copy("/bin/sleep", &new).unwrap();
        std::fs::rename(&new, &prog).unwrap();
        assert_eq!(of_process(pid, &prog), Some(BinaryState::RestartToApply));
        std::fs::remove_file(&prog).unwrap();
        assert_eq!(of_process(pid, &prog), Some(BinaryState::RestartToApply));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(of_process(0, &prog), None);
    }
}
