//! Test harness: runs the real `citadel-model` binary against the real
//! simulator, with a unix datagram socket as `NOTIFY_SOCKET`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// The simulator binary, built next to this test (target/debug/).
pub fn sim_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let sim = dir.join("citadel-engine-sim");
    assert!(
        sim.exists(),
        "{} is missing: run cargo build --workspace first (or cargo build -p citadel-engine-sim)",
        sim.display()
    );
    sim
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("ephemeral port")
        .port()
}

/// One datagram and when it arrived.
#[derive(Debug, Clone)]
pub struct Msg {
    pub at: Instant,
    pub text: String,
}

impl Msg {
    pub fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }
    pub fn starts(&self, prefix: &str) -> bool {
        self.text.lines().any(|l| l.starts_with(prefix))
    }
    /// The value of `KEY=` in this datagram.
    pub fn value(&self, key: &str) -> Option<String> {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
    }
}

#[derive(Default)]
struct Inbox {
    msgs: Mutex<Vec<Msg>>,
    cv: Condvar,
}

pub struct Supervisor {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub child: Child,
    pub spawned: Instant,
    inbox: Arc<Inbox>,
    stop: Arc<AtomicBool>,
    status: Option<ExitStatus>,
}

pub struct Opts<'a> {
    /// The `[models.m]` table body; `{port}` and `{sim}` are substituted.
    pub model: &'a str,
    pub watchdog_usec: Option<u64>,
    pub extra_args: &'a [&'a str],
}

impl Supervisor {
    pub fn start(opts: Opts<'_>) -> Supervisor {
        Supervisor::start_on(free_port(), opts)
    }

    pub fn start_on(port: u16, opts: Opts<'_>) -> Supervisor {
        let dir = tempfile::tempdir().expect("tempdir");
        let sim = sim_bin();
        let model = opts
            .model
            .replace("{sim}", &sim.display().to_string())
            .replace("{port}", &port.to_string());
        let config = dir.path().join("citadel.toml");
        std::fs::write(&config, format!("[models.m]\nport = {port}\n{model}\n")).unwrap();
        let sock_path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let inbox = Arc::new(Inbox::default());
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (inbox, stop) = (inbox.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = sock.recv(&mut buf) {
                        let msg = Msg {
                            at: Instant::now(),
                            text: String::from_utf8_lossy(&buf[..n]).into_owned(),
                        };
                        inbox.msgs.lock().unwrap().push(msg);
                        inbox.cv.notify_all();
                    }
                }
            });
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_citadel-model"));
        cmd.arg("--config")
            .arg(&config)
            .arg("run")
            .arg("m")
            .args(opts.extra_args)
            .env("NOTIFY_SOCKET", &sock_path)
            .env("CACHE_DIRECTORY", dir.path().join("cache"))
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null());
        match opts.watchdog_usec {
            Some(u) => cmd.env("WATCHDOG_USEC", u.to_string()),
            None => cmd.env_remove("WATCHDOG_USEC"),
        };
        let spawned = Instant::now();
        let child = cmd.spawn().expect("spawn citadel-model");
        Supervisor {
            dir,
            port,
            child,
            spawned,
            inbox,
            stop,
            status: None,
        }
    }

    pub fn messages(&self) -> Vec<Msg> {
        self.inbox.msgs.lock().unwrap().clone()
    }

    /// Waits for the first message (from index `from`) matching `pred`.
    pub fn wait_msg_from(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&Msg) -> bool,
    ) -> Option<(usize, Msg)> {
        let deadline = Instant::now() + timeout;
        let mut msgs = self.inbox.msgs.lock().unwrap();
        loop {
            if let Some(i) = (from..msgs.len()).find(|&i| pred(&msgs[i])) {
                return Some((i, msgs[i].clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            msgs = self.inbox.cv.wait_timeout(msgs, deadline - now).unwrap().0;
        }
    }

    pub fn wait_msg(&self, timeout: Duration, pred: impl Fn(&Msg) -> bool) -> Option<(usize, Msg)> {
        self.wait_msg_from(0, timeout, pred)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signal citadel-model");
    }

    /// Waits for the supervisor to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                self.status = Some(s);
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The engine's pid (the supervisor's child), which is also its process group.
    pub fn engine_pid(&self) -> Option<Pid> {
        let me = self.child.id().to_string();
        children_of(&me).into_iter().next().map(Pid::from_raw)
    }

    /// GET/POST on the engine; returns the status code.
    pub fn http(&self, method: &str, path: &str, body: &str) -> Option<u16> {
        http(self.port, method, path, body)
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if self.status.is_none() && self.child.try_wait().ok().flatten().is_none() {
            let engine = self.engine_pid();
            let _ = kill(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
            if let Some(e) = engine {
                let _ = killpg(e, Signal::SIGKILL);
            }
        }
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Pids whose parent is `ppid` (alive, not zombies).
pub fn children_of(ppid: &str) -> Vec<i32> {
    procs()
        .into_iter()
        .filter(|p| p.ppid == ppid && p.state != "Z")
        .map(|p| p.pid)
        .collect()
}

/// Live (non-zombie) members of process group `pgid`.
pub fn group_members(pgid: Pid) -> Vec<i32> {
    procs()
        .into_iter()
        .filter(|p| p.pgrp == pgid.as_raw().to_string() && p.state != "Z")
        .map(|p| p.pid)
        .collect()
}

/// Whether any process (zombies included) is in group `pgid`.
pub fn group_exists(pgid: Pid) -> bool {
    !matches!(killpg(pgid, None), Err(Errno::ESRCH))
}

struct Proc {
    pid: i32,
    state: String,
    ppid: String,
    pgrp: String,
}

fn procs() -> Vec<Proc> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 3 {
            out.push(Proc {
                pid,
                state: f[0].into(),
                ppid: f[1].into(),
                pgrp: f[2].into(),
            });
        }
    }
    out
}

/// One blocking HTTP/1.1 request; returns the status code.
pub fn http(port: u16, method: &str, path: &str, body: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace().nth(1)?.parse().ok()
}

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: Pid) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}
