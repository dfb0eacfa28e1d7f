//! Test helpers: simulators on ephemeral ports, configs, an HTTP client and
//! condition waits with deadlines (no fixed sleeps as synchronisation).
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use citadel_engine_sim::{SimConfig, SimHandle};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    let mut c = hyper_util::client::legacy::connect::HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(c)
}

pub async fn sim(model: &str) -> SimHandle {
    sim_with(SimConfig {
        models: vec![model.to_string()],
        ..Default::default()
    })
    .await
}

pub async fn sim_with(cfg: SimConfig) -> SimHandle {
    citadel_engine_sim::spawn(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("simulator starts")
}

/// One `[models.NAME]` entry.
pub struct M<'a> {
    pub name: &'a str,
    pub port: u16,
    pub replicas: Vec<String>,
    pub aliases: Vec<&'a str>,
}

pub fn m(name: &str, port: u16) -> M<'_> {
    M {
        name,
        port,
        replicas: vec![],
        aliases: vec![],
    }
}

/// A config with `gateway_extra` lines in `[gateway]`.
pub fn config_text(models: &[M], gateway_extra: &str) -> String {
    let mut s = String::from(
        "[gateway]\nlisten = \"127.0.0.1\"\nport = 8000\nprobe_interval = \"100ms\"\n",
    );
    s.push_str(gateway_extra);
    s.push_str("\n[model_defaults]\nengine = \"sim\"\n");
    for m in models {
        s.push_str(&format!("\n[models.{}]\nport = {}\n", m.name, m.port));
        if !m.replicas.is_empty() {
            s.push_str(&format!("replicas = {:?}\n", m.replicas));
        }
        if !m.aliases.is_empty() {
            s.push_str(&format!("aliases = {:?}\n", m.aliases));
        }
    }
    s
}

pub fn settings(models: &[M], gateway_extra: &str) -> citadel_config::Settings {
    let text = config_text(models, gateway_extra);
    match citadel_config::parse(&text, Path::new("test.toml")) {
        Ok(l) => l.settings,
        Err(e) => panic!("test config invalid:\n{e}\n{text}"),
    }
}

pub fn write_keys(dir: &Path, keys: &[&str]) -> PathBuf {
    let p = dir.join("api-keys");
    let mut s = String::from("# test keys\n\n");
    for k in keys {
        s.push_str(k);
        s.push('\n');
    }
    std::fs::write(&p, s).unwrap();
    p
}

pub async fn gateway(
    settings: &citadel_config::Settings,
    keys: Option<PathBuf>,
) -> citadel_gateway::Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ks = match keys {
        Some(p) => citadel_gateway::KeySource::File(p),
        None => citadel_gateway::KeySource::Credential,
    };
    citadel_gateway::start(settings, ks, listener)
        .await
        .expect("gateway starts")
}

/// Polls `cond` until it is true or `timeout` passes (then panics with `what`).
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// Asserts OpenAI's error shape and returns `error.code`.
    pub fn error_code(&self) -> String {
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].is_string(), "error shape: {v}");
        assert!(e["type"].is_string(), "error shape: {v}");
        assert!(e.get("param").is_some(), "error shape: {v}");
        e["code"].as_str().unwrap_or_default().to_string()
    }
}

pub async fn send(
    c: &HttpClient,
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Resp {
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
        .unwrap();
    let resp = c.request(req).await.expect("request sent");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Resp {
        status,
        headers,
        body,
    }
}

pub async fn get(c: &HttpClient, addr: SocketAddr, path: &str) -> Resp {
    send(c, "GET", addr, path, None, &[]).await
}

pub fn chat(model: &str) -> String {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).to_string()
}

pub async fn post_chat(c: &HttpClient, addr: SocketAddr, model: &str) -> Resp {
    send(
        c,
        "POST",
        addr,
        "/v1/chat/completions",
        Some(&chat(model)),
        &[],
    )
    .await
}

/// Waits until `/health/models` says `model` is `state`.
pub async fn wait_model_state(c: &HttpClient, addr: SocketAddr, model: &str, state: &str) {
    wait_until(
        Duration::from_secs(10),
        &format!("{model} {state}"),
        || async {
            let v = get(c, addr, "/health/models").await.json();
            v["models"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == model && m["state"] == state)
        },
    )
    .await
}

/// Waits until a given backend of `model` is `state`.
pub async fn wait_backend_state(
    c: &HttpClient,
    addr: SocketAddr,
    model: &str,
    url: &str,
    state: &str,
) {
    wait_until(
        Duration::from_secs(10),
        &format!("{model} backend {url} {state}"),
        || async {
            let v = get(c, addr, "/health/models").await.json();
            v["models"].as_array().unwrap().iter().any(|m| {
                m["name"] == model
                    && m["backends"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|b| b["url"] == url && b["state"] == state)
            })
        },
    )
    .await
}

// --- The real binary -------------------------------------------------------

pub const BIN: &str = env!("CARGO_BIN_EXE_citadel-gateway");

/// A running `citadel-gateway` process; killed on drop.
pub struct Proc {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    /// Its stderr, line by line (also echoed to the test's output).
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn_gateway(config: &Path, extra: &[&str]) -> Proc {
    spawn_gateway_env(config, extra, &[])
}

/// Starts the binary on an ephemeral loopback port with `env` set, and waits
/// for `listening on ADDR`.
pub fn spawn_gateway_env(config: &Path, extra: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Proc {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(config)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn citadel-gateway");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[gateway] {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gateway did not print `listening on ADDR`");
        };
        if let Some(rest) = line.split("listening on ").nth(1) {
            let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
            return Proc {
                child,
                addr,
                lines: rx,
            };
        }
    }
}

pub fn signal(p: &Proc, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

pub fn wait_exit(p: &mut Proc, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "gateway did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `NOTIFY_SOCKET` for the binary: every sd_notify datagram it sends.
pub struct NotifySocket {
    pub path: PathBuf,
    rx: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = sock.recv(&mut buf) {
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    return;
                }
            }
        });
        NotifySocket {
            path,
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits until a datagram has a `STATUS=` line for which `f` holds; returns it.
    pub fn wait_status(&mut self, timeout: Duration, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            for d in &self.seen {
                for l in d.lines() {
                    if let Some(s) = l.strip_prefix("STATUS=") {
                        if f(s) {
                            return s.to_owned();
                        }
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(d) => self.seen.push(d),
                Err(_) => panic!(
                    "no matching STATUS= within {timeout:?}; got {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Forgets what was received so far.
    pub fn clear(&mut self) {
        while let Ok(d) = self.rx.try_recv() {
            self.seen.push(d);
        }
        self.seen.clear();
    }
}
