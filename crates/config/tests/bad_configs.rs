//! One test per kind of bad config: each asserts the message, the location
//! (file:line:column) and that every error is reported, not only the first.

use std::path::Path;

use citadel_config::{parse, ConfigError, HostFacts};

const MINIMAL: &str = r#"
[models.phi3]
port = 11403
engine = "sim"
"#;

/// The rendered report for a config that must fail.
fn errors(text: &str) -> String {
    match parse(text, Path::new("/etc/citadel/citadel.toml")) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(ConfigError::Invalid(report)) => report.to_string(),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

fn assert_has(report: &str, needles: &[&str]) {
    for n in needles {
        assert!(report.contains(n), "missing {n:?} in:\n{report}");
    }
}

#[test]
fn minimal_config_is_valid() {
    let loaded = parse(MINIMAL, Path::new("c.toml")).unwrap();
    assert_eq!(loaded.settings.models[0].name.as_str(), "phi3");
}

#[test]
fn unknown_key_names_line_column_and_key() {
    let r = errors("[gateway]\nport = 8000\nprot = 1\n");
    assert_has(
        &r,
        &[
            "unknown field `prot`",
            "/etc/citadel/citadel.toml:3:1",
            "expected one of",
        ],
    );
}

#[test]
fn unknown_key_in_a_model() {
    let r = errors(&format!("{MINIMAL}memory_maxx = \"1G\"\n"));
    assert_has(&r, &["unknown field `memory_maxx`", "citadel.toml:5:1"]);
}

#[test]
fn syntax_error_has_a_place() {
    let r = errors("[gateway\nport = 8000\n");
    assert_has(&r, &["citadel.toml:1:", "error:"]);
}

#[test]
fn wrong_type_explains_quotes() {
    let r = errors("[gateway]\nport = \"8000\"\n");
    assert_has(
        &r,
        &["invalid type", "citadel.toml:2:8", "strings need quotes"],
    );
}

#[test]
fn duplicate_ports_are_reported() {
    let r = errors(
        "[models.a]\nport = 11400\nengine = \"sim\"\n[models.b]\nport = 11400\nengine = \"sim\"\n",
    );
    assert_has(
        &r,
        &[
            "port 11400 is already used by model `a`",
            "citadel.toml:5:8",
            "models.b.port",
        ],
    );
}

#[test]
fn out_of_range_ports_are_reported() {
    let r = errors(
        "[models.a]\nport = 70000\nengine = \"sim\"\n[models.b]\nport = 0\nengine = \"sim\"\n",
    );
    assert_has(
        &r,
        &[
            "port 70000 is out of range",
            "citadel.toml:2:8",
            "port 0 is out of range",
            "citadel.toml:5:8",
        ],
    );
}

#[test]
fn model_port_equal_to_gateway_port() {
    let r = errors("[models.a]\nport = 8000\nengine = \"sim\"\n");
    assert_has(&r, &["port 8000 is the gateway's port", "citadel.toml:2:8"]);
}

#[test]
fn privileged_model_port() {
    let r = errors("[models.a]\nport = 80\nengine = \"sim\"\n");
    assert_has(&r, &["port 80 is privileged"]);
}

#[test]
fn invalid_instance_name() {
    let r = errors("[models.\"mix tral\"]\nport = 11400\nengine = \"sim\"\n");
    assert_has(
        &r,
        &[
            "`mix tral` is not a valid systemd instance name",
            "citadel.toml:1:9",
        ],
    );
}

#[test]
fn reserved_model_name() {
    let r = errors("[models.gateway]\nport = 11400\nengine = \"sim\"\n");
    assert_has(&r, &["`gateway` is reserved"]);
}

#[test]
fn bad_size() {
    let r = errors(&format!("{MINIMAL}memory_max = \"90GB\"\n"));
    assert_has(
        &r,
        &[
            "`90GB` is ambiguous",
            "powers of 1024",
            "write e.g. `90G`",
            "citadel.toml:5:14",
        ],
    );
}

#[test]
fn memory_high_above_max() {
    let r = errors(&format!(
        "{MINIMAL}memory_max = \"8G\"\nmemory_high = \"9G\"\n"
    ));
    assert_has(
        &r,
        &[
            "memory_high (9G) is above memory_max (8G)",
            "citadel.toml:6:15",
        ],
    );
}

#[test]
fn bad_duration() {
    let r = errors(&format!("{MINIMAL}start_timeout = \"fortnight\"\n"));
    assert_has(
        &r,
        &[
            "`fortnight` is not a time span",
            "15min",
            "citadel.toml:5:17",
        ],
    );
}

#[test]
fn relative_paths() {
    let r = errors("[paths]\nhome = \"opt/citadel\"\n[models.a]\nport = 11400\nengine = \"sim\"\nbinary = \"../sim\"\n");
    assert_has(
        &r,
        &[
            "`opt/citadel` is not an absolute path",
            "citadel.toml:2:8",
            "`../sim` is not an absolute path",
            "citadel.toml:6:10",
        ],
    );
}

#[test]
fn missing_fields_an_engine_needs() {
    let r = errors("[models.mixtral]\nport = 11400\nengine = \"vllm\"\n[models.x]\nport = 11401\nengine = \"command\"\n");
    assert_has(
        &r,
        &[
            "engine \"vllm\" needs `model`",
            "engine \"command\" needs `command`",
            "models.x.command",
        ],
    );
}

#[test]
fn missing_port() {
    let r = errors("[models.a]\nengine = \"sim\"\n");
    assert_has(&r, &["model `a` has no port", "add `port = 11400`"]);
}

#[test]
fn unknown_engine_lists_the_valid_ones() {
    let r = errors("[models.a]\nport = 11400\nengine = \"tensorrt\"\n");
    assert_has(
        &r,
        &[
            "unknown engine `tensorrt`",
            "\"vllm\", \"llama-cpp\", \"ollama\", \"tgi\", \"command\", \"sim\"",
            "citadel.toml:3:10",
        ],
    );
}

#[test]
fn setting_for_another_engine() {
    let r = errors("[models.a]\nport = 11400\nengine = \"sim\"\nmax_model_len = 4096\n");
    assert_has(
        &r,
        &[
            "`max_model_len` does not apply to engine \"sim\"",
            "citadel.toml:4:17",
        ],
    );
}

#[test]
fn secrets_in_environment_are_refused() {
    let r = errors(&format!("{MINIMAL}env = {{ HF_TOKEN = \"hf_abc\" }}\n"));
    assert_has(&r, &["`HF_TOKEN` looks like a secret", "credentials = {"]);
    assert!(
        !r.contains("hf_abc") || r.contains("env = {"),
        "the secret value is only shown as part of the source line"
    );
}

#[test]
fn no_models() {
    let r = errors("[gateway]\nport = 8000\n");
    assert_has(&r, &["no models are configured"]);
}

#[test]
fn root_user_is_refused() {
    let r = errors(&format!("[service]\nuser = \"root\"\n{MINIMAL}"));
    assert_has(&r, &["must not run as root"]);
}

#[test]
fn port_in_model_defaults() {
    let r = errors(&format!("[model_defaults]\nport = 11400\n{MINIMAL}"));
    assert_has(&r, &["a port cannot be a default"]);
}

#[test]
fn all_errors_are_reported_at_once() {
    let r = errors(
        "[gateway]\nlisten = \"localhost\"\n[models.a]\nport = 11400\nengine = \"sim\"\nmemory_max = \"lots\"\n[models.b]\nport = 11400\nengine = \"sim\"\nstop_timeout = \"soon\"\n",
    );
    assert_has(
        &r,
        &[
            "`localhost` is not an IP address",
            "`lots` is not a size",
            "already used by model `a`",
            "`soon` is not a time span",
            "4 error(s)",
        ],
    );
}

#[test]
fn warnings_open_gateway_without_auth() {
    let loaded = parse(
        &format!("[gateway]\nlisten = \"0.0.0.0\"\nauth = false\n{MINIMAL}"),
        Path::new("c.toml"),
    )
    .unwrap();
    let r = loaded.report.to_string();
    assert_has(
        &r,
        &[
            "warning: the gateway listens on 0.0.0.0 without authentication",
            "c.toml:3:8",
        ],
    );
}

/// GPUs are not checked against `/dev/nvidiaN` any more (those numbers are
/// device minors, not indexes): the CLI resolves `gpus` through the driver.
#[test]
fn host_warnings_memory() {
    let loaded = parse(citadel_config::EXAMPLE_CONFIG, Path::new("c.toml")).unwrap();
    let facts = HostFacts {
        mem_total: Some(24 << 30),
    };
    let warnings = citadel_config::check_host(&loaded.settings, &facts);
    let text: Vec<_> = warnings.iter().map(|w| w.message.clone()).collect();
    assert!(
        text.iter()
            .any(|m| m.contains("memory limits add up to 154G but this host has 24.0G of RAM")),
        "{text:?}"
    );
    assert!(text.iter().all(|m| !m.contains("GPU")), "{text:?}");
}

/// Regression (found by the supervisor's tests): an engine-specific default such
/// as the example's `python` must not make a model of another engine invalid.
#[test]
fn engine_specific_defaults_skip_other_engines() {
    let text = format!(
        "{}\n[models.sim1]\nport = 11410\nengine = \"sim\"\n",
        citadel_config::EXAMPLE_CONFIG
    );
    let loaded = parse(&text, Path::new("c.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.settings.models.len(), 5);
    // ... while a model's own misplaced setting is still an error.
    let r = errors("[models.a]\nport = 11400\nengine = \"sim\"\npython = \"/usr/bin/python3\"\n");
    assert_has(&r, &["`python` does not apply to engine \"sim\""]);
}

#[test]
fn paths_to_secrets_are_not_secrets() {
    let loaded = parse(
        &format!("{MINIMAL}env = {{ HF_TOKEN_FILE = \"/run/credentials/x\" }}\n"),
        Path::new("c.toml"),
    );
    assert!(loaded.is_ok(), "{:?}", loaded.err().map(|e| e.to_string()));
}
