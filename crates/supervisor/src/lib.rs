//! `citadel-model`: the supervisor each `citadel-model@NAME.service` runs as
//! its main process (`Type=notify`, `NotifyAccess=main`).
//!
//! Inference engines (vLLM, llama.cpp's server, Ollama, TGI) never tell
//! systemd the truth: they send no `READY=1`, so a unit is "active" long before
//! the model can serve, a hung engine stays "active" forever, and vLLM's
//! `/health` answers 200 while the model cannot run. The supervisor closes that gap:
//!
//! * **Launch**: builds the engine's command line from its profile
//!   ([`profile::engine_command`]), points its caches at `$CACHE_DIRECTORY`, and
//!   spawns it in its own process group on `127.0.0.1:PORT`, stdout/stderr to the journal.
//! * **Readiness**: while loading it sends `STATUS=loading NAME: N s` and
//!   `EXTEND_TIMEOUT_USEC` (every 20 s, 60 s ahead, never beyond
//!   `model.start_timeout` since start); `READY=1` only once the probe passes
//!   (health, plus one tiny completion for `ready_check = "completion"`, or
//!   the model preload for Ollama), then `STATUS=serving ...`.
//! * **Watchdog**: with `WATCHDOG_USEC` set (and `WATCHDOG_PID` unset or ours),
//!   `WATCHDOG=1` every `WATCHDOG_USEC/2`: while loading as long as the engine
//!   runs, after `READY=1` only while health passes. Once health has failed
//!   continuously for longer than half the watchdog period (dated from the start
//!   of the first failing probe) pings stop and systemd restarts the unit.
//!   Without a systemd watchdog, an engine unhealthy for longer than
//!   `model.watchdog` is stopped and the supervisor exits 69. The probe
//!   client never panics and reads at most a bounded response
//!   ([`probe::MAX_BODY`]); a malformed answer is a failed probe. If the
//!   prober task dies anyway, pings stop at once and the run ends with exit 70.
//! * **Stop**: on SIGTERM (or SIGINT) `STOPPING=1`, SIGTERM to the engine's
//!   process group, up to `model.stop_timeout` for it to go, then SIGKILL. The
//!   supervisor is a child subreaper, so descendants that leave the group are
//!   re-parented to it and killed too.
//!
//! # Exit statuses
//!
//! | status | meaning | systemd (`Restart=on-failure`, `RestartPreventExitStatus=78`) |
//! |---|---|---|
//! | 0 | clean stop on SIGTERM/SIGINT | no restart |
//! | 69 (`EX_UNAVAILABLE`) | the engine exited, could not be started, never became ready within `start_timeout`, or (without a systemd watchdog) stayed unhealthy | restart |
//! | 70 (`EX_SOFTWARE`) | internal error of the supervisor, including the death of its health prober (pings stop at once, `STATUS=failed: health prober failed: ...`, engine stopped) | restart |
//! | 74 (`EX_IOERR`) | `command` could not write its output (a closed pipe is a normal end, exit 0) | — |
//! | 78 (`EX_CONFIG`) | config invalid or model unknown, also a panic inside the config loader | no restart |
//!
//! Outside systemd, if the supervisor itself is killed with SIGKILL its engine
//! is not stopped (PR_SET_PDEATHSIG would need `unsafe` in the child); under
//! systemd the unit's final SIGKILL of its cgroup (`KillMode=mixed`, after
//! TimeoutStopSec) removes it.

pub mod notify;
pub mod probe;
pub mod process;
pub mod profile;
mod supervise;

pub use supervise::{run, Outcome, RunOptions};

/// Clean stop.
pub const EXIT_OK: u8 = 0;
/// The engine exited or never became ready (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Internal error (`EX_SOFTWARE`), including the death of the health prober.
pub const EXIT_SOFTWARE: u8 = 70;
/// Output could not be written (`EX_IOERR`; `command` only; a closed pipe is not an error).
pub const EXIT_IOERR: u8 = 74;
/// Config invalid or model unknown (`EX_CONFIG`; `RestartPreventExitStatus=78`).
pub const EXIT_CONFIG: u8 = 78;

/// `from + d`, saturating: a span too large for the clock (a config
/// value out of range) becomes "a century from now", never a panic.
pub(crate) fn later(from: std::time::Instant, d: std::time::Duration) -> std::time::Instant {
    const CENTURY: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);
    from.checked_add(d)
        .or_else(|| from.checked_add(CENTURY))
        .unwrap_or(from)
}

/// Errors of the supervisor itself (exit 70).
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}
