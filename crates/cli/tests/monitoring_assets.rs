//! Issue 14, item 3: the monitoring assets shipped in `monitoring/` are valid
//! and complete. `promtool` (Debian's `prometheus` package, installed by
//! `scripts/setup-dev.sh`) checks the scrape config and the rules and runs the
//! rule unit tests; every alert has a summary and a runbook link whose anchor
//! exists in docs/operations.md, and a firing and a not-firing unit test; every
//! dashboard query parses (promtool, as recording rules) and every metric name
//! in the dashboard and the rules is one the gateway, the process or an engine
//! exports (the metric names contract of issue 14).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Runs `promtool ARGS` in `dir`; panics with its output unless it succeeds.
#[track_caller]
fn promtool(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool {args:?}: {e}; install Debian's `prometheus` package \
                 (bash scripts/setup-dev.sh)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {args:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// The alerts of `monitoring/alerts.yml`, by name: their `expr` and annotations.
/// A small reader for the file's own layout (`- alert:` items, `expr:` plain or
/// a `|` block, `annotations:` with one `key: "value"` per line).
#[derive(Debug, Default)]
struct Alert {
    expr: String,
    annotations: BTreeMap<String, String>,
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
        .replace("\\\"", "\"")
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn alerts() -> BTreeMap<String, Alert> {
    let text = read("monitoring/alerts.yml");
    let lines: Vec<&str> = text.lines().collect();
    let mut alerts = BTreeMap::new();
    let mut current: Option<(String, Alert)> = None;
    let mut in_annotations = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let t = line.trim();
        i += 1;
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        if let Some(name) = t.strip_prefix("- alert:") {
            if let Some((n, a)) = current.take() {
                alerts.insert(n, a);
            }
            current = Some((name.trim().to_owned(), Alert::default()));
            in_annotations = None;
            continue;
        }
        let Some((_, alert)) = current.as_mut() else {
            continue;
        };
        if let Some(level) = in_annotations {
            if indent(line) > level {
                let (k, v) = t.split_once(':').expect("annotation lines are key: value");
                alert.annotations.insert(k.trim().to_owned(), unquote(v));
                continue;
            }
            in_annotations = None;
        }
        if t == "annotations:" {
            in_annotations = Some(indent(line));
        } else if let Some(e) = t.strip_prefix("expr:") {
            if e.trim() == "|" {
                let level = indent(line);
                let mut block = Vec::new();
                while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > level) {
                    block.push(lines[i].trim());
                    i += 1;
                }
                alert.expr = block.join(" ");
            } else {
                alert.expr = e.trim().to_owned();
            }
        }
    }
    if let Some((n, a)) = current.take() {
        alerts.insert(n, a);
    }
    alerts
}

/// GitHub's anchors for the headings of a Markdown file.
fn anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect()
}

/// Every alert issue 14 asks for, under its name in alerts.yml.
const REQUIRED_ALERTS: [&str; 8] = [
    "CitadelGatewayDown",
    "CitadelModelNotReady",
    "CitadelModelFailed",
    "CitadelModelCrashLooping",
    "CitadelHighErrorRate",
    "CitadelSlowTimeToFirstToken",
    "CitadelModelMemoryNearLimit",
    "CitadelEngineKVCacheNearFull",
];

#[test]
fn issue14_promtool_checks_the_config_and_rules_and_runs_the_rule_unit_tests() {
    let dir = repo().join("monitoring");
    let out = promtool(&dir, &["check", "config", "prometheus.yml"]);
    assert!(out.contains("1 rule files found"), "{out}");
    let out = promtool(&dir, &["check", "rules", "alerts.yml"]);
    assert!(
        out.contains(&format!("{} rules found", alerts().len())),
        "the reader here sees every rule promtool sees:\n{out}"
    );
    let out = promtool(&dir, &["test", "rules", "alerts_test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn issue14_every_alert_has_a_summary_and_a_runbook_anchor_in_operations_md() {
    let alerts = alerts();
    let names: BTreeSet<&str> = alerts.keys().map(String::as_str).collect();
    for required in REQUIRED_ALERTS {
        assert!(names.contains(required), "{required} missing: {names:?}");
    }
    let anchors = anchors(&read("docs/operations.md"));
    assert!(
        anchors.contains("monitoring"),
        "docs/operations.md: ## Monitoring"
    );
    for (name, alert) in &alerts {
        assert!(!alert.expr.is_empty(), "{name}: no expr");
        let summary = alert.annotations.get("summary").map(String::as_str);
        assert!(
            summary.is_some_and(|s| !s.trim().is_empty()),
            "{name}: no summary"
        );
        assert!(
            alert.annotations.contains_key("description"),
            "{name}: no description"
        );
        let url = alert
            .annotations
            .get("runbook_url")
            .unwrap_or_else(|| panic!("{name}: no runbook_url"));
        let (page, anchor) = url
            .split_once('#')
            .unwrap_or_else(|| panic!("{name}: runbook_url {url} has no anchor"));
        assert!(
            page.ends_with("docs/operations.md"),
            "{name}: runbook_url {url} is not docs/operations.md"
        );
        assert!(
            anchors.contains(anchor),
            "{name}: anchor #{anchor} is not a heading of docs/operations.md"
        );
    }
}

#[test]
fn issue14_every_alert_has_a_firing_and_a_not_firing_unit_test() {
    let text = read("monitoring/alerts_test.yml");
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut firing = BTreeSet::new();
    let mut not_firing = BTreeSet::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.strip_prefix("alertname:") else {
            continue;
        };
        let exp = lines[i + 1..]
            .iter()
            .find(|l| l.starts_with("exp_alerts:"))
            .unwrap_or_else(|| panic!("alertname {name} without exp_alerts"));
        if exp.trim_start_matches("exp_alerts:").trim() == "[]" {
            not_firing.insert(name.trim().to_owned());
        } else {
            firing.insert(name.trim().to_owned());
        }
    }
    for name in alerts().keys() {
        assert!(firing.contains(name), "{name} has no firing test");
        assert!(not_firing.contains(name), "{name} has no not-firing test");
    }
}

/// Names that are PromQL, not metrics.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
];

/// The metric names a PromQL expression selects (functions, keywords, label
/// matchers, label lists, ranges and strings left out).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips a bracketed group from `open` (nested, strings inside); returns the index after it.
    let skip = |mut i: usize, open: u8, close: u8| {
        let mut depth = 0;
        while i < b.len() {
            match b[i] {
                q @ (b'"' | b'\'' | b'`') => {
                    i += 1;
                    while i < b.len() && b[i] != q {
                        i += if b[i] == b'\\' { 2 } else { 1 };
                    }
                }
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        i
    };
    while i < b.len() {
        let c = b[i];
        if c == b'{' {
            i = skip(i, b'{', b'}');
        } else if c == b'[' {
            i = skip(i, b'[', b']');
        } else if c == b'"' || c == b'\'' || c == b'`' {
            i += 1;
            while i < b.len() && b[i] != c {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c.is_ascii_digit() || c == b'.' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            let mut j = i;
            while j < b.len() && b[j] == b' ' {
                j += 1;
            }
            let call = j < b.len() && b[j] == b'(';
            let lower = word.to_ascii_lowercase();
            if PROMQL_WORDS.contains(&lower.as_str()) {
                if call
                    && [
                        "by",
                        "without",
                        "on",
                        "ignoring",
                        "group_left",
                        "group_right",
                    ]
                    .contains(&lower.as_str())
                {
                    i = skip(j, b'(', b')');
                }
            } else if !call {
                names.insert(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The metric names contract of issue 14 (gateway, process) and the engine
/// metrics the assets may use (vLLM, llama.cpp; the simulator exports vLLM's).
const GATEWAY_COUNTERS: &[&str] = &[
    "citadel_gateway_requests_total",
    "citadel_gateway_rate_limited_total",
    "citadel_gateway_upstream_retries_total",
    "citadel_gateway_upstream_aborted_total",
    "citadel_gateway_auth_failures_total",
    "citadel_gateway_auth_throttled_total",
    "citadel_gateway_loops_detected_total",
    "citadel_gateway_prompt_tokens_total",
    "citadel_gateway_completion_tokens_total",
    "citadel_gateway_key_requests_total",
    "citadel_gateway_backend_restarts_total",
];
const GATEWAY_GAUGES: &[&str] = &[
    "citadel_gateway_in_flight_requests",
    "citadel_gateway_backend_up",
    "citadel_gateway_build_info",
    "citadel_gateway_model_ready",
    "citadel_gateway_unit_memory_bytes",
    "citadel_gateway_unit_memory_max_bytes",
];
const HISTOGRAMS: &[&str] = &[
    "citadel_gateway_request_duration_seconds",
    "citadel_gateway_overhead_seconds",
    "citadel_gateway_time_to_first_token_seconds",
    "citadel_gateway_inter_token_latency_seconds",
    "vllm:time_to_first_token_seconds",
    "vllm:e2e_request_latency_seconds",
];
const OTHER: &[&str] = &[
    "up",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "llamacpp:kv_cache_usage_ratio",
];

fn known_metric(name: &str) -> bool {
    if GATEWAY_COUNTERS.contains(&name) || GATEWAY_GAUGES.contains(&name) || OTHER.contains(&name) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .is_some_and(|base| HISTOGRAMS.contains(&base))
    })
}

/// Grafana's variables replaced the way Grafana would for "All" models.
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("${model}", ".*")
        .replace("$model", ".*")
}

/// (panel title, target expr) for every query of the dashboard.
fn dashboard_queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        let targets = panel["targets"].as_array();
        assert!(
            targets.is_some_and(|t| !t.is_empty()),
            "panel {title:?} has no queries"
        );
        for t in targets.into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            out.push((title.clone(), expr.to_owned()));
        }
    }
    out
}

#[test]
fn issue14_dashboard_queries_parse_and_every_metric_name_is_known() {
    let dash: Value = serde_json::from_str(&read("monitoring/grafana-dashboard.json"))
        .expect("grafana-dashboard.json is JSON");
    // Importable anywhere: the data source is an input, and a model variable.
    assert!(
        dash["__inputs"]
            .as_array()
            .is_some_and(|i| i.iter().any(|x| x["name"] == "DS_PROMETHEUS")),
        "the data source is the ${{DS_PROMETHEUS}} input"
    );
    assert!(
        dash["templating"]["list"]
            .as_array()
            .is_some_and(|l| l.iter().any(|v| v["name"] == "model")),
        "a `model` template variable"
    );
    for panel in dash["panels"].as_array().expect("panels") {
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {}",
            panel["title"]
        );
    }

    let queries = dashboard_queries(&dash);
    // Every query parses: promtool parses each as a recording rule.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, (_, expr)) in queries.iter().enumerate() {
        let e = serde_json::to_string(&grafana_to_promql(expr)).unwrap();
        rules.push_str(&format!(
            "      - record: dashboard:query_{n}\n        expr: {e}\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard_rules.yml"), rules).unwrap();
    let out = promtool(dir.path(), &["check", "rules", "dashboard_rules.yml"]);
    assert!(
        out.contains(&format!("{} rules found", queries.len())),
        "{out}"
    );

    // Every metric name is one the stack exports.
    let mut used = BTreeSet::new();
    for (title, expr) in &queries {
        let names = metric_names(&grafana_to_promql(expr));
        assert!(!names.is_empty(), "panel {title:?}: no metric in {expr}");
        for name in names {
            assert!(
                known_metric(&name),
                "panel {title:?}: unknown metric {name}"
            );
            used.insert(name);
        }
    }
    for (alert, a) in alerts() {
        let names = metric_names(&a.expr);
        assert!(!names.is_empty(), "{alert}: no metric in {}", a.expr);
        for name in names {
            assert!(known_metric(&name), "{alert}: unknown metric {name}");
        }
    }
    // Per model: requests, errors, tokens/s, TTFT and latency percentiles, in
    // flight, memory, restarts.
    for needed in [
        "citadel_gateway_requests_total",
        "citadel_gateway_prompt_tokens_total",
        "citadel_gateway_completion_tokens_total",
        "citadel_gateway_time_to_first_token_seconds_bucket",
        "citadel_gateway_request_duration_seconds_bucket",
        "citadel_gateway_in_flight_requests",
        "citadel_gateway_unit_memory_bytes",
        "citadel_gateway_unit_memory_max_bytes",
        "citadel_gateway_backend_restarts_total",
    ] {
        assert!(used.contains(needed), "no dashboard panel uses {needed}");
    }
}

#[test]
fn metric_name_reader_skips_functions_labels_and_keywords() {
    let names = metric_names(
        r#"histogram_quantile(0.95, sum by (model, le) (rate(a_bucket{model=~"x{1}", le!="1"}[5m] offset 1m)))
           / on (model) group_left (le) b or sum without (x) (vllm:c) > bool 0.5e3 unless up"#,
    );
    let expected: BTreeSet<String> = ["a_bucket", "b", "vllm:c", "up"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, expected);
}
