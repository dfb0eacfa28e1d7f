//! The real `citadel-gateway` binary: exit codes, SIGHUP reload, SIGTERM drain.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use citadel_engine_sim::SimConfig;
use common::*;
use http_body_util::BodyExt;

#[test]
fn auth_without_credential_exits_78_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("citadel.toml");
    std::fs::write(
        &cfg,
        config_text(
            &[m("alpha", 40001)],
            "auth = true\napi_keys_file = \"/etc/citadel/credentials/api-keys\"",
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("LoadCredential=api-keys:/etc/citadel/credentials/api-keys"),
        "{err}"
    );

    // $CREDENTIALS_DIRECTORY without the file: still 78, naming the file.
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .env("CREDENTIALS_DIRECTORY", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("api-keys"));

    // An invalid config: 78.
    std::fs::write(&cfg, "[gateway]\nport = \"x\"\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_directory_keys_are_used() {
    let a = sim("alpha").await;
    let dir = tempfile::tempdir().unwrap();
    write_keys(dir.path(), &["sk-cred-0123456789abcdef0123456789abcdef"]);
    let cfg = dir.path().join("citadel.toml");
    std::fs::write(
        &cfg,
        config_text(&[m("alpha", a.addr.port())], "auth = true"),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0"])
        .env("CREDENTIALS_DIRECTORY", dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut addr = None;
    let mut logs = String::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        logs.push_str(&line);
        if let Some(rest) = line.split("listening on ").nth(1) {
            addr = Some(
                rest.split_whitespace()
                    .next()
                    .unwrap()
                    .parse::<SocketAddr>()
                    .unwrap(),
            );
            break;
        }
    }
    let addr = addr.expect("listening");
    assert!(
        !logs.contains("sk-cred-0123456789abcdef0123456789abcdef"),
        "a key was logged"
    );
    let c = client();
    wait_model_state(&c, addr, "alpha", "ready").await;
    let r = send(
        &c,
        "POST",
        addr,
        "/v1/chat/completions",
        Some(&chat("alpha")),
        &[(
            "authorization",
            "Bearer sk-cred-0123456789abcdef0123456789abcdef",
        )],
    )
    .await;
    assert_eq!(r.status, 200);
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_under_load_fails_no_request() {
    let a = sim("alpha").await;
    let b = sim("beta").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("citadel.toml");
    std::fs::write(
        &cfg,
        config_text(&[m("alpha", a.addr.port())], "auth = false"),
    )
    .unwrap();
    let mut p = spawn_gateway(&cfg, &[]);
    let c = client();
    wait_model_state(&c, p.addr, "alpha", "ready").await;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU32::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (c, addr, stop, done) = (c.clone(), p.addr, stop.clone(), done.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                let r = post_chat(&c, addr, "alpha").await;
                assert_eq!(r.status, 200, "{}", r.text());
                done.fetch_add(1, Relaxed);
            }
        }));
    }
    wait_until(Duration::from_secs(10), "load running", || async {
        done.load(Relaxed) > 20
    })
    .await;
    std::fs::write(
        &cfg,
        config_text(
            &[m("alpha", a.addr.port()), m("beta", b.addr.port())],
            "auth = false",
        ),
    )
    .unwrap();
    let health = get(&c, p.addr, "/health").await.json();
    assert_eq!(health["reloads"], 0, "{health}");
    signal(&p, "-HUP");
    wait_model_state(&c, p.addr, "beta", "ready").await;
    assert_eq!(post_chat(&c, p.addr, "beta").await.status, 200);
    // /health counts completed reloads, so a client can wait for one.
    let health = get(&c, p.addr, "/health").await.json();
    assert_eq!(health["reloads"], 1, "{health}");
    assert_eq!(health["last_reload"], "ok", "{health}");
    // A broken config on reload keeps the old one.
    std::fs::write(&cfg, "this is not toml [").unwrap();
    let before = done.load(Relaxed);
    signal(&p, "-HUP");
    wait_until(Duration::from_secs(10), "reload failure logged", || {
        let mut seen = false;
        while let Ok(l) = p.lines.try_recv() {
            seen |= l.contains("reload failed");
        }
        async move { seen }
    })
    .await;
    wait_until(Duration::from_secs(10), "more load", || async {
        done.load(Relaxed) > before + 20
    })
    .await;
    let health = get(&c, p.addr, "/health").await.json();
    assert_eq!(health["reloads"], 2, "{health}");
    assert_eq!(health["last_reload"], "failed", "{health}");
    assert_eq!(post_chat(&c, p.addr, "beta").await.status, 200);
    stop.store(true, Relaxed);
    for t in load {
        t.await.expect("no request failed during reload");
    }
    signal(&p, "-TERM");
    assert!(wait_exit(&mut p, Duration::from_secs(20)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_streams() {
    let a = sim_with(SimConfig {
        models: vec!["alpha".into()],
        tokens_per_second: Some(10.0), // 12 tokens: ~1.2 s
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("citadel.toml");
    std::fs::write(
        &cfg,
        config_text(
            &[m("alpha", a.addr.port())],
            "auth = false\ndrain_timeout = \"20s\"",
        ),
    )
    .unwrap();
    let mut p = spawn_gateway(&cfg, &[]);
    let c = client();
    wait_model_state(&c, p.addr, "alpha", "ready").await;

    let body = serde_json::json!({"model": "alpha", "stream": true, "max_tokens": 12,
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let req = http::Request::post(format!("http://{}/v1/chat/completions", p.addr))
            .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        streams.push(resp.into_body());
    }
    // Every stream has started.
    let mut texts = Vec::new();
    for s in &mut streams {
        let f = s.frame().await.unwrap().unwrap();
        texts.push(String::from_utf8_lossy(f.data_ref().unwrap()).into_owned());
    }
    signal(&p, "-TERM");
    // New connections are refused once the listener closes.
    wait_until(Duration::from_secs(10), "listener closed", || async {
        tokio::net::TcpStream::connect(p.addr).await.is_err()
    })
    .await;
    for (s, text) in streams.iter_mut().zip(texts.iter_mut()) {
        while let Some(f) = s.frame().await {
            if let Ok(d) = f.expect("stream not cut").into_data() {
                text.push_str(&String::from_utf8_lossy(&d));
            }
        }
        assert!(
            text.contains("data: [DONE]"),
            "stream did not complete: {text}"
        );
    }
    let st = wait_exit(&mut p, Duration::from_secs(20));
    assert!(st.success(), "{st:?}");
}
