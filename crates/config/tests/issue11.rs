//! Issue 11, items 3 and 4: the gateway's listen backlog, first-byte timeout
//! and outlier ejection are settings with defaults, ranges and diagnostics.

use std::path::Path;

const MODEL: &str = "[models.a]\nport = 11400\nengine = \"sim\"\n";

fn parse(gateway: &str) -> Result<citadel_config::Loaded, String> {
    citadel_config::parse(
        &format!("[gateway]\n{gateway}\n{MODEL}"),
        Path::new("c.toml"),
    )
    .map_err(|e| e.to_string())
}

#[test]
fn issue11_burst_and_outlier_settings_have_defaults() {
    let l = parse("").unwrap();
    let g = &l.settings.gateway;
    assert_eq!(g.listen_backlog, 4096);
    assert_eq!(g.first_byte_timeout.duration().as_secs(), 60);
    assert_eq!(g.outlier_failures, 5);
    assert_eq!(g.outlier_ejection.duration().as_secs(), 10);
}

#[test]
fn issue11_burst_and_outlier_settings_are_read() {
    let l = parse(
        "listen_backlog = 8192\nfirst_byte_timeout = \"2s\"\noutlier_failures = 3\noutlier_ejection = \"500ms\"",
    )
    .unwrap();
    let g = &l.settings.gateway;
    assert_eq!(g.listen_backlog, 8192);
    assert_eq!(g.first_byte_timeout.duration().as_millis(), 2000);
    assert_eq!(g.outlier_failures, 3);
    assert_eq!(g.outlier_ejection.duration().as_millis(), 500);
    assert!(l.report.is_empty(), "{}", l.report);
}

#[test]
fn issue11_out_of_range_settings_are_all_reported_with_their_place() {
    let e = parse(
        "listen_backlog = 1\nfirst_byte_timeout = \"10ms\"\noutlier_failures = 0\noutlier_ejection = \"2h\"",
    )
    .unwrap_err();
    for (key, line) in [
        ("gateway.listen_backlog", 2),
        ("gateway.first_byte_timeout", 3),
        ("gateway.outlier_failures", 4),
        ("gateway.outlier_ejection", 5),
    ] {
        assert!(e.contains(key), "{key} not reported: {e}");
        assert!(
            e.contains(&format!("c.toml:{line}:")),
            "{key} has no place: {e}"
        );
    }
}

#[test]
fn issue11_first_byte_timeout_longer_than_request_timeout_warns() {
    let l = parse("request_timeout = \"30s\"\nfirst_byte_timeout = \"1min\"").unwrap();
    let report = l.report.to_string();
    assert!(
        report.contains("gateway.first_byte_timeout") && report.contains("request_timeout"),
        "{report}"
    );
}
