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
        first.stdout().contains("rendered 10 files"),
        "{}",
        first.stdout()
    );
    let dir = cli.path("/opt/citadel/config/systemd");
    assert!(dir
        .join("citadel-model@mixtral.service.d/50-citadel.conf")
        .is_file());
    assert!(dir.join("sysusers.d/citadel.conf").is_file());
    let second = cli.run(&["render"]);
    assert!(
        second.stdout().contains("(10 unchanged)"),
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
        // A host booted with systemd: status of units that do not exist is harmless.
        out.expect_code(0);
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
/// (here the gateway's unit in /etc/systemd/system) stops the install before
/// anything happens; `--dry-run` reports the same refusal.
#[test]
fn issue9_operator_files_are_never_overwritten_by_install() {
    let cli = Cli::new();
    cli.write_config(ONE_MODEL);
    let unit = cli.path("/etc/systemd/system/citadel-gateway.service");
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
