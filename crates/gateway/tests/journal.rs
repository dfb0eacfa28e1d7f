//! Issue 10, item 4: the gateway's log entries, captured with a tracing layer
//! (the events journald would get, field by field): one entry per request
//! whose message is a readable summary, whose fields name the model, status,
//! tokens and backend, and whose outcome is the truth (`ok` for a body that
//! was sent whole, streamed or not; `aborted` for a client that went away).
//! Under the real journald: `crates/cli/tests/e2e_journal.rs`.

mod common;

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use citadel_engine_sim::SimConfig;
use common::*;
use http_body_util::BodyExt;
use tokio::sync::watch;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

const T: Duration = Duration::from_secs(10);

/// One captured event: its target and fields (`message` included), as text.
#[derive(Debug, Clone)]
struct Ev {
    target: String,
    fields: BTreeMap<String, String>,
}

impl Ev {
    fn get(&self, k: &str) -> Option<&str> {
        self.fields.get(k).map(String::as_str)
    }
    fn message(&self) -> &str {
        self.get("message").unwrap_or_default()
    }
}

struct Captured {
    events: Mutex<Vec<Ev>>,
    count: watch::Sender<usize>,
}

struct Capture;

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().to_owned(), v.to_owned());
    }
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name().to_owned(), format!("{v:?}"));
    }
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, e: &tracing::Event<'_>, _: Context<'_, S>) {
        let target = e.metadata().target();
        if !target.starts_with("citadel_gateway") {
            return;
        }
        let mut fields = BTreeMap::new();
        e.record(&mut Fields(&mut fields));
        let c = captured();
        c.events.lock().unwrap().push(Ev {
            target: target.to_owned(),
            fields,
        });
        c.count.send_modify(|n| *n += 1);
    }
}

/// The global capture, installed on first use (the gateway's tasks run on
/// every worker thread, so a thread-local default would miss them).
fn captured() -> &'static Captured {
    static C: OnceLock<Captured> = OnceLock::new();
    static INSTALLED: OnceLock<()> = OnceLock::new();
    let c = C.get_or_init(|| Captured {
        events: Mutex::new(Vec::new()),
        count: watch::channel(0).0,
    });
    INSTALLED.get_or_init(|| {
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Capture))
            .expect("no other subscriber in this test binary");
    });
    c
}

/// Waits (up to `T`) for an event for which `f` holds.
async fn wait_event(what: &str, f: impl Fn(&Ev) -> bool) -> Ev {
    let c = captured();
    let mut rx = c.count.subscribe();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if let Some(e) = c.events.lock().unwrap().iter().find(|e| f(e)) {
            return e.clone();
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            let all = c.events.lock().unwrap().clone();
            panic!("no event {what} within {T:?}; captured: {all:#?}");
        }
    }
}

async fn request_event(id: &str) -> Ev {
    wait_event(&format!("for request {id}"), |e| {
        e.target == "citadel_gateway::request" && e.get("request_id") == Some(id)
    })
    .await
}

async fn stack(cfg: SimConfig) -> (citadel_engine_sim::SimHandle, citadel_gateway::Server) {
    captured();
    let model = cfg.models[0].clone();
    let a = sim_with(cfg).await;
    let s = settings(&[m(&model, a.addr.port())], "auth = false");
    let gw = gateway(&s, None).await;
    wait_model_state(&client(), gw.addr(), &model, "ready").await;
    (a, gw)
}

fn sim_cfg(model: &str) -> SimConfig {
    SimConfig {
        models: vec![model.into()],
        ..Default::default()
    }
}

/// Before: every successful non-streamed request was logged `outcome=aborted`
/// (the body wrapper waited for a `None` frame that hyper never asks for once
/// `is_end_stream()` is true) under `MESSAGE=request`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_non_streamed_request_logs_outcome_ok_and_a_readable_summary() {
    let (a, gw) = stack(sim_cfg("alpha")).await;
    let c = client();
    let r = send(
        &c,
        "POST",
        gw.addr(),
        "/v1/chat/completions",
        Some(&chat("alpha")),
        &[("x-request-id", "journal-plain-1")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let usage = &r.json()["usage"];
    let e = request_event("journal-plain-1").await;
    assert_eq!(e.get("outcome"), Some("ok"), "{e:#?}");
    assert_eq!(e.get("model"), Some("alpha"), "{e:#?}");
    assert_eq!(e.get("status"), Some("200"), "{e:#?}");
    assert_eq!(e.get("stream"), Some("false"), "{e:#?}");
    assert_eq!(e.get("method"), Some("POST"), "{e:#?}");
    assert_eq!(e.get("path"), Some("/v1/chat/completions"), "{e:#?}");
    assert_eq!(
        e.get("backend"),
        Some(format!("http://{}", a.addr).as_str()),
        "{e:#?}"
    );
    let (p, cpl) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    assert_eq!(e.get("prompt_tokens"), Some(p.to_string().as_str()));
    assert_eq!(e.get("completion_tokens"), Some(cpl.to_string().as_str()));
    assert!(e.get("latency_ms").is_some(), "{e:#?}");
    let msg = e.message();
    assert!(
        msg.starts_with("POST /v1/chat/completions model=alpha status=200 ")
            && msg.contains(&format!(" {p}+{cpl} tokens "))
            && msg.ends_with(" outcome=ok"),
        "{msg}"
    );
    assert!(!msg.contains('\n') && !msg.contains("hi"), "{msg}");

    // A refused request: its error code as the outcome, no model.
    let r = send(
        &c,
        "POST",
        gw.addr(),
        "/v1/chat/completions",
        Some(&chat("nosuchmodel")),
        &[("x-request-id", "journal-plain-2")],
    )
    .await;
    assert_eq!(r.status, 404);
    let e = request_event("journal-plain-2").await;
    assert_eq!(e.get("model"), None, "{e:#?}");
    assert_eq!(e.get("outcome"), Some(r.error_code().as_str()), "{e:#?}");
    assert!(
        e.message()
            .starts_with("POST /v1/chat/completions status=404 "),
        "{e:#?}"
    );
    gw.shutdown(T).await;
}

/// A stream read to its end is `ok`, with the usage of its last chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_complete_stream_logs_outcome_ok() {
    let (_a, gw) = stack(sim_cfg("beta")).await;
    let body = serde_json::json!({"model": "beta", "stream": true, "max_tokens": 5,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let r = send(
        &client(),
        "POST",
        gw.addr(),
        "/v1/chat/completions",
        Some(&body),
        &[("x-request-id", "journal-stream-1")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("data: [DONE]"), "{}", r.text());
    let e = request_event("journal-stream-1").await;
    assert_eq!(e.get("outcome"), Some("ok"), "{e:#?}");
    assert_eq!(e.get("stream"), Some("true"), "{e:#?}");
    assert_eq!(e.get("completion_tokens"), Some("5"), "{e:#?}");
    let msg = e.message();
    assert!(
        msg.starts_with("POST /v1/chat/completions model=beta stream status=200 ")
            && msg.contains("+5 tokens ")
            && msg.ends_with(" outcome=ok"),
        "{msg}"
    );
    gw.shutdown(T).await;
}

/// A client that goes away mid-stream is `aborted`; and the backend's
/// ready line names the model and its URL in the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue10_client_disconnect_mid_stream_logs_aborted() {
    let (a, gw) = stack(SimConfig {
        tokens_per_second: Some(20.0), // 200 tokens: 10 s
        ..sim_cfg("gamma")
    })
    .await;
    let url = format!("http://{}", a.addr);
    let ready = wait_event("backend ready", |e| e.get("backend") == Some(url.as_str())).await;
    assert_eq!(
        ready.message(),
        format!("backend ready: model gamma at {url}"),
        "{ready:#?}"
    );
    assert_eq!(ready.get("model"), Some("gamma"));

    let body = serde_json::json!({"model": "gamma", "stream": true, "max_tokens": 200,
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let req = http::Request::post(format!("http://{}/v1/chat/completions", gw.addr()))
        .header("content-type", "application/json")
        .header("x-request-id", "journal-abort-1")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let c = client();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a first chunk").unwrap();
    assert!(first.is_data());
    drop(body);
    drop(c);
    let e = request_event("journal-abort-1").await;
    assert_eq!(e.get("outcome"), Some("aborted"), "{e:#?}");
    assert!(
        e.message()
            .starts_with("POST /v1/chat/completions model=gamma stream status=200 ")
            && e.message().ends_with(" outcome=aborted"),
        "{e:#?}"
    );
    gw.shutdown(T).await;
}

/// A tiny engine that answers every GET (its health check) with 200 and
/// every POST with an SSE stream of `events` events, then drops the
/// connection without ending the chunked body: an engine killed mid-stream.
/// With `partial`, the last event is cut in the middle.
async fn breaking_engine(events: usize, partial: bool) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut data = Vec::new();
                let mut buf = [0u8; 4096];
                let head_end = loop {
                    if let Some(p) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => data.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&data[..head_end]).to_ascii_lowercase();
                if head.starts_with("get ") {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                        )
                        .await;
                    return;
                }
                // Read the whole request body, so that closing sends FIN, not RST.
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while data.len() - head_end < len {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => data.extend_from_slice(&buf[..n]),
                    }
                }
                let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                for i in 0..events {
                    let mut ev = format!(
                        "data: {{\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i}\"}}}}]}}\n\n"
                    );
                    if partial && i + 1 == events {
                        ev.truncate(ev.len() / 2);
                    }
                    out.extend_from_slice(format!("{:x}\r\n{ev}\r\n", ev.len()).as_bytes());
                }
                let _ = s.write_all(&out).await;
                let _ = s.flush().await;
                // Dropped here: no terminating chunk, no [DONE].
            });
        }
    });
    addr
}

/// Issue 12, item 6: a stream the engine broke off looked complete (200, 51
/// events, then the end: no `[DONE]`, no error). Now it ends with an SSE
/// error event in OpenAI's shape (`upstream_aborted`) and no `[DONE]`, is
/// counted in `citadel_gateway_upstream_aborted_total{model}` and logged with
/// `outcome=upstream_aborted`. A cut in the middle of an event is closed
/// first, so that the error event stands alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_broken_stream_ends_with_an_error_event() {
    captured();
    for (n, partial) in [(5usize, false), (3, true)] {
        let engine = breaking_engine(n, partial).await;
        let s = settings(&[m("delta", engine.port())], "auth = false");
        let gw = gateway(&s, None).await;
        let c = client();
        wait_model_state(&c, gw.addr(), "delta", "ready").await;
        let id = format!("journal-broken-{n}");
        let body = serde_json::json!({"model": "delta", "stream": true,
            "messages": [{"role": "user", "content": "hi"}]})
        .to_string();
        let r = send(
            &c,
            "POST",
            gw.addr(),
            "/v1/chat/completions",
            Some(&body),
            &[("x-request-id", id.as_str())],
        )
        .await;
        assert_eq!(r.status, 200);
        let text = r.text();
        assert!(!text.contains("[DONE]"), "{text}");
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        let full = if partial { n - 1 } else { n };
        assert_eq!(events.len(), n + 1, "{text:?}");
        for e in &events[..full] {
            let v: serde_json::Value = serde_json::from_str(e.strip_prefix("data: ").unwrap())
                .unwrap_or_else(|err| panic!("{err}: {e}"));
            assert_eq!(v["object"], "chat.completion.chunk");
        }
        let last = events.last().unwrap();
        let v: serde_json::Value =
            serde_json::from_str(last.strip_prefix("data: ").expect("a data event"))
                .unwrap_or_else(|err| panic!("{err}: {last}"));
        assert_eq!(v["error"]["type"], "upstream_error", "{v}");
        assert_eq!(v["error"]["code"], "upstream_aborted", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("delta"),
            "{v}"
        );
        assert!(text.ends_with("\n\n"), "{text:?}");
        let e = request_event(&id).await;
        assert_eq!(e.get("outcome"), Some("upstream_aborted"), "{e:#?}");
        assert!(e.message().ends_with(" outcome=upstream_aborted"), "{e:#?}");
        let metrics = get(&c, gw.addr(), "/metrics").await.text();
        assert!(
            metrics.contains("citadel_gateway_upstream_aborted_total{model=\"delta\"} 1"),
            "{metrics}"
        );
        gw.shutdown(T).await;
    }
}
