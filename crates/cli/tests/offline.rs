//! `init`, `render` and `validate` against a temporary root: the offline half of
//! the CLI, including systemd's own `systemd-analyze verify` and `security`.

mod harness;

use harness::{bin_dir, Cli};

const ONE_MODEL: &str = "[models.phi3]\nport = 11403\nengine = \"sim\"\n";

fn eight_models() -> String {
    let mut t = String::new();
    for i in 0..8 {
        t.push_str(&format!(
            "[models.m{i}]\nport = {}\nengine = \"sim\"\nmemory_max = \"1G\"\n",
            11400 + i
        ));
    }
    t
}

fn validate(cli: &Cli) -> harness::Run {
    let dir = bin_dir();
    cli.run(&["validate", "--bin-dir", dir.to_str().unwrap()])
}

#[test]
fn init_writes_the_example_and_refuses_to_overwrite() {
    let cli = Cli::new();
    cli.run(&["init"]).expect_code(0);
    let text = std::fs::read_to_string(cli.config_path()).unwrap();
    assert_eq!(text, citadel_config::EXAMPLE_CONFIG);
    std::fs::write(cli.config_path(), "# mine\n").unwrap();
    let again = cli.run(&["init"]);
    again.expect_code(2);
    assert!(
        again.stderr().contains("already exists"),
        "{}",
        again.stderr()
    );
    assert_eq!(
        std::fs::read_to_string(cli.config_path()).unwrap(),
        "# mine\n"
    );
}

#[test]
fn render_writes_every_file_and_is_idempotent() {
    let cli = Cli::new();
    cli.run(&["init"]).expect_code(0);
    let first = cli.run(&["render"]);
    first.expect_code(0);
    assert!(
        first.stdout().contains("rendered 14 files"),
        "{}",
        first.stdout()
    );
    let dir = cli.path("/opt/citadel/config/systemd");
    assert!(dir
        .join("citadel-model@mixtral.service.d/50-citadel.conf")
        .is_file());
    assert!(dir.join("sysusers.d/citadel.conf").is_file());
    // Issue 12, item 1: the gateway's socket and the engines' network namespace.
    assert!(dir.join("citadel-gateway.socket").is_file());
    assert!(dir.join("citadel-netns.service").is_file());
    // Issue 15: the gateway's admin socket.
    assert!(dir.join("citadel-gateway-admin.socket").is_file());
    // The example's models have GPUs: the NVIDIA modules are loaded at boot (issue 10, item 5).
    assert!(dir.join("modules-load.d/citadel-nvidia.conf").is_file());
    let second = cli.run(&["render"]);
    assert!(
        second.stdout().contains("(14 unchanged)"),
        "{}",
        second.stdout()
    );
    assert!(!second.stdout().contains("added"));
}

#[test]
fn render_removes_a_dropped_model_but_keeps_operator_files() {
    let cli = Cli::new();
    cli.write_config(&eight_models());
    cli.run(&["render"]).expect_code(0);
    let dir = cli.path("/opt/citadel/config/systemd");
    std::fs::write(
        dir.join("citadel-model@m7.service.d/override.conf"),
        "[Service]\nNice=5\n",
    )
    .unwrap();
    std::fs::write(dir.join("notes.txt"), "operator notes\n").unwrap();
    cli.write_config(ONE_MODEL);
    let out = cli.run(&["render"]);
    out.expect_code(0);
    assert!(out.stdout().contains("removed"), "{}", out.stdout());
    assert!(!dir.join("citadel-model@m0.service.d").exists());
    assert!(!dir
        .join("citadel-model@m7.service.d/50-citadel.conf")
        .exists());
    assert!(dir
        .join("citadel-model@m7.service.d/override.conf")
        .is_file());
    assert!(dir.join("notes.txt").is_file());
}

#[test]
fn render_out_dir() {
    let cli = Cli::new();
    cli.write_config(ONE_MODEL);
    let out = cli.path("/elsewhere");
    cli.run(&["render", "--out", out.to_str().unwrap()])
        .expect_code(0);
    assert!(out.join("citadel-gateway.service").is_file());
}

#[test]
fn validate_passes_on_the_example_stack() {
    let cli = Cli::new();
    cli.run(&["init"]).expect_code(0);
    let out = validate(&cli);
    out.expect_code(0);
    let s = out.stdout();
    assert!(s.contains("verify   systemd-analyze verify: ok"), "{s}");
    assert!(s.contains("validate: ok"), "{s}");
    assert_eq!(s.matches("(target <= 3.0) ok").count(), 4, "{s}");
    assert!(s.contains("citadel-gateway.service"), "{s}");
}

#[test]
fn validate_passes_on_one_and_eight_models() {
    for text in [ONE_MODEL.to_owned(), eight_models()] {
        let cli = Cli::new();
        cli.write_config(&text);
        let out = validate(&cli);
        out.expect_code(0);
        assert!(out.stdout().contains("validate: ok"));
    }
}

#[test]
fn validate_fails_with_located_errors() {
    let cli = Cli::new();
    cli.write_config("[models.a]\nport = 11400\nengine = \"sim\"\n[models.b]\nport = 11400\nengine = \"sim\"\nmemory_max = \"9 parsecs\"\n");
    let out = validate(&cli);
    out.expect_code(1);
    let err = out.stderr();
    let path = cli.config_path();
    assert!(err.contains(&format!("{}:5:8", path.display())), "{err}");
    assert!(
        err.contains("port 11400 is already used by model `a`"),
        "{err}"
    );
    assert!(err.contains("unknown size unit"), "{err}");
    assert!(out.stdout().contains("validate: FAILED"));
}

#[test]
fn validate_without_config_points_to_init() {
    let cli = Cli::new();
    let out = cli.run(&["validate"]);
    out.expect_code(2);
    assert!(
        out.stderr().contains("citadel-systemd init"),
        "{}",
        out.stderr()
    );
}

#[test]
fn validate_names_missing_binaries() {
    let cli = Cli::new();
    cli.write_config(ONE_MODEL);
    let empty = cli.path("/empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let out = cli.run(&["validate", "--bin-dir", empty.to_str().unwrap()]);
    out.expect_code(2);
    assert!(
        out.stderr().contains("was not found in"),
        "{}",
        out.stderr()
    );
}

#[test]
fn usage_errors_exit_2() {
    let cli = Cli::new();
    cli.run(&["frobnicate"]).expect_code(2);
}

#[test]
fn systemd_commands_refuse_clearly_without_systemd_as_pid1() {
    let cli = Cli::new();
    cli.write_config(ONE_MODEL);
    let out = cli.run(&["status"]);
    if std::path::Path::new("/run/systemd/system").is_dir() {
        // A host booted with systemd: units that do not exist are not running (exit 3).
        out.expect_code(3);
        return;
    }
    out.expect_code(2);
    let err = out.stderr();
    assert!(err.contains("systemd is not running as PID 1"), "{err}");
    assert!(
        err.contains("cargo xtask sandbox"),
        "points to the sandbox: {err}"
    );
}

/// Issue 9, item 7: `citadel-systemd render | true` exited 101 (the panic of
/// `println!` on a closed stdout). A closed stdout is a normal end: exit 0.
#[test]
fn issue9_broken_pipe_render_into_a_closed_stdout_exits_0() {
    let cli = Cli::new();
    for args in [&["init"][..], &["render"][..], &["render"][..]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader); // the reader is gone before the first write: EPIPE, not a race
        let out = cli
            .command(args)
            .stdout(writer)
            .output()
            .expect("run citadel-systemd");
        let run = harness::Run(out);
        run.expect_code(0);
        assert!(
            !run.stderr().contains("panicked"),
            "{args:?}: {}",
            run.stderr()
        );
    }
    // The files were written all the same: the listing is what got lost.
    assert!(cli
        .path("/opt/citadel/config/systemd/citadel-gateway.service")
        .is_file());
}

/// Issue 9, item 14: `install` did not validate; a `\r` or `\0` in an env value
/// and a newline in `paths.home` (an arbitrary tmpfiles.d line applied as root)
/// went straight through. Every command that writes or applies the config runs
/// `validate`'s offline checks first and refuses with exit 1 and a located
/// diagnostic, writing nothing.
#[test]
fn issue9_install_and_render_validate_first() {
    let cases = [
        (
            "[models.phi3]\nport = 11403\nengine = \"sim\"\nenv = { FOO = \"a\\rb\" }\n",
            ":4:",
        ),
        (
            "[models.phi3]\nport = 11403\nengine = \"sim\"\nenv = { FOO = \"a\\u0000b\" }\n",
            ":4:",
        ),
        (
            "[paths]\nhome = \"/opt/x\\nd /etc/evil 0777 root root -\"\n[models.phi3]\nport = 11403\nengine = \"sim\"\n",
            ":2:",
        ),
    ];
    let bin = harness::bin();
    let bin_dir = std::path::Path::new(bin)
        .parent()
        .unwrap()
        .to_str()
        .unwrap();
    for (config, place) in cases {
        let cli = Cli::new();
        cli.write_config(config);
        for args in [
            &["render"][..],
            &["install", "--dry-run", "--bin-dir", bin_dir][..],
        ] {
            let out = cli.run(args);
            out.expect_code(1);
            let err = out.stderr();
            // The config crate's own check or the CLI's: either names the place.
            assert!(err.contains("error:"), "{args:?}: {err}");
            let at = format!("{}{place}", cli.config_path().display());
            assert!(err.contains(&at), "{args:?}: no {at} in {err}");
        }
        let written: Vec<_> = walk(cli.root())
            .into_iter()
            .filter(|p| *p != cli.config_path())
            .collect();
        assert!(written.is_empty(), "{config:?} wrote {written:?}");
    }
}

/// Every file below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Issue 9, item 8: `render` overwrote a hand-written file at a rendered path
/// (reported as `changed`). Now it refuses, names the file and what to do,
/// exits 2 and writes nothing at all, not even the files without a conflict.
#[test]
fn issue9_operator_files_are_never_overwritten_by_render() {
    let cli = Cli::new();
    cli.write_config(ONE_MODEL);
    let dir = cli.path("/opt/citadel/config/systemd");
    std::fs::create_dir_all(&dir).unwrap();
    let mine = "[Unit]\nDescription=my own gateway\n";
    std::fs::write(dir.join("citadel-gateway.service"), mine).unwrap();
    let out = cli.run(&["render"]);
    out.expect_code(2);
    let err = out.stderr();
    assert!(
        err.contains(&dir.join("citadel-gateway.service").display().to_string()),
        "{err}"
    );
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(err.contains("Move each aside"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("citadel-gateway.service")).unwrap(),
        mine
    );
    assert!(!dir.join("citadel.target").exists(), "half-applied render");
}

/// Issue 9, item 8, for `install`: an operator's file at an installed path
/// (here the gateway's unit in the vendor layer, /usr/local/lib/systemd/system,
/// where install puts it since issue 10, item 3) stops the install before
/// anything happens; `--dry-run` reports the same refusal.
#[test]
fn issue9_operator_files_are_never_overwritten_by_install() {
    let cli = Cli::new();
    cli.write_config(ONE_MODEL);
    let unit = cli.path("/usr/local/lib/systemd/system/citadel-gateway.service");
    std::fs::create_dir_all(unit.parent().unwrap()).unwrap();
    let mine = "[Service]\nExecStart=/usr/local/bin/my-gateway\n";
    std::fs::write(&unit, mine).unwrap();
    let bin = harness::bin();
    let bin_dir = std::path::Path::new(bin)
        .parent()
        .unwrap()
        .to_str()
        .unwrap();
    let out = cli.run(&["install", "--dry-run", "--bin-dir", bin_dir]);
    out.expect_code(2);
    let err = out.stderr();
    assert!(err.contains(&unit.display().to_string()), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert_eq!(std::fs::read_to_string(&unit).unwrap(), mine);
}

/// Fakes of host tools, first on PATH: each records its argv in `tools.log`
/// and runs the real tool only when it was given a root (so a forgotten
/// `--root` can never reach the host). These fake host programs, not systemd.
fn fake_tools(cli: &Cli) -> (std::path::PathBuf, std::path::PathBuf) {
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
    (dir, log)
}

/// Installing for real (into the temp root) needs root: chown to the service group.
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

const SERVICE_WITH_OWN_GROUP: &str = "[service]\nuser = \"citadel\"\ngroup = \"citadelgrp\"\n[models.phi3]\nport = 11403\nengine = \"sim\"\n";

/// Issue 9, item 9: with `--root DIR`, systemd-sysusers and systemd-tmpfiles
/// ran without `--root` (on the host), and `uninstall --root DIR --purge` ran
/// userdel/groupdel on the host and gave groupdel the user's name.
#[test]
fn issue9_root_is_applied_to_every_host_tool() {
    if !as_root() {
        return;
    }
    let cli = Cli::new();
    cli.write_config(SERVICE_WITH_OWN_GROUP);
    let (fakes, log) = fake_tools(&cli);
    let bin_dir = harness::bin_dir();
    cli.run_with_path(&fakes, &["install", "--bin-dir", bin_dir.to_str().unwrap()])
        .expect_code(0);
    let root = cli.root().display().to_string();
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(
        calls.contains(&format!("systemd-sysusers --root={root} ")),
        "{calls}"
    );
    assert!(
        calls.contains(&format!("systemd-tmpfiles --root={root} --create ")),
        "{calls}"
    );
    assert!(
        calls.contains(&format!("systemctl --root={root} --quiet enable ")),
        "{calls}"
    );
    let group = std::fs::read_to_string(cli.path("/etc/group")).unwrap();
    assert!(group.contains("citadelgrp:"), "{group}");
    // A link to /etc/systemd/system/... as seen inside the root.
    assert!(cli
        .path("/etc/systemd/system/citadel.target.wants/citadel-gateway.service")
        .symlink_metadata()
        .is_ok());

    cli.run_with_path(&fakes, &["uninstall", "--purge"])
        .expect_code(0);
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(
        calls.contains(&format!("userdel --root {root} citadel\n")),
        "{calls}"
    );
    assert!(
        calls.contains(&format!("groupdel --root {root} citadelgrp\n")),
        "{calls}"
    );
    assert!(
        !calls.contains(&format!("groupdel --root {root} citadel\n")),
        "{calls}"
    );
    assert!(!std::fs::read_to_string(cli.path("/etc/group"))
        .unwrap()
        .contains("citadelgrp:"));
    // Everything was Citadel's: nothing of it is left.
    assert!(!cli.path("/opt/citadel").exists());
    assert!(!cli.path("/var/lib/citadel").exists());
}

/// Issue 9, items 10 and 13: `uninstall --purge` removed /opt/citadel/models
/// (weights) and would remove a venv under /opt/citadel. Purge removes what the
/// install record says Citadel created, says what it kept, and why.
#[test]
fn issue9_purge_keeps_model_weights_a_venv_and_foreign_files() {
    if !as_root() {
        return;
    }
    let cli = Cli::new();
    cli.write_config(ONE_MODEL);
    let (fakes, _) = fake_tools(&cli);
    let bin_dir = harness::bin_dir();
    cli.run_with_path(&fakes, &["install", "--bin-dir", bin_dir.to_str().unwrap()])
        .expect_code(0);
    let put = |path: &str, text: &str| {
        let p = cli.path(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    put("/opt/citadel/models/tiny/model.gguf", "weights");
    put("/opt/citadel/env/bin/python", "#!venv");
    put("/opt/citadel/notes.txt", "mine");
    put("/var/lib/citadel/state.json", "{}"); // the services' own state: purged
    let out = cli.run_with_path(&fakes, &["uninstall", "--purge"]);
    out.expect_code(0);
    for kept in [
        "/opt/citadel/models/tiny/model.gguf",
        "/opt/citadel/env/bin/python",
        "/opt/citadel/notes.txt",
    ] {
        assert!(cli.path(kept).is_file(), "purge removed {kept}");
    }
    for gone in [
        "/opt/citadel/bin",
        "/opt/citadel/config",
        "/var/lib/citadel",
        "/var/cache/citadel",
        "/usr/local/lib/systemd/system/citadel-gateway.service",
        "/etc/citadel/credentials/api-keys",
    ] {
        assert!(!cli.path(gone).exists(), "purge left {gone}");
    }
    let s = out.stdout();
    assert!(s.contains("model weights are never purged"), "{s}");
    assert!(s.contains("holds files Citadel did not write"), "{s}");
}

/// Issue 13: the Debian package puts the binaries in /opt/citadel/bin and its
/// postinst runs `install` from there. Those files are dpkg's: an operator's
/// `uninstall --purge` must leave them to `dpkg -P`, while still purging what
/// Citadel itself wrote.
#[test]
fn issue13_purge_leaves_binaries_installed_in_place_to_the_package() {
    use std::os::unix::fs::PermissionsExt;
    if !as_root() {
        return;
    }
    let cli = Cli::new();
    cli.write_config(ONE_MODEL);
    let (fakes, _) = fake_tools(&cli);
    let packaged = cli.path("/opt/citadel/bin");
    std::fs::create_dir_all(&packaged).unwrap();
    std::fs::set_permissions(&packaged, std::fs::Permissions::from_mode(0o755)).unwrap();
    let built = harness::bin_dir();
    for bin in [
        "citadel-systemd",
        "citadel-model",
        "citadel-gateway",
        "citadel-engine-sim",
    ] {
        if built.join(bin).is_file() {
            std::fs::copy(built.join(bin), packaged.join(bin)).unwrap();
        }
    }
    cli.run_with_path(
        &fakes,
        &["install", "--bin-dir", packaged.to_str().unwrap()],
    )
    .expect_code(0);
    cli.run_with_path(&fakes, &["uninstall", "--purge"])
        .expect_code(0);
    for bin in ["citadel-systemd", "citadel-model", "citadel-gateway"] {
        assert!(
            packaged.join(bin).is_file(),
            "purge removed the package's {bin}"
        );
    }
    assert!(
        !cli.path("/usr/local/lib/systemd/system/citadel-gateway.service")
            .exists(),
        "purge left Citadel's own units"
    );
}

/// The engine tiers keep `/var/cache/citadel` (compiled kernels) across
/// installs; its entries belong to an earlier install's `citadel` uid, which
/// does not exist yet. The state and cache bases are Citadel's by name: install
/// takes them over instead of refusing (the vLLM tier's second run failed so).
#[test]
fn issue9_install_takes_over_its_own_cache_from_an_earlier_install() {
    use std::os::unix::fs::{chown, PermissionsExt};
    if !as_root() {
        return;
    }
    let cli = Cli::new();
    cli.write_config(ONE_MODEL);
    let (fakes, _) = fake_tools(&cli);
    let cache = cli.path("/var/cache/citadel");
    std::fs::create_dir_all(cache.join("tiny-a")).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o750)).unwrap();
    chown(&cache, Some(995), Some(995)).unwrap();
    chown(cache.join("tiny-a"), Some(995), Some(995)).unwrap();
    let bin_dir = harness::bin_dir();
    cli.run_with_path(&fakes, &["install", "--bin-dir", bin_dir.to_str().unwrap()])
        .expect_code(0);
    assert!(
        cache.join("tiny-a").is_dir(),
        "the cache's contents are kept"
    );
}

/// Issue 9, item 13: with `credentials` pointing at an existing directory of
/// other files, install applied `d DIR 0700 root root` to it (and purge then
/// deleted it). Install now refuses before changing anything; the directory,
/// its files and its mode stay as they were.
#[test]
fn issue9_install_refuses_to_take_over_a_foreign_directory() {
    use std::os::unix::fs::PermissionsExt;
    if !as_root() {
        return;
    }
    let cli = Cli::new();
    cli.write_config(&format!(
        "[paths]\ncredentials = \"/srv/certs\"\n{ONE_MODEL}"
    ));
    let certs = cli.path("/srv/certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("ca.pem"), "CA").unwrap();
    std::fs::set_permissions(&certs, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (fakes, log) = fake_tools(&cli);
    let bin_dir = harness::bin_dir();
    for args in [
        &[
            "install",
            "--dry-run",
            "--bin-dir",
            bin_dir.to_str().unwrap(),
        ][..],
        &["install", "--bin-dir", bin_dir.to_str().unwrap()][..],
    ] {
        let out = cli.run_with_path(&fakes, args);
        if out.code() == 1 {
            // The config crate may refuse such a directory statically: also fine.
            continue;
        }
        out.expect_code(2);
        let err = out.stderr();
        assert!(err.contains(&certs.display().to_string()), "{err}");
        assert!(err.contains("did not create"), "{err}");
    }
    let mode = std::fs::metadata(&certs).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755);
    assert_eq!(std::fs::read_to_string(certs.join("ca.pem")).unwrap(), "CA");
    assert!(!log.exists(), "a host tool ran");
    assert!(!cli.path("/opt/citadel/bin").exists());
}
