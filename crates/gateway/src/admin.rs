//! The admin channel (issue 15): drain and admit backends, add and remove
//! temporary ones, for rolling restarts and blue/green upgrades without
//! downtime.
//!
//! HTTP/1.1 with JSON bodies over a Unix socket that only root can open
//! (`citadel-gateway-admin.socket`, `SocketMode=0600`; outside systemd
//! `--admin-socket PATH`, also 0600). It is never on the API's port: whoever
//! can reach the API cannot drain a model.
//!
//! * `GET /admin/backends`: every model's backends, each
//!   `{"url","health":"ready|loading|down|ejected","drained","in_flight","temporary"}`.
//! * `POST /admin/drain {"url"}`: no new request goes to the backend; those
//!   in flight (streams included) finish, `in_flight` tells how many remain.
//! * `POST /admin/admit {"url"}`: clears the drain and probes the backend at
//!   once; the answer is its state after that probe.
//! * `POST /admin/add {"model","url"}`: a temporary backend, probed like the
//!   others and routed to once ready (409 when the model has that URL).
//! * `POST /admin/remove {"url"}`: removes a temporary backend (409 for a
//!   configured one); its requests in flight finish.
//!
//! Drain flags and temporary backends survive a reload (SIGHUP) for the URLs
//! and models that still exist; a restart of the gateway forgets them.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::sync::watch;

use crate::routes::{self, Backend};
use crate::{Phase, Shared};

/// The largest admin request body read.
const MAX_BODY: usize = 16 * 1024;

/// Serves the admin channel on `listener` until the shutdown closes
/// connections.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::UnixListener,
    mut shutdown_rx: watch::Receiver<Phase>,
) {
    loop {
        tokio::select! {
            biased;
            _ = async { let _ = shutdown_rx.wait_for(|p| *p == Phase::Closed).await; } => return,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| handle(shared.clone(), req));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(std::time::Duration::from_secs(10))
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// An error in the gateway's (OpenAI's) shape.
fn error(status: StatusCode, code: &str, message: String) -> Response<Full<Bytes>> {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    json(
        status,
        &serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    url: String,
    #[serde(default)]
    model: Option<String>,
}

/// `http://host:port` with nothing after it (a trailing `/` is dropped).
fn backend_url(url: &str) -> Result<String, String> {
    let u = url.trim_end_matches('/');
    let uri: hyper::Uri = u
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http")
        || uri.authority().is_none()
        || uri.path_and_query().is_some_and(|p| p.as_str() != "/")
    {
        return Err(format!(
            "{url:?} is not a backend URL: expected http://HOST:PORT"
        ));
    }
    Ok(u.to_owned())
}

/// Every backend with this URL (one engine may serve several models).
fn find(shared: &Shared, url: &str) -> Vec<Arc<Backend>> {
    shared
        .table()
        .models
        .iter()
        .flat_map(|m| m.backends.iter())
        .filter(|b| b.base == url)
        .cloned()
        .collect()
}

fn unknown(url: &str) -> Response<Full<Bytes>> {
    error(
        StatusCode::NOT_FOUND,
        "backend_not_found",
        format!("no backend has the URL {url} (GET /admin/backends lists them)"),
    )
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    if method == Method::GET && path == "/admin/backends" {
        return Ok(json(StatusCode::OK, &backends(&shared)));
    }
    let action = match (&method, path.as_str()) {
        (&Method::POST, "/admin/drain") => "drain",
        (&Method::POST, "/admin/admit") => "admit",
        (&Method::POST, "/admin/add") => "add",
        (&Method::POST, "/admin/remove") => "remove",
        _ => {
            return Ok(error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no admin endpoint {method} {}",
                    path.chars().take(200).collect::<String>()
                ),
            ))
        }
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("cannot read the request body: {e}"),
            ))
        }
    };
    let target: Target = match serde_json::from_slice(&body) {
        Ok(t) => t,
        Err(e) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("expected {{\"url\": ...}}: {e}"),
            ))
        }
    };
    let url = match backend_url(&target.url) {
        Ok(u) => u,
        Err(e) => return Ok(error(StatusCode::BAD_REQUEST, "invalid_url", e)),
    };
    Ok(match action {
        "drain" | "admit" => {
            let found = find(&shared, &url);
            let Some(first) = found.first() else {
                return Ok(unknown(&url));
            };
            let drain = action == "drain";
            for b in &found {
                b.set_drained(drain);
            }
            if !drain {
                for b in &found {
                    routes::probe_once(&shared, b).await;
                }
            }
            shared.metrics.observe_models(&shared.table());
            shared.status_changed.notify_one();
            json(StatusCode::OK, &first.admin_json())
        }
        "add" => add(&shared, target.model.as_deref(), &url),
        _ => remove(&shared, &url),
    })
}

fn backends(shared: &Shared) -> serde_json::Value {
    let models: Vec<_> = shared
        .table()
        .models
        .iter()
        .map(|m| {
            let b: Vec<_> = m.backends.iter().map(|b| b.admin_json()).collect();
            serde_json::json!({"model": m.name, "backends": b})
        })
        .collect();
    serde_json::json!({ "models": models })
}

fn add(shared: &Arc<Shared>, model: Option<&str>, url: &str) -> Response<Full<Bytes>> {
    let Some(model) = model else {
        return error(
            StatusCode::BAD_REQUEST,
            "missing_model",
            "/admin/add needs {\"model\": NAME, \"url\": URL}".into(),
        );
    };
    let b = {
        let _edit = shared.edit_lock();
        let table = shared.table();
        let Some(route) = table.models.iter().find(|m| m.name == model) else {
            return error(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("the gateway serves no model named {model:?}"),
            );
        };
        if route.backends.iter().any(|b| b.base == url) {
            return error(
                StatusCode::CONFLICT,
                "backend_exists",
                format!("model {model} already has the backend {url}"),
            );
        }
        let health_path = route
            .backends
            .first()
            .map_or("/health", |b| b.health_path.as_str());
        let b = Arc::new(Backend::new(&route.name, url, health_path, true));
        let mut list = route.backends.clone();
        list.push(b.clone());
        shared.set_table(table.with_route(route.with_backends(list)));
        b
    };
    tracing::info!(
        model,
        backend = url,
        "temporary backend added: model {model} at {url} (routed to once its health check passes)"
    );
    routes::spawn_prober(shared.clone(), b.clone());
    shared.status_changed.notify_one();
    json(StatusCode::OK, &b.admin_json())
}

fn remove(shared: &Arc<Shared>, url: &str) -> Response<Full<Bytes>> {
    let removed = {
        let _edit = shared.edit_lock();
        let table = shared.table();
        let Some(route) = table
            .models
            .iter()
            .find(|m| m.backends.iter().any(|b| b.base == url && b.temporary))
        else {
            return if find(shared, url).is_empty() {
                unknown(url)
            } else {
                error(
                    StatusCode::CONFLICT,
                    "backend_configured",
                    format!("{url} is a configured backend: remove it from the config and reload, or drain it"),
                )
            };
        };
        let (gone, kept): (Vec<_>, Vec<_>) = route
            .backends
            .iter()
            .cloned()
            .partition(|b| b.base == url && b.temporary);
        shared.set_table(table.with_route(route.with_backends(kept)));
        gone
    };
    for b in &removed {
        b.retire();
        tracing::info!(model = %b.model, backend = url, "temporary backend removed: model {} at {url} (its requests in flight finish)", b.model);
    }
    shared.metrics.observe_models(&shared.table());
    shared.status_changed.notify_one();
    match removed.first() {
        Some(b) => json(StatusCode::OK, &b.admin_json()),
        None => unknown(url),
    }
}
