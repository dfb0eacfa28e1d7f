//! Issue 12, item 1: the gateway takes its listening socket from systemd
//! (`citadel-gateway.socket`, made by PID 1 in the host's network namespace
//! while the gateway runs in Citadel's private one). Tested with systemd's own
//! `systemd-socket-activate`, which listens, waits for the first connection
//! and then starts the gateway with the socket as fd 3 (LISTEN_FDS=1,
//! LISTEN_PID): that first connection waits in the backlog and is served.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const ACTIVATE: &str = "/usr/bin/systemd-socket-activate";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Connects to 127.0.0.1:port, retrying while nothing listens yet (the
/// activator has not bound the socket), until `deadline`.
fn connect(port: u16, deadline: Instant) -> TcpStream {
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::yield_now(),
            Err(e) => panic!("nothing listens on 127.0.0.1:{port}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue12_gateway_serves_on_the_socket_systemd_passes() {
    assert!(
        std::path::Path::new(ACTIVATE).exists(),
        "{ACTIVATE} is missing: install systemd (Debian: `apt-get install systemd`)"
    );
    let a = sim("alpha").await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("citadel.toml");
    // The configured address is the socket's: a gateway that binds it itself
    // (what it did before) fails with "address in use".
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nlisten = \"127.0.0.1\"\nport = {port}\nauth = false\nprobe_interval = \"100ms\"\n\
             [models.alpha]\nport = {}\nengine = \"sim\"\n",
            a.addr.port()
        ),
    )
    .unwrap();
    let mut child = Command::new(ACTIVATE)
        .arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .arg(BIN)
        .arg("--config")
        .arg(&cfg)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn systemd-socket-activate");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[activate] {line}");
            let _ = tx.send(line);
        }
    });

    // The first connection starts the gateway and is served by it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = connect(port, deadline);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    let mut logs = Vec::new();
    let listening = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            panic!("no `listening on` line:\n{}", logs.join("\n"));
        };
        if line.contains("listening on ") {
            break line;
        }
        logs.push(line);
    };
    assert!(
        listening.contains(&format!(
            "listening on 127.0.0.1:{port} (socket from systemd)"
        )),
        "{listening}"
    );

    // The same socket keeps serving: the model is routed through it.
    let c = client();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_model_state(&c, addr, "alpha", "ready").await;
    assert_eq!(post_chat(&c, addr, "alpha").await.status, 200);
    let _ = child.kill();
    let _ = child.wait();
}

/// More than one socket is a unit mistake, refused as a config error (78).
#[test]
fn issue12_gateway_refuses_two_sockets_from_systemd() {
    let (p1, p2) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("citadel.toml");
    std::fs::write(
        &cfg,
        "[gateway]\nauth = false\n[models.alpha]\nport = 40001\nengine = \"sim\"\n",
    )
    .unwrap();
    let child = Command::new(ACTIVATE)
        .args([
            "-l",
            &format!("127.0.0.1:{p1}"),
            "-l",
            &format!("127.0.0.1:{p2}"),
        ])
        .arg(BIN)
        .arg("--config")
        .arg(&cfg)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn systemd-socket-activate");
    let _first = connect(p1, Instant::now() + Duration::from_secs(20));
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("systemd passed 2 sockets"), "{err}");
}
