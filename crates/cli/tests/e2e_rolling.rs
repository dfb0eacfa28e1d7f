//! Issue 15, items 3-5, under a real systemd (PID 1 in a booted sandbox, sim
//! engines that take a while to load): `restart --rolling` restarts a
//! model's two instances one at a time through the gateway's admin channel
//! and `restart --surge` restarts a single-instance model behind a temporary
//! instance; under steady load through the gateway neither fails a request,
//! and every engine is a new process afterwards. A single instance cannot
//! roll, and a surge without the memory for one more instance is refused:
//! both say why, exit 1 and change nothing.

mod stack;

use std::time::{Duration, Instant};

use serde_json::Value;
use stack::{text, Stack};

const MODEL: &str = "phi3";
const FIRST: &str = "citadel-model@phi3.service";
const SECOND: &str = "citadel-model@phi3:2.service";
const SURGE: &str = "citadel-model@phi3:surge.service";
const SURGE_DROPIN: &str = "/run/systemd/system/citadel-model@phi3:surge.service.d";

/// The sim stack cut down to phi3 (port 11403) loading for `load_time`, with
/// a key budget this load cannot exhaust, plus `extra` lines at the end.
fn config(load_time: &str, extra: &str) -> String {
    let c = citadel_config::SIM_EXAMPLE_CONFIG
        .replace(
            "\"--load-time\", \"2s\"",
            &format!("\"--load-time\", \"{load_time}\""),
        )
        .replace(
            "rate_limit_per_minute = 6000 ",
            "rate_limit_per_minute = 1000000 ",
        );
    assert!(c.contains("rate_limit_per_minute = 1000000 "));
    let head = c
        .split("[models.mixtral]")
        .next()
        .expect("the sim example has models");
    format!("{head}[models.phi3]\nport = 11403\n{extra}")
}

/// The gateway's backends of the model from its admin channel.
fn backends(st: &Stack) -> Vec<Value> {
    st.admin_backends(MODEL)
}

fn ready_count(st: &Stack) -> usize {
    backends(st)
        .iter()
        .filter(|b| b["health"] == "ready" && b["drained"] == false)
        .count()
}

/// `n` streamed completions of ~300 tokens (1.5 s at the sim's 200 tokens/s),
/// one after another; each body is kept in /tmp/e2e-stream-N.txt inside.
/// Returns `HTTP_CODE CURL_EXIT MESSAGE` per request, like `chat_load`.
fn stream_load(st: &Stack, key: &str, n: u32) -> Vec<String> {
    let auth = format!("Authorization: Bearer {key}");
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":300,"stream":true}}"#
    );
    let url = format!("http://127.0.0.1:8000/v1/chat/completions?s=[1-{n}]");
    let out = st
        .sb
        .exec(&[
            "curl",
            "-sN",
            "-m",
            "20",
            "-H",
            &auth,
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &body,
            "-o",
            "/tmp/e2e-stream-#1.txt",
            "-w",
            "%{http_code} %{exitcode} %{errormsg}\\n",
            &url,
        ])
        .expect("run curl in the sandbox");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Requests the gateway answered so far (all statuses).
fn gateway_requests(st: &Stack) -> u64 {
    let (_, body) = st.http("GET", "http://127.0.0.1:8000/metrics", None, None);
    body.lines()
        .filter(|l| l.starts_with("citadel_gateway_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn boot_and_start(name: &str, config: &str, units: &[&str]) -> Stack {
    let st = Stack::boot(name, config);
    st.install();
    st.cli_ok(&["start", "--wait"]);
    for u in units {
        st.wait(&format!("{u} active"), Duration::from_secs(60), || {
            st.show(u, "ActiveState") == "active"
        });
    }
    st.wait(
        "every instance ready at the gateway",
        Duration::from_secs(30),
        || ready_count(&st) == units.len(),
    );
    st
}

/// Runs `citadel-systemd ARGS` while two clients send phi3 requests through
/// the gateway at `rate` per second each for `secs` seconds; returns the
/// command's output and the failed requests (of how many).
fn under_load(
    st: &Stack,
    rate: u32,
    secs: u32,
    args: &[&str],
) -> (std::process::Output, Vec<String>, usize) {
    let key = st.api_key();
    let n = rate * secs;
    let started = Instant::now();
    // ~1.5 s streams one after another, so that a drain finds one in flight.
    let streams = secs * 2 / 3;
    let (out, outcomes) = std::thread::scope(|s| {
        let mut loads: Vec<_> = (0..2)
            .map(|_| s.spawn(|| st.chat_load(MODEL, &key, n, rate)))
            .collect();
        loads.push(s.spawn(|| stream_load(st, &key, streams)));
        // The load is flowing before the restart begins.
        let base = gateway_requests(st);
        st.wait(
            "the load reaches the gateway",
            Duration::from_secs(10),
            || gateway_requests(st) >= base + 40,
        );
        let out = st.cli(args);
        assert!(
            loads.iter().all(|h| !h.is_finished()),
            "the load ended before `{}` did ({:.1} s): make it longer",
            args.join(" "),
            started.elapsed().as_secs_f64()
        );
        let outcomes: Vec<String> = loads
            .into_iter()
            .flat_map(|h| h.join().expect("load thread"))
            .collect();
        (out, outcomes)
    });
    assert_eq!(
        outcomes.len(),
        (2 * n + streams) as usize,
        "every request ran"
    );
    let mut failed: Vec<String> = outcomes
        .iter()
        .filter(|l| !l.starts_with("200 0"))
        .cloned()
        .collect();
    let kept = st
        .sb
        .exec_ok(&["sh", "-c", "ls /tmp/e2e-stream-*.txt | wc -l"])
        .expect("list the streams");
    assert_eq!(kept.trim(), streams.to_string(), "every stream was kept");
    // A stream cut short still has status 200: it must end with [DONE].
    let cut = st
        .sb
        .exec(&[
            "sh",
            "-c",
            "grep -L 'data: \\[DONE\\]' /tmp/e2e-stream-*.txt",
        ])
        .unwrap();
    failed.extend(
        String::from_utf8_lossy(&cut.stdout)
            .lines()
            .map(|f| format!("stream without [DONE]: {f}")),
    );
    println!(
        "PERF issue15 {}: {} requests in {:.1} s, {} failed",
        args.join(" "),
        outcomes.len(),
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    for l in failed.iter().take(10) {
        println!("  failed: {l}");
    }
    (out, failed, outcomes.len())
}

#[test]
fn issue15_rolling_restart_under_load_fails_nothing() {
    let cfg = config("2s", "\n[[models.phi3.instances]]\nport = 11404\n");
    let st = boot_and_start("e2e-rolling", &cfg, &[FIRST, SECOND]);
    let before = [st.show(FIRST, "MainPID"), st.show(SECOND, "MainPID")];

    let (out, failed, n) = under_load(&st, 40, 25, &["restart", "--rolling", MODEL]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    for name in ["phi3:", "phi3:2:"] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(name)
                && l.contains("drained in")
                && l.contains("restarted in")
                && l.contains("ready at the gateway in")),
            "no step line for {name}:\n{stdout}"
        );
    }
    let after = [st.show(FIRST, "MainPID"), st.show(SECOND, "MainPID")];
    for (i, u) in [FIRST, SECOND].iter().enumerate() {
        assert_eq!(st.show(u, "ActiveState"), "active", "{u}");
        assert_ne!(after[i], before[i], "{u} was not restarted");
    }
    assert_eq!(ready_count(&st), 2, "{:?}", backends(&st));
    assert!(
        failed.is_empty(),
        "{} of {n} requests failed during the rolling restart: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    st.sb.shutdown().expect("clean teardown");
}

#[test]
fn issue15_surge_restart_of_one_instance_fails_nothing() {
    let st = boot_and_start("e2e-surge", &config("4s", ""), &[FIRST]);
    let before = st.show(FIRST, "MainPID");

    let (out, failed, n) = under_load(&st, 40, 35, &["restart", "--surge", MODEL]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout.contains("phi3:surge: started in") && stdout.contains("phi3: drained in"),
        "{stdout}"
    );
    assert_eq!(st.show(FIRST, "ActiveState"), "active");
    assert_ne!(st.show(FIRST, "MainPID"), before, "phi3 was not restarted");
    // The temporary instance is gone: unit, runtime drop-in and backend.
    assert_eq!(st.show(SURGE, "ActiveState"), "inactive");
    let gone = st.sb.exec(&["test", "-e", SURGE_DROPIN]).unwrap();
    assert!(!gone.status.success(), "{SURGE_DROPIN} is left behind");
    let bs = backends(&st);
    assert_eq!(bs.len(), 1, "{bs:?}");
    assert_eq!(bs[0]["temporary"], false, "{bs:?}");
    assert_eq!(ready_count(&st), 1, "{bs:?}");
    assert!(
        failed.is_empty(),
        "{} of {n} requests failed during the surge restart: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    st.sb.shutdown().expect("clean teardown");
}

#[test]
fn issue15_rolling_refuses_a_single_instance() {
    let st = boot_and_start("e2e-rolling-one", &config("0s", ""), &[FIRST]);
    let before = st.show(FIRST, "MainPID");
    let out = st.cli(&["restart", "--rolling", MODEL]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    for says in [
        "cannot roll",
        "unavailable while it loads",
        "its last start took",
        "[[models.phi3.instances]]",
        "restart --surge phi3",
        "nothing was changed",
    ] {
        assert!(stderr.contains(says), "no {says:?} in:\n{stderr}");
    }
    assert_eq!(st.show(FIRST, "MainPID"), before, "phi3 was restarted");
    assert_eq!(st.show(FIRST, "NRestarts"), "0");
    st.sb.shutdown().expect("clean teardown");
}

#[test]
fn issue15_surge_refuses_without_memory_for_one_more_instance() {
    // A memory_max no sandbox has available (MemoryMax= is a limit, not a reservation).
    let st = boot_and_start(
        "e2e-surge-mem",
        &config("0s", "memory_max = \"900T\"\n"),
        &[FIRST],
    );
    let before = st.show(FIRST, "MainPID");
    let out = st.cli(&["restart", "--surge", MODEL]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    for says in [
        "not enough memory",
        "900T",
        "MemAvailable",
        "nothing was changed",
    ] {
        assert!(stderr.contains(says), "no {says:?} in:\n{stderr}");
    }
    assert_eq!(st.show(FIRST, "MainPID"), before, "phi3 was restarted");
    assert_eq!(st.show(SURGE, "ActiveState"), "inactive");
    let gone = st.sb.exec(&["test", "-e", SURGE_DROPIN]).unwrap();
    assert!(!gone.status.success(), "{SURGE_DROPIN} was written");
    assert_eq!(backends(&st).len(), 1);
    st.sb.shutdown().expect("clean teardown");
}

/// A step that fails stops the roll: the instance that did not start stays
/// drained (never admitted while not ready), the rest serve, exit 1 with each
/// instance's state. After the fix, a plain restart of the instance and a
/// second roll (which takes the drained instance first) bring it back.
#[test]
fn issue15_rolling_stops_at_an_instance_that_does_not_start() {
    let cfg = config("0s", "\n[[models.phi3.instances]]\nport = 11404\n");
    let st = boot_and_start("e2e-rolling-fail", &cfg, &[FIRST, SECOND]);
    let break_in = "/etc/systemd/system/citadel-model@phi3:2.service.d/99-break.conf";
    st.write(break_in, "[Service]\nExecStartPre=/bin/false\n");
    st.sb
        .exec_ok(&["systemctl", "daemon-reload"])
        .expect("daemon-reload");
    let first = st.show(FIRST, "MainPID");

    let out = st.cli(&["restart", "--rolling", MODEL]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    for says in ["STOPPED", "phi3:2 did not start again", "state now:"] {
        assert!(stderr.contains(says), "no {says:?} in:\n{stderr}");
    }
    assert_ne!(st.show(FIRST, "MainPID"), first, "phi3 rolled first");
    let bs = backends(&st);
    let second = bs
        .iter()
        .find(|b| b["url"] == "http://127.0.0.1:11404")
        .expect("phi3:2 at the gateway");
    assert_eq!(second["drained"], true, "{bs:?}");
    assert_eq!(ready_count(&st), 1, "phi3 serves: {bs:?}");
    assert_eq!(st.chat(MODEL).0, 200);

    // The documented way back.
    st.sb.exec_ok(&["rm", break_in]).expect("remove the break");
    st.sb
        .exec_ok(&["systemctl", "daemon-reload"])
        .expect("daemon-reload");
    st.cli_ok(&["restart", "phi3:2"]);
    let again = st.cli_ok(&["restart", "--rolling", MODEL]);
    assert!(
        again.contains("one at a time (phi3:2, phi3)"),
        "the drained instance goes first:\n{again}"
    );
    assert_eq!(ready_count(&st), 2, "{:?}", backends(&st));
    st.sb.shutdown().expect("clean teardown");
}
