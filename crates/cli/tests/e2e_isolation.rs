//! Issue 12, item 1, under the real systemd (PID 1 in a booted sandbox, the
//! sim stack): engines are reachable only through the gateway. The gateway
//! and the models share Citadel's private network namespace
//! (`/run/netns/citadel`, `citadel-netns.service`); the gateway's public
//! socket comes from PID 1 (`citadel-gateway.socket`).
//!
//! Before: as user `nobody`, `POST 127.0.0.1:11400/v1/chat/completions`
//! straight to an engine returned 200 (no key, no rate limit).

mod stack;

use std::time::Duration;

use stack::{unit, Stack};

const MODEL: &str = "phi3";
const ENGINE: &str = "http://127.0.0.1:11400";
const GATEWAY: &str = "http://127.0.0.1:8000";

/// The demo stack cut down to one instant-loading model on 11400.
fn config() -> String {
    stack::instant_models(&[(MODEL, 11400)])
}

fn chat_body() -> String {
    format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":5}}"#
    )
}

/// curl inside the sandbox, as `user` (via runuser) or as root, optionally in
/// another network namespace: (curl's exit code, HTTP status).
fn curl(st: &Stack, user: Option<&str>, netns: bool, url: &str, key: Option<&str>) -> (i32, u16) {
    let mut argv: Vec<String> = Vec::new();
    if let Some(u) = user {
        argv.extend(["runuser", "-u", u, "--"].map(String::from));
    }
    if netns {
        argv.extend(["nsenter", "--net=/run/netns/citadel", "--"].map(String::from));
    }
    argv.extend(
        [
            "curl",
            "-s",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ]
        .map(String::from),
    );
    if let Some(k) = key {
        argv.extend(["-H".into(), format!("Authorization: Bearer {k}")]);
    }
    if url.ends_with("/completions") {
        argv.extend(
            [
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
            ]
            .map(String::from),
        );
        argv.push(chat_body());
    }
    argv.push(url.to_owned());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = st.sb.exec(&argv).unwrap();
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let rc = out.status.code().unwrap_or(-1);
    println!("$ {}  -> curl exit {rc}, http {code}", argv.join(" "));
    (rc, code)
}

/// curl's exit status for "Failed to connect to host" (connection refused).
const CURL_COULDNT_CONNECT: i32 = 7;

#[test]
fn issue12_engines_are_reachable_only_through_the_gateway() {
    let st = Stack::boot("e2e-isolation", &config());
    st.install();
    st.cli_ok(&["start"]);
    st.wait(
        &format!("{MODEL} ready in the gateway"),
        Duration::from_secs(60),
        || st.gateway_state(MODEL) == "ready",
    );
    let key = st.api_key();
    let completions = format!("{ENGINE}/v1/chat/completions");
    let through_gateway = format!("{GATEWAY}/v1/chat/completions");

    // As an unprivileged local user: the engine is not there, the gateway is.
    let (rc, code) = curl(&st, Some("nobody"), false, &completions, None);
    assert_eq!(
        (rc, code),
        (CURL_COULDNT_CONNECT, 0),
        "nobody reached the engine"
    );
    let (rc, code) = curl(
        &st,
        Some("nobody"),
        false,
        &format!("{ENGINE}/health"),
        None,
    );
    assert_eq!(
        (rc, code),
        (CURL_COULDNT_CONNECT, 0),
        "nobody reached the engine's /health"
    );
    assert_eq!(
        curl(&st, Some("nobody"), false, &through_gateway, None).1,
        401
    );
    assert_eq!(
        curl(&st, Some("nobody"), false, &through_gateway, Some(&key)).1,
        200
    );
    // Root on the host's network is no different: the address is not the engine's.
    assert_eq!(
        curl(&st, None, false, &completions, None).0,
        CURL_COULDNT_CONNECT
    );

    // The engine runs in Citadel's namespace (where the gateway and the
    // supervisor's readiness probe reach it).
    assert_eq!(
        curl(&st, None, true, &format!("{ENGINE}/health"), None).1,
        200
    );
    let gw_ns = st
        .sb
        .exec_ok(&[
            "sh",
            "-c",
            "readlink /proc/$(systemctl show -p MainPID --value citadel-gateway.service)/ns/net",
        ])
        .unwrap();
    let model_ns = st
        .sb
        .exec_ok(&[
            "sh",
            "-c",
            &format!(
                "readlink /proc/$(systemctl show -p MainPID --value {})/ns/net",
                unit(MODEL)
            ),
        ])
        .unwrap();
    let named_ns = st
        .sb
        .exec_ok(&["readlink", "-f", "/run/netns/citadel"])
        .ok();
    println!("gateway {gw_ns} model {model_ns} ({named_ns:?})");
    assert_eq!(
        gw_ns.trim(),
        model_ns.trim(),
        "gateway and model share one namespace"
    );
    let host_ns = st.sb.exec_ok(&["readlink", "/proc/1/ns/net"]).unwrap();
    assert_ne!(
        gw_ns.trim(),
        host_ns.trim(),
        "the gateway is not on the host's network"
    );

    // READY=1 came from the supervisor's probe inside the namespace; health says so.
    assert_eq!(st.show(&unit(MODEL), "ActiveState"), "active");
    assert_eq!(st.show("citadel-gateway.service", "ActiveState"), "active");
    assert_eq!(st.show("citadel-gateway.socket", "ActiveState"), "active");
    let health = st.cli(&["health", "--json"]);
    let text = String::from_utf8_lossy(&health.stdout);
    assert_eq!(health.status.code(), Some(0), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["overall"], "healthy", "{text}");
    assert_eq!(v["models"][0]["engine_probe"], "ok", "{text}");

    // The gateway restarting while the model runs rejoins the same namespace,
    // and under light load no connection is refused (they wait in the socket).
    let load = format!(
        "fails=0; for i in $(seq 1 200); do \
           code=$(curl -s -m 10 -o /dev/null -w '%{{http_code}}' {GATEWAY}/health) || fails=$((fails+1)); \
           [ \"$code\" = 200 ] || fails=$((fails+1)); \
         done; echo $fails"
    );
    let load_child = st
        .sb
        .command(&["sh", "-c", &load])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    st.sb
        .exec_ok(&["systemctl", "restart", "citadel-gateway.service"])
        .unwrap();
    let out = load_child.wait_with_output().unwrap();
    let fails = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    println!("requests to /health failed during the gateway's restart: {fails} of 200");
    assert_eq!(fails, "0", "a request failed during the gateway's restart");
    st.wait(
        "model ready after the gateway's restart",
        Duration::from_secs(30),
        || st.gateway_state(MODEL) == "ready",
    );
    assert_eq!(
        curl(&st, Some("nobody"), false, &through_gateway, Some(&key)).1,
        200
    );

    // A model restarting alone rejoins the gateway's namespace.
    st.sb
        .exec_ok(&["systemctl", "restart", &unit(MODEL)])
        .unwrap();
    st.wait(
        "model ready after its restart",
        Duration::from_secs(60),
        || st.gateway_state(MODEL) == "ready",
    );
    assert_eq!(
        curl(&st, Some("nobody"), false, &through_gateway, Some(&key)).1,
        200
    );
    assert_eq!(
        curl(&st, Some("nobody"), false, &completions, None).0,
        CURL_COULDNT_CONNECT
    );

    // `stop gateway` stops its socket too (or the next connection would start it).
    st.cli_ok(&["stop", "gateway"]);
    assert_eq!(st.show("citadel-gateway.socket", "ActiveState"), "inactive");
    assert_eq!(
        curl(&st, None, false, &format!("{GATEWAY}/health"), None).0,
        CURL_COULDNT_CONNECT
    );
    st.cli_ok(&["start", "gateway"]);
    st.wait(
        "model ready after the gateway's start",
        Duration::from_secs(30),
        || st.gateway_state(MODEL) == "ready",
    );

    // Everything stopped: the namespace is gone (StopWhenUnneeded=yes).
    st.cli_ok(&["stop"]);
    st.wait("the namespace removed", Duration::from_secs(20), || {
        st.show("citadel-netns.service", "ActiveState") == "inactive"
    });
    assert!(!st
        .sb
        .exec(&["test", "-e", "/run/netns/citadel"])
        .unwrap()
        .status
        .success());
}

/// The documented fallback: a model with replicas keeps the stack on the
/// host's network (a private namespace has no way to them), `validate` warns
/// that engines are then reachable by any local user, and that is true; the
/// gateway still gets its socket from systemd.
#[test]
fn issue12_replicas_keep_the_host_network_with_a_warning() {
    let config = format!("{}replicas = [\"http://127.0.0.1:11499\"]\n", config());
    let st = Stack::boot("e2e-isolation-host", &config);
    let out = st.cli(&["validate", "--bin-dir", &st.bin_dir.clone()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("engines are not isolated from local users")
            && err.contains("model `phi3` has replicas")
            && err.contains("models.phi3.replicas"),
        "{}",
        stack::text(&out)
    );
    st.install();
    st.cli_ok(&["start"]);
    st.wait(
        &format!("{MODEL} ready in the gateway"),
        Duration::from_secs(60),
        || st.gateway_state(MODEL) == "ready",
    );
    let key = st.api_key();
    assert_eq!(
        curl(
            &st,
            Some("nobody"),
            false,
            &format!("{GATEWAY}/v1/chat/completions"),
            Some(&key)
        )
        .1,
        200
    );
    // What the warning says: the engine is on the host's loopback.
    assert_eq!(
        curl(
            &st,
            Some("nobody"),
            false,
            &format!("{ENGINE}/health"),
            None
        )
        .1,
        200
    );
    assert_eq!(st.show("citadel-gateway.socket", "ActiveState"), "active");
    assert_eq!(st.show("citadel-netns.service", "LoadState"), "not-found");
}
