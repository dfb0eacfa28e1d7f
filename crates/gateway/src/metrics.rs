//! Prometheus metrics (`GET /metrics`, text format).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelStatus {
    pub model: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub model: String,
    pub backend: String,
}

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

pub struct Metrics {
    registry: Registry,
    pub requests: Family<ModelStatus, Counter>,
    pub latency: Family<ModelLabel, Histogram, fn() -> Histogram>,
    pub overhead: Histogram,
    pub in_flight: Family<ModelLabel, Gauge>,
    pub backend_up: Family<BackendLabel, Gauge>,
    pub rate_limited: Counter,
    pub upstream_retries: Counter,
    pub upstream_aborted: Family<ModelLabel, Counter>,
    pub auth_failures: Counter,
    pub auth_throttled: Counter,
    pub loops_detected: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("citadel_gateway");
        let requests = Family::<ModelStatus, Counter>::default();
        let latency = Family::<ModelLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_buckets,
        );
        let overhead = overhead_buckets();
        let in_flight = Family::<ModelLabel, Gauge>::default();
        let backend_up = Family::<BackendLabel, Gauge>::default();
        let rate_limited = Counter::default();
        let upstream_retries = Counter::default();
        let upstream_aborted = Family::<ModelLabel, Counter>::default();
        let auth_failures = Counter::default();
        let auth_throttled = Counter::default();
        let loops_detected = Counter::default();
        registry.register(
            "requests",
            "Requests answered, by model and HTTP status",
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
        Metrics {
            registry,
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
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
