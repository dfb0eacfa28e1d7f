//! Issue 9, finding 3: one bad edit of the config must not take the API down.
//! A SIGHUP reload that cannot load the new config (syntax error, validation
//! error, values that overflowed the parser) keeps serving with the old one,
//! says so (log, STATUS=, `/health`) and fails no request; at start, any
//! config error exits 78 naming the file.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};

/// Requests sent in a loop to every model until stopped; failures are kept.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU32>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(c: &HttpClient, addr: std::net::SocketAddr, models: &[&str]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU32::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for model in models {
            for _ in 0..2 {
                let (c, stop, ok, failures) =
                    (c.clone(), stop.clone(), ok.clone(), failures.clone());
                let body = chat(model);
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Relaxed) {
                        let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body.clone())))
                            .unwrap();
                        let outcome = match c.request(req).await {
                            Err(e) => Err(format!("request failed: {e}")),
                            Ok(r) => {
                                let status = r.status();
                                match r.into_body().collect().await {
                                    Ok(_) if status == 200 => Ok(()),
                                    Ok(b) => Err(format!(
                                        "{status}: {}",
                                        String::from_utf8_lossy(&b.to_bytes())
                                    )),
                                    Err(e) => Err(format!("{status}, body cut: {e}")),
                                }
                            }
                        };
                        match outcome {
                            Ok(()) => {
                                ok.fetch_add(1, Relaxed);
                            }
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                    }
                }));
            }
        }
        Load {
            stop,
            ok,
            failures,
            tasks,
        }
    }

    fn ok(&self) -> u32 {
        self.ok.load(Relaxed)
    }

    async fn wait_more(&self, n: u32) {
        let target = self.ok() + n;
        wait_until(Duration::from_secs(20), "requests succeed", || async {
            self.ok() >= target
        })
        .await;
    }

    /// Stops and returns (succeeded, failures).
    async fn finish(self) -> (u32, Vec<String>) {
        self.stop.store(true, Relaxed);
        for t in self.tasks {
            t.await.expect("load task");
        }
        let f = self.failures.lock().unwrap().clone();
        (self.ok.load(Relaxed), f)
    }
}

/// `/health` without panicking when the gateway is gone.
async fn health(c: &HttpClient, p: &Proc) -> Option<serde_json::Value> {
    let req = http::Request::get(format!("http://{}/health", p.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = c.request(req).await.ok()?;
    let b = r.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&b).ok()
}

async fn wait_reloads(c: &HttpClient, p: &mut Proc, n: u64) -> serde_json::Value {
    let mut last = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Some(st) = p.child.try_wait().unwrap() {
            panic!("the gateway exited during the reload: {st}");
        }
        last = health(c, p).await;
        if last
            .as_ref()
            .is_some_and(|h| h["reloads"].as_u64() >= Some(n))
        {
            return last.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the gateway did not report reload {n} within 20 s: {last:?}");
}

/// Serves `alpha` and `beta` under load; for each of `broken` (the good
/// config edited), writes it, sends SIGHUP and checks that the reload is
/// rejected and reported while the old config keeps serving; then restores
/// the good config and checks that reload is accepted. No request may fail.
async fn broken_reloads_keep_serving(broken: &[&dyn Fn(&str) -> String]) {
    let a = sim("alpha").await;
    let b = sim("beta").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("citadel.toml");
    let good = config_text(
        &[m("alpha", a.addr.port()), m("beta", b.addr.port())],
        "auth = false",
    );
    std::fs::write(&cfg, &good).unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    let mut p = spawn_gateway_env(&cfg, &[], &[("NOTIFY_SOCKET", notify.path.as_os_str())]);
    let c = client();
    wait_model_state(&c, p.addr, "alpha", "ready").await;
    wait_model_state(&c, p.addr, "beta", "ready").await;
    notify.wait_status(Duration::from_secs(10), |s| s == "serving 2/2 models");

    let load = Load::start(&c, p.addr, &["alpha", "beta"]);
    load.wait_more(20).await;
    let mut reloads = 0;
    for edit in broken {
        let text = edit(&good);
        assert_ne!(text, good);
        std::fs::write(&cfg, &text).unwrap();
        notify.clear();
        signal(&p, "-HUP");
        reloads += 1;
        let h = wait_reloads(&c, &mut p, reloads).await;
        assert_eq!(h["last_reload"], "failed", "accepted:\n{text}\n{h}");
        // STATUS= says the reload was rejected and the old config still serves.
        let status = notify.wait_status(Duration::from_secs(10), |s| s.contains("reload rejected"));
        assert!(
            status.starts_with(
                "serving 2/2 models; reload rejected, still using the previous configuration: "
            ) && status.contains("citadel.toml"),
            "{status}"
        );
        // The log names the file and the cause.
        wait_until(Duration::from_secs(10), "the rejection logged", || {
            let mut seen = false;
            while let Ok(l) = p.lines.try_recv() {
                seen |= l.contains("reload failed") && l.contains(&cfg.display().to_string());
            }
            async move { seen }
        })
        .await;
        load.wait_more(50).await;
        assert!(p.child.try_wait().unwrap().is_none(), "the gateway exited");
        for model in ["alpha", "beta"] {
            let r = post_chat(&c, p.addr, model).await;
            assert_eq!(r.status, 200, "{model}: {}", r.text());
        }
    }

    // The good config again: accepted, and STATUS= no longer mentions the rejection.
    std::fs::write(&cfg, &good).unwrap();
    notify.clear();
    signal(&p, "-HUP");
    let h = wait_reloads(&c, &mut p, reloads + 1).await;
    assert_eq!(h["last_reload"], "ok", "{h}");
    notify.wait_status(Duration::from_secs(10), |s| s == "serving 2/2 models");
    load.wait_more(20).await;

    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the reloads, first: {:?}",
        failures.len(),
        failures.len() as u32 + ok,
        failures.first()
    );
    signal(&p, "-TERM");
    assert!(wait_exit(&mut p, Duration::from_secs(20)).success());
}

/// Adds `line` at the end of `[gateway]`.
fn in_gateway(good: &str, line: &str) -> String {
    good.replacen(
        "\n[model_defaults]",
        &format!("\n{line}\n[model_defaults]"),
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue9_reload_with_toml_syntax_error_keeps_serving() {
    broken_reloads_keep_serving(&[&|good| format!("{good}\nthis is not toml [\n"), &|good| {
        good.replacen("[gateway]", "[gateway", 1)
    }])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue9_reload_with_validation_error_keeps_serving() {
    broken_reloads_keep_serving(&[
        // A model on the gateway's port.
        &|good| format!("{good}\n[models.gamma]\nport = 8000\n"),
        // A value out of range and an unknown key.
        &|good| in_gateway(good, "rate_limit_per_minute = 0"),
        &|good| format!("{good}memroy_max = \"1G\"\n"),
    ])
    .await;
}

/// The exact lines of the issue: an overflowing span in a model's section
/// (panicked the parser: the gateway died with 101, restarted into the same
/// panic 7 times, and every model was unreachable) and one in `[gateway]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue9_reload_with_overflowing_timespans_keeps_serving() {
    broken_reloads_keep_serving(&[
        // Appended: it lands in the last model's section ([models.beta]).
        &|good| format!("{good}stop_timeout = \"99999999999999999999s\"\n"),
        // Validated once, then overflowed where it was used.
        &|good| in_gateway(good, "drain_timeout = \"18446744073709549568s 2047s\""),
    ])
    .await;
}

fn start_with(text: &str) -> (Option<i32>, String, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("citadel.toml");
    std::fs::write(&cfg, text).unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    // A config that is wrongly accepted would serve forever: bound the wait.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway started with this config:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), reader.join().unwrap(), cfg, dir)
}

/// At start, any config error exits 78 (EX_CONFIG: the unit does not
/// restart) and names the file and line.
#[test]
fn issue9_config_error_at_start_exits_78_naming_file_and_line() {
    let good = config_text(&[m("alpha", 40001)], "auth = false");
    let cases = [
        // (config, the 1-based line of the error)
        (
            format!("{good}stop_timeout = \"99999999999999999999s\"\n"),
            good.lines().count() + 1,
        ),
        (
            in_gateway(&good, "drain_timeout = \"18446744073709549568s 2047s\""),
            6,
        ),
        (
            format!("{good}this is not toml [\n"),
            good.lines().count() + 1,
        ),
        (in_gateway(&good, "rate_limit_per_minute = 0"), 6),
    ];
    for (text, line) in cases {
        let (code, err, cfg, _dir) = start_with(&text);
        assert_eq!(code, Some(78), "{text}\n{err}");
        let at = format!("{}:{line}:", cfg.display());
        assert!(
            err.contains(&at),
            "expected `{at}` in:\n{err}\nconfig:\n{text}"
        );
    }
}
