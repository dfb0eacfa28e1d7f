//! `cargo xtask bench-gateway [--seconds N] [--rate R] [--conns C] [--no-build]`
//!
//! Builds release binaries, starts `citadel-engine-sim` and `citadel-gateway`
//! (auth off, loopback, temp config), then runs the same built-in load
//! generator (std threads, keep-alive HTTP/1.1 connections) directly against
//! the simulator and through the gateway, and prints:
//! * fixed-rate latency (default 1,000 req/s): p50/p99 and the added latency;
//! * saturation throughput (closed loop) and the gateway/direct ratio;
//! * streaming time to first body byte and the overhead;
//! * the gateway's RSS idle and with 1,000 open connections.
//!
//! Latency is measured from each request's scheduled send time (open loop, no
//! coordinated omission). All processes share the machine's cores: numbers
//! are noisy while other builds run.

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
}

fn parse(args: Vec<String>) -> Result<Opts> {
    let mut o = Opts {
        seconds: 5,
        rate: 1000,
        conns: 16,
        build: true,
        open_conns: 1000,
        // At 1,000 req/s of ~1 ms requests a handful of connections suffices; many
        // more sleeping threads on 2 cores measure the scheduler, not the gateway.
        rate_workers: 8,
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
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
            "-h" | "--help" => {
                println!("cargo xtask bench-gateway [--seconds N] [--rate R] [--rate-workers W] [--conns C] [--open-conns N] [--no-build]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
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
        .unwrap()
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
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

    let sim_port = free_port()?;
    let gw_port = free_port()?;
    let sim = Killed(
        Command::new(bin.join("citadel-engine-sim"))
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &sim_port.to_string(),
                "--model",
                "bench",
                "--default-max-tokens",
                "4",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start citadel-engine-sim (build it or drop --no-build)")?,
    );
    let cfg = tmp.join("citadel.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nlisten = \"127.0.0.1\"\nport = {gw_port}\nauth = false\nprobe_interval = \"1s\"\n\n\
             [models.bench]\nengine = \"sim\"\nport = {sim_port}\n"
        ),
    )?;
    let log = std::fs::File::create(tmp.join("gateway.log"))?;
    let gw = Killed(
        Command::new(bin.join("citadel-gateway"))
            .arg("--config")
            .arg(&cfg)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start citadel-gateway")?,
    );
    let _ = &sim;
    let direct: SocketAddr = ([127, 0, 0, 1], sim_port).into();
    let via: SocketAddr = ([127, 0, 0, 1], gw_port).into();
    wait_ready(via, "/health/ready")?;
    wait_ready(direct, "/health")?;
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
    let _ = closed_loop(via, &chat, 2, Duration::from_millis(500));
    std::thread::sleep(Duration::from_millis(300));
    let rss_idle = rss_kib(pid)?;

    let secs = Duration::from_secs(o.seconds);
    println!("warming up…");
    let _ = fixed_rate(
        direct,
        &chat,
        o.rate,
        Duration::from_secs(1),
        o.rate_workers,
    );
    let _ = fixed_rate(via, &chat, o.rate, Duration::from_secs(1), o.rate_workers);
    println!(
        "fixed rate {} req/s for {:?}: direct, then via the gateway…",
        o.rate, secs
    );
    let fd = fixed_rate(direct, &chat, o.rate, secs, o.rate_workers)?;
    let fg = fixed_rate(via, &chat, o.rate, secs, o.rate_workers)?;
    println!(
        "saturation, {} connections for {:?}: direct, then via the gateway…",
        o.conns, secs
    );
    let sd = closed_loop(direct, &chat, o.conns, secs)?;
    let sg = closed_loop(via, &chat, o.conns, secs)?;
    println!("streaming time to first byte (sequential)…");
    let td = ttfb(direct, &stream, 300)?;
    let tg = ttfb(via, &stream, 300)?;
    println!("opening {} connections to the gateway…", o.open_conns);
    let rss_conns = {
        let mut held = Vec::with_capacity(o.open_conns);
        let health = b"GET /health HTTP/1.1\r\nhost: bench\r\n\r\n";
        for _ in 0..o.open_conns {
            let mut c = Conn::new(via)?;
            c.exchange(health)?;
            held.push(c);
        }
        std::thread::sleep(Duration::from_millis(300));
        rss_kib(pid)?
    };

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!();
    println!("citadel-gateway benchmark ({} cores; sim and gateway: release builds; load generator: xtask, std threads)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
    println!(
        "{:<44} {:>12} {:>12} {:>12} {:>10}",
        "measure", "direct", "gateway", "added", "target"
    );
    println!("{}", "-".repeat(94));
    let row = |name: &str, d: f64, g: f64, unit: &str, target: &str| {
        println!(
            "{:<44} {:>10.3}{unit} {:>10.3}{unit} {:>10.3}{unit} {:>10}",
            name,
            d,
            g,
            g - d,
            target
        );
    };
    row(
        &format!("latency p50 @ {} req/s", o.rate),
        ms(fd.p(50.0)),
        ms(fg.p(50.0)),
        "ms",
        "<= 0.15ms",
    );
    row(
        &format!("latency p99 @ {} req/s", o.rate),
        ms(fd.p(99.0)),
        ms(fg.p(99.0)),
        "ms",
        "<= 0.5ms",
    );
    row("latency max", ms(fd.p(100.0)), ms(fg.p(100.0)), "ms", "");
    println!(
        "{:<44} {:>12} {:>12}",
        "requests done / errors",
        format!("{}/{}", fd.n(), fd.errors),
        format!("{}/{}", fg.n(), fg.errors)
    );
    println!(
        "{:<44} {:>10.0}/s {:>10.0}/s {:>11.2}x {:>10}",
        format!("saturation throughput ({} conns)", o.conns),
        sd.rps,
        sg.rps,
        sg.rps / sd.rps.max(1.0),
        ">= 0.5x"
    );
    row(
        "stream TTFB p50",
        ms(td.p(50.0)),
        ms(tg.p(50.0)),
        "ms",
        "<= 1ms",
    );
    row("stream TTFB p99", ms(td.p(99.0)), ms(tg.p(99.0)), "ms", "");
    println!(
        "{:<44} {:>12} {:>10.1}MB {:>12} {:>10}",
        "gateway RSS idle",
        "",
        rss_idle as f64 / 1024.0,
        "",
        "<= 30MB"
    );
    println!(
        "{:<44} {:>12} {:>10.1}MB {:>12} {:>10}",
        format!("gateway RSS with {} open connections", o.open_conns),
        "",
        rss_conns as f64 / 1024.0,
        "",
        "<= 80MB"
    );
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
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
