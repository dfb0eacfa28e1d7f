//! `cargo xtask bench-sim`: throughput of the engine simulator on one core.
//!
//! Builds `citadel-engine-sim` in release, starts it pinned to CPU 0
//! (`taskset -c 0`, single-threaded runtime), drives it from CPU 1 with `wrk`
//! (or `oha` when wrk is missing) against `GET /health` and a small
//! non-streaming `POST /v1/completions`, prints requests/s and latency
//! percentiles, then stops the simulator with SIGTERM.
//!
//! Options: `--duration SECS` (default 5), `--connections N` (default 64),
//! `--max-tokens N` for the completion body (default 4), `--no-build`.
//! Honours `CARGO_TARGET_DIR` for the build and the binary location.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

struct Opts {
    duration: u64,
    connections: u32,
    max_tokens: u32,
    build: bool,
}

fn parse(args: Vec<String>) -> Result<Opts> {
    let mut o = Opts {
        duration: 5,
        connections: 64,
        max_tokens: 4,
        build: true,
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--duration" => o.duration = val("--duration")?.trim_end_matches('s').parse()?,
            "--connections" => o.connections = val("--connections")?.parse()?,
            "--max-tokens" => o.max_tokens = val("--max-tokens")?.parse()?,
            "--no-build" => o.build = false,
            "-h" | "--help" => {
                println!(
                    "usage: cargo xtask bench-sim [--duration SECS] [--connections N] [--max-tokens N] [--no-build]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}` (try --help)"),
        }
    }
    Ok(o)
}

fn in_path(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|f| f.is_file())
    })
}

enum LoadGen {
    Wrk(PathBuf),
    Oha(PathBuf),
}

/// Kills (SIGTERM, then SIGKILL) the simulator when dropped.
struct Sim(Child);

impl Drop for Sim {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.0.try_wait() {
                eprintln!("simulator stopped ({st})");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        eprintln!("simulator did not stop on SIGTERM; killed");
    }
}

pub fn run(args: Vec<String>) -> Result<()> {
    let o = parse(args)?;
    let loadgen = if let Some(p) = in_path("wrk") {
        LoadGen::Wrk(p)
    } else if let Some(p) = in_path("oha") {
        LoadGen::Oha(p)
    } else {
        bail!(
            "no load generator found: install wrk (`apt-get install -y wrk`) \
             or oha (`cargo install oha`) and re-run"
        );
    };
    let taskset = in_path("taskset");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (sim_cpu, gen_cpu) = match (&taskset, cpus) {
        (Some(_), n) if n >= 2 => (Some("0"), Some("1")),
        (Some(_), _) => {
            eprintln!("warning: only one CPU: simulator and load generator share it");
            (Some("0"), Some("0"))
        }
        (None, _) => {
            eprintln!("warning: taskset not found (util-linux); running unpinned");
            (None, None)
        }
    };

    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent dir")?
        .to_path_buf();
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => root.join(d),
        None => root.join("target"),
    };
    if o.build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!(
            "building citadel-engine-sim (release) into {}",
            target.display()
        );
        let st = Command::new(cargo)
            .current_dir(&root)
            .args(["build", "--release", "-p", "citadel-engine-sim"])
            .status()
            .context("running cargo build")?;
        if !st.success() {
            bail!("cargo build failed ({st})");
        }
    }
    let bin = target.join("release/citadel-engine-sim");
    if !bin.is_file() {
        bail!("{} not found (build it or drop --no-build)", bin.display());
    }

    // Start the simulator, pinned, on an ephemeral port.
    let sim_args = [
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--model",
        "bench-model",
    ];
    let mut cmd = match sim_cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu]).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    let mut child = cmd
        .args(sim_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let sim = Sim(child);
    let mut stderr = BufReader::new(stderr);
    let mut line = String::new();
    stderr.read_line(&mut line)?;
    let addr: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.trim_end_matches(',').parse().ok())
        .with_context(|| format!("no address in simulator start line {line:?}"))?;
    std::thread::spawn(move || for _ in stderr.lines() {});
    wait_ready(addr)?;
    eprintln!(
        "simulator {} on {addr} (cpu {}), load generator on cpu {}, {} connections, {} s per run",
        bin.display(),
        sim_cpu.unwrap_or("any"),
        gen_cpu.unwrap_or("any"),
        o.connections,
        o.duration
    );

    let body = format!(
        r#"{{"model":"bench-model","prompt":"hello world","max_tokens":{}}}"#,
        o.max_tokens
    );
    let mut results = Vec::new();
    for (label, path, post) in [
        ("GET /health", "/health", None),
        (
            "POST /v1/completions (non-stream)",
            "/v1/completions",
            Some(body.as_str()),
        ),
    ] {
        let url = format!("http://{addr}{path}");
        println!("\n=== {label} ===");
        let out = match &loadgen {
            LoadGen::Wrk(wrk) => run_wrk(wrk, gen_cpu, &url, post, &o)?,
            LoadGen::Oha(oha) => run_oha(oha, gen_cpu, &url, post, &o)?,
        };
        println!("{out}");
        results.push((label, summarize(&out)));
    }
    drop(sim);

    println!("\n=== summary (simulator on one core) ===");
    for (label, s) in results {
        println!("{label:<36} {s}");
    }
    Ok(())
}

fn wait_ready(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            if buf.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("simulator at {addr} not healthy within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pinned(tool: &Path, cpu: Option<&str>) -> Command {
    match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu]).arg(tool);
            c
        }
        None => Command::new(tool),
    }
}

fn output(mut cmd: Command) -> Result<String> {
    let out = cmd.output().context("running load generator")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "load generator failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

fn run_wrk(
    wrk: &Path,
    cpu: Option<&str>,
    url: &str,
    post: Option<&str>,
    o: &Opts,
) -> Result<String> {
    let mut cmd = pinned(wrk, cpu);
    cmd.args([
        "-t1",
        &format!("-c{}", o.connections),
        &format!("-d{}s", o.duration),
        "--latency",
    ]);
    let script = match post {
        Some(body) => {
            let path =
                std::env::temp_dir().join(format!("citadel-bench-sim-{}.lua", std::process::id()));
            let lua = format!(
                "wrk.method = \"POST\"\nwrk.body = '{}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n",
                body.replace('\\', "\\\\").replace('\'', "\\'")
            );
            std::fs::write(&path, lua)?;
            cmd.arg("-s").arg(&path);
            Some(path)
        }
        None => None,
    };
    cmd.arg(url);
    let out = output(cmd);
    if let Some(p) = script {
        let _ = std::fs::remove_file(p);
    }
    out
}

fn run_oha(
    oha: &Path,
    cpu: Option<&str>,
    url: &str,
    post: Option<&str>,
    o: &Opts,
) -> Result<String> {
    let mut cmd = pinned(oha, cpu);
    cmd.args([
        "--no-tui",
        "-z",
        &format!("{}s", o.duration),
        "-c",
        &o.connections.to_string(),
    ]);
    if let Some(body) = post {
        cmd.args(["-m", "POST", "-T", "application/json", "-d", body]);
    }
    cmd.arg(url);
    output(cmd)
}

/// One-line summary from wrk output (`Requests/sec` and latency percentiles);
/// for oha, its `Requests/sec` line.
fn summarize(out: &str) -> String {
    let mut parts = Vec::new();
    for line in out.lines() {
        let t = line.trim();
        if let Some(rps) = t.strip_prefix("Requests/sec:") {
            parts.insert(0, format!("{} req/s", rps.trim()));
        } else if let Some(rest) = ["50%", "75%", "90%", "99%"]
            .iter()
            .find_map(|p| t.strip_prefix(p).map(|r| (p, r.trim())))
        {
            // wrk's "Latency Distribution" lines look like "50%  1.23ms".
            if !rest.1.is_empty() && !rest.1.contains(' ') {
                parts.push(format!("p{} {}", rest.0.trim_end_matches('%'), rest.1));
            }
        } else if t.contains("Non-2xx") || t.contains("Socket errors") {
            parts.push(t.to_string());
        }
    }
    if parts.is_empty() {
        "(could not parse output)".to_string()
    } else {
        parts.join(", ")
    }
}
