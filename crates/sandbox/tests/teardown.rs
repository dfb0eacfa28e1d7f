//! Teardown leaves nothing behind: after shutdown(), after a panic (Drop), and
//! after the owning process was killed (next boot / cleanup_stale()).

use std::process::{Command, Stdio};
use std::time::Duration;

use citadel_sandbox::cleanup_stale;

mod common;

#[test]
fn shutdown_leaves_nothing_behind() {
    let sb = common::boot("down");
    let name = sb.name().to_string();
    // Something running inside that is not a systemd unit must go too.
    sb.exec_ok(&[
        "sh",
        "-c",
        "setsid sleep 1000 >/dev/null 2>&1 < /dev/null &",
    ])
    .unwrap();
    assert!(
        !common::leftovers(&name).is_empty(),
        "leftovers() sees nothing while booted"
    );
    let t = std::time::Instant::now();
    sb.shutdown().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("shutdown took {:?}", t.elapsed());
    common::assert_no_leftovers(&name);
}

#[test]
fn drop_during_panic_tears_down() {
    let (tx, rx) = std::sync::mpsc::channel();
    let res = std::thread::spawn(move || {
        let sb = common::boot("panic");
        tx.send(sb.name().to_string()).unwrap();
        panic!("test failure while a sandbox is up");
    })
    .join();
    assert!(res.is_err());
    common::assert_no_leftovers(&rx.recv().unwrap());
}

const HELPER_ENV: &str = "CITADEL_SANDBOX_STALE_HELPER";

/// Not a test: the child process of `leftovers_of_a_killed_owner_are_cleaned`.
#[test]
#[ignore = "helper process for leftovers_of_a_killed_owner_are_cleaned"]
fn stale_helper() {
    let Some(report) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let sb = common::boot("stale");
    std::fs::write(report, sb.name()).unwrap();
    // Wait to be SIGKILLed; Drop must never run.
    loop {
        std::thread::park();
    }
}

#[test]
fn leftovers_of_a_killed_owner_are_cleaned() {
    let report = std::env::temp_dir().join(format!("citadel-stale-helper-{}", std::process::id()));
    let _ = std::fs::remove_file(&report);
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "stale_helper", "--ignored", "--test-threads=1"])
        .env(HELPER_ENV, &report)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut name = String::new();
    let booted = poll(Duration::from_secs(180), || {
        name = std::fs::read_to_string(&report).unwrap_or_default();
        !name.is_empty() || !matches!(helper.try_wait(), Ok(None))
    });
    let _ = std::fs::remove_file(&report);
    assert!(
        booted && !name.is_empty(),
        "helper did not boot a sandbox: {:?}",
        helper.try_wait()
    );
    helper.kill().unwrap();
    helper.wait().unwrap();

    // The owner is dead but its container, mount and cgroups are still there.
    let left = common::leftovers(&name);
    assert!(
        left.iter().any(|l| l.starts_with("nspawn process")),
        "expected an orphaned container, found {left:?}"
    );

    // A concurrent test's boot() may be cleaning it right now as well; both
    // must converge to nothing left.
    if let Err(e) = cleanup_stale() {
        panic!("{e}");
    }
    poll(Duration::from_secs(60), || {
        common::leftovers(&name).is_empty()
    });
    common::assert_no_leftovers(&name);
}

fn poll(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

#[test]
fn failed_boot_reports_console_and_cleans_up() {
    let mut opts = citadel_sandbox::SandboxOptions::new("badboot");
    opts.extra_nspawn_args = vec!["--no-such-nspawn-option".into()];
    let err = citadel_sandbox::Sandbox::boot(opts)
        .expect_err("boot with a bogus nspawn option succeeded")
        .to_string();
    assert!(
        err.contains("failed to boot") && err.contains("no-such-nspawn-option"),
        "boot error lacks the console log: {err}"
    );
    eprintln!("{err}");
    let name = err
        .split('`')
        .nth(1)
        .unwrap_or_else(|| panic!("no sandbox name in {err}"));
    common::assert_no_leftovers(name);
}
