//! Issue 14, item 4: the shipped monitoring assets proven against a real
//! Prometheus. In a booted sandbox (systemd as PID 1) with the sim stack,
//! Debian's `prometheus` runs as a transient unit with `monitoring/prometheus.yml`
//! and `monitoring/alerts.yml` (copies scraping and evaluating every second, the
//! not-ready alert's `for:` shortened to 2 s). After chat and streamed chat
//! traffic through the gateway, every query of `monitoring/grafana-dashboard.json`
//! returns data for a served model through Prometheus's HTTP API; stopping the
//! model makes its `CitadelModelNotReady` alert pending or firing (and not the
//! other model's), starting it again resolves it.

mod stack;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use stack::Stack;

/// The model stopped and started; `OTHER` keeps serving.
const MODEL: &str = "phi3";
const OTHER: &str = "hermes";
const PROM: &str = "http://127.0.0.1:9090";
const DIR: &str = "/var/lib/citadel-test-prometheus";

/// The demo stack cut down to two instant-loading models.
fn config() -> String {
    stack::instant_models(&[(OTHER, 11401), (MODEL, 11403)])
}

fn asset(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../monitoring")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The shipped scrape config, scraping and evaluating every second.
fn test_prometheus_yml() -> String {
    let shipped = asset("prometheus.yml");
    assert!(
        shipped.contains("scrape_interval: 15s") && shipped.contains("evaluation_interval: 15s")
    );
    shipped
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
}

/// The shipped rules with `CitadelModelNotReady`'s `for: 5m` shortened to 2 s.
fn test_alerts_yml() -> String {
    let shipped = asset("alerts.yml");
    let (before, after) = shipped
        .split_once("- alert: CitadelModelNotReady\n")
        .expect("alerts.yml has CitadelModelNotReady");
    let (rule, rest) = after.split_once("- alert:").unwrap_or((after, ""));
    assert!(rule.contains("for: 5m"), "{rule}");
    let rule = rule.replacen("for: 5m", "for: 2s", 1);
    let rest = if rest.is_empty() {
        String::new()
    } else {
        format!("- alert:{rest}")
    };
    format!("{before}- alert: CitadelModelNotReady\n{rule}{rest}")
}

/// A chat completion through the gateway, streamed or not (with usage).
fn chat(st: &Stack, model: &str, stream: bool) {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "tell me about systemd units"}],
        "max_tokens": 8,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let (code, text) = st.http(
        "POST",
        "http://127.0.0.1:8000/v1/chat/completions",
        Some(&st.api_key()),
        Some(&body),
    );
    assert_eq!(code, 200, "{model} stream={stream}: {text}");
    if stream {
        assert!(text.contains("data: [DONE]"), "{text}");
    }
}

fn traffic(st: &Stack) {
    for model in [MODEL, OTHER] {
        for _ in 0..3 {
            chat(st, model, false);
            chat(st, model, true);
        }
    }
}

/// GET a Prometheus API path inside the sandbox; the `data` member.
fn prom_api(st: &Stack, path: &str, query: Option<&str>) -> Option<Value> {
    let url = format!("{PROM}{path}");
    let mut argv = vec!["curl", "-s", "-m", "5", "-G"];
    let arg;
    if let Some(q) = query {
        arg = format!("query={q}");
        argv.extend(["--data-urlencode", arg.as_str()]);
    }
    argv.push(&url);
    let out = st.sb.exec(&argv).ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    (v["status"] == "success").then(|| v["data"].clone())
}

/// The result vector of an instant query (empty on any error).
fn query(st: &Stack, q: &str) -> Vec<Value> {
    prom_api(st, "/api/v1/query", Some(q))
        .and_then(|d| d["result"].as_array().cloned())
        .unwrap_or_default()
}

/// The active (pending or firing) alerts named `name`: (model label, state).
fn alerts(st: &Stack, name: &str) -> Vec<(String, String)> {
    prom_api(st, "/api/v1/alerts", None)
        .and_then(|d| d["alerts"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|a| a["labels"]["alertname"] == name)
        .map(|a| {
            (
                a["labels"]["model"].as_str().unwrap_or_default().to_owned(),
                a["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Every dashboard query, its Grafana variables set for one model.
fn dashboard_queries(model: &str) -> Vec<(String, String)> {
    let dash: Value = serde_json::from_str(&asset("grafana-dashboard.json")).unwrap();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or_default();
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("targets have an expr");
            let q = expr
                .replace("$__rate_interval", "1m")
                .replace("${model}", model)
                .replace("$model", model);
            out.push((format!("{title} [{}]", t["refId"]), q));
        }
    }
    out
}

/// Each scrape target's job, health and last error, one per line.
fn targets(st: &Stack) -> String {
    prom_api(st, "/api/v1/targets", None)
        .and_then(|d| d["activeTargets"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|t| {
            format!(
                "{} {}: {} {}",
                t["labels"]["job"], t["scrapeUrl"], t["health"], t["lastError"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where the model's cgroup is (as systemd placed it) and the memory series the
/// gateway exports: what to look at when the memory panel has no data.
fn cgroup_view(st: &Stack) -> String {
    let script = format!(
        "pid=$(systemctl show -p MainPID --value {unit}); \
         echo \"--- /proc/$pid/cgroup ({unit})\"; cat /proc/$pid/cgroup; \
         echo '--- /metrics, unit memory'; \
         curl -s -m 5 http://127.0.0.1:8000/metrics | grep unit_memory",
        unit = stack::unit(MODEL)
    );
    let out = st.sb.exec(&["sh", "-c", &script]).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn prometheus_journal(st: &Stack) -> String {
    let out = st
        .sb
        .exec(&[
            "journalctl",
            "--no-pager",
            "-u",
            "test-prometheus",
            "-n",
            "30",
        ])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn issue14_real_prometheus_sees_the_stack() {
    assert!(
        Path::new("/usr/bin/prometheus").exists(),
        "Debian's prometheus package is needed (bash scripts/setup-dev.sh)"
    );
    let st = Stack::boot("e2e-prometheus", &config());
    st.install();
    st.cli_ok(&["start"]);
    for m in [MODEL, OTHER] {
        st.wait(
            &format!("{m} ready in the gateway"),
            Duration::from_secs(60),
            || st.gateway_state(m) == "ready",
        );
    }

    // Prometheus with the shipped files, in the sandbox, stopped with it.
    st.write(&format!("{DIR}/prometheus.yml"), &test_prometheus_yml());
    st.write(&format!("{DIR}/alerts.yml"), &test_alerts_yml());
    let config_flag = format!("--config.file={DIR}/prometheus.yml");
    let storage_flag = format!("--storage.tsdb.path={DIR}/data");
    st.sb
        .exec_ok(&[
            "systemd-run",
            "--unit=test-prometheus",
            "--collect",
            "/usr/bin/prometheus",
            &config_flag,
            &storage_flag,
            "--web.listen-address=127.0.0.1:9090",
        ])
        .expect("start Prometheus as a transient unit");
    st.sb
        .wait_until("Prometheus ready", Duration::from_secs(60), || {
            st.http("GET", &format!("{PROM}/-/ready"), None, None).0 == 200
        })
        .unwrap_or_else(|e| panic!("{e}\n--- test-prometheus\n{}", prometheus_journal(&st)));
    st.sb
        .wait_until("both scrape jobs up", Duration::from_secs(30), || {
            let up = query(&st, "up == 1");
            ["citadel-gateway", "citadel-engines"]
                .iter()
                .all(|job| up.iter().any(|s| s["metric"]["job"] == *job))
        })
        .unwrap_or_else(|e| panic!("{e}: scrape targets:\n{}", targets(&st)));
    let rules = prom_api(&st, "/api/v1/rules", None).expect("rules API");
    let loaded = rules.to_string();
    assert!(
        loaded.contains("CitadelModelNotReady") && loaded.contains("CitadelGatewayDown"),
        "the shipped rules are loaded: {loaded}"
    );

    // Stopping the model makes its not-ready alert pending/firing; starting it
    // again resolves it.
    traffic(&st);
    st.wait(
        &format!("{MODEL} ready in Prometheus"),
        Duration::from_secs(30),
        || {
            !query(
                &st,
                &format!("citadel_gateway_model_ready{{model=\"{MODEL}\"}} == 1"),
            )
            .is_empty()
        },
    );
    assert!(alerts(&st, "CitadelModelNotReady").is_empty());
    // The dashboard's `model` variable (label_values(METRIC, model)) lists both.
    let dash: Value = serde_json::from_str(&asset("grafana-dashboard.json")).unwrap();
    let var = dash["templating"]["list"]
        .as_array()
        .and_then(|l| l.iter().find(|v| v["name"] == "model"))
        .expect("a model variable");
    let metric = var["definition"]
        .as_str()
        .and_then(|d| d.strip_prefix("label_values("))
        .and_then(|d| d.strip_suffix(", model)"))
        .expect("the model variable is label_values(METRIC, model)");
    let listed: Vec<String> = query(&st, metric)
        .iter()
        .filter_map(|s| s["metric"]["model"].as_str().map(str::to_owned))
        .collect();
    for m in [MODEL, OTHER] {
        assert!(listed.iter().any(|l| l == m), "{metric} lists {listed:?}");
    }
    st.cli_ok(&["stop", MODEL]);
    let mut seen = Vec::new();
    st.wait(
        &format!("CitadelModelNotReady firing for {MODEL}"),
        Duration::from_secs(60),
        || {
            let a = alerts(&st, "CitadelModelNotReady");
            for x in &a {
                if !seen.contains(x) {
                    println!("  alert CitadelModelNotReady{{model={}}}: {}", x.0, x.1);
                    seen.push(x.clone());
                }
            }
            a.iter().any(|(m, s)| m == MODEL && s == "firing")
        },
    );
    assert!(
        !seen.iter().any(|(m, _)| m == OTHER),
        "{OTHER} kept serving, its alert must not fire: {seen:?}"
    );
    st.cli_ok(&["start", MODEL]);
    st.wait(
        &format!("CitadelModelNotReady for {MODEL} resolved"),
        Duration::from_secs(60),
        || {
            !alerts(&st, "CitadelModelNotReady")
                .iter()
                .any(|(m, _)| m == MODEL)
        },
    );

    // Every dashboard query returns data (a finite value) for the served
    // model, after the restart so the restarts panel has its series too. Light
    // traffic keeps flowing (a chat and a stream every 2 s) so that the rates
    // and percentiles over the last minute are numbers, not NaN.
    let queries = dashboard_queries(MODEL);
    let mut answered: Vec<Option<String>> = vec![None; queries.len()];
    let mut last_traffic: Option<Instant> = None;
    st.sb
        .wait_until(
            "every dashboard query has data",
            Duration::from_secs(60),
            &mut || {
                if last_traffic.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
                    chat(&st, MODEL, false);
                    chat(&st, MODEL, true);
                    last_traffic = Some(Instant::now());
                }
                for ((_, q), seen) in queries.iter().zip(answered.iter_mut()) {
                    if seen.is_none() {
                        *seen = query(&st, q)
                            .iter()
                            .filter_map(|s| s["value"][1].as_str())
                            .find(|v| v.parse::<f64>().is_ok_and(f64::is_finite))
                            .map(str::to_owned);
                    }
                }
                answered.iter().all(Option::is_some)
            },
        )
        .unwrap_or_else(|e| {
            let missing: Vec<String> = queries
                .iter()
                .zip(&answered)
                .filter(|(_, seen)| seen.is_none())
                .map(|((t, q), _)| format!("{t}: {q}\n    -> {:?}", query(&st, q)))
                .collect();
            panic!(
                "{e}: dashboard queries without data for {MODEL}:\n{}\n--- scrape targets\n{}\n{}",
                missing.join("\n"),
                targets(&st),
                cgroup_view(&st)
            )
        });
    for ((title, _), value) in queries.iter().zip(&answered) {
        println!("  {title}: {}", value.as_deref().unwrap_or_default());
    }
}
