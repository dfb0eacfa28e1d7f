//! Regression tests for issue 9 (hostile input), the config's share: each test
//! is named after the finding it pins and failed (or panicked) before the fix.

use std::path::Path;

use citadel_config::{parse, ConfigError, Diagnostic, Report, Severity};

const FILE: &str = "/etc/citadel/citadel.toml";

const MINIMAL: &str = "[models.phi3]\nport = 11403\nengine = \"sim\"\n";

fn report(text: &str) -> Report {
    match parse(text, Path::new(FILE)) {
        Ok(l) => panic!("config was accepted:\n{text}\nwarnings:\n{}", l.report),
        Err(ConfigError::Invalid(report)) => report,
        Err(other) => panic!("unexpected error: {other}"),
    }
}

/// The rendered report of a config that must fail.
fn errors(text: &str) -> String {
    report(text).to_string()
}

fn assert_has(report: &str, needles: &[&str]) {
    for n in needles {
        assert!(report.contains(n), "missing {n:?} in:\n{report}");
    }
}

fn warnings(text: &str) -> String {
    match parse(text, Path::new(FILE)) {
        Ok(l) => l.report.to_string(),
        Err(e) => panic!("config was refused:\n{text}\n{e}"),
    }
}

/// A TOML basic string holding `s` (control characters escaped as TOML wants).
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[test]
fn issue9_unit_file_injection_credential_path_with_newline_is_refused() {
    let r = errors(&format!(
        "{MINIMAL}credentials = {{ t = \"/etc/x\\nExecStartPre=/bin/sh -c id\" }}\n"
    ));
    assert_has(
        &r,
        &[
            "U+000A (newline)",
            "models.phi3.credentials",
            "citadel.toml:4:21",
        ],
    );
}

/// Every string that can reach a unit, drop-in, sysusers.d or tmpfiles.d line
/// refuses control characters, with a place and the key.
#[test]
fn issue9_unit_file_injection_control_characters_are_refused_everywhere() {
    for bad in ["\n", "\r", "\0", "\t", "\u{7f}", "\u{1b}"] {
        let v = |prefix: &str| toml_str(&format!("{prefix}{bad}x"));
        let cases = [
            format!("[paths]\nhome = {}\n{MINIMAL}", v("/opt/citadel")),
            format!("[paths]\nmodels = {}\n{MINIMAL}", v("/opt/citadel/models")),
            format!("[paths]\ncredentials = {}\n{MINIMAL}", v("/etc/citadel/c")),
            format!("[gateway]\napi_keys_file = {}\n{MINIMAL}", v("/etc/citadel/k")),
            format!("[gateway]\ncors_origins = [{}]\n{MINIMAL}", v("https://a.example")),
            format!("[service]\nuser = {}\n{MINIMAL}", v("citadel")),
            format!("[service]\ngroup = {}\n{MINIMAL}", v("citadel")),
            format!("{MINIMAL}credentials = {{ t = {} }}\n", v("/etc/x")),
            format!("{MINIMAL}credentials = {{ {} = \"/etc/x\" }}\n", v("t")),
            format!("{MINIMAL}env = {{ A = {} }}\n", v("value")),
            format!("{MINIMAL}env = {{ {} = \"v\" }}\n", v("A")),
            format!("{MINIMAL}aliases = [{}]\n", v("gpt")),
            format!("{MINIMAL}replicas = [{}]\n", v("http://10.0.0.1:11400")),
            format!("{MINIMAL}health_path = {}\n", v("/health")),
            format!("{MINIMAL}args = [\"--x\", {}]\n", v("1")),
            format!("{MINIMAL}binary = {}\n", v("/opt/sim")),
            format!(
                "[models.a]\nport = 11400\nengine = \"vllm\"\nmodel = {}\npython = \"/usr/bin/python3\"\n",
                v("org/model")
            ),
            format!("[models.a]\nport = 11400\nengine = \"vllm\"\nmodel = \"m\"\npython = {}\n", v("/usr/bin/python3")),
            format!("[models.a]\nport = 11400\nengine = \"llama-cpp\"\nmodel = {}\n", v("/m/x.gguf")),
            format!("[models.a]\nport = 11400\nengine = \"command\"\ncommand = [{}]\n", v("/bin/engine")),
            format!("[models.a]\nport = 11400\nengine = \"command\"\ncommand = [\"/bin/engine\", {}]\n", v("--flag")),
            format!("[models.{}]\nport = 11400\nengine = \"sim\"\n", v("m")),
        ];
        for text in cases {
            let rep = report(&text);
            let errs: Vec<&Diagnostic> = rep.errors().collect();
            assert!(!errs.is_empty(), "{bad:?} accepted in:\n{text}");
            for d in &errs {
                assert!(d.span.is_some(), "no place for {d:?} in:\n{text}");
                assert!(!d.key.is_empty(), "no key for {d:?} in:\n{text}");
            }
        }
    }
}

#[test]
fn issue9_unit_file_injection_paths_with_spaces_or_specifiers_are_refused() {
    let r = errors(&format!(
        "[paths]\nmodels = \"/srv/my models\"\nhome = \"/opt/%t\"\n{MINIMAL}credentials = {{ t = \"/etc/%h/x\" }}\n"
    ));
    assert_has(
        &r,
        &[
            "`/srv/my models` contains whitespace",
            "citadel.toml:2:10",
            "`/opt/%t` contains `%`",
            "specifiers",
            "citadel.toml:3:8",
            "credential `t`: `/etc/%h/x` contains `%`",
        ],
    );
}

#[test]
fn issue9_credential_names_are_systemd_credential_names() {
    let long = "a".repeat(256);
    for name in [
        "\"a/b\"",
        "\"a:b\"",
        "\"\"",
        "\"..\"",
        "\"a b\"",
        &format!("\"{long}\""),
    ] {
        let r = errors(&format!(
            "{MINIMAL}credentials = {{ {name} = \"/etc/citadel/credentials/x\" }}\n"
        ));
        assert_has(&r, &["is not a valid credential name", "citadel.toml:4:17"]);
    }
    let ok = format!(
        "{MINIMAL}credentials = {{ \"hf-token.v2_x\" = \"/etc/citadel/credentials/x\" }}\n"
    );
    assert!(parse(&ok, Path::new(FILE)).is_ok());
}

#[test]
fn issue9_env_names_and_values_are_checked() {
    let r = errors(&format!(
        "{MINIMAL}env = {{ \"1X\" = \"a\", \"A-B\" = \"b\", OK = \"c\\r\\nD=e\" }}\n"
    ));
    assert_has(
        &r,
        &[
            "`1X` is not a valid environment variable name",
            "`A-B` is not a valid environment variable name",
            "the value of `OK` contains the control character U+000D (carriage return)",
            "3 error(s)",
        ],
    );
}

#[test]
fn issue9_health_path_cannot_split_the_request_line() {
    for (path, needle) in [
        ("\"/health\\r\\nX-Injected: 1\"", "U+000D"),
        ("\"/a b\"", "a space"),
        ("\"health\"", "must start with `/`"),
        ("\"/h\u{e9}\"", "U+00E9"),
    ] {
        let r = errors(&format!("{MINIMAL}health_path = {path}\n"));
        assert_has(
            &r,
            &[needle, "citadel.toml:4:15", "models.phi3.health_path"],
        );
    }
}

/// Issue 9, item 3: these panicked (`Duration::from_secs_f64`) or validated and
/// then overflowed in the renderer; now they are errors with a place.
#[test]
fn issue9_huge_spans_are_errors_not_panics() {
    let r = errors(&format!(
        "[gateway]\ndrain_timeout = \"18446744073709549568s 2047s\"\n{MINIMAL}stop_timeout = \"99999999999999999999s\"\nstart_timeout = \"1e400\"\n"
    ));
    assert_has(
        &r,
        &[
            "`18446744073709549568s 2047s` is out of range",
            "citadel.toml:2:17",
            "`99999999999999999999s` is out of range",
            "citadel.toml:6:16",
            "unknown time unit `e`",
            "citadel.toml:7:17",
        ],
    );
    for (key, value) in [
        ("memory_max", "\"99999999999999999999999T\""),
        ("cpus", "nan"),
        ("cpus", "inf"),
        ("cpus", "1e400"),
        ("tasks_max", "99999999999999999"),
    ] {
        let text = format!("{MINIMAL}{key} = {value}\n");
        match parse(&text, Path::new(FILE)) {
            Ok(_) => panic!("{key} = {value} accepted"),
            Err(ConfigError::Invalid(rep)) => {
                assert!(rep.errors().all(|d| d.span.is_some()), "{rep}")
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Issue 9, item 4: `watchdog = "500us"` rendered `WatchdogSec=0` (off). Such
/// spans are now below each setting's minimum, and spans render exactly.
#[test]
fn issue9_sub_millisecond_spans_are_refused_not_zero() {
    let r = errors(&format!(
        "{MINIMAL}watchdog = \"500us\"\nstart_timeout = \"500us\"\nprobe_interval = \"1us\"\n"
    ));
    assert_has(
        &r,
        &[
            "models.phi3.watchdog = 500us is too short (at least 1s)",
            "models.phi3.start_timeout = 500us is too short (at least 1s)",
            "models.phi3.probe_interval = 1us is too short (at least 100ms)",
            "citadel.toml:4:12",
        ],
    );
    let t = citadel_config::units::Timespan::parse("1s 500us").unwrap();
    assert_eq!(t.to_systemd(), "1s 500us");
}

/// Issue 9, item 5: two models sharing an alias, or an alias that is another
/// model's name, validated; the gateway then routed to either.
#[test]
fn issue9_alias_collisions_name_both_models() {
    let r = errors(
        "[models.a]\nport = 11400\nengine = \"sim\"\naliases = [\"gpt\"]\n[models.b]\nport = 11401\nengine = \"sim\"\naliases = [\"gpt\", \"a\"]\n",
    );
    assert_has(
        &r,
        &[
            "alias `gpt` of model `b` is also an alias of model `a`",
            "citadel.toml:8:12",
            "alias `a` of model `b` is the name of model `a`",
            "citadel.toml:8:19",
            "2 error(s)",
        ],
    );
    let w = warnings("[models.a]\nport = 11400\nengine = \"sim\"\naliases = [\"a\"]\n");
    assert_has(&w, &["warning: alias `a` of model `a` is its own name"]);
}

/// Issue 9, item 6: a misspelled key, a bad `listen` and a duplicate port
/// reported one error (the first), with an empty key.
#[test]
fn issue9_one_schema_error_does_not_hide_others() {
    let text = "[gateway]\nlisten = \"localhost\"\n[models.a]\nport = 11400\nengine = \"sim\"\n[models.b]\nport = 11400\nengine = \"sim\"\nmemroy_max = \"1G\"\n";
    let rep = report(text);
    assert_eq!(rep.errors().count(), 3, "{rep}");
    let unknown = rep
        .errors()
        .find(|d| d.message.contains("memroy_max"))
        .expect("unknown key reported");
    assert_eq!(unknown.key, "models.b.memroy_max");
    assert_eq!(
        unknown.span,
        Some(text.find("memroy_max").unwrap()..text.find("memroy_max").unwrap() + 10)
    );
    assert_has(
        &rep.to_string(),
        &[
            "unknown field `memroy_max` in [models.b]",
            "citadel.toml:9:1  (models.b.memroy_max)",
            "did you mean `memory_max`?",
            "`localhost` is not an IP address",
            "port 11400 is already used by model `a`",
        ],
    );
}

#[test]
fn issue9_type_errors_name_the_key_and_do_not_hide_others() {
    let rep = report(
        "[gateway]\nport = \"8000\"\nauth = \"yes\"\n[models.a]\nport = \"11400\"\nengine = \"sim\"\nargs = [\"--x\", 1]\nmemory_max = \"lots\"\n[gatway]\n",
    );
    let text = rep.to_string();
    assert_has(
        &text,
        &[
            "invalid type for `gateway.port`: expected an integer, found a string",
            "citadel.toml:2:8  (gateway.port)",
            "invalid type for `gateway.auth`",
            "invalid type for `models.a.port`",
            "invalid type for `models.a.args`: expected a string in the array, found an integer",
            "citadel.toml:7:16",
            "`lots` is not a size",
            "unknown field `gatway` in the top level",
            "did you mean `gateway`?",
            "6 error(s)",
        ],
    );
    // The port's type error is the only word about it: not also "has no port".
    assert!(!text.contains("has no port"), "{text}");
}

/// Issue 9, item 11: one byte of memory, fractional bytes, a busy-loop probe,
/// slowloris protection off and an 8-exabyte body were accepted.
#[test]
fn issue9_weak_limits_have_sane_ranges() {
    let r = errors(&format!(
        "[gateway]\nprobe_interval = \"1us\"\nheader_timeout = \"1000d\"\nmax_body = \"8000000T\"\nrequest_timeout = \"2d\"\ndrain_timeout = \"2h\"\nwatchdog = \"500ms\"\n{MINIMAL}memory_max = \"1\"\nmemory_high = \"1.5\"\nstop_timeout = \"2h\"\n"
    ));
    assert_has(
        &r,
        &[
            "gateway.probe_interval = 1us is too short (at least 100ms)",
            "`1000d` is out of range (at most 365d)",
            "`8000000T` is out of range",
            "gateway.request_timeout = 2d is out of range (at most 1d)",
            "gateway.drain_timeout = 2h is out of range (at most 1h)",
            "gateway.watchdog = 500ms is too short (at least 1s)",
            "models.phi3.memory_max = 1 is out of range (1M to 1024T)",
            "`1.5` is not a whole number of bytes",
            "models.phi3.stop_timeout = 2h is out of range (at most 1h)",
            "9 error(s)",
        ],
    );
    let r = errors(&format!(
        "[gateway]\nheader_timeout = \"10min\"\nmax_body = \"2G\"\n{MINIMAL}"
    ));
    assert_has(
        &r,
        &[
            "gateway.header_timeout = 10min is out of range (at most 5min): a client that trickles",
            "gateway.max_body = 2G is out of range (1K to 1G)",
            "buffers a whole request body",
        ],
    );
    // The bounds leave room for what the project's own tests use.
    let ok = format!("[gateway]\nprobe_interval = \"100ms\"\nheader_timeout = \"1s\"\nmax_body = \"1K\"\n{MINIMAL}probe_interval = \"100ms\"\nstop_timeout = \"1s\"\nwatchdog = \"1s\"\nmemory_max = \"96M\"\n");
    assert!(parse(&ok, Path::new(FILE)).is_ok());
}

/// Issue 9, item 11: port 0's message said "use 1024 to 65535" while 1 was
/// accepted silently for the gateway.
#[test]
fn issue9_gateway_port_message_and_privileged_port_warning() {
    let r = errors(&format!("[gateway]\nport = 0\n{MINIMAL}"));
    assert_has(
        &r,
        &["port 0 is out of range; use a number from 1 to 65535"],
    );
    let w = warnings(&format!("[gateway]\nport = 1\n{MINIMAL}"));
    assert_has(
        &w,
        &[
            "warning: gateway port 1 is privileged and not an HTTP port",
            "citadel.toml:2:8",
        ],
    );
    // 443 is what an operator means; the renderer keeps CAP_NET_BIND_SERVICE for it.
    let quiet = parse(
        &format!("[gateway]\nport = 443\n{MINIMAL}"),
        Path::new(FILE),
    )
    .unwrap();
    assert!(quiet.report.is_empty(), "{}", quiet.report);
    let r = errors("[models.a]\nport = 1023\nengine = \"sim\"\n");
    assert_has(&r, &["port 1023 is privileged"]);
}

/// Issue 9, item 12: `failure` collides with citadel-failure@.service and
/// CITADEL_SERVICE=failure.
#[test]
fn issue9_reserved_model_name_failure() {
    let r = errors("[models.failure]\nport = 11400\nengine = \"sim\"\n");
    assert_has(
        &r,
        &[
            "model name `failure` is reserved (the failure-report unit citadel-failure@.service",
            "citadel.toml:1:9",
        ],
    );
}

/// Issue 14: `unknown` is the gateway's metrics label for a model it does not
/// serve; neither a model nor an alias may take it.
#[test]
fn issue14_unknown_is_reserved_for_the_metrics_label() {
    let r = errors("[models.unknown]\nport = 11400\nengine = \"sim\"\n");
    assert_has(
        &r,
        &["model name `unknown` is reserved (the gateway's metrics label"],
    );
    let r = errors("[models.a]\nport = 11400\nengine = \"sim\"\naliases = [\"Unknown\"]\n");
    assert_has(&r, &["alias `Unknown` is reserved", "citadel.toml:4:"]);
}

/// Issue 9, item 15: `Gateway`, unit names and `citadel-...` made the CLI's
/// SERVICE resolution ambiguous.
#[test]
fn issue9_model_names_that_look_like_units_or_reserved_names_are_refused() {
    for (name, needle) in [
        ("Gateway", "is reserved"),
        ("API-GATEWAY", "is reserved"),
        ("All", "is reserved"),
        ("citadel-gateway.service", "looks like a unit name"),
        ("citadel.target", "looks like a unit name"),
        ("x.socket", "looks like a unit name"),
        ("m.automount", "looks like a unit name"),
        ("citadel-gateway", "starts with `citadel-`"),
        ("Citadel-x", "starts with `citadel-`"),
    ] {
        let r = errors(&format!(
            "[models.\"{name}\"]\nport = 11400\nengine = \"sim\"\n"
        ));
        assert_has(&r, &[needle, "citadel.toml:1:9"]);
    }
    assert!(parse(
        "[models.servicex]\nport = 11400\nengine = \"sim\"\n",
        Path::new(FILE)
    )
    .is_ok());
}

/// Issue 9, item 15: system accounts and privileged groups were accepted.
#[test]
fn issue9_system_accounts_and_privileged_groups_are_refused() {
    for (key, name) in [
        ("group", "shadow"),
        ("group", "disk"),
        ("group", "sudo"),
        ("group", "adm"),
        ("group", "wheel"),
        ("group", "docker"),
        ("group", "systemd-journal"),
        ("group", "kmem"),
        ("group", "tty"),
        ("user", "daemon"),
        ("user", "nobody"),
        ("user", "bin"),
        ("user", "sys"),
    ] {
        let r = errors(&format!("[service]\n{key} = \"{name}\"\n{MINIMAL}"));
        assert_has(
            &r,
            &[
                &format!("`{name}` is a system account or group"),
                "citadel.toml:2:",
                &format!("service.{key}"),
            ],
        );
    }
    for group in ["video", "render", "llm"] {
        let text = format!("[service]\ngroup = \"{group}\"\n{MINIMAL}");
        assert!(parse(&text, Path::new(FILE)).is_ok(), "{group}");
    }
}

/// Issue 9, item 13: `home = "/srv"` with `credentials = "/etc/ssl"` validated;
/// install then chmodded /etc/ssl to 0700 and purge deleted all of /srv.
#[test]
fn issue9_system_directories_cannot_be_managed_dirs() {
    let r = errors(&format!(
        "[paths]\nhome = \"/srv\"\ncredentials = \"/etc/ssl\"\nmodels = \"/usr/share/models\"\n{MINIMAL}"
    ));
    assert_has(
        &r,
        &[
            "paths.home `/srv` is a system directory",
            "citadel.toml:2:8",
            "paths.credentials `/etc/ssl` is a system directory",
            "citadel.toml:3:15",
            "paths.models `/usr/share/models` is inside /usr",
        ],
    );
    for (key, dir) in [
        ("credentials", "/etc"),
        ("home", "/"),
        ("home", "/var/lib"),
        ("home", "/data"),
        ("home", "/home/alice"),
        ("credentials", "/etc/ssl/private"),
        ("models", "/run/models"),
    ] {
        let r = errors(&format!("[paths]\n{key} = \"{dir}\"\n{MINIMAL}"));
        assert_has(&r, &[&format!("paths.{key} `{dir}`"), "citadel.toml:2:"]);
    }
    let r = errors(&format!(
        "[gateway]\napi_keys_file = \"/etc/sudoers.d/citadel\"\n{MINIMAL}"
    ));
    assert_has(
        &r,
        &["the directory of api_keys_file, `/etc/sudoers.d`, is a system directory"],
    );
    // Overlaps that break the services.
    let r = errors(&format!(
        "[paths]\nhome = \"/opt/citadel\"\nmodels = \"/opt/citadel\"\ncredentials = \"/opt/citadel/creds\"\n{MINIMAL}"
    ));
    assert_has(&r, &["paths.models is the same directory as paths.home"]);
    let r = errors(&format!(
        "[paths]\nmodels = \"/etc/citadel/credentials/models\"\n{MINIMAL}"
    ));
    assert_has(&r, &["is inside paths.credentials"]);
}

#[test]
fn issue9_managed_dirs_lists_what_citadel_creates() {
    let loaded = parse(citadel_config::EXAMPLE_CONFIG, Path::new(FILE)).unwrap();
    let dirs: Vec<String> = loaded
        .settings
        .managed_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    assert_eq!(
        dirs,
        [
            "/opt/citadel",
            "/opt/citadel/bin",
            "/opt/citadel/config",
            "/opt/citadel/config/systemd",
            "/opt/citadel/models",
            "/etc/citadel/credentials",
            "/var/lib/citadel",
            "/var/cache/citadel",
        ]
    );
}

/// Which diagnostics may lack a place: only whole-file problems.
fn check_report(rep: &Report) -> Result<(), String> {
    let _ = rep.to_string();
    for d in &rep.diagnostics {
        if d.span.is_none() && d.message != "no models are configured" {
            return Err(format!("diagnostic without a place: {d:?}"));
        }
        if d.severity == Severity::Error && d.key.is_empty() && d.span.is_none() {
            return Err(format!("error with neither key nor place: {d:?}"));
        }
    }
    Ok(())
}

/// Every string of a `Settings` that can reach a rendered file or the engine.
fn all_strings(s: &citadel_config::Settings) -> Vec<String> {
    use citadel_config::Engine;
    let mut out: Vec<String> = vec![
        s.paths.home.display().to_string(),
        s.paths.models.display().to_string(),
        s.paths.credentials.display().to_string(),
        s.gateway.api_keys_file.display().to_string(),
        s.service.user.clone(),
        s.service.group.clone(),
    ];
    out.extend(s.gateway.cors_origins.iter().cloned());
    for m in &s.models {
        out.push(m.name.to_string());
        out.push(m.health_path.clone());
        out.extend(m.args.iter().cloned());
        out.extend(m.aliases.iter().cloned());
        out.extend(m.replicas.iter().cloned());
        out.extend(m.env.iter().flat_map(|(k, v)| [k.clone(), v.clone()]));
        out.extend(
            m.credentials
                .iter()
                .flat_map(|(k, v)| [k.clone(), v.display().to_string()]),
        );
        match &m.engine {
            Engine::Vllm { python, model, .. } => {
                out.extend([python.display().to_string(), model.clone()])
            }
            Engine::LlamaCpp { binary, model, .. } => {
                out.extend([binary.display().to_string(), model.display().to_string()])
            }
            Engine::Ollama { binary, model } | Engine::Tgi { binary, model } => {
                out.extend([binary.display().to_string(), model.clone()])
            }
            Engine::Command { argv, health_path } => {
                out.extend(argv.iter().cloned());
                out.push(health_path.clone());
            }
            Engine::Sim { binary } => out.push(binary.display().to_string()),
        }
    }
    out
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// Values an attacker or a careless operator might write.
    fn hostile_string() -> impl Strategy<Value = String> {
        prop_oneof![
            "\\PC{0,12}",
            "[ -~]{0,16}",
            "/[a-z%. \\n\\r\\t\\\\$\"'/-]{0,16}",
            Just("99999999999999999999s".to_owned()),
            Just("18446744073709549568s 2047s".to_owned()),
            Just("1e400".to_owned()),
            Just("NaN".to_owned()),
            Just("500us".to_owned()),
            Just("1.5".to_owned()),
            Just("8000000T".to_owned()),
            Just("/etc/x\nExecStartPre=/bin/sh -c id".to_owned()),
            Just("Gateway".to_owned()),
            Just("citadel.target".to_owned()),
            Just("\u{0}".to_owned()),
            Just("日本語".to_owned()),
        ]
    }

    fn hostile_value() -> impl Strategy<Value = String> {
        prop_oneof![
            hostile_string().prop_map(|s| toml_str(&s)),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}").replace("NaN", "nan")),
            Just("nan".to_owned()),
            Just("-inf".to_owned()),
            Just("true".to_owned()),
            proptest::collection::vec(hostile_string(), 0..3).prop_map(|v| format!(
                "[{}]",
                v.iter().map(|s| toml_str(s)).collect::<Vec<_>>().join(", ")
            )),
            (hostile_string(), hostile_string()).prop_map(|(k, v)| format!(
                "{{ {} = {} }}",
                toml_str(&k),
                toml_str(&v)
            )),
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        let known: Vec<&'static str> = citadel_config::raw::MODEL_KEYS
            .iter()
            .chain(citadel_config::raw::GATEWAY_KEYS)
            .chain(citadel_config::raw::PATHS_KEYS)
            .chain(citadel_config::raw::SERVICE_KEYS)
            .copied()
            .collect();
        prop_oneof![
            4 => proptest::sample::select(known).prop_map(str::to_owned),
            1 => "[a-z_]{1,12}",
        ]
    }

    fn section() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("[paths]".to_owned()),
            Just("[service]".to_owned()),
            Just("[gateway]".to_owned()),
            Just("[model_defaults]".to_owned()),
            hostile_string().prop_map(|n| format!("[models.{}]", toml_str(&n))),
            Just("[models.a]".to_owned()),
            Just("[models.b]".to_owned()),
        ]
    }

    /// A config of valid TOML shape with hostile keys and values.
    fn structured() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            (
                section(),
                proptest::collection::vec((key(), hostile_value()), 0..5),
            ),
            0..4,
        )
        .prop_map(|sections| {
            let mut text = String::from(MINIMAL);
            for (header, entries) in sections {
                text.push_str(&header);
                text.push('\n');
                for (k, v) in entries {
                    text.push_str(&format!("{k} = {v}\n"));
                }
            }
            text
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Issue 9, item 3: `parse` never panics on arbitrary text, and every
        /// diagnostic has a place unless it is about the whole file.
        #[test]
        fn issue9_parse_never_panics_on_arbitrary_text(text in "\\PC{0,200}") {
            match parse(&text, Path::new(FILE)) {
                Ok(l) => prop_assert!(check_report(&l.report).is_ok()),
                Err(ConfigError::Invalid(rep)) => {
                    let checked = check_report(&rep);
                    prop_assert!(checked.is_ok(), "{:?}", checked);
                }
                Err(e) => prop_assert!(false, "unexpected error {}", e),
            }
        }

        #[test]
        fn issue9_parse_never_panics_on_toml_ish_text(
            lines in proptest::collection::vec("(\\[[a-z_.\"]{0,20}\\]|[a-z_]{1,14} = (\"[^\"\\\\]{0,20}\"|[0-9.e+-]{1,25}|\\[.{0,10}\\]|\\{.{0,10}\\}|true))", 0..12)
        ) {
            let text = format!("{MINIMAL}{}\n", lines.join("\n"));
            match parse(&text, Path::new(FILE)) {
                Ok(l) => prop_assert!(check_report(&l.report).is_ok()),
                Err(ConfigError::Invalid(rep)) => {
                    let checked = check_report(&rep);
                    prop_assert!(checked.is_ok(), "{:?}", checked);
                }
                Err(e) => prop_assert!(false, "unexpected error {}", e),
            }
        }

        /// Structured configs with hostile values: never a panic, every error
        /// placed, and whatever is accepted holds no control character.
        #[test]
        fn issue9_parse_structured_hostile_configs(text in structured()) {
            match parse(&text, Path::new(FILE)) {
                Ok(l) => {
                    prop_assert!(check_report(&l.report).is_ok());
                    let s = &l.settings;
                    for t in all_strings(s) {
                        prop_assert!(!t.chars().any(|c| c.is_control()), "{:?}", t);
                    }
                    for p in [&s.paths.home, &s.paths.models, &s.paths.credentials] {
                        let p = p.to_string_lossy();
                        prop_assert!(!p.contains(['%', ' ', '\n']), "{}", p);
                    }
                    for m in &s.models {
                        prop_assert!(!m.health_path.contains([' ', '\r', '\n']));
                        for t in [m.start_timeout, m.stop_timeout, m.watchdog, m.probe_interval] {
                            prop_assert!(t.to_systemd() != "0");
                            prop_assert!(t <= citadel_config::units::Timespan::MAX);
                        }
                    }
                }
                Err(ConfigError::Invalid(rep)) => {
                    let checked = check_report(&rep);
                    prop_assert!(checked.is_ok(), "{:?}", checked);
                }
                Err(e) => prop_assert!(false, "unexpected error {}", e),
            }
        }
    }
}

/// Issue 9, item 3: deeply nested values are a syntax error, not a stack overflow.
#[test]
fn issue9_deeply_nested_values_do_not_overflow_the_stack() {
    for (open, close) in [("[", "]"), ("{a=", "}")] {
        let text = format!(
            "{MINIMAL}args = {}{}\n",
            open.repeat(100_000),
            close.repeat(100_000)
        );
        assert!(parse(&text, Path::new(FILE)).is_err());
    }
}
