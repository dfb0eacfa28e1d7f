//! SIGTERM and kept-alive client connections (issue 11: 2 of 2,400 requests
//! failed across a gateway restart under ~300 requests/s from curl on
//! kept-alive connections).
//!
//! Before, SIGTERM shut every connection down at once: one idle at that
//! instant was closed while its client was sending the next request on it
//! (empty reply, reset), and a request read meanwhile got 503
//! `shutting_down`. Now the listener closes first, every answer carries
//! `Connection: close` for a short closing phase, and only then are the
//! connections left idle closed.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Clients sending back to back, each on its own kept-alive connection.
const CLIENTS: usize = 8;

#[derive(Default, Debug)]
struct Stats {
    /// Full 200 answers.
    answered: u32,
    /// Answers that said `Connection: close`.
    closes: u32,
    /// Connections opened.
    connections: u32,
    /// A new connection refused, or broken before its first answer (the
    /// listener is closed; under systemd it would wait in the socket's
    /// backlog for the next process).
    new_connection_failed: u32,
    /// A request on a connection that had already answered, failing in any
    /// way (reset, empty reply, an error status): must never happen.
    failures: Vec<String>,
}

/// Sends chat completions back to back on kept-alive connections, a new
/// connection whenever the gateway answered `Connection: close`, until a
/// new connection is refused (or `deadline`).
async fn client_loop(addr: SocketAddr, total: Arc<AtomicU32>, deadline: Instant) -> Stats {
    let body = Bytes::from(chat("alpha"));
    let mut st = Stats::default();
    'conns: while Instant::now() < deadline {
        let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
            st.new_connection_failed += 1;
            break;
        };
        let _ = stream.set_nodelay(true);
        st.connections += 1;
        let Ok((mut tx, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
        else {
            st.new_connection_failed += 1;
            continue;
        };
        let conn = tokio::spawn(conn);
        let mut on_this = 0u32;
        loop {
            let fail = |st: &mut Stats, on_this: u32, what: String| {
                if on_this == 0 {
                    st.new_connection_failed += 1;
                } else {
                    st.failures.push(format!(
                        "request {} on a kept-alive connection: {what}",
                        on_this + 1
                    ));
                }
            };
            if let Err(e) = tx.ready().await {
                fail(
                    &mut st,
                    on_this,
                    format!("connection closed between requests: {e}"),
                );
                break;
            }
            let req = http::Request::post("/v1/chat/completions")
                .header(http::header::HOST, addr.to_string())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()))
                .unwrap();
            let resp = match tx.send_request(req).await {
                Ok(r) => r,
                Err(e) => {
                    fail(&mut st, on_this, format!("{e:?}"));
                    break;
                }
            };
            let status = resp.status();
            let close = resp
                .headers()
                .get(http::header::CONNECTION)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            let text = match resp.into_body().collect().await {
                Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                Err(e) => {
                    fail(&mut st, on_this, format!("body cut: {e:?}"));
                    break;
                }
            };
            if status != 200 {
                fail(&mut st, on_this, format!("status {status}: {text}"));
                break;
            }
            on_this += 1;
            st.answered += 1;
            total.fetch_add(1, Relaxed);
            if close {
                st.closes += 1;
                drop(tx);
                let _ = conn.await;
                continue 'conns;
            }
        }
        drop(tx);
        let _ = conn.await;
    }
    st
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue11_sigterm_closes_keep_alive_connections_without_a_race() {
    let a = sim("alpha").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("citadel.toml");
    std::fs::write(
        &cfg,
        config_text(
            &[m("alpha", a.addr.port())],
            "auth = false\ndrain_timeout = \"10s\"",
        ),
    )
    .unwrap();
    let mut p = spawn_gateway(&cfg, &[]);
    let c = client();
    wait_model_state(&c, p.addr, "alpha", "ready").await;

    let total = Arc::new(AtomicU32::new(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(client_loop(p.addr, total.clone(), deadline)))
        .collect();
    // Every client is sending back to back.
    wait_until(Duration::from_secs(20), "load running", || {
        let total = total.clone();
        async move { total.load(Relaxed) >= 50 * CLIENTS as u32 }
    })
    .await;
    let before = total.load(Relaxed);
    let signalled = Instant::now();
    signal(&p, "-TERM");
    let mut all = Vec::new();
    for c in clients {
        all.push(c.await.expect("client task"));
    }
    let st = wait_exit(&mut p, Duration::from_secs(20));
    println!(
        "PERF issue11 SIGTERM under back-to-back load: {before} answered before it, {} in all; \
         exit {:.2} s after it",
        total.load(Relaxed),
        signalled.elapsed().as_secs_f64()
    );
    for (i, s) in all.iter().enumerate() {
        println!(
            "  client {i}: {} answered on {} connections, {} `Connection: close`, {} new connections refused/reset, {} failed",
            s.answered,
            s.connections,
            s.closes,
            s.new_connection_failed,
            s.failures.len()
        );
    }
    let failures: Vec<&String> = all.iter().flat_map(|s| &s.failures).collect();
    assert!(
        failures.is_empty(),
        "{} requests on existing connections failed across SIGTERM: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        all.iter().all(|s| s.new_connection_failed > 0),
        "every client ends with a refused new connection (the listener is closed)"
    );
    assert!(
        all.iter().map(|s| s.closes).sum::<u32>() >= 1,
        "answers during the closing phase say `Connection: close`"
    );
    assert!(st.success(), "{st:?}");
}
