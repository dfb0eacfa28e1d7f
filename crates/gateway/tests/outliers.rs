//! Issue 11, item 4: bad replicas. A model with two simulator replicas under
//! steady load while one of them answers 500 (its health check passing), hangs,
//! or is killed: failed requests, the requests the bad replica still received
//! and the recovery times are printed, and the failure counts asserted.
//!
//! Before: the 500-replica kept receiving a third of the traffic for as long as
//! the fault lasted (120 of 361 requests failed) and requests routed to a hung
//! replica waited up to 7.9 s.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use citadel_engine_sim::{FaultUpdate, SimConfig, SimHandle};
use common::*;
use http_body_util::{BodyExt, Full};

/// Failures in a row that eject a replica in these tests.
const FAILURES: u32 = 3;
/// Concurrent clients of the load.
const WORKERS: usize = 4;

const GATEWAY: &str = "auth = false\noutlier_failures = 3\noutlier_ejection = \"1s\"\nfirst_byte_timeout = \"1s\"\nrequest_timeout = \"30s\"";

/// One request's outcome: when it ended, its status (0: no answer), latency,
/// and when its response head arrived (its answer had begun).
#[derive(Debug, Clone, Copy)]
struct Sample {
    end: Instant,
    status: u16,
    latency: Duration,
    head: Option<Instant>,
}

/// A chat completion through the gateway; a stream counts as answered only
/// when it ends with `[DONE]`.
async fn one(c: &HttpClient, addr: SocketAddr, stream: bool) -> Sample {
    let t = Instant::now();
    let body = serde_json::json!({
        "model": "alpha",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "stream": stream,
    })
    .to_string();
    let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let mut head = None;
    let status = match c.request(req).await {
        Ok(resp) => {
            head = Some(Instant::now());
            let status = resp.status().as_u16();
            match resp.into_body().collect().await {
                Ok(b) => {
                    let b = b.to_bytes();
                    if !stream || b.ends_with(b"data: [DONE]\n\n") {
                        status
                    } else {
                        0
                    }
                }
                Err(_) => 0,
            }
        }
        Err(_) => 0,
    };
    Sample {
        end: Instant::now(),
        status,
        latency: t.elapsed(),
        head,
    }
}

/// Runs `WORKERS` clients (half of them streaming) one request after another
/// until `stop` is set.
fn load(addr: SocketAddr, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<Vec<Sample>>> {
    (0..WORKERS)
        .map(|w| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let c = client();
                let mut out = Vec::new();
                while !stop.load(Relaxed) {
                    out.push(one(&c, addr, w % 2 == 1).await);
                }
                out
            })
        })
        .collect()
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Vec<Sample>>>) -> Vec<Sample> {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Two replicas of `alpha` behind a gateway, both admitted.
async fn two_replicas() -> (SimHandle, SimHandle, citadel_gateway::Server) {
    let a = sim("alpha").await;
    let b = sim("alpha").await;
    let mut ma = m("alpha", a.addr.port());
    ma.replicas = vec![format!("http://{}", b.addr)];
    let gw = gateway(&settings(&[ma], GATEWAY), None).await;
    let c = client();
    wait_backend_state(&c, gw.addr(), "alpha", &b.url(), "ready").await;
    wait_backend_state(&c, gw.addr(), "alpha", &a.url(), "ready").await;
    (a, b, gw)
}

/// Waits until `sim` has answered another completion after `since` ones.
async fn serves_again(sim: &SimHandle, since: u64) {
    wait_until(
        Duration::from_secs(15),
        "the replica serves again",
        || async { sim.stats().completions_ok > since },
    )
    .await
}

fn report(what: &str, samples: &[Sample], fault: Instant) -> Vec<Sample> {
    let failed: Vec<Sample> = samples
        .iter()
        .filter(|s| s.status != 200)
        .copied()
        .collect();
    let after: Vec<&Sample> = samples.iter().filter(|s| s.end >= fault).collect();
    let max = after.iter().map(|s| s.latency).max().unwrap_or_default();
    let slow = after
        .iter()
        .filter(|s| s.latency > Duration::from_millis(200))
        .count();
    println!(
        "PERF issue11 {what}: {} requests, {} failed, {} slower than 200 ms after the fault, slowest {max:?}",
        samples.len(),
        failed.len(),
        slow
    );
    failed
}

/// A replica whose health check passes but that answers 500: ejected after
/// `FAILURES` in a row (its 500s retried on the good one), readmitted by the
/// probes after the back-off, ejected again for twice as long while the fault
/// lasts, and serving again once it is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue11_replica_answering_500_is_ejected_and_readmitted() {
    let (_a, b, gw) = two_replicas().await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(gw.addr(), stop.clone());
    wait_until(Duration::from_secs(10), "load on both replicas", || async {
        b.stats().completions_ok > 20
    })
    .await;

    let fault = Instant::now();
    let before = b.stats().completion_requests;
    b.set_fault(FaultUpdate::health_lies(true));
    // Through one ejection (1 s), its readmission and the second (2 s).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let during = b.stats().completion_requests - before;
    b.set_fault(FaultUpdate::reset());
    let fixed = Instant::now();
    let ok = b.stats().completions_ok;
    serves_again(&b, ok).await;
    let recovery = fixed.elapsed();
    stop.store(true, Relaxed);
    let samples = collect(tasks).await;
    let failed = report("500-replica", &samples, fault);
    let total_after = samples.iter().filter(|s| s.end >= fault).count();
    println!(
        "PERF issue11 500-replica: it received {during} of ~{total_after} requests in the 2.5 s of the fault; serving again {recovery:?} after the fix"
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    // Each ejection lets at most FAILURES plus what was in flight through;
    // 2.5 s of fault hold the first ejection and at most two more.
    let bound = 3 * (FAILURES as u64 + WORKERS as u64);
    assert!(
        during <= bound,
        "the 500-replica received {during} requests during the fault (at most {bound})"
    );
    let health = get(&client(), gw.addr(), "/health/models").await.json();
    assert_eq!(health["models"][0]["state"], "ready", "{health}");
    // The second ejection lasts 2 s: readmitted within it plus probes.
    assert!(recovery < Duration::from_secs(5), "{recovery:?}");
}

/// A replica that accepts connections and never answers (health included):
/// streams are retried after `first_byte_timeout`, non-streamed requests as
/// soon as the probes find the replica down; no request fails and none waits
/// much longer than the first-byte timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue11_hung_replica_costs_no_failed_request() {
    let (_a, b, gw) = two_replicas().await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(gw.addr(), stop.clone());
    wait_until(Duration::from_secs(10), "load on both replicas", || async {
        b.stats().completions_ok > 20
    })
    .await;
    let fault = Instant::now();
    b.set_fault(FaultUpdate::hang(true));
    wait_backend_state(&client(), gw.addr(), "alpha", &b.url(), "down").await;
    let detected = fault.elapsed();
    // Long enough that a request left waiting for the hung replica shows.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    b.set_fault(FaultUpdate::hang(false));
    let fixed = Instant::now();
    let ok = b.stats().completions_ok;
    serves_again(&b, ok).await;
    let recovery = fixed.elapsed();
    stop.store(true, Relaxed);
    let samples = collect(tasks).await;
    let failed = report("hung replica", &samples, fault);
    println!(
        "PERF issue11 hung replica: found down {detected:?} after the hang; serving again {recovery:?} after it ended"
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    // A stream whose answer had begun on the replica before it hung cannot go
    // elsewhere (its first events reached the client): it waits out the hang
    // and then completes (counted above). Every other request is bounded by
    // first_byte_timeout (1 s) or the probe's timeout (0.5 s) and interval,
    // plus a loaded test host's slack; not the 3 s the hang lasted.
    let begun_before = |s: &Sample| s.head.is_some_and(|h| h < fault);
    let max = samples
        .iter()
        .filter(|s| !begun_before(s))
        .map(|s| s.latency)
        .max()
        .unwrap_or_default();
    let waited_out = samples
        .iter()
        .filter(|s| begun_before(s) && s.latency > Duration::from_secs(2))
        .count();
    println!(
        "PERF issue11 hung replica: {waited_out} answer(s) under way at the hang waited it out"
    );
    assert!(max < Duration::from_secs(2), "a request waited {max:?}");
    assert!(
        waited_out <= WORKERS,
        "{waited_out} answers under way at the hang waited it out"
    );
}

/// A replica killed under load: requests in flight on it and those that meet
/// its closed port are retried on the other one; a new process on its port
/// is admitted by the probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue11_killed_replica_fails_only_answers_it_had_begun() {
    let (_a, b, gw) = two_replicas().await;
    let b_addr = b.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(gw.addr(), stop.clone());
    wait_until(Duration::from_secs(10), "load on both replicas", || async {
        b.stats().completions_ok > 20
    })
    .await;
    let fault = Instant::now();
    // Abrupt: the listener and every connection close at once.
    drop(b);
    wait_backend_state(
        &client(),
        gw.addr(),
        "alpha",
        &format!("http://{b_addr}"),
        "down",
    )
    .await;
    let detected = fault.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = Instant::now();
    let b = citadel_engine_sim::spawn(
        SimConfig {
            models: vec!["alpha".into()],
            ..Default::default()
        },
        b_addr,
    )
    .await
    .expect("the replica restarts on its port");
    serves_again(&b, 0).await;
    let recovery = restarted.elapsed();
    stop.store(true, Relaxed);
    let samples = collect(tasks).await;
    let failed = report("killed replica", &samples, fault);
    println!(
        "PERF issue11 killed replica: found down {detected:?} after the kill; serving again {recovery:?} after its restart"
    );
    // An answer the killed replica had already begun (a stream's first
    // events, a body half sent) cannot be replayed elsewhere: such a request
    // fails visibly (a cut stream ends with an error event, never `[DONE]`).
    // Every request that began after the kill, or whose answer had not begun,
    // is retried on the good replica and succeeds.
    let begun_after_kill: Vec<&Sample> = failed
        .iter()
        .filter(|s| {
            s.end
                .checked_sub(s.latency)
                .is_none_or(|start| start >= fault)
        })
        .collect();
    assert!(
        begun_after_kill.is_empty(),
        "requests sent after the kill failed: {begun_after_kill:?} (all failed: {failed:?})"
    );
    assert!(
        failed.len() <= WORKERS,
        "more failed requests than can have been in flight at the kill: {failed:?}"
    );
}
