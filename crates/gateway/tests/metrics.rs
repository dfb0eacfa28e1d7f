//! Issue 14, items 1 and 2: the gateway's metrics an LLM operator watches
//! (tokens, time to first token, inter-token latency, per-key counters by
//! name, build and process figures, errors labelled with the model), the
//! engines' metrics through `/metrics/engines`, content negotiation, and
//! `promtool check metrics` on every exposition (skipped with a note when
//! `promtool` is not installed; `scripts/setup-dev.sh` installs it).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use citadel_engine_sim::SimConfig;
use common::*;

const T: Duration = Duration::from_secs(10);
const ALICE: &str = "sk-alice-0123456789abcdef0123456789abcdef";
const UNNAMED: &str = "sk-unnamed-0123456789abcdef0123456789abcdef";
const OM: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// The value of the series `name{labels...}` (every given label present,
/// others allowed); `None` when there is no such series.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let (head, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            let (n, rest) = head.split_once('{').unwrap_or((head, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn metrics_with(c: &HttpClient, addr: SocketAddr, path: &str, accept: Option<&str>) -> Resp {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
    send(c, "GET", addr, path, None, &headers).await
}

async fn metrics(c: &HttpClient, addr: SocketAddr) -> String {
    metrics_with(c, addr, "/metrics", None).await.text()
}

async fn wait_ready(c: &HttpClient, addr: SocketAddr, models: usize) {
    wait_until(T, "models ready", || async {
        get(c, addr, "/health/ready").await.json()["models_ready"] == models
    })
    .await;
}

fn stream_body(model: &str, max_tokens: u64, include_usage: bool) -> String {
    let mut v = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "one two three"}],
        "max_tokens": max_tokens,
        "stream": true,
    });
    if include_usage {
        v["stream_options"] = serde_json::json!({"include_usage": true});
    }
    v.to_string()
}

async fn post(c: &HttpClient, addr: SocketAddr, body: &str, headers: &[(&str, &str)]) -> Resp {
    send(c, "POST", addr, "/v1/chat/completions", Some(body), headers).await
}

/// `promtool check metrics` on `text`: `None` when promtool is not
/// installed, else its exit status and the problems it reported.
fn promtool(text: &str) -> Option<(i32, Vec<String>)> {
    use std::io::Write;
    let mut child = match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("NOTE: promtool is not installed (scripts/setup-dev.sh installs Debian's `prometheus`): promtool checks skipped");
            return None;
        }
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let problems = String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .map(str::to_owned)
        .filter(|l| !l.trim().is_empty())
        .collect();
    Some((out.status.code().unwrap_or(-1), problems))
}

/// Asserts that promtool reads `text` and finds no problem other than the
/// colons in the engines' own metric names (`vllm:*`, `llamacpp:*`: chosen
/// by the engines, kept as they are so their dashboards work; promtool's
/// linter reserves colons for recording rules).
fn assert_promtool_clean(what: &str, text: &str, allow_colon_names: bool) {
    let Some((code, problems)) = promtool(text) else {
        return;
    };
    let other: Vec<&String> = problems
        .iter()
        .filter(|p| !(allow_colon_names && p.ends_with("metric names should not contain ':'")))
        .collect();
    assert!(
        other.is_empty() && (code == 0 || (allow_colon_names && code == 3)),
        "promtool check metrics on {what}: exit {code}, problems {other:#?}\n{text}"
    );
}

/// Item 1: prompt and completion tokens are counted per model from `usage`
/// in a JSON answer and in the final chunk of a stream that asked for it; a
/// stream without usage adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue14_token_counters_per_model() {
    let a = sim("alpha").await;
    let b = sim("beta").await;
    let s = settings(
        &[m("alpha", a.addr.port()), m("beta", b.addr.port())],
        "auth = false",
    );
    let gw = gateway(&s, None).await;
    let c = client();
    wait_ready(&c, gw.addr(), 2).await;

    let r = post_chat(&c, gw.addr(), "alpha").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let usage = r.json()["usage"].clone();
    let (p1, c1) = (
        usage["prompt_tokens"].as_f64().unwrap(),
        usage["completion_tokens"].as_f64().unwrap(),
    );
    assert!(p1 > 0.0 && c1 > 0.0, "{usage}");

    let r = post(&c, gw.addr(), &stream_body("alpha", 5, true), &[]).await;
    assert_eq!(r.status, 200);
    let last_usage = r
        .text()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|v| v.get("usage").filter(|u| u.is_object()).cloned())
        .last()
        .expect("the stream's final chunk has usage");
    let (p2, c2) = (
        last_usage["prompt_tokens"].as_f64().unwrap(),
        last_usage["completion_tokens"].as_f64().unwrap(),
    );
    assert_eq!(c2, 5.0);
    // Without stream_options.include_usage the engine reports none: nothing counted.
    assert_eq!(
        post(&c, gw.addr(), &stream_body("alpha", 3, false), &[])
            .await
            .status,
        200
    );

    let t = metrics(&c, gw.addr()).await;
    let alpha = [("model", "alpha")];
    assert_eq!(
        series(&t, "citadel_gateway_prompt_tokens_total", &alpha),
        Some(p1 + p2),
        "{t}"
    );
    assert_eq!(
        series(&t, "citadel_gateway_completion_tokens_total", &alpha),
        Some(c1 + c2),
        "{t}"
    );
    // beta served nothing.
    assert_eq!(
        series(
            &t,
            "citadel_gateway_completion_tokens_total",
            &[("model", "beta")]
        )
        .unwrap_or(0.0),
        0.0
    );
    gw.shutdown(T).await;
}

/// Item 1: time to first token (request start to the first chunk with
/// content: the role chunk does not count) and the time between chunks are
/// observed for streams only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue14_ttft_and_itl_histograms_for_streams_only() {
    let a = sim_with(SimConfig {
        models: vec!["alpha".into()],
        first_token_delay: Duration::from_millis(150),
        tokens_per_second: Some(50.0),
        ..Default::default()
    })
    .await;
    let s = settings(&[m("alpha", a.addr.port())], "auth = false");
    let gw = gateway(&s, None).await;
    let c = client();
    wait_ready(&c, gw.addr(), 1).await;
    let alpha = [("model", "alpha")];

    assert_eq!(post_chat(&c, gw.addr(), "alpha").await.status, 200);
    let t = metrics(&c, gw.addr()).await;
    for h in ["time_to_first_token", "inter_token_latency"] {
        let count = format!("citadel_gateway_{h}_seconds_count");
        assert_eq!(
            series(&t, &count, &alpha).unwrap_or(0.0),
            0.0,
            "a JSON answer is no stream: {t}"
        );
    }

    let r = post(&c, gw.addr(), &stream_body("alpha", 5, true), &[]).await;
    assert_eq!(r.status, 200);
    let t = metrics(&c, gw.addr()).await;
    assert_eq!(
        series(
            &t,
            "citadel_gateway_time_to_first_token_seconds_count",
            &alpha
        ),
        Some(1.0),
        "{t}"
    );
    let ttft = series(
        &t,
        "citadel_gateway_time_to_first_token_seconds_sum",
        &alpha,
    )
    .unwrap();
    assert!(
        (0.15..5.0).contains(&ttft),
        "TTFT includes the simulated prefill of 150 ms: {ttft}"
    );
    // Five content chunks 20 ms apart: four gaps.
    assert_eq!(
        series(
            &t,
            "citadel_gateway_inter_token_latency_seconds_count",
            &alpha
        ),
        Some(4.0),
        "{t}"
    );
    let itl = series(
        &t,
        "citadel_gateway_inter_token_latency_seconds_sum",
        &alpha,
    )
    .unwrap();
    assert!((0.04..2.0).contains(&itl), "4 gaps of ~20 ms: {itl}");
    gw.shutdown(T).await;
}

/// Item 1: requests are counted per API key by the key's NAME (`NAME: KEY`
/// in the credential file, `key-LINE` for an unnamed key); no key text ever
/// reaches the metrics; refused requests are `unauthenticated`, and with
/// auth off every request is `key="none"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue14_per_key_counters_by_name_never_the_key() {
    let a = sim("alpha").await;
    let dir = tempfile::tempdir().unwrap();
    // Line 3 is the unnamed key (write_keys adds a comment and a blank line).
    let keys = write_keys(dir.path(), &[UNNAMED, &format!("alice: {ALICE}")]);
    let s = settings(&[m("alpha", a.addr.port())], "auth = true");
    let gw = gateway(&s, Some(keys)).await;
    let c = client();
    wait_ready(&c, gw.addr(), 1).await;
    let alice = format!("Bearer {ALICE}");
    let unnamed = format!("Bearer {UNNAMED}");
    for _ in 0..2 {
        let r = post(&c, gw.addr(), &chat("alpha"), &[("authorization", &alice)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(
        post(
            &c,
            gw.addr(),
            &chat("alpha"),
            &[("authorization", &unnamed)]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        post(&c, gw.addr(), &chat("nope"), &[("authorization", &alice)])
            .await
            .status,
        404
    );
    let wrong = "Bearer sk-wrong-0123456789abcdef0123456789abcdef";
    assert_eq!(
        post(&c, gw.addr(), &chat("alpha"), &[("authorization", wrong)])
            .await
            .status,
        401
    );

    let t = metrics(&c, gw.addr()).await;
    let k = "citadel_gateway_key_requests_total";
    assert_eq!(
        series(
            &t,
            k,
            &[("key", "alice"), ("model", "alpha"), ("status", "200")]
        ),
        Some(2.0),
        "{t}"
    );
    assert_eq!(
        series(
            &t,
            k,
            &[("key", "key-3"), ("model", "alpha"), ("status", "200")]
        ),
        Some(1.0),
        "{t}"
    );
    assert_eq!(
        series(
            &t,
            k,
            &[("key", "alice"), ("model", "unknown"), ("status", "404")]
        ),
        Some(1.0),
        "{t}"
    );
    assert_eq!(
        series(&t, k, &[("key", "unauthenticated"), ("status", "401")]),
        Some(1.0),
        "{t}"
    );
    for secret in [ALICE, UNNAMED, "sk-wrong", "sk-"] {
        assert!(!t.contains(secret), "a key in the metrics: {secret}");
    }
    gw.shutdown(T).await;

    let s = settings(&[m("alpha", a.addr.port())], "auth = false");
    let gw = gateway(&s, None).await;
    wait_ready(&c, gw.addr(), 1).await;
    assert_eq!(post_chat(&c, gw.addr(), "alpha").await.status, 200);
    let t = metrics(&c, gw.addr()).await;
    assert_eq!(
        series(
            &t,
            k,
            &[("key", "none"), ("model", "alpha"), ("status", "200")]
        ),
        Some(1.0),
        "{t}"
    );
    gw.shutdown(T).await;
}

/// Item 1: `citadel_gateway_build_info{version,commit} 1` and the standard
/// process metrics, with plausible values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue14_build_info_and_process_metrics() {
    let a = sim("alpha").await;
    let s = settings(&[m("alpha", a.addr.port())], "auth = false");
    let gw = gateway(&s, None).await;
    let c = client();
    let t = metrics(&c, gw.addr()).await;
    // What `--version` says: "VERSION (commit COMMIT)".
    let (version, commit) = env!("CITADEL_VERSION")
        .strip_suffix(')')
        .and_then(|v| v.split_once(" (commit "))
        .expect("CITADEL_VERSION is VERSION (commit COMMIT)");
    assert!(!commit.is_empty());
    assert_eq!(
        series(
            &t,
            "citadel_gateway_build_info",
            &[("version", version), ("commit", commit)]
        ),
        Some(1.0),
        "{t}"
    );
    let v = |n: &str| series(&t, n, &[]).unwrap_or_else(|| panic!("{n} missing:\n{t}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(v("process_cpu_seconds_total") >= 0.0);
    assert!(v("process_resident_memory_bytes") > 1e6, "{t}");
    assert!(v("process_virtual_memory_bytes") >= v("process_resident_memory_bytes"));
    // This test process: the gateway's listener, connections and simulators.
    assert!(v("process_open_fds") >= 3.0);
    assert!(v("process_max_fds") >= v("process_open_fds"));
    let start = v("process_start_time_seconds");
    assert!(
        start <= now + 1.0 && start > now - 3600.0,
        "started within the hour: {start} vs {now}"
    );
    gw.shutdown(T).await;
}

/// Item 1: errors carry the model whenever the request named one the
/// gateway serves (aliases under the served name); a name it does not serve
/// is counted under `model="unknown"`, never as sent (client-chosen label
/// values would be unbounded); a request refused before its body was read
/// has no model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue14_errors_carry_the_model() {
    let a = sim("alpha").await;
    let loading = sim_with(SimConfig {
        models: vec!["slow".into()],
        load_time: Duration::from_secs(3600),
        ..Default::default()
    })
    .await;
    let mut alpha = m("alpha", a.addr.port());
    alpha.aliases = vec!["a1"];
    let s = settings(&[alpha, m("slow", loading.addr.port())], "auth = false");
    let gw = gateway(&s, None).await;
    let c = client();
    wait_ready(&c, gw.addr(), 1).await;
    assert_eq!(post_chat(&c, gw.addr(), "slow").await.status, 503);
    assert_eq!(post_chat(&c, gw.addr(), "a1").await.status, 200);
    for name in ["no-such-model-1", "no-such-model-2"] {
        assert_eq!(post_chat(&c, gw.addr(), name).await.status, 404);
    }
    let r = post(&c, gw.addr(), "{\"messages\":[]}", &[]).await;
    assert_eq!(r.status, 400);

    let t = metrics(&c, gw.addr()).await;
    let req = "citadel_gateway_requests_total";
    assert_eq!(
        series(&t, req, &[("model", "slow"), ("status", "503")]),
        Some(1.0),
        "{t}"
    );
    assert_eq!(
        series(&t, req, &[("model", "alpha"), ("status", "200")]),
        Some(1.0),
        "{t}"
    );
    assert_eq!(
        series(&t, req, &[("model", "unknown"), ("status", "404")]),
        Some(2.0),
        "{t}"
    );
    assert_eq!(
        series(&t, req, &[("model", ""), ("status", "400")]),
        Some(1.0),
        "{t}"
    );
    assert!(!t.contains("no-such-model") && !t.contains("\"a1\""), "{t}");
    assert_eq!(
        series(&t, "citadel_gateway_model_ready", &[("model", "alpha")]),
        Some(1.0)
    );
    assert_eq!(
        series(&t, "citadel_gateway_model_ready", &[("model", "slow")]),
        Some(0.0)
    );
    gw.shutdown(T).await;
}

/// Item 1: `model_ready` follows the model, and a model that comes back
/// after having been ready counts one restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue14_model_ready_and_restarts() {
    let a = sim("alpha").await;
    let s = settings(&[m("alpha", a.addr.port())], "auth = false");
    let gw = gateway(&s, None).await;
    let c = client();
    wait_ready(&c, gw.addr(), 1).await;
    let ready = |t: &str| series(t, "citadel_gateway_model_ready", &[("model", "alpha")]);
    let restarts = |t: &str| {
        series(
            t,
            "citadel_gateway_backend_restarts_total",
            &[("model", "alpha")],
        )
    };
    let t = metrics(&c, gw.addr()).await;
    assert_eq!((ready(&t), restarts(&t)), (Some(1.0), Some(0.0)), "{t}");
    // The engine goes away and comes back on the same port.
    let port = a.addr.port();
    a.shutdown().await.unwrap();
    wait_until(T, "alpha not ready", || async {
        ready(&metrics(&c, gw.addr()).await) == Some(0.0)
    })
    .await;
    let _b = citadel_engine_sim::spawn(
        SimConfig {
            models: vec!["alpha".into()],
            ..Default::default()
        },
        SocketAddr::from(([127, 0, 0, 1], port)),
    )
    .await
    .expect("simulator restarts on the same port");
    wait_until(T, "alpha ready again", || async {
        ready(&metrics(&c, gw.addr()).await) == Some(1.0)
    })
    .await;
    assert_eq!(restarts(&metrics(&c, gw.addr()).await), Some(1.0));
    gw.shutdown(T).await;
}

/// Content negotiation: OpenMetrics (with `# EOF`, counter families named
/// without `_total`) when the scraper asks for it, as Prometheus does; the
/// text format otherwise, its counter families named with `_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue14_content_negotiation() {
    let a = sim("alpha").await;
    let s = settings(&[m("alpha", a.addr.port())], "auth = false");
    let gw = gateway(&s, None).await;
    let c = client();
    wait_ready(&c, gw.addr(), 1).await;
    assert_eq!(post_chat(&c, gw.addr(), "alpha").await.status, 200);
    for path in ["/metrics", "/metrics/engines"] {
        let om = metrics_with(&c, gw.addr(), path, Some(OM)).await;
        assert_eq!(om.status, 200);
        assert!(
            om.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text; version=1.0.0"),
            "{path}: {:?}",
            om.headers
        );
        let text = om.text();
        assert!(text.ends_with("# EOF\n"), "{path}: {text}");
        assert_eq!(text.matches("# EOF").count(), 1);
        for plain in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
            let r = metrics_with(&c, gw.addr(), path, plain).await;
            assert_eq!(
                r.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8",
                "{path} {plain:?}"
            );
            assert!(!r.text().contains("# EOF"), "{path}");
        }
    }
    let om = metrics_with(&c, gw.addr(), "/metrics", Some(OM))
        .await
        .text();
    assert!(
        om.contains("# TYPE citadel_gateway_requests counter\n"),
        "{om}"
    );
    let text = metrics(&c, gw.addr()).await;
    assert!(
        text.contains("# HELP citadel_gateway_requests_total "),
        "{text}"
    );
    assert!(
        text.contains("# TYPE citadel_gateway_requests_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE process_cpu_seconds_total counter\n"),
        "{text}"
    );
    // The same series in both.
    let samples = |t: &str| -> Vec<String> {
        let mut v: Vec<String> = t
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("process_"))
            .map(|l| l.rsplit_once(' ').unwrap().0.to_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(samples(&om), samples(&text));
    gw.shutdown(T).await;
}

/// Item 2: `/metrics/engines` holds every local engine's metrics, each series
/// labelled with its model (and backend when a model has several), one
/// HELP/TYPE per family: valid exposition in both formats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue14_engine_metrics_through_the_gateway() {
    let a = sim("alpha").await;
    let b1 = sim("beta").await;
    let b2 = sim("beta").await;
    let mut beta = m("beta", b1.addr.port());
    beta.replicas = vec![format!("http://127.0.0.1:{}", b2.addr.port())];
    let s = settings(&[m("alpha", a.addr.port()), beta], "auth = false");
    let gw = gateway(&s, None).await;
    let c = client();
    wait_ready(&c, gw.addr(), 2).await;
    assert_eq!(post_chat(&c, gw.addr(), "alpha").await.status, 200);

    let r = metrics_with(&c, gw.addr(), "/metrics/engines", None).await;
    assert_eq!(r.status, 200);
    let t = r.text();
    for family in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens_total",
        "vllm:time_to_first_token_seconds",
    ] {
        assert_eq!(
            t.matches(&format!("# TYPE {family} ")).count(),
            1,
            "{family}:\n{t}"
        );
        assert_eq!(
            t.matches(&format!("# HELP {family} ")).count(),
            1,
            "{family}:\n{t}"
        );
    }
    let mut samples = 0;
    for l in t.lines().filter(|l| !l.starts_with('#')) {
        samples += 1;
        assert!(l.starts_with("vllm:"), "{l}");
        if l.contains("citadel_model=\"alpha\"") {
            assert!(
                !l.contains("citadel_backend"),
                "one backend: no backend label: {l}"
            );
        } else {
            assert!(l.contains("citadel_model=\"beta\""), "{l}");
            assert!(
                l.contains(&format!(
                    "citadel_backend=\"http://127.0.0.1:{}\"",
                    b1.addr.port()
                )) || l.contains(&format!(
                    "citadel_backend=\"http://127.0.0.1:{}\"",
                    b2.addr.port()
                )),
                "{l}"
            );
        }
    }
    assert!(samples > 10, "{t}");
    // The request above is in alpha's engine counters.
    assert_eq!(
        series(
            &t,
            "vllm:request_success_total",
            &[("citadel_model", "alpha"), ("finished_reason", "length")]
        ),
        Some(1.0),
        "{t}"
    );
    // Parsed back: every sample line is `name{labels} value`.
    for l in t.lines().filter(|l| !l.starts_with('#')) {
        let (head, value) = l.rsplit_once(' ').unwrap();
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "{l}"
        );
        assert!(head.ends_with('}') && head.contains('{'), "{l}");
    }
    let om = metrics_with(&c, gw.addr(), "/metrics/engines", Some(OM))
        .await
        .text();
    assert!(
        om.contains("# TYPE vllm:prompt_tokens counter\nvllm:prompt_tokens_total{"),
        "{om}"
    );
    assert!(
        om.contains("vllm:prompt_tokens_total{citadel_model=\"alpha\""),
        "{om}"
    );
    gw.shutdown(T).await;
}

/// Item 2: `/metrics/engines` follows `/metrics`'s rule: a key is needed
/// when the gateway listens beyond loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue14_engine_metrics_need_a_key_beyond_loopback() {
    let a = sim("alpha").await;
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(dir.path(), &[ALICE]);
    let s = settings(&[m("alpha", a.addr.port())], "auth = true");
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let gw = citadel_gateway::start(&s, citadel_gateway::KeySource::File(keys), listener)
        .await
        .expect("gateway starts");
    let addr = SocketAddr::from(([127, 0, 0, 1], gw.addr().port()));
    let c = client();
    let r = get(&c, addr, "/metrics/engines").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (401, "missing_api_key")
    );
    let auth = format!("Bearer {ALICE}");
    wait_until(T, "alpha's engine metrics", || async {
        let r = send(
            &c,
            "GET",
            addr,
            "/metrics/engines",
            None,
            &[("authorization", &auth)],
        )
        .await;
        r.status == 200 && r.text().contains("citadel_model=\"alpha\"")
    })
    .await;
    gw.shutdown(T).await;
}

/// `promtool check metrics` passes on the gateway's `/metrics` (text
/// format), and on `/metrics/engines` and the simulator's `/metrics` but for
/// the engines' own `vllm:` names (promtool reserves colons for recording
/// rules; vLLM chose them). promtool lints the text format only: it reads
/// OpenMetrics' `# TYPE foo counter` + `foo_total` as a family without help
/// text, so the OpenMetrics outputs are checked by structure in
/// `issue14_content_negotiation` and by Prometheus itself (the monitoring e2e).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue14_promtool_check_metrics() {
    let a = sim_with(SimConfig {
        models: vec!["alpha".into()],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys(dir.path(), &[&format!("alice: {ALICE}")]);
    let s = settings(&[m("alpha", a.addr.port())], "auth = true");
    let gw = gateway(&s, Some(keys)).await;
    let c = client();
    wait_ready(&c, gw.addr(), 1).await;
    let auth = format!("Bearer {ALICE}");
    // Every family with series: requests, errors, tokens, a stream's timings.
    assert_eq!(
        post(&c, gw.addr(), &chat("alpha"), &[("authorization", &auth)])
            .await
            .status,
        200
    );
    assert_eq!(
        post(
            &c,
            gw.addr(),
            &stream_body("alpha", 3, true),
            &[("authorization", &auth)]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        post(&c, gw.addr(), &chat("nope"), &[("authorization", &auth)])
            .await
            .status,
        404
    );
    assert_eq!(post_chat(&c, gw.addr(), "alpha").await.status, 401);

    let text = metrics(&c, gw.addr()).await;
    for family in [
        "citadel_gateway_prompt_tokens_total",
        "citadel_gateway_time_to_first_token_seconds_bucket",
        "citadel_gateway_key_requests_total",
        "process_open_fds",
    ] {
        assert!(text.contains(family), "{family}:\n{text}");
    }
    assert_promtool_clean("the gateway's /metrics", &text, false);
    let engines = metrics_with(&c, gw.addr(), "/metrics/engines", None)
        .await
        .text();
    assert_promtool_clean("/metrics/engines", &engines, true);
    let sim_text = get(&c, a.addr, "/metrics").await.text();
    assert_promtool_clean("the simulator's /metrics", &sim_text, true);
    gw.shutdown(T).await;
}
