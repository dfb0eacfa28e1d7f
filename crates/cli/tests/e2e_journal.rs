//! Issue 10, item 4, under a real systemd and journald (PID 1 in a booted
//! sandbox, the sim stack): the journal entries an operator filters on. The
//! gateway's request entries carry the documented fields under their own
//! names (`MODEL=`, not tracing-journald's default `F_MODEL=`), a readable
//! one-line `MESSAGE=` and the true outcome; the supervisor's lines are found
//! through the unit's `CITADEL_SERVICE=` and name the model.

mod stack;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use stack::Stack;

const MODEL: &str = "phi3";

/// The demo stack cut down to one instant-loading model.
fn config() -> String {
    stack::instant_models(&[(MODEL, 11403)])
}

/// `journalctl -o json ARGS` inside: one object per entry.
fn journal(st: &Stack, args: &[&str]) -> Vec<BTreeMap<String, Value>> {
    let mut argv = vec!["journalctl", "--no-pager", "-o", "json"];
    argv.extend_from_slice(args);
    // Not exec_ok: newer journalctl exits 1 when nothing matches.
    let out = st
        .sb
        .exec(&argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn field<'a>(e: &'a BTreeMap<String, Value>, k: &str) -> &'a str {
    e.get(k).and_then(Value::as_str).unwrap_or_default()
}

/// Sends a chat completion through the gateway with an `X-Request-Id`;
/// returns the HTTP status and the body.
fn chat(st: &Stack, request_id: &str, stream: bool) -> (u16, String) {
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "a prompt that must not be logged"}],
        "max_tokens": 5,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let auth = format!("Authorization: Bearer {}", st.api_key());
    let rid = format!("X-Request-Id: {request_id}");
    let out = st
        .sb
        .exec(&[
            "curl",
            "-s",
            "-m",
            "10",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-H",
            &auth,
            "-H",
            &rid,
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &body,
            "http://127.0.0.1:8000/v1/chat/completions",
        ])
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = s.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Before: `F_REQUEST_ID=`, `F_MODEL=`, ... (so `journalctl MODEL=phi3` found
/// nothing), `MESSAGE=request` for every request, `F_OUTCOME=aborted` for
/// every successful non-streamed one, and `backend ready` without the model.
#[test]
fn issue10_journal_fields_are_filterable_and_readable() {
    let st = Stack::boot("e2e-journal", &config());
    st.install();
    st.cli_ok(&["start"]);
    st.wait(
        &format!("{MODEL} ready in the gateway"),
        Duration::from_secs(60),
        || st.gateway_state(MODEL) == "ready",
    );

    let (code, body) = chat(&st, "e2e-journal-plain", false);
    assert_eq!(code, 200, "{body}");
    let usage: Value = serde_json::from_str::<Value>(&body).unwrap()["usage"].clone();
    let (code, body) = chat(&st, "e2e-journal-stream", true);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("data: [DONE]"), "{body}");

    // The gateway's entries for the model, filtered by the documented fields.
    let filter = ["CITADEL_SERVICE=gateway", "MODEL=phi3"];
    let mut entries = Vec::new();
    st.wait(
        "both request entries in the journal",
        Duration::from_secs(20),
        || {
            entries = journal(&st, &filter);
            ["e2e-journal-plain", "e2e-journal-stream"]
                .iter()
                .all(|id| entries.iter().any(|e| field(e, "REQUEST_ID") == *id))
        },
    );
    for e in &entries {
        let prefixed: Vec<&String> = e.keys().filter(|k| k.starts_with("F_")).collect();
        assert!(prefixed.is_empty(), "F_ fields: {prefixed:?} in {e:#?}");
    }
    let by_id = |id: &str| {
        entries
            .iter()
            .find(|e| field(e, "REQUEST_ID") == id)
            .unwrap_or_else(|| panic!("no entry for {id}"))
            .clone()
    };
    for (id, stream) in [("e2e-journal-plain", false), ("e2e-journal-stream", true)] {
        let e = by_id(id);
        println!("{id}: MESSAGE={}", field(&e, "MESSAGE"));
        assert_eq!(field(&e, "SYSLOG_IDENTIFIER"), "citadel-gateway", "{e:#?}");
        assert_eq!(field(&e, "MODEL"), MODEL, "{e:#?}");
        assert_eq!(field(&e, "STATUS"), "200", "{e:#?}");
        assert_eq!(field(&e, "OUTCOME"), "ok", "{e:#?}");
        assert_eq!(field(&e, "STREAM"), stream.to_string(), "{e:#?}");
        assert_eq!(field(&e, "METHOD"), "POST", "{e:#?}");
        assert_eq!(field(&e, "PATH"), "/v1/chat/completions", "{e:#?}");
        assert_eq!(field(&e, "BACKEND"), "http://127.0.0.1:11403", "{e:#?}");
        assert_eq!(field(&e, "COMPLETION_TOKENS"), "5", "{e:#?}");
        assert!(field(&e, "PROMPT_TOKENS").parse::<u64>().is_ok(), "{e:#?}");
        assert!(field(&e, "LATENCY_MS").parse::<f64>().is_ok(), "{e:#?}");
        let msg = field(&e, "MESSAGE");
        let want = format!(
            "POST /v1/chat/completions model={MODEL}{} status=200 ",
            if stream { " stream" } else { "" }
        );
        assert!(
            msg.starts_with(&want) && msg.contains("+5 tokens") && msg.ends_with(" outcome=ok"),
            "{msg}"
        );
        assert!(!msg.contains("prompt that must not"), "{msg}");
    }
    assert_eq!(
        field(&by_id("e2e-journal-plain"), "PROMPT_TOKENS"),
        usage["prompt_tokens"].to_string()
    );

    // Filtering on the outcome finds both; nothing is `aborted`.
    let ok = journal(&st, &["MODEL=phi3", "OUTCOME=ok"]);
    for id in ["e2e-journal-plain", "e2e-journal-stream"] {
        assert!(
            ok.iter().any(|e| field(e, "REQUEST_ID") == id),
            "{id} not found with MODEL=phi3 OUTCOME=ok"
        );
    }
    assert!(
        journal(&st, &["CITADEL_SERVICE=gateway", "OUTCOME=aborted"]).is_empty(),
        "a request was logged as aborted"
    );

    // The gateway's backend line names the model and its URL.
    assert!(
        entries
            .iter()
            .any(|e| field(e, "MESSAGE") == "backend ready: model phi3 at http://127.0.0.1:11403"),
        "no readable backend-ready line: {entries:#?}"
    );

    // The supervisor's lines: found through the unit's CITADEL_SERVICE=, with
    // the model in the message and in MODEL= (its span's fields).
    let sup = journal(
        &st,
        &["CITADEL_SERVICE=phi3", "SYSLOG_IDENTIFIER=citadel-model"],
    );
    let ready = sup
        .iter()
        .find(|e| field(e, "MESSAGE").starts_with("phi3 is ready to serve on 127.0.0.1:11403"))
        .unwrap_or_else(|| panic!("no readiness line for phi3: {sup:#?}"));
    assert_eq!(field(ready, "MODEL"), MODEL, "{ready:#?}");
    assert_eq!(field(ready, "ENGINE"), "sim", "{ready:#?}");
    assert!(
        sup.iter().all(|e| !e.keys().any(|k| k.starts_with("F_"))),
        "F_ fields in the supervisor's lines: {sup:#?}"
    );
}
