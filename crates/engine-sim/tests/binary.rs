//! The `citadel-engine-sim` binary as a real process.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hyper::StatusCode;

const BIN: &str = env!("CARGO_BIN_EXE_citadel-engine-sim");

/// Kills the child if a test panics before it exits.
struct Guard(Child);

impl std::ops::Deref for Guard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Guard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts the binary on an ephemeral port; returns it and the address parsed
/// from its start line.
fn start(args: &[&str]) -> (Guard, SocketAddr) {
    let child = Command::new(BIN)
        .args(["--port", "0", "--model", "m"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Guard(child);
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("citadel-engine-sim: simulating model(s) m"),
        "{line}"
    );
    let addr = line
        .split_whitespace()
        .find_map(|w| w.trim_end_matches(',').parse::<SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in stderr.lines() {});
    (child, addr)
}

fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

async fn wait_healthy(addr: SocketAddr) {
    eventually(Duration::from_secs(10), "/health 200", || async {
        matches!(
            tokio::time::timeout(
                Duration::from_secs(1),
                request(addr, hyper::Method::GET, "/health", None)
            )
            .await,
            Ok(Ok((StatusCode::OK, _)))
        )
    })
    .await;
}

#[tokio::test]
async fn sigterm_exits_zero_promptly() {
    let (mut child, addr) = start(&["--load-time", "100ms"]);
    wait_healthy(addr).await;
    signal(&child, "-TERM");
    let st = wait_exit(&mut child, Duration::from_secs(3));
    assert_eq!(st.code(), Some(0), "{st:?}");
}

#[tokio::test]
async fn sigint_exits_zero() {
    let (mut child, addr) = start(&[]);
    wait_healthy(addr).await;
    signal(&child, "-INT");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(3)).code(),
        Some(0)
    );
}

#[tokio::test]
async fn crash_after_exits_nonzero() {
    let (mut child, addr) = start(&["--crash-after", "2"]);
    wait_healthy(addr).await;
    let body = r#"{"model":"m","prompt":"x"}"#;
    assert_eq!(post(addr, "/v1/completions", body).await.0, StatusCode::OK);
    let second = tokio::time::timeout(
        Duration::from_secs(5),
        request(addr, hyper::Method::POST, "/v1/completions", Some(body)),
    )
    .await
    .expect("client hung");
    assert!(second.is_err(), "the crashing request must not be answered");
    let st = wait_exit(&mut child, Duration::from_secs(5));
    assert_eq!(st.code(), Some(70), "{st:?}");
}

#[tokio::test]
async fn crash_on_start_exits_nonzero_at_once() {
    let out = Command::new(BIN).arg("--crash-on-start").output().unwrap();
    assert_eq!(out.status.code(), Some(70));
    assert!(String::from_utf8_lossy(&out.stderr).contains("crash-on-start"));
}

#[tokio::test]
async fn crash_via_control_endpoint_exits_nonzero() {
    let (mut child, addr) = start(&[]);
    wait_healthy(addr).await;
    assert_eq!(
        post(addr, "/sim/fault", r#"{"crash":true}"#).await.0,
        StatusCode::OK
    );
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(5)).code(),
        Some(70)
    );
}

#[tokio::test]
async fn hang_after_zero_hangs_health_and_sigterm_still_works() {
    let (mut child, addr) = start(&["--hang-after", "0"]);
    assert_eq!(
        get_within(addr, "/health", Duration::from_millis(500)).await,
        None
    );
    // The control endpoint still answers.
    assert_eq!(get(addr, "/sim/stats").await.0, StatusCode::OK);
    signal(&child, "-TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(5)).code(),
        Some(0)
    );
}

#[tokio::test]
async fn cli_flags_health_lies_and_multiple_models() {
    let (mut child, addr) = start(&["--model", "n", "--health-lies", "--load-time", "200ms"]);
    wait_healthy(addr).await;
    let models = json(&get(addr, "/v1/models").await.1);
    assert_eq!(models["data"][0]["id"], "m");
    assert_eq!(models["data"][1]["id"], "n");
    let (st, _) = post(addr, "/v1/completions", r#"{"model":"n","prompt":"x"}"#).await;
    assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR);
    signal(&child, "-TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(3)).code(),
        Some(0)
    );
}

#[test]
fn bad_duration_is_a_usage_error() {
    let out = Command::new(BIN)
        .args(["--load-time", "5x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Starts a 60-token stream at 20 tokens/s (3 s) and sends SIGTERM once its
/// first event arrived: (the stream, whether a new connection was refused
/// while it drained, the exit status).
async fn sigterm_during_stream(args: &[&str]) -> (Streamed, bool, ExitStatus) {
    let mut all = vec!["--tokens-per-second", "20"];
    all.extend_from_slice(args);
    let (mut child, addr) = start(&all);
    wait_healthy(addr).await;
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let stream = tokio::spawn(async move {
        post_stream_notify(
            addr,
            "/v1/completions",
            &serde_json::json!({"model": "m", "prompt": "x", "max_tokens": 60, "stream": true}),
            first_tx,
        )
        .await
    });
    first_rx.await.expect("the stream's first event");
    signal(&child, "-TERM");
    // The listener closes at once: poll until a connect is refused, while
    // the stream is still running.
    let refused_while_draining = {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                break !stream.is_finished();
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let streamed = stream.await.expect("stream task");
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(10)))
            .await
            .unwrap();
    (streamed, refused_while_draining, status)
}

/// Issue 10, item 1: a graceful stop must not cut requests in flight. The
/// simulator gave them a hard-coded 2 s after SIGTERM, so a 3 s stream was
/// cut; now `--shutdown-grace` (default 30 s) lets it finish with [DONE],
/// while new connections are refused from SIGTERM on.
#[tokio::test]
async fn issue10_sigterm_lets_a_stream_in_flight_finish() {
    let (streamed, refused, status) = sigterm_during_stream(&[]).await;
    let events = streamed.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "the stream was cut after {} events",
        events.len()
    );
    let finished = events
        .iter()
        .any(|e| e.contains(r#""finish_reason":"length""#));
    assert!(finished, "no final chunk in {} events", events.len());
    assert!(
        streamed.started.elapsed() > Duration::from_secs(2),
        "the stream ran past the old 2 s grace"
    );
    assert!(refused, "a new connection was accepted after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// Issue 10, item 1: the grace period still bounds a stop: with
/// `--shutdown-grace 500ms` the 3 s stream is cut (no [DONE]) and the
/// process exits 0 well before the stream would have ended.
#[tokio::test]
async fn issue10_shutdown_grace_bounds_the_stop() {
    let t = Instant::now();
    let (streamed, refused, status) = sigterm_during_stream(&["--shutdown-grace", "500ms"]).await;
    let all: Vec<u8> = streamed
        .frames
        .iter()
        .flat_map(|(_, b)| b.to_vec())
        .collect();
    let text = String::from_utf8_lossy(&all);
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(refused);
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}
