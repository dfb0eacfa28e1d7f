//! Fault injection, in-process (real HTTP on ephemeral ports).

mod common;

use std::time::Duration;

use citadel_engine_sim::{spawn, FaultUpdate, Faults, SimConfig, SimHandle};
use common::*;
use hyper::StatusCode;
use serde_json::json;

const SHORT: Duration = Duration::from_millis(300);

async fn sim(faults: Faults) -> SimHandle {
    let cfg = SimConfig {
        models: vec!["m".into()],
        faults,
        ..SimConfig::default()
    };
    spawn(cfg, "127.0.0.1:0".parse().unwrap()).await.unwrap()
}

const COMPLETION: &str = r#"{"model":"m","prompt":"hi","max_tokens":2}"#;

#[tokio::test]
async fn runtime_hang_blocks_everything_but_sim_endpoints_until_reset() {
    let s = sim(Faults::default()).await;
    assert_eq!(
        get_within(s.addr, "/health", SHORT).await,
        Some(StatusCode::OK)
    );
    s.set_fault(FaultUpdate::hang(true));
    assert_eq!(
        get_within(s.addr, "/health", SHORT).await,
        None,
        "/health must hang"
    );
    assert!(
        tokio::time::timeout(SHORT, post(s.addr, "/v1/completions", COMPLETION))
            .await
            .is_err(),
        "completions must hang"
    );
    // A request parked in the hang resumes once the fault is lifted.
    let addr = s.addr;
    let parked = tokio::spawn(async move { get(addr, "/v1/models").await.0 });
    // The control endpoint still answers while hung.
    let (st, body) = post(s.addr, "/sim/fault", r#"{"reset": true}"#).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(json(&body)["hang"], false);
    assert_eq!(parked.await.unwrap(), StatusCode::OK);
    assert_eq!(
        get_within(s.addr, "/health", SHORT).await,
        Some(StatusCode::OK)
    );
}

#[tokio::test]
async fn hang_after_n_completions() {
    let s = sim(Faults {
        hang_after: Some(2),
        ..Faults::default()
    })
    .await;
    for _ in 0..2 {
        assert_eq!(
            post(s.addr, "/v1/completions", COMPLETION).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(
        get_within(s.addr, "/health", SHORT).await,
        None,
        "/health must hang"
    );
    // Connections are still accepted.
    assert!(tokio::net::TcpStream::connect(s.addr).await.is_ok());
    assert_eq!(s.stats().completion_requests, 2);
    // Graceful shutdown is not blocked by hung requests.
    let addr = s.addr;
    let hung =
        tokio::spawn(async move { get_within(addr, "/health", Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::time::timeout(Duration::from_secs(5), s.shutdown())
        .await
        .unwrap()
        .unwrap();
    assert_ne!(hung.await.unwrap(), Some(StatusCode::OK));
}

#[tokio::test]
async fn health_lies_passes_health_but_fails_inference() {
    let s = sim(Faults {
        health_lies: true,
        ..Faults::default()
    })
    .await;
    assert_eq!(get(s.addr, "/health").await.0, StatusCode::OK);
    for (path, body) in [
        ("/v1/completions", COMPLETION),
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true}"#,
        ),
        ("/v1/embeddings", r#"{"model":"m","input":"x"}"#),
    ] {
        let (st, b) = post(s.addr, path, body).await;
        assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR, "{path}");
        openai_error(&b);
    }
    s.set_fault(FaultUpdate::health_lies(false));
    assert_eq!(
        post(s.addr, "/v1/completions", COMPLETION).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn health_fails_flag_and_runtime_toggle() {
    let s = sim(Faults {
        health_fails: true,
        ..Faults::default()
    })
    .await;
    assert_eq!(
        get(s.addr, "/health").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        post(s.addr, "/v1/completions", COMPLETION).await.0,
        StatusCode::OK
    );
    let (st, body) = post(s.addr, "/sim/fault", r#"{"health_fails": false}"#).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(json(&body)["health_fails"], false);
    assert_eq!(get(s.addr, "/health").await.0, StatusCode::OK);
    post(s.addr, "/sim/fault", r#"{"health_fails": true}"#).await;
    assert_eq!(
        get(s.addr, "/health").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Unknown fault names are rejected.
    let (st, _) = post(s.addr, "/sim/fault", r#"{"hnag": true}"#).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn unhealthy_after_n_completions() {
    let s = sim(Faults {
        unhealthy_after: Some(1),
        ..Faults::default()
    })
    .await;
    assert_eq!(get(s.addr, "/health").await.0, StatusCode::OK);
    assert_eq!(
        post(s.addr, "/v1/completions", COMPLETION).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get(s.addr, "/health").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn crash_after_n_closes_the_server_with_an_error() {
    let s = sim(Faults {
        crash_after: Some(2),
        ..Faults::default()
    })
    .await;
    let addr = s.addr;
    assert_eq!(
        post(addr, "/v1/completions", COMPLETION).await.0,
        StatusCode::OK
    );
    // The second one gets no answer: the connection drops.
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        request(
            addr,
            hyper::Method::POST,
            "/v1/completions",
            Some(COMPLETION),
        ),
    )
    .await
    .expect("crash must not hang the client");
    assert!(r.is_err(), "crashing request must not be answered: {r:?}");
    let err = tokio::time::timeout(Duration::from_secs(5), s.wait())
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("simulated crash"), "{err}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener still open"
    );
}

#[tokio::test]
async fn crash_via_control_endpoint() {
    let s = sim(Faults::default()).await;
    let (st, body) = post(s.addr, "/sim/fault", r#"{"crash": true}"#).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(json(&body)["crashed"], true);
    let err = tokio::time::timeout(Duration::from_secs(5), s.wait())
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("simulated crash"));
}

#[tokio::test]
async fn crash_on_start_fails_at_once() {
    let s = sim(Faults {
        crash_on_start: true,
        ..Faults::default()
    })
    .await;
    let err = tokio::time::timeout(Duration::from_secs(5), s.wait())
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("simulated crash"));
}

#[tokio::test]
async fn allocate_grows_memory_until_reset() {
    let s = sim(Faults {
        allocate_mb_per_sec: Some(40.0),
        ..Faults::default()
    })
    .await;
    eventually(Duration::from_secs(5), "allocation >= 8 MiB", || async {
        s.stats().allocated_bytes >= 8 << 20
    })
    .await;
    assert_eq!(s.faults().allocate_mb_per_sec, Some(40.0));
    s.set_fault(FaultUpdate::reset());
    eventually(Duration::from_secs(5), "allocation released", || async {
        s.stats().allocated_bytes == 0
    })
    .await;
}

#[tokio::test]
async fn dropping_the_handle_stops_the_server() {
    let s = sim(Faults::default()).await;
    let addr = s.addr;
    assert_eq!(get(addr, "/health").await.0, StatusCode::OK);
    drop(s);
    eventually(Duration::from_secs(5), "listener closed", || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
}

#[tokio::test]
async fn fault_update_json_round_trip() {
    let u: FaultUpdate =
        serde_json::from_value(json!({"hang_after": 3, "health_lies": true})).unwrap();
    assert_eq!(u.hang_after, Some(3));
    assert_eq!(u.health_lies, Some(true));
}
