//! The supervision loop: launch, readiness, watchdog, stop.
//!
//! The health prober runs as its own task and never ends by itself; if it
//! does (a panic, or an unexpected return), health is no longer known, so
//! the loop treats that as fatal at once: no further `WATCHDOG=1`,
//! `STATUS=failed: health prober failed: ...`, the engine is stopped with its
//! grace period, and the run ends with [`Outcome::ProberFailed`] (exit 70,
//! which `Restart=on-failure` restarts). Issue 9: a panicking prober used to
//! leave the watchdog fed forever.

use std::time::{Duration, Instant};

use citadel_config::Model;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::{interval_at, sleep_until, MissedTickBehavior};
use tracing::{debug, error, info, warn};

use crate::notify::{usec, Notifier, NotifyState};
use crate::probe::{ProbeResult, Prober};
use crate::process::{self, EngineProcess, ExitKind};
use crate::profile::EngineCommand;
use crate::SupervisorError;

/// Timing knobs that are not in the config (defaults suit systemd; tests shorten them).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// How often EXTEND_TIMEOUT_USEC is re-sent while loading.
    pub extend_interval: Duration,
    /// How far each EXTEND_TIMEOUT_USEC reaches (capped by the time left
    /// until `model.start_timeout`).
    pub extend_by: Duration,
    /// How often STATUS= reports loading progress.
    pub status_interval: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            extend_interval: Duration::from_secs(20),
            extend_by: Duration::from_secs(60),
            status_interval: Duration::from_secs(5),
        }
    }
}

/// How a supervised run ended (each maps to an exit status, see the crate docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped on SIGTERM/SIGINT: exit 0.
    Stopped,
    /// The engine could not be started: exit 69.
    SpawnFailed(String),
    /// The engine exited on its own: exit 69.
    EngineExited(String),
    /// Not ready within `start_timeout`: exit 69.
    NotReady(String),
    /// Unhealthy for longer than `model.watchdog` with no systemd watchdog to
    /// act on it (outside systemd): exit 69.
    Unhealthy(String),
    /// The health prober task died (panicked or returned): exit 70.
    ProberFailed(String),
}

impl Outcome {
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Stopped => crate::EXIT_OK,
            Outcome::ProberFailed(_) => crate::EXIT_SOFTWARE,
            Outcome::SpawnFailed(_)
            | Outcome::EngineExited(_)
            | Outcome::NotReady(_)
            | Outcome::Unhealthy(_) => crate::EXIT_UNAVAILABLE,
        }
    }
}

/// What the prober task reports: each probe's result and when it started.
#[derive(Debug)]
enum ProbeEvent {
    Ready(ProbeResult),
    Health(ProbeResult, Instant),
}

/// Probes until aborted; it returns only if the supervision loop is gone.
async fn prober_loop(prober: Prober, every: Duration, tx: mpsc::Sender<ProbeEvent>) {
    // A zero period would panic in `interval` (and busy-loop): at least 1 ms.
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let r = prober.ready().await;
        let ok = r.is_ok();
        if tx.send(ProbeEvent::Ready(r)).await.is_err() {
            return;
        }
        if ok {
            break;
        }
    }
    loop {
        tick.tick().await;
        let started = Instant::now();
        let r = prober.health().await;
        if tx.send(ProbeEvent::Health(r, started)).await.is_err() {
            return;
        }
    }
}

enum Phase {
    Loading {
        last_reason: String,
    },
    Serving {
        /// Start of the first failed probe since the last passing one.
        failing_since: Option<Instant>,
        /// Watchdog pings are being withheld.
        withheld: bool,
    },
}

fn secs(d: Duration) -> u64 {
    d.as_secs()
}

/// Runs `cmd` for `model` until it is stopped or fails.
pub async fn run(
    model: &Model,
    cmd: &EngineCommand,
    notifier: &Notifier,
    opts: &RunOptions,
) -> Result<Outcome, SupervisorError> {
    let name = model.name.as_str();
    let start_timeout = model.start_timeout.duration();
    let stop_timeout = model.stop_timeout.duration();
    let mut sigterm = signal(SignalKind::terminate()).map_err(SupervisorError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(SupervisorError::Signals)?;
    let mut sigchld = signal(SignalKind::child()).map_err(SupervisorError::Signals)?;
    if let Err(e) = process::become_subreaper() {
        warn!(error = %e, "cannot become a child subreaper; orphaned engine processes go to PID 1");
    }
    for dir in cmd.env.iter().filter(|(k, _)| {
        matches!(
            k.as_str(),
            "VLLM_CACHE_ROOT" | "XDG_CACHE_HOME" | "HF_HOME" | "HOME"
        )
    }) {
        if let Err(e) = std::fs::create_dir_all(dir.1) {
            warn!(path = %dir.1, error = %e, "cannot create an engine cache directory");
        }
    }

    // Something else on the port (an engine orphaned outside systemd, another
    // model) would answer our probes and be reported ready in its place.
    if let Err(e) = std::net::TcpListener::bind((crate::profile::ENGINE_HOST, model.port.get())) {
        let msg = format!(
            "port {} on {} is not available: {e}",
            model.port,
            crate::profile::ENGINE_HOST
        );
        error!(error = %e, "the model's port is already in use; not starting the engine");
        notifier.status(&format!("failed: {msg}"));
        return Ok(Outcome::SpawnFailed(msg));
    }

    let t0 = Instant::now();
    let mut engine = match process::spawn(cmd) {
        Ok(p) => p,
        Err(e) => {
            let msg = format!("cannot start {}: {e}", cmd.program.display());
            error!(program = %cmd.program.display(), error = %e, "cannot start the engine");
            notifier.status(&format!("failed: {msg}"));
            return Ok(Outcome::SpawnFailed(msg));
        }
    };
    info!(engine_pid = engine.pid.as_raw(), program = %cmd.program.display(), args = ?cmd.args, "engine of {name} started (PID {}); waiting until it can serve", engine.pid.as_raw());

    // Loading: progress, an extended start timeout capped at start_timeout, pings while alive.
    let extend = |notifier: &Notifier, status: &str| {
        let left = start_timeout.saturating_sub(t0.elapsed());
        let by = opts.extend_by.min(left);
        notifier.send(&[
            NotifyState::Status(status),
            NotifyState::ExtendTimeoutUsec(usec(by)),
        ]);
    };
    extend(notifier, &format!("loading {name}: 0 s"));

    let mut prober = Prober::new(model);
    let wd = notifier.watchdog();
    // Health failing for longer than this withholds pings (or, without a
    // systemd watchdog, for longer than model.watchdog stops the engine).
    let threshold = match wd {
        Some(w) => (w / 2).max(Duration::from_millis(100)),
        None => model.watchdog.duration(),
    };
    prober.health_timeout = prober.health_timeout.min(threshold);
    if let Some(w) = wd {
        info!(
            watchdog_usec = w.as_micros() as u64,
            threshold_ms = threshold.as_millis() as u64,
            "systemd watchdog enabled"
        );
    }
    let (tx, mut rx) = mpsc::channel(16);
    let mut prober_task = tokio::spawn(prober_loop(prober, model.probe_interval.duration(), tx));

    let now = tokio::time::Instant::now();
    let ping_every = wd.map_or(Duration::from_secs(3600), |w| {
        (w / 2).max(Duration::from_millis(10))
    });
    let mut wd_tick = interval_at(now, ping_every);
    let periodic = |every: Duration| {
        let every = every.max(Duration::from_millis(1));
        interval_at(crate::later(now.into_std(), every).into(), every)
    };
    let mut extend_tick = periodic(opts.extend_interval);
    let mut status_tick = periodic(opts.status_interval);
    let mut reap_tick = interval_at(now + Duration::from_secs(1), Duration::from_secs(1));
    for t in [
        &mut wd_tick,
        &mut extend_tick,
        &mut status_tick,
        &mut reap_tick,
    ] {
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    }
    let deadline = sleep_until(tokio::time::Instant::from_std(crate::later(
        t0,
        start_timeout,
    )));
    tokio::pin!(deadline);

    let mut phase = Phase::Loading {
        last_reason: String::new(),
    };
    let outcome = loop {
        let loading = matches!(phase, Phase::Loading { .. });
        tokio::select! {
            // Signals first: a stop must never be mistaken for a crash.
            biased;
            _ = sigterm.recv() => { info!("SIGTERM received; stopping"); break Outcome::Stopped; }
            _ = sigint.recv() => { info!("SIGINT received; stopping"); break Outcome::Stopped; }
            _ = sigchld.recv() => {
                if let Some(exit) = engine.reap() {
                    break exited_or_stopping(&mut sigterm, &mut sigint, name, &engine, exit, notifier).await;
                }
            }
            _ = reap_tick.tick() => {
                if let Some(exit) = engine.reap() {
                    break exited_or_stopping(&mut sigterm, &mut sigint, name, &engine, exit, notifier).await;
                }
            }
            // Before the watchdog tick: once the prober is gone, no more pings.
            ended = &mut prober_task => break prober_ended(ended, notifier),
            _ = &mut deadline, if loading => {
                let reason = match &phase { Phase::Loading { last_reason } => last_reason.clone(), _ => String::new() };
                let msg = format!("{name} did not become ready within start_timeout {} (last probe: {reason})", model.start_timeout);
                error!(start_timeout_s = secs(start_timeout), last_probe = %reason, "{name} did not become ready within start_timeout; stopping the engine");
                notifier.status(&format!("failed: {msg}"));
                break Outcome::NotReady(msg);
            }
            _ = extend_tick.tick(), if loading => {
                extend(notifier, &loading_status(name, t0, &phase));
            }
            _ = status_tick.tick(), if loading => {
                notifier.status(&loading_status(name, t0, &phase));
            }
            _ = wd_tick.tick(), if wd.is_some() => {
                match &mut phase {
                    Phase::Loading { .. } => notifier.ping(),
                    Phase::Serving { failing_since, withheld } => {
                        let failing_for = failing_since.map(|t| t.elapsed());
                        if failing_for.is_none_or(|f| f <= threshold) {
                            notifier.ping();
                            *withheld = false;
                        } else if !*withheld {
                            *withheld = true;
                            let f = failing_for.unwrap_or_default();
                            error!(failing_ms = f.as_millis() as u64, threshold_ms = threshold.as_millis() as u64, "engine health has failed for longer than half the watchdog period; withholding watchdog pings so systemd restarts the unit");
                            notifier.status(&format!("unhealthy for {} s: watchdog pings withheld", secs(f)));
                        }
                    }
                }
            }
            Some(ev) = rx.recv() => {
                match (ev, &mut phase) {
                    (ProbeEvent::Ready(Ok(())), Phase::Loading { .. }) => {
                        let took = engine.started.elapsed();
                        info!(ready_after_ms = took.as_millis() as u64, "{name} is ready to serve on {}:{} (after {:.1} s)", crate::profile::ENGINE_HOST, model.port, took.as_secs_f64());
                        let status = format!("serving {name} on 127.0.0.1:{} (ready after {} s)", model.port, secs(took));
                        notifier.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
                        phase = Phase::Serving { failing_since: None, withheld: false };
                    }
                    (ProbeEvent::Ready(Err(reason)), Phase::Loading { last_reason }) => {
                        if *last_reason != reason {
                            debug!(probe = %reason, "not ready yet");
                        }
                        *last_reason = reason;
                    }
                    (ProbeEvent::Health(Ok(()), _), Phase::Serving { failing_since, withheld }) => {
                        if let Some(t) = failing_since.take() {
                            info!(failed_for_ms = t.elapsed().as_millis() as u64, "engine health recovered");
                            notifier.status(&format!("serving {name} on 127.0.0.1:{}", model.port));
                        }
                        *withheld = false;
                    }
                    (ProbeEvent::Health(Err(reason), started), Phase::Serving { failing_since, .. }) => {
                        match failing_since {
                            None => {
                                warn!(probe = %reason, "engine health probe failed");
                                notifier.status(&format!("unhealthy: {reason}"));
                                *failing_since = Some(started);
                            }
                            Some(t) if wd.is_none() && t.elapsed() > threshold => {
                                let msg = format!("{name} unhealthy for {} s (> watchdog {}): {reason}", secs(t.elapsed()), model.watchdog);
                                error!(probe = %reason, "engine unhealthy for longer than the watchdog period and no systemd watchdog is set; stopping it");
                                notifier.status(&format!("failed: {msg}"));
                                break Outcome::Unhealthy(msg);
                            }
                            Some(_) => debug!(probe = %reason, "engine health probe still failing"),
                        }
                    }
                    _ => {}
                }
            }
        }
    };
    prober_task.abort();

    if outcome == Outcome::Stopped {
        notifier.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
    // Without a prober nothing vouches for the engine: no pings while it stops.
    let ping_while_stopping = wd.filter(|_| !matches!(outcome, Outcome::ProberFailed(_)));
    if engine.exit.is_none() || engine.group_alive() {
        let mut last_ping = Instant::now();
        let mut ping = || {
            if let Some(w) = ping_while_stopping {
                if last_ping.elapsed() >= w / 2 {
                    notifier.ping();
                    last_ping = Instant::now();
                }
            }
        };
        info!(
            grace_s = secs(stop_timeout),
            "stopping the engine's process group (SIGTERM)"
        );
        let report = engine.stop(stop_timeout, &mut ping).await;
        if report.killed {
            warn!(took_ms = report.took.as_millis() as u64, "engine of {name} did not exit within the stop grace period; sent SIGKILL to its process group");
        } else {
            info!(took_ms = report.took.as_millis() as u64, exit = %engine.exit.map_or("unknown".into(), |e| e.to_string()), "engine of {name} stopped");
        }
    }
    Ok(outcome)
}

/// The prober task ended (it never should): says why on STATUS= and in the
/// log, and gives the outcome that stops the engine and exits 70.
fn prober_ended(ended: Result<(), tokio::task::JoinError>, notifier: &Notifier) -> Outcome {
    let why = prober_failure(ended);
    error!(reason = %why, "the health prober died; stopping the engine (health can no longer be checked)");
    notifier.status(&format!("failed: {why}"));
    Outcome::ProberFailed(why)
}

/// Why the prober task ended, for STATUS= and the log.
fn prober_failure(ended: Result<(), tokio::task::JoinError>) -> String {
    match ended {
        Ok(()) => "health prober failed: it returned unexpectedly".to_owned(),
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            format!("health prober failed: panicked: {msg}")
        }
        Err(e) => format!("health prober failed: {e}"),
    }
}

fn loading_status(name: &str, t0: Instant, phase: &Phase) -> String {
    let base = format!("loading {name}: {} s", secs(t0.elapsed()));
    match phase {
        Phase::Loading { last_reason } if !last_reason.is_empty() => {
            format!("{base} ({last_reason})")
        }
        _ => base,
    }
}

/// How long an engine exit waits for a SIGTERM sent in the same instant.
const STOP_RACE_WINDOW: Duration = Duration::from_millis(200);

/// When SIGTERM reaches the supervisor and the engine at the same time (an
/// operator's `KillMode=control-group` drop-in, `kill -TERM -- -PGID`), the
/// engine may exit before the supervisor has seen its own signal. An engine exit that coincides with a stop is a stop (exit 0),
/// not a crash (exit 69, which would leave the unit `failed`).
async fn exited_or_stopping(
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
    name: &str,
    engine: &EngineProcess,
    exit: ExitKind,
    notifier: &Notifier,
) -> Outcome {
    tokio::select! {
        biased;
        _ = sigterm.recv() => { info!(exit = %exit, "SIGTERM received as the engine exited; stopping"); Outcome::Stopped }
        _ = sigint.recv() => { info!(exit = %exit, "SIGINT received as the engine exited; stopping"); Outcome::Stopped }
        _ = tokio::time::sleep(STOP_RACE_WINDOW) => engine_exited(name, engine, exit, notifier),
    }
}

fn engine_exited(
    name: &str,
    engine: &EngineProcess,
    exit: ExitKind,
    notifier: &Notifier,
) -> Outcome {
    // A SIGKILL the supervisor did not send comes from the kernel (the unit's
    // MemoryMax= or the OOM killer) or an operator: say so where operators look.
    let hint = match exit {
        ExitKind::Signal(nix::sys::signal::Signal::SIGKILL) => {
            "; killed from outside: the memory limit (MemoryMax=), the OOM killer or an operator"
        }
        _ => "",
    };
    let msg = format!(
        "engine of {name} exited on its own ({exit}{hint}) after {} s",
        secs(engine.started.elapsed())
    );
    error!(exit = %exit, "{msg}");
    notifier.status(&format!("failed: {msg}"));
    Outcome::EngineExited(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 9, item 2: the death of the prober task (here a real panic in a
    /// real task, caught by tokio as a `JoinError`) ends the run with an
    /// outcome that exits non-zero, neither 0 (no restart) nor 78 (config,
    /// never restarted), and names the panic.
    #[tokio::test]
    async fn issue9_prober_death_is_fatal() {
        let panicked = tokio::spawn(async { panic!("boom in the prober") }).await;
        let outcome = prober_ended(panicked, &Notifier::disabled());
        match &outcome {
            Outcome::ProberFailed(why) => {
                assert_eq!(why, "health prober failed: panicked: boom in the prober")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(outcome.exit_code(), crate::EXIT_SOFTWARE);
        assert_ne!(outcome.exit_code(), crate::EXIT_OK);
        assert_ne!(outcome.exit_code(), crate::EXIT_CONFIG);

        let formatted = tokio::spawn(async {
            let n = 7;
            panic!("chunk {n} too large");
        })
        .await;
        assert_eq!(
            prober_failure(formatted),
            "health prober failed: panicked: chunk 7 too large"
        );
        assert_eq!(
            prober_failure(Ok(())),
            "health prober failed: it returned unexpectedly"
        );
        let handle = tokio::spawn(std::future::pending::<()>());
        handle.abort();
        assert!(prober_failure(handle.await).starts_with("health prober failed: "));
    }
}
