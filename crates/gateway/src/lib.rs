//! `citadel-gateway`: the OpenAI-compatible, health-aware API gateway.
//!
//! * `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` are routed
//!   by the body's `model` (or an alias) to the model's backends (its engine on
//!   loopback plus any replicas), balanced by fewest requests in flight;
//!   responses (SSE streams included) are passed through frame by frame.
//! * `GET /v1/models` lists the models that can serve, in OpenAI's shape.
//! * `GET /health`, `/health/ready`, `/health/models`, `/metrics`.
//!
//! Backends are probed in the background (`gateway.probe_interval`) and ejected
//! when a connection to them fails; a request whose connection failed before
//! anything was sent is retried on another replica.
//!
//! The library runs in-process (tests) through [`start`]; the binary adds
//! systemd integration (READY/WATCHDOG/STATUS/STOPPING/RELOADING, SIGHUP
//! reload, SIGTERM drain) through [`run_service`].

mod auth;
mod body;
mod error;
mod metrics;
mod proxy;
mod routes;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
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
    pub(crate) stopping: AtomicBool,
    pub(crate) stop_notify: Notify,
    pub(crate) status_changed: Notify,
    keys: KeySource,
    /// SIGHUP reloads completed (successful or not), and whether the last failed:
    /// on `/health`, so a client (`citadel-systemd reload`) can wait for one.
    pub(crate) reloads: AtomicU64,
    pub(crate) last_reload_failed: AtomicBool,
}

impl Shared {
    pub(crate) fn table(&self) -> Arc<Table> {
        match self.table.read() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
    fn set_table(&self, t: Table) {
        let t = Arc::new(t);
        match self.table.write() {
            Ok(mut g) => *g = t,
            Err(p) => *p.into_inner() = t,
        }
    }
}

fn upstream_client() -> UpstreamClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .build(conn)
}

fn id_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // splitmix64 of time and pid
    let mut z = t ^ (u64::from(std::process::id()) << 32);
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
    Ok(Some(auth::Auth::reloaded(old, k, gw.rate_limit_per_minute)))
}

/// A running gateway (in-process).
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
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
    let auth = load_auth(settings, &keys, None)?;
    let (table, backends) = Table::build(settings, auth, None);
    let addr = listener.local_addr().map_err(|source| StartError::Io {
        context: "cannot read the listening address".into(),
        source,
    })?;
    let shared = Arc::new(Shared {
        table: RwLock::new(Arc::new(table)),
        metrics: metrics::Metrics::new(),
        client: upstream_client(),
        ids: AtomicU64::new(0),
        id_seed: id_seed(),
        stopping: AtomicBool::new(false),
        stop_notify: Notify::new(),
        status_changed: Notify::new(),
        keys,
        reloads: AtomicU64::new(0),
        last_reload_failed: AtomicBool::new(false),
    });
    for b in backends {
        routes::spawn_prober(shared.clone(), b);
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
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

fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

fn status_line(shared: &Shared) -> String {
    let (ready, total) = shared.table().ready_count();
    format!("serving {ready}/{total} models")
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut shutdown_rx: watch::Receiver<bool>,
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
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve_conn(shared.clone(), stream, shutdown_rx.clone(), conns_tx.clone()));
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
                    tracing::info!(status = %s, "model availability changed");
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
    mut shutdown_rx: watch::Receiver<bool>,
    _guard: mpsc::Sender<()>,
) {
    let header_timeout = shared.table().gateway.header_timeout.duration();
    let svc_shared = shared.clone();
    let svc = hyper::service::service_fn(move |req| proxy::handle(svc_shared.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = async { let _ = shutdown_rx.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

impl Server {
    pub fn addr(&self) -> SocketAddr {
        self.addr
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
    /// dropping connections. On error the old configuration stays.
    pub fn reload(&self, settings: &citadel_config::Settings) -> Result<(), StartError> {
        let old = self.shared.table();
        if old.gateway.listen != settings.gateway.listen
            || old.gateway.port != settings.gateway.port
        {
            tracing::warn!(
                "gateway.listen/gateway.port changed: a restart is needed to apply them"
            );
        }
        let auth = load_auth(settings, &self.shared.keys, old.auth.as_ref())?;
        let (table, backends) = Table::build(settings, auth, Some(&old));
        self.shared.set_table(table);
        for b in backends {
            routes::spawn_prober(self.shared.clone(), b);
        }
        self.shared.status_changed.notify_one();
        tracing::info!(models = settings.models.len(), "configuration reloaded");
        Ok(())
    }

    /// Stops accepting, lets in-flight requests and streams finish up to
    /// `deadline`, then returns whether everything finished in time.
    pub async fn shutdown(mut self, deadline: Duration) -> bool {
        self.shared.stopping.store(true, Relaxed);
        self.shared.stop_notify.notify_waiters();
        let _ = self.shutdown_tx.send(true);
        let _ = (&mut self.accept_task).await;
        let drained = tokio::time::timeout(deadline, self.conns_rx.recv())
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

/// How the binary is started.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub config: PathBuf,
    pub keys: KeySource,
    /// Overrides `gateway.listen`/`gateway.port` (development and tests; port 0 = ephemeral).
    pub listen: Option<SocketAddr>,
}

fn load_config(path: &Path) -> Result<citadel_config::Settings, StartError> {
    match citadel_config::load(path) {
        Ok(l) => {
            if !l.report.is_empty() {
                tracing::warn!("{}", l.report);
            }
            Ok(l.settings)
        }
        Err(e) => Err(StartError::Config(e.to_string())),
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
    let settings = load_config(&opts.config)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(io("cannot handle SIGTERM"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(io("cannot handle SIGINT"))?;
    let mut sighup = signal(SignalKind::hangup()).map_err(io("cannot handle SIGHUP"))?;
    let addr = opts
        .listen
        .unwrap_or_else(|| SocketAddr::new(settings.gateway.listen, settings.gateway.port.get()));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(io(&format!("cannot listen on {addr}")))?;
    let server = start(&settings, opts.keys.clone(), listener).await?;
    tracing::info!(
        listen = %server.addr(),
        auth = settings.gateway.auth,
        models = settings.models.len(),
        "listening on {}",
        server.addr()
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
                let res = load_config(&opts.config).and_then(|s| server.reload(&s));
                if let Err(e) = &res {
                    tracing::error!(error = %e, "reload failed; keeping the previous configuration");
                }
                server.shared.last_reload_failed.store(res.is_err(), Relaxed);
                server.shared.reloads.fetch_add(1, Relaxed);
                let status = match res {
                    Ok(()) => server.status(),
                    Err(_) => format!("{} (last reload failed)", server.status()),
                };
                notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
            }
        }
    }
    let deadline = server.shared.table().gateway.drain_timeout.duration();
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    tracing::info!(?deadline, "stopping: draining in-flight requests");
    let drained = server.shutdown(deadline).await;
    tracing::info!(drained, "stopped");
    Ok(())
}
