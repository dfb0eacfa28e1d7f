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
