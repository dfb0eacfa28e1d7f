//! Slow-client limits (`gateway.header_timeout` on the request head, on idle
//! keep-alive connections and on the request body) and CORS, over raw TCP
//! against an in-process gateway and simulator.
//!
//! Timings are measured and printed (`cargo test -- --nocapture`); waits are
//! reads with a deadline, never fixed sleeps.

mod common;

use std::time::{Duration, Instant};

use citadel_engine_sim::SimConfig;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);
/// `gateway.header_timeout` in these tests.
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// Closing or answering later than this means the timeout is not enforced.
const UPPER: Duration = Duration::from_secs(5);
/// Earlier than this means the gateway did not wait for the timeout at all.
const LOWER: Duration = Duration::from_millis(900);

async fn limited_gateway(extra: &str) -> (citadel_engine_sim::SimHandle, citadel_gateway::Server) {
    let sim = sim("alpha").await;
    let s = settings(
        &[m("alpha", sim.addr.port())],
        &format!("auth = false\nheader_timeout = \"1s\"\n{extra}"),
    );
    let gw = gateway(&s, None).await;
    wait_model_state(&client(), gw.addr(), "alpha", "ready").await;
    (sim, gw)
}

/// Reads until the peer closes (EOF or reset) or `limit` passes; returns
/// everything read, how the read ended (`true` = closed) and when.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool, Instant) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (out, false, Instant::now()),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true, Instant::now()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// A raw HTTP/1.1 response: status, lower-cased headers, body (by Content-Length).
struct RawResp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads exactly one response with a Content-Length body, leaving the
/// connection open; `None` if the peer closed first.
async fn read_response(s: &mut TcpStream, limit: Duration) -> Option<RawResp> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!("no complete response head within {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => data.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().expect("numeric content-length"))
        .unwrap_or_else(|| panic!("response without content-length: {head}"));
    let mut body = data[head_end..].to_vec();
    while body.len() < len {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!("incomplete response body within {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => panic!("connection closed mid-body"),
            Ok(Ok(n)) => body.extend_from_slice(&buf[..n]),
        }
    }
    Some(RawResp {
        status,
        headers,
        body,
    })
}

fn assert_timed(what: &str, elapsed: Duration) {
    println!("{what}: {elapsed:?} (header_timeout {HEADER_TIMEOUT:?})");
    assert!(
        elapsed >= LOWER,
        "{what} after {elapsed:?}: sooner than header_timeout"
    );
    assert!(
        elapsed <= UPPER,
        "{what} after {elapsed:?}: header_timeout {HEADER_TIMEOUT:?} not enforced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_request_head_is_closed_after_header_timeout() {
    let (_sim, gw) = limited_gateway("").await;

    // Part of a head, then silence: hyper's header_read_timeout closes the
    // connection without an answer (it has no automatic 408).
    let t0 = Instant::now();
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (got, closed, at) = read_until_closed(&mut s, UPPER + T).await;
    assert!(closed, "connection still open after {:?}", UPPER + T);
    assert_timed("partial head: closed", at - t0);
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "unexpected answer to a partial head: {}",
        String::from_utf8_lossy(&got)
    );

    // A connection that sends nothing at all is closed the same way.
    let t0 = Instant::now();
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let (got, closed, at) = read_until_closed(&mut s, UPPER + T).await;
    assert!(closed, "silent connection still open after {:?}", UPPER + T);
    assert_timed("silent connection: closed", at - t0);
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));

    // The gateway still serves.
    assert_eq!(post_chat(&client(), gw.addr(), "alpha").await.status, 200);
    gw.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_request_head_does_not_extend_header_timeout() {
    let (_sim, gw) = limited_gateway("").await;
    // Slowloris: one header byte every 100 ms, never finishing the head. The
    // timeout runs from the start of the head, not from the last byte.
    let t0 = Instant::now();
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nX-Slow: ")
        .await
        .unwrap();
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    let mut buf = [0u8; 1024];
    let closed_at = loop {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => break Instant::now(),
                Ok(n) => panic!("unexpected answer: {}", String::from_utf8_lossy(&buf[..n])),
            },
            _ = pace.tick() => {
                if s.write_all(b"a").await.is_err() {
                    break Instant::now();
                }
                assert!(t0.elapsed() < UPPER + T, "trickled head kept the connection open");
            }
        }
    };
    assert_timed("trickled head: closed", closed_at - t0);
    gw.shutdown(T).await;
}

/// `GET /health` on an open connection; asserts it stays open.
async fn health_on(s: &mut TcpStream) {
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(s, T).await.expect("response");
    assert_eq!(r.status, 200);
    assert_ne!(r.header("connection"), Some("close"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_is_closed_after_header_timeout() {
    let (_sim, gw) = limited_gateway("").await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    // Two requests on one connection: keep-alive works...
    health_on(&mut s).await;
    // The idle timer starts once the last response is written, so after this.
    let t0 = Instant::now();
    health_on(&mut s).await;
    // ...and the idle connection is then closed once header_timeout passes
    // without a new request head (the timer re-arms for every request).
    let (got, closed, at) = read_until_closed(&mut s, UPPER + T).await;
    assert!(closed, "idle keep-alive connection still open");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert_timed("idle keep-alive: closed", at - t0);
    gw.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_body_gets_408_in_openai_shape() {
    let (sim, gw) = limited_gateway("").await;
    let t0 = Instant::now();
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let r = read_response(&mut s, UPPER + T)
        .await
        .expect("a 408 response, not a bare close");
    let answered = t0.elapsed();
    assert_eq!(r.status, 408, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.header("x-request-id").is_some());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let e = &v["error"];
    assert_eq!(e["code"], "request_timeout", "{v}");
    assert_eq!(e["type"], "invalid_request_error", "{v}");
    assert!(e["message"].is_string() && e.get("param").is_some(), "{v}");
    assert_timed("stalled body: 408", answered);
    // The rest of the body never came: the connection is not reused.
    let (got, closed, at) = read_until_closed(&mut s, T).await;
    assert!(closed, "connection kept open after an unfinished body");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    println!(
        "stalled body: closed {:?} after the 408",
        at - t0 - answered
    );
    assert_eq!(sim.stats().completion_requests, 0, "nothing proxied");
    // Counted as an API request with status 408.
    assert!(get(&client(), gw.addr(), "/metrics")
        .await
        .text()
        .contains("status=\"408\""));
    gw.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_request_body_does_not_extend_the_body_timeout() {
    let (_sim, gw) = limited_gateway("").await;
    let t0 = Instant::now();
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        .await
        .unwrap();
    // One body byte every 100 ms: 1000 bytes would take 100 s.
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            },
            _ = pace.tick() => {
                if s.write_all(b" ").await.is_err() {
                    break;
                }
                assert!(t0.elapsed() < UPPER + T, "trickled body kept the request open");
            }
        }
        if got.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let elapsed = t0.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_timed("trickled body: 408", elapsed);
    gw.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_timeout_does_not_cut_slow_responses_or_streams() {
    // header_timeout bounds what the client sends, not how long the model
    // takes: a 2 s non-streamed answer and a 2 s stream both complete.
    let sim = sim_with(SimConfig {
        models: vec!["alpha".into()],
        tokens_per_second: Some(10.0),
        ..Default::default()
    })
    .await;
    let s = settings(
        &[m("alpha", sim.addr.port())],
        "auth = false\nheader_timeout = \"1s\"",
    );
    let gw = gateway(&s, None).await;
    let c = client();
    wait_model_state(&c, gw.addr(), "alpha", "ready").await;
    for stream in [false, true] {
        let body = serde_json::json!({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": stream}).to_string();
        let t0 = Instant::now();
        let r = send(
            &c,
            "POST",
            gw.addr(),
            "/v1/chat/completions",
            Some(&body),
            &[],
        )
        .await;
        let elapsed = t0.elapsed();
        println!("stream={stream}: 20 tokens at 10/s took {elapsed:?}");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(elapsed > HEADER_TIMEOUT, "{elapsed:?}");
        if stream {
            assert!(
                r.text().trim_end().ends_with("data: [DONE]"),
                "{}",
                r.text()
            );
        } else {
            assert_eq!(r.json()["usage"]["completion_tokens"], 20, "{}", r.text());
        }
    }
    gw.shutdown(T).await;
}

const CHAT_ORIGIN: &str = "https://chat.example.com";

async fn preflight(addr: std::net::SocketAddr, origin: &str) -> Resp {
    send(
        &client(),
        "OPTIONS",
        addr,
        "/v1/chat/completions",
        None,
        &[
            ("origin", origin),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization, content-type",
            ),
        ],
    )
    .await
}

async fn chat_from(addr: std::net::SocketAddr, origin: &str, key: Option<&str>) -> Resp {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut h = vec![("origin", origin)];
    if let Some(a) = &auth {
        h.push(("authorization", a.as_str()));
    }
    send(
        &client(),
        "POST",
        addr,
        "/v1/chat/completions",
        Some(&chat("alpha")),
        &h,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_without_cors_origins() {
    let (_sim, gw) = limited_gateway("").await;
    let r = preflight(gw.addr(), "https://x.example").await;
    println!("preflight without cors_origins: {}", r.status);
    assert_ne!(r.status, 204);
    assert!(r.status >= 400, "{}", r.status);
    assert!(
        !r.headers.contains_key("access-control-allow-origin"),
        "{:?}",
        r.headers
    );
    assert!(!r.headers.contains_key("access-control-allow-methods"));
    let r = chat_from(gw.addr(), "https://x.example", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        !r.headers.contains_key("access-control-allow-origin"),
        "{:?}",
        r.headers
    );
    gw.shutdown(T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_only_configured_origins() {
    // Auth on: a preflight carries no key and must still succeed, and a 401
    // must carry the CORS headers so the page can read the error.
    let sim = sim("alpha").await;
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(dir.path(), &["sk-one-0123456789abcdef0123456789abcdef"]);
    let s = settings(
        &[m("alpha", sim.addr.port())],
        &format!("auth = true\ncors_origins = [\"{CHAT_ORIGIN}\"]"),
    );
    let gw = gateway(&s, Some(keys)).await;
    wait_model_state(&client(), gw.addr(), "alpha", "ready").await;

    let r = preflight(gw.addr(), CHAT_ORIGIN).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    let h = |name: &str| {
        r.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_ascii_lowercase())
            .unwrap_or_default()
    };
    assert_eq!(h("access-control-allow-origin"), CHAT_ORIGIN);
    assert!(
        h("access-control-allow-methods").contains("post"),
        "{r:?}",
        r = r.headers
    );
    for needed in ["authorization", "content-type"] {
        assert!(
            h("access-control-allow-headers").contains(needed),
            "{needed}: {:?}",
            r.headers
        );
    }
    assert!(h("vary").contains("origin"), "{:?}", r.headers);

    // A request from the allowed origin: allow-origin, and X-Request-Id readable.
    let r = chat_from(
        gw.addr(),
        CHAT_ORIGIN,
        Some("sk-one-0123456789abcdef0123456789abcdef"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.headers.get("access-control-allow-origin").unwrap(),
        CHAT_ORIGIN
    );
    assert!(r
        .headers
        .get("access-control-expose-headers")
        .unwrap()
        .to_str()
        .unwrap()
        .contains("x-request-id"));
    let r = chat_from(gw.addr(), CHAT_ORIGIN, None).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.headers.get("access-control-allow-origin").unwrap(),
        CHAT_ORIGIN
    );

    // Any other origin: no CORS headers, preflight or not.
    for other in [
        "https://x.example",
        "https://chat.example.com.evil.example",
        "null",
    ] {
        let r = preflight(gw.addr(), other).await;
        assert_ne!(r.status, 204, "{other}");
        assert!(
            !r.headers.contains_key("access-control-allow-origin"),
            "{other}: {:?}",
            r.headers
        );
        let r = chat_from(
            gw.addr(),
            other,
            Some("sk-one-0123456789abcdef0123456789abcdef"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            !r.headers.contains_key("access-control-allow-origin"),
            "{other}: {:?}",
            r.headers
        );
    }
    gw.shutdown(T).await;
}
