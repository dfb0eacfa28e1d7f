//! `cargo xtask e2e-llama-cpp`: the real llama.cpp end-to-end tier (issue 6).
//!
//! Builds llama.cpp's `llama-server` from the source bundled in the pinned
//! `llama-cpp-python` sdist (PyPI), converts the tiny Llama of
//! `cargo xtask vllm-setup` to GGUF with the converter bundled in the same
//! sdist (both cached under `$CITADEL_DEV_CACHE`, default
//! `/var/cache/citadel-dev`), boots a systemd sandbox, writes a stack with one
//! `llama-cpp` model and one simulated one, installs it with Citadel's real
//! hardened units and proves, against the real engine:
//!
//! * the unit becomes `active` only once the engine can serve (a completion
//!   straight to the engine works the moment the unit is active, and the
//!   engine's "model loaded" line precedes systemd's "Started"),
//! * chat, completion and streaming through the gateway, `/v1/models`,
//! * the gateway's `/metrics`, the engine's `/metrics` and
//!   `citadel-systemd health` show the model,
//! * llama-server's own logs are in the unit's journal,
//! * kill -9 of llama-server: restart, ready again, nothing left of the old
//!   instance,
//! * `citadel-systemd stop` leaves no llama-server process.
//!
//! Prints `PASS`/`FAIL` per check, timings and memory, and a last line
//! `e2e-llama-cpp: N passed, M failed`; exits non-zero on any failure.
//! Notes and measured numbers: `tools/llama-cpp/README.md`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use citadel_sandbox::SandboxOptions;

use crate::tier::{build_binaries, ensure_debian_packages, info, unit, Report, Tier, CITADEL_BINS};
use crate::vllm;

/// The `llama-cpp-python` sdist whose bundled `vendor/llama.cpp` is built.
pub const LLAMA_CPP_PYTHON: &str = "0.3.36";
/// sha256 of `llama_cpp_python-0.3.36.tar.gz` as downloaded from PyPI.
const SDIST_SHA256: &str = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e";
/// CMake options. `GGML_NATIVE=OFF` keeps the cached binary portable to any
/// x86-64 with AVX2/FMA/F16C (ggml's non-native defaults) instead of tying it
/// to the CPU that built it; static libs make one self-contained file; no
/// curl/OpenSSL (llama-server must never download anything here) and no
/// prebuilt web UI (it would be fetched from the network).
const CMAKE_FLAGS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
];

const MODEL: &str = "tiny-gguf";
const MODEL_PORT: u16 = 11400;
const SIM: &str = "sim-a";
const SIM_PORT: u16 = 11401;
const GATEWAY: &str = "http://127.0.0.1:8000";
/// llama-server loads the tiny GGUF in well under a second; generous cap.
const START_DEADLINE: Duration = Duration::from_secs(3 * 60);

fn usage() -> &'static str {
    "usage: cargo xtask e2e-llama-cpp [--bin-dir DIR] [--base DIR]\n\
     \n\
     --bin-dir DIR  take citadel-systemd, citadel-model, citadel-gateway and\n\
     \x20              citadel-engine-sim from DIR (default: build them, debug)\n\
     --base DIR     cache base (default $CITADEL_DEV_CACHE or /var/cache/citadel-dev)"
}

pub fn run(args: Vec<String>) -> Result<()> {
    let mut bin_dir: Option<PathBuf> = None;
    let mut base = vllm::default_base();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bin-dir" => bin_dir = Some(it.next().context(usage())?.into()),
            "--base" => base = it.next().context(usage())?.into(),
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            other => bail!("unknown argument `{other}`\n{}", usage()),
        }
    }
    let t0 = Instant::now();
    ensure_debian_packages("e2e-llama-cpp", &["cmake", "g++", "make"])?;
    let t = Instant::now();
    let vpaths = vllm::ensure(&base)?;
    println!(
        "e2e-llama-cpp: python env + tiny model ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let llama = ensure_llama_cpp(&vpaths)?;
    let bin_dir = match bin_dir {
        Some(d) => d,
        None => build_binaries("e2e-llama-cpp")?,
    };
    let bin_dir = bin_dir
        .canonicalize()
        .with_context(|| format!("--bin-dir {}", bin_dir.display()))?;
    for b in CITADEL_BINS {
        if !bin_dir.join(b).is_file() {
            bail!("{b} is missing in {}", bin_dir.display());
        }
    }

    let mut r = Report::default();
    let result = scenario(&mut r, &llama, &bin_dir);
    if let Err(e) = &result {
        r.check("scenario ran to the end", false, format!("{e:#}"));
    }
    println!(
        "e2e-llama-cpp: total wall time {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    println!("e2e-llama-cpp: {} passed, {} failed", r.passed, r.failed);
    if r.failed > 0 {
        bail!("{} check(s) failed", r.failed);
    }
    Ok(())
}

/// The cached engine and model.
pub struct LlamaPaths {
    /// `$BASE/llama-cpp/<pin>/bin/llama-server`
    pub server: PathBuf,
    /// `$BASE/models/tiny-llama-gguf/tiny-llama-f32.gguf`
    pub gguf: PathBuf,
}

/// Build llama-server and convert the tiny model unless cached (stamps).
pub fn ensure_llama_cpp(vpaths: &vllm::VllmPaths) -> Result<LlamaPaths> {
    fs::create_dir_all(vpaths.base.join("llama-cpp"))?;
    let _lock = CacheLock::acquire(&vpaths.base.join("llama-cpp/.lock"))?;
    let dir = vpaths.base.join("llama-cpp").join(LLAMA_CPP_PYTHON);
    let server = dir.join("bin/llama-server");
    let convert = dir.join("convert");
    let stamp = dir.join(".citadel-stamp");
    let want = format!(
        "llama-cpp-python=={LLAMA_CPP_PYTHON} sha256={SDIST_SHA256} target=llama-server {}\n",
        CMAKE_FLAGS.join(" ")
    );
    if fs::read_to_string(&stamp).ok().as_deref() != Some(want.as_str())
        || !server.is_file()
        || !convert.join("convert_hf_to_gguf.py").is_file()
    {
        build_llama_server(vpaths, &dir)?;
        fs::write(&stamp, &want)?;
        vllm::fix_permissions(&dir)?;
    } else {
        println!("e2e-llama-cpp: llama-server cached ({})", server.display());
    }

    let gguf_dir = vpaths.base.join("models/tiny-llama-gguf");
    let gguf = gguf_dir.join("tiny-llama-f32.gguf");
    let gstamp = gguf_dir.join(".citadel-stamp");
    let model_id = fs::read_to_string(vpaths.model_dir.join(".citadel-tiny-model.json"))
        .context("the tiny model has no .citadel-tiny-model.json")?;
    let gwant = format!("converter llama-cpp-python=={LLAMA_CPP_PYTHON} f32\n{model_id}");
    if fs::read_to_string(&gstamp).ok().as_deref() != Some(gwant.as_str()) || !gguf.is_file() {
        let t = Instant::now();
        fs::create_dir_all(&gguf_dir)?;
        let tmp = gguf_dir.join("tiny-llama-f32.gguf.tmp");
        let out = Command::new(&vpaths.python)
            .arg(convert.join("convert_hf_to_gguf.py"))
            .arg(&vpaths.model_dir)
            .arg("--outfile")
            .arg(&tmp)
            .args(["--outtype", "f32"])
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_OFFLINE", "1")
            .env("HF_HOME", vpaths.base.join("hf-home"))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output()
            .context("running convert_hf_to_gguf.py")?;
        if !out.status.success() {
            bail!(
                "convert_hf_to_gguf.py failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        fs::rename(&tmp, &gguf)?;
        fs::write(&gstamp, &gwant)?;
        vllm::fix_permissions(&gguf_dir)?;
        println!(
            "e2e-llama-cpp: GGUF converted in {:.1} s ({}, {} bytes)",
            t.elapsed().as_secs_f64(),
            gguf.display(),
            fs::metadata(&gguf)?.len()
        );
    } else {
        println!("e2e-llama-cpp: GGUF cached ({})", gguf.display());
    }
    Ok(LlamaPaths { server, gguf })
}

/// Serialises runs that share a cache base: a second run would otherwise wipe
/// the first one's build directory. A directory holding the owner's PID;
/// a lock whose owner is gone is taken over.
struct CacheLock(PathBuf);

impl CacheLock {
    fn acquire(path: &Path) -> Result<CacheLock> {
        let mut told = false;
        loop {
            match fs::create_dir(path) {
                Ok(()) => {
                    fs::write(path.join("pid"), std::process::id().to_string())?;
                    return Ok(CacheLock(path.to_path_buf()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = fs::read_to_string(path.join("pid")).unwrap_or_default();
                    let owner = owner.trim();
                    if !owner.is_empty() && !Path::new("/proc").join(owner).exists() {
                        let _ = fs::remove_dir_all(path);
                        continue;
                    }
                    if !told {
                        println!(
                            "e2e-llama-cpp: waiting for process {owner} which holds {}",
                            path.display()
                        );
                        told = true;
                    }
                    std::thread::sleep(Duration::from_secs(2));
                }
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
    }
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Download the sdist (pip, PyPI, sha256-checked), build `llama-server` from
/// its `vendor/llama.cpp`, keep the binary and the GGUF converter in `dir`.
fn build_llama_server(vpaths: &vllm::VllmPaths, dir: &Path) -> Result<()> {
    let t = Instant::now();
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    let work = dir.join("work");
    fs::create_dir_all(&work)?;
    let pip = vpaths.base.join("uv-tool/bin/pip");
    run_cmd(
        Command::new(&pip)
            .args(["download", "--quiet", "--disable-pip-version-check"])
            // Only this package from source: with `--no-binary :all:` pip also
            // builds the sdist's PEP 517 backend dependencies from source just
            // to read its metadata (measured: 6-8 min; this way: 5 s).
            .args(["--no-deps", "--no-binary", "llama-cpp-python", "-d"])
            .arg(&work)
            .arg(format!("llama-cpp-python=={LLAMA_CPP_PYTHON}")),
    )?;
    let sdist = work.join(format!("llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"));
    let sum = Command::new("sha256sum").arg(&sdist).output()?;
    let sum = String::from_utf8_lossy(&sum.stdout);
    ensure!(
        sum.split_whitespace().next() == Some(SDIST_SHA256),
        "sha256 of {} is {sum}, expected {SDIST_SHA256}",
        sdist.display()
    );
    run_cmd(
        Command::new("tar")
            .arg("xzf")
            .arg(&sdist)
            .arg("-C")
            .arg(&work),
    )?;
    let src = work.join(format!(
        "llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp"
    ));
    let build = work.join("build");
    println!(
        "e2e-llama-cpp: building llama-server from llama-cpp-python=={LLAMA_CPP_PYTHON} (~5 min on 2 cores)"
    );
    let log = work.join("build.log");
    let logf = || -> Result<(Stdio, Stdio)> {
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        Ok((f.try_clone()?.into(), f.into()))
    };
    let (o, e) = logf()?;
    let configure = Command::new("cmake")
        .arg("-S")
        .arg(&src)
        .arg("-B")
        .arg(&build)
        .args(CMAKE_FLAGS)
        .stdout(o)
        .stderr(e)
        .status()?;
    let (o, e) = logf()?;
    let ok = configure.success()
        && Command::new("cmake")
            .arg("--build")
            .arg(&build)
            .args(["--target", "llama-server", "-j2"])
            .stdout(o)
            .stderr(e)
            .status()?
            .success();
    if !ok {
        let text = fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "building llama-server failed (log {}):\n{}",
            log.display(),
            tail.join("\n")
        );
    }
    fs::create_dir_all(dir.join("bin"))?;
    fs::copy(build.join("bin/llama-server"), dir.join("bin/llama-server"))?;
    // The converter and the gguf package it imports (from its own gguf-py).
    let convert = dir.join("convert");
    fs::create_dir_all(&convert)?;
    for f in ["convert_hf_to_gguf.py", "LICENSE"] {
        fs::copy(src.join(f), convert.join(f))?;
    }
    for d in ["conversion", "gguf-py"] {
        run_cmd(Command::new("cp").arg("-a").arg(src.join(d)).arg(&convert))?;
    }
    fs::remove_dir_all(&work)?;
    println!(
        "e2e-llama-cpp: llama-server built in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

/// apt-get install what building llama-server needs unless present.
/// `scripts/setup-dev.sh` installs them too.
/// The stack: one llama.cpp model, one simulator, the gateway (auth on).
pub fn config(llama: &LlamaPaths) -> String {
    format!(
        r#"# citadel.toml of `cargo xtask e2e-llama-cpp`: a real llama.cpp model and a simulator.
[paths]
home = "/opt/citadel"

[service]
user = "citadel"
group = "citadel"

[gateway]
listen = "127.0.0.1"
port = 8000
auth = true
rate_limit_per_minute = 1000
memory_max = "256M"

[model_defaults]
engine = "sim"
start_timeout = "2min"
stop_timeout = "10s"
watchdog = "10s"
memory_max = "256M"

[models.{MODEL}]
engine = "llama-cpp"
port = {MODEL_PORT}
binary = "{server}"
model = "{gguf}"
parallel = 2
args = ["--ctx-size", "2048", "--threads", "2"]
memory_max = "1G"

[models.{SIM}]
port = {SIM_PORT}
args = ["--load-time", "1s", "--tokens-per-second", "200"]
"#,
        server = llama.server.display(),
        gguf = llama.gguf.display(),
    )
}

fn scenario(r: &mut Report, llama: &LlamaPaths, bin_dir: &Path) -> Result<()> {
    let tier = Tier::boot(
        "e2e-llama-cpp",
        SandboxOptions::new("e2e-llama-cpp"),
        bin_dir,
    )?;
    for p in [&llama.server, &llama.gguf] {
        ensure!(
            tier.sb.root().join(p.strip_prefix("/")?).is_file(),
            "{} is not visible inside the sandbox (a --base below /tmp?)",
            p.display()
        );
    }
    let cfg_path = tier.sb.root().join("opt/citadel/config/citadel.toml");
    fs::create_dir_all(cfg_path.parent().context("config dir")?)?;
    fs::write(&cfg_path, config(llama))?;

    let result = steps(r, &tier);
    if result.is_err() || r.failed > 0 {
        println!(
            "--- journal tail of {}\n{}",
            unit(MODEL),
            tier.journal_tail(&unit(MODEL), 60)
        );
    }
    let t = Instant::now();
    tier.sb.shutdown().context("sandbox teardown")?;
    println!(
        "e2e-llama-cpp: sandbox torn down in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    result
}

/// Index of the first journal line containing any of `markers`.
fn line_of(journal: &str, markers: &[&str]) -> Option<usize> {
    journal
        .lines()
        .position(|l| markers.iter().any(|m| l.contains(m)))
}

fn steps(r: &mut Report, tier: &Tier) -> Result<()> {
    let (code, out) = tier.cli(&["validate", "--bin-dir", &tier.bin_dir]);
    r.check(
        "validate (config, systemd-analyze verify, exposure targets)",
        code == Some(0),
        format!("exit {code:?}"),
    );
    let (code, out_install) = tier.cli(&["install", "--bin-dir", &tier.bin_dir]);
    if !r.check("install", code == Some(0), format!("exit {code:?}")) {
        bail!("install failed:\n{out}{out_install}");
    }
    let key = tier.api_key();
    let u = unit(MODEL);
    let (_, cmdline) = tier.exec(&[&format!("{}/citadel-model", tier.bin_dir), "command", MODEL]);
    info(
        "engine command line (citadel-model command)",
        cmdline.trim(),
    );

    // --- start: active only once the engine serves.
    let t_start = Instant::now();
    let mut start = tier
        .sb
        .command(&[&tier.cli, "start"])
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning citadel-systemd start")?;
    let mut activating_seen = false;
    let mut health_while_activating = Vec::new();
    let mut ready_after = None;
    let mut completion_at_ready = None;
    let mut start_status = None;
    let mut start_returned = None;
    loop {
        if ready_after.is_none() {
            match tier.show(&u, "ActiveState").as_str() {
                "activating" => {
                    activating_seen = true;
                    let (code, _, _) = tier.engine_http("GET", MODEL_PORT, "/health", None);
                    if health_while_activating.last() != Some(&code) {
                        health_while_activating.push(code);
                    }
                }
                "active" => {
                    ready_after = Some(t_start.elapsed());
                    let (code, _, secs) = tier.engine_completion(MODEL, MODEL_PORT);
                    completion_at_ready = Some((code, secs));
                }
                _ => {}
            }
        }
        // `start` returns once the API serves (issue 10, item 1), maybe
        // with the model still loading: keep watching until it is active.
        if start_status.is_some() && ready_after.is_some() {
            break;
        }
        if start_status.is_none() {
            start_status = start.try_wait()?;
            if start_status.is_some() {
                start_returned = Some(t_start.elapsed());
            }
        }
        if t_start.elapsed() > START_DEADLINE {
            if start_status.is_none() {
                let _ = start.kill();
                let _ = start.wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let start_secs = start_returned.unwrap_or(t_start.elapsed()).as_secs_f64();
    r.check(
        "citadel-systemd start",
        start_status.is_some_and(|s| s.success()),
        format!("{start_status:?} after {start_secs:.1} s"),
    );
    info(
        &format!("{MODEL}: engine /health codes seen while the unit was activating"),
        format!("{health_while_activating:?} (activating seen: {activating_seen})"),
    );
    r.check(
        &format!("{MODEL}: active, and a completion straight to the engine works at that moment"),
        ready_after.is_some() && completion_at_ready.is_some_and(|(c, _)| c == 200),
        format!(
            "active {:.2} s after start, engine completion {completion_at_ready:?}",
            ready_after.map_or(f64::NAN, |d| d.as_secs_f64()),
        ),
    );
    // READY=1 (systemd's "Started") came only after llama-server said the
    // model is loaded and it listens.
    let j = tier.journal(&u);
    let loaded = line_of(&j, &["llama_server: model loaded"]);
    let started = line_of(&j, &["Started citadel-model@"]);
    r.check(
        &format!("{MODEL}: READY only after llama-server had loaded the model"),
        matches!((loaded, started), (Some(l), Some(s)) if l < s),
        format!("journal line of 'model loaded' {loaded:?}, of 'Started' {started:?}"),
    );
    let all_active = [MODEL, SIM]
        .iter()
        .all(|m| tier.show(&unit(m), "ActiveState") == "active")
        && tier.show("citadel-gateway.service", "ActiveState") == "active";
    if !r.check(
        "every unit active (llama-cpp, sim, gateway)",
        all_active,
        "",
    ) {
        bail!("the stack did not start");
    }
    // The gateway admits each model at its next probe after READY=1 (it
    // answered 503 model_not_ready right after start): the checks through it
    // (and `health` expecting healthy) run once it lists every model.
    let listed = tier.wait_listed(GATEWAY, &key, &[MODEL, SIM], Duration::from_secs(60));
    if !r.check(
        "the gateway lists every model in /v1/models",
        listed.is_ok(),
        match &listed {
            Ok(d) => format!("{:.1} s after the units were active", d.as_secs_f64()),
            Err(e) => e.clone(),
        },
    ) {
        bail!("the gateway did not admit the models");
    }

    // --- serving through the gateway.
    let chat = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":16}}"#
    );
    let mut lat = Vec::new();
    let mut chat_ok = true;
    for _ in 0..3 {
        let (code, resp, secs) = tier.http(
            "POST",
            &format!("{GATEWAY}/v1/chat/completions"),
            Some(&key),
            Some(&chat),
        );
        let v: serde_json::Value = serde_json::from_str(&resp).unwrap_or_default();
        chat_ok &= code == 200
            && v["object"] == "chat.completion"
            && v["choices"][0]["message"].is_object();
        lat.push(format!("{:.0} ms", secs * 1000.0));
        if !chat_ok {
            lat.push(format!(
                "http {code}: {}",
                resp.chars().take(300).collect::<String>()
            ));
            break;
        }
    }
    r.check(
        &format!("{MODEL}: chat through the gateway (3x, 16 tokens)"),
        chat_ok,
        lat.join(", "),
    );
    let body = format!(r#"{{"model":"{MODEL}","prompt":"once upon","max_tokens":16}}"#);
    let (code, resp, secs) = tier.http(
        "POST",
        &format!("{GATEWAY}/v1/completions"),
        Some(&key),
        Some(&body),
    );
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap_or_default();
    r.check(
        &format!("{MODEL}: completion through the gateway"),
        code == 200 && v["object"] == "text_completion" && v["choices"][0]["text"].is_string(),
        format!("http {code}, {:.0} ms, usage {}", secs * 1000.0, v["usage"]),
    );
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":16,"stream":true}}"#
    );
    let (code, resp, secs) = tier.http(
        "POST",
        &format!("{GATEWAY}/v1/chat/completions"),
        Some(&key),
        Some(&body),
    );
    let events = resp.lines().filter(|l| l.starts_with("data: {")).count();
    r.check(
        &format!("{MODEL}: streamed chat through the gateway"),
        code == 200 && events >= 2 && resp.contains("data: [DONE]"),
        format!("http {code}, {events} chunks, {:.0} ms", secs * 1000.0),
    );
    let (code, _, _) = tier.http(
        "POST",
        &format!("{GATEWAY}/v1/chat/completions"),
        Some("not-a-key"),
        Some(&chat),
    );
    r.check(
        "the gateway refuses a wrong API key",
        code == 401,
        format!("http {code}"),
    );
    let (code, resp, _) = tier.http("GET", &format!("{GATEWAY}/v1/models"), Some(&key), None);
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap_or_default();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    r.check(
        "/v1/models lists the llama.cpp model",
        code == 200 && ids.contains(&MODEL),
        format!("http {code}, {ids:?}"),
    );

    // --- observability: gateway metrics, engine metrics, health, status, journal.
    let (code, metrics, _) = tier.http("GET", &format!("{GATEWAY}/metrics"), None, None);
    let label = format!("model=\"{MODEL}\"");
    let up = metrics.lines().any(|l| {
        l.starts_with("citadel_gateway_backend_up") && l.contains(&label) && l.ends_with(" 1")
    });
    let served = metrics.lines().any(|l| {
        l.starts_with("citadel_gateway_requests")
            && l.contains(&label)
            && l.contains("200")
            && !l.ends_with(" 0")
    });
    r.check(
        &format!("{MODEL}: gateway /metrics (backend_up 1, requests counted)"),
        code == 200 && up && served,
        format!("http {code}, backend_up {up}, requests {served}"),
    );
    let (code, em, _) = tier.engine_http("GET", MODEL_PORT, "/metrics", None);
    let series: std::collections::BTreeSet<&str> = em
        .lines()
        .filter(|l| l.starts_with("llamacpp:"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    r.check(
        &format!("{MODEL}: llama-server's own /metrics"),
        code == 200 && series.len() >= 5,
        format!("http {code}, {} llamacpp:* series", series.len()),
    );
    let (code, out) = tier.cli(&["health", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
    let healthy = v["models"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["model"] == MODEL))
        .is_some_and(|x| x["healthy"] == true);
    r.check(
        "citadel-systemd health: healthy, the llama.cpp model ok",
        code == Some(0) && v["overall"] == "healthy" && healthy,
        format!("exit {code:?}, overall {}", v["overall"]),
    );
    let (_, out) = tier.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
    let serving = v
        .as_array()
        .and_then(|a| a.iter().find(|x| x["service"] == MODEL))
        .is_some_and(|x| {
            x["active_state"] == "active"
                && x["status_text"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("serving"))
        });
    r.check(
        "citadel-systemd status: the llama.cpp model active, serving",
        serving,
        "",
    );
    let j = tier.journal(&u);
    let markers = [
        "load_model: loading model",
        "llama_server: model loaded",
        "llama_server: listening on",
        "print_timing",
    ];
    let found: Vec<&str> = markers.iter().copied().filter(|m| j.contains(m)).collect();
    if !r.check(
        &format!("{MODEL}: llama-server's own log lines in the unit's journal"),
        found.len() == markers.len(),
        format!("found {found:?} in {} lines", j.lines().count()),
    ) {
        println!("--- journal as read\n{j}");
    }
    let mem = tier.show(&u, "MemoryCurrent");
    let (procs, pss, rss) = tier.unit_memory_mib(&u);
    info(
        &format!("{MODEL}: memory"),
        format!(
            "MemoryCurrent {} MiB, PSS {pss} MiB / RSS {rss} MiB in {procs} processes (supervisor + llama-server)",
            mem.parse::<u64>().map_or(mem.clone(), |b| (b >> 20).to_string())
        ),
    );

    // --- kill -9 of llama-server: restart, ready again, nothing of the old instance left.
    let before: u64 = tier.show(&u, "NRestarts").parse().unwrap_or(0);
    let old = tier.cgroup_pids(&u);
    let srv = tier.pgrep(&format!("llama-server.*--port {MODEL_PORT}"));
    if r.check(
        &format!("{MODEL}: one llama-server process"),
        srv.len() == 1,
        format!("{srv:?} ({} processes in the unit)", old.len()),
    ) {
        let t = Instant::now();
        tier.exec(&["kill", "-9", &srv[0].to_string()]);
        let back = tier.poll(START_DEADLINE, || {
            tier.show(&u, "NRestarts").parse::<u64>().unwrap_or(0) > before
                && tier.show(&u, "ActiveState") == "active"
        });
        let (code, _, _) = tier.engine_completion(MODEL, MODEL_PORT);
        r.check(
            &format!("{MODEL}: kill -9 of llama-server -> restarted -> READY again"),
            back.is_some() && code == 200,
            format!(
                "NRestarts {before} -> {}, active again after {:.1} s, completion http {code}",
                tier.show(&u, "NRestarts"),
                t.elapsed().as_secs_f64()
            ),
        );
        let now = tier.cgroup_pids(&u);
        let alive: Vec<u32> = old
            .iter()
            .copied()
            .filter(|p| !now.contains(p) && tier.exec(&["kill", "-0", &p.to_string()]).0)
            .collect();
        let reused: Vec<u32> = old.iter().copied().filter(|p| now.contains(p)).collect();
        r.check(
            &format!("{MODEL}: no process of the killed instance remains"),
            alive.is_empty() && reused.is_empty(),
            format!("old {old:?}, now {now:?}"),
        );
        let gw = tier.poll(Duration::from_secs(60), || {
            tier.http(
                "POST",
                &format!("{GATEWAY}/v1/chat/completions"),
                Some(&key),
                Some(&chat),
            )
            .0 == 200
        });
        r.check(
            &format!("{MODEL}: serves through the gateway again"),
            gw.is_some(),
            format!("after {gw:?}"),
        );
    }

    // --- stop: nothing of llama-server left.
    let t = Instant::now();
    let (code, _) = tier.cli(&["stop"]);
    let stop_secs = t.elapsed().as_secs_f64();
    let left = tier.pgrep("llama-server");
    r.check(
        "citadel-systemd stop leaves no llama-server process",
        code == Some(0) && left.is_empty(),
        format!("exit {code:?} in {stop_secs:.1} s, left {left:?}"),
    );
    // Graceful: the engine got one SIGTERM (KillMode=mixed; the supervisor signals
    // its group). A second one makes llama-server terminate immediately.
    let j = tier.journal(&unit(MODEL));
    let second = j.contains("Received second interrupt");
    r.check(
        "tiny-gguf: stopped gracefully, one SIGTERM (no \"second interrupt\")",
        !second && j.contains("SIGTERM"),
        format!("second interrupt in the journal: {second}"),
    );
    Ok(())
}
