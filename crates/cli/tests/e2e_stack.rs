//! End-to-end tests of the whole stack under a real systemd (PID 1 in a booted
//! sandbox), with the engine simulator standing in for GPU engines. The two
//! scenarios run in parallel, each in its own sandbox.

mod stack;

use std::time::{Duration, Instant};

use stack::{text, unit, Stack, MODELS};

const GATEWAY: &str = "citadel-gateway.service";

/// The demo stack with instant-loading engines (for the start-to-ready number).
fn config(load_time: &str, extra: &str) -> String {
    citadel_config::SIM_EXAMPLE_CONFIG.replace(
        "\"--load-time\", \"2s\"",
        &format!("\"--load-time\", \"{load_time}\""),
    ) + extra
}

#[test]
fn lifecycle_install_start_serve_stop_uninstall() {
    let st = Stack::boot("e2e-life", &config("0s", ""));

    // install: user, directories, binaries and units exist; the stack is enabled.
    let started = Instant::now();
    let out = st.install();
    let install_ms = started.elapsed().as_millis();
    assert!(out.contains("generated an API key"), "{out}");
    st.sb
        .exec_ok(&["getent", "passwd", "citadel"])
        .expect("user citadel exists");
    st.sb
        .exec_ok(&["getent", "group", "citadel"])
        .expect("group citadel exists");
    for path in [
        "/opt/citadel/bin/citadel-model",
        "/opt/citadel/bin/citadel-gateway",
        "/opt/citadel/config/systemd/citadel-gateway.service",
        "/etc/systemd/system/citadel-model@.service",
        "/etc/systemd/system/citadel-model@phi3.service.d/50-citadel.conf",
        "/var/lib/citadel",
    ] {
        assert!(
            st.sb.root().join(&path[1..]).exists(),
            "{path} is missing after install"
        );
    }
    let mode = st
        .sb
        .exec_ok(&["stat", "-c", "%a %U:%G", "/opt/citadel/config/citadel.toml"])
        .unwrap();
    assert_eq!(mode.trim(), "640 root:citadel");
    assert_eq!(st.show("citadel.target", "UnitFileState"), "enabled");
    assert_eq!(st.show(GATEWAY, "UnitFileState"), "enabled");
    for m in MODELS {
        assert_eq!(st.show(&unit(m), "UnitFileState"), "enabled", "{m}");
    }
    // Idempotent: a second run changes nothing.
    let again = st.install();
    assert!(again.contains("nothing to change"), "{again}");

    // start: everything active; the gateway became active only after every model was ready.
    let started = Instant::now();
    st.cli_ok(&["start"]);
    let start_s = started.elapsed().as_secs_f64();
    for m in MODELS {
        assert_eq!(st.show(&unit(m), "ActiveState"), "active", "{m}");
    }
    assert_eq!(st.show(GATEWAY, "ActiveState"), "active");
    let gateway_active = st.show_u64(GATEWAY, "ActiveEnterTimestampMonotonic");
    for m in MODELS {
        let model_active = st.show_u64(&unit(m), "ActiveEnterTimestampMonotonic");
        assert!(
            model_active > 0 && model_active <= gateway_active,
            "{m} became ready after the gateway started"
        );
    }

    // status: every service, in JSON too; and how long it takes.
    let mut best_status = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        st.cli_ok(&["status"]);
        best_status = best_status.min(t.elapsed());
    }
    let json: serde_json::Value = serde_json::from_str(&st.cli_ok(&["status", "--json"])).unwrap();
    let services = json.as_array().unwrap();
    assert_eq!(services.len(), 5);
    assert!(
        services.iter().all(|s| s["active_state"] == "active"),
        "{json}"
    );
    assert_eq!(services[0]["service"], "mixtral");
    assert_eq!(services[0]["port"], 11400);
    assert!(
        services[0]["status_text"]
            .as_str()
            .unwrap()
            .starts_with("serving"),
        "{json}"
    );

    // health: exit 0 when everything serves.
    let health = st.cli(&["health"]);
    assert_eq!(health.status.code(), Some(0), "{}", text(&health));

    // A chat completion through the gateway, with the generated key; and its errors.
    let (code, body) = st.chat("mixtral");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion", "{body}");
    assert_eq!(
        st.http("GET", "http://127.0.0.1:8000/v1/models", None, None)
            .0,
        401
    );
    let (code, _) = st.http(
        "POST",
        "http://127.0.0.1:8000/v1/chat/completions",
        Some(&st.api_key()),
        Some(r#"{"model":"gpt-17","messages":[]}"#),
    );
    assert_eq!(code, 404);

    // logs: the journal carries CITADEL_SERVICE for the model's lines.
    let logs = st.cli_ok(&["logs", "mixtral", "--json", "-n", "200"]);
    let tagged = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["CITADEL_SERVICE"] == "mixtral")
        .count();
    assert!(
        tagged >= 2,
        "expected journal entries with CITADEL_SERVICE=mixtral:\n{logs}"
    );

    // An operator's drop-in survives a re-install after a config change.
    st.write(
        "/etc/systemd/system/citadel-model@hermes.service.d/override.conf",
        "[Service]\nEnvironment=OPERATOR_NOTE=kept\n",
    );
    st.sb.exec_ok(&["systemctl", "daemon-reload"]).unwrap();
    st.cli_ok(&["restart", "hermes"]);
    let hermes_pid = st.show(&unit("hermes"), "MainPID");
    let environ = st
        .sb
        .exec_ok(&["cat", &format!("/proc/{hermes_pid}/environ")])
        .unwrap();
    assert!(
        environ.contains("OPERATOR_NOTE=kept"),
        "the drop-in applies after a restart"
    );
    let cfg = st.read("/opt/citadel/config/citadel.toml").unwrap();
    st.write(
        "/opt/citadel/config/citadel.toml",
        &format!("{cfg}memory_max = \"300M\"\n"),
    );
    // --dry-run shows the difference and changes nothing.
    let dry = st.cli_ok(&["install", "--dry-run"]);
    assert!(
        dry.contains("change   /etc/systemd/system/citadel-model@phi3.service.d/50-citadel.conf"),
        "{dry}"
    );
    assert!(!st
        .read("/etc/systemd/system/citadel-model@phi3.service.d/50-citadel.conf")
        .unwrap()
        .contains("300M"));
    let out = st.install();
    assert!(
        out.contains("change   /etc/systemd/system/citadel-model@phi3.service.d/50-citadel.conf"),
        "{out}"
    );
    assert!(!out.contains("override.conf"), "{out}");
    assert!(st
        .read("/etc/systemd/system/citadel-model@hermes.service.d/override.conf")
        .is_some());
    assert!(st
        .show(&unit("hermes"), "Environment")
        .contains("OPERATOR_NOTE=kept"));
    assert_eq!(
        st.show(&unit("phi3"), "MemoryMax"),
        (300u64 << 20).to_string()
    );

    // Upgrade (docs/operations.md): install, then restart the whole stack.
    st.cli_ok(&["restart"]);
    st.wait(
        "the gateway serves after the restart",
        Duration::from_secs(20),
        || st.gateway_state("phi3") == "ready",
    );

    // disable / enable one model at boot.
    st.cli_ok(&["disable", "hermes"]);
    assert_eq!(st.show(&unit("hermes"), "UnitFileState"), "disabled");
    st.cli_ok(&["enable", "hermes"]);
    assert_eq!(st.show(&unit("hermes"), "UnitFileState"), "enabled");

    // logs with filters.
    st.cli_ok(&["logs", "--priority", "err", "--since", "10 min ago"]);
    let gw_logs = st.cli_ok(&["logs", "gateway", "-n", "50"]);
    assert!(gw_logs.contains("citadel-gateway"), "{gw_logs}");

    // Rotate API keys (docs/operations.md): new file, restart the gateway (it drains).
    let old_key = st.api_key();
    st.write(
        "/etc/citadel/credentials/api-keys",
        "# rotated\nsk-citadel-rotated-key\n",
    );
    st.cli_ok(&["restart", "gateway"]);
    st.wait("the gateway serves again", Duration::from_secs(20), || {
        st.gateway_state("mixtral") == "ready"
    });
    assert_eq!(st.api_key(), "sk-citadel-rotated-key");
    assert_eq!(st.chat("mixtral").0, 200, "the new key works");
    let body = r#"{"model":"mixtral","messages":[{"role":"user","content":"hi"}]}"#;
    let (code, _) = st.http(
        "POST",
        "http://127.0.0.1:8000/v1/chat/completions",
        Some(&old_key),
        Some(body),
    );
    assert_eq!(code, 401, "the old key is refused");

    // Add a model: config, install, start it, reload the gateway.
    let before_add = st.read("/opt/citadel/config/citadel.toml").unwrap();
    st.write(
        "/opt/citadel/config/citadel.toml",
        &format!("{before_add}\n[models.extra]\nport = 11406\n"),
    );
    let out = st.install();
    assert!(
        out.contains("add      /etc/systemd/system/citadel-model@extra.service.d/50-citadel.conf"),
        "{out}"
    );
    st.cli_ok(&["start", "extra"]);
    st.cli_ok(&["reload"]);
    st.wait(
        "the gateway routes to the new model",
        Duration::from_secs(20),
        || st.gateway_state("extra") == "ready",
    );
    assert_eq!(st.chat("extra").0, 200);
    // A broken config is refused before anything is reloaded; the gateway keeps serving.
    let good = st.read("/opt/citadel/config/citadel.toml").unwrap();
    st.write(
        "/opt/citadel/config/citadel.toml",
        &format!("{good}\n[models.broken]\nport = 8000\n"),
    );
    let out = st.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("port 8000 is the gateway's port"));
    st.write("/opt/citadel/config/citadel.toml", &good);
    assert_eq!(st.chat("extra").0, 200);

    // ... and remove it again: install stops and disables it and removes its files.
    st.write("/opt/citadel/config/citadel.toml", &before_add);
    let out = st.install();
    assert!(
        out.contains("stopping removed models: citadel-model@extra.service"),
        "{out}"
    );
    assert_ne!(st.show(&unit("extra"), "ActiveState"), "active");
    assert!(st
        .read("/etc/systemd/system/citadel-model@extra.service.d/50-citadel.conf")
        .is_none());
    st.cli_ok(&["reload", "gateway"]);
    st.wait(
        "the gateway forgets the removed model",
        Duration::from_secs(20),
        || st.gateway_state("extra") == "absent",
    );

    // stop: the gateway goes down before any model starts stopping.
    st.cli_ok(&["stop"]);
    let gateway_down = st.show_u64(GATEWAY, "InactiveEnterTimestampMonotonic");
    for m in MODELS {
        assert_eq!(st.show(&unit(m), "ActiveState"), "inactive", "{m}");
        let model_leaving = st.show_u64(&unit(m), "ActiveExitTimestampMonotonic");
        assert!(
            gateway_down <= model_leaving,
            "{m} began stopping before the gateway was down"
        );
    }

    // health when nothing serves: exit 2.
    assert_eq!(st.cli(&["health"]).status.code(), Some(2));

    // uninstall: nothing running or enabled; config and credentials kept.
    st.cli_ok(&["start"]);
    st.cli_ok(&["uninstall"]);
    let units = st
        .sb
        .exec_ok(&[
            "systemctl",
            "list-units",
            "--all",
            "--plain",
            "--no-legend",
            "citadel*",
        ])
        .unwrap();
    assert!(
        units
            .lines()
            .all(|l| l.contains("not-found") || l.contains("inactive")),
        "{units}"
    );
    let files = st
        .sb
        .exec_ok(&["systemctl", "list-unit-files", "--no-legend", "citadel*"])
        .unwrap_or_default();
    assert!(files.trim().is_empty(), "unit files left behind:\n{files}");
    assert!(
        st.pids("citadel-engine-sim").is_empty(),
        "engines still running"
    );
    assert!(
        st.read("/opt/citadel/config/citadel.toml").is_some(),
        "uninstall keeps the config"
    );
    assert!(
        st.read("/etc/citadel/credentials/api-keys").is_some(),
        "uninstall keeps the credentials"
    );

    // uninstall is idempotent; --purge also removes config, credentials, state and the user.
    st.cli_ok(&["uninstall", "--purge"]);
    assert!(st.read("/opt/citadel/config/citadel.toml").is_none());
    assert!(!st.sb.root().join("opt/citadel").exists());
    assert!(
        st.sb.exec_ok(&["getent", "passwd", "citadel"]).is_err(),
        "the user is removed"
    );

    println!(
        "\nPERF e2e: install {install_ms} ms (debug build, incl. daemon-reload), start to all-ready {start_s:.2} s, status best of 5 {:.1} ms",
        best_status.as_secs_f64() * 1000.0
    );
    st.sb.shutdown().expect("clean teardown");
}

#[test]
fn failures_restart_watchdog_crash_loop_and_memory_limit() {
    let extra = r#"
[models.crashy]
port = 11404
args = ["--crash-on-start"]

[models.hog]
port = 11405
args = ["--load-time", "0s", "--allocate-mb-per-sec", "200"]
memory_max = "96M"
memory_high = "88M"
"#;
    let st = Stack::boot("e2e-fail", &config("1s", extra));
    st.install();
    let out = st.cli(&["start", "mixtral", "hermes", "openchat", "phi3", "gateway"]);
    assert!(out.status.success(), "{}", text(&out));

    // kill -9 an engine: systemd restarts the unit; the gateway sees it go and come back.
    let before = st.show_u64(&unit("hermes"), "NRestarts");
    let engine = st.pids("citadel-engine-sim.*--model hermes");
    assert_eq!(engine.len(), 1, "one hermes engine: {engine:?}");
    st.sb
        .exec_ok(&["kill", "-9", &engine[0].to_string()])
        .unwrap();
    st.wait(
        "gateway reports hermes not ready",
        Duration::from_secs(20),
        || st.gateway_state("hermes") != "ready",
    );
    st.wait("hermes restarted", Duration::from_secs(60), || {
        st.show_u64(&unit("hermes"), "NRestarts") == before + 1
            && st.show(&unit("hermes"), "ActiveState") == "active"
    });
    st.wait(
        "gateway reports hermes ready again",
        Duration::from_secs(20),
        || st.gateway_state("hermes") == "ready",
    );

    // SIGSTOP an engine (a hang): the supervisor stops its watchdog pings and systemd restarts it.
    let before = st.show_u64(&unit("openchat"), "NRestarts");
    let engine = st.pids("citadel-engine-sim.*--model openchat");
    assert_eq!(engine.len(), 1);
    st.sb
        .exec_ok(&["kill", "-STOP", &engine[0].to_string()])
        .unwrap();
    st.wait(
        "the watchdog restarts openchat",
        Duration::from_secs(90),
        || {
            st.show_u64(&unit("openchat"), "NRestarts") > before
                && st.show(&unit("openchat"), "ActiveState") == "active"
        },
    );
    let journal = st
        .sb
        .exec_ok(&["journalctl", "--no-pager", "-u", &unit("openchat")])
        .unwrap();
    assert!(
        journal.contains("Watchdog timeout"),
        "no watchdog timeout in the journal:\n{journal}"
    );
    assert!(
        !st.pids("citadel-engine-sim.*--model openchat")
            .contains(&engine[0]),
        "the hung engine is gone"
    );
    st.wait(
        "gateway reports openchat ready again",
        Duration::from_secs(20),
        || st.gateway_state("openchat") == "ready",
    );

    // A crash-looping model ends `failed` after the start-limit burst, not restarting forever.
    // Between attempts systemd shows it `failed` too, so wait for the start limit itself
    // (systemd 252 keeps Result=exit-code and logs "Start request repeated too quickly").
    st.wait(
        "crashy ends failed after the burst",
        Duration::from_secs(120),
        || {
            st.show(&unit("crashy"), "ActiveState") == "failed"
                && st
                    .sb
                    .exec_ok(&["journalctl", "--no-pager", "-u", &unit("crashy")])
                    .is_ok_and(|j| j.contains("Start request repeated too quickly"))
        },
    );
    assert_eq!(st.show(&unit("crashy"), "SubState"), "failed");
    assert_eq!(
        st.show_u64(&unit("crashy"), "NRestarts"),
        5,
        "restarted up to the burst, then given up"
    );
    let health = st.cli(&["health"]);
    assert_eq!(health.status.code(), Some(1), "degraded: {}", text(&health));
    let report = String::from_utf8_lossy(&health.stdout);
    assert!(
        report
            .lines()
            .any(|l| l.contains("crashy") && l.contains("FAIL")),
        "{report}"
    );
    // ... while the other models keep serving.
    for m in MODELS {
        let (code, body) = st.chat(m);
        assert_eq!(code, 200, "{m}: {body}");
    }
    // The failure was reported as a critical journal entry naming the unit.
    let crit = st
        .sb
        .exec_ok(&[
            "journalctl",
            "--no-pager",
            "-o",
            "cat",
            "-p",
            "crit",
            "CITADEL_FAILED_UNIT=citadel-model@crashy.service",
        ])
        .unwrap();
    assert!(
        crit.contains("citadel-model@crashy.service failed"),
        "{crit}"
    );

    // An engine allocating past MemoryMax is killed by the kernel inside its cgroup
    // (cgroup v2 reports Result=oom-kill; on a cgroup v1 host it is a plain SIGKILL
    // of the engine, which the supervisor names in its log).
    st.wait(
        "hog's engine is killed at its memory limit",
        Duration::from_secs(60),
        || {
            st.sb
                .exec_ok(&["journalctl", "--no-pager", "-u", &unit("hog")])
                .is_ok_and(|j| {
                    j.contains("oom-kill")
                        || j.contains("signal SIGKILL; killed from outside: the memory limit")
                })
        },
    );
    for m in MODELS {
        assert_eq!(
            st.show(&unit(m), "ActiveState"),
            "active",
            "{m} survived its neighbours' failures"
        );
    }

    // A start that fails says so: exit 3, the unit's result and its last journal lines.
    let out = st.cli(&["start", "crashy"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("citadel-model@crashy.service: job failed"),
        "{err}"
    );
    assert!(
        err.contains("last journal lines:") && err.contains("crash-on-start"),
        "{err}"
    );
    st.sb.shutdown().expect("clean teardown");
}
