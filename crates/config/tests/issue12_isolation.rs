//! Issue 12, item 1 (engines reachable only through the gateway), the
//! config's share: a stack is isolated in Citadel's private network namespace
//! unless something needs the host's network (replicas, an engine that
//! downloads), and then validation says so, where, and what it costs.

use std::path::Path;

use citadel_config::{parse, EngineNetwork, HostNetworkReason, Severity};

const FILE: &str = "/etc/citadel/citadel.toml";

fn load(text: &str) -> citadel_config::Loaded {
    match parse(text, Path::new(FILE)) {
        Ok(l) => l,
        Err(e) => panic!("config was refused:\n{text}\n{e}"),
    }
}

const SIM: &str = "[models.phi3]\nport = 11403\nengine = \"sim\"\n";

#[test]
fn issue12_engines_are_isolated_by_default() {
    for text in [
        SIM,
        citadel_config::SIM_EXAMPLE_CONFIG,
        citadel_config::EXAMPLE_CONFIG,
    ] {
        let l = load(text);
        assert_eq!(l.settings.engine_network(), EngineNetwork::Isolated);
        assert!(l.report.is_empty(), "{}", l.report);
    }
}

#[test]
fn issue12_replicas_fall_back_to_the_host_network_with_a_warning() {
    let text = format!("{SIM}replicas = [\"http://10.0.0.9:11403\"]\n");
    let l = load(&text);
    let net = l.settings.engine_network();
    assert!(!net.is_isolated());
    assert_eq!(
        net,
        EngineNetwork::Host(vec![HostNetworkReason::Replicas {
            model: l.settings.models[0].name.clone()
        }])
    );
    let w: Vec<_> = l.report.warnings().collect();
    assert_eq!(w.len(), 1, "{}", l.report);
    assert_eq!(w[0].severity, Severity::Warning);
    assert_eq!(w[0].key, "models.phi3.replicas");
    let shown = l.report.to_string();
    assert!(shown.contains(&format!("{FILE}:4:12")), "{shown}");
    assert!(
        shown.contains("engines are not isolated from local users"),
        "{shown}"
    );
    assert!(shown.contains("model `phi3` has replicas"), "{shown}");
    assert!(shown.contains("reachable by any local user"), "{shown}");
    assert!(shown.contains("Engine isolation"), "{shown}");
}

#[test]
fn issue12_replicas_from_model_defaults_are_named_there() {
    let text = format!("[model_defaults]\nreplicas = [\"http://gpu2.lan:11403\"]\n{SIM}");
    let l = load(&text);
    let w: Vec<_> = l.report.warnings().collect();
    assert_eq!(w.len(), 1, "{}", l.report);
    assert_eq!(w[0].key, "model_defaults.replicas");
    assert!(
        l.report.to_string().contains(&format!("{FILE}:2:12")),
        "{}",
        l.report
    );
}

#[test]
fn issue12_an_engine_that_downloads_falls_back_with_a_warning() {
    let text =
        format!("{SIM}[models.llama]\nport = 11404\nengine = \"ollama\"\nmodel = \"llama3:8b\"\n");
    let l = load(&text);
    assert!(matches!(
        l.settings.engine_network(),
        EngineNetwork::Host(ref r) if r.len() == 1
    ));
    let w: Vec<_> = l.report.warnings().collect();
    assert_eq!(w.len(), 1, "{}", l.report);
    assert_eq!(w[0].key, "models.llama.engine");
    assert!(
        w[0].message
            .contains("runs ollama, which needs the outside network"),
        "{}",
        w[0].message
    );
}
