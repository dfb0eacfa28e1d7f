//! `citadel-engine-sim`: a **simulated** inference engine.
//!
//! This is an honest stand-in for a GPU inference engine such as vLLM, for tests
//! and demos on machines that cannot run one. It loads no model and runs no
//! neural network: it speaks the same OpenAI-compatible HTTP API as vLLM's
//! OpenAI server (`/health`, `/v1/models`, `/v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`, `/metrics` with `vllm:*` names) and
//! returns deterministic, obviously synthetic text at a configurable pace.
//! Faults (crashes, hangs, lying or failing health checks, memory growth) can
//! be injected from the start or at runtime.
//!
//! Simulator-only endpoints (not part of vLLM's API):
//! * `POST /sim/fault` with a JSON [`FaultUpdate`], e.g. `{"hang": true}`,
//!   `{"health_fails": true}`, `{"health_lies": true}`, `{"crash": true}`,
//!   `{"reset": true}`; answers with the resulting [`FaultState`].
//! * `GET /sim/stats`: request counters as [`SimStats`] JSON.
//!
//! `/sim/*` is never affected by injected faults (a hung simulator still
//! answers it), so a test can always undo a fault.
//!
//! In-process use:
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use citadel_engine_sim::{spawn, FaultUpdate, SimConfig};
//! let sim = spawn(SimConfig::default(), "127.0.0.1:0".parse().unwrap()).await?;
//! println!("simulator on http://{}", sim.addr);
//! sim.set_fault(FaultUpdate { hang: Some(true), ..Default::default() });
//! sim.shutdown().await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

mod body;
mod duration;
mod metrics;
mod server;

pub use duration::parse_duration;

/// Exit status the binary uses for simulated crashes (`EX_SOFTWARE`).
pub const CRASH_EXIT_CODE: i32 = 70;

/// How long a graceful shutdown waits for in-flight requests before dropping
/// connections, unless [`SimConfig::shutdown_grace`] says otherwise: long
/// enough for a stream to finish (issue 10, item 1: with 2 s, a stream in
/// flight when `systemctl stop` came was cut). Under systemd the model's
/// `stop_timeout` still bounds it: the supervisor SIGKILLs the engine then.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Simulator configuration.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Served model names (the first one is the default when a request names
    /// no model). Must not be empty.
    pub models: Vec<String>,
    /// Simulated model load time: `/health` answers 503 and inference requests
    /// 503 until it has elapsed since `serve` started.
    pub load_time: Duration,
    /// Token pace; `None` or `<= 0` means as fast as possible.
    pub tokens_per_second: Option<f64>,
    /// Extra delay before the first generated token (simulated prefill).
    pub first_token_delay: Duration,
    /// `max_tokens` when a request does not set one.
    pub default_max_tokens: u64,
    /// Dimension of the synthetic embedding vectors.
    pub embedding_dim: usize,
    /// Faults injected from the start.
    pub faults: Faults,
    /// Print start/ready/fault lines to stderr (the binary sets this).
    pub log_to_stderr: bool,
    /// After a graceful stop begins (SIGTERM, [`SimHandle::shutdown`]), how
    /// long in-flight requests and streams may take to finish before their
    /// connections are dropped. New connections are refused at once.
    pub shutdown_grace: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            models: vec!["citadel-sim-model".to_string()],
            load_time: Duration::ZERO,
            tokens_per_second: None,
            first_token_delay: Duration::ZERO,
            default_max_tokens: 16,
            embedding_dim: 8,
            faults: Faults::default(),
            log_to_stderr: false,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// Faults injected from the start. "Completion requests" are
/// `POST /v1/chat/completions` and `POST /v1/completions`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    /// Crash upon receiving the N-th completion request (that request gets no
    /// answer). The binary exits with [`CRASH_EXIT_CODE`]; in-process the
    /// listener closes, connections drop, and the serve future returns an error.
    pub crash_after: Option<u64>,
    /// Crash immediately (a crash-looping engine): `serve` returns an error
    /// without accepting anything; the binary exits with [`CRASH_EXIT_CODE`].
    pub crash_on_start: bool,
    /// Once N completion requests were received, stop answering everything
    /// (except `/sim/*`): connections are accepted but never answered. The
    /// N-th request itself is still answered.
    pub hang_after: Option<u64>,
    /// Once N completion requests were received, `/health` answers 503.
    pub unhealthy_after: Option<u64>,
    /// `/health` always answers 503 (completions keep working).
    pub health_fails: bool,
    /// `/health` answers 200 (after load) but every inference request fails
    /// with 500, like an engine that passes health checks yet cannot run.
    pub health_lies: bool,
    /// After load, allocate and touch this many MiB per second until stopped
    /// (for `MemoryMax=` tests).
    pub allocate_mb_per_sec: Option<f64>,
}

/// A runtime fault change (`POST /sim/fault` body, or [`SimHandle::set_fault`]).
/// `reset` is applied first, then the other fields that are set.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultUpdate {
    /// Clear every fault (flags and thresholds; memory already allocated is
    /// released and allocation stops).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<bool>,
    /// Stop answering everything but `/sim/*` (`false` resumes; requests that
    /// were hanging then proceed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hang: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_fails: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_lies: Option<bool>,
    /// Crash now (the binary exits with [`CRASH_EXIT_CODE`] right after
    /// answering this request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash: Option<bool>,
    /// Thresholds in total completion requests received so far (see
    /// [`SimStats::completion_requests`]); `null` is not accepted, use `reset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash_after: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hang_after: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_after: Option<u64>,
}

impl FaultUpdate {
    pub fn reset() -> Self {
        FaultUpdate {
            reset: Some(true),
            ..Default::default()
        }
    }
    pub fn hang(on: bool) -> Self {
        FaultUpdate {
            hang: Some(on),
            ..Default::default()
        }
    }
    pub fn health_fails(on: bool) -> Self {
        FaultUpdate {
            health_fails: Some(on),
            ..Default::default()
        }
    }
    pub fn health_lies(on: bool) -> Self {
        FaultUpdate {
            health_lies: Some(on),
            ..Default::default()
        }
    }
    pub fn crash() -> Self {
        FaultUpdate {
            crash: Some(true),
            ..Default::default()
        }
    }
}

/// Current fault settings (answer of `POST /sim/fault`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct FaultState {
    pub hang: bool,
    pub health_fails: bool,
    pub health_lies: bool,
    pub crash_after: Option<u64>,
    pub hang_after: Option<u64>,
    pub unhealthy_after: Option<u64>,
    pub allocate_mb_per_sec: Option<f64>,
    pub crashed: bool,
}

/// Request counters (`GET /sim/stats`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct SimStats {
    pub ready: bool,
    pub health_requests: u64,
    /// Completion requests received (chat + text), including failed ones.
    pub completion_requests: u64,
    pub completions_ok: u64,
    pub completions_failed: u64,
    pub embedding_requests: u64,
    pub models_requests: u64,
    pub metrics_requests: u64,
    pub other_requests: u64,
    pub connections_accepted: u64,
    pub allocated_bytes: u64,
}

const NONE: u64 = u64::MAX;

fn opt(v: u64) -> Option<u64> {
    (v != NONE).then_some(v)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    Running = 0,
    Stopping = 1,
    Stopped = 2,
    Crashed = 3,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) health: AtomicU64,
    pub(crate) completions: AtomicU64,
    pub(crate) completions_ok: AtomicU64,
    pub(crate) completions_failed: AtomicU64,
    pub(crate) embeddings: AtomicU64,
    pub(crate) models: AtomicU64,
    pub(crate) metrics: AtomicU64,
    pub(crate) other: AtomicU64,
    pub(crate) connections: AtomicU64,
    pub(crate) allocated_bytes: AtomicU64,
    pub(crate) ids: AtomicU64,
}

/// State shared by every connection; hot-path fields are atomics.
pub(crate) struct Shared {
    pub(crate) cfg: SimConfig,
    pub(crate) models: Vec<metrics::ModelEntry>,
    pub(crate) models_json: bytes::Bytes,
    pub(crate) ready_at: Instant,
    pub(crate) ready: AtomicBool,
    pub(crate) phase: AtomicU8,
    pub(crate) hang: AtomicBool,
    pub(crate) health_fails: AtomicBool,
    pub(crate) health_lies: AtomicBool,
    pub(crate) crash_after: AtomicU64,
    pub(crate) hang_after: AtomicU64,
    pub(crate) unhealthy_after: AtomicU64,
    /// Memory growth in MiB/s as f64 bits; 0 = off.
    pub(crate) alloc_rate_bits: AtomicU64,
    /// Bumped on every fault or phase change; waiters re-check their condition.
    pub(crate) changes: watch::Sender<u64>,
    pub(crate) counters: Counters,
    /// Period between tokens (zero = as fast as possible).
    pub(crate) token_period: Duration,
}

impl Shared {
    fn new(cfg: SimConfig) -> io::Result<Self> {
        if cfg.models.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "SimConfig.models must name at least one model",
            ));
        }
        let created = server::unix_now();
        let data: Vec<serde_json::Value> = cfg
            .models
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": m, "object": "model", "created": created,
                    "owned_by": "citadel-engine-sim", "root": m, "parent": null,
                })
            })
            .collect();
        let models_json = serde_json::to_vec(&serde_json::json!({"object": "list", "data": data}))
            .map_err(io::Error::other)?
            .into();
        let token_period = match cfg.tokens_per_second {
            Some(tps) if tps > 0.0 && tps.is_finite() => {
                Duration::try_from_secs_f64(1.0 / tps).unwrap_or(Duration::ZERO)
            }
            _ => Duration::ZERO,
        };
        let f = &cfg.faults;
        let shared = Shared {
            models: cfg
                .models
                .iter()
                .map(|m| metrics::ModelEntry {
                    name: m.clone(),
                    label: escape_label(m),
                    json: serde_json::to_string(m).unwrap_or_else(|_| "\"\"".into()),
                    m: metrics::ModelMetrics::new(),
                })
                .collect(),
            models_json,
            ready_at: Instant::now() + cfg.load_time,
            ready: AtomicBool::new(false),
            phase: AtomicU8::new(Phase::Running as u8),
            hang: AtomicBool::new(false),
            health_fails: AtomicBool::new(f.health_fails),
            health_lies: AtomicBool::new(f.health_lies),
            crash_after: AtomicU64::new(f.crash_after.unwrap_or(NONE)),
            hang_after: AtomicU64::new(f.hang_after.unwrap_or(NONE)),
            unhealthy_after: AtomicU64::new(f.unhealthy_after.unwrap_or(NONE)),
            alloc_rate_bits: AtomicU64::new(f.allocate_mb_per_sec.unwrap_or(0.0).to_bits()),
            changes: watch::Sender::new(0),
            counters: Counters::default(),
            token_period,
            cfg,
        };
        Ok(shared)
    }

    pub(crate) fn log(&self, msg: std::fmt::Arguments<'_>) {
        if self.cfg.log_to_stderr {
            eprintln!("citadel-engine-sim: {msg}");
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        match self.phase.load(Relaxed) {
            0 => Phase::Running,
            1 => Phase::Stopping,
            2 => Phase::Stopped,
            _ => Phase::Crashed,
        }
    }

    pub(crate) fn running(&self) -> bool {
        self.phase.load(Relaxed) == Phase::Running as u8
    }

    /// Moves to `to` unless already in a terminal phase; crash wins over all.
    pub(crate) fn set_phase(&self, to: Phase) {
        let _ = self.phase.fetch_update(Relaxed, Relaxed, |cur| {
            let cur_p = cur;
            if cur_p == Phase::Crashed as u8 || (cur_p >= to as u8 && to != Phase::Crashed) {
                None
            } else {
                Some(to as u8)
            }
        });
        self.bump();
    }

    pub(crate) fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(crate) fn is_ready(&self) -> bool {
        if self.ready.load(Relaxed) {
            return true;
        }
        if Instant::now() >= self.ready_at {
            self.ready.store(true, Relaxed);
            return true;
        }
        false
    }

    /// Whether non-`/sim` requests must hang right now.
    pub(crate) fn is_hung(&self) -> bool {
        self.hang.load(Relaxed)
            || self.counters.completions.load(Relaxed) >= self.hang_after.load(Relaxed)
    }

    pub(crate) fn health_ok(&self) -> bool {
        !self.health_fails.load(Relaxed)
            && self.counters.completions.load(Relaxed) < self.unhealthy_after.load(Relaxed)
    }

    /// Resolves once the simulator is no longer hung or is stopping.
    pub(crate) async fn wait_while_hung(&self) {
        let mut rx = self.changes.subscribe();
        while self.is_hung() && self.running() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Resolves once the phase is not `Running`.
    pub(crate) async fn wait_not_running(&self) {
        let mut rx = self.changes.subscribe();
        while self.running() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    pub(crate) fn crash(&self, why: &str) {
        self.log(format_args!("simulated crash ({why})"));
        self.set_phase(Phase::Crashed);
    }

    pub(crate) fn apply(&self, u: &FaultUpdate) -> FaultState {
        if u.reset == Some(true) {
            self.hang.store(false, Relaxed);
            self.health_fails.store(false, Relaxed);
            self.health_lies.store(false, Relaxed);
            self.crash_after.store(NONE, Relaxed);
            self.hang_after.store(NONE, Relaxed);
            self.unhealthy_after.store(NONE, Relaxed);
            self.alloc_rate_bits.store(0f64.to_bits(), Relaxed);
        }
        if let Some(v) = u.hang {
            self.hang.store(v, Relaxed);
            if !v && self.hang_after.load(Relaxed) <= self.counters.completions.load(Relaxed) {
                // "hang: false" also lifts a reached hang_after threshold.
                self.hang_after.store(NONE, Relaxed);
            }
        }
        if let Some(v) = u.health_fails {
            self.health_fails.store(v, Relaxed);
        }
        if let Some(v) = u.health_lies {
            self.health_lies.store(v, Relaxed);
        }
        if let Some(v) = u.crash_after {
            self.crash_after.store(v, Relaxed);
        }
        if let Some(v) = u.hang_after {
            self.hang_after.store(v, Relaxed);
        }
        if let Some(v) = u.unhealthy_after {
            self.unhealthy_after.store(v, Relaxed);
        }
        self.log(format_args!("fault update {u:?}"));
        if u.crash == Some(true) {
            self.crash("requested via /sim/fault");
        }
        self.bump();
        self.fault_state()
    }

    pub(crate) fn fault_state(&self) -> FaultState {
        let rate = f64::from_bits(self.alloc_rate_bits.load(Relaxed));
        FaultState {
            hang: self.hang.load(Relaxed),
            health_fails: self.health_fails.load(Relaxed),
            health_lies: self.health_lies.load(Relaxed),
            crash_after: opt(self.crash_after.load(Relaxed)),
            hang_after: opt(self.hang_after.load(Relaxed)),
            unhealthy_after: opt(self.unhealthy_after.load(Relaxed)),
            allocate_mb_per_sec: (rate > 0.0).then_some(rate),
            crashed: self.phase() == Phase::Crashed,
        }
    }

    pub(crate) fn stats(&self) -> SimStats {
        let c = &self.counters;
        SimStats {
            ready: self.is_ready(),
            health_requests: c.health.load(Relaxed),
            completion_requests: c.completions.load(Relaxed),
            completions_ok: c.completions_ok.load(Relaxed),
            completions_failed: c.completions_failed.load(Relaxed),
            embedding_requests: c.embeddings.load(Relaxed),
            models_requests: c.models.load(Relaxed),
            metrics_requests: c.metrics.load(Relaxed),
            other_requests: c.other.load(Relaxed),
            connections_accepted: c.connections.load(Relaxed),
            allocated_bytes: c.allocated_bytes.load(Relaxed),
        }
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves the simulator on `listener` until `shutdown` resolves (graceful:
/// the listener closes, in-flight requests get [`SimConfig::shutdown_grace`]
/// to finish) or a crash fault
/// fires (returns an error of kind `Other` whose message contains
/// "simulated crash"). Returns immediately with such an error when
/// `faults.crash_on_start` is set.
pub async fn serve(
    listener: TcpListener,
    cfg: SimConfig,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let shared = Arc::new(Shared::new(cfg)?);
    serve_shared(listener, shared, shutdown).await
}

fn crash_error() -> io::Error {
    io::Error::other("citadel-engine-sim: simulated crash")
}

async fn serve_shared(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    if shared.cfg.faults.crash_on_start {
        shared.crash("crash-on-start");
        return Err(crash_error());
    }
    // Background: announce readiness and start the memory-growth fault.
    tokio::spawn(background(shared.clone()));

    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut changes = shared.changes.subscribe();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => {
                shared.set_phase(Phase::Stopping);
                break;
            }
            r = changes.changed() => {
                if r.is_err() || !shared.running() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    shared.counters.connections.fetch_add(1, Relaxed);
                    tokio::spawn(server::serve_connection(stream, shared.clone(), done_tx.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    shared.log(format_args!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    drop(listener);
    drop(done_tx);
    if shared.phase() == Phase::Stopping {
        // Wait for connections to drain (each one bounds itself by the grace period).
        let grace = shared
            .cfg
            .shutdown_grace
            .saturating_add(Duration::from_millis(500));
        let _ = tokio::time::timeout(grace, done_rx.recv()).await;
        shared.set_phase(Phase::Stopped);
    }
    if shared.phase() == Phase::Crashed {
        Err(crash_error())
    } else {
        Ok(())
    }
}

async fn background(shared: Arc<Shared>) {
    let wait = shared.ready_at.saturating_duration_since(Instant::now());
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        () = shared.wait_not_running() => return,
    }
    shared.ready.store(true, Relaxed);
    shared.log(format_args!("ready (model load simulated)"));
    // Memory growth: allocate in 100 ms steps, touching every byte.
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut carry = 0.0f64;
    let mut changes = shared.changes.subscribe();
    loop {
        let rate = f64::from_bits(shared.alloc_rate_bits.load(Relaxed));
        if rate <= 0.0 || !rate.is_finite() {
            if !hoard.is_empty() {
                hoard = Vec::new();
                shared.counters.allocated_bytes.store(0, Relaxed);
            }
            // Wait for a fault change (or stop).
            if !shared.running() || changes.changed().await.is_err() {
                return;
            }
            tick.reset();
            continue;
        }
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.wait_not_running() => return,
        }
        carry += rate * 1024.0 * 1024.0 / 10.0;
        let n = carry as usize;
        carry -= n as f64;
        if n > 0 {
            // Non-zero fill so every page is really written (not lazily zeroed).
            hoard.push(vec![0xA5u8; n]);
            shared.counters.allocated_bytes.fetch_add(n as u64, Relaxed);
        }
    }
}

/// A simulator running in a tokio task (see [`spawn`]). Dropping it stops the
/// simulator abruptly (connections are closed); use [`SimHandle::shutdown`]
/// for a graceful stop.
pub struct SimHandle {
    /// The bound address (with the real port when 0 was requested).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown_tx: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl SimHandle {
    /// `http://ADDR` for building request URLs.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Applies a runtime fault change (same as `POST /sim/fault`).
    pub fn set_fault(&self, update: FaultUpdate) -> FaultState {
        self.shared.apply(&update)
    }

    pub fn faults(&self) -> FaultState {
        self.shared.fault_state()
    }

    pub fn stats(&self) -> SimStats {
        self.shared.stats()
    }

    /// Whether the simulated load time has elapsed.
    pub fn is_ready(&self) -> bool {
        self.shared.is_ready()
    }

    /// Whether the serving task has ended (shutdown or crash).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Graceful stop: closes the listener, lets in-flight requests finish
    /// (bounded), and returns the serve result (an error if it had crashed).
    pub async fn shutdown(mut self) -> io::Result<()> {
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
        self.join().await
    }

    /// Waits for the simulator to stop by itself (e.g. a crash fault) and
    /// returns the serve result.
    pub async fn wait(mut self) -> io::Result<()> {
        self.join().await
    }

    async fn join(&mut self) -> io::Result<()> {
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.shared.set_phase(Phase::Stopped);
            if let Some(task) = self.task.take() {
                task.abort();
            }
        }
    }
}

/// Binds `addr` (port 0 = ephemeral) and serves in a tokio task.
///
/// With `faults.crash_on_start` the bind succeeds and the task ends at once
/// with the crash error (see [`SimHandle::wait`]).
pub async fn spawn(cfg: SimConfig, addr: SocketAddr) -> io::Result<SimHandle> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared::new(cfg)?);
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_shared(listener, shared.clone(), async move {
        let _ = rx.await;
    }));
    Ok(SimHandle {
        addr,
        shared,
        shutdown_tx: Some(tx),
        task: Some(task),
    })
}
