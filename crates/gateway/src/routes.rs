//! The routing table: models, their aliases and their backends (replicas),
//! with health state kept per backend by background probes and passive ejection.

use std::collections::HashMap;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed,
};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::metrics::{BackendLabel, Metrics, ModelMetrics};
use crate::Shared;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Not probed yet.
    Unknown = 0,
    Ready = 1,
    /// The health endpoint answers, but not 200 (e.g. 503 while loading).
    Loading = 2,
    /// Connection failed or timed out.
    Down = 3,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            1 => Health::Ready,
            2 => Health::Loading,
            3 => Health::Down,
            _ => Health::Unknown,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown | Health::Down => "down",
            Health::Ready => "ready",
            Health::Loading => "loading",
        }
    }
}

/// One upstream serving a model.
pub struct Backend {
    pub model: String,
    /// `http://host:port` without a trailing slash.
    pub base: String,
    pub health_path: String,
    state: AtomicU8,
    pub in_flight: AtomicUsize,
    last_latency_us: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Set when a reload removed this backend; its prober then stops.
    retired: AtomicBool,
    /// Failures in a row (5xx answers, timeouts, broken connections) since
    /// the last good answer: outlier detection (issue 11, item 4).
    failures: AtomicU32,
    outlier: Mutex<Outlier>,
    /// Woken whenever the backend stops being ready (a failed probe, an
    /// ejection): requests waiting for its answer move to another backend.
    pub(crate) went_down: tokio::sync::Notify,
    /// Drained through the admin channel (issue 15): no new request is routed
    /// to it; those in flight (streams included) finish. Kept across reloads.
    drained: AtomicBool,
    /// Woken when the backend is retired: its prober stops at once.
    retire_notify: tokio::sync::Notify,
    /// Added through the admin channel (`/admin/add`, a surge instance), not
    /// configured: kept across reloads while its model exists, gone on restart.
    pub temporary: bool,
}

/// One request (or stream) in flight on a backend: counted from before the
/// request is sent until the answer's body ends or is dropped, whichever way
/// the request ends (an error, a retry, a client that went away).
pub struct InFlight(Arc<Backend>);

impl InFlight {
    pub fn enter(b: &Arc<Backend>) -> InFlight {
        b.in_flight.fetch_add(1, Relaxed);
        InFlight(b.clone())
    }
}

impl std::ops::Deref for InFlight {
    type Target = Arc<Backend>;
    fn deref(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// A backend's ejections (issue 11, item 4, after Envoy's outlier detection).
#[derive(Debug, Default)]
struct Outlier {
    /// Ejected until then: probes do not readmit it before.
    until: Option<Instant>,
    /// Ejections in a row; each one lasts twice as long as the one before.
    ejections: u32,
    /// How long the last ejection lasted.
    last: Duration,
    /// When the last ejection ended (the backend was readmitted).
    readmitted: Option<Instant>,
}

/// How long ejection number `n` (0 = the first in a row) lasts: `base`
/// doubled `n` times, at most `Gateway::MAX_EJECTION` (or `base` when longer).
pub fn ejection_time(base: Duration, n: u32) -> Duration {
    let cap = base.max(citadel_config::Gateway::MAX_EJECTION.duration());
    base.checked_mul(1u32.checked_shl(n).unwrap_or(u32::MAX))
        .unwrap_or(cap)
        .min(cap)
}

impl Backend {
    pub(crate) fn new(model: &str, base: &str, health_path: &str, temporary: bool) -> Backend {
        Backend {
            model: model.to_owned(),
            base: base.trim_end_matches('/').to_owned(),
            health_path: health_path.to_owned(),
            state: AtomicU8::new(Health::Unknown as u8),
            in_flight: AtomicUsize::new(0),
            last_latency_us: AtomicU64::new(u64::MAX),
            last_error: Mutex::new(None),
            retired: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            outlier: Mutex::new(Outlier::default()),
            went_down: tokio::sync::Notify::new(),
            drained: AtomicBool::new(false),
            retire_notify: tokio::sync::Notify::new(),
            temporary,
        }
    }

    /// Stops its prober (a reload or `/admin/remove` dropped it).
    pub(crate) fn retire(&self) {
        self.retired.store(true, Relaxed);
        // notify_one keeps a permit: a prober not waiting yet stops too.
        self.retire_notify.notify_one();
    }

    /// Whether new requests may be routed here: ready and not drained.
    pub fn routable(&self) -> bool {
        self.health() == Health::Ready && !self.is_drained()
    }

    pub fn is_drained(&self) -> bool {
        self.drained.load(Relaxed)
    }

    /// Drains (`true`) or admits (`false`) the backend; returns whether that
    /// changed anything.
    pub fn set_drained(&self, on: bool) -> bool {
        let was = self.drained.swap(on, Relaxed);
        if was != on {
            tracing::info!(
                model = %self.model,
                backend = %self.base,
                drained = on,
                "backend {}: model {} at {}",
                if on { "drained (no new requests; those in flight finish)" } else { "admitted again" },
                self.model,
                self.base
            );
        }
        was != on
    }

    /// Whether an outlier ejection runs now.
    pub fn is_ejected(&self) -> bool {
        self.outlier().until.is_some_and(|u| Instant::now() < u)
    }

    /// The backend as the admin channel shows it (issue 15).
    pub fn admin_json(&self) -> serde_json::Value {
        let health = if self.is_ejected() {
            "ejected"
        } else {
            self.health().as_str()
        };
        serde_json::json!({
            "url": self.base,
            "health": health,
            "drained": self.is_drained(),
            "in_flight": self.in_flight.load(Relaxed),
            "temporary": self.temporary,
        })
    }

    fn outlier(&self) -> std::sync::MutexGuard<'_, Outlier> {
        match self.outlier.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A good answer (anything but a 5xx): the failure streak ends.
    pub fn succeeded(&self) {
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
    }

    /// A failed request (a 5xx answer, a timeout, a broken connection):
    /// after `gateway.outlier_failures` in a row the backend is ejected for
    /// an exponential back-off, whatever its health check says. Returns
    /// whether this failure ejected it.
    pub fn failed(&self, metrics: &Metrics, gw: &citadel_config::Gateway, why: &str) -> bool {
        let n = self.failures.fetch_add(1, Relaxed) + 1;
        if n < gw.outlier_failures {
            return false;
        }
        let now = Instant::now();
        let time = {
            let mut o = self.outlier();
            if o.until.is_some_and(|u| u > now) {
                return false;
            }
            // Healthy for longer than twice its last ejection: start over.
            if o.readmitted
                .is_some_and(|r| now.duration_since(r) > o.last * 2)
            {
                o.ejections = 0;
            }
            let time = ejection_time(gw.outlier_ejection.duration(), o.ejections);
            o.ejections = o.ejections.saturating_add(1);
            o.last = time;
            o.until = Some(now + time);
            time
        };
        self.failures.store(0, Relaxed);
        tracing::warn!(
            model = %self.model,
            backend = %self.base,
            failures = n,
            ejected_ms = time.as_millis() as u64,
            "backend ejected: model {} at {} failed {n} requests in a row ({why}); left out for {time:?} although its health check may pass",
            self.model,
            self.base
        );
        self.set(
            metrics,
            Health::Down,
            Some(format!(
                "ejected for {time:?} after {n} failed requests in a row (last: {why})"
            )),
        );
        true
    }

    /// A passed health check: ready, unless an ejection still runs.
    fn probe_passed(&self, metrics: &Metrics) {
        {
            let mut o = self.outlier();
            if let Some(until) = o.until {
                if Instant::now() < until {
                    return;
                }
                o.until = None;
                o.readmitted = Some(Instant::now());
                tracing::info!(
                    model = %self.model,
                    backend = %self.base,
                    "backend readmitted: model {} at {} passed its health check after its ejection",
                    self.model,
                    self.base
                );
            }
        }
        self.failures.store(0, Relaxed);
        self.set(metrics, Health::Ready, None);
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.state.load(Relaxed))
    }

    fn set(&self, metrics: &Metrics, h: Health, err: Option<String>) {
        let old = Health::from_u8(self.state.swap(h as u8, Relaxed));
        if let Ok(mut e) = self.last_error.lock() {
            if err.is_some() || h == Health::Ready {
                *e = err;
            }
        }
        metrics
            .backend_up
            .get_or_create(&BackendLabel {
                model: self.model.clone(),
                backend: self.base.clone(),
            })
            .set(i64::from(h == Health::Ready));
        if h != Health::Ready {
            self.went_down.notify_waiters();
        }
        if old != h {
            match h {
                Health::Ready => {
                    tracing::info!(model = %self.model, backend = %self.base, "backend ready: model {} at {}", self.model, self.base)
                }
                _ => {
                    tracing::warn!(model = %self.model, backend = %self.base, state = h.as_str(), "backend not serving: model {} at {} is {}", self.model, self.base, h.as_str())
                }
            }
        }
    }

    /// Passive ejection after a failed connection; the next good probe restores it.
    pub fn eject(&self, metrics: &Metrics, err: String) {
        self.set(metrics, Health::Down, Some(err));
    }

    pub fn status_json(&self) -> serde_json::Value {
        let lat = self.last_latency_us.load(Relaxed);
        serde_json::json!({
            "url": self.base,
            "state": self.health().as_str(),
            "in_flight": self.in_flight.load(Relaxed),
            "drained": self.is_drained(),
            "temporary": self.temporary,
            "last_probe_latency_ms": (lat != u64::MAX).then(|| lat as f64 / 1000.0),
            "last_error": self.last_error.lock().ok().and_then(|e| e.clone()),
        })
    }
}

pub struct ModelRoute {
    pub name: String,
    pub aliases: Vec<String>,
    pub backends: Vec<Arc<Backend>>,
    rr: AtomicUsize,
    /// The model's metric handles, resolved at its first request.
    metrics: OnceLock<Arc<ModelMetrics>>,
}

impl ModelRoute {
    fn new(
        name: String,
        aliases: Vec<String>,
        backends: Vec<Arc<Backend>>,
        metrics: OnceLock<Arc<ModelMetrics>>,
    ) -> ModelRoute {
        ModelRoute {
            name,
            aliases,
            backends,
            rr: AtomicUsize::new(0),
            metrics,
        }
    }

    /// The same model with other backends (the admin channel's add/remove).
    pub fn with_backends(&self, backends: Vec<Arc<Backend>>) -> ModelRoute {
        ModelRoute::new(
            self.name.clone(),
            self.aliases.clone(),
            backends,
            self.metrics.clone(),
        )
    }

    /// The model's metric handles (looked up once per routing table).
    pub fn metrics(&self, m: &Metrics) -> &Arc<ModelMetrics> {
        self.metrics.get_or_init(|| Arc::new(m.model(&self.name)))
    }

    /// Ready when a backend can take new requests (ready and not drained):
    /// a model whose backends are all drained or down answers 503.
    pub fn health(&self) -> Health {
        let mut best = Health::Down;
        for b in &self.backends {
            match b.health() {
                Health::Ready if !b.is_drained() => return Health::Ready,
                Health::Loading => best = Health::Loading,
                _ => {}
            }
        }
        best
    }

    /// The ready backend with the fewest requests in flight (ties rotate),
    /// skipping drained ones and those in `tried`.
    pub fn pick(&self, tried: &[usize]) -> Option<(usize, &Arc<Backend>)> {
        let n = self.backends.len();
        let start = if n > 1 {
            self.rr.fetch_add(1, Relaxed) % n
        } else {
            0
        };
        let mut best: Option<(usize, usize)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if tried.contains(&i) {
                continue;
            }
            let b = &self.backends[i];
            if !b.routable() {
                continue;
            }
            let load = b.in_flight.load(Relaxed);
            if best.is_none_or(|(_, l)| load < l) {
                best = Some((i, load));
            }
        }
        best.map(|(i, _)| (i, &self.backends[i]))
    }
}

/// A table built from new settings, not yet in use.
pub struct Built {
    pub table: Table,
    /// Backends the old table did not have: they need a prober.
    pub new_backends: Vec<Arc<Backend>>,
    /// Backends of the old table that the new one drops.
    pub retired: Vec<Arc<Backend>>,
}

impl Built {
    /// Retires the dropped backends (their probers stop) and returns the
    /// table and the backends that need a prober.
    ///
    /// `current` is the table in use at this moment (the caller holds the
    /// edit lock, so no admin change runs meanwhile): its temporary backends
    /// are carried over to the models that still exist, unless the new
    /// config names their URL itself, and a drained backend stays drained
    /// even when the new table made a new one for its URL (issue 15).
    pub fn commit(mut self, current: Option<&Table>) -> (Table, Vec<Arc<Backend>>) {
        if let Some(cur) = current {
            let mut changed = false;
            for route in &mut self.table.models {
                let Some(old) = cur.models.iter().find(|m| m.name == route.name) else {
                    continue;
                };
                for b in &route.backends {
                    if self.new_backends.iter().any(|n| Arc::ptr_eq(n, b))
                        && old
                            .backends
                            .iter()
                            .any(|o| o.base == b.base && o.is_drained())
                    {
                        b.drained.store(true, Relaxed);
                    }
                }
                let temps: Vec<Arc<Backend>> = old
                    .backends
                    .iter()
                    .filter(|o| o.temporary && route.backends.iter().all(|b| b.base != o.base))
                    .cloned()
                    .collect();
                if !temps.is_empty() {
                    let mut backends = route.backends.clone();
                    backends.extend(temps);
                    *route = Arc::new(route.with_backends(backends));
                    changed = true;
                }
            }
            let kept: Vec<&Arc<Backend>> = self
                .table
                .models
                .iter()
                .flat_map(|m| m.backends.iter())
                .collect();
            for m in &cur.models {
                for b in m.backends.iter().filter(|b| b.temporary) {
                    if !kept.iter().any(|k| Arc::ptr_eq(k, b)) {
                        self.retired.push(b.clone());
                    }
                }
            }
            if changed {
                self.table.by_name = index(&self.table.models);
            }
        }
        for b in &self.retired {
            b.retire();
        }
        (self.table, self.new_backends)
    }
}

/// Names and aliases to their model: a name always wins over another
/// model's alias, the first model wins an alias.
fn index(models: &[Arc<ModelRoute>]) -> HashMap<String, Arc<ModelRoute>> {
    let mut by_name = HashMap::new();
    for route in models {
        for a in &route.aliases {
            by_name.entry(a.clone()).or_insert_with(|| route.clone());
        }
        by_name.insert(route.name.clone(), route.clone());
    }
    by_name
}

/// Everything a reload replaces.
pub struct Table {
    pub gateway: citadel_config::Gateway,
    pub models: Vec<Arc<ModelRoute>>,
    pub by_name: HashMap<String, Arc<ModelRoute>>,
    pub auth: Option<Arc<crate::auth::Auth>>,
}

impl Table {
    /// Builds the table, reusing backends (and their health and in-flight
    /// state) from `old` when a model keeps the same URL and health path.
    /// Changes nothing: the caller applies the result with [`Built::commit`]
    /// only once the whole reload succeeded.
    pub fn build(
        settings: &citadel_config::Settings,
        auth: Option<Arc<crate::auth::Auth>>,
        old: Option<&Table>,
    ) -> Built {
        let mut existing: HashMap<(String, String, String), Arc<Backend>> = HashMap::new();
        if let Some(old) = old {
            for m in &old.models {
                // Temporary backends are carried over by `Built::commit`.
                for b in m.backends.iter().filter(|b| !b.temporary) {
                    existing.insert(
                        (b.model.clone(), b.base.clone(), b.health_path.clone()),
                        b.clone(),
                    );
                }
            }
        }
        let mut new_backends = Vec::new();
        let mut models = Vec::new();
        for m in &settings.models {
            let name = m.name.as_str().to_owned();
            // Every local instance (issue 15), then the replicas.
            let mut urls = m.local_urls();
            urls.extend(m.replicas.iter().cloned());
            let mut backends = Vec::new();
            for u in urls {
                let u = u.trim_end_matches('/').to_owned();
                if backends.iter().any(|b: &Arc<Backend>| b.base == u) {
                    continue;
                }
                let key = (name.clone(), u.clone(), m.health_path.clone());
                let b = match existing.remove(&key) {
                    Some(b) => b,
                    None => {
                        let b = Arc::new(Backend::new(&name, &u, &m.health_path, false));
                        new_backends.push(b.clone());
                        b
                    }
                };
                backends.push(b);
            }
            models.push(Arc::new(ModelRoute::new(
                name,
                m.aliases.clone(),
                backends,
                OnceLock::new(),
            )));
        }
        Built {
            table: Table {
                gateway: settings.gateway.clone(),
                by_name: index(&models),
                models,
                auth,
            },
            new_backends,
            retired: existing.into_values().collect(),
        }
    }

    /// The same table with `route` in place of the model of its name (the
    /// admin channel's add/remove).
    pub fn with_route(&self, route: ModelRoute) -> Table {
        let route = Arc::new(route);
        let models: Vec<Arc<ModelRoute>> = self
            .models
            .iter()
            .map(|m| {
                if m.name == route.name {
                    route.clone()
                } else {
                    m.clone()
                }
            })
            .collect();
        Table {
            gateway: self.gateway.clone(),
            by_name: index(&models),
            models,
            auth: self.auth.clone(),
        }
    }

    pub fn ready_count(&self) -> (usize, usize) {
        let ready = self
            .models
            .iter()
            .filter(|m| m.health() == Health::Ready)
            .count();
        (ready, self.models.len())
    }
}

/// The URL a backend's health check asks.
fn probe_uri(b: &Backend) -> Result<hyper::Uri, String> {
    format!("{}{}", b.base, b.health_path)
        .parse()
        .map_err(|e| format!("bad backend URL: {e}"))
}

/// One health check of `b`: its state, latency and error are updated, the
/// model metrics and STATUS= told.
pub async fn probe_once(shared: &Shared, b: &Backend) {
    let uri = match probe_uri(b) {
        Ok(u) => u,
        Err(e) => {
            b.set(&shared.metrics, Health::Down, Some(e));
            return;
        }
    };
    let interval = shared.table().gateway.probe_interval.duration();
    let timeout = interval.clamp(Duration::from_millis(500), Duration::from_secs(5));
    let t0 = Instant::now();
    let req = hyper::Request::get(uri)
        .header("user-agent", "citadel-gateway-probe")
        .body(Full::new(Bytes::new()))
        // tidy: infallible (a parsed Uri, a static method and header)
        .expect("valid probe request");
    let res = tokio::time::timeout(timeout, async {
        let resp = shared.client.request(req).await?;
        let status = resp.status();
        // Drain so the connection can be reused.
        let _ = resp.into_body().collect().await;
        Ok::<_, hyper_util::client::legacy::Error>(status)
    })
    .await;
    let lat = t0.elapsed();
    match res {
        Ok(Ok(s)) if s == hyper::StatusCode::OK => {
            b.last_latency_us.store(lat.as_micros() as u64, Relaxed);
            b.probe_passed(&shared.metrics)
        }
        Ok(Ok(s)) => {
            b.last_latency_us.store(lat.as_micros() as u64, Relaxed);
            b.set(
                &shared.metrics,
                Health::Loading,
                Some(format!("health check answered {s}")),
            )
        }
        Ok(Err(e)) => b.set(
            &shared.metrics,
            Health::Down,
            Some(crate::proxy::err_chain(&e)),
        ),
        Err(_) => b.set(
            &shared.metrics,
            Health::Down,
            Some(format!("health check timed out after {timeout:?}")),
        ),
    }
    shared.metrics.observe_models(&shared.table());
    shared.status_changed.notify_one();
    shared.probed.notify_waiters();
}

/// Probes one backend every `probe_interval` until it is retired or the gateway stops.
pub fn spawn_prober(shared: Arc<Shared>, b: Arc<Backend>) {
    tokio::spawn(async move {
        if let Err(e) = probe_uri(&b) {
            b.set(&shared.metrics, Health::Down, Some(e));
            return;
        }
        loop {
            if b.retired.load(Relaxed) || shared.stopping.load(Relaxed) {
                return;
            }
            probe_once(&shared, &b).await;
            let interval = shared.table().gateway.probe_interval.duration();
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shared.stop_notify.notified() => {}
                _ = b.retire_notify.notified() => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::ejection_time;
    use std::time::Duration;

    /// Issue 11, item 4: ejections double, capped at 5 min (or the base).
    #[test]
    fn issue11_ejection_back_off_doubles_and_is_capped() {
        let s = Duration::from_secs;
        let got: Vec<_> = (0..7).map(|n| ejection_time(s(10), n)).collect();
        assert_eq!(got, [s(10), s(20), s(40), s(80), s(160), s(300), s(300)]);
        assert_eq!(ejection_time(s(10), u32::MAX), s(300));
        assert_eq!(ejection_time(s(600), 3), s(600));
        assert_eq!(
            ejection_time(Duration::from_millis(100), 0),
            Duration::from_millis(100)
        );
    }
}
