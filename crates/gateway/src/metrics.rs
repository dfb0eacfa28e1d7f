//! Prometheus metrics (`GET /metrics`): the gateway's own families
//! (`citadel_gateway_*`), the standard `process_*` figures and, read on each
//! scrape, model readiness and the model units' memory. Served as
//! OpenMetrics or the Prometheus text format (see [`crate::expo`]).
//!
//! The request path touches only pre-resolved handles: each model's
//! counters and histograms are looked up once per routing table
//! ([`ModelMetrics`]), and label values are shared strings ([`Name`]), so
//! counting a request allocates nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::expo::{Exposition, Format};
use crate::routes::{Health, Table};

/// A label value shared by reference count (model and key names): cloning
/// one into a label set allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(pub Arc<str>);

impl Name {
    pub fn new(s: &str) -> Name {
        Name(Arc::from(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(&self.0)
    }
}

/// The `model` label of a request that named a model the gateway does not
/// know: client-supplied names never become label values (unbounded
/// cardinality would be a denial of service on the registry).
pub const UNKNOWN_MODEL: &str = "unknown";
/// The `key` label when `gateway.auth` is off.
pub const KEY_NONE: &str = "none";
/// The `key` label of a request refused before a key was verified (missing
/// or invalid key, its address throttled, a loop, draining).
pub const KEY_UNAUTHENTICATED: &str = "unauthenticated";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelStatus {
    pub model: Name,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub model: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabel {
    pub key: Name,
    pub model: Name,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: &'static str,
    commit: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_buckets() -> Histogram {
    // 1 ms .. ~8.7 min
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 20,
    ))
}

fn overhead_buckets() -> Histogram {
    // 10 us .. ~80 ms
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_01, 2.0, 14,
    ))
}

fn ttft_buckets() -> Histogram {
    // 5 ms .. ~82 s: a first token comes after the prompt's prefill.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.005, 2.0, 15,
    ))
}

fn itl_buckets() -> Histogram {
    // 1 ms .. ~16 s between two chunks of a stream.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 15,
    ))
}

/// One model's metric handles, resolved once per routing table.
pub struct ModelMetrics {
    pub name: Name,
    pub latency: Histogram,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
    pub in_flight: Gauge,
    pub upstream_aborted: Counter,
}

/// What the gateway remembers of a model between probes.
#[derive(Default)]
struct ModelState {
    ready: bool,
    ever_ready: bool,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<ModelStatus, Counter>,
    latency: HistogramFamily<ModelLabel>,
    pub overhead: Histogram,
    in_flight: Family<ModelLabel, Gauge>,
    pub backend_up: Family<BackendLabel, Gauge>,
    pub rate_limited: Counter,
    pub upstream_retries: Counter,
    upstream_aborted: Family<ModelLabel, Counter>,
    pub auth_failures: Counter,
    pub auth_throttled: Counter,
    pub loops_detected: Counter,
    prompt_tokens: Family<ModelLabel, Counter>,
    completion_tokens: Family<ModelLabel, Counter>,
    ttft: HistogramFamily<ModelLabel>,
    itl: HistogramFamily<ModelLabel>,
    pub key_requests: Family<KeyLabel, Counter>,
    model_ready: Family<ModelLabel, Gauge>,
    unit_memory: Family<ModelLabel, Gauge>,
    unit_memory_max: Family<ModelLabel, Gauge>,
    backend_restarts: Family<ModelLabel, Counter>,
    models: Mutex<HashMap<Name, ModelState>>,
    /// `/sys/fs/cgroup`.
    cgroup_root: PathBuf,
    pub unknown_model: Name,
    pub no_model: Name,
    pub key_none: Name,
    pub key_unauthenticated: Name,
}

/// The standard `process_*` metrics, read from `/proc/self` on each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = crate::sysinfo::process();
        if let Some(v) = p.cpu_seconds {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                c.metric_type(),
            )?)?;
        }
        let gauges: [(&str, &str, Option<f64>); 5] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                p.resident_bytes.map(|v| v as f64),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                p.virtual_bytes.map(|v| v as f64),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                p.open_fds.map(|v| v as f64),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                p.max_fds.map(|v| v as f64),
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                p.start_time_seconds,
            ),
        ];
        for (name, help, v) in gauges {
            if let Some(v) = v {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        Ok(())
    }
}

/// The version and commit this binary was built from: `CITADEL_VERSION`
/// (`VERSION (commit COMMIT)`, set by `packaging/build-version.rs`, the
/// same as `--version`); `unknown` where it says nothing.
pub fn build_info() -> (&'static str, &'static str) {
    let line = option_env!("CITADEL_VERSION").unwrap_or(env!("CARGO_PKG_VERSION"));
    match line.split_once(" (commit ") {
        Some((version, commit)) => (version, commit.strip_suffix(')').unwrap_or(commit)),
        None => (line, "unknown"),
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("citadel_gateway");
        let requests = Family::<ModelStatus, Counter>::default();
        let latency = HistogramFamily::<ModelLabel>::new_with_constructor(latency_buckets);
        let overhead = overhead_buckets();
        let in_flight = Family::<ModelLabel, Gauge>::default();
        let backend_up = Family::<BackendLabel, Gauge>::default();
        let rate_limited = Counter::default();
        let upstream_retries = Counter::default();
        let upstream_aborted = Family::<ModelLabel, Counter>::default();
        let auth_failures = Counter::default();
        let auth_throttled = Counter::default();
        let loops_detected = Counter::default();
        let prompt_tokens = Family::<ModelLabel, Counter>::default();
        let completion_tokens = Family::<ModelLabel, Counter>::default();
        let ttft = HistogramFamily::<ModelLabel>::new_with_constructor(ttft_buckets);
        let itl = HistogramFamily::<ModelLabel>::new_with_constructor(itl_buckets);
        let key_requests = Family::<KeyLabel, Counter>::default();
        let build = Family::<BuildLabel, Gauge>::default();
        let model_ready = Family::<ModelLabel, Gauge>::default();
        let unit_memory = Family::<ModelLabel, Gauge>::default();
        let unit_memory_max = Family::<ModelLabel, Gauge>::default();
        let backend_restarts = Family::<ModelLabel, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by model and HTTP status (model \"unknown\": a model the gateway does not serve; \"\": none named or refused before the body was read)",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to the end of the response (streams included), by model",
            latency.clone(),
        );
        registry.register(
            "overhead_seconds",
            "Time spent in the gateway itself (request handling minus waiting for the backend's response headers)",
            overhead.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Requests (and streams) in progress, by model",
            in_flight.clone(),
        );
        registry.register(
            "backend_up",
            "1 when a backend's last health probe succeeded, else 0",
            backend_up.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests rejected by the per-key rate limit",
            rate_limited.clone(),
        );
        registry.register(
            "upstream_retries",
            "Requests retried on another replica after a connection failure",
            upstream_retries.clone(),
        );
        registry.register(
            "upstream_aborted",
            "Streams the engine broke off before their end (the client got an SSE error event, no [DONE]), by model",
            upstream_aborted.clone(),
        );
        registry.register(
            "auth_failures",
            "Requests with an API key that matches none",
            auth_failures.clone(),
        );
        registry.register(
            "auth_throttled",
            "Requests refused (429) because their address sent too many invalid API keys",
            auth_throttled.clone(),
        );
        registry.register(
            "loops_detected",
            "Requests refused (508) because they had already passed through this gateway or too many",
            loops_detected.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens of answered requests, from the usage the engine reported, by model",
            prompt_tokens.clone(),
        );
        registry.register(
            "completion_tokens",
            "Completion tokens of answered requests, from the usage the engine reported, by model",
            completion_tokens.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Streams only: time from the request to the first chunk with content, by model",
            ttft.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Streams only: time between consecutive chunks with content, by model",
            itl.clone(),
        );
        registry.register(
            "key_requests",
            "Requests answered, by API key name (never the key), model and HTTP status",
            key_requests.clone(),
        );
        registry.register(
            "build_info",
            "The gateway's version and the commit it was built from (value 1)",
            build.clone(),
        );
        registry.register(
            "model_ready",
            "1 when at least one backend of the model can serve, else 0",
            model_ready.clone(),
        );
        registry.register(
            "unit_memory_bytes",
            "Memory in use by the model's unit (its cgroup), in bytes",
            unit_memory.clone(),
        );
        registry.register(
            "unit_memory_max_bytes",
            "The model unit's memory limit (MemoryMax=), in bytes; absent when unlimited",
            unit_memory_max.clone(),
        );
        registry.register(
            "backend_restarts",
            "Times the model became ready again after having been ready (restarts seen by the gateway's probes)",
            backend_restarts.clone(),
        );
        let (version, commit) = build_info();
        build.get_or_create(&BuildLabel { version, commit }).set(1);
        Metrics {
            registry: root,
            requests,
            latency,
            overhead,
            in_flight,
            backend_up,
            rate_limited,
            upstream_retries,
            upstream_aborted,
            auth_failures,
            auth_throttled,
            loops_detected,
            prompt_tokens,
            completion_tokens,
            ttft,
            itl,
            key_requests,
            model_ready,
            unit_memory,
            unit_memory_max,
            backend_restarts,
            models: Mutex::new(HashMap::new()),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            unknown_model: Name::new(UNKNOWN_MODEL),
            no_model: Name::new(""),
            key_none: Name::new(KEY_NONE),
            key_unauthenticated: Name::new(KEY_UNAUTHENTICATED),
        }
    }

    /// The handles of model `name`'s metrics (created at zero if new).
    pub fn model(&self, name: &str) -> ModelMetrics {
        let label = ModelLabel {
            model: Name::new(name),
        };
        let m = ModelMetrics {
            latency: self.latency.get_or_create(&label).clone(),
            ttft: self.ttft.get_or_create(&label).clone(),
            itl: self.itl.get_or_create(&label).clone(),
            prompt_tokens: self.prompt_tokens.get_or_create(&label).clone(),
            completion_tokens: self.completion_tokens.get_or_create(&label).clone(),
            in_flight: self.in_flight.get_or_create(&label).clone(),
            upstream_aborted: self.upstream_aborted.get_or_create(&label).clone(),
            name: label.model,
        };
        m
    }

    /// The request-duration histogram of a request with no known model.
    pub fn latency_of(&self, model: &Name) -> Histogram {
        self.latency
            .get_or_create(&ModelLabel {
                model: model.clone(),
            })
            .clone()
    }

    /// Records the models' readiness (`model_ready`) and counts a model
    /// that became ready again after having been ready (`backend_restarts`).
    /// Called after every probe and ejection, and on each scrape; models
    /// that a reload removed lose their gauges.
    pub fn observe_models(&self, table: &Table) {
        let mut states = match self.models.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for m in &table.models {
            let name = Name::new(&m.name);
            let ready = m.health() == Health::Ready;
            let label = ModelLabel {
                model: name.clone(),
            };
            let restarts = self.backend_restarts.get_or_create(&label);
            let st = states.entry(name).or_default();
            if ready && !st.ready && st.ever_ready {
                restarts.inc();
            }
            st.ready = ready;
            st.ever_ready |= ready;
            self.model_ready.get_or_create(&label).set(i64::from(ready));
        }
        states.retain(|name, _| {
            let keep = table.models.iter().any(|m| m.name == name.as_str());
            if !keep {
                let label = ModelLabel {
                    model: name.clone(),
                };
                self.model_ready.remove(&label);
                self.unit_memory.remove(&label);
                self.unit_memory_max.remove(&label);
            }
            keep
        });
    }

    /// Reads each model unit's cgroup memory (on scrape, never per request).
    fn observe_memory(&self, table: &Table) {
        for m in &table.models {
            let label = ModelLabel {
                model: Name::new(&m.name),
            };
            let unit = format!("citadel-model@{}.service", m.name);
            let (current, max) = crate::sysinfo::unit_memory(&self.cgroup_root, &unit);
            for (family, v) in [(&self.unit_memory, current), (&self.unit_memory_max, max)] {
                match v {
                    Some(v) => {
                        family
                            .get_or_create(&label)
                            .set(i64::try_from(v).unwrap_or(i64::MAX));
                    }
                    None => {
                        family.remove(&label);
                    }
                }
            }
        }
    }

    /// Everything, in `format`, as of now.
    pub fn encode(&self, table: &Table, format: Format) -> String {
        self.observe_models(table);
        self.observe_memory(table);
        let mut out = String::with_capacity(16384);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        match format {
            Format::OpenMetrics => out,
            Format::Text => Exposition::parse(&out).write(Format::Text),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
