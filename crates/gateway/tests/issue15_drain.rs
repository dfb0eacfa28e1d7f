//! Issue 15, items 1 and 2: draining backends and temporary backends through
//! the gateway's admin channel (HTTP over a Unix socket), for rolling
//! restarts and blue/green upgrades without a failed request.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use citadel_engine_sim::{SimConfig, SimHandle};
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

const GATEWAY: &str = "auth = false";
const WORKERS: usize = 4;

/// One request on the admin socket: (status, JSON body).
async fn admin(
    path: &Path,
    method: &str,
    uri: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .expect("connect to the admin socket");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let resp = send.send_request(req).await.expect("admin answer");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "admin answer not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, v)
}

async fn post(path: &Path, uri: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    admin(path, "POST", uri, Some(body)).await
}

/// The admin view of the backend with `url`.
async fn backend(path: &Path, url: &str) -> Option<serde_json::Value> {
    let (status, v) = admin(path, "GET", "/admin/backends", None).await;
    assert_eq!(status, 200, "{v}");
    v["models"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["backends"].as_array().unwrap().iter())
        .find(|b| b["url"] == url)
        .cloned()
}

/// A gateway for `models` with its admin channel on a socket in `dir`.
async fn gateway_with_admin(models: &[M<'_>], dir: &Path) -> (citadel_gateway::Server, PathBuf) {
    let gw = gateway(&settings(models, GATEWAY), None).await;
    let path = dir.join("admin.sock");
    let l = citadel_gateway::listen::bind_admin(&path).unwrap();
    l.set_nonblocking(true).unwrap();
    gw.serve_admin(tokio::net::UnixListener::from_std(l).unwrap());
    (gw, path)
}

/// A simulator slow enough that streams overlap a drain (4 tokens at 100/s).
async fn slow_sim(model: &str) -> SimHandle {
    sim_with(SimConfig {
        models: vec![model.into()],
        tokens_per_second: Some(100.0),
        ..Default::default()
    })
    .await
}

/// A chat completion; a stream counts as answered only when it ends with
/// `[DONE]`. Returns the status (0: no answer or a broken stream).
async fn one(c: &HttpClient, addr: SocketAddr, stream: bool) -> u16 {
    let body = serde_json::json!({
        "model": "alpha",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "stream": stream,
    })
    .to_string();
    let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    match c.request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match resp.into_body().collect().await.map(|b| b.to_bytes()) {
                Ok(b) if !stream || b.ends_with(b"data: [DONE]\n\n") => status,
                _ => 0,
            }
        }
        Err(_) => 0,
    }
}

/// `WORKERS` clients (half of them streaming), one request after another,
/// until `stop` is set; each returns its statuses.
fn load(addr: SocketAddr, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<Vec<u16>>> {
    (0..WORKERS)
        .map(|w| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let c = client();
                let mut out = Vec::new();
                while !stop.load(Relaxed) {
                    out.push(one(&c, addr, w % 2 == 1).await);
                }
                out
            })
        })
        .collect()
}

/// Two replicas under steady load (streams and non-streams): draining one,
/// it gets no new request from the moment its in-flight count reaches zero
/// (which it does), the other serves everything, and no request fails;
/// admitted again, it is ready at once and serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue15_drained_backend_gets_no_new_request_and_in_flight_reaches_zero() {
    let a = slow_sim("alpha").await;
    let b = slow_sim("alpha").await;
    let mut ma = m("alpha", a.addr.port());
    ma.replicas = vec![b.url()];
    let dir = tempfile::tempdir().unwrap();
    let (gw, sock) = gateway_with_admin(&[ma], dir.path()).await;
    let c = client();
    wait_backend_state(&c, gw.addr(), "alpha", &b.url(), "ready").await;
    wait_backend_state(&c, gw.addr(), "alpha", &a.url(), "ready").await;

    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(gw.addr(), stop.clone());
    wait_until(Duration::from_secs(10), "load on both replicas", || async {
        a.stats().completions_ok > 10 && b.stats().completions_ok > 10
    })
    .await;

    let (status, v) = post(&sock, "/admin/drain", serde_json::json!({"url": b.url()})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["url"], b.url());
    assert_eq!(v["drained"], true, "{v}");
    assert_eq!(v["temporary"], false, "{v}");
    // What it had in flight finishes (streams to their end).
    wait_until(
        Duration::from_secs(10),
        "the drained backend's in-flight count at 0",
        || async { backend(&sock, &b.url()).await.unwrap()["in_flight"] == 0 },
    )
    .await;
    let at_zero = b.stats().completion_requests;
    let a_then = a.stats().completions_ok;
    wait_until(
        Duration::from_secs(10),
        "the other replica serves 40 more",
        || async { a.stats().completions_ok > a_then + 40 },
    )
    .await;
    assert_eq!(
        b.stats().completion_requests,
        at_zero,
        "a drained backend received new requests"
    );
    let seen = backend(&sock, &b.url()).await.unwrap();
    assert_eq!(seen["drained"], true, "{seen}");
    assert_eq!(seen["health"], "ready", "drained is not down: {seen}");
    // The model still serves: /health/models says so, with the flag.
    let h = get(&c, gw.addr(), "/health/models").await.json();
    assert_eq!(h["models"][0]["state"], "ready", "{h}");
    assert!(
        h["models"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["url"] == b.url() && x["drained"] == true),
        "{h}"
    );

    let (status, v) = post(&sock, "/admin/admit", serde_json::json!({"url": b.url()})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["drained"], false, "{v}");
    assert_eq!(v["health"], "ready", "admit probes at once: {v}");
    let before = b.stats().completions_ok;
    wait_until(
        Duration::from_secs(10),
        "the admitted backend serves again",
        || async { b.stats().completions_ok > before + 5 },
    )
    .await;

    stop.store(true, Relaxed);
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.extend(t.await.unwrap());
    }
    let failed = statuses.iter().filter(|s| **s != 200).count();
    println!(
        "PERF issue15 drain under load: {} requests, {failed} failed",
        statuses.len()
    );
    assert_eq!(failed, 0, "failed requests: {statuses:?}");
    for x in [&a, &b] {
        let url = x.url();
        wait_until(
            Duration::from_secs(5),
            "in-flight counts back at 0",
            || async { backend(&sock, &url).await.unwrap()["in_flight"] == 0 },
        )
        .await;
    }
}

/// Every backend of a model drained: the model answers 503 model_not_ready,
/// as when they are down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue15_model_with_every_backend_drained_answers_503() {
    let a = sim("alpha").await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, sock) = gateway_with_admin(&[m("alpha", a.addr.port())], dir.path()).await;
    let c = client();
    wait_model_state(&c, gw.addr(), "alpha", "ready").await;
    let (status, _) = post(&sock, "/admin/drain", serde_json::json!({"url": a.url()})).await;
    assert_eq!(status, 200);
    let r = post_chat(&c, gw.addr(), "alpha").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error_code(), "model_not_ready");
    assert!(r.headers.contains_key("retry-after"));
    let (status, _) = post(&sock, "/admin/admit", serde_json::json!({"url": a.url()})).await;
    assert_eq!(status, 200);
    assert_eq!(post_chat(&c, gw.addr(), "alpha").await.status, 200);
}

/// A temporary backend (a surge instance): added, probed and routed to once
/// ready; refused twice (409) or for an unknown model (404); removed, it gets
/// nothing more. Unknown URLs are 404, removing a configured backend 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue15_temporary_backend_is_added_routed_to_and_removed() {
    let a = sim("alpha").await;
    let t = sim("alpha").await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, sock) = gateway_with_admin(&[m("alpha", a.addr.port())], dir.path()).await;
    let c = client();
    wait_model_state(&c, gw.addr(), "alpha", "ready").await;

    let add = serde_json::json!({"model": "alpha", "url": t.url()});
    let (status, v) = post(&sock, "/admin/add", add.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["temporary"], true, "{v}");
    let (status, v) = post(&sock, "/admin/add", add).await;
    assert_eq!(status, 409, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    let (status, v) = post(
        &sock,
        "/admin/add",
        serde_json::json!({"model": "nope", "url": "http://127.0.0.1:1"}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    for path in ["/admin/drain", "/admin/admit", "/admin/remove"] {
        let (status, v) = post(
            &sock,
            path,
            serde_json::json!({"url": "http://127.0.0.1:1"}),
        )
        .await;
        assert_eq!(status, 404, "{path}: {v}");
        assert_eq!(v["error"]["code"], "backend_not_found", "{v}");
    }
    let (status, v) = post(&sock, "/admin/remove", serde_json::json!({"url": a.url()})).await;
    assert_eq!(status, 409, "a configured backend is not removed: {v}");

    wait_until(
        Duration::from_secs(10),
        "the temporary backend ready",
        || async { backend(&sock, &t.url()).await.unwrap()["health"] == "ready" },
    )
    .await;
    let h = get(&c, gw.addr(), "/health/models").await.json();
    assert_eq!(
        h["models"][0]["backends"].as_array().unwrap().len(),
        2,
        "{h}"
    );
    wait_until(
        Duration::from_secs(10),
        "the temporary backend serves",
        || async {
            assert_eq!(post_chat(&c, gw.addr(), "alpha").await.status, 200);
            t.stats().completions_ok > 2
        },
    )
    .await;

    let (status, v) = post(&sock, "/admin/remove", serde_json::json!({"url": t.url()})).await;
    assert_eq!(status, 200, "{v}");
    assert!(backend(&sock, &t.url()).await.is_none());
    let n = t.stats().completion_requests;
    for _ in 0..10 {
        assert_eq!(post_chat(&c, gw.addr(), "alpha").await.status, 200);
    }
    assert_eq!(
        t.stats().completion_requests,
        n,
        "a removed backend got requests"
    );
    // Its prober stopped: no further health checks.
    let probes = t.stats().health_requests;
    let a_probes = a.stats().health_requests;
    wait_until(
        Duration::from_secs(5),
        "three more probes of the configured backend",
        || async { a.stats().health_requests >= a_probes + 3 },
    )
    .await;
    assert!(
        t.stats().health_requests <= probes + 1,
        "the removed backend is still probed"
    );
}

/// A reload (SIGHUP) keeps drain flags and temporary backends by URL, and
/// the in-flight counts of kept backends; a backend the new config drops
/// goes, a temporary backend whose model goes goes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue15_drain_flags_temporary_backends_and_in_flight_survive_a_reload() {
    let a = sim_with(SimConfig {
        models: vec!["alpha".into()],
        tokens_per_second: Some(20.0),
        ..Default::default()
    })
    .await;
    let b = sim("alpha").await;
    let t = sim("alpha").await;
    let z = sim("zeta").await;
    let with_b = || {
        let mut ma = m("alpha", a.addr.port());
        ma.replicas = vec![b.url()];
        vec![ma, m("zeta", z.addr.port())]
    };
    let dir = tempfile::tempdir().unwrap();
    let (gw, sock) = gateway_with_admin(&with_b(), dir.path()).await;
    let c = client();
    wait_backend_state(&c, gw.addr(), "alpha", &b.url(), "ready").await;
    wait_backend_state(&c, gw.addr(), "alpha", &a.url(), "ready").await;
    wait_model_state(&c, gw.addr(), "zeta", "ready").await;
    assert_eq!(
        post(&sock, "/admin/drain", serde_json::json!({"url": b.url()}))
            .await
            .0,
        200
    );
    // A long answer in flight on `a` (the only backend left to route to) (40 tokens at 20/s: 2 s) across the reload.
    let addr = gw.addr();
    let long = tokio::spawn(async move {
        let body = serde_json::json!({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": true}).to_string();
        send(
            &client(),
            "POST",
            addr,
            "/v1/chat/completions",
            Some(&body),
            &[],
        )
        .await
    });
    wait_until(
        Duration::from_secs(5),
        "the long answer in flight on a",
        || async { backend(&sock, &a.url()).await.unwrap()["in_flight"] == 1 },
    )
    .await;

    assert_eq!(
        post(
            &sock,
            "/admin/add",
            serde_json::json!({"model": "alpha", "url": t.url()})
        )
        .await
        .0,
        200
    );
    let tz = "http://127.0.0.1:9";
    assert_eq!(
        post(
            &sock,
            "/admin/add",
            serde_json::json!({"model": "zeta", "url": tz})
        )
        .await
        .0,
        200
    );
    gw.reload(&settings(&with_b(), GATEWAY)).unwrap();
    let vb = backend(&sock, &b.url()).await.unwrap();
    assert_eq!(vb["drained"], true, "the drain survives a reload: {vb}");
    let vt = backend(&sock, &t.url())
        .await
        .expect("the temporary backend survives a reload");
    assert_eq!(vt["temporary"], true, "{vt}");
    assert!(backend(&sock, tz).await.is_some());
    assert_eq!(
        backend(&sock, &a.url()).await.unwrap()["in_flight"],
        1,
        "a reload keeps in-flight counts"
    );

    // Without b and zeta: b and zeta's temporary backend go, t stays.
    gw.reload(&settings(&[m("alpha", a.addr.port())], GATEWAY))
        .unwrap();
    assert!(backend(&sock, &b.url()).await.is_none());
    assert!(backend(&sock, tz).await.is_none());
    assert!(backend(&sock, &t.url()).await.is_some());
    // b back in the config: a new backend, not drained (its flag went with it).
    gw.reload(&settings(&with_b(), GATEWAY)).unwrap();
    assert_eq!(backend(&sock, &b.url()).await.unwrap()["drained"], false);

    let r = long.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().ends_with("data: [DONE]\n\n"), "{}", r.text());
    wait_until(
        Duration::from_secs(5),
        "a's in-flight count at 0",
        || async { backend(&sock, &a.url()).await.unwrap()["in_flight"] == 0 },
    )
    .await;
}

/// A client that goes away (a non-streamed answer still being generated, a
/// stream half read) leaves no in-flight count behind: a drain would wait
/// for it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue15_abandoned_requests_leave_no_in_flight_count() {
    let a = sim_with(SimConfig {
        models: vec!["alpha".into()],
        tokens_per_second: Some(20.0),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, sock) = gateway_with_admin(&[m("alpha", a.addr.port())], dir.path()).await;
    let c = client();
    wait_model_state(&c, gw.addr(), "alpha", "ready").await;
    let addr = gw.addr();
    for stream in [false, true] {
        let body = serde_json::json!({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": stream}).to_string();
        let task = tokio::spawn(async move {
            let c = client();
            let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let resp = c.request(req).await.unwrap();
            let mut body = resp.into_body();
            // Read one frame, then wait (dropped by the abort below).
            let _ = body.frame().await;
            std::future::pending::<()>().await;
        });
        wait_until(Duration::from_secs(5), "the request in flight", || async {
            backend(&sock, &a.url()).await.unwrap()["in_flight"] == 1
        })
        .await;
        task.abort();
        let _ = task.await;
        wait_until(
            Duration::from_secs(10),
            &format!("in_flight back at 0 (stream: {stream})"),
            || async { backend(&sock, &a.url()).await.unwrap()["in_flight"] == 0 },
        )
        .await;
    }
}

/// The binary's `--admin-socket PATH`: bound with mode 0600, serving the
/// admin channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue15_admin_socket_option_binds_a_private_socket() {
    use std::os::unix::fs::PermissionsExt;
    let a = sim("alpha").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("citadel.toml");
    std::fs::write(&cfg, config_text(&[m("alpha", a.addr.port())], GATEWAY)).unwrap();
    let sock = dir.path().join("admin.sock");
    // A stale socket file from a killed run is replaced.
    std::fs::write(&sock, "").unwrap();
    let p = spawn_gateway(&cfg, &["--admin-socket", sock.to_str().unwrap()]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode {mode:o}");
    let (status, v) = admin(&sock, "GET", "/admin/backends", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["models"][0]["model"], "alpha", "{v}");
    assert_eq!(v["models"][0]["backends"][0]["url"], a.url(), "{v}");
    let (status, _) = admin(&sock, "GET", "/admin/nope", None).await;
    assert_eq!(status, 404);
    drop(p);
}

/// Under systemd the API and admin sockets both come from PID 1 and are told
/// apart by `FileDescriptorName=` (LISTEN_FDNAMES): here through systemd's own
/// `systemd-socket-activate`, the admin socket passed first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue15_admin_socket_from_systemd_is_told_apart_by_name() {
    use std::io::{BufRead, BufReader};
    let a = sim("alpha").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("citadel.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nlisten = \"127.0.0.1\"\nport = {port}\nauth = false\nprobe_interval = \"100ms\"\n\
             [models.alpha]\nport = {}\nengine = \"sim\"\n",
            a.addr.port()
        ),
    )
    .unwrap();
    let sock = dir.path().join("admin.sock");
    let mut child = std::process::Command::new("/usr/bin/systemd-socket-activate")
        .arg("-l")
        .arg(&sock)
        .arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--fdname=admin:api")
        .arg(BIN)
        .arg("--config")
        .arg(&cfg)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn systemd-socket-activate");
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[activate] {line}");
        }
    });
    // The socket exists once the activator listens.
    wait_until(
        Duration::from_secs(20),
        "the admin socket bound",
        || async { sock.exists() },
    )
    .await;
    // The first connection (to the admin socket) starts the gateway.
    let (status, v) = admin(&sock, "GET", "/admin/backends", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["models"][0]["backends"][0]["url"], a.url(), "{v}");
    let c = client();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_model_state(&c, addr, "alpha", "ready").await;
    assert_eq!(post_chat(&c, addr, "alpha").await.status, 200);
    let _ = child.kill();
    let _ = child.wait();
}
