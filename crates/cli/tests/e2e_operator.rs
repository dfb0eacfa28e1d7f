//! Issue 10, items 1 to 3, under a real systemd (PID 1 in a booted sandbox):
//! an operator's everyday habits. The API comes up without waiting for the
//! slowest model and stops without cutting requests; `disable MODEL` holds
//! across a target restart, a gateway restart and a reboot; Citadel's files
//! live in the vendor layer, so `systemctl edit`, `systemctl revert` and a
//! reinstall leave the right effective values; an install of the old layout
//! (generated files in /etc) is migrated.

mod stack;

use std::time::{Duration, Instant};

use stack::{text, unit, Stack, MODELS};

const GATEWAY: &str = "citadel-gateway.service";
const TARGET: &str = "citadel.target";
const VENDOR: &str = "/usr/local/lib/systemd/system";
const ADMIN: &str = "/etc/systemd/system";

/// The demo stack with instant-loading engines, plus `extra`.
fn config(extra: &str) -> String {
    citadel_config::SIM_EXAMPLE_CONFIG.replace("\"--load-time\", \"2s\"", "\"--load-time\", \"0s\"")
        + extra
}

fn systemctl(st: &Stack, args: &[&str]) -> String {
    let mut argv = vec!["systemctl"];
    argv.extend_from_slice(args);
    st.sb
        .exec_ok(&argv)
        .unwrap_or_else(|e| panic!("systemctl {args:?}: {e}\n{}", st.journal_tail()))
}

/// `GET /v1/models` through the gateway: the model ids it lists.
fn listed_models(st: &Stack) -> Vec<String> {
    let (code, body) = st.http(
        "GET",
        "http://127.0.0.1:8000/v1/models",
        Some(&st.api_key()),
        None,
    );
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect()
}

/// A streamed chat completion of `tokens` tokens through the gateway, with
/// the response headers: curl's exit status and everything it received.
fn stream(st: &Stack, key: &str, model: &str, tokens: u32) -> (i32, String) {
    let auth = format!("Authorization: Bearer {key}");
    let body = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":{tokens},"stream":true}}"#
    );
    let out = st
        .sb
        .exec(&[
            "curl",
            "-sS",
            "-N",
            "-i",
            "-m",
            "30",
            "-H",
            &auth,
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &body,
            "http://127.0.0.1:8000/v1/chat/completions",
        ])
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Item 1: with an 8 s loader `health` said DOWN while 2 of 3 models served,
/// and the gateway (After= every model) came up only once the slowest model
/// was ready. Now, with one model taking 60 s to load: the gateway answers a
/// chat completion for another model within 5 s of `citadel-systemd start`,
/// `/v1/models` lists the slow model only once it is ready (503
/// `model_not_ready` + Retry-After before), and `health` says LOADING (exit
/// 1), not DOWN. Then a stop of the whole target, which stops gateway and
/// engines in parallel, lets every stream in flight finish.
#[test]
fn issue10_api_does_not_wait_for_the_slowest_model() {
    let slow = r#"
[models.slowload]
port = 11404
args = ["--load-time", "60s", "--tokens-per-second", "200"]
"#;
    let st = Stack::boot("e2e-op-slow", &config(slow));
    st.install();
    let key = st.api_key();

    std::thread::scope(|s| {
        let started = Instant::now();
        // Neither the API nor `start` waits for the slow model (60 s): `start`
        // returns once the API serves and reports the slow model as loading.
        let start = s.spawn(|| st.cli(&["start"]));
        st.wait(
            "a chat completion for mixtral through the gateway",
            Duration::from_secs(20),
            || st.chat("mixtral").0 == 200,
        );
        let api_after = started.elapsed();
        println!(
            "PERF issue10: API served mixtral {:.1} s after `start`",
            api_after.as_secs_f64()
        );
        assert!(
            api_after < Duration::from_secs(5),
            "the API answered only {api_after:?} after start"
        );
        assert_eq!(st.show(&unit("slowload"), "ActiveState"), "activating");
        assert_eq!(st.show(GATEWAY, "ActiveState"), "active");

        // The slow model is not listed and not routed to while it loads.
        st.wait(
            "every fast model is listed",
            Duration::from_secs(10),
            || {
                let listed = listed_models(&st);
                MODELS.iter().all(|m| listed.iter().any(|l| l == m))
            },
        );
        assert!(!listed_models(&st).iter().any(|m| m == "slowload"));
        let (code, body) = st.chat("slowload");
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("model_not_ready"), "{body}");
        let headers = st
            .sb
            .exec_ok(&[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-D",
                "-",
                "-H",
                &format!("Authorization: Bearer {key}"),
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                r#"{"model":"slowload","messages":[{"role":"user","content":"hi"}]}"#,
                "http://127.0.0.1:8000/v1/chat/completions",
            ])
            .unwrap();
        assert!(
            headers.to_ascii_lowercase().contains("retry-after:"),
            "{headers}"
        );

        // health: loading, not down (exit 1, the word "loading").
        let health = st.cli(&["health"]);
        let report = String::from_utf8_lossy(&health.stdout).into_owned();
        assert_eq!(health.status.code(), Some(1), "{}", text(&health));
        assert!(report.starts_with("LOADING:"), "{report}");
        assert!(
            report
                .lines()
                .any(|l| l.contains("slowload") && l.contains("loading")),
            "{report}"
        );
        let out = st.cli(&["health", "--json"]);
        let json: serde_json::Value =
            serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
        assert_eq!(json["overall"], "loading", "{json}");
        assert_eq!(json["loading"], 1, "{json}");
        let slow_state = json["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["model"] == "slowload")
            .unwrap()["state"]
            .clone();
        assert_eq!(slow_state, "loading", "{json}");

        let out = start.join().expect("start thread");
        assert!(out.status.success(), "{}", text(&out));
        println!(
            "PERF issue10: `start` returned after {:.1} s (the API serves; slowload still loading)",
            started.elapsed().as_secs_f64()
        );
        assert_eq!(st.show(&unit("slowload"), "ActiveState"), "activating");
    });
    // The gateway probes the engine itself and may list it a moment before
    // the supervisor's own check sends READY=1: wait for both.
    st.wait(
        "the gateway admits slowload once it is ready",
        Duration::from_secs(90),
        || {
            listed_models(&st).iter().any(|m| m == "slowload")
                && st.show(&unit("slowload"), "ActiveState") == "active"
        },
    );
    // The gateway became active long before the slow model was ready (both
    // timestamps exist only now: a unit never active has none).
    let gateway_at = st.show_u64(GATEWAY, "ActiveEnterTimestampMonotonic");
    let slow_at = st.show_u64(&unit("slowload"), "ActiveEnterTimestampMonotonic");
    assert!(
        gateway_at > 0 && gateway_at + 30_000_000 < slow_at,
        "the gateway waited for the slow model: active at {gateway_at} us, slowload at {slow_at} us"
    );
    assert_eq!(st.chat("slowload").0, 200);
    let health = st.cli(&["health"]);
    assert_eq!(health.status.code(), Some(0), "{}", text(&health));

    // A clean stop without start ordering: `systemctl stop citadel.target`
    // stops the gateway and the models at once; streams in flight (1.5 s at
    // 200 tokens/s) all finish with [DONE].
    let outcomes: Vec<(String, i32, String)> = std::thread::scope(|s| {
        let streams: Vec<_> = MODELS
            .iter()
            .map(|m| {
                let (st, key) = (&st, &key);
                (*m, s.spawn(move || stream(st, key, m, 300)))
            })
            .collect();
        st.wait("the streams are in flight", Duration::from_secs(10), || {
            let (_, body) = st.http("GET", "http://127.0.0.1:8000/metrics", None, None);
            body.lines()
                .filter(|l| l.starts_with("citadel_gateway_in_flight_requests"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
                >= MODELS.len() as f64
        });
        let stop = Instant::now();
        systemctl(&st, &["stop", TARGET]);
        // systemctl waits for the target's own job only: it returns before
        // the gateway and the engines have drained.
        println!(
            "PERF issue10: systemctl stop citadel.target returned after {:.1} s with {} streams in flight",
            stop.elapsed().as_secs_f64(),
            MODELS.len()
        );
        streams
            .into_iter()
            .map(|(m, h)| {
                let (code, out) = h.join().expect("stream thread");
                (m.to_owned(), code, out)
            })
            .collect()
    });
    for (m, code, out) in &outcomes {
        assert_eq!(*code, 0, "{m}: curl failed:\n{out}");
        assert!(out.starts_with("HTTP/1.1 200"), "{m}:\n{out}");
        assert!(
            out.contains("data: [DONE]"),
            "{m}: the stream was cut:\n{out}"
        );
    }
    // The streams ended with [DONE]; each unit finishes its stop right after
    // (the supervisor reaps its engine): wait for that, then check how.
    st.wait(
        "every model and the gateway are stopped",
        Duration::from_secs(30),
        || {
            MODELS
                .iter()
                .map(|m| unit(m))
                .chain(std::iter::once(GATEWAY.to_owned()))
                .all(|u| st.show(&u, "ActiveState") == "inactive")
        },
    );
    for m in MODELS {
        assert_eq!(st.show(&unit(m), "Result"), "success", "{m}");
    }
    st.sb.shutdown().expect("clean teardown");
}

/// Item 2: after `citadel-systemd disable hermes`, `systemctl stop
/// citadel.target; systemctl start citadel.target` brought hermes back
/// (`WantedBy=citadel-gateway.service` through the gateway's `Wants=`), and
/// `systemctl restart citadel-gateway` revived a stopped model. Now only
/// enablement pulls a model in: it stays stopped across a target restart, a
/// gateway restart and a reboot over the same state.
#[test]
fn issue10_disable_sticks_across_target_restart_and_reboot() {
    let mut st = Stack::boot("e2e-op-disable", &config(""));
    st.install();
    st.cli_ok(&["start"]);
    st.cli_ok(&["disable", "hermes"]);
    st.cli_ok(&["stop", "hermes"]);
    assert_eq!(st.show(&unit("hermes"), "UnitFileState"), "disabled");
    let others = ["mixtral", "openchat", "phi3"];
    let all_up = |st: &Stack| {
        st.show(GATEWAY, "ActiveState") == "active"
            && others
                .iter()
                .all(|m| st.show(&unit(m), "ActiveState") == "active")
    };

    // A target restart.
    systemctl(&st, &["stop", TARGET]);
    systemctl(&st, &["start", TARGET]);
    st.wait(
        "the enabled units are up again",
        Duration::from_secs(30),
        || all_up(&st),
    );
    assert_eq!(
        st.show(&unit("hermes"), "ActiveState"),
        "inactive",
        "a target restart started the disabled model"
    );
    systemctl(&st, &["restart", TARGET]);
    st.wait(
        "the enabled units are up again",
        Duration::from_secs(30),
        || all_up(&st),
    );
    assert_eq!(st.show(&unit("hermes"), "ActiveState"), "inactive");

    // A gateway restart starts no model (and no stopped model of an enabled one).
    systemctl(&st, &["stop", &unit("phi3")]);
    systemctl(&st, &["restart", GATEWAY]);
    assert_eq!(st.show(GATEWAY, "ActiveState"), "active");
    assert_eq!(st.show(&unit("hermes"), "ActiveState"), "inactive");
    assert_eq!(
        st.show(&unit("phi3"), "ActiveState"),
        "inactive",
        "a gateway restart revived a stopped model"
    );

    // A reboot over the same state: what is enabled starts, hermes does not.
    st.sb.reboot().expect("reboot the sandbox");
    st.wait(
        "the stack is up after the reboot",
        Duration::from_secs(60),
        || all_up(&st) && st.show(TARGET, "ActiveState") == "active",
    );
    assert_eq!(
        st.show(&unit("hermes"), "ActiveState"),
        "inactive",
        "the disabled model started at boot"
    );
    assert_eq!(st.show(&unit("hermes"), "UnitFileState"), "disabled");
    st.wait(
        "the gateway routes to phi3",
        Duration::from_secs(20),
        || st.gateway_state("phi3") == "ready",
    );
    assert_eq!(st.chat("phi3").0, 200);
    let health = st.cli(&["health"]);
    assert_eq!(health.status.code(), Some(1), "{}", text(&health));

    // enable brings it back at the next boot (and start starts it now).
    st.cli_ok(&["enable", "hermes"]);
    systemctl(&st, &["start", TARGET]);
    st.wait("hermes runs once enabled", Duration::from_secs(30), || {
        st.show(&unit("hermes"), "ActiveState") == "active"
    });
    st.sb.shutdown().expect("clean teardown");
}

/// `systemctl show -p MemoryMax,TimeoutStopUSec,CPUQuotaPerSecUSec --value`.
fn limits(st: &Stack, u: &str) -> (String, String, String) {
    (
        st.show(u, "MemoryMax"),
        st.show(u, "TimeoutStopUSec"),
        st.show(u, "CPUQuotaPerSecUSec"),
    )
}

/// Runs the real `systemctl edit UNIT` with an editor that writes `contents`
/// (systemd 252 refuses to edit without a terminal: `script` gives it one).
fn systemctl_edit(st: &Stack, u: &str, contents: &str) {
    let editor = st.sb.root().join("usr/local/lib/citadel-test/editor");
    std::fs::write(
        &editor,
        format!("#!/bin/sh\nprintf '%s' '{contents}' > \"$1\"\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&editor, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cmd = format!("SYSTEMD_EDITOR=/usr/local/lib/citadel-test/editor systemctl edit {u}");
    let out = st.sb.exec(&["script", "-qec", &cmd, "/dev/null"]).unwrap();
    assert!(out.status.success(), "systemctl edit: {}", text(&out));
}

/// Item 3: generated units and `50-citadel.conf` lived in /etc/systemd/system,
/// the administrator's layer: `systemctl revert citadel-model@hermes.service`
/// removed Citadel's drop-in and left `MemoryMax=infinity`. Now Citadel's files
/// are in the vendor layer: an edit overrides them, a revert removes only the
/// edit, a reinstall leaves the edit alone.
#[test]
fn issue10_revert_and_edit_keep_citadel_limits() {
    let st = Stack::boot("e2e-op-revert", &config(""));
    st.install();
    let hermes = unit("hermes");
    let citadel = (
        (256u64 << 20).to_string(),
        "25s".to_owned(),   // stop_timeout 10s + 15s
        "500ms".to_owned(), // cpus = 0.5
    );
    assert_eq!(limits(&st, &hermes), citadel);
    let drop_ins = st.show(&hermes, "DropInPaths");
    assert_eq!(
        drop_ins,
        format!("{VENDOR}/citadel-model@hermes.service.d/50-citadel.conf"),
        "Citadel's drop-in is in the vendor layer"
    );
    assert!(st
        .read(&format!("{ADMIN}/citadel-model@.service"))
        .is_none());
    assert_eq!(
        st.show(&hermes, "FragmentPath"),
        format!("{VENDOR}/citadel-model@.service")
    );

    // systemctl edit: the operator's value wins, Citadel's others stay.
    systemctl_edit(&st, &hermes, "[Service]\nMemoryMax=300M\n");
    let override_conf = format!("{ADMIN}/citadel-model@hermes.service.d/override.conf");
    assert!(
        st.read(&override_conf).is_some(),
        "systemctl edit wrote {override_conf}"
    );
    assert_eq!(
        limits(&st, &hermes),
        (
            (300u64 << 20).to_string(),
            citadel.1.clone(),
            citadel.2.clone()
        )
    );

    // A reinstall changes nothing and keeps the operator's edit in force.
    let out = st.install();
    assert!(out.contains("nothing to change"), "{out}");
    assert_eq!(st.show(&hermes, "MemoryMax"), (300u64 << 20).to_string());

    // systemctl revert removes the edit only: Citadel's limits are back.
    systemctl(&st, &["revert", &hermes]);
    assert!(st.read(&override_conf).is_none());
    assert_eq!(
        limits(&st, &hermes),
        citadel,
        "revert lost Citadel's limits"
    );
    // ... also for the gateway, a plain unit (revert of a vendor unit).
    let gw = limits(&st, GATEWAY);
    assert_eq!(gw.0, (256u64 << 20).to_string());
    systemctl(&st, &["revert", GATEWAY]);
    assert_eq!(limits(&st, GATEWAY), gw);
    // A reinstall after the revert: still nothing to change.
    assert!(st.install().contains("nothing to change"));
    // Revert is not a way to lose the unit either: it still starts and serves.
    st.cli_ok(&["start", "hermes", "gateway"]);
    st.wait("hermes serves", Duration::from_secs(20), || {
        st.gateway_state("hermes") == "ready"
    });
    assert_eq!(st.chat("hermes").0, 200);
    st.sb.shutdown().expect("clean teardown");
}

/// Item 3, migration: an install of the old layout (every generated file in
/// /etc, as Citadel wrote it before, enabled, with an operator's drop-in and
/// the install record listing the old paths) is moved to the vendor layer by
/// `install`: the old generated files go, the operator's drop-ins stay and
/// still apply, enablement is kept and the record lists the new paths.
#[test]
fn issue10_install_migrates_the_old_etc_layout() {
    let st = Stack::boot("e2e-op-migrate", &config(""));
    // The old layout: the rendered files where the previous version put them.
    st.cli_ok(&["render", "--out", "/var/tmp/old"]);
    let rendered = st
        .sb
        .exec_ok(&["find", "/var/tmp/old", "-type", "f", "-printf", "%P\n"])
        .unwrap();
    let mut old_files = Vec::new();
    for rel in rendered.lines() {
        let to = if rel.starts_with("sysusers.d/")
            || rel.starts_with("tmpfiles.d/")
            || rel.starts_with("modules-load.d/")
        {
            format!("/etc/{rel}")
        } else {
            format!("{ADMIN}/{rel}")
        };
        st.write(&to, &st.read(&format!("/var/tmp/old/{rel}")).unwrap());
        old_files.push(to);
    }
    assert!(old_files.len() >= 8, "{old_files:?}");
    let record = serde_json::json!({
        "version": 1,
        "created_dirs": [],
        "preexisting_dirs": [],
        "files": old_files,
        "created_user": null,
        "created_group": null,
    });
    st.write(
        "/var/lib/citadel-systemd/installed.json",
        &serde_json::to_string_pretty(&record).unwrap(),
    );
    // The operator's drop-ins (drop-ins of all layers apply in file-name
    // order, so an operator's value wins when its name sorts after
    // 50-citadel.conf, as systemctl edit's override.conf does).
    st.write(
        &format!("{ADMIN}/citadel-model@hermes.service.d/override.conf"),
        "[Service]\nEnvironment=OPERATOR_NOTE=kept\n",
    );
    st.write(
        &format!("{ADMIN}/citadel-model@phi3.service.d/90-mine.conf"),
        "[Service]\nMemoryMax=300M\n",
    );
    systemctl(&st, &["daemon-reload"]);
    let mut enable = vec!["enable", TARGET, GATEWAY];
    let units: Vec<String> = MODELS.iter().map(|m| unit(m)).collect();
    enable.extend(units.iter().map(String::as_str));
    systemctl(&st, &enable);
    assert_eq!(
        st.show(&unit("hermes"), "FragmentPath"),
        format!("{ADMIN}/citadel-model@.service")
    );

    let out = st.install();
    for f in &old_files {
        assert!(
            st.read(f).is_none(),
            "{f} is left after the migration:\n{out}"
        );
        assert!(out.contains(&format!("remove   {f}")), "{f}:\n{out}");
    }
    for path in [
        format!("{VENDOR}/citadel-model@.service"),
        format!("{VENDOR}/citadel-gateway.service"),
        format!("{VENDOR}/citadel.target"),
        format!("{VENDOR}/citadel-model@hermes.service.d/50-citadel.conf"),
        "/usr/local/lib/sysusers.d/citadel.conf".to_owned(),
        "/usr/local/lib/tmpfiles.d/citadel.conf".to_owned(),
    ] {
        assert!(st.read(&path).is_some(), "{path} missing:\n{out}");
    }
    // The operator's files stay, and apply on top of Citadel's.
    assert!(st
        .read(&format!(
            "{ADMIN}/citadel-model@hermes.service.d/override.conf"
        ))
        .is_some());
    assert!(st
        .read(&format!(
            "{ADMIN}/citadel-model@phi3.service.d/90-mine.conf"
        ))
        .is_some());
    assert_eq!(
        st.show(&unit("hermes"), "FragmentPath"),
        format!("{VENDOR}/citadel-model@.service")
    );
    assert!(st
        .show(&unit("hermes"), "Environment")
        .contains("OPERATOR_NOTE=kept"));
    assert_eq!(
        st.show(&unit("hermes"), "MemoryMax"),
        (256u64 << 20).to_string()
    );
    assert_eq!(
        st.show(&unit("phi3"), "MemoryMax"),
        (300u64 << 20).to_string()
    );
    // Enablement: install enables the stack; no link points at a removed file.
    assert_eq!(st.show(TARGET, "UnitFileState"), "enabled");
    assert_eq!(st.show(&unit("hermes"), "UnitFileState"), "enabled");
    let dangling = st.sb.exec_ok(&["find", ADMIN, "-xtype", "l"]).unwrap();
    assert!(dangling.trim().is_empty(), "dangling links:\n{dangling}");
    // The install record lists the new paths and no longer the old ones.
    let record: serde_json::Value =
        serde_json::from_str(&st.read("/var/lib/citadel-systemd/installed.json").unwrap()).unwrap();
    let files: Vec<&str> = record["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert!(
        files.iter().all(|f| !f.starts_with("/etc/systemd")
            && !f.starts_with("/etc/sysusers.d")
            && !f.starts_with("/etc/tmpfiles.d")),
        "{files:?}"
    );
    assert!(
        files.contains(&"/usr/local/lib/systemd/system/citadel-model@.service"),
        "{files:?}"
    );
    // A second install: nothing left to migrate.
    assert!(st.install().contains("nothing to change"));
    // The migrated stack runs.
    st.cli_ok(&["start"]);
    st.wait("hermes serves", Duration::from_secs(30), || {
        st.gateway_state("hermes") == "ready"
    });

    // uninstall removes the vendor files and leaves the operator's drop-ins.
    st.cli_ok(&["uninstall"]);
    assert!(st
        .read(&format!("{VENDOR}/citadel-model@.service"))
        .is_none());
    assert!(st
        .read(&format!(
            "{ADMIN}/citadel-model@hermes.service.d/override.conf"
        ))
        .is_some());
    st.sb.shutdown().expect("clean teardown");
}

/// Items 1 and 2, what `citadel-systemd start` and `restart` do:
/// - `start` waited for every job it queued, the slowest model's too, and
///   returned only once it had loaded; now it returns once the API serves
///   (exit 0), names the model still loading, and has waited until the
///   gateway admits every ready model, so the fast ones route at once;
/// - a reinstall re-enabled every model, undoing `disable`: now `install`
///   enables only models new to it, so a disabled model stays disabled and
///   stopped across a reinstall, `systemctl restart citadel.target`, and
///   `citadel-systemd start` and `restart` of the whole stack.
#[test]
fn issue10_start_waits_for_the_api_and_reinstall_keeps_disable() {
    let slow = r#"
[models.slowload]
port = 11404
args = ["--load-time", "60s"]
"#;
    let st = Stack::boot("e2e-op-start", &config(slow));
    st.install();

    let t = Instant::now();
    let out = st.cli(&["start"]);
    let took = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    println!(
        "PERF issue10: `start` returned after {:.1} s with slowload loading",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(30),
        "start waited {took:?} (slowload loads for 60 s)"
    );
    assert!(
        stdout.contains("still loading: slowload"),
        "start does not say that slowload loads:\n{stdout}"
    );
    assert_eq!(st.show(&unit("slowload"), "ActiveState"), "activating");
    // The fast models were admitted before `start` returned.
    for m in MODELS {
        assert_eq!(st.gateway_state(m), "ready", "{m} right after start");
    }
    assert_eq!(st.chat("hermes").0, 200);

    // Disable one model, reinstall: it stays disabled.
    st.cli_ok(&["disable", "hermes"]);
    st.cli_ok(&["stop", "hermes"]);
    let out = st.install();
    assert!(out.contains("kept as it was"), "{out}");
    assert_eq!(st.show(&unit("hermes"), "UnitFileState"), "disabled");
    let enabled = st
        .sb
        .exec(&["systemctl", "is-enabled", &unit("hermes")])
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&enabled.stdout).trim(),
        "disabled",
        "a reinstall enabled the disabled model"
    );
    assert_eq!(st.show(&unit("mixtral"), "UnitFileState"), "enabled");

    // ... and stopped across a target restart.
    systemctl(&st, &["restart", TARGET]);
    st.wait(
        "the enabled fast models are up again",
        Duration::from_secs(30),
        || {
            ["mixtral", "openchat", "phi3"]
                .iter()
                .all(|m| st.show(&unit(m), "ActiveState") == "active")
        },
    );
    assert_eq!(st.show(&unit("hermes"), "ActiveState"), "inactive");

    // `citadel-systemd start` and `restart` of the whole stack leave it stopped.
    let out = st.cli_ok(&["start"]);
    assert!(out.contains("disabled, not started: hermes"), "{out}");
    assert_eq!(st.show(&unit("hermes"), "ActiveState"), "inactive");
    let out = st.cli_ok(&["restart"]);
    assert!(out.contains("disabled, not started: hermes"), "{out}");
    assert_eq!(st.show(&unit("hermes"), "ActiveState"), "inactive");
    assert_eq!(st.gateway_state("mixtral"), "ready", "after restart");
    // An explicit `start hermes` still starts it.
    st.cli_ok(&["start", "hermes"]);
    assert_eq!(st.show(&unit("hermes"), "ActiveState"), "active");
    st.sb.shutdown().expect("clean teardown");
}
