//! Lock-free vLLM-style metrics and their hand-written Prometheus text rendering.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Bucket bounds (seconds) as vLLM uses for time-to-first-token.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Bucket bounds (seconds) as vLLM uses for end-to-end request latency.
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
];

pub(crate) struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts; the last slot is the +Inf overflow.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let idx = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[idx].fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, model: &str) {
        let mut cumulative = 0u64;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{model_name=\"{model}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.counts[self.bounds.len()].load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{model_name=\"{model}\",le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{model_name=\"{model}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{model_name=\"{model}\"}} {cumulative}");
    }
}

/// Per served model.
pub(crate) struct ModelMetrics {
    pub(crate) running: AtomicI64,
    pub(crate) prompt_tokens: AtomicU64,
    pub(crate) generation_tokens: AtomicU64,
    pub(crate) success_length: AtomicU64,
    pub(crate) success_stop: AtomicU64,
    pub(crate) ttft: Histogram,
    pub(crate) e2e: Histogram,
}

impl ModelMetrics {
    pub(crate) fn new() -> Self {
        ModelMetrics {
            running: AtomicI64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            success_length: AtomicU64::new(0),
            success_stop: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
        }
    }
}

/// A served model: its name, its Prometheus-escaped label value, its metrics.
pub(crate) struct ModelEntry {
    pub(crate) name: String,
    pub(crate) label: String,
    /// The name as a JSON string literal (quotes included).
    pub(crate) json: String,
    pub(crate) m: ModelMetrics,
}

/// Renders Prometheus text exposition format (0.0.4) for all models.
pub(crate) fn render(entries: &[ModelEntry]) -> String {
    let models: Vec<(&str, &ModelMetrics)> =
        entries.iter().map(|e| (e.label.as_str(), &e.m)).collect();
    let models = &models[..];
    let mut out = String::with_capacity(1024 + models.len() * 4096);
    let header = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    let scalar = |out: &mut String,
                  name: &str,
                  kind: &str,
                  help: &str,
                  f: &dyn Fn(&ModelMetrics) -> String| {
        header(out, name, kind, help);
        for (model, m) in models {
            let _ = writeln!(out, "{name}{{model_name=\"{model}\"}} {}", f(m));
        }
    };
    scalar(
        &mut out,
        "vllm:num_requests_running",
        "gauge",
        "Number of requests currently running (simulated).",
        &|m| m.running.load(Relaxed).max(0).to_string(),
    );
    scalar(
        &mut out,
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed (the simulator never queues).",
        &|_| "0".to_string(),
    );
    // KV-cache use, 0 to 1, under both of vLLM's names (older releases
    // `gpu_cache_usage_perc`, newer `kv_cache_usage_perc`). Simulated: each
    // running request holds 1/32 of the cache.
    for name in ["vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"] {
        scalar(
            &mut out,
            name,
            "gauge",
            "KV-cache usage, 1 means 100 percent (simulated: running requests / 32).",
            &|m| {
                format!(
                    "{}",
                    (m.running.load(Relaxed).max(0) as f64 / 32.0).min(1.0)
                )
            },
        );
    }
    scalar(
        &mut out,
        "vllm:prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed (simulated: whitespace-separated words).",
        &|m| m.prompt_tokens.load(Relaxed).to_string(),
    );
    scalar(
        &mut out,
        "vllm:generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        &|m| m.generation_tokens.load(Relaxed).to_string(),
    );
    header(
        &mut out,
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
    );
    for (model, m) in models {
        for (reason, v) in [("length", &m.success_length), ("stop", &m.success_stop)] {
            let _ = writeln!(
                out,
                "vllm:request_success_total{{finished_reason=\"{reason}\",model_name=\"{model}\"}} {}",
                v.load(Relaxed)
            );
        }
    }
    header(
        &mut out,
        "vllm:time_to_first_token_seconds",
        "histogram",
        "Histogram of time to first token in seconds.",
    );
    for (model, m) in models {
        m.ttft
            .render(&mut out, "vllm:time_to_first_token_seconds", model);
    }
    header(
        &mut out,
        "vllm:e2e_request_latency_seconds",
        "histogram",
        "Histogram of end to end request latency in seconds.",
    );
    for (model, m) in models {
        m.e2e
            .render(&mut out, "vllm:e2e_request_latency_seconds", model);
    }
    out
}
