//! Issue 15, item 5: `citadel-model run NAME:surge` is model NAME on the port
//! in `CITADEL_SURGE_PORT` (the runtime drop-in `citadel-systemd restart
//! --surge` writes); without a usable port it is a config failure (exit 78),
//! which the unit does not restart.

use std::process::Output;

const CONFIG: &str = "[models.phi3]\nport = 11403\nengine = \"sim\"\nbinary = \"/opt/x/sim\"\n\n[models.other]\nport = 11404\nengine = \"sim\"\nbinary = \"/opt/x/sim\"\n";

fn command(name: &str, port: Option<&str>) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("citadel.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_citadel-model"));
    cmd.args(["command", name])
        .env("CITADEL_CONFIG", &config)
        .env_remove("CITADEL_SURGE_PORT");
    if let Some(p) = port {
        cmd.env("CITADEL_SURGE_PORT", p);
    }
    cmd.output().unwrap()
}

#[test]
fn issue15_surge_instance_runs_the_model_on_the_surge_port() {
    let out = command("phi3:surge", Some("11500"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("11500"), "{stdout}");
    assert!(!stdout.contains("11403"), "{stdout}");
}

#[test]
fn issue15_surge_instance_without_a_usable_port_exits_78() {
    for (port, says) in [
        (None, "CITADEL_SURGE_PORT"),
        (Some("eleven"), "not a number"),
        (Some("0"), "CITADEL_SURGE_PORT"),
        (Some("70000"), "CITADEL_SURGE_PORT"),
        (Some("11404"), "already uses"),
    ] {
        let out = command("phi3:surge", port);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{port:?}: {stderr}");
        assert!(stderr.contains(says), "{port:?}: {stderr}");
    }
    let out = command("nope:surge", Some("11500"));
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("model `nope` is not in"));
}
