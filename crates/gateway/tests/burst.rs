//! Issue 11, item 3: bursts and memory. The real binary, binding its own
//! socket (not socket-activated): a burst of 1,000 connections at once finds
//! room in the listen queue (before: tokio's backlog of 128 and 683 listen
//! overflows, each a one-second client retry), and the idle upstream pool is
//! bounded so that memory returns near idle after the burst.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECTIONS: usize = 1000;

/// `TcpExt: ListenOverflows` of this network namespace (`nstat`'s source).
fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let i = names
            .split_whitespace()
            .position(|n| n == "ListenOverflows")?;
        return values.split_whitespace().nth(i)?.parse().ok();
    }
    None
}

/// The process's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// One connection, opened at the same moment as all the others: how long the
/// connect took and whether a chat completion on it was answered 200.
async fn one(addr: SocketAddr, start: std::sync::Arc<tokio::sync::Barrier>) -> (Duration, bool) {
    start.wait().await;
    let t = Instant::now();
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (t.elapsed(), false);
    };
    let connected = t.elapsed();
    let body = chat("alpha");
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return (connected, false);
    }
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    (
        connected,
        matches!(read, Ok(Ok(_))) && out.starts_with(b"HTTP/1.1 200"),
    )
}

async fn burst(addr: SocketAddr) -> (Duration, usize) {
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(CONNECTIONS));
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| tokio::spawn(one(addr, start.clone())))
        .collect();
    let mut slowest = Duration::ZERO;
    let mut ok = 0;
    for t in tasks {
        let (connect, answered) = t.await.unwrap();
        slowest = slowest.max(connect);
        ok += usize::from(answered);
    }
    (slowest, ok)
}

fn config(dir: &std::path::Path, sim: SocketAddr) -> std::path::PathBuf {
    let cfg = dir.join("citadel.toml");
    std::fs::write(&cfg, config_text(&[m("alpha", sim.port())], "auth = false")).unwrap();
    cfg
}

/// 1,000 connections at once: every one is accepted without a SYN being
/// dropped (a dropped SYN costs the client a one-second retransmission, so
/// the slowest connect stays under a second) and every request is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue11_burst_of_1000_connections_overflows_no_listen_queue() {
    let sim = sim("alpha").await;
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_gateway(&config(dir.path(), sim.addr), &[]);
    let c = client();
    wait_model_state(&c, gw.addr, "alpha", "ready").await;
    let before = listen_overflows();
    let t = Instant::now();
    let (slowest, ok) = burst(gw.addr).await;
    let after = listen_overflows();
    let overflows = after.zip(before).map(|(a, b)| a - b);
    println!(
        "PERF issue11 burst: {CONNECTIONS} connections at once in {:?}: {ok} answered 200, slowest connect {slowest:?}, listen overflows (this network namespace, all sockets) {overflows:?}",
        t.elapsed()
    );
    assert_eq!(ok, CONNECTIONS, "requests of the burst went unanswered");
    assert!(
        slowest < Duration::from_secs(1),
        "a connect took {slowest:?}: a SYN was dropped (listen queue overflow)"
    );
}

/// Memory after a burst: RSS at idle, right after 1,000 connections, 20 s
/// later (the idle upstream connections, `POOL_IDLE_TIMEOUT` = 15 s, have
/// timed out) and 60 s later (issue 11's goal: within 15 MiB of idle).
/// Prints only (memory amounts depend on the allocator and the host); takes
/// ~65 s, so it runs on
/// request: `cargo test -p citadel-gateway --test burst -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement (~65 s): run with --ignored --nocapture"]
async fn issue11_rss_after_a_burst() {
    const GOAL_KIB: u64 = 15 * 1024;
    let sim = sim("alpha").await;
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_gateway(&config(dir.path(), sim.addr), &[]);
    let pid = gw.child.id();
    let c = client();
    wait_model_state(&c, gw.addr, "alpha", "ready").await;
    let idle = rss_kib(pid);
    let (_, ok) = burst(gw.addr).await;
    let done = Instant::now();
    let conns = sim.stats().connections_accepted;
    let loaded = rss_kib(pid);
    let mut after = Vec::new();
    for secs in [20, 60] {
        tokio::time::sleep_until((done + Duration::from_secs(secs)).into()).await;
        after.push((secs, rss_kib(pid)));
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let later: Vec<String> = after
        .iter()
        .map(|(s, kib)| format!("{s} s later {:.1} MiB", mib(*kib)))
        .collect();
    let last = after.last().map_or(loaded, |a| a.1);
    println!(
        "PERF issue11 gateway RSS: idle {:.1} MiB, after {CONNECTIONS} connections ({ok} answered, {conns} upstream connections opened) {:.1} MiB, {}; goal (60 s later within 15 MiB of idle): {}",
        mib(idle),
        mib(loaded),
        later.join(", "),
        if last <= idle + GOAL_KIB { "met" } else { "not met" },
    );
    assert_eq!(ok, CONNECTIONS);
    assert!(last <= loaded + 1024, "memory still grows after the burst");
}
