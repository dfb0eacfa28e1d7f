//! Regression tests for issue 10, item 6 (limits an operator would set), the
//! config's share: the gateway and the models get file-descriptor limits that
//! fit their load when the config sets none, and configured values still win.

use std::path::Path;

use citadel_config::{parse, Settings};

const FILE: &str = "/etc/citadel/citadel.toml";

fn settings(text: &str) -> Settings {
    match parse(text, Path::new(FILE)) {
        Ok(l) => l.settings,
        Err(e) => panic!("config was refused:\n{text}\n{e}"),
    }
}

/// The gateway ran with systemd's default `LimitNOFILE` (soft 1024): 2,000
/// concurrent clients left 426 unanswered (`accept failed`). With no limits in
/// the config it now gets 65536 descriptors and a bounded TasksMax.
#[test]
fn issue10_limits_gateway_nofile_and_tasks_max_have_defaults() {
    let s = settings("[models.phi3]\nport = 11403\nengine = \"sim\"\n");
    assert_eq!(s.gateway.limits.nofile, Some(65_536));
    assert_eq!(s.gateway.limits.tasks_max, Some(4096));
    // Models too: vLLM's own docs ask for 65536 open files.
    assert_eq!(s.models[0].limits.nofile, Some(65_536));
}

/// What the operator writes wins over the defaults, for the gateway, in
/// `[model_defaults]` and per model; the bounds are unchanged.
#[test]
fn issue10_limits_configured_values_win_over_the_defaults() {
    let s = settings(
        "[gateway]\nnofile = 200000\ntasks_max = 64\n\
         [model_defaults]\nengine = \"sim\"\nnofile = 4096\n\
         [models.a]\nport = 11400\n\
         [models.b]\nport = 11401\nnofile = 100000\n",
    );
    assert_eq!(s.gateway.limits.nofile, Some(200_000));
    assert_eq!(s.gateway.limits.tasks_max, Some(64));
    assert_eq!(s.model("a").unwrap().limits.nofile, Some(4096));
    assert_eq!(s.model("b").unwrap().limits.nofile, Some(100_000));
    let refused = parse(
        "[gateway]\nnofile = 2000000\n[models.a]\nport = 11400\nengine = \"sim\"\n",
        Path::new(FILE),
    );
    assert!(
        refused.is_err(),
        "nofile above 1048576 (fs.nr_open) is refused"
    );
}
