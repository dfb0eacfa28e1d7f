//! Process tests: the real `citadel-model` binary supervising the real
//! simulator (or a `command` engine), observed through a real NOTIFY_SOCKET.

mod common;

use std::time::{Duration, Instant};

use common::{group_exists, group_members, http, rss_kib, Msg, Opts, Supervisor};
use nix::sys::signal::Signal;

const SEC: Duration = Duration::from_secs(1);

fn is_ready(m: &Msg) -> bool {
    m.has("READY=1")
}

fn is_ping(m: &Msg) -> bool {
    m.has("WATCHDOG=1")
}

/// The whole happy path with the simulator: loading notifications, READY=1
/// only once servable (and within one probe interval), watchdog cadence,
/// RSS, STOPPING=1 and a clean stop of the engine's group.
#[test]
fn sim_lifecycle_notify_sequence() {
    let mut sv = Supervisor::start(Opts {
        // Default probe_interval (1 s); a load time off the probe grid, so
        // the engine becomes servable between two probes.
        model: r#"engine = "sim"
binary = "{sim}"
args = ["--load-time", "2300ms"]
start_timeout = "30s"
stop_timeout = "5s""#,
        watchdog_usec: Some(400_000),
        extra_args: &[
            "--extend-interval",
            "500ms",
            "--extend-by",
            "3s",
            "--status-interval",
            "300ms",
        ],
    });

    // Find out ourselves when the engine becomes servable (poll every 5 ms).
    let deadline = Instant::now() + 15 * SEC;
    let servable_at = loop {
        if http(sv.port, "GET", "/health", "") == Some(200) {
            break Instant::now();
        }
        assert!(Instant::now() < deadline, "simulator never became healthy");
        std::thread::sleep(Duration::from_millis(5));
    };
    let (ready_idx, ready) = sv
        .wait_msg(10 * SEC, is_ready)
        .expect("READY=1 within 10 s of the engine being healthy");
    let latency = ready.at.saturating_duration_since(servable_at);
    println!(
        "readiness latency: READY=1 {} ms after the engine became servable (probe interval 1 s); {} ms after spawn",
        latency.as_millis(),
        ready.at.duration_since(sv.spawned).as_millis()
    );
    // Not before the engine could serve (our own poll may see it up to ~5 ms late).
    assert!(
        ready.at + Duration::from_millis(30) >= servable_at,
        "READY=1 sent {:?} before the engine was servable",
        servable_at - ready.at
    );
    assert!(
        latency <= SEC + Duration::from_millis(400),
        "readiness noticed {latency:?} after the engine became servable (> one probe interval)"
    );
    assert!(
        ready
            .value("STATUS")
            .is_some_and(|s| s.starts_with("serving")),
        "READY=1 comes with STATUS=serving: {:?}",
        ready.text
    );

    let msgs = sv.messages();
    let loading = &msgs[..ready_idx];
    assert!(
        msgs[0].starts("STATUS=loading m: 0 s") && msgs[0].starts("EXTEND_TIMEOUT_USEC="),
        "first message announces loading and extends the start timeout: {:?}",
        msgs[0].text
    );
    let extends: Vec<u64> = loading
        .iter()
        .filter_map(|m| m.value("EXTEND_TIMEOUT_USEC")?.parse().ok())
        .collect();
    assert!(
        extends.len() >= 3,
        "EXTEND_TIMEOUT_USEC re-sent while loading (every 500 ms for >= 2 s): {extends:?}"
    );
    assert!(
        extends.iter().all(|&u| u == 3_000_000),
        "each extension is --extend-by (the 30 s cap is far): {extends:?}"
    );
    assert!(
        loading
            .iter()
            .filter(|m| m.starts("STATUS=loading m: "))
            .count()
            >= 4,
        "progress STATUS while loading"
    );
    assert!(
        loading.iter().filter(|m| is_ping(m)).count() >= 3,
        "WATCHDOG=1 while the engine loads"
    );
    assert!(
        !msgs[ready_idx + 1..]
            .iter()
            .any(|m| m.starts("EXTEND_TIMEOUT_USEC")),
        "no EXTEND_TIMEOUT_USEC after READY=1"
    );

    // Watchdog cadence after READY: WATCHDOG_USEC/2 = 200 ms.
    let mut from = ready_idx + 1;
    let mut pings = vec![ready.at];
    while pings.len() < 8 {
        let (i, m) = sv
            .wait_msg_from(from, SEC, is_ping)
            .expect("WATCHDOG=1 keeps coming while healthy");
        pings.push(m.at);
        from = i + 1;
    }
    let gaps: Vec<u128> = pings
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    println!("watchdog ping gaps (ms, WATCHDOG_USEC=400ms): {gaps:?}");
    assert!(
        gaps.iter().skip(1).all(|&g| g < 400),
        "pings every WATCHDOG_USEC/2 (200 ms), never a gap of WATCHDOG_USEC: {gaps:?}"
    );

    let rss = rss_kib(sv.pid());
    println!("citadel-model RSS while serving: {rss} KiB");
    assert!(rss <= 10 * 1024, "supervisor RSS {rss} KiB > 10 MiB");

    let engine = sv.engine_pid().expect("engine is the supervisor's child");
    let stop_at = Instant::now();
    sv.signal(Signal::SIGTERM);
    sv.wait_msg(2 * SEC, |m| m.has("STOPPING=1"))
        .expect("STOPPING=1 on SIGTERM");
    let status = sv.wait_exit(6 * SEC).expect("exits within stop_timeout");
    println!("stop took {} ms", stop_at.elapsed().as_millis());
    assert_eq!(status.code(), Some(0), "clean stop exits 0");
    assert!(
        !group_exists(engine),
        "engine process group gone after stop"
    );
}

/// A hung engine (accepts connections, never answers): pings stop, so systemd
/// would restart the unit; after recovery they resume; a failing /health too.
#[test]
fn hung_engine_stops_watchdog_pings() {
    let mut sv = Supervisor::start(Opts {
        model: r#"engine = "sim"
binary = "{sim}"
probe_interval = "100ms"
stop_timeout = "5s""#,
        watchdog_usec: Some(1_000_000),
        extra_args: &[],
    });
    let (ready_idx, _) = sv.wait_msg(10 * SEC, is_ready).expect("READY=1");
    let (i, _) = sv
        .wait_msg_from(ready_idx + 1, 2 * SEC, is_ping)
        .expect("pinging while healthy");

    for (fault, undo) in [
        (r#"{"hang":true}"#, r#"{"hang":false}"#),
        (r#"{"health_fails":true}"#, r#"{"health_fails":false}"#),
    ] {
        let from = sv.messages().len().max(i + 1);
        let fault_at = Instant::now();
        assert_eq!(sv.http("POST", "/sim/fault", fault), Some(200));
        // Await a silence of 2 x WATCHDOG_USEC: systemd would have fired.
        let deadline = fault_at + 8 * SEC;
        let last_ping = loop {
            let last = sv.messages()[from..]
                .iter()
                .filter(|m| is_ping(m))
                .map(|m| m.at)
                .next_back()
                .unwrap_or(fault_at);
            if last.elapsed() >= 2 * SEC {
                break last;
            }
            assert!(
                Instant::now() < deadline,
                "{fault}: watchdog pings never stopped"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let after = last_ping.saturating_duration_since(fault_at);
        println!(
            "{fault}: last WATCHDOG=1 {} ms after the fault",
            after.as_millis()
        );
        // Probe period 100 ms + probe timeout (500 ms) + threshold (500 ms) + ping period (500 ms).
        assert!(after <= 2 * SEC, "{fault}: pings went on for {after:?}");
        assert!(
            sv.messages()[from..]
                .iter()
                .any(|m| m.starts("STATUS=unhealthy")),
            "{fault}: STATUS says unhealthy"
        );
        assert!(
            sv.child.try_wait().unwrap().is_none(),
            "supervisor keeps running (systemd acts)"
        );

        let undo_at = sv.messages().len();
        assert_eq!(sv.http("POST", "/sim/fault", undo), Some(200));
        sv.wait_msg_from(undo_at, 3 * SEC, is_ping)
            .unwrap_or_else(|| panic!("{fault}: pings resume once health passes again"));
    }

    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(6 * SEC).and_then(|s| s.code()), Some(0));
}

#[test]
fn engine_crash_on_start_exits_69() {
    let mut sv = Supervisor::start(Opts {
        model: r#"engine = "sim"
binary = "{sim}"
args = ["--crash-on-start"]"#,
        watchdog_usec: None,
        extra_args: &[],
    });
    let status = sv
        .wait_exit(5 * SEC)
        .expect("supervisor exits when the engine dies");
    assert_eq!(status.code(), Some(69));
    // The last datagram may still be on its way to the reader thread: wait for it.
    let found = sv.wait_msg(5 * SEC, |m| m.starts("STATUS=failed: engine of m exited"));
    let msgs = sv.messages();
    assert!(found.is_some(), "STATUS explains the failure: {msgs:?}");
    assert!(!msgs.iter().any(is_ready), "never READY=1: {msgs:?}");
}

#[test]
fn engine_crash_while_serving_exits_69() {
    let mut sv = Supervisor::start(Opts {
        model: r#"engine = "sim"
binary = "{sim}"
probe_interval = "200ms""#,
        watchdog_usec: None,
        extra_args: &[],
    });
    sv.wait_msg(10 * SEC, is_ready).expect("READY=1");
    let engine = sv.engine_pid().expect("engine pid");
    assert_eq!(
        sv.http("POST", "/sim/fault", r#"{"crash":true}"#),
        Some(200)
    );
    let status = sv
        .wait_exit(5 * SEC)
        .expect("supervisor exits when the engine crashes");
    assert_eq!(
        status.code(),
        Some(69),
        "non-zero so Restart=on-failure applies"
    );
    assert!(!group_exists(engine), "nothing of the engine is left");
}

/// `/health` says 200 but completions fail: with ready_check = "completion"
/// the model is never reported ready; the start_timeout cap ends it (exit 69),
/// and no EXTEND_TIMEOUT_USEC reaches beyond the cap.
#[test]
fn lying_health_is_not_ready() {
    let mut sv = Supervisor::start(Opts {
        model: r#"engine = "sim"
binary = "{sim}"
args = ["--health-lies"]
ready_check = "completion"
probe_interval = "200ms"
start_timeout = "3s""#,
        watchdog_usec: Some(1_000_000),
        extra_args: &["--extend-interval", "500ms", "--extend-by", "2s"],
    });
    // The engine does answer /health with 200 (it lies).
    let deadline = Instant::now() + 5 * SEC;
    while http(sv.port, "GET", "/health", "") != Some(200) {
        assert!(
            Instant::now() < deadline,
            "simulator never answered /health"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = sv
        .wait_exit(8 * SEC)
        .expect("supervisor gives up at start_timeout");
    let took = sv.spawned.elapsed();
    assert_eq!(status.code(), Some(69));
    assert!(
        took >= 3 * SEC,
        "gave up only at start_timeout, after {took:?}"
    );
    sv.wait_msg(5 * SEC, |m| {
        m.value("STATUS")
            .is_some_and(|s| s.starts_with("failed: m did not become ready"))
    });
    let msgs = sv.messages();
    assert!(
        !msgs.iter().any(is_ready),
        "never READY=1 while completions fail"
    );
    assert!(
        msgs.iter().any(|m| m.value("STATUS").is_some_and(|s| s
            .starts_with("failed: m did not become ready within start_timeout 3s")
            && s.contains("500"))),
        "STATUS names the cap and the failing probe: {msgs:?}"
    );
    // Every extension ends at or before spawn + start_timeout (+ scheduling slack).
    for m in &msgs {
        if let Some(u) = m.value("EXTEND_TIMEOUT_USEC") {
            let until = m.at + Duration::from_micros(u.parse().unwrap());
            assert!(
                until <= sv.spawned + 3 * SEC + Duration::from_millis(300),
                "EXTEND_TIMEOUT_USEC={u} reaches beyond start_timeout"
            );
        }
    }
    let extends = msgs
        .iter()
        .filter(|m| m.starts("EXTEND_TIMEOUT_USEC"))
        .count();
    assert!(extends >= 4, "extensions re-sent every 500 ms: {extends}");
}

/// A `command` engine that forks a helper: READY=1 needs a real completion,
/// and SIGTERM takes down the whole process group within the grace period.
#[test]
fn command_engine_group_is_stopped() {
    let mut sv = Supervisor::start(Opts {
        model: r#"engine = "command"
command = ["/bin/sh", "-c", "/bin/sleep 600 & exec {sim} --host {host} --port {port} --model {name} --load-time 500ms"]
ready_check = "completion"
probe_interval = "200ms"
stop_timeout = "3s""#,
        watchdog_usec: None,
        extra_args: &[],
    });
    sv.wait_msg(10 * SEC, is_ready).expect("READY=1");
    let engine = sv.engine_pid().expect("engine pid");
    let members = group_members(engine);
    assert!(
        members.len() >= 2,
        "engine and its helper share a group: {members:?}"
    );
    let t = Instant::now();
    sv.signal(Signal::SIGTERM);
    let status = sv
        .wait_exit(3 * SEC + 2 * SEC)
        .expect("exits within the grace period");
    println!("command engine stop: {} ms", t.elapsed().as_millis());
    assert_eq!(status.code(), Some(0));
    assert!(
        t.elapsed() < 3 * SEC,
        "SIGTERM sufficed, no need for the grace period"
    );
    assert!(
        !group_exists(engine),
        "the whole group is gone: {:?}",
        group_members(engine)
    );
}

/// Regression (found by the e2e stop test): under KillMode=control-group systemd
/// signals the engine and the supervisor at once. Even when the engine's exit is
/// seen first, that is a clean stop (exit 0), not a crash (69 would leave the
/// unit `failed` after every `stop`).
#[test]
fn stop_signalled_to_the_whole_cgroup_is_a_clean_stop() {
    for _ in 0..3 {
        let mut sv = Supervisor::start(Opts {
            model: r#"engine = "sim"
binary = "{sim}"
probe_interval = "200ms""#,
            watchdog_usec: None,
            extra_args: &[],
        });
        sv.wait_msg(10 * SEC, is_ready).expect("READY=1");
        let engine = sv.engine_pid().expect("engine pid");
        // The engine first, and the supervisor's own SIGTERM only once the engine is
        // reaped: the order in which the two can be seen under systemd's cgroup kill.
        nix::sys::signal::killpg(engine, Signal::SIGTERM).unwrap();
        let t = Instant::now();
        while group_exists(engine) && t.elapsed() < 5 * SEC {
            std::thread::yield_now();
        }
        sv.signal(Signal::SIGTERM);
        let status = sv.wait_exit(5 * SEC).expect("supervisor exits");
        assert_eq!(status.code(), Some(0), "a stop, not a crash");
        assert!(!group_exists(engine));
    }
}

/// A helper that ignores SIGTERM is SIGKILLed once the grace period passes.
#[test]
fn sigterm_ignoring_engine_is_killed_after_grace() {
    let mut sv = Supervisor::start(Opts {
        model: r#"engine = "command"
command = ["/bin/sh", "-c", "trap '' TERM; /bin/sleep 600 & exec {sim} --port {port} --model {name}"]
probe_interval = "200ms"
stop_timeout = "1s""#,
        watchdog_usec: None,
        extra_args: &[],
    });
    sv.wait_msg(10 * SEC, is_ready).expect("READY=1");
    let engine = sv.engine_pid().expect("engine pid");
    let t = Instant::now();
    sv.signal(Signal::SIGTERM);
    let status = sv.wait_exit(5 * SEC).expect("exits after grace + SIGKILL");
    let took = t.elapsed();
    println!(
        "stop with a SIGTERM-ignoring helper: {} ms",
        took.as_millis()
    );
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= SEC,
        "waited the grace period before SIGKILL: {took:?}"
    );
    assert!(!group_exists(engine), "SIGKILL took the group down");
}

#[test]
fn unknown_model_and_bad_config_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[models.a]\nport = 12000\nengine = \"sim\"\n").unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[models.a]\nport = 0\nengine = \"warp\"\n").unwrap();
    let run = |config: &std::path::Path, name: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_citadel-model"))
            .arg("--config")
            .arg(config)
            .args(["run", name])
            .env_remove("NOTIFY_SOCKET")
            .output()
            .unwrap()
    };
    let out = run(&good, "nope");
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("model `nope` is not in"));
    assert_eq!(run(&bad, "a").status.code(), Some(78));
    assert_eq!(
        run(&dir.path().join("missing.toml"), "a").status.code(),
        Some(78)
    );
}

/// Another process on the model's port would answer the probes in the
/// engine's place: the supervisor refuses to start (exit 69, never READY=1).
#[test]
fn port_in_use_is_refused() {
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    let mut sv = Supervisor::start_on(
        port,
        Opts {
            model: r#"engine = "sim"
binary = "{sim}""#,
            watchdog_usec: None,
            extra_args: &[],
        },
    );
    let status = sv.wait_exit(5 * SEC).expect("exits at once");
    assert_eq!(status.code(), Some(69));
    // The datagram may still be on its way to the test's reader thread: wait for it.
    let expected = format!("STATUS=failed: port {port} on 127.0.0.1 is not available");
    let found = sv.wait_msg(5 * SEC, |m| m.starts(&expected));
    assert!(found.is_some(), "{:?}", sv.messages());
    assert!(!sv.messages().iter().any(is_ready));
    drop(squatter);
}

#[test]
fn command_subcommand_prints_env_and_argv() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("citadel.toml");
    std::fs::write(
        &config,
        "[models.phi3]\nport = 11403\nengine = \"sim\"\nbinary = \"/opt/x/sim\"\ngpus = [1]\nargs = [\"--load-time\", \"1s\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_citadel-model"))
        .args(["command", "phi3"])
        .env("CITADEL_CONFIG", &config)
        .env("CACHE_DIRECTORY", "/var/cache/citadel/phi3")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        // No CUDA_VISIBLE_DEVICES: the unit's Environment= is its one source (issue 10, item 5).
        "/opt/x/sim --host 127.0.0.1 --port 11403 --model phi3 --load-time 1s\n"
    );
}
