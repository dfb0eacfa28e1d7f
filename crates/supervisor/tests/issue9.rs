//! Regression tests for issue 9 (promises that hold under hostile input),
//! items 2, 3 and 7, against the real `citadel-model` binary: a real
//! NOTIFY_SOCKET, a real engine process and real HTTP from a hostile engine
//! stand-in (a TCP server in this test, listening on the model's port).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Msg, Opts, Supervisor};
use nix::sys::signal::Signal;

const SEC: Duration = Duration::from_secs(1);

/// A chunked answer whose chunk size overflows `usize + 2` (the finding).
const HUGE_CHUNK: &[u8] =
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc\r\n0\r\n\r\n";
const HEALTHY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

fn is_ping(m: &Msg) -> bool {
    m.has("WATCHDOG=1")
}

/// The engine stand-in: once the supervisor has spawned its (idle) engine
/// process, binds the model's port and answers every request with
/// [`HEALTHY`] until `hostile` is set, then with [`HUGE_CHUNK`].
fn serve_health(sv: &Supervisor, hostile: Arc<AtomicBool>) {
    // The first datagram is sent after the supervisor checked that the port is
    // free and spawned the engine; from then on the port is ours to take.
    sv.wait_msg(10 * SEC, |m| m.starts("STATUS=loading"))
        .expect("the supervisor spawned the engine");
    let listener = TcpListener::bind(("127.0.0.1", sv.port)).expect("bind the model's port");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(SEC));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let answer = if hostile.load(Ordering::SeqCst) {
                HUGE_CHUNK
            } else {
                HEALTHY
            };
            let _ = conn.write_all(answer);
        }
    });
}

const IDLE_ENGINE: &str = r#"engine = "command"
command = ["/bin/sleep", "600"]
ready_check = "health"
probe_interval = "100ms"
watchdog = "1s"
stop_timeout = "2s""#;

/// Issue 9, item 2: a malformed chunked `/health` answer (chunk size
/// `ffffffffffffffff`) panicked the prober task and `WATCHDOG=1` went on
/// forever. Now it is a failed probe: STATUS says unhealthy, pings stop (so
/// systemd restarts the unit), and they resume once health passes again.
#[test]
fn issue9_prober_panic_malformed_chunked_health_stops_watchdog() {
    let mut sv = Supervisor::start(Opts {
        model: IDLE_ENGINE,
        watchdog_usec: Some(1_000_000),
        extra_args: &[],
    });
    let hostile = Arc::new(AtomicBool::new(false));
    serve_health(&sv, hostile.clone());
    sv.wait_msg(10 * SEC, |m| m.has("READY=1"))
        .expect("READY=1 while /health answers 200");

    let from = sv.messages().len();
    let fault_at = Instant::now();
    hostile.store(true, Ordering::SeqCst);
    let unhealthy = sv
        .wait_msg_from(from, 3 * SEC, |m| m.starts("STATUS=unhealthy"))
        .map(|(_, m)| m.text);
    let unhealthy = unhealthy.unwrap_or_else(|| {
        panic!(
            "STATUS=unhealthy after the malformed answer: {:?}",
            &sv.messages()[from..]
        )
    });
    assert!(
        unhealthy.contains("/health") && unhealthy.contains("larger than"),
        "STATUS names the probe and why it failed: {unhealthy:?}"
    );
    // Probe period 100 ms + threshold (500 ms) + ping period (500 ms), with slack.
    let mut last_ping = None;
    let mut at = from;
    while let Some((i, m)) = sv.wait_msg_from(at, Duration::from_millis(2500), is_ping) {
        let after = m.at.saturating_duration_since(fault_at);
        assert!(
            after <= 2 * SEC,
            "WATCHDOG=1 still sent {after:?} after health broke: the prober is not probing"
        );
        last_ping = Some(after);
        at = i + 1;
    }
    println!("last WATCHDOG=1 {last_ping:?} after the malformed answer");
    assert!(
        sv.messages()[from..]
            .iter()
            .any(|m| m.starts("STATUS=unhealthy for")),
        "STATUS says pings are withheld"
    );
    assert!(
        sv.child.try_wait().unwrap().is_none(),
        "with a systemd watchdog the supervisor keeps running (systemd acts)"
    );

    let healed = sv.messages().len();
    hostile.store(false, Ordering::SeqCst);
    sv.wait_msg_from(healed, 3 * SEC, is_ping)
        .expect("pings resume once health passes again: the prober is alive");

    sv.signal(Signal::SIGTERM);
    assert_eq!(sv.wait_exit(5 * SEC).and_then(|s| s.code()), Some(0));
}

/// Issue 9, item 2, without a systemd watchdog: the malformed answer is an
/// unhealthy engine, which the supervisor stops after `model.watchdog` and
/// exits 69 (with the old code the dead prober left it "serving" forever).
#[test]
fn issue9_prober_panic_malformed_chunked_without_watchdog_exits_69() {
    let mut sv = Supervisor::start(Opts {
        model: IDLE_ENGINE,
        watchdog_usec: None,
        extra_args: &[],
    });
    let hostile = Arc::new(AtomicBool::new(false));
    serve_health(&sv, hostile.clone());
    sv.wait_msg(10 * SEC, |m| m.has("READY=1"))
        .expect("READY=1 while /health answers 200");
    let engine = sv.engine_pid().expect("engine pid");
    hostile.store(true, Ordering::SeqCst);
    let status = sv
        .wait_exit(6 * SEC)
        .expect("the supervisor gives up on an engine that stays unhealthy");
    assert_eq!(status.code(), Some(69));
    let failed = sv.wait_msg(3 * SEC, |m| {
        m.value("STATUS")
            .is_some_and(|s| s.starts_with("failed: m unhealthy for"))
    });
    assert!(failed.is_some(), "STATUS says why: {:?}", sv.messages());
    assert!(!common::group_exists(engine), "the engine was stopped");
}

fn config_file(dir: &tempfile::TempDir, body: &str) -> std::path::PathBuf {
    let path = dir.path().join("citadel.toml");
    std::fs::write(&path, body).unwrap();
    path
}

/// Issue 9, item 7: `citadel-model command NAME | true` panicked on the
/// broken pipe (exit 101). A closed stdout is a normal end: exit 0.
#[test]
fn issue9_broken_pipe_command_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        &dir,
        "[models.m]\nport = 12001\nengine = \"sim\"\nbinary = \"/opt/x/sim\"\n",
    );
    // A real pipe whose read end is closed before the binary writes a byte.
    let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
    drop(read_end);
    let out = Command::new(env!("CARGO_BIN_EXE_citadel-model"))
        .arg("--config")
        .arg(&config)
        .args(["command", "m"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .output()
        .expect("run citadel-model");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Any other write error is reported and exits 74 (EX_IOERR), not 101.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let out = Command::new(env!("CARGO_BIN_EXE_citadel-model"))
        .arg("--config")
        .arg(&config)
        .args(["command", "m"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(full))
        .output()
        .expect("run citadel-model");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{stderr}");
    assert!(stderr.contains("cannot write to stdout"), "{stderr}");
}

const OUT_OF_RANGE: &str =
    "[models.m]\nport = 12002\nengine = \"sim\"\nstop_timeout = \"99999999999999999999s\"\n";

fn run_config(config: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_citadel-model"))
        .arg("--config")
        .arg(config)
        .args(["run", "m"])
        .env_remove("NOTIFY_SOCKET")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .expect("run citadel-model")
}

/// Issue 9, item 3: a value the config cannot represent made `run` exit 101
/// (a panic), which `RestartPreventExitStatus=78` does not stop: a restart
/// loop. Every config failure exits 78, even a panic inside the loader.
#[test]
fn issue9_config_out_of_range_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_config(&config_file(&dir, OUT_OF_RANGE));
    assert_eq!(
        out.status.code(),
        Some(78),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 9, item 3: the out-of-range value is a diagnostic naming file:line.
#[test]
fn issue9_config_out_of_range_is_a_diagnostic_with_location() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_config(&config_file(&dir, OUT_OF_RANGE));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("citadel.toml:4:"),
        "names file:line: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "a diagnostic, not a panic: {stderr}"
    );
}
