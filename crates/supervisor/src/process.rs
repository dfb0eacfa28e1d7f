//! The engine process: spawned as the leader of its own process group, reaped
//! by the supervisor (which is a child subreaper, so orphaned engine
//! descendants come back to it), stopped group-wide.

use std::io;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::profile::{EngineCommand, ENV_REMOVED};

/// How an engine process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Code(i32),
    Signal(Signal),
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Code(c) => write!(f, "exit status {c}"),
            ExitKind::Signal(s) => write!(f, "signal {}", s.as_str()),
        }
    }
}

/// A running engine: the leader's pid is also its process group id.
#[derive(Debug)]
pub struct EngineProcess {
    pub pid: Pid,
    pub started: Instant,
    /// Set once the leader has been reaped.
    pub exit: Option<ExitKind>,
}

/// Makes this process a child subreaper: engine descendants whose parent dies
/// are re-parented to the supervisor (and reaped by it), not to PID 1.
pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// Spawns the engine: own process group, stdin from /dev/null, stdout and
/// stderr inherited (the journal under systemd), the notify variables removed.
pub fn spawn(cmd: &EngineCommand) -> io::Result<EngineProcess> {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(&cmd.program);
    c.args(&cmd.args)
        .envs(&cmd.env)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .process_group(0);
    for k in ENV_REMOVED {
        c.env_remove(k);
    }
    let child = c.spawn()?;
    let pid = Pid::from_raw(i32::try_from(child.id()).map_err(io::Error::other)?);
    // The std handle is dropped without waiting: `reap` collects the status.
    drop(child);
    Ok(EngineProcess {
        pid,
        started: Instant::now(),
        exit: None,
    })
}

impl EngineProcess {
    /// Reaps every exited child of the supervisor (the engine and any
    /// re-parented descendants). Returns the leader's status when it was reaped now.
    pub fn reap(&mut self) -> Option<ExitKind> {
        let mut leader = None;
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == self.pid => {
                    leader = Some(ExitKind::Code(code))
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == self.pid => {
                    leader = Some(ExitKind::Signal(sig))
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) => {}
                Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    break;
                }
            }
        }
        if leader.is_some() {
            self.exit = leader;
        }
        leader
    }

    /// Whether any process of the engine's group is still there.
    pub fn group_alive(&self) -> bool {
        !matches!(killpg(self.pid, None), Err(Errno::ESRCH))
    }

    /// Sends `sig` to the whole process group (a gone group is not an error).
    pub fn signal_group(&self, sig: Signal) {
        match killpg(self.pid, sig) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => {
                tracing::warn!(error = %e, signal = sig.as_str(), "cannot signal the engine's process group")
            }
        }
    }

    /// Waits (reaping) until the group is gone or `deadline`; `tick` runs
    /// every poll (the supervisor pings the watchdog from it).
    pub async fn wait_group_gone(&mut self, deadline: Instant, tick: &mut dyn FnMut()) -> bool {
        loop {
            self.reap();
            if !self.group_alive() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            tick();
            tokio::time::sleep((deadline - now).min(Duration::from_millis(25))).await;
        }
    }

    /// Stops the engine: SIGTERM to the group, up to `grace` for it to exit,
    /// then SIGKILL; finally kills and reaps any other child of the
    /// supervisor (descendants that left the group and were re-parented).
    /// Returns whether SIGKILL was needed.
    pub async fn stop(&mut self, grace: Duration, tick: &mut dyn FnMut()) -> StopReport {
        let t0 = Instant::now();
        self.signal_group(Signal::SIGTERM);
        let mut killed = false;
        if !self.wait_group_gone(crate::later(t0, grace), tick).await {
            killed = true;
            self.signal_group(Signal::SIGKILL);
            if !self
                .wait_group_gone(Instant::now() + Duration::from_secs(5), tick)
                .await
            {
                tracing::error!(
                    pgid = self.pid.as_raw(),
                    "engine process group survived SIGKILL"
                );
            }
        }
        let strays = kill_stray_children();
        self.reap();
        StopReport {
            took: t0.elapsed(),
            killed,
            strays,
        }
    }
}

/// The result of [`EngineProcess::stop`].
#[derive(Debug, Clone, Copy)]
pub struct StopReport {
    pub took: Duration,
    /// SIGKILL was needed after the grace period.
    pub killed: bool,
    /// Other children of the supervisor that had to be killed.
    pub strays: usize,
}

/// SIGKILLs every remaining child of this process (found in /proc).
fn kill_stray_children() -> usize {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut n = 0;
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state, ppid, ...
        let Some(after) = stat.rsplit_once(')').map(|(_, a)| a) else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let state = fields.next();
        if fields.next() == Some(me.as_str()) && state != Some("Z") {
            tracing::warn!(pid, "killing a stray engine descendant");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            n += 1;
        }
    }
    n
}
