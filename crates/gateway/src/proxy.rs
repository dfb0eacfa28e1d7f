//! Request handling: the OpenAI-compatible API, health endpoints and metrics.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;

use crate::body::{scan_content, scan_usage, GwBody};
use crate::error::GatewayError;
use crate::expo::Format;
use crate::metrics::{KeyLabel, ModelMetrics, ModelStatus, Name};
use crate::reqlog::{outcome, RequestEvent, Usage};
use crate::routes::{Backend, Health, InFlight, ModelRoute, Table};
use crate::throttle::Verdict;
use crate::Shared;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Attempts per request across a model's backends: each backend at most once
/// (a connection failure moves on to the next), and never more than this.
pub const MAX_ATTEMPTS: usize = 4;
/// Citadel gateways a request may have passed through (`Via` entries named
/// `citadel-*`) before it is refused as a loop.
pub const MAX_HOPS: usize = 4;

/// Hop-by-hop headers (RFC 9110 7.6.1) plus ones the gateway owns. Typed
/// names: removing by `&str` parsed each name again on every request (~2% of
/// the gateway's CPU at saturation, issue 11, item 1).
static STRIP_REQUEST: [HeaderName; 12] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
    header::AUTHORIZATION,
    header::CONTENT_LENGTH,
    header::EXPECT,
];
static STRIP_RESPONSE: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The formatted error chain of a client error (connection refused etc.).
pub fn err_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Accounting for one proxied request; completes (metrics, in-flight, the
/// journal entry) when the response body ends or is dropped.
pub struct Finish {
    shared: Arc<Shared>,
    /// The request counted in flight on its backend until the body ends.
    backend: InFlight,
    /// ... and on its model.
    _model_in_flight: ModelInFlight,
    /// The model's metric handles (and its name).
    model: Arc<ModelMetrics>,
    /// The API key's name (`key` label).
    key: Name,
    method: Method,
    path: &'static str,
    stream: bool,
    /// A stream answered as SSE: its chunks are timed (TTFT, ITL).
    timed: bool,
    /// When the last chunk with content passed (`None`: none yet).
    last_content: Option<Instant>,
    status: u16,
    t0: Instant,
    request_id: HeaderValue,
    usage: Usage,
    /// `aborted` until the body is known to have ended.
    outcome: &'static str,
}

impl Finish {
    pub fn saw_data(&mut self, data: &Bytes) {
        if self.timed && scan_content(data) {
            let now = Instant::now();
            match self.last_content {
                None => self
                    .model
                    .ttft
                    .observe(now.duration_since(self.t0).as_secs_f64()),
                Some(prev) => self
                    .model
                    .itl
                    .observe(now.duration_since(prev).as_secs_f64()),
            }
            self.last_content = Some(now);
        }
        if let Some(u) = scan_usage(data) {
            self.usage = u;
        }
    }
    /// The upstream body broke off: counted once, logged with
    /// `outcome=upstream_aborted`.
    pub fn upstream_aborted(&mut self) {
        if self.outcome != outcome::UPSTREAM_ABORTED {
            self.outcome = outcome::UPSTREAM_ABORTED;
            self.model.upstream_aborted.inc();
            tracing::warn!(
                request_id = self.request_id.to_str().unwrap_or("-"),
                model = self.model(),
                backend = %self.backend.base,
                "the engine broke off the response of model {} before its end",
                self.model()
            );
        }
    }
    /// The model's name.
    pub fn model(&self) -> &str {
        self.model.name.as_str()
    }
    /// The whole body was handed on.
    pub fn complete(&mut self) {
        if self.outcome == outcome::ABORTED {
            self.outcome = outcome::OK;
        }
    }
}

/// A request counted in the model's `in_flight` gauge until dropped,
/// whichever way it ends (an answer's body ends, an error, a client that
/// went away while the request waited).
struct ModelInFlight(Arc<ModelMetrics>);

impl ModelInFlight {
    fn enter(m: &Arc<ModelMetrics>) -> ModelInFlight {
        m.in_flight.inc();
        ModelInFlight(m.clone())
    }
}

impl Drop for ModelInFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if let Some(n) = self.usage.prompt {
            self.model.prompt_tokens.inc_by(n);
        }
        if let Some(n) = self.usage.completion {
            self.model.completion_tokens.inc_by(n);
        }
        account(
            &self.shared,
            &self.model.name,
            &self.model.latency,
            &self.key,
            RequestEvent {
                method: self.method.as_str(),
                path: self.path,
                request_id: self.request_id.to_str().unwrap_or("-"),
                model: self.model.name.as_str(),
                stream: Some(self.stream),
                status: self.status,
                elapsed: self.t0.elapsed(),
                backend: Some(&self.backend.base),
                usage: self.usage,
                outcome: self.outcome,
            },
        );
    }
}

/// Metrics and the one journal entry per API request: `model` and `key`
/// are the label values (the journal's model is in `ev`).
fn account(
    shared: &Shared,
    model: &Name,
    latency: &prometheus_client::metrics::histogram::Histogram,
    key: &Name,
    ev: RequestEvent<'_>,
) {
    let m = &shared.metrics;
    m.requests
        .get_or_create(&ModelStatus {
            model: model.clone(),
            status: ev.status,
        })
        .inc();
    m.key_requests
        .get_or_create(&KeyLabel {
            key: key.clone(),
            model: model.clone(),
            status: ev.status,
        })
        .inc();
    latency.observe(ev.elapsed.as_secs_f64());
    ev.emit();
}

/// An API path as logged: the API's own paths without allocating, any other
/// (a 404) cut to 100 characters.
fn logged_path(path: &str) -> std::borrow::Cow<'static, str> {
    match api_path(path) {
        Some(p) => p.into(),
        None => path.chars().take(100).collect::<String>().into(),
    }
}

fn api_path(path: &str) -> Option<&'static str> {
    [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
    ]
    .into_iter()
    .find(|p| *p == path)
}

fn request_id(shared: &Shared, headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            return v.clone();
        }
    }
    let n = shared.ids.fetch_add(1, Relaxed);
    // tidy: infallible (32 hex digits are always a valid header value)
    HeaderValue::from_bytes(&hex_id(shared.id_seed, n)).expect("hex is a valid header value")
}

/// `{seed:016x}{n:016x}` without the formatting machinery (issue 11, item 1).
fn hex_id(seed: u64, n: u64) -> [u8; 32] {
    let mut hex = [0u8; 32];
    for (i, v) in [seed, n].into_iter().enumerate() {
        for (j, d) in hex[i * 16..(i + 1) * 16].iter_mut().enumerate() {
            *d = b"0123456789abcdef"[((v >> (60 - 4 * j)) & 0xf) as usize];
        }
    }
    hex
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
}

/// What routing needs from a request body.
#[derive(Debug, PartialEq)]
pub(crate) struct Peeked {
    /// The model (or alias) asked for; never empty.
    pub model: String,
    pub stream: bool,
}

/// Reads `model` and `stream` from a request body: a JSON object whose
/// `model` is a non-empty string and whose `stream`, when present, is a
/// boolean (`null` counts as absent). Anything else is an error, never a
/// panic: the body is outside input.
pub(crate) fn peek(bytes: &[u8]) -> Result<Peeked, GatewayError> {
    // serde's derived struct also accepts a JSON array (`["m", true]`) as the
    // fields in order; OpenAI's API takes objects only, and so does the backend.
    let first = bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first.is_some_and(|b| *b != b'{') {
        return Err(GatewayError::BadJson(
            "the request body must be a JSON object".into(),
        ));
    }
    let p: Peek =
        serde_json::from_slice(bytes).map_err(|e| GatewayError::BadJson(e.to_string()))?;
    match p.model {
        Some(m) if !m.is_empty() => Ok(Peeked {
            model: m.into_owned(),
            stream: p.stream.unwrap_or(false),
        }),
        _ => Err(GatewayError::MissingModel),
    }
}

pub async fn handle(
    shared: Arc<Shared>,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Result<Response<GwBody>, Infallible> {
    let t0 = Instant::now();
    let rid = request_id(&shared, req.headers());
    let table = shared.table();
    let origin = req.headers().get(header::ORIGIN).cloned();
    let is_api = req.uri().path().starts_with("/v1/");
    // For the journal entry of a refused API request.
    let api = is_api.then(|| (req.method().clone(), logged_path(req.uri().path())));
    let mut resp = if req.method() == Method::OPTIONS {
        preflight(&table, origin.as_ref())
    } else {
        match dispatch(&shared, &table, peer, req, t0, &rid).await {
            Ok(r) => r,
            Err(Failed {
                model,
                unknown,
                key,
                err: e,
            }) => {
                if let Some((method, path)) = &api {
                    let m = &shared.metrics;
                    let label = match (&model, unknown) {
                        (Some(name), _) => name,
                        (None, true) => &m.unknown_model,
                        (None, false) => &m.no_model,
                    };
                    account(
                        &shared,
                        label,
                        &m.latency_of(label),
                        &key,
                        RequestEvent {
                            method: method.as_str(),
                            path,
                            request_id: rid.to_str().unwrap_or("-"),
                            model: model.as_ref().map_or("", Name::as_str),
                            stream: None,
                            status: e.status().as_u16(),
                            elapsed: t0.elapsed(),
                            backend: None,
                            usage: Usage::default(),
                            outcome: e.code_str(),
                        },
                    );
                }
                e.to_response()
            }
        }
    };
    resp.headers_mut().insert(X_REQUEST_ID.clone(), rid);
    if shared.closing.load(Relaxed) {
        // Shutting down: the client closes this connection after this answer
        // (hyper closes it too), instead of the gateway closing it under a
        // request the client is sending (see `Server::shutdown`).
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(o) = origin {
        cors(&table, &o, resp.headers_mut());
    }
    Ok(resp)
}

/// A refused or failed API request: the error and its labels.
struct Failed {
    /// The model the request was routed to (a configured name).
    model: Option<Name>,
    /// The request named a model the gateway does not serve (`model="unknown"`).
    unknown: bool,
    /// The API key's name, or `none`/`unauthenticated`.
    key: Name,
    err: GatewayError,
}

impl Failed {
    fn new(key: &Name, err: GatewayError) -> Failed {
        Failed {
            model: None,
            unknown: false,
            key: key.clone(),
            err,
        }
    }
    fn of_model(model: &Name, key: &Name, err: GatewayError) -> Failed {
        Failed {
            model: Some(model.clone()),
            unknown: false,
            key: key.clone(),
            err,
        }
    }
}

/// A metrics exposition in the negotiated format.
fn exposition(format: Format, body: String) -> Response<GwBody> {
    let mut r = Response::new(GwBody::full(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    r
}

/// The `Via` entries of Citadel gateways a request has passed through, and
/// whether one of them is this gateway.
fn citadel_hops(headers: &HeaderMap, instance: &str) -> (usize, bool) {
    let mut hops = 0;
    let mut own = false;
    for v in headers.get_all(header::VIA) {
        let text = String::from_utf8_lossy(v.as_bytes());
        for entry in text.split(',') {
            // `[protocol-name/]protocol-version received-by [comment]`
            let Some(by) = entry.split_whitespace().nth(1) else {
                continue;
            };
            if by.starts_with("citadel-") {
                hops += 1;
                own |= by == instance;
            }
        }
    }
    (hops, own)
}

/// Issue 12, item 3: a request that already passed through this gateway (or
/// through too many) is refused instead of forwarded again.
fn check_loop(shared: &Shared, headers: &HeaderMap) -> Result<(), GatewayError> {
    let (hops, own) = citadel_hops(headers, &shared.instance);
    if own || hops >= MAX_HOPS {
        shared.metrics.loops_detected.inc();
        tracing::error!(
            hops,
            "request loop: a request came back to this gateway after {hops} Citadel hops; a model's replica leads back here (see /health/models)"
        );
        return Err(GatewayError::LoopDetected { hops });
    }
    Ok(())
}

/// Checks the request's API key (issue 12, item 4): an address that sent too
/// many invalid keys is refused (429) before its key is looked at; an invalid
/// key is counted against its address. Returns the key's index.
fn authenticate(
    shared: &Shared,
    auth: &crate::auth::Auth,
    peer: IpAddr,
    headers: &HeaderMap,
) -> Result<usize, GatewayError> {
    let now = Instant::now();
    if let Some(retry_after) = shared.auth_failures.blocked(peer, now) {
        shared.metrics.auth_throttled.inc();
        return Err(GatewayError::AuthThrottled { retry_after });
    }
    let h = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    match auth.verify(h) {
        Err(GatewayError::BadKey) => {
            shared.metrics.auth_failures.inc();
            if let Verdict::Blocked { secs } = shared.auth_failures.failed(peer, now) {
                tracing::warn!(
                    client = %peer,
                    block_s = secs,
                    "too many invalid API keys from {peer}: its requests are refused for {secs} s"
                );
            }
            Err(GatewayError::BadKey)
        }
        other => other,
    }
}

async fn dispatch(
    shared: &Arc<Shared>,
    table: &Arc<Table>,
    peer: IpAddr,
    req: Request<Incoming>,
    t0: Instant,
    rid: &HeaderValue,
) -> Result<Response<GwBody>, Failed> {
    let path = req.uri().path();
    // The `key` label until a key is verified.
    let mut key = if table.auth.is_some() {
        &shared.metrics.key_unauthenticated
    } else {
        &shared.metrics.key_none
    };
    // Issue 12, item 5: what the status endpoints tell (engine addresses,
    // states, errors) needs a key once the gateway listens beyond loopback.
    if matches!(
        (req.method(), path),
        (&Method::GET, "/health/models")
            | (&Method::GET, "/metrics")
            | (&Method::GET, "/metrics/engines")
    ) && !shared.loopback_only
    {
        if let Some(auth) = &table.auth {
            authenticate(shared, auth, peer, req.headers()).map_err(|e| Failed::new(key, e))?;
        }
    }
    match (req.method(), path) {
        (&Method::GET, "/health") => {
            // Liveness, plus how many SIGHUP reloads completed and how the last went.
            let body = format!(
                r#"{{"status":"ok","reloads":{},"last_reload":"{}"}}"#,
                shared.reloads.load(Relaxed),
                if shared.last_reload_failed.load(Relaxed) {
                    "failed"
                } else {
                    "ok"
                }
            );
            return Ok(json(StatusCode::OK, body));
        }
        (&Method::GET, "/health/ready") => {
            let (ready, total) = table.ready_count();
            let status = if ready > 0 {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body =
                serde_json::json!({"ready": ready > 0, "models_ready": ready, "models": total});
            return Ok(json(status, body.to_string()));
        }
        (&Method::GET, "/health/models") => return Ok(json(StatusCode::OK, models_health(table))),
        (&Method::GET, "/metrics") => {
            // Issue 14, item 1: OpenMetrics when asked for, else the text format.
            let format = Format::negotiate(req.headers().get(header::ACCEPT).map(|v| v.as_bytes()));
            return Ok(exposition(format, shared.metrics.encode(table, format)));
        }
        (&Method::GET, "/metrics/engines") => {
            // Issue 14, item 2: the engines' own metrics, labelled by model.
            let format = Format::negotiate(req.headers().get(header::ACCEPT).map(|v| v.as_bytes()));
            let all = crate::engines::scrape(shared, table).await;
            return Ok(exposition(format, all.write(format)));
        }
        _ => {}
    }
    let api = matches!(
        (req.method(), path),
        (&Method::GET, "/v1/models")
            | (&Method::POST, "/v1/chat/completions")
            | (&Method::POST, "/v1/completions")
            | (&Method::POST, "/v1/embeddings")
    );
    if !api {
        return Err(Failed::new(
            key,
            GatewayError::NotFound {
                method: req.method().to_string(),
                path: path.chars().take(200).collect(),
            },
        ));
    }
    if shared.stopping.load(Relaxed) {
        return Err(Failed::new(key, GatewayError::Draining));
    }
    check_loop(shared, req.headers()).map_err(|e| Failed::new(key, e))?;
    if let Some(auth) = &table.auth {
        let idx =
            authenticate(shared, auth, peer, req.headers()).map_err(|e| Failed::new(key, e))?;
        if let Some(name) = auth.name(idx) {
            key = name;
        }
        if let Err(e) = auth.admit(idx) {
            shared.metrics.rate_limited.inc();
            return Err(Failed::new(key, e));
        }
    }
    if req.method() == Method::GET {
        return Ok(json(StatusCode::OK, models_list(table)));
    }
    let key = key.clone();
    proxy(shared, table, req, t0, rid, key).await
}

async fn proxy(
    shared: &Arc<Shared>,
    table: &Arc<Table>,
    req: Request<Incoming>,
    t0: Instant,
    rid: &HeaderValue,
    key: Name,
) -> Result<Response<GwBody>, Failed> {
    let no_model = |e| Failed::new(&key, e);
    let gw = &table.gateway;
    let limit = gw.max_body.bytes();
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit {
            return Err(no_model(GatewayError::BodyTooLarge { limit }));
        }
    }
    let (mut parts, body) = req.into_parts();
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    let bytes = match tokio::time::timeout(gw.header_timeout.duration(), limited.collect()).await {
        Err(_) => return Err(no_model(GatewayError::BodyTimeout)),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(no_model(GatewayError::BodyTooLarge { limit }))
        }
        Ok(Err(_)) => return Err(no_model(GatewayError::BodyRead)),
        Ok(Ok(c)) => c.to_bytes(),
    };
    let peeked = peek(&bytes).map_err(no_model)?;
    let (asked, stream) = (peeked.model, peeked.stream);
    let Some(route) = table.by_name.get(asked.as_str()) else {
        let shown: String = asked.chars().take(100).collect();
        // Issue 14, item 1: counted under model="unknown", never the name
        // the client sent (unbounded label values).
        return Err(Failed {
            unknown: true,
            ..no_model(GatewayError::UnknownModel(shown))
        });
    };
    let metrics = route.metrics(&shared.metrics).clone();
    let label = &metrics.name;
    let model = route.name.clone();
    let body = if asked != route.name {
        rewrite_model(&bytes, &route.name).map_err(|e| Failed::of_model(label, &key, e))?
    } else {
        bytes
    };
    drop(asked);

    // Upstream request head, reused for retries.
    for h in &STRIP_REQUEST {
        parts.headers.remove(h);
    }
    parts.headers.insert(X_REQUEST_ID.clone(), rid.clone());
    // The hop mark: a request that comes back here is refused (check_loop).
    parts.headers.append(header::VIA, shared.via.clone());
    let path = api_path(parts.uri.path()).unwrap_or("/v1/");
    let path_q = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());

    let mut tried: Vec<usize> = Vec::new();
    // Counted until the answer's body ends, or the request fails or is
    // dropped (the client went away while it waited): issue 15.
    let model_in_flight = ModelInFlight::enter(&metrics);
    loop {
        let picked = if tried.len() < MAX_ATTEMPTS {
            route.pick(&tried)
        } else {
            None
        };
        let Some((idx, backend)) = picked else {
            let err = if tried.is_empty() {
                not_ready(route, gw)
            } else {
                GatewayError::UpstreamFailed(model.clone())
            };
            return Err(Failed::of_model(label, &key, err));
        };
        tried.push(idx);
        let backend = InFlight::enter(backend);
        let uri: hyper::Uri = match format!("{}{}", backend.base, path_q).parse() {
            Ok(u) => u,
            Err(_) => continue,
        };
        let mut up = Request::new(Full::new(body.clone()));
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.headers_mut() = parts.headers.clone();
        let t_send = Instant::now();
        // Issue 11, item 4: a stream must begin within first_byte_timeout; a
        // non-streamed answer comes only when generation ends (request_timeout).
        let wait = if stream {
            gw.first_byte_timeout.min(gw.request_timeout).duration()
        } else {
            gw.request_timeout.duration()
        };
        let waited = wait_for_head(&backend, route, &tried, wait, shared.client.request(up)).await;
        let upstream_wait = t_send.elapsed();
        let res = match waited {
            Head::Answered(r) => Ok(r),
            Head::TimedOut => Err(()),
            Head::BackendDown => {
                // Found down (a failed probe, an ejection) while this request
                // waited for its answer: nothing was sent to the client yet.
                tracing::warn!(request_id = rid.to_str().unwrap_or("-"), model = %model, backend = %backend.base, "backend went down while the request waited for its answer; retrying on another replica");
                shared.metrics.upstream_retries.inc();
                continue;
            }
        };
        match res {
            Ok(Ok(resp)) if resp.status().is_server_error() && retry_possible(route, &tried) => {
                // Issue 11, item 4: a 5xx head, nothing sent to the client yet:
                // counted against the backend (outlier ejection), retried elsewhere.
                let status = resp.status();
                drop(resp);
                tracing::warn!(request_id = rid.to_str().unwrap_or("-"), model = %model, backend = %backend.base, status = status.as_u16(), "backend answered {status}; retrying on another replica");
                upstream_failed(shared, gw, &backend, &format!("answered {status}"));
                shared.metrics.upstream_retries.inc();
                continue;
            }
            Ok(Ok(resp)) => {
                if resp.status().is_server_error() {
                    upstream_failed(shared, gw, &backend, &format!("answered {}", resp.status()));
                } else {
                    backend.succeeded();
                }
                let (mut rparts, inner) = resp.into_parts();
                for h in &STRIP_RESPONSE {
                    rparts.headers.remove(h);
                }
                let sse = rparts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
                if sse {
                    // A broken stream gets an error event added (GwBody).
                    rparts.headers.remove(header::CONTENT_LENGTH);
                }
                let finish = Finish {
                    shared: shared.clone(),
                    backend,
                    _model_in_flight: model_in_flight,
                    model: metrics.clone(),
                    key: key.clone(),
                    method: parts.method.clone(),
                    path,
                    stream,
                    timed: stream && sse,
                    last_content: None,
                    status: rparts.status.as_u16(),
                    t0,
                    request_id: rid.clone(),
                    usage: Usage::default(),
                    outcome: outcome::ABORTED,
                };
                let resp = Response::from_parts(rparts, GwBody::stream(inner, finish, sse));
                let overhead = t0.elapsed().saturating_sub(upstream_wait);
                shared.metrics.overhead.observe(overhead.as_secs_f64());
                return Ok(resp);
            }
            Ok(Err(e)) => {
                let msg = err_chain(&e);
                if e.is_connect() {
                    // Nothing was sent: eject this replica and try another.
                    tracing::warn!(request_id = rid.to_str().unwrap_or("-"), model = %model, backend = %backend.base, error = %msg, "connection to backend failed; retrying on another replica");
                    backend.eject(&shared.metrics, msg);
                    shared.metrics.observe_models(&shared.table());
                    shared.status_changed.notify_one();
                    shared.metrics.upstream_retries.inc();
                    continue;
                }
                // The connection broke before the answer began (the engine
                // died mid-request): nothing was sent to the client yet.
                upstream_failed(
                    shared,
                    gw,
                    &backend,
                    "the connection broke before the answer",
                );
                if retry_possible(route, &tried) {
                    tracing::warn!(request_id = rid.to_str().unwrap_or("-"), model = %model, backend = %backend.base, error = %msg, "backend request failed before its answer; retrying on another replica");
                    shared.metrics.upstream_retries.inc();
                    continue;
                }
                tracing::warn!(request_id = rid.to_str().unwrap_or("-"), model = %model, backend = %backend.base, error = %msg, "backend request failed");
                return Err(Failed::of_model(
                    label,
                    &key,
                    GatewayError::UpstreamFailed(model),
                ));
            }
            Err(()) => {
                upstream_failed(shared, gw, &backend, &format!("no answer within {wait:?}"));
                if retry_possible(route, &tried) {
                    tracing::warn!(request_id = rid.to_str().unwrap_or("-"), model = %model, backend = %backend.base, "backend did not begin its answer within {wait:?}; retrying on another replica");
                    shared.metrics.upstream_retries.inc();
                    continue;
                }
                return Err(Failed::of_model(
                    label,
                    &key,
                    GatewayError::UpstreamTimeout(model),
                ));
            }
        }
    }
}

/// How waiting for a backend's response head ended.
enum Head<T> {
    Answered(T),
    TimedOut,
    /// The backend was found down while another one could take the request.
    BackendDown,
}

/// Waits up to `wait` for `answer`; gives up early when `backend` goes down
/// (a failed probe, an ejection) and another backend could take the request
/// (issue 11, item 4: a hung engine held requests for up to request_timeout).
async fn wait_for_head<T>(
    backend: &Backend,
    route: &ModelRoute,
    tried: &[usize],
    wait: std::time::Duration,
    answer: impl std::future::Future<Output = T>,
) -> Head<T> {
    if route.backends.len() == 1 {
        // Nowhere else to go: no need to watch (and lock) `went_down`.
        return tokio::time::timeout(wait, answer)
            .await
            .map_or(Head::TimedOut, Head::Answered);
    }
    let down = backend.went_down.notified();
    let mut down = std::pin::pin!(down);
    down.as_mut().enable();
    let answer = tokio::time::timeout(wait, answer);
    let mut answer = std::pin::pin!(answer);
    let mut watch_down = true;
    loop {
        tokio::select! {
            biased;
            r = &mut answer => return r.map_or(Head::TimedOut, Head::Answered),
            () = &mut down, if watch_down => {
                if backend.health() != Health::Ready && retry_possible(route, tried) {
                    return Head::BackendDown;
                }
                // The only backend left: keep waiting for it.
                watch_down = false;
            }
        }
    }
}

/// Whether another attempt may go to a ready backend not tried yet.
fn retry_possible(route: &ModelRoute, tried: &[usize]) -> bool {
    tried.len() < MAX_ATTEMPTS
        && route
            .backends
            .iter()
            .enumerate()
            .any(|(i, b)| !tried.contains(&i) && b.routable())
}

/// A failed request, counted against its backend; an ejection changes the
/// model's availability (metrics, STATUS=).
fn upstream_failed(shared: &Shared, gw: &citadel_config::Gateway, backend: &Backend, why: &str) {
    if backend.failed(&shared.metrics, gw, why) {
        shared.metrics.observe_models(&shared.table());
        shared.status_changed.notify_one();
    }
}

fn not_ready(route: &ModelRoute, gw: &citadel_config::Gateway) -> GatewayError {
    let state = match route.health() {
        Health::Loading => "loading",
        Health::Ready => "busy",
        _ => "down",
    };
    GatewayError::NotReady {
        model: route.name.clone(),
        state,
        retry_after: gw.probe_interval.duration().as_secs().max(1),
    }
}

/// Replaces an alias by the model's served name. Only the top-level `model`
/// value is rewritten; every other field is copied as written (re-encoding
/// through `Value` would change numbers: floats lose their last digit,
/// integers beyond 64 bits become floats).
fn rewrite_model(bytes: &[u8], name: &str) -> Result<Bytes, GatewayError> {
    let bad = |e: serde_json::Error| GatewayError::BadJson(e.to_string());
    let fields: Fields = serde_json::from_slice(bytes).map_err(bad)?;
    let mut out = Vec::with_capacity(bytes.len() + name.len());
    out.push(b'{');
    for (i, (key, raw)) in fields.0.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, key).map_err(bad)?;
        out.push(b':');
        if key == "model" {
            serde_json::to_writer(&mut out, name).map_err(bad)?;
        } else {
            out.extend_from_slice(raw.get().as_bytes());
        }
    }
    if !fields.0.iter().any(|(k, _)| k == "model") {
        if !fields.0.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(b"\"model\":");
        serde_json::to_writer(&mut out, name).map_err(bad)?;
    }
    out.push(b'}');
    Ok(Bytes::from(out))
}

/// A JSON object's fields in order, values as written.
struct Fields<'a>(Vec<(std::borrow::Cow<'a, str>, &'a serde_json::value::RawValue)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Fields<'de>, A::Error> {
                let mut v = Vec::new();
                while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    v.push((k, map.next_value()?));
                }
                Ok(Fields(v))
            }
        }
        d.deserialize_map(V)
    }
}

fn json(status: StatusCode, body: String) -> Response<GwBody> {
    let mut r = Response::new(GwBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn models_list(table: &Table) -> String {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut data = Vec::new();
    for m in table.models.iter().filter(|m| m.health() == Health::Ready) {
        data.push(serde_json::json!({"id": m.name, "object": "model", "created": created, "owned_by": "citadel"}));
        for a in &m.aliases {
            data.push(serde_json::json!({"id": a, "object": "model", "created": created, "owned_by": "citadel", "root": m.name}));
        }
    }
    serde_json::json!({"object": "list", "data": data}).to_string()
}

fn models_health(table: &Table) -> String {
    let models: Vec<_> = table
        .models
        .iter()
        .map(|m| {
            let backends: Vec<_> = m.backends.iter().map(|b| b.status_json()).collect();
            // The model's probe latency and error: from its first ready backend, else the first.
            let main = m
                .backends
                .iter()
                .find(|b| b.health() == Health::Ready)
                .or(m.backends.first())
                .map(|b| b.status_json())
                .unwrap_or_default();
            serde_json::json!({
                "name": m.name,
                "aliases": m.aliases,
                "state": m.health().as_str(),
                "last_probe_latency_ms": main.get("last_probe_latency_ms"),
                "last_error": main.get("last_error"),
                "backends": backends,
            })
        })
        .collect();
    serde_json::json!({ "models": models }).to_string()
}

fn origin_allowed(table: &Table, origin: &HeaderValue) -> bool {
    let list = &table.gateway.cors_origins;
    list.iter()
        .any(|o| o == "*" || o.as_bytes() == origin.as_bytes())
}

fn cors(table: &Table, origin: &HeaderValue, h: &mut HeaderMap) {
    if origin_allowed(table, origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("x-request-id, retry-after"),
        );
    }
}

fn preflight(table: &Table, origin: Option<&HeaderValue>) -> Response<GwBody> {
    match origin {
        Some(o) if origin_allowed(table, o) => {
            let mut r = Response::new(GwBody::empty());
            *r.status_mut() = StatusCode::NO_CONTENT;
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, content-type, x-request-id"),
            );
            h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(600u32));
            r
        }
        _ => GatewayError::NotFound {
            method: "OPTIONS".into(),
            path: String::new(),
        }
        .to_response(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::{peek, rewrite_model, Peeked};

    /// Arbitrary JSON, a few levels deep.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Request bodies: objects with other fields and, often, a `model`
    /// (usually a string) and a `stream` (usually a boolean).
    fn body() -> impl Strategy<Value = Value> {
        (
            prop::collection::btree_map(any::<String>(), json(), 0..4),
            prop::option::of(prop_oneof![
                3 => any::<String>().prop_map(Value::String),
                1 => json(),
            ]),
            prop::option::of(prop_oneof![
                3 => any::<bool>().prop_map(Value::Bool),
                1 => json(),
            ]),
        )
            .prop_map(|(fields, model, stream)| {
                let mut o: serde_json::Map<String, Value> = fields.into_iter().collect();
                if let Some(m) = model {
                    o.insert("model".into(), m);
                }
                if let Some(s) = stream {
                    o.insert("stream".into(), s);
                }
                Value::Object(o)
            })
    }

    /// The reference: what the fields mean in the parsed JSON (`Err` holds
    /// the error code).
    fn reference(v: &Value) -> Result<Peeked, &'static str> {
        let Some(o) = v.as_object() else {
            return Err("invalid_json");
        };
        let model = match o.get("model") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err("invalid_json"),
        };
        let stream = match o.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err("invalid_json"),
        };
        match model {
            Some(model) if !model.is_empty() => Ok(Peeked { model, stream }),
            _ => Err("missing_model"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(384))]

        /// Issue 9 (checks): the request-body scanner never panics on outside bytes.
        #[test]
        fn issue9_peek_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = peek(&bytes);
        }

        /// ... nor on JSON-shaped noise.
        #[test]
        fn issue9_peek_never_panics_on_json_like_bytes(
            bytes in prop::collection::vec(
                prop::sample::select(b"{}[]\":, \\nmodelstrua0129.e-".to_vec()),
                0..256,
            )
        ) {
            let _ = peek(&bytes);
        }

        /// On valid JSON it reads `model` and `stream` as serde_json's Value does.
        #[test]
        fn issue9_peek_agrees_with_serde_json(v in prop_oneof![3 => body(), 1 => json()]) {
            let bytes = serde_json::to_vec(&v).unwrap();
            let got = peek(&bytes).map_err(|e| e.code_str());
            prop_assert_eq!(got, reference(&v), "{}", v);
        }

        /// Rewriting an alias changes `model` and nothing else (numbers are
        /// copied as written, not re-encoded).
        #[test]
        fn issue9_rewrite_model_changes_only_the_model(v in body(), name in any::<String>()) {
            let bytes = serde_json::to_vec(&v).unwrap();
            let out = rewrite_model(&bytes, &name).unwrap();
            // The original text read by the same parser (serde_json's float
            // parsing is not exact: compare like with like).
            let mut want: Value = serde_json::from_slice(&bytes).unwrap();
            want["model"] = Value::String(name);
            prop_assert_eq!(serde_json::from_slice::<Value>(&out).unwrap(), want);
        }
    }

    /// Issue 11, item 1: the request id written without `format!` is the
    /// same text as `{seed:016x}{n:016x}`.
    #[test]
    fn issue11_generated_request_id_is_seed_and_counter_in_hex() {
        for (seed, n) in [
            (0u64, 0u64),
            (u64::MAX, 1),
            (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210),
        ] {
            let hex = super::hex_id(seed, n);
            assert_eq!(
                std::str::from_utf8(&hex).unwrap(),
                format!("{seed:016x}{n:016x}")
            );
        }
    }

    /// serde's derived struct reads a JSON array as the fields in order: the
    /// gateway would route `["phi3", true]` to phi3 and forward the array.
    #[test]
    fn issue9_peek_refuses_a_json_array() {
        assert!(matches!(
            peek(br#" ["phi3", true]"#),
            Err(crate::GatewayError::BadJson(_))
        ));
    }

    /// A backend (Python's json) takes the last of duplicate keys: routing on
    /// one `model` and serving another must not happen.
    #[test]
    fn peek_refuses_duplicate_model_keys() {
        assert!(matches!(
            peek(br#"{"model":"phi3","model":"mixtral"}"#),
            Err(crate::GatewayError::BadJson(_))
        ));
    }

    #[test]
    fn peek_reads_model_and_stream() {
        assert_eq!(
            peek(br#"{"model":"a\u00e9","stream":true,"x":[1]}"#).unwrap(),
            Peeked {
                model: "a\u{e9}".into(),
                stream: true
            }
        );
        assert!(matches!(
            peek(br#"{"model":""}"#),
            Err(crate::GatewayError::MissingModel)
        ));
    }
}
