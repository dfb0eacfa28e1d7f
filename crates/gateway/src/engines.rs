//! `GET /metrics/engines` (issue 14, item 2): every local engine's own
//! `/metrics` (vLLM's `vllm:*`, llama.cpp's `llamacpp:*`, the simulator's),
//! fetched on each scrape, every series labelled `citadel_model="NAME"` (and
//! `citadel_backend="URL"` when a model has several local backends), the
//! families merged so the result is one valid exposition. Engines stay on
//! loopback: one scrape target per host covers the gateway and its engines.
//!
//! Only loopback backends are scraped: a replica on another host is that
//! host's to expose (through its own gateway). An engine that does not
//! answer in time, answers with an error or with no metrics (Ollama) adds
//! nothing; the gateway's `backend_up` tells whether it is up.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};

use crate::expo::Exposition;
use crate::routes::Table;
use crate::{Shared, UpstreamClient};

/// How long one engine's `/metrics` may take.
pub const ENGINE_SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most read from one engine's `/metrics`.
pub const ENGINE_SCRAPE_LIMIT: usize = 16 << 20;

/// Whether a backend URL (`http://HOST:PORT`) is on this host's loopback.
pub fn is_loopback(base: &str) -> bool {
    let Ok(uri) = base.parse::<hyper::Uri>() else {
        return false;
    };
    match uri.host() {
        Some("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// One engine's exposition, or `None` (logged at debug level) when it
/// cannot be had.
async fn fetch(client: UpstreamClient, base: String) -> Option<Exposition> {
    let uri: hyper::Uri = format!("{base}/metrics").parse().ok()?;
    let req = hyper::Request::get(uri)
        .header("user-agent", "citadel-gateway-metrics")
        // The classic text format: every engine speaks it.
        .header("accept", "text/plain;version=0.0.4")
        .body(Full::new(Bytes::new()))
        .ok()?;
    let res = tokio::time::timeout(ENGINE_SCRAPE_TIMEOUT, async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        if resp.status() != hyper::StatusCode::OK {
            return Err(format!("answered {}", resp.status()));
        }
        Limited::new(resp.into_body(), ENGINE_SCRAPE_LIMIT)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| e.to_string())
    })
    .await;
    match res {
        Ok(Ok(body)) => Some(Exposition::parse(&String::from_utf8_lossy(&body))),
        Ok(Err(e)) => {
            tracing::debug!(backend = %base, error = %e, "engine metrics unavailable");
            None
        }
        Err(_) => {
            tracing::debug!(backend = %base, "engine metrics timed out");
            None
        }
    }
}

/// Fetches every local engine's metrics at once and merges them in the
/// order of the models.
pub async fn scrape(shared: &Arc<Shared>, table: &Table) -> Exposition {
    let mut jobs = Vec::new();
    for m in &table.models {
        let local: Vec<_> = m.backends.iter().filter(|b| is_loopback(&b.base)).collect();
        let several = local.len() > 1;
        for b in local {
            let task = tokio::spawn(fetch(shared.client.clone(), b.base.clone()));
            jobs.push((m.name.clone(), several.then(|| b.base.clone()), task));
        }
    }
    let mut all = Exposition::default();
    for (model, backend, task) in jobs {
        let Ok(Some(e)) = task.await else {
            continue;
        };
        let mut labels = vec![("citadel_model", model.as_str())];
        if let Some(b) = &backend {
            labels.push(("citadel_backend", b.as_str()));
        }
        let dropped = all.merge(e, &labels);
        if dropped > 0 {
            tracing::debug!(
                model = %model,
                dropped,
                "engine metric families left out: their names are used by another engine with another type"
            );
        }
    }
    all
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_backends() {
        use super::is_loopback;
        assert!(is_loopback("http://127.0.0.1:8001"));
        assert!(is_loopback("http://127.3.0.1:8001"));
        assert!(is_loopback("http://localhost:8001"));
        assert!(is_loopback("http://[::1]:8001"));
        assert!(!is_loopback("http://10.0.0.2:8001"));
        assert!(!is_loopback("http://gpu-2.internal:8001"));
        assert!(!is_loopback("not a url"));
    }
}
