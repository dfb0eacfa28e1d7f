//! Issue 12 (the API path's security), items 2 to 5, over real HTTP against
//! in-process gateways and simulators: rate limits, request loops, key
//! guessing, short keys and the status endpoints. Item 6 (a stream the engine
//! breaks off) is in `journal.rs`, where the request's log entry is captured.
//! The limiter's arithmetic (any 60 s window, exact `Retry-After`) is tested
//! with a fake clock in `src/ratelimit.rs`, the back-off in `src/throttle.rs`.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const T: Duration = Duration::from_secs(10);
/// A key long enough (32 characters or more).
const KEY: &str = "sk-issue12-0123456789abcdef0123456789abcdef";
const OTHER_KEY: &str = "sk-issue12-other-0123456789abcdef0123456789";

/// A client whose connections come from `local` (any 127.0.0.0/8 address is
/// this host's loopback on Linux): a second client address for the tests.
fn client_from(local: IpAddr) -> HttpClient {
    let mut c = hyper_util::client::legacy::connect::HttpConnector::new();
    c.set_nodelay(true);
    c.set_local_address(Some(local));
    Client::builder(TokioExecutor::new()).build(c)
}

fn bearer(k: &str) -> String {
    format!("Bearer {k}")
}

async fn chat_with_key(c: &HttpClient, addr: SocketAddr, model: &str, key: &str) -> Resp {
    send(
        c,
        "POST",
        addr,
        "/v1/chat/completions",
        Some(&chat(model)),
        &[("authorization", &bearer(key))],
    )
    .await
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Open files of this test process (gateway and simulators run in it).
fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Item 3: a replica that is the gateway itself (validation cannot see it:
/// here the gateway's port is ephemeral) used to be forwarded to itself
/// thousands of times (20,000 open files in 2 s). Now the request comes back
/// once, is refused with 508 `loop_detected`, and that is the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_replica_pointing_at_the_gateway_gets_one_508() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw_addr = listener.local_addr().unwrap();
    // The model's own engine is down (nothing listens on its port).
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let mut alpha = m("alpha", dead_port);
    alpha.replicas = vec![format!("http://{gw_addr}")];
    let s = settings(&[alpha], "auth = false");
    let gw = citadel_gateway::start(&s, citadel_gateway::KeySource::Credential, listener)
        .await
        .expect("gateway starts");
    let c = client();
    // The gateway's own /health answers 200, so the replica looks ready.
    wait_backend_state(&c, gw_addr, "alpha", &format!("http://{gw_addr}"), "ready").await;
    let files_before = open_files();
    let r = tokio::time::timeout(T, post_chat(&c, gw_addr, "alpha"))
        .await
        .expect("a looping request must be answered, not forwarded forever");
    assert_eq!(r.status, 508, "{}", r.text());
    assert_eq!(r.error_code(), "loop_detected");
    assert_eq!(r.json()["error"]["type"], "server_error");
    let m = get(&c, gw_addr, "/metrics").await.text();
    assert_eq!(
        metric(&m, "citadel_gateway_loops_detected_total"),
        1.0,
        "{m}"
    );
    // The client's request answered 508 (the looped one, refused before its
    // body was read, is counted without a model).
    assert_eq!(
        metric(
            &m,
            "citadel_gateway_requests_total{model=\"alpha\",status=\"508\"}"
        ),
        1.0,
        "{m}"
    );
    let files_after = open_files();
    assert!(
        files_after < files_before + 20,
        "open files {files_before} -> {files_after}"
    );
    gw.shutdown(T).await;
}

/// Item 3, two gateways whose replicas point at each other: the request goes
/// A -> B -> A once, A recognises its own hop mark, and the 508 comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_loop_between_two_gateways_is_refused_after_one_round() {
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let start = |listener, other: SocketAddr| {
        let mut alpha = m("alpha", dead_port);
        alpha.replicas = vec![format!("http://{other}")];
        let s = settings(&[alpha], "auth = false");
        async move {
            citadel_gateway::start(&s, citadel_gateway::KeySource::Credential, listener)
                .await
                .expect("gateway starts")
        }
    };
    let ga = start(la, b).await;
    let gb = start(lb, a).await;
    let c = client();
    wait_backend_state(&c, a, "alpha", &format!("http://{b}"), "ready").await;
    wait_backend_state(&c, b, "alpha", &format!("http://{a}"), "ready").await;
    let r = tokio::time::timeout(T, post_chat(&c, a, "alpha"))
        .await
        .expect("answered");
    assert_eq!((r.status, r.error_code().as_str()), (508, "loop_detected"));
    let loops = |addr| {
        let c = c.clone();
        async move {
            metric(
                &get(&c, addr, "/metrics").await.text(),
                "citadel_gateway_loops_detected_total",
            )
        }
    };
    assert_eq!((loops(a).await, loops(b).await), (1.0, 0.0));
    ga.shutdown(T).await;
    gb.shutdown(T).await;
}

/// Item 3: a client cannot push a request past the hop limit either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_too_many_hops_are_refused() {
    let sim = sim("alpha").await;
    let s = settings(&[m("alpha", sim.addr.port())], "auth = false");
    let gw = gateway(&s, None).await;
    let c = client();
    wait_model_state(&c, gw.addr(), "alpha", "ready").await;
    let via = "1.1 citadel-a, 1.1 citadel-b, 1.0 proxy.example, 1.1 citadel-c, 1.1 citadel-d";
    let r = send(
        &c,
        "POST",
        gw.addr(),
        "/v1/chat/completions",
        Some(&chat("alpha")),
        &[("via", via)],
    )
    .await;
    assert_eq!((r.status, r.error_code().as_str()), (508, "loop_detected"));
    // Fewer hops (and other proxies) pass.
    let r = send(
        &c,
        "POST",
        gw.addr(),
        "/v1/chat/completions",
        Some(&chat("alpha")),
        &[("via", "1.1 citadel-a, 1.1 nginx")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    gw.shutdown(T).await;
}

/// Item 4: 1,000 wrong keys from one address were all answered 401 in
/// 0.03 s. Now the address is throttled after ten (429 with `Retry-After`,
/// without its keys being looked at), while a good key from another address
/// still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_wrong_keys_are_throttled_per_address() {
    let sim = sim("alpha").await;
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(dir.path(), &[KEY]);
    let s = settings(
        &[m("alpha", sim.addr.port())],
        "auth = true\nrate_limit_per_minute = 1000",
    );
    let gw = gateway(&s, Some(keys)).await;
    let addr = gw.addr();
    let attacker = client();
    wait_model_state(&attacker, addr, "alpha", "ready").await;
    let (mut unauthorized, mut throttled) = (0, 0);
    for i in 0..1000 {
        let guess = format!("sk-guess-{i:032}");
        let r = chat_with_key(&attacker, addr, "alpha", &guess).await;
        match (r.status, r.error_code().as_str()) {
            (401, "invalid_api_key") => unauthorized += 1,
            (429, "too_many_invalid_keys") => {
                throttled += 1;
                let ra: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=900).contains(&ra), "retry-after {ra}");
                assert_eq!(r.json()["error"]["type"], "rate_limit_error");
            }
            other => panic!("guess {i}: {other:?}"),
        }
    }
    println!("1000 wrong keys: {unauthorized} x 401, {throttled} x 429");
    assert!(throttled >= 980, "{unauthorized} x 401, {throttled} x 429");
    // The throttled address is refused even with the right key ...
    let r = chat_with_key(&attacker, addr, "alpha", KEY).await;
    assert_eq!(r.status, 429, "{}", r.text());
    // ... while another address with the right key is served.
    let other = client_from("127.0.0.2".parse().unwrap());
    let r = chat_with_key(&other, addr, "alpha", KEY).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = get(&other, addr, "/metrics").await.text();
    assert!(
        metric(&m, "citadel_gateway_auth_throttled_total") >= 980.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "citadel_gateway_auth_failures_total"),
        unauthorized as f64
    );
    gw.shutdown(T).await;
}

/// Item 4: a short key makes the binary refuse to start (exit 78) with a
/// message that says how to make a good one and does not show the key.
#[test]
fn issue12_short_key_fails_start_with_78() {
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(dir.path(), &[KEY, "tiny-secret"]);
    let cfg = dir.path().join("citadel.toml");
    std::fs::write(&cfg, config_text(&[m("alpha", 40000)], "auth = true")).unwrap();
    let mut child = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .arg("--api-keys-file")
        .arg(&keys)
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A gateway that accepts the key keeps running: give it a deadline.
    let deadline = std::time::Instant::now() + T;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway started with a short key");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("shorter than 32 characters")
            && err.contains("line 4: 11 characters")
            && err.contains("systemd-id128 new"),
        "{err}"
    );
    assert!(!err.contains("tiny-secret") && !err.contains(KEY), "{err}");
}

/// Item 4: key rotation keeps working (a reload reads the keys again), and a
/// reload that brings a short key is rejected, keeping the old keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_reload_rotates_keys_and_rejects_short_ones() {
    let sim = sim("alpha").await;
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(dir.path(), &[KEY]);
    let cfg = dir.path().join("citadel.toml");
    std::fs::write(
        &cfg,
        config_text(&[m("alpha", sim.addr.port())], "auth = true"),
    )
    .unwrap();
    let s = settings(&[m("alpha", sim.addr.port())], "auth = true");
    let gw = gateway(&s, Some(keys.clone())).await;
    let (c, addr) = (client(), gw.addr());
    wait_model_state(&c, addr, "alpha", "ready").await;
    assert_eq!(chat_with_key(&c, addr, "alpha", KEY).await.status, 200);
    // Rotation: the new key works, the old one no longer does.
    write_keys(dir.path(), &[OTHER_KEY]);
    gw.reload_from(&cfg).await.expect("rotation reloads");
    assert_eq!(
        chat_with_key(&c, addr, "alpha", OTHER_KEY).await.status,
        200
    );
    assert_eq!(chat_with_key(&c, addr, "alpha", KEY).await.status, 401);
    // A short key: the reload is rejected and the keys stay as they were.
    write_keys(dir.path(), &["short"]);
    let err = gw
        .reload_from(&cfg)
        .await
        .expect_err("a short key is refused");
    assert!(err.to_string().contains("shorter than 32"), "{err}");
    assert_eq!(
        chat_with_key(&c, addr, "alpha", OTHER_KEY).await.status,
        200
    );
    assert_eq!(chat_with_key(&c, addr, "alpha", "short").await.status, 401);
    gw.shutdown(T).await;
}

/// Item 5: `/metrics` and `/health/models` need a key once the gateway
/// listens beyond loopback (here on 0.0.0.0); `/health` and `/health/ready`
/// stay open and tell nothing about engines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_status_endpoints_need_a_key_beyond_loopback() {
    let sim = sim("alpha").await;
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(dir.path(), &[KEY]);
    let s = settings(&[m("alpha", sim.addr.port())], "auth = true");
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let gw = citadel_gateway::start(&s, citadel_gateway::KeySource::File(keys), listener)
        .await
        .expect("gateway starts");
    let addr = SocketAddr::from(([127, 0, 0, 1], gw.addr().port()));
    let c = client();
    let auth = bearer(KEY);
    let with_key = [("authorization", auth.as_str())];
    for path in ["/metrics", "/health/models"] {
        let r = get(&c, addr, path).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (401, "missing_api_key"),
            "{path}"
        );
        let r = send(
            &c,
            "GET",
            addr,
            path,
            None,
            &[("authorization", "Bearer nope")],
        )
        .await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (401, "invalid_api_key"),
            "{path}"
        );
        let r = send(&c, "GET", addr, path, None, &with_key).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    // The status endpoints do not spend the key's request budget.
    wait_until(T, "alpha ready", || async {
        let r = send(&c, "GET", addr, "/health/models", None, &with_key).await;
        r.json()["models"][0]["state"] == "ready"
    })
    .await;
    let sim_port = sim.addr.port().to_string();
    for path in ["/health", "/health/ready"] {
        let r = get(&c, addr, path).await;
        assert_eq!(r.status, 200, "{path}");
        let t = r.text();
        assert!(
            !t.contains("127.0.0.1") && !t.contains(&sim_port) && !t.contains("error"),
            "{path} tells too much: {t}"
        );
    }
    gw.shutdown(T).await;
}

/// Item 5, the other listen mode: on loopback the status endpoints stay open
/// (`citadel-systemd health` and local scrapers read them without a key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_status_endpoints_stay_open_on_loopback() {
    let sim = sim("alpha").await;
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(dir.path(), &[KEY]);
    let s = settings(&[m("alpha", sim.addr.port())], "auth = true");
    let gw = gateway(&s, Some(keys)).await;
    let c = client();
    wait_model_state(&c, gw.addr(), "alpha", "ready").await;
    for path in ["/metrics", "/health/models", "/health", "/health/ready"] {
        assert_eq!(get(&c, gw.addr(), path).await.status, 200, "{path}");
    }
    gw.shutdown(T).await;
}

/// Item 2 over HTTP: a key's budget is `rate_limit_per_minute` in any 60 s
/// window, the burst `rate_limit_burst`; `Retry-After` is the wait for the
/// next admission (here one request every 60 s / (5 - 2 + 1) = 15 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_rate_limit_burst_and_retry_after_over_http() {
    let sim = sim("alpha").await;
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(dir.path(), &[KEY]);
    let s = settings(
        &[m("alpha", sim.addr.port())],
        "auth = true\nrate_limit_per_minute = 5\nrate_limit_burst = 2",
    );
    let gw = gateway(&s, Some(keys)).await;
    let c = client();
    wait_model_state(&c, gw.addr(), "alpha", "ready").await;
    for _ in 0..2 {
        assert_eq!(chat_with_key(&c, gw.addr(), "alpha", KEY).await.status, 200);
    }
    let r = chat_with_key(&c, gw.addr(), "alpha", KEY).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (429, "rate_limit_exceeded")
    );
    let ra: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    // 15 s after the first request, less the time since (well under 5 s).
    assert!((11..=15).contains(&ra), "retry-after {ra}");
    gw.shutdown(T).await;
}
