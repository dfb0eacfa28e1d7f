//! `cargo xtask bench-gateway [--seconds N] [--rate R] [--conns C] [--backend stub|sim|both] [--no-build]`
//!
//! Builds release binaries and, for each backend (a built-in stub that
//! answers a canned completion, and `citadel-engine-sim`), starts the backend,
//! `citadel-gateway` (auth off, loopback, temp config) twice (request logging
//! on, and off with `CITADEL_LOG=warn`) and Debian's `nginx` as a plain
//! `proxy_pass` in front of the same backend (issue 11, item 1: upstream
//! keepalive, HTTP/1.1, `proxy_buffering off`, no access log unless
//! `--nginx-access-log`). The same built-in load generator (std threads,
//! keep-alive HTTP/1.1 connections) then measures direct, nginx, the gateway
//! and the gateway without request logging side by side:
//! * fixed-rate latency (default 1,000 req/s, open loop): p50/p99 and the
//!   latency each proxy adds to direct;
//! * saturation throughput (closed loop, default 32 connections) and the
//!   ratios to direct and to nginx, and what request logging costs;
//! * streaming time to first body byte (simulator);
//! * the gateway's RSS idle and with 1,000 open connections.
//!
//! When `nginx` is not installed (`scripts/setup-dev.sh` installs it) the
//! nginx column says so and is skipped. Latency is measured from each
//! request's scheduled send time (open loop, no coordinated omission). All
//! processes share the machine's cores: numbers are noisy while other builds
//! run. It prints; nothing asserts on timing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

struct Opts {
    seconds: u64,
    rate: u64,
    conns: usize,
    build: bool,
    open_conns: usize,
    /// Load-generator threads for the fixed-rate run (each keeps one connection).
    rate_workers: usize,
    backends: Vec<Backend>,
    nginx_access_log: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// A minimal HTTP/1.1 server in this process (std threads): a canned
    /// completion, nothing else to wait for.
    Stub,
    /// `citadel-engine-sim`.
    Sim,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Stub => "stub (xtask, std threads, canned completion)",
            Backend::Sim => "citadel-engine-sim (max_tokens=4, unpaced)",
        }
    }
}

fn parse(args: Vec<String>) -> Result<Opts> {
    let mut o = Opts {
        seconds: 5,
        rate: 1000,
        conns: 32,
        build: true,
        open_conns: 1000,
        // At 1,000 req/s of ~1 ms requests a handful of connections suffices; many
        // more sleeping threads on 2 cores measure the scheduler, not the gateway.
        rate_workers: 8,
        backends: vec![Backend::Stub, Backend::Sim],
        nginx_access_log: false,
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "--backend" {
            o.backends = match it.next().as_deref() {
                Some("stub") => vec![Backend::Stub],
                Some("sim") => vec![Backend::Sim],
                Some("both") => vec![Backend::Stub, Backend::Sim],
                _ => bail!("--backend needs stub, sim or both"),
            };
            continue;
        }
        let mut val = |name: &str| -> Result<u64> {
            it.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("bad {name}"))
        };
        match a.as_str() {
            "--seconds" => o.seconds = val("--seconds")?,
            "--rate" => o.rate = val("--rate")?,
            "--conns" => o.conns = val("--conns")? as usize,
            "--open-conns" => o.open_conns = val("--open-conns")? as usize,
            "--rate-workers" => o.rate_workers = val("--rate-workers")?.max(1) as usize,
            "--no-build" => o.build = false,
            "--nginx-access-log" => o.nginx_access_log = true,
            "-h" | "--help" => {
                println!("cargo xtask bench-gateway [--seconds N] [--rate R] [--rate-workers W] [--conns C] [--open-conns N] [--backend stub|sim|both] [--nginx-access-log] [--no-build]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

/// A child stopped when dropped: SIGTERM first, so a master process (nginx)
/// stops its workers too (SIGKILL of nginx's master left its workers running,
/// orphaned, after the bench had ended), then SIGKILL after 5 s.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap() // tidy: xtask lives one level below the workspace root
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// Debian's nginx (`/usr/sbin` is not on every PATH).
fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

/// Starts nginx (`daemon off`, master and workers as this user when not
/// root) proxying `127.0.0.1:port` to the backend on `backend_port`.
fn start_nginx(
    nginx: &Path,
    dir: &Path,
    port: u16,
    backend_port: u16,
    access_log: bool,
) -> Result<Killed> {
    std::fs::create_dir_all(dir.join("logs"))?;
    let p = dir.display();
    let log = if access_log {
        format!("access_log {p}/logs/access.log;")
    } else {
        "access_log off;".to_owned()
    };
    // Root would switch the workers to `nobody`: keep them as whoever runs
    // the bench, which also owns the temp dirs.
    let user = if is_root() { "user root;" } else { "" };
    let conf = format!(
        "{user}
worker_processes auto;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
    {log}
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_buffering off;
        }}
    }}
}}
"
    );
    let cfg = dir.join("nginx.conf");
    std::fs::write(&cfg, conf)?;
    let child = Command::new(nginx)
        .arg("-c")
        .arg(&cfg)
        .arg("-p")
        .arg(dir)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {}", nginx.display()))?;
    Ok(Killed(child))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A running backend: the simulator's process, or the stub's listener thread
/// (which lives as long as the process; the bench is short).
enum Running {
    Sim(#[allow(dead_code)] Killed),
    Stub,
}

fn start_backend(which: Backend, bin: &Path, port: u16) -> Result<Running> {
    match which {
        Backend::Sim => Ok(Running::Sim(Killed(
            Command::new(bin.join("citadel-engine-sim"))
                .args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--model",
                    "bench",
                    "--default-max-tokens",
                    "4",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start citadel-engine-sim (build it or drop --no-build)")?,
        ))),
        Backend::Stub => {
            let l = TcpListener::bind(("127.0.0.1", port))?;
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    std::thread::spawn(move || {
                        let _ = stub_conn(s);
                    });
                }
            });
            Ok(Running::Stub)
        }
    }
}

const STUB_COMPLETION: &str = r#"{"id":"chatcmpl-stub","object":"chat.completion","created":1700000000,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"one two three four"},"finish_reason":"length"}],"usage":{"prompt_tokens":1,"completion_tokens":4,"total_tokens":5}}"#;

/// One keep-alive connection of the stub: any GET answers `{"status":"ok"}`,
/// any other request the canned completion.
fn stub_conn(mut s: TcpStream) -> Result<()> {
    s.set_nodelay(true)?;
    let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}";
    let completion = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{STUB_COMPLETION}",
        STUB_COMPLETION.len()
    );
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut tmp = [0u8; 8192];
    loop {
        let head_end = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            let n = s.read(&mut tmp)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let n = s.read(&mut tmp)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        let resp = if head.starts_with("get ") {
            ok
        } else {
            completion.as_str()
        };
        s.write_all(resp.as_bytes())?;
        buf.drain(..head_end + len);
    }
}

fn start_gateway(
    bin: &Path,
    dir: &Path,
    port: u16,
    backend_port: u16,
    logging: bool,
) -> Result<Killed> {
    std::fs::create_dir_all(dir)?;
    let cfg = dir.join("citadel.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nlisten = \"127.0.0.1\"\nport = {port}\nauth = false\nprobe_interval = \"1s\"\n\n\
             [models.bench]\nengine = \"sim\"\nport = {backend_port}\n"
        ),
    )?;
    let log = std::fs::File::create(dir.join("gateway.log"))?;
    let mut cmd = Command::new(bin.join("citadel-gateway"));
    cmd.arg("--config")
        .arg(&cfg)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .stdout(Stdio::null())
        .stderr(log);
    if logging {
        cmd.env("CITADEL_LOG", "info");
    } else {
        // The per-request entry is INFO: this turns it (and only INFO and
        // below) off.
        cmd.env("CITADEL_LOG", "warn");
    }
    Ok(Killed(cmd.spawn().context("start citadel-gateway")?))
}

/// The figures of one target (direct, nginx, gateway, ...).
struct Figures {
    name: &'static str,
    fixed: Lat,
    sat: f64,
}

pub fn run(args: Vec<String>) -> Result<()> {
    let o = parse(args)?;
    if o.build {
        let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(workspace())
            .args([
                "build",
                "--release",
                "-p",
                "citadel-gateway",
                "-p",
                "citadel-engine-sim",
            ])
            .status()
            .context("run cargo build")?;
        if !st.success() {
            bail!("cargo build --release failed");
        }
    }
    let bin = target_dir().join("release");
    let tmp = std::env::temp_dir().join(format!("citadel-bench-gateway-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let nginx = find_nginx();
    if nginx.is_none() {
        println!(
            "nginx not found (scripts/setup-dev.sh installs Debian's nginx): its column is skipped"
        );
    }
    let res = (|| -> Result<()> {
        for (i, &which) in o.backends.iter().enumerate() {
            bench_backend(
                &o,
                which,
                &bin,
                &tmp.join(format!("b{i}")),
                nginx.as_deref(),
            )?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    res
}

fn bench_backend(
    o: &Opts,
    which: Backend,
    bin: &Path,
    tmp: &Path,
    nginx: Option<&Path>,
) -> Result<()> {
    println!();
    println!("== backend: {}", which.name());
    let be_port = free_port()?;
    let _backend = start_backend(which, bin, be_port)?;
    let gw_port = free_port()?;
    let gw = start_gateway(bin, &tmp.join("gw"), gw_port, be_port, true)?;
    let quiet_port = free_port()?;
    let _quiet = start_gateway(bin, &tmp.join("gw-quiet"), quiet_port, be_port, false)?;
    let ng_port = free_port()?;
    let _ng = match nginx {
        Some(n) => Some(start_nginx(
            n,
            &tmp.join("nginx"),
            ng_port,
            be_port,
            o.nginx_access_log,
        )?),
        None => None,
    };
    let addr = |p: u16| -> SocketAddr { ([127, 0, 0, 1], p).into() };
    wait_ready(addr(be_port), "/health")?;
    wait_ready(addr(gw_port), "/health/ready")?;
    wait_ready(addr(quiet_port), "/health/ready")?;
    let mut targets: Vec<(&'static str, SocketAddr)> = vec![("direct", addr(be_port))];
    if nginx.is_some() {
        wait_ready(addr(ng_port), "/health")?;
        targets.push(("nginx", addr(ng_port)));
    }
    targets.push(("gateway", addr(gw_port)));
    targets.push(("gw no log", addr(quiet_port)));
    let pid = gw.0.id();

    let chat = request(
        "/v1/chat/completions",
        r#"{"model":"bench","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#,
    );
    let stream = request(
        "/v1/chat/completions",
        r#"{"model":"bench","stream":true,"messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#,
    );

    // Idle RSS after a few requests have warmed the pools.
    let _ = closed_loop(addr(gw_port), &chat, 2, Duration::from_millis(500));
    std::thread::sleep(Duration::from_millis(300));
    let rss_idle = rss_kib(pid)?;

    let secs = Duration::from_secs(o.seconds);
    let mut figs = Vec::new();
    for &(name, a) in &targets {
        println!(
            "{name}: fixed rate {} req/s for {secs:?} (after 1 s warm-up), then {} connections closed loop for {secs:?}…",
            o.rate, o.conns
        );
        let _ = fixed_rate(a, &chat, o.rate, Duration::from_secs(1), o.rate_workers);
        let fixed = fixed_rate(a, &chat, o.rate, secs, o.rate_workers)?;
        let sat = closed_loop(a, &chat, o.conns, secs)?.rps;
        figs.push(Figures { name, fixed, sat });
    }
    let ttfb_rows = if which == Backend::Sim {
        println!("streaming time to first byte (sequential)…");
        let mut rows = Vec::new();
        for &(name, a) in targets.iter().filter(|t| t.0 != "gw no log") {
            rows.push((name, ttfb(a, &stream, 300)?));
        }
        rows
    } else {
        Vec::new()
    };
    println!("opening {} connections to the gateway…", o.open_conns);
    let rss_conns = {
        let mut held = Vec::with_capacity(o.open_conns);
        let health = b"GET /health HTTP/1.1\r\nhost: bench\r\n\r\n";
        for _ in 0..o.open_conns {
            let mut c = Conn::new(addr(gw_port))?;
            c.exchange(health)?;
            held.push(c);
        }
        std::thread::sleep(Duration::from_millis(300));
        rss_kib(pid)?
    };

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!();
    println!(
        "citadel-gateway benchmark, backend {} ({} cores; gateway, sim, nginx: release builds; load generator: xtask, std threads)",
        which.name(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    print!("{:<36}", "measure");
    for f in &figs {
        print!(" {:>12}", f.name);
    }
    println!();
    println!("{}", "-".repeat(36 + 13 * figs.len()));
    let direct = &figs[0];
    let row = |name: &str, v: &dyn Fn(&Figures) -> String| {
        print!("{name:<36}");
        for f in &figs {
            print!(" {:>12}", v(f));
        }
        println!();
    };
    for q in [50.0, 99.0] {
        row(&format!("latency p{q} @ {} req/s", o.rate), &|f| {
            format!("{:.3}ms", ms(f.fixed.p(q)))
        });
        row(&format!("  added p{q}"), &|f| {
            if f.name == "direct" {
                String::new()
            } else {
                format!("{:+.3}ms", ms(f.fixed.p(q)) - ms(direct.fixed.p(q)))
            }
        });
    }
    row("latency max", &|f| format!("{:.3}ms", ms(f.fixed.p(100.0))));
    row("requests done / errors", &|f| {
        format!("{}/{}", f.fixed.n(), f.fixed.errors)
    });
    row(&format!("saturation ({} conns)", o.conns), &|f| {
        format!("{:.0}/s", f.sat)
    });
    row("  ratio to direct", &|f| {
        format!("{:.2}x", f.sat / direct.sat.max(1.0))
    });
    for (name, t) in &ttfb_rows {
        println!(
            "{:<36} {name:>12} p50 {:.3}ms p99 {:.3}ms",
            "stream TTFB",
            ms(t.p(50.0)),
            ms(t.p(99.0))
        );
    }
    println!(
        "{:<36} {:>10.1}MB idle, {:.1}MB with {} open connections (targets <= 30MB, <= 80MB)",
        "gateway RSS",
        rss_idle as f64 / 1024.0,
        rss_conns as f64 / 1024.0,
        o.open_conns
    );
    let get = |n: &str| figs.iter().find(|f| f.name == n);
    if let (Some(ng), Some(gw), Some(quiet)) = (get("nginx"), get("gateway"), get("gw no log")) {
        println!();
        println!("issue 11 targets (gateway vs nginx, same run):");
        for q in [50.0, 99.0] {
            let added_gw = ms(gw.fixed.p(q)) - ms(direct.fixed.p(q));
            let added_ng = ms(ng.fixed.p(q)) - ms(direct.fixed.p(q));
            println!(
                "  added p{q}: gateway {added_gw:+.3}ms, nginx {added_ng:+.3}ms, target <= nginx + 0.05ms: {}",
                verdict(added_gw <= added_ng + 0.05)
            );
        }
        println!(
            "  saturation: gateway {:.0}/s = {:.2}x nginx's {:.0}/s, target >= 1.00x: {}",
            gw.sat,
            gw.sat / ng.sat.max(1.0),
            ng.sat,
            verdict(gw.sat >= ng.sat)
        );
        let cost = 100.0 * (1.0 - gw.sat / quiet.sat.max(1.0));
        println!(
            "  request logging: {:.0}/s with, {:.0}/s without: costs {cost:.1}% of saturation, target <= 5%: {}",
            gw.sat,
            quiet.sat,
            verdict(cost <= 5.0)
        );
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn request(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")
}

fn wait_ready(addr: SocketAddr, path: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let req = format!("GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n");
    loop {
        if let Ok(mut c) = Conn::new(addr) {
            if let Ok((status, _)) = c.exchange(req.as_bytes()) {
                if status == 200 {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("{addr}{path} not ready after 30s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A keep-alive HTTP/1.1 connection that understands Content-Length and chunked bodies.
struct Conn {
    addr: SocketAddr,
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Result<Conn> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Conn {
            addr,
            s,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    fn reconnect(&mut self) -> Result<()> {
        *self = Conn::new(self.addr)?;
        Ok(())
    }

    fn fill(&mut self) -> Result<()> {
        let mut tmp = [0u8; 16 * 1024];
        let n = self.s.read(&mut tmp)?;
        if n == 0 {
            bail!("connection closed");
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(())
    }

    /// Sends `req`; returns the status and the time to the first body byte.
    fn exchange(&mut self, req: &[u8]) -> Result<(u16, Duration)> {
        let t0 = Instant::now();
        self.buf.clear();
        self.s.write_all(req)?;
        let head_end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p + 4;
            }
            self.fill()?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end])?.to_ascii_lowercase();
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .context("status line")?;
        let chunked = head.contains("transfer-encoding: chunked");
        let len: Option<usize> = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok());
        while self.buf.len() == head_end && (chunked || len.unwrap_or(0) > 0) {
            self.fill()?;
        }
        let ttfb = t0.elapsed();
        if chunked {
            let mut pos = head_end;
            loop {
                let line_end = loop {
                    if let Some(p) = find(&self.buf[pos..], b"\r\n") {
                        break pos + p;
                    }
                    self.fill()?;
                };
                let size_str = std::str::from_utf8(&self.buf[pos..line_end])?;
                let size =
                    usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)?;
                let need = line_end + 2 + size + 2;
                while self.buf.len() < need {
                    self.fill()?;
                }
                pos = need;
                if size == 0 {
                    break;
                }
            }
        } else {
            let need = head_end + len.unwrap_or(0);
            while self.buf.len() < need {
                self.fill()?;
            }
        }
        Ok((status, ttfb))
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

struct Lat {
    us: Vec<u64>,
    errors: u64,
}

impl Lat {
    fn p(&self, q: f64) -> Duration {
        if self.us.is_empty() {
            return Duration::ZERO;
        }
        let i = ((q / 100.0) * (self.us.len() - 1) as f64).round() as usize;
        Duration::from_micros(self.us[i.min(self.us.len() - 1)])
    }
    fn n(&self) -> usize {
        self.us.len()
    }
}

/// Open loop: request i is due at start + i/rate; latency counts from the due time.
fn fixed_rate(
    addr: SocketAddr,
    req: &[u8],
    rate: u64,
    dur: Duration,
    workers: usize,
) -> Result<Lat> {
    let total = rate * dur.as_secs().max(1);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(50);
    let period_ns = 1_000_000_000 / rate.max(1);
    let mut hs = Vec::new();
    for _ in 0..workers {
        let (next, req) = (next.clone(), req.to_vec());
        hs.push(std::thread::spawn(move || -> Result<(Vec<u64>, u64)> {
            let mut c = Conn::new(addr)?;
            let mut lat = Vec::new();
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= total {
                    return Ok((lat, errors));
                }
                let due = start + Duration::from_nanos(i * period_ns);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                match c.exchange(&req) {
                    Ok((200, _)) => lat.push(due.elapsed().as_micros() as u64),
                    _ => {
                        errors += 1;
                        c.reconnect()?;
                    }
                }
            }
        }));
    }
    let mut all = Lat {
        us: Vec::new(),
        errors: 0,
    };
    for h in hs {
        let (l, e) = h.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
        all.us.extend(l);
        all.errors += e;
    }
    all.us.sort_unstable();
    Ok(all)
}

struct Sat {
    rps: f64,
}

fn closed_loop(addr: SocketAddr, req: &[u8], conns: usize, dur: Duration) -> Result<Sat> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();
    for _ in 0..conns {
        let (stop, done, req) = (stop.clone(), done.clone(), req.to_vec());
        hs.push(std::thread::spawn(move || -> Result<()> {
            let mut c = Conn::new(addr)?;
            while !stop.load(Relaxed) {
                if let Ok((200, _)) = c.exchange(&req) {
                    done.fetch_add(1, Relaxed);
                } else {
                    c.reconnect()?;
                }
            }
            Ok(())
        }));
    }
    let t0 = Instant::now();
    std::thread::sleep(dur);
    let n = done.load(Relaxed);
    let el = t0.elapsed();
    stop.store(true, Relaxed);
    for h in hs {
        let _ = h.join();
    }
    Ok(Sat {
        rps: n as f64 / el.as_secs_f64(),
    })
}

fn ttfb(addr: SocketAddr, req: &[u8], n: usize) -> Result<Lat> {
    let mut c = Conn::new(addr)?;
    let mut us = Vec::with_capacity(n);
    for _ in 0..n {
        let (status, t) = c.exchange(req)?;
        if status != 200 {
            bail!("stream request answered {status}");
        }
        us.push(t.as_micros() as u64);
    }
    us.sort_unstable();
    Ok(Lat { us, errors: 0 })
}
