//! `cargo xtask e2e-vllm`: the real-engine end-to-end tier (issue 6).
//!
//! Installs the pinned vLLM CPU build and the tiny model ([`vllm::ensure`],
//! cached under `$CITADEL_DEV_CACHE`, default `/var/cache/citadel-dev`), boots
//! a systemd sandbox, writes a stack with one `vllm` model `tiny` in two local
//! instances (`tiny`, `tiny:2`: two units, two engines serving the tiny model)
//! and two simulated models, installs it
//! with Citadel's real hardened units and proves, against the real engine:
//!
//! * each vLLM unit stays `activating` with changing `STATUS=` until a
//!   completion works, then is `active` (and a completion works right then),
//! * chat, completion and streaming through the gateway, `/v1/models`,
//! * the gateway's `/metrics` and `citadel-systemd health` show the models,
//! * the engine's own logs are in the unit's journal,
//! * kill -9 of the vLLM API server: restart, ready again, nothing left of
//!   the old instance,
//! * `citadel-systemd restart --rolling tiny` under a light load through the
//!   gateway fails no request and gives both instances new engines (issue 15),
//! * `citadel-systemd stop` leaves no vLLM process (and no /dev/shm segment).
//!
//! Prints `PASS`/`FAIL` per check, timings and memory, and a last line
//! `e2e-vllm: N passed, M failed`; exits non-zero on any failure.
//!
//! Caching between runs on one machine: the uv cache, the venv and the model
//! (`vllm::ensure`), and the engines' compile caches (`$BASE/e2e-engine-cache`
//! is bind-mounted as the sandbox's `/var/cache/citadel`, the units'
//! `CacheDirectory=`): torch inductor's compiled kernels make a warm start
//! about twice as fast. `--cold` starts with an empty engine cache.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use citadel_sandbox::SandboxOptions;

use crate::tier::{build_binaries, ensure_debian_packages, info, unit, Report, Tier};
use crate::vllm;

/// The vLLM model, served by two local instances (issue 15): each is its own
/// unit and engine, balanced by the gateway, restarted one at a time by
/// `restart --rolling`.
const VLLM_MODEL: &str = "tiny";
/// Its instances (instance names, engine ports).
const VLLM_INSTANCES: [(&str, u16); 2] = [("tiny", 11400), ("tiny:2", 11401)];
const SIM_MODELS: [(&str, u16); 2] = [("sim-a", 11402), ("sim-b", 11403)];
const GATEWAY: &str = "http://127.0.0.1:8000";
/// Both engines load in parallel on 2 cores: measured 1-3 min; generous cap.
const START_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// The first instance's base TimeoutStartSec (an operator drop-in), far below its load time.
const SHORT_START_TIMEOUT: Duration = Duration::from_secs(20);
/// The engine cache inside the sandbox (the units' `CacheDirectory=citadel/%i`).
const SANDBOX_CACHE: &str = "/var/cache/citadel";

fn usage() -> &'static str {
    "usage: cargo xtask e2e-vllm [--bin-dir DIR] [--base DIR] [--cold]\n\
     \n\
     --bin-dir DIR  take citadel-systemd, citadel-model, citadel-gateway and\n\
     \x20              citadel-engine-sim from DIR (default: build them, debug)\n\
     --base DIR     vLLM cache base (default $CITADEL_DEV_CACHE or /var/cache/citadel-dev)\n\
     --cold         start the engines with an empty compile cache"
}

pub fn run(args: Vec<String>) -> Result<()> {
    let mut bin_dir: Option<PathBuf> = None;
    let mut base = vllm::default_base();
    let mut cold = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bin-dir" => bin_dir = Some(it.next().context(usage())?.into()),
            "--base" => base = it.next().context(usage())?.into(),
            "--cold" => cold = true,
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            other => bail!("unknown argument `{other}`\n{}", usage()),
        }
    }
    let t0 = Instant::now();
    ensure_debian_packages("e2e-vllm", &["g++", "python3-dev"])?;
    let t = Instant::now();
    let paths = vllm::ensure(&base)?;
    println!(
        "e2e-vllm: venv + model ready in {:.1} s ({})",
        t.elapsed().as_secs_f64(),
        paths.base.display()
    );
    let bin_dir = match bin_dir {
        Some(d) => d,
        None => build_binaries("e2e-vllm")?,
    };
    let bin_dir = bin_dir
        .canonicalize()
        .with_context(|| format!("--bin-dir {}", bin_dir.display()))?;
    for b in [
        "citadel-systemd",
        "citadel-model",
        "citadel-gateway",
        "citadel-engine-sim",
    ] {
        if !bin_dir.join(b).is_file() {
            bail!("{b} is missing in {}", bin_dir.display());
        }
    }
    let engine_cache = paths.base.join("e2e-engine-cache");
    if cold && engine_cache.exists() {
        std::fs::remove_dir_all(&engine_cache)?;
    }
    std::fs::create_dir_all(&engine_cache)?;

    let mut r = Report::default();
    let result = scenario(&mut r, &paths, &bin_dir, &engine_cache);
    if let Err(e) = &result {
        r.check("scenario ran to the end", false, format!("{e:#}"));
    }
    println!(
        "e2e-vllm: total wall time {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    println!("e2e-vllm: {} passed, {} failed", r.passed, r.failed);
    if r.failed > 0 {
        bail!("{} check(s) failed", r.failed);
    }
    Ok(())
}

/// The stack: two vLLM models, two simulators, the gateway.
pub fn config(paths: &vllm::VllmPaths) -> String {
    let mut c = String::from(
        r#"# citadel.toml of `cargo xtask e2e-vllm`: two real vLLM (CPU) models, two simulators.
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
"#,
    );
    // One model, two instances; each instance's OpenMP threads are pinned to
    // its own core by an operator drop-in (`steps`), since `env` is the model's.
    c.push_str(&format!(
        r#"
[models.{VLLM_MODEL}]
engine = "vllm"
port = {port}
python = "{python}"
model = "{model}"
max_model_len = 1024
start_timeout = "15min"
stop_timeout = "30s"
watchdog = "60s"
memory_max = "6G"
tasks_max = 4096
nofile = 65536
env = {{ VLLM_CPU_KVCACHE_SPACE = "1" }}

[[models.{VLLM_MODEL}.instances]]
port = {port2}
"#,
        port = VLLM_INSTANCES[0].1,
        port2 = VLLM_INSTANCES[1].1,
        python = paths.python.display(),
        model = paths.model_dir.display(),
    ));
    for (name, port) in SIM_MODELS {
        c.push_str(&format!(
            "\n[models.{name}]\nport = {port}\nargs = [\"--load-time\", \"1s\", \"--tokens-per-second\", \"200\"]\n"
        ));
    }
    c
}

impl Tier {
    /// `Key=Value` properties of several units at once (one exec).
    fn show_many(&self, units: &[String], props: &[&str]) -> Vec<Vec<(String, String)>> {
        let mut argv = vec!["systemctl".to_owned(), "show".to_owned()];
        for p in props {
            argv.push("-p".into());
            argv.push((*p).into());
        }
        argv.extend(units.iter().cloned());
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = self.exec(&argv).1;
        out.split("\n\n")
            .map(|block| {
                block
                    .lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            })
            .collect()
    }
}

/// What the start-up poll saw of one vLLM unit.
#[derive(Default, Debug)]
struct StartTrace {
    activating_seen: bool,
    statuses: Vec<String>,
    ready_after: Option<Duration>,
    /// The engine's /health said 200 while the unit was still activating.
    health_ok_while_activating: bool,
    completion_at_ready: Option<(u16, f64)>,
    failed: Option<String>,
}

fn scenario(r: &mut Report, paths: &vllm::VllmPaths, bin_dir: &Path, cache: &Path) -> Result<()> {
    let mut opts = SandboxOptions::new("e2e-vllm");
    opts.extra_nspawn_args
        .push(format!("--bind={}:{SANDBOX_CACHE}", cache.display()));
    let tier = Tier::boot("e2e-vllm", opts, bin_dir)?;
    let cfg_path = tier.sb.root().join("opt/citadel/config/citadel.toml");
    std::fs::create_dir_all(cfg_path.parent().context("config dir")?)?;
    std::fs::write(&cfg_path, config(paths))?;

    let result = steps(r, &tier);
    if result.is_err() || r.failed > 0 {
        for (m, _) in VLLM_INSTANCES {
            println!(
                "--- journal tail of {}\n{}",
                unit(m),
                tier.journal_tail(&unit(m), 40)
            );
        }
    }
    let t = Instant::now();
    tier.sb.shutdown().context("sandbox teardown")?;
    println!(
        "e2e-vllm: sandbox torn down in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    result
}

fn steps(r: &mut Report, tier: &Tier) -> Result<()> {
    let (code, out) = tier.cli(&["validate", "--bin-dir", &tier.bin_dir]);
    r.check(
        "validate (config, systemd-analyze verify, exposure targets)",
        code == Some(0),
        format!("exit {code:?}"),
    );
    // Operators' drop-ins: each instance's OpenMP threads on a core of its
    // own, and the first instance gets a base start timeout far below its load
    // time: only the supervisor's EXTEND_TIMEOUT_USEC keeps it alive.
    for (i, (instance, _)) in VLLM_INSTANCES.iter().enumerate() {
        let dropin = tier.sb.root().join(format!(
            "etc/systemd/system/{}.d/override.conf",
            unit(instance)
        ));
        std::fs::create_dir_all(dropin.parent().context("drop-in dir")?)?;
        let mut text = format!("[Service]\nEnvironment=VLLM_CPU_OMP_THREADS_BIND={i}\n");
        if i == 0 {
            text.push_str(&format!(
                "TimeoutStartSec={}s\n",
                SHORT_START_TIMEOUT.as_secs()
            ));
        }
        std::fs::write(&dropin, text)?;
    }
    let (code, out_install) = tier.cli(&["install", "--bin-dir", &tier.bin_dir]);
    if !r.check("install", code == Some(0), format!("exit {code:?}")) {
        bail!("install failed:\n{out}{out_install}");
    }
    let key = tier.api_key();

    // --- start: activating with progress, READY only once a completion works.
    let vllm_units: Vec<String> = VLLM_INSTANCES.iter().map(|(m, _)| unit(m)).collect();
    let start_out = std::env::temp_dir().join(format!("e2e-vllm-start-{}.log", std::process::id()));
    let t_start = Instant::now();
    let mut start = tier
        .sb
        .command(&[&tier.cli, "start"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&start_out)?)
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning citadel-systemd start")?;
    let mut traces: Vec<StartTrace> = VLLM_INSTANCES
        .iter()
        .map(|_| StartTrace::default())
        .collect();
    let mut start_status = None;
    let mut start_returned = None;
    loop {
        let states = tier.show_many(&vllm_units, &["ActiveState", "StatusText"]);
        for (i, (_, port)) in VLLM_INSTANCES.iter().enumerate() {
            let tr = &mut traces[i];
            if tr.ready_after.is_some() || tr.failed.is_some() {
                continue;
            }
            let get = |k: &str| {
                states
                    .get(i)
                    .and_then(|s| s.iter().find(|(kk, _)| kk == k))
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let (active, status) = (get("ActiveState"), get("StatusText"));
            match active.as_str() {
                "activating" => {
                    tr.activating_seen = true;
                    if !status.is_empty() && tr.statuses.last() != Some(&status) {
                        tr.statuses.push(status);
                    }
                    if !tr.health_ok_while_activating {
                        let (code, _, _) = tier.engine_http("GET", *port, "/health", None);
                        tr.health_ok_while_activating = code == 200;
                    }
                }
                "active" => {
                    tr.ready_after = Some(t_start.elapsed());
                    let (code, _, secs) = tier.engine_completion(VLLM_MODEL, *port);
                    tr.completion_at_ready = Some((code, secs));
                    if !status.is_empty() && tr.statuses.last() != Some(&status) {
                        tr.statuses.push(status);
                    }
                }
                "failed" | "inactive" if tr.activating_seen => {
                    tr.failed = Some(format!("{active}: {status}"));
                }
                _ => {}
            }
        }
        // `start` returns once the API serves (issue 10, item 1), maybe
        // with the vLLM models still loading: keep watching until each has
        // become active or failed (a failed unit may already be `activating
        // (auto-restart)` again), then stop.
        let settled = traces
            .iter()
            .all(|t| t.ready_after.is_some() || t.failed.is_some());
        if start_status.is_some() && settled {
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
        std::thread::sleep(Duration::from_millis(250));
    }
    let start_secs = start_returned.unwrap_or(t_start.elapsed()).as_secs_f64();
    print!(
        "{}",
        std::fs::read_to_string(&start_out).unwrap_or_default()
    );
    let _ = std::fs::remove_file(&start_out);
    r.check(
        "citadel-systemd start",
        start_status.is_some_and(|s| s.success()),
        format!("{start_status:?} after {start_secs:.1} s"),
    );
    for (i, (model, _)) in VLLM_INSTANCES.iter().enumerate() {
        let tr = &traces[i];
        let loading = tr
            .statuses
            .iter()
            .filter(|s| s.starts_with("loading"))
            .count();
        r.check(
            &format!("{model}: activating with STATUS= progress"),
            tr.activating_seen && loading >= 2,
            format!("{loading} distinct loading STATUS texts: {:?}", tr.statuses),
        );
        let comp = tr.completion_at_ready;
        r.check(
            &format!("{model}: READY, and a completion works at that moment"),
            tr.ready_after.is_some() && comp.is_some_and(|(c, _)| c == 200),
            format!(
                "active after {:.1} s, engine completion {:?}{}",
                tr.ready_after.map_or(f64::NAN, |d| d.as_secs_f64()),
                comp,
                tr.failed
                    .as_deref()
                    .map(|f| format!(", {f}"))
                    .unwrap_or_default()
            ),
        );
        if i == 0 {
            let ts = tier.show(&unit(model), "TimeoutStartUSec");
            match tr.ready_after {
                Some(d) if d > SHORT_START_TIMEOUT => {
                    r.check(
                        &format!(
                            "{model}: loading outlived TimeoutStartSec by EXTEND_TIMEOUT_USEC"
                        ),
                        ts == format!("{}s", SHORT_START_TIMEOUT.as_secs()),
                        format!("TimeoutStartSec {ts}, ready after {:.1} s", d.as_secs_f64()),
                    );
                }
                _ => info(
                    &format!("{model}: EXTEND_TIMEOUT_USEC not exercised"),
                    format!("ready before TimeoutStartSec {ts}"),
                ),
            }
        }
        info(
            &format!("{model}: engine /health 200 while the unit was still activating"),
            tr.health_ok_while_activating,
        );
    }
    let all_active = VLLM_INSTANCES
        .iter()
        .chain(SIM_MODELS.iter())
        .all(|(m, _)| tier.show(&unit(m), "ActiveState") == "active")
        && tier.show("citadel-gateway.service", "ActiveState") == "active";
    if !r.check(
        "every unit active (2 vLLM instances, 2 sim, gateway)",
        all_active,
        "",
    ) {
        bail!("the stack did not start");
    }
    // The gateway admits each model at its next probe after READY=1: the
    // checks through it (and `health` expecting healthy) run once it lists
    // every model.
    let all: Vec<&str> = std::iter::once(VLLM_MODEL)
        .chain(SIM_MODELS.iter().map(|(m, _)| *m))
        .collect();
    let listed = tier.wait_listed(GATEWAY, &key, &all, Duration::from_secs(60));
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
    {
        let model = VLLM_MODEL;
        let body = format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":16}}"#
        );
        let (code, resp, secs) = tier.http(
            "POST",
            &format!("{GATEWAY}/v1/chat/completions"),
            Some(&key),
            Some(&body),
        );
        let v: serde_json::Value = serde_json::from_str(&resp).unwrap_or_default();
        r.check(
            &format!("{model}: chat through the gateway"),
            code == 200 && v["object"] == "chat.completion" && v["model"] == model,
            format!("http {code}, {:.0} ms", secs * 1000.0),
        );
        let body = format!(r#"{{"model":"{model}","prompt":"once upon","max_tokens":16}}"#);
        let (code, resp, secs) = tier.http(
            "POST",
            &format!("{GATEWAY}/v1/completions"),
            Some(&key),
            Some(&body),
        );
        let v: serde_json::Value = serde_json::from_str(&resp).unwrap_or_default();
        r.check(
            &format!("{model}: completion through the gateway"),
            code == 200 && v["object"] == "text_completion",
            format!("http {code}, {:.0} ms", secs * 1000.0),
        );
        let body = format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":16,"stream":true}}"#
        );
        let (code, resp, secs) = tier.http(
            "POST",
            &format!("{GATEWAY}/v1/chat/completions"),
            Some(&key),
            Some(&body),
        );
        let events = resp.lines().filter(|l| l.starts_with("data: {")).count();
        r.check(
            &format!("{model}: streamed chat through the gateway"),
            code == 200 && events >= 2 && resp.contains("data: [DONE]"),
            format!("http {code}, {events} chunks, {:.0} ms", secs * 1000.0),
        );
    }
    let (code, resp, _) = tier.http("GET", &format!("{GATEWAY}/v1/models"), Some(&key), None);
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap_or_default();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    r.check(
        "/v1/models lists the vLLM models",
        code == 200 && ids.contains(&VLLM_MODEL),
        format!("http {code}, {ids:?}"),
    );

    // --- observability: gateway metrics, engine metrics, health, status, journal.
    let (code, metrics, _) = tier.http("GET", &format!("{GATEWAY}/metrics"), None, None);
    for (instance, port) in VLLM_INSTANCES {
        let model = VLLM_MODEL;
        let label = format!("model=\"{model}\"");
        let backend = format!("backend=\"http://127.0.0.1:{port}\"");
        let up = metrics.lines().any(|l| {
            l.starts_with("citadel_gateway_backend_up")
                && l.contains(&label)
                && l.contains(&backend)
                && l.ends_with(" 1")
        });
        let served = metrics.lines().any(|l| {
            l.starts_with("citadel_gateway_requests")
                && l.contains(&label)
                && l.contains("200")
                && !l.ends_with(" 0")
        });
        r.check(
            &format!("{instance}: gateway /metrics (backend_up 1, requests counted)"),
            code == 200 && up && served,
            format!("http {code}, backend_up {up}, requests {served}"),
        );
        let (code, em, _) = tier.engine_http("GET", port, "/metrics", None);
        let series = em
            .lines()
            .filter(|l| l.starts_with("vllm:"))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        r.check(
            &format!("{instance}: the engine's own /metrics"),
            code == 200 && series > 10,
            format!("http {code}, {series} vllm:* series"),
        );
    }
    let (code, out) = tier.cli(&["health", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
    let healthy = |m: &str| {
        v["models"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["model"] == m))
            .is_some_and(|x| x["healthy"] == true)
    };
    r.check(
        "citadel-systemd health: healthy, vLLM models ok",
        code == Some(0) && v["overall"] == "healthy" && healthy(VLLM_MODEL),
        format!("exit {code:?}, overall {}", v["overall"]),
    );
    let (_, out) = tier.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
    let serving = |m: &str| {
        v.as_array()
            .and_then(|a| a.iter().find(|x| x["instance"] == m || x["service"] == m))
            .is_some_and(|x| {
                x["active_state"] == "active"
                    && x["status_text"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("serving"))
            })
    };
    r.check(
        "citadel-systemd status: both vLLM instances active, serving",
        VLLM_INSTANCES.iter().all(|(m, _)| serving(m)),
        "",
    );
    for (model, _) in VLLM_INSTANCES {
        let j = tier.journal(&unit(model));
        let markers = ["non-default args", "(EngineCore", "Starting to load model"];
        let found: Vec<&str> = markers.iter().copied().filter(|m| j.contains(m)).collect();
        r.check(
            &format!("{model}: vLLM's own log lines in the unit's journal"),
            found.len() == markers.len(),
            format!("found {found:?} in {} lines", j.lines().count()),
        );
        info(
            &format!("{model}: LimitNOFILE"),
            tier.show(&unit(model), "LimitNOFILE"),
        );
        let mem = tier.show(&unit(model), "MemoryCurrent");
        let (procs, pss, _) = tier.unit_memory_mib(&unit(model));
        info(
            &format!("{model}: memory"),
            format!(
                "MemoryCurrent {} MiB, PSS {pss} MiB in {procs} processes",
                mem.parse::<u64>()
                    .map_or(mem.clone(), |b| (b >> 20).to_string())
            ),
        );
    }

    // --- kill -9 of the API server: restart, ready again, nothing of the old instance left.
    let (instance, port) = VLLM_INSTANCES[1];
    let model = VLLM_MODEL;
    let u = unit(instance);
    let before: u64 = tier.show(&u, "NRestarts").parse().unwrap_or(0);
    let old = tier.cgroup_pids(&u);
    let api = tier.pgrep(&format!(
        "vllm.entrypoints.openai.api_server.*--port {port}"
    ));
    if r.check(
        &format!("{instance}: one vLLM API server process"),
        api.len() == 1,
        format!("{api:?} ({} processes in the unit)", old.len()),
    ) {
        let t = Instant::now();
        tier.exec(&["kill", "-9", &api[0].to_string()]);
        let back = tier.poll(START_DEADLINE, || {
            tier.show(&u, "NRestarts").parse::<u64>().unwrap_or(0) > before
                && tier.show(&u, "ActiveState") == "active"
        });
        let (code, _, _) = tier.engine_completion(model, port);
        r.check(
            &format!("{instance}: kill -9 of the API server -> restarted -> READY again"),
            back.is_some() && code == 200,
            format!(
                "NRestarts {before} -> {}, ready again after {:.1} s, completion http {code}",
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
            &format!("{instance}: no process of the killed instance remains"),
            alive.is_empty() && reused.is_empty(),
            format!("old {old:?}, now {now:?}"),
        );
        // The gateway admits the instance again (its backend is up), and
        // the model serves through it.
        let gw = tier.poll(Duration::from_secs(60), || {
            backend_up(tier, model, port)
                && tier
                    .http(
                        "POST",
                        &format!("{GATEWAY}/v1/chat/completions"),
                        Some(&key),
                        Some(&chat(model, 4)),
                    )
                    .0
                    == 200
        });
        r.check(
            &format!("{instance}: admitted by the gateway again, {model} serves"),
            gw.is_some(),
            format!("{gw:?}"),
        );
    }

    rolling_restart(r, tier, &key);

    // --- stop: nothing of vLLM left.
    let t = Instant::now();
    let (code, _) = tier.cli(&["stop"]);
    let stop_secs = t.elapsed().as_secs_f64();
    let left = tier.pgrep("vllm|VLLM|EngineCore");
    r.check(
        "citadel-systemd stop leaves no vLLM process",
        code == Some(0) && left.is_empty(),
        format!("exit {code:?} in {stop_secs:.1} s, left {left:?}"),
    );
    let shm = tier
        .exec(&[
            "sh",
            "-c",
            "ls /dev/shm | grep -c -e psm_ -e sem.mp || true",
        ])
        .1;
    info("/dev/shm segments left after stop", shm.trim());
    Ok(())
}

/// A chat completion request body for `model`.
fn chat(model: &str, max_tokens: u32) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":{max_tokens}}}"#
    )
}

/// Whether the gateway's `/metrics` says the backend on `port` is up.
fn backend_up(tier: &Tier, model: &str, port: u16) -> bool {
    let (code, metrics, _) = tier.http("GET", &format!("{GATEWAY}/metrics"), None, None);
    let label = format!("model=\"{model}\"");
    let backend = format!("backend=\"http://127.0.0.1:{port}\"");
    code == 200
        && metrics.lines().any(|l| {
            l.starts_with("citadel_gateway_backend_up")
                && l.contains(&label)
                && l.contains(&backend)
                && l.ends_with(" 1")
        })
}

/// Issue 15, item 5: `restart --rolling` of the two vLLM instances under a
/// light, steady load through the gateway: no request fails, and each
/// instance runs a new engine afterwards.
fn rolling_restart(r: &mut Report, tier: &Tier, key: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let pids = || -> Vec<String> {
        VLLM_INSTANCES
            .iter()
            .map(|(i, _)| tier.show(&unit(i), "MainPID"))
            .collect()
    };
    let before = pids();
    let done = AtomicBool::new(false);
    let t = Instant::now();
    let (code, out, sent, failed) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let (mut sent, mut failed) = (0u32, Vec::new());
            while !done.load(Ordering::Relaxed) {
                let (code, body, _) = tier.http(
                    "POST",
                    &format!("{GATEWAY}/v1/chat/completions"),
                    Some(key),
                    Some(&chat(VLLM_MODEL, 4)),
                );
                sent += 1;
                if code != 200 {
                    failed.push(format!(
                        "http {code}: {}",
                        body.chars().take(200).collect::<String>()
                    ));
                }
                // Light load: a few requests a second (pacing, not synchronisation).
                std::thread::sleep(Duration::from_millis(200));
            }
            (sent, failed)
        });
        let (code, out) = tier.cli(&["restart", "--rolling", VLLM_MODEL]);
        done.store(true, Ordering::Relaxed);
        let (sent, failed) = load.join().unwrap_or_default();
        (code, out, sent, failed)
    });
    let secs = t.elapsed().as_secs_f64();
    print!("{out}");
    let after = pids();
    r.check(
        &format!("{VLLM_MODEL}: restart --rolling under load: 0 failed requests"),
        code == Some(0) && sent > 0 && failed.is_empty(),
        format!(
            "exit {code:?} in {secs:.1} s, {sent} requests, {} failed {failed:?}",
            failed.len()
        ),
    );
    r.check(
        &format!("{VLLM_MODEL}: every instance runs a new engine after the rolling restart"),
        before
            .iter()
            .zip(&after)
            .all(|(b, a)| b != a && a != "0" && !a.is_empty()),
        format!("MainPID {before:?} -> {after:?}"),
    );
}
