//! Issue 10, items 2 and 3, offline: `install` into a temporary root keeps
//! the operator's enablement (a reinstall does not undo `disable`), and
//! `uninstall` removes the modules-load.d file it generated. Host tools are
//! fakes first on PATH that run the real one only when given a root.

mod harness;

use std::path::{Path, PathBuf};

use harness::Cli;

const TWO: &str =
    "[models.a]\nport = 11400\nengine = \"sim\"\n[models.b]\nport = 11401\nengine = \"sim\"\n";

/// Fakes of host tools (see `offline.rs`): each records its argv and runs the
/// real tool only when it was given a root.
fn fake_tools(cli: &Cli) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = cli.path("/fake-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let log = cli.path("/tools.log");
    for (name, real) in [
        ("systemd-sysusers", "/usr/bin/systemd-sysusers"),
        ("systemd-tmpfiles", "/usr/bin/systemd-tmpfiles"),
        ("systemctl", "/usr/bin/systemctl"),
        ("userdel", "/usr/sbin/userdel"),
        ("groupdel", "/usr/sbin/groupdel"),
    ] {
        let script = format!(
            "#!/bin/sh\necho \"{name} $*\" >> '{}'\ncase \" $* \" in *\" --root\"*) exec {real} \"$@\";; esac\nexit 0\n",
            log.display()
        );
        let p = dir.join(name);
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

fn as_root() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if !root {
        eprintln!("skipped: installing into a temporary root needs root (chown)");
    }
    root
}

fn install(cli: &Cli, fakes: &Path) -> String {
    let bin_dir = harness::bin_dir();
    let out = cli.run_with_path(fakes, &["install", "--bin-dir", bin_dir.to_str().unwrap()]);
    out.expect_code(0);
    out.stdout()
}

/// `systemctl --root=ROOT is-enabled UNIT`.
fn is_enabled(cli: &Cli, unit: &str) -> String {
    let out = std::process::Command::new("systemctl")
        .arg(format!("--root={}", cli.root().display()))
        .args(["is-enabled", unit])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Issue 10, item 2: a reinstall re-enabled every model, so `disable` did
/// not stick. Now a reinstall leaves a disabled model disabled, enables a
/// model added to the config, and an install after `uninstall` enables
/// again what uninstall disabled.
#[test]
fn issue10_reinstall_keeps_a_disabled_model_disabled() {
    if !as_root() {
        return;
    }
    let cli = Cli::new();
    cli.write_config(TWO);
    let fakes = fake_tools(&cli);
    install(&cli, &fakes);
    for u in [
        "citadel.target",
        "citadel-gateway.service",
        "citadel-model@a.service",
        "citadel-model@b.service",
    ] {
        assert_eq!(is_enabled(&cli, u), "enabled", "{u}");
    }
    let st = std::process::Command::new("systemctl")
        .arg(format!("--root={}", cli.root().display()))
        .args(["--quiet", "disable", "citadel-model@b.service"])
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(is_enabled(&cli, "citadel-model@b.service"), "disabled");

    let out = install(&cli, &fakes);
    assert!(out.contains("no new units to enable"), "{out}");
    assert!(out.contains("kept as it was"), "{out}");
    assert_eq!(
        is_enabled(&cli, "citadel-model@b.service"),
        "disabled",
        "a reinstall enabled the disabled model:\n{out}"
    );
    assert_eq!(is_enabled(&cli, "citadel-model@a.service"), "enabled");

    // A model added to the config is enabled; b stays disabled.
    cli.write_config(&format!(
        "{TWO}[models.c]\nport = 11402\nengine = \"sim\"\n"
    ));
    let out = install(&cli, &fakes);
    assert!(out.contains("1 new units enabled (c)"), "{out}");
    assert_eq!(is_enabled(&cli, "citadel-model@c.service"), "enabled");
    assert_eq!(is_enabled(&cli, "citadel-model@b.service"), "disabled");

    // uninstall disables everything; the next install starts afresh.
    cli.run_with_path(&fakes, &["uninstall"]).expect_code(0);
    install(&cli, &fakes);
    assert_eq!(is_enabled(&cli, "citadel-model@b.service"), "enabled");
    assert_eq!(is_enabled(&cli, "citadel.target"), "enabled");
}

/// Issue 10, item 3 (with item 5's modules-load.d entry): `uninstall` left
/// the generated `/usr/local/lib/modules-load.d/citadel-nvidia.conf`
/// behind. It goes with the units now; an operator's file there stays.
#[test]
fn issue10_uninstall_removes_the_generated_modules_load_file() {
    if !as_root() {
        return;
    }
    let cli = Cli::new();
    cli.write_config(TWO);
    let fakes = fake_tools(&cli);
    install(&cli, &fakes);
    // What an install with GPU models wrote (rendered without a driver here).
    let ours = cli.path("/usr/local/lib/modules-load.d/citadel-nvidia.conf");
    let mine = cli.path("/usr/local/lib/modules-load.d/operator.conf");
    std::fs::create_dir_all(ours.parent().unwrap()).unwrap();
    std::fs::write(
        &ours,
        format!(
            "{}/opt/citadel/config/citadel.toml. Do not edit\nnvidia\nnvidia-uvm\n",
            citadel_render::GENERATED_MARK
        ),
    )
    .unwrap();
    std::fs::write(&mine, "nvidia\n").unwrap();
    // A reinstall of a config without GPUs removes it as stale ...
    let out = install(&cli, &fakes);
    assert!(
        out.contains(&format!("remove   {}", ours.display())),
        "{out}"
    );
    assert!(!ours.exists());
    // ... and so does uninstall.
    std::fs::write(
        &ours,
        format!("{}x. Do not edit\nnvidia\n", citadel_render::GENERATED_MARK),
    )
    .unwrap();
    let out = cli.run_with_path(&fakes, &["uninstall"]);
    out.expect_code(0);
    assert!(!ours.exists(), "{}", out.stdout());
    assert!(mine.exists(), "uninstall removed an operator's file");
}
