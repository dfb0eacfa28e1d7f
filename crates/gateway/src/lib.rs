//! `citadel-gateway`: the OpenAI-compatible, health-aware API gateway.
//!
//! * `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` are routed
//!   by the body's `model` (or an alias) to the model's backends (its engine on
//!   loopback plus any replicas), balanced by fewest requests in flight;
//!   responses (SSE streams included) are passed through frame by frame.
//! * `GET /v1/models` lists the models that can serve, in OpenAI's shape.
//! * `GET /health`, `/health/ready`, `/health/models`, `/metrics`,
//!   `/metrics/engines` (the engines' own metrics, labelled by model).
//!
//! Backends are probed in the background (`gateway.probe_interval`) and ejected
//! when a connection to them fails; a request whose connection failed before
//! anything was sent is retried on another replica.
//!
//! The library runs in-process (tests) through [`start`]; the binary adds
//! systemd integration (READY/WATCHDOG/STATUS/STOPPING/RELOADING, SIGHUP
//! reload, SIGTERM drain) through [`run_service`].

mod admin;
mod auth;
mod body;
mod engines;
mod error;
mod expo;
pub mod listen;
mod metrics;
mod proxy;
mod ratelimit;
mod reqlog;
mod routes;
mod sysinfo;
mod throttle;

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

pub use auth::{ct_eq, KeySource};
pub use error::{GatewayError, StartError};

use routes::Table;

type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

/// State shared by every connection and task.
pub(crate) struct Shared {
    table: RwLock<Arc<Table>>,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) client: UpstreamClient,
    pub(crate) ids: AtomicU64,
    pub(crate) id_seed: u64,
    /// Set after the closing phase of a shutdown (SIGTERM): API requests
    /// still read are refused (503 `shutting_down`) and the probers stop.
    pub(crate) stopping: AtomicBool,
    /// Set at the start of a shutdown: every response says `Connection:
    /// close` (see [`Server::shutdown`]).
    pub(crate) closing: AtomicBool,
    pub(crate) stop_notify: Notify,
    pub(crate) status_changed: Notify,
    /// Woken after every health probe (the first probes before serving).
    pub(crate) probed: Notify,
    keys: KeySource,
    /// Failed API keys per client address (issue 12, item 4); kept across reloads.
    pub(crate) auth_failures: throttle::AuthFailures,
    /// This process's name in the hop header of forwarded requests
    /// (`Via: 1.1 citadel-ID`), so a request that comes back is refused as
    /// a loop (issue 12, item 3).
    pub(crate) instance: String,
    /// `1.1 <instance>`, the `Via` value added to forwarded requests.
    pub(crate) via: http::HeaderValue,
    /// Whether the listening socket is on loopback: otherwise `/metrics` and
    /// `/health/models` need a key (issue 12, item 5).
    pub(crate) loopback_only: bool,
    /// SIGHUP reloads completed (successful or not), and whether the last failed:
    /// on `/health`, so a client (`citadel-systemd reload`) can wait for one.
    pub(crate) reloads: AtomicU64,
    pub(crate) last_reload_failed: AtomicBool,
    /// Why the last reload was rejected (one line), shown in STATUS= until a
    /// reload succeeds.
    last_reload_error: Mutex<Option<String>>,
    /// Held while the table is replaced (a reload's commit, an admin
    /// add/remove), so that no change made meanwhile is lost.
    pub(crate) edit: Mutex<()>,
}

impl Shared {
    pub(crate) fn table(&self) -> Arc<Table> {
        match self.table.read() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
    pub(crate) fn set_table(&self, t: Table) {
        let t = Arc::new(t);
        match self.table.write() {
            Ok(mut g) => *g = t,
            Err(p) => *p.into_inner() = t,
        }
    }
    pub(crate) fn edit_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        match self.edit.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
    fn last_reload_error(&self) -> Option<String> {
        match self.last_reload_error.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
    /// Records a completed SIGHUP reload for `/health` and STATUS=. The count
    /// goes up last, so a client that sees it sees the outcome too.
    fn record_reload(&self, res: &Result<(), StartError>) {
        let err = res.as_ref().err().map(one_line_cause);
        match self.last_reload_error.lock() {
            Ok(mut g) => *g = err,
            Err(p) => *p.into_inner() = err,
        }
        self.last_reload_failed.store(res.is_err(), SeqCst);
        self.reloads.fetch_add(1, SeqCst);
    }
    /// Applies a prepared configuration: swaps the table, starts probers for
    /// new backends and stops those of removed ones. Cannot fail.
    fn commit(self: &Arc<Self>, prepared: Prepared) {
        let backends = {
            let _edit = self.edit_lock();
            // Temporary backends and drain flags of the table in use now
            // (issue 15), whatever the admin channel changed meanwhile.
            let current = self.table();
            let (table, backends) = prepared.built.commit(Some(&current));
            self.set_table(table);
            backends
        };
        for b in backends {
            routes::spawn_prober(self.clone(), b);
        }
        self.status_changed.notify_one();
    }
}

/// New settings turned into a routing table, not yet in use.
struct Prepared {
    built: routes::Built,
    models: usize,
}

/// The message of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// Runs `f`; a panic inside it (a bug in loading, validating or building the
/// table) becomes a config error naming `source`, so that a config the code
/// did not foresee is refused like any other bad config instead of taking the
/// gateway down (exit 78 at start, the old config kept on reload).
fn guarded<T>(source: &Path, f: impl FnOnce() -> Result<T, StartError>) -> Result<T, StartError> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(StartError::Config(format!(
            "{}: the configuration could not be loaded: internal error ({}); \
             this is a bug in Citadel, please report it with the config",
            source.display(),
            panic_message(&*payload)
        ))),
    }
}

/// Reads keys and builds the table from `settings`, changing nothing yet.
fn prepare(
    shared_keys: &KeySource,
    old: Option<&Table>,
    settings: &citadel_config::Settings,
) -> Result<Prepared, StartError> {
    let auth = load_auth(settings, shared_keys, old.and_then(|t| t.auth.as_deref()))?;
    let built = Table::build(settings, auth.map(Arc::new), old);
    Ok(Prepared {
        built,
        models: settings.models.len(),
    })
}

/// One line for STATUS=: the error's first line and, when the message has one,
/// its first `--> FILE:LINE:COL` location; control characters removed and
/// the length bounded (sd_notify is line-based).
fn one_line_cause(e: &StartError) -> String {
    let text = e.to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("unknown error");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let loc = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("--> "))
        .and_then(|l| l.split_whitespace().next());
    let s = match loc {
        Some(loc) if !first.contains(loc) => format!("{loc}: {first}"),
        _ => first.to_owned(),
    };
    let mut out: String = s.chars().filter(|c| !c.is_control()).take(240).collect();
    if s.chars().count() > 240 {
        out.push_str("...");
    }
    out
}

/// Idle upstream connections kept per backend (issue 11, item 3): enough for
/// the concurrency one backend sees in steady use; a burst beyond it opens
/// connections that are closed when they fall idle, instead of ~700 idle
/// ones held after a 1,000-connection burst (71 MiB RSS).
pub const POOL_MAX_IDLE_PER_HOST: usize = 64;
/// How long an idle upstream connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

fn upstream_client() -> UpstreamClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .build(conn)
}

fn id_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // splitmix64 of time and pid
    splitmix64(t ^ (u64::from(std::process::id()) << 32))
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Reads the API keys when `gateway.auth` is on (`None` when it is off).
fn load_auth(
    settings: &citadel_config::Settings,
    keys: &KeySource,
    old: Option<&auth::Auth>,
) -> Result<Option<auth::Auth>, StartError> {
    let gw = &settings.gateway;
    if !gw.auth {
        if !gw.listen.is_loopback() {
            tracing::warn!(
                listen = %gw.listen,
                "the gateway listens beyond loopback with authentication disabled (gateway.auth = false): anyone who can reach port {} can use every model",
                gw.port
            );
        }
        return Ok(None);
    }
    let path = keys.path(&gw.api_keys_file)?;
    let k = auth::read_keys(&path, &gw.api_keys_file)?;
    tracing::info!(keys = k.len(), "API keys loaded");
    Ok(Some(auth::Auth::reloaded(
        old,
        k,
        gw.rate_limit_per_minute,
        gw.rate_limit_burst,
    )))
}

/// Where a shutdown is (see [`Server::shutdown`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Serving,
    /// The listener is closed; connections stay open and every response
    /// carries `Connection: close`.
    Closing,
    /// Connections still open are shut down gracefully (idle ones closed,
    /// in-flight requests and streams finish).
    Closed,
}

/// A running gateway (in-process).
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<Phase>,
    accept_task: JoinHandle<()>,
    conns_rx: mpsc::Receiver<()>,
}

/// Starts serving on `listener` with validated `settings`. Fails with
/// [`StartError::Config`] when auth is on and no keys can be read.
pub async fn start(
    settings: &citadel_config::Settings,
    keys: KeySource,
    listener: TcpListener,
) -> Result<Server, StartError> {
    let prepared = guarded(&settings.source, || prepare(&keys, None, settings))?;
    let (table, backends) = prepared.built.commit(None);
    let addr = listener.local_addr().map_err(|source| StartError::Io {
        context: "cannot read the listening address".into(),
        source,
    })?;
    let seed = id_seed();
    let instance = format!("citadel-{:016x}", splitmix64(seed ^ 0x5ca1_ab1e));
    // tidy: infallible (ASCII letters, digits, a dot and spaces)
    let via = http::HeaderValue::from_str(&format!("1.1 {instance}")).expect("a valid Via value");
    let shared = Arc::new(Shared {
        table: RwLock::new(Arc::new(table)),
        metrics: metrics::Metrics::new(),
        client: upstream_client(),
        ids: AtomicU64::new(0),
        id_seed: seed,
        auth_failures: throttle::AuthFailures::new(),
        // Not the request ids' seed (clients see those): a second mix of it.
        instance: instance.clone(),
        via,
        loopback_only: addr.ip().is_loopback(),
        stopping: AtomicBool::new(false),
        closing: AtomicBool::new(false),
        stop_notify: Notify::new(),
        status_changed: Notify::new(),
        probed: Notify::new(),
        keys,
        reloads: AtomicU64::new(0),
        last_reload_failed: AtomicBool::new(false),
        last_reload_error: Mutex::new(None),
        edit: Mutex::new(()),
    });
    for b in backends {
        routes::spawn_prober(shared.clone(), b);
    }
    first_probes(&shared, FIRST_PROBE_DEADLINE).await;
    let (shutdown_tx, shutdown_rx) = watch::channel(Phase::Serving);
    let (conns_tx, conns_rx) = mpsc::channel::<()>(1);
    let accept_task = tokio::spawn(accept_loop(shared.clone(), listener, shutdown_rx, conns_tx));
    Ok(Server {
        addr,
        shared,
        shutdown_tx,
        accept_task,
        conns_rx,
    })
}

/// How long [`start`] waits for the first probe of every backend before it
/// serves anyway (the backends not heard from yet count as down).
pub const FIRST_PROBE_DEADLINE: Duration = Duration::from_secs(2);

/// Waits until every backend has been probed once, at most `deadline`
/// (issue 11, item 5: a restarted gateway answered 503 model_not_ready for
/// serving models until its first probes ran; 25 failed requests per
/// restart). Until the accept loop runs, clients wait in the socket's
/// backlog, which systemd keeps across restarts.
async fn first_probes(shared: &Shared, deadline: Duration) {
    let started = std::time::Instant::now();
    let all_probed = || {
        shared
            .table()
            .models
            .iter()
            .flat_map(|m| m.backends.iter())
            .all(|b| b.health() != routes::Health::Unknown)
    };
    let wait = async {
        loop {
            let probed = shared.probed.notified();
            let mut probed = std::pin::pin!(probed);
            probed.as_mut().enable();
            if all_probed() {
                return;
            }
            probed.await;
        }
    };
    let complete = tokio::time::timeout(deadline, wait).await.is_ok();
    let (ready, total) = shared.table().ready_count();
    tracing::info!(
        ready,
        total,
        complete,
        probe_ms = started.elapsed().as_millis() as u64,
        "first health probes {}: {ready}/{total} models ready",
        if complete {
            "done"
        } else {
            "incomplete at the deadline"
        }
    );
}

fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// STATUS=: what serves, and while the last reload was rejected, that the
/// previous configuration is still in use and why.
fn status_line(shared: &Shared) -> String {
    let (ready, total) = shared.table().ready_count();
    match shared.last_reload_error() {
        None => format!("serving {ready}/{total} models"),
        Some(cause) => format!(
            "serving {ready}/{total} models; reload rejected, still using the previous configuration: {cause}"
        ),
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut shutdown_rx: watch::Receiver<Phase>,
    conns_tx: mpsc::Sender<()>,
) {
    let watchdog = sd_notify::watchdog_enabled();
    let mut wd_tick = tokio::time::interval(
        watchdog
            .map(|d| d / 2)
            .unwrap_or(Duration::from_secs(3600))
            .max(Duration::from_millis(100)),
    );
    wd_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = String::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown_rx.changed() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve_conn(shared.clone(), stream, peer.ip(), shutdown_rx.clone(), conns_tx.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = wd_tick.tick(), if watchdog.is_some() => notify(&[sd_notify::NotifyState::Watchdog]),
            _ = shared.status_changed.notified() => {
                let s = status_line(&shared);
                if s != last_status {
                    tracing::info!(availability = %s, "model availability changed: {s}");
                    notify(&[sd_notify::NotifyState::Status(&s)]);
                    last_status = s;
                }
            }
        }
    }
}

async fn serve_conn(
    shared: Arc<Shared>,
    stream: tokio::net::TcpStream,
    peer: std::net::IpAddr,
    mut shutdown_rx: watch::Receiver<Phase>,
    _guard: mpsc::Sender<()>,
) {
    let header_timeout = shared.table().gateway.header_timeout.duration();
    let svc_shared = shared.clone();
    let svc = hyper::service::service_fn(move |req| proxy::handle(svc_shared.clone(), peer, req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = async { let _ = shutdown_rx.wait_for(|p| *p == Phase::Closed).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

impl Server {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves the admin channel (issue 15: drain, admit, temporary
    /// backends; see the `admin` module) on `listener` until the shutdown
    /// closes connections. Needs a tokio runtime.
    pub fn serve_admin(&self, listener: tokio::net::UnixListener) {
        tokio::spawn(admin::serve(
            self.shared.clone(),
            listener,
            self.shutdown_tx.subscribe(),
        ));
    }

    /// `(ready, total)` models.
    pub fn ready_count(&self) -> (usize, usize) {
        self.shared.table().ready_count()
    }

    /// `serving N/M models`.
    pub fn status(&self) -> String {
        status_line(&self.shared)
    }

    /// Applies new settings (models, replicas, aliases, keys, limits) without
    /// dropping connections. On error (a panic included) the old configuration
    /// stays, untouched.
    pub fn reload(&self, settings: &citadel_config::Settings) -> Result<(), StartError> {
        let old = self.shared.table();
        let prepared = guarded(&settings.source, || {
            prepare(&self.shared.keys, Some(&old), settings)
        })?;
        self.apply(&old, &settings.gateway, prepared);
        Ok(())
    }

    fn apply(&self, old: &Table, new: &citadel_config::Gateway, prepared: Prepared) {
        if old.gateway.listen != new.listen || old.gateway.port != new.port {
            tracing::warn!(
                "gateway.listen/gateway.port changed: a restart is needed to apply them"
            );
        }
        let models = prepared.models;
        self.shared.commit(prepared);
        tracing::info!(models, "configuration reloaded");
    }

    /// The SIGHUP reload: loads and validates `config` and builds the new
    /// table off the async workers; whatever goes wrong (unreadable file,
    /// syntax or validation error, missing keys, a panic in any of it) leaves
    /// the old configuration serving. The outcome is counted on `/health`
    /// and, while the last reload was rejected, shown in [`Server::status`].
    pub async fn reload_from(&self, config: &Path) -> Result<(), StartError> {
        let old = self.shared.table();
        let shared = self.shared.clone();
        let path = config.to_owned();
        let old2 = old.clone();
        let task = tokio::task::spawn_blocking(move || {
            guarded(&path, || {
                let settings = load_config(&path)?;
                let prepared = prepare(&shared.keys, Some(&old2), &settings)?;
                Ok((settings.gateway, prepared))
            })
        });
        let res = match task.await {
            Ok(Ok((gateway, prepared))) => {
                self.apply(&old, &gateway, prepared);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(StartError::Config(format!(
                "{}: the reload did not complete: {e}",
                config.display()
            ))),
        };
        self.shared.record_reload(&res);
        self.shared.status_changed.notify_one();
        res
    }

    /// Stops accepting, lets in-flight requests and streams finish up to
    /// `deadline`, then returns whether everything finished in time.
    ///
    /// In two phases (issue 11: 2 of 2,400 kept-alive requests failed across
    /// a restart). Closing the idle keep-alive connections at once raced with
    /// clients that had just sent their next request on one: they got an
    /// empty reply or a reset. So first the listener closes (under systemd
    /// the socket stays with PID 1 and new connections wait in its backlog
    /// for the next process) and, for [`CLOSING_PHASE`] (at most `deadline`)
    /// or until every connection has gone, each response carries
    /// `Connection: close`: a client gets one more full answer on its
    /// connection and closes it itself. Only then are the connections still
    /// open (idle ones, and those with a request or stream in flight, which
    /// finish) shut down gracefully.
    pub async fn shutdown(mut self, deadline: Duration) -> bool {
        let started = tokio::time::Instant::now();
        self.shared.closing.store(true, SeqCst);
        let _ = self.shutdown_tx.send(Phase::Closing);
        // The accept loop ends and drops the listener.
        let _ = (&mut self.accept_task).await;
        let all_closed = tokio::time::timeout(CLOSING_PHASE.min(deadline), self.conns_rx.recv())
            .await
            .is_ok();
        self.shared.stopping.store(true, Relaxed);
        self.shared.stop_notify.notify_waiters();
        let _ = self.shutdown_tx.send(Phase::Closed);
        let drained = all_closed
            || tokio::time::timeout_at(started + deadline, self.conns_rx.recv())
                .await
                .is_ok();
        if !drained {
            tracing::warn!(
                ?deadline,
                "drain deadline reached; closing remaining connections"
            );
        }
        drained
    }
}

/// How long a shutdown answers every request with `Connection: close` before
/// it closes the connections left idle (see [`Server::shutdown`]): clients
/// sending back to back get their last answer within it.
pub const CLOSING_PHASE: Duration = Duration::from_secs(1);

/// How the binary is started.
#[derive(Debug)]
pub struct ServiceOptions {
    pub config: PathBuf,
    pub keys: KeySource,
    /// Overrides `gateway.listen`/`gateway.port` (development and tests; port 0 = ephemeral).
    pub listen: Option<SocketAddr>,
    /// The socket systemd passed ([`listen::from_systemd`]); used unless
    /// `listen` is set. Without either, the gateway binds the configured address.
    pub inherited: Option<std::net::TcpListener>,
    /// The admin channel's socket from systemd (`citadel-gateway-admin.socket`).
    pub admin: Option<std::os::unix::net::UnixListener>,
    /// Binds the admin channel here (0600) instead (`--admin-socket`).
    pub admin_socket: Option<PathBuf>,
}

/// Loads and validates the config file; every error names the file.
fn load_config(path: &Path) -> Result<citadel_config::Settings, StartError> {
    match citadel_config::load(path) {
        Ok(l) => {
            if !l.report.is_empty() {
                tracing::warn!("{}", l.report);
            }
            Ok(l.settings)
        }
        Err(e) => {
            let msg = e.to_string();
            let shown = path.display().to_string();
            Err(StartError::Config(if msg.contains(&shown) {
                msg
            } else {
                format!("{shown}: {msg}")
            }))
        }
    }
}

/// The service: loads the config, serves, reloads on SIGHUP and drains on
/// SIGTERM/SIGINT, talking to systemd all along.
pub async fn run_service(opts: ServiceOptions) -> Result<(), StartError> {
    use sd_notify::NotifyState;
    use tokio::signal::unix::{signal, SignalKind};

    let io = |context: &str| {
        let context = context.to_owned();
        move |source| StartError::Io { context, source }
    };
    let settings = guarded(&opts.config, || load_config(&opts.config))?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(io("cannot handle SIGTERM"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(io("cannot handle SIGINT"))?;
    let mut sighup = signal(SignalKind::hangup()).map_err(io("cannot handle SIGHUP"))?;
    let (listener, from_systemd) = match (opts.listen, opts.inherited) {
        (None, Some(inherited)) => {
            inherited
                .set_nonblocking(true)
                .map_err(io("cannot use the socket from systemd"))?;
            let l = TcpListener::from_std(inherited)
                .map_err(io("cannot use the socket from systemd"))?;
            (l, true)
        }
        (listen, _) => {
            let addr = listen.unwrap_or_else(|| {
                SocketAddr::new(settings.gateway.listen, settings.gateway.port.get())
            });
            let l = listen::bind(addr, settings.gateway.listen_backlog)
                .map_err(io(&format!("cannot listen on {addr}")))?;
            (l, false)
        }
    };
    let admin = match (opts.admin_socket.as_deref(), opts.admin) {
        (Some(path), _) => Some((
            listen::bind_admin(path).map_err(io(&format!(
                "cannot bind the admin socket {}",
                path.display()
            )))?,
            path.display().to_string(),
        )),
        (None, Some(l)) => Some((l, "from systemd".to_owned())),
        (None, None) => None,
    };
    let server = start(&settings, opts.keys.clone(), listener).await?;
    if let Some((l, from)) = admin {
        l.set_nonblocking(true)
            .map_err(io("cannot use the admin socket"))?;
        let l = tokio::net::UnixListener::from_std(l).map_err(io("cannot use the admin socket"))?;
        tracing::info!(admin = %from, "admin channel on the Unix socket ({from})");
        server.serve_admin(l);
    }
    tracing::info!(
        listen = %server.addr(),
        auth = settings.gateway.auth,
        models = settings.models.len(),
        "listening on {}{}",
        server.addr(),
        if from_systemd { " (socket from systemd)" } else { "" }
    );
    let status = server.status();
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                let now = sd_notify::NotifyState::monotonic_usec_now();
                match now {
                    Ok(m) => notify(&[NotifyState::Reloading, m]),
                    Err(_) => notify(&[NotifyState::Reloading]),
                }
                tracing::info!(config = %opts.config.display(), "SIGHUP: reloading configuration");
                if let Err(e) = server.reload_from(&opts.config).await {
                    tracing::error!(
                        config = %opts.config.display(),
                        "reload failed: the new configuration of {} was rejected; still serving the previous configuration\n{e}",
                        opts.config.display()
                    );
                }
                let status = server.status();
                notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
            }
        }
    }
    let deadline = server.shared.table().gateway.drain_timeout.duration();
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    tracing::info!(
        ?deadline,
        "stopping: listener closed; answering with `Connection: close` for up to {:?}, then draining in-flight requests",
        CLOSING_PHASE.min(deadline)
    );
    let drained = server.shutdown(deadline).await;
    tracing::info!(drained, "stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 9, finding 3 (defence in depth): a panic while loading or
    /// validating a config is a config error naming the file (exit 78 at
    /// start, the old config kept on reload), never a dead gateway.
    #[test]
    fn issue9_config_panic_is_a_config_error_naming_the_file() {
        let r: Result<(), StartError> = guarded(Path::new("/etc/citadel.toml"), || {
            panic!("cannot convert float seconds to Duration")
        });
        let e = r.unwrap_err();
        assert_eq!(e.exit_code(), StartError::EXIT_CONFIG);
        let msg = e.to_string();
        assert!(msg.starts_with("/etc/citadel.toml: "), "{msg}");
        assert!(msg.contains("cannot convert float seconds"), "{msg}");
    }

    #[test]
    fn issue9_status_cause_is_one_bounded_line_with_the_location() {
        let e = StartError::Config(
            "error: invalid type\n  --> /etc/c.toml:2:8  ()\n  |\n2 | port = \"x\"\n".into(),
        );
        assert_eq!(one_line_cause(&e), "/etc/c.toml:2:8: invalid type");
        let long = StartError::Config(format!("a\u{7}b{}", "x".repeat(1000)));
        let s = one_line_cause(&long);
        assert!(s.starts_with("abxx") && s.chars().count() <= 243, "{s}");
        assert!(!s.contains('\n'));
    }
}
