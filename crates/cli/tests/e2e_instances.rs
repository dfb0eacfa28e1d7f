//! Issue 15, item 1, under a real systemd (PID 1 in a booted sandbox, the sim
//! stack): a model with two local instances runs as two units of the model
//! template, each its own process on its own port; the gateway balances the
//! model over both; `status`, `health` and `logs` show each instance under
//! its model; `stop phi3:2` stops that instance alone and the model keeps
//! serving (degraded); the journal tells the instances apart by
//! `CITADEL_INSTANCE=`.

mod stack;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use stack::{text, Stack};

const MODEL: &str = "phi3";
const FIRST: &str = "citadel-model@phi3.service";
const SECOND: &str = "citadel-model@phi3:2.service";
const URLS: [&str; 2] = ["http://127.0.0.1:11403", "http://127.0.0.1:11413"];

/// phi3, loading at once, with a second local instance on port 11413.
fn config() -> String {
    format!(
        "{}\n[[models.phi3.instances]]\nport = 11413\n",
        stack::instant_models(&[(MODEL, 11403)])
    )
}

/// `journalctl -o json ARGS` inside: one object per entry.
fn journal(st: &Stack, args: &[&str]) -> Vec<Value> {
    let mut argv = vec!["journalctl", "--no-pager", "-o", "json"];
    argv.extend_from_slice(args);
    // Not exec_ok: newer journalctl exits 1 when nothing matches.
    let out = st.sb.exec(&argv).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The gateway's backends of phi3 that are ready.
fn ready_backends(st: &Stack) -> BTreeSet<String> {
    let (code, body) = st.http("GET", "http://127.0.0.1:8000/health/models", None, None);
    if code != 200 {
        return BTreeSet::new();
    }
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    v["models"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == MODEL))
        .and_then(|m| m["backends"].as_array())
        .map(|bs| {
            bs.iter()
                .filter(|b| b["state"] == "ready")
                .filter_map(|b| b["url"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn issue15_instances_run_serve_and_show_under_their_model() {
    let st = Stack::boot("e2e-instances", &config());
    let out = st.install();
    assert!(
        out.contains("phi3:2"),
        "install enables the instance:\n{out}"
    );
    assert_eq!(st.show(SECOND, "UnitFileState"), "enabled");
    st.cli_ok(&["start"]);

    // Two units, two supervisors.
    for u in [FIRST, SECOND] {
        st.wait(&format!("{u} active"), Duration::from_secs(60), || {
            st.show(u, "ActiveState") == "active"
        });
    }
    let (pid1, pid2) = (
        st.show_u64(FIRST, "MainPID"),
        st.show_u64(SECOND, "MainPID"),
    );
    assert!(pid1 > 0 && pid2 > 0 && pid1 != pid2, "{pid1} {pid2}");
    let all: BTreeSet<String> = URLS.iter().map(|u| u.to_string()).collect();
    st.wait(
        "the gateway routes to both instances",
        Duration::from_secs(60),
        || ready_backends(&st) == all,
    );

    // Requests through the gateway reach both instances (the gateway's
    // request entries name the backend that answered).
    for _ in 0..12 {
        let (code, body) = st.chat(MODEL);
        assert_eq!(code, 200, "{body}");
    }
    let mut answered = BTreeSet::new();
    st.wait(
        "request entries from both backends in the journal",
        Duration::from_secs(20),
        || {
            answered = journal(&st, &["CITADEL_SERVICE=gateway", "MODEL=phi3"])
                .iter()
                .filter_map(|e| e["BACKEND"].as_str().map(str::to_owned))
                .collect();
            answered == all
        },
    );

    // status: the instance on its own line, indented under its model, with
    // its own PID and port; --json names model and instance.
    let out = st.cli_ok(&["status"]);
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no `{name}` line:\n{out}"))
            .to_owned()
    };
    let (l1, l2) = (line("phi3 "), line("  phi3:2 "));
    assert!(
        l1.contains(&pid1.to_string()) && l1.contains("11403"),
        "{out}"
    );
    assert!(
        l2.contains(&pid2.to_string()) && l2.contains("11413"),
        "{out}"
    );
    assert!(l2.contains("active (running)"), "{out}");
    let pos = |l: &str| out.find(l).unwrap();
    assert!(pos(&l1) < pos(&l2), "{out}");
    let json: Value = serde_json::from_str(&st.cli_ok(&["status", "--json", "phi3"])).unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{json}");
    assert_eq!(rows[1]["service"], "phi3:2");
    assert_eq!(rows[1]["model"], "phi3");
    assert_eq!(rows[1]["instance"], 2);
    assert_eq!(rows[1]["port"], 11413);
    assert_eq!(rows[1]["main_pid"], pid2);

    // health: both instances, the model healthy.
    let out = st.cli_ok(&["health"]);
    assert!(out.starts_with("HEALTHY"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("phi3:2") && l.contains(" ok ")),
        "{out}"
    );
    let h: Value = serde_json::from_str(&st.cli_ok(&["health", "--json"])).unwrap();
    let m = &h["models"][0];
    assert_eq!(m["state"], "ready", "{h}");
    assert_eq!(m["instances"].as_array().map(Vec::len), Some(2), "{h}");
    assert_eq!(m["instances"][1]["instance"], "phi3:2", "{h}");
    assert_eq!(m["instances"][1]["state"], "ready", "{h}");

    // `stop phi3:2` stops that instance only; the model keeps serving.
    let out = st.cli_ok(&["stop", "phi3:2"]);
    // (Lines name their unit first; a status text may name the model.)
    assert!(
        !out.contains("stop: phi3 ") && !out.lines().any(|l| l.trim_start().starts_with("phi3 ")),
        "stop phi3:2 named another unit:\n{out}"
    );
    assert_eq!(st.show(SECOND, "ActiveState"), "inactive");
    assert_eq!(st.show(FIRST, "ActiveState"), "active");
    assert_eq!(st.show_u64(FIRST, "MainPID"), pid1);
    let (code, body) = st.chat(MODEL);
    assert_eq!(code, 200, "{body}");
    let out = st.cli(&["health", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let h: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(h["overall"], "degraded", "{h}");
    assert_eq!(h["models"][0]["state"], "degraded", "{h}");
    assert_eq!(h["models"][0]["instances"][0]["state"], "ready", "{h}");
    assert_eq!(h["models"][0]["instances"][1]["state"], "down", "{h}");
    let out = st.cli(&["status", "phi3:2"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));

    // The journal tells the instances apart; `logs phi3:2` shows that
    // instance only, `logs phi3` both.
    let second = journal(&st, &["CITADEL_INSTANCE=phi3:2"]);
    assert!(!second.is_empty(), "no entry with CITADEL_INSTANCE=phi3:2");
    for e in &second {
        assert_eq!(e["_SYSTEMD_UNIT"], SECOND, "{e}");
        assert_eq!(e["CITADEL_SERVICE"], MODEL, "{e}");
    }
    let first = journal(&st, &["CITADEL_INSTANCE=phi3"]);
    assert!(first.iter().all(|e| e["_SYSTEMD_UNIT"] == FIRST));
    let units_in = |args: &[&str]| -> BTreeSet<String> {
        let mut argv = vec!["logs", "--json", "-n", "1000"];
        argv.extend_from_slice(args);
        let out = st.cli_ok(&argv);
        out.lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|e| e["_SYSTEMD_UNIT"].as_str().map(str::to_owned))
            .filter(|u| u.starts_with("citadel-model@"))
            .collect()
    };
    assert_eq!(units_in(&["phi3:2"]), BTreeSet::from([SECOND.to_owned()]));
    assert_eq!(
        units_in(&["phi3"]),
        BTreeSet::from([FIRST.to_owned(), SECOND.to_owned()])
    );

    // `start phi3` starts the stopped instance again.
    st.cli_ok(&["start", "phi3"]);
    assert_eq!(st.show(SECOND, "ActiveState"), "active");
    st.cli_ok(&["stop"]);
}
