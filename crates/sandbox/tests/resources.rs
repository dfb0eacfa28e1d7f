//! Resource limits set on units inside the sandbox are really enforced (this
//! is what the fresh cgroups + writable controllers + daemon-reexec buy).

mod common;

#[test]
fn memory_max_is_enforced() {
    let sb = common::boot("mem");
    let hog =
        "b = bytearray(100 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); print('survived')";
    let run = |unit: &str, limit: &str| {
        sb.exec(&[
            "systemd-run",
            "--wait",
            "--quiet",
            &format!("--unit={unit}"),
            "-p",
            &format!("MemoryMax={limit}"),
            "-p",
            "MemorySwapMax=0",
            "/usr/bin/python3",
            "-c",
            hog,
        ])
        .unwrap()
    };

    // Control: the same program with room to spare succeeds, so a failure
    // below is the limit, not the program.
    let ok = run("citadel-mem-control", "500M");
    assert!(ok.status.success(), "control run failed: {ok:?}");

    let oom = run("citadel-mem-oom", "20M");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&oom.stdout),
        String::from_utf8_lossy(&oom.stderr)
    );
    assert!(
        !oom.status.success(),
        "100 MB allocation survived MemoryMax=20M:\n{text}"
    );
    let journal = sb
        .exec_ok(&[
            "journalctl",
            "-u",
            "citadel-mem-oom.service",
            "--no-pager",
            "-q",
        ])
        .unwrap();
    // cgroup v1 cannot report `Result=oom-kill`; the memcg OOM killer's
    // SIGKILL shows up as result `signal`, status 9.
    assert!(
        journal.contains("oom-kill") || journal.contains("status=9/KILL"),
        "expected an OOM kill, got:\n{text}\n--- journal ---\n{journal}"
    );
    // When the kernel log is readable, it names the sandbox's memcg as the
    // one that hit its limit: conclusive proof the limit came from the unit.
    if let Ok(dmesg) = std::process::Command::new("dmesg").output() {
        let dmesg = String::from_utf8_lossy(&dmesg.stdout);
        if dmesg.contains("oom_memcg=") {
            let memcg = format!(
                "oom_memcg=/citadel-sandbox-{}/system.slice/citadel-mem-oom.service",
                sb.name()
            );
            assert!(dmesg.contains(&memcg), "kernel log has no OOM for {memcg}");
        }
    }
    sb.shutdown().unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn cpu_quota_is_enforced() {
    let sb = common::boot("cpu");
    // Spin for 2 s of wall time under a 10% quota and report the CPU time
    // used: ~2 s unthrottled, ~0.2 s throttled.
    let burn = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 2: pass\nprint(time.process_time())";
    let out = sb
        .exec_ok(&[
            "systemd-run",
            "--wait",
            "--pipe",
            "--quiet",
            "--unit=citadel-cpu-quota",
            "-p",
            "CPUQuota=10%",
            "/usr/bin/python3",
            "-c",
            burn,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    let cpu: f64 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad output {out:?}"));
    eprintln!("CPU time used under CPUQuota=10% in 2 s: {cpu:.3}s");
    assert!(
        cpu < 0.8,
        "CPUQuota=10% not enforced: used {cpu:.2}s CPU in 2s wall time"
    );
    sb.shutdown().unwrap_or_else(|e| panic!("{e}"));
}
