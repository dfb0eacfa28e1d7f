//! A booted sandbox really runs systemd as PID 1 and is isolated from the host.

mod common;

#[test]
fn boots_with_systemd_as_pid1() {
    let sb = common::boot("boot");

    let state = sb
        .exec_ok(&["systemctl", "is-system-running"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(state.trim(), "running" | "degraded"),
        "unexpected system state {state:?}"
    );

    let comm = sb.exec_ok(&["cat", "/proc/1/comm"]).unwrap();
    assert_eq!(comm.trim(), "systemd", "PID 1 inside is not systemd");
    let host_comm = std::fs::read_to_string(format!("/proc/{}/comm", sb.leader())).unwrap();
    assert_eq!(
        host_comm.trim(),
        "systemd",
        "leader() is not the container's systemd"
    );

    // Own machine id and hostname.
    let id = sb.exec_ok(&["cat", "/etc/machine-id"]).unwrap();
    let host_id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    assert_ne!(id.trim(), host_id.trim(), "machine id shared with the host");
    assert_eq!(sb.exec_ok(&["hostname"]).unwrap().trim(), sb.name());

    // Files written to root() from the host are visible inside, and writes
    // inside do not reach the host.
    let marker = "etc/citadel-sandbox-test-marker";
    std::fs::write(sb.root().join(marker), "hello\n").unwrap();
    assert_eq!(
        sb.exec_ok(&["cat", &format!("/{marker}")]).unwrap(),
        "hello\n"
    );
    assert!(
        !std::path::Path::new("/").join(marker).exists(),
        "overlay wrote through to the host"
    );

    // Failing commands report their status and stderr.
    let err = sb
        .exec_ok(&["sh", "-c", "echo oops >&2; exit 3"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("oops") && err.contains('3'),
        "unhelpful error: {err}"
    );

    // journald works inside.
    sb.exec_ok(&["logger", "-t", "citadel-test", "journal-probe"])
        .unwrap();
    sb.wait_until(
        "journal-probe to reach the journal",
        std::time::Duration::from_secs(10),
        || {
            sb.exec_ok(&["journalctl", "-t", "citadel-test", "--no-pager", "-q"])
                .is_ok_and(|out| out.contains("journal-probe"))
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));

    sb.shutdown().unwrap_or_else(|e| panic!("{e}"));
}

/// `Sandbox::reboot` (issue 10, item 2: "disable sticks across a reboot"
/// needs a reboot over the same state): the container halts in order and
/// boots again with a new PID 1 over the same files, machine id and
/// enablement: an enabled unit starts at boot, a disabled one does not.
#[test]
fn reboot_boots_again_over_the_same_state() {
    let mut sb = common::boot("reboot");
    let unit = |name: &str| {
        format!(
            "[Unit]\nDescription={name}\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n"
        )
    };
    for name in ["citadel-on", "citadel-off"] {
        std::fs::write(
            sb.root().join(format!("etc/systemd/system/{name}.service")),
            unit(name),
        )
        .unwrap();
    }
    sb.exec_ok(&["systemctl", "daemon-reload"]).unwrap();
    sb.exec_ok(&["systemctl", "enable", "citadel-on.service"])
        .unwrap();
    let id = sb.exec_ok(&["cat", "/etc/machine-id"]).unwrap();
    let leader = sb.leader();
    sb.exec_ok(&["touch", "/run/citadel-volatile"]).unwrap();

    sb.reboot().expect("reboot");

    assert_ne!(sb.leader(), leader, "a new PID 1");
    let comm = sb.exec_ok(&["cat", "/proc/1/comm"]).unwrap();
    assert_eq!(comm.trim(), "systemd");
    assert_eq!(sb.exec_ok(&["cat", "/etc/machine-id"]).unwrap(), id);
    assert!(
        sb.exec_ok(&["test", "-e", "/run/citadel-volatile"])
            .is_err(),
        "/run is fresh after a reboot"
    );
    sb.wait_until(
        "the enabled unit starts at boot",
        std::time::Duration::from_secs(20),
        || {
            sb.exec_ok(&["systemctl", "is-active", "citadel-on.service"])
                .is_ok()
        },
    )
    .unwrap();
    assert_eq!(
        sb.exec(&["systemctl", "is-active", "citadel-off.service"])
            .unwrap()
            .status
            .code(),
        Some(3),
        "the disabled unit stays stopped"
    );
    sb.shutdown().expect("clean teardown");
}
