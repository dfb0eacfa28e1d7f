//! Connection handling, routing and request handlers.

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::body::{Gen, Kind, Running, SimBody, TokenStream};
use crate::{metrics, FaultUpdate, Phase, Shared};

const MAX_BODY: usize = 4 << 20;
/// Simulated context length: larger `max_tokens` is rejected like vLLM does.
const MAX_TOKENS: u64 = 131_072;

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) async fn serve_connection(
    stream: TcpStream,
    shared: Arc<Shared>,
    _done: mpsc::Sender<()>,
) {
    let mut changes = shared.changes.subscribe();
    let svc_shared = shared.clone();
    let svc = service_fn(move |req| {
        let shared = svc_shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                match shared.phase() {
                    Phase::Running => continue,
                    Phase::Stopping => break,
                    // Abrupt stop or crash: drop the connection on the floor.
                    Phase::Stopped | Phase::Crashed => return,
                }
            }
        }
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        () = tokio::time::sleep(shared.cfg.shutdown_grace) => {}
    }
}

fn respond(status: StatusCode, ctype: HeaderValue, body: impl Into<Bytes>) -> Response<SimBody> {
    let mut resp = Response::new(SimBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, ctype);
    resp
}

fn json(status: StatusCode, v: &impl serde::Serialize) -> Response<SimBody> {
    respond(status, JSON, serde_json::to_vec(v).unwrap_or_default())
}

/// OpenAI-shaped error.
fn error(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response<SimBody> {
    json(
        status,
        &serde_json::json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
    )
}

fn bad_request(message: &str) -> Response<SimBody> {
    error(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        None,
        None,
    )
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<SimBody> {
    let path = req.uri().path();
    if let Some(sim) = path.strip_prefix("/sim/") {
        shared.counters.other.fetch_add(1, Relaxed);
        return match (req.method(), sim) {
            (&Method::POST, "fault") => sim_fault(shared, req).await,
            (&Method::GET, "stats") => json(StatusCode::OK, &shared.stats()),
            (_, "fault" | "stats") => method_not_allowed(),
            _ => not_found(),
        };
    }
    if shared.is_hung() {
        shared.wait_while_hung().await;
        if !shared.running() {
            return respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, "shutting down\n");
        }
    }
    match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/health") => health(&shared),
        (&Method::GET, "/v1/models") => {
            shared.counters.models.fetch_add(1, Relaxed);
            respond(StatusCode::OK, JSON, shared.models_json.clone())
        }
        (&Method::POST, "/v1/chat/completions") => generate(shared, req, Kind::Chat).await,
        (&Method::POST, "/v1/completions") => generate(shared, req, Kind::Completion).await,
        (&Method::POST, "/v1/embeddings") => embeddings(shared, req).await,
        (&Method::GET, "/metrics") => {
            shared.counters.metrics.fetch_add(1, Relaxed);
            respond(
                StatusCode::OK,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                metrics::render(&shared.models),
            )
        }
        (&Method::GET, "/version") => {
            shared.counters.other.fetch_add(1, Relaxed);
            json(
                StatusCode::OK,
                &serde_json::json!({"version": concat!("citadel-engine-sim-", env!("CARGO_PKG_VERSION"))}),
            )
        }
        (
            _,
            "/health"
            | "/v1/models"
            | "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/embeddings"
            | "/metrics"
            | "/version",
        ) => {
            shared.counters.other.fetch_add(1, Relaxed);
            method_not_allowed()
        }
        _ => {
            shared.counters.other.fetch_add(1, Relaxed);
            not_found()
        }
    }
}

fn not_found() -> Response<SimBody> {
    error(
        StatusCode::NOT_FOUND,
        "Not Found",
        "invalid_request_error",
        None,
        None,
    )
}

fn method_not_allowed() -> Response<SimBody> {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method Not Allowed",
        "invalid_request_error",
        None,
        None,
    )
}

fn health(shared: &Shared) -> Response<SimBody> {
    shared.counters.health.fetch_add(1, Relaxed);
    if !shared.is_ready() {
        respond(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "loading model (simulated)\n",
        )
    } else if !shared.health_ok() {
        respond(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "unhealthy (simulated fault)\n",
        )
    } else {
        respond(StatusCode::OK, TEXT, Bytes::new())
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<SimBody>> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large",
                    "invalid_request_error",
                    None,
                    None,
                ))
            } else {
                Err(bad_request("failed to read request body"))
            }
        }
    }
}

async fn sim_fault(shared: Arc<Shared>, req: Request<Incoming>) -> Response<SimBody> {
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut update: FaultUpdate = match serde_json::from_slice(&body) {
        Ok(u) => u,
        Err(e) => return bad_request(&format!("invalid fault update: {e}")),
    };
    let crash = update.crash.take() == Some(true);
    let mut state = shared.apply(&update);
    if crash {
        state.crashed = true;
        // Crash right after this answer has been written.
        let s = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.crash("requested via /sim/fault");
        });
    }
    json(StatusCode::OK, &state)
}

#[derive(Deserialize)]
struct GenRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Value,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Simulated token count: whitespace-separated words of every string, one per
/// number (token ids), `text` of content parts.
fn count_tokens(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Number(_) => 1,
        Value::Array(a) => a.iter().map(count_tokens).sum(),
        Value::Object(o) => o.get("text").map_or(0, count_tokens),
        Value::Null | Value::Bool(_) => 0,
    }
}

/// Resolves the requested model to its index (missing = first served model).
fn resolve_model(shared: &Shared, model: Option<&str>) -> Option<usize> {
    match model {
        None => Some(0),
        Some(name) => shared.models.iter().position(|m| m.name == name),
    }
}

fn model_not_found(name: Option<&str>) -> Response<SimBody> {
    error(
        StatusCode::NOT_FOUND,
        &format!("The model `{}` does not exist.", name.unwrap_or_default()),
        "invalid_request_error",
        Some("model"),
        Some("model_not_found"),
    )
}

fn loading() -> Response<SimBody> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "The model is still loading (simulated load time).",
        "service_unavailable",
        None,
        None,
    )
}

fn lying() -> Response<SimBody> {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "simulated engine failure (health_lies fault): the engine cannot run the model",
        "internal_server_error",
        None,
        None,
    )
}

async fn generate(shared: Arc<Shared>, req: Request<Incoming>, kind: Kind) -> Response<SimBody> {
    let start = Instant::now();
    let seq = shared.counters.completions.fetch_add(1, Relaxed) + 1;
    if seq >= shared.crash_after.load(Relaxed).max(1) {
        shared.crash(&format!("crash-after: completion request #{seq}"));
        // Never answer; the connection is dropped as the simulator goes down.
        std::future::pending::<()>().await;
    }
    let resp = generate_inner(&shared, req, kind, start, seq).await;
    if !resp.status().is_success() {
        shared.counters.completions_failed.fetch_add(1, Relaxed);
    }
    resp
}

async fn generate_inner(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    kind: Kind,
    start: Instant,
    seq: u64,
) -> Response<SimBody> {
    if !shared.is_ready() {
        return loading();
    }
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let r: GenRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(&format!("invalid JSON body: {e}")),
    };
    let Some(model) = resolve_model(shared, r.model.as_deref()) else {
        return model_not_found(r.model.as_deref());
    };
    let prompt_tokens = match kind {
        Kind::Chat => match &r.messages {
            Some(msgs) if !msgs.is_empty() => msgs.iter().map(|m| count_tokens(&m.content)).sum(),
            _ => return bad_request("`messages` must be a non-empty array"),
        },
        Kind::Completion => match &r.prompt {
            Some(p) => count_tokens(p),
            None => return bad_request("`prompt` is required"),
        },
    };
    if shared.health_lies.load(Relaxed) {
        return lying();
    }
    let max_tokens = match kind {
        Kind::Chat => r.max_completion_tokens.or(r.max_tokens),
        Kind::Completion => r.max_tokens,
    }
    .unwrap_or(shared.cfg.default_max_tokens);
    if max_tokens > MAX_TOKENS {
        return bad_request(&format!(
            "max_tokens {max_tokens} exceeds the simulated context length {MAX_TOKENS}"
        ));
    }
    let id_no = shared.counters.ids.fetch_add(1, Relaxed);
    let gen = Gen {
        kind,
        id: match kind {
            Kind::Chat => format!("chatcmpl-sim-{id_no:x}"),
            Kind::Completion => format!("cmpl-sim-{id_no:x}"),
        },
        created: unix_now(),
        prompt_tokens,
        max_tokens,
        include_usage: r.stream_options.and_then(|o| o.include_usage) == Some(true),
        start,
        seq,
    };
    let run = Running::new(shared.clone(), model);
    if r.stream == Some(true) {
        let mut resp = Response::new(SimBody::Tokens(Box::new(TokenStream::new(run, gen))));
        let h = resp.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return resp;
    }
    let first_token = if max_tokens > 0 {
        let first = gen.due(shared, 0);
        let last = gen.due(shared, max_tokens - 1);
        // A graceful stop lets this finish within the grace period. Unpaced,
        // the last token is already due: no timer (issue 11, item 2: tokio
        // rounds a deadline up to its next 1 ms tick, so even a deadline in
        // the past cost up to a millisecond per request).
        if let Some(wait) = generation_wait(last, Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        Some(first.max(start))
    } else {
        None
    };
    let body = gen.full_json(&shared.models[model].json);
    gen.record_success(&run, first_token);
    respond(StatusCode::OK, JSON, body)
}

/// How long a non-streamed completion still has to wait at `now` for its last
/// token, due at `last`; `None` when it is due already (no timer at all).
fn generation_wait(last: Instant, now: Instant) -> Option<Duration> {
    let wait = last.saturating_duration_since(now);
    (!wait.is_zero()).then_some(wait)
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Value,
}

/// Deterministic unit vector derived from the input's FNV-1a hash.
fn embed(input: &Value, dim: usize) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in input.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut v: Vec<f32> = (0..dim)
        .map(|_| {
            // xorshift64*
            h ^= h >> 12;
            h ^= h << 25;
            h ^= h >> 27;
            let x = h.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40; // 24 bits
            (x as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

async fn embeddings(shared: Arc<Shared>, req: Request<Incoming>) -> Response<SimBody> {
    let start = Instant::now();
    shared.counters.embeddings.fetch_add(1, Relaxed);
    if !shared.is_ready() {
        return loading();
    }
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let r: EmbeddingRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(&format!("invalid JSON body: {e}")),
    };
    let Some(model) = resolve_model(&shared, r.model.as_deref()) else {
        return model_not_found(r.model.as_deref());
    };
    let inputs: Vec<&Value> = match &r.input {
        Value::String(_) => vec![&r.input],
        Value::Array(a) if a.first().is_some_and(Value::is_number) => vec![&r.input],
        Value::Array(a) if !a.is_empty() => a.iter().collect(),
        _ => return bad_request("`input` must be a string, an array of strings or token arrays"),
    };
    if shared.health_lies.load(Relaxed) {
        return lying();
    }
    let _run = Running::new(shared.clone(), model);
    let prompt_tokens: u64 = inputs.iter().map(|v| count_tokens(v)).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, v)| {
            serde_json::json!({"object": "embedding", "index": i, "embedding": embed(v, shared.cfg.embedding_dim)})
        })
        .collect();
    let m = &shared.models[model];
    m.m.prompt_tokens.fetch_add(prompt_tokens, Relaxed);
    m.m.success_stop.fetch_add(1, Relaxed);
    m.m.e2e.observe(start.elapsed());
    json(
        StatusCode::OK,
        &serde_json::json!({
            "object": "list",
            "id": format!("embd-sim-{:x}", shared.counters.ids.fetch_add(1, Relaxed)),
            "created": unix_now(),
            "model": m.name,
            "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embed(&Value::from("hello"), 8);
        assert_eq!(a, embed(&Value::from("hello"), 8));
        assert_ne!(a, embed(&Value::from("world"), 8));
        let n: f32 = a.iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-4);
    }

    /// Issue 11, item 2: a completion whose last token is due answers
    /// without a timer; only a paced one waits, and exactly the rest.
    #[test]
    fn issue11_due_generation_needs_no_timer() {
        let now = Instant::now();
        assert_eq!(generation_wait(now, now), None);
        assert_eq!(generation_wait(now - Duration::from_millis(3), now), None);
        assert_eq!(
            generation_wait(now + Duration::from_millis(5), now),
            Some(Duration::from_millis(5))
        );
    }

    #[test]
    fn token_counting() {
        let v: Value = serde_json::json!(["a b", [1, 2, 3], {"type": "text", "text": "c d e"}]);
        assert_eq!(count_tokens(&v), 2 + 3 + 3);
    }
}
