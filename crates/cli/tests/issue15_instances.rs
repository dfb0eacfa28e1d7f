//! Issue 15, item 1, offline: a model with several local instances through
//! the CLI. `install` into a temporary root installs one drop-in per instance
//! and enables each new instance unit once (a `disable` of an instance
//! sticks, as for a model); an instance removed from the config loses its
//! drop-in and its enablement; `uninstall` disables every instance. SERVICE
//! names: `logs phi3` covers every unit of the model, `logs phi3:2` one
//! instance, `phi3:3` is refused naming the instances there are. Host tools
//! are fakes first on PATH that record their arguments and run the real tool
//! only when given a root.

mod harness;

use std::path::{Path, PathBuf};

use harness::Cli;

/// phi3 with a second local instance, and a plain model.
const TWO_INSTANCES: &str = "[models.phi3]\nport = 11403\nengine = \"sim\"\n\
     [[models.phi3.instances]]\nport = 11413\n\
     [models.tiny]\nport = 11404\nengine = \"sim\"\n";

/// The same stack without phi3's second instance.
const ONE_INSTANCE: &str = "[models.phi3]\nport = 11403\nengine = \"sim\"\n\
     [models.tiny]\nport = 11404\nengine = \"sim\"\n";

const VENDOR: &str = "/usr/local/lib/systemd/system";

/// Fakes of host tools (see `issue10_install.rs`): each records its argv in
/// /tools.log and runs the real tool only when it was given a root;
/// `journalctl` only records.
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
        ("journalctl", "/bin/false"),
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

fn tool_log(cli: &Cli) -> String {
    std::fs::read_to_string(cli.path("/tools.log")).unwrap_or_default()
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

fn drop_in(cli: &Cli, unit: &str) -> PathBuf {
    cli.path(&format!("{VENDOR}/{unit}.d/50-citadel.conf"))
}

/// Install, reinstall after `disable`, an instance removed from the config,
/// uninstall: each instance unit is installed and enabled like a model.
#[test]
fn issue15_install_layout_with_a_two_instance_model() {
    if !as_root() {
        return;
    }
    let cli = Cli::new();
    cli.write_config(TWO_INSTANCES);
    let fakes = fake_tools(&cli);
    let out = install(&cli, &fakes);
    let second = "citadel-model@phi3:2.service";
    for unit in [
        "citadel-model@phi3.service",
        second,
        "citadel-model@tiny.service",
    ] {
        let text = std::fs::read_to_string(drop_in(&cli, unit))
            .unwrap_or_else(|e| panic!("{unit}: no drop-in ({e}):\n{out}"));
        assert!(
            text.contains("LogExtraFields=CITADEL_SERVICE="),
            "{unit}:\n{text}"
        );
        assert_eq!(is_enabled(&cli, unit), "enabled", "{unit}\n{out}");
    }
    let text = std::fs::read_to_string(drop_in(&cli, second)).unwrap();
    assert!(text.contains("CITADEL_INSTANCE=phi3:2"), "{text}");
    assert!(
        text.contains("11413"),
        "instance 2 runs on its own port:\n{text}"
    );
    assert!(
        out.contains("phi3:2"),
        "the enabled units name the instance:\n{out}"
    );
    // No unit named after the second instance exists besides the template's
    // instance: the drop-in is all there is.
    assert!(!cli.path(&format!("{VENDOR}/{second}")).exists());
    let record =
        std::fs::read_to_string(cli.path("/var/lib/citadel-systemd/installed.json")).unwrap();
    assert!(
        record.contains(&format!("{VENDOR}/{second}.d/50-citadel.conf")),
        "{record}"
    );

    // The operator disables the second instance: a reinstall keeps it so.
    let st = std::process::Command::new("systemctl")
        .arg(format!("--root={}", cli.root().display()))
        .args(["--quiet", "disable", second])
        .status()
        .unwrap();
    assert!(st.success());
    let out = install(&cli, &fakes);
    assert!(out.contains("no new units to enable"), "{out}");
    assert_eq!(is_enabled(&cli, second), "disabled", "{out}");
    assert_eq!(is_enabled(&cli, "citadel-model@phi3.service"), "enabled");

    // Enabled again and then removed from the config: its drop-in goes, it
    // is disabled (offline: nothing runs to stop), instance 1 is untouched.
    let st = std::process::Command::new("systemctl")
        .arg(format!("--root={}", cli.root().display()))
        .args(["--quiet", "enable", second])
        .status()
        .unwrap();
    assert!(st.success());
    cli.write_config(ONE_INSTANCE);
    let out = install(&cli, &fakes);
    assert!(
        out.contains(&format!("remove   {}", drop_in(&cli, second).display())),
        "{out}"
    );
    assert!(!drop_in(&cli, second).exists());
    assert_ne!(is_enabled(&cli, second), "enabled", "{out}");
    assert!(
        tool_log(&cli).contains(&format!("disable {second}")),
        "{}",
        tool_log(&cli)
    );
    assert!(drop_in(&cli, "citadel-model@phi3.service").exists());
    assert_eq!(is_enabled(&cli, "citadel-model@phi3.service"), "enabled");
    let record =
        std::fs::read_to_string(cli.path("/var/lib/citadel-systemd/installed.json")).unwrap();
    assert!(!record.contains("phi3:2"), "{record}");

    // Added back: new to this install again, so enabled.
    cli.write_config(TWO_INSTANCES);
    let out = install(&cli, &fakes);
    assert!(out.contains("1 new units enabled (phi3:2)"), "{out}");
    assert_eq!(is_enabled(&cli, second), "enabled");

    // uninstall disables and removes every instance.
    cli.run_with_path(&fakes, &["uninstall"]).expect_code(0);
    for unit in ["citadel-model@phi3.service", second] {
        assert!(!drop_in(&cli, unit).exists(), "{unit}");
        assert_ne!(is_enabled(&cli, unit), "enabled", "{unit}");
    }
}

/// `logs` resolves SERVICE names to journalctl's `-u` arguments: a model's
/// name means each of its instance units and any other unit of it
/// (`citadel-model@phi3:*`: a surge instance, a removed one); an instance
/// name that one unit; an instance the model does not have is refused.
#[test]
fn issue15_logs_and_service_names_of_instances() {
    let cli = Cli::new();
    cli.write_config(TWO_INSTANCES);
    let fakes = fake_tools(&cli);
    cli.run_with_path(&fakes, &["logs", "phi3"]).expect_code(0);
    let log = tool_log(&cli);
    let line = log.lines().find(|l| l.starts_with("journalctl")).unwrap();
    assert!(
        line.contains(
            "-u citadel-model@phi3.service -u citadel-model@phi3:2.service -u citadel-model@phi3:*"
        ),
        "{line}"
    );
    assert!(!line.contains("tiny"), "{line}");

    std::fs::remove_file(cli.path("/tools.log")).unwrap();
    cli.run_with_path(&fakes, &["logs", "phi3:2"])
        .expect_code(0);
    let log = tool_log(&cli);
    let line = log.lines().find(|l| l.starts_with("journalctl")).unwrap();
    assert!(line.contains("-u citadel-model@phi3:2.service"), "{line}");
    assert!(!line.contains("phi3.service"), "{line}");
    assert!(!line.contains("phi3:*"), "{line}");

    let out = cli.run_with_path(&fakes, &["logs", "phi3:3"]);
    out.expect_code(2);
    assert!(
        out.stderr()
            .contains("model phi3 has 2 local instances (phi3, phi3:2)"),
        "{}",
        out.stderr()
    );
    let out = cli.run_with_path(&fakes, &["logs", "nothing"]);
    out.expect_code(2);
    assert!(
        out.stderr()
            .contains("valid services: phi3 (instances phi3, phi3:2), tiny, gateway"),
        "{}",
        out.stderr()
    );
}
