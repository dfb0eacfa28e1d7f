//! Shared test helpers: a tiny HTTP client on hyper-util's legacy client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> Result<(StatusCode, Bytes), String> {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
        .unwrap();
    // A fresh client per request: no pooled connection can be reused across a
    // fault change.
    let resp = client().request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

pub async fn get(addr: SocketAddr, path: &str) -> (StatusCode, Bytes) {
    request(addr, Method::GET, path, None)
        .await
        .expect("GET failed")
}

pub async fn post(addr: SocketAddr, path: &str, body: &str) -> (StatusCode, Bytes) {
    request(addr, Method::POST, path, Some(body))
        .await
        .expect("POST failed")
}

pub async fn post_json(addr: SocketAddr, path: &str, body: &Value) -> (StatusCode, Value) {
    let (s, b) = post(addr, path, &body.to_string()).await;
    (
        s,
        serde_json::from_slice(&b).unwrap_or_else(|e| panic!("non-JSON body {b:?}: {e}")),
    )
}

/// `GET path` with a timeout; `None` if it timed out.
pub async fn get_within(addr: SocketAddr, path: &str, t: Duration) -> Option<StatusCode> {
    tokio::time::timeout(t, request(addr, Method::GET, path, None))
        .await
        .ok()
        .map(|r| r.expect("request failed").0)
}

/// Polls `f` until it returns true (panics after `timeout`).
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A streamed response: each received body frame with its arrival time.
pub struct Streamed {
    pub status: StatusCode,
    pub content_type: String,
    pub started: Instant,
    pub frames: Vec<(Instant, Bytes)>,
}

impl Streamed {
    /// The SSE `data:` payloads in order.
    pub fn events(&self) -> Vec<String> {
        let all: Vec<u8> = self.frames.iter().flat_map(|(_, b)| b.to_vec()).collect();
        let text = String::from_utf8(all).unwrap();
        assert!(
            text.ends_with("\n\n"),
            "SSE must end with a blank line: {text:?}"
        );
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
                    .to_owned()
            })
            .collect()
    }
}

pub async fn post_stream(addr: SocketAddr, path: &str, body: &Value) -> Streamed {
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let started = Instant::now();
    let resp = client().request(req).await.expect("stream request failed");
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("stream broke").into_data() {
            frames.push((Instant::now(), data));
        }
    }
    Streamed {
        status,
        content_type,
        started,
        frames,
    }
}

pub fn json(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("non-JSON body {b:?}: {e}"))
}

/// Asserts an OpenAI error body and returns its `error` object.
pub fn openai_error(b: &[u8]) -> Value {
    let v = json(b);
    let e = v["error"].clone();
    assert!(e["message"].is_string(), "error.message missing: {v}");
    assert!(e["type"].is_string(), "error.type missing: {v}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "param/code missing: {v}"
    );
    e
}

/// Like [`post_stream`], but sends on `first` when the first body frame
/// arrived, and ends quietly (with what came) when the stream breaks.
pub async fn post_stream_notify(
    addr: SocketAddr,
    path: &str,
    body: &Value,
    first: tokio::sync::oneshot::Sender<()>,
) -> Streamed {
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let started = Instant::now();
    let resp = client().request(req).await.expect("stream request failed");
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    let mut first = Some(first);
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            frames.push((Instant::now(), data));
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
        }
    }
    Streamed {
        status,
        content_type,
        started,
        frames,
    }
}
