//! Regression tests for issue 12 (the API path's security), the config's
//! share: the rate limit's burst (item 2) and replicas that are the gateway
//! itself (item 3). Each test is named after the item it pins and failed
//! before the fix.

use std::path::Path;

use citadel_config::{parse, ConfigError};

const FILE: &str = "/etc/citadel/citadel.toml";

fn errors(text: &str) -> String {
    match parse(text, Path::new(FILE)) {
        Ok(l) => panic!("config was accepted:\n{text}\nwarnings:\n{}", l.report),
        Err(ConfigError::Invalid(report)) => report.to_string(),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

fn settings(text: &str) -> citadel_config::Settings {
    match parse(text, Path::new(FILE)) {
        Ok(l) => l.settings,
        Err(e) => panic!("config was refused:\n{text}\n{e}"),
    }
}

fn with_gateway(gateway: &str, model: &str) -> String {
    format!("[gateway]\n{gateway}\n[models.phi3]\nport = 11403\nengine = \"sim\"\n{model}")
}

/// Item 2: the burst is its own key, 10 by default (never more than the
/// per-minute limit), and validated against the limit.
#[test]
fn issue12_rate_limit_burst_is_configurable() {
    let s = settings(&with_gateway("", ""));
    assert_eq!(s.gateway.rate_limit_per_minute, 100);
    assert_eq!(s.gateway.rate_limit_burst, 10);
    let s = settings(&with_gateway("rate_limit_per_minute = 3", ""));
    assert_eq!(s.gateway.rate_limit_burst, 3);
    let s = settings(&with_gateway(
        "rate_limit_per_minute = 600\nrate_limit_burst = 50",
        "",
    ));
    assert_eq!(
        (s.gateway.rate_limit_per_minute, s.gateway.rate_limit_burst),
        (600, 50)
    );
    let r = errors(&with_gateway(
        "rate_limit_per_minute = 100\nrate_limit_burst = 101",
        "",
    ));
    assert!(
        r.contains("gateway.rate_limit_burst = 101 is out of range")
            && r.contains("citadel.toml:3:20")
            && r.contains("from 1 to 100"),
        "{r}"
    );
    let r = errors(&with_gateway("rate_limit_burst = 0", ""));
    assert!(r.contains("rate_limit_burst = 0 is out of range"), "{r}");
}

/// Item 3: a replica that is the gateway itself is refused, with its place
/// and a hint; remote replicas and other local ports stay fine.
#[test]
fn issue12_replica_pointing_at_the_gateway_is_refused() {
    for (listen, url) in [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("127.0.0.1", "http://localhost:8000/"),
        ("127.0.0.1", "http://[::1]:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://0.0.0.0:8000"),
        ("::", "http://localhost:8000"),
        ("10.0.0.5", "http://10.0.0.5:8000"),
    ] {
        let text = with_gateway(
            &format!("listen = \"{listen}\"\nport = 8000"),
            &format!("replicas = [\"http://10.0.0.9:11403\", \"{url}\"]\n"),
        );
        let r = errors(&text);
        assert!(
            r.contains(&format!("replica `{url}` is the gateway itself"))
                && r.contains("models.phi3.replicas")
                && r.contains("citadel.toml:7:")
                && r.contains("help:"),
            "listen {listen}, {url}:\n{r}"
        );
    }
    // The same in [model_defaults].
    let r = errors(
        "[model_defaults]\nreplicas = [\"http://localhost:8000\"]\n[models.phi3]\nport = 11403\nengine = \"sim\"\n",
    );
    assert!(r.contains("model_defaults.replicas"), "{r}");
    // Not loops: another port, another host, the gateway on another port.
    let ok = settings(&with_gateway(
        "port = 9000",
        "replicas = [\"http://127.0.0.1:8000\", \"http://10.0.0.9:9000\", \"http://127.0.0.1:11404\"]\n",
    ));
    assert_eq!(ok.models[0].replicas.len(), 3);
}

/// Review of item 3: a replica written with an IPv4 literal other than a
/// canonical dotted quad (which resolvers still read, as `inet_aton` does) or
/// with a loopback name of `/etc/hosts` passed the loop check. Such literals
/// are refused with a hint naming the dotted quad; the names are local.
#[test]
fn review_replica_loop_bypasses_are_refused() {
    let gateway = "listen = \"127.0.0.1\"\nport = 18000";
    for (url, quad) in [
        ("http://127.1:18000", "127.0.0.1"),
        ("http://2130706433:18000", "127.0.0.1"),
        ("http://0x7f000001:18000", "127.0.0.1"),
        ("http://0177.0.0.1:18000", "127.0.0.1"),
        ("http://0:18000", "0.0.0.0"),
    ] {
        let r = errors(&with_gateway(gateway, &format!("replicas = [\"{url}\"]\n")));
        assert!(
            r.contains(&format!(
                "replica `{url}` writes the IPv4 address {quad} other than as a dotted quad"
            )) && r.contains(&format!(
                "write the address as a dotted quad of four decimal numbers: `{quad}`"
            )) && r.contains(&format!("replica `{url}` is the gateway itself"))
                && r.contains("models.phi3.replicas")
                && r.contains("citadel.toml:7:"),
            "{url}:\n{r}"
        );
    }
    for url in [
        "http://ip6-localhost:18000",
        "http://ip6-loopback:18000",
        "http://localhost.localdomain:18000",
        "http://[::ffff:127.0.0.1]:18000",
        "http://0.0.0.0:18000",
    ] {
        let r = errors(&with_gateway(gateway, &format!("replicas = [\"{url}\"]\n")));
        assert!(
            r.contains(&format!("replica `{url}` is the gateway itself")),
            "{url}:\n{r}"
        );
    }
    // Not a loop, but still not a dotted quad: refused all the same.
    let r = errors(&with_gateway(
        gateway,
        "replicas = [\"http://167772172:11403\", \"http://10.0.0.256:11403\"]\n",
    ));
    assert!(
        r.contains("`http://167772172:11403` writes the IPv4 address 10.0.0.12 other than as a dotted quad")
            && r.contains("`http://10.0.0.256:11403` has a numeric host that is no IPv4 address")
            && !r.contains("gateway itself"),
        "{r}"
    );
    // Dotted quads and names stay fine.
    let ok = settings(&with_gateway(
        gateway,
        "replicas = [\"http://10.0.0.12:11403\", \"http://gpu2.lan:18000\", \"http://127.0.0.1:11404\"]\n",
    ));
    assert_eq!(ok.models[0].replicas.len(), 3);
}
